// The NCCL backend of Communicator: one GPU per rank, collectives and point-to-point transfers by
// NCCL on the communicator's own CUDA streams.
//
// - Buffers may be device memory (the runner's tensors) or host memory (small metadata: counts, a
//   loss). Host buffers, pinned ones included, are staged through a grow-only device scratch:
//   copied in, the operation run, copied out. An *_async() call whose results land in host memory
//   completes before it returns (its PendingOp is done); a send_async() from host memory does not.
// - Nothing waits forever: NCCL runs non-blocking (creation and split included) and every wait
//   polls the operation's completion, NCCL's asynchronous error and the timeout. A timeout or an
//   NCCL error aborts the group's NCCL communicators and throws CommTimeout / CommError naming the
//   operation, the group, its members' world ranks and the calling rank; the group is unusable
//   afterwards (every later call throws CommError).
// - Point-to-point: NCCL matches the messages between two ranks in the order they are posted (it
//   has no tags): both ranks must post them in the same order. Each message carries its tag and
//   size, and a receive that gets another tag than it expects throws CommError instead of handing
//   over the wrong tensor. Sending to oneself is an error (a lone NCCL send and receive to the same
//   rank would wait on each other). Messages from lower to higher ranks and those going back run on
//   two NCCL communicators of their own, apart from the collectives, so a pipeline stage's posted
//   sends never queue in front of the receive its neighbour is waiting on.
//   A send_async() returns before NCCL has launched it: NCCL connects to a peer on the first
//   message to it, which waits for that peer's first receive; the next call in the same direction
//   (or the PendingOp) waits for the launch instead.
// - Multi-rank groups need one GPU per rank: NCCL refuses two ranks on one device.
#pragma once

#include <memory>

#include "executor/communicator.h"

namespace switchyard {

// A world group over NCCL of `bootstrap`'s ranks, one GPU each (`cuda_device` on this rank): rank 0
// makes the unique id and broadcasts it over `bootstrap` (a host Communicator: the MPI world under
// mpirun, a one-rank self_communicator otherwise — so a single-process run needs no MPI). Members'
// world ranks are bootstrap's. Collective over bootstrap; throws CommTimeout when a member does not
// join within `timeout_s` (<= 0: no deadline), DeviceError when `cuda_device` cannot be used.
std::unique_ptr<Communicator> nccl_world(Communicator& bootstrap, int cuda_device,
                                         double timeout_s);

}  // namespace switchyard
