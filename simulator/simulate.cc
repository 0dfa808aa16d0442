// Discrete-event simulation of a StepProgram. See simulator.h for the model.
#include <algorithm>
#include <cmath>
#include <memory>
#include <queue>

#include "cost_models/memory.h"
#include "simulator/op_cost.h"
#include "simulator/simulator.h"

namespace switchyard {
namespace {

constexpr int kNoInst = -1;

// An op's time and link, as an instance needs them (OpCost's pieces are resolved in build()).
struct InstCost {
  double time_s = 0;
  Link link = Link::kNone;
};

// One op instance. Hundreds of thousands of these make a large step: the fields are packed (80
// bytes), so the array stays small and in cache.
struct Inst {
  const OpTemplate* op = nullptr;  // nullptr: pipeline send of a unit's output
  double start = -1;
  double end = -1;
  double remaining = 0;  // work left at full link bandwidth (shared links)
  double time_s = 0;     // its cost
  int32_t stage = 0;
  int32_t micro_batch = 0;
  int32_t pending = 0;    // unfinished dependencies
  int32_t dep_begin = 0;  // dependents: [dep_begin, dep_end) of the CSR array
  int32_t dep_end = 0;
  int32_t last_dep = kNoInst;  // the dependency that finished last
  uint32_t version = 0;        // bumps when a shared link reschedules the op's end
  int16_t chunk = 0;
  Link link = Link::kNone;  // the link it loads, shared with concurrent ones
  StreamKind stream = StreamKind::kCompute;
  // The compute stream's share of a collective it cannot overlap (comm_compute_overlap < 1): an
  // instance on the compute stream beside the collective, reported as that collective's exposed
  // communication.
  bool shadow = false;
};
static_assert(sizeof(Inst) <= 80, "Inst grew: a large step's instances leave the cache");

struct Event {
  double time;
  int32_t inst;
  uint32_t version;
  bool operator>(const Event& o) const {
    return time > o.time || (time == o.time && inst > o.inst);
  }
};

// Processor sharing on one link of one stage: k concurrent ops each progress at 1/k.
struct LinkState {
  std::vector<int32_t> active;
  double last_t = 0;
};

struct UnitRef {
  int32_t first = kNoInst;  // first synchronous op
  int32_t last = kNoInst;   // last synchronous op
  int32_t send = kNoInst;   // its send to the neighbouring virtual stage
};

class Simulation {
 public:
  Simulation(const ModelSpec& m, const ClusterSpec& c, const Plan& plan, const Workload& w,
             const CostProfile& prof)
      : inference_(w.mode == Mode::kInference),
        m_(m),
        c_(c),
        plan_(plan),
        w_(w),
        prof_(prof),
        owned_(std::make_shared<StepProgram>(lower(m, c, plan, w))),
        prog_(*owned_) {}

  Prediction run(const SimulateOptions& options) {
    build();
    loop();
    return report(options);
  }

 private:
  size_t unit_index(int stage, int chunk, int mb, bool backward) const {
    return ((static_cast<size_t>(stage) * prog_.vp + static_cast<size_t>(chunk)) *
                prog_.num_micro_batches +
            static_cast<size_t>(mb)) *
               2 +
           (backward ? 1 : 0);
  }

  int32_t add(const OpTemplate* op, InstCost cost, int stage, int mb, int chunk,
              StreamKind stream) {
    Inst in;
    in.op = op;
    in.time_s = cost.time_s;
    in.link = cost.link;
    in.stage = stage;
    in.micro_batch = mb;
    in.chunk = static_cast<int16_t>(chunk);
    in.stream = stream;
    insts_.push_back(in);
    const int32_t id = static_cast<int32_t>(insts_.size() - 1);
    queues_[static_cast<size_t>(stage) * kNumStreams + static_cast<size_t>(stream)].push_back(id);
    return id;
  }
  void edge(int32_t from, int32_t to) {
    if (from == kNoInst || to == kNoInst) return;
    edges_.emplace_back(from, to);
  }
  // A collective off the compute stream that the rank's processor must partly carry itself: its
  // shadow occupies the compute stream for (1 - overlap) of its time, in program order, after the
  // same dependencies.
  void shadow(int32_t id, int32_t dep_a, int32_t dep_b) {
    const Inst in = insts_[static_cast<size_t>(id)];  // a copy: add() may move insts_
    const double share = 1.0 - prof_.comm_compute_overlap;
    if (share <= 0 || !in.op || in.stream == StreamKind::kCompute ||
        in.op->kind != OpKind::kCollective || in.time_s <= 0)
      return;
    InstCost cost;
    cost.time_s = share * in.time_s;
    const int32_t sid = add(in.op, cost, in.stage, in.micro_batch, in.chunk, StreamKind::kCompute);
    insts_[static_cast<size_t>(sid)].shadow = true;
    edge(dep_a, sid);
    edge(dep_b, sid);
  }

  void build() {
    const int pp = prog_.pp, vp = prog_.vp, m = prog_.num_micro_batches;
    costs_ = program_costs(prog_, c_, prof_, w_.precision);
    queues_.assign(static_cast<size_t>(pp) * kNumStreams, {});
    units_.assign(static_cast<size_t>(pp) * vp * m * 2, {});
    heads_.assign(queues_.size(), 0);
    size_t estimate = 0;
    for (const StageProgram& st : prog_.stages)
      for (const ChunkProgram& ch : st.chunks)
        estimate += (ch.forward.size() + ch.backward.size() + 2) * m;
    insts_.reserve(estimate);
    edges_.reserve(estimate * 2);

    for (int s = 0; s < pp; ++s) {
      const StageProgram& st = prog_.stages[static_cast<size_t>(s)];
      const StageCosts& sc = costs_[static_cast<size_t>(s)];
      int32_t prev_unit_last = kNoInst;
      std::vector<int32_t> async_ops;
      for (const ScheduleItem& item : st.order) {
        const ChunkProgram& chunk = st.chunks[static_cast<size_t>(item.chunk)];
        const auto& ops = item.backward ? chunk.backward : chunk.forward;
        const auto& costs = item.backward ? sc.backward[static_cast<size_t>(item.chunk)]
                                          : sc.forward[static_cast<size_t>(item.chunk)];
        const bool last_mb = item.micro_batch == m - 1;
        UnitRef& unit = units_[unit_index(s, item.chunk, item.micro_batch, item.backward)];
        int32_t prev = prev_unit_last;
        local_.assign(ops.size(), kNoInst);
        for (size_t i = 0; i < ops.size(); ++i) {
          const OpTemplate& op = ops[i];
          if (op.last_micro_batch && !(item.backward && last_mb)) continue;
          const int32_t id = add(&op, {costs[i].time_s, costs[i].link}, s, item.micro_batch,
                                 item.chunk, op.stream);
          local_[i] = id;
          edge(prev, id);
          const int32_t waits =
              op.wait_for >= 0 ? local_[static_cast<size_t>(op.wait_for)] : kNoInst;
          edge(waits, id);
          shadow(id, prev, waits);
          // The unit's input (from the neighbouring stage) gates its first synchronous op; a
          // prefetch may start before the input arrives.
          if (unit.first == kNoInst && !op.async) unit.first = id;
          if (op.async)
            async_ops.push_back(id);
          else
            prev = id;
        }
        unit.last = prev;
        // The unit's output travels to the next virtual stage (forward) or the previous one
        // (backward), if there is one.
        const int v = item.chunk * pp + s;
        const bool has_consumer = item.backward ? v > 0 : v < pp * vp - 1;
        if (has_consumer && pp > 1) {
          const bool same_node =
              item.backward
                  ? (s > 0 ? prog_.stages[static_cast<size_t>(s - 1)].sends_to_next_same_node
                           : prog_.p2p_wraps_same_node)
                  : (s < pp - 1 ? st.sends_to_next_same_node : prog_.p2p_wraps_same_node);
          const OpCost send = p2p_cost(prog_, same_node, c_, prof_);
          unit.send = add(nullptr, {send.time_s, send.link}, s, item.micro_batch, item.chunk,
                          StreamKind::kPpComm);
          edge(prev, unit.send);
        }
        prev_unit_last = prev;
      }
      // The step: after the last unit and every gradient bucket. A delayed update is the previous
      // step's, on the host from the step's start (steady state); what follows it waits for it.
      int32_t prev = prev_unit_last;
      int32_t delayed = kNoInst;
      bool first = true;
      for (size_t i = 0; i < st.step_ops.size(); ++i) {
        const OpTemplate& op = st.step_ops[i];
        // A host update's PCIe transfers are pieces of their own on the link, around its work.
        const OpCost& cost = sc.step[i];
        const InstCost pieces[3] = {
            {cost.pcie_before_s, Link::kPcie},
            {cost.time_s - cost.pcie_before_s - cost.pcie_after_s, cost.link},
            {cost.pcie_after_s, Link::kPcie}};
        int32_t head = kNoInst, id = kNoInst;
        for (int k = 0; k < 3; ++k) {
          if (k != 1 && pieces[k].time_s <= 0) continue;
          const int32_t next = add(&op, pieces[k], s, -1, 0, op.stream);
          edge(id, next);
          if (head == kNoInst) head = next;
          id = next;
        }
        if (op.delayed) {
          delayed = id;
          continue;
        }
        edge(prev, head);
        edge(delayed, head);
        if (first)
          for (int32_t a : async_ops) edge(a, head);
        first = false;
        shadow(id, prev, kNoInst);
        prev = id;
      }
    }
    // Cross-stage: a unit starts after its input arrives.
    for (int s = 0; s < pp; ++s)
      for (int ch = 0; ch < vp; ++ch)
        for (int mb = 0; mb < m; ++mb)
          for (bool backward : {false, true}) {
            const UnitRef& unit = units_[unit_index(s, ch, mb, backward)];
            const int v = ch * pp + s;
            const int from = backward ? v + 1 : v - 1;
            if (from < 0 || from >= pp * vp) continue;
            const UnitRef& producer = units_[unit_index(from % pp, from / pp, mb, backward)];
            edge(producer.send, unit.first);
          }

    // Dependents in CSR form.
    std::vector<int32_t> count(insts_.size() + 1, 0);
    for (const auto& [from, to] : edges_) {
      ++count[static_cast<size_t>(from)];
      ++insts_[static_cast<size_t>(to)].pending;
    }
    int32_t offset = 0;
    for (size_t i = 0; i < insts_.size(); ++i) {
      insts_[i].dep_begin = offset;
      offset += count[i];
      insts_[i].dep_end = insts_[i].dep_begin;
    }
    dependents_.assign(edges_.size(), 0);
    for (const auto& [from, to] : edges_)
      dependents_[static_cast<size_t>(insts_[static_cast<size_t>(from)].dep_end++)] = to;
    edges_.clear();
    edges_.shrink_to_fit();
  }

  void try_start(size_t queue, double now) {
    std::vector<int32_t>& q = queues_[queue];
    if (heads_[queue] >= q.size()) return;
    Inst& in = insts_[static_cast<size_t>(q[heads_[queue]])];
    if (in.pending == 0 && in.start < 0) start(q[heads_[queue]], now);
  }

  // Host copies and traffic to other nodes both cross the GPU's PCIe link (GPUDirect RDMA goes
  // GPU -> PCIe switch -> NIC), so they share one link state.
  LinkState& link_of(const Inst& in) {
    const Link link = in.link == Link::kPcie ? Link::kInterNode : in.link;
    return links_[static_cast<size_t>(in.stage) * kNumLinks + static_cast<size_t>(link)];
  }

  // Advances the shared link's ops to `now`, then reschedules their ends.
  void settle(LinkState& link, double now) {
    const double k = static_cast<double>(link.active.size());
    if (k > 0)
      for (int32_t a : link.active)
        insts_[static_cast<size_t>(a)].remaining -= (now - link.last_t) / k;
    link.last_t = now;
  }
  void reschedule(LinkState& link, double now) {
    const double k = static_cast<double>(link.active.size());
    for (int32_t a : link.active) {
      Inst& in = insts_[static_cast<size_t>(a)];
      ++in.version;
      events_.push({now + std::max(in.remaining, 0.0) * k, a, in.version});
    }
  }

  void start(int32_t id, double now) {
    Inst& in = insts_[static_cast<size_t>(id)];
    in.start = now;
    if (in.op && in.op->allocates && !in.shadow) memory_event(in, in.op->allocates, +1.0, now);
    if (in.link == Link::kNone || in.time_s <= 0) {
      events_.push({now + in.time_s, id, in.version});
      return;
    }
    LinkState& link = link_of(in);
    settle(link, now);
    in.remaining = in.time_s;
    link.active.push_back(id);
    reschedule(link, now);
  }

  void finish(int32_t id, double now) {
    Inst& in = insts_[static_cast<size_t>(id)];
    in.end = now;
    if (in.link != Link::kNone && in.time_s > 0) {
      LinkState& link = link_of(in);
      settle(link, now);
      link.active.erase(std::find(link.active.begin(), link.active.end(), id));
      reschedule(link, now);
    }
    if (in.op && in.op->frees && !in.shadow) memory_event(in, in.op->frees, -1.0, now);
    for (int32_t d = in.dep_begin; d < in.dep_end; ++d) {
      Inst& dep = insts_[static_cast<size_t>(dependents_[static_cast<size_t>(d)])];
      dep.last_dep = id;
      if (--dep.pending == 0)
        try_start(static_cast<size_t>(dep.stage) * kNumStreams + static_cast<size_t>(dep.stream),
                  now);
    }
    const size_t queue =
        static_cast<size_t>(in.stage) * kNumStreams + static_cast<size_t>(in.stream);
    ++heads_[queue];
    try_start(queue, now);
  }

  void loop() {
    links_.assign(static_cast<size_t>(prog_.pp) * kNumLinks, {});
    dyn_.assign(static_cast<size_t>(prog_.pp), {});
    sizes_ = dynamic_tensor_bytes(m_, plan_, w_);
    for (size_t q = 0; q < queues_.size(); ++q) try_start(q, 0.0);
    while (!events_.empty()) {
      const Event ev = events_.top();
      events_.pop();
      Inst& in = insts_[static_cast<size_t>(ev.inst)];
      if (ev.version != in.version || in.end >= 0) continue;
      finish(ev.inst, ev.time);
    }
  }

  // --- Memory over time.
  struct StageMemory {
    double current = 0;
    double peak = 0;
    double activations_at_peak = 0;
    double dispatch_at_peak = 0;
    double dispatch_current = 0;
  };
  double tensor_bytes(TensorClass cls, const Inst& in) const {
    const bool moe = in.op->layer >= 0 && m_.is_moe_layer(in.op->layer);
    switch (cls) {
      case TensorClass::kLayerActivations:
      case TensorClass::kRecomputeWorkspace:
        return moe ? sizes_.moe_layer_activations : sizes_.dense_layer_activations;
      case TensorClass::kLayerInput:
        return sizes_.layer_input;
      case TensorClass::kDispatchBuffer:
        return sizes_.dispatch;
      case TensorClass::kLogits:
        return sizes_.logits;
    }
    return 0;
  }
  void memory_event(const Inst& in, TensorMask mask, double sign, double /*now*/) {
    StageMemory& mem = dyn_[static_cast<size_t>(in.stage)];
    for (TensorClass cls : kTensorClasses) {
      if (!(mask & bit(cls))) continue;
      const double bytes = sign * tensor_bytes(cls, in);
      mem.current += bytes;
      if (cls == TensorClass::kDispatchBuffer) mem.dispatch_current += bytes;
    }
    if (mem.current > mem.peak) {
      mem.peak = mem.current;
      mem.dispatch_at_peak = mem.dispatch_current;
      mem.activations_at_peak = mem.current - mem.dispatch_current;
    }
  }

  // --- Results.
  Prediction report(const SimulateOptions& options) {
    Prediction p;
    p.fidelity = "simulate";
    p.ops = static_cast<int64_t>(insts_.size());
    const int pp = prog_.pp;
    std::vector<double> stage_end(static_cast<size_t>(pp), 0.0);
    std::vector<TimeBreakdown> br(static_cast<size_t>(pp));
    std::vector<double> compute_prev_end(static_cast<size_t>(pp), 0.0);
    // Walk each stage's compute stream in order: its busy time, and what every gap waited for.
    for (int s = 0; s < pp; ++s) {
      const auto& q =
          queues_[static_cast<size_t>(s) * kNumStreams + static_cast<size_t>(StreamKind::kCompute)];
      TimeBreakdown& b = br[static_cast<size_t>(s)];
      double prev_end = 0;
      for (int32_t id : q) {
        const Inst& in = insts_[static_cast<size_t>(id)];
        // Inference: the decode chunk stands for every generated token.
        const double times =
            inference_ && in.chunk == 1 ? static_cast<double>(w_.inference->decode_tokens) : 1.0;
        const double gap = in.start - prev_end;
        if (gap > 0) {
          attribute(b, times * gap, in.last_dep);
          const Inst* dep =
              in.last_dep == kNoInst ? nullptr : &insts_[static_cast<size_t>(in.last_dep)];
          if (options.record_timeline && dep &&
              (dep->stream == StreamKind::kCopy || dep->stream == StreamKind::kStorage))
            p.stalls.push_back({s, in.micro_batch, in.chunk, dep->op, prev_end, in.start});
        }
        const double busy = times * (in.end - in.start);
        if (in.shadow)
          add_comm(b, in.op->stream, busy);
        else if (in.op && in.op->kind == OpKind::kOptimizer)
          b.optimizer_s += busy;
        else
          b.compute_s += busy;
        prev_end = in.end;
      }
      compute_prev_end[static_cast<size_t>(s)] = prev_end;
    }
    for (const Inst& in : insts_)
      stage_end[static_cast<size_t>(in.stage)] =
          std::max(stage_end[static_cast<size_t>(in.stage)], in.end);
    const double step_time = *std::max_element(stage_end.begin(), stage_end.end());
    // After the last compute op: the parameter all-gathers of the distributed optimizer; after the
    // stage's end, waiting for the other stages to finish the step.
    // A delayed update that outlasts the stage's other work shows as optimizer time. (Its ops are
    // the host streams' queues; the rest of the stage is looked at only when there are some.)
    std::vector<double> host_end(static_cast<size_t>(pp), 0.0), host_busy(host_end),
        before_host(host_end);
    bool any_host = false;
    for (int s = 0; s < pp; ++s)
      for (int32_t id :
           queues_[static_cast<size_t>(s) * kNumStreams + static_cast<size_t>(StreamKind::kHost)]) {
        const Inst& in = insts_[static_cast<size_t>(id)];
        host_end[static_cast<size_t>(s)] = std::max(host_end[static_cast<size_t>(s)], in.end);
        host_busy[static_cast<size_t>(s)] += in.end - in.start;
        any_host = true;
      }
    if (any_host)
      for (const Inst& in : insts_)
        if (in.stream != StreamKind::kHost && in.start < host_end[static_cast<size_t>(in.stage)])
          before_host[static_cast<size_t>(in.stage)] =
              std::max(before_host[static_cast<size_t>(in.stage)], in.end);
    for (int s = 0; s < pp; ++s) {
      TimeBreakdown& b = br[static_cast<size_t>(s)];
      const size_t i = static_cast<size_t>(s);
      const double tail = std::max(0.0, stage_end[i] - compute_prev_end[i]);
      const double host = std::min(
          tail, std::max(0.0, host_end[i] - std::max(before_host[i], compute_prev_end[i])));
      b.optimizer_s += host;
      b.dp_comm_s += tail - host;
      b.bubble_s += step_time - stage_end[i];
    }
    // Report the busiest stage: the one that waits least decides the step.
    int critical = 0;
    for (int s = 1; s < pp; ++s)
      if (br[static_cast<size_t>(s)].bubble_s < br[static_cast<size_t>(critical)].bubble_s)
        critical = s;
    p.step_time_s = step_time;
    p.critical_stage = critical;
    p.delayed_update_s = host_busy[static_cast<size_t>(critical)];
    p.time = br[static_cast<size_t>(critical)];
    if (inference_) {
      const double prefill_end =
          insts_[static_cast<size_t>(units_[unit_index(0, 0, 0, false)].last)].end;
      const double compute_end =
          insts_[static_cast<size_t>(units_[unit_index(0, 1, 0, false)].last)].end;
      // The decode step stands for every generated token. In the steady state a step's copy
      // stream carries its own loads and those it issues for the next step (the ring's next
      // pass, its first sections): a step lasts at least as long as those copies take.
      double copies = 0;
      for (const Inst& in : insts_)
        if (in.chunk == 1 && in.stream == StreamKind::kCopy) copies += in.end - in.start;
      const double decode_end = std::max(compute_end, prefill_end + copies);
      fill_inference_times(p, w_, prefill_end, decode_end - prefill_end);
      // The step-end bookkeeping above counted the decode step once: rebase the breakdown on the
      // latency of the whole batch.
      p.time.dp_comm_s = 0;
      p.time.stall_s +=
          static_cast<double>(w_.inference->decode_tokens) * (decode_end - compute_end);
      p.time.bubble_s = 0;
      p.time.bubble_s = std::max(0.0, p.step_time_s - p.time.total());
    }

    // Memory: static bytes of the memory model plus the peak of the dynamic curve, per stage.
    double best = -1;
    for (int s = 0; s < pp; ++s) {
      MemoryBreakdown mb = memory_per_gpu(m_, c_, plan_, w_, prof_, s);
      const StageMemory& dm = dyn_[static_cast<size_t>(s)];
      // Training: the curve's peak replaces the closed form's sum; inference keeps the memory
      // model's working set (nothing is held across layers).
      if (!inference_) {
        mb.activations.gpu = dm.activations_at_peak;
        mb.dispatch_buffers.gpu = dm.dispatch_at_peak;
      }
      const double gpu = mb.total().gpu;
      p.stage_peak_gpu_bytes.push_back(gpu);
      if (gpu > best) {
        best = gpu;
        p.memory = mb;
        p.peak_stage = s;
      }
    }
    p.peak = p.memory.total();
    if (options.record_timeline) {
      p.program = owned_;
      p.timeline.reserve(insts_.size());
      for (const Inst& in : insts_)
        if (!in.shadow)
          p.timeline.push_back(
              {in.stage, in.stream, in.op, in.micro_batch, in.chunk, in.start, in.end});
    }
    fill_throughput(p, m_, c_, plan_, w_);
    return p;
  }

  // A collective's exposed time, by the stream (group) it runs on.
  static void add_comm(TimeBreakdown& b, StreamKind stream, double t) {
    switch (stream) {
      case StreamKind::kTpComm:
        b.tp_comm_s += t;
        break;
      case StreamKind::kCpComm:
        b.cp_comm_s += t;
        break;
      case StreamKind::kEpComm:
        b.ep_comm_s += t;
        break;
      case StreamKind::kPpComm:
        b.pp_comm_s += t;
        break;
      default:
        b.dp_comm_s += t;
        break;
    }
  }

  void attribute(TimeBreakdown& b, double gap, int32_t dep) const {
    if (dep == kNoInst) {
      b.bubble_s += gap;
      return;
    }
    const Inst& d = insts_[static_cast<size_t>(dep)];
    switch (d.stream) {
      case StreamKind::kCopy:
      case StreamKind::kStorage:
        b.stall_s += gap;
        break;
      case StreamKind::kHost:
        b.optimizer_s += gap;
        break;
      case StreamKind::kPpComm: {
        // The transfer itself is pipeline communication; waiting for the producer is bubble.
        const double transfer = std::min(gap, d.end - d.start);
        b.pp_comm_s += transfer;
        b.bubble_s += gap - transfer;
        break;
      }
      case StreamKind::kCompute:
        b.bubble_s += gap;
        break;
      default:
        add_comm(b, d.stream, gap);
        break;
    }
  }

  const bool inference_;
  const ModelSpec& m_;
  const ClusterSpec& c_;
  const Plan& plan_;
  const Workload& w_;
  const CostProfile& prof_;
  std::shared_ptr<const StepProgram> owned_;
  const StepProgram& prog_;
  std::vector<StageCosts> costs_;
  std::vector<Inst> insts_;
  std::vector<std::pair<int32_t, int32_t>> edges_;
  std::vector<int32_t> dependents_;
  std::vector<std::vector<int32_t>> queues_;
  std::vector<size_t> heads_;
  std::vector<UnitRef> units_;
  std::vector<int32_t> local_;  // template index -> instance of the unit being built
  std::vector<LinkState> links_;
  std::vector<StageMemory> dyn_;
  DynamicTensorBytes sizes_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
};

}  // namespace

Prediction simulate(const ModelSpec& m, const ClusterSpec& c, const Plan& plan, const Workload& w,
                    const CostProfile& prof, const SimulateOptions& options) {
  Simulation sim(m, c, plan, w, prof);
  return sim.run(options);
}

}  // namespace switchyard
