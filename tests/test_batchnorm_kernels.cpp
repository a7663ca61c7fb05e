// BatchNorm's per-channel kernels (kernels/math/batchnorm.h) on every instruction set present,
// against a statement of their definitions written here: the sums in the documented lane order
// (bit for bit: the order is the contract, so every ISA must give the reference's bits) and the
// elementwise expressions (bit for bit). Shapes cover rows shorter than a vector, exact multiples,
// tails, one row, one element, and channels interleaved with others (stride > hw).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/batchnorm.h"

namespace int4ddp::math {
namespace {

std::vector<BnIsa> isas_present() {
  std::vector<BnIsa> out;
  for (BnIsa isa : {BnIsa::kPortable, BnIsa::kAvx2})
    if (bn_isa_available(isa)) out.push_back(isa);
  return out;
}

// The documented order: element j of every row into lane j % 8, rows in order, then
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
template <typename Term>
double lane_sum(const ChannelRows& r, Term term) {
  double l[8] = {};
  for (int64_t i = 0; i < r.n; ++i)
    for (int64_t j = 0; j < r.hw; ++j) l[j % 8] += term(i * r.stride + j);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

struct Shape {
  int64_t n, c, hw;
};

const Shape kShapes[] = {{1, 1, 1},  {7, 1, 1},    {128, 64, 1}, {3, 3, 5},
                         {2, 1, 8},  {4, 3, 9},    {1, 3, 16},   {5, 2, 23},
                         {3, 3, 49}, {2, 16, 196}, {2, 3, 784},  {1, 1, 7}};

// Data with zeros of both signs, exact ties at the ReLU threshold and a mean far from zero.
std::vector<float> make_data(int64_t count, uint64_t seed, float offset) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(offset, 2.0f);
  std::vector<float> v(static_cast<size_t>(count));
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = i % 11 == 3 ? -0.0f : i % 13 == 5 ? 0.0f : normal(rng);
  return v;
}

TEST(BatchNormKernels, SumsFollowTheDocumentedOrder) {
  for (const Shape s : kShapes)
    for (float offset : {0.0f, 100.0f}) {
      const std::vector<float> x = make_data(s.n * s.c * s.hw, 1, offset);
      const std::vector<float> dy = make_data(s.n * s.c * s.hw, 2, 0.0f);
      const ChannelRows rows{s.n, s.hw, s.c * s.hw};
      for (int64_t ch = 0; ch < s.c; ++ch) {
        const float* xc = x.data() + ch * s.hw;
        const float* dc = dy.data() + ch * s.hw;
        const double shift = xc[0], mean = offset + 0.25;
        const double ref_s = lane_sum(rows, [&](int64_t k) { return double(xc[k]) - shift; });
        const double ref_s2 = lane_sum(rows, [&](int64_t k) {
          const double d = double(xc[k]) - shift;
          return d * d;
        });
        for (bool relu : {false, true}) {
          const ReluMask mask{relu, 0.75f, -0.5f};
          auto d_of = [&](int64_t k) {
            return !relu || xc[k] * mask.scale + mask.shift > 0.0f ? dc[k] : 0.0f;
          };
          const double ref_a = lane_sum(rows, [&](int64_t k) { return double(d_of(k)); });
          const double ref_b =
              lane_sum(rows, [&](int64_t k) { return double(d_of(k)) * (double(xc[k]) - mean); });
          for (BnIsa isa : isas_present()) {
            SCOPED_TRACE(testing::Message()
                         << bn_isa_name(isa) << " n=" << s.n << " c=" << s.c << " hw=" << s.hw
                         << " ch=" << ch << " relu=" << relu << " offset=" << offset);
            const ChannelSums m = bn_moments(xc, rows, shift, isa);
            EXPECT_TRUE(same_bits(m.first, ref_s)) << m.first << " vs " << ref_s;
            EXPECT_TRUE(same_bits(m.second, ref_s2)) << m.second << " vs " << ref_s2;
            const ChannelSums g = bn_grad_moments(dc, xc, rows, mean, mask, isa);
            EXPECT_TRUE(same_bits(g.first, ref_a)) << g.first << " vs " << ref_a;
            EXPECT_TRUE(same_bits(g.second, ref_b)) << g.second << " vs " << ref_b;
          }
        }
      }
    }
}

// The elementwise kernels write exactly their channel's rows (the other channels keep their
// sentinel) with the documented float expressions.
TEST(BatchNormKernels, ElementwiseMatchDefinitionAndStayInTheirRows) {
  constexpr float kSentinel = 1234.5f;
  for (const Shape s : kShapes) {
    const int64_t count = s.n * s.c * s.hw;
    const std::vector<float> x = make_data(count, 3, 0.5f), dy = make_data(count, 4, 0.0f);
    const ChannelRows rows{s.n, s.hw, s.c * s.hw};
    const int64_t ch = s.c / 2;
    for (bool relu : {false, true})
      for (BnIsa isa : isas_present()) {
        SCOPED_TRACE(testing::Message() << bn_isa_name(isa) << " n=" << s.n << " c=" << s.c
                                        << " hw=" << s.hw << " relu=" << relu);
        std::vector<float> y(static_cast<size_t>(count), kSentinel), dx = y;
        const float scale = 1.25f, shift = -0.375f;
        bn_affine(x.data() + ch * s.hw, y.data() + ch * s.hw, rows, scale, shift, relu, isa);
        const BnInputGrad p{0.8f, 0.3f, -0.2f, 0.05f, {relu, scale, shift}};
        bn_input_grad(x.data() + ch * s.hw, dy.data() + ch * s.hw, dx.data() + ch * s.hw, rows, p,
                      isa);
        for (int64_t k = 0; k < count; ++k) {
          if ((k / s.hw) % s.c != ch) {
            ASSERT_EQ(y[k], kSentinel) << k;
            ASSERT_EQ(dx[k], kSentinel) << k;
            continue;
          }
          const float v = x[k] * scale + shift;
          const float ref_y = !relu || v > 0.0f ? v : 0.0f;
          ASSERT_TRUE(same_bits(y[k], ref_y)) << k << ": " << y[k] << " vs " << ref_y;
          const float d = !relu || v > 0.0f ? dy[k] : 0.0f;
          const float ref_dx = (p.g * d - (x[k] - p.mean) * p.k) - p.gmdy;
          ASSERT_TRUE(same_bits(dx[k], ref_dx)) << k << ": " << dx[k] << " vs " << ref_dx;
        }
      }
  }
}

// A NaN input reaches the sums (never dropped by the masks) and the fused ReLU maps it to 0.
TEST(BatchNormKernels, NanPropagatesThroughSums) {
  const ChannelRows rows{2, 11, 11};
  std::vector<float> x(22, 1.0f), y(22);
  x[10] = std::numeric_limits<float>::quiet_NaN();  // in the tail of row 0
  for (BnIsa isa : isas_present()) {
    SCOPED_TRACE(bn_isa_name(isa));
    EXPECT_TRUE(std::isnan(bn_moments(x.data(), rows, 0.0, isa).first));
    EXPECT_TRUE(std::isnan(bn_grad_moments(x.data(), x.data(), rows, 0.0, {}, isa).second));
    bn_affine(x.data(), y.data(), rows, 1.0f, 0.0f, true, isa);
    EXPECT_EQ(y[10], 0.0f);
    EXPECT_EQ(y[9], 1.0f);
  }
}

TEST(BatchNormKernels, UnavailableIsaIsAnError) {
  if (bn_isa_available(BnIsa::kAvx2)) GTEST_SKIP() << "AVX2 present";
  EXPECT_THROW(bn_resolve(BnIsa::kAvx2), Error);
}

}  // namespace
}  // namespace int4ddp::math
