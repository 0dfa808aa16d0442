// Under mpiexec (2 and 4 ranks): data- and expert-parallel training with ZeRO 0 and 1, several
// micro-batches and gradient buckets gives the single-process reference's losses and parameters
// (fp32, relative error <= 1e-4) after several steps. Every rank computes the reference itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/expert_load.h"
#include "core/workload.h"
#include "executor/cpu/mpi_communicator.h"
#include "executor/moe_trainer.h"
#include "tests/executor/mpi_test_main.h"

namespace switchyard {
namespace {

MpiRuntime* g_mpi = nullptr;

ModelSpec small_model(int layers = 3) {
  Json j = Json::parse(R"({
    "schema_version": 1, "name": "small", "num_layers": 3, "hidden_size": 16,
    "ffn_hidden_size": 24, "num_attention_heads": 2, "num_kv_heads": 2, "vocab_size": 32,
    "seq_len": 8, "activation": "swiglu", "norm": "rmsnorm",
    "moe": {"num_experts": 12, "top_k": 2, "expert_ffn_hidden_size": 12,
            "layers": {"every": 2, "offset": 1}}
  })");
  j["num_layers"] = layers;
  return parse_model(j);
}

struct Case {
  int ep;
  int zero;
  int micro_batch_size;
  int64_t bucket_bytes;
  double capacity_factor = 0;
  int ep_per_node = 0;  // > 0: hierarchical all-to-all with this many EP ranks per "node"
  int pp = 1;           // pipeline stages (the outermost dimension of the rank order)
  int tp = 1;           // tensor parallel (innermost); with MoE layers: ppmoe_index_slice, or
                        // all-to-all dispatch with sequence parallelism (`sp`)
  bool sp = false;
  Schedule schedule = Schedule::k1F1B;
  int vp = 1;            // model chunks per stage (interleaved 1F1B)
  int layers = 3;        // of the small model
  bool skewed = false;   // the gate samples zipf(1.2) shares (the workload's routing)
  int hot_replicas = 0;  // > 0: the 2 hottest experts get this many copies (elastic replicas)
};

void check(const Case& c) {
  const ModelSpec m = small_model(c.layers);
  TrainSettings s;
  s.global_batch = 24;  // divisible by dp * micro-batch for 2, 4 and 6 ranks
  s.micro_batch_size = c.micro_batch_size;
  s.zero_stage = c.zero;
  s.grad_bucket_bytes = c.bucket_bytes;
  s.capacity_factor = c.capacity_factor;
  s.lr = 5e-3f;
  const Routing zipf{RoutingKind::kZipf, 1.2, {}, {}};
  if (c.skewed) s.routing_share = expert_load_fractions(zipf, 12, 1);
  const int steps = 3;

  // The reference: one process, every group of one rank.
  auto ref_dev = cpu_device({});
  auto sdp = self_communicator("dp"), sep = self_communicator("ep"),
       sedp = self_communicator("edp");
  TrainSettings ref_s = s;
  if (c.capacity_factor <= 0) ref_s.micro_batch_size = 1;  // capacity is per micro-batch
  ref_s.zero_stage = 0;
  auto ref = MoeTrainer::create(m, ref_s, *ref_dev, {sdp.get(), sep.get(), sedp.get()});

  auto world = g_mpi->world(60);
  const int r = world->rank();
  // Ranks: stage-major (pp outermost), then data parallel, then tensor parallel (innermost); EP
  // groups inside a stage (with TP: PPMoE, the EP group is the TP group).
  const int per_stage = world->size() / c.pp, stage = r / per_stage, q = r % per_stage;
  const int dp_idx = q / c.tp, tp_idx = q % c.tp;
  auto tpg = world->split(stage * 1000 + dp_idx, r, "tp");
  auto dp = world->split(stage * 1000 + tp_idx, r, "dp");
  const bool ppmoe = c.tp > 1 && !c.sp;
  auto ep = ppmoe ? world->split(stage * 1000 + dp_idx, r, "ep")
                  : world->split(stage * 1000 + q / c.ep, r, "ep");
  auto edp = ppmoe ? world->split(stage * 1000 + tp_idx, r, "expert_dp")
                   : world->split(stage * 1000 + q % c.ep, r, "expert_dp");
  auto pp = world->split(q, stage, "pp");
  if (c.pp > 1) {
    Plan plan;
    plan.pp = c.pp;
    s.stage_layers = resolve_stage_layers(plan, m);
    s.schedule = c.schedule;
    s.vp = c.vp;
  }
  std::unique_ptr<Communicator> intra, inter;
  TrainGroups groups{dp.get(), ep.get(), edp.get()};
  groups.pp = pp.get();
  groups.tp = tpg.get();
  groups.ppmoe = ppmoe;
  s.sequence_parallel = c.sp;
  if (c.ep_per_node > 0) {
    intra = ep->split(ep->rank() / c.ep_per_node, ep->rank(), "ep_intra");
    inter = ep->split(ep->rank() % c.ep_per_node, ep->rank(), "ep_inter");
    groups.ep_intra = intra.get();
    groups.ep_inter = inter.get();
  }
  if (c.hot_replicas > 0) {  // the simulator's placement of the copies
    Plan plan;
    plan.ep = c.ep;
    plan.expert_replicas.kind = ExpertReplicas::Kind::kHot;
    plan.expert_replicas.hot_experts = 2;
    plan.expert_replicas.replicas = c.hot_replicas;
    Workload w;
    w.routing = zipf;
    for (const RankExperts& rank : expert_rank_loads(m, plan, w)) {
      std::vector<int>& slots = s.rank_experts.emplace_back();
      for (const ExpertCopy& copy : rank.copies) slots.push_back(copy.expert);
    }
  }
  auto dev = cpu_device({});
  auto run = MoeTrainer::create(m, s, *dev, groups);
  if (c.hot_replicas == 0) {
    EXPECT_EQ(run->local_experts(), 12 / (ppmoe ? c.tp : c.ep));
  }
  // Which layers this stage holds: virtual stages (chunk c, stage t) run chunk-major, each with
  // stage_layers[t] / vp layers (interleaving: stage 0 holds layers 0 and 2 of 4).
  if (c.pp > 1) {
    std::vector<int> owner;
    for (int ch = 0; ch < c.vp; ++ch)
      for (int t = 0; t < c.pp; ++t)
        for (int i = 0; i < s.stage_layers[static_cast<size_t>(t)] / c.vp; ++i) owner.push_back(t);
    ASSERT_EQ(static_cast<int>(owner.size()), c.layers);
    for (int l = 0; l < c.layers; ++l) {
      bool held = false;
      for (const Parameter& p : run->parameters())
        held = held || p.name.rfind("layer" + std::to_string(l) + ".", 0) == 0;
      EXPECT_EQ(held, owner[static_cast<size_t>(l)] == stage) << "layer " << l;
    }
  }

  int64_t dropped = 0;
  for (int step = 0; step < steps; ++step) {
    const double want = ref->step(step).loss;
    const StepStats got = run->step(step);
    dropped += got.dropped;
    EXPECT_NEAR(got.loss, want, 1e-4 * std::abs(want)) << "step " << step;
  }
  world->all_reduce(&dropped, 1, DType::kInt64, ReduceOp::kSum);
  if (c.capacity_factor > 0) {
    EXPECT_GT(dropped, 0) << "the capacity dropped nothing";
  }
  const ParameterError err = parameter_error(*run, *ref);
  const double worst = err.relative;
  const std::string& worst_name = err.worst;
  EXPECT_LE(worst, 1e-4) << worst_name;
  // Copies of a replicated expert hold the same values on every rank that has one.
  if (c.hot_replicas > 0) {
    for (int e = 0; e < 2; ++e) {
      double mine = 0;
      bool held = false;
      for (const Parameter& p : run->parameters())
        if (p.name.find(".expert" + std::to_string(e) + ".") != std::string::npos) {
          held = true;
          for (size_t i = 0; i < p.size; ++i) mine += p.v()[i] * (1.0 + 1e-3 * (i % 7));
        }
      double copies = held ? 1.0 : 0.0;
      double lo = held ? mine : 1e300, hi = held ? mine : -1e300;
      world->all_reduce(&copies, 1, DType::kFloat64, ReduceOp::kSum);
      world->all_reduce(&lo, 1, DType::kFloat64, ReduceOp::kMin);
      world->all_reduce(&hi, 1, DType::kFloat64, ReduceOp::kMax);
      EXPECT_GE(copies, 2.0) << "expert " << e;
      EXPECT_EQ(lo, hi) << "copies of expert " << e << " differ";
    }
  }
  // All ranks hold the same replicated parameters (and every expert lives somewhere).
  double all_worst = worst;
  world->all_reduce(&all_worst, 1, DType::kFloat64, ReduceOp::kMax);
  EXPECT_LE(all_worst, 1e-4);
}

TEST(DistributedTraining, DataParallelMatchesTheReference) { check({1, 0, 1, 1 << 10}); }
TEST(DistributedTraining, DataParallelZero1MatchesTheReference) { check({1, 1, 2, 1 << 20}); }
// Every rank in one EP group (2, 4 or 6 ranks; the 12 experts split evenly).
TEST(DistributedTraining, ExpertParallelMatchesTheReference) {
  check({g_mpi->world_size(), 0, 1, 1 << 20});
}
TEST(DistributedTraining, ExpertParallelZero1MicroBatchesMatchTheReference) {
  check({g_mpi->world_size(), 1, 2, 4096});
}
TEST(DistributedTraining, SkewedRoutingFromTheWorkloadMatchesTheReference) {
  Case skewed{g_mpi->world_size(), 1, 2, 1 << 20};
  skewed.skewed = true;
  check(skewed);
  if (g_mpi->world_size() % 4 == 0) {  // and with sequence-parallel TP (tokens drawn per slice)
    Case tp = skewed;
    tp.tp = 2;
    tp.sp = true;
    check(tp);
  }
}
TEST(DistributedTraining, ElasticReplicasMatchTheReferenceAndStayIdentical) {
  // Zipf-skewed routing; the 2 hottest experts get 2 copies on the least loaded EP ranks, their
  // rows dealt over the copies, the copies' gradients summed (ZeRO 0 and 1, dropping too).
  Case replicas{g_mpi->world_size(), 0, 1, 1 << 20};
  replicas.skewed = true;
  replicas.hot_replicas = 2;
  check(replicas);
  Case zero1 = replicas;
  zero1.zero = 1;
  zero1.micro_batch_size = 2;
  zero1.capacity_factor = 1.5;
  check(zero1);
}
TEST(DistributedTraining, CapacityDroppingMatchesTheReference) {
  check({g_mpi->world_size(), 1, 1, 1 << 20, /*capacity_factor=*/0.75});
}
TEST(DistributedTraining, HierarchicalAllToAllMatchesTheReference) {
  // "Nodes" of L EP ranks: 2 ranks: L 1 x N 2; 4 ranks: 2 x 2; 6 ranks: 2 x 3 and 3 x 2.
  const int w = g_mpi->world_size();
  for (int per_node : {1, 2, 3}) {
    if (w % per_node != 0 || per_node == w || (w > 2 && per_node == 1)) continue;
    check({w, 1, 2, 1 << 20, 0, per_node});
    check({w, 0, 1, 1 << 20, 0.75, per_node});
  }
}
TEST(DistributedTraining, PipelineStagesMatchTheReference) {
  // Two stages (layers 1 + 2 of 3), each data parallel over the rest of the ranks.
  const int w = g_mpi->world_size();
  Case gpipe{1, 0, 1, 1 << 20};
  gpipe.pp = 2;
  gpipe.schedule = Schedule::kGPipe;
  check(gpipe);
  Case one_f_one_b{1, 1, 1, 1 << 20};
  one_f_one_b.pp = 2;
  check(one_f_one_b);
  if ((w / 2) % 2 == 0) {
    Case with_ep{2, 1, 2, 1 << 20, 0.75};  // expert parallel inside each stage, with dropping
    with_ep.pp = 2;
    check(with_ep);
  }
}
TEST(DistributedTraining, InterleavedPipelineMatchesTheReference) {
  // Megatron's interleaved 1F1B: 2 model chunks per stage (4 layers: stage 0 holds layers 0 and
  // 2, stage 1 layers 1 and 3), activations wrapping from the last stage back to the first.
  Case interleaved{1, 1, 1, 1 << 20};
  interleaved.pp = 2;
  interleaved.vp = 2;
  interleaved.layers = 4;
  interleaved.schedule = Schedule::kInterleaved1F1B;
  check(interleaved);
  if (g_mpi->world_size() == 6) {  // three stages of 2 chunks, data parallel 2
    Case three = interleaved;
    three.pp = 3;
    three.layers = 6;
    check(three);
  }
}
TEST(DistributedTraining, TensorParallelPipelineMoeMatchesTheReference) {
  // Megatron column/row splits of attention and the dense FFN, experts spread over the TP group
  // (index slice + one all-reduce), data parallel over the rest.
  Case ppmoe{1, 1, 1, 1 << 20};
  ppmoe.tp = 2;
  check(ppmoe);
  Case dropping{1, 0, 2, 1 << 20, 0.75};
  dropping.tp = 2;
  check(dropping);
  if (g_mpi->world_size() % 4 == 0) {
    Case with_pp{1, 1, 1, 1 << 20};
    with_pp.tp = 2;
    with_pp.pp = 2;
    check(with_pp);
  }
}
TEST(DistributedTraining, SequenceParallelTensorParallelWithAllToAllMatchesTheReference) {
  // Megatron-Core's TP for MoE: sequence parallel slices outside the TP regions (all-gather in,
  // reduce-scatter out), each TP rank routing its own slice through the all-to-all of an EP group
  // that spans the TP ranks; replicated parameters' gradients summed over TP.
  Case tp_ep{2, 1, 1, 1 << 20};
  tp_ep.tp = 2;
  tp_ep.sp = true;
  check(tp_ep);
  const int w = g_mpi->world_size();
  if (w % 4 == 0) {
    Case wide = tp_ep;  // ep 4 over two TP pairs, micro-batches of 2 sequences
    wide.ep = 4;
    wide.micro_batch_size = 2;
    check(wide);
    Case with_pp = tp_ep;  // and two pipeline stages
    with_pp.pp = 2;
    check(with_pp);
  }
  if (w == 6) {  // tp 3 (the small model's 2 heads do not split in 3): tp 2 x dp 3 with ep 6
    Case six = tp_ep;
    six.ep = 6;
    check(six);
  }
}
TEST(DistributedTraining, ExpertAndExpertDataParallelMatchTheReference) {
  if (g_mpi->world_size() < 4) GTEST_SKIP() << "needs 4 or more ranks (ep 2 x expert_dp >= 2)";
  check({2, 1, 1, 1 << 20});
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  return switchyard::testing::run_mpi_tests(
      argc, argv, [](switchyard::MpiRuntime* mpi) { switchyard::g_mpi = mpi; });
}
