// One whole search against the plan store: sweep the units of the space the store lacks
// (committing as they finish, so a killed search loses nothing committed), rank what the store
// holds for the space under the objective and memory limit, re-rank the best with simulate()
// (predictions cached in the store), keep the ranking with the search and mark it done.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "tuner/search.h"
#include "tuner/space.h"
#include "tuner/store.h"

namespace switchyard {

struct SearchSettings {
  Constraints constraints;  // an unset memory limit means the GPU's HBM
  int top = 5;              // finalists kept
  int rerank = 0;           // candidates re-ranked with simulate(); 0 = max(2 * top, 10)
  int threads = 0;          // 0 = every core
};

// Sweeps `missing` (the units the store lacks) and hands every finished unit to `sink` (one call at
// a time). The default runs run_sweep() on this process's threads; the CLI replaces it under MPI
// (ranks split the units).
using SweepFn = std::function<void(const std::vector<int64_t>& missing,
                                   const std::function<void(UnitResult&&)>& sink)>;

struct SearchHooks {
  SweepFn sweep;  // empty = run_sweep()
  // After each commit: candidates done (stored ones included), the total, best tokens/s so far.
  std::function<void(int64_t done, int64_t total, double best_tokens_per_s)> progress;
  // Before the re-ranking: how many candidates simulate() will time.
  std::function<void(size_t candidates)> reranking;
  // After each commit: units this run has committed so far.
  std::function<void(int64_t committed)> committed;
};

struct SearchOutcome {
  int64_t search_id = 0;
  int64_t reused_units = 0;     // units found in the store
  int64_t evaluated = 0;        // candidates timed with estimate (stored ones included)
  int64_t fresh_evaluated = 0;  // of those, timed by this run
  std::map<std::string, int64_t> pruned;
  double sweep_s = 0;
  double rerank_s = 0;
  double candidates_per_s = 0;  // candidates this run swept per second (pruned ones included)
  size_t reranked = 0;
  double max_gpu_bytes = 0;
  std::vector<Finalist> top;
  std::vector<RankedPlan> ranking;  // `top` as stored
  std::vector<Scored> pareto;
};

// No candidate meets the constraints (the sweep itself completed and is stored).
class NoFeasiblePlan : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

// Runs search `search_id` (from Store::begin_search, or an interrupted one) over `space`. Throws
// ConfigError at "max_gpu_bytes" when no plan meets the constraints (the search is still marked
// done, with no plans).
SearchOutcome run_search(const SearchSpace& space, Store& store, int64_t search_id,
                         const SearchSettings& settings, const SearchHooks& hooks = {});

}  // namespace switchyard
