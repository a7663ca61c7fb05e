// AVX512-VNNI micro-kernel of the integer GEMM (see igemm_kernels.h): an 8 x 32 int32 tile, 16 zmm
// accumulators, one vpdpbusd (64 u8 x s8 multiply-adds into int32, no intermediate saturation) per
// accumulator and group. Compiled with a function-level target; run only where cpuid reports
// AVX512F, AVX512BW and AVX512-VNNI.
#include <immintrin.h>

#include <cstring>

#include "kernels/math/igemm_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kMr = 8, kNr = 32;

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void micro(const uint8_t* u, int64_t,
                                                                  const int8_t* s, int64_t groups,
                                                                  int, int32_t* tile) {
  __m512i c[kMr][2];
  for (int r = 0; r < kMr; ++r) c[r][0] = c[r][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i b0 = _mm512_loadu_si512(s + g * kNr * 4);
    const __m512i b1 = _mm512_loadu_si512(s + g * kNr * 4 + 64);
    for (int r = 0; r < kMr; ++r) {
      int32_t v;
      std::memcpy(&v, u + (g * kMr + r) * 4, 4);
      const __m512i a = _mm512_set1_epi32(v);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, b1);
    }
  }
  for (int r = 0; r < kMr; ++r) {
    _mm512_storeu_si512(tile + r * kNr, c[r][0]);
    _mm512_storeu_si512(tile + r * kNr + 16, c[r][1]);
  }
}

}  // namespace

const IgemmKernels kIgemmAvx512Vnni = {kMr, kNr, 1, false, micro};

}  // namespace int4ddp::math::detail
