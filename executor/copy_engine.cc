#include "executor/copy_engine.h"

#include <stdexcept>
#include <string>

namespace switchyard {

CopyEngine::CopyEngine(Device& device) : device_(device), thread_([this] { loop(); }) {}

CopyEngine::~CopyEngine() {
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  work_.notify_one();
  thread_.join();
}

CopyEngine::Ticket CopyEngine::submit(void* dst, const void* src, size_t bytes, const char* label) {
  return submit_after({nullptr, 0}, dst, src, bytes, label);
}

CopyEngine::Ticket CopyEngine::submit_after(After after, void* dst, const void* src, size_t bytes,
                                            const char* label) {
  if (after.engine == this)
    throw std::logic_error("CopyEngine::submit_after: a copy after its own engine's");
  Ticket t;
  {
    std::lock_guard<std::mutex> lock(m_);
    t = next_++;
    queue_.push_back({label, t, dst, src, bytes, {}, after});
  }
  work_.notify_one();
  return t;
}

CopyEngine::Ticket CopyEngine::submit(std::function<void()> transfer, size_t bytes,
                                      const char* label) {
  Ticket t;
  {
    std::lock_guard<std::mutex> lock(m_);
    t = next_++;
    queue_.push_back({label, t, nullptr, nullptr, bytes, std::move(transfer), {nullptr, 0}});
  }
  work_.notify_one();
  return t;
}

double CopyEngine::wait(Ticket t) {
  std::unique_lock<std::mutex> lock(m_);
  if (t >= next_)
    throw std::logic_error("CopyEngine::wait: ticket " + std::to_string(t) +
                           " was never submitted");
  if (finished_ >= t) {
    if (error_) std::rethrow_exception(error_);
    return 0;
  }
  const auto start = Clock::now();
  done_.wait(lock, [&] { return finished_ >= t; });
  if (error_) std::rethrow_exception(error_);
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void CopyEngine::drain() {
  Ticket last;
  {
    std::lock_guard<std::mutex> lock(m_);
    last = next_ - 1;
  }
  if (last > 0) wait(last);
}

std::vector<CopyEngine::Span> CopyEngine::take_spans() {
  std::lock_guard<std::mutex> lock(m_);
  std::vector<Span> out;
  out.swap(spans_);
  return out;
}

void CopyEngine::loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(m_);
      work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      job = queue_.front();
      queue_.pop_front();
    }
    std::exception_ptr error;
    if (job.after.engine) {
      try {
        job.after.engine->wait(job.after.ticket);  // a failed read fails the copy that needs it
      } catch (...) {
        error = std::current_exception();
      }
    }
    const auto start = Clock::now();
    if (!error) {
      try {
        if (job.transfer)
          job.transfer();
        else
          device_.copy(job.dst, job.src, job.bytes);
      } catch (...) {
        error = std::current_exception();
      }
    }
    const auto end = Clock::now();
    {
      std::lock_guard<std::mutex> lock(m_);
      spans_.push_back({job.label, job.ticket, job.bytes, start, end});
      finished_ = job.ticket;
      if (error && !error_) error_ = error;
    }
    done_.notify_all();
  }
}

}  // namespace switchyard
