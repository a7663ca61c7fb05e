// The pipelined ring all-reduce (see ring_allreduce.h).
//
// Step k (0 <= k < 2 (N-1)) of rank r sends chunk (r - k) mod N and receives chunk (r - k - 1)
// mod N, so the chunk received in step k is the one sent in step k + 1. Every chunk is cut into
// the same segments on every rank, and segment s of step k + 1 is sent as soon as segment s of step
// k has arrived (and, in the reduce-scatter steps, been added). Messages from one rank to the next
// are posted in (step, segment) order on one tag, and the receives in the same order, so they
// match in order. Receives of the reduce-scatter steps land in two alternating scratch halves
// (step parity); those of the all-gather steps land in the buffer, in the region this rank sent
// N - 1 steps earlier, after that send has completed.
#include "comm/ring_allreduce.h"

#include <algorithm>
#include <memory>

#include "comm/progress.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
using Ring = RingLayout;

uint64_t ring_bytes_sent(int64_t count, int rank, int ranks) {
  if (ranks <= 1) return 0;
  const Ring g{count, ranks, rank, 1};
  return sizeof(float) * static_cast<uint64_t>(2 * count - g.chunk_len(g.mod(rank + 1)) -
                                               g.chunk_len(g.mod(rank + 2)));
}

void ring_reference_sum(const std::vector<const float*>& inputs, int64_t count, float* out) {
  const int n = static_cast<int>(inputs.size());
  INT4DDP_CHECK(n >= 1, "ring_reference_sum: no inputs");
  const Ring g{count, n, 0, 1};
  for (int j = 0; j < n; ++j)
    for (int64_t i = g.chunk_lo(j); i < g.chunk_lo(j + 1); ++i) {
      float s = inputs[static_cast<size_t>(j)][i];
      for (int k = 1; k < n; ++k) s = s + inputs[static_cast<size_t>(g.mod(j + k))][i];
      out[i] = s;
    }
}

void ring_allreduce_sum(Communicator& comm, float* buf, int64_t count, std::vector<float>& scratch,
                        size_t segment_bytes) {
  INT4DDP_CHECK(count >= 0, "ring all-reduce: negative count ", count);
  INT4DDP_CHECK(segment_bytes >= sizeof(float), "ring all-reduce: segment of ", segment_bytes,
                " bytes holds no float");
  const int n = comm.size();
  if (n == 1 || count == 0) return;
  const Ring g{count, n, comm.rank(), static_cast<int64_t>(segment_bytes / sizeof(float))};
  const int next = g.mod(g.r + 1), prev = g.mod(g.r - 1);
  const int steps = 2 * (n - 1);
  const int64_t max_chunk = (count + n - 1) / n;
  scratch.resize(2 * static_cast<size_t>(max_chunk));

  std::vector<std::vector<std::unique_ptr<Request>>> sends(static_cast<size_t>(steps)),
      recvs(static_cast<size_t>(steps));
  auto send = [&](int k, int64_t s) {
    const int j = g.send_chunk(k);
    sends[static_cast<size_t>(k)][static_cast<size_t>(s)] = comm.isend(
        buf + g.seg_lo(j, s), sizeof(float) * static_cast<size_t>(g.seg_len(j, s)), next, kRingTag);
  };
  auto scratch_of = [&](int k, int64_t s) {
    const int j = g.recv_chunk(k);
    return scratch.data() + (k % 2) * max_chunk + (g.seg_lo(j, s) - g.chunk_lo(j));
  };
  auto post_recv = [&](int k, int64_t s) {
    const int j = g.recv_chunk(k);
    float* dst;
    if (k < n - 1) {
      dst = scratch_of(k, s);
    } else {
      // All-gather: into the buffer, where this rank's send of step k + 1 - N (same chunk, same
      // segment) must have finished reading.
      std::unique_ptr<Request>& earlier =
          sends[static_cast<size_t>(k + 1 - n)][static_cast<size_t>(s)];
      wait_politely(*earlier);
      dst = buf + g.seg_lo(j, s);
    }
    recvs[static_cast<size_t>(k)][static_cast<size_t>(s)] =
        comm.irecv(dst, sizeof(float) * static_cast<size_t>(g.seg_len(j, s)), prev, kRingTag);
  };

  sends[0].resize(static_cast<size_t>(g.num_segments(g.send_chunk(0))));
  for (int64_t s = 0; s < g.num_segments(g.send_chunk(0)); ++s) send(0, s);
  recvs[0].resize(static_cast<size_t>(g.num_segments(g.recv_chunk(0))));
  for (int64_t s = 0; s < g.num_segments(g.recv_chunk(0)); ++s) post_recv(0, s);
  for (int k = 1; k < steps; ++k) {
    const int j = g.send_chunk(k);  // = recv_chunk(k - 1)
    const int64_t ns = g.num_segments(j), nr = g.num_segments(g.recv_chunk(k));
    sends[static_cast<size_t>(k)].resize(static_cast<size_t>(ns));
    recvs[static_cast<size_t>(k)].resize(static_cast<size_t>(nr));
    for (int64_t s = 0; s < ns; ++s) {
      wait_politely(*recvs[static_cast<size_t>(k - 1)][static_cast<size_t>(s)]);
      if (k - 1 < n - 1) {  // reduce-scatter: add the partial sum that arrived
        const float* in = scratch_of(k - 1, s);
        float* out = buf + g.seg_lo(j, s);
        const int64_t len = g.seg_len(j, s);
        for (int64_t i = 0; i < len; ++i) out[i] = out[i] + in[i];
      }
      send(k, s);
      if (s < nr) post_recv(k, s);
    }
    for (int64_t s = ns; s < nr; ++s) post_recv(k, s);
  }
  for (auto& q : recvs[static_cast<size_t>(steps - 1)]) wait_politely(*q);
  for (auto& step : sends)
    for (auto& q : step)
      if (q) wait_politely(*q);
}

}  // namespace int4ddp::comm
