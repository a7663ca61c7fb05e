// The fast codec driver and the ISA dispatch. The driver walks the scopes of the tensor, finds each
// scope's absmax, then quantizes the scope in tiles. INT4 codes go through a small int8 staging
// tile (L1-resident) and are packed from there, so scope boundaries may fall anywhere, even
// mid-byte. ISAs with fused INT4 kernels skip the staging tile when every scope starts at an even
// element (an even block size, or one scope). For b != 4 the int8 codes are the output.
#include "kernels/quant/codec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "kernels/common/error.h"
#include "kernels/common/isa_override.h"
#include "kernels/quant/codec_kernels.h"

namespace int4ddp::quant {
namespace {

constexpr int64_t kTile = 4096;  // staging tile in codes (even, 4 KB)
#ifndef INT4DDP_PREFETCH_AHEAD
#define INT4DDP_PREFETCH_AHEAD 1024
#endif
#ifndef INT4DDP_PREFETCH_LOCALITY
#define INT4DDP_PREFETCH_LOCALITY 3
#endif
constexpr int64_t kPrefetchAhead = INT4DDP_PREFETCH_AHEAD;  // elements of input prefetched ahead
constexpr int64_t kStreamBytes = int64_t{32} << 20;  // dequantized outputs streamed from this size

const detail::CodecKernels& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return detail::kPortableKernels;
    case Isa::kAvx2:
#if defined(INT4DDP_HAVE_AVX2)
      return detail::kAvx2Kernels;
#else
      break;
#endif
    case Isa::kAvx512:
#if defined(INT4DDP_HAVE_AVX512)
      return detail::kAvx512Kernels;
#else
      break;
#endif
  }
  INT4DDP_FAIL("codec: instruction set ", isa_name(isa), " is not compiled in");
}

constexpr Isa kIsas[] = {Isa::kPortable, Isa::kAvx2, Isa::kAvx512};

// Sets seg for scope s of a quantization whose scope absmax is known (all_finite: no NaN/Inf in
// it): the clip, saturation bound, steps; writes the scale and folds absmax into st.
void begin_scope(const QuantParams& p, int64_t s, float absmax, bool all_finite,
                 detail::SegmentQuant& seg, float* scales, QuantStats& st) {
  seg.all_finite = all_finite;
  seg.clip = detail::scope_clip(p, s, absmax);
  seg.saturate_at = detail::saturation_bound(p, seg.clip);
  seg.inv_step = inv_step_for_clip(seg.clip, p.bits);
  seg.step = step_for_clip(seg.clip, p.bits);
  scales[s] = seg.step;
  st.absmax = std::max(st.absmax, absmax);
}

void check_quantize_args(const float* x, int64_t count, const QuantParams& p, const uint8_t* codes,
                         const float* scales) {
  validate(p);
  INT4DDP_CHECK(count >= 0, "quantizer: count = ", count, " is negative");
  INT4DDP_CHECK(count == 0 || (x && codes && scales), "quantizer: null buffer for ", count,
                " elements");
}

std::atomic<int> g_isa{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return "portable";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return true;
    case Isa::kAvx2:
#if defined(INT4DDP_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(INT4DDP_HAVE_AVX512)
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
      return false;
#endif
  }
  return false;
}

Isa best_isa() {
  if (isa_available(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_available(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kPortable;
}

void set_isa(Isa isa) {
  INT4DDP_CHECK(isa_available(isa), "codec: instruction set ", isa_name(isa),
                " is not available on this CPU or build");
  g_isa.store(static_cast<int>(isa));
}

Isa current_isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = static_cast<int>(isa_from_env("INT4DDP_ISA", kIsas, isa_name, isa_available, best_isa()));
    g_isa.store(v);
  }
  return static_cast<Isa>(v);
}

bool isa_allows(Isa isa) { return static_cast<int>(current_isa()) >= static_cast<int>(isa); }

QuantStats quantize_isa(Isa isa, const float* x, int64_t count, const QuantParams& p,
                        uint8_t* codes, float* scales) {
  check_quantize_args(x, count, p, codes, scales);
  const detail::CodecKernels& k = kernels_for(isa);
  QuantStats st;
  st.count = count;
  const int64_t scope = p.block_size == 0 ? count : p.block_size;
  const int64_t nscales = num_scales(count, p.block_size);

  alignas(64) int8_t stage[kTile];
  int64_t stage_base = 0;  // global index of stage[0]; always even
  int64_t stage_len = 0;
  auto flush = [&](bool last) {
    const int64_t m = last ? stage_len : (stage_len & ~int64_t{1});
    k.pack_int4(stage, m, codes + stage_base / 2);
    if (m < stage_len) stage[0] = stage[m];
    stage_base += m;
    stage_len -= m;
  };

  const bool fused = k.quantize_pack_int4 != nullptr && p.block_size % 2 == 0;
  detail::SegmentQuant seg{0.0f, 0.0f, 0.0f, p.bits, p.rounding, p.key, 0, true, 0.0f};
  for (int64_t s = 0; s < nscales; ++s) {
    const int64_t begin = s * scope;
    const int64_t end = std::min(count, begin + scope);
    // Stream the input in ahead of the absmax pass: the quantize pass then runs from L1 while the
    // memory system keeps fetching (the hardware prefetcher alone leaves it idle meanwhile). The
    // fused INT4 kernels prefetch for themselves, spread over their quantize steps.
    if (!(fused && p.bits == 4))
      for (int64_t pf = begin + kPrefetchAhead; pf < std::min(count, end + kPrefetchAhead);
           pf += 16)
        __builtin_prefetch(x + pf, 0, INT4DDP_PREFETCH_LOCALITY);
    const int64_t nonfinite_before = st.nonfinite;
    const float absmax = k.absmax(x + begin, end - begin, &st.nonfinite);
    begin_scope(p, s, absmax, st.nonfinite == nonfinite_before, seg, scales, st);
    if (p.bits != 4) {
      seg.first_index = p.index_offset + begin;
      st.clipped +=
          k.quantize_segment(x + begin, end - begin, seg, reinterpret_cast<int8_t*>(codes) + begin);
      continue;
    }
    if (fused) {  // every scope starts at an even element: its codes start at a byte boundary
      seg.first_index = p.index_offset + begin;
      st.clipped += k.quantize_pack_int4(x + begin, end - begin, seg, codes + begin / 2);
      continue;
    }
    for (int64_t i = begin; i < end;) {
      const int64_t n = std::min(end - i, kTile - stage_len);
      seg.first_index = p.index_offset + i;
      st.clipped += k.quantize_segment(x + i, n, seg, stage + stage_len);
      stage_len += n;
      i += n;
      if (stage_len == kTile) flush(false);
    }
  }
  if (p.bits == 4 && stage_len > 0) flush(true);
  // Non-finite elements are counted by absmax; they are coded 0 by quantize_segment.
  return st;
}

QuantStats quantize_feedback_isa(Isa isa, const float* x, const float* e, int64_t count,
                                 const QuantParams& p, uint8_t* codes, float* scales, float* e_out,
                                 float* dq_out, bool stream_e_out) {
  const detail::CodecKernels& k = kernels_for(isa);
  if (!(k.quantize_pack_int4_feedback && p.bits == 4 && p.block_size % 2 == 0)) {
    // Step by step: v, quantize, dequantize, subtract (buffers kept per thread).
    thread_local std::vector<float> v_buf, dq_buf;
    const float* v = x;
    if (e && count > 0) {
      v_buf.resize(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) v_buf[static_cast<size_t>(i)] = x[i] + e[i];
      v = v_buf.data();
    }
    const QuantStats st = quantize_isa(isa, v, count, p, codes, scales);
    if (!e_out && !dq_out) return st;
    float* dq = dq_out;
    if (!dq) {
      dq_buf.resize(static_cast<size_t>(count));
      dq = dq_buf.data();
    }
    dequantize_isa(isa, codes, scales, count, p.bits, p.block_size, dq);
    if (e_out)
      for (int64_t i = 0; i < count; ++i) e_out[i] = v[i] - dq[i];
    return st;
  }
  check_quantize_args(x, count, p, codes, scales);
  QuantStats st;
  st.count = count;
  const int64_t scope = p.block_size == 0 ? count : p.block_size;
  const int64_t nscales = num_scales(count, p.block_size);
  detail::SegmentQuant seg{0.0f, 0.0f, 0.0f, p.bits, p.rounding, p.key, 0, true, 0.0f};
  bool streamed = false;
  for (int64_t s = 0; s < nscales; ++s) {
    const int64_t begin = s * scope;
    const int64_t n = std::min(count, begin + scope) - begin;
    const int64_t nonfinite_before = st.nonfinite;
    const float absmax = e ? k.absmax_sum(x + begin, e + begin, n, &st.nonfinite)
                           : k.absmax(x + begin, n, &st.nonfinite);
    begin_scope(p, s, absmax, st.nonfinite == nonfinite_before, seg, scales, st);
    seg.first_index = p.index_offset + begin;
    const bool stream =
        stream_e_out && e_out && (reinterpret_cast<uintptr_t>(e_out + begin) & 15) == 0;
    streamed |= stream;
    const detail::Feedback fb{e ? e + begin : nullptr, e_out ? e_out + begin : nullptr,
                              dq_out ? dq_out + begin : nullptr, stream};
    st.clipped += k.quantize_pack_int4_feedback(x + begin, fb, n, seg, codes + begin / 2);
  }
#if defined(__SSE__)
  if (streamed) _mm_sfence();
#endif
  return st;
}

int64_t quantize_piece(const float* x, int64_t count, const QuantParams& p, float absmax,
                       bool all_finite, int8_t* codes) {
  validate(p);
  INT4DDP_CHECK(p.block_size == 0, "quantize_piece: block_size = ", p.block_size,
                " (pieces are for per-tensor scales only)");
  INT4DDP_CHECK(count >= 0, "quantizer: count = ", count, " is negative");
  if (count == 0) return 0;
  INT4DDP_CHECK(x && codes, "quantizer: null buffer for ", count, " elements");
  const float clip = p.gamma * absmax;
  const detail::SegmentQuant seg{inv_step_for_clip(clip, p.bits),
                                 clip,
                                 detail::saturation_bound(p, clip),
                                 p.bits,
                                 p.rounding,
                                 p.key,
                                 p.index_offset,
                                 all_finite,
                                 step_for_clip(clip, p.bits)};
  return kernels_for(current_isa()).quantize_segment(x, count, seg, codes);
}

void dequantize_isa(Isa isa, const uint8_t* codes, const float* scales, int64_t count, int bits,
                    int64_t block_size, float* out) {
  INT4DDP_CHECK(valid_bits(bits), "dequantize: bits = ", bits, " is outside ", kMinBits, "..",
                kMaxBits);
  INT4DDP_CHECK(block_size >= 0, "dequantize: block_size = ", block_size, " is negative");
  INT4DDP_CHECK(count >= 0, "dequantize: count = ", count, " is negative");
  INT4DDP_CHECK(count == 0 || (out && codes && scales), "dequantize: null buffer for ", count,
                " elements");
  const detail::CodecKernels& k = kernels_for(isa);
  const int64_t scope = block_size == 0 ? count : block_size;
  const int64_t nscales = num_scales(count, block_size);
  alignas(64) int8_t stage[kTile + 1];
  // An INT4 output larger than the last-level cache cannot stay there: stream it (non-temporal
  // stores), which saves reading every output line in before it is written.
  const auto unpack_dequantize =
      count * static_cast<int64_t>(sizeof(float)) >= kStreamBytes && k.unpack_dequantize_int4_stream
          ? k.unpack_dequantize_int4_stream
          : k.unpack_dequantize_int4;
  for (int64_t s = 0; s < nscales; ++s) {
    const int64_t begin = s * scope;
    const int64_t end = std::min(count, begin + scope);
    if (bits != 4) {
      k.dequantize_segment(reinterpret_cast<const int8_t*>(codes) + begin, end - begin, scales[s],
                           out + begin);
      continue;
    }
    if (unpack_dequantize) {
      unpack_dequantize(codes + begin / 2, begin % 2, end - begin, scales[s], out + begin);
      continue;
    }
    for (int64_t i = begin; i < end;) {
      // Unpack from the byte holding element i; an odd start skips the low nibble.
      const int64_t n = std::min(end - i, kTile);
      const int64_t lead = i % 2;
      k.unpack_int4(codes + i / 2, n + lead, stage);
      k.dequantize_segment(stage + lead, n, scales[s], out + i);
      i += n;
    }
  }
#if defined(__SSE__)
  if (unpack_dequantize == k.unpack_dequantize_int4_stream && unpack_dequantize) _mm_sfence();
#endif
}

float finite_absmax(const float* x, int64_t count, int64_t* nonfinite) {
  INT4DDP_CHECK(count >= 0, "absmax: count = ", count, " is negative");
  INT4DDP_CHECK(count == 0 || x, "absmax: null buffer for ", count, " elements");
  int64_t bad = 0;
  const float m = kernels_for(current_isa()).absmax(x, count, &bad);
  if (nonfinite) *nonfinite += bad;
  return m;
}

QuantStats quantize(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                    float* scales) {
  return quantize_isa(current_isa(), x, count, p, codes, scales);
}

QuantStats quantize_feedback(const float* x, const float* e, int64_t count, const QuantParams& p,
                             uint8_t* codes, float* scales, float* e_out, float* dq_out,
                             bool stream_e_out) {
  return quantize_feedback_isa(current_isa(), x, e, count, p, codes, scales, e_out, dq_out,
                               stream_e_out);
}

void dequantize(const uint8_t* codes, const float* scales, int64_t count, int bits,
                int64_t block_size, float* out) {
  dequantize_isa(current_isa(), codes, scales, count, bits, block_size, out);
}

}  // namespace int4ddp::quant
