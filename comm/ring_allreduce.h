// The bandwidth-optimal fp32 all-reduce (sum): a pipelined ring of reduce-scatter + all-gather on
// a Communicator's point-to-point messages (DESIGN.md section 4, fp32 mode).
//
// The buffer of `count` floats is cut into N chunks (chunk j = [count j / N, count (j+1) / N)).
// In 2 (N-1) steps every rank sends one chunk to rank + 1 and receives one from rank - 1: the
// first N-1 steps add what arrives to the local chunk (reduce-scatter; afterwards rank r holds the
// full sum of chunk r + 1), the last N-1 steps pass the finished chunks on (all-gather). Each rank
// sends 4 (2 count - |chunk r+1| - |chunk r+2|) bytes, about 2 (N-1)/N of the buffer, the lower
// bound for an all-reduce. Chunks travel in segments of segment_bytes, and a segment is forwarded
// as soon as it has arrived and been added, so a large buffer streams through the ring instead of
// waiting for whole chunks at every step.
//
// Reduction order is fixed: chunk j is summed as ((x_j + x_{j+1}) + x_{j+2}) + ... over ranks j,
// j+1, ..., j+N-1 (mod N), whatever the timing, and the all-gather copies the finished sums, so the
// result is deterministic and bit-identical on every rank (ring_reference_sum states it).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "comm/communicator.h"

namespace int4ddp::comm {

// Default pipelining segment: large enough that per-message overhead is small, small enough that
// a bucket of a few MiB still fills the ring.
constexpr size_t kRingSegmentBytes = size_t{1} << 20;

// Below kRingMinBytes an all-reduce is latency-bound: the ring's 2 (N-1) message steps cost more
// than the library's own algorithms for small messages (recursive doubling: log2 N steps), so the
// MPI Communicator's allreduce_sum hands such buffers (scalars, loss sums, small tensors) to
// MPI_Allreduce even under AllreduceAlgorithm::kRing. The library gives every rank the same bits
// but adds in its own order (exact sums are equal; rounded ones may differ from the ring's).
constexpr size_t kRingMinBytes = size_t{64} << 10;
inline bool ring_pays_off(int64_t count) {
  return static_cast<uint64_t>(count) * sizeof(float) >= kRingMinBytes;
}

// The ring's geometry for rank r of n over count floats, shared by both transports (the MPI
// point-to-point ring below and comm/socket_ring.h): chunk j = [count j / n, count (j+1) / n);
// step k sends chunk send_chunk(k) to rank r + 1 and receives chunk recv_chunk(k) from rank r - 1,
// both cut into segments of seg floats (the last one shorter).
struct RingLayout {
  int64_t count;
  int n, r;
  int64_t seg;  // floats per segment, >= 1

  int mod(int v) const { return ((v % n) + n) % n; }
  int64_t chunk_lo(int j) const { return count * j / n; }
  int64_t chunk_len(int j) const { return chunk_lo(j + 1) - chunk_lo(j); }
  int send_chunk(int k) const { return mod(r - k); }
  int recv_chunk(int k) const { return mod(r - k - 1); }
  int64_t num_segments(int j) const { return (chunk_len(j) + seg - 1) / seg; }
  int64_t seg_lo(int j, int64_t s) const { return chunk_lo(j) + s * seg; }
  int64_t seg_len(int j, int64_t s) const { return std::min(seg, chunk_lo(j + 1) - seg_lo(j, s)); }
};

// In place: buf <- sum over the ranks of comm of buf (count floats, host memory). Collective; uses
// comm.isend / comm.irecv with tag kRingTag. scratch: receive space kept by the caller between
// calls (resized to 2 ceil(count / N) floats). segment_bytes >= 4.
void ring_allreduce_sum(Communicator& comm, float* buf, int64_t count, std::vector<float>& scratch,
                        size_t segment_bytes = kRingSegmentBytes);

// The message tag of the ring's point-to-point messages.
constexpr int kRingTag = 0x5249;

// Bytes that rank `rank` of `ranks` sends in ring_allreduce_sum of count floats.
uint64_t ring_bytes_sent(int64_t count, int rank, int ranks);

// The plain reference of the result: out[i] = the ring's sum of inputs[0..N-1][i] in its fixed
// order (per chunk, starting at the chunk's own rank). inputs: N pointers to count floats.
void ring_reference_sum(const std::vector<const float*>& inputs, int64_t count, float* out);

}  // namespace int4ddp::comm
