#include "tools/run_cmd.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <thread>

#include "core/expert_load.h"
#include "core/validate.h"
#include "cost_models/memory.h"
#include "executor/moe_inference.h"
#include "executor/moe_trainer.h"
#include "executor/timed.h"
#include "simulator/simulator.h"
#include "tools/run_common.h"
#include "traces/chrome_trace.h"
#include "tuner/store.h"

namespace switchyard::cli {
namespace {

int cmd_run(const Common& common, const RunFlags& f) {
  Ranks ranks = start_ranks(f.timeout_s);
  const ConfigRegistry reg = common.registry();
  // Every rank loads and checks the same inputs; rank 0 reports.
  Inputs in;
  std::vector<ConfigIssue> issues;
  try {
    in = load_inputs(reg, f.names);
    issues = validate(in.plan, in.model, in.cluster, in.workload);
    if (in.workload.mode == Mode::kInference && in.workload.inference) {
      // Every data-parallel replica serves an equal share of the requests.
      const InferenceSpec& inf = *in.workload.inference;
      for (const auto& [name, n] : {std::pair{"prefill_batch", inf.prefill_batch},
                                    std::pair{"decode_batch", inf.decode_batch}})
        if (n < in.plan.dp || n % in.plan.dp != 0)
          issues.push_back({std::string("workload.inference.") + name,
                            std::to_string(n) + " is not a multiple of plan.dp " +
                                std::to_string(in.plan.dp) + " (each replica serves batch / dp)"});
    }
    const auto unsupported = in.workload.mode == Mode::kInference
                                 ? inference_unsupported(in.model, in.plan)
                                 : trainer_unsupported(in.model, in.plan);
    issues.insert(issues.end(), unsupported.begin(), unsupported.end());
    if (in.plan.world_size() != ranks.size)
      issues.push_back({"plan", "has " + std::to_string(in.plan.world_size()) +
                                    " ranks but the run has " + std::to_string(ranks.size) +
                                    " process" + (ranks.size > 1 ? "es" : "") + " (mpirun -n " +
                                    std::to_string(in.plan.world_size()) + ")"});
  } catch (const ConfigError& e) {
    issues = e.issues();
  }
  if (!issues.empty())
    return report_on_rank0(std::make_exception_ptr(ConfigError(std::move(issues))), ranks.rank == 0,
                           [&] { ranks.world->barrier(); });

  if (in.workload.mode == Mode::kInference) return run_inference(f, ranks, in);

  const Plan& plan = in.plan;
  const ClusterSpec& c = in.cluster;
  TierCapacity cap = rank_capacity(c);
  Backend be = make_backend(f, ranks, cap, load_profile(c, f.profile).runtime_reserved_bytes);
  std::unique_ptr<Device>& backend = be.device;
  Communicator& groups_world = *be.groups_world;
  // Per-op times of the measured steps: every device call and collective, by class.
  OpTimes op_times;
  auto dev = timed_device(*backend, op_times);
  const int r = ranks.rank;
  // Rank order (Megatron's): pipeline stage outermost, then data parallel, then tensor parallel
  // innermost (cp = 1). EP groups are consecutive ranks of a stage; with ppmoe_index_slice the
  // experts are spread over the TP group instead.
  const int per_stage = ranks.size / plan.pp, stage = r / per_stage, q = r % per_stage;
  const int dp_idx = q / plan.tp, tp_idx = q % plan.tp;
  const bool ppmoe = plan.dispatch == Dispatch::kPPMoEIndexSlice;
  const int base = stage * per_stage;
  auto tpg = timed_communicator(groups_world.split(base + dp_idx, r, "tp"), op_times);
  auto dp = timed_communicator(groups_world.split(base + tp_idx, r, "dp"), op_times);
  // Otherwise the stage's ranks refold for the expert layers (expert_tp 1): EP groups of
  // consecutive ranks, TP peers included (with sequence parallelism each holds its own tokens).
  auto ep = timed_communicator(
      groups_world.split(ppmoe ? base + dp_idx : base + q / plan.ep, r, "ep"), op_times);
  auto edp = timed_communicator(
      groups_world.split(ppmoe ? base + tp_idx : base + q % plan.ep, r, "expert_dp"), op_times);
  auto pp = timed_communicator(groups_world.split(q, stage, "pp"), op_times);
  // The hierarchical all-to-all's two levels: the EP ranks on this node, and those with this
  // rank's local index on every node (EP groups are node-aligned: ep ranks are consecutive).
  std::unique_ptr<Communicator> ep_intra, ep_inter;
  if (plan.dispatch == Dispatch::kHierarchicalAllToAll) {
    const int per_node = std::min(plan.ep, c.gpus_per_node);
    ep_intra = ep->split(ep->rank() / per_node, ep->rank(), "ep_intra");
    ep_inter = ep->split(ep->rank() % per_node, ep->rank(), "ep_inter");
  }
  TrainSettings s;
  s.global_batch = in.workload.global_batch_size;
  s.seq_len = in.workload.effective_seq_len(in.model);
  s.micro_batch_size = plan.micro_batch_size;
  s.zero_stage = plan.zero_stage;
  s.grad_bucket_bytes = plan.grad_bucket_bytes;
  s.capacity_factor = plan.capacity_factor.value_or(0.0);
  s.sequence_parallel = plan.sequence_parallel && plan.tp > 1;
  if (f.routing == "workload") workload_routing(in, s.routing_share, s.routing_layer_share);
  // Elastic replicas: the placement the simulator assumes (hot experts by the workload's load).
  if (plan.expert_replicas.kind != ExpertReplicas::Kind::kNone)
    for (const RankExperts& rank : expert_rank_loads(in.model, plan, in.workload)) {
      std::vector<int>& slots = s.rank_experts.emplace_back();
      for (const ExpertCopy& copy : rank.copies) slots.push_back(copy.expert);
    }
  if (plan.pp > 1) {
    s.stage_layers = resolve_stage_layers(plan, in.model);
    s.schedule = plan.schedule;
    s.vp = plan.vp;
  }
  s.seed = f.seed;
  // Hierarchical storage: what the plan keeps off the device, each level fetched as far ahead as
  // the plan's prefetch says (core's fetch_leads).
  s.placement = plan.placement;
  s.delayed_update = plan.delayed_update;
  s.prefetch = fetch_leads(in.model, plan);
  s.host_threads =
      host_threads_per_rank(f.backend, ranks_on_this_node(ranks.size, c.gpus_per_node));

  Json check = nullptr;
  std::vector<double> losses, step_s;
  std::vector<int64_t> tokens_per_expert, tokens_per_layer_expert;
  int64_t dropped = 0;
  double tier_copy_s = 0, tier_stall_s = 0;  // copies between tiers, and compute waiting for them
  try {
    TrainGroups groups;
    groups.dp = dp.get();
    groups.ep = ep.get();
    groups.expert_dp = edp.get();
    groups.ep_intra = ep_intra.get();
    groups.ep_inter = ep_inter.get();
    groups.pp = pp.get();
    groups.tp = tpg.get();
    groups.ppmoe = ppmoe;
    auto trainer = MoeTrainer::create(in.model, s, *dev, groups, backend.get());
    tokens_per_expert.assign(static_cast<size_t>(in.model.moe ? in.model.moe->num_experts : 0), 0);
    for (int i = 0; i < f.warmup; ++i) trainer->step(i);
    dev->memory().reset_peaks();
    op_times.clear();
    op_times.record = !f.trace.empty();
    double step_total = 0;
    tier_copy_s = tier_stall_s = 0;
    for (int i = 0; i < f.steps; ++i) {
      if (i == 0) maybe_fail(r);
      ranks.world->barrier();
      const auto t0 = Clock::now();
      if (i == 0) op_times.epoch = t0;  // every rank leaves the barrier together: a shared origin
      // The trainer marks the StepProgram ops it runs; the measured steps' scopes record here.
      std::optional<ProgramOpSink> program_ops(std::in_place, op_times);
      const StepStats st = trainer->step(f.warmup + i);
      program_ops.reset();
      double dt = std::chrono::duration<double>(Clock::now() - t0).count();
      ranks.world->all_reduce(&dt, 1, DType::kFloat64, ReduceOp::kMax);
      step_s.push_back(dt);
      step_total += dt;
      tier_copy_s += st.tiers.fetch_s;
      tier_stall_s += st.tiers.stall_s;
      losses.push_back(st.loss);
      for (size_t e = 0; e < st.tokens_per_expert.size(); ++e)
        tokens_per_expert[e] += st.tokens_per_expert[e];
      tokens_per_layer_expert.resize(st.tokens_per_layer_expert.size(), 0);
      for (size_t i = 0; i < st.tokens_per_layer_expert.size(); ++i)
        tokens_per_layer_expert[i] += st.tokens_per_layer_expert[i];
      dropped += st.dropped;
    }
    // A delayed update's last update: applied (its failure reported) outside the measured steps,
    // its time kept out of their figures.
    {
      const OpTimes measured = op_times;
      trainer->finish_update();
      op_times = measured;
    }
    // Per step, the slowest rank's figure for each op name (a fixed list: every rank reduces the
    // same vector, whatever it happened to call).
    static const char* const kOps[] = {"gemm",        "expert_gemm", "router",     "permute",
                                       "elementwise", "attention",   "loss",       "optimizer",
                                       "copy",        "all_reduce",  "all_gather", "reduce_scatter",
                                       "all_to_allv", "broadcast",   "send_recv"};
    std::vector<double> per_op, per_op_device;
    for (const char* op : kOps) {
      per_op.push_back(op_times.seconds[op] / f.steps);
      const auto d = op_times.device_seconds.find(op);
      per_op_device.push_back(d == op_times.device_seconds.end() ? 0 : d->second / f.steps);
    }
    ranks.world->all_reduce(per_op.data(), per_op.size(), DType::kFloat64, ReduceOp::kMax);
    ranks.world->all_reduce(per_op_device.data(), per_op_device.size(), DType::kFloat64,
                            ReduceOp::kMax);
    op_times.seconds.clear();
    op_times.device_seconds.clear();
    double accounted = 0;
    for (size_t i = 0; i < per_op.size(); ++i) {
      if (per_op[i] > 0) op_times.seconds[kOps[i]] = per_op[i], accounted += per_op[i];
      if (per_op_device[i] > 0) op_times.device_seconds[kOps[i]] = per_op_device[i];
    }
    op_times.seconds["host (runner loops, allocation)"] =
        std::max(0.0, step_total / f.steps - accounted);
    if (f.check) {
      // The reference: this model and seed in one process, every group of one rank.
      auto ref_dev = cpu_device({});
      auto sdp = self_communicator("dp"), sep = self_communicator("ep"),
           sedp = self_communicator("expert_dp");
      TrainSettings rs = s;
      rs.stage_layers.clear();  // one stage holds every layer
      // Capacity applies per micro-batch: the reference then keeps the plan's micro-batches.
      if (s.capacity_factor <= 0) rs.micro_batch_size = 1;
      rs.zero_stage = 0;
      rs.rank_experts.clear();  // every expert once, in the one process
      rs.placement = {};        // every tensor on the device
      rs.prefetch = {};
      auto ref = MoeTrainer::create(in.model, rs, *ref_dev, {sdp.get(), sep.get(), sedp.get()});
      double loss_err = 0, param_err = 0;
      for (int i = 0; i < f.warmup + f.steps; ++i) {
        const double want = ref->step(i).loss;
        if (i >= f.warmup)
          loss_err = std::max(loss_err, std::abs(losses[static_cast<size_t>(i - f.warmup)] - want) /
                                            std::max(std::abs(want), 1e-30));
      }
      ref->finish_update();  // (the run's was applied after its steps)
      const ParameterError perr = parameter_error(*trainer, *ref);
      param_err = perr.relative;
      double errs[2] = {loss_err, param_err};
      ranks.world->all_reduce(errs, 2, DType::kFloat64, ReduceOp::kMax);
      check = {{"steps", f.warmup + f.steps},
               {"worst_tensor_on_rank_0", perr.worst},
               {"worst_tensor_relative_error_on_rank_0", perr.worst_tensor},
               {"max_loss_relative_error", errs[0]},
               {"max_parameter_relative_error", errs[1]},
               {"tolerance", 1e-4},
               {"passed", errs[0] <= 1e-4 && errs[1] <= 1e-4}};
    }
  } catch (const std::exception& e) {
    // Ranks fail differently (expert buffers follow the routing): end every rank, naming this
    // one, rather than leaving the others to wait for it.
    if (ranks.size > 1) ranks.abort(1, e.what());
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  // Per StepProgram op, the slowest rank's time per step.
  const std::map<std::string, double> measured_program =
      gather_program_seconds(ranks, op_times, f.steps);
  // The measured timeline: every rank's events to rank 0.
  std::vector<MeasuredEvent> events;
  if (!f.trace.empty()) {
    events = gather_events(ranks, {&op_times});
  }
  int64_t peaks[3] = {dev->memory().peak(Tier::kGPU), dev->memory().peak(Tier::kCPU),
                      dev->memory().peak(Tier::kSSD)};
  ranks.world->all_reduce(peaks, 3, DType::kInt64, ReduceOp::kMax);
  ranks.world->all_reduce(&dropped, 1, DType::kInt64, ReduceOp::kSum);
  // The slowest rank's fetch time and stalls; the fraction hidden of the rank that hid least.
  double tiers[2] = {tier_copy_s / f.steps, tier_stall_s / f.steps};
  double least_hidden =
      tier_copy_s > 0 ? std::clamp(1.0 - tier_stall_s / tier_copy_s, 0.0, 1.0) : 1.0;
  ranks.world->all_reduce(tiers, 2, DType::kFloat64, ReduceOp::kMax);
  ranks.world->all_reduce(&least_hidden, 1, DType::kFloat64, ReduceOp::kMin);
  if (!tokens_per_expert.empty()) {
    ranks.world->all_reduce(tokens_per_expert.data(), tokens_per_expert.size(), DType::kInt64,
                            ReduceOp::kSum);
    ranks.world->all_reduce(tokens_per_layer_expert.data(), tokens_per_layer_expert.size(),
                            DType::kInt64, ReduceOp::kSum);
  }
  // Each expert's owner in every EP group counted its group's tokens: the sum is the total.
  if (r != 0) return check.is_null() || check["passed"].get<bool>() ? 0 : 1;

  const double measured = median(step_s);
  const double tokens = static_cast<double>(s.global_batch) * static_cast<double>(s.seq_len);
  const CostProfile prof = load_profile(c, f.profile);
  SimulateOptions sim_options;
  sim_options.record_timeline = true;
  const Prediction pred = simulate(in.model, c, plan, in.workload, prof, sim_options);
  // The same prediction with the routing this run measured, layer by layer (an untrained router is
  // not balanced, each layer favours its own experts, and each layer waits for its most loaded EP
  // rank).
  std::optional<Prediction> pred_routed;
  if (!tokens_per_expert.empty()) {
    Workload routed = in.workload;
    routed.routing.kind = RoutingKind::kHistogram;
    routed.routing.tokens_per_expert.assign(tokens_per_expert.begin(), tokens_per_expert.end());
    const size_t experts = tokens_per_expert.size();
    routed.routing.per_layer.clear();  // the measured ones replace any the workload gave
    for (int64_t l = 0; l < in.model.num_layers; ++l) {
      if (!in.model.is_moe_layer(l)) continue;
      const auto first = tokens_per_layer_expert.begin() + static_cast<std::ptrdiff_t>(l * experts);
      routed.routing.per_layer.emplace_back(first, first + static_cast<std::ptrdiff_t>(experts));
    }
    routed.task_routing.clear();
    pred_routed = simulate(in.model, c, plan, routed, prof);
  }
  // Predicted against measured by op class (classes both sides can name): the compute stream of
  // the simulator's critical stage, its exposed communication, and the optimizer; the measurement's
  // device and collective calls, and the host time around them.
  std::map<std::string, double> predicted_class, measured_class;
  for (const TimelineEvent& e : pred.timeline) {
    if (e.stage != pred.critical_stage || !e.op || e.stream != StreamKind::kCompute) continue;
    const double d = e.end_s - e.start_s;
    switch (e.op->kind) {
      case OpKind::kGemm:
      case OpKind::kGroupedGemm:
        predicted_class["matmul"] += d;
        break;
      case OpKind::kAttention:
        predicted_class["attention"] += d;
        break;
      case OpKind::kOptimizer:
        break;  // the breakdown's optimizer below
      default:
        predicted_class["memory-bound kernels"] += d;
    }
  }
  const TimeBreakdown& tb = pred.time;
  predicted_class["communication (exposed)"] =
      tb.tp_comm_s + tb.cp_comm_s + tb.ep_comm_s + tb.dp_comm_s;
  if (plan.pp > 1) predicted_class["pipeline (bubble and p2p)"] = tb.bubble_s + tb.pp_comm_s;
  predicted_class["optimizer and host"] = tb.optimizer_s;
  for (const auto& [name, secs] : op_times.seconds) {
    if (name == "gemm" || name == "expert_gemm")
      measured_class["matmul"] += secs;
    else if (name == "attention")
      measured_class["attention"] += secs;
    else if (name == "elementwise" || name == "router" || name == "permute" || name == "copy" ||
             name == "loss")
      measured_class["memory-bound kernels"] += secs;
    else if (name.rfind("host", 0) == 0 || name == "optimizer")
      measured_class["optimizer and host"] += secs;
    else if (name == "send_recv")
      measured_class["pipeline (bubble and p2p)"] += secs;  // waiting on the neighbours
    else
      measured_class["communication (exposed)"] += secs;
  }
  Json by_class = Json::object();
  for (const auto& [name, secs] : predicted_class)
    by_class[name] = {{"predicted_s", secs}, {"measured_s", measured_class[name]}};
  // Op by op: the simulator's time of each StepProgram op (summed over micro-batches and layers,
  // whatever its stream; the largest over the pipeline stages, as the measurement takes the
  // slowest rank) beside the measured scope of the same op, in program order; ops only one side
  // has come last.
  std::vector<std::string> program_order;
  std::map<std::string, double> predicted_program;
  {
    std::map<std::pair<int, std::string>, double> per_stage;
    for (const TimelineEvent& e : pred.timeline) {
      if (!e.op) continue;
      const OpPhase phase = e.op->phase == Phase::kForward    ? OpPhase::kForward
                            : e.op->phase == Phase::kBackward ? OpPhase::kBackward
                                                              : OpPhase::kStep;
      const std::string key = std::string(op_phase_name(phase)) + " " + std::string(e.op->name);
      if (!predicted_program.count(key)) program_order.push_back(key);
      predicted_program[key] = 0;
      per_stage[{e.stage, key}] += e.end_s - e.start_s;
    }
    for (const auto& [stage_key, secs] : per_stage)
      predicted_program[stage_key.second] = std::max(predicted_program[stage_key.second], secs);
  }
  Json program_ops = Json::array();
  append_program_ops(program_ops, std::move(program_order), predicted_program, measured_program);
  Json out = {{"model", in.model.name},
              {"cluster", c.name},
              {"ranks", ranks.size},
              {"plan", to_json(plan)},
              {"steps", f.steps},
              {"warmup", f.warmup},
              {"step_times_s", step_s},
              {"median_step_time_s", measured},
              {"tokens_per_s", tokens / measured},
              {"losses", losses},
              {"peak_bytes", {{"gpu", peaks[0]}, {"cpu", peaks[1]}, {"ssd", peaks[2]}}},
              {"tokens_per_expert", tokens_per_expert},
              {"dropped_assignments", dropped},
              {"op_seconds_per_step", op_times.seconds},
              {"op_device_seconds_per_step", op_times.device_seconds},
              {"op_classes", by_class},
              {"program_ops", program_ops},
              {"predicted_step_time_s", pred.step_time_s},
              {"predicted_breakdown_s",
               {{"compute", pred.time.compute_s},
                {"exposed_ep_comm", pred.time.ep_comm_s},
                {"exposed_dp_comm", pred.time.dp_comm_s},
                {"optimizer", pred.time.optimizer_s},
                {"bubble", pred.time.bubble_s}}},
              {"predicted_peak_gpu_bytes", pred.peak.gpu},
              {"step_time_error", pred.step_time_s / measured - 1},
              {"predicted_step_time_with_measured_routing_s",
               pred_routed ? Json(pred_routed->step_time_s) : Json(nullptr)},
              {"check", check}};
  if (plan.placement != Placement{}) {
    // Copies between tiers per step: the simulator's copy stream (the critical stage) and its
    // stalls beside the copy engine's busy time and compute's waits (the slowest rank's).
    double predicted_copy = 0;
    for (const TimelineEvent& e : pred.timeline)
      if (e.op && e.stage == pred.critical_stage &&
          (e.stream == StreamKind::kCopy || e.stream == StreamKind::kStorage))
        predicted_copy += e.end_s - e.start_s;
    out["tiers"] = {{"copy_s", {{"measured", tiers[0]}, {"predicted", predicted_copy}}},
                    {"stall_s", {{"measured", tiers[1]}, {"predicted", pred.time.stall_s}}},
                    {"copy_hidden_fraction",
                     {{"measured", tiers[0] > 0 ? Json(least_hidden) : Json(nullptr)},
                      {"predicted", hidden_fraction(predicted_copy, pred.time.stall_s)}}}};
  }
  if (!f.trace.empty()) {
    write_measured_trace(f.trace, events, in, measured, ranks.size);
    out["trace"] = f.trace;
  }
  if (!f.no_db) {
    auto store = Store::open(f.db);
    const std::string mh = store->put_model(in.model), ch = store->put_cluster(c),
                      wh = store->put_workload(in.workload), ph = store->put_plan(plan);
    if (!store->find_prediction(mh, ch, wh, ph, profile_hash(prof), "simulate")) {
      store->put_prediction(mh, ch, wh, ph, profile_hash(prof), summarize(pred));
    }
    Store::Measurement m;
    m.backend = f.backend;
    m.steps = f.steps;
    m.step_time_s = measured;
    m.tokens_per_s = tokens / measured;
    m.peak_gpu_bytes = static_cast<double>(peaks[0]);
    m.peak_cpu_bytes = static_cast<double>(peaks[1]);
    m.peak_ssd_bytes = static_cast<double>(peaks[2]);
    m.trace_path = f.trace;
    m.details = {{"step_times_s", step_s},
                 {"op_classes", by_class},
                 {"program_ops", program_ops},
                 {"predicted_step_time_with_measured_routing_s",
                  pred_routed ? Json(pred_routed->step_time_s) : Json(nullptr)},
                 {"op_seconds_per_step", op_times.seconds},
                 {"losses", losses},
                 {"tokens_per_expert", tokens_per_expert},
                 {"check", check}};
    if (out.contains("tiers")) m.details["tiers"] = out["tiers"];
    out["measurement_id"] = store->put_measurement(mh, ch, wh, ph, m);
    out["db"] = f.db;
  }
  if (f.json) {
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << in.model.name << " on " << ranks.size << " rank" << (ranks.size > 1 ? "s" : "")
              << " (" << c.name << ", " << f.backend << " backend), plan " << plan_summary(plan)
              << "\n";
    std::cout << "  measured step    " << fmt("%.4f s", measured) << " (median of " << f.steps
              << " after " << f.warmup << " warm-up), " << fmt("%.0f tokens/s", tokens / measured)
              << "\n";
    std::cout << "  predicted step   " << fmt("%.4f s", pred.step_time_s) << " ("
              << fmt("%+.1f%%", 100 * (pred.step_time_s / measured - 1))
              << " against the measurement; cost profile \"" << prof.name << "\")\n";
    if (pred_routed)
      std::cout << "  with its routing " << fmt("%.4f s", pred_routed->step_time_s) << " ("
                << fmt("%+.1f%%", 100 * (pred_routed->step_time_s / measured - 1))
                << ": the prediction given the tokens per expert this run measured)\n";
    std::cout << "  loss             " << fmt("%.4f", losses.front()) << " -> "
              << fmt("%.4f", losses.back()) << "\n";
    std::cout << "  peak memory      device " << gib(static_cast<double>(peaks[0])) << " of "
              << gib(static_cast<double>(backend->memory().capacity(Tier::kGPU))) << " (predicted "
              << gib(pred.peak.gpu) << "), host " << gib(static_cast<double>(peaks[1])) << "\n";
    if (!op_times.device_seconds.empty()) {
      // CUDA events around each call: what the GPU spent of the time the calls took.
      double in_calls = 0, on_device = 0;
      for (const auto& [name, secs] : op_times.device_seconds) {
        on_device += secs;
        in_calls += op_times.seconds[name];
      }
      std::cout << "  on the device    " << fmt("%.4f s", on_device) << " of the "
                << fmt("%.4f s", in_calls)
                << " in device calls per step (CUDA events; the rest is launching and waiting for "
                   "each call)\n";
    }
    std::cout << "  per op class     predicted / measured per step (slowest rank)\n";
    for (const auto& [name, v] : by_class.items()) {
      const double pr = v["predicted_s"].get<double>(), me = v["measured_s"].get<double>();
      std::printf("    %-24s %9.4f s %9.4f s  %s\n", name.c_str(), pr, me,
                  me > 0 ? fmt("%+.0f%%", 100 * (pr / me - 1)).c_str() : "");
    }
    // Op by op, where the prediction misses most (the whole list is in --json).
    std::vector<std::pair<double, const Json*>> misses;
    for (const Json& o : program_ops)
      misses.push_back({std::abs((o["predicted_s"].is_null() ? 0 : o["predicted_s"].get<double>()) -
                                 (o["measured_s"].is_null() ? 0 : o["measured_s"].get<double>())),
                        &o});
    std::sort(misses.begin(), misses.end(),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    if (!misses.empty()) {
      std::cout << "  per program op   predicted / measured per step, the "
                << std::min<size_t>(6, misses.size()) << " largest differences (--json lists all "
                << misses.size() << ")\n";
      for (size_t i = 0; i < std::min<size_t>(6, misses.size()); ++i) {
        const Json& o = *misses[i].second;
        const auto secs = [](const Json& v) {
          return v.is_null() ? std::string("        -  ") : fmt("%9.4f s", v.get<double>());
        };
        std::printf("    %-24s %s %s\n",
                    (o["phase"].get<std::string>() + " " + o["op"].get<std::string>()).c_str(),
                    secs(o["predicted_s"]).c_str(), secs(o["measured_s"]).c_str());
      }
    }
    if (out.contains("tiers")) {
      const Json& t = out["tiers"];
      std::cout << "  tier copies      parameter fetches "
                << fmt("%.4f s", t["copy_s"]["measured"].get<double>()) << " (predicted "
                << fmt("%.4f s", t["copy_s"]["predicted"].get<double>()) << "), stalls "
                << fmt("%.4f s", t["stall_s"]["measured"].get<double>()) << " (predicted "
                << fmt("%.4f s", t["stall_s"]["predicted"].get<double>()) << ") per step\n";
    }
    if (!tokens_per_expert.empty()) {
      std::cout << "  tokens/expert   ";
      for (int64_t t : tokens_per_expert) std::cout << " " << t;
      if (dropped > 0) std::cout << " (" << dropped << " assignments dropped at capacity)";
      std::cout << "\n";
    }
    if (!check.is_null())
      std::cout << "  check            " << (check["passed"].get<bool>() ? "passed" : "FAILED")
                << ": losses within " << fmt("%.2e", check["max_loss_relative_error"].get<double>())
                << ", parameters within "
                << fmt("%.2e", check["max_parameter_relative_error"].get<double>())
                << " of the one-process reference (tolerance 1e-4; worst tensor "
                << check["worst_tensor_on_rank_0"].get<std::string>() << " "
                << fmt("%.1e", check["worst_tensor_relative_error_on_rank_0"].get<double>())
                << ")\n";
    if (!f.trace.empty()) std::cout << "  measured timeline written to " << f.trace << "\n";
    if (!f.no_db) std::cout << "  stored in " << f.db << "\n";
  }
  return check.is_null() || check["passed"].get<bool>() ? 0 : 1;
}

}  // namespace

std::function<int()> add_run_command(CLI::App& app, const Common& common) {
  auto f = std::make_shared<RunFlags>();
  auto* run = app.add_subcommand(
      "run",
      "Run a plan for real (CPU or CUDA backend; under mpirun -n RANKS), measure it, check it");
  run->add_option("--model", f->names.model, "Model (default: the plan's \"for\")");
  run->add_option("--cluster", f->names.cluster, "Cluster (default: the plan's \"for\")");
  auto* nodes = run->add_option("--nodes", f->names.nodes, "Override the cluster's node count")
                    ->check(CLI::PositiveNumber);
  run->add_option("--gpus", f->names.gpus, "Use this many of the cluster's GPUs (ranks)")
      ->check(CLI::PositiveNumber)
      ->excludes(nodes);
  run->add_option("--plan", f->names.plan, "Plan: bundled name or path")->required();
  run->add_option("--workload", f->names.workload, "Workload (default: the plan's \"for\")");
  run->add_option("--steps", f->steps, "Measured steps")->check(CLI::Range(1, 100000));
  run->add_option("--warmup", f->warmup, "Warm-up steps before measuring")
      ->check(CLI::Range(0, 1000));
  run->add_flag("--check", f->check,
                "Also run the one-process reference and compare losses and parameters");
  run->add_option("--db", f->db, "Plan store for the measurement (default ./switchyard.db)");
  run->add_flag("--no-db", f->no_db, "Do not store the measurement");
  run->add_option("--timeout", f->timeout_s,
                  "Seconds a collective may wait before the run ends with an error")
      ->check(CLI::PositiveNumber);
  run->add_option("--seed", f->seed, "Seed of the parameters and the data");
  run->add_option("--routing", f->routing,
                  "workload (default): the gate samples the experts in the workload's proportions "
                  "(uniform, zipf, histogram: what the prediction assumes); router: the "
                  "router's own choices")
      ->check(CLI::IsMember({"workload", "router"}));
  run->add_option("--profile", f->profile, "Cost-model constants for the prediction (JSON)");
  run->add_option("--trace", f->trace,
                  "Write the measured steps' ops as Chrome trace-event JSON (Perfetto), the "
                  "simulator's format");
  run->add_flag("--json", f->json, "Print the result as JSON");
  run->add_option(
         "--backend", f->backend,
         "cpu (default: Eigen + MPI) or cuda (cuBLAS and kernels + NCCL, one GPU per rank)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  run->add_option("--gemm-math", f->gemm_math,
                  "cuda: fp32 (default), tf32, or bf16 (operands rounded to bf16, fp32 "
                  "accumulation)")
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  return [=, &common]() -> int {
    if (!*run) return -1;
    return cmd_run(common, *f);
  };
}

}  // namespace switchyard::cli
