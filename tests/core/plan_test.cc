#include "core/plan.h"

#include <gtest/gtest.h>

#include <numeric>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

Plan plan_from(const char* text) { return parse_plan(Json::parse(text)); }

TEST(PlanSpec, DefaultsMakeOneGpuWithNothingSharded) {
  Plan p = plan_from(R"({"schema_version": 1})");
  EXPECT_EQ(p.world_size(), 1);
  EXPECT_EQ(p.schedule, Schedule::k1F1B);
  EXPECT_EQ(p.dispatch, Dispatch::kAllToAll);
  EXPECT_FALSE(p.capacity_factor);
  EXPECT_EQ(p.grad_bucket_bytes, kDefaultGradBucketBytes);
  EXPECT_EQ(p.placement.optimizer_states, Tier::kGPU);
  EXPECT_FALSE(p.delayed_update);
  EXPECT_EQ(p.expert_replicas.kind, ExpertReplicas::Kind::kNone);
  EXPECT_EQ(p.expert_dp(), 1);
}

TEST(PlanSpec, ExpertDataParallelRefoldsTheStage) {
  Plan p = plan_from(R"({"schema_version": 1, "dp": 16, "tp": 2, "pp": 4, "ep": 8})");
  EXPECT_EQ(p.world_size(), 128);
  EXPECT_EQ(p.expert_dp(), 4);  // tp*cp*dp = 32 ranks per stage = ep 8 x expert_dp 4
}

TEST(PlanSpec, StageLayersBalancedSplit) {
  ModelSpec m = parse_model(testing::tiny_model_json());
  Plan p = plan_from(R"({"schema_version": 1, "pp": 2})");
  m.num_layers = 5;  // 2 + 1 extra: no middle stage, so the last stage takes it
  EXPECT_EQ(resolve_stage_layers(p, m), (std::vector<int>{2, 3}));
  m.num_layers = 10;
  p.pp = 4;  // 2 each + 2 extra for the middle stages
  EXPECT_EQ(resolve_stage_layers(p, m), (std::vector<int>{2, 3, 3, 2}));
  // DeepSeek-V3: 61 layers on 16 stages = 3 each + 13 extra, all to middle stages 1..13.
  m.num_layers = 61;
  p.pp = 16;
  auto layers = resolve_stage_layers(p, m);
  EXPECT_EQ(std::accumulate(layers.begin(), layers.end(), 0), 61);
  EXPECT_EQ(layers.front(), 3);
  EXPECT_EQ(layers[1], 4);
  EXPECT_EQ(layers[13], 4);
  EXPECT_EQ(layers[14], 3);
  EXPECT_EQ(layers.back(), 3);
  p.stage_layers = {61};  // wrong length for pp 16: validate() reports it, the split is derived
  EXPECT_EQ(resolve_stage_layers(p, m), layers);
  p.pp = 2;
  p.stage_layers = {30, 31};
  EXPECT_EQ(resolve_stage_layers(p, m), (std::vector<int>{30, 31}));  // explicit wins
}

TEST(PlanSpec, ReportsEveryProblemWithItsPath) {
  try {
    plan_from(
        R"({"schema_version": 1, "dp": "eight", "tp": 0, "schedule": "zigzag", "zero_stage": 4,
                  "capacity_factor": 0, "prefetch": {"depth": 2}, "ring_sections": 1,
                  "expert_replicas": {"hot_experts": 2, "replicas": 2, "per_expert": [1]},
                  "placement": {"activations": "ssd", "weights": "gpu"}, "stage_layers": [3, 0],
                  "colour": "red"})");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    std::string all = e.what();
    for (const char* expected :
         {"plan.dp: expected an integer, got a string \"eight\"", "plan.tp: must be >= 1, got 0",
          "plan.schedule: unknown value \"zigzag\"; expected one of \"gpipe\", \"1f1b\", "
          "\"interleaved_1f1b\"",
          "plan.zero_stage: must be 0, 1, 2 or 3, got 4", "plan.capacity_factor: must be > 0",
          "plan.prefetch: depth 2 with direction \"none\"",
          "plan.ring_sections: a ring needs at least 2 sections",
          "plan.expert_replicas: give either",
          "plan.placement.activations: activations can be offloaded to \"cpu\", not \"ssd\"",
          "plan.placement.weights: unknown key",
          "plan.stage_layers[1]: must be in [1, 16777216], got 0", "plan.colour: unknown key"}) {
      EXPECT_NE(all.find(expected), std::string::npos) << "missing: " << expected << "\nin:\n"
                                                       << all;
    }
  }
}

TEST(PlanSpec, EmptyStageLayersIsAnError) {
  EXPECT_THROW(plan_from(R"({"schema_version": 1, "stage_layers": []})"), ConfigError);
  EXPECT_TRUE(plan_from(R"({"schema_version": 1, "stage_layers": null})").stage_layers.empty());
}

TEST(PlanSpec, NullCapacityFactorIsDropless) {
  Plan p = plan_from(R"({"schema_version": 1, "capacity_factor": null})");
  EXPECT_FALSE(p.capacity_factor);
  p = plan_from(R"({"schema_version": 1, "capacity_factor": 1.25})");
  ASSERT_TRUE(p.capacity_factor);
  EXPECT_DOUBLE_EQ(*p.capacity_factor, 1.25);
}

}  // namespace
}  // namespace switchyard
