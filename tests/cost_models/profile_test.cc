#include "cost_models/profile.h"

#include <gtest/gtest.h>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

CostProfile base() { return default_cost_profile(testing::bundled().load_cluster("dgx-h100")); }

TEST(Profile, JsonRoundTrip) {
  CostProfile p = base();
  p.name = "calibrated";
  p.gemm_efficiency = {{64, 0.3}, {4096, 0.7}};
  p.nic_ring_efficiency = 0.85;
  const CostProfile q = apply_profile_json(to_json(p), default_cost_profile(ClusterSpec{}));
  EXPECT_EQ(q.name, "calibrated");
  ASSERT_EQ(q.gemm_efficiency.size(), 2u);
  EXPECT_DOUBLE_EQ(q.gemm_efficiency[1].efficiency, 0.7);
  EXPECT_DOUBLE_EQ(q.nic_ring_efficiency, 0.85);
  EXPECT_DOUBLE_EQ(q.host_issue_s, p.host_issue_s);
  EXPECT_EQ(q.runtime_reserved_bytes, p.runtime_reserved_bytes);
}

// The runtime's reserve (CUDA context, workspaces, NCCL buffers) is the profile's default unless
// the cluster says what its devices hold: a CPU rank's arena, nothing.
TEST(Profile, TheClusterMaySayWhatItsRuntimeReserves) {
  EXPECT_EQ(base().runtime_reserved_bytes, int64_t{3} << 29);
  const ClusterSpec cpu = testing::bundled().load_cluster("local-cpu");
  EXPECT_EQ(cpu.gpu.runtime_reserved_bytes, 0);
  EXPECT_EQ(default_cost_profile(cpu).runtime_reserved_bytes, 0);
  // Clusters that do not say keep their content hash: the key is written only when set.
  const ClusterSpec h100 = testing::bundled().load_cluster("dgx-h100");
  EXPECT_FALSE(semantic_json(h100).at("gpu").contains("runtime_reserved_bytes"));
  EXPECT_EQ(parse_cluster(to_json(cpu)).gpu.runtime_reserved_bytes, 0);
}

// A calibration names only what it measured; the rest keeps the base's values.
TEST(Profile, PartialOverride) {
  const CostProfile b = base();
  const CostProfile q =
      apply_profile_json(Json::parse(R"({"name": "h100-lab", "attention_efficiency": 0.42})"), b);
  EXPECT_EQ(q.name, "h100-lab");
  EXPECT_DOUBLE_EQ(q.attention_efficiency, 0.42);
  EXPECT_DOUBLE_EQ(q.hbm_efficiency, b.hbm_efficiency);
  EXPECT_EQ(q.gemm_efficiency.size(), b.gemm_efficiency.size());
}

TEST(Profile, RejectsUnknownKeysAndValuesOutOfRange) {
  try {
    apply_profile_json(
        Json::parse(R"({"hbm_efficency": 0.9, "nvls_efficiency": 1.5, "kernel_launch_s": -1,
                                       "gemm_efficiency": [[128, 0.5], [64, 0.6], [256, 12]]})"),
        base());
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    const std::string all = e.what();
    for (const char* expected :
         {"profile.hbm_efficency: unknown key", "profile.nvls_efficiency: must be in (0, 1",
          "profile.kernel_launch_s: must be in [0, 1",
          "profile.gemm_efficiency[1][0]: min_dim must increase",
          "profile.gemm_efficiency[2][1]: must be in (0, 10]"})
      EXPECT_NE(all.find(expected), std::string::npos) << expected << "\n" << all;
  }
}

}  // namespace
}  // namespace switchyard
