// Transfers between storage tiers: GPU <-> host over PCIe, host <-> SSD, GPU <-> GPU peer copies
// over NVLink, host memcpy. time = latency + bytes / (nominal bandwidth * achievable fraction /
// sharers), where `sharers` is how many GPUs of the node move data over the same resource at
// once (the node's SSDs and DRAM are shared; each GPU has its own PCIe link in the clusters we
// bundle).
#pragma once

#include "core/cluster.h"
#include "cost_models/profile.h"

namespace switchyard {

enum class TransferPath { kHostToGpu, kGpuToHost, kSsdToHost, kHostToSsd, kGpuToGpu, kHostToHost };

struct TransferCost {
  double time_s = 0;
  double bw_Bps = 0;  // achieved by one sharer
};

TransferCost transfer_cost(TransferPath path, double bytes, const ClusterSpec& cluster,
                           const CostProfile& prof, int sharers = 1);

// The host's optimizer step over host-resident states (ZeRO-Offload's CPU Adam) on one of
// `sharers` ranks updating at once: `bytes` of states read and written, `flops` of arithmetic,
// `ssd_bytes` of states streamed in from SSD and back, `ssd_write_bytes` more written (updated
// parameters that live there), overlapped with the update (ZeRO-Infinity): the slowest of DRAM,
// the cores and the SSD. PCIe transfers are not included.
double host_optimizer_seconds(double bytes, double flops, double ssd_bytes, double ssd_write_bytes,
                              const ClusterSpec& cluster, const CostProfile& prof, int sharers);

}  // namespace switchyard
