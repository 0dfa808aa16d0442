// CostProfile: the constants of the cost models for one cluster, filled once and read by the small
// formulas in compute.h, collectives.h, transfers.h and memory.h (NCCL's tuning tables are the
// model: constants in a table, one-line formulas). Nominal figures (peak FLOP/s, link bandwidths,
// latencies) come from the ClusterSpec; the profile adds the achievable fraction of each and the
// fixed overheads. Defaults come from published measurements where one exists (cited beside each
// constant) and are otherwise marked as assumptions; `switchyard calibrate` replaces them with a
// least-squares fit on the machine at hand.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/cluster.h"
#include "core/json_io.h"

namespace switchyard {

// The version of the cost models' formulas. Stored predictions carry it (with the hash of the
// profile's constants), so a cached prediction is reused only by the formulas that made it: bump
// it whenever a change to cost_models/, simulator/ or the lowering can change a prediction.
inline constexpr const char* kCostModelVersion = "0.5.8";

// Fraction of peak a GEMM reaches when its smallest dimension is `min_dim` (tile quantisation and
// wave effects make thin GEMMs slow). Interpolated linearly in log2(min_dim) between points.
struct EfficiencyPoint {
  double min_dim = 0;
  double efficiency = 0;
};

// Classes of memory-bound kernels, each with its own achieved bandwidth.
enum class MemoryKernel { kStream, kNorm, kActivation, kPermute, kLoss, kOptimizer };
// "stream", "norm", "activation", "permute", "loss", "optimizer".
const char* memory_kernel_name(MemoryKernel k);
// The class of a lowered elementwise op by its name ("norm1", "experts_act", "loss", ...).
MemoryKernel memory_kernel_of_op(std::string_view name);

struct CostProfile {
  std::string name;    // "default" or the calibration it came from
  std::string source;  // where the constants come from (a calibration run, a paper)

  // --- Compute.
  std::vector<EfficiencyPoint> gemm_efficiency;  // at bf16 (and fp32/tf32)
  double fp8_gemm_efficiency_scale = 1;  // FP8 GEMMs reach this fraction of the bf16 efficiency
  double attention_efficiency = 0;       // fused (flash) attention, fraction of peak
  double hbm_efficiency = 0;  // achievable fraction of HBM bandwidth (elementwise kernels)
  // Kernels that are memory-bound on a GPU but may run slower per byte (on a CPU core their math,
  // exp and sqrt, bounds them): their own fraction of HBM bandwidth; 0 = hbm_efficiency.
  double norm_efficiency = 0;        // RMSNorm / LayerNorm, forward and backward
  double activation_efficiency = 0;  // SwiGLU / GeLU on the FFN's hidden rows
  double permute_efficiency = 0;     // permute / unpermute-combine by expert, index slice
  double loss_efficiency = 0;        // softmax cross-entropy over the vocabulary
  double optimizer_efficiency = 0;   // Adam on the GPU
  double kernel_launch_s = 0;        // launch + tail of one kernel
  // Host time to issue one op (framework dispatch, launch call). The host runs ahead of the GPU,
  // so an op takes at least this long: tiny ops make a step host-bound.
  double host_issue_s = 0;

  // --- Communication (fractions of the ClusterSpec's nominal per-direction bandwidths).
  double intra_node_efficiency = 0;  // NVLink / NVSwitch / PCIe P2P, ring and all-to-all
  // Collectives that also add (all-reduce, reduce-scatter) inside a node, where the reduction
  // costs more than the move (MPI on CPU cores); 0 = intra_node_efficiency.
  double intra_node_reduce_efficiency = 0;
  double nvls_efficiency = 0;            // all-reduce algbw over NVLink SHARP, fraction of link bw
  double nic_ring_efficiency = 0;        // ring / tree collectives across nodes, NICs aggregated
  double nic_all_to_all_efficiency = 0;  // all-to-all across nodes (each GPU on its own rail)
  double nic_half_bw_message_bytes = 0;  // message size at which a NIC reaches half its bandwidth
  double collective_base_s = 0;          // fixed cost of launching one collective
  double p2p_issue_s = 0;                // per peer of a grouped send/recv (all-to-all)
  // Fraction of a collective's time that can run while the same rank computes. 1: the collective
  // runs on engines of its own (NCCL's kernels on SMs they hold); 0: the rank's own processor
  // moves the bytes (MPI's shared-memory transport progresses inside MPI calls on the rank's
  // core), so an overlapped collective delays the compute by its whole time.
  double comm_compute_overlap = 1;

  // --- Transfers between tiers.
  double pcie_efficiency = 0;
  double pcie_latency_s = 0;
  double dram_efficiency = 0;
  // The host's Adam over host-resident states (an offloaded update) on a rank's host threads:
  // fraction of the node's DRAM bandwidth it reaches; 0 = dram_efficiency.
  double host_optimizer_efficiency = 0;
  double ssd_efficiency = 0;
  double ssd_latency_s = 0;

  // --- Memory.
  int64_t runtime_reserved_bytes = 0;  // CUDA context, NCCL buffers, allocator slack per GPU

  // GEMM efficiency for the smallest dimension of a GEMM.
  double gemm_efficiency_at(double min_dim) const;
  // The fraction of HBM bandwidth a memory-bound kernel of this class reaches.
  double memory_efficiency(MemoryKernel k) const;
};

// The default profile for a cluster: published-measurement-based fractions (see profile.cc).
CostProfile default_cost_profile(const ClusterSpec& cluster);

// JSON form of a profile (the keys are the member names). Reading applies a profile file over a
// base profile: a calibration names only what it measured and the rest keeps the base's values.
// Unknown keys, wrong types and values out of range are ConfigErrors with their path under
// `profile`.
Json to_json(const CostProfile& p);
CostProfile apply_profile_json(const Json& j, CostProfile base);

}  // namespace switchyard
