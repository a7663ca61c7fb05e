// AVX-512 (F, BW, VL, DQ) kernels for the fast codec driver. Compiled with AVX-512 flags and only
// called after a run-time CPU check (codec.cpp). Must match format.h / the reference bit for bit:
// the same IEEE product z = x * r, the same rounding (rint = round half even, floor), the same
// clamp.
//
// Stochastic rounding: 8 Philox4x32-10 instances run in the 64-bit lanes of a zmm (the 32-bit
// multiplies map onto vpmuludq), giving the 32 random words, i.e. the 64 16-bit uniforms, of 64
// consecutive elements; a permute puts them in element order. The body therefore steps 64 elements
// whose first global index is a multiple of 8; a scalar head and tail handle the rest.
//
// INT4 has fused kernels, the AVX2 ones (codec_avx2.cpp) widened to 16 lanes: quantize straight
// into nibbles (the Philox words of each chunk made first into an L1 buffer and read back from each
// element's own half-word, so any first index works), and unpack + dequantize from the packed
// bytes. No AVX-512 CPU was at hand when they were written: they were checked against the
// reference only through a scalar emulation of the intrinsics, never on hardware.
// GCC 12 warns about the intentionally undefined pass-through operands inside its own AVX-512
// headers (_mm512_undefined_*); the warnings are false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "kernels/quant/codec_kernels.h"

namespace int4ddp::quant::detail {
namespace {

constexpr int kVec = 64;           // elements per body iteration (one Philox chain's worth)
constexpr int kPhiloxBatches = 4;  // interleaved Philox chains (64 elements each)

inline __m512 abs_ps(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

float absmax_avx512(const float* x, int64_t n, int64_t* nonfinite) {
  const __m512 kMax = _mm512_set1_ps(FLT_MAX);
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  int64_t bad = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = abs_ps(_mm512_loadu_ps(x + i));
    const __m512 b = abs_ps(_mm512_loadu_ps(x + i + 16));
    const __mmask16 fa = _mm512_cmp_ps_mask(a, kMax, _CMP_LE_OQ);
    const __mmask16 fb = _mm512_cmp_ps_mask(b, kMax, _CMP_LE_OQ);
    m0 = _mm512_mask_max_ps(m0, fa, m0, a);
    m1 = _mm512_mask_max_ps(m1, fb, m1, b);
    if (__builtin_expect((fa & fb) != 0xFFFF, 0))
      bad += 32 - __builtin_popcount(fa) - __builtin_popcount(fb);
  }
  for (; i < n; i += 16) {
    const int r = static_cast<int>(n - i < 16 ? n - i : 16);
    const __mmask16 live = static_cast<__mmask16>((1u << r) - 1);
    const __m512 a = abs_ps(_mm512_maskz_loadu_ps(live, x + i));  // dead lanes read as 0
    const __mmask16 fa = _mm512_cmp_ps_mask(a, kMax, _CMP_LE_OQ);
    m0 = _mm512_mask_max_ps(m0, fa, m0, a);
    bad += 16 - __builtin_popcount(fa);
  }
  *nonfinite += bad;
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// Round keys of the 10 Philox rounds, broadcast once per segment.
struct PhiloxKeys {
  __m512i k0[kPhiloxRounds], k1[kPhiloxRounds];
  __m512i x2, x3;  // counter words 2 (step) and 3 (tensor id), the same for every element
  explicit PhiloxKeys(const RngKey& key) {
    uint32_t a = key.seed, b = key.stream;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      if (r > 0) a += kPhiloxW0, b += kPhiloxW1;
      k0[r] = _mm512_set1_epi64(a);
      k1[r] = _mm512_set1_epi64(b);
    }
    x2 = _mm512_set1_epi64(key.step);
    x3 = _mm512_set1_epi64(key.tensor_id);
  }
};

// The 10 rounds for the 8*B instances group .. group + 8B - 1: B independent Philox chains (8
// instances each, one per 64-bit lane: instance group + 8b + j) are interleaved so the 10-round
// dependency chain (multiply latency 5) does not serialise the loop. The high half of each 64-bit
// word is swapped down with vpshufd (port 5) rather than shifted (port 0, where the multiplies
// run). On return lane j of lo[b] holds words 0, 1 of instance group + 8b + j and hi[b] its words
// 2, 3; the four words of an instance, read as memory, are its eight 16-bit halves in element
// order.
template <int B>
inline void philox_rounds(const PhiloxKeys& pk, uint64_t group, __m512i* lo, __m512i* hi) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  __m512i x0[B], x1[B], x2[B], x3[B];
  for (int b = 0; b < B; ++b) {
    // 64-bit lanes; only the low 32 bits of each lane are meaningful (vpmuludq ignores the rest).
    x0[b] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(group + 8 * b)),
                             _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    x1[b] = _mm512_srli_epi64(x0[b], 32);
    x2[b] = pk.x2;
    x3[b] = pk.x3;
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      const __m512i p0 = _mm512_mul_epu32(x0[b], m0);
      const __m512i p1 = _mm512_mul_epu32(x2[b], m1);
      // 0x96: a ^ b ^ c
      x0[b] =
          _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p1, _MM_PERM_CDAB), x1[b], pk.k0[r], 0x96);
      x1[b] = p1;
      x2[b] =
          _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), x3[b], pk.k1[r], 0x96);
      x3[b] = p0;
    }
  }
  for (int b = 0; b < B; ++b) {
    lo[b] = _mm512_mask_blend_epi32(0xAAAA, x0[b], _mm512_slli_epi64(x1[b], 32));
    hi[b] = _mm512_mask_blend_epi32(0xAAAA, x2[b], _mm512_slli_epi64(x3[b], 32));
  }
}

// Instances 0..3 (w0: words of elements 0..31) and 4..7 (w1: elements 32..63) of one chain's
// lo/hi, each instance's four words side by side.
inline void instance_words(__m512i lo, __m512i hi, __m512i* w0, __m512i* w1) {
  *w0 = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), hi);
  *w1 = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4), hi);
}

// 16-bit uniforms u in [0,1) for the 64*B elements 8*group .. 8*group + 64B - 1, in element order:
// u[4b + k] holds elements 64b + 16k .. 64b + 16k + 15.
template <int B>
inline void philox_uniform16(const PhiloxKeys& pk, uint64_t group, __m512* u) {
  __m512i lo[B], hi[B];
  philox_rounds<B>(pk, group, lo, hi);
  const __m512 scale = _mm512_set1_ps(1.52587890625e-5f);  // 2^-16
  auto widen = [&](__m256i w) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(w)), scale);
  };
  for (int b = 0; b < B; ++b) {
    __m512i w0, w1;
    instance_words(lo[b], hi[b], &w0, &w1);
    u[4 * b] = widen(_mm512_castsi512_si256(w0));
    u[4 * b + 1] = widen(_mm512_extracti64x4_epi64(w0, 1));
    u[4 * b + 2] = widen(_mm512_castsi512_si256(w1));
    u[4 * b + 3] = widen(_mm512_extracti64x4_epi64(w1, 1));
  }
}

// The Philox words of the 64*B elements 8*group .. 8*group + 64B - 1 stored in element order
// (words[4j .. 4j + 3]: instance group + j), the layout of philox.h: read as 16-bit halves they are
// the uniforms' h of those elements.
template <int B>
inline void philox_words(const PhiloxKeys& pk, uint64_t group, uint32_t* words) {
  __m512i lo[B], hi[B];
  philox_rounds<B>(pk, group, lo, hi);
  for (int b = 0; b < B; ++b) {
    __m512i w0, w1;
    instance_words(lo[b], hi[b], &w0, &w1);
    _mm512_storeu_si512(words + 32 * b, w0);
    _mm512_storeu_si512(words + 32 * b + 16, w1);
  }
}

struct QuantConsts {
  __m512 inv, clip, lo, hi, fmax;
  __m512 sat_hi, sat_lo;  // +-SegmentQuant::saturate_at (+-inf: no saturation)
};

inline QuantConsts quant_consts(const SegmentQuant& q) {
  const float lim = static_cast<float>(levels(q.bits));
  return {_mm512_set1_ps(q.inv_step),    _mm512_set1_ps(q.clip),  _mm512_set1_ps(-lim),
          _mm512_set1_ps(lim),           _mm512_set1_ps(FLT_MAX), _mm512_set1_ps(q.saturate_at),
          _mm512_set1_ps(-q.saturate_at)};
}

// int32 codes of 16 elements (u unused for nearest): z = x * r, then the rounding and the clamp of
// format.h. Adds clipped lanes to *clip_count. NaN lanes make no NaN code (max/min return the
// bound for a NaN first operand) and non-finite lanes are zeroed by the conversion's mask;
// kAllFinite skips that masking when the scope's absmax pass found none. kSaturate: given clips
// clamp x first (a NaN lane becomes sat_hi, zeroed by the finite mask).
template <bool kStochastic, bool kAllFinite, bool kSaturate>
inline __m512i quant16_codes(const float* x, const QuantConsts& c, __m512 u, __m512i* clip_count) {
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  constexpr int kFloor = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m512 v = _mm512_loadu_ps(x);
  const __m512 a = abs_ps(v);
  const __mmask16 fin = kAllFinite ? __mmask16(0xFFFF) : _mm512_cmp_ps_mask(a, c.fmax, _CMP_LE_OQ);
  const __mmask16 clipped = _mm512_mask_cmp_ps_mask(fin, a, c.clip, _CMP_GT_OQ);
  *clip_count = _mm512_mask_add_epi32(*clip_count, clipped, *clip_count, _mm512_set1_epi32(1));
  const __m512 z =
      _mm512_mul_ps(kSaturate ? _mm512_max_ps(_mm512_min_ps(v, c.sat_hi), c.sat_lo) : v, c.inv);
  const __m512 r = kStochastic ? _mm512_roundscale_ps(_mm512_add_ps(z, u), kFloor)
                               : _mm512_roundscale_ps(z, kNear);
  const __m512 rc = _mm512_min_ps(_mm512_max_ps(r, c.lo), c.hi);
  return kAllFinite ? _mm512_cvtps_epi32(rc) : _mm512_maskz_cvtps_epi32(fin, rc);
}

// quant16_codes stored as 16 int8 codes.
template <bool kStochastic, bool kAllFinite, bool kSaturate>
inline void quant16(const float* x, const QuantConsts& c, __m512 u, int8_t* codes,
                    __m512i* clip_count) {
  const __m512i q = quant16_codes<kStochastic, kAllFinite, kSaturate>(x, c, u, clip_count);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(q));
}

// n is a multiple of kVec; for stochastic rounding q.first_index is a multiple of 8.
template <bool kStochastic, bool kAllFinite, bool kSaturate>
void quant_body(const float* x, int64_t n, const SegmentQuant& q, const QuantConsts& c,
                int8_t* codes, __m512i* count) {
  if constexpr (kStochastic) {
    const PhiloxKeys pk(q.key);
    const uint64_t group0 = static_cast<uint64_t>(q.first_index) / 8;
    int64_t i = 0;
    for (; i + kPhiloxBatches * kVec <= n; i += kPhiloxBatches * kVec) {
      __m512 u[4 * kPhiloxBatches];
      philox_uniform16<kPhiloxBatches>(pk, group0 + static_cast<uint64_t>(i) / 8, u);
      for (int v = 0; v < 4 * kPhiloxBatches; ++v)
        quant16<true, kAllFinite, kSaturate>(x + i + 16 * v, c, u[v], codes + i + 16 * v, count);
    }
    for (; i + kVec <= n; i += kVec) {
      __m512 u[4];
      philox_uniform16<1>(pk, group0 + static_cast<uint64_t>(i) / 8, u);
      for (int v = 0; v < 4; ++v)
        quant16<true, kAllFinite, kSaturate>(x + i + 16 * v, c, u[v], codes + i + 16 * v, count);
    }
  } else {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t i = 0; i + kVec <= n; i += kVec)
      for (int v = 0; v < 4; ++v)
        quant16<false, kAllFinite, kSaturate>(x + i + 16 * v, c, zero, codes + i + 16 * v, count);
  }
}

using QuantBodyFn = void (*)(const float*, int64_t, const SegmentQuant&, const QuantConsts&,
                             int8_t*, __m512i*);
// [saturate][stochastic][all_finite]
constexpr QuantBodyFn kQuantBodies[2][2][2] = {
    {{quant_body<false, false, false>, quant_body<false, true, false>},
     {quant_body<true, false, false>, quant_body<true, true, false>}},
    {{quant_body<false, false, true>, quant_body<false, true, true>},
     {quant_body<true, false, true>, quant_body<true, true, true>}}};

int64_t quantize_segment_avx512(const float* x, int64_t n, const SegmentQuant& q, int8_t* codes) {
  const bool stoch = q.rounding == Rounding::kStochastic;
  int64_t head = 0;
  if (stoch) {
    head = (8 - q.first_index % 8) % 8;
    if (head > n) head = n;
  }
  int64_t clipped = 0;
  if (head > 0) clipped += quantize_segment_scalar(x, head, q, codes);
  const QuantConsts c = quant_consts(q);
  const int64_t body = (n - head) / kVec * kVec;
  __m512i count = _mm512_setzero_si512();
  SegmentQuant bq = q;
  bq.first_index = q.first_index + head;
  const bool saturate = q.saturate_at <= FLT_MAX;  // given clips
  kQuantBodies[saturate][stoch][q.all_finite](x + head, body, bq, c, codes + head, &count);
  int64_t i = head + body;
  clipped += _mm512_reduce_add_epi32(count);
  if (i < n) {
    SegmentQuant tail = q;
    tail.first_index = q.first_index + i;
    clipped += quantize_segment_scalar(x + i, n - i, tail, codes + i);
  }
  return clipped;
}

void pack_int4_avx512(const int8_t* codes, int64_t n, uint8_t* out) {
  // A 16-bit word holds codes (2k, 2k+1); fold the high byte's nibble next to the low one.
  const __m512i lo_mask = _mm512_set1_epi16(0x000F), hi_mask = _mm512_set1_epi16(0x00F0);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i w = _mm512_loadu_si512(codes + i);
    const __m512i r = _mm512_or_si512(_mm512_and_si512(w, lo_mask),
                                      _mm512_and_si512(_mm512_srli_epi16(w, 4), hi_mask));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), _mm512_cvtepi16_epi8(r));
  }
  for (; i + 1 < n; i += 2) out[i / 2] = pack_nibbles(codes[i], codes[i + 1]);
  if (i < n) out[i / 2] = pack_nibbles(codes[i], 0);
}

void unpack_int4_avx512(const uint8_t* in, int64_t n, int8_t* codes) {
  const __m512i lo_mask = _mm512_set1_epi16(0x000F), hi_mask = _mm512_set1_epi16(0x00F0);
  const __m512i eight = _mm512_set1_epi8(8);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i w =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i / 2)));
    // word = lo nibble | hi nibble << 8; then sign-extend each 4-bit value in its byte: (v ^ 8)
    // - 8.
    const __m512i t = _mm512_or_si512(_mm512_and_si512(w, lo_mask),
                                      _mm512_slli_epi16(_mm512_and_si512(w, hi_mask), 4));
    _mm512_storeu_si512(codes + i, _mm512_sub_epi8(_mm512_xor_si512(t, eight), eight));
  }
  for (; i < n; ++i)
    codes[i] = static_cast<int8_t>(i % 2 == 0 ? unpack_lo(in[i / 2]) : unpack_hi(in[i / 2]));
}

void dequantize_segment_avx512(const int8_t* codes, int64_t n, float step, float* out) {
  const __m512 d = _mm512_set1_ps(step);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m128i c0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i));
    const __m128i c1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i + 16));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c0)), d));
    _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c1)), d));
  }
  for (; i < n; ++i) out[i] = dequantize_value(codes[i], step);
}

// --- fused INT4 kernels (the AVX2 ones of codec_avx2.cpp, widened to 16 lanes) ---------------

// 16 int32 codes (each in -L..L or 0) as 8 packed bytes: in each 64-bit lane, the even element's
// nibble from bits 0..3 and the odd element's from bits 32..35 (shifted down to 4..7), then the
// low byte of every lane (vpmovqb).
inline void pack16(__m512i q, uint8_t* out) {
  const __m512i t =
      _mm512_or_si512(_mm512_and_si512(q, _mm512_set1_epi64(0x0F)),
                      _mm512_and_si512(_mm512_srli_epi64(q, 28), _mm512_set1_epi64(0xF0)));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm512_cvtepi64_epi8(t));
}

constexpr int64_t kRngChunk = 512;  // elements whose Philox words are made ahead of quantizing
// Input elements prefetched ahead, one cache line per 16-element step (as in the AVX2 kernel).
constexpr int64_t kPrefetchAhead = 2048;

// The vector body over x[0, m), m a multiple of kVec: out[k] packs elements 2k, 2k+1. h: the 16-bit
// uniforms of x[0] on (stochastic; unused for nearest). Returns the per-lane clipped counts.
template <bool kStochastic, bool kAllFinite, bool kSaturate>
inline __m512i quant_pack_body(const float* x, int64_t m, const uint16_t* h, const QuantConsts c,
                               uint8_t* out) {
  const __m512 scale = _mm512_set1_ps(1.52587890625e-5f);  // 2^-16
  __m512i count = _mm512_setzero_si512();
  for (int64_t i = 0; i < m; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(x + i + kPrefetchAhead), _MM_HINT_T0);
    __m512 u = _mm512_setzero_ps();
    if constexpr (kStochastic) {
      const __m256i hw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i));
      u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(hw)), scale);
    }
    pack16(quant16_codes<kStochastic, kAllFinite, kSaturate>(x + i, c, u, &count), out + i / 2);
  }
  return count;
}

// Fused quantize + INT4 pack of a segment whose first element sits in the low nibble of out[0].
// Stochastic: the Philox words of each chunk of kRngChunk elements are made first into an
// L1-resident buffer and read back from the element's own half-word, so any first_index works
// without a scalar head (as in the AVX2 kernel). A scalar tail handles the last n % kVec elements.
template <bool kStochastic, bool kAllFinite, bool kSaturate>
int64_t quant_pack_segment(const float* x, int64_t n, const SegmentQuant& q, uint8_t* out) {
  const QuantConsts c = quant_consts(q);
  const int64_t nv = n / kVec * kVec;
  __m512i count = _mm512_setzero_si512();
  if constexpr (kStochastic) {
    const PhiloxKeys pk(q.key);
    const uint64_t first = static_cast<uint64_t>(q.first_index);
    // Groups of one chunk: kRngChunk / 8, + 1 when first % 8 != 0, rounded up to whole chains.
    alignas(64) uint32_t words[4 * (kRngChunk / 8 + 8)];
    for (int64_t c0 = 0; c0 < nv; c0 += kRngChunk) {
      const int64_t m = std::min(kRngChunk, nv - c0);
      const uint64_t g0 = (first + static_cast<uint64_t>(c0)) / 8;
      const uint64_t g1 = (first + static_cast<uint64_t>(c0 + m) - 1) / 8;
      const int64_t ngroups = static_cast<int64_t>(g1 - g0 + 1);
      int64_t j = 0;
      for (; j + 8 * kPhiloxBatches <= ngroups; j += 8 * kPhiloxBatches)
        philox_words<kPhiloxBatches>(pk, g0 + static_cast<uint64_t>(j), words + 4 * j);
      for (; j < ngroups; j += 8) philox_words<1>(pk, g0 + static_cast<uint64_t>(j), words + 4 * j);
      const uint16_t* h = reinterpret_cast<const uint16_t*>(words) + (first + c0) % 8;
      const __m512i chunk =
          quant_pack_body<true, kAllFinite, kSaturate>(x + c0, m, h, c, out + c0 / 2);
      count = _mm512_add_epi32(count, chunk);
    }
  } else {
    count = quant_pack_body<false, kAllFinite, kSaturate>(x, nv, nullptr, c, out);
  }
  int64_t clipped = _mm512_reduce_add_epi32(count);
  if (nv < n) {
    SegmentQuant tail = q;
    tail.first_index = q.first_index + nv;
    int8_t codes[kVec];
    const int64_t t = n - nv;
    clipped += quantize_segment_scalar(x + nv, t, tail, codes);
    for (int64_t k = 0; k < t; k += 2)
      out[nv / 2 + k / 2] = pack_nibbles(codes[k], k + 1 < t ? codes[k + 1] : 0);
  }
  return clipped;
}

using QuantPackFn = int64_t (*)(const float*, int64_t, const SegmentQuant&, uint8_t*);
// [saturate][stochastic][all_finite]
constexpr QuantPackFn kQuantPacks[2][2][2] = {
    {{quant_pack_segment<false, false, false>, quant_pack_segment<false, true, false>},
     {quant_pack_segment<true, false, false>, quant_pack_segment<true, true, false>}},
    {{quant_pack_segment<false, false, true>, quant_pack_segment<false, true, true>},
     {quant_pack_segment<true, false, true>, quant_pack_segment<true, true, true>}}};

int64_t quantize_pack_int4_avx512(const float* x, int64_t n, const SegmentQuant& q, uint8_t* out) {
  const bool saturate = q.saturate_at <= FLT_MAX;  // given clips
  return kQuantPacks[saturate][q.rounding == Rounding::kStochastic][q.all_finite](x, n, q, out);
}

// 16 elements from the 8 bytes at in: dword 0 to lanes 0-7 and dword 1 to lanes 8-15, shift nibble
// e to the top of lane e, arithmetic shift back down (the sign extension of the 4-bit two's
// complement), convert, times the step.
inline __m512 unpack_dequant16(const uint8_t* in, __m512i shifts, __m512 d) {
  const __m512i w = _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
      _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in))));
  const __m512i q = _mm512_srai_epi32(_mm512_sllv_epi32(w, shifts), 28);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
}

void unpack_dequantize_int4_avx512(const uint8_t* in, int64_t lead, int64_t n, float step,
                                   float* out) {
  if (lead && n > 0) {
    *out++ = dequantize_value(unpack_hi(*in++), step);
    --n;
  }
  const __m512i shifts =
      _mm512_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512 d = _mm512_set1_ps(step);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 a = unpack_dequant16(in + i / 2, shifts, d);
    const __m512 b = unpack_dequant16(in + i / 2 + 8, shifts, d);
    const __m512 c = unpack_dequant16(in + i / 2 + 16, shifts, d);
    const __m512 e = unpack_dequant16(in + i / 2 + 24, shifts, d);
    _mm512_storeu_ps(out + i, a);
    _mm512_storeu_ps(out + i + 16, b);
    _mm512_storeu_ps(out + i + 32, c);
    _mm512_storeu_ps(out + i + 48, e);
  }
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, unpack_dequant16(in + i / 2, shifts, d));
  for (; i < n; ++i)
    out[i] = dequantize_value(i % 2 == 0 ? unpack_lo(in[i / 2]) : unpack_hi(in[i / 2]), step);
}

}  // namespace

extern const CodecKernels kAvx512Kernels = {absmax_avx512,
                                            quantize_segment_avx512,
                                            pack_int4_avx512,
                                            unpack_int4_avx512,
                                            dequantize_segment_avx512,
                                            quantize_pack_int4_avx512,
                                            unpack_dequantize_int4_avx512,
                                            nullptr,
                                            nullptr,
                                            nullptr};

}  // namespace int4ddp::quant::detail
