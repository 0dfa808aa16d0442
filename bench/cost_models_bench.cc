// How fast the cost formulas are: the tuner evaluates millions of candidate plans, so one
// collective, one memory breakdown and one validation must each cost microseconds or less.
// Run: build/bench/cost_models_bench --benchmark_format=json
#include <benchmark/benchmark.h>

#include "core/config_registry.h"
#include "core/validate.h"
#include "cost_models/collectives.h"
#include "cost_models/compute.h"
#include "cost_models/memory.h"

namespace sy = switchyard;

namespace {

sy::Inputs mixtral() {
  sy::InputNames n;
  n.plan = "mixtral-8x7b-megatron";
  return sy::load_inputs(sy::ConfigRegistry(SWITCHYARD_CONFIG_DIR), n);
}

void BM_AllReduceCost(benchmark::State& state) {
  const sy::Inputs in = mixtral();
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  double bytes = 1 << 20;
  for (auto _ : state) {
    benchmark::DoNotOptimize(sy::all_reduce_cost(bytes, {64, 8}, in.cluster, prof));
    bytes = bytes < 1e10 ? bytes * 1.01 : 1 << 20;
  }
}
BENCHMARK(BM_AllReduceCost);

void BM_HierarchicalAllToAllCost(benchmark::State& state) {
  const sy::Inputs in = mixtral();
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  for (auto _ : state)
    benchmark::DoNotOptimize(sy::hierarchical_all_to_all_cost(64e6, {64, 8}, in.cluster, prof));
}
BENCHMARK(BM_HierarchicalAllToAllCost);

void BM_GroupedGemmCost(benchmark::State& state) {
  const sy::Inputs in = mixtral();
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  std::vector<int64_t> rows(static_cast<size_t>(state.range(0)), 512);
  for (auto _ : state)
    benchmark::DoNotOptimize(
        sy::grouped_gemm_cost(rows, 14336, 4096, sy::Precision::kBF16, in.cluster.gpu, prof));
}
BENCHMARK(BM_GroupedGemmCost)->Arg(8)->Arg(256);

void BM_PeakMemory(benchmark::State& state) {
  const sy::Inputs in = mixtral();
  const sy::CostProfile prof = sy::default_cost_profile(in.cluster);
  for (auto _ : state)
    benchmark::DoNotOptimize(
        sy::peak_memory_per_gpu(in.model, in.cluster, in.plan, in.workload, prof));
}
BENCHMARK(BM_PeakMemory);

void BM_Validate(benchmark::State& state) {
  const sy::Inputs in = mixtral();
  for (auto _ : state)
    benchmark::DoNotOptimize(sy::validate(in.plan, in.model, in.cluster, in.workload));
}
BENCHMARK(BM_Validate);

}  // namespace

BENCHMARK_MAIN();
