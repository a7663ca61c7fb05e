// Direct 3x3 convolution: the driver (validation, ISA dispatch, weight packing, the exact splits
// for integer codes) and the plain reference loops. The inner kernels live in conv3x3_portable.cpp
// and conv3x3_avx512.cpp behind the table of conv3x3_kernels.h.
#include "kernels/math/conv3x3.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>

#include "kernels/common/error.h"
#include "kernels/math/conv3x3_kernels.h"

namespace int4ddp::math {

namespace detail {

Conv3x3Plane make_plane(int64_t h, int64_t w) {
  Conv3x3Plane g;
  g.h = h;
  g.w = w;
  g.row = w + 1;
  g.outputs = h * g.row;
  g.vecs = (g.outputs + 15) / 16;
  const int64_t span = (g.outputs + 63) / 64 * 64;  // the portable kernel's 64-position tiles
  g.stride = (span + 2 * g.row + 2 + 15) / 16 * 16;
  g.qcount = (h + 2) * g.row + 1;
  return g;
}

}  // namespace detail

namespace {

using detail::Conv3x3Kernels;
using detail::Conv3x3Plane;

constexpr int kMaxCode = 255;  // largest supported code magnitude (unsigned 8-bit activations)
constexpr int64_t kExactLimit = (int64_t{1} << 24) - 1;  // fp32 integers are exact up to 2^24

// 64-byte aligned, grow-only float/double storage.
template <typename T>
class AlignedBuf {
 public:
  ~AlignedBuf() { std::free(p_); }
  T* get(int64_t count) {
    if (count > cap_) {
      std::free(p_);
      const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!p_) throw std::bad_alloc();
      cap_ = count;
    }
    return p_;
  }
  int64_t bytes() const { return cap_ * static_cast<int64_t>(sizeof(T)); }

 private:
  T* p_ = nullptr;
  int64_t cap_ = 0;
};

}  // namespace

struct Conv3x3Workspace::Buffers {
  AlignedBuf<float> planes;   // (channels, stride) padded input planes of one sample
  AlignedBuf<float> xt;       // (qcount, c) transposed padded input of one sample (dW)
  AlignedBuf<float> part;     // exact pieces / kernel scratch
  AlignedBuf<int64_t> total;  // exact totals of the split forward / backward_data
  AlignedBuf<float> accf;     // (k, 9, c) fp32 dW accumulator
  AlignedBuf<double> accd;    // (k, 9, c) dW accumulator of exact integers
};

namespace {

bool env_forces_portable() {
  const char* env = std::getenv("INT4DDP_ISA");
  return env && std::string(env) == "portable";
}

const Conv3x3Kernels& kernels_for(Conv3x3Isa isa) {
  switch (conv3x3_resolve(isa)) {
    case Conv3x3Isa::kAvx512:
#if defined(INT4DDP_HAVE_AVX512)
      return detail::kConv3x3Avx512;
#else
      break;
#endif
    default:
      break;
  }
  return detail::kConv3x3Portable;
}

void check_common(const Conv3x3Shape& s, const Conv3x3Options& opt, const char* what) {
  INT4DDP_CHECK(s.n >= 0 && s.c >= 0 && s.k >= 0 && s.h >= 0 && s.w >= 0, what,
                ": negative size n=", s.n, " c=", s.c, " k=", s.k, " h=", s.h, " w=", s.w);
  const Conv3x3Codes& q = opt.codes;
  INT4DDP_CHECK(
      !q.enabled() ||
          (q.qmax_a >= 1 && q.qmax_a <= kMaxCode && q.qmax_b >= 1 && q.qmax_b <= kMaxCode),
      what, ": code bounds (", q.qmax_a, ", ", q.qmax_b, ") must both lie in 1..", kMaxCode);
}

bool empty(const Conv3x3Shape& s) {
  return s.n == 0 || s.c == 0 || s.k == 0 || s.h == 0 || s.w == 0;
}

// out (=, or +=) scale * (float)T for every element of an exact integer total.
template <typename Int>
void store_exact(const Int* total, int64_t count, float scale, bool accumulate, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const float v = scale * static_cast<float>(total[i]);
    out[i] = accumulate ? out[i] + v : v;
  }
}

// The product that is zero because a reduction is empty (c == 0 or k == 0): out = 0, or unchanged.
void store_zero(int64_t count, bool accumulate, float* out) {
  if (!accumulate) std::fill(out, out + count, 0.0f);
}

// forward and backward_data share everything but the packed weights: out (n, co, h, w) from
// in (n, ci, h, w).
void spatial_conv(const Conv3x3Shape& s, int64_t ci, int64_t co, const float* in,
                  const float* packed, float* out, const Conv3x3Options& opt, Conv3x3Workspace* ws,
                  const char* what) {
  const int64_t hw = s.h * s.w;
  if (s.n == 0 || co == 0 || hw == 0) return;
  INT4DDP_CHECK(out, what, ": null output");
  if (ci == 0) return store_zero(s.n * co * hw, opt.accumulate, out);
  INT4DDP_CHECK(in, what, ": null input");
  thread_local Conv3x3Workspace local;
  Conv3x3Workspace::Buffers& b = (ws ? ws : &local)->buffers();
  const Conv3x3Kernels& kern = kernels_for(opt.isa);
  const Conv3x3Plane g = detail::make_plane(s.h, s.w);
  float* planes = b.planes.get(ci * g.stride);
  // Input channels per exact piece (all of them for fp32).
  const int64_t piece =
      opt.codes.enabled() ? std::max<int64_t>(1, conv3x3_exact_terms(opt.codes) / 9) : ci;
  for (int64_t n = 0; n < s.n; ++n) {
    kern.pad(in + n * ci * hw, ci, g, planes);
    float* o = out + n * co * hw;
    if (piece >= ci) {
      kern.spatial(planes, g, ci, 0, ci, co, packed, opt.scale, opt.accumulate, o);
      continue;
    }
    float* part = b.part.get(co * hw);
    int64_t* total = b.total.get(co * hw);
    std::fill(total, total + co * hw, int64_t{0});
    for (int64_t c0 = 0; c0 < ci; c0 += piece) {
      kern.spatial(planes, g, ci, c0, std::min(ci, c0 + piece), co, packed, 1.0f, false, part);
      for (int64_t i = 0; i < co * hw; ++i) total[i] += static_cast<int64_t>(part[i]);
    }
    store_exact(total, co * hw, opt.scale, opt.accumulate, o);
  }
}

void check_weights(const Conv3x3Shape& s, const Conv3x3Weights& w, const char* what) {
  INT4DDP_CHECK(w.k() == s.k && w.c() == s.c, what, ": weights packed for (k=", w.k(),
                ", c=", w.c(), ") but the shape has k=", s.k, " c=", s.c);
}

// acc (k, 9, c) += the sums over the samples of the chunk; Acc = float (fp32) or double (codes).
template <typename Acc>
void wgrad_accumulate(const Conv3x3Shape& s, const float* x, const float* dy,
                      const Conv3x3Options& opt, Conv3x3Workspace::Buffers& b, Acc* acc) {
  const Conv3x3Kernels* kern = &kernels_for(opt.isa);
  if (s.c % kern->wgrad_c_multiple != 0) kern = &detail::kConv3x3Portable;
  const Conv3x3Plane g = detail::make_plane(s.h, s.w);
  float* xt = b.xt.get(g.qcount * s.c);
  float* scratch = b.part.get(s.k * 9 * s.c);
  int64_t rows;
  if (opt.codes.enabled()) {
    rows = conv3x3_exact_terms(opt.codes) / s.w;  // >= 1: checked by the caller
  } else {
    // fp32: rows whose transposed input (plus the two halo rows) stays in about 24 KiB of L1.
    rows = std::max<int64_t>(1, (int64_t{24} << 10) / (g.row * s.c * 4) - 2);
  }
  const int64_t hw = s.h * s.w;
  for (int64_t n = 0; n < s.n; ++n) {
    kern->transpose(x + n * s.c * hw, s.c, g, xt);
    for (int64_t y0 = 0; y0 < s.h; y0 += rows) {
      const int64_t y1 = std::min(s.h, y0 + rows);
      if constexpr (std::is_same_v<Acc, double>)
        kern->wgrad_d(xt, dy + n * s.k * hw, g, s.c, s.k, y0, y1, acc, scratch);
      else
        kern->wgrad_f(xt, dy + n * s.k * hw, g, s.c, s.k, y0, y1, acc, scratch);
    }
  }
}

// The exact int64 dW sum of one weight (the reference's loop).
int64_t wgrad_ref_sum(const Conv3x3Shape& s, const float* x, const float* dy, int64_t o, int64_t ch,
                      int t) {
  const int64_t hw = s.h * s.w;
  const int ky = t / 3, kx = t % 3;
  int64_t sum = 0;
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t i = 0; i < s.h; ++i)
      for (int64_t j = 0; j < s.w; ++j) {
        const int64_t iy = i + ky - 1, ix = j + kx - 1;
        if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) continue;
        sum += static_cast<int64_t>(dy[(n * s.k + o) * hw + i * s.w + j]) *
               static_cast<int64_t>(x[(n * s.c + ch) * hw + iy * s.w + ix]);
      }
  return sum;
}

// Whether the exact dW path can split the pixel sum into whole image rows.
bool wgrad_rows_fit(const Conv3x3Shape& s, const Conv3x3Options& opt) {
  return !opt.codes.enabled() || s.w <= conv3x3_exact_terms(opt.codes);
}

}  // namespace

// ---- Workspace and weights -------------------------------------------------------------------

Conv3x3Workspace::Conv3x3Workspace() : b_(new Buffers) {}
Conv3x3Workspace::~Conv3x3Workspace() { delete b_; }
int64_t Conv3x3Workspace::bytes() const {
  return b_->planes.bytes() + b_->xt.bytes() + b_->part.bytes() + b_->total.bytes() +
         b_->accf.bytes() + b_->accd.bytes();
}

void Conv3x3Weights::pack(const float* w, int64_t k, int64_t c) {
  INT4DDP_CHECK(k >= 0 && c >= 0, "conv3x3: negative weight shape k=", k, " c=", c);
  INT4DDP_CHECK(w || k * c == 0, "conv3x3: null weights");
  k_ = k;
  c_ = c;
  const size_t count = static_cast<size_t>(k * c * 9);
  plain_.assign(w, w + count);
  fwd_.resize(count);
  bwd_.resize(count);
  // Forward: output channel o = kb + j, input channel ch, tap t.
  for (int64_t kb = 0; kb < k; kb += kBlock) {
    const int64_t nk = std::min<int64_t>(kBlock, k - kb);
    for (int64_t ch = 0; ch < c; ++ch)
      for (int t = 0; t < 9; ++t)
        for (int64_t j = 0; j < nk; ++j)
          fwd_[static_cast<size_t>(kb * c * 9 + (ch * 9 + t) * nk + j)] =
              w[((kb + j) * c + ch) * 9 + t];
  }
  // Backward data: output channel ch = cb + j (an input channel of W), reduced over o, taps
  // flipped: W'[ch, o, t] = W[o, ch, 8 - t].
  for (int64_t cb = 0; cb < c; cb += kBlock) {
    const int64_t nc = std::min<int64_t>(kBlock, c - cb);
    for (int64_t o = 0; o < k; ++o)
      for (int t = 0; t < 9; ++t)
        for (int64_t j = 0; j < nc; ++j)
          bwd_[static_cast<size_t>(cb * k * 9 + (o * 9 + t) * nc + j)] =
              w[(o * c + cb + j) * 9 + (8 - t)];
  }
}

// ---- ISA selection ---------------------------------------------------------------------------

const char* conv3x3_isa_name(Conv3x3Isa isa) {
  switch (isa) {
    case Conv3x3Isa::kAuto:
      return "auto";
    case Conv3x3Isa::kPortable:
      return "portable";
    case Conv3x3Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

bool conv3x3_isa_available(Conv3x3Isa isa) {
  switch (isa) {
    case Conv3x3Isa::kAuto:
    case Conv3x3Isa::kPortable:
      return true;
    case Conv3x3Isa::kAvx512:
#if defined(INT4DDP_HAVE_AVX512)
      return __builtin_cpu_supports("avx512f");
#else
      return false;
#endif
  }
  return false;
}

Conv3x3Isa conv3x3_resolve(Conv3x3Isa isa) {
  if (isa == Conv3x3Isa::kAuto) {
    static const Conv3x3Isa best =
        !env_forces_portable() && conv3x3_isa_available(Conv3x3Isa::kAvx512)
            ? Conv3x3Isa::kAvx512
            : Conv3x3Isa::kPortable;
    return best;
  }
  INT4DDP_CHECK(conv3x3_isa_available(isa), "conv3x3: instruction set ", conv3x3_isa_name(isa),
                " is not available on this CPU or build");
  return isa;
}

int64_t conv3x3_exact_terms(const Conv3x3Codes& codes) {
  INT4DDP_CHECK(codes.qmax_a > 0 && codes.qmax_b > 0, "conv3x3: code bounds must be positive, got ",
                codes.qmax_a, " and ", codes.qmax_b);
  return std::max<int64_t>(1, kExactLimit / (int64_t{codes.qmax_a} * codes.qmax_b));
}

// ---- The products ----------------------------------------------------------------------------

void conv3x3_forward(const Conv3x3Shape& s, const float* x, const Conv3x3Weights& w, float* y,
                     const Conv3x3Options& opt, Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_forward");
  check_weights(s, w, "conv3x3_forward");
  spatial_conv(s, s.c, s.k, x, w.forward_packed(), y, opt, ws, "conv3x3_forward");
}

void conv3x3_backward_data(const Conv3x3Shape& s, const float* dy, const Conv3x3Weights& w,
                           float* dx, const Conv3x3Options& opt, Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_backward_data");
  check_weights(s, w, "conv3x3_backward_data");
  spatial_conv(s, s.k, s.c, dy, w.backward_packed(), dx, opt, ws, "conv3x3_backward_data");
}

void conv3x3_backward_weight(const Conv3x3Shape& s, const float* x, const float* dy, float* dw,
                             const Conv3x3Options& opt, Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_backward_weight");
  const int64_t count = s.k * s.c * 9;
  if (count == 0) return;
  INT4DDP_CHECK(dw, "conv3x3_backward_weight: null dW");
  if (empty(s)) return store_zero(count, opt.accumulate, dw);
  INT4DDP_CHECK(x && dy, "conv3x3_backward_weight: null tensor");
  if (!wgrad_rows_fit(s, opt)) return conv3x3_backward_weight_ref(s, x, dy, dw, opt);
  thread_local Conv3x3Workspace local;
  Conv3x3Workspace::Buffers& b = (ws ? ws : &local)->buffers();
  auto finish = [&](const auto* acc) {
    // acc (k, 9, c) -> dw (k, c, 3, 3)
    for (int64_t o = 0; o < s.k; ++o)
      for (int64_t ch = 0; ch < s.c; ++ch)
        for (int t = 0; t < 9; ++t) {
          const float v = opt.scale * static_cast<float>(acc[(o * 9 + t) * s.c + ch]);
          float& d = dw[(o * s.c + ch) * 9 + t];
          d = opt.accumulate ? d + v : v;
        }
  };
  if (opt.codes.enabled()) {
    double* acc = b.accd.get(count);
    std::fill(acc, acc + count, 0.0);
    wgrad_accumulate(s, x, dy, opt, b, acc);
    finish(acc);
  } else {
    float* acc = b.accf.get(count);
    std::fill(acc, acc + count, 0.0f);
    wgrad_accumulate(s, x, dy, opt, b, acc);
    finish(acc);
  }
}

void conv3x3_backward_weight_exact(const Conv3x3Shape& s, const float* x, const float* dy,
                                   double* dw_sum, const Conv3x3Options& opt,
                                   Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_backward_weight_exact");
  INT4DDP_CHECK(opt.codes.enabled(), "conv3x3_backward_weight_exact: needs code bounds");
  const int64_t count = s.k * s.c * 9;
  if (count == 0 || empty(s)) return;
  INT4DDP_CHECK(x && dy && dw_sum, "conv3x3_backward_weight_exact: null tensor");
  thread_local Conv3x3Workspace local;
  Conv3x3Workspace::Buffers& b = (ws ? ws : &local)->buffers();
  double* acc = b.accd.get(count);
  if (!wgrad_rows_fit(s, opt)) {
    // Image rows too long to sum exactly in fp32 (never at these sizes): the int64 reference.
    for (int64_t o = 0; o < s.k; ++o)
      for (int64_t ch = 0; ch < s.c; ++ch)
        for (int t = 0; t < 9; ++t)
          dw_sum[(o * s.c + ch) * 9 + t] += static_cast<double>(wgrad_ref_sum(s, x, dy, o, ch, t));
    return;
  }
  std::fill(acc, acc + count, 0.0);
  wgrad_accumulate(s, x, dy, opt, b, acc);
  for (int64_t o = 0; o < s.k; ++o)
    for (int64_t ch = 0; ch < s.c; ++ch)
      for (int t = 0; t < 9; ++t) dw_sum[(o * s.c + ch) * 9 + t] += acc[(o * 9 + t) * s.c + ch];
}

// ---- References ------------------------------------------------------------------------------

namespace {

// One output element's sum, in double (fp32 operands) or int64 (codes), then the one rescale.
template <typename F>
void ref_store(bool codes, F&& terms, const Conv3x3Options& opt, float* out) {
  float v;
  if (codes) {
    int64_t acc = 0;
    terms([&](float a, float b) { acc += static_cast<int64_t>(a) * static_cast<int64_t>(b); });
    v = opt.scale * static_cast<float>(acc);
  } else {
    double acc = 0.0;
    terms([&](float a, float b) { acc += static_cast<double>(a) * b; });
    v = opt.scale * static_cast<float>(acc);
  }
  *out = opt.accumulate ? *out + v : v;
}

}  // namespace

void conv3x3_forward_ref(const Conv3x3Shape& s, const float* x, const float* w, float* y,
                         const Conv3x3Options& opt) {
  check_common(s, opt, "conv3x3_forward_ref");
  const int64_t hw = s.h * s.w;
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t o = 0; o < s.k; ++o)
      for (int64_t i = 0; i < s.h; ++i)
        for (int64_t j = 0; j < s.w; ++j)
          ref_store(
              opt.codes.enabled(),
              [&](auto&& add) {
                for (int64_t c = 0; c < s.c; ++c)
                  for (int ky = 0; ky < 3; ++ky)
                    for (int kx = 0; kx < 3; ++kx) {
                      const int64_t iy = i + ky - 1, ix = j + kx - 1;
                      if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) continue;
                      add(x[(n * s.c + c) * hw + iy * s.w + ix],
                          w[((o * s.c + c) * 3 + ky) * 3 + kx]);
                    }
              },
              opt, &y[(n * s.k + o) * hw + i * s.w + j]);
}

void conv3x3_backward_data_ref(const Conv3x3Shape& s, const float* dy, const float* w, float* dx,
                               const Conv3x3Options& opt) {
  check_common(s, opt, "conv3x3_backward_data_ref");
  const int64_t hw = s.h * s.w;
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t i = 0; i < s.h; ++i)
        for (int64_t j = 0; j < s.w; ++j)
          ref_store(
              opt.codes.enabled(),
              [&](auto&& add) {
                for (int64_t o = 0; o < s.k; ++o)
                  for (int ky = 0; ky < 3; ++ky)
                    for (int kx = 0; kx < 3; ++kx) {
                      const int64_t oy = i + 1 - ky, ox = j + 1 - kx;
                      if (oy < 0 || oy >= s.h || ox < 0 || ox >= s.w) continue;
                      add(dy[(n * s.k + o) * hw + oy * s.w + ox],
                          w[((o * s.c + c) * 3 + ky) * 3 + kx]);
                    }
              },
              opt, &dx[(n * s.c + c) * hw + i * s.w + j]);
}

void conv3x3_backward_weight_ref(const Conv3x3Shape& s, const float* x, const float* dy, float* dw,
                                 const Conv3x3Options& opt) {
  check_common(s, opt, "conv3x3_backward_weight_ref");
  const int64_t hw = s.h * s.w;
  for (int64_t o = 0; o < s.k; ++o)
    for (int64_t c = 0; c < s.c; ++c)
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx)
          ref_store(
              opt.codes.enabled(),
              [&](auto&& add) {
                for (int64_t n = 0; n < s.n; ++n)
                  for (int64_t i = 0; i < s.h; ++i)
                    for (int64_t j = 0; j < s.w; ++j) {
                      const int64_t iy = i + ky - 1, ix = j + kx - 1;
                      if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) continue;
                      add(dy[(n * s.k + o) * hw + i * s.w + j],
                          x[(n * s.c + c) * hw + iy * s.w + ix]);
                    }
              },
              opt, &dw[((o * s.c + c) * 3 + ky) * 3 + kx]);
}

}  // namespace int4ddp::math
