#include "cost_models/profile.h"

#include <algorithm>
#include <cmath>

namespace switchyard {

double CostProfile::gemm_efficiency_at(double min_dim) const {
  if (gemm_efficiency.empty()) return 1.0;
  if (min_dim <= gemm_efficiency.front().min_dim) {
    // Below the table: efficiency falls in proportion to the dimension (work per tile shrinks).
    const auto& p = gemm_efficiency.front();
    return p.efficiency * std::max(min_dim, 1.0) / p.min_dim;
  }
  if (min_dim >= gemm_efficiency.back().min_dim) return gemm_efficiency.back().efficiency;
  for (size_t i = 1; i < gemm_efficiency.size(); ++i) {
    const auto& a = gemm_efficiency[i - 1];
    const auto& b = gemm_efficiency[i];
    if (min_dim <= b.min_dim) {
      double t = (std::log2(min_dim) - std::log2(a.min_dim)) /
                 (std::log2(b.min_dim) - std::log2(a.min_dim));
      return a.efficiency + t * (b.efficiency - a.efficiency);
    }
  }
  return gemm_efficiency.back().efficiency;
}

double CostProfile::memory_efficiency(MemoryKernel k) const {
  double e = 0;
  switch (k) {
    case MemoryKernel::kStream:
      break;
    case MemoryKernel::kNorm:
      e = norm_efficiency;
      break;
    case MemoryKernel::kActivation:
      e = activation_efficiency;
      break;
    case MemoryKernel::kPermute:
      e = permute_efficiency;
      break;
    case MemoryKernel::kLoss:
      e = loss_efficiency;
      break;
    case MemoryKernel::kOptimizer:
      e = optimizer_efficiency;
      break;
  }
  return e > 0 ? e : hbm_efficiency;
}

const char* memory_kernel_name(MemoryKernel k) {
  switch (k) {
    case MemoryKernel::kStream:
      return "stream";
    case MemoryKernel::kNorm:
      return "norm";
    case MemoryKernel::kActivation:
      return "activation";
    case MemoryKernel::kPermute:
      return "permute";
    case MemoryKernel::kLoss:
      return "loss";
    case MemoryKernel::kOptimizer:
      return "optimizer";
  }
  return "stream";
}

MemoryKernel memory_kernel_of_op(std::string_view name) {
  const auto ends_with = [&](std::string_view suffix) {
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (name.rfind("norm", 0) == 0 || name == "final_norm") return MemoryKernel::kNorm;
  if (ends_with("act")) return MemoryKernel::kActivation;
  if (name == "loss") return MemoryKernel::kLoss;
  return MemoryKernel::kStream;
}

CostProfile default_cost_profile(const ClusterSpec& cluster) {
  CostProfile p;
  p.name = "default";
  p.source = "published measurements and stated assumptions (cost_models/profile.cc)";
  // GEMM: the best bf16 matmul shapes reach 80.3% of dense peak on H100 SXM (794.5 of 989 TFLOP/s)
  // and 86.9% on A100 SXM (the "Maximum Achievable Matmul FLOPS" table of stas00/ml-engineering,
  // compute/accelerator/README.md, torch 2.6-2.7); the table's top uses that. The fall-off for thin
  // GEMMs (tile and wave quantisation) is an assumption until `switchyard calibrate` measures it.
  p.gemm_efficiency = {{16, 0.05},  {32, 0.10},   {64, 0.20},   {128, 0.38}, {256, 0.55},
                       {512, 0.68}, {1024, 0.75}, {2048, 0.78}, {4096, 0.80}};
  // FP8: the same table measures H100 SXM at 1402.6 of 1979 TFLOP/s (70.9%) against 80.3% for
  // bf16, so FP8 GEMMs get 0.709 / 0.803 = 0.883 of the bf16 efficiency.
  p.fp8_gemm_efficiency_scale = 0.883;
  // FlashAttention-2 reaches 50-73% of A100 peak forward and less backward (arXiv 2307.08691);
  // 0.55 over forward and backward is our assumption.
  p.attention_efficiency = 0.55;
  // STREAM-like kernels reach ~90% of HBM bandwidth on A100/H100 (assumption within that range).
  p.hbm_efficiency = 0.85;
  p.kernel_launch_s = 4e-6;  // assumption: launch + tail of a kernel in a stream
  // Assumption: eager PyTorch dispatch plus the launch call costs ~10 us of host time per op
  // (Megatron/Transformer Engine modules issue several kernels per op; CUDA graphs cut this).
  p.host_issue_s = 10e-6;

  // Intra-node: nccl-tests busbw inside one node, 8 GPUs, >= 1 GiB: A100 all_reduce 228-232 GB/s,
  // all_gather 254, all_to_all 255 over 300 GB/s NVLink3; H100 all_reduce without NVLS ~370 GB/s,
  // all_gather ~360 over 450 GB/s NVLink4 => ~0.8 (tests/data/published_collectives.json).
  p.intra_node_efficiency = cluster.intra_node.fabric == Fabric::kPCIe ? 0.75 : 0.80;
  // NVLS all_reduce on H100: busbw ~480 GB/s = algbw ~274 GB/s = 0.61 of 450 GB/s.
  p.nvls_efficiency = 0.61;
  // Across nodes: 2 DGX-A100-like nodes all_reduce 184-188 GB/s over 8x25 GB/s NICs (0.93);
  // 4-16 H100 nodes with 3.2 Tb/s EFA 355-357 GB/s over 400 GB/s (0.89) => 0.9.
  p.nic_ring_efficiency = 0.90;
  // all_to_all across nodes: 2 NDm-A100 nodes 37.8 GB/s busbw, 2-32 p5 nodes 79-41 GB/s: the
  // rail-bound model below reproduces these with ~0.83.
  p.nic_all_to_all_efficiency = 0.83;
  p.nic_half_bw_message_bytes = 64.0 * 1024;  // assumption (InfiniBand with GPUDirect RDMA)
  p.collective_base_s = 8e-6;  // assumption: NCCL small-message all_reduce latency is ~10-20 us
  p.p2p_issue_s = 0.5e-6;      // assumption: cost of one more peer in a grouped send/recv
  // Assumption: NCCL's collectives overlap compute entirely (they take a few SMs; the slowdown of
  // the compute they share the GPU with is not modelled). `calibrate` measures it.
  p.comm_compute_overlap = 1.0;

  p.pcie_efficiency = 0.80;  // assumption: cudaMemcpy from pinned memory reaches ~80% of PCIe
  p.pcie_latency_s = 10e-6;  // assumption
  p.dram_efficiency = 0.60;  // assumption: multi-threaded memcpy vs theoretical DRAM bandwidth
  p.ssd_efficiency = 0.85;   // assumption: large sequential reads/writes with O_DIRECT
  p.ssd_latency_s = 100e-6;  // assumption: NVMe read latency

  // CUDA context (~0.5 GiB) + NCCL communicators' buffers + allocator fragmentation: assumption.
  p.runtime_reserved_bytes = int64_t{3} << 29;  // 1.5 GiB
  // (A cluster that says what its devices reserve, e.g. CPU ranks' arenas: nothing, says it.)
  if (cluster.gpu.runtime_reserved_bytes >= 0)
    p.runtime_reserved_bytes = cluster.gpu.runtime_reserved_bytes;
  return p;
}

namespace {

// The scalar members, once, for both directions.
template <typename F>
// Efficiencies are fractions of the cluster file's nominal figures. A calibration can find more
// than the nominal figure (local-cpu's figures are placeholders), so the measured ones may
// exceed 1 (up to 10: beyond that the cluster file is wrong, not the profile).
void for_each_scalar(CostProfile& p, F&& f) {
  f("fp8_gemm_efficiency_scale", p.fp8_gemm_efficiency_scale, 0.0, 1.5);
  f("attention_efficiency", p.attention_efficiency, 0.0, 10.0);
  f("hbm_efficiency", p.hbm_efficiency, 0.0, 10.0);
  // 0 (the default): as hbm_efficiency.
  f("norm_efficiency", p.norm_efficiency, -1.0, 10.0);
  f("activation_efficiency", p.activation_efficiency, -1.0, 10.0);
  f("permute_efficiency", p.permute_efficiency, -1.0, 10.0);
  f("loss_efficiency", p.loss_efficiency, -1.0, 10.0);
  f("optimizer_efficiency", p.optimizer_efficiency, -1.0, 10.0);
  f("kernel_launch_s", p.kernel_launch_s, -1.0, 1.0);
  f("host_issue_s", p.host_issue_s, -1.0, 1.0);
  f("intra_node_efficiency", p.intra_node_efficiency, 0.0, 10.0);
  f("intra_node_reduce_efficiency", p.intra_node_reduce_efficiency, -1.0, 10.0);  // 0: as above
  f("nvls_efficiency", p.nvls_efficiency, 0.0, 1.0);
  f("nic_ring_efficiency", p.nic_ring_efficiency, 0.0, 1.0);
  f("nic_all_to_all_efficiency", p.nic_all_to_all_efficiency, 0.0, 1.0);
  f("nic_half_bw_message_bytes", p.nic_half_bw_message_bytes, -1.0, 1e12);
  f("collective_base_s", p.collective_base_s, -1.0, 1.0);
  f("p2p_issue_s", p.p2p_issue_s, -1.0, 1.0);
  f("comm_compute_overlap", p.comm_compute_overlap, -1.0, 1.0);  // in [0, 1]
  f("pcie_efficiency", p.pcie_efficiency, 0.0, 10.0);
  f("pcie_latency_s", p.pcie_latency_s, -1.0, 1.0);
  f("dram_efficiency", p.dram_efficiency, 0.0, 10.0);
  f("host_optimizer_efficiency", p.host_optimizer_efficiency, -1.0, 10.0);  // 0: as above
  f("ssd_efficiency", p.ssd_efficiency, 0.0, 10.0);
  f("ssd_latency_s", p.ssd_latency_s, -1.0, 1.0);
}

}  // namespace

Json to_json(const CostProfile& p) {
  Json j = {{"name", p.name}, {"source", p.source}};
  Json table = Json::array();
  for (const auto& pt : p.gemm_efficiency) table.push_back({pt.min_dim, pt.efficiency});
  j["gemm_efficiency"] = table;
  CostProfile copy = p;
  for_each_scalar(copy, [&](const char* key, double& v, double, double) { j[key] = v; });
  j["runtime_reserved_bytes"] = p.runtime_reserved_bytes;
  return j;
}

CostProfile apply_profile_json(const Json& j, CostProfile p) {
  std::vector<ConfigIssue> issues;
  JsonReader r(j, "profile", issues);
  if (!r.is_object()) throw ConfigError(std::move(issues));
  r.optional("name", &p.name);
  r.optional("source", &p.source);
  // Efficiencies must be in (lo, hi]; times and sizes (lo = -1) in [0, hi].
  for_each_scalar(p, [&](const char* key, double& v, double lo, double hi) {
    double x = 0;
    if (!r.optional(key, &x)) return;
    const bool fraction = lo >= 0;
    if ((fraction && !(x > lo && x <= hi)) || (!fraction && !(x >= 0 && x <= hi))) {
      r.add_issue(r.path_of(key), std::string("must be in ") + (fraction ? "(0, " : "[0, ") +
                                      Json(hi).dump() + "], got " + Json(x).dump());
      return;
    }
    v = x;
  });
  r.optional("runtime_reserved_bytes", &p.runtime_reserved_bytes, 0);
  if (const Json* t = r.child("gemm_efficiency", false)) {
    const std::string path = r.path_of("gemm_efficiency");
    std::vector<EfficiencyPoint> table;
    if (!t->is_array() || t->empty()) {
      r.add_issue(path, "expected a non-empty array of [min_dim, efficiency] pairs");
    } else {
      for (size_t i = 0; i < t->size(); ++i) {
        const Json& pt = (*t)[i];
        const std::string ip = index_path(path, i);
        if (!pt.is_array() || pt.size() != 2) {
          r.add_issue(ip, "expected [min_dim, efficiency]");
          continue;
        }
        auto dim = read_number(pt[0], ip + "[0]", issues);
        auto eff = read_number(pt[1], ip + "[1]", issues);
        if (!dim || !eff) continue;
        if (!(*dim >= 1))
          r.add_issue(ip + "[0]", "must be >= 1");
        else if (!(*eff > 0 && *eff <= 10))
          r.add_issue(ip + "[1]", "must be in (0, 10] (a fraction of the nominal peak)");
        else if (!table.empty() && *dim <= table.back().min_dim)
          r.add_issue(ip + "[0]", "min_dim must increase along the table");
        else
          table.push_back({*dim, *eff});
      }
      if (table.size() == t->size()) p.gemm_efficiency = std::move(table);
    }
  }
  r.finish();
  throw_if_any(std::move(issues));
  return p;
}

}  // namespace switchyard
