// The plan space the tuner searches, and the evaluation of one piece of it.
//
// The space is a product of choices. The outer ones (GPU count, tp, cp, pp, ep, expert_tp,
// dispatch) form a *unit*; the inner ones (schedule and vp, micro-batch size, ZeRO stage,
// recompute, capacity factor, storage preset, expert replicas) are the candidates of a unit. A
// candidate is named by (unit, index) and decodes to the same Plan on every machine and run, so
// the store can keep a unit's results and a killed search can skip the units it finished.
//
// Pruning happens in this order, each rule counted:
//   1. duplicates: choices that cannot change the step (a dispatch strategy with ep 1, the
//      hierarchical all-to-all inside one node, a schedule with pp 1) keep only one
//      representative;
//   2. validate(): every plan rule (divisibility, Megatron folding, ZeRO with pipelining...),
//      counted by the path of the first violated rule; a unit whose degrees break a rule is
//      pruned whole;
//   3. memory: capacity_issues() (GPU HBM, node DRAM, node SSD) before any time is estimated;
//   4. the survivors are timed with estimate().
// The gradient-bucket size is not a dimension here: estimate() cannot tell bucket sizes apart,
// so the finalists are refined over `grad_bucket_bytes` with simulate() (tuner/search.h).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/cluster.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/workload.h"
#include "cost_models/profile.h"
#include "simulator/prediction.h"

namespace switchyard {

// Bump when the enumeration order or the record format changes: stored sweeps of another version
// are not reused.
inline constexpr int kSpaceVersion = 2;

struct SpaceOptions {
  std::vector<int> gpus;  // GPU counts to search (each one a cluster variant); at least one
  // nullopt = dropless. Empty = dropless only under uniform routing (padding to a capacity can
  // only slow a balanced router down), dropless, 1.0 and 1.25 under skewed routing.
  std::vector<std::optional<double>> capacity_factors;
  std::vector<int> micro_batch_sizes = {1, 2, 4, 8};
  std::vector<int> virtual_stages = {2, 4, 8};  // vp choices of interleaved 1F1B
  bool offload = true;                          // storage presets beyond "everything on the GPU"
  std::vector<int64_t> grad_bucket_bytes = {kDefaultGradBucketBytes, 100'000'000};
};

// Where each tensor class lives and how it is prefetched.
struct StoragePreset {
  std::string name;
  Placement placement;
  Prefetch prefetch;
  bool delayed_update = false;
};

// What the sweep keeps of one evaluated candidate (fixed size: units are stored as packed arrays).
struct CandidateRecord {
  uint32_t index = 0;  // within the unit
  float step_time_s = 0;
  float tokens_per_s = 0;
  float mfu = 0;
  float peak_gpu_bytes = 0;
  float peak_cpu_bytes = 0;
  float peak_ssd_bytes = 0;
  uint8_t bottleneck = 0;  // index into kBottleneckNames
};
// Where a step's time goes most (the largest part of its breakdown), as an index into
// kBottleneckNames.
uint8_t bottleneck_index(const TimeBreakdown& t);
inline constexpr const char* kBottleneckNames[] = {"compute", "tp comm",   "cp comm",
                                                   "ep comm", "dp comm",   "pp comm",
                                                   "bubble",  "optimizer", "stalls"};

struct UnitResult {
  int64_t unit = 0;
  int64_t candidates = 0;                 // the unit's size
  std::map<std::string, int64_t> pruned;  // rule -> candidates it removed
  std::vector<CandidateRecord> records;   // the candidates that were timed
};

// Portable forms (little-endian, fixed size) of records and of whole units: the store keeps records
// as blobs, MPI ranks send units to rank 0.
inline constexpr size_t kCandidateRecordBytes = 4 + 6 * 4 + 1;
std::string pack_records(const std::vector<CandidateRecord>& records);
// Throws std::invalid_argument when `bytes` is not a whole number of records.
std::vector<CandidateRecord> unpack_records(const unsigned char* data, size_t bytes);
std::string encode_unit(const UnitResult& u);
UnitResult decode_unit(std::string_view bytes);  // throws std::invalid_argument when malformed

class SearchSpace {
 public:
  // Checks the request (bad GPU counts, inference workloads, empty choices) and builds the
  // dimension lists. Throws ConfigError with CLI-style paths ("--gpus", "--workload").
  static SearchSpace build(const ModelSpec& model, const ClusterSpec& cluster,
                           const Workload& workload, SpaceOptions options);

  int64_t units() const { return units_; }
  int64_t unit_size() const { return unit_size_; }
  int64_t candidates() const { return units_ * unit_size_; }

  // The candidate's plan and the cluster variant (GPU count) it runs on.
  Plan plan(int64_t unit, int64_t index) const;
  int gpus(int64_t unit) const;
  const ClusterSpec& cluster(int64_t unit) const;
  const CostProfile& profile(int64_t unit) const;
  const std::vector<int64_t>& grad_bucket_bytes() const { return options_.grad_bucket_bytes; }
  const std::string& storage_name(int64_t index) const;

  // Prunes and times every candidate of one unit.
  UnitResult evaluate(int64_t unit) const;

  // Everything the enumeration depends on; its content hash keys stored sweeps.
  Json describe() const;
  std::string key() const;

  const ModelSpec& model() const { return model_; }
  const Workload& workload() const { return workload_; }

 private:
  struct Degrees {
    int variant, tp, cp, pp, ep, expert_tp;
    Dispatch dispatch;
  };
  struct ScheduleChoice {
    Schedule schedule;
    int vp;
  };
  Degrees degrees(int64_t unit) const;
  // Why a unit or a candidate is a duplicate of another one (empty when it is not).
  std::string duplicate_reason(const Degrees& d) const;

  ModelSpec model_;
  Workload workload_;
  SpaceOptions options_;
  std::vector<ClusterSpec> clusters_;  // one per options_.gpus entry
  std::vector<CostProfile> profiles_;
  std::vector<int> tp_, cp_, pp_, ep_, expert_tp_;
  std::vector<Dispatch> dispatch_;
  std::vector<ScheduleChoice> schedules_;
  std::vector<int> zero_ = {0, 1, 2, 3};
  std::vector<Recompute> recompute_ = {Recompute::kNone, Recompute::kSelective, Recompute::kFull};
  std::vector<StoragePreset> storage_;
  std::vector<ExpertReplicas> replicas_;
  int64_t units_ = 0;
  int64_t unit_size_ = 0;
};

}  // namespace switchyard
