// fp32 layers (see layer.h for the contract). Parameters are accumulated (+=) in backward.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/common/parallel.h"
#include "kernels/math/gemm.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

using math::sgemm;
using math::Trans;

namespace {

Param make_param(const std::string& name, Shape shape, bool decay) {
  Param p;
  p.name = name;
  p.shape = shape;
  p.decay = decay;
  p.value = Tensor(shape);
  p.grad = Tensor(shape);
  return p;
}

int64_t features_of(const Tensor& x) { return x.rank() == 0 ? 0 : x.numel() / x.dim(0); }

// Reductions for BatchNorm and pooling: 8 independent double accumulators in a fixed order, so the
// sum is deterministic yet not one latency-bound chain (a single double accumulator cannot be
// vectorised without reassociation, and was 20% of a cnn training step).
constexpr int kLanes = 8;

struct Sums {
  double a[kLanes] = {};
  double total() const { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }
};

// Eight double lanes and eight floats as GCC/Clang vector extensions: one AVX-512 register (or
// two AVX2 ones) natively, SSE2 pairs in the portable build. Written out because GCC did not
// vectorise the equivalent lane loops below (two sums in one loop). Lane l of a Sums is the
// sum over elements j == l (mod 8) of a row, so the results do not depend on the vector width.
// Vectors are loaded and stored with memcpy, never passed by value (their ABI differs by build).
typedef double Doubles8 __attribute__((vector_size(kLanes * sizeof(double))));
typedef float Floats8 __attribute__((vector_size(kLanes * sizeof(float))));

// s += x[j] - shift and s2 += (x[j] - shift)^2 in double: BatchNorm's batch moments in one pass
// over x. The shift (a value of the channel) keeps s2 - s^2 / count well conditioned when
// |mean| >> std; the subtraction is exact in double. next: the row read after this one, prefetched
// (a channel's rows are c * hw floats apart, so the hardware prefetcher restarts on each).
void accumulate_moments(const float* x, const float* next, int64_t n, double shift, Sums* s,
                        Sums* s2) {
  Doubles8 ls, ls2;
  std::memcpy(&ls, s->a, sizeof ls);
  std::memcpy(&ls2, s2->a, sizeof ls2);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Floats8 xf;
    __builtin_prefetch(next + j);
    std::memcpy(&xf, x + j, sizeof xf);
    const Doubles8 d = __builtin_convertvector(xf, Doubles8) - shift;
    ls += d;
    ls2 += d * d;
  }
  std::memcpy(s->a, &ls, sizeof ls);
  std::memcpy(s2->a, &ls2, sizeof ls2);
  for (int l = 0; j < n; ++j, ++l) {
    const double d = static_cast<double>(x[j]) - shift;
    s->a[l] += d;
    s2->a[l] += d * d;
  }
}

// a += d[j] and b += d[j] * (x[j] - mean) in double (BatchNorm's backward sums, one pass over d
// and x; sum(d * xhat) = invstd * b). With kRelu, d[j] counts only where x[j] * scale + shift > 0:
// the fused ReLU's mask, recomputed from x with the forward's own float expression (no FMA
// contraction in this project), so it is exactly y > 0 without reading y. dnext, xnext: the rows
// read after these, prefetched (as in accumulate_moments).
template <bool kRelu>
void accumulate_dy_moments(const float* d, const float* x, const float* dnext, const float* xnext,
                           int64_t n, double mean, float scale, float shift, Sums* a, Sums* b) {
  Doubles8 la, lb;
  std::memcpy(&la, a->a, sizeof la);
  std::memcpy(&lb, b->a, sizeof lb);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Floats8 xf, df;
    __builtin_prefetch(xnext + j);
    __builtin_prefetch(dnext + j);
    std::memcpy(&xf, x + j, sizeof xf);
    std::memcpy(&df, d + j, sizeof df);
    if (kRelu) df = xf * scale + shift > 0.0f ? df : Floats8{};
    const Doubles8 dd = __builtin_convertvector(df, Doubles8);
    la += dd;
    lb += dd * (__builtin_convertvector(xf, Doubles8) - mean);
  }
  std::memcpy(a->a, &la, sizeof la);
  std::memcpy(b->a, &lb, sizeof lb);
  for (int l = 0; j < n; ++j, ++l) {
    const float dj = !kRelu || x[j] * scale + shift > 0.0f ? d[j] : 0.0f;
    a->a[l] += dj;
    b->a[l] += dj * (static_cast<double>(x[j]) - mean);
  }
}

}  // namespace

void sum_parts(float* parts, int64_t count, int64_t size) {
  constexpr int64_t kBlock = 4096;  // elements per work item
  parallel_for((size + kBlock - 1) / kBlock, [&](int64_t b) {
    const int64_t j0 = b * kBlock, j1 = std::min(size, j0 + kBlock);
    float* __restrict acc = parts;
    for (int64_t p = 1; p < count; ++p) {
      const float* __restrict part = parts + p * size;
      for (int64_t j = j0; j < j1; ++j) acc[j] += part[j];
    }
  });
}

void for_parts(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  const BatchParts parts{n};
  parallel_for(parts.count(), [&](int64_t p) { body(parts.begin(p), parts.end(p)); });
}

void for_feature_blocks(int64_t dim, const std::function<void(int64_t, int64_t)>& body) {
  // At least 64 features per block (narrower GEMMs lose speed), at most 16 blocks.
  const int64_t block = std::max<int64_t>(64, ((dim + 15) / 16 + 15) / 16 * 16);
  parallel_for((dim + block - 1) / block,
               [&](int64_t b) { body(b * block, std::min(dim, (b + 1) * block)); });
}

// ---- Linear ---------------------------------------------------------------------------------

Linear::Linear(std::string name, int64_t in, int64_t out, bool bias)
    : name_(std::move(name)), in_(in), out_(out), has_bias_(bias) {
  INT4DDP_CHECK(in > 0 && out > 0, name_, ": features must be positive");
  weight_ = make_param(name_ + ".weight", {out, in}, true);
  if (has_bias_) bias_ = make_param(name_ + ".bias", {out}, false);
}

std::vector<Param*> Linear::params() {
  if (has_bias_) return {&weight_, &bias_};
  return {&weight_};
}

void Linear::forward(const Tensor& x, Tensor& y, bool) {
  const int64_t n = x.dim(0);
  INT4DDP_CHECK(features_of(x) == in_, name_, ": input ", shape_str(x.shape()), " has ",
                features_of(x), " features, expected ", in_);
  y.resize({n, out_});
  // y[:, j0:j1] = x W[j0:j1, :]^T per block of output features.
  for_feature_blocks(out_, [&](int64_t j0, int64_t j1) {
    sgemm(Trans::kNo, Trans::kYes, n, j1 - j0, in_, 1.0f, x.data(), in_,
          weight_.value.data() + j0 * in_, in_, 0.0f, y.data() + j0, out_);
    if (has_bias_)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = j0; j < j1; ++j) y[i * out_ + j] += bias_.value[j];
  });
}

void Linear::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0);
  // dW[j0:j1, :] (+)= dy[:, j0:j1]^T x and the bias sums, per block of output features.
  for_feature_blocks(out_, [&](int64_t j0, int64_t j1) {
    sgemm(Trans::kYes, Trans::kNo, j1 - j0, in_, n, 1.0f, dy.data() + j0, out_, x.data(), in_, 1.0f,
          weight_.grad.data() + j0 * in_, in_);
    if (has_bias_)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = j0; j < j1; ++j) bias_.grad[j] += dy[i * out_ + j];
  });
  if (dx) {
    dx->resize(x.shape());
    // dx[:, c0:c1] = dy W[:, c0:c1] per block of input features.
    for_feature_blocks(in_, [&](int64_t c0, int64_t c1) {
      sgemm(Trans::kNo, Trans::kNo, n, c1 - c0, out_, 1.0f, dy.data(), out_,
            weight_.value.data() + c0, in_, 0.0f, dx->data() + c0, in_);
    });
  }
}

// ---- Conv2d ---------------------------------------------------------------------------------
//
// Every product runs over a group of samples at once: the group's im2col columns sit side by side
// in one (rows, g * ho * wo) matrix (sample s at column offset s * ho * wo), so the GEMM's N is g
// times larger than one sample's while the column buffer stays about kColumnBytes (in L2). A
// stride-1 convolution computes dx as the convolution of dy with the flipped, transposed kernel
// (im2col of dy + one GEMM), not as W^T dy followed by the col2im scatter.

namespace {

// Default column-buffer budget of one group, well inside the 2 MiB per-core L2 of the machines we
// measure (128 KiB to 1 MiB measured the same on resnet20; 2 MiB was 8% slower).
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

// col rows r = (c * k + ky) * k + kx, each `ld` floats apart; sample s of the group writes columns
// s * ho * wo .. (s + 1) * ho * wo - 1 of every row from images + (s0 + s) * channels * h * w.
void im2col_group(const float* images, int64_t s0, int64_t g, int64_t channels, int64_t h,
                  int64_t w, int k, int stride, int pad, int64_t ho, int64_t wo, float* col) {
  const int64_t hw = ho * wo, ld = g * hw;
  // Stride 1 with "same" width (wo == w): the valid rows oy of one (c, ky, kx) row of col are ONE
  // contiguous stretch of the image shifted by kx - pad, so they are one block copy plus a zero at
  // the left or right edge of each output row (the 28-float row copies were most of im2col).
  const bool same_width = stride == 1 && wo == w;
  for (int64_t s = 0; s < g; ++s) {
    const float* image = images + (s0 + s) * channels * h * w;
    for (int64_t c = 0; c < channels; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          float* row = col + ((c * k + ky) * k + kx) * ld + s * hw;
          const float* plane = image + c * h * w;
          int64_t x0, x1;
          inside_columns(w, wo, kx, stride, pad, &x0, &x1);
          if (same_width) {
            int64_t y0, y1;  // output rows whose input row lies inside the image
            inside_columns(h, ho, ky, 1, pad, &y0, &y1);
            std::fill(row, row + y0 * wo, 0.0f);
            std::fill(row + y1 * wo, row + hw, 0.0f);
            // row[y0*wo + j] = plane[base + j] for j in [0, len), reading only inside the plane.
            const int64_t base = (y0 - pad + ky) * w + kx - pad, len = (y1 - y0) * wo;
            const int64_t jlo = std::max<int64_t>(0, -base);
            const int64_t jhi = std::max(jlo, std::min(len, h * w - base));
            float* out = row + y0 * wo;
            std::fill(out, out + jlo, 0.0f);
            std::memcpy(out + jlo, plane + base + jlo,
                        sizeof(float) * static_cast<size_t>(jhi - jlo));
            std::fill(out + jhi, out + len, 0.0f);
            // Edge columns (at most pad of them on each side), walked down the rows: per-row
            // loops of 0 or 1 element became a memset call per output row.
            for (int64_t ox = 0; ox < x0; ++ox)
              for (int64_t oy = y0; oy < y1; ++oy) row[oy * wo + ox] = 0.0f;
            for (int64_t ox = x1; ox < wo; ++ox)
              for (int64_t oy = y0; oy < y1; ++oy) row[oy * wo + ox] = 0.0f;
            continue;
          }
          for (int64_t oy = 0; oy < ho; ++oy) {
            float* out = row + oy * wo;
            const int64_t iy = oy * stride - pad + ky;
            if (iy < 0 || iy >= h) {
              for (int64_t ox = 0; ox < wo; ++ox) out[ox] = 0.0f;
              continue;
            }
            const float* in = plane + iy * w - pad + kx;
            for (int64_t ox = 0; ox < x0; ++ox) out[ox] = 0.0f;
            for (int64_t ox = x0; ox < x1; ++ox) out[ox] = in[ox * stride];
            for (int64_t ox = x1; ox < wo; ++ox) out[ox] = 0.0f;
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

void Conv2d::im2col(const float* images, int64_t s0, int64_t g, int64_t h, int64_t w,
                    float* col) const {
  im2col_group(images, s0, g, in_, h, w, kernel_, stride_, pad_, out_size(h), out_size(w), col);
}

void Conv2d::col2im(const float* col, int64_t s0, int64_t g, int64_t h, int64_t w,
                    float* images) const {
  col2im_group(col, s0, g, in_, h, w, kernel_, stride_, pad_, out_size(h), out_size(w), images);
}

bool Conv2d::dx_by_transposed_conv() const { return stride_ == 1 && pad_ <= kernel_ - 1; }

void Conv2d::dy_im2col(const float* dy, int64_t s0, int64_t g, int64_t h, int64_t w,
                       float* col) const {
  // dx[c, iy, ix] = sum_{o, ky, kx} W[o, c, ky, kx] dy[o, iy + pad - ky, ix + pad - kx]: the
  // stride-1 convolution of dy (padded by k - 1 - pad) with the kernel flipped in y and x.
  im2col_group(dy, s0, g, out_, out_size(h), out_size(w), kernel_, 1, kernel_ - 1 - pad_, h, w,
               col);
}

void Conv2d::flip_weight(const float* w, float* wt) const {
  const int k = kernel_;
  for (int64_t o = 0; o < out_; ++o)
    for (int64_t c = 0; c < in_; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx)
          wt[flipped_index(o, c, ky, kx)] = w[((o * in_ + c) * k + ky) * k + kx];
}

void Conv2d::gather_group(const float* src, int64_t s0, int64_t g, int64_t rows, int64_t hw,
                          float* dst) {
  for (int64_t s = 0; s < g; ++s)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + r * g * hw + s * hw, src + ((s0 + s) * rows + r) * hw,
                  sizeof(float) * static_cast<size_t>(hw));
}

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

bool Conv2d::direct3x3() const {
  return direct_conv_ && kernel_ == 3 && stride_ == 1 && pad_ == 1 &&
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
  const bool direct = direct3x3();
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
  const int64_t ho = y.dim(2), wo = y.dim(3), ckk = in_ * kernel_ * kernel_, hw = ho * wo;
  const int64_t okk = out_ * kernel_ * kernel_, wsize = out_ * ckk;
  const BatchParts parts{n};
  if (has_bias_)  // one thread, sample order: a fixed summation order
    for (int64_t s = 0; s < n; ++s)
      for (int64_t o = 0; o < out_; ++o) {
        const float* d = dy.data() + (s * out_ + o) * hw;
        for (int64_t q = 0; q < hw; ++q) bias_.grad[o] += d[q];
      }
  // dW: one partial per part (groups accumulated in order within it), summed in part order below.
  float* dw_parts = grow_scratch(dw_parts_, parts.count() * wsize);
  if (direct3x3()) {
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
  if (dx && dx_by_transposed_conv()) {
    // Both products from one im2col of dy (out*k*k, g*h*w), none of x:
    //   dx_g (in, g*h*w) = flip(W) (in, out*k*k) im2col(dy_g)
    //   dWt (in, out*k*k) += x_g (in, g*h*w) im2col(dy_g)^T, dW = dWt with the taps unflipped.
    const int64_t gmax = part_group_size(n, okk, h * w), ihw = h * w;
    dx->resize(x.shape());
    flip_weight(weight_.value.data(), grow_scratch(wt_, in_ * okk));
    parallel_for(parts.count(), [&](int64_t p) {
      GroupScratch& sc = group_scratch();
      float* dcol = grow_scratch(sc.dcol, okk * gmax * ihw);
      float* in_buf = grow_scratch(sc.in, in_ * gmax * ihw);
      float* x_buf = grow_scratch(sc.x, in_ * gmax * ihw);
      float* dwt = dw_parts + p * wsize;
      for (int64_t s0 = parts.begin(p); s0 < parts.end(p); s0 += gmax) {
        const int64_t g = std::min(gmax, parts.end(p) - s0), icols = g * ihw;
        dy_im2col(dy.data(), s0, g, h, w, dcol);
        const float* xg = x.data() + s0 * in_ * ihw;
        if (g > 1) {
          gather_group(x.data(), s0, g, in_, ihw, x_buf);
          xg = x_buf;
        }
        sgemm(Trans::kNo, Trans::kYes, in_, okk, icols, 1.0f, xg, icols, dcol, icols,
              s0 == parts.begin(p) ? 0.0f : 1.0f, dwt, okk);
        float* dxg = g == 1 ? dx->data() + s0 * in_ * ihw : in_buf;
        sgemm(Trans::kNo, Trans::kNo, in_, icols, okk, 1.0f, wt_.data(), okk, dcol, icols, 0.0f,
              dxg, icols);
        if (g > 1) scatter_group(dxg, s0, g, in_, ihw, dx->data());
      }
    });
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
  const int64_t gmax = part_group_size(n, ckk, hw);
  if (dx) dx->resize(x.shape());
  parallel_for(parts.count(), [&](int64_t p) {
    GroupScratch& sc = group_scratch();
    float* col = grow_scratch(sc.col, ckk * gmax * hw);
    float* buf = grow_scratch(sc.out, out_ * gmax * hw);
    float* dcol = dx ? grow_scratch(sc.dcol, ckk * gmax * hw) : nullptr;
    float* dwp = dw_parts + p * wsize;
    if (dx) {
      const int64_t per_sample = in_ * h * w;
      std::fill(dx->data() + parts.begin(p) * per_sample, dx->data() + parts.end(p) * per_sample,
                0.0f);
    }
    for (int64_t s0 = parts.begin(p); s0 < parts.end(p); s0 += gmax) {
      const int64_t g = std::min(gmax, parts.end(p) - s0), cols = g * hw;
      im2col(x.data(), s0, g, h, w, col);
      const float* dyg = dy.data() + s0 * out_ * hw;
      if (g > 1) {
        gather_group(dy.data(), s0, g, out_, hw, buf);
        dyg = buf;
      }
      // dW_part (out, ckk) (+)= dy_g (out, cols) col^T (cols, ckk)
      sgemm(Trans::kNo, Trans::kYes, out_, ckk, cols, 1.0f, dyg, cols, col, cols,
            s0 == parts.begin(p) ? 0.0f : 1.0f, dwp, ckk);
      if (!dx) continue;
      // dcol (ckk, cols) = W^T (ckk, out) dy_g (out, cols), scattered back by col2im
      sgemm(Trans::kYes, Trans::kNo, ckk, cols, out_, 1.0f, weight_.value.data(), ckk, dyg, cols,
            0.0f, dcol, cols);
      col2im(dcol, s0, g, h, w, dx->data());
    }
  });
  add_dw_parts(parts.count());
}

void Conv2d::add_dw_parts(int64_t count) {
  const int64_t wsize = weight_.value.numel(), per_out = wsize / out_;
  sum_parts(dw_parts_.data(), count, wsize);
  parallel_for(out_, [&](int64_t o) {
    for (int64_t j = o * per_out; j < (o + 1) * per_out; ++j) weight_.grad[j] += dw_parts_[j];
  });
}

// ---- BatchNorm ------------------------------------------------------------------------------

BatchNorm::BatchNorm(std::string name, int64_t channels, float momentum, float eps)
    : name_(std::move(name)), channels_(channels), momentum_(momentum), eps_(eps) {
  gamma_ = make_param(name_ + ".gamma", {channels}, false);
  beta_ = make_param(name_ + ".beta", {channels}, false);
  std::fill(gamma_.value.data(), gamma_.value.data() + channels, 1.0f);
  running_mean_.assign(static_cast<size_t>(channels), 0.0f);
  running_var_.assign(static_cast<size_t>(channels), 1.0f);
}

std::unique_ptr<BatchNorm> BatchNorm::with_relu(std::string name, int64_t channels) {
  auto bn = std::make_unique<BatchNorm>(std::move(name), channels);
  bn->relu_ = true;
  return bn;
}

std::vector<Param*> BatchNorm::params() { return {&gamma_, &beta_}; }

void BatchNorm::forward(const Tensor& x, Tensor& y, bool train) {
  INT4DDP_CHECK(x.rank() >= 2 && x.dim(1) == channels_, name_, ": input ", shape_str(x.shape()),
                " does not have ", channels_, " channels");
  const int64_t n = x.dim(0), c = channels_, hw = x.numel() / (n * c);
  y.resize(x.shape());
  mean_.resize(static_cast<size_t>(c));
  invstd_.resize(static_cast<size_t>(c));
  scale_.resize(static_cast<size_t>(c));
  shift_.resize(static_cast<size_t>(c));
  const double count = static_cast<double>(n * hw);
  // Channels in parallel: each channel's sums run on one thread in sample order (thread-count
  // independent, and the same as a one-thread loop).
  parallel_for(c, [&](int64_t ch) {
    float mean, var;
    if (train) {
      // One pass for both moments, shifted by the channel's first value (see accumulate_moments).
      const double origin = n * hw > 0 ? static_cast<double>(x.data()[ch * hw]) : 0.0;
      Sums sum, sum2;
      for (int64_t i = 0; i < n; ++i)
        accumulate_moments(x.data() + (i * c + ch) * hw,
                           x.data() + (std::min(i + 1, n - 1) * c + ch) * hw, hw, origin, &sum,
                           &sum2);
      const double s = sum.total(), s2 = sum2.total();
      const double m = s / count;                   // mean - origin
      const double ss = std::max(0.0, s2 - s * m);  // sum of (x - mean)^2
      mean = static_cast<float>(origin + m);
      var = static_cast<float>(ss / count);
      const float unbiased = count > 1 ? static_cast<float>(ss / (count - 1)) : var;
      running_mean_[ch] = (1 - momentum_) * running_mean_[ch] + momentum_ * mean;
      running_var_[ch] = (1 - momentum_) * running_var_[ch] + momentum_ * unbiased;
    } else {
      mean = running_mean_[ch];
      var = running_var_[ch];
    }
    const float invstd = 1.0f / std::sqrt(var + eps_);
    const float g = gamma_.value[ch] * invstd, b = beta_.value[ch] - mean * g;
    mean_[ch] = mean;
    invstd_[ch] = invstd;
    scale_[ch] = g;
    shift_[ch] = b;
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict p = x.data() + (i * c + ch) * hw;
      float* __restrict q = y.data() + (i * c + ch) * hw;
      // The next output row, prefetched for writing (x's rows come from L2 after the sums).
      const float* next = y.data() + (std::min(i + 1, n - 1) * c + ch) * hw;
      for (int64_t j = 0; j < hw; j += 16) __builtin_prefetch(next + j, 1);
      if (relu_)
        for (int64_t j = 0; j < hw; ++j) {
          const float v = p[j] * g + b;
          q[j] = v > 0.0f ? v : 0.0f;
        }
      else
        for (int64_t j = 0; j < hw; ++j) q[j] = p[j] * g + b;
    }
  });
}

void BatchNorm::backward(const Tensor& x, const Tensor& /*y*/, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), c = channels_, hw = x.numel() / (n * c);
  const double count = static_cast<double>(n * hw);
  if (dx) dx->resize(x.shape());
  parallel_for(c, [&](int64_t ch) {
    const float mean = mean_[ch], invstd = invstd_[ch], fwd_scale = scale_[ch],
                fwd_shift = shift_[ch];
    // With the fused ReLU the gradient reaching BN is dy where y > 0, else 0 (as the ReLU layer
    // would pass it); y > 0 exactly where x * fwd_scale + fwd_shift > 0 (the forward's float
    // expression, no contraction), so x and dy are the only streams read.
    Sums a, b;
    for (int64_t i = 0; i < n; ++i) {
      const float* p = x.data() + (i * c + ch) * hw;
      const float* d = dy.data() + (i * c + ch) * hw;
      const int64_t o = (std::min(i + 1, n - 1) * c + ch) * hw;
      if (relu_)
        accumulate_dy_moments<true>(d, p, dy.data() + o, x.data() + o, hw, mean, fwd_scale,
                                    fwd_shift, &a, &b);
      else
        accumulate_dy_moments<false>(d, p, dy.data() + o, x.data() + o, hw, mean, fwd_scale,
                                     fwd_shift, &a, &b);
    }
    const double sdy = a.total(), sdy_xhat = invstd * b.total();
    gamma_.grad[ch] += static_cast<float>(sdy_xhat);
    beta_.grad[ch] += static_cast<float>(sdy);
    if (!dx) return;
    // Training-mode gradient: dx = g * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
    // = g * dy - (x - mean) * k - g * mean(dy) with k = g * invstd * mean(dy * xhat).
    const float g = gamma_.value[ch] * invstd;
    const float gmdy = static_cast<float>(g * (sdy / count));
    const float k = static_cast<float>(g * invstd * (sdy_xhat / count));
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict p = x.data() + (i * c + ch) * hw;
      const float* __restrict d = dy.data() + (i * c + ch) * hw;
      float* __restrict q = dx->data() + (i * c + ch) * hw;
      // The next output row, prefetched for writing (as in forward).
      const float* next = dx->data() + (std::min(i + 1, n - 1) * c + ch) * hw;
      for (int64_t j = 0; j < hw; j += 16) __builtin_prefetch(next + j, 1);
      if (relu_) {
        for (int64_t j = 0; j < hw; ++j) {
          const float dj = p[j] * fwd_scale + fwd_shift > 0.0f ? d[j] : 0.0f;
          q[j] = (g * dj - (p[j] - mean) * k) - gmdy;
        }
      } else {
        for (int64_t j = 0; j < hw; ++j) q[j] = (g * d[j] - (p[j] - mean) * k) - gmdy;
      }
    }
  });
}

// ---- ReLU, pooling --------------------------------------------------------------------------

void ReLU::forward(const Tensor& x, Tensor& y, bool) {
  y.resize(x.shape());
  const int64_t per = x.numel() / std::max<int64_t>(1, x.dim(0));
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    const float* __restrict in = x.data();
    float* __restrict out = y.data();
    for (int64_t i = s0 * per; i < s1 * per; ++i) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
  });
}

void ReLU::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  dx->resize(x.shape());
  const int64_t per = x.numel() / std::max<int64_t>(1, x.dim(0));
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    const float* __restrict in = x.data();
    const float* __restrict g = dy.data();
    float* __restrict out = dx->data();
    for (int64_t i = s0 * per; i < s1 * per; ++i) out[i] = in[i] > 0.0f ? g[i] : 0.0f;
  });
}

void MaxPool2d::forward(const Tensor& x, Tensor& y, bool) {
  INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not NCHW");
  const int64_t c = x.dim(1), h = x.dim(2), w = x.dim(3);
  const int64_t ho = h / window_, wo = w / window_;
  INT4DDP_CHECK(ho > 0 && wo > 0, name_, ": input ", shape_str(x.shape()), " is too small");
  y.resize({x.dim(0), x.dim(1), ho, wo});
  argmax_.resize(static_cast<size_t>(x.dim(0) * c * ho * wo));
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    for (int64_t p = s0 * c; p < s1 * c; ++p)
      for (int64_t oy = 0; oy < ho; ++oy)
        for (int64_t ox = 0; ox < wo; ++ox) {
          float best = -std::numeric_limits<float>::infinity();
          int32_t arg = static_cast<int32_t>((oy * window_) * w + ox * window_);
          for (int dy = 0; dy < window_; ++dy)
            for (int dx = 0; dx < window_; ++dx) {
              const int32_t idx = static_cast<int32_t>((oy * window_ + dy) * w + ox * window_ + dx);
              const float v = x[p * h * w + idx];
              if (v > best) best = v, arg = idx;
            }
          y[(p * ho + oy) * wo + ox] = best;
          argmax_[static_cast<size_t>((p * ho + oy) * wo + ox)] = arg;
        }
  });
}

void MaxPool2d::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  const int64_t c = x.dim(1), hw = x.dim(2) * x.dim(3);
  const int64_t howo = y.dim(2) * y.dim(3);
  dx->resize(x.shape());
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    std::fill(dx->data() + s0 * c * hw, dx->data() + s1 * c * hw, 0.0f);
    for (int64_t p = s0 * c; p < s1 * c; ++p)
      for (int64_t o = 0; o < howo; ++o)
        (*dx)[p * hw + argmax_[static_cast<size_t>(p * howo + o)]] += dy[p * howo + o];
  });
}

void GlobalAvgPool::forward(const Tensor& x, Tensor& y, bool) {
  INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not NCHW");
  const int64_t c = x.dim(1), hw = x.dim(2) * x.dim(3);
  y.resize({x.dim(0), x.dim(1)});
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    for (int64_t p = s0 * c; p < s1 * c; ++p) {
      double s = 0.0;
      for (int64_t j = 0; j < hw; ++j) s += x[p * hw + j];
      y[p] = static_cast<float>(s / static_cast<double>(hw));
    }
  });
}

void GlobalAvgPool::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  const int64_t c = x.dim(1), hw = x.dim(2) * x.dim(3);
  dx->resize(x.shape());
  const float inv = 1.0f / static_cast<float>(hw);
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    for (int64_t p = s0 * c; p < s1 * c; ++p)
      for (int64_t j = 0; j < hw; ++j) (*dx)[p * hw + j] = dy[p] * inv;
  });
}

// ---- Sequential -----------------------------------------------------------------------------

Layer& Sequential::add(std::unique_ptr<Layer> layer) {
  layers_.push_back(std::move(layer));
  return *layers_.back();
}

std::vector<Param*> Sequential::params() {
  std::vector<Param*> out;
  for (auto& l : layers_)
    for (Param* p : l->params()) out.push_back(p);
  return out;
}

std::vector<std::vector<float>*> Sequential::buffers() {
  std::vector<std::vector<float>*> out;
  for (auto& l : layers_)
    for (std::vector<float>* b : l->buffers()) out.push_back(b);
  return out;
}

void Sequential::forward(const Tensor& x, Tensor& y, bool train) {
  INT4DDP_CHECK(!layers_.empty(), name_, ": no layers");
  acts_.resize(layers_.size());
  const Tensor* in = &x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(*in, acts_[i], train);
    in = &acts_[i];
  }
  y.resize(acts_.back().shape());
  std::memcpy(y.data(), acts_.back().data(), sizeof(float) * static_cast<size_t>(y.numel()));
}

void Sequential::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  grads_.resize(2);
  const Tensor* upstream = &dy;
  for (size_t i = layers_.size(); i-- > 0;) {
    const Tensor& in = i == 0 ? x : acts_[i - 1];
    Tensor* out = i == 0 ? dx : &grads_[i % 2];
    layers_[i]->backward(in, acts_[i], *upstream, out);
    upstream = out;
    if (hook_) hook_(i);
  }
}

// ---- ResidualBlock --------------------------------------------------------------------------

ResidualBlock::ResidualBlock(std::string name, std::unique_ptr<Layer> conv1, int64_t mid_channels,
                             std::unique_ptr<Layer> conv2, int64_t in_channels,
                             int64_t out_channels, int stride)
    : name_(name),
      body_(name + ".body"),
      in_channels_(in_channels),
      out_channels_(out_channels),
      stride_(stride) {
  INT4DDP_CHECK(stride == 1 || stride == 2, name_, ": stride must be 1 or 2");
  INT4DDP_CHECK(out_channels >= in_channels, name_, ": option-A shortcut cannot drop channels");
  body_.add(std::move(conv1));
  body_.add(BatchNorm::with_relu(name + ".bn1", mid_channels));  // + relu1
  body_.add(std::move(conv2));
  body_.add(std::make_unique<BatchNorm>(name + ".bn2", out_channels));
}

std::vector<Param*> ResidualBlock::params() { return body_.params(); }

void ResidualBlock::forward(const Tensor& x, Tensor& y, bool train) {
  body_.forward(x, body_out_, train);
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = body_out_.dim(2), wo = body_out_.dim(3);
  INT4DDP_CHECK(body_out_.dim(1) == out_channels_ && (h + stride_ - 1) / stride_ == ho &&
                    (w + stride_ - 1) / stride_ == wo,
                name_, ": body output ", shape_str(body_out_.shape()), " does not match stride ",
                stride_, " of input ", shape_str(x.shape()));
  y.resize(body_out_.shape());
  // Shortcut: channel c < in_channels takes x[c] subsampled by stride; the rest are zero.
  const int64_t hw = ho * wo;
  for_parts(n, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i)
      for (int64_t c = 0; c < out_channels_; ++c) {
        const float* __restrict b = body_out_.data() + (i * out_channels_ + c) * hw;
        float* __restrict q = y.data() + (i * out_channels_ + c) * hw;
        if (c >= in_channels_) {
          for (int64_t p = 0; p < hw; ++p) q[p] = b[p] > 0.0f ? b[p] : 0.0f;
          continue;
        }
        const float* __restrict xs = x.data() + (i * in_channels_ + c) * h * w;
        if (stride_ == 1) {
          for (int64_t p = 0; p < hw; ++p) {
            const float v = b[p] + xs[p];
            q[p] = v > 0.0f ? v : 0.0f;
          }
          continue;
        }
        for (int64_t oy = 0; oy < ho; ++oy)
          for (int64_t ox = 0; ox < wo; ++ox) {
            const float v = b[oy * wo + ox] + xs[(oy * stride_) * w + ox * stride_];
            q[oy * wo + ox] = v > 0.0f ? v : 0.0f;
          }
      }
  });
}

void ResidualBlock::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = y.dim(2), wo = y.dim(3), hw = ho * wo;
  Tensor& dsum = dsum_;  // reused: a fresh buffer per step page-faults
  dsum.resize(y.shape());
  const int64_t per = out_channels_ * hw;
  for_parts(n, [&](int64_t s0, int64_t s1) {
    const float* __restrict yp = y.data();
    const float* __restrict gp = dy.data();
    float* __restrict sp = dsum.data();
    for (int64_t i = s0 * per; i < s1 * per; ++i) sp[i] = yp[i] > 0.0f ? gp[i] : 0.0f;
  });
  // dx = the body's dx, plus the shortcut's gradient added in place.
  body_.backward(x, body_out_, dsum, dx);
  if (!dx) return;
  for_parts(n, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i)
      for (int64_t c = 0; c < in_channels_; ++c) {
        const float* __restrict d = dsum.data() + (i * out_channels_ + c) * hw;
        float* __restrict q = dx->data() + (i * in_channels_ + c) * h * w;
        if (stride_ == 1) {
          for (int64_t p = 0; p < hw; ++p) q[p] += d[p];
          continue;
        }
        for (int64_t oy = 0; oy < ho; ++oy)
          for (int64_t ox = 0; ox < wo; ++ox)
            q[(oy * stride_) * w + ox * stride_] += d[oy * wo + ox];
      }
  });
}

// ---- loss -----------------------------------------------------------------------------------

float softmax_cross_entropy(const Tensor& logits, const int32_t* labels, Tensor* dlogits,
                            int64_t* correct) {
  INT4DDP_CHECK(logits.rank() == 2, "cross-entropy: logits ", shape_str(logits.shape()),
                " are not (n, classes)");
  const int64_t n = logits.dim(0), k = logits.dim(1);
  if (dlogits) dlogits->resize(logits.shape());
  double loss = 0.0;
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits.data() + i * k;
    const int32_t label = labels[i];
    INT4DDP_CHECK(label >= 0 && label < k, "cross-entropy: label ", label, " of sample ", i,
                  " is outside 0..", k - 1);
    const int64_t arg = std::max_element(z, z + k) - z;
    hits += arg == label;
    const float zmax = z[arg];
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(static_cast<double>(z[j] - zmax));
    loss += std::log(s) - (z[label] - zmax);
    if (dlogits)
      for (int64_t j = 0; j < k; ++j) {
        const double p = std::exp(static_cast<double>(z[j] - zmax)) / s;
        (*dlogits)[i * k + j] = static_cast<float>((p - (j == label)) / static_cast<double>(n));
      }
  }
  if (correct) *correct = hits;
  return static_cast<float>(loss / static_cast<double>(n));
}

}  // namespace int4ddp::nn
