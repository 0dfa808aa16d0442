// The CLI as a user meets it: bundled names resolve, good plans print "ok", broken ones exit 2 and
// name every JSON path, unknown flags are refused.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "tests/core/test_util.h"
#include "tests/tools/shell.h"
#include "tools/cli_common.h"

namespace switchyard {
namespace {

using Result = testing::ShellResult;

// The CLI with `args`, stdout and stderr together.
Result run(const std::string& args) {
  return testing::sh(std::string(SWITCHYARD_CLI) + " " + args + " 2>&1");
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("switchyard_cli_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    const auto path = dir_ / name;
    std::ofstream(path) << text;
    return path.string();
  }
  std::filesystem::path dir_;
};

TEST_F(CliTest, HelpListsSubcommands) {
  const Result r = run("--help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* sub : {"validate", "info", "list", "collective"})
    EXPECT_NE(r.output.find(sub), std::string::npos) << sub << "\n" << r.output;
}

TEST_F(CliTest, EveryBundledPlanValidates) {
  const ConfigRegistry reg = testing::bundled();
  for (const auto& plan : reg.list(ConfigKind::kPlan)) {
    const Result r = run("validate --plan " + plan);
    EXPECT_EQ(r.exit_code, 0) << plan << "\n" << r.output;
    EXPECT_EQ(r.output.substr(0, 3), "ok\n") << plan << "\n" << r.output;
  }
}

TEST_F(CliTest, ExplicitFlagsOverrideThePlansTarget) {
  const Result r =
      run("validate --model mixtral-8x7b --cluster dgx-h100 --nodes 8 --plan mixtral-8x7b-megatron "
          "--workload mixtral-8x7b-pretrain");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("64x H100"), std::string::npos) << r.output;
  // The same plan on 4 nodes has the wrong GPU count.
  const Result bad = run("validate --plan mixtral-8x7b-megatron --nodes 4");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("plan: dp*tp*pp*cp = 16*1*4*1 = 64 but the cluster has 32 GPUs"),
            std::string::npos)
      << bad.output;
}

TEST_F(CliTest, BrokenPlansExitTwoAndNameEveryPath) {
  // Mixtral has 8 experts; the issue's example (ep 6 with 64 experts) is the Qwen-style 64-expert
  // model below.
  const std::string model =
      write("m64.json", R"({"schema_version": 1, "name": "m64", "num_layers": 16,
      "hidden_size": 1024, "ffn_hidden_size": 4096, "num_attention_heads": 16, "num_kv_heads": 8,
      "vocab_size": 32000, "seq_len": 4096,
      "moe": {"num_experts": 64, "top_k": 2, "expert_ffn_hidden_size": 1024}})");
  const std::string ep6 = write("ep6.json", R"({"schema_version": 1, "dp": 12, "pp": 4, "ep": 6})");
  Result r = run("validate --model " + model + " --cluster dgx-h100 --nodes 6 --plan " + ep6);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("plan.ep: 6 does not divide model.moe.num_experts 64"), std::string::npos)
      << r.output;

  const std::string product =
      write("product.json", R"({"schema_version": 1, "dp": 12, "pp": 4, "ep": 4})");
  r = run("validate --model " + model + " --cluster dgx-h100 --nodes 8 --plan " + product);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("plan: dp*tp*pp*cp = 12*1*4*1 = 48 but the cluster has 64 GPUs"),
            std::string::npos)
      << r.output;

  // An unknown key and a string where a number belongs: parse errors, both reported, with the file.
  const std::string typos =
      write("typos.json", R"({"schema_version": 1, "dp": "sixteen", "pp": 4, "ep": 8,
      "zero_stag": 1})");
  r = run("validate --model mixtral-8x7b --cluster dgx-h100 --nodes 8 --plan " + typos);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("plan.dp: expected an integer, got a string \"sixteen\""),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("plan.zero_stag: unknown key"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("typos.json"), std::string::npos) << r.output;
}

TEST_F(CliTest, JsonOutputForScripts) {
  const std::string bad = write("bad.json", R"({"schema_version": 1, "dp": 16, "pp": 4, "ep": 3})");
  const Result r =
      run("validate --plan " + bad + " --model mixtral-8x7b --cluster dgx-h100 --nodes 8 --json");
  EXPECT_EQ(r.exit_code, 2);
  const Json j = Json::parse(r.output);
  EXPECT_FALSE(j.at("ok").get<bool>());
  ASSERT_FALSE(j.at("issues").empty());
  EXPECT_EQ(j.at("issues")[0].at("path"), "plan.ep");
  EXPECT_EQ(j.at("plan_hash").get<std::string>().size(), 64u);
  // A file that does not parse is reported as JSON too.
  const std::string broken = write("broken.json", R"({"schema_version": 1, "dp": "x"})");
  const Result r2 =
      run("validate --plan " + broken + " --model mixtral-8x7b --cluster dgx-h100 --json");
  EXPECT_EQ(r2.exit_code, 2);
  const Json j2 = Json::parse(r2.output);
  EXPECT_EQ(j2.at("issues")[0].at("path"), "plan.dp");
  // A node count the cluster cannot take, from a plan's "for", is reported there, not as a flag.
  Json cluster = load_json_file(testing::bundled().resolve(ConfigKind::kCluster, "dgx-h100"));
  cluster["inter_node"]["nics_per_node"] = 0;
  cluster["inter_node"]["nic_bw_Bps"] = 0;
  const std::string island = write("island.json", cluster.dump());
  const std::string nodes = write("nodes.json", R"({"schema_version": 1, "dp": 16,
      "for": {"model": "llama3-8b", "cluster": ")" + island +
                                                    R"(", "nodes": 2, "workload": "tiny-train"}})");
  const Result r3 = run("validate --plan " + nodes);
  EXPECT_EQ(r3.exit_code, 2) << r3.output;
  EXPECT_NE(r3.output.find("plan.for.nodes: cluster \"dgx-h100\" has no NICs to join 2 nodes"),
            std::string::npos)
      << r3.output;
}

TEST_F(CliTest, BadInputsAreRefused) {
  Result r = run("validate --plan mixtral-8x7b-megatron --bogus-flag");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = run("validate --plan no-such-plan");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no bundled plans named \"no-such-plan\""), std::string::npos)
      << r.output;
  const std::string truncated = write("truncated.json", R"({"schema_version": 1, "dp": )");
  r = run("validate --model mixtral-8x7b --cluster dgx-h100 --plan " + truncated);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find(truncated + ": invalid JSON"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find(truncated + ": " + truncated), std::string::npos) << r.output;
  r = run("frobnicate");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

TEST_F(CliTest, InfoShowsDerivedCounts) {
  const Result r = run("info --model mixtral-8x7b --cluster dgx-h100 --nodes 2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("params total 46.703 B"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2 nodes x 8 H100"), std::string::npos) << r.output;
}

TEST_F(CliTest, CollectiveTable) {
  const Result r =
      run("collective --cluster dgx-a100 --nodes 2 --op all_reduce --min-bytes 1G --max-bytes 2G");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("1073741824"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2147483648"), std::string::npos) << r.output;
  EXPECT_EQ(run("collective --cluster dgx-a100 --op all_reduce --min-bytes lots").exit_code, 2);
  EXPECT_EQ(run("collective --cluster dgx-a100 --op all_reduce --max-bytes inf").exit_code, 2);
  EXPECT_EQ(
      run("collective --cluster dgx-a100 --op all_reduce --min-bytes 2G --max-bytes 1G").exit_code,
      2);
  EXPECT_EQ(run("collective --cluster dgx-a100 --op all_reduce --ranks-per-node -3").exit_code, 2);
}

TEST_F(CliTest, SimulatePrintsSummaryJsonAndTrace) {
  Result r = run("simulate --plan mixtral-8x7b-megatron");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* line :
       {"step time", "tokens/s", "MFU", "peak memory per GPU", "compute", "pipeline bubble"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;

  r = run("simulate --plan mixtral-8x7b-megatron --json --fidelity estimate");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const Json j = Json::parse(r.output);
  for (const char* key :
       {"step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu"})
    EXPECT_GT(j.at(key).get<double>(), 0) << key;
  for (const char* tier : {"gpu", "cpu", "ssd"})
    EXPECT_TRUE(j.at("memory").at("peak_bytes").contains(tier));
  EXPECT_TRUE(j.at("time_breakdown").contains("bubble_s"));
  EXPECT_TRUE(j.at("memory_breakdown").contains("activations"));
  EXPECT_EQ(j.at("fidelity"), "estimate");

  const std::string trace = (dir_ / "trace.json").string();
  r = run("simulate --plan mixtral-8x7b-megatron --trace " + trace);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const Json t = load_json_file(trace);
  ASSERT_TRUE(t.at("traceEvents").is_array());
  EXPECT_EQ(t.at("switchyard").at("plan_hash").get<std::string>().size(), 64u);
  int complete = 0, stages = 0, sends = 0;
  std::map<std::pair<int, int>, std::vector<std::pair<double, double>>> tracks;
  for (const auto& e : t.at("traceEvents")) {
    if (e.at("ph") == "X") {
      ++complete;
      EXPECT_GE(e.at("dur").get<double>(), 0);
      // The program op the event runs (the same template in every micro-batch).
      const std::string id = e.at("args").at("op_id").get<std::string>();
      EXPECT_EQ(id.rfind("s" + std::to_string(e.at("pid").get<int>()) + ".", 0), 0u) << id;
      if (e.at("name") == "p2p_send") {
        ++sends;
        EXPECT_GT(e.at("args").at("bytes").get<double>(), 0);  // the activation it carries
      }
      stages = std::max(stages, e.at("pid").get<int>() + 1);
      tracks[{e.at("pid").get<int>(), e.at("tid").get<int>()}].emplace_back(
          e.at("ts").get<double>(), e.at("dur").get<double>());
    }
  }
  EXPECT_GT(complete, 1000);
  EXPECT_GT(sends, 0);
  EXPECT_EQ(stages, 4);  // one process per pipeline stage
  // One track is one stream: its events follow one another exactly as written (no overlap from
  // rounding), so viewers nest them.
  for (auto& [track, events] : tracks) {
    std::sort(events.begin(), events.end());
    for (size_t i = 1; i < events.size(); ++i)
      ASSERT_GE(events[i].first, events[i - 1].first + events[i - 1].second - 1e-6)
          << "stage " << track.first << " stream " << track.second << " event " << i;
  }
}

// A calibration profile over the defaults changes the prediction: half the GEMM efficiency, slower.
TEST_F(CliTest, SimulateTakesACostProfile) {
  const Json base = Json::parse(run("simulate --plan llama3-70b-nemo --json").output);
  const std::string slow =
      write("slow.json", R"({"name": "half", "gemm_efficiency": [[16, 0.025], [4096, 0.4]]})");
  const Result r = run("simulate --plan llama3-70b-nemo --json --profile " + slow);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = Json::parse(r.output);
  EXPECT_EQ(j.at("profile"), "half");
  EXPECT_GT(j.at("step_time_s").get<double>(), 1.3 * base.at("step_time_s").get<double>());
  const std::string bad = write("bad_profile.json", R"({"gemm_efficiency": "fast"})");
  const Result b = run("simulate --plan llama3-70b-nemo --profile " + bad);
  EXPECT_EQ(b.exit_code, 2) << b.output;
  EXPECT_NE(b.output.find("profile.gemm_efficiency"), std::string::npos) << b.output;
  EXPECT_NE(b.output.find("bad_profile.json"), std::string::npos) << b.output;
}

TEST_F(CliTest, SimulateRefusesInvalidAndOversizedPlans) {
  Result r = run("simulate --plan mixtral-8x7b-megatron --nodes 4");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("plan: dp*tp*pp*cp"), std::string::npos) << r.output;
  // Mixtral-8x7B on one GPU of a node does not fit: the numbers are reported, nothing simulated.
  const std::string one = write("one.json", R"({"schema_version": 1, "dp": 8, "ep": 8,
      "for": {"model": "mixtral-8x7b", "cluster": "dgx-h100", "nodes": 1, "workload": "mixtral-8x7b-pretrain"}})");
  r = run("simulate --plan " + one);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("does not fit"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("GiB per GPU"), std::string::npos) << r.output;
  // validate calls it valid and says it does not fit, with the numbers (text and JSON).
  r = run("validate --plan " + one);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("note: plan: does not fit: stage 0 needs"), std::string::npos)
      << r.output;
  r = run("validate --json --plan " + one);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const Json j = Json::parse(r.output);
  EXPECT_TRUE(j.at("ok").get<bool>());
  ASSERT_TRUE(j.at("fits").is_array()) << r.output;
  EXPECT_EQ(j.at("fits").at(0).at("path"), "plan");
  EXPECT_TRUE(Json::parse(run("validate --json --plan mixtral-8x7b-megatron").output).at("fits") ==
              Json(true));
}

// Calibration and the runner divide a node's DRAM, SSD and cores among the ranks on that node:
// across nodes that is the launcher's local count (OpenMPI, MPICH, Slurm), not the job's size.
TEST(RanksOnThisNode, AreTheLaunchersLocalRanksElseAtMostANodesGpus) {
  const char* old = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  const std::string saved = old ? old : "";
  ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  ::unsetenv("MPI_LOCALNRANKS");
  ::unsetenv("SLURM_NTASKS_PER_NODE");
  EXPECT_EQ(cli::ranks_on_this_node(4), 4);
  EXPECT_EQ(cli::ranks_on_this_node(16, 8), 8);  // no launcher word: at most a node's GPUs
  EXPECT_EQ(cli::ranks_on_this_node(0), 1);
  ::setenv("MPI_LOCALNRANKS", "3", 1);  // MPICH
  EXPECT_EQ(cli::ranks_on_this_node(12, 8), 3);
  ::unsetenv("MPI_LOCALNRANKS");
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2", 1);  // 4 ranks over 2 nodes
  EXPECT_EQ(cli::ranks_on_this_node(4), 2);
  EXPECT_EQ(cli::host_threads_per_rank("cpu", cli::ranks_on_this_node(4)), 1);
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "junk", 1);
  EXPECT_EQ(cli::ranks_on_this_node(4), 4);
  if (old)
    ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", saved.c_str(), 1);
  else
    ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
}

}  // namespace
}  // namespace switchyard
