// AMX-INT8 micro-kernel of the integer GEMM (see igemm_kernels.h): one 16 x 16 int32 C tile,
// tdpbusd over 16-group (64-byte) steps of a row-major u8 A tile and the s8 panel, whose layout
// ([group][16 columns][4 bytes], 64 bytes a group) is exactly the B tile's. Compiled with a
// function-level target; run only where cpuid reports AMX-TILE and AMX-INT8 and Linux granted the
// tile state (amx_permitted).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "kernels/math/igemm_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kMr = 16, kNr = 16, kGroupsPerTile = 16;
constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: request an extended state component
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data state

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile,amx-int8"))) void micro(const uint8_t* u, int64_t u_stride,
                                                        const int8_t* s, int64_t groups, int,
                                                        int32_t* tile) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 3; ++t) {  // tile 0: C (16 x 16 int32), 1: A (16 x 64 u8), 2: B (16 x 64 s8)
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  for (int64_t g = 0; g < groups; g += kGroupsPerTile) {
    _tile_loadd(1, u + g * 4, u_stride);
    _tile_loadd(2, s + g * kNr * 4, kNr * 4);
    _tile_dpbusd(0, 1, 2);
  }
  _tile_stored(0, tile, kNr * 4);
  _tile_release();
}

}  // namespace

bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

const IgemmKernels kIgemmAmx = {kMr, kNr, kGroupsPerTile, true, micro};

}  // namespace int4ddp::math::detail
