// SE-MoE against DeepSpeed-MoE on the bundled UFO-style 12B model on 48 A100s (prints JSON, asserts
// nothing): the bundled plan A (DeepSpeed-style: flat all-to-all, ZeRO-2) against the bundled plan
// B (hierarchical all-to-all, fused gradient buckets, elastic replicas, Adam's states in host
// memory with the delayed update) and its variants: without offload; with the host's Adam inside
// the step (no delay); with the dense parameters on SSD prefetched in 2D; with the expert
// parameters in host memory prefetched ahead. On the balanced and the unbalanced multi-task
// workload: step time, throughput over A, peak GPU memory, stall and exposed optimizer time.
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
  no_offload.delayed_update = false;
  sy::Plan in_step = bundled;
  in_step.delayed_update = false;
  sy::Plan dense_ssd_2d = bundled;
  dense_ssd_2d.placement.dense_params = sy::Tier::kSSD;
  dense_ssd_2d.prefetch = {2, sy::PrefetchDirection::k2D};
  sy::Plan experts_cpu_ahead = bundled;
  experts_cpu_ahead.placement.expert_params = sy::Tier::kCPU;
  experts_cpu_ahead.prefetch = {2, sy::PrefetchDirection::kAhead};
  const std::pair<const char*, const sy::Plan*> plans[] = {
      {"A_deepspeed", &a},
      {"B_semoe", &bundled},
      {"B_no_offload", &no_offload},
      {"B_host_adam_in_step", &in_step},
      {"B_dense_params_ssd_2d_prefetch", &dense_ssd_2d},
      {"B_expert_params_cpu_prefetch_ahead", &experts_cpu_ahead}};
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
