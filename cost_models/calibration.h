// Calibration: least-squares fits of a cluster's cost-model constants to measured micro-benchmarks
// (switchyard calibrate), with the residuals of every sample under the fitted profile. Each
// constant is fitted where the model is linear in it:
//  - GEMMs, per smallest-dimension class: time = launch + FLOPs / (peak * efficiency);
//  - streaming kernels: time = launch + bytes / (memory bandwidth * hbm_efficiency) for plain
//    copies, and each other class of memory-bound kernel (norm, activation, permute, loss,
//    optimizer) its own efficiency through the origin after the launch;
//  - attention: efficiency = FLOPs / (time * peak) (least squares through the origin);
//  - each collective: time = collective_base + t_model / link_efficiency, where t_model is the
//    cost model's time for the same operation with base 0 and efficiency 1;
//  - comm_compute_overlap = (compute + collective - both) / min(compute, collective), in [0, 1];
//  - the host's Adam: time = bytes / (DRAM bandwidth * host_optimizer_efficiency / ranks).
// Efficiencies are fractions of the cluster file's nominal figures and are not clipped: a value
// above 1 says the file's nominal figure is too low (local-cpu's are placeholders).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/cluster.h"
#include "core/json_io.h"
#include "core/shapes.h"
#include "cost_models/profile.h"

namespace switchyard {

struct LinearFit {
  double intercept = 0;
  double slope = 0;
};
// Ordinary least squares y = intercept + slope * x (Eigen QR); with `through_origin`, y = slope x.
LinearFit fit_line(const std::vector<double>& x, const std::vector<double>& y,
                   bool through_origin = false);

struct GemmSample {
  int64_t m = 0, n = 0, k = 0;
  double time_s = 0;
};
struct StreamSample {
  double bytes = 0;  // read + written, as the lowering counts the op the kernel stands for
  double time_s = 0;
  std::string kernel = "copy";
};
struct AttentionSample {
  AttentionShape shape;
  double forward_s = 0;
};
struct CollectiveSample {
  Collective op = Collective::kAllReduce;
  double bytes = 0;  // per rank, as nccl-tests' size
  int ranks = 1;
  double time_s = 0;
};

// A copy from host memory to the device arena, as the ring's and the prefetches' weight loads
// run it (on the backend's copy engine).
struct TransferSample {
  double bytes = 0;
  double time_s = 0;
};

// A collective issued asynchronously while the rank computes: the compute alone, the collective
// alone, and both (issue, compute, wait).
struct OverlapSample {
  double compute_s = 0;
  double comm_s = 0;
  double both_s = 0;
};

// The class of memory-bound kernel a stream sample's kernel belongs to ("copy" -> stream,
// "rmsnorm_backward" -> norm, "swiglu" -> activation, "adam" -> optimizer, ...).
MemoryKernel memory_kernel_of_sample(const std::string& kernel);

struct CalibrationData {
  std::vector<GemmSample> gemm;
  std::vector<StreamSample> stream;
  std::vector<AttentionSample> attention;
  std::vector<CollectiveSample> collectives;
  std::vector<TransferSample> host_to_device;
  // SSD-tier reads into host memory, as the backend keeps that tier (the CPU backend: files mapped
  // into memory, read through the page cache).
  std::vector<TransferSample> ssd_to_host;
  // The host's Adam over host-resident states (an offloaded update), on the threads the runner
  // gives a rank: `bytes` as the lowering counts the update (read and written).
  std::vector<TransferSample> host_adam;
  int ranks = 1;  // that measured the transfers at once (sharing the node's DRAM and SSD)
  std::optional<OverlapSample> overlap;
};

struct Calibration {
  CostProfile profile;
  // What was fitted and how well: per constant its value, per sample measured, predicted and the
  // relative residual (predicted / measured - 1), and per class the median absolute residual.
  Json report;
  // The profile as a file for --profile: only the fitted constants (apply_profile_json keeps the
  // base's values for the rest).
  Json profile_json;
};

// Fits over `base` (the cluster's default profile). Classes without samples keep base values.
Calibration fit_calibration(const CalibrationData& d, const ClusterSpec& cluster, CostProfile base);

}  // namespace switchyard
