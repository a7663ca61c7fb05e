// The codec: every fast path (portable, AVX2, AVX-512, whichever this CPU has) against the plain
// reference, byte for byte; and the reference against DESIGN.md section 2 itself.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/common/isa_override.h"
#include "kernels/quant/codec.h"

namespace int4ddp::quant {
namespace {

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
    if (isa_available(isa)) out.push_back(isa);
  return out;
}

// Gaussian data with heavy outliers, exact zeros, exact ties for rint, and (optionally) NaN/Inf.
std::vector<float> make_input(int64_t n, uint64_t seed, bool nonfinite) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    const int k = pick(rng);
    if (k < 3)
      x[i] = 0.0f;
    else if (k < 5)
      x[i] = 50.0f * normal(rng);  // outliers get clipped when gamma < 1
    else if (k < 7)
      x[i] = 0.5f * static_cast<float>(static_cast<int>(normal(rng) * 8));
    else
      x[i] = normal(rng);
  }
  if (nonfinite && n > 3) {
    x[n / 3] = std::numeric_limits<float>::quiet_NaN();
    x[n / 2] = std::numeric_limits<float>::infinity();
    x[n - 1] = -std::numeric_limits<float>::infinity();
  }
  return x;
}

struct Encoded {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  QuantStats stats;
};

Encoded encode(bool ref, Isa isa, const std::vector<float>& x, const QuantParams& p) {
  const int64_t n = static_cast<int64_t>(x.size());
  Encoded e;
  e.codes.assign(packed_bytes(p.bits, n) + 1, 0xAB);  // +1 guard byte must stay untouched
  e.scales.assign(num_scales(n, p.block_size) + 1, -1.0f);
  e.stats = ref ? quantize_ref(x.data(), n, p, e.codes.data(), e.scales.data())
                : quantize_isa(isa, x.data(), n, p, e.codes.data(), e.scales.data());
  return e;
}

void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t ua, ub;
    std::memcpy(&ua, &a[i], 4);
    std::memcpy(&ub, &b[i], 4);
    ASSERT_EQ(ua, ub) << what << " differs at " << i << ": " << a[i] << " vs " << b[i];
  }
}

// One comparison of every ISA against the reference, encode and decode.
void check_all_isas(const std::vector<float>& x, const QuantParams& p) {
  const Encoded ref = encode(true, Isa::kPortable, x, p);
  ASSERT_EQ(ref.codes.back(), 0xAB) << "reference wrote past the code buffer";
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> ref_out(n, -7.0f);
  dequantize_ref(ref.codes.data(), ref.scales.data(), n, p.bits, p.block_size, ref_out.data());
  for (Isa isa : available_isas()) {
    SCOPED_TRACE(testing::Message() << isa_name(isa) << " bits=" << p.bits
                                    << " rounding=" << static_cast<int>(p.rounding)
                                    << " G=" << p.block_size << " n=" << n << " gamma=" << p.gamma);
    const Encoded got = encode(false, isa, x, p);
    ASSERT_EQ(got.codes, ref.codes);
    expect_same_bits(got.scales, ref.scales, "scale");
    EXPECT_EQ(got.stats.clipped, ref.stats.clipped);
    EXPECT_EQ(got.stats.nonfinite, ref.stats.nonfinite);
    EXPECT_EQ(got.stats.count, ref.stats.count);
    EXPECT_EQ(got.stats.absmax, ref.stats.absmax);
    std::vector<float> out(n, -9.0f);
    dequantize_isa(isa, ref.codes.data(), ref.scales.data(), n, p.bits, p.block_size, out.data());
    expect_same_bits(out, ref_out, "dequantized");
  }
}

class CodecMatchesReference : public testing::TestWithParam<int> {};

// Every bit-width, both roundings, block sizes 1..64 and the interesting larger ones (around the
// 4096-code staging tile too), the small lengths of the issue.
TEST_P(CodecMatchesReference, SmallLengthsAllBlockSizes) {
  const int bits = GetParam();
  std::vector<int64_t> blocks = {0};
  for (int64_t g = 1; g <= 64; ++g) blocks.push_back(g);
  for (int64_t g : {100, 255, 256, 511, 512, 513, 1000, 1023, 2048, 3001, 4095, 4096})
    blocks.push_back(g);
  for (int64_t n : {0, 1, 2, 3, 4, 5, 31, 33, 511, 513}) {
    const std::vector<float> x = make_input(n, 1000 + n, n % 2 == 1);
    for (int64_t g : blocks) {
      for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
        QuantParams p;
        p.bits = bits;
        p.rounding = r;
        p.block_size = g;
        p.gamma = (g % 3 == 0) ? 0.37f : 1.0f;
        p.key = RngKey{42, 1, 7, static_cast<uint32_t>(g)};
        check_all_isas(x, p);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// Lengths that cross the staging tile with odd block sizes, and the 2^20 + 7 of the issue.
TEST_P(CodecMatchesReference, LargeLengths) {
  const int bits = GetParam();
  struct Case {
    int64_t n, g;
  };
  const Case cases[] = {{4096 * 3 + 5, 7},    {4096 * 3 + 5, 4097}, {10001, 1},
                        {10001, 4096},        {(1 << 20) + 7, 0},   {(1 << 20) + 7, 512},
                        {(1 << 20) + 7, 513}, {(1 << 20) + 7, 3}};
  for (const Case& c : cases) {
    const std::vector<float> x = make_input(c.n, 7 * c.n + c.g, c.g % 2 == 1);
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      QuantParams p;
      p.bits = bits;
      p.rounding = r;
      p.block_size = c.g;
      p.gamma = 0.8f;
      p.key = RngKey{123456789u, 3, 100000, 9};
      check_all_isas(x, p);
      if (HasFatalFailure()) return;
    }
  }
}

// Inputs on which the fast paths must fall back to the exact division: every x / d an exact tie
// (k + 1/2), grid values (x / d integer, so floor(x / d + u) sits on a boundary when u is small),
// steps whose reciprocal is not a normal float, and a sweep over every block size 1..4096.
TEST(CodecMatchesReferenceEdges, TiesGridAndDenormalSteps) {
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int> k(-8, 7);
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    const int L = levels(bits);
    std::vector<float> ties(3001), grid(3001);
    for (size_t i = 0; i < ties.size(); ++i) {
      ties[i] = (static_cast<float>(k(rng) % L) + 0.5f) * 0.25f;
      grid[i] = static_cast<float>(k(rng) % (L + 1)) * 0.25f;
    }
    ties[0] = grid[0] = static_cast<float>(L) * 0.25f;  // d = 0.25 exactly
    std::vector<float> tiny(999);
    for (size_t i = 0; i < tiny.size(); ++i) tiny[i] = 1e-41f * static_cast<float>(k(rng));
    std::vector<float> huge(999);
    for (size_t i = 0; i < huge.size(); ++i) huge[i] = 3e38f * static_cast<float>(k(rng)) / 8.0f;
    for (const std::vector<float>* x : {&ties, &grid, &tiny, &huge}) {
      for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
        QuantParams p;
        p.bits = bits;
        p.rounding = r;
        p.key = RngKey{9, 9, 9, 9};
        check_all_isas(*x, p);
        p.block_size = 512;
        check_all_isas(*x, p);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(CodecMatchesReferenceEdges, EveryBlockSizeUpTo4096) {
  const std::vector<float> x = make_input(4100, 77, true);
  for (int64_t g = 1; g <= 4096; ++g) {
    QuantParams p;
    p.bits = 4;
    p.rounding = g % 2 ? Rounding::kStochastic : Rounding::kNearest;
    p.block_size = g;
    p.key = RngKey{5, 0, static_cast<uint32_t>(g), 1};
    check_all_isas(x, p);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Bits, CodecMatchesReference, testing::Range(kMinBits, kMaxBits + 1),
                         [](const testing::TestParamInfo<int>& i) {
                           return "int" + std::to_string(i.param);
                         });

// ---- the reference against the format definition ---------------------------------------------

Encoded encode_ref(const std::vector<float>& x, const QuantParams& p) {
  return encode(true, Isa::kPortable, x, p);
}

std::vector<float> decode_ref(const Encoded& e, int64_t n, const QuantParams& p) {
  std::vector<float> out(n);
  dequantize_ref(e.codes.data(), e.scales.data(), n, p.bits, p.block_size, out.data());
  return out;
}

int code_at(const Encoded& e, int bits, int64_t i) {
  if (bits != 4) return static_cast<int8_t>(e.codes[i]);
  return i % 2 == 0 ? unpack_lo(e.codes[i / 2]) : unpack_hi(e.codes[i / 2]);
}

TEST(CodecReference, NibbleLayoutLowNibbleIsTheEvenElement) {
  QuantParams p;  // 4 bits, nearest, per tensor, gamma 1: max 7 gives d = 1
  const std::vector<float> x = {1, -1, 7, -7, 3};
  const Encoded e = encode_ref(x, p);
  EXPECT_EQ(e.scales[0], 1.0f);
  EXPECT_EQ(e.codes[0], 0xF1);
  EXPECT_EQ(e.codes[1], 0x97);
  EXPECT_EQ(e.codes[2], 0x03);  // odd tail: high nibble 0
}

TEST(CodecReference, NearestRoundsHalfToEven) {
  QuantParams p;
  const std::vector<float> x = {7.0f, 0.5f, 1.5f, 2.5f, -2.5f, 3.5f, -0.5f, 6.5f};
  const Encoded e = encode_ref(x, p);
  const int expected[] = {7, 0, 2, 2, -2, 4, 0, 6};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(code_at(e, 4, i), expected[i]) << "x = " << x[i];
}

TEST(CodecReference, GridValuesRoundTripExactly) {
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    const int L = levels(bits);
    const float d = 0.25f;  // power of two: x = q * d and x / d are exact
    std::vector<float> x;
    for (int q = -L; q <= L; ++q) x.push_back(q * d);
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      for (int64_t g : {int64_t{0}, int64_t{2 * L + 1}}) {
        QuantParams p;
        p.bits = bits;
        p.rounding = r;
        p.block_size = g;
        const Encoded e = encode_ref(x, p);
        EXPECT_EQ(e.scales[0], d);
        EXPECT_EQ(decode_ref(e, x.size(), p), x) << "bits " << bits;
      }
    }
  }
}

TEST(CodecReference, ClippingSaturatesAtPlusMinusL) {
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    const int L = levels(bits);
    QuantParams p;
    p.bits = bits;
    p.gamma = 0.25f;
    const std::vector<float> x = {-100.0f, -30.0f, -25.0f, 0.0f, 24.0f, 26.0f, 99.0f, 100.0f};
    const Encoded e = encode_ref(x, p);  // c = 25
    EXPECT_EQ(code_at(e, bits, 0), -L);
    EXPECT_EQ(code_at(e, bits, 1), -L);
    EXPECT_EQ(code_at(e, bits, 2), -L);  // exactly at the clip: not clipped, still -L
    EXPECT_EQ(code_at(e, bits, 6), L);
    EXPECT_EQ(code_at(e, bits, 7), L);
    EXPECT_EQ(e.stats.clipped, 5);  // |x| > 25: -100, -30, 26, 99, 100
  }
}

TEST(CodecReference, ExtremeValuesBothSigns) {
  // FLT_MAX and -FLT_MAX, and a tensor whose only large value is negative: codes +-L, never -L-1.
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    const int L = levels(bits);
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      QuantParams p;
      p.bits = bits;
      p.rounding = r;
      const std::vector<float> x = {FLT_MAX, -FLT_MAX, 1.0f, -FLT_MIN, FLT_MIN};
      Encoded e = encode_ref(x, p);
      EXPECT_EQ(code_at(e, bits, 0), L);
      EXPECT_EQ(code_at(e, bits, 1), -L);
      EXPECT_EQ(e.stats.nonfinite, 0);
      const std::vector<float> y = {-3.0f, 1.0f, 0.0f};
      e = encode_ref(y, p);
      EXPECT_EQ(code_at(e, bits, 0), -L);
      EXPECT_EQ(decode_ref(e, 3, p)[0], -3.0f);
      for (int64_t i = 0; i < 3; ++i) EXPECT_GE(code_at(e, bits, i), -L);
    }
  }
}

TEST(CodecReference, AllZeroGivesZeroCodesAndZeroStep) {
  QuantParams p;
  p.rounding = Rounding::kStochastic;
  p.block_size = 4;
  const std::vector<float> x(10, 0.0f);
  const Encoded e = encode_ref(x, p);
  for (int64_t i = 0; i < packed_bytes(4, 10); ++i) EXPECT_EQ(e.codes[i], 0);
  for (int64_t s = 0; s < 3; ++s) EXPECT_EQ(e.scales[s], 0.0f);
  EXPECT_EQ(e.stats.clipped, 0);
  EXPECT_EQ(decode_ref(e, 10, p), x);
}

TEST(CodecReference, NonFiniteIsCountedAndNeverCodedAsANumber) {
  QuantParams p;
  p.bits = 8;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x = {1.0f, nan, -inf, 2.0f, inf};
  for (Isa isa : available_isas()) {
    const Encoded e = encode(false, isa, x, p);
    EXPECT_EQ(e.stats.nonfinite, 3) << isa_name(isa);
    EXPECT_EQ(e.stats.absmax, 2.0f) << "non-finite values must not set the scale";
    EXPECT_EQ(code_at(e, 8, 1), 0);
    EXPECT_EQ(code_at(e, 8, 2), 0);
    EXPECT_EQ(code_at(e, 8, 3), 127);
  }
}

TEST(CodecReference, PerBlockScalesFollowTheBlockMax) {
  QuantParams p;
  p.bits = 4;
  p.block_size = 3;
  p.gamma = 0.5f;
  const std::vector<float> x = {1, -14, 2, 0.5f, 0.25f, 0, 3};
  const Encoded e = encode_ref(x, p);
  ASSERT_EQ(num_scales(7, 3), 3);
  EXPECT_EQ(e.scales[0], 0.5f * 14 / 7);
  EXPECT_EQ(e.scales[1], 0.5f * 0.5f / 7);
  EXPECT_EQ(e.scales[2], 0.5f * 3 / 7);
}

TEST(CodecReference, StochasticRoundingIsUnbiased) {
  // n copies of x in a block whose max makes d = 1: each code is floor(x + u), whose mean is x.
  // Per draw the error e has |e| < 1 and variance f(1 - f) <= 1/4 (f = frac(x)), so the mean of n
  // independent draws has standard deviation <= 1 / (2 sqrt(n)); allow 5 of them.
  const int64_t n = 1 << 20;
  const double bound = 5.0 / (2.0 * std::sqrt(static_cast<double>(n)));
  for (float v : {0.3f, -2.7f, 5.5f, 0.01f}) {
    std::vector<float> x(n, v);
    x[0] = 7.0f;  // d = 1 for INT4
    QuantParams p;
    p.rounding = Rounding::kStochastic;
    p.key = RngKey{2024, 0, 1, 0};
    const Encoded e = encode(false, best_isa(), x, p);
    const std::vector<float> y = decode_ref(e, n, p);
    double sum = 0;
    for (int64_t i = 1; i < n; ++i) sum += y[i] - v;
    EXPECT_LT(std::fabs(sum / (n - 1)), bound) << "x = " << v;
  }
}

TEST(CodecReference, StochasticIsReproducibleAndKeyed) {
  const std::vector<float> x = make_input(4099, 5, false);
  QuantParams p;
  p.rounding = Rounding::kStochastic;
  p.block_size = 512;
  p.key = RngKey{1, 2, 3, 4};
  const Encoded a = encode_ref(x, p);
  EXPECT_EQ(encode_ref(x, p).codes, a.codes);
  for (int field = 0; field < 4; ++field) {
    QuantParams q = p;
    uint32_t* w[] = {&q.key.seed, &q.key.stream, &q.key.step, &q.key.tensor_id};
    *w[field] += 1;
    EXPECT_NE(encode_ref(x, q).codes, a.codes) << "key field " << field << " has no effect";
  }
}

// Element indices whose Philox group crosses 2^32 (the counter's high word changes inside a batch
// of instances the vector codecs make together), at offsets that are not a multiple of 8 or even;
// and group-aligned offsets that end just before, start at or lie past the boundary (the AVX2
// pair layout of the words is used only where no batch crosses it).
TEST(CodecMatchesReferenceEdges, IndexOffsetsAcrossTheHighCounterWord) {
  const int64_t boundary = int64_t{8} << 32;  // element index of group 2^32
  for (int64_t offset : {boundary - 40, boundary - 37, boundary - 3, boundary - 1000, int64_t{5},
                         boundary - 4200, boundary - 4164, boundary, boundary + 64})
    for (int64_t n : {200, 1000, 4100})
      for (int bits : {4, 8}) {
        const std::vector<float> x = make_input(n, 31 + n, false);
        for (int64_t g : {0, 7, 64, 512}) {
          QuantParams p;
          p.bits = bits;
          p.rounding = Rounding::kStochastic;
          p.block_size = g;
          p.index_offset = offset;
          p.key = RngKey{11, 2, 3, 4};
          check_all_isas(x, p);
          if (HasFatalFailure()) return;
        }
      }
}

// INT4 decodes larger than the last-level cache take the streaming kernels (non-temporal stores
// after a scalar head up to a 32-byte aligned output): every head length, odd and even block
// sizes (scopes starting at a high nibble) and one scope, against the reference.
TEST(CodecMatchesReferenceEdges, StreamedInt4DecodeAtEveryOutputAlignment) {
  const int64_t n = (int64_t{32} << 20) / 4 + 45;  // just past the streaming threshold
  std::mt19937_64 rng(77);
  std::vector<uint8_t> codes(packed_bytes(4, n));
  for (uint8_t& c : codes) c = static_cast<uint8_t>(rng());
  for (int64_t g : {int64_t{512}, int64_t{0}, int64_t{7}}) {
    std::vector<float> scales(num_scales(n, g));
    for (float& s : scales) s = std::ldexp(static_cast<float>(rng() % 1000 + 1), -12);
    std::vector<float> ref(n);
    dequantize_ref(codes.data(), scales.data(), n, 4, g, ref.data());
    std::vector<float> buf(n + 8);
    for (int64_t off : {0, 3, 5})
      for (Isa isa : available_isas()) {
        SCOPED_TRACE(testing::Message() << isa_name(isa) << " G=" << g << " offset=" << off);
        std::fill(buf.begin(), buf.end(), -9.0f);
        dequantize_isa(isa, codes.data(), scales.data(), n, 4, g, buf.data() + off);
        const std::vector<float> got(buf.begin() + off, buf.begin() + off + n);
        expect_same_bits(got, ref, "dequantized");
        if (HasFatalFailure()) return;
        for (int64_t i = 0; i < off; ++i) ASSERT_EQ(buf[i], -9.0f) << "wrote before the output";
        for (int64_t i = off + n; i < n + 8; ++i) ASSERT_EQ(buf[i], -9.0f) << "wrote past it";
      }
  }
}

// A clip far below the data (gamma 1e-30): x * r overflows the int32 range and, for the largest
// inputs, to Inf; the codes must still saturate at +-L with the right sign.
TEST(CodecMatchesReferenceEdges, ScaledValuesBeyondInt32AndInfinity) {
  std::vector<float> x = make_input(4100, 5, false);
  for (size_t i = 0; i < x.size(); i += 17) x[i] = (i % 2 ? 1e30f : -1e30f);
  for (size_t i = 5; i < x.size(); i += 23) x[i] = (i % 2 ? 1e-31f : -3e-31f);
  for (int bits = kMinBits; bits <= kMaxBits; ++bits)
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic})
      for (int64_t g : {0, 512, 33}) {
        QuantParams p;
        p.bits = bits;
        p.rounding = r;
        p.block_size = g;
        p.gamma = 1e-30f;
        p.key = RngKey{1, 2, 3, 4};
        check_all_isas(x, p);
        if (HasFatalFailure()) return;
      }
}

// Quantizing a tensor in block-aligned pieces with index_offset = piece start gives the bytes and
// scales of one call, for the reference and every ISA (the two-shot all-reduce relies on it).
TEST(CodecMatchesReferenceEdges, IndexOffsetPiecesEqualOneCall) {
  for (int bits : {4, 8, 3}) {
    for (int64_t G : {6, 64, 512}) {
      const int64_t n = 7 * G + 5;
      const std::vector<float> x = make_input(n, 17, false);
      QuantParams p;
      p.bits = bits;
      p.rounding = Rounding::kStochastic;
      p.block_size = G;
      p.gamma = 0.9f;
      p.key = RngKey{3, 1, 2, 9};
      const Encoded whole = encode_ref(x, p);
      for (int variant = 0; variant < 1 + static_cast<int>(available_isas().size()); ++variant) {
        std::vector<uint8_t> codes(packed_bytes(bits, n));
        std::vector<float> scales(num_scales(n, G));
        for (int64_t start = 0; start < n; start += 2 * G) {
          const int64_t len = std::min(2 * G, n - start);
          QuantParams q = p;
          q.index_offset = start;
          uint8_t* c = codes.data() + packed_bytes(bits, start);
          float* sc = scales.data() + start / G;
          if (variant == 0)
            quantize_ref(x.data() + start, len, q, c, sc);
          else
            quantize_isa(available_isas()[variant - 1], x.data() + start, len, q, c, sc);
        }
        codes.push_back(0xAB);  // encode() leaves a guard byte after the codes
        scales.push_back(-1.0f);
        EXPECT_EQ(codes, whole.codes) << "bits " << bits << " G " << G << " variant " << variant;
        EXPECT_EQ(scales, whole.scales) << "bits " << bits << " G " << G << " variant " << variant;
      }
    }
  }
}

// quantize_piece over uneven pieces, with the scale basis found piecewise, gives quantize()'s codes
// and clip count for the whole tensor (what the quantized layers do on several threads).
TEST(CodecPieces, PiecesWithAGivenAbsmaxEqualOneCall) {
  for (int bits : {4, 8, 3})
    for (Rounding rounding : {Rounding::kNearest, Rounding::kStochastic})
      for (bool nonfinite : {false, true}) {
        const int64_t n = 5003;
        const std::vector<float> x = make_input(n, 29 + bits, nonfinite);
        QuantParams p;
        p.bits = bits;
        p.rounding = rounding;
        p.gamma = 0.7f;
        p.key = RngKey{5, 2, 8, 4};
        std::vector<uint8_t> packed(packed_bytes(bits, n));
        float step = 0.0f;
        const QuantStats st = quantize(x.data(), n, p, packed.data(), &step);
        std::vector<float> whole(n);
        const float unit = 1.0f;
        dequantize(packed.data(), &unit, n, bits, 0, whole.data());

        const std::vector<int64_t> cuts = {0, 1, 700, 701, 2048, 4999, n};
        float absmax = 0.0f;
        int64_t nf = 0;
        for (size_t c = 0; c + 1 < cuts.size(); ++c)
          absmax = std::max(absmax, finite_absmax(x.data() + cuts[c], cuts[c + 1] - cuts[c], &nf));
        EXPECT_EQ(nf, st.nonfinite);
        std::vector<int8_t> codes(n);
        int64_t clipped = 0;
        for (size_t c = 0; c + 1 < cuts.size(); ++c) {
          QuantParams q = p;
          q.index_offset = cuts[c];
          clipped += quantize_piece(x.data() + cuts[c], cuts[c + 1] - cuts[c], q, absmax, nf == 0,
                                    codes.data() + cuts[c]);
        }
        EXPECT_EQ(clipped, st.clipped);
        EXPECT_EQ(step_for_clip(p.gamma * absmax, bits), step);
        int64_t wrong = 0;
        for (int64_t i = 0; i < n; ++i) wrong += static_cast<float>(codes[i]) != whole[i];
        EXPECT_EQ(wrong, 0) << "bits " << bits << " nonfinite " << nonfinite;
      }
  QuantParams blocked;
  blocked.block_size = 64;
  int8_t code = 0;
  const float one = 1.0f;
  EXPECT_THROW(quantize_piece(&one, 1, blocked, 1.0f, true, &code), Error);
}

// A clip c whose inverse step misses: fl(c * fl(L / c)) < L, so with stochastic rounding c itself
// codes L - 1 when u = 0 (and -c codes -L + 1 for b = 8 when u is near 1), while values beyond c
// code +-L. Searched upwards from 1.
float clip_whose_inverse_misses(int bits) {
  const float L = static_cast<float>(levels(bits));
  for (float c = 1.0f;; c = std::nextafter(c, 2.0f))
    if (c * inv_step_for_clip(c, bits) < L) return c;
}

// Given clips saturate before the multiply: the codes of x beyond +-c_b are those of +-c_b, also
// where they would differ from x's own (checked to occur, so this test fails without the clamp),
// on the reference and every ISA; the clipped count is the number beyond c_b.
TEST(CodecClips, ValuesBeyondTheClipCodeAsTheClip) {
  for (int bits : {4, 8}) {
    const float c = clip_whose_inverse_misses(bits);
    const int64_t G = 512, n = int64_t{1} << 18;
    std::vector<float> x(n), y(n), clips(n / G, c);
    for (int64_t i = 0; i < n; ++i) {
      const float sign = (i / 3) % 2 == 0 ? 1.0f : -1.0f;
      x[i] = sign * (i % 3 == 0 ? 1.5f * c : (i % 3 == 1 ? c : 0.5f * c));
      y[i] = sign * std::min(std::fabs(x[i]), c);
    }
    QuantParams p;
    p.bits = bits;
    p.rounding = Rounding::kStochastic;
    p.block_size = G;
    p.key = RngKey{5, 6, 7, 8};
    // y's block max is c: gamma 1 quantizes it with the clip c.
    std::vector<uint8_t> want(packed_bytes(bits, n)), got(want.size());
    std::vector<float> want_scales(n / G), scales(n / G);
    quantize_ref(y.data(), n, p, want.data(), want_scales.data());
    const float r = inv_step_for_clip(c, bits);
    int64_t differ = 0;  // elements whose unclamped code would differ
    for (int64_t i = 0; i < n; ++i) {
      const float u = philox_uniform(p.key, static_cast<uint64_t>(i));
      differ += quantize_stochastic(x[i], r, u, bits) != quantize_stochastic(y[i], r, u, bits);
    }
    EXPECT_GT(differ, 0) << "bits " << bits << ": no element where saturation matters";
    QuantParams pc = p;
    pc.clips = clips.data();
    const QuantStats st = quantize_ref(x.data(), n, pc, got.data(), scales.data());
    EXPECT_EQ(got, want) << "ref, bits " << bits;
    EXPECT_EQ(scales, want_scales);
    EXPECT_EQ(st.clipped, (n + 2) / 3);
    for (Isa isa : available_isas()) {
      std::fill(got.begin(), got.end(), uint8_t{0});
      const QuantStats si = quantize_isa(isa, x.data(), n, pc, got.data(), scales.data());
      EXPECT_EQ(got, want) << isa_name(isa) << ", bits " << bits;
      EXPECT_EQ(scales, want_scales) << isa_name(isa);
      EXPECT_EQ(si.clipped, st.clipped) << isa_name(isa);
    }
  }
}

TEST(CodecClips, BadClipsAreRefused) {
  std::vector<float> x(100, 1.0f), scales(2);
  std::vector<uint8_t> codes(50);
  std::vector<float> clips = {1.0f, 0.5f};
  QuantParams p;
  p.clips = clips.data();
  EXPECT_THROW(quantize_ref(x.data(), 100, p, codes.data(), scales.data()), Error)
      << "clips need per-block scales";
  EXPECT_THROW(quantize(x.data(), 100, p, codes.data(), scales.data()), Error);
  p.block_size = 64;
  EXPECT_NO_THROW(quantize(x.data(), 100, p, codes.data(), scales.data()));
  for (float bad :
       {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    clips[1] = bad;
    EXPECT_THROW(quantize_ref(x.data(), 100, p, codes.data(), scales.data()), Error) << bad;
    EXPECT_THROW(quantize(x.data(), 100, p, codes.data(), scales.data()), Error) << bad;
  }
}

// quantize_feedback (v = x + e quantized, e_out = v - x^, dq_out = x^) on every ISA against the
// reference, which is the step-by-step definition: every bit-width, both roundings, even and odd
// block sizes, lengths around the 32- and 64-element steps, NaN/Inf in x and sums that overflow,
// given clips, odd index offsets, each output left out, e_out in place over e, e_out streamed or
// not.
TEST(CodecFeedback, MatchesTheReferenceOnEveryIsa) {
  struct Case {
    int bits;
    int64_t g, n;
  };
  std::vector<Case> cases;
  for (int bits : {4, 8, 2})
    for (int64_t g : {int64_t{0}, int64_t{2}, int64_t{7}, int64_t{64}, int64_t{126}, int64_t{512},
                      int64_t{513}, int64_t{1000}})
      for (int64_t n : {0, 1, 31, 33, 95, 1023, 5003}) cases.push_back({bits, g, n});
  int variant = 0;
  for (const Case& cs : cases) {
    ++variant;
    std::vector<float> x = make_input(cs.n, 77 + cs.n, variant % 3 == 0);
    std::vector<float> e = make_input(cs.n, 99 + cs.n, false);
    for (float& v : e) v *= 0.25f;
    if (cs.n > 40 && variant % 4 == 1) {  // a sum that overflows to +inf from two finite values
      x[20] = FLT_MAX;
      e[20] = FLT_MAX;
    }
    std::vector<float> clips;
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      QuantParams p;
      p.bits = cs.bits;
      p.rounding = r;
      p.block_size = cs.g;
      p.gamma = variant % 2 ? 1.0f : 0.6f;
      p.index_offset = variant % 5 == 0 ? 3 : 1024 * variant;
      p.key = RngKey{11, 12, static_cast<uint32_t>(variant), 13};
      if (cs.g > 0 && variant % 7 == 2) {
        clips.assign(static_cast<size_t>(num_scales(cs.n, cs.g)), 0.8f);
        if (!clips.empty()) clips[0] = 0.0f;
        p.clips = clips.data();
      }
      const bool with_e = variant % 6 != 5, with_eo = variant % 8 != 3, with_dq = variant % 2 == 0;
      const int64_t n = cs.n;
      std::vector<uint8_t> want_codes(packed_bytes(cs.bits, n) + 1, 0xAB);
      std::vector<float> want_scales(num_scales(n, cs.g)), want_e(n, -3.0f), want_dq(n, -5.0f);
      const QuantStats want = quantize_feedback_ref(
          x.data(), with_e ? e.data() : nullptr, n, p, want_codes.data(), want_scales.data(),
          with_eo ? want_e.data() : nullptr, with_dq ? want_dq.data() : nullptr);
      for (Isa isa : available_isas()) {
        SCOPED_TRACE(testing::Message()
                     << isa_name(isa) << " bits=" << cs.bits << " G=" << cs.g << " n=" << n
                     << " rounding=" << static_cast<int>(r) << " e=" << with_e
                     << " e_out=" << with_eo << " dq=" << with_dq << " clips=" << !!p.clips);
        std::vector<uint8_t> codes(want_codes.size(), 0xAB);
        std::vector<float> scales(want_scales.size()), eo(n, -3.0f), dq(n, -5.0f);
        const QuantStats got = quantize_feedback_isa(
            isa, x.data(), with_e ? e.data() : nullptr, n, p, codes.data(), scales.data(),
            with_eo ? eo.data() : nullptr, with_dq ? dq.data() : nullptr, variant % 3 != 0);
        ASSERT_EQ(codes, want_codes);
        expect_same_bits(scales, want_scales, "scale");
        expect_same_bits(eo, want_e, "e_out");
        expect_same_bits(dq, want_dq, "dq_out");
        EXPECT_EQ(got.clipped, want.clipped);
        EXPECT_EQ(got.nonfinite, want.nonfinite);
        EXPECT_EQ(got.count, want.count);
        EXPECT_EQ(got.absmax, want.absmax);
        if (with_e && with_eo) {  // in place: e_out over e
          std::vector<float> inplace = e;
          quantize_feedback_isa(isa, x.data(), inplace.data(), n, p, codes.data(), scales.data(),
                                inplace.data(), nullptr, true);
          expect_same_bits(inplace, want_e, "e_out in place");
        }
        if (HasFatalFailure()) return;
      }
    }
  }
}

// With no e and no outputs it is quantize(); with e it is quantize() of the materialised sum.
TEST(CodecFeedback, IsQuantizeOfTheSum) {
  const int64_t n = 4099, G = 512;
  const std::vector<float> x = make_input(n, 5, false), e = make_input(n, 6, false);
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = x[i] + e[i];
  QuantParams p;
  p.rounding = Rounding::kStochastic;
  p.block_size = G;
  p.key = RngKey{1, 2, 3, 4};
  std::vector<uint8_t> a(packed_bytes(4, n)), b(a.size());
  std::vector<float> sa(num_scales(n, G)), sb(sa.size()), dq(n), eo(n);
  quantize(v.data(), n, p, a.data(), sa.data());
  quantize_feedback(x.data(), e.data(), n, p, b.data(), sb.data(), eo.data(), dq.data());
  EXPECT_EQ(a, b);
  expect_same_bits(sa, sb, "scale");
  std::vector<float> want_dq(n);
  dequantize(a.data(), sa.data(), n, 4, G, want_dq.data());
  expect_same_bits(dq, want_dq, "dq_out");
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(eo[i], v[i] - want_dq[i]) << i;
  quantize_feedback(x.data(), nullptr, n, p, b.data(), sb.data(), nullptr, nullptr);
  quantize(x.data(), n, p, a.data(), sa.data());
  EXPECT_EQ(a, b);
}

TEST(CodecErrors, BadParametersNameTheField) {
  const std::vector<float> x = {1.0f, 2.0f};
  uint8_t codes[2];
  float scales[2];
  auto expect_error = [&](QuantParams p, const char* needle) {
    try {
      quantize(x.data(), 2, p, codes, scales);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  QuantParams p;
  p.bits = 1;
  expect_error(p, "bits");
  p.bits = 9;
  expect_error(p, "bits");
  p = QuantParams{};
  p.gamma = 0.0f;
  expect_error(p, "gamma");
  p.gamma = 1.5f;
  expect_error(p, "gamma");
  p.gamma = std::numeric_limits<float>::quiet_NaN();
  expect_error(p, "gamma");
  p = QuantParams{};
  p.block_size = -1;
  expect_error(p, "block_size");
  EXPECT_THROW(quantize(x.data(), -1, QuantParams{}, codes, scales), Error);
  EXPECT_THROW(quantize(nullptr, 2, QuantParams{}, codes, scales), Error);
  EXPECT_THROW(dequantize(codes, scales, 2, 9, 0, scales), Error);
}

TEST(CodecDispatch, ReportsAndSelectsIsas) {
  EXPECT_TRUE(isa_available(Isa::kPortable));
  EXPECT_TRUE(isa_available(best_isa()));
  const Isa before = current_isa();
  set_isa(Isa::kPortable);
  EXPECT_EQ(current_isa(), Isa::kPortable);
  set_isa(before);
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_available(isa)) {
      EXPECT_THROW(set_isa(isa), Error);
    }
  }
}

// The shared parser of INT4DDP_ISA / INT4DDP_GEMM_ISA (kernels/common/isa_override.h), on a
// variable of its own so that the process's real overrides are untouched.
class IsaOverrideEnv {
 public:
  static constexpr const char* kVar = "INT4DDP_TEST_ISA_OVERRIDE";
  explicit IsaOverrideEnv(const char* value) {
    if (value)
      setenv(kVar, value, 1);
    else
      unsetenv(kVar);
  }
  ~IsaOverrideEnv() { unsetenv(kVar); }
};

constexpr Isa kAllIsas[] = {Isa::kPortable, Isa::kAvx2, Isa::kAvx512};

Isa parse_override(bool avx512_available) {
  return isa_from_env(
      IsaOverrideEnv::kVar, kAllIsas, isa_name,
      [&](Isa isa) { return isa != Isa::kAvx512 || avx512_available; }, Isa::kAvx2);
}

std::string override_error(bool avx512_available) {
  try {
    parse_override(avx512_available);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(IsaOverride, UnsetOrEmptyGivesTheFallback) {
  {
    IsaOverrideEnv env(nullptr);
    EXPECT_EQ(parse_override(false), Isa::kAvx2);
  }
  IsaOverrideEnv env("");
  EXPECT_EQ(parse_override(false), Isa::kAvx2);
}

TEST(IsaOverride, PicksTheNamedIsa) {
  {
    IsaOverrideEnv env("portable");
    EXPECT_EQ(parse_override(false), Isa::kPortable);
  }
  IsaOverrideEnv env("avx512");
  EXPECT_EQ(parse_override(true), Isa::kAvx512);
}

TEST(IsaOverride, UnknownValueNamesVariableValueAndChoices) {
  IsaOverrideEnv env("AVX2");  // names are case-sensitive
  const std::string msg = override_error(true);
  EXPECT_NE(msg.find("INT4DDP_TEST_ISA_OVERRIDE = 'AVX2' is not one of portable, avx2, avx512"),
            std::string::npos)
      << msg;
}

TEST(IsaOverride, UnavailableIsaIsAnError) {
  IsaOverrideEnv env("avx512");
  const std::string msg = override_error(false);
  EXPECT_NE(msg.find("INT4DDP_TEST_ISA_OVERRIDE = avx512 is not available"), std::string::npos)
      << msg;
}

// The codec's own list and availability test, as current_isa() uses them.
TEST(IsaOverride, CodecNamesRoundTrip) {
  for (Isa isa : kAllIsas) {
    IsaOverrideEnv env(isa_name(isa));
    if (isa_available(isa))
      EXPECT_EQ(
          isa_from_env(IsaOverrideEnv::kVar, kAllIsas, isa_name, isa_available, Isa::kPortable),
          isa);
    else
      EXPECT_THROW(
          isa_from_env(IsaOverrideEnv::kVar, kAllIsas, isa_name, isa_available, Isa::kPortable),
          Error);
  }
}

}  // namespace
}  // namespace int4ddp::quant
