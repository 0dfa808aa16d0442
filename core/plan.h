// Plan: how one model runs on one cluster — parallel degrees, pipeline schedule, ZeRO stage,
// recompute, token dispatch, storage tier of each tensor class, prefetch, elastic expert replicas
// and inference ring sections. One Plan type is read by the simulator, the tuner and the executor.
// JSON keys (fixed: external scripts write them) and their defaults are in configs/README.md.
//
// Rank layout: world = dp * tp * pp * cp for the dense (attention) part. The expert layers refold
// the tp * cp * dp ranks of one pipeline stage as expert_tp * ep * expert_dp (Megatron-Core's MoE
// parallel folding), so expert_dp = tp * cp * dp / (expert_tp * ep).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/json_io.h"
#include "core/model.h"

namespace switchyard {

enum class Schedule { kGPipe, k1F1B, kInterleaved1F1B };
enum class Recompute { kNone, kSelective, kFull };
enum class Dispatch { kAllToAll, kHierarchicalAllToAll, kPPMoEIndexSlice };
enum class Tier { kGPU, kCPU, kSSD };
enum class PrefetchDirection { kNone, kAhead, kDown, k2D };

template <>
struct EnumNames<Schedule> {
  static constexpr std::pair<Schedule, std::string_view> kValues[] = {
      {Schedule::kGPipe, "gpipe"},
      {Schedule::k1F1B, "1f1b"},
      {Schedule::kInterleaved1F1B, "interleaved_1f1b"}};
};
template <>
struct EnumNames<Recompute> {
  static constexpr std::pair<Recompute, std::string_view> kValues[] = {
      {Recompute::kNone, "none"}, {Recompute::kSelective, "selective"}, {Recompute::kFull, "full"}};
};
template <>
struct EnumNames<Dispatch> {
  static constexpr std::pair<Dispatch, std::string_view> kValues[] = {
      {Dispatch::kAllToAll, "all_to_all"},
      {Dispatch::kHierarchicalAllToAll, "hierarchical_all_to_all"},
      {Dispatch::kPPMoEIndexSlice, "ppmoe_index_slice"}};
};
template <>
struct EnumNames<Tier> {
  static constexpr std::pair<Tier, std::string_view> kValues[] = {
      {Tier::kGPU, "gpu"}, {Tier::kCPU, "cpu"}, {Tier::kSSD, "ssd"}};
};
template <>
struct EnumNames<PrefetchDirection> {
  static constexpr std::pair<PrefetchDirection, std::string_view> kValues[] = {
      {PrefetchDirection::kNone, "none"},
      {PrefetchDirection::kAhead, "ahead"},
      {PrefetchDirection::kDown, "down"},
      {PrefetchDirection::k2D, "2d"}};
};

struct Placement {
  Tier dense_params = Tier::kGPU;
  Tier expert_params = Tier::kGPU;
  Tier gradients = Tier::kGPU;
  Tier optimizer_states = Tier::kGPU;
  Tier activations = Tier::kGPU;
  bool operator==(const Placement&) const = default;
};

struct Prefetch {
  int depth = 0;  // layers ahead
  PrefetchDirection direction = PrefetchDirection::kNone;
  // Loads `depth` layers ahead in time ("ahead" or "2d"); otherwise right before use.
  bool ahead() const {
    return direction == PrefetchDirection::kAhead || direction == PrefetchDirection::k2D;
  }
  bool operator==(const Prefetch&) const = default;
};

// Elastic expert replication (SE-MoE): more copies of hot experts.
struct ExpertReplicas {
  enum class Kind { kNone, kHot, kPerExpert };
  Kind kind = Kind::kNone;
  int hot_experts = 0;          // kHot: the k most loaded experts ...
  int replicas = 1;             // ... get this many copies
  std::vector<int> per_expert;  // kPerExpert: copies of each expert (>= 1)
  bool operator==(const ExpertReplicas&) const = default;
};

// The inputs a bundled plan was written for (bundled names).
struct PlanTarget {
  std::string model;
  std::string cluster;
  int nodes = 0;  // 0 = the cluster file's node count
  std::string workload;
  bool operator==(const PlanTarget&) const = default;
};

inline constexpr int64_t kDefaultGradBucketBytes = 25'000'000;

struct Plan : ConfigMeta {
  std::optional<PlanTarget> target;  // JSON key "for"

  int dp = 1;
  int tp = 1;
  int pp = 1;
  int cp = 1;
  int ep = 1;
  int expert_tp = 1;
  int vp = 1;
  bool sequence_parallel = false;
  int micro_batch_size = 1;
  Schedule schedule = Schedule::k1F1B;
  int zero_stage = 0;
  Recompute recompute = Recompute::kNone;
  Dispatch dispatch = Dispatch::kAllToAll;
  std::optional<double> capacity_factor;  // nullopt = dropless
  int64_t grad_bucket_bytes = kDefaultGradBucketBytes;
  Placement placement;
  // ZeRO-Offload's one-step delayed parameter update (Ren et al., USENIX ATC '21, section 4.2):
  // the host's optimizer step over step i's gradients runs beside step i+1's forward and backward,
  // which compute with the parameters one update behind. Needs optimizer states off the GPU.
  bool delayed_update = false;
  Prefetch prefetch;
  ExpertReplicas expert_replicas;
  int ring_sections = 0;
  std::vector<int> stage_layers;  // empty = derived by resolve_stage_layers

  int world_size() const { return dp * tp * pp * cp; }
  // Ranks of one pipeline stage, refolded for the expert layers.
  int expert_dp() const;
  bool operator==(const Plan&) const = default;
};

// Parses one plan (paths under `plan`); rules that need the model, cluster or workload are
// validate()'s. Throws ConfigError listing every problem.
Plan parse_plan(const Json& j);
Json to_json(const Plan& p);
Json semantic_json(const Plan& p);

// Layers of each pipeline stage: plan.stage_layers when given (with pp entries), else an even
// split; when pp does not divide num_layers, each stage gets floor(L/pp) and the L % pp extra
// layers go to the middle stages first (1..pp-2, in order), then the last, then the first stage,
// which also hold the LM head and the embedding.
std::vector<int> resolve_stage_layers(const Plan& p, const ModelSpec& m);

}  // namespace switchyard
