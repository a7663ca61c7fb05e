// AVX2 kernels of BatchNorm (see batchnorm_kernels.h), bit-identical to the portable loops: the
// eight double lanes of each sum live in two ymm registers (lanes 0-3 from the low half of eight
// floats, 4-7 from the high half); a row's last hw % 8 elements are one masked step whose absent
// lanes add +0.0. Rows of a channel are stride floats apart, so the hardware prefetcher restarts
// on each; the kernels prefetch the row kAheadFloats / hw rows ahead themselves.
// Compiled with -mavx2 -mfma (this file only) and used after a run-time CPU check: no code here may
// be shared with other files (no inline library templates), lest the linker keep an AVX2 copy.
#include <immintrin.h>

#include "kernels/math/batchnorm_kernels.h"

namespace int4ddp::math::detail {
namespace {

// How far ahead to prefetch, in floats of the channel's own rows (several short rows, one long).
constexpr int64_t kAheadFloats = 1024;

// The first r (0..8) of eight 32-bit lanes set.
inline __m256i first_lanes(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Rows per prefetch distance (>= 1).
inline int64_t rows_ahead(int64_t hw) {
  return hw >= kAheadFloats ? 1 : (kAheadFloats + hw - 1) / hw;
}

// The row that is `ahead` rows after row i (the last row at the end), for prefetching.
inline const float* ahead_row(const float* base, const ChannelRows& r, int64_t i, int64_t ahead) {
  const int64_t k = i + ahead < r.n ? i + ahead : r.n - 1;
  return base + k * r.stride;
}

inline void prefetch_row(const float* p, int64_t hw) {
  for (int64_t j = 0; j < hw; j += 16)
    _mm_prefetch(reinterpret_cast<const char*>(p + j), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + hw - 1), _MM_HINT_T0);
}

inline void prefetch_row_for_write(float* p, int64_t hw) {
  for (int64_t j = 0; j < hw; j += 16) __builtin_prefetch(p + j, 1);
  __builtin_prefetch(p + hw - 1, 1);
}

// Eight doubles (two ymm): the lanes of one sum.
struct Lanes8 {
  __m256d lo, hi;
};

inline __m256d low_doubles(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d high_doubles(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

void moments_avx2(const float* x, const ChannelRows& r, double shift, double* lanes) {
  Lanes8 s{_mm256_loadu_pd(lanes), _mm256_loadu_pd(lanes + 4)};
  Lanes8 s2{_mm256_loadu_pd(lanes + 8), _mm256_loadu_pd(lanes + 12)};
  const __m256d sh = _mm256_set1_pd(shift);
  const int64_t full = r.hw / 8 * 8;
  const __m256i tail = first_lanes(r.hw - full);
  // The tail's lane masks as doubles (all ones or zero per lane).
  const __m256d tail_lo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(tail)));
  const __m256d tail_hi =
      _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(tail, 1)));
  const int64_t ahead = rows_ahead(r.hw);
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    prefetch_row(ahead_row(x, r, i, ahead), r.hw);
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 v = _mm256_loadu_ps(p + j);
      const __m256d dlo = _mm256_sub_pd(low_doubles(v), sh);
      const __m256d dhi = _mm256_sub_pd(high_doubles(v), sh);
      s.lo = _mm256_add_pd(s.lo, dlo);
      s.hi = _mm256_add_pd(s.hi, dhi);
      s2.lo = _mm256_add_pd(s2.lo, _mm256_mul_pd(dlo, dlo));
      s2.hi = _mm256_add_pd(s2.hi, _mm256_mul_pd(dhi, dhi));
    }
    if (full < r.hw) {
      const __m256 v = _mm256_maskload_ps(p + full, tail);
      const __m256d dlo = _mm256_and_pd(_mm256_sub_pd(low_doubles(v), sh), tail_lo);
      const __m256d dhi = _mm256_and_pd(_mm256_sub_pd(high_doubles(v), sh), tail_hi);
      s.lo = _mm256_add_pd(s.lo, dlo);
      s.hi = _mm256_add_pd(s.hi, dhi);
      s2.lo = _mm256_add_pd(s2.lo, _mm256_mul_pd(dlo, dlo));
      s2.hi = _mm256_add_pd(s2.hi, _mm256_mul_pd(dhi, dhi));
    }
  }
  _mm256_storeu_pd(lanes, s.lo);
  _mm256_storeu_pd(lanes + 4, s.hi);
  _mm256_storeu_pd(lanes + 8, s2.lo);
  _mm256_storeu_pd(lanes + 12, s2.hi);
}

// dy where the ReLU mask passes (x * scale + shift > 0, mul then add), else 0.
template <bool kRelu>
inline __m256 masked_dy(__m256 d, __m256 x, __m256 scale, __m256 shift) {
  if (!kRelu) return d;
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(x, scale), shift);
  return _mm256_and_ps(d, _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GT_OQ));
}

template <bool kRelu>
void grad_moments_avx2(const float* dy, const float* x, const ChannelRows& r, double mean,
                       const ReluMask& relu, double* lanes) {
  Lanes8 a{_mm256_loadu_pd(lanes), _mm256_loadu_pd(lanes + 4)};
  Lanes8 b{_mm256_loadu_pd(lanes + 8), _mm256_loadu_pd(lanes + 12)};
  const __m256d m = _mm256_set1_pd(mean);
  const __m256 scale = _mm256_set1_ps(relu.scale), shift = _mm256_set1_ps(relu.shift);
  const int64_t full = r.hw / 8 * 8;
  const __m256i tail = first_lanes(r.hw - full);
  const __m256d tail_lo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(tail)));
  const __m256d tail_hi =
      _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(tail, 1)));
  const int64_t ahead = rows_ahead(r.hw);
  auto step = [&](__m256 xv, __m256 dv, __m256d keep_lo, __m256d keep_hi) {
    const __m256 d = masked_dy<kRelu>(dv, xv, scale, shift);
    const __m256d dlo = low_doubles(d), dhi = high_doubles(d);
    a.lo = _mm256_add_pd(a.lo, dlo);
    a.hi = _mm256_add_pd(a.hi, dhi);
    const __m256d plo = _mm256_mul_pd(dlo, _mm256_sub_pd(low_doubles(xv), m));
    const __m256d phi = _mm256_mul_pd(dhi, _mm256_sub_pd(high_doubles(xv), m));
    b.lo = _mm256_add_pd(b.lo, _mm256_and_pd(plo, keep_lo));
    b.hi = _mm256_add_pd(b.hi, _mm256_and_pd(phi, keep_hi));
  };
  const __m256d all = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    const float* d = dy + i * r.stride;
    prefetch_row(ahead_row(x, r, i, ahead), r.hw);
    prefetch_row(ahead_row(dy, r, i, ahead), r.hw);
    for (int64_t j = 0; j < full; j += 8)
      step(_mm256_loadu_ps(p + j), _mm256_loadu_ps(d + j), all, all);
    if (full < r.hw)
      step(_mm256_maskload_ps(p + full, tail), _mm256_maskload_ps(d + full, tail), tail_lo,
           tail_hi);
  }
  _mm256_storeu_pd(lanes, a.lo);
  _mm256_storeu_pd(lanes + 4, a.hi);
  _mm256_storeu_pd(lanes + 8, b.lo);
  _mm256_storeu_pd(lanes + 12, b.hi);
}

void grad_moments(const float* dy, const float* x, const ChannelRows& r, double mean,
                  const ReluMask& relu, double* lanes) {
  if (relu.on)
    grad_moments_avx2<true>(dy, x, r, mean, relu, lanes);
  else
    grad_moments_avx2<false>(dy, x, r, mean, relu, lanes);
}

template <bool kRelu>
void affine_avx2(const float* x, float* y, const ChannelRows& r, float scale, float shift) {
  const __m256 g = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift);
  const int64_t full = r.hw / 8 * 8;
  const __m256i tail = first_lanes(r.hw - full);
  const int64_t ahead = rows_ahead(r.hw);
  auto value = [&](__m256 v) {
    const __m256 t = _mm256_add_ps(_mm256_mul_ps(v, g), b);
    // max(t, 0) returns its second operand for a NaN t and for t = -0: as t > 0 ? t : 0.
    return kRelu ? _mm256_max_ps(t, _mm256_setzero_ps()) : t;
  };
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    float* q = y + i * r.stride;
    prefetch_row(ahead_row(x, r, i, ahead), r.hw);
    prefetch_row_for_write(y + (i + 1 < r.n ? i + 1 : i) * r.stride, r.hw);
    for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(q + j, value(_mm256_loadu_ps(p + j)));
    if (full < r.hw) _mm256_maskstore_ps(q + full, tail, value(_mm256_maskload_ps(p + full, tail)));
  }
}

void affine(const float* x, float* y, const ChannelRows& r, float scale, float shift, bool relu) {
  if (relu)
    affine_avx2<true>(x, y, r, scale, shift);
  else
    affine_avx2<false>(x, y, r, scale, shift);
}

template <bool kRelu>
void input_grad_avx2(const float* x, const float* dy, float* dx, const ChannelRows& r,
                     const BnInputGrad& p) {
  const __m256 g = _mm256_set1_ps(p.g), mean = _mm256_set1_ps(p.mean), k = _mm256_set1_ps(p.k);
  const __m256 gmdy = _mm256_set1_ps(p.gmdy);
  const __m256 scale = _mm256_set1_ps(p.relu.scale), shift = _mm256_set1_ps(p.relu.shift);
  const int64_t full = r.hw / 8 * 8;
  const __m256i tail = first_lanes(r.hw - full);
  const int64_t ahead = rows_ahead(r.hw);
  auto value = [&](__m256 xv, __m256 dv) {
    const __m256 d = masked_dy<kRelu>(dv, xv, scale, shift);
    return _mm256_sub_ps(
        _mm256_sub_ps(_mm256_mul_ps(g, d), _mm256_mul_ps(_mm256_sub_ps(xv, mean), k)), gmdy);
  };
  for (int64_t i = 0; i < r.n; ++i) {
    const float* xp = x + i * r.stride;
    const float* dp = dy + i * r.stride;
    float* q = dx + i * r.stride;
    prefetch_row(ahead_row(x, r, i, ahead), r.hw);
    prefetch_row(ahead_row(dy, r, i, ahead), r.hw);
    prefetch_row_for_write(dx + (i + 1 < r.n ? i + 1 : i) * r.stride, r.hw);
    for (int64_t j = 0; j < full; j += 8)
      _mm256_storeu_ps(q + j, value(_mm256_loadu_ps(xp + j), _mm256_loadu_ps(dp + j)));
    if (full < r.hw)
      _mm256_maskstore_ps(
          q + full, tail,
          value(_mm256_maskload_ps(xp + full, tail), _mm256_maskload_ps(dp + full, tail)));
  }
}

void input_grad(const float* x, const float* dy, float* dx, const ChannelRows& r,
                const BnInputGrad& p) {
  if (p.relu.on)
    input_grad_avx2<true>(x, dy, dx, r, p);
  else
    input_grad_avx2<false>(x, dy, dx, r, p);
}

}  // namespace

const BatchNormKernels kBatchNormAvx2 = {moments_avx2, grad_moments, affine, input_grad};

}  // namespace int4ddp::math::detail
