// The tuner's search over a SearchSpace: a parallel sweep of its units with estimate(), ranking
// under the objective and the memory limit, the Pareto front of throughput against GPU memory,
// and the re-ranking of the best candidates with simulate() (refining the gradient-bucket size,
// which only simulate() can tell apart).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "simulator/prediction.h"
#include "tuner/space.h"

namespace switchyard {

enum class Objective { kThroughput, kMemory, kCost };
template <>
struct EnumNames<Objective> {
  static constexpr std::pair<Objective, std::string_view> kValues[] = {
      {Objective::kThroughput, "throughput"},
      {Objective::kMemory, "memory"},
      {Objective::kCost, "cost"}};
};

struct Constraints {
  Objective objective = Objective::kThroughput;
  std::optional<double> max_gpu_bytes;  // per GPU, HBM tier
};

// Evaluates `units` on `threads` workers (0 = every core). `on_unit` runs for each finished unit,
// one call at a time, in completion order; `stop` (when set) makes the workers finish the unit
// they are on and return.
void run_sweep(const SearchSpace& space, const std::vector<int64_t>& units, int threads,
               const std::function<void(UnitResult&&)>& on_unit,
               const std::atomic<bool>* stop = nullptr);

// One evaluated candidate.
struct Scored {
  int64_t unit = 0;
  CandidateRecord record;
  int gpus = 0;
  // GPU-hours per million tokens: what `cost` minimises.
  double gpu_hours_per_mtok() const {
    return record.tokens_per_s > 0 ? gpus / (3600.0 * record.tokens_per_s) * 1e6 : 1e300;
  }
};

// True when `a` ranks before `b` under the objective (ties broken by the other figures, then by
// position in the space, so every run orders the same way).
bool better(const Scored& a, const Scored& b, Objective objective);

// The candidates that meet the constraints, best first, at most `limit`.
std::vector<Scored> rank(const SearchSpace& space, const std::vector<UnitResult>& results,
                         const Constraints& constraints, size_t limit);

// Non-dominated candidates in (tokens/s higher, peak GPU memory lower), by memory ascending.
std::vector<Scored> pareto_front(const SearchSpace& space, const std::vector<UnitResult>& results,
                                 const Constraints& constraints);

// The figures of a prediction a search reports and stores.
struct PredictionSummary {
  std::string fidelity;
  double step_time_s = 0;
  double tokens_per_s = 0;
  double tokens_per_s_per_gpu = 0;
  double model_tflops_per_gpu = 0;
  double mfu = 0;
  TierBytes peak;
  TimeBreakdown time;
  std::string bottleneck;
};
PredictionSummary summarize(const Prediction& p);
Json to_json(const PredictionSummary& s);
PredictionSummary summary_from_json(const Json& j);  // throws ConfigError on a malformed object

// Where simulate()'s predictions of finalists are looked up and kept (the store implements it).
class PredictionCache {
 public:
  virtual ~PredictionCache() = default;
  virtual std::optional<PredictionSummary> find(const Plan& plan, const ClusterSpec& cluster,
                                                const CostProfile& profile) = 0;
  virtual void put(const Plan& plan, const ClusterSpec& cluster, const CostProfile& profile,
                   const PredictionSummary& summary) = 0;
};

struct Finalist {
  int64_t unit = 0;
  int64_t index = 0;
  int gpus = 0;
  Plan plan;  // with the best gradient-bucket size
  std::string storage;
  PredictionSummary estimate;
  PredictionSummary simulated;
  bool cached = false;  // simulate's figures came from the cache
};

// Simulates the `candidates` (each at every bucket size of the space) and orders them by the
// objective on simulate's figures, dropping those whose simulated peak breaks the memory limit.
std::vector<Finalist> rerank(const SearchSpace& space, const std::vector<Scored>& candidates,
                             const Constraints& constraints, PredictionCache* cache, int threads);

}  // namespace switchyard
