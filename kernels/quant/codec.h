// The CPU codec: quantize + pack and unpack + dequantize of fp32 tensors into INT-b codes with
// per-tensor or per-block fp32 steps (format in kernels/quant/format.h, keying in philox.h).
//
// Two implementations with one contract:
//   quantize_ref / dequantize_ref   plain per-element loops: the definition, never optimised;
//   quantize / dequantize           the fast path (AVX-512, AVX2 or portable kernels, picked at run
//                                   time), tested to produce the same codes, bytes and floats.
//
// Scope of a scale: block_size = 0 means one scale for the whole tensor (compute path); otherwise
// blocks of block_size elements, the last one shorter (communication path). For each scope:
//   c = gamma * max|x| over its finite elements, d = c / L, scales[scope] = d.
// Per-block clips (QuantParams::clips, communication path): the caller gives c = c_b of every
// block instead (an interval policy's block rule, policy.h); d and r come from c_b exactly as from
// gamma * max|x|, and each finite element is saturated at +-c_b before it is quantized:
//   z = fl(clamp(x, -c_b, c_b) * r)
// so the codes are those of the block clamped at its clip, with no clamped copy made.
// Non-finite elements get code 0 and are counted in QuantStats::nonfinite; the caller decides what
// to do (the trainer skips the step). Clipped elements (|x| > c) are counted in the same pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/quant/format.h"
#include "kernels/quant/philox.h"

namespace int4ddp::quant {

struct QuantParams {
  int bits = 4;                            // 2..8
  Rounding rounding = Rounding::kNearest;  //
  float gamma = 1.0f;                      // clip = gamma * max|x| over the scope, gamma in (0, 1]
  int64_t block_size = 0;                  // elements per scale; 0 = one scale per tensor
  RngKey key;                              // stochastic rounding stream
  int64_t index_offset = 0;  // element i of this call is element index_offset + i of its stream
                             // (the Philox counter): lets a caller quantize a long tensor in
                             // block-aligned pieces with the keys of one call (CPU codec only)
  // Per-block clips c_b >= 0, finite: num_scales(count, block_size) floats, block b = elements
  // b G .. b G + G - 1 of this call (needs block_size > 0), in host memory for the CPU codec and in
  // device memory for the CUDA codec. Null: c = gamma * max|block|. Set: gamma is not used, c_b
  // replaces it and elements beyond +-c_b saturate (see the top of this file).
  const float* clips = nullptr;
};

// Stats of one quantization, one 32-byte record for every use: the CPU codec returns it, the CUDA
// codec writes it to device memory (atomics on clipped, nonfinite and absmax's bits), and the
// two-shot all-reduce sends it as the trailer of every message (comm/two_shot.h), so its layout
// (little-endian, the field order below) is part of the wire format.
struct QuantStats {
  int64_t clipped = 0;    // finite elements with |x| > c of their scope (R = clipped / count)
  int64_t count = 0;      // elements seen
  int64_t nonfinite = 0;  // NaN and +-Inf elements (coded 0)
  float absmax = 0.0f;    // max |x| over all finite elements
  uint32_t reserved = 0;  // 0

  double clip_fraction() const { return count > 0 ? static_cast<double>(clipped) / count : 0.0; }
};
static_assert(sizeof(QuantStats) == 32 && offsetof(QuantStats, clipped) == 0 &&
                  offsetof(QuantStats, count) == 8 && offsetof(QuantStats, nonfinite) == 16 &&
                  offsetof(QuantStats, absmax) == 24 && offsetof(QuantStats, reserved) == 28,
              "QuantStats is the 32-byte two-shot wire trailer");

// a <- a + b: the counts add, absmax is the larger.
inline void add_stats(QuantStats& a, const QuantStats& b) {
  a.clipped += b.clipped;
  a.count += b.count;
  a.nonfinite += b.nonfinite;
  a.absmax = a.absmax < b.absmax ? b.absmax : a.absmax;
}

// Number of scales for `count` elements: 1 for per-tensor (block_size 0; also for count 0),
// ceil(count / block_size) otherwise.
int64_t num_scales(int64_t count, int64_t block_size);

// Throws int4ddp::Error naming the field when bits, gamma or block_size is out of range, or clips
// is set for a per-tensor scale (block_size 0). The clip values themselves are checked by
// quantize() and quantize_ref() as they are read (a negative or non-finite c_b throws).
void validate(const QuantParams& p);

// codes: packed_bytes(bits, count) bytes; scales: num_scales(count, block_size) floats.
QuantStats quantize_ref(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                        float* scales);
void dequantize_ref(const uint8_t* codes, const float* scales, int64_t count, int bits,
                    int64_t block_size, float* out);

QuantStats quantize(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                    float* scales);
void dequantize(const uint8_t* codes, const float* scales, int64_t count, int bits,
                int64_t block_size, float* out);

// Quantization with error feedback in one pass (the two-shot all-reduce's steps 3 and 5): with
// v[i] = fl(x[i] + e[i]) (or v = x when e is null), the codes, scales and stats are exactly those
// of quantize(v), and with x^[i] = the value dequantize() gives for code i:
//   e_out[i] = fl(v[i] - x^[i])   (when e_out is not null)
//   dq_out[i] = x^[i]             (when dq_out is not null)
// e_out may be e (in place); no other output may overlap an input. The AVX2 kernel does this in
// one pass per scope (plus the absmax pass) for INT4 with an even block size; other cases make v,
// quantize, dequantize and subtract in turn, with the same bits.
QuantStats quantize_feedback_ref(const float* x, const float* e, int64_t count,
                                 const QuantParams& p, uint8_t* codes, float* scales, float* e_out,
                                 float* dq_out);
// stream_e_out: write e_out with non-temporal stores where the kernel can (an error buffer larger
// than the cache, read again only at the next step); the same values either way.
QuantStats quantize_feedback(const float* x, const float* e, int64_t count, const QuantParams& p,
                             uint8_t* codes, float* scales, float* e_out, float* dq_out,
                             bool stream_e_out = false);

// max |x| over the finite elements of x (0 if none), the scale basis of quantize(); adds the number
// of NaN/Inf elements to *nonfinite when it is not null. Uses the same fast kernels as quantize().
float finite_absmax(const float* x, int64_t count, int64_t* nonfinite = nullptr);

// One piece of a per-tensor quantization (p.block_size must be 0) whose scale basis the caller
// found beforehand over the WHOLE tensor: absmax = the max of finite_absmax over all pieces (a max
// is exact in any order), all_finite = no piece holds NaN/Inf. Writes one int8 code per element
// (no packing, so a piece may start anywhere) equal to the code quantize() gives element
// p.index_offset + i of the whole tensor, and returns the piece's clipped count. Lets a caller
// quantize one tensor in pieces on several threads; the tensor's step is
// step_for_clip(p.gamma * absmax, p.bits).
int64_t quantize_piece(const float* x, int64_t count, const QuantParams& p, float absmax,
                       bool all_finite, int8_t* codes);

// --- instruction-set dispatch ---------------------------------------------------------------
enum class Isa : uint8_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
bool isa_available(Isa isa);  // compiled in and supported by this CPU
Isa best_isa();               // what quantize()/dequantize() use unless overridden
// Force the ISA used by quantize()/dequantize() (tests and benchmarks); throws if unavailable.
// Also settable with the environment variable INT4DDP_ISA=portable|avx2|avx512.
void set_isa(Isa isa);
Isa current_isa();
// True when current_isa() (this CPU, this build, INT4DDP_ISA) is `isa` or wider. The other vector
// kernels (conv3x3, BatchNorm, the activation quantizers) ask this, so one variable
// (INT4DDP_ISA=portable) turns every one of them off.
bool isa_allows(Isa isa);

// The same fast path with an explicit ISA (thread-safe; used by tests to compare every ISA).
QuantStats quantize_isa(Isa isa, const float* x, int64_t count, const QuantParams& p,
                        uint8_t* codes, float* scales);
QuantStats quantize_feedback_isa(Isa isa, const float* x, const float* e, int64_t count,
                                 const QuantParams& p, uint8_t* codes, float* scales, float* e_out,
                                 float* dq_out, bool stream_e_out = false);
void dequantize_isa(Isa isa, const uint8_t* codes, const float* scales, int64_t count, int bits,
                    int64_t block_size, float* out);

}  // namespace int4ddp::quant
