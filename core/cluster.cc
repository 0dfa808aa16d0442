#include "core/cluster.h"

#include <cmath>

namespace switchyard {

double GpuSpec::peak_flops(Precision p) const {
  switch (p) {
    case Precision::kFP32:
      return peak_fp32_flops;
    case Precision::kTF32:
      return peak_tf32_flops;
    case Precision::kBF16:
      return peak_bf16_flops;
    case Precision::kFP8:
      return peak_fp8_flops;
  }
  return 0;
}

namespace {

// Bounds far above real clusters that keep nodes * gpus_per_node inside int.
constexpr int kMaxNodes = 1 << 20;
constexpr int kMaxGpusPerNode = 1024;

// Reads a number that must be > 0 (or >= 0 when `allow_zero`).
void positive(JsonReader& r, std::string_view key, double* out, bool allow_zero = false) {
  if (!r.required(key, out)) return;
  if (allow_zero ? *out < 0 : !(*out > 0))
    r.add_issue(r.path_of(key), std::string("must be ") + (allow_zero ? ">= 0" : "> 0") + ", got " +
                                    Json(*out).dump());
}

}  // namespace

ClusterSpec parse_cluster(const Json& j) {
  std::vector<ConfigIssue> issues;
  ClusterSpec c;
  JsonReader r(j, "cluster", issues);
  if (!r.is_object()) throw ConfigError(std::move(issues));
  read_meta(r, c, /*name_required=*/true);
  r.required("num_nodes", &c.num_nodes, 1, kMaxNodes);
  r.required("gpus_per_node", &c.gpus_per_node, 1, kMaxGpusPerNode);

  if (const Json* g = r.child("gpu", true)) {
    JsonReader gr(*g, r.path_of("gpu"), issues);
    gr.required("name", &c.gpu.name);
    if (const Json* pf = gr.child("peak_flops", true)) {
      JsonReader pr(*pf, gr.path_of("peak_flops"), issues);
      positive(pr, "fp32", &c.gpu.peak_fp32_flops);
      positive(pr, "tf32", &c.gpu.peak_tf32_flops, true);
      positive(pr, "bf16", &c.gpu.peak_bf16_flops, true);
      positive(pr, "fp8", &c.gpu.peak_fp8_flops, true);
      pr.finish();
    }
    gr.required("hbm_bytes", &c.gpu.hbm_bytes, 1);
    positive(gr, "hbm_bw_Bps", &c.gpu.hbm_bw_Bps);
    gr.optional("runtime_reserved_bytes", &c.gpu.runtime_reserved_bytes, 0);
    gr.finish();
  }
  if (const Json* h = r.child("host", true)) {
    JsonReader hr(*h, r.path_of("host"), issues);
    hr.required("dram_bytes", &c.host.dram_bytes, 1);
    positive(hr, "dram_bw_Bps", &c.host.dram_bw_Bps);
    positive(hr, "cpu_flops", &c.host.cpu_flops);
    positive(hr, "pcie_bw_Bps", &c.host.pcie_bw_Bps);
    hr.required("ssd_bytes", &c.host.ssd_bytes, 0);
    positive(hr, "ssd_read_Bps", &c.host.ssd_read_Bps, true);
    positive(hr, "ssd_write_Bps", &c.host.ssd_write_Bps, true);
    if (c.host.ssd_bytes > 0 && (c.host.ssd_read_Bps <= 0 || c.host.ssd_write_Bps <= 0))
      hr.add_issue(hr.path_of("ssd_bytes"), "an SSD needs ssd_read_Bps and ssd_write_Bps > 0");
    hr.finish();
  }
  if (const Json* n = r.child("intra_node", true)) {
    JsonReader nr(*n, r.path_of("intra_node"), issues);
    nr.required_enum("fabric", &c.intra_node.fabric);
    positive(nr, "bw_Bps", &c.intra_node.bw_Bps);
    positive(nr, "latency_s", &c.intra_node.latency_s, true);
    nr.optional("nvls", &c.intra_node.nvls);
    if (c.intra_node.nvls && c.intra_node.fabric != Fabric::kNVSwitch)
      nr.add_issue(nr.path_of("nvls"), "NVLink SHARP needs fabric \"nvswitch\"");
    nr.finish();
  }
  if (const Json* n = r.child("inter_node", true)) {
    JsonReader nr(*n, r.path_of("inter_node"), issues);
    nr.required("nics_per_node", &c.inter_node.nics_per_node, 0, kMaxGpusPerNode);
    positive(nr, "nic_bw_Bps", &c.inter_node.nic_bw_Bps, true);
    positive(nr, "latency_s", &c.inter_node.latency_s, true);
    nr.finish();
  }
  r.finish();
  if (c.num_nodes > 1 && (c.inter_node.nics_per_node < 1 || c.inter_node.nic_bw_Bps <= 0))
    r.add_issue(r.path_of("inter_node"), "a cluster of " + std::to_string(c.num_nodes) +
                                             " nodes needs nics_per_node >= 1 and nic_bw_Bps > 0");
  throw_if_any(std::move(issues));
  return c;
}

Json semantic_json(const ClusterSpec& c) {
  Json j;
  j["num_nodes"] = c.num_nodes;
  j["gpus_per_node"] = c.gpus_per_node;
  j["gpu"] = {{"name", c.gpu.name},
              {"peak_flops",
               {{"fp32", c.gpu.peak_fp32_flops},
                {"tf32", c.gpu.peak_tf32_flops},
                {"bf16", c.gpu.peak_bf16_flops},
                {"fp8", c.gpu.peak_fp8_flops}}},
              {"hbm_bytes", c.gpu.hbm_bytes},
              {"hbm_bw_Bps", c.gpu.hbm_bw_Bps}};
  // Written only when set, so the content hashes of clusters without it stay what they were.
  if (c.gpu.runtime_reserved_bytes >= 0)
    j["gpu"]["runtime_reserved_bytes"] = c.gpu.runtime_reserved_bytes;
  j["host"] = {{"dram_bytes", c.host.dram_bytes},      {"dram_bw_Bps", c.host.dram_bw_Bps},
               {"cpu_flops", c.host.cpu_flops},        {"pcie_bw_Bps", c.host.pcie_bw_Bps},
               {"ssd_bytes", c.host.ssd_bytes},        {"ssd_read_Bps", c.host.ssd_read_Bps},
               {"ssd_write_Bps", c.host.ssd_write_Bps}};
  j["intra_node"] = {{"fabric", enum_name(c.intra_node.fabric)},
                     {"bw_Bps", c.intra_node.bw_Bps},
                     {"latency_s", c.intra_node.latency_s},
                     {"nvls", c.intra_node.nvls}};
  j["inter_node"] = {{"nics_per_node", c.inter_node.nics_per_node},
                     {"nic_bw_Bps", c.inter_node.nic_bw_Bps},
                     {"latency_s", c.inter_node.latency_s}};
  return j;
}

Json to_json(const ClusterSpec& c) {
  Json j = semantic_json(c);
  write_meta(c, j);
  return j;
}

ClusterSpec with_nodes(ClusterSpec c, int nodes, const std::string& path) {
  if (nodes < 1 || nodes > kMaxNodes)
    throw ConfigError(
        path, "must be in [1, " + std::to_string(kMaxNodes) + "], got " + std::to_string(nodes));
  if (nodes > 1 && (c.inter_node.nics_per_node < 1 || c.inter_node.nic_bw_Bps <= 0))
    throw ConfigError(
        path, "cluster \"" + c.name + "\" has no NICs to join " + std::to_string(nodes) + " nodes");
  c.num_nodes = nodes;
  return c;
}

ClusterSpec with_gpus(ClusterSpec c, int gpus, const std::string& path) {
  if (gpus < 1) throw ConfigError(path, "must be >= 1, got " + std::to_string(gpus));
  if (gpus % c.gpus_per_node == 0) return with_nodes(std::move(c), gpus / c.gpus_per_node, path);
  if (gpus > c.gpus_per_node)
    throw ConfigError(path, std::to_string(gpus) + " GPUs is neither part of one node nor whole " +
                                "nodes of cluster \"" + c.name + "\" (" +
                                std::to_string(c.gpus_per_node) + " GPUs per node)");
  // Part of one node: those GPUs keep their share of the node's host memory, SSD and NICs.
  const double share = static_cast<double>(gpus) / c.gpus_per_node;
  c.host.dram_bytes = static_cast<int64_t>(static_cast<double>(c.host.dram_bytes) * share);
  c.host.ssd_bytes = static_cast<int64_t>(static_cast<double>(c.host.ssd_bytes) * share);
  c.inter_node.nics_per_node =
      static_cast<int>(std::ceil(static_cast<double>(c.inter_node.nics_per_node) * share));
  c.gpus_per_node = gpus;
  c.num_nodes = 1;
  return c;
}

}  // namespace switchyard
