// The direct 3x3 convolution against its plain-loop definitions (conv3x3_*_ref), on every
// instruction set this CPU and build have (portable always, AVX2 and AVX-512 where available): fp32
// within a stated tolerance, integer codes (4 and 8 bits, including the splits the exactness bound
// forces) exactly; forward, backward data and backward weight, with = and +=.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/conv3x3.h"

namespace int4ddp::math {
namespace {

// fp32 results are compared with the double-accumulated reference relative to the sum of the
// magnitudes of the terms: the rounding error of a length-K sum is about sqrt(K) * 2^-24 of it
// (K <= 3 * 28 * 28 here, so at most 3e-6), and its worst case K * 2^-24; 2e-5 sits between.
constexpr double kMaxRelError = 2e-5;

enum class Op { kForward, kBackwardData, kBackwardWeight };

const char* op_name(Op op) {
  switch (op) {
    case Op::kForward:
      return "forward";
    case Op::kBackwardData:
      return "backward_data";
    case Op::kBackwardWeight:
      return "backward_weight";
  }
  return "?";
}

std::vector<Conv3x3Isa> isas() {
  std::vector<Conv3x3Isa> v = {Conv3x3Isa::kPortable};
  if (conv3x3_isa_available(Conv3x3Isa::kAvx2)) v.push_back(Conv3x3Isa::kAvx2);
  if (conv3x3_isa_available(Conv3x3Isa::kAvx512)) v.push_back(Conv3x3Isa::kAvx512);
  return v;
}

// Every implementation: the portable path, AVX2 where available, and on AVX-512 both tilings of
// forward / backward data (kChannels applies where the output channels are a multiple of 16, else
// it is kSpatial).
struct Variant {
  Conv3x3Isa isa;
  Conv3x3Algo algo;
};

std::vector<Variant> variants() {
  std::vector<Variant> v = {{Conv3x3Isa::kPortable, Conv3x3Algo::kAuto}};
  if (conv3x3_isa_available(Conv3x3Isa::kAvx2))
    v.push_back({Conv3x3Isa::kAvx2, Conv3x3Algo::kAuto});
  if (conv3x3_isa_available(Conv3x3Isa::kAvx512)) {
    v.push_back({Conv3x3Isa::kAvx512, Conv3x3Algo::kSpatial});
    v.push_back({Conv3x3Isa::kAvx512, Conv3x3Algo::kChannels});
  }
  return v;
}

std::vector<float> normal(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<float> codes(int64_t count, int lo, int hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(d(rng));
  return v;
}

std::string describe(const Conv3x3Shape& s, Op op, Conv3x3Isa isa, bool acc,
                     Conv3x3Algo algo = Conv3x3Algo::kAuto) {
  const char* algo_name = algo == Conv3x3Algo::kSpatial    ? " spatial"
                          : algo == Conv3x3Algo::kChannels ? " channels"
                                                           : "";
  return std::string(op_name(op)) + " " + conv3x3_isa_name(isa) + algo_name +
         " n=" + std::to_string(s.n) + " c=" + std::to_string(s.c) + " k=" + std::to_string(s.k) +
         " h=" + std::to_string(s.h) + " w=" + std::to_string(s.w) + (acc ? " +=" : " =");
}

// Output size of an op.
int64_t out_count(const Conv3x3Shape& s, Op op) {
  switch (op) {
    case Op::kForward:
      return s.n * s.k * s.h * s.w;
    case Op::kBackwardData:
      return s.n * s.c * s.h * s.w;
    case Op::kBackwardWeight:
      return s.k * s.c * 9;
  }
  return 0;
}

// Operands: x (n, c, h, w), w (k, c, 3, 3), dy (n, k, h, w).
struct Operands {
  std::vector<float> x, w, dy;
};

void run_fast(const Conv3x3Shape& s, Op op, const Operands& a, const Conv3x3Options& opt,
              Conv3x3Workspace* ws, float* out) {
  const Conv3x3Weights packed(a.w.data(), s.k, s.c);
  switch (op) {
    case Op::kForward:
      return conv3x3_forward(s, a.x.data(), packed, out, opt, ws);
    case Op::kBackwardData:
      return conv3x3_backward_data(s, a.dy.data(), packed, out, opt, ws);
    case Op::kBackwardWeight:
      return conv3x3_backward_weight(s, a.x.data(), a.dy.data(), out, opt, ws);
  }
}

void run_ref(const Conv3x3Shape& s, Op op, const Operands& a, const Conv3x3Options& opt,
             float* out) {
  switch (op) {
    case Op::kForward:
      return conv3x3_forward_ref(s, a.x.data(), a.w.data(), out, opt);
    case Op::kBackwardData:
      return conv3x3_backward_data_ref(s, a.dy.data(), a.w.data(), out, opt);
    case Op::kBackwardWeight:
      return conv3x3_backward_weight_ref(s, a.x.data(), a.dy.data(), out, opt);
  }
}

Operands abs_of(const Operands& a) {
  Operands b = a;
  for (auto* v : {&b.x, &b.w, &b.dy})
    for (float& f : *v) f = std::fabs(f);
  return b;
}

void check_fp32(const Conv3x3Shape& s, uint64_t seed, Conv3x3Workspace* ws) {
  Operands a{normal(s.n * s.c * s.h * s.w, seed), normal(s.k * s.c * 9, seed + 1),
             normal(s.n * s.k * s.h * s.w, seed + 2)};
  const Operands mag = abs_of(a);
  for (Op op : {Op::kForward, Op::kBackwardData, Op::kBackwardWeight}) {
    const int64_t count = out_count(s, op);
    std::vector<float> bound(static_cast<size_t>(count));
    run_ref(s, op, mag, {}, bound.data());  // sum of |terms| per output
    for (bool acc : {false, true}) {
      Conv3x3Options opt;
      opt.scale = 0.75f;
      opt.accumulate = acc;
      const std::vector<float> prev = normal(count, seed + 3);
      std::vector<float> ref = prev;
      run_ref(s, op, a, opt, ref.data());
      for (const Variant& var : variants()) {
        opt.isa = var.isa;
        opt.algo = var.algo;
        // Without +=, start from NaN: the output must be written, never read.
        std::vector<float> got = acc ? prev : std::vector<float>(prev.size(), std::nanf(""));
        run_fast(s, op, a, opt, ws, got.data());
        for (int64_t i = 0; i < count; ++i) {
          const double tol =
              kMaxRelError * (0.75 * bound[i] + (acc ? std::fabs(prev[i]) : 0.0)) + 1e-30;
          ASSERT_NEAR(got[i], ref[i], tol)
              << describe(s, op, var.isa, acc, var.algo) << " at " << i;
        }
      }
    }
  }
}

// Codes: activations unsigned (0..2^b - 1) or signed, weights and gradients signed (+-2^(b-1)-1).
// extreme: every code at its bound (the worst case for the exactness splits).
void check_codes(const Conv3x3Shape& s, int bits, bool unsigned_act, bool extreme, uint64_t seed,
                 Conv3x3Workspace* ws) {
  const int l = (1 << (bits - 1)) - 1;
  const int qa = unsigned_act ? (1 << bits) - 1 : l;
  Operands a;
  if (extreme) {
    a.x.assign(static_cast<size_t>(s.n * s.c * s.h * s.w), static_cast<float>(qa));
    a.w.assign(static_cast<size_t>(s.k * s.c * 9), static_cast<float>(l));
    a.dy.assign(static_cast<size_t>(s.n * s.k * s.h * s.w), static_cast<float>(-l));
  } else {
    a.x = codes(s.n * s.c * s.h * s.w, unsigned_act ? 0 : -l, qa, seed);
    a.w = codes(s.k * s.c * 9, -l, l, seed + 1);
    a.dy = codes(s.n * s.k * s.h * s.w, -l, l, seed + 2);
  }
  for (Op op : {Op::kForward, Op::kBackwardData, Op::kBackwardWeight}) {
    const int64_t count = out_count(s, op);
    Conv3x3Options opt;
    opt.scale = 0.0371f;  // not a power of two: the one rescale must round like the reference
    switch (op) {
      case Op::kForward:
        opt.codes = {qa, l};
        break;
      case Op::kBackwardData:
        opt.codes = {l, l};
        break;
      case Op::kBackwardWeight:
        opt.codes = {qa, l};
        break;
    }
    for (bool acc : {false, true}) {
      opt.accumulate = acc;
      opt.isa = Conv3x3Isa::kAuto;
      const std::vector<float> prev = normal(count, seed + 5);
      std::vector<float> ref = prev;
      run_ref(s, op, a, opt, ref.data());
      for (const Variant& var : variants()) {
        opt.isa = var.isa;
        opt.algo = var.algo;
        std::vector<float> got = acc ? prev : std::vector<float>(prev.size(), std::nanf(""));
        run_fast(s, op, a, opt, ws, got.data());
        for (int64_t i = 0; i < count; ++i)
          ASSERT_EQ(got[i], ref[i]) << describe(s, op, var.isa, acc, var.algo) << " bits=" << bits
                                    << (unsigned_act ? " unsigned" : " signed")
                                    << (extreme ? " extreme" : "") << " at " << i;
      }
    }
    if (op == Op::kBackwardWeight) {
      // The exact integer totals, added to what is there.
      Conv3x3Options one = opt;
      one.scale = 1.0f;
      one.accumulate = false;
      std::vector<float> ref(static_cast<size_t>(count));
      run_ref(s, op, a, one, ref.data());  // exact while the totals stay below 2^24
      for (Conv3x3Isa isa : isas()) {
        one.isa = isa;
        std::vector<double> sum(static_cast<size_t>(count), 5.0);
        conv3x3_backward_weight_exact(s, a.x.data(), a.dy.data(), sum.data(), one, ws);
        for (int64_t i = 0; i < count; ++i) {
          if (std::fabs(ref[i]) >= (1 << 24)) continue;
          ASSERT_EQ(sum[i], 5.0 + ref[i]) << describe(s, op, isa, false) << " exact sum at " << i;
        }
      }
    }
  }
}

// Shapes: every (c, k) pair of {1, 3, 16, 32, 64} with random sizes from {1, 2, 5, 7, 14, 28}
// (the big channel counts on the smaller images, to keep the reference loops fast), and the
// resnet20 layer shapes.
std::vector<Conv3x3Shape> shapes() {
  const int64_t chans[] = {1, 3, 16, 32, 64};
  const int64_t sizes[] = {1, 2, 5, 7, 14, 28};
  std::mt19937_64 rng(7);
  std::vector<Conv3x3Shape> v;
  for (int64_t c : chans)
    for (int64_t k : chans) {
      const int limit = c * k >= 1024 ? 4 : c * k >= 256 ? 5 : 6;  // index into sizes
      std::uniform_int_distribution<int> si(0, limit - 1), ni(0, 1);
      for (int rep = 0; rep < 2; ++rep)
        v.push_back({ni(rng) ? 3 : 1, c, k, sizes[si(rng)], sizes[si(rng)]});
    }
  v.push_back({1, 1, 16, 28, 28});
  v.push_back({3, 16, 16, 28, 28});
  v.push_back({1, 32, 32, 14, 14});
  v.push_back({3, 64, 64, 7, 7});
  v.push_back({1, 5, 11, 9, 23});  // odd channel and size counts
  return v;
}

TEST(Conv3x3, Fp32MatchesReference) {
  Conv3x3Workspace ws;  // one workspace across every shape: reuse must not leak state
  uint64_t seed = 100;
  for (const Conv3x3Shape& s : shapes()) check_fp32(s, seed += 10, &ws);
}

TEST(Conv3x3, CodesAreExact) {
  Conv3x3Workspace ws;
  uint64_t seed = 500;
  for (const Conv3x3Shape& s : shapes()) {
    check_codes(s, 4, true, false, seed += 10, &ws);
    check_codes(s, 8, false, false, seed += 10, &ws);
  }
}

// The exactness splits: 8-bit unsigned activations against 8-bit weights (576 * 255 * 127 > 2^24:
// the forward sum over 64 channels is split), 8-bit dW over 28x28 images (784 * 255 * 127 > 2^24
// within one sample: split into row pieces), all at the extreme codes.
TEST(Conv3x3, CodesAreExactAtTheSplitBounds) {
  Conv3x3Workspace ws;
  check_codes({1, 64, 16, 7, 7}, 8, true, true, 1, &ws);
  check_codes({2, 64, 64, 5, 7}, 8, true, false, 2, &ws);
  check_codes({2, 16, 16, 28, 28}, 8, true, true, 3, &ws);
  check_codes({1, 16, 32, 28, 28}, 8, true, false, 4, &ws);
  check_codes({3, 64, 64, 7, 7}, 4, true, true, 5, &ws);
}

// Conv3x3WeightGrad fed one sample at a time (as a caller streaming sample chunks does) gives the
// chunk's dW: exactly on codes, within the tolerance on fp32.
TEST(Conv3x3, WeightGradStreamsSamples) {
  Conv3x3Workspace ws;
  for (const Conv3x3Shape& s : {Conv3x3Shape{3, 1, 16, 28, 28}, Conv3x3Shape{3, 16, 16, 28, 28},
                                Conv3x3Shape{3, 64, 64, 7, 7}, Conv3x3Shape{3, 3, 5, 14, 14}})
    for (bool use_codes : {false, true})
      for (Conv3x3Isa isa : isas()) {
        const int64_t hw = s.h * s.w, count = s.k * s.c * 9;
        const Operands a = use_codes ? Operands{codes(s.n * s.c * hw, 0, 255, 1),
                                                codes(s.k * s.c * 9, -127, 127, 2),
                                                codes(s.n * s.k * hw, -127, 127, 3)}
                                     : Operands{normal(s.n * s.c * hw, 1), normal(s.k * s.c * 9, 2),
                                                normal(s.n * s.k * hw, 3)};
        Conv3x3Options opt;
        opt.scale = 0.5f;
        if (use_codes) opt.codes = {255, 127};
        std::vector<float> ref(static_cast<size_t>(count)), bound(ref.size());
        conv3x3_backward_weight_ref(s, a.x.data(), a.dy.data(), ref.data(), opt);
        const Operands mag = abs_of(a);
        conv3x3_backward_weight_ref(s, mag.x.data(), mag.dy.data(), bound.data(), {});
        Conv3x3WeightGrad grad;
        grad.reset(s.k, s.c, opt.codes, isa);
        for (int64_t n = 0; n < s.n; ++n)
          grad.add({1, s.c, s.k, s.h, s.w}, a.x.data() + n * s.c * hw, a.dy.data() + n * s.k * hw,
                   &ws);
        std::vector<float> got(ref.size(), std::nanf(""));
        grad.finish(opt.scale, false, got.data());
        for (int64_t i = 0; i < count; ++i) {
          if (use_codes)
            ASSERT_EQ(got[i], ref[i])
                << describe(s, Op::kBackwardWeight, isa, false) << " at " << i;
          else
            ASSERT_NEAR(got[i], ref[i], kMaxRelError * 0.5 * bound[i])
                << describe(s, Op::kBackwardWeight, isa, false) << " at " << i;
        }
      }
}

// Reentrancy: threads over sample chunks with one shared Conv3x3Weights and a workspace and a
// Conv3x3WeightGrad each give the same forward / backward_data outputs as one call, and dW partials
// whose fixed-order sum is the one-call dW (exactly, on codes).
TEST(Conv3x3, ThreadsOverSampleChunks) {
  const Conv3x3Shape s{8, 32, 32, 14, 14};
  const int64_t hw = s.h * s.w;
  const Operands a{codes(s.n * s.c * hw, 0, 15, 1), codes(s.k * s.c * 9, -7, 7, 2),
                   codes(s.n * s.k * hw, -7, 7, 3)};
  Conv3x3Options opt;
  opt.codes = {15, 7};
  const Conv3x3Weights packed(a.w.data(), s.k, s.c);
  std::vector<float> y1(static_cast<size_t>(s.n * s.k * hw)), dx1(a.x.size()), dw1(a.w.size());
  conv3x3_forward(s, a.x.data(), packed, y1.data(), opt);
  conv3x3_backward_data(s, a.dy.data(), packed, dx1.data(), opt);
  conv3x3_backward_weight(s, a.x.data(), a.dy.data(), dw1.data(), opt);
  constexpr int kThreads = 4;
  std::vector<float> y(y1.size()), dx(dx1.size()), dw(dw1.size(), 0.0f);
  Conv3x3WeightGrad grads[kThreads];
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      Conv3x3Workspace ws;
      const int64_t n0 = s.n * t / kThreads, n1 = s.n * (t + 1) / kThreads;
      const Conv3x3Shape part{n1 - n0, s.c, s.k, s.h, s.w};
      conv3x3_forward(part, a.x.data() + n0 * s.c * hw, packed, y.data() + n0 * s.k * hw, opt, &ws);
      conv3x3_backward_data(part, a.dy.data() + n0 * s.k * hw, packed, dx.data() + n0 * s.c * hw,
                            opt, &ws);
      grads[t].reset(s.k, s.c, opt.codes);
      grads[t].add(part, a.x.data() + n0 * s.c * hw, a.dy.data() + n0 * s.k * hw, &ws);
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < kThreads; ++t) grads[t].finish(1.0f, true, dw.data());
  EXPECT_EQ(y, y1);
  EXPECT_EQ(dx, dx1);
  EXPECT_EQ(dw, dw1);
}

// Image rows longer than the exact bound (255 * 255 codes: 258 terms < a 300-pixel row): dW falls
// back to int64 sums, still exact.
TEST(Conv3x3, CodesAreExactForRowsLongerThanTheBound) {
  const Conv3x3Shape s{2, 2, 16, 2, 300};
  const int64_t hw = s.h * s.w;
  const auto x = codes(s.n * s.c * hw, 0, 255, 1), dy = codes(s.n * s.k * hw, -255, 255, 2);
  Conv3x3Options opt;
  opt.codes = {255, 255};
  opt.scale = 0.0371f;
  std::vector<float> ref(static_cast<size_t>(s.k * s.c * 9)), got(ref.size());
  conv3x3_backward_weight_ref(s, x.data(), dy.data(), ref.data(), opt);
  for (Conv3x3Isa isa : isas()) {
    opt.isa = isa;
    conv3x3_backward_weight(s, x.data(), dy.data(), got.data(), opt);
    EXPECT_EQ(got, ref) << conv3x3_isa_name(isa);
  }
}

TEST(Conv3x3, ExactBound) {
  EXPECT_EQ(conv3x3_exact_terms({7, 7}), ((1 << 24) - 1) / 49);
  EXPECT_EQ(conv3x3_exact_terms({255, 127}), 518);
  // 4-bit codes: the whole 64-channel forward sum (576 terms) is one exact piece.
  EXPECT_GE(conv3x3_exact_terms({15, 7}), 576);
}

TEST(Conv3x3, EmptyReductionsAndSizes) {
  for (Conv3x3Isa isa : isas()) {
    Conv3x3Options opt;
    opt.isa = isa;
    // c = 0: forward writes zeros; with += it leaves y alone.
    const Conv3x3Shape s{2, 0, 3, 4, 5};
    std::vector<float> y(2 * 3 * 4 * 5, 7.0f);
    Conv3x3Weights w(nullptr, 3, 0);
    conv3x3_forward(s, nullptr, w, y.data(), opt);
    for (float v : y) ASSERT_EQ(v, 0.0f);
    // n = 0: dW = 0.
    const Conv3x3Shape s0{0, 2, 3, 4, 5};
    std::vector<float> dw(3 * 2 * 9, 7.0f);
    conv3x3_backward_weight(s0, nullptr, nullptr, dw.data(), opt);
    for (float v : dw) ASSERT_EQ(v, 0.0f);
  }
}

TEST(Conv3x3, BadArgumentsThrow) {
  const Conv3x3Shape s{1, 2, 3, 4, 4};
  std::vector<float> x(2 * 16), w(3 * 2 * 9), y(3 * 16);
  Conv3x3Weights wrong(w.data(), 2, 3);  // k and c swapped
  EXPECT_THROW(conv3x3_forward(s, x.data(), wrong, y.data()), Error);
  Conv3x3Weights ok(w.data(), 3, 2);
  Conv3x3Options opt;
  opt.codes = {256, 7};  // beyond 8-bit unsigned
  EXPECT_THROW(conv3x3_forward(s, x.data(), ok, y.data(), opt), Error);
  opt.codes = {0, 7};
  EXPECT_THROW(conv3x3_forward(s, x.data(), ok, y.data(), opt), Error);
  EXPECT_THROW(conv3x3_forward({-1, 2, 3, 4, 4}, x.data(), ok, y.data()), Error);
  opt.codes = {};
  EXPECT_THROW(conv3x3_backward_weight_exact(s, x.data(), y.data(), nullptr, opt), Error);
}

}  // namespace
}  // namespace int4ddp::math
