// The integer 3x3 convolution (see iconv3x3.h): weight packing, the padded channel-group layout,
// the driver shared by every instruction set (iconv3x3_kernels.h), the AVX2 tiles, the run-time
// choice and the plain reference. The AVX2 functions carry their own target attributes (as
// igemm_avx2.cpp), so the file compiles without ISA flags; the layout helpers are AVX2 too (every
// CPU with one of the kernels has AVX2) and run only after iconv3x3_supports() said yes. The
// AVX512-VNNI tiles live in iconv3x3_avx512vnni.cpp.
#include "kernels/math/iconv3x3.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/common/error.h"
#include "kernels/math/iconv3x3_kernels.h"
#include "kernels/math/igemm_kernels.h"
#include "kernels/quant/codec.h"

namespace int4ddp::math {
namespace {

using detail::Iconv3x3Kernels;
using detail::kWeightGroup;
using detail::kWeightRows;

constexpr int kMr = 4;  // AVX2: output channels (forward) or (channel, tap) rows (wgrad) per tile
constexpr int kNv = 2;  // ymm vectors of 8 positions (forward) or 4 x 4 bytes (wgrad) per tile
constexpr int kNr = 8 * kNv;
constexpr int64_t kInt32Max = 2147483647;
constexpr int kInt16Max = 32767;
constexpr int kTaps = 9;

// The largest input byte (with the offset) and its int16 pair bound; see the guard in iconv3x3.h.
int input_byte_max(int qmax, bool is_signed) { return is_signed ? 2 * qmax : qmax; }

// The geometry of one sample's padded channel-group layout for tiles of nr positions.
struct Layout {
  int64_t h, w, row;  // row = w + 1
  int64_t outputs;    // h * row flat output positions (x == w are junk, never stored)
  int64_t tiles;      // ceil(outputs / nr)
  int64_t plane;      // 4-byte pixels per channel-group plane: covers the last tile's taps
};

Layout make_layout(int64_t h, int64_t w, int64_t nr) {
  Layout l;
  l.h = h;
  l.w = w;
  l.row = w + 1;
  l.outputs = h * l.row;
  l.tiles = (l.outputs + nr - 1) / nr;
  l.plane = l.tiles * nr + 2 * l.row + 2;
  return l;
}

// One group of 4 channels' rows of `n` pixels (c_rows[q] at pixel x) -> 4-byte pixels at dst
// (+offset on every byte). 16 and 8 pixels at a time (the last chunk overlapping the previous
// one), the rest (n < 8) one by one.
__attribute__((target("avx2"))) void interleave4(const uint8_t* const c_rows[4], int64_t n,
                                                 uint8_t off, uint8_t* dst) {
  const __m128i o = _mm_set1_epi8(static_cast<char>(off));
  auto ld16 = [&](int q, int64_t x) {
    return _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c_rows[q] + x)), o);
  };
  auto ld8 = [&](int q, int64_t x) {
    return _mm_add_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c_rows[q] + x)), o);
  };
  if (n >= 16) {
    for (int64_t x0 = 0; x0 < n; x0 += 16) {
      const int64_t x = std::min(x0, n - 16);
      detail::interleave_4x16(ld16(0, x), ld16(1, x), ld16(2, x), ld16(3, x), dst + x * 4);
    }
  } else if (n >= 8) {
    for (int64_t x0 = 0; x0 < n; x0 += 8) {
      const int64_t x = std::min(x0, n - 8);
      const __m128i t0 = _mm_unpacklo_epi8(ld8(0, x), ld8(1, x));
      const __m128i t2 = _mm_unpacklo_epi8(ld8(2, x), ld8(3, x));
      __m128i* d = reinterpret_cast<__m128i*>(dst + x * 4);
      _mm_storeu_si128(d, _mm_unpacklo_epi16(t0, t2));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(t0, t2));
    }
  } else {
    for (int64_t x = 0; x < n; ++x)
      for (int q = 0; q < 4; ++q) dst[x * 4 + q] = static_cast<uint8_t>(c_rows[q][x] + off);
  }
}

// xb (c4 planes of l.plane 4-byte pixels) <- in (cin, h, w) bytes, +off on every byte; the pads
// (and the channels past cin) hold off.
void pad_input(const uint8_t* in, int64_t cin, int64_t c4, const Layout& l, uint8_t off,
               uint8_t* xb) {
  std::memset(xb, off, static_cast<size_t>(c4 * l.plane * 4));
  const int64_t hw = l.h * l.w;
  for (int64_t g = 0; g < c4; ++g) {
    uint8_t* plane = xb + g * l.plane * 4;
    const int64_t nc = std::min<int64_t>(4, cin - 4 * g);
    for (int64_t y = 0; y < l.h; ++y) {
      uint8_t* dst = plane + ((y + 1) * l.row + 1) * 4;
      if (nc == 4) {
        const uint8_t* rows[4];
        for (int q = 0; q < 4; ++q) rows[q] = in + (4 * g + q) * hw + y * l.w;
        interleave4(rows, l.w, off, dst);
      } else {
        for (int64_t q = 0; q < nc; ++q) {
          const uint8_t* r = in + (4 * g + q) * hw + y * l.w;
          for (int64_t x = 0; x < l.w; ++x) dst[x * 4 + q] = static_cast<uint8_t>(r[x] + off);
        }
      }
    }
  }
}

// vpmaddubsw's unsigned operand U and signed operand S (AT&T order: S, U, destination), the
// int16 products summed into H.
#define ICONV_MADD(U, S, H) \
  "vpmaddubsw %[" S "], %[" U "], %[t]\n\tvpaddw %[t], %[" H "], %[" H "]\n\t"
// One row of a group step: 4 bytes at P broadcast into a, times both loaded vectors b0 and b1.
#define ICONV_ROW_BU(P, H0, H1) \
  "vpbroadcastd (%[" P "]), %[a]\n\t" ICONV_MADD("a", "b0", H0) ICONV_MADD("a", "b1", H1)
#define ICONV_ROW_BS(P, H0, H1) \
  "vpbroadcastd (%[" P "]), %[a]\n\t" ICONV_MADD("b0", "a", H0) ICONV_MADD("b1", "a", H1)

// The 4 x 16 int32 sums of one tile: for each of `groups` groups of 4 k, ptrs(g, &b, p) names 64
// loaded bytes b (16 lanes x 4 k) and 4 broadcast rows p[r] (4 bytes each); tile[r][j] = sum over
// the groups of the 4 products of row r's bytes and lane j's. kBroadcastUnsigned: the broadcast
// bytes are vpmaddubsw's unsigned operand (else the loaded ones are). The int16 pair sums are
// summed over at most i16 groups (the caller's guard), then widened into int32.
// The group step is inline assembly with the 8 int16 accumulators in registers: compiled from
// intrinsics, GCC kept the int32 sums in registers instead and spilled an int16 accumulator,
// putting a store-to-load round trip on every group's dependency chain.
template <bool kBroadcastUnsigned, typename Pointers>
__attribute__((target("avx2"))) inline void sum_tile(int64_t groups, int64_t i16, Pointers ptrs,
                                                     int32_t* tile) {
  static_assert(kMr == 4 && kNv == 2, "sum_tile() is written out for 4 x 16");
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
          c30 = c00, c31 = c00;
  for (int64_t g0 = 0; g0 < groups; g0 += i16) {
    const int64_t g1 = std::min(groups, g0 + i16);
    __m256i h00 = _mm256_setzero_si256(), h01 = h00, h10 = h00, h11 = h00, h20 = h00, h21 = h00,
            h30 = h00, h31 = h00;
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* x;
      const void* p[4];
      ptrs(g, &x, p);
      __m256i b0, b1, a, t;
#define ICONV_STEP(ROW)                                                                      \
  asm("vmovdqu (%[x]), %[b0]\n\tvmovdqu 32(%[x]), %[b1]\n\t" ROW("p0", "h00", "h01")         \
          ROW("p1", "h10", "h11") ROW("p2", "h20", "h21") ROW("p3", "h30", "h31")            \
      : [h00] "+x"(h00), [h01] "+x"(h01), [h10] "+x"(h10), [h11] "+x"(h11), [h20] "+x"(h20), \
        [h21] "+x"(h21), [h30] "+x"(h30), [h31] "+x"(h31), [b0] "=&x"(b0), [b1] "=&x"(b1),   \
        [a] "=&x"(a), [t] "=&x"(t)                                                           \
      : [x] "r"(x), [p0] "r"(p[0]), [p1] "r"(p[1]), [p2] "r"(p[2]), [p3] "r"(p[3])           \
      : "memory")
      if constexpr (kBroadcastUnsigned)
        ICONV_STEP(ICONV_ROW_BU);
      else
        ICONV_STEP(ICONV_ROW_BS);
#undef ICONV_STEP
    }
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(h00, ones));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(h01, ones));
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(h10, ones));
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(h11, ones));
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(h20, ones));
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(h21, ones));
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(h30, ones));
    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(h31, ones));
  }
  const __m256i c[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
  for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + 8 * i), c[i]);
}

// One forward tile (iconv3x3_kernels.h): kMr output channels x kNr flat positions.
// res[r][j] = scale * float(T - corr[r]).
__attribute__((target("avx2"))) void tile(const uint8_t* xp, const int64_t* goff, const int8_t* wp,
                                          int64_t groups, int64_t i16, const int32_t* corr,
                                          float scale, float* res) {
  alignas(32) int32_t t[kMr * kNr];
  sum_tile<false>(
      groups, i16,
      [&](int64_t g, const uint8_t** x, const void** p) {
        *x = xp + goff[g];
        const int8_t* wg = wp + g * kWeightGroup;
        for (int r = 0; r < kMr; ++r) p[r] = wg + 4 * r;
      },
      t);
  const __m256 sc = _mm256_set1_ps(scale);
  for (int r = 0; r < kMr; ++r) {
    const __m256i c = _mm256_set1_epi32(corr[r]);
    for (int v = 0; v < kNv; ++v) {
      const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + r * kNr + 8 * v));
      _mm256_storeu_ps(res + r * kNr + 8 * v,
                       _mm256_mul_ps(sc, _mm256_cvtepi32_ps(_mm256_sub_epi32(x, c))));
    }
  }
}

// dy's [position group][channel][4] copy (see iconv3x3_wgrad): the 32-bit words of dy's flat
// planes (o16 planes of `words` words, zero past the data; o16 and words multiples of 4)
// transposed, 4 x 4 words at a time.
__attribute__((target("avx2"))) void transpose_words(const uint8_t* planes, int64_t o16,
                                                     int64_t words, uint8_t* out) {
  for (int64_t o = 0; o < o16; o += 4)
    for (int64_t g = 0; g < words; g += 4) {
      const uint8_t* r = planes + o * words * 4 + g * 4;
      __m128 x0 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
      __m128 x1 =
          _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + words * 4)));
      __m128 x2 =
          _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * words * 4)));
      __m128 x3 =
          _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * words * 4)));
      _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
      const __m128 t[4] = {x0, x1, x2, x3};
      for (int q = 0; q < 4; ++q)
        _mm_storeu_ps(reinterpret_cast<float*>(out + ((g + q) * o16 + o) * 4), t[q]);
    }
}

// One backward-weight tile (iconv3x3_kernels.h): kMr (channel, tap) rows x kNr output channels.
__attribute__((target("avx2"))) void wgrad_tile(const uint8_t* xb, const int64_t* roff,
                                                const uint8_t* db, int64_t ostride, int64_t groups,
                                                int64_t i16, int32_t* t) {
  sum_tile<true>(
      groups, i16,
      [&](int64_t g, const uint8_t** x, const void** p) {
        *x = db + g * ostride * 4;
        for (int r = 0; r < kMr; ++r) p[r] = xb + roff[r] + 4 * g;
      },
      t);
}

// Packs weights given as weight(o, c, tap) for a convolution from cin to cout channels.
template <typename F>
void pack_weights(Iconv3x3Weights* wt, int64_t cout, int64_t cin, int qw, F weight) {
  INT4DDP_CHECK(cout > 0 && cin > 0, "iconv3x3: bad weight shape (", cout, ", ", cin, ", 3, 3)");
  INT4DDP_CHECK(qw >= 1 && qw <= 127, "iconv3x3: weight qmax ", qw, " is outside 1..127");
  wt->cout = cout;
  wt->cin = cin;
  wt->c4 = (cin + 3) / 4;
  wt->qw = qw;
  const int64_t groups = wt->c4 * kTaps, blocks = (cout + kWeightRows - 1) / kWeightRows;
  wt->data.assign(static_cast<size_t>(blocks * groups * kWeightGroup), 0);
  wt->rowsum.assign(static_cast<size_t>(blocks * kWeightRows), 0);
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t c = 0; c < cin; ++c)
      for (int tap = 0; tap < kTaps; ++tap) {
        const int8_t v = weight(o, c, tap);
        const int64_t g = (c / 4) * kTaps + tap;
        wt->data[static_cast<size_t>((o / kWeightRows * groups + g) * kWeightGroup +
                                     o % kWeightRows * 4 + c % 4)] = v;
        wt->rowsum[static_cast<size_t>(o)] += v;
      }
}

// The table of an available instruction set (kAuto resolved), or null.
const Iconv3x3Kernels* kernels_for(Iconv3x3Isa isa) {
  switch (iconv3x3_resolve(isa)) {
    case Iconv3x3Isa::kAvx2:
      return iconv3x3_isa_available(Iconv3x3Isa::kAvx2) ? &detail::kIconv3x3Avx2 : nullptr;
    case Iconv3x3Isa::kAvx512Vnni:
      return iconv3x3_isa_available(Iconv3x3Isa::kAvx512Vnni) ? &detail::kIconv3x3Avx512Vnni
                                                              : nullptr;
    case Iconv3x3Isa::kAuto:
      break;
  }
  return nullptr;
}

// Code i of a plain (c, h, w) code tensor, unsigned or signed bytes: the references' reader.
int64_t code_at(const void* in, bool is_signed, int64_t i) {
  return is_signed ? static_cast<const int8_t*>(in)[i] : static_cast<const uint8_t*>(in)[i];
}

}  // namespace

void Iconv3x3Weights::pack(const int8_t* w, int64_t n_out, int64_t n_in, int q) {
  pack_weights(this, n_out, n_in, q,
               [&](int64_t o, int64_t c, int tap) { return w[(o * n_in + c) * kTaps + tap]; });
}

void Iconv3x3Weights::pack_transposed(const int8_t* w, int64_t n_out, int64_t n_in, int q) {
  // Output channel c, input channel o of the transposed convolution: W[o][c] with the taps flipped.
  pack_weights(this, n_in, n_out, q, [&](int64_t c, int64_t o, int tap) {
    return w[(o * n_in + c) * kTaps + (kTaps - 1 - tap)];
  });
}

namespace detail {

const Iconv3x3Kernels kIconv3x3Avx2 = {true, kMr, kNr, kMr, kNr, tile, wgrad_tile};

bool iconv3x3_fits(const Iconv3x3Kernels& kn, const Iconv3x3Weights& wt, int qmax, bool is_signed) {
  if (wt.cout <= 0 || wt.qw < 1 || qmax < 1 || qmax > (is_signed ? 127 : 255)) return false;
  const int64_t qu = input_byte_max(qmax, is_signed);
  return (!kn.int16_pairs || 2 * qu * wt.qw <= kInt16Max) &&
         kTaps * wt.c4 * 4 * qu * wt.qw <= kInt32Max;
}

bool iconv3x3_wgrad_fits(const Iconv3x3Kernels& kn, int64_t h, int64_t w, int qmax, bool is_signed,
                         int qdy) {
  if (h <= 0 || w <= 0 || qdy < 1 || qdy > 127 || qmax < 1 || qmax > (is_signed ? 127 : 255))
    return false;
  const int64_t qu = input_byte_max(qmax, is_signed), k = ((h + 1) * (w + 1) + 3) / 4 * 4;
  return (!kn.int16_pairs || 2 * qu * qdy <= kInt16Max) && k * qu * qdy <= kInt32Max;
}

void iconv3x3_with(const Iconv3x3Kernels& kn, const Iconv3x3Weights& wt, int64_t h, int64_t w,
                   const void* in, bool is_signed, int qmax, float scale, float* out, int64_t ldo) {
  INT4DDP_CHECK(iconv3x3_fits(kn, wt, qmax, is_signed),
                "iconv3x3: ", is_signed ? "signed" : "unsigned", " input qmax ", qmax,
                ", weight qmax ", wt.qw, ", ", wt.cin,
                " input channels overflow the kernel's sums");
  INT4DDP_CHECK(h > 0 && w > 0 && in && out && ldo >= h * w, "iconv3x3: bad image ", h, " x ", w,
                " or output stride ", ldo);
  const int64_t mr = kn.mr, nr = kn.nr;
  INT4DDP_CHECK(mr > 0 && kWeightRows % mr == 0 && nr > 0, "iconv3x3: bad tile ", mr, " x ", nr);
  const Layout l = make_layout(h, w, nr);
  const int off = is_signed ? qmax : 0;
  const int64_t qu = input_byte_max(qmax, is_signed), groups = wt.c4 * kTaps;
  const int64_t i16 = kn.int16_pairs ? kInt16Max / (2 * qu * wt.qw) : groups;
  thread_local std::vector<uint8_t> xb;
  thread_local std::vector<float> ob, res;
  thread_local std::vector<int64_t> goff;
  const int64_t ob_stride = l.tiles * nr;
  xb.resize(static_cast<size_t>(wt.c4 * l.plane * 4));
  ob.resize(static_cast<size_t>(mr * ob_stride));
  res.resize(static_cast<size_t>(mr * nr));
  goff.resize(static_cast<size_t>(groups));
  pad_input(static_cast<const uint8_t*>(in), wt.cin, wt.c4, l, static_cast<uint8_t>(off),
            xb.data());
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t tap = g % kTaps;
    goff[static_cast<size_t>(g)] = (g / kTaps * l.plane + tap / 3 * l.row + tap % 3) * 4;
  }
  for (int64_t o0 = 0; o0 < wt.cout; o0 += mr) {
    // Tile rows o0..o0+mr-1 lie in one packed block (mr divides kWeightRows).
    const int8_t* wp =
        wt.data.data() + o0 / kWeightRows * groups * kWeightGroup + o0 % kWeightRows * 4;
    int32_t corr[kWeightRows];
    for (int64_t r = 0; r < mr; ++r) corr[r] = off * wt.rowsum[static_cast<size_t>(o0 + r)];
    for (int64_t t = 0; t < l.tiles; ++t) {
      kn.tile(xb.data() + t * nr * 4, goff.data(), wp, groups, i16, corr, scale, res.data());
      for (int64_t r = 0; r < mr; ++r)
        std::memcpy(ob.data() + r * ob_stride + t * nr, res.data() + r * nr,
                    sizeof(float) * static_cast<size_t>(nr));
    }
    // The flat positions (row stride w + 1) -> the image rows (stride w), junk column dropped.
    const int64_t nrows = std::min<int64_t>(mr, wt.cout - o0);
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t y = 0; y < h; ++y)
        std::memcpy(out + (o0 + r) * ldo + y * w, ob.data() + r * ob_stride + y * l.row,
                    sizeof(float) * static_cast<size_t>(w));
  }
}

}  // namespace detail

const char* iconv3x3_isa_name(Iconv3x3Isa isa) {
  switch (isa) {
    case Iconv3x3Isa::kAuto:
      return "auto";
    case Iconv3x3Isa::kAvx2:
      return "avx2";
    case Iconv3x3Isa::kAvx512Vnni:
      return "avx512vnni";
  }
  return "?";
}

bool iconv3x3_isa_available(Iconv3x3Isa isa) {
  switch (isa) {
    case Iconv3x3Isa::kAuto:
      return iconv3x3_resolve(isa) != Iconv3x3Isa::kAuto;
    case Iconv3x3Isa::kAvx2:
      return quant::isa_allows(quant::Isa::kAvx2) && __builtin_cpu_supports("avx2");
    case Iconv3x3Isa::kAvx512Vnni:
      // The layout helpers are AVX2; the tiles need AVX-512F and AVX512-VNNI.
      return quant::isa_allows(quant::Isa::kAvx512) && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

Iconv3x3Isa iconv3x3_resolve(Iconv3x3Isa isa) {
  if (isa != Iconv3x3Isa::kAuto) return isa;
  for (Iconv3x3Isa i : {Iconv3x3Isa::kAvx512Vnni, Iconv3x3Isa::kAvx2})
    if (iconv3x3_isa_available(i)) return i;
  return Iconv3x3Isa::kAuto;
}

bool iconv3x3_supports(const Iconv3x3Weights& wt, int qmax, bool is_signed, Iconv3x3Isa isa) {
  const Iconv3x3Kernels* kn = kernels_for(isa);
  return kn && detail::iconv3x3_fits(*kn, wt, qmax, is_signed);
}

void iconv3x3(const Iconv3x3Weights& wt, int64_t h, int64_t w, const void* in, bool is_signed,
              int qmax, float scale, float* out, int64_t ldo, Iconv3x3Isa isa) {
  const Iconv3x3Kernels* kn = kernels_for(isa);
  INT4DDP_CHECK(kn, "iconv3x3: instruction set ", iconv3x3_isa_name(isa),
                " is not available on this CPU or under INT4DDP_ISA");
  detail::iconv3x3_with(*kn, wt, h, w, in, is_signed, qmax, scale, out, ldo);
}

bool iconv3x3_wgrad_supports(int64_t h, int64_t w, int qmax, bool is_signed, int qdy,
                             Iconv3x3Isa isa) {
  const Iconv3x3Kernels* kn = kernels_for(isa);
  return kn && detail::iconv3x3_wgrad_fits(*kn, h, w, qmax, is_signed, qdy);
}

void Iconv3x3WgradSum::reset(int64_t cin, int64_t cout) {
  INT4DDP_CHECK(cin > 0 && cout > 0, "iconv3x3_wgrad: bad shape (cin ", cin, ", cout ", cout, ")");
  cin_ = cin;
  cout_ = cout;
  sum_.assign(static_cast<size_t>(cin * kTaps * cout), 0);
}

void Iconv3x3WgradSum::add(int64_t h, int64_t w, int64_t n, const void* in, bool is_signed,
                           int qmax, const int8_t* dy, int qdy, Iconv3x3Isa isa) {
  const Iconv3x3Kernels* kn = kernels_for(isa);
  INT4DDP_CHECK(kn, "iconv3x3_wgrad: instruction set ", iconv3x3_isa_name(isa),
                " is not available on this CPU or under INT4DDP_ISA");
  add_with(*kn, h, w, n, in, is_signed, qmax, dy, qdy);
}

void Iconv3x3WgradSum::add_with(const Iconv3x3Kernels& kn, int64_t h, int64_t w, int64_t n,
                                const void* in, bool is_signed, int qmax, const int8_t* dy,
                                int qdy) {
  INT4DDP_CHECK(detail::iconv3x3_wgrad_fits(kn, h, w, qmax, is_signed, qdy),
                "iconv3x3_wgrad: image ", h, " x ", w, ", ", is_signed ? "signed" : "unsigned",
                " input qmax ", qmax, ", dy qmax ", qdy, " overflow the kernel's sums");
  INT4DDP_CHECK(cin_ > 0 && n >= 0 && (n == 0 || (in && dy)),
                "iconv3x3_wgrad: no reset, or bad samples (n ", n, ")");
  // Samples are stacked along K: sample s's padded plane starts at row s * (h + 1), its bottom
  // pad row being the next one's top, and its outputs at flat positions s * span + y * row + x
  // (span = (h + 1) * row; the junk column and the shared pad row have dy 0).
  const int64_t cin = cin_, cout = cout_, mr = kn.wg_mr, nr = kn.wg_nr, rows = cin * kTaps;
  const int64_t rows_pad = (rows + mr - 1) / mr * mr, opad = (cout + nr - 1) / nr * nr;
  const int64_t row = w + 1, span = (h + 1) * row, hw = h * w;
  const int off = is_signed ? qmax : 0;
  const int64_t qq = input_byte_max(qmax, is_signed) * qdy;
  const int64_t i16 = kn.int16_pairs ? kInt16Max / (2 * qq) : kInt32Max;
  // Samples per pass: the int32 guard, and a working set (input planes, dy and its copy) of
  // about 256 KiB, so that the tiles' passes over K stay in L2.
  const int64_t per_sample_bytes = span * (cin + 2 * opad);
  const int64_t per_pass = std::clamp<int64_t>(
      std::min((kInt32Max / qq - 3) / span, (int64_t{1} << 18) / per_sample_bytes), 1,
      std::max<int64_t>(n, 1));
  thread_local std::vector<uint8_t> xb, planes, db;
  thread_local std::vector<int64_t> roff, dysum;
  thread_local std::vector<int32_t> t;
  t.resize(static_cast<size_t>(mr * nr));
  const auto* xin = static_cast<const uint8_t*>(in);
  for (int64_t s0 = 0; s0 < n; s0 += per_pass) {
    // Groups of 4 positions, an even count (the tables' contract; the padding has dy 0).
    const int64_t m = std::min(per_pass, n - s0), groups = (m * span + 7) / 8 * 2;
    const int64_t words = (groups + 3) / 4 * 4;   // dy plane words, a multiple of the transpose's 4
    const int64_t px = 4 * groups + 2 * row + 4;  // bytes per input plane: the taps' reach
    xb.resize(static_cast<size_t>(cin * px));
    planes.assign(static_cast<size_t>(opad * words * 4), 0);
    db.resize(static_cast<size_t>(words * opad * 4));
    roff.resize(static_cast<size_t>(rows_pad));
    dysum.assign(static_cast<size_t>(cout), 0);
    for (int64_t r = 0; r < rows_pad; ++r) {  // rows past cin * 9 read row 0 (their sums unused)
      const int64_t c = r < rows ? r / kTaps : 0, tap = r < rows ? r % kTaps : 0;
      roff[static_cast<size_t>(r)] = c * px + tap / 3 * row + tap % 3;
    }
    std::memset(xb.data(), off, xb.size());
    for (int64_t s = 0; s < m; ++s) {
      const uint8_t* xs = xin + (s0 + s) * cin * hw;
      const int8_t* ds = dy + (s0 + s) * cout * hw;
      for (int64_t c = 0; c < cin; ++c)
        for (int64_t y = 0; y < h; ++y) {
          uint8_t* d = xb.data() + c * px + (s * (h + 1) + y + 1) * row + 1;
          std::memcpy(d, xs + (c * h + y) * w, static_cast<size_t>(w));
          if (off)
            for (int64_t x = 0; x < w; ++x) d[x] = static_cast<uint8_t>(d[x] + off);
        }
      for (int64_t o = 0; o < cout; ++o) {
        for (int64_t y = 0; y < h; ++y)
          std::memcpy(planes.data() + o * words * 4 + s * span + y * row, ds + (o * h + y) * w,
                      static_cast<size_t>(w));
        if (off) {
          int64_t sum = 0;
          for (int64_t i = 0; i < hw; ++i) sum += ds[o * hw + i];
          dysum[static_cast<size_t>(o)] += sum;
        }
      }
    }
    transpose_words(planes.data(), opad, words, db.data());
    for (int64_t o0 = 0; o0 < cout; o0 += nr) {
      const int64_t no = std::min(nr, cout - o0);
      for (int64_t r0 = 0; r0 < rows; r0 += mr) {
        kn.wgrad_tile(xb.data(), roff.data() + r0, db.data() + o0 * 4, opad, groups, i16, t.data());
        const int64_t nrows = std::min(mr, rows - r0);
        for (int64_t r = 0; r < nrows; ++r) {
          int64_t* acc = sum_.data() + (r0 + r) * cout + o0;
          const int32_t* tr = t.data() + r * nr;
          for (int64_t j = 0; j < no; ++j) acc[j] += tr[j];
        }
      }
    }
    if (off)  // the offset's share: off * (dy sum of output channel o) in every row
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < cout; ++o)
          sum_[static_cast<size_t>(r * cout + o)] -= off * dysum[static_cast<size_t>(o)];
  }
}

void Iconv3x3WgradSum::finish(bool transposed, double* dw) const {
  for (int64_t c = 0; c < cin_; ++c)
    for (int tap = 0; tap < kTaps; ++tap) {
      const int64_t* r = sum_.data() + (c * kTaps + tap) * cout_;
      for (int64_t o = 0; o < cout_; ++o)
        dw[transposed ? (c * cout_ + o) * kTaps + kTaps - 1 - tap : (o * cin_ + c) * kTaps + tap] +=
            static_cast<double>(r[o]);
    }
}

void iconv3x3_wgrad(int64_t cin, int64_t cout, int64_t h, int64_t w, int64_t n, const void* in,
                    bool is_signed, int qmax, const int8_t* dy, int qdy, bool transposed,
                    double* dw, Iconv3x3Isa isa) {
  Iconv3x3WgradSum sum;
  sum.reset(cin, cout);
  sum.add(h, w, n, in, is_signed, qmax, dy, qdy, isa);
  sum.finish(transposed, dw);
}

void iconv3x3_wgrad_ref(int64_t cin, int64_t cout, int64_t h, int64_t w, int64_t n, const void* in,
                        bool is_signed, const int8_t* dy, bool transposed, double* dw) {
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t c = 0; c < cin; ++c)
      for (int tap = 0; tap < kTaps; ++tap) {
        int64_t t = 0;
        for (int64_t s = 0; s < n; ++s)
          for (int64_t y = 0; y < h; ++y)
            for (int64_t x = 0; x < w; ++x) {
              const int64_t iy = y + tap / 3 - 1, ix = x + tap % 3 - 1;
              if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
              const int64_t xv = code_at(in, is_signed, ((s * cin + c) * h + iy) * w + ix);
              t += xv * dy[((s * cout + o) * h + y) * w + x];
            }
        dw[transposed ? (c * cout + o) * kTaps + kTaps - 1 - tap : (o * cin + c) * kTaps + tap] +=
            static_cast<double>(t);
      }
}

void iconv3x3_ref(const int8_t* w, int64_t cout, int64_t cin, int64_t h, int64_t wd, const void* in,
                  bool is_signed, float scale, float* out, int64_t ldo) {
  auto code = [&](int64_t c, int64_t y, int64_t x) -> int64_t {
    if (y < 0 || y >= h || x < 0 || x >= wd) return 0;
    return code_at(in, is_signed, (c * h + y) * wd + x);
  };
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < wd; ++x) {
        int64_t t = 0;
        for (int64_t c = 0; c < cin; ++c)
          for (int tap = 0; tap < kTaps; ++tap)
            t +=
                int64_t{w[(o * cin + c) * kTaps + tap]} * code(c, y + tap / 3 - 1, x + tap % 3 - 1);
        out[o * ldo + y * wd + x] = scale * static_cast<float>(t);
      }
}

}  // namespace int4ddp::math
