// The tuner on the two searches (prints JSON, asserts nothing):
//  - Mixtral-8x7B on 64 H100s (8 DGX nodes): space size, pruning counts, candidates/s, the time of
//    the whole search, its best plan against Megatron-Core's reference mapping (both predicted by
//    simulate), and the same search repeated against the store (cached) with its speed-up;
//  - DeepSeek-V3 on 1,024 H100s under 80 GiB: the same figures for a full search.
// Each search uses a fresh plan store in a temporary directory and every core.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>

#include "core/config_registry.h"
#include "simulator/simulator.h"
#include "tuner/tune.h"

namespace sy = switchyard;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

struct Run {
  sy::SearchOutcome outcome;
  double total_s = 0;
};

Run search(sy::Store& store, const sy::SearchSpace& space, const sy::SearchSettings& settings) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t id =
      store.begin_search({{"bench", true}}, space.key(), space.units(), space.candidates());
  Run r;
  r.outcome = sy::run_search(space, store, id, settings);
  r.total_s = seconds_since(t0);
  return r;
}

sy::Json figures(const sy::SearchSpace& space, const Run& r) {
  const sy::SearchOutcome& o = r.outcome;
  const sy::Finalist& best = o.top.front();
  return {
      {"space_candidates", space.candidates()},
      {"units", space.units()},
      {"unit_size", space.unit_size()},
      {"pruned", o.pruned},
      {"timed_with_estimate", o.evaluated},
      {"reranked_with_simulate", o.reranked},
      {"sweep_s", o.sweep_s},
      {"rerank_s", o.rerank_s},
      {"total_s", r.total_s},
      {"candidates_per_s", o.candidates_per_s},
      {"estimates_per_s", o.sweep_s > 0 ? static_cast<double>(o.fresh_evaluated) / o.sweep_s : 0.0},
      {"best_plan", sy::semantic_json(best.plan)},
      {"best_tokens_per_s", best.simulated.tokens_per_s},
      {"best_mfu", best.simulated.mfu},
      {"best_peak_gpu_gib", best.simulated.peak.gpu / double(1ull << 30)}};
}

}  // namespace

int main() {
  const sy::ConfigRegistry reg(SWITCHYARD_CONFIG_DIR);
  const auto dir = std::filesystem::temp_directory_path() /
                   ("switchyard_tuner_bench_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  sy::Json out = sy::Json::object();
  {
    const sy::ModelSpec m = reg.load_model("mixtral-8x7b");
    const sy::ClusterSpec c = reg.load_cluster("dgx-h100");
    const sy::Workload w = reg.load_workload("mixtral-8x7b-pretrain");
    sy::SpaceOptions o;
    o.gpus = {64};
    const sy::SearchSpace space = sy::SearchSpace::build(m, c, w, o);
    auto store = sy::Store::open(dir / "mixtral.db");
    const Run fresh = search(*store, space, {});
    const Run cached = search(*store, space, {});
    const sy::Plan ref = reg.load_plan("mixtral-8x7b-megatron");
    const sy::ClusterSpec c64 = sy::with_nodes(c, 8);
    const sy::Prediction ref_pred = sy::simulate(m, c64, ref, w, sy::default_cost_profile(c64));
    sy::Json j = figures(space, fresh);
    j["reference_plan"] = "mixtral-8x7b-megatron";
    j["reference_tokens_per_s"] = ref_pred.tokens_per_s;
    j["best_over_reference"] =
        fresh.outcome.top.front().simulated.tokens_per_s / ref_pred.tokens_per_s;
    j["target_total_s"] = 30;
    j["cached_total_s"] = cached.total_s;
    j["cached_reused_units"] = cached.outcome.reused_units;
    j["cached_speedup"] = fresh.total_s / cached.total_s;
    j["cached_same_best"] =
        cached.outcome.ranking.front().plan_hash == fresh.outcome.ranking.front().plan_hash;
    out["mixtral_8x7b_64xH100"] = j;
  }
  {
    const sy::ModelSpec m = reg.load_model("deepseek-v3");
    const sy::ClusterSpec c = reg.load_cluster("dgx-h100");
    const sy::Workload w = reg.load_workload("deepseek-v3-pretrain");
    sy::SpaceOptions o;
    o.gpus = {1024};
    const sy::SearchSpace space = sy::SearchSpace::build(m, c, w, o);
    auto store = sy::Store::open(dir / "deepseek.db");
    sy::SearchSettings settings;
    settings.constraints.max_gpu_bytes = 80.0 * (1ull << 30);
    const Run fresh = search(*store, space, settings);
    sy::Json j = figures(space, fresh);
    j["max_gpu_gib"] = 80;
    const sy::Plan paper = reg.load_plan("deepseek-v3-paper");
    const sy::ClusterSpec c1024 = sy::with_nodes(c, 128);
    const sy::Prediction p = sy::simulate(m, c1024, paper, w, sy::default_cost_profile(c1024));
    j["paper_plan_tokens_per_s"] = p.tokens_per_s;
    j["paper_plan_peak_gpu_gib"] = p.peak.gpu / double(1ull << 30);
    out["deepseek_v3_1024xH100"] = j;
  }
  std::filesystem::remove_all(dir);
  std::cout << out.dump(2) << "\n";
  return 0;
}
