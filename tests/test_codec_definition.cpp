// The codec against DESIGN.md section 2 written out independently here (r = fl(L / c) once per
// scope, z = fl(x * r), 16-bit uniforms, one Philox call per 8 elements), and the statistics of
// the stochastic rounding it defines: bias within 2^-16 of a step, and codes on a grid point plus a
// fraction f that take the upper neighbour with probability f.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/quant/codec.h"

namespace int4ddp::quant {
namespace {

// ---- DESIGN.md section 2, spelled out without the format.h helpers -----------------------------
// Only philox4x32_10 is shared (it is checked against Random123's known answers in test_philox).

float design_uniform(const RngKey& k, uint64_t i) {
  const uint64_t g = i / 8;
  const Philox4 w = philox4x32_10(Philox4{{static_cast<uint32_t>(g & 0xFFFFFFFFu),
                                           static_cast<uint32_t>(g >> 32), k.step, k.tensor_id}},
                                  k.seed, k.stream);
  const uint32_t word = w.v[(i % 8) / 2];
  const uint32_t h = i % 2 == 0 ? word & 0xFFFFu : word >> 16;
  return static_cast<float>(h) / 65536.0f;
}

// Codes (one int per element) and steps of quantizing x with p, straight from the text.
void design_quantize(const std::vector<float>& x, const QuantParams& p, std::vector<int>* q,
                     std::vector<float>* d) {
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t G = p.block_size == 0 ? std::max<int64_t>(n, 1) : p.block_size;
  const float L = static_cast<float>((1 << (p.bits - 1)) - 1);
  q->assign(n, 0);
  d->clear();
  for (int64_t b = 0; b * G < n || (n == 0 && b == 0); ++b) {
    const int64_t end = std::min(n, (b + 1) * G);
    float m = 0.0f;
    for (int64_t i = b * G; i < end; ++i)
      if (std::isfinite(x[i])) m = std::max(m, std::fabs(x[i]));
    const volatile float c = p.gamma * m;  // volatile: each value rounded to fp32 here
    float r = 0.0f;
    if (c > 0.0f) {
      const volatile float lc = L / c;
      r = std::isinf(lc) ? 3.40282347e+38f : lc;
    }
    d->push_back(c > 0.0f ? c / L : 0.0f);
    for (int64_t i = b * G; i < end; ++i) {
      if (!std::isfinite(x[i])) continue;
      const volatile float z = x[i] * r;
      float t;
      if (p.rounding == Rounding::kNearest) {
        t = std::nearbyint(z);  // default rounding mode: half to even
      } else {
        const volatile float s = z + design_uniform(p.key, static_cast<uint64_t>(i));
        t = std::floor(s);
      }
      (*q)[i] = static_cast<int>(std::min(std::max(t, -L), L));
    }
    if (n == 0) break;
  }
}

int code_at(const std::vector<uint8_t>& codes, int bits, int64_t i) {
  if (bits != 4) return static_cast<int8_t>(codes[i]);
  return i % 2 == 0 ? unpack_lo(codes[i / 2]) : unpack_hi(codes[i / 2]);
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
    if (isa_available(isa)) out.push_back(isa);
  return out;
}

TEST(CodecDefinition, ReferenceAndEveryIsaFollowTheText) {
  std::mt19937_64 rng(12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(5003);
  for (float& v : x) v = normal(rng) * (rng() % 16 == 0 ? 40.0f : 1.0f);
  x[7] = 0.0f;
  x[100] = NAN;
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      for (int64_t G : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{512}, int64_t{1000}}) {
        QuantParams p;
        p.bits = bits;
        p.rounding = r;
        p.block_size = G;
        p.gamma = 0.8f;
        p.key = RngKey{3, 1, 77, 9};
        std::vector<int> want;
        std::vector<float> steps;
        design_quantize(x, p, &want, &steps);
        const int64_t n = static_cast<int64_t>(x.size());
        std::vector<uint8_t> codes(packed_bytes(bits, n));
        std::vector<float> scales(num_scales(n, G));
        for (int impl = -1; impl < static_cast<int>(available_isas().size()); ++impl) {
          SCOPED_TRACE(testing::Message() << "bits " << bits << " rounding " << static_cast<int>(r)
                                          << " G " << G << " impl " << impl);
          if (impl < 0)
            quantize_ref(x.data(), n, p, codes.data(), scales.data());
          else
            quantize_isa(available_isas()[impl], x.data(), n, p, codes.data(), scales.data());
          ASSERT_EQ(scales.size(), steps.size());
          for (size_t s = 0; s < steps.size(); ++s) ASSERT_EQ(scales[s], steps[s]) << "scale " << s;
          for (int64_t i = 0; i < n; ++i) ASSERT_EQ(code_at(codes, bits, i), want[i]) << "i " << i;
        }
      }
    }
  }
}

// r comes from L / c, not from 1 / d: a clip where fl(L / c) != fl(1 / fl(c / L)) tells them
// apart (c = 0.7f * 3: found by search, checked here so the test keeps meaning something).
TEST(CodecDefinition, InverseStepIsLOverClipNotOneOverStep) {
  const int L = 7;
  float c = 0.0f;
  for (float v = 1.0f; v < 2.0f; v = std::nextafter(v, 2.0f)) {
    const volatile float d = v / L;
    const volatile float r1 = L / v;
    const volatile float r2 = 1.0f / d;
    if (r1 != r2) {
      c = v;
      break;
    }
  }
  ASSERT_GT(c, 0.0f) << "no clip separates L / c from 1 / d";
  EXPECT_EQ(inv_step_for_clip(c, 4), static_cast<float>(L) / c);
  EXPECT_EQ(step_for_clip(c, 4), c / static_cast<float>(L));
  EXPECT_EQ(inv_step_for_clip(0.0f, 4), 0.0f);
  EXPECT_EQ(inv_step_for_clip(1e-45f, 4), 3.40282347e+38f) << "saturates instead of +inf";
}

// ---- statistics of the stochastic rounding -----------------------------------------------------

// Exact, over all 65536 uniforms: E[q] - z for z = k + f lies in (-2^-16, 0] (the 16-bit uniform
// rounds f down to a multiple of 2^-16), so |bias| <= 2^-16 of a step, the bound DESIGN.md states.
TEST(CodecStochasticStatistics, ExactBiasOverAllUniformsIsWithinTwoToMinus16) {
  const double kBiasBound = std::ldexp(1.0, -16);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> frac(0.0f, 1.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const float z = static_cast<float>(static_cast<int>(rng() % 13) - 6) + frac(rng);
    double sum = 0.0;
    for (uint32_t h = 0; h < 65536; ++h) {
      const float u = uniform_from_half(h, 0);
      sum += quantize_stochastic(z, 1.0f, u, 8);  // r = 1: z = x
    }
    EXPECT_LE(std::fabs(sum / 65536.0 - z), kBiasBound) << "z = " << z;
  }
}

// Sampled through the codec (the Philox stream and its 16-bit layout): n copies of x = k + f in
// blocks whose maximum makes r = 1. The mean error of n independent draws has standard deviation
// sigma = sqrt(f (1 - f) / n); kSigmas = 5 leaves a false-alarm chance below 1e-6 per check, on top
// of the 2^-16 bias bound.
TEST(CodecStochasticStatistics, MeanErrorWithinBiasBoundPlusSamplingTolerance) {
  constexpr double kSigmas = 5.0;
  const double kBiasBound = std::ldexp(1.0, -16);
  const int64_t n = int64_t{1} << 22;
  const int64_t G = 512;
  for (Isa isa : available_isas()) {
    for (float v : {0.3f, -2.7f, 5.5f, 0.01f, 3.999f}) {
      std::vector<float> x(n, v);
      for (int64_t b = 0; b < n; b += G) x[b] = 7.0f;  // c = 7: d = r = 1 in every block (INT4)
      QuantParams p;
      p.rounding = Rounding::kStochastic;
      p.block_size = G;
      p.key = RngKey{2024, 0, 1, 0};
      std::vector<uint8_t> codes(packed_bytes(4, n));
      std::vector<float> scales(num_scales(n, G));
      quantize_isa(isa, x.data(), n, p, codes.data(), scales.data());
      double sum = 0.0;
      int64_t m = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (i % G == 0) continue;
        sum += code_at(codes, 4, i) - static_cast<double>(v);
        ++m;
      }
      const double f = v - std::floor(v);
      const double tol = kBiasBound + kSigmas * std::sqrt(f * (1.0 - f) / static_cast<double>(m));
      EXPECT_LE(std::fabs(sum / m), tol) << isa_name(isa) << " x = " << v;
    }
  }
}

// x = k + f with f a multiple of 2^-16: each code is k + 1 with probability exactly f, else k.
// The count of k + 1 among m draws is Binomial(m, f); allow kSigmas standard deviations. Checked
// over all elements and separately for each of the 8 positions of a Philox call (low and high
// halves of the four words), so a layout that reused or dropped a half would show.
TEST(CodecStochasticStatistics, CodesOnAGridPointPlusAFractionFollowTheFraction) {
  constexpr double kSigmas = 5.0;
  const int64_t n = int64_t{1} << 21;
  for (float f : {0.5f, 0.25f, 0.125f, 0.9375f, 0.0009765625f}) {
    const float x0 = 2.0f + f;  // grid point 2 plus f (d = 1)
    std::vector<float> x(n, x0);
    x[0] = 7.0f;
    QuantParams p;
    p.rounding = Rounding::kStochastic;
    p.key = RngKey{11, 4, 2, 8};
    std::vector<uint8_t> codes(packed_bytes(4, n));
    std::vector<float> scales(1);
    quantize(x.data(), n, p, codes.data(), scales.data());
    ASSERT_EQ(scales[0], 1.0f);
    int64_t up[8] = {}, total[8] = {};
    for (int64_t i = 1; i < n; ++i) {
      const int q = code_at(codes, 4, i);
      ASSERT_TRUE(q == 2 || q == 3) << "code " << q << " at " << i << " for x = " << x0;
      up[i % 8] += q == 3;
      ++total[i % 8];
    }
    int64_t all_up = 0, all = 0;
    for (int j = 0; j < 8; ++j) {
      const double mean = f * total[j], sd = std::sqrt(total[j] * f * (1.0 - f));
      EXPECT_LE(std::fabs(up[j] - mean), kSigmas * sd) << "position " << j << " f = " << f;
      all_up += up[j];
      all += total[j];
    }
    const double sd = std::sqrt(all * f * (1.0 - f));
    EXPECT_LE(std::fabs(all_up - f * all), kSigmas * sd) << "f = " << f;
  }
}

}  // namespace
}  // namespace int4ddp::quant
