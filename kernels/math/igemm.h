// Exact integer GEMMs on quantization codes (DESIGN.md section 3): C = scale * (op(A) op(B)) with
// int32 accumulation, the three GEMMs of every quantized Conv2d / Linear:
//   forward          unsigned activations 0..2^b-1  x  signed weights -L..L
//   backward-data    signed gradients -L..L         x  signed weights -L..L
//   backward-weight  activations                    x  signed gradients -L..L
// Row-major, counts in elements; op(A) is M x K, op(B) is K x N, C is M x N (ldc its row stride).
//
// Operands are code matrices (CodeMatrix): int8 (signed codes, |v| <= qmax <= 127), uint8 (unsigned
// codes, v <= qmax <= 255), or integer-valued floats holding such codes (the layers' fp32 code
// buffers; converted while packing). The result is EXACT: out = scale * float(T) (out + that when
// accumulating), T the exact integer sum, the same formula as math::int_gemm_ref, so every ISA
// equals the reference bit for bit.
//
// How the kernels multiply: one operand is the "u8 side" (unsigned bytes), the other the "s8 side"
// (signed bytes), as vpdpbusd / maddubs / tdpbusd want. An unsigned operand goes on the u8 side; a
// signed one put there is offset by +qmax (0..2 qmax) and the offset is removed with a column-sum
// correction: sum (a + o) b = sum a b + o * sum b. K is padded to groups of 4 with zeros.
//
// Overflow guard: every int32 partial sum is bounded by K * qmax_u' * qmax_s, with qmax_u' the u8
// side's largest byte (qmax, or 2 qmax when offset). It is kept below 2^31 by summing K in chunks
// of at most igemm_max_k() terms (exact int64 totals across chunks). At 8 bits the worst case is
// unsigned activations (255) x signed codes (127): K <= (2^31 - 1) / (255 * 127) = 66311 per chunk
// (signed x signed with the offset: 254 * 127, K <= 66572). 4-bit codes: 15 * 7, K <= 20.4 million.
// The AVX2 maddubs kernel also sums pairs in int16: it is used only where 2 * qmax_u' * qmax_s <=
// 32767 (no saturation, e.g. b <= 7 for activations x weights), else an int16-operand madd kernel.
//
// Instruction sets (IgemmIsa), chosen at run time: ref (plain loops, int64), avx2 (maddubs /
// madd_epi16), avx512vnni (vpdpbusd) and amx (AMX-INT8 tdpbusd; Linux must grant the tile state
// with arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once per process). The default is
// the best one present; INT4DDP_GEMM_ISA=ref|avx2|avx512vnni|amx forces one and is an error when
// that one is absent. (INT4DDP_ISA is the codec's override, with values portable|avx2|avx512.)
// Every call runs on the calling thread (thread-local packing buffers); callers parallelise.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/math/gemm.h"

namespace int4ddp::math {
namespace detail {
struct IgemmKernels;
}

enum class IgemmIsa : uint8_t { kRef = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
inline constexpr IgemmIsa kIgemmIsas[] = {IgemmIsa::kRef, IgemmIsa::kAvx2, IgemmIsa::kAvx512Vnni,
                                          IgemmIsa::kAmx};

const char* igemm_isa_name(IgemmIsa isa);
// Compiled in, supported by this CPU and (AMX) permitted by the OS.
bool igemm_isa_available(IgemmIsa isa);
IgemmIsa igemm_best_isa();
// INT4DDP_GEMM_ISA when set (an error naming the value when unknown or absent), else the best.
// Read once per process.
IgemmIsa igemm_default_isa();

enum class CodeType : uint8_t { kS8 = 0, kU8 = 1, kF32 = 2 };

// A matrix of codes as stored: element (r, c) of the stored matrix at data[r * ld + c]; op() is the
// stored matrix or its transpose. is_unsigned: the codes are 0..qmax (else -qmax..qmax). For kS8
// and kU8 the signedness is the type's; kF32 holds integer-valued floats and says it here.
struct CodeMatrix {
  const void* data = nullptr;
  int64_t ld = 0;
  Trans trans = Trans::kNo;
  CodeType type = CodeType::kS8;
  bool is_unsigned = false;
  int qmax = 0;  // largest |code|: <= 127 signed, <= 255 unsigned
};
inline CodeMatrix codes_s8(const int8_t* d, int64_t ld, int qmax, Trans t = Trans::kNo) {
  return {d, ld, t, CodeType::kS8, false, qmax};
}
inline CodeMatrix codes_u8(const uint8_t* d, int64_t ld, int qmax, Trans t = Trans::kNo) {
  return {d, ld, t, CodeType::kU8, true, qmax};
}
inline CodeMatrix codes_f32(const float* d, int64_t ld, int qmax, bool is_unsigned,
                            Trans t = Trans::kNo) {
  return {d, ld, t, CodeType::kF32, is_unsigned, qmax};
}

// Largest K summed in one int32 chunk for these operands (see the guard above).
int64_t igemm_max_k(const CodeMatrix& a, const CodeMatrix& b);

// C (m, n) = scale * float(op(A) op(B)) exactly (accumulate: C +=). Throws int4ddp::Error on a bad
// size, a null operand, a qmax outside its type's range, or two unsigned operands both above 127.
void igemm(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b, float scale,
           bool accumulate, float* c, int64_t ldc, IgemmIsa isa);
inline void igemm(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
                  float scale, bool accumulate, float* c, int64_t ldc) {
  igemm(m, n, k, a, b, scale, accumulate, c, ldc, igemm_default_isa());
}
// C (m, n) = op(A) op(B) as int32; needs k <= igemm_max_k(a, b) (else an error).
void igemm_s32(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
               int32_t* c, int64_t ldc, IgemmIsa isa);

// ---- Pre-packed operands ------------------------------------------------------------------------
// The micro-kernels' panel layouts of one ISA (igemm_kernels.h), built once by the caller and
// reused (a layer's weight codes, packed once per step) or written straight from the source (the
// im2col columns of a convolution, with no column matrix in between). igemm_packed(A, B) computes
// C = scale * float(A B) as igemm does, bit for bit. A is the u8 side: any codes, signed ones
// carry the +qmax offset; B the s8 side: codes that fit int8 (igemm_fits_s8). An ISA with a
// micro-kernel only (not kRef).

bool igemm_fits_s8(const CodeMatrix& x);  // signed, or unsigned with qmax <= 127

// op(A) (m x k) in MR-row panels.
struct IgemmPackedA {
  const detail::IgemmKernels* kernels = nullptr;  // the ISA's table (set by pack)
  int64_t rows = 0, k = 0, kq_pad = 0;  // kq_pad: groups of 4 k per row, padded to the alignment
  int offset = 0, qu = 0;               // added to every code; largest byte with it
  std::vector<uint8_t> data;            // panel p at p * kq_pad * 4 * mr
  void pack(IgemmIsa isa, int64_t m, int64_t depth, const CodeMatrix& a);
};

// op(B) (k x n) in NR-column panels (igemm_packed sums its columns where A has an offset).
struct IgemmPackedB {
  const detail::IgemmKernels* kernels = nullptr;
  int64_t cols = 0, k = 0, kq_pad = 0;
  int qs = 0;                // largest |code|
  std::vector<int8_t> data;  // panel p at p * kq_pad * 4 * nr
  void pack(IgemmIsa isa, int64_t depth, int64_t n, const CodeMatrix& b);
};

// The column matrix of a 2-D convolution over samples s0..s0+g-1 of images (n, channels, h, w)
// (im2col): row (c * kernel + ky) * kernel + kx, column s * ho * wo + oy * wo + ox holds
// images[s0 + s][c][oy * stride - pad + ky][ox * stride - pad + kx], code 0 outside the image.
struct ConvColumns {
  int64_t channels, h, w;
  int kernel, stride, pad;
  int64_t ho, wo;
  int64_t rows() const { return channels * kernel * kernel; }
  int64_t cols(int64_t g) const { return g * ho * wo; }
};
// Writes the column matrix of `images` (int8 or uint8 codes, qmax / is_unsigned as in CodeMatrix)
// straight into panels: cols (rows x g*ho*wo, K = the rows) when not null, and its transpose
// cols_t (g*ho*wo x rows, K = the columns) when not null; each equals pack() of that matrix.
void igemm_pack_conv(IgemmIsa isa, const ConvColumns& geo, const void* images, bool is_unsigned,
                     int qmax, int64_t s0, int64_t g, IgemmPackedB* cols, IgemmPackedB* cols_t);

// C (a.rows, b.cols) = scale * float(A B) exactly (accumulate: C +=); a and b packed for the same
// ISA and k. Runs on the calling thread.
void igemm_packed(const IgemmPackedA& a, const IgemmPackedB& b, float scale, bool accumulate,
                  float* c, int64_t ldc);

// The definition: int64 dot products of the codes, then one rescale per output.
void igemm_ref(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
               float scale, bool accumulate, float* c, int64_t ldc);

}  // namespace int4ddp::math
