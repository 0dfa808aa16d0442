#include "cost_models/memory.h"

#include <gtest/gtest.h>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

// The hand-countable model of core/test_util.h: per GPU with tp = 1 and pp = 1 the dense params are
// layer 0: attention 192 + norms 16 + FFN 384 = 592; layer 1: 192 + 16 + shared 144 + gate 32 =
// 384; embedding 80 + LM head 80 + final norm 8 => 1144 (= count_params().dense()). Experts: 4 of
// 144.
class MemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = parse_model(testing::tiny_model_json());
    cluster_ = testing::bundled().load_cluster("dgx-h100");
    cluster_.gpus_per_node = 2;
    workload_.global_batch_size = 8;
    workload_.seq_len = 6;
    plan_.dp = 2;
    plan_.ep = 2;
    plan_.zero_stage = 1;
    profile_ = default_cost_profile(cluster_);
    profile_.runtime_reserved_bytes = 1000;
    plan_.grad_bucket_bytes = 100;
  }
  MemoryBreakdown mem(int stage = 0) {
    return memory_per_gpu(model_, cluster_, plan_, workload_, profile_, stage);
  }

  ModelSpec model_;
  ClusterSpec cluster_;
  Workload workload_;
  Plan plan_;
  CostProfile profile_;
};

// bf16: 2 + 2 + 12 bytes per parameter. ZeRO-1 shards optimizer states: dense over dp*cp = 2,
// experts over expert_dp = tp*cp*dp / (expert_tp*ep) = 1.
TEST_F(MemoryTest, ZeroOneByHand) {
  const auto m = mem();
  EXPECT_DOUBLE_EQ(m.dense_params.gpu, 1144 * 2);
  EXPECT_DOUBLE_EQ(m.expert_params.gpu, 2 * 144 * 2);
  EXPECT_DOUBLE_EQ(m.gradients.gpu, (1144 + 288) * 2);
  EXPECT_DOUBLE_EQ(m.optimizer_states.gpu, 1144 * 12 / 2.0 + 288 * 12);
  EXPECT_DOUBLE_EQ(m.comm_buffers.gpu, 200);
  EXPECT_DOUBLE_EQ(m.runtime.gpu, 1000);
}

// Adam moments in bf16 (DeepSeek-V3): fp32 master 4 + two 2-byte moments = 8 bytes per parameter.
TEST_F(MemoryTest, Bf16OptimizerMoments) {
  EXPECT_DOUBLE_EQ(state_bytes_per_param(Precision::kBF16, Precision::kBF16).optimizer, 8);
  EXPECT_DOUBLE_EQ(state_bytes_per_param(Precision::kFP32, Precision::kBF16).optimizer, 4);
  workload_.optimizer_moments = Precision::kBF16;
  EXPECT_DOUBLE_EQ(mem().optimizer_states.gpu, 1144 * 8 / 2.0 + 288 * 8);
}

TEST_F(MemoryTest, ZeroStagesShardMore) {
  plan_.zero_stage = 2;
  EXPECT_DOUBLE_EQ(mem().gradients.gpu, 1144 * 2 / 2.0 + 288 * 2);
  plan_.zero_stage = 3;
  const auto m = mem();
  EXPECT_DOUBLE_EQ(m.dense_params.gpu, 1144 * 2 / 2.0);
  // One gathered layer of each class: the widest dense layer (592) and the local experts (288).
  EXPECT_DOUBLE_EQ(m.prefetch_buffers.gpu, (592 + 288) * 2);
  plan_.zero_stage = 0;
  EXPECT_DOUBLE_EQ(mem().optimizer_states.gpu, (1144 + 288) * 12);
}

TEST_F(MemoryTest, PlacementMovesClassesOffTheGpu) {
  plan_.placement.optimizer_states = Tier::kCPU;
  plan_.placement.expert_params = Tier::kSSD;
  plan_.prefetch = {2, PrefetchDirection::k2D};
  const auto m = mem();
  EXPECT_DOUBLE_EQ(m.optimizer_states.gpu, 0);
  // Adam's states of this rank's share (ZeRO-1 over dp 2 for the dense parameters), and the bf16
  // gradients host Adam reads (mixed precision: the fp32 master is among the states).
  EXPECT_DOUBLE_EQ(m.optimizer_states.cpu, (1144 / 2.0 + 288) * (12 + 2));
  EXPECT_DOUBLE_EQ(m.expert_params.gpu, 0);
  EXPECT_DOUBLE_EQ(m.expert_params.ssd, 288 * 2);
  // (1 + depth 2) working layers of experts on the GPU; 2d reads the SSD 2 * depth ahead, so
  // (1 + 4) layers are staged in DRAM.
  EXPECT_DOUBLE_EQ(m.prefetch_buffers.gpu, 3 * 288 * 2);
  EXPECT_DOUBLE_EQ(m.prefetch_buffers.cpu, 5 * 288 * 2);
  // "down": the SSD reads run ahead into DRAM, the copy to the GPU waits for use (one slot).
  plan_.prefetch = {2, PrefetchDirection::kDown};
  EXPECT_DOUBLE_EQ(mem().prefetch_buffers.gpu, 1 * 288 * 2);
  EXPECT_DOUBLE_EQ(mem().prefetch_buffers.cpu, 3 * 288 * 2);
  plan_.prefetch = {2, PrefetchDirection::k2D};
  EXPECT_LT(m.total().gpu, [&] {
    plan_.placement = Placement{};
    plan_.prefetch = Prefetch{};
    return mem().total().gpu;
  }());
}

// The delayed update keeps its own copy of the gradients on the host while the next step makes
// new ones (here where the gradients themselves live on the host).
TEST_F(MemoryTest, DelayedUpdateKeepsAHostCopyOfTheGradients) {
  plan_.zero_stage = 0;
  plan_.placement.optimizer_states = Tier::kCPU;
  plan_.placement.gradients = Tier::kCPU;
  const double sync = mem().optimizer_states.cpu;
  const double sync_gpu = mem().total().gpu;
  plan_.delayed_update = true;
  EXPECT_DOUBLE_EQ(mem().optimizer_states.cpu - sync, (1144 + 288) * 2.0);
  EXPECT_DOUBLE_EQ(mem().total().gpu, sync_gpu);  // nothing more on the GPU
}

// Per token, bf16 (2 bytes), tp = 1, no recompute:
//   dense layer: residuals 2h + norm outputs 2h = 32; Q 8 + K,V 2*4 + O 8 + 2 heads of fp32 LSE
//   (2 elements each) = 28; SwiGLU gate, up and activation outputs 3*16 = 48 => 108 elements.
//   MoE layer: 32 + 28 + fp32 router logits 2*4 = 8 + top-2 rows of (input 8 + 3*6 + output 8) = 68
//   + the shared expert's 3*6 = 18 => 154 elements.
TEST_F(MemoryTest, ActivationsPerTokenByHand) {
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kBF16, false, 1.0),
                   2 * 108);
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kBF16, true, 1.0), 2 * 154);
  // fp32: 4 bytes per element, but the log-sum-exp is fp32 at any precision (2 heads x 4 bytes).
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kFP32, false, 1.0),
                   4 * 104 + 8);
  // FP8 keeps GEMM inputs (norm outputs 16, attention output 8, activation output 16) in one byte:
  // residuals 32 + norms 16 + LSE 8 + Q,K,V 32 + O 8 + gate/up 64 + act 16 = 176.
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kFP8, false, 1.0), 176);
  // A rank that receives 1.5x its share keeps 1.5x the expert rows.
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kBF16, true, 1.5),
                   2 * (154 + 34));
  // Expert-TP 2: the dispatched rows are all-gathered over the pair (4 rows per token) and each
  // rank keeps half the expert width: 4 * (8 + 3*3 + 8) = 100 instead of 68.
  plan_.expert_tp = 2;
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kBF16, true, 1.0),
                   2 * (154 - 68 + 100));
  plan_.expert_tp = 1;
  // Selective recompute drops the norm outputs (2h) and activation outputs (f, fe per row, fs).
  plan_.recompute = Recompute::kSelective;
  EXPECT_DOUBLE_EQ(activation_bytes_per_token(model_, plan_, Precision::kBF16, false, 1.0),
                   2 * (108 - 16 - 16));
}

TEST_F(MemoryTest, InFlightMicroBatches) {
  plan_.pp = 4;
  EXPECT_DOUBLE_EQ(in_flight_micro_batches(plan_, 8, 0), 4);
  EXPECT_DOUBLE_EQ(in_flight_micro_batches(plan_, 8, 3), 1);
  EXPECT_DOUBLE_EQ(in_flight_micro_batches(plan_, 2, 0), 2);
  plan_.schedule = Schedule::kGPipe;
  EXPECT_DOUBLE_EQ(in_flight_micro_batches(plan_, 8, 3), 8);
  // Korthikanti et al.: interleaving costs pp * (1 + (pp - 1) / (pp * vp)) micro-batches on stage
  // 0.
  plan_.schedule = Schedule::kInterleaved1F1B;
  plan_.vp = 2;
  EXPECT_DOUBLE_EQ(in_flight_micro_batches(plan_, 8, 0), 4 * (1 + 3.0 / 8));
}

// zipf(1) over 4 experts = [12, 6, 4, 3] / 25; experts 0-1 on rank 0 get 0.72 of the rows:
// 1.44x a balanced share.
TEST_F(MemoryTest, LoadFactorFromRoutingReplicasAndCapacity) {
  workload_.routing = Routing{RoutingKind::kZipf, 1.0, {}, {}};
  EXPECT_NEAR(expert_rank_load_factor(model_, plan_, workload_), 1.44, 1e-12);
  // Two copies of the hottest expert: rank 0 keeps 0.24 + 0.24, the copy's 0.24 goes to rank 1
  // (0.28 + 0.24 = 0.52).
  plan_.expert_replicas.kind = ExpertReplicas::Kind::kHot;
  plan_.expert_replicas.hot_experts = 1;
  plan_.expert_replicas.replicas = 2;
  EXPECT_NEAR(expert_rank_load_factor(model_, plan_, workload_), 1.04, 1e-12);
  // Capacity factor 1 caps each expert at 1/4 of the rows: rank 0 keeps 0.25 + 0.24.
  plan_.expert_replicas = ExpertReplicas{};
  plan_.capacity_factor = 1.0;
  EXPECT_NEAR(expert_rank_load_factor(model_, plan_, workload_), 0.98, 1e-12);
  workload_.routing = Routing{};
  plan_.capacity_factor.reset();
  EXPECT_NEAR(expert_rank_load_factor(model_, plan_, workload_), 1.0, 1e-12);
}

// Skew raises the peak: the hot rank stores and receives more rows.
TEST_F(MemoryTest, SkewRaisesActivationsAndDispatchBuffers) {
  const auto balanced = mem();
  workload_.routing = Routing{RoutingKind::kZipf, 1.0, {}, {}};
  const auto skewed = mem();
  EXPECT_GT(skewed.activations.gpu, balanced.activations.gpu);
  EXPECT_NEAR(skewed.dispatch_buffers.gpu / balanced.dispatch_buffers.gpu, 1.44, 1e-12);
}

// With a capacity factor the buffers are padded to capacity whatever the routing.
TEST_F(MemoryTest, CapacityFactorPadsDispatchBuffers) {
  const auto balanced = mem();
  plan_.capacity_factor = 1.25;
  workload_.routing = Routing{RoutingKind::kZipf, 1.0, {}, {}};
  const auto padded = mem();
  EXPECT_NEAR(padded.dispatch_buffers.gpu / balanced.dispatch_buffers.gpu, 1.25, 1e-12);
  workload_.routing = Routing{};
  EXPECT_DOUBLE_EQ(mem().dispatch_buffers.gpu, padded.dispatch_buffers.gpu);
}

// Stage 0 holds the embedding and the most micro-batches; the last stage holds the LM head and
// logits.
TEST_F(MemoryTest, PipelineStagesDiffer) {
  plan_.dp = 1;
  plan_.pp = 2;
  plan_.ep = 1;
  cluster_.gpus_per_node = 2;
  const auto first = mem(0);
  const auto last = mem(1);
  EXPECT_DOUBLE_EQ(first.dense_params.gpu, (592 + 80) * 2);
  EXPECT_DOUBLE_EQ(last.dense_params.gpu, (384 + 80 + 8) * 2);
  EXPECT_DOUBLE_EQ(first.in_flight_micro_batches, 2);
  EXPECT_DOUBLE_EQ(last.in_flight_micro_batches, 1);
  const auto peak = peak_memory_per_gpu(model_, cluster_, plan_, workload_, profile_);
  EXPECT_DOUBLE_EQ(peak.total().gpu, std::max(first.total().gpu, last.total().gpu));
}

// Expert parallelism folded differently from TP (expert_tp * ep != tp): dense weights split over
// tp, experts over ep * expert_tp. tp 2: layer 0 = attention 96 + norms 16 + FFN 192 = 304; layer 1
// = 96 + 16 + shared 72 + gate 32 = 216; embedding 40 + LM head 40 + final norm 8 => 608 dense.
TEST_F(MemoryTest, ExpertFoldingDiffersFromTensorParallel) {
  plan_.tp = 2;
  plan_.dp = 2;
  plan_.ep = 4;  // one expert per rank, whole
  plan_.zero_stage = 0;
  auto m = mem();
  EXPECT_DOUBLE_EQ(m.dense_params.gpu, 608 * 2);
  EXPECT_DOUBLE_EQ(m.expert_params.gpu, 144 * 2);
  plan_.ep = 2;
  plan_.expert_tp = 2;  // two experts per rank, each split in two
  m = mem();
  EXPECT_DOUBLE_EQ(m.expert_params.gpu, 2 * 144 / 2 * 2);
  EXPECT_DOUBLE_EQ(m.dense_params.gpu, 608 * 2);
  // ZeRO-1 shards expert optimizer states over expert_dp = tp*cp*dp / (expert_tp*ep) = 1, dense
  // ones over dp*cp = 2.
  plan_.zero_stage = 1;
  EXPECT_DOUBLE_EQ(mem().optimizer_states.gpu, 608 * 12 / 2.0 + 144 * 12);
}

// Full recompute keeps each layer's input (h per token, split over tp with SP) for every
// micro-batch in flight, plus one layer's activations being recomputed.
TEST_F(MemoryTest, FullRecomputeKeepsLayerInputs) {
  plan_.recompute = Recompute::kFull;
  const double tokens = 6;  // micro-batch 1 x seq 6
  const auto m = mem();
  const double inputs = 2 * (2.0 * 8 * tokens);  // 2 layers x bf16 x h x tokens
  const double widest =
      tokens * activation_bytes_per_token(model_, plan_, Precision::kBF16, true, 1.0);
  const double logits = tokens * 10 * 4.0;
  EXPECT_DOUBLE_EQ(m.activations.gpu, inputs * m.in_flight_micro_batches + widest + logits);
  // GPipe runs every forward before any backward: the last stage holds all 4 micro-batches'
  // logits (1F1B one, as above).
  plan_.schedule = Schedule::kGPipe;
  const auto g = mem();
  EXPECT_DOUBLE_EQ(g.in_flight_micro_batches, 4);
  EXPECT_DOUBLE_EQ(g.activations.gpu, inputs * 4 + widest + 4 * logits);
}

// A plan that overflows a tier is reported per tier with the numbers.
TEST_F(MemoryTest, CapacityIssuesPerTier) {
  EXPECT_TRUE(capacity_issues(model_, cluster_, plan_, workload_, profile_).empty());
  plan_.placement.optimizer_states = Tier::kCPU;
  plan_.placement.expert_params = Tier::kSSD;
  cluster_.gpu.hbm_bytes = 1000;
  cluster_.host.dram_bytes = 100;
  cluster_.host.ssd_bytes = 100;
  const auto issues = capacity_issues(model_, cluster_, plan_, workload_, profile_);
  ASSERT_EQ(issues.size(), 3u);
  EXPECT_EQ(issues[0].path, "plan");
  EXPECT_NE(issues[0].message.find("does not fit: stage 0 needs"), std::string::npos)
      << issues[0].message;
  // Every part that holds GPU memory is named, so the parts add up to the total.
  for (const char* part : {"dense params", "activations", "comm buffers", "runtime"})
    EXPECT_NE(issues[0].message.find(part), std::string::npos) << part << ": " << issues[0].message;
  EXPECT_EQ(issues[0].message.find("optimizer"), std::string::npos) << issues[0].message;
  EXPECT_NE(issues[1].message.find("host memory does not fit: 2 GPUs x"), std::string::npos)
      << issues[1].message;
  EXPECT_NE(issues[2].message.find("SSD does not fit"), std::string::npos) << issues[2].message;
}

TEST_F(MemoryTest, StageOutOfRangeThrows) {
  EXPECT_THROW(mem(1), std::out_of_range);
  EXPECT_THROW(mem(-1), std::out_of_range);
}

TEST_F(MemoryTest, RingInferenceStreamsTheLayersThroughSlotsOnTheGpu) {
  workload_.mode = Mode::kInference;
  workload_.inference = InferenceSpec{2, 4, 2, 2};
  plan_.dp = 1;
  plan_.ep = 1;
  plan_.ring_sections = 2;
  const double params = (1144 + 4 * 144) * 2.0;  // bf16, one GPU holds every expert
  // The embedding, the head and the final norm (10 x 8 + 10 x 8 + 8 parameters) stay on the GPU;
  // the layers live in host memory and the largest one (960 parameters) sizes a slot.
  const double outside = 168 * 2.0, largest_layer = 960 * 2.0;
  const auto naive = mem();  // no prefetch: one slot, each layer loads then computes
  EXPECT_DOUBLE_EQ(naive.dense_params.cpu + naive.expert_params.cpu, params - outside);
  EXPECT_DOUBLE_EQ(naive.dense_params.gpu, outside);
  EXPECT_DOUBLE_EQ(naive.prefetch_buffers.gpu, largest_layer);
  // Prefetching ahead: 2 layers / 2 sections = 1 layer loads ahead, two slots.
  plan_.prefetch.direction = PrefetchDirection::kAhead;
  plan_.prefetch.depth = 1;
  const auto m = mem();
  EXPECT_DOUBLE_EQ(m.prefetch_buffers.gpu, 2 * largest_layer);
  EXPECT_DOUBLE_EQ(m.gradients.total(), 0);
  // KV cache: batch 2 x (4 + 2) tokens x 2 layers x K and V of 1 head x 4 wide x 2 bytes.
  EXPECT_DOUBLE_EQ(m.kv_cache.gpu, 2 * 6 * 2 * 2 * 4 * 2.0);
}

}  // namespace
}  // namespace switchyard
