#include "cost_models/transfers.h"

#include <algorithm>
#include <limits>

namespace switchyard {

TransferCost transfer_cost(TransferPath path, double bytes, const ClusterSpec& c,
                           const CostProfile& p, int sharers) {
  TransferCost t;
  if (bytes <= 0) return t;
  const double share = 1.0 / std::max(sharers, 1);
  double bw = 0, lat = 0;
  switch (path) {
    case TransferPath::kHostToGpu:
    case TransferPath::kGpuToHost:
      // Each GPU has its own PCIe link, but all of them draw on the node's DRAM.
      bw = std::min(c.host.pcie_bw_Bps * p.pcie_efficiency,
                    c.host.dram_bw_Bps * p.dram_efficiency * share);
      lat = p.pcie_latency_s;
      break;
    case TransferPath::kSsdToHost:
      bw = c.host.ssd_read_Bps * p.ssd_efficiency * share;
      lat = p.ssd_latency_s;
      break;
    case TransferPath::kHostToSsd:
      bw = c.host.ssd_write_Bps * p.ssd_efficiency * share;
      lat = p.ssd_latency_s;
      break;
    case TransferPath::kGpuToGpu:
      bw = c.intra_node.bw_Bps * p.intra_node_efficiency;
      lat = c.intra_node.latency_s;
      break;
    case TransferPath::kHostToHost:
      // A copy reads and writes DRAM.
      bw = c.host.dram_bw_Bps * p.dram_efficiency * share / 2.0;
      lat = 0;
      break;
  }
  // A tier the cluster lacks (no SSD) takes forever; validate() rejects plans that use one.
  if (bw <= 0) return {std::numeric_limits<double>::infinity(), 0};
  t.bw_Bps = bw;
  t.time_s = lat + bytes / bw;
  return t;
}

double host_optimizer_seconds(double bytes, double flops, double ssd_bytes, double ssd_write_bytes,
                              const ClusterSpec& c, const CostProfile& p, int sharers) {
  const double s = std::max(1, sharers);
  const double eff =
      p.host_optimizer_efficiency > 0 ? p.host_optimizer_efficiency : p.dram_efficiency;
  const double dram_s = bytes > 0 ? bytes / (c.host.dram_bw_Bps * eff / s) : 0.0;
  const double cpu_s = flops > 0 ? flops / (c.host.cpu_flops / s) : 0.0;
  const double read = ssd_bytes, written = ssd_bytes + ssd_write_bytes;
  const double ssd_s =
      (read > 0 ? transfer_cost(TransferPath::kSsdToHost, read, c, p, sharers).time_s : 0.0) +
      (written > 0 ? transfer_cost(TransferPath::kHostToSsd, written, c, p, sharers).time_s : 0.0);
  return std::max({dram_s, cpu_s, ssd_s});
}

}  // namespace switchyard
