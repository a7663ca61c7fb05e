// AVX2 kernels of BatchNorm (see batchnorm_kernels.h), bit-identical to the portable loops: the
// eight double lanes of each sum live in two ymm registers (lanes 0-3 from the low half of eight
// floats, 4-7 from the high half); a row's last hw % 8 elements are one step on a zero-padded copy,
// masked so that its absent lanes add +0.0. Rows of a channel are stride floats apart, so the
// hardware prefetcher restarts on each; the kernels prefetch the row kAheadFloats / hw rows ahead
// themselves.
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

// Stores the first r (< 8) lanes of v at q (AMD's masked stores are microcoded and slow; a row
// of 7x7 ends in one, so the tail goes through a buffer).
inline void store_first(float* q, __m256 v, int64_t r) {
  alignas(32) float block[8];
  _mm256_store_ps(block, v);
  for (int64_t l = 0; l < r; ++l) q[l] = block[l];
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
  if (hw <= 0) return;
  for (int64_t j = 0; j < hw; j += 16)
    _mm_prefetch(reinterpret_cast<const char*>(p + j), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + hw - 1), _MM_HINT_T0);
}

inline void prefetch_row_for_write(float* p, int64_t hw) {
  if (hw <= 0) return;
  for (int64_t j = 0; j < hw; j += 16) __builtin_prefetch(p + j, 1);
  __builtin_prefetch(p + hw - 1, 1);
}

// Eight doubles (two ymm): the lanes of one sum.
struct Lanes8 {
  __m256d lo, hi;
};

inline Lanes8 load_lanes(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
inline void store_lanes(const Lanes8& l, double* p) {
  _mm256_storeu_pd(p, l.lo);
  _mm256_storeu_pd(p + 4, l.hi);
}
inline void add_lanes(Lanes8& acc, __m256d lo, __m256d hi) {
  acc.lo = _mm256_add_pd(acc.lo, lo);
  acc.hi = _mm256_add_pd(acc.hi, hi);
}

// Floats p[0..3] and p[4..7] as doubles (the conversions read memory: no lane shuffles).
inline __m256d low_doubles(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
inline __m256d high_doubles(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p + 4)); }

// A row's last hw % 8 elements (r > 0 of them): copied into a zero-padded block of eight, which
// the full-vector steps then read, and the lane masks that keep only the r present terms.
struct Tail {
  __m256i floats;            // first r of 8 float lanes
  __m256d keep_lo, keep_hi;  // the same as double lanes 0-3 and 4-7
  explicit Tail(int64_t r) : floats(first_lanes(r)) {
    keep_lo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(floats)));
    keep_hi = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(floats, 1)));
  }
  void copy(const float* p, float* block) const {
    _mm256_storeu_ps(block, _mm256_maskload_ps(p, floats));
  }
};

// s += d, s2 += d * d for d = double(p[l]) - shift, l = 0..7 (with kMasked, only the tail's lanes).
template <bool kMasked>
inline void moments_step(const float* p, __m256d shift, const Tail& tail, Lanes8& s, Lanes8& s2) {
  __m256d lo = _mm256_sub_pd(low_doubles(p), shift);
  __m256d hi = _mm256_sub_pd(high_doubles(p), shift);
  if (kMasked) {
    lo = _mm256_and_pd(lo, tail.keep_lo);
    hi = _mm256_and_pd(hi, tail.keep_hi);
  }
  add_lanes(s, lo, hi);
  add_lanes(s2, _mm256_mul_pd(lo, lo), _mm256_mul_pd(hi, hi));
}

void moments_avx2(const float* x, const ChannelRows& r, double shift, double* lanes) {
  Lanes8 s = load_lanes(lanes), s2 = load_lanes(lanes + 8);
  const __m256d sh = _mm256_set1_pd(shift);
  const int64_t full = r.hw / 8 * 8;
  const Tail tail(r.hw - full);
  alignas(32) float block[8];
  const int64_t ahead = rows_ahead(r.hw);
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    prefetch_row(ahead_row(x, r, i, ahead), r.hw);
    for (int64_t j = 0; j < full; j += 8) moments_step<false>(p + j, sh, tail, s, s2);
    if (full < r.hw) {
      tail.copy(p + full, block);
      moments_step<true>(block, sh, tail, s, s2);
    }
  }
  store_lanes(s, lanes);
  store_lanes(s2, lanes + 8);
}

// dy where the ReLU mask passes (x * scale + shift > 0, mul then add), else 0.
template <bool kRelu>
inline __m256 masked_dy(__m256 d, __m256 x, __m256 scale, __m256 shift) {
  if (!kRelu) return d;
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(x, scale), shift);
  return _mm256_and_ps(d, _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GT_OQ));
}

// a += d, b += d * (double(x) - mean) for the eight elements at xp, dp (kMasked: the tail's lanes).
template <bool kRelu, bool kMasked>
inline void grad_step(const float* xp, const float* dp, __m256d mean, __m256 scale, __m256 shift,
                      const Tail& tail, Lanes8& a, Lanes8& b) {
  __m256d dlo, dhi;
  if (kRelu) {
    const __m256 d = masked_dy<true>(_mm256_loadu_ps(dp), _mm256_loadu_ps(xp), scale, shift);
    dlo = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
    dhi = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
  } else {
    dlo = low_doubles(dp);
    dhi = high_doubles(dp);
  }
  add_lanes(a, dlo, dhi);  // absent tail lanes hold d = +0.0
  __m256d plo = _mm256_mul_pd(dlo, _mm256_sub_pd(low_doubles(xp), mean));
  __m256d phi = _mm256_mul_pd(dhi, _mm256_sub_pd(high_doubles(xp), mean));
  if (kMasked) {  // 0 * (0 - mean) is NaN for an infinite mean
    plo = _mm256_and_pd(plo, tail.keep_lo);
    phi = _mm256_and_pd(phi, tail.keep_hi);
  }
  add_lanes(b, plo, phi);
}

template <bool kRelu>
void grad_moments_avx2(const float* dy, const float* x, const ChannelRows& r, double mean,
                       const ReluMask& relu, double* lanes) {
  Lanes8 a = load_lanes(lanes), b = load_lanes(lanes + 8);
  const __m256d m = _mm256_set1_pd(mean);
  const __m256 scale = _mm256_set1_ps(relu.scale), shift = _mm256_set1_ps(relu.shift);
  const int64_t full = r.hw / 8 * 8;
  const Tail tail(r.hw - full);
  alignas(32) float xb[8], db[8];
  const int64_t ahead = rows_ahead(r.hw);
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    const float* d = dy + i * r.stride;
    prefetch_row(ahead_row(x, r, i, ahead), r.hw);
    prefetch_row(ahead_row(dy, r, i, ahead), r.hw);
    for (int64_t j = 0; j < full; j += 8)
      grad_step<kRelu, false>(p + j, d + j, m, scale, shift, tail, a, b);
    if (full < r.hw) {
      tail.copy(p + full, xb);
      tail.copy(d + full, db);
      grad_step<kRelu, true>(xb, db, m, scale, shift, tail, a, b);
    }
  }
  store_lanes(a, lanes);
  store_lanes(b, lanes + 8);
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
    if (full < r.hw) store_first(q + full, value(_mm256_maskload_ps(p + full, tail)), r.hw - full);
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
      store_first(q + full,
                  value(_mm256_maskload_ps(xp + full, tail), _mm256_maskload_ps(dp + full, tail)),
                  r.hw - full);
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
