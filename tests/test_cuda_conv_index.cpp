// The index math of the GPU convolution layout kernels (kernels/math/cuda/conv_index.h: im2col,
// the float and int32 col2im gathers, the plane swaps of the quantized convolution) replayed on the
// CPU, one "thread" per output element as the kernels run it, against Conv2d's own im2col and
// col2im. Runs without a GPU (label cpu): the kernels call these same functions, so a layout bug
// shows here before a GPU is lent.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "conv_cases.h"
#include "kernels/math/cuda/conv_index.h"

namespace int4ddp::math::cuda {
namespace {

using test::ConvProbe;
using Case = test::ColCase;
const auto& kCases = test::kColCases;

std::string name(const Case& c) {
  return "c=" + std::to_string(c.c) + " " + std::to_string(c.h) + "x" + std::to_string(c.w) +
         " k=" + std::to_string(c.k) + " s=" + std::to_string(c.stride) +
         " p=" + std::to_string(c.pad) + " s0=" + std::to_string(c.s0) +
         " g=" + std::to_string(c.g);
}

std::vector<float> normal(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

int64_t bits_differ(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return n;
}

// v (rows, cols) row-major, transposed to (cols, rows).
std::vector<float> transpose(const std::vector<float>& v, int64_t rows, int64_t cols) {
  std::vector<float> t(v.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q)
      t[static_cast<size_t>(q * rows + r)] = v[static_cast<size_t>(r * cols + q)];
  return t;
}

TEST(CudaConvIndex, Im2colMatchesConv2dInBothLayouts) {
  for (const Case& cc : kCases) {
    SCOPED_TRACE(name(cc));
    const ConvGeometry geo{cc.c, cc.h, cc.w, cc.k, cc.stride, cc.pad};
    const ColGeometry c = col_geometry(geo, cc.g);
    ConvProbe conv("probe", cc.c, 1, cc.k, cc.stride, cc.pad);
    ASSERT_EQ(c.ho, conv.out_size(cc.h));
    ASSERT_EQ(c.wo, conv.out_size(cc.w));
    const std::vector<float> img = normal(static_cast<size_t>(cc.n * cc.c * cc.h * cc.w), 3);
    std::vector<float> want(static_cast<size_t>(c.rows * c.cols));
    conv.im2col(img.data(), cc.s0, cc.g, cc.h, cc.w, want.data());
    for (bool transposed : {false, true}) {
      std::vector<float> got(want.size());
      for (int64_t idx = 0; idx < c.rows * c.cols; ++idx) {  // im2col_kernel's threads
        const int64_t src = im2col_source(c, idx, transposed);
        got[static_cast<size_t>(idx)] =
            src >= 0 ? img[static_cast<size_t>(cc.s0 * cc.c * cc.h * cc.w + src)] : 0.0f;
      }
      const std::vector<float> expect = transposed ? transpose(want, c.rows, c.cols) : want;
      EXPECT_EQ(bits_differ(got, expect), 0) << "transposed " << transposed;
    }
  }
}

// col2im_kernel: each image element of the group starts from its value and adds its terms in
// col2im_terms' order; Conv2d::col2im scatters (c, ky, kx) rows in order: bit for bit.
TEST(CudaConvIndex, Col2imGatherMatchesConv2dBitForBit) {
  for (const Case& cc : kCases) {
    SCOPED_TRACE(name(cc));
    const ConvGeometry geo{cc.c, cc.h, cc.w, cc.k, cc.stride, cc.pad};
    const ColGeometry c = col_geometry(geo, cc.g);
    ConvProbe conv("probe", cc.c, 1, cc.k, cc.stride, cc.pad);
    const std::vector<float> col = normal(static_cast<size_t>(c.rows * c.cols), 5);
    const std::vector<float> col_t = transpose(col, c.rows, c.cols);
    const std::vector<float> img0 = normal(static_cast<size_t>(cc.n * cc.c * cc.h * cc.w), 6);
    std::vector<float> want = img0;
    conv.col2im(col.data(), cc.s0, cc.g, cc.h, cc.w, want.data());
    for (bool transposed : {false, true}) {
      const std::vector<float>& src = transposed ? col_t : col;
      std::vector<float> got = img0;
      const int64_t image = cc.c * cc.h * cc.w;
      for (int64_t idx = 0; idx < cc.g * image; ++idx) {  // col2im_kernel's threads
        float& out = got[static_cast<size_t>(cc.s0 * image + idx)];
        col2im_terms(c, idx, transposed, [&](int64_t i) { out += src[static_cast<size_t>(i)]; });
      }
      EXPECT_EQ(bits_differ(got, want), 0) << "transposed " << transposed;
    }
  }
}

// col2im_i32_kernel: integer terms summed exactly, every column entry used once (the adjoint of
// im2col: sum over the image of col2im(col) * img = sum over the columns of col * im2col(img)).
TEST(CudaConvIndex, IntegerCol2imIsTheExactAdjointOfIm2col) {
  for (const Case& cc : kCases) {
    SCOPED_TRACE(name(cc));
    const ConvGeometry geo{cc.c, cc.h, cc.w, cc.k, cc.stride, cc.pad};
    const ColGeometry c = col_geometry(geo, cc.g);
    ConvProbe conv("probe", cc.c, 1, cc.k, cc.stride, cc.pad);
    std::mt19937_64 rng(7);
    std::vector<int32_t> col(static_cast<size_t>(c.rows * c.cols));
    for (int32_t& v : col) v = static_cast<int32_t>(rng() % 2001) - 1000;
    // The CPU's col2im on the same integers as floats (exact: small integers).
    std::vector<float> colf(col.begin(), col.end());
    const int64_t image = cc.c * cc.h * cc.w;
    std::vector<float> want(static_cast<size_t>(cc.n * image), 0.0f);
    conv.col2im(colf.data(), cc.s0, cc.g, cc.h, cc.w, want.data());
    std::vector<int64_t> uses(col.size(), 0);
    for (int64_t idx = 0; idx < cc.g * image; ++idx) {
      int32_t acc = 0;
      col2im_terms(c, idx, false, [&](int64_t i) {
        acc += col[static_cast<size_t>(i)];
        ++uses[static_cast<size_t>(i)];
      });
      EXPECT_EQ(static_cast<float>(acc), want[static_cast<size_t>(cc.s0 * image + idx)])
          << "element " << idx;
    }
    // Every column entry that im2col fills from the image is gathered exactly once; padding
    // entries never.
    for (int64_t i = 0; i < c.rows * c.cols; ++i)
      EXPECT_EQ(uses[static_cast<size_t>(i)], im2col_source(c, i, false) >= 0 ? 1 : 0)
          << "column entry " << i;
  }
}

// planes_by_channel (src (g, c, hw) -> dst (c, g*hw)) and planes_by_sample (the inverse), as
// qlayer_cuda.cu calls swap_planes_kernel: dst[idx] = src[swap_planes_source(idx, a, b, hw)].
TEST(CudaConvIndex, PlaneSwapsAreTheLayoutsTheQuantizedConvolutionNeeds) {
  for (const auto& [g, ch, hw] : {std::array<int64_t, 3>{1, 1, 1}, std::array<int64_t, 3>{3, 5, 7},
                                  std::array<int64_t, 3>{4, 2, 196}}) {
    SCOPED_TRACE("g=" + std::to_string(g) + " c=" + std::to_string(ch) +
                 " hw=" + std::to_string(hw));
    const int64_t n = g * ch * hw;
    std::vector<int64_t> src(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) src[static_cast<size_t>(i)] = i;
    // planes_by_channel: swap (a = g, b = c).
    std::vector<int64_t> by_channel(src.size());
    for (int64_t idx = 0; idx < n; ++idx)
      by_channel[static_cast<size_t>(idx)] =
          src[static_cast<size_t>(swap_planes_source(idx, g, ch, hw))];
    for (int64_t s = 0; s < g; ++s)
      for (int64_t c = 0; c < ch; ++c)
        for (int64_t p = 0; p < hw; ++p)
          ASSERT_EQ(by_channel[static_cast<size_t>(c * g * hw + s * hw + p)],
                    src[static_cast<size_t>((s * ch + c) * hw + p)]);
    // planes_by_sample: swap (a = c, b = g) brings it back.
    std::vector<int64_t> back(src.size());
    for (int64_t idx = 0; idx < n; ++idx)
      back[static_cast<size_t>(idx)] =
          by_channel[static_cast<size_t>(swap_planes_source(idx, ch, g, hw))];
    EXPECT_EQ(back, src);
  }
}

}  // namespace
}  // namespace int4ddp::math::cuda
