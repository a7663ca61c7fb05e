// The pipelined ring all-reduce (comm/ring_allreduce.h) under mpirun (label mpi, 1-4 ranks): exact
// sums on integer inputs for sizes that do not divide evenly and sizes below the rank count, the
// fixed reduction order bit for bit against ring_reference_sum on random data (so the result is
// the same on every rank and in every run), the bytes each rank sends, and the Communicator's
// choice between the ring and the library's MPI_Allreduce (the library below kRingMinBytes). The
// same ring over its own TCP connections (comm/socket_ring.h) gives the same bits.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "comm/ring_allreduce.h"
#include "comm/socket_ring.h"
#include "comm_test.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

// Odd sizes, sizes below the rank count, a size that spans several segments per chunk.
const std::vector<int64_t> kCounts = {0, 1, 2, 3, 5, 7, 1000, 100003};
// 4 bytes: one float per message; 12: segments that do not divide the chunks; 4096; the default.
const std::vector<size_t> kSegments = {4, 12, 4096, kRingSegmentBytes};
// Tiny segments on large sizes would only cost time (a message per float).
bool worth_running(int64_t count, size_t seg) { return count <= 1000 || seg >= 4096; }

float int_input(int rank, int64_t i) { return static_cast<float>((i % 101) * (rank + 1) - 50); }

// Random values over 2^-20 .. 2^20 whose fp32 sum depends on the order of the additions.
float random_input(int rank, int64_t i) {
  return std::ldexp(uniform(77, rank, i), static_cast<int>((i * 7 + rank * 3) % 41) - 20);
}

// Rank r's input random_input(r + shift, i): this rank's in mine, ring_reference_sum's result in
// want (count floats each).
void random_case(int64_t count, int shift, std::vector<float>& mine, std::vector<float>& want) {
  std::vector<std::vector<float>> inputs(static_cast<size_t>(R()),
                                         std::vector<float>(static_cast<size_t>(count)));
  std::vector<const float*> ptrs;
  for (int r = 0; r < R(); ++r) {
    for (int64_t i = 0; i < count; ++i)
      inputs[static_cast<size_t>(r)][static_cast<size_t>(i)] = random_input(r + shift, i);
    ptrs.push_back(inputs[static_cast<size_t>(r)].data());
  }
  want.resize(static_cast<size_t>(count));
  ring_reference_sum(ptrs, count, want.data());
  mine = inputs[static_cast<size_t>(me())];
}

TEST(RingAllreduce, ExactSumOnIntegersForEverySizeAndSegment) {
  std::vector<float> scratch;
  for (size_t seg : kSegments)
    for (int64_t count : kCounts) {
      if (!worth_running(count, seg)) continue;
      std::vector<float> buf(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) buf[static_cast<size_t>(i)] = int_input(me(), i);
      ring_allreduce_sum(W(), buf.data(), count, scratch, seg);
      std::vector<float> want(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) {
        double s = 0;
        for (int r = 0; r < R(); ++r) s += int_input(r, i);
        want[static_cast<size_t>(i)] = static_cast<float>(s);
      }
      EXPECT_EQ(count_wrong(buf, want), 0) << "count " << count << " segment " << seg;
    }
}

TEST(RingAllreduce, FixedReductionOrderBitForBitOnEveryRank) {
  std::vector<float> scratch;
  for (size_t seg : kSegments)
    for (int64_t count : kCounts) {
      if (!worth_running(count, seg)) continue;
      std::vector<float> buf, want;
      random_case(count, 0, buf, want);
      ring_allreduce_sum(W(), buf.data(), count, scratch, seg);
      EXPECT_EQ(count_wrong(buf, want), 0) << "count " << count << " segment " << seg;
      EXPECT_TRUE(same_on_all_ranks(buf.data(), buf.size() * sizeof(float))) << count;
    }
}

// The socket ring: connected on every rank or on none; then the ring's sum bit for bit, for every
// size and segment, also over repeated calls on the same connections. Skipped where the ranks
// have no network address other than loopback (it then falls back to MPI's messages).
TEST(SocketRing, SameBitsAsTheRingForEverySizeAndSegment) {
  std::unique_ptr<SocketRing> ring = SocketRing::connect(W());
  int64_t connected = ring ? 1 : 0;
  W().allreduce_sum_i64(&connected, 1);
  EXPECT_TRUE(connected == 0 || connected == R()) << "connected on some ranks only";
  if (R() == 1) {
    EXPECT_EQ(ring, nullptr);
    return;
  }
  if (!ring) GTEST_SKIP() << "no non-loopback address to connect the socket ring over";
  EXPECT_EQ(ring->rank(), me());
  EXPECT_EQ(ring->size(), R());
  std::vector<float> scratch;
  for (int round = 0; round < 2; ++round)
    for (size_t seg : kSegments)
      for (int64_t count : kCounts) {
        if (!worth_running(count, seg)) continue;
        std::vector<float> buf, want;
        random_case(count, round, buf, want);
        ring->allreduce_sum(buf.data(), count, scratch, seg);
        EXPECT_EQ(count_wrong(buf, want), 0) << "count " << count << " segment " << seg;
      }
}

TEST(RingAllreduce, ReferenceOrderIsTheRingsAndDiffersFromRankOrder) {
  // Chunk j is summed from rank j on: with 3 inputs and 3 elements (one per chunk) element 1 is
  // (x1 + x2) + x0. Values chosen so that the orders give different fp32 sums.
  const float a[3] = {1.0f, 1.0f, 1.0f}, b[3] = {1e8f, 1e8f, 1e8f}, c[3] = {-1e8f, -1e8f, -1e8f};
  float out[3];
  ring_reference_sum({a, b, c}, 3, out);
  EXPECT_EQ(out[0], (1.0f + 1e8f) + -1e8f);  // chunk 0: x0 + x1 + x2
  EXPECT_EQ(out[1], (1e8f + -1e8f) + 1.0f);  // chunk 1: x1 + x2 + x0
  EXPECT_EQ(out[2], (-1e8f + 1.0f) + 1e8f);  // chunk 2: x2 + x0 + x1
  EXPECT_NE(out[0], out[1]);
}

TEST(RingAllreduce, BytesSentPerRankAndInTotal) {
  std::vector<float> scratch;
  for (int64_t count : kCounts) {
    std::vector<float> buf(static_cast<size_t>(count), 1.0f);
    W().reset_bytes_sent();
    ring_allreduce_sum(W(), buf.data(), count, scratch, 4096);
    EXPECT_EQ(W().bytes_sent(), ring_bytes_sent(count, me(), R())) << count;
    // Over all ranks: every chunk is sent N-1 times in each half, 2 (N-1) count floats.
    int64_t total = static_cast<int64_t>(W().bytes_sent());
    W().allreduce_sum_i64(&total, 1);
    EXPECT_EQ(total, 8 * (R() - 1) * count) << count;
  }
  EXPECT_EQ(ring_bytes_sent(1000, 0, 1), 0u);
  EXPECT_EQ(ring_bytes_sent(1000, 1, 2), 4000u);
  EXPECT_EQ(ring_bytes_sent(1000, 0, 4), 6000u);
}

TEST(RingAllreduce, CommunicatorUsesTheRingAndKeepsTheLibraryAllreduce) {
  const int64_t count = static_cast<int64_t>(kRingMinBytes / sizeof(float)) + 10007;
  std::vector<float> want(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    double s = 0;
    for (int r = 0; r < R(); ++r) s += int_input(r, i);
    want[static_cast<size_t>(i)] = static_cast<float>(s);
  }
  EXPECT_EQ(W().allreduce_algorithm(), Communicator::AllreduceAlgorithm::kRing);
  for (auto algo :
       {Communicator::AllreduceAlgorithm::kLibrary, Communicator::AllreduceAlgorithm::kRing}) {
    W().set_allreduce_algorithm(algo);
    std::vector<float> buf(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) buf[static_cast<size_t>(i)] = int_input(me(), i);
    W().reset_bytes_sent();
    W().allreduce_sum(buf.data(), count);
    EXPECT_EQ(count_wrong(buf, want), 0);
    const uint64_t ring = ring_bytes_sent(count, me(), R()),
                   lib = static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4.0 * count + 0.5);
    EXPECT_EQ(W().bytes_sent(), algo == Communicator::AllreduceAlgorithm::kRing ? ring : lib);
  }
}

// Below kRingMinBytes the Communicator's ring setting uses MPI_Allreduce: the same sums as the
// ring wherever the fp32 sums are exact (integer inputs, any order gives the exact sum), the same
// bits on every rank on random data (where the library's order may differ from the ring's, so
// only agreement across ranks is checked), and the bytes counted as a ring, the library's rule.
TEST(RingAllreduce, SmallAllreducesUseTheLibraryWithTheRingsExactSums) {
  const int64_t threshold = static_cast<int64_t>(kRingMinBytes / sizeof(float));
  EXPECT_FALSE(ring_pays_off(threshold - 1));
  EXPECT_TRUE(ring_pays_off(threshold));
  std::vector<float> scratch;
  for (int64_t count : {int64_t{1}, int64_t{3}, int64_t{1001}, threshold - 1, threshold}) {
    std::vector<float> buf(static_cast<size_t>(count)), ring(buf.size());
    for (int64_t i = 0; i < count; ++i) buf[static_cast<size_t>(i)] = int_input(me(), i);
    ring = buf;
    ring_allreduce_sum(W(), ring.data(), count, scratch);
    W().reset_bytes_sent();
    W().allreduce_sum(buf.data(), count);
    EXPECT_EQ(count_wrong(buf, ring), 0) << count;
    const uint64_t lib = static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4.0 * count + 0.5);
    EXPECT_EQ(W().bytes_sent(), ring_pays_off(count) ? ring_bytes_sent(count, me(), R()) : lib)
        << count;

    for (int64_t i = 0; i < count; ++i) buf[static_cast<size_t>(i)] = random_input(me(), i);
    W().allreduce_sum(buf.data(), count);
    EXPECT_TRUE(same_on_all_ranks(buf.data(), buf.size() * sizeof(float))) << count;
  }
}

TEST(RingAllreduce, BadArgumentsAndBackendsWithoutPointToPointAreRefused) {
  std::vector<float> scratch, buf(4, 1.0f);
  EXPECT_THROW(ring_allreduce_sum(W(), buf.data(), -1, scratch), Error);
  EXPECT_THROW(ring_allreduce_sum(W(), buf.data(), 4, scratch, 3), Error);
  auto local = make_local_communicator();
  EXPECT_THROW(local->isend(buf.data(), 4, 0, kRingTag), Error);
  EXPECT_THROW(local->irecv(buf.data(), 4, 0, kRingTag), Error);
  ring_allreduce_sum(*local, buf.data(), 4, scratch);  // size 1: nothing to do
  EXPECT_EQ(buf[3], 1.0f);
  EXPECT_THROW(W().isend(buf.data(), 4, R(), kRingTag), Error);
  EXPECT_THROW(W().irecv(buf.data(), 4, -1, kRingTag), Error);
  W().barrier();
}

}  // namespace
}  // namespace int4ddp::comm
