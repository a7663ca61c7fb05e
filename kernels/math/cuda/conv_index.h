// The index math of the convolution layout kernels (nn_cuda.cu: im2col, col2im; qlayer_cuda.cu:
// the int32 col2im, the plane swaps), host and device: free of CUDA types, so the CPU replays it
// (tests/test_cuda_conv_index.cpp, label cpu) against Conv2d's own im2col and col2im without a GPU,
// and the kernels call the same functions.
#pragma once

#include <cstdint>

#include "kernels/quant/format.h"  // INT4DDP_HD

namespace int4ddp::math::cuda {

// A square-kernel convolution over (n, channels, h, w) images (Conv2d's geometry).
struct ConvGeometry {
  int64_t channels = 0, h = 0, w = 0;
  int kernel = 1, stride = 1, pad = 0;
  INT4DDP_HD int64_t out_h() const { return (h + 2 * pad - kernel) / stride + 1; }
  INT4DDP_HD int64_t out_w() const { return (w + 2 * pad - kernel) / stride + 1; }
  INT4DDP_HD int64_t rows() const { return channels * kernel * kernel; }  // K of the GEMM
};

// The columns of a group of g samples: (rows, cols) with rows = channels * k * k (row r =
// (c * k + ky) * k + kx) and cols = g * ho * wo (sample s at column s * ho * wo), Conv2d::im2col's
// layout; or its transpose (cols, rows).
struct ColGeometry {
  int64_t channels, h, w, ho, wo, rows, cols;
  int k, stride, pad;
};

inline ColGeometry col_geometry(const ConvGeometry& geo, int64_t g) {
  ColGeometry c;
  c.channels = geo.channels;
  c.h = geo.h;
  c.w = geo.w;
  c.ho = geo.out_h();
  c.wo = geo.out_w();
  c.k = geo.kernel;
  c.stride = geo.stride;
  c.pad = geo.pad;
  c.rows = geo.rows();
  c.cols = g * c.ho * c.wo;
  return c;
}

// Element idx of the columns (transposed: of their transpose) holds the image element at this
// offset from the group's first sample (NCHW), or padding (-1).
INT4DDP_HD int64_t im2col_source(const ColGeometry& c, int64_t idx, bool transposed) {
  const int64_t r = transposed ? idx % c.rows : idx / c.cols;
  const int64_t q = transposed ? idx / c.rows : idx % c.cols;
  const int64_t hw = c.ho * c.wo, s = q / hw, o = q % hw, oy = o / c.wo, ox = o % c.wo;
  const int64_t ch = r / (c.k * c.k);
  const int64_t ky = (r / c.k) % c.k, kx = r % c.k;
  const int64_t iy = oy * c.stride - c.pad + ky, ix = ox * c.stride - c.pad + kx;
  if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) return -1;
  return ((s * c.channels + ch) * c.h + iy) * c.w + ix;
}

// The column entries image element idx (offset from the group's first sample, NCHW) receives in
// col2im, passed to term(column index) in (ky, kx) order: the order in which Conv2d::col2im's
// scatter adds them to that element (at most one per (ky, kx)).
template <typename Term>
INT4DDP_HD void col2im_terms(const ColGeometry& c, int64_t idx, bool transposed, Term&& term) {
  const int64_t plane = c.h * c.w;
  const int64_t s = idx / (c.channels * plane), ch = (idx / plane) % c.channels;
  const int64_t iy = (idx % plane) / c.w, ix = idx % c.w;
  for (int ky = 0; ky < c.k; ++ky) {
    const int64_t ty = iy + c.pad - ky;
    if (ty < 0 || ty % c.stride != 0 || ty / c.stride >= c.ho) continue;
    const int64_t oy = ty / c.stride;
    for (int kx = 0; kx < c.k; ++kx) {
      const int64_t tx = ix + c.pad - kx;
      if (tx < 0 || tx % c.stride != 0 || tx / c.stride >= c.wo) continue;
      const int64_t ox = tx / c.stride;
      const int64_t r = (ch * c.k + ky) * c.k + kx, q = (s * c.ho + oy) * c.wo + ox;
      term(transposed ? q * c.rows + r : r * c.cols + q);
    }
  }
}

// dst (b, a, hw) = src (a, b, hw), the two leading dimensions swapped: dst[idx] = src[this].
INT4DDP_HD int64_t swap_planes_source(int64_t idx, int64_t a, int64_t b, int64_t hw) {
  const int64_t j = idx / (a * hw), i = (idx / hw) % a, p = idx % hw;
  return (i * b + j) * hw + p;
}

}  // namespace int4ddp::math::cuda
