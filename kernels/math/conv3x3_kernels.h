// Internal: the per-ISA inner kernels the direct 3x3 convolution driver (conv3x3.cpp) is built
// from. conv3x3_portable.cpp, conv3x3_avx2.cpp and conv3x3_avx512.cpp each fill one table.
//
// The padded plane layout every kernel shares (one image channel, h x w, pad 1):
//   row stride  row = w + 1: the right pad of image row y IS the left pad of row y + 1, so a flat
//               offset of ky * row + kx is tap (ky, kx) for every output position;
//   interior    pixel (y, x) at (y + 1) * row + x + 1; everything else is 0;
//   outputs     flat output position p = y * row + x (x == w is a junk position that is computed
//               and never stored), P = h * row of them, read through taps at p + ky * row + kx.
// Channel planes are `stride` floats apart: a multiple of 16 that covers the over-read of the last
// 64-position output tile (outputs rounded up to 64, plus 2 * row + 2).
#pragma once

#include <cstdint>

namespace int4ddp::math::detail {

struct Conv3x3Plane {
  int64_t h, w;
  int64_t row;      // w + 1
  int64_t outputs;  // h * row flat output positions
  int64_t vecs;     // ceil(outputs / 16)
  int64_t stride;   // floats per channel plane
  int64_t qcount;   // (h + 2) * row + 1: flat padded positions of the transposed layout
};

Conv3x3Plane make_plane(int64_t h, int64_t w);

struct Conv3x3Kernels {
  // planes (channels planes of g.stride floats) <- src (channels, h, w): writes EVERY element of
  // the planes (pads and tail as 0), so the buffer needs no clearing.
  void (*pad)(const float* src, int64_t channels, const Conv3x3Plane& g, float* planes);
  // out (k, h, w) (=, or += when accumulate) scale * sum over input channels [c0, c1) and the 9
  // taps of packed weights times planes (planes points at channel 0). packed: the Conv3x3Weights
  // blocked layout for c_total input channels (block b at b * 8 * c_total * 9, [c][tap][j]).
  void (*spatial)(const float* planes, const Conv3x3Plane& g, int64_t c_total, int64_t c0,
                  int64_t c1, int64_t k, const float* packed, float scale, bool accumulate,
                  float* out);
  // The same product with output channels in the lanes (Conv3x3Algo::kChannels): packed is the
  // (c_total, 9, k) layout, k % 16 == 0. Null where not provided.
  void (*spatial_cl)(const float* planes, const Conv3x3Plane& g, int64_t c_total, int64_t c0,
                     int64_t c1, int64_t k, const float* packed, float scale, bool accumulate,
                     float* out);
  // xt (g.qcount, c) <- src (c, h, w): the padded plane layout transposed (channel fastest), every
  // element written (pads as 0).
  void (*transpose)(const float* src, int64_t c, const Conv3x3Plane& g, float* xt);
  // acc[(o * 9 + tap) * c + ch] += sum over samples s < nsamp, image rows [y0, y1) and x < w of
  //   dy_s[o * h * w + y * w + x] * xt_s[((y + ky) * row + x + kx) * c + ch], tap = ky * 3 + kx,
  // with xt_s = xt + s * xt_stride and dy_s = dy + s * dy_stride. The sum is formed in fp32 first
  // (exact for codes when nsamp * (y1 - y0) * w terms stay below the exact bound), then added to
  // acc. scratch: k * 9 * c floats the kernel may use.
  void (*wgrad_f)(const float* xt, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t k,
                  int64_t y0, int64_t y1, int64_t nsamp, int64_t xt_stride, int64_t dy_stride,
                  float* acc, float* scratch);
  void (*wgrad_d)(const float* xt, const float* dy, const Conv3x3Plane& g, int64_t c, int64_t k,
                  int64_t y0, int64_t y1, int64_t nsamp, int64_t xt_stride, int64_t dy_stride,
                  double* acc, float* scratch);
  // wgrad_* take only c % wgrad_c_multiple == 0 (the driver falls back to the portable table).
  int wgrad_c_multiple;
  // The same sums with the OUTPUT channels in the lanes, for few input channels (the first conv):
  //   acc[(ch * 9 + tap) * k + o] += sum over samples, rows [y0, y1) and x < w of
  //   planes_s[ch * g.stride + (y + ky) * row + x + kx] * dyt_s[((y + 1) * row + x + 1) * k + o],
  // planes_s = planes + s * planes_stride from pad(x), dyt_s = dyt + s * dyt_stride from
  // transpose(dy). Null where not provided; k % 16 == 0.
  void (*wgrad_k_f)(const float* planes, const float* dyt, const Conv3x3Plane& g, int64_t c,
                    int64_t k, int64_t y0, int64_t y1, int64_t nsamp, int64_t planes_stride,
                    int64_t dyt_stride, float* acc);
  void (*wgrad_k_d)(const float* planes, const float* dyt, const Conv3x3Plane& g, int64_t c,
                    int64_t k, int64_t y0, int64_t y1, int64_t nsamp, int64_t planes_stride,
                    int64_t dyt_stride, double* acc);
  // The same sums as wgrad_k_f / wgrad_k_d (acc layout (c, 9, k)) from both operands in the
  // padded plane layout, any c and k, no transposes:
  //   acc[(ch * 9 + tap) * k + o] += sum over samples s < nsamp and flat output positions p in
  //   [p0, p1) of dyp_s[o * g.stride + g.row + 1 + p] * xp_s[ch * g.stride + p + ky * row + kx],
  // xp_s = x_planes + s * x_stride and dyp_s = dy_planes + s * dy_stride, both from pad() (dy is
  // zero at the junk positions, so they add nothing). p0 and p1 are whole image rows (y * row).
  // The sum is formed in fp32 per piece (exact for codes while the piece's nsamp * rows * w terms
  // stay below the exact bound), then added to acc. When provided, the driver uses it for every
  // shape. Null where not provided.
  void (*wgrad_planes_f)(const float* x_planes, const float* dy_planes, const Conv3x3Plane& g,
                         int64_t c, int64_t k, int64_t p0, int64_t p1, int64_t nsamp,
                         int64_t x_stride, int64_t dy_stride, float* acc);
  void (*wgrad_planes_d)(const float* x_planes, const float* dy_planes, const Conv3x3Plane& g,
                         int64_t c, int64_t k, int64_t p0, int64_t p1, int64_t nsamp,
                         int64_t x_stride, int64_t dy_stride, double* acc);
};

// The portable pad (plain copies), shared by the tables whose ISA has no faster one.
void pad_planes(const float* src, int64_t channels, const Conv3x3Plane& g, float* planes);

extern const Conv3x3Kernels kConv3x3Portable;
#if defined(INT4DDP_HAVE_AVX2)
extern const Conv3x3Kernels kConv3x3Avx2;
#endif
#if defined(INT4DDP_HAVE_AVX512)
extern const Conv3x3Kernels kConv3x3Avx512;
#endif

}  // namespace int4ddp::math::detail
