#include "executor/communicator.h"

#include <cstring>

namespace switchyard {

size_t dtype_bytes(DType t) {
  switch (t) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
    case DType::kByte:
      return 1;
  }
  return 1;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kByte:
      return "byte";
  }
  return "?";
}

namespace {

class Done : public PendingOp {
 public:
  void wait() override {}
  bool test() override { return true; }
};

class SelfCommunicator : public Communicator {
 public:
  SelfCommunicator(std::string name, int world_rank)
      : name_(std::move(name)), world_ranks_{world_rank} {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return world_ranks_; }
  double timeout_s() const override { return 0; }

  void all_reduce(void*, size_t, DType, ReduceOp) override {}
  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    copy(send, recv, count, dtype);
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp) override {
    copy(send, recv, count, dtype);
  }
  void all_to_allv(const void* send, const std::vector<size_t>& send_counts, void* recv,
                   const std::vector<size_t>& recv_counts, DType dtype) override {
    if (send_counts.size() != 1 || recv_counts.size() != 1 || send_counts[0] != recv_counts[0])
      throw CommError("all_to_allv on group \"" + name_ + "\" of one rank: counts do not match");
    copy(send, recv, send_counts[0], dtype);
  }
  void broadcast(void*, size_t, DType, int root) override {
    if (root != 0)
      throw CommError("broadcast from rank " + std::to_string(root) + " in a group of one");
  }
  void send(const void*, size_t, DType, int peer, int) override {
    throw CommError("send to rank " + std::to_string(peer) + " in group \"" + name_ +
                    "\" of one rank");
  }
  void recv(void*, size_t, DType, int peer, int) override {
    throw CommError("recv from rank " + std::to_string(peer) + " in group \"" + name_ +
                    "\" of one rank");
  }
  void barrier() override {}
  std::unique_ptr<PendingOp> all_reduce_async(void*, size_t, DType, ReduceOp) override {
    return std::make_unique<Done>();
  }
  std::unique_ptr<PendingOp> send_async(const void*, size_t, DType, int peer, int) override {
    throw CommError("send to rank " + std::to_string(peer) + " in group \"" + name_ +
                    "\" of one rank");
  }
  std::unique_ptr<PendingOp> all_to_allv_async(const void* send,
                                               const std::vector<size_t>& send_counts, void* recv,
                                               const std::vector<size_t>& recv_counts,
                                               DType dtype) override {
    all_to_allv(send, send_counts, recv, recv_counts, dtype);
    return std::make_unique<Done>();
  }
  std::unique_ptr<Communicator> split(int, int, const std::string& name) override {
    return std::make_unique<SelfCommunicator>(name, world_ranks_[0]);
  }

 private:
  static void copy(const void* from, void* to, size_t count, DType dtype) {
    if (from != to && count > 0) std::memmove(to, from, count * dtype_bytes(dtype));
  }
  std::string name_;
  std::vector<int> world_ranks_;
};

}  // namespace

std::unique_ptr<Communicator> self_communicator(const std::string& name, int world_rank) {
  return std::make_unique<SelfCommunicator>(name, world_rank);
}

}  // namespace switchyard
