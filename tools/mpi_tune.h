// `switchyard tune` under mpirun: every rank builds the same space; rank 0 owns the plan store and
// hands the units it lacks out round-robin, each rank sweeps its slice on its share of the node's
// cores and sends every finished unit to rank 0, which commits it as it arrives. Rank 0 then ranks
// exactly as one process would, so the answer is the same. Built only with MPI; without mpirun
// (no launcher environment) MPI is never initialised.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tools/cli_common.h"
#include "tuner/tune.h"

namespace switchyard::cli {

class MpiTune {
 public:
  // Initialises MPI when this process was started by mpirun/mpiexec (nullptr otherwise, or when
  // built without MPI).
  static std::unique_ptr<MpiTune> start_if_launched(int* argc, char*** argv);
  ~MpiTune();

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Threads per rank when the user gave none: the node's cores over the ranks on it.
  int default_threads() const;

  // Rank 0's `text`, on every rank.
  std::string share(std::string text);
  // Ends every rank (rank 0 failed after the sweep started: workers may be blocked sending).
  [[noreturn]] void abort(int code);
  // Every rank: true when all ranks got this far without an error (an error on any rank makes
  // every rank stop, so no rank waits on another forever).
  bool all_ok(bool ok);
  // Every rank: returns when all ranks have called it.
  void barrier();
  // Rank 0: the sweep run_search() uses (hands units out, receives results).
  SweepFn coordinator_sweep(const SearchSpace& space, int threads);
  // Rank 0, when it fails before its sweep starts: releases the waiting workers.
  void cancel();
  // Ranks > 0: waits for the units, sweeps its slice, sends the results. False when cancelled.
  bool work(const SearchSpace& space, int threads);

 private:
  MpiTune() = default;
  int rank_ = 0;
  int size_ = 1;
  bool started_ = false;  // rank 0 has sent the unit list (or cancelled)
};

}  // namespace switchyard::cli
