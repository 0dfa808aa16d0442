// What the simulator predicts for one training step, by either fidelity, and its JSON form.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/json_io.h"
#include "core/step_program.h"
#include "cost_models/memory.h"

namespace switchyard {

// Where the busiest stage's step time goes. The parts sum to the step time: compute-stream busy
// time, the time it waited on each kind of communication, the pipeline bubble (waiting on another
// stage's work, including for the step's end), and the optimizer step.
struct TimeBreakdown {
  double compute_s = 0;
  double tp_comm_s = 0;  // exposed (not overlapped) communication, per group kind
  double cp_comm_s = 0;
  double ep_comm_s = 0;
  double dp_comm_s = 0;
  double pp_comm_s = 0;
  double bubble_s = 0;
  double optimizer_s = 0;
  double stall_s = 0;  // waiting on copies between tiers
  double total() const {
    return compute_s + tp_comm_s + cp_comm_s + ep_comm_s + dp_comm_s + pp_comm_s + bubble_s +
           optimizer_s + stall_s;
  }
};

// One executed op of the timeline (simulate only).
struct TimelineEvent {
  int stage = 0;
  StreamKind stream = StreamKind::kCompute;
  const OpTemplate* op = nullptr;  // nullptr: pipeline send/recv
  int micro_batch = -1;
  int chunk = 0;
  double start_s = 0;
  double end_s = 0;
};

// Compute standing still for a copy between tiers (a prefetch that did not keep up), on the
// timeline as its own event (simulate only). In training the critical stage's stalls add up to
// its breakdown's stall time; in inference the timeline holds one decode step, while the
// breakdown counts every decode step (and the steady state's wait for the next step's loads).
struct StallEvent {
  int stage = 0;
  int micro_batch = -1;
  int chunk = 0;
  const OpTemplate* waiting_for = nullptr;  // the copy that ended the stall
  double start_s = 0;
  double end_s = 0;
};

// Inference workloads: one batch of requests, prefilled then decoded token by token.
struct InferenceTimes {
  double prefill_s = 0;      // all prompts through the model
  double decode_step_s = 0;  // one generated token for every sequence of the decode batch
  double latency_s = 0;      // prefill + decode_tokens decode steps
  double prefill_tokens_per_s = 0;
  double generated_tokens_per_s = 0;
};

struct Prediction {
  std::string fidelity;                     // "estimate" or "simulate"
  std::optional<InferenceTimes> inference;  // set for inference workloads
  double step_time_s = 0;
  double tokens_per_step = 0;
  double tokens_per_s = 0;
  double tokens_per_s_per_gpu = 0;
  double model_tflops_per_gpu = 0;
  double mfu = 0;
  int gpus = 0;
  int critical_stage = 0;  // the busiest pipeline stage (least waiting); `time` is its breakdown
  TimeBreakdown time;
  // The host's delayed update (Plan::delayed_update) on that stage: it runs beside the step; what
  // outlasts the step's other work is in time.optimizer_s.
  double delayed_update_s = 0;
  MemoryBreakdown memory;  // of the stage with the highest GPU peak
  TierBytes peak;          // per tier, that stage
  int peak_stage = 0;
  std::vector<double> stage_peak_gpu_bytes;
  int64_t ops = 0;  // op instances timed (simulate)
  std::vector<std::string> notes;
  std::vector<TimelineEvent> timeline;         // filled by simulate when asked
  std::vector<StallEvent> stalls;              // with the timeline
  std::shared_ptr<const StepProgram> program;  // what the timeline's ops point into
};

Json to_json(const Prediction& p);

}  // namespace switchyard
