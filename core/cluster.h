// ClusterSpec: nodes of GPUs, their compute and memory, the host side of each node (DRAM, CPUs,
// PCIe, SSD), the fabric inside a node and the NICs between nodes. Read from
// configs/clusters/*.json; keys, units and conventions are documented in configs/README.md.
// Bandwidths are per direction; "per GPU" for the intra-node fabric and PCIe, "per NIC" for NICs.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/json_io.h"

namespace switchyard {

enum class Precision { kFP32, kTF32, kBF16, kFP8 };
enum class Fabric { kNVSwitch, kNVLinkPairs, kPCIe };

template <>
struct EnumNames<Precision> {
  static constexpr std::pair<Precision, std::string_view> kValues[] = {{Precision::kFP32, "fp32"},
                                                                       {Precision::kTF32, "tf32"},
                                                                       {Precision::kBF16, "bf16"},
                                                                       {Precision::kFP8, "fp8"}};
};
template <>
struct EnumNames<Fabric> {
  static constexpr std::pair<Fabric, std::string_view> kValues[] = {
      {Fabric::kNVSwitch, "nvswitch"},
      {Fabric::kNVLinkPairs, "nvlink_pairs"},
      {Fabric::kPCIe, "pcie"}};
};

struct GpuSpec {
  std::string name;
  double peak_fp32_flops = 0;  // dense peaks, no structured sparsity
  double peak_tf32_flops = 0;
  double peak_bf16_flops = 0;
  double peak_fp8_flops = 0;
  int64_t hbm_bytes = 0;
  double hbm_bw_Bps = 0;
  // What the device's runtime holds beside the tensors (CUDA context, library workspaces, NCCL
  // buffers); -1: the cost profile's default. A CPU rank's arena reserves nothing.
  int64_t runtime_reserved_bytes = -1;
  // Peak for a precision; 0 when the GPU has no such unit.
  double peak_flops(Precision p) const;
  bool operator==(const GpuSpec&) const = default;
};

struct HostSpec {
  int64_t dram_bytes = 0;
  double dram_bw_Bps = 0;
  double cpu_flops = 0;
  double pcie_bw_Bps = 0;  // host <-> one GPU
  int64_t ssd_bytes = 0;
  double ssd_read_Bps = 0;
  double ssd_write_Bps = 0;
  bool operator==(const HostSpec&) const = default;
};

struct IntraNodeSpec {
  Fabric fabric = Fabric::kNVSwitch;
  double bw_Bps = 0;  // per GPU into the fabric
  double latency_s = 0;
  bool nvls = false;  // NVLink SHARP: the NVSwitch reduces in the fabric (3rd-gen NVSwitch, H100+)
  bool operator==(const IntraNodeSpec&) const = default;
};

struct InterNodeSpec {
  int nics_per_node = 0;
  double nic_bw_Bps = 0;  // one NIC
  double latency_s = 0;
  bool operator==(const InterNodeSpec&) const = default;
};

struct ClusterSpec : ConfigMeta {
  int num_nodes = 1;
  int gpus_per_node = 1;
  GpuSpec gpu;
  HostSpec host;
  IntraNodeSpec intra_node;
  InterNodeSpec inter_node;

  int total_gpus() const { return num_nodes * gpus_per_node; }
  bool operator==(const ClusterSpec&) const = default;
};

// Parses and checks one cluster; throws ConfigError listing every problem (paths under `cluster`).
ClusterSpec parse_cluster(const Json& j);
Json to_json(const ClusterSpec& c);
Json semantic_json(const ClusterSpec& c);
// The same cluster with another node count (the CLI's --nodes, a plan's for.nodes); throws
// ConfigError at `path` when the count is out of range or the cluster has no NICs to join nodes.
ClusterSpec with_nodes(ClusterSpec c, int nodes, const std::string& path = "--nodes");
// A cluster of `gpus` GPUs: whole nodes, or part of one node (those GPUs keep their share of the
// node's host memory, SSD and NICs). Throws ConfigError at `path` when `gpus` is neither.
ClusterSpec with_gpus(ClusterSpec c, int gpus, const std::string& path = "--gpus");

}  // namespace switchyard
