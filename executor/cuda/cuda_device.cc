// The CUDA backend of Device. Every compute call runs on the device's compute stream and waits for
// it before returning (the interface's synchronous contract); copies run on a stream of the calling
// thread, so the copy engine's transfers overlap the compute thread's kernels. GEMMs are cuBLAS
// (row-major C = op(A) op(B) computed as the column-major C^T = op(B)^T op(A)^T); the rest are the
// kernels of cuda_device.cu (C++17: this file holds what needs the C++20 headers), each computing
// what executor/cpu/cpu_device.cc computes.
#include "executor/cuda/cuda_device.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "executor/cuda/cuda_check.h"
#include "executor/cuda/cuda_kernels.h"

namespace switchyard {
namespace {

namespace kernels = cuda_kernels;

// Attention's score matrices are computed for as many (sequence, head) pairs at a time as fit in
// this much scratch (at least one pair).
constexpr size_t kAttentionScratchBytes = size_t{256} << 20;
// bf16 copies of the experts' weights are made for as many experts at a time as fit in this much
// scratch (at least one expert).
constexpr size_t kBf16WeightScratchBytes = size_t{256} << 20;
// grouped_gemm: an expert with at least this many flops gets a GEMM call of its own, the others one
// grouped call. Measured on an H100 with cuBLAS 13.0 (the grouped call runs fp32 at ~0.95 of a
// dense GEMM's rate but TF32 at only ~0.55, while a GEMM call per expert costs ~10 us of host
// time): below these sizes the GPU would wait for the host between experts.
constexpr double kAloneFlopsFp32 = 8e9;
constexpr double kAloneFlopsTensorCores = 12e9;

bool on_device(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// Carves 256-byte aligned regions out of one scratch allocation.
// How many (sequence, head) pairs of attention, each with `bytes_per_pair` of score matrices, one
// batch of work holds within the attention scratch (at least one).
int attention_chunk(long long pairs, size_t bytes_per_pair) {
  return static_cast<int>(
      std::clamp<long long>(static_cast<long long>(kAttentionScratchBytes / bytes_per_pair), 1,
                            std::min<long long>(pairs, INT_MAX)));
}

class ScratchPlan {
 public:
  size_t add(size_t bytes) {
    const size_t at = total_;
    total_ += (bytes + 255) / 256 * 256;
    return at;
  }
  size_t total() const { return total_; }

 private:
  size_t total_ = 0;
};

std::atomic<uint64_t> next_context_id{1};

// What a device's memory and copies share: the device, its stream-ordered pool, and a stream per
// calling thread (created on first use, destroyed with the device).
class Context {
 public:
  Context(int device, cudaMemPool_t pool) : device_(device), pool_(pool) {}
  ~Context() {
    cudaSetDevice(device_);
    for (auto& entry : streams_) cudaStreamDestroy(entry.second);
    cudaMemPoolDestroy(pool_);
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  int device() const { return device_; }
  cudaMemPool_t pool() const { return pool_; }

  // This thread's stream on this device (the device made current).
  cudaStream_t thread_stream() {
    CUDA_CHECK(cudaSetDevice(device_));
    thread_local uint64_t cached_id = 0;
    thread_local cudaStream_t cached = nullptr;
    if (cached_id == id_) return cached;
    std::lock_guard<std::mutex> lock(m_);
    cudaStream_t& s = streams_[std::this_thread::get_id()];
    if (!s) CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cached_id = id_;
    cached = s;
    return s;
  }

 private:
  const int device_;
  const cudaMemPool_t pool_;
  const uint64_t id_ = next_context_id++;
  std::mutex m_;
  std::unordered_map<std::thread::id, cudaStream_t> streams_;
};

// kGPU from the device's pool on the calling thread's stream (synchronised, so the memory is
// usable from any stream on return); kCPU pinned host memory.
class CudaTierAllocator : public TierAllocator {
 public:
  explicit CudaTierAllocator(std::shared_ptr<Context> ctx) : ctx_(std::move(ctx)) {}

  void* allocate(Tier tier, size_t bytes) override {
    void* p = nullptr;
    if (tier == Tier::kGPU) {
      cudaStream_t s = ctx_->thread_stream();
      const cudaError_t err = cudaMallocFromPoolAsync(&p, bytes, ctx_->pool(), s);
      if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        return nullptr;
      }
      CUDA_CHECK(err);
      CUDA_CHECK(cudaStreamSynchronize(s));
      return p;
    }
    CUDA_CHECK(cudaSetDevice(ctx_->device()));
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return nullptr;
    }
    CUDA_CHECK(err);
    return p;
  }

  // Called from Buffer's destructor: never throws.
  void release(Tier tier, void* p, size_t) override {
    try {
      if (tier == Tier::kGPU) {
        if (cudaFreeAsync(p, ctx_->thread_stream()) != cudaSuccess) cudaGetLastError();
      } else if (cudaFreeHost(p) != cudaSuccess) {
        cudaGetLastError();
      }
    } catch (...) {
    }
  }

  void zero(Tier tier, void* p, size_t bytes) override {
    if (tier != Tier::kGPU) {
      std::memset(p, 0, bytes);
      return;
    }
    cudaStream_t s = ctx_->thread_stream();
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }

 private:
  std::shared_ptr<Context> ctx_;
};

std::shared_ptr<Context> make_context(int device) {
  CUDA_CHECK(cudaSetDevice(device));
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.handleTypes = cudaMemHandleTypeNone;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
  // Keep freed memory in the pool: activations come and go with every op.
  uint64_t threshold = UINT64_MAX;
  const cudaError_t err =
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
  if (err != cudaSuccess) {
    cudaMemPoolDestroy(pool);
    CUDA_CHECK(err);
  }
  return std::make_shared<Context>(device, pool);
}

// One expert's GEMM in grouped_gemm: rows x k activations times the weight, into rows x n.
struct ExpertGemm {
  const void* w;
  const void* a;
  float* c;
  int rows;
};

class CudaDevice final : public Device {
 public:
  CudaDevice(TierCapacity capacity, CudaOptions options, std::shared_ptr<Context> ctx)
      : math_(options.math),
        ctx_(std::move(ctx)),
        memory_(std::move(capacity), std::make_shared<CudaTierAllocator>(ctx_)) {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, ctx_->device()));
    name_ = "cuda:" + std::to_string(ctx_->device()) + " (" + prop.name + ")";
    try {
      CUDA_CHECK(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreate(&call_start_));
      CUDA_CHECK(cudaEventCreate(&call_end_));
      CUBLAS_CHECK(cublasCreate(&blas_));
      CUBLAS_CHECK(cublasSetStream(blas_, compute_));
      CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
      CUBLAS_CHECK(cublasSetPointerMode(blas_, CUBLAS_POINTER_MODE_HOST));
    } catch (...) {
      release_compute();
      throw;
    }
  }
  ~CudaDevice() override { release_compute(); }

  std::string name() const override { return name_; }
  MemoryPools& memory() override { return memory_; }
  double take_call_device_seconds() override {
    std::lock_guard<std::mutex> lock(compute_mutex_);
    return std::exchange(timed_s_, 0.0);
  }

  void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
            const float* b, int ldb, float beta, float* c, int ldc) override {
    if (m <= 0 || n <= 0) return;
    Call call(*this);
    if (k <= 0) {
      if (beta != 1.0f) {
        kernels::scale_matrix(c, m, n, ldc, beta, compute_);
      }
    } else if (math_ == GemmMath::kBf16) {
      const size_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
      const size_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
      ScratchPlan plan;
      const size_t at = plan.add(a_rows * a_cols * sizeof(uint16_t));
      const size_t bt = plan.add(b_rows * b_cols * sizeof(uint16_t));
      char* base = scratch(plan.total(), "gemm's bf16 operands");
      auto* a16 = reinterpret_cast<uint16_t*>(base + at);
      auto* b16 = reinterpret_cast<uint16_t*>(base + bt);
      kernels::to_bf16(a, a_rows, a_cols, static_cast<size_t>(lda), a16, compute_);
      kernels::to_bf16(b, b_rows, b_cols, static_cast<size_t>(ldb), b16, compute_);
      row_major_gemm(trans_a, trans_b, m, n, k, alpha, a16, static_cast<int>(a_cols), b16,
                     static_cast<int>(b_cols), CUDA_R_16BF, beta, c, ldc, CUBLAS_COMPUTE_32F);
    } else {
      row_major_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, CUDA_R_32F, beta, c, ldc,
                     fp32_compute());
    }
    call.finish();
  }

  void grouped_gemm(const float* a, int k, const std::vector<int>& rows_per_expert,
                    const std::vector<const float*>& w, bool trans_w, int n, float* c) override {
    if (w.size() != rows_per_expert.size())
      throw std::invalid_argument("grouped_gemm: one weight per expert");
    size_t total_rows = 0;
    for (int r : rows_per_expert) total_rows += static_cast<size_t>(std::max(r, 0));
    if (total_rows == 0 || n <= 0) return;
    Call call(*this);
    if (k <= 0) {  // every product is zero
      CUDA_CHECK(cudaMemsetAsync(c, 0, total_rows * n * sizeof(float), compute_));
      call.finish();
      return;
    }
    const bool bf16 = math_ == GemmMath::kBf16;
    const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
    const size_t w_elems = static_cast<size_t>(k) * n;
    std::vector<ExpertGemm> all;
    size_t row = 0;
    for (size_t e = 0; e < w.size(); ++e) {
      const int rows = rows_per_expert[e];
      if (rows > 0)
        all.push_back(
            {w[e], bf16 ? nullptr : static_cast<const void*>(a + row * k), c + row * n, rows});
      row += static_cast<size_t>(std::max(rows, 0));
    }
    if (!bf16) {
      ScratchPlan plan;
      const size_t ptrs = plan.add(3 * all.size() * sizeof(void*));
      char* base = scratch(plan.total(), "grouped_gemm's pointers");
      expert_gemms(all, k, n, trans_w, CUDA_R_32F, fp32_compute(),
                   reinterpret_cast<const void**>(base + ptrs));
      call.finish();
      return;
    }
    // bf16: the activations once, the weights of as many experts at a time as fit the scratch.
    const size_t chunk = std::max<size_t>(
        1, std::min<size_t>({all.size(), kBf16WeightScratchBytes / (w_elems * elem), 65535}));
    ScratchPlan plan;
    const size_t a_at = plan.add(total_rows * k * elem);
    const size_t w_at = plan.add(chunk * w_elems * elem);
    const size_t ptr_at = plan.add(5 * chunk * sizeof(void*));
    char* base = scratch(plan.total(), "grouped_gemm's bf16 operands");
    auto* a16 = reinterpret_cast<uint16_t*>(base + a_at);
    auto* w16 = reinterpret_cast<uint16_t*>(base + w_at);
    auto** ptrs = reinterpret_cast<const void**>(base + ptr_at);
    kernels::to_bf16(a, total_rows, static_cast<size_t>(k), static_cast<size_t>(k), a16, compute_);
    // The activation rows of each expert, in the bf16 copy.
    row = 0;
    size_t next = 0;
    for (size_t e = 0; e < w.size(); ++e) {
      const int rows = rows_per_expert[e];
      if (rows > 0) all[next++].a = a16 + row * k;
      row += static_cast<size_t>(std::max(rows, 0));
    }
    for (size_t first = 0; first < all.size(); first += chunk) {
      const size_t count = std::min(chunk, all.size() - first);
      std::vector<ExpertGemm> part(all.begin() + static_cast<std::ptrdiff_t>(first),
                                   all.begin() + static_cast<std::ptrdiff_t>(first + count));
      std::vector<const void*> seg(2 * count);
      for (size_t i = 0; i < count; ++i) {
        seg[i] = part[i].w;
        seg[count + i] = w16 + i * w_elems;
        part[i].w = w16 + i * w_elems;
      }
      upload(ptrs, seg.data(), seg.size());
      kernels::to_bf16_segments(reinterpret_cast<const float* const*>(ptrs),
                                const_cast<void* const*>(ptrs + count), w_elems,
                                static_cast<unsigned>(count), compute_);
      expert_gemms(part, k, n, trans_w, CUDA_R_16BF, CUBLAS_COMPUTE_32F, ptrs + 2 * count);
    }
    call.finish();
  }

  TokenRouting route(const float* logits, int tokens, int experts, int top_k, bool renormalize,
                     float* probs, int capacity) override {
    check_top_k(top_k, experts);
    TokenRouting r;
    r.tokens = std::max(tokens, 0);
    r.top_k = top_k;
    r.experts = experts;
    r.expert.resize(static_cast<size_t>(r.tokens) * top_k);
    r.weight.resize(r.expert.size());
    if (r.tokens > 0) {
      Call call(*this);
      ScratchPlan plan;
      const size_t ex_at = plan.add(r.expert.size() * sizeof(int));
      const size_t w_at = plan.add(r.weight.size() * sizeof(float));
      char* base = scratch(plan.total(), "route's choices");
      auto* ex = reinterpret_cast<int*>(base + ex_at);
      auto* wt = reinterpret_cast<float*>(base + w_at);
      kernels::route(logits, r.tokens, experts, top_k, renormalize, probs, ex, wt, compute_);
      download(r.expert.data(), ex, r.expert.size());
      download(r.weight.data(), wt, r.weight.size());
      call.finish();
    }
    finish_routing(r, capacity);
    return r;
  }

  void permute(const float* x, const TokenRouting& r, int h, float* out) override {
    const size_t pairs = r.row.size();
    if (pairs == 0 || h <= 0) return;
    Call call(*this);
    const int* row = upload_ints(r.row, "permute's rows");
    kernels::move_rows(x, r.top_k, row, nullptr, pairs, static_cast<size_t>(h), out, compute_);
    call.finish();
  }

  void unpermute_combine(const float* y, const TokenRouting& r, int h, float* out) override {
    if (r.tokens <= 0 || h <= 0) return;
    Call call(*this);
    ScratchPlan plan;
    const size_t row_at = plan.add(r.row.size() * sizeof(int));
    const size_t w_at = plan.add(r.weight.size() * sizeof(float));
    char* base = scratch(plan.total(), "unpermute_combine's routing");
    auto* row = reinterpret_cast<int*>(base + row_at);
    auto* wt = reinterpret_cast<float*>(base + w_at);
    upload(row, r.row.data(), r.row.size());
    upload(wt, r.weight.data(), r.weight.size());
    kernels::gather_sum_rows(y, row, wt, r.top_k, static_cast<size_t>(r.tokens),
                             static_cast<size_t>(h), out, compute_);
    call.finish();
  }

  void swiglu(const float* gate_up, int rows, int f, float* out) override {
    const size_t total = static_cast<size_t>(std::max(rows, 0)) * std::max(f, 0);
    if (total == 0) return;
    Call call(*this);
    kernels::swiglu(gate_up, rows, f, out, compute_);
    call.finish();
  }

  void swiglu_backward(const float* gate_up, const float* d_out, int rows, int f,
                       float* d_gate_up) override {
    const size_t total = static_cast<size_t>(std::max(rows, 0)) * std::max(f, 0);
    if (total == 0) return;
    Call call(*this);
    kernels::swiglu_backward(gate_up, d_out, rows, f, d_gate_up, compute_);
    call.finish();
  }

  void rmsnorm(const float* x, const float* g, int rows, int h, float eps, float* y) override {
    if (rows <= 0 || h <= 0) return;
    Call call(*this);
    kernels::rmsnorm(x, g, rows, h, eps, y, compute_);
    call.finish();
  }

  void rmsnorm_backward(const float* x, const float* g, const float* d_y, int rows, int h,
                        float eps, float* d_x, float* d_g) override {
    if (rows <= 0 || h <= 0) return;
    Call call(*this);
    auto* inv = reinterpret_cast<float*>(
        scratch(static_cast<size_t>(rows) * sizeof(float), "rmsnorm_backward's norms"));
    kernels::rmsnorm_backward(x, g, d_y, rows, h, eps, d_x, d_g, inv, compute_);
    call.finish();
  }

  void attention(const float* qkv, int batch, int seq, int heads, int head_dim, float* out,
                 float* lse) override {
    if (batch <= 0 || seq <= 0 || heads <= 0 || head_dim <= 0) return;
    Call call(*this);
    const long long h = static_cast<long long>(heads) * head_dim, s = seq;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const long long pairs = static_cast<long long>(batch) * heads;
    const size_t per_pair = static_cast<size_t>(s * s) * sizeof(float);
    const int chunk = attention_chunk(pairs, per_pair);
    ScratchPlan plan;
    const size_t s_at = plan.add(chunk * per_pair);
    const size_t ptr_at = plan.add(5 * static_cast<size_t>(chunk) * sizeof(float*));
    char* base = scratch(plan.total(), "attention's scores");
    auto* scores = reinterpret_cast<float*>(base + s_at);
    auto** ptr = reinterpret_cast<const float**>(base + ptr_at);
    kernels::PtrSpecs specs{};
    specs.count = 5;
    specs.s[0] = {qkv, s * 3 * h, head_dim, 0};          // Q
    specs.s[1] = {qkv + h, s * 3 * h, head_dim, 0};      // K
    specs.s[2] = {qkv + 2 * h, s * 3 * h, head_dim, 0};  // V
    specs.s[3] = {scores, 0, 0, s * s};                  // S
    specs.s[4] = {out, s * h, head_dim, 0};              // O
    for (long long p0 = 0; p0 < pairs; p0 += chunk) {
      const int n = static_cast<int>(std::min<long long>(chunk, pairs - p0));
      fill_pointers(specs, p0, n, heads, ptr);
      const float* const* q = ptr;
      const float* const* k = ptr + n;
      const float* const* v = ptr + 2 * n;
      float* const* sc = const_cast<float* const*>(ptr + 3 * n);
      float* const* o = const_cast<float* const*>(ptr + 4 * n);
      batched_gemm(false, true, seq, seq, head_dim, scale, q, 3 * h, k, 3 * h, sc, seq, n);
      const size_t rows = static_cast<size_t>(n) * seq;
      kernels::causal_softmax(scores, rows, seq, seq, 0, lse + p0 * s, compute_);
      batched_gemm(false, false, seq, head_dim, seq, 1.0f, const_cast<const float* const*>(sc), seq,
                   v, 3 * h, o, h, n);
    }
    call.finish();
  }

  void attention_backward(const float* qkv, const float* out, const float* lse, const float* d_out,
                          int batch, int seq, int heads, int head_dim, float* d_qkv) override {
    if (batch <= 0 || seq <= 0 || heads <= 0 || head_dim <= 0) return;
    Call call(*this);
    const long long h = static_cast<long long>(heads) * head_dim, s = seq;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const long long pairs = static_cast<long long>(batch) * heads;
    const size_t per_pair = static_cast<size_t>(s * s) * sizeof(float);
    const int chunk = attention_chunk(pairs, 2 * per_pair);
    ScratchPlan plan;
    const size_t p_at = plan.add(chunk * per_pair);
    const size_t dp_at = plan.add(chunk * per_pair);
    const size_t ptr_at = plan.add(9 * static_cast<size_t>(chunk) * sizeof(float*));
    char* base = scratch(plan.total(), "attention_backward's scores");
    auto* probs = reinterpret_cast<float*>(base + p_at);
    auto* d_probs = reinterpret_cast<float*>(base + dp_at);
    auto** ptr = reinterpret_cast<const float**>(base + ptr_at);
    kernels::PtrSpecs specs{};
    specs.count = 9;
    specs.s[0] = {qkv, s * 3 * h, head_dim, 0};            // Q
    specs.s[1] = {qkv + h, s * 3 * h, head_dim, 0};        // K
    specs.s[2] = {qkv + 2 * h, s * 3 * h, head_dim, 0};    // V
    specs.s[3] = {d_out, s * h, head_dim, 0};              // dO
    specs.s[4] = {probs, 0, 0, s * s};                     // S, then P
    specs.s[5] = {d_probs, 0, 0, s * s};                   // dP, then dS
    specs.s[6] = {d_qkv, s * 3 * h, head_dim, 0};          // dQ
    specs.s[7] = {d_qkv + h, s * 3 * h, head_dim, 0};      // dK
    specs.s[8] = {d_qkv + 2 * h, s * 3 * h, head_dim, 0};  // dV
    for (long long p0 = 0; p0 < pairs; p0 += chunk) {
      const int n = static_cast<int>(std::min<long long>(chunk, pairs - p0));
      fill_pointers(specs, p0, n, heads, ptr);
      const float* const* q = ptr;
      const float* const* k = ptr + n;
      const float* const* v = ptr + 2 * n;
      const float* const* d_o = ptr + 3 * n;
      const float* const* p = ptr + 4 * n;
      const float* const* dp = ptr + 5 * n;
      auto mut = [](const float* const* x) { return const_cast<float* const*>(x); };
      const size_t rows = static_cast<size_t>(n) * seq;
      batched_gemm(false, true, seq, seq, head_dim, scale, q, 3 * h, k, 3 * h, mut(p), seq, n);
      kernels::probs_from_lse(probs, rows, seq, lse + p0 * s, compute_);
      // dV = P^T dO, dP = dO V^T.
      batched_gemm(true, false, seq, head_dim, seq, 1.0f, p, seq, d_o, h, mut(ptr + 8 * n), 3 * h,
                   n);
      batched_gemm(false, true, seq, seq, head_dim, 1.0f, d_o, h, v, 3 * h, mut(dp), seq, n);
      kernels::attention_ds(probs, d_probs, rows, seq, p0, heads, head_dim, out, d_out, compute_);
      // dQ = scale dS K, dK = scale dS^T Q.
      batched_gemm(false, false, seq, head_dim, seq, scale, dp, seq, k, 3 * h, mut(ptr + 6 * n),
                   3 * h, n);
      batched_gemm(true, false, seq, head_dim, seq, scale, dp, seq, q, 3 * h, mut(ptr + 7 * n),
                   3 * h, n);
    }
    call.finish();
  }

  void attention_cached(const float* q, int ldq, const float* k, const float* v, int batch,
                        int q_len, int ctx, int cache_len, int heads, int head_dim,
                        float* out) override {
    if (q_len < 1 || ctx < q_len || ctx > cache_len)
      throw std::invalid_argument("attention_cached: need 1 <= q_len <= ctx <= cache_len");
    if (batch <= 0 || heads <= 0 || head_dim <= 0) return;
    Call call(*this);
    const long long h = static_cast<long long>(heads) * head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const long long pairs = static_cast<long long>(batch) * heads;
    const size_t per_pair = static_cast<size_t>(q_len) * ctx * sizeof(float);
    const int chunk = attention_chunk(pairs, per_pair);
    ScratchPlan plan;
    const size_t s_at = plan.add(chunk * per_pair);
    const size_t ptr_at = plan.add(5 * static_cast<size_t>(chunk) * sizeof(float*));
    char* base = scratch(plan.total(), "attention_cached's scores");
    auto* scores = reinterpret_cast<float*>(base + s_at);
    auto** ptr = reinterpret_cast<const float**>(base + ptr_at);
    kernels::PtrSpecs specs{};
    specs.count = 5;
    specs.s[0] = {q, static_cast<long long>(q_len) * ldq, head_dim, 0};
    specs.s[1] = {k, static_cast<long long>(cache_len) * h, head_dim, 0};
    specs.s[2] = {v, static_cast<long long>(cache_len) * h, head_dim, 0};
    specs.s[3] = {scores, 0, 0, static_cast<long long>(q_len) * ctx};
    specs.s[4] = {out, static_cast<long long>(q_len) * h, head_dim, 0};
    for (long long p0 = 0; p0 < pairs; p0 += chunk) {
      const int n = static_cast<int>(std::min<long long>(chunk, pairs - p0));
      fill_pointers(specs, p0, n, heads, ptr);
      float* const* sc = const_cast<float* const*>(ptr + 3 * n);
      batched_gemm(false, true, q_len, ctx, head_dim, scale, ptr, ldq, ptr + n, h, sc, ctx, n);
      const size_t rows = static_cast<size_t>(n) * q_len;
      kernels::causal_softmax(scores, rows, q_len, ctx, ctx - q_len, nullptr, compute_);
      batched_gemm(false, false, q_len, head_dim, ctx, 1.0f, ptr + 3 * n, ctx, ptr + 2 * n, h,
                   const_cast<float* const*>(ptr + 4 * n), h, n);
    }
    call.finish();
  }

  double cross_entropy(float* logits, const int* labels, int rows, int vocab,
                       float grad_scale) override {
    if (rows <= 0) return 0.0;
    for (int i = 0; i < rows; ++i)
      if (labels[i] < 0 || labels[i] >= vocab)
        throw std::invalid_argument("cross_entropy: label " + std::to_string(labels[i]) +
                                    " of row " + std::to_string(i) + " outside the vocabulary of " +
                                    std::to_string(vocab));
    Call call(*this);
    ScratchPlan plan;
    const size_t label_at = plan.add(static_cast<size_t>(rows) * sizeof(int));
    const size_t loss_at = plan.add(static_cast<size_t>(rows + 1) * sizeof(double));
    char* base = scratch(plan.total(), "cross_entropy's labels");
    auto* lab = reinterpret_cast<int*>(base + label_at);
    auto* loss = reinterpret_cast<double*>(base + loss_at);
    upload(lab, labels, static_cast<size_t>(rows));
    kernels::cross_entropy(logits, lab, rows, vocab, grad_scale, loss, compute_);
    const double total = sum_on_device(loss, rows, loss + rows);
    call.finish();
    return total;
  }

  void adam(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
            float beta2, float eps, float c1, float c2) override {
    if (n == 0) return;
    Call call(*this);
    kernels::adam(param, grad, m, v, n, lr, beta1, beta2, eps, c1, c2, compute_);
    call.finish();
  }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0 || dst == src) return;
    if (!on_device(dst) && !on_device(src)) {  // host to host (pinned, pageable or mapped files)
      std::memmove(dst, src, bytes);
      return;
    }
    cudaStream_t s = ctx_->thread_stream();
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }

  void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
               size_t rows) override {
    if (rows == 0 || row_bytes == 0) return;
    auto* d = static_cast<char*>(dst);
    const auto* sp = static_cast<const char*>(src);
    if (!on_device(dst) && !on_device(src)) {
      for (size_t i = 0; i < rows; ++i)
        std::memmove(d + i * dst_pitch, sp + i * src_pitch, row_bytes);
      return;
    }
    cudaStream_t s = ctx_->thread_stream();
    const size_t limit = static_cast<size_t>(INT_MAX);
    if (rows == 1) {
      CUDA_CHECK(cudaMemcpyAsync(dst, src, row_bytes, cudaMemcpyDefault, s));
    } else if (dst_pitch >= row_bytes && src_pitch >= row_bytes && dst_pitch <= limit &&
               src_pitch <= limit) {
      CUDA_CHECK(
          cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyDefault, s));
    } else {  // pitches cudaMemcpy2D refuses: a row at a time
      for (size_t i = 0; i < rows; ++i)
        CUDA_CHECK(cudaMemcpyAsync(d + i * dst_pitch, sp + i * src_pitch, row_bytes,
                                   cudaMemcpyDefault, s));
    }
    CUDA_CHECK(cudaStreamSynchronize(s));
  }

  void zero(void* dst, size_t bytes) override {
    if (bytes == 0) return;
    if (!on_device(dst)) {
      std::memset(dst, 0, bytes);
      return;
    }
    Call call(*this);
    CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, compute_));
    call.finish();
  }

  void add(const float* a, const float* b, size_t n, float* out) override {
    if (n == 0) return;
    Call call(*this);
    kernels::add(a, b, n, out, compute_);
    call.finish();
  }

  void gather_rows(const float* src, const int* index, int n, int width, float* dst) override {
    if (n <= 0 || width <= 0) return;
    Call call(*this);
    auto* idx = reinterpret_cast<int*>(
        scratch(static_cast<size_t>(n) * sizeof(int), "gather_rows' indices"));
    upload(idx, index, static_cast<size_t>(n));
    kernels::gather_sum_rows(src, idx, nullptr, 1, static_cast<size_t>(n),
                             static_cast<size_t>(width), dst, compute_);
    call.finish();
  }

  void scatter_rows(const float* src, const int* index, int n, int width, float* dst,
                    bool accumulate) override {
    if (n <= 0 || width <= 0) return;
    Call call(*this);
    std::vector<int> rows(index, index + n);
    if (!accumulate) {
      // A repeated destination takes its last source row (the CPU backend writes in order):
      // earlier writers are skipped, so no two threads write one row.
      int top = -1;
      for (int i : rows) top = std::max(top, i);
      std::vector<char> seen(static_cast<size_t>(top + 1), 0);
      for (int i = n - 1; i >= 0; --i) {
        int& to = rows[static_cast<size_t>(i)];
        if (to < 0) continue;
        if (seen[static_cast<size_t>(to)])
          to = -1;
        else
          seen[static_cast<size_t>(to)] = 1;
      }
    }
    const int* idx = upload_ints(rows, "scatter_rows' indices");
    if (accumulate) {
      kernels::scatter_add_rows(src, idx, static_cast<size_t>(n), static_cast<size_t>(width), dst,
                                compute_);
    } else {
      kernels::move_rows(src, 1, idx, nullptr, static_cast<size_t>(n), static_cast<size_t>(width),
                         dst, compute_);
    }
    call.finish();
  }

  void unpermute_combine_backward(const float* y, const float* d_out, const TokenRouting& r, int h,
                                  float* d_y, float* d_weight) override {
    const size_t pairs = r.row.size();
    if (pairs == 0) return;
    Call call(*this);
    ScratchPlan plan;
    const size_t row_at = plan.add(pairs * sizeof(int));
    const size_t w_at = plan.add(pairs * sizeof(float));
    char* base = scratch(plan.total(), "unpermute_combine_backward's routing");
    auto* row = reinterpret_cast<int*>(base + row_at);
    auto* wt = reinterpret_cast<float*>(base + w_at);
    upload(row, r.row.data(), pairs);
    upload(wt, r.weight.data(), pairs);
    if (h > 0)
      kernels::move_rows(d_out, r.top_k, row, wt, pairs, static_cast<size_t>(h), d_y, compute_);
    kernels::pair_dot(y, d_out, row, r.top_k, pairs, h, d_weight, compute_);
    call.finish();
  }

  void permute_backward(const float* d_perm, const TokenRouting& r, int h, float* d_x) override {
    if (r.tokens <= 0 || h <= 0) return;
    Call call(*this);
    const int* row = upload_ints(r.row, "permute_backward's rows");
    kernels::gather_sum_rows(d_perm, row, nullptr, r.top_k, static_cast<size_t>(r.tokens),
                             static_cast<size_t>(h), d_x, compute_);
    call.finish();
  }

  void route_backward(const float* probs, const TokenRouting& r, const float* d_weight,
                      bool renormalize, float* d_logits) override {
    if (r.tokens <= 0 || r.experts <= 0) return;
    Call call(*this);
    const size_t pairs = r.expert.size();
    ScratchPlan plan;
    const size_t ex_at = plan.add(pairs * sizeof(int));
    const size_t w_at = plan.add(pairs * sizeof(float));
    char* base = scratch(plan.total(), "route_backward's routing");
    auto* ex = reinterpret_cast<int*>(base + ex_at);
    auto* wt = reinterpret_cast<float*>(base + w_at);
    upload(ex, r.expert.data(), pairs);
    upload(wt, r.weight.data(), pairs);
    kernels::route_backward(probs, ex, wt, d_weight, r.tokens, r.experts, r.top_k, renormalize,
                            d_logits, compute_);
    call.finish();
  }

  void row_max(const float* x, int rows, int cols, double* out) override {
    if (rows <= 0) return;
    Call call(*this);
    kernels::row_max(x, rows, cols, out, compute_);
    call.finish();
  }

  void softmax_sums(const float* logits, const int* labels, int rows, int cols, int label_offset,
                    const double* row_max, double* sum_target) override {
    if (rows <= 0) return;
    Call call(*this);
    auto* lab = reinterpret_cast<int*>(
        scratch(static_cast<size_t>(rows) * sizeof(int), "softmax_sums' labels"));
    upload(lab, labels, static_cast<size_t>(rows));
    kernels::softmax_sums(logits, lab, rows, cols, label_offset, row_max, sum_target, compute_);
    call.finish();
  }

  double softmax_cross_entropy_grad(float* logits, const int* labels, int rows, int cols,
                                    int label_offset, const double* row_max,
                                    const double* sum_target, float grad_scale) override {
    if (rows <= 0) return 0.0;
    Call call(*this);
    ScratchPlan plan;
    const size_t label_at = plan.add(static_cast<size_t>(rows) * sizeof(int));
    const size_t loss_at = plan.add(static_cast<size_t>(rows + 1) * sizeof(double));
    char* base = scratch(plan.total(), "softmax_cross_entropy_grad's labels");
    auto* lab = reinterpret_cast<int*>(base + label_at);
    auto* loss = reinterpret_cast<double*>(base + loss_at);
    upload(lab, labels, static_cast<size_t>(rows));
    kernels::softmax_cross_entropy_grad(logits, lab, rows, cols, label_offset, row_max, sum_target,
                                        grad_scale, loss, compute_);
    const double total = sum_on_device(loss, rows, loss + rows);
    call.finish();
    return total;
  }

 private:
  // One compute call: this device current on the calling thread, the compute stream and scratch to
  // itself. finish() waits for the stream; a call left by an exception waits too (errors ignored:
  // the exception in flight says what went wrong).
  class Call {
   public:
    explicit Call(CudaDevice& d) : d_(d), lock_(d.compute_mutex_) {
      CUDA_CHECK(cudaSetDevice(d.ctx_->device()));
      CUDA_CHECK(cudaEventRecord(d.call_start_, d.compute_));
    }
    ~Call() {
      if (!finished_ && cudaStreamSynchronize(d_.compute_) != cudaSuccess) cudaGetLastError();
    }
    // Waits for the call's work; its time on the GPU (CUDA events around it on the compute
    // stream) adds to what take_call_device_seconds() returns.
    void finish() {
      finished_ = true;
      CUDA_CHECK(cudaGetLastError());
      CUDA_CHECK(cudaEventRecord(d_.call_end_, d_.compute_));
      CUDA_CHECK(cudaStreamSynchronize(d_.compute_));
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, d_.call_start_, d_.call_end_));
      d_.timed_s_ += ms * 1e-3;
    }

   private:
    CudaDevice& d_;
    std::lock_guard<std::mutex> lock_;
    bool finished_ = false;
  };

  void release_compute() {
    cudaSetDevice(ctx_->device());
    if (compute_) cudaStreamSynchronize(compute_);
    if (scratch_) cudaFreeAsync(scratch_, compute_);
    if (compute_) cudaStreamSynchronize(compute_);
    if (blas_) cublasDestroy(blas_);
    if (call_start_) cudaEventDestroy(call_start_);
    if (call_end_) cudaEventDestroy(call_end_);
    call_start_ = call_end_ = nullptr;
    if (compute_) cudaStreamDestroy(compute_);
    scratch_ = nullptr;
    blas_ = nullptr;
    compute_ = nullptr;
    cudaGetLastError();
  }

  // The device scratch, grown (never shrunk) to at least `bytes`; ordered on the compute stream,
  // so growing it frees the old one after the work queued before.
  char* scratch(size_t bytes, const char* what) {
    if (bytes > scratch_bytes_) {
      if (scratch_) CUDA_CHECK(cudaFreeAsync(scratch_, compute_));
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      const size_t want = (bytes + (size_t{1} << 20) - 1) >> 20 << 20;  // whole MiB
      const cudaError_t err = cudaMallocFromPoolAsync(&scratch_, want, ctx_->pool(), compute_);
      if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        scratch_ = nullptr;
        throw OutOfMemory(std::string("the CUDA backend's scratch for ") + what, Tier::kGPU,
                          static_cast<int64_t>(want), memory_.in_use(Tier::kGPU),
                          memory_.capacity(Tier::kGPU));
      }
      CUDA_CHECK(err);
      scratch_bytes_ = want;
    }
    return static_cast<char*>(scratch_);
  }

  template <typename T>
  void upload(T* dst, const T* host, size_t n) {
    if (n > 0)
      CUDA_CHECK(cudaMemcpyAsync(dst, host, n * sizeof(T), cudaMemcpyHostToDevice, compute_));
  }
  template <typename T>
  void download(T* host, const T* src, size_t n) {
    if (n > 0)
      CUDA_CHECK(cudaMemcpyAsync(host, src, n * sizeof(T), cudaMemcpyDeviceToHost, compute_));
  }
  const int* upload_ints(const std::vector<int>& v, const char* what) {
    auto* p = reinterpret_cast<int*>(scratch(v.size() * sizeof(int), what));
    upload(p, v.data(), v.size());
    return p;
  }

  double sum_on_device(const double* x, int n, double* out) {
    kernels::sum_doubles(x, n, out, compute_);
    double total = 0;
    download(&total, out, 1);
    CUDA_CHECK(cudaStreamSynchronize(compute_));
    return total;
  }

  // The compute type of GEMMs on fp32 operands: attention's always, gemm's and grouped_gemm's
  // unless kBf16. Under kBf16 attention runs TF32: cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF on fp32
  // operands measured TF32's error, not bf16's, on an H100 (cuBLAS 13.0), so bf16 attention would
  // need converted copies of Q, K, V and the probabilities.
  cublasComputeType_t fp32_compute() const {
    return math_ == GemmMath::kFp32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
  }

  // Row-major C = alpha op(A) op(B) + beta C as the column-major C^T = op(B)^T op(A)^T.
  void row_major_gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const void* a,
                      int lda, const void* b, int ldb, cudaDataType type, float beta, float* c,
                      int ldc, cublasComputeType_t compute) {
    CUBLAS_CHECK(cublasGemmEx(blas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                              trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, type, ldb, a,
                              type, lda, &beta, c, CUDA_R_32F, ldc, compute, CUBLAS_GEMM_DEFAULT));
  }

  // The same over `count` matrices given by device arrays of pointers (beta = 0).
  void batched_gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                    const float* const* a, long long lda, const float* const* b, long long ldb,
                    float* const* c, long long ldc, int count) {
    const float beta = 0.0f;
    CUBLAS_CHECK(cublasGemmBatchedEx(
        blas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k,
        &alpha, reinterpret_cast<const void* const*>(b), CUDA_R_32F, static_cast<int>(ldb),
        reinterpret_cast<const void* const*>(a), CUDA_R_32F, static_cast<int>(lda), &beta,
        reinterpret_cast<void* const*>(c), CUDA_R_32F, static_cast<int>(ldc), count, fp32_compute(),
        CUBLAS_GEMM_DEFAULT));
  }

  void fill_pointers(const kernels::PtrSpecs& specs, long long p0, int n, int heads,
                     const float** out) {
    kernels::fill_pointers(specs, p0, n, heads, out, compute_);
  }

  // Each expert's rows times its weight. An expert whose GEMM is large enough to keep the GPU busy
  // while the next is queued gets its own cublasGemmEx (the fastest kernel for its shape); the
  // others go together into one grouped call when the library groups these types (the device
  // pointer arrays go to `ptrs`, 3 * g.size() entries), else a GEMM each.
  void expert_gemms(const std::vector<ExpertGemm>& g, int k, int n, bool trans_w, cudaDataType type,
                    cublasComputeType_t compute, const void** ptrs) {
    const cublasOperation_t op_w = trans_w ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int ldw = trans_w ? k : n;
    const float one = 1.0f, zero = 0.0f;
    auto alone = [&](const ExpertGemm& e) {
      CUBLAS_CHECK(cublasGemmEx(blas_, op_w, CUBLAS_OP_N, n, e.rows, k, &one, e.w, type, ldw, e.a,
                                type, k, &zero, e.c, CUDA_R_32F, n, compute, CUBLAS_GEMM_DEFAULT));
    };
    bool& grouped = type == CUDA_R_32F ? grouped_fp32_ : grouped_bf16_;
    const double big = math_ == GemmMath::kFp32 ? kAloneFlopsFp32 : kAloneFlopsTensorCores;
    std::vector<ExpertGemm> together;
    for (const ExpertGemm& e : g)
      if (!grouped || 2.0 * e.rows * k * n >= big)
        alone(e);
      else
        together.push_back(e);
    if (together.empty()) return;
    const size_t count = together.size();
    std::vector<const void*> host(3 * count);
    std::vector<cublasOperation_t> op_a(count, op_w), op_b(count, CUBLAS_OP_N);
    std::vector<int> ms(count, n), ns(count), ks(count, k), lda(count, ldw), ldb(count, k),
        ldc(count, n), sizes(count, 1);
    std::vector<float> alpha(count, one), beta(count, zero);
    for (size_t i = 0; i < count; ++i) {
      host[i] = together[i].w;
      host[count + i] = together[i].a;
      host[2 * count + i] = together[i].c;
      ns[i] = together[i].rows;
    }
    upload(ptrs, host.data(), host.size());
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        blas_, op_a.data(), op_b.data(), ms.data(), ns.data(), ks.data(), alpha.data(), ptrs, type,
        lda.data(), ptrs + count, type, ldb.data(), beta.data(),
        const_cast<void* const*>(ptrs + 2 * count), CUDA_R_32F, ldc.data(), static_cast<int>(count),
        sizes.data(), compute);
    if (st == CUBLAS_STATUS_SUCCESS) return;
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) CUBLAS_CHECK(st);
    grouped = false;  // this cuBLAS does not group these types: a GEMM each from now on
    for (const ExpertGemm& e : together) alone(e);
  }

  const GemmMath math_;
  std::shared_ptr<Context> ctx_;
  std::string name_;
  std::mutex compute_mutex_;
  cudaStream_t compute_ = nullptr;
  cudaEvent_t call_start_ = nullptr, call_end_ = nullptr;  // around each compute call
  double timed_s_ = 0;  // GPU time of the calls finished since the last take
  cublasHandle_t blas_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  bool grouped_fp32_ = true, grouped_bf16_ = true;  // until cuBLAS refuses to group the type
  MemoryPools memory_;  // last: destroyed first (its buffers must all be gone by then)
};

}  // namespace

std::unique_ptr<Device> cuda_device(TierCapacity capacity, CudaOptions options) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw DeviceError(std::string("no CUDA device: cudaGetDeviceCount: ") + cudaGetErrorName(err) +
                          " (" + cudaGetErrorString(err) + ")",
                      static_cast<int>(err));
  }
  if (options.device < 0 || options.device >= count)
    throw DeviceError("no CUDA device " + std::to_string(options.device) + ": " +
                          std::to_string(count) + " visible",
                      static_cast<int>(cudaErrorInvalidDevice));
  auto ctx = make_context(options.device);
  return std::make_unique<CudaDevice>(std::move(capacity), options, std::move(ctx));
}

GemmMath parse_gemm_math(const std::string& name) {
  if (name == "fp32") return GemmMath::kFp32;
  if (name == "tf32") return GemmMath::kTf32;
  if (name == "bf16") return GemmMath::kBf16;
  throw std::invalid_argument("GEMM math '" + name + "': expected fp32, tf32 or bf16");
}

}  // namespace switchyard
