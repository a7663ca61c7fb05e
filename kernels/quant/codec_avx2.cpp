// AVX2 + FMA kernels for the fast codec driver (CPUs without AVX-512). Same contract and structure
// as codec_avx512.cpp: bit-identical to format.h (z = x * r, no division), 32 elements per body
// step, scalar head and tail. Philox runs 4 instances in the 64-bit lanes of a ymm; one instance
// serves 8 elements (16-bit uniforms), so one ymm chain covers 32 elements.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/quant/codec_kernels.h"

namespace int4ddp::quant::detail {
namespace {

constexpr int kVec = 32;

inline __m256 abs_ps(__m256 v) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int32_t l : lanes) s += l;
  return s;
}

float absmax_avx2(const float* x, int64_t n, int64_t* nonfinite) {
  const __m256 kMax = _mm256_set1_ps(FLT_MAX);
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = abs_ps(_mm256_loadu_ps(x + i));
    const __m256 b = abs_ps(_mm256_loadu_ps(x + i + 8));
    const __m256 fa = _mm256_cmp_ps(a, kMax, _CMP_LE_OQ);
    const __m256 fb = _mm256_cmp_ps(b, kMax, _CMP_LE_OQ);
    m0 = _mm256_max_ps(m0, _mm256_and_ps(a, fa));  // non-finite lanes contribute 0
    m1 = _mm256_max_ps(m1, _mm256_and_ps(b, fb));
    const int ok = _mm256_movemask_ps(_mm256_and_ps(fa, fb));
    if (__builtin_expect(ok != 0xFF, 0))
      bad += 16 - __builtin_popcount(_mm256_movemask_ps(fa)) -
             __builtin_popcount(_mm256_movemask_ps(fb));
  }
  float m = hmax(_mm256_max_ps(m0, m1));
  for (; i < n; ++i) {
    if (is_finite_value(x[i]))
      m = m > __builtin_fabsf(x[i]) ? m : __builtin_fabsf(x[i]);
    else
      ++bad;
  }
  *nonfinite += bad;
  return m;
}

struct PhiloxKeys {
  __m256i k0[kPhiloxRounds], k1[kPhiloxRounds];
  __m256i x2, x3;
  explicit PhiloxKeys(const RngKey& key) {
    uint32_t a = key.seed, b = key.stream;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      if (r > 0) a += kPhiloxW0, b += kPhiloxW1;
      k0[r] = _mm256_set1_epi64x(a);
      k1[r] = _mm256_set1_epi64x(b);
    }
    x2 = _mm256_set1_epi64x(key.step);
    x3 = _mm256_set1_epi64x(key.tensor_id);
  }
};

// The Philox words of the 32 * B elements 8 * group .. 8 * group + 32B - 1, stored in element
// order: words[4j .. 4j + 3] are the four words of instance group + j, which, read as 16-bit
// halves, are the uniforms of elements 8j .. 8j + 7 (the layout of philox.h). B independent chains
// of four instances (one per 64-bit lane: instance group + 4b + k) hide the multiply latency; the
// high halves of the products are swapped down with vpshufd rather than shifted.
template <int B>
inline void philox_words(const PhiloxKeys& pk, uint64_t group, uint32_t* words) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  __m256i x0[B], x1[B], x2[B], x3[B];
  for (int b = 0; b < B; ++b) {
    x0[b] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(group + 4 * b)),
                             _mm256_set_epi64x(3, 2, 1, 0));
    x1[b] = _mm256_srli_epi64(x0[b], 32);
    x2[b] = pk.x2;
    x3[b] = pk.x3;
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      const __m256i p0 = _mm256_mul_epu32(x0[b], m0);
      const __m256i p1 = _mm256_mul_epu32(x2[b], m1);
      x0[b] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p1, 0xB1), x1[b]), pk.k0[r]);
      x1[b] = p1;
      x2[b] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xB1), x3[b]), pk.k1[r]);
      x3[b] = p0;
    }
  }
  for (int b = 0; b < B; ++b) {
    const __m256i lo = _mm256_blend_epi32(x0[b], _mm256_slli_epi64(x1[b], 32), 0xAA);  // v0 v1
    const __m256i hi = _mm256_blend_epi32(x2[b], _mm256_slli_epi64(x3[b], 32), 0xAA);  // v2 v3
    const __m256i i02 = _mm256_unpacklo_epi64(lo, hi);  // instances 0 | 2
    const __m256i i13 = _mm256_unpackhi_epi64(lo, hi);  // instances 1 | 3
    __m256i* out = reinterpret_cast<__m256i*>(words + 16 * b);
    _mm256_store_si256(out, _mm256_permute2x128_si256(i02, i13, 0x20));      // instances 0, 1
    _mm256_store_si256(out + 1, _mm256_permute2x128_si256(i02, i13, 0x31));  // instances 2, 3
  }
}

// u = h * 2^-16 of the eight elements whose Philox words are words[0 .. 3].
inline __m256 uniforms8(const uint32_t* words) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(words)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(h), _mm256_set1_ps(1.52587890625e-5f));  // 2^-16
}

struct QuantConsts {
  __m256 inv, clip, lo, hi, fmax;
};

// int32 codes of 8 elements (non-finite lanes 0), z = x * r then the rounding and the clamp of
// format.h; subtracts -1 from clip_count per clipped lane. NaN and Inf lanes make no NaN code
// (max/min return the bound for a NaN first operand) and are zeroed by the finite mask.
template <bool kStochastic, bool kAllFinite>
inline __m256i quant8(const float* x, const QuantConsts& c, __m256 u, __m256i* clip_count) {
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  constexpr int kFloor = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m256 v = _mm256_loadu_ps(x);
  const __m256 a = abs_ps(v);
  const __m256 fin = kAllFinite ? _mm256_castsi256_ps(_mm256_set1_epi32(-1))
                                : _mm256_cmp_ps(a, c.fmax, _CMP_LE_OQ);
  __m256 clipped = _mm256_cmp_ps(a, c.clip, _CMP_GT_OQ);
  if (!kAllFinite) clipped = _mm256_and_ps(fin, clipped);
  *clip_count = _mm256_sub_epi32(*clip_count, _mm256_castps_si256(clipped));
  const __m256 z = _mm256_mul_ps(v, c.inv);
  const __m256 r =
      kStochastic ? _mm256_round_ps(_mm256_add_ps(z, u), kFloor) : _mm256_round_ps(z, kNear);
  const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, c.lo), c.hi));
  return kAllFinite ? q : _mm256_and_si256(q, _mm256_castps_si256(fin));
}

// Store 32 int32 codes (a: elements 0-7, b: 8-15, c: 16-23, d: 24-31) as int8.
inline void store_codes32(__m256i a, __m256i b, __m256i c, __m256i d, int8_t* codes) {
  const __m256i ab = _mm256_packs_epi32(a, b);  // a0-3 b0-3 | a4-7 b4-7
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i bytes = _mm256_packs_epi16(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), ordered);
}

#ifndef INT4DDP_AVX2_PHILOX_CHAINS
#define INT4DDP_AVX2_PHILOX_CHAINS 4
#endif
constexpr int kChains = INT4DDP_AVX2_PHILOX_CHAINS;  // Philox chains per philox_words call
constexpr int64_t kRngChunk = 512;  // elements whose Philox words are made ahead of quantizing

// n is a multiple of kVec; for stochastic rounding q.first_index is a multiple of 8. Stochastic:
// the Philox words of a chunk are made first (kChains independent chains, which the quantize loop's
// register pressure would not allow), into an L1-resident buffer, then the chunk is quantized.
template <bool kStochastic, bool kAllFinite>
void quant_body(const float* x, int64_t n, const SegmentQuant& q, const QuantConsts& c,
                int8_t* codes, __m256i* count) {
  auto q8 = [&](int64_t i, __m256 u) {
    return quant8<kStochastic, kAllFinite>(x + i, c, u, count);
  };
  if constexpr (kStochastic) {
    const PhiloxKeys pk(q.key);
    const uint64_t group0 = static_cast<uint64_t>(q.first_index) / 8;
    alignas(32) uint32_t words[kRngChunk / 2];  // 4 words per 8 elements
    for (int64_t c0 = 0; c0 < n; c0 += kRngChunk) {
      const int64_t m = std::min(kRngChunk, n - c0);  // a multiple of kVec
      int64_t i = 0;
      for (; i + kVec * kChains <= m; i += kVec * kChains)
        philox_words<kChains>(pk, group0 + static_cast<uint64_t>(c0 + i) / 8, words + i / 2);
      for (; i < m; i += kVec)
        philox_words<1>(pk, group0 + static_cast<uint64_t>(c0 + i) / 8, words + i / 2);
      for (i = 0; i < m; i += kVec) {
        const uint32_t* w = words + i / 2;
        const int64_t j = c0 + i;
        store_codes32(q8(j, uniforms8(w)), q8(j + 8, uniforms8(w + 4)),
                      q8(j + 16, uniforms8(w + 8)), q8(j + 24, uniforms8(w + 12)), codes + j);
      }
    }
  } else {
    const __m256 z = _mm256_setzero_ps();
    for (int64_t i = 0; i + kVec <= n; i += kVec)
      store_codes32(q8(i, z), q8(i + 8, z), q8(i + 16, z), q8(i + 24, z), codes + i);
  }
}

using QuantBodyFn = void (*)(const float*, int64_t, const SegmentQuant&, const QuantConsts&,
                             int8_t*, __m256i*);
// [stochastic][all_finite]
constexpr QuantBodyFn kQuantBodies[2][2] = {{quant_body<false, false>, quant_body<false, true>},
                                            {quant_body<true, false>, quant_body<true, true>}};

int64_t quantize_segment_avx2(const float* x, int64_t n, const SegmentQuant& q, int8_t* codes) {
  const bool stoch = q.rounding == Rounding::kStochastic;
  int64_t head = 0;
  if (stoch) head = std::min<int64_t>(n, (8 - q.first_index % 8) % 8);
  int64_t clipped = 0;
  if (head > 0) clipped += quantize_segment_scalar(x, head, q, codes);
  const float lim = static_cast<float>(levels(q.bits));
  const QuantConsts c{_mm256_set1_ps(q.inv_step), _mm256_set1_ps(q.clip), _mm256_set1_ps(-lim),
                      _mm256_set1_ps(lim), _mm256_set1_ps(FLT_MAX)};
  const int64_t body = (n - head) / kVec * kVec;
  __m256i count = _mm256_setzero_si256();
  SegmentQuant bq = q;
  bq.first_index = q.first_index + head;
  kQuantBodies[stoch][q.all_finite](x + head, body, bq, c, codes + head, &count);
  clipped += hsum_epi32(count);
  const int64_t i = head + body;
  if (i < n) {
    SegmentQuant tail = q;
    tail.first_index = q.first_index + i;
    clipped += quantize_segment_scalar(x + i, n - i, tail, codes + i);
  }
  return clipped;
}

void pack_int4_avx2(const int8_t* codes, int64_t n, uint8_t* out) {
  const __m256i lo_mask = _mm256_set1_epi16(0x000F), hi_mask = _mm256_set1_epi16(0x00F0);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
    const __m256i r = _mm256_or_si256(_mm256_and_si256(w, lo_mask),
                                      _mm256_and_si256(_mm256_srli_epi16(w, 4), hi_mask));
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_castsi256_si128(p));
  }
  for (; i + 1 < n; i += 2) out[i / 2] = pack_nibbles(codes[i], codes[i + 1]);
  if (i < n) out[i / 2] = pack_nibbles(codes[i], 0);
}

void unpack_int4_avx2(const uint8_t* in, int64_t n, int8_t* codes) {
  const __m256i lo_mask = _mm256_set1_epi16(0x000F), hi_mask = _mm256_set1_epi16(0x00F0);
  const __m256i eight = _mm256_set1_epi8(8);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i w =
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i / 2)));
    const __m256i t = _mm256_or_si256(_mm256_and_si256(w, lo_mask),
                                      _mm256_slli_epi16(_mm256_and_si256(w, hi_mask), 4));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                        _mm256_sub_epi8(_mm256_xor_si256(t, eight), eight));
  }
  for (; i < n; ++i)
    codes[i] = static_cast<int8_t>(i % 2 == 0 ? unpack_lo(in[i / 2]) : unpack_hi(in[i / 2]));
}

inline __m256 dequant8(__m128i codes8, __m256 d) {  // low 8 bytes of codes8
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes8)), d);
}

void dequantize_segment_avx2(const int8_t* codes, int64_t n, float step, float* out) {
  const __m256 d = _mm256_set1_ps(step);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i));
    _mm256_storeu_ps(out + i, dequant8(c, d));
    _mm256_storeu_ps(out + i + 8, dequant8(_mm_srli_si128(c, 8), d));
  }
  for (; i < n; ++i) out[i] = dequantize_value(codes[i], step);
}

}  // namespace

extern const CodecKernels kAvx2Kernels = {absmax_avx2, quantize_segment_avx2, pack_int4_avx2,
                                          unpack_int4_avx2, dequantize_segment_avx2};

}  // namespace int4ddp::quant::detail
