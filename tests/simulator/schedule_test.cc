#include <gtest/gtest.h>

#include <set>

#include "core/step_program.h"

namespace switchyard {
namespace {

std::string text(const std::vector<ScheduleItem>& order) {
  std::string out;
  for (const auto& u : order) {
    if (!out.empty()) out += ' ';
    out += (u.backward ? 'B' : 'F') + std::to_string(u.micro_batch);
    if (u.chunk > 0) out += "c" + std::to_string(u.chunk);
  }
  return out;
}

TEST(Schedule, OneFOneBOrderByHand) {
  // Stage 0 of 4: three warm-up forwards, then one forward one backward, then the cool-down.
  EXPECT_EQ(text(schedule_order(Schedule::k1F1B, 4, 1, 8, 0)),
            "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7");
  // The last stage alternates from the start.
  EXPECT_EQ(text(schedule_order(Schedule::k1F1B, 4, 1, 4, 3)), "F0 B0 F1 B1 F2 B2 F3 B3");
  // Fewer micro-batches than stages: all forwards first.
  EXPECT_EQ(text(schedule_order(Schedule::k1F1B, 4, 1, 2, 0)), "F0 F1 B0 B1");
}

TEST(Schedule, GPipeRunsAllForwardsFirst) {
  EXPECT_EQ(text(schedule_order(Schedule::kGPipe, 4, 1, 3, 2)), "F0 F1 F2 B0 B1 B2");
}

// Megatron-LM's interleaved order for pp 2, vp 2, 4 micro-batches on stage 0: warm-up
// (pp - 1) * 2 + (vp - 1) * pp = 4 forward units, groups of pp micro-batches per chunk.
TEST(Schedule, InterleavedOrderByHand) {
  EXPECT_EQ(text(schedule_order(Schedule::kInterleaved1F1B, 2, 2, 4, 0)),
            "F0 F1 F0c1 F1c1 F2 B0c1 F3 B1c1 F2c1 B0 F3c1 B1 B2c1 B3c1 B2 B3");
}

TEST(Schedule, EveryUnitOnceAndBackwardAfterForward) {
  for (Schedule s : {Schedule::kGPipe, Schedule::k1F1B, Schedule::kInterleaved1F1B})
    for (int pp : {1, 2, 4})
      for (int m : {4, 8, 12}) {
        const int vp = s == Schedule::kInterleaved1F1B ? 3 : 1;
        if (s == Schedule::kInterleaved1F1B && m % pp != 0) continue;
        for (int stage = 0; stage < pp; ++stage) {
          const auto order = schedule_order(s, pp, vp, m, stage);
          ASSERT_EQ(order.size(), static_cast<size_t>(2 * m * vp));
          std::set<std::tuple<int, int, bool>> seen;
          for (const auto& u : order) {
            EXPECT_TRUE(seen.insert({u.micro_batch, u.chunk, u.backward}).second);
            if (u.backward) {
              EXPECT_TRUE(seen.count({u.micro_batch, u.chunk, false})) << text(order);
            }
          }
        }
      }
}

}  // namespace
}  // namespace switchyard
