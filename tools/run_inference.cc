// `switchyard run` of an inference workload: every rank is a data-parallel replica serving its
// share of the batch (prefill, then greedy decoding with a key/value cache), all-resident or as a
// ring of sections streamed from host memory; measured beside the simulator's prediction of the
// same plan, pass by pass and op by op, with the copy time the ring hid and the stalls it did not.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <optional>

#include "core/step_program.h"
#include "executor/moe_inference.h"
#include "executor/timed.h"
#include "simulator/simulator.h"
#include "tools/run_common.h"
#include "traces/chrome_trace.h"
#include "tuner/search.h"
#include "tuner/store.h"

namespace switchyard::cli {
namespace {

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

// Measured and predicted side by side, with the prediction's error against the measurement.
Json versus(double measured, double predicted) {
  return {{"measured", measured},
          {"predicted", predicted},
          {"error", measured > 0 ? Json(predicted / measured - 1) : Json(nullptr)}};
}

}  // namespace

int run_inference(const RunFlags& f, Ranks& ranks, const Inputs& in) {
  const Plan& plan = in.plan;
  const ClusterSpec& c = in.cluster;
  const InferenceSpec& inf = *in.workload.inference;
  const int r = ranks.rank;
  Backend be =
      make_backend(f, ranks, rank_capacity(c), load_profile(c, f.profile).runtime_reserved_bytes);
  std::unique_ptr<Device>& backend = be.device;
  OpTimes op_times;
  auto dev = timed_device(*backend, op_times);

  // A replica serves batch / dp of the requests (the lowering's share; dp divides both batches),
  // its own sequences.
  InferenceSettings s;
  s.prefill_batch = inf.prefill_batch / plan.dp;
  s.decode_batch = inf.decode_batch / plan.dp;
  s.prompt_len = inf.prompt_len;
  s.decode_tokens = inf.decode_tokens;
  s.first_sequence = static_cast<int64_t>(r) * std::max(s.prefill_batch, s.decode_batch);
  s.ring = plan.ring_sections > 0;
  s.ring_ahead = ring_ahead_layers(in.model, plan);
  if (f.routing == "workload") workload_routing(in, s.routing_share, s.routing_layer_share);
  s.seed = f.seed;
  s.keep_logits = f.check;

  // Per measured batch: each pass's wall, copy and stall times, the program ops of prefill and
  // decode passes, every pass's next-token logits (for the check).
  std::vector<double> prefill_s, decode_s, prefill_copy, decode_copy, prefill_stall, decode_stall,
      batch_s;
  OpTimes prefill_ops, decode_ops;
  std::vector<MeasuredEvent> events;
  std::vector<int64_t> tokens_per_layer_expert;
  Json check = nullptr;
  int64_t slot_bytes = 0, weight_bytes = 0;
  try {
    auto runner = MoeInference::create(in.model, s, *dev, *backend);
    slot_bytes = runner->ring_slot_bytes();
    weight_bytes = runner->weight_bytes();
    for (int i = 0; i < f.warmup; ++i) runner->generate();
    dev->memory().reset_peaks();
    op_times.clear();
    op_times.record = !f.trace.empty();
    std::vector<float> logits;
    std::vector<int> generated;
    for (int i = 0; i < f.steps; ++i) {
      if (i == 0) maybe_fail(r);
      ranks.world->barrier();
      const auto t0 = Clock::now();
      if (i == 0) op_times.epoch = t0;
      if (i == 0)
        for (OpTimes* ops : {&prefill_ops, &decode_ops}) {
          ops->epoch = t0;
          ops->record = op_times.record;
        }
      InferenceResult res = runner->generate(&prefill_ops, &decode_ops);
      batch_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      for (const InferencePass& p : res.passes) {
        if (!p.decode && p.sequences != s.prefill_batch) continue;  // as the program: full passes
        (p.decode ? decode_s : prefill_s).push_back(p.wall_s);
        (p.decode ? decode_copy : prefill_copy).push_back(p.copy_s);
        (p.decode ? decode_stall : prefill_stall).push_back(p.stall_s);
      }
      tokens_per_layer_expert = std::move(res.tokens_per_layer_expert);
      if (i == 0) {
        logits = std::move(res.logits);
        generated = std::move(res.generated);
      }
    }
    if (f.check) {
      // The reference: the same replica with every weight resident in an unbounded arena.
      auto ref_dev = cpu_device({});
      InferenceSettings rs = s;
      rs.ring = false;
      const InferenceResult want =
          MoeInference::create(in.model, rs, *ref_dev, *ref_dev)->generate();
      double worst = 0, scale = 0;
      for (size_t i = 0; i < std::min(want.logits.size(), logits.size()); ++i) {
        worst = std::max(worst, static_cast<double>(std::abs(logits[i] - want.logits[i])));
        scale = std::max(scale, static_cast<double>(std::abs(want.logits[i])));
      }
      double figures[3] = {
          worst / std::max(scale, 1e-30),
          generated == want.generated && logits.size() == want.logits.size() ? 0.0 : 1.0, worst};
      ranks.world->all_reduce(figures, 3, DType::kFloat64, ReduceOp::kMax);
      check = {{"reference", "the same replica with every weight resident"},
               {"max_logit_abs_difference", figures[2]},
               {"max_logit_relative_difference", figures[0]},
               {"generated_tokens_identical", figures[1] == 0.0},
               {"tolerance", 1e-5},
               {"passed", figures[1] == 0.0 && figures[0] <= 1e-5}};
    }
  } catch (const std::exception& e) {
    if (ranks.size > 1) ranks.abort(1, e.what());
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }

  // The slowest replica decides each figure (they run at once, on their own requests).
  const int64_t prefill_passes = static_cast<int64_t>(prefill_s.size()) / f.steps;
  double figures[] = {median(prefill_s), mean(decode_s),      mean(prefill_copy),
                      mean(decode_copy), mean(prefill_stall), mean(decode_stall),
                      median(batch_s)};
  ranks.world->all_reduce(figures, std::size(figures), DType::kFloat64, ReduceOp::kMax);
  const auto& [m_prefill, m_decode, m_prefill_copy, m_decode_copy, m_prefill_stall, m_decode_stall,
               m_batch] = figures;
  // Per program op, per prefill pass and per decode step.
  const std::map<std::string, double> measured_ops[2] = {
      gather_program_seconds(ranks, prefill_ops,
                             static_cast<double>(f.steps) * static_cast<double>(prefill_passes)),
      gather_program_seconds(ranks, decode_ops,
                             static_cast<double>(f.steps) *
                                 static_cast<double>(std::max<int64_t>(inf.decode_tokens, 1)))};
  if (!f.trace.empty()) events = gather_events(ranks, {&op_times, &prefill_ops, &decode_ops});
  int64_t peaks[3] = {dev->memory().peak(Tier::kGPU), dev->memory().peak(Tier::kCPU),
                      dev->memory().peak(Tier::kSSD)};
  ranks.world->all_reduce(peaks, 3, DType::kInt64, ReduceOp::kMax);
  std::vector<int64_t> tokens_per_expert;
  if (in.model.moe) {
    ranks.world->all_reduce(tokens_per_layer_expert.data(), tokens_per_layer_expert.size(),
                            DType::kInt64, ReduceOp::kSum);
    const size_t experts = static_cast<size_t>(in.model.moe->num_experts);
    tokens_per_expert.assign(experts, 0);
    for (size_t i = 0; i < tokens_per_layer_expert.size(); ++i)
      tokens_per_expert[i % experts] += tokens_per_layer_expert[i];
  }
  if (r != 0) return check.is_null() || check["passed"].get<bool>() ? 0 : 1;

  // The prediction of the same plan: one prefill pass, one decode step at the average context.
  const CostProfile prof = load_profile(c, f.profile);
  SimulateOptions options;
  options.record_timeline = true;
  const Prediction pred = simulate(in.model, c, plan, in.workload, prof, options);
  const InferenceTimes& pt = *pred.inference;
  // Per pass (chunk 0: prefill, 1: one decode step): the copy stream's time and each program op's.
  double p_copy[2] = {0, 0};
  std::map<std::string, double> predicted_ops[2];
  std::vector<std::string> order[2];
  for (const TimelineEvent& e : pred.timeline) {
    if (!e.op || e.chunk < 0 || e.chunk > 1) continue;
    const double d = e.end_s - e.start_s;
    if (e.stream == StreamKind::kCopy || e.stream == StreamKind::kStorage) p_copy[e.chunk] += d;
    const std::string key = "forward " + std::string(e.op->name);
    if (!predicted_ops[e.chunk].count(key)) order[e.chunk].push_back(key);
    predicted_ops[e.chunk][key] += d;
  }
  const double D = static_cast<double>(inf.decode_tokens);
  // The measured latency as the prediction defines it: one prefill pass, decode_tokens steps.
  const double m_latency = m_prefill + D * m_decode;
  const double m_generated_per_s =
      m_latency > 0 ? static_cast<double>(inf.decode_batch) * D / m_latency : 0;
  const double m_copy = m_prefill_copy + D * m_decode_copy;
  const double m_stall = m_prefill_stall + D * m_decode_stall;
  const double p_copy_total = p_copy[0] + D * p_copy[1];
  Json program_ops = Json::array();
  for (int pass = 0; pass < 2; ++pass)
    append_program_ops(program_ops, std::move(order[pass]), predicted_ops[pass], measured_ops[pass],
                       pass == 0 ? "prefill" : "decode step");
  Json out = {{"model", in.model.name},
              {"cluster", c.name},
              {"ranks", ranks.size},
              {"plan", to_json(plan)},
              {"mode", "inference"},
              {"batches", f.steps},
              {"warmup", f.warmup},
              {"ring", s.ring ? Json({{"sections", plan.ring_sections},
                                      {"layers_ahead", s.ring_ahead},
                                      {"slot_bytes", slot_bytes},
                                      {"weight_bytes", weight_bytes}})
                              : Json(nullptr)},
              {"prefill_s", versus(m_prefill, pt.prefill_s)},
              {"decode_step_s", versus(m_decode, pt.decode_step_s)},
              {"latency_s", versus(m_latency, pt.latency_s)},
              {"measured_batch_wall_s", m_batch},
              {"prefill_tokens_per_s",
               versus(m_prefill > 0 ? static_cast<double>(s.prefill_batch * inf.prompt_len) *
                                          static_cast<double>(plan.dp) / m_prefill
                                    : 0,
                      pt.prefill_tokens_per_s)},
              {"generated_tokens_per_s", versus(m_generated_per_s, pt.generated_tokens_per_s)},
              {"weight_copy_s", versus(m_copy, p_copy_total)},
              {"stall_s", versus(m_stall, pred.time.stall_s)},
              {"copy_hidden_fraction",
               {{"measured", hidden_fraction(m_copy, m_stall)},
                {"predicted", hidden_fraction(p_copy_total, pred.time.stall_s)}}},
              {"peak_bytes", {{"gpu", peaks[0]}, {"cpu", peaks[1]}, {"ssd", peaks[2]}}},
              {"predicted_peak_bytes", {{"gpu", pred.peak.gpu}, {"cpu", pred.peak.cpu}}},
              {"tokens_per_expert", tokens_per_expert},
              {"program_ops", program_ops},
              {"check", check}};
  if (!f.trace.empty()) {
    write_measured_trace(f.trace, events, in, m_latency, ranks.size);
    out["trace"] = f.trace;
  }
  if (!f.no_db) {
    auto store = Store::open(f.db);
    const std::string mh = store->put_model(in.model), ch = store->put_cluster(c),
                      wh = store->put_workload(in.workload), ph = store->put_plan(plan);
    if (!store->find_prediction(mh, ch, wh, ph, profile_hash(prof), "simulate"))
      store->put_prediction(mh, ch, wh, ph, profile_hash(prof), summarize(pred));
    Store::Measurement m;
    m.backend = f.backend;
    m.steps = f.steps;
    m.step_time_s = m_latency;
    m.tokens_per_s = m_generated_per_s;
    m.peak_gpu_bytes = static_cast<double>(peaks[0]);
    m.peak_cpu_bytes = static_cast<double>(peaks[1]);
    m.peak_ssd_bytes = static_cast<double>(peaks[2]);
    m.trace_path = f.trace;
    m.details = {{"mode", "inference"},
                 {"prefill_s", out["prefill_s"]},
                 {"decode_step_s", out["decode_step_s"]},
                 {"weight_copy_s", out["weight_copy_s"]},
                 {"stall_s", out["stall_s"]},
                 {"copy_hidden_fraction", out["copy_hidden_fraction"]},
                 {"program_ops", program_ops},
                 {"tokens_per_expert", tokens_per_expert},
                 {"check", check}};
    out["measurement_id"] = store->put_measurement(mh, ch, wh, ph, m);
    out["db"] = f.db;
  }
  if (f.json) {
    std::cout << out.dump(2) << "\n";
    return check.is_null() || check["passed"].get<bool>() ? 0 : 1;
  }
  const auto row = [](const char* what, const Json& v, const char* unit) {
    const double me = v["measured"].get<double>(), pr = v["predicted"].get<double>();
    std::printf("  %-22s %11.4g %-8s predicted %11.4g %s", what, me, unit, pr, unit);
    if (!v["error"].is_null()) std::printf(" (%+.1f%%)", 100 * v["error"].get<double>());
    std::printf("\n");
  };
  std::cout << in.model.name << " inference on " << ranks.size << " replica"
            << (ranks.size > 1 ? "s" : "") << " (" << c.name << ", " << f.backend << " backend), "
            << (s.ring
                    ? "ring of " + std::to_string(plan.ring_sections) + " sections (" +
                          (s.ring_ahead > 0 ? std::to_string(s.ring_ahead) + " layers loading ahead"
                                            : std::string("load, then compute")) +
                          ")"
                    : std::string("weights resident"))
            << "\n";
  std::cout << "  " << s.prefill_batch << " x " << inf.prompt_len << "-token prompts per prefill, "
            << s.decode_batch << " sequences x " << inf.decode_tokens
            << " generated tokens per replica; " << f.steps << " batch" << (f.steps > 1 ? "es" : "")
            << " after " << f.warmup << " warm-up\n";
  row("prefill", out["prefill_s"], "s");
  row("decode step", out["decode_step_s"], "s");
  row("latency", out["latency_s"], "s");
  row("generated tokens/s", out["generated_tokens_per_s"], "");
  if (s.ring) {
    row("weight copies", out["weight_copy_s"], "s");
    row("stalls", out["stall_s"], "s");
    const Json& h = out["copy_hidden_fraction"];
    std::cout << "  copy time hidden       "
              << (h["measured"].is_null() ? std::string("-") : pct(h["measured"].get<double>()))
              << " measured, "
              << (h["predicted"].is_null() ? std::string("-") : pct(h["predicted"].get<double>()))
              << " predicted\n";
  }
  std::cout << "  peak memory            device " << gib(static_cast<double>(peaks[0])) << " of "
            << gib(static_cast<double>(rank_capacity(c).device_bytes)) << " (predicted "
            << gib(pred.peak.gpu) << "), host " << gib(static_cast<double>(peaks[1])) << "\n";
  if (!check.is_null())
    std::cout << "  check                  " << (check["passed"].get<bool>() ? "passed" : "FAILED")
              << ": generated tokens "
              << (check["generated_tokens_identical"].get<bool>() ? "identical" : "DIFFER")
              << ", logits within "
              << fmt("%.1e", check["max_logit_relative_difference"].get<double>())
              << " of the all-resident run (tolerance 1e-5)\n";
  if (!f.trace.empty()) std::cout << "  measured timeline written to " << f.trace << "\n";
  if (!f.no_db) std::cout << "  stored in " << f.db << "\n";
  return check.is_null() || check["passed"].get<bool>() ? 0 : 1;
}

}  // namespace switchyard::cli
