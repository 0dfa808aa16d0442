// The copy engine: copies run in submission order on its thread, wait() returns once a copy is
// done (and only then its bytes are there), the destructor finishes what was queued, and a ticket
// never submitted is a programming error, not a hang.
#include "executor/copy_engine.h"

#include <gtest/gtest.h>

#include <numeric>
#include <stdexcept>
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

}  // namespace
}  // namespace switchyard
