// BatchNorm (see layer.h), with an optional fused ReLU. Each channel's sums run on one thread in
// sample order in double lanes, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/common/parallel.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {
namespace {

// BatchNorm's reductions: 8 independent double accumulators in a fixed order, so the sum is
// deterministic yet not one latency-bound chain (a single double accumulator cannot be vectorised
// without reassociation).
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

}  // namespace int4ddp::nn
