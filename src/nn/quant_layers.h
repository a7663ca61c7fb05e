// Fully quantized Conv2d and Linear (DESIGN.md section 3): low-bit weights, activations and output
// gradients, with all three GEMMs run as exact integer GEMMs on the codes.
//
//   weights      W^ = s_W * clamp(rint(W / s_W * L), -L, L) / L          (L = 2^(b-1) - 1)
//   activations  X^ = u_A * rint(clamp(X / u_A, 0, 1) * N) / N           (N = 2^b - 1), or the
//                signed grid u_A * rint(clamp(X / u_A, -1, 1) * L) / L when the input can be
//                negative
//   gradients    identity forward; backward quantizes dL/dY per tensor (stochastic rounding, the
//                interval policy of the layer, `lbt` by default) before it is used at all
// The rounding uses the straight-through estimator; s_W and u_A receive the exact gradient of the
// expressions above (LSQ-style: (q - v) / L inside the clip range, the clip sign outside). They are
// initialised on the first training forward to 3 std(W) and 3 std(X) / sqrt(1 - 2/pi).
//
// The gradient quantizer's interval-policy update is deferred: backward records the step's clip
// statistics and commit_step() applies them once the trainer has accepted the step, so a skipped
// (non-finite) step changes no gamma. The first backward calibrates `lbt` from its full-precision
// dL/dY and quantizes that batch with gamma = 1 (the trainer does not update weights on it). A
// layer whose dL/dY cannot calibrate (all zero or non-finite) on kMaxCalibrationTries batches
// starts at gamma = 1 instead, with a warning in QuantContext::warnings.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/math/iconv3x3.h"
#include "kernels/math/igemm.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/diagnostics.h"
#include "kernels/quant/policy.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

// Shared by all quantized layers of a model for one step.
struct QuantContext {
  uint32_t seed = 0;         // Philox seed of the run
  uint32_t stream = 0;       // Philox stream: the data-parallel rank (independent rounding)
  uint32_t step = 0;         // training step (Philox counter word)
  int64_t nonfinite = 0;     // NaN/Inf seen in output gradients, and NaN in inputs, this step
  bool diagnostics = false;  // compute E(G), E(G_L) this step (costs a dequantize per layer)
  std::vector<std::string> warnings;  // for the trainer to print (it clears them)
};

struct QuantSpec {
  int weight_bits = 4;              // 2..8
  int act_bits = 4;                 // 2..8
  int grad_bits = 4;                // 2..8
  bool signed_input = false;        // activations on the signed grid (input can be negative)
  quant::PolicyConfig grad_policy;  // bits is overwritten with grad_bits
  quant::Rounding grad_rounding = quant::Rounding::kStochastic;
};

// Per-layer gradient-quantizer state and diagnostics.
struct GradQuantizerState {
  std::unique_ptr<quant::IntervalPolicy> policy;
  quant::LargeGradientTracker tracker;
  quant::QuantStats pending;  // stats of this step's quantization, applied by commit_step
  bool has_pending = false;
  float last_gamma = 1.0f;  // gamma used this step
  quant::TensorDiagnostics last_diag{};
};

// ---- the fake-quantizer math, as free functions (tested on hand-derived values) -------------

// Weight codes q = clamp(rint(w / s * L), -L, L): as integer-valued floats (the definition) and
// as int8 (what the layers store and the integer GEMMs read; the same integers; a NaN weight,
// which the trainer never keeps, gets code 0).
void quantize_weight_codes(const float* w, int64_t n, float s, int bits, float* codes);
void quantize_weight_codes(const float* w, int64_t n, float s, int bits, int8_t* codes);
// dw += dwhat where |w / s * L| <= L; returns d loss / d s (STE for the rounding), summed in
// element order. The _ref version is the plain loop; weight_quant_backward does the per-element
// work on AVX2 lanes where the CPU has them (the same dw and ds, bit for bit).
double weight_quant_backward(const float* w, int64_t n, float s, int bits, const float* dwhat,
                             float* dw);
double weight_quant_backward_ref(const float* w, int64_t n, float s, int bits, const float* dwhat,
                                 float* dw);
// Activation codes: unsigned rint(clamp(x / u, 0, 1) * N) or signed rint(clamp(x / u, -1, 1) * L),
// as integer-valued floats (the definition); and as bytes, the same integers: the unsigned grid as
// uint8 (0..255 at 8 bits), the signed grid as int8. A NaN input has no code: the byte versions
// write 0 for it and return how many they saw (the float version writes NaN).
void quantize_act_codes(const float* x, int64_t n, float u, int bits, bool is_signed, float* codes);
int64_t quantize_act_codes(const float* x, int64_t n, float u, int bits, uint8_t* codes);
int64_t quantize_act_codes(const float* x, int64_t n, float u, int bits, int8_t* codes);
// dx = dxhat inside the clip range (0 outside); returns d loss / d u. The _ref version is the
// definition (one running sum); act_quant_backward sums du in 8 lanes (same dx, du equal up to
// summation order) and is the one the layers use.
double act_quant_backward(const float* x, int64_t n, float u, int bits, bool is_signed,
                          const float* dxhat, float* dx);
double act_quant_backward_ref(const float* x, int64_t n, float u, int bits, bool is_signed,
                              const float* dxhat, float* dx);
// Largest code magnitude of an activation grid.
int act_qmax(int bits, bool is_signed);
// The step the quantizers use for a learnable step's value v: max(|v|, 1e-12).
float effective_quant_step(float v);

// Common machinery of QConv2d and QLinear.
class QuantizedOp {
 public:
  static constexpr int kMaxCalibrationTries = 3;  // lbt calibration batches before gamma = 1

  QuantizedOp(const std::string& name, const QuantSpec& spec, uint32_t layer_id, QuantContext* ctx);
  // End of step: apply the deferred interval-policy update (apply = false discards it, e.g. for a
  // calibration batch or a skipped step).
  void commit_step(bool apply = true);
  bool initialized() const { return initialized_; }  // s_W, u_A initialised (checkpoint state)
  void set_initialized(bool v) { initialized_ = v; }
  GradQuantizerState& grad_state_mut() { return grad_; }
  const GradQuantizerState& grad_state() const { return grad_; }
  Param& weight_step() { return s_w_; }
  Param& act_step() { return u_a_; }
  bool signed_input() const { return spec_.signed_input; }  // activations on the signed grid
  // The instruction set of the layer's integer GEMMs (default math::igemm_default_isa(); kRef runs
  // the exact fp32 int_gemm). Every choice gives bit-identical results. Throws when absent.
  void set_gemm_isa(math::IgemmIsa isa);
  math::IgemmIsa gemm_isa() const { return gemm_isa_; }

 protected:
  // Code bounds and steps of the three operands.
  struct Grid {
    int qa, qw, qg;  // largest |code| of activations, weights, gradients
    float sa, sw;    // activation step u_A / qa and weight step s_W / qw
  };
  Grid grid() const;
  // Quantizes x and w into xq_ and wq_ (byte codes), initialising s_W and u_A on the first
  // training forward. Returns the output scale sa * sw.
  float quantize_operands(const Tensor& x, const Param& w, bool train);
  // Quantizes dy into int8 codes; returns the step d_G.
  float quantize_grad(const Tensor& dy, std::vector<int8_t>* codes);
  // quantize_grad's scalar steps, shared with the CUDA layers (quant_layers_cuda.h), which
  // quantize on the device: grad_needs_values() says whether grad_quant_params reads dL/dY's
  // values this step (the lbt calibration batch, mse, dsgc; dy may be null otherwise);
  // grad_quant_params gives this step's per-tensor QuantParams (running the calibration);
  // finish_grad_quant records the quantization's stats for commit_step and the context and
  // returns d_G; diagnose_grad fills the diagnostics from dy and its dequantized codes.
  bool grad_needs_values() const;
  quant::QuantParams grad_quant_params(const float* dy, int64_t n);
  float finish_grad_quant(const quant::QuantStats& st, float gamma);
  void diagnose_grad(const float* dy, const float* dequantized, int64_t n);
  // From dL/dX^ (x's shape): dx (straight-through inside the clip range) and u_A's gradient.
  void act_backward(const Tensor& x, const float* dxhat, Tensor* dx);
  void init_steps(const Tensor& x, const Param& w);
  // From dL/dW^ (w's shape): w.grad += straight-through dW, and s_W's gradient.
  void weight_backward(Param& w, const float* dwhat);

  std::string op_name_;
  QuantSpec spec_;
  uint32_t layer_id_;
  QuantContext* ctx_;
  Param s_w_, u_a_;
  bool initialized_ = false;
  int calibration_failures_ = 0;  // lbt calibration batches whose dL/dY could not calibrate
  GradQuantizerState grad_;
  math::IgemmIsa gemm_isa_;
  // Codes of this step, written by forward / backward and read by every GEMM of the step: bytes,
  // as the integer kernels take them (the exact fp32 path converts them itself).
  std::vector<uint8_t> xq_;  // (x size) activation codes: uint8, or int8 bytes on the signed grid
  std::vector<int8_t> wq_;   // (weight size) weight codes -L..L
  std::vector<int8_t> gq_;   // (dy size) output-gradient codes -L..L
  std::vector<float> scratch_;
  std::vector<float> piece_max_;      // (pieces) max |dy| of each piece of quantize_grad
  std::vector<int64_t> piece_count_;  // (pieces) non-finite, then clipped, counts of each piece
  std::vector<double> du_parts_;      // (batch parts) u_A's gradient of each part
  std::vector<double> ds_parts_;      // (weight blocks) s_W's gradient of each block
  Tensor dx_unused_;                  // act_backward's output when the caller wants no dx
};

class QLinear : public Linear, public QuantizedOp {
 public:
  QLinear(std::string name, int64_t in, int64_t out, bool bias, const QuantSpec& spec,
          uint32_t layer_id, QuantContext* ctx);
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  std::vector<Param*> params() override;

 private:
  // The step's activation codes packed for the igemm kernels once, not once per feature block:
  // as A (n, in) for forward, and as B (n, in) for dW^ where they fit int8.
  math::IgemmPackedA x_rows_;
  math::IgemmPackedB x_cols_;
};

class QConv2d : public Conv2d, public QuantizedOp {
 public:
  QConv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad,
          const QuantSpec& spec, uint32_t layer_id, QuantContext* ctx);
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  std::vector<Param*> params() override;

 private:
  // (threads, weight size) exact integer sums of dW^ codes products, one per thread slot: sums of
  // integers below 2^53 are exact in any order, so which thread summed which part is invisible.
  std::vector<std::vector<double>> dw_acc_;
  Tensor dxhat_;              // dL/dX^ scratch
  std::vector<float> dwhat_;  // (weight size) dL/dW^ scratch
  // Direct 3x3 path (fp32 kernels on integer-valued floats): xq_ and gq_ as floats.
  std::vector<float> xf_, gf_;
  // Packed-panel path (an igemm ISA, codes that fit int8): the step's weight codes packed once for
  // forward (W) and for backward-data (W flipped and transposed, or W^T), read by every group.
  math::IgemmPackedA w_fwd_, w_bwd_;
  std::vector<int8_t> w_flip_;  // (in, out*k*k) flipped weight codes
  // Implicit-GEMM 3x3 path: the step's weight codes packed for forward and (transposed) for
  // backward-data, kept so that their storage is reused; and the exact dW^ sums of
  // iconv3x3_wgrad, one per thread slot (num_threads()), added into dW^ once per backward.
  math::Iconv3x3Weights w_iconv_fwd_, w_iconv_bwd_;
  std::vector<math::Iconv3x3WgradSum> wgrad_sums_;
};

}  // namespace int4ddp::nn
