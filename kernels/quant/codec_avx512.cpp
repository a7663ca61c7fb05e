// AVX-512 (F, BW, VL, DQ) kernels for the fast codec driver. Compiled with AVX-512 flags and only
// called after a run-time CPU check (codec.cpp). Must match format.h / the reference bit for bit:
// the same IEEE product z = x * r, the same rounding (rint = round half even, floor), the same
// clamp.
//
// Stochastic rounding: 8 Philox4x32-10 instances run in the 64-bit lanes of a zmm (the 32-bit
// multiplies map onto vpmuludq), giving the 32 random words, i.e. the 64 16-bit uniforms, of 64
// consecutive elements; a permute puts them in element order. The body therefore steps 64 elements
// whose first global index is a multiple of 8; a scalar head and tail handle the rest.
// GCC 12 warns about the intentionally undefined pass-through operands inside its own AVX-512
// headers (_mm512_undefined_*); the warnings are false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

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

// 16-bit uniforms u in [0,1) for the 64*B elements 8*group .. 8*group + 64B - 1, in element order:
// u[4b + k] holds elements 64b + 16k .. 64b + 16k + 15. B independent Philox chains (8 instances
// each, one per 64-bit lane: instance group + 8b + j) are interleaved so the 10-round dependency
// chain (multiply latency 5) does not serialise the loop. The high half of each 64-bit word is
// swapped down with vpshufd (port 5) rather than shifted (port 0, where the multiplies run). The
// four words of an instance, read as memory, are its eight 16-bit halves in element order, so
// putting the instances' words side by side and widening the 16-bit halves gives the uniforms.
template <int B>
inline void philox_uniform16(const PhiloxKeys& pk, uint64_t group, __m512* u) {
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
  const __m512 scale = _mm512_set1_ps(1.52587890625e-5f);  // 2^-16
  auto widen = [&](__m256i w) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(w)), scale);
  };
  for (int b = 0; b < B; ++b) {
    // Lane j of lo holds words 0, 1 of instance j; hi holds words 2, 3.
    const __m512i lo = _mm512_mask_blend_epi32(0xAAAA, x0[b], _mm512_slli_epi64(x1[b], 32));
    const __m512i hi = _mm512_mask_blend_epi32(0xAAAA, x2[b], _mm512_slli_epi64(x3[b], 32));
    // w0: instances 0..3 (elements 0..31), w1: instances 4..7 (elements 32..63).
    const __m512i w0 =
        _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), hi);
    const __m512i w1 =
        _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4), hi);
    u[4 * b] = widen(_mm512_castsi512_si256(w0));
    u[4 * b + 1] = widen(_mm512_extracti64x4_epi64(w0, 1));
    u[4 * b + 2] = widen(_mm512_castsi512_si256(w1));
    u[4 * b + 3] = widen(_mm512_extracti64x4_epi64(w1, 1));
  }
}

struct QuantConsts {
  __m512 inv, clip, lo, hi, fmax;
  __m512 sat_hi, sat_lo;  // +-SegmentQuant::saturate_at (+-inf: no saturation)
};

// Codes of 16 elements (u unused for nearest): z = x * r, then the rounding and the clamp of
// format.h. Adds clipped lanes to *clip_count. NaN lanes make no NaN code (max/min return the
// bound for a NaN first operand) and non-finite lanes are zeroed by the conversion's mask;
// kAllFinite skips that masking when the scope's absmax pass found none.
template <bool kStochastic, bool kAllFinite, bool kSaturate>
inline void quant16(const float* x, const QuantConsts& c, __m512 u, int8_t* codes,
                    __m512i* clip_count) {
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  constexpr int kFloor = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m512 v = _mm512_loadu_ps(x);
  const __m512 a = abs_ps(v);
  const __mmask16 fin = kAllFinite ? __mmask16(0xFFFF) : _mm512_cmp_ps_mask(a, c.fmax, _CMP_LE_OQ);
  const __mmask16 clipped = _mm512_mask_cmp_ps_mask(fin, a, c.clip, _CMP_GT_OQ);
  *clip_count = _mm512_mask_add_epi32(*clip_count, clipped, *clip_count, _mm512_set1_epi32(1));
  // kSaturate: given clips clamp x first (a NaN lane becomes sat_hi, zeroed by the finite mask).
  const __m512 z =
      _mm512_mul_ps(kSaturate ? _mm512_max_ps(_mm512_min_ps(v, c.sat_hi), c.sat_lo) : v, c.inv);
  const __m512 r = kStochastic ? _mm512_roundscale_ps(_mm512_add_ps(z, u), kFloor)
                               : _mm512_roundscale_ps(z, kNear);
  const __m512 rc = _mm512_min_ps(_mm512_max_ps(r, c.lo), c.hi);
  const __m512i q = kAllFinite ? _mm512_cvtps_epi32(rc) : _mm512_maskz_cvtps_epi32(fin, rc);
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
  const float lim = static_cast<float>(levels(q.bits));
  const QuantConsts c{_mm512_set1_ps(q.inv_step),    _mm512_set1_ps(q.clip),
                      _mm512_set1_ps(-lim),          _mm512_set1_ps(lim),
                      _mm512_set1_ps(FLT_MAX),       _mm512_set1_ps(q.saturate_at),
                      _mm512_set1_ps(-q.saturate_at)};
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

}  // namespace

extern const CodecKernels kAvx512Kernels = {absmax_avx512,
                                            quantize_segment_avx512,
                                            pack_int4_avx512,
                                            unpack_int4_avx512,
                                            dequantize_segment_avx512,
                                            nullptr,
                                            nullptr};

}  // namespace int4ddp::quant::detail
