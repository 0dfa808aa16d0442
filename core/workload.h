// Workload: what one step processes — training (global batch of sequences) or inference (prefill
// and decode batches) — at which precision, and how the router spreads tokens over experts
// (uniform, zipf, or an explicit histogram; per task for multi-task models). Keys in
// configs/README.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/cluster.h"
#include "core/json_io.h"
#include "core/model.h"

namespace switchyard {

enum class Mode { kTrain, kInference };
enum class RoutingKind { kUniform, kZipf, kHistogram };

template <>
struct EnumNames<Mode> {
  static constexpr std::pair<Mode, std::string_view> kValues[] = {{Mode::kTrain, "train"},
                                                                  {Mode::kInference, "inference"}};
};
template <>
struct EnumNames<RoutingKind> {
  static constexpr std::pair<RoutingKind, std::string_view> kValues[] = {
      {RoutingKind::kUniform, "uniform"},
      {RoutingKind::kZipf, "zipf"},
      {RoutingKind::kHistogram, "histogram"}};
};

struct Routing {
  RoutingKind kind = RoutingKind::kUniform;
  double zipf_exponent = 0;               // kZipf: expert i (0-based) gets weight 1/(i+1)^s
  std::vector<double> tokens_per_expert;  // kHistogram: relative counts, one per expert
  // kHistogram, optional: one histogram per MoE layer, in layer order (a measured run's routing:
  // the experts each layer's router favours differ, and each layer waits for its hottest rank).
  // tokens_per_expert stays the whole step's.
  std::vector<std::vector<double>> per_layer;
  bool operator==(const Routing&) const = default;
};

struct TaskRouting {
  std::string task;
  Routing routing;
  bool operator==(const TaskRouting&) const = default;
};

struct InferenceSpec {
  int64_t prefill_batch = 0;
  int64_t prompt_len = 0;
  int64_t decode_batch = 0;
  int64_t decode_tokens = 0;
  bool operator==(const InferenceSpec&) const = default;
};

struct Workload : ConfigMeta {
  Mode mode = Mode::kTrain;
  int64_t global_batch_size = 0;
  int64_t seq_len = 0;  // 0 = the model's default
  Precision precision = Precision::kBF16;
  // Adam's momentum and variance: fp32 (default) or bf16 (DeepSeek-V3 keeps them in bf16).
  Precision optimizer_moments = Precision::kFP32;
  Routing routing;
  std::vector<TaskRouting> task_routing;
  std::optional<InferenceSpec> inference;

  int64_t effective_seq_len(const ModelSpec& m) const { return seq_len > 0 ? seq_len : m.seq_len; }
  bool operator==(const Workload&) const = default;
};

// Parses and checks one workload (paths under `workload`); model-dependent rules (histogram length,
// task names) are checked by validate().
Workload parse_workload(const Json& j);
Json to_json(const Workload& w);
Json semantic_json(const Workload& w);

// Share of token->expert assignments each expert receives (sums to 1), for a router that picks
// `top_k` distinct experts per token. No expert can receive more than every token, so a share is
// capped at 1/top_k and the excess is spread over the others in proportion to their weight.
std::vector<double> expert_load_fractions(const Routing& r, int64_t num_experts, int64_t top_k);
// The same for a model: combines the per-task routings by task token share when the workload has
// them, else uses `w.routing`.
std::vector<double> expert_load_fractions(const Workload& w, const ModelSpec& m);
// The share of MoE layer `moe_layer` (0-based among the MoE layers) when the routing has per-layer
// histograms, else the step's.
std::vector<double> expert_load_fractions(const Workload& w, const ModelSpec& m, int moe_layer);

}  // namespace switchyard
