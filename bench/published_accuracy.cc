// Predicted vs published training throughput (tests/data/published_throughput.json): for every
// published row, the mapping it lists is rebuilt as a Plan on DGX-H100 nodes, simulated, and the
// prediction printed beside the published figure as JSON with the ratio. Rows whose mapping the
// plan schema cannot express exactly are adapted (the adaptation is printed) or skipped (with the
// reason). This is an accuracy benchmark: it prints, it does not assert.
#include <cmath>
#include <iostream>

#include "core/config_registry.h"
#include "core/validate.h"
#include "simulator/simulator.h"

namespace sy = switchyard;

int main() {
  const sy::ConfigRegistry reg(SWITCHYARD_CONFIG_DIR);
  const sy::Json data =
      sy::load_json_file(std::string(SWITCHYARD_TEST_DATA_DIR) + "/published_throughput.json");
  sy::Json out = {{"entries", sy::Json::array()}};
  double log_sum = 0;
  int n = 0;
  for (const auto& e : data.at("entries")) {
    sy::Json row = {{"id", e.at("id")}, {"published", e.at("value")}, {"metric", e.at("metric")}};
    const sy::Json& map = e.at("mapping");
    const sy::ModelSpec model = reg.load_model(e.at("model").get<std::string>());
    const sy::ClusterSpec cluster =
        sy::with_nodes(reg.load_cluster("dgx-h100"), e.at("nodes").get<int>());
    sy::Plan plan;
    plan.tp = map.at("tp");
    plan.pp = map.at("pp");
    plan.vp = map.at("vp");
    plan.cp = map.at("cp");
    plan.dp = map.at("dp");
    plan.ep = map.at("ep");
    plan.micro_batch_size = map.at("micro_batch_size");
    plan.sequence_parallel = plan.tp > 1;
    plan.zero_stage = 1;
    plan.schedule = plan.vp > 1 ? sy::Schedule::kInterleaved1F1B : sy::Schedule::k1F1B;
    sy::Workload w;
    w.name = "published";
    w.global_batch_size = map.at("global_batch_size");
    w.seq_len = map.at("seq_len");
    w.precision =
        e.at("precision").get<std::string>() == "bf16" ? sy::Precision::kBF16 : sy::Precision::kFP8;
    // Interleaving needs every stage's layers to split into vp chunks: halve vp until they do.
    std::vector<std::string> adapted;
    while (plan.vp > 1 && !sy::validate(plan, model, cluster, w).empty()) {
      const auto layers = sy::resolve_stage_layers(plan, model);
      bool ok = true;
      for (int l : layers) ok = ok && l % plan.vp == 0;
      if (ok) break;
      adapted.push_back("vp " + std::to_string(plan.vp) + " -> " + std::to_string(plan.vp / 2));
      plan.vp /= 2;
      if (plan.vp == 1) plan.schedule = sy::Schedule::k1F1B;
    }
    const auto issues = sy::validate(plan, model, cluster, w);
    if (!issues.empty()) {
      std::string why;
      for (const auto& i : issues) why += (why.empty() ? "" : "; ") + i.to_string();
      row["skipped"] = why;
      out["entries"].push_back(row);
      continue;
    }
    const sy::CostProfile prof = sy::default_cost_profile(cluster);
    const sy::Prediction p = sy::simulate(model, cluster, plan, w, prof);
    const bool tflops = e.at("metric").get<std::string>() == "model_tflops_per_gpu";
    const double predicted = tflops ? p.model_tflops_per_gpu : p.tokens_per_s_per_gpu;
    const double ratio = predicted / e.at("value").get<double>();
    row["predicted"] = predicted;
    row["ratio"] = ratio;
    row["error_pct"] = 100.0 * (ratio - 1.0);
    row["predicted_peak_gpu_gib"] = p.peak.gpu / double(1ull << 30);
    row["adapted"] = adapted;
    row["mfu"] = p.mfu;
    log_sum += std::log(ratio);
    ++n;
    out["entries"].push_back(row);
  }
  out["geomean_ratio"] = n ? std::exp(log_sum / n) : 1.0;
  std::cout << out.dump(2) << "\n";
  return 0;
}
