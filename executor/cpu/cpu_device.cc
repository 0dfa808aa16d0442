// The CPU backend of Device: Eigen fp32 GEMMs (Eigen's own blocked kernels, single-threaded per
// rank: a rank is one core), plain loops for the memory-bound kernels.
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "executor/device.h"
#include "executor/host_kernels.h"

namespace switchyard {
namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Map = Eigen::Map<RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMap = Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;

class CpuDevice : public Device {
 public:
  explicit CpuDevice(TierCapacity capacity) : memory_(std::move(capacity)) {}
  std::string name() const override { return "cpu"; }
  MemoryPools& memory() override { return memory_; }

  void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
            const float* b, int ldb, float beta, float* c, int ldc) override {
    Map C(c, m, n, Eigen::OuterStride<>(ldc));
    const ConstMap A(a, trans_a ? k : m, trans_a ? m : k, Eigen::OuterStride<>(lda));
    const ConstMap B(b, trans_b ? n : k, trans_b ? k : n, Eigen::OuterStride<>(ldb));
    if (beta == 0.0f)
      C.setZero();
    else if (beta != 1.0f)
      C *= beta;
    if (m == 0 || n == 0 || k == 0) return;
    // noalias: C never overlaps A or B here; Eigen then writes the product straight into C.
    if (!trans_a && !trans_b)
      C.noalias() += alpha * A * B;
    else if (trans_a && !trans_b)
      C.noalias() += alpha * A.transpose() * B;
    else if (!trans_a && trans_b)
      C.noalias() += alpha * A * B.transpose();
    else
      C.noalias() += alpha * A.transpose() * B.transpose();
  }

  void grouped_gemm(const float* a, int k, const std::vector<int>& rows_per_expert,
                    const std::vector<const float*>& w, bool trans_w, int n, float* c) override {
    if (w.size() != rows_per_expert.size())
      throw std::invalid_argument("grouped_gemm: one weight per expert");
    int64_t row = 0;
    for (size_t e = 0; e < w.size(); ++e) {
      const int rows = rows_per_expert[e];
      if (rows > 0)
        gemm(false, trans_w, rows, n, k, 1.0f, a + row * k, k, w[e], trans_w ? k : n, 0.0f,
             c + row * n, n);
      row += rows;
    }
  }

  TokenRouting route(const float* logits, int tokens, int experts, int top_k, bool renormalize,
                     float* probs, int capacity) override {
    check_top_k(top_k, experts);
    TokenRouting r;
    r.tokens = tokens;
    r.top_k = top_k;
    r.experts = experts;
    r.expert.resize(static_cast<size_t>(tokens) * top_k);
    r.weight.resize(r.expert.size());
    std::vector<int> order(static_cast<size_t>(experts));
    for (int t = 0; t < tokens; ++t) {
      const float* l = logits + static_cast<size_t>(t) * experts;
      float* p = probs + static_cast<size_t>(t) * experts;
      const float mx = *std::max_element(l, l + experts);
      float sum = 0;
      for (int e = 0; e < experts; ++e) sum += (p[e] = std::exp(l[e] - mx));
      for (int e = 0; e < experts; ++e) p[e] /= sum;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                        [p](int x, int y) { return p[x] > p[y] || (p[x] == p[y] && x < y); });
      float kept = 0;
      for (int j = 0; j < top_k; ++j) kept += p[order[static_cast<size_t>(j)]];
      for (int j = 0; j < top_k; ++j) {
        const size_t at = static_cast<size_t>(t) * top_k + j;
        r.expert[at] = order[static_cast<size_t>(j)];
        r.weight[at] = renormalize ? p[r.expert[at]] / kept : p[r.expert[at]];
      }
    }
    finish_routing(r, capacity);
    return r;
  }

  void permute(const float* x, const TokenRouting& r, int h, float* out) override {
    for (size_t i = 0; i < r.row.size(); ++i)
      if (r.row[i] >= 0)
        std::memcpy(out + static_cast<size_t>(r.row[i]) * h,
                    x + (i / static_cast<size_t>(r.top_k)) * h, sizeof(float) * h);
  }

  void unpermute_combine(const float* y, const TokenRouting& r, int h, float* out) override {
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(r.tokens) * h);
    for (size_t i = 0; i < r.row.size(); ++i) {
      if (r.row[i] < 0) continue;  // dropped
      float* o = out + (i / static_cast<size_t>(r.top_k)) * h;
      const float* src = y + static_cast<size_t>(r.row[i]) * h;
      const float w = r.weight[i];
      for (int c = 0; c < h; ++c) o[c] += w * src[c];
    }
  }

  void swiglu(const float* gate_up, int rows, int f, float* out) override {
    for (int r = 0; r < rows; ++r) {
      const float* g = gate_up + static_cast<size_t>(r) * 2 * f;
      const float* u = g + f;
      float* o = out + static_cast<size_t>(r) * f;
      for (int c = 0; c < f; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
    }
  }

  void swiglu_backward(const float* gate_up, const float* d_out, int rows, int f,
                       float* d_gate_up) override {
    for (int r = 0; r < rows; ++r) {
      const float* g = gate_up + static_cast<size_t>(r) * 2 * f;
      const float* u = g + f;
      const float* d = d_out + static_cast<size_t>(r) * f;
      float* dg = d_gate_up + static_cast<size_t>(r) * 2 * f;
      float* du = dg + f;
      for (int c = 0; c < f; ++c) {
        const float s = 1.0f / (1.0f + std::exp(-g[c]));
        const float silu = g[c] * s;
        du[c] = d[c] * silu;
        dg[c] = d[c] * u[c] * s * (1.0f + g[c] * (1.0f - s));
      }
    }
  }

  void rmsnorm(const float* x, const float* g, int rows, int h, float eps, float* y) override {
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + static_cast<size_t>(r) * h;
      float* yr = y + static_cast<size_t>(r) * h;
      double ss = 0;
      for (int c = 0; c < h; ++c) ss += double{xr[c]} * xr[c];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / h) + eps);
      for (int c = 0; c < h; ++c) yr[c] = xr[c] * inv * g[c];
    }
  }

  void rmsnorm_backward(const float* x, const float* g, const float* d_y, int rows, int h,
                        float eps, float* d_x, float* d_g) override {
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + static_cast<size_t>(r) * h;
      const float* dy = d_y + static_cast<size_t>(r) * h;
      float* dx = d_x + static_cast<size_t>(r) * h;
      double ss = 0, dot = 0;
      for (int c = 0; c < h; ++c) ss += double{xr[c]} * xr[c];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / h) + eps);
      for (int c = 0; c < h; ++c) {
        dot += double{dy[c]} * g[c] * xr[c];
        d_g[c] += dy[c] * xr[c] * inv;
      }
      // d x_c = inv * (g_c dy_c - x_c * inv^2 * sum_j(g_j dy_j x_j) / h)
      const float k = static_cast<float>(dot / h) * inv * inv;
      for (int c = 0; c < h; ++c) dx[c] = inv * (g[c] * dy[c] - xr[c] * k);
    }
  }

  void attention(const float* qkv, int batch, int seq, int heads, int head_dim, float* out,
                 float* lse) override {
    const int h = heads * head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    RowMajor s(seq, seq);
    for (int b = 0; b < batch; ++b)
      for (int hd = 0; hd < heads; ++hd) {
        const float* base = qkv + static_cast<size_t>(b) * seq * 3 * h + hd * head_dim;
        const ConstMap q(base, seq, head_dim, Eigen::OuterStride<>(3 * h));
        const ConstMap k(base + h, seq, head_dim, Eigen::OuterStride<>(3 * h));
        const ConstMap v(base + 2 * h, seq, head_dim, Eigen::OuterStride<>(3 * h));
        Map o(out + static_cast<size_t>(b) * seq * h + hd * head_dim, seq, head_dim,
              Eigen::OuterStride<>(h));
        s.noalias() = scale * q * k.transpose();
        float* l = lse + (static_cast<size_t>(b) * heads + hd) * seq;
        for (int i = 0; i < seq; ++i) {
          float mx = -INFINITY;
          for (int j = 0; j <= i; ++j) mx = std::max(mx, s(i, j));
          double sum = 0;
          for (int j = 0; j <= i; ++j) sum += (s(i, j) = std::exp(s(i, j) - mx));
          for (int j = i + 1; j < seq; ++j) s(i, j) = 0;
          s.row(i) /= static_cast<float>(sum);
          l[i] = mx + static_cast<float>(std::log(sum));
        }
        o.noalias() = s * v;
      }
  }

  void attention_cached(const float* q, int ldq, const float* k, const float* v, int batch,
                        int q_len, int ctx, int cache_len, int heads, int head_dim,
                        float* out) override {
    if (q_len < 1 || ctx < q_len || ctx > cache_len)
      throw std::invalid_argument("attention_cached: need 1 <= q_len <= ctx <= cache_len");
    const int h = heads * head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const int past = ctx - q_len;
    RowMajor s(q_len, ctx);
    for (int b = 0; b < batch; ++b)
      for (int hd = 0; hd < heads; ++hd) {
        const ConstMap qm(q + static_cast<size_t>(b) * q_len * ldq + hd * head_dim, q_len, head_dim,
                          Eigen::OuterStride<>(ldq));
        const size_t cache = static_cast<size_t>(b) * cache_len * h + hd * head_dim;
        const ConstMap km(k + cache, ctx, head_dim, Eigen::OuterStride<>(h));
        const ConstMap vm(v + cache, ctx, head_dim, Eigen::OuterStride<>(h));
        Map o(out + static_cast<size_t>(b) * q_len * h + hd * head_dim, q_len, head_dim,
              Eigen::OuterStride<>(h));
        s.noalias() = scale * qm * km.transpose();
        for (int i = 0; i < q_len; ++i) {
          const int last = past + i;  // the newest position query i sees
          float mx = -INFINITY;
          for (int j = 0; j <= last; ++j) mx = std::max(mx, s(i, j));
          double sum = 0;
          for (int j = 0; j <= last; ++j) sum += (s(i, j) = std::exp(s(i, j) - mx));
          for (int j = last + 1; j < ctx; ++j) s(i, j) = 0;
          s.row(i) /= static_cast<float>(sum);
        }
        o.noalias() = s * vm;
      }
  }

  void attention_backward(const float* qkv, const float* out, const float* lse, const float* d_out,
                          int batch, int seq, int heads, int head_dim, float* d_qkv) override {
    const int h = heads * head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    RowMajor p(seq, seq), dp(seq, seq);
    for (int b = 0; b < batch; ++b)
      for (int hd = 0; hd < heads; ++hd) {
        const size_t row0 = static_cast<size_t>(b) * seq;
        const float* base = qkv + row0 * 3 * h + hd * head_dim;
        const ConstMap q(base, seq, head_dim, Eigen::OuterStride<>(3 * h));
        const ConstMap k(base + h, seq, head_dim, Eigen::OuterStride<>(3 * h));
        const ConstMap v(base + 2 * h, seq, head_dim, Eigen::OuterStride<>(3 * h));
        const ConstMap o(out + row0 * h + hd * head_dim, seq, head_dim, Eigen::OuterStride<>(h));
        const ConstMap d_o(d_out + row0 * h + hd * head_dim, seq, head_dim,
                           Eigen::OuterStride<>(h));
        float* dbase = d_qkv + row0 * 3 * h + hd * head_dim;
        Map dq(dbase, seq, head_dim, Eigen::OuterStride<>(3 * h));
        Map dk(dbase + h, seq, head_dim, Eigen::OuterStride<>(3 * h));
        Map dv(dbase + 2 * h, seq, head_dim, Eigen::OuterStride<>(3 * h));
        const float* l = lse + (static_cast<size_t>(b) * heads + hd) * seq;
        p.noalias() = scale * q * k.transpose();
        for (int i = 0; i < seq; ++i)
          for (int j = 0; j < seq; ++j) p(i, j) = j <= i ? std::exp(p(i, j) - l[i]) : 0.0f;
        dv.noalias() = p.transpose() * d_o;
        dp.noalias() = d_o * v.transpose();
        for (int i = 0; i < seq; ++i) {
          const float di = d_o.row(i).dot(o.row(i));
          for (int j = 0; j <= i; ++j) dp(i, j) = p(i, j) * (dp(i, j) - di);
          for (int j = i + 1; j < seq; ++j) dp(i, j) = 0;
        }
        dq.noalias() = scale * dp * k;
        dk.noalias() = scale * dp.transpose() * q;
      }
  }

  double cross_entropy(float* logits, const int* labels, int rows, int vocab,
                       float grad_scale) override {
    double loss = 0;
    for (int i = 0; i < rows; ++i) {
      float* z = logits + static_cast<size_t>(i) * vocab;
      const float mx = *std::max_element(z, z + vocab);
      const float target = z[labels[i]];
      double sum = 0;
      for (int v = 0; v < vocab; ++v) sum += (z[v] = std::exp(z[v] - mx));
      loss += std::log(sum) + mx - target;
      const float k = static_cast<float>(grad_scale / sum);
      for (int v = 0; v < vocab; ++v) z[v] *= k;
      z[labels[i]] -= grad_scale;
    }
    return loss;
  }

  void adam(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
            float beta2, float eps, float c1, float c2) override {
    host_adam(param, grad, m, v, n, lr, beta1, beta2, eps, c1, c2);
  }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (dst != src && bytes > 0) std::memmove(dst, src, bytes);
  }
  void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
               size_t rows) override {
    for (size_t i = 0; i < rows; ++i)
      copy(static_cast<char*>(dst) + i * dst_pitch, static_cast<const char*>(src) + i * src_pitch,
           row_bytes);
  }

  void zero(void* dst, size_t bytes) override {
    if (bytes > 0) std::memset(dst, 0, bytes);
  }
  void add(const float* a, const float* b, size_t n, float* out) override {
    for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }
  void gather_rows(const float* src, const int* index, int n, int width, float* dst) override {
    const size_t w = static_cast<size_t>(width);
    for (int i = 0; i < n; ++i) {
      float* d = dst + static_cast<size_t>(i) * w;
      if (index[i] < 0)
        std::memset(d, 0, sizeof(float) * w);
      else
        std::memcpy(d, src + static_cast<size_t>(index[i]) * w, sizeof(float) * w);
    }
  }
  void scatter_rows(const float* src, const int* index, int n, int width, float* dst,
                    bool accumulate) override {
    const size_t w = static_cast<size_t>(width);
    for (int i = 0; i < n; ++i) {
      if (index[i] < 0) continue;
      float* d = dst + static_cast<size_t>(index[i]) * w;
      const float* x = src + static_cast<size_t>(i) * w;
      if (accumulate)
        for (size_t c = 0; c < w; ++c) d[c] += x[c];
      else
        std::memcpy(d, x, sizeof(float) * w);
    }
  }

  void unpermute_combine_backward(const float* y, const float* d_out, const TokenRouting& r, int h,
                                  float* d_y, float* d_weight) override {
    for (size_t i = 0; i < r.expert.size(); ++i) {
      d_weight[i] = 0.0f;
      if (r.row[i] < 0) continue;  // dropped: it changed nothing
      const float* d = d_out + (i / static_cast<size_t>(r.top_k)) * h;
      const float* yr = y + static_cast<size_t>(r.row[i]) * h;
      float* dy = d_y + static_cast<size_t>(r.row[i]) * h;
      double dot = 0;
      for (int c = 0; c < h; ++c) {
        dot += double{d[c]} * yr[c];
        dy[c] = r.weight[i] * d[c];
      }
      d_weight[i] = static_cast<float>(dot);
    }
  }
  void permute_backward(const float* d_perm, const TokenRouting& r, int h, float* d_x) override {
    std::memset(d_x, 0, sizeof(float) * static_cast<size_t>(r.tokens) * h);
    for (size_t i = 0; i < r.expert.size(); ++i) {
      if (r.row[i] < 0) continue;
      float* d = d_x + (i / static_cast<size_t>(r.top_k)) * h;
      const float* src = d_perm + static_cast<size_t>(r.row[i]) * h;
      for (int c = 0; c < h; ++c) d[c] += src[c];
    }
  }
  void route_backward(const float* probs, const TokenRouting& r, const float* d_weight,
                      bool renormalize, float* d_logits) override {
    const int experts = r.experts, top_k = r.top_k;
    std::vector<double> dp(static_cast<size_t>(experts));
    for (int t = 0; t < r.tokens; ++t) {
      const float* p = probs + static_cast<size_t>(t) * experts;
      float* dl = d_logits + static_cast<size_t>(t) * experts;
      const int* ex = r.expert.data() + static_cast<size_t>(t) * top_k;
      const float* w = r.weight.data() + static_cast<size_t>(t) * top_k;
      const float* gw = d_weight + static_cast<size_t>(t) * top_k;
      std::fill(dp.begin(), dp.end(), 0.0);
      if (renormalize) {
        // w_j = p_j / kept: d p_j = (gw_j - sum_i gw_i w_i) / kept.
        double kept = 0, gsum = 0;
        for (int j = 0; j < top_k; ++j) {
          kept += p[ex[j]];
          gsum += double{gw[j]} * w[j];
        }
        for (int j = 0; j < top_k; ++j) dp[static_cast<size_t>(ex[j])] = (gw[j] - gsum) / kept;
      } else {
        for (int j = 0; j < top_k; ++j) dp[static_cast<size_t>(ex[j])] += gw[j];
      }
      double dot = 0;
      for (int e = 0; e < experts; ++e) dot += dp[static_cast<size_t>(e)] * p[e];
      for (int e = 0; e < experts; ++e)
        dl[e] = static_cast<float>(p[e] * (dp[static_cast<size_t>(e)] - dot));
    }
  }

  void row_max(const float* x, int rows, int cols, double* out) override {
    for (int t = 0; t < rows; ++t) {
      const float* l = x + static_cast<size_t>(t) * cols;
      out[t] = cols > 0 ? *std::max_element(l, l + cols) : -INFINITY;
    }
  }
  void softmax_sums(const float* logits, const int* labels, int rows, int cols, int label_offset,
                    const double* row_max, double* sum_target) override {
    for (int t = 0; t < rows; ++t) {
      const float* l = logits + static_cast<size_t>(t) * cols;
      double sum = 0;
      for (int j = 0; j < cols; ++j) sum += std::exp(double{l[j]} - row_max[t]);
      sum_target[2 * t] = sum;
      const int target = labels[t] - label_offset;
      sum_target[2 * t + 1] = target >= 0 && target < cols ? l[target] : 0.0;
    }
  }
  double softmax_cross_entropy_grad(float* logits, const int* labels, int rows, int cols,
                                    int label_offset, const double* row_max,
                                    const double* sum_target, float grad_scale) override {
    double loss = 0;
    for (int t = 0; t < rows; ++t) {
      float* l = logits + static_cast<size_t>(t) * cols;
      const double sum = sum_target[2 * t];
      loss += std::log(sum) + row_max[t] - sum_target[2 * t + 1];
      const int target = labels[t] - label_offset;
      for (int j = 0; j < cols; ++j)
        l[j] = static_cast<float>((std::exp(double{l[j]} - row_max[t]) / sum - (j == target)) *
                                  grad_scale);
    }
    return loss;
  }

 private:
  MemoryPools memory_;
};

}  // namespace

// Capacity (a position policy): each expert keeps its first `capacity` assignments in token
// order, a token's choices together (GShard instead serves every token's first choice before any
// second choice); the rest are dropped (row -1: they add nothing to the output).
void check_top_k(int top_k, int experts) {
  if (top_k < 1 || top_k > experts)
    throw std::invalid_argument("route: top_k " + std::to_string(top_k) + " of " +
                                std::to_string(experts) + " experts");
}

void finish_routing(TokenRouting& r, int capacity) {
  const int experts = r.experts;
  r.rows_per_expert.assign(static_cast<size_t>(experts), 0);
  r.dropped = 0;
  std::vector<char> kept(r.expert.size(), 1);
  for (size_t i = 0; i < r.expert.size(); ++i) {
    int& n = r.rows_per_expert[static_cast<size_t>(r.expert[i])];
    if (capacity > 0 && n >= capacity) {
      kept[i] = 0;
      ++r.dropped;
    } else {
      ++n;
    }
  }
  std::vector<int> next(static_cast<size_t>(experts), 0);
  for (int e = 1; e < experts; ++e)
    next[static_cast<size_t>(e)] =
        next[static_cast<size_t>(e - 1)] + r.rows_per_expert[static_cast<size_t>(e - 1)];
  r.row.assign(r.expert.size(), -1);
  r.source.assign(r.expert.size() - static_cast<size_t>(r.dropped), -1);
  for (size_t i = 0; i < r.expert.size(); ++i) {
    if (!kept[i]) continue;
    r.row[i] = next[static_cast<size_t>(r.expert[i])]++;
    r.source[static_cast<size_t>(r.row[i])] = static_cast<int>(i);
  }
}

std::unique_ptr<Device> cpu_device(TierCapacity capacity) {
  return std::make_unique<CpuDevice>(std::move(capacity));
}

}  // namespace switchyard
