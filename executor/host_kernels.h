// Kernels that run on the host's CPU whatever the backend: the CPU backend's device kernels call
// them, and so does the runner for work a plan places on the host (Adam over optimizer states in
// host memory or on SSD, as ZeRO-Offload and SE-MoE update them).
#pragma once

#include <cmath>
#include <cstddef>

namespace switchyard {

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

}  // namespace switchyard
