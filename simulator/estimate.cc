#include <algorithm>
#include <cmath>

#include "cost_models/memory.h"
#include "simulator/op_cost.h"
#include "simulator/simulator.h"

namespace switchyard {

void fill_inference_times(Prediction& p, const Workload& w, double prefill_s,
                          double decode_step_s) {
  const InferenceSpec& inf = *w.inference;
  InferenceTimes t;
  t.prefill_s = prefill_s;
  t.decode_step_s = decode_step_s;
  t.latency_s = prefill_s + static_cast<double>(inf.decode_tokens) * decode_step_s;
  if (prefill_s > 0)
    t.prefill_tokens_per_s = static_cast<double>(inf.prefill_batch * inf.prompt_len) / prefill_s;
  if (t.latency_s > 0)
    t.generated_tokens_per_s =
        static_cast<double>(inf.decode_batch * inf.decode_tokens) / t.latency_s;
  p.inference = t;
  p.step_time_s = t.latency_s;
}

void fill_throughput(Prediction& p, const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                     const Workload& w) {
  p.gpus = plan.world_size();
  if (p.inference && w.inference) {
    // Inference: every token of the prompts and every generated one, forward only.
    const InferenceSpec& inf = *w.inference;
    p.tokens_per_step = static_cast<double>(inf.prefill_batch * inf.prompt_len +
                                            inf.decode_batch * inf.decode_tokens);
    if (p.step_time_s <= 0) return;
    p.tokens_per_s = p.inference->generated_tokens_per_s;
    p.tokens_per_s_per_gpu = p.tokens_per_s / p.gpus;
    const double flops = flops_per_token(m, inf.prompt_len + inf.decode_tokens / 2).forward *
                         p.tokens_per_step / p.step_time_s / p.gpus;
    p.model_tflops_per_gpu = flops / 1e12;
    const double peak = c.gpu.peak_flops(w.precision);
    p.mfu = peak > 0 ? flops / peak : 0;
    return;
  }
  const int64_t seq = w.effective_seq_len(m);
  p.tokens_per_step = static_cast<double>(w.global_batch_size) * static_cast<double>(seq);
  if (p.step_time_s <= 0) return;
  p.tokens_per_s = p.tokens_per_step / p.step_time_s;
  p.tokens_per_s_per_gpu = p.tokens_per_s / p.gpus;
  const double flops = flops_per_token(m, seq).total() * p.tokens_per_s_per_gpu;
  p.model_tflops_per_gpu = flops / 1e12;
  const double peak = c.gpu.peak_flops(w.precision);
  p.mfu = peak > 0 ? flops / peak : 0;
}

namespace {

// Time sums of one op list, split the way the breakdown reports them.
struct ListTime {
  double sync_s = 0;  // everything the unit waits for
  double compute_s = 0;
  double comm_s[kNumStreams] = {};
  double async_s = 0;  // gradient buckets (per micro-batch that issues them)
  double last_bucket_s = 0;
  double copy_s = 0;      // copies down the storage tiers (offloaded parameters) units wait for
  double ssd_copy_s = 0;  // of which on the SSD tier's stream
  double pcie_stream_s = 0, ssd_stream_s = 0;  // every copy's time on each copy stream
};

// `waited_copies_only`: leave out the copies no op of the list waits for (the ring's loads of the
// next pass, which the next pass counts).
ListTime sum_ops(const std::vector<OpTemplate>& ops, const StepProgram& frame, const ClusterSpec& c,
                 const CostProfile& prof, Precision prec, bool waited_copies_only = false) {
  std::vector<bool> waited(waited_copies_only ? ops.size() : 0, false);
  if (waited_copies_only)
    for (size_t i = ops.size(); i-- > 0;) {
      const OpTemplate& op = ops[i];
      if (op.wait_for >= 0 && (op.kind != OpKind::kCopy || waited[i]))
        waited[static_cast<size_t>(op.wait_for)] = true;  // (wait_for points back)
    }
  ListTime t;
  for (size_t i = 0; i < ops.size(); ++i) {
    const OpTemplate& op = ops[i];
    if (waited_copies_only && op.kind == OpKind::kCopy && !waited[i]) continue;
    const double s = op_cost(op, frame, c, prof, prec).time_s;
    if (op.kind == OpKind::kCopy) {
      (op.stream == StreamKind::kStorage ? t.ssd_stream_s : t.pcie_stream_s) += s;
      // Copies down the levels bring what a unit waits for; gradients going up (and on to the
      // SSD) are waited for by nothing before the step's end.
      if (op.copy == CopyPath::kHostToGpu || op.copy == CopyPath::kSsdToHost) {
        t.copy_s += s;
        if (op.stream == StreamKind::kStorage) t.ssd_copy_s += s;
      }
      continue;
    }
    if (op.async) {
      t.async_s += s;
      t.last_bucket_s = s;
      continue;
    }
    t.sync_s += s;
    if (op.stream == StreamKind::kCompute)
      t.compute_s += s;
    else
      t.comm_s[static_cast<int>(op.stream)] += s;
  }
  return t;
}

// Copy time a layer cannot hide, in the steady state. Each level's copies run one after another
// on their own stream (SSD reads, copies over PCIe), so each has one layer's time to hide behind,
// however far ahead it is issued (the lead only absorbs differences between layers): right before
// use, both levels add up; SSD reads ahead ("down"), the PCIe copy is exposed and the read hides
// behind the layer's compute and that copy; both ahead, the slower level is what the compute must
// cover.
double exposed_copy(const ListTime& t, FetchLeads leads) {
  const double pcie = t.copy_s - t.ssd_copy_s, ssd = t.ssd_copy_s;
  if (leads.pcie == 0 && leads.ssd == 0) return t.copy_s;
  if (leads.pcie == 0) return pcie + std::max(0.0, ssd - (t.sync_s + pcie));
  return std::max(0.0, std::max(pcie, ssd) - t.sync_s);
}

struct UnitTime {
  double fwd = 0, bwd = 0, compute = 0, async = 0, last_bucket = 0, stall = 0;
  double pcie_stream = 0, ssd_stream = 0;  // per micro-batch, every copy on each copy stream
  double comm[kNumStreams] = {};
  FetchLeads leads;
  void add(const ListTime& f, const ListTime& b, double times) {
    const double stall_f = exposed_copy(f, leads), stall_b = exposed_copy(b, leads);
    fwd += times * (f.sync_s + stall_f);
    bwd += times * (b.sync_s + stall_b);
    stall += times * (stall_f + stall_b);
    pcie_stream += times * (f.pcie_stream_s + b.pcie_stream_s);
    ssd_stream += times * (f.ssd_stream_s + b.ssd_stream_s);
    compute += times * (f.compute_s + b.compute_s);
    for (int i = 0; i < kNumStreams; ++i) comm[i] += times * (f.comm_s[i] + b.comm_s[i]);
    async += times * (f.async_s + b.async_s);
    if (b.last_bucket_s > 0) last_bucket = b.last_bucket_s;
  }
};

}  // namespace

namespace {

// Inference: the prefill chunk and one decode step, each its synchronous ops plus the parameter
// copies it cannot hide (all of them without prefetch; what exceeds the compute with it).
Prediction estimate_inference(const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                              const Workload& w, const CostProfile& prof) {
  Prediction p;
  p.fidelity = "estimate";
  const StepProgram prog = lower(m, c, plan, w);
  const bool overlap = plan.prefetch.direction != PrefetchDirection::kNone;
  double chunk_s[2] = {0, 0};
  for (int ch = 0; ch < 2; ++ch) {
    // The prefill's loads of the first decode step's sections are that step's (each decode step
    // loads the next one's).
    const ListTime t = sum_ops(prog.stages[0].chunks[static_cast<size_t>(ch)].forward, prog, c,
                               prof, w.precision, ch == 0 && plan.ring_sections > 0);
    chunk_s[ch] = overlap ? std::max(t.sync_s, t.copy_s) : t.sync_s + t.copy_s;
    const double times = ch == 0 ? 1.0 : static_cast<double>(w.inference->decode_tokens);
    p.time.compute_s += times * t.compute_s;
    p.time.tp_comm_s += times * t.comm_s[static_cast<int>(StreamKind::kTpComm)];
    p.time.ep_comm_s += times * t.comm_s[static_cast<int>(StreamKind::kEpComm)];
    p.time.cp_comm_s += times * t.comm_s[static_cast<int>(StreamKind::kCpComm)];
    p.time.stall_s += times * (chunk_s[ch] - t.sync_s);
  }
  fill_inference_times(p, w, chunk_s[0], chunk_s[1]);
  p.memory = peak_memory_per_gpu(m, c, plan, w, prof);
  p.peak = p.memory.total();
  p.peak_stage = 0;
  p.stage_peak_gpu_bytes = {p.peak.gpu};
  p.notes.push_back(
      "estimate: prefill and one decode step at the average context, each its ops in sequence; "
      "parameter copies overlap the compute entirely when the plan prefetches");
  fill_throughput(p, m, c, plan, w);
  return p;
}

}  // namespace

Prediction estimate(const ModelSpec& m, const ClusterSpec& c, const Plan& plan, const Workload& w,
                    const CostProfile& prof) {
  if (w.mode == Mode::kInference) return estimate_inference(m, c, plan, w, prof);
  Prediction p;
  p.fidelity = "estimate";
  const StepProgram frame = lower_frame(m, c, plan, w);
  const Precision prec = w.precision;
  const int pp = frame.pp, vp = frame.vp, micro_batches = frame.num_micro_batches;

  // One representative layer of each kind, the embedding and the head, costed once.
  const LayerKindsProgram kinds = lower_layer_kinds(m, c, plan, w);
  const ListTime dense_f = sum_ops(kinds.dense.forward, frame, c, prof, prec);
  const ListTime dense_b = sum_ops(kinds.dense.backward, frame, c, prof, prec);
  const ListTime moe_f = sum_ops(kinds.moe.forward, frame, c, prof, prec);
  const ListTime moe_b = sum_ops(kinds.moe.backward, frame, c, prof, prec);
  const ListTime embed_f = sum_ops(kinds.embedding.forward, frame, c, prof, prec);
  const ListTime embed_b = sum_ops(kinds.embedding.backward, frame, c, prof, prec);
  const ListTime head_f = sum_ops(kinds.head.forward, frame, c, prof, prec);
  const ListTime head_b = sum_ops(kinds.head.backward, frame, c, prof, prec);
  std::vector<UnitTime> stage(static_cast<size_t>(pp));
  std::vector<double> step_s(static_cast<size_t>(pp), 0.0);
  std::vector<double> delayed_s(static_cast<size_t>(pp), 0.0);  // beside the step, on the host
  // The step ops' collectives (ZeRO's parameter all-gather): part of step_s, reported as DP
  // communication as simulate reports them.
  std::vector<double> step_dp_s(static_cast<size_t>(pp), 0.0);
  for (int s = 0; s < pp; ++s) {
    UnitTime& u = stage[static_cast<size_t>(s)];
    u.leads = fetch_leads(m, plan);
    u.add(dense_f, dense_b, kinds.dense_layers_per_stage[static_cast<size_t>(s)]);
    u.add(moe_f, moe_b, kinds.moe_layers_per_stage[static_cast<size_t>(s)]);
    if (s == 0) u.add(embed_f, embed_b, 1);
    if (s == pp - 1) u.add(head_f, head_b, 1);
    for (const OpTemplate& op : kinds.step_ops[static_cast<size_t>(s)]) {
      const double t = op_cost(op, frame, c, prof, prec).time_s;
      (op.delayed ? delayed_s : step_s)[static_cast<size_t>(s)] += t;
      if (!op.delayed && op.kind == OpKind::kCollective) step_dp_s[static_cast<size_t>(s)] += t;
    }
  }

  // Pipeline: m units of the slowest stage, plus the fill and drain of the others (divided by vp
  // with interleaving), plus one send per virtual-stage boundary (pp * vp - 1 of them) on the way
  // in and out.
  double tau_max = 0, tau_sum = 0;
  int slowest = 0;
  for (int s = 0; s < pp; ++s) {
    const double tau = stage[static_cast<size_t>(s)].fwd + stage[static_cast<size_t>(s)].bwd;
    tau_sum += tau;
    if (tau > tau_max) {
      tau_max = tau;
      slowest = s;
    }
  }
  const double p2p =
      pp > 1 ? p2p_cost(frame, frame.stages[0].sends_to_next_same_node, c, prof).time_s : 0.0;
  const double fill = (tau_sum - tau_max) / vp;
  const double sends_s = 2.0 * (pp * vp - 1) * p2p;
  const double pipe = micro_batches * tau_max + fill + sends_s;

  // Each stage ends its last backward earlier the further it is from stage 0; gradient buckets
  // overlap that last backward unit; the optimizer step follows (a delayed update runs from the
  // step's start beside everything else; what follows it waits for it).
  double step_time = 0;
  std::vector<double> dp_exposed_s(static_cast<size_t>(pp), 0.0);
  std::vector<double> delayed_exposed_s(static_cast<size_t>(pp), 0.0);
  std::vector<double> copy_tail_s(static_cast<size_t>(pp), 0.0);
  for (int s = 0; s < pp; ++s) {
    const UnitTime& u = stage[static_cast<size_t>(s)];
    const double last_bwd_unit = u.bwd / vp;
    const double end = pipe - s * (stage[static_cast<size_t>(slowest)].bwd / vp);
    // The share of the buckets that cannot run beside compute delays it outright. ZeRO 2-3
    // reduce every micro-batch's gradients: the earlier micro-batches' buckets also have the
    // units after them to hide behind.
    const double f = prof.comm_compute_overlap;
    const bool every_mb = plan.zero_stage >= 2;
    const double buckets = every_mb ? micro_batches * u.async : u.async;
    const double window = every_mb ? (micro_batches - 1) * (u.fwd + u.bwd) : 0.0;
    const double dp_exposed = (1 - f) * buckets + std::max(f * buckets - window - last_bwd_unit,
                                                           buckets > 0 ? f * u.last_bucket : 0.0);
    dp_exposed_s[static_cast<size_t>(s)] = dp_exposed;
    // The step also waits for every copy (gradients going down and on to the SSD too): each copy
    // stream carries all micro-batches' copies, however well they overlap the compute.
    const double copies = micro_batches * std::max(u.pcie_stream, u.ssd_stream);
    copy_tail_s[static_cast<size_t>(s)] = std::max(0.0, copies - (end + dp_exposed));
    const double ready = std::max(end + dp_exposed, copies);
    delayed_exposed_s[static_cast<size_t>(s)] =
        std::max(0.0, delayed_s[static_cast<size_t>(s)] - ready);
    step_time = std::max(step_time, std::max(ready, delayed_s[static_cast<size_t>(s)]) +
                                        step_s[static_cast<size_t>(s)]);
  }
  p.step_time_s = step_time;
  p.critical_stage = slowest;
  // The breakdown is the busiest stage's: its own units; the rest of the step is its bubble.
  const UnitTime& u = stage[static_cast<size_t>(slowest)];
  p.time.compute_s = micro_batches * u.compute;
  p.time.tp_comm_s = micro_batches * u.comm[static_cast<int>(StreamKind::kTpComm)];
  p.time.cp_comm_s = micro_batches * u.comm[static_cast<int>(StreamKind::kCpComm)];
  p.time.ep_comm_s = micro_batches * u.comm[static_cast<int>(StreamKind::kEpComm)];
  p.time.dp_comm_s = micro_batches * u.comm[static_cast<int>(StreamKind::kDpComm)] +
                     dp_exposed_s[static_cast<size_t>(slowest)] +
                     step_dp_s[static_cast<size_t>(slowest)];
  p.time.pp_comm_s = sends_s;
  p.time.optimizer_s = step_s[static_cast<size_t>(slowest)] -
                       step_dp_s[static_cast<size_t>(slowest)] +
                       delayed_exposed_s[static_cast<size_t>(slowest)];
  p.delayed_update_s = delayed_s[static_cast<size_t>(slowest)];
  p.time.stall_s = micro_batches * u.stall + copy_tail_s[static_cast<size_t>(slowest)];
  p.time.bubble_s = std::max(
      0.0, step_time - (p.time.compute_s + p.time.tp_comm_s + p.time.cp_comm_s + p.time.ep_comm_s +
                        p.time.dp_comm_s + p.time.pp_comm_s + p.time.optimizer_s + p.time.stall_s));

  double best = -1;
  for (int s = 0; s < pp; ++s) {
    const MemoryBreakdown mb = memory_per_gpu(m, c, plan, w, prof, s);
    const double gpu = mb.total().gpu;
    p.stage_peak_gpu_bytes.push_back(gpu);
    if (gpu > best) {
      best = gpu;
      p.memory = mb;
    }
  }
  p.peak = p.memory.total();
  p.peak_stage = p.memory.stage;
  // Where the closed form departs from the event simulation.
  p.notes.push_back(
      "estimate: pipeline time = micro-batches x slowest stage + the other stages' fill and drain "
      "(divided by vp); gradient buckets are assumed to overlap the last backward unit; concurrent "
      "collectives do not share links; with prefetch each level's copy of a layer hides behind one "
      "layer's time (each level's copies run in turn); --fidelity simulate times every op");
  fill_throughput(p, m, c, plan, w);
  return p;
}

}  // namespace switchyard
