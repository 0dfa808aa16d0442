#include "core/workload.h"

#include <gtest/gtest.h>

#include <numeric>

#include "core/expert_load.h"
#include "tests/core/test_util.h"

namespace switchyard {
namespace {

double sum(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); }

TEST(ExpertLoad, UniformSpreadsEvenly) {
  auto f = expert_load_fractions(Routing{}, 4, 2);
  ASSERT_EQ(f.size(), 4u);
  for (double x : f) EXPECT_DOUBLE_EQ(x, 0.25);
}

TEST(ExpertLoad, ZipfByHand) {
  Routing r{RoutingKind::kZipf, 1.0, {}, {}};
  // Weights 1, 1/2, 1/3, 1/4 sum to 25/12.
  auto f = expert_load_fractions(r, 4, 1);
  EXPECT_NEAR(f[0], 12.0 / 25, 1e-12);
  EXPECT_NEAR(f[1], 6.0 / 25, 1e-12);
  EXPECT_NEAR(f[2], 4.0 / 25, 1e-12);
  EXPECT_NEAR(f[3], 3.0 / 25, 1e-12);
}

// With top-2 routing no expert can see more than half of the assignments: the excess of expert 0
// under zipf(2) is spread over the others in proportion to their weights.
TEST(ExpertLoad, CapsAtOneOverTopK) {
  Routing r{RoutingKind::kZipf, 2.0, {}, {}};
  auto f = expert_load_fractions(r, 4, 2);
  EXPECT_DOUBLE_EQ(f[0], 0.5);
  const double rest = 0.25 + 1.0 / 9 + 1.0 / 16;
  EXPECT_NEAR(f[1], 0.5 * 0.25 / rest, 1e-12);
  EXPECT_NEAR(f[3], 0.5 * (1.0 / 16) / rest, 1e-12);
  EXPECT_NEAR(sum(f), 1.0, 1e-12);
}

TEST(ExpertLoad, HistogramIsNormalised) {
  Routing r{RoutingKind::kHistogram, 0, {3, 1, 0, 0}, {}};
  auto f = expert_load_fractions(r, 4, 1);
  EXPECT_DOUBLE_EQ(f[0], 0.75);
  EXPECT_DOUBLE_EQ(f[1], 0.25);
  EXPECT_DOUBLE_EQ(f[2], 0.0);
}

TEST(ExpertLoad, TasksMixByTokenShare) {
  Json mj = testing::tiny_model_json();
  mj["tasks"] =
      Json::parse(R"([{"name": "a", "token_share": 0.25}, {"name": "b", "token_share": 0.75}])");
  ModelSpec m = parse_model(mj);
  Workload w = parse_workload(Json::parse(R"({
    "schema_version": 1, "name": "w", "global_batch_size": 8,
    "task_routing": [{"task": "a", "routing": {"kind": "histogram", "tokens_per_expert": [1, 0, 0, 0]}}]
  })"));
  // Task a puts every first choice on expert 0, which is capped at 1/top_k = 0.5; the second
  // choices must land on the other experts, evenly as they have no weight: a = [1/2, 1/6, 1/6,
  // 1/6]. Task b has no entry and uses the uniform default.
  auto f = expert_load_fractions(w, m);
  ASSERT_EQ(f.size(), 4u);
  EXPECT_NEAR(f[0], 0.25 * 0.5 + 0.75 * 0.25, 1e-12);
  EXPECT_NEAR(f[1], 0.25 / 6 + 0.75 * 0.25, 1e-12);
  EXPECT_NEAR(sum(f), 1.0, 1e-12);
}

// A measured run's routing, layer by layer: each MoE layer's share from its own histogram; the
// histograms round-trip through JSON and change the content hash; bad ones name their path.
TEST(ExpertLoad, PerLayerHistograms) {
  const ModelSpec m = parse_model(testing::tiny_model_json());
  Workload w = parse_workload(Json::parse(R"({
    "schema_version": 1, "name": "w", "global_batch_size": 8,
    "routing": {"kind": "histogram", "tokens_per_expert": [1, 1, 1, 1],
                "per_layer": [[3, 1, 0, 0], [0, 0, 1, 3]]}
  })"));
  ASSERT_EQ(w.routing.per_layer.size(), 2u);
  auto f0 = expert_load_fractions(w, m, 0), f1 = expert_load_fractions(w, m, 1);
  EXPECT_DOUBLE_EQ(f0[0], 0.5);  // 3/4 capped at 1/top_k = 1/2
  EXPECT_DOUBLE_EQ(f1[3], 0.5);
  EXPECT_DOUBLE_EQ(expert_load_fractions(w, m)[0], 0.25);  // the step's
  EXPECT_EQ(parse_workload(to_json(w)), w);
  Workload plain = w;
  plain.routing.per_layer.clear();
  EXPECT_NE(content_hash(semantic_json(w)), content_hash(semantic_json(plain)));
  try {
    parse_workload(Json::parse(R"({
      "schema_version": 1, "name": "w", "global_batch_size": 8,
      "routing": {"kind": "histogram", "tokens_per_expert": [1, 1], "per_layer": [[0, 0], 3]}
    })"));
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    const std::string all = e.what();
    EXPECT_NE(all.find("workload.routing.per_layer[0]: counts sum to 0"), std::string::npos) << all;
    EXPECT_NE(all.find("workload.routing.per_layer[1]: expected a non-empty array"),
              std::string::npos)
        << all;
  }
}

// Listed replicas: an extra copy goes to the least loaded rank that does not hold the expert yet,
// even when the expert's home rank is the least loaded one (a second copy there splits nothing).
TEST(ExpertLoad, ReplicasGoToRanksWithoutTheExpert) {
  const ModelSpec m = parse_model(testing::tiny_model_json());  // 4 experts, top 2
  Plan p;
  p.ep = 2;
  p.expert_replicas.kind = ExpertReplicas::Kind::kPerExpert;
  p.expert_replicas.per_expert = {2, 1, 1, 1};
  Workload w;  // uniform: expert 0's home rank is then the lighter
  const auto ranks = expert_rank_loads(m, p, w);
  ASSERT_EQ(ranks.size(), 2u);
  ASSERT_EQ(ranks[0].copies.size(), 2u);
  ASSERT_EQ(ranks[1].copies.size(), 3u);
  EXPECT_EQ(ranks[1].copies.back().expert, 0);
  EXPECT_NEAR(ranks[0].share + ranks[1].share, 1.0, 1e-12);
}

// Elastic replicas (hot_experts, replicas) follow the load: a copy is placed only where it takes
// load off a straggler without making a new one.
TEST(ExpertLoad, ElasticReplicasOnlyWhereTheyLowerTheMostLoadedRank) {
  const ModelSpec m = parse_model(testing::tiny_model_json());  // 4 experts, top 2
  Plan p;
  p.ep = 4;  // one expert per rank
  p.expert_replicas.kind = ExpertReplicas::Kind::kHot;
  p.expert_replicas.hot_experts = 2;
  p.expert_replicas.replicas = 3;
  const auto copies = [&](const Workload& w) {
    size_t n = 0;
    for (const RankExperts& r : expert_rank_loads(m, p, w)) n += r.copies.size();
    return n;
  };
  // Balanced: a copy of any expert would put 1.5 shares on its rank. None is placed.
  Workload w;
  EXPECT_EQ(copies(w), 4u);
  EXPECT_NEAR(expert_rank_load_factor(m, p, w), 1.0, 1e-12);
  // zipf(1) = [12, 6, 4, 3] / 25 on ranks 0-3. Expert 0 (0.48, the straggler) gains a copy on
  // rank 3 (0.12 + 0.24 = 0.36 < 0.48), then a third on rank 2 (0.16 + 0.16 = 0.32 < 0.36); ranks:
  // 0.16, 0.24, 0.32, 0.28. Expert 1 (0.24) gains none: no copy of it sits on the most loaded
  // rank, so a copy would spend memory without shortening the step.
  w.routing = Routing{RoutingKind::kZipf, 1.0, {}, {}};
  const auto ranks = expert_rank_loads(m, p, w);
  ASSERT_EQ(ranks.size(), 4u);
  EXPECT_EQ(copies(w), 6u);
  ASSERT_EQ(ranks[3].copies.size(), 2u);
  EXPECT_EQ(ranks[3].copies[1].expert, 0);
  ASSERT_EQ(ranks[2].copies.size(), 2u);
  EXPECT_EQ(ranks[2].copies[1].expert, 0);
  EXPECT_EQ(ranks[0].copies.size(), 1u);
  EXPECT_NEAR(ranks[0].share, 0.16, 1e-12);
  EXPECT_NEAR(ranks[1].share, 0.24, 1e-12);
  EXPECT_NEAR(ranks[2].share, 0.32, 1e-12);
  EXPECT_NEAR(ranks[3].share, 0.28, 1e-12);
  EXPECT_NEAR(expert_rank_load_factor(m, p, w), 4 * 0.32, 1e-12);
}

TEST(WorkloadSpec, RejectsBadInput) {
  try {
    parse_workload(Json::parse(R"({
      "schema_version": 1, "name": "w", "global_batch_size": 0, "mode": "serve", "precision": "tf32",
      "routing": {"kind": "zipf"}, "inference": {"prefill_batch": 1}
    })"));
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    std::string all = e.what();
    EXPECT_NE(all.find("workload.global_batch_size: must be >= 1, got 0"), std::string::npos)
        << all;
    EXPECT_NE(all.find("workload.mode: unknown value \"serve\""), std::string::npos) << all;
    EXPECT_NE(all.find("workload.precision: tf32 is a GEMM mode"), std::string::npos) << all;
    EXPECT_NE(all.find("workload.routing.exponent: missing"), std::string::npos) << all;
    EXPECT_NE(all.find("workload.inference.prompt_len: missing"), std::string::npos) << all;
  }
}

TEST(WorkloadSpec, TaskListedTwiceIsAnError) {
  try {
    parse_workload(Json::parse(R"({"schema_version": 1, "name": "w", "global_batch_size": 8,
        "task_routing": [{"task": "a", "routing": {"kind": "uniform"}},
                         {"task": "a", "routing": {"kind": "zipf", "exponent": 1}}]})"));
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("workload.task_routing[1].task: task \"a\" listed twice"),
              std::string::npos)
        << e.what();
  }
}

TEST(WorkloadSpec, OptimizerMomentsAreFp32OrBf16) {
  const char* base =
      R"({"schema_version": 1, "name": "w", "global_batch_size": 8, "optimizer_moments": )";
  EXPECT_EQ(parse_workload(Json::parse(std::string(base) + R"("bf16"})")).optimizer_moments,
            Precision::kBF16);
  EXPECT_THROW(parse_workload(Json::parse(std::string(base) + R"("fp8"})")), ConfigError);
  EXPECT_EQ(
      parse_workload(Json::parse(R"({"schema_version": 1, "name": "w", "global_batch_size": 8})"))
          .optimizer_moments,
      Precision::kFP32);
}

TEST(WorkloadSpec, InferenceModeNeedsInferenceShape) {
  EXPECT_THROW(
      parse_workload(Json::parse(R"({"schema_version": 1, "name": "w", "global_batch_size": 1,
                                               "mode": "inference"})")),
      ConfigError);
  Workload w =
      parse_workload(Json::parse(R"({"schema_version": 1, "name": "w", "global_batch_size": 1,
      "mode": "inference", "inference": {"prefill_batch": 2, "prompt_len": 16, "decode_batch": 4,
      "decode_tokens": 8}})"));
  ASSERT_TRUE(w.inference);
  EXPECT_EQ(w.inference->decode_tokens, 8);
}

}  // namespace
}  // namespace switchyard
