// Diagnostics (kernels/quant/diagnostics.h): E(G) and E(G_L) on hand-computed examples, the
// large-gradient tracker's convergence to the top-alpha threshold, its state, and diagnose().
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/diagnostics.h"
#include "kernels/quant/policy.h"

namespace int4ddp::quant {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(Diagnostics, HandComputedErrors) {
  // |x^ - x| = {0.25, 0, 0.5, 0.5}, max|x| = 4: E(G) = (1.25 / 4) / 4.
  // gamma_L = 0.4: threshold 1.6, large = {-2, 4} with errors {0, 0.5}: E(G_L) = (0.5 / 2) / 4.
  const std::vector<float> x = {1.0f, -2.0f, 4.0f, 0.5f};
  const std::vector<float> xhat = {1.25f, -2.0f, 3.5f, 0.0f};
  const QuantError e = quantization_error(x.data(), xhat.data(), 4, 0.4f);
  EXPECT_EQ(e.absmax, 4.0f);
  EXPECT_EQ(e.finite, 4);
  EXPECT_EQ(e.large, 2);
  EXPECT_DOUBLE_EQ(e.error, 0.078125);
  EXPECT_DOUBLE_EQ(e.error_large, 0.0625);
  // The threshold is strict: gamma_L = 0.5 puts it at 2, so -2 is no longer large.
  const QuantError f = quantization_error(x.data(), xhat.data(), 4, 0.5f);
  EXPECT_EQ(f.large, 1);
  EXPECT_DOUBLE_EQ(f.error_large, 0.125);
  // gamma_L = 1: nothing is above max|x|.
  const QuantError g = quantization_error(x.data(), xhat.data(), 4, 1.0f);
  EXPECT_EQ(g.large, 0);
  EXPECT_EQ(g.error_large, 0.0);
}

TEST(Diagnostics, SkipsNonFiniteAndHandlesZeros) {
  // NaN and Inf are left out of max|x| and of both means: finite = {1 -> 1.5, -4 -> -4}.
  const std::vector<float> x = {1.0f, kNaN, -4.0f, kInf, -kInf};
  const std::vector<float> xhat = {1.5f, 0.0f, -4.0f, 0.0f, 0.0f};
  const QuantError e = quantization_error(x.data(), xhat.data(), 5, 0.5f);
  EXPECT_EQ(e.absmax, 4.0f);
  EXPECT_EQ(e.finite, 2);
  EXPECT_EQ(e.large, 1);
  EXPECT_DOUBLE_EQ(e.error, (0.5 / 2.0) / 4.0);
  EXPECT_DOUBLE_EQ(e.error_large, 0.0);
  const std::vector<float> zeros(8, 0.0f);
  const QuantError z = quantization_error(zeros.data(), zeros.data(), 8, 0.5f);
  EXPECT_EQ(z.error, 0.0);
  EXPECT_EQ(z.error_large, 0.0);
  EXPECT_EQ(z.absmax, 0.0f);
  const QuantError empty = quantization_error(nullptr, nullptr, 0, 0.5f);
  EXPECT_EQ(empty.finite, 0);
  EXPECT_THROW(quantization_error(nullptr, nullptr, 3, 0.5f), Error);
}

TEST(Diagnostics, ErrorsOfARealQuantizationAreBounded) {
  // Nearest rounding with gamma = 1 never clips, so every |x^ - x| <= d / 2 = max|x| / (2 L):
  // E(G), E(G_L) <= 1 / (2 L). Independent of how the errors are averaged.
  std::mt19937_64 rng(3);
  std::normal_distribution<float> gauss;
  std::vector<float> x(10000), xhat(10000);
  for (auto& v : x) v = gauss(rng);
  for (int bits : {2, 4, 8}) {
    QuantParams p;
    p.bits = bits;
    std::vector<uint8_t> codes(static_cast<size_t>(packed_bytes(bits, 10000)));
    float scale;
    quantize_ref(x.data(), 10000, p, codes.data(), &scale);
    dequantize_ref(codes.data(), &scale, 10000, bits, 0, xhat.data());
    const QuantError e = quantization_error(x.data(), xhat.data(), 10000, 0.5f);
    const double bound = 1.0 / (2.0 * levels(bits)) * (1.0 + 1e-6);
    EXPECT_GT(e.error, 0.0);
    EXPECT_LE(e.error, bound);
    EXPECT_LE(e.error_large, bound);
    EXPECT_GT(e.large, 0);
  }
}

// On a fixed tensor the sign rule settles into a two-step oscillation around the gamma where the
// count of |x| > gamma * max|x| crosses alpha * n, so the threshold ends within one step
// (eta * max|x|) of the empirical top-alpha magnitude. Float slack: a few ulps of max|x|.
TEST(Diagnostics, TrackerThresholdConvergesToTheAlphaQuantile) {
  constexpr int64_t kN = 100000;
  constexpr double kAlpha = 1e-2;
  constexpr float kEta = 1e-3f;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> gauss;
  std::vector<float> x(kN);
  for (auto& v : x) v = gauss(rng);
  std::vector<float> mags(kN);
  for (int64_t i = 0; i < kN; ++i) mags[i] = std::fabs(x[i]);
  std::sort(mags.begin(), mags.end(), std::greater<float>());
  const int64_t k = static_cast<int64_t>(kAlpha * kN);  // 1000 large ones
  const float absmax = mags[0];
  // Thresholds in [mags[k], mags[k-1]) leave exactly k above.
  const float q_lo = mags[k], q_hi = mags[k - 1];

  LargeGradientTracker tracker(kAlpha, kEta, /*init_from_quantile=*/false);
  EXPECT_EQ(tracker.gamma(), 1.0f);
  for (int step = 0; step < 800; ++step) {  // 1 -> ~0.6 takes ~400 steps
    const float gamma = tracker.gamma_for(x.data(), kN);
    const QuantError e = quantization_error(x.data(), x.data(), kN, gamma);
    tracker.observe(e.large, e.finite);
    if (step >= 700) {
      const float thr = gamma * absmax;
      EXPECT_GE(thr, q_lo - kEta * absmax * 1.001f) << "step " << step;
      EXPECT_LE(thr, q_hi + kEta * absmax * 1.001f) << "step " << step;
    }
  }
  // The quantile start lands there at once: k = ceil(alpha n) above (no ties in Gaussian floats
  // at this n with overwhelming probability; allow the one-element float rounding either way).
  LargeGradientTracker quick(kAlpha, kEta, /*init_from_quantile=*/true);
  EXPECT_FALSE(quick.started());
  const float g0 = quick.gamma_for(x.data(), kN);
  EXPECT_TRUE(quick.started());
  const QuantError e = quantization_error(x.data(), x.data(), kN, g0);
  EXPECT_NEAR(static_cast<double>(e.large), static_cast<double>(k), 1.0);
  EXPECT_EQ(quick.gamma_for(x.data(), kN), g0) << "only the first call initialises";
}

TEST(Diagnostics, TrackerSignRuleAndEdgeCases) {
  // alpha and eta exact in binary, so the expected gammas below are exact.
  LargeGradientTracker t(0.25, 0.125f, false);
  t.observe(1, 4);  // R_L == alpha: no move
  EXPECT_EQ(t.gamma(), 1.0f);
  t.observe(0, 4);  // too few large ones: gamma_L falls
  EXPECT_EQ(t.gamma(), 0.875f);
  t.observe(2, 4);  // too many: rises
  EXPECT_EQ(t.gamma(), 1.0f);
  t.observe(4, 4);  // clamped at 1
  EXPECT_EQ(t.gamma(), 1.0f);
  t.observe(0, 0);  // nothing seen: no-op
  EXPECT_EQ(t.gamma(), 1.0f);
  for (int i = 0; i < 20; ++i) t.observe(0, 4);
  EXPECT_EQ(t.gamma(), kMinGamma);
  EXPECT_THROW(t.observe(5, 4), Error);
  EXPECT_THROW(LargeGradientTracker(0.0), Error);
  EXPECT_THROW(LargeGradientTracker(1e-3, 0.0f), Error);
  // The quantile start waits for a tensor that is not all zero.
  LargeGradientTracker q(0.1);
  const std::vector<float> zeros(10, 0.0f);
  EXPECT_EQ(q.gamma_for(zeros.data(), 10), 1.0f);
  EXPECT_FALSE(q.started());
  // 10 elements, alpha 0.1: k = 1 large one, gamma_L = second largest / max.
  const std::vector<float> x = {0.1f, -8.0f, 0.3f, 2.0f, kNaN, 0.5f, -0.2f, 0.0f, 1.0f, 0.4f};
  EXPECT_EQ(q.gamma_for(x.data(), 10), 2.0f / 8.0f);
}

TEST(Diagnostics, TrackerStateRoundTripsAndRejectsBadBlobs) {
  LargeGradientTracker a(1e-2, 1e-2f);
  auto run = [](LargeGradientTracker& t, uint64_t seed) {
    std::mt19937_64 r(seed);
    std::normal_distribution<float> gauss;
    std::vector<float> x(2000);
    for (auto& v : x) v = gauss(r);
    const QuantError e = quantization_error(x.data(), x.data(), 2000, t.gamma_for(x.data(), 2000));
    t.observe(e.large, e.finite);
    return t.gamma();
  };
  for (uint64_t s = 0; s < 5; ++s) run(a, s);
  const std::vector<uint8_t> blob = a.save_state();
  ASSERT_EQ(blob.size(), 12u);
  LargeGradientTracker b(1e-2, 1e-2f);
  b.load_state(blob.data(), blob.size());
  EXPECT_TRUE(b.started());
  EXPECT_EQ(b.gamma(), a.gamma());
  for (uint64_t s = 5; s < 30; ++s) EXPECT_EQ(run(b, s), run(a, s)) << "step " << s;
  for (size_t len = 0; len < blob.size(); ++len)
    EXPECT_THROW(b.load_state(blob.data(), len), Error);
  std::vector<uint8_t> bad = blob;
  bad[1] = 'P';  // a policy blob's magic
  EXPECT_THROW(b.load_state(bad.data(), bad.size()), Error);
  bad = blob;
  bad[4] = 2;
  EXPECT_THROW(b.load_state(bad.data(), bad.size()), Error);
  bad = blob;
  const float nan = kNaN;
  std::memcpy(bad.data() + 8, &nan, sizeof nan);
  EXPECT_THROW(b.load_state(bad.data(), bad.size()), Error);
}

TEST(Diagnostics, DiagnoseCombinesStatsErrorsAndTracker) {
  std::mt19937_64 rng(8);
  std::normal_distribution<float> gauss;
  std::vector<float> x(4000), xhat(4000);
  for (auto& v : x) v = gauss(rng);
  QuantParams p;
  p.gamma = 0.7f;
  std::vector<uint8_t> codes(2000);
  float scale;
  QuantStats st = quantize(x.data(), 4000, p, codes.data(), &scale);
  dequantize(codes.data(), &scale, 4000, 4, 0, xhat.data());
  LargeGradientTracker tracker(1e-2);
  const TensorDiagnostics d = diagnose(x.data(), xhat.data(), 4000, st, tracker);
  const QuantError e = quantization_error(x.data(), xhat.data(), 4000, d.gamma_large);
  EXPECT_EQ(d.clip_fraction, st.clip_fraction());
  EXPECT_GT(d.clip_fraction, 0.0);
  EXPECT_EQ(d.error, e.error);
  EXPECT_EQ(d.error_large, e.error_large);
  EXPECT_EQ(d.large, e.large);
  EXPECT_EQ(d.nonfinite, 0);
  // Clipping at 0.7 max|x| hurts the large gradients most.
  EXPECT_GT(d.error_large, d.error);
  // The tracker moved by one sign-rule step after the step.
  LargeGradientTracker ref(1e-2);
  ref.gamma_for(x.data(), 4000);
  ref.observe(e.large, e.finite);
  EXPECT_EQ(tracker.gamma(), ref.gamma());
  // A step with non-finite elements leaves the tracker alone.
  const float before = tracker.gamma();
  x[10] = kNaN;
  st = quantize(x.data(), 4000, p, codes.data(), &scale);
  ASSERT_EQ(st.nonfinite, 1);
  const TensorDiagnostics bad = diagnose(x.data(), xhat.data(), 4000, st, tracker);
  EXPECT_EQ(bad.nonfinite, 1);
  EXPECT_EQ(tracker.gamma(), before);
}

}  // namespace
}  // namespace int4ddp::quant
