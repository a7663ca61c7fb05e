// AVX2 micro-kernel of the integer GEMM (see igemm_kernels.h): a 4 x 16 int32 tile, 8 ymm
// accumulators. Two exact variants:
//   maddubs  u8 x s8 -> int16 pair sums, summed over up to i16_groups groups in int16 (the driver
//            proves 2 * i16_groups * qmax_u * qmax_s <= 32767, so nothing saturates), then widened
//            by madd_epi16 with ones and added into the int32 tile: 32 multiply-adds per maddubs.
//   madd     i16_groups == 0 (8-bit operands, whose pair sums could saturate int16): bytes
//            widened to int16 (even and odd k of each group) and multiplied with madd_epi16,
//            whose int32 pair sums cannot overflow: 16 multiply-adds per madd.
#include <immintrin.h>

#include <cstring>

#include "kernels/math/igemm_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kMr = 4, kNr = 16;

__attribute__((target("avx2"))) inline __m256i broadcast_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

__attribute__((target("avx2"))) void micro_maddubs(const uint8_t* u, const int8_t* s,
                                                   int64_t groups, int i16_groups, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c[kMr][2];
  for (int r = 0; r < kMr; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
  for (int64_t g0 = 0; g0 < groups; g0 += i16_groups) {
    const int64_t g1 = groups - g0 < i16_groups ? groups : g0 + i16_groups;
    __m256i h[kMr][2];
    for (int r = 0; r < kMr; ++r) h[r][0] = h[r][1] = _mm256_setzero_si256();
    for (int64_t g = g0; g < g1; ++g) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * kNr * 4));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * kNr * 4 + 32));
      for (int r = 0; r < kMr; ++r) {
        const __m256i a = broadcast_u32(u + (g * kMr + r) * 4);
        h[r][0] = _mm256_add_epi16(h[r][0], _mm256_maddubs_epi16(a, b0));
        h[r][1] = _mm256_add_epi16(h[r][1], _mm256_maddubs_epi16(a, b1));
      }
    }
    for (int r = 0; r < kMr; ++r) {
      c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(h[r][0], ones));
      c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(h[r][1], ones));
    }
  }
  for (int r = 0; r < kMr; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNr), c[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNr + 8), c[r][1]);
  }
}

__attribute__((target("avx2"))) void micro_madd(const uint8_t* u, const int8_t* s, int64_t groups,
                                                int32_t* tile) {
  const __m256i low = _mm256_set1_epi16(0x00FF);
  __m256i c[kMr][2];
  for (int r = 0; r < kMr; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * kNr * 4));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * kNr * 4 + 32));
    // Signed bytes at even / odd positions, sign-extended to int16 in place.
    const __m256i b0e = _mm256_srai_epi16(_mm256_slli_epi16(b0, 8), 8);
    const __m256i b0o = _mm256_srai_epi16(b0, 8);
    const __m256i b1e = _mm256_srai_epi16(_mm256_slli_epi16(b1, 8), 8);
    const __m256i b1o = _mm256_srai_epi16(b1, 8);
    for (int r = 0; r < kMr; ++r) {
      const __m256i a = broadcast_u32(u + (g * kMr + r) * 4);
      const __m256i ae = _mm256_and_si256(a, low), ao = _mm256_srli_epi16(a, 8);
      c[r][0] = _mm256_add_epi32(
          c[r][0], _mm256_add_epi32(_mm256_madd_epi16(ae, b0e), _mm256_madd_epi16(ao, b0o)));
      c[r][1] = _mm256_add_epi32(
          c[r][1], _mm256_add_epi32(_mm256_madd_epi16(ae, b1e), _mm256_madd_epi16(ao, b1o)));
    }
  }
  for (int r = 0; r < kMr; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNr), c[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNr + 8), c[r][1]);
  }
}

void micro(const uint8_t* u, int64_t, const int8_t* s, int64_t groups, int i16_groups,
           int32_t* tile) {
  if (i16_groups > 0)
    micro_maddubs(u, s, groups, i16_groups, tile);
  else
    micro_madd(u, s, groups, tile);
}

}  // namespace

const IgemmKernels kIgemmAvx2 = {kMr, kNr, 1, false, micro};

}  // namespace int4ddp::math::detail
