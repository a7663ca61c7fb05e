// The gradient quantizer's scalar steps of QuantizedOp (grad_needs_values, grad_quant_params,
// finish_grad_quant), which the CPU quantize_grad and the CUDA layers (quant_layers_cuda.h) share:
// which steps read dL/dY's values, the parameters and Philox key of each step, the calibration
// batch, the recorded stats and the step d_G.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/policy.h"
#include "src/nn/quant_layers.h"

namespace int4ddp::nn {
namespace {

// QLinear with the shared steps made callable.
class Probe : public QLinear {
 public:
  using QLinear::QLinear;
  using QuantizedOp::finish_grad_quant;
  using QuantizedOp::grad_needs_values;
  using QuantizedOp::grad_quant_params;
};

QuantSpec spec_with(quant::PolicyKind kind) {
  QuantSpec s;
  s.grad_bits = 4;
  s.grad_policy.kind = kind;
  return s;
}

std::vector<float> gradient(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.01f);
  std::vector<float> g(static_cast<size_t>(n));
  for (float& v : g) v = d(rng);
  return g;
}

TEST(QuantGradSteps, LbtReadsValuesOnlyOnTheCalibrationBatch) {
  QuantContext ctx;
  ctx.seed = 9;
  ctx.stream = 2;
  ctx.step = 17;
  Probe q("fc", 8, 4, true, spec_with(quant::PolicyKind::kLbt), 5, &ctx);
  const std::vector<float> g = gradient(4096, 1);
  ASSERT_TRUE(q.grad_needs_values());
  // Without the values on the calibration batch: a clear error naming the layer.
  try {
    q.grad_quant_params(nullptr, 4096);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fc: the gradient quantizer needs dL/dY's values"),
              std::string::npos)
        << e.what();
  }
  const quant::QuantParams p = q.grad_quant_params(g.data(), 4096);
  EXPECT_EQ(p.gamma, 1.0f);  // the calibration batch itself is quantized with gamma = 1
  EXPECT_EQ(p.bits, 4);
  EXPECT_EQ(p.block_size, 0);
  EXPECT_EQ(p.rounding, quant::Rounding::kStochastic);
  EXPECT_EQ(p.key.seed, 9u);
  EXPECT_EQ(p.key.stream, 2u);
  EXPECT_EQ(p.key.step, 17u);
  EXPECT_EQ(p.key.tensor_id, 5u);
  EXPECT_FALSE(q.grad_needs_values());
  const float calibrated = q.grad_state().policy->gamma();
  EXPECT_LT(calibrated, 1.0f);
  EXPECT_EQ(calibrated, *quant::calibrate_lbt(g.data(), 4096,
                                              quant::lbt_target(4, QuantSpec{}.grad_policy.alpha)));
  // Later steps: the calibrated gamma, no values needed.
  EXPECT_EQ(q.grad_quant_params(nullptr, 4096).gamma, calibrated);
}

TEST(QuantGradSteps, MseAndDsgcAlwaysReadValues) {
  QuantContext ctx;
  for (quant::PolicyKind k : {quant::PolicyKind::kMse, quant::PolicyKind::kDsgc}) {
    Probe q("fc", 8, 4, true, spec_with(k), 1, &ctx);
    const std::vector<float> g = gradient(1024, 2);
    EXPECT_TRUE(q.grad_needs_values());
    q.grad_quant_params(g.data(), 1024);
    EXPECT_TRUE(q.grad_needs_values());
  }
  Probe fixed("fc", 8, 4, true, spec_with(quant::PolicyKind::kMinMax), 1, &ctx);
  EXPECT_FALSE(fixed.grad_needs_values());
  EXPECT_EQ(fixed.grad_quant_params(nullptr, 10).gamma, 1.0f);
}

TEST(QuantGradSteps, FinishRecordsStatsAndGivesTheStep) {
  QuantContext ctx;
  Probe q("fc", 8, 4, true, spec_with(quant::PolicyKind::kLbt), 1, &ctx);
  const std::vector<float> g = gradient(4096, 3);
  q.grad_quant_params(g.data(), 4096);  // calibrate
  const float gamma = q.grad_state().policy->gamma();
  quant::QuantStats st;
  st.count = 4096;
  st.clipped = 4000;  // far above the lbt target: the sign rule raises gamma
  st.nonfinite = 0;
  st.absmax = 0.05f;
  const float step = q.finish_grad_quant(st, gamma);
  EXPECT_EQ(step, quant::step_for_clip(gamma * 0.05f, 4));
  EXPECT_TRUE(q.grad_state().has_pending);
  EXPECT_EQ(q.grad_state().pending.clipped, 4000);
  EXPECT_EQ(q.grad_state().last_gamma, gamma);
  EXPECT_EQ(ctx.nonfinite, 0);
  q.commit_step(true);
  EXPECT_GT(q.grad_state().policy->gamma(), gamma);  // many clipped: a wider clip next step
  EXPECT_FALSE(q.grad_state().has_pending);
  st.nonfinite = 3;
  q.finish_grad_quant(st, gamma);
  EXPECT_EQ(ctx.nonfinite, 3);
}

// The CPU quantize_grad through the shared steps: its codes are the codec's for grad_quant_params.
TEST(QuantGradSteps, CpuBackwardUsesTheSharedParameters) {
  QuantContext ctx;
  ctx.seed = 4;
  ctx.step = 2;
  QLinear layer("fc", 6, 5, true, spec_with(quant::PolicyKind::kMinMax), 7, &ctx);
  Probe twin("fc", 6, 5, true, spec_with(quant::PolicyKind::kMinMax), 7, &ctx);
  Tensor x({3, 6}), y;
  for (int64_t i = 0; i < x.numel(); ++i) x[i] = 0.1f * static_cast<float>(i % 7);
  for (int64_t i = 0; i < layer.weight().value.numel(); ++i)  // any values
    layer.weight().value[i] = 0.05f * static_cast<float>(i % 5) - 0.1f;
  layer.forward(x, y, true);
  Tensor dy(y.shape());
  const std::vector<float> g = gradient(dy.numel(), 4);
  for (int64_t i = 0; i < dy.numel(); ++i) dy[i] = g[static_cast<size_t>(i)];
  layer.backward(x, y, dy, nullptr);
  const quant::QuantParams p = twin.grad_quant_params(dy.data(), dy.numel());
  std::vector<uint8_t> codes(static_cast<size_t>(dy.numel()));
  float scale = 0;
  const quant::QuantStats st = quant::quantize_ref(dy.data(), dy.numel(), p, codes.data(), &scale);
  EXPECT_EQ(layer.grad_state().pending.clipped, st.clipped);
  EXPECT_EQ(layer.grad_state().pending.absmax, st.absmax);
  EXPECT_EQ(twin.finish_grad_quant(st, p.gamma), scale);
}

}  // namespace
}  // namespace int4ddp::nn
