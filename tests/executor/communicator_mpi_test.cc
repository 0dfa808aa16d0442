// The Communicator contract, under mpiexec (2 and 4 ranks): every collective and point-to-point
// transfer gives the values the contract says, on the world group and on split groups, for the MPI
// backend and (where it applies) the one-rank backend; a peer that does not join turns into
// CommTimeout naming the operation and the group, not a hang.
#include <gtest/gtest.h>

#include <chrono>
#include <numeric>
#include <thread>

#include "executor/communicator.h"
#include "executor/cpu/mpi_communicator.h"
#include "tests/executor/mpi_test_main.h"

namespace switchyard {
namespace {

MpiRuntime* g_mpi = nullptr;

std::unique_ptr<Communicator> world(double timeout_s = 60) { return g_mpi->world(timeout_s); }

TEST(Communicator, AllReduceSumsAndTakesTheMaximum) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  std::vector<float> v(1000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(r * 1000 + i);
  c->all_reduce(v.data(), v.size(), DType::kFloat32, ReduceOp::kSum);
  for (size_t i = 0; i < v.size(); ++i)
    ASSERT_EQ(v[i], static_cast<float>(1000 * n * (n - 1) / 2 + n * static_cast<int>(i)));
  int64_t m = r * 7;
  c->all_reduce(&m, 1, DType::kInt64, ReduceOp::kMax);
  EXPECT_EQ(m, (n - 1) * 7);
}

TEST(Communicator, AllGatherAndReduceScatterAreRankOrdered) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  std::vector<double> mine = {r + 0.5, r + 0.25}, all(2 * static_cast<size_t>(n));
  c->all_gather(mine.data(), all.data(), 2, DType::kFloat64);
  for (int k = 0; k < n; ++k) {
    EXPECT_EQ(all[2 * k], k + 0.5);
    EXPECT_EQ(all[2 * k + 1], k + 0.25);
  }
  // In place: this rank's block already at its offset (ZeRO-1's parameter gather).
  std::vector<double> inplace(2 * static_cast<size_t>(n), -1.0);
  inplace[2 * r] = r + 0.5;
  inplace[2 * r + 1] = r + 0.25;
  c->all_gather(inplace.data() + 2 * r, inplace.data(), 2, DType::kFloat64);
  EXPECT_EQ(inplace, all);
  // Block k of rank r holds r + k; rank k receives the sum over r.
  std::vector<float> blocks(3 * static_cast<size_t>(n));
  for (int k = 0; k < n; ++k)
    for (int i = 0; i < 3; ++i) blocks[3 * k + i] = static_cast<float>(r + k + i);
  std::vector<float> out(3);
  c->reduce_scatter(blocks.data(), out.data(), 3, DType::kFloat32, ReduceOp::kSum);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], static_cast<float>(n * (n - 1) / 2 + n * (r + i)));
}

TEST(Communicator, AllToAllvMovesVariableBlocks) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  // Rank s sends (s + d + 1) values to rank d, each encoding (s, d, i).
  std::vector<size_t> send_counts(n), recv_counts(n);
  std::vector<float> send;
  for (int d = 0; d < n; ++d) {
    send_counts[d] = static_cast<size_t>(r + d + 1);
    for (int i = 0; i < r + d + 1; ++i) send.push_back(static_cast<float>(r * 10000 + d * 100 + i));
  }
  for (int s = 0; s < n; ++s) recv_counts[s] = static_cast<size_t>(s + r + 1);
  std::vector<float> recv(std::accumulate(recv_counts.begin(), recv_counts.end(), size_t{0}));
  c->all_to_allv(send.data(), send_counts, recv.data(), recv_counts, DType::kFloat32);
  size_t at = 0;
  for (int s = 0; s < n; ++s)
    for (int i = 0; i < s + r + 1; ++i)
      ASSERT_EQ(recv[at++], static_cast<float>(s * 10000 + r * 100 + i));
}

TEST(Communicator, AllToAllvWithCountsThePeersDisagreeOnIsAnError) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  // Rank 1 sends rank 0 one element, rank 0 expects two; everything else agrees.
  std::vector<size_t> send_counts(n, 1), recv_counts(n, 1);
  if (r == 0) recv_counts[1] = 2;
  std::vector<float> send(n, 1.0f), recv(n + 1, 0.0f);
  if (r == 0) {
    EXPECT_THROW(
        c->all_to_allv(send.data(), send_counts, recv.data(), recv_counts, DType::kFloat32),
        CommError);
  } else {
    c->all_to_allv(send.data(), send_counts, recv.data(), recv_counts, DType::kFloat32);
  }
  c->barrier();
}

TEST(Communicator, BroadcastAndARingOfSends) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  int64_t v = r == n - 1 ? 42 : -1;
  c->broadcast(&v, 1, DType::kInt64, n - 1);
  EXPECT_EQ(v, 42);
  // Even ranks send first, odd ranks receive first: no deadlock with blocking calls.
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  int32_t out = r * 3, in = -1;
  if (r % 2 == 0) {
    c->send(&out, 1, DType::kInt32, next, 7);
    c->recv(&in, 1, DType::kInt32, prev, 7);
  } else {
    c->recv(&in, 1, DType::kInt32, prev, 7);
    c->send(&out, 1, DType::kInt32, next, 7);
  }
  EXPECT_EQ(in, prev * 3);
}

TEST(Communicator, SplitGroupsKnowTheirMembersAndReduceAlone) {
  auto c = world();
  const int r = c->rank();
  auto g = c->split(r % 2, r, r % 2 ? "odd" : "even");
  EXPECT_EQ(g->name(), r % 2 ? "odd" : "even");
  for (size_t i = 0; i < g->world_ranks().size(); ++i) EXPECT_EQ(g->world_ranks()[i] % 2, r % 2);
  EXPECT_EQ(g->world_ranks()[static_cast<size_t>(g->rank())], r);
  int64_t v = r;
  g->all_reduce(&v, 1, DType::kInt64, ReduceOp::kSum);
  int64_t want = 0;
  for (int k = r % 2; k < c->size(); k += 2) want += k;
  EXPECT_EQ(v, want);
}

TEST(Communicator, AsyncAllReduceCompletesWhileTheCallerWorks) {
  auto c = world();
  std::vector<float> v(1 << 16, 1.0f);
  auto pending = c->all_reduce_async(v.data(), v.size(), DType::kFloat32, ReduceOp::kSum);
  double work = 0;
  for (int i = 0; i < 100000; ++i) work += i * 1e-9;
  pending->wait();
  EXPECT_TRUE(pending->test());
  EXPECT_EQ(v.front(), static_cast<float>(c->size()));
  EXPECT_GT(work, 0);
}

TEST(Communicator, OneRankGroupMatchesTheContract) {
  auto s = self_communicator("solo", 3);
  EXPECT_EQ(s->size(), 1);
  EXPECT_EQ(s->world_ranks(), std::vector<int>{3});
  std::vector<float> a = {1, 2, 3}, b(3);
  s->all_reduce(a.data(), 3, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3}));
  s->all_gather(a.data(), b.data(), 3, DType::kFloat32);
  EXPECT_EQ(b, a);
  s->all_to_allv(a.data(), {3}, b.data(), {3}, DType::kFloat32);
  EXPECT_EQ(b, a);
  EXPECT_THROW(s->send(a.data(), 1, DType::kFloat32, 1, 0), CommError);
}

TEST(Communicator, APeerThatDoesNotJoinIsATimeoutNotAHang) {
  auto c = world(/*timeout_s=*/0.3);
  float v = 1;
  if (c->rank() == 0) {
    auto pending = c->all_reduce_async(&v, 1, DType::kFloat32, ReduceOp::kSum);
    try {
      pending->wait();
      FAIL() << "completed although the other ranks were late";
    } catch (const CommTimeout& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("all_reduce"), std::string::npos) << what;
      EXPECT_NE(what.find("\"world\""), std::string::npos) << what;
      EXPECT_NE(what.find("world rank 0"), std::string::npos) << what;
    }
    // The late ranks join eventually; the operation then completes.
    for (int tries = 0; tries < 100; ++tries) {
      try {
        pending->wait();
        break;
      } catch (const CommTimeout&) {
      }
    }
    EXPECT_TRUE(pending->test());
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(1200));
    c->all_reduce(&v, 1, DType::kFloat32, ReduceOp::kSum);
  }
  EXPECT_EQ(v, static_cast<float>(c->size()));
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  return switchyard::testing::run_mpi_tests(
      argc, argv, [](switchyard::MpiRuntime* mpi) { switchyard::g_mpi = mpi; });
}
