#include "executor/timed.h"

#include <chrono>

namespace switchyard {

namespace {
thread_local OpTimes* program_sink = nullptr;
}  // namespace

const char* op_phase_name(OpPhase p) {
  switch (p) {
    case OpPhase::kForward:
      return "forward";
    case OpPhase::kBackward:
      return "backward";
    case OpPhase::kStep:
      return "step";
  }
  return "forward";
}

ProgramOpSink::ProgramOpSink(OpTimes& times) : prev_(program_sink) { program_sink = &times; }
ProgramOpSink::~ProgramOpSink() { program_sink = prev_; }

ProgramOp::ProgramOp(const char* name, OpPhase phase)
    : sink_(program_sink), name_(name), phase_(phase) {
  if (sink_) start_ = std::chrono::steady_clock::now();
}

ProgramOp::~ProgramOp() {
  if (!sink_) return;
  const auto end = std::chrono::steady_clock::now();
  sink_->program_seconds[std::string(op_phase_name(phase_)) + " " + name_] +=
      std::chrono::duration<double>(end - start_).count();
  if (sink_->record)
    sink_->events.push_back(
        {name_, false, std::chrono::duration<double>(start_ - sink_->epoch).count(),
         std::chrono::duration<double>(end - sink_->epoch).count(), true, phase_});
}

namespace {

void record_off_thread_op(const char* name, OpPhase phase,
                          std::chrono::steady_clock::time_point start,
                          std::chrono::steady_clock::time_point end, bool copy) {
  OpTimes* sink = program_sink;
  if (!sink) return;
  sink->program_seconds[std::string(op_phase_name(phase)) + " " + name] +=
      std::chrono::duration<double>(end - start).count();
  if (sink->record)
    sink->events.push_back({name, false, std::chrono::duration<double>(start - sink->epoch).count(),
                            std::chrono::duration<double>(end - sink->epoch).count(), true, phase,
                            copy, !copy});
}

}  // namespace

void record_copy_op(const char* name, OpPhase phase, std::chrono::steady_clock::time_point start,
                    std::chrono::steady_clock::time_point end) {
  record_off_thread_op(name, phase, start, end, true);
}

void record_host_op(const char* name, OpPhase phase, std::chrono::steady_clock::time_point start,
                    std::chrono::steady_clock::time_point end) {
  record_off_thread_op(name, phase, start, end, false);
}

void record_stall(double seconds) {
  OpTimes* sink = program_sink;
  if (!sink || !sink->record || seconds <= 0) return;
  const double end =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sink->epoch).count();
  sink->events.push_back({"stall", false, end - seconds, end});
}

namespace {

class Timer {
 public:
  // `device`: also its own time of the call on the device, where it measures one.
  Timer(OpTimes& t, const char* name, bool comm = false, Device* device = nullptr)
      : t_(t), name_(name), comm_(comm), device_(device) {
    if (device_) device_->take_call_device_seconds();  // what ran before is no part of this call
    start_ = Clock::now();
  }
  ~Timer() {
    const auto end = Clock::now();
    t_.seconds[name_] += std::chrono::duration<double>(end - start_).count();
    if (device_) {
      const double d = device_->take_call_device_seconds();
      if (d >= 0) t_.device_seconds[name_] += d;
    }
    ++t_.calls[name_];
    if (t_.record)
      t_.events.push_back({name_, comm_, std::chrono::duration<double>(start_ - t_.epoch).count(),
                           std::chrono::duration<double>(end - t_.epoch).count()});
  }

 private:
  using Clock = std::chrono::steady_clock;
  OpTimes& t_;
  const char* name_;
  bool comm_;
  Device* device_;
  Clock::time_point start_;
};

class TimedDevice : public Device {
 public:
  TimedDevice(Device& d, OpTimes& t) : d_(d), t_(t) {}
  std::string name() const override { return d_.name(); }
  MemoryPools& memory() override { return d_.memory(); }
  double take_call_device_seconds() override { return d_.take_call_device_seconds(); }
  void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
            const float* b, int ldb, float beta, float* c, int ldc) override {
    Timer x(t_, "gemm", false, &d_);
    d_.gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  void grouped_gemm(const float* a, int k, const std::vector<int>& rows,
                    const std::vector<const float*>& w, bool trans_w, int n, float* c) override {
    Timer x(t_, "expert_gemm", false, &d_);
    d_.grouped_gemm(a, k, rows, w, trans_w, n, c);
  }
  TokenRouting route(const float* logits, int tokens, int experts, int top_k, bool renormalize,
                     float* probs, int capacity) override {
    Timer x(t_, "router", false, &d_);
    return d_.route(logits, tokens, experts, top_k, renormalize, probs, capacity);
  }
  void permute(const float* x, const TokenRouting& r, int h, float* out) override {
    Timer t(t_, "permute", false, &d_);
    d_.permute(x, r, h, out);
  }
  void unpermute_combine(const float* y, const TokenRouting& r, int h, float* out) override {
    Timer t(t_, "permute", false, &d_);
    d_.unpermute_combine(y, r, h, out);
  }
  void swiglu(const float* gu, int rows, int f, float* out) override {
    Timer t(t_, "elementwise", false, &d_);
    d_.swiglu(gu, rows, f, out);
  }
  void swiglu_backward(const float* gu, const float* d, int rows, int f, float* dgu) override {
    Timer t(t_, "elementwise", false, &d_);
    d_.swiglu_backward(gu, d, rows, f, dgu);
  }
  void rmsnorm(const float* x, const float* g, int rows, int h, float eps, float* y) override {
    Timer t(t_, "elementwise", false, &d_);
    d_.rmsnorm(x, g, rows, h, eps, y);
  }
  void rmsnorm_backward(const float* x, const float* g, const float* dy, int rows, int h, float eps,
                        float* dx, float* dg) override {
    Timer t(t_, "elementwise", false, &d_);
    d_.rmsnorm_backward(x, g, dy, rows, h, eps, dx, dg);
  }
  void attention(const float* qkv, int b, int s, int heads, int hd, float* out,
                 float* lse) override {
    Timer t(t_, "attention", false, &d_);
    d_.attention(qkv, b, s, heads, hd, out, lse);
  }
  void attention_backward(const float* qkv, const float* out, const float* lse, const float* d,
                          int b, int s, int heads, int hd, float* dqkv) override {
    Timer t(t_, "attention", false, &d_);
    d_.attention_backward(qkv, out, lse, d, b, s, heads, hd, dqkv);
  }
  void attention_cached(const float* q, int ldq, const float* k, const float* v, int b, int q_len,
                        int ctx, int cache_len, int heads, int hd, float* out) override {
    Timer t(t_, "attention", false, &d_);
    d_.attention_cached(q, ldq, k, v, b, q_len, ctx, cache_len, heads, hd, out);
  }
  double cross_entropy(float* logits, const int* labels, int rows, int vocab,
                       float grad_scale) override {
    Timer t(t_, "loss", false, &d_);
    return d_.cross_entropy(logits, labels, rows, vocab, grad_scale);
  }
  void adam(float* param, const float* grad, float* m, float* v, size_t n, float lr, float b1,
            float b2, float eps, float c1, float c2) override {
    Timer t(t_, "optimizer", false, &d_);
    d_.adam(param, grad, m, v, n, lr, b1, b2, eps, c1, c2);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    Timer t(t_, "copy");
    d_.copy(dst, src, bytes);
  }
  void copy_2d(void* dst, size_t dp, const void* src, size_t sp, size_t row_bytes,
               size_t rows) override {
    Timer t(t_, "copy");
    d_.copy_2d(dst, dp, src, sp, row_bytes, rows);
  }
  void zero(void* dst, size_t bytes) override {
    Timer t(t_, "elementwise", false, &d_);
    d_.zero(dst, bytes);
  }
  void add(const float* a, const float* b, size_t n, float* out) override {
    Timer t(t_, "elementwise", false, &d_);
    d_.add(a, b, n, out);
  }
  void gather_rows(const float* src, const int* index, int n, int width, float* dst) override {
    Timer t(t_, "permute", false, &d_);
    d_.gather_rows(src, index, n, width, dst);
  }
  void scatter_rows(const float* src, const int* index, int n, int width, float* dst,
                    bool accumulate) override {
    Timer t(t_, "permute", false, &d_);
    d_.scatter_rows(src, index, n, width, dst, accumulate);
  }
  void unpermute_combine_backward(const float* y, const float* d_out, const TokenRouting& r, int h,
                                  float* d_y, float* d_weight) override {
    Timer t(t_, "permute", false, &d_);
    d_.unpermute_combine_backward(y, d_out, r, h, d_y, d_weight);
  }
  void permute_backward(const float* d_perm, const TokenRouting& r, int h, float* d_x) override {
    Timer t(t_, "permute", false, &d_);
    d_.permute_backward(d_perm, r, h, d_x);
  }
  void route_backward(const float* probs, const TokenRouting& r, const float* d_weight,
                      bool renormalize, float* d_logits) override {
    Timer t(t_, "router", false, &d_);
    d_.route_backward(probs, r, d_weight, renormalize, d_logits);
  }
  void row_max(const float* x, int rows, int cols, double* out) override {
    Timer t(t_, "loss", false, &d_);
    d_.row_max(x, rows, cols, out);
  }
  void softmax_sums(const float* logits, const int* labels, int rows, int cols, int label_offset,
                    const double* row_max, double* sum_target) override {
    Timer t(t_, "loss", false, &d_);
    d_.softmax_sums(logits, labels, rows, cols, label_offset, row_max, sum_target);
  }
  double softmax_cross_entropy_grad(float* logits, const int* labels, int rows, int cols,
                                    int label_offset, const double* row_max,
                                    const double* sum_target, float grad_scale) override {
    Timer t(t_, "loss", false, &d_);
    return d_.softmax_cross_entropy_grad(logits, labels, rows, cols, label_offset, row_max,
                                         sum_target, grad_scale);
  }

 private:
  Device& d_;
  OpTimes& t_;
};

class TimedPending : public PendingOp {
 public:
  TimedPending(std::unique_ptr<PendingOp> p, OpTimes& t, const char* name)
      : p_(std::move(p)), t_(t), name_(name) {}
  void wait() override {
    Timer x(t_, name_, true);  // the exposed part: the time spent waiting
    p_->wait();
  }
  bool test() override { return p_->test(); }

 private:
  std::unique_ptr<PendingOp> p_;
  OpTimes& t_;
  const char* name_;
};

class TimedCommunicator : public Communicator {
 public:
  TimedCommunicator(std::unique_ptr<Communicator> c, OpTimes& t) : c_(std::move(c)), t_(t) {}
  int rank() const override { return c_->rank(); }
  int size() const override { return c_->size(); }
  const std::string& name() const override { return c_->name(); }
  const std::vector<int>& world_ranks() const override { return c_->world_ranks(); }
  double timeout_s() const override { return c_->timeout_s(); }
  void all_reduce(void* d, size_t n, DType t, ReduceOp op) override {
    Timer x(t_, "all_reduce", true);
    c_->all_reduce(d, n, t, op);
  }
  void all_gather(const void* s, void* r, size_t n, DType t) override {
    Timer x(t_, "all_gather", true);
    c_->all_gather(s, r, n, t);
  }
  void reduce_scatter(const void* s, void* r, size_t n, DType t, ReduceOp op) override {
    Timer x(t_, "reduce_scatter", true);
    c_->reduce_scatter(s, r, n, t, op);
  }
  void all_to_allv(const void* s, const std::vector<size_t>& sc, void* r,
                   const std::vector<size_t>& rc, DType t) override {
    Timer x(t_, "all_to_allv", true);
    c_->all_to_allv(s, sc, r, rc, t);
  }
  void broadcast(void* d, size_t n, DType t, int root) override {
    Timer x(t_, "broadcast", true);
    c_->broadcast(d, n, t, root);
  }
  void send(const void* d, size_t n, DType t, int peer, int tag) override {
    Timer x(t_, "send_recv", true);
    c_->send(d, n, t, peer, tag);
  }
  void recv(void* d, size_t n, DType t, int peer, int tag) override {
    Timer x(t_, "send_recv", true);
    c_->recv(d, n, t, peer, tag);
  }
  void barrier() override { c_->barrier(); }
  std::unique_ptr<PendingOp> send_async(const void* d, size_t n, DType t, int peer,
                                        int tag) override {
    return std::make_unique<TimedPending>(c_->send_async(d, n, t, peer, tag), t_, "send_recv");
  }
  std::unique_ptr<PendingOp> all_reduce_async(void* d, size_t n, DType t, ReduceOp op) override {
    return std::make_unique<TimedPending>(c_->all_reduce_async(d, n, t, op), t_, "all_reduce");
  }
  std::unique_ptr<PendingOp> all_to_allv_async(const void* s, const std::vector<size_t>& sc,
                                               void* r, const std::vector<size_t>& rc,
                                               DType t) override {
    return std::make_unique<TimedPending>(c_->all_to_allv_async(s, sc, r, rc, t), t_,
                                          "all_to_allv");
  }
  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    return std::make_unique<TimedCommunicator>(c_->split(color, key, name), t_);
  }

 private:
  std::unique_ptr<Communicator> c_;
  OpTimes& t_;
};

}  // namespace

std::unique_ptr<Device> timed_device(Device& inner, OpTimes& times) {
  return std::make_unique<TimedDevice>(inner, times);
}

std::unique_ptr<Communicator> timed_communicator(std::unique_ptr<Communicator> inner,
                                                 OpTimes& times) {
  return std::make_unique<TimedCommunicator>(std::move(inner), times);
}

}  // namespace switchyard
