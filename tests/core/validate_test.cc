#include "core/validate.h"

#include <gtest/gtest.h>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

class ValidateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = parse_model(Json::parse(R"({
      "schema_version": 1, "name": "m64", "num_layers": 16, "hidden_size": 1024, "ffn_hidden_size": 4096,
      "num_attention_heads": 16, "num_kv_heads": 8, "vocab_size": 32000, "seq_len": 4096,
      "moe": {"num_experts": 64, "top_k": 2, "expert_ffn_hidden_size": 1024}
    })"));
    cluster_ = with_nodes(testing::bundled().load_cluster("dgx-h100"), 8);  // 64 GPUs
    workload_ = parse_workload(
        Json::parse(R"({"schema_version": 1, "name": "w", "global_batch_size": 256})"));
    plan_ = parse_plan(
        Json::parse(R"({"schema_version": 1, "dp": 16, "pp": 4, "ep": 8, "zero_stage": 1})"));
  }

  std::vector<ConfigIssue> issues() { return validate(plan_, model_, cluster_, workload_); }

  // The one issue at `path`, which must contain `fragment`.
  void expect_issue(const std::string& path, const std::string& fragment) {
    auto all = issues();
    for (const auto& i : all)
      if (i.path == path && i.message.find(fragment) != std::string::npos) return;
    std::string got;
    for (const auto& i : all) got += "\n  " + i.to_string();
    ADD_FAILURE() << "no issue at " << path << " containing \"" << fragment << "\"; got:" << got;
  }

  ModelSpec model_;
  ClusterSpec cluster_;
  Workload workload_;
  Plan plan_;
};

TEST_F(ValidateTest, BaselineIsValid) { EXPECT_TRUE(issues().empty()); }

TEST_F(ValidateTest, EpMustDivideExperts) {
  plan_.ep = 6;
  plan_.dp = 16;
  expect_issue("plan.ep", "6 does not divide model.moe.num_experts 64");
}

TEST_F(ValidateTest, DegreesMustMatchGpuCount) {
  plan_.dp = 12;
  expect_issue("plan", "dp*tp*pp*cp = 12*1*4*1 = 48 but the cluster has 64 GPUs");
}

TEST_F(ValidateTest, ExpertGroupMustFoldIntoTheStage) {
  plan_.dp = 4;
  plan_.tp = 4;
  plan_.sequence_parallel = true;
  plan_.ep = 32;  // tp*cp*dp = 16 ranks per stage cannot hold 32-way EP
  expect_issue("plan.ep", "expert_tp*ep = 1*32 = 32 does not divide tp*cp*dp = 16");
}

TEST_F(ValidateTest, TensorParallelMustDivideHeads) {
  plan_.tp = 16;  // 8 kv heads
  plan_.dp = 1;
  plan_.sequence_parallel = true;
  expect_issue("plan.tp", "16 does not divide model.num_kv_heads 8");
}

TEST_F(ValidateTest, MoeWithTensorParallelNeedsSequenceParallel) {
  plan_.tp = 2;
  plan_.dp = 8;
  expect_issue("plan.sequence_parallel", "requires sequence parallelism");
  plan_.sequence_parallel = true;
  EXPECT_TRUE(issues().empty());
}

TEST_F(ValidateTest, PpmoeSpreadsExpertsOverTheTensorGroup) {
  plan_.dispatch = Dispatch::kPPMoEIndexSlice;
  plan_.tp = 8;
  plan_.dp = 2;
  plan_.ep = 8;
  EXPECT_TRUE(issues().empty());
  plan_.ep = 4;
  expect_issue("plan.ep", "ep must equal tp");
  plan_.ep = 8;
  plan_.sequence_parallel = true;
  expect_issue("plan.sequence_parallel", "every TP rank must hold all tokens");
}

TEST_F(ValidateTest, InterleavedScheduleRules) {
  plan_.schedule = Schedule::kInterleaved1F1B;
  plan_.vp = 1;
  expect_issue("plan.vp", "interleaved_1f1b needs vp >= 2");
  plan_.vp = 3;  // 4 layers per stage
  expect_issue("plan.vp", "stage 0 has 4 layers, not divisible into vp = 3 chunks");
  plan_.vp = 2;
  workload_.global_batch_size = 16 * 6;  // 6 micro-batches, not a multiple of pp 4
  expect_issue("plan.schedule", "micro-batch count (6) to be a multiple of pp (4)");
  workload_.global_batch_size = 256;
  EXPECT_TRUE(issues().empty());
  plan_.schedule = Schedule::k1F1B;
  expect_issue("plan.vp", "virtual pipeline chunks need schedule \"interleaved_1f1b\"");
}

TEST_F(ValidateTest, GlobalBatchMustSplitIntoMicroBatches) {
  plan_.micro_batch_size = 3;
  expect_issue("workload.global_batch_size",
               "256 is not a multiple of micro_batch_size*dp = 3*16 = 48");
}

TEST_F(ValidateTest, ZeroTwoAndThreeExcludePipelines) {
  plan_.zero_stage = 2;
  expect_issue("plan.zero_stage", "cannot be combined with pipeline parallelism (pp = 4)");
}

TEST_F(ValidateTest, StageLayersMustCoverTheModel) {
  plan_.stage_layers = {4, 4, 4};
  expect_issue("plan.stage_layers", "has 3 stages but pp is 4");
  expect_issue("plan.stage_layers", "sums to 12 layers but the model has 16");
}

TEST_F(ValidateTest, ContextAndSequenceParallelDivideTheSequence) {
  workload_.seq_len = 4098;
  plan_.cp = 2;
  plan_.dp = 8;
  expect_issue("plan.cp", "2*cp = 4 chunks, but seq_len 4098");
}

TEST_F(ValidateTest, StorageTiersMustExist) {
  cluster_.host.ssd_bytes = 0;
  plan_.placement.optimizer_states = Tier::kSSD;
  plan_.prefetch = {2, PrefetchDirection::k2D};
  expect_issue("plan.placement.optimizer_states", "has no SSD");
  plan_.placement.optimizer_states = Tier::kCPU;
  expect_issue("plan.prefetch.direction", "nothing is placed on \"ssd\"");
  plan_.placement.optimizer_states = Tier::kGPU;
  plan_.prefetch = {2, PrefetchDirection::kAhead};
  expect_issue("plan.prefetch", "everything is on the GPU");
  // Parameters or gradients off the GPU are updated by the host: the states go with them.
  plan_.prefetch = {};
  plan_.placement.expert_params = Tier::kCPU;
  expect_issue("plan.placement.optimizer_states", "parameters are placed off the GPU");
  // (Inference has no optimizer: its parameters may live off the GPU alone.)
  workload_.mode = Mode::kInference;
  EXPECT_TRUE(issues().empty());
  workload_.mode = Mode::kTrain;
  plan_.placement.expert_params = Tier::kGPU;
  plan_.placement.gradients = Tier::kCPU;
  expect_issue("plan.placement.optimizer_states", "gradients are placed off the GPU");
  plan_.placement.gradients = Tier::kGPU;
  // Activations stay on the GPU: their offload copies are not lowered.
  plan_.prefetch = {};
  plan_.placement.activations = Tier::kCPU;
  expect_issue("plan.placement.activations", "not modelled");
}

TEST_F(ValidateTest, DelayedUpdateNeedsOffloadedOptimizerStatesAndTraining) {
  plan_.delayed_update = true;
  expect_issue("plan.delayed_update", "placement.optimizer_states is \"gpu\"");
  plan_.placement.optimizer_states = Tier::kCPU;
  EXPECT_TRUE(issues().empty());
  workload_.mode = Mode::kInference;
  expect_issue("plan.delayed_update", "the workload's mode is \"inference\"");
}

TEST_F(ValidateTest, ReplicasNeedExpertParallelism) {
  plan_.expert_replicas.kind = ExpertReplicas::Kind::kHot;
  plan_.expert_replicas.hot_experts = 65;
  plan_.expert_replicas.replicas = 9;
  expect_issue("plan.expert_replicas.hot_experts", "65 exceeds model.moe.num_experts 64");
  expect_issue("plan.expert_replicas.replicas", "9 copies exceed the 8 ranks of the EP group");
  plan_.expert_replicas.kind = ExpertReplicas::Kind::kPerExpert;
  plan_.expert_replicas.per_expert = {1, 2};
  expect_issue("plan.expert_replicas.per_expert", "has 2 entries but the model has 64 experts");
}

TEST_F(ValidateTest, RingSectionsAreForInferenceInOneNode) {
  plan_.ring_sections = 4;
  expect_issue("plan.ring_sections", "the workload's mode is \"train\"");
  expect_issue("plan.ring_sections", "runs inside one node, but the plan spans 64 GPUs");
}

TEST_F(ValidateTest, PrecisionNeedsHardwareSupport) {
  cluster_.gpu.peak_fp8_flops = 0;
  workload_.precision = Precision::kFP8;
  expect_issue("workload.precision", "has no fp8 units");
}

TEST_F(ValidateTest, RoutingMustFitTheModel) {
  workload_.routing = Routing{RoutingKind::kHistogram, 0, {1, 2, 3}, {}};
  expect_issue("workload.routing.tokens_per_expert", "has 3 entries but the model has 64 experts");
  workload_.routing = Routing{RoutingKind::kHistogram, 0, std::vector<double>(64, 1.0), {}};
  workload_.routing.per_layer = {std::vector<double>(64, 1.0), {1, 2}};
  expect_issue("workload.routing.per_layer", "has 2 histograms but the model has " +
                                                 std::to_string(model_.num_moe_layers()) +
                                                 " MoE layers");
  expect_issue("workload.routing.per_layer[1]", "has 2 entries but the model has 64 experts");
  workload_.routing = Routing{};
  workload_.task_routing = {TaskRouting{"vision", Routing{}}};
  expect_issue("workload.task_routing[0].task", "\"vision\" is not a task of model \"m64\"");
}

TEST_F(ValidateTest, DenseModelsHaveNoExperts) {
  model_.moe.reset();
  expect_issue("plan.ep", "must be 1 for a dense model, got 8");
}

// Plans built in code skip the parser: zero degrees are reported, never divided by.
TEST_F(ValidateTest, ZeroDegreesAreReportedNotDividedBy) {
  plan_.tp = 0;
  plan_.micro_batch_size = 0;
  expect_issue("plan.tp", "must be >= 1, got 0");
  expect_issue("plan.micro_batch_size", "must be >= 1, got 0");
}

TEST_F(ValidateTest, TensorParallelMustDivideFfnWidths) {
  model_.ffn_hidden_size = 4098;
  model_.moe->first_dense_layers = 1;
  plan_.tp = 4;
  plan_.dp = 4;
  plan_.sequence_parallel = true;
  expect_issue("plan.tp", "4 does not divide model.ffn_hidden_size 4098");
  model_.moe->num_shared_experts = 1;
  model_.moe->shared_expert_ffn_hidden_size = 1022;
  expect_issue("plan.tp", "does not divide the shared experts' width 1022");
}

TEST_F(ValidateTest, DenseModelsTakeNoDispatchOptions) {
  model_.moe.reset();
  plan_.ep = 1;
  plan_.dispatch = Dispatch::kHierarchicalAllToAll;
  plan_.capacity_factor = 1.0;
  expect_issue("plan.dispatch", "a dense model dispatches no tokens");
  expect_issue("plan.capacity_factor", "a dense model has no expert capacity");
}

TEST_F(ValidateTest, ReportsEveryViolationAtOnce) {
  plan_.ep = 6;
  plan_.dp = 12;
  plan_.zero_stage = 3;
  EXPECT_GE(issues().size(), 3u);
}

// Every bundled plan is valid for the model, cluster, node count and workload it names.
TEST(BundledPlans, AllValid) {
  const ConfigRegistry reg = testing::bundled();
  int checked = 0;
  for (const auto& name : reg.list(ConfigKind::kPlan)) {
    InputNames names;
    names.plan = name;
    Inputs in = load_inputs(reg, names);
    auto issues = validate(in.plan, in.model, in.cluster, in.workload);
    std::string got;
    for (const auto& i : issues) got += "\n  " + i.to_string();
    EXPECT_TRUE(issues.empty()) << name << ":" << got;
    ++checked;
  }
  // One plan per bundled MoE model at least.
  int moe_models = 0;
  for (const auto& name : reg.list(ConfigKind::kModel))
    moe_models += reg.load_model(name).is_moe() ? 1 : 0;
  EXPECT_GE(checked, moe_models);
}

}  // namespace
}  // namespace switchyard
