// A copy engine: the CPU backend's counterpart of a CUDA copy stream. Copies between tiers run in
// submission order on the engine's own thread while the caller computes; wait() blocks until one
// has finished and says how long the caller stood still for it (a stall). Every finished copy keeps
// its span, so a run can tell how much copy time compute hid.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "executor/device.h"

namespace switchyard {

class CopyEngine {
 public:
  using Clock = std::chrono::steady_clock;
  using Ticket = uint64_t;
  // One finished copy.
  struct Span {
    const char* label = "";  // what submit() named it (a StepProgram op: "param_fetch")
    Ticket ticket = 0;
    size_t bytes = 0;
    Clock::time_point start, end;
    double seconds() const { return std::chrono::duration<double>(end - start).count(); }
  };

  // `device.copy` runs on the engine's thread: pass the backend itself, not a timing wrapper
  // (whose counters belong to the computing thread).
  explicit CopyEngine(Device& device);
  ~CopyEngine();  // finishes the queued copies, then joins
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // A copy that must wait for another engine's copy (the copy to the GPU of what an SSD read
  // brings into host memory): this engine waits for it before starting, outside the copy's span.
  // The other engine must outlive this one.
  struct After {
    CopyEngine* engine;
    Ticket ticket;
  };
  Ticket submit(void* dst, const void* src, size_t bytes, const char* label = "copy");
  Ticket submit_after(After after, void* dst, const void* src, size_t bytes, const char* label);
  // Any other transfer the engine runs in turn with the copies (a write-back to disk): `bytes` is
  // what it moves, for the spans.
  Ticket submit(std::function<void()> transfer, size_t bytes, const char* label);
  // Blocks until copy `t` has finished; returns the seconds spent waiting (0 when it already had).
  // A copy that threw rethrows here, and so does every later wait: one failed copy leaves the
  // tiers inconsistent, so the engine stays failed. A ticket never submitted is a logic_error.
  double wait(Ticket t);
  // Waits for every submitted copy.
  void drain();
  // The finished copies' spans so far, in order of completion; clears them.
  std::vector<Span> take_spans();

 private:
  struct Job {
    const char* label;
    Ticket ticket;
    void* dst;
    const void* src;
    size_t bytes;
    std::function<void()> transfer;  // instead of the copy, when set
    After after;
  };
  void loop();
  Device& device_;
  std::mutex m_;
  std::condition_variable work_, done_;
  std::deque<Job> queue_;
  std::vector<Span> spans_;
  Ticket next_ = 1, finished_ = 0;  // copies finish in ticket order
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace switchyard
