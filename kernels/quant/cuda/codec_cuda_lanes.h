// The index math of the CUDA codec's fused tile walk (codec_cuda.cu: quantize_fused_kernel and
// owner_fused_kernel), as plain host/device functions so that the CPU tests can replay a warp and
// check it against the reference keying (tests/test_cuda_lanes.cpp) without a GPU.
//
// A scope (scale block) of G = 128 V wps elements is covered by wps warps. Lane l of warp w of the
// scope holds V groups of four consecutive elements, group k starting at element
//   scope G + 128 V w + 128 k + 4 l,
// so each load instruction of a warp reads 512 contiguous bytes. One Philox call serves the eight
// elements of lanes 2m and 2m + 1 (group k of both): for V == 1 both lanes make that call; for
// V >= 2 the lanes pair their calls over groups k, k + 1 (k even): the even lane makes the call of
// group k, the odd lane that of group k + 1, and each sends the partner the two words it needs
// (one shuffle per word), so no call is made twice.
#pragma once

#include <cstdint>

#include "kernels/quant/format.h"
#include "kernels/quant/philox.h"

namespace int4ddp::quant::cuda::lanes {

// Elements per scope: G = 128 V wps.
INT4DDP_HD constexpr int64_t scope_size(int v, int wps) { return int64_t{128} * v * wps; }

// First element of the lane's group 0: scope G + 128 V warp_in_scope + 4 lane.
INT4DDP_HD int64_t group_base(int64_t scope, int v, int wps, int warp_in_scope, int lane) {
  return scope * scope_size(v, wps) + int64_t{128} * v * warp_in_scope + 4 * lane;
}

// First element of the lane's group k.
INT4DDP_HD int64_t group_element(int64_t base, int k) { return base + int64_t{128} * k; }

// The Philox group (element index / 8) whose call the lane makes at pair step k (k even, V >= 2):
// the even lane's group k, the odd lane's group k + 1. For V == 1 (k = 0), odd must be false.
INT4DDP_HD uint64_t pair_call_group(int64_t base, int k, bool odd) {
  return static_cast<uint64_t>(group_element(base, k + (odd ? 1 : 0))) / kElementsPerPhilox;
}

// The four words of the lane's call split into the two it keeps and the two it sends to its
// partner (lane ^ 1). A call covers elements 8g .. 8g + 7: words 0, 1 are the even lane's four
// elements, words 2, 3 the odd lane's. The even lane's call (its group k) keeps 0, 1 and sends 2,
// 3; the odd lane's call (its group k + 1, i.e. the even lane's group k + 1) keeps 2, 3, sends
// 0, 1.
struct SplitWords {
  uint32_t keep0, keep1, send0, send1;
};
INT4DDP_HD SplitWords split_call(const Philox4& r, bool odd) {
  return odd ? SplitWords{r.v[2], r.v[3], r.v[0], r.v[1]}
             : SplitWords{r.v[0], r.v[1], r.v[2], r.v[3]};
}

// The two words (covering the lane's four elements of a group, in element order) of groups k and
// k + 1 from the kept words and the two received from the partner: the even lane made the call of
// its group k and received group k + 1's; the odd lane the other way round.
struct PairWords {
  uint32_t k0, k1;    // group k
  uint32_t k10, k11;  // group k + 1
};
INT4DDP_HD PairWords pair_words(const SplitWords& s, uint32_t recv0, uint32_t recv1, bool odd) {
  return odd ? PairWords{recv0, recv1, s.keep0, s.keep1}
             : PairWords{s.keep0, s.keep1, recv0, recv1};
}

// The 16-bit uniforms of four consecutive elements 4 l .. 4 l + 3 (mod 8) from the two words that
// cover them: element j takes the low half of word j / 2 when j is even, the high half when odd.
INT4DDP_HD void fill_uniforms(uint32_t a, uint32_t b, float (&u)[4]) {
  u[0] = uniform_from_half(a, 0);
  u[1] = uniform_from_half(a, 1);
  u[2] = uniform_from_half(b, 0);
  u[3] = uniform_from_half(b, 1);
}

}  // namespace int4ddp::quant::cuda::lanes
