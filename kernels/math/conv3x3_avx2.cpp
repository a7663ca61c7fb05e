// AVX2 + FMA kernels of the direct 3x3 convolution (plane layout: conv3x3_kernels.h). Compiled
// with -mavx2 -mfma for this file only and called only after a run-time CPU check (conv3x3.cpp).
// 16 ymm registers shape both tiles: 12 accumulators, the operand vectors that feed them, one
// broadcast.
//
// spatial (forward and backward data): 8 consecutive flat output positions per ymm, a tile of NK
//   output channels x NV vectors (4 x 3 = 12 accumulators) summed over input channels and taps
//   with broadcast weights; each tap is one unaligned load at a constant offset of the padded
//   plane. A vector whose 8 lanes are 8 consecutive NCHW elements is stored whole; one that holds
//   a junk position (x == w) or the end of the plane goes through a spill and per-lane stores.
// wgrad_planes (backward weight): flat positions in the lanes on both operands (x and dy each in
//   the padded plane layout: no transposes), a tile of NO output channels x the 3 taps of one
//   kernel row (ky) for one input channel (4 x 3 = 12 accumulators). dy is zero at the junk
//   positions (the plane's pad), so junk lanes add nothing; the lanes of a tile are added
//   horizontally in a fixed order when its piece is done, 4 output channels at a time, and the
//   sums are added to the caller's float or double accumulator ((c, 9, k) layout: those 4 sums
//   are adjacent).
// All arithmetic on codes is exact: FMAs of integers whose partial sums stay below 2^24 (the
// driver bounds the pieces; any partial sum of such a piece is bounded by the sum of the
// magnitudes of its terms), then float -> double adds.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/math/conv3x3_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kBlock = 8;  // output channels per packed weight block (Conv3x3Weights::kBlock)
constexpr int kMaxNK = 4;  // output channels per spatial tile
constexpr int kMaxNV = 2;  // output vectors per spatial tile
constexpr int kMaxNO = 4;  // output channels per wgrad tile

// Lanes [0, n) set, as the mask of _mm256_maskload_ps (sign bit per lane).
inline __m256i lane_mask(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), lanes);
}

// GCC folds a load used by several FMAs into each of them (one load per FMA, which makes the tiles
// load-bound); an empty asm that "modifies" the register makes it load once.
inline void keep_in_register(__m256& v) { __asm__("" : "+x"(v)); }

// ---- pad ----------------------------------------------------------------------------------------

// Image row y to (y + 1) * row + 1 in pieces of 8, the last one masked on the load: it reads
// nothing past the row and stores zeros past it (the right pad, then positions of the next row,
// written after it, or of the bottom pad, zeroed after the last row). Short rows into a plane
// without room for the last row's 8-float store: the plain copies.
void pad_avx2(const float* src, int64_t channels, const Conv3x3Plane& g, float* planes) {
  const int64_t h = g.h, w = g.w, row = g.row, full = w / 8 * 8;
  if (h * row + 1 + full + 8 > g.stride) return pad_planes(src, channels, g, planes);
  const __m256i tail = lane_mask(w - full);
  for (int64_t c = 0; c < channels; ++c) {
    float* p = planes + c * g.stride;
    const float* s = src + c * h * w;
    std::memset(p, 0, sizeof(float) * static_cast<size_t>(row + 1));
    float* d = p + row + 1;
    for (int64_t y = 0; y < h; ++y, d += row, s += w) {
      int64_t i = 0;
      for (; i < full; i += 8) _mm256_storeu_ps(d + i, _mm256_loadu_ps(s + i));
      _mm256_storeu_ps(d + i, _mm256_maskload_ps(s + i, tail));  // >= 1 zero lane: the pad
    }
    const int64_t end = (h + 1) * row + 1;  // the bottom pad row and the tail
    std::memset(p + end, 0, sizeof(float) * static_cast<size_t>(g.stride - end));
  }
}

// ---- spatial ------------------------------------------------------------------------------------

// Where the lanes of output vector j go.
struct VecStore {
  bool whole;       // all 8 lanes valid and consecutive in NCHW: one store at offset
  int64_t offset;   // NCHW index (y * w + x) of lane 0 when whole
  int32_t lane[8];  // otherwise: NCHW index of each lane, -1 for junk / beyond the plane
};

VecStore vec_store(const Conv3x3Plane& g, int64_t j) {
  VecStore s;
  int64_t p = j * 8, y = p / g.row, x = p - y * g.row;  // one division per vector, not per lane
  bool whole = true;
  for (int l = 0; l < 8; ++l, ++p) {
    const bool valid = p < g.outputs && x < g.w;
    s.lane[l] = valid ? static_cast<int32_t>(y * g.w + x) : -1;
    whole = whole && valid && s.lane[l] == s.lane[0] + l;
    if (++x == g.row) x = 0, ++y;
  }
  s.whole = whole;
  s.offset = s.lane[0];
  return s;
}

// The VecStore of every output vector of an image size, kept for the last few sizes the thread
// used (a layer calls once per sample; the networks have a handful of sizes).
const VecStore* vec_stores(const Conv3x3Plane& g) {
  struct Entry {
    int64_t h = -1, w = -1;
    std::vector<VecStore> stores;
  };
  constexpr int kEntries = 4;
  thread_local Entry cache[kEntries];
  thread_local int next = 0;
  for (Entry& e : cache)
    if (e.h == g.h && e.w == g.w) return e.stores.data();
  Entry& e = cache[next];
  next = (next + 1) % kEntries;
  e.h = g.h;
  e.w = g.w;
  e.stores.resize(static_cast<size_t>((g.outputs + 7) / 8));
  for (size_t j = 0; j < e.stores.size(); ++j) e.stores[j] = vec_store(g, static_cast<int64_t>(j));
  return e.stores.data();
}

inline void store_vec(__m256 v, const VecStore& s, bool accumulate, float* out) {
  if (s.whole) {
    float* d = out + s.offset;
    if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(d), v);
    _mm256_storeu_ps(d, v);
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int l = 0; l < 8; ++l) {
    if (s.lane[l] < 0) continue;
    float& d = out[s.lane[l]];
    d = accumulate ? d + t[l] : t[l];
  }
}

// Output channels [0, NK) of the tile (weights wp[k], the next tap wstep floats on) times NV
// vectors of flat positions from base (input channel 0 of the range, its first position).
template <int NK, int NV>
void spatial_tile(const float* base, int64_t stride, int64_t row, int64_t nc, const float* wp,
                  int64_t wstep, float scale, bool accumulate, const VecStore* vs, float* out,
                  int64_t hw) {
  __m256 acc[NK][NV];
#pragma GCC unroll 4
  for (int k = 0; k < NK; ++k)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[k][v] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c, base += stride) {
    // The rows of taps as a loop and the pointers stepped: fully unrolled, the 9 taps' weight
    // offsets (multiples of a run-time wstep) took more registers than there are.
    const float* r = base;
#pragma GCC unroll 1
    for (int ky = 0; ky < 3; ++ky, r += row) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx, wp += wstep) {
        __m256 xv[NV];
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) {
          xv[v] = _mm256_loadu_ps(r + kx + 8 * v);
          keep_in_register(xv[v]);
        }
#pragma GCC unroll 4
        for (int k = 0; k < NK; ++k) {
          const __m256 wv = _mm256_broadcast_ss(wp + k);
#pragma GCC unroll 3
          for (int v = 0; v < NV; ++v) acc[k][v] = _mm256_fmadd_ps(wv, xv[v], acc[k][v]);
        }
      }
    }
  }
  const __m256 sv = _mm256_set1_ps(scale);
#pragma GCC unroll 4
  for (int k = 0; k < NK; ++k)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      store_vec(_mm256_mul_ps(sv, acc[k][v]), vs[v], accumulate, out + k * hw);
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float, bool,
                        const VecStore*, float*, int64_t);

template <int NK>
constexpr TileFn tile_for(int nv) {
  return nv == 1 ? spatial_tile<NK, 1> : nv == 2 ? spatial_tile<NK, 2> : spatial_tile<NK, 3>;
}

TileFn select_tile(int nk, int nv) {
  switch (nk) {
    case 4:
      return tile_for<4>(nv);
    case 3:
      return tile_for<3>(nv);
    case 2:
      return tile_for<2>(nv);
    default:
      return tile_for<1>(nv);
  }
}

void spatial_avx2(const float* planes, const Conv3x3Plane& g, int64_t c_total, int64_t c0,
                  int64_t c1, int64_t k, const float* packed, float scale, bool accumulate,
                  float* out) {
  const int64_t hw = g.h * g.w;
  const int64_t vecs = (g.outputs + 7) / 8;
  const VecStore* stores = vec_stores(g);
  // Vectors split into blocks of at most kMaxNV, as even as possible (4 -> 2 + 2, 7 -> 3 + 2 + 2).
  const int64_t blocks = (vecs + kMaxNV - 1) / kMaxNV;
  const int64_t base_nv = vecs / blocks, extra = vecs % blocks;
  int64_t v0 = 0;
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int nv = static_cast<int>(base_nv + (bi < extra ? 1 : 0));
    const VecStore* vs = stores + v0;
    const float* base = planes + c0 * g.stride + v0 * 8;
    for (int64_t kb = 0; kb < k; kb += kBlock) {
      // A packed block of nb channels [c][tap][j < nb], taken NK <= 4 channels at a time
      // (8 -> 4 + 4, 7 -> 4 + 3, 6 -> 3 + 3).
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, k - kb));
      const int halves = (nb + kMaxNK - 1) / kMaxNK;
      const float* block = packed + kb * c_total * 9 + c0 * 9 * nb;
      for (int hi = 0, j0 = 0; hi < halves; ++hi) {
        const int nk = nb / halves + (hi < nb % halves ? 1 : 0);
        select_tile(nk, nv)(base, g.stride, g.row, c1 - c0, block + j0, nb, scale, accumulate, vs,
                            out + (kb + j0) * hw, hw);
        j0 += nk;
      }
    }
    v0 += nv;
  }
}

// ---- wgrad --------------------------------------------------------------------------------------

// The sums of the 8 lanes of each of v[0..3], in a fixed order (pairs, then quads, then the two
// halves).
inline __m128 hsum4(const __m256 v[4]) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// acc[0..n) += sums[0..n), n <= 4.
inline void add4(float* acc, __m128 sums, int n) {
  if (n == 4) return _mm_storeu_ps(acc, _mm_add_ps(_mm_loadu_ps(acc), sums));
  alignas(16) float t[4];
  _mm_store_ps(t, sums);
  for (int i = 0; i < n; ++i) acc[i] += t[i];
}

inline void add4(double* acc, __m128 sums, int n) {
  const __m256d d = _mm256_cvtps_pd(sums);
  if (n == 4) return _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), d));
  alignas(32) double t[4];
  _mm256_store_pd(t, d);
  for (int i = 0; i < n; ++i) acc[i] += t[i];
}

// Output channels [o0, o0 + NO), input channel ch, taps (ky, 0..2): the sum over samples
// [0, nsamp) and flat positions [p0, p1) of dy (at x's p) times x (at p + ky * row + kx).
// x points at input channel 0 of sample 0 (planes of g.stride floats, samples x_stride apart),
// dy at output channel 0 of sample 0 shifted so that dy[p] is flat output position p.
template <int NO, typename Acc>
void wgrad_tile(const float* x, const float* dy, const Conv3x3Plane& g, int64_t k, int64_t ch,
                int64_t o0, int ky, int64_t p0, int64_t p1, int64_t nsamp, int64_t x_stride,
                int64_t dy_stride, Acc* acc) {
  const int64_t stride = g.stride, full = p0 + (p1 - p0) / 8 * 8;
  const __m256i tail = lane_mask(p1 - full);
  __m256 a[NO][3];
#pragma GCC unroll 4
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 3
    for (int t = 0; t < 3; ++t) a[o][t] = _mm256_setzero_ps();
  auto step = [&](const float* xs, const float* ds, bool masked) {
    __m256 xv[3];
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
      xv[kx] = _mm256_loadu_ps(xs + kx);
      keep_in_register(xv[kx]);
    }
#pragma GCC unroll 4
    for (int o = 0; o < NO; ++o) {
      __m256 d =
          masked ? _mm256_maskload_ps(ds + o * stride, tail) : _mm256_loadu_ps(ds + o * stride);
      keep_in_register(d);
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) a[o][kx] = _mm256_fmadd_ps(d, xv[kx], a[o][kx]);
    }
  };
  for (int64_t s = 0; s < nsamp; ++s) {
    const float* xs = x + s * x_stride + ch * stride + ky * g.row;
    const float* ds = dy + s * dy_stride + o0 * stride;
    int64_t p = p0;
    for (; p < full; p += 8) step(xs + p, ds + p, false);
    if (p < p1) step(xs + p, ds + p, true);
  }
#pragma GCC unroll 3
  for (int kx = 0; kx < 3; ++kx) {
    __m256 v[4];
#pragma GCC unroll 4
    for (int o = 0; o < 4; ++o) v[o] = o < NO ? a[o][kx] : _mm256_setzero_ps();
    add4(acc + (ch * 9 + ky * 3 + kx) * k + o0, hsum4(v), NO);
  }
}

template <typename Acc>
void wgrad_planes_avx2(const float* x, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t k,
                       int64_t p0, int64_t p1, int64_t nsamp, int64_t x_stride, int64_t dy_stride,
                       Acc* acc) {
  const float* dyp = dy + g.row + 1;  // dy[p] at flat output position p
  for (int64_t o = 0; o < k; o += kMaxNO) {
    const int64_t no = std::min<int64_t>(kMaxNO, k - o);
    for (int64_t ch = 0; ch < c; ++ch)
      for (int ky = 0; ky < 3; ++ky) {
        switch (no) {
          case 4:
            wgrad_tile<4>(x, dyp, g, k, ch, o, ky, p0, p1, nsamp, x_stride, dy_stride, acc);
            break;
          case 3:
            wgrad_tile<3>(x, dyp, g, k, ch, o, ky, p0, p1, nsamp, x_stride, dy_stride, acc);
            break;
          case 2:
            wgrad_tile<2>(x, dyp, g, k, ch, o, ky, p0, p1, nsamp, x_stride, dy_stride, acc);
            break;
          default:
            wgrad_tile<1>(x, dyp, g, k, ch, o, ky, p0, p1, nsamp, x_stride, dy_stride, acc);
            break;
        }
      }
  }
}

}  // namespace

const Conv3x3Kernels kConv3x3Avx2 = {pad_avx2,
                                     spatial_avx2,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     1,
                                     nullptr,
                                     nullptr,
                                     wgrad_planes_avx2<float>,
                                     wgrad_planes_avx2<double>};

}  // namespace int4ddp::math::detail
