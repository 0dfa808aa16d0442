// MoE inference in one process: the key/value cache computes what a prefill of the whole sequence
// computes; ring-memory inference (weights streamed from host memory through device slots)
// computes exactly what the all-resident run computes; a model larger than the device arena runs
// only as a ring.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "executor/moe_inference.h"
#include "tests/core/test_util.h"

namespace switchyard {
namespace {

// Three layers (MoE, dense, MoE; 4 experts, top-2), or more of them alternating.
ModelSpec small_model(int layers = 3) {
  return parse_model(Json::parse(R"({
    "schema_version": 1, "name": "small", "num_layers": )" +
                                 std::to_string(layers) +
                                 R"(, "hidden_size": 16,
    "ffn_hidden_size": 24, "num_attention_heads": 2, "num_kv_heads": 2, "vocab_size": 32,
    "seq_len": 16, "activation": "swiglu", "norm": "rmsnorm",
    "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 12,
            "layers": {"every": 2, "offset": 0}}
  })"));
}

InferenceSettings settings() {
  InferenceSettings s;
  s.prefill_batch = 2;
  s.prompt_len = 5;
  s.decode_batch = 3;  // the third prompt gets a prefill pass of its own
  s.decode_tokens = 4;
  s.init_std = 0.5f;  // large weights: routing and argmax depend on every term
  s.keep_logits = true;
  return s;
}

InferenceResult run(const ModelSpec& m, const InferenceSettings& s, TierCapacity cap = {},
                    OpTimes* ops = nullptr) {
  auto dev = cpu_device(cap);
  auto inf = MoeInference::create(m, s, *dev, *dev);
  return inf->generate(ops, ops);
}

int argmax(const float* row, int n) {
  return static_cast<int>(std::max_element(row, row + n) - row);
}

TEST(MoeInference, DecodingWithTheCacheMatchesPrefillingTheWholeSequence) {
  const ModelSpec m = small_model();
  const int V = 32;
  InferenceSettings s = settings();
  s.prefill_batch = s.decode_batch = 1;
  s.decode_tokens = 2;
  s.prompt_tokens = {3, 1, 4, 1, 5};
  const InferenceResult a = run(m, s);
  ASSERT_EQ(a.passes.size(), 3u);  // the prefill, two decode steps
  ASSERT_EQ(a.logits.size(), 3u * V);
  // The prefill's next token h0 is fed to decode step 0, whose output h1 is fed to step 1.
  const int h0 = argmax(a.logits.data(), V), h1 = a.generated[0];
  EXPECT_EQ(a.generated[1], argmax(a.logits.data() + 2 * V, V));
  // Step 1 saw the prompt, h0 and h1: a 7-token prefill of them ends with the same logits.
  InferenceSettings longer = s;
  longer.prompt_len = 7;
  longer.decode_tokens = 0;
  longer.prompt_tokens.push_back(h0);
  longer.prompt_tokens.push_back(h1);
  const InferenceResult b = run(m, longer);
  ASSERT_EQ(b.logits.size(), static_cast<size_t>(V));
  for (int i = 0; i < V; ++i)
    EXPECT_NEAR(a.logits[static_cast<size_t>(2 * V + i)], b.logits[static_cast<size_t>(i)], 1e-4)
        << i;
}

TEST(MoeInference, EverySequenceOfABatchDecodesAsItWouldAlone) {
  const ModelSpec m = small_model();
  const int V = 32;
  InferenceSettings s = settings();  // prefills of 2 and 1 prompts, 3 decoded 4 steps
  s.prompt_tokens = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9};
  const InferenceResult batch = run(m, s);
  ASSERT_EQ(batch.passes.size(), 2u + 4u);
  ASSERT_EQ(batch.generated.size(), 4u * 3u);
  for (int q = 0; q < 3; ++q) {
    InferenceSettings alone = s;
    alone.prefill_batch = alone.decode_batch = 1;
    alone.prompt_tokens.assign(s.prompt_tokens.begin() + 5 * q,
                               s.prompt_tokens.begin() + 5 * q + 5);
    const InferenceResult r = run(m, alone);
    // Its prefill row (pass 0 holds sequences 0 and 1, pass 1 sequence 2), then each decode step.
    for (int i = 0; i < V; ++i)
      EXPECT_NEAR(r.logits[static_cast<size_t>(i)], batch.logits[static_cast<size_t>(q * V + i)],
                  1e-4);
    for (int t = 0; t < 4; ++t) {
      EXPECT_EQ(r.generated[static_cast<size_t>(t)],
                batch.generated[static_cast<size_t>(t * 3 + q)])
          << "sequence " << q << " step " << t;
      for (int i = 0; i < V; ++i)
        EXPECT_NEAR(r.logits[static_cast<size_t>((1 + t) * V + i)],
                    batch.logits[static_cast<size_t>((3 + 3 * t + q) * V + i)], 1e-4);
    }
  }
}

TEST(MoeInference, RingComputesExactlyWhatTheResidentModelComputes) {
  const ModelSpec m = small_model();
  InferenceSettings s = settings();
  s.prefill_batch = 3;  // one prefill pass, then 4 decode steps: every pass is a program pass
  const InferenceResult resident = run(m, s);
  int64_t layer_bytes = 0;  // every layer's weights once
  for (int ahead : {0, 1, 2, 5}) {
    InferenceSettings r = s;
    r.ring = true;
    r.ring_ahead = ahead;
    OpTimes ops;
    ops.record = true;
    const InferenceResult ring = run(m, r, {}, &ops);
    EXPECT_EQ(ring.logits, resident.logits) << "ahead " << ahead;
    EXPECT_EQ(ring.generated, resident.generated) << "ahead " << ahead;
    EXPECT_EQ(ring.tokens_per_layer_expert, resident.tokens_per_layer_expert);
    // Every pass loads every layer once (the ring runs on: a pass's last layers load the next
    // pass's first ones), each load a param_fetch program op on the copy track.
    int64_t bytes = 0;
    for (const InferencePass& p : ring.passes) bytes += p.copy_bytes;
    if (layer_bytes == 0) layer_bytes = bytes / static_cast<int64_t>(ring.passes.size());
    EXPECT_EQ(bytes, layer_bytes * static_cast<int64_t>(ring.passes.size())) << "ahead " << ahead;
    size_t loads = 0;
    for (const OpEvent& e : ops.events)
      if (e.copy && std::string(e.op) == "param_fetch") ++loads;
    EXPECT_EQ(loads, ring.passes.size() * 3u) << "ahead " << ahead;
    EXPECT_GT(ops.program_seconds["forward param_fetch"], 0);
  }
  EXPECT_GT(layer_bytes, 0);
  for (const InferencePass& p : resident.passes) EXPECT_EQ(p.copy_bytes, 0);
}

TEST(MoeInference, AModelLargerThanTheArenaRunsOnlyAsARing) {
  const ModelSpec m = small_model(8);
  InferenceSettings s = settings();
  InferenceSettings ring = s;
  ring.ring = true;
  ring.ring_ahead = 1;  // two layer slots
  // The device peak of each, unbounded; then an arena between them.
  int64_t resident_peak = 0, ring_peak = 0;
  for (auto [settings, peak] : {std::pair{&s, &resident_peak}, std::pair{&ring, &ring_peak}}) {
    auto dev = cpu_device({});
    MoeInference::create(m, *settings, *dev, *dev)->generate();
    *peak = dev->memory().peak(Tier::kGPU);
  }
  ASSERT_LT(ring_peak, resident_peak);
  TierCapacity cap;
  cap.device_bytes = (ring_peak + resident_peak) / 2;
  auto dev = cpu_device(cap);
  EXPECT_THROW(MoeInference::create(m, s, *dev, *dev), OutOfMemory);
  auto inf = MoeInference::create(m, ring, *dev, *dev);
  // Every layer's weights are in host memory; the device keeps the embedding, the final norm and
  // the head (2 x 32 x 16 + 16 floats).
  EXPECT_EQ(inf->weight_bytes() - dev->memory().in_use(Tier::kCPU), (2 * 32 * 16 + 16) * 4);
  const InferenceResult r = inf->generate();
  EXPECT_LE(dev->memory().peak(Tier::kGPU), cap.device_bytes);
  EXPECT_EQ(r.generated.size(), 12u);
}

TEST(MoeInference, TheWorkloadsRoutingSkewReachesTheGate) {
  const ModelSpec m = small_model();
  InferenceSettings s = settings();
  s.init_std = 0.02f;  // a near-uniform router: the skew decides
  s.routing_share = {0.7, 0.1, 0.1, 0.1};
  const InferenceResult r = run(m, s);
  int64_t hot = 0, total = 0;
  for (size_t i = 0; i < r.tokens_per_layer_expert.size(); ++i) {
    total += r.tokens_per_layer_expert[i];
    if (i % 4 == 0) hot += r.tokens_per_layer_expert[i];
  }
  // Top-2 of 4: expert 0 is among the two choices of most tokens (share 0.7 of the first pick).
  EXPECT_GT(static_cast<double>(hot) / static_cast<double>(total), 0.35);
  EXPECT_EQ(total, 2 * (3 * 5 + 4 * 3) * 2);  // 2 MoE layers, top-2, prompts and decode steps
}

TEST(MoeInference, UnsupportedPlansAreNamed) {
  const ModelSpec m = testing::bundled().load_model("tiny-moe");
  Plan p;
  EXPECT_TRUE(inference_unsupported(m, p).empty());
  p.ep = 2;
  ASSERT_EQ(inference_unsupported(m, p).size(), 1u);
  EXPECT_EQ(inference_unsupported(m, p)[0].path, "plan");
  InferenceSettings s;
  s.prompt_tokens = {1, 2};
  auto dev = cpu_device({});
  EXPECT_THROW(MoeInference::create(m, s, *dev, *dev), ConfigError);
}

}  // namespace
}  // namespace switchyard
