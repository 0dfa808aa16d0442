#include "core/model.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

using testing::bundled;
using testing::tiny_model_json;

TEST(ModelSpec, ParsesDefaults) {
  ModelSpec m = parse_model(tiny_model_json());
  EXPECT_EQ(m.head_dim, 4);  // hidden / heads
  EXPECT_EQ(m.activation, Activation::kSwiGLU);
  EXPECT_EQ(m.norm, NormKind::kRMSNorm);
  ASSERT_TRUE(m.moe);
  EXPECT_EQ(m.moe->shared_expert_ffn_hidden_size, 6);
  EXPECT_FALSE(m.is_moe_layer(0));
  EXPECT_TRUE(m.is_moe_layer(1));
  EXPECT_EQ(m.num_moe_layers(), 1);
}

// Counted by hand:
//   attention/layer = q 8*8 + k,v 2*8*4 + o 8*8 = 192;  norms = 2 layers * 2 * 8 + final 8 = 40
//   dense FFN (layer 0) = 3*8*16 = 384;  MoE layer: experts 4*3*8*6 = 576, shared 144, gate 32
//   embeddings = 2 * 10*8 = 160 (untied)
//   total = 160 + 384 + 40 + 384 + 576 + 144 + 32 = 1720; active = 1720 - 576 + 2*144 = 1432
TEST(ModelSpec, ParameterCountsByHand) {
  ModelSpec m = parse_model(tiny_model_json());
  EXPECT_EQ(attention_params_per_layer(m), 192);
  ParamCounts c = count_params(m);
  EXPECT_EQ(c.embedding, 160);
  EXPECT_EQ(c.attention, 384);
  EXPECT_EQ(c.norms, 40);
  EXPECT_EQ(c.dense_ffn, 384);
  EXPECT_EQ(c.routed_experts, 576);
  EXPECT_EQ(c.shared_experts, 144);
  EXPECT_EQ(c.gates, 32);
  EXPECT_EQ(c.total(), 1720);
  EXPECT_EQ(c.expert(), 576);
  EXPECT_EQ(c.dense(), 1144);
  EXPECT_EQ(c.active, 1432);
}

// Forward: 2 * (active 1432 - norms 40 - input embedding 80) = 2624 for the matmuls, plus attention
// scores 2 layers * 2 * seq 6 * heads 2 * (qk 4 + v 4) = 384. Backward is twice the forward.
TEST(ModelSpec, FlopsPerTokenByHand) {
  ModelSpec m = parse_model(tiny_model_json());
  FlopsPerToken f = flops_per_token(m, 6);
  EXPECT_DOUBLE_EQ(f.forward, 2624.0 + 384.0);
  EXPECT_DOUBLE_EQ(f.backward, 2.0 * f.forward);
  // Longer sequences only add attention-score work.
  EXPECT_DOUBLE_EQ(flops_per_token(m, 12).forward - f.forward, 384.0);
}

TEST(ModelSpec, MultiTaskGatesCountOncePerTask) {
  Json j = tiny_model_json();
  j["tasks"] =
      Json::parse(R"([{"name": "a", "token_share": 0.25}, {"name": "b", "token_share": 0.75}])");
  ModelSpec m = parse_model(j);
  ParamCounts c = count_params(m);
  EXPECT_EQ(c.gates, 64);     // two gates of 8*4
  EXPECT_EQ(c.active, 1432);  // a token passes through one gate
  EXPECT_EQ(c.total(), 1720 + 32);
}

TEST(ModelSpec, MlaAttentionMatchesDeepSeekV3) {
  ModelSpec m = bundled().load_model("deepseek-v3");
  // q: 7168*1536 + 1536 + 1536*128*192; kv: 7168*576 + 512 + 512*128*256; o: 128*128*7168.
  EXPECT_EQ(attention_params_per_layer(m), 48760320 + 20906496 + 117440512);
  EXPECT_EQ(m.num_moe_layers(), 58);
}

TEST(ModelSpec, BundledModelsMatchPublishedParameterCounts) {
  const ConfigRegistry reg = bundled();
  int checked = 0;
  for (const std::string& name : reg.list(ConfigKind::kModel)) {
    ModelSpec m = reg.load_model(name);
    if (!m.published) continue;
    ParamCounts c = count_params(m);
    const double total_err = static_cast<double>(c.total()) / m.published->total_params - 1.0;
    EXPECT_LE(std::fabs(total_err), 0.02)
        << name << ": derived total " << c.total() << " vs published " << m.published->total_params;
    if (m.published->active_params > 0) {
      const double active_err = static_cast<double>(c.active) / m.published->active_params - 1.0;
      EXPECT_LE(std::fabs(active_err), 0.02) << name << ": derived active " << c.active
                                             << " vs published " << m.published->active_params;
    }
    ++checked;
  }
  EXPECT_GE(checked, 12);  // every bundled model but the tiny and the UFO-style one
}

TEST(ModelSpec, RejectsInconsistentArchitecture) {
  Json j = tiny_model_json();
  j["num_kv_heads"] = 3;
  j["moe"]["top_k"] = 5;
  j["moe"]["layers"] = Json::parse("[0, 7, 0]");
  j["tasks"] = Json::parse(R"([{"name": "a", "token_share": 0.5}])");
  try {
    parse_model(j);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    std::string all = e.what();
    EXPECT_NE(all.find("model.num_kv_heads: 3 does not divide num_attention_heads 2"),
              std::string::npos)
        << all;
    EXPECT_NE(all.find("model.moe.top_k: top_k 5 exceeds num_experts 4"), std::string::npos) << all;
    EXPECT_NE(all.find("model.moe.layers[1]: layer 7 is outside [0, 2)"), std::string::npos) << all;
    EXPECT_NE(all.find("model.moe.layers[2]: layer 0 listed twice"), std::string::npos) << all;
    EXPECT_NE(all.find("model.tasks: token shares must sum to 1"), std::string::npos) << all;
  }
}

TEST(ModelSpec, AllMoeModelWithoutDenseWidthRoundTrips) {
  Json j = tiny_model_json();
  j.erase("ffn_hidden_size");
  j["moe"]["layers"] = "all";
  const ModelSpec a = parse_model(j);
  EXPECT_TRUE(parse_model(to_json(a)) == a);
}

TEST(ModelSpec, MlaNeedsNoHeadDim) {
  Json j = tiny_model_json();
  j["num_attention_heads"] = 3;  // 8 is not a multiple of 3: fine, MLA heads have their own widths
  j["num_kv_heads"] = 3;
  j["attention"] = Json::parse(R"({"kind": "mla", "q_lora_rank": 0, "kv_lora_rank": 4,
                                   "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2})");
  EXPECT_EQ(parse_model(j).head_dim, 4);
}

TEST(ModelSpec, BundledNamesMatchTheirFiles) {
  const ConfigRegistry reg = bundled();
  for (const auto& n : reg.list(ConfigKind::kModel)) EXPECT_EQ(reg.load_model(n).name, n);
  for (const auto& n : reg.list(ConfigKind::kCluster)) EXPECT_EQ(reg.load_cluster(n).name, n);
  for (const auto& n : reg.list(ConfigKind::kPlan)) EXPECT_EQ(reg.load_plan(n).name, n);
  for (const auto& n : reg.list(ConfigKind::kWorkload)) EXPECT_EQ(reg.load_workload(n).name, n);
}

TEST(ModelSpec, DenseModelNeedsFfnHiddenSize) {
  Json j = tiny_model_json();
  j.erase("ffn_hidden_size");
  EXPECT_THROW(parse_model(j), ConfigError);  // layer 0 is dense
  j["moe"]["layers"] = "all";
  EXPECT_NO_THROW(parse_model(j));
}

}  // namespace
}  // namespace switchyard
