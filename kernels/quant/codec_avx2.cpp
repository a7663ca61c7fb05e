// AVX2 + FMA kernels for the fast codec driver (CPUs without AVX-512). Bit-identical to format.h
// (z = x * r, no division). Quantize: 64- and 32-element steps and a scalar tail; rounding clamps
// at +L in float and converts, and the saturating packs to int8 plus one max_epi8 clamp at -L
// (never a per-element branch). INT4 has fused kernels: quantize straight into nibbles, and
// unpack + dequantize from the packed bytes (no int8 staging). Stochastic: Philox runs 4
// instances in the 64-bit lanes of a ymm, 2 chains; one instance serves 8 elements (16-bit
// uniforms); the words of the next 512-element chunk are made between the quantize steps of the
// current one. Where the segment starts a Philox group they are stored in the pair layout, from
// which one unpack with the exponent of 128.0f and one subtraction give eight uniforms as floats;
// otherwise in element order, read back from each element's own half-word (any first index, no
// scalar head). The fused quantize prefetches its own input ahead (kPrefetchAhead); the driver
// then does not. INT4 decodes of 32 MiB and more take the streaming kernel (non-temporal stores).
// The error-feedback variant of the fused INT4 quantize (quantize_feedback) adds e to x as it loads
// it and writes v - x^ (optionally streamed) and x^ from the codes it has just made, in the same
// steps.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/quant/codec_kernels.h"

namespace int4ddp::quant::detail {
namespace {

#define INT4DDP_ALWAYS_INLINE inline __attribute__((always_inline))

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

// max |x| with the finite test: the careful scan, used when the fast one below saw NaN or Inf.
float absmax_checked(const float* x, int64_t n, int64_t* nonfinite) {
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

// max |x| as the integer maximum of the sign-cleared bit patterns: for non-negative floats the
// integer order is the float order, and Inf/NaN patterns (> FLT_MAX's) win, so one compare at the
// end tells whether the scope is all finite (two operations per 8 elements instead of four).
float absmax_avx2(const float* x, int64_t n, int64_t* nonfinite) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  auto bits = [&](int64_t i) {
    return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), abs_mask);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epi32(m0, bits(i));
    m1 = _mm256_max_epi32(m1, bits(i + 8));
    m2 = _mm256_max_epi32(m2, bits(i + 16));
    m3 = _mm256_max_epi32(m3, bits(i + 24));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_epi32(m0, bits(i));
  m0 = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
  __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xB1));
  uint32_t m = static_cast<uint32_t>(_mm_cvtsi128_si32(h));
  for (; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7fffffffu;
    m = m > b ? m : b;
  }
  if (m > 0x7f7fffffu) return absmax_checked(x, n, nonfinite);  // a NaN or an Inf
  float r;
  std::memcpy(&r, &m, 4);
  return r;
}

// The first two rounds of groups that share the high counter word: counter words 1, 2, 3 are then
// the same for every instance, so round 1 has one varying product (M0 * word 0) and round 2 one
// (M1 * word 2); the rest of those rounds is constants, computed here once per high word in scalar
// arithmetic (the same operations as philox4x32_10, only reordered: xor is associative).
struct PhiloxHead {
  __m256i c;  // round 1: word 2 = hi(M0 * w0) ^ c
  __m256i e;  // round 2: word 0 = hi(M1 * word 2) ^ e
  __m256i f;  // round 2: word 2 = (round-1 word 3) ^ f
  __m256i g;  // round 3: word 2 = hi(M0 * word 0) ^ g (word 3 of round 2 is a constant)
  PhiloxHead(const RngKey& k, uint32_t group_hi) {
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * k.step;
    const uint32_t w0 = static_cast<uint32_t>(p1 >> 32) ^ group_hi ^ k.seed;  // round-1 word 0
    const uint32_t w1 = static_cast<uint32_t>(p1);                            // round-1 word 1
    const uint64_t d = static_cast<uint64_t>(kPhiloxM0) * w0;                 // round-2 M0 product
    c = _mm256_set1_epi64x(k.tensor_id ^ k.stream);
    e = _mm256_set1_epi64x(w1 ^ (k.seed + kPhiloxW0));
    f = _mm256_set1_epi64x(static_cast<uint32_t>(d >> 32) ^ (k.stream + kPhiloxW1));
    g = _mm256_set1_epi64x(static_cast<uint32_t>(d) ^ (k.stream + 2 * kPhiloxW1));
  }
};

// Round keys of one RngKey, broadcast, and the folded first rounds for the high counter word in
// use (recomputed only when it changes, i.e. practically never).
struct PhiloxKeys {
  __m256i k0[kPhiloxRounds], k1[kPhiloxRounds];
  RngKey key;
  uint32_t head_hi = 0;
  PhiloxHead head;
  explicit PhiloxKeys(const RngKey& k) : key(k), head(k, 0) {
    uint32_t a = k.seed, b = k.stream;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      if (r > 0) a += kPhiloxW0, b += kPhiloxW1;
      k0[r] = _mm256_set1_epi64x(a);
      k1[r] = _mm256_set1_epi64x(b);
    }
  }
  const PhiloxHead& head_for(uint32_t group_hi) {
    if (group_hi != head_hi) {
      head = PhiloxHead(key, group_hi);
      head_hi = group_hi;
    }
    return head;
  }
};

// The Philox words of the 32 * B elements 8 * group .. 8 * group + 32B - 1, stored in element
// order: words[4j .. 4j + 3] are the four words of instance group + j, which, read as 16-bit
// halves, are the uniforms of elements 8j .. 8j + 7 (the layout of philox.h). B independent chains
// of four instances (one per 64-bit lane: instance group + 4b + k) hide the multiply latency; the
// high halves of the products are swapped down with vpshufd rather than shifted, and the state
// words keep the garbage upper halves that vpmuludq ignores. All instances must share group >> 32
// (head: the folded first two rounds for that high word). kPairs: the pair layout instead, where
// the 32 bytes of instances 2p, 2p + 1 hold words 0, 1 of 2p, words 0, 1 of 2p + 1, then words 2, 3
// of each (see uniforms16).
template <int B, bool kPairs>
inline void philox_words(const PhiloxKeys& pk, const PhiloxHead& head, uint64_t group,
                         uint32_t* words) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  auto swap = [](__m256i p) { return _mm256_shuffle_epi32(p, 0xB1); };  // hi half to lo
  __m256i x0[B], x1[B], x2[B], x3[B];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {  // rounds 1 and 2
    const __m256i w0 = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(group + 4 * b)),
                                        _mm256_set_epi64x(3, 2, 1, 0));
    const __m256i p0 = _mm256_mul_epu32(w0, m0);
    const __m256i p1 = _mm256_mul_epu32(_mm256_xor_si256(swap(p0), head.c), m1);
    x0[b] = _mm256_xor_si256(swap(p1), head.e);
    x1[b] = p1;
    x2[b] = _mm256_xor_si256(p0, head.f);
  }
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {  // round 3
    const __m256i p0 = _mm256_mul_epu32(x0[b], m0);
    const __m256i p1 = _mm256_mul_epu32(x2[b], m1);
    x0[b] = _mm256_xor_si256(swap(p1), _mm256_xor_si256(x1[b], pk.k0[2]));
    x1[b] = p1;
    x2[b] = _mm256_xor_si256(swap(p0), head.g);
    x3[b] = p0;
  }
  for (int r = 3; r < kPhiloxRounds - 1; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
      const __m256i p0 = _mm256_mul_epu32(x0[b], m0);
      const __m256i p1 = _mm256_mul_epu32(x2[b], m1);
      x0[b] = _mm256_xor_si256(swap(p1), _mm256_xor_si256(x1[b], pk.k0[r]));
      x1[b] = p1;
      x2[b] = _mm256_xor_si256(swap(p0), _mm256_xor_si256(x3[b], pk.k1[r]));
      x3[b] = p0;
    }
  }
  // Round 10. With the upper halves of x1 and x3 cleared before the key is xored in, the upper
  // half of the new word 0 (a swapped product) is the new word 1, and that of word 2 is word 3:
  // each 64-bit lane holds a word pair, without shifts or blends.
  const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    const __m256i p0 = _mm256_mul_epu32(x0[b], m0);
    const __m256i p1 = _mm256_mul_epu32(x2[b], m1);
    const __m256i lo = _mm256_xor_si256(
        swap(p1), _mm256_xor_si256(_mm256_blend_epi32(x1[b], zero, 0xAA), pk.k0[9]));  // v0 v1
    const __m256i hi = _mm256_xor_si256(
        swap(p0), _mm256_xor_si256(_mm256_blend_epi32(x3[b], zero, 0xAA), pk.k1[9]));  // v2 v3
    __m256i* out = reinterpret_cast<__m256i*>(words + 16 * b);
    if constexpr (kPairs) {  // v0 v1 of instances 0, 1 | v2 v3 of 0, 1; then the same for 2, 3
      _mm256_storeu_si256(out, _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
    } else {
      const __m256i i02 = _mm256_unpacklo_epi64(lo, hi);                        // instances 0 | 2
      const __m256i i13 = _mm256_unpackhi_epi64(lo, hi);                        // instances 1 | 3
      _mm256_storeu_si256(out, _mm256_permute2x128_si256(i02, i13, 0x20));      // instances 0, 1
      _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(i02, i13, 0x31));  // instances 2, 3
    }
  }
}

#ifndef INT4DDP_AVX2_PHILOX_CHAINS
#define INT4DDP_AVX2_PHILOX_CHAINS 2
#endif
constexpr int kChains = INT4DDP_AVX2_PHILOX_CHAINS;  // Philox chains per philox_words call

// The words of instances group .. group + count - 1 (count a multiple of 4) into words[4 * count];
// where group >> 32 changes inside, up to 3 more instances past the end are written.
template <bool kPairs>
inline void philox_range(PhiloxKeys& pk, uint64_t group, int64_t count, uint32_t* words) {
  const uint64_t last = group + static_cast<uint64_t>(count) - 1;
  if ((group >> 32) != (last >> 32)) {  // the high counter word changes inside: split there
    const int64_t first_part = static_cast<int64_t>((last >> 32 << 32) - group);
    philox_range<kPairs>(pk, group, first_part, words);
    philox_range<kPairs>(pk, group + static_cast<uint64_t>(first_part), count - first_part,
                         words + 4 * first_part);
    return;
  }
  const PhiloxHead& head = pk.head_for(static_cast<uint32_t>(group >> 32));
  int64_t j = 0;
  for (; j + 4 * kChains <= count; j += 4 * kChains)
    philox_words<kChains, kPairs>(pk, head, group + static_cast<uint64_t>(j), words + 4 * j);
  for (; j < count; j += 4)
    philox_words<1, kPairs>(pk, head, group + static_cast<uint64_t>(j), words + 4 * j);
}

struct QuantConsts {
  __m256 inv, clip, hi, fmax;
  __m256i lo8;            // -L in every byte
  __m256 sat_hi, sat_lo;  // +-SegmentQuant::saturate_at (+-inf: no saturation)
  __m256 step;            // d (error feedback: x^ = code * d)
  __m256i lo32;           // -L in every int32 (error feedback: the code's lower clamp)
};

// int32 codes of 8 elements (non-finite lanes 0), z = x * r then the rounding of format.h, clamped
// above at L only: the caller's saturating packs to int8 and max_epi8(-L) clamp below (z < -2^31
// converts to INT_MIN, which saturates the same way). Clamping before rounding gives the same code
// because L is an integer. Nearest rounds with cvtps in the current (default nearest-even) mode,
// as rintf does. u: the eight uniforms (stochastic). Subtracts -1 from clip_count per
// clipped lane. NaN and Inf lanes never make a NaN code (min returns L for a NaN first operand)
// and are zeroed by the finite mask. kSaturate: clamp x to +-saturate_at first (given clips; a NaN
// lane becomes sat_hi and is zeroed the same way).
template <bool kStochastic, bool kAllFinite, bool kSaturate>
inline __m256i quant8(__m256 v, const QuantConsts& c, __m256 u, __m256i* clip_count) {
  const __m256 a = abs_ps(v);
  __m256 clipped = _mm256_cmp_ps(a, c.clip, _CMP_GT_OQ);
  __m256 fin;
  if (!kAllFinite) {
    fin = _mm256_cmp_ps(a, c.fmax, _CMP_LE_OQ);
    clipped = _mm256_and_ps(fin, clipped);
  }
  *clip_count = _mm256_sub_epi32(*clip_count, _mm256_castps_si256(clipped));
  const __m256 z =
      _mm256_mul_ps(kSaturate ? _mm256_max_ps(_mm256_min_ps(v, c.sat_hi), c.sat_lo) : v, c.inv);
  __m256i q;
  if constexpr (kStochastic) {
    const __m256 t = _mm256_min_ps(_mm256_add_ps(z, u), c.hi);
    q = _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
  } else {
    q = _mm256_cvtps_epi32(_mm256_min_ps(z, c.hi));
  }
  if (!kAllFinite) q = _mm256_and_si256(q, _mm256_castps_si256(fin));
  return q;
}

// The uniforms u = h * 2^-16 of the 32 elements whose 16-bit halves h start at h (four vectors of
// eight elements). Element order (kPairs false): halves in element order, zero-extended and
// converted. Pair layout (kPairs, see philox_words): the 32 bytes at h + 16j hold, per 128-bit
// lane, four halves of the first and four of the second instance, so interleaving them with
// 0x4300 (the upper half of 128.0f) gives the floats 128 + h * 2^-16 of elements 16j .. 16j + 7
// (unpacklo) and 16j + 8 .. 16j + 15 (unpackhi) in order; subtracting 128 is exact.
template <bool kPairs>
INT4DDP_ALWAYS_INLINE void uniforms32(const uint16_t* h, __m256* u) {
  if constexpr (kPairs) {
    const __m256i hi = _mm256_set1_epi16(0x4300);
    const __m256 base = _mm256_set1_ps(128.0f);
    for (int j = 0; j < 2; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16 * j));
      u[2 * j] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(w, hi)), base);
      u[2 * j + 1] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(w, hi)), base);
    }
  } else {
    for (int k = 0; k < 4; ++k) {
      const __m256i hw =
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8 * k)));
      u[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(hw), _mm256_set1_ps(1.52587890625e-5f));
    }
  }
}

// 32 int32 codes (a: elements 0-7, b: 8-15, c: 16-23, d: 24-31) as clamped int8, in the lane
// order of the packs: a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7.
inline __m256i codes_to_bytes(__m256i a, __m256i b, __m256i c, __m256i d, __m256i lo8) {
  return _mm256_max_epi8(_mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)),
                         lo8);
}

// Bytes of codes_to_bytes to 16-bit words holding the packed byte of each adjacent pair
// (low nibble the even element): A01 A23 B01 B23 C01 C23 D01 D23 | A45 A67 B45 ... D67.
inline __m256i nibble_words(__m256i bytes) {
  return _mm256_maddubs_epi16(_mm256_and_si256(bytes, _mm256_set1_epi8(0x0F)),
                              _mm256_set1_epi16(0x1001));  // lo * 1 + hi * 16
}

// Writes the results of one 32-element step: packed (16 bytes) or int8 codes (32 bytes).
template <bool kPack>
inline void emit32(__m256i bytes, void* out) {
  if constexpr (kPack) {
    const __m256i p = _mm256_packus_epi16(nibble_words(bytes), _mm256_setzero_si256());
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_unpacklo_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
  } else {
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(out),
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

// Writes two 32-element steps as 32 packed bytes: one packus, one permq and one pshufb for 64
// elements.
inline void emit64_packed(__m256i bytes0, __m256i bytes1, uint8_t* out) {
  const __m256i p = _mm256_permute4x64_epi64(
      _mm256_packus_epi16(nibble_words(bytes0), nibble_words(bytes1)), 0xD8);
  const __m256i order = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1,
                                         8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_shuffle_epi8(p, order));
}

constexpr int64_t kRngChunk = 512;  // elements whose Philox words are made ahead of quantizing
// Input elements prefetched ahead by the fused kernel, one cache line per 16 elements spread over
// the quantize steps (past the segment's end, into the scopes the driver quantizes next): the
// memory system keeps streaming while the core computes, which a burst of prefetches once per
// scope, or the hardware prefetcher alone, did not achieve.
constexpr int64_t kPrefetchAhead = 2048;

// The vector body over x[0, m), m a multiple of 32, in 64- and 32-element steps: out is packed INT4
// (kPack; x[0] in the low nibble of out[0]) or int8 codes. h: the uniforms of x[0] on
// (stochastic). between(): called once per step (the next chunk's Philox work, interleaved so that
// the out-of-order core runs the integer Philox and the floating-point quantizing side by side).
// Everything is passed by value so that the constants stay in registers across the stores (a
// closure captured by reference was reloaded from the stack after every store). Returns the
// negated per-lane clipped counts.
// kFeedback: v = x + fb.e (where fb.e is set) is quantized, and fb.e_out = v - x^, fb.dq_out = x^
// are written where set (fb's pointers at x[0]; x^ = max(q, -L) * d, the code dequantize() reads).
template <bool kStochastic, bool kAllFinite, bool kPack, bool kSaturate, bool kPairs,
          bool kFeedback, typename Between>
INT4DDP_ALWAYS_INLINE __m256i quant_body(const float* x, int64_t m, const uint16_t* h,
                                         const QuantConsts c, const Feedback fb, uint8_t* out,
                                         Between&& between) {
  __m256i count = _mm256_setzero_si256();
  auto step32 = [&](int64_t i) __attribute__((always_inline)) {
    __m256 u[4];
    if constexpr (kStochastic) uniforms32<kPairs>(h + i, u);
    auto q8 = [&](int k) __attribute__((always_inline)) {
      const int64_t at = i + 8 * k;
      __m256 v = _mm256_loadu_ps(x + at);
      if constexpr (kFeedback)
        if (fb.e) v = _mm256_add_ps(v, _mm256_loadu_ps(fb.e + at));
      const __m256i q = quant8<kStochastic, kAllFinite, kSaturate>(v, c, u[k], &count);
      if constexpr (kFeedback) {
        const __m256 dq = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_max_epi32(q, c.lo32)), c.step);
        if (fb.e_out) {
          const __m256 err = _mm256_sub_ps(v, dq);
          if (fb.stream_e_out) {
            _mm_stream_ps(fb.e_out + at, _mm256_castps256_ps128(err));
            _mm_stream_ps(fb.e_out + at + 4, _mm256_extractf128_ps(err, 1));
          } else {
            _mm256_storeu_ps(fb.e_out + at, err);
          }
        }
        if (fb.dq_out) _mm256_storeu_ps(fb.dq_out + at, dq);
      }
      return q;
    };
    const __m256i a = q8(0), b = q8(1), cc = q8(2), d = q8(3);
    return codes_to_bytes(a, b, cc, d, c.lo8);
  };
  int64_t i = 0;
  if constexpr (kPack) {
    for (; i + 64 <= m; i += 64) {
      between();
      for (int l = 0; l < 64; l += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(x + i + l + kPrefetchAhead), _MM_HINT_T0);
        if constexpr (kFeedback)
          if (fb.e)
            _mm_prefetch(reinterpret_cast<const char*>(fb.e + i + l + kPrefetchAhead), _MM_HINT_T0);
      }
      const __m256i b0 = step32(i);
      const __m256i b1 = step32(i + 32);
      emit64_packed(b0, b1, out + i / 2);
    }
  }
  for (; i < m; i += 32) {
    between();
    emit32<kPack>(step32(i), out + (kPack ? i / 2 : i));
  }
  return count;
}

// The whole segment: the vector body, then a scalar tail of < 32. kPack: out is packed INT4
// (segment starting at a low nibble), else int8 codes. Stochastic: the Philox words of each chunk
// are made first (kChains independent chains, which the quantize loop's register pressure would
// not allow) into an L1-resident buffer: in the pair layout when the segment starts a group and the
// high counter word does not change inside it, else in element order, read back as 16-bit
// uniforms from the element's own half-word, so any first_index works without a scalar head.
// kFeedback (kPack only): the error-feedback streams of fb as in quant_body.
template <bool kStochastic, bool kAllFinite, bool kPack, bool kSaturate, bool kFeedback = false>
int64_t quant_segment(const float* x, int64_t n, const SegmentQuant& q, void* out,
                      const Feedback& fb) {
  static_assert(kPack || !kFeedback, "error feedback is fused into the INT4 kernels only");
  const float lim = static_cast<float>(levels(q.bits));
  const QuantConsts c{_mm256_set1_ps(q.inv_step),
                      _mm256_set1_ps(q.clip),
                      _mm256_set1_ps(lim),
                      _mm256_set1_ps(FLT_MAX),
                      _mm256_set1_epi8(static_cast<char>(-levels(q.bits))),
                      _mm256_set1_ps(q.saturate_at),
                      _mm256_set1_ps(-q.saturate_at),
                      _mm256_set1_ps(q.step),
                      _mm256_set1_epi32(-levels(q.bits))};
  uint8_t* const bytes_out = static_cast<uint8_t*>(out);
  auto out_at = [&](int64_t i) { return bytes_out + (kPack ? i / 2 : i); };
  __m256i count = _mm256_setzero_si256();
  auto body = [&](int64_t c0, int64_t m, const uint16_t* h, auto pairs, auto&& between) {
    const Feedback fb0{fb.e ? fb.e + c0 : nullptr, fb.e_out ? fb.e_out + c0 : nullptr,
                       fb.dq_out ? fb.dq_out + c0 : nullptr, fb.stream_e_out};
    count = _mm256_add_epi32(
        count,
        quant_body<kStochastic, kAllFinite, kPack, kSaturate, decltype(pairs)::value, kFeedback>(
            x + c0, m, h, c, fb0, out_at(c0), between));
  };
  const int64_t nv = n / 32 * 32;
  if constexpr (kStochastic) {
    PhiloxKeys pk(q.key);
    const uint64_t first = static_cast<uint64_t>(q.first_index);
    // Two chunks of words (double buffer): 4 words per 8 elements, + misalignment and the rounding
    // up to whole batches of 4 instances.
    constexpr int64_t kWords = 4 * (kRngChunk / 8 + 8);
    alignas(32) uint32_t words[2][kWords];
    // First group and group count (a multiple of 4) of the chunk at c0.
    auto groups = [&](int64_t c0, uint64_t* first_group) {
      const int64_t m = std::min(kRngChunk, nv - c0);
      *first_group = (first + static_cast<uint64_t>(c0)) / 8;
      const uint64_t last_group = (first + static_cast<uint64_t>(c0 + m) - 1) / 8;
      return static_cast<int64_t>((last_group - *first_group + 4) / 4 * 4);
    };
    // The pair layout needs pairs of instances that start at even groups from the first one: the
    // first element starts a group, and the high counter word is the same throughout (no split).
    const bool pairs = first % 8 == 0 && (first / 8) >> 32 == (first / 8 + nv / 8 + 8) >> 32;
    auto run = [&](auto kpairs) {
      constexpr bool kPairs = decltype(kpairs)::value;
      uint64_t g0 = 0;
      if (nv > 0) {
        const int64_t ngroups = groups(0, &g0);
        philox_range<kPairs>(pk, g0, ngroups, words[0]);
      }
      int buf = 0;
      for (int64_t c0 = 0; c0 < nv; c0 += kRngChunk, buf ^= 1) {
        int64_t ngroups = 0, done = 0;
        if (c0 + kRngChunk < nv) ngroups = groups(c0 + kRngChunk, &g0);
        uint32_t* next = words[buf ^ 1];
        auto make_next = [&] {
          if (done >= ngroups) return;
          const int64_t k = std::min<int64_t>(4 * kChains, ngroups - done);
          philox_range<kPairs>(pk, g0 + static_cast<uint64_t>(done), k, next + 4 * done);
          done += k;
        };
        body(c0, std::min(kRngChunk, nv - c0),
             reinterpret_cast<const uint16_t*>(words[buf]) + first % 8, kpairs, make_next);
        while (done < ngroups) make_next();
      }
    };
    if (pairs)
      run(std::true_type{});
    else
      run(std::false_type{});
  } else {
    body(0, nv, nullptr, std::false_type{}, [] {});
  }
  int64_t clipped = hsum_epi32(count);
  if (nv < n) {
    SegmentQuant tail = q;
    tail.first_index = q.first_index + nv;
    int8_t codes[32];
    const float* xt = x + nv;
    float vt[32];
    if (kFeedback && fb.e) {
      for (int64_t k = 0; k < n - nv; ++k) vt[k] = x[nv + k] + fb.e[nv + k];
      xt = vt;
    }
    clipped +=
        quantize_segment_scalar(xt, n - nv, tail, kPack ? codes : static_cast<int8_t*>(out) + nv);
    if constexpr (kFeedback)
      for (int64_t k = 0; k < n - nv; ++k) {
        const float dq = dequantize_value(codes[k], q.step);
        if (fb.e_out) fb.e_out[nv + k] = xt[k] - dq;
        if (fb.dq_out) fb.dq_out[nv + k] = dq;
      }
    if constexpr (kPack) {
      uint8_t* o = out_at(nv);
      const int64_t t = n - nv;
      for (int64_t k = 0; k < t; k += 2)
        o[k / 2] = pack_nibbles(codes[k], k + 1 < t ? codes[k + 1] : 0);
    }
  }
  return clipped;
}

using QuantSegmentFn = int64_t (*)(const float*, int64_t, const SegmentQuant&, void*,
                                   const Feedback&);
// [stochastic][all_finite]
template <bool kPack, bool kSaturate, bool kFeedback>
constexpr QuantSegmentFn kQuantSegments[2][2] = {
    {quant_segment<false, false, kPack, kSaturate, kFeedback>,
     quant_segment<false, true, kPack, kSaturate, kFeedback>},
    {quant_segment<true, false, kPack, kSaturate, kFeedback>,
     quant_segment<true, true, kPack, kSaturate, kFeedback>}};

// Given clips (saturate_at finite) take the saturating instances; the others pay nothing for them.
template <bool kPack, bool kFeedback = false>
QuantSegmentFn quant_segment_for(const SegmentQuant& q) {
  const bool stoch = q.rounding == Rounding::kStochastic;
  return q.saturate_at <= FLT_MAX ? kQuantSegments<kPack, true, kFeedback>[stoch][q.all_finite]
                                  : kQuantSegments<kPack, false, kFeedback>[stoch][q.all_finite];
}

int64_t quantize_segment_avx2(const float* x, int64_t n, const SegmentQuant& q, int8_t* codes) {
  return quant_segment_for<false>(q)(x, n, q, codes, Feedback{});
}

int64_t quantize_pack_int4_avx2(const float* x, int64_t n, const SegmentQuant& q, uint8_t* out) {
  return quant_segment_for<true>(q)(x, n, q, out, Feedback{});
}

int64_t quantize_pack_int4_feedback_avx2(const float* x, const Feedback& fb, int64_t n,
                                         const SegmentQuant& q, uint8_t* out) {
  return quant_segment_for<true, true>(q)(x, n, q, out, fb);
}

// max |x + e| over the finite sums (0 if none), as absmax_avx2 of the materialised sums.
float absmax_sum_avx2(const float* x, const float* e, int64_t n, int64_t* nonfinite) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0;
  auto bits = [&](int64_t i) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(e + i));
    return _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_epi32(m0, bits(i));
    m1 = _mm256_max_epi32(m1, bits(i + 8));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_epi32(m0, bits(i));
  m0 = _mm256_max_epi32(m0, m1);
  __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xB1));
  uint32_t m = static_cast<uint32_t>(_mm_cvtsi128_si32(h));
  for (; i < n; ++i) {
    const float v = x[i] + e[i];
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b &= 0x7fffffffu;
    m = m > b ? m : b;
  }
  if (m > 0x7f7fffffu) {  // a NaN or an Inf among the sums: the careful scan of them
    float r = 0.0f;
    int64_t bad = 0;
    for (int64_t k = 0; k < n; ++k) {
      const float v = x[k] + e[k];
      if (is_finite_value(v))
        r = r > __builtin_fabsf(v) ? r : __builtin_fabsf(v);
      else
        ++bad;
    }
    *nonfinite += bad;
    return r;
  }
  float r;
  std::memcpy(&r, &m, 4);
  return r;
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

// 8 elements from the 4 bytes at in: broadcast, shift nibble e to the top of lane e, arithmetic
// shift back down (the sign extension of the 4-bit two's complement), convert, times the step.
inline __m256 unpack_dequant8(const uint8_t* in, __m256i shifts, __m256 d) {
  int32_t w;
  std::memcpy(&w, in, 4);
  const __m256i q = _mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi32(w), shifts), 28);
  return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
}

// kStream: non-temporal stores from the first 32-byte aligned output on (a scalar head before
// it; an odd head goes on from a high nibble through the plain kernel); the caller fences.
template <bool kStream>
void unpack_dequantize_int4_impl(const uint8_t* in, int64_t lead, int64_t n, float step,
                                 float* out) {
  if (lead && n > 0) {
    *out++ = dequantize_value(unpack_hi(*in++), step);
    --n;
  }
  if constexpr (kStream) {
    int64_t h = 0;
    for (; h < n && (reinterpret_cast<uintptr_t>(out + h) & 31) != 0; ++h)
      out[h] = dequantize_value(h % 2 == 0 ? unpack_lo(in[h / 2]) : unpack_hi(in[h / 2]), step);
    if (h % 2) {
      unpack_dequantize_int4_impl<false>(in + h / 2, 1, n - h, step, out + h);
      return;
    }
    in += h / 2;
    out += h;
    n -= h;
  }
  const __m256i shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  const __m256 d = _mm256_set1_ps(step);
  auto store = [](float* p, __m256 v) {
    if constexpr (kStream)
      _mm256_stream_ps(p, v);
    else
      _mm256_storeu_ps(p, v);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a = unpack_dequant8(in + i / 2, shifts, d);
    const __m256 b = unpack_dequant8(in + i / 2 + 4, shifts, d);
    const __m256 c = unpack_dequant8(in + i / 2 + 8, shifts, d);
    const __m256 e = unpack_dequant8(in + i / 2 + 12, shifts, d);
    store(out + i, a);
    store(out + i + 8, b);
    store(out + i + 16, c);
    store(out + i + 24, e);
  }
  for (; i + 8 <= n; i += 8) store(out + i, unpack_dequant8(in + i / 2, shifts, d));
  for (; i < n; ++i)
    out[i] = dequantize_value(i % 2 == 0 ? unpack_lo(in[i / 2]) : unpack_hi(in[i / 2]), step);
}

void unpack_dequantize_int4_avx2(const uint8_t* in, int64_t lead, int64_t n, float step,
                                 float* out) {
  unpack_dequantize_int4_impl<false>(in, lead, n, step, out);
}

void unpack_dequantize_int4_stream_avx2(const uint8_t* in, int64_t lead, int64_t n, float step,
                                        float* out) {
  unpack_dequantize_int4_impl<true>(in, lead, n, step, out);
}

}  // namespace

extern const CodecKernels kAvx2Kernels = {absmax_avx2,
                                          quantize_segment_avx2,
                                          pack_int4_avx2,
                                          unpack_int4_avx2,
                                          dequantize_segment_avx2,
                                          quantize_pack_int4_avx2,
                                          unpack_dequantize_int4_avx2,
                                          unpack_dequantize_int4_stream_avx2,
                                          absmax_sum_avx2,
                                          quantize_pack_int4_feedback_avx2};

}  // namespace int4ddp::quant::detail
