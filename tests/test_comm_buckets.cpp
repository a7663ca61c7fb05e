// The gradient buckets (BucketEngine) under mpirun (label mpi, 1-4 ranks): bucketing of a fake
// arena, agreement with one two-shot per bucket and with the fp32 mean, overlap, exactness on
// grid-valued inputs, checkpoint state, non-finite gradients and misuse.
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
#include "comm/two_shot.h"
#include "comm_test.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

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

// result_nonfinite counts the NaN/Inf of the all-reduced arena (what the trainer would otherwise
// scan for), in int4 and fp32 mode: none on finite inputs; a NaN in a plain tensor on one rank
// makes that element's mean NaN on every rank; in fp32 mode FLT_MAX on every rank overflows the
// sum.
TEST(BucketEngine, ResultNonFiniteCountsTheNonFiniteMeans) {
  const Arena a;
  for (const int bits : {4, 32}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    std::vector<float> x(static_cast<size_t>(a.size));
    BucketConfig cfg = bucket_config(true);
    cfg.compress.bits = bits;
    BucketEngine e(W(), cfg, x.data(), a.segs);
    auto scan = [&] {
      int64_t n = 0;
      for (const Segment& s : a.segs)
        for (int64_t i = s.offset; i < s.offset + s.count; ++i)
          n += !std::isfinite(x[static_cast<size_t>(i)]);
      return n;
    };
    StepCommStats st = backward_step(e, x, a, 0, [&](const Segment& s, int64_t i) {
      return arena_value(me(), i, 0, is_plain(s));
    });
    EXPECT_EQ(st.result_nonfinite, 0);
    EXPECT_EQ(scan(), 0);
    e.commit(true);
    const float fmax = std::numeric_limits<float>::max();
    st = backward_step(e, x, a, 1, [&](const Segment& s, int64_t i) {
      if (i == 3001 && me() == R() - 1) return std::numeric_limits<float>::quiet_NaN();  // B
      if (i == 7011 && bits == 32) return fmax;  // D, every rank
      return arena_value(me(), i, 1, is_plain(s));
    });
    e.commit(false);
    EXPECT_EQ(st.result_nonfinite, scan());
    EXPECT_EQ(st.result_nonfinite, 1 + (bits == 32 && R() > 1 ? 1 : 0));
  }
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
