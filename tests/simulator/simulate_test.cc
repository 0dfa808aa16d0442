#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

#include "core/config_registry.h"
#include "core/expert_load.h"
#include "cost_models/memory.h"
#include "simulator/op_cost.h"
#include "tests/simulator/sim_test_util.h"

namespace switchyard {
namespace {

using namespace testing;

double rel_diff(double a, double b) { return std::fabs(a - b) / b; }

ClusterSpec small_node(int gpus) {
  ClusterSpec c = a100_nodes(1);
  c.gpus_per_node = gpus;
  return c;
}

// Where overlap does not matter (no data parallelism: no gradient buckets to hide; one pipeline
// stage or a pipeline whose sends are tiny), the closed form and the event simulation agree.
TEST(EstimateVsSimulate, AgreeWithinTenPercentWhereOverlapDoesNotMatter) {
  const ModelSpec m = moe_model(8);
  const struct {
    const char* plan;
    int gpus;
  } cases[] = {
      {R"({"schema_version": 1})", 1},
      {R"({"schema_version": 1, "tp": 4, "ep": 4, "dispatch": "ppmoe_index_slice"})", 4},
      {R"({"schema_version": 1, "pp": 4})", 4},
      {R"({"schema_version": 1, "pp": 4, "schedule": "gpipe"})", 4},
      {R"({"schema_version": 1, "pp": 2, "vp": 2, "schedule": "interleaved_1f1b"})", 2},
      {R"({"schema_version": 1, "pp": 2, "recompute": "full"})", 2},
      // Offloaded experts, prefetched deeper than one layer: the copies run in turn, so depth
      // does not hide more than one layer's compute per copy.
      {R"({"schema_version": 1, "zero_stage": 1, "prefetch": {"depth": 4, "direction": "2d"},
           "placement": {"expert_params": "ssd", "optimizer_states": "cpu"}})",
       1},
      {R"({"schema_version": 1, "zero_stage": 1, "prefetch": {"depth": 3, "direction": "ahead"},
           "placement": {"expert_params": "cpu", "optimizer_states": "cpu"}})",
       1},
      // Gradients going down to the SSD: nothing waits for them but the step's end, which waits
      // for all of them.
      {R"({"schema_version": 1, "zero_stage": 1,
           "placement": {"gradients": "ssd", "optimizer_states": "cpu"}})",
       1},
      {R"({"schema_version": 1, "zero_stage": 1,
           "placement": {"gradients": "cpu", "optimizer_states": "cpu"}})",
       1},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.plan);
    const ClusterSpec cl = small_node(c.gpus);
    const Plan p = plan_of(c.plan);
    const Workload w = train(16, 2048);
    expect_valid(p, m, cl, w);
    const CostProfile prof = default_cost_profile(cl);
    const Prediction e = estimate(m, cl, p, w, prof);
    const Prediction s = simulate(m, cl, p, w, prof);
    EXPECT_LE(rel_diff(e.step_time_s, s.step_time_s), 0.10)
        << "estimate " << e.step_time_s << " s, simulate " << s.step_time_s << " s";
    EXPECT_NEAR(e.time.compute_s, s.time.compute_s, 0.10 * s.time.compute_s);
  }
}

// The parts of the breakdown add up to the step time, and throughput follows from it.
TEST(Simulate, BreakdownSumsToStepTimeAndThroughputFollows) {
  const ModelSpec m = moe_model();
  const ClusterSpec cl = a100_nodes(4);
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 8, "pp": 4, "ep": 8, "zero_stage": 1})");
  const Workload w = train(64, 2048);
  expect_valid(p, m, cl, w);
  const Prediction s = simulate(m, cl, p, w, default_cost_profile(cl));
  EXPECT_NEAR(s.time.total(), s.step_time_s, 1e-6 * s.step_time_s);
  EXPECT_GT(s.time.bubble_s, 0);  // 4 stages, 8 micro-batches
  EXPECT_GT(s.time.ep_comm_s, 0);
  EXPECT_DOUBLE_EQ(s.tokens_per_step, 64.0 * 2048);
  EXPECT_NEAR(s.tokens_per_s, s.tokens_per_step / s.step_time_s, 1e-9 * s.tokens_per_s);
  EXPECT_NEAR(s.tokens_per_s_per_gpu * 32, s.tokens_per_s, 1e-9 * s.tokens_per_s);
  const double flops = flops_per_token(m, 2048).total() * s.tokens_per_s_per_gpu;
  EXPECT_NEAR(s.mfu, flops / cl.gpu.peak_bf16_flops, 1e-12);
  EXPECT_GT(s.mfu, 0.05);
  EXPECT_LT(s.mfu, 0.9);
}

// A backend whose collectives run on the rank's own processor (MPI over shared memory on a CPU:
// comm_compute_overlap 0) cannot hide the gradient buckets behind the backward: the step grows by
// exactly the DP communication the overlapping backend hides, the breakdown says so, and estimate
// agrees with simulate.
TEST(Simulate, CollectivesThatCannotOverlapComputeAddTheirTime) {
  const ModelSpec m = moe_model(8);
  const ClusterSpec cl = small_node(4);
  // ep 1: no other collective shares the link with the buckets.
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 4, "grad_bucket_bytes": 4000000})");
  const Workload w = train(16, 2048);
  expect_valid(p, m, cl, w);
  CostProfile overlapping = default_cost_profile(cl), serial = overlapping;
  serial.comm_compute_overlap = 0;
  const Prediction a = simulate(m, cl, p, w, overlapping);
  const Prediction b = simulate(m, cl, p, w, serial);
  // Every DP collective's time, as op_cost prices it.
  const StepProgram prog = lower(m, cl, p, w);
  double dp_total = 0;
  for (const auto& ops : {prog.stages[0].chunks[0].backward, prog.stages[0].step_ops})
    for (const OpTemplate& op : ops)
      if (op.kind == OpKind::kCollective && op.stream == StreamKind::kDpComm)
        dp_total += op_cost(op, prog, cl, overlapping, w.precision).time_s;
  ASSERT_GT(dp_total, 0);
  EXPECT_LT(a.time.dp_comm_s, 0.5 * dp_total);  // mostly hidden
  EXPECT_NEAR(b.time.dp_comm_s, dp_total, 1e-6 * dp_total);
  EXPECT_NEAR(b.step_time_s - a.step_time_s, dp_total - a.time.dp_comm_s, 1e-3 * b.step_time_s);
  EXPECT_NEAR(b.time.total(), b.step_time_s, 1e-6 * b.step_time_s);
  EXPECT_NEAR(b.time.compute_s, a.time.compute_s, 1e-9 * a.time.compute_s);
  const Prediction e = estimate(m, cl, p, w, serial);
  EXPECT_LE(rel_diff(e.step_time_s, b.step_time_s), 0.10);
  EXPECT_NEAR(e.time.dp_comm_s, dp_total, 0.05 * dp_total);
}

// Ops of one stream never overlap, and nothing starts before time 0 or ends after the step.
TEST(Simulate, TimelineIsConsistent) {
  const ModelSpec m = moe_model();
  const ClusterSpec cl = a100_nodes(2);
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 4, "pp": 2, "vp": 2, "ep": 4, "tp": 2,
                             "sequence_parallel": true, "schedule": "interleaved_1f1b"})");
  const Workload w = train(16, 2048);
  expect_valid(p, m, cl, w);
  SimulateOptions o;
  o.record_timeline = true;
  const Prediction s = simulate(m, cl, p, w, default_cost_profile(cl), o);
  ASSERT_EQ(static_cast<int64_t>(s.timeline.size()), s.ops);
  std::map<std::pair<int, int>, double> stream_end;
  std::vector<TimelineEvent> events = s.timeline;
  std::sort(events.begin(), events.end(),
            [](const auto& a, const auto& b) { return a.start_s < b.start_s; });
  for (const auto& e : events) {
    ASSERT_GE(e.start_s, 0);
    ASSERT_GE(e.end_s, e.start_s);
    ASSERT_LE(e.end_s, s.step_time_s * (1 + 1e-12));
    if (e.stream == StreamKind::kDpComm || e.stream == StreamKind::kEpComm)
      continue;  // shared links
    auto& end = stream_end[{e.stage, static_cast<int>(e.stream)}];
    EXPECT_GE(e.start_s, end - 1e-12)
        << "overlap on stage " << e.stage << " stream " << stream_name(e.stream);
    end = e.end_s;
  }
}

// Collectives of one stage that load the same link at the same time share its bandwidth: a gradient
// bucket overlapping an expert all-to-all on the NICs takes longer than alone; a collective that
// runs alone takes exactly its cost.
TEST(Simulate, ConcurrentCollectivesShareTheLink) {
  const ModelSpec m = moe_model();
  const ClusterSpec cl = a100_nodes(4);
  Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 1})");
  p.grad_bucket_bytes = 1 << 20;
  const Workload w = train(64, 2048);
  expect_valid(p, m, cl, w);
  const CostProfile prof = default_cost_profile(cl);
  SimulateOptions o;
  o.record_timeline = true;
  const Prediction s = simulate(m, cl, p, w, prof, o);
  std::vector<const TimelineEvent*> nic;
  for (const auto& e : s.timeline)
    if (e.op && e.op->kind == OpKind::kCollective &&
        op_cost(*e.op, *s.program, cl, prof, w.precision).link == Link::kInterNode)
      nic.push_back(&e);
  int stretched = 0, alone_exact = 0;
  for (const TimelineEvent* e : nic) {
    bool overlaps = false;
    for (const TimelineEvent* f : nic)
      if (f != e && f->stage == e->stage && f->start_s < e->end_s - 1e-12 &&
          e->start_s < f->end_s - 1e-12)
        overlaps = true;
    const double alone = op_cost(*e->op, *s.program, cl, prof, w.precision).time_s;
    const double took = e->end_s - e->start_s;
    if (overlaps) {
      EXPECT_GE(took, alone * (1 - 1e-9)) << e->op->name;
      stretched += took > alone * 1.01 ? 1 : 0;
    } else {
      EXPECT_NEAR(took, alone, 1e-9 * alone + 1e-15) << e->op->name;
      ++alone_exact;
    }
  }
  EXPECT_GT(stretched, 0) << "no gradient bucket overlapped an all-to-all";
  EXPECT_GT(alone_exact, 0);
}

// Offloaded expert parameters stall the compute while they load; prefetching layers ahead hides
// most of it; the stall shows in the breakdown.
TEST(Simulate, PrefetchHidesParameterCopies) {
  const ModelSpec m = moe_model(8);
  const ClusterSpec cl = a100_nodes(1);
  const Workload w = train(16, 2048);
  const CostProfile prof = default_cost_profile(cl);
  Plan p = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 8})");
  const Prediction on_gpu = simulate(m, cl, p, w, prof);
  EXPECT_EQ(on_gpu.time.stall_s, 0);
  p.placement.expert_params = Tier::kCPU;
  p.placement.optimizer_states = Tier::kCPU;  // (parameters off the GPU: the host updates them)
  const Prediction blocking = simulate(m, cl, p, w, prof);
  p.prefetch = {2, PrefetchDirection::kAhead};
  expect_valid(p, m, cl, w);
  const Prediction ahead = simulate(m, cl, p, w, prof);
  EXPECT_GT(blocking.time.stall_s, 0);
  EXPECT_GT(blocking.step_time_s, on_gpu.step_time_s);
  EXPECT_LT(ahead.time.stall_s, 0.5 * blocking.time.stall_s);
  EXPECT_LT(ahead.step_time_s, blocking.step_time_s);
  EXPECT_NEAR(blocking.time.total(), blocking.step_time_s, 1e-6 * blocking.step_time_s);
  // On the timeline: each stall is an event of its own on the compute track, ending as the copy
  // it waited for ends; on the critical stage they add up to the breakdown's stall time.
  SimulateOptions o;
  o.record_timeline = true;
  p.prefetch = {};
  const Prediction traced = simulate(m, cl, p, w, prof, o);
  ASSERT_FALSE(traced.stalls.empty());
  double stalled = 0;
  for (const StallEvent& e : traced.stalls) {
    ASSERT_NE(e.waiting_for, nullptr);
    EXPECT_EQ(e.waiting_for->kind, OpKind::kCopy);
    EXPECT_LT(e.start_s, e.end_s);
    if (e.stage == traced.critical_stage) stalled += e.end_s - e.start_s;
  }
  EXPECT_NEAR(stalled, traced.time.stall_s, 1e-9 * traced.step_time_s);
}

// SE-MoE's 2D prefetch: SSD reads and copies to the GPU run on their own streams, so the levels
// overlap; reading the SSD ahead ("down") beats fetching both levels at use, and running the GPU
// copies ahead too ("2d") does no worse.
TEST(Simulate, TheTwoLevelsOfA2dPrefetchPipeline) {
  const ModelSpec m = moe_model(8);
  const ClusterSpec cl = a100_nodes(1);
  const Workload w = train(16, 2048);
  const CostProfile prof = default_cost_profile(cl);
  Plan p = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 8, "zero_stage": 1,
                       "placement": {"expert_params": "ssd", "optimizer_states": "cpu"}})");
  double step[4] = {};
  for (PrefetchDirection dir : {PrefetchDirection::kNone, PrefetchDirection::kDown,
                                PrefetchDirection::kAhead, PrefetchDirection::k2D}) {
    p.prefetch = {dir == PrefetchDirection::kNone ? 0 : 2, dir};
    expect_valid(p, m, cl, w);
    SimulateOptions o;
    o.record_timeline = true;
    const Prediction s = simulate(m, cl, p, w, prof, o);
    step[static_cast<int>(dir)] = s.step_time_s;
    if (dir == PrefetchDirection::kNone) continue;
    bool overlap = false;
    for (const auto& a : s.timeline)
      if (a.op && a.op->name == "param_ssd_read")
        for (const auto& b : s.timeline)
          if (b.op && b.op->name == "param_fetch" && b.start_s < a.end_s && a.start_s < b.end_s)
            overlap = true;
    EXPECT_TRUE(overlap) << enum_name(dir);
  }
  EXPECT_LT(step[static_cast<int>(PrefetchDirection::kDown)],
            step[static_cast<int>(PrefetchDirection::kNone)]);
  EXPECT_LE(step[static_cast<int>(PrefetchDirection::k2D)],
            step[static_cast<int>(PrefetchDirection::kDown)] * (1 + 1e-9));
}

// Ring-memory inference (SE-MoE): a model larger than the GPU runs from host memory in sections;
// loading the next section while one computes beats loading then computing, and a plan that fits
// on the GPUs beats both.
TEST(Simulate, RingMemoryInference) {
  const ConfigRegistry reg = bundled();
  const ModelSpec m = reg.load_model("mixtral-8x7b");
  const ClusterSpec cl = with_nodes(reg.load_cluster("dgx-h100"), 1);
  Workload w = reg.load_workload("inference-decode");
  w.inference->prefill_batch = 64;  // a prefill long enough to hide a section's load
  w.inference->prompt_len = 4096;
  const CostProfile prof = default_cost_profile(cl);
  Plan ring = plan_of(
      R"({"schema_version": 1, "dp": 8, "ring_sections": 4, "prefetch": {"depth": 1, "direction": "ahead"}})");
  Plan naive = plan_of(R"({"schema_version": 1, "dp": 8, "ring_sections": 4})");
  Plan fits = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 8})");
  for (const Plan* p : {&ring, &naive, &fits}) expect_valid(*p, m, cl, w);
  EXPECT_TRUE(capacity_issues(m, cl, ring, w, prof).empty());
  const Prediction r = simulate(m, cl, ring, w, prof), n = simulate(m, cl, naive, w, prof),
                   f = simulate(m, cl, fits, w, prof);
  ASSERT_TRUE(r.inference && n.inference && f.inference);
  EXPECT_LT(r.inference->prefill_s, n.inference->prefill_s);
  EXPECT_LT(r.inference->latency_s, n.inference->latency_s);
  EXPECT_GT(f.inference->generated_tokens_per_s, 10 * r.inference->generated_tokens_per_s);
  EXPECT_GT(r.time.stall_s, 0);
  EXPECT_NEAR(r.time.total(), r.step_time_s, 1e-6 * r.step_time_s);
  EXPECT_DOUBLE_EQ(r.step_time_s, r.inference->latency_s);
  // The GPU holds two of the four sections: half the weights, plus the KV cache and a working set.
  EXPECT_LT(r.peak.gpu, 0.6 * static_cast<double>(count_params(m).total()) * 2 + 20.0 * (1 << 30));
  EXPECT_GT(r.peak.cpu, static_cast<double>(count_params(m).total()) * 2 * 0.99);
  // The closed form agrees with the event simulation on these sequential passes.
  EXPECT_NEAR(estimate(m, cl, ring, w, prof).step_time_s, r.step_time_s, 0.15 * r.step_time_s);
  // Every decode step streams the whole ring over PCIe (the sections of the next step load
  // during this one): a step is at least one pass of the layers' loads, in the steady state as
  // in the estimate.
  const StepProgram prog = lower(m, cl, ring, w);
  double pass = 0;
  for (const OpTemplate& op : prog.stages[0].chunks[1].forward)
    if (op.kind == OpKind::kCopy) pass += op_cost(op, prog, cl, prof, w.precision).time_s;
  EXPECT_GE(r.inference->decode_step_s, pass * (1 - 1e-9));
  EXPECT_NEAR(estimate(m, cl, ring, w, prof).inference->decode_step_s, r.inference->decode_step_s,
              0.02 * r.inference->decode_step_s);

  // Against the section count: wherever a section's load over PCIe takes no longer than its
  // prefill compute (a prefill of 4 x more prompts makes it so), the ring's prefill beats loading
  // then computing; and the ring's batch never takes longer than the naive one's.
  w.inference->prefill_batch = 256;
  int compared = 0;
  for (int sections : {4, 8, 16, 32}) {
    ring.ring_sections = naive.ring_sections = sections;
    if (!capacity_issues(m, cl, ring, w, prof).empty()) continue;
    const StepProgram rp = lower(m, cl, ring, w);
    double load = 0, compute = 0;
    for (const OpTemplate& op : rp.stages[0].chunks[0].forward) {
      if (op.layer < 0 || op.layer >= ring_ahead_layers(m, ring)) continue;  // the first section
      const double t = op_cost(op, rp, cl, prof, w.precision).time_s;
      (op.kind == OpKind::kCopy ? load : compute) += t;
    }
    const Prediction rs = simulate(m, cl, ring, w, prof), ns = simulate(m, cl, naive, w, prof);
    SCOPED_TRACE(std::to_string(sections) + " sections");
    if (load <= compute) {
      EXPECT_LT(rs.inference->prefill_s, ns.inference->prefill_s);
      ++compared;
    }
    EXPECT_LE(rs.inference->latency_s, ns.inference->latency_s * (1 + 1e-9));
  }
  EXPECT_GE(compared, 2);
}

// Parameter copies from host memory and all-to-all traffic to other nodes cross the same PCIe
// link: with both, an all-to-all that overlaps a copy takes longer than alone.
TEST(Simulate, HostCopiesShareThePcieLinkWithTheNics) {
  const ModelSpec m = moe_model(32);
  const ClusterSpec cl = a100_nodes(4);
  const Workload w = train(64, 2048);
  const CostProfile prof = default_cost_profile(cl);
  Plan p = plan_of(
      R"({"schema_version": 1, "dp": 32, "ep": 32, "placement": {"expert_params": "cpu", "optimizer_states": "cpu"},
                       "prefetch": {"depth": 2, "direction": "ahead"}})");
  expect_valid(p, m, cl, w);
  SimulateOptions o;
  o.record_timeline = true;
  const Prediction s = simulate(m, cl, p, w, prof, o);
  int stretched = 0;
  for (const auto& e : s.timeline) {
    if (!e.op || e.op->name != "dispatch") continue;
    bool copy_overlaps = false;
    for (const auto& f : s.timeline)
      if (f.op && f.op->kind == OpKind::kCopy && f.stage == e.stage && f.start_s < e.end_s &&
          e.start_s < f.end_s)
        copy_overlaps = true;
    const double alone = op_cost(*e.op, *s.program, cl, prof, w.precision).time_s;
    if (copy_overlaps) stretched += e.end_s - e.start_s > alone * 1.01 ? 1 : 0;
  }
  EXPECT_GT(stretched, 0);
}

// A host update (ZeRO-Offload) moves the gradients down and the parameters up over the same PCIe
// link as the GPUDirect all-to-all: beside the step (delayed update) its transfers are pieces of
// their own on that link, around the host's Adam, and they slow the dispatches they overlap.
TEST(Simulate, TheHostUpdatesTransfersShareThePcieLink) {
  const ModelSpec m = moe_model(32);
  const ClusterSpec cl = a100_nodes(4);
  const Workload w = train(64, 2048);
  const CostProfile prof = default_cost_profile(cl);
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 1,
                             "placement": {"optimizer_states": "cpu"}, "delayed_update": true})");
  expect_valid(p, m, cl, w);
  SimulateOptions o;
  o.record_timeline = true;
  const Prediction s = simulate(m, cl, p, w, prof, o);
  std::vector<TimelineEvent> update;
  for (const auto& e : s.timeline)
    if (e.op && e.op->kind == OpKind::kOptimizer) update.push_back(e);
  ASSERT_EQ(update.size(), 3u);  // download, Adam, upload: one after the other on the host
  const OpCost whole = op_cost(*update[0].op, *s.program, cl, prof, w.precision);
  ASSERT_GT(whole.pcie_before_s, 0);
  ASSERT_GT(whole.pcie_after_s, 0);
  EXPECT_EQ(update[0].stream, StreamKind::kHost);
  EXPECT_GE(update[1].start_s, update[0].end_s);
  EXPECT_GE(update[2].start_s, update[1].end_s);
  EXPECT_NEAR(update[1].end_s - update[1].start_s,
              whole.time_s - whole.pcie_before_s - whole.pcie_after_s, 1e-12);
  // The download starts with the step, beside the first dispatches: it shares their link.
  EXPECT_GT(update[0].end_s - update[0].start_s, whole.pcie_before_s * 1.01);
  int stretched = 0;
  for (const auto& e : s.timeline)
    if (e.op && e.op->name == "dispatch" && e.start_s < update[0].end_s)
      stretched +=
          e.end_s - e.start_s > op_cost(*e.op, *s.program, cl, prof, w.precision).time_s * 1.01 ? 1
                                                                                                : 0;
  EXPECT_GT(stretched, 0);
}

// A hot expert decides its MoE layers: an expert with twice the others' tokens shows in the step.
TEST(Simulate, HotExpertShowsInStepTime) {
  const ModelSpec m = moe_model();
  const ClusterSpec cl = a100_nodes(4);
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32})");
  Workload w = train(64, 2048);
  const CostProfile prof = default_cost_profile(cl);
  const double uniform = simulate(m, cl, p, w, prof).step_time_s;
  std::vector<double> hist(32, 1.0);
  hist[0] = 2.0;
  w.routing = Routing{RoutingKind::kHistogram, 0, hist, {}};
  expect_valid(p, m, cl, w);
  const double hot = simulate(m, cl, p, w, prof).step_time_s;
  EXPECT_GT(hot, uniform * 1.05) << "uniform " << uniform << " s, hot expert " << hot << " s";
  EXPECT_GT(estimate(m, cl, p, w, prof).step_time_s,
            estimate(m, cl, p, train(64, 2048), prof).step_time_s * 1.05);
}

// A routing measured layer by layer: each layer favours other experts, so over the step every
// rank gets its share, yet each layer waits for its own most loaded rank. The per-layer histograms
// cost more than their sum says; histograms that agree with the sum cost the same.
TEST(Simulate, EachLayerWaitsForItsOwnMostLoadedRank) {
  const ModelSpec m = moe_model(8);  // 8 MoE layers of 8 experts
  const ClusterSpec cl = small_node(8);
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 2})");
  Workload w = train(16, 2048);
  const CostProfile prof = default_cost_profile(cl);
  // Even layers send 3/4 of their rows to rank 0's experts (0-3), odd layers to rank 1's.
  const std::vector<double> even = {3, 3, 3, 3, 1, 1, 1, 1}, odd = {1, 1, 1, 1, 3, 3, 3, 3};
  w.routing = Routing{RoutingKind::kHistogram, 0, std::vector<double>(8, 1.0), {}};
  expect_valid(p, m, cl, w);
  const Prediction whole = simulate(m, cl, p, w, prof);
  for (int l = 0; l < 8; ++l) w.routing.per_layer.push_back(l % 2 ? odd : even);
  expect_valid(p, m, cl, w);
  const Prediction layered = simulate(m, cl, p, w, prof);
  EXPECT_GT(layered.step_time_s, whole.step_time_s * 1.05);
  // Each layer's hot rank holds 3/4 of the rows, against 1/2: the grouped expert GEMMs grow by
  // half (their rows per expert grow 1.5x; the efficiency table changes a little with shape).
  const StepProgram a = lower(m, cl, p, train(16, 2048)), b = lower(m, cl, p, w);
  double rows_a = 0, rows_b = 0;
  for (const OpTemplate& op : a.stages[0].chunks[0].forward)
    if (op.kind == OpKind::kGroupedGemm && op.name == "experts_fc1") rows_a += op.tokens;
  for (const OpTemplate& op : b.stages[0].chunks[0].forward)
    if (op.kind == OpKind::kGroupedGemm && op.name == "experts_fc1") rows_b += op.tokens;
  EXPECT_NEAR(rows_b / rows_a, 1.5, 0.01);
  EXPECT_GT(estimate(m, cl, p, w, prof).step_time_s,
            estimate(m, cl, p, train(16, 2048), prof).step_time_s * 1.05);
  // The closed form prices the MoE layers by their mean hot rank, as the event simulation does
  // (also when the first MoE layer, its representative, is the balanced one).
  Workload mixed = w;
  mixed.routing.per_layer[0] = std::vector<double>(8, 1.0);
  const double mixed_sim = simulate(m, cl, p, mixed, prof).step_time_s;
  EXPECT_NEAR(estimate(m, cl, p, mixed, prof).step_time_s, mixed_sim, 0.10 * mixed_sim);
  EXPECT_NEAR(estimate(m, cl, p, w, prof).step_time_s, layered.step_time_s,
              0.10 * layered.step_time_s);
  // Per-layer histograms equal to the step's change nothing.
  for (auto& h : w.routing.per_layer) h = std::vector<double>(8, 1.0);
  EXPECT_NEAR(simulate(m, cl, p, w, prof).step_time_s, whole.step_time_s, 1e-9 * whole.step_time_s);
}

// Elastic replication (SE-MoE): under zipf routing the hottest experts make their rank the
// straggler; copies of them on the least loaded ranks split their tokens and remove most of the
// straggler cost, at the price of all-reducing their gradients.
TEST(Simulate, ReplicatingHotExpertsRemovesTheStraggler) {
  const ModelSpec m = moe_model(32);
  const ClusterSpec cl = a100_nodes(4);
  Workload w = train(64, 2048);
  const CostProfile prof = default_cost_profile(cl);
  Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 1})");
  const double balanced = simulate(m, cl, p, w, prof).step_time_s;
  w.routing = Routing{RoutingKind::kZipf, 1.2, {}, {}};
  const double skewed = simulate(m, cl, p, w, prof).step_time_s;
  p.expert_replicas.kind = ExpertReplicas::Kind::kHot;
  p.expert_replicas.hot_experts = 4;
  p.expert_replicas.replicas = 4;
  expect_valid(p, m, cl, w);
  const StepProgram prog = lower(m, cl, p, w);
  int replica_ops = 0;
  for (const auto& op : prog.stages[0].chunks[0].backward)
    replica_ops += op.name == "replica_grad_all_reduce" ? 1 : 0;
  EXPECT_EQ(replica_ops, 8);
  const double replicated = simulate(m, cl, p, w, prof).step_time_s;
  EXPECT_GT(skewed, balanced * 1.2) << "balanced " << balanced << " s, skewed " << skewed << " s";
  EXPECT_LT(replicated, skewed) << "replicated " << replicated << " s";
  EXPECT_LT(replicated - balanced, 0.5 * (skewed - balanced));
}

// Where the experts' compute decides the step (one NVLink node, wide experts), a zipf-skewed
// routing slows the step by the hottest rank's share of the rows over the mean (within 10%), and
// replicating the hot experts recovers most of it.
TEST(Simulate, SkewSlowsTheStepByTheHottestRanksShareOverTheMean) {
  Json j = Json::parse(R"({
    "schema_version": 1, "name": "wide-experts", "num_layers": 8, "hidden_size": 2048,
    "ffn_hidden_size": 8192, "num_attention_heads": 16, "num_kv_heads": 8, "vocab_size": 32000,
    "seq_len": 2048, "moe": {"num_experts": 16, "top_k": 2, "expert_ffn_hidden_size": 32768}
  })");
  const ModelSpec m = parse_model(j);
  const ClusterSpec cl = a100_nodes(1);
  Workload w = train(64, 2048);
  const CostProfile prof = default_cost_profile(cl);
  Plan p = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 8, "zero_stage": 1})");
  expect_valid(p, m, cl, w);
  const double balanced = simulate(m, cl, p, w, prof).step_time_s;
  w.routing = Routing{RoutingKind::kZipf, 0.8, {}, {}};
  const auto ranks = expert_rank_loads(m, p, w);
  const double hot = ranks[static_cast<size_t>(most_loaded_rank(ranks))].share * 8;  // over mean
  ASSERT_GT(hot, 1.5);
  const double skewed = simulate(m, cl, p, w, prof).step_time_s;
  EXPECT_NEAR(skewed / balanced, hot, 0.10 * hot)
      << "balanced " << balanced << " s, skewed " << skewed << " s, hottest rank " << hot << "x";
  p.expert_replicas.kind = ExpertReplicas::Kind::kHot;
  p.expert_replicas.hot_experts = 4;
  p.expert_replicas.replicas = 4;
  expect_valid(p, m, cl, w);
  const double replicated = simulate(m, cl, p, w, prof).step_time_s;
  EXPECT_LT(replicated - balanced, 0.5 * (skewed - balanced))
      << "replicated " << replicated << " s";
}

// SE-MoE against DeepSpeed-MoE on the UFO-style 12B model on 48 A100s. A (bundled,
// DeepSpeed-style): flat all-to-all, ZeRO-2. B (bundled, SE-MoE-style): hierarchical all-to-all,
// fused gradient buckets, elastic replicas, Adam's states in host memory updated beside the next
// step. B is faster on balanced load and more so on the unbalanced multi-task load, and needs less
// GPU memory on both. Its host Adam, inside the step, would cost more than B gains on balanced
// load.
TEST(Simulate, SemoeBeatsDeepSpeedStyleAndMoreSoOnUnbalancedMultitaskLoad) {
  const ConfigRegistry reg = bundled();
  const ModelSpec m = reg.load_model("ufo-12b");
  const ClusterSpec c = with_nodes(reg.load_cluster("dgx-a100"), 6);
  const Plan a = reg.load_plan("ufo-12b-deepspeed");
  const Plan b = reg.load_plan("ufo-12b-semoe");
  ASSERT_TRUE(b.delayed_update);
  ASSERT_EQ(b.placement.optimizer_states, Tier::kCPU);
  Plan in_step = b;
  in_step.delayed_update = false;
  const CostProfile prof = default_cost_profile(c);
  double ratio[2] = {0, 0};
  int i = 0;
  for (const char* name : {"ufo-balanced", "ufo-multitask"}) {
    const Workload w = reg.load_workload(name);
    for (const Plan* p : std::initializer_list<const Plan*>{&a, &b, &in_step})
      expect_valid(*p, m, c, w);
    const Prediction pa = simulate(m, c, a, w, prof), pb = simulate(m, c, b, w, prof);
    ratio[i++] = pa.step_time_s / pb.step_time_s;  // B's throughput over A's
    EXPECT_LT(pb.step_time_s, pa.step_time_s) << name;
    EXPECT_LT(pb.peak.gpu, pa.peak.gpu) << name;
    // The host's Adam inside the step would cost B its lead on balanced load.
    const double in_step_s = simulate(m, c, in_step, w, prof).step_time_s;
    EXPECT_GT(in_step_s, pb.step_time_s) << name;
    if (std::string(name) == "ufo-balanced") {
      EXPECT_GT(in_step_s, pa.step_time_s);
    }
  }
  EXPECT_GT(ratio[1], ratio[0]) << "balanced " << ratio[0] << "x, multi-task " << ratio[1] << "x";
}

// ZeRO-Offload's delayed update: the host's Adam runs beside the next step. While it is shorter
// than the GPU's step it costs nothing (the step takes as long as with Adam's states on the GPU
// less their GPU update); longer, the excess shows as optimizer time and the step lasts as long as
// the host's update. Without the delay the host's Adam adds to the step.
TEST(Simulate, DelayedUpdateHidesTheHostOptimizerStepUpToTheGpuStep) {
  const ModelSpec m = moe_model(8);
  const ClusterSpec cl = a100_nodes(1);
  const CostProfile prof = default_cost_profile(cl);
  Plan on_gpu = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 8})");
  Plan sync = on_gpu;
  sync.placement.optimizer_states = Tier::kCPU;
  Plan delayed = sync;
  delayed.delayed_update = true;
  for (int batch : {512, 8}) {
    SCOPED_TRACE(batch);
    const Workload w = train(batch, 2048);
    expect_valid(delayed, m, cl, w);
    const Prediction g = simulate(m, cl, on_gpu, w, prof), s = simulate(m, cl, sync, w, prof),
                     d = simulate(m, cl, delayed, w, prof);
    // The host's update alone: the synchronous step's exposed optimizer time.
    const double host = s.time.optimizer_s;
    ASSERT_GT(host, 0);
    EXPECT_NEAR(d.delayed_update_s, host, 1e-9 * host);
    EXPECT_EQ(s.delayed_update_s, 0);
    EXPECT_LT(d.step_time_s, s.step_time_s);
    EXPECT_GE(d.step_time_s, host * (1 - 1e-9));
    EXPECT_NEAR(d.time.total(), d.step_time_s, 1e-6 * d.step_time_s);
    const double gpu_work = g.step_time_s - g.time.optimizer_s;
    if (host < gpu_work) {
      EXPECT_NEAR(d.step_time_s, gpu_work, 0.01 * gpu_work);
      EXPECT_NEAR(d.time.optimizer_s, 0, 1e-9);
    } else {
      EXPECT_NEAR(d.step_time_s, host, 0.01 * host);
      EXPECT_NEAR(d.time.optimizer_s, host - gpu_work, 0.05 * host);
    }
    // The closed form agrees.
    const Prediction e = estimate(m, cl, delayed, w, prof);
    EXPECT_LE(rel_diff(e.step_time_s, d.step_time_s), 0.10);
    EXPECT_NEAR(e.delayed_update_s, host, 1e-9 * host);
  }
  // Which of the two regimes each batch is in.
  EXPECT_LT(simulate(m, cl, sync, train(512, 2048), prof).time.optimizer_s,
            simulate(m, cl, on_gpu, train(512, 2048), prof).step_time_s);
  EXPECT_GT(simulate(m, cl, sync, train(8, 2048), prof).time.optimizer_s,
            simulate(m, cl, on_gpu, train(8, 2048), prof).step_time_s);
}

// Pipeline MoE (experts over the TP group of a node, pipeline across nodes) against all-to-all
// expert parallelism over all GPUs, at 200 and 100 Gb/s per node: PPMoE wins, and wins by more when
// the network is slower.
TEST(Simulate, PpmoeBeatsAllToAllAndMoreSoOnSlowNetworks) {
  const ModelSpec m = moe_model();
  const Workload w = train(64, 2048);
  const Plan ppmoe = plan_of(
      R"({"schema_version": 1, "tp": 8, "ep": 8, "pp": 4, "dispatch": "ppmoe_index_slice"})");
  const Plan a2a = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 1})");
  double ratio[2];
  int i = 0;
  for (double gbps : {200.0, 100.0}) {
    const ClusterSpec cl = a100_nodes(4, gbps / 8 * 1e9, 1);
    expect_valid(ppmoe, m, cl, w);
    expect_valid(a2a, m, cl, w);
    const CostProfile prof = default_cost_profile(cl);
    const double t_ppmoe = simulate(m, cl, ppmoe, w, prof).step_time_s;
    const double t_a2a = simulate(m, cl, a2a, w, prof).step_time_s;
    ratio[i++] = t_a2a / t_ppmoe;  // throughput of PPMoE over all-to-all
    EXPECT_GT(t_a2a, t_ppmoe) << gbps << " Gb/s";
  }
  EXPECT_GT(ratio[1], ratio[0]);
}

// SE-MoE's hierarchical all-to-all pays off when EP spans 4+ nodes with small per-peer messages,
// and not inside one node.
TEST(Simulate, HierarchicalAllToAllWinsAcrossNodesNotInside) {
  const ModelSpec m = moe_model(64, 2);
  const Workload w = train(64, 512);
  {
    const ClusterSpec cl = a100_nodes(8);
    const Plan flat = plan_of(R"({"schema_version": 1, "dp": 64, "ep": 64})");
    Plan hier = flat;
    hier.dispatch = Dispatch::kHierarchicalAllToAll;
    expect_valid(hier, m, cl, w);
    const CostProfile prof = default_cost_profile(cl);
    EXPECT_LT(simulate(m, cl, hier, w, prof).step_time_s,
              simulate(m, cl, flat, w, prof).step_time_s);
  }
  {
    const ClusterSpec cl = a100_nodes(1);
    const Plan flat = plan_of(R"({"schema_version": 1, "dp": 8, "ep": 8})");
    Plan hier = flat;
    hier.dispatch = Dispatch::kHierarchicalAllToAll;
    const CostProfile prof = default_cost_profile(cl);
    EXPECT_GE(simulate(m, cl, hier, w, prof).step_time_s,
              simulate(m, cl, flat, w, prof).step_time_s);
  }
}

// The simulated memory curve's peak against the memory model's closed form for 1F1B and
// interleaved schedules: the peak is the maximum of the curve, not a sum of worst cases.
TEST(Simulate, MemoryCurvePeakMatchesClosedForm) {
  const ModelSpec m = moe_model();
  const ClusterSpec cl = a100_nodes(4);
  for (
      const char* json :
      {R"({"schema_version": 1, "dp": 8, "pp": 4, "ep": 8})",
       R"({"schema_version": 1, "dp": 8, "pp": 4, "ep": 8, "recompute": "full"})",
       R"({"schema_version": 1, "dp": 8, "pp": 4, "vp": 2, "ep": 8, "schedule": "interleaved_1f1b"})"}) {
    SCOPED_TRACE(json);
    const Plan p = plan_of(json);
    const Workload w = train(64, 2048);
    expect_valid(p, m, cl, w);
    const CostProfile prof = default_cost_profile(cl);
    const Prediction s = simulate(m, cl, p, w, prof);
    for (int stage = 0; stage < 4; ++stage) {
      const MemoryBreakdown closed = memory_per_gpu(m, cl, p, w, prof, stage);
      // The curve never exceeds the closed form's sum of worst cases, and comes within 5% of it
      // (full recompute: the last stage's logits are gone before a layer is recomputed).
      const double simulated = s.stage_peak_gpu_bytes[static_cast<size_t>(stage)];
      EXPECT_LE(simulated, closed.total().gpu * 1.001) << "stage " << stage;
      EXPECT_GE(simulated, closed.total().gpu * 0.95) << "stage " << stage;
    }
  }
}

// Per step, ZeRO 0-1 reduce the accumulated gradients once; ZeRO 2 reduces each micro-batch's.
TEST(Simulate, ZeroTwoReducesEveryMicroBatchsGradients) {
  const ModelSpec m = moe_model();
  const ClusterSpec cl = a100_nodes(4);
  const Workload w = train(128, 2048);  // 4 micro-batches per replica
  const CostProfile prof = default_cost_profile(cl);
  int buckets[3] = {0, 0, 0};
  std::set<int> micro_batches[3];
  for (int z = 1; z <= 2; ++z) {
    Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32})");
    p.zero_stage = z;
    expect_valid(p, m, cl, w);
    ASSERT_EQ(lower(m, cl, p, w).num_micro_batches, 4);
    SimulateOptions o;
    o.record_timeline = true;
    for (const TimelineEvent& e : simulate(m, cl, p, w, prof, o).timeline)
      if (e.op && e.op->name == "dp_grad_bucket") {
        ++buckets[z];
        micro_batches[z].insert(e.micro_batch);
      }
  }
  EXPECT_GT(buckets[1], 0);
  EXPECT_EQ(micro_batches[1], std::set<int>{3});
  EXPECT_EQ(buckets[2], 4 * buckets[1]);
  EXPECT_EQ(micro_batches[2], (std::set<int>{0, 1, 2, 3}));
}

// Every bundled plan, on the model, cluster and workload it names, is valid, fits, and simulates
// (a user's first command on any of them works).
TEST(Simulate, EveryBundledPlanFitsAndSimulates) {
  const ConfigRegistry reg = bundled();
  int plans = 0;
  for (const std::string& name : reg.list(ConfigKind::kPlan)) {
    SCOPED_TRACE(name);
    InputNames n;
    n.plan = name;
    const Inputs in = load_inputs(reg, n);
    EXPECT_TRUE(validate(in.plan, in.model, in.cluster, in.workload).empty());
    const CostProfile prof = default_cost_profile(in.cluster);
    const auto fit = capacity_issues(in.model, in.cluster, in.plan, in.workload, prof);
    EXPECT_TRUE(fit.empty()) << (fit.empty() ? "" : fit[0].message);
    if (in.workload.mode == Mode::kInference && in.plan.pp > 1) continue;
    const Prediction p = simulate(in.model, in.cluster, in.plan, in.workload, prof);
    EXPECT_GT(p.step_time_s, 0);
    EXPECT_LE(p.peak.gpu, static_cast<double>(in.cluster.gpu.hbm_bytes));
    ++plans;
  }
  EXPECT_GE(plans, 20);
}

}  // namespace
}  // namespace switchyard
