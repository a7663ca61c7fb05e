// comm.mode auto under mpirun (label mpi, 1-4 ranks): the start-up measurement gives every rank the
// same figures, so every rank takes the same per-bucket decision.
#include <gtest/gtest.h>

#include <cmath>

#include "comm/auto_mode.h"
#include "comm_test.h"

namespace int4ddp::comm {
namespace {

TEST(AutoModeMeasurement, EveryRankGetsTheSameFiguresAndDecisions) {
  const MeasuredBandwidth m = measure_bandwidth(W(), 1 << 16, 4, 512);
  EXPECT_TRUE(same_on_all_ranks(&m, sizeof m));
  EXPECT_GT(m.encode_floats_per_s, 0.0);
  EXPECT_GT(m.decode_floats_per_s, 0.0);
  if (R() > 1) {
    EXPECT_GT(m.link_bytes_per_s, 0.0);
    EXPECT_TRUE(std::isfinite(m.link_bytes_per_s));
    EXPECT_GE(m.hop_latency_s, 0.0);
  }
  int bits[3];
  for (int k = 0; k < 3; ++k)
    bits[k] = choose_bucket_mode(m, int64_t{1000} << (5 * k), R(), 512).bits;
  EXPECT_TRUE(same_on_all_ranks(bits, sizeof bits));
}

}  // namespace
}  // namespace int4ddp::comm
