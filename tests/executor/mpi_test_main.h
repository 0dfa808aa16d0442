// main() of the GoogleTest binaries that mpiexec launches: every rank runs every test, only rank
// 0 prints, and a failure on any rank fails the run.
#pragma once

#include <gtest/gtest.h>

#include "executor/cpu/mpi_communicator.h"

namespace switchyard::testing {

// Starts MPI, hands the runtime to `set` (the tests' global), runs the tests.
template <typename Set>
int run_mpi_tests(int argc, char** argv, Set set) {
  ::testing::InitGoogleTest(&argc, argv);
  auto mpi = MpiRuntime::start(&argc, &argv);
  set(mpi.get());
  if (mpi->world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  auto world = mpi->world(60);
  world->all_reduce(&rc, 1, DType::kInt32, ReduceOp::kMax);
  return rc;
}

}  // namespace switchyard::testing
