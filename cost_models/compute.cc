#include "cost_models/compute.h"

#include <algorithm>

namespace switchyard {

double bytes_per_element(Precision p) {
  switch (p) {
    case Precision::kFP32:
    case Precision::kTF32:
      return 4;
    case Precision::kBF16:
      return 2;
    case Precision::kFP8:
      return 1;
  }
  return 4;
}

double gemm_flops(const GemmShape& s) {
  return 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k) *
         static_cast<double>(s.batch);
}

double gemm_bytes(const GemmShape& s, Precision p) {
  const double m = static_cast<double>(s.m), n = static_cast<double>(s.n),
               k = static_cast<double>(s.k);
  return bytes_per_element(p) * (m * k + k * n + m * n) * static_cast<double>(s.batch);
}

namespace {

// GEMM efficiency at a shape and precision.
double gemm_efficiency(double min_dim, Precision p, const CostProfile& prof) {
  const double e = prof.gemm_efficiency_at(min_dim);
  return p == Precision::kFP8 ? e * prof.fp8_gemm_efficiency_scale : e;
}

// Roofline of one piece of work without the launch.
KernelCost roofline(double flops, double bytes, double compute_efficiency, Precision p,
                    const GpuSpec& gpu, const CostProfile& prof) {
  KernelCost c;
  c.flops = flops;
  c.bytes = bytes;
  const double peak = gpu.peak_flops(p) > 0 ? gpu.peak_flops(p) : gpu.peak_fp32_flops;
  const double compute_s = flops > 0 ? flops / (peak * compute_efficiency) : 0.0;
  const double memory_s = bytes / (gpu.hbm_bw_Bps * prof.hbm_efficiency);
  c.memory_bound = memory_s > compute_s;
  c.time_s = std::max(compute_s, memory_s);
  return c;
}

}  // namespace

KernelCost gemm_cost(const GemmShape& s, Precision p, const GpuSpec& gpu, const CostProfile& prof) {
  if (s.m <= 0 || s.n <= 0 || s.k <= 0 || s.batch <= 0) return {};
  const double min_dim = static_cast<double>(std::min({s.m, s.n, s.k}));
  KernelCost c =
      roofline(gemm_flops(s), gemm_bytes(s, p), gemm_efficiency(min_dim, p, prof), p, gpu, prof);
  c.time_s += prof.kernel_launch_s;
  return c;
}

KernelCost grouped_gemm_cost(const std::vector<int64_t>& m_per_group, int64_t n, int64_t k,
                             Precision p, const GpuSpec& gpu, const CostProfile& prof) {
  KernelCost total;
  for (int64_t m : m_per_group) {
    if (m <= 0) continue;
    GemmShape s{m, n, k, 1};
    const double min_dim = static_cast<double>(std::min({m, n, k}));
    KernelCost c =
        roofline(gemm_flops(s), gemm_bytes(s, p), gemm_efficiency(min_dim, p, prof), p, gpu, prof);
    total.time_s += c.time_s;
    total.flops += c.flops;
    total.bytes += c.bytes;
    total.memory_bound = total.memory_bound || c.memory_bound;
  }
  if (total.flops > 0) total.time_s += prof.kernel_launch_s;
  return total;
}

namespace {

double attention_forward_flops(const AttentionShape& s) {
  const double kv = static_cast<double>(s.kv_len > 0 ? s.kv_len : s.seq_len);
  const double q = static_cast<double>(s.seq_len);
  double flops = 2.0 * static_cast<double>(s.batch) * static_cast<double>(s.heads) * q * kv *
                 static_cast<double>(s.qk_dim + s.v_dim);
  // Causal masking with equal query and key lengths skips the upper triangle of score tiles.
  if (s.causal) flops *= 0.5;
  return flops;
}

double attention_bytes(const AttentionShape& s, Precision p) {
  const double kv = static_cast<double>(s.kv_len > 0 ? s.kv_len : s.seq_len);
  const double q = static_cast<double>(s.seq_len);
  const double e = bytes_per_element(p);
  // Q and O per query head; K and V per key/value head. Flash attention never writes the scores.
  return e * static_cast<double>(s.batch) *
         (q * static_cast<double>(s.heads) * static_cast<double>(s.qk_dim + s.v_dim) +
          kv * static_cast<double>(s.kv_heads) * static_cast<double>(s.qk_dim + s.v_dim));
}

}  // namespace

KernelCost attention_forward_cost(const AttentionShape& s, Precision p, const GpuSpec& gpu,
                                  const CostProfile& prof) {
  if (s.batch <= 0 || s.seq_len <= 0 || s.heads <= 0) return {};
  KernelCost c = roofline(attention_forward_flops(s), attention_bytes(s, p),
                          prof.attention_efficiency, p, gpu, prof);
  c.time_s += prof.kernel_launch_s;
  return c;
}

KernelCost attention_backward_cost(const AttentionShape& s, Precision p, const GpuSpec& gpu,
                                   const CostProfile& prof) {
  if (s.batch <= 0 || s.seq_len <= 0 || s.heads <= 0) return {};
  // Reads Q, K, V, O, dO; writes dQ, dK, dV: about twice the forward's traffic.
  KernelCost c = roofline(2.5 * attention_forward_flops(s), 2.0 * attention_bytes(s, p),
                          prof.attention_efficiency, p, gpu, prof);
  c.time_s += prof.kernel_launch_s;
  return c;
}

KernelCost elementwise_cost(double bytes, const GpuSpec& gpu, const CostProfile& prof,
                            MemoryKernel kind) {
  KernelCost c;
  if (bytes <= 0) return c;
  c.bytes = bytes;
  c.memory_bound = true;
  c.time_s = prof.kernel_launch_s + bytes / (gpu.hbm_bw_Bps * prof.memory_efficiency(kind));
  return c;
}

KernelCost norm_cost(int64_t tokens, int64_t hidden, Precision p, const GpuSpec& gpu,
                     const CostProfile& prof) {
  return elementwise_cost(
      2.0 * bytes_per_element(p) * static_cast<double>(tokens) * static_cast<double>(hidden), gpu,
      prof, MemoryKernel::kNorm);
}

KernelCost gate_topk_cost(int64_t tokens, int64_t hidden, int64_t experts, Precision p,
                          const GpuSpec& gpu, const CostProfile& prof) {
  KernelCost logits = gemm_cost({tokens, experts, hidden, 1}, p, gpu, prof);
  // Softmax and top-k in fp32: read the logits, write probabilities and indices.
  KernelCost topk = elementwise_cost(
      3.0 * 4.0 * static_cast<double>(tokens) * static_cast<double>(experts), gpu, prof);
  KernelCost c;
  c.time_s = logits.time_s + topk.time_s;
  c.flops = logits.flops;
  c.bytes = logits.bytes + topk.bytes;
  c.memory_bound = logits.memory_bound;
  return c;
}

KernelCost permute_cost(int64_t tokens, int64_t top_k, int64_t hidden, Precision p,
                        const GpuSpec& gpu, const CostProfile& prof) {
  return elementwise_cost(2.0 * bytes_per_element(p) * static_cast<double>(tokens) *
                              static_cast<double>(top_k) * static_cast<double>(hidden),
                          gpu, prof, MemoryKernel::kPermute);
}

}  // namespace switchyard
