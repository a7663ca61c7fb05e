// Conv2d (see layer.h): the direct 3x3 path (kernels/math/conv3x3.h) and the im2col + GEMM path
// over groups of samples. Parameters are accumulated (+=) in backward.
#include <algorithm>
#include <cstring>

#include "kernels/common/parallel.h"
#include "kernels/math/gemm.h"
#include "src/nn/conv2d_groups.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

using math::sgemm;
using math::Trans;

// ---- Conv2d ---------------------------------------------------------------------------------
//
// Every product runs over a group of samples at once: the group's im2col columns sit side by side
// in one (rows, g * ho * wo) matrix (sample s at column offset s * ho * wo), so the GEMM's N is g
// times larger than one sample's while the column buffer stays about kColumnBytes (in L2). A
// stride-1 convolution computes dx as the convolution of dy with the flipped, transposed kernel
// (im2col of dy + one GEMM), not as W^T dy followed by the col2im scatter.

namespace {

// Default column-buffer budget of one group, well inside a 2 MiB per-core L2.
constexpr int64_t kColumnBytes = int64_t{1} << 19;

// The output columns [x0, x1) whose input column ox * stride - pad + kx lies in [0, w).
void inside_columns(int64_t w, int64_t wo, int kx, int stride, int pad, int64_t* x0, int64_t* x1) {
  int64_t lo = 0;
  while (lo < wo && lo * stride - pad + kx < 0) ++lo;
  int64_t hi = lo;
  while (hi < wo && hi * stride - pad + kx < w) ++hi;
  *x0 = lo;
  *x1 = hi;
}

// col rows r = (c * k + ky) * k + kx, each `ld` elements apart; sample s of the group writes
// columns s * ho * wo .. (s + 1) * ho * wo - 1 of every row from images + (s0 + s) * channels * h
// * w. T: fp32 values or byte codes (padding is value 0, which is code 0).
template <typename T>
void im2col_group(const T* images, int64_t s0, int64_t g, int64_t channels, int64_t h, int64_t w,
                  int k, int stride, int pad, int64_t ho, int64_t wo, T* col) {
  constexpr T kZero{};
  const int64_t hw = ho * wo, ld = g * hw;
  // Stride 1 with "same" width (wo == w): the valid rows oy of one (c, ky, kx) row of col are ONE
  // contiguous stretch of the image shifted by kx - pad, so they are one block copy plus a zero at
  // the left or right edge of each output row, not one short copy per output row.
  const bool same_width = stride == 1 && wo == w;
  for (int64_t s = 0; s < g; ++s) {
    const T* image = images + (s0 + s) * channels * h * w;
    for (int64_t c = 0; c < channels; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          T* row = col + ((c * k + ky) * k + kx) * ld + s * hw;
          const T* plane = image + c * h * w;
          int64_t x0, x1;
          inside_columns(w, wo, kx, stride, pad, &x0, &x1);
          if (same_width) {
            int64_t y0, y1;  // output rows whose input row lies inside the image
            inside_columns(h, ho, ky, 1, pad, &y0, &y1);
            std::fill(row, row + y0 * wo, kZero);
            std::fill(row + y1 * wo, row + hw, kZero);
            // row[y0*wo + j] = plane[base + j] for j in [0, len), reading only inside the plane.
            const int64_t base = (y0 - pad + ky) * w + kx - pad, len = (y1 - y0) * wo;
            // A tap with no valid output row (len 0, base < 0) writes nothing: jlo <= len.
            const int64_t jlo = std::min(len, std::max<int64_t>(0, -base));
            const int64_t jhi = std::max(jlo, std::min(len, h * w - base));
            T* out = row + y0 * wo;
            std::fill(out, out + jlo, kZero);
            std::memcpy(out + jlo, plane + base + jlo, sizeof(T) * static_cast<size_t>(jhi - jlo));
            std::fill(out + jhi, out + len, kZero);
            // Edge columns (at most pad of them on each side), walked down the rows rather than
            // a loop of 0 or 1 element per output row.
            for (int64_t ox = 0; ox < x0; ++ox)
              for (int64_t oy = y0; oy < y1; ++oy) row[oy * wo + ox] = kZero;
            for (int64_t ox = x1; ox < wo; ++ox)
              for (int64_t oy = y0; oy < y1; ++oy) row[oy * wo + ox] = kZero;
            continue;
          }
          for (int64_t oy = 0; oy < ho; ++oy) {
            T* out = row + oy * wo;
            const int64_t iy = oy * stride - pad + ky;
            if (iy < 0 || iy >= h) {
              for (int64_t ox = 0; ox < wo; ++ox) out[ox] = kZero;
              continue;
            }
            const T* in = plane + iy * w - pad + kx;
            for (int64_t ox = 0; ox < x0; ++ox) out[ox] = kZero;
            for (int64_t ox = x0; ox < x1; ++ox) out[ox] = in[ox * stride];
            for (int64_t ox = x1; ox < wo; ++ox) out[ox] = kZero;
          }
        }
  }
}

// The adjoint of im2col_group: image[...] += col[...] for sample s of the group.
void col2im_group(const float* col, int64_t s0, int64_t g, int64_t channels, int64_t h, int64_t w,
                  int k, int stride, int pad, int64_t ho, int64_t wo, float* images) {
  const int64_t hw = ho * wo, ld = g * hw;
  for (int64_t s = 0; s < g; ++s) {
    float* image = images + (s0 + s) * channels * h * w;
    for (int64_t c = 0; c < channels; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          const float* row = col + ((c * k + ky) * k + kx) * ld + s * hw;
          int64_t x0, x1;
          inside_columns(w, wo, kx, stride, pad, &x0, &x1);
          for (int64_t oy = 0; oy < ho; ++oy) {
            const int64_t iy = oy * stride - pad + ky;
            if (iy < 0 || iy >= h) continue;
            float* out = image + (c * h + iy) * w - pad + kx;
            const float* in = row + oy * wo;
            for (int64_t ox = x0; ox < x1; ++ox) out[ox * stride] += in[ox];
          }
        }
  }
}

// The fp32 products of backward_by_groups: each batch part's dW in its own partial of dw_parts
// (the part's groups accumulated in order), dx products straight from sgemm.
struct FloatGroupProducts {
  float* dw_parts;  // (parts, wsize) fp32
  int64_t wsize;
  void weight_product(int64_t part, bool first, int64_t m, int64_t n, int64_t k, const float* a,
                      const float* b, bool) const {
    sgemm(Trans::kNo, Trans::kYes, m, n, k, 1.0f, a, k, b, k, first ? 0.0f : 1.0f,
          dw_parts + part * wsize, n);
  }
  void data_product(Trans tw, int64_t m, int64_t n, int64_t k, const float* w, const float* d,
                    float* c) const {
    sgemm(tw, Trans::kNo, m, n, k, 1.0f, w, tw == Trans::kNo ? k : m, d, n, 0.0f, c, n);
  }
};

}  // namespace

Conv2d::Conv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad,
               bool bias)
    : name_(std::move(name)),
      in_(in),
      out_(out),
      kernel_(kernel),
      stride_(stride),
      pad_(pad),
      has_bias_(bias),
      column_bytes_(kColumnBytes) {
  INT4DDP_CHECK(in > 0 && out > 0 && kernel > 0 && stride > 0 && pad >= 0, name_,
                ": bad convolution geometry");
  weight_ = make_param(name_ + ".weight", {out, in, kernel, kernel}, true);
  if (has_bias_) bias_ = make_param(name_ + ".bias", {out}, false);
}

std::vector<Param*> Conv2d::params() {
  if (has_bias_) return {&weight_, &bias_};
  return {&weight_};
}

void Conv2d::set_column_bytes(int64_t bytes) {
  INT4DDP_CHECK(bytes > 0, name_, ": column budget ", bytes, " must be positive");
  column_bytes_ = bytes;
}

int64_t Conv2d::group_size(int64_t n, int64_t rows, int64_t cols) const {
  const int64_t per_sample = std::max<int64_t>(1, rows * cols * int64_t{sizeof(float)});
  return std::clamp<int64_t>(column_bytes_ / per_sample, 1, std::max<int64_t>(n, 1));
}

template <typename T>
void Conv2d::im2col(const T* images, int64_t s0, int64_t g, int64_t h, int64_t w, T* col) const {
  im2col_group(images, s0, g, in_, h, w, kernel_, stride_, pad_, out_size(h), out_size(w), col);
}

void Conv2d::col2im(const float* col, int64_t s0, int64_t g, int64_t h, int64_t w,
                    float* images) const {
  col2im_group(col, s0, g, in_, h, w, kernel_, stride_, pad_, out_size(h), out_size(w), images);
}

bool Conv2d::dx_by_transposed_conv() const { return stride_ == 1 && pad_ <= kernel_ - 1; }

template <typename T>
void Conv2d::dy_im2col(const T* dy, int64_t s0, int64_t g, int64_t h, int64_t w, T* col) const {
  // dx[c, iy, ix] = sum_{o, ky, kx} W[o, c, ky, kx] dy[o, iy + pad - ky, ix + pad - kx]: the
  // stride-1 convolution of dy (padded by k - 1 - pad) with the kernel flipped in y and x.
  im2col_group(dy, s0, g, out_, out_size(h), out_size(w), kernel_, 1, kernel_ - 1 - pad_, h, w,
               col);
}

template <typename T>
void Conv2d::flip_weight(const T* w, T* wt) const {
  const int k = kernel_;
  for (int64_t o = 0; o < out_; ++o)
    for (int64_t c = 0; c < in_; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx)
          wt[flipped_index(o, c, ky, kx)] = w[((o * in_ + c) * k + ky) * k + kx];
}

template <typename T>
void Conv2d::gather_group(const T* src, int64_t s0, int64_t g, int64_t rows, int64_t hw, T* dst) {
  for (int64_t s = 0; s < g; ++s)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + r * g * hw + s * hw, src + ((s0 + s) * rows + r) * hw,
                  sizeof(T) * static_cast<size_t>(hw));
}

// The element types of the templates above: fp32 values and the quantized layers' byte codes.
#define INT4DDP_CONV2D_ELEMENT(T)                                                          \
  template void Conv2d::im2col(const T*, int64_t, int64_t, int64_t, int64_t, T*) const;    \
  template void Conv2d::dy_im2col(const T*, int64_t, int64_t, int64_t, int64_t, T*) const; \
  template void Conv2d::flip_weight(const T*, T*) const;                                   \
  template void Conv2d::gather_group(const T*, int64_t, int64_t, int64_t, int64_t, T*);
INT4DDP_CONV2D_ELEMENT(float)
INT4DDP_CONV2D_ELEMENT(int8_t)
INT4DDP_CONV2D_ELEMENT(uint8_t)
#undef INT4DDP_CONV2D_ELEMENT

void Conv2d::scatter_group(const float* src, int64_t s0, int64_t g, int64_t rows, int64_t hw,
                           float* dst) {
  for (int64_t s = 0; s < g; ++s)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + ((s0 + s) * rows + r) * hw, src + r * g * hw + s * hw,
                  sizeof(float) * static_cast<size_t>(hw));
}

Conv2d::GroupScratch& Conv2d::group_scratch() {
  thread_local GroupScratch scratch;
  return scratch;
}

int64_t Conv2d::part_group_size(int64_t n, int64_t rows, int64_t cols) const {
  return group_size(std::min(n, BatchParts::kSamples), rows, cols);
}

bool Conv2d::direct3x3_fp32() const {
  return direct_conv_ && kernel_ == 3 && stride_ == 1 && pad_ == 1 &&
         math::conv3x3_resolve(math::Conv3x3Isa::kAuto) != math::Conv3x3Isa::kPortable;
}

// The quantized layers keep their integer GEMMs below AVX-512 (igemm's AVX2 kernels on the byte
// codes rather than the fp32 FMA kernels on codes as floats).
bool Conv2d::direct3x3() const {
  return direct3x3_fp32() &&
         math::conv3x3_resolve(math::Conv3x3Isa::kAuto) == math::Conv3x3Isa::kAvx512;
}

void Conv2d::forward(const Tensor& x, Tensor& y, bool) {
  INT4DDP_CHECK(x.rank() == 4 && x.dim(1) == in_, name_, ": input ", shape_str(x.shape()),
                " is not (n, ", in_, ", h, w)");
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = out_size(h), wo = out_size(w), ckk = in_ * kernel_ * kernel_, hw = ho * wo;
  INT4DDP_CHECK(ho > 0 && wo > 0, name_, ": input ", shape_str(x.shape()), " is too small");
  y.resize({n, out_, ho, wo});
  const int64_t gmax = part_group_size(n, ckk, hw);
  const BatchParts parts{n};
  const bool direct = direct3x3_fp32();
  if (direct) w3_.pack(weight_.value.data(), out_, in_);
  parallel_for(parts.count(), [&](int64_t p) {
    if (direct) {
      const int64_t s0 = parts.begin(p);
      math::conv3x3_forward({parts.end(p) - s0, in_, out_, h, w}, x.data() + s0 * in_ * hw, w3_,
                            y.data() + s0 * out_ * hw);
    } else {
      GroupScratch& sc = group_scratch();
      float* col = grow_scratch(sc.col, ckk * gmax * hw);
      float* buf = grow_scratch(sc.out, out_ * gmax * hw);
      for (int64_t s0 = parts.begin(p); s0 < parts.end(p); s0 += gmax) {
        const int64_t g = std::min(gmax, parts.end(p) - s0), cols = g * hw;
        im2col(x.data(), s0, g, h, w, col);
        // A group of one sample is already in y's layout: the GEMM writes it in place.
        float* yg = g == 1 ? y.data() + s0 * out_ * hw : buf;
        sgemm(Trans::kNo, Trans::kNo, out_, cols, ckk, 1.0f, weight_.value.data(), ckk, col, cols,
              0.0f, yg, cols);
        if (g > 1) scatter_group(yg, s0, g, out_, hw, y.data());
      }
    }
    if (has_bias_)
      for (int64_t s = parts.begin(p); s < parts.end(p); ++s)
        for (int64_t o = 0; o < out_; ++o) {
          float* ys = y.data() + (s * out_ + o) * hw;
          for (int64_t q = 0; q < hw; ++q) ys[q] += bias_.value[o];
        }
  });
}

void Conv2d::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t hw = y.dim(2) * y.dim(3), wsize = weight_.value.numel();
  const BatchParts parts{n};
  if (has_bias_)  // one thread, sample order: a fixed summation order
    for (int64_t s = 0; s < n; ++s)
      for (int64_t o = 0; o < out_; ++o) {
        const float* d = dy.data() + (s * out_ + o) * hw;
        for (int64_t q = 0; q < hw; ++q) bias_.grad[o] += d[q];
      }
  // dW: one partial per part (groups accumulated in order within it), summed in part order below.
  float* dw_parts = grow_scratch(dw_parts_, parts.count() * wsize);
  if (direct3x3_fp32()) {
    // Direct 3x3 (stride 1, pad 1: h, w are also the output's size). The weights are packed again
    // rather than taken from forward, so backward never depends on what ran in between.
    w3_.pack(weight_.value.data(), out_, in_);
    if (dx) dx->resize(x.shape());
    if (static_cast<int64_t>(g3_.size()) < parts.count())
      g3_.resize(static_cast<size_t>(parts.count()));
    parallel_for(parts.count(), [&](int64_t p) {
      const int64_t s0 = parts.begin(p);
      const math::Conv3x3Shape sh{parts.end(p) - s0, in_, out_, h, w};
      const float* dyp = dy.data() + s0 * out_ * hw;
      if (dx) math::conv3x3_backward_data(sh, dyp, w3_, dx->data() + s0 * in_ * hw);
      math::Conv3x3WeightGrad& g3 = g3_[static_cast<size_t>(p)];
      g3.reset(out_, in_);
      g3.add(sh, x.data() + s0 * in_ * hw, dyp);
      g3.finish(1.0f, false, dw_parts + p * wsize);
    });
    add_dw_parts(parts.count());
    return;
  }
  if (dx) dx->resize(x.shape());
  FloatGroupProducts products{dw_parts, wsize};
  if (backward_by_groups(n, h, w, x.data(), dy.data(), weight_.value.data(),
                         dx ? dx->data() : nullptr, products)) {
    // dW[o, c, ky, kx] += (sum over parts of dWt)[c, o, k-1-ky, k-1-kx].
    sum_parts(dw_parts, parts.count(), wsize);
    const int k = kernel_;
    parallel_for(in_, [&](int64_t c) {
      for (int64_t o = 0; o < out_; ++o)
        for (int ky = 0; ky < k; ++ky)
          for (int kx = 0; kx < k; ++kx)
            weight_.grad[((o * in_ + c) * k + ky) * k + kx] +=
                dw_parts[flipped_index(o, c, ky, kx)];
    });
    return;
  }
  add_dw_parts(parts.count());
}

void Conv2d::add_dw_parts(int64_t count) {
  const int64_t wsize = weight_.value.numel(), per_out = wsize / out_;
  sum_parts(dw_parts_.data(), count, wsize);
  parallel_for(out_, [&](int64_t o) {
    for (int64_t j = o * per_out; j < (o + 1) * per_out; ++j) weight_.grad[j] += dw_parts_[j];
  });
}

}  // namespace int4ddp::nn
