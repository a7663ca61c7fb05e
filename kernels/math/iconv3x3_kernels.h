// Internal: the per-ISA tiles of the integer 3x3 convolution (iconv3x3.h) and the driver entry
// points that take a tile table explicitly. Each ISA file fills one table; its functions carry
// their own target attributes, so every file compiles without ISA flags and the driver calls a
// table only after iconv3x3_isa_available() said yes. Tests (and the SIMDe emulation harness kept
// outside the repository) drive the shared driver with a table of their own.
//
// Operands as the driver lays them out (see iconv3x3.cpp):
//   forward      xp: the tile's first flat position in channel-group plane 0 of the padded input
//                (4-byte pixels: 4 channels, unsigned bytes with the offset); group g
//                (= channel group * 9 + tap) of the tile is nr * 4 contiguous bytes at xp +
//                goff[g]. wp: the weights of the tile's first output channel in
//                Iconv3x3Weights::data; row r (output channel o0 + r) of group g is 4 signed bytes
//                at wp + g * kWeightGroup
//                + 4 r. res[r * nr + j] = scale * float(sum - corr[r]) (the offset correction).
//   wgrad        row r (a (channel, tap) pair) of group g is 4 unsigned bytes at xb + roff[r] + 4 g
//                (4 consecutive flat positions); output channel o0 + j of group g is 4 signed
//                bytes at db + g * ostride * 4 + 4 j; groups is even and >= 2. t[r * nr + j] =
//                the int32 sum.
// i16: the groups whose int16 pair sums may be added before widening (int16_pairs only; the driver
// proves it); kernels with int32 products ignore it.
#pragma once

#include <cstdint>

#include "kernels/math/iconv3x3.h"

namespace int4ddp::math::detail {

// Iconv3x3Weights::data: blocks of kWeightRows output channels, each group of a block
// kWeightRows x 4 bytes (kWeightGroup), so a tile of up to kWeightRows channels reads one block.
constexpr int kWeightRows = 8;
constexpr int kWeightGroup = kWeightRows * 4;

struct Iconv3x3Kernels {
  bool int16_pairs;  // products summed in int16 pairs (vpmaddubsw): needs 2 * qu * q <= 32767
  int mr, nr;        // forward tile: output channels (divides kWeightRows) x flat positions
  int wg_mr, wg_nr;  // backward-weight tile: (channel, tap) rows x output channels (nr % 4 == 0)
  void (*tile)(const uint8_t* xp, const int64_t* goff, const int8_t* wp, int64_t groups,
               int64_t i16, const int32_t* corr, float scale, float* res);
  void (*wgrad_tile)(const uint8_t* xb, const int64_t* roff, const uint8_t* db, int64_t ostride,
                     int64_t groups, int64_t i16, int32_t* t);
};

extern const Iconv3x3Kernels kIconv3x3Avx2;
extern const Iconv3x3Kernels kIconv3x3Avx512Vnni;

// The overflow guards of iconv3x3.h for one table (no CPU or INT4DDP_ISA check).
bool iconv3x3_fits(const Iconv3x3Kernels& kn, const Iconv3x3Weights& wt, int qmax, bool is_signed);
bool iconv3x3_wgrad_fits(const Iconv3x3Kernels& kn, int64_t h, int64_t w, int qmax, bool is_signed,
                         int qdy);
// iconv3x3 through an explicit table (needs iconv3x3_fits; checks the sizes).
void iconv3x3_with(const Iconv3x3Kernels& kn, const Iconv3x3Weights& wt, int64_t h, int64_t w,
                   const void* in, bool is_signed, int qmax, float scale, float* out, int64_t ldo);

}  // namespace int4ddp::math::detail
