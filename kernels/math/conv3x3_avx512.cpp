// AVX-512F kernels of the direct 3x3 convolution (plane layout: conv3x3_kernels.h). Compiled with
// -mavx512f for this file only and called only after a run-time CPU check (conv3x3.cpp).
//
// spatial (forward and backward data, Conv3x3Algo::kSpatial): 16 consecutive flat output
//   positions per zmm, a tile of NK output channels x NV vectors (8 x 3 = 24 accumulators) summed
//   over input channels and taps with broadcast weights; each tap is one unaligned load at a
//   constant offset of the padded plane. The valid lanes of an accumulator are consecutive NCHW
//   elements: compress + one masked store.
// spatial_cl (Conv3x3Algo::kChannels): 16 output channels per zmm, a tile of up to 12 pixels of
//   one image row x 2 vectors of channels; inputs broadcast, weights loaded; no idle lanes,
//   scattered stores (a channel vector is 16 planes apart in NCHW).
// wgrad (backward weight): input channels in the lanes (the input transposed to padded NHWC), a
//   tile of NO output channels x 9 taps accumulators; dy is broadcast from NCHW, so no junk
//   positions and no horizontal sums. The tile's fp32 sum over a piece of rows (of a group of
//   samples) is added to the caller's float or double accumulator. wgrad_k: the same with output
//   channels in the lanes, for the 1-channel first conv.
// All arithmetic on codes is exact: FMAs of integers whose partial sums stay below 2^24 (the
// driver bounds the pieces), then float -> double adds.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "kernels/math/conv3x3_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kBlock = 8;  // output channels per packed weight block (Conv3x3Weights::kBlock)
constexpr int kMaxNV = 3;  // output vectors per spatial tile

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// GCC folds a load used by several FMAs into each of them (one load per FMA, which makes the dW
// tile load-bound); an empty asm that "modifies" the register makes it load once.
inline void keep_in_register(__m512& v) { __asm__("" : "+v"(v)); }

// ---- pad ----------------------------------------------------------------------------------------

void pad_avx512(const float* src, int64_t channels, const Conv3x3Plane& g, float* planes) {
  const int64_t h = g.h, w = g.w, row = g.row;
  const __m512 zero = _mm512_setzero_ps();
  // Image row y and its right pad: row floats from (y + 1) * row + 1, the last one 0. The masks of
  // the 16-wide pieces are the same for every row.
  constexpr int kMaxPieces = 8;
  const int64_t pieces = (row + 15) / 16;
  if (pieces > kMaxPieces) {
    for (int64_t c = 0; c < channels; ++c) {
      float* p = planes + c * g.stride;
      std::memset(p, 0, sizeof(float) * static_cast<size_t>(g.stride));
      for (int64_t y = 0; y < h; ++y)
        std::memcpy(p + (y + 1) * row + 1, src + (c * h + y) * w, sizeof(float) * size_t(w));
    }
    return;
  }
  __mmask16 load_mask[kMaxPieces], store_mask[kMaxPieces];
  for (int64_t i = 0; i < pieces; ++i) {
    load_mask[i] = tail_mask(w - 16 * i);
    store_mask[i] = tail_mask(row - 16 * i);
  }
  for (int64_t c = 0; c < channels; ++c) {
    float* p = planes + c * g.stride;
    const float* s = src + c * h * w;
    for (int64_t i = 0; i < row + 1; i += 16)
      _mm512_mask_storeu_ps(p + i, tail_mask(row + 1 - i), zero);
    float* d = p + row + 1;
    for (int64_t y = 0; y < h; ++y, d += row, s += w)
      for (int64_t i = 0; i < pieces; ++i)
        _mm512_mask_storeu_ps(d + 16 * i, store_mask[i],
                              _mm512_maskz_loadu_ps(load_mask[i], s + 16 * i));
    for (int64_t i = (h + 1) * row + 1; i < g.stride; i += 16)
      _mm512_mask_storeu_ps(p + i, tail_mask(g.stride - i), zero);
  }
}

// ---- spatial ------------------------------------------------------------------------------------

// Where the valid lanes of output vector j go: compress mask, store mask, NCHW offset.
struct VecStore {
  __mmask16 valid;  // lanes with x < w and p < outputs
  __mmask16 store;  // the first popcount(valid) lanes
  int64_t offset;   // NCHW index (y * w + x) of the first valid lane
};

VecStore vec_store(const Conv3x3Plane& g, int64_t j) {
  VecStore s{0, 0, 0};
  int count = 0;
  int64_t p = j * 16, y = p / g.row, x = p - y * g.row;  // one division per vector, not per lane
  for (int l = 0; l < 16; ++l, ++p) {
    if (p < g.outputs && x < g.w) {
      if (count == 0) s.offset = y * g.w + x;
      s.valid = static_cast<__mmask16>(s.valid | (1u << l));
      ++count;
    }
    if (++x == g.row) x = 0, ++y;
  }
  s.store = tail_mask(count);
  return s;
}

template <int NK, int NV>
void spatial_tile(const float* base, int64_t stride, int64_t row, int64_t nc, const float* wp,
                  float scale, bool accumulate, const VecStore* vs, float* out, int64_t hw) {
  __m512 acc[NK][NV];
#pragma GCC unroll 8
  for (int k = 0; k < NK; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c, base += stride) {
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
      const float* r = base + ky * row;
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx, wp += NK) {
        __m512 xv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(r + kx + 16 * v);
#pragma GCC unroll 8
        for (int k = 0; k < NK; ++k) {
          const __m512 wv = _mm512_set1_ps(wp[k]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_fmadd_ps(wv, xv[v], acc[k][v]);
        }
      }
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int k = 0; k < NK; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (vs[v].valid == 0) continue;
      __m512 r = _mm512_mul_ps(sv, acc[k][v]);
      if (vs[v].valid != 0xFFFF) r = _mm512_maskz_compress_ps(vs[v].valid, r);
      float* d = out + k * hw + vs[v].offset;
      if (accumulate) r = _mm512_add_ps(_mm512_maskz_loadu_ps(vs[v].store, d), r);
      _mm512_mask_storeu_ps(d, vs[v].store, r);
    }
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float, bool,
                        const VecStore*, float*, int64_t);

template <int NK>
constexpr TileFn tile_for(int nv) {
  return nv == 1 ? spatial_tile<NK, 1> : nv == 2 ? spatial_tile<NK, 2> : spatial_tile<NK, 3>;
}

TileFn select_tile(int nk, int nv) {
  switch (nk) {
    case 8:
      return tile_for<8>(nv);
    case 7:
      return tile_for<7>(nv);
    case 6:
      return tile_for<6>(nv);
    case 5:
      return tile_for<5>(nv);
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

void spatial_avx512(const float* planes, const Conv3x3Plane& g, int64_t c_total, int64_t c0,
                    int64_t c1, int64_t k, const float* packed, float scale, bool accumulate,
                    float* out) {
  const int64_t hw = g.h * g.w;
  // Vectors split into blocks of at most kMaxNV, as even as possible (4 -> 2 + 2, 14 -> 3*4 + 2).
  const int64_t blocks = (g.vecs + kMaxNV - 1) / kMaxNV;
  const int64_t base_nv = g.vecs / blocks, extra = g.vecs % blocks;
  int64_t v0 = 0;
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int nv = static_cast<int>(base_nv + (bi < extra ? 1 : 0));
    VecStore vs[kMaxNV];
    for (int v = 0; v < nv; ++v) vs[v] = vec_store(g, v0 + v);
    const float* base = planes + c0 * g.stride + v0 * 16;
    for (int64_t kb = 0; kb < k; kb += kBlock) {
      const int nk = static_cast<int>(std::min<int64_t>(kBlock, k - kb));
      const float* wp = packed + kb * c_total * 9 + c0 * 9 * nk;
      select_tile(nk, nv)(base, g.stride, g.row, c1 - c0, wp, scale, accumulate, vs, out + kb * hw,
                          hw);
    }
    v0 += nv;
  }
}

// ---- spatial, output channels in the lanes ----------------------------------------------------

// Output pixels [x0, x0 + NP) of one image row (planes points at their flat position y * row + x0)
// and output channels [kv, kv + 16 * NKV) (wp points at input channel 0, tap 0, channel kv of the
// (c, 9, k) weights; out at channel kv, pixel (y, x0)).
template <int NP, int NKV>
void cl_tile(const float* planes, int64_t stride, int64_t row, int64_t nc, const float* wp,
             int64_t k, float scale, bool accumulate, __m512i idx, float* out, int64_t hw) {
  __m512 acc[NP][NKV];
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < NKV; ++j) acc[p][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c, planes += stride) {
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
      const float* r = planes + ky * row;
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx, wp += k) {
        __m512 wv[NKV];
#pragma GCC unroll 4
        for (int j = 0; j < NKV; ++j) {
          wv[j] = _mm512_loadu_ps(wp + 16 * j);
          keep_in_register(wv[j]);
        }
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p) {
          const __m512 b = _mm512_set1_ps(r[p + kx]);
#pragma GCC unroll 4
          for (int j = 0; j < NKV; ++j) acc[p][j] = _mm512_fmadd_ps(b, wv[j], acc[p][j]);
        }
      }
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < NKV; ++j) {
      float* d = out + 16 * j * hw + p;
      __m512 v = _mm512_mul_ps(sv, acc[p][j]);
      if (accumulate) v = _mm512_add_ps(_mm512_i32gather_ps(idx, d, 4), v);
      _mm512_i32scatter_ps(d, idx, v, 4);
    }
}

using ClTileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float,
                          bool, __m512i, float*, int64_t);

template <int NKV, int... NP>
constexpr ClTileFn cl_tile_for(int np, std::integer_sequence<int, NP...>) {
  ClTileFn f = nullptr;
  ((f = np == NP + 1 ? cl_tile<NP + 1, NKV> : f), ...);
  return f;
}

constexpr int kMaxClPixels = 12;  // pixels per tile (x 2 vectors of channels: 24 accumulators)

void spatial_cl_avx512(const float* planes, const Conv3x3Plane& g, int64_t c_total, int64_t c0,
                       int64_t c1, int64_t k, const float* packed, float scale, bool accumulate,
                       float* out) {
  const int64_t hw = g.h * g.w;
  const __m512i idx =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(hw)));
  // Each image row in equal segments of at most kMaxClPixels (7 -> 7, 14 -> 7 + 7, 28 -> 10+9+9).
  const int64_t segs = (g.w + kMaxClPixels - 1) / kMaxClPixels;
  const int64_t base_np = g.w / segs, extra = g.w % segs;
  const float* wbase = packed + c0 * 9 * k;
  for (int64_t kv = 0; kv < k; kv += 32) {
    const bool two = kv + 32 <= k;
    for (int64_t y = 0; y < g.h; ++y) {
      int64_t x0 = 0;
      for (int64_t si = 0; si < segs; ++si) {
        const int np = static_cast<int>(base_np + (si < extra ? 1 : 0));
        const ClTileFn f =
            two ? cl_tile_for<2>(np, std::make_integer_sequence<int, kMaxClPixels>())
                : cl_tile_for<1>(np, std::make_integer_sequence<int, kMaxClPixels>());
        f(planes + c0 * g.stride + y * g.row + x0, g.stride, g.row, c1 - c0, wbase + kv, k, scale,
          accumulate, idx, out + kv * hw + y * g.w + x0, hw);
        x0 += np;
      }
    }
  }
}

// ---- transpose ----------------------------------------------------------------------------------

// r[i] (16 rows of 16) -> r[i] = column i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

void transpose_avx512(const float* src, int64_t c, const Conv3x3Plane& g, float* xt) {
  const int64_t h = g.h, w = g.w, row = g.row, hw = h * w;
  auto zero_positions = [&](int64_t q0, int64_t q1) {
    std::memset(xt + q0 * c, 0, sizeof(float) * static_cast<size_t>((q1 - q0) * c));
  };
  zero_positions(0, row + 1);
  for (int64_t y = 0; y < h; ++y) zero_positions((y + 2) * row, (y + 2) * row + 1);
  zero_positions((h + 1) * row + 1, g.qcount);
  __m512 r[16];
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x0 = 0; x0 < w; x0 += 16) {
      const int64_t nx = std::min<int64_t>(16, w - x0);
      const __mmask16 xm = tail_mask(nx);
      for (int64_t cb = 0; cb < c; cb += 16) {
        const int64_t ncb = std::min<int64_t>(16, c - cb);
        for (int i = 0; i < 16; ++i)
          r[i] = i < ncb ? _mm512_maskz_loadu_ps(xm, src + (cb + i) * hw + y * w + x0)
                         : _mm512_setzero_ps();
        transpose16(r);
        const __mmask16 cm = tail_mask(ncb);
        float* d = xt + ((y + 1) * row + x0 + 1) * c + cb;
        for (int64_t i = 0; i < nx; ++i) _mm512_mask_storeu_ps(d + i * c, cm, r[i]);
      }
    }
}

// ---- wgrad --------------------------------------------------------------------------------------

inline void add_to(float* p, __m512 v) {
  _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v));
}

inline void add_to(double* p, __m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo));
  _mm512_storeu_pd(p + 8, _mm512_add_pd(_mm512_loadu_pd(p + 8), hi));
}

// Output channels [o0, o0 + NO), input channels [cv, cv + 16), rows [y0, y1) of nsamp samples.
// W > 0: the image width as a constant, so a row of 7 or 14 pixels is unrolled (the per-row loop
// overhead cost 10% at 7x7; unrolling 28 was slower).
template <int NO, typename Acc, int W = 0>
void wgrad_tile(const float* xt, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t cv,
                int64_t o0, int64_t y0, int64_t y1, int64_t nsamp, int64_t xt_stride,
                int64_t dy_stride, Acc* acc) {
  const int64_t w = W ? W : g.w;
  const int64_t hw = g.h * w, rowc = (w + 1) * c;
  __m512 a[NO][9];
#pragma GCC unroll 4
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) a[o][t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nsamp; ++s)
    for (int64_t y = y0; y < y1; ++y) {
      const float* x0 = xt + s * xt_stride + y * rowc + cv;
      const float* d = dy + s * dy_stride + o0 * hw + y * w;
#pragma GCC unroll 16
      for (int64_t x = 0; x < w; ++x, x0 += c) {
        __m512 dv[NO];
#pragma GCC unroll 4
        for (int o = 0; o < NO; ++o) dv[o] = _mm512_set1_ps(d[o * hw + x]);
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ++ky)
#pragma GCC unroll 3
          for (int kx = 0; kx < 3; ++kx) {
            __m512 xv = _mm512_loadu_ps(x0 + ky * rowc + kx * c);
            keep_in_register(xv);
#pragma GCC unroll 4
            for (int o = 0; o < NO; ++o)
              a[o][ky * 3 + kx] = _mm512_fmadd_ps(dv[o], xv, a[o][ky * 3 + kx]);
          }
      }
    }
#pragma GCC unroll 4
  for (int o = 0; o < NO; ++o)
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) add_to(acc + ((o0 + o) * 9 + t) * c + cv, a[o][t]);
}

template <typename Acc>
void wgrad_avx512(const float* xt, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t k,
                  int64_t y0, int64_t y1, int64_t nsamp, int64_t xt_stride, int64_t dy_stride,
                  Acc* acc, float*) {
  for (int64_t cv = 0; cv < c; cv += 16) {
    int64_t o = 0;
    if (g.w == 7)
      for (; o + 2 <= k; o += 2)
        wgrad_tile<2, Acc, 7>(xt, dy, g, c, cv, o, y0, y1, nsamp, xt_stride, dy_stride, acc);
    if (g.w == 14)
      for (; o + 2 <= k; o += 2)
        wgrad_tile<2, Acc, 14>(xt, dy, g, c, cv, o, y0, y1, nsamp, xt_stride, dy_stride, acc);
    for (; o + 2 <= k; o += 2)
      wgrad_tile<2>(xt, dy, g, c, cv, o, y0, y1, nsamp, xt_stride, dy_stride, acc);
    if (o < k) wgrad_tile<1>(xt, dy, g, c, cv, o, y0, y1, nsamp, xt_stride, dy_stride, acc);
  }
}

// Input channel ch, output channels [kv, kv + 16 * NKV), rows [y0, y1) of nsamp samples: the
// output channels in the lanes (dy transposed), the input broadcast from its padded plane.
template <int NKV, typename Acc>
void wgrad_k_tile(const float* planes, const float* dyt, const Conv3x3Plane& g, int64_t k,
                  int64_t kv, int64_t ch, int64_t y0, int64_t y1, int64_t nsamp,
                  int64_t planes_stride, int64_t dyt_stride, Acc* acc) {
  const int64_t row = g.row;
  __m512 a[9][NKV];
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < NKV; ++j) a[t][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nsamp; ++s)
    for (int64_t y = y0; y < y1; ++y) {
      const float* dp = dyt + s * dyt_stride + ((y + 1) * row + 1) * k + kv;
      const float* xp = planes + s * planes_stride + ch * g.stride + y * row;
      for (int64_t x = 0; x < g.w; ++x, dp += k, ++xp) {
        __m512 d[NKV];
#pragma GCC unroll 4
        for (int j = 0; j < NKV; ++j) d[j] = _mm512_loadu_ps(dp + 16 * j);
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ++ky)
#pragma GCC unroll 3
          for (int kx = 0; kx < 3; ++kx) {
            const __m512 b = _mm512_set1_ps(xp[ky * row + kx]);
#pragma GCC unroll 4
            for (int j = 0; j < NKV; ++j)
              a[ky * 3 + kx][j] = _mm512_fmadd_ps(b, d[j], a[ky * 3 + kx][j]);
          }
      }
    }
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < NKV; ++j) add_to(acc + (ch * 9 + t) * k + kv + 16 * j, a[t][j]);
}

template <typename Acc>
void wgrad_k_avx512(const float* planes, const float* dyt, const Conv3x3Plane& g, int64_t c,
                    int64_t k, int64_t y0, int64_t y1, int64_t nsamp, int64_t planes_stride,
                    int64_t dyt_stride, Acc* acc) {
  for (int64_t ch = 0; ch < c; ++ch) {
    int64_t kv = 0;
    for (; kv + 32 <= k; kv += 32)
      wgrad_k_tile<2>(planes, dyt, g, k, kv, ch, y0, y1, nsamp, planes_stride, dyt_stride, acc);
    if (kv < k)
      wgrad_k_tile<1>(planes, dyt, g, k, kv, ch, y0, y1, nsamp, planes_stride, dyt_stride, acc);
  }
}

}  // namespace

const Conv3x3Kernels kConv3x3Avx512 = {pad_avx512,
                                       spatial_avx512,
                                       spatial_cl_avx512,
                                       transpose_avx512,
                                       wgrad_avx512<float>,
                                       wgrad_avx512<double>,
                                       16,
                                       wgrad_k_avx512<float>,
                                       wgrad_k_avx512<double>,
                                       nullptr,
                                       nullptr};

}  // namespace int4ddp::math::detail
