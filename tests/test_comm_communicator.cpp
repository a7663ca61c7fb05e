// The Communicator interface under mpirun (label mpi; ctest runs the comm suite with 1, 2, 3 and 4
// ranks): the MPI backend's collectives, the local backend, the factory, the node-local
// communicator and the error path of failed MPI calls. Every test makes the same collective calls
// on every rank, failed or not.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_check.h"
#include "comm/ring_allreduce.h"
#include "comm_test.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

// =================================================================================================
// Communicator
// =================================================================================================

TEST(Communicator, RankSizeAndEnvironment) {
  EXPECT_STREQ(W().backend(), "mpi");
  EXPECT_GE(me(), 0);
  EXPECT_LT(me(), R());
  EXPECT_FALSE(W().device_buffers());
  int n = 0;
  EXPECT_EQ(launched_with_multiple_ranks(&n), R() > 1);
  EXPECT_EQ(n, R());
  W().barrier();
}

TEST(Communicator, FactoryRefusesUnknownBackendAndNoneUnderManyRanks) {
  EXPECT_THROW(make_communicator("gloo"), Error);
  if (R() > 1) {
    EXPECT_THROW(make_communicator("none"), Error);
  } else {
    EXPECT_EQ(make_communicator("none")->size(), 1);
  }
}

TEST(Communicator, BroadcastFromEveryRoot) {
  for (int root = 0; root < R(); ++root) {
    for (size_t bytes : {size_t{0}, size_t{1}, size_t{1000} + static_cast<size_t>(root)}) {
      std::vector<uint8_t> buf(bytes, 0);
      if (me() == root)
        for (size_t i = 0; i < bytes; ++i) buf[i] = static_cast<uint8_t>(i * 7 + root);
      W().broadcast(buf.data(), bytes, root);
      int64_t wrong = 0;
      for (size_t i = 0; i < bytes; ++i) wrong += buf[i] != static_cast<uint8_t>(i * 7 + root);
      EXPECT_EQ(wrong, 0) << "root " << root << " bytes " << bytes;
    }
  }
}

TEST(Communicator, AllreduceSumFloatIsExactOnIntegers) {
  for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{1000}, int64_t{100003}}) {
    std::vector<float> buf(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i)
      buf[static_cast<size_t>(i)] = static_cast<float>((i % 101) * (me() + 1));
    W().allreduce_sum(buf.data(), count);
    const int64_t tri = int64_t{R()} * (R() + 1) / 2;
    int64_t wrong = 0;
    for (int64_t i = 0; i < count; ++i)
      wrong += buf[static_cast<size_t>(i)] != static_cast<float>((i % 101) * tri);
    EXPECT_EQ(wrong, 0) << "count " << count;
  }
}

TEST(Communicator, AllreduceSumInt64) {
  std::vector<int64_t> buf = {(int64_t{1} << 40) + me(), -3, int64_t{me()} * me()};
  W().allreduce_sum_i64(buf.data(), static_cast<int64_t>(buf.size()));
  int64_t sq = 0;
  for (int r = 0; r < R(); ++r) sq += int64_t{r} * r;
  EXPECT_EQ(buf[0], R() * (int64_t{1} << 40) + int64_t{R()} * (R() - 1) / 2);
  EXPECT_EQ(buf[1], -3 * int64_t{R()});
  EXPECT_EQ(buf[2], sq);
}

// Uneven all-to-all: rank i sends a2a_bytes(i, j) bytes to rank j (zero for some pairs), each byte
// a function of (i, j, k). Receive blocks are laid out with 3-byte gaps that must stay untouched.
size_t a2a_bytes(int i, int j) { return static_cast<size_t>((i * 3 + j * 5) % 7) * 11; }
uint8_t a2a_byte(int i, int j, size_t k) { return static_cast<uint8_t>(i * 31 + j * 17 + k); }
constexpr uint8_t kSentinel = 0xA5;
constexpr size_t kGap = 3;

ByteLayout gapped(const std::vector<size_t>& counts) {
  ByteLayout l;
  size_t off = kGap;
  for (size_t c : counts) {
    l.counts.push_back(c);
    l.displs.push_back(off);
    off += c + kGap;
  }
  return l;
}

void fill_a2a_send(std::vector<uint8_t>& send, ByteLayout& sl) {
  std::vector<size_t> counts;
  for (int j = 0; j < R(); ++j) counts.push_back(a2a_bytes(me(), j));
  sl = ByteLayout::packed(counts);
  send.assign(sl.total(), 0);
  for (int j = 0; j < R(); ++j)
    for (size_t k = 0; k < counts[static_cast<size_t>(j)]; ++k)
      send[sl.displs[static_cast<size_t>(j)] + k] = a2a_byte(me(), j, k);
}

int64_t check_a2a_recv(const std::vector<uint8_t>& recv, const ByteLayout& rl) {
  int64_t wrong = 0;
  std::vector<bool> covered(recv.size(), false);
  for (int i = 0; i < R(); ++i)
    for (size_t k = 0; k < rl.counts[static_cast<size_t>(i)]; ++k) {
      const size_t at = rl.displs[static_cast<size_t>(i)] + k;
      covered[at] = true;
      wrong += recv[at] != a2a_byte(i, me(), k);
    }
  for (size_t at = 0; at < recv.size(); ++at) wrong += !covered[at] && recv[at] != kSentinel;
  return wrong;
}

ByteLayout a2a_recv_layout() {
  std::vector<size_t> counts;
  for (int i = 0; i < R(); ++i) counts.push_back(a2a_bytes(i, me()));
  return gapped(counts);
}

TEST(Communicator, AlltoallvUnevenCountsIncludingZero) {
  std::vector<uint8_t> send;
  ByteLayout sl;
  fill_a2a_send(send, sl);
  const ByteLayout rl = a2a_recv_layout();
  std::vector<uint8_t> recv(rl.displs.back() + rl.counts.back() + kGap, kSentinel);
  W().reset_bytes_sent();
  W().alltoallv(send.data(), sl, recv.data(), rl);
  EXPECT_EQ(check_a2a_recv(recv, rl), 0);
  // bytes_sent: what went to the other ranks.
  uint64_t expect = 0;
  for (int j = 0; j < R(); ++j) expect += j == me() ? 0 : a2a_bytes(me(), j);
  EXPECT_EQ(W().bytes_sent(), expect);
}

size_t ag_bytes(int i) { return static_cast<size_t>((i * 7) % 5) * 13; }  // rank 0 sends nothing
uint8_t ag_byte(int i, size_t k) { return static_cast<uint8_t>(i * 59 + k * 3); }

int64_t check_gathered(const std::vector<uint8_t>& recv, const ByteLayout& rl) {
  int64_t wrong = 0;
  std::vector<bool> covered(recv.size(), false);
  for (int i = 0; i < R(); ++i)
    for (size_t k = 0; k < ag_bytes(i); ++k) {
      const size_t at = rl.displs[static_cast<size_t>(i)] + k;
      covered[at] = true;
      wrong += recv[at] != ag_byte(i, k);
    }
  for (size_t at = 0; at < recv.size(); ++at) wrong += !covered[at] && recv[at] != kSentinel;
  return wrong;
}

ByteLayout ag_layout() {
  std::vector<size_t> counts;
  for (int i = 0; i < R(); ++i) counts.push_back(ag_bytes(i));
  return gapped(counts);
}

std::vector<uint8_t> ag_send() {
  std::vector<uint8_t> s(ag_bytes(me()));
  for (size_t k = 0; k < s.size(); ++k) s[k] = ag_byte(me(), k);
  return s;
}

TEST(Communicator, AllgathervUnevenCountsIncludingZero) {
  const ByteLayout rl = ag_layout();
  const std::vector<uint8_t> send = ag_send();
  std::vector<uint8_t> recv(rl.displs.back() + rl.counts.back() + kGap, kSentinel);
  W().reset_bytes_sent();
  W().allgatherv(send.data(), send.size(), recv.data(), rl);
  EXPECT_EQ(check_gathered(recv, rl), 0);
  EXPECT_EQ(W().bytes_sent(),
            static_cast<uint64_t>(static_cast<double>(rl.total()) * (R() - 1) / R() + 0.5));
}

TEST(Communicator, GathervToEveryRoot) {
  const ByteLayout rl = ag_layout();
  const std::vector<uint8_t> send = ag_send();
  for (int root = 0; root < R(); ++root) {
    std::vector<uint8_t> recv(rl.displs.back() + rl.counts.back() + kGap, kSentinel);
    W().reset_bytes_sent();
    W().gatherv(send.data(), send.size(), me() == root ? recv.data() : nullptr, rl, root);
    if (me() == root) {
      EXPECT_EQ(check_gathered(recv, rl), 0) << "root " << root;
      EXPECT_EQ(W().bytes_sent(), 0u);
    } else {
      EXPECT_EQ(W().bytes_sent(), send.size());
    }
  }
}

TEST(Communicator, NonblockingVariants) {
  // All three in flight at once, completed by test() polling and wait().
  const int64_t count = 4099;
  std::vector<float> f(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) f[static_cast<size_t>(i)] = static_cast<float>(i % 13 - me());
  std::vector<uint8_t> send;
  ByteLayout sl;
  fill_a2a_send(send, sl);
  const ByteLayout rl = a2a_recv_layout();
  std::vector<uint8_t> recv(rl.displs.back() + rl.counts.back() + kGap, kSentinel);
  const ByteLayout gl = ag_layout();
  const std::vector<uint8_t> gsend = ag_send();
  std::vector<uint8_t> grecv(gl.displs.back() + gl.counts.back() + kGap, kSentinel);

  W().reset_bytes_sent();
  auto r1 = W().iallreduce_sum(f.data(), count);
  auto r2 = W().ialltoallv(send.data(), sl, recv.data(), rl);
  auto r3 = W().iallgatherv(gsend.data(), gsend.size(), grecv.data(), gl);
  bool done = false;
  for (int spin = 0; spin < 1000000 && !done; ++spin) done = r1->test() && r2->test() && r3->test();
  r1->wait();
  r2->wait();
  r3->wait();
  EXPECT_TRUE(r1->test());
  const float rsum = static_cast<float>(int64_t{R()} * (R() - 1) / 2);
  int64_t wrong = 0;
  for (int64_t i = 0; i < count; ++i)
    wrong += f[static_cast<size_t>(i)] != static_cast<float>(i % 13) * R() - rsum;
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(check_a2a_recv(recv, rl), 0);
  EXPECT_EQ(check_gathered(grecv, gl), 0);

  uint64_t expect = static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4.0 * count + 0.5);
  for (int j = 0; j < R(); ++j) expect += j == me() ? 0 : a2a_bytes(me(), j);
  expect += static_cast<uint64_t>(static_cast<double>(gl.total()) * (R() - 1) / R() + 0.5);
  EXPECT_EQ(W().bytes_sent(), expect);

  // A request destroyed before completion waits for it.
  std::vector<float> g(100, 1.0f);
  { auto r = W().iallreduce_sum(g.data(), 100); }
  EXPECT_EQ(g[99], static_cast<float>(R()));
}

TEST(Communicator, BytesSentOfAllreduceAndBroadcast) {
  // From kRingMinBytes on, what the ring sends; below, the library's all-reduce counted as a ring.
  const int64_t big = static_cast<int64_t>(kRingMinBytes / sizeof(float)) + 1000;
  std::vector<float> f(static_cast<size_t>(big), 1.0f);
  W().reset_bytes_sent();
  W().allreduce_sum(f.data(), big);
  EXPECT_EQ(W().bytes_sent(), ring_bytes_sent(big, me(), R()));
  W().reset_bytes_sent();
  W().allreduce_sum(f.data(), 1000);
  EXPECT_EQ(W().bytes_sent(), static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4.0 * 1000 + 0.5));
  W().reset_bytes_sent();
  W().broadcast(f.data(), 400, 0);
  EXPECT_EQ(W().bytes_sent(), me() == 0 ? 400u : 0u);
  W().reset_bytes_sent();
  EXPECT_EQ(W().bytes_sent(), 0u);
}

TEST(Communicator, BadLayoutsAreRefused) {
  // Every rank makes the same mistake, so each one throws before calling MPI.
  std::vector<uint8_t> buf(64, 0);
  const ByteLayout one_short =
      ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(R()) + 1, 1));
  const ByteLayout ok = ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(R()), 1));
  EXPECT_THROW(W().alltoallv(buf.data(), one_short, buf.data() + 32, ok), Error);
  EXPECT_THROW(W().alltoallv(buf.data(), ok, buf.data() + 32, one_short), Error);
  EXPECT_THROW(W().ialltoallv(buf.data(), one_short, buf.data() + 32, ok), Error);
  EXPECT_THROW(W().allgatherv(buf.data(), 2, buf.data() + 32, ok), Error);  // sends 2, layout 1
  EXPECT_THROW(W().allgatherv(buf.data(), 1, buf.data() + 32, one_short), Error);
  EXPECT_THROW(W().iallgatherv(buf.data(), 1, buf.data() + 32, one_short), Error);
  EXPECT_THROW(W().broadcast(buf.data(), 4, R()), Error);
  EXPECT_THROW(W().broadcast(buf.data(), 4, -1), Error);
  EXPECT_THROW(W().gatherv(buf.data(), 1, buf.data() + 32, ok, R()), Error);
  // Still usable afterwards.
  W().allgatherv(buf.data(), 1, buf.data() + 32, ok);
  W().barrier();
}

TEST(Communicator, ByteLayoutPacked) {
  const ByteLayout l = ByteLayout::packed({3, 0, 5});
  EXPECT_EQ(l.displs, (std::vector<size_t>{0, 3, 3}));
  EXPECT_EQ(l.total(), 8u);
}

TEST(LocalCommunicator, CopiesAndRefusesOtherSizes) {
  auto c = make_local_communicator();
  EXPECT_EQ(c->size(), 1);
  EXPECT_STREQ(c->backend(), "local");
  uint8_t src[4] = {1, 2, 3, 4}, dst[6] = {0, 0, 0, 0, 0, 0};
  ByteLayout sl = ByteLayout::packed({4}), rl;
  rl.counts = {4};
  rl.displs = {2};
  c->alltoallv(src, sl, dst, rl);
  EXPECT_EQ(dst[2], 1);
  EXPECT_EQ(dst[5], 4);
  const ByteLayout two = ByteLayout::packed({2, 2});
  EXPECT_THROW(c->alltoallv(src, two, dst, two), Error);
  EXPECT_THROW(c->allgatherv(src, 3, dst, sl), Error);
  EXPECT_THROW(c->broadcast(src, 4, 1), Error);
  float f[2] = {1.5f, -2.0f};
  c->allreduce_sum(f, 2);
  EXPECT_EQ(f[0], 1.5f);
  EXPECT_EQ(c->bytes_sent(), 0u);
}

TEST(Communicator, NodeCommunicatorHoldsTheRanksOfThisNode) {
  // The test runs every rank on one machine: the node is the world, in world order.
  const std::unique_ptr<Communicator> node = make_mpi_node_communicator();
  EXPECT_EQ(node->size(), R());
  EXPECT_EQ(node->rank(), me());
  int64_t one = 1;
  node->allreduce_sum_i64(&one, 1);
  EXPECT_EQ(one, R());
}

TEST(ErrorPath, LauncherEnvironmentGivesRankAndSize) {
  EXPECT_EQ(launcher_rank(), me());
  EXPECT_EQ(launcher_world_size(), R());
}

TEST(ErrorPath, FailedMpiCallNamesTheCallTheCallersLineAndTheRank) {
  // A root out of range fails on every rank before anything is sent (MPI_ERRORS_RETURN).
  char byte = 0;
  const int line = __LINE__ + 2;
  try {
    INT4DDP_MPI_CHECK(MPI_Bcast(&byte, 1, MPI_BYTE, R() + 3, MPI_COMM_WORLD));
    ADD_FAILURE() << "MPI_Bcast with root " << R() + 3 << " succeeded";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("MPI error in MPI_Bcast(&byte, 1, MPI_BYTE, R() + 3, MPI_COMM_WORLD)"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("test_comm_communicator.cpp:" + std::to_string(line)), std::string::npos)
        << what;
    EXPECT_NE(what.find("on rank " + std::to_string(me()) + ":"), std::string::npos) << what;
  }
  W().barrier();
}
}  // namespace
}  // namespace int4ddp::comm
