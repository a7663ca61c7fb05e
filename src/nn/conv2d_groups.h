// Conv2d::backward_by_groups, the im2col + GEMM backward of Conv2d and QConv2d (see layer.h),
// included by conv2d.cpp and quant_layers.cpp. The loop over batch parts and groups of samples, the
// column matrices and the group gather/scatter are this one template; what differs between fp32
// values and integer codes (the GEMM, how dW is summed) is its Products argument:
//
//   struct Products {
//     // C (m, n) = A (m, k) B (n, k)^T, the dW product of one group, summed into batch part
//     // `part`'s dW; first: the part's first group. a_is_x: A holds x's values (B dy's), else
//     // A holds dy's (B x's).
//     void weight_product(int64_t part, bool first, int64_t m, int64_t n, int64_t k,
//                         const TA* a, const TB* b, bool a_is_x);
//     // C (m, n) = op(W) (m, k) D (k, n), a dx product (W the weights, or their flipped
//     // transpose; D a group's dy or its im2col), overwriting c.
//     void data_product(math::Trans tw, int64_t m, int64_t n, int64_t k, const TW* w,
//                       const TD* d, float* c);
//   };
// Products may also build a group's column matrix itself, straight in the layout its GEMMs read
// (the quantized layers' packed panels), by defining both
//   // The transposed path's group: dy's columns, dW (flipped taps) from x_g, dx_g into dxg.
//   bool dy_columns_products(int64_t part, bool first, int64_t s0, int64_t g, const TX* xg,
//                            float* dxg);
//   // The plain path's group: x's columns, dW from dy_g, and (dcol not null) dcol = W^T dy_g.
//   bool x_columns_products(int64_t part, bool first, int64_t s0, int64_t g, const TD* dyg,
//                           float* dcol);
// each returning false to leave the group to the column matrices here.
// x, dy and the weights are each fp32 (TX = TD = TW = float) or byte codes (int8_t, or uint8_t
// for unsigned activations): columns, gathered groups and flipped weights keep their operand's
// type (byte codes in the float scratch's storage); dx products and the col2im input are fp32.
#pragma once

#include <algorithm>
#include <type_traits>

#include "kernels/common/parallel.h"
#include "kernels/math/gemm.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

namespace detail {
template <typename P, typename = void>
struct BuildsColumns : std::false_type {};
template <typename P>
struct BuildsColumns<P, std::void_t<decltype(&P::dy_columns_products)>> : std::true_type {};
}  // namespace detail

template <typename Products, typename TX, typename TD, typename TW>
bool Conv2d::backward_by_groups(int64_t n, int64_t h, int64_t w, const TX* x, const TD* dy,
                                const TW* weights, float* dx, Products& products) {
  using math::Trans;
  const int64_t ckk = in_ * kernel_ * kernel_, okk = out_ * kernel_ * kernel_;
  const int64_t hw = out_size(h) * out_size(w), ihw = h * w;
  const BatchParts parts{n};
  if (dx && dx_by_transposed_conv()) {
    // Both products from one im2col of dy (out*k*k, g*h*w), none of x:
    //   dWt_g (in, out*k*k) = x_g (in, g*h*w) im2col(dy_g)^T   (dW with its taps flipped)
    //   dx_g (in, g*h*w) = flip(W) (in, out*k*k) im2col(dy_g)
    const int64_t gmax = part_group_size(n, okk, ihw);
    TW* wt = grow_scratch_as<TW>(wt_, in_ * okk);
    flip_weight(weights, wt);
    parallel_for(parts.count(), [&](int64_t p) {
      GroupScratch& sc = group_scratch();
      TD* dcol = grow_scratch_as<TD>(sc.dcol, okk * gmax * ihw);
      float* in_buf = grow_scratch(sc.in, in_ * gmax * ihw);
      TX* x_buf = grow_scratch_as<TX>(sc.x, in_ * gmax * ihw);
      for (int64_t s0 = parts.begin(p); s0 < parts.end(p); s0 += gmax) {
        const int64_t g = std::min(gmax, parts.end(p) - s0), icols = g * ihw;
        const TX* xg = x + s0 * in_ * ihw;
        if (g > 1) {
          gather_group(x, s0, g, in_, ihw, x_buf);
          xg = x_buf;
        }
        // A group of one sample is already in dx's layout: the product writes it in place.
        float* dxg = g == 1 ? dx + s0 * in_ * ihw : in_buf;
        bool done = false;
        if constexpr (detail::BuildsColumns<Products>::value)
          done = products.dy_columns_products(p, s0 == parts.begin(p), s0, g, xg, dxg);
        if (!done) {
          dy_im2col(dy, s0, g, h, w, dcol);
          products.weight_product(p, s0 == parts.begin(p), in_, okk, icols, xg,
                                  static_cast<const TD*>(dcol),
                                  /*a_is_x=*/true);
          products.data_product(Trans::kNo, in_, icols, okk, static_cast<const TW*>(wt), dcol, dxg);
        }
        if (g > 1) scatter_group(dxg, s0, g, in_, ihw, dx);
      }
    });
    return true;
  }
  // dW_g (out, in*k*k) = dy_g (out, g*ho*wo) im2col(x_g)^T; dx (when wanted) by col2im of
  // dcol (in*k*k, g*ho*wo) = W^T (in*k*k, out) dy_g.
  const int64_t gmax = part_group_size(n, ckk, hw);
  parallel_for(parts.count(), [&](int64_t p) {
    GroupScratch& sc = group_scratch();
    TX* col = grow_scratch_as<TX>(sc.col, ckk * gmax * hw);
    TD* buf = grow_scratch_as<TD>(sc.out, out_ * gmax * hw);
    float* dcol = dx ? grow_scratch(sc.dcol, ckk * gmax * hw) : nullptr;
    if (dx) std::fill(dx + parts.begin(p) * in_ * ihw, dx + parts.end(p) * in_ * ihw, 0.0f);
    for (int64_t s0 = parts.begin(p); s0 < parts.end(p); s0 += gmax) {
      const int64_t g = std::min(gmax, parts.end(p) - s0), cols = g * hw;
      const TD* dyg = dy + s0 * out_ * hw;
      if (g > 1) {
        gather_group(dy, s0, g, out_, hw, buf);
        dyg = buf;
      }
      bool done = false;
      if constexpr (detail::BuildsColumns<Products>::value)
        done = products.x_columns_products(p, s0 == parts.begin(p), s0, g, dyg, dcol);
      if (!done) {
        im2col(x, s0, g, h, w, col);
        products.weight_product(p, s0 == parts.begin(p), out_, ckk, cols, dyg,
                                static_cast<const TX*>(col),
                                /*a_is_x=*/false);
        if (dx) products.data_product(Trans::kYes, ckk, cols, out_, weights, dyg, dcol);
      }
      if (!dx) continue;
      col2im(dcol, s0, g, h, w, dx);
    }
  });
  return false;
}

}  // namespace int4ddp::nn
