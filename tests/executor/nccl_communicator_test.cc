// The NCCL backend on one GPU, in a world of one rank (a self_communicator bootstraps it, so no MPI
// is needed). With one rank every collective is an identity or a copy, so these tests check that
// values make the round trip through NCCL and through the host-buffer staging unchanged, in every
// placement (device, pageable host, pinned host, mixed, in place), and that the API's errors keep
// their contract. NCCL refuses two ranks on one GPU, so the multi-rank behaviour (reductions
// across ranks, point-to-point, timeouts when a member is missing) runs only on machines with a
// GPU per rank, under mpirun. Without a GPU every test skips.
#include "executor/cuda/nccl_communicator.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "executor/communicator.h"
#include "executor/cuda/device_info.h"

namespace switchyard {
namespace {

std::unique_ptr<Communicator> one_rank_world() {
  return nccl_world(*self_communicator("world"), 0, 30);
}

// A device array of T, freed on scope exit.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    if (cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  explicit DeviceArray(const std::vector<T>& values) : DeviceArray(values.size()) { set(values); }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  void set(const std::vector<T>& values) {
    ASSERT_EQ(values.size(), n_);
    ASSERT_EQ(cudaMemcpy(p_, values.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> values() const {
    std::vector<T> out(n_);
    EXPECT_EQ(cudaMemcpy(out.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

 private:
  size_t n_;
  T* p_ = nullptr;
};

// Pinned host memory (cudaMallocHost), which the backend stages like pageable memory.
template <class T>
class PinnedArray {
 public:
  explicit PinnedArray(size_t n) {
    if (cudaMallocHost(reinterpret_cast<void**>(&p_), n * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  ~PinnedArray() { cudaFreeHost(p_); }
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
};

std::vector<float> ramp(size_t n, float first) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = first + 0.5f * static_cast<float>(i);
  return v;
}

TEST(NcclCommunicator, WorldOfOneRank) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  EXPECT_EQ(world->rank(), 0);
  EXPECT_EQ(world->size(), 1);
  EXPECT_EQ(world->name(), "world");
  EXPECT_EQ(world->world_ranks(), std::vector<int>{0});
  EXPECT_EQ(world->timeout_s(), 30);
}

TEST(NcclCommunicator, AllReduceOnDeviceKeepsTheValues) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  const std::vector<float> want = ramp(1000, -3.25f);
  DeviceArray<float> d(want);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    world->all_reduce(d.get(), want.size(), DType::kFloat32, op);
    EXPECT_EQ(d.values(), want);
  }
  // A pointer inside an allocation, and a count of zero (nothing happens).
  world->all_reduce(d.get() + 7, 100, DType::kFloat32, ReduceOp::kSum);
  world->all_reduce(d.get(), 0, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(d.values(), want);
}

TEST(NcclCommunicator, AllReduceOnHostBuffersOfEveryType) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  std::vector<int64_t> counts = {3, -7, int64_t{1} << 40, 0};
  world->all_reduce(counts.data(), counts.size(), DType::kInt64, ReduceOp::kSum);
  EXPECT_EQ(counts, (std::vector<int64_t>{3, -7, int64_t{1} << 40, 0}));
  double loss = 2.718281828459045;
  world->all_reduce(&loss, 1, DType::kFloat64, ReduceOp::kSum);
  EXPECT_EQ(loss, 2.718281828459045);
  std::vector<int32_t> ints = {-1, 5, 1 << 30};
  world->all_reduce(ints.data(), ints.size(), DType::kInt32, ReduceOp::kMax);
  EXPECT_EQ(ints, (std::vector<int32_t>{-1, 5, 1 << 30}));
  std::vector<uint8_t> bytes = {0, 7, 255};
  world->all_reduce(bytes.data(), bytes.size(), DType::kByte, ReduceOp::kMin);
  EXPECT_EQ(bytes, (std::vector<uint8_t>{0, 7, 255}));
  std::vector<float> floats = ramp(33, 1.0f);
  world->all_reduce(floats.data(), floats.size(), DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(floats, ramp(33, 1.0f));
}

TEST(NcclCommunicator, PinnedAndLargeHostBuffersRoundTrip) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  PinnedArray<double> pinned(5);
  ASSERT_NE(pinned.get(), nullptr);
  for (int i = 0; i < 5; ++i) pinned.get()[i] = 0.1 * i - 1;
  world->all_reduce(pinned.get(), 5, DType::kFloat64, ReduceOp::kSum);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(pinned.get()[i], 0.1 * i - 1);
  // Larger than the first scratch (the scratch grows), then small again.
  std::vector<float> big = ramp(size_t{1} << 20, -100.0f);
  world->all_reduce(big.data(), big.size(), DType::kFloat32, ReduceOp::kMax);
  EXPECT_EQ(big, ramp(size_t{1} << 20, -100.0f));
  int64_t one = 41;
  world->all_reduce(&one, 1, DType::kInt64, ReduceOp::kSum);
  EXPECT_EQ(one, 41);
}

TEST(NcclCommunicator, AllGatherInPlaceAndOutOfPlace) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  const std::vector<float> want = ramp(64, 2.0f);
  // Device, out of place.
  DeviceArray<float> send(want), recv(64);
  world->all_gather(send.get(), recv.get(), 64, DType::kFloat32);
  EXPECT_EQ(recv.values(), want);
  // Device, in place (send is this rank's block of recv).
  DeviceArray<float> inplace(want);
  world->all_gather(inplace.get(), inplace.get(), 64, DType::kFloat32);
  EXPECT_EQ(inplace.values(), want);
  // Host, out of place and in place; mixed host send, device receive.
  std::vector<float> host_recv(64, 0.0f);
  world->all_gather(want.data(), host_recv.data(), 64, DType::kFloat32);
  EXPECT_EQ(host_recv, want);
  std::vector<float> host_inplace = want;
  world->all_gather(host_inplace.data(), host_inplace.data(), 64, DType::kFloat32);
  EXPECT_EQ(host_inplace, want);
  DeviceArray<float> mixed(64);
  world->all_gather(want.data(), mixed.get(), 64, DType::kFloat32);
  EXPECT_EQ(mixed.values(), want);
  // The world ranks as the runner gathers them: int32 on the host.
  int32_t me = 0, all = -1;
  world->all_gather(&me, &all, 1, DType::kInt32);
  EXPECT_EQ(all, 0);
  // A send block that overlaps recv without being this rank's block of it.
  EXPECT_THROW(world->all_gather(inplace.get() + 1, inplace.get(), 32, DType::kFloat32), CommError);
}

TEST(NcclCommunicator, ReduceScatterGivesTheOnlyBlock) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  const std::vector<float> want = ramp(128, -8.0f);
  DeviceArray<float> send(want), recv(128);
  world->reduce_scatter(send.get(), recv.get(), 128, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(recv.values(), want);
  std::vector<double> host_send = {1.5, -2.5, 1e300}, host_recv(3, 0.0);
  world->reduce_scatter(host_send.data(), host_recv.data(), 3, DType::kFloat64, ReduceOp::kMax);
  EXPECT_EQ(host_recv, host_send);
  // Device send, host receive.
  std::vector<float> mixed(128, 0.0f);
  world->reduce_scatter(send.get(), mixed.data(), 128, DType::kFloat32, ReduceOp::kMin);
  EXPECT_EQ(mixed, want);
}

TEST(NcclCommunicator, AllToAllvCopiesThisRanksBlock) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  const std::vector<float> want = ramp(5, 10.0f);
  DeviceArray<float> send(want), recv(5);
  world->all_to_allv(send.get(), {5}, recv.get(), {5}, DType::kFloat32);
  EXPECT_EQ(recv.values(), want);
  // Host metadata (the token counts the runner exchanges), and host to device.
  std::vector<int64_t> counts = {4, 0, 9}, got(3, -1);
  world->all_to_allv(counts.data(), {3}, got.data(), {3}, DType::kInt64);
  EXPECT_EQ(got, counts);
  DeviceArray<float> from_host(5);
  world->all_to_allv(want.data(), {5}, from_host.get(), {5}, DType::kFloat32);
  EXPECT_EQ(from_host.values(), want);
  // Counts of zero move nothing.
  world->all_to_allv(send.get(), {0}, recv.get(), {0}, DType::kFloat32);
  // Inconsistent counts are refused before anything is sent; the group stays usable.
  EXPECT_THROW(world->all_to_allv(send.get(), {5}, recv.get(), {4}, DType::kFloat32), CommError);
  EXPECT_THROW(world->all_to_allv(send.get(), {5, 0}, recv.get(), {5, 0}, DType::kFloat32),
               CommError);
  DeviceArray<float> again(5);
  world->all_to_allv(send.get(), {5}, again.get(), {5}, DType::kFloat32);
  EXPECT_EQ(again.values(), want);
}

TEST(NcclCommunicator, BroadcastFromTheOnlyRoot) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  const std::vector<float> want = ramp(17, 0.25f);
  DeviceArray<float> d(want);
  world->broadcast(d.get(), 17, DType::kFloat32, 0);
  EXPECT_EQ(d.values(), want);
  std::vector<int64_t> host = {11, -12};
  world->broadcast(host.data(), 2, DType::kInt64, 0);
  EXPECT_EQ(host, (std::vector<int64_t>{11, -12}));
  EXPECT_THROW(world->broadcast(d.get(), 17, DType::kFloat32, 1), CommError);
  world->barrier();
}

TEST(NcclCommunicator, AsyncOperationsCompleteOnWait) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  // Gradient buckets: several all-reduces in flight, then waited for.
  const std::vector<float> want = ramp(4096, -1.0f);
  DeviceArray<float> grads(want);
  std::vector<std::unique_ptr<PendingOp>> pending;
  for (size_t b = 0; b < 4096; b += 1024)
    pending.push_back(
        world->all_reduce_async(grads.get() + b, 1024, DType::kFloat32, ReduceOp::kSum));
  for (auto& op : pending) op->wait();
  for (auto& op : pending) EXPECT_TRUE(op->test());
  EXPECT_EQ(grads.values(), want);
  // test() until done, then wait() is immediate.
  auto op = world->all_reduce_async(grads.get(), 4096, DType::kFloat32, ReduceOp::kMax);
  while (!op->test()) {
  }
  op->wait();
  EXPECT_EQ(grads.values(), want);
  // all_to_allv_async on the device.
  DeviceArray<float> out(4096);
  auto a2a = world->all_to_allv_async(grads.get(), {4096}, out.get(), {4096}, DType::kFloat32);
  a2a->wait();
  EXPECT_TRUE(a2a->test());
  EXPECT_EQ(out.values(), want);
  // Results landing in host memory: complete when the call returns.
  std::vector<double> host = {0.5, 1.5};
  auto h = world->all_reduce_async(host.data(), 2, DType::kFloat64, ReduceOp::kSum);
  EXPECT_TRUE(h->test());
  h->wait();
  EXPECT_EQ(host, (std::vector<double>{0.5, 1.5}));
  // A pending operation may outlive its communicator.
  auto late = world->all_reduce_async(grads.get(), 4096, DType::kFloat32, ReduceOp::kMin);
  world.reset();
  late->wait();
  EXPECT_EQ(grads.values(), want);
}

TEST(NcclCommunicator, PointToPointErrorsNameTheGroup) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  DeviceArray<float> d(4);
  // Sending to oneself, to a rank outside the group, or with a tag outside [0, 32767].
  EXPECT_THROW(world->send(d.get(), 4, DType::kFloat32, 0, 0), CommError);
  EXPECT_THROW(world->recv(d.get(), 4, DType::kFloat32, 0, 0), CommError);
  EXPECT_THROW(world->send_async(d.get(), 4, DType::kFloat32, 0, 0), CommError);
  try {
    world->send(d.get(), 4, DType::kFloat32, 3, 1);
    ADD_FAILURE() << "send to rank 3 of a group of one did not throw";
  } catch (const CommError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("send to rank 3"), std::string::npos) << what;
    EXPECT_NE(what.find("\"world\""), std::string::npos) << what;
    EXPECT_NE(what.find("world ranks 0"), std::string::npos) << what;
  }
  EXPECT_THROW(world->recv(d.get(), 4, DType::kFloat32, -1, 1), CommError);
  EXPECT_THROW(world->send(d.get(), 4, DType::kFloat32, 0, 40000), CommError);
  // None of these touched NCCL: the group still works.
  const std::vector<float> want = {1, 2, 3, 4};
  d.set(want);
  world->all_reduce(d.get(), 4, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(d.values(), want);
}

TEST(NcclCommunicator, SplitMakesANamedGroup) {
  std::string reason;
  if (cuda_devices(&reason).empty()) GTEST_SKIP() << "no CUDA device: " << reason;
  auto world = one_rank_world();
  auto tp = world->split(0, 0, "tp");
  EXPECT_EQ(tp->name(), "tp");
  EXPECT_EQ(tp->rank(), 0);
  EXPECT_EQ(tp->size(), 1);
  EXPECT_EQ(tp->world_ranks(), std::vector<int>{0});
  EXPECT_EQ(tp->timeout_s(), 30);
  // The new group works, on device and host buffers, and splits again.
  const std::vector<float> want = ramp(300, 7.0f);
  DeviceArray<float> d(want);
  tp->all_reduce(d.get(), 300, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(d.values(), want);
  int64_t tokens = 12345;
  tp->all_reduce(&tokens, 1, DType::kInt64, ReduceOp::kSum);
  EXPECT_EQ(tokens, 12345);
  auto replicas = tp->split(3, 0, "replicas of expert 3");
  EXPECT_EQ(replicas->name(), "replicas of expert 3");
  EXPECT_EQ(replicas->world_ranks(), std::vector<int>{0});
  replicas->barrier();
  EXPECT_THROW(world->split(-1, 0, "nobody"), CommError);
  // The parent is unaffected by its children.
  world->all_reduce(d.get(), 300, DType::kFloat32, ReduceOp::kMax);
  EXPECT_EQ(d.values(), want);
  // Children may be destroyed before or after their parent.
  world.reset();
  tp->all_reduce(d.get(), 300, DType::kFloat32, ReduceOp::kMin);
  EXPECT_EQ(d.values(), want);
}

}  // namespace
}  // namespace switchyard
