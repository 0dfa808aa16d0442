// The NCCL backend of Communicator (see nccl_communicator.h).
//
// A group holds up to three NCCL communicators ("lanes"), each with its own non-blocking CUDA
// stream: `main` runs the collectives; in groups of two or more ranks `up` carries the messages
// from lower to higher ranks and `down` those going back. NCCL runs one communicator's operations
// in the order they were issued, so with a single queue a pipeline deadlocks: stage 0 posts
// send x0, send x1, recv dx0 while stage 1 posts recv x0, send dx0, recv x1 — stage 0's second
// send waits for a receive stage 1 queued behind its own send, which waits for stage 0's receive,
// queued behind that second send. With one queue per direction no such cycle forms.
//
// NCCL is used non-blocking (config.blocking = 0): a call may answer ncclInProgress while NCCL
// connects in a background thread; the communicator's state (ncclCommGetAsyncError) must then be
// polled back to ncclSuccess before anything else is issued on it (a send_async() leaves that to
// the lane's next call or its PendingOp: see LaneEvent). Creation and split are completed the
// same way (a split runs as its parent's job and writes the new communicator when done), so a
// member that never joins costs a timeout, not a hang.
//
// Completion is polled with cudaEventQuery on an event recorded behind the operation, checking
// NCCL's asynchronous error and the deadline on every poll: a spin (yielding) for the first
// 100 µs, then 50 µs sleeps.
//
// Host buffers are staged through a per-lane device scratch, copied in on the lane's stream (so
// stream order keeps the scratch safe between operations) and copied out, once the operation is
// complete, on a separate copy stream: a device-to-pageable copy blocks the host until the copy
// has run, and behind a stuck NCCL kernel on the lane's stream it would never run. The scratch
// grows (never shrinks) with cudaFreeAsync/cudaMallocAsync: cudaFree synchronises the device,
// which would wait on NCCL kernels of other groups that may be waiting on this rank.
#include "executor/cuda/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "executor/cuda/cuda_check.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;

enum LaneId { kMain = 0, kUp = 1, kDown = 2, kLanes = 3 };

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::kFloat32:
      return ncclFloat32;
    case DType::kFloat64:
      return ncclFloat64;
    case DType::kInt32:
      return ncclInt32;
    case DType::kInt64:
      return ncclInt64;
    case DType::kByte:
      return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

std::string seconds(double s) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", s);
  return text;
}

// The first failure among the results of a group's calls (ncclInProgress from ncclGroupEnd is not
// one: it means "poll the communicator").
ncclResult_t first_failure(std::initializer_list<ncclResult_t> results) {
  ncclResult_t out = ncclSuccess;
  for (ncclResult_t r : results) {
    if (r != ncclSuccess && r != ncclInProgress) return r;
    if (r == ncclInProgress) out = r;
  }
  return out;
}

// A time limit from now (<= 0: none).
class Deadline {
 public:
  explicit Deadline(double timeout_s) : timeout_s_(timeout_s) {}
  bool passed() const {
    return timeout_s_ > 0 &&
           std::chrono::duration<double>(Clock::now() - start_).count() > timeout_s_;
  }

 private:
  Clock::time_point start_ = Clock::now();
  double timeout_s_;
};

// Between polls: yield for the first 100 µs (latency), then sleep 50 µs (oversubscribed ranks and
// long waits must not burn a core).
class Backoff {
 public:
  void pause() {
    if (Clock::now() - start_ < std::chrono::microseconds(100))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

 private:
  Clock::time_point start_ = Clock::now();
};

// Makes the group's device current for a scope and restores the caller's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    int current = -1;
    CUDA_CHECK(cudaGetDevice(&current));
    if (current != device) {
      CUDA_CHECK(cudaSetDevice(device));
      previous_ = current;
    }
  }
  ~DeviceScope() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

enum class Ready { kYes, kFailed, kTimedOut };

// Polls `comm`'s state until a non-blocking call on it has finished.
Ready poll_ready(ncclComm_t comm, const Deadline& deadline, ncclResult_t* error) {
  Backoff backoff;
  for (;;) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t q = ncclCommGetAsyncError(comm, &state);
    if (q != ncclSuccess) {
      *error = q;
      return Ready::kFailed;
    }
    if (state == ncclSuccess) return Ready::kYes;
    if (state != ncclInProgress) {
      *error = state;
      return Ready::kFailed;
    }
    if (deadline.passed()) return Ready::kTimedOut;
    backoff.pause();
  }
}

// What an operation is, for messages.
struct OpInfo {
  std::string op;
  int peer = -1;  // send/recv
  size_t count = 0;
  DType dtype = DType::kByte;
};

// An event behind an asynchronous operation on a lane's stream. A send_async() returns while NCCL
// may still be launching it: a first message to a peer connects to that peer in NCCL's background
// thread, which waits until the peer posts its receive. Waiting for that in send_async() would
// deadlock two neighbours that each post a send to the other before receiving (and the
// interleaved pipeline schedules on 3 or more stages). The event is recorded once the launch is
// done, by the next call on the lane or by the PendingOp.
struct LaneEvent {
  LaneEvent() = default;
  LaneEvent(const LaneEvent&) = delete;
  LaneEvent& operator=(const LaneEvent&) = delete;
  ~LaneEvent() {
    if (event) (void)cudaEventDestroy(event);  // released once it has completed
  }
  cudaEvent_t event = nullptr;
  bool recorded = false;
  OpInfo info;
};

// One NCCL communicator of a group, with its stream.
struct Lane {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;  // blocking operations' completion
  char* scratch = nullptr;     // host buffers staged here
  size_t scratch_bytes = 0;
  int64_t* header = nullptr;  // point-to-point lanes: {tag, bytes} sent, then {tag, bytes} received
  std::shared_ptr<LaneEvent> launching;  // a send_async() NCCL is still launching
};

// A group: its lanes and what messages say about it. Shared by the Communicator and its pending
// operations, so either may go first; the last one ends the NCCL communicators.
class State {
 public:
  State(std::string group, int group_rank, int group_size, int my_world_rank, int cuda_device,
        double timeout)
      : name(std::move(group)),
        rank(group_rank),
        size(group_size),
        world_rank(my_world_rank),
        device(cuda_device),
        timeout_s(timeout) {}
  State(const State&) = delete;
  State& operator=(const State&) = delete;

  // Waits (bounded) for the streams to drain, then finalizes and destroys the NCCL communicators;
  // aborts them instead when the group failed or they do not finish in time. Never throws.
  ~State();

  std::string describe(const OpInfo& info) const {
    std::string s = info.op;
    if (info.peer >= 0) s += " rank " + std::to_string(info.peer);
    if (info.count > 0) s += " of " + std::to_string(info.count) + " " + dtype_name(info.dtype);
    s += " on group \"" + name + "\" (world ranks ";
    if (members.empty()) s += "not yet known";
    for (size_t i = 0; i < members.size(); ++i) s += (i ? "," : "") + std::to_string(members[i]);
    return s + ")";
  }

  void check_usable(const OpInfo& info) const {
    if (failed)
      throw CommError(describe(info) + " on world rank " + std::to_string(world_rank) +
                      ": the group is unusable after an earlier failure: " + failure);
  }

  // Takes ownership of `comm` as lane `id` and gives the lane its stream and event (and the
  // point-to-point lanes their header slots).
  void open(LaneId id, ncclComm_t comm) {
    Lane& l = lanes[id];
    l.comm = comm;
    CUDA_CHECK(cudaStreamCreateWithFlags(&l.stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&l.done, cudaEventDisableTiming));
    if (id != kMain)
      CUDA_CHECK(
          cudaMallocAsync(reinterpret_cast<void**>(&l.header), 4 * sizeof(int64_t), l.stream));
    if (!copy_stream) CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking));
  }

  std::string timeout_text(const OpInfo& info) const {
    return describe(info) + " did not complete within " + seconds(timeout_s) + " s on world rank " +
           std::to_string(world_rank) + ": a member died, is stuck, or called another operation";
  }
  std::string nccl_text(const OpInfo& info, ncclResult_t r) const {
    std::string s = describe(info) + " failed on world rank " + std::to_string(world_rank) +
                    ": NCCL: " + ncclGetErrorString(r);
    const char* last = ncclGetLastError(nullptr);
    if (last && *last) s += std::string(" (") + last + ")";
    return s;
  }

  // Aborts every NCCL communicator of the group (their kernels quit) and marks it unusable.
  void abort_all(const std::string& why) noexcept {
    if (!failed) failure = why;
    failed = true;
    for (Lane& l : lanes)
      if (l.comm) {
        (void)ncclCommAbort(l.comm);
        l.comm = nullptr;
      }
  }
  [[noreturn]] void raise_timeout(const OpInfo& info) {
    const std::string msg = timeout_text(info);
    abort_all(msg);
    throw CommTimeout(msg);
  }
  [[noreturn]] void raise_nccl(const OpInfo& info, ncclResult_t r) {
    const std::string msg = nccl_text(info, r);
    abort_all(msg);
    throw CommError(msg);
  }
  [[noreturn]] void raise_cuda(const OpInfo& info, cudaError_t e) {
    const std::string msg = describe(info) + " failed on world rank " + std::to_string(world_rank) +
                            ": CUDA: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
    abort_all(msg);
    throw CommError(msg);
  }

  // After a call answered ncclInProgress: polls the lane until NCCL has issued the operation.
  void settle(Lane& l, const OpInfo& info, const Deadline& deadline) {
    ncclResult_t error = ncclSuccess;
    switch (poll_ready(l.comm, deadline, &error)) {
      case Ready::kYes:
        return;
      case Ready::kFailed:
        raise_nccl(info, error);
      case Ready::kTimedOut:
        raise_timeout(info);
    }
  }

  // Completes the launch of the lane's send_async() that NCCL was still launching, if any (polled
  // within `deadline`), and records its event: nothing else may use the lane's communicator before.
  void finish_launch(Lane& l, const Deadline& deadline) {
    if (!l.launching) return;
    settle(l, l.launching->info, deadline);
    CUDA_CHECK(cudaEventRecord(l.launching->event, l.stream));
    l.launching->recorded = true;
    l.launching.reset();
  }
  // finish_launch() without waiting: false while NCCL is still launching.
  bool launch_done(Lane& l) {
    if (!l.launching) return true;
    ncclResult_t state = ncclInProgress;
    const ncclResult_t q = ncclCommGetAsyncError(l.comm, &state);
    if (q != ncclSuccess) raise_nccl(l.launching->info, q);
    if (state == ncclInProgress) return false;
    if (state != ncclSuccess) raise_nccl(l.launching->info, state);
    finish_launch(l, Deadline(0));
    return true;
  }

  // Throws when NCCL reported an asynchronous error on the lane (a peer died, a network error).
  void check_async(Lane& l, const OpInfo& info) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(l.comm, &state);
    if (q != ncclSuccess) raise_nccl(info, q);
    if (state != ncclSuccess && state != ncclInProgress) raise_nccl(info, state);
  }

  // Polls `event` (recorded behind the operation on the lane's stream) to completion.
  void wait_event(Lane& l, cudaEvent_t event, const OpInfo& info, const Deadline& deadline) {
    Backoff backoff;
    for (;;) {
      const cudaError_t e = cudaEventQuery(event);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) raise_cuda(info, e);
      check_async(l, info);
      if (deadline.passed()) raise_timeout(info);
      backoff.pause();
    }
  }

  // True for host memory (pageable, or pinned with cudaHostAlloc/cudaHostRegister): NCCL gets a
  // staged copy. Device and managed memory go to NCCL as they are.
  bool is_host(const void* p, const OpInfo& info) const {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
      (void)cudaGetLastError();  // not a pointer CUDA knows: plain host memory
      return true;
    }
    if (a.type == cudaMemoryTypeDevice && a.device != device)
      throw CommError(describe(info) + ": a buffer is on GPU " + std::to_string(a.device) +
                      " but the group runs on GPU " + std::to_string(device));
    return a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged;
  }

  void ensure_scratch(Lane& l, size_t bytes) {
    if (bytes <= l.scratch_bytes) return;
    size_t want = size_t{64} << 10;
    while (want < bytes) want *= 2;
    if (l.scratch) CUDA_CHECK(cudaFreeAsync(l.scratch, l.stream));  // after its users, in order
    l.scratch = nullptr;
    l.scratch_bytes = 0;
    CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&l.scratch), want, l.stream));
    l.scratch_bytes = want;
  }

  // ncclCommSplit of `from` (one of this group's lanes), completed within the deadline: the split
  // runs as `from`'s background job, which stores the new communicator when it is done. On
  // failure this group is aborted (and the new communicator, if any) and CommError/CommTimeout
  // thrown.
  ncclComm_t split_comm(ncclComm_t from, int color, int key, const OpInfo& info,
                        const Deadline& deadline) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t child = nullptr;
    const ncclResult_t r = ncclCommSplit(from, color, key, &child, &config);
    if (r != ncclSuccess && r != ncclInProgress) raise_nccl(info, r);
    std::atomic_ref<ncclComm_t> made(child);  // written by NCCL's thread
    ncclResult_t error = ncclSuccess;
    Ready ready = poll_ready(from, deadline, &error);
    if (ready == Ready::kYes) {
      Backoff backoff;
      while (!made.load(std::memory_order_acquire) && !deadline.passed()) backoff.pause();
      ncclComm_t c = made.load(std::memory_order_acquire);
      ready = c ? poll_ready(c, deadline, &error) : Ready::kTimedOut;
      if (ready == Ready::kYes) return c;
    }
    const std::string msg = ready == Ready::kTimedOut ? timeout_text(info) : nccl_text(info, error);
    abort_all(msg);  // aborting `from` also stops (and joins) the split's job
    if (ncclComm_t c = made.load(std::memory_order_acquire)) (void)ncclCommAbort(c);
    if (ready == Ready::kTimedOut) throw CommTimeout(msg);
    throw CommError(msg);
  }

  const std::string name;
  const int rank;
  const int size;
  const int world_rank;  // the calling rank's
  const int device;
  const double timeout_s;
  std::vector<int> members;  // world ranks, by group rank
  Lane lanes[kLanes];
  cudaStream_t copy_stream = nullptr;  // staged results out of the scratch
  bool failed = false;
  std::string failure;
};

State::~State() {
  int previous = -1;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device &&
                        cudaSetDevice(device) == cudaSuccess;
  // Teardown never waits without limit, even when operations have none.
  const double limit_s = timeout_s > 0 ? timeout_s : 60;
  if (!failed) {
    // Operations still in flight (a PendingOp never waited for) must finish first.
    const Deadline deadline(limit_s);
    Backoff backoff;
    for (;;) {
      bool idle = true, broken = false;
      for (Lane& l : lanes) {
        if (!l.stream) continue;
        const cudaError_t e = cudaStreamQuery(l.stream);
        if (e == cudaErrorNotReady) idle = false;
        if (e != cudaSuccess && e != cudaErrorNotReady) broken = true;
        ncclResult_t state = ncclSuccess;
        if (l.comm && (ncclCommGetAsyncError(l.comm, &state) != ncclSuccess ||
                       (state != ncclSuccess && state != ncclInProgress)))
          broken = true;
        if (l.comm && state == ncclInProgress) idle = false;  // a send_async() still launching
      }
      if (idle && !broken) break;
      if (broken || deadline.passed()) {
        abort_all("destroyed while an operation was failing or still in flight");
        break;
      }
      backoff.pause();
    }
  }
  // ncclCommDestroy alone would finalize blocking (a barrier with the other ranks on this host);
  // ncclCommFinalize is non-blocking here and can be given up on.
  for (LaneId id : {kDown, kUp, kMain}) {
    Lane& l = lanes[id];
    if (!l.comm) continue;
    ncclResult_t error = ncclSuccess;
    const ncclResult_t r = failed ? ncclInternalError : ncclCommFinalize(l.comm);
    if ((r == ncclSuccess || r == ncclInProgress) &&
        poll_ready(l.comm, Deadline(limit_s), &error) == Ready::kYes) {
      (void)ncclCommDestroy(l.comm);
      l.comm = nullptr;
    } else {
      abort_all("destroyed before its members finalized it together");
    }
  }
  for (Lane& l : lanes) {
    if (l.stream) {
      if (l.scratch) (void)cudaFreeAsync(l.scratch, l.stream);
      if (l.header) (void)cudaFreeAsync(l.header, l.stream);
      (void)cudaStreamDestroy(l.stream);
    }
    if (l.done) (void)cudaEventDestroy(l.done);
  }
  if (copy_stream) (void)cudaStreamDestroy(copy_stream);
  if (switched) (void)cudaSetDevice(previous);
}

class Done : public PendingOp {
 public:
  void wait() override {}
  bool test() override { return true; }
};

class NcclPending : public PendingOp {
 public:
  NcclPending(std::shared_ptr<State> state, LaneId lane, std::shared_ptr<LaneEvent> event,
              OpInfo info)
      : s_(std::move(state)), lane_(lane), event_(std::move(event)), info_(std::move(info)) {}
  NcclPending(const NcclPending&) = delete;
  NcclPending& operator=(const NcclPending&) = delete;

  void wait() override {
    if (done_) return;
    DeviceScope scope(s_->device);
    s_->check_usable(info_);
    const Deadline deadline(s_->timeout_s);
    Lane& l = s_->lanes[lane_];
    if (!event_->recorded) s_->finish_launch(l, deadline);  // it is the lane's `launching`
    s_->wait_event(l, event_->event, info_, deadline);
    done_ = true;
  }
  bool test() override {
    if (done_) return true;
    DeviceScope scope(s_->device);
    s_->check_usable(info_);
    if (!event_->recorded && !s_->launch_done(s_->lanes[lane_])) return false;
    const cudaError_t e = cudaEventQuery(event_->event);
    if (e == cudaSuccess) {
      done_ = true;
      return true;
    }
    if (e != cudaErrorNotReady) s_->raise_cuda(info_, e);
    s_->check_async(s_->lanes[lane_], info_);
    return false;
  }

 private:
  std::shared_ptr<State> s_;
  LaneId lane_;
  std::shared_ptr<LaneEvent> event_;
  OpInfo info_;
  bool done_ = false;
};

// A buffer of an operation: device memory goes to NCCL as it is, host memory through the scratch.
struct Buffer {
  Buffer(const void* p, size_t n, bool reads, bool writes)
      : user(p), bytes(n), read(reads), written(writes) {}
  const void* user;
  size_t bytes;
  bool read;               // NCCL reads it: a staged copy goes in first
  bool written;            // NCCL writes it: a staged copy comes out after
  char* device = nullptr;  // what NCCL gets
  bool staged = false;
};

// One operation on one lane: places its buffers, issues its NCCL calls, then waits for it
// (blocking) or hands it over as a PendingOp.
class Op {
 public:
  Op(std::shared_ptr<State> state, LaneId lane, OpInfo info)
      : s_(std::move(state)),
        scope_(s_->device),
        lane_id_(lane),
        info_(std::move(info)),
        deadline_(s_->timeout_s) {
    s_->check_usable(info_);
    s_->finish_launch(s_->lanes[lane_id_], deadline_);  // a send_async() before it on the lane
  }

  State& state() { return *s_; }
  Lane& lane() { return s_->lanes[lane_id_]; }
  const OpInfo& info() const { return info_; }

  void place(std::initializer_list<Buffer*> buffers) {
    size_t total = 0;
    for (Buffer* b : buffers) {
      b->staged = b->bytes > 0 && s_->is_host(b->user, info_);
      if (b->staged)
        total += (b->bytes + 255) / 256 * 256;
      else
        b->device = const_cast<char*>(static_cast<const char*>(b->user));
    }
    if (total == 0) return;
    Lane& l = lane();
    s_->ensure_scratch(l, total);
    size_t at = 0;
    for (Buffer* b : buffers) {
      if (!b->staged) continue;
      b->device = l.scratch + at;
      at += (b->bytes + 255) / 256 * 256;
      // From pageable memory the copy is staged before the call returns; pinned memory is read
      // in stream order (the caller keeps it untouched until the operation completes).
      if (b->read)
        CUDA_CHECK(cudaMemcpyAsync(b->device, b->user, b->bytes, cudaMemcpyHostToDevice, l.stream));
      if (b->written) outs_.push_back(b);
    }
  }

  // `calls` makes the NCCL calls and returns their result; an ncclInProgress is polled out, or
  // (`may_defer`: a send_async()) left to the lane's next call (see LaneEvent).
  template <class Calls>
  void issue(Calls&& calls, bool may_defer = false) {
    const ncclResult_t r = calls();
    if (r == ncclSuccess) return;
    if (r != ncclInProgress) s_->raise_nccl(info_, r);
    if (may_defer) {
      launching_ = true;
      return;
    }
    s_->settle(lane(), info_, deadline_);
  }

  // A received message's header must say {tag, bytes}.
  void expect_header(int tag, size_t bytes) {
    check_header_ = true;
    want_tag_ = tag;
    want_bytes_ = bytes;
  }

  // Waits for the operation, then copies staged results out.
  void finish() {
    Lane& l = lane();
    if (launching_) s_->settle(l, info_, deadline_);
    launching_ = false;
    CUDA_CHECK(cudaEventRecord(l.done, l.stream));
    s_->wait_event(l, l.done, info_, deadline_);
    int64_t got[2] = {0, 0};
    for (Buffer* b : outs_)
      CUDA_CHECK(cudaMemcpyAsync(const_cast<void*>(b->user), b->device, b->bytes,
                                 cudaMemcpyDeviceToHost, s_->copy_stream));
    if (check_header_)
      CUDA_CHECK(
          cudaMemcpyAsync(got, l.header + 2, sizeof got, cudaMemcpyDeviceToHost, s_->copy_stream));
    if (!outs_.empty() || check_header_) CUDA_CHECK(cudaStreamSynchronize(s_->copy_stream));
    if (check_header_ && (got[0] != want_tag_ || got[1] != static_cast<int64_t>(want_bytes_))) {
      const std::string msg =
          s_->describe(info_) + " on world rank " + std::to_string(s_->world_rank) +
          ": the message that arrived has tag " + std::to_string(got[0]) + " and " +
          std::to_string(got[1]) + " bytes where tag " + std::to_string(want_tag_) + " and " +
          std::to_string(want_bytes_) +
          " bytes were expected (NCCL matches the messages between two ranks in the order they "
          "are posted: both ranks must post them in the same order)";
      s_->abort_all(msg);
      throw CommError(msg);
    }
  }

  // Hands the operation over as a PendingOp; one with results to copy into host memory completes
  // now instead (its copies need it finished).
  std::unique_ptr<PendingOp> start() {
    if (!outs_.empty() || check_header_) {
      finish();
      return std::make_unique<Done>();
    }
    Lane& l = lane();
    auto event = std::make_shared<LaneEvent>();
    event->info = info_;
    CUDA_CHECK(cudaEventCreateWithFlags(&event->event, cudaEventDisableTiming));
    if (launching_) {
      l.launching = event;  // recorded once NCCL's launch is done
    } else {
      CUDA_CHECK(cudaEventRecord(event->event, l.stream));
      event->recorded = true;
    }
    return std::make_unique<NcclPending>(s_, lane_id_, std::move(event), info_);
  }
  // start() when async, else finish() (and nothing to return).
  std::unique_ptr<PendingOp> end(bool async) {
    if (async) return start();
    finish();
    return nullptr;
  }

 private:
  std::shared_ptr<State> s_;
  DeviceScope scope_;
  LaneId lane_id_;
  OpInfo info_;
  Deadline deadline_;
  std::vector<Buffer*> outs_;
  bool launching_ = false;  // issued, NCCL still launching it (a send_async())
  bool check_header_ = false;
  int want_tag_ = 0;
  size_t want_bytes_ = 0;
};

class NcclCommunicator : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<State> state) : s_(std::move(state)) {}

  int rank() const override { return s_->rank; }
  int size() const override { return s_->size; }
  const std::string& name() const override { return s_->name; }
  const std::vector<int>& world_ranks() const override { return s_->members; }
  double timeout_s() const override { return s_->timeout_s; }

  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    all_reduce_op(data, count, dtype, op, false);
  }
  std::unique_ptr<PendingOp> all_reduce_async(void* data, size_t count, DType dtype,
                                              ReduceOp op) override {
    return all_reduce_op(data, count, dtype, op, true);
  }
  // The blocking form (async false) completes the operation and returns nothing.
  std::unique_ptr<PendingOp> all_reduce_op(void* data, size_t count, DType dtype, ReduceOp op,
                                           bool async) {
    Op o(s_, kMain, {"all_reduce", -1, count, dtype});
    if (count == 0) return done(async);
    Buffer b(data, count * dtype_bytes(dtype), true, true);
    o.place({&b});
    Lane& l = o.lane();
    o.issue([&] {
      return ncclAllReduce(b.device, b.device, count, nccl_type(dtype), nccl_op(op), l.comm,
                           l.stream);
    });
    return o.end(async);
  }

  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    Op o(s_, kMain, {"all_gather", -1, count, dtype});
    if (count == 0) return;
    const size_t block = count * dtype_bytes(dtype);
    const size_t mine_at = static_cast<size_t>(s_->rank) * block;
    const char* in = static_cast<const char*>(send);
    const char* out = static_cast<const char*>(recv);
    const bool in_place = in == out + mine_at;
    if (!in_place && in < out + block * static_cast<size_t>(s_->size) && in + block > out)
      throw CommError(s_->describe(o.info()) +
                      ": the send block overlaps recv but is not this rank's block of it");
    Buffer r(recv, block * static_cast<size_t>(s_->size), in_place, true);
    Buffer b(send, block, true, false);
    if (in_place)
      o.place({&r});
    else
      o.place({&b, &r});
    const char* from = in_place ? r.device + mine_at : b.device;
    Lane& l = o.lane();
    o.issue(
        [&] { return ncclAllGather(from, r.device, count, nccl_type(dtype), l.comm, l.stream); });
    o.finish();
  }

  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                      ReduceOp op) override {
    Op o(s_, kMain, {"reduce_scatter", -1, count, dtype});
    if (count == 0) return;
    const size_t block = count * dtype_bytes(dtype);
    Buffer b(send, block * static_cast<size_t>(s_->size), true, false);
    Buffer r(recv, block, false, true);
    o.place({&b, &r});
    Lane& l = o.lane();
    o.issue([&] {
      return ncclReduceScatter(b.device, r.device, count, nccl_type(dtype), nccl_op(op), l.comm,
                               l.stream);
    });
    o.finish();
  }

  void all_to_allv(const void* send, const std::vector<size_t>& send_counts, void* recv,
                   const std::vector<size_t>& recv_counts, DType dtype) override {
    all_to_allv_op(send, send_counts, recv, recv_counts, dtype, false);
  }
  std::unique_ptr<PendingOp> all_to_allv_async(const void* send,
                                               const std::vector<size_t>& send_counts, void* recv,
                                               const std::vector<size_t>& recv_counts,
                                               DType dtype) override {
    return all_to_allv_op(send, send_counts, recv, recv_counts, dtype, true);
  }
  std::unique_ptr<PendingOp> all_to_allv_op(const void* send,
                                            const std::vector<size_t>& send_counts, void* recv,
                                            const std::vector<size_t>& recv_counts, DType dtype,
                                            bool async) {
    const size_t n = static_cast<size_t>(s_->size), me = static_cast<size_t>(s_->rank);
    OpInfo info{"all_to_allv", -1, 0, dtype};
    if (send_counts.size() != n || recv_counts.size() != n)
      throw CommError(s_->describe(info) + ": " + std::to_string(send_counts.size()) +
                      " send and " + std::to_string(recv_counts.size()) + " receive counts for " +
                      std::to_string(n) + " ranks");
    if (recv_counts[me] != send_counts[me])
      throw CommError(s_->describe(info) + ": rank " + std::to_string(me) + " sends itself " +
                      std::to_string(send_counts[me]) + " but expects " +
                      std::to_string(recv_counts[me]));
    // Offsets: the prefix sums of the counts.
    std::vector<size_t> send_at(n), recv_at(n);
    size_t send_total = 0, recv_total = 0;
    for (size_t i = 0; i < n; ++i) {
      send_at[i] = send_total;
      recv_at[i] = recv_total;
      send_total += send_counts[i];
      recv_total += recv_counts[i];
    }
    info.count = send_total;
    Op o(s_, kMain, info);
    const size_t elem = dtype_bytes(dtype);
    Buffer b(send, send_total * elem, true, false);
    Buffer r(recv, recv_total * elem, false, true);
    o.place({&b, &r});
    Lane& l = o.lane();
    if (send_counts[me] > 0)  // this rank's own block: a copy, in stream order before the rest
      CUDA_CHECK(cudaMemcpyAsync(r.device + recv_at[me] * elem, b.device + send_at[me] * elem,
                                 send_counts[me] * elem, cudaMemcpyDeviceToDevice, l.stream));
    bool any = false;
    for (size_t i = 0; i < n; ++i) any = any || (i != me && (send_counts[i] || recv_counts[i]));
    if (any)
      o.issue([&] {
        const ncclResult_t start = ncclGroupStart();
        ncclResult_t first = start;
        const ncclDataType_t t = nccl_type(dtype);
        for (size_t i = 1; i < n && first == ncclSuccess; ++i) {
          const size_t to = (me + i) % n, from = (me + n - i) % n;
          if (send_counts[to] > 0)
            first = ncclSend(b.device + send_at[to] * elem, send_counts[to], t,
                             static_cast<int>(to), l.comm, l.stream);
          if (first == ncclSuccess && recv_counts[from] > 0)
            first = ncclRecv(r.device + recv_at[from] * elem, recv_counts[from], t,
                             static_cast<int>(from), l.comm, l.stream);
        }
        const ncclResult_t end = start == ncclSuccess ? ncclGroupEnd() : start;
        return first_failure({first, end});
      });
    return o.end(async);
  }

  void broadcast(void* data, size_t count, DType dtype, int root) override {
    Op o(s_, kMain, {"broadcast", -1, count, dtype});
    if (root < 0 || root >= s_->size)
      throw CommError(s_->describe(o.info()) + ": root " + std::to_string(root) +
                      " is not a rank of the group's " + std::to_string(s_->size));
    if (count == 0) return;
    Buffer b(data, count * dtype_bytes(dtype), true, true);
    o.place({&b});
    Lane& l = o.lane();
    o.issue([&] {
      return ncclBroadcast(b.device, b.device, count, nccl_type(dtype), root, l.comm, l.stream);
    });
    o.finish();
  }

  void send(const void* data, size_t count, DType dtype, int peer, int tag) override {
    send_op(data, count, dtype, peer, tag, false);
  }
  std::unique_ptr<PendingOp> send_async(const void* data, size_t count, DType dtype, int peer,
                                        int tag) override {
    return send_op(data, count, dtype, peer, tag, true);
  }
  std::unique_ptr<PendingOp> send_op(const void* data, size_t count, DType dtype, int peer, int tag,
                                     bool async) {
    const OpInfo info{"send to", peer, count, dtype};
    check_peer(info, peer, tag);
    // Messages from a lower to a higher rank go up, the others down.
    Op o(s_, s_->rank < peer ? kUp : kDown, info);
    if (count == 0) return done(async);
    const size_t bytes = count * dtype_bytes(dtype);
    Buffer b(data, bytes, true, false);
    o.place({&b});
    Lane& l = o.lane();
    // The header's slot is rewritten only by the next send on this lane: after this one in order.
    const int64_t header[2] = {tag, static_cast<int64_t>(bytes)};
    CUDA_CHECK(cudaMemcpyAsync(l.header, header, sizeof header, cudaMemcpyHostToDevice, l.stream));
    o.issue(
        [&] {
          const ncclResult_t start = ncclGroupStart();
          if (start != ncclSuccess) return start;
          const ncclResult_t h = ncclSend(l.header, 2, ncclInt64, peer, l.comm, l.stream);
          const ncclResult_t d =
              h == ncclSuccess ? ncclSend(b.device, count, nccl_type(dtype), peer, l.comm, l.stream)
                               : h;
          return first_failure({h, d, ncclGroupEnd()});
        },
        async);
    return o.end(async);
  }

  void recv(void* data, size_t count, DType dtype, int peer, int tag) override {
    const OpInfo info{"recv from", peer, count, dtype};
    check_peer(info, peer, tag);
    Op o(s_, peer < s_->rank ? kUp : kDown, info);
    if (count == 0) return;
    const size_t bytes = count * dtype_bytes(dtype);
    Buffer b(data, bytes, false, true);
    o.place({&b});
    Lane& l = o.lane();
    o.issue([&] {
      const ncclResult_t start = ncclGroupStart();
      if (start != ncclSuccess) return start;
      const ncclResult_t h = ncclRecv(l.header + 2, 2, ncclInt64, peer, l.comm, l.stream);
      const ncclResult_t d =
          h == ncclSuccess ? ncclRecv(b.device, count, nccl_type(dtype), peer, l.comm, l.stream)
                           : h;
      return first_failure({h, d, ncclGroupEnd()});
    });
    o.expect_header(tag, bytes);
    o.finish();
  }

  void barrier() override {
    int32_t one = 1;
    Op o(s_, kMain, {"barrier", -1, 0, DType::kInt32});
    Buffer b(&one, sizeof one, true, true);
    o.place({&b});
    Lane& l = o.lane();
    o.issue(
        [&] { return ncclAllReduce(b.device, b.device, 1, ncclInt32, ncclSum, l.comm, l.stream); });
    o.finish();
  }

  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    const OpInfo info{"split into \"" + name + "\""};
    DeviceScope scope(s_->device);
    s_->check_usable(info);
    if (color < 0)
      throw CommError(s_->describe(info) + ": color " + std::to_string(color) +
                      " is negative (every member joins a group)");
    const Deadline deadline(s_->timeout_s);
    ncclComm_t main = s_->split_comm(s_->lanes[kMain].comm, color, key, info, deadline);
    int rank = 0, size = 0;
    ncclResult_t r = ncclCommUserRank(main, &rank);
    if (r == ncclSuccess) r = ncclCommCount(main, &size);
    if (r != ncclSuccess) {
      (void)ncclCommAbort(main);
      s_->raise_nccl(info, r);
    }
    auto child =
        std::make_shared<State>(name, rank, size, s_->world_rank, s_->device, s_->timeout_s);
    try {
      child->open(kMain, main);
      open_point_to_point(*child, deadline);
      // The members' world ranks, gathered over the new group.
      std::vector<int32_t> ranks(static_cast<size_t>(size));
      const int32_t me = s_->world_rank;
      NcclCommunicator(child).all_gather(&me, ranks.data(), 1, DType::kInt32);
      child->members.assign(ranks.begin(), ranks.end());
    } catch (const CommError& e) {
      s_->abort_all(e.what());  // the members disagree on the groups: this one is done too
      throw;
    }
    return std::make_unique<NcclCommunicator>(child);
  }

  // Splits the group's main lane into its up and down lanes (groups of two or more).
  static void open_point_to_point(State& s, const Deadline& deadline) {
    if (s.size < 2) return;
    const OpInfo info{"opening the point-to-point lanes"};
    s.open(kUp, s.split_comm(s.lanes[kMain].comm, 0, s.rank, info, deadline));
    s.open(kDown, s.split_comm(s.lanes[kMain].comm, 0, s.rank, info, deadline));
  }

 private:
  static std::unique_ptr<PendingOp> done(bool async) {
    return async ? std::make_unique<Done>() : nullptr;
  }
  void check_peer(const OpInfo& info, int peer, int tag) const {
    if (tag < 0 || tag > 32767)  // the MPI backend's range
      throw CommError(s_->describe(info) + ": tag " + std::to_string(tag) + " outside [0, 32767]");
    if (peer < 0 || peer >= s_->size)
      throw CommError(s_->describe(info) + ": rank " + std::to_string(peer) +
                      " is not in the group of " + std::to_string(s_->size));
    if (peer == s_->rank)
      throw CommError(s_->describe(info) +
                      ": a rank cannot send to itself over NCCL (the send and the receive would "
                      "wait on each other)");
  }

  std::shared_ptr<State> s_;
};

}  // namespace

std::unique_ptr<Communicator> nccl_world(Communicator& bootstrap, int cuda_device,
                                         double timeout_s) {
  // Sharing resources among split communicators puts every lane of every group on one internal
  // stream: the point-to-point lanes could no longer pass the collectives, and a pipeline's posted
  // sends could wait out the timeout.
  if (const char* share = std::getenv("NCCL_COMM_SPLIT_SHARE_RESOURCES");
      share && std::string(share) != "0")
    throw CommError("nccl_world: NCCL_COMM_SPLIT_SHARE_RESOURCES=" + std::string(share) +
                    " makes every group share one NCCL stream, which can deadlock a pipeline's "
                    "sends; unset it");
  const int n = bootstrap.size(), r = bootstrap.rank();
  const std::vector<int>& members = bootstrap.world_ranks();
  const int world_rank =
      static_cast<size_t>(r) < members.size() ? members[static_cast<size_t>(r)] : r;
  DeviceScope scope(cuda_device);
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  if (r == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  bootstrap.broadcast(&id, sizeof id, DType::kByte, 0);

  auto state = std::make_shared<State>("world", r, n, world_rank, cuda_device, timeout_s);
  state->members = members;
  const OpInfo info{"creating the NCCL communicator"};
  const Deadline deadline(timeout_s);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every NCCL call returns; its progress is polled under the deadline
  ncclComm_t comm = nullptr;
  const ncclResult_t res = ncclCommInitRankConfig(&comm, n, id, r, &config);
  if (res != ncclSuccess && res != ncclInProgress) {
    if (comm) (void)ncclCommAbort(comm);
    state->raise_nccl(info, res);
  }
  state->open(kMain, comm);
  state->settle(state->lanes[kMain], info, deadline);
  NcclCommunicator::open_point_to_point(*state, deadline);
  return std::make_unique<NcclCommunicator>(std::move(state));
}

}  // namespace switchyard
