// The two-shot compressed all-reduce under mpirun (label mpi, 1-4 ranks): chunking and message
// layout, exact results on grid-valued inputs (tests/verifiable.h), error bounds on random data
// (separate tests, bounds derived from the step sizes), error feedback, commit and checkpoint
// state, lbt, non-finite inputs, fp32 mode and config errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/ring_allreduce.h"
#include "comm/two_shot.h"
#include "comm_test.h"
#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/format.h"
#include "kernels/quant/policy.h"

namespace int4ddp::comm {
namespace {

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
  EXPECT_EQ(kStats, 32u);                                // part of the wire format
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

TEST(TwoShotPlan, ChunksLayoutsKeysAndCommit) {
  // 3 G + 5 elements of G = 64 over 3 ranks, seen from rank 1: blocks 2 + 1 + 1.
  const int64_t n = 3 * 64 + 5;
  TwoShotPlan plan(exact_config(4, 64, quant::Rounding::kNearest), n, 7, 3, 1);
  EXPECT_EQ(plan.chunk(0).count(), 128);
  EXPECT_EQ(plan.own().begin, 128);
  EXPECT_EQ(plan.own().end, 192);
  EXPECT_EQ(plan.chunk(2).count(), 5);
  for (int j = 0; j < 3; ++j) {
    EXPECT_EQ(plan.send_layout().counts[static_cast<size_t>(j)], plan.message(j).bytes);
    EXPECT_EQ(plan.recv_layout().counts[static_cast<size_t>(j)], plan.own_message().bytes);
  }
  EXPECT_EQ(plan.scale_offset(1), 2);
  EXPECT_EQ(plan.scale_offset(2), 3);
  EXPECT_EQ(plan.total_scales(), 4);
  EXPECT_EQ(plan.worker_ef_size(), static_cast<size_t>(n));
  EXPECT_EQ(plan.server_ef_size(), 64u);

  const quant::QuantParams p = plan.step_params(9);
  EXPECT_EQ(p.key.step, 9u);
  EXPECT_EQ(p.gamma, 1.0f);
  EXPECT_EQ(plan.worker_params(p, 2).key.stream, kStreamsPerRank + 2);
  EXPECT_EQ(plan.worker_params(p, 2).key.tensor_id, 14u);
  EXPECT_EQ(plan.owner_params(p).key.stream, kStreamsPerRank + 1);
  EXPECT_EQ(plan.owner_params(p).key.tensor_id, 15u);

  EXPECT_FALSE(plan.commit(true));  // nothing pending
  quant::QuantStats global;
  global.count = 600;
  global.clipped = 3;
  BucketStats st;
  plan.finish_run(global, 1234, st);
  EXPECT_EQ(st.count, 600);
  EXPECT_EQ(st.clipped, 3);
  EXPECT_EQ(st.wire_bytes, 1234u);
  EXPECT_TRUE(plan.commit(true));  // adopt the new error feedback
  EXPECT_FALSE(plan.commit(true));
  plan.finish_run(global, 0, st);
  EXPECT_FALSE(plan.commit(false));  // dropped
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

// A block-scope policy (topk, mse) saturates each block at its clip before the codec: the result
// is bit-identical on every rank and the clip counts are those of the block rule. (Which policy
// gives the smaller error of the mean is measured on recorded gradients by replay_buckets: on
// synthetic heavy tails without error feedback the clipped outliers can dominate the error.)
TEST(TwoShot, BlockPoliciesSaturateIdenticallyOnEveryRank) {
  const int64_t G = 512, n = 40 * G + 100;
  std::vector<float> x0(static_cast<size_t>(n));
  std::mt19937_64 rng(77 + static_cast<uint64_t>(me()));
  std::student_t_distribution<double> student(2.0);  // heavy tails: outliers per block
  for (float& v : x0) v = static_cast<float>(student(rng));
  std::vector<float> mean = x0;
  W().allreduce_sum(mean.data(), n);
  for (float& v : mean) v /= static_cast<float>(R());
  auto rel_err = [&](quant::PolicyKind kind, int64_t* clipped) {
    CompressConfig c;
    c.block_size = G;
    c.policy.kind = kind;
    c.policy.topk = 4;
    c.worker_error_feedback = c.server_error_feedback = false;
    TwoShotAllreduce ts(W(), c, n, 3);
    std::vector<float> x = x0;
    const BucketStats st = ts.run(x.data(), 5);
    *clipped = st.clipped;
    EXPECT_TRUE(same_on_all_ranks(x.data(), x.size() * sizeof(float)));
    double e2 = 0, m2 = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      e2 += (double{x[i]} - mean[i]) * (double{x[i]} - mean[i]);
      m2 += double{mean[i]} * mean[i];
    }
    return std::sqrt(e2 / m2);
  };
  int64_t clipped_minmax = 0, clipped_topk = 0, clipped_mse = 0;
  const double e_minmax = rel_err(quant::PolicyKind::kMinMax, &clipped_minmax);
  const double e_topk = rel_err(quant::PolicyKind::kTopK, &clipped_topk);
  const double e_mse = rel_err(quant::PolicyKind::kMse, &clipped_mse);
  EXPECT_EQ(clipped_minmax, 0);
  // Every block of every worker quantization clips exactly 4 (continuous data: no ties; the 100
  // elements of the last block are more than 4). The owners' requantizations clip at most 4 per
  // block: the mean of dequantized values has ties at its top (1 rank: all at +-7 steps).
  const int64_t blocks = (n + G - 1) / G;
  EXPECT_GE(clipped_topk, 4 * blocks * R());
  EXPECT_LE(clipped_topk, 4 * blocks * (R() + 1));
  EXPECT_GT(clipped_mse, 0);
  for (double e : {e_minmax, e_topk, e_mse}) EXPECT_LT(e, 1.0);  // gross failure only
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
  const int64_t ring_min = static_cast<int64_t>(kRingMinBytes / sizeof(float));
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{10007}, ring_min + 10007}) {
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
    // fp32 mode runs the ring (the library's all-reduce below kRingMinBytes, counted as a ring)
    EXPECT_EQ(st.wire_bytes, ring_pays_off(n)
                                 ? ring_bytes_sent(n, me(), R())
                                 : static_cast<uint64_t>(2.0 * (R() - 1) / R() * 4.0 * n + 0.5));
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
  EXPECT_THROW(make([](CompressConfig& c) { c.policy.kind = quant::PolicyKind::kDsgc; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) {
                 c.policy.kind = quant::PolicyKind::kTopK;
                 c.policy.topk = 0;
               }),
               Error);
  EXPECT_THROW(make([](CompressConfig& c) {
                 c.policy.fixed_gamma = 0.0f;
                 c.policy.kind = quant::PolicyKind::kFixed;
               }),
               Error);
  EXPECT_THROW(make([](CompressConfig& c) { c.pipeline_chunks = -1; }), Error);
  EXPECT_THROW(make([](CompressConfig& c) { c.pipeline_chunks = kMaxPipelinePieces + 1; }), Error);
  EXPECT_NO_THROW(make([](CompressConfig& c) { c.bits = 8; }));
}

// =================================================================================================
// Pipelined two-shot: pieces of whole blocks, bit-identical to the unpipelined collectives
// =================================================================================================

TEST(TwoShotPipeline, PiecesRule) {
  CompressConfig cfg;  // G = 512, auto
  const int64_t G = cfg.block_size;
  EXPECT_EQ(pipeline_pieces(cfg, 1000, 4), 1);                          // small: no pipeline
  EXPECT_EQ(pipeline_pieces(cfg, 4 * kPipelinePieceFloats - 1, 4), 1);  // chunk below one piece
  EXPECT_EQ(pipeline_pieces(cfg, 4 * 3 * kPipelinePieceFloats, 4), 3);
  EXPECT_EQ(pipeline_pieces(cfg, int64_t{16} << 20, 4), kAutoPipelinePieces);  // 64 MB
  EXPECT_EQ(pipeline_pieces(cfg, int64_t{16} << 20, 1), 1);                    // one rank
  cfg.pipeline_chunks = 1;
  EXPECT_EQ(pipeline_pieces(cfg, int64_t{16} << 20, 4), 1);
  cfg.pipeline_chunks = 5;
  EXPECT_EQ(pipeline_pieces(cfg, 100 * G, 4), 5);
  EXPECT_EQ(pipeline_pieces(cfg, 3 * G, 2), 2);  // never more pieces than blocks in a chunk
  EXPECT_EQ(pipeline_pieces(cfg, 1, 2), 1);
  cfg.bits = kFp32Bits;
  EXPECT_EQ(pipeline_pieces(cfg, 100 * G, 4), 1);
}

TEST(TwoShotPipeline, PiecesCoverEveryChunkInWholeBlocks) {
  for (int ranks : {2, 3, 4})
    for (int P : {2, 3, 7})
      for (int64_t n : {int64_t{1}, int64_t{64}, int64_t{5 * 64 + 3}, int64_t{40 * 64 + 33}}) {
        CompressConfig cfg = exact_config(4, 64, quant::Rounding::kNearest);
        cfg.pipeline_chunks = P;
        const TwoShotPlan plan(cfg, n, 0, ranks, 0);
        for (int j = 0; j < ranks; ++j) {
          const MessageLayout& m = plan.message(j);
          int64_t at = 0;
          size_t codes = 0, tail = m.scales_at;
          for (int k = 0; k < plan.pieces(); ++k) {
            const ChunkRange p = plan.piece(j, k);
            const PieceBytes b = plan.piece_bytes(j, k);
            EXPECT_EQ(p.begin, at);
            EXPECT_EQ(p.begin % 64, 0);
            EXPECT_EQ(b.codes_begin, codes);
            EXPECT_EQ(b.tail_begin, tail);
            at = p.end;
            codes = b.codes_end;
            tail = b.tail_end;
          }
          EXPECT_EQ(at, plan.chunk(j).count());
          EXPECT_EQ(codes, m.scales_at);  // the pieces' codes and tails tile the message
          EXPECT_EQ(tail, m.bytes);
        }
      }
}

// Pipelined runs (several pieces per chunk, on point-to-point messages) give the bytes of the
// unpipelined two-shot (one piece, the all-to-all and all-gather collectives): the same outputs,
// stats and error-feedback state over steps that carry error feedback and the lbt gamma over.
std::string case_name(int bits, quant::PolicyKind policy, int64_t G, int64_t n, int pieces) {
  return "bits " + std::to_string(bits) + " policy " + quant::policy_kind_name(policy) + " G " +
         std::to_string(G) + " n " + std::to_string(n) + " pieces " + std::to_string(pieces);
}

TEST(TwoShotPipeline, BitIdenticalToTheCollectives) {
  struct Case {
    int bits;
    quant::PolicyKind policy;
    int64_t G, n;
  };
  std::vector<Case> cases;
  for (int64_t n : {int64_t{1}, int64_t{100}, int64_t{3 * 64 + 5}, int64_t{37 * 64 + 31},
                    int64_t{200 * 64}, int64_t{100003}})
    cases.push_back({4, quant::PolicyKind::kLbt, 64, n});
  cases.push_back({8, quant::PolicyKind::kMinMax, 64, 9 * 64 + 1});
  cases.push_back({4, quant::PolicyKind::kTopK, 512, 50 * 512 + 7});
  cases.push_back({4, quant::PolicyKind::kMse, 128, 20000});
  for (const Case& c : cases)
    for (int P : {2, 3, 5, 16}) {
      SCOPED_TRACE(case_name(c.bits, c.policy, c.G, c.n, P));
      CompressConfig cfg;
      cfg.bits = c.bits;
      cfg.block_size = c.G;
      cfg.policy.kind = c.policy;
      cfg.policy.topk = 4;
      cfg.seed = 9;
      cfg.pipeline_chunks = 1;
      TwoShotAllreduce plain(W(), cfg, c.n, 6);
      cfg.pipeline_chunks = P;
      TwoShotAllreduce piped(W(), cfg, c.n, 6);
      // Pipelined whenever a chunk has two blocks (the rule caps P at the blocks of chunk 0).
      const TwoShotPlan plan(cfg, c.n, 6, R(), me());
      if (R() > 1 && plan.chunk(0).count() > c.G) {
        EXPECT_GT(plan.pieces(), 1);
      }
      for (uint32_t step = 0; step < 3; ++step) {
        std::vector<float> xa = random_input(30 + step, c.n, c.G), xb = xa;
        const BucketStats sa = plain.run(xa.data(), step);
        const BucketStats sb = piped.run(xb.data(), step);
        plain.commit(true);
        piped.commit(true);
        EXPECT_EQ(count_wrong(xa, xb), 0) << "step " << step;
        EXPECT_EQ(sa.count, sb.count);
        EXPECT_EQ(sa.clipped, sb.clipped);
        EXPECT_EQ(sa.nonfinite, sb.nonfinite);
        EXPECT_EQ(sa.gamma, sb.gamma);
        EXPECT_EQ(plain.save_state(), piped.save_state());
      }
      EXPECT_TRUE(same_on_all_ranks(&P, sizeof P));  // every rank went through every case
    }
}

// The two-shot of DESIGN.md section 4 written out with the reference codec (quantize_ref,
// dequantize_ref) and plain loops, for every rank at once (each rank can make every rank's
// input): steps 1-6 with both error feedbacks over several steps. The fused host loops must give
// the same bits, pipelined or not.
class ReferenceTwoShot {
 public:
  ReferenceTwoShot(const CompressConfig& cfg, int64_t n, uint32_t bucket, int ranks)
      : cfg_(cfg),
        n_(n),
        bucket_(bucket),
        ranks_(ranks),
        ew_(static_cast<size_t>(ranks)),
        es_(static_cast<size_t>(ranks)) {
    for (int r = 0; r < ranks; ++r) {
      ew_[static_cast<size_t>(r)].assign(static_cast<size_t>(n), 0.0f);
      es_[static_cast<size_t>(r)].assign(
          static_cast<size_t>(chunk_range(n, cfg.block_size, ranks, r).count()), 0.0f);
    }
  }

  // The result every rank holds for inputs[r] on rank r (gamma fixed by the policy: minmax,
  // fixed or a block policy).
  std::vector<float> run(const std::vector<std::vector<float>>& inputs, uint32_t step) {
    const int64_t G = cfg_.block_size;
    quant::PolicyConfig pol = cfg_.policy;
    pol.bits = cfg_.bits;
    const bool block = quant::is_block_rule(pol.kind);
    quant::QuantParams p;
    p.bits = cfg_.bits;
    p.rounding = cfg_.rounding;
    p.gamma = pol.kind == quant::PolicyKind::kFixed ? pol.fixed_gamma : 1.0f;
    p.block_size = G;
    p.key.seed = cfg_.seed;
    p.key.step = step;
    // One quantization with its error: codes of v, e <- v - Q(v), returns Q(v).
    auto quantize = [&](const std::vector<float>& v, quant::QuantParams q) {
      const int64_t m = static_cast<int64_t>(v.size());
      std::vector<float> clips(static_cast<size_t>(quant::num_scales(m, G)));
      if (block && m > 0) {
        quant::block_clips(v.data(), m, G, pol, clips.data());
        q.clips = clips.data();
      }
      std::vector<uint8_t> codes(static_cast<size_t>(quant::packed_bytes(cfg_.bits, m)) + 1);
      std::vector<float> scales(clips.size() + 1), out(v.size());
      quant::quantize_ref(v.data(), m, q, codes.data(), scales.data());
      quant::dequantize_ref(codes.data(), scales.data(), m, cfg_.bits, G, out.data());
      return out;
    };
    // 1-3: every rank's dequantized version of every chunk.
    std::vector<std::vector<std::vector<float>>> sent(static_cast<size_t>(ranks_));
    for (int r = 0; r < ranks_; ++r) {
      std::vector<float>& ew = ew_[static_cast<size_t>(r)];
      for (int j = 0; j < ranks_; ++j) {
        const ChunkRange c = chunk_range(n_, G, ranks_, j);
        std::vector<float> v(static_cast<size_t>(c.count()));
        for (int64_t i = 0; i < c.count(); ++i)
          v[static_cast<size_t>(i)] =
              inputs[static_cast<size_t>(r)][static_cast<size_t>(c.begin + i)] +
              ew[static_cast<size_t>(c.begin + i)];
        quant::QuantParams q = p;
        q.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(j);
        q.key.tensor_id = 2 * bucket_;
        const std::vector<float> dq = quantize(v, q);
        for (int64_t i = 0; i < c.count(); ++i)
          ew[static_cast<size_t>(c.begin + i)] =
              v[static_cast<size_t>(i)] - dq[static_cast<size_t>(i)];
        sent[static_cast<size_t>(r)].push_back(dq);
      }
    }
    // 5-6: the owners' sums in rank order, / N, + e_s, requantized.
    std::vector<float> result(static_cast<size_t>(n_));
    for (int j = 0; j < ranks_; ++j) {
      const ChunkRange c = chunk_range(n_, G, ranks_, j);
      std::vector<float>& es = es_[static_cast<size_t>(j)];
      std::vector<float> m(static_cast<size_t>(c.count()), 0.0f);
      for (int r = 0; r < ranks_; ++r)
        for (size_t i = 0; i < m.size(); ++i)
          m[i] += sent[static_cast<size_t>(r)][static_cast<size_t>(j)][i];
      for (size_t i = 0; i < m.size(); ++i) m[i] = m[i] / static_cast<float>(ranks_) + es[i];
      quant::QuantParams q = p;
      q.key.stream = kStreamsPerRank * static_cast<uint32_t>(j) + static_cast<uint32_t>(j);
      q.key.tensor_id = 2 * bucket_ + 1;
      const std::vector<float> dq = quantize(m, q);
      for (size_t i = 0; i < m.size(); ++i) {
        es[i] = m[i] - dq[i];
        result[static_cast<size_t>(c.begin) + i] = dq[i];
      }
    }
    return result;
  }

 private:
  CompressConfig cfg_;
  int64_t n_;
  uint32_t bucket_;
  int ranks_;
  std::vector<std::vector<float>> ew_, es_;
};

TEST(TwoShotPipeline, EqualsTheReferenceDefinition) {
  struct Case {
    int bits;
    quant::PolicyKind policy;
    quant::Rounding rounding;
    int64_t G, n;
  };
  const quant::Rounding kStoch = quant::Rounding::kStochastic;
  const std::vector<Case> cases = {
      {4, quant::PolicyKind::kMinMax, kStoch, 64, 37 * 64 + 31},
      {4, quant::PolicyKind::kFixed, kStoch, 512, 100003},
      {4, quant::PolicyKind::kFixed, quant::Rounding::kNearest, 126, 5000},
      {4, quant::PolicyKind::kTopK, kStoch, 512, 50 * 512 + 7},
      {8, quant::PolicyKind::kMinMax, kStoch, 64, 9 * 64 + 1},
      {4, quant::PolicyKind::kMinMax, kStoch, 64, 1},
  };
  for (const Case& c : cases)
    for (int P : {1, 3}) {
      SCOPED_TRACE(case_name(c.bits, c.policy, c.G, c.n, P));
      CompressConfig cfg;
      cfg.bits = c.bits;
      cfg.block_size = c.G;
      cfg.rounding = c.rounding;
      cfg.policy.kind = c.policy;
      cfg.policy.fixed_gamma = 0.7f;
      cfg.seed = 5;
      cfg.pipeline_chunks = P;
      TwoShotAllreduce ts(W(), cfg, c.n, 3);
      ReferenceTwoShot ref(cfg, c.n, 3, R());
      for (uint32_t step = 0; step < 3; ++step) {
        std::vector<std::vector<float>> inputs;
        for (int r = 0; r < R(); ++r) {
          std::vector<float> x(static_cast<size_t>(c.n));
          for (int64_t i = 0; i < c.n; ++i)
            x[static_cast<size_t>(i)] = random_grad(40 + step, r, i, c.G);
          inputs.push_back(x);
        }
        std::vector<float> x = inputs[static_cast<size_t>(me())];
        ts.run(x.data(), step);
        ts.commit(true);
        EXPECT_EQ(count_wrong(x, ref.run(inputs, step)), 0) << "step " << step;
      }
    }
}

TEST(TwoShotPipeline, WireBytesAreThePiecesOfTheMessages) {
  // The pipelined two-shot sends every other rank its chunk's message and its own message: the
  // all-to-all bytes of the collectives and (N-1) times the own message.
  const int64_t G = 64, n = 40 * G + 9;
  CompressConfig cfg = exact_config(4, G, quant::Rounding::kStochastic);
  cfg.pipeline_chunks = 4;
  TwoShotAllreduce ts(W(), cfg, n, 0);
  std::vector<float> x = random_input(3, n, G);
  const BucketStats st = ts.run(x.data(), 0);
  const TwoShotPlan plan(cfg, n, 0, R(), me());
  uint64_t want = 0;
  for (int j = 0; j < R(); ++j)
    if (j != me()) want += plan.message(j).bytes + plan.own_message().bytes;
  EXPECT_EQ(st.wire_bytes, want);
}

}  // namespace
}  // namespace int4ddp::comm
