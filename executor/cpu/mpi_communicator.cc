#include "executor/cpu/mpi_communicator.h"

#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>

namespace switchyard {
namespace {

std::string mpi_error_string(int rc) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return std::string(msg, static_cast<size_t>(len));
}

#define MPI_CHECK(call)                                                             \
  do {                                                                              \
    const int mpi_rc_ = (call);                                                     \
    if (mpi_rc_ != MPI_SUCCESS)                                                     \
      throw CommError(std::string(#call) + " failed at " + __FILE__ + ":" +         \
                      std::to_string(__LINE__) + ": " + mpi_error_string(mpi_rc_)); \
  } while (0)

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::kFloat32:
      return MPI_FLOAT;
    case DType::kFloat64:
      return MPI_DOUBLE;
    case DType::kInt32:
      return MPI_INT32_T;
    case DType::kInt64:
      return MPI_INT64_T;
    case DType::kByte:
      return MPI_BYTE;
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

int as_int(size_t n, const char* what) {
  if (n > static_cast<size_t>(std::numeric_limits<int>::max()))
    throw CommError(std::string(what) + ": " + std::to_string(n) +
                    " elements exceed MPI's int counts");
  return static_cast<int>(n);
}

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// Completes `n` requests or throws CommTimeout after `timeout_s` (<= 0: no deadline).
// What an operation is, for a timeout's message (built only then: small operations are latency
// bound and must not pay for string formatting).
struct OpInfo {
  const char* op = "";
  int peer = -1;  // send/recv
  size_t count = 0;
  DType dtype = DType::kByte;
  const std::string* group = nullptr;
  const std::vector<int>* members = nullptr;

  std::string describe() const {
    std::string s = op;
    if (peer >= 0) s += std::string(" rank ") + std::to_string(peer);
    if (count > 0) s += " of " + std::to_string(count) + " " + dtype_name(dtype);
    s += " on group \"" + *group + "\" (world ranks ";
    for (size_t i = 0; i < members->size(); ++i)
      s += (i ? "," : "") + std::to_string((*members)[i]);
    return s + ")";
  }
};

// Completes `n` requests (their statuses into `statuses` when given) or throws CommTimeout.
void wait_all(MPI_Request* requests, int n, double timeout_s, const OpInfo& info,
              MPI_Status* statuses = nullptr) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  for (int spins = 0;; ++spins) {
    int done = 0;
    MPI_CHECK(MPI_Testall(n, requests, &done, statuses ? statuses : MPI_STATUSES_IGNORE));
    if (done) return;
    if (timeout_s > 0 && std::chrono::duration<double>(Clock::now() - start).count() > timeout_s) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", timeout_s);
      throw CommTimeout(info.describe() + " did not complete within " + secs + " s on world rank " +
                        std::to_string(world_rank()) +
                        ": a member died, is stuck, or called another operation");
    }
    // MPI progresses a non-blocking collective only inside MPI calls: test continuously, yield
    // the core to other ranks (oversubscribed runs), and only sleep once the wait is long.
    if (spins > 256) {
      if (std::chrono::duration<double>(Clock::now() - start).count() > 0.5)
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      else
        std::this_thread::yield();
    }
  }
}

class MpiPending : public PendingOp {
 public:
  MpiPending(double timeout_s, OpInfo info) : timeout_s_(timeout_s), info_(info) {}
  void set_count(size_t count) { info_.count = count; }
  void wait() override {
    if (done_) return;
    if (requests_.empty()) {
      wait_all(&request_, 1, timeout_s_, info_);
    } else {
      statuses_.resize(requests_.size());
      wait_all(requests_.data(), static_cast<int>(requests_.size()), timeout_s_, info_,
               statuses_.data());
      check_received();
    }
    done_ = true;
  }
  bool test() override {
    if (done_) return true;
    int flag = 0;
    if (requests_.empty()) {
      MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    } else {
      statuses_.resize(requests_.size());
      MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag,
                            statuses_.data()));
      if (flag) check_received();
    }
    done_ = flag != 0;
    return done_;
  }
  // The point-to-point all-to-all's receives (the first requests): what each source must send.
  std::vector<std::pair<int, int>> expected_;  // (source rank, elements)
  MPI_Datatype type_ = MPI_BYTE;
  MPI_Request request_ = MPI_REQUEST_NULL;  // one operation
  std::vector<MPI_Request> requests_;       // or several (the point-to-point all-to-all)
  // Ialltoallv reads its count and displacement arrays until it completes.
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;

 private:
  // A peer that sent another count than this rank expects called all_to_allv inconsistently.
  void check_received() {
    for (size_t i = 0; i < expected_.size(); ++i) {
      int got = 0;
      MPI_Get_count(&statuses_[i], type_, &got);
      if (got != expected_[i].second)
        throw CommError(info_.describe() + ": rank " + std::to_string(expected_[i].first) +
                        " sent " + std::to_string(got) + " elements where " +
                        std::to_string(expected_[i].second) +
                        " were expected (the ranks disagree on the counts)");
    }
  }
  double timeout_s_;
  OpInfo info_;
  bool done_ = false;
  std::vector<MPI_Status> statuses_;
};

class MpiCommunicator : public Communicator {
 public:
  // Takes ownership of `comm`.
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_s)
      : comm_(comm), name_(std::move(name)), timeout_s_(timeout_s) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    world_ranks_.resize(static_cast<size_t>(size_));
    int me = world_rank();
    MPI_Request req = MPI_REQUEST_NULL;
    MPI_CHECK(MPI_Iallgather(&me, 1, MPI_INT, world_ranks_.data(), 1, MPI_INT, comm_, &req));
    wait_all(&req, 1, timeout_s_,
             {"creating the group", -1, 0, DType::kByte, &name_, &world_ranks_});
    // The point-to-point all-to-all runs on a private duplicate: its messages can never match a
    // user's send/recv, whatever the tags.
    MPI_CHECK(MPI_Comm_idup(comm_, &a2a_comm_, &req));
    wait_all(&req, 1, timeout_s_, info("creating the group", 0, DType::kByte));
    MPI_Comm_set_errhandler(a2a_comm_, MPI_ERRORS_RETURN);
  }
  ~MpiCommunicator() override {
    MPI_Comm_free(&a2a_comm_);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return world_ranks_; }
  double timeout_s() const override { return timeout_s_; }

  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    all_reduce_async(data, count, dtype, op)->wait();
  }
  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    MpiPending p(timeout_s_, info("all_gather", count, dtype));
    const int n = as_int(count, "all_gather");
    // In place when this rank's block already sits at its offset of recv.
    const size_t block = count * dtype_bytes(dtype);
    const char* mine = static_cast<const char*>(recv) + static_cast<size_t>(rank_) * block;
    const char* in = static_cast<const char*>(send);
    if (in != mine && in < static_cast<const char*>(recv) + block * size_ &&
        in + block > static_cast<const char*>(recv))
      throw CommError("all_gather on group \"" + name_ +
                      "\": the send block overlaps recv but is not this rank's block of it");
    MPI_CHECK(MPI_Iallgather(in == mine ? MPI_IN_PLACE : send, n, mpi_type(dtype), recv, n,
                             mpi_type(dtype), comm_, &p.request_));
    p.wait();
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                      ReduceOp op) override {
    MpiPending p(timeout_s_, info("reduce_scatter", count, dtype));
    MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, as_int(count, "reduce_scatter"),
                                        mpi_type(dtype), mpi_op(op), comm_, &p.request_));
    p.wait();
  }
  void all_to_allv(const void* send, const std::vector<size_t>& send_counts, void* recv,
                   const std::vector<size_t>& recv_counts, DType dtype) override {
    MpiPending p(timeout_s_, info("all_to_allv", 0, dtype));
    start_all_to_allv(p, send, send_counts, recv, recv_counts, dtype);
    p.wait();
  }
  void broadcast(void* data, size_t count, DType dtype, int root) override {
    MpiPending p(timeout_s_, info("broadcast", count, dtype));
    MPI_CHECK(
        MPI_Ibcast(data, as_int(count, "broadcast"), mpi_type(dtype), root, comm_, &p.request_));
    p.wait();
  }
  void send(const void* data, size_t count, DType dtype, int peer, int tag) override {
    check_tag(tag);
    MpiPending p(timeout_s_, info("send to", count, dtype, peer));
    MPI_CHECK(
        MPI_Isend(data, as_int(count, "send"), mpi_type(dtype), peer, tag, comm_, &p.request_));
    p.wait();
  }
  void recv(void* data, size_t count, DType dtype, int peer, int tag) override {
    check_tag(tag);
    MpiPending p(timeout_s_, info("recv from", count, dtype, peer));
    MPI_CHECK(
        MPI_Irecv(data, as_int(count, "recv"), mpi_type(dtype), peer, tag, comm_, &p.request_));
    p.wait();
  }
  void barrier() override {
    MpiPending p(timeout_s_, info("barrier", 0, DType::kByte));
    MPI_CHECK(MPI_Ibarrier(comm_, &p.request_));
    p.wait();
  }

  std::unique_ptr<PendingOp> send_async(const void* data, size_t count, DType dtype, int peer,
                                        int tag) override {
    check_tag(tag);
    auto p = std::make_unique<MpiPending>(timeout_s_, info("send to", count, dtype, peer));
    MPI_CHECK(
        MPI_Isend(data, as_int(count, "send"), mpi_type(dtype), peer, tag, comm_, &p->request_));
    return p;
  }
  std::unique_ptr<PendingOp> all_reduce_async(void* data, size_t count, DType dtype,
                                              ReduceOp op) override {
    auto p = std::make_unique<MpiPending>(timeout_s_, info("all_reduce", count, dtype));
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, as_int(count, "all_reduce"), mpi_type(dtype),
                             mpi_op(op), comm_, &p->request_));
    return p;
  }
  std::unique_ptr<PendingOp> all_to_allv_async(const void* send,
                                               const std::vector<size_t>& send_counts, void* recv,
                                               const std::vector<size_t>& recv_counts,
                                               DType dtype) override {
    auto p = std::make_unique<MpiPending>(timeout_s_, info("all_to_allv", 0, dtype));
    start_all_to_allv(*p, send, send_counts, recv, recv_counts, dtype);
    return p;
  }

  // Posts every transfer of an all_to_allv into `pending`.
  void start_all_to_allv(MpiPending& pending, const void* send,
                         const std::vector<size_t>& send_counts, void* recv,
                         const std::vector<size_t>& recv_counts, DType dtype) {
    MpiPending* p = &pending;
    if (send_counts.size() != static_cast<size_t>(size_) ||
        recv_counts.size() != static_cast<size_t>(size_))
      throw CommError("all_to_allv on group \"" + name_ +
                      "\": " + std::to_string(send_counts.size()) + " send and " +
                      std::to_string(recv_counts.size()) + " receive counts for " +
                      std::to_string(size_) + " ranks");
    if (recv_counts[rank_] != send_counts[rank_])
      throw CommError("all_to_allv on group \"" + name_ + "\": rank " + std::to_string(rank_) +
                      " sends itself " + std::to_string(send_counts[rank_]) + " but expects " +
                      std::to_string(recv_counts[rank_]));
    size_t total = 0;
    for (size_t c : send_counts) total += c;
    p->set_count(total);
    auto fill = [](const std::vector<size_t>& counts, std::vector<int>& c, std::vector<int>& d) {
      c.resize(counts.size());
      d.resize(counts.size());
      size_t at = 0;
      for (size_t i = 0; i < counts.size(); ++i) {
        c[i] = as_int(counts[i], "all_to_allv");
        d[i] = as_int(at, "all_to_allv");
        at += counts[i];
      }
    };
    fill(send_counts, p->send_counts, p->send_displs);
    fill(recv_counts, p->recv_counts, p->recv_displs);
    // Point-to-point, all posted at once (the linear all-to-all): at small and medium sizes MPI's
    // non-blocking collective (libnbc) is markedly slower than this, at large sizes equal.
    const MPI_Datatype t = mpi_type(dtype);
    p->type_ = t;
    const size_t elem = dtype_bytes(dtype);
    std::vector<MPI_Request>& reqs = p->requests_;
    reqs.reserve(2 * static_cast<size_t>(size_));
    for (int i = 1; i < size_; ++i) {
      const int peer = (rank_ + size_ - i) % size_;  // receive from the left, send to the right
      if (p->recv_counts[peer] == 0) continue;
      reqs.emplace_back();
      MPI_CHECK(MPI_Irecv(static_cast<char*>(recv) + p->recv_displs[peer] * elem,
                          p->recv_counts[peer], t, peer, 0, a2a_comm_, &reqs.back()));
      p->expected_.emplace_back(peer, p->recv_counts[peer]);
    }
    for (int i = 1; i < size_; ++i) {
      const int peer = (rank_ + i) % size_;
      if (p->send_counts[peer] == 0) continue;
      reqs.emplace_back();
      MPI_CHECK(MPI_Isend(static_cast<const char*>(send) + p->send_displs[peer] * elem,
                          p->send_counts[peer], t, peer, 0, a2a_comm_, &reqs.back()));
    }
    std::memcpy(static_cast<char*>(recv) + p->recv_displs[rank_] * elem,
                static_cast<const char*>(send) + p->send_displs[rank_] * elem,
                send_counts[rank_] * elem);
  }

  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    // MPI_Comm_split blocks without a deadline: meet at a barrier that has one first.
    barrier();
    MPI_Comm out = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split(comm_, color, key, &out));
    return std::make_unique<MpiCommunicator>(out, name, timeout_s_);
  }

 private:
  static void check_tag(int tag) {
    if (tag < 0 || tag > 32767)  // the upper bound every MPI guarantees (MPI_TAG_UB >= 32767)
      throw CommError("send/recv tag " + std::to_string(tag) + " outside [0, 32767]");
  }
  OpInfo info(const char* op, size_t count, DType dtype, int peer = -1) const {
    return {op, peer, count, dtype, &name_, &world_ranks_};
  }

  MPI_Comm comm_;
  MPI_Comm a2a_comm_ = MPI_COMM_NULL;
  std::string name_;
  double timeout_s_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<int> world_ranks_;
};

}  // namespace

std::unique_ptr<MpiRuntime> MpiRuntime::start(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) throw CommError("MPI is already initialised in this process");
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided));
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    throw CommError("the MPI library does not provide MPI_THREAD_SERIALIZED");
  }
  std::unique_ptr<MpiRuntime> r(new MpiRuntime());
  MPI_Comm_rank(MPI_COMM_WORLD, &r->rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &r->size_);
  return r;
}

MpiRuntime::~MpiRuntime() { MPI_Finalize(); }

std::unique_ptr<Communicator> MpiRuntime::world(double timeout_s) const {
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &dup, &req));
  static const std::string kWorld = "world";
  static const std::vector<int> kNone;
  wait_all(&req, 1, timeout_s, {"creating the world group", -1, 0, DType::kByte, &kWorld, &kNone});
  return std::make_unique<MpiCommunicator>(dup, "world", timeout_s);
}

void MpiRuntime::abort(int code, const std::string& message) const {
  std::fprintf(stderr, "error (rank %d of %d): %s\n", rank_, size_, message.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return
}

}  // namespace switchyard
