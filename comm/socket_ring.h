// The fp32 ring all-reduce over its own TCP connections, waiting in the kernel (poll) instead of
// polling the MPI library.
//
// The MPI library's TCP transport moves a message only while a rank is inside an MPI call, so the
// point-to-point ring of ring_allreduce.h tests its requests in a loop with short sleeps: each
// wake-up costs a core for a moment, and ranks that share cores (the simulated cluster, CI) take
// it from each other and from the kernel's network processing, while a sleeping rank answers late.
// SocketRing instead connects every rank to its ring neighbours once (rank r sends to r + 1 and
// receives from r - 1 on two TCP connections) and runs the same ring on non-blocking sockets with
// one poll() per wake-up: the thread sleeps until a neighbour's bytes arrive or its own can be
// written, as gloo does.
//
// Same algorithm, same bits: chunks, segments, the order of the additions and the all-gather are
// ring_allreduce_sum's (RingLayout), so the result equals ring_reference_sum bit for bit on every
// rank. The byte stream between two neighbours carries the segments in (step, segment) order;
// every segment is received into scratch, then added (reduce-scatter) or copied (all-gather) into
// the buffer, so a segment of step k + 1 can be written as soon as that of step k is in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "comm/ring_allreduce.h"

namespace int4ddp::comm {

class SocketRing {
 public:
  // Collective over comm (which must support allgatherv and allreduce_sum_i64): every rank listens
  // on an ephemeral TCP port, the ranks' IPv4 addresses (not loopback) and ports are all-gathered,
  // and each rank connects to rank + 1, checked by a per-run token in both directions. Returns
  // null on every rank when any rank could not connect (then use ring_allreduce_sum), or with
  // one rank.
  static std::unique_ptr<SocketRing> connect(Communicator& comm);
  ~SocketRing();
  SocketRing(const SocketRing&) = delete;
  SocketRing& operator=(const SocketRing&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  // In place: buf <- the ring's sum over the ranks of buf (count floats), exactly as
  // ring_allreduce_sum(comm, buf, count, scratch, segment_bytes) computes it. Collective over the
  // ranks of connect(); scratch: receive space (resized to one segment). Throws Error when a
  // neighbour closes the connection or sends nothing for kTimeoutSeconds.
  void allreduce_sum(float* buf, int64_t count, std::vector<float>& scratch,
                     size_t segment_bytes = kRingSegmentBytes);

  static constexpr int kTimeoutSeconds = 300;

 private:
  SocketRing(int rank, int size, int send_fd, int recv_fd)
      : rank_(rank), size_(size), send_fd_(send_fd), recv_fd_(recv_fd) {}
  int rank_, size_;
  int send_fd_, recv_fd_;  // to rank + 1, from rank - 1 (non-blocking)
};

}  // namespace int4ddp::comm
