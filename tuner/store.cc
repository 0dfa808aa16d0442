#include "tuner/store.h"

#include <sqlite3.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>

#include "core/error.h"

namespace switchyard {
namespace {

// Another connection held a lock past the busy timeout, or SQLite gave up without waiting (as it
// may while a new file switches to WAL): opening retries.
class StoreBusy : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Corruption found by a statement is bad input (the file), like at open; anything else (a full
// disk, a lock held past the timeout) is an operational failure.
[[noreturn]] void sqlite_fail(sqlite3* db, int rc, const char* call, const char* file, int line) {
  const std::string where = std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                            ": " + (db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
  if (rc == SQLITE_CORRUPT || rc == SQLITE_NOTADB)
    throw ConfigError("--db", "the database is damaged: " + where);
  if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED) throw StoreBusy(where);
  throw std::runtime_error(where);
}

#define SQLITE_CHECK(db, call)                                                             \
  do {                                                                                     \
    const int sqlite_rc_ = (call);                                                         \
    if (sqlite_rc_ != SQLITE_OK) sqlite_fail((db), sqlite_rc_, #call, __FILE__, __LINE__); \
  } while (0)

// Migration i brings a file from schema version i to i + 1.
const char* const kMigrations[] = {
    // 1: configs, predictions, searches and their sweeps.
    R"sql(
CREATE TABLE models(hash TEXT PRIMARY KEY, name TEXT NOT NULL, json TEXT NOT NULL,
                    created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE clusters(hash TEXT PRIMARY KEY, name TEXT NOT NULL, json TEXT NOT NULL,
                      created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE workloads(hash TEXT PRIMARY KEY, name TEXT NOT NULL, json TEXT NOT NULL,
                       created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE plans(hash TEXT PRIMARY KEY, name TEXT NOT NULL, json TEXT NOT NULL,
                   created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE predictions(
  id INTEGER PRIMARY KEY,
  model_hash TEXT NOT NULL REFERENCES models(hash),
  cluster_hash TEXT NOT NULL REFERENCES clusters(hash),
  workload_hash TEXT NOT NULL REFERENCES workloads(hash),
  plan_hash TEXT NOT NULL REFERENCES plans(hash),
  cost_model_version TEXT NOT NULL,
  profile_hash TEXT NOT NULL,
  fidelity TEXT NOT NULL CHECK (fidelity IN ('estimate', 'simulate')),
  step_time_s REAL NOT NULL,
  tokens_per_s REAL NOT NULL,
  mfu REAL NOT NULL,
  peak_gpu_bytes REAL NOT NULL,
  peak_cpu_bytes REAL NOT NULL,
  peak_ssd_bytes REAL NOT NULL,
  bottleneck TEXT NOT NULL,
  summary_json TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT (datetime('now')),
  UNIQUE(model_hash, cluster_hash, workload_hash, plan_hash, cost_model_version, profile_hash,
         fidelity));
CREATE TABLE searches(
  id INTEGER PRIMARY KEY,
  status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
  space_key TEXT NOT NULL,
  args_json TEXT NOT NULL,
  units_total INTEGER NOT NULL,
  units_done INTEGER NOT NULL DEFAULT 0,
  candidates_total INTEGER NOT NULL,
  started_at TEXT NOT NULL DEFAULT (datetime('now')),
  finished_at TEXT,
  result_json TEXT);
CREATE TABLE sweep_units(
  space_key TEXT NOT NULL,
  unit INTEGER NOT NULL,
  candidates INTEGER NOT NULL,
  evaluated INTEGER NOT NULL,
  pruned_json TEXT NOT NULL,
  records BLOB NOT NULL,
  PRIMARY KEY(space_key, unit)) WITHOUT ROWID;
CREATE TABLE search_ranking(
  search_id INTEGER NOT NULL REFERENCES searches(id) ON DELETE CASCADE,
  rank INTEGER NOT NULL,
  plan_hash TEXT NOT NULL REFERENCES plans(hash),
  prediction_id INTEGER NOT NULL REFERENCES predictions(id),
  PRIMARY KEY(search_id, rank));
)sql",
    // 2: what the executor measures and the calibrations fitted from it.
    R"sql(
CREATE TABLE measurements(
  id INTEGER PRIMARY KEY,
  model_hash TEXT NOT NULL REFERENCES models(hash),
  cluster_hash TEXT NOT NULL REFERENCES clusters(hash),
  workload_hash TEXT NOT NULL REFERENCES workloads(hash),
  plan_hash TEXT NOT NULL REFERENCES plans(hash),
  backend TEXT NOT NULL CHECK (backend IN ('cpu', 'cuda')),
  steps INTEGER NOT NULL,
  step_time_s REAL NOT NULL,
  tokens_per_s REAL NOT NULL,
  peak_gpu_bytes REAL,
  peak_cpu_bytes REAL,
  peak_ssd_bytes REAL,
  per_op_json TEXT,
  trace_path TEXT,
  created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE INDEX measurements_by_inputs ON measurements(model_hash, cluster_hash, workload_hash,
                                                    plan_hash);
CREATE TABLE calibrations(
  id INTEGER PRIMARY KEY,
  cluster_hash TEXT NOT NULL REFERENCES clusters(hash),
  backend TEXT NOT NULL,
  profile_json TEXT NOT NULL,
  residuals_json TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT (datetime('now')));
)sql",
};
static_assert(std::size(kMigrations) == kStoreSchemaVersion);

}  // namespace

// A prepared statement with positional binds (1-based), finalized on scope exit.
class Store::Statement {
 public:
  Statement(sqlite3* db, const char* sql) : db_(db) {
    SQLITE_CHECK(db_, sqlite3_prepare_v2(db_, sql, -1, &stmt_, nullptr));
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement& bind(int i, const std::string& v) {
    SQLITE_CHECK(
        db_, sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
    return *this;
  }
  Statement& bind(int i, int64_t v) {
    SQLITE_CHECK(db_, sqlite3_bind_int64(stmt_, i, v));
    return *this;
  }
  Statement& bind(int i, double v) {
    SQLITE_CHECK(db_, sqlite3_bind_double(stmt_, i, v));
    return *this;
  }
  Statement& bind_blob(int i, const std::string& v) {
    SQLITE_CHECK(
        db_, sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
    return *this;
  }
  // True while a row is available.
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    sqlite_fail(db_, rc, "sqlite3_step", __FILE__, __LINE__);
  }
  void run() {
    while (step()) {
    }
  }
  // Runs an INSERT ... RETURNING id to completion; the new row's id.
  int64_t insert_returning_id() {
    if (!step()) throw std::runtime_error("INSERT ... RETURNING returned no row");
    const int64_t id = i64(0);
    run();
    return id;
  }
  void reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  int64_t i64(int c) const { return sqlite3_column_int64(stmt_, c); }
  double f64(int c) const { return sqlite3_column_double(stmt_, c); }
  bool null(int c) const { return sqlite3_column_type(stmt_, c) == SQLITE_NULL; }
  std::string text(int c) const {
    const auto* p = sqlite3_column_text(stmt_, c);
    return p ? std::string(reinterpret_cast<const char*>(p),
                           static_cast<size_t>(sqlite3_column_bytes(stmt_, c)))
             : std::string();
  }
  std::pair<const unsigned char*, size_t> blob(int c) const {
    const void* p = sqlite3_column_blob(stmt_, c);
    return {static_cast<const unsigned char*>(p),
            static_cast<size_t>(sqlite3_column_bytes(stmt_, c))};
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
};

namespace {

// BEGIN IMMEDIATE ... COMMIT, rolled back when the scope unwinds.
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) {
    SQLITE_CHECK(db_, sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr));
  }
  ~Transaction() {
    if (!done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  void commit() {
    SQLITE_CHECK(db_, sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr));
    done_ = true;
  }

 private:
  sqlite3* db_;
  bool done_ = false;
};

void refuse(const std::filesystem::path& path, const std::string& why) {
  throw ConfigError("--db", "\"" + path.string() + "\" " + why +
                                "; refusing to use it (name another file with --db)");
}

}  // namespace

void Store::exec(const std::string& sql) {
  char* err = nullptr;
  const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    const std::string msg = err ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    sqlite_fail(nullptr, rc, ("sqlite3_exec: " + msg).c_str(), __FILE__, __LINE__);
  }
}

std::unique_ptr<Store> Store::open(const std::filesystem::path& path, int schema_version) {
  if (schema_version < 1 || schema_version > kStoreSchemaVersion)
    throw ConfigError("--db", "schema version " + std::to_string(schema_version) +
                                  " is not one this build knows");
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    if (std::filesystem::is_directory(path, ec)) refuse(path, "is a directory");
    const auto size = std::filesystem::file_size(path, ec);
    if (!ec && size > 0) {
      // The SQLite header, checked before SQLite is let near the file.
      char header[16] = {};
      std::ifstream in(path, std::ios::binary);
      in.read(header, sizeof header);
      if (!in || std::memcmp(header, "SQLite format 3", 16) != 0)
        refuse(path, "is not an SQLite database");
    }
  }
  std::unique_ptr<Store> s(new Store());
  s->path_ = path;
  const int rc =
      sqlite3_open_v2(path.c_str(), &s->db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  if (rc != SQLITE_OK)
    throw ConfigError("--db", "cannot open \"" + path.string() +
                                  "\": " + (s->db_ ? sqlite3_errmsg(s->db_) : sqlite3_errstr(rc)));
  sqlite3_busy_timeout(s->db_, 60'000);
  sqlite3_extended_result_codes(s->db_, 0);
  // Two processes opening one new file race for the switch to WAL and the first migration.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    try {
      s->prepare(schema_version);
      break;
    } catch (const StoreBusy&) {
      if (std::chrono::steady_clock::now() > deadline) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return s;
}

// Checks whose file this is, switches it to WAL and migrates it to `schema_version`.
void Store::prepare(int schema_version) {
  const std::filesystem::path& path = path_;
  // Whose file is it?
  int64_t tables = 0, app_id = 0, version = 0;
  std::string damage;
  try {
    Statement check(db_, "PRAGMA quick_check");
    if (check.step() && check.text(0) != "ok") damage = "integrity check: " + check.text(0);
    Statement t(db_, "SELECT count(*) FROM sqlite_master WHERE type = 'table'");
    t.step();
    tables = t.i64(0);
    Statement a(db_, "PRAGMA application_id");
    a.step();
    app_id = a.i64(0);
    Statement v(db_, "PRAGMA user_version");
    v.step();
    version = v.i64(0);
  } catch (const StoreBusy&) {
    throw;
  } catch (const std::exception&) {
    damage = std::string("SQLite: ") + sqlite3_errmsg(db_);
  }
  if (!damage.empty()) refuse(path, "is damaged (" + damage + ")");
  if (tables > 0 && app_id != kStoreApplicationId)
    refuse(path, "is an SQLite database of another application (" + std::to_string(tables) +
                     " tables, application_id " + std::to_string(app_id) + ")");
  if (version > kStoreSchemaVersion)
    refuse(path, "has schema version " + std::to_string(version) +
                     ", newer than this Switchyard's " + std::to_string(kStoreSchemaVersion));

  exec("PRAGMA journal_mode = WAL");
  exec("PRAGMA synchronous = NORMAL");
  exec("PRAGMA foreign_keys = ON");
  // Migrate forward, each step in its own transaction with the version bump.
  while (version < schema_version) {
    Transaction tx(db_);
    // Another process may have migrated while we waited for the lock.
    Statement v(db_, "PRAGMA user_version");
    v.step();
    version = v.i64(0);
    if (version >= schema_version) break;
    exec(kMigrations[version]);
    exec("PRAGMA application_id = " + std::to_string(kStoreApplicationId));
    exec("PRAGMA user_version = " + std::to_string(version + 1));
    tx.commit();
    ++version;
  }
}

Store::~Store() {
  if (db_) sqlite3_close_v2(db_);
}

int Store::schema_version() {
  Statement v(db_, "PRAGMA user_version");
  v.step();
  return static_cast<int>(v.i64(0));
}

std::string Store::put_config(const char* table, const std::string& name, const Json& semantic) {
  const std::string hash = content_hash(semantic);
  const std::string sql =
      std::string("INSERT OR IGNORE INTO ") + table + "(hash, name, json) VALUES (?, ?, ?)";
  Statement st(db_, sql.c_str());
  st.bind(1, hash).bind(2, name).bind(3, canonical_dump(semantic)).run();
  return hash;
}

std::string Store::put_model(const ModelSpec& m) {
  return put_config("models", m.name, semantic_json(m));
}
std::string Store::put_cluster(const ClusterSpec& c) {
  return put_config("clusters", c.name, semantic_json(c));
}
std::string Store::put_workload(const Workload& w) {
  return put_config("workloads", w.name, semantic_json(w));
}
std::string Store::put_plan(const Plan& p) { return put_config("plans", p.name, semantic_json(p)); }

std::optional<StoredPlan> Store::find_plan(const std::string& hash_or_prefix) {
  if (hash_or_prefix.empty()) return std::nullopt;
  Statement st(db_, "SELECT hash, json FROM plans WHERE hash >= ? AND hash < ? LIMIT 2");
  st.bind(1, hash_or_prefix).bind(2, hash_or_prefix + "\x7f");
  std::vector<StoredPlan> found;
  while (st.step()) found.push_back({st.text(0), parse_json_text(st.text(1), "plans")});
  if (found.size() != 1) return std::nullopt;
  return found.front();
}

std::vector<int64_t> Store::done_units(const std::string& space_key) {
  Statement st(db_, "SELECT unit FROM sweep_units WHERE space_key = ?");
  st.bind(1, space_key);
  std::vector<int64_t> out;
  while (st.step()) out.push_back(st.i64(0));
  return out;
}

void Store::put_units(const std::string& space_key, const std::vector<UnitResult>& units) {
  if (units.empty()) return;
  Transaction tx(db_);
  Statement st(db_,
               "INSERT OR IGNORE INTO sweep_units(space_key, unit, candidates, evaluated, "
               "pruned_json, records) VALUES (?, ?, ?, ?, ?, ?)");
  for (const UnitResult& u : units) {
    Json pruned = Json::object();
    for (const auto& [rule, n] : u.pruned) pruned[rule] = n;
    st.bind(1, space_key)
        .bind(2, u.unit)
        .bind(3, u.candidates)
        .bind(4, static_cast<int64_t>(u.records.size()))
        .bind(5, pruned.dump())
        .bind_blob(6, pack_records(u.records));
    st.run();
    st.reset();
  }
  tx.commit();
}

std::vector<UnitResult> Store::load_units(const std::string& space_key) {
  Statement st(db_,
               "SELECT unit, candidates, evaluated, pruned_json, records FROM sweep_units "
               "WHERE space_key = ? ORDER BY unit");
  st.bind(1, space_key);
  std::vector<UnitResult> out;
  while (st.step()) {
    UnitResult u;
    u.unit = st.i64(0);
    u.candidates = st.i64(1);
    const int64_t evaluated = st.i64(2);
    const Json pruned = parse_json_text(st.text(3), "sweep_units.pruned_json");
    for (const auto& [rule, n] : pruned.items()) u.pruned[rule] = n.get<int64_t>();
    const auto [p, bytes] = st.blob(4);
    if (evaluated < 0 || bytes != static_cast<size_t>(evaluated) * kCandidateRecordBytes)
      throw ConfigError("--db", "sweep unit " + std::to_string(u.unit) + " holds " +
                                    std::to_string(bytes) + " bytes for " +
                                    std::to_string(evaluated) + " records: the file is damaged");
    u.records = unpack_records(p, bytes);
    out.push_back(std::move(u));
  }
  return out;
}

int64_t Store::put_prediction(const std::string& model_hash, const std::string& cluster_hash,
                              const std::string& workload_hash, const std::string& plan_hash,
                              const std::string& profile_hash, const PredictionSummary& s) {
  Statement st(
      db_,
      "INSERT INTO predictions(model_hash, cluster_hash, workload_hash, plan_hash, "
      "cost_model_version, profile_hash, fidelity, step_time_s, tokens_per_s, mfu, "
      "peak_gpu_bytes, peak_cpu_bytes, peak_ssd_bytes, bottleneck, summary_json) "
      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
      "ON CONFLICT DO UPDATE SET step_time_s = excluded.step_time_s, "
      "tokens_per_s = excluded.tokens_per_s, mfu = excluded.mfu, "
      "peak_gpu_bytes = excluded.peak_gpu_bytes, peak_cpu_bytes = excluded.peak_cpu_bytes, "
      "peak_ssd_bytes = excluded.peak_ssd_bytes, bottleneck = excluded.bottleneck, "
      "summary_json = excluded.summary_json, created_at = datetime('now') "
      "RETURNING id");
  st.bind(1, model_hash)
      .bind(2, cluster_hash)
      .bind(3, workload_hash)
      .bind(4, plan_hash)
      .bind(5, std::string(kCostModelVersion))
      .bind(6, profile_hash)
      .bind(7, s.fidelity)
      .bind(8, s.step_time_s)
      .bind(9, s.tokens_per_s)
      .bind(10, s.mfu)
      .bind(11, s.peak.gpu)
      .bind(12, s.peak.cpu)
      .bind(13, s.peak.ssd)
      .bind(14, s.bottleneck)
      .bind(15, to_json(s).dump());
  return st.insert_returning_id();
}

std::optional<std::pair<int64_t, PredictionSummary>> Store::find_prediction(
    const std::string& model_hash, const std::string& cluster_hash,
    const std::string& workload_hash, const std::string& plan_hash, const std::string& profile_hash,
    const std::string& fidelity) {
  Statement st(db_,
               "SELECT id, summary_json FROM predictions WHERE model_hash = ? AND "
               "cluster_hash = ? AND workload_hash = ? AND plan_hash = ? AND "
               "cost_model_version = ? AND profile_hash = ? AND fidelity = ?");
  st.bind(1, model_hash)
      .bind(2, cluster_hash)
      .bind(3, workload_hash)
      .bind(4, plan_hash)
      .bind(5, std::string(kCostModelVersion))
      .bind(6, profile_hash)
      .bind(7, fidelity);
  if (!st.step()) return std::nullopt;
  return std::make_pair(st.i64(0), summary_from_json(parse_json_text(st.text(1), "predictions")));
}

int64_t Store::begin_search(const Json& args, const std::string& space_key, int64_t units_total,
                            int64_t candidates_total) {
  Statement st(db_,
               "INSERT INTO searches(status, space_key, args_json, units_total, "
               "candidates_total) VALUES ('running', ?, ?, ?, ?) RETURNING id");
  st.bind(1, space_key)
      .bind(2, canonical_dump(args))
      .bind(3, units_total)
      .bind(4, candidates_total);
  return st.insert_returning_id();
}

void Store::set_progress(int64_t search_id, int64_t units_done) {
  Statement st(db_, "UPDATE searches SET units_done = ? WHERE id = ?");
  st.bind(1, units_done).bind(2, search_id).run();
}

void Store::finish_search(int64_t search_id, const std::string& status, const Json& result) {
  Statement st(db_,
               "UPDATE searches SET status = ?, result_json = ?, finished_at = datetime('now') "
               "WHERE id = ?");
  st.bind(1, status).bind(2, result.dump()).bind(3, search_id).run();
}

std::optional<SearchRecord> Store::find_search(int64_t id) {
  for (const auto& s : list_searches())
    if (s.id == id) return s;
  return std::nullopt;
}

std::vector<SearchRecord> Store::list_searches() {
  Statement st(db_,
               "SELECT id, status, space_key, args_json, units_total, units_done, "
               "candidates_total, started_at, finished_at, result_json FROM searches ORDER BY id");
  std::vector<SearchRecord> out;
  while (st.step()) {
    SearchRecord r;
    r.id = st.i64(0);
    r.status = st.text(1);
    r.space_key = st.text(2);
    r.args = parse_json_text(st.text(3), "searches.args_json");
    r.units_total = st.i64(4);
    r.units_done = st.i64(5);
    r.candidates_total = st.i64(6);
    r.started_at = st.text(7);
    r.finished_at = st.text(8);
    if (!st.null(9)) r.result = parse_json_text(st.text(9), "searches.result_json");
    out.push_back(std::move(r));
  }
  return out;
}

std::optional<SearchRecord> Store::find_interrupted(const Json& args) {
  const auto all = list_searches();
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    if (it->status == "running" &&
        (args.is_null() || canonical_dump(it->args) == canonical_dump(args)))
      return *it;
  return std::nullopt;
}

void Store::put_ranking(int64_t search_id, const std::vector<RankedPlan>& ranking) {
  Transaction tx(db_);
  Statement del(db_, "DELETE FROM search_ranking WHERE search_id = ?");
  del.bind(1, search_id).run();
  Statement st(db_,
               "INSERT INTO search_ranking(search_id, rank, plan_hash, prediction_id) VALUES "
               "(?, ?, ?, ?)");
  for (const RankedPlan& r : ranking) {
    st.bind(1, search_id)
        .bind(2, static_cast<int64_t>(r.rank))
        .bind(3, r.plan_hash)
        .bind(4, r.prediction_id);
    st.run();
    st.reset();
  }
  tx.commit();
}

std::vector<RankedPlan> Store::ranking(int64_t search_id) {
  Statement st(db_,
               "SELECT r.rank, r.plan_hash, r.prediction_id, p.cluster_hash, p.summary_json "
               "FROM search_ranking r JOIN predictions p ON p.id = r.prediction_id "
               "WHERE r.search_id = ? ORDER BY r.rank");
  st.bind(1, search_id);
  std::vector<RankedPlan> out;
  while (st.step())
    out.push_back({static_cast<int>(st.i64(0)), st.text(1), st.i64(2), st.text(3),
                   summary_from_json(parse_json_text(st.text(4), "predictions"))});
  return out;
}

int64_t Store::put_measurement(const std::string& model_hash, const std::string& cluster_hash,
                               const std::string& workload_hash, const std::string& plan_hash,
                               const Measurement& m) {
  Statement st(db_,
               "INSERT INTO measurements(model_hash, cluster_hash, workload_hash, plan_hash, "
               "backend, steps, step_time_s, tokens_per_s, peak_gpu_bytes, peak_cpu_bytes, "
               "peak_ssd_bytes, per_op_json, trace_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
               "?, ?) RETURNING id");
  st.bind(1, model_hash)
      .bind(2, cluster_hash)
      .bind(3, workload_hash)
      .bind(4, plan_hash)
      .bind(5, m.backend)
      .bind(6, m.steps)
      .bind(7, m.step_time_s)
      .bind(8, m.tokens_per_s)
      .bind(9, m.peak_gpu_bytes)
      .bind(10, m.peak_cpu_bytes)
      .bind(11, m.peak_ssd_bytes)
      .bind(12, m.details.dump())
      .bind(13, m.trace_path);
  return st.insert_returning_id();
}

int64_t Store::put_calibration(const std::string& cluster_hash, const std::string& backend,
                               const Json& profile, const Json& residuals) {
  Statement st(db_,
               "INSERT INTO calibrations(cluster_hash, backend, profile_json, residuals_json) "
               "VALUES (?, ?, ?, ?) RETURNING id");
  st.bind(1, cluster_hash).bind(2, backend).bind(3, profile.dump()).bind(4, residuals.dump());
  return st.insert_returning_id();
}

std::vector<Store::Comparison> Store::comparisons() {
  Statement st(db_,
               "SELECT m.id, m.created_at, mo.name, c.name, m.plan_hash, m.backend, m.steps, "
               "m.step_time_s, m.peak_gpu_bytes, p.profile_hash, p.step_time_s, p.peak_gpu_bytes, "
               "m.per_op_json FROM measurements m JOIN models mo ON mo.hash = m.model_hash "
               "JOIN clusters c ON c.hash = m.cluster_hash "
               "LEFT JOIN predictions p ON p.model_hash = m.model_hash AND "
               "p.cluster_hash = m.cluster_hash AND p.workload_hash = m.workload_hash AND "
               "p.plan_hash = m.plan_hash AND p.fidelity = 'simulate' AND "
               "p.cost_model_version = ? ORDER BY m.id, p.id");
  st.bind(1, std::string(kCostModelVersion));
  std::vector<Comparison> out;
  while (st.step()) {
    Comparison c;
    c.measurement_id = st.i64(0);
    c.created_at = st.text(1);
    c.model = st.text(2);
    c.cluster = st.text(3);
    c.plan_hash = st.text(4);
    c.backend = st.text(5);
    c.steps = st.i64(6);
    c.measured_step_s = st.f64(7);
    c.measured_peak_gpu_bytes = st.null(8) ? 0 : st.f64(8);
    c.profile_hash = st.text(9);
    c.predicted_step_s = st.null(10) ? 0 : st.f64(10);
    c.predicted_peak_gpu_bytes = st.null(11) ? 0 : st.f64(11);
    if (!st.null(12)) c.details = parse_json_text(st.text(12), "measurements.per_op_json");
    out.push_back(std::move(c));
  }
  return out;
}

int64_t Store::count_rows(const std::string& table) {
  static const char* const kTables[] = {"models",      "clusters",     "workloads",
                                        "plans",       "predictions",  "searches",
                                        "sweep_units", "measurements", "calibrations"};
  bool known = false;
  for (const char* t : kTables) known = known || table == t;
  if (!known) throw std::invalid_argument("count_rows: unknown table " + table);
  Statement st(db_, ("SELECT count(*) FROM " + table).c_str());
  st.step();
  return st.i64(0);
}

std::string profile_hash(const CostProfile& p) { return content_hash(to_json(p)); }

StoreCache::StoreCache(Store& store, const ModelSpec& model, const Workload& workload)
    : store_(store),
      model_hash_(store.put_model(model)),
      workload_hash_(store.put_workload(workload)) {}

std::optional<PredictionSummary> StoreCache::find(const Plan& plan, const ClusterSpec& cluster,
                                                  const CostProfile& profile) {
  auto found =
      store_.find_prediction(model_hash_, content_hash(semantic_json(cluster)), workload_hash_,
                             content_hash(semantic_json(plan)), profile_hash(profile), "simulate");
  if (!found) return std::nullopt;
  return found->second;
}

void StoreCache::put(const Plan& plan, const ClusterSpec& cluster, const CostProfile& profile,
                     const PredictionSummary& summary) {
  store_.put_prediction(model_hash_, store_.put_cluster(cluster), workload_hash_,
                        store_.put_plan(plan), profile_hash(profile), summary);
}

}  // namespace switchyard
