// The integer 3x3 convolution (kernels/math/iconv3x3.h), forward, transposed (backward-data) and
// backward-weight: the references against igemm_ref on the im2col columns (the layers' GEMM
// path), and every kernel against the references bit for bit at edge shapes (odd channel counts,
// channels not a multiple of 4 or of the 4- and 8-channel tiles, 1 x N and N x 1 images, widths
// around the 16- and 32-position tiles), for code widths 2..8 of both operands, unsigned and
// signed inputs, the transposed (backward-data) packing, extreme codes at the int16 chunk bound
// and at the int32 guard, and the refusals where a kernel's sums could overflow. The kernels: each
// instruction set this CPU has (AVX2, AVX512-VNNI; the others are skipped and say so) through the
// public entry points, and a scalar model of the VNNI tiles (the same tile shapes and operand
// layouts in plain loops, int32 overflow detected) through the shared driver on any CPU.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/iconv3x3.h"
#include "kernels/math/iconv3x3_kernels.h"
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

// ---- The kernels under test ---------------------------------------------------------------------

// A scalar model of the AVX512-VNNI tiles (iconv3x3_kernels.h's contract, kMr x kNr forward,
// kWgMr x kWgNr backward-weight, int32 products without int16 pairs): plain loops with int64 sums
// that flag any partial sum leaving int32 (which the hardware would wrap) and any odd group count.
bool g_model_overflow = false, g_model_odd_groups = false;
void model_sum(int64_t s, int32_t* t) {
  if (s < INT32_MIN || s > INT32_MAX) g_model_overflow = true;
  *t = static_cast<int32_t>(s);
}
template <int kMr, int kNr>
void model_tile(const uint8_t* xp, const int64_t* goff, const int8_t* wp, int64_t groups, int64_t,
                const int32_t* corr, float scale, float* res) {
  for (int r = 0; r < kMr; ++r)
    for (int j = 0; j < kNr; ++j) {
      int64_t s = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int q = 0; q < 4; ++q)
          s += int64_t{xp[goff[g] + 4 * j + q]} * wp[g * detail::kWeightGroup + 4 * r + q];
      int32_t t;
      model_sum(s, &t);
      res[r * kNr + j] = scale * static_cast<float>(t - corr[r]);
    }
}
template <int kMr, int kNr>
void model_wgrad_tile(const uint8_t* xb, const int64_t* roff, const uint8_t* db, int64_t ostride,
                      int64_t groups, int64_t, int32_t* t) {
  if (groups % 2 != 0) g_model_odd_groups = true;
  for (int r = 0; r < kMr; ++r)
    for (int j = 0; j < kNr; ++j) {
      int64_t s = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int q = 0; q < 4; ++q)
          s += int64_t{xb[roff[r] + 4 * g + q]} *
               static_cast<int8_t>(db[g * ostride * 4 + 4 * j + q]);
      model_sum(s, &t[r * kNr + j]);
    }
}
const detail::Iconv3x3Kernels kVnniModel = {
    false, 8, 32, 8, 16, model_tile<8, 32>, model_wgrad_tile<8, 16>};

// A kernel to test: an instruction set through the public entry points (isa), or a table through
// the driver's (isa == kAuto, kn set).
struct Kernel {
  std::string name;
  Iconv3x3Isa isa;
  const detail::Iconv3x3Kernels* kn;
};
const std::vector<Kernel>& kernels_here() {
  static const std::vector<Kernel> v = [] {
    std::vector<Kernel> k = {{"vnni model", Iconv3x3Isa::kAuto, &kVnniModel}};
    const std::pair<Iconv3x3Isa, const detail::Iconv3x3Kernels*> isas[] = {
        {Iconv3x3Isa::kAvx2, &detail::kIconv3x3Avx2},
        {Iconv3x3Isa::kAvx512Vnni, &detail::kIconv3x3Avx512Vnni}};
    for (const auto& [isa, kn] : isas) {
      if (iconv3x3_isa_available(isa))
        k.push_back({iconv3x3_isa_name(isa), isa, kn});
      else
        std::printf("[  SKIP    ] iconv3x3 %s: not on this CPU or not allowed by INT4DDP_ISA\n",
                    iconv3x3_isa_name(isa));
    }
    return k;
  }();
  return v;
}

// The guards of iconv3x3.h, restated: every partial sum within int32, and for int16 pair sums
// 2 * qu * q <= 32767 (qu the largest input byte, 2 qmax for signed inputs).
int64_t input_byte_max(const Case& c) { return c.is_signed ? 2 * c.qa : c.qa; }
bool expect_fits(const Kernel& k, const Case& c) {
  const int64_t qu = input_byte_max(c);
  return (!k.kn->int16_pairs || 2 * qu * c.qw <= 32767) &&
         9 * ((c.cin + 3) / 4 * 4) * qu * c.qw <= 2147483647;
}
bool expect_wgrad_fits(const Kernel& k, const Case& c) {
  const int64_t qu = input_byte_max(c), positions = ((c.h + 1) * (c.w + 1) + 3) / 4 * 4;
  return (!k.kn->int16_pairs || 2 * qu * c.qw <= 32767) && positions * qu * c.qw <= 2147483647;
}

// Backward-weight over 2 samples (in: 2 x (cin, h, w); dy: 2 x (cout, h, w) codes of qmax qw):
// the reference against dy (cout, hw) im2col^T through igemm_ref, then each kernel (both output
// layouts, added to nonzero contents; the model's transposed one in one call per sample) against
// the reference.
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
    for (const Kernel& kern : kernels_here()) {
      SCOPED_TRACE(kern.name);
      const bool fits = expect_wgrad_fits(kern, c);
      std::vector<double> out(ref.size(), 0.5);
      if (kern.isa == Iconv3x3Isa::kAuto) {  // the model, through the driver
        ASSERT_EQ(detail::iconv3x3_wgrad_fits(*kern.kn, c.h, c.w, c.qa, c.is_signed, c.qw), fits);
        if (!fits) continue;
        Iconv3x3WgradSum sum;
        sum.reset(c.cin, c.cout);
        if (!transposed) {  // both samples in one call (the driver's int32 passes)
          sum.add_with(*kern.kn, c.h, c.w, n, x.in.data(), c.is_signed, c.qa, dy, c.qw);
        } else {  // one call per sample (sums accumulated across calls)
          for (int64_t s = 0; s < n; ++s)
            sum.add_with(*kern.kn, c.h, c.w, 1, x.in.data() + s * c.cin * hw, c.is_signed, c.qa,
                         dy + s * c.cout * hw, c.qw);
        }
        sum.finish(transposed, out.data());
      } else {
        ASSERT_EQ(iconv3x3_wgrad_supports(c.h, c.w, c.qa, c.is_signed, c.qw, kern.isa), fits);
        if (!fits) {
          EXPECT_THROW(iconv3x3_wgrad(c.cin, c.cout, c.h, c.w, n, x.in.data(), c.is_signed, c.qa,
                                      dy, c.qw, transposed, out.data(), kern.isa),
                       Error);
          continue;
        }
        iconv3x3_wgrad(c.cin, c.cout, c.h, c.w, n, x.in.data(), c.is_signed, c.qa, dy, c.qw,
                       transposed, out.data(), kern.isa);
      }
      for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(out[i], ref[i]) << "wgrad at " << i;
    }
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
  if (::testing::Test::HasFatalFailure()) return;
  // Transposed: cout -> cin channels with the flipped weights, on an input of cout channels.
  Case t = c;
  std::swap(t.cin, t.cout);
  Data dt = make_data(t, seed + 7);
  dt.w = flip(d.w, c.cout, c.cin);
  std::vector<float> tref(static_cast<size_t>(t.cout * ldo), -1.5f);
  iconv3x3_ref(dt.w.data(), t.cout, t.cin, t.h, t.w, dt.in.data(), t.is_signed, scale, tref.data(),
               ldo);
  Iconv3x3Weights wt, wtt;
  wt.pack(d.w.data(), c.cout, c.cin, c.qw);
  wtt.pack_transposed(d.w.data(), c.cout, c.cin, c.qw);
  for (const Kernel& kern : kernels_here()) {
    SCOPED_TRACE(kern.name);
    const bool fits = expect_fits(kern, c), tfits = expect_fits(kern, t);
    // One convolution through the kernel: the model through the driver, an ISA through the public
    // entry point.
    auto run = [&](const Iconv3x3Weights& wts, const Case& cc, const Data& dd, float* out) {
      if (kern.isa == Iconv3x3Isa::kAuto)
        detail::iconv3x3_with(*kern.kn, wts, cc.h, cc.w, dd.in.data(), cc.is_signed, cc.qa, scale,
                              out, ldo);
      else
        iconv3x3(wts, cc.h, cc.w, dd.in.data(), cc.is_signed, cc.qa, scale, out, ldo, kern.isa);
    };
    auto supports = [&](const Iconv3x3Weights& wts, const Case& cc) {
      return kern.isa == Iconv3x3Isa::kAuto
                 ? detail::iconv3x3_fits(*kern.kn, wts, cc.qa, cc.is_signed)
                 : iconv3x3_supports(wts, cc.qa, cc.is_signed, kern.isa);
    };
    ASSERT_EQ(supports(wt, c), fits);
    ASSERT_EQ(supports(wtt, t), tfits);
    std::vector<float> out(ref.size(), -1.5f);
    if (!fits) {
      EXPECT_THROW(run(wt, c, d, out.data()), Error);
    } else {
      run(wt, c, d, out.data());
      for (size_t i = 0; i < ref.size(); ++i)
        ASSERT_TRUE(same_bits(out[i], ref[i]))
            << "forward at (" << i / ldo << ", " << i % ldo << "): " << out[i] << " vs " << ref[i];
    }
    if (!tfits) continue;
    std::vector<float> tout(tref.size(), -1.5f);
    run(wtt, t, dt, tout.data());
    for (size_t i = 0; i < tref.size(); ++i)
      ASSERT_TRUE(same_bits(tout[i], tref[i])) << "transposed at (" << i / ldo << ", " << i % ldo
                                               << "): " << tout[i] << " vs " << tref[i];
  }
  EXPECT_FALSE(g_model_overflow) << "the driver let an int32 sum of the VNNI model overflow";
  EXPECT_FALSE(g_model_odd_groups) << "the driver gave the VNNI model an odd group count";
}

struct Geo {
  int64_t cin, cout, h, w;
};
const Geo kEdgeGeos[] = {{1, 1, 1, 1},   {3, 5, 1, 9},   {4, 4, 9, 1},  {5, 3, 3, 7},
                         {17, 6, 2, 16}, {8, 9, 5, 17},  {6, 4, 4, 8},  {16, 16, 7, 7},
                         {7, 13, 3, 15}, {33, 4, 6, 31}, {2, 1, 1, 40}, {16, 32, 14, 14},
                         {9, 24, 2, 31}, {3, 8, 1, 32}};

// Every bit width of both operands (activations unsigned and signed, gradients signed), every
// edge geometry; 8-bit pairs whose int16 sums could saturate must be refused by the AVX2 kernel
// (the VNNI kernel takes them).
TEST(Iconv3x3, MatchesReferenceBitForBit) {
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

// The int32 guard at 8 bits (iconv3x3.h), where the int16 one no longer applies (VNNI, and the
// model of its tiles): every code at its bound at the largest K = 9 cin the guard allows, where T
// comes within 0.1% of 2^31 (unsigned activations 255 x weights 127: cin 7364; signed inputs,
// offset to 254, x 127: cin 7396), refused one channel group later; the backward-weight's at one
// sample of 256 x 256 (66052 positions with the padding, under 2^31 / (255 * 127) = 66311: each of
// the two samples is an int32 pass) and refused at 257 x 257.
TEST(Iconv3x3, Int32GuardAtEightBits) {
  Iconv3x3Weights wt;
  for (bool is_signed : {false, true}) {
    const int qa = is_signed ? 127 : 255;
    const int64_t edge = is_signed ? 7396 : 7364;
    const std::vector<int8_t> w(static_cast<size_t>(9 * (edge + 4)), 127);
    wt.pack(w.data(), 1, edge, 127);
    EXPECT_TRUE(detail::iconv3x3_fits(detail::kIconv3x3Avx512Vnni, wt, qa, is_signed));
    EXPECT_FALSE(detail::iconv3x3_fits(detail::kIconv3x3Avx2, wt, qa, is_signed));  // int16
    wt.pack(w.data(), 1, edge + 1, 127);
    EXPECT_FALSE(detail::iconv3x3_fits(detail::kIconv3x3Avx512Vnni, wt, qa, is_signed));
    check_case({edge, 9, 3, 3, qa, is_signed, 127, true}, 103);
    if (HasFatalFailure()) return;
  }
  EXPECT_TRUE(detail::iconv3x3_wgrad_fits(detail::kIconv3x3Avx512Vnni, 256, 256, 255, false, 127));
  EXPECT_FALSE(detail::iconv3x3_wgrad_fits(detail::kIconv3x3Avx512Vnni, 257, 257, 255, false, 127));
  check_case({1, 1, 256, 256, 255, false, 127, true}, 105);
  if (HasFatalFailure()) return;
  check_case({1, 1, 257, 257, 255, false, 127, true}, 107);
}

// kAuto takes the widest kernel the CPU has and INT4DDP_ISA (the codec's ISA) allows: avx2 rules
// the VNNI kernel out, portable both; an unavailable one is refused by name.
TEST(Iconv3x3, ChoosesTheWidestAllowedIsa) {
  const quant::Isa before = quant::current_isa();
  auto expected = [] {
    for (Iconv3x3Isa isa : {Iconv3x3Isa::kAvx512Vnni, Iconv3x3Isa::kAvx2})
      if (iconv3x3_isa_available(isa)) return isa;
    return Iconv3x3Isa::kAuto;
  };
  EXPECT_EQ(iconv3x3_resolve(Iconv3x3Isa::kAuto), expected());
  EXPECT_EQ(iconv3x3_isa_available(Iconv3x3Isa::kAuto), expected() != Iconv3x3Isa::kAuto);
  for (quant::Isa codec : {quant::Isa::kPortable, quant::Isa::kAvx2}) {
    if (!quant::isa_available(codec)) continue;
    quant::set_isa(codec);
    EXPECT_FALSE(iconv3x3_isa_available(Iconv3x3Isa::kAvx512Vnni)) << quant::isa_name(codec);
    EXPECT_EQ(iconv3x3_isa_available(Iconv3x3Isa::kAvx2),
              codec == quant::Isa::kAvx2 && __builtin_cpu_supports("avx2"));
    EXPECT_EQ(iconv3x3_resolve(Iconv3x3Isa::kAuto), expected()) << quant::isa_name(codec);
  }
  quant::set_isa(before);
  Iconv3x3Weights wt;
  const std::vector<int8_t> w(9, 1);
  wt.pack(w.data(), 1, 1, 7);
  const std::vector<uint8_t> in(4, 1);
  std::vector<float> out(4);
  for (Iconv3x3Isa isa : kIconv3x3Isas) {
    if (iconv3x3_isa_available(isa)) continue;
    EXPECT_FALSE(iconv3x3_supports(wt, 15, false, isa));
    EXPECT_FALSE(iconv3x3_wgrad_supports(2, 2, 15, false, 7, isa));
    try {
      iconv3x3(wt, 2, 2, in.data(), false, 15, 1.0f, out.data(), 4, isa);
      ADD_FAILURE() << iconv3x3_isa_name(isa) << " ran where it is not available";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(iconv3x3_isa_name(isa)), std::string::npos) << e.what();
    }
  }
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
  const std::vector<uint8_t> in(4, 1);
  std::vector<float> out(4);
  for (const Kernel& kern : kernels_here()) {
    SCOPED_TRACE(kern.name);
    EXPECT_FALSE(detail::iconv3x3_fits(*kern.kn, wt, 0, false));
    EXPECT_FALSE(detail::iconv3x3_fits(*kern.kn, wt, 256, false));
    EXPECT_THROW(
        detail::iconv3x3_with(*kern.kn, wt, 2, 2, in.data(), false, 15, 1.0f, out.data(), 3),
        Error);  // ldo < hw
    EXPECT_THROW(
        detail::iconv3x3_with(*kern.kn, wt, 0, 2, in.data(), false, 15, 1.0f, out.data(), 4),
        Error);
    if (kern.isa == Iconv3x3Isa::kAuto) continue;
    EXPECT_THROW(iconv3x3(wt, 2, 2, in.data(), false, 15, 1.0f, out.data(), 3, kern.isa), Error);
    EXPECT_THROW(iconv3x3(wt, 0, 2, in.data(), false, 15, 1.0f, out.data(), 4, kern.isa), Error);
  }
}

}  // namespace
}  // namespace int4ddp::math
