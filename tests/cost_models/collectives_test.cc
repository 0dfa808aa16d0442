#include "cost_models/collectives.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

constexpr double kGiB = 1024.0 * 1024 * 1024;

// A DGX-A100-like node with round numbers and a profile with fixed constants, so every expected
// value below is computed by hand from the formulas in collectives.h.
ClusterSpec hand_cluster(int nodes) {
  ClusterSpec c;
  c.name = "hand";
  c.num_nodes = nodes;
  c.gpus_per_node = 8;
  c.gpu.hbm_bw_Bps = 2e12;
  c.intra_node = {Fabric::kNVSwitch, 300e9, 2e-6, false};
  c.inter_node = {8, 25e9, 5e-6};
  return c;
}

CostProfile hand_profile() {
  CostProfile p;
  p.intra_node_efficiency = 0.8;
  p.nvls_efficiency = 0.6;
  p.nic_ring_efficiency = 0.9;
  p.nic_all_to_all_efficiency = 0.8;
  p.nic_half_bw_message_bytes = 65536;
  p.collective_base_s = 8e-6;
  p.p2p_issue_s = 0.5e-6;
  p.hbm_efficiency = 0.5;
  p.kernel_launch_s = 4e-6;
  return p;
}

TEST(GroupLayout, FromStride) {
  GroupLayout tp = group_layout(8, 1, 8);
  EXPECT_EQ(tp.ranks_per_node, 8);
  EXPECT_EQ(tp.nodes(), 1);
  GroupLayout dp = group_layout(16, 8, 8);  // one rank per node
  EXPECT_EQ(dp.ranks_per_node, 1);
  EXPECT_EQ(dp.nodes(), 16);
  GroupLayout ep = group_layout(8, 2, 8);  // every second GPU: 4 per node, 2 nodes
  EXPECT_EQ(ep.ranks_per_node, 4);
  EXPECT_EQ(ep.nodes(), 2);
}

TEST(BusBandwidth, NcclTestsFactors) {
  EXPECT_DOUBLE_EQ(bus_bandwidth_factor(Collective::kAllReduce, 8), 1.75);
  EXPECT_DOUBLE_EQ(bus_bandwidth_factor(Collective::kAllGather, 8), 0.875);
  EXPECT_DOUBLE_EQ(bus_bandwidth_factor(Collective::kReduceScatter, 4), 0.75);
  EXPECT_DOUBLE_EQ(bus_bandwidth_factor(Collective::kAllToAll, 16), 15.0 / 16);
  EXPECT_DOUBLE_EQ(bus_bandwidth_factor(Collective::kBroadcast, 8), 1.0);
}

// One node, 8 ranks, 1 GiB: ring. bus bytes 1.75 GiB over 0.8*300 GB/s; latency
// 8 us + 14 steps * 2 us.
TEST(AllReduce, RingInsideOneNodeByHand) {
  const auto c = all_reduce_cost(kGiB, {8, 8}, hand_cluster(1), hand_profile());
  const double expected = 8e-6 + 14 * 2e-6 + 1.75 * kGiB / 240e9;
  EXPECT_NEAR(c.time_s, expected, 1e-12);
  EXPECT_EQ(c.algorithm, "ring");
  EXPECT_EQ(c.bottleneck, "intra_node");
  EXPECT_NEAR(c.busbw_Bps, 1.75 * kGiB / expected, 1.0);
}

// Two nodes of 8: the 8 NICs (200 GB/s, 0.9 efficiency) are the bottleneck; the tree's log-depth
// latency (8 + 2*(1*5 + 7*2) us) beats the ring's (8 + 28*2 + 2*5 us).
TEST(AllReduce, AcrossNodesNicsBoundAndTreeWinsLatency) {
  const auto c = all_reduce_cost(kGiB, {16, 8}, hand_cluster(2), hand_profile());
  const double bw_s = 2.0 * 15 / 16 * kGiB / 180e9;
  EXPECT_NEAR(c.time_s, 46e-6 + bw_s, 1e-12);
  EXPECT_EQ(c.algorithm, "tree");
  EXPECT_EQ(c.bottleneck, "inter_node");
  const auto ring =
      all_reduce_cost(kGiB, {16, 8}, hand_cluster(2), hand_profile(), AllReduceAlgo::kRing);
  EXPECT_NEAR(ring.time_s, 74e-6 + bw_s, 1e-12);
}

// A DP group with one GPU per node shares the node's NICs with its 7 sibling groups: 25 GB/s.
TEST(AllReduce, OneRankPerNodeGetsOneRail) {
  const auto c =
      all_reduce_cost(kGiB, {4, 1}, hand_cluster(4), hand_profile(), AllReduceAlgo::kRing);
  EXPECT_NEAR(c.time_s, 8e-6 + 6 * 5e-6 + 1.5 * kGiB / (25e9 * 0.9), 1e-12);
}

TEST(AllReduce, NvlsUsesTheSwitch) {
  ClusterSpec h = hand_cluster(1);
  h.intra_node.bw_Bps = 450e9;
  h.intra_node.nvls = true;
  const auto c = all_reduce_cost(8 * kGiB, {8, 8}, h, hand_profile());
  EXPECT_EQ(c.algorithm, "nvls");
  EXPECT_NEAR(c.time_s, 8e-6 + 4e-6 + 8 * kGiB / (450e9 * 0.6), 1e-12);
  h.intra_node.nvls = false;
  EXPECT_EQ(all_reduce_cost(8 * kGiB, {8, 8}, h, hand_profile()).algorithm, "ring");
}

TEST(AllGather, RingByHand) {
  const auto c =
      collective_cost(Collective::kAllGather, kGiB, {16, 8}, hand_cluster(2), hand_profile());
  EXPECT_NEAR(c.time_s, 8e-6 + 14 * 2e-6 + 1 * 5e-6 + 15.0 / 16 * kGiB / 180e9, 1e-12);
  const auto rs =
      collective_cost(Collective::kReduceScatter, kGiB, {16, 8}, hand_cluster(2), hand_profile());
  EXPECT_DOUBLE_EQ(rs.time_s, c.time_s);
}

// All-to-all over 2 nodes of 8: half of each rank's 1 GiB leaves the node through its own rail
// (25 GB/s * 0.8) in messages of 64 MiB; 7/16 crosses NVLink.
TEST(AllToAll, RailBoundByHand) {
  const auto c =
      collective_cost(Collective::kAllToAll, kGiB, {16, 8}, hand_cluster(2), hand_profile());
  const double msg = kGiB / 16;
  const double inter_s = 0.5 * kGiB / (20e9 * msg / (msg + 65536));
  EXPECT_NEAR(c.time_s, 8e-6 + 5e-6 + 15 * 0.5e-6 + inter_s, 1e-12);
  EXPECT_EQ(c.bottleneck, "inter_node");
}

// Many nodes and small messages: the flat all-to-all pays n-1 peers and tiny messages; the
// hierarchical one pays an intra-node step and transforms but sends N-1 larger messages.
TEST(AllToAll, HierarchicalWinsOnSmallMessagesAtScale) {
  const ClusterSpec c = hand_cluster(64);
  const GroupLayout g{512, 8};
  const double small = 4.0 * 1024 * 1024;
  const auto flat_small = collective_cost(Collective::kAllToAll, small, g, c, hand_profile());
  const auto hier_small = hierarchical_all_to_all_cost(small, g, c, hand_profile());
  EXPECT_LT(hier_small.time_s, flat_small.time_s);
  // With large messages the extra intra-node pass and transforms cost more than they save.
  const auto flat_big =
      collective_cost(Collective::kAllToAll, 4 * kGiB, {16, 8}, hand_cluster(2), hand_profile());
  const auto hier_big =
      hierarchical_all_to_all_cost(4 * kGiB, {16, 8}, hand_cluster(2), hand_profile());
  EXPECT_GT(hier_big.time_s, flat_big.time_s);
}

TEST(SendRecv, IntraAndInterNode) {
  const double mb = 1 << 20;
  EXPECT_NEAR(send_recv_cost(mb, true, hand_cluster(1), hand_profile()).time_s, 2e-6 + mb / 240e9,
              1e-15);
  EXPECT_NEAR(send_recv_cost(mb, false, hand_cluster(2), hand_profile()).time_s,
              5e-6 + mb / (25e9 * 0.9 * mb / (mb + 65536)), 1e-15);
}

TEST(Collectives, SingleRankOrEmptyCostsNothing) {
  EXPECT_EQ(all_reduce_cost(kGiB, {1, 1}, hand_cluster(1), hand_profile()).time_s, 0.0);
  EXPECT_EQ(
      collective_cost(Collective::kAllToAll, 0, {8, 8}, hand_cluster(1), hand_profile()).time_s,
      0.0);
}

// --- Against published nccl-tests measurements (tests/data/published_collectives.json).

struct Published {
  Json measurement;
  std::string cluster_key;
};

ClusterSpec cluster_for(const Json& spec, int nodes) {
  ClusterSpec c = testing::bundled().load_cluster(spec.at("base").get<std::string>());
  if (spec.contains("nics_per_node"))
    c.inter_node.nics_per_node = spec.at("nics_per_node").get<int>();
  if (spec.contains("nic_bw_Bps")) c.inter_node.nic_bw_Bps = spec.at("nic_bw_Bps").get<double>();
  return with_nodes(c, nodes);
}

Collective collective_from(const std::string& name) {
  if (name == "all_reduce") return Collective::kAllReduce;
  if (name == "all_gather") return Collective::kAllGather;
  if (name == "reduce_scatter") return Collective::kReduceScatter;
  if (name == "all_to_all") return Collective::kAllToAll;
  throw std::runtime_error("unknown collective " + name);
}

// Predicted bus bandwidth (GB/s) for one measurement.
double predicted_busbw(const Json& m, const Json& cluster_spec) {
  const int nodes = m.at("nodes").get<int>();
  const int per_node = m.at("gpus_per_node").get<int>();
  ClusterSpec c = cluster_for(cluster_spec, nodes);
  const CostProfile prof = default_cost_profile(c);
  const GroupLayout g{nodes * per_node, per_node};
  return collective_cost(collective_from(m.at("collective")), m.at("bytes").get<double>(), g, c,
                         prof)
             .busbw_Bps /
         1e9;
}

class PublishedCollectives : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = SWITCHYARD_TEST_DATA_DIR;
    data_ = load_json_file(dir + "/published_collectives.json");
    cases_ = load_json_file(dir + "/collective_model_cases.json");
    for (const auto& m : data_.at("measurements")) by_id_[m.at("id").get<std::string>()] = m;
  }
  const Json& measurement(const std::string& id) {
    auto it = by_id_.find(id);
    if (it == by_id_.end()) throw std::runtime_error("no measurement " + id);
    return it->second;
  }
  Json data_, cases_;
  std::map<std::string, Json> by_id_;
};

TEST_F(PublishedCollectives, ModelWithinStatedTolerance) {
  int checked = 0;
  for (const auto& c : cases_.at("cases")) {
    const double tol = c.at("tolerance").get<double>();
    const Json& spec = cases_.at("clusters").at(c.at("cluster").get<std::string>());
    for (const auto& id : c.at("ids")) {
      const Json& m = measurement(id);
      const double measured = m.at("busbw_GBps").get<double>();
      const double predicted = predicted_busbw(m, spec);
      EXPECT_LE(std::fabs(predicted / measured - 1.0), tol)
          << id << ": predicted " << predicted << " GB/s, measured " << measured << " GB/s ("
          << m.at("source") << ")";
      ++checked;
    }
  }
  EXPECT_GE(checked, 25);
}

TEST_F(PublishedCollectives, KnownGapsStayKnown) {
  for (const auto& c : cases_.at("known_gaps")) {
    const double max_over = c.at("max_overestimate").get<double>();
    const Json& spec = cases_.at("clusters").at(c.at("cluster").get<std::string>());
    for (const auto& id : c.at("ids")) {
      const Json& m = measurement(id);
      const double ratio = predicted_busbw(m, spec) / m.at("busbw_GBps").get<double>();
      EXPECT_GT(ratio, 1.0) << id << ": the model is expected to be optimistic here";
      EXPECT_LE(ratio - 1.0, max_over) << id;
    }
  }
}

// Every measurement is either held to a tolerance, a known gap, or excluded with a reason.
TEST_F(PublishedCollectives, EveryMeasurementIsAccountedFor) {
  std::set<std::string> seen;
  for (const char* section : {"cases", "known_gaps", "excluded"})
    for (const auto& c : cases_.at(section))
      for (const auto& id : c.at("ids")) {
        EXPECT_TRUE(by_id_.count(id)) << id;
        seen.insert(id);
      }
  for (const auto& [id, m] : by_id_)
    EXPECT_TRUE(seen.count(id)) << id << " is neither tested nor excluded";
}

}  // namespace
}  // namespace switchyard
