// ModelSpec: the architecture of a (MoE) transformer, as read from configs/models/*.json, and the
// numbers derived from it: parameter counts (total, active per token, dense vs expert) and model
// FLOPs per token. The JSON keys and defaults are documented in configs/README.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/json_io.h"

namespace switchyard {

enum class Activation { kSwiGLU, kGeLU, kReLU };
enum class NormKind { kRMSNorm, kLayerNorm };
enum class AttentionKind { kGQA, kMLA };
enum class MoeLayerPattern { kAll, kEvery, kList };

template <>
struct EnumNames<Activation> {
  static constexpr std::pair<Activation, std::string_view> kValues[] = {
      {Activation::kSwiGLU, "swiglu"}, {Activation::kGeLU, "gelu"}, {Activation::kReLU, "relu"}};
};
template <>
struct EnumNames<NormKind> {
  static constexpr std::pair<NormKind, std::string_view> kValues[] = {
      {NormKind::kRMSNorm, "rmsnorm"}, {NormKind::kLayerNorm, "layernorm"}};
};
template <>
struct EnumNames<AttentionKind> {
  static constexpr std::pair<AttentionKind, std::string_view> kValues[] = {
      {AttentionKind::kGQA, "gqa"}, {AttentionKind::kMLA, "mla"}};
};

// DeepSeek's multi-head latent attention (arXiv 2405.04434).
struct MlaSpec {
  int64_t q_lora_rank = 0;  // 0 = queries are not compressed
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  bool operator==(const MlaSpec&) const = default;
};

struct MoeSpec {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t expert_ffn_hidden_size = 0;
  int64_t num_shared_experts = 0;
  int64_t shared_expert_ffn_hidden_size = 0;  // defaults to expert_ffn_hidden_size
  MoeLayerPattern pattern = MoeLayerPattern::kAll;
  int every = 1;  // kEvery: layers with index % every == offset
  int offset = 0;
  std::vector<int> layer_list;  // kList
  int first_dense_layers = 0;   // these leading layers are dense whatever the pattern says
  bool operator==(const MoeSpec&) const = default;
};

struct TaskSpec {
  std::string name;
  double token_share = 0;
  bool operator==(const TaskSpec&) const = default;
};

struct PublishedCounts {
  double total_params = 0;
  double active_params = 0;  // 0 = not published
  std::string source;
  bool operator==(const PublishedCounts&) const = default;
};

struct ModelSpec : ConfigMeta {
  // Metadata (not part of the content hash).
  std::optional<PublishedCounts> published;

  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  int64_t ffn_hidden_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  AttentionKind attention = AttentionKind::kGQA;
  MlaSpec mla;
  Activation activation = Activation::kSwiGLU;
  NormKind norm = NormKind::kRMSNorm;
  int64_t vocab_size = 0;
  int64_t seq_len = 0;
  bool tied_embeddings = false;
  bool learned_position_embeddings = false;
  std::optional<MoeSpec> moe;
  std::vector<TaskSpec> tasks;

  bool is_moe() const { return moe.has_value(); }
  bool is_moe_layer(int64_t layer) const;
  int64_t num_moe_layers() const;
  // FFN matrices per expert or dense FFN: 3 for SwiGLU (gate, up, down), else 2.
  int ffn_matrices() const { return activation == Activation::kSwiGLU ? 3 : 2; }
  // Gates per MoE layer: one per task for multi-task gating, else one.
  int64_t num_gates() const { return tasks.empty() ? 1 : static_cast<int64_t>(tasks.size()); }
  bool operator==(const ModelSpec&) const = default;
};

// Parses and checks one model; throws ConfigError listing every problem (paths under `model`).
ModelSpec parse_model(const Json& j);
Json to_json(const ModelSpec& m);
// Canonical JSON of the fields that change what a model computes (no name, source, ...).
Json semantic_json(const ModelSpec& m);

// Parameter counts. Biases, attention sinks and other terms below 0.1% of a layer are left out.
struct ParamCounts {
  int64_t embedding = 0;  // input embedding (+ learned positions) + untied LM head
  int64_t attention = 0;  // all layers
  int64_t norms = 0;
  int64_t dense_ffn = 0;       // FFNs of dense layers
  int64_t routed_experts = 0;  // all routed experts of all MoE layers
  int64_t shared_experts = 0;
  int64_t gates = 0;
  int64_t total() const {
    return embedding + attention + norms + dense_ffn + routed_experts + shared_experts + gates;
  }
  int64_t expert() const { return routed_experts; }
  int64_t dense() const { return total() - routed_experts; }  // replicated, not expert-sharded
  int64_t active = 0;  // per token: dense() + top_k / num_experts of routed experts
};

// Per-layer pieces, also used by the cost and memory models.
int64_t attention_params_per_layer(const ModelSpec& m);
int64_t norm_params_per_layer(const ModelSpec& m);
int64_t dense_ffn_params(const ModelSpec& m);      // one dense FFN
int64_t expert_params(const ModelSpec& m);         // one routed expert
int64_t shared_expert_params(const ModelSpec& m);  // one shared expert
ParamCounts count_params(const ModelSpec& m);

// Model FLOPs per token for one sequence of `seq_len` tokens (the PaLM/Megatron "model FLOPs"
// convention: 2 FLOPs per multiply-add of every active weight, including the LM head; attention
// scores over the full sequence, not halved for causality; backward = 2 x forward; recompute not
// counted, as MFU requires).
struct FlopsPerToken {
  double forward = 0;
  double backward = 0;
  double total() const { return forward + backward; }
};
FlopsPerToken flops_per_token(const ModelSpec& m, int64_t seq_len);
// Attention score FLOPs (QK^T and AV) per token per layer, forward.
double attention_score_flops_per_token(const ModelSpec& m, int64_t seq_len);

}  // namespace switchyard
