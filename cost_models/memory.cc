#include "cost_models/memory.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/expert_load.h"
#include "core/step_program.h"
#include "cost_models/compute.h"

namespace switchyard {

TierBytes MemoryBreakdown::total() const {
  TierBytes t;
  for (const auto& part : memory_parts(*this)) t += *part.second;
  return t;
}

std::array<std::pair<const char*, const TierBytes*>, 10> memory_parts(const MemoryBreakdown& m) {
  return {{{"dense params", &m.dense_params},
           {"expert params", &m.expert_params},
           {"gradients", &m.gradients},
           {"optimizer", &m.optimizer_states},
           {"activations", &m.activations},
           {"kv cache", &m.kv_cache},
           {"dispatch", &m.dispatch_buffers},
           {"comm buffers", &m.comm_buffers},
           {"prefetch", &m.prefetch_buffers},
           {"runtime", &m.runtime}}};
}

std::string gpu_parts_gib(const MemoryBreakdown& m) {
  std::string out;
  for (const auto& [name, bytes] : memory_parts(m)) {
    if (bytes->gpu <= 0) continue;
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s%s %.2f", out.empty() ? "" : ", ", name,
                  bytes->gpu / double(int64_t{1} << 30));
    out += buf;
  }
  return out + " GiB";
}

StateBytes state_bytes_per_param(Precision p, Precision moments) {
  const double moment_bytes = moments == Precision::kBF16 ? 2.0 : 4.0;
  if (p == Precision::kFP32 || p == Precision::kTF32) return {4, 4, 2 * moment_bytes};
  // bf16 and fp8 training keep bf16 weights and gradients (fp8 copies are transient), fp32 master
  // weights, and the moments in their own precision.
  return {2, 2, 4 + 2 * moment_bytes};
}

double in_flight_micro_batches(const Plan& plan, int64_t num_micro_batches, int stage) {
  const double m = static_cast<double>(std::max<int64_t>(num_micro_batches, 1));
  const int pp = std::max(plan.pp, 1);
  switch (plan.schedule) {
    case Schedule::kGPipe:
      return m;
    case Schedule::k1F1B:
      return std::min(static_cast<double>(pp - stage), m);
    case Schedule::kInterleaved1F1B: {
      const double vp = std::max(plan.vp, 1);
      const double chunks = std::min(2.0 * (pp - stage - 1) + (vp - 1) * pp + 1, m * vp);
      return chunks / vp;
    }
  }
  return m;
}

double expert_buffer_rows_factor(const ModelSpec& m, const Plan& plan, const Workload& w) {
  // With a capacity factor, dispatch buffers and expert inputs are padded to capacity (GShard,
  // DeepSpeed-MoE): capacity_factor times a balanced share whatever the routing. Dropless buffers
  // hold what the most loaded rank really receives.
  if (plan.capacity_factor) return *plan.capacity_factor;
  return expert_rank_load_factor(m, plan, w);
}

namespace {

double activation_element_bytes(Precision p) { return p == Precision::kFP32 ? 4.0 : 2.0; }

}  // namespace

double activation_bytes_per_token(const ModelSpec& m, const Plan& plan, Precision p, bool moe_layer,
                                  double load_factor) {
  // a: bytes of an activation; g: bytes of a saved GEMM input (FP8 training keeps the FP8 copy
  // its GEMMs consumed: Transformer Engine, DeepSeek-V3 section 3.3).
  const double a = activation_element_bytes(p);
  const double g = p == Precision::kFP8 ? 1.0 : a;
  const double h = static_cast<double>(m.hidden_size);
  const double tp = plan.tp;
  const double sp_div = plan.sequence_parallel ? tp : 1.0;
  const bool selective = plan.recompute == Recompute::kSelective;
  const double heads = static_cast<double>(m.num_attention_heads);
  // Residual inputs of the two sub-blocks; the two norm outputs feed GEMMs (recomputed under
  // selective recompute).
  double bytes = (2.0 * h * a + (selective ? 0.0 : 2.0 * h * g)) / sp_div;
  // Attention keeps what flash attention's backward reads (Q, K, V, the fp32 log-sum-exp per head)
  // and the core's output, the input of the output projection. MLA keeps its latents (inputs of the
  // up-projections); selective recompute re-runs the up-projections instead of keeping Q, K, V
  // (DeepSeek-V3, Megatron-Core recompute_modules "mla_up_proj").
  double attn = 4.0 * heads;
  if (m.attention == AttentionKind::kMLA) {
    const MlaSpec& ml = m.mla;
    const double qk = static_cast<double>(ml.qk_nope_head_dim + ml.qk_rope_head_dim);
    const double v = static_cast<double>(ml.v_head_dim);
    attn += static_cast<double>(ml.q_lora_rank + ml.kv_lora_rank + ml.qk_rope_head_dim) * g *
            tp;  // replicated
    if (!selective) attn += heads * (2.0 * qk + v) * a;
    attn += heads * v * g;
  } else {
    const double hd = static_cast<double>(m.head_dim);
    attn += (heads + 2.0 * static_cast<double>(m.num_kv_heads)) * hd * a + heads * hd * g;
  }
  bytes += attn / tp;
  // FFNs: SwiGLU keeps gate and up outputs (GeLU/ReLU the FC1 output) and the activation output
  // (the FC2 input; recomputed under selective recompute).
  const double fc1_out = m.ffn_matrices() == 3 ? 2.0 : 1.0;
  auto ffn_row = [&](double width) { return width * (fc1_out * a + (selective ? 0.0 : g)); };
  if (moe_layer && m.moe) {
    const double k = static_cast<double>(m.moe->top_k);
    const double fe = static_cast<double>(m.moe->expert_ffn_hidden_size);
    const double etp = plan.expert_tp;
    bytes += 4.0 * static_cast<double>(m.moe->num_experts) / sp_div;  // router logits, fp32
    // Rows this rank's experts see per token of its micro-batch share: top_k of them, balanced,
    // times the load factor of the most loaded rank; with expert_tp the rows are all-gathered over
    // the expert-TP group (each rank computes fe / expert_tp columns of all of them). PPMoE ranks
    // hold every token but serve 1/ep of the experts. Each row keeps its permuted input (an FC1
    // input), the FFN internals and the expert's output (the combine's backward needs it).
    const double rows =
        (plan.dispatch == Dispatch::kPPMoEIndexSlice ? k / plan.ep : k / sp_div) * etp;
    bytes += rows * load_factor * (h * g + ffn_row(fe / etp) + h * a);
    const double fs = static_cast<double>(m.moe->shared_expert_ffn_hidden_size);
    bytes += static_cast<double>(m.moe->num_shared_experts) * ffn_row(fs / tp);
  } else {
    bytes += ffn_row(static_cast<double>(m.ffn_hidden_size) / tp);
  }
  return bytes;
}

namespace {

struct StageParams {
  double dense = 0;  // per GPU, before ZeRO sharding
  double expert = 0;
  double max_layer_dense = 0;  // one layer's dense params per GPU (working buffers)
  double max_layer_expert = 0;
  double max_layer_total = 0;      // the largest layer's dense and expert params together
  double outside_layers = 0;       // the embedding and the head (with the final norm), in `dense`
  double embedding = 0, head = 0;  // of those, what the first stage's embedding and the last
                                   // stage's head (with the final norm) hold
  // The largest dense part of a unit the runner moves whole (a layer, the embedding, the head).
  double max_dense_unit() const { return std::max({max_layer_dense, embedding, head}); }
  std::vector<bool> moe_layers;  // of this stage
};

// `extra_copies`: the copies of replicated experts on the rank that holds the most of them.
StageParams stage_params(const ModelSpec& m, const Plan& plan, int stage, int64_t extra_copies) {
  StageParams sp;
  const std::vector<int> layers = resolve_stage_layers(plan, m);
  const int first = std::accumulate(layers.begin(), layers.begin() + stage, 0);
  const double tp = plan.tp;
  const double h = static_cast<double>(m.hidden_size);
  const double v = static_cast<double>(m.vocab_size);
  for (int l = first; l < first + layers[stage]; ++l) {
    const bool moe = m.is_moe_layer(l);
    sp.moe_layers.push_back(moe);
    double dense = static_cast<double>(attention_params_per_layer(m)) / tp +
                   static_cast<double>(norm_params_per_layer(m));
    double expert = 0;
    if (moe) {
      dense += static_cast<double>(m.moe->num_shared_experts * shared_expert_params(m)) / tp +
               static_cast<double>(m.num_gates() * m.hidden_size * m.moe->num_experts);
      const double local_experts =
          static_cast<double>(m.moe->num_experts) / plan.ep + static_cast<double>(extra_copies);
      expert = local_experts * static_cast<double>(expert_params(m)) / plan.expert_tp;
    } else {
      dense += static_cast<double>(dense_ffn_params(m)) / tp;
    }
    sp.dense += dense;
    sp.expert += expert;
    sp.max_layer_dense = std::max(sp.max_layer_dense, dense);
    sp.max_layer_expert = std::max(sp.max_layer_expert, expert);
    sp.max_layer_total = std::max(sp.max_layer_total, dense + expert);
  }
  if (stage == 0)
    sp.embedding =
        v * h / tp + (m.learned_position_embeddings ? static_cast<double>(m.seq_len) * h : 0);
  if (stage == plan.pp - 1) {
    // An untied LM head, or a tied one's copy on the last stage of a pipeline.
    if (!m.tied_embeddings || plan.pp > 1) sp.head += v * h / tp;
    sp.head += (m.norm == NormKind::kLayerNorm ? 2.0 : 1.0) * h;  // final norm
  }
  sp.outside_layers = sp.embedding + sp.head;
  sp.dense += sp.outside_layers;
  return sp;
}

// Puts `bytes` on the tier `t`.
TierBytes on(Tier t, double bytes) {
  TierBytes b;
  (t == Tier::kGPU ? b.gpu : t == Tier::kCPU ? b.cpu : b.ssd) = bytes;
  return b;
}

}  // namespace

DynamicTensorBytes dynamic_tensor_bytes(const ModelSpec& m, const Plan& plan, const Workload& w) {
  DynamicTensorBytes d;
  const double tokens = static_cast<double>(plan.micro_batch_size) *
                        static_cast<double>(w.effective_seq_len(m)) / plan.cp;
  const double load = expert_buffer_rows_factor(m, plan, w);
  const double e = w.precision == Precision::kFP32 ? 4.0 : 2.0;
  const double h = static_cast<double>(m.hidden_size);
  d.dense_layer_activations =
      tokens * activation_bytes_per_token(m, plan, w.precision, false, load);
  d.moe_layer_activations = tokens * activation_bytes_per_token(m, plan, w.precision, true, load);
  d.layer_input = e * tokens * h / (plan.sequence_parallel ? plan.tp : 1);
  d.logits = tokens * static_cast<double>(m.vocab_size) / plan.tp * 4.0;
  if (m.moe) {
    if (plan.dispatch == Dispatch::kPPMoEIndexSlice) {
      d.dispatch = tokens * h * e;  // the combine's all-reduce buffer
    } else {
      const double rows = static_cast<double>(m.moe->top_k) * tokens * load /
                          (plan.sequence_parallel ? plan.tp : 1);
      d.dispatch = 2.0 * rows * h * e;  // all-to-all send and receive (the bf16 combine's)
      if (plan.dispatch == Dispatch::kHierarchicalAllToAll) d.dispatch *= 2.0;  // transform staging
      if (plan.expert_tp > 1) d.dispatch += plan.expert_tp * rows * h * e;      // expert-TP gather
    }
  }
  return d;
}

MemoryBreakdown memory_per_gpu(const ModelSpec& m, const ClusterSpec& /*cluster*/, const Plan& plan,
                               const Workload& w, const CostProfile& prof, int stage) {
  if (stage < 0 || stage >= std::max(plan.pp, 1))
    throw std::out_of_range("memory_per_gpu: stage " + std::to_string(stage) +
                            " of a plan with pp " + std::to_string(plan.pp));
  MemoryBreakdown mb;
  mb.stage = stage;
  const bool train = w.mode == Mode::kTrain;
  // Elastic replicas: the rank holding the most expert copies (where the placement put them).
  int64_t extra_copies = 0;
  if (m.moe && plan.ep > 0 && plan.expert_replicas.kind != ExpertReplicas::Kind::kNone) {
    size_t most = 0;
    for (const RankExperts& r : expert_rank_loads(m, plan, w))
      most = std::max(most, r.copies.size());
    extra_copies = std::max<int64_t>(
        0, static_cast<int64_t>(most) - std::max<int64_t>(m.moe->num_experts / plan.ep, 1));
  }
  const StageParams sp = stage_params(m, plan, stage, extra_copies);
  const StateBytes sb = state_bytes_per_param(w.precision, w.optimizer_moments);
  const double dense_shard = static_cast<double>(plan.dp) * plan.cp;
  const double expert_shard = std::max(plan.expert_dp(), 1);
  const Placement& pl = plan.placement;
  const double working_layers = 1.0 + plan.prefetch.depth;
  const double param_bytes = train ? sb.param : bytes_per_element(w.precision);

  // Parameters (ZeRO-3 shards them; the gathered working layers count as prefetch buffers).
  const double z3 = train && plan.zero_stage >= 3;
  const double dense_p = sp.dense * param_bytes / (z3 ? dense_shard : 1.0);
  const double expert_p = sp.expert * param_bytes / (z3 ? expert_shard : 1.0);
  if (plan.ring_sections > 0 && !train) {
    // Ring-memory inference: the layers' parameters live in host memory and stream through a
    // ring of layer slots on the GPU, one for the layer computing and one per layer loading ahead
    // (core's ring_ahead_layers); the embedding and the head stay on the GPU.
    const double outside = sp.outside_layers * param_bytes;
    mb.dense_params = on(Tier::kCPU, dense_p - outside);
    mb.dense_params.gpu += outside;
    mb.expert_params = on(Tier::kCPU, expert_p);
    const double slots = std::min<double>(static_cast<double>(sp.moe_layers.size()),
                                          1.0 + ring_ahead_layers(m, plan));
    mb.prefetch_buffers.gpu += slots * sp.max_layer_total * param_bytes;
  } else {
    mb.dense_params = on(pl.dense_params, dense_p);
    mb.expert_params = on(pl.expert_params, expert_p);
    // Offloaded parameters land in GPU slots: one for the unit computing and one per unit its
    // copy runs ahead of; SSD-resident ones pass through host staging, as far ahead as the SSD
    // reads run (core's fetch_leads). With the dense parameters off the GPU the embedding and the
    // head are units too, and may be the largest. ZeRO-3 holds 1 + prefetch.depth gathered units
    // (its fetches bring only the rank's shard, gathered into them).
    const FetchLeads leads = fetch_leads(m, plan);
    const double slots = 1.0 + leads.pcie, staging = 1.0 + leads.ssd;
    const double dense_unit = sp.max_dense_unit();
    if (z3) {
      // (The embedding and the head are gathered like layers, and may be the largest unit.)
      mb.prefetch_buffers.gpu +=
          working_layers * std::max(sp.max_layer_dense + sp.max_layer_expert, sp.max_dense_unit()) *
          param_bytes;
    } else {
      if (pl.dense_params != Tier::kGPU)
        mb.prefetch_buffers.gpu += slots * dense_unit * param_bytes;
      if (pl.expert_params != Tier::kGPU)
        mb.prefetch_buffers.gpu += slots * sp.max_layer_expert * param_bytes;
    }
    // SSD-resident parameters pass through host staging on their way (ZeRO-3: the shard only).
    if (pl.dense_params == Tier::kSSD)
      mb.prefetch_buffers.cpu += staging * dense_unit * param_bytes / (z3 ? dense_shard : 1.0);
    if (pl.expert_params == Tier::kSSD)
      mb.prefetch_buffers.cpu +=
          staging * sp.max_layer_expert * param_bytes / (z3 ? expert_shard : 1.0);
  }

  if (train) {
    const double grad_div_d = plan.zero_stage >= 2 ? dense_shard : 1.0;
    const double grad_div_e = plan.zero_stage >= 2 ? expert_shard : 1.0;
    mb.gradients =
        on(pl.gradients, sp.dense * sb.grad / grad_div_d + sp.expert * sb.grad / grad_div_e);
    const double opt_div_d = plan.zero_stage >= 1 ? dense_shard : 1.0;
    const double opt_div_e = plan.zero_stage >= 1 ? expert_shard : 1.0;
    mb.optimizer_states = on(pl.optimizer_states, sp.dense * sb.optimizer / opt_div_d +
                                                      sp.expert * sb.optimizer / opt_div_e);
    // Off-GPU optimizer states: the host receives the gradients it updates with and, for the
    // parameters that stay on the GPU in full precision, keeps the master copy it updates (mixed
    // precision keeps one among the states already).
    // A delayed update reads its own copy of the gradients, and (full precision) updates a master
    // copy of every parameter, while the next step computes with the values and makes new
    // gradients.
    if (pl.optimizer_states != Tier::kGPU) {
      const bool delayed = plan.delayed_update;
      mb.optimizer_states.cpu +=
          (pl.gradients == Tier::kGPU || delayed
               ? (sp.dense / opt_div_d + sp.expert / opt_div_e) * sb.grad
               : 0.0) +
          (sb.param == 4
               ? ((pl.dense_params == Tier::kGPU || delayed ? sp.dense / opt_div_d : 0) +
                  (pl.expert_params == Tier::kGPU || delayed ? sp.expert / opt_div_e : 0)) *
                     sb.param
               : 0);
    }
    // Off-GPU gradients: a unit's backward accumulates into one of two GPU slots while the other
    // goes down through a host buffer to the gradients' home.
    if (pl.gradients != Tier::kGPU) {
      const double unit = sp.max_dense_unit() + sp.max_layer_expert;
      mb.prefetch_buffers.gpu += 2.0 * unit * sb.grad;
      mb.prefetch_buffers.cpu += 2.0 * unit * sb.grad;
    }
    // SSD-resident optimizer states are staged through DRAM a few layers (of this rank's shard)
    // at a time; host Adam updates them there.
    if (pl.optimizer_states == Tier::kSSD)
      mb.prefetch_buffers.cpu += working_layers * sb.optimizer *
                                 (sp.max_layer_dense / opt_div_d + sp.max_layer_expert / opt_div_e);
    // Gradient buckets: one being filled, one in flight; offloaded gradients stream out through
    // them (and through as many host buffers on their way to an SSD).
    const double buckets = 2.0 * static_cast<double>(plan.grad_bucket_bytes);
    mb.comm_buffers.gpu += buckets;
    if (pl.gradients == Tier::kSSD) mb.comm_buffers.cpu += buckets;
  }

  // Activations and dispatch buffers.
  const double load = expert_buffer_rows_factor(m, plan, w);
  const double e_act = w.precision == Precision::kFP32 ? 4.0 : 2.0;
  if (train) {
    const DynamicTensorBytes dyn = dynamic_tensor_bytes(m, plan, w);
    double stack = 0, widest = 0;
    for (bool moe : sp.moe_layers) {
      const double layer = moe ? dyn.moe_layer_activations : dyn.dense_layer_activations;
      widest = std::max(widest, layer);
      stack += plan.recompute == Recompute::kFull ? dyn.layer_input : layer;
    }
    const int64_t micro_batches =
        w.global_batch_size / std::max<int64_t>(int64_t{plan.micro_batch_size} * plan.dp, 1);
    mb.in_flight_micro_batches = in_flight_micro_batches(plan, micro_batches, stage);
    double act = stack * mb.in_flight_micro_batches;
    if (plan.recompute == Recompute::kFull) act += widest;  // one layer recomputed at a time
    // The logits on the last stage wait for their micro-batch's backward: one at a time with
    // 1F1B (interleaved too: the head's chunk runs forward then backward in the steady state),
    // every micro-batch's under GPipe (all forwards first).
    if (stage == plan.pp - 1)
      act += dyn.logits *
             (plan.schedule == Schedule::kGPipe ? static_cast<double>(micro_batches) : 1.0);
    mb.activations.gpu = act;  // (validate keeps activations on the GPU)
    mb.dispatch_buffers.gpu = dyn.dispatch;
  } else if (w.inference) {
    const InferenceSpec& inf = *w.inference;
    const double batch = static_cast<double>(std::max(inf.prefill_batch, inf.decode_batch));
    const double ctx = static_cast<double>(inf.prompt_len + inf.decode_tokens);
    double per_token_layer = 0;
    if (m.attention == AttentionKind::kMLA) {
      per_token_layer = static_cast<double>(m.mla.kv_lora_rank + m.mla.qk_rope_head_dim) * e_act;
    } else {
      const double kv_per_rank = std::max(static_cast<double>(m.num_kv_heads) / plan.tp, 1.0);
      per_token_layer = 2.0 * kv_per_rank * static_cast<double>(m.head_dim) * e_act;
    }
    const double kv = static_cast<double>(batch) / plan.dp * ctx * per_token_layer *
                      static_cast<double>(sp.moe_layers.size());
    mb.kv_cache.gpu = kv;
    // Working activations of the widest layer for one prefill micro-batch.
    const double tokens =
        static_cast<double>(inf.prefill_batch) / plan.dp * static_cast<double>(inf.prompt_len);
    double widest = 0;
    for (bool moe : sp.moe_layers)
      widest =
          std::max(widest, tokens * activation_bytes_per_token(m, plan, w.precision, moe, load));
    mb.activations.gpu = widest;
    mb.in_flight_micro_batches = 1;
  }
  mb.runtime.gpu = static_cast<double>(prof.runtime_reserved_bytes);
  return mb;
}

MemoryBreakdown peak_memory_per_gpu(const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                                    const Workload& w, const CostProfile& prof) {
  MemoryBreakdown best;
  double best_gpu = -1;
  for (int s = 0; s < std::max(plan.pp, 1); ++s) {
    MemoryBreakdown mb = memory_per_gpu(m, c, plan, w, prof, s);
    if (mb.total().gpu > best_gpu) {
      best_gpu = mb.total().gpu;
      best = mb;
    }
  }
  return best;
}

namespace {

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(int64_t{1} << 30));
  return buf;
}

}  // namespace

std::vector<ConfigIssue> capacity_issues(const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                                         const Workload& w, const CostProfile& prof) {
  std::vector<ConfigIssue> out;
  MemoryBreakdown worst_gpu, worst_cpu, worst_ssd;
  double gpu = -1, cpu = -1, ssd = -1;
  for (int s = 0; s < std::max(plan.pp, 1); ++s) {
    const MemoryBreakdown mb = memory_per_gpu(m, c, plan, w, prof, s);
    const TierBytes t = mb.total();
    if (t.gpu > gpu) gpu = t.gpu, worst_gpu = mb;
    if (t.cpu > cpu) cpu = t.cpu, worst_cpu = mb;
    if (t.ssd > ssd) ssd = t.ssd, worst_ssd = mb;
  }
  // Ring-memory inference keeps the weights in host memory and sizes the GPU's slots by its
  // sections: the section count is the setting to change where the slots are what overflows;
  // otherwise the plan as a whole (GPU) or its placement (host tiers) is.
  const double hbm = static_cast<double>(c.gpu.hbm_bytes);
  const bool ring_slots_overflow = plan.ring_sections > 0 && worst_gpu.prefetch_buffers.gpu > 0 &&
                                   gpu - worst_gpu.prefetch_buffers.gpu <= hbm;
  const std::string gpu_path = ring_slots_overflow ? "plan.ring_sections" : "plan";
  // (A ring keeps all the weights in host memory whatever its section count.)
  const std::string host_path = plan.ring_sections > 0 ? "plan" : "plan.placement";
  if (gpu > hbm) {
    const MemoryBreakdown& mb = worst_gpu;
    out.push_back({gpu_path, "does not fit: stage " + std::to_string(mb.stage) + " needs " +
                                 gib(gpu) + " per GPU (" + gpu_parts_gib(mb) + ") but " +
                                 c.gpu.name + " has " + gib(hbm)});
  }
  const double per_node = c.gpus_per_node;
  if (cpu * per_node > static_cast<double>(c.host.dram_bytes))
    out.push_back({host_path, "host memory does not fit: " + std::to_string(c.gpus_per_node) +
                                  " GPUs x " + gib(cpu) + " (stage " +
                                  std::to_string(worst_cpu.stage) + ") = " + gib(cpu * per_node) +
                                  " but a node has " + gib(static_cast<double>(c.host.dram_bytes)) +
                                  " of DRAM"});
  if (ssd * per_node > static_cast<double>(c.host.ssd_bytes))
    out.push_back({host_path, "SSD does not fit: " + std::to_string(c.gpus_per_node) + " GPUs x " +
                                  gib(ssd) + " (stage " + std::to_string(worst_ssd.stage) +
                                  ") = " + gib(ssd * per_node) + " but a node has " +
                                  gib(static_cast<double>(c.host.ssd_bytes)) + " of SSD"});
  return out;
}

}  // namespace switchyard
