// Under mpiexec: every rank loads the bundled configs and computes their content hashes; all ranks
// must agree byte for byte. A distributed search (each rank a slice of the plan space, rank 0
// merging) keys the store by these hashes, so they must not depend on the process, its address
// layout or its environment.
#include <gtest/gtest.h>
#include <mpi.h>

#include <string>

#include "core/config_registry.h"

namespace switchyard {
namespace {

std::string all_hashes() {
  const ConfigRegistry reg(SWITCHYARD_CONFIG_DIR);
  std::string out;
  for (const auto& n : reg.list(ConfigKind::kModel))
    out += content_hash(semantic_json(reg.load_model(n)));
  for (const auto& n : reg.list(ConfigKind::kCluster))
    out += content_hash(semantic_json(reg.load_cluster(n)));
  for (const auto& n : reg.list(ConfigKind::kPlan))
    out += content_hash(semantic_json(reg.load_plan(n)));
  for (const auto& n : reg.list(ConfigKind::kWorkload))
    out += content_hash(semantic_json(reg.load_workload(n)));
  return out;
}

TEST(MpiConfigHash, AllRanksAgree) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ASSERT_GE(size, 2) << "run under mpiexec with at least 2 ranks";
  const std::string mine = all_hashes();
  ASSERT_FALSE(mine.empty());
  int len = static_cast<int>(mine.size());
  int root_len = len;
  MPI_Bcast(&root_len, 1, MPI_INT, 0, MPI_COMM_WORLD);
  ASSERT_EQ(len, root_len);
  std::string root = mine;
  MPI_Bcast(root.data(), root_len, MPI_CHAR, 0, MPI_COMM_WORLD);
  int agree = root == mine ? 1 : 0, all_agree = 0;
  MPI_Allreduce(&agree, &all_agree, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(all_agree, 1) << "rank " << rank << " of " << size << " computed different hashes";
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // Only rank 0 prints gtest's report; every rank's result decides the exit code.
  if (rank != 0)
    delete ::testing::UnitTest::GetInstance()->listeners().Release(
        ::testing::UnitTest::GetInstance()->listeners().default_result_printer());
  int failed = RUN_ALL_TESTS();
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed;
}
