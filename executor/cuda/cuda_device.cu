// The CUDA backend's kernels and their launchers (declared in executor/cuda/cuda_kernels.h), each
// computing what executor/cpu/cpu_device.cc computes: grid-stride loops over elements, a block per
// row for the wide reductions (norms, cross-entropy), a warp per row for the narrow ones (routing,
// attention's score rows). Compiled as CUDA C++17: nothing here includes the C++20 host headers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "executor/cuda/cuda_check.h"
#include "executor/cuda/cuda_kernels.h"

namespace switchyard::cuda_kernels {
namespace {

constexpr int kThreads = 256;  // threads per block of the elementwise and per-row kernels
constexpr int kWarps = kWarpsPerBlock;
static_assert(kThreads == 32 * kWarps);
constexpr unsigned kMaxBlocks = 8192;  // grid-stride kernels: enough blocks to fill any GPU
constexpr unsigned kFullMask = 0xffffffffu;

unsigned blocks_for(size_t work, int per_block = kThreads) {
  const size_t b = (work + static_cast<size_t>(per_block) - 1) / static_cast<size_t>(per_block);
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>(b, kMaxBlocks)));
}

// Per-row kernels take one block (or one warp) per row and stride over the rest.
unsigned row_blocks(size_t rows, int rows_per_block = 1) {
  const size_t b =
      (rows + static_cast<size_t>(rows_per_block) - 1) / static_cast<size_t>(rows_per_block);
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>(b, size_t{1} << 20)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_launch() { CUDA_CHECK(cudaGetLastError()); }

// ---------------------------------------------------------------------------------------------
// Reductions.

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum and max (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 values; the leading barrier lets consecutive reductions reuse it.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? shared[lane] : T(0));
}
__device__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? shared[lane] : -INFINITY);
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels.

__global__ void scale_matrix_kernel(float* c, int m, int n, int ldc, float beta) {
  const size_t total = static_cast<size_t>(m) * n;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x) {
    float* p = c + (i / n) * static_cast<size_t>(ldc) + i % n;
    *p = beta == 0.0f ? 0.0f : beta * *p;
  }
}

__global__ void add_kernel(const float* a, const float* b, size_t n, float* out) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void adam_kernel(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                            float beta1, float beta2, float eps, float c1, float c2) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const float g = grad[i];
    const float mi = beta1 * m[i] + (1 - beta1) * g;
    const float vi = beta2 * v[i] + (1 - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] -= lr * (mi / c1) / (sqrtf(vi / c2) + eps);
  }
}

__global__ void swiglu_kernel(const float* gate_up, int rows, int f, float* out) {
  const size_t total = static_cast<size_t>(rows) * f;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t r = i / f, c = i % f;
    const float g = gate_up[r * 2 * f + c], u = gate_up[r * 2 * f + f + c];
    out[i] = g / (1.0f + expf(-g)) * u;
  }
}

__global__ void swiglu_backward_kernel(const float* gate_up, const float* d_out, int rows, int f,
                                       float* d_gate_up) {
  const size_t total = static_cast<size_t>(rows) * f;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t r = i / f, c = i % f;
    const float g = gate_up[r * 2 * f + c], u = gate_up[r * 2 * f + f + c], d = d_out[i];
    const float s = 1.0f / (1.0f + expf(-g));
    d_gate_up[r * 2 * f + f + c] = d * (g * s);
    d_gate_up[r * 2 * f + c] = d * u * s * (1.0f + g * (1.0f - s));
  }
}

// A rows x cols matrix (row stride ld) to a dense bf16 copy (row stride cols), rounded to nearest.
__global__ void to_bf16_kernel(const float* src, size_t rows, size_t cols, size_t ld,
                               __nv_bfloat16* dst) {
  const size_t total = rows * cols;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x)
    dst[i] = __float2bfloat16(src[(i / cols) * ld + i % cols]);
}

// Segment blockIdx.y: n floats from src[y] to bf16 at dst[y].
__global__ void to_bf16_segments_kernel(const float* const* src, __nv_bfloat16* const* dst,
                                        size_t n) {
  const float* s = src[blockIdx.y];
  __nv_bfloat16* d = dst[blockIdx.y];
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    d[i] = __float2bfloat16(s[i]);
}

// ---------------------------------------------------------------------------------------------
// Row movement (gather, scatter, permute and their combinations), on float or float4 lanes.

__device__ __forceinline__ float scaled(float x, float w) { return x * w; }
__device__ __forceinline__ float4 scaled(float4 x, float w) {
  return make_float4(x.x * w, x.y * w, x.z * w, x.w * w);
}
__device__ __forceinline__ void accumulate(float& acc, float w, float x) { acc += w * x; }
__device__ __forceinline__ void accumulate(float4& acc, float w, float4 x) {
  acc.x += w * x.x;
  acc.y += w * x.y;
  acc.z += w * x.z;
  acc.w += w * x.w;
}
template <typename V>
__device__ __forceinline__ V zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() {
  return 0.0f;
}
template <>
__device__ __forceinline__ float4 zero_value<float4>() {
  return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// For each of n pairs i whose dst_row[i] >= 0: dst row dst_row[i] = weight[i] (1 when null) * src
// row (i / src_div). Rows are `width` lanes of V.
template <typename V>
__global__ void scatter_rows_kernel(const V* src, int src_div, const int* dst_row,
                                    const float* weight, size_t n, size_t width, V* dst) {
  const size_t total = n * width;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t pair = i / width, c = i % width;
    const int to = dst_row[pair];
    if (to < 0) continue;
    const V x = src[(pair / static_cast<size_t>(src_div)) * width + c];
    dst[static_cast<size_t>(to) * width + c] = weight ? scaled(x, weight[pair]) : x;
  }
}

// dst row dst_row[i] += src row i for each i with dst_row[i] >= 0 (rows repeat: atomics).
__global__ void scatter_add_rows_kernel(const float* src, const int* dst_row, size_t n,
                                        size_t width, float* dst) {
  const size_t total = n * width;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t pair = i / width, c = i % width;
    const int to = dst_row[pair];
    if (to >= 0) atomicAdd(dst + static_cast<size_t>(to) * width + c, src[i]);
  }
}

// dst row t = sum over j < k of weight[t*k+j] (1 when null) * src row index[t*k+j], skipping
// negative indices (a row with none is zeros); j in increasing order, as the CPU backend adds.
template <typename V>
__global__ void gather_sum_rows_kernel(const V* src, const int* index, const float* weight, int k,
                                       size_t rows, size_t width, V* dst) {
  const size_t total = rows * width;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total;
       i += size_t{gridDim.x} * blockDim.x) {
    const size_t t = i / width, c = i % width;
    V acc = zero_value<V>();
    for (int j = 0; j < k; ++j) {
      const size_t at = t * static_cast<size_t>(k) + static_cast<size_t>(j);
      const int from = index[at];
      if (from >= 0)
        accumulate(acc, weight ? weight[at] : 1.0f, src[static_cast<size_t>(from) * width + c]);
    }
    dst[i] = acc;
  }
}

// d_weight[i] = <d_out row (i / k), y row row[i]> (0 when row[i] < 0); a warp per pair.
__global__ void pair_dot_kernel(const float* y, const float* d_out, const int* row, int k,
                                size_t pairs, int h, float* d_weight) {
  const int lane = threadIdx.x & 31;
  for (size_t i = blockIdx.x * size_t{kWarps} + (threadIdx.x >> 5); i < pairs;
       i += size_t{gridDim.x} * kWarps) {
    const int r = row[i];
    if (r < 0) {
      if (lane == 0) d_weight[i] = 0.0f;
      continue;
    }
    const float* d = d_out + (i / static_cast<size_t>(k)) * h;
    const float* yr = y + static_cast<size_t>(r) * h;
    float dot = 0.0f;
    for (int c = lane; c < h; c += 32) dot += d[c] * yr[c];
    dot = warp_sum(dot);
    if (lane == 0) d_weight[i] = dot;
  }
}

// ---------------------------------------------------------------------------------------------
// Routing.

// A warp per token: softmax over the experts into probs, then the top-k in the order (probability
// descending, expert index ascending): choice j is the best pair strictly after choice j - 1.
// The weights are the chosen probabilities, divided by their sum (added in choice order) when
// renormalised.
__global__ void route_kernel(const float* logits, int tokens, int experts, int top_k,
                             bool renormalize, float* probs, int* expert_out, float* weight_out) {
  const int lane = threadIdx.x & 31;
  for (int t = blockIdx.x * kWarps + (threadIdx.x >> 5); t < tokens; t += gridDim.x * kWarps) {
    const float* l = logits + static_cast<size_t>(t) * experts;
    float* p = probs + static_cast<size_t>(t) * experts;
    float mx = -INFINITY;
    for (int e = lane; e < experts; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < experts; e += 32) {
      const float x = expf(l[e] - mx);
      p[e] = x;
      sum += x;
    }
    sum = warp_sum(sum);
    for (int e = lane; e < experts; e += 32) p[e] = p[e] / sum;  // each lane its own experts
    int* ex = expert_out + static_cast<size_t>(t) * top_k;
    float* w = weight_out + static_cast<size_t>(t) * top_k;
    float prev_p = INFINITY, kept = 0.0f;
    int prev_e = -1;
    for (int j = 0; j < top_k; ++j) {
      float best_p = -INFINITY;
      int best_e = INT_MAX;
      for (int e = lane; e < experts; e += 32) {
        const float q = p[e];
        const bool after = q < prev_p || (q == prev_p && e > prev_e);
        if (after && (q > best_p || (q == best_p && e < best_e))) {
          best_p = q;
          best_e = e;
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float op = __shfl_xor_sync(kFullMask, best_p, o);
        const int oe = __shfl_xor_sync(kFullMask, best_e, o);
        if (op > best_p || (op == best_p && oe < best_e)) {
          best_p = op;
          best_e = oe;
        }
      }
      prev_p = best_p;
      prev_e = best_e;
      kept += best_p;
      if (lane == 0) {
        ex[j] = best_e;
        w[j] = best_p;
      }
    }
    if (renormalize && lane == 0)
      for (int j = 0; j < top_k; ++j) w[j] = w[j] / kept;
  }
}

// A warp per token: the gradient of the combine weights through the renormalisation (w_j = p_j /
// kept: d p_j = (gw_j - sum_i gw_i w_i) / kept) and the softmax (d l_e = p_e (d p_e - <d p, p>)),
// in double as the CPU backend.
__global__ void route_backward_kernel(const float* probs, const int* expert, const float* weight,
                                      const float* d_weight, int tokens, int experts, int top_k,
                                      bool renormalize, float* d_logits) {
  const int lane = threadIdx.x & 31;
  for (int t = blockIdx.x * kWarps + (threadIdx.x >> 5); t < tokens; t += gridDim.x * kWarps) {
    const float* p = probs + static_cast<size_t>(t) * experts;
    const int* ex = expert + static_cast<size_t>(t) * top_k;
    const float* w = weight + static_cast<size_t>(t) * top_k;
    const float* gw = d_weight + static_cast<size_t>(t) * top_k;
    double kept = 0, gsum = 0;
    if (renormalize)
      for (int j = 0; j < top_k; ++j) {
        kept += p[ex[j]];
        gsum += double{gw[j]} * w[j];
      }
    double dot = 0;
    for (int j = 0; j < top_k; ++j) {
      const double dp = renormalize ? (gw[j] - gsum) / kept : double{gw[j]};
      dot += dp * p[ex[j]];
    }
    float* dl = d_logits + static_cast<size_t>(t) * experts;
    for (int e = lane; e < experts; e += 32) {
      double dp = 0;
      for (int j = 0; j < top_k; ++j)
        if (ex[j] == e) dp += renormalize ? (gw[j] - gsum) / kept : double{gw[j]};
      dl[e] = static_cast<float>(p[e] * (dp - dot));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

__global__ void rmsnorm_kernel(const float* x, const float* g, int rows, int h, float eps,
                               float* y) {
  __shared__ float shared[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + static_cast<size_t>(r) * h;
    float* yr = y + static_cast<size_t>(r) * h;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, shared);
    const float inv = 1.0f / sqrtf(ss / h + eps);
    for (int c = threadIdx.x; c < h; c += blockDim.x) yr[c] = xr[c] * inv * g[c];
  }
}

// d_x per row (d x_c = inv (g_c dy_c - x_c inv^2 <g dy, x> / h)) and each row's inv for d_g.
__global__ void rmsnorm_backward_kernel(const float* x, const float* g, const float* d_y, int rows,
                                        int h, float eps, float* d_x, float* inv_out) {
  __shared__ float shared[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const size_t base = static_cast<size_t>(r) * h;
    float ss = 0.0f, dot = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
      const float xc = x[base + c];
      ss += xc * xc;
      dot += d_y[base + c] * g[c] * xc;
    }
    ss = block_sum(ss, shared);
    dot = block_sum(dot, shared);
    const float inv = 1.0f / sqrtf(ss / h + eps);
    const float k = dot / h * inv * inv;
    for (int c = threadIdx.x; c < h; c += blockDim.x)
      d_x[base + c] = inv * (g[c] * d_y[base + c] - x[base + c] * k);
    if (threadIdx.x == 0) inv_out[r] = inv;
  }
}

// d_g[c] += sum over rows of d_y * x * inv: blocks of 32 columns x 8 row lanes, partial sums per
// block added with atomics.
__global__ void rmsnorm_dg_kernel(const float* x, const float* d_y, const float* inv, int rows,
                                  int h, float* d_g) {
  __shared__ float part[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.0f;
  if (c < h)
    for (int r = blockIdx.y * 8 + threadIdx.y; r < rows; r += gridDim.y * 8) {
      const size_t at = static_cast<size_t>(r) * h + c;
      acc += d_y[at] * x[at] * inv[r];
    }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < h) {
    float s = 0.0f;
    for (int i = 0; i < 8; ++i) s += part[i][threadIdx.x];
    atomicAdd(d_g + c, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Attention.

__global__ void fill_pointers_kernel(PtrSpecs specs, long long p0, int n, int heads,
                                     const float** out) {
  const int total = specs.count * n;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += gridDim.x * blockDim.x) {
    const int a = idx / n, i = idx % n;
    const long long p = p0 + i, b = p / heads, hd = p % heads;
    const PtrSpec& s = specs.s[a];
    out[idx] = s.base + b * s.stride_b + hd * s.stride_h + i * s.stride_local;
  }
}

// A warp per row of `cols` scores (row r: query i = r % q_rows, which sees columns 0..past + i):
// the softmax in place (0 past the mask) and, when lse is not null, lse[r] = max + log(sum).
__global__ void causal_softmax_kernel(float* s, size_t rows, int q_rows, int cols, int past,
                                      float* lse) {
  const int lane = threadIdx.x & 31;
  for (size_t r = blockIdx.x * size_t{kWarps} + (threadIdx.x >> 5); r < rows;
       r += size_t{gridDim.x} * kWarps) {
    float* row = s + r * cols;
    const int n = min(past + static_cast<int>(r % q_rows) + 1, cols);
    float m = -INFINITY, sum = 0.0f;  // online: sum of exp(x - m) over this lane's columns
    for (int j = lane; j < n; j += 32) {
      const float x = row[j];
      if (x > m) {
        sum = sum * expf(m - x) + 1.0f;
        m = x;
      } else {
        sum += expf(x - m);
      }
    }
    const float mx = warp_max(m);
    const float total = warp_sum(m == -INFINITY ? 0.0f : sum * expf(m - mx));
    for (int j = lane; j < cols; j += 32) row[j] = j < n ? expf(row[j] - mx) / total : 0.0f;
    if (lse && lane == 0) lse[r] = mx + logf(total);
  }
}

// The probabilities again from the scores and lse (a warp per row, rows as above, past = 0).
__global__ void probs_from_lse_kernel(float* s, size_t rows, int seq, const float* lse) {
  const int lane = threadIdx.x & 31;
  for (size_t r = blockIdx.x * size_t{kWarps} + (threadIdx.x >> 5); r < rows;
       r += size_t{gridDim.x} * kWarps) {
    float* row = s + r * seq;
    const int n = static_cast<int>(r % seq) + 1;
    const float l = lse[r];
    for (int j = lane; j < seq; j += 32) row[j] = j < n ? expf(row[j] - l) : 0.0f;
  }
}

// dS = P * (dP - D_i) in place of dP (0 past the mask), D_i = <dO_i, O_i> over the head; a warp
// per row r of the chunk starting at pair p0.
__global__ void attention_ds_kernel(const float* p, float* dp, size_t rows, int seq, long long p0,
                                    int heads, int head_dim, const float* out, const float* d_out) {
  const int lane = threadIdx.x & 31;
  const size_t h = static_cast<size_t>(heads) * head_dim;
  for (size_t r = blockIdx.x * size_t{kWarps} + (threadIdx.x >> 5); r < rows;
       r += size_t{gridDim.x} * kWarps) {
    const long long pair = p0 + static_cast<long long>(r / seq);
    const size_t b = static_cast<size_t>(pair / heads), hd = static_cast<size_t>(pair % heads);
    const int i = static_cast<int>(r % seq);
    const size_t at = (b * seq + i) * h + hd * head_dim;
    float d = 0.0f;
    for (int c = lane; c < head_dim; c += 32) d += d_out[at + c] * out[at + c];
    d = warp_sum(d);
    const float* pr = p + r * seq;
    float* dr = dp + r * seq;
    for (int j = lane; j < seq; j += 32) dr[j] = j <= i ? pr[j] * (dr[j] - d) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

// A block per row: loss_out[r] = log(sum exp(z - max)) + max - z[label], and the row overwritten
// with grad_scale * (softmax - onehot).
__global__ void cross_entropy_kernel(float* logits, const int* labels, int rows, int vocab,
                                     float grad_scale, double* loss_out) {
  __shared__ float fshared[32];
  __shared__ double dshared[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    float* z = logits + static_cast<size_t>(r) * vocab;
    const int label = labels[r];
    const float target = z[label];  // read before the row is overwritten (barriers below)
    float mx = -INFINITY;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, z[v]);
    mx = block_max(mx, fshared);
    double sum = 0;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) sum += expf(z[v] - mx);
    sum = block_sum(sum, dshared);
    const float k = static_cast<float>(grad_scale / sum);
    for (int v = threadIdx.x; v < vocab; v += blockDim.x)
      z[v] = expf(z[v] - mx) * k - (v == label ? grad_scale : 0.0f);
    if (threadIdx.x == 0) loss_out[r] = log(sum) + mx - target;
  }
}

__global__ void row_max_kernel(const float* x, int rows, int cols, double* out) {
  __shared__ float shared[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* l = x + static_cast<size_t>(r) * cols;
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, l[c]);
    mx = block_max(mx, shared);
    if (threadIdx.x == 0) out[r] = mx;
  }
}

__global__ void softmax_sums_kernel(const float* logits, const int* labels, int rows, int cols,
                                    int label_offset, const double* row_max, double* sum_target) {
  __shared__ double shared[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* l = logits + static_cast<size_t>(r) * cols;
    const double mx = row_max[r];
    double sum = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += exp(double{l[c]} - mx);
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) {
      const int target = labels[r] - label_offset;
      sum_target[2 * static_cast<size_t>(r)] = sum;
      sum_target[2 * static_cast<size_t>(r) + 1] = target >= 0 && target < cols ? l[target] : 0.0;
    }
  }
}

__global__ void softmax_cross_entropy_grad_kernel(float* logits, const int* labels, int rows,
                                                  int cols, int label_offset, const double* row_max,
                                                  const double* sum_target, float grad_scale,
                                                  double* loss_out) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    float* l = logits + static_cast<size_t>(r) * cols;
    const double mx = row_max[r], sum = sum_target[2 * static_cast<size_t>(r)];
    const int target = labels[r] - label_offset;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
      l[c] = static_cast<float>((exp(double{l[c]} - mx) / sum - (c == target)) * grad_scale);
    if (threadIdx.x == 0) loss_out[r] = log(sum) + mx - sum_target[2 * static_cast<size_t>(r) + 1];
  }
}

// out[0] = sum of n doubles (one block).
__global__ void sum_doubles_kernel(const double* x, int n, double* out) {
  __shared__ double shared[32];
  double s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  s = block_sum(s, shared);
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

void scale_matrix(float* c, int m, int n, int ldc, float beta, cudaStream_t s) {
  if (m <= 0 || n <= 0) return;
  scale_matrix_kernel<<<blocks_for(static_cast<size_t>(m) * n), kThreads, 0, s>>>(c, m, n, ldc,
                                                                                  beta);
  check_launch();
}

void add(const float* a, const float* b, size_t n, float* out, cudaStream_t s) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n), kThreads, 0, s>>>(a, b, n, out);
  check_launch();
}

void adam(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
          float beta2, float eps, float c1, float c2, cudaStream_t s) {
  if (n == 0) return;
  adam_kernel<<<blocks_for(n), kThreads, 0, s>>>(param, grad, m, v, n, lr, beta1, beta2, eps, c1,
                                                 c2);
  check_launch();
}

void swiglu(const float* gate_up, int rows, int f, float* out, cudaStream_t s) {
  if (rows <= 0 || f <= 0) return;
  swiglu_kernel<<<blocks_for(static_cast<size_t>(rows) * f), kThreads, 0, s>>>(gate_up, rows, f,
                                                                               out);
  check_launch();
}

void swiglu_backward(const float* gate_up, const float* d_out, int rows, int f, float* d_gate_up,
                     cudaStream_t s) {
  if (rows <= 0 || f <= 0) return;
  swiglu_backward_kernel<<<blocks_for(static_cast<size_t>(rows) * f), kThreads, 0, s>>>(
      gate_up, d_out, rows, f, d_gate_up);
  check_launch();
}

void to_bf16(const float* src, size_t rows, size_t cols, size_t ld, void* dst, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  to_bf16_kernel<<<blocks_for(rows * cols), kThreads, 0, s>>>(src, rows, cols, ld,
                                                              static_cast<__nv_bfloat16*>(dst));
  check_launch();
}

void to_bf16_segments(const float* const* src, void* const* dst, size_t n, unsigned segments,
                      cudaStream_t s) {
  if (n == 0 || segments == 0) return;
  for (unsigned first = 0; first < segments; first += 65535) {  // gridDim.y's limit
    const dim3 grid(blocks_for(n), std::min(segments - first, 65535u));
    to_bf16_segments_kernel<<<grid, kThreads, 0, s>>>(
        src + first, reinterpret_cast<__nv_bfloat16* const*>(dst + first), n);
    check_launch();
  }
}

void move_rows(const float* src, int src_div, const int* dst_row, const float* weight, size_t pairs,
               size_t width, float* dst, cudaStream_t s) {
  if (pairs == 0 || width == 0) return;
  if (width % 4 == 0 && aligned16(src) && aligned16(dst)) {
    scatter_rows_kernel<float4><<<blocks_for(pairs * (width / 4)), kThreads, 0, s>>>(
        reinterpret_cast<const float4*>(src), src_div, dst_row, weight, pairs, width / 4,
        reinterpret_cast<float4*>(dst));
  } else {
    scatter_rows_kernel<float><<<blocks_for(pairs * width), kThreads, 0, s>>>(
        src, src_div, dst_row, weight, pairs, width, dst);
  }
  check_launch();
}

void scatter_add_rows(const float* src, const int* dst_row, size_t n, size_t width, float* dst,
                      cudaStream_t s) {
  if (n == 0 || width == 0) return;
  scatter_add_rows_kernel<<<blocks_for(n * width), kThreads, 0, s>>>(src, dst_row, n, width, dst);
  check_launch();
}

void gather_sum_rows(const float* src, const int* index, const float* weight, int k, size_t rows,
                     size_t width, float* dst, cudaStream_t s) {
  if (rows == 0 || width == 0) return;
  if (width % 4 == 0 && aligned16(src) && aligned16(dst)) {
    gather_sum_rows_kernel<float4><<<blocks_for(rows * (width / 4)), kThreads, 0, s>>>(
        reinterpret_cast<const float4*>(src), index, weight, k, rows, width / 4,
        reinterpret_cast<float4*>(dst));
  } else {
    gather_sum_rows_kernel<float>
        <<<blocks_for(rows * width), kThreads, 0, s>>>(src, index, weight, k, rows, width, dst);
  }
  check_launch();
}

void pair_dot(const float* y, const float* d_out, const int* row, int k, size_t pairs, int h,
              float* d_weight, cudaStream_t s) {
  if (pairs == 0) return;
  pair_dot_kernel<<<blocks_for(pairs, kWarps), kThreads, 0, s>>>(y, d_out, row, k, pairs,
                                                                 std::max(h, 0), d_weight);
  check_launch();
}

void route(const float* logits, int tokens, int experts, int top_k, bool renormalize, float* probs,
           int* expert, float* weight, cudaStream_t s) {
  if (tokens <= 0) return;
  route_kernel<<<blocks_for(static_cast<size_t>(tokens), kWarps), kThreads, 0, s>>>(
      logits, tokens, experts, top_k, renormalize, probs, expert, weight);
  check_launch();
}

void route_backward(const float* probs, const int* expert, const float* weight,
                    const float* d_weight, int tokens, int experts, int top_k, bool renormalize,
                    float* d_logits, cudaStream_t s) {
  if (tokens <= 0 || experts <= 0) return;
  route_backward_kernel<<<blocks_for(static_cast<size_t>(tokens), kWarps), kThreads, 0, s>>>(
      probs, expert, weight, d_weight, tokens, experts, top_k, renormalize, d_logits);
  check_launch();
}

void rmsnorm(const float* x, const float* g, int rows, int h, float eps, float* y, cudaStream_t s) {
  if (rows <= 0 || h <= 0) return;
  rmsnorm_kernel<<<row_blocks(static_cast<size_t>(rows)), kThreads, 0, s>>>(x, g, rows, h, eps, y);
  check_launch();
}

void rmsnorm_backward(const float* x, const float* g, const float* d_y, int rows, int h, float eps,
                      float* d_x, float* d_g, float* inv, cudaStream_t s) {
  if (rows <= 0 || h <= 0) return;
  rmsnorm_backward_kernel<<<row_blocks(static_cast<size_t>(rows)), kThreads, 0, s>>>(
      x, g, d_y, rows, h, eps, d_x, inv);
  check_launch();
  // Each thread adds up at least 8 rows of its column; at most 64 row groups per column block.
  const dim3 grid(static_cast<unsigned>((h + 31) / 32),
                  static_cast<unsigned>(std::min((rows + 63) / 64, 64)));
  rmsnorm_dg_kernel<<<grid, dim3(32, 8), 0, s>>>(x, d_y, inv, rows, h, d_g);
  check_launch();
}

void fill_pointers(const PtrSpecs& specs, long long p0, int n, int heads, const float** out,
                   cudaStream_t s) {
  if (n <= 0 || specs.count <= 0) return;
  fill_pointers_kernel<<<blocks_for(static_cast<size_t>(specs.count) * n), kThreads, 0, s>>>(
      specs, p0, n, heads, out);
  check_launch();
}

void causal_softmax(float* scores, size_t rows, int q_rows, int cols, int past, float* lse,
                    cudaStream_t s) {
  if (rows == 0 || cols <= 0) return;
  causal_softmax_kernel<<<blocks_for(rows, kWarps), kThreads, 0, s>>>(scores, rows, q_rows, cols,
                                                                      past, lse);
  check_launch();
}

void probs_from_lse(float* scores, size_t rows, int seq, const float* lse, cudaStream_t s) {
  if (rows == 0 || seq <= 0) return;
  probs_from_lse_kernel<<<blocks_for(rows, kWarps), kThreads, 0, s>>>(scores, rows, seq, lse);
  check_launch();
}

void attention_ds(const float* p, float* dp, size_t rows, int seq, long long p0, int heads,
                  int head_dim, const float* out, const float* d_out, cudaStream_t s) {
  if (rows == 0 || seq <= 0) return;
  attention_ds_kernel<<<blocks_for(rows, kWarps), kThreads, 0, s>>>(p, dp, rows, seq, p0, heads,
                                                                    head_dim, out, d_out);
  check_launch();
}

void cross_entropy(float* logits, const int* labels, int rows, int vocab, float grad_scale,
                   double* loss_rows, cudaStream_t s) {
  if (rows <= 0) return;
  cross_entropy_kernel<<<row_blocks(static_cast<size_t>(rows)), kThreads, 0, s>>>(
      logits, labels, rows, vocab, grad_scale, loss_rows);
  check_launch();
}

void row_max(const float* x, int rows, int cols, double* out, cudaStream_t s) {
  if (rows <= 0) return;
  row_max_kernel<<<row_blocks(static_cast<size_t>(rows)), kThreads, 0, s>>>(x, rows,
                                                                            std::max(cols, 0), out);
  check_launch();
}

void softmax_sums(const float* logits, const int* labels, int rows, int cols, int label_offset,
                  const double* row_max, double* sum_target, cudaStream_t s) {
  if (rows <= 0) return;
  softmax_sums_kernel<<<row_blocks(static_cast<size_t>(rows)), kThreads, 0, s>>>(
      logits, labels, rows, std::max(cols, 0), label_offset, row_max, sum_target);
  check_launch();
}

void softmax_cross_entropy_grad(float* logits, const int* labels, int rows, int cols,
                                int label_offset, const double* row_max, const double* sum_target,
                                float grad_scale, double* loss_rows, cudaStream_t s) {
  if (rows <= 0) return;
  softmax_cross_entropy_grad_kernel<<<row_blocks(static_cast<size_t>(rows)), kThreads, 0, s>>>(
      logits, labels, rows, std::max(cols, 0), label_offset, row_max, sum_target, grad_scale,
      loss_rows);
  check_launch();
}

void sum_doubles(const double* x, int n, double* out, cudaStream_t s) {
  sum_doubles_kernel<<<1, 1024, 0, s>>>(x, std::max(n, 0), out);
  check_launch();
}

}  // namespace switchyard::cuda_kernels
