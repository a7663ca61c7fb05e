// comm/ under mpirun (label mpi; ctest runs this with 1, 2, 3 and 4 ranks): the MPI Communicator's
// collectives, the two-shot compressed all-reduce and the gradient buckets.
//
// Verifiable data in the nccl-tests manner: every rank's input is a deterministic function of
// (seed, rank, index), so each rank computes every other rank's input and the exact mean locally.
// Exactness tests use grid-valued inputs whose compressed mean is exact by construction (see
// GridInput); error bounds on random data are separate tests with bounds derived from the step
// sizes. Every test makes the same collective calls on every rank, failed or not.
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

#include "comm/buckets.h"
#include "comm/communicator.h"
#include "comm/two_shot.h"
#include "kernels/common/error.h"
#include "kernels/quant/format.h"
#include "kernels/quant/policy.h"
#include "mpi_test.h"

namespace int4ddp::comm {
namespace {

Communicator& W() { return test::world(); }
int R() { return W().size(); }
int me() { return W().rank(); }

// ---- deterministic data -----------------------------------------------------------------------
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
uint64_t key(uint64_t seed, int rank, int64_t i) {
  return splitmix64(seed * 0x100000001b3ull ^
                    splitmix64(static_cast<uint64_t>(rank) << 40 ^ static_cast<uint64_t>(i)));
}
// Uniform in [-1, 1).
float uniform(uint64_t seed, int rank, int64_t i) {
  return static_cast<float>(static_cast<double>(key(seed, rank, i) >> 11) * 0x1.0p-52 - 1.0);
}
// Random gradient-like values: block-dependent magnitude (2^-6 .. 2^2) and a rare outlier.
float random_grad(uint64_t seed, int rank, int64_t i, int64_t block) {
  const float scale = std::ldexp(1.0f, static_cast<int>((i / block) % 9) - 6);
  const uint64_t k = key(seed + 7, rank, i);
  const float outlier = (k % 997 == 0) ? 8.0f : 1.0f;
  return scale * outlier * uniform(seed, rank, i);
}

uint64_t fnv1a(const void* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

// True on every rank iff every rank holds the same n bytes at p (a hash per rank, all-gathered).
bool same_on_all_ranks(const void* p, size_t n) {
  const uint64_t h = fnv1a(p, n);
  std::vector<uint64_t> all(static_cast<size_t>(R()));
  W().allgatherv(&h, sizeof h, all.data(),
                 ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(R()), sizeof h)));
  return std::all_of(all.begin(), all.end(), [&](uint64_t x) { return x == all[0]; });
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

int64_t count_wrong(const std::vector<float>& got, const std::vector<float>& want) {
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += same_bits(got[i], want[i]) ? 0 : 1;
  return wrong;
}

// ---- grid-valued inputs whose two-shot mean is exact ------------------------------------------
// The exact mean is m_i = k_i * d_b with an integer code k_i and a power-of-two step d_b per block
// b of G elements; the first element of every non-zero block is the largest code (+-L), every
// fifth block is all zero. Rank r holds c_r * m_i with c_r = 1 + (2r - (N-1)) / 32 (a dyadic
// rational, sum over ranks N), so:
//   - rank r's block max is c_r L d_b, its step (c_r L d_b) / L = c_r d_b exactly, and its codes
//     are k_i exactly (x / step is an exact integer);
//   - the owner's FP32 sum of the dequantized versions is exactly N m_i (small dyadic numbers),
//     / N gives m_i exactly, and requantizing m_i (block max L d_b) gives the codes k_i again.
// Stochastic rounding: floor(k + u) in float equals k for every u in [0, 1) only when k + u is
// exact or the clamp undoes a round-up, i.e. for k in {-1, 0, L} (for k = 1, u = 1 - 2^-24 rounds
// 1 + u up to 2.0). The stochastic cases use only those codes.
constexpr uint64_t kGridSeed = 1234;

float rank_factor(int r, int ranks) {
  return 1.0f + static_cast<float>(2 * r - (ranks - 1)) / 32.0f;  // > 0 for up to 16 ranks
}

std::vector<float> grid_mean(int64_t n, int64_t G, int bits, bool stochastic, uint64_t seed) {
  const int L = quant::levels(bits);
  std::vector<float> m(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / G;
    const float d = std::ldexp(1.0f, static_cast<int>(b % 7) - 4);
    const uint64_t k = key(seed, 99, i);
    int code;
    if (b % 5 == 4) {
      code = 0;
    } else if (i % G == 0) {
      code = stochastic ? L : ((b % 2) ? -L : L);
    } else if (stochastic) {
      const int allowed[3] = {-1, 0, L};
      code = allowed[k % 3];
    } else {
      code = static_cast<int>(k % static_cast<uint64_t>(2 * L + 1)) - L;
    }
    m[static_cast<size_t>(i)] = static_cast<float>(code) * d;
  }
  return m;
}

std::vector<float> grid_input(const std::vector<float>& mean, int r, int ranks) {
  std::vector<float> x(mean);
  const float c = rank_factor(r, ranks);
  for (float& v : x) v *= c;
  return x;
}

CompressConfig exact_config(int bits, int64_t G, quant::Rounding rounding) {
  CompressConfig cfg;
  cfg.bits = bits;
  cfg.block_size = G;
  cfg.rounding = rounding;
  cfg.policy.kind = quant::PolicyKind::kMinMax;
  cfg.seed = 42;
  return cfg;
}

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
  std::vector<float> f(1000, 1.0f);
  W().reset_bytes_sent();
  W().allreduce_sum(f.data(), 1000);
  EXPECT_EQ(W().bytes_sent(), static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4000.0 + 0.5));
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

// =================================================================================================
// chunk_range and the wire format
// =================================================================================================

TEST(ChunkRange, CoversEverythingAlignedAndBalanced) {
  for (int ranks = 1; ranks <= 9; ++ranks)
    for (int64_t G : {2, 64, 512})
      for (int64_t n :
           {int64_t{0}, int64_t{1}, int64_t{7}, G - 1, G, G + 1, 3 * G + 5, int64_t{10007}}) {
        int64_t at = 0, min_blocks = std::numeric_limits<int64_t>::max(), max_blocks = 0;
        for (int r = 0; r < ranks; ++r) {
          const ChunkRange c = chunk_range(n, G, ranks, r);
          EXPECT_EQ(c.begin, at) << n << " " << G << " " << ranks << " " << r;
          EXPECT_GE(c.count(), 0);
          EXPECT_TRUE(c.begin % G == 0 || c.begin == n);
          at = c.end;
          const int64_t blocks = (c.count() + G - 1) / G;
          min_blocks = std::min(min_blocks, blocks);
          max_blocks = std::max(max_blocks, blocks);
        }
        EXPECT_EQ(at, n);
        EXPECT_LE(max_blocks - min_blocks, 1);
      }
  EXPECT_THROW(chunk_range(10, 2, 2, 2), Error);
  EXPECT_THROW(chunk_range(10, 2, 0, 0), Error);
}

TEST(ChunkRange, MessageLayoutAndModelledWireBytes) {
  constexpr size_t kStats = sizeof(quant::QuantStats);
  EXPECT_EQ(kStats, 32u);  // part of the wire format
  const MessageLayout empty = message_layout(4, 0, 64);  // an empty chunk: the stats record only
  EXPECT_EQ(empty.num_scales, 0);
  EXPECT_EQ(empty.stats_at, 0u);
  EXPECT_EQ(empty.bytes, kStats);
  const MessageLayout m4 = message_layout(4, 65, 64);
  EXPECT_EQ(m4.scales_at, 33u);
  EXPECT_EQ(m4.num_scales, 2);
  EXPECT_EQ(m4.stats_at, 33u + 2 * 4);
  EXPECT_EQ(m4.bytes, 33u + 2 * 4 + kStats);
  EXPECT_EQ(message_layout(8, 65, 64).bytes, 65u + 2 * 4 + kStats);
  EXPECT_DOUBLE_EQ(modelled_wire_bytes(4, 1 << 20, 512, 4), 1.5 * ((1 << 19) + 4.0 * (1 << 11)));
  EXPECT_DOUBLE_EQ(modelled_wire_bytes(32, 1000, 512, 2), 4000.0);
  EXPECT_DOUBLE_EQ(modelled_wire_bytes(4, 1000, 512, 1), 0.0);
}

// =================================================================================================
// Two-shot: exact results on grid-valued inputs
// =================================================================================================

struct ExactCase {
  int bits;
  quant::Rounding rounding;
  int64_t G, n;
  std::string name() const {
    return "bits " + std::to_string(bits) +
           (rounding == quant::Rounding::kStochastic ? " stochastic" : " nearest") + " G " +
           std::to_string(G) + " n " + std::to_string(n);
  }
};

std::vector<ExactCase> exact_cases() {
  std::vector<ExactCase> cases;
  for (int bits : {4, 8})
    for (auto rounding : {quant::Rounding::kNearest, quant::Rounding::kStochastic})
      for (int64_t G : {64, 512})
        for (int64_t n :
             {int64_t{0}, int64_t{1}, int64_t{7}, G - 1, G + 1, 3 * G + 5, int64_t{10007}})
          cases.push_back({bits, rounding, G, n});
  return cases;
}

TEST(TwoShot, ExactOnGridValuedInputs) {
  for (const ExactCase& c : exact_cases()) {
    SCOPED_TRACE(c.name());
    const bool stoch = c.rounding == quant::Rounding::kStochastic;
    TwoShotAllreduce ts(W(), exact_config(c.bits, c.G, c.rounding), c.n, 3);
    for (uint32_t step = 0; step < 2; ++step) {  // error feedback stays zero: step 2 exact too
      const std::vector<float> mean = grid_mean(c.n, c.G, c.bits, stoch, kGridSeed + step);
      std::vector<float> x = grid_input(mean, me(), R());
      const BucketStats st = ts.run(x.data(), step);
      ts.commit(true);
      EXPECT_EQ(count_wrong(x, mean), 0) << "step " << step;
      EXPECT_TRUE(same_on_all_ranks(x.data(), x.size() * sizeof(float)));
      EXPECT_EQ(st.nonfinite, 0);
      EXPECT_EQ(st.clipped, 0);
      EXPECT_EQ(st.count, c.n * (R() + 1));  // every element quantized by every rank, then once
    }
  }
}

TEST(TwoShot, ExactWithDefaultConfigFirstStep) {
  // Defaults: INT4, G = 512, stochastic, both error feedbacks, lbt (gamma 1 on the first step).
  const int64_t n = 3 * 512 + 5;
  CompressConfig cfg;
  TwoShotAllreduce ts(W(), cfg, n, 0);
  EXPECT_EQ(ts.gamma(), 1.0f);
  const std::vector<float> mean = grid_mean(n, 512, 4, true, kGridSeed);
  std::vector<float> x = grid_input(mean, me(), R());
  ts.run(x.data(), 0);
  EXPECT_EQ(count_wrong(x, mean), 0);
}

TEST(TwoShot, FewerBlocksThanRanksAndWireBytes) {
  // n = 1 and n = G: one block, chunks of ranks >= 1 are empty; their messages are trailers only.
  for (int64_t n : {int64_t{1}, int64_t{64}}) {
    const std::vector<float> mean = grid_mean(n, 64, 4, false, kGridSeed);
    std::vector<float> x = grid_input(mean, me(), R());
    TwoShotAllreduce ts(W(), exact_config(4, 64, quant::Rounding::kNearest), n, 0);
    const BucketStats st = ts.run(x.data(), 0);
    EXPECT_EQ(count_wrong(x, mean), 0) << n;
    // Rank 0 sends its chunk 0 to no one but itself (alltoall) ... and everyone the owner's chunk.
    uint64_t a2a = 0;
    for (int j = 0; j < R(); ++j)
      if (j != me()) a2a += message_layout(4, chunk_range(n, 64, R(), j).count(), 64).bytes;
    uint64_t gathered = 0;
    for (int j = 0; j < R(); ++j)
      gathered += message_layout(4, chunk_range(n, 64, R(), j).count(), 64).bytes;
    EXPECT_EQ(st.wire_bytes,
              a2a + static_cast<uint64_t>(static_cast<double>(gathered) * (R() - 1) / R() + 0.5));
  }
}

TEST(TwoShot, WireBytesMatchThePrediction) {
  // n divisible by N G: every chunk equal, so wire bytes = prediction + 2 (N-1) trailers exactly
  // (up to the rounding of the all-gather's (N-1)/N share).
  for (int bits : {4, 8}) {
    const int64_t G = 512, n = int64_t{R()} * G * 8;
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = random_grad(5, me(), i, G);
    TwoShotAllreduce ts(W(), exact_config(bits, G, quant::Rounding::kStochastic), n, 0);
    W().reset_bytes_sent();
    const BucketStats st = ts.run(x.data(), 0);
    EXPECT_EQ(W().bytes_sent(), st.wire_bytes);
    const double predicted =
        modelled_wire_bytes(bits, n, G, R()) + 2.0 * (R() - 1) * sizeof(quant::QuantStats);
    EXPECT_NEAR(static_cast<double>(st.wire_bytes), predicted, 1.0) << "bits " << bits;
  }
}

// =================================================================================================
// Two-shot: error bounds on random data, identical results on every rank
// =================================================================================================

// Per-element bound on |two-shot mean - exact mean| with gamma = 1 (no clipping): rank r's
// quantization errs by less than its block step d_r (stochastic) or at most d_r / 2 (nearest); the
// owner's requantization by its step d' = max|block of the dequantized mean| / L, which is at most
// (max|exact mean over the block| + the worker part) / L. kSlack (relative to the bound) covers
// FP32 rounding of the steps, of x / d + u, of the sums and of the division by N (a few ulps).
constexpr double kSlack = 1e-5;

TEST(TwoShot, ErrorBoundOnRandomData) {
  for (int bits : {4, 8})
    for (auto rounding : {quant::Rounding::kNearest, quant::Rounding::kStochastic})
      for (int64_t G : {64, 512})
        for (int64_t n : {G + 1, int64_t{10007}}) {
          SCOPED_TRACE((ExactCase{bits, rounding, G, n}.name()));
          const uint64_t seed = 100 + static_cast<uint64_t>(bits * 7 + G + n);
          const double L = quant::levels(bits);
          const double per_quant = rounding == quant::Rounding::kStochastic ? 1.0 : 0.5;
          std::vector<std::vector<float>> inputs(static_cast<size_t>(R()));
          for (int r = 0; r < R(); ++r) {
            inputs[static_cast<size_t>(r)].resize(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i)
              inputs[static_cast<size_t>(r)][static_cast<size_t>(i)] = random_grad(seed, r, i, G);
          }
          std::vector<double> mean(static_cast<size_t>(n), 0.0);
          for (int r = 0; r < R(); ++r)
            for (int64_t i = 0; i < n; ++i)
              mean[static_cast<size_t>(i)] +=
                  inputs[static_cast<size_t>(r)][static_cast<size_t>(i)];
          for (double& m : mean) m /= R();

          std::vector<float> x = inputs[static_cast<size_t>(me())];
          TwoShotAllreduce ts(W(), exact_config(bits, G, rounding), n, 1);
          ts.run(x.data(), 7);
          int64_t over = 0;
          double err2 = 0, ref2 = 0, worst = 0;
          for (int64_t b0 = 0; b0 < n; b0 += G) {
            const int64_t b1 = std::min(n, b0 + G);
            double worker = 0, mean_max = 0;
            for (int r = 0; r < R(); ++r) {
              double mx = 0;
              for (int64_t i = b0; i < b1; ++i)
                mx = std::max(
                    mx, std::fabs(double{inputs[static_cast<size_t>(r)][static_cast<size_t>(i)]}));
              worker += per_quant * mx / L;
            }
            worker /= R();
            for (int64_t i = b0; i < b1; ++i)
              mean_max = std::max(mean_max, std::fabs(mean[static_cast<size_t>(i)]));
            const double bound = (worker + per_quant * (mean_max + worker) / L) * (1.0 + kSlack);
            for (int64_t i = b0; i < b1; ++i) {
              const double e = std::fabs(x[static_cast<size_t>(i)] - mean[static_cast<size_t>(i)]);
              over += e > bound;
              worst = std::max(worst, e / bound);
              err2 += e * e;
              ref2 += mean[static_cast<size_t>(i)] * mean[static_cast<size_t>(i)];
            }
          }
          EXPECT_EQ(over, 0) << "worst error / bound " << worst;
          EXPECT_TRUE(same_on_all_ranks(x.data(), x.size() * sizeof(float)));
          // Gross-failure check of the norm: well below 1 even for INT4 with outlier blocks.
          EXPECT_LT(std::sqrt(err2 / ref2), 0.5);
        }
}

TEST(TwoShot, StochasticRoundingDependsOnRankStepAndBucket) {
  // Different keys give different codes for off-grid data; the same keys the same codes.
  const int64_t n = 4096;
  std::vector<float> base(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    base[static_cast<size_t>(i)] = random_grad(77, 0, i, 512);  // same on every rank
  auto run = [&](uint32_t bucket, uint32_t step) {
    std::vector<float> x = base;
    CompressConfig cfg = exact_config(4, 512, quant::Rounding::kStochastic);
    cfg.worker_error_feedback = cfg.server_error_feedback = false;
    TwoShotAllreduce ts(W(), cfg, n, bucket);
    ts.run(x.data(), step);
    return x;
  };
  const std::vector<float> a = run(0, 0), b = run(0, 0), c = run(1, 0), d = run(0, 1);
  EXPECT_EQ(count_wrong(a, b), 0);
  EXPECT_GT(count_wrong(a, c), n / 10);
  EXPECT_GT(count_wrong(a, d), n / 10);
}

// =================================================================================================
// Two-shot: error feedback removes the accumulated bias
// =================================================================================================

// Runs T steps of the same input with nearest rounding and returns, for every element, the
// average of the outputs over the steps (double).
std::vector<double> average_output(const std::vector<float>& input, bool worker_ef, bool server_ef,
                                   int T) {
  CompressConfig cfg = exact_config(4, 64, quant::Rounding::kNearest);
  cfg.worker_error_feedback = worker_ef;
  cfg.server_error_feedback = server_ef;
  TwoShotAllreduce ts(W(), cfg, static_cast<int64_t>(input.size()), 5);
  std::vector<double> avg(input.size(), 0.0);
  for (int t = 0; t < T; ++t) {
    std::vector<float> x = input;
    ts.run(x.data(), static_cast<uint32_t>(t));
    ts.commit(true);
    for (size_t i = 0; i < x.size(); ++i) avg[i] += x[i];
  }
  for (double& a : avg) a /= T;
  return avg;
}

// INT4, G = 64, n = 3G + 5: the first element of every block is kPin = 7 d (exact, pins every
// block's step at d = 1/8 on every rank and at the owner); the others are off the grid.
constexpr float kPin = 0.875f;
constexpr double kStep = 0.125;
constexpr int64_t kEfCount = 3 * 64 + 5;
constexpr int kEfSteps = 50;

double max_error(const std::vector<double>& avg, const std::vector<double>& mean) {
  double worst = 0;
  for (size_t i = 0; i < avg.size(); ++i) worst = std::max(worst, std::fabs(avg[i] - mean[i]));
  return worst;
}
double min_error_off_pin(const std::vector<double>& avg, const std::vector<double>& mean) {
  double least = 1e30;
  for (size_t i = 0; i < avg.size(); ++i)
    if (i % 64 != 0) least = std::min(least, std::fabs(avg[i] - mean[i]));
  return least;
}

// Sum over T steps telescopes: sum_t out_t = T mean + mean_r(e_w,0 - e_w,T) + e_s,0 - e_s,T, so the
// average is off by at most (|e_w| + |e_s|) / T <= (d/2 + d/2) / T with nearest rounding.
// kEfFloat: FP32 rounding of v = g + e over T steps (a few ulps of 0.3 each).
constexpr double kEfFloat = 1e-5;

TEST(TwoShotErrorFeedback, BothRemoveTheBiasOfRankDependentInputs) {
  // Rank r: (0.3 + 0.01 r + 0.001 (i % 7)) * kPin -> code 2 on every rank (2.1 .. 2.35 steps):
  // without error feedback the mean is 2 d, a bias of at least 0.1 d.
  auto value = [](int r, int64_t i) {
    return i % 64 == 0 ? kPin : static_cast<float>((0.3 + 0.01 * r + 0.001 * (i % 7)) * kPin);
  };
  std::vector<float> input(kEfCount);
  std::vector<double> mean(kEfCount, 0.0);
  for (int64_t i = 0; i < kEfCount; ++i) {
    input[static_cast<size_t>(i)] = value(me(), i);
    for (int r = 0; r < R(); ++r) mean[static_cast<size_t>(i)] += double{value(r, i)} / R();
  }
  const std::vector<double> with = average_output(input, true, true, kEfSteps);
  const std::vector<double> without = average_output(input, false, false, kEfSteps);
  EXPECT_LE(max_error(with, mean), kStep / kEfSteps + kEfFloat);
  EXPECT_GE(min_error_off_pin(without, mean), 0.09 * kStep);
}

TEST(TwoShotErrorFeedback, WorkerSideAloneRemovesTheWorkerBias) {
  // The same off-grid input on every rank: all ranks send the same codes, so the owner's mean is on
  // the grid and requantizes exactly; only the worker's rounding biases the result.
  std::vector<float> input(kEfCount);
  std::vector<double> mean(kEfCount);
  for (int64_t i = 0; i < kEfCount; ++i) {
    input[static_cast<size_t>(i)] =
        i % 64 == 0 ? kPin : static_cast<float>((0.3 + 0.001 * (i % 7)) * kPin);
    mean[static_cast<size_t>(i)] = input[static_cast<size_t>(i)];
  }
  const std::vector<double> worker = average_output(input, true, false, kEfSteps);
  const std::vector<double> none = average_output(input, false, false, kEfSteps);
  EXPECT_LE(max_error(worker, mean), 0.5 * kStep / kEfSteps + kEfFloat);
  EXPECT_GE(min_error_off_pin(none, mean), 0.09 * kStep);
}

TEST(TwoShotErrorFeedback, ServerSideAloneRemovesTheOwnersBias) {
  // Inputs on the worker grid (codes 3 on rank 0, 2 elsewhere): the workers are exact, the mean
  // (2 + 1/N) d is off the grid for N >= 2 and the owner's nearest requantization gives 2 d.
  std::vector<float> input(kEfCount);
  std::vector<double> mean(kEfCount);
  for (int64_t i = 0; i < kEfCount; ++i) {
    const bool pin = i % 64 == 0;
    input[static_cast<size_t>(i)] = pin ? kPin : static_cast<float>((me() == 0 ? 3 : 2) * kStep);
    mean[static_cast<size_t>(i)] = pin ? kPin : (2.0 + 1.0 / R()) * kStep;
  }
  const std::vector<double> server = average_output(input, false, true, kEfSteps);
  const std::vector<double> none = average_output(input, false, false, kEfSteps);
  EXPECT_LE(max_error(server, mean), 0.5 * kStep / kEfSteps + kEfFloat);
  if (R() > 1) {
    EXPECT_GE(min_error_off_pin(none, mean), 0.2 * kStep);
  } else {
    EXPECT_EQ(max_error(none, mean), 0.0);  // one rank: the mean is the (exact) input
  }
}

TEST(TwoShotErrorFeedback, SwitchesDecideWhatIsSaved) {
  const int64_t n = 1000;
  for (int w = 0; w < 2; ++w)
    for (int s = 0; s < 2; ++s) {
      CompressConfig cfg = exact_config(4, 64, quant::Rounding::kNearest);
      cfg.worker_error_feedback = w;
      cfg.server_error_feedback = s;
      TwoShotAllreduce ts(W(), cfg, n, 0);
      const std::vector<uint8_t> blob = ts.save_state();
      uint64_t header[4];
      std::memcpy(header, blob.data(), sizeof header);
      EXPECT_EQ(header[2], w ? static_cast<uint64_t>(n) : 0u);
      EXPECT_EQ(header[3], s ? static_cast<uint64_t>(chunk_range(n, 64, R(), me()).count()) : 0u);
    }
}

// =================================================================================================
// Two-shot: commit, state, lbt, non-finite input, fp32 mode
// =================================================================================================

std::vector<float> random_input(uint64_t seed, int64_t n, int64_t G) {
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = random_grad(seed, me(), i, G);
  return x;
}

TEST(TwoShotState, CommitFalseLeavesErrorFeedbackAndGammaUnchanged) {
  const int64_t n = 5000;
  CompressConfig cfg;  // lbt, stochastic, both error feedbacks
  cfg.block_size = 64;
  TwoShotAllreduce ts(W(), cfg, n, 2);
  std::vector<float> x = random_input(1, n, 64);
  ts.run(x.data(), 0);
  ts.commit(true);
  const std::vector<uint8_t> s1 = ts.save_state();
  const float g1 = ts.gamma();
  EXPECT_LT(g1, 1.0f);  // nothing clipped at gamma 1: the sign rule lowered it

  x = random_input(2, n, 64);
  ts.run(x.data(), 1);
  ts.commit(false);
  EXPECT_EQ(ts.save_state(), s1);
  EXPECT_EQ(ts.gamma(), g1);

  x = random_input(2, n, 64);
  ts.run(x.data(), 1);
  ts.commit(true);
  EXPECT_NE(ts.save_state(), s1);
  ts.commit(true);  // a second commit without a run changes nothing
  EXPECT_TRUE(same_on_all_ranks(&g1, sizeof g1));
}

TEST(TwoShotState, SaveLoadRoundTripContinuesIdentically) {
  const int64_t n = 3000;
  CompressConfig cfg;
  cfg.block_size = 64;
  TwoShotAllreduce a(W(), cfg, n, 4), b(W(), cfg, n, 4);
  for (uint32_t step = 0; step < 3; ++step) {
    std::vector<float> x = random_input(10 + step, n, 64);
    a.run(x.data(), step);
    a.commit(true);
  }
  b.load_state(a.save_state());
  EXPECT_EQ(b.gamma(), a.gamma());
  std::vector<float> xa = random_input(20, n, 64), xb = xa;
  a.run(xa.data(), 3);
  b.run(xb.data(), 3);
  a.commit(true);
  b.commit(true);
  EXPECT_EQ(count_wrong(xa, xb), 0);
  EXPECT_EQ(a.save_state(), b.save_state());

  // Mismatched blobs are refused.
  TwoShotAllreduce other_count(W(), cfg, n + 1, 4);
  EXPECT_THROW(other_count.load_state(a.save_state()), Error);
  CompressConfig no_ef = cfg;
  no_ef.worker_error_feedback = false;
  TwoShotAllreduce other_ef(W(), no_ef, n, 4);
  EXPECT_THROW(other_ef.load_state(a.save_state()), Error);
  std::vector<uint8_t> truncated = a.save_state();
  truncated.resize(truncated.size() - 3);
  EXPECT_THROW(b.load_state(truncated), Error);
  EXPECT_THROW(b.load_state({1, 2, 3}), Error);
}

TEST(TwoShotState, LbtGammaIsIdenticalOnEveryRankAndFollowsTheSignRule) {
  const int64_t n = 4096;
  CompressConfig cfg;
  cfg.block_size = 64;
  cfg.policy.eta = 0.25f;  // big steps: gamma 1 -> 0.75 (nothing clipped) -> 1 (many clipped)
  TwoShotAllreduce ts(W(), cfg, n, 0);
  const double target = quant::lbt_target(4, cfg.policy.alpha);
  int ups = 0, downs = 0;
  for (uint32_t step = 0; step < 6; ++step) {
    std::vector<float> x = random_input(30 + step, n, 64);
    const float before = ts.gamma();
    const BucketStats st = ts.run(x.data(), step);
    EXPECT_EQ(st.gamma, before);
    ts.commit(true);
    const double R_clip = st.clip_fraction();
    const int s = (R_clip > target) - (R_clip < target);
    const float expect = std::clamp(before + cfg.policy.eta * static_cast<float>(s),
                                    quant::kMinGamma, quant::kMaxGamma);
    EXPECT_EQ(ts.gamma(), expect) << "step " << step << " R " << R_clip;
    ups += ts.gamma() > before;
    downs += ts.gamma() < before;
    const float g = ts.gamma();
    EXPECT_TRUE(same_on_all_ranks(&g, sizeof g));
    EXPECT_TRUE(same_on_all_ranks(&st.clipped, sizeof st.clipped));
  }
  EXPECT_GT(ups, 0);
  EXPECT_GT(downs, 0);
}

TEST(TwoShotState, NonFiniteInOneRankIsSeenByEveryRank) {
  const int64_t n = 2000;
  CompressConfig cfg;
  cfg.block_size = 64;
  TwoShotAllreduce ts(W(), cfg, n, 0);
  const std::vector<uint8_t> before = ts.save_state();
  std::vector<float> x = random_input(3, n, 64);
  if (me() == R() - 1) x[5] = std::numeric_limits<float>::quiet_NaN();
  if (me() == 0) x[1500] = std::numeric_limits<float>::infinity();
  const BucketStats st = ts.run(x.data(), 0);
  EXPECT_EQ(st.nonfinite, 2);
  ts.commit(false);
  EXPECT_EQ(ts.save_state(), before);
  // A clean step afterwards works.
  x = random_input(4, n, 64);
  EXPECT_EQ(ts.run(x.data(), 1).nonfinite, 0);
  ts.commit(true);
}

TEST(TwoShotFp32, ExactMeanOfIntegerInputs) {
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{10007}}) {
    CompressConfig cfg;
    cfg.bits = 32;
    TwoShotAllreduce ts(W(), cfg, n, 0);
    std::vector<float> x(static_cast<size_t>(n)), want(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      x[static_cast<size_t>(i)] = static_cast<float>(i % 17 - 8 + me());
      int64_t sum = 0;
      for (int r = 0; r < R(); ++r) sum += i % 17 - 8 + r;
      want[static_cast<size_t>(i)] = static_cast<float>(sum) / static_cast<float>(R());
    }
    W().reset_bytes_sent();
    const BucketStats st = ts.run(x.data(), 0);
    ts.commit(true);
    EXPECT_EQ(count_wrong(x, want), 0) << n;
    EXPECT_EQ(st.wire_bytes, static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4.0 * n + 0.5));
    EXPECT_EQ(ts.gamma(), 1.0f);
  }
}

TEST(TwoShotConfig, BadConfigsAreRefused) {
  auto make = [](auto edit) {
    CompressConfig c;
    edit(c);
    return TwoShotAllreduce(W(), c, 100, 0);
  };
  EXPECT_THROW(make([](CompressConfig& c) { c.bits = 1; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) { c.bits = 16; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) { c.block_size = 63; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) { c.block_size = 0; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) { c.policy.kind = quant::PolicyKind::kMse; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) {
                 c.policy.fixed_gamma = 0.0f;
                 c.policy.kind = quant::PolicyKind::kFixed;
               }),
               Error);
  EXPECT_NO_THROW(make([](CompressConfig& c) { c.bits = 8; }));
}

// =================================================================================================
// BucketEngine
// =================================================================================================

// A fake model's gradient arena in forward order, with a gap that belongs to no tensor. With a
// bucket of 4096 floats (1/64 MiB) and a small-tensor threshold of 1000, reverse order gives:
//   bucket 0: E                       (compressed; larger than a bucket on its own)
//   bucket 1: D, C2, C1, B            (C2 C1 compressed, D B plain)
//   bucket 2: A                       (compressed)
struct Arena {
  // A, B, [gap], C1, C2, D, E
  std::vector<Segment> segs = {{0, 3000},    {3000, 100}, {3110, 2000},
                               {5110, 1900}, {7010, 50},  {7060, 5000}};
  int64_t size = 12060;
  int64_t gap_begin = 3100, gap_end = 3110;
};
constexpr float kGapValue = 12345.0f;
constexpr double kBucketMb = 4096.0 * 4 / 1048576.0;

BucketConfig bucket_config(bool overlap) {
  BucketConfig c;
  c.bucket_mb = kBucketMb;
  c.small_tensor_threshold = 1000;
  c.overlap = overlap;
  c.compress.block_size = 64;
  c.compress.seed = 9;
  return c;
}

bool is_plain(const Segment& s) { return s.count < 1000; }

// Gradient value of element i on rank r at step t: random off-grid values for compressed tensors,
// integers for the plain ones (their fp32 mean is then exact in any summation order).
float arena_value(int r, int64_t i, uint32_t t, bool plain) {
  if (plain) return static_cast<float>(static_cast<int64_t>(key(t, r, i) % 41) - 20);
  return random_grad(1000 + t, r, i, 64);
}

// One step as a trainer runs it: the arena starts as NaN (not yet computed), backward writes the
// tensors last to first and reports each with ready_from, then finish(). A short pause after each
// ready_from lets the communication thread take what was queued, so a bucket queued before all its
// tensors are written copies NaN (and the test fails) instead of winning the race by chance.
StepCommStats backward_step(BucketEngine& e, std::vector<float>& arena, const Arena& a, uint32_t t,
                            const std::function<float(const Segment&, int64_t)>& value) {
  std::fill(arena.begin(), arena.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(arena.begin() + a.gap_begin, arena.begin() + a.gap_end, kGapValue);
  e.begin_step(t);
  for (auto it = a.segs.rbegin(); it != a.segs.rend(); ++it) {
    for (int64_t i = it->offset; i < it->offset + it->count; ++i)
      arena[static_cast<size_t>(i)] = value(*it, i);
    e.ready_from(it->offset);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return e.finish();
}

// Both layouts of bucket 1: C1 C2 adjacent (the two-shot runs in place in the arena) and C1 D C2
// (a plain tensor between them: the two-shot runs on a staging copy). Same result either way.
class BucketEngineLayouts : public ::testing::TestWithParam<bool> {};

TEST_P(BucketEngineLayouts, MatchesPerBucketTwoShotAndFp32Mean) {
  Arena a;
  if (GetParam())
    a.segs = {{0, 3000}, {3000, 100}, {3110, 2000}, {5110, 50}, {5160, 1900}, {7060, 5000}};
  const Segment c1 = a.segs[2], c2 = GetParam() ? a.segs[4] : a.segs[3];
  std::vector<float> arena(static_cast<size_t>(a.size));
  const BucketConfig cfg = bucket_config(true);
  BucketEngine engine(W(), cfg, arena.data(), a.segs);
  ASSERT_EQ(engine.num_buckets(), 3);
  EXPECT_EQ(engine.num_compressed_buckets(), 3);

  // The reference: one TwoShot per bucket (same ids and config) on the concatenated compressed
  // tensors of each bucket in arena order, and the exact mean of the plain ones.
  const std::vector<std::vector<Segment>> compressed = {{a.segs[5]}, {c1, c2}, {a.segs[0]}};
  std::vector<std::unique_ptr<TwoShotAllreduce>> refs;
  for (uint32_t b = 0; b < 3; ++b) {
    int64_t count = 0;
    for (const Segment& s : compressed[b]) count += s.count;
    refs.push_back(std::make_unique<TwoShotAllreduce>(W(), cfg.compress, count, b));
  }

  for (uint32_t t = 0; t < 3; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    const StepCommStats st = backward_step(engine, arena, a, t, [&](const Segment& s, int64_t i) {
      return arena_value(me(), i, t, is_plain(s));
    });
    engine.commit(true);

    std::vector<float> want(static_cast<size_t>(a.size));
    for (uint32_t b = 0; b < 3; ++b) {
      std::vector<float> staging;
      for (const Segment& s : compressed[b])
        for (int64_t i = s.offset; i < s.offset + s.count; ++i)
          staging.push_back(arena_value(me(), i, t, false));
      refs[b]->run(staging.data(), t);
      refs[b]->commit(true);
      size_t k = 0;
      for (const Segment& s : compressed[b])
        for (int64_t i = s.offset; i < s.offset + s.count; ++i)
          want[static_cast<size_t>(i)] = staging[k++];
    }
    for (const Segment& s : a.segs) {
      if (!is_plain(s)) continue;
      for (int64_t i = s.offset; i < s.offset + s.count; ++i) {
        int64_t sum = 0;
        for (int r = 0; r < R(); ++r) sum += static_cast<int64_t>(arena_value(r, i, t, true));
        want[static_cast<size_t>(i)] = static_cast<float>(sum) / static_cast<float>(R());
      }
    }
    for (int64_t i = a.gap_begin; i < a.gap_end; ++i) want[static_cast<size_t>(i)] = kGapValue;
    EXPECT_EQ(count_wrong(arena, want), 0);
    EXPECT_TRUE(same_on_all_ranks(arena.data(), arena.size() * sizeof(float)));

    EXPECT_EQ(st.compressed_elements, 3000 + 2000 + 1900 + 5000);
    EXPECT_EQ(st.plain_elements, 150);
    EXPECT_EQ(st.gammas.size(), 3u);
    EXPECT_EQ(st.nonfinite, 0);
    EXPECT_EQ(st.quantized, (3000 + 2000 + 1900 + 5000) * int64_t{R() + 1});
    if (R() > 1) {
      EXPECT_GT(st.wire_bytes, 0u);
      EXPECT_GT(st.compression_ratio, 4.0);
    } else {
      EXPECT_EQ(st.wire_bytes, 0u);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(InPlaceAndStaged, BucketEngineLayouts, ::testing::Values(false, true));

TEST(BucketEngine, OverlapOnAndOffGiveTheSameResults) {
  const Arena a;
  std::vector<float> on(static_cast<size_t>(a.size)), off(static_cast<size_t>(a.size));
  BucketEngine e_on(W(), bucket_config(true), on.data(), a.segs);
  BucketEngine e_off(W(), bucket_config(false), off.data(), a.segs);
  for (uint32_t t = 0; t < 3; ++t) {
    auto value = [&](const Segment& s, int64_t i) { return arena_value(me(), i, t, is_plain(s)); };
    backward_step(e_on, on, a, t, value);
    e_on.commit(true);
    backward_step(e_off, off, a, t, value);
    e_off.commit(true);
    EXPECT_EQ(count_wrong(on, off), 0) << "step " << t;
  }
  EXPECT_EQ(e_on.save_state(), e_off.save_state());
}

TEST(BucketEngine, ExactOnGridValuedInputsInEveryMode) {
  // Codes -L, 0, L only (one step d for the whole arena): whatever the bucketing, every block's max
  // is L d c_r, so the compressed parts are exact (see grid_mean); plain parts are small dyadic
  // numbers whose fp32 mean is exact.
  const Arena a;
  for (int bits : {4, 8, 32})
    for (auto rounding : {quant::Rounding::kNearest, quant::Rounding::kStochastic}) {
      SCOPED_TRACE("bits " + std::to_string(bits) + " rounding " +
                   std::to_string(static_cast<int>(rounding)));
      const int L = quant::levels(bits == 32 ? 8 : bits);
      BucketConfig cfg = bucket_config(true);
      cfg.compress.bits = bits;
      cfg.compress.rounding = rounding;
      std::vector<float> arena(static_cast<size_t>(a.size));
      BucketEngine engine(W(), cfg, arena.data(), a.segs);
      EXPECT_EQ(engine.num_compressed_buckets(), bits == 32 ? 0 : 3);
      auto code = [&](int64_t i) {
        const int allowed_stoch[2] = {0, L}, allowed_near[3] = {-L, 0, L};
        const uint64_t k = key(55, 0, i);
        return rounding == quant::Rounding::kStochastic ? allowed_stoch[k % 2]
                                                        : allowed_near[k % 3];
      };
      const float d = 0.0625f;
      backward_step(engine, arena, a, 0, [&](const Segment&, int64_t i) {
        return rank_factor(me(), R()) * static_cast<float>(code(i)) * d;
      });
      std::vector<float> want(static_cast<size_t>(a.size), std::numeric_limits<float>::quiet_NaN());
      for (const Segment& s : a.segs)
        for (int64_t i = s.offset; i < s.offset + s.count; ++i)
          want[static_cast<size_t>(i)] = static_cast<float>(code(i)) * d;
      for (int64_t i = a.gap_begin; i < a.gap_end; ++i) want[static_cast<size_t>(i)] = kGapValue;
      EXPECT_EQ(count_wrong(arena, want), 0);
    }
}

TEST(BucketEngine, StateRoundTripAndMismatch) {
  const Arena a;
  std::vector<float> x(static_cast<size_t>(a.size)), y(static_cast<size_t>(a.size));
  BucketEngine e1(W(), bucket_config(true), x.data(), a.segs);
  BucketEngine e2(W(), bucket_config(true), y.data(), a.segs);
  auto value = [&](uint32_t t) {
    return [t](const Segment& s, int64_t i) { return arena_value(me(), i, t, is_plain(s)); };
  };
  for (uint32_t t = 0; t < 2; ++t) {
    backward_step(e1, x, a, t, value(t));
    e1.commit(true);
  }
  e2.load_state(e1.save_state());
  backward_step(e1, x, a, 2, value(2));
  backward_step(e2, y, a, 2, value(2));
  EXPECT_EQ(count_wrong(x, y), 0);

  BucketConfig bigger = bucket_config(true);
  bigger.bucket_mb = 1.0;  // one bucket
  BucketEngine e3(W(), bigger, y.data(), a.segs);
  EXPECT_EQ(e3.num_buckets(), 1);
  EXPECT_THROW(e3.load_state(e1.save_state()), Error);
  std::vector<uint8_t> truncated = e1.save_state();
  truncated.pop_back();
  EXPECT_THROW(e2.load_state(truncated), Error);
}

TEST(BucketEngine, NonFiniteGradientIsReportedAndCommitFalseKeepsState) {
  const Arena a;
  std::vector<float> x(static_cast<size_t>(a.size));
  BucketEngine e(W(), bucket_config(true), x.data(), a.segs);
  backward_step(e, x, a, 0,
                [&](const Segment& s, int64_t i) { return arena_value(me(), i, 0, is_plain(s)); });
  e.commit(true);
  const std::vector<uint8_t> before = e.save_state();
  const StepCommStats st = backward_step(e, x, a, 1, [&](const Segment& s, int64_t i) {
    return (me() == R() - 1 && i == 8000) ? std::numeric_limits<float>::infinity()
                                          : arena_value(me(), i, 1, is_plain(s));
  });
  EXPECT_EQ(st.nonfinite, 1);
  e.commit(false);
  EXPECT_EQ(e.save_state(), before);
}

TEST(BucketEngine, BadConfigsAndMisuseAreRefused) {
  const Arena a;
  std::vector<float> x(static_cast<size_t>(a.size));
  auto make = [&](auto edit) {
    BucketConfig c = bucket_config(true);
    edit(c);
    BucketEngine e(W(), c, x.data(), a.segs);
  };
  EXPECT_THROW(make([](BucketConfig& c) { c.bucket_mb = 1e-4; }), Error);  // 26 floats < G = 64
  EXPECT_THROW(make([](BucketConfig& c) { c.compress.bits = 1; }), Error);
  EXPECT_THROW(make([](BucketConfig& c) { c.compress.bits = 9; }), Error);
  EXPECT_THROW(make([](BucketConfig& c) { c.compress.block_size = 33; }), Error);
  EXPECT_THROW(make([](BucketConfig& c) { c.bucket_mb = 0; }), Error);
  EXPECT_THROW(make([](BucketConfig& c) { c.small_tensor_threshold = -1; }), Error);
  EXPECT_NO_THROW(make([](BucketConfig& c) {  // fp32 mode has no blocks: any bucket size works
    c.bucket_mb = 1e-4;
    c.compress.bits = 32;
  }));

  BucketEngine e(W(), bucket_config(true), x.data(), a.segs);
  e.begin_step(0);
  EXPECT_THROW(e.begin_step(1), Error);
  std::fill(x.begin(), x.end(), 1.0f);
  e.finish();
  EXPECT_EQ(x[0], 1.0f);
}

TEST(BucketEngine, Fp32ModeIsThePlainMean) {
  const Arena a;
  std::vector<float> x(static_cast<size_t>(a.size));
  BucketConfig cfg = bucket_config(true);
  cfg.compress.bits = 32;
  BucketEngine e(W(), cfg, x.data(), a.segs);
  EXPECT_EQ(e.num_compressed_buckets(), 0);
  const StepCommStats st = backward_step(
      e, x, a, 0, [&](const Segment&, int64_t i) { return arena_value(me(), i, 0, true); });
  int64_t wrong = 0;
  for (const Segment& s : a.segs)
    for (int64_t i = s.offset; i < s.offset + s.count; ++i) {
      int64_t sum = 0;
      for (int r = 0; r < R(); ++r) sum += static_cast<int64_t>(arena_value(r, i, 0, true));
      wrong +=
          !same_bits(x[static_cast<size_t>(i)], static_cast<float>(sum) / static_cast<float>(R()));
    }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(st.compressed_elements, 0);
  EXPECT_EQ(st.plain_elements, 12050);
  EXPECT_NEAR(st.compression_ratio, 1.0, 1e-3);  // per-bucket rounding of the ring bytes
}

}  // namespace
}  // namespace int4ddp::comm
