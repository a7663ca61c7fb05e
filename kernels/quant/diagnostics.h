// Per-tensor quantization diagnostics (DESIGN.md section 2), for a layer or a bucket:
//   R       clip fraction of the step (QuantStats::clip_fraction)
//   E(G)    mean |Q(g) - g| / max|G| over the finite elements
//   E(G_L)  the same mean over the "large" gradients: |g| > gamma_L * max|G|, where gamma_L
//           tracks the top-alpha magnitudes with lbt's sign rule (target alpha, not t)
// max|G| is the codec's: over finite elements. Non-finite elements of g (or of Q(g)) are skipped.
// The tracker's state is one float gamma_L, updated in float like the lbt policy's gamma.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/quant/codec.h"

namespace int4ddp::quant {

struct QuantError {
  double error = 0.0;        // E(G): mean |x^ - x| / max|x| over finite elements (0 if none)
  double error_large = 0.0;  // E(G_L): the same mean over the large elements (0 if there are none)
  int64_t finite = 0;        // elements in the E(G) mean
  int64_t large = 0;         // elements in the E(G_L) mean: finite, |x| > gamma_large * max|x|
  float absmax = 0.0f;       // max|x| over the finite elements
};

// E(G) and E(G_L) of x (n elements) and its dequantized xhat; large means |x| > gamma_large *
// max|x| (the float product, compared as the codec compares). An all-zero x gives zeros.
QuantError quantization_error(const float* x, const float* xhat, int64_t n, float gamma_large);

// Tracks gamma_L so that about an alpha fraction of each tensor is "large".
class LargeGradientTracker {
 public:
  // init_from_quantile: on the first tensor, set gamma_L from its exact top-alpha magnitude (so
  // E(G_L) means something from step 0); otherwise start at gamma_L = 1 and let the sign rule walk.
  explicit LargeGradientTracker(double alpha = 1e-3, float eta = 1e-3f,
                                bool init_from_quantile = true);

  double alpha() const { return alpha_; }
  float gamma() const { return gamma_; }  // gamma_L, in [kMinGamma, kMaxGamma]
  bool started() const { return started_; }

  // gamma_L to use for this tensor. The first call (with init_from_quantile) sets gamma_L to
  // v / max|x|, v the (k+1)-th largest finite magnitude, k = ceil(alpha * finite); an all-zero or
  // empty x leaves the tracker unstarted.
  float gamma_for(const float* x, int64_t n);

  // Sign rule after the step: R_L = large / finite;
  // gamma_L <- clamp(gamma_L + eta * sign(R_L - alpha), kMinGamma, kMaxGamma). finite == 0: no-op.
  void observe(int64_t large, int64_t finite);

  // "I4LT" magic, u8 version, u8 started, u16 0, f32 gamma_L (host byte order, 12 bytes).
  // load_state throws Error on another magic or version or the wrong length.
  std::vector<uint8_t> save_state() const;
  void load_state(const uint8_t* data, size_t nbytes);

 private:
  double alpha_;
  float eta_;
  bool init_from_quantile_;
  float gamma_ = 1.0f;
  bool started_ = false;
};

struct TensorDiagnostics {
  double clip_fraction = 0.0;  // R
  double error = 0.0;          // E(G)
  double error_large = 0.0;    // E(G_L)
  int64_t large = 0;           // |G_L|
  int64_t nonfinite = 0;       // NaN/Inf elements of the step
  float gamma_large = 0.0f;    // gamma_L used for G_L this step
};

// One step: R and the non-finite count from stats, E(G) and E(G_L) with the tracker's gamma_L, then
// the tracker's update (skipped for a step with non-finite elements, as the trainer skips it).
TensorDiagnostics diagnose(const float* x, const float* xhat, int64_t n, const QuantStats& stats,
                           LargeGradientTracker& tracker);

}  // namespace int4ddp::quant
