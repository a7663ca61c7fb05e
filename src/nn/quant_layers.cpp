// Quantized Conv2d / Linear (see quant_layers.h). The quantizers write byte codes (int8 weights and
// gradients, uint8 activations or int8 on the signed grid) that every GEMM of the step reads
// through code_gemm: the int8 kernels of math::igemm where the CPU has one, else the exact fp32
// math::int_gemm on the codes converted to floats. Both are exact (scale * float(T), one rescale
// per output), so which one ran changes no bit. QConv2d's im2col path, where an igemm ISA runs and
// the column codes fit int8, skips the column matrices: its weight codes are packed into the
// kernels' panels once per step and every group's columns are written straight into panels
// (math::IgemmPackedA / igemm_pack_conv / igemm_packed, the same exact sums); a 3x3 stride-1
// pad-1 QConv2d skips the columns altogether where math::iconv3x3 runs (AVX512-VNNI, or AVX2 where
// its int16 pair sums cannot saturate): forward, backward-data and backward-weight as implicit
// GEMMs on the codes, the same exact sums again. The direct 3x3 convolution (fp32 kernels, exact
// on integer-valued floats), which reads float copies of the codes, is taken on AVX-512 CPUs
// without VNNI (fp32_direct3x3).
#include "src/nn/quant_layers.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>

#include "kernels/common/parallel.h"
#include "kernels/math/gemm.h"
#include "kernels/math/iconv3x3.h"
#include "kernels/math/igemm.h"
#include "src/nn/conv2d_groups.h"

namespace int4ddp::nn {

using math::CodeMatrix;
using math::int_gemm;
using math::Trans;

namespace {

constexpr float kMinStep = 1e-12f;  // s_W and u_A are used as max(|value|, kMinStep)
// Work items over a weight tensor: fixed blocks; s_W's gradient is summed per block, then in block
// order (thread-count independent).
constexpr int64_t kWeightBlock = 16384;

float effective_step(float v) { return std::max(std::fabs(v), kMinStep); }

// QConv2d's 3x3 stride-1 pad-1 choice: the fp32 direct convolution where Conv2d::direct3x3() takes
// it (AVX-512), unless the integer GEMMs run (gemm_isa not ref) and iconv3x3's AVX512-VNNI kernel
// does: the integer implicit GEMM is then the fast path, for every code width (int32 sums). The
// fp32 path stays the fallback, and the reference with INT4DDP_GEMM_ISA=ref. Forward and backward
// ask the same question (the direct backward reads forward's float copies of the codes), so the
// VNNI answer is taken once per process, as conv3x3_resolve's.
bool fp32_direct3x3(bool direct3x3, math::IgemmIsa gemm_isa) {
  static const bool vnni =
      math::iconv3x3_resolve(math::Iconv3x3Isa::kAuto) == math::Iconv3x3Isa::kAvx512Vnni;
  return direct3x3 && (gemm_isa == math::IgemmIsa::kRef || !vnni);
}

// Activation codes (xq_'s bytes, or columns made of them) as a GEMM operand: uint8, or int8 on the
// signed grid. Code 0 is byte 0 either way, so im2col pads both alike.
CodeMatrix act_operand(const uint8_t* codes, int64_t ld, int qmax, bool is_signed,
                       Trans t = Trans::kNo) {
  return is_signed ? math::codes_s8(reinterpret_cast<const int8_t*>(codes), ld, qmax, t)
                   : math::codes_u8(codes, ld, qmax, t);
}

// out[i] = float(codes[i]).
template <typename T>
void codes_to_floats(const T* codes, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i]);
}

// The stored elements of x (rows x cols, row stride ld) as floats in buf.
const float* operand_as_floats(const CodeMatrix& x, int64_t rows, int64_t cols,
                               std::vector<float>* buf) {
  const int64_t span = rows == 0 || cols == 0 ? 0 : (rows - 1) * x.ld + cols;
  float* out = grow_scratch(*buf, span);
  if (x.type == math::CodeType::kU8)
    codes_to_floats(static_cast<const uint8_t*>(x.data), span, out);
  else if (x.type == math::CodeType::kS8)
    codes_to_floats(static_cast<const int8_t*>(x.data), span, out);
  else
    std::copy_n(static_cast<const float*>(x.data), span, out);
  return out;
}

// C (m, n) = scale * (op(A) op(B)) exactly (accumulate: +=) on byte codes: igemm's int8 kernels of
// `isa`, or for IgemmIsa::kRef (INT4DDP_GEMM_ISA=ref, or a CPU without AVX2) the exact fp32
// int_gemm on the codes converted to floats, the portable path and the reference.
void code_gemm(math::IgemmIsa isa, int64_t m, int64_t n, int64_t k, const CodeMatrix& a,
               const CodeMatrix& b, float scale, bool accumulate, float* c, int64_t ldc) {
  if (isa == math::IgemmIsa::kRef) {
    thread_local std::vector<float> fa, fb;
    const bool an = a.trans == Trans::kNo, bn = b.trans == Trans::kNo;
    const float* pa = operand_as_floats(a, an ? m : k, an ? k : m, &fa);
    const float* pb = operand_as_floats(b, bn ? k : n, bn ? n : k, &fb);
    int_gemm(a.trans, b.trans, m, n, k, pa, a.ld, a.qmax, pb, b.ld, b.qmax, scale, accumulate, c,
             ldc);
    return;
  }
  math::igemm(m, n, k, a, b, scale, accumulate, c, ldc, isa);
}

Param make_scalar_param(const std::string& name) {
  Param p;
  p.name = name;
  p.shape = {1};
  p.group = ParamGroup::kQuantizer;
  p.decay = false;
  p.value = Tensor({1});
  p.grad = Tensor({1});
  p.value[0] = 1.0f;
  return p;
}

double population_std(const float* x, int64_t n) {
  if (n == 0) return 0.0;
  double s = 0.0, s2 = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const double mean = s / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) s2 += (x[i] - mean) * (x[i] - mean);
  return std::sqrt(s2 / static_cast<double>(n));
}

}  // namespace

// ---- fake-quantizer math ----------------------------------------------------------------------

void quantize_weight_codes(const float* w, int64_t n, float s, int bits, float* codes) {
  const float lim = static_cast<float>(quant::levels(bits));
  const float se = effective_step(s);
  for (int64_t i = 0; i < n; ++i) codes[i] = std::clamp(std::rint(w[i] / se * lim), -lim, lim);
}

namespace {

// One element of weight_quant_backward: dw += dwhat inside the clip range; returns its term of
// d loss / d s.
inline double weight_term(float w, float se, float lim, float dwhat, float* dw) {
  const float v = w / se * lim;
  if (std::fabs(v) <= lim) {
    *dw += dwhat;
    return static_cast<double>(dwhat) * (std::rint(v) - v) / lim;
  }
  return v > 0 ? dwhat : -dwhat;
}

}  // namespace

double weight_quant_backward_ref(const float* w, int64_t n, float s, int bits, const float* dwhat,
                                 float* dw) {
  const float lim = static_cast<float>(quant::levels(bits));
  const float se = effective_step(s);
  double ds = 0.0;
  for (int64_t i = 0; i < n; ++i) ds += weight_term(w[i], se, lim, dwhat[i], dw + i);
  return ds;
}

namespace {

// weight_quant_backward_ref's per-element work for m elements (a multiple of 8) on 8 AVX2 lanes:
// dw updated in place and each element's term of ds written to terms[i], for the caller to add in
// element order. The same operations per element: v = (w / se) * lim, |v| <= lim by an ordered
// compare (a NaN is outside, and v > 0 is false for it, as in the scalar code), _mm256_round_ps
// rounds to nearest even as std::rint does, the negation flips the sign bit as unary minus does,
// and the term is double(dwhat) * double(rint(v) - v) / double(lim) or double(+-dwhat).
__attribute__((target("avx2"))) void weight_terms_avx2(const float* w, int64_t m, float se,
                                                       float lim, const float* dwhat, float* dw,
                                                       double* terms) {
  const __m256 vse = _mm256_set1_ps(se), vlim = _mm256_set1_ps(lim);
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  const __m256d dlim = _mm256_set1_pd(static_cast<double>(lim));
  for (int64_t i = 0; i < m; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(w + i), vse), vlim);
    const __m256 inside = _mm256_cmp_ps(_mm256_andnot_ps(sign, v), vlim, _CMP_LE_OQ);
    const __m256 g = _mm256_loadu_ps(dwhat + i);
    const __m256 d = _mm256_loadu_ps(dw + i);
    _mm256_storeu_ps(dw + i, _mm256_blendv_ps(d, _mm256_add_ps(d, g), inside));
    const __m256 resid =
        _mm256_sub_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), v);
    const __m256 clip =
        _mm256_blendv_ps(_mm256_xor_ps(g, sign), g, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
    const __m256d g0 = _mm256_cvtps_pd(_mm256_castps256_ps128(g));
    const __m256d g1 = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
    const __m256d in0 =
        _mm256_div_pd(_mm256_mul_pd(g0, _mm256_cvtps_pd(_mm256_castps256_ps128(resid))), dlim);
    const __m256d in1 =
        _mm256_div_pd(_mm256_mul_pd(g1, _mm256_cvtps_pd(_mm256_extractf128_ps(resid, 1))), dlim);
    const __m256d out0 = _mm256_cvtps_pd(_mm256_castps256_ps128(clip));
    const __m256d out1 = _mm256_cvtps_pd(_mm256_extractf128_ps(clip, 1));
    const __m256d mask0 = _mm256_cvtps_pd(_mm256_castps256_ps128(inside));  // all-ones: NaN
    const __m256d mask1 = _mm256_cvtps_pd(_mm256_extractf128_ps(inside, 1));
    _mm256_storeu_pd(terms + i, _mm256_blendv_pd(out0, in0, mask0));
    _mm256_storeu_pd(terms + i + 4, _mm256_blendv_pd(out1, in1, mask1));
  }
}

}  // namespace

// As weight_quant_backward_ref: the per-element work on AVX2 lanes in chunks, ds still one chain
// of double adds in element order (bit for bit the reference's).
double weight_quant_backward(const float* w, int64_t n, float s, int bits, const float* dwhat,
                             float* dw) {
  static const bool avx2 = quant::isa_allows(quant::Isa::kAvx2);
  if (!avx2) return weight_quant_backward_ref(w, n, s, bits, dwhat, dw);
  constexpr int64_t kChunk = 256;
  const float lim = static_cast<float>(quant::levels(bits));
  const float se = effective_step(s);
  double terms[kChunk];
  double ds = 0.0;
  const int64_t n8 = n / 8 * 8;
  for (int64_t i = 0; i < n8; i += kChunk) {
    const int64_t m = std::min(kChunk, n8 - i);
    weight_terms_avx2(w + i, m, se, lim, dwhat + i, dw + i, terms);
    for (int64_t j = 0; j < m; ++j) ds += terms[j];
  }
  for (int64_t i = n8; i < n; ++i) ds += weight_term(w[i], se, lim, dwhat[i], dw + i);
  return ds;
}

float effective_quant_step(float v) { return effective_step(v); }

int act_qmax(int bits, bool is_signed) { return is_signed ? quant::levels(bits) : (1 << bits) - 1; }

void quantize_act_codes(const float* x, int64_t n, float u, int bits, bool is_signed,
                        float* codes) {
  const float q = static_cast<float>(act_qmax(bits, is_signed));
  const float lo = is_signed ? -1.0f : 0.0f;
  const float ue = effective_step(u);
  for (int64_t i = 0; i < n; ++i) codes[i] = std::rint(std::clamp(x[i] / ue, lo, 1.0f) * q);
}

namespace {

// The byte activation quantizer: the float definition's integer, converted (a NaN gets 0 and is
// counted). The plain loop is the portable path; it does not vectorise (std::clamp and rint under
// the default trapping-math rules), so where the CPU has AVX2 the same operations run on 8 lanes:
// max(lo, t) and min(1, t) keep a NaN as std::clamp does, _mm256_round_ps rounds to nearest even
// as std::rint does in the default rounding mode, and the integral floats convert exactly.
template <typename T>
int64_t act_codes_plain(const float* x, int64_t n, float ue, float lo, float q, T* codes) {
  int64_t nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float c = std::rint(std::clamp(x[i] / ue, lo, 1.0f) * q);
    nan += c != c;
    codes[i] = static_cast<T>(c == c ? static_cast<int32_t>(c) : 0);
  }
  return nan;
}

// Byte codes of x[0, n) in steps of 32 on AVX2: codes8(p) gives 8 codes as int32 (in range for
// T), packed with saturation (which never applies) and stored in order. Returns the elements done
// (a multiple of 32); the caller's plain loop does the rest.
template <typename T, typename Codes8>
__attribute__((target("avx2"))) int64_t byte_codes_avx2(const float* x, int64_t n,
                                                        const Codes8& codes8, T* codes) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a = codes8(x + i), b = codes8(x + i + 8);
    const __m256i c = codes8(x + i + 16), d = codes8(x + i + 24);
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    const __m256i bytes =
        std::is_same_v<T, uint8_t> ? _mm256_packus_epi16(ab, cd) : _mm256_packs_epi16(ab, cd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                        _mm256_permutevar8x32_epi32(bytes, order));
  }
  return i;
}

// The activation quantizer's 8 codes (NaN: 0, counted).
struct ActCodes8 {
  __m256 vue, vlo, one, vq;
  int64_t* nan;
  __attribute__((target("avx2"))) __m256i operator()(const float* p) const {
    __m256 t = _mm256_div_ps(_mm256_loadu_ps(p), vue);
    t = _mm256_min_ps(one, _mm256_max_ps(vlo, t));
    const __m256 v =
        _mm256_round_ps(_mm256_mul_ps(t, vq), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 ord = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
    *nan += 8 - __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(ord)));
    return _mm256_cvtps_epi32(_mm256_and_ps(v, ord));
  }
};

template <typename T>
__attribute__((target("avx2"))) int64_t act_codes_avx2(const float* x, int64_t n, float ue,
                                                       float lo, float q, T* codes) {
  int64_t nan = 0;
  const ActCodes8 codes8{_mm256_set1_ps(ue), _mm256_set1_ps(lo), _mm256_set1_ps(1.0f),
                         _mm256_set1_ps(q), &nan};
  const int64_t i = byte_codes_avx2(x, n, codes8, codes);
  return nan + act_codes_plain(x + i, n - i, ue, lo, q, codes + i);
}

// The weight quantizer's 8 codes clamp(rint((w / se) * lim), -lim, lim) (NaN: 0): the scalar
// code's operations (_mm256_round_ps rounds to nearest even as std::rint does; +-inf clamp to
// +-lim as std::clamp does; a NaN is masked to 0 whatever min and max make of it).
struct WeightCodes8 {
  __m256 vse, vlim, vneg;
  __attribute__((target("avx2"))) __m256i operator()(const float* p) const {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(p), vse), vlim),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(r, vneg), vlim);
    return _mm256_cvtps_epi32(_mm256_and_ps(c, _mm256_cmp_ps(r, r, _CMP_ORD_Q)));
  }
};

// quantize_weight_codes' 32-code steps; returns the elements done.
__attribute__((target("avx2"))) int64_t weight_codes_avx2(const float* w, int64_t n, float se,
                                                          float lim, int8_t* codes) {
  const WeightCodes8 codes8{_mm256_set1_ps(se), _mm256_set1_ps(lim), _mm256_set1_ps(-lim)};
  return byte_codes_avx2(w, n, codes8, codes);
}

template <typename T>
int64_t act_codes_bytes(const float* x, int64_t n, float u, int bits, bool is_signed, T* codes) {
  static const bool avx2 = quant::isa_allows(quant::Isa::kAvx2);
  const float q = static_cast<float>(act_qmax(bits, is_signed));
  const float lo = is_signed ? -1.0f : 0.0f;
  const float ue = effective_step(u);
  return avx2 ? act_codes_avx2(x, n, ue, lo, q, codes) : act_codes_plain(x, n, ue, lo, q, codes);
}

}  // namespace

void quantize_weight_codes(const float* w, int64_t n, float s, int bits, int8_t* codes) {
  static const bool avx2 = quant::isa_allows(quant::Isa::kAvx2);
  const float lim = static_cast<float>(quant::levels(bits));
  const float se = effective_step(s);
  const int64_t done = avx2 ? weight_codes_avx2(w, n, se, lim, codes) : 0;
  for (int64_t i = done; i < n; ++i) {
    const float q = std::clamp(std::rint(w[i] / se * lim), -lim, lim);
    codes[i] = static_cast<int8_t>(q == q ? static_cast<int32_t>(q) : 0);  // NaN: 0
  }
}

int64_t quantize_act_codes(const float* x, int64_t n, float u, int bits, uint8_t* codes) {
  return act_codes_bytes(x, n, u, bits, false, codes);
}

int64_t quantize_act_codes(const float* x, int64_t n, float u, int bits, int8_t* codes) {
  return act_codes_bytes(x, n, u, bits, true, codes);
}

double act_quant_backward_ref(const float* x, int64_t n, float u, int bits, bool is_signed,
                              const float* dxhat, float* dx) {
  const float q = static_cast<float>(act_qmax(bits, is_signed));
  const float lo = is_signed ? -1.0f : 0.0f;
  const float ue = effective_step(u);
  double du = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] / ue;
    if (v >= lo && v <= 1.0f) {
      dx[i] = dxhat[i];
      du += static_cast<double>(dxhat[i]) * (std::rint(v * q) - v * q) / q;
    } else {
      dx[i] = 0.0f;
      if (v > 1.0f)
        du += dxhat[i];
      else if (is_signed)
        du -= dxhat[i];  // clamped at -1: x^ = -u
    }
  }
  return du;
}

namespace {

constexpr int kDuLanes = 8;

// Per element: dx, the rounding residual r_in (in range) and the clip slope r_out (+1 above, below
// under the range, 0 in range). The plain loop does not vectorise (std::rint under the default
// trapping-math rules); du_fused_avx2 below does the same operations on 8 lanes.
void du_terms_plain(const float* x, const float* g, int64_t m, float ue, float lo, float q,
                    float below, float* dx, float* r_in, float* r_out) {
  for (int64_t j = 0; j < m; ++j) {
    const float v = x[j] / ue;
    const bool inside = (v >= lo) & (v <= 1.0f);
    const float resid = std::rint(v * q) - v * q;
    dx[j] = inside ? g[j] : 0.0f;
    r_in[j] = inside ? resid : 0.0f;
    r_out[j] = inside ? 0.0f : (v > 1.0f ? 1.0f : below);
  }
}

// The du lane sums over m8 elements (a multiple of 8): lane l accumulates, in element order,
// double(g) * r_in (exact product of two floats) into in[l] and double(g * r_out) (exact: r_out is
// 0 or +-1) into out[l] for the elements 8i + l.
void du_lanes_plain(const float* g, const float* r_in, const float* r_out, int64_t m8, double* in,
                    double* out) {
  for (int64_t j = 0; j < m8; j += kDuLanes)
    for (int l = 0; l < kDuLanes; ++l) {
      in[l] += static_cast<double>(g[j + l]) * r_in[j + l];
      out[l] += static_cast<double>(g[j + l] * r_out[j + l]);
    }
}

// du_terms_plain and du_lanes_plain of m8 elements (a multiple of 8) in one pass on 8 AVX2 lanes,
// the lane sums in registers: the same operations per element (_mm256_round_ps rounds to nearest
// even as std::rint does; the ordered compares leave a NaN outside the range as the scalar compares
// do; the masks give +0.0 where the scalar code writes 0.0f) and the same adds per lane in the same
// order, so the same dx and lane sums, bit for bit.
__attribute__((target("avx2"))) void du_fused_avx2(const float* x, const float* g, int64_t m8,
                                                   float ue, float lo, float q, float below,
                                                   float* dx, double* in, double* out) {
  const __m256 vue = _mm256_set1_ps(ue), vlo = _mm256_set1_ps(lo), vq = _mm256_set1_ps(q);
  const __m256 one = _mm256_set1_ps(1.0f), vbelow = _mm256_set1_ps(below);
  __m256d in0 = _mm256_loadu_pd(in), in1 = _mm256_loadu_pd(in + 4);
  __m256d out0 = _mm256_loadu_pd(out), out1 = _mm256_loadu_pd(out + 4);
  for (int64_t j = 0; j < m8; j += kDuLanes) {
    const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + j), vue);
    const __m256 inside =
        _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, one, _CMP_LE_OQ));
    const __m256 vq_ = _mm256_mul_ps(v, vq);
    const __m256 resid =
        _mm256_sub_ps(_mm256_round_ps(vq_, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vq_);
    const __m256 slope = _mm256_blendv_ps(vbelow, one, _mm256_cmp_ps(v, one, _CMP_GT_OQ));
    const __m256 gv = _mm256_loadu_ps(g + j);
    _mm256_storeu_ps(dx + j, _mm256_and_ps(inside, gv));
    const __m256 ri = _mm256_and_ps(inside, resid);
    const __m256 go = _mm256_mul_ps(gv, _mm256_andnot_ps(inside, slope));
    const __m256d glo = _mm256_cvtps_pd(_mm256_castps256_ps128(gv));
    const __m256d ghi = _mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1));
    in0 = _mm256_add_pd(in0, _mm256_mul_pd(glo, _mm256_cvtps_pd(_mm256_castps256_ps128(ri))));
    in1 = _mm256_add_pd(in1, _mm256_mul_pd(ghi, _mm256_cvtps_pd(_mm256_extractf128_ps(ri, 1))));
    out0 = _mm256_add_pd(out0, _mm256_cvtps_pd(_mm256_castps256_ps128(go)));
    out1 = _mm256_add_pd(out1, _mm256_cvtps_pd(_mm256_extractf128_ps(go, 1)));
  }
  _mm256_storeu_pd(in, in0);
  _mm256_storeu_pd(in + 4, in1);
  _mm256_storeu_pd(out, out0);
  _mm256_storeu_pd(out + 4, out1);
}

}  // namespace

// As act_quant_backward_ref, restructured so that it vectorises: per chunk, a float pass computes
// dx and each element's rounding residual r_in (in range) or clip slope r_out (+1 above, -1 below
// on the signed grid, 0 in range); then du is summed in kDuLanes double lanes (element i in lane
// i % 8, in element order; a fixed order, so deterministic) and divided by q once, instead of one
// latency-bound chain with a division per element.
double act_quant_backward(const float* x, int64_t n, float u, int bits, bool is_signed,
                          const float* dxhat, float* dx) {
  static const bool avx2 = quant::isa_allows(quant::Isa::kAvx2);
  constexpr int64_t kChunk = 256;
  const float q = static_cast<float>(act_qmax(bits, is_signed));
  const float lo = is_signed ? -1.0f : 0.0f;
  const float ue = effective_step(u);
  const float below = is_signed ? -1.0f : 0.0f;  // du per unit dxhat below the range
  double in_lanes[kDuLanes] = {}, out_lanes[kDuLanes] = {};
  float r_in[kChunk], r_out[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
    const float* xc = x + c0;
    const float* gc = dxhat + c0;
    float* dc = dx + c0;
    const int64_t m8 = m / kDuLanes * kDuLanes;
    if (avx2) {
      du_fused_avx2(xc, gc, m8, ue, lo, q, below, dc, in_lanes, out_lanes);
    } else {
      du_terms_plain(xc, gc, m8, ue, lo, q, below, dc, r_in, r_out);
      du_lanes_plain(gc, r_in, r_out, m8, in_lanes, out_lanes);
    }
    du_terms_plain(xc + m8, gc + m8, m - m8, ue, lo, q, below, dc + m8, r_in + m8, r_out + m8);
    for (int64_t j = m8, l = 0; j < m; ++j, ++l) {  // only the last chunk has a tail
      in_lanes[l] += static_cast<double>(gc[j]) * r_in[j];
      out_lanes[l] += static_cast<double>(gc[j] * r_out[j]);
    }
  }
  auto total = [](const double* v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  };
  return total(in_lanes) / q + total(out_lanes);
}

// ---- QuantizedOp ------------------------------------------------------------------------------

QuantizedOp::QuantizedOp(const std::string& name, const QuantSpec& spec, uint32_t layer_id,
                         QuantContext* ctx)
    : op_name_(name),
      spec_(spec),
      layer_id_(layer_id),
      ctx_(ctx),
      s_w_(make_scalar_param(name + ".s_w")),
      u_a_(make_scalar_param(name + ".u_a")),
      gemm_isa_(math::igemm_default_isa()) {
  INT4DDP_CHECK(ctx_ != nullptr, name, ": quantized layer needs a QuantContext");
  for (int b : {spec.weight_bits, spec.act_bits, spec.grad_bits})
    INT4DDP_CHECK(quant::valid_bits(b), name, ": bit-width ", b, " is outside 2..8");
  spec_.grad_policy.bits = spec.grad_bits;
  grad_.policy = quant::make_policy(spec_.grad_policy);
  grad_.tracker = quant::LargeGradientTracker(spec_.grad_policy.alpha);
}

void QuantizedOp::init_steps(const Tensor& x, const Param& w) {
  const double sw = 3.0 * population_std(w.value.data(), w.value.numel());
  s_w_.value[0] = sw > 0 ? static_cast<float>(sw) : 1.0f;
  // 3 std on the signed grid; on the unsigned one (inputs after a ReLU) the std of the half-normal
  // |X| is sqrt(1 - 2/pi) times that of X.
  const double ua = spec_.signed_input
                        ? 3.0 * population_std(x.data(), x.numel())
                        : 3.0 * population_std(x.data(), x.numel()) / std::sqrt(1.0 - 2.0 / M_PI);
  u_a_.value[0] = ua > 0 ? static_cast<float>(ua) : 1.0f;
  initialized_ = true;
}

bool QuantizedOp::grad_needs_values() const {
  const quant::PolicyKind k = grad_.policy->kind();
  return grad_.policy->needs_calibration() || k == quant::PolicyKind::kMse ||
         k == quant::PolicyKind::kDsgc;
}

quant::QuantParams QuantizedOp::grad_quant_params(const float* dy, int64_t n) {
  INT4DDP_CHECK(dy != nullptr || !grad_needs_values(), op_name_,
                ": the gradient quantizer needs dL/dY's values this step");
  quant::QuantParams p;
  p.bits = spec_.grad_bits;
  p.rounding = spec_.grad_rounding;
  if (grad_.policy->needs_calibration()) {
    // The calibration batch: gamma from this full-precision dL/dY; the batch itself is quantized
    // with gamma = 1, so the layers below calibrate on gradients no calibrated gamma has shaped.
    if (!grad_.policy->calibrate(dy, n) && ++calibration_failures_ >= kMaxCalibrationTries) {
      grad_.policy->skip_calibration();
      ctx_->warnings.push_back(op_name_ + ": the lbt calibration found an all-zero or non-finite " +
                               "output gradient on " + std::to_string(calibration_failures_) +
                               " batches; gamma starts at 1 instead");
    }
    p.gamma = 1.0f;
  } else {
    p.gamma = grad_.policy->gamma_for(dy, n);
  }
  p.block_size = 0;
  p.key = quant::RngKey{ctx_->seed, ctx_->stream, ctx_->step, layer_id_};
  return p;
}

float QuantizedOp::finish_grad_quant(const quant::QuantStats& st, float gamma) {
  grad_.pending = st;
  grad_.has_pending = true;
  grad_.last_gamma = gamma;
  ctx_->nonfinite += st.nonfinite;
  return quant::step_for_clip(gamma * st.absmax, spec_.grad_bits);
}

void QuantizedOp::diagnose_grad(const float* dy, const float* dequantized, int64_t n) {
  grad_.last_diag = quant::diagnose(dy, dequantized, n, grad_.pending, grad_.tracker);
}

float QuantizedOp::quantize_grad(const Tensor& dy, std::vector<int8_t>* codes) {
  profile::Scope scope("quant: grad codes");
  const int64_t n = dy.numel();
  const quant::QuantParams p = grad_quant_params(dy.data(), n);
  // One per-tensor quantization done in pieces on the threads: the max and the counts are exact
  // in any order and the stochastic rounding is keyed by element index, so the codes and stats
  // are those of one quantize() call whatever the pieces and threads.
  constexpr int64_t kPiece = 16384;
  const int64_t pieces = (n + kPiece - 1) / kPiece;
  piece_max_.assign(static_cast<size_t>(pieces), 0.0f);
  piece_count_.assign(static_cast<size_t>(pieces), 0);
  parallel_for(pieces, [&](int64_t b) {
    const int64_t i0 = b * kPiece, len = std::min(kPiece, n - i0);
    piece_max_[static_cast<size_t>(b)] =
        quant::finite_absmax(dy.data() + i0, len, &piece_count_[static_cast<size_t>(b)]);
  });
  quant::QuantStats st;
  st.count = n;
  for (int64_t b = 0; b < pieces; ++b) {
    st.absmax = std::max(st.absmax, piece_max_[static_cast<size_t>(b)]);
    st.nonfinite += piece_count_[static_cast<size_t>(b)];
  }
  codes->resize(static_cast<size_t>(n));
  parallel_for(pieces, [&](int64_t b) {
    const int64_t i0 = b * kPiece, len = std::min(kPiece, n - i0);
    quant::QuantParams pp = p;
    pp.index_offset = i0;
    piece_count_[static_cast<size_t>(b)] = quant::quantize_piece(
        dy.data() + i0, len, pp, st.absmax, st.nonfinite == 0, codes->data() + i0);
  });
  for (int64_t c : piece_count_) st.clipped += c;
  const float step = finish_grad_quant(st, p.gamma);
  if (ctx_->diagnostics && st.nonfinite == 0) {
    scratch_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      scratch_[static_cast<size_t>(i)] = static_cast<float>((*codes)[i]) * step;
    diagnose_grad(dy.data(), scratch_.data(), n);
  }
  return step;
}

QuantizedOp::Grid QuantizedOp::grid() const {
  Grid g;
  g.qa = act_qmax(spec_.act_bits, spec_.signed_input);
  g.qw = quant::levels(spec_.weight_bits);
  g.qg = quant::levels(spec_.grad_bits);
  g.sa = effective_step(u_a_.value[0]) / static_cast<float>(g.qa);
  g.sw = effective_step(s_w_.value[0]) / static_cast<float>(g.qw);
  return g;
}

float QuantizedOp::quantize_operands(const Tensor& x, const Param& w, bool train) {
  profile::Scope scope("quant: act + weight codes");
  if (!initialized_ && train) init_steps(x, w);
  xq_.resize(static_cast<size_t>(x.numel()));
  wq_.resize(static_cast<size_t>(w.value.numel()));
  const int64_t per = x.numel() / std::max<int64_t>(1, x.dim(0));
  const BatchParts parts{x.dim(0)};
  const int64_t nw = w.value.numel(), wblocks = (nw + kWeightBlock - 1) / kWeightBlock;
  piece_count_.assign(static_cast<size_t>(parts.count()), 0);  // NaN inputs of each part
  // One parallel region for both: items 0..parts-1 the activations' parts, then the weight blocks.
  parallel_for(parts.count() + wblocks, [&](int64_t item) {
    if (item >= parts.count()) {
      const int64_t i0 = (item - parts.count()) * kWeightBlock;
      quantize_weight_codes(w.value.data() + i0, std::min(kWeightBlock, nw - i0), s_w_.value[0],
                            spec_.weight_bits, wq_.data() + i0);
      return;
    }
    const int64_t p = item;
    const int64_t off = parts.begin(p) * per, len = (parts.end(p) - parts.begin(p)) * per;
    uint8_t* out = xq_.data() + off;
    piece_count_[static_cast<size_t>(p)] =
        spec_.signed_input
            ? quantize_act_codes(x.data() + off, len, u_a_.value[0], spec_.act_bits,
                                 reinterpret_cast<int8_t*>(out))
            : quantize_act_codes(x.data() + off, len, u_a_.value[0], spec_.act_bits, out);
  });
  // A NaN input has no code: the step is reported non-finite, as a NaN in dL/dY is.
  for (int64_t c : piece_count_) ctx_->nonfinite += c;
  const Grid g = grid();
  return g.sa * g.sw;
}

void QuantizedOp::act_backward(const Tensor& x, const float* dxhat, Tensor* dx) {
  profile::Scope scope("quant: act backward");
  Tensor* out = dx ? dx : &dx_unused_;  // u_A needs the pass even when dx is not wanted
  out->resize(x.shape());
  const int64_t n = x.dim(0), per = x.numel() / std::max<int64_t>(1, n);
  const BatchParts parts{n};
  du_parts_.resize(static_cast<size_t>(parts.count()));
  parallel_for(parts.count(), [&](int64_t p) {
    const int64_t off = parts.begin(p) * per;
    du_parts_[static_cast<size_t>(p)] =
        act_quant_backward(x.data() + off, (parts.end(p) - parts.begin(p)) * per, u_a_.value[0],
                           spec_.act_bits, spec_.signed_input, dxhat + off, out->data() + off);
  });
  double du = 0.0;  // part order
  for (double v : du_parts_) du += v;
  u_a_.grad[0] += static_cast<float>(du);
}

void QuantizedOp::weight_backward(Param& w, const float* dwhat) {
  profile::Scope scope("quant: weight backward");
  const int64_t n = w.value.numel(), blocks = (n + kWeightBlock - 1) / kWeightBlock;
  ds_parts_.resize(static_cast<size_t>(blocks));
  parallel_for(blocks, [&](int64_t b) {
    const int64_t i0 = b * kWeightBlock;
    ds_parts_[static_cast<size_t>(b)] =
        weight_quant_backward(w.value.data() + i0, std::min(kWeightBlock, n - i0), s_w_.value[0],
                              spec_.weight_bits, dwhat + i0, w.grad.data() + i0);
  });
  double ds = 0.0;  // block order
  for (double v : ds_parts_) ds += v;
  s_w_.grad[0] += static_cast<float>(ds);
}

void QuantizedOp::set_gemm_isa(math::IgemmIsa isa) {
  INT4DDP_CHECK(math::igemm_isa_available(isa), op_name_, ": integer GEMM instruction set ",
                math::igemm_isa_name(isa), " is not available on this CPU");
  gemm_isa_ = isa;
}

void QuantizedOp::commit_step(bool apply) {
  if (grad_.has_pending && apply) grad_.policy->observe(grad_.pending);
  grad_.has_pending = false;
}

// ---- QLinear ----------------------------------------------------------------------------------

QLinear::QLinear(std::string name, int64_t in, int64_t out, bool bias, const QuantSpec& spec,
                 uint32_t layer_id, QuantContext* ctx)
    : Linear(name, in, out, bias), QuantizedOp(name, spec, layer_id, ctx) {}

std::vector<Param*> QLinear::params() {
  std::vector<Param*> p = Linear::params();
  p.push_back(&s_w_);
  p.push_back(&u_a_);
  return p;
}

void QLinear::forward(const Tensor& x, Tensor& y, bool train) {
  const int64_t n = x.dim(0);
  INT4DDP_CHECK(x.numel() == n * in_, name_, ": input ", shape_str(x.shape()), " does not have ",
                in_, " features");
  const float scale = quantize_operands(x, weight_, train);
  const Grid g = grid();
  y.resize({n, out_});
  // With an igemm ISA, X's codes are packed once (as A: any codes) for every feature block, not
  // once per block; W^T's block is packed as B (int8 codes) in its block.
  const CodeMatrix xa = act_operand(xq_.data(), in_, g.qa, signed_input());
  const bool packed = gemm_isa_ != math::IgemmIsa::kRef;
  if (packed) x_rows_.pack(gemm_isa_, n, in_, xa);
  for_feature_blocks(out_, [&](int64_t j0, int64_t j1) {
    const CodeMatrix wt = math::codes_s8(wq_.data() + j0 * in_, in_, g.qw, Trans::kYes);
    if (packed) {
      thread_local math::IgemmPackedB wb;
      wb.pack(gemm_isa_, in_, j1 - j0, wt);
      math::igemm_packed(x_rows_, wb, scale, false, y.data() + j0, out_);
    } else {
      code_gemm(gemm_isa_, n, j1 - j0, in_, xa, wt, scale, false, y.data() + j0, out_);
    }
    if (has_bias_)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = j0; j < j1; ++j) y[i * out_ + j] += bias_.value[j];
  });
}

void QLinear::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0);
  const float dg = quantize_grad(dy, &gq_);
  const Grid g = grid();
  // dW^ (out, in) = G^T (out, n) X^ (n, in); X's codes packed once as B where they fit int8.
  scratch_.resize(static_cast<size_t>(std::max(out_, n) * in_));
  const CodeMatrix xb = act_operand(xq_.data(), in_, g.qa, signed_input());
  const bool packed = gemm_isa_ != math::IgemmIsa::kRef && math::igemm_fits_s8(xb);
  if (packed) x_cols_.pack(gemm_isa_, n, in_, xb);
  for_feature_blocks(out_, [&](int64_t j0, int64_t j1) {
    const CodeMatrix gt = math::codes_s8(gq_.data() + j0, out_, g.qg, Trans::kYes);
    if (packed) {
      thread_local math::IgemmPackedA ga;
      ga.pack(gemm_isa_, j1 - j0, n, gt);
      math::igemm_packed(ga, x_cols_, dg * g.sa, false, scratch_.data() + j0 * in_, in_);
    } else {
      code_gemm(gemm_isa_, j1 - j0, in_, n, gt, xb, dg * g.sa, false, scratch_.data() + j0 * in_,
                in_);
    }
  });
  weight_backward(weight_, scratch_.data());
  if (has_bias_)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < out_; ++j)
        bias_.grad[j] += static_cast<float>(gq_[static_cast<size_t>(i * out_ + j)]) * dg;
  // dX^ (n, in) = G^ (n, out) W^ (out, in); u_A's gradient needs it even without dx.
  for_feature_blocks(in_, [&](int64_t c0, int64_t c1) {
    code_gemm(gemm_isa_, n, c1 - c0, out_, math::codes_s8(gq_.data(), out_, g.qg),
              math::codes_s8(wq_.data() + c0, in_, g.qw), dg * g.sw, false, scratch_.data() + c0,
              in_);
  });
  act_backward(x, scratch_.data(), dx);
}

// ---- QConv2d ----------------------------------------------------------------------------------

QConv2d::QConv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad,
                 const QuantSpec& spec, uint32_t layer_id, QuantContext* ctx)
    : Conv2d(name, in, out, kernel, stride, pad, false), QuantizedOp(name, spec, layer_id, ctx) {}

std::vector<Param*> QConv2d::params() { return {&weight_, &s_w_, &u_a_}; }

void QConv2d::forward(const Tensor& x, Tensor& y, bool train) {
  INT4DDP_CHECK(x.rank() == 4 && x.dim(1) == in_, name_, ": input ", shape_str(x.shape()),
                " is not (n, ", in_, ", h, w)");
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = out_size(h), wo = out_size(w), ckk = in_ * kernel_ * kernel_, hw = ho * wo;
  INT4DDP_CHECK(ho > 0 && wo > 0, name_, ": input ", shape_str(x.shape()), " is too small");
  const float scale = quantize_operands(x, weight_, train);
  const Grid g = grid();
  y.resize({n, out_, ho, wo});
  const int64_t gmax = part_group_size(n, ckk, hw);
  const BatchParts parts{n};
  if (fp32_direct3x3(direct3x3(), gemm_isa_)) {  // exact on the codes: scale * float(T)
    scratch_.resize(wq_.size());
    codes_to_floats(wq_.data(), static_cast<int64_t>(wq_.size()), scratch_.data());
    w3_.pack(scratch_.data(), out_, in_);
    xf_.resize(xq_.size());
    math::Conv3x3Options o;
    o.scale = scale;
    o.codes = {g.qa, g.qw};
    const int64_t ihw = h * w;
    parallel_for(parts.count(), [&](int64_t p) {
      const int64_t s0 = parts.begin(p), len = (parts.end(p) - s0) * in_ * ihw;
      float* xp = xf_.data() + s0 * in_ * ihw;
      if (signed_input())
        codes_to_floats(reinterpret_cast<const int8_t*>(xq_.data()) + s0 * in_ * ihw, len, xp);
      else
        codes_to_floats(xq_.data() + s0 * in_ * ihw, len, xp);
      math::conv3x3_forward({parts.end(p) - s0, in_, out_, h, w}, xp, w3_,
                            y.data() + s0 * out_ * hw, o);
    });
    return;
  }
  // 3x3 stride 1 pad 1: the implicit-GEMM integer convolution (math::iconv3x3, no column pass)
  // where it runs (an igemm ISA; AVX512-VNNI, or AVX2 with int16 pair sums that cannot saturate).
  if (gemm_isa_ != math::IgemmIsa::kRef && kernel_ == 3 && stride_ == 1 && pad_ == 1) {
    math::Iconv3x3Weights& wi = w_iconv_fwd_;
    wi.pack(wq_.data(), out_, in_, g.qw);
    if (math::iconv3x3_supports(wi, g.qa, signed_input())) {
      parallel_for(parts.count(), [&](int64_t p) {
        for (int64_t s = parts.begin(p); s < parts.end(p); ++s)
          math::iconv3x3(wi, h, w, xq_.data() + s * in_ * h * w, signed_input(), g.qa, scale,
                         y.data() + s * out_ * hw, hw);
      });
      return;
    }
  }
  // The packed-panel path: W packed once, each group's columns written straight into panels.
  const bool packed = gemm_isa_ != math::IgemmIsa::kRef && g.qa <= 127;
  if (packed) w_fwd_.pack(gemm_isa_, out_, ckk, math::codes_s8(wq_.data(), ckk, g.qw));
  const math::ConvColumns geo{in_, h, w, kernel_, stride_, pad_, ho, wo};
  parallel_for(parts.count(), [&](int64_t p) {
    GroupScratch& sc = group_scratch();
    uint8_t* col = packed ? nullptr : grow_scratch_as<uint8_t>(sc.col, ckk * gmax * hw);
    float* buf = grow_scratch(sc.out, out_ * gmax * hw);
    thread_local math::IgemmPackedB panels;
    for (int64_t s0 = parts.begin(p); s0 < parts.end(p); s0 += gmax) {
      const int64_t gs = std::min(gmax, parts.end(p) - s0), cols = gs * hw;
      float* yg = gs == 1 ? y.data() + s0 * out_ * hw : buf;  // one sample: in place
      if (packed) {
        math::igemm_pack_conv(gemm_isa_, geo, xq_.data(), !signed_input(), g.qa, s0, gs, &panels,
                              nullptr);
        math::igemm_packed(w_fwd_, panels, scale, false, yg, cols);
      } else {
        im2col(xq_.data(), s0, gs, h, w, col);  // zero padding is code 0
        code_gemm(gemm_isa_, out_, cols, ckk, math::codes_s8(wq_.data(), ckk, g.qw),
                  act_operand(col, cols, g.qa, signed_input()), scale, false, yg, cols);
      }
      if (gs > 1) scatter_group(yg, s0, gs, out_, hw, y.data());
    }
  });
}

void QConv2d::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t hw = y.dim(2) * y.dim(3), ihw = h * w, wsize = weight_.value.numel();
  const float dg = quantize_grad(dy, &gq_);
  const Grid g = grid();
  // dW^ is summed over groups as exact integers (int_gemm with unit scale) in double, then scaled
  // once; dX^ (the input's shape) is needed even without dx, for u_A's gradient.
  dw_acc_.resize(static_cast<size_t>(num_threads()));
  parallel_for(static_cast<int64_t>(dw_acc_.size()), [&](int64_t t) {
    dw_acc_[static_cast<size_t>(t)].assign(static_cast<size_t>(wsize), 0.0);
  });
  Tensor& dxhat = dxhat_;  // reused across steps: a fresh 1-10 MB buffer per step page-faults
  dxhat.resize(x.shape());
  std::vector<float>& dwhat = dwhat_;  // reused: a fresh buffer per call page-faults
  dwhat.resize(static_cast<size_t>(wsize));
  const float wscale = dg * g.sa;
  const BatchParts parts{n};
  bool transposed = false;  // dW^ came with its taps flipped (see Conv2d::backward_by_groups)
  if (fp32_direct3x3(direct3x3(), gemm_isa_)) {
    // Direct 3x3: dX^ per part, dW^ as exact integer sums (doubles) into the thread's accumulator,
    // which no summation order can change. w3_ holds wq_ packed by forward and xf_ forward's float
    // copy of xq_ (the GEMM path reads the same wq_ and xq_ of forward).
    math::Conv3x3Options o;
    o.scale = dg * g.sw;
    o.codes = {g.qg, g.qw};
    if (static_cast<int64_t>(g3_.size()) < parts.count())
      g3_.resize(static_cast<size_t>(parts.count()));
    gf_.resize(gq_.size());
    parallel_for(parts.count(), [&](int64_t p) {
      const int64_t s0 = parts.begin(p);
      const math::Conv3x3Shape sh{parts.end(p) - s0, in_, out_, h, w};
      float* gp = gf_.data() + s0 * out_ * hw;
      codes_to_floats(gq_.data() + s0 * out_ * hw, sh.n * out_ * hw, gp);
      math::conv3x3_backward_data(sh, gp, w3_, dxhat.data() + s0 * in_ * ihw, o);
      math::Conv3x3WeightGrad& g3 = g3_[static_cast<size_t>(p)];
      g3.reset(out_, in_, {g.qa, g.qg});
      g3.add(sh, xf_.data() + s0 * in_ * ihw, gp);  // xf_: forward's float copy of xq_
      g3.finish_exact(dw_acc_[static_cast<size_t>(thread_index())].data());
    });
  } else {
    // As Conv2d::backward, on the codes: each group's dW^ product is an exact integer sum (unit
    // scale), added into the thread's double accumulator; dX^ products carry dg * sw.
    // x's codes travel as bytes (uint8_t, also on the signed grid), dy's and W's as int8_t.
    struct CodeProducts {
      math::IgemmIsa isa;
      int qx, qw, qdy;
      bool x_signed;
      float dx_scale;
      int64_t wsize;
      std::vector<std::vector<double>>* acc;  // (threads, wsize) exact dW^ sums
      CodeMatrix operand(const uint8_t* x, int64_t ld, Trans t) const {
        return act_operand(x, ld, qx, x_signed, t);
      }
      CodeMatrix operand(const int8_t* dy, int64_t ld, Trans t) const {
        return math::codes_s8(dy, ld, qdy, t);
      }
      // A (m, k) B (n, k)^T: x's codes and dy's, in either order (a local class has no member
      // templates).
      void weight_product(int64_t, bool, int64_t m, int64_t n, int64_t k, const uint8_t* a,
                          const int8_t* b, bool) {
        weight_sum(m, n, k, operand(a, k, Trans::kNo), operand(b, k, Trans::kYes));
      }
      void weight_product(int64_t, bool, int64_t m, int64_t n, int64_t k, const int8_t* a,
                          const uint8_t* b, bool) {
        weight_sum(m, n, k, operand(a, k, Trans::kNo), operand(b, k, Trans::kYes));
      }
      void weight_sum(int64_t m, int64_t n, int64_t k, const CodeMatrix& a, const CodeMatrix& b) {
        float* dwg = grow_scratch(group_scratch().dw, wsize);
        code_gemm(isa, m, n, k, a, b, 1.0f, false, dwg, n);
        double* sum = (*acc)[static_cast<size_t>(thread_index())].data();
        for (int64_t i = 0; i < wsize; ++i) sum[i] += dwg[i];
      }
      void data_product(Trans tw, int64_t m, int64_t n, int64_t k, const int8_t* w, const int8_t* d,
                        float* c) const {
        code_gemm(isa, m, n, k, math::codes_s8(w, tw == Trans::kNo ? k : m, qw, tw),
                  math::codes_s8(d, n, qdy), dx_scale, false, c, n);
      }
      // The packed-panel path (packed: an igemm ISA and x's codes fit int8): each group's
      // columns straight into panels, the products on them and on w_bwd (the weights packed once
      // as the data product's A: flipped (in, out*k*k) or W^T (in*k*k, out)).
      bool packed;
      const math::IgemmPackedA* w_bwd;
      math::ConvColumns x_geo, dy_geo;  // x's columns, and the transposed path's columns of dy
      const uint8_t* x_codes;
      const int8_t* dy_codes;
      void packed_weight_sum(const math::IgemmPackedA& a, const math::IgemmPackedB& b) {
        float* dwg = grow_scratch(group_scratch().dw, wsize);
        math::igemm_packed(a, b, 1.0f, false, dwg, b.cols);
        double* sum = (*acc)[static_cast<size_t>(thread_index())].data();
        for (int64_t i = 0; i < wsize; ++i) sum[i] += dwg[i];
      }
      // Not null: dx by the implicit-GEMM convolution of dy with these (transposed) weights, and
      // only the transposed columns (for dW) are built. wgrad_sums not null: dW by
      // iconv3x3_wgrad too (no columns at all), exact sums per thread slot (reset by the
      // caller), added to dW^ after.
      const math::Iconv3x3Weights* w_iconv;
      std::vector<math::Iconv3x3WgradSum>* wgrad_sums;
      bool dy_columns_products(int64_t, bool, int64_t s0, int64_t g, const uint8_t* xg,
                               float* dxg) {
        if (!packed) return false;
        const int64_t icols = dy_geo.cols(g), dy_size = dy_geo.channels * dy_geo.h * dy_geo.w;
        if (wgrad_sums) {
          math::Iconv3x3WgradSum& sum = (*wgrad_sums)[static_cast<size_t>(thread_index())];
          const int64_t x_size = x_geo.channels * x_geo.h * x_geo.w;
          sum.add(x_geo.h, x_geo.w, g, x_codes + s0 * x_size, x_signed, qx, dy_codes + s0 * dy_size,
                  qdy);
        } else {
          thread_local math::IgemmPackedB cols, cols_t;
          thread_local math::IgemmPackedA xa;
          math::igemm_pack_conv(isa, dy_geo, dy_codes, false, qdy, s0, g, w_iconv ? nullptr : &cols,
                                &cols_t);
          // dWt (in, out*k*k) = x_g (in, icols) cols^T; dx_g = flip(W) (in, out*k*k) cols.
          xa.pack(isa, x_geo.channels, icols, operand(xg, icols, Trans::kNo));
          packed_weight_sum(xa, cols_t);
          if (!w_iconv) {
            math::igemm_packed(*w_bwd, cols, dx_scale, false, dxg, icols);
            return true;
          }
        }
        const int64_t ihw = dy_geo.ho * dy_geo.wo;
        for (int64_t s = 0; s < g; ++s)  // dx_g (in, g * ihw): sample s at column s * ihw
          math::iconv3x3(*w_iconv, dy_geo.ho, dy_geo.wo, dy_codes + (s0 + s) * dy_size, true, qdy,
                         dx_scale, dxg + s * ihw, icols);
        return true;
      }
      bool x_columns_products(int64_t, bool, int64_t s0, int64_t g, const int8_t* dyg,
                              float* dcol) {
        if (!packed) return false;
        thread_local math::IgemmPackedB cols_t, dyb;
        thread_local math::IgemmPackedA dya;
        math::igemm_pack_conv(isa, x_geo, x_codes, !x_signed, qx, s0, g, nullptr, &cols_t);
        const int64_t cols = x_geo.cols(g), out = dy_geo.channels;
        // dW (out, in*k*k) = dy_g (out, cols) cols_t; dcol (in*k*k, cols) = W^T dy_g.
        dya.pack(isa, out, cols, math::codes_s8(dyg, cols, qdy));
        packed_weight_sum(dya, cols_t);
        if (!dcol) return true;
        dyb.pack(isa, out, cols, math::codes_s8(dyg, cols, qdy));
        math::igemm_packed(*w_bwd, dyb, dx_scale, false, dcol, cols);
        return true;
      }
    };
    const bool by_dy = dx_by_transposed_conv();  // backward_by_groups' path (dX^ always wanted)
    const bool packed = gemm_isa_ != math::IgemmIsa::kRef && (by_dy || g.qa <= 127);
    math::Iconv3x3Weights& w_iconv = w_iconv_bwd_;
    bool iconv = false;
    if (packed && by_dy && kernel_ == 3 && stride_ == 1 && pad_ == 1) {
      w_iconv.pack_transposed(wq_.data(), out_, in_, g.qw);
      iconv = math::iconv3x3_supports(w_iconv, g.qg, true);
    }
    if (packed && by_dy && !iconv) {
      w_flip_.resize(wq_.size());
      flip_weight(wq_.data(), w_flip_.data());
      const int64_t okk = out_ * kernel_ * kernel_;
      w_bwd_.pack(gemm_isa_, in_, okk, math::codes_s8(w_flip_.data(), okk, g.qw));
    } else if (packed && !by_dy) {
      const int64_t ckk = in_ * kernel_ * kernel_;
      w_bwd_.pack(gemm_isa_, ckk, out_, math::codes_s8(wq_.data(), ckk, g.qw, Trans::kYes));
    }
    const int64_t ho = y.dim(2), wo = y.dim(3);
    const bool wgrad_iconv =
        iconv && math::iconv3x3_wgrad_supports(h, w, g.qa, signed_input(), g.qg);
    if (wgrad_iconv) {  // one exact sum per thread slot, so finish runs once per thread
      wgrad_sums_.resize(static_cast<size_t>(num_threads()));
      for (math::Iconv3x3WgradSum& sum : wgrad_sums_) sum.reset(in_, out_);
    }
    CodeProducts products{gemm_isa_,
                          g.qa,
                          g.qw,
                          g.qg,
                          signed_input(),
                          dg * g.sw,
                          wsize,
                          &dw_acc_,
                          packed,
                          &w_bwd_,
                          {in_, h, w, kernel_, stride_, pad_, ho, wo},
                          {out_, ho, wo, kernel_, 1, kernel_ - 1 - pad_, h, w},
                          xq_.data(),
                          gq_.data(),
                          iconv ? &w_iconv : nullptr,
                          wgrad_iconv ? &wgrad_sums_ : nullptr};
    transposed =
        backward_by_groups(n, h, w, xq_.data(), gq_.data(), wq_.data(), dxhat.data(), products);
    if (wgrad_iconv)  // exact integer sums: any order
      for (const math::Iconv3x3WgradSum& sum : wgrad_sums_)
        sum.finish(/*transposed=*/true, dw_acc_[0].data());
  }
  // dW^ = wscale * (the threads' exact sums added, in thread order), un-flipped where transposed;
  // output channels in parallel (each element's sum is the same whoever computes it).
  const int k = kernel_;
  parallel_for(out_, [&](int64_t o) {
    for (int64_t c = 0; c < in_; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          const int64_t i = ((o * in_ + c) * k + ky) * k + kx;
          const size_t src = static_cast<size_t>(transposed ? flipped_index(o, c, ky, kx) : i);
          double total = dw_acc_[0][src];
          for (size_t t = 1; t < dw_acc_.size(); ++t) total += dw_acc_[t][src];
          dwhat[static_cast<size_t>(i)] = wscale * static_cast<float>(total);
        }
  });
  weight_backward(weight_, dwhat.data());
  act_backward(x, dxhat.data(), dx);
}

}  // namespace int4ddp::nn
