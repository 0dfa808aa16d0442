// Trace format shared by predictions and measurements: Chrome trace-event JSON that Perfetto and
// chrome://tracing open (traceEvents of ph "X", ts/dur in microseconds, pid = pipeline stage (the
// rank role), tid = stream, one track per stream), plus a "switchyard" object with the content
// hashes of model, cluster, plan and workload so a trace can be matched to its inputs and replayed.
// Each event's args carry the op's id in the step program, layer, micro-batch, chunk, bytes, FLOPs
// and tokens.
#pragma once

#include <string>
#include <vector>

#include "core/config_registry.h"
#include "simulator/prediction.h"

namespace switchyard {

// Writes the prediction's timeline (simulate with record_timeline). Throws std::runtime_error when
// the file cannot be written.
void write_chrome_trace(const std::string& path, const Prediction& p, const Inputs& in);

// A measured op of one rank (the executor's per-op timing), seconds from a point all ranks share.
struct MeasuredEvent {
  int rank = 0;
  std::string op;
  bool communication = false;
  double start_s = 0;
  double end_s = 0;
  // A StepProgram op's scope (its phase: "forward", "backward", "step"); empty: a device or
  // collective call of class `op`.
  std::string program_phase;
  bool copy = false;  // a copy between tiers (its own track, as the simulator's copy stream)
  bool host = false;  // the host cores' work beside the step (its own track, as the host stream)
};

// Writes a measured run's ops in the same format (pid = rank, tid 0 = compute calls, 1 =
// communication calls, 2 = the StepProgram ops those calls ran for, named as the simulator's trace
// names them; "kind": "measurement").
void write_measured_trace(const std::string& path, const std::vector<MeasuredEvent>& events,
                          const Inputs& in, double step_time_s, int ranks);

}  // namespace switchyard
