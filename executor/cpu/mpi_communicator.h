// The MPI backend of Communicator, and the MPI runtime the CPU executor runs in.
//
// Every operation is started non-blocking (MPI_I*) and completed by polling with a deadline, so a
// peer that died or never joins turns into CommTimeout naming the operation, the group and the
// calling rank instead of a hang; MPI errors are returned (MPI_ERRORS_RETURN), not fatal, and
// become CommError. Polling sleeps between tests, so oversubscribed ranks (more ranks than cores)
// do not starve each other.
#pragma once

#include <memory>
#include <string>

#include "executor/communicator.h"

namespace switchyard {

class MpiRuntime {
 public:
  // MPI_Init_thread (serialized: one thread at a time calls MPI). Throws CommError when MPI cannot
  // start or lacks that thread level. One runtime per process.
  static std::unique_ptr<MpiRuntime> start(int* argc, char*** argv);
  ~MpiRuntime();  // MPI_Finalize
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  // A communicator over every rank (a duplicate of MPI_COMM_WORLD).
  std::unique_ptr<Communicator> world(double timeout_s) const;
  // Prints `message` naming this rank and ends every rank of the job.
  [[noreturn]] void abort(int code, const std::string& message) const;

 private:
  MpiRuntime() = default;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace switchyard
