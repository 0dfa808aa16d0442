// Device: where a rank's tensors live and its kernels run. The runner calls only this interface;
// backends: CPU (Eigen, fp32; executor/cpu/cpu_device.cc) and CUDA (cuBLAS + kernels;
// executor/cuda/cuda_device.h). One
// contract test runs every backend against the CPU one.
//
// Conventions: fp32, row-major matrices, pointers into buffers of the device's MemoryPools, counts
// in elements. Every call completes before it returns (the CUDA backend synchronises its stream),
// so the runner's host-side order is the device's order and wall time around a call is its time;
// copies issued from another thread (the copy engine's) overlap the calls of this one. TokenRouting
// conventions follow Mixtral/Megatron: softmax over all experts, the top-k kept (ties to the lower
// expert index), their weights renormalised to sum to 1 when asked.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "executor/memory.h"

namespace switchyard {

// Token -> expert assignments of one MoE layer, grouped by expert.
struct TokenRouting {
  int tokens = 0;
  int top_k = 0;
  int experts = 0;
  std::vector<int> expert;    // [tokens * top_k]: the chosen experts, by token
  std::vector<float> weight;  // [tokens * top_k]: their combine weights
  std::vector<int> row;  // [tokens * top_k]: the row of (token, choice) in the permuted order, -1
                         // when its expert's capacity dropped it
  std::vector<int> rows_per_expert;  // [experts], kept rows
  std::vector<int> source;           // [kept rows]: inverse of `row`
  int dropped = 0;                   // (token, choice) pairs past their expert's capacity
};

// Groups route()'s choices (r.tokens, top_k, experts, expert and weight filled) by expert: each
// expert keeps its first `capacity` choices in token order (0: all), the rest are dropped (row
// -1); fills rows_per_expert, row, source and dropped. Every backend's route() ends with it.
void finish_routing(TokenRouting& r, int capacity);
// route()'s precondition, 1 <= top_k <= experts (std::invalid_argument naming both otherwise).
void check_top_k(int top_k, int experts);

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  virtual MemoryPools& memory() = 0;
  // The device's own time of the compute calls finished since the last take (CUDA: events around
  // each on the compute stream), reset to 0; -1 where the backend does not time calls apart from
  // the host (CPU: a call's wall time is its time).
  virtual double take_call_device_seconds() { return -1; }

  // C = alpha * op(A) * op(B) + beta * C, op = transpose when asked; A is m x k after op, B is
  // k x n after op; leading dimensions are the row lengths as stored.
  virtual void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                    int lda, const float* b, int ldb, float beta, float* c, int ldc) = 0;
  // Experts' GEMMs in one call: rows of `a` are grouped by expert (rows_per_expert), expert e
  // multiplies its rows by its own k x n weight w[e] (trans_w: w[e] stored n x k).
  virtual void grouped_gemm(const float* a, int k, const std::vector<int>& rows_per_expert,
                            const std::vector<const float*>& w, bool trans_w, int n, float* c) = 0;

  // Softmax over `experts` logits per token, top-k, the grouping by expert (stable in token order).
  // capacity > 0: each expert keeps its first `capacity` assignments in token order and drops the
  // rest in token order (their weights stay: dropped choices contribute nothing).
  virtual TokenRouting route(const float* logits, int tokens, int experts, int top_k,
                             bool renormalize, float* probs, int capacity = 0) = 0;
  // out[row(t, j)] = x[t] for every choice j of token t (hidden size h).
  virtual void permute(const float* x, const TokenRouting& r, int h, float* out) = 0;
  // out[t] = sum_j weight(t, j) * y[row(t, j)].
  virtual void unpermute_combine(const float* y, const TokenRouting& r, int h, float* out) = 0;

  // SwiGLU on [rows, 2f] (gate | up) -> [rows, f]: silu(gate) * up; and its backward.
  virtual void swiglu(const float* gate_up, int rows, int f, float* out) = 0;
  virtual void swiglu_backward(const float* gate_up, const float* d_out, int rows, int f,
                               float* d_gate_up) = 0;
  // RMSNorm over rows of width h with weight g: y = x / rms(x) * g; the backward accumulates
  // into d_g.
  virtual void rmsnorm(const float* x, const float* g, int rows, int h, float eps, float* y) = 0;
  virtual void rmsnorm_backward(const float* x, const float* g, const float* d_y, int rows, int h,
                                float eps, float* d_x, float* d_g) = 0;

  // Causal multi-head attention over `batch` sequences of `seq` tokens. qkv is [batch*seq, 3*h]
  // (queries | keys | values, heads contiguous, h = heads*head_dim); out is [batch*seq, h]; lse
  // [batch*heads*seq] keeps each query's log-sum-exp for the backward, which recomputes the
  // probabilities from it and writes d_qkv.
  virtual void attention(const float* qkv, int batch, int seq, int heads, int head_dim, float* out,
                         float* lse) = 0;
  virtual void attention_backward(const float* qkv, const float* out, const float* lse,
                                  const float* d_out, int batch, int seq, int heads, int head_dim,
                                  float* d_qkv) = 0;

  // Attention of new queries against a key/value cache (inference): per sequence, q_len queries
  // (rows of q, heads contiguous, row stride ldq) are the last q_len of ctx positions whose keys
  // and values are rows 0..ctx-1 of that sequence's cache (k and v: [batch, cache_len, h]); query i
  // sees positions 0..ctx-q_len+i (causal). out is [batch*q_len, h]. q_len = ctx is a prefill,
  // q_len = 1 one decode step.
  virtual void attention_cached(const float* q, int ldq, const float* k, const float* v, int batch,
                                int q_len, int ctx, int cache_len, int heads, int head_dim,
                                float* out) = 0;

  // Softmax cross-entropy of `rows` logit rows against their labels: returns the sum of the rows'
  // losses and overwrites the logits with d(grad_scale * loss sum)/d(logits).
  virtual double cross_entropy(float* logits, const int* labels, int rows, int vocab,
                               float grad_scale) = 0;
  // One Adam step over n elements (bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t).
  virtual void adam(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                    float beta1, float beta2, float eps, float c1, float c2) = 0;

  // Copies between buffers of any tiers and plain host memory (the CPU backend: memcpy; CUDA:
  // cudaMemcpyAsync on the calling thread's stream, complete on return).
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  // `rows` rows of `row_bytes` each from src (rows `src_pitch` bytes apart) to dst (`dst_pitch`
  // apart); any tiers.
  virtual void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, size_t rows) = 0;

  // --- The runner's work between the kernels above (so no tensor is touched from the host).
  // Index arrays (`index`, `labels`) are host memory; every pointer to floats or doubles is in a
  // buffer of this device's MemoryPools.
  virtual void zero(void* dst, size_t bytes) = 0;
  // out = a + b over n elements (out may be a or b).
  virtual void add(const float* a, const float* b, size_t n, float* out) = 0;
  // dst row i = src row index[i] (rows of `width` floats); index[i] < 0 gives a row of zeros.
  virtual void gather_rows(const float* src, const int* index, int n, int width, float* dst) = 0;
  // dst row index[i] = src row i (accumulate: +=, and repeated indices add up); index[i] < 0 is
  // skipped.
  virtual void scatter_rows(const float* src, const int* index, int n, int width, float* dst,
                            bool accumulate) = 0;
  // The backward of unpermute_combine: d_y[row(t, j)] = weight(t, j) * d_out[t] and d_weight[t *
  // top_k + j] = <d_out[t], y[row(t, j)]> (0 for a dropped choice, whose d_y row does not exist).
  virtual void unpermute_combine_backward(const float* y, const float* d_out, const TokenRouting& r,
                                          int h, float* d_y, float* d_weight) = 0;
  // The backward of permute: d_x[t] = sum over t's kept choices j of d_perm[row(t, j)]
  // (overwrites d_x; a token whose choices were all dropped gets zeros).
  virtual void permute_backward(const float* d_perm, const TokenRouting& r, int h, float* d_x) = 0;
  // The backward of route's combine weights (d_weight [tokens * top_k]) through the top-k
  // renormalisation (when asked) and the softmax, from route's probabilities: d_logits
  // [tokens, experts].
  virtual void route_backward(const float* probs, const TokenRouting& r, const float* d_weight,
                              bool renormalize, float* d_logits) = 0;
  // Megatron's vocab-parallel softmax cross-entropy in three parts (the caller reduces between
  // them over the vocabulary's ranks): each row's max; each row's sum of exp(logit - max) and its
  // label's logit (sum_target [2 * rows], the logit 0 where the label is outside this rank's
  // columns [label_offset, label_offset + cols)); then the loss sum is returned and the logits
  // overwritten with grad_scale * (softmax - onehot).
  virtual void row_max(const float* x, int rows, int cols, double* out) = 0;
  virtual void softmax_sums(const float* logits, const int* labels, int rows, int cols,
                            int label_offset, const double* row_max, double* sum_target) = 0;
  virtual double softmax_cross_entropy_grad(float* logits, const int* labels, int rows, int cols,
                                            int label_offset, const double* row_max,
                                            const double* sum_target, float grad_scale) = 0;
};

std::unique_ptr<Device> cpu_device(TierCapacity capacity);

}  // namespace switchyard
