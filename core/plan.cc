#include "core/plan.h"

#include <algorithm>

namespace switchyard {

int Plan::expert_dp() const {
  const int stage_ranks = tp * cp * dp;
  const int expert_group = expert_tp * ep;
  return expert_group > 0 && stage_ranks % expert_group == 0 ? stage_ranks / expert_group : 0;
}

namespace {

constexpr int kMaxDegree = 1 << 24;

void parse_placement(JsonReader& r, Placement& pl) {
  const Json* j = r.child("placement", false);
  if (!j) return;
  JsonReader pr(*j, r.path_of("placement"), r.issues());
  pr.optional_enum("dense_params", &pl.dense_params);
  pr.optional_enum("expert_params", &pl.expert_params);
  pr.optional_enum("gradients", &pl.gradients);
  pr.optional_enum("optimizer_states", &pl.optimizer_states);
  if (pr.optional_enum("activations", &pl.activations) && pl.activations == Tier::kSSD)
    pr.add_issue(pr.path_of("activations"), "activations can be offloaded to \"cpu\", not \"ssd\"");
  pr.finish();
}

void parse_replicas(JsonReader& r, ExpertReplicas& er) {
  const Json* j = r.child("expert_replicas", false);
  if (!j) return;
  JsonReader rr(*j, r.path_of("expert_replicas"), r.issues());
  if (!rr.is_object()) return;
  const bool hot = rr.has("hot_experts") || rr.has("replicas");
  const bool per = rr.has("per_expert");
  if (hot && per) {
    for (const char* key : {"hot_experts", "replicas", "per_expert"}) rr.child(key, false);
    rr.add_issue(rr.path(), "give either {hot_experts, replicas} or {per_expert}, not both");
  } else if (per) {
    er.kind = ExpertReplicas::Kind::kPerExpert;
    const std::string path = rr.path_of("per_expert");
    const Json* list = rr.child("per_expert", true);
    if (list && (!list->is_array() || list->empty())) {
      rr.add_issue(path, "expected a non-empty array of replica counts");
    } else if (list) {
      for (size_t i = 0; i < list->size(); ++i) {
        auto v = read_int((*list)[i], index_path(path, i), r.issues());
        if (v && (*v < 1 || *v > kMaxDegree))
          rr.add_issue(index_path(path, i), "must be in [1, " + std::to_string(kMaxDegree) +
                                                "], got " + std::to_string(*v));
        else if (v)
          er.per_expert.push_back(static_cast<int>(*v));
      }
    }
  } else if (hot) {
    er.kind = ExpertReplicas::Kind::kHot;
    rr.required("hot_experts", &er.hot_experts, 1, kMaxDegree);
    rr.required("replicas", &er.replicas, 2, kMaxDegree);
  } else {
    rr.add_issue(rr.path(),
                 "expected {\"hot_experts\": k, \"replicas\": r} or {\"per_expert\": [...]}");
  }
  rr.finish();
}

}  // namespace

Plan parse_plan(const Json& j) {
  std::vector<ConfigIssue> issues;
  Plan p;
  JsonReader r(j, "plan", issues);
  if (!r.is_object()) throw ConfigError(std::move(issues));
  read_meta(r, p, /*name_required=*/false);
  if (const Json* f = r.child("for", false)) {
    PlanTarget t;
    JsonReader fr(*f, r.path_of("for"), issues);
    fr.required("model", &t.model);
    fr.required("cluster", &t.cluster);
    fr.optional("nodes", &t.nodes, 1, kMaxDegree);
    fr.required("workload", &t.workload);
    fr.finish();
    p.target = t;
  }
  r.optional("dp", &p.dp, 1, kMaxDegree);
  r.optional("tp", &p.tp, 1, kMaxDegree);
  r.optional("pp", &p.pp, 1, kMaxDegree);
  r.optional("cp", &p.cp, 1, kMaxDegree);
  r.optional("ep", &p.ep, 1, kMaxDegree);
  r.optional("expert_tp", &p.expert_tp, 1, kMaxDegree);
  r.optional("vp", &p.vp, 1, kMaxDegree);
  r.optional("sequence_parallel", &p.sequence_parallel);
  r.optional("micro_batch_size", &p.micro_batch_size, 1, kMaxDegree);
  r.optional_enum("schedule", &p.schedule);
  if (r.optional("zero_stage", &p.zero_stage, 0) && p.zero_stage > 3)
    r.add_issue(r.path_of("zero_stage"),
                "must be 0, 1, 2 or 3, got " + std::to_string(p.zero_stage));
  r.optional_enum("recompute", &p.recompute);
  r.optional_enum("dispatch", &p.dispatch);
  double cf = 0;
  if (r.optional("capacity_factor", &cf)) {
    if (cf > 0)
      p.capacity_factor = cf;
    else
      r.add_issue(r.path_of("capacity_factor"),
                  "must be > 0 (or null for dropless), got " + Json(cf).dump());
  }
  r.optional("grad_bucket_bytes", &p.grad_bucket_bytes, 0);
  parse_placement(r, p.placement);
  r.optional("delayed_update", &p.delayed_update);
  if (const Json* pf = r.child("prefetch", false)) {
    JsonReader fr(*pf, r.path_of("prefetch"), issues);
    fr.optional("depth", &p.prefetch.depth, 0, kMaxDegree);
    fr.optional_enum("direction", &p.prefetch.direction);
    fr.finish();
    if ((p.prefetch.depth > 0) != (p.prefetch.direction != PrefetchDirection::kNone))
      fr.add_issue(fr.path(), "depth " + std::to_string(p.prefetch.depth) + " with direction \"" +
                                  std::string(enum_name(p.prefetch.direction)) +
                                  "\": depth > 0 goes with a direction, depth 0 with \"none\"");
  }
  parse_replicas(r, p.expert_replicas);
  r.optional("ring_sections", &p.ring_sections, 0, kMaxDegree);
  if (p.ring_sections == 1)
    r.add_issue(r.path_of("ring_sections"), "a ring needs at least 2 sections (0 turns it off)");
  if (const Json* sl = r.child("stage_layers", false)) {
    const std::string path = r.path_of("stage_layers");
    if (!sl->is_array() || sl->empty()) {
      r.add_issue(path, "expected a non-empty array of layer counts (or null), got " +
                            (sl->is_array() ? std::string("[]") : json_type_name(*sl)));
    } else {
      for (size_t i = 0; i < sl->size(); ++i) {
        auto v = read_int((*sl)[i], index_path(path, i), issues);
        if (v && (*v < 1 || *v > kMaxDegree))
          r.add_issue(index_path(path, i), "must be in [1, " + std::to_string(kMaxDegree) +
                                               "], got " + std::to_string(*v));
        else if (v)
          p.stage_layers.push_back(static_cast<int>(*v));
      }
    }
  }
  r.finish();
  // Products of degrees stay far inside int: no plan spans more than 2^24 GPUs.
  const auto product_check = [&](const char* path, const char* what, double product) {
    if (product > static_cast<double>(kMaxDegree))
      r.add_issue(path, std::string(what) + " = " + Json(product).dump() + " exceeds " +
                            std::to_string(kMaxDegree));
  };
  product_check("plan", "dp*tp*pp*cp", double(p.dp) * p.tp * p.pp * p.cp);
  product_check("plan.ep", "expert_tp*ep", double(p.expert_tp) * p.ep);
  product_check("plan.vp", "pp*vp", double(p.pp) * p.vp);
  throw_if_any(std::move(issues));
  return p;
}

Json semantic_json(const Plan& p) {
  Json j;
  j["dp"] = p.dp;
  j["tp"] = p.tp;
  j["pp"] = p.pp;
  j["cp"] = p.cp;
  j["ep"] = p.ep;
  j["expert_tp"] = p.expert_tp;
  j["vp"] = p.vp;
  j["sequence_parallel"] = p.sequence_parallel;
  j["micro_batch_size"] = p.micro_batch_size;
  j["schedule"] = enum_name(p.schedule);
  j["zero_stage"] = p.zero_stage;
  j["recompute"] = enum_name(p.recompute);
  j["dispatch"] = enum_name(p.dispatch);
  j["capacity_factor"] = p.capacity_factor ? Json(*p.capacity_factor) : Json(nullptr);
  j["grad_bucket_bytes"] = p.grad_bucket_bytes;
  j["placement"] = {{"dense_params", enum_name(p.placement.dense_params)},
                    {"expert_params", enum_name(p.placement.expert_params)},
                    {"gradients", enum_name(p.placement.gradients)},
                    {"optimizer_states", enum_name(p.placement.optimizer_states)},
                    {"activations", enum_name(p.placement.activations)}};
  // Written only when set: a plan without it keeps the store key it had before the key existed.
  if (p.delayed_update) j["delayed_update"] = true;
  j["prefetch"] = {{"depth", p.prefetch.depth}, {"direction", enum_name(p.prefetch.direction)}};
  switch (p.expert_replicas.kind) {
    case ExpertReplicas::Kind::kNone:
      j["expert_replicas"] = nullptr;
      break;
    case ExpertReplicas::Kind::kHot:
      j["expert_replicas"] = {{"hot_experts", p.expert_replicas.hot_experts},
                              {"replicas", p.expert_replicas.replicas}};
      break;
    case ExpertReplicas::Kind::kPerExpert:
      j["expert_replicas"] = {{"per_expert", p.expert_replicas.per_expert}};
      break;
  }
  j["ring_sections"] = p.ring_sections;
  j["stage_layers"] = p.stage_layers.empty() ? Json(nullptr) : Json(p.stage_layers);
  return j;
}

Json to_json(const Plan& p) {
  Json j = semantic_json(p);
  write_meta(p, j);
  if (p.target) {
    j["for"] = {{"model", p.target->model},
                {"cluster", p.target->cluster},
                {"workload", p.target->workload}};
    if (p.target->nodes > 0) j["for"]["nodes"] = p.target->nodes;
  }
  return j;
}

std::vector<int> resolve_stage_layers(const Plan& p, const ModelSpec& m) {
  // A stage_layers of the wrong length is validate()'s to report; derive a split meanwhile.
  if (!p.stage_layers.empty() && static_cast<int>(p.stage_layers.size()) == p.pp)
    return p.stage_layers;
  const int pp = std::max(p.pp, 1);
  const int layers = static_cast<int>(m.num_layers);
  std::vector<int> out(static_cast<size_t>(pp), layers / pp);
  int extra = layers % pp;
  // Middle stages first (they carry neither embedding nor LM head), then last, then first.
  std::vector<int> order;
  for (int s = 1; s + 1 < pp; ++s) order.push_back(s);
  if (pp > 1) order.push_back(pp - 1);
  order.push_back(0);
  for (size_t i = 0; extra > 0; i = (i + 1) % order.size(), --extra) ++out[order[i]];
  return out;
}

}  // namespace switchyard
