// Predicted vs published bus bandwidth for every nccl-tests measurement Switchyard keeps
// (tests/data/published_collectives.json), on the cluster description the test cases assign
// (tests/data/collective_model_cases.json). Prints one JSON object: per entry the ratio
// predicted/measured, and per section the geometric mean and worst ratio.
#include <cmath>
#include <iostream>
#include <map>

#include "core/config_registry.h"
#include "cost_models/collectives.h"

namespace sy = switchyard;

int main() {
  const std::string dir = SWITCHYARD_TEST_DATA_DIR;
  const sy::Json data = sy::load_json_file(dir + "/published_collectives.json");
  const sy::Json cases = sy::load_json_file(dir + "/collective_model_cases.json");
  const sy::ConfigRegistry reg(SWITCHYARD_CONFIG_DIR);
  std::map<std::string, sy::Json> by_id;
  for (const auto& m : data.at("measurements")) by_id[m.at("id").get<std::string>()] = m;

  sy::Json out = {{"sections", sy::Json::object()}};
  for (const char* section : {"cases", "known_gaps"}) {
    sy::Json entries = sy::Json::array();
    double log_sum = 0, worst = 1;
    for (const auto& c : cases.at(section)) {
      const sy::Json& spec = cases.at("clusters").at(c.at("cluster").get<std::string>());
      for (const auto& id : c.at("ids")) {
        const sy::Json& m = by_id.at(id.get<std::string>());
        sy::ClusterSpec cl = reg.load_cluster(spec.at("base").get<std::string>());
        if (spec.contains("nics_per_node"))
          cl.inter_node.nics_per_node = spec.at("nics_per_node").get<int>();
        if (spec.contains("nic_bw_Bps"))
          cl.inter_node.nic_bw_Bps = spec.at("nic_bw_Bps").get<double>();
        const int nodes = m.at("nodes").get<int>(), per_node = m.at("gpus_per_node").get<int>();
        cl = sy::with_nodes(cl, nodes);
        const std::string name = m.at("collective").get<std::string>();
        const sy::Collective op = name == "all_reduce"   ? sy::Collective::kAllReduce
                                  : name == "all_gather" ? sy::Collective::kAllGather
                                  : name == "all_to_all" ? sy::Collective::kAllToAll
                                                         : sy::Collective::kReduceScatter;
        const auto cost =
            sy::collective_cost(op, m.at("bytes").get<double>(), {nodes * per_node, per_node}, cl,
                                sy::default_cost_profile(cl));
        const double measured = m.at("busbw_GBps").get<double>();
        const double ratio = cost.busbw_Bps / 1e9 / measured;
        log_sum += std::log(ratio);
        if (std::fabs(std::log(ratio)) > std::fabs(std::log(worst))) worst = ratio;
        entries.push_back({{"id", id},
                           {"measured_busbw_GBps", measured},
                           {"predicted_busbw_GBps", cost.busbw_Bps / 1e9},
                           {"ratio", ratio},
                           {"algorithm", cost.algorithm},
                           {"bottleneck", cost.bottleneck}});
      }
    }
    out["sections"][section] = {
        {"entries", entries},
        {"geomean_ratio", entries.empty() ? 1.0 : std::exp(log_sum / entries.size())},
        {"worst_ratio", worst}};
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}
