// The MoE trainer in one process (the reference every distributed run is checked against): its
// gradients are the loss's (central differences through the whole model: embedding, attention,
// router, experts, dense FFN, head), and training lowers the loss of a batch it sees again.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/workload.h"
#include "executor/moe_trainer.h"
#include "tests/core/test_util.h"

namespace switchyard {
namespace {

// Two layers (dense, then MoE with 4 experts, top-2), small enough for finite differences.
ModelSpec small_model() {
  return parse_model(Json::parse(R"({
    "schema_version": 1, "name": "small", "num_layers": 2, "hidden_size": 8,
    "ffn_hidden_size": 12, "num_attention_heads": 2, "num_kv_heads": 2, "vocab_size": 16,
    "seq_len": 6, "activation": "swiglu", "norm": "rmsnorm",
    "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 6,
            "layers": {"every": 2, "offset": 1}}
  })"));
}

struct Single {
  std::unique_ptr<Device> dev = cpu_device({});
  std::unique_ptr<Communicator> dp = self_communicator("dp"), ep = self_communicator("ep"),
                                edp = self_communicator("expert_dp");
  std::unique_ptr<MoeTrainer> trainer;
  Single(const ModelSpec& m, TrainSettings s) {
    trainer = MoeTrainer::create(m, s, *dev, {dp.get(), ep.get(), edp.get()});
  }
};

void expect_gradients_match(double capacity_factor) {
  TrainSettings s;
  s.global_batch = 2;
  s.micro_batch_size = 1;
  s.capacity_factor = capacity_factor;
  // Weights large enough that every gradient is far above float rounding of the loss, so a wrong
  // or missing term anywhere fails the comparison.
  s.init_std = 0.5f;
  Single run(small_model(), s);
  MoeTrainer& t = *run.trainer;
  t.forward_backward(0);
  // Copy the analytic gradients, then probe elements of every parameter tensor.
  std::vector<std::vector<float>> grads;
  for (const Parameter& p : t.parameters()) grads.emplace_back(p.g(), p.g() + p.size);
  int checked = 0, agreed = 0;
  for (size_t k = 0; k < t.parameters().size(); ++k) {
    const Parameter& p = t.parameters()[k];
    for (size_t i : {size_t{0}, p.size / 2, p.size - 1}) {
      const float keep = p.v()[i];
      const float eps = 1e-2f;
      p.v()[i] = keep + eps;
      const double up = t.forward_backward(0).loss;
      p.v()[i] = keep - eps;
      const double down = t.forward_backward(0).loss;
      p.v()[i] = keep;
      const double numeric = (up - down) / (2.0 * eps);
      const double analytic = grads[k][i];
      ++checked;
      // A probe can move a token across the top-k boundary; count agreement instead of failing
      // on the first such kink.
      if (std::abs(numeric - analytic) <= 1e-2 * std::abs(numeric) + 1e-5) {
        ++agreed;
      } else {
        ADD_FAILURE() << p.name << "[" << i << "]: analytic " << analytic << ", numeric "
                      << numeric;
      }
    }
  }
  EXPECT_GT(checked, 40);
  EXPECT_EQ(agreed, checked);
  if (capacity_factor > 0) {
    EXPECT_GT(t.forward_backward(0).dropped, 0);
  }
}

TEST(MoeTrainer, GradientsAreTheLossesDerivatives) { expect_gradients_match(0); }
TEST(MoeTrainer, GradientsAreTheLossesDerivativesWithCapacityDropping) {
  expect_gradients_match(0.75);
}

// The workload's routing on the gate: with zipf shares the experts are picked in the proportions of
// Gumbel-top-2 sampling from those shares (expert e is in a token's top 2 with probability
// f_e + sum_{j != e} f_j f_e / (1 - f_j)), whatever the untrained router says; a run draws the
// same choices again.
TEST(MoeTrainer, TheGateSamplesTheWorkloadsRouting) {
  const ModelSpec m = testing::bundled().load_model("tiny-moe");  // 8 experts, top 2, 4 layers
  Workload w;
  w.routing = Routing{RoutingKind::kZipf, 1.0, {}, {}};
  const std::vector<double> f = expert_load_fractions(w.routing, 8, 1);  // the plain zipf shares
  TrainSettings s;
  s.global_batch = 8;
  s.routing_share = f;
  Single run(m, s);
  const StepStats st = run.trainer->forward_backward(0);
  const double routed = 8.0 * 128 * 2 * 4;
  for (int e = 0; e < 8; ++e) {
    double in_top2 = f[e];
    for (int j = 0; j < 8; ++j)
      if (j != e) in_top2 += f[j] * f[e] / (1 - f[j]);
    EXPECT_NEAR(st.tokens_per_expert[e] / routed, in_top2 / 2, 0.015) << "expert " << e;
  }
  EXPECT_GT(st.tokens_per_expert[0], 2 * st.tokens_per_expert[7]);
  Single again(m, s);
  EXPECT_EQ(again.trainer->forward_backward(0).tokens_per_expert, st.tokens_per_expert);
  // Per-layer shares: each layer samples its own (layer l favours expert 2l).
  s.routing_layer_share.assign(4, {});
  for (int l = 0; l < 4; ++l) {
    s.routing_layer_share[l].assign(8, 1.0);
    s.routing_layer_share[l][2 * l] = 20.0;
  }
  Single layered(m, s);
  const StepStats ls = layered.trainer->forward_backward(0);
  for (int l = 0; l < 4; ++l) {
    const auto first = ls.tokens_per_layer_expert.begin() + 8 * l;
    EXPECT_EQ(std::max_element(first, first + 8) - first, 2 * l) << "layer " << l;
  }
  s.routing_layer_share.clear();
  // Without the workload's shares the untrained router decides: another histogram.
  s.routing_share.clear();
  Single router(m, s);
  EXPECT_NE(router.trainer->forward_backward(0).tokens_per_expert, st.tokens_per_expert);
}

TEST(MoeTrainer, TrainingLowersTheLossOfARepeatedBatch) {
  TrainSettings s;
  s.global_batch = 4;
  s.micro_batch_size = 2;
  s.lr = 1e-2f;
  Single run(testing::bundled().load_model("tiny-moe"), s);
  const double first = run.trainer->step(0).loss;
  double last = first;
  for (int i = 0; i < 15; ++i) last = run.trainer->step(0).loss;
  EXPECT_NEAR(first, std::log(1024.0), 0.1);  // a fresh model guesses uniformly
  EXPECT_LT(last, 0.8 * first);
}

TEST(MoeTrainer, RejectsWhatItCannotRunWithPaths) {
  Plan p;
  p.tp = 2;  // sequence-parallel TP with all-to-all dispatch runs, but not with capacity dropping
  p.sequence_parallel = true;
  p.capacity_factor = 1.25;
  p.pp = 2;
  p.schedule = Schedule::kInterleaved1F1B;  // (interleaving runs)
  p.vp = 2;
  p.zero_stage = 2;  // nor ZeRO-2
  const auto issues = trainer_unsupported(testing::bundled().load_model("tiny-moe"), p);
  ASSERT_EQ(issues.size(), 2u);
  EXPECT_EQ(issues[0].path, "plan.capacity_factor");
  EXPECT_EQ(issues[1].path, "plan.zero_stage");
  p.capacity_factor.reset();  // (capacity factors run without sequence parallelism)
  p.sequence_parallel = false;
  EXPECT_EQ(trainer_unsupported(testing::bundled().load_model("tiny-moe"), p).size(), 1u);
  EXPECT_TRUE(trainer_unsupported(testing::bundled().load_model("tiny-moe"), Plan{}).empty());
}

TEST(MoeTrainer, AnArenaTooSmallIsACleanOutOfMemory) {
  auto dev = cpu_device({/*device=*/256 << 10, 0, 0, {}});
  auto dp = self_communicator("dp"), ep = self_communicator("ep"), edp = self_communicator("edp");
  TrainSettings s;
  try {
    MoeTrainer::create(testing::bundled().load_model("tiny-moe"), s, *dev,
                       {dp.get(), ep.get(), edp.get()});
    FAIL() << "tiny-moe's parameters fit 256 KiB";
  } catch (const OutOfMemory& e) {
    EXPECT_EQ(e.capacity_bytes(), 256 << 10);
    EXPECT_NE(std::string(e.what()).find("out of gpu memory"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

// SE-MoE's hierarchical storage in the trainer: parameters on the host or on SSD, fetched into
// device slots ahead of use, and the optimizer states updated on the host, train exactly what the
// all-on-device trainer trains; the device arena holds only what the placement keeps there.
// Where each tensor class lives, and how many layers ahead (and on how many host threads, depth +
// 1: the host's update gives the same arithmetic on any number) the runner fetches: `depth` for
// the copies to the device, `ssd_lead` for the SSD reads (-1: as depth).
struct PlacementCase {
  Tier dense, expert, states, grads;
  int depth;
  int ssd_lead = -1;
};

TrainSettings placed(TrainSettings s, const PlacementCase& c) {
  s.placement.dense_params = c.dense;
  s.placement.expert_params = c.expert;
  s.placement.optimizer_states = c.states;
  s.placement.gradients = c.grads;
  s.prefetch = {c.ssd_lead < 0 ? c.depth : c.ssd_lead, c.depth};
  s.host_threads = c.depth + 1;
  return s;
}

// The same arithmetic as on the device, bit for bit; except that off-device gradients are summed
// over the micro-batches on the host (slot, then home += slot) where the device adds each product
// into the running sum inside its GEMM: a rounding apart.
void expect_same_arithmetic(const ParameterError& err, const PlacementCase& c) {
  if (c.grads == Tier::kGPU) {
    EXPECT_EQ(err.relative, 0.0) << "worst " << err.worst << " depth " << c.depth;
  } else {
    EXPECT_LT(err.relative, 1e-5) << "worst " << err.worst;
  }
}

TEST(MoeTrainer, OffloadedParametersAndOptimizerStatesTrainAsOnTheDevice) {
  const ModelSpec m = testing::bundled().load_model("tiny-moe");
  TrainSettings s;
  s.global_batch = 2;
  s.seq_len = 32;
  Single ref(m, s);
  for (int i = 0; i < 3; ++i) ref.trainer->step(i);
  using C = PlacementCase;
  for (const C& c : {C{Tier::kGPU, Tier::kGPU, Tier::kCPU, Tier::kGPU, 0},
                     C{Tier::kCPU, Tier::kCPU, Tier::kCPU, Tier::kGPU, 1},
                     C{Tier::kGPU, Tier::kSSD, Tier::kSSD, Tier::kGPU, 2},
                     C{Tier::kSSD, Tier::kCPU, Tier::kCPU, Tier::kGPU, 0},
                     C{Tier::kGPU, Tier::kGPU, Tier::kCPU, Tier::kCPU, 0},
                     C{Tier::kCPU, Tier::kSSD, Tier::kSSD, Tier::kSSD, 1},
                     // SSD reads ahead, copies at use ("down"); both levels ahead ("2d").
                     C{Tier::kGPU, Tier::kSSD, Tier::kSSD, Tier::kGPU, 0, 2},
                     C{Tier::kSSD, Tier::kSSD, Tier::kSSD, Tier::kGPU, 1, 2}}) {
    Single run(m, placed(s, c));
    double copied = 0;
    for (int i = 0; i < 3; ++i) {
      const StepStats st = run.trainer->step(i);
      copied += static_cast<double>(st.tiers.fetch_bytes + st.tiers.update_copy_bytes);
      // Parameters off the device are fetched and gradients off it go down during the passes;
      // otherwise the update takes the gradients down.
      EXPECT_EQ(st.tiers.fetch_bytes > 0,
                c.dense != Tier::kGPU || c.expert != Tier::kGPU || c.grads != Tier::kGPU);
      EXPECT_EQ(st.tiers.update_copy_bytes > 0,
                c.grads == Tier::kGPU || c.dense == Tier::kGPU || c.expert == Tier::kGPU);
    }
    const ParameterError err = parameter_error(*run.trainer, *ref.trainer);
    expect_same_arithmetic(err, c);
    EXPECT_GT(copied, 0);
    // What the placement moved off the device is not in the arena.
    MemoryPools& mem = run.dev->memory();
    const int64_t off = mem.in_use(Tier::kCPU) + mem.in_use(Tier::kSSD);
    EXPECT_GT(off, 0);
    if (c.dense != Tier::kGPU && c.expert != Tier::kGPU) {
      EXPECT_LT(mem.in_use(Tier::kGPU), ref.dev->memory().in_use(Tier::kGPU) / 2);
    }
  }
}

// ZeRO-Offload's delayed update: step i+1 computes with the values before step i's update, which
// the end of step i+1 applies (finish_update() the last one). The host's update of offloaded states
// (beside the next step, on 1 to 3 threads) gives what the device's delayed update gives.
TEST(MoeTrainer, DelayedUpdateComputesOneUpdateBehindAndAppliesEveryUpdate) {
  const ModelSpec m = testing::bundled().load_model("tiny-moe");
  TrainSettings s;
  s.global_batch = 2;
  s.seq_len = 32;
  TrainSettings d = s;
  d.delayed_update = true;
  Single sync(m, s), delayed(m, d), fresh(m, s);
  const std::vector<float> initial = delayed.trainer->values(delayed.trainer->parameters()[0]);
  // Step 0 starts an update and applies none; finished, it is the synchronous step's.
  delayed.trainer->step(0);
  sync.trainer->step(0);
  EXPECT_EQ(delayed.trainer->values(delayed.trainer->parameters()[0]), initial);
  // Step 1 computes with the initial values: its loss is the fresh model's on batch 1.
  const double stale_loss = delayed.trainer->step(1).loss;
  EXPECT_EQ(stale_loss, fresh.trainer->forward_backward(1).loss);
  EXPECT_NE(sync.trainer->step(1).loss, stale_loss);
  // After step 1 the values are those after step 0's update.
  Single one(m, s);
  one.trainer->step(0);
  EXPECT_EQ(parameter_error(*delayed.trainer, *one.trainer).relative, 0.0);
  delayed.trainer->step(2);
  delayed.trainer->finish_update();
  delayed.trainer->finish_update();  // nothing left: no change
  // Three updates from stale gradients are not the synchronous three.
  sync.trainer->step(2);
  EXPECT_GT(parameter_error(*delayed.trainer, *sync.trainer).relative, 0.0);

  using C = PlacementCase;
  for (const C& c : {C{Tier::kGPU, Tier::kGPU, Tier::kCPU, Tier::kGPU, 0},
                     C{Tier::kCPU, Tier::kGPU, Tier::kCPU, Tier::kGPU, 1},
                     C{Tier::kGPU, Tier::kSSD, Tier::kSSD, Tier::kGPU, 2},
                     C{Tier::kGPU, Tier::kGPU, Tier::kCPU, Tier::kCPU, 0}}) {
    Single run(m, placed(d, c));
    for (int i = 0; i < 3; ++i) run.trainer->step(i);
    run.trainer->finish_update();
    const ParameterError err = parameter_error(*run.trainer, *delayed.trainer);
    expect_same_arithmetic(err, c);
  }
}

TEST(MoeTrainer, PlacementsItCannotRunAreNamed) {
  const ModelSpec m = testing::bundled().load_model("tiny-moe");
  Plan p;
  p.placement.gradients = Tier::kCPU;  // but the device's optimizer would apply them
  EXPECT_EQ(trainer_unsupported(m, p).at(0).path, "plan.placement.optimizer_states");
  p = Plan{};
  p.placement.activations = Tier::kCPU;
  EXPECT_EQ(trainer_unsupported(m, p).at(0).path, "plan.placement.activations");
  p = Plan{};
  p.placement.expert_params = Tier::kCPU;  // optimizer states left on the device
  EXPECT_EQ(trainer_unsupported(m, p).at(0).path, "plan.placement.optimizer_states");
  p.placement.optimizer_states = Tier::kCPU;
  EXPECT_TRUE(trainer_unsupported(m, p).empty());
  p.zero_stage = 1;
  EXPECT_EQ(trainer_unsupported(m, p).at(0).path, "plan.zero_stage");
}

}  // namespace
}  // namespace switchyard
