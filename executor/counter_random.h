// Counter-based randomness shared by the runners: a value is a pure function of its key (seed,
// names, indices), so every layout of a run (ranks, micro-batches, ring or resident weights) draws
// the same numbers without passing generator state around.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace switchyard {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// In (0, 1), from the top 53 bits.
inline double uniform01(uint64_t bits) {
  return (static_cast<double>(bits >> 11) + 0.5) / 9007199254740992.0;
}

// A workload's routing skew on one token's router logits (Gumbel-top-k): adds log(share_e) plus
// Gumbel noise drawn from `key` (fixed per token and layer), so the gate's top-k samples the
// experts in proportion to the shares while the router's own logits still count.
inline void add_gate_bias(float* logits, int experts, const std::vector<double>& log_share,
                          uint64_t key) {
  for (int e = 0; e < experts; ++e) {
    const double u = uniform01(splitmix64(key + static_cast<uint64_t>(e)));
    logits[e] += static_cast<float>(log_share[static_cast<size_t>(e)] - std::log(-std::log(u)));
  }
}

}  // namespace switchyard
