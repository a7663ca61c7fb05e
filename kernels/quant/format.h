// The INT-b fixed-point format: one definition for every compiler (g++ and nvcc) and both paths
// (compute and communication). See shared/DESIGN.md section 2.
//
// Bit-width b in 2..8, L = 2^(b-1) - 1 positive levels: codes -L..L (b = 4: -7..7; -8 is never
// produced). Clip c > 0 over the scope. Two fp32 scalars per scope, each one IEEE operation:
//   d = fl(c / L)   the step, stored in the scales array and used to dequantize;
//   r = fl(L / c)   the inverse step, used to quantize (saturated to FLT_MAX when L / c overflows,
//                   i.e. for c < L / FLT_MAX, so that z below is never NaN).
// Per element z = fl(x * r), a multiply (never a division):
//   nearest:    q = clamp(rint(z), -L, L)                (round half to even)
//   stochastic: q = clamp(floor(fl(z + u)), -L, L)       u = h * 2^-16, h a 16-bit Philox half-word
//   dequantize: x^ = q * d
// c == 0 (all-zero scope) gives d = r = 0 and code 0. Non-finite inputs get code 0 and are counted
// by the caller. Uniforms (philox.h): one Philox4x32-10 call per 8 elements; element i takes word
// (i % 8) / 2 of the call for group i / 8, its low 16 bits when i is even, high 16 bits when odd.
//
// INT4 packing: byte k holds element 2k in its LOW nibble and element 2k+1 in its HIGH nibble, each
// as 4-bit two's complement (q & 0xF); an odd tail leaves the last high nibble 0. Other bit-widths
// store one code per int8. Scales (one fp32 step d per scope) live in a separate array.
//
// The scalar helpers below are the arithmetic every implementation (reference, AVX2, AVX-512, CUDA)
// must reproduce bit for bit: the same operations in the same order, no FMA contraction.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define INT4DDP_HD __host__ __device__ __forceinline__
#else
#define INT4DDP_HD inline
#endif

namespace int4ddp::quant {

constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;
constexpr int64_t kDefaultBlockSize = 512;  // communication-path block G
// The bit-width that means "not quantized": fp32 layers (quant.*_bits) and the uncompressed
// all-reduce (comm mode fp32).
constexpr int kFp32Bits = 32;

enum class Rounding : uint8_t { kNearest = 0, kStochastic = 1 };

// Positive levels L = 2^(b-1) - 1.
INT4DDP_HD constexpr int levels(int bits) { return (1 << (bits - 1)) - 1; }

INT4DDP_HD constexpr bool valid_bits(int bits) { return bits >= kMinBits && bits <= kMaxBits; }

// Bytes that hold `count` codes of `bits` bits: nibble-packed for b = 4, one int8 per code
// otherwise.
INT4DDP_HD constexpr int64_t packed_bytes(int bits, int64_t count) {
  return bits == 4 ? (count + 1) / 2 : count;
}

static_assert(levels(4) == 7, "INT4 has codes -7..7");
static_assert(levels(8) == 127, "INT8 has codes -127..127");
static_assert(levels(2) == 1, "INT2 has codes -1..1");
static_assert(packed_bytes(4, 3) == 2, "odd INT4 tail takes a whole byte");
static_assert(packed_bytes(8, 3) == 3, "INT8 is one byte per code");

// Step for a scope whose clip is c: d = fl(c / L). Returns 0 for c <= 0 (all-zero scope).
INT4DDP_HD float step_for_clip(float clip, int bits) {
  return clip > 0.0f ? clip / static_cast<float>(levels(bits)) : 0.0f;
}

// Inverse step for a scope whose clip is c: r = fl(L / c), saturated to FLT_MAX. Returns 0 for
// c <= 0 (all-zero scope), which makes every finite x code 0.
INT4DDP_HD float inv_step_for_clip(float clip, int bits) {
  if (!(clip > 0.0f)) return 0.0f;
  const float r = static_cast<float>(levels(bits)) / clip;
  return r <= 3.40282347e+38f ? r : 3.40282347e+38f;
}

// Finite test used by every implementation: |x| <= FLT_MAX (false for NaN and +-Inf).
INT4DDP_HD bool is_finite_value(float x) { return fabsf(x) <= 3.40282347e+38f; }

// u in [0, 1) from the 16-bit half of a random word that element `index` takes: the low half for
// an even index, the high half for an odd one. u = h * 2^-16 is exact.
INT4DDP_HD float uniform_from_half(uint32_t word, uint64_t index) {
  const uint32_t h = (index & 1u) ? (word >> 16) : (word & 0xFFFFu);
  return static_cast<float>(h) * 1.52587890625e-5f;  // 2^-16
}

// clamp(t, -lim, lim) for non-NaN t. Written with comparisons rather than fminf/fmaxf: the result
// is the same for every non-NaN t (NaN never reaches here), and host compilers inline it instead of
// calling libm (a libm call per element was measured 25x slower in AVX-512 builds).
INT4DDP_HD float clamp_levels(float t, float lim) { return t < -lim ? -lim : (t > lim ? lim : t); }

// One code, nearest rounding, from x and the scope's inverse step r. Requires x finite (then z is
// never NaN); r == 0 gives 0.
INT4DDP_HD int quantize_nearest(float x, float inv_step, int bits) {
  const float lim = static_cast<float>(levels(bits));
  return static_cast<int>(clamp_levels(rintf(x * inv_step), lim));
}

// One code, stochastic rounding with u in [0, 1) from x and the scope's inverse step r. Requires x
// finite; r == 0 gives 0.
INT4DDP_HD int quantize_stochastic(float x, float inv_step, float u, int bits) {
  const float lim = static_cast<float>(levels(bits));
  return static_cast<int>(clamp_levels(floorf(x * inv_step + u), lim));
}

INT4DDP_HD float dequantize_value(int q, float d) { return static_cast<float>(q) * d; }

// Nibble packing of two codes (each in -8..7) into one byte: lo = element 2k, hi = element 2k+1.
INT4DDP_HD uint8_t pack_nibbles(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
// Sign-extend a 4-bit two's complement nibble.
INT4DDP_HD int nibble_to_int(unsigned nib) { return static_cast<int>((nib & 0xFu) ^ 0x8u) - 8; }
INT4DDP_HD int unpack_lo(uint8_t byte) { return nibble_to_int(byte); }
INT4DDP_HD int unpack_hi(uint8_t byte) { return nibble_to_int(static_cast<unsigned>(byte) >> 4); }

}  // namespace int4ddp::quant
