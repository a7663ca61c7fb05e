// The bucket plan (comm::plan_buckets, label cpu): the layout every BucketEngine path (host,
// staged, device) shares: launch order, arena ranges, compressed and plain tensors, in-place
// ranges, the comm.mode auto hook, fp32 mode and bad input. Also the engine's refusal of a device
// arena in a build without CUDA. And the result checks of the communication thread (the mean's
// division and the non-finite counts).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "comm/buckets.h"
#include "comm/communicator.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

// A, B, [gap], C1, C2, D, E in forward order (the layout of tests/test_comm_buckets.cpp): with a
// bucket of 4096 floats and a threshold of 1000, reverse order gives E | D C2 C1 B | A.
const std::vector<Segment> kTensors = {{0, 3000},    {3000, 100}, {3110, 2000},
                                       {5110, 1900}, {7010, 50},  {7060, 5000}};

BucketConfig config() {
  BucketConfig c;
  c.bucket_mb = 4096.0 * 4 / 1048576.0;
  c.small_tensor_threshold = 1000;
  c.compress.block_size = 64;
  return c;
}

std::vector<int64_t> offsets(const std::vector<Segment>& s) {
  std::vector<int64_t> o;
  for (const Segment& x : s) o.push_back(x.offset);
  return o;
}

TEST(BucketPlan, ReverseOrderRangesAndInPlace) {
  const std::vector<BucketPlan> p = plan_buckets(config(), kTensors);
  ASSERT_EQ(p.size(), 3u);
  // Bucket 0: E alone (larger than a bucket), compressed, in place.
  EXPECT_EQ(p[0].begin, 7060);
  EXPECT_EQ(p[0].end, 12060);
  EXPECT_EQ(offsets(p[0].compressed), (std::vector<int64_t>{7060}));
  EXPECT_TRUE(p[0].plain.empty());
  EXPECT_EQ(p[0].in_place, 7060);
  // Bucket 1: B, C1, C2, D in arena order; C1 C2 tile [3110, 7010): in place there.
  EXPECT_EQ(p[1].begin, 3000);
  EXPECT_EQ(p[1].end, 7060);
  EXPECT_EQ(offsets(p[1].compressed), (std::vector<int64_t>{3110, 5110}));
  EXPECT_EQ(offsets(p[1].plain), (std::vector<int64_t>{3000, 7010}));
  EXPECT_EQ(p[1].ncompressed, 3900);
  EXPECT_EQ(p[1].nplain, 150);
  EXPECT_EQ(p[1].in_place, 3110);
  EXPECT_EQ(p[1].plain_in_place, -1);  // B and D do not touch
  EXPECT_EQ(p[0].plain_in_place, -1);  // no plain tensors
  // Bucket 2: A.
  EXPECT_EQ(p[2].begin, 0);
  EXPECT_EQ(p[2].end, 3000);
  EXPECT_EQ(p[2].in_place, 0);
  // The order of the caller's list does not matter.
  std::vector<Segment> shuffled = {kTensors[3], kTensors[0], kTensors[5],
                                   kTensors[1], kTensors[4], kTensors[2]};
  const std::vector<BucketPlan> q = plan_buckets(config(), shuffled);
  ASSERT_EQ(q.size(), p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_EQ(q[i].begin, p[i].begin);
    EXPECT_EQ(offsets(q[i].compressed), offsets(p[i].compressed));
  }
}

TEST(BucketPlan, CompressedTensorsSplitByAPlainOneAreNotInPlace) {
  // C1, D, C2: a plain tensor between the two compressed ones of bucket 1.
  const std::vector<Segment> t = {{0, 3000},  {3000, 100},  {3110, 2000},
                                  {5110, 50}, {5160, 1900}, {7060, 5000}};
  const std::vector<BucketPlan> p = plan_buckets(config(), t);
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(offsets(p[1].compressed), (std::vector<int64_t>{3110, 5160}));
  EXPECT_EQ(p[1].in_place, -1);
  EXPECT_EQ(p[1].end, 7060);
}

TEST(BucketPlan, Fp32ModeAndAutoHookSendBucketsUncompressed) {
  BucketConfig c = config();
  c.compress.bits = kFp32Bits;
  const std::vector<BucketPlan> f = plan_buckets(c, kTensors);
  for (const BucketPlan& b : f) {
    EXPECT_EQ(b.ncompressed, 0);
    EXPECT_EQ(b.in_place, -1);
  }
  // The fp32 all-reduce runs in place where the bucket's tensors tile one range: E and A, not
  // B C1 C2 D (the gap after B).
  ASSERT_EQ(f.size(), 3u);
  EXPECT_EQ(f[0].plain_in_place, 7060);
  EXPECT_EQ(f[1].plain_in_place, -1);
  EXPECT_EQ(f[2].plain_in_place, 0);
  c = config();
  std::vector<int64_t> asked;
  c.choose_bits = [&](int64_t count) {
    asked.push_back(count);
    return count == 3900 ? kFp32Bits : 4;  // bucket 1 uncompressed
  };
  const std::vector<BucketPlan> p = plan_buckets(c, kTensors);
  EXPECT_EQ(asked, (std::vector<int64_t>{5000, 3900, 3000}));  // once per bucket, launch order
  EXPECT_EQ(p[1].ncompressed, 0);
  EXPECT_EQ(p[1].nplain, 4050);
  EXPECT_EQ(offsets(p[1].plain), (std::vector<int64_t>{3000, 3110, 5110, 7010}));
  EXPECT_EQ(p[1].in_place, -1);
  EXPECT_EQ(p[0].ncompressed, 5000);
}

TEST(BucketPlan, TiledOffset) {
  EXPECT_EQ(tiled_offset({}), -1);
  EXPECT_EQ(tiled_offset({{7, 3}}), 7);
  EXPECT_EQ(tiled_offset({{7, 3}, {10, 5}, {15, 1}}), 7);
  EXPECT_EQ(tiled_offset({{7, 3}, {11, 5}}), -1);  // a gap
  EXPECT_EQ(tiled_offset({{7, 3}, {9, 5}}), -1);   // an overlap
}

// divide_and_count_nonfinite: the same bits as x[i] / n element by element, and exactly the NaN
// and +-Inf results counted (also those that only the division makes: none; and subnormals,
// +-0, FLT_MAX stay finite).
TEST(BucketResult, DivideAndCountNonFiniteIsThePlainDivisionAndIsFinite) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float fmax = std::numeric_limits<float>::max();
  const float sub = std::numeric_limits<float>::denorm_min();
  std::vector<float> x = {1.0f, -0.0f, 0.0f, nan, inf, -inf, fmax, -fmax, sub, 3.0f, 7.5f, -nan};
  for (int i = 0; i < 40; ++i) x.push_back(0.37f * static_cast<float>(i) - 5.0f);
  x.push_back(inf);
  for (const float n : {1.0f, 3.0f, 4.0f}) {
    std::vector<float> got = x;
    const int64_t bad = divide_and_count_nonfinite(got.data(), static_cast<int64_t>(got.size()), n);
    int64_t want_bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float want = x[i] / n;
      EXPECT_EQ(0, std::memcmp(&want, &got[i], sizeof want)) << "element " << i << ", n " << n;
      want_bad += !std::isfinite(want);
    }
    EXPECT_EQ(bad, 5);
    EXPECT_EQ(bad, want_bad);
    EXPECT_EQ(count_nonfinite(got.data(), static_cast<int64_t>(got.size())), 5);
    EXPECT_EQ(count_nonfinite(x.data(), 3), 0);
    EXPECT_EQ(count_nonfinite(x.data(), 0), 0);
  }
}

TEST(BucketPlan, BadInputNamesTheKey) {
  BucketConfig c = config();
  c.bucket_mb = 0;
  EXPECT_THROW(plan_buckets(c, kTensors), Error);
  c = config();
  c.compress.block_size = 8192;  // larger than a bucket
  try {
    plan_buckets(c, kTensors);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("comm.block_size"), std::string::npos) << e.what();
  }
  EXPECT_THROW(plan_buckets(config(), {{-1, 5}}), Error);
}

#ifndef INT4DDP_HAVE_CUDA
TEST(BucketPlan, DeviceArenaNeedsACudaBuild) {
  auto comm = make_local_communicator();
  std::vector<float> arena(12060);
  try {
    BucketEngine e(*comm, config(), GradArena{arena.data(), true, nullptr}, kTensors);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos) << e.what();
  }
}
#endif

}  // namespace
}  // namespace int4ddp::comm
