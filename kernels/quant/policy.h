// Interval policies: how the clip c = gamma * max|x| of a scope is chosen (DESIGN.md section 2).
//
//   minmax  gamma = 1
//   fixed   gamma = PolicyConfig::fixed_gamma
//   lbt     the paper's sign rule, after each step:
//             gamma <- clamp(gamma + eta * sign(R - t), 1e-3, 1)
//           R the step's clip fraction, t = alpha / (2^b - 1); calibrated on the first batch
//   mse     OCTAV fixed-point iteration for the MSE-optimal clip of this tensor
//   dsgc    the gamma of a grid that maximises cos(x, Q(x)) for this tensor
//   topk    communication path only: each block of G elements is clipped at its own (k+1)-th
//           largest magnitude (see "block-scope clips" below); the codec's gamma is unused
//
// At block scope (the two-shot's per-block scales) the rule that adapts is a clip per block:
// block_clip() below, handed to the codec by block_clips() (QuantParams::clips).
// comm.grad_policy = mse means OCTAV per block.
//
// Invariant: gamma is a float in [kMinGamma, kMaxGamma], and every update of it is float arithmetic
// in a fixed order, so a run (and a run resumed from save_state()) is bit-for-bit reproducible.
// Policies never look at non-finite elements: a step with NaN/Inf leaves the lbt state unchanged
// (the trainer skips such a step), and mse/dsgc compute their gamma over the finite elements.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/quant/codec.h"

namespace int4ddp::quant {

constexpr float kMinGamma = 1e-3f;
constexpr float kMaxGamma = 1.0f;
constexpr double kMseRelativeTolerance = 1e-6;  // mse: OCTAV stops when c moves less

enum class PolicyKind : uint8_t {
  kMinMax = 0,
  kFixed = 1,
  kLbt = 2,
  kMse = 3,
  kDsgc = 4,
  kTopK = 5
};

// "minmax", "fixed", "lbt", "mse", "dsgc", "topk"; anything else throws Error naming the string.
PolicyKind parse_policy_kind(const std::string& name);
const char* policy_kind_name(PolicyKind kind);

struct PolicyConfig {
  PolicyKind kind = PolicyKind::kLbt;
  int bits = 4;              // 2..8, the quantizer's bit-width b
  float fixed_gamma = 0.8f;  // fixed: gamma in (0, 1]
  double alpha = 1e-3;       // lbt: fraction of "large" gradients, in (0, 1); t = alpha / (2^b - 1)
  float eta = 1e-3f;         // lbt: gamma step per training step, in (0, 1]
  bool lbt_calibrate = true;  // lbt: calibrate gamma on the first usable batch
  int mse_iterations = 20;    // mse: at most this many OCTAV iterations, 1..1000
  int dsgc_points = 100;      // dsgc: grid size, >= 2
  float dsgc_min = 0.01f;     // dsgc: grid gamma_k = min + (max - min) * k / (points - 1)
  float dsgc_max = 1.0f;      //       0 < min < max <= 1
  int topk = 4;               // topk: values clipped per block (k), 1..2^24 - 1

  // Throws Error naming the field that is out of range.
  void validate() const;
};

// lbt's target clip fraction t = alpha / (2^bits - 1).
double lbt_target(int bits, double alpha);

class IntervalPolicy {
 public:
  virtual ~IntervalPolicy() = default;

  virtual PolicyKind kind() const = 0;

  // The gamma to quantize this step's tensor x (count elements) with. mse and dsgc compute it from
  // x (and remember it); the others return their state and ignore x (which may then be null).
  virtual float gamma_for(const float* x, int64_t count) = 0;

  // The current gamma: what gamma_for returned last (mse, dsgc) or will return next (the others).
  virtual float gamma() const = 0;

  // Feed back the stats of quantizing this step's tensor with gamma_for()'s gamma. lbt applies the
  // sign rule (the new gamma is for the next step); steps with non-finite elements, no elements or
  // an all-zero tensor are ignored. The other policies ignore it.
  virtual void observe(const QuantStats& stats) {}

  // lbt with lbt_calibrate until a calibration succeeded; false for every other policy.
  virtual bool needs_calibration() const { return false; }

  // lbt: run the calibration on this batch's gradient g and adopt its gamma. Returns false, leaving
  // the state unchanged, when g is empty, all zero or holds a non-finite value (retry on the next
  // batch). The other policies have nothing to calibrate and return false.
  virtual bool calibrate(const float* g, int64_t count) { return false; }

  // lbt: stop calibrating (e.g. after batches whose gradient was all zero) and keep gamma = 1,
  // updated by the sign rule from the next step on, as a calibrated state. The others: nothing.
  virtual void skip_calibration() {}

  // Binary state (host byte order, i.e. little-endian on every supported target):
  //   "I4PS" magic, u8 kind, u8 version, u16 payload bytes, payload.
  // load_state throws Error for a blob of another kind, another version or the wrong length.
  std::vector<uint8_t> save_state() const;
  void load_state(const uint8_t* data, size_t nbytes);

 protected:
  virtual std::vector<uint8_t> save_payload() const = 0;
  // nbytes has been checked against nothing yet: implementations check their exact length.
  virtual void load_payload(const uint8_t* data, size_t nbytes) = 0;
};

// Throws Error (naming the field) if cfg is invalid.
std::unique_ptr<IntervalPolicy> make_policy(const PolicyConfig& cfg);

// --- lbt calibration (DESIGN.md section 2) -------------------------------------------------------
// gamma = 1, m = 0; repeat { R = #{|g| > gamma * max|g|} / n; m <- 0.999 m + 0.001 R;
//                            s = sign(m - t); gamma <- gamma + 1e-3 s } until s > 0;
// clamp to [kMinGamma, kMaxGamma]. The threshold is the float product gamma * max|g| and an element
// counts when fabsf(g) > threshold, exactly as the codec counts clipped elements. gamma only falls
// inside the loop, so once it is <= 0 the clamped result is kMinGamma and the loop stops there.
// Both return std::nullopt (not calibrated) for n == 0, an all-zero g or any non-finite element.
//
// calibrate_lbt_plain: O(n) per iteration, the definition.
// calibrate_lbt:       sorts only the largest magnitudes the loop reaches (selections that grow a
//                      sorted tail), then O(log n) per iteration; the same gamma, bit for bit
//                      (tested).
std::optional<float> calibrate_lbt_plain(const float* g, int64_t n, double target);
std::optional<float> calibrate_lbt(const float* g, int64_t n, double target);

// --- mse and dsgc, as free functions (the policies call these) ---------------------------------
// OCTAV: c_{k+1} = E[|x| 1(|x|>c_k)] / ((4^-b / 3) E[1(|x|<=c_k)] + E[1(|x|>c_k)]) over the finite
// elements, from c_0 = mean|x|, at most `iterations` times, stopping when c changes by less than
// 1e-6 relative. Returns gamma = clamp(c / max|x|, kMinGamma, kMaxGamma); nullopt if no finite
// element is non-zero.
std::optional<float> mse_gamma(const float* x, int64_t n, int bits, int iterations);

// cos(x, Q(x)) for per-tensor nearest rounding with clip gamma * max|x| (finite elements only, the
// codec's arithmetic); 0 when x or Q(x) is all zero.
double quantized_cosine(const float* x, int64_t n, int bits, float gamma);

// The grid point gamma_k (first one on ties) maximising quantized_cosine; nullopt if no finite
// element is non-zero.
std::optional<float> dsgc_gamma(const float* x, int64_t n, int bits, int points, float gamma_min,
                                float gamma_max);
// gamma_k of that grid, computed the way dsgc_gamma does.
float dsgc_grid_point(int k, int points, float gamma_min, float gamma_max);

// --- block-scope clips (the communication path's per-block scales) ----------------------------
// With one scale per block of G elements, a per-bucket gamma < 1 clips the maximum of every block,
// and the paper's target t = alpha / (2^b - 1) lies below 1/G, so its sign rule sits at gamma = 1
// (DESIGN.md section 4). The rules that adapt there choose a clip per block:
//   topk  c_b = the (k+1)-th largest |x| of the block's finite elements: the k largest values
//         saturate at +-c_b. The paper's target restated at block scope: a clip fraction of
//         exactly k/G >= 1/G in every block, so that the block's step follows its bulk, not its
//         one or few outliers (error feedback carries what the clip removes).
//   mse   c_b = gamma * max|block| with gamma = mse_gamma() of the block (OCTAV per block).
// Degenerate blocks keep c_b = max|x| (gamma 1): fewer than k + 1 finite elements, a (k+1)-th
// largest magnitude of 0 (a sparse block) or no finite non-zero element. Other kinds: c_b = max.
//
// block_clips writes c_b of every block of G elements from x[0] (num_scales(n, G) floats, the last
// block shorter) for QuantParams::clips: the codec then saturates each block at +-c_b as it
// quantizes (codec.h), and counts the finite elements with |x| > c_b as clipped. The device
// two-shot computes topk's clips with quant::cuda::topk_clips_async (the same values); mse
// per block is host-only so far.
bool is_block_rule(PolicyKind kind);  // topk, mse
float block_clip(const float* x, int64_t n, const PolicyConfig& cfg);
void block_clips(const float* x, int64_t n, int64_t block_size, const PolicyConfig& cfg,
                 float* clips);

}  // namespace int4ddp::quant
