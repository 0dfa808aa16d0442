// Collective cost model on a two-level topology (GPUs in a node joined by NVSwitch / NVLink / PCIe;
// nodes joined by NICs). Alpha-beta per algorithm, with sizes and bus bandwidth as nccl-tests
// defines them (doc/PERFORMANCE.md):
//   size S = all_reduce: the buffer; all_gather: the gathered output; reduce_scatter: the input;
//            all_to_all: one rank's whole send buffer; broadcast, send/recv: the buffer.
//   algbw = S / time;  busbw = algbw * factor, factor = 2(n-1)/n (all_reduce), (n-1)/n (all_gather,
//   reduce_scatter, all_to_all), 1 (broadcast, send/recv).
// The group's placement decides the bottleneck. Every group of a plan runs its collective at the
// same time as its sibling groups, so a group with g GPUs per node gets g/gpus_per_node of the
// node's NICs. Ring and tree collectives spread one group's traffic over all those NICs
// (channels); an all-to-all sends each GPU's traffic through its own rail and cannot aggregate
// NICs for one GPU pair.
#pragma once

#include <string_view>

#include "core/cluster.h"
#include "core/shapes.h"
#include "cost_models/profile.h"

namespace switchyard {

enum class AllReduceAlgo { kAuto, kRing, kTree, kNVLS };

double bus_bandwidth_factor(Collective c, int ranks);

struct CollectiveCost {
  double time_s = 0;
  double algbw_Bps = 0;
  double busbw_Bps = 0;
  std::string_view algorithm;   // "ring", "tree", "nvls", "direct", "hierarchical", "none"
  std::string_view bottleneck;  // "intra_node", "inter_node", "latency", "none"
};

CollectiveCost collective_cost(Collective c, double bytes, const GroupLayout& group,
                               const ClusterSpec& cluster, const CostProfile& prof);
CollectiveCost all_reduce_cost(double bytes, const GroupLayout& group, const ClusterSpec& cluster,
                               const CostProfile& prof, AllReduceAlgo algo = AllReduceAlgo::kAuto);
// SE-MoE's fusion communication / Tutel's 2DH all-to-all: an all-to-all inside each node that
// gathers the rows bound for the same remote local rank, then an all-to-all among the nodes on each
// rail with N-1 messages of S/N instead of n-1 of S/n, with a layout transform before and after.
CollectiveCost hierarchical_all_to_all_cost(double bytes, const GroupLayout& group,
                                            const ClusterSpec& cluster, const CostProfile& prof);
// Point-to-point (pipeline send/recv) between two GPUs.
CollectiveCost send_recv_cost(double bytes, bool same_node, const ClusterSpec& cluster,
                              const CostProfile& prof);

}  // namespace switchyard
