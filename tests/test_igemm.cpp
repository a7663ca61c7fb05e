// The integer GEMM (kernels/math/igemm.h): every instruction set present on this CPU against the
// plain int64 reference, bit for bit, at edge shapes (K not a multiple of 4 or of any tile, M or N
// of 1, odd sizes, transposed and padded operands), for code widths b = 2..8 and the three GEMMs of
// the quantized layers; the int32 guard and the chunked sum past it; the refusals. ISAs the CPU
// lacks (AVX512-VNNI, AMX on an AVX2-only machine) are skipped and say so.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/gemm.h"
#include "kernels/math/igemm.h"
#include "kernels/math/igemm_kernels.h"

namespace int4ddp::math {
namespace {

// Codes of one operand, stored as the type the test asks for.
struct Codes {
  std::vector<int8_t> s8;
  std::vector<uint8_t> u8;
  std::vector<float> f32;
  CodeMatrix view;
};

// rows x ld stored codes, uniform over the grid (unsigned 0..qmax or signed -qmax..qmax), with the
// extreme codes forced into the first elements so every run reaches the bounds.
Codes make_codes(int64_t rows, int64_t ld, int qmax, bool is_unsigned, CodeType type, Trans t,
                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(is_unsigned ? 0 : -qmax, qmax);
  Codes c;
  const size_t n = static_cast<size_t>(rows * ld);
  std::vector<int> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = d(rng);
  if (n > 0) v[0] = qmax;
  if (n > 1) v[1] = is_unsigned ? qmax : -qmax;
  switch (type) {
    case CodeType::kS8:
      c.s8.assign(v.begin(), v.end());
      c.view = codes_s8(c.s8.data(), ld, qmax, t);
      break;
    case CodeType::kU8:
      c.u8.assign(v.begin(), v.end());
      c.view = codes_u8(c.u8.data(), ld, qmax, t);
      break;
    case CodeType::kF32:
      c.f32.assign(v.begin(), v.end());
      c.view = codes_f32(c.f32.data(), ld, qmax, is_unsigned, t);
      break;
  }
  return c;
}

std::vector<IgemmIsa> present_isas() {
  std::vector<IgemmIsa> v;
  for (IgemmIsa isa : kIgemmIsas) {
    if (igemm_isa_available(isa))
      v.push_back(isa);
    else
      std::printf("[  SKIP    ] igemm ISA %s: not present on this CPU / kernel\n",
                  igemm_isa_name(isa));
  }
  return v;
}

bool same_bits(float x, float y) { return std::memcmp(&x, &y, sizeof(float)) == 0; }

struct Operand {
  int bits;
  bool is_unsigned;
};
int qmax_of(const Operand& o) {
  return o.is_unsigned ? (1 << o.bits) - 1 : (1 << (o.bits - 1)) - 1;
}

// One case: every present ISA against the reference, both the float output (accumulating into
// random contents and overwriting) and int32 output; also against int_gemm_ref on the float codes
// (the fp32 path the layers used before), which must agree bit for bit.
void check_case(int64_t m, int64_t n, int64_t k, Operand oa, Operand ob, Trans ta, Trans tb,
                CodeType type_a, CodeType type_b, const std::vector<IgemmIsa>& isas,
                uint64_t seed) {
  const int qa = qmax_of(oa), qb = qmax_of(ob);
  const int64_t lda = (ta == Trans::kNo ? k : m) + 3, ldb = (tb == Trans::kNo ? n : k) + 1;
  const int64_t ldc = n + 2;
  const Codes a = make_codes(ta == Trans::kNo ? m : k, lda, qa, oa.is_unsigned, type_a, ta, seed);
  const Codes b =
      make_codes(tb == Trans::kNo ? k : n, ldb, qb, ob.is_unsigned, type_b, tb, seed + 1);
  const Codes af =
      make_codes(ta == Trans::kNo ? m : k, lda, qa, oa.is_unsigned, CodeType::kF32, ta, seed);
  const Codes bf =
      make_codes(tb == Trans::kNo ? k : n, ldb, qb, ob.is_unsigned, CodeType::kF32, tb, seed + 1);
  const float scale = 0.0371f;
  std::vector<float> init(static_cast<size_t>(m * ldc));
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> nd(0.0f, 10.0f);
  for (float& v : init) v = nd(rng);
  for (bool acc : {false, true}) {
    std::vector<float> ref = init, old = init;
    igemm_ref(m, n, k, a.view, b.view, scale, acc, ref.data(), ldc);
    int_gemm_ref(ta, tb, m, n, k, af.f32.data(), lda, bf.f32.data(), ldb, scale, acc, old.data(),
                 ldc);
    for (size_t i = 0; i < ref.size(); ++i)
      ASSERT_TRUE(same_bits(ref[i], old[i])) << "igemm_ref vs int_gemm_ref at " << i;
    for (IgemmIsa isa : isas) {
      std::vector<float> c = init;
      igemm(m, n, k, a.view, b.view, scale, acc, c.data(), ldc, isa);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < ldc; ++j) {
          const size_t x = static_cast<size_t>(i * ldc + j);
          ASSERT_TRUE(same_bits(c[x], ref[x]))
              << igemm_isa_name(isa) << " m=" << m << " n=" << n << " k=" << k << " bits "
              << oa.bits << (oa.is_unsigned ? "u" : "s") << " x " << ob.bits
              << (ob.is_unsigned ? "u" : "s") << " ta=" << int(ta) << " tb=" << int(tb)
              << " acc=" << acc << " at (" << i << ", " << j << "): " << c[x] << " vs " << ref[x];
        }
    }
  }
  if (k > igemm_max_k(a.view, b.view)) return;
  std::vector<int32_t> ref32(static_cast<size_t>(m * ldc), -7);
  igemm_s32(m, n, k, a.view, b.view, ref32.data(), ldc, IgemmIsa::kRef);
  for (IgemmIsa isa : isas) {
    std::vector<int32_t> c32(static_cast<size_t>(m * ldc), -7);
    igemm_s32(m, n, k, a.view, b.view, c32.data(), ldc, isa);
    ASSERT_EQ(c32, ref32) << igemm_isa_name(isa) << " int32 m=" << m << " n=" << n << " k=" << k;
  }
}

using Shape = std::tuple<int64_t, int64_t, int64_t>;
const Shape kEdgeShapes[] = {{1, 1, 1},     {1, 17, 5},   {13, 1, 7},  {5, 3, 2},
                             {4, 16, 4},    {8, 32, 64},  {9, 33, 65}, {17, 15, 3},
                             {31, 47, 131}, {2, 70, 300}, {16, 16, 0}};

// The three GEMMs of the quantized layers at every b, every present ISA, every edge shape.
TEST(Igemm, EveryIsaMatchesReferenceBitForBit) {
  const auto isas = present_isas();
  uint64_t seed = 1;
  for (int bits = 2; bits <= 8; ++bits) {
    const Operand act{bits, true}, w{bits, false}, g{bits, false};
    // forward (act x w), backward-data (g x w), backward-weight (g^T x act, act on the right)
    const std::tuple<Operand, Operand, Trans, Trans> kinds[] = {{act, w, Trans::kNo, Trans::kYes},
                                                                {g, w, Trans::kNo, Trans::kNo},
                                                                {g, act, Trans::kYes, Trans::kNo},
                                                                {w, act, Trans::kNo, Trans::kNo}};
    for (const auto& [oa, ob, ta, tb] : kinds)
      for (const auto& [m, n, k] : kEdgeShapes)
        check_case(m, n, k, oa, ob, ta, tb, oa.is_unsigned ? CodeType::kU8 : CodeType::kS8,
                   ob.is_unsigned ? CodeType::kU8 : CodeType::kS8, isas, ++seed);
  }
}

// Mixed widths (4-bit weights against 8-bit activations and so on), float-stored codes and every
// transpose combination.
TEST(Igemm, MixedWidthsTransposesAndFloatCodes) {
  const auto isas = present_isas();
  uint64_t seed = 1000;
  for (auto [ba, bb] : {std::pair{8, 4}, std::pair{4, 8}, std::pair{3, 7}, std::pair{8, 8}})
    for (bool ua : {false, true})
      for (Trans ta : {Trans::kNo, Trans::kYes})
        for (Trans tb : {Trans::kNo, Trans::kYes})
          for (CodeType type : {CodeType::kF32, CodeType::kS8}) {
            const Operand oa{ba, ua}, ob{bb, false};
            const CodeType type_a =
                type == CodeType::kF32 ? type : (ua ? CodeType::kU8 : CodeType::kS8);
            check_case(7, 19, 37, oa, ob, ta, tb, type_a, type, isas, ++seed);
            check_case(19, 7, 37, ob, oa, tb, ta, type, type_a, isas, ++seed);
          }
}

// Past the int32 guard: 8-bit unsigned x signed codes at their maxima, K above 66311, summed in
// exact int64 chunks. Every product is 255 * 127, so T = K * 32385 > 2^31 and the float result is
// that exact total times the scale.
TEST(Igemm, LongKSumsChunksExactlyPastTheInt32Guard) {
  const int64_t k = 70001;
  std::vector<uint8_t> a(static_cast<size_t>(2 * k), 255);
  std::vector<int8_t> b(static_cast<size_t>(k * 3), 127);
  b[5] = -127;  // one negative term in column 2
  const CodeMatrix am = codes_u8(a.data(), k, 255), bm = codes_s8(b.data(), 3, 127);
  EXPECT_EQ(igemm_max_k(am, bm), 66311);
  EXPECT_GT(int64_t{k} * 255 * 127, int64_t{2147483647});
  std::vector<float> ref(6);
  igemm_ref(2, 3, k, am, bm, 1.0f, false, ref.data(), 3);
  EXPECT_EQ(ref[0], static_cast<float>(int64_t{k} * 255 * 127));
  EXPECT_EQ(ref[2], static_cast<float>(int64_t{k - 2} * 255 * 127));
  for (IgemmIsa isa : present_isas()) {
    std::vector<float> c(6);
    igemm(2, 3, k, am, bm, 1.0f, false, c.data(), 3, isa);
    for (size_t i = 0; i < c.size(); ++i)
      EXPECT_TRUE(same_bits(c[i], ref[i])) << igemm_isa_name(isa) << " at " << i;
    std::vector<int32_t> c32(6);
    EXPECT_THROW(igemm_s32(2, 3, k, am, bm, c32.data(), 3, isa), Error);
  }
}

// Scalar models of the VNNI (8 x 32, group-interleaved u8 panel) and AMX (16 x 16, row-major u8
// panel, 16-group steps) micro-kernels: the same sums in plain loops over the documented panel
// layouts. They run the driver's packing, padding and correction for those layouts on any CPU;
// the intrinsics themselves run only where the CPU has them (EveryIsaMatchesReferenceBitForBit).
bool g_misaligned_groups = false;
template <int kMr, int kNr, bool kRowMajor, int kAlign>
void scalar_micro(const uint8_t* u, int64_t u_stride, const int8_t* s, int64_t groups, int,
                  int32_t* tile) {
  if (groups % kAlign != 0) g_misaligned_groups = true;
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < kNr; ++j) {
      int32_t t = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int q = 0; q < 4; ++q) {
          const int uv = kRowMajor ? u[i * u_stride + g * 4 + q] : u[(g * kMr + i) * 4 + q];
          t += uv * s[(g * kNr + j) * 4 + q];
        }
      tile[i * kNr + j] = t;
    }
}

TEST(Igemm, DriverLayoutsOfVnniAndAmxMatchReference) {
  const detail::IgemmKernels vnni_model = {8, 32, 1, false, scalar_micro<8, 32, false, 1>};
  const detail::IgemmKernels amx_model = {16, 16, 16, true, scalar_micro<16, 16, true, 16>};
  uint64_t seed = 5000;
  for (const detail::IgemmKernels* kn : {&vnni_model, &amx_model})
    for (int bits : {2, 4, 7, 8})
      for (const auto& [m, n, k] : kEdgeShapes)
        for (bool act_left : {true, false}) {
          const int qa = (1 << bits) - 1, qs = (1 << (bits - 1)) - 1;
          // activations x weights, or gradients (signed, offset on the u8 side) x activations
          const Codes a = act_left
                              ? make_codes(m, k + 1, qa, true, CodeType::kU8, Trans::kNo, ++seed)
                              : make_codes(m, k + 1, qs, false, CodeType::kS8, Trans::kNo, ++seed);
          const Codes b = act_left
                              ? make_codes(n, k, qs, false, CodeType::kF32, Trans::kYes, ++seed)
                              : make_codes(k, n, qa, true, CodeType::kU8, Trans::kNo, ++seed);
          std::vector<float> ref(static_cast<size_t>(m * n) + 1), c(ref.size());
          igemm_ref(m, n, k, a.view, b.view, 0.25f, false, ref.data(), n);
          detail::igemm_with_kernels(*kn, m, n, k, a.view, b.view, 0.25f, false, c.data(), n);
          ASSERT_EQ(std::memcmp(c.data(), ref.data(), c.size() * sizeof(float)), 0)
              << "mr " << kn->mr << " bits " << bits << " m=" << m << " n=" << n << " k=" << k
              << " act_left " << act_left;
        }
  EXPECT_FALSE(g_misaligned_groups);
}

TEST(Igemm, GuardValues) {
  int8_t s = 0;
  uint8_t u = 0;
  EXPECT_EQ(igemm_max_k(codes_u8(&u, 1, 255), codes_s8(&s, 1, 127)), 2147483647 / (255 * 127));
  EXPECT_EQ(igemm_max_k(codes_s8(&s, 1, 127), codes_s8(&s, 1, 127)), 2147483647 / (254 * 127));
  EXPECT_EQ(igemm_max_k(codes_u8(&u, 1, 15), codes_s8(&s, 1, 7)), 2147483647 / (15 * 7));
}

TEST(Igemm, RefusesBadOperandsAndAbsentIsas) {
  int8_t s[4] = {};
  uint8_t u[4] = {};
  float c[4] = {};
  EXPECT_THROW(
      igemm(1, 1, 1, codes_s8(s, 1, 128), codes_s8(s, 1, 7), 1.0f, false, c, 1, IgemmIsa::kRef),
      Error);
  EXPECT_THROW(
      igemm(1, 1, 1, codes_u8(u, 1, 256), codes_s8(s, 1, 7), 1.0f, false, c, 1, IgemmIsa::kRef),
      Error);
  EXPECT_THROW(
      igemm(1, 1, 1, codes_u8(u, 1, 255), codes_u8(u, 1, 200), 1.0f, false, c, 1, IgemmIsa::kRef),
      Error);
  EXPECT_THROW(
      igemm(-1, 1, 1, codes_s8(s, 1, 7), codes_s8(s, 1, 7), 1.0f, false, c, 1, IgemmIsa::kRef),
      Error);
  EXPECT_THROW(
      igemm(1, 1, 1, codes_s8(nullptr, 1, 7), codes_s8(s, 1, 7), 1.0f, false, c, 1, IgemmIsa::kRef),
      Error);
  for (IgemmIsa isa : kIgemmIsas)
    if (!igemm_isa_available(isa)) {
      try {
        igemm(1, 1, 1, codes_s8(s, 1, 7), codes_s8(s, 1, 7), 1.0f, false, c, 1, isa);
        ADD_FAILURE() << igemm_isa_name(isa) << " ran on a CPU without it";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(igemm_isa_name(isa)), std::string::npos) << e.what();
      }
    }
  EXPECT_TRUE(igemm_isa_available(IgemmIsa::kRef));
  EXPECT_TRUE(igemm_isa_available(igemm_best_isa()));
}

// ---- pre-packed operands ------------------------------------------------------------------------

// Every micro-kernel table that can run here: the present ISAs' own, and the scalar models of the
// VNNI and AMX layouts (their intrinsics need the CPU; the layouts and the driver run anywhere).
std::vector<std::pair<std::string, const detail::IgemmKernels*>> packed_tables() {
  static const detail::IgemmKernels vnni_model = {8, 32, 1, false, scalar_micro<8, 32, false, 1>};
  static const detail::IgemmKernels amx_model = {16, 16, 16, true, scalar_micro<16, 16, true, 16>};
  std::vector<std::pair<std::string, const detail::IgemmKernels*>> v = {{"vnni model", &vnni_model},
                                                                        {"amx model", &amx_model}};
  const std::pair<IgemmIsa, const detail::IgemmKernels*> real[] = {
      {IgemmIsa::kAvx2, &detail::kIgemmAvx2},
      {IgemmIsa::kAvx512Vnni, &detail::kIgemmAvx512Vnni},
      {IgemmIsa::kAmx, &detail::kIgemmAmx}};
  for (const auto& [isa, kn] : real)
    if (igemm_isa_available(isa))
      v.emplace_back(igemm_isa_name(isa), kn);
    else
      std::printf("[  SKIP    ] packed igemm on %s: not present on this CPU / kernel\n",
                  igemm_isa_name(isa));
  return v;
}

// A packed once and reused, B packed: igemm_packed equals the reference bit for bit (overwrite and
// accumulate), for the three GEMMs' operand kinds at every b and edge shape.
TEST(IgemmPacked, MatchesReferenceBitForBit) {
  uint64_t seed = 7000;
  for (const auto& [name, kn] : packed_tables())
    for (int bits = 2; bits <= 8; ++bits)
      for (const auto& [m, n, k] : kEdgeShapes)
        for (int kind = 0; kind < 3; ++kind) {
          // weights x activations (forward), weights x gradients (backward-data), activations x
          // gradients (backward-weight; A unsigned, no offset)
          const int qa = (1 << bits) - 1, qs = (1 << (bits - 1)) - 1;
          const bool a_unsigned = kind == 2, b_unsigned = kind == 0 && qa <= 127;
          const Codes a =
              make_codes(m, k + 2, a_unsigned ? qa : qs, a_unsigned,
                         a_unsigned ? CodeType::kU8 : CodeType::kS8, Trans::kNo, ++seed);
          const Codes b =
              make_codes(n, k, b_unsigned ? qa : qs, b_unsigned,
                         b_unsigned ? CodeType::kU8 : CodeType::kS8, Trans::kYes, ++seed);
          IgemmPackedA pa;
          IgemmPackedB pb;
          detail::pack_a(*kn, m, k, a.view, &pa);
          detail::pack_b(*kn, k, n, b.view, &pb);
          for (bool acc : {false, true}) {
            std::vector<float> ref(static_cast<size_t>(m * (n + 1)), 1.5f), c(ref);
            igemm_ref(m, n, k, a.view, b.view, 0.375f, acc, ref.data(), n + 1);
            detail::igemm_packed_run(pa, pb, 0.375f, acc, c.data(), n + 1);
            ASSERT_EQ(std::memcmp(c.data(), ref.data(), c.size() * sizeof(float)), 0)
                << name << " bits " << bits << " kind " << kind << " m=" << m << " n=" << n
                << " k=" << k << " acc " << acc;
          }
        }
}

// The column matrix of a convolution by plain loops (ConvColumns' definition), as bytes.
std::vector<uint8_t> im2col_bytes(const ConvColumns& geo, const std::vector<uint8_t>& images,
                                  int64_t s0, int64_t g) {
  const int k = geo.kernel;
  const int64_t rows = geo.rows(), cols = geo.cols(g), hw = geo.ho * geo.wo;
  std::vector<uint8_t> col(static_cast<size_t>(rows * cols));
  for (int64_t c = 0; c < geo.channels; ++c)
    for (int ky = 0; ky < k; ++ky)
      for (int kx = 0; kx < k; ++kx)
        for (int64_t s = 0; s < g; ++s)
          for (int64_t oy = 0; oy < geo.ho; ++oy)
            for (int64_t ox = 0; ox < geo.wo; ++ox) {
              const int64_t iy = oy * geo.stride - geo.pad + ky,
                            ix = ox * geo.stride - geo.pad + kx;
              const bool in = iy >= 0 && iy < geo.h && ix >= 0 && ix < geo.w;
              col[static_cast<size_t>(((c * k + ky) * k + kx) * cols + s * hw + oy * geo.wo + ox)] =
                  in ? images[static_cast<size_t>(((s0 + s) * geo.channels + c) * geo.h * geo.w +
                                                  iy * geo.w + ix)]
                     : 0;
            }
  return col;
}

// im2col straight into panels (and into its transpose's panels) writes exactly the bytes pack()
// writes from the column matrix, and the products through them equal the reference: odd channel
// counts, 1x1 and 3x3 kernels, stride 1 and 2, pads 0..2, samples s0.. of a batch, groups 1..3,
// unsigned and signed codes for b = 2..7 (8-bit unsigned codes do not fit int8: refused).
TEST(IgemmPacked, ConvColumnsAreThePackedIm2col) {
  struct Geo {
    int64_t c, h, w;
    int k, stride, pad;
  };
  const Geo geos[] = {{1, 5, 7, 3, 1, 1}, {3, 4, 4, 3, 1, 1}, {5, 7, 7, 3, 2, 1},
                      {2, 6, 5, 1, 2, 0}, {7, 3, 3, 3, 1, 2}, {1, 1, 1, 3, 1, 1},
                      {4, 8, 8, 1, 1, 0}, {3, 9, 9, 3, 1, 0}};
  uint64_t seed = 9000;
  for (const auto& [name, kn] : packed_tables())
    for (const Geo& gg : geos)
      for (int bits = 2; bits <= 7; ++bits)
        for (bool is_unsigned : {true, false})
          for (int64_t g = 1; g <= 3; ++g) {
            ConvColumns geo{gg.c, gg.h, gg.w, gg.k, gg.stride, gg.pad, 0, 0};
            geo.ho = (gg.h + 2 * gg.pad - gg.k) / gg.stride + 1;
            geo.wo = (gg.w + 2 * gg.pad - gg.k) / gg.stride + 1;
            const int q = is_unsigned ? (1 << bits) - 1 : (1 << (bits - 1)) - 1;
            const int64_t s0 = 1, n = s0 + g + 1;
            const Codes x =
                make_codes(n, gg.c * gg.h * gg.w, q, is_unsigned,
                           is_unsigned ? CodeType::kU8 : CodeType::kS8, Trans::kNo, ++seed);
            std::vector<uint8_t> images(static_cast<size_t>(n * gg.c * gg.h * gg.w));
            std::memcpy(images.data(),
                        is_unsigned ? static_cast<const void*>(x.u8.data())
                                    : static_cast<const void*>(x.s8.data()),
                        images.size());
            const std::vector<uint8_t> col = im2col_bytes(geo, images, s0, g);
            const int64_t rows = geo.rows(), cols = geo.cols(g);
            const CodeMatrix cm =
                is_unsigned ? codes_u8(col.data(), cols, q)
                            : codes_s8(reinterpret_cast<const int8_t*>(col.data()), cols, q);
            CodeMatrix cmt = cm;
            cmt.trans = Trans::kYes;
            IgemmPackedB want, want_t, got, got_t;
            detail::pack_b(*kn, rows, cols, cm, &want);
            detail::pack_b(*kn, cols, rows, cmt, &want_t);
            detail::pack_conv(*kn, geo, images.data(), is_unsigned, q, s0, g, &got, &got_t);
            const std::string where =
                name + " c=" + std::to_string(gg.c) + " " + std::to_string(gg.h) + "x" +
                std::to_string(gg.w) + " k=" + std::to_string(gg.k) +
                " s=" + std::to_string(gg.stride) + " p=" + std::to_string(gg.pad) +
                " g=" + std::to_string(g) + " bits " + std::to_string(bits);
            ASSERT_EQ(got.data, want.data) << where;
            ASSERT_EQ(got_t.data, want_t.data) << where << " (transposed)";
            ASSERT_EQ(got.kq_pad, want.kq_pad) << where;
            ASSERT_EQ(got_t.kq_pad, want_t.kq_pad) << where;
            // Only the transposed layout, alone.
            IgemmPackedB only_t;
            detail::pack_conv(*kn, geo, images.data(), is_unsigned, q, s0, g, nullptr, &only_t);
            ASSERT_EQ(only_t.data, want_t.data) << where << " (transposed alone)";
            // The forward product W (5 x rows) x col through the packed columns.
            const Codes w = make_codes(5, rows, 7, false, CodeType::kS8, Trans::kNo, ++seed);
            IgemmPackedA pw;
            detail::pack_a(*kn, 5, rows, w.view, &pw);
            std::vector<float> ref(static_cast<size_t>(5 * cols)), c(ref.size());
            igemm_ref(5, cols, rows, w.view, cm, 0.5f, false, ref.data(), cols);
            detail::igemm_packed_run(pw, got, 0.5f, false, c.data(), cols);
            ASSERT_EQ(std::memcmp(c.data(), ref.data(), c.size() * sizeof(float)), 0) << where;
          }
  // Codes that do not fit int8, and mismatched operands, are refused.
  const ConvColumns geo{1, 2, 2, 1, 1, 0, 2, 2};
  std::vector<uint8_t> images(4, 200);
  IgemmPackedB b;
  EXPECT_THROW(
      detail::pack_conv(detail::kIgemmAvx2, geo, images.data(), true, 255, 0, 1, &b, nullptr),
      Error);
  IgemmPackedA a;
  std::vector<int8_t> w(6, 1);
  detail::pack_a(detail::kIgemmAvx2, 2, 3, codes_s8(w.data(), 3, 1), &a);
  detail::pack_b(detail::kIgemmAvx2, 2, 3, codes_s8(w.data(), 3, 1), &b);
  std::vector<float> c(6);
  EXPECT_THROW(detail::igemm_packed_run(a, b, 1.0f, false, c.data(), 3), Error);  // k 3 vs 2
  EXPECT_THROW(IgemmPackedA().pack(IgemmIsa::kRef, 2, 3, codes_s8(w.data(), 3, 1)), Error);
}

}  // namespace
}  // namespace int4ddp::math
