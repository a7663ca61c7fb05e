// The interval policies of policy.h and the lbt calibration. The sign rule and the calibration loop
// are float arithmetic on gamma in a fixed order (the build never contracts into FMAs), and the
// calibration's plain and fast versions share one loop body, so they agree bit for bit.
#include "kernels/quant/policy.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/common/error.h"

namespace int4ddp::quant {
namespace {

constexpr uint8_t kStateMagic[4] = {'I', '4', 'P', 'S'};
constexpr uint8_t kStateVersion = 1;
constexpr size_t kStateHeaderBytes = 8;  // magic, kind, version, u16 payload bytes

// Calibration constants, straight from the paper (DESIGN.md section 2).
constexpr double kEmaDecay = 0.999;
constexpr double kEmaWeight = 0.001;
constexpr float kCalibrationStep = 1e-3f;
// gamma falls 1e-3 per s = -1 iteration, so at most ~1000 of those; only an exact m == t fixed
// point (s = 0 forever) could reach this cap.
constexpr int64_t kMaxCalibrationIterations = 100000;

int sign_of(double v) { return (v > 0.0) - (v < 0.0); }

float clamp_gamma(float g) { return std::min(std::max(g, kMinGamma), kMaxGamma); }

// The calibration loop. count_above(thr) returns #{finite g : fabsf(g) > thr}.
template <typename CountAbove>
float calibration_loop(const CountAbove& count_above, int64_t n, float absmax, double target) {
  float gamma = 1.0f;
  double m = 0.0;
  for (int64_t it = 0;; ++it) {
    INT4DDP_CHECK(it < kMaxCalibrationIterations, "lbt calibration: no convergence after ", it,
                  " iterations (gamma = ", gamma, ", m = ", m, ", t = ", target, ")");
    const float threshold = gamma * absmax;
    const double r = static_cast<double>(count_above(threshold)) / static_cast<double>(n);
    m = kEmaDecay * m + kEmaWeight * r;
    const int s = sign_of(m - target);
    gamma = gamma + kCalibrationStep * static_cast<float>(s);
    if (s > 0) break;
    if (gamma <= 0.0f) break;  // gamma never rises again before the exit: the clamp gives kMinGamma
  }
  return clamp_gamma(gamma);
}

void check_buffer(const float* x, int64_t n, const char* what) {
  INT4DDP_CHECK(n >= 0, what, ": count = ", n, " is negative");
  INT4DDP_CHECK(n == 0 || x != nullptr, what, ": null buffer for ", n, " elements");
}

// Common preconditions of the two calibrations: nullopt-worthy inputs give absmax = 0.
float calibration_absmax(const float* g, int64_t n, double target) {
  // With t <= 0, sign(m - t) = 0 at m = 0 freezes gamma at 1 for ever; m never exceeds t >= 1.
  INT4DDP_CHECK(std::isfinite(target) && target > 0.0 && target < 1.0,
                "lbt calibration: target t = ", target, " is outside (0, 1)");
  check_buffer(g, n, "lbt calibration");
  if (n == 0) return 0.0f;
  int64_t nonfinite = 0;
  const float absmax = finite_absmax(g, n, &nonfinite);
  return nonfinite > 0 ? 0.0f : absmax;
}

std::string kind_label(uint8_t tag) {
  if (tag <= static_cast<uint8_t>(PolicyKind::kTopK))
    return policy_kind_name(static_cast<PolicyKind>(tag));
  return "kind " + std::to_string(int{tag});
}

void put_bytes(std::vector<uint8_t>& out, const void* p, size_t nbytes) {
  const auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + nbytes);
}

// --- the policies ------------------------------------------------------------------------------

// minmax and fixed: a constant gamma, no state.
class ConstantPolicy final : public IntervalPolicy {
 public:
  ConstantPolicy(PolicyKind kind, float gamma) : kind_(kind), gamma_(gamma) {}
  PolicyKind kind() const override { return kind_; }
  float gamma_for(const float*, int64_t) override { return gamma_; }
  float gamma() const override { return gamma_; }

 protected:
  std::vector<uint8_t> save_payload() const override { return {}; }
  void load_payload(const uint8_t*, size_t nbytes) override {
    INT4DDP_CHECK(nbytes == 0, "policy state: ", policy_kind_name(kind_),
                  " carries no payload, got ", nbytes, " bytes");
  }

 private:
  PolicyKind kind_;
  float gamma_;
};

class LbtPolicy final : public IntervalPolicy {
 public:
  explicit LbtPolicy(const PolicyConfig& cfg)
      : eta_(cfg.eta), target_(lbt_target(cfg.bits, cfg.alpha)), calibrate_(cfg.lbt_calibrate) {}
  PolicyKind kind() const override { return PolicyKind::kLbt; }
  float gamma_for(const float*, int64_t) override { return gamma_; }
  float gamma() const override { return gamma_; }

  void observe(const QuantStats& st) override {
    if (st.count <= 0 || st.nonfinite > 0 || !(st.absmax > 0.0f)) return;
    const int s = sign_of(st.clip_fraction() - target_);
    gamma_ = clamp_gamma(gamma_ + eta_ * static_cast<float>(s));
  }

  bool needs_calibration() const override { return calibrate_ && !calibrated_; }

  bool calibrate(const float* g, int64_t count) override {
    const std::optional<float> gamma = calibrate_lbt(g, count, target_);
    if (!gamma) return false;
    gamma_ = *gamma;
    calibrated_ = true;
    return true;
  }

  void skip_calibration() override {
    gamma_ = kMaxGamma;
    calibrated_ = true;
  }

 protected:
  std::vector<uint8_t> save_payload() const override {
    std::vector<uint8_t> out;
    put_bytes(out, &gamma_, sizeof gamma_);
    out.push_back(calibrated_ ? 1 : 0);
    return out;
  }
  void load_payload(const uint8_t* data, size_t nbytes) override {
    INT4DDP_CHECK(nbytes == sizeof(float) + 1, "policy state: lbt payload is ", nbytes,
                  " bytes, expected ", sizeof(float) + 1);
    float gamma;
    std::memcpy(&gamma, data, sizeof gamma);
    INT4DDP_CHECK(gamma >= kMinGamma && gamma <= kMaxGamma, "policy state: lbt gamma = ", gamma,
                  " is outside [", kMinGamma, ", ", kMaxGamma, "]");
    INT4DDP_CHECK(data[sizeof gamma] <= 1, "policy state: lbt calibrated flag is ",
                  int{data[sizeof gamma]});
    gamma_ = gamma;
    calibrated_ = data[sizeof gamma] == 1;
  }

 private:
  float eta_;
  double target_;
  bool calibrate_;
  float gamma_ = kMaxGamma;
  bool calibrated_ = false;
};

// mse and dsgc: gamma computed from each tensor; the state is the last gamma (for gamma()).
class DataPolicy final : public IntervalPolicy {
 public:
  explicit DataPolicy(const PolicyConfig& cfg) : cfg_(cfg) {}
  PolicyKind kind() const override { return cfg_.kind; }

  float gamma_for(const float* x, int64_t count) override {
    const std::optional<float> g =
        cfg_.kind == PolicyKind::kMse
            ? mse_gamma(x, count, cfg_.bits, cfg_.mse_iterations)
            : dsgc_gamma(x, count, cfg_.bits, cfg_.dsgc_points, cfg_.dsgc_min, cfg_.dsgc_max);
    if (g) gamma_ = *g;  // an all-zero tensor quantizes to 0 with any gamma: keep the last one
    return gamma_;
  }
  float gamma() const override { return gamma_; }

 protected:
  std::vector<uint8_t> save_payload() const override {
    std::vector<uint8_t> out;
    put_bytes(out, &gamma_, sizeof gamma_);
    return out;
  }
  void load_payload(const uint8_t* data, size_t nbytes) override {
    INT4DDP_CHECK(nbytes == sizeof(float), "policy state: ", policy_kind_name(cfg_.kind),
                  " payload is ", nbytes, " bytes, expected ", sizeof(float));
    float gamma;
    std::memcpy(&gamma, data, sizeof gamma);
    INT4DDP_CHECK(gamma >= kMinGamma && gamma <= kMaxGamma,
                  "policy state: ", policy_kind_name(cfg_.kind), " gamma = ", gamma,
                  " is outside [", kMinGamma, ", ", kMaxGamma, "]");
    gamma_ = gamma;
  }

 private:
  PolicyConfig cfg_;
  float gamma_ = kMaxGamma;
};

}  // namespace

// --- names and config ----------------------------------------------------------------------------

PolicyKind parse_policy_kind(const std::string& name) {
  if (name == "minmax") return PolicyKind::kMinMax;
  if (name == "fixed") return PolicyKind::kFixed;
  if (name == "lbt") return PolicyKind::kLbt;
  if (name == "mse") return PolicyKind::kMse;
  if (name == "dsgc") return PolicyKind::kDsgc;
  if (name == "topk") return PolicyKind::kTopK;
  INT4DDP_FAIL("unknown interval policy '", name,
               "' (expected minmax, fixed, lbt, mse, dsgc or topk)");
}

const char* policy_kind_name(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kMinMax:
      return "minmax";
    case PolicyKind::kFixed:
      return "fixed";
    case PolicyKind::kLbt:
      return "lbt";
    case PolicyKind::kMse:
      return "mse";
    case PolicyKind::kDsgc:
      return "dsgc";
    case PolicyKind::kTopK:
      return "topk";
  }
  return "unknown";
}

void PolicyConfig::validate() const {
  INT4DDP_CHECK(valid_bits(bits), "policy: bits = ", bits, " is outside ", kMinBits, "..",
                kMaxBits);
  INT4DDP_CHECK(std::isfinite(fixed_gamma) && fixed_gamma > 0.0f && fixed_gamma <= 1.0f,
                "policy: fixed_gamma = ", fixed_gamma, " is outside (0, 1]");
  INT4DDP_CHECK(std::isfinite(alpha) && alpha > 0.0 && alpha < 1.0, "policy: alpha = ", alpha,
                " is outside (0, 1)");
  INT4DDP_CHECK(std::isfinite(eta) && eta > 0.0f && eta <= 1.0f, "policy: eta = ", eta,
                " is outside (0, 1]");
  INT4DDP_CHECK(mse_iterations >= 1 && mse_iterations <= 1000,
                "policy: mse_iterations = ", mse_iterations, " is outside 1..1000");
  INT4DDP_CHECK(dsgc_points >= 2, "policy: dsgc_points = ", dsgc_points, " is below 2");
  INT4DDP_CHECK(std::isfinite(dsgc_min) && dsgc_min >= kMinGamma && dsgc_min < 1.0f,
                "policy: dsgc_min = ", dsgc_min, " is outside [", kMinGamma, ", 1)");
  INT4DDP_CHECK(std::isfinite(dsgc_max) && dsgc_max > dsgc_min && dsgc_max <= 1.0f,
                "policy: dsgc_max = ", dsgc_max, " is outside (dsgc_min = ", dsgc_min, ", 1]");
  INT4DDP_CHECK(topk >= 1 && topk < (1 << 24), "policy: topk = ", topk, " is outside 1..2^24-1");
}

double lbt_target(int bits, double alpha) {
  INT4DDP_CHECK(valid_bits(bits), "lbt: bits = ", bits, " is outside ", kMinBits, "..", kMaxBits);
  return alpha / static_cast<double>((1 << bits) - 1);
}

std::unique_ptr<IntervalPolicy> make_policy(const PolicyConfig& cfg) {
  cfg.validate();
  switch (cfg.kind) {
    case PolicyKind::kMinMax:
    case PolicyKind::kTopK:  // the clip is per block (block_clips); the codec's gamma is unused
      return std::make_unique<ConstantPolicy>(cfg.kind, 1.0f);
    case PolicyKind::kFixed:
      return std::make_unique<ConstantPolicy>(cfg.kind, cfg.fixed_gamma);
    case PolicyKind::kLbt:
      return std::make_unique<LbtPolicy>(cfg);
    case PolicyKind::kMse:
    case PolicyKind::kDsgc:
      return std::make_unique<DataPolicy>(cfg);
  }
  INT4DDP_FAIL("make_policy: policy kind ", static_cast<int>(cfg.kind), " is not supported");
}

// --- state ---------------------------------------------------------------------------------------

std::vector<uint8_t> IntervalPolicy::save_state() const {
  const std::vector<uint8_t> payload = save_payload();
  const uint16_t payload_bytes = static_cast<uint16_t>(payload.size());
  std::vector<uint8_t> out(kStateMagic, kStateMagic + 4);
  out.push_back(static_cast<uint8_t>(kind()));
  out.push_back(kStateVersion);
  put_bytes(out, &payload_bytes, sizeof payload_bytes);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

void IntervalPolicy::load_state(const uint8_t* data, size_t nbytes) {
  INT4DDP_CHECK(nbytes >= kStateHeaderBytes && data != nullptr, "policy state: blob of ", nbytes,
                " bytes is shorter than its ", kStateHeaderBytes, "-byte header");
  INT4DDP_CHECK(std::memcmp(data, kStateMagic, 4) == 0,
                "policy state: not a policy state blob (bad magic)");
  INT4DDP_CHECK(data[4] == static_cast<uint8_t>(kind()), "policy state: blob is for policy ",
                kind_label(data[4]), ", this policy is ", policy_kind_name(kind()));
  INT4DDP_CHECK(data[5] == kStateVersion, "policy state: version ", int{data[5]},
                " is not supported (expected ", int{kStateVersion}, ")");
  uint16_t payload_bytes;
  std::memcpy(&payload_bytes, data + 6, sizeof payload_bytes);
  INT4DDP_CHECK(nbytes == kStateHeaderBytes + payload_bytes, "policy state: blob is ", nbytes,
                " bytes, its header says ", kStateHeaderBytes + payload_bytes);
  load_payload(data + kStateHeaderBytes, payload_bytes);
}

// --- lbt calibration -----------------------------------------------------------------------------

std::optional<float> calibrate_lbt_plain(const float* g, int64_t n, double target) {
  const float absmax = calibration_absmax(g, n, target);
  if (!(absmax > 0.0f)) return std::nullopt;
  auto count_above = [g, n](float threshold) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) c += std::fabs(g[i]) > threshold;
    return c;
  };
  return calibration_loop(count_above, n, absmax, target);
}

namespace {

// #{mags > threshold} for the non-increasing thresholds of the calibration loop, from magnitudes
// that are only as sorted as the thresholds need: mags[lo, n) is sorted ascending and every element
// of mags[0, lo) is <= mags[lo]. A threshold >= mags[lo] is then above every element of the
// unsorted head, so the count is a binary search in the sorted tail. A lower threshold first grows
// the tail (doubling it): nth_element splits the head at its new boundary and the part above it is
// sorted, which keeps both properties. The loop stops while the clipped fraction is small, so the
// tail usually stays a small fraction of n: O(n) selections instead of one O(n log n) sort. The
// counts are exact, so the loop sees the same numbers as with a full sort.
class SortedTail {
 public:
  explicit SortedTail(std::vector<float> mags) : mags_(std::move(mags)), lo_(mags_.size()) {}

  int64_t count_above(float threshold) {
    while (lo_ > 0 && (lo_ == mags_.size() || threshold < mags_[lo_])) grow();
    const auto tail = mags_.begin() + static_cast<std::ptrdiff_t>(lo_);
    return static_cast<int64_t>(mags_.end() - std::upper_bound(tail, mags_.end(), threshold));
  }

 private:
  void grow() {
    constexpr size_t kFirstTail = 1024;  // and at least 1/64 of the elements
    const size_t tail = mags_.size() - lo_;
    const size_t want = std::max({kFirstTail, mags_.size() / 64, 2 * tail});
    const size_t new_lo = want >= mags_.size() ? 0 : mags_.size() - want;
    const auto first = mags_.begin(), mid = first + static_cast<std::ptrdiff_t>(new_lo),
               last = first + static_cast<std::ptrdiff_t>(lo_);
    if (new_lo > 0) std::nth_element(first, mid, last);
    std::sort(mid, last);
    lo_ = new_lo;
  }

  std::vector<float> mags_;
  size_t lo_;  // mags_[lo_, size) sorted, mags_[0, lo_) <= mags_[lo_]
};

}  // namespace

std::optional<float> calibrate_lbt(const float* g, int64_t n, double target) {
  const float absmax = calibration_absmax(g, n, target);
  if (!(absmax > 0.0f)) return std::nullopt;
  std::vector<float> mags(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) mags[static_cast<size_t>(i)] = std::fabs(g[i]);
  SortedTail sorted(std::move(mags));
  auto count_above = [&sorted](float threshold) { return sorted.count_above(threshold); };
  return calibration_loop(count_above, n, absmax, target);
}

// --- mse (OCTAV) ---------------------------------------------------------------------------------

std::optional<float> mse_gamma(const float* x, int64_t n, int bits, int iterations) {
  INT4DDP_CHECK(valid_bits(bits), "mse: bits = ", bits, " is outside ", kMinBits, "..", kMaxBits);
  INT4DDP_CHECK(iterations >= 1, "mse: iterations = ", iterations, " is below 1");
  check_buffer(x, n, "mse");
  const float absmax = finite_absmax(x, n, nullptr);
  if (!(absmax > 0.0f)) return std::nullopt;
  int64_t finite = 0;
  double sum_abs = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_finite_value(x[i])) continue;
    ++finite;
    sum_abs += std::fabs(static_cast<double>(x[i]));
  }
  const double noise = std::ldexp(1.0, -2 * bits) / 3.0;  // 4^-b / 3: noise per unit c^2
  double c = sum_abs / static_cast<double>(finite);
  for (int k = 0; k < iterations; ++k) {
    double sum_above = 0.0;
    int64_t above = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!is_finite_value(x[i])) continue;
      const double a = std::fabs(static_cast<double>(x[i]));
      if (a > c) {
        sum_above += a;
        ++above;
      }
    }
    // No element above c means c >= max|x| (the update never exceeds max|x|): gamma = 1 loses
    // nothing, and the update would collapse to 0.
    if (above == 0) break;
    const double nf = static_cast<double>(finite);
    const double next =
        (sum_above / nf) / (noise * static_cast<double>(finite - above) / nf + above / nf);
    const bool converged = std::fabs(next - c) <= kMseRelativeTolerance * c;
    c = next;
    if (converged) break;
  }
  return clamp_gamma(static_cast<float>(c / static_cast<double>(absmax)));
}

// --- dsgc ----------------------------------------------------------------------------------------

// cos(x, Q(x)) given the tensor's finite max|x| (computed once by dsgc_gamma).
static double cosine_at(const float* x, int64_t n, int bits, float gamma, float absmax) {
  const float step = step_for_clip(gamma * absmax, bits);
  const float inv_step = inv_step_for_clip(gamma * absmax, bits);
  double dot = 0.0, xx = 0.0, qq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_finite_value(x[i])) continue;
    const double v = x[i];
    const double q = dequantize_value(quantize_nearest(x[i], inv_step, bits), step);
    dot += v * q;
    xx += v * v;
    qq += q * q;
  }
  if (xx == 0.0 || qq == 0.0) return 0.0;
  return dot / std::sqrt(xx * qq);
}

double quantized_cosine(const float* x, int64_t n, int bits, float gamma) {
  INT4DDP_CHECK(valid_bits(bits), "dsgc: bits = ", bits, " is outside ", kMinBits, "..", kMaxBits);
  check_buffer(x, n, "dsgc");
  return cosine_at(x, n, bits, gamma, finite_absmax(x, n, nullptr));
}

float dsgc_grid_point(int k, int points, float gamma_min, float gamma_max) {
  const float frac = static_cast<float>(k) / static_cast<float>(points - 1);
  return clamp_gamma(std::min(gamma_min + (gamma_max - gamma_min) * frac, gamma_max));
}

std::optional<float> dsgc_gamma(const float* x, int64_t n, int bits, int points, float gamma_min,
                                float gamma_max) {
  INT4DDP_CHECK(valid_bits(bits), "dsgc: bits = ", bits, " is outside ", kMinBits, "..", kMaxBits);
  INT4DDP_CHECK(points >= 2, "dsgc: points = ", points, " is below 2");
  check_buffer(x, n, "dsgc");
  INT4DDP_CHECK(gamma_min >= kMinGamma && gamma_min < gamma_max && gamma_max <= kMaxGamma,
                "dsgc: grid [", gamma_min, ", ", gamma_max, "] is not inside [", kMinGamma, ", ",
                kMaxGamma, "]");
  const float absmax = finite_absmax(x, n, nullptr);
  if (!(absmax > 0.0f)) return std::nullopt;
  float best_gamma = kMaxGamma;
  double best_cos = -2.0;
  for (int k = 0; k < points; ++k) {
    const float gamma = dsgc_grid_point(k, points, gamma_min, gamma_max);
    const double cos = cosine_at(x, n, bits, gamma, absmax);
    if (cos > best_cos) {
      best_cos = cos;
      best_gamma = gamma;
    }
  }
  return best_gamma;
}

// --- block-scope clips ---------------------------------------------------------------------------

bool is_block_rule(PolicyKind kind) {
  return kind == PolicyKind::kTopK || kind == PolicyKind::kMse;
}

namespace {

// Inserts a into t[0, keep) (descending) when it beats the last kept value.
inline void keep_largest(float a, float* t, int keep) {
  if (!(a > t[keep - 1])) return;
  int j = keep - 1;
  for (; j > 0 && t[j - 1] < a; --j) t[j] = t[j - 1];
  t[j] = a;
}

// The keep largest finite magnitudes of x[0, n) into t (descending; -1 where fewer), and the
// largest finite magnitude. The result is a property of the multiset of finite magnitudes: every
// path gives the same bits.
//
// AVX2, keep <= 8, n >= 8: pass 1 takes each of the 8 lanes' largest finite magnitude (8 distinct
// elements; a lane of only non-finite values gives 0). Their keep-th largest, thr, is a lower bound
// of the block's keep-th largest, so pass 2 (the block is in L1 now) inserts only the elements with
// |x| >= thr, usually about keep of them, instead of testing every element against a threshold
// that rises slowly (each rise a mispredicted branch).
float top_magnitudes(const float* x, int64_t n, int keep, float* t) {
  std::fill(t, t + keep, -1.0f);
  float absmax = 0.0f;
  int64_t i = 0;
#if defined(__AVX2__)
  if (keep <= 8 && n >= 8) {
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(3.40282347e+38f);
    const int64_t nv = n / 8 * 8;
    __m256 vmax = _mm256_setzero_ps();
    for (; i < nv; i += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(a, _mm256_cmp_ps(a, fmax, _CMP_LE_OQ)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    std::sort(lanes, lanes + 8, [](float u, float v) { return u > v; });
    absmax = lanes[0];
    const __m256 thr = _mm256_set1_ps(lanes[keep - 1]);
    for (int64_t j = 0; j < nv; j += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j));
      const __m256 pick =
          _mm256_and_ps(_mm256_cmp_ps(a, thr, _CMP_GE_OQ), _mm256_cmp_ps(a, fmax, _CMP_LE_OQ));
      int m = _mm256_movemask_ps(pick);
      while (m != 0) {
        keep_largest(std::fabs(x[j + __builtin_ctz(static_cast<unsigned>(m))]), t, keep);
        m &= m - 1;
      }
    }
  }
#endif
  for (; i < n; ++i) {
    if (!is_finite_value(x[i])) continue;
    const float a = std::fabs(x[i]);
    absmax = std::max(absmax, a);
    keep_largest(a, t, keep);
  }
  return absmax;
}

}  // namespace

float block_clip(const float* x, int64_t n, const PolicyConfig& cfg) {
  if (cfg.kind != PolicyKind::kTopK || n <= cfg.topk) {
    const float absmax = finite_absmax(x, n, nullptr);
    if (!(absmax > 0.0f) || cfg.kind != PolicyKind::kMse) return absmax;
    const std::optional<float> g = mse_gamma(x, n, cfg.bits, cfg.mse_iterations);
    return g && *g < kMaxGamma ? *g * absmax : absmax;
  }
  // The k + 1 largest magnitudes, descending.
  const int keep = cfg.topk + 1;
  float top[64];
  std::vector<float> heap_top;
  float* t = top;
  if (keep > 64) {
    heap_top.resize(static_cast<size_t>(keep));
    t = heap_top.data();
  }
  const float absmax = top_magnitudes(x, n, keep, t);
  if (!(absmax > 0.0f)) return absmax;
  const float c = t[keep - 1];
  return c > 0.0f ? c : absmax;  // fewer than k + 1 finite values, or a sparse block: gamma 1
}

void block_clips(const float* x, int64_t n, int64_t block_size, const PolicyConfig& cfg,
                 float* clips) {
  check_buffer(x, n, "block_clips");
  INT4DDP_CHECK(block_size >= 1, "block_clips: block_size = ", block_size, " is below 1");
  INT4DDP_CHECK(n == 0 || clips != nullptr, "block_clips: null clips for ", n, " elements");
  for (int64_t b = 0; b < n; b += block_size)
    clips[b / block_size] = block_clip(x + b, std::min(block_size, n - b), cfg);
}

}  // namespace int4ddp::quant
