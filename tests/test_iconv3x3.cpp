// The integer 3x3 convolution (kernels/math/iconv3x3.h), forward, transposed (backward-data) and
// backward-weight: the references against igemm_ref on the im2col columns (the layers' GEMM
// path), and the AVX2 kernels against the references bit for bit at
// edge shapes (odd channel counts, channels not a multiple of 4 or of the 4-channel tile, 1 x N and
// N x 1 images, widths around the 16- and 8-pixel chunks), for code widths 2..8 of both operands,
// unsigned and signed inputs, the transposed (backward-data) packing, extreme codes at the int16
// chunk bound, and the refusal where int16 pair sums could saturate. Skipped without AVX2.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/iconv3x3.h"
#include "kernels/math/igemm.h"
#include "kernels/quant/codec.h"

namespace int4ddp::math {
namespace {

bool same_bits(float x, float y) { return std::memcmp(&x, &y, sizeof(float)) == 0; }

struct Case {
  int64_t cin, cout, h, w;
  int qa;  // input qmax
  bool is_signed;
  int qw;
  bool extreme;  // every code at its bound (largest sums)
};

// Input codes (cin, h, w) as bytes (int8 when signed), weights (cout, cin, 3, 3).
struct Data {
  std::vector<uint8_t> in;
  std::vector<int8_t> w;
};

Data make_data(const Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> da(c.is_signed ? -c.qa : 0, c.qa), dw(-c.qw, c.qw);
  Data d;
  d.in.resize(static_cast<size_t>(c.cin * c.h * c.w));
  d.w.resize(static_cast<size_t>(c.cout * c.cin * 9));
  for (auto& v : d.in) v = static_cast<uint8_t>(c.extreme ? c.qa : da(rng));
  for (auto& v : d.w) v = static_cast<int8_t>(c.extreme ? c.qw : dw(rng));
  if (!d.in.empty() && !c.extreme) d.in[0] = static_cast<uint8_t>(c.qa);
  if (d.w.size() > 1 && !c.extreme) d.w[1] = static_cast<int8_t>(-c.qw);
  return d;
}

// The column matrix (cin * 9, h * w) of one sample's input codes (im2col, code 0 outside).
std::vector<uint8_t> im2col(const Case& c, const uint8_t* in) {
  const int64_t hw = c.h * c.w;
  std::vector<uint8_t> col(static_cast<size_t>(c.cin * 9 * hw), 0);
  for (int64_t ch = 0; ch < c.cin; ++ch)
    for (int tap = 0; tap < 9; ++tap)
      for (int64_t y = 0; y < c.h; ++y)
        for (int64_t x = 0; x < c.w; ++x) {
          const int64_t iy = y + tap / 3 - 1, ix = x + tap % 3 - 1;
          if (iy >= 0 && iy < c.h && ix >= 0 && ix < c.w)
            col[static_cast<size_t>((ch * 9 + tap) * hw + y * c.w + x)] =
                in[static_cast<size_t>((ch * c.h + iy) * c.w + ix)];
        }
  return col;
}

CodeMatrix col_operand(const Case& c, const std::vector<uint8_t>& col, Trans t) {
  const int64_t hw = c.h * c.w;
  return c.is_signed ? codes_s8(reinterpret_cast<const int8_t*>(col.data()), hw, c.qa, t)
                     : codes_u8(col.data(), hw, c.qa, t);
}

// The definition through the layers' GEMM path: im2col of the input, then igemm_ref.
std::vector<float> gemm_reference(const Case& c, const Data& d, float scale) {
  const int64_t hw = c.h * c.w, k = c.cin * 9;
  const std::vector<uint8_t> col = im2col(c, d.in.data());
  std::vector<float> out(static_cast<size_t>(c.cout * hw));
  igemm_ref(c.cout, hw, k, codes_s8(d.w.data(), k, c.qw), col_operand(c, col, Trans::kNo), scale,
            false, out.data(), hw);
  return out;
}

bool have_kernel() { return quant::isa_allows(quant::Isa::kAvx2); }

// Backward-weight over 2 samples (in: 2 x (cin, h, w); dy: 2 x (cout, h, w) codes of qmax qw):
// the reference against dy (cout, hw) im2col^T through igemm_ref, then the kernel (both output
// layouts, added to nonzero contents) against the reference.
void check_wgrad(const Case& c, uint64_t seed) {
  const int64_t hw = c.h * c.w, k = c.cin * 9, n = 2;
  Case two = c;
  two.cin = n * c.cin;  // two samples' input codes
  const Data x = make_data(two, seed);
  Case dyc = c;
  dyc.cin = n * c.cout;
  dyc.qa = c.qw;
  dyc.is_signed = true;
  const Data g = make_data(dyc, seed + 3);  // g.in: two samples' dy codes
  const auto* dy = reinterpret_cast<const int8_t*>(g.in.data());
  for (bool transposed : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "wgrad transposed " << transposed);
    std::vector<double> ref(static_cast<size_t>(c.cout * k), 0.5);
    iconv3x3_wgrad_ref(c.cin, c.cout, c.h, c.w, n, x.in.data(), c.is_signed, dy, transposed,
                       ref.data());
    std::vector<double> gsum(ref.size(), 0.5);
    for (int64_t s = 0; s < n; ++s) {
      const std::vector<uint8_t> col = im2col(c, x.in.data() + s * c.cin * hw);
      std::vector<float> dw(static_cast<size_t>(c.cout * k));
      igemm_ref(c.cout, k, hw, codes_s8(dy + s * c.cout * hw, hw, c.qw),
                col_operand(c, col, Trans::kYes), 1.0f, false, dw.data(), k);
      for (int64_t o = 0; o < c.cout; ++o)
        for (int64_t ch = 0; ch < c.cin; ++ch)
          for (int tap = 0; tap < 9; ++tap)
            gsum[static_cast<size_t>(transposed ? (ch * c.cout + o) * 9 + 8 - tap
                                                : (o * c.cin + ch) * 9 + tap)] +=
                dw[static_cast<size_t>(o * k + ch * 9 + tap)];
    }
    // igemm_ref's float output is exact below 2^24 (the extreme large image is above).
    if (hw * c.qa * c.qw < (1 << 24)) {
      ASSERT_EQ(ref, gsum) << "wgrad reference vs igemm_ref";
    }
    if (!have_kernel()) continue;
    const bool fits = 2 * (c.is_signed ? 2 * c.qa : c.qa) * c.qw <= 32767;
    ASSERT_EQ(iconv3x3_wgrad_supports(c.h, c.w, c.qa, c.is_signed, c.qw), fits);
    std::vector<double> out(ref.size(), 0.5);
    if (!fits) {
      EXPECT_THROW(iconv3x3_wgrad(c.cin, c.cout, c.h, c.w, n, x.in.data(), c.is_signed, c.qa, dy,
                                  c.qw, transposed, out.data()),
                   Error);
      continue;
    }
    iconv3x3_wgrad(c.cin, c.cout, c.h, c.w, n, x.in.data(), c.is_signed, c.qa, dy, c.qw, transposed,
                   out.data());
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(out[i], ref[i]) << "wgrad at " << i;
  }
}

// W (cout, cin, 3, 3) -> the transposed convolution's weights (cin, cout, 3, 3), taps flipped.
std::vector<int8_t> flip(const std::vector<int8_t>& w, int64_t cout, int64_t cin) {
  std::vector<int8_t> t(w.size());
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t ch = 0; ch < cin; ++ch)
      for (int tap = 0; tap < 9; ++tap)
        t[static_cast<size_t>((ch * cout + o) * 9 + 8 - tap)] =
            w[static_cast<size_t>((o * cin + ch) * 9 + tap)];
  return t;
}

// Runs one case: the reference against the GEMM path, then (where supported) the kernel against
// the reference, forward and transposed, into an output with a plane stride past h * w whose gaps
// must stay untouched.
void check_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "cin=" << c.cin << " cout=" << c.cout << " h=" << c.h
                                    << " w=" << c.w << " qa=" << c.qa << (c.is_signed ? "s" : "u")
                                    << " qw=" << c.qw << " extreme=" << c.extreme);
  const Data d = make_data(c, seed);
  const float scale = 0.0371f;
  const int64_t hw = c.h * c.w, ldo = hw + 3;
  std::vector<float> ref(static_cast<size_t>(c.cout * ldo), -1.5f);
  iconv3x3_ref(d.w.data(), c.cout, c.cin, c.h, c.w, d.in.data(), c.is_signed, scale, ref.data(),
               ldo);
  const std::vector<float> g = gemm_reference(c, d, scale);
  for (int64_t o = 0; o < c.cout; ++o)
    for (int64_t i = 0; i < hw; ++i)
      ASSERT_TRUE(
          same_bits(ref[static_cast<size_t>(o * ldo + i)], g[static_cast<size_t>(o * hw + i)]))
          << "reference vs igemm_ref at (" << o << ", " << i << ")";
  check_wgrad(c, seed + 11);
  if (::testing::Test::HasFatalFailure() || !have_kernel()) return;
  Iconv3x3Weights wt;
  wt.pack(d.w.data(), c.cout, c.cin, c.qw);
  const bool fits = 2 * (c.is_signed ? 2 * c.qa : c.qa) * c.qw <= 32767;
  ASSERT_EQ(iconv3x3_supports(wt, c.qa, c.is_signed), fits);
  if (!fits) {
    std::vector<float> out(ref.size());
    EXPECT_THROW(iconv3x3(wt, c.h, c.w, d.in.data(), c.is_signed, c.qa, scale, out.data(), ldo),
                 Error);
    return;
  }
  std::vector<float> out(ref.size(), -1.5f);
  iconv3x3(wt, c.h, c.w, d.in.data(), c.is_signed, c.qa, scale, out.data(), ldo);
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_TRUE(same_bits(out[i], ref[i]))
        << "forward at (" << i / ldo << ", " << i % ldo << "): " << out[i] << " vs " << ref[i];
  // Transposed: cout -> cin channels with the flipped weights, on an input of cout channels.
  Case t = c;
  std::swap(t.cin, t.cout);
  Data dt = make_data(t, seed + 7);
  dt.w = flip(d.w, c.cout, c.cin);
  std::vector<float> tref(static_cast<size_t>(t.cout * ldo), -1.5f), tout = tref;
  iconv3x3_ref(dt.w.data(), t.cout, t.cin, t.h, t.w, dt.in.data(), t.is_signed, scale, tref.data(),
               ldo);
  Iconv3x3Weights wtt;
  wtt.pack_transposed(d.w.data(), c.cout, c.cin, c.qw);
  iconv3x3(wtt, t.h, t.w, dt.in.data(), t.is_signed, t.qa, scale, tout.data(), ldo);
  for (size_t i = 0; i < tref.size(); ++i)
    ASSERT_TRUE(same_bits(tout[i], tref[i]))
        << "transposed at (" << i / ldo << ", " << i % ldo << "): " << tout[i] << " vs " << tref[i];
}

struct Geo {
  int64_t cin, cout, h, w;
};
const Geo kEdgeGeos[] = {{1, 1, 1, 1},   {3, 5, 1, 9},   {4, 4, 9, 1},  {5, 3, 3, 7},
                         {17, 6, 2, 16}, {8, 9, 5, 17},  {6, 4, 4, 8},  {16, 16, 7, 7},
                         {7, 13, 3, 15}, {33, 4, 6, 31}, {2, 1, 1, 40}, {16, 32, 14, 14}};

// Every bit width of both operands (activations unsigned and signed, gradients signed), every
// edge geometry; 8-bit pairs whose int16 sums could saturate must be refused.
TEST(Iconv3x3, MatchesReferenceBitForBit) {
  if (!have_kernel()) std::printf("[  SKIP    ] iconv3x3 AVX2 kernel: not allowed here\n");
  uint64_t seed = 1;
  for (int ba = 2; ba <= 8; ++ba)
    for (int bw = 2; bw <= 8; ++bw)
      for (bool is_signed : {false, true}) {
        const int qa = is_signed ? (1 << (ba - 1)) - 1 : (1 << ba) - 1, qw = (1 << (bw - 1)) - 1;
        // Every geometry at 4 bits and at the extremes; a few at the other widths.
        const bool all = (ba == 4 && bw == 4) || ba == 8 || bw == 8;
        for (const Geo& g : kEdgeGeos) {
          if (!all && g.cin * g.h * g.w > 200) continue;
          check_case({g.cin, g.cout, g.h, g.w, qa, is_signed, qw, false}, seed++);
          if (HasFatalFailure()) return;
        }
      }
}

// Every code at its bound, with enough channel groups that the int16 sums are flushed into int32
// several times (7-bit activations x 7-bit weights: 2 groups per int16 chunk) and that the int32
// total is large: the guard's proof exercised at its edge.
TEST(Iconv3x3, ExtremeCodesAtTheInt16Bound) {
  for (bool is_signed : {false, true})
    for (int qa : {15, 63, 127, 255})
      for (int qw : {7, 63, 127}) {
        check_case({37, 5, 3, 19, is_signed && qa > 127 ? 127 : qa, is_signed, qw, true}, 99);
        if (HasFatalFailure()) return;
      }
  // 7-bit unsigned inputs x 8-bit weights / gradients at every bound on a 300 x 300 image: one
  // sample's backward-weight sums come near 2^31, so the two samples take one int32 pass each.
  check_case({1, 1, 300, 300, 127, false, 127, true}, 101);
}

// resnet20's and cnn's shapes at 4 bits (batch parts call the kernel per sample).
TEST(Iconv3x3, TrainingShapes) {
  const Geo geos[] = {{16, 16, 28, 28}, {32, 32, 14, 14}, {64, 64, 7, 7}, {32, 64, 14, 14}};
  uint64_t seed = 500;
  for (const Geo& g : geos)
    for (bool is_signed : {false, true}) {
      check_case({g.cin, g.cout, g.h, g.w, is_signed ? 7 : 15, is_signed, 7, false}, seed++);
      if (HasFatalFailure()) return;
    }
}

TEST(Iconv3x3, RefusesBadInput) {
  Iconv3x3Weights wt;
  const std::vector<int8_t> w(9, 1);
  EXPECT_THROW(wt.pack(w.data(), 1, 1, 0), Error);
  EXPECT_THROW(wt.pack(w.data(), 0, 1, 7), Error);
  wt.pack(w.data(), 1, 1, 7);
  EXPECT_FALSE(iconv3x3_supports(wt, 0, false));
  EXPECT_FALSE(iconv3x3_supports(wt, 128, true));
  if (!have_kernel()) return;
  const std::vector<uint8_t> in(4, 1);
  std::vector<float> out(4);
  EXPECT_THROW(iconv3x3(wt, 2, 2, in.data(), false, 15, 1.0f, out.data(), 3), Error);  // ldo < hw
  EXPECT_THROW(iconv3x3(wt, 0, 2, in.data(), false, 15, 1.0f, out.data(), 4), Error);
}

}  // namespace
}  // namespace int4ddp::math
