// The NCCL Communicator (device buffers), DESIGN.md section 4.
//
// One NCCL communicator over MPI_COMM_WORLD: MPI (make_mpi_communicator()) starts the processes'
// rendezvous, rank 0's ncclUniqueId reaches the others by its broadcast, and each rank drives the
// GPU given by its node-local rank (make_mpi_node_communicator()) (one GPU per rank: NCCL refuses
// two ranks on one GPU, so that is checked first with a clear message). Collectives run on the
// communicator's own CUDA stream:
//   alltoallv      grouped ncclSend/ncclRecv (the rank's own block by cudaMemcpyAsync)
//   allgatherv     ncclAllGather when every count is equal and the layout packed, else grouped
//                  send/recv
//   allreduce_sum  ncclAllReduce (fp32 sum); broadcast ncclBroadcast
//   barrier, allreduce_sum_i64, gatherv (host memory) go through MPI.
// Hand-off with the compute stream: every call first makes the NCCL stream wait for an event
// recorded on the legacy default stream, so kernels queued there before the call are complete for
// it. Blocking calls return when their result is in device memory; nonblocking ones return a
// Request whose event marks completion. Errors (including NCCL's asynchronous ones) throw
// int4ddp::Error with the call, file:line, rank and NCCL's message.
#pragma once

#include <nccl.h>

#include <memory>

#include "comm/communicator.h"
#include "kernels/common/error.h"

namespace int4ddp::detail {
// NCCL's error string of rc, with the last-error text of comm (may be null) when it has one.
std::string nccl_error_text(ncclResult_t rc, ncclComm_t comm);
}  // namespace int4ddp::detail

// INT4DDP_NCCL_CHECK(call): throws int4ddp::Error naming the call, the caller's file:line, the rank
// and NCCL's error string when call does not return ncclSuccess. INT4DDP_NCCL_CHECK_COMM(comm,
// call) adds the last-error text of that communicator.
#define INT4DDP_NCCL_CHECK_COMM(comm, call)                                            \
  INT4DDP_LIBRARY_CHECK("NCCL", call, #call, ncclSuccess, [&](ncclResult_t nccl_rc_) { \
    return ::int4ddp::detail::nccl_error_text(nccl_rc_, comm);                         \
  })
#define INT4DDP_NCCL_CHECK(call) INT4DDP_NCCL_CHECK_COMM(nullptr, call)

namespace int4ddp::comm {

// NCCL over MPI_COMM_WORLD (initialises MPI if needed). Throws Error when this node has fewer GPUs
// than ranks, or when NCCL fails.
std::unique_ptr<Communicator> make_nccl_communicator();

}  // namespace int4ddp::comm
