// Timing for the executor benchmarks: the median of repeated wall-clock timings.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace switchyard::bench {

// Median of `reps` timings of f, after one untimed warm-up. (The executor's Device calls complete
// before they return, so wall time around one is its time.)
template <typename F>
double median_s(int reps, F f) {
  using Clock = std::chrono::steady_clock;
  f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto s = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - s).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace switchyard::bench
