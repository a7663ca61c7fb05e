// Portable kernels of the direct 3x3 convolution (see conv3x3_kernels.h for the plane layout).
// Plain C++ the compiler vectorises for whatever the build targets; the fallback when AVX-512 is
// not compiled in or not on the CPU, and the second implementation the tests compare.
// No FMA contraction (the build sets -ffp-contract=off): mul then add, each exact on codes.
#include <algorithm>
#include <cstring>

#include "kernels/math/conv3x3_kernels.h"

namespace int4ddp::math::detail {
namespace {

constexpr int kBlock = 8;  // output channels per packed weight block (Conv3x3Weights::kBlock)
constexpr int kSpan = 64;  // flat output positions per tile

}  // namespace

void pad_planes(const float* src, int64_t channels, const Conv3x3Plane& g, float* planes) {
  const int64_t h = g.h, w = g.w, row = g.row;
  for (int64_t c = 0; c < channels; ++c) {
    float* p = planes + c * g.stride;
    const float* s = src + c * h * w;
    std::fill(p, p + row + 1, 0.0f);  // top pad row and the left pad of image row 0
    for (int64_t y = 0; y < h; ++y) {
      float* d = p + (y + 1) * row + 1;
      std::memcpy(d, s + y * w, sizeof(float) * static_cast<size_t>(w));
      d[w] = 0.0f;  // right pad of row y = left pad of row y + 1
    }
    std::fill(p + (h + 1) * row + 1, p + g.stride, 0.0f);  // bottom pad row and the tail
  }
}

namespace {

// Output channels [kb, kb + nk) of flat positions [p0, p0 + len): tile[j][i] over channels
// [c0, c1), then the store of the valid positions.
template <int NK>
void spatial_tile(const float* planes, const Conv3x3Plane& g, int64_t c0, int64_t c1,
                  const float* wblock, int64_t p0, int64_t len, float* acc) {
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < kSpan; ++i) acc[j * kSpan + i] = 0.0f;
  const float* wp = wblock + c0 * 9 * NK;
  for (int64_t c = c0; c < c1; ++c) {
    const float* base = planes + c * g.stride + p0;
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx, wp += NK) {
        const float* s = base + ky * g.row + kx;
        for (int j = 0; j < NK; ++j) {
          const float wv = wp[j];
          float* a = acc + j * kSpan;
          for (int i = 0; i < kSpan; ++i) a[i] += wv * s[i];
        }
      }
  }
  (void)len;
}

void spatial_portable(const float* planes, const Conv3x3Plane& g, int64_t c_total, int64_t c0,
                      int64_t c1, int64_t k, const float* packed, float scale, bool accumulate,
                      float* out) {
  alignas(64) float acc[kBlock * kSpan];
  const int64_t hw = g.h * g.w;
  for (int64_t p0 = 0; p0 < g.outputs; p0 += kSpan) {
    const int64_t len = std::min<int64_t>(kSpan, g.outputs - p0);
    for (int64_t kb = 0; kb < k; kb += kBlock) {
      const int nk = static_cast<int>(std::min<int64_t>(kBlock, k - kb));
      const float* wblock = packed + kb * c_total * 9;
      switch (nk) {
        case 8:
          spatial_tile<8>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        case 7:
          spatial_tile<7>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        case 6:
          spatial_tile<6>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        case 5:
          spatial_tile<5>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        case 4:
          spatial_tile<4>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        case 3:
          spatial_tile<3>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        case 2:
          spatial_tile<2>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
        default:
          spatial_tile<1>(planes, g, c0, c1, wblock, p0, len, acc);
          break;
      }
      for (int j = 0; j < nk; ++j) {
        float* o = out + (kb + j) * hw;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t p = p0 + i, y = p / g.row, x = p - y * g.row;
          if (x >= g.w) continue;
          const float v = scale * acc[j * kSpan + i];
          float& dst = o[y * g.w + x];
          dst = accumulate ? dst + v : v;
        }
      }
    }
  }
}

void transpose_portable(const float* src, int64_t c, const Conv3x3Plane& g, float* xt) {
  std::fill(xt, xt + g.qcount * c, 0.0f);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t y = 0; y < g.h; ++y)
      for (int64_t x = 0; x < g.w; ++x)
        xt[((y + 1) * g.row + x + 1) * c + ch] = src[(ch * g.h + y) * g.w + x];
}

// piece[(o * 9 + tap) * c + ch] = the fp32 sum over the samples and rows [y0, y1).
void wgrad_piece(const float* xt, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t k,
                 int64_t y0, int64_t y1, int64_t nsamp, int64_t xt_stride, int64_t dy_stride,
                 float* piece) {
  std::fill(piece, piece + k * 9 * c, 0.0f);
  const int64_t hw = g.h * g.w;
  for (int64_t s = 0; s < nsamp; ++s)
    for (int64_t o = 0; o < k; ++o)
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t x = 0; x < g.w; ++x) {
          const float d = dy[s * dy_stride + o * hw + y * g.w + x];
          for (int tap = 0; tap < 9; ++tap) {
            const float* xs = xt + s * xt_stride + ((y + tap / 3) * g.row + x + tap % 3) * c;
            float* a = piece + (o * 9 + tap) * c;
            for (int64_t ch = 0; ch < c; ++ch) a[ch] += d * xs[ch];
          }
        }
}

template <typename Acc>
void wgrad_portable(const float* xt, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t k,
                    int64_t y0, int64_t y1, int64_t nsamp, int64_t xt_stride, int64_t dy_stride,
                    Acc* acc, float* scratch) {
  wgrad_piece(xt, dy, g, c, k, y0, y1, nsamp, xt_stride, dy_stride, scratch);
  for (int64_t i = 0; i < k * 9 * c; ++i) acc[i] += static_cast<Acc>(scratch[i]);
}

}  // namespace

const Conv3x3Kernels kConv3x3Portable = {pad_planes,
                                         spatial_portable,
                                         nullptr,
                                         transpose_portable,
                                         wgrad_portable<float>,
                                         wgrad_portable<double>,
                                         1,
                                         nullptr,
                                         nullptr,
                                         nullptr,
                                         nullptr};

}  // namespace int4ddp::math::detail
