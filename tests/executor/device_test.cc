// The CPU Device: tier accounting with clean out-of-memory errors, SSD-tier buffers that are real
// files, and every kernel against a plain reference (GEMMs in all transposes, the experts' grouped
// GEMM, routing, permute/combine) or, for backwards, against finite differences.
#include "executor/device.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <stdexcept>

namespace switchyard {
namespace {

std::vector<float> random_vector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

TEST(Memory, TiersCountPeaksAndRefuseWithTheNumbers) {
  MemoryPools pools({/*device=*/1 << 20, /*host=*/0, /*ssd=*/0, {}});
  {
    Buffer a = pools.allocate(Tier::kGPU, 600 << 10, "activations");
    EXPECT_EQ(pools.in_use(Tier::kGPU), 600 << 10);
    try {
      pools.allocate(Tier::kGPU, 600 << 10, "expert weights of layer 3");
      FAIL() << "allocated past the arena";
    } catch (const OutOfMemory& e) {
      EXPECT_EQ(e.tier(), Tier::kGPU);
      EXPECT_EQ(e.requested_bytes(), 600 << 10);
      EXPECT_EQ(e.in_use_bytes(), 600 << 10);
      EXPECT_EQ(e.capacity_bytes(), 1 << 20);
      EXPECT_NE(std::string(e.what()).find("expert weights of layer 3"), std::string::npos);
    }
    Buffer host = pools.allocate(Tier::kCPU, 8 << 20, "optimizer states");  // unbounded
    EXPECT_EQ(pools.in_use(Tier::kCPU), 8 << 20);
  }
  EXPECT_EQ(pools.in_use(Tier::kGPU), 0);
  EXPECT_EQ(pools.peak(Tier::kGPU), 600 << 10);
  EXPECT_EQ(pools.peak(Tier::kCPU), 8 << 20);
}

TEST(Memory, SsdTierBuffersAreFilesOnDisk) {
  const auto dir = std::filesystem::temp_directory_path() / "switchyard_ssd_tier_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  MemoryPools pools({0, 0, 0, dir});
  {
    Buffer b = pools.allocate(Tier::kSSD, 3 << 20, "expert params");
    size_t files = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      ++files;
      EXPECT_EQ(std::filesystem::file_size(e.path()), 3u << 20);
    }
    EXPECT_EQ(files, 1u);
    float* f = b.as<float>();
    for (int i = 0; i < 1000; ++i) f[i] = static_cast<float>(i) * 0.5f;
    Buffer moved = std::move(b);
    EXPECT_EQ(moved.as<float>()[999], 499.5f);
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir));
  EXPECT_EQ(pools.in_use(Tier::kSSD), 0);
  std::filesystem::remove_all(dir);
}

TEST(CpuDevice, GemmMatchesTheDefinitionInEveryTranspose) {
  auto dev = cpu_device({});
  const int m = 7, n = 5, k = 9;
  const auto a = random_vector(m * k, 1), b = random_vector(k * n, 2), c0 = random_vector(m * n, 3);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      std::vector<float> c = c0;
      dev->gemm(ta, tb, m, n, k, 0.5f, a.data(), ta ? m : k, b.data(), tb ? k : n, 2.0f, c.data(),
                n);
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double want = 2.0 * c0[i * n + j];
          for (int p = 0; p < k; ++p) {
            const float av = ta ? a[p * m + i] : a[i * k + p];
            const float bv = tb ? b[j * k + p] : b[p * n + j];
            want += 0.5 * av * bv;
          }
          ASSERT_NEAR(c[i * n + j], want, 1e-4) << ta << tb;
        }
    }
}

TEST(CpuDevice, GroupedGemmIsEachExpertsOwnGemm) {
  auto dev = cpu_device({});
  const int k = 6, n = 4;
  const std::vector<int> rows = {3, 0, 5, 1};
  const auto a = random_vector(9 * k, 4);
  std::vector<std::vector<float>> w;
  std::vector<const float*> wp;
  for (int e = 0; e < 4; ++e) w.push_back(random_vector(k * n, 10 + e));
  for (auto& x : w) wp.push_back(x.data());
  std::vector<float> c(9 * n, -1.0f);
  dev->grouped_gemm(a.data(), k, rows, wp, /*trans_w=*/false, n, c.data());
  int row = 0;
  for (int e = 0; e < 4; ++e)
    for (int r = 0; r < rows[e]; ++r, ++row)
      for (int j = 0; j < n; ++j) {
        double want = 0;
        for (int p = 0; p < k; ++p) want += a[row * k + p] * w[e][p * n + j];
        ASSERT_NEAR(c[row * n + j], want, 1e-4);
      }
}

TEST(CpuDevice, RoutingPermuteAndCombineRoundTrip) {
  auto dev = cpu_device({});
  const int tokens = 11, experts = 4, top_k = 2, h = 3;
  const auto logits = random_vector(tokens * experts, 5);
  std::vector<float> probs(tokens * experts);
  const TokenRouting r = dev->route(logits.data(), tokens, experts, top_k, true, probs.data());
  int total = 0;
  for (int e = 0; e < experts; ++e) total += r.rows_per_expert[e];
  EXPECT_EQ(total, tokens * top_k);
  for (int t = 0; t < tokens; ++t) {
    float s = 0, w = 0;
    for (int e = 0; e < experts; ++e) s += probs[t * experts + e];
    EXPECT_NEAR(s, 1.0f, 1e-5);
    const int e0 = r.expert[t * top_k], e1 = r.expert[t * top_k + 1];
    EXPECT_NE(e0, e1);
    EXPECT_GE(probs[t * experts + e0], probs[t * experts + e1]);
    for (int e = 0; e < experts; ++e)
      if (e != e0 && e != e1) {
        EXPECT_LE(probs[t * experts + e], probs[t * experts + e1]);
      }
    w = r.weight[t * top_k] + r.weight[t * top_k + 1];
    EXPECT_NEAR(w, 1.0f, 1e-5);
  }
  // Rows of one expert keep token order.
  for (size_t i = 1; i < r.source.size(); ++i)
    if (r.expert[r.source[i]] == r.expert[r.source[i - 1]]) {
      EXPECT_LT(r.source[i - 1], r.source[i]);
    }
  const auto x = random_vector(tokens * h, 6);
  std::vector<float> permuted(tokens * top_k * h), back(tokens * h);
  dev->permute(x.data(), r, h, permuted.data());
  dev->unpermute_combine(permuted.data(), r, h, back.data());
  for (int i = 0; i < tokens * h; ++i) EXPECT_NEAR(back[i], x[i], 1e-5);
}

// d(sum(out * probe)) / d(input) by central differences, against the backward kernel.
template <typename Forward>
void expect_gradient(const std::vector<float>& input, const std::vector<float>& grad, size_t outs,
                     Forward forward, uint32_t seed) {
  const auto probe = random_vector(outs, seed);
  auto objective = [&](const std::vector<float>& in) {
    std::vector<float> out(outs);
    forward(in, out);
    double s = 0;
    for (size_t i = 0; i < outs; ++i) s += double{out[i]} * probe[i];
    return s;
  };
  for (size_t i = 0; i < input.size(); ++i) {
    std::vector<float> plus = input, minus = input;
    const float eps = 1e-2f;
    plus[i] += eps;
    minus[i] -= eps;
    const double numeric = (objective(plus) - objective(minus)) / (2.0 * eps);
    ASSERT_NEAR(grad[i], numeric, 2e-3 * std::max(1.0, std::abs(numeric))) << i;
  }
}

TEST(CpuDevice, SwigluBackwardMatchesFiniteDifferences) {
  auto dev = cpu_device({});
  const int rows = 3, f = 5;
  const auto x = random_vector(rows * 2 * f, 7);
  const auto probe = random_vector(rows * f, 8);
  std::vector<float> grad(x.size());
  dev->swiglu_backward(x.data(), probe.data(), rows, f, grad.data());
  expect_gradient(
      x, grad, rows * f,
      [&](const std::vector<float>& in, std::vector<float>& out) {
        dev->swiglu(in.data(), rows, f, out.data());
      },
      8);
}

TEST(CpuDevice, RowsGatherWithZerosAndScatterAddingRepeats) {
  auto dev = cpu_device({});
  const int width = 3;
  const std::vector<float> src = {1, 2, 3, 4, 5, 6, 7, 8, 9};  // 3 rows
  const std::vector<int> index = {2, -1, 0, 2};
  std::vector<float> gathered(index.size() * width, -1.0f);
  dev->gather_rows(src.data(), index.data(), 4, width, gathered.data());
  EXPECT_EQ(gathered, (std::vector<float>{7, 8, 9, 0, 0, 0, 1, 2, 3, 7, 8, 9}));
  // Scatter back: row 2 receives two rows (added when accumulating, the last one otherwise).
  std::vector<float> sum(9, 1.0f), put(9, 1.0f);
  dev->scatter_rows(gathered.data(), index.data(), 4, width, sum.data(), true);
  EXPECT_EQ(sum, (std::vector<float>{2, 3, 4, 1, 1, 1, 15, 17, 19}));
  dev->scatter_rows(gathered.data(), index.data(), 4, width, put.data(), false);
  EXPECT_EQ(put, (std::vector<float>{1, 2, 3, 1, 1, 1, 7, 8, 9}));
  // Strided copy: the middle column of each row.
  std::vector<float> col(3);
  dev->copy_2d(col.data(), sizeof(float), src.data() + 1, width * sizeof(float), sizeof(float), 3);
  EXPECT_EQ(col, (std::vector<float>{2, 5, 8}));
  std::vector<float> a = {1, 2}, b = {10, 20};
  dev->add(a.data(), b.data(), 2, a.data());
  EXPECT_EQ(a, (std::vector<float>{11, 22}));
  dev->zero(a.data(), sizeof(float) * 2);
  EXPECT_EQ(a, (std::vector<float>{0, 0}));
}

TEST(CpuDevice, PermuteAndCombineBackwardsMatchFiniteDifferences) {
  auto dev = cpu_device({});
  const int tokens = 5, experts = 3, top_k = 2, h = 4;
  const auto logits = random_vector(tokens * experts, 21);
  std::vector<float> probs(tokens * experts);
  // Capacity 3 drops some of the 10 choices: their rows do not exist and get no gradient.
  const TokenRouting r =
      dev->route(logits.data(), tokens, experts, top_k, true, probs.data(), /*capacity=*/3);
  ASSERT_GT(r.dropped, 0);
  const size_t kept = r.source.size();
  const auto y = random_vector(kept * h, 22), d_out = random_vector(tokens * h, 23);
  std::vector<float> d_y(kept * h), d_w(r.expert.size());
  dev->unpermute_combine_backward(y.data(), d_out.data(), r, h, d_y.data(), d_w.data());
  expect_gradient(
      y, d_y, tokens * h,
      [&](const std::vector<float>& in, std::vector<float>& out) {
        dev->unpermute_combine(in.data(), r, h, out.data());
      },
      23);
  for (size_t i = 0; i < r.expert.size(); ++i) {
    double dot = 0;
    if (r.row[i] >= 0)
      for (int c = 0; c < h; ++c) dot += double{d_out[i / top_k * h + c]} * y[r.row[i] * h + c];
    EXPECT_NEAR(d_w[i], dot, 1e-5) << i;
  }
  const auto x = random_vector(tokens * h, 24), d_perm = random_vector(kept * h, 25);
  std::vector<float> d_x(tokens * h, 7.0f);  // overwritten
  dev->permute_backward(d_perm.data(), r, h, d_x.data());
  expect_gradient(
      x, d_x, kept * h,
      [&](const std::vector<float>& in, std::vector<float>& out) {
        dev->permute(in.data(), r, h, out.data());
      },
      25);
}

TEST(CpuDevice, RouteBackwardMatchesFiniteDifferencesOfTheWeights) {
  auto dev = cpu_device({});
  const int tokens = 4, experts = 5;
  // Logits a step apart: a small perturbation keeps every token's top-k.
  std::vector<float> logits(tokens * experts);
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) logits[t * experts + e] = 0.3f * ((e * 3 + t) % experts);
  for (int top_k : {1, 2}) {
    std::vector<float> probs(tokens * experts), d_logits(tokens * experts);
    const TokenRouting r =
        dev->route(logits.data(), tokens, experts, top_k, top_k > 1, probs.data());
    const auto d_w = random_vector(r.expert.size(), 26);
    dev->route_backward(probs.data(), r, d_w.data(), top_k > 1, d_logits.data());
    expect_gradient(
        logits, d_logits, r.expert.size(),
        [&](const std::vector<float>& in, std::vector<float>& out) {
          std::vector<float> p(in.size());
          const TokenRouting q = dev->route(in.data(), tokens, experts, top_k, top_k > 1, p.data());
          ASSERT_EQ(q.expert, r.expert);
          out = q.weight;
        },
        26);
  }
}

TEST(CpuDevice, VocabParallelCrossEntropyEqualsTheWholeOne) {
  auto dev = cpu_device({});
  const int rows = 6, vocab = 10, half = vocab / 2;
  const auto logits = random_vector(rows * vocab, 27, 3.0f);
  const std::vector<int> labels = {0, 9, 4, 5, 2, 7};
  std::vector<float> whole = logits;
  const double want = dev->cross_entropy(whole.data(), labels.data(), rows, vocab, 0.5f);
  // Two "ranks" of 5 columns each; the reductions between the parts done here by hand.
  std::vector<std::vector<float>> part(2);
  std::vector<double> mx(rows, -1e300), sums(2 * rows, 0.0);
  for (int k = 0; k < 2; ++k) {
    for (int t = 0; t < rows; ++t)
      part[k].insert(part[k].end(), logits.begin() + t * vocab + k * half,
                     logits.begin() + t * vocab + (k + 1) * half);
    std::vector<double> m(rows);
    dev->row_max(part[k].data(), rows, half, m.data());
    for (int t = 0; t < rows; ++t) mx[t] = std::max(mx[t], m[t]);
  }
  for (int k = 0; k < 2; ++k) {
    std::vector<double> s(2 * rows);
    dev->softmax_sums(part[k].data(), labels.data(), rows, half, k * half, mx.data(), s.data());
    for (int i = 0; i < 2 * rows; ++i) sums[i] += s[i];
  }
  for (int k = 0; k < 2; ++k) {
    const double loss = dev->softmax_cross_entropy_grad(part[k].data(), labels.data(), rows, half,
                                                        k * half, mx.data(), sums.data(), 0.5f);
    EXPECT_NEAR(loss, want, 1e-9 * std::abs(want));
    for (int t = 0; t < rows; ++t)
      for (int j = 0; j < half; ++j)
        EXPECT_NEAR(part[k][t * half + j], whole[t * vocab + k * half + j], 1e-6);
  }
}

TEST(CpuDevice, RmsnormBackwardMatchesFiniteDifferences) {
  auto dev = cpu_device({});
  const int rows = 3, h = 6;
  const float eps = 1e-5f;
  const auto x = random_vector(rows * h, 9), g = random_vector(h, 10);
  const auto probe = random_vector(rows * h, 11);
  std::vector<float> dx(x.size()), dg(h, 0.0f);
  dev->rmsnorm_backward(x.data(), g.data(), probe.data(), rows, h, eps, dx.data(), dg.data());
  expect_gradient(
      x, dx, rows * h,
      [&](const std::vector<float>& in, std::vector<float>& out) {
        dev->rmsnorm(in.data(), g.data(), rows, h, eps, out.data());
      },
      11);
  expect_gradient(
      g, dg, rows * h,
      [&](const std::vector<float>& in, std::vector<float>& out) {
        dev->rmsnorm(x.data(), in.data(), rows, h, eps, out.data());
      },
      11);
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

TEST(CpuDevice, AttentionIsCausalAndItsBackwardMatchesFiniteDifferences) {
  auto dev = cpu_device({});
  const int batch = 2, seq = 4, heads = 2, d = 3, h = heads * d;
  const auto qkv = random_vector(batch * seq * 3 * h, 12);
  std::vector<float> out(batch * seq * h), lse(batch * heads * seq);
  dev->attention(qkv.data(), batch, seq, heads, d, out.data(), lse.data());
  // The first token attends only to itself: its output is its own value.
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < h; ++c)
      EXPECT_NEAR(out[b * seq * h + c], qkv[b * seq * 3 * h + 2 * h + c], 1e-6);
  // Changing the last token's key does not change earlier outputs.
  auto later = qkv;
  later[(seq - 1) * 3 * h + h] += 1.0f;
  std::vector<float> out2(out.size());
  dev->attention(later.data(), batch, seq, heads, d, out2.data(), lse.data());
  for (int t = 0; t < seq - 1; ++t)
    for (int c = 0; c < h; ++c) EXPECT_EQ(out[t * h + c], out2[t * h + c]);

  dev->attention(qkv.data(), batch, seq, heads, d, out.data(), lse.data());
  const auto probe = random_vector(out.size(), 13);
  std::vector<float> grad(qkv.size());
  dev->attention_backward(qkv.data(), out.data(), lse.data(), probe.data(), batch, seq, heads, d,
                          grad.data());
  expect_gradient(
      qkv, grad, out.size(),
      [&](const std::vector<float>& in, std::vector<float>& o) {
        std::vector<float> l(lse.size());
        dev->attention(in.data(), batch, seq, heads, d, o.data(), l.data());
      },
      13);
}

// The cache kernel is the same attention: a prefill (q_len = ctx) equals attention() on the same
// rows, and decoding the last position alone (q_len 1 against the cache) equals its prefill row.
TEST(CpuDevice, CachedAttentionMatchesFullAttentionForPrefillAndDecode) {
  auto dev = cpu_device({});
  const int batch = 2, seq = 5, heads = 2, d = 4, h = heads * d, cache_len = 7;
  const auto qkv = random_vector(batch * seq * 3 * h, 21);
  std::vector<float> want(batch * seq * h), lse(batch * heads * seq);
  dev->attention(qkv.data(), batch, seq, heads, d, want.data(), lse.data());
  // Keys and values into [batch, cache_len, h] caches (rows past seq stay garbage: never read).
  std::vector<float> k(batch * cache_len * h, 1e3f), v(batch * cache_len * h, -1e3f);
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < seq; ++t)
      for (int c = 0; c < h; ++c) {
        k[(b * cache_len + t) * h + c] = qkv[(b * seq + t) * 3 * h + h + c];
        v[(b * cache_len + t) * h + c] = qkv[(b * seq + t) * 3 * h + 2 * h + c];
      }
  std::vector<float> out(batch * seq * h);
  dev->attention_cached(qkv.data(), 3 * h, k.data(), v.data(), batch, seq, seq, cache_len, heads, d,
                        out.data());
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], want[i], 1e-6) << i;
  // Decode: only the last query of each sequence, against all seq cached positions.
  std::vector<float> q(batch * 3 * h), one(batch * h);
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < 3 * h; ++c) q[b * 3 * h + c] = qkv[(b * seq + seq - 1) * 3 * h + c];
  dev->attention_cached(q.data(), 3 * h, k.data(), v.data(), batch, 1, seq, cache_len, heads, d,
                        one.data());
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < h; ++c)
      EXPECT_NEAR(one[b * h + c], want[(b * seq + seq - 1) * h + c], 1e-6);
  EXPECT_THROW(dev->attention_cached(q.data(), 3 * h, k.data(), v.data(), batch, 1, cache_len + 1,
                                     cache_len, heads, d, one.data()),
               std::invalid_argument);
}

}  // namespace
}  // namespace switchyard
