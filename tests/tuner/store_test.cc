// The plan store: schema, migrations, refusal of files it must not touch, exact round trips of
// sweep units and predictions, keys that change with what a prediction depends on, and two
// writers on one file.
#include "tuner/store.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("switchyard_store_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path db(const char* name = "s.db") const { return dir_ / name; }
  static std::string sql_text(const std::filesystem::path& path, const char* sql) {
    sqlite3* h = nullptr;
    sqlite3_open_v2(path.c_str(), &h, SQLITE_OPEN_READONLY, nullptr);
    sqlite3_stmt* st = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(h, sql, -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
      out = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    sqlite3_close(h);
    return out;
  }
  static std::string bytes(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  std::filesystem::path dir_;
};

UnitResult sample_unit(int64_t unit) {
  UnitResult u;
  u.unit = unit;
  u.candidates = 10;
  u.pruned = {{"rule: plan.ep", 6}, {"memory: GPU HBM", 2}};
  for (uint32_t i : {3u, 9u}) {
    CandidateRecord r;
    r.index = i;
    r.step_time_s = 1.25f + static_cast<float>(i);
    r.tokens_per_s = 12345.5f * static_cast<float>(i);
    r.mfu = 0.5f;
    r.peak_gpu_bytes = 7.5e10f;
    r.peak_cpu_bytes = 1e9f;
    r.peak_ssd_bytes = 0;
    r.bottleneck = 3;
    u.records.push_back(r);
  }
  return u;
}

TEST_F(StoreTest, FreshFileHasTheSchemaWalAndItsMarks) {
  {
    auto s = Store::open(db());
    EXPECT_EQ(s->schema_version(), kStoreSchemaVersion);
  }
  EXPECT_EQ(sql_text(db(), "PRAGMA journal_mode"), "wal");
  EXPECT_EQ(sql_text(db(), "PRAGMA application_id"), std::to_string(kStoreApplicationId));
  EXPECT_EQ(sql_text(db(), "PRAGMA user_version"), std::to_string(kStoreSchemaVersion));
}

TEST_F(StoreTest, MigratesAnOlderFileAndKeepsItsRows) {
  {
    auto s = Store::open(db(), 1);
    EXPECT_EQ(s->schema_version(), 1);
    s->put_units("k", {sample_unit(4)});
    EXPECT_THROW(s->count_rows("measurements"), std::runtime_error);  // not yet there
  }
  auto s = Store::open(db());
  EXPECT_EQ(s->schema_version(), 2);
  EXPECT_EQ(s->count_rows("measurements"), 0);
  EXPECT_EQ(s->count_rows("calibrations"), 0);
  EXPECT_EQ(s->done_units("k"), std::vector<int64_t>{4});
}

TEST_F(StoreTest, RefusesFilesItMustNotTouchAndLeavesThemAlone) {
  // Not SQLite.
  std::ofstream(db("text.db")) << "model,cluster\nmixtral,dgx\n";
  const std::string before = bytes(db("text.db"));
  EXPECT_THROW(Store::open(db("text.db")), ConfigError);
  EXPECT_EQ(bytes(db("text.db")), before);

  // Someone else's SQLite database.
  sqlite3* h = nullptr;
  sqlite3_open(db("other.db").c_str(), &h);
  sqlite3_exec(h, "CREATE TABLE users(name TEXT); INSERT INTO users VALUES ('a')", nullptr, nullptr,
               nullptr);
  sqlite3_close(h);
  const std::string other = bytes(db("other.db"));
  try {
    Store::open(db("other.db"));
    FAIL() << "opened a foreign database";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.issues().front().path, "--db");
    EXPECT_NE(e.issues().front().message.find("another application"), std::string::npos);
  }
  EXPECT_EQ(bytes(db("other.db")), other);

  // A newer Switchyard's file.
  { Store::open(db("new.db")); }
  sqlite3_open(db("new.db").c_str(), &h);
  sqlite3_exec(h, "PRAGMA user_version = 99", nullptr, nullptr, nullptr);
  sqlite3_close(h);
  EXPECT_THROW(Store::open(db("new.db")), ConfigError);

  // A damaged (truncated) one.
  {
    auto s = Store::open(db("cut.db"));
    for (int i = 0; i < 200; ++i) s->put_units("k" + std::to_string(i), {sample_unit(i)});
  }
  std::filesystem::resize_file(db("cut.db"), std::filesystem::file_size(db("cut.db")) / 2);
  EXPECT_THROW(Store::open(db("cut.db")), ConfigError);
}

TEST_F(StoreTest, SweepUnitsRoundTripExactly) {
  auto s = Store::open(db());
  s->put_units("space-a", {sample_unit(2), sample_unit(0)});
  s->put_units("space-b", {sample_unit(5)});
  const auto units = s->load_units("space-a");
  ASSERT_EQ(units.size(), 2u);
  const UnitResult want = sample_unit(0);
  EXPECT_EQ(units[0].unit, 0);
  EXPECT_EQ(units[0].candidates, want.candidates);
  EXPECT_EQ(units[0].pruned, want.pruned);
  ASSERT_EQ(units[0].records.size(), want.records.size());
  for (size_t i = 0; i < want.records.size(); ++i) {
    const auto &a = units[0].records[i], &b = want.records[i];
    EXPECT_EQ(a.index, b.index);
    EXPECT_EQ(a.step_time_s, b.step_time_s);
    EXPECT_EQ(a.tokens_per_s, b.tokens_per_s);
    EXPECT_EQ(a.mfu, b.mfu);
    EXPECT_EQ(a.peak_gpu_bytes, b.peak_gpu_bytes);
    EXPECT_EQ(a.peak_cpu_bytes, b.peak_cpu_bytes);
    EXPECT_EQ(a.bottleneck, b.bottleneck);
  }
  EXPECT_EQ(s->done_units("space-b"), std::vector<int64_t>{5});
  EXPECT_TRUE(s->done_units("space-c").empty());
}

TEST_F(StoreTest, PredictionsAreReusedOnlyWhenEverythingTheyDependOnMatches) {
  const ConfigRegistry reg = testing::bundled();
  const ModelSpec m = reg.load_model("mixtral-8x7b");
  const ClusterSpec c = reg.load_cluster("dgx-h100");
  const Workload w = reg.load_workload("mixtral-8x7b-pretrain");
  const Plan p = reg.load_plan("mixtral-8x7b-megatron");
  auto s = Store::open(db());
  StoreCache cache(*s, m, w);
  const CostProfile prof = default_cost_profile(c);
  EXPECT_FALSE(cache.find(p, c, prof));
  PredictionSummary sum;
  sum.fidelity = "simulate";
  sum.step_time_s = 2.5;
  sum.tokens_per_s = 4e5;
  sum.peak.gpu = 5e10;
  sum.time.compute_s = 2;
  sum.bottleneck = "compute";
  cache.put(p, c, prof, sum);
  const auto hit = cache.find(p, c, prof);
  ASSERT_TRUE(hit);
  EXPECT_EQ(hit->tokens_per_s, 4e5);
  EXPECT_EQ(hit->time.compute_s, 2);

  Plan other = p;
  other.micro_batch_size = 2;
  EXPECT_FALSE(cache.find(other, c, prof));
  CostProfile calibrated = prof;
  calibrated.host_issue_s *= 2;
  EXPECT_FALSE(cache.find(p, c, calibrated));
  EXPECT_FALSE(cache.find(p, with_nodes(c, 2), prof));
  Workload w2 = w;
  w2.global_batch_size *= 2;
  StoreCache other_workload(*s, m, w2);
  EXPECT_FALSE(other_workload.find(p, c, prof));
}

TEST_F(StoreTest, ForeignKeysAreEnforced) {
  auto s = Store::open(db());
  PredictionSummary sum;
  sum.fidelity = "simulate";
  EXPECT_THROW(s->put_prediction("no-model", "no-cluster", "no-workload", "no-plan", "p", sum),
               std::runtime_error);
}

TEST_F(StoreTest, SearchesRecordProgressAndResumeTheNewestInterruptedOne) {
  auto s = Store::open(db());
  const Json args_a = {{"model", "a"}}, args_b = {{"model", "b"}};
  const int64_t a = s->begin_search(args_a, "ka", 10, 100);
  const int64_t b = s->begin_search(args_b, "kb", 20, 200);
  s->set_progress(a, 4);
  EXPECT_EQ(s->find_interrupted(Json())->id, b);
  EXPECT_EQ(s->find_interrupted(args_a)->id, a);
  EXPECT_EQ(s->find_interrupted(args_a)->units_done, 4);
  s->finish_search(a, "done", {{"best", 1}});
  EXPECT_FALSE(s->find_interrupted(args_a));
  EXPECT_EQ(s->find_search(a)->result["best"], 1);
}

TEST_F(StoreTest, TwoWritersOnOneFileBothSucceed) {
  { Store::open(db()); }
  auto writer = [this](const std::string& key) {
    auto s = Store::open(db());
    for (int i = 0; i < 60; ++i) s->put_units(key, {sample_unit(i)});
  };
  std::thread t1(writer, "one"), t2(writer, "two");
  t1.join();
  t2.join();
  auto s = Store::open(db());
  EXPECT_EQ(s->done_units("one").size(), 60u);
  EXPECT_EQ(s->done_units("two").size(), 60u);
}

}  // namespace
}  // namespace switchyard
