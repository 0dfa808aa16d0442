#include "core/validate.h"

#include <numeric>
#include <string>

namespace switchyard {
namespace {

std::string s(int64_t v) { return std::to_string(v); }

class Checker {
 public:
  explicit Checker(std::vector<ConfigIssue>& out) : out_(out) {}
  void fail(std::string path, std::string message) {
    out_.push_back({std::move(path), std::move(message)});
  }
  // Records a violation when `ok` is false.
  void require(bool ok, std::string path, std::string message) {
    if (!ok) fail(std::move(path), std::move(message));
  }

 private:
  std::vector<ConfigIssue>& out_;
};

bool any_on(const Placement& p, Tier t) {
  return p.dense_params == t || p.expert_params == t || p.gradients == t ||
         p.optimizer_states == t || p.activations == t;
}

// Plans built in code (the tuner) skip the parser's range checks: everything that divides must be
// at least 1 before any other rule runs.
bool check_positive(Checker& c, const Plan& p) {
  const std::pair<const char*, int> degrees[] = {
      {"plan.dp", p.dp}, {"plan.tp", p.tp},
      {"plan.pp", p.pp}, {"plan.cp", p.cp},
      {"plan.ep", p.ep}, {"plan.expert_tp", p.expert_tp},
      {"plan.vp", p.vp}, {"plan.micro_batch_size", p.micro_batch_size}};
  bool ok = true;
  for (const auto& [path, v] : degrees) {
    if (v < 1) {
      c.fail(path, "must be >= 1, got " + s(v));
      ok = false;
    }
  }
  return ok;
}

void check_degrees(Checker& c, const Plan& p, const ModelSpec& m, const ClusterSpec& cl) {
  c.require(p.world_size() == cl.total_gpus(), "plan",
            "dp*tp*pp*cp = " + s(p.dp) + "*" + s(p.tp) + "*" + s(p.pp) + "*" + s(p.cp) + " = " +
                s(p.world_size()) + " but the cluster has " + s(cl.total_gpus()) + " GPUs (" +
                s(cl.num_nodes) + " nodes x " + s(cl.gpus_per_node) + ")");
  c.require(m.num_attention_heads % p.tp == 0, "plan.tp",
            s(p.tp) + " does not divide model.num_attention_heads " + s(m.num_attention_heads));
  if (m.attention == AttentionKind::kGQA)
    c.require(m.num_kv_heads % p.tp == 0, "plan.tp",
              s(p.tp) + " does not divide model.num_kv_heads " + s(m.num_kv_heads) +
                  " (each TP rank needs whole key/value groups)");
  // Megatron's column-parallel FFNs split their intermediate width over tp.
  bool has_dense_layer = false;
  for (int64_t l = 0; l < m.num_layers && !has_dense_layer; ++l)
    has_dense_layer = !m.is_moe_layer(l);
  if (has_dense_layer)
    c.require(m.ffn_hidden_size % p.tp == 0, "plan.tp",
              s(p.tp) + " does not divide model.ffn_hidden_size " + s(m.ffn_hidden_size));
  if (m.moe && m.moe->num_shared_experts > 0) {
    const int64_t shared = m.moe->num_shared_experts * m.moe->shared_expert_ffn_hidden_size;
    c.require(shared % p.tp == 0, "plan.tp",
              s(p.tp) + " does not divide the shared experts' width " + s(shared) +
                  " (num_shared_experts * shared_expert_ffn_hidden_size)");
  }
  c.require(int64_t{p.pp} * p.vp <= m.num_layers, "plan.pp",
            "pp*vp = " + s(int64_t{p.pp} * p.vp) + " exceeds model.num_layers " + s(m.num_layers));
}

void check_experts(Checker& c, const Plan& p, const ModelSpec& m, const ClusterSpec& cl) {
  if (!m.moe) {
    c.require(p.ep == 1, "plan.ep", "must be 1 for a dense model, got " + s(p.ep));
    c.require(p.expert_tp == 1, "plan.expert_tp",
              "must be 1 for a dense model, got " + s(p.expert_tp));
    c.require(p.expert_replicas.kind == ExpertReplicas::Kind::kNone, "plan.expert_replicas",
              "a dense model has no experts to replicate");
    c.require(p.dispatch == Dispatch::kAllToAll, "plan.dispatch",
              "a dense model dispatches no tokens; leave dispatch at its default");
    c.require(!p.capacity_factor, "plan.capacity_factor", "a dense model has no expert capacity");
    return;
  }
  const int64_t experts = m.moe->num_experts;
  c.require(experts % p.ep == 0, "plan.ep",
            s(p.ep) + " does not divide model.moe.num_experts " + s(experts));
  const int stage_ranks = p.tp * p.cp * p.dp;
  c.require(stage_ranks % (p.expert_tp * p.ep) == 0, "plan.ep",
            "expert_tp*ep = " + s(p.expert_tp) + "*" + s(p.ep) + " = " + s(p.expert_tp * p.ep) +
                " does not divide tp*cp*dp = " + s(stage_ranks) +
                " (the ranks of one pipeline stage, refolded for the expert layers)");
  if (p.expert_tp > 1)
    c.require(m.moe->expert_ffn_hidden_size % p.expert_tp == 0, "plan.expert_tp",
              s(p.expert_tp) + " does not divide model.moe.expert_ffn_hidden_size " +
                  s(m.moe->expert_ffn_hidden_size));

  if (p.dispatch == Dispatch::kPPMoEIndexSlice) {
    // Pipeline MoE: the experts live on the ranks of the TP group, which all hold every token.
    c.require(p.ep == p.tp, "plan.ep",
              "ppmoe_index_slice spreads the experts over the TP group: ep must equal tp, got ep " +
                  s(p.ep) + " and tp " + s(p.tp));
    c.require(p.tp <= cl.gpus_per_node, "plan.tp",
              "ppmoe_index_slice combines with an intra-node all-reduce: tp " + s(p.tp) +
                  " exceeds cluster.gpus_per_node " + s(cl.gpus_per_node));
    c.require(p.expert_tp == 1, "plan.expert_tp",
              "must be 1 with ppmoe_index_slice (each expert lives whole on one TP rank)");
    c.require(!p.sequence_parallel, "plan.sequence_parallel",
              "must be false with ppmoe_index_slice (every TP rank must hold all tokens)");
  } else if (p.tp > 1) {
    c.require(p.sequence_parallel, "plan.sequence_parallel",
              "must be true: Megatron-Core MoE with tp > 1 (tp = " + s(p.tp) +
                  ") requires sequence parallelism");
  }

  const ExpertReplicas& r = p.expert_replicas;
  if (r.kind != ExpertReplicas::Kind::kNone)
    c.require(p.ep > 1, "plan.expert_replicas",
              "replicas need expert parallelism (ep > 1), got ep " + s(p.ep));
  if (r.kind == ExpertReplicas::Kind::kHot) {
    c.require(r.hot_experts <= experts, "plan.expert_replicas.hot_experts",
              s(r.hot_experts) + " exceeds model.moe.num_experts " + s(experts));
    c.require(r.replicas <= p.ep, "plan.expert_replicas.replicas",
              s(r.replicas) + " copies exceed the " + s(p.ep) + " ranks of the EP group");
  } else if (r.kind == ExpertReplicas::Kind::kPerExpert) {
    c.require(static_cast<int64_t>(r.per_expert.size()) == experts,
              "plan.expert_replicas.per_expert",
              "has " + s(static_cast<int64_t>(r.per_expert.size())) +
                  " entries but the model has " + s(experts) + " experts");
    for (size_t i = 0; i < r.per_expert.size(); ++i)
      c.require(r.per_expert[i] <= p.ep, index_path("plan.expert_replicas.per_expert", i),
                s(r.per_expert[i]) + " copies exceed the " + s(p.ep) + " ranks of the EP group");
  }
}

void check_pipeline(Checker& c, const Plan& p, const ModelSpec& m, const Workload& w) {
  if (!p.stage_layers.empty()) {
    c.require(
        static_cast<int>(p.stage_layers.size()) == p.pp, "plan.stage_layers",
        "has " + s(static_cast<int64_t>(p.stage_layers.size())) + " stages but pp is " + s(p.pp));
    const int64_t sum = std::accumulate(p.stage_layers.begin(), p.stage_layers.end(), int64_t{0});
    c.require(sum == m.num_layers, "plan.stage_layers",
              "sums to " + s(sum) + " layers but the model has " + s(m.num_layers));
  }
  if (p.schedule == Schedule::kInterleaved1F1B) {
    c.require(p.vp >= 2, "plan.vp", "interleaved_1f1b needs vp >= 2, got " + s(p.vp));
    c.require(p.pp >= 2, "plan.pp", "interleaved_1f1b needs pp >= 2, got " + s(p.pp));
    if (p.vp >= 2 && (p.stage_layers.empty() || static_cast<int>(p.stage_layers.size()) == p.pp)) {
      const auto layers = resolve_stage_layers(p, m);
      for (size_t st = 0; st < layers.size(); ++st)
        if (layers[st] % p.vp != 0) {
          c.fail("plan.vp", "stage " + s(static_cast<int64_t>(st)) + " has " + s(layers[st]) +
                                " layers, not divisible into vp = " + s(p.vp) + " chunks");
          break;
        }
    }
  } else {
    c.require(p.vp == 1, "plan.vp",
              "virtual pipeline chunks need schedule \"interleaved_1f1b\", got vp " + s(p.vp) +
                  " with \"" + std::string(enum_name(p.schedule)) + "\"");
  }
  if (w.mode == Mode::kTrain) {
    const int64_t per_step = static_cast<int64_t>(p.micro_batch_size) * p.dp;
    if (w.global_batch_size % per_step != 0) {
      c.fail("workload.global_batch_size",
             s(w.global_batch_size) + " is not a multiple of micro_batch_size*dp = " +
                 s(p.micro_batch_size) + "*" + s(p.dp) + " = " + s(per_step));
    } else if (p.schedule == Schedule::kInterleaved1F1B) {
      const int64_t micro_batches = w.global_batch_size / per_step;
      c.require(micro_batches % p.pp == 0, "plan.schedule",
                "interleaved_1f1b needs the micro-batch count (" + s(micro_batches) +
                    ") to be a multiple of pp (" + s(p.pp) + ")");
    }
  }
  c.require(!(p.zero_stage >= 2 && p.pp > 1), "plan.zero_stage",
            "ZeRO stage " + s(p.zero_stage) +
                " cannot be combined with pipeline parallelism (pp = " + s(p.pp) +
                "); use stage 0 or 1");
}

void check_sequence(Checker& c, const Plan& p, const ModelSpec& m, const Workload& w) {
  const int64_t seq = w.effective_seq_len(m);
  if (p.cp > 1)
    c.require(seq % (2 * p.cp) == 0, "plan.cp",
              "context parallelism splits each sequence into 2*cp = " + s(2 * p.cp) +
                  " chunks, but seq_len " + s(seq) + " is not a multiple");
  if (p.sequence_parallel)
    c.require(seq % (p.tp * p.cp) == 0, "plan.sequence_parallel",
              "seq_len " + s(seq) + " is not a multiple of tp*cp = " + s(p.tp * p.cp));
}

void check_storage(Checker& c, const Plan& p, const ModelSpec& m, const ClusterSpec& cl,
                   const Workload& w) {
  const std::pair<const char*, Tier> classes[] = {
      {"dense_params", p.placement.dense_params},
      {"expert_params", p.placement.expert_params},
      {"gradients", p.placement.gradients},
      {"optimizer_states", p.placement.optimizer_states}};
  for (const auto& [name, tier] : classes)
    if (tier == Tier::kSSD)
      c.require(cl.host.ssd_bytes > 0, std::string("plan.placement.") + name,
                "\"ssd\" but cluster \"" + cl.name + "\" has no SSD (host.ssd_bytes = 0)");
  // Parameters and gradients kept off the GPU are updated where they live, by the host's Adam
  // (ZeRO-Offload, ZeRO-Infinity): a GPU optimizer would need them fetched and written back.
  const Placement& pl = p.placement;
  if (pl.optimizer_states == Tier::kGPU && w.mode == Mode::kTrain) {
    c.require(pl.dense_params == Tier::kGPU && pl.expert_params == Tier::kGPU,
              "plan.placement.optimizer_states",
              "\"gpu\", but parameters are placed off the GPU: they are updated where they live "
              "(the host's Adam), so the optimizer states go off the GPU too");
    c.require(pl.gradients == Tier::kGPU, "plan.placement.optimizer_states",
              "\"gpu\", but gradients are placed off the GPU: the host applies them, so the "
              "optimizer states go off the GPU too");
  }
  // Activation offloading would need copies out after each layer's forward and back before its
  // backward (and the KV cache's during decode); the lowering has none, so it is not a choice.
  c.require(p.placement.activations == Tier::kGPU, "plan.placement.activations",
            "must be \"gpu\": moving activations (or the KV cache) between tiers is not modelled; "
            "place parameters, gradients or optimizer states off the GPU instead");
  if (!m.moe && p.placement.expert_params != Tier::kGPU)
    c.fail("plan.placement.expert_params", "a dense model has no expert parameters to place");
  if (p.delayed_update) {
    c.require(p.placement.optimizer_states != Tier::kGPU, "plan.delayed_update",
              "delays the host's optimizer step, but placement.optimizer_states is \"gpu\"");
    c.require(w.mode == Mode::kTrain, "plan.delayed_update",
              "is a training option; the workload's mode is \"inference\"");
  }

  if (p.prefetch.direction != PrefetchDirection::kNone) {
    // Ring-memory inference keeps every parameter in host memory: prefetching overlaps the ring.
    const bool off_gpu =
        any_on(p.placement, Tier::kCPU) || any_on(p.placement, Tier::kSSD) || p.ring_sections > 0;
    c.require(off_gpu, "plan.prefetch",
              "prefetch needs a tensor class placed on \"cpu\" or \"ssd\" (or ring sections); "
              "everything is on the GPU");
    const bool down = p.prefetch.direction == PrefetchDirection::kDown ||
                      p.prefetch.direction == PrefetchDirection::k2D;
    if (down)
      c.require(any_on(p.placement, Tier::kSSD), "plan.prefetch.direction",
                "\"" + std::string(enum_name(p.prefetch.direction)) +
                    "\" prefetches down from the SSD, but nothing is placed on \"ssd\"");
    c.require(p.prefetch.depth <= m.num_layers, "plan.prefetch.depth",
              s(p.prefetch.depth) + " exceeds model.num_layers " + s(m.num_layers));
  }

  if (p.ring_sections > 0) {
    c.require(w.mode == Mode::kInference, "plan.ring_sections",
              "ring-memory sections are for inference; the workload's mode is \"train\"");
    c.require(p.ring_sections <= m.num_layers, "plan.ring_sections",
              s(p.ring_sections) + " sections exceed model.num_layers " + s(m.num_layers));
    c.require(p.world_size() <= cl.gpus_per_node, "plan.ring_sections",
              "ring-memory inference runs inside one node, but the plan spans " +
                  s(p.world_size()) + " GPUs (gpus_per_node " + s(cl.gpus_per_node) + ")");
  }
}

void check_workload(Checker& c, const ModelSpec& m, const ClusterSpec& cl, const Workload& w) {
  if (cl.gpu.peak_flops(w.precision) <= 0)
    c.fail("workload.precision",
           std::string(enum_name(w.precision)) + " but cluster GPU " + cl.gpu.name + " has no " +
               std::string(enum_name(w.precision)) + " units (cluster.gpu.peak_flops." +
               std::string(enum_name(w.precision)) + " = 0)");
  if (w.routing.kind == RoutingKind::kHistogram && m.moe)
    c.require(static_cast<int64_t>(w.routing.tokens_per_expert.size()) == m.moe->num_experts,
              "workload.routing.tokens_per_expert",
              "has " + s(static_cast<int64_t>(w.routing.tokens_per_expert.size())) +
                  " entries but the model has " + s(m.moe->num_experts) + " experts");
  if (m.moe && !w.routing.per_layer.empty()) {
    c.require(static_cast<int64_t>(w.routing.per_layer.size()) == m.num_moe_layers(),
              "workload.routing.per_layer",
              "has " + s(static_cast<int64_t>(w.routing.per_layer.size())) +
                  " histograms but the model has " + s(m.num_moe_layers()) + " MoE layers");
    for (size_t i = 0; i < w.routing.per_layer.size(); ++i)
      c.require(static_cast<int64_t>(w.routing.per_layer[i].size()) == m.moe->num_experts,
                index_path("workload.routing.per_layer", i),
                "has " + s(static_cast<int64_t>(w.routing.per_layer[i].size())) +
                    " entries but the model has " + s(m.moe->num_experts) + " experts");
  }
  if (w.routing.kind != RoutingKind::kUniform && !m.moe)
    c.fail("workload.routing", "skewed routing needs an MoE model");
  for (size_t i = 0; i < w.task_routing.size(); ++i) {
    const TaskRouting& t = w.task_routing[i];
    const std::string path = index_path("workload.task_routing", i);
    bool found = false;
    for (const auto& task : m.tasks) found = found || task.name == t.task;
    c.require(found, path + ".task",
              "\"" + t.task + "\" is not a task of model \"" + m.name + "\"");
    if (t.routing.kind == RoutingKind::kHistogram && m.moe)
      c.require(static_cast<int64_t>(t.routing.tokens_per_expert.size()) == m.moe->num_experts,
                path + ".routing.tokens_per_expert",
                "has " + s(static_cast<int64_t>(t.routing.tokens_per_expert.size())) +
                    " entries but the model has " + s(m.moe->num_experts) + " experts");
  }
}

}  // namespace

std::vector<ConfigIssue> validate(const Plan& plan, const ModelSpec& model,
                                  const ClusterSpec& cluster, const Workload& workload) {
  std::vector<ConfigIssue> out;
  Checker c(out);
  if (!check_positive(c, plan)) return out;
  check_degrees(c, plan, model, cluster);
  check_experts(c, plan, model, cluster);
  check_pipeline(c, plan, model, workload);
  check_sequence(c, plan, model, workload);
  check_storage(c, plan, model, cluster, workload);
  check_workload(c, model, cluster, workload);
  return out;
}

}  // namespace switchyard
