#include "cost_models/compute.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

namespace switchyard {
namespace {

GpuSpec hand_gpu() {
  GpuSpec g;
  g.name = "hand";
  g.peak_fp32_flops = 1e14;
  g.peak_bf16_flops = 1e15;
  g.hbm_bw_Bps = 3e12;
  return g;
}

CostProfile hand_profile() {
  CostProfile p;
  p.gemm_efficiency = {{128, 0.5}, {1024, 0.8}};
  p.attention_efficiency = 0.5;
  p.hbm_efficiency = 0.85;
  p.kernel_launch_s = 4e-6;
  return p;
}

TEST(GemmEfficiency, InterpolatesInLog2AndScalesBelowTheTable) {
  const CostProfile p = hand_profile();
  EXPECT_DOUBLE_EQ(p.gemm_efficiency_at(128), 0.5);
  EXPECT_DOUBLE_EQ(p.gemm_efficiency_at(4096), 0.8);
  // log2(362.04) = 8.5 is halfway between 7 and 10... in thirds: (8.5 - 7) / 3 = 0.5.
  EXPECT_NEAR(p.gemm_efficiency_at(std::pow(2.0, 8.5)), 0.65, 1e-12);
  EXPECT_DOUBLE_EQ(p.gemm_efficiency_at(64), 0.25);
}

// 4096^3: 2*4096^3 FLOPs at 0.8 of 1 PFLOP/s; the 3 matrices (100.7 MB) take less at 2.55 TB/s.
TEST(Gemm, ComputeBoundByHand) {
  const KernelCost c =
      gemm_cost({4096, 4096, 4096, 1}, Precision::kBF16, hand_gpu(), hand_profile());
  const double flops = 2.0 * 4096.0 * 4096 * 4096;
  EXPECT_DOUBLE_EQ(c.flops, flops);
  EXPECT_DOUBLE_EQ(c.bytes, 2.0 * 3 * 4096.0 * 4096);
  EXPECT_FALSE(c.memory_bound);
  EXPECT_NEAR(c.time_s, 4e-6 + flops / 0.8e15, 1e-15);
}

// FP8 runs at the FP8 peak times the bf16 efficiency times the FP8 scale.
TEST(Gemm, Fp8EfficiencyScale) {
  GpuSpec g = hand_gpu();
  g.peak_fp8_flops = 2e15;
  CostProfile p = hand_profile();
  p.fp8_gemm_efficiency_scale = 0.9;
  const KernelCost c = gemm_cost({4096, 4096, 4096, 1}, Precision::kFP8, g, p);
  EXPECT_NEAR(c.time_s, 4e-6 + 2.0 * 4096.0 * 4096 * 4096 / (2e15 * 0.8 * 0.9), 1e-15);
}

// A GEMV-like shape is memory bound: 8 x 8192 x 8192 reads the whole weight.
TEST(Gemm, MemoryBoundByHand) {
  const KernelCost c = gemm_cost({8, 8192, 8192, 1}, Precision::kBF16, hand_gpu(), hand_profile());
  EXPECT_TRUE(c.memory_bound);
  const double bytes = 2.0 * (8.0 * 8192 + 8192.0 * 8192 + 8.0 * 8192);
  EXPECT_NEAR(c.time_s, 4e-6 + bytes / (3e12 * 0.85), 1e-15);
  // fp32 doubles the bytes moved and has a tenth of the peak: at this thin shape's efficiency
  // (0.5 * 8 / 128) it becomes compute bound.
  const KernelCost f = gemm_cost({8, 8192, 8192, 1}, Precision::kFP32, hand_gpu(), hand_profile());
  EXPECT_DOUBLE_EQ(f.bytes, 2 * bytes);
  EXPECT_FALSE(f.memory_bound);
  EXPECT_NEAR(f.time_s, 4e-6 + 2.0 * 8 * 8192 * 8192 / (1e14 * 0.5 * 8 / 128), 1e-15);
}

// Groups of 0, 128 and 1024 rows, n = k = 1024: the empty group costs nothing, the 128-row group is
// memory bound, the 1024-row group compute bound; one launch for all.
TEST(GroupedGemm, EachGroupAtItsOwnShape) {
  const KernelCost c =
      grouped_gemm_cost({0, 128, 1024}, 1024, 1024, Precision::kBF16, hand_gpu(), hand_profile());
  const double g128 = std::max(2.0 * 128 * 1024 * 1024 / 0.5e15,
                               2.0 * (128.0 * 1024 * 2 + 1024.0 * 1024) / 2.55e12);
  const double g1024 =
      std::max(2.0 * 1024 * 1024 * 1024 / 0.8e15, 2.0 * 3 * 1024.0 * 1024 / 2.55e12);
  EXPECT_NEAR(c.time_s, 4e-6 + g128 + g1024, 1e-15);
  EXPECT_DOUBLE_EQ(c.flops, 2.0 * 128 * 1024 * 1024 + 2.0 * 1024 * 1024 * 1024);
  // Skew costs time: the same 1152 rows split evenly run faster than 128 + 1024.
  const KernelCost even =
      grouped_gemm_cost({576, 576}, 1024, 1024, Precision::kBF16, hand_gpu(), hand_profile());
  EXPECT_LT(even.time_s, c.time_s);
  EXPECT_EQ(
      grouped_gemm_cost({0, 0}, 1024, 1024, Precision::kBF16, hand_gpu(), hand_profile()).time_s,
      0.0);
}

// Causal attention, 1 x 1024 tokens, 8 heads of 128: 2*8*1024^2*256 FLOPs halved by the mask.
TEST(Attention, FlashForwardAndBackwardByHand) {
  AttentionShape s{1, 1024, 0, 8, 8, 128, 128, true};
  const KernelCost f = attention_forward_cost(s, Precision::kBF16, hand_gpu(), hand_profile());
  const double flops = 0.5 * 2.0 * 8 * 1024.0 * 1024 * 256;
  EXPECT_DOUBLE_EQ(f.flops, flops);
  EXPECT_NEAR(f.time_s, 4e-6 + flops / 0.5e15, 1e-15);
  const KernelCost b = attention_backward_cost(s, Precision::kBF16, hand_gpu(), hand_profile());
  EXPECT_DOUBLE_EQ(b.flops, 2.5 * flops);
  s.causal = false;
  EXPECT_DOUBLE_EQ(attention_forward_cost(s, Precision::kBF16, hand_gpu(), hand_profile()).flops,
                   2 * flops);
  // Decode: one query against a 4096-token cache is memory bound (reads K and V).
  AttentionShape d{64, 1, 4096, 8, 1, 128, 128, false};
  EXPECT_TRUE(attention_forward_cost(d, Precision::kBF16, hand_gpu(), hand_profile()).memory_bound);
}

TEST(Elementwise, NormGatePermuteByHand) {
  const GpuSpec g = hand_gpu();
  const CostProfile p = hand_profile();
  EXPECT_NEAR(norm_cost(4096, 4096, Precision::kBF16, g, p).time_s,
              4e-6 + 2.0 * 2 * 4096 * 4096 / 2.55e12, 1e-15);
  EXPECT_NEAR(permute_cost(4096, 2, 4096, Precision::kBF16, g, p).time_s,
              4e-6 + 2.0 * 2 * 4096 * 2 * 4096 / 2.55e12, 1e-15);
  const KernelCost gate = gate_topk_cost(4096, 4096, 64, Precision::kBF16, g, p);
  EXPECT_DOUBLE_EQ(gate.flops, 2.0 * 4096 * 64 * 4096);
  EXPECT_GT(gate.time_s, gemm_cost({4096, 64, 4096, 1}, Precision::kBF16, g, p).time_s);
  EXPECT_EQ(elementwise_cost(0, g, p).time_s, 0.0);
}

TEST(Precision, BytesPerElement) {
  EXPECT_EQ(bytes_per_element(Precision::kFP32), 4);
  EXPECT_EQ(bytes_per_element(Precision::kTF32), 4);
  EXPECT_EQ(bytes_per_element(Precision::kBF16), 2);
  EXPECT_EQ(bytes_per_element(Precision::kFP8), 1);
}

}  // namespace
}  // namespace switchyard
