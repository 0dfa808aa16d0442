// SE-MoE against DeepSpeed-MoE on the bundled UFO-style 12B model on 48 A100s (prints JSON, asserts
// nothing): the bundled plan A (DeepSpeed-style: flat all-to-all, ZeRO-2) against SE-MoE-style
// plans (hierarchical all-to-all, fused gradient buckets, elastic replicas), without offload, with
// CPU optimizer states, and as bundled (experts on SSD), on the balanced and the unbalanced
// multi-task workload: step time, throughput ratio over A and peak GPU memory.
#include <iostream>

#include "core/config_registry.h"
#include "core/validate.h"
#include "simulator/simulator.h"

namespace sy = switchyard;

int main() {
  const sy::ConfigRegistry reg(SWITCHYARD_CONFIG_DIR);
  const sy::ModelSpec m = reg.load_model("ufo-12b");
  const sy::ClusterSpec c = sy::with_nodes(reg.load_cluster("dgx-a100"), 6);
  const sy::Plan a = reg.load_plan("ufo-12b-deepspeed");
  const sy::Plan bundled = reg.load_plan("ufo-12b-semoe");
  sy::Plan no_offload = bundled;
  no_offload.placement = sy::Placement{};
  no_offload.prefetch = sy::Prefetch{};
  sy::Plan cpu_optimizer = no_offload;
  cpu_optimizer.placement.optimizer_states = sy::Tier::kCPU;
  cpu_optimizer.prefetch = {2, sy::PrefetchDirection::kAhead};
  const std::pair<const char*, const sy::Plan*> plans[] = {
      {"A_deepspeed", &a},
      {"B_semoe_no_offload", &no_offload},
      {"B_semoe_cpu_optimizer", &cpu_optimizer},
      {"B_semoe_bundled", &bundled}};
  const sy::CostProfile prof = sy::default_cost_profile(c);
  sy::Json out = sy::Json::object();
  for (const char* wname : {"ufo-balanced", "ufo-multitask"}) {
    const sy::Workload w = reg.load_workload(wname);
    double base = 0;
    sy::Json rows = sy::Json::object();
    for (const auto& [name, plan] : plans) {
      const auto issues = sy::validate(*plan, m, c, w);
      if (!issues.empty()) {
        rows[name] = {{"invalid", issues.front().to_string()}};
        continue;
      }
      const sy::Prediction p = sy::simulate(m, c, *plan, w, prof);
      if (base == 0) base = p.step_time_s;
      rows[name] = {{"step_time_s", p.step_time_s},
                    {"throughput_over_A", base / p.step_time_s},
                    {"peak_gpu_gib", p.peak.gpu / double(1ull << 30)},
                    {"stall_s", p.time.stall_s},
                    {"optimizer_s", p.time.optimizer_s}};
    }
    out[wname] = rows;
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}
