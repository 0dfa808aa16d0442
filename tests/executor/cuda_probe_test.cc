// The CUDA/NCCL build links and runs: without a GPU the device tests skip with the reason the
// driver gave; NCCL answers its version without a device either way.
#include <gtest/gtest.h>

#include "executor/cuda/device_info.h"

namespace switchyard {
namespace {

TEST(CudaProbe, LinkedNcclMatchesItsHeader) {
  const int runtime = nccl_runtime_version();
  const int header = nccl_header_version();
  // Same major and minor release: the library we run is the one we compiled against.
  EXPECT_EQ(runtime / 100, header / 100) << "runtime " << runtime << " vs header " << header;
  EXPECT_GE(runtime, 21800);  // NCCL 2.18+: ncclCommGetAsyncError/abort semantics the executor uses
}

TEST(CudaProbe, DevicesReportTheirProperties) {
  std::string reason;
  const auto devices = cuda_devices(&reason);
  if (devices.empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  for (const auto& d : devices) {
    EXPECT_FALSE(d.name.empty());
    EXPECT_GE(d.compute_major, 8) << d.name << ": Switchyard builds for sm_80 and sm_90";
    EXPECT_GT(d.multiprocessors, 0);
    EXPECT_GT(d.memory_bytes, int64_t{1} << 30);
  }
}

}  // namespace
}  // namespace switchyard
