// Finite-difference gradient checks of every fp32 layer and of small compositions, plus the loss.
//
// Method: loss = sum(y * r) for a fixed random r, so dL/dy = r. For sampled coordinates of the
// input and of every parameter, the central difference (L(v + e) - L(v - e)) / 2e (loss accumulated
// in double) is compared with the analytic gradient. Layers with kinks (ReLU, max pooling, the
// block's ReLU) can put a kink inside [v - e, v + e]; such a coordinate shows one-sided slopes that
// disagree and is skipped, and at most a quarter of the coordinates may be skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/common/error.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {
namespace {

// With e = 1e-3 on O(1) values the float rounding of L (~1e-7 |L|, |L| ~ 10) contributes ~1e-3 to
// the difference quotient; the truncation error is O(e^2). 2e-2 absolute plus 2e-2 relative covers
// both with margin and still catches a wrong gradient (typically off by O(1)).
constexpr double kEps = 1e-3;
constexpr double kAbsTol = 2e-2;
constexpr double kRelTol = 2e-2;

void fill_normal(Tensor& t, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = d(rng);
}

struct GradCheck {
  int checked = 0, skipped = 0;
};

double loss_of(Layer& layer, const Tensor& x, const Tensor& r) {
  Tensor y;
  layer.forward(x, y, /*train=*/true);
  double s = 0.0;
  for (int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(y[i]) * r[i];
  return s;
}

// Checks d loss / d v[i] for up to `samples` indices of v (a view the layer reads).
void check_coords(const std::function<double()>& f, float* v, int64_t n, const float* analytic,
                  const std::string& what, GradCheck* stats, int samples = 24) {
  std::mt19937_64 rng(n * 7919 + what.size());
  std::uniform_int_distribution<int64_t> pick(0, n - 1);
  for (int s = 0; s < std::min<int64_t>(samples, n); ++s) {
    const int64_t i = n <= samples ? s : pick(rng);
    const float saved = v[i];
    v[i] = saved + static_cast<float>(kEps);
    const double fp = f();
    v[i] = saved - static_cast<float>(kEps);
    const double fm = f();
    v[i] = saved;
    const double f0 = f();
    const double numeric = (fp - fm) / (2 * kEps);
    const double right = (fp - f0) / kEps, left = (f0 - fm) / kEps;
    if (std::fabs(right - left) > kAbsTol + kRelTol * std::fabs(numeric)) {
      ++stats->skipped;  // a kink inside the interval
      continue;
    }
    ++stats->checked;
    EXPECT_NEAR(numeric, analytic[i], kAbsTol + kRelTol * std::fabs(numeric))
        << what << "[" << i << "]";
  }
}

// Full check of a layer on input x: input gradient and every parameter's gradient.
void check_layer(Layer& layer, Tensor x, uint64_t seed, bool check_input = true) {
  Tensor y;
  layer.forward(x, y, true);
  Tensor r(y.shape());
  fill_normal(r, seed + 1);
  for (Param* p : layer.params()) p->grad.zero();
  Tensor dx;
  layer.forward(x, y, true);
  layer.backward(x, y, r, check_input ? &dx : nullptr);
  // Analytic gradients are copied before the finite differences run more forwards.
  std::vector<std::vector<float>> pgrads;
  for (Param* p : layer.params())
    pgrads.emplace_back(p->grad.data(), p->grad.data() + p->grad.numel());
  GradCheck stats;
  auto f = [&] { return loss_of(layer, x, r); };
  if (check_input) check_coords(f, x.data(), x.numel(), dx.data(), layer.name() + ".dx", &stats);
  auto params = layer.params();
  for (size_t k = 0; k < params.size(); ++k)
    check_coords(f, params[k]->value.data(), params[k]->value.numel(), pgrads[k].data(),
                 params[k]->name, &stats);
  EXPECT_GT(stats.checked, 0);
  EXPECT_LE(stats.skipped * 4, stats.checked + stats.skipped)
      << "too many kinks: the check is void";
}

// Input whose entries are well separated (a shuffled grid), so max pooling has no near-ties.
Tensor separated_input(Shape shape, uint64_t seed) {
  Tensor x(shape);
  std::vector<float> v(static_cast<size_t>(x.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = -1.0f + 0.013f * static_cast<float>(i);
  std::mt19937_64 rng(seed);
  std::shuffle(v.begin(), v.end(), rng);
  for (int64_t i = 0; i < x.numel(); ++i) x[i] = v[static_cast<size_t>(i)];
  return x;
}

void randomize_params(Layer& layer, uint64_t seed, float scale = 0.5f) {
  uint64_t s = seed;
  for (Param* p : layer.params()) fill_normal(p->value, ++s, scale);
}

TEST(LayerGrad, Linear) {
  Linear l("fc", 12, 5);
  randomize_params(l, 10);
  Tensor x({4, 12});
  fill_normal(x, 11);
  check_layer(l, x, 12);
}

TEST(LayerGrad, LinearFlattensNCHW) {
  Linear l("fc", 2 * 3 * 3, 4, false);
  randomize_params(l, 20);
  Tensor x({3, 2, 3, 3});
  fill_normal(x, 21);
  check_layer(l, x, 22);
}

TEST(LayerGrad, Conv2dStridesAndPadding) {
  for (auto [k, s, p] :
       {std::tuple<int, int, int>{3, 1, 1}, {3, 2, 1}, {5, 1, 0}, {1, 2, 0}, {7, 2, 3}}) {
    Conv2d c("conv", 3, 4, k, s, p, /*bias=*/true);
    randomize_params(c, 30 + k + s);
    Tensor x({2, 3, 7, 6});
    fill_normal(x, 31);
    SCOPED_TRACE(testing::Message() << "k=" << k << " s=" << s << " p=" << p);
    check_layer(c, x, 32);
  }
}

// The grouped im2col + GEMM convolution (and its transposed-convolution dx for stride 1) against
// the plain definition, in double: every geometry path (same-width stride 1, general stride 1,
// stride 2 and stride 1 with pad > k - 1 through col2im, 1x1), with groups of one sample, of two (a
// partial last group) and of all.
TEST(Conv2dFast, MatchesDirectConvolution) {
  // fp32 GEMMs of K <= 100 terms of O(1) values against double: 1e-4 covers the float rounding.
  constexpr double kTol = 1e-4;
  const int64_t n = 5, ci = 3, co = 4;
  // 7x6, and images smaller than the kernel (taps with no valid output row or column).
  for (auto [h, w] : {std::pair<int64_t, int64_t>{7, 6}, {1, 1}, {2, 1}, {1, 3}})
    for (auto [k, st, pd] : {std::tuple<int, int, int>{3, 1, 1},
                             {3, 2, 1},
                             {5, 1, 0},
                             {1, 2, 0},
                             {1, 1, 0},
                             {3, 1, 2},
                             {3, 2, 0},
                             {1, 1, 1},
                             {7, 2, 3}})           // the ImageNet stem (resnet18 above 64x64)
      for (int64_t samples_per_group : {1, 2, 0})  // 0: the default budget (one group)
        for (bool direct : {true, false}) {  // k3 s1 p1: the direct 3x3 kernels, or im2col + GEMM
          SCOPED_TRACE(testing::Message()
                       << h << "x" << w << " k=" << k << " s=" << st << " p=" << pd
                       << " group=" << samples_per_group << " direct=" << direct);
          if (h + 2 * pd < k || w + 2 * pd < k) continue;  // no output
          Conv2d c("conv", ci, co, k, st, pd, /*bias=*/true);
          c.set_direct_conv(direct);
          randomize_params(c, 40 + k + st + pd);
          const int64_t ho = c.out_size(h), wo = c.out_size(w);
          if (samples_per_group > 0)
            c.set_column_bytes(samples_per_group * ci * k * k * std::max(ho * wo, h * w) *
                               int64_t{sizeof(float)});
          Tensor x({n, ci, h, w}), y, dx;
          fill_normal(x, 41);
          c.forward(x, y, true);
          ASSERT_EQ(y.dim(2), ho);
          ASSERT_EQ(y.dim(3), wo);
          Tensor dy(y.shape());
          fill_normal(dy, 42);
          for (Param* p : c.params()) p->grad.zero();
          c.backward(x, y, dy, &dx);
          const float* wv = c.weight().value.data();
          const float* bv = c.params()[1]->value.data();
          std::vector<double> dw(static_cast<size_t>(co * ci * k * k), 0.0), db(co, 0.0),
              dxr(static_cast<size_t>(x.numel()), 0.0);
          for (int64_t b = 0; b < n; ++b)
            for (int64_t o = 0; o < co; ++o)
              for (int64_t oy = 0; oy < ho; ++oy)
                for (int64_t ox = 0; ox < wo; ++ox) {
                  const int64_t yi = ((b * co + o) * ho + oy) * wo + ox;
                  double acc = bv[o];
                  db[o] += dy[yi];
                  for (int64_t ch = 0; ch < ci; ++ch)
                    for (int ky = 0; ky < k; ++ky)
                      for (int kx = 0; kx < k; ++kx) {
                        const int64_t iy = oy * st - pd + ky, ix = ox * st - pd + kx;
                        if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                        const size_t wi = static_cast<size_t>(((o * ci + ch) * k + ky) * k + kx);
                        const size_t xi = static_cast<size_t>(((b * ci + ch) * h + iy) * w + ix);
                        acc += static_cast<double>(wv[wi]) * x[xi];
                        dw[wi] += static_cast<double>(dy[yi]) * x[xi];
                        dxr[xi] += static_cast<double>(dy[yi]) * wv[wi];
                      }
                  EXPECT_NEAR(y[yi], acc, kTol * (1 + std::fabs(acc))) << "y " << yi;
                }
          for (size_t i = 0; i < dw.size(); ++i)
            EXPECT_NEAR(c.weight().grad[i], dw[i], kTol * (1 + std::fabs(dw[i]))) << "dW " << i;
          for (int64_t o = 0; o < co; ++o)
            EXPECT_NEAR(c.params()[1]->grad[o], db[o], kTol * (1 + std::fabs(db[o]))) << "db " << o;
          for (size_t i = 0; i < dxr.size(); ++i)
            EXPECT_NEAR(dx[i], dxr[i], kTol * (1 + std::fabs(dxr[i]))) << "dx " << i;
        }
}

TEST(LayerGrad, BatchNorm2dAnd1d) {
  BatchNorm bn("bn", 3);
  randomize_params(bn, 40);
  Tensor x({4, 3, 3, 2});
  fill_normal(x, 41, 2.0f);
  check_layer(bn, x, 42);
  BatchNorm bn1("bn1d", 5);
  randomize_params(bn1, 43);
  Tensor x1({6, 5});
  fill_normal(x1, 44);
  check_layer(bn1, x1, 45);
}

TEST(LayerGrad, BatchNormWithRelu) {
  auto bn = BatchNorm::with_relu("bnrelu", 3);
  randomize_params(*bn, 47);
  Tensor x({4, 3, 3, 2});
  fill_normal(x, 48, 2.0f);
  check_layer(*bn, x, 49);
}

// The fused layer is the two layers, bit for bit: outputs, dx, and the gamma/beta gradients.
TEST(BatchNormWithRelu, BitIdenticalToBatchNormThenReLU) {
  Tensor x({5, 4, 3, 3}), r({5, 4, 3, 3});
  fill_normal(x, 60, 2.0f);
  fill_normal(r, 61);
  auto fused = BatchNorm::with_relu("bn", 4);
  BatchNorm plain("bn", 4);
  ReLU relu("relu");
  randomize_params(*fused, 62);
  randomize_params(plain, 62);
  for (Param* p : fused->params()) p->grad.zero();
  for (Param* p : plain.params()) p->grad.zero();
  Tensor y, dx, t, y2, dt, dx2;
  fused->forward(x, y, true);
  fused->backward(x, y, r, &dx);
  plain.forward(x, t, true);
  relu.forward(t, y2, true);
  relu.backward(t, y2, r, &dt);
  plain.backward(x, t, dt, &dx2);
  ASSERT_EQ(y.numel(), y2.numel());
  EXPECT_EQ(0, std::memcmp(y.data(), y2.data(), sizeof(float) * y.numel()));
  EXPECT_EQ(0, std::memcmp(dx.data(), dx2.data(), sizeof(float) * dx.numel()));
  for (size_t k = 0; k < 2; ++k)
    EXPECT_EQ(0, std::memcmp(fused->params()[k]->grad.data(), plain.params()[k]->grad.data(),
                             sizeof(float) * 4));
}

// BatchNorm's one-pass sums against a plain double-precision loop, on rows long enough for the
// vector loops plus a tail (hw = 35 = 4 * 8 + 3) and on odd shapes (batch 1, channels 1 and 3,
// spatial 1x1, rows shorter than a vector, a row of exactly two vectors), with and without the
// fused ReLU, on centred data and on data offset by 100 (|mean| >> std: shifted moments must not
// cancel). Tolerance: x * scale + shift rounds at ~|x| * 2^-24 ~ 1e-5 for |x| ~ 100 and the float
// inputs to the sums add ~1e-6 relative; 1e-4 * (1 + |ref|) is ample, and a wrong or cancelling
// sum is off by far more.
TEST(BatchNorm, MatchesDoubleReference) {
  constexpr double kTol = 1e-4;
  struct Case {
    int64_t n, c, h, w;
  };
  for (const Case s : {Case{5, 3, 7, 5}, Case{1, 3, 7, 7}, Case{6, 1, 1, 1}, Case{4, 3, 1, 1},
                       Case{3, 1, 4, 4}, Case{2, 3, 3, 3}, Case{9, 1, 2, 3}})
    for (bool relu : {false, true})
      for (float offset : {0.0f, 100.0f}) {
        const int64_t n = s.n, c = s.c, h = s.h, w = s.w, hw = h * w;
        SCOPED_TRACE(testing::Message() << "shape " << n << "x" << c << "x" << h << "x" << w
                                        << " relu=" << relu << " offset=" << offset);
        auto bn = relu ? BatchNorm::with_relu("bn", c) : std::make_unique<BatchNorm>("bn", c);
        randomize_params(*bn, 70);
        for (Param* p : bn->params()) p->grad.zero();
        Tensor x({n, c, h, w}), r({n, c, h, w}), y, dx;
        fill_normal(x, 71, 2.0f);
        for (int64_t i = 0; i < x.numel(); ++i) x[i] += offset;
        fill_normal(r, 72);
        bn->forward(x, y, true);
        bn->backward(x, y, r, &dx);
        const float* gamma = bn->params()[0]->value.data();
        const float* beta = bn->params()[1]->value.data();
        for (int64_t ch = 0; ch < c; ++ch) {
          auto at = [&](int64_t i, int64_t j) { return (i * c + ch) * hw + j; };
          const double count = static_cast<double>(n * hw);
          double mean = 0, var = 0;
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < hw; ++j) mean += x[at(i, j)];
          mean /= count;
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < hw; ++j) var += (x[at(i, j)] - mean) * (x[at(i, j)] - mean);
          const double invstd = 1.0 / std::sqrt(var / count + 1e-5);
          EXPECT_NEAR(bn->running_mean()[ch], 0.1 * mean, kTol * (1 + std::fabs(mean)));
          EXPECT_NEAR(bn->running_var()[ch], 0.9 + 0.1 * var / (count - 1), kTol);
          double sdy = 0, sdy_xhat = 0;
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < hw; ++j) {
              const double xhat = (x[at(i, j)] - mean) * invstd;
              double ref = gamma[ch] * xhat + beta[ch];
              if (relu) ref = std::max(ref, 0.0);
              EXPECT_NEAR(y[at(i, j)], ref, kTol * (1 + std::fabs(ref)));
              const double d = !relu || y[at(i, j)] > 0 ? r[at(i, j)] : 0.0;
              sdy += d;
              sdy_xhat += d * xhat;
            }
          EXPECT_NEAR(bn->params()[1]->grad[ch], sdy, kTol * (1 + std::fabs(sdy)));
          EXPECT_NEAR(bn->params()[0]->grad[ch], sdy_xhat, kTol * (1 + std::fabs(sdy_xhat)));
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < hw; ++j) {
              const double xhat = (x[at(i, j)] - mean) * invstd;
              const double d = !relu || y[at(i, j)] > 0 ? r[at(i, j)] : 0.0;
              const double ref = gamma[ch] * invstd * (d - sdy / count - xhat * sdy_xhat / count);
              EXPECT_NEAR(dx[at(i, j)], ref, kTol * (1 + std::fabs(ref)));
            }
        }
      }
}

TEST(LayerGrad, BatchNormEvalUsesRunningStatistics) {
  BatchNorm bn("bn", 2, /*momentum=*/1.0f);
  Tensor x({3, 2, 2, 2}), y;
  fill_normal(x, 46);
  bn.forward(x, y, true);  // momentum 1: running stats = this batch's (unbiased variance)
  Tensor ye;
  bn.forward(x, ye, false);
  // Eval uses the unbiased variance (n/(n-1) larger): outputs shrink by sqrt((n-1)/n), n = 12.
  for (int64_t i = 0; i < y.numel(); ++i)
    EXPECT_NEAR(ye[i], y[i] * std::sqrt(11.0f / 12.0f), 1e-3f);
}

TEST(LayerGrad, ReLUAndPooling) {
  ReLU relu("relu");
  check_layer(relu, separated_input({2, 3, 4, 4}, 50), 51);
  MaxPool2d pool("pool", 2);
  check_layer(pool, separated_input({2, 3, 4, 6}, 52), 53);
  GlobalAvgPool gap("gap");
  Tensor x({2, 3, 4, 5});
  fill_normal(x, 54);
  check_layer(gap, x, 55);
}

TEST(LayerGrad, OverlappingPaddedMaxPool) {
  // resnet18's ImageNet-stem pool (3, stride 2, pad 1), on even and odd sides, and a 2-stride-1.
  for (auto [k, s, p] : {std::tuple<int, int, int>{3, 2, 1}, {2, 1, 0}, {3, 1, 1}}) {
    SCOPED_TRACE(testing::Message() << "k=" << k << " s=" << s << " p=" << p);
    MaxPool2d pool("pool", k, s, p);
    check_layer(pool, separated_input({2, 3, 7, 6}, 56 + k), 57);
  }
}

// MaxPool2d against the plain definition: y = max over the window of x padded with -inf (NaN
// wins), dx[i] = the sum of dy over the outputs whose first maximum is i. Exact: no arithmetic but
// sums of at most four terms, which the reference adds in the same (output) order: dx bit for bit
// (a -0 in dy gives +0). The 2-2-0 geometry runs forward's fast path.
TEST(MaxPool2d, MatchesPlainDefinition) {
  const int64_t n = 2, c = 3;
  for (auto [k, s, p] : {std::tuple<int, int, int>{3, 2, 1}, {2, 2, 0}, {3, 1, 1}, {4, 3, 2}})
    for (auto [h, w] : {std::pair<int64_t, int64_t>{7, 6}, {8, 9}, {2, 3}}) {
      if (h + 2 * p < k || w + 2 * p < k) continue;
      SCOPED_TRACE(testing::Message()
                   << "k=" << k << " s=" << s << " p=" << p << " h=" << h << " w=" << w);
      MaxPool2d pool("pool", k, s, p);
      Tensor x({n, c, h, w}), y, dx;
      fill_normal(x, 80);
      x[5] = x[7];  // a tie: the first in row-major order wins
      x[20] = std::numeric_limits<float>::quiet_NaN();
      pool.forward(x, y, true);
      const int64_t ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
      ASSERT_EQ(y.shape(), (Shape{n, c, ho, wo}));
      Tensor dy(y.shape());
      fill_normal(dy, 81);
      dy[0] = dy[3] = -0.0f;  // dx gets 0 + dy: +0
      pool.backward(x, y, dy, &dx);
      std::vector<float> dref(static_cast<size_t>(x.numel()), 0.0f);
      for (int64_t pl = 0; pl < n * c; ++pl)
        for (int64_t oy = 0; oy < ho; ++oy)
          for (int64_t ox = 0; ox < wo; ++ox) {
            float best = -std::numeric_limits<float>::infinity();
            int64_t arg = -1;
            for (int ky = 0; ky < k; ++ky)
              for (int kx = 0; kx < k; ++kx) {
                const int64_t iy = oy * s - p + ky, ix = ox * s - p + kx;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;  // -inf padding
                const int64_t i = (pl * h + iy) * w + ix;
                if (std::isnan(best)) continue;
                if (arg < 0 || x[i] > best || std::isnan(x[i])) best = x[i], arg = i;
              }
            ASSERT_GE(arg, 0) << "a window without input";
            const int64_t o = (pl * ho + oy) * wo + ox;
            if (std::isnan(best))
              EXPECT_TRUE(std::isnan(y[o])) << "y " << o;
            else
              EXPECT_EQ(y[o], best) << "y " << o;
            dref[static_cast<size_t>(arg)] += dy[o];
          }
      for (int64_t i = 0; i < x.numel(); ++i)
        EXPECT_EQ(std::memcmp(&dx[i], &dref[static_cast<size_t>(i)], sizeof(float)), 0)
            << "dx " << i << ": " << dx[i] << " vs " << dref[static_cast<size_t>(i)];
    }
  EXPECT_THROW(MaxPool2d("pool", 3, 2, 2), Error);  // pad > window / 2: an empty window
  EXPECT_THROW(MaxPool2d("pool", 3, 0, 1), Error);
  MaxPool2d pool("pool", 3, 2, 0);
  Tensor tiny({1, 1, 2, 5}), y;
  EXPECT_THROW(pool.forward(tiny, y, true), Error);
}

// MaxPool2d's window-2 stride-2 fast path (8 outputs per AVX2 step, the last one moved back to
// overlap the one before, rows under 8 outputs scalar) against its plain scan: the same y bit for
// bit and the same argmax (backward with a distinct dy per output gives the same dx), on rows of
// one, several and overlapping vector steps, with NaNs (first, later, several in a window), ties,
// +-0 and +-inf.
TEST(MaxPool2d, FastPathMatchesPlainScan) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (auto [h, w] : {std::pair<int64_t, int64_t>{2, 2},
                      {3, 17},
                      {16, 16},
                      {5, 33},
                      {4, 48},
                      {7, 7},
                      {3, 28},
                      {6, 20}}) {
    SCOPED_TRACE(testing::Message() << "h=" << h << " w=" << w);
    Tensor x({2, 3, h, w});
    fill_normal(x, 90);
    std::mt19937 rng(91);
    const float specials[] = {nan, -nan, inf, -inf, 0.0f, -0.0f, 1.0f};
    for (int64_t k = 0; k < x.numel() / 4; ++k) {
      const int64_t i = static_cast<int64_t>(rng() % static_cast<uint32_t>(x.numel()));
      x[i] = specials[rng() % 7];
    }
    for (int64_t i = 1; i < x.numel(); i += 5) x[i] = x[i - 1];  // ties with the left neighbour
    MaxPool2d fast("pool", 2), plain("pool", 2);
    Tensor y, y_ref, dx, dx_ref;
    fast.forward(x, y, true);
    plain.forward_reference(x, y_ref);
    ASSERT_EQ(y.shape(), y_ref.shape());
    ASSERT_EQ(std::memcmp(y.data(), y_ref.data(), sizeof(float) * y.numel()), 0);
    Tensor dy(y.shape());
    for (int64_t i = 0; i < dy.numel(); ++i) dy[i] = static_cast<float>(i + 1);
    fast.backward(x, y, dy, &dx);
    plain.backward(x, y_ref, dy, &dx_ref);
    for (int64_t i = 0; i < x.numel(); ++i)
      ASSERT_EQ(dx[i], dx_ref[i]) << "argmax differs at " << i;
  }
}

// Option A (resnet20's: identity, or subsample and zero-pad) and option B (resnet18's: a 1x1
// projection + BN where the shape changes, by stride 2 or by channels alone).
TEST(LayerGrad, ResidualBlockShortcuts) {
  for (auto [in, out, stride, projection] :
       {std::tuple<int64_t, int64_t, int, bool>{4, 4, 1, false},
        {3, 6, 2, false},
        {3, 6, 2, true},
        {4, 6, 1, true},
        {6, 4, 2, true}}) {
    ResidualBlock block(
        "block", std::make_unique<Conv2d>("c1", in, out, 3, stride, 1), out,
        std::make_unique<Conv2d>("c2", out, out, 3, 1, 1), in, out, stride,
        projection ? std::make_unique<Conv2d>("proj", in, out, 1, stride, 0) : nullptr);
    ASSERT_EQ(block.has_projection(), projection);
    // c1, bn1 (2), c2, bn2 (2), and proj, shortcut.bn (2)
    ASSERT_EQ(block.params().size(), projection ? 9u : 6u);
    randomize_params(block, 60 + stride + 30 * projection);
    Tensor x({3, in, projection ? 7 : 6, 6});
    fill_normal(x, 61);
    SCOPED_TRACE(testing::Message() << "in=" << in << " out=" << out << " stride=" << stride
                                    << " projection=" << projection);
    check_layer(block, x, 62);
  }
}

// The projection block's forward is relu(body(x) + bn_s(proj(x))), bit for bit with the layers run
// one by one, and its running statistics include the shortcut BN's (checkpoints save buffers()).
// The block keeps references to its body's output from forward: backward without one is an error.
TEST(ResidualBlock, BackwardBeforeForwardIsAnError) {
  ResidualBlock block("block", std::make_unique<Conv2d>("c1", 2, 2, 3, 1, 1), 2,
                      std::make_unique<Conv2d>("c2", 2, 2, 3, 1, 1), 2, 2, 1);
  Tensor x({1, 2, 3, 3}), dx;
  EXPECT_THROW(block.backward(x, x, x, &dx), Error);
}

TEST(ResidualBlock, ProjectionForwardIsBodyPlusShortcut) {
  const int64_t in = 3, out = 5;
  auto make = [&] {
    auto b =
        std::make_unique<ResidualBlock>("block", std::make_unique<Conv2d>("c1", in, out, 3, 2, 1),
                                        out, std::make_unique<Conv2d>("c2", out, out, 3, 1, 1), in,
                                        out, 2, std::make_unique<Conv2d>("proj", in, out, 1, 2, 0));
    randomize_params(*b, 95);
    return b;
  };
  auto block = make();
  Conv2d c1("c1", in, out, 3, 2, 1), c2("c2", out, out, 3, 1, 1), proj("proj", in, out, 1, 2, 0);
  auto bn1 = BatchNorm::with_relu("bn1", out);
  BatchNorm bn2("bn2", out), bns("bns", out);
  std::vector<Layer*> parts = {&c1, bn1.get(), &c2, &bn2, &proj, &bns};
  std::vector<Param*> mine;
  for (Layer* l : parts)
    for (Param* p : l->params()) mine.push_back(p);
  const std::vector<Param*> theirs = block->params();
  ASSERT_EQ(mine.size(), theirs.size());
  for (size_t i = 0; i < mine.size(); ++i) {
    ASSERT_EQ(mine[i]->value.numel(), theirs[i]->value.numel()) << theirs[i]->name;
    std::memcpy(mine[i]->value.data(), theirs[i]->value.data(),
                sizeof(float) * static_cast<size_t>(mine[i]->value.numel()));
  }
  Tensor x({4, in, 8, 7}), y;
  fill_normal(x, 96);
  block->forward(x, y, true);
  Tensor a, b, cc, d, e, f;
  c1.forward(x, a, true);
  bn1->forward(a, b, true);
  c2.forward(b, cc, true);
  bn2.forward(cc, d, true);
  proj.forward(x, e, true);
  bns.forward(e, f, true);
  ASSERT_EQ(y.shape(), d.shape());
  ASSERT_EQ(y.shape(), (Shape{4, out, 4, 4}));
  for (int64_t i = 0; i < y.numel(); ++i) {
    const float v = d[i] + f[i];
    EXPECT_EQ(y[i], v > 0.0f ? v : 0.0f) << i;
  }
  const auto buffers = block->buffers();
  ASSERT_EQ(buffers.size(), 6u);  // bn1, bn2, shortcut.bn: running mean and variance each
  EXPECT_EQ(*buffers[4], bns.running_mean());
  EXPECT_EQ(*buffers[5], bns.running_var());
}

TEST(LayerGrad, SmallCnnEndToEnd) {
  Sequential net("net");
  net.add(std::make_unique<Conv2d>("conv1", 1, 4, 3, 1, 1));
  net.add(std::make_unique<BatchNorm>("bn1", 4));
  net.add(std::make_unique<ReLU>("relu1"));
  net.add(std::make_unique<MaxPool2d>("pool1", 2));
  net.add(std::make_unique<Linear>("fc", 4 * 4 * 4, 3));
  randomize_params(net, 70);
  for (Param* p : net.params())
    if (p->name == "bn1.gamma")
      for (int64_t i = 0; i < p->value.numel(); ++i) p->value[i] = 1.0f + 0.1f * i;
  Tensor x({3, 1, 8, 8});
  fill_normal(x, 71);
  check_layer(net, x, 72);
}

// Sequential's backward hook for a Linear fires as soon as its weight and bias gradients are final,
// before it computes dx (the gradient buckets start all-reducing them meanwhile), and again after
// its backward; the gradients and dx are those of a backward without the hook.
TEST(Sequential, BackwardHookFiresBeforeLinearComputesDx) {
  Sequential net("net");
  net.add(std::make_unique<Linear>("fc1", 6, 5));
  net.add(std::make_unique<ReLU>("relu"));
  net.add(std::make_unique<Linear>("fc2", 5, 4));
  randomize_params(net, 80);
  Tensor x({3, 6}), y, dy({3, 4});
  fill_normal(x, 81);
  fill_normal(dy, 82);
  const std::vector<Param*> params = net.params();
  auto zero_grads = [&] {
    for (Param* p : params) std::fill(p->grad.data(), p->grad.data() + p->grad.numel(), 0.0f);
  };
  auto grads = [&] {
    std::vector<std::vector<float>> g;
    for (Param* p : params) g.emplace_back(p->grad.data(), p->grad.data() + p->grad.numel());
    return g;
  };
  net.forward(x, y, /*train=*/true);
  zero_grads();
  Tensor dx_ref;
  net.backward(x, y, dy, &dx_ref);
  const std::vector<std::vector<float>> want = grads();

  net.forward(x, y, /*train=*/true);
  zero_grads();
  Tensor dx({1});  // resized to x's shape when fc1 (layer 0) computes it
  std::vector<size_t> calls;
  bool fc1_grads_final_at_first_call = false, dx_empty_at_first_call = false;
  net.set_backward_hook([&](size_t i) {
    if (i == 0 && std::count(calls.begin(), calls.end(), size_t{0}) == 0) {
      dx_empty_at_first_call = dx.numel() == 1;
      fc1_grads_final_at_first_call = grads() == want;
    }
    calls.push_back(i);
  });
  net.backward(x, y, dy, &dx);
  net.set_backward_hook({});
  EXPECT_EQ(calls, (std::vector<size_t>{2, 2, 1, 0, 0}));
  EXPECT_TRUE(dx_empty_at_first_call) << "the hook of fc1 came after its dx";
  EXPECT_TRUE(fc1_grads_final_at_first_call);
  EXPECT_EQ(grads(), want);
  ASSERT_EQ(dx.numel(), dx_ref.numel());
  EXPECT_EQ(0, std::memcmp(dx.data(), dx_ref.data(), sizeof(float) * dx.numel()));
}

TEST(Loss, SoftmaxCrossEntropyValueAndGradient) {
  Tensor z({2, 3});
  const float logits[] = {1.0f, 2.0f, 3.0f, 0.0f, 0.0f, 0.0f};
  for (int i = 0; i < 6; ++i) z[i] = logits[i];
  const int32_t labels[] = {2, 1};
  Tensor dz;
  int64_t correct = 0;
  const float loss = softmax_cross_entropy(z, labels, &dz, &correct);
  const double l0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)) - 3.0;
  const double l1 = std::log(3.0);
  EXPECT_NEAR(loss, (l0 + l1) / 2, 1e-6);
  EXPECT_EQ(correct, 1);  // sample 0 right; sample 1 is a three-way tie, argmax picks class 0
  // Gradient: (softmax - onehot) / n; rows sum to zero.
  EXPECT_NEAR(dz[0] + dz[1] + dz[2], 0.0, 1e-7);
  EXPECT_NEAR(dz[4], (1.0 / 3 - 1) / 2, 1e-7);
  const int32_t bad[] = {3, 0};
  EXPECT_THROW(softmax_cross_entropy(z, bad, nullptr, nullptr), Error);
}

}  // namespace
}  // namespace int4ddp::nn
