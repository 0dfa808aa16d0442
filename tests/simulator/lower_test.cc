#include <gtest/gtest.h>

#include "core/expert_load.h"
#include "core/step_program.h"
#include "tests/simulator/sim_test_util.h"

namespace switchyard {
namespace {

using namespace testing;

int count(const std::vector<OpTemplate>& ops, std::string_view name) {
  int n = 0;
  for (const auto& op : ops) n += op.name == name ? 1 : 0;
  return n;
}

const OpTemplate* find(const std::vector<OpTemplate>& ops, std::string_view name) {
  for (const auto& op : ops)
    if (op.name == name) return &op;
  return nullptr;
}

class LowerTest : public ::testing::Test {
 protected:
  ModelSpec model_ = moe_model();
  ClusterSpec cluster_ = a100_nodes(4);
  Workload work_ = train(64, 2048);
};

// all_to_all: one all-to-all over the EP group before and after the experts, forward and backward.
TEST_F(LowerTest, AllToAllDispatch) {
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32})");
  expect_valid(p, model_, cluster_, work_);
  const StepProgram prog = lower(model_, cluster_, p, work_);
  const ChunkProgram& ch = prog.stages[0].chunks[0];
  EXPECT_EQ(count(ch.forward, "dispatch"), 8);
  EXPECT_EQ(count(ch.forward, "combine"), 8);
  EXPECT_EQ(count(ch.backward, "dispatch"), 8);
  const OpTemplate* d = find(ch.forward, "dispatch");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->collective, Collective::kAllToAll);
  EXPECT_EQ(d->group, CommGroup::kEp);
  // 2048 tokens x top-2 rows of 2048 bf16 values.
  EXPECT_DOUBLE_EQ(d->bytes, 2048.0 * 2 * 2048 * 2);
  EXPECT_EQ(prog.layout(CommGroup::kEp).ranks, 32);
  EXPECT_EQ(prog.layout(CommGroup::kEp).nodes(), 4);
}

// Hierarchical: intra-node exchange, then the inter-node exchange of the aggregated buffers.
TEST_F(LowerTest, HierarchicalDispatch) {
  const Plan p = plan_of(
      R"({"schema_version": 1, "dp": 32, "ep": 32, "dispatch": "hierarchical_all_to_all"})");
  const StepProgram prog = lower(model_, cluster_, p, work_);
  const auto& fwd = prog.stages[0].chunks[0].forward;
  EXPECT_EQ(count(fwd, "dispatch"), 0);
  EXPECT_EQ(count(fwd, "dispatch_intra"), 8);
  EXPECT_EQ(count(fwd, "dispatch_inter"), 8);
  EXPECT_EQ(count(fwd, "combine_inter"), 8);
  EXPECT_EQ(prog.layout(CommGroup::kEpIntra).ranks, 8);
  EXPECT_EQ(prog.layout(CommGroup::kEpInter).ranks, 4);
  EXPECT_EQ(prog.layout(CommGroup::kEpInter).ranks_per_node, 1);
}

// Under skew the most loaded rank receives more rows than it sends: its dispatch (and the combine
// that returns them) moves the larger side, flat and hierarchical alike; under balanced load both
// sides are equal.
TEST_F(LowerTest, TheHotRanksExchangeMovesWhatItReceives) {
  const Plan flat = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32})");
  const Plan hier = plan_of(
      R"({"schema_version": 1, "dp": 32, "ep": 32, "dispatch": "hierarchical_all_to_all"})");
  Workload hot = work_;
  std::vector<double> hist(32, 1.0);
  hist[0] = 3.0;  // expert 0 (alone on rank 0) gets 3 / 34 of the rows: 32 x 3 / 34 = 2.82x
  hot.routing = Routing{RoutingKind::kHistogram, 0, hist, {}};
  expect_valid(flat, model_, cluster_, hot);
  const double sent = 2048.0 * 2 * 2048 * 2;  // 2048 tokens x top-2 rows of 2048 bf16 values
  const double received = sent * 32 * 3 / 34;
  const StepProgram balanced = lower(model_, cluster_, flat, work_);
  const StepProgram skewed = lower(model_, cluster_, flat, hot);
  for (const char* name : {"dispatch", "combine"}) {
    const OpTemplate* even = find(balanced.stages[0].chunks[0].forward, name);
    const OpTemplate* skew = find(skewed.stages[0].chunks[0].forward, name);
    ASSERT_NE(even, nullptr);
    ASSERT_NE(skew, nullptr);
    EXPECT_DOUBLE_EQ(even->bytes, sent) << name;
    EXPECT_NEAR(skew->bytes, received, received * 1e-3) << name;
    EXPECT_NEAR(static_cast<double>(skew->tokens), 2048.0 * 2 * 32 * 3 / 34, 1.0) << name;
  }
  const StepProgram hierarchical = lower(model_, cluster_, hier, hot);
  const auto& fwd = hierarchical.stages[0].chunks[0].forward;
  for (const char* name : {"dispatch_intra", "dispatch_inter", "combine_inter"}) {
    const OpTemplate* op = find(fwd, name);
    ASSERT_NE(op, nullptr);
    EXPECT_NEAR(op->bytes, received, received * 1e-3) << name;
  }
}

// Elastic copies land on the least loaded ranks, so the rank with the most rows is not the one
// with the most copies: the update (after the gradients' collective, which waits for every rank)
// and the replicas' all-reduce are that rank's.
TEST_F(LowerTest, TheRankWithTheMostCopiesDecidesTheUpdate) {
  Workload skew = work_;
  skew.routing = Routing{RoutingKind::kZipf, 1.2, {}, {}};
  const Plan plain = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 8})");
  const Plan elastic = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 8,
                                   "expert_replicas": {"hot_experts": 8, "replicas": 4}})");
  expect_valid(elastic, model_, cluster_, skew);
  const auto ranks = expert_rank_loads(model_, elastic, skew);
  size_t most = 0;
  for (const RankExperts& r : ranks) most = std::max(most, r.copies.size());
  const size_t hot = ranks[static_cast<size_t>(most_loaded_rank(ranks))].copies.size();
  ASSERT_GT(most, hot) << "the placement should pile copies on a cold rank";
  const auto update = [&](const Plan& p) {
    const StepProgram prog = lower(model_, cluster_, p, skew);
    const OpTemplate* opt = find(prog.stages[0].step_ops, "optimizer");
    return opt ? opt->bytes : 0.0;
  };
  // Expert parameters: 4 of 32 experts per rank without copies; dense ones alike in both.
  const ModelSpec& m = model_;
  const double per_expert = static_cast<double>(expert_params(m)) * m.num_layers;
  const double delta = update(elastic) - update(plain);
  const double bytes_per_param = delta / (per_expert * static_cast<double>(most - 4));
  EXPECT_NEAR(bytes_per_param, 14.0 + 4 * 4, 1e-6);  // mixed-precision Adam, fp32 moments
}

// Pipeline MoE: no all-to-all; a local index slice and one all-reduce in the TP group.
TEST_F(LowerTest, PpmoeIndexSlice) {
  const Plan p = plan_of(
      R"({"schema_version": 1, "tp": 8, "ep": 8, "pp": 4, "dispatch": "ppmoe_index_slice"})");
  expect_valid(p, model_, cluster_, work_);
  const StepProgram prog = lower(model_, cluster_, p, work_);
  const auto& fwd = prog.stages[0].chunks[0].forward;
  EXPECT_EQ(count(fwd, "dispatch"), 0);
  EXPECT_EQ(count(fwd, "index_slice"), 2);  // 2 layers per stage
  const OpTemplate* ar = find(fwd, "combine_all_reduce");
  ASSERT_NE(ar, nullptr);
  EXPECT_EQ(ar->group, CommGroup::kTp);
  EXPECT_EQ(ar->collective, Collective::kAllReduce);
  for (const auto& op : fwd) EXPECT_NE(op.group, CommGroup::kEp) << op.name;
  // Each TP rank serves 32 / 8 = 4 experts with its share of all 2048 x 2 rows.
  const OpTemplate* fc1 = find(fwd, "experts_fc1");
  ASSERT_NE(fc1, nullptr);
  ASSERT_EQ(fc1->group_rows.size(), 4u);
  EXPECT_EQ(fc1->group_rows[0], 2048 * 2 / 32);
}

TEST_F(LowerTest, RecomputeAndZeroStages) {
  Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "recompute": "full"})");
  StepProgram prog = lower(model_, cluster_, p, work_);
  const ChunkProgram& ch = prog.stages[0].chunks[0];
  int recomputed = 0;
  for (const auto& op : ch.backward) recomputed += op.phase == Phase::kRecompute ? 1 : 0;
  // Every layer's forward runs again (the embedding and head are not recomputed).
  int layer_fwd = 0;
  for (const auto& op : ch.forward) layer_fwd += op.layer >= 0 ? 1 : 0;
  EXPECT_EQ(recomputed, layer_fwd);

  p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 3})");
  prog = lower(model_, cluster_, p, work_);
  // 8 layers, the embedding and the head; the layers gathered again, first thing in their
  // backward (the embedding's backward reads no weights; the head's follows its forward).
  EXPECT_EQ(count(prog.stages[0].chunks[0].forward, "zero3_param_all_gather"), 8 + 2);
  EXPECT_EQ(count(prog.stages[0].chunks[0].backward, "zero3_param_all_gather"), 8);
  const auto& bwd3 = prog.stages[0].chunks[0].backward;
  for (size_t i = 0; i < bwd3.size(); ++i)
    if (bwd3[i].layer == 3) {
      EXPECT_EQ(bwd3[i].name, "zero3_param_all_gather");  // the layer's first backward op
      break;
    }
  EXPECT_EQ(count(prog.stages[0].step_ops, "dp_param_all_gather"), 0);
  p.zero_stage = 1;
  prog = lower(model_, cluster_, p, work_);
  EXPECT_EQ(count(prog.stages[0].step_ops, "dp_param_all_gather"), 1);
  const OpTemplate* rs = find(prog.stages[0].chunks[0].backward, "dp_grad_bucket");
  ASSERT_NE(rs, nullptr);
  EXPECT_EQ(rs->collective, Collective::kReduceScatter);
  EXPECT_TRUE(rs->async);
  EXPECT_TRUE(rs->last_micro_batch);
  // ZeRO-2 keeps only this rank's shard of the gradients: every micro-batch reduce-scatters its
  // own (DeepSpeed reduces at each micro-step), and the simulated step issues m times the buckets.
  p.zero_stage = 2;
  prog = lower(model_, cluster_, p, work_);
  for (const OpTemplate& op : prog.stages[0].chunks[0].backward)
    if (op.name == "dp_grad_bucket" || op.name == "edp_grad_bucket") {
      EXPECT_EQ(op.collective, Collective::kReduceScatter);
      EXPECT_FALSE(op.last_micro_batch) << op.name;
    }
  EXPECT_EQ(count(prog.stages[0].step_ops, "dp_param_all_gather"), 1);
}

// Bucket size decides how many gradient collectives the backward issues.
TEST_F(LowerTest, GradientBuckets) {
  Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "grad_bucket_bytes": 0})");
  EXPECT_EQ(count(lower(model_, cluster_, p, work_).stages[0].chunks[0].backward, "dp_grad_bucket"),
            8);
  p.grad_bucket_bytes = int64_t{1} << 40;
  EXPECT_EQ(count(lower(model_, cluster_, p, work_).stages[0].chunks[0].backward, "dp_grad_bucket"),
            1);
}

// Megatron TP: with sequence parallelism every TP region is entered by an all-gather and left by a
// reduce-scatter; the backward swaps them.
TEST_F(LowerTest, TensorParallelCollectives) {
  ModelSpec dense = bundled().load_model("llama3-8b");
  const Plan p = plan_of(R"({"schema_version": 1, "tp": 4, "dp": 8, "sequence_parallel": true})");
  const Workload w = train(64, 8192);
  expect_valid(p, dense, cluster_, w);
  const StepProgram prog = lower(dense, cluster_, p, w);
  const ChunkProgram& ch = prog.stages[0].chunks[0];
  EXPECT_EQ(count(ch.forward, "tp_all_gather"), 2 * 32 + 1);  // 2 per layer + before the LM head
  EXPECT_EQ(count(ch.forward, "tp_reduce_scatter"), 2 * 32);
  int ag_in_backward = 0;
  for (const auto& op : ch.backward)
    ag_in_backward += op.name == "tp_all_gather" && op.collective == Collective::kAllGather ? 1 : 0;
  EXPECT_EQ(ag_in_backward, 2 * 32);  // the backward of each reduce-scatter
}

// FP8 training casts every GEMM's activation input first (one cast per GEMM, forward and backward).
TEST_F(LowerTest, Fp8CastsBeforeGemms) {
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32})");
  const auto bf16 = lower(model_, cluster_, p, work_).stages[0].chunks[0].forward;
  EXPECT_EQ(count(bf16, "fp8_cast"), 0);
  const auto fp8 =
      lower(model_, cluster_, p, train(64, 2048, Precision::kFP8)).stages[0].chunks[0].forward;
  int gemms = 0;
  for (const auto& op : fp8)
    gemms += op.kind == OpKind::kGemm || op.kind == OpKind::kGroupedGemm ? 1 : 0;
  EXPECT_EQ(count(fp8, "fp8_cast"), gemms);
  // The FP8 dispatch sends one byte per element; the combine returns bf16.
  EXPECT_DOUBLE_EQ(find(fp8, "dispatch")->bytes * 2, find(fp8, "combine")->bytes);
}

// ZeRO-3 keeps a rank's shard of the parameters, off the GPU too: it fetches that shard and the
// layer's all-gather brings the rest.
TEST_F(LowerTest, ZeroThreeFetchesOnlyItsShardOfOffloadedParameters) {
  Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 1,
                       "placement": {"dense_params": "cpu", "optimizer_states": "cpu"}})");
  const auto fetched = [&](const Plan& plan) {
    const StepProgram prog = lower(model_, cluster_, plan, work_);
    const auto& fwd = prog.stages[0].chunks[0].forward;
    for (const OpTemplate& op : fwd)
      if (op.name == "param_fetch" && op.layer == 3) return op.bytes;
    return 0.0;
  };
  const double whole = fetched(p);
  ASSERT_GT(whole, 0);
  const auto unit = [&](const Plan& plan, std::string_view name, int layer) {
    const StepProgram prog = lower(model_, cluster_, plan, work_);
    for (const auto* ops : {&prog.stages[0].chunks[0].forward, &prog.stages[0].chunks[0].backward})
      for (const OpTemplate& op : *ops)
        if (op.name == name && op.layer == layer) return op.bytes;
    return 0.0;
  };
  const double embedding = unit(p, "param_fetch", -1);
  ASSERT_GT(embedding, 0);
  p.placement.gradients = Tier::kCPU;
  const double grads = unit(p, "grad_offload", -1);  // the head's: dense parameters only
  ASSERT_GT(grads, 0);
  p.zero_stage = 3;
  EXPECT_DOUBLE_EQ(fetched(p), whole / 32);
  EXPECT_DOUBLE_EQ(unit(p, "param_fetch", -1), embedding / 32);  // the embedding's shard too
  EXPECT_DOUBLE_EQ(unit(p, "grad_offload", -1), grads / 32);     // only the reduced shard goes down
  // A layer's shard goes down after the collective that reduces it.
  const StepProgram z3 = lower(model_, cluster_, p, work_);
  const auto& bwd = z3.stages[0].chunks[0].backward;
  int offloads = 0;
  for (const OpTemplate& op : bwd)
    if (op.name == "grad_offload" && op.layer >= 0) {
      ++offloads;
      ASSERT_GE(op.wait_for, 0);
      EXPECT_EQ(bwd[static_cast<size_t>(op.wait_for)].collective, Collective::kReduceScatter);
      EXPECT_EQ(bwd[static_cast<size_t>(op.wait_for)].layer, op.layer);
    }
  EXPECT_EQ(offloads, 8);
}

// Offloaded parameters are fetched before each use: right before the layer without prefetching,
// `depth` layers ahead with it; the layer's first op waits for its fetch. SSD-resident ones come
// down the levels (SSD -> host -> GPU).
TEST_F(LowerTest, OffloadedParametersAreFetchedAhead) {
  Plan p = plan_of(
      R"({"schema_version": 1, "dp": 32, "ep": 32, "placement": {"expert_params": "cpu"}})");
  auto fwd = lower(model_, cluster_, p, work_).stages[0].chunks[0].forward;
  ASSERT_EQ(count(fwd, "param_fetch"), 8);
  // Without prefetch the fetch of layer 3 sits right before layer 3's first op, which waits for it.
  for (size_t i = 0; i < fwd.size(); ++i)
    if (fwd[i].name == "param_fetch" && fwd[i].layer == 3) {
      EXPECT_TRUE(fwd[i].async);
      EXPECT_EQ(fwd[i + 1].layer, 3);
      EXPECT_EQ(fwd[i + 1].wait_for, static_cast<int>(i));
    }
  p.prefetch = {2, PrefetchDirection::kAhead};
  fwd = lower(model_, cluster_, p, work_).stages[0].chunks[0].forward;
  // Layers 0..2 are fetched before layer 0 starts; layer 3's fetch is issued where layer 1 starts.
  std::vector<int> fetched_before_layer0;
  for (const auto& op : fwd) {
    if (op.layer == 0 && op.name != "param_fetch") break;
    if (op.name == "param_fetch") fetched_before_layer0.push_back(op.layer);
  }
  EXPECT_EQ(fetched_before_layer0, (std::vector<int>{0, 1, 2}));
  for (size_t i = 0; i < fwd.size(); ++i)
    if (fwd[i].name == "param_fetch" && fwd[i].layer == 3) {
      EXPECT_EQ(fwd[i + 1].layer, 1);
    }

  p.placement.expert_params = Tier::kSSD;
  p.prefetch = {1, PrefetchDirection::k2D};
  fwd = lower(model_, cluster_, p, work_).stages[0].chunks[0].forward;
  for (size_t i = 0; i < fwd.size(); ++i)
    if (fwd[i].name == "param_fetch") {
      ASSERT_GE(fwd[i].wait_for, 0);
      EXPECT_EQ(fwd[static_cast<size_t>(fwd[i].wait_for)].name, "param_ssd_read");
      EXPECT_EQ(fwd[i].stream, StreamKind::kCopy);
      EXPECT_EQ(fwd[static_cast<size_t>(fwd[i].wait_for)].stream, StreamKind::kStorage);
    }
  // The levels' leads: where layer 5's SSD read and its copy to the GPU are issued (the layer
  // whose start issues them), per direction at depth 2.
  const auto issued_at = [&](PrefetchDirection dir) {
    Plan q = p;
    q.prefetch = {2, dir};
    const StepProgram prog = lower(model_, cluster_, q, work_);
    const auto& ops = prog.stages[0].chunks[0].forward;
    std::pair<int, int> at{-1, -1};
    for (size_t i = 0; i < ops.size(); ++i) {
      if (ops[i].layer != 5 || ops[i].kind != OpKind::kCopy) continue;
      int next = -1;  // the first layer op after the copy: the unit that issued it
      for (size_t k = i + 1; k < ops.size() && next < 0; ++k)
        if (ops[k].kind != OpKind::kCopy) next = ops[k].layer;
      (ops[i].name == "param_ssd_read" ? at.first : at.second) = next;
    }
    return at;
  };
  EXPECT_EQ(issued_at(PrefetchDirection::kNone), std::make_pair(5, 5));
  EXPECT_EQ(issued_at(PrefetchDirection::kDown), std::make_pair(3, 5));
  EXPECT_EQ(issued_at(PrefetchDirection::kAhead), std::make_pair(3, 3));
  EXPECT_EQ(issued_at(PrefetchDirection::k2D), std::make_pair(1, 3));
  EXPECT_EQ(fetch_leads(model_, p), (FetchLeads{2, 1}));
  // Off-GPU gradients go down as each unit's backward ends: the head, 8 layers, the embedding.
  p.placement.gradients = Tier::kCPU;
  const auto bwd = lower(model_, cluster_, p, work_).stages[0].chunks[0].backward;
  EXPECT_EQ(count(bwd, "grad_offload"), 1 + 8 + 1);
  // With the dense parameters off the GPU the embedding and the head are fetched like layers.
  // Each class comes down from its own tier, as the runner copies it: a layer's dense parameters
  // from host memory at once, its experts over PCIe only after their SSD read.
  p.placement.dense_params = Tier::kCPU;
  const StepProgram both = lower(model_, cluster_, p, work_);
  const auto& f = both.stages[0].chunks[0].forward;
  EXPECT_EQ(count(f, "param_fetch"), 1 + 2 * 8 + 1);
  EXPECT_EQ(count(f, "param_ssd_read"), 8);
  int from_host = 0, from_ssd = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i].name != "param_fetch" || f[i].layer != 4) continue;
    if (f[i].wait_for < 0) {
      ++from_host;
      continue;
    }
    ++from_ssd;
    EXPECT_EQ(f[static_cast<size_t>(f[i].wait_for)].name, "param_ssd_read");
    EXPECT_EQ(f[static_cast<size_t>(f[i].wait_for)].layer, 4);
    EXPECT_EQ(f[static_cast<size_t>(f[i].wait_for)].bytes, f[i].bytes);
  }
  EXPECT_EQ(from_host, 1);
  EXPECT_EQ(from_ssd, 1);
}

// Inference: one stage, a prefill chunk and one decode step, forward only; the decode step's
// queries (one per sequence) attend to the whole cache without a causal mask.
TEST_F(LowerTest, InferenceProgram) {
  Workload w = train(1, 2048);
  w.mode = Mode::kInference;
  w.inference = InferenceSpec{8, 2048, 64, 256};
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 32, "ep": 32})");
  expect_valid(p, model_, cluster_, w);
  const StepProgram prog = lower(model_, cluster_, p, w);
  ASSERT_EQ(prog.stages.size(), 1u);
  ASSERT_EQ(prog.stages[0].chunks.size(), 2u);
  EXPECT_EQ(prog.stages[0].order, (std::vector<ScheduleItem>{{0, 0, false}, {0, 1, false}}));
  EXPECT_TRUE(prog.stages[0].chunks[0].backward.empty());
  const OpTemplate* prefill = find(prog.stages[0].chunks[0].forward, "attn_core");
  const OpTemplate* decode = find(prog.stages[0].chunks[1].forward, "attn_core");
  ASSERT_TRUE(prefill && decode);
  EXPECT_EQ(prefill->attention.seq_len, 2048);
  EXPECT_TRUE(prefill->attention.causal);
  EXPECT_EQ(decode->attention.seq_len, 1);
  EXPECT_EQ(decode->attention.kv_len, 2048 + 128);
  EXPECT_FALSE(decode->attention.causal);
  EXPECT_EQ(decode->attention.batch, 2);  // 64 sequences over 32 replicas
  Plan pp = p;
  pp.pp = 2;
  pp.dp = 16;
  EXPECT_THROW(lower(model_, cluster_, pp, w), ConfigError);
}

// Ring-memory inference: the ring runs on across passes. The prefill loads its first depth + 1
// layers as it starts and its last layers load the decode step's first `depth`; a decode step
// (which follows another pass) finds those loaded, so its first layers wait for nothing, and it
// loads every layer once.
TEST_F(LowerTest, TheRingRunsOnIntoTheNextPass) {
  Workload w = train(1, 2048);
  w.mode = Mode::kInference;
  w.inference = InferenceSpec{1, 512, 1, 16};
  const Plan p = plan_of(R"({"schema_version": 1, "dp": 8, "ring_sections": 4,
                             "prefetch": {"depth": 1, "direction": "ahead"}})");
  const int layers = static_cast<int>(model_.num_layers);
  const int depth = ring_ahead_layers(model_, p);
  ASSERT_GT(depth, 0);
  const StepProgram prog = lower(model_, with_gpus(cluster_, 8), p, w);
  const auto& prefill = prog.stages[0].chunks[0].forward;
  const auto& decode = prog.stages[0].chunks[1].forward;
  EXPECT_EQ(count(prefill, "param_fetch"), layers + depth);
  EXPECT_EQ(count(decode, "param_fetch"), layers);
  // In the decode step, no op of the first `depth` layers waits for a fetch; layer `depth`'s
  // first op does.
  for (size_t i = 0; i < decode.size(); ++i) {
    const OpTemplate& op = decode[i];
    if (op.name == "param_fetch" || op.wait_for < 0) continue;
    if (decode[static_cast<size_t>(op.wait_for)].name != "param_fetch") continue;
    EXPECT_GE(op.layer, depth) << op.name;
  }
}

// Interleaving: stage s chunk c holds the layers of virtual stage c * pp + s; the embedding sits on
// the first virtual stage and the LM head on the last.
TEST_F(LowerTest, InterleavedChunksHoldTheirLayers) {
  const Plan p = plan_of(
      R"({"schema_version": 1, "dp": 8, "pp": 4, "vp": 2, "ep": 8, "schedule": "interleaved_1f1b"})");
  expect_valid(p, model_, cluster_, work_);
  const StepProgram prog = lower(model_, cluster_, p, work_);
  EXPECT_EQ(prog.stages[0].chunks[0].first_layer, 0);
  EXPECT_EQ(prog.stages[1].chunks[0].first_layer, 1);
  EXPECT_EQ(prog.stages[0].chunks[1].first_layer, 4);
  EXPECT_EQ(prog.stages[3].chunks[1].first_layer, 7);
  EXPECT_TRUE(prog.stages[0].chunks[0].has_embedding);
  EXPECT_FALSE(prog.stages[0].chunks[1].has_embedding);
  EXPECT_TRUE(prog.stages[3].chunks[1].has_head);
  EXPECT_EQ(prog.num_micro_batches, 8);
}

}  // namespace
}  // namespace switchyard
