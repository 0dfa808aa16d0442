// The plan store: one SQLite file (default ./switchyard.db) that keeps configs, predictions,
// searches, the sweeps they ran, and the measurements and calibrations the executor adds.
//
//  - Configs (models, clusters, workloads, plans) are keyed by the SHA-256 of their canonical
//    semantic JSON. A prediction is keyed by those four hashes, the cost-model version, the hash of
//    the cost profile's constants and the fidelity: it is reused only when nothing it depends on
//    changed.
//  - A sweep unit (tuner/space.h) is stored once per space key, as a packed array of candidate
//    records plus its pruning counts: a repeated search reads them instead of re-estimating, and a
//    killed search skips the units it committed.
//  - WAL journal, foreign keys on, PRAGMA application_id marks the file as Switchyard's and
//    PRAGMA user_version holds the schema version; older files are migrated forward on open.
//  - Writers take the lock up front (BEGIN IMMEDIATE) and wait up to 60 s for another process's
//    transaction, so two searches can share one file.
//  - A file that is not SQLite, is SQLite but someone else's, is corrupt, or comes from a newer
//    Switchyard is refused with a ConfigError at path "--db" (exit code 2), never modified.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/json_io.h"
#include "tuner/search.h"
#include "tuner/space.h"

struct sqlite3;
struct sqlite3_stmt;

namespace switchyard {

inline constexpr int kStoreSchemaVersion = 2;
inline constexpr int32_t kStoreApplicationId = 0x53575944;  // "SWYD"

struct SearchRecord {
  int64_t id = 0;
  std::string status;  // running, done, failed
  std::string space_key;
  Json args;  // what the search was asked (model, cluster, gpus, objective, ...)
  int64_t units_total = 0;
  int64_t units_done = 0;
  int64_t candidates_total = 0;
  std::string started_at;
  std::string finished_at;
  Json result;  // summary written when done (null before)
};

struct StoredPlan {
  std::string hash;
  Json plan;  // semantic JSON
};

struct RankedPlan {
  int rank = 0;
  std::string plan_hash;
  int64_t prediction_id = 0;
  std::string cluster_hash;
  PredictionSummary prediction;
};

class Store {
 public:
  // Opens (creating when absent) and migrates up to `schema_version`. Throws ConfigError at
  // "--db" for a file it must not touch.
  static std::unique_ptr<Store> open(const std::filesystem::path& path,
                                     int schema_version = kStoreSchemaVersion);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  int schema_version();
  const std::filesystem::path& path() const { return path_; }

  // Configs: stores the semantic JSON once; returns its content hash.
  std::string put_model(const ModelSpec& m);
  std::string put_cluster(const ClusterSpec& c);
  std::string put_workload(const Workload& w);
  std::string put_plan(const Plan& p);
  std::optional<StoredPlan> find_plan(const std::string& hash_or_prefix);

  // Sweep units of a space.
  std::vector<int64_t> done_units(const std::string& space_key);
  void put_units(const std::string& space_key, const std::vector<UnitResult>& units);
  std::vector<UnitResult> load_units(const std::string& space_key);

  // Predictions.
  int64_t put_prediction(const std::string& model_hash, const std::string& cluster_hash,
                         const std::string& workload_hash, const std::string& plan_hash,
                         const std::string& profile_hash, const PredictionSummary& s);
  std::optional<std::pair<int64_t, PredictionSummary>> find_prediction(
      const std::string& model_hash, const std::string& cluster_hash,
      const std::string& workload_hash, const std::string& plan_hash,
      const std::string& profile_hash, const std::string& fidelity);

  // Searches.
  int64_t begin_search(const Json& args, const std::string& space_key, int64_t units_total,
                       int64_t candidates_total);
  void set_progress(int64_t search_id, int64_t units_done);
  void finish_search(int64_t search_id, const std::string& status, const Json& result);
  std::optional<SearchRecord> find_search(int64_t id);
  std::vector<SearchRecord> list_searches();
  // The newest search still marked running whose arguments equal `args` (any when null).
  std::optional<SearchRecord> find_interrupted(const Json& args);
  void put_ranking(int64_t search_id, const std::vector<RankedPlan>& ranking);
  std::vector<RankedPlan> ranking(int64_t search_id);

  // A measured run (the executor's): step time, throughput, peak memory per tier, per-op times.
  struct Measurement {
    std::string backend;  // "cpu" or "cuda"
    int64_t steps = 0;
    double step_time_s = 0;
    double tokens_per_s = 0;
    double peak_gpu_bytes = 0, peak_cpu_bytes = 0, peak_ssd_bytes = 0;
    Json details;  // per-op times, tokens per expert, check results
    std::string trace_path;
  };
  int64_t put_measurement(const std::string& model_hash, const std::string& cluster_hash,
                          const std::string& workload_hash, const std::string& plan_hash,
                          const Measurement& m);

  int64_t put_calibration(const std::string& cluster_hash, const std::string& backend,
                          const Json& profile, const Json& residuals);

  // Every stored measurement beside every simulate() prediction of the same inputs.
  struct Comparison {
    int64_t measurement_id = 0;
    std::string created_at, model, cluster, plan_hash, backend, profile_hash;
    int64_t steps = 0;
    double measured_step_s = 0;
    double predicted_step_s = 0;  // 0 when nothing predicted these inputs
    double measured_peak_gpu_bytes = 0, predicted_peak_gpu_bytes = 0;
    Json details;  // the measurement's per-op details (op classes predicted and measured)
  };
  std::vector<Comparison> comparisons();

  // The tables the executor fills (counted by `plans list`).
  int64_t count_rows(const std::string& table);

 private:
  Store() = default;
  void prepare(int schema_version);
  std::string put_config(const char* table, const std::string& name, const Json& semantic);
  void exec(const std::string& sql);
  class Statement;

  sqlite3* db_ = nullptr;
  std::filesystem::path path_;
};

// The store as the re-ranking's cache of simulate() predictions for one model and workload.
class StoreCache : public PredictionCache {
 public:
  StoreCache(Store& store, const ModelSpec& model, const Workload& workload);
  std::optional<PredictionSummary> find(const Plan& plan, const ClusterSpec& cluster,
                                        const CostProfile& profile) override;
  void put(const Plan& plan, const ClusterSpec& cluster, const CostProfile& profile,
           const PredictionSummary& summary) override;

 private:
  Store& store_;
  std::string model_hash_;
  std::string workload_hash_;
};

// The content hash of a profile's constants (part of a prediction's key).
std::string profile_hash(const CostProfile& p);

}  // namespace switchyard
