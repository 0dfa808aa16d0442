#include "executor/moe_trainer.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <future>
#include <numeric>
#include <optional>
#include <stdexcept>

#include "core/step_program.h"
#include "executor/copy_engine.h"
#include "executor/counter_random.h"
#include "executor/host_kernels.h"
#include "executor/model_shape.h"
#include "executor/timed.h"

namespace switchyard {
namespace {

// Activations of one rank, counted in the device tier.
struct Tensor {
  Buffer buf;
  size_t size = 0;
  float* p() const { return buf.as<float>(); }
};

}  // namespace

float init_value(uint64_t seed, const std::string& name, size_t index, float std) {
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, "_norm") == 0) return 1.0f;
  // Box-Muller on two counter-based uniforms: the same value for the same (seed, name, index).
  const uint64_t base = splitmix64(seed ^ name_hash(name)) ^ (index * 0x2545f4914f6cdd1dull);
  const double u1 = uniform01(splitmix64(base)), u2 = uniform01(splitmix64(base ^ 0x5bd1e995));
  return static_cast<float>(std * std::sqrt(-2.0 * std::log(u1)) *
                            std::cos(6.283185307179586 * u2));
}

void init_values(uint64_t seed, const std::string& name, const std::vector<size_t>& global_index,
                 size_t n, float std, float* out) {
  parallel_for(n, size_t{1} << 18, 0, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i)
      out[i] = init_value(seed, name, global_index.empty() ? i : global_index[i], std);
  });
}

std::vector<ConfigIssue> trainer_unsupported(const ModelSpec& m, const Plan& p) {
  std::vector<ConfigIssue> out;
  auto no = [&out](std::string path, std::string why) {
    out.push_back({std::move(path), "the CPU runner does not run this yet: " + std::move(why)});
  };
  if (m.attention != AttentionKind::kGQA || m.num_kv_heads != m.num_attention_heads)
    no("model.num_kv_heads", "only multi-head attention (num_kv_heads = num_attention_heads)");
  if (m.activation != Activation::kSwiGLU) no("model.activation", "only swiglu");
  if (m.norm != NormKind::kRMSNorm) no("model.norm", "only rmsnorm");
  if (m.tied_embeddings || m.learned_position_embeddings)
    no("model.tied_embeddings", "untied embeddings without learned positions only");
  if (m.moe && m.moe->num_shared_experts > 0)
    no("model.moe.num_shared_experts", "no shared experts");
  if (!m.tasks.empty()) no("model.tasks", "no multi-task gates");
  if (p.tp > 1 && p.sequence_parallel && p.capacity_factor)
    no("plan.capacity_factor",
       "capacity per sequence-parallel slice (the one-process reference cannot drop alike)");
  if (p.cp > 1) no("plan.cp", "context parallelism");
  if (p.expert_tp > 1) no("plan.expert_tp", "expert tensor parallelism");
  if (p.zero_stage > 1) no("plan.zero_stage", "ZeRO stages 0 and 1");
  if (p.expert_replicas.kind != ExpertReplicas::Kind::kNone && p.dispatch != Dispatch::kAllToAll)
    no("plan.expert_replicas", "replicas with the flat all_to_all dispatch only");
  const Placement& pl = p.placement;
  if (pl.gradients != Tier::kGPU && pl.optimizer_states == Tier::kGPU)
    no("plan.placement.optimizer_states",
       "off-device gradients are applied on the host: optimizer states off the device too");
  if (pl.activations != Tier::kGPU)
    no("plan.placement.activations", "activations on the device tier");
  const bool params_off = pl.dense_params != Tier::kGPU || pl.expert_params != Tier::kGPU;
  if (params_off && pl.optimizer_states == Tier::kGPU)
    no("plan.placement.optimizer_states",
       "off-device parameters are updated where they live: optimizer states off the device too");
  if ((params_off || pl.optimizer_states != Tier::kGPU || pl.gradients != Tier::kGPU) &&
      p.zero_stage > 0)
    no("plan.zero_stage", "offloaded parameters, gradients or optimizer states with ZeRO stage 0");
  if (p.recompute != Recompute::kNone) no("plan.recompute", "no recompute");
  return out;
}

struct MoeTrainer::Impl : ModelShape {
  ModelSpec m;
  TrainSettings s;
  Device& dev;
  TrainGroups g;
  int seq = 0;
  // Megatron's vocab-parallel embedding and LM head under TP: this rank's rows of the vocabulary.
  int vocab_local = 0, vocab_first = 0;
  int local_experts = 0, first_expert = 0;
  // The experts of this rank's slots (local_experts of them; contiguous from first_expert unless
  // the plan replicates hot experts). With replicas: every EP rank's slots, each expert's copies
  // (EP ranks, home first), and per replicated expert this rank holds, the group of its copies.
  std::vector<int> slot_expert;
  std::vector<std::vector<int>> rank_slots, copies_of;
  std::vector<std::pair<int, std::unique_ptr<Communicator>>> replica_groups;
  bool replicated() const { return !rank_slots.empty(); }
  int layer_begin = 0, layer_end = 0;  // the layers forward() and backward() run: one chunk's
  // This stage's chunks (model chunks of the interleaved schedule; one otherwise): [begin, end).
  std::vector<std::pair<int, int>> chunks;
  int tp = 1, tp_rank = 0;  // tensor parallel
  int heads_local = 0, h_local = 0, ffn_local = 0;
  bool ppmoe = false;
  // Sums a tensor-parallel partial result over the TP group (no-op without TP).
  void tp_sum(float* data, size_t n) {
    if (tp > 1) g.tp->all_reduce(data, n, DType::kFloat32, ReduceOp::kSum);
  }
  // Sequence parallelism (Megatron-Core's TP with all-to-all dispatch): outside the TP regions each
  // TP rank holds 1/tp of a micro-batch's tokens (a contiguous slice); entering a column-parallel
  // GEMM all-gathers them, leaving a row-parallel one reduce-scatters the partial sums.
  bool sp = false;
  int local_tokens(int T) const { return sp ? T / tp : T; }
  // [T/tp, width] slices of every TP rank -> [T, width].
  Tensor tp_gather(const float* local, int T, int width, const char* what) {
    Tensor full = alloc(static_cast<size_t>(T) * width, what);
    g.tp->all_gather(local, full.p(), static_cast<size_t>(local_tokens(T)) * width,
                     DType::kFloat32);
    return full;
  }
  // [T, width] partial sums -> this rank's [T/tp, width] slice of their sum.
  Tensor tp_scatter(const float* partial, int T, int width, const char* what) {
    Tensor local = alloc(static_cast<size_t>(local_tokens(T)) * width, what);
    g.tp->reduce_scatter(partial, local.p(), static_cast<size_t>(local_tokens(T)) * width,
                         DType::kFloat32, ReduceOp::kSum);
    return local;
  }
  // Leaving a row-parallel region: [T, h] partial sums become this rank's tokens of their sum
  // (sequence parallel: its slice, reduce-scattered; otherwise all T, all-reduced over TP).
  Tensor tp_exit(Tensor partial, int T, const char* what, ProgramOpCursor& op, OpPhase phase) {
    if (sp) {
      op.at("tp_reduce_scatter", phase);
      return tp_scatter(partial.p(), T, h, what);
    }
    if (tp > 1) {
      op.at("tp_all_reduce", phase);
      tp_sum(partial.p(), static_cast<size_t>(T) * h);
    }
    return partial;
  }
  // Parameters replicated over the TP group whose gradients each TP rank computes from its own
  // tokens only (norms, router, embedding, head under sequence parallelism): summed over TP.
  std::vector<size_t> tp_partial_grads;
  int64_t steps_done = 0;
  int64_t dropped = 0;  // in the current step
  std::vector<Parameter>* params = nullptr;
  std::map<std::string, size_t> index;  // name -> params position
  // Adam moments of the parameters this rank updates (all of them, or its ZeRO-1 shard), dense
  // and expert parameters in separate flat spaces.
  struct Space {
    std::vector<size_t> members;  // params positions, in order
    size_t total = 0;             // elements
    size_t padded = 0;            // total rounded up to a multiple of the group's size
    Buffer values, grads;         // every member's value and gradient, in order, then padding
    Buffer shard_grads;           // ZeRO-1: this rank's reduced shard
    Buffer m, v;
    Communicator* group = nullptr;
    // Tiers (TrainSettings::placement): of the values, and of the optimizer states. Off-device
    // states: the host's copy of the gradients the update reads, and (values on the device) the
    // host's master copy of the values it updates.
    Tier values_tier = Tier::kGPU, states_tier = Tier::kGPU, grads_tier = Tier::kGPU;
    Buffer host_grads, master;
    // Off-device values: each fetch unit's elements [first, second) (unit 0: the embedding,
    // 1..layers: the layers, layers + 1: the final norm and the head), the device slots units
    // land in, and (values on SSD) the host staging they pass through.
    std::vector<std::pair<size_t, size_t>> unit_range;
    std::vector<std::pair<size_t, size_t>> unit_members;  // [first, end) positions in `members`
    std::vector<Buffer> slots, staging;
    bool streamed() const { return values_tier != Tier::kGPU; }
    // Off-device gradients (`grads` is their home in host memory or on SSD): a unit's backward
    // accumulates into one of two device slots, which then goes down to host staging while the
    // next unit computes, and the host adds it to the home.
    std::vector<Buffer> grad_slots, grad_staging;
    struct Offload {
      int unit = -1;
      CopyEngine::Ticket ticket = 0;
    } offload[2];
    bool grads_off() const { return grads_tier != Tier::kGPU; }
    // Delayed update (TrainSettings::delayed_update): the update of the step before, not applied
    // yet. Off-device states: the host's Adam running on `update` (over `master`, from
    // `host_grads`); device states: its reduced gradients kept in `pending_grads`.
    Buffer pending_grads;
    bool pending = false;
    int64_t pending_t = 0;                    // Adam's step count of that update
    size_t pending_first = 0, pending_n = 0;  // the elements it updates
    std::chrono::steady_clock::time_point update_start, update_end;  // the host's Adam
    std::future<void> update;  // last: destroyed (waited for) before the buffers it uses
  } dense, expert;
  int grad_turn = 0;   // the device gradient slot the next unit uses
  int grad_unit = -1;  // the unit whose gradients the slots take now

  // --- Copies between tiers: off-device parameters fetched into device slots ahead of the unit
  // computing, each level as far ahead as the plan's prefetch says (core's fetch_leads; the
  // StepProgram's param_ssd_read and param_fetch ops, issued by with_prefetches): SSD reads into
  // host staging on the storage engine, copies to the device on the copy engine, which waits for
  // a unit's read before copying it, so the two levels pipeline.
  Device* copier = nullptr;
  std::optional<CopyEngine>
      storage;  // before `engine`: destroyed after the engine that waits on it
  std::optional<CopyEngine> engine;
  FetchLeads leads;
  std::vector<int> pass_units;  // this pass's fetch units, in order of use
  std::vector<CopyEngine::Ticket> pass_ready;
  std::vector<std::array<CopyEngine::Ticket, 2>> pass_read;  // per unit: dense, expert SSD reads
  OpPhase pass_phase = OpPhase::kForward;
  TierStats tier_stats;  // of the current step
  bool streaming() const { return dense.streamed() || expert.streamed(); }
  static int embed_unit() { return 0; }
  int layer_unit(int l) const { return l + 1; }
  int head_unit() const { return layers + 1; }

  // Compute waits for a copy: the wait is a stall (a trace event and the step's figure).
  void wait_for_copy(CopyEngine::Ticket t) {
    const double waited = engine->wait(t);
    record_stall(waited);
    tier_stats.stall_s += waited;
  }
  size_t slots() const { return static_cast<size_t>(leads.pcie) + 1; }
  size_t stagings() const { return static_cast<size_t>(leads.ssd) + 1; }
  // Down the levels, first: the SSD read of the pass's i-th unit into host staging (a staging
  // buffer is free again once its unit's copy to the device has been waited for).
  void issue_read(size_t i) {
    if (i >= pass_units.size()) return;
    const int unit = pass_units[i];
    for (Space* sp : {&dense, &expert}) {
      if (sp->values_tier != Tier::kSSD) continue;
      const auto [first, end] = sp->unit_range[static_cast<size_t>(unit)];
      if (end == first) continue;
      pass_read[i][sp == &expert ? 1 : 0] =
          storage->submit(sp->staging[i % stagings()].data(), sp->values.as<float>() + first,
                          (end - first) * sizeof(float), "param_ssd_read");
    }
  }
  // Then over the link into the unit's device slot (after its SSD read, for SSD-resident values).
  void issue_copy(size_t i) {
    if (i >= pass_units.size()) return;
    const int unit = pass_units[i];
    const size_t slot = i % slots();
    CopyEngine::Ticket last = 0;
    for (Space* sp : {&dense, &expert}) {
      if (!sp->streamed()) continue;
      const auto [first, end] = sp->unit_range[static_cast<size_t>(unit)];
      if (end == first) continue;
      const size_t bytes = (end - first) * sizeof(float);
      if (sp->values_tier == Tier::kSSD)
        last = engine->submit_after({&*storage, pass_read[i][sp == &expert ? 1 : 0]},
                                    sp->slots[slot].data(), sp->staging[i % stagings()].as<float>(),
                                    bytes, "param_fetch");
      else
        last = engine->submit(sp->slots[slot].data(), sp->values.as<float>() + first, bytes,
                              "param_fetch");
    }
    pass_ready[i] = last;
  }
  // A pass over `units` (forward: embedding, layers, head; backward: the layers in reverse)
  // starts: its first units load, each level as far ahead as its lead.
  void begin_fetches(std::vector<int> units, OpPhase phase) {
    pass_phase = phase;
    if (!streaming()) return;
    pass_units = std::move(units);
    pass_ready.assign(pass_units.size(), 0);
    pass_read.assign(pass_units.size(), {0, 0});
    for (size_t i = 0; i <= static_cast<size_t>(leads.ssd); ++i) issue_read(i);
    for (size_t i = 0; i <= static_cast<size_t>(leads.pcie); ++i) issue_copy(i);
  }
  // The pass's i-th unit starts: unit i + lead reads from the SSD and unit i + lead copies to the
  // device (into the slot unit i - 1 left); wait for unit i and point its parameters at its slot.
  void fetch(size_t i) {
    if (!streaming()) return;
    if (i > 0) {
      issue_read(i + static_cast<size_t>(leads.ssd));
      issue_copy(i + static_cast<size_t>(leads.pcie));
    }
    if (pass_ready[i] != 0) wait_for_copy(pass_ready[i]);
    point_unit(pass_units[i], i % slots());
  }
  // What lives on the SSD tier goes back to its files and leaves memory (after the update wrote
  // it), so the next step's fetches and updates read the disk.
  void evict_ssd() {
    for (Space* sp : {&dense, &expert}) {
      if (sp->values_tier == Tier::kSSD) sp->values.evict();
      if (sp->grads_tier == Tier::kSSD) sp->grads.evict();
      if (sp->states_tier == Tier::kSSD && !sp->update.valid()) {
        sp->m.evict();
        sp->v.evict();
      }
    }
  }
  // The pass ended: parameters point home again, offloaded gradients have reached their home;
  // its copies become program ops.
  // (Gradients still going down stay in flight: the next unit that needs their slot, or the
  // step's end, settles them.)
  void end_fetches() {
    if (!streaming() && !grads_offloaded()) return;
    for (int unit : pass_units) point_unit(unit, std::nullopt);
    // Each use reads the SSD, as it does where the tier holds more than memory could (not the
    // page cache the previous pass filled).
    for (Space* sp : {&dense, &expert})
      if (sp->values_tier == Tier::kSSD) sp->values.evict();
    collect_copies(pass_phase);
    pass_units.clear();
  }
  // The finished copies into the step's figures; a pass's also as its program ops (the
  // update's copies are inside the program's optimizer op, whose scope waited for them).
  void collect_copies(std::optional<OpPhase> phase) {
    std::vector<CopyEngine::Span> spans = engine->take_spans();
    if (storage) {
      std::vector<CopyEngine::Span> reads = storage->take_spans();
      spans.insert(spans.end(), reads.begin(), reads.end());
    }
    for (const CopyEngine::Span& sp : spans) {
      (phase ? tier_stats.fetch_s : tier_stats.update_copy_s) += sp.seconds();
      (phase ? tier_stats.fetch_bytes : tier_stats.update_copy_bytes) +=
          static_cast<int64_t>(sp.bytes);
      // (Gradients go down in the backward, the head's while the forward runs its backward.)
      if (phase)
        record_copy_op(
            sp.label,
            std::string_view(sp.label).rfind("grad_", 0) == 0 ? OpPhase::kBackward : *phase,
            sp.start, sp.end);
    }
  }
  // Points a unit's parameters of every streamed space at a slot (nullopt: at their home).
  void point_unit(int unit, std::optional<size_t> slot) {
    for (Space* sp : {&dense, &expert}) {
      if (!sp->streamed()) continue;
      const size_t first = sp->unit_range[static_cast<size_t>(unit)].first;
      float* base = slot ? sp->slots[*slot].as<float>() : sp->values.as<float>() + first;
      size_t at = 0;  // from the unit's first element
      const auto [m0, m1] = sp->unit_members[static_cast<size_t>(unit)];
      for (size_t j = m0; j < m1; ++j) {
        Parameter& p = (*params)[sp->members[j]];
        p.value = base + at;
        at += p.size;
      }
    }
  }

  bool grads_offloaded() const { return dense.grads_off() || expert.grads_off(); }
  // The host adds what slot `k` took down to the gradients' home.
  void settle(Space& sp, int k) {
    Space::Offload& o = sp.offload[k];
    if (o.unit < 0) return;
    wait_for_copy(o.ticket);
    const auto [first, end] = sp.unit_range[static_cast<size_t>(o.unit)];
    float* home = sp.grads.as<float>() + first;
    const float* down = sp.grad_staging[static_cast<size_t>(k)].as<float>();
    parallel_for(end - first, size_t{1} << 14, static_cast<size_t>(std::max(1, s.host_threads)),
                 [&](size_t b, size_t e) {
                   for (size_t i = b; i < e; ++i) home[i] += down[i];
                 });
    o.unit = -1;
    // On SSD the sum goes on to the file (the program's grad_ssd_write), on the storage engine.
    if (sp.grads_tier == Tier::kSSD) {
      Buffer* grads = &sp.grads;
      storage->submit(
          [grads, first, end] {
            grads->write_back(first * sizeof(float), (end - first) * sizeof(float));
          },
          (end - first) * sizeof(float), "grad_ssd_write");
    }
  }
  // Every gradient still going down reaches its home (the step's last backward work).
  void settle_all() {
    if (!grads_offloaded()) return;
    for (Space* sp : {&dense, &expert})
      if (sp->grads_off())
        for (int k = 0; k < 2; ++k) settle(*sp, k);
    engine->drain();
    if (storage) storage->drain();
    collect_copies(OpPhase::kBackward);
  }
  // A unit's backward starts: its gradients accumulate in a zeroed device slot.
  void grads_begin(int unit) {
    if (!grads_offloaded()) return;
    const int k = grad_turn % 2;
    for (Space* sp : {&dense, &expert}) {
      if (!sp->grads_off()) continue;
      const auto [first, end] = sp->unit_range[static_cast<size_t>(unit)];
      settle(*sp, k);  // the slot's previous unit reached the host
      float* slot = sp->grad_slots[static_cast<size_t>(k)].as<float>();
      if (end > first) dev.zero(slot, (end - first) * sizeof(float));
      point_grads(*sp, unit, slot);
    }
    grad_unit = unit;
  }
  // ... and ends: the slot goes down to host staging (the program's grad_offload) while the next
  // unit computes.
  void grads_end() {
    if (!grads_offloaded() || grad_unit < 0) return;
    const int k = grad_turn++ % 2;
    for (Space* sp : {&dense, &expert}) {
      if (!sp->grads_off()) continue;
      const auto [first, end] = sp->unit_range[static_cast<size_t>(grad_unit)];
      point_grads(*sp, grad_unit, nullptr);
      if (end == first) continue;
      sp->offload[k] = {grad_unit, engine->submit(sp->grad_staging[static_cast<size_t>(k)].data(),
                                                  sp->grad_slots[static_cast<size_t>(k)].data(),
                                                  (end - first) * sizeof(float), "grad_offload")};
    }
    grad_unit = -1;
  }
  // Points a unit's gradients of one space at `slot` (nullptr: at their home).
  void point_grads(Space& sp, int unit, float* slot) {
    const size_t first = sp.unit_range[static_cast<size_t>(unit)].first;
    float* base = slot ? slot : sp.grads.as<float>() + first;
    size_t at = 0;
    const auto [m0, m1] = sp.unit_members[static_cast<size_t>(unit)];
    for (size_t j = m0; j < m1; ++j) {
      Parameter& p = (*params)[sp.members[j]];
      p.grad = base + at;
      at += p.size;
    }
  }

  Impl(const ModelSpec& model, const TrainSettings& settings, Device& d, TrainGroups groups)
      : m(model), s(settings), dev(d), g(groups) {}

  // Activations and gradients are written before they are read: no zero-fill.
  // Rows each expert accepts from one micro-batch of T tokens on this rank (0 = dropless):
  // ceil(capacity_factor * T * top_k / experts), as GShard computes it per group.
  int capacity(int T) const {
    if (s.capacity_factor <= 0) return 0;
    return static_cast<int>(std::ceil(s.capacity_factor * T * top_k / experts));
  }

  Tensor alloc(size_t n, const char* what) {
    return {dev.memory().allocate(Tier::kGPU, n * sizeof(float), what, /*zero=*/false), n};
  }
  Parameter& P(const std::string& name) { return (*params)[index.at(name)]; }
  static std::string L(int l, const char* what) { return "layer" + std::to_string(l) + "." + what; }
  static std::string E(int l, int e, const char* what) {
    return "layer" + std::to_string(l) + ".expert" + std::to_string(e) + "." + what;
  }

  // The workload's routing skew on the router's logits of one micro-batch's tokens [first_token,
  // first_token + rows) (see TrainSettings::routing_share).
  void bias_gate(float* logits, int rows, int64_t step, int64_t first_sequence, size_t first_token,
                 int layer) {
    const std::vector<double>& logs = static_cast<size_t>(layer) < log_layer_share.size() &&
                                              !log_layer_share[static_cast<size_t>(layer)].empty()
                                          ? log_layer_share[static_cast<size_t>(layer)]
                                          : log_share;
    if (logs.empty()) return;
    // The bias is drawn on the host and added on the device.
    std::vector<float> bias(static_cast<size_t>(rows) * experts, 0.0f);
    const size_t sl = static_cast<size_t>(seq);
    // (One thread: spread over the host's cores, the threads' start cost what they saved.)
    for (size_t t = 0; t < static_cast<size_t>(rows); ++t) {
      const size_t g = first_token + t;
      const uint64_t sequence = static_cast<uint64_t>(first_sequence) + g / sl;
      const uint64_t key =
          splitmix64(s.seed ^ splitmix64(static_cast<uint64_t>(step)) ^ splitmix64(sequence) ^
                     ((g % sl) << 32) ^ (static_cast<uint64_t>(layer) << 48));
      add_gate_bias(bias.data() + t * experts, experts, logs, key);
    }
    Tensor b = alloc(bias.size(), "router bias");
    dev.copy(b.p(), bias.data(), sizeof(float) * bias.size());
    dev.add(logits, b.p(), bias.size(), logits);
  }
  std::vector<double> log_share;                     // log of TrainSettings::routing_share
  std::vector<std::vector<double>> log_layer_share;  // of routing_layer_share

  int token(int64_t step, int64_t sequence, int position) const {
    const uint64_t x = splitmix64(s.seed * 0x9e3779b97f4a7c15ull ^ splitmix64(step) ^
                                  splitmix64(static_cast<uint64_t>(sequence) << 20 | position));
    return static_cast<int>(x % static_cast<uint64_t>(vocab));
  }

  // y[rows, n] = x[rows, k] @ w[k, n] (+= when accumulate).
  void mm(const float* x, const float* w, int rows, int k, int n, float* y, bool acc = false) {
    dev.gemm(false, false, rows, n, k, 1.0f, x, k, w, n, acc ? 1.0f : 0.0f, y, n);
  }
  // dx[rows, k] (+)= dy[rows, n] @ w^T ; dw[k, n] += x^T dy.
  void mm_backward(const float* x, const float* w, const float* dy, int rows, int k, int n,
                   float* dx, float* dw, bool acc_dx = false) {
    if (dx) dev.gemm(false, true, rows, k, n, 1.0f, dy, n, w, n, acc_dx ? 1.0f : 0.0f, dx, k);
    dev.gemm(true, false, k, n, rows, 1.0f, x, k, dy, n, 1.0f, dw, n);
  }

  // --- Expert parallel exchange of one MoE layer.
  struct Exchange {
    std::vector<size_t> send_rows, recv_rows;  // per EP rank
    std::vector<int64_t> recv_per_expert;      // [ep * local_experts]: source-major
    std::vector<int> rows_per_local;           // rows of each local expert
    std::vector<int> order;                    // source-major received row -> expert-major row
    int received = 0;
    // With replicas: the permuted rows in the order they are sent (destination rank, then its
    // slots; a replicated expert's rows dealt round-robin over its copies).
    std::vector<int> send_index;
    // Hierarchical exchange: rows from intra-node peer i bound for node n (this rank's local
    // index), [L * N].
    std::vector<int64_t> hier_in;
    int block_begin = 0;  // ppmoe: the local experts' rows in the permuted order
    int total_rows = 0;   // ppmoe: every expert's rows
  };

  Exchange plan_exchange(const TokenRouting& r) {
    Exchange x;
    if (ppmoe) {
      // Every TP rank routed the same tokens the same way: its experts' rows are one block.
      for (int e = 0; e < first_expert; ++e) x.block_begin += r.rows_per_expert[e];
      for (int j = 0; j < local_experts; ++j)
        x.rows_per_local.push_back(r.rows_per_expert[first_expert + j]);
      x.received = std::accumulate(x.rows_per_local.begin(), x.rows_per_local.end(), 0);
      x.total_rows = std::accumulate(r.rows_per_expert.begin(), r.rows_per_expert.end(), 0);
      return x;
    }
    const int ep = g.ep->size();
    x.send_rows.assign(ep, 0);
    x.recv_per_expert.assign(static_cast<size_t>(ep) * local_experts, 0);
    if (replicated()) {
      std::vector<int> offset(static_cast<size_t>(experts) + 1, 0);
      for (int e = 0; e < experts; ++e) offset[e + 1] = offset[e] + r.rows_per_expert[e];
      std::vector<int64_t> send_per_slot;
      std::vector<size_t> send_counts(ep), recv_counts(ep, static_cast<size_t>(local_experts));
      for (int dst = 0; dst < ep; ++dst) {
        send_counts[dst] = rank_slots[dst].size();
        for (int e : rank_slots[dst]) {
          const auto& copies = copies_of[e];
          const int n = static_cast<int>(copies.size());
          const int c =
              static_cast<int>(std::find(copies.begin(), copies.end(), dst) - copies.begin());
          int64_t rows = 0;
          for (int i = c; i < r.rows_per_expert[e]; i += n, ++rows)
            x.send_index.push_back(offset[e] + i);
          send_per_slot.push_back(rows);
          x.send_rows[dst] += static_cast<size_t>(rows);
        }
      }
      g.ep->all_to_allv(send_per_slot.data(), send_counts, x.recv_per_expert.data(), recv_counts,
                        DType::kInt64);
    } else {
      std::vector<int64_t> send_per_expert(static_cast<size_t>(experts));
      for (int e = 0; e < experts; ++e) {
        send_per_expert[e] = r.rows_per_expert[e];
        x.send_rows[e / local_experts] += r.rows_per_expert[e];
      }
      std::vector<size_t> counts(ep, static_cast<size_t>(local_experts));
      g.ep->all_to_allv(send_per_expert.data(), counts, x.recv_per_expert.data(), counts,
                        DType::kInt64);
    }
    x.recv_rows.assign(ep, 0);
    x.rows_per_local.assign(local_experts, 0);
    for (int src = 0; src < ep; ++src)
      for (int j = 0; j < local_experts; ++j) {
        const auto n = x.recv_per_expert[static_cast<size_t>(src) * local_experts + j];
        x.recv_rows[src] += static_cast<size_t>(n);
        x.rows_per_local[j] += static_cast<int>(n);
      }
    x.received = std::accumulate(x.rows_per_local.begin(), x.rows_per_local.end(), 0);
    if (hierarchical()) {
      const int L = g.ep_intra->size(), N = g.ep_inter->size();
      std::vector<int64_t> mine(static_cast<size_t>(L) * N);  // [peer j][node n]
      for (int j = 0; j < L; ++j)
        for (int n = 0; n < N; ++n)
          mine[static_cast<size_t>(j) * N + n] = static_cast<int64_t>(x.send_rows[n * L + j]);
      x.hier_in.assign(mine.size(), 0);
      std::vector<size_t> per(static_cast<size_t>(L), static_cast<size_t>(N));
      g.ep_intra->all_to_allv(mine.data(), per, x.hier_in.data(), per, DType::kInt64);
    }
    // Received rows arrive source-major (per source, its rows for each local expert); experts
    // compute expert-major.
    std::vector<int> next(local_experts, 0);
    for (int j = 1; j < local_experts; ++j) next[j] = next[j - 1] + x.rows_per_local[j - 1];
    x.order.resize(static_cast<size_t>(x.received));
    int at = 0;
    for (int src = 0; src < ep; ++src)
      for (int j = 0; j < local_experts; ++j)
        for (int64_t i = 0; i < x.recv_per_expert[static_cast<size_t>(src) * local_experts + j];
             ++i)
          x.order[at++] = next[j]++;
    return x;
  }

  static std::vector<size_t> times(const std::vector<size_t>& rows, int h) {
    std::vector<size_t> out(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) out[i] = rows[i] * static_cast<size_t>(h);
    return out;
  }

  // Sends rows (grouped by destination) out and returns them expert-major on the owners.
  bool hierarchical() const { return g.ep_intra != nullptr && g.ep_inter != nullptr; }

  // Moves `rows` blocks between layouts: `from` and `to` list, per block, its offset in rows.
  void move_blocks(const float* src, const std::vector<size_t>& from, float* dst,
                   const std::vector<size_t>& to, const std::vector<size_t>& rows, int width) {
    for (size_t b = 0; b < rows.size(); ++b)
      if (rows[b] > 0)
        dev.copy(dst + to[b] * width, src + from[b] * width, sizeof(float) * rows[b] * width);
  }
  // Offsets of blocks laid out in the order given by `rank_of(block)`.
  static std::vector<size_t> offsets(const std::vector<size_t>& rows,
                                     const std::vector<size_t>& order) {
    std::vector<size_t> at(rows.size());
    size_t next = 0;
    for (size_t b : order) at[b] = next, next += rows[b];
    return at;
  }

  // SE-MoE's fusion communication / Tutel's 2DH all-to-all: an all-to-all inside the node that
  // gathers, for each local peer j, the rows bound for local rank j of every node, then an
  // all-to-all among the nodes' ranks with the same local index. `by_dest` holds this rank's rows
  // grouped by destination EP rank (d = node * L + local); `source_major` receives what the flat
  // all-to-all would have delivered (grouped by source EP rank).
  void hier_forward(const Exchange& x, const float* by_dest, int width, float* source_major) {
    const int L = g.ep_intra->size(), N = g.ep_inter->size();
    const size_t blocks = static_cast<size_t>(L) * N;
    // Stage 1: regroup (n, j) -> (j, n) and exchange inside the node.
    std::vector<size_t> rows(blocks), dest_order(blocks), peer_order(blocks);
    for (int n = 0; n < N; ++n)
      for (int j = 0; j < L; ++j) rows[n * L + j] = x.send_rows[n * L + j];
    for (size_t b = 0; b < blocks; ++b) dest_order[b] = b;
    for (int j = 0; j < L; ++j)
      for (int n = 0; n < N; ++n) peer_order[static_cast<size_t>(j) * N + n] = n * L + j;
    size_t total = 0;
    for (size_t r : rows) total += r;
    Tensor b1 = alloc(total * width, "dispatch transform");
    move_blocks(by_dest, offsets(rows, dest_order), b1.p(), offsets(rows, peer_order), rows, width);
    std::vector<size_t> send1(L, 0), recv1(L, 0);
    size_t in1 = 0;
    for (int j = 0; j < L; ++j)
      for (int n = 0; n < N; ++n) {
        send1[j] += x.send_rows[n * L + j] * width;
        const auto c = static_cast<size_t>(x.hier_in[static_cast<size_t>(j) * N + n]);
        recv1[j] += c * width;
        in1 += c;
      }
    Tensor r1 = alloc(in1 * width, "dispatch intra-node");
    g.ep_intra->all_to_allv(b1.p(), send1, r1.p(), recv1, DType::kFloat32);
    // Stage 2: regroup (i, n) -> (n, i) and exchange among the nodes.
    std::vector<size_t> rows2(blocks), in_order(blocks), node_order(blocks);
    for (int i = 0; i < L; ++i)
      for (int n = 0; n < N; ++n)
        rows2[static_cast<size_t>(i) * N + n] =
            static_cast<size_t>(x.hier_in[static_cast<size_t>(i) * N + n]);
    for (size_t b = 0; b < blocks; ++b) in_order[b] = b;
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < L; ++i) node_order[static_cast<size_t>(n) * L + i] = i * N + n;
    Tensor b2 = alloc(in1 * width, "dispatch transform");
    move_blocks(r1.p(), offsets(rows2, in_order), b2.p(), offsets(rows2, node_order), rows2, width);
    std::vector<size_t> send2(N, 0), recv2(N, 0);
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < L; ++i) {
        send2[n] += rows2[static_cast<size_t>(i) * N + n] * width;
        recv2[n] += x.recv_rows[n * L + i] * width;
      }
    g.ep_inter->all_to_allv(b2.p(), send2, source_major, recv2, DType::kFloat32);
  }

  // The reverse of hier_forward: rows grouped by source EP rank back to their sources, grouped
  // by destination there.
  void hier_reverse(const Exchange& x, const float* source_major, int width, float* by_dest) {
    const int L = g.ep_intra->size(), N = g.ep_inter->size();
    const size_t blocks = static_cast<size_t>(L) * N;
    std::vector<size_t> send2(N, 0), recv2(N, 0), rows2(blocks), in_order(blocks),
        node_order(blocks);
    size_t in1 = 0;
    for (int i = 0; i < L; ++i)
      for (int n = 0; n < N; ++n) {
        rows2[static_cast<size_t>(i) * N + n] =
            static_cast<size_t>(x.hier_in[static_cast<size_t>(i) * N + n]);
        in1 += rows2[static_cast<size_t>(i) * N + n];
      }
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < L; ++i) {
        send2[n] += x.recv_rows[n * L + i] * width;
        recv2[n] += rows2[static_cast<size_t>(i) * N + n] * width;
      }
    Tensor b2 = alloc(in1 * width, "combine inter-node");
    g.ep_inter->all_to_allv(source_major, send2, b2.p(), recv2, DType::kFloat32);
    for (size_t b = 0; b < blocks; ++b) in_order[b] = b;
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < L; ++i) node_order[static_cast<size_t>(n) * L + i] = i * N + n;
    Tensor r1 = alloc(in1 * width, "combine transform");
    move_blocks(b2.p(), offsets(rows2, node_order), r1.p(), offsets(rows2, in_order), rows2, width);
    std::vector<size_t> send1(L, 0), recv1(L, 0), rows(blocks), dest_order(blocks),
        peer_order(blocks);
    size_t total = 0;
    for (int j = 0; j < L; ++j)
      for (int n = 0; n < N; ++n) {
        send1[j] += rows2[static_cast<size_t>(j) * N + n] * width;
        recv1[j] += x.send_rows[n * L + j] * width;
      }
    for (size_t b = 0; b < blocks; ++b) rows[b] = x.send_rows[b], total += rows[b];
    Tensor b1 = alloc(total * width, "combine intra-node");
    g.ep_intra->all_to_allv(r1.p(), send1, b1.p(), recv1, DType::kFloat32);
    for (size_t b = 0; b < blocks; ++b) dest_order[b] = b;
    for (int j = 0; j < L; ++j)
      for (int n = 0; n < N; ++n) peer_order[static_cast<size_t>(j) * N + n] = n * L + j;
    move_blocks(b1.p(), offsets(rows, peer_order), by_dest, offsets(rows, dest_order), rows, width);
  }

  // Sends rows (grouped by destination) out and returns them expert-major on the owners.
  Tensor dispatch(const Exchange& x, const float* rows, int width, const char* what) {
    Tensor recv = alloc(static_cast<size_t>(x.received) * width, what);
    if (ppmoe) {  // the index slice: no communication
      dev.copy(recv.p(), rows + static_cast<size_t>(x.block_begin) * width,
               sizeof(float) * x.received * width);
      return recv;
    }
    Tensor tmp = alloc(static_cast<size_t>(x.received) * width, what);
    Tensor ordered;  // replicas: the rows in their send order
    if (!x.send_index.empty()) {
      ordered = alloc(x.send_index.size() * width, what);
      dev.gather_rows(rows, x.send_index.data(), static_cast<int>(x.send_index.size()), width,
                      ordered.p());
      rows = ordered.p();
    }
    if (hierarchical())
      hier_forward(x, rows, width, tmp.p());
    else
      g.ep->all_to_allv(rows, times(x.send_rows, width), tmp.p(), times(x.recv_rows, width),
                        DType::kFloat32);
    dev.scatter_rows(tmp.p(), x.order.data(), x.received, width, recv.p(), /*accumulate=*/false);
    return recv;
  }
  // The reverse: expert-major rows on the owners back to their sources' order.
  void combine(const Exchange& x, const float* expert_rows, int width, float* out) {
    if (ppmoe) {  // other ranks' experts' rows stay zero: the TP all-reduce adds them
      dev.zero(out, sizeof(float) * static_cast<size_t>(x.total_rows) * width);
      dev.copy(out + static_cast<size_t>(x.block_begin) * width, expert_rows,
               sizeof(float) * x.received * width);
      return;
    }
    Tensor tmp = alloc(static_cast<size_t>(x.received) * width, "combine buffer");
    dev.gather_rows(expert_rows, x.order.data(), x.received, width, tmp.p());
    if (hierarchical()) {
      hier_reverse(x, tmp.p(), width, out);
    } else if (!x.send_index.empty()) {  // replicas: back in send order, then to the rows' places
      Tensor back = alloc(x.send_index.size() * width, "combine buffer");
      g.ep->all_to_allv(tmp.p(), times(x.recv_rows, width), back.p(), times(x.send_rows, width),
                        DType::kFloat32);
      dev.scatter_rows(back.p(), x.send_index.data(), static_cast<int>(x.send_index.size()), width,
                       out, /*accumulate=*/false);
    } else {
      g.ep->all_to_allv(tmp.p(), times(x.recv_rows, width), out, times(x.send_rows, width),
                        DType::kFloat32);
    }
  }

  // --- What a layer's forward keeps for its backward.
  struct LayerSaved {
    Tensor x_in, a, qkv, o, lse, x_mid, b;
    Tensor a_full, b_full;  // sequence parallel: the norm outputs gathered over TP
    // MoE
    Tensor probs, xin_e, gu, act, y_perm;
    TokenRouting routing;
    Exchange ex;
    // dense FFN (gu, act reused)
  };

  // One micro-batch as a pipeline stage sees it: its tokens, what its layers keep for the
  // backward, the activation it passes on (or received) and the gradient coming back.
  struct MicroBatch {
    int sequences = 0;
    int T = 0;
    int64_t step = 0, first_sequence = 0;
    std::vector<int> tok, label;
    // Vocab-parallel (tp > 1): each token's row in this rank's slice of the vocabulary, -1
    // outside it (the embedding's gather and its gradient's scatter).
    std::vector<int> vocab_rows;
    std::vector<LayerSaved> saved;
    Tensor x;   // forward: the input from the previous stage, then this stage's output
                // (sequence parallel: this TP rank's slice of the tokens)
    Tensor dx;  // backward: the gradient at this stage's output, then at its input
    double loss = 0;
  };

  static constexpr float eps = 1e-5f;
  bool first_stage() const { return layer_begin == 0; }
  bool last_stage() const { return layer_end == layers; }

  MicroBatch make_micro_batch(int64_t step, int64_t first_sequence, int sequences) {
    MicroBatch mb;
    mb.sequences = sequences;
    mb.step = step;
    mb.first_sequence = first_sequence;
    mb.T = sequences * seq;
    mb.tok.resize(mb.T);
    mb.label.resize(mb.T);
    for (int b = 0; b < sequences; ++b)
      for (int t = 0; t < seq; ++t) {
        mb.tok[b * seq + t] = token(step, first_sequence + b, t);
        mb.label[b * seq + t] = token(step, first_sequence + b, t + 1);
      }
    if (tp > 1)
      for (int t : mb.tok) {
        const int row = t - vocab_first;
        mb.vocab_rows.push_back(row >= 0 && row < vocab_local ? row : -1);
      }
    return mb;
  }

  // Megatron's vocab-parallel cross-entropy over `rows` tokens whose logits of this rank's
  // vocabulary rows are [rows, vocab_local]: the max, the sum of exponentials and the target's
  // logit are combined over TP (the program's loss_all_reduce). Returns the sum of the rows'
  // losses (the same on every TP rank) and overwrites the logits with d(grad_scale *
  // loss)/d(logit).
  double vocab_parallel_cross_entropy(float* logits, const int* labels, int rows, float grad_scale,
                                      ProgramOpCursor& op) {
    Buffer mx = dev.memory().allocate(Tier::kGPU, sizeof(double) * rows, "loss row max", false);
    Buffer se_z =
        dev.memory().allocate(Tier::kGPU, 2 * sizeof(double) * rows, "loss row sums", false);
    dev.row_max(logits, rows, vocab_local, mx.as<double>());
    op.at("loss_all_reduce", OpPhase::kForward);
    g.tp->all_reduce(mx.data(), static_cast<size_t>(rows), DType::kFloat64, ReduceOp::kMax);
    op.at("loss", OpPhase::kForward);
    dev.softmax_sums(logits, labels, rows, vocab_local, vocab_first, mx.as<double>(),
                     se_z.as<double>());
    op.at("loss_all_reduce", OpPhase::kForward);
    g.tp->all_reduce(se_z.data(), 2 * static_cast<size_t>(rows), DType::kFloat64, ReduceOp::kSum);
    op.at("loss", OpPhase::kForward);
    const double loss =
        dev.softmax_cross_entropy_grad(logits, labels, rows, vocab_local, vocab_first,
                                       mx.as<double>(), se_z.as<double>(), grad_scale);
    return loss;
  }

  // This stage's layers (and the embedding on the first stage). On the last stage the head, the
  // loss and the gradient at the stage's output follow; elsewhere mb.x is the output.
  void forward(MicroBatch& mb, double loss_scale, std::vector<int64_t>& tokens_per_expert) {
    // T: the micro-batch's tokens (what the TP regions see); Tl: this rank's outside them.
    const int T = mb.T, sequences = mb.sequences, Tl = local_tokens(T);
    const size_t first_token = sp ? static_cast<size_t>(tp_rank) * Tl : 0;
    const int* tok = mb.tok.data() + first_token;
    const int* label = mb.label.data() + first_token;
    // The StepProgram op each stretch of code runs (the lowering's names), for the measurement.
    ProgramOpCursor op(OpPhase::kForward);
    // Off-device parameters: the embedding, this chunk's layers and the head, in order of use.
    std::vector<int> units;
    // (The embedding and the head are units only when the dense parameters are off the device.)
    if (first_stage() && dense.streamed()) units.push_back(embed_unit());
    for (int l = layer_begin; l < layer_end; ++l) units.push_back(layer_unit(l));
    if (last_stage() && dense.streamed()) units.push_back(head_unit());
    begin_fetches(std::move(units), OpPhase::kForward);
    size_t next_unit = 0;
    Tensor x;
    if (first_stage()) {
      if (dense.streamed()) fetch(next_unit++);
      op.at("embedding");
      const float* emb = P("embed").v();
      if (tp > 1) {
        // Vocab-parallel: this rank's rows for the micro-batch's tokens it owns, zeros elsewhere;
        // the partial sums combine over TP (reduce-scattered into the SP slices).
        Tensor partial = alloc(static_cast<size_t>(T) * h, "embedding (partial)");
        dev.gather_rows(emb, mb.vocab_rows.data(), T, h, partial.p());
        if (sp) {
          op.at("embedding_reduce_scatter");
          x = tp_scatter(partial.p(), T, h, "hidden states");
        } else {
          op.at("embedding_all_reduce");
          tp_sum(partial.p(), static_cast<size_t>(T) * h);
          x = std::move(partial);
        }
      } else {
        x = alloc(static_cast<size_t>(Tl) * h, "hidden states");
        dev.gather_rows(emb, tok, Tl, h, x.p());
      }
    } else {
      x = std::move(mb.x);  // received from the previous stage
    }
    std::vector<LayerSaved>& saved = mb.saved;
    saved.resize(static_cast<size_t>(layer_end - layer_begin));
    for (int l = layer_begin; l < layer_end; ++l) {
      LayerSaved& S = saved[static_cast<size_t>(l - layer_begin)];
      op.close();
      fetch(next_unit++);
      S.x_in = std::move(x);
      op.at("norm1");
      S.a = alloc(static_cast<size_t>(Tl) * h, "norm output");
      dev.rmsnorm(S.x_in.p(), P(L(l, "attn_norm")).v(), Tl, h, eps, S.a.p());
      // Attention: QKV column-parallel (this rank's heads), output projection row-parallel, its
      // partial sums added up over the TP group (sequence parallel: gathered before, reduce-
      // scattered after).
      if (sp) {
        op.at("tp_all_gather");
        S.a_full = tp_gather(S.a.p(), T, h, "norm output (gathered)");
      }
      const float* a_in = sp ? S.a_full.p() : S.a.p();
      op.at("qkv");
      S.qkv = alloc(static_cast<size_t>(T) * 3 * h_local, "qkv");
      mm(a_in, P(L(l, "wqkv")).v(), T, h, 3 * h_local, S.qkv.p());
      op.at("attn_core");
      S.o = alloc(static_cast<size_t>(T) * h_local, "attention output");
      S.lse = alloc(static_cast<size_t>(sequences) * heads_local * seq, "attention lse");
      dev.attention(S.qkv.p(), sequences, seq, heads_local, head_dim, S.o.p(), S.lse.p());
      S.x_mid = alloc(static_cast<size_t>(Tl) * h, "residual");
      {
        op.at("attn_out");
        Tensor proj = alloc(static_cast<size_t>(T) * h, "attention projection");
        mm(S.o.p(), P(L(l, "wo")).v(), T, h_local, h, proj.p());
        proj =
            tp_exit(std::move(proj), T, "attention projection (scattered)", op, OpPhase::kForward);
        op.at("residual1");
        dev.add(S.x_in.p(), proj.p(), static_cast<size_t>(Tl) * h, S.x_mid.p());
        x = alloc(static_cast<size_t>(Tl) * h, "hidden states");
        dev.copy(x.p(), S.x_mid.p(), sizeof(float) * Tl * h);
      }
      op.at("norm2");
      S.b = alloc(static_cast<size_t>(Tl) * h, "norm output");
      dev.rmsnorm(S.x_mid.p(), P(L(l, "ffn_norm")).v(), Tl, h, eps, S.b.p());
      if (m.is_moe_layer(l)) {
        // The router and the dispatch see this rank's tokens (all of them without SP).
        op.at("router");
        Tensor logits = alloc(static_cast<size_t>(Tl) * experts, "router logits");
        mm(S.b.p(), P(L(l, "router")).v(), Tl, h, experts, logits.p());
        bias_gate(logits.p(), Tl, mb.step, mb.first_sequence, first_token, l);
        S.probs = alloc(static_cast<size_t>(Tl) * experts, "router probabilities");
        S.routing = dev.route(logits.p(), Tl, experts, top_k, top_k > 1, S.probs.p(), capacity(Tl));
        const int kept_rows = Tl * top_k - S.routing.dropped;
        dropped += S.routing.dropped;
        op.at(ppmoe ? "index_slice" : "permute");
        Tensor perm = alloc(static_cast<size_t>(kept_rows) * h, "dispatch buffer");
        dev.permute(S.b.p(), S.routing, h, perm.p());
        if (!ppmoe) op.at("dispatch");
        S.ex = plan_exchange(S.routing);
        S.xin_e = dispatch(S.ex, perm.p(), h, "expert input");
        const int R = S.ex.received;
        for (int j = 0; j < local_experts; ++j)
          tokens_per_expert[static_cast<size_t>(l) * experts + slot_expert[j]] +=
              S.ex.rows_per_local[j];
        std::vector<const float*> w1, w2;
        for (int j = 0; j < local_experts; ++j) {
          w1.push_back(P(E(l, slot_expert[j], "w1")).v());
          w2.push_back(P(E(l, slot_expert[j], "w2")).v());
        }
        op.at("experts_fc1");
        S.gu = alloc(static_cast<size_t>(R) * 2 * f, "expert gate/up");
        dev.grouped_gemm(S.xin_e.p(), h, S.ex.rows_per_local, w1, false, 2 * f, S.gu.p());
        op.at("experts_act");
        S.act = alloc(static_cast<size_t>(R) * f, "expert activation");
        dev.swiglu(S.gu.p(), R, f, S.act.p());
        op.at("experts_fc2");
        Tensor y = alloc(static_cast<size_t>(R) * h, "expert output");
        dev.grouped_gemm(S.act.p(), f, S.ex.rows_per_local, w2, false, h, y.p());
        op.at(ppmoe ? "index_combine" : "combine");
        S.y_perm = alloc(static_cast<size_t>(kept_rows) * h, "combine buffer");
        combine(S.ex, y.p(), h, S.y_perm.p());
        if (!ppmoe) op.at("unpermute");
        Tensor moe_out = alloc(static_cast<size_t>(Tl) * h, "moe output");
        dev.unpermute_combine(S.y_perm.p(), S.routing, h, moe_out.p());
        if (ppmoe) {
          op.at("combine_all_reduce");
          tp_sum(moe_out.p(), static_cast<size_t>(Tl) * h);  // PPMoE's one all-reduce
        }
        op.at("residual2");
        dev.add(x.p(), moe_out.p(), static_cast<size_t>(Tl) * h, x.p());
      } else {
        // Dense FFN: column-parallel gate/up, row-parallel down projection.
        if (sp) {
          op.at("tp_all_gather");
          S.b_full = tp_gather(S.b.p(), T, h, "norm output (gathered)");
        }
        op.at("fc1");
        S.gu = alloc(static_cast<size_t>(T) * 2 * ffn_local, "ffn gate/up");
        mm(sp ? S.b_full.p() : S.b.p(), P(L(l, "w1")).v(), T, h, 2 * ffn_local, S.gu.p());
        op.at("act");
        S.act = alloc(static_cast<size_t>(T) * ffn_local, "ffn activation");
        dev.swiglu(S.gu.p(), T, ffn_local, S.act.p());
        op.at("fc2");
        Tensor y = alloc(static_cast<size_t>(T) * h, "ffn output");
        mm(S.act.p(), P(L(l, "w2")).v(), T, ffn_local, h, y.p());
        y = tp_exit(std::move(y), T, "ffn output (scattered)", op, OpPhase::kForward);
        op.at("residual2");
        dev.add(x.p(), y.p(), static_cast<size_t>(Tl) * h, x.p());
      }
    }
    if (!last_stage()) {
      op.close();
      end_fetches();
      mb.x = std::move(x);
      return;
    }
    op.close();
    if (dense.streamed()) fetch(next_unit++);
    grads_begin(head_unit());  // the head's backward runs below
    op.at("final_norm");
    Tensor xf = alloc(static_cast<size_t>(Tl) * h, "final norm");
    dev.rmsnorm(x.p(), P("final_norm").v(), Tl, h, eps, xf.p());
    Tensor dxf;
    if (tp > 1) {
      // Megatron's column-parallel LM head over the vocabulary and its vocab-parallel
      // cross-entropy: every TP rank holds the logits of its vocabulary rows for all T tokens.
      Tensor xf_full;
      if (sp) {
        op.at("tp_all_gather");
        xf_full = tp_gather(xf.p(), T, h, "final norm (gathered)");
      }
      const float* xin = sp ? xf_full.p() : xf.p();
      op.at("lm_head");
      Tensor logits = alloc(static_cast<size_t>(T) * vocab_local, "logits");
      mm(xin, P("head").v(), T, h, vocab_local, logits.p());
      op.at("loss");
      mb.loss = vocab_parallel_cross_entropy(logits.p(), mb.label.data(), T,
                                             static_cast<float>(loss_scale), op);
      op.at("lm_head", OpPhase::kBackward);
      Tensor partial = alloc(static_cast<size_t>(T) * h, "gradient");
      mm_backward(xin, P("head").v(), logits.p(), T, h, vocab_local, partial.p(), P("head").g());
      dxf = tp_exit(std::move(partial), T, "gradient", op, OpPhase::kBackward);
    } else {
      op.at("lm_head");
      Tensor logits = alloc(static_cast<size_t>(Tl) * vocab, "logits");
      mm(xf.p(), P("head").v(), Tl, h, vocab, logits.p());
      // Cross-entropy; the logits become d_logits = (softmax - onehot) * loss_scale.
      op.at("loss");
      mb.loss = dev.cross_entropy(logits.p(), label, Tl, vocab, static_cast<float>(loss_scale));
      op.at("lm_head", OpPhase::kBackward);
      dxf = alloc(static_cast<size_t>(Tl) * h, "gradient");
      mm_backward(xf.p(), P("head").v(), logits.p(), Tl, h, vocab, dxf.p(), P("head").g());
    }
    op.at("final_norm", OpPhase::kBackward);
    Tensor dx = alloc(static_cast<size_t>(Tl) * h, "gradient");
    dev.rmsnorm_backward(x.p(), P("final_norm").v(), dxf.p(), Tl, h, eps, dx.p(),
                         P("final_norm").g());
    mb.dx = std::move(dx);
    op.close();
    grads_end();
    end_fetches();
  }

  // This stage's backward from mb.dx (the gradient at its output); leaves the gradient at its
  // input in mb.dx (the first stage adds it to the embedding instead).
  void backward(MicroBatch& mb) {
    const int T = mb.T, sequences = mb.sequences, Tl = local_tokens(T);
    const int* tok = mb.tok.data() + (sp ? static_cast<size_t>(tp_rank) * Tl : 0);
    std::vector<LayerSaved>& saved = mb.saved;
    ProgramOpCursor op(OpPhase::kBackward);  // as in forward()
    std::vector<int> units;
    for (int l = layer_end - 1; l >= layer_begin; --l) units.push_back(layer_unit(l));
    begin_fetches(std::move(units), OpPhase::kBackward);
    size_t next_unit = 0;
    Tensor dx = std::move(mb.dx);
    for (int l = layer_end - 1; l >= layer_begin; --l) {
      LayerSaved& S = saved[static_cast<size_t>(l - layer_begin)];
      op.close();
      fetch(next_unit++);
      grads_begin(layer_unit(l));
      // dx is the gradient at the layer's output = d(x_mid) through the residual + FFN branch.
      Tensor db = alloc(static_cast<size_t>(Tl) * h, "gradient");
      if (m.is_moe_layer(l)) {
        op.at(ppmoe ? "index_combine" : "unpermute");
        const int R = S.ex.received;
        const TokenRouting& r = S.routing;
        // Combine backward: the rows' gradients and the combine weights' gradients.
        const int kept_rows = Tl * top_k - r.dropped;
        Tensor dy_perm = alloc(static_cast<size_t>(kept_rows) * h, "gradient");
        Tensor gw = alloc(r.expert.size(), "gradient");
        dev.unpermute_combine_backward(S.y_perm.p(), dx.p(), r, h, dy_perm.p(), gw.p());
        // PPMoE: each TP rank saw only its experts' outputs; the weights' gradients add up.
        if (ppmoe) tp_sum(gw.p(), r.expert.size());
        if (!ppmoe) op.at("combine");
        Tensor dy_e = dispatch(S.ex, dy_perm.p(), h, "gradient");
        Tensor dact = alloc(static_cast<size_t>(R) * f, "gradient");
        Tensor dgu = alloc(static_cast<size_t>(R) * 2 * f, "gradient");
        Tensor dxin = alloc(static_cast<size_t>(R) * h, "gradient");
        // Each expert's rows: the second GEMM's backward, the activation's, the first GEMM's.
        const auto each_expert = [&](auto&& body) {
          int row = 0;
          for (int j = 0; j < local_experts; ++j) {
            const int n = S.ex.rows_per_local[j];
            if (n > 0) body(j, static_cast<size_t>(row), n);
            row += n;
          }
        };
        op.at("experts_fc2");
        each_expert([&](int j, size_t row, int n) {
          Parameter& w2 = P(E(l, slot_expert[j], "w2"));
          mm_backward(S.act.p() + row * f, w2.v(), dy_e.p() + row * h, n, f, h, dact.p() + row * f,
                      w2.g());
        });
        op.at("experts_act");
        each_expert([&](int, size_t row, int n) {
          dev.swiglu_backward(S.gu.p() + row * 2 * f, dact.p() + row * f, n, f,
                              dgu.p() + row * 2 * f);
        });
        op.at("experts_fc1");
        each_expert([&](int j, size_t row, int n) {
          Parameter& w1 = P(E(l, slot_expert[j], "w1"));
          mm_backward(S.xin_e.p() + row * h, w1.v(), dgu.p() + row * 2 * f, n, h, 2 * f,
                      dxin.p() + row * h, w1.g());
        });
        op.at(ppmoe ? "index_slice" : "dispatch");
        Tensor dperm = alloc(static_cast<size_t>(kept_rows) * h, "gradient");
        combine(S.ex, dxin.p(), h, dperm.p());
        if (!ppmoe) op.at("permute");
        // Every copy of a token's input gets its own gradient back: sum them.
        dev.permute_backward(dperm.p(), r, h, db.p());
        // PPMoE: the experts' input gradients are partial per TP rank (the router's part below is
        // computed alike on every rank and added after).
        if (ppmoe) {
          op.at("combine_all_reduce");
          tp_sum(db.p(), static_cast<size_t>(Tl) * h);
        }
        // Router: through the (renormalised) top-k weights and the softmax.
        op.at("router");
        Tensor dlogits = alloc(static_cast<size_t>(Tl) * experts, "gradient");
        dev.route_backward(S.probs.p(), r, gw.p(), top_k > 1, dlogits.p());
        mm_backward(S.b.p(), P(L(l, "router")).v(), dlogits.p(), Tl, h, experts, db.p(),
                    P(L(l, "router")).g(), /*acc_dx=*/true);
      } else {
        // Sequence parallel: the reduce-scatter after fc2 becomes an all-gather of the gradient
        // (the program names the backward collectives by what they do).
        Tensor dy_full;
        if (sp) {
          op.at("tp_all_gather");
          dy_full = tp_gather(dx.p(), T, h, "gradient (gathered)");
        }
        op.at("fc2");
        Tensor dact = alloc(static_cast<size_t>(T) * ffn_local, "gradient");
        mm_backward(S.act.p(), P(L(l, "w2")).v(), sp ? dy_full.p() : dx.p(), T, ffn_local, h,
                    dact.p(), P(L(l, "w2")).g());
        op.at("act");
        Tensor dgu = alloc(static_cast<size_t>(T) * 2 * ffn_local, "gradient");
        dev.swiglu_backward(S.gu.p(), dact.p(), T, ffn_local, dgu.p());
        op.at("fc1");
        Tensor db_full = sp ? alloc(static_cast<size_t>(T) * h, "gradient") : Tensor{};
        mm_backward(sp ? S.b_full.p() : S.b.p(), P(L(l, "w1")).v(), dgu.p(), T, h, 2 * ffn_local,
                    sp ? db_full.p() : db.p(), P(L(l, "w1")).g());
        // Column-parallel input: partial per rank (summed; scattered back to the slices).
        db = tp_exit(sp ? std::move(db_full) : std::move(db), T, "gradient (scattered)", op,
                     OpPhase::kBackward);
      }
      // d x_mid = dx (residual) + norm backward of db.
      op.at("norm2");
      Tensor dmid = alloc(static_cast<size_t>(Tl) * h, "gradient");
      dev.rmsnorm_backward(S.x_mid.p(), P(L(l, "ffn_norm")).v(), db.p(), Tl, h, eps, dmid.p(),
                           P(L(l, "ffn_norm")).g());
      op.at("residual2");
      dev.add(dmid.p(), dx.p(), static_cast<size_t>(Tl) * h, dmid.p());
      // Attention block.
      Tensor dmid_full;
      if (sp) {
        op.at("tp_all_gather");
        dmid_full = tp_gather(dmid.p(), T, h, "gradient (gathered)");
      }
      op.at("attn_out");
      Tensor d_o = alloc(static_cast<size_t>(T) * h_local, "gradient");
      mm_backward(S.o.p(), P(L(l, "wo")).v(), sp ? dmid_full.p() : dmid.p(), T, h_local, h, d_o.p(),
                  P(L(l, "wo")).g());
      op.at("attn_core");
      Tensor dqkv = alloc(static_cast<size_t>(T) * 3 * h_local, "gradient");
      dev.attention_backward(S.qkv.p(), S.o.p(), S.lse.p(), d_o.p(), sequences, seq, heads_local,
                             head_dim, dqkv.p());
      op.at("qkv");
      Tensor da = alloc(static_cast<size_t>(T) * h, "gradient");
      mm_backward(sp ? S.a_full.p() : S.a.p(), P(L(l, "wqkv")).v(), dqkv.p(), T, h, 3 * h_local,
                  da.p(), P(L(l, "wqkv")).g());
      // Column-parallel input: partial per rank (summed; scattered back to the slices).
      da = tp_exit(std::move(da), T, "gradient (scattered)", op, OpPhase::kBackward);
      op.at("norm1");
      Tensor dxin = alloc(static_cast<size_t>(Tl) * h, "gradient");
      dev.rmsnorm_backward(S.x_in.p(), P(L(l, "attn_norm")).v(), da.p(), Tl, h, eps, dxin.p(),
                           P(L(l, "attn_norm")).g());
      op.at("residual1");
      dev.add(dxin.p(), dmid.p(), static_cast<size_t>(Tl) * h, dxin.p());
      dx = std::move(dxin);
      saved[static_cast<size_t>(l - layer_begin)] = LayerSaved{};  // release its activations
      op.close();
      grads_end();
    }
    if (first_stage()) {
      grads_begin(embed_unit());
      float* demb = P("embed").g();
      if (tp > 1) {  // vocab-parallel: this rank's rows, from every token's gradient
        Tensor full;
        if (sp) {
          op.at("embedding_all_gather");
          full = tp_gather(dx.p(), T, h, "gradient (gathered)");
        }
        op.at("embedding");
        const float* g_all = sp ? full.p() : dx.p();
        dev.scatter_rows(g_all, mb.vocab_rows.data(), T, h, demb, /*accumulate=*/true);
      } else {
        op.at("embedding");
        dev.scatter_rows(dx.p(), tok, Tl, h, demb, /*accumulate=*/true);
      }
      op.close();
      grads_end();
    } else {
      mb.dx = std::move(dx);
    }
    op.close();
    end_fetches();
    (void)sequences;
  }

  // One micro-batch through a single-stage model: forward, loss, backward.
  double micro_batch(int64_t step, int64_t first_sequence, int sequences, double loss_scale,
                     std::vector<int64_t>& tokens_per_expert) {
    MicroBatch mb = make_micro_batch(step, first_sequence, sequences);
    forward(mb, loss_scale, tokens_per_expert);
    backward(mb);
    return mb.loss * loss_scale;
  }

  // The micro-batches of one step through this pipeline stage in the order the StepProgram gives
  // its units (schedule_order: GPipe, 1F1B, or interleaved 1F1B over this stage's model chunks).
  // A unit's input comes from the neighbouring virtual stage (chunk c of stage s is virtual stage
  // c * pp + s); its output goes on with a posted send, so neighbours never wait on each other's
  // sends. Returns this stage's share of the loss (the last virtual stage's; 0 elsewhere).
  double pipeline(int64_t step, int64_t first_sequence, int64_t sequences, double loss_scale,
                  std::vector<int64_t>& tokens_per_expert) {
    Communicator& pp = *g.pp;
    const int stage = pp.rank(), stages = pp.size();
    const int vp = static_cast<int>(chunks.size());
    const int mbs = s.micro_batch_size;
    const int count = static_cast<int>(sequences / mbs);
    std::vector<MicroBatch> mb(static_cast<size_t>(vp) * count);
    std::vector<std::unique_ptr<PendingOp>> sends;
    std::vector<Tensor> outbox;  // what the posted sends read, alive until they complete
    double loss = 0;
    // Tags name the receiving chunk, the micro-batch and the direction.
    const auto tag = [count](int chunk, int k, bool backward) {
      return 2 * (chunk * count + k) + (backward ? 1 : 0);
    };
    const int next = (stage + 1) % stages, prev = (stage + stages - 1) % stages;
    for (const ScheduleItem& item : schedule_order(s.schedule, stages, vp, count, stage)) {
      const int c = item.chunk, k = item.micro_batch;
      layer_begin = chunks[static_cast<size_t>(c)].first;
      layer_end = chunks[static_cast<size_t>(c)].second;
      MicroBatch& b = mb[static_cast<size_t>(c) * count + k];
      if (!item.backward) {
        b = make_micro_batch(step, first_sequence + static_cast<int64_t>(k) * mbs, mbs);
        const size_t n = static_cast<size_t>(local_tokens(b.T)) * h;
        if (!first_stage()) {
          b.x = alloc(n, "received activation");
          pp.recv(b.x.p(), n, DType::kFloat32, prev, tag(c, k, false));
        }
        forward(b, loss_scale, tokens_per_expert);
        if (last_stage()) {
          loss += b.loss * loss_scale;
        } else {  // to the next virtual stage: the next rank, or chunk c + 1 of stage 0
          const int to_chunk = stage == stages - 1 ? c + 1 : c;
          sends.push_back(
              pp.send_async(b.x.p(), n, DType::kFloat32, next, tag(to_chunk, k, false)));
          outbox.push_back(std::move(b.x));
        }
      } else {
        const size_t n = static_cast<size_t>(local_tokens(b.T)) * h;
        if (!last_stage()) {
          b.dx = alloc(n, "received gradient");
          pp.recv(b.dx.p(), n, DType::kFloat32, next, tag(c, k, true));
        }
        backward(b);
        if (!first_stage()) {  // to the previous virtual stage
          const int to_chunk = stage == 0 ? c - 1 : c;
          sends.push_back(
              pp.send_async(b.dx.p(), n, DType::kFloat32, prev, tag(to_chunk, k, true)));
          outbox.push_back(std::move(b.dx));
        }
        b = MicroBatch{};  // release its activations
      }
    }
    for (auto& op : sends) op->wait();
    return loss;
  }

  // Adam's bias corrections at step count t.
  std::pair<float, float> bias_corrections(int64_t t) const {
    return {static_cast<float>(1.0 - std::pow(s.beta1, static_cast<double>(t))),
            static_cast<float>(1.0 - std::pow(s.beta2, static_cast<double>(t)))};
  }

  // Delayed update: this step's reduced gradients [first, first + n) start their update. Device
  // states keep the gradients for the next step to apply; off-device ones go to the host, whose
  // cores run Adam over the master copy while the next step computes.
  // (Pending only once the update is on its way: a copy that throws leaves nothing to apply.)
  void stash_update(Space& sp, const float* gsrc, size_t first, size_t n) {
    const auto pend = [&] {
      sp.pending = true;
      sp.pending_t = steps_done;
      sp.pending_first = first;
      sp.pending_n = n;
    };
    if (n == 0) return pend();
    if (sp.states_tier == Tier::kGPU) {
      dev.copy(sp.pending_grads.data(), gsrc, n * sizeof(float));
      return pend();
    }
    CopyEngine& ce = *engine;
    ce.wait(ce.submit(sp.host_grads.data(), gsrc, n * sizeof(float), "grad_offload"));
    collect_copies(std::nullopt);
    const auto [c1, c2] = bias_corrections(steps_done);
    float* master = sp.master.as<float>() + first;
    const float* g = sp.host_grads.as<float>();
    float *m = sp.m.as<float>(), *v = sp.v.as<float>();
    const size_t threads = static_cast<size_t>(std::max(1, s.host_threads));
    const TrainSettings& ts = s;
    Space* space = &sp;
    sp.update = std::async(std::launch::async, [=, &ts] {
      space->update_start = std::chrono::steady_clock::now();
      host_adam_threads(threads, master, g, m, v, n, ts.lr, ts.beta1, ts.beta2, ts.eps, c1, c2);
      // States on SSD go back to their files once updated (evict_ssd skips them meanwhile).
      if (space->states_tier == Tier::kSSD) {
        space->m.evict();
        space->v.evict();
      }
      space->update_end = std::chrono::steady_clock::now();
    });
    pend();
  }

  // Delayed update: the update stash_update started, applied to the values (waiting for the host's
  // Adam); ZeRO-1 then gathers the updated shards.
  void apply_pending(Space& sp, ProgramOpCursor& op, bool experts_space) {
    if (!sp.pending) return;
    sp.pending = false;
    const size_t first = sp.pending_first, n = sp.pending_n;
    float* values = sp.values.as<float>();
    if (n > 0 && sp.states_tier == Tier::kGPU) {
      op.at("optimizer");
      const auto [c1, c2] = bias_corrections(sp.pending_t);
      dev.adam(values + first, sp.pending_grads.as<float>(), sp.m.as<float>(), sp.v.as<float>(), n,
               s.lr, s.beta1, s.beta2, s.eps, c1, c2);
    } else if (n > 0) {
      op.close();       // waiting for the host is no program op's time
      sp.update.get();  // rethrows what the host's update threw
      // Its span, beside the step, as the program's (host stream) optimizer op; the upload that
      // follows is that op's too.
      record_host_op("optimizer", OpPhase::kStep, sp.update_start, sp.update_end);
      op.at("optimizer");
      const float* master = sp.master.as<float>();
      if (sp.values_tier == Tier::kGPU) {
        CopyEngine& ce = *engine;
        ce.wait(ce.submit(values + first, master + first, n * sizeof(float), "param_upload"));
        collect_copies(std::nullopt);
      } else {
        std::memcpy(values + first, master + first, n * sizeof(float));  // host memory or SSD map
      }
    }
    gather_shards(sp, first, op, experts_space);
  }

  // ZeRO-1: every rank's updated shard (this rank's starts at `first`) to every rank, in place.
  void gather_shards(Space& sp, size_t first, ProgramOpCursor& op, bool experts_space) {
    const int ranks = sp.group->size();
    if (s.zero_stage < 1 || ranks <= 1) return;
    op.at(experts_space ? "edp_param_all_gather" : "dp_param_all_gather");
    float* values = sp.values.as<float>();
    sp.group->all_gather(values + first, values, sp.padded / static_cast<size_t>(ranks),
                         DType::kFloat32);
  }

  // Sums a space's gradients over its group and applies Adam (ZeRO-1: on this rank's shard), in
  // place on the space's flat buffers.
  void reduce_and_update(Space& sp) {
    const int n = sp.group->size();
    const bool experts_space = &sp == &expert;
    ProgramOpCursor op(OpPhase::kStep);  // as in forward()
    const size_t shard = sp.padded / n;
    float* values = sp.values.as<float>();
    float* grads = sp.grads.as<float>();
    const float* gsrc = grads;  // the gradients this rank updates with
    size_t first = 0, count = sp.padded;
    // The program issues the buckets in the backward (as gradients become ready); this runner
    // reduces them after it, still the backward's last work.
    if (n > 1) op.at(experts_space ? "edp_grad_bucket" : "dp_grad_bucket", OpPhase::kBackward);
    if (s.zero_stage >= 1 && n > 1) {
      sp.group->reduce_scatter(grads, sp.shard_grads.as<float>(), shard, DType::kFloat32,
                               ReduceOp::kSum);
      gsrc = sp.shard_grads.as<float>();
      first = static_cast<size_t>(sp.group->rank()) * shard;
      count = shard;
    } else if (n > 1) {
      // Gradient buckets: each all-reduce starts as soon as it is issued; wait for all of them.
      // One bucket when the plan names none (<= 0); never fewer than 1 Ki elements per bucket.
      const size_t bucket =
          s.grad_bucket_bytes > 0
              ? std::max<size_t>(1024, static_cast<size_t>(s.grad_bucket_bytes) / 4)
              : sp.padded;
      std::vector<std::unique_ptr<PendingOp>> pending;
      for (size_t b = 0; b < sp.padded; b += bucket)
        pending.push_back(sp.group->all_reduce_async(grads + b, std::min(bucket, sp.padded - b),
                                                     DType::kFloat32, ReduceOp::kSum));
      for (auto& op : pending) op->wait();
    }
    const auto [c1, c2] = bias_corrections(steps_done);
    op.at("optimizer");
    const size_t n_upd = first < sp.total ? std::min(count, sp.total - first) : 0;
    if (s.delayed_update) {
      // ZeRO-Offload's delayed update: apply the previous step's update (the host's, waited for),
      // then start this step's, which the next step's forward and backward run beside.
      apply_pending(sp, op, experts_space);
      op.at("optimizer");  // this step's gradients on their way to the update
      stash_update(sp, gsrc, first, n_upd);
      return;
    }
    if (sp.states_tier == Tier::kGPU) {
      if (n_upd > 0)
        dev.adam(values + first, gsrc, sp.m.as<float>(), sp.v.as<float>(), n_upd, s.lr, s.beta1,
                 s.beta2, s.eps, c1, c2);
    } else if (n_upd > 0) {
      // ZeRO-Offload's update: the gradients down to the host, Adam on the host over the states
      // in host memory (or their files on SSD), the updated values back up when they live on
      // the device (otherwise the host's values are the ones updated).
      // (Gradients kept off the device are on the host already.)
      CopyEngine& ce = *engine;
      const float* host_g = gsrc;
      if (!sp.grads_off()) {
        ce.wait(ce.submit(sp.host_grads.data(), gsrc, n_upd * sizeof(float), "grad_offload"));
        host_g = sp.host_grads.as<float>();
      }
      float* target = sp.values_tier == Tier::kGPU ? sp.master.as<float>() : values;
      float *m = sp.m.as<float>(), *v = sp.v.as<float>();
      host_adam_threads(static_cast<size_t>(std::max(1, s.host_threads)), target + first, host_g, m,
                        v, n_upd, s.lr, s.beta1, s.beta2, s.eps, c1, c2);
      if (sp.values_tier == Tier::kGPU)
        ce.wait(ce.submit(values + first, target + first, n_upd * sizeof(float), "param_upload"));
      collect_copies(std::nullopt);
    }
    gather_shards(sp, first, op, experts_space);
  }

  // Lays a space's parameters out in flat value and gradient buffers (padded to a multiple of the
  // group's size, the padding zero) and points each parameter at its slice.
  void setup_space(Space& sp, bool expert_space, Communicator* group) {
    sp.group = group;
    for (size_t k = 0; k < params->size(); ++k)
      if ((*params)[k].expert == expert_space) {
        sp.members.push_back(k);
        sp.total += (*params)[k].size;
      }
    const int n = group->size();
    sp.padded = (sp.total + n - 1) / n * n;
    const std::string what = expert_space ? "expert parameters" : "dense parameters";
    sp.values_tier = expert_space ? s.placement.expert_params : s.placement.dense_params;
    sp.states_tier = s.placement.optimizer_states;
    sp.grads_tier = s.placement.gradients;
    sp.values = dev.memory().allocate(sp.values_tier, sp.padded * sizeof(float), what);
    sp.grads = dev.memory().allocate(sp.grads_tier, sp.padded * sizeof(float), what + " gradients");
    size_t at = 0;
    for (size_t k : sp.members) {
      Parameter& p = (*params)[k];
      p.value = sp.values.as<float>() + at;
      p.grad = sp.grads.as<float>() + at;
      at += p.size;
    }
    const bool sharded = s.zero_stage >= 1 && n > 1;
    const size_t states = sharded ? sp.padded / n : sp.padded;
    if (sharded)
      sp.shard_grads =
          dev.memory().allocate(Tier::kGPU, states * sizeof(float), "reduced gradient shard");
    sp.m = dev.memory().allocate(sp.states_tier, states * sizeof(float), "Adam momentum");
    sp.v = dev.memory().allocate(sp.states_tier, states * sizeof(float), "Adam variance");
    // (A delayed update reads its own copy of the gradients and updates its own master copy: the
    // next step makes new gradients and computes with the values meanwhile.)
    const bool off = sp.states_tier != Tier::kGPU;
    if (off && (!sp.grads_off() || s.delayed_update)) {
      sp.host_grads =
          dev.memory().allocate(Tier::kCPU, states * sizeof(float), what + " gradients (host)");
    }
    if (off && (sp.values_tier == Tier::kGPU || s.delayed_update))
      sp.master =
          dev.memory().allocate(Tier::kCPU, sp.padded * sizeof(float), what + " (host master)");
    if (!off && s.delayed_update)
      sp.pending_grads = dev.memory().allocate(Tier::kGPU, states * sizeof(float),
                                               what + " gradients (delayed update)");
    if (!sp.streamed() && !sp.grads_off()) return;
    // Fetch units: each parameter belongs to the embedding, a layer ("layer<l>.") or the head.
    sp.unit_range.assign(static_cast<size_t>(layers) + 2, {0, 0});
    sp.unit_members.assign(sp.unit_range.size(), {0, 0});
    std::vector<bool> seen(sp.unit_range.size(), false);
    at = 0;
    size_t largest = 0;
    for (size_t j = 0; j < sp.members.size(); ++j) {
      const Parameter& p = (*params)[sp.members[j]];
      int unit = head_unit();
      if (p.name == "embed")
        unit = embed_unit();
      else if (p.name.rfind("layer", 0) == 0)
        unit = layer_unit(std::stoi(p.name.substr(5)));
      auto& r = sp.unit_range[static_cast<size_t>(unit)];
      auto& mr = sp.unit_members[static_cast<size_t>(unit)];
      if (!seen[static_cast<size_t>(unit)]) {
        r = {at, at};
        mr = {j, j};
      }
      mr.second = j + 1;
      if (r.second != at)
        throw std::logic_error("fetch unit of " + p.name + " is not contiguous in its space");
      seen[static_cast<size_t>(unit)] = true;
      r.second = at + p.size;
      largest = std::max(largest, r.second - r.first);
      at += p.size;
    }
    for (int k = 0; k < (sp.grads_off() ? 2 : 0); ++k) {
      sp.grad_slots.push_back(dev.memory().allocate(Tier::kGPU, largest * sizeof(float),
                                                    what + " gradient slot " + std::to_string(k),
                                                    false));
      sp.grad_staging.push_back(
          dev.memory().allocate(Tier::kCPU, largest * sizeof(float),
                                what + " gradient staging " + std::to_string(k), false));
    }
    for (size_t i = 0; i < (sp.streamed() ? slots() : 0); ++i)
      sp.slots.push_back(dev.memory().allocate(Tier::kGPU, largest * sizeof(float),
                                               what + " slot " + std::to_string(i), false));
    for (size_t i = 0; i < (sp.values_tier == Tier::kSSD ? stagings() : 0); ++i)
      sp.staging.push_back(dev.memory().allocate(Tier::kCPU, largest * sizeof(float),
                                                 what + " staging " + std::to_string(i), false));
  }
};

MoeTrainer::~MoeTrainer() = default;

std::unique_ptr<MoeTrainer> MoeTrainer::create(const ModelSpec& m, const TrainSettings& s,
                                               Device& device, TrainGroups groups, Device* copier) {
  Plan shape;  // what the settings ask of the plan's rules
  shape.placement = s.placement;
  shape.zero_stage = s.zero_stage;
  std::vector<ConfigIssue> issues = trainer_unsupported(m, shape);
  if (s.prefetch.ssd < 0 || s.prefetch.pcie < 0)
    issues.push_back({"plan.prefetch.depth", "must be >= 0"});
  if (s.prefetch.ssd < s.prefetch.pcie)
    issues.push_back({"plan.prefetch",
                      "SSD reads must run at least as far ahead as the copies "
                      "to the device that wait for them"});
  const int dp = groups.dp->size(), ep = groups.ep->size();
  const int64_t experts = m.moe ? m.moe->num_experts : 0;
  if (m.moe && experts % ep != 0)
    issues.push_back({"plan.ep", std::to_string(ep) + " does not divide the " +
                                     std::to_string(experts) + " experts"});
  if (!m.moe && ep != 1) issues.push_back({"plan.ep", "a dense model has no experts to split"});
  if ((groups.ep_intra != nullptr) != (groups.ep_inter != nullptr) ||
      (groups.ep_intra && groups.ep_intra->size() * groups.ep_inter->size() != ep))
    issues.push_back({"plan.dispatch",
                      "the hierarchical all-to-all needs intra-node x inter-node "
                      "EP groups that multiply to ep = " +
                          std::to_string(ep)});
  if (s.global_batch % (static_cast<int64_t>(dp) * s.micro_batch_size) != 0)
    issues.push_back(
        {"workload.global_batch_size", std::to_string(s.global_batch) +
                                           " is not a multiple of dp * micro_batch_size = " +
                                           std::to_string(dp * s.micro_batch_size)});
  if (!issues.empty()) throw ConfigError(std::move(issues));

  std::unique_ptr<MoeTrainer> t(new MoeTrainer());
  t->impl_ = std::make_unique<Impl>(m, s, device, groups);
  Impl& I = *t->impl_;
  static_cast<ModelShape&>(I) = model_shape(m);
  I.seq = static_cast<int>(s.seq_len > 0 ? s.seq_len : m.seq_len);
  I.layer_end = I.layers;
  if (groups.tp && groups.tp->size() > 1) {
    I.tp = groups.tp->size();
    I.tp_rank = groups.tp->rank();
    if (I.heads % I.tp != 0 || m.ffn_hidden_size % I.tp != 0 || m.vocab_size % I.tp != 0)
      throw ConfigError("plan.tp",
                        std::to_string(I.tp) +
                            " must divide the attention heads, the FFN width and the vocabulary");
    I.sp = s.sequence_parallel && !groups.ppmoe;
    if (m.moe && !groups.ppmoe && !I.sp)
      throw ConfigError("plan.sequence_parallel",
                        "tensor parallelism with all-to-all dispatch needs sequence parallelism "
                        "(each TP rank dispatches its slice of the tokens)");
    if (I.sp && (static_cast<int64_t>(s.micro_batch_size) * I.seq) % I.tp != 0)
      throw ConfigError("plan.sequence_parallel",
                        "tp " + std::to_string(I.tp) + " must divide a micro-batch's " +
                            std::to_string(s.micro_batch_size * I.seq) + " tokens");
    if (I.sp && s.capacity_factor > 0)
      throw ConfigError("plan.capacity_factor",
                        "the CPU runner does not drop per sequence-parallel slice");
  }
  I.ppmoe = groups.ppmoe && m.moe.has_value();
  if (m.moe && !s.routing_share.empty()) {
    if (static_cast<int64_t>(s.routing_share.size()) != experts)
      throw ConfigError("workload.routing", "has " + std::to_string(s.routing_share.size()) +
                                                " expert shares for " + std::to_string(experts) +
                                                " experts");
    for (double x : s.routing_share) I.log_share.push_back(std::log(std::max(x, 1e-30)));
  }
  for (const auto& shares : s.routing_layer_share) {
    if (!shares.empty() && static_cast<int64_t>(shares.size()) != experts)
      throw ConfigError("workload.routing.per_layer",
                        "a layer has " + std::to_string(shares.size()) + " expert shares for " +
                            std::to_string(experts) + " experts");
    auto& logs = I.log_layer_share.emplace_back();
    for (double x : shares) logs.push_back(std::log(std::max(x, 1e-30)));
  }
  I.heads_local = I.heads / I.tp;
  I.h_local = I.heads_local * I.head_dim;
  if (groups.pp && groups.pp->size() > 1) {
    const int stages = groups.pp->size();
    if (static_cast<int>(s.stage_layers.size()) != stages ||
        std::accumulate(s.stage_layers.begin(), s.stage_layers.end(), 0) != I.layers)
      throw ConfigError("plan.stage_layers", "the pipeline has " + std::to_string(stages) +
                                                 " stages; give each its layers (summing to " +
                                                 std::to_string(I.layers) + ")");
    // Virtual stage (chunk c, stage s) holds stage_layers[s] / vp layers; virtual stages run
    // chunk-major, so layer indices grow along (c, s) (Megatron's interleaving).
    const int vp = s.schedule == Schedule::kInterleaved1F1B ? std::max(s.vp, 1) : 1;
    for (int st = 0; st < stages; ++st)
      if (s.stage_layers[static_cast<size_t>(st)] % vp != 0)
        throw ConfigError("plan.vp", std::to_string(vp) + " chunks must divide stage " +
                                         std::to_string(st) + "'s " +
                                         std::to_string(s.stage_layers[static_cast<size_t>(st)]) +
                                         " layers");
    const int64_t micro_batches =
        s.global_batch / groups.dp->size() / std::max(s.micro_batch_size, 1);
    if (vp > 1 && micro_batches % stages != 0)
      throw ConfigError("plan.schedule", "interleaved 1F1B needs the micro-batches per step (" +
                                             std::to_string(micro_batches) +
                                             ") to be a multiple of pp " + std::to_string(stages));
    // Tags: 2 per (chunk, micro-batch), at most 32767.
    const int64_t units = static_cast<int64_t>(vp) * micro_batches;
    if (2 * units > 32767)
      throw ConfigError("plan.vp",
                        "the CPU runner's pipeline tags hold up to 16383 chunk x "
                        "micro-batch units per step; this plan has " +
                            std::to_string(units));
    const int stage = groups.pp->rank();
    int next = 0;
    for (int c = 0; c < vp; ++c)
      for (int st = 0; st < stages; ++st) {
        const int n = s.stage_layers[static_cast<size_t>(st)] / vp;
        if (st == stage) I.chunks.emplace_back(next, next + n);
        next += n;
      }
  } else {
    I.chunks.emplace_back(0, I.layers);
  }
  I.ffn_local = I.ffn / I.tp;
  if (m.moe) {
    // PPMoE: the experts are spread over the TP group (ep = tp).
    const int ep_size = I.ppmoe ? I.tp : ep;
    const int ep_rank = I.ppmoe ? I.tp_rank : groups.ep->rank();
    I.local_experts = I.experts / ep_size;
    I.first_expert = ep_rank * I.local_experts;
    for (int j = 0; j < I.local_experts; ++j) I.slot_expert.push_back(I.first_expert + j);
    if (!s.rank_experts.empty()) {
      // Elastic replicas (SE-MoE): the plan's placement, every EP rank's slots.
      if (I.ppmoe || groups.ep_intra)
        throw ConfigError("plan.expert_replicas",
                          "the CPU runner replicates experts with the flat all_to_all only");
      if (static_cast<int>(s.rank_experts.size()) != ep)
        throw ConfigError("plan.expert_replicas",
                          "the placement names " + std::to_string(s.rank_experts.size()) +
                              " EP ranks, the EP group has " + std::to_string(ep));
      I.rank_slots = s.rank_experts;
      I.copies_of.assign(static_cast<size_t>(I.experts), {});
      for (int r = 0; r < ep; ++r)
        for (int e : I.rank_slots[r]) {
          if (e < 0 || e >= I.experts)
            throw ConfigError("plan.expert_replicas", "expert " + std::to_string(e));
          auto& copies = I.copies_of[static_cast<size_t>(e)];
          if (std::find(copies.begin(), copies.end(), r) != copies.end())
            throw ConfigError("plan.expert_replicas", "two copies of expert " + std::to_string(e) +
                                                          " on EP rank " + std::to_string(r));
          copies.push_back(r);
        }
      for (int e = 0; e < I.experts; ++e)
        if (I.copies_of[static_cast<size_t>(e)].empty())
          throw ConfigError("plan.expert_replicas",
                            "expert " + std::to_string(e) + " has no copy on any EP rank");
      I.slot_expert = I.rank_slots[static_cast<size_t>(ep_rank)];
      I.local_experts = static_cast<int>(I.slot_expert.size());
      // One group per replicated expert: its copies (every EP rank takes part in each split).
      for (int e = 0; e < I.experts; ++e) {
        const auto& copies = I.copies_of[static_cast<size_t>(e)];
        if (copies.size() < 2) continue;
        const bool mine = std::find(copies.begin(), copies.end(), ep_rank) != copies.end();
        auto group = groups.ep->split(mine ? 0 : 1 + ep_rank, ep_rank,
                                      "replicas of expert " + std::to_string(e));
        if (mine) I.replica_groups.emplace_back(e, std::move(group));
      }
    }
  }
  t->first_expert_ = I.first_expert;
  t->local_experts_ = I.local_experts;
  I.params = &t->params_;
  auto add = [&](const std::string& name, size_t n, bool expert,
                 std::vector<size_t> global_index = {}) {
    Parameter p;
    p.name = name;
    p.size = n;
    p.expert = expert;
    p.global_index = std::move(global_index);
    I.index[name] = t->params_.size();
    t->params_.push_back(std::move(p));
  };
  const size_t h = static_cast<size_t>(I.h);
  // Tensor-parallel shards as maps into the whole tensors (Megatron's splits): QKV and the FFN's
  // gate/up keep this rank's columns of each part, the projections after them its rows.
  const size_t hl = static_cast<size_t>(I.h_local), fl = static_cast<size_t>(I.ffn_local);
  const size_t tr = static_cast<size_t>(I.tp_rank);
  auto columns = [](size_t rows_n, size_t cols_n, const std::vector<size_t>& keep) {
    std::vector<size_t> idx;
    if (keep.size() == cols_n) return idx;  // the whole tensor
    idx.reserve(rows_n * keep.size());
    for (size_t r = 0; r < rows_n; ++r)
      for (size_t c : keep) idx.push_back(r * cols_n + c);
    return idx;
  };
  auto rows = [&](size_t cols_n, size_t first, size_t count) {
    std::vector<size_t> idx;
    if (I.tp == 1) return idx;
    idx.reserve(count * cols_n);
    for (size_t r = first; r < first + count; ++r)
      for (size_t c = 0; c < cols_n; ++c) idx.push_back(r * cols_n + c);
    return idx;
  };
  std::vector<size_t> qkv_cols, ffn_cols;
  for (size_t part = 0; part < 3; ++part)
    for (size_t c = 0; c < hl; ++c) qkv_cols.push_back(part * h + tr * hl + c);
  for (size_t part = 0; part < 2; ++part)
    for (size_t c = 0; c < fl; ++c)
      ffn_cols.push_back(part * static_cast<size_t>(I.ffn) + tr * fl + c);
  // Under TP the embedding's rows and the head's columns are split over the vocabulary.
  I.vocab_local = I.vocab / I.tp;
  I.vocab_first = I.tp_rank * I.vocab_local;
  const size_t vl = static_cast<size_t>(I.vocab_local), vf = static_cast<size_t>(I.vocab_first);
  std::vector<size_t> vocab_cols;
  for (size_t c = 0; c < vl; ++c) vocab_cols.push_back(vf + c);
  if (I.chunks.front().first == 0) add("embed", vl * h, false, rows(h, vf, vl));
  for (int l = 0; l < I.layers; ++l) {
    const bool mine = std::any_of(I.chunks.begin(), I.chunks.end(),
                                  [l](const auto& c) { return l >= c.first && l < c.second; });
    if (!mine) continue;
    add(Impl::L(l, "attn_norm"), h, false);
    add(Impl::L(l, "wqkv"), h * 3 * hl, false, columns(h, 3 * h, qkv_cols));
    add(Impl::L(l, "wo"), hl * h, false, rows(h, tr * hl, hl));
    add(Impl::L(l, "ffn_norm"), h, false);
    if (m.is_moe_layer(l)) {
      add(Impl::L(l, "router"), h * static_cast<size_t>(I.experts), false);
      for (int j = 0; j < I.local_experts; ++j) {
        add(Impl::E(l, I.slot_expert[j], "w1"), h * 2 * static_cast<size_t>(I.f), true);
        add(Impl::E(l, I.slot_expert[j], "w2"), static_cast<size_t>(I.f) * h, true);
      }
    } else {
      add(Impl::L(l, "w1"), h * 2 * fl, false,
          columns(h, 2 * static_cast<size_t>(I.ffn), ffn_cols));
      add(Impl::L(l, "w2"), fl * h, false, rows(h, tr * fl, fl));
    }
  }
  if (I.chunks.back().second == I.layers) {
    add("final_norm", h, false);
    add("head", h * vl, false, columns(h, static_cast<size_t>(I.vocab), vocab_cols));
  }
  I.copier = copier ? copier : &device;
  I.leads = s.prefetch;
  if (s.placement != Placement{}) {
    I.storage.emplace(*I.copier);
    I.engine.emplace(*I.copier);
  }
  I.setup_space(I.dense, false, groups.dp);
  I.setup_space(I.expert, true, groups.expert_dp);
  if (I.sp)
    for (size_t k = 0; k < t->params_.size(); ++k) {
      const std::string& name = t->params_[k].name;
      const auto ends_with = [&name](const std::string& suffix) {
        return name.size() >= suffix.size() &&
               name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
      };
      if (ends_with("_norm") || ends_with(".router")) I.tp_partial_grads.push_back(k);
    }
  // Initialised on the host, copied to wherever each parameter lives.
  std::vector<float> init;
  for (Parameter& p : t->params_) {
    init.resize(p.size);
    init_values(s.seed, p.name, p.global_index, p.size, s.init_std, init.data());
    device.copy(p.v(), init.data(), p.size * sizeof(float));
  }
  for (Impl::Space* sp : {&I.dense, &I.expert})
    if (sp->master) device.copy(sp->master.data(), sp->values.data(), sp->padded * sizeof(float));
  I.evict_ssd();
  return t;
}

StepStats MoeTrainer::forward_backward(int64_t step_index) {
  Impl& I = *impl_;
  for (Impl::Space* sp : {&I.dense, &I.expert})
    if (sp->padded > 0) I.dev.zero(sp->grads.data(), sizeof(float) * sp->padded);
  StepStats st;
  I.dropped = 0;
  I.tier_stats = {};
  // Counted per (layer, expert) while the step runs; summed over layers at its end.
  st.tokens_per_layer_expert.assign(static_cast<size_t>(I.layers) * I.experts, 0);
  const int dp = I.g.dp->size();
  const int64_t per_rank = I.s.global_batch / dp;
  const int64_t first = static_cast<int64_t>(I.g.dp->rank()) * per_rank;
  const double scale = 1.0 / (static_cast<double>(I.s.global_batch) * I.seq);
  if (!I.g.pp || I.g.pp->size() == 1) {
    for (int64_t b = 0; b < per_rank; b += I.s.micro_batch_size)
      st.loss += I.micro_batch(step_index, first + b, I.s.micro_batch_size, scale,
                               st.tokens_per_layer_expert);
  } else {
    st.loss = I.pipeline(step_index, first, per_rank, scale, st.tokens_per_layer_expert);
  }
  st.tokens_per_expert.assign(static_cast<size_t>(I.experts), 0);
  for (size_t i = 0; i < st.tokens_per_layer_expert.size(); ++i)
    st.tokens_per_expert[i % static_cast<size_t>(I.experts)] += st.tokens_per_layer_expert[i];
  I.settle_all();
  st.dropped = I.dropped;
  st.tiers = I.tier_stats;
  return st;
}

StepStats MoeTrainer::step(int64_t step_index) {
  Impl& I = *impl_;
  StepStats st = forward_backward(step_index);
  ++I.steps_done;
  // Sequence parallel: the replicated parameters (norms, router) saw only this rank's tokens.
  // (The vocab-parallel loss is the whole micro-batch's on every TP rank.)
  if (I.sp) {
    for (size_t k : I.tp_partial_grads)
      I.g.tp->all_reduce(params_[k].g(), params_[k].size, DType::kFloat32, ReduceOp::kSum);
  }
  // Elastic replicas: each copy's gradient covers the rows dealt to it; the copies sum them and
  // so stay identical.
  for (auto& [e, group] : I.replica_groups)
    for (Parameter& p : params_)
      if (p.expert && p.name.find(".expert" + std::to_string(e) + ".") != std::string::npos)
        group->all_reduce(p.g(), p.size, DType::kFloat32, ReduceOp::kSum);
  I.reduce_and_update(I.dense);
  if (!I.expert.members.empty()) I.reduce_and_update(I.expert);
  I.evict_ssd();
  st.tiers = I.tier_stats;  // the update's copies too
  I.g.dp->all_reduce(&st.loss, 1, DType::kFloat64, ReduceOp::kSum);
  // Only the last stage computed a loss: every stage reports the batch's.
  if (I.g.pp && I.g.pp->size() > 1)
    I.g.pp->all_reduce(&st.loss, 1, DType::kFloat64, ReduceOp::kSum);
  return st;
}

void MoeTrainer::finish_update() {
  Impl& I = *impl_;
  ProgramOpCursor op(OpPhase::kStep);
  I.apply_pending(I.dense, op, false);
  if (!I.expert.members.empty()) I.apply_pending(I.expert, op, true);
  I.evict_ssd();
}

std::vector<float> MoeTrainer::values(const Parameter& p) const {
  std::vector<float> out(p.size);
  if (p.size > 0) impl_->dev.copy(out.data(), p.v(), p.size * sizeof(float));
  return out;
}

std::vector<float> MoeTrainer::gradients(const Parameter& p) const {
  std::vector<float> out(p.size);
  if (p.size > 0) impl_->dev.copy(out.data(), p.g(), p.size * sizeof(float));
  return out;
}

ParameterError parameter_error(const MoeTrainer& run, const MoeTrainer& reference) {
  std::map<std::string, const Parameter*> by_name;
  for (const Parameter& p : reference.parameters()) by_name[p.name] = &p;
  ParameterError out;
  double all_diff = 0, all_scale = 1e-30;
  for (const Parameter& p : run.parameters()) {
    const auto it = by_name.find(p.name);
    if (it == by_name.end() || (p.global_index.empty() && it->second->size != p.size))
      throw std::invalid_argument("parameter_error: the reference has no " + p.name +
                                  " of that size");
    const Parameter& q = *it->second;
    const std::vector<float> pv = run.values(p), qv = reference.values(q);
    // A shard is compared with the elements of the whole tensor it holds.
    double diff = 0, scale = 1e-30;
    for (size_t i = 0; i < p.size; ++i) {
      const size_t gi = p.global_index.empty() ? i : p.global_index[i];
      if (gi >= q.size) throw std::invalid_argument("parameter_error: " + p.name + " shard index");
      const double d = double{pv[i]} - qv[gi];
      diff += d * d;
      scale += double{qv[gi]} * qv[gi];
    }
    all_diff += diff;
    all_scale += scale;
    const double rel = std::sqrt(diff) / std::sqrt(scale);
    if (rel > out.worst_tensor) out.worst_tensor = rel, out.worst = p.name;
  }
  out.relative = std::sqrt(all_diff) / std::sqrt(all_scale);
  return out;
}

}  // namespace switchyard
