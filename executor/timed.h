// Per-op measurement: a Device and a Communicator that forward every call to the real backend and
// add its wall time to a named op class ("gemm", "attention", "all_to_allv", ...). The run reports
// these beside the step time; what the step spends outside them is the runner's own host work.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "executor/communicator.h"
#include "executor/device.h"

namespace switchyard {

// The phase of a StepProgram op.
enum class OpPhase : uint8_t { kForward, kBackward, kStep };
const char* op_phase_name(OpPhase p);  // "forward", "backward", "step"

// One measured op, for the trace: seconds since `OpTimes::epoch`. A device or collective call
// carries its class ("gemm", "all_to_allv"); a program op (`program`) the lowering's op name.
struct OpEvent {
  const char* op = "";
  bool communication = false;
  double start_s = 0;
  double end_s = 0;
  bool program = false;
  OpPhase phase = OpPhase::kForward;
  bool copy = false;  // a copy between tiers (the copy engine's, off the computing thread)
  bool host = false;  // the host cores' work beside the step (the delayed update), off this thread
};

struct OpTimes {
  std::map<std::string, double> seconds;
  std::map<std::string, int64_t> calls;
  // Of `seconds`, the time the device itself measured (CUDA events around each call; empty on a
  // backend whose calls are their host time): the rest is launching and waiting.
  std::map<std::string, double> device_seconds;
  // Wall time per StepProgram op, keyed "<phase> <name>" ("forward experts_fc1"): the scopes the
  // runner opens with ProgramOp, host work inside them included.
  std::map<std::string, double> program_seconds;
  bool record = false;  // keep every op as an event (for --trace)
  std::chrono::steady_clock::time_point epoch = std::chrono::steady_clock::now();
  std::vector<OpEvent> events;
  void clear() {
    seconds.clear();
    calls.clear();
    device_seconds.clear();
    program_seconds.clear();
    events.clear();
  }
};

// While alive, ProgramOp scopes opened on this thread record into `times`; without a sink they
// cost one branch.
class ProgramOpSink {
 public:
  explicit ProgramOpSink(OpTimes& times);
  ~ProgramOpSink();
  ProgramOpSink(const ProgramOpSink&) = delete;
  ProgramOpSink& operator=(const ProgramOpSink&) = delete;

 private:
  OpTimes* prev_;
};

// The StepProgram op the runner executes while this scope lives: `name` is the lowering's name
// ("qkv", "dispatch", "experts_fc1", "dp_grad_bucket", ...; a string literal), so a measurement
// lines up with the prediction op by op. Scopes do not nest.
class ProgramOp {
 public:
  ProgramOp(const char* name, OpPhase phase);
  ~ProgramOp();
  ProgramOp(const ProgramOp&) = delete;
  ProgramOp& operator=(const ProgramOp&) = delete;

 private:
  OpTimes* sink_;
  const char* name_;
  OpPhase phase_;
  std::chrono::steady_clock::time_point start_;
};

// A program op that ran off this thread (a copy engine's load between tiers): its time joins the
// current sink's op "<phase> <name>", and its span the sink's events when it records. No-op
// without a sink.
void record_copy_op(const char* name, OpPhase phase, std::chrono::steady_clock::time_point start,
                    std::chrono::steady_clock::time_point end);
// A program op the host's cores ran beside the step, off this thread (the delayed update's Adam):
// as record_copy_op, on the host's track.
void record_host_op(const char* name, OpPhase phase, std::chrono::steady_clock::time_point start,
                    std::chrono::steady_clock::time_point end);
// The compute thread waited `seconds` for such a copy, ending now: an event named "stall" when
// the sink records (no program op: the simulator shows a stall as a gap between ops).
void record_stall(double seconds);

// Consecutive stretches of code as program ops: each at() ends the previous op and opens the next
// (in `phase` unless named), the last ends with the cursor.
class ProgramOpCursor {
 public:
  explicit ProgramOpCursor(OpPhase phase) : phase_(phase) {}
  void at(const char* name) { at(name, phase_); }
  void at(const char* name, OpPhase phase) {
    op_.reset();
    op_.emplace(name, phase);
  }
  void close() { op_.reset(); }  // ends the open op (time until the next at() is no op's)

 private:
  OpPhase phase_;
  std::optional<ProgramOp> op_;
};

// `inner` must outlive the wrapper; `times` too.
std::unique_ptr<Device> timed_device(Device& inner, OpTimes& times);
std::unique_ptr<Communicator> timed_communicator(std::unique_ptr<Communicator> inner,
                                                 OpTimes& times);

}  // namespace switchyard
