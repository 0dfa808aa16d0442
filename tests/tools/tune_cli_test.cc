// `switchyard tune` and `plans` as a user meets them: a search killed with SIGKILL resumes and ends
// where an uninterrupted one does, a repeated search comes from the store, two searches share one
// file, exported plans simulate, and bad input (names, constraints, files) exits 2.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "core/json_io.h"
#include "tests/tools/shell.h"

namespace switchyard {
namespace {

using Result = testing::ShellResult;
using testing::sh;

const std::string kCli = SWITCHYARD_CLI;
// A small space: tiny-moe on one 8-GPU node.
const std::string kTiny =
    " tune --model tiny-moe --cluster dgx-h100 --nodes 1 --workload tiny-train";

class TuneCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("switchyard_tune_cli_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  static Json json_of(const Result& r) {
    const size_t brace = r.output.find('{');
    EXPECT_NE(brace, std::string::npos) << r.output;
    return Json::parse(r.output.substr(brace == std::string::npos ? 0 : brace));
  }
  static void expect_same_ranking(const Json& a, const Json& b) {
    ASSERT_EQ(a["top"].size(), b["top"].size());
    for (size_t i = 0; i < a["top"].size(); ++i) {
      EXPECT_EQ(a["top"][i]["plan_hash"], b["top"][i]["plan_hash"]) << i;
      EXPECT_EQ(a["top"][i]["simulate"]["tokens_per_s"], b["top"][i]["simulate"]["tokens_per_s"]);
    }
    EXPECT_EQ(a["evaluated"], b["evaluated"]);
    EXPECT_EQ(a["pruned"], b["pruned"]);
    EXPECT_EQ(a["pareto"].size(), b["pareto"].size());
  }
  std::filesystem::path dir_;
};

TEST_F(TuneCliTest, KilledSearchResumesWithoutLosingWorkAndEndsAsAnUninterruptedOne) {
  const Result whole = sh(kCli + kTiny + " --json --db " + path("whole.db"));
  ASSERT_EQ(whole.exit_code, 0) << whole.output;

  // SIGKILL right after the first units are committed.
  const Result killed = sh("SWITCHYARD_TEST_KILL_AFTER_UNITS=1 " + kCli + kTiny + " --json --db " +
                           path("killed.db") + "; echo status=$?");
  ASSERT_NE(killed.output.find("status=137"), std::string::npos) << killed.output;
  const Result listed = sh(kCli + " plans list --db " + path("killed.db"));
  EXPECT_NE(listed.output.find("running"), std::string::npos) << listed.output;

  const Result resumed = sh(kCli + " tune --resume --json --db " + path("killed.db"));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  const Json a = json_of(whole), b = json_of(resumed);
  EXPECT_GT(b["reused_units"].get<int64_t>(), 0) << "the committed units were evaluated again";
  EXPECT_LT(b["reused_units"].get<int64_t>(), b["units"].get<int64_t>());
  EXPECT_EQ(b["search_id"], 1) << "resume continues the interrupted search";
  expect_same_ranking(a, b);
  EXPECT_EQ(sh(kCli + " tune --resume --db " + path("killed.db")).exit_code, 2)
      << "nothing left to resume";
}

TEST_F(TuneCliTest, RepeatedSearchComesFromTheStore) {
  const Result first = sh(kCli + kTiny + " --json --db " + path("s.db"));
  const Result second = sh(kCli + kTiny + " --json --db " + path("s.db"));
  ASSERT_EQ(second.exit_code, 0) << second.output;
  const Json a = json_of(first), b = json_of(second);
  EXPECT_EQ(a["reused_units"], 0);
  EXPECT_EQ(b["reused_units"], b["units"]);
  EXPECT_EQ(b["fresh_evaluated"], 0);
  for (const auto& t : b["top"]) EXPECT_TRUE(t["simulate_cached"].get<bool>());
  expect_same_ranking(a, b);
  // Another workload is another space: nothing reused.
  const Result other = sh(kCli +
                          " tune --model tiny-moe --cluster dgx-h100 --nodes 1 --workload "
                          "zipf-skewed --json --db " +
                          path("s.db"));
  ASSERT_EQ(other.exit_code, 0) << other.output;
  EXPECT_EQ(json_of(other)["reused_units"], 0);
}

TEST_F(TuneCliTest, TwoSearchesWriteOneDatabaseAtOnce) {
  const std::string db = path("shared.db");
  const Result r =
      sh("(" + kCli + kTiny + " --quiet --db " + db + " >/dev/null; echo a=$?) & (" + kCli +
         " tune --model tiny-moe --cluster dgx-h100 --nodes 1 --workload "
         "zipf-skewed --quiet --db " +
         db + " >/dev/null; echo b=$?) & wait");
  EXPECT_NE(r.output.find("a=0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("b=0"), std::string::npos) << r.output;
  const Result listed = sh(kCli + " plans list --db " + db);
  EXPECT_NE(listed.output.find("2 searches"), std::string::npos) << listed.output;
  EXPECT_EQ(listed.output.find("running"), std::string::npos) << listed.output;
}

TEST_F(TuneCliTest, ExportedWinnerSimulatesToItsStoredPrediction) {
  const Result t = sh(kCli + kTiny + " --json --db " + path("s.db"));
  ASSERT_EQ(t.exit_code, 0) << t.output;
  const double stored = json_of(t)["top"][0]["simulate"]["tokens_per_s"].get<double>();
  const Result e =
      sh(kCli + " plans export 1:1 --db " + path("s.db") + " --out " + path("plan.json"));
  ASSERT_EQ(e.exit_code, 0) << e.output;
  const Result sim = sh(kCli + " simulate --plan " + path("plan.json") + " --json 2>&1");
  ASSERT_EQ(sim.exit_code, 0) << sim.output;
  EXPECT_DOUBLE_EQ(json_of(sim)["tokens_per_s"].get<double>(), stored);

  const Result show = sh(kCli + " plans best --db " + path("s.db"));
  EXPECT_EQ(show.exit_code, 0);
  EXPECT_NE(show.output.find(json_of(t)["top"][0]["plan_hash"].get<std::string>()),
            std::string::npos);
  const Result diff = sh(kCli + " plans diff 1:1 1:2 --db " + path("s.db"));
  EXPECT_EQ(diff.exit_code, 0);
  EXPECT_NE(diff.output.find("predicted consequences"), std::string::npos) << diff.output;
  EXPECT_NE(diff.output.find("->"), std::string::npos) << diff.output;
}

TEST_F(TuneCliTest, UnderMpiexecRanksSplitTheSpaceAndRankZeroGivesTheSameAnswer) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  const std::string env =
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
      "OMPI_MCA_rmaps_base_oversubscribe=1 ";
  const Result one = sh(kCli + kTiny + " --json --db " + path("one.db"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  for (int ranks : {2, 3}) {
    const std::string db = path("mpi" + std::to_string(ranks) + ".db");
    const Result many = sh(env + "timeout 300 " + SWITCHYARD_MPIEXEC + " -n " +
                           std::to_string(ranks) + " " + kCli + kTiny + " --json --db " + db);
    ASSERT_EQ(many.exit_code, 0) << many.output;
    expect_same_ranking(json_of(one), json_of(many));
    // Every unit reached rank 0's store exactly once.
    const Result listed = sh(kCli + " plans list --db " + db);
    EXPECT_NE(listed.output.find("576/576"), std::string::npos) << listed.output;
  }
  // Bad input ends every rank with exit code 2, no hang.
  const Result bad =
      sh(env + SWITCHYARD_MPIEXEC + " -n 2 " + kCli +
         " tune --model no-such-model --cluster dgx-h100 --db " + path("x.db") + " 2>&1");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("no-such-model"), std::string::npos) << bad.output;
#endif
}

TEST_F(TuneCliTest, BadInputIsAClearErrorWithExitCode2) {
  const auto expect_2 = [](const Result& r, const char* needle) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << r.output;
  };
  expect_2(
      sh(kCli + " tune --model no-such-model --cluster dgx-h100 --db " + path("a.db") + " 2>&1"),
      "no-such-model");
  expect_2(sh(kCli + kTiny + " --max-mem-gib 0.5 --db " + path("a.db") + " 2>&1"),
           "no plan meets the constraints");
  expect_2(
      sh(kCli + " tune --model tiny-moe --cluster dgx-h100 --workload tiny-train --gpus 12 --db " +
         path("a.db") + " 2>&1"),
      "neither part of one node nor whole nodes");
  expect_2(sh(kCli + kTiny + " --capacity-factors 1.0,1.0 --db " + path("a.db") + " 2>&1"),
           "same choice twice");
  expect_2(sh(kCli + " tune --resume --objective memory --db " + path("a.db") + " 2>&1"),
           "--resume");
  expect_2(sh(kCli + " tune --model tiny-moe --cluster dgx-h100 --workload inference-decode --db " +
              path("a.db") + " 2>&1"),
           "inference");
  expect_2(sh(kCli + kTiny + " --no-such-flag --db " + path("a.db") + " 2>&1"), "no-such-flag");

  std::ofstream(path("notes.db")) << "not a database\n";
  expect_2(sh(kCli + kTiny + " --db " + path("notes.db") + " 2>&1"), "not an SQLite database");
  sqlite3* h = nullptr;
  ASSERT_EQ(sqlite3_open(path("foreign.db").c_str(), &h), SQLITE_OK);
  sqlite3_exec(h, "CREATE TABLE t(x)", nullptr, nullptr, nullptr);
  sqlite3_close(h);
  expect_2(sh(kCli + kTiny + " --db " + path("foreign.db") + " 2>&1"), "another application");
  ASSERT_EQ(sh(kCli + kTiny + " --quiet --db " + path("ok.db")).exit_code, 0);
  std::filesystem::resize_file(path("ok.db"), std::filesystem::file_size(path("ok.db")) / 3);
  expect_2(sh(kCli + " plans list --db " + path("ok.db") + " 2>&1"), "damaged");
  expect_2(sh(kCli + " plans list --db " + path("missing.db") + " 2>&1"), "no plan store");
  ASSERT_EQ(sh(kCli + kTiny + " --quiet --db " + path("b.db")).exit_code, 0);
  expect_2(sh(kCli + " plans show 9:1 --db " + path("b.db") + " 2>&1"), "no search 9");
  expect_2(sh(kCli + " plans show 1x:2 --db " + path("b.db") + " 2>&1"), "not SEARCH:RANK");
  expect_2(sh(kCli + " plans show 1 --db " + path("b.db") + " 2>&1"), "at least 6 hex digits");
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

// `switchyard run` under mpiexec: the CPU runner's numerics check, the stored measurement, and the
// ways a distributed run must end (a stuck rank, a dead rank, a plan it cannot run).
class RunCliTest : public TuneCliTest {};

#ifdef SWITCHYARD_MPIEXEC
const std::string kMpi =
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
    "OMPI_MCA_rmaps_base_oversubscribe=1 timeout 300 " +
    std::string(SWITCHYARD_MPIEXEC) + " -n 4 ";

// Op by op, `run --json`'s program ops: every op the simulator times was measured and the runner
// ran nothing the program lacks (the CPU cross-entropy writes its gradient in the forward call, so
// the program's backward loss has no measurement). Returns the ops both sides have.
std::set<std::string> expect_program_and_run_agree(const Json& run) {
  std::set<std::string> both;
  for (const auto& o : run["program_ops"]) {
    const std::string key = o["phase"].get<std::string>() + " " + o["op"].get<std::string>();
    if (key == "backward loss") continue;
    EXPECT_FALSE(o["predicted_s"].is_null()) << key << " measured, not in the program";
    EXPECT_FALSE(o["measured_s"].is_null()) << key << " in the program, not measured";
    both.insert(key);
  }
  return both;
}
#endif

TEST_F(RunCliTest, FourRanksMatchTheReferenceAndTheMeasurementIsStored) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  const Result r = sh(kMpi + kCli + " run --plan tiny-moe-dp4-ep2 --steps 2 --warmup 1 --check " +
                      "--json --db " + path("run.db") + " --trace " + path("measured.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = json_of(r);
  EXPECT_TRUE(j["check"]["passed"].get<bool>());
  EXPECT_LE(j["check"]["max_parameter_relative_error"].get<double>(), 1e-4);
  EXPECT_GT(j["median_step_time_s"].get<double>(), 0);
  EXPECT_GT(j["predicted_step_time_s"].get<double>(), 0);
  // Predicted against measured per op class.
  for (const char* cls : {"matmul", "attention", "memory-bound kernels"}) {
    EXPECT_GT(j["op_classes"][cls]["predicted_s"].get<double>(), 0) << cls;
    EXPECT_GT(j["op_classes"][cls]["measured_s"].get<double>(), 0) << cls;
  }
  // tiny-train: 8 sequences of 128 tokens, top-2, over 4 MoE layers and 2 measured steps.
  int64_t routed = 0;
  for (const auto& t : j["tokens_per_expert"]) routed += t.get<int64_t>();
  EXPECT_EQ(routed, 8 * 128 * 2 * 4 * 2);
  const Result listed = sh(kCli + " plans list --db " + path("run.db"));
  EXPECT_NE(listed.output.find("1 measurements"), std::string::npos) << listed.output;
  // The measured timeline: the simulator's trace format, one process per rank, ops on both streams.
  std::ifstream trace_file(path("measured.json"));
  const Json trace = Json::parse(trace_file);
  EXPECT_EQ(trace["switchyard"]["kind"], "measurement");
  std::set<int> pids;
  std::set<std::string> ops;
  for (const auto& e : trace["traceEvents"])
    if (e["ph"] == "X") {
      pids.insert(e["pid"].get<int>());
      ops.insert(e["name"].get<std::string>());
      EXPECT_GE(e["dur"].get<double>(), 0.0);
    }
  EXPECT_EQ(pids, (std::set<int>{0, 1, 2, 3}));
  for (const char* op : {"gemm", "expert_gemm", "attention", "all_to_allv", "reduce_scatter"})
    EXPECT_TRUE(ops.count(op)) << op;
  // The StepProgram's ops on their own track, named as the simulator names them.
  std::set<std::string> program;
  for (const auto& e : trace["traceEvents"])
    if (e["ph"] == "X" && e["tid"] == 2)
      program.insert(e["cat"].get<std::string>() + " " + e["name"].get<std::string>());
  for (const char* op :
       {"forward qkv", "forward dispatch", "forward experts_fc1", "backward combine",
        "backward experts_fc2", "backward dp_grad_bucket", "step optimizer"})
    EXPECT_TRUE(program.count(op)) << op;
  // Op by op (ZeRO-1 on dp 4 x ep 2: the dense gradients' reduce-scatter and the gathers).
  const std::set<std::string> both = expect_program_and_run_agree(j);
  EXPECT_TRUE(both.count("forward experts_fc1"));
  EXPECT_TRUE(both.count("step dp_param_all_gather"));
  const Result compared = sh(kCli + " compare --json --db " + path("run.db"));
  ASSERT_EQ(compared.exit_code, 0) << compared.output;
  const Json rows = Json::parse(compared.output);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_NEAR(rows[0]["measured_step_s"].get<double>(), j["median_step_time_s"].get<double>(),
              1e-12);
  EXPECT_NEAR(rows[0]["predicted_step_s"].get<double>(), j["predicted_step_time_s"].get<double>(),
              1e-12);
  EXPECT_EQ(rows[0]["op_classes"], j["op_classes"]);
  EXPECT_EQ(rows[0]["program_ops"], j["program_ops"]);
  // One run op by op.
  const Result one = sh(kCli + " compare --run " + std::to_string(j["measurement_id"].get<int>()) +
                        " --db " + path("run.db"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  EXPECT_NE(one.output.find("per step-program op"), std::string::npos) << one.output;
  EXPECT_NE(one.output.find("backward experts_fc1"), std::string::npos) << one.output;
  EXPECT_EQ(sh(kCli + " compare --run 99 --db " + path("run.db") + " 2>&1").exit_code, 2);
#endif
}

TEST_F(RunCliTest, AStuckRankEndsTheRunWithinTheTimeout) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  const Result r = sh(kMpi + "-x SWITCHYARD_TEST_HANG_RANK=3 " + kCli +
                      " run --plan tiny-moe-dp4-ep2 --steps 2 --no-db --timeout 3 2>&1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.exit_code, 124) << "the run hung until the test's own timeout";
  EXPECT_NE(r.output.find("did not complete within 3 s"), std::string::npos) << r.output;
#endif
}

TEST_F(RunCliTest, ADeadRankEndsTheRunNamingIt) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  const Result r = sh(kMpi + "-x SWITCHYARD_TEST_DIE_RANK=2 " + kCli +
                      " run --plan tiny-moe-dp4-ep2 --steps 2 --no-db --timeout 30 2>&1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.exit_code, 124) << "the run hung until the test's own timeout";
  // mpiexec names the process that exited ("Process name: [[job,1],2]").
  EXPECT_TRUE(r.output.find(",2]") != std::string::npos ||
              r.output.find("rank 2") != std::string::npos)
      << r.output;
#endif
}

TEST_F(RunCliTest, HierarchicalStorageTrainsAsOnTheDeviceAndItsCopiesAreMeasured) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  // tiny-moe-offload: dense parameters, gradients and Adam's states in host memory, experts on
  // SSD, one layer fetched ahead down the levels.
  const Result r = sh(kMpi + kCli + " run --plan tiny-moe-offload --steps 1 --warmup 1 --check " +
                      "--json --no-db --trace " + path("offload.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json out = json_of(r);
  EXPECT_TRUE(out["check"]["passed"].get<bool>()) << out["check"].dump();
  const std::set<std::string> ops = expect_program_and_run_agree(out);
  for (const char* op : {"forward param_fetch", "forward param_ssd_read", "backward param_fetch",
                         "backward param_ssd_read", "backward grad_offload", "step optimizer"})
    EXPECT_TRUE(ops.count(op)) << op;
  EXPECT_GT(out["tiers"]["copy_s"]["measured"].get<double>(), 0);
  EXPECT_GT(out["tiers"]["copy_s"]["predicted"].get<double>(), 0);
  // Host memory and SSD files hold what the device does not.
  EXPECT_GT(out["peak_bytes"]["cpu"].get<double>(), 0);
  EXPECT_GT(out["peak_bytes"]["ssd"].get<double>(), 0);
  std::ifstream in(path("offload.json"));
  const Json trace = Json::parse(in);
  int fetches = 0, reads = 0;
  for (const auto& e : trace["traceEvents"]) {
    if (e.value("tid", -1) != 3) continue;
    fetches += e.value("name", "") == "param_fetch";
    reads += e.value("name", "") == "param_ssd_read";
  }
  // Per rank and micro-batch (2 each), one copy per space a unit has: forward the embedding, 4
  // layers (dense and expert parts) and the head, backward the 4 layers again.
  EXPECT_EQ(fetches, 4 * 2 * ((1 + 4 + 1 + 4) + (4 + 4)));
  EXPECT_EQ(reads, 4 * 2 * (4 + 4));  // the experts' parts, read from SSD first
#endif
}

// The delayed update on 4 ranks: the host's Adam runs beside the next step; the run matches the
// one-process reference that delays its updates alike.
TEST_F(RunCliTest, TheDelayedUpdateMatchesTheReferenceThatDelaysAlike) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  Json plan;
  {
    std::ifstream in(std::string(SWITCHYARD_CONFIG_DIR) + "/plans/tiny-moe-offload.json");
    plan = Json::parse(in);
  }
  plan["name"] = "tiny-moe-offload-delayed";
  plan["delayed_update"] = true;
  {
    std::ofstream out(path("delayed.json"));
    out << plan.dump(2);
  }
  const Result r = sh(kMpi + kCli + " run --plan " + path("delayed.json") +
                      " --steps 2 --warmup 1 --check --json --no-db --trace " +
                      path("delayed_trace.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json out = json_of(r);
  EXPECT_TRUE(out["check"]["passed"].get<bool>()) << out["check"].dump();
  EXPECT_TRUE(expect_program_and_run_agree(out).count("step optimizer"));
  // The host's Adam has its own track: per rank, step and space (dense, experts), one update.
  std::ifstream in(path("delayed_trace.json"));
  const Json trace = Json::parse(in);
  int updates = 0;
  for (const auto& e : trace["traceEvents"]) {
    if (e.value("ph", "") != "X") continue;
    EXPECT_GE(e["ts"].get<double>(), 0);
    if (e.value("tid", -1) == 4) {
      EXPECT_EQ(e.value("name", ""), "optimizer");
      EXPECT_GT(e["dur"].get<double>(), 0);
      ++updates;
    }
  }
  EXPECT_EQ(updates, 4 * 2 * 2);
#endif
}

TEST_F(RunCliTest, PlansItCannotRunAreRefusedWithTheirPaths) {
  const std::string plan = path("tp.json");
  std::ofstream(plan) << R"({"schema_version": 1, "name": "tp", "dp": 2, "tp": 2, "ep": 2,
                           "sequence_parallel": true, "zero_stage": 2, "for": {"model": "tiny-moe",
                           "cluster": "local-cpu", "workload": "tiny-train"}})";
  const Result r = sh(kCli + " run --plan " + plan + " --no-db 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("plan.zero_stage: the CPU runner does not run this yet"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("mpirun -n 4"), std::string::npos) << r.output;
}

TEST_F(RunCliTest, TheCudaBackendRunsOrSaysWhyItCannot) {
  const Result bad = sh(kCli + " run --plan tiny-moe-1gpu --backend tpu --no-db 2>&1");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("--backend"), std::string::npos) << bad.output;
  // Built without CUDA: a bad flag value (2); no GPU here: the driver's reason (1); a GPU: the run,
  // checked against the CPU reference.
  const Result r =
      sh(kCli + " run --plan tiny-moe-1gpu --backend cuda --steps 1 --check --no-db 2>&1");
  if (r.exit_code == 2) {
    EXPECT_NE(r.output.find("this build has no CUDA backend"), std::string::npos) << r.output;
  } else if (r.exit_code == 1) {
    EXPECT_NE(r.output.find("--backend cuda: no CUDA device ("), std::string::npos) << r.output;
  } else {
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("cuda backend"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("check            passed"), std::string::npos) << r.output;
  }
}

TEST_F(RunCliTest, APipelinePlanMatchesTheReference) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  // The bundled tiny-moe-local: dp 2 x pp 2 (1F1B), ep 2, ZeRO-1; and tiny-moe-interleaved, the
  // same with 2 model chunks per stage (interleaved 1F1B).
  for (const char* plan : {"tiny-moe-local", "tiny-moe-interleaved"}) {
    SCOPED_TRACE(plan);
    const Result r =
        sh(kMpi + kCli + " run --plan " + plan + " --steps 1 --warmup 1 --check --json --no-db");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const Json j = json_of(r);
    EXPECT_TRUE(j["check"]["passed"].get<bool>());
    EXPECT_GT(j["op_classes"]["pipeline (bubble and p2p)"]["measured_s"].get<double>(), 0);
  }
#endif
}

TEST_F(RunCliTest, SequenceParallelTensorParallelismWithAllToAllMatchesTheReference) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  // The bundled tiny-moe-tp-sp: dp 2 x tp 2 with sequence parallelism, ep 2 over the TP pairs.
  const Result r =
      sh(kMpi + kCli + " run --plan tiny-moe-tp-sp --steps 1 --warmup 1 --check --json --no-db");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = json_of(r);
  EXPECT_TRUE(j["check"]["passed"].get<bool>()) << j["check"].dump();
  // Op by op, vocab-parallel embedding and loss included; sequence parallelism's collectives ran
  // where the program has them.
  const std::set<std::string> measured = expect_program_and_run_agree(j);
  for (const char* op :
       {"forward tp_all_gather", "forward tp_reduce_scatter", "backward tp_all_gather",
        "backward tp_reduce_scatter", "forward dispatch", "backward combine",
        "forward embedding_reduce_scatter", "forward loss_all_reduce"})
    EXPECT_TRUE(measured.count(op)) << op;
#endif
}

TEST_F(RunCliTest, PipelineMoEsDispatchRunsAsTensorParallelismAndMatchesTheReference) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  // The bundled tiny-moe-ppmoe: dp 2 x tp 2, the experts over each TP pair, ZeRO-1.
  const Result r = sh(kMpi + kCli + " run --plan tiny-moe-ppmoe --steps 1 --warmup 1 --check " +
                      "--json --no-db --trace " + path("ppmoe.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = json_of(r);
  EXPECT_TRUE(j["check"]["passed"].get<bool>()) << j["check"].dump();
  // What ran: Megatron's and PPMoE's all-reduces inside the TP pairs, and no all-to-all (the
  // dispatch is an index slice).
  std::ifstream trace_file(path("ppmoe.json"));
  const Json trace = Json::parse(trace_file);
  std::set<std::string> ops;
  for (const auto& e : trace["traceEvents"])
    if (e["ph"] == "X") ops.insert(e["name"].get<std::string>());
  EXPECT_TRUE(ops.count("all_reduce"));
  EXPECT_FALSE(ops.count("all_to_allv"));
#endif
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

// `switchyard run` of inference plans: the ring of sections streams every layer from host memory
// and generates what the all-resident model generates; the report holds the weight loads beside
// the simulator's prediction of the same plan, and the trace puts them on their own track.
class InferenceRunCliTest : public TuneCliTest {};

TEST_F(InferenceRunCliTest, ARingGeneratesWhatTheResidentModelGeneratesAndReportsItsCopies) {
  const Result r = sh(kCli + " run --plan tiny-moe-ring --steps 1 --warmup 0 --check " +
                      "--json --db " + path("run.db") + " --trace " + path("ring.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json out = json_of(r);
  EXPECT_EQ(out["mode"], "inference");
  EXPECT_TRUE(out["check"]["passed"].get<bool>()) << out["check"].dump();
  EXPECT_TRUE(out["check"]["generated_tokens_identical"].get<bool>());
  // tiny-moe's 4 layers in 4 sections: one layer loads ahead of the one computing.
  EXPECT_EQ(out["ring"]["layers_ahead"], 1);
  EXPECT_EQ(out["ring"]["sections"], 4);
  // Every layer sits in host memory; the device holds two layer slots, not the model.
  EXPECT_GT(out["peak_bytes"]["cpu"].get<double>(), out["ring"]["slot_bytes"].get<double>());
  EXPECT_GT(out["weight_copy_s"]["measured"].get<double>(), 0);
  EXPECT_GT(out["weight_copy_s"]["predicted"].get<double>(), 0);
  // The program's ops were measured, pass by pass: its weight loads included.
  std::set<std::string> measured;
  for (const auto& o : out["program_ops"]) {
    const std::string key = o["pass"].get<std::string>() + " " + o["op"].get<std::string>();
    EXPECT_FALSE(o["predicted_s"].is_null()) << key << " measured, not in the program";
    EXPECT_FALSE(o["measured_s"].is_null()) << key << " in the program, not measured";
    measured.insert(key);
  }
  for (const char* key : {"prefill param_fetch", "decode step param_fetch", "prefill experts_fc1",
                          "decode step attn_core", "decode step sample"})
    EXPECT_TRUE(measured.count(key)) << key;
  // Decoding 16 tokens for 4 sequences: the whole batch's routed rows, every pass.
  int64_t routed = 0;
  for (const auto& t : out["tokens_per_expert"]) routed += t.get<int64_t>();
  EXPECT_EQ(routed, 4 /*layers*/ * 2 /*top-k*/ * 4 * (64 + 16));
  // The weight loads on the trace's copy track.
  std::ifstream in(path("ring.json"));
  const Json trace = Json::parse(in);
  int loads = 0;
  for (const auto& e : trace["traceEvents"])
    if (e.value("name", "") == "param_fetch" && e.value("tid", -1) == 3) ++loads;
  EXPECT_EQ(loads, 4 * (1 + 16));  // every layer, every pass
  // The measurement is stored beside its prediction.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path("run.db").c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT count(*) FROM measurements", -1, &st, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(st, 0), 1);
  sqlite3_finalize(st);
  sqlite3_close(db);
  // compare shows it pass by pass, with its copies and stalls.
  const Result cmp = sh(kCli + " compare --db " + path("run.db") + " --run 1");
  ASSERT_EQ(cmp.exit_code, 0) << cmp.output;
  for (const char* line : {"prefill", "decode step", "copies", "stalls", "copy time hidden",
                           "decode step param_fetch"})
    EXPECT_NE(cmp.output.find(line), std::string::npos) << line << "\n" << cmp.output;
}

TEST_F(InferenceRunCliTest, TheNaiveRingHidesNoCopyTimeInThePrediction) {
  // The same ring without prefetching: each layer loads, then computes.
  const std::string plan = path("naive.json");
  std::ofstream(plan) << R"({"schema_version": 1, "name": "naive", "ring_sections": 4,
                            "for": {"model": "tiny-moe", "cluster": "local-cpu-ring",
                                    "workload": "tiny-inference"}})";
  const Result naive =
      sh(kCli + " run --plan " + plan + " --steps 1 --warmup 0 " + "--check --json --no-db");
  ASSERT_EQ(naive.exit_code, 0) << naive.output;
  const Json n = json_of(naive);
  EXPECT_EQ(n["ring"]["layers_ahead"], 0);
  EXPECT_TRUE(n["check"]["passed"].get<bool>());
  EXPECT_NEAR(n["copy_hidden_fraction"]["predicted"].get<double>(), 0.0, 1e-9);
  EXPECT_NEAR(n["stall_s"]["predicted"].get<double>(),
              n["weight_copy_s"]["predicted"].get<double>(),
              1e-9 * n["weight_copy_s"]["predicted"].get<double>() + 1e-12);
  const Result ring = sh(kCli + " run --plan tiny-moe-ring --steps 1 --warmup 0 --json --no-db");
  ASSERT_EQ(ring.exit_code, 0) << ring.output;
  const Json a = json_of(ring);
  EXPECT_GT(a["copy_hidden_fraction"]["predicted"].get<double>(), 0.3);
  EXPECT_LT(a["latency_s"]["predicted"].get<double>(), n["latency_s"]["predicted"].get<double>());
}

TEST_F(InferenceRunCliTest, DataParallelReplicasServeTheirShareOfTheRequests) {
#ifndef SWITCHYARD_MPIEXEC
  GTEST_SKIP() << "built without MPI";
#else
  // Two replicas of tiny-moe, each serving 2 of the 4 prompts as a ring.
  const std::string plan = path("dp2.json");
  std::ofstream(plan) << R"({"schema_version": 1, "name": "dp2", "dp": 2, "ring_sections": 2,
                            "prefetch": {"depth": 1, "direction": "ahead"},
                            "for": {"model": "tiny-moe", "cluster": "local-cpu",
                                    "workload": "tiny-inference"}})";
  const Result r = sh("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 " +
                      std::string(SWITCHYARD_MPIEXEC) + " -n 2 " + kCli + " run --plan " + plan +
                      " --gpus 2 --steps 1 --warmup 0 --check --json --no-db");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json out = json_of(r);
  EXPECT_EQ(out["ranks"], 2);
  EXPECT_TRUE(out["check"]["passed"].get<bool>()) << out["check"].dump();
  EXPECT_EQ(out["ring"]["layers_ahead"], 2);  // 4 layers in 2 sections
  // Every request was served once: the replicas' routed rows add up to the whole batch's.
  int64_t routed = 0;
  for (const auto& t : out["tokens_per_expert"]) routed += t.get<int64_t>();
  EXPECT_EQ(routed, 4 /*layers*/ * 2 /*top-k*/ * 4 * (64 + 16));
#endif
}

TEST_F(InferenceRunCliTest, InferencePlansItCannotRunAreRefusedWithTheirPaths) {
  const std::string plan = path("ep.json");
  std::ofstream(plan) << R"({"schema_version": 1, "name": "ep", "dp": 2, "ep": 2,
                            "for": {"model": "tiny-moe", "cluster": "local-cpu",
                                    "workload": "tiny-inference"}})";
  const Result r = sh(kCli + " run --plan " + plan + " --gpus 2 --no-db 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("plan: the CPU runner does not run this yet: inference runs"),
            std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace switchyard
