#include "tools/mpi_tune.h"

#ifdef SWITCHYARD_HAVE_MPI
#include <mpi.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace switchyard::cli {

#ifdef SWITCHYARD_HAVE_MPI
namespace {

constexpr int kTagUnit = 1;
constexpr int kTagDone = 2;

#define MPI_CHECK(call)                                                               \
  do {                                                                                \
    const int mpi_rc_ = (call);                                                       \
    if (mpi_rc_ != MPI_SUCCESS) {                                                     \
      char mpi_msg_[MPI_MAX_ERROR_STRING];                                            \
      int mpi_len_ = 0;                                                               \
      MPI_Error_string(mpi_rc_, mpi_msg_, &mpi_len_);                                 \
      throw std::runtime_error(std::string(#call) + " failed at " + __FILE__ + ":" +  \
                               std::to_string(__LINE__) + ": " +                      \
                               std::string(mpi_msg_, static_cast<size_t>(mpi_len_))); \
    }                                                                                 \
  } while (0)

void send_unit(const UnitResult& u) {
  const std::string bytes = encode_unit(u);
  MPI_CHECK(MPI_Send(bytes.data(), static_cast<int>(bytes.size()), MPI_BYTE, 0, kTagUnit,
                     MPI_COMM_WORLD));
}

// Receives one message from any worker; returns false for a "done" message.
bool receive(const std::function<void(UnitResult&&)>& sink) {
  MPI_Status status;
  MPI_CHECK(MPI_Probe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &status));
  int count = 0;
  MPI_CHECK(MPI_Get_count(&status, MPI_BYTE, &count));
  std::string bytes(static_cast<size_t>(count), '\0');
  MPI_CHECK(MPI_Recv(bytes.data(), count, MPI_BYTE, status.MPI_SOURCE, status.MPI_TAG,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE));
  if (status.MPI_TAG == kTagDone) return false;
  sink(decode_unit(bytes));
  return true;
}

// The units of `units` that rank `rank` of `size` sweeps.
std::vector<int64_t> slice(const std::vector<int64_t>& units, int rank, int size) {
  std::vector<int64_t> out;
  for (size_t i = static_cast<size_t>(rank); i < units.size(); i += static_cast<size_t>(size))
    out.push_back(units[i]);
  return out;
}

}  // namespace

std::unique_ptr<MpiTune> MpiTune::start_if_launched(int* argc, char*** argv) {
  if (!launched_by_mpirun()) return nullptr;
  int provided = 0;
  // Worker threads make the MPI calls, one at a time (run_sweep serialises its callbacks).
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided));
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    throw std::runtime_error("the MPI library does not support MPI_THREAD_SERIALIZED");
  }
  std::unique_ptr<MpiTune> m(new MpiTune());
  MPI_Comm_rank(MPI_COMM_WORLD, &m->rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &m->size_);
  return m;
}

MpiTune::~MpiTune() { MPI_Finalize(); }

int MpiTune::default_threads() const {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int local = size_;
  if (const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local = std::max(1, std::atoi(v));
  return std::max(1, cores / local);
}

bool MpiTune::all_ok(bool ok) {
  int mine = ok ? 1 : 0, all = 0;
  MPI_CHECK(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  return all == 1;
}

void MpiTune::barrier() { MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD)); }

std::string MpiTune::share(std::string text) {
  int64_t n = static_cast<int64_t>(text.size());
  MPI_CHECK(MPI_Bcast(&n, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
  text.resize(static_cast<size_t>(n));
  if (n > 0) MPI_CHECK(MPI_Bcast(text.data(), static_cast<int>(n), MPI_CHAR, 0, MPI_COMM_WORLD));
  return text;
}

void MpiTune::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; the compiler does not know
}

void MpiTune::cancel() {
  if (started_) return;
  started_ = true;
  int64_t n = -1;
  MPI_Bcast(&n, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
}

SweepFn MpiTune::coordinator_sweep(const SearchSpace& space, int threads) {
  return [this, &space, threads](const std::vector<int64_t>& missing,
                                 const std::function<void(UnitResult &&)>& sink) {
    started_ = true;
    int64_t n = static_cast<int64_t>(missing.size());
    MPI_CHECK(MPI_Bcast(&n, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
    std::vector<int64_t> units = missing;
    if (n > 0)
      MPI_CHECK(MPI_Bcast(units.data(), static_cast<int>(n), MPI_INT64_T, 0, MPI_COMM_WORLD));
    int remaining = size_ - 1;  // workers that have not said "done"
    // Rank 0 sweeps its own slice and takes in what has arrived between its units.
    run_sweep(space, slice(units, 0, size_), threads, [&](UnitResult&& u) {
      sink(std::move(u));
      while (remaining > 0) {
        int flag = 0;
        MPI_CHECK(
            MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE));
        if (!flag) break;
        if (!receive(sink)) --remaining;
      }
    });
    while (remaining > 0)
      if (!receive(sink)) --remaining;
  };
}

bool MpiTune::work(const SearchSpace& space, int threads) {
  int64_t n = 0;
  MPI_CHECK(MPI_Bcast(&n, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
  if (n < 0) return false;
  std::vector<int64_t> units(static_cast<size_t>(n));
  if (n > 0)
    MPI_CHECK(MPI_Bcast(units.data(), static_cast<int>(n), MPI_INT64_T, 0, MPI_COMM_WORLD));
  try {
    run_sweep(space, slice(units, rank_, size_), threads, [](UnitResult&& u) { send_unit(u); });
    MPI_CHECK(MPI_Send(nullptr, 0, MPI_BYTE, 0, kTagDone, MPI_COMM_WORLD));
  } catch (const std::exception& e) {
    // Rank 0 waits for this rank's units: end the whole job, naming the rank.
    std::fprintf(stderr, "error (rank %d): %s\n", rank_, e.what());
    std::fflush(stderr);
    abort(1);
  }
  return true;
}

#else  // built without MPI: never launched as a distributed search

std::unique_ptr<MpiTune> MpiTune::start_if_launched(int*, char***) { return nullptr; }
MpiTune::~MpiTune() = default;
int MpiTune::default_threads() const { return 0; }
std::string MpiTune::share(std::string text) { return text; }
void MpiTune::abort(int code) { std::_Exit(code); }
bool MpiTune::all_ok(bool ok) { return ok; }
void MpiTune::barrier() {}
void MpiTune::cancel() {}
SweepFn MpiTune::coordinator_sweep(const SearchSpace&, int) { return {}; }
bool MpiTune::work(const SearchSpace&, int) { return false; }

#endif

}  // namespace switchyard::cli
