// The contract test of the CUDA Device: every method runs on the GPU and on the CPU backend with
// the same random inputs (each device's own buffers, filled and read back through its copy), and
// the two agree: fp32 results within 1e-4 relative (norm of the difference over the norm of the
// CPU's), TokenRouting exactly. Also the tiers' memory (device pool, pinned host), copies between
// tiers and plain host memory, a copy thread beside the compute thread, the reduced-precision GEMM
// modes (their error reported and loosely bounded) and the errors. Without a GPU every device test
// skips with the driver's reason.
#include "executor/cuda/cuda_device.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "executor/cuda/cuda_check.h"
#include "executor/cuda/device_info.h"

namespace switchyard {
namespace {

constexpr double kTol = 1e-4;

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// |a - ref| / |ref| (|a| when ref is all zeros).
template <typename T>
double rel_err(const std::vector<T>& a, const std::vector<T>& ref) {
  EXPECT_EQ(a.size(), ref.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < std::min(a.size(), ref.size()); ++i) {
    const double d = double{a[i]} - double{ref[i]};
    diff += d * d;
    norm += double{ref[i]} * ref[i];
  }
  if (!std::isfinite(diff)) return INFINITY;
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// A tensor on both devices: the same contents to start with.
struct Twin {
  Buffer cpu, gpu;
  size_t n = 0;
  template <typename T = float>
  T* c() const {
    return cpu.as<T>();
  }
  template <typename T = float>
  T* g() const {
    return gpu.as<T>();
  }
};

class CudaContract : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string reason;
    if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
    gpu_ = cuda_device({});
    cpu_ = cpu_device({});
  }

  template <typename T>
  Twin twin(const std::vector<T>& v) {
    Twin t;
    t.n = v.size();
    const size_t bytes = v.size() * sizeof(T);
    t.cpu = cpu_->memory().allocate(Tier::kGPU, bytes, "test tensor (cpu)");
    t.gpu = gpu_->memory().allocate(Tier::kGPU, bytes, "test tensor (gpu)");
    cpu_->copy(t.cpu.data(), v.data(), bytes);
    gpu_->copy(t.gpu.data(), v.data(), bytes);
    return t;
  }
  Twin twin_floats(size_t n, uint32_t seed, float scale = 1.0f) {
    return twin(random_floats(n, seed, scale));
  }
  Twin twin_fill(size_t n, float value) { return twin(std::vector<float>(n, value)); }

  template <typename T = float>
  static std::vector<T> read(Device& dev, const Buffer& b, size_t n) {
    std::vector<T> v(n);
    dev.copy(v.data(), b.data(), n * sizeof(T));
    return v;
  }
  template <typename T = float>
  std::vector<T> cpu_values(const Twin& t) {
    return read<T>(*cpu_, t.cpu, t.n);
  }
  template <typename T = float>
  std::vector<T> gpu_values(const Twin& t) {
    return read<T>(*gpu_, t.gpu, t.n);
  }
  // The GPU's contents against the CPU's.
  template <typename T = float>
  double err(const Twin& t) {
    return rel_err(gpu_values<T>(t), cpu_values<T>(t));
  }

  std::unique_ptr<Device> gpu_, cpu_;
};

TEST(CudaDeviceApi, ParsesGemmMath) {
  EXPECT_EQ(parse_gemm_math("fp32"), GemmMath::kFp32);
  EXPECT_EQ(parse_gemm_math("tf32"), GemmMath::kTf32);
  EXPECT_EQ(parse_gemm_math("bf16"), GemmMath::kBf16);
  EXPECT_THROW(parse_gemm_math("fp16"), std::invalid_argument);
  EXPECT_THROW(parse_gemm_math(""), std::invalid_argument);
}

TEST(CudaDeviceApi, WithoutAGpuTheDeviceIsADeviceErrorWithTheDriversReason) {
  std::string reason;
  if (!cuda_devices(&reason).empty()) GTEST_SKIP() << "a CUDA device is present";
  try {
    cuda_device({});
    FAIL() << "made a CUDA device without a GPU";
  } catch (const DeviceError& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
    EXPECT_NE(e.code(), 0);
  }
}

TEST(CudaDeviceApi, AnAbsentDeviceIndexIsADeviceError) {
  std::string reason;
  const auto devices = cuda_devices(&reason);
  if (devices.empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  CudaOptions options;
  options.device = static_cast<int>(devices.size());
  EXPECT_THROW(cuda_device({}, options), DeviceError);
  auto dev = cuda_device({});
  EXPECT_NE(dev->name().find("cuda:0"), std::string::npos) << dev->name();
}

TEST_F(CudaContract, GemmInEveryTransposeWithStridesAndBeta) {
  const int m = 37, n = 29, k = 53, pad = 3;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (float beta : {0.0f, 1.0f, -0.5f}) {
        const int lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
        Twin a = twin_floats(static_cast<size_t>(ta ? k : m) * lda, 1);
        Twin b = twin_floats(static_cast<size_t>(tb ? n : k) * ldb, 2);
        Twin c = twin_floats(static_cast<size_t>(m) * ldc, 3);
        cpu_->gemm(ta, tb, m, n, k, 0.7f, a.c(), lda, b.c(), ldb, beta, c.c(), ldc);
        gpu_->gemm(ta, tb, m, n, k, 0.7f, a.g(), lda, b.g(), ldb, beta, c.g(), ldc);
        EXPECT_LT(err(c), kTol) << ta << tb << " beta " << beta;
      }
  // k = 0: C = beta C.
  for (float beta : {0.0f, 2.0f}) {
    Twin c = twin_floats(6 * 5, 4);
    cpu_->gemm(false, false, 6, 5, 0, 1.0f, nullptr, 1, nullptr, 5, beta, c.c(), 5);
    gpu_->gemm(false, false, 6, 5, 0, 1.0f, nullptr, 1, nullptr, 5, beta, c.g(), 5);
    EXPECT_LT(err(c), kTol) << "k = 0, beta " << beta;
  }
}

TEST_F(CudaContract, ReducedPrecisionGemmsStayCloseAndAreReported) {
  const int m = 256, n = 192, k = 512;
  Twin a = twin_floats(static_cast<size_t>(m) * k, 5),
       b = twin_floats(static_cast<size_t>(k) * n, 6);
  Twin c = twin_fill(static_cast<size_t>(m) * n, 0.0f);
  cpu_->gemm(false, false, m, n, k, 1.0f, a.c(), k, b.c(), n, 0.0f, c.c(), n);
  for (const char* mode : {"tf32", "bf16"}) {
    CudaOptions options;
    options.math = parse_gemm_math(mode);
    auto dev = cuda_device({}, options);
    Buffer da = dev->memory().allocate(Tier::kGPU, a.n * 4, "a");
    Buffer db = dev->memory().allocate(Tier::kGPU, b.n * 4, "b");
    Buffer dc = dev->memory().allocate(Tier::kGPU, c.n * 4, "c");
    const auto av = cpu_values(a), bv = cpu_values(b);
    dev->copy(da.data(), av.data(), a.n * 4);
    dev->copy(db.data(), bv.data(), b.n * 4);
    // beta = 1 on a C of zeros: beta is applied in fp32.
    dev->gemm(false, false, m, n, k, 1.0f, da.as<float>(), k, db.as<float>(), n, 1.0f,
              dc.as<float>(), n);
    const double e = rel_err(read(*dev, dc, c.n), cpu_values(c));
    RecordProperty(std::string(mode) + "_gemm_rel_error", std::to_string(e));
    std::printf("%s GEMM %dx%dx%d: relative error %.3g against fp32\n", mode, m, n, k, e);
    EXPECT_LT(e, 1e-2) << mode;
    EXPECT_GT(e, 1e-6) << mode << ": no rounding happened (fp32 math?)";
    // The experts' GEMMs in the same mode.
    const std::vector<int> rows = {40, 0, 100, 116};
    std::vector<Buffer> w;
    std::vector<const float*> wp;
    std::vector<std::vector<float>> wv;
    for (int e2 = 0; e2 < 4; ++e2) {
      wv.push_back(random_floats(static_cast<size_t>(k) * n, 30 + e2));
      w.push_back(dev->memory().allocate(Tier::kGPU, wv.back().size() * 4, "w"));
      dev->copy(w.back().data(), wv.back().data(), wv.back().size() * 4);
      wp.push_back(w.back().as<float>());
    }
    Buffer out = dev->memory().allocate(Tier::kGPU, c.n * 4, "out");
    dev->grouped_gemm(da.as<float>(), k, rows, wp, false, n, out.as<float>());
    std::vector<float> want(c.n);
    std::vector<const float*> wh;
    for (auto& x : wv) wh.push_back(x.data());
    cpu_->grouped_gemm(av.data(), k, rows, wh, false, n, want.data());
    const double ge = rel_err(read(*dev, out, c.n), want);
    std::printf("%s grouped GEMM: relative error %.3g against fp32\n", mode, ge);
    EXPECT_LT(ge, 1e-2) << mode;
    EXPECT_GT(ge, 1e-6) << mode;
    // Experts whose bf16 weights outgrow one conversion's scratch (18 x 16 MiB): converted in
    // turns. One weight serves every expert.
    const int big_k = 4096, big_n = 2048, experts = 18;
    const auto wbig = random_floats(static_cast<size_t>(big_k) * big_n, 60);
    const auto abig = random_floats(static_cast<size_t>(experts) * 8 * big_k, 61);
    Buffer dw = dev->memory().allocate(Tier::kGPU, wbig.size() * 4, "w");
    Buffer dab = dev->memory().allocate(Tier::kGPU, abig.size() * 4, "a");
    Buffer dout = dev->memory().allocate(Tier::kGPU, size_t{experts} * 8 * big_n * 4, "out");
    dev->copy(dw.data(), wbig.data(), wbig.size() * 4);
    dev->copy(dab.data(), abig.data(), abig.size() * 4);
    const std::vector<int> eight(experts, 8);
    dev->grouped_gemm(dab.as<float>(), big_k, eight,
                      std::vector<const float*>(experts, dw.as<float>()), false, big_n,
                      dout.as<float>());
    // The reference: the fp32 GPU (the CPU would take long).
    Buffer gw = gpu_->memory().allocate(Tier::kGPU, wbig.size() * 4, "w");
    Buffer ga = gpu_->memory().allocate(Tier::kGPU, abig.size() * 4, "a");
    Buffer gout = gpu_->memory().allocate(Tier::kGPU, size_t{experts} * 8 * big_n * 4, "out");
    gpu_->copy(gw.data(), wbig.data(), wbig.size() * 4);
    gpu_->copy(ga.data(), abig.data(), abig.size() * 4);
    gpu_->grouped_gemm(ga.as<float>(), big_k, eight,
                       std::vector<const float*>(experts, gw.as<float>()), false, big_n,
                       gout.as<float>());
    const auto bwant = read(*gpu_, gout, size_t{experts} * 8 * big_n);
    const double be = rel_err(read(*dev, dout, bwant.size()), bwant);
    std::printf("%s grouped GEMM of %d large experts: relative error %.3g\n", mode, experts, be);
    EXPECT_LT(be, 1e-2) << mode;
  }
}

TEST_F(CudaContract, GroupedGemmIsEachExpertsGemmSkippingEmptyExperts) {
  const int k = 24, n = 40;
  const std::vector<int> rows = {3, 0, 17, 1, 9, 0};
  int total = 0;
  for (int r : rows) total += r;
  for (bool trans_w : {false, true}) {
    Twin a = twin_floats(static_cast<size_t>(total) * k, 7);
    std::vector<Twin> w;
    std::vector<const float*> wc, wg;
    for (size_t e = 0; e < rows.size(); ++e) {
      w.push_back(twin_floats(static_cast<size_t>(k) * n, 8 + static_cast<uint32_t>(e)));
      wc.push_back(w.back().c());
      wg.push_back(w.back().g());
    }
    Twin c = twin_fill(static_cast<size_t>(total) * n, -1.0f);
    cpu_->grouped_gemm(a.c(), k, rows, wc, trans_w, n, c.c());
    gpu_->grouped_gemm(a.g(), k, rows, wg, trans_w, n, c.g());
    EXPECT_LT(err(c), kTol) << "trans_w " << trans_w;
  }
  EXPECT_THROW(gpu_->grouped_gemm(nullptr, k, rows, {}, false, n, nullptr), std::invalid_argument);
}

TEST_F(CudaContract, GroupedGemmMixesLargeExpertsAloneAndSmallOnesGrouped) {
  // Expert 0 (8.6 GFLOP) gets a GEMM call of its own, experts 2 and 3 go into one grouped call.
  // The reference is the GPU's gemm per expert (held to the CPU's above): the CPU would take
  // minutes.
  const int k = 1024, n = 4096;
  const std::vector<int> rows = {1024, 0, 3, 300};
  const int total = 1024 + 3 + 300;
  Twin a = twin_floats(static_cast<size_t>(total) * k, 50);
  std::vector<Twin> w;
  std::vector<const float*> wg;
  for (size_t e = 0; e < rows.size(); ++e) {
    w.push_back(twin_floats(static_cast<size_t>(k) * n, 51 + static_cast<uint32_t>(e)));
    wg.push_back(w.back().g());
  }
  Twin c = twin_fill(static_cast<size_t>(total) * n, 0.0f);
  Twin want = twin_fill(c.n, 0.0f);
  gpu_->grouped_gemm(a.g(), k, rows, wg, true, n, c.g());
  size_t row = 0;
  for (size_t e = 0; e < rows.size(); ++e) {
    if (rows[e] > 0)
      gpu_->gemm(false, true, rows[e], n, k, 1.0f, a.g() + row * k, k, wg[e], k, 0.0f,
                 want.g() + row * n, n);
    row += static_cast<size_t>(rows[e]);
  }
  EXPECT_LT(rel_err(gpu_values(c), gpu_values(want)), 1e-6);
}

// Logits with exact ties: some tokens all equal, some with repeated values at the top.
std::vector<float> routing_logits(int tokens, int experts, uint32_t seed) {
  auto l = random_floats(static_cast<size_t>(tokens) * experts, seed, 2.0f);
  for (int t = 0; t < tokens; t += 7)
    std::fill(l.begin() + static_cast<long>(t) * experts,
              l.begin() + static_cast<long>(t + 1) * experts, 0.25f);
  for (int t = 3; t < tokens; t += 11)
    for (int e = 0; e < experts; e += 3) l[static_cast<size_t>(t) * experts + e] = 3.0f;
  return l;
}

void expect_same_routing(const TokenRouting& g, const TokenRouting& c, const std::string& what) {
  EXPECT_EQ(g.tokens, c.tokens) << what;
  EXPECT_EQ(g.top_k, c.top_k) << what;
  EXPECT_EQ(g.experts, c.experts) << what;
  EXPECT_EQ(g.expert, c.expert) << what;
  EXPECT_EQ(g.row, c.row) << what;
  EXPECT_EQ(g.rows_per_expert, c.rows_per_expert) << what;
  EXPECT_EQ(g.source, c.source) << what;
  EXPECT_EQ(g.dropped, c.dropped) << what;
  EXPECT_LT(rel_err(g.weight, c.weight), 1e-5) << what;
}

TEST_F(CudaContract, RoutingMatchesTheCpuChoicesTiesAndDrops) {
  struct Case {
    int tokens, experts, top_k, capacity;
  };
  for (const Case& k : {Case{300, 16, 2, 0}, Case{300, 16, 2, 30}, Case{257, 8, 1, 20},
                        Case{129, 64, 4, 0}, Case{64, 160, 8, 3}, Case{40, 5, 5, 0}})
    for (bool renormalize : {false, true}) {
      const std::string what = std::to_string(k.tokens) + " tokens, " + std::to_string(k.experts) +
                               " experts, top " + std::to_string(k.top_k) + ", capacity " +
                               std::to_string(k.capacity) + (renormalize ? ", renormalised" : "");
      Twin logits = twin(routing_logits(k.tokens, k.experts, 11));
      Twin probs = twin_fill(logits.n, -1.0f);
      const TokenRouting c =
          cpu_->route(logits.c(), k.tokens, k.experts, k.top_k, renormalize, probs.c(), k.capacity);
      const TokenRouting g =
          gpu_->route(logits.g(), k.tokens, k.experts, k.top_k, renormalize, probs.g(), k.capacity);
      expect_same_routing(g, c, what);
      EXPECT_LT(err(probs), 1e-5) << what;
      if (k.capacity > 0 && k.tokens * k.top_k > k.capacity * k.experts) {
        EXPECT_GT(c.dropped, 0) << what;
      }
    }
  // No tokens, and a top-k the experts cannot fill.
  Twin none = twin_fill(4, 0.0f);
  const TokenRouting empty = gpu_->route(none.g(), 0, 4, 2, true, none.g());
  EXPECT_TRUE(empty.expert.empty());
  EXPECT_EQ(empty.rows_per_expert, std::vector<int>(4, 0));
  EXPECT_THROW(gpu_->route(none.g(), 1, 4, 5, true, none.g()), std::invalid_argument);
}

TEST_F(CudaContract, PermuteCombineAndTheirBackwards) {
  const int tokens = 150, experts = 8, top_k = 2;
  for (int capacity : {0, 30})
    for (int h : {20, 64}) {  // scalar rows and float4 rows
      const std::string what = "capacity " + std::to_string(capacity) + ", h " + std::to_string(h);
      Twin logits = twin(routing_logits(tokens, experts, 12));
      Twin probs = twin_fill(logits.n, 0.0f);
      const TokenRouting r =
          cpu_->route(logits.c(), tokens, experts, top_k, true, probs.c(), capacity);
      gpu_->route(logits.g(), tokens, experts, top_k, true, probs.g(), capacity);
      if (capacity > 0) {
        EXPECT_GT(r.dropped, 0) << what;
      }
      const size_t kept = r.source.size();
      Twin x = twin_floats(static_cast<size_t>(tokens) * h, 13);
      Twin perm = twin_fill(kept * h, 0.0f);
      cpu_->permute(x.c(), r, h, perm.c());
      gpu_->permute(x.g(), r, h, perm.g());
      EXPECT_LT(err(perm), kTol) << "permute, " << what;

      Twin y = twin_floats(kept * h, 14);
      Twin out = twin_fill(static_cast<size_t>(tokens) * h, 5.0f);
      cpu_->unpermute_combine(y.c(), r, h, out.c());
      gpu_->unpermute_combine(y.g(), r, h, out.g());
      EXPECT_LT(err(out), kTol) << "unpermute_combine, " << what;

      Twin d_out = twin_floats(static_cast<size_t>(tokens) * h, 15);
      Twin d_y = twin_fill(kept * h, 0.0f);
      Twin d_w = twin_fill(r.expert.size(), 9.0f);
      cpu_->unpermute_combine_backward(y.c(), d_out.c(), r, h, d_y.c(), d_w.c());
      gpu_->unpermute_combine_backward(y.g(), d_out.g(), r, h, d_y.g(), d_w.g());
      EXPECT_LT(err(d_y), kTol) << "unpermute_combine_backward d_y, " << what;
      EXPECT_LT(err(d_w), kTol) << "unpermute_combine_backward d_weight, " << what;

      Twin d_perm = twin_floats(kept * h, 16);
      Twin d_x = twin_fill(static_cast<size_t>(tokens) * h, 7.0f);
      cpu_->permute_backward(d_perm.c(), r, h, d_x.c());
      gpu_->permute_backward(d_perm.g(), r, h, d_x.g());
      EXPECT_LT(err(d_x), kTol) << "permute_backward, " << what;

      for (bool renormalize : {false, true}) {
        Twin d_logits = twin_fill(logits.n, 3.0f);
        // The CPU's probabilities and weight gradients on both sides: route_backward alone is
        // compared.
        const auto p = cpu_values(probs), dw = cpu_values(d_w);
        gpu_->copy(probs.g(), p.data(), p.size() * sizeof(float));
        gpu_->copy(d_w.g(), dw.data(), dw.size() * sizeof(float));
        cpu_->route_backward(probs.c(), r, d_w.c(), renormalize, d_logits.c());
        gpu_->route_backward(probs.g(), r, d_w.g(), renormalize, d_logits.g());
        EXPECT_LT(err(d_logits), kTol) << "route_backward, " << what << " renorm " << renormalize;
      }
    }
}

TEST_F(CudaContract, SwigluAndRmsnormWithBackwards) {
  for (int rows : {1, 33})
    for (int width : {100, 1024}) {
      const std::string what = std::to_string(rows) + " x " + std::to_string(width);
      Twin gu = twin_floats(static_cast<size_t>(rows) * 2 * width, 17, 2.0f);
      Twin out = twin_fill(static_cast<size_t>(rows) * width, 0.0f);
      cpu_->swiglu(gu.c(), rows, width, out.c());
      gpu_->swiglu(gu.g(), rows, width, out.g());
      EXPECT_LT(err(out), kTol) << "swiglu " << what;
      Twin d_out = twin_floats(out.n, 18);
      Twin d_gu = twin_fill(gu.n, 0.0f);
      cpu_->swiglu_backward(gu.c(), d_out.c(), rows, width, d_gu.c());
      gpu_->swiglu_backward(gu.g(), d_out.g(), rows, width, d_gu.g());
      EXPECT_LT(err(d_gu), kTol) << "swiglu_backward " << what;

      Twin x = twin_floats(static_cast<size_t>(rows) * width, 19, 3.0f);
      Twin g = twin_floats(static_cast<size_t>(width), 20);
      Twin y = twin_fill(x.n, 0.0f);
      cpu_->rmsnorm(x.c(), g.c(), rows, width, 1e-5f, y.c());
      gpu_->rmsnorm(x.g(), g.g(), rows, width, 1e-5f, y.g());
      EXPECT_LT(err(y), kTol) << "rmsnorm " << what;
      Twin d_y = twin_floats(x.n, 21);
      Twin d_x = twin_fill(x.n, 0.0f);
      Twin d_g = twin_floats(static_cast<size_t>(width), 22);  // accumulated into
      cpu_->rmsnorm_backward(x.c(), g.c(), d_y.c(), rows, width, 1e-5f, d_x.c(), d_g.c());
      gpu_->rmsnorm_backward(x.g(), g.g(), d_y.g(), rows, width, 1e-5f, d_x.g(), d_g.g());
      EXPECT_LT(err(d_x), kTol) << "rmsnorm_backward d_x " << what;
      EXPECT_LT(err(d_g), kTol) << "rmsnorm_backward d_g " << what;
    }
}

TEST_F(CudaContract, CausalAttentionAndItsBackward) {
  struct Case {
    int batch, seq, heads, head_dim;
  };
  for (const Case& k : {Case{2, 37, 3, 16}, Case{1, 130, 2, 64}, Case{3, 1, 2, 8}}) {
    const std::string what = std::to_string(k.batch) + " x " + std::to_string(k.seq) + ", " +
                             std::to_string(k.heads) + " heads of " + std::to_string(k.head_dim);
    const size_t h = static_cast<size_t>(k.heads) * k.head_dim;
    const size_t tokens = static_cast<size_t>(k.batch) * k.seq;
    Twin qkv = twin_floats(tokens * 3 * h, 23);
    Twin out = twin_fill(tokens * h, 0.0f);
    Twin lse = twin_fill(static_cast<size_t>(k.batch) * k.heads * k.seq, 0.0f);
    cpu_->attention(qkv.c(), k.batch, k.seq, k.heads, k.head_dim, out.c(), lse.c());
    gpu_->attention(qkv.g(), k.batch, k.seq, k.heads, k.head_dim, out.g(), lse.g());
    EXPECT_LT(err(out), kTol) << "attention out, " << what;
    EXPECT_LT(err(lse), kTol) << "attention lse, " << what;
    Twin d_out = twin_floats(out.n, 24);
    Twin d_qkv = twin_fill(qkv.n, 2.0f);
    cpu_->attention_backward(qkv.c(), out.c(), lse.c(), d_out.c(), k.batch, k.seq, k.heads,
                             k.head_dim, d_qkv.c());
    gpu_->attention_backward(qkv.g(), out.g(), lse.g(), d_out.g(), k.batch, k.seq, k.heads,
                             k.head_dim, d_qkv.g());
    EXPECT_LT(err(d_qkv), kTol) << "attention_backward, " << what;
  }
}

TEST_F(CudaContract, AttentionInChunksOfSequenceHeadPairs) {
  // 18 (sequence, head) pairs of 2048 x 2048 scores: more than one chunk of the backward's
  // scratch (8 pairs), chunks starting inside a sequence's heads. The reference is the GPU one
  // sequence at a time (3 pairs: one chunk, the path held to the CPU's above; the CPU would take
  // minutes).
  const int batch = 6, seq = 2048, heads = 3, head_dim = 32;
  const size_t h = static_cast<size_t>(heads) * head_dim, tokens = size_t{batch} * seq;
  const size_t per_seq = size_t{seq} * h, lse_per_seq = size_t{heads} * seq;
  Twin qkv = twin_floats(tokens * 3 * h, 62);
  Twin d_out = twin_floats(tokens * h, 63);
  Twin out = twin_fill(tokens * h, 0.0f), out1 = twin_fill(tokens * h, 0.0f);
  Twin lse = twin_fill(size_t{batch} * lse_per_seq, 0.0f), lse1 = twin_fill(lse.n, 0.0f);
  Twin d_qkv = twin_fill(qkv.n, 0.0f), d_qkv1 = twin_fill(qkv.n, 0.0f);
  gpu_->attention(qkv.g(), batch, seq, heads, head_dim, out.g(), lse.g());
  gpu_->attention_backward(qkv.g(), out.g(), lse.g(), d_out.g(), batch, seq, heads, head_dim,
                           d_qkv.g());
  for (int b = 0; b < batch; ++b) {
    gpu_->attention(qkv.g() + b * 3 * per_seq, 1, seq, heads, head_dim, out1.g() + b * per_seq,
                    lse1.g() + b * lse_per_seq);
    gpu_->attention_backward(qkv.g() + b * 3 * per_seq, out1.g() + b * per_seq,
                             lse1.g() + b * lse_per_seq, d_out.g() + b * per_seq, 1, seq, heads,
                             head_dim, d_qkv1.g() + b * 3 * per_seq);
  }
  EXPECT_LT(rel_err(gpu_values(out), gpu_values(out1)), 1e-5);
  EXPECT_LT(rel_err(gpu_values(lse), gpu_values(lse1)), 1e-5);
  EXPECT_LT(rel_err(gpu_values(d_qkv), gpu_values(d_qkv1)), 1e-5);
  // A prefill over a cache holding the same keys and values is the same attention (2 chunks of
  // 16 and 2 pairs).
  Buffer k = gpu_->memory().allocate(Tier::kGPU, tokens * h * 4, "k cache");
  Buffer v = gpu_->memory().allocate(Tier::kGPU, tokens * h * 4, "v cache");
  gpu_->copy_2d(k.data(), h * 4, qkv.g() + h, 3 * h * 4, h * 4, tokens);
  gpu_->copy_2d(v.data(), h * 4, qkv.g() + 2 * h, 3 * h * 4, h * 4, tokens);
  Twin cached = twin_fill(tokens * h, 0.0f);
  gpu_->attention_cached(qkv.g(), 3 * static_cast<int>(h), k.as<float>(), v.as<float>(), batch, seq,
                         seq, seq, heads, head_dim, cached.g());
  EXPECT_LT(rel_err(gpu_values(cached), gpu_values(out)), 1e-5);
}

TEST_F(CudaContract, CachedAttentionForPrefillAndDecode) {
  const int batch = 2, heads = 3, head_dim = 8, cache_len = 20, h = heads * head_dim;
  Twin k = twin_floats(static_cast<size_t>(batch) * cache_len * h, 25);
  Twin v = twin_floats(k.n, 26);
  for (int ctx : {13, 20})
    for (int q_len : {1, 5, ctx}) {
      const int ldq = 3 * h;  // queries inside a qkv projection
      Twin q = twin_floats(static_cast<size_t>(batch) * q_len * ldq, 27);
      Twin out = twin_fill(static_cast<size_t>(batch) * q_len * h, 0.0f);
      cpu_->attention_cached(q.c(), ldq, k.c(), v.c(), batch, q_len, ctx, cache_len, heads,
                             head_dim, out.c());
      gpu_->attention_cached(q.g(), ldq, k.g(), v.g(), batch, q_len, ctx, cache_len, heads,
                             head_dim, out.g());
      EXPECT_LT(err(out), kTol) << "ctx " << ctx << ", q_len " << q_len;
    }
  EXPECT_THROW(gpu_->attention_cached(k.g(), h, k.g(), v.g(), batch, 3, 2, cache_len, heads,
                                      head_dim, k.g()),
               std::invalid_argument);
}

TEST_F(CudaContract, CrossEntropyWholeAndVocabParallel) {
  const int rows = 17, vocab = 1000;
  std::vector<int> labels(rows);
  for (int i = 0; i < rows; ++i) labels[static_cast<size_t>(i)] = (i * 389 + 7) % vocab;
  Twin logits = twin_floats(static_cast<size_t>(rows) * vocab, 28, 3.0f);
  const double lc = cpu_->cross_entropy(logits.c(), labels.data(), rows, vocab, 0.25f);
  const double lg = gpu_->cross_entropy(logits.g(), labels.data(), rows, vocab, 0.25f);
  EXPECT_NEAR(lg, lc, kTol * std::abs(lc));
  EXPECT_LT(err(logits), kTol) << "cross_entropy gradient";
  std::vector<int> bad = labels;
  bad[3] = vocab;
  EXPECT_THROW(gpu_->cross_entropy(logits.g(), bad.data(), rows, vocab, 1.0f),
               std::invalid_argument);

  // One rank's share of the columns: labels inside and outside [offset, offset + cols).
  const int cols = 300, offset = 300;
  Twin part = twin_floats(static_cast<size_t>(rows) * cols, 29, 3.0f);
  Twin mx = twin(std::vector<double>(rows, 0.0));
  cpu_->row_max(part.c(), rows, cols, mx.c<double>());
  gpu_->row_max(part.g(), rows, cols, mx.g<double>());
  EXPECT_EQ(gpu_values<double>(mx), cpu_values<double>(mx));
  Twin sums = twin(std::vector<double>(2 * rows, 0.0));
  cpu_->softmax_sums(part.c(), labels.data(), rows, cols, offset, mx.c<double>(), sums.c<double>());
  gpu_->softmax_sums(part.g(), labels.data(), rows, cols, offset, mx.g<double>(), sums.g<double>());
  EXPECT_LT(err<double>(sums), kTol);
  const auto s = cpu_values<double>(sums);
  int inside = 0;
  for (int i = 0; i < rows; ++i) inside += s[2 * static_cast<size_t>(i) + 1] != 0.0;
  EXPECT_GT(inside, 0);
  EXPECT_LT(inside, rows);
  const double pc = cpu_->softmax_cross_entropy_grad(part.c(), labels.data(), rows, cols, offset,
                                                     mx.c<double>(), sums.c<double>(), 0.5f);
  const double pg = gpu_->softmax_cross_entropy_grad(part.g(), labels.data(), rows, cols, offset,
                                                     mx.g<double>(), sums.g<double>(), 0.5f);
  EXPECT_NEAR(pg, pc, kTol * std::abs(pc));
  EXPECT_LT(err(part), kTol) << "softmax_cross_entropy_grad";
}

TEST_F(CudaContract, AdamAddZeroGatherAndScatter) {
  const size_t n = 10007;
  Twin p = twin_floats(n, 30), gr = twin_floats(n, 31), m = twin_floats(n, 32, 0.1f);
  Twin v = twin(std::vector<float>(n, 0.02f));
  cpu_->adam(p.c(), gr.c(), m.c(), v.c(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.05f);
  gpu_->adam(p.g(), gr.g(), m.g(), v.g(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.05f);
  EXPECT_LT(err(p), kTol);
  EXPECT_LT(err(m), kTol);
  EXPECT_LT(err(v), kTol);

  cpu_->add(p.c(), gr.c(), n, p.c());  // in place
  gpu_->add(p.g(), gr.g(), n, p.g());
  EXPECT_LT(err(p), kTol);

  gpu_->zero(p.g() + 5, 100 * sizeof(float));
  const auto z = gpu_values(p);
  for (size_t i = 0; i < n; ++i)
    if (i >= 5 && i < 105) {
      ASSERT_EQ(z[i], 0.0f) << i;
    } else {
      ASSERT_NE(z[i], 0.0f) << i;
    }

  for (int width : {3, 16}) {
    const int src_rows = 50, count = 200;
    std::vector<int> index(count);
    for (int i = 0; i < count; ++i)
      index[static_cast<size_t>(i)] = (i * 7) % 53 - 3;  // repeats, -1..-3
    Twin src = twin_floats(static_cast<size_t>(src_rows) * width, 33);
    Twin gathered = twin_fill(static_cast<size_t>(count) * width, 4.0f);
    cpu_->gather_rows(src.c(), index.data(), count, width, gathered.c());
    gpu_->gather_rows(src.g(), index.data(), count, width, gathered.g());
    EXPECT_LT(err(gathered), kTol) << "gather_rows, width " << width;
    for (bool accumulate : {false, true}) {
      Twin dst = twin_floats(static_cast<size_t>(src_rows) * width, 34);
      Twin rows = twin_floats(static_cast<size_t>(count) * width, 35);
      cpu_->scatter_rows(rows.c(), index.data(), count, width, dst.c(), accumulate);
      gpu_->scatter_rows(rows.g(), index.data(), count, width, dst.g(), accumulate);
      EXPECT_LT(err(dst), kTol) << "scatter_rows, width " << width << ", accumulate " << accumulate;
    }
  }
}

TEST_F(CudaContract, RowsOfZeroLaunchNothing) {
  Twin x = twin_fill(16, 1.0f);
  gpu_->swiglu(x.g(), 0, 4, x.g());
  gpu_->rmsnorm(x.g(), x.g(), 0, 4, 1e-5f, x.g());
  gpu_->add(x.g(), x.g(), 0, x.g());
  gpu_->gemm(false, false, 0, 4, 4, 1.0f, x.g(), 4, x.g(), 4, 0.0f, x.g(), 4);
  gpu_->grouped_gemm(x.g(), 4, {0, 0}, {x.g(), x.g()}, false, 4, x.g());
  gpu_->gather_rows(x.g(), nullptr, 0, 4, x.g());
  gpu_->attention(x.g(), 0, 4, 1, 4, x.g(), x.g());
  EXPECT_EQ(gpu_->cross_entropy(x.g(), nullptr, 0, 4, 1.0f), 0.0);
  EXPECT_EQ(gpu_values(x), std::vector<float>(16, 1.0f));
}

TEST(CudaDeviceMemory, PoolsCountDeviceAndPinnedAllocationsAndRefuseWithTheNumbers) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto dev = cuda_device({/*device=*/64 << 20, /*host=*/0, /*ssd=*/0, {}});
  MemoryPools& pools = dev->memory();
  {
    Buffer a = pools.allocate(Tier::kGPU, 40 << 20, "activations");
    Buffer h = pools.allocate(Tier::kCPU, 8 << 20, "pinned staging");
    EXPECT_EQ(pools.in_use(Tier::kGPU), 40 << 20);
    EXPECT_EQ(pools.in_use(Tier::kCPU), 8 << 20);
    // Zero-filled on both tiers.
    std::vector<float> back(1 << 20, 1.0f);
    dev->copy(back.data(), a.data(), back.size() * sizeof(float));
    EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](float f) { return f == 0.0f; }));
    EXPECT_TRUE(
        std::all_of(h.as<float>(), h.as<float>() + (2 << 20), [](float f) { return f == 0.0f; }));
    // The device pointer really is device memory: the pinned one is host memory.
    cudaPointerAttributes attr{};
    ASSERT_EQ(cudaPointerGetAttributes(&attr, a.data()), cudaSuccess);
    EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
    ASSERT_EQ(cudaPointerGetAttributes(&attr, h.data()), cudaSuccess);
    EXPECT_EQ(attr.type, cudaMemoryTypeHost);
    try {
      pools.allocate(Tier::kGPU, 40 << 20, "expert weights");
      FAIL() << "allocated past the device capacity";
    } catch (const OutOfMemory& e) {
      EXPECT_EQ(e.tier(), Tier::kGPU);
      EXPECT_EQ(e.in_use_bytes(), 40 << 20);
    }
  }
  EXPECT_EQ(pools.in_use(Tier::kGPU), 0);
  EXPECT_EQ(pools.peak(Tier::kGPU), 40 << 20);
  EXPECT_EQ(pools.peak(Tier::kCPU), 8 << 20);
  // Freed memory is reused: many allocations of the same size in turn.
  for (int i = 0; i < 100; ++i) pools.allocate(Tier::kGPU, 40 << 20, "activations again");
  EXPECT_EQ(pools.peak(Tier::kGPU), 40 << 20);
}

TEST(CudaDeviceMemory, CopiesBetweenTiersAndHostMemoryIn1dAnd2d) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto dev = cuda_device({});
  const size_t n = 3 << 20;  // floats
  const auto host = random_floats(n, 40);
  Buffer gpu = dev->memory().allocate(Tier::kGPU, n * 4, "gpu");
  Buffer pinned = dev->memory().allocate(Tier::kCPU, n * 4, "pinned");
  Buffer ssd = dev->memory().allocate(Tier::kSSD, n * 4, "ssd");
  Buffer gpu2 = dev->memory().allocate(Tier::kGPU, n * 4, "gpu2");
  dev->copy(gpu.data(), host.data(), n * 4);    // pageable -> device
  dev->copy(pinned.data(), gpu.data(), n * 4);  // device -> pinned
  dev->copy(ssd.data(), pinned.data(), n * 4);  // pinned -> mapped file
  dev->copy(gpu2.data(), ssd.data(), n * 4);    // mapped file -> device
  std::vector<float> back(n);
  dev->copy(back.data(), gpu2.data(), n * 4);  // device -> pageable
  EXPECT_EQ(back, host);
  EXPECT_EQ(std::memcmp(pinned.data(), host.data(), n * 4), 0);

  // 2D: column block [rows x 5] out of a [rows x 16] matrix, between every pair of places.
  const size_t rows = 1000, cols = 16, take = 5, from = 7;
  std::vector<float> want(rows * take);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < take; ++c) want[r * take + c] = host[r * cols + from + c];
  void* places[] = {gpu2.data(), pinned.data(), ssd.data()};
  for (void* src : places)
    for (void* dst_place : {gpu.data(), pinned.data()}) {
      if (src == dst_place) continue;
      dev->copy(src, host.data(), rows * cols * 4);
      dev->zero(dst_place, rows * take * 4);
      dev->copy_2d(dst_place, take * 4, static_cast<const float*>(src) + from, cols * 4, take * 4,
                   rows);
      std::vector<float> got(rows * take);
      dev->copy(got.data(), dst_place, got.size() * 4);
      EXPECT_EQ(got, want);
    }
  // Into a strided destination from plain host memory, and a host-to-host strided copy.
  std::vector<float> packed(want);
  dev->zero(gpu.data(), rows * cols * 4);
  dev->copy_2d(static_cast<float*>(gpu.data()) + from, cols * 4, packed.data(), take * 4, take * 4,
               rows);
  std::vector<float> wide(rows * cols);
  dev->copy(wide.data(), gpu.data(), wide.size() * 4);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c)
      ASSERT_EQ(wide[r * cols + c],
                c >= from && c < from + take ? want[r * take + c - from] : 0.0f);
  std::vector<float> hosted(rows * take);
  dev->copy_2d(hosted.data(), take * 4, host.data() + from, cols * 4, take * 4, rows);
  EXPECT_EQ(hosted, want);
}

TEST(CudaDeviceMemory, AnotherThreadCopiesWhileKernelsRun) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto dev = cuda_device({});
  const int m = 768;
  const auto a = random_floats(static_cast<size_t>(m) * m, 41, 0.05f);
  Buffer da = dev->memory().allocate(Tier::kGPU, a.size() * 4, "a");
  Buffer dc = dev->memory().allocate(Tier::kGPU, a.size() * 4, "c");
  dev->copy(da.data(), a.data(), a.size() * 4);
  dev->gemm(false, false, m, m, m, 1.0f, da.as<float>(), m, da.as<float>(), m, 0.0f, dc.as<float>(),
            m);
  std::vector<float> want(a.size());
  dev->copy(want.data(), dc.data(), want.size() * 4);

  std::atomic<bool> done{false};
  std::atomic<int> copies{0}, bad{0};
  std::thread copier([&] {
    try {
      const size_t n = 4 << 20;
      const auto data = random_floats(n, 42);
      Buffer g = dev->memory().allocate(Tier::kGPU, n * 4, "copy thread device");
      Buffer p = dev->memory().allocate(Tier::kCPU, n * 4, "copy thread pinned");
      std::vector<float> back(n);
      while (!done.load() || copies.load() < 3) {
        dev->copy(g.data(), data.data(), n * 4);
        dev->copy(p.data(), g.data(), n * 4);
        dev->copy(back.data(), p.data(), n * 4);
        if (back != data) ++bad;
        ++copies;
      }
    } catch (const std::exception& e) {
      std::printf("copy thread: %s\n", e.what());
      ++bad;
    }
  });
  std::vector<float> got(a.size());
  for (int i = 0; i < 40; ++i) {
    Buffer tmp = dev->memory().allocate(Tier::kGPU, a.size() * 4, "per-op activations");
    dev->gemm(false, false, m, m, m, 1.0f, da.as<float>(), m, da.as<float>(), m, 0.0f,
              tmp.as<float>(), m);
    dev->copy(got.data(), tmp.data(), got.size() * 4);
    ASSERT_LT(rel_err(got, want), 1e-6) << "GEMM " << i;
  }
  done = true;
  copier.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GE(copies.load(), 3);
}

}  // namespace
}  // namespace switchyard
