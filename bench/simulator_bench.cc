// Speed of the two fidelities: estimate() of the 64-GPU Mixtral-8x7B reference plan (target:
// >= 100,000 plans/s on one core, i.e. <= 10 us per plan) and simulate() of DeepSeek-V3 on 1,024
// H100s with PP16 EP64 (target: < 100 ms per step). Run:
//   build/bench/simulator_bench --benchmark_format=json
// and compare plans_per_s and the DeepSeek-V3 time per iteration with the targets.
#include <benchmark/benchmark.h>

#include "core/config_registry.h"
#include "simulator/simulator.h"

namespace sy = switchyard;

namespace {

sy::Inputs load(const char* plan) {
  sy::InputNames n;
  n.plan = plan;
  return sy::load_inputs(sy::ConfigRegistry(SWITCHYARD_CONFIG_DIR), n);
}

void BM_EstimateMixtral64(benchmark::State& state) {
  const sy::Inputs in = load("mixtral-8x7b-megatron");
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  for (auto _ : state)
    benchmark::DoNotOptimize(sy::estimate(in.model, in.cluster, in.plan, in.workload, prof));
  state.counters["plans_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EstimateMixtral64);

void BM_SimulateMixtral64(benchmark::State& state) {
  const sy::Inputs in = load("mixtral-8x7b-megatron");
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  for (auto _ : state)
    benchmark::DoNotOptimize(sy::simulate(in.model, in.cluster, in.plan, in.workload, prof));
  state.SetLabel(
      "ops per step: " +
      std::to_string(sy::simulate(in.model, in.cluster, in.plan, in.workload, prof).ops));
}
BENCHMARK(BM_SimulateMixtral64)->Unit(benchmark::kMillisecond);

// DeepSeek-V3's published mapping (PP16, EP64, ZeRO-1) moved to 1,024 H100s: dp 64.
void BM_SimulateDeepSeekV3_1024(benchmark::State& state) {
  sy::Inputs in = load("deepseek-v3-paper");
  in.cluster =
      sy::with_nodes(sy::ConfigRegistry(SWITCHYARD_CONFIG_DIR).load_cluster("dgx-h100"), 128);
  in.plan.dp = 64;
  in.workload.global_batch_size = 64 * 64;  // 64 micro-batches per replica
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  int64_t ops = 0;
  for (auto _ : state) {
    const sy::Prediction p = sy::simulate(in.model, in.cluster, in.plan, in.workload, prof);
    ops = p.ops;
    benchmark::DoNotOptimize(p);
  }
  state.SetLabel("ops per step: " + std::to_string(ops));
  state.counters["ops_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * static_cast<double>(ops),
                         benchmark::Counter::kIsRate);
}
BENCHMARK(BM_SimulateDeepSeekV3_1024)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
