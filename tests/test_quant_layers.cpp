// Quantized layers: the fake-quantizer gradients against hand-derived values, QLinear / QConv2d
// forward and backward against a plain reference built from the definitions (fake-quantized
// tensors in double, straight-through masks, the reference codec for the output gradient), the lbt
// calibration batch, and which inputs a model quantizes on the signed grid.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/igemm.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/policy.h"
#include "src/nn/model.h"
#include "src/nn/quant_layers.h"

namespace int4ddp::nn {
namespace {

TEST(FakeQuant, WeightCodesAndGradientsByHand) {
  // bits 4 (L = 7), s = 1: v = 7w = 0.7, -3.5, 14, 2.1 -> codes 1, -4 (half to even), 7 (clip), 2.
  const float w[] = {0.1f, -0.5f, 2.0f, 0.3f};
  float codes[4];
  quantize_weight_codes(w, 4, 1.0f, 4, codes);
  EXPECT_EQ(codes[0], 1.0f);
  EXPECT_EQ(codes[1], -4.0f);
  EXPECT_EQ(codes[2], 7.0f);
  EXPECT_EQ(codes[3], 2.0f);
  const float dwhat[] = {1.0f, 1.0f, 1.0f, 1.0f};
  float dw[] = {0.0f, 0.0f, 0.0f, 0.0f};
  const double ds = weight_quant_backward(w, 4, 1.0f, 4, dwhat, dw);
  EXPECT_EQ(dw[0], 1.0f);
  EXPECT_EQ(dw[2], 0.0f);  // clipped: no gradient to w
  // ds = sum (q - v) / L inside, sign(w) outside = (0.3 - 0.5 - 0.1) / 7 + 1
  EXPECT_NEAR(ds, 1.0 - 0.3 / 7.0, 1e-6);
}

TEST(FakeQuant, ActivationCodesAndGradientsByHand) {
  // bits 4 unsigned (N = 15), u = 1.5: v = -2/3, 0.2, 1, 2, 0.5 -> 0, 3, 15, 15, 8 (7.5 to even).
  const float x[] = {-1.0f, 0.3f, 1.5f, 3.0f, 0.75f};
  float codes[5];
  quantize_act_codes(x, 5, 1.5f, 4, false, codes);
  const float expected[] = {0, 3, 15, 15, 8};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(codes[i], expected[i]) << i;
  const float dxhat[] = {1, 1, 1, 1, 1};
  float dx[5];
  const double du = act_quant_backward(x, 5, 1.5f, 4, false, dxhat, dx);
  const float mask[] = {0, 1, 1, 0, 1};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(dx[i], mask[i]) << i;
  EXPECT_NEAR(du, 1.0 + 0.5 / 15.0, 1e-6);  // x = 3 clipped above: 1; x = 0.75: (8 - 7.5) / 15
  // Signed grid (L = 7): x = -3 clips at -u and contributes -1 to du.
  const float xs[] = {-3.0f};
  float cs[1], dxs[1];
  quantize_act_codes(xs, 1, 1.5f, 4, true, cs);
  EXPECT_EQ(cs[0], -7.0f);
  EXPECT_NEAR(act_quant_backward(xs, 1, 1.5f, 4, true, dxhat, dxs), -1.0, 1e-9);
  EXPECT_EQ(dxs[0], 0.0f);
}

// The lane-summed act_quant_backward against the one-chain definition on random data with every
// case (inside, clipped above, clipped below, signed and unsigned, a tail shorter than 8 lanes):
// dx identical, du equal up to summation order (n = 1003 terms of O(1): 1e-9 relative is ample).
TEST(FakeQuant, ActQuantBackwardMatchesReference) {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> d(-2.5f, 2.5f);
  const int64_t n = 1003;
  std::vector<float> x(n), dxhat(n), dx(n), dx_ref(n);
  for (int64_t i = 0; i < n; ++i) x[i] = d(rng), dxhat[i] = d(rng);
  for (bool is_signed : {false, true})
    for (int bits : {2, 4, 8}) {
      const double du =
          act_quant_backward(x.data(), n, 1.3f, bits, is_signed, dxhat.data(), dx.data());
      const double du_ref =
          act_quant_backward_ref(x.data(), n, 1.3f, bits, is_signed, dxhat.data(), dx_ref.data());
      EXPECT_NEAR(du, du_ref, 1e-9 * (1 + std::fabs(du_ref))) << bits << " " << is_signed;
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(dx[i], dx_ref[i]) << i;
    }
}

// act_quant_backward's du is its documented order bit for bit (the layers' training bits rest on
// it, whichever ISA sums the lanes): element i's double(dxhat) * residual and double(dxhat * slope)
// in lane i % 8 in element order, the lanes added as ((0+1)+(2+3))+((4+5)+(6+7)), the in-range
// total divided by q. Lengths cover no full lane group, tails and several 256-element chunks.
TEST(FakeQuant, ActQuantBackwardSumsInTheDocumentedLaneOrder) {
  std::mt19937_64 rng(12);
  std::uniform_real_distribution<float> d(-2.5f, 2.5f);
  for (int64_t n : {1, 7, 8, 9, 255, 256, 257, 1003, 4096}) {
    std::vector<float> x(n), dxhat(n), dx(n);
    for (int64_t i = 0; i < n; ++i) x[i] = d(rng), dxhat[i] = d(rng);
    // Exact clip bounds, -0, +-inf and a NaN (outside the range: dx 0, the slope below).
    const float specials[] = {1.3f,
                              -1.3f,
                              0.0f,
                              -0.0f,
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(),
                              std::nanf("")};
    for (int64_t i = 0; i < n && i < 7; ++i) x[static_cast<size_t>(i * 3 % n)] = specials[i];
    for (bool is_signed : {false, true})
      for (int bits : {2, 4, 8}) {
        const float q = static_cast<float>(act_qmax(bits, is_signed));
        const float ue = effective_quant_step(1.3f);
        double in[8] = {}, out[8] = {};
        for (int64_t i = 0; i < n; ++i) {
          const float v = x[i] / ue;
          const bool inside = v >= (is_signed ? -1.0f : 0.0f) && v <= 1.0f;
          const float resid = std::rint(v * q) - v * q;
          const float slope = inside ? 0.0f : (v > 1.0f ? 1.0f : (is_signed ? -1.0f : 0.0f));
          in[i % 8] += static_cast<double>(dxhat[i]) * (inside ? resid : 0.0f);
          out[i % 8] += static_cast<double>(dxhat[i] * slope);
        }
        auto total = [](const double* v) {
          return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
        };
        const double expect = total(in) / q + total(out);
        const double du =
            act_quant_backward(x.data(), n, 1.3f, bits, is_signed, dxhat.data(), dx.data());
        EXPECT_EQ(du, expect) << "n " << n << " bits " << bits << " signed " << is_signed;
        for (int64_t i = 0; i < n; ++i) {
          const float v = x[i] / ue;
          const float want = v >= (is_signed ? -1.0f : 0.0f) && v <= 1.0f ? dxhat[i] : 0.0f;
          ASSERT_EQ(std::memcmp(&dx[i], &want, sizeof(float)), 0) << "dx " << i << " n " << n;
        }
      }
  }
}

// weight_quant_backward (AVX2 lanes where present, ds one chain in element order) against its
// plain loop, bit for bit: dw and ds, on lengths with no full lane group, tails and several
// chunks, with weights inside and beyond the clip range, exactly on it, +-0, +-inf and NaN.
TEST(FakeQuant, WeightQuantBackwardEqualsReferenceBitForBit) {
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<float> d(-2.5f, 2.5f);
  const float s = 1.3f;
  for (int64_t n : {1, 7, 8, 9, 255, 256, 257, 1003, 4096}) {
    std::vector<float> w(n), dwhat(n), dw(n);
    for (int64_t i = 0; i < n; ++i) w[i] = d(rng), dwhat[i] = d(rng), dw[i] = d(rng);
    const float specials[] = {s,
                              -s,
                              0.0f,
                              -0.0f,
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(),
                              std::nanf("")};
    for (int64_t i = 0; i < n && i < 7; ++i) w[static_cast<size_t>(i * 5 % n)] = specials[i];
    for (int bits : {2, 4, 8}) {
      std::vector<float> dw_fast = dw, dw_ref = dw;
      const double ds = weight_quant_backward(w.data(), n, s, bits, dwhat.data(), dw_fast.data());
      const double ds_ref =
          weight_quant_backward_ref(w.data(), n, s, bits, dwhat.data(), dw_ref.data());
      EXPECT_EQ(std::memcmp(&ds, &ds_ref, sizeof ds), 0)
          << "n " << n << " bits " << bits << ": " << ds << " vs " << ds_ref;
      ASSERT_EQ(std::memcmp(dw_fast.data(), dw_ref.data(), sizeof(float) * n), 0)
          << "n " << n << " bits " << bits;
    }
  }
}

// The byte quantizers the layers use write the integers of the float definitions, for every
// bit-width and both activation grids: random values across and beyond the clip range, the exact
// half-way points between codes (round half to even), the clip bounds, +-0 and +-inf. A NaN gets
// code 0 and is counted (the float definition writes NaN).
TEST(FakeQuant, ByteCodesEqualTheFloatDefinitions) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> d(-3.0f, 3.0f);
  const float u = 1.3f;
  const float inf = std::numeric_limits<float>::infinity();
  for (int bits = 2; bits <= 8; ++bits)
    for (bool is_signed : {false, true}) {
      SCOPED_TRACE(testing::Message() << "bits " << bits << " signed " << is_signed);
      const int q = act_qmax(bits, is_signed);
      std::vector<float> x = {0.0f, -0.0f, u, -u, 2 * u, -2 * u, inf, -inf};
      for (int c = -q; c <= q; ++c) {  // every code and every half-way point between two
        x.push_back(u * static_cast<float>(c) / static_cast<float>(q));
        x.push_back(u * (static_cast<float>(c) + 0.5f) / static_cast<float>(q));
      }
      for (int i = 0; i < 2000; ++i) x.push_back(d(rng));
      const int64_t n = static_cast<int64_t>(x.size());
      std::vector<float> ref(x.size());
      quantize_act_codes(x.data(), n, u, bits, is_signed, ref.data());
      std::vector<uint8_t> bytes(x.size());
      const int64_t nan = is_signed ? quantize_act_codes(x.data(), n, u, bits,
                                                         reinterpret_cast<int8_t*>(bytes.data()))
                                    : quantize_act_codes(x.data(), n, u, bits, bytes.data());
      EXPECT_EQ(nan, 0);
      int seen_max = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int code = is_signed ? static_cast<int8_t>(bytes[i]) : bytes[i];
        ASSERT_EQ(static_cast<float>(code), ref[i]) << "x = " << x[i];
        seen_max = std::max(seen_max, code);
      }
      EXPECT_EQ(seen_max, q);  // the top code is reached (255 at 8 unsigned bits)
      // Weights: the signed grid -L..L of the weight quantizer.
      std::vector<float> wref(x.size());
      std::vector<int8_t> w8(x.size());
      quantize_weight_codes(x.data(), n, u, bits, wref.data());
      quantize_weight_codes(x.data(), n, u, bits, w8.data());
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(static_cast<float>(w8[i]), wref[i]) << "w = " << x[i];
    }
  // NaNs inside the vector steps (and the tail) of the byte quantizers: code 0, counted.
  std::vector<float> long_nan(100, 0.5f);
  for (int64_t i : {3, 40, 97}) long_nan[i] = std::numeric_limits<float>::quiet_NaN();
  std::vector<uint8_t> lc(100);
  std::vector<int8_t> lw(100);
  EXPECT_EQ(quantize_act_codes(long_nan.data(), 100, 1.0f, 4, lc.data()), 3);
  quantize_weight_codes(long_nan.data(), 100, 1.0f, 4, lw.data());
  for (int64_t i = 0; i < 100; ++i) {
    const bool nan = i == 3 || i == 40 || i == 97;
    EXPECT_EQ(lc[i], nan ? 0 : 8) << i;  // 0.5 * 15 = 7.5: to even
    EXPECT_EQ(lw[i], nan ? 0 : 4) << i;  // 0.5 * 7 = 3.5: to even
  }
  const float with_nan[] = {0.5f, std::numeric_limits<float>::quiet_NaN(), 2.0f};
  uint8_t c[3];
  int8_t cs[3], cw[3];
  EXPECT_EQ(quantize_act_codes(with_nan, 3, 1.0f, 4, c), 1);
  EXPECT_EQ(quantize_act_codes(with_nan, 3, 1.0f, 4, cs), 1);
  quantize_weight_codes(with_nan, 3, 1.0f, 4, cw);
  EXPECT_EQ(c[1], 0);
  EXPECT_EQ(cs[1], 0);
  EXPECT_EQ(cw[1], 0);
  EXPECT_EQ(c[0], 8);  // 7.5 to even
  EXPECT_EQ(c[2], 15);
  // NaNs inside the vectorised blocks and in the tail.
  std::vector<float> xs(101, 0.7f);
  for (size_t i : {size_t{0}, size_t{31}, size_t{45}, size_t{100}})
    xs[i] = std::numeric_limits<float>::quiet_NaN();
  std::vector<uint8_t> cu(xs.size());
  EXPECT_EQ(quantize_act_codes(xs.data(), 101, 1.0f, 8, cu.data()), 4);
  for (size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(cu[i], xs[i] == xs[i] ? 178 : 0) << i;
}

// --- layer references ------------------------------------------------------------------------

QuantSpec test_spec() {
  QuantSpec s;
  s.weight_bits = 4;
  s.act_bits = 4;
  s.grad_bits = 8;
  s.grad_policy.kind = quant::PolicyKind::kMinMax;
  s.grad_rounding = quant::Rounding::kNearest;
  return s;
}

void fill(Tensor& t, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = d(rng);
}

// G^ of the reference codec: per tensor, minmax, nearest.
std::vector<double> ref_grad(const Tensor& dy, int bits) {
  quant::QuantParams p;
  p.bits = bits;
  std::vector<uint8_t> codes(static_cast<size_t>(quant::packed_bytes(bits, dy.numel())));
  float step;
  quant::quantize_ref(dy.data(), dy.numel(), p, codes.data(), &step);
  std::vector<float> out(static_cast<size_t>(dy.numel()));
  quant::dequantize_ref(codes.data(), &step, dy.numel(), bits, 0, out.data());
  return std::vector<double>(out.begin(), out.end());
}

std::vector<double> fake_weights(const Param& w, float s, int bits) {
  std::vector<float> c(static_cast<size_t>(w.value.numel()));
  quantize_weight_codes(w.value.data(), w.value.numel(), s, bits, c.data());
  std::vector<double> out(c.size());
  for (size_t i = 0; i < c.size(); ++i) out[i] = c[i] * (static_cast<double>(s) / 7.0);
  return out;
}

std::vector<double> fake_acts(const Tensor& x, float u, int bits) {
  std::vector<float> c(static_cast<size_t>(x.numel()));
  quantize_act_codes(x.data(), x.numel(), u, bits, false, c.data());
  std::vector<double> out(c.size());
  for (size_t i = 0; i < c.size(); ++i) out[i] = c[i] * (static_cast<double>(u) / 15.0);
  return out;
}

constexpr double kTol = 1e-4;  // float rescaling of exact integer GEMMs vs double reference

TEST(QuantLayers, QLinearMatchesReference) {
  QuantContext ctx;
  QLinear l("fc", 6, 4, true, test_spec(), 1, &ctx);
  fill(l.weight().value, 1, -0.5f, 0.5f);
  fill(l.bias().value, 2, -0.1f, 0.1f);
  Tensor x({3, 6}), y, dy({3, 4}), dx;
  fill(x, 3, -0.2f, 1.0f);  // some negatives clip to 0
  fill(dy, 4, -1.0f, 1.0f);
  l.forward(x, y, true);
  const float s = l.weight_step().value[0], u = l.act_step().value[0];
  const auto wh = fake_weights(l.weight(), s, 4);
  const auto xh = fake_acts(x, u, 4);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 4; ++j) {
      double acc = l.bias().value[j];
      for (int64_t k = 0; k < 6; ++k) acc += xh[i * 6 + k] * wh[j * 6 + k];
      EXPECT_NEAR(y[i * 4 + j], acc, kTol);
    }
  for (Param* p : l.params()) p->grad.zero();
  l.backward(x, y, dy, &dx);
  const auto g = ref_grad(dy, 8);
  for (int64_t j = 0; j < 4; ++j)
    for (int64_t k = 0; k < 6; ++k) {
      double dwh = 0;
      for (int64_t i = 0; i < 3; ++i) dwh += g[i * 4 + j] * xh[i * 6 + k];
      const bool inside = std::fabs(l.weight().value[j * 6 + k] / s * 7.0f) <= 7.0f;
      EXPECT_NEAR(l.weight().grad[j * 6 + k], inside ? dwh : 0.0, kTol);
    }
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t k = 0; k < 6; ++k) {
      double dxh = 0;
      for (int64_t j = 0; j < 4; ++j) dxh += g[i * 4 + j] * wh[j * 6 + k];
      const float v = x[i * 6 + k] / u;
      EXPECT_NEAR(dx[i * 6 + k], (v >= 0 && v <= 1) ? dxh : 0.0, kTol);
    }
  EXPECT_NE(l.weight_step().grad[0], 0.0f);
  EXPECT_NE(l.act_step().grad[0], 0.0f);
}

void check_qconv(int st, bool one_per_group, bool direct) {
  QuantContext ctx;
  const int64_t n = 3, ci = 3, co = 4, h = 5, w = 6;
  QConv2d c("conv", ci, co, 3, st, 1, test_spec(), 2, &ctx);
  if (one_per_group) c.set_column_bytes(1);
  c.set_direct_conv(direct);
  fill(c.weight().value, 5, -0.5f, 0.5f);
  Tensor x({n, ci, h, w}), y, dx;
  fill(x, 6, -0.1f, 1.0f);
  c.forward(x, y, true);
  const int64_t ho = y.dim(2), wo = y.dim(3);
  ASSERT_EQ(ho, st == 2 ? 3 : 5);
  ASSERT_EQ(wo, st == 2 ? 3 : 6);
  const float s = c.weight_step().value[0], u = c.act_step().value[0];
  const auto wh = fake_weights(c.weight(), s, 4);
  const auto xh = fake_acts(x, u, 4);
  auto xat = [&](int64_t b, int64_t ch, int64_t iy, int64_t ix) {
    return (iy < 0 || iy >= h || ix < 0 || ix >= w) ? 0.0 : xh[((b * ci + ch) * h + iy) * w + ix];
  };
  for (int64_t b = 0; b < n; ++b)
    for (int64_t o = 0; o < co; ++o)
      for (int64_t oy = 0; oy < ho; ++oy)
        for (int64_t ox = 0; ox < wo; ++ox) {
          double acc = 0;
          for (int64_t ch = 0; ch < ci; ++ch)
            for (int ky = 0; ky < 3; ++ky)
              for (int kx = 0; kx < 3; ++kx)
                acc += wh[((o * ci + ch) * 3 + ky) * 3 + kx] *
                       xat(b, ch, oy * st - 1 + ky, ox * st - 1 + kx);
          EXPECT_NEAR(y[((b * co + o) * ho + oy) * wo + ox], acc, kTol);
        }
  Tensor dy(y.shape());
  fill(dy, 7, -1.0f, 1.0f);
  for (Param* p : c.params()) p->grad.zero();
  c.backward(x, y, dy, &dx);
  const auto g = ref_grad(dy, 8);
  // dW and dX of the direct convolution with the fake-quantized operands and STE masks.
  std::vector<double> dwh(wh.size(), 0.0), dxh(xh.size(), 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t o = 0; o < co; ++o)
      for (int64_t oy = 0; oy < ho; ++oy)
        for (int64_t ox = 0; ox < wo; ++ox) {
          const double gv = g[((b * co + o) * ho + oy) * wo + ox];
          for (int64_t ch = 0; ch < ci; ++ch)
            for (int ky = 0; ky < 3; ++ky)
              for (int kx = 0; kx < 3; ++kx) {
                const int64_t iy = oy * st - 1 + ky, ix = ox * st - 1 + kx;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                const size_t wi = static_cast<size_t>(((o * ci + ch) * 3 + ky) * 3 + kx);
                const size_t xi = static_cast<size_t>(((b * ci + ch) * h + iy) * w + ix);
                dwh[wi] += gv * xh[xi];
                dxh[xi] += gv * wh[wi];
              }
        }
  for (size_t i = 0; i < dwh.size(); ++i) {
    const bool inside = std::fabs(c.weight().value[i] / s * 7.0f) <= 7.0f;
    EXPECT_NEAR(c.weight().grad[i], inside ? dwh[i] : 0.0, kTol) << "dW " << i;
  }
  for (size_t i = 0; i < dxh.size(); ++i) {
    const float v = x[i] / u;
    EXPECT_NEAR(dx[i], (v >= 0 && v <= 1) ? dxh[i] : 0.0, kTol) << "dX " << i;
  }
}

// Stride 2 (dx through col2im) and stride 1 (dx as the transposed convolution), with the default
// column budget (one group) and with one sample per group.
TEST(QuantLayers, QConv2dMatchesDirectConvolution) {
  for (int st : {2, 1})
    for (bool one_per_group : {false, true})
      for (bool direct : {true, false}) {  // stride 1: the direct 3x3 kernels, or im2col + GEMM
        SCOPED_TRACE(testing::Message() << "stride " << st << " one_per_group " << one_per_group
                                        << " direct " << direct);
        check_qconv(st, one_per_group, direct);
      }
}

// Two copies of a layer on the same input (differing in how they compute: direct or GEMM
// convolution, integer-GEMM instruction set): outputs, dX and every gradient must agree bit for
// bit, since every path is exact.
template <typename Layer>
// with_dx = false: backward without dx (a model's first layer), as the trainer calls it.
void expect_same_training_step(Layer& a, Layer& b, const Tensor& x, uint64_t seed,
                               bool with_dx = true) {
  Tensor ya, yb, dxa, dxb;
  a.forward(x, ya, true);
  b.forward(x, yb, true);
  ASSERT_EQ(ya.numel(), yb.numel());
  EXPECT_EQ(std::memcmp(ya.data(), yb.data(), sizeof(float) * ya.numel()), 0) << "y";
  Tensor dy(ya.shape());
  fill(dy, seed, -1.0f, 1.0f);
  for (Param* p : a.params()) p->grad.zero();
  for (Param* p : b.params()) p->grad.zero();
  a.backward(x, ya, dy, with_dx ? &dxa : nullptr);
  b.backward(x, yb, dy, with_dx ? &dxb : nullptr);
  if (with_dx) {
    EXPECT_EQ(std::memcmp(dxa.data(), dxb.data(), sizeof(float) * dxa.numel()), 0) << "dX";
  }
  const auto pa = a.params(), pb = b.params();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(
        std::memcmp(pa[i]->grad.data(), pb[i]->grad.data(), sizeof(float) * pa[i]->grad.numel()), 0)
        << pa[i]->name;
}

// The direct 3x3 kernels and the im2col + integer GEMM path compute the same exact integer sums
// and rescale them once: outputs, dX and every gradient must agree bit for bit, over a batch of
// several parts (BatchParts) and the resnet20 channel counts.
TEST(QuantLayers, QConv2dDirectEqualsGemmBitForBit) {
  for (int64_t ch : {16, 32}) {
    SCOPED_TRACE(testing::Message() << "channels " << ch);
    const int64_t n = 19, h = 7, w = 9;
    QuantContext ctx_a, ctx_b;
    QConv2d a("conv", ch, ch, 3, 1, 1, test_spec(), 2, &ctx_a);
    QConv2d b("conv", ch, ch, 3, 1, 1, test_spec(), 2, &ctx_b);
    a.set_direct_conv(true);
    b.set_direct_conv(false);
    fill(a.weight().value, 11, -0.5f, 0.5f);
    fill(b.weight().value, 11, -0.5f, 0.5f);
    Tensor x({n, ch, h, w});
    fill(x, 12, -0.1f, 1.0f);
    expect_same_training_step(a, b, x, 13);
  }
}

// QConv2d's 3x3 stride-1 pad-1 choice (quant_layers.cpp, fp32_direct3x3): with the default
// integer-GEMM ISA the integer path (iconv3x3 on AVX512-VNNI or AVX2, else the packed GEMMs), with
// `ref` the fp32 path (the direct fp32 kernels on AVX-512, else int_gemm on the codes as floats).
// Both take the same exact sums: outputs, dX and every gradient agree bit for bit at 2, 4 and 8
// bits (8-bit activations x 8-bit weights: only VNNI's int32 sums take them), mixed widths, the
// signed grid, odd channel counts and a batch of several parts.
TEST(QuantLayers, QConv2dIntegerThreeByThreeEqualsTheFp32PathBitForBit) {
  struct Bits {
    int w, a, g;
  };
  for (Bits bits : {Bits{4, 4, 4}, Bits{8, 8, 8}, Bits{2, 2, 2}, Bits{8, 4, 6}})
    for (bool signed_input : {false, true})
      for (int64_t ch : {16, 5}) {
        SCOPED_TRACE(testing::Message() << "bits " << bits.w << "/" << bits.a << "/" << bits.g
                                        << " signed " << signed_input << " channels " << ch);
        QuantSpec spec = test_spec();
        spec.weight_bits = bits.w;
        spec.act_bits = bits.a;
        spec.grad_bits = bits.g;
        spec.signed_input = signed_input;
        const int64_t n = 19, h = 7, w = 9;
        QuantContext ctx_a, ctx_b;
        QConv2d a("conv", ch, ch + 2, 3, 1, 1, spec, 2, &ctx_a);
        QConv2d b("conv", ch, ch + 2, 3, 1, 1, spec, 2, &ctx_b);
        a.set_gemm_isa(math::IgemmIsa::kRef);
        fill(a.weight().value, 41, -0.5f, 0.5f);
        fill(b.weight().value, 41, -0.5f, 0.5f);
        Tensor x({n, ch, h, w});
        fill(x, 42, signed_input ? -1.0f : -0.1f, 1.0f);
        expect_same_training_step(a, b, x, 43);
      }
}

// Every integer-GEMM ISA present against the exact fp32 path, through QConv2d's im2col + GEMM
// path (stride 1 and 2, one group and one sample per group) and QLinear, at 2, 4 and 8 bits, mixed
// widths and the signed activation grid. ISAs this CPU lacks are skipped (and say so).
TEST(QuantLayers, EveryGemmIsaEqualsTheFp32PathBitForBit) {
  struct Bits {
    int w, a, g;
  };
  for (math::IgemmIsa isa : math::kIgemmIsas) {
    if (isa == math::IgemmIsa::kRef) continue;
    if (!math::igemm_isa_available(isa)) {
      std::printf("[  SKIP    ] GEMM ISA %s: not present on this CPU\n", math::igemm_isa_name(isa));
      continue;
    }
    for (Bits bits :
         {Bits{4, 4, 4}, Bits{2, 2, 2}, Bits{8, 8, 8}, Bits{4, 8, 6}, Bits{3, 5, 7}, Bits{7, 6, 3}})
      for (bool signed_input : {false, true}) {
        SCOPED_TRACE(testing::Message() << math::igemm_isa_name(isa) << " bits " << bits.w << "/"
                                        << bits.a << "/" << bits.g << " signed " << signed_input);
        QuantSpec spec = test_spec();
        spec.weight_bits = bits.w;
        spec.act_bits = bits.a;
        spec.grad_bits = bits.g;
        spec.signed_input = signed_input;
        const float lo = signed_input ? -1.0f : -0.1f;
        // 3x3 pad 1 and pad 0, 1x1 (the shortcut), stride 1 and 2; with and without dx.
        for (auto [k, pad] : {std::pair{3, 1}, std::pair{3, 0}, std::pair{1, 0}})
          for (int st : {1, 2})
            for (bool one_per_group : {false, true})
              for (bool with_dx : {true, false}) {
                QuantContext ctx_a, ctx_b;
                QConv2d a("conv", 5, 7, k, st, pad, spec, 2, &ctx_a);
                QConv2d b("conv", 5, 7, k, st, pad, spec, 2, &ctx_b);
                for (QConv2d* c : {&a, &b}) {
                  c->set_direct_conv(false);
                  if (one_per_group) c->set_column_bytes(1);
                  fill(c->weight().value, 21, -0.5f, 0.5f);
                }
                a.set_gemm_isa(math::IgemmIsa::kRef);
                b.set_gemm_isa(isa);
                Tensor x({9, 5, 7, 6});
                fill(x, 22, lo, 1.0f);
                expect_same_training_step(a, b, x, 23, with_dx);
              }
        QuantContext ctx_a, ctx_b;
        QLinear a("fc", 37, 19, true, spec, 3, &ctx_a), b("fc", 37, 19, true, spec, 3, &ctx_b);
        fill(a.weight().value, 24, -0.5f, 0.5f);
        fill(b.weight().value, 24, -0.5f, 0.5f);
        a.set_gemm_isa(math::IgemmIsa::kRef);
        b.set_gemm_isa(isa);
        Tensor x({11, 37});
        fill(x, 25, lo, 1.0f);
        expect_same_training_step(a, b, x, 26);
      }
  }
}

// Forward on the byte codes equals the definition bit for bit: y = (sa * sw) * float(T), T the
// exact integer sum of the float reference quantizers' codes (QLinear adds its bias after), at
// every bit-width 2..8 on both activation grids, for the fp32 reference path and every integer
// GEMM ISA present, through QConv2d's im2col + GEMM path (stride 1 and 2, one group and one
// sample per group), its direct 3x3 path where it runs, and QLinear.
TEST(QuantLayers, ForwardOnByteCodesEqualsTheFloatCodeDefinitionBitForBit) {
  for (math::IgemmIsa isa : math::kIgemmIsas) {
    if (!math::igemm_isa_available(isa)) continue;
    for (int bits = 2; bits <= 8; ++bits)
      for (bool signed_input : {false, true}) {
        SCOPED_TRACE(testing::Message() << math::igemm_isa_name(isa) << " bits " << bits
                                        << " signed " << signed_input);
        QuantSpec spec = test_spec();
        spec.weight_bits = spec.act_bits = bits;
        spec.signed_input = signed_input;
        const float lo = signed_input ? -1.5f : -0.2f;
        const int qa = act_qmax(bits, signed_input), qw = quant::levels(bits);
        // The definition's codes of x and W, and the layer's output scale.
        auto codes = [&](const Tensor& x, const Param& w, float u, float s, std::vector<float>* xc,
                         std::vector<float>* wc) {
          xc->resize(static_cast<size_t>(x.numel()));
          wc->resize(static_cast<size_t>(w.value.numel()));
          quantize_act_codes(x.data(), x.numel(), u, bits, signed_input, xc->data());
          quantize_weight_codes(w.value.data(), w.value.numel(), s, bits, wc->data());
          return (u / static_cast<float>(qa)) * (s / static_cast<float>(qw));
        };
        for (int st : {1, 2})
          for (int variant = 0; variant < 3; ++variant) {  // GEMM, GEMM one per group, direct
            if (variant == 2 && st == 2) continue;
            const int64_t n = 5, ci = 6, co = 7, h = 7, w = 6;
            QuantContext ctx;
            QConv2d c("conv", ci, co, 3, st, 1, spec, 2, &ctx);
            c.set_gemm_isa(isa);
            c.set_direct_conv(variant == 2);
            if (variant == 1) c.set_column_bytes(1);
            fill(c.weight().value, 31, -0.5f, 0.5f);
            Tensor x({n, ci, h, w}), y;
            fill(x, 32, lo, 1.5f);  // beyond u: the top code is used
            c.forward(x, y, true);
            std::vector<float> xc, wc;
            const float scale =
                codes(x, c.weight(), c.act_step().value[0], c.weight_step().value[0], &xc, &wc);
            const int64_t ho = y.dim(2), wo = y.dim(3);
            for (int64_t b = 0; b < n; ++b)
              for (int64_t o = 0; o < co; ++o)
                for (int64_t oy = 0; oy < ho; ++oy)
                  for (int64_t ox = 0; ox < wo; ++ox) {
                    int64_t t = 0;
                    for (int64_t ch = 0; ch < ci; ++ch)
                      for (int ky = 0; ky < 3; ++ky)
                        for (int kx = 0; kx < 3; ++kx) {
                          const int64_t iy = oy * st - 1 + ky, ix = ox * st - 1 + kx;
                          if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                          t += static_cast<int64_t>(wc[((o * ci + ch) * 3 + ky) * 3 + kx]) *
                               static_cast<int64_t>(xc[((b * ci + ch) * h + iy) * w + ix]);
                        }
                    ASSERT_EQ(y[((b * co + o) * ho + oy) * wo + ox], scale * static_cast<float>(t))
                        << "stride " << st << " variant " << variant;
                  }
          }
        QuantContext ctx;
        QLinear l("fc", 37, 19, true, spec, 3, &ctx);
        l.set_gemm_isa(isa);
        fill(l.weight().value, 33, -0.5f, 0.5f);
        fill(l.bias().value, 34, -0.1f, 0.1f);
        Tensor x({11, 37}), y;
        fill(x, 35, lo, 1.5f);
        l.forward(x, y, true);
        std::vector<float> xc, wc;
        const float scale =
            codes(x, l.weight(), l.act_step().value[0], l.weight_step().value[0], &xc, &wc);
        for (int64_t i = 0; i < 11; ++i)
          for (int64_t j = 0; j < 19; ++j) {
            int64_t t = 0;
            for (int64_t k = 0; k < 37; ++k)
              t += static_cast<int64_t>(xc[i * 37 + k]) * static_cast<int64_t>(wc[j * 37 + k]);
            ASSERT_EQ(y[i * 19 + j], scale * static_cast<float>(t) + l.bias().value[j]);
          }
      }
  }
}

// A NaN input has no code: the layer reports the step non-finite (the trainer skips it).
TEST(QuantLayers, NanInputIsCountedAsNonFinite) {
  QuantContext ctx;
  QLinear l("fc", 4, 3, false, test_spec(), 1, &ctx);
  fill(l.weight().value, 1, -0.5f, 0.5f);
  Tensor x({2, 4}), y;
  fill(x, 2, 0.0f, 1.0f);
  l.forward(x, y, true);
  EXPECT_EQ(ctx.nonfinite, 0);
  x[5] = std::numeric_limits<float>::quiet_NaN();
  l.forward(x, y, true);
  EXPECT_EQ(ctx.nonfinite, 1);
}

QuantSpec lbt_spec() {
  QuantSpec spec = test_spec();
  spec.grad_bits = 4;
  spec.grad_policy.kind = quant::PolicyKind::kLbt;
  spec.grad_rounding = quant::Rounding::kStochastic;
  return spec;
}

TEST(QuantLayers, GradientQuantizerDefersThePolicyUpdateAndCountsNonFinite) {
  QuantContext ctx;
  const QuantSpec spec = lbt_spec();
  QLinear l("fc", 8, 8, false, spec, 3, &ctx);
  fill(l.weight().value, 8, -0.5f, 0.5f);
  Tensor x({16, 8}), y, dy({16, 8}), dx;
  fill(x, 9, 0.0f, 1.0f);
  fill(dy, 10, -1.0f, 1.0f);
  l.forward(x, y, true);
  l.backward(x, y, dy, &dx);  // first backward calibrates
  const float calibrated = l.grad_state().policy->gamma();
  l.backward(x, y, dy, &dx);
  EXPECT_EQ(l.grad_state().policy->gamma(), calibrated) << "gamma moved before commit_step";
  l.commit_step();
  EXPECT_NE(l.grad_state().policy->gamma(), calibrated) << "commit_step did not apply the rule";
  dy[5] = std::nanf("");
  ctx.nonfinite = 0;
  l.backward(x, y, dy, &dx);
  EXPECT_EQ(ctx.nonfinite, 1);
}

TEST(QuantLayers, CalibrationBatchIsQuantizedWithGammaOneAndCalibratesOnItsOwnGradient) {
  QuantContext ctx;
  const QuantSpec spec = lbt_spec();
  QLinear l("fc", 8, 8, false, spec, 3, &ctx);
  fill(l.weight().value, 8, -0.5f, 0.5f);
  Tensor x({16, 8}), y, dy({16, 8}), dx;
  fill(x, 9, 0.0f, 1.0f);
  fill(dy, 10, -1.0f, 1.0f);
  l.forward(x, y, true);
  ASSERT_TRUE(l.grad_state().policy->needs_calibration());
  l.backward(x, y, dy, &dx);
  // gamma from the full-precision dL/dY, but this batch quantized with gamma = 1.
  const std::optional<float> want =
      quant::calibrate_lbt(dy.data(), dy.numel(), quant::lbt_target(4, spec.grad_policy.alpha));
  ASSERT_TRUE(want.has_value());
  ASSERT_LT(*want, 1.0f);
  EXPECT_FALSE(l.grad_state().policy->needs_calibration());
  EXPECT_EQ(l.grad_state().policy->gamma(), *want);
  EXPECT_EQ(l.grad_state().last_gamma, 1.0f);
  // The next batch uses the calibrated gamma.
  l.commit_step(false);
  l.backward(x, y, dy, &dx);
  EXPECT_EQ(l.grad_state().last_gamma, *want);
}

TEST(QuantLayers, AllZeroGradientsEndTheCalibrationAtGammaOneWithAWarning) {
  QuantContext ctx;
  QLinear l("fc7", 8, 8, false, lbt_spec(), 3, &ctx);
  fill(l.weight().value, 8, -0.5f, 0.5f);
  Tensor x({16, 8}), y, dy({16, 8}), dx;
  fill(x, 9, 0.0f, 1.0f);
  l.forward(x, y, true);
  for (int i = 1; i < QuantizedOp::kMaxCalibrationTries; ++i) {
    l.backward(x, y, dy, &dx);  // dy is all zero: nothing to calibrate on
    l.commit_step(false);
    EXPECT_TRUE(l.grad_state().policy->needs_calibration()) << "try " << i;
    EXPECT_TRUE(ctx.warnings.empty());
  }
  l.backward(x, y, dy, &dx);
  l.commit_step(false);
  EXPECT_FALSE(l.grad_state().policy->needs_calibration()) << "still calibrating";
  EXPECT_EQ(l.grad_state().policy->gamma(), 1.0f);
  ASSERT_EQ(ctx.warnings.size(), 1u);
  EXPECT_NE(ctx.warnings[0].find("fc7"), std::string::npos) << ctx.warnings[0];
  // From now on the sign rule moves gamma.
  fill(dy, 10, -1.0f, 1.0f);
  l.backward(x, y, dy, &dx);
  l.commit_step(true);
  EXPECT_LT(l.grad_state().policy->gamma(), 1.0f);
}

TEST(QuantLayers, SignedInputStartsAtThreeStd) {
  QuantContext ctx;
  QuantSpec spec = test_spec();
  spec.signed_input = true;
  QLinear l("fc", 64, 4, false, spec, 0, &ctx);
  Tensor x({32, 64}), y;
  fill(x, 11, -2.0f, 1.0f);
  l.forward(x, y, true);
  double s = 0, s2 = 0;
  for (int64_t i = 0; i < x.numel(); ++i) s += x[i];
  const double mean = s / static_cast<double>(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) s2 += (x[i] - mean) * (x[i] - mean);
  EXPECT_FLOAT_EQ(l.act_step().value[0],
                  static_cast<float>(3.0 * std::sqrt(s2 / static_cast<double>(x.numel()))));
}

// logits of a freshly built model for input x (a training forward: the scales initialise on it).
std::vector<float> logits_of(const ModelSpec& spec, const Tensor& x) {
  Model m(spec, 5);
  Tensor logits;
  m.forward(x, logits, true);
  return std::vector<float>(logits.data(), logits.data() + logits.numel());
}

TEST(QuantModel, QuantizedFirstLayerKeepsNegativeInputs) {
  ModelSpec spec;
  spec.name = "mlp";
  spec.height = spec.width = 4;
  spec.mlp_hidden = {16, 16};
  spec.fp32_first = false;  // the first layer sees the (normalised, signed) data
  Tensor a({8, 1, 4, 4}), b({8, 1, 4, 4});
  fill(a, 12, -1.0f, -0.1f);
  fill(b, 13, -1.0f, -0.1f);
  // On the unsigned grid every negative input is code 0, so both batches would give the same
  // logits; on the signed grid they differ.
  EXPECT_NE(logits_of(spec, a), logits_of(spec, b));
}

TEST(QuantModel, SignedGridExactlyWhereTheInputCanBeNegative) {
  auto signs = [](const std::string& name, bool first_fp32, bool last_fp32, bool signed_data) {
    ModelSpec spec;
    spec.name = name;
    spec.fp32_first = first_fp32;
    spec.fp32_last = last_fp32;
    spec.signed_input = signed_data;
    Model m(spec, 1);
    std::string s;
    for (const QuantizedOp* q : m.quantized_ops()) s += q->signed_input() ? "s" : "u";
    return s;
  };
  EXPECT_EQ(signs("mlp", false, false, true), "suu");  // fc1 takes the data, the rest a ReLU
  EXPECT_EQ(signs("mlp", false, true, false), "uu");   // raw pixels in [0, 1]
  EXPECT_EQ(signs("cnn", false, false, true), "suuu");
  EXPECT_EQ(signs("cnn", true, true, true), "uu");
  const std::string resnet = signs("resnet20", true, false, true);  // fc follows bn_final
  EXPECT_EQ(resnet, std::string(18, 'u') + "s");
}

TEST(QuantModel, QuantizationWithNoQualifyingLayerIsAnError) {
  ModelSpec spec;
  spec.name = "mlp";
  spec.mlp_hidden = {32};  // fc1 and fc_out only: the first and the last layer, both fp32
  try {
    Model m(spec, 1);
    ADD_FAILURE() << "built an unquantized model although quantization was requested";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no layer qualifies"), std::string::npos) << e.what();
  }
  spec.fp32_last = false;
  EXPECT_NO_THROW(Model(spec, 1));
  spec.fp32_last = true;
  spec.quantized = false;
  EXPECT_NO_THROW(Model(spec, 1));
}

}  // namespace
}  // namespace int4ddp::nn
