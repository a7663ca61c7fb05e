// Exact integer 3x3 convolution, stride 1, pad 1, on quantization codes (DESIGN.md section 3): the
// quantized Conv2d's forward (unsigned activation codes x signed weight codes) and its
// backward-data (signed gradient codes x the flipped signed weights, a transposed convolution that
// is again a 3x3 stride-1 pad-1 convolution), and its backward-weight (iconv3x3_wgrad below), as
// implicit GEMMs with no im2col pass.
//
//   out[o * ldo + y * w + x] = scale * float(T),  T = sum over c < cin, ky, kx < 3 of
//                              W[o][c][ky][kx] * in[c][y + ky - 1][x + kx - 1]  (0 outside)
//
// T is the exact integer sum, so the result equals math::igemm / igemm_ref on the im2col columns
// (and int_gemm on the codes as floats) bit for bit.
//
// How it runs: the input codes of one sample are written once into a padded,
// channel-group-fastest byte layout: groups of 4 channels, each a padded plane (row stride w + 1,
// as conv3x3_kernels.h: the right pad of row y is the left pad of row y + 1) of 4-byte pixels. N
// consecutive flat output positions of one tap and channel group are then 4 N contiguous bytes at
// a per-tap offset (ky * (w + 1) + kx pixels): the GEMM's packed column panel, read in place. The
// micro-kernel multiplies them (the unsigned operand) with 4 bytes of one output channel's weights
// broadcast (the signed operand). Signed input codes (the gradients, or activations on the signed
// grid) are offset by +qmax to 0..2 qmax (the padding holds the offset too), and qmax * (sum of the
// output channel's weight codes) is subtracted from T.
//
// Instruction sets (Iconv3x3Isa, iconv3x3_kernels.h), chosen at run time:
//   avx2        vpmaddubsw, 4 output channels x 16 positions per tile; its int16 pair sums are
//               summed in int16 over at most 32767 / (2 * qu * qw) channel groups (qu the largest
//               input byte with its offset), then widened into int32. Refused where 2 * qu * qw >
//               32767 (8-bit activations x 8-bit weights: 2 * 255 * 127 saturates int16).
//   avx512vnni  vpdpbusd (AVX-512F + AVX512-VNNI), 8 output channels x 32 positions per tile: the
//               4-byte products go straight into int32, so every code width 2..8 runs.
// kAuto takes the widest one the CPU has and INT4DDP_ISA allows (quant::isa_allows: avx512 allows
// both, avx2 only the AVX2 kernel, portable neither).
//
// Overflow guard (both): T's int32 sum is bounded by 9 * 4 * ceil(cin / 4) * qu * qw <= 2^31 - 1.
// The largest K = 9 cin at 8 bits: unsigned activations (qu = 255) x weights (127) up to
// cin = 7364 (K = 66276); signed inputs (qu = 254, the gradients of backward-data) up to cin = 7396
// (K = 66564). Where a guard says no, iconv3x3_supports() says no and the caller keeps its im2col
// GEMM (which splits K into int32 chunks).
#pragma once

#include <cstdint>
#include <vector>

namespace int4ddp::math {
namespace detail {
struct Iconv3x3Kernels;
}

enum class Iconv3x3Isa : uint8_t { kAuto = 0, kAvx2 = 1, kAvx512Vnni = 2 };
inline constexpr Iconv3x3Isa kIconv3x3Isas[] = {Iconv3x3Isa::kAvx2, Iconv3x3Isa::kAvx512Vnni};

const char* iconv3x3_isa_name(Iconv3x3Isa isa);
// The CPU has it and INT4DDP_ISA allows it (see above); kAuto: any of them.
bool iconv3x3_isa_available(Iconv3x3Isa isa);
// kAuto -> the widest available one (kAuto when none is); any other value is returned as is.
Iconv3x3Isa iconv3x3_resolve(Iconv3x3Isa isa);

// Weight codes W (cout, cin, 3, 3), int8, |code| <= qw, packed for the micro-kernels: blocks of 8
// output channels, each [group = c4 * 9 + tap][8 channels][4 bytes], zero past cin and cout.
struct Iconv3x3Weights {
  int64_t cin = 0, cout = 0;
  int64_t c4 = 0;  // channel groups of 4: ceil(cin / 4)
  int qw = 0;      // largest |code|
  std::vector<int8_t> data;
  std::vector<int32_t> rowsum;  // per output channel, the sum of its codes (the offset correction)
  // W (cout, cin, 3, 3) as stored.
  void pack(const int8_t* w, int64_t cout, int64_t cin, int qw);
  // The transposed convolution of W (cout, cin, 3, 3) (backward-data): a convolution from cout
  // channels to cin with weights Wt[c][o][ky][kx] = W[o][c][2 - ky][2 - kx].
  void pack_transposed(const int8_t* w, int64_t cout, int64_t cin, int qw);
};

// True when the kernel of `isa` may run for these weights and inputs (is_signed: int8 codes
// -qmax..qmax, else uint8 0..qmax): the instruction set is available and its guard above holds.
bool iconv3x3_supports(const Iconv3x3Weights& wt, int qmax, bool is_signed,
                       Iconv3x3Isa isa = Iconv3x3Isa::kAuto);

// One sample: in (wt.cin, h, w) codes (int8 when is_signed, else uint8) -> out (wt.cout planes of
// h * w floats, plane o at out + o * ldo). Needs iconv3x3_supports(); throws int4ddp::Error
// otherwise or on a bad size. Runs on the calling thread (thread-local scratch).
void iconv3x3(const Iconv3x3Weights& wt, int64_t h, int64_t w, const void* in, bool is_signed,
              int qmax, float scale, float* out, int64_t ldo, Iconv3x3Isa isa = Iconv3x3Isa::kAuto);

// Backward-weight of the same convolution, as an implicit GEMM over the output positions (K):
// for o < cout, c < cin and tap = ky * 3 + kx, the exact integer
//   sum over samples s < n, y < h, x < w of dy_s[o][y][x] * in_s[c][y + ky - 1][x + kx - 1]
// (0 outside the image) is added to dw[(o * cin + c) * 9 + tap], or with `transposed` to
// dw[(c * cout + o) * 9 + 8 - tap] (the transposed convolution's weights, taps flipped). in: n
// samples (cin, h, w) of codes as in iconv3x3; dy: n samples (cout, h, w) of int8 codes,
// |code| <= qdy. K runs over the flat output positions (row stride w + 1) in groups of 4: the
// loaded operand is dy, 16 output channels x 4 positions from a [position group][channel][4]
// copy of dy (zero at the junk column); the broadcast operand is 4 bytes of one input channel's
// padded plane at the tap's offset (the unsigned operand: signed inputs carry the +qmax offset,
// removed with qmax * the output channel's dy sum). A tile is 4 (avx2) or 8 (avx512vnni)
// (channel, tap) rows x 16 output channels; its sums are exact in int32 per pass of samples, kept
// as int64 by Iconv3x3WgradSum across calls and added to dw once (finish).
// iconv3x3_wgrad_supports: the instruction set is available, one sample's
// 4 * ceil((h + 1) * (w + 1) / 4) * qu * qdy < 2^31 (qu as in iconv3x3; samples are stacked along
// K with one shared pad row, as many per int32 pass as the bound allows: at 8 bits, 255 x 127,
// up to 66311 positions per pass) and, for avx2, 2 * qu * qdy <= 32767.
bool iconv3x3_wgrad_supports(int64_t h, int64_t w, int qmax, bool is_signed, int qdy,
                             Iconv3x3Isa isa = Iconv3x3Isa::kAuto);
class Iconv3x3WgradSum {
 public:
  // Zero sums for a convolution from cin to cout channels (keeps the storage).
  void reset(int64_t cin, int64_t cout);
  // += the sums of n samples (see above); needs iconv3x3_wgrad_supports() (else an Error).
  void add(int64_t h, int64_t w, int64_t n, const void* in, bool is_signed, int qmax,
           const int8_t* dy, int qdy, Iconv3x3Isa isa = Iconv3x3Isa::kAuto);
  // add() through an explicit tile table (iconv3x3_kernels.h; needs iconv3x3_wgrad_fits).
  void add_with(const detail::Iconv3x3Kernels& kn, int64_t h, int64_t w, int64_t n, const void* in,
                bool is_signed, int qmax, const int8_t* dy, int qdy);
  // dw += the sums (as doubles, exact below 2^53) in the layout chosen by `transposed`.
  void finish(bool transposed, double* dw) const;

 private:
  int64_t cin_ = 0, cout_ = 0;
  std::vector<int64_t> sum_;  // [(c * 9 + tap) rows][cout output channels]
};
// reset + add + finish.
void iconv3x3_wgrad(int64_t cin, int64_t cout, int64_t h, int64_t w, int64_t n, const void* in,
                    bool is_signed, int qmax, const int8_t* dy, int qdy, bool transposed,
                    double* dw, Iconv3x3Isa isa = Iconv3x3Isa::kAuto);

// The definitions, plain loops with int64 sums: the same contracts, any codes, no ISA.
void iconv3x3_ref(const int8_t* w, int64_t cout, int64_t cin, int64_t h, int64_t wd, const void* in,
                  bool is_signed, float scale, float* out, int64_t ldo);
void iconv3x3_wgrad_ref(int64_t cin, int64_t cout, int64_t h, int64_t w, int64_t n, const void* in,
                        bool is_signed, const int8_t* dy, bool transposed, double* dw);

}  // namespace int4ddp::math
