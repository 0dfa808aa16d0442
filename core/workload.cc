#include "core/workload.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace switchyard {

namespace {

Routing parse_routing(const Json& j, const std::string& path, std::vector<ConfigIssue>& issues) {
  Routing r;
  JsonReader rr(j, path, issues);
  rr.required_enum("kind", &r.kind);
  if (r.kind == RoutingKind::kZipf) {
    if (rr.required("exponent", &r.zipf_exponent) && !(r.zipf_exponent >= 0))
      rr.add_issue(rr.path_of("exponent"), "must be >= 0");
  }
  if (r.kind == RoutingKind::kHistogram) {
    const auto histogram = [&](const Json* h, const std::string& hpath, std::vector<double>& out) {
      if (!h->is_array() || h->empty()) {
        rr.add_issue(hpath, "expected a non-empty array of counts");
        return;
      }
      double sum = 0;
      for (size_t i = 0; i < h->size(); ++i) {
        auto v = read_number((*h)[i], index_path(hpath, i), issues);
        if (!v) continue;
        if (*v < 0) rr.add_issue(index_path(hpath, i), "must be >= 0");
        sum += *v;
        out.push_back(*v);
      }
      if (!(sum > 0)) rr.add_issue(hpath, "counts sum to 0");
    };
    if (const Json* h = rr.child("tokens_per_expert", true))
      histogram(h, rr.path_of("tokens_per_expert"), r.tokens_per_expert);
    if (const Json* layers = rr.child("per_layer", false)) {
      const std::string lpath = rr.path_of("per_layer");
      if (!layers->is_array() || layers->empty()) {
        rr.add_issue(lpath, "expected an array of histograms, one per MoE layer");
      } else {
        for (size_t i = 0; i < layers->size(); ++i)
          histogram(&(*layers)[i], index_path(lpath, i), r.per_layer.emplace_back());
      }
    }
  }
  rr.finish();
  return r;
}

Json routing_json(const Routing& r) {
  Json j = {{"kind", enum_name(r.kind)}};
  if (r.kind == RoutingKind::kZipf) j["exponent"] = r.zipf_exponent;
  if (r.kind == RoutingKind::kHistogram) j["tokens_per_expert"] = r.tokens_per_expert;
  if (r.kind == RoutingKind::kHistogram && !r.per_layer.empty()) j["per_layer"] = r.per_layer;
  return j;
}

}  // namespace

Workload parse_workload(const Json& j) {
  std::vector<ConfigIssue> issues;
  Workload w;
  JsonReader r(j, "workload", issues);
  if (!r.is_object()) throw ConfigError(std::move(issues));
  read_meta(r, w, /*name_required=*/true);
  r.optional_enum("mode", &w.mode);
  r.required("global_batch_size", &w.global_batch_size, 1, int64_t{1} << 40);
  r.optional("seq_len", &w.seq_len, 1, int64_t{1} << 24);
  r.optional_enum("precision", &w.precision);
  if (w.precision == Precision::kTF32)
    r.add_issue(r.path_of("precision"), "tf32 is a GEMM mode, not a training precision; use fp32");
  if (r.optional_enum("optimizer_moments", &w.optimizer_moments) &&
      w.optimizer_moments != Precision::kFP32 && w.optimizer_moments != Precision::kBF16)
    r.add_issue(r.path_of("optimizer_moments"), "must be \"fp32\" or \"bf16\"");
  if (const Json* rt = r.child("routing", false))
    w.routing = parse_routing(*rt, r.path_of("routing"), issues);
  if (const Json* tr = r.child("task_routing", false)) {
    const std::string path = r.path_of("task_routing");
    if (!tr->is_array() || tr->empty()) {
      r.add_issue(path, "expected a non-empty array of {\"task\", \"routing\"}");
    } else {
      for (size_t i = 0; i < tr->size(); ++i) {
        TaskRouting t;
        JsonReader er((*tr)[i], index_path(path, i), issues);
        er.required("task", &t.task);
        if (const Json* rj = er.child("routing", true))
          t.routing = parse_routing(*rj, er.path_of("routing"), issues);
        er.finish();
        for (const auto& other : w.task_routing)
          if (!t.task.empty() && other.task == t.task)
            er.add_issue(er.path_of("task"), "task \"" + t.task + "\" listed twice");
        w.task_routing.push_back(std::move(t));
      }
    }
  }
  if (const Json* inf = r.child("inference", false)) {
    InferenceSpec s;
    JsonReader ir(*inf, r.path_of("inference"), issues);
    ir.required("prefill_batch", &s.prefill_batch, 0, int64_t{1} << 30);
    ir.required("prompt_len", &s.prompt_len, 1, int64_t{1} << 24);
    ir.required("decode_batch", &s.decode_batch, 0, int64_t{1} << 30);
    ir.required("decode_tokens", &s.decode_tokens, 0, int64_t{1} << 30);
    ir.finish();
    w.inference = s;
  }
  r.finish();
  if (w.mode == Mode::kInference && !w.inference)
    r.add_issue(r.path_of("inference"), "missing (required when mode is \"inference\")");
  if (w.mode == Mode::kTrain && w.inference)
    r.add_issue(r.path_of("inference"), "only allowed when mode is \"inference\"");
  throw_if_any(std::move(issues));
  return w;
}

Json semantic_json(const Workload& w) {
  Json j;
  j["mode"] = enum_name(w.mode);
  j["global_batch_size"] = w.global_batch_size;
  j["seq_len"] = w.seq_len > 0 ? Json(w.seq_len) : Json(nullptr);  // null: the model's default
  j["precision"] = enum_name(w.precision);
  j["optimizer_moments"] = enum_name(w.optimizer_moments);
  j["routing"] = routing_json(w.routing);
  if (!w.task_routing.empty()) {
    Json tr = Json::array();
    for (const auto& t : w.task_routing)
      tr.push_back({{"task", t.task}, {"routing", routing_json(t.routing)}});
    j["task_routing"] = tr;
  }
  if (w.inference) {
    j["inference"] = {{"prefill_batch", w.inference->prefill_batch},
                      {"prompt_len", w.inference->prompt_len},
                      {"decode_batch", w.inference->decode_batch},
                      {"decode_tokens", w.inference->decode_tokens}};
  }
  return j;
}

Json to_json(const Workload& w) {
  Json j = semantic_json(w);
  write_meta(w, j);
  return j;
}

std::vector<double> expert_load_fractions(const Routing& r, int64_t num_experts, int64_t top_k) {
  const size_t n = static_cast<size_t>(std::max<int64_t>(num_experts, 0));
  std::vector<double> weight(n, 1.0);
  if (r.kind == RoutingKind::kZipf) {
    for (size_t i = 0; i < n; ++i)
      weight[i] = 1.0 / std::pow(static_cast<double>(i + 1), r.zipf_exponent);
  } else if (r.kind == RoutingKind::kHistogram) {
    for (size_t i = 0; i < n; ++i)
      weight[i] = i < r.tokens_per_expert.size() ? r.tokens_per_expert[i] : 0;
  }
  // Scale by the largest weight first so that huge counts cannot overflow the sum.
  const double max_weight = n ? *std::max_element(weight.begin(), weight.end()) : 0.0;
  if (max_weight > 0 && std::isfinite(max_weight))
    for (double& x : weight) x /= max_weight;
  double total = std::accumulate(weight.begin(), weight.end(), 0.0);
  std::vector<double> share(n, n ? 1.0 / static_cast<double>(n) : 0.0);
  if (!(total > 0) || !std::isfinite(total)) return share;

  // Water-filling: cap shares at 1/top_k, hand the excess to uncapped experts by weight.
  const double cap =
      top_k > 0 ? 1.0 / static_cast<double>(std::min<int64_t>(top_k, num_experts)) : 1.0;
  std::vector<bool> capped(n, false);
  double remaining = 1.0;
  for (size_t round = 0; round <= n; ++round) {
    double free_weight = 0;
    size_t free_count = 0;
    for (size_t i = 0; i < n; ++i) {
      free_weight += capped[i] ? 0.0 : weight[i];
      free_count += capped[i] ? 0 : 1;
    }
    bool changed = false;
    for (size_t i = 0; i < n; ++i) {
      if (capped[i]) continue;
      // When only zero-weight experts are left, the router's later choices still land somewhere:
      // spread them evenly.
      share[i] = free_weight > 0 ? remaining * weight[i] / free_weight
                                 : remaining / static_cast<double>(free_count);
      if (share[i] > cap + 1e-15) {
        share[i] = cap;
        capped[i] = true;
        remaining -= cap;
        changed = true;
      }
    }
    if (!changed) break;
  }
  return share;
}

std::vector<double> expert_load_fractions(const Workload& w, const ModelSpec& m, int moe_layer) {
  if (m.moe && w.routing.kind == RoutingKind::kHistogram && moe_layer >= 0 &&
      static_cast<size_t>(moe_layer) < w.routing.per_layer.size() && w.task_routing.empty()) {
    Routing layer;
    layer.kind = RoutingKind::kHistogram;
    layer.tokens_per_expert = w.routing.per_layer[static_cast<size_t>(moe_layer)];
    return expert_load_fractions(layer, m.moe->num_experts, m.moe->top_k);
  }
  return expert_load_fractions(w, m);
}

std::vector<double> expert_load_fractions(const Workload& w, const ModelSpec& m) {
  if (!m.moe) return {};
  if (w.task_routing.empty() || m.tasks.empty())
    return expert_load_fractions(w.routing, m.moe->num_experts, m.moe->top_k);
  std::vector<double> total(static_cast<size_t>(m.moe->num_experts), 0.0);
  for (const TaskSpec& task : m.tasks) {
    const Routing* routing = &w.routing;
    for (const auto& tr : w.task_routing)
      if (tr.task == task.name) routing = &tr.routing;
    auto f = expert_load_fractions(*routing, m.moe->num_experts, m.moe->top_k);
    for (size_t i = 0; i < total.size(); ++i) total[i] += task.token_share * f[i];
  }
  return total;
}

}  // namespace switchyard
