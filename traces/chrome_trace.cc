#include "traces/chrome_trace.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace switchyard {

namespace {

std::string_view phase_name(Phase p) {
  switch (p) {
    case Phase::kForward:
      return "forward";
    case Phase::kBackward:
      return "backward";
    case Phase::kRecompute:
      return "recompute";
    case Phase::kStep:
      return "step";
  }
  return "?";
}

// The "switchyard" object of a trace: which inputs it belongs to, by name and content hash.
Json trace_meta(const Inputs& in, const char* kind, double step_time_s) {
  return {{"format", "switchyard-trace"},
          {"version", 1},
          {"kind", kind},
          {"model", in.model.name},
          {"cluster", in.cluster.name},
          {"nodes", in.cluster.num_nodes},
          {"plan", in.plan.name},
          {"workload", in.workload.name},
          {"model_hash", content_hash(semantic_json(in.model))},
          {"cluster_hash", content_hash(semantic_json(in.cluster))},
          {"plan_hash", content_hash(semantic_json(in.plan))},
          {"workload_hash", content_hash(semantic_json(in.workload))},
          {"step_time_s", step_time_s}};
}

// Chrome's ts and dur in microseconds with 3 decimals, from whole nanoseconds: an event that ends
// where the next begins writes the same number for both, so events on one track nest exactly.
struct Micros {
  double ts, dur;
};
Micros micros(double start_s, double end_s) {
  const long long a = std::llround(start_s * 1e9), b = std::llround(end_s * 1e9);
  return {static_cast<double>(a) / 1e3, static_cast<double>(b - a) / 1e3};
}

// Each op template's id in its program: "s<stage>.c<chunk>.f<i>" (forward list), ".b<i>"
// (backward list) or "s<stage>.step<i>": the same template in every micro-batch's events.
std::unordered_map<const OpTemplate*, std::string> program_op_ids(const StepProgram& prog) {
  std::unordered_map<const OpTemplate*, std::string> ids;
  for (size_t s = 0; s < prog.stages.size(); ++s) {
    const StageProgram& st = prog.stages[s];
    const std::string stage = "s" + std::to_string(s);
    for (size_t c = 0; c < st.chunks.size(); ++c) {
      const std::string chunk = stage + ".c" + std::to_string(c);
      for (size_t i = 0; i < st.chunks[c].forward.size(); ++i)
        ids[&st.chunks[c].forward[i]] = chunk + ".f" + std::to_string(i);
      for (size_t i = 0; i < st.chunks[c].backward.size(); ++i)
        ids[&st.chunks[c].backward[i]] = chunk + ".b" + std::to_string(i);
    }
    for (size_t i = 0; i < st.step_ops.size(); ++i)
      ids[&st.step_ops[i]] = stage + ".step" + std::to_string(i);
  }
  return ids;
}

}  // namespace

void write_chrome_trace(const std::string& path, const Prediction& p, const Inputs& in) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "w"), &std::fclose);
  if (!f) throw std::runtime_error("cannot write trace file " + path);
  Json meta = trace_meta(in, "prediction", p.step_time_s);
  meta["fidelity"] = p.fidelity;
  std::fprintf(f.get(), "{\"displayTimeUnit\":\"ms\",\"switchyard\":%s,\"traceEvents\":[\n",
               meta.dump().c_str());
  bool first = true;
  auto sep = [&] {
    if (!first) std::fputs(",\n", f.get());
    first = false;
  };
  int stages = 0;
  for (const TimelineEvent& e : p.timeline) stages = std::max(stages, e.stage + 1);
  for (int s = 0; s < stages; ++s) {
    sep();
    std::fprintf(f.get(), R"({"ph":"M","name":"process_name","pid":%d,"args":{"name":"stage %d"}})",
                 s, s);
    for (int t = 0; t < kNumStreams; ++t) {
      sep();
      std::fprintf(f.get(),
                   R"({"ph":"M","name":"thread_name","pid":%d,"tid":%d,"args":{"name":"%s"}})", s,
                   t, std::string(stream_name(static_cast<StreamKind>(t))).c_str());
    }
  }
  const auto ids =
      p.program ? program_op_ids(*p.program) : std::unordered_map<const OpTemplate*, std::string>{};
  const double p2p_bytes = p.program ? p.program->p2p_bytes : 0.0;
  for (size_t i = 0; i < p.timeline.size(); ++i) {
    const TimelineEvent& e = p.timeline[i];
    const OpTemplate* op = e.op;
    sep();
    const std::string name = op ? std::string(op->name) : std::string("p2p_send");
    const auto id = op ? ids.find(op) : ids.end();
    // A pipeline send has no template: its id names the unit whose output it carries.
    const std::string op_id =
        id != ids.end() ? id->second
        : op            ? std::string("?")
                        : "s" + std::to_string(e.stage) + ".c" + std::to_string(e.chunk) + ".send";
    const Micros t = micros(e.start_s, e.end_s);
    std::fprintf(
        f.get(),
        R"({"ph":"X","name":"%s","cat":"%s","pid":%d,"tid":%d,"ts":%.3f,"dur":%.3f,"args":{"op_id":"%s","event":%zu,)"
        R"("micro_batch":%d,"chunk":%d,"layer":%d,"bytes":%.0f,"flops":%.0f,"tokens":%lld)",
        name.c_str(), op ? std::string(phase_name(op->phase)).c_str() : "p2p", e.stage,
        static_cast<int>(e.stream), t.ts, t.dur, op_id.c_str(), i, e.micro_batch, e.chunk,
        op ? op->layer : -1, op ? op->bytes : p2p_bytes, op ? op->flops : 0.0,
        static_cast<long long>(op ? op->tokens : 0));
    if (op && op->kind == OpKind::kCollective)
      std::fprintf(f.get(), R"(,"collective":"%s","group":"%s")",
                   std::string(collective_name(op->collective)).c_str(),
                   std::string(group_name(op->group)).c_str());
    std::fputs("}}", f.get());
  }
  // Compute standing still for a copy: a slice of its own on the compute track, naming the copy.
  for (const StallEvent& e : p.stalls) {
    sep();
    const Micros t = micros(e.start_s, e.end_s);
    const auto id = e.waiting_for ? ids.find(e.waiting_for) : ids.end();
    std::fprintf(
        f.get(),
        R"({"ph":"X","name":"stall","cat":"stall","pid":%d,"tid":%d,"ts":%.3f,"dur":%.3f,"args":{"waiting_for":"%s","op_id":"%s","micro_batch":%d,"chunk":%d}})",
        e.stage, static_cast<int>(StreamKind::kCompute), t.ts, t.dur,
        e.waiting_for ? std::string(e.waiting_for->name).c_str() : "?",
        id != ids.end() ? id->second.c_str() : "?", e.micro_batch, e.chunk);
  }
  std::fputs("\n]}\n", f.get());
  if (std::ferror(f.get())) throw std::runtime_error("error writing trace file " + path);
}

void write_measured_trace(const std::string& path, const std::vector<MeasuredEvent>& events,
                          const Inputs& in, double step_time_s, int ranks) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "w"), &std::fclose);
  if (!f) throw std::runtime_error("cannot write trace file " + path);
  Json meta = trace_meta(in, "measurement", step_time_s);
  meta["backend"] = "cpu";
  std::fprintf(f.get(), "{\"displayTimeUnit\":\"ms\",\"switchyard\":%s,\"traceEvents\":[\n",
               meta.dump().c_str());
  bool first = true;
  auto sep = [&] {
    if (!first) std::fputs(",\n", f.get());
    first = false;
  };
  for (int r = 0; r < ranks; ++r) {
    sep();
    std::fprintf(f.get(), R"({"ph":"M","name":"process_name","pid":%d,"args":{"name":"rank %d"}})",
                 r, r);
    static const char* const kTracks[] = {"compute", "communication", "program ops",
                                          "copies between tiers", "host (delayed update)"};
    for (int t = 0; t < 5; ++t) {
      sep();
      std::fprintf(f.get(),
                   R"({"ph":"M","name":"thread_name","pid":%d,"tid":%d,"args":{"name":"%s"}})", r,
                   t, kTracks[t]);
    }
  }
  // Work that began before the first measured step (a delayed update started by the step before)
  // would start before 0: every event shifts so that the earliest starts at 0.
  double origin = 0;
  for (const MeasuredEvent& e : events) origin = std::min(origin, e.start_s);
  for (const MeasuredEvent& e : events) {
    sep();
    const bool program = !e.program_phase.empty();
    const int tid = e.host ? 4 : e.copy ? 3 : program ? 2 : e.communication ? 1 : 0;
    const std::string cat = e.host            ? "host"
                            : e.copy          ? "copy"
                            : program         ? e.program_phase
                            : e.communication ? "communication"
                                              : "compute";
    const Micros t = micros(e.start_s - origin, e.end_s - origin);
    std::fprintf(f.get(),
                 R"({"ph":"X","name":"%s","cat":"%s","pid":%d,"tid":%d,"ts":%.3f,"dur":%.3f})",
                 e.op.c_str(), cat.c_str(), e.rank, tid, t.ts, t.dur);
  }
  std::fputs("\n]}\n", f.get());
  if (std::ferror(f.get())) throw std::runtime_error("error writing trace file " + path);
}

}  // namespace switchyard
