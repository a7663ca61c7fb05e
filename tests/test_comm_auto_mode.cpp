// comm.mode auto under mpirun (label mpi, 1-4 ranks): the start-up measurement gives every rank the
// same figures, so every rank takes the same per-bucket decision; a bucket chosen fp32 travels
// uncompressed and the others compressed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "comm/auto_mode.h"
#include "comm/buckets.h"
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

// Rank r's gradient at arena index i: small integers, so every fp32 mean below is exact.
float value(int r, int64_t i) { return static_cast<float>((i * 7 + r) % 23 - 11); }

// One step of engine on arena filled with value(me(), i).
StepCommStats run_step(BucketEngine& engine, std::vector<float>& arena) {
  for (size_t i = 0; i < arena.size(); ++i) arena[i] = value(me(), static_cast<int64_t>(i));
  engine.begin_step(0);
  engine.ready_from(0);
  const StepCommStats st = engine.finish();
  engine.commit(true);
  return st;
}

TEST(AutoModeBuckets, ABucketChosenFp32GoesUncompressed) {
  // Two tensors, one bucket each (4096 floats per bucket, reverse order): bucket 0 = [3000, 8000),
  // bucket 1 = [0, 3000). The chooser sends buckets of 4000 or more elements in fp32.
  BucketConfig cfg;
  cfg.bucket_mb = 4096.0 * 4 / 1048576.0;
  cfg.small_tensor_threshold = 1000;
  cfg.compress.block_size = 64;
  std::vector<int64_t> asked;
  cfg.choose_bits = [&](int64_t count) {
    asked.push_back(count);
    return count >= 4000 ? kFp32Bits : 4;
  };
  std::vector<float> arena(8000);
  BucketEngine engine(W(), cfg, arena.data(), {{0, 3000}, {3000, 5000}});
  EXPECT_EQ(asked, (std::vector<int64_t>{5000, 3000}));
  EXPECT_EQ(engine.num_buckets(), 2);
  EXPECT_EQ(engine.num_compressed_buckets(), 1);
  const StepCommStats st = run_step(engine, arena);
  EXPECT_EQ(st.plain_elements, 5000);
  EXPECT_EQ(st.compressed_elements, 3000);
  int64_t wrong = 0;  // the fp32 bucket: the exact mean, as the ring and / N give it
  for (int64_t i = 3000; i < 8000; ++i) {
    float sum = 0;
    for (int r = 0; r < R(); ++r) sum += value(r, i);
    wrong += !same_bits(arena[static_cast<size_t>(i)], sum / static_cast<float>(R()));
  }
  EXPECT_EQ(wrong, 0);
}

// The level figures as plain doubles (LevelBandwidth has padding), for same_on_all_ranks.
std::vector<double> figures(const LevelBandwidth& m) {
  std::vector<double> f{static_cast<double>(m.hierarchical), static_cast<double>(m.nodes),
                        static_cast<double>(m.ranks_per_node), static_cast<double>(m.world_ranks)};
  for (const MeasuredBandwidth* b : {&m.flat, &m.node, &m.cross})
    f.insert(f.end(), {b->link_bytes_per_s, b->hop_latency_s, b->encode_floats_per_s,
                       b->decode_floats_per_s});
  return f;
}

TEST(AutoModeLevels, EveryRankGetsTheSameFiguresOfEveryLevel) {
  Hierarchy flat(W(), HierarchyMode::kFlat);
  const LevelBandwidth f = measure_levels(flat, 1 << 14, 4, 512);
  EXPECT_FALSE(f.hierarchical);
  EXPECT_EQ(f.world_ranks, R());
  const std::vector<double> ff = figures(f);
  EXPECT_TRUE(same_on_all_ranks(ff.data(), ff.size() * sizeof(double)));
  if (R() != 4) return;  // 2 nodes x 2 ranks
  Hierarchy h(W(), HierarchyMode::kNode, 2);
  ASSERT_TRUE(h.active());
  const LevelBandwidth m = measure_levels(h, 1 << 14, 4, 512);
  EXPECT_TRUE(m.hierarchical);
  EXPECT_EQ(m.nodes, 2);
  EXPECT_EQ(m.ranks_per_node, 2);
  EXPECT_GT(m.node.link_bytes_per_s, 0.0);
  EXPECT_GT(m.cross.link_bytes_per_s, 0.0);
  const std::vector<double> mf = figures(m);
  EXPECT_TRUE(same_on_all_ranks(mf.data(), mf.size() * sizeof(double)));
  const int bits = choose_level_mode(m, 1 << 20, 512).bits;
  EXPECT_TRUE(same_on_all_ranks(&bits, sizeof bits));
}

// 2 nodes x 2 ranks (4 ranks): the chooser is asked for the cross level of the bucket, which stays
// on the hierarchical all-reduce; fp32 there gives the node means' mean, exactly.
TEST(AutoModeLevels, UnderTheHierarchyTheChooserPicksTheCrossLevel) {
  if (R() != 4) GTEST_SKIP() << "needs 2 nodes x 2 ranks";
  for (const bool measured : {false, true}) {
    SCOPED_TRACE(measured ? "make_chooser" : "choose_bits");
    BucketConfig cfg;
    cfg.small_tensor_threshold = 1000;
    cfg.compress.block_size = 64;
    cfg.hierarchy = HierarchyMode::kNode;
    std::vector<int64_t> asked;
    auto chooser = [&](int64_t count) {
      asked.push_back(count);
      return kFp32Bits;
    };
    if (measured) {
      cfg.make_chooser = [&](Hierarchy& h) -> std::function<int(int64_t)> {
        EXPECT_TRUE(h.active());
        const LevelBandwidth m = measure_levels(h, 1 << 12, 4, 64);  // collective inside
        EXPECT_TRUE(m.hierarchical);
        return chooser;
      };
    } else {
      cfg.choose_bits = chooser;
    }
    setenv(kRanksPerNodeEnv, "2", 1);
    std::vector<float> arena(8000);
    BucketEngine engine(W(), cfg, arena.data(), {{0, 3000}, {3000, 5000}});
    unsetenv(kRanksPerNodeEnv);
    EXPECT_EQ(engine.hierarchy().rfind("node", 0), 0u) << engine.hierarchy();
    EXPECT_EQ(asked, (std::vector<int64_t>{8000}));
    EXPECT_EQ(engine.num_compressed_buckets(), 1);
    const StepCommStats st = run_step(engine, arena);
    EXPECT_EQ(st.plain_elements, 0);
    EXPECT_EQ(st.compressed_elements, 8000);
    EXPECT_EQ(st.clipped, 0);
    int64_t wrong = 0;  // node means (local-rank order), then their mean across the 2 nodes
    for (int64_t i = 0; i < 8000; ++i) {
      const float node0 = (value(0, i) + value(1, i)) / 2.0f;
      const float node1 = (value(2, i) + value(3, i)) / 2.0f;
      wrong += !same_bits(arena[static_cast<size_t>(i)], (node0 + node1) / 2.0f);
    }
    EXPECT_EQ(wrong, 0);
  }
}

}  // namespace
}  // namespace int4ddp::comm
