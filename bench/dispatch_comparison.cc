// Dispatch strategies against each other, simulated (prints JSON, asserts nothing):
//  1. Pipeline MoE (experts over the 8 TP ranks of a node, pipeline across 4 nodes) against
//     all-to-all expert parallelism over all 32 GPUs, as the network between nodes slows from 400
//     to 50 Gb/s per node: throughput ratio PPMoE / all-to-all.
//  2. SE-MoE's hierarchical all-to-all against the flat one as expert parallelism spans 1 to 8
//  nodes
//     with small per-peer messages: throughput ratio hierarchical / flat.
#include <iostream>

#include "core/config_registry.h"
#include "core/validate.h"
#include "simulator/simulator.h"

namespace sy = switchyard;

namespace {

sy::ModelSpec model(int experts) {
  sy::Json j = sy::Json::parse(R"({
    "schema_version": 1, "name": "moe-bench", "num_layers": 8, "hidden_size": 2048, "ffn_hidden_size": 8192,
    "num_attention_heads": 16, "num_kv_heads": 8, "vocab_size": 32000, "seq_len": 2048,
    "moe": {"num_experts": 32, "top_k": 2, "expert_ffn_hidden_size": 4096}})");
  j["moe"]["num_experts"] = experts;
  return sy::parse_model(j);
}

double step_time(const sy::ModelSpec& m, const sy::ClusterSpec& c, const sy::Plan& p,
                 const sy::Workload& w) {
  const auto issues = sy::validate(p, m, c, w);
  if (!issues.empty()) throw sy::ConfigError(issues);
  return sy::simulate(m, c, p, w, sy::default_cost_profile(c)).step_time_s;
}

}  // namespace

int main() {
  const sy::ConfigRegistry reg(SWITCHYARD_CONFIG_DIR);
  sy::Json out;
  {
    const sy::ModelSpec m = model(32);
    sy::Workload w;
    w.name = "bench";
    w.global_batch_size = 64;
    w.seq_len = 2048;
    const sy::Plan ppmoe = sy::parse_plan(sy::Json::parse(
        R"({"schema_version": 1, "tp": 8, "ep": 8, "pp": 4, "dispatch": "ppmoe_index_slice"})"));
    const sy::Plan a2a = sy::parse_plan(
        sy::Json::parse(R"({"schema_version": 1, "dp": 32, "ep": 32, "zero_stage": 1})"));
    sy::Json rows = sy::Json::array();
    for (double gbps : {400.0, 200.0, 100.0, 50.0}) {
      sy::ClusterSpec c = reg.load_cluster("dgx-a100");
      c.inter_node.nics_per_node = 1;
      c.inter_node.nic_bw_Bps = gbps / 8 * 1e9;
      c = sy::with_nodes(c, 4);
      const double t_ppmoe = step_time(m, c, ppmoe, w), t_a2a = step_time(m, c, a2a, w);
      rows.push_back({{"inter_node_gbps", gbps},
                      {"ppmoe_step_s", t_ppmoe},
                      {"all_to_all_step_s", t_a2a},
                      {"ppmoe_over_all_to_all_throughput", t_a2a / t_ppmoe}});
    }
    out["ppmoe_vs_all_to_all"] = rows;
  }
  {
    const sy::ModelSpec m = model(64);
    sy::Workload w;
    w.name = "bench";
    w.global_batch_size = 64;
    w.seq_len = 512;
    sy::Json rows = sy::Json::array();
    for (int nodes : {1, 2, 4, 8}) {
      const sy::ClusterSpec c = sy::with_nodes(reg.load_cluster("dgx-a100"), nodes);
      sy::Plan flat;
      flat.dp = 8 * nodes;
      flat.ep = 8 * nodes;
      sy::Plan hier = flat;
      hier.dispatch = sy::Dispatch::kHierarchicalAllToAll;
      const double t_flat = step_time(m, c, flat, w), t_hier = step_time(m, c, hier, w);
      rows.push_back({{"ep_nodes", nodes},
                      {"ep", flat.ep},
                      {"flat_step_s", t_flat},
                      {"hierarchical_step_s", t_hier},
                      {"hierarchical_over_flat_throughput", t_flat / t_hier}});
    }
    out["hierarchical_vs_flat"] = rows;
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}
