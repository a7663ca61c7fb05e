// fp32 layers (see layer.h for the contract): the batch-part helpers, Linear, ReLU, pooling,
// Sequential, ResidualBlock and the loss. Conv2d and BatchNorm have their own files. Parameters are
// accumulated (+=) in backward.
#include <cxxabi.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <typeinfo>

#include "kernels/common/parallel.h"
#include "kernels/math/gemm.h"
#include "kernels/quant/codec.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

using math::sgemm;
using math::Trans;

namespace {

int64_t features_of(const Tensor& x) { return x.rank() == 0 ? 0 : x.numel() / x.dim(0); }

}  // namespace

Param make_param(const std::string& name, Shape shape, bool decay) {
  Param p;
  p.name = name;
  p.shape = shape;
  p.decay = decay;
  p.value = Tensor(shape);
  p.grad = Tensor(shape);
  return p;
}

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
  params_ready();  // dW and db are final: their all-reduce may start while dx is computed
  if (dx) {
    dx->resize(x.shape());
    // dx[:, c0:c1] = dy W[:, c0:c1] per block of input features.
    for_feature_blocks(in_, [&](int64_t c0, int64_t c1) {
      sgemm(Trans::kNo, Trans::kNo, n, c1 - c0, out_, 1.0f, dy.data(), out_,
            weight_.value.data() + c0, in_, 0.0f, dx->data() + c0, in_);
    });
  }
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

namespace {

// MaxPool2d's scan step: v (at index i of the plane) replaces the running maximum when it is
// larger, or when it is a NaN and the maximum is not (the first NaN wins over numbers).
inline void pool_take(float v, int32_t i, float& best, int32_t& arg) {
  const bool take = v > best || (std::isnan(v) && !std::isnan(best));
  best = take ? v : best;
  arg = take ? i : arg;
}

// One output row of a window-2, stride-2, unpadded pool: rows r0, r1 of the plane (r0 starts at
// plane index i0), outputs ox in [from, wo). The four candidates in MaxPool2d::forward's row-major
// order with its rule, so the same maximum and argmax.
void pool2x2_row(const float* r0, const float* r1, int32_t i0, int32_t w, int64_t from, int64_t wo,
                 float* y, int32_t* arg) {
  for (int64_t ox = from; ox < wo; ++ox) {
    const int32_t i = i0 + 2 * static_cast<int32_t>(ox);
    float best = r0[2 * ox];
    int32_t a = i;
    pool_take(r0[2 * ox + 1], i + 1, best, a);
    pool_take(r1[2 * ox], i + w, best, a);
    pool_take(r1[2 * ox + 1], i + w + 1, best, a);
    y[ox] = best;
    arg[ox] = a;
  }
}

// pool_take on 8 lanes: the ordered > and the unordered self-compares are the scalar rule's
// operands; the blend copies v (a NaN with its payload, as the scalar assignment does).
__attribute__((target("avx2"))) inline void pool_take8(__m256 v, __m256i i, __m256& best,
                                                       __m256i& arg) {
  const __m256 take = _mm256_or_ps(
      _mm256_cmp_ps(v, best, _CMP_GT_OQ),
      _mm256_andnot_ps(_mm256_cmp_ps(best, best, _CMP_UNORD_Q), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  best = _mm256_blendv_ps(best, v, take);
  arg =
      _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg), _mm256_castsi256_ps(i), take));
}

// The even (odd = false) or odd columns of the 16 floats lo, hi, in order.
__attribute__((target("avx2"))) inline __m256 pool_columns(__m256 lo, __m256 hi, bool odd) {
  const __m256 s = odd ? _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1))
                       : _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), _MM_SHUFFLE(3, 1, 2, 0)));
}

// The 8-output steps of a row of wo outputs: row_steps8 of them (none when wo < 8: the scalar
// loop does the row), starting at 0, 8, ...; a last partial step moves back to wo - 8 (it redoes
// a few outputs, with the same results), so a row of at least 8 outputs has no scalar tail.
inline int64_t row_steps8(int64_t wo) { return wo < 8 ? 0 : (wo + 7) / 8; }
inline int64_t row_step8(int64_t step, int64_t wo) { return std::min(step * 8, wo - 8); }

// pool2x2_row for 8 outputs at a time (the loads stay inside the rows: 2 * wo <= w); returns
// the first output it left to the scalar loop.
__attribute__((target("avx2"))) int64_t pool2x2_row_avx2(const float* r0, const float* r1,
                                                         int32_t i0, int32_t w, int64_t wo,
                                                         float* y, int32_t* arg) {
  const __m256i lanes = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i one = _mm256_set1_epi32(1), down = _mm256_set1_epi32(w);
  const int64_t steps = row_steps8(wo);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t ox = row_step8(step, wo);
    const __m256 a0 = _mm256_loadu_ps(r0 + 2 * ox), a1 = _mm256_loadu_ps(r0 + 2 * ox + 8);
    const __m256 b0 = _mm256_loadu_ps(r1 + 2 * ox), b1 = _mm256_loadu_ps(r1 + 2 * ox + 8);
    const __m256i i = _mm256_add_epi32(_mm256_set1_epi32(i0 + 2 * static_cast<int32_t>(ox)), lanes);
    __m256 best = pool_columns(a0, a1, false);
    __m256i a = i;
    pool_take8(pool_columns(a0, a1, true), _mm256_add_epi32(i, one), best, a);
    pool_take8(pool_columns(b0, b1, false), _mm256_add_epi32(i, down), best, a);
    pool_take8(pool_columns(b0, b1, true), _mm256_add_epi32(_mm256_add_epi32(i, down), one), best,
               a);
    _mm256_storeu_ps(y + ox, best);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(arg + ox), a);
  }
  return steps > 0 ? wo : 0;
}

}  // namespace

MaxPool2d::MaxPool2d(std::string name, int window, int stride, int pad)
    : name_(std::move(name)), window_(window), stride_(stride), pad_(pad) {
  INT4DDP_CHECK(window >= 1 && stride >= 1 && pad >= 0 && 2 * pad <= window, name_,
                ": bad pooling geometry (window ", window, ", stride ", stride, ", pad ", pad,
                "): needs window >= 1, stride >= 1 and 0 <= pad <= window / 2");
}

void MaxPool2d::size_outputs(const Tensor& x, Tensor& y) {
  INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not NCHW");
  const int64_t c = x.dim(1), h = x.dim(2), w = x.dim(3);
  INT4DDP_CHECK(h + 2 * pad_ >= window_ && w + 2 * pad_ >= window_, name_, ": input ",
                shape_str(x.shape()), " is too small for a window of ", window_);
  INT4DDP_CHECK(h * w <= std::numeric_limits<int32_t>::max(), name_, ": input ",
                shape_str(x.shape()), " has planes too large for int32 argmax indices");
  const int64_t ho = out_size(h), wo = out_size(w);
  y.resize({x.dim(0), c, ho, wo});
  argmax_.resize(static_cast<size_t>(x.dim(0) * c * ho * wo));
}

void MaxPool2d::forward(const Tensor& x, Tensor& y, bool) {
  size_outputs(x, y);
  if (window_ == 2 && stride_ == 2 && pad_ == 0)
    forward_2x2(x, y);
  else
    scan_reference(x, y);
}

void MaxPool2d::forward_reference(const Tensor& x, Tensor& y) {
  size_outputs(x, y);
  scan_reference(x, y);
}

void MaxPool2d::forward_2x2(const Tensor& x, Tensor& y) {
  static const bool avx2 = quant::isa_allows(quant::Isa::kAvx2);
  const int64_t c = x.dim(1), h = x.dim(2), w = x.dim(3), ho = y.dim(2), wo = y.dim(3);
  const int32_t w32 = static_cast<int32_t>(w);
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    for (int64_t p = s0 * c; p < s1 * c; ++p)
      for (int64_t oy = 0; oy < ho; ++oy) {
        const float* r0 = x.data() + (p * h + 2 * oy) * w;
        const int32_t i0 = static_cast<int32_t>(2 * oy * w);
        float* yr = y.data() + (p * ho + oy) * wo;
        int32_t* ar = argmax_.data() + (p * ho + oy) * wo;
        const int64_t done = avx2 ? pool2x2_row_avx2(r0, r0 + w, i0, w32, wo, yr, ar) : 0;
        pool2x2_row(r0, r0 + w, i0, w32, done, wo, yr, ar);
      }
  });
}

void MaxPool2d::scan_reference(const Tensor& x, Tensor& y) {
  const int64_t c = x.dim(1), h = x.dim(2), w = x.dim(3), ho = y.dim(2), wo = y.dim(3);
  for_parts(x.dim(0), [&](int64_t s0, int64_t s1) {
    for (int64_t p = s0 * c; p < s1 * c; ++p) {
      const float* plane = x.data() + p * h * w;
      for (int64_t oy = 0; oy < ho; ++oy) {
        // The window clipped to the plane: padding never wins, so it is simply not visited (pad <=
        // window / 2 keeps every clipped window non-empty).
        const int64_t y0 = std::max<int64_t>(0, oy * stride_ - pad_);
        const int64_t y1 = std::min<int64_t>(h, oy * stride_ - pad_ + window_);
        for (int64_t ox = 0; ox < wo; ++ox) {
          const int64_t x0 = std::max<int64_t>(0, ox * stride_ - pad_);
          const int64_t x1 = std::min<int64_t>(w, ox * stride_ - pad_ + window_);
          float best = plane[y0 * w + x0];
          int64_t arg = y0 * w + x0;
          // Row-major scan, strict > : the first maximum wins; the first NaN wins over numbers.
          for (int64_t iy = y0; iy < y1; ++iy)
            for (int64_t ix = x0; ix < x1; ++ix) {
              const float v = plane[iy * w + ix];
              if (v > best || (std::isnan(v) && !std::isnan(best))) best = v, arg = iy * w + ix;
            }
          y[(p * ho + oy) * wo + ox] = best;
          argmax_[static_cast<size_t>((p * ho + oy) * wo + ox)] = static_cast<int32_t>(arg);
        }
      }
    }
  });
}

void MaxPool2d::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  const int64_t c = x.dim(1), hw = x.dim(2) * x.dim(3);
  const int64_t howo = y.dim(2) * y.dim(3);
  dx->resize(x.shape());
  // Overlapping windows (stride < window) add into the same element: each plane is one thread's,
  // in output order, so the sums do not depend on the thread count.
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

std::vector<float*> Sequential::device_buffers() {
  std::vector<float*> out;
  for (auto& l : layers_)
    for (float* b : l->device_buffers()) out.push_back(b);
  return out;
}

const Tensor& Sequential::forward_output(const Tensor& x, bool train) {
  INT4DDP_CHECK(!layers_.empty(), name_, ": no layers");
  acts_.resize(layers_.size());
  const Tensor* in = &x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    {
      profile::Scope scope(*layers_[i], true);
      layers_[i]->forward(*in, acts_[i], train);
    }
    in = &acts_[i];
  }
  return acts_.back();
}

void Sequential::forward(const Tensor& x, Tensor& y, bool train) {
  y.copy_from(forward_output(x, train));  // on the layers' device (host or GPU)
}

void Sequential::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  grads_.resize(2);
  const Tensor* upstream = &dy;
  for (size_t i = layers_.size(); i-- > 0;) {
    const Tensor& in = i == 0 ? x : acts_[i - 1];
    Tensor* out = i == 0 ? dx : &grads_[i % 2];
    if (hook_) layers_[i]->set_params_ready([this, i] { hook_(i); });
    {
      profile::Scope scope(*layers_[i], false);
      layers_[i]->backward(in, acts_[i], *upstream, out);
    }
    upstream = out;
    if (hook_) {
      layers_[i]->set_params_ready({});
      hook_(i);
    }
  }
}

// ---- ResidualBlock --------------------------------------------------------------------------

ResidualBlock::ResidualBlock(std::string name, std::unique_ptr<Layer> conv1, int64_t mid_channels,
                             std::unique_ptr<Layer> conv2, int64_t in_channels,
                             int64_t out_channels, int stride, std::unique_ptr<Layer> projection)
    : name_(name),
      body_(name + ".body"),
      shortcut_(name + ".shortcut"),
      in_channels_(in_channels),
      out_channels_(out_channels),
      stride_(stride) {
  INT4DDP_CHECK(stride == 1 || stride == 2, name_, ": stride must be 1 or 2");
  if (projection) {
    shortcut_.add(std::move(projection));
    shortcut_.add(std::make_unique<BatchNorm>(name + ".shortcut.bn", out_channels));
  } else {
    INT4DDP_CHECK(out_channels >= in_channels, name_, ": option-A shortcut cannot drop channels");
  }
  body_.add(std::move(conv1));
  body_.add(BatchNorm::with_relu(name + ".bn1", mid_channels));  // + relu1
  body_.add(std::move(conv2));
  body_.add(std::make_unique<BatchNorm>(name + ".bn2", out_channels));
}

std::vector<Param*> ResidualBlock::params() {
  std::vector<Param*> out = body_.params();
  for (Param* p : shortcut_.params()) out.push_back(p);
  return out;
}

std::vector<std::vector<float>*> ResidualBlock::buffers() {
  std::vector<std::vector<float>*> out = body_.buffers();
  for (std::vector<float>* b : shortcut_.buffers()) out.push_back(b);
  return out;
}

void ResidualBlock::forward(const Tensor& x, Tensor& y, bool train) {
  body_out_ = &body_.forward_output(x, train);
  const Tensor& body_out = *body_out_;
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = body_out.dim(2), wo = body_out.dim(3);
  INT4DDP_CHECK(body_out.dim(1) == out_channels_ && (h + stride_ - 1) / stride_ == ho &&
                    (w + stride_ - 1) / stride_ == wo,
                name_, ": body output ", shape_str(body_out.shape()), " does not match stride ",
                stride_, " of input ", shape_str(x.shape()));
  y.resize(body_out.shape());
  const int64_t hw = ho * wo;
  if (has_projection()) {
    shortcut_out_ = &shortcut_.forward_output(x, train);
    const Tensor& shortcut_out = *shortcut_out_;
    INT4DDP_CHECK(shortcut_out.shape() == body_out.shape(), name_, ": projection output ",
                  shape_str(shortcut_out.shape()), " does not match the body output ",
                  shape_str(body_out.shape()));
    const int64_t per = out_channels_ * hw;
    for_parts(n, [&](int64_t s0, int64_t s1) {
      const float* __restrict b = body_out.data();
      const float* __restrict sc = shortcut_out.data();
      float* __restrict q = y.data();
      for (int64_t i = s0 * per; i < s1 * per; ++i) {
        const float v = b[i] + sc[i];
        q[i] = v > 0.0f ? v : 0.0f;
      }
    });
    return;
  }
  // Option A: channel c < in_channels takes x[c] subsampled by stride; the rest are zero.
  for_parts(n, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i)
      for (int64_t c = 0; c < out_channels_; ++c) {
        const float* __restrict b = body_out.data() + (i * out_channels_ + c) * hw;
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
  INT4DDP_CHECK(body_out_ != nullptr, name_, ": backward before forward");
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
  body_.backward(x, *body_out_, dsum, dx);
  if (has_projection()) {
    shortcut_.backward(x, *shortcut_out_, dsum, dx ? &dshortcut_ : nullptr);
    if (!dx) return;
    const int64_t in_per = in_channels_ * h * w;
    for_parts(n, [&](int64_t s0, int64_t s1) {
      const float* __restrict d = dshortcut_.data();
      float* __restrict q = dx->data();
      for (int64_t i = s0 * in_per; i < s1 * in_per; ++i) q[i] += d[i];
    });
    return;
  }
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

// ---- profile ---------------------------------------------------------------------------------

namespace profile {
namespace {

using Clock = std::chrono::steady_clock;
struct Frame {
  std::string key;
  Clock::time_point start;
  double children = 0.0;  // seconds spent in scopes nested in this one
};
struct State {
  bool on = false;
  std::vector<Frame> stack;
  std::map<std::string, std::pair<double, int64_t>> totals;  // key -> (seconds, calls)
};
State& state() {
  static State s;
  return s;
}

// "int4ddp::nn::QConv2d" -> "QConv2d".
std::string type_label(const std::type_info& t) {
  int status = 0;
  char* d = abi::__cxa_demangle(t.name(), nullptr, nullptr, &status);
  std::string name = status == 0 && d ? d : t.name();
  std::free(d);
  const size_t colon = name.rfind("::");
  return colon == std::string::npos ? name : name.substr(colon + 2);
}

}  // namespace

void enable(bool on) { state().on = on; }
bool enabled() { return state().on; }
void reset() { state().totals.clear(); }

std::vector<Entry> entries() {
  std::vector<Entry> out;
  for (const auto& [key, v] : state().totals) out.push_back({key, v.first, v.second});
  std::sort(out.begin(), out.end(),
            [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
  return out;
}

Scope::Scope(const char* key) {
  if (state().on) open(key);
}

Scope::Scope(const Layer& layer, bool forward) {
  if (state().on) open(type_label(typeid(layer)) + (forward ? " fwd" : " bwd"));
}

void Scope::open(std::string key) {
  active_ = true;
  state().stack.push_back({std::move(key), Clock::now(), 0.0});
}

Scope::~Scope() {
  if (!active_) return;
  State& s = state();
  Frame f = std::move(s.stack.back());
  s.stack.pop_back();
  const double elapsed = std::chrono::duration<double>(Clock::now() - f.start).count();
  auto& total = s.totals[f.key];
  total.first += elapsed - f.children;
  total.second += 1;
  if (!s.stack.empty()) s.stack.back().children += elapsed;
}

}  // namespace profile

}  // namespace int4ddp::nn
