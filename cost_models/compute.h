// Compute cost model: a roofline per kernel. time = launch + max(FLOPs / (peak *
// efficiency(shape)), bytes / (HBM bandwidth * hbm_efficiency)). GEMM efficiency depends on the
// GEMM's smallest dimension (CostProfile::gemm_efficiency); a grouped expert GEMM is one launch
// whose groups each run at their own shape's efficiency, so a few tokens per expert show up as slow
// experts.
#pragma once

#include <cstdint>
#include <vector>

#include "core/cluster.h"
#include "core/shapes.h"
#include "cost_models/profile.h"

namespace switchyard {

// Bytes of one element in a precision (tf32 is stored as fp32; fp8 as one byte).
double bytes_per_element(Precision p);

double gemm_flops(const GemmShape& s);
// A, B read once and C written once.
double gemm_bytes(const GemmShape& s, Precision p);

struct KernelCost {
  double time_s = 0;
  double flops = 0;
  double bytes = 0;
  bool memory_bound = false;
};

KernelCost gemm_cost(const GemmShape& s, Precision p, const GpuSpec& gpu, const CostProfile& prof);
// One launch over several GEMMs sharing n and k: m_per_group[i] rows go through group i (tokens per
// local expert). Empty groups cost nothing.
KernelCost grouped_gemm_cost(const std::vector<int64_t>& m_per_group, int64_t n, int64_t k,
                             Precision p, const GpuSpec& gpu, const CostProfile& prof);

// Fused (flash) attention, forward. FLOPs actually executed: a causal mask skips half the score
// tiles (training, prefill, and load-balanced context parallelism, where each rank's queries see
// half of the keys on average); a decode step attends to its whole cache (causal = false).
KernelCost attention_forward_cost(const AttentionShape& s, Precision p, const GpuSpec& gpu,
                                  const CostProfile& prof);
// Backward recomputes the scores and runs 5 GEMMs against the forward's 2: 2.5x its FLOPs.
KernelCost attention_backward_cost(const AttentionShape& s, Precision p, const GpuSpec& gpu,
                                   const CostProfile& prof);

// A kernel that streams `bytes` through HBM (norm, activation, softmax, residual add, copy) at
// its class's achieved bandwidth.
KernelCost elementwise_cost(double bytes, const GpuSpec& gpu, const CostProfile& prof,
                            MemoryKernel kind = MemoryKernel::kStream);
// RMSNorm / LayerNorm of tokens x hidden: read input, write output (+ weights, negligible).
KernelCost norm_cost(int64_t tokens, int64_t hidden, Precision p, const GpuSpec& gpu,
                     const CostProfile& prof);
// Router: logits GEMM (tokens x hidden x experts) then softmax + top-k over the logits.
KernelCost gate_topk_cost(int64_t tokens, int64_t hidden, int64_t experts, Precision p,
                          const GpuSpec& gpu, const CostProfile& prof);
// Permute (or unpermute) tokens by expert: gather tokens*top_k rows of `hidden`, write them.
KernelCost permute_cost(int64_t tokens, int64_t top_k, int64_t hidden, Precision p,
                        const GpuSpec& gpu, const CostProfile& prof);

}  // namespace switchyard
