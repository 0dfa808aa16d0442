// Communicator: the collectives and point-to-point transfers the executor's runner needs, over one
// group of ranks. Backends: MPI (executor/cpu/mpi_communicator.h) and NCCL (executor/cuda, later);
// a one-rank group needs neither (self_communicator()).
//
// Contract (one contract test runs it against every backend):
//  - Every member calls the same collectives in the same order with matching counts.
//  - Counts are in elements of `dtype`; buffers are host memory for the MPI backend.
//  - Nothing waits forever: every operation completes within the communicator's timeout or throws
//    CommTimeout naming the operation, the group, its members and the calling rank. After a
//    timeout the communicator is unusable (a buffer may still be in flight): the caller ends the
//    job (MpiRuntime::abort) rather than continuing.
//  - *_async() start an operation and return a PendingOp; its wait() applies the same timeout.
//    The buffers must stay alive and untouched until wait() returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace switchyard {

enum class DType { kFloat32, kFloat64, kInt32, kInt64, kByte };
enum class ReduceOp { kSum, kMax, kMin };

size_t dtype_bytes(DType t);
const char* dtype_name(DType t);

// A communication failure (a peer died, MPI reported an error).
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// An operation that did not complete in time.
class CommTimeout : public CommError {
 public:
  using CommError::CommError;
};

class PendingOp {
 public:
  virtual ~PendingOp() = default;
  // Blocks until the operation completes (or throws CommTimeout).
  virtual void wait() = 0;
  // True once complete; never blocks.
  virtual bool test() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The group's name ("world", "tp", "ep", "dp", ...) and its members' world ranks, for messages.
  virtual const std::string& name() const = 0;
  virtual const std::vector<int>& world_ranks() const = 0;
  virtual double timeout_s() const = 0;

  virtual void all_reduce(void* data, size_t count, DType dtype, ReduceOp op) = 0;
  // recv holds size() * count elements, rank r's at r * count. In place when send is this rank's
  // block of recv (send == recv + rank() * count elements).
  virtual void all_gather(const void* send, void* recv, size_t count, DType dtype) = 0;
  // send holds size() * count elements; rank r receives the reduction of every rank's r-th block.
  virtual void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                              ReduceOp op) = 0;
  // Variable all-to-all: send_counts[r] elements go to rank r (blocks laid out in rank order),
  // recv_counts[r] come from rank r.
  virtual void all_to_allv(const void* send, const std::vector<size_t>& send_counts, void* recv,
                           const std::vector<size_t>& recv_counts, DType dtype) = 0;
  virtual void broadcast(void* data, size_t count, DType dtype, int root) = 0;
  // Tags are in [0, 32767].
  virtual void send(const void* data, size_t count, DType dtype, int peer, int tag) = 0;
  virtual void recv(void* data, size_t count, DType dtype, int peer, int tag) = 0;
  virtual void barrier() = 0;

  // A send that completes in the background (pipeline stages post theirs and move on, so two
  // neighbours sending to each other cannot deadlock).
  virtual std::unique_ptr<PendingOp> send_async(const void* data, size_t count, DType dtype,
                                                int peer, int tag) = 0;
  virtual std::unique_ptr<PendingOp> all_reduce_async(void* data, size_t count, DType dtype,
                                                      ReduceOp op) = 0;
  virtual std::unique_ptr<PendingOp> all_to_allv_async(const void* send,
                                                       const std::vector<size_t>& send_counts,
                                                       void* recv,
                                                       const std::vector<size_t>& recv_counts,
                                                       DType dtype) = 0;

  // The ranks that pass the same `color` form a new group, ordered by `key` (collective over this
  // group: every member calls it).
  virtual std::unique_ptr<Communicator> split(int color, int key, const std::string& name) = 0;
};

// A group of one rank: collectives copy, point-to-point to oneself is an error.
std::unique_ptr<Communicator> self_communicator(const std::string& name = "self",
                                                int world_rank = 0);

}  // namespace switchyard
