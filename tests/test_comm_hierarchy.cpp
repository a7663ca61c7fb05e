// The hierarchical all-reduce under mpirun (label mpi, 1-4 ranks; every rank is on this machine, so
// the tests force the node grouping with Hierarchy's ranks_per_node or INT4DDP_RANKS_PER_NODE):
// the layout and its resolution, the degenerate layouts (one node, one rank per node) equal to the
// flat two-shot bit for bit, the 2 x 2 hierarchy (4 ranks) within the quantizer's bound of the
// exact mean and exact in fp32, odd sizes, error feedback state, stats and the bucket engine.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "comm/buckets.h"
#include "comm/hierarchy.h"
#include "comm/two_shot.h"
#include "comm_test.h"
#include "kernels/common/error.h"
#include "kernels/quant/format.h"

namespace int4ddp::comm {
namespace {

// Sets INT4DDP_RANKS_PER_NODE for one scope.
class RanksPerNodeEnv {
 public:
  explicit RanksPerNodeEnv(const std::string& value) { setenv(kRanksPerNodeEnv, value.c_str(), 1); }
  ~RanksPerNodeEnv() { unsetenv(kRanksPerNodeEnv); }
};

// The ranks-per-node values k with more than one node of more than one rank (4 ranks: k = 2).
std::vector<int> two_level_layouts() {
  std::vector<int> ks;
  for (int k = 2; k < R(); ++k)
    if (R() % k == 0) ks.push_back(k);
  return ks;
}

std::vector<float> rank_input(uint64_t seed, int r, int64_t n, int64_t G) {
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = random_grad(seed, r, i, G);
  return x;
}

// The node mean of a share as the hierarchy computes it: the rank_input of the node's k ranks (node
// a: ranks a k .. a k + k - 1), summed in fp32 in local-rank order, / k.
std::vector<float> node_mean_of(uint64_t seed, int node, int k, ChunkRange share, int64_t G) {
  std::vector<float> nm(static_cast<size_t>(share.count()));
  for (int64_t i = 0; i < share.count(); ++i) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float v = random_grad(seed, node * k + j, share.begin + i, G);
      sum = j == 0 ? v : sum + v;
    }
    nm[static_cast<size_t>(i)] = sum / static_cast<float>(k);
  }
  return nm;
}

TEST(Hierarchy, LayoutAndResolution) {
  for (int k = 1; k <= R(); ++k) {
    SCOPED_TRACE("ranks per node " + std::to_string(k));
    const bool uniform = R() % k == 0;
    const int nodes = (R() + k - 1) / k;
    const bool two_level = uniform && nodes > 1 && k > 1;
    if (uniform || R() == 1) {
      Hierarchy h(W(), HierarchyMode::kNode, k);
      EXPECT_EQ(h.active(), two_level) << h.description();
      if (R() > 1) {
        EXPECT_EQ(h.nodes(), nodes);
        EXPECT_EQ(h.ranks_per_node(), k);
      }
      if (h.active()) {
        EXPECT_EQ(h.node().size(), k);
        EXPECT_EQ(h.node().rank(), me() % k);
        EXPECT_EQ(h.cross().size(), nodes);
        EXPECT_EQ(h.cross().rank(), me() / k);
        EXPECT_EQ(h.description().rfind("node (", 0), 0u) << h.description();
      } else {
        EXPECT_EQ(h.description().rfind("flat (", 0), 0u) << h.description();
      }
    } else {
      // Nodes of different sizes: node is refused on every rank, auto stays flat.
      EXPECT_THROW(Hierarchy(W(), HierarchyMode::kNode, k), Error);
      Hierarchy h(W(), HierarchyMode::kAuto, k);
      EXPECT_FALSE(h.active());
      EXPECT_EQ(h.ranks_per_node(), 0);
    }
    Hierarchy a(W(), HierarchyMode::kAuto, k);
    EXPECT_EQ(a.active(), two_level);
    Hierarchy f(W(), HierarchyMode::kFlat, k);
    EXPECT_FALSE(f.active());
  }
  // MPI's own grouping: the test runs every rank on this machine, one node.
  Hierarchy natural(W(), HierarchyMode::kNode);
  EXPECT_FALSE(natural.active());
  EXPECT_EQ(natural.nodes(), 1);
  EXPECT_EQ(natural.ranks_per_node(), R());
  EXPECT_THROW(Hierarchy(W(), HierarchyMode::kAuto, R() + 1), Error);
  EXPECT_STREQ(hierarchy_mode_name(HierarchyMode::kNode), "node");
}

TEST(Hierarchy, EnvironmentOverridesTheGrouping) {
  for (int k : two_level_layouts()) {
    RanksPerNodeEnv env(std::to_string(k));
    Hierarchy h(W(), HierarchyMode::kAuto);
    EXPECT_TRUE(h.active());
    EXPECT_EQ(h.ranks_per_node(), k);
    EXPECT_NE(h.description().find("rank / " + std::to_string(k)), std::string::npos);
  }
  if (R() == 1) return;  // one rank never looks at the grouping
  for (const char* bad : {"two", "0", "-1", "2x", "99999"}) {
    RanksPerNodeEnv env(bad);
    try {
      Hierarchy h(W(), HierarchyMode::kAuto);
      ADD_FAILURE() << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(kRanksPerNodeEnv), std::string::npos) << e.what();
    }
  }
}

// One node, or one rank per node: the hierarchy is the identity, so the result, the stats and the
// state are the flat two-shot's, bit for bit, step after step (error feedback and lbt included).
TEST(HierarchicalAllreduce, DegenerateLayoutsEqualFlat) {
  for (int k : {1, R()})
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{3 * 64 + 5}, int64_t{10007}}) {
      SCOPED_TRACE("ranks per node " + std::to_string(k) + ", n " + std::to_string(n));
      CompressConfig cfg;  // int4, lbt, stochastic, both error feedbacks
      cfg.block_size = 64;
      Hierarchy h(W(), HierarchyMode::kNode, k);
      EXPECT_FALSE(h.active());
      BucketAllreduce hier(h, cfg, n, 5);
      TwoShotAllreduce flat(W(), cfg, n, 5);
      for (uint32_t step = 0; step < 3; ++step) {
        std::vector<float> a = rank_input(40 + step, me(), n, 64), b = a;
        const BucketStats sa = hier.run(a.data(), step), sb = flat.run(b.data(), step);
        hier.commit(true);
        flat.commit(true);
        EXPECT_EQ(count_wrong(a, b), 0) << "step " << step;
        EXPECT_EQ(sa.clipped, sb.clipped);
        EXPECT_EQ(sa.count, sb.count);
        EXPECT_EQ(sa.wire_bytes, sb.wire_bytes);
      }
      EXPECT_EQ(hier.save_state(), flat.save_state());
      EXPECT_EQ(hier.gamma(), flat.gamma());
    }
}

// Per-element bound on |hierarchical mean - exact mean| with gamma = 1: the fp32 node means m_a are
// what the two-shot across the M nodes quantizes, so the flat two-shot's bound applies to them
// (tests/test_comm_two_shot.cpp, ErrorBoundOnRandomData): node a's quantization errs by less than
// per_quant max|m_a over the block| / L, averaged over nodes, plus the owner's requantization.
// kSlack (relative to the bound) covers the fp32 rounding of the node sums, the steps and the
// divisions (a few ulps).
constexpr double kSlack = 1e-5;

TEST(HierarchicalAllreduce, TwoLevelWithinTheQuantizerBoundOfTheExactMean) {
  if (two_level_layouts().empty()) GTEST_SKIP() << "needs 2 nodes of 2 ranks (4 ranks)";
  for (int k : two_level_layouts())
    for (int bits : {4, 8})
      for (auto rounding : {quant::Rounding::kNearest, quant::Rounding::kStochastic})
        for (int64_t G : {64, 512})
          for (int64_t n : {int64_t{1}, G - 1, G + 1, 2 * G, 5 * G + 3, int64_t{10007}}) {
            SCOPED_TRACE("bits " + std::to_string(bits) +
                         (rounding == quant::Rounding::kNearest ? " nearest" : " stochastic") +
                         " G " + std::to_string(G) + " n " + std::to_string(n) + " k " +
                         std::to_string(k));
            const int M = R() / k;
            const uint64_t seed = 300 + static_cast<uint64_t>(bits * 7 + G + n);
            const double L = quant::levels(bits);
            const double per_quant = rounding == quant::Rounding::kStochastic ? 1.0 : 0.5;
            std::vector<std::vector<float>> in(static_cast<size_t>(R()));
            for (int r = 0; r < R(); ++r) in[static_cast<size_t>(r)] = rank_input(seed, r, n, G);
            // Node means (as the node computes them, in fp32) and the exact mean (double).
            std::vector<std::vector<float>> node_mean(static_cast<size_t>(M));
            std::vector<double> mean(static_cast<size_t>(n), 0.0);
            for (int a = 0; a < M; ++a) {
              std::vector<float>& nm = node_mean[static_cast<size_t>(a)];
              nm = in[static_cast<size_t>(a * k)];
              for (int l = 1; l < k; ++l)
                for (int64_t i = 0; i < n; ++i)
                  nm[static_cast<size_t>(i)] +=
                      in[static_cast<size_t>(a * k + l)][static_cast<size_t>(i)];
              for (float& v : nm) v /= static_cast<float>(k);
            }
            for (int r = 0; r < R(); ++r)
              for (int64_t i = 0; i < n; ++i)
                mean[static_cast<size_t>(i)] += in[static_cast<size_t>(r)][static_cast<size_t>(i)];
            for (double& m : mean) m /= R();

            Hierarchy h(W(), HierarchyMode::kNode, k);
            ASSERT_TRUE(h.active());
            BucketAllreduce ar(h, exact_config(bits, G, rounding), n, 1);
            std::vector<float> x = in[static_cast<size_t>(me())];
            const BucketStats st = ar.run(x.data(), 7);
            ar.commit(true);
            int64_t over = 0;
            double worst = 0;
            for (int64_t b0 = 0; b0 < n; b0 += G) {
              const int64_t b1 = std::min(n, b0 + G);
              double worker = 0, mean_max = 0;
              for (int a = 0; a < M; ++a) {
                double mx = 0;
                for (int64_t i = b0; i < b1; ++i)
                  mx = std::max(
                      mx,
                      std::fabs(double{node_mean[static_cast<size_t>(a)][static_cast<size_t>(i)]}));
                worker += per_quant * mx / L;
              }
              worker /= M;
              for (int64_t i = b0; i < b1; ++i)
                mean_max = std::max(mean_max, std::fabs(mean[static_cast<size_t>(i)]));
              const double bound = (worker + per_quant * (mean_max + worker) / L) * (1.0 + kSlack);
              for (int64_t i = b0; i < b1; ++i) {
                const double e =
                    std::fabs(x[static_cast<size_t>(i)] - mean[static_cast<size_t>(i)]);
                over += e > bound;
                worst = std::max(worst, e / bound);
              }
            }
            EXPECT_EQ(over, 0) << "worst error / bound " << worst;
            EXPECT_TRUE(same_on_all_ranks(x.data(), x.size() * sizeof(float)));
            // Stats summed over the node: every element quantized by each node, then once.
            EXPECT_EQ(st.count, n * (M + 1));
            EXPECT_EQ(st.clipped, 0);
            EXPECT_TRUE(same_on_all_ranks(&st.count, sizeof st.count));
          }
}

// Bit for bit: each rank's share is the cross-node two-shot (same config and key) of its node's
// mean, summed in fp32 in local-rank order and divided by k, over several steps (error feedback
// carried), pipelined or not.
TEST(HierarchicalAllreduce, TwoLevelIsTheCrossTwoShotOfTheNodeMean) {
  if (two_level_layouts().empty()) GTEST_SKIP() << "needs 2 nodes of 2 ranks (4 ranks)";
  for (int k : two_level_layouts())
    for (int P : {1, 4})
      for (int64_t n : {int64_t{64 * 5 + 3}, int64_t{100003}}) {
        SCOPED_TRACE("k " + std::to_string(k) + " pieces " + std::to_string(P) + " n " +
                     std::to_string(n));
        const int64_t G = 64;
        const int node = me() / k, l = me() % k;
        CompressConfig cfg;
        cfg.block_size = G;
        cfg.policy.kind = quant::PolicyKind::kMinMax;
        cfg.pipeline_chunks = P;
        cfg.seed = 3;
        Hierarchy h(W(), HierarchyMode::kNode, k);
        ASSERT_TRUE(h.active());
        ASSERT_EQ(h.node().rank(), l);
        const uint32_t bucket = 5;
        BucketAllreduce ar(h, cfg, n, bucket);
        const ChunkRange share = chunk_range(n, G, k, l);
        TwoShotAllreduce cross(h.cross(), cfg, share.count(),
                               bucket * static_cast<uint32_t>(k) + static_cast<uint32_t>(l));
        for (uint32_t step = 0; step < 3; ++step) {
          std::vector<float> nm = node_mean_of(60 + step, node, k, share, G);
          std::vector<float> x = rank_input(60 + step, me(), n, G);
          ar.run(x.data(), step);
          ar.commit(true);
          cross.run(nm.data(), step);
          cross.commit(true);
          const std::vector<float> mine(x.begin() + share.begin, x.begin() + share.end);
          EXPECT_EQ(count_wrong(mine, nm), 0) << "step " << step;
        }
      }
}

// The levels overlap piece by piece; the whole bucket must still be bit for bit the three steps one
// after the other: the node mean (summed in local-rank order, / k), the unpipelined cross-node
// two-shot of each share (its own object, no hooks), the shares gathered over the node. Over steps
// with error feedback and lbt, int4 and fp32, many piece counts and sizes whose shares, chunks and
// pieces are uneven or empty: a reduce-scatter or all-gather range off by one element or piece,
// or a piece summed before it arrived, changes some element.
TEST(HierarchicalAllreduce, OverlappedLevelsEqualTheStepsOneAfterTheOther) {
  if (two_level_layouts().empty()) GTEST_SKIP() << "needs 2 nodes of 2 ranks (4 ranks)";
  const int64_t G = 64;
  for (int k : two_level_layouts())
    for (int bits : {4, kFp32Bits})
      for (int P : {1, 2, 3, 4, 16})
        for (int64_t n : {int64_t{1}, int64_t{2}, G - 1, G, G + 1, 3 * G + 5, int64_t{1000},
                          int64_t{4099}, int64_t{100003}}) {
          if (bits == kFp32Bits && P > 1) continue;  // fp32 has no pieces
          SCOPED_TRACE("k " + std::to_string(k) + " bits " + std::to_string(bits) + " pieces " +
                       std::to_string(P) + " n " + std::to_string(n));
          const int node = me() / k, l = me() % k;
          CompressConfig cfg;  // lbt, stochastic, both error feedbacks
          cfg.bits = bits;
          cfg.block_size = G;
          cfg.pipeline_chunks = P;
          cfg.seed = 11;
          Hierarchy h(W(), HierarchyMode::kNode, k);
          ASSERT_TRUE(h.active());
          const uint32_t bucket = 3;
          BucketAllreduce ar(h, cfg, n, bucket);
          // The reference: each share's two-shot on its own, unpipelined.
          const int64_t share_block = bits == kFp32Bits ? 2 : G;
          ByteLayout shares;
          for (int j = 0; j < k; ++j) {
            const ChunkRange s = chunk_range(n, share_block, k, j);
            shares.counts.push_back(sizeof(float) * static_cast<size_t>(s.count()));
            shares.displs.push_back(sizeof(float) * static_cast<size_t>(s.begin));
          }
          const ChunkRange share = chunk_range(n, share_block, k, l);
          CompressConfig one = cfg;
          one.pipeline_chunks = 1;
          TwoShotAllreduce cross(h.cross(), one, share.count(),
                                 bucket * static_cast<uint32_t>(k) + static_cast<uint32_t>(l));
          for (uint32_t step = 0; step < 3; ++step) {
            std::vector<float> nm = node_mean_of(90 + step, node, k, share, G);
            cross.run(nm.data(), step);
            cross.commit(true);
            std::vector<float> want(static_cast<size_t>(n));
            h.node().allgatherv(nm.data(), nm.size() * sizeof(float), want.data(), shares);

            std::vector<float> x = rank_input(90 + step, me(), n, G);
            ar.run(x.data(), step);
            ar.commit(true);
            EXPECT_EQ(count_wrong(x, want), 0) << "step " << step;
          }
          EXPECT_EQ(ar.save_state(), cross.save_state());
        }
}

TEST(HierarchicalAllreduce, TwoLevelFp32IsExactOnIntegerInputs) {
  if (two_level_layouts().empty()) GTEST_SKIP() << "needs 2 nodes of 2 ranks (4 ranks)";
  for (int k : two_level_layouts())
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{10007}}) {
      CompressConfig cfg;
      cfg.bits = kFp32Bits;
      Hierarchy h(W(), HierarchyMode::kNode, k);
      BucketAllreduce ar(h, cfg, n, 0);
      // Multiples of R() so that every partial mean is an exact float.
      std::vector<float> x(static_cast<size_t>(n)), want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        x[static_cast<size_t>(i)] = static_cast<float>(R() * ((i * 7 + me() * 13) % 101 - 50));
        double s = 0;
        for (int r = 0; r < R(); ++r) s += R() * ((i * 7 + r * 13) % 101 - 50);
        want[static_cast<size_t>(i)] = static_cast<float>(s / R());
      }
      ar.run(x.data(), 0);
      EXPECT_EQ(count_wrong(x, want), 0) << "n " << n;
    }
}

TEST(HierarchicalAllreduce, StateCommitAndNonFiniteAcrossTheNode) {
  if (two_level_layouts().empty()) GTEST_SKIP() << "needs 2 nodes of 2 ranks (4 ranks)";
  const int k = two_level_layouts().front();
  const int64_t n = 3000;
  CompressConfig cfg;  // lbt, stochastic, both error feedbacks
  cfg.block_size = 64;
  Hierarchy h(W(), HierarchyMode::kNode, k);
  BucketAllreduce a(h, cfg, n, 4), b(h, cfg, n, 4);
  for (uint32_t step = 0; step < 3; ++step) {
    std::vector<float> x = rank_input(10 + step, me(), n, 64);
    a.run(x.data(), step);
    a.commit(true);
  }
  // Dropped step: state unchanged. A NaN on one rank only is counted on every rank.
  const std::vector<uint8_t> s3 = a.save_state();
  std::vector<float> bad = rank_input(15, me(), n, 64);
  if (me() == R() - 1) bad[7] = std::numeric_limits<float>::quiet_NaN();
  const BucketStats sb = a.run(bad.data(), 3);
  EXPECT_GT(sb.nonfinite, 0);
  EXPECT_TRUE(same_on_all_ranks(&sb.nonfinite, sizeof sb.nonfinite));
  a.commit(false);
  EXPECT_EQ(a.save_state(), s3);

  b.load_state(a.save_state());
  EXPECT_EQ(b.gamma(), a.gamma());
  std::vector<float> xa = rank_input(20, me(), n, 64), xb = xa;
  a.run(xa.data(), 3);
  b.run(xb.data(), 3);
  a.commit(true);
  b.commit(true);
  EXPECT_EQ(count_wrong(xa, xb), 0);
  EXPECT_EQ(a.save_state(), b.save_state());
  // A flat bucket's state (the whole bucket) does not fit the share.
  TwoShotAllreduce flat(W(), cfg, n, 4);
  try {
    a.load_state(flat.save_state());
    ADD_FAILURE() << "a flat bucket's state was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("node (2 nodes x 2 ranks"), std::string::npos) << e.what();
  }
}

// The pipelined two-shot across the nodes (comm.pipeline_chunks > 1 on the cross-node
// communicator) gives the bytes of the unpipelined one: outputs, stats and state, over steps with
// error feedback, for a per-bucket and a per-block policy.
TEST(HierarchicalAllreduce, PipelinedAcrossNodesEqualsTheCollectives) {
  if (two_level_layouts().empty()) GTEST_SKIP() << "needs 2 nodes of 2 ranks (4 ranks)";
  for (int k : two_level_layouts())
    for (auto policy : {quant::PolicyKind::kLbt, quant::PolicyKind::kTopK})
      for (int bits : {4, 8})
        for (int64_t n : {int64_t{1}, int64_t{777}, int64_t{20011}}) {
          SCOPED_TRACE(std::string(quant::policy_kind_name(policy)) + " bits " +
                       std::to_string(bits) + " n " + std::to_string(n) + " k " +
                       std::to_string(k));
          CompressConfig cfg;  // stochastic, both error feedbacks
          cfg.bits = bits;
          cfg.block_size = 64;
          cfg.policy.kind = policy;
          Hierarchy h(W(), HierarchyMode::kNode, k);
          CompressConfig one = cfg, many = cfg;
          one.pipeline_chunks = 1;
          many.pipeline_chunks = 5;
          BucketAllreduce a(h, one, n, 6), b(h, many, n, 6);
          for (uint32_t step = 0; step < 3; ++step) {
            std::vector<float> xa = rank_input(40 + step, me(), n, 64), xb = xa;
            const BucketStats sa = a.run(xa.data(), step), sb = b.run(xb.data(), step);
            a.commit(true);
            b.commit(true);
            EXPECT_EQ(count_wrong(xa, xb), 0) << "step " << step;
            EXPECT_EQ(sa.count, sb.count);
            EXPECT_EQ(sa.clipped, sb.clipped);
            EXPECT_EQ(a.save_state(), b.save_state()) << "step " << step;
          }
        }
}

TEST(HierarchicalAllreduce, BucketEngineUsesTheConfiguredHierarchy) {
  const int64_t n = 9000;
  std::vector<float> grads = rank_input(77, me(), n, 64);
  std::vector<Segment> tensors = {{0, 5000}, {5000, 100}, {5100, 3900}};
  for (int k : two_level_layouts()) {
    RanksPerNodeEnv env(std::to_string(k));
    BucketConfig bc;
    bc.bucket_mb = 0.02;  // two buckets
    bc.small_tensor_threshold = 1000;
    bc.compress.block_size = 64;
    bc.hierarchy = HierarchyMode::kNode;
    std::vector<float> g = grads;
    BucketEngine e(W(), bc, g.data(), tensors);
    EXPECT_EQ(e.hierarchy().rfind("node (", 0), 0u) << e.hierarchy();
    e.begin_step(0);
    const StepCommStats st = e.finish();
    e.commit(true);
    EXPECT_TRUE(same_on_all_ranks(g.data(), g.size() * sizeof(float)));
    EXPECT_EQ(st.quantized, (n - 100) * (R() / k + 1));
    // Close to the mean (the bound itself is checked above): a gross-failure check.
    double err2 = 0, ref2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      double m = 0;
      for (int r = 0; r < R(); ++r) m += random_grad(77, r, i, 64);
      m /= R();
      err2 += (g[static_cast<size_t>(i)] - m) * (g[static_cast<size_t>(i)] - m);
      ref2 += m * m;
    }
    EXPECT_LT(std::sqrt(err2 / ref2), 0.5);
  }
  BucketConfig flat;
  flat.hierarchy = HierarchyMode::kAuto;
  std::vector<float> g = grads;
  BucketEngine e(W(), flat, g.data(), tensors);
  EXPECT_EQ(e.hierarchy().rfind("flat (", 0), 0u) << e.hierarchy();  // one machine: one node
}

}  // namespace
}  // namespace int4ddp::comm
