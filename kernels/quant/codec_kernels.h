// Internal: the per-ISA inner kernels the fast codec driver (codec.cpp) is built from. Each ISA
// file (codec_portable.cpp, codec_avx2.cpp, codec_avx512.cpp) fills one table. Every kernel works
// on a contiguous segment that lies inside one scale scope; `first_index` is the global element
// index of x[0] (it keys the Philox stream). Kernels must match the scalar helpers of format.h bit
// for bit.
#pragma once

#include <cstdint>

#include "kernels/quant/codec.h"

namespace int4ddp::quant::detail {

struct SegmentQuant {
  float inv_step;  // r = inv_step_for_clip(clip, bits) of the scope (0: all codes 0)
  float clip;      // c of the scope: |x| > clip counts as clipped
  // Finite x is quantized as clamp(x, -saturate_at, saturate_at): the scope's clip when the caller
  // gave per-block clips (QuantParams::clips), +inf otherwise (then x itself, bit for bit). The
  // clamp matters: fl(c r) may miss L by an ulp, so with stochastic rounding x > c can code L
  // where c codes L - 1 (u = 0), and x < -c code -L where -c codes -L + 1 (8 bits).
  float saturate_at;
  int bits;  //
  Rounding rounding;
  RngKey key;
  int64_t first_index;  // global index of the segment's first element
  bool all_finite;      // the scope holds no NaN/Inf (lets kernels skip the masking)
  float step = 0.0f;    // d = step_for_clip(clip, bits): the fused error feedback's x^ = q d
};

// The error-feedback streams of a fused quantize (quantize_feedback), offset like x.
struct Feedback {
  const float* e = nullptr;   // v = x + e (null: v = x)
  float* e_out = nullptr;     // v - x^ (null: not written)
  float* dq_out = nullptr;    // x^, the dequantized codes (null: not written)
  bool stream_e_out = false;  // e_out (16-byte aligned) with non-temporal stores; caller fences
};

struct CodecKernels {
  // max |x| over finite elements (0 if none); adds the number of non-finite elements to *nonfinite.
  float (*absmax)(const float* x, int64_t n, int64_t* nonfinite);
  // codes[i] = quantize(x[i]) as int8; returns the number of clipped finite elements.
  int64_t (*quantize_segment)(const float* x, int64_t n, const SegmentQuant& q, int8_t* codes);
  // out[k] = pack(codes[2k], codes[2k+1]); n may be odd (last high nibble 0).
  void (*pack_int4)(const int8_t* codes, int64_t n, uint8_t* out);
  // codes[i] = nibble i of in (n codes).
  void (*unpack_int4)(const uint8_t* in, int64_t n, int8_t* codes);
  // out[i] = codes[i] * step.
  void (*dequantize_segment)(const int8_t* codes, int64_t n, float step, float* out);
  // Optional fused INT4 kernels (nullptr: the driver stages int8 codes and uses the kernels above).
  // out[k] = pack(quantize(x[2k]), quantize(x[2k+1])) for a segment whose first element sits in
  // the low nibble of out[0]; n may be odd (last high nibble 0). Returns the clipped count. It
  // prefetches its own input ahead, past x + n into the scopes that follow (the driver does not).
  int64_t (*quantize_pack_int4)(const float* x, int64_t n, const SegmentQuant& q, uint8_t* out);
  // out[i] = nibble (lead + i) of in, times step; lead is 0 or 1 (1: start at in[0]'s high nibble).
  void (*unpack_dequantize_int4)(const uint8_t* in, int64_t lead, int64_t n, float step,
                                 float* out);
  // The same with non-temporal stores (optional), for outputs too large to stay in the cache: the
  // output is not read for allocation first. The caller issues a store fence after the last call.
  void (*unpack_dequantize_int4_stream)(const uint8_t* in, int64_t lead, int64_t n, float step,
                                        float* out);
  // Optional fused INT4 error feedback (quantize_feedback): the absmax of v = x + e, and
  // quantize_pack_int4 of v that also writes fb.e_out = v - x^ and fb.dq_out = x^ where not null.
  float (*absmax_sum)(const float* x, const float* e, int64_t n, int64_t* nonfinite);
  int64_t (*quantize_pack_int4_feedback)(const float* x, const Feedback& fb, int64_t n,
                                         const SegmentQuant& q, uint8_t* out);
};

extern const CodecKernels kPortableKernels;
#if defined(INT4DDP_HAVE_AVX2)
extern const CodecKernels kAvx2Kernels;
#endif
#if defined(INT4DDP_HAVE_AVX512)
extern const CodecKernels kAvx512Kernels;
#endif

// The clip of scope s: p.clips[s] (checked: finite, >= 0) or p.gamma * absmax; and the bound
// SegmentQuant::saturate_at for that clip. Shared by the reference and the fast driver.
float scope_clip(const QuantParams& p, int64_t scope, float absmax);
float saturation_bound(const QuantParams& p, float clip);

// Scalar pieces shared by the ISA files for heads and tails.
int64_t quantize_segment_scalar(const float* x, int64_t n, const SegmentQuant& q, int8_t* codes);

}  // namespace int4ddp::quant::detail
