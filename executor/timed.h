// Per-op measurement: a Device and a Communicator that forward every call to the real backend and
// add its wall time to a named op class ("gemm", "attention", "all_to_allv", ...). The run reports
// these beside the step time; what the step spends outside them is the runner's own host work.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "executor/communicator.h"
#include "executor/device.h"

namespace switchyard {

// One measured op, for the trace: seconds since `OpTimes::epoch`.
struct OpEvent {
  const char* op = "";
  bool communication = false;
  double start_s = 0;
  double end_s = 0;
};

struct OpTimes {
  std::map<std::string, double> seconds;
  std::map<std::string, int64_t> calls;
  bool record = false;  // keep every op as an event (for --trace)
  std::chrono::steady_clock::time_point epoch = std::chrono::steady_clock::now();
  std::vector<OpEvent> events;
  void clear() {
    seconds.clear();
    calls.clear();
    events.clear();
  }
};

// `inner` must outlive the wrapper; `times` too.
std::unique_ptr<Device> timed_device(Device& inner, OpTimes& times);
std::unique_ptr<Communicator> timed_communicator(std::unique_ptr<Communicator> inner,
                                                 OpTimes& times);

}  // namespace switchyard
