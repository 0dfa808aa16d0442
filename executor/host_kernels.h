// Kernels that run on the host's CPU whatever the backend: the CPU backend's device kernels call
// them, and so does the runner for work a plan places on the host (Adam over optimizer states in
// host memory or on SSD, as ZeRO-Offload and SE-MoE update them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <thread>
#include <vector>

namespace switchyard {

// f(begin, end) over [0, n) in contiguous pieces on up to `threads` host threads (0: up to 16, the
// host's cores), at least `grain` elements each (one piece, on this thread, when n < 2 * grain).
// For host work that is independent per element: counter-based random draws, initial values.
template <typename F>
void parallel_for(size_t n, size_t grain, size_t threads, F&& f) {
  if (threads == 0) threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  const size_t pieces = std::min(threads, n / std::max<size_t>(grain, 1));
  if (pieces <= 1) return f(size_t{0}, n);
  std::vector<std::thread> pool;
  for (size_t t = 1; t < pieces; ++t) pool.emplace_back(f, n * t / pieces, n * (t + 1) / pieces);
  f(size_t{0}, n / pieces);
  for (auto& th : pool) th.join();
}

// One Adam step over n elements (bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t).
inline void host_adam(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                      float beta1, float beta2, float eps, float c1, float c2) {
  for (size_t i = 0; i < n; ++i) {
    const float g = grad[i];
    m[i] = beta1 * m[i] + (1 - beta1) * g;
    v[i] = beta2 * v[i] + (1 - beta2) * g * g;
    param[i] -= lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + eps);
  }
}

// host_adam over n elements on up to `threads` host threads (an offloaded update, ZeRO-Offload's
// CPU Adam): the same arithmetic per element whatever the thread count.
inline void host_adam_threads(size_t threads, float* param, const float* grad, float* m, float* v,
                              size_t n, float lr, float beta1, float beta2, float eps, float c1,
                              float c2) {
  parallel_for(n, size_t{1} << 14, std::max<size_t>(threads, 1), [&](size_t b, size_t e) {
    host_adam(param + b, grad + b, m + b, v + b, e - b, lr, beta1, beta2, eps, c1, c2);
  });
}

}  // namespace switchyard
