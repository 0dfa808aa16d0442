// The CUDA backend's kernels (executor/cuda/cuda_device.cu), each launched on a given stream and
// checked (DeviceError on a launch failure); the Device class that calls them is
// executor/cuda/cuda_device.cc. This header stays C++17 (it is compiled by nvcc under CUDA C++17),
// so it includes no host-only C++20 header. Sizes of 0 launch nothing. Every pointer is device
// memory unless said otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace switchyard::cuda_kernels {

constexpr int kWarpsPerBlock = 8;  // warp-per-row kernels: rows per block

// c[i, j] = beta * c[i, j] (0 when beta is 0) over an m x n matrix with row stride ldc.
void scale_matrix(float* c, int m, int n, int ldc, float beta, cudaStream_t s);
void add(const float* a, const float* b, size_t n, float* out, cudaStream_t s);
void adam(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
          float beta2, float eps, float c1, float c2, cudaStream_t s);
void swiglu(const float* gate_up, int rows, int f, float* out, cudaStream_t s);
void swiglu_backward(const float* gate_up, const float* d_out, int rows, int f, float* d_gate_up,
                     cudaStream_t s);

// A rows x cols matrix (row stride ld) to a dense bf16 copy at dst (row stride cols), rounded to
// nearest even.
void to_bf16(const float* src, size_t rows, size_t cols, size_t ld, void* dst, cudaStream_t s);
// For each of `segments` segments i: n floats from src[i] to bf16 at dst[i] (device arrays).
void to_bf16_segments(const float* const* src, void* const* dst, size_t n, unsigned segments,
                      cudaStream_t s);

// For each pair i < pairs with dst_row[i] >= 0: dst row dst_row[i] = weight[i] (1 when null) * src
// row (i / src_div); rows of `width` floats.
void move_rows(const float* src, int src_div, const int* dst_row, const float* weight, size_t pairs,
               size_t width, float* dst, cudaStream_t s);
// dst row dst_row[i] += src row i (atomically: rows may repeat), skipping negative rows.
void scatter_add_rows(const float* src, const int* dst_row, size_t n, size_t width, float* dst,
                      cudaStream_t s);
// dst row t = sum over j < k of weight[t*k + j] (1 when null) * src row index[t*k + j], negative
// indices skipped (zeros when all are), for t < rows.
void gather_sum_rows(const float* src, const int* index, const float* weight, int k, size_t rows,
                     size_t width, float* dst, cudaStream_t s);
// d_weight[i] = <d_out row (i / k), y row row[i]>, 0 where row[i] < 0; rows of h floats.
void pair_dot(const float* y, const float* d_out, const int* row, int k, size_t pairs, int h,
              float* d_weight, cudaStream_t s);

// Softmax of each token's logits into probs and its top-k (probability descending, ties to the
// lower expert): expert[t*top_k + j] and its weight (the probability, over the chosen ones' sum
// when renormalised).
void route(const float* logits, int tokens, int experts, int top_k, bool renormalize, float* probs,
           int* expert, float* weight, cudaStream_t s);
// d_logits from d_weight through the renormalisation (when asked) and the softmax.
void route_backward(const float* probs, const int* expert, const float* weight,
                    const float* d_weight, int tokens, int experts, int top_k, bool renormalize,
                    float* d_logits, cudaStream_t s);

void rmsnorm(const float* x, const float* g, int rows, int h, float eps, float* y, cudaStream_t s);
// d_x, and d_g += sum over rows of d_y * x / rms; inv: scratch of `rows` floats.
void rmsnorm_backward(const float* x, const float* g, const float* d_y, int rows, int h, float eps,
                      float* d_x, float* d_g, float* inv, cudaStream_t s);

// Where one operand of attention's batched GEMMs lies for the pair p = b * heads + hd, the i-th of
// a chunk: base + b * stride_b + hd * stride_h + i * stride_local (in floats).
struct PtrSpec {
  const float* base;
  long long stride_b, stride_h, stride_local;
};
constexpr int kMaxPtrSpecs = 10;
struct PtrSpecs {
  PtrSpec s[kMaxPtrSpecs];
  int count;
};
// out[a * n + i] = the pointer of spec a for pair p0 + i.
void fill_pointers(const PtrSpecs& specs, long long p0, int n, int heads, const float** out,
                   cudaStream_t s);
// Rows of `cols` scores (row r: query i = r % q_rows, which sees columns 0..past + i): softmax in
// place (0 past the mask) and, when lse is not null, lse[r] = max + log(sum of exp).
void causal_softmax(float* scores, size_t rows, int q_rows, int cols, int past, float* lse,
                    cudaStream_t s);
// Rows of `seq` scores to probabilities exp(score - lse[r]) (0 past query r % seq).
void probs_from_lse(float* scores, size_t rows, int seq, const float* lse, cudaStream_t s);
// dS = P * (dP - <dO_i, O_i>) in place of dP (0 past the mask), rows of the chunk at pair p0.
void attention_ds(const float* p, float* dp, size_t rows, int seq, long long p0, int heads,
                  int head_dim, const float* out, const float* d_out, cudaStream_t s);

// Per row: loss_rows[r] = log(sum exp(z - max)) + max - z[label], the row overwritten with
// grad_scale * (softmax - onehot).
void cross_entropy(float* logits, const int* labels, int rows, int vocab, float grad_scale,
                   double* loss_rows, cudaStream_t s);
void row_max(const float* x, int rows, int cols, double* out, cudaStream_t s);
void softmax_sums(const float* logits, const int* labels, int rows, int cols, int label_offset,
                  const double* row_max, double* sum_target, cudaStream_t s);
void softmax_cross_entropy_grad(float* logits, const int* labels, int rows, int cols,
                                int label_offset, const double* row_max, const double* sum_target,
                                float grad_scale, double* loss_rows, cudaStream_t s);
// out[0] = the sum of x[0..n).
void sum_doubles(const double* x, int n, double* out, cudaStream_t s);

}  // namespace switchyard::cuda_kernels
