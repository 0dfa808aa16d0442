#include "executor/cpu/mpi_communicator.h"

#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
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
void wait_all(MPI_Request* requests, int n, double timeout_s, const std::string& what) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  for (int spins = 0;; ++spins) {
    int done = 0;
    MPI_CHECK(MPI_Testall(n, requests, &done, MPI_STATUSES_IGNORE));
    if (done) return;
    if (timeout_s > 0 && std::chrono::duration<double>(Clock::now() - start).count() > timeout_s) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", timeout_s);
      throw CommTimeout(what + " did not complete within " + secs + " s on world rank " +
                        std::to_string(world_rank()) +
                        ": a member died, is stuck, or called another operation");
    }
    // Spin briefly for latency, then sleep so oversubscribed ranks get the core.
    if (spins > 64) std::this_thread::sleep_for(std::chrono::microseconds(spins > 1024 ? 200 : 20));
  }
}

class MpiPending : public PendingOp {
 public:
  MpiPending(double timeout_s, std::string what) : timeout_s_(timeout_s), what_(std::move(what)) {}
  void wait() override {
    if (done_) return;
    wait_all(&request_, 1, timeout_s_, what_);
    done_ = true;
  }
  bool test() override {
    if (done_) return true;
    int flag = 0;
    MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    done_ = flag != 0;
    return done_;
  }
  MPI_Request request_ = MPI_REQUEST_NULL;
  // Ialltoallv reads its count and displacement arrays until it completes.
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;

 private:
  double timeout_s_;
  std::string what_;
  bool done_ = false;
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
    MPI_CHECK(MPI_Allgather(&me, 1, MPI_INT, world_ranks_.data(), 1, MPI_INT, comm_));
  }
  ~MpiCommunicator() override { MPI_Comm_free(&comm_); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return world_ranks_; }
  double timeout_s() const override { return timeout_s_; }

  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    all_reduce_async(data, count, dtype, op)->wait();
  }
  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    MpiPending p(timeout_s_, describe("all_gather", count, dtype));
    const int n = as_int(count, "all_gather");
    MPI_CHECK(MPI_Iallgather(send == recv ? MPI_IN_PLACE : send, n, mpi_type(dtype), recv, n,
                             mpi_type(dtype), comm_, &p.request_));
    p.wait();
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                      ReduceOp op) override {
    MpiPending p(timeout_s_, describe("reduce_scatter", count, dtype));
    MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, as_int(count, "reduce_scatter"),
                                        mpi_type(dtype), mpi_op(op), comm_, &p.request_));
    p.wait();
  }
  void all_to_allv(const void* send, const std::vector<size_t>& send_counts, void* recv,
                   const std::vector<size_t>& recv_counts, DType dtype) override {
    all_to_allv_async(send, send_counts, recv, recv_counts, dtype)->wait();
  }
  void broadcast(void* data, size_t count, DType dtype, int root) override {
    MpiPending p(timeout_s_, describe("broadcast", count, dtype));
    MPI_CHECK(
        MPI_Ibcast(data, as_int(count, "broadcast"), mpi_type(dtype), root, comm_, &p.request_));
    p.wait();
  }
  void send(const void* data, size_t count, DType dtype, int peer, int tag) override {
    MpiPending p(timeout_s_, describe("send to rank " + std::to_string(peer), count, dtype));
    MPI_CHECK(
        MPI_Isend(data, as_int(count, "send"), mpi_type(dtype), peer, tag, comm_, &p.request_));
    p.wait();
  }
  void recv(void* data, size_t count, DType dtype, int peer, int tag) override {
    MpiPending p(timeout_s_, describe("recv from rank " + std::to_string(peer), count, dtype));
    MPI_CHECK(
        MPI_Irecv(data, as_int(count, "recv"), mpi_type(dtype), peer, tag, comm_, &p.request_));
    p.wait();
  }
  void barrier() override {
    MpiPending p(timeout_s_, "barrier on group \"" + name_ + "\"" + members());
    MPI_CHECK(MPI_Ibarrier(comm_, &p.request_));
    p.wait();
  }

  std::unique_ptr<PendingOp> all_reduce_async(void* data, size_t count, DType dtype,
                                              ReduceOp op) override {
    auto p = std::make_unique<MpiPending>(timeout_s_, describe("all_reduce", count, dtype));
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, as_int(count, "all_reduce"), mpi_type(dtype),
                             mpi_op(op), comm_, &p->request_));
    return p;
  }
  std::unique_ptr<PendingOp> all_to_allv_async(const void* send,
                                               const std::vector<size_t>& send_counts, void* recv,
                                               const std::vector<size_t>& recv_counts,
                                               DType dtype) override {
    if (send_counts.size() != static_cast<size_t>(size_) ||
        recv_counts.size() != static_cast<size_t>(size_))
      throw CommError("all_to_allv on group \"" + name_ +
                      "\": " + std::to_string(send_counts.size()) + " send and " +
                      std::to_string(recv_counts.size()) + " receive counts for " +
                      std::to_string(size_) + " ranks");
    size_t total = 0;
    for (size_t c : send_counts) total += c;
    auto p = std::make_unique<MpiPending>(timeout_s_, describe("all_to_allv", total, dtype));
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
    MPI_CHECK(MPI_Ialltoallv(send, p->send_counts.data(), p->send_displs.data(), mpi_type(dtype),
                             recv, p->recv_counts.data(), p->recv_displs.data(), mpi_type(dtype),
                             comm_, &p->request_));
    return p;
  }

  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    MPI_Comm out = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split(comm_, color, key, &out));
    return std::make_unique<MpiCommunicator>(out, name, timeout_s_);
  }

 private:
  std::string members() const {
    std::string s = " (world ranks ";
    for (size_t i = 0; i < world_ranks_.size(); ++i)
      s += (i ? "," : "") + std::to_string(world_ranks_[i]);
    return s + ")";
  }
  std::string describe(const std::string& op, size_t count, DType dtype) const {
    return op + " of " + std::to_string(count) + " " + dtype_name(dtype) + " on group \"" + name_ +
           "\"" + members();
  }

  MPI_Comm comm_;
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
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return std::make_unique<MpiCommunicator>(dup, "world", timeout_s);
}

void MpiRuntime::abort(int code, const std::string& message) const {
  std::fprintf(stderr, "error (rank %d of %d): %s\n", rank_, size_, message.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return
}

}  // namespace switchyard
