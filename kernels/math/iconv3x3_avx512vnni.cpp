// AVX512-VNNI tiles of the integer 3x3 convolution (iconv3x3_kernels.h): vpdpbusd multiplies 4
// unsigned bytes by 4 signed bytes per int32 lane and adds the 4 products straight into the lane,
// so there is no int16 pair sum to saturate and every code width 2..8 runs (the driver's int32
// guard bounds the sums). Compiled with function-level targets; run only where the CPU reports
// AVX-512F and AVX512-VNNI (iconv3x3_isa_available).
//   forward  8 output channels x 32 flat positions: per channel group and tap, 2 zmm of input
//            pixels (the unsigned operand) and 8 broadcast 4-byte weight rows (the signed one),
//            16 accumulators.
//   wgrad    8 (channel, tap) rows x 16 output channels: per group of 4 positions, 1 zmm of dy
//            (signed) and 8 broadcast 4-byte input rows (unsigned); even and odd groups go to two
//            accumulator sets (16 independent chains), added at the end.
#include <immintrin.h>

#include <cstring>

#include "kernels/math/iconv3x3_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kMr = 8, kNv = 2, kNr = 16 * kNv;  // forward tile
constexpr int kWgMr = 8, kWgNr = 16;             // backward-weight tile
static_assert(kWeightRows % kMr == 0, "a forward tile reads one packed weight block");

__attribute__((target("avx512f"))) inline __m512i broadcast_u32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The accumulators are named variables, not arrays: with arrays GCC 12 copied them between
// registers every group and kept two on the stack, a store-to-load round trip on their chains.
__attribute__((target("avx512f,avx512vnni"))) void tile(const uint8_t* xp, const int64_t* goff,
                                                        const int8_t* wp, int64_t groups, int64_t,
                                                        const int32_t* corr, float scale,
                                                        float* res) {
  static_assert(kMr == 8 && kNv == 2, "tile() is written out for 8 x 32");
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
          c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00,
          c70 = c00, c71 = c00;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* x = xp + goff[g];
    const int8_t* wg = wp + g * kWeightGroup;
    const __m512i b0 = _mm512_loadu_si512(x), b1 = _mm512_loadu_si512(x + 64);
    // Row r: its 4 weight bytes (signed) against both vectors of input pixels (unsigned).
#define ICONV_VNNI_ROW(R, C0, C1)                \
  {                                              \
    const __m512i a = broadcast_u32(wg + 4 * R); \
    C0 = _mm512_dpbusd_epi32(C0, b0, a);         \
    C1 = _mm512_dpbusd_epi32(C1, b1, a);         \
  }
    ICONV_VNNI_ROW(0, c00, c01)
    ICONV_VNNI_ROW(1, c10, c11)
    ICONV_VNNI_ROW(2, c20, c21)
    ICONV_VNNI_ROW(3, c30, c31)
    ICONV_VNNI_ROW(4, c40, c41)
    ICONV_VNNI_ROW(5, c50, c51)
    ICONV_VNNI_ROW(6, c60, c61)
    ICONV_VNNI_ROW(7, c70, c71)
#undef ICONV_VNNI_ROW
  }
  const __m512i c[kMr * kNv] = {c00, c01, c10, c11, c20, c21, c30, c31,
                                c40, c41, c50, c51, c60, c61, c70, c71};
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < kMr; ++r) {
    const __m512i cr = _mm512_set1_epi32(corr[r]);
    for (int v = 0; v < kNv; ++v)
      _mm512_storeu_ps(res + r * kNr + 16 * v,
                       _mm512_mul_ps(sc, _mm512_cvtepi32_ps(_mm512_sub_epi32(c[r * kNv + v], cr))));
  }
}

__attribute__((target("avx512f,avx512vnni"))) void wgrad_tile(const uint8_t* xb,
                                                              const int64_t* roff,
                                                              const uint8_t* db, int64_t ostride,
                                                              int64_t groups, int64_t, int32_t* t) {
  static_assert(kWgMr == 8, "wgrad_tile() is written out for 8 rows");
  const uint8_t *x0 = xb + roff[0], *x1 = xb + roff[1], *x2 = xb + roff[2], *x3 = xb + roff[3],
                *x4 = xb + roff[4], *x5 = xb + roff[5], *x6 = xb + roff[6], *x7 = xb + roff[7];
  const int64_t gstride = ostride * 4;
  // Set e takes the even groups, set o the odd ones (groups is even and >= 2: the driver pads K
  // with zero dy). The first pair starts the sums from zero outside the loop: with every
  // accumulator zeroed before it, GCC 12 (its PRE pass) copied them between registers every
  // iteration and kept some on the stack.
  const __m512i z = _mm512_setzero_si512();
  __m512i e0, e1, e2, e3, e4, e5, e6, e7, o0, o1, o2, o3, o4, o5, o6, o7;
  // C = S(C) + row X's 4 input bytes at byte B (unsigned) times dy's vector D (signed); S is
  // ICONV_VNNI_ZERO (the first pair) or ICONV_VNNI_SELF.
#define ICONV_VNNI_ZERO(C) z
#define ICONV_VNNI_SELF(C) C
#define ICONV_VNNI_ACC(C, S, X, B, D) C = _mm512_dpbusd_epi32(S(C), broadcast_u32(X + (B)), D)
// Row R of both sets: the even group's 4 bytes at B against d0, the odd group's at B + 4 against
// d1.
#define ICONV_VNNI_ROW(S, B, R)         \
  ICONV_VNNI_ACC(e##R, S, x##R, B, d0); \
  ICONV_VNNI_ACC(o##R, S, x##R, (B) + 4, d1)
#define ICONV_VNNI_PAIR(S, B) \
  ICONV_VNNI_ROW(S, B, 0);    \
  ICONV_VNNI_ROW(S, B, 1);    \
  ICONV_VNNI_ROW(S, B, 2);    \
  ICONV_VNNI_ROW(S, B, 3);    \
  ICONV_VNNI_ROW(S, B, 4);    \
  ICONV_VNNI_ROW(S, B, 5);    \
  ICONV_VNNI_ROW(S, B, 6);    \
  ICONV_VNNI_ROW(S, B, 7)
  {
    const __m512i d0 = _mm512_loadu_si512(db), d1 = _mm512_loadu_si512(db + gstride);
    ICONV_VNNI_PAIR(ICONV_VNNI_ZERO, 0);
  }
  for (int64_t g = 2; g < groups; g += 2) {
    const __m512i d0 = _mm512_loadu_si512(db + g * gstride);
    const __m512i d1 = _mm512_loadu_si512(db + (g + 1) * gstride);
    ICONV_VNNI_PAIR(ICONV_VNNI_SELF, 4 * g);
  }
#undef ICONV_VNNI_PAIR
#undef ICONV_VNNI_ROW
#undef ICONV_VNNI_ACC
#undef ICONV_VNNI_SELF
#undef ICONV_VNNI_ZERO
  const __m512i sums[kWgMr] = {_mm512_add_epi32(e0, o0), _mm512_add_epi32(e1, o1),
                               _mm512_add_epi32(e2, o2), _mm512_add_epi32(e3, o3),
                               _mm512_add_epi32(e4, o4), _mm512_add_epi32(e5, o5),
                               _mm512_add_epi32(e6, o6), _mm512_add_epi32(e7, o7)};
  for (int r = 0; r < kWgMr; ++r) _mm512_storeu_si512(t + r * kWgNr, sums[r]);
}

}  // namespace

const Iconv3x3Kernels kIconv3x3Avx512Vnni = {false, kMr, kNr, kWgMr, kWgNr, tile, wgrad_tile};

}  // namespace int4ddp::math::detail
