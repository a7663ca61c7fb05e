// The integer GEMM driver (see igemm.h): operand roles and offsets, the overflow guard, packing,
// the tile loop over the ISA's micro-kernel, the exact int64 sum over K chunks and the rescale.
#include "kernels/math/igemm.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/common/isa_override.h"
#include "kernels/math/igemm_kernels.h"

namespace int4ddp::math {
namespace {

constexpr int64_t kInt32Max = 2147483647;
constexpr int kInt16Max = 32767;

// A matrix view over stored codes: element (r, c) at data[r * rs + c * cs].
struct View {
  const void* data;
  CodeType type;
  int64_t rs, cs;
};

View op_view(const CodeMatrix& x) {  // op(X)
  return x.trans == Trans::kNo ? View{x.data, x.type, x.ld, 1} : View{x.data, x.type, 1, x.ld};
}
View op_t_view(const CodeMatrix& x) {  // op(X)^T
  return x.trans == Trans::kNo ? View{x.data, x.type, 1, x.ld} : View{x.data, x.type, x.ld, 1};
}

template <typename T>
inline int code_at(const View& v, int64_t r, int64_t c) {
  return static_cast<int>(static_cast<const T*>(v.data)[r * v.rs + c * v.cs]);
}

// Calls f.template operator()<T>() with T the view's element type.
template <typename F>
void with_type(CodeType t, F&& f) {
  switch (t) {
    case CodeType::kS8:
      f(int8_t{});
      return;
    case CodeType::kU8:
      f(uint8_t{});
      return;
    case CodeType::kF32:
      f(float{});
      return;
  }
  INT4DDP_FAIL("igemm: unknown code type ", static_cast<int>(t));
}

void check_operand(const CodeMatrix& x, const char* name) {
  const bool u = x.is_unsigned;
  INT4DDP_CHECK(x.type != CodeType::kS8 || !u, "igemm: operand ", name, " is int8 but unsigned");
  INT4DDP_CHECK(x.type != CodeType::kU8 || u, "igemm: operand ", name, " is uint8 but signed");
  INT4DDP_CHECK(x.qmax >= 1 && x.qmax <= (u ? 255 : 127), "igemm: operand ", name, " qmax ", x.qmax,
                " is outside 1..", u ? 255 : 127, " for ", u ? "unsigned" : "signed", " codes");
}

bool fits_s8(const CodeMatrix& x) { return !x.is_unsigned || x.qmax <= 127; }

// Which operand goes on which side; the product P = U S is rows x cols, C = P or P^T.
struct Plan {
  View u, s;
  bool swapped;  // P = C^T
  int offset;    // added to every u8-side code (its qmax when that operand is signed)
  int qu, qs;    // largest u8-side byte (with the offset) and largest |s8-side code|
  int64_t max_k;
};

Plan make_plan(const CodeMatrix& a, const CodeMatrix& b) {
  check_operand(a, "A");
  check_operand(b, "B");
  Plan p;
  if (fits_s8(b)) {
    p.swapped = false;
    p.u = op_view(a);
    p.s = op_view(b);
  } else {
    INT4DDP_CHECK(fits_s8(a), "igemm: both operands unsigned with codes above 127 (qmax ", a.qmax,
                  " and ", b.qmax, "): one must fit int8");
    p.swapped = true;
    p.u = op_t_view(b);
    p.s = op_t_view(a);
  }
  const CodeMatrix& um = p.swapped ? b : a;
  const CodeMatrix& sm = p.swapped ? a : b;
  p.offset = um.is_unsigned ? 0 : um.qmax;
  p.qu = um.qmax + p.offset;
  p.qs = sm.qmax;
  p.max_k = kInt32Max / (int64_t{p.qu} * p.qs);
  return p;
}

void check_sizes(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
                 const void* c) {
  INT4DDP_CHECK(m >= 0 && n >= 0 && k >= 0, "igemm: negative size m=", m, " n=", n, " k=", k);
  INT4DDP_CHECK((m == 0 || n == 0) || (c && (k == 0 || (a.data && b.data))), "igemm: null operand");
}

const detail::IgemmKernels& kernels_for(IgemmIsa isa) {
  switch (isa) {
    case IgemmIsa::kAvx2:
      return detail::kIgemmAvx2;
    case IgemmIsa::kAvx512Vnni:
      return detail::kIgemmAvx512Vnni;
    case IgemmIsa::kAmx:
      return detail::kIgemmAmx;
    case IgemmIsa::kRef:
      break;
  }
  INT4DDP_FAIL("igemm: no micro-kernel for ", igemm_isa_name(isa));
}

// Packing. Every ISA with a micro-kernel implies AVX2, so the packers use it (function targets);
// contiguous 16-code runs go through SIMD, the rest (edges, strided reads) through scalar loops.

// 16 consecutive codes as int16 lanes.
template <typename T>
__attribute__((target("avx2"))) inline __m256i load16_i16(const T* p) {
  if constexpr (std::is_same_v<T, int8_t>) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same_v<T, uint8_t>) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_loadu_ps(p));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_loadu_ps(p + 8));
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
  }
}
// ... as 16 signed bytes (|code| <= 127), or as 16 unsigned bytes after adding the offset.
template <typename T>
__attribute__((target("avx2"))) inline __m128i load16_s8(const T* p) {
  const __m256i x = load16_i16(p);
  return _mm_packs_epi16(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}
template <typename T>
__attribute__((target("avx2"))) inline __m128i load16_u8(const T* p, int offset) {
  const __m256i x =
      _mm256_add_epi16(load16_i16(p), _mm256_set1_epi16(static_cast<int16_t>(offset)));
  return _mm_packus_epi16(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

// s8 panel of columns [j0, j0 + nj) (see igemm_kernels.h), groups padded to kq_pad.
template <typename T>
__attribute__((target("avx2"))) void pack_s(const View& v, int64_t k, int64_t j0, int64_t nj,
                                            int nr, int64_t kq_pad, int8_t* out) {
  std::memset(out, 0, static_cast<size_t>(kq_pad * nr * 4));
  const T* d = static_cast<const T*>(v.data);
  if (v.cs == 1) {
    const int64_t k4 = k / 4 * 4, j16 = nj / 16 * 16;
    for (int64_t p = 0; p < k4; p += 4) {  // 4 rows x 16 columns -> 16 columns x 4 bytes
      const T* r = d + p * v.rs + j0;
      int8_t* o = out + (p >> 2) * nr * 4;
      for (int64_t j = 0; j < j16; j += 16) {
        detail::interleave_4x16(load16_s8(r + j), load16_s8(r + v.rs + j),
                                load16_s8(r + 2 * v.rs + j), load16_s8(r + 3 * v.rs + j),
                                o + j * 4);
      }
    }
    if (j16 < nj || k4 < k)  // the edges: columns past j16, rows past k4
      for (int64_t p = 0; p < k; ++p) {
        const T* row = d + p * v.rs + j0;
        int8_t* o = out + (p >> 2) * nr * 4 + (p & 3);
        for (int64_t j = p < k4 ? j16 : 0; j < nj; ++j)
          o[j * 4] = static_cast<int8_t>(static_cast<int>(row[j]));
      }
  } else if (v.rs == 1) {  // columns contiguous along k: 16 codes -> 4 groups of one column
    const int64_t k16 = k / 16 * 16;
    for (int64_t j = 0; j < nj; ++j) {
      const T* col = d + (j0 + j) * v.cs;
      for (int64_t p = 0; p < k16; p += 16) {
        alignas(16) int32_t w[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(w), load16_s8(col + p));
        for (int q = 0; q < 4; ++q) std::memcpy(out + ((p / 4 + q) * nr + j) * 4, &w[q], 4);
      }
      for (int64_t p = k16; p < k; ++p)
        out[((p >> 2) * nr + j) * 4 + (p & 3)] = static_cast<int8_t>(static_cast<int>(col[p]));
    }
  } else {
    for (int64_t j = 0; j < nj; ++j) {
      const T* col = d + (j0 + j) * v.cs;
      for (int64_t p = 0; p < k; ++p)
        out[((p >> 2) * nr + j) * 4 + (p & 3)] =
            static_cast<int8_t>(static_cast<int>(col[p * v.rs]));
    }
  }
}

// u8 panel of rows [i0, i0 + ni) with the offset added, groups padded to kq_pad.
template <typename T>
__attribute__((target("avx2"))) void pack_u(const View& v, int64_t k, int64_t i0, int64_t ni,
                                            int mr, int64_t kq_pad, bool row_major, int offset,
                                            uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(kq_pad * mr * 4));
  const T* d = static_cast<const T*>(v.data);
  // Byte (i, p): row-major rows of kq_pad * 4, or 4-byte groups of mr rows.
  const int64_t row_step = row_major ? kq_pad * 4 : 4, group_step = row_major ? 4 : mr * 4;
  if (v.cs == 1) {
    const int64_t k16 = k / 16 * 16;
    for (int64_t i = 0; i < ni; ++i) {
      const T* row = d + (i0 + i) * v.rs;
      uint8_t* o = out + i * row_step;
      for (int64_t p = 0; p < k16; p += 16) {
        const __m128i x = load16_u8(row + p, offset);
        if (row_major) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + p), x);
        } else {
          alignas(16) int32_t w[4];
          _mm_store_si128(reinterpret_cast<__m128i*>(w), x);
          for (int q = 0; q < 4; ++q) std::memcpy(o + (p / 4 + q) * group_step, &w[q], 4);
        }
      }
      for (int64_t p = k16; p < k; ++p)
        o[(p >> 2) * group_step + (p & 3)] =
            static_cast<uint8_t>(static_cast<int>(row[p]) + offset);
    }
  } else {
    for (int64_t p = 0; p < k; ++p)
      for (int64_t i = 0; i < ni; ++i)
        out[i * row_step + (p >> 2) * group_step + (p & 3)] =
            static_cast<uint8_t>(code_at<T>(v, i0 + i, p) + offset);
  }
}

// Where the exact integer results go.
struct Output {
  float* cf = nullptr;  // float output: cf = scale * float(T) (+ cf)
  int32_t* ci = nullptr;
  int64_t ldc = 0;
  float scale = 1.0f;
  bool accumulate = false;
  void put(int64_t i, int64_t j, int64_t t) const {
    if (ci) {
      ci[i * ldc + j] = static_cast<int32_t>(t);
      return;
    }
    const float v = scale * static_cast<float>(t);
    float& o = cf[i * ldc + j];
    o = accumulate ? o + v : v;
  }
};

Output float_output(float scale, bool accumulate, float* c, int64_t ldc) {
  Output out;
  out.cf = c;
  out.ldc = ldc;
  out.scale = scale;
  out.accumulate = accumulate;
  return out;
}

int64_t groups_padded(int64_t k, const detail::IgemmKernels& kn) {
  const int64_t kq = (k + 3) / 4;
  return (kq + kn.group_align - 1) / kn.group_align * kn.group_align;
}

// A's panels from a view (offset added), B's from a view: pack_u / pack_s panel by panel.
void pack_a_view(const detail::IgemmKernels& kn, const View& v, int64_t rows, int64_t k, int offset,
                 int qu, IgemmPackedA* a) {
  a->rows = rows;
  a->k = k;
  a->kq_pad = groups_padded(k, kn);
  a->offset = offset;
  a->qu = qu;
  const int64_t panel = a->kq_pad * 4 * kn.mr, npan = (rows + kn.mr - 1) / kn.mr;
  a->data.resize(static_cast<size_t>(npan * panel));
  with_type(v.type, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t ip = 0; ip < npan; ++ip)
      pack_u<T>(v, k, ip * kn.mr, std::min<int64_t>(kn.mr, rows - ip * kn.mr), kn.mr, a->kq_pad,
                kn.u_row_major, offset, a->data.data() + ip * panel);
  });
}

void pack_b_view(const detail::IgemmKernels& kn, const View& v, int64_t k, int64_t cols, int qs,
                 IgemmPackedB* b) {
  b->cols = cols;
  b->k = k;
  b->kq_pad = groups_padded(k, kn);
  b->qs = qs;
  const int64_t panel = b->kq_pad * 4 * kn.nr, npan = (cols + kn.nr - 1) / kn.nr;
  b->data.resize(static_cast<size_t>(npan * panel));
  with_type(v.type, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t jp = 0; jp < npan; ++jp)
      pack_s<T>(v, k, jp * kn.nr, std::min<int64_t>(kn.nr, cols - jp * kn.nr), kn.nr, b->kq_pad,
                b->data.data() + jp * panel);
  });
}

// colsum[j] = sum over the groups of panel column j's 4 bytes, for npan panels of nr columns:
// maddubs with ones gives the pair sums, madd_epi16 with ones the column's int32 sum per group.
// |sum| <= K * qs fits int32 under the guard.
__attribute__((target("avx2"))) void panel_colsums(const int8_t* panels, int64_t npan,
                                                   int64_t kq_pad, int nr, int32_t* colsum) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t jp = 0; jp < npan; ++jp)
    for (int j = 0; j < nr; j += 8) {  // 8 columns = 32 bytes per group
      const int8_t* p = panels + jp * kq_pad * 4 * nr + j * 4;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t g = 0; g < kq_pad; ++g) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g * nr * 4));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x), ones16));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(colsum + jp * nr + j), acc);
    }
}

// The tile loop: for each NR-column panel of B, every MR-row panel of A (B's panel stays in L1),
// the micro-kernel over int32 chunks of K (exact int64 sums across chunks), the offset removed
// with B's column sums, then out. rows x cols is the product P = A B (C = P, or P^T when swapped).
void tile_loop(const detail::IgemmKernels& kn, const IgemmPackedA& a, const IgemmPackedB& b,
               bool swapped, const Output& out) {
  const int mr = kn.mr, nr = kn.nr;
  const int64_t rows = a.rows, cols = b.cols, kq_pad = a.kq_pad;
  const int64_t max_k = kInt32Max / (int64_t{a.qu} * b.qs);
  // Groups per int32 chunk: the guard, rounded down to the kernel's alignment.
  const int64_t chunk =
      std::max<int64_t>(kn.group_align, max_k / 4 / kn.group_align * kn.group_align);
  const bool one_chunk = kq_pad <= chunk;
  // maddubs pair sums: 2 * qu * qs per group and lane; int16 holds i16 groups of them.
  const int64_t pair = 2 * int64_t{a.qu} * b.qs;
  const int i16 =
      pair > kInt16Max ? 0 : static_cast<int>(std::min<int64_t>(kInt16Max / pair, 1 << 20));
  const int64_t npan = (cols + nr - 1) / nr;
  const int64_t a_panel = kq_pad * 4 * mr, b_panel = kq_pad * 4 * nr;
  const int64_t u_stride = kq_pad * 4;  // row-major u8 panel
  thread_local std::vector<int32_t> colsum, tile;
  thread_local std::vector<int64_t> tile64;
  colsum.assign(static_cast<size_t>(npan * nr), 0);
  if (a.offset != 0) panel_colsums(b.data.data(), npan, kq_pad, nr, colsum.data());
  tile.resize(static_cast<size_t>(mr * nr));
  tile64.resize(static_cast<size_t>(mr * nr));
  int32_t* t32 = tile.data();
  int64_t* t64 = tile64.data();
  const int64_t off = a.offset;
  for (int64_t jp = 0; jp < npan; ++jp) {
    const int64_t j0 = jp * nr, nj = std::min<int64_t>(nr, cols - j0);
    const int8_t* sp = b.data.data() + jp * b_panel;
    const int32_t* cs = colsum.data() + j0;
    for (int64_t i0 = 0; i0 < rows; i0 += mr) {
      const int64_t ni = std::min<int64_t>(mr, rows - i0);
      const uint8_t* ap = a.data.data() + i0 / mr * a_panel;
      if (!one_chunk) std::fill(tile64.begin(), tile64.end(), 0);
      for (int64_t g0 = 0; g0 < kq_pad; g0 += chunk) {
        const int64_t gn = std::min(chunk, kq_pad - g0);
        const uint8_t* up = kn.u_row_major ? ap + g0 * 4 : ap + g0 * mr * 4;
        kn.micro(up, u_stride, sp + g0 * nr * 4, gn, i16, t32);
        if (!one_chunk)
          for (int x = 0; x < mr * nr; ++x) t64[x] += t32[x];
      }
      if (one_chunk && out.cf && !swapped) {
        // T fits int32 (the guard), and so does the corrected value; row-wise so the conversion
        // and rescale vectorise.
        const float sc = out.scale;
        for (int64_t i = 0; i < ni; ++i) {
          const int32_t* t = t32 + i * nr;
          float* o = out.cf + (i0 + i) * out.ldc + j0;
          if (out.accumulate)
            for (int64_t j = 0; j < nj; ++j)
              o[j] = o[j] + sc * static_cast<float>(t[j] - a.offset * cs[j]);
          else
            for (int64_t j = 0; j < nj; ++j)
              o[j] = sc * static_cast<float>(t[j] - a.offset * cs[j]);
        }
        continue;
      }
      for (int64_t i = 0; i < ni; ++i)
        for (int64_t j = 0; j < nj; ++j) {
          const int64_t v = (one_chunk ? int64_t{t32[i * nr + j]} : t64[i * nr + j]) - off * cs[j];
          if (swapped)
            out.put(j0 + j, i0 + i, v);
          else
            out.put(i0 + i, j0 + j, v);
        }
    }
  }
}

void run_kernels(const Plan& pl, int64_t rows, int64_t cols, int64_t k,
                 const detail::IgemmKernels& kn, const Output& out) {
  thread_local IgemmPackedA a;
  thread_local IgemmPackedB b;
  pack_a_view(kn, pl.u, rows, k, pl.offset, pl.qu, &a);
  pack_b_view(kn, pl.s, k, cols, pl.qs, &b);
  tile_loop(kn, a, b, pl.swapped, out);
}
// Row r of a convolution's column matrix for samples s0..s0+g-1 (see ConvColumns), as bytes: int8
// codes are copied as their bytes, and code 0 is byte 0 on both grids.
void conv_row(const ConvColumns& geo, const uint8_t* images, int64_t s0, int64_t g, int64_t r,
              uint8_t* dst) {
  const int k = geo.kernel, stride = geo.stride, pad = geo.pad;
  const int64_t c = r / (k * k), ky = r / k % k, kx = r % k;
  const int64_t h = geo.h, w = geo.w, ho = geo.ho, wo = geo.wo, hw = ho * wo, plane_size = h * w;
  // Output rows [y0, y1) and columns [x0, x1) read inside the image.
  // The first a with a * stride - pad + tap >= 0, and the first b >= a with b * stride - pad +
  // tap >= size, both within [0, out].
  auto inside = [stride, pad](int64_t size, int64_t out, int64_t tap, int64_t* lo, int64_t* hi) {
    auto first_at_least = [stride](int64_t v) {  // smallest i >= 0 with i * stride >= v
      return v <= 0 ? int64_t{0} : (v + stride - 1) / stride;
    };
    const int64_t a = std::min(out, first_at_least(pad - tap));
    *lo = a;
    *hi = std::clamp(first_at_least(size + pad - tap), a, out);
  };
  int64_t x0, x1, y0, y1;
  inside(w, wo, kx, &x0, &x1);
  inside(h, ho, ky, &y0, &y1);
  for (int64_t s = 0; s < g; ++s) {
    const uint8_t* plane = images + ((s0 + s) * geo.channels + c) * plane_size;
    uint8_t* out = dst + s * hw;
    std::memset(out, 0, static_cast<size_t>(y0 * wo));
    std::memset(out + y1 * wo, 0, static_cast<size_t>((ho - y1) * wo));
    if (stride == 1 && wo == w) {
      // The valid rows are one contiguous stretch of the plane shifted by kx - pad: one copy,
      // then the edge columns zeroed.
      const int64_t base = (y0 - pad + ky) * w + kx - pad, len = (y1 - y0) * wo;
      const int64_t jlo = std::clamp<int64_t>(-base, 0, len);
      const int64_t jhi = std::max(jlo, std::min(len, plane_size - base));
      uint8_t* o = out + y0 * wo;
      std::memset(o, 0, static_cast<size_t>(jlo));
      std::memcpy(o + jlo, plane + base + jlo, static_cast<size_t>(jhi - jlo));
      std::memset(o + jhi, 0, static_cast<size_t>(len - jhi));
    } else {
      for (int64_t oy = y0; oy < y1; ++oy) {
        uint8_t* o = out + oy * wo;
        const uint8_t* in = plane + (oy * stride - pad + ky) * w - pad + kx;
        if (stride == 1)
          std::memcpy(o + x0, in + x0, static_cast<size_t>(x1 - x0));
        else
          for (int64_t ox = x0; ox < x1; ++ox) o[ox] = in[ox * stride];
      }
    }
    // The edge columns (at most pad on each side), walked down the rows: one short store each,
    // not a memset call per row.
    for (int64_t ox = 0; ox < x0; ++ox)
      for (int64_t oy = y0; oy < y1; ++oy) out[oy * wo + ox] = 0;
    for (int64_t ox = x1; ox < wo; ++ox)
      for (int64_t oy = y0; oy < y1; ++oy) out[oy * wo + ox] = 0;
  }
}

// Group gq of every NR-column panel from 4 rows of bytes (row stride ld, npan * nr wide): 4 rows
// x 16 columns -> 16 columns x 4 bytes, as pack_s.
__attribute__((target("avx2"))) void interleave_rows(const uint8_t* rows, int64_t ld, int64_t npan,
                                                     int nr, int64_t kq_pad, int64_t gq,
                                                     int8_t* panels) {
  for (int64_t jp = 0; jp < npan; ++jp)
    for (int j = 0; j < nr; j += 16) {
      const uint8_t* r = rows + jp * nr + j;
      detail::interleave_4x16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + ld)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * ld)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * ld)),
                              panels + ((jp * kq_pad + gq) * nr + j) * 4);
    }
}

// One NR-column panel of the transposed column matrix from nr rows of bytes (row stride ld, zero
// past the data, at least 16 * ceil(kq / 4) bytes): group sg holds 4 bytes of each row, so 4
// groups of 4 rows are a 4 x 4 transpose of 32-bit words.
__attribute__((target("avx2"))) void transpose_rows(const uint8_t* rows, int64_t ld, int nr,
                                                    int64_t kq, int8_t* panel) {
  const int64_t kq4 = kq / 4 * 4;
  for (int i = 0; i < nr; i += 4)
    for (int64_t sg = 0; sg < kq; sg += 4) {
      const uint8_t* r = rows + i * ld + sg * 4;
      __m128 x0 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
      __m128 x1 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + ld)));
      __m128 x2 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * ld)));
      __m128 x3 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * ld)));
      _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
      const __m128 t[4] = {x0, x1, x2, x3};
      const int64_t ng = sg < kq4 ? 4 : kq - sg;
      for (int64_t q = 0; q < ng; ++q)
        _mm_storeu_ps(reinterpret_cast<float*>(panel + ((sg + q) * nr + i) * 4), t[q]);
    }
}

void init_packed_b(const detail::IgemmKernels& kn, int64_t k, int64_t cols, int qs,
                   IgemmPackedB* b) {
  b->kernels = &kn;
  b->cols = cols;
  b->k = k;
  b->kq_pad = groups_padded(k, kn);
  b->qs = qs;
  b->data.resize(static_cast<size_t>((cols + kn.nr - 1) / kn.nr * b->kq_pad * 4 * kn.nr));
}

}  // namespace

namespace detail {

void pack_a(const IgemmKernels& kn, int64_t m, int64_t k, const CodeMatrix& a, IgemmPackedA* out) {
  check_operand(a, "A");
  INT4DDP_CHECK(m >= 0 && k >= 0 && (m == 0 || k == 0 || a.data), "igemm: bad packed A (m=", m,
                " k=", k, ")");
  const int offset = a.is_unsigned ? 0 : a.qmax;
  out->kernels = &kn;
  pack_a_view(kn, op_view(a), m, k, offset, a.qmax + offset, out);
}

void pack_b(const IgemmKernels& kn, int64_t k, int64_t n, const CodeMatrix& b, IgemmPackedB* out) {
  check_operand(b, "B");
  INT4DDP_CHECK(fits_s8(b), "igemm: packed B needs codes that fit int8 (unsigned qmax ", b.qmax,
                " > 127)");
  INT4DDP_CHECK(n >= 0 && k >= 0 && (n == 0 || k == 0 || b.data), "igemm: bad packed B (k=", k,
                " n=", n, ")");
  out->kernels = &kn;
  pack_b_view(kn, op_view(b), k, n, b.qmax, out);
}

void pack_conv(const IgemmKernels& kn, const ConvColumns& geo, const void* images, bool is_unsigned,
               int qmax, int64_t s0, int64_t g, IgemmPackedB* cols, IgemmPackedB* cols_t) {
  INT4DDP_CHECK(qmax >= 1 && qmax <= 127, "igemm: convolution columns need codes that fit int8 (",
                is_unsigned ? "unsigned" : "signed", " qmax ", qmax, ")");
  INT4DDP_CHECK(images && g >= 0 && geo.ho > 0 && geo.wo > 0, "igemm: bad convolution columns");
  const int nr = kn.nr;
  const int64_t rows = geo.rows(), n = geo.cols(g);
  if (cols) init_packed_b(kn, rows, n, qmax, cols);
  if (cols_t) init_packed_b(kn, n, rows, qmax, cols_t);
  const int64_t npan = (n + nr - 1) / nr, kq_pad = cols ? cols->kq_pad : 0;
  const int64_t kq_t = cols_t ? cols_t->kq_pad : 0, npan_t = cols_t ? (rows + nr - 1) / nr : 0;
  // Strips of nr column-matrix rows (one panel of the transpose), zero past n and past `rows`,
  // read by both layouts while in cache; rows up to both layouts' padding.
  const int64_t ld = std::max(npan * nr, (kq_t + 3) / 4 * 16);
  const int64_t padded_rows = std::max(kq_pad * 4, npan_t * nr);
  thread_local std::vector<uint8_t> strip;
  if (strip.size() < static_cast<size_t>(nr * ld)) strip.resize(static_cast<size_t>(nr * ld));
  for (int q = 0; q < nr; ++q)  // conv_row writes [0, n) of a row
    std::memset(strip.data() + q * ld + n, 0, static_cast<size_t>(ld - n));
  const auto* bytes = static_cast<const uint8_t*>(images);
  for (int64_t r0 = 0; r0 < padded_rows; r0 += nr) {
    for (int q = 0; q < nr; ++q) {
      uint8_t* row = strip.data() + q * ld;
      if (r0 + q < rows)
        conv_row(geo, bytes, s0, g, r0 + q, row);
      else if (r0 + q == rows || q == 0)
        std::memset(strip.data() + q * ld, 0, static_cast<size_t>((nr - q) * ld));
    }
    if (cols)
      for (int q = 0; q < nr && (r0 + q) / 4 < kq_pad; q += 4)
        interleave_rows(strip.data() + q * ld, ld, npan, nr, kq_pad, (r0 + q) / 4,
                        cols->data.data());
    if (cols_t && r0 / nr < npan_t)
      transpose_rows(strip.data(), ld, nr, kq_t, cols_t->data.data() + r0 / nr * kq_t * 4 * nr);
  }
}

void igemm_packed_run(const IgemmPackedA& a, const IgemmPackedB& b, float scale, bool accumulate,
                      float* c, int64_t ldc) {
  INT4DDP_CHECK(a.kernels && a.kernels == b.kernels, "igemm_packed: A and B are not packed for ",
                "the same instruction set");
  INT4DDP_CHECK(a.k == b.k, "igemm_packed: A has k = ", a.k, ", B has k = ", b.k);
  INT4DDP_CHECK(b.k * b.qs <= kInt32Max, "igemm_packed: k = ", b.k, " too long for int32 sums");
  if (a.rows == 0 || b.cols == 0) return;
  INT4DDP_CHECK(c != nullptr, "igemm_packed: null output");
  const Output out = float_output(scale, accumulate, c, ldc);
  if (a.k == 0) {
    for (int64_t i = 0; i < a.rows; ++i)
      for (int64_t j = 0; j < b.cols; ++j) out.put(i, j, 0);
    return;
  }
  tile_loop(*a.kernels, a, b, false, out);
}

}  // namespace detail

namespace {

// kn == nullptr: the reference loops.
void igemm_run(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
               const detail::IgemmKernels* kn, const Output& out) {
  const Plan pl = make_plan(a, b);
  if (out.ci)
    INT4DDP_CHECK(k <= pl.max_k, "igemm_s32: k = ", k, " exceeds the int32 guard ", pl.max_k);
  if (m == 0 || n == 0) return;
  if (!kn || k == 0) {
    // The definition (also the k == 0 case: T = 0 everywhere).
    const View av = op_view(a), bv = op_view(b);
    with_type(a.type, [&](auto ta) {
      with_type(b.type, [&](auto tb) {
        using TA = decltype(ta);
        using TB = decltype(tb);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            int64_t t = 0;
            for (int64_t p = 0; p < k; ++p)
              t += int64_t{code_at<TA>(av, i, p)} * code_at<TB>(bv, p, j);
            out.put(i, j, t);
          }
      });
    });
    return;
  }
  if (pl.swapped)
    run_kernels(pl, n, m, k, *kn, out);
  else
    run_kernels(pl, m, n, k, *kn, out);
}

const detail::IgemmKernels* checked_kernels(IgemmIsa isa) {
  INT4DDP_CHECK(igemm_isa_available(isa), "igemm: instruction set ", igemm_isa_name(isa),
                " is not available on this CPU, build or kernel");
  return isa == IgemmIsa::kRef ? nullptr : &kernels_for(isa);
}

const detail::IgemmKernels& packed_kernels(IgemmIsa isa) {
  INT4DDP_CHECK(isa != IgemmIsa::kRef, "igemm: packed operands need an instruction set with a ",
                "micro-kernel, not ref");
  return *checked_kernels(isa);
}

bool cpu_has_amx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
  return tile && int8;
}

}  // namespace

const char* igemm_isa_name(IgemmIsa isa) {
  switch (isa) {
    case IgemmIsa::kRef:
      return "ref";
    case IgemmIsa::kAvx2:
      return "avx2";
    case IgemmIsa::kAvx512Vnni:
      return "avx512vnni";
    case IgemmIsa::kAmx:
      return "amx";
  }
  return "unknown";
}

bool igemm_isa_available(IgemmIsa isa) {
  switch (isa) {
    case IgemmIsa::kRef:
      return true;
    case IgemmIsa::kAvx2:
      return __builtin_cpu_supports("avx2");
    case IgemmIsa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    case IgemmIsa::kAmx:
      return cpu_has_amx() && detail::amx_permitted();
  }
  return false;
}

IgemmIsa igemm_best_isa() {
  for (IgemmIsa isa : {IgemmIsa::kAmx, IgemmIsa::kAvx512Vnni, IgemmIsa::kAvx2})
    if (igemm_isa_available(isa)) return isa;
  return IgemmIsa::kRef;
}

IgemmIsa igemm_default_isa() {
  static const IgemmIsa isa = isa_from_env("INT4DDP_GEMM_ISA", kIgemmIsas, igemm_isa_name,
                                           igemm_isa_available, igemm_best_isa());
  return isa;
}

int64_t igemm_max_k(const CodeMatrix& a, const CodeMatrix& b) { return make_plan(a, b).max_k; }

void igemm(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b, float scale,
           bool accumulate, float* c, int64_t ldc, IgemmIsa isa) {
  check_sizes(m, n, k, a, b, c);
  const Output out = float_output(scale, accumulate, c, ldc);
  igemm_run(m, n, k, a, b, checked_kernels(isa), out);
}

void igemm_s32(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
               int32_t* c, int64_t ldc, IgemmIsa isa) {
  check_sizes(m, n, k, a, b, c);
  Output out;
  out.ci = c;
  out.ldc = ldc;
  igemm_run(m, n, k, a, b, checked_kernels(isa), out);
}

void igemm_ref(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b,
               float scale, bool accumulate, float* c, int64_t ldc) {
  igemm(m, n, k, a, b, scale, accumulate, c, ldc, IgemmIsa::kRef);
}

bool igemm_fits_s8(const CodeMatrix& x) { return fits_s8(x); }

void IgemmPackedA::pack(IgemmIsa isa, int64_t m, int64_t depth, const CodeMatrix& a) {
  detail::pack_a(packed_kernels(isa), m, depth, a, this);
}

void IgemmPackedB::pack(IgemmIsa isa, int64_t depth, int64_t n, const CodeMatrix& b) {
  detail::pack_b(packed_kernels(isa), depth, n, b, this);
}

void igemm_pack_conv(IgemmIsa isa, const ConvColumns& geo, const void* images, bool is_unsigned,
                     int qmax, int64_t s0, int64_t g, IgemmPackedB* cols, IgemmPackedB* cols_t) {
  detail::pack_conv(packed_kernels(isa), geo, images, is_unsigned, qmax, s0, g, cols, cols_t);
}

void igemm_packed(const IgemmPackedA& a, const IgemmPackedB& b, float scale, bool accumulate,
                  float* c, int64_t ldc) {
  detail::igemm_packed_run(a, b, scale, accumulate, c, ldc);
}

namespace detail {

void igemm_with_kernels(const IgemmKernels& kn, int64_t m, int64_t n, int64_t k,
                        const CodeMatrix& a, const CodeMatrix& b, float scale, bool accumulate,
                        float* c, int64_t ldc) {
  check_sizes(m, n, k, a, b, c);
  const Output out = float_output(scale, accumulate, c, ldc);
  igemm_run(m, n, k, a, b, &kn, out);
}

}  // namespace detail
}  // namespace int4ddp::math
