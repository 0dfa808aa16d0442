#include "core/model.h"

#include <algorithm>
#include <cmath>
#include <set>

namespace switchyard {

bool ModelSpec::is_moe_layer(int64_t layer) const {
  if (!moe || layer < moe->first_dense_layers) return false;
  switch (moe->pattern) {
    case MoeLayerPattern::kAll:
      return true;
    case MoeLayerPattern::kEvery:
      return layer % moe->every == moe->offset;
    case MoeLayerPattern::kList:
      return std::find(moe->layer_list.begin(), moe->layer_list.end(), layer) !=
             moe->layer_list.end();
  }
  return false;
}

int64_t ModelSpec::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t l = 0; l < num_layers; ++l) n += is_moe_layer(l) ? 1 : 0;
  return n;
}

namespace {

// Upper bounds far above any real model; they keep every parameter count inside int64
// (layers * experts * 3 * hidden * expert_ffn <= 2^62).
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxWidth = 131072;
constexpr int64_t kMaxFfn = 524288;
constexpr int64_t kMaxHeads = 4096;
constexpr int64_t kMaxExperts = 16384;
constexpr int64_t kMaxSmall = 256;
constexpr int64_t kMaxVocab = 8388608;
constexpr int64_t kMaxSeq = 16777216;

void parse_attention(JsonReader& r, ModelSpec& m) {
  const Json* a = r.child("attention", false);
  if (!a) return;
  JsonReader ar(*a, r.path_of("attention"), r.issues());
  ar.required_enum("kind", &m.attention);
  if (m.attention == AttentionKind::kMLA) {
    ar.required("q_lora_rank", &m.mla.q_lora_rank, 0, kMaxWidth);
    ar.required("kv_lora_rank", &m.mla.kv_lora_rank, 1, kMaxWidth);
    ar.required("qk_nope_head_dim", &m.mla.qk_nope_head_dim, 1, kMaxHeads);
    ar.required("qk_rope_head_dim", &m.mla.qk_rope_head_dim, 0, kMaxHeads);
    ar.required("v_head_dim", &m.mla.v_head_dim, 1, kMaxHeads);
  }
  ar.finish();
}

void parse_moe(JsonReader& r, ModelSpec& m) {
  const Json* j = r.child("moe", false);
  if (!j) return;
  MoeSpec moe;
  JsonReader mr(*j, r.path_of("moe"), r.issues());
  mr.required("num_experts", &moe.num_experts, 1, kMaxExperts);
  mr.required("top_k", &moe.top_k, 1, kMaxExperts);
  mr.required("expert_ffn_hidden_size", &moe.expert_ffn_hidden_size, 1, kMaxFfn);
  mr.optional("num_shared_experts", &moe.num_shared_experts, 0, kMaxSmall);
  moe.shared_expert_ffn_hidden_size = moe.expert_ffn_hidden_size;
  mr.optional("shared_expert_ffn_hidden_size", &moe.shared_expert_ffn_hidden_size, 1, kMaxFfn);
  mr.optional("first_dense_layers", &moe.first_dense_layers, 0, kMaxLayers);
  if (moe.top_k > moe.num_experts && moe.num_experts > 0)
    mr.add_issue(mr.path_of("top_k"), "top_k " + std::to_string(moe.top_k) +
                                          " exceeds num_experts " +
                                          std::to_string(moe.num_experts));

  const std::string lpath = mr.path_of("layers");
  if (const Json* layers = mr.child("layers", false)) {
    if (layers->is_string()) {
      if (layers->get<std::string>() != "all")
        mr.add_issue(lpath, "expected \"all\", {\"every\": k, \"offset\": o} or a list of layers");
    } else if (layers->is_object()) {
      moe.pattern = MoeLayerPattern::kEvery;
      JsonReader er(*layers, lpath, r.issues());
      er.required("every", &moe.every, 1, kMaxLayers);
      er.optional("offset", &moe.offset, 0, kMaxLayers);
      if (moe.offset >= moe.every)
        er.add_issue(er.path_of("offset"), "must be < every (" + std::to_string(moe.every) +
                                               "), got " + std::to_string(moe.offset));
      er.finish();
    } else if (layers->is_array()) {
      moe.pattern = MoeLayerPattern::kList;
      std::set<int64_t> seen;
      for (size_t i = 0; i < layers->size(); ++i) {
        auto v = read_int((*layers)[i], index_path(lpath, i), r.issues());
        if (!v) continue;
        if (*v < 0 || *v >= m.num_layers)
          mr.add_issue(index_path(lpath, i), "layer " + std::to_string(*v) + " is outside [0, " +
                                                 std::to_string(m.num_layers) + ")");
        else if (!seen.insert(*v).second)
          mr.add_issue(index_path(lpath, i), "layer " + std::to_string(*v) + " listed twice");
        else
          moe.layer_list.push_back(static_cast<int>(*v));
      }
    } else {
      mr.add_issue(lpath,
                   "expected \"all\", {\"every\": k, \"offset\": o} or a list of layers, got " +
                       json_type_name(*layers));
    }
  }
  if (moe.first_dense_layers > m.num_layers && m.num_layers > 0)
    mr.add_issue(mr.path_of("first_dense_layers"), std::to_string(moe.first_dense_layers) +
                                                       " exceeds num_layers " +
                                                       std::to_string(m.num_layers));
  mr.finish();
  m.moe = std::move(moe);
  if (m.num_layers > 0 && m.num_moe_layers() == 0)
    r.add_issue(r.path_of("moe"), "no layer is an MoE layer under this pattern");
}

void parse_tasks(JsonReader& r, ModelSpec& m) {
  const Json* t = r.child("tasks", false);
  if (!t) return;
  const std::string path = r.path_of("tasks");
  if (!t->is_array() || t->empty() || t->size() > static_cast<size_t>(kMaxSmall)) {
    r.add_issue(path, "expected a non-empty array of at most " + std::to_string(kMaxSmall) +
                          " {\"name\", \"token_share\"}");
    return;
  }
  double sum = 0;
  std::set<std::string> names;
  for (size_t i = 0; i < t->size(); ++i) {
    TaskSpec task;
    JsonReader tr((*t)[i], index_path(path, i), r.issues());
    tr.required("name", &task.name);
    if (tr.required("token_share", &task.token_share) && !(task.token_share > 0))
      tr.add_issue(tr.path_of("token_share"), "must be > 0");
    tr.finish();
    if (!task.name.empty() && !names.insert(task.name).second)
      tr.add_issue(tr.path_of("name"), "task \"" + task.name + "\" listed twice");
    sum += task.token_share;
    m.tasks.push_back(std::move(task));
  }
  if (std::fabs(sum - 1.0) > 1e-6)
    r.add_issue(path, "token shares must sum to 1, got " + std::to_string(sum));
  if (!m.moe) r.add_issue(path, "multi-task gating needs an MoE model (no \"moe\" object)");
}

}  // namespace

ModelSpec parse_model(const Json& j) {
  std::vector<ConfigIssue> issues;
  ModelSpec m;
  JsonReader r(j, "model", issues);
  if (!r.is_object()) throw ConfigError(std::move(issues));
  read_meta(r, m, /*name_required=*/true);

  r.required("num_layers", &m.num_layers, 1, kMaxLayers);
  r.required("hidden_size", &m.hidden_size, 1, kMaxWidth);
  r.optional("ffn_hidden_size", &m.ffn_hidden_size, 1, kMaxFfn);
  r.required("num_attention_heads", &m.num_attention_heads, 1, kMaxHeads);
  m.num_kv_heads = m.num_attention_heads;
  r.optional("num_kv_heads", &m.num_kv_heads, 1, kMaxHeads);
  bool explicit_head_dim = r.optional("head_dim", &m.head_dim, 1, kMaxHeads);
  r.optional_enum("activation", &m.activation);
  r.optional_enum("norm", &m.norm);
  r.required("vocab_size", &m.vocab_size, 1, kMaxVocab);
  r.required("seq_len", &m.seq_len, 1, kMaxSeq);
  r.optional("tied_embeddings", &m.tied_embeddings);
  r.optional("learned_position_embeddings", &m.learned_position_embeddings);
  parse_attention(r, m);
  parse_moe(r, m);
  parse_tasks(r, m);

  if (const Json* p = r.child("published", false)) {
    PublishedCounts pc;
    JsonReader pr(*p, r.path_of("published"), issues);
    if (pr.required("total_params", &pc.total_params) && !(pc.total_params > 0))
      pr.add_issue(pr.path_of("total_params"), "must be > 0");
    if (pr.optional("active_params", &pc.active_params) && pc.active_params < 0)
      pr.add_issue(pr.path_of("active_params"), "must be >= 0");
    pr.optional("source", &pc.source);
    pr.finish();
    m.published = pc;
  }
  r.finish();

  if (m.hidden_size > 0 && m.num_attention_heads > 0) {
    // MLA heads have their own widths (qk_nope/qk_rope/v_head_dim); head_dim is not used.
    if (!explicit_head_dim && m.attention == AttentionKind::kMLA) {
      m.head_dim = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim;
    } else if (!explicit_head_dim) {
      if (m.hidden_size % m.num_attention_heads != 0)
        r.add_issue(r.path_of("head_dim"), "missing, and hidden_size " +
                                               std::to_string(m.hidden_size) +
                                               " is not a multiple of num_attention_heads " +
                                               std::to_string(m.num_attention_heads));
      m.head_dim = m.hidden_size / m.num_attention_heads;
    }
    if (m.num_kv_heads > 0 && m.num_attention_heads % m.num_kv_heads != 0)
      r.add_issue(r.path_of("num_kv_heads"), std::to_string(m.num_kv_heads) +
                                                 " does not divide num_attention_heads " +
                                                 std::to_string(m.num_attention_heads));
  }
  bool has_dense_layer = false;
  for (int64_t l = 0; l < m.num_layers && !has_dense_layer; ++l)
    has_dense_layer = !m.is_moe_layer(l);
  if (has_dense_layer && m.ffn_hidden_size == 0)
    r.add_issue(r.path_of("ffn_hidden_size"), "missing (required: the model has dense layers)");
  throw_if_any(std::move(issues));
  return m;
}

Json semantic_json(const ModelSpec& m) {
  Json j;
  j["num_layers"] = m.num_layers;
  j["hidden_size"] = m.hidden_size;
  if (m.ffn_hidden_size > 0) j["ffn_hidden_size"] = m.ffn_hidden_size;  // 0: every layer is MoE
  j["num_attention_heads"] = m.num_attention_heads;
  j["num_kv_heads"] = m.num_kv_heads;
  j["head_dim"] = m.head_dim;
  Json att;
  att["kind"] = enum_name(m.attention);
  if (m.attention == AttentionKind::kMLA) {
    att["q_lora_rank"] = m.mla.q_lora_rank;
    att["kv_lora_rank"] = m.mla.kv_lora_rank;
    att["qk_nope_head_dim"] = m.mla.qk_nope_head_dim;
    att["qk_rope_head_dim"] = m.mla.qk_rope_head_dim;
    att["v_head_dim"] = m.mla.v_head_dim;
  }
  j["attention"] = att;
  j["activation"] = enum_name(m.activation);
  j["norm"] = enum_name(m.norm);
  j["vocab_size"] = m.vocab_size;
  j["seq_len"] = m.seq_len;
  j["tied_embeddings"] = m.tied_embeddings;
  j["learned_position_embeddings"] = m.learned_position_embeddings;
  if (m.moe) {
    const MoeSpec& e = *m.moe;
    Json moe;
    moe["num_experts"] = e.num_experts;
    moe["top_k"] = e.top_k;
    moe["expert_ffn_hidden_size"] = e.expert_ffn_hidden_size;
    moe["num_shared_experts"] = e.num_shared_experts;
    moe["shared_expert_ffn_hidden_size"] = e.shared_expert_ffn_hidden_size;
    moe["first_dense_layers"] = e.first_dense_layers;
    switch (e.pattern) {
      case MoeLayerPattern::kAll:
        moe["layers"] = "all";
        break;
      case MoeLayerPattern::kEvery:
        moe["layers"] = {{"every", e.every}, {"offset", e.offset}};
        break;
      case MoeLayerPattern::kList: {
        std::vector<int> sorted = e.layer_list;
        std::sort(sorted.begin(), sorted.end());
        moe["layers"] = sorted;
        break;
      }
    }
    j["moe"] = moe;
  }
  if (!m.tasks.empty()) {
    Json tasks = Json::array();
    for (const auto& t : m.tasks)
      tasks.push_back({{"name", t.name}, {"token_share", t.token_share}});
    j["tasks"] = tasks;
  }
  return j;
}

Json to_json(const ModelSpec& m) {
  Json j = semantic_json(m);
  write_meta(m, j);
  if (m.published) {
    Json p = {{"total_params", m.published->total_params}, {"source", m.published->source}};
    if (m.published->active_params > 0) p["active_params"] = m.published->active_params;
    j["published"] = p;
  }
  return j;
}

int64_t attention_params_per_layer(const ModelSpec& m) {
  const int64_t h = m.hidden_size;
  const int64_t heads = m.num_attention_heads;
  if (m.attention == AttentionKind::kMLA) {
    const MlaSpec& a = m.mla;
    const int64_t qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
    int64_t q = a.q_lora_rank > 0 ? h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * heads * qk
                                  : h * heads * qk;
    int64_t kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank +
                 a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim);
    int64_t o = heads * a.v_head_dim * h;
    return q + kv + o;
  }
  const int64_t q_width = heads * m.head_dim;
  const int64_t kv_width = m.num_kv_heads * m.head_dim;
  return h * q_width + 2 * h * kv_width + q_width * h;
}

int64_t norm_params_per_layer(const ModelSpec& m) {
  return 2 * (m.norm == NormKind::kLayerNorm ? 2 : 1) * m.hidden_size;
}

int64_t dense_ffn_params(const ModelSpec& m) {
  return m.ffn_matrices() * m.hidden_size * m.ffn_hidden_size;
}

int64_t expert_params(const ModelSpec& m) {
  return m.moe ? m.ffn_matrices() * m.hidden_size * m.moe->expert_ffn_hidden_size : 0;
}

int64_t shared_expert_params(const ModelSpec& m) {
  return m.moe ? m.ffn_matrices() * m.hidden_size * m.moe->shared_expert_ffn_hidden_size : 0;
}

ParamCounts count_params(const ModelSpec& m) {
  ParamCounts c;
  const int64_t h = m.hidden_size;
  c.embedding = m.vocab_size * h * (m.tied_embeddings ? 1 : 2) +
                (m.learned_position_embeddings ? m.seq_len * h : 0);
  c.attention = m.num_layers * attention_params_per_layer(m);
  c.norms = m.num_layers * norm_params_per_layer(m) + (m.norm == NormKind::kLayerNorm ? 2 : 1) * h;
  int64_t active_routed = 0;
  for (int64_t l = 0; l < m.num_layers; ++l) {
    if (m.is_moe_layer(l)) {
      c.routed_experts += m.moe->num_experts * expert_params(m);
      c.shared_experts += m.moe->num_shared_experts * shared_expert_params(m);
      c.gates += m.num_gates() * h * m.moe->num_experts;
      active_routed += m.moe->top_k * expert_params(m);
    } else {
      c.dense_ffn += dense_ffn_params(m);
    }
  }
  // A token passes through one task's gate only.
  const int64_t inactive_gates = m.num_gates() > 1 ? c.gates - c.gates / m.num_gates() : 0;
  c.active = c.dense() - inactive_gates + active_routed;
  return c;
}

double attention_score_flops_per_token(const ModelSpec& m, int64_t seq_len) {
  const double heads = static_cast<double>(m.num_attention_heads);
  double qk_dim = static_cast<double>(m.head_dim);
  double v_dim = static_cast<double>(m.head_dim);
  if (m.attention == AttentionKind::kMLA) {
    qk_dim = static_cast<double>(m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim);
    v_dim = static_cast<double>(m.mla.v_head_dim);
  }
  // QK^T: 2 * s * qk_dim per head; AV: 2 * s * v_dim per head.
  return 2.0 * static_cast<double>(seq_len) * heads * (qk_dim + v_dim);
}

FlopsPerToken flops_per_token(const ModelSpec& m, int64_t seq_len) {
  ParamCounts c = count_params(m);
  // Matmul weights touched by one token: active params minus the embedding lookup (a gather, no
  // FLOPs) and norms (elementwise); the LM head is a matmul.
  const int64_t h = m.hidden_size;
  double matmul_params = static_cast<double>(c.active - c.norms - m.vocab_size * h -
                                             (m.learned_position_embeddings ? m.seq_len * h : 0));
  if (m.tied_embeddings) matmul_params += static_cast<double>(m.vocab_size * h);
  FlopsPerToken f;
  f.forward = 2.0 * matmul_params +
              static_cast<double>(m.num_layers) * attention_score_flops_per_token(m, seq_len);
  f.backward = 2.0 * f.forward;
  return f;
}

}  // namespace switchyard
