// comm.mode auto (comm/auto_mode.h): the per-bucket decision as a pure function of the measured
// link and codec bandwidth and the bucket size, checked against the model written out by hand, and
// the start-up measurement on one rank (label cpu; the multi-rank agreement is in
// test_comm_auto_mode.cpp under mpirun).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "comm/auto_mode.h"
#include "comm/communicator.h"
#include "comm/two_shot.h"
#include "kernels/common/error.h"
#include "src/config/config.h"

namespace int4ddp::comm {
namespace {

constexpr int64_t kG = 512;
// A 1 Gbit/s network link, and a codec of a few Gfloat/s.
const MeasuredBandwidth kNetwork{125e6, 50e-6, 1e9, 2e9};
// Shared memory: 10 GB/s, the same codec.
const MeasuredBandwidth kSharedMemory{10e9, 2e-6, 1e9, 2e9};

TEST(AutoMode, SlowLinkPicksInt4WithTheModelledTimes) {
  const int64_t n = int64_t{1} << 21;  // an 8 MiB bucket
  const ModeChoice c = choose_bucket_mode(kNetwork, n, 4, kG);
  EXPECT_EQ(c.bits, 4);
  const double hops = 6 * 50e-6;
  EXPECT_NEAR(c.fp32_seconds, hops + 1.5 * 4.0 * n / 125e6, 1e-12);
  EXPECT_NEAR(c.int_seconds,
              hops + 1.5 * (n / 2.0 + 4.0 * n / kG) / 125e6 + 1.25 * n / 1e9 + 2.0 * n / 2e9,
              1e-12);
  EXPECT_EQ(c.reason.rfind("int4:", 0), 0u) << c.reason;
  EXPECT_NE(c.reason.find("125 MB/s"), std::string::npos) << c.reason;
}

TEST(AutoMode, SharedMemoryPicksFp32) {
  const ModeChoice c = choose_bucket_mode(kSharedMemory, int64_t{1} << 21, 4, kG);
  EXPECT_EQ(c.bits, 32);
  EXPECT_LT(c.fp32_seconds, c.int_seconds);
  EXPECT_EQ(c.reason.rfind("fp32:", 0), 0u) << c.reason;
}

TEST(AutoMode, OneRankEmptyBucketsAndTiesGoToFp32) {
  const ModeChoice one = choose_bucket_mode(MeasuredBandwidth{}, 1000, 1, kG);  // nothing measured
  EXPECT_EQ(one.bits, 32);
  EXPECT_EQ(choose_bucket_mode(kNetwork, 0, 4, kG).bits, 32);  // both cost the hops only
}

TEST(AutoMode, OneCrossoverAsTheLinkGetsFaster) {
  int switches = 0, prev = 4;
  for (double link = 1e6; link < 1e12; link *= 1.25) {
    MeasuredBandwidth m = kNetwork;
    m.link_bytes_per_s = link;
    const int bits = choose_bucket_mode(m, 1 << 20, 4, kG).bits;
    switches += bits != prev;
    prev = bits;
  }
  EXPECT_EQ(switches, 1);
  EXPECT_EQ(prev, 32);
}

TEST(AutoMode, ASlowCodecMakesFp32WinOnTheSameLink) {
  MeasuredBandwidth m = kNetwork;
  m.encode_floats_per_s = m.decode_floats_per_s = 1e6;
  EXPECT_EQ(choose_bucket_mode(m, 1 << 20, 4, kG).bits, 32);
  EXPECT_EQ(choose_bucket_mode(kNetwork, 1 << 20, 4, kG).bits, 4);
  EXPECT_EQ(choose_bucket_mode(kNetwork, 1 << 20, 2, kG, 8).bits, 8);
}

TEST(AutoMode, BadMeasurementsAndArgumentsAreRefused) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (MeasuredBandwidth m :
       {MeasuredBandwidth{0, 0, 1e9, 1e9}, MeasuredBandwidth{nan, 0, 1e9, 1e9},
        MeasuredBandwidth{1e8, -1, 1e9, 1e9}, MeasuredBandwidth{1e8, 0, inf, 1e9},
        MeasuredBandwidth{1e8, 0, 1e9, 0}})
    EXPECT_THROW(choose_bucket_mode(m, 1000, 2, kG), Error);
  EXPECT_THROW(choose_bucket_mode(kNetwork, 1000, 0, kG), Error);
  EXPECT_THROW(choose_bucket_mode(kNetwork, -1, 2, kG), Error);
  EXPECT_THROW(choose_bucket_mode(kNetwork, 1000, 2, kG, 1), Error);
  EXPECT_THROW(choose_bucket_mode(kNetwork, 1000, 2, 0), Error);
}

// Per level: 2 nodes x 2 ranks, shared memory within a node and a 1 Gbit/s link between nodes.
LevelBandwidth two_by_two(const MeasuredBandwidth& cross) {
  LevelBandwidth m;
  m.hierarchical = true;
  m.node = kSharedMemory;
  m.cross = cross;
  m.world_ranks = 4;
  m.nodes = 2;
  m.ranks_per_node = 2;
  return m;
}

TEST(AutoModeLevels, TheCrossLevelDecidesOnItsShareOverTheNodes) {
  const int64_t n = (int64_t{1} << 21) + 3 * kG + 7;  // shares of 2049 and 2048 + 1 partial blocks
  const int64_t share = chunk_range(n, kG, 2, 0).count();
  ASSERT_GT(share, n / 2);  // local index 0's share is the larger one
  const ModeChoice c = choose_level_mode(two_by_two(kNetwork), n, kG);
  const ModeChoice cross = choose_bucket_mode(kNetwork, share, 2, kG);
  EXPECT_EQ(c.bits, 4);
  EXPECT_EQ(c.bits, cross.bits);
  EXPECT_EQ(c.fp32_seconds, cross.fp32_seconds);
  EXPECT_EQ(c.int_seconds, cross.int_seconds);
  EXPECT_EQ(c.reason.rfind("node level fp32", 0), 0u) << c.reason;
  EXPECT_NE(
      c.reason.find("cross level (2 nodes, share of " + std::to_string(share) + " floats) int4:"),
      std::string::npos)
      << c.reason;
  EXPECT_NE(c.reason.find("link 1e+04 MB/s"), std::string::npos) << c.reason;  // the node's link
}

TEST(AutoModeLevels, AFastLinkBetweenNodesPicksFp32ThereAndFlatFiguresDecideAsBefore) {
  EXPECT_EQ(choose_level_mode(two_by_two(kSharedMemory), 1 << 21, kG).bits, 32);
  // The cross level is judged by its own link, not the node's: slow between nodes -> int4 even
  // though the node level is shared memory.
  EXPECT_EQ(choose_level_mode(two_by_two(kNetwork), 1 << 21, kG).bits, 4);
  LevelBandwidth flat;
  flat.flat = kNetwork;
  flat.world_ranks = 4;
  const ModeChoice f = choose_level_mode(flat, 1 << 21, kG);
  const ModeChoice b = choose_bucket_mode(kNetwork, 1 << 21, 4, kG);
  EXPECT_EQ(f.bits, b.bits);
  EXPECT_EQ(f.reason, b.reason);
  LevelBandwidth bad = two_by_two(kNetwork);
  bad.ranks_per_node = 0;
  EXPECT_THROW(choose_level_mode(bad, 1000, kG), Error);
  EXPECT_THROW(choose_level_mode(two_by_two(kNetwork), -1, kG), Error);
}

TEST(AutoMode, MeasurementOnOneRankTimesTheCodecOnly) {
  auto local = make_local_communicator();
  const MeasuredBandwidth m = measure_bandwidth(*local, 1 << 16, 4, kG);
  EXPECT_EQ(m.link_bytes_per_s, 0.0);
  EXPECT_GT(m.encode_floats_per_s, 0.0);
  EXPECT_GT(m.decode_floats_per_s, 0.0);
  EXPECT_TRUE(std::isfinite(m.encode_floats_per_s));
  EXPECT_THROW(measure_bandwidth(*local, 0, 4, kG), Error);
}

TEST(AutoMode, ConfigAcceptsAuto) {
  Config c;
  apply_override(c, "comm.mode=auto");
  EXPECT_EQ(c.comm.mode, CommMode::kAuto);
  EXPECT_THROW(apply_override(c, "comm.mode=automatic"), Error);
}

}  // namespace
}  // namespace int4ddp::comm
