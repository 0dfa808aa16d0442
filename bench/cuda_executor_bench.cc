// CUDA backend speed on the GPU in hand (prints JSON; the targets are ratios within this run):
//  - the experts' grouped GEMM against one cuBLAS GEMM of the same FLOPs (all routed rows against
//    one expert's weight; target >= 0.70), balanced and skewed routing, fp32 / tf32 / bf16;
//  - a host -> device copy (pinned host memory, the copy engine's thread) alone, a GEMM loop
//    alone, and both at once: the fraction of the copy hidden behind the compute.
// Without a GPU it prints {"skipped": reason} and exits 0.
// Run: build/bench/cuda_executor_bench
#include <algorithm>
#include <iostream>
#include <random>
#include <thread>

#include "bench/bench_timing.h"
#include "core/json_io.h"
#include "executor/copy_engine.h"
#include "executor/cuda/cuda_device.h"
#include "executor/cuda/device_info.h"

namespace sy = switchyard;

namespace {

using switchyard::bench::median_s;

sy::Buffer random_buffer(sy::Device& dev, size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  sy::Buffer b = dev.memory().allocate(sy::Tier::kGPU, n * sizeof(float), "bench", false);
  dev.copy(b.data(), v.data(), n * sizeof(float));
  return b;
}

sy::Json expert_gemm(sy::GemmMath math, const char* math_name, const std::vector<int>& rows, int k,
                     int n) {
  auto dev = sy::cuda_device({}, {0, math});
  int total = 0;
  for (int r : rows) total += r;
  sy::Buffer a = random_buffer(*dev, static_cast<size_t>(total) * k, 1);
  sy::Buffer c = dev->memory().allocate(sy::Tier::kGPU, sizeof(float) * total * n, "c", false);
  std::vector<sy::Buffer> w;
  std::vector<const float*> wp;
  for (size_t e = 0; e < rows.size(); ++e) {
    w.push_back(random_buffer(*dev, static_cast<size_t>(k) * n, 2 + static_cast<uint32_t>(e)));
    wp.push_back(w.back().as<float>());
  }
  const double grouped =
      median_s(9, [&] { dev->grouped_gemm(a.as<float>(), k, rows, wp, false, n, c.as<float>()); });
  const double dense = median_s(9, [&] {
    dev->gemm(false, false, total, n, k, 1.0f, a.as<float>(), k, wp[0], n, 0.0f, c.as<float>(), n);
  });
  const double flops = 2.0 * total * k * n;
  return {{"math", math_name},
          {"rows_per_expert", rows},
          {"k", k},
          {"n", n},
          {"grouped_s", grouped},
          {"dense_s", dense},
          {"grouped_tflops", flops / grouped / 1e12},
          {"dense_tflops", flops / dense / 1e12},
          {"grouped_over_dense_rate", dense / grouped},
          {"target", 0.70}};
}

// A host -> device copy on the copy engine's thread while this thread runs GEMMs.
sy::Json copy_overlap() {
  auto dev = sy::cuda_device({});
  const size_t bytes = size_t{256} << 20;
  sy::Buffer host = dev->memory().allocate(sy::Tier::kCPU, bytes, "host", true);
  sy::Buffer gpu = dev->memory().allocate(sy::Tier::kGPU, bytes, "device", false);
  const int m = 4096, nk = 4096;
  sy::Buffer a = random_buffer(*dev, static_cast<size_t>(m) * nk, 1);
  sy::Buffer b = random_buffer(*dev, static_cast<size_t>(nk) * nk, 2);
  sy::Buffer c = dev->memory().allocate(sy::Tier::kGPU, sizeof(float) * m * nk, "c", false);
  sy::CopyEngine engine(*dev);
  const auto copy = [&] { engine.wait(engine.submit(gpu.data(), host.data(), bytes)); };
  const double copy_s = median_s(5, copy);
  // As many GEMMs as take about as long as the copy.
  const double gemm_s = median_s(5, [&] {
    dev->gemm(false, false, m, nk, nk, 1.0f, a.as<float>(), nk, b.as<float>(), nk, 0.0f,
              c.as<float>(), nk);
  });
  const int gemms = std::max(1, static_cast<int>(copy_s / gemm_s + 0.5));
  const auto compute = [&] {
    for (int i = 0; i < gemms; ++i)
      dev->gemm(false, false, m, nk, nk, 1.0f, a.as<float>(), nk, b.as<float>(), nk, 0.0f,
                c.as<float>(), nk);
  };
  const double compute_s = median_s(5, compute);
  const double both_s = median_s(5, [&] {
    const auto t = engine.submit(gpu.data(), host.data(), bytes);
    compute();
    engine.wait(t);
  });
  // Hidden: the part of the shorter one that did not add to the longer one.
  const double hidden =
      std::clamp((copy_s + compute_s - both_s) / std::min(copy_s, compute_s), 0.0, 1.0);
  return {{"copy_bytes", bytes},
          {"copy_s", copy_s},
          {"host_to_device_GBps", static_cast<double>(bytes) / copy_s / 1e9},
          {"compute_s", compute_s},
          {"gemms", gemms},
          {"both_s", both_s},
          {"overlap_fraction", hidden}};
}

}  // namespace

int main() {
  std::string reason;
  const auto gpus = sy::cuda_devices(&reason);
  if (gpus.empty()) {
    std::cout << sy::Json{{"skipped", "no CUDA device: " + reason}}.dump(2) << "\n";
    return 0;
  }
  sy::Json out;
  out["device"] = gpus[0].name;
  out["expert_gemm"] = sy::Json::array();
  // gpu-moe-650m's experts (16,384 tokens, top-2 of 8: 4,096 rows each; h 1024, 2 x 2816 wide)
  // and Mixtral-8x7B's (h 4096, 2 x 14336), balanced and skewed (the hottest expert 4x the
  // coldest).
  const std::vector<std::vector<int>> routings = {{4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096},
                                                  {8192, 6144, 4096, 4096, 3072, 3072, 2048, 2048}};
  for (const auto& [math, name] :
       {std::pair{sy::GemmMath::kFp32, "fp32"}, std::pair{sy::GemmMath::kTf32, "tf32"},
        std::pair{sy::GemmMath::kBf16, "bf16"}}) {
    for (const auto& rows : routings)
      out["expert_gemm"].push_back(expert_gemm(math, name, rows, 1024, 5632));
    out["expert_gemm"].push_back(
        expert_gemm(math, name, {2048, 2048, 2048, 2048, 2048, 2048, 2048, 2048}, 4096, 28672));
  }
  out["host_to_device_overlap"] = copy_overlap();
  std::cout << out.dump(2) << "\n";
  return 0;
}
