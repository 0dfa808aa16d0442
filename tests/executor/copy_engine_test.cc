// The copy engine: copies run in submission order on its thread, wait() returns once a copy is
// done (and only then its bytes are there), the destructor finishes what was queued, and a ticket
// never submitted is a programming error, not a hang.
#include "executor/copy_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

namespace switchyard {
namespace {

TEST(CopyEngine, CopiesFinishInOrderAndWaitSeesTheirBytes) {
  auto dev = cpu_device({});
  const size_t n = 1 << 18;  // 1 MiB of floats per copy
  std::vector<float> src(n);
  std::iota(src.begin(), src.end(), 0.0f);
  std::vector<std::vector<float>> dst(8, std::vector<float>(n, -1.0f));
  CopyEngine engine(*dev);
  std::vector<CopyEngine::Ticket> t;
  for (auto& d : dst) t.push_back(engine.submit(d.data(), src.data(), n * sizeof(float), "fetch"));
  EXPECT_GE(engine.wait(t.back()), 0.0);
  // Waiting for the last means every earlier one finished too.
  for (const auto& d : dst) EXPECT_EQ(d, src);
  const auto spans = engine.take_spans();
  ASSERT_EQ(spans.size(), dst.size());
  for (size_t i = 0; i < spans.size(); ++i) {
    EXPECT_EQ(spans[i].ticket, t[i]);
    EXPECT_EQ(spans[i].bytes, n * sizeof(float));
    EXPECT_STREQ(spans[i].label, "fetch");
    if (i > 0) {
      EXPECT_LE(spans[i - 1].end, spans[i].start);  // one at a time, in order
    }
  }
  EXPECT_TRUE(engine.take_spans().empty());
  EXPECT_EQ(engine.wait(t.front()), 0.0);  // long done: no wait
  EXPECT_THROW(engine.wait(t.back() + 1), std::logic_error);
}

TEST(CopyEngine, TheDestructorFinishesQueuedCopies) {
  auto dev = cpu_device({});
  const size_t n = 1 << 16;
  std::vector<float> src(n, 3.0f);
  std::vector<std::vector<float>> dst(16, std::vector<float>(n, 0.0f));
  {
    CopyEngine engine(*dev);
    for (auto& d : dst) engine.submit(d.data(), src.data(), n * sizeof(float));
  }
  for (const auto& d : dst) EXPECT_EQ(d, src);
}

// Two engines as two levels (SSD reads, then copies to the device): a copy submitted after the
// other engine's copy starts only once that one has finished, its span excluding the wait, and a
// failed first level fails the copy that needed it.
TEST(CopyEngine, ACopyAfterAnotherEnginesWaitsForItOutsideItsSpan) {
  auto dev = cpu_device({});
  const size_t n = 1 << 18;
  std::vector<float> src(n, 7.0f), staging(n, 0.0f), dst(n, 0.0f);
  CopyEngine reads(*dev);
  CopyEngine copies(*dev);  // after `reads`: destroyed first
  std::mutex gate;
  gate.lock();  // holds the read until the copy is queued behind it
  const CopyEngine::Ticket r = reads.submit(
      [&] {
        std::lock_guard<std::mutex> hold(gate);
        std::copy(src.begin(), src.end(), staging.begin());
      },
      n * sizeof(float), "read");
  const CopyEngine::Ticket c =
      copies.submit_after({&reads, r}, dst.data(), staging.data(), n * sizeof(float), "copy");
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  gate.unlock();
  copies.wait(c);
  EXPECT_EQ(dst, src);  // it copied what the read brought, not the zeros before it
  const auto read_span = reads.take_spans().at(0);
  const auto copy_span = copies.take_spans().at(0);
  EXPECT_LE(read_span.end, copy_span.start);
  EXPECT_THROW(copies.submit_after({&copies, c}, dst.data(), src.data(), 4, "self"),
               std::logic_error);
  // A failed read: the copy after it rethrows its error.
  const CopyEngine::Ticket bad =
      reads.submit([] { throw std::runtime_error("disk gone"); }, 4, "read");
  const CopyEngine::Ticket after =
      copies.submit_after({&reads, bad}, dst.data(), src.data(), 4, "copy");
  EXPECT_THROW(copies.wait(after), std::runtime_error);
}

}  // namespace
}  // namespace switchyard
