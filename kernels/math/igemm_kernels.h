// Internal: the per-ISA micro-kernels of the integer GEMM driver (igemm.cpp). Each ISA file fills
// one table; its functions carry their own target attributes, so every file compiles without
// per-file ISA flags and the driver calls a table only after igemm_isa_available() said yes.
//
// Packed panels (built by the driver, shared by every ISA):
//   s8 side  an NR-column panel: for each group g of 4 k, NR columns of 4 signed bytes,
//            s[(g * nr + j) * 4 + q] = S(4g + q, j); padded k and columns are 0.
//   u8 side  an MR-row panel: for each group, MR rows of 4 unsigned bytes,
//            u[(g * mr + i) * 4 + q] = U(i, 4g + q) (u_row_major = false), or row-major,
//            u[i * u_stride + 4g + q] (u_row_major = true, the AMX A-tile layout).
// A micro-kernel computes the MR x NR int32 tile (row-major, nr per row, overwritten)
//   tile[i][j] = sum over `groups` groups of sum_q u(i, 4g + q) * s(4g + q, j).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/math/igemm.h"

namespace int4ddp::math::detail {

struct IgemmKernels {
  int mr, nr;        // tile rows (u8 side) and columns (s8 side)
  int group_align;   // groups per call are a multiple of this (AMX: 16); panels padded
  bool u_row_major;  // u8-side panel layout (see above)
  // i16_groups: > 0 allows summing that many groups of maddubs pairs in int16 (no saturation,
  // proven by the driver); 0 = operands too large for int16 pair sums (AVX2 only; others ignore).
  void (*micro)(const uint8_t* u, int64_t u_stride, const int8_t* s, int64_t groups, int i16_groups,
                int32_t* tile);
};

extern const IgemmKernels kIgemmAvx2;
extern const IgemmKernels kIgemmAvx512Vnni;
extern const IgemmKernels kIgemmAmx;

// igemm (float output) through an explicit table: tests drive the driver's packing for the VNNI
// and AMX layouts with scalar models of those micro-kernels on CPUs that lack them.
void igemm_with_kernels(const IgemmKernels& kn, int64_t m, int64_t n, int64_t k,
                        const CodeMatrix& a, const CodeMatrix& b, float scale, bool accumulate,
                        float* c, int64_t ldc);

// The packed-operand entry points (igemm.h) through an explicit table, for the same tests.
void pack_a(const IgemmKernels& kn, int64_t m, int64_t k, const CodeMatrix& a, IgemmPackedA* out);
void pack_b(const IgemmKernels& kn, int64_t k, int64_t n, const CodeMatrix& b, IgemmPackedB* out);
void pack_conv(const IgemmKernels& kn, const ConvColumns& geo, const void* images, bool is_unsigned,
               int qmax, int64_t s0, int64_t g, IgemmPackedB* cols, IgemmPackedB* cols_t);
void igemm_packed_run(const IgemmPackedA& a, const IgemmPackedB& b, float scale, bool accumulate,
                      float* c, int64_t ldc);

// 4 rows of 16 bytes -> 16 columns of 4 bytes at dst (column j: r0[j], r1[j], r2[j], r3[j]), the
// s8-side panel's group layout; also iconv3x3's 4-channel pixels (SSE2 only).
inline void interleave_4x16(__m128i r0, __m128i r1, __m128i r2, __m128i r3, void* dst) {
  const __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
  const __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
  __m128i* d = static_cast<__m128i*>(dst);
  _mm_storeu_si128(d, _mm_unpacklo_epi16(t0, t2));
  _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(t0, t2));
  _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(t1, t3));
  _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(t1, t3));
}

// Linux: ask once per process for the AMX tile-data state; false when the kernel refuses.
bool amx_permitted();

}  // namespace int4ddp::math::detail
