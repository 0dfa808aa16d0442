#include "cost_models/transfers.h"

#include <gtest/gtest.h>

#include <cmath>

namespace switchyard {
namespace {

ClusterSpec hand_cluster() {
  ClusterSpec c;
  c.gpus_per_node = 8;
  c.host = {int64_t{1} << 40, 400e9, 1e12, 32e9, int64_t{1} << 44, 20e9, 10e9};
  c.intra_node = {Fabric::kNVSwitch, 300e9, 2e-6, false};
  return c;
}

CostProfile hand_profile() {
  CostProfile p;
  p.pcie_efficiency = 0.8;
  p.pcie_latency_s = 10e-6;
  p.dram_efficiency = 0.5;
  p.ssd_efficiency = 0.9;
  p.ssd_latency_s = 100e-6;
  p.intra_node_efficiency = 0.8;
  return p;
}

TEST(Transfers, PcieAloneAndShared) {
  const double gb = 1e9;
  // One GPU: its PCIe link (25.6 GB/s) is slower than DRAM (200 GB/s).
  EXPECT_NEAR(transfer_cost(TransferPath::kHostToGpu, gb, hand_cluster(), hand_profile()).time_s,
              10e-6 + gb / 25.6e9, 1e-12);
  // Eight GPUs at once share 200 GB/s of DRAM: still PCIe bound (25 < 25.6 is DRAM bound).
  EXPECT_NEAR(transfer_cost(TransferPath::kGpuToHost, gb, hand_cluster(), hand_profile(), 8).time_s,
              10e-6 + gb / 25e9, 1e-12);
}

TEST(Transfers, SsdIsSharedByTheNode) {
  const double gb = 1e9;
  EXPECT_NEAR(transfer_cost(TransferPath::kSsdToHost, gb, hand_cluster(), hand_profile(), 4).time_s,
              100e-6 + gb / (20e9 * 0.9 / 4), 1e-12);
  EXPECT_NEAR(transfer_cost(TransferPath::kHostToSsd, gb, hand_cluster(), hand_profile()).time_s,
              100e-6 + gb / 9e9, 1e-12);
}

TEST(Transfers, PeerAndHostCopies) {
  const double gb = 1e9;
  EXPECT_NEAR(transfer_cost(TransferPath::kGpuToGpu, gb, hand_cluster(), hand_profile()).time_s,
              2e-6 + gb / 240e9, 1e-12);
  EXPECT_NEAR(transfer_cost(TransferPath::kHostToHost, gb, hand_cluster(), hand_profile()).time_s,
              gb / 100e9, 1e-12);
}

// The host's Adam: DRAM-bound at the profile's host optimizer efficiency (else the DRAM one),
// shared by the node's updating ranks; bound by the cores or the SSD where those are slower.
TEST(Transfers, HostOptimizerIsTheSlowestOfDramCoresAndSsd) {
  const ClusterSpec c = hand_cluster();
  CostProfile p = hand_profile();
  const double gb = 1e9;
  EXPECT_NEAR(host_optimizer_seconds(gb, 0, 0, 0, c, p, 8), gb / (400e9 * 0.5 / 8), 1e-12);
  p.host_optimizer_efficiency = 0.1;
  EXPECT_NEAR(host_optimizer_seconds(gb, 0, 0, 0, c, p, 8), gb / (400e9 * 0.1 / 8), 1e-12);
  EXPECT_NEAR(host_optimizer_seconds(gb, 1e12, 0, 0, c, p, 8), 1e12 / (1e12 / 8), 1e-12);
  // States on SSD: read and written back, 0.5 GB each way by each of 4 ranks.
  EXPECT_NEAR(host_optimizer_seconds(1e6, 0, 0.5 * gb, 0, c, p, 4),
              100e-6 + 0.5 * gb / (20e9 * 0.9 / 4) + 100e-6 + 0.5 * gb / (10e9 * 0.9 / 4), 1e-12);
  // Parameters on SSD: the updated ones are written back too (not read: the forward read them).
  EXPECT_NEAR(host_optimizer_seconds(1e6, 0, 0.5 * gb, 0.25 * gb, c, p, 4),
              100e-6 + 0.5 * gb / (20e9 * 0.9 / 4) + 100e-6 + 0.75 * gb / (10e9 * 0.9 / 4), 1e-12);
}

TEST(Transfers, MissingTierNeverWins) {
  ClusterSpec c = hand_cluster();
  c.host.ssd_read_Bps = 0;
  EXPECT_TRUE(std::isinf(transfer_cost(TransferPath::kSsdToHost, 1e9, c, hand_profile()).time_s));
  EXPECT_EQ(transfer_cost(TransferPath::kSsdToHost, 0, c, hand_profile()).time_s, 0.0);
}

}  // namespace
}  // namespace switchyard
