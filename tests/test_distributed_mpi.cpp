// DataParallel's step agreement under mpirun (label mpi, 1-4 ranks): the votes summed exactly and
// the loss added in rank order, the same bits on every rank, in one collective.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/common/error.h"
#include "mpi_test.h"
#include "src/config/config.h"
#include "src/train/distributed.h"

namespace int4ddp::train {
namespace {

Config mpi_config() {
  Config c;
  c.comm.backend = CommBackend::kMpi;
  return c;
}

// Rank r's loss: values whose sum depends on the order of the additions.
float loss_of(int r) { return r % 2 == 0 ? 1.0e8f : 0.3f + static_cast<float>(r); }

TEST(DataParallelMpi, AgreeSumsVotesAndAddsTheLossInRankOrder) {
  DataParallel dp(mpi_config());
  const int n = dp.world(), me = dp.rank();
  ASSERT_EQ(n, test::world().size());
  int64_t votes[4] = {me, 1, int64_t{1} << (40 + me), -3 * me};
  const float got = dp.agree(votes, 4, loss_of(me));
  float want = loss_of(0);
  int64_t sum0 = 0, sum2 = 0, sum3 = 0;
  for (int r = 0; r < n; ++r) {
    if (r > 0) want = want + loss_of(r);
    sum0 += r;
    sum2 += int64_t{1} << (40 + r);
    sum3 += -3 * r;
  }
  EXPECT_EQ(votes[0], sum0);
  EXPECT_EQ(votes[1], n);
  EXPECT_EQ(votes[2], sum2);
  EXPECT_EQ(votes[3], sum3);
  uint32_t got_bits, want_bits;
  std::memcpy(&got_bits, &got, 4);
  std::memcpy(&want_bits, &want, 4);
  EXPECT_EQ(got_bits, want_bits) << got << " vs " << want;
  // No votes at all: only the loss.
  EXPECT_EQ(dp.agree(nullptr, 0, 2.0f), 2.0f * static_cast<float>(n));
  EXPECT_THROW(dp.agree(votes, -1, 0.0f), Error);
}

}  // namespace
}  // namespace int4ddp::train
