// The CUDA codec's fused tile walk (kernels/quant/cuda/codec_cuda_lanes.h) replayed on the CPU: a
// warp's lanes make their Philox calls, exchange words as the kernel's shuffles do (lane l receives
// what lane l ^ 1 sends), and every element's uniform must be the reference's
// philox_uniform(key, element); the lanes of a scope must cover its G elements exactly once. Runs
// without a GPU (label cpu): the kernel composes the same functions around __shfl_xor_sync.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/quant/cuda/codec_cuda_lanes.h"
#include "kernels/quant/philox.h"

namespace int4ddp::quant::cuda::lanes {
namespace {

constexpr int kLanes = 32;

// u[lane][k][j]: the uniforms lane_uniforms<V> gives each lane of one warp (bases: each lane's
// group_base), replayed with the shuffle as an exchange between lanes l and l ^ 1.
std::vector<std::vector<std::vector<float>>> replay_warp(const RngKey& key, int v,
                                                         const int64_t (&base)[kLanes]) {
  std::vector<std::vector<std::vector<float>>> u(
      kLanes, std::vector<std::vector<float>>(static_cast<size_t>(v), std::vector<float>(4)));
  auto store = [&](int lane, int k, uint32_t a, uint32_t b) {
    float q[4];
    fill_uniforms(a, b, q);
    for (int j = 0; j < 4; ++j) u[lane][static_cast<size_t>(k)][static_cast<size_t>(j)] = q[j];
  };
  if (v == 1) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const bool odd = lane & 1;
      const SplitWords w =
          split_call(philox_block(key, pair_call_group(base[lane], 0, false)), odd);
      store(lane, 0, w.keep0, w.keep1);
    }
    return u;
  }
  for (int k = 0; k < v; k += 2) {
    SplitWords w[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      const bool odd = lane & 1;
      w[lane] = split_call(philox_block(key, pair_call_group(base[lane], k, odd)), odd);
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      const SplitWords& partner = w[lane ^ 1];  // __shfl_xor_sync(mask, send, 1)
      const PairWords pw = pair_words(w[lane], partner.send0, partner.send1, lane & 1);
      store(lane, k, pw.k0, pw.k1);
      store(lane, k + 1, pw.k10, pw.k11);
    }
  }
  return u;
}

// Every shape of the fused kernels' table (codec_cuda.cu kFusedShapes) and a few more, scopes near
// the start and far out (the Philox counter's high word non-zero).
TEST(CudaLanes, FusedWalkCoversEachScopeOnceWithTheReferenceUniforms) {
  const RngKey key{0x1234567u, 9, 42, 77};
  const int shapes[][2] = {{1, 1}, {2, 1}, {4, 1}, {4, 2}, {4, 4}, {4, 8}, {2, 4}, {1, 8}};
  for (const auto& shape : shapes) {
    const int v = shape[0], wps = shape[1];
    const int64_t G = scope_size(v, wps);
    ASSERT_EQ(G, int64_t{128} * v * wps);
    for (int64_t scope : {int64_t{0}, int64_t{1}, int64_t{5}, (int64_t{1} << 33) + 3}) {
      SCOPED_TRACE(testing::Message() << "V " << v << " wps " << wps << " scope " << scope);
      std::vector<int> seen(static_cast<size_t>(G), 0);
      for (int w = 0; w < wps; ++w) {
        int64_t base[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) base[lane] = group_base(scope, v, wps, w, lane);
        const auto u = replay_warp(key, v, base);
        for (int lane = 0; lane < kLanes; ++lane)
          for (int k = 0; k < v; ++k) {
            const int64_t e = group_element(base[lane], k);
            ASSERT_EQ(e % 4, 0);
            for (int j = 0; j < 4; ++j) {
              const int64_t i = e + j - scope * G;
              ASSERT_GE(i, 0);
              ASSERT_LT(i, G);
              ++seen[static_cast<size_t>(i)];
              ASSERT_EQ(u[lane][static_cast<size_t>(k)][static_cast<size_t>(j)],
                        philox_uniform(key, static_cast<uint64_t>(e + j)))
                  << "warp " << w << " lane " << lane << " group " << k << " element " << e + j;
            }
          }
      }
      for (int64_t i = 0; i < G; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)], 1) << "element " << i;
    }
  }
}

// One warp load instruction (the same k over the 32 lanes) reads 128 contiguous elements.
TEST(CudaLanes, WarpLoadsAreContiguous) {
  for (int v : {1, 2, 4})
    for (int k = 0; k < v; ++k) {
      const int64_t first = group_element(group_base(3, v, 2, 1, 0), k);
      for (int lane = 0; lane < kLanes; ++lane)
        EXPECT_EQ(group_element(group_base(3, v, 2, 1, lane), k), first + 4 * lane);
    }
}

}  // namespace
}  // namespace int4ddp::quant::cuda::lanes
