// Quantization diagnostics: E(G), E(G_L) and the large-gradient threshold tracker. Sums are in
// double (the figures are reported, never fed back into codes); gamma_L is float like lbt's gamma.
#include "kernels/quant/diagnostics.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/common/error.h"
#include "kernels/quant/policy.h"

namespace int4ddp::quant {
namespace {

constexpr uint8_t kTrackerMagic[4] = {'I', '4', 'L', 'T'};
constexpr uint8_t kTrackerVersion = 1;
constexpr size_t kTrackerStateBytes = 12;

void check_buffer(const float* x, int64_t n, const char* what) {
  INT4DDP_CHECK(n >= 0, what, ": count = ", n, " is negative");
  INT4DDP_CHECK(n == 0 || x != nullptr, what, ": null buffer for ", n, " elements");
}

float clamp_gamma(float g) { return std::min(std::max(g, kMinGamma), kMaxGamma); }

}  // namespace

QuantError quantization_error(const float* x, const float* xhat, int64_t n, float gamma_large) {
  check_buffer(x, n, "quantization_error");
  check_buffer(xhat, n, "quantization_error");
  QuantError e;
  for (int64_t i = 0; i < n; ++i)
    if (is_finite_value(x[i])) e.absmax = std::max(e.absmax, std::fabs(x[i]));
  const float threshold = gamma_large * e.absmax;
  double sum = 0.0, sum_large = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_finite_value(x[i]) || !is_finite_value(xhat[i])) continue;
    const double err = std::fabs(static_cast<double>(xhat[i]) - static_cast<double>(x[i]));
    ++e.finite;
    sum += err;
    if (std::fabs(x[i]) > threshold) {
      ++e.large;
      sum_large += err;
    }
  }
  if (e.absmax > 0.0f) {
    const double scale = static_cast<double>(e.absmax);
    if (e.finite > 0) e.error = sum / static_cast<double>(e.finite) / scale;
    if (e.large > 0) e.error_large = sum_large / static_cast<double>(e.large) / scale;
  }
  return e;
}

LargeGradientTracker::LargeGradientTracker(double alpha, float eta, bool init_from_quantile)
    : alpha_(alpha), eta_(eta), init_from_quantile_(init_from_quantile) {
  INT4DDP_CHECK(std::isfinite(alpha) && alpha > 0.0 && alpha < 1.0,
                "large-gradient tracker: alpha = ", alpha, " is outside (0, 1)");
  INT4DDP_CHECK(std::isfinite(eta) && eta > 0.0f && eta <= 1.0f,
                "large-gradient tracker: eta = ", eta, " is outside (0, 1]");
}

float LargeGradientTracker::gamma_for(const float* x, int64_t n) {
  if (started_ || !init_from_quantile_) {
    started_ = true;
    return gamma_;
  }
  check_buffer(x, n, "large-gradient tracker");
  std::vector<float> mags;
  mags.reserve(static_cast<size_t>(n));
  float absmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_finite_value(x[i])) continue;
    mags.push_back(std::fabs(x[i]));
    absmax = std::max(absmax, mags.back());
  }
  if (!(absmax > 0.0f)) return gamma_;  // nothing to learn from: try the next tensor
  const int64_t finite = static_cast<int64_t>(mags.size());
  const int64_t k =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(alpha_ * static_cast<double>(finite))));
  if (k >= finite) {
    gamma_ = kMinGamma;
  } else {
    // The (k+1)-th largest magnitude: the k above it are the large ones (fewer with ties).
    const auto nth = mags.begin() + (finite - 1 - k);
    std::nth_element(mags.begin(), nth, mags.end());
    gamma_ = clamp_gamma(*nth / absmax);
  }
  started_ = true;
  return gamma_;
}

void LargeGradientTracker::observe(int64_t large, int64_t finite) {
  INT4DDP_CHECK(large >= 0 && large <= finite, "large-gradient tracker: large = ", large,
                " is outside 0..", finite);
  if (finite == 0) return;
  const double r = static_cast<double>(large) / static_cast<double>(finite);
  const int s = (r > alpha_) - (r < alpha_);
  gamma_ = clamp_gamma(gamma_ + eta_ * static_cast<float>(s));
  started_ = true;
}

std::vector<uint8_t> LargeGradientTracker::save_state() const {
  std::vector<uint8_t> out(kTrackerMagic, kTrackerMagic + 4);
  out.push_back(kTrackerVersion);
  out.push_back(started_ ? 1 : 0);
  out.push_back(0);
  out.push_back(0);
  uint8_t g[sizeof(float)];
  std::memcpy(g, &gamma_, sizeof g);
  out.insert(out.end(), g, g + sizeof g);
  return out;
}

void LargeGradientTracker::load_state(const uint8_t* data, size_t nbytes) {
  INT4DDP_CHECK(nbytes == kTrackerStateBytes && data != nullptr,
                "large-gradient tracker state: blob is ", nbytes, " bytes, expected ",
                kTrackerStateBytes);
  INT4DDP_CHECK(std::memcmp(data, kTrackerMagic, 4) == 0,
                "large-gradient tracker state: not a tracker state blob (bad magic)");
  INT4DDP_CHECK(data[4] == kTrackerVersion, "large-gradient tracker state: version ", int{data[4]},
                " is not supported (expected ", int{kTrackerVersion}, ")");
  INT4DDP_CHECK(data[5] <= 1, "large-gradient tracker state: started flag is ", int{data[5]});
  float gamma;
  std::memcpy(&gamma, data + 8, sizeof gamma);
  INT4DDP_CHECK(gamma >= kMinGamma && gamma <= kMaxGamma,
                "large-gradient tracker state: gamma = ", gamma, " is outside [", kMinGamma, ", ",
                kMaxGamma, "]");
  gamma_ = gamma;
  started_ = data[5] == 1;
}

TensorDiagnostics diagnose(const float* x, const float* xhat, int64_t n, const QuantStats& stats,
                           LargeGradientTracker& tracker) {
  TensorDiagnostics d;
  d.clip_fraction = stats.clip_fraction();
  d.nonfinite = stats.nonfinite;
  d.gamma_large = tracker.gamma_for(x, n);
  const QuantError e = quantization_error(x, xhat, n, d.gamma_large);
  d.error = e.error;
  d.error_large = e.error_large;
  d.large = e.large;
  if (stats.nonfinite == 0 && e.absmax > 0.0f) tracker.observe(e.large, e.finite);
  return d;
}

}  // namespace int4ddp::quant
