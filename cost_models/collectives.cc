#include "cost_models/collectives.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace switchyard {

double bus_bandwidth_factor(Collective c, int ranks) {
  const double n = static_cast<double>(std::max(ranks, 1));
  switch (c) {
    case Collective::kAllReduce:
      return 2.0 * (n - 1) / n;
    case Collective::kAllGather:
    case Collective::kReduceScatter:
    case Collective::kAllToAll:
      return (n - 1) / n;
    case Collective::kBroadcast:
    case Collective::kSendRecv:
      return 1.0;
  }
  return 1.0;
}

namespace {

// Bandwidths one group sees, per direction.
struct Links {
  double intra_Bps;     // one GPU into the intra-node fabric
  double node_nic_Bps;  // this group's share of a node's NICs, ring efficiency
  double rail_Bps;      // one GPU's share of the NICs, all-to-all efficiency
  double intra_lat_s;
  double inter_lat_s;
};

Links links_for(const GroupLayout& g, const ClusterSpec& c, const CostProfile& p, Collective op) {
  Links l;
  const bool reduces = op == Collective::kAllReduce || op == Collective::kReduceScatter;
  l.intra_Bps = c.intra_node.bw_Bps * (reduces && p.intra_node_reduce_efficiency > 0
                                           ? p.intra_node_reduce_efficiency
                                           : p.intra_node_efficiency);
  const double share = static_cast<double>(g.ranks_per_node) / static_cast<double>(c.gpus_per_node);
  const double nic_share_Bps = c.inter_node.nics_per_node * c.inter_node.nic_bw_Bps * share;
  l.node_nic_Bps = nic_share_Bps * p.nic_ring_efficiency;
  l.rail_Bps = nic_share_Bps / g.ranks_per_node * p.nic_all_to_all_efficiency;
  l.intra_lat_s = c.intra_node.latency_s;
  l.inter_lat_s = c.inter_node.latency_s;
  return l;
}

// Fraction of a NIC's bandwidth reached by messages of `bytes`.
double message_efficiency(double bytes, const CostProfile& p) {
  return bytes > 0 ? bytes / (bytes + p.nic_half_bw_message_bytes) : 1.0;
}

CollectiveCost finish(Collective c, double bytes, const GroupLayout& g, double time_s,
                      std::string_view algorithm, std::string_view bottleneck) {
  CollectiveCost out;
  out.time_s = time_s;
  out.algbw_Bps = time_s > 0 ? bytes / time_s : 0;
  out.busbw_Bps = out.algbw_Bps * bus_bandwidth_factor(c, g.ranks);
  out.algorithm = algorithm;
  out.bottleneck = bottleneck;
  return out;
}

// Ring pipeline over `bus_bytes` per GPU with `steps` latency steps, `inter_steps` of them across
// nodes; the slower of the intra-node and inter-node paths decides the bandwidth term.
CollectiveCost ring(Collective c, double bytes, double bus_bytes, int steps, int inter_steps,
                    const GroupLayout& g, const Links& l, const CostProfile& p) {
  const bool multi_node = g.nodes() > 1;
  const double intra_s = g.ranks_per_node > 1 ? bus_bytes / l.intra_Bps : 0.0;
  const double inter_s = multi_node ? bus_bytes / l.node_nic_Bps : 0.0;
  const double lat_s =
      p.collective_base_s + (steps - inter_steps) * l.intra_lat_s + inter_steps * l.inter_lat_s;
  const double bw_s = std::max(intra_s, inter_s);
  std::string_view bottleneck =
      lat_s > bw_s ? "latency" : (inter_s > intra_s ? "inter_node" : "intra_node");
  return finish(c, bytes, g, lat_s + bw_s, "ring", bottleneck);
}

CollectiveCost all_to_all(double bytes, const GroupLayout& g, const Links& l,
                          const CostProfile& p) {
  const double n = static_cast<double>(g.ranks);
  const double local = static_cast<double>(g.ranks_per_node);
  const double intra_s = (local - 1) / n * bytes / l.intra_Bps;
  const double inter_s =
      g.nodes() > 1 ? (n - local) / n * bytes / (l.rail_Bps * message_efficiency(bytes / n, p))
                    : 0.0;
  const double lat_s = p.collective_base_s + (g.nodes() > 1 ? l.inter_lat_s : l.intra_lat_s) +
                       (n - 1) * p.p2p_issue_s;
  const double bw_s = std::max(intra_s, inter_s);
  std::string_view bottleneck =
      lat_s > bw_s ? "latency" : (inter_s > intra_s ? "inter_node" : "intra_node");
  return finish(Collective::kAllToAll, bytes, g, lat_s + bw_s, "direct", bottleneck);
}

}  // namespace

CollectiveCost all_reduce_cost(double bytes, const GroupLayout& g, const ClusterSpec& c,
                               const CostProfile& p, AllReduceAlgo algo) {
  if (g.ranks <= 1 || bytes <= 0)
    return finish(Collective::kAllReduce, bytes, g, 0, "none", "none");
  const Links l = links_for(g, c, p, Collective::kAllReduce);
  const int n = g.ranks, nodes = g.nodes();
  const double bus_bytes = 2.0 * (n - 1) / n * bytes;

  CollectiveCost ring_cost =
      ring(Collective::kAllReduce, bytes, bus_bytes, 2 * (n - 1), 2 * (nodes - 1), g, l, p);
  if (algo == AllReduceAlgo::kRing) return ring_cost;

  std::vector<CollectiveCost> options{ring_cost};
  if (nodes > 1 && (algo == AllReduceAlgo::kAuto || algo == AllReduceAlgo::kTree)) {
    // Double binary tree across nodes, chains inside: same bandwidth term, log-depth latency.
    const double intra_s = g.ranks_per_node > 1 ? bus_bytes / l.intra_Bps : 0.0;
    const double inter_s = bus_bytes / l.node_nic_Bps;
    const double lat_s = p.collective_base_s + 2.0 * (std::ceil(std::log2(nodes)) * l.inter_lat_s +
                                                      (g.ranks_per_node - 1) * l.intra_lat_s);
    const double bw_s = std::max(intra_s, inter_s);
    options.push_back(
        finish(Collective::kAllReduce, bytes, g, lat_s + bw_s, "tree",
               lat_s > bw_s ? "latency" : (inter_s > intra_s ? "inter_node" : "intra_node")));
  }
  if (nodes == 1 && c.intra_node.nvls && g.ranks_per_node > 2 &&
      (algo == AllReduceAlgo::kAuto || algo == AllReduceAlgo::kNVLS)) {
    // NVLink SHARP: each GPU sends its buffer into the switch once and reads the sum back once.
    const double bw_s = bytes / (c.intra_node.bw_Bps * p.nvls_efficiency);
    const double lat_s = p.collective_base_s + 2.0 * l.intra_lat_s;
    options.push_back(finish(Collective::kAllReduce, bytes, g, lat_s + bw_s, "nvls",
                             lat_s > bw_s ? "latency" : "intra_node"));
  }
  if (algo != AllReduceAlgo::kAuto) return options.back();
  return *std::min_element(
      options.begin(), options.end(),
      [](const CollectiveCost& a, const CollectiveCost& b) { return a.time_s < b.time_s; });
}

CollectiveCost collective_cost(Collective c, double bytes, const GroupLayout& g,
                               const ClusterSpec& cluster, const CostProfile& p) {
  if (c == Collective::kAllReduce) return all_reduce_cost(bytes, g, cluster, p);
  if (c == Collective::kSendRecv) return send_recv_cost(bytes, g.nodes() == 1, cluster, p);
  if (g.ranks <= 1 || bytes <= 0) return finish(c, bytes, g, 0, "none", "none");
  const Links l = links_for(g, cluster, p, c);
  const int n = g.ranks, nodes = g.nodes();
  switch (c) {
    case Collective::kAllGather:
    case Collective::kReduceScatter:
      return ring(c, bytes, (n - 1.0) / n * bytes, n - 1, nodes - 1, g, l, p);
    case Collective::kBroadcast:
      return ring(c, bytes, bytes, n - 1, nodes - 1, g, l, p);
    case Collective::kAllToAll:
      return all_to_all(bytes, g, l, p);
    default:
      break;
  }
  return {};
}

CollectiveCost hierarchical_all_to_all_cost(double bytes, const GroupLayout& g,
                                            const ClusterSpec& cluster, const CostProfile& p) {
  if (g.ranks <= 1 || bytes <= 0) return finish(Collective::kAllToAll, bytes, g, 0, "none", "none");
  const Links l = links_for(g, cluster, p, Collective::kAllToAll);
  if (g.nodes() == 1) return all_to_all(bytes, g, l, p);
  const double local = static_cast<double>(g.ranks_per_node);
  const double nodes = static_cast<double>(g.nodes());
  // Phase 1: all-to-all inside the node over the whole buffer.
  const double intra_s = (local - 1) / local * bytes / l.intra_Bps + (local - 1) * p.p2p_issue_s;
  // Phase 2: all-to-all among the nodes, each GPU on its rail, messages of S/N.
  const double inter_s =
      (nodes - 1) / nodes * bytes / (l.rail_Bps * message_efficiency(bytes / nodes, p)) +
      (nodes - 1) * p.p2p_issue_s;
  // Layout transforms before and after: read and write the buffer each time.
  const double transform_s =
      2.0 * (2.0 * bytes / (cluster.gpu.hbm_bw_Bps * p.hbm_efficiency) + p.kernel_launch_s);
  const double lat_s = 2.0 * p.collective_base_s + l.intra_lat_s + l.inter_lat_s;
  const double bw_s = intra_s + inter_s + transform_s;
  return finish(Collective::kAllToAll, bytes, g, lat_s + bw_s, "hierarchical",
                lat_s > bw_s ? "latency" : (inter_s > intra_s ? "inter_node" : "intra_node"));
}

CollectiveCost send_recv_cost(double bytes, bool same_node, const ClusterSpec& c,
                              const CostProfile& p) {
  GroupLayout g{2, same_node ? 2 : 1};
  if (bytes <= 0) return finish(Collective::kSendRecv, bytes, g, 0, "none", "none");
  double bw_s, lat_s;
  if (same_node) {
    bw_s = bytes / (c.intra_node.bw_Bps * p.intra_node_efficiency);
    lat_s = c.intra_node.latency_s;
  } else {
    // One GPU pair goes through one NIC.
    bw_s = bytes / (c.inter_node.nic_bw_Bps * p.nic_ring_efficiency * message_efficiency(bytes, p));
    lat_s = c.inter_node.latency_s;
  }
  return finish(Collective::kSendRecv, bytes, g, lat_s + bw_s, "direct",
                lat_s > bw_s ? "latency" : (same_node ? "intra_node" : "inter_node"));
}

}  // namespace switchyard
