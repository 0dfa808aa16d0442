// Inputs for simulator tests: a mid-size MoE model that fits easily, on DGX-A100-like nodes whose
// NICs a test can slow down.
#pragma once

#include "core/validate.h"
#include "simulator/simulator.h"
#include "tests/core/test_util.h"

namespace switchyard::testing {

inline ModelSpec moe_model(int experts = 32, int top_k = 2) {
  Json j = Json::parse(R"({
    "schema_version": 1, "name": "moe-test", "num_layers": 8, "hidden_size": 2048, "ffn_hidden_size": 8192,
    "num_attention_heads": 16, "num_kv_heads": 8, "vocab_size": 32000, "seq_len": 2048,
    "moe": {"num_experts": 32, "top_k": 2, "expert_ffn_hidden_size": 4096}
  })");
  j["moe"]["num_experts"] = experts;
  j["moe"]["top_k"] = top_k;
  return parse_model(j);
}

inline ClusterSpec a100_nodes(int nodes, double nic_bw_Bps = 25e9, int nics = 8) {
  ClusterSpec c = bundled().load_cluster("dgx-a100");
  c.inter_node.nics_per_node = nics;
  c.inter_node.nic_bw_Bps = nic_bw_Bps;
  return with_nodes(c, nodes);
}

inline Workload train(int64_t global_batch, int64_t seq, Precision p = Precision::kBF16) {
  Workload w;
  w.name = "test";
  w.global_batch_size = global_batch;
  w.seq_len = seq;
  w.precision = p;
  return w;
}

inline Plan plan_of(const char* json) { return parse_plan(Json::parse(json)); }

// Fails the test when the combination is invalid.
inline void expect_valid(const Plan& p, const ModelSpec& m, const ClusterSpec& c,
                         const Workload& w) {
  const auto issues = validate(p, m, c, w);
  std::string got;
  for (const auto& i : issues) got += "\n  " + i.to_string();
  ASSERT_TRUE(issues.empty()) << got;
}

}  // namespace switchyard::testing
