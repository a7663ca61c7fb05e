// Direct 3x3 convolution: the driver (validation, ISA dispatch, weight packing, the exact splits
// for integer codes) and the plain reference loops. The inner kernels live in conv3x3_portable.cpp
// conv3x3_avx2.cpp and conv3x3_avx512.cpp behind the table of conv3x3_kernels.h.
#include "kernels/math/conv3x3.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>

#include "kernels/common/error.h"
#include "kernels/math/conv3x3_kernels.h"
#include "kernels/quant/codec.h"

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
  AlignedBuf<float> planes;   // (channels, stride) padded planes of one sample (dW: a group)
  AlignedBuf<float> dy;       // dW from planes: (k, stride) padded dy planes of a group
  AlignedBuf<float> xt;       // (qcount, lanes) transposed padded operand of a group of samples
  AlignedBuf<float> part;     // a split forward's exact piece, or the portable dW's scratch
  AlignedBuf<int64_t> total;  // exact totals of the split forward / backward_data
  Conv3x3WeightGrad grad;     // the one-call conv3x3_backward_weight's sum
};

namespace {

// The codec's instruction set (INT4DDP_ISA, parsed once by the codec) caps the one chosen here:
// avx2 rules AVX-512 out, portable both vector paths.
bool codec_allows(Conv3x3Isa isa) {
  switch (isa) {
    case Conv3x3Isa::kAvx512:
      return quant::isa_allows(quant::Isa::kAvx512);
    case Conv3x3Isa::kAvx2:
      return quant::isa_allows(quant::Isa::kAvx2);
    default:
      return true;
  }
}

const Conv3x3Kernels& kernels_for(Conv3x3Isa isa) {
  switch (conv3x3_resolve(isa)) {
    case Conv3x3Isa::kAvx512:
#if defined(INT4DDP_HAVE_AVX512)
      return detail::kConv3x3Avx512;
#else
      break;
#endif
    case Conv3x3Isa::kAvx2:
#if defined(INT4DDP_HAVE_AVX2)
      return detail::kConv3x3Avx2;
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
                  const float* packed_spatial, const float* packed_lanes, float* out,
                  const Conv3x3Options& opt, Conv3x3Workspace* ws, const char* what) {
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
  // (the channels tiling addresses a vector of 16 output channels with int32 offsets c * h * w)
  const bool lanes_ok = kern.spatial_cl && co % 16 == 0 && hw <= (int64_t{1} << 26);
  // kAuto: the channel tiling where the spatial one would waste more than 15% of its lanes (7x7:
  // 23%, measured 10-15% slower there; 14x14: 12.5%, where spatial measured 5-10% faster because
  // the channel tiling's scattered stores miss more).
  const bool spatial_wasteful = s.h * s.w < 0.85 * static_cast<double>(g.vecs * 16);
  const bool lanes = lanes_ok && (opt.algo == Conv3x3Algo::kChannels ||
                                  (opt.algo == Conv3x3Algo::kAuto && spatial_wasteful && co >= 32));
  const auto spatial = lanes ? kern.spatial_cl : kern.spatial;
  const float* packed = lanes ? packed_lanes : packed_spatial;
  // Input channels per exact piece (all of them for fp32).
  const int64_t piece =
      opt.codes.enabled() ? std::max<int64_t>(1, conv3x3_exact_terms(opt.codes) / 9) : ci;
  for (int64_t n = 0; n < s.n; ++n) {
    kern.pad(in + n * ci * hw, ci, g, planes);
    float* o = out + n * co * hw;
    if (piece >= ci) {
      spatial(planes, g, ci, 0, ci, co, packed, opt.scale, opt.accumulate, o);
      continue;
    }
    float* part = b.part.get(co * hw);
    int64_t* total = b.total.get(co * hw);
    std::fill(total, total + co * hw, int64_t{0});
    for (int64_t c0 = 0; c0 < ci; c0 += piece) {
      spatial(planes, g, ci, c0, std::min(ci, c0 + piece), co, packed, 1.0f, false, part);
      for (int64_t i = 0; i < co * hw; ++i) total[i] += static_cast<int64_t>(part[i]);
    }
    store_exact(total, co * hw, opt.scale, opt.accumulate, o);
  }
}

void check_weights(const Conv3x3Shape& s, const Conv3x3Weights& w, const char* what) {
  INT4DDP_CHECK(w.k() == s.k && w.c() == s.c, what, ": weights packed for (k=", w.k(),
                ", c=", w.c(), ") but the shape has k=", s.k, " c=", s.c);
}

// The exact int64 dW sum of one weight over a chunk (the reference's loop).
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

}  // namespace

// ---- Workspace and weights -------------------------------------------------------------------

Conv3x3Workspace::Conv3x3Workspace() : b_(new Buffers) {}
Conv3x3Workspace::~Conv3x3Workspace() { delete b_; }
int64_t Conv3x3Workspace::bytes() const {
  return b_->planes.bytes() + b_->dy.bytes() + b_->xt.bytes() + b_->part.bytes() +
         b_->total.bytes();
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
  fwd_cl_.resize(count);
  bwd_cl_.resize(count);
  // Channels-in-lanes layouts. Loop orders keep both sides of each transpose in L1 (the (k, c*9)
  // transpose in o-major order was most of a 145 us pack at 64 x 64).
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t o = 0; o < k; ++o)
      for (int t = 0; t < 9; ++t)
        fwd_cl_[static_cast<size_t>((ch * 9 + t) * k + o)] = w[(o * c + ch) * 9 + t];
  for (int64_t o = 0; o < k; ++o)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int t = 0; t < 9; ++t)
        bwd_cl_[static_cast<size_t>((o * 9 + (8 - t)) * c + ch)] = w[(o * c + ch) * 9 + t];
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
    case Conv3x3Isa::kAvx2:
      return "avx2";
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
    case Conv3x3Isa::kAvx2:
#if defined(INT4DDP_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
  }
  return false;
}

Conv3x3Isa conv3x3_resolve(Conv3x3Isa isa) {
  if (isa == Conv3x3Isa::kAuto) {
    static const Conv3x3Isa best = [] {
      for (Conv3x3Isa i : {Conv3x3Isa::kAvx512, Conv3x3Isa::kAvx2})
        if (codec_allows(i) && conv3x3_isa_available(i)) return i;
      return Conv3x3Isa::kPortable;
    }();
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
  spatial_conv(s, s.c, s.k, x, w.forward_packed(), w.forward_lanes(), y, opt, ws,
               "conv3x3_forward");
}

void conv3x3_backward_data(const Conv3x3Shape& s, const float* dy, const Conv3x3Weights& w,
                           float* dx, const Conv3x3Options& opt, Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_backward_data");
  check_weights(s, w, "conv3x3_backward_data");
  spatial_conv(s, s.k, s.c, dy, w.backward_packed(), w.backward_lanes(), dx, opt, ws,
               "conv3x3_backward_data");
}

// ---- Weight gradient ---------------------------------------------------------------------------

void Conv3x3WeightGrad::reset(int64_t k, int64_t c, const Conv3x3Codes& codes, Conv3x3Isa isa) {
  INT4DDP_CHECK(k >= 0 && c >= 0, "conv3x3 weight gradient: negative shape k=", k, " c=", c);
  INT4DDP_CHECK(!codes.enabled() || (codes.qmax_a >= 1 && codes.qmax_a <= kMaxCode &&
                                     codes.qmax_b >= 1 && codes.qmax_b <= kMaxCode),
                "conv3x3 weight gradient: code bounds (", codes.qmax_a, ", ", codes.qmax_b,
                ") must both lie in 1..", kMaxCode);
  k_ = k;
  c_ = c;
  codes_ = codes;
  isa_ = conv3x3_resolve(isa);
  const Conv3x3Kernels& kern = kernels_for(isa_);
  // Both operands as padded planes where the ISA has that kernel (any c and k; its sums in the
  // (c, 9, k) layout); else input channels in the lanes when the ISA kernel takes them; else
  // output channels in the lanes when it can (the first conv: c = 1, k = 16); else the portable
  // kernel (any c).
  k_lanes_ =
      kern.wgrad_planes_f || (c % kern.wgrad_c_multiple != 0 && kern.wgrad_k_f && k % 16 == 0);
  const size_t count = static_cast<size_t>(k * c * 9);
  if (codes.enabled()) {
    accd_.assign(count + 8, 0.0);
    accf_.clear();
  } else {
    accf_.assign(count + 16, 0.0f);
    accd_.clear();
  }
}

template <typename Acc>
void Conv3x3WeightGrad::add_to(const Conv3x3Shape& s, const float* x, const float* dy,
                               Conv3x3Workspace* ws, Acc* acc) {
  thread_local Conv3x3Workspace local;
  Conv3x3Workspace::Buffers& b = (ws ? ws : &local)->buffers();
  const Conv3x3Kernels* kern = &kernels_for(isa_);
  const Conv3x3Plane g = detail::make_plane(s.h, s.w);
  if (kern->wgrad_planes_f) return add_planes(*kern, g, s, x, dy, b, acc);
  if (!k_lanes_ && s.c % kern->wgrad_c_multiple != 0) kern = &detail::kConv3x3Portable;
  // Blocking: a kernel tile sweeps one 16-lane slice of the transposed operand over a piece of rows
  // of a group of samples, for every pair of output (or input) channels in turn, so that slice
  // should stay in L1: about 24 KiB. Small images: whole images, several samples per group (fewer
  // tile flushes); large ones: one sample, a piece of rows. Codes: every piece (samples x rows x w
  // terms) within the exact bound as well.
  constexpr int64_t kSliceBytes = int64_t{24} << 10;
  const int64_t row_bytes = g.row * 16 * int64_t{sizeof(float)};
  const int64_t exact = codes_.enabled() ? conv3x3_exact_terms(codes_) : INT64_MAX;
  int64_t rows = std::min(s.h, std::max<int64_t>(1, kSliceBytes / row_bytes - 2));
  rows = std::min(rows, exact / s.w);  // >= 1: add() checked w against the bound
  int64_t group = 1;
  if (rows == s.h)
    group = std::clamp<int64_t>(
        std::min(kSliceBytes / ((s.h + 2) * row_bytes), exact / (s.h * s.w)), 1, s.n);
  const int64_t lanes = k_lanes_ ? s.k : s.c;
  const int64_t hw = s.h * s.w;
  const int64_t xt_stride = g.qcount * lanes, planes_stride = s.c * g.stride;
  float* xt = b.xt.get(group * xt_stride);
  float* planes = k_lanes_ ? b.planes.get(group * planes_stride) : nullptr;
  float* scratch = k_lanes_ ? nullptr : b.part.get(s.k * 9 * s.c);
  for (int64_t n0 = 0; n0 < s.n; n0 += group) {
    const int64_t ns = std::min(group, s.n - n0);
    const float* dyn = dy + n0 * s.k * hw;
    for (int64_t j = 0; j < ns; ++j) {
      if (k_lanes_) {
        kern->pad(x + (n0 + j) * s.c * hw, s.c, g, planes + j * planes_stride);
        kern->transpose(dyn + j * s.k * hw, s.k, g, xt + j * xt_stride);
      } else {
        kern->transpose(x + (n0 + j) * s.c * hw, s.c, g, xt + j * xt_stride);
      }
    }
    for (int64_t y0 = 0; y0 < s.h; y0 += rows) {
      const int64_t y1 = std::min(s.h, y0 + rows);
      if constexpr (std::is_same_v<Acc, double>) {
        if (k_lanes_)
          kern->wgrad_k_d(planes, xt, g, s.c, s.k, y0, y1, ns, planes_stride, xt_stride, acc);
        else
          kern->wgrad_d(xt, dyn, g, s.c, s.k, y0, y1, ns, xt_stride, s.k * hw, acc, scratch);
      } else {
        if (k_lanes_)
          kern->wgrad_k_f(planes, xt, g, s.c, s.k, y0, y1, ns, planes_stride, xt_stride, acc);
        else
          kern->wgrad_f(xt, dyn, g, s.c, s.k, y0, y1, ns, xt_stride, s.k * hw, acc, scratch);
      }
    }
  }
}

template <typename Acc>
void Conv3x3WeightGrad::add_planes(const detail::Conv3x3Kernels& kern,
                                   const detail::Conv3x3Plane& g, const Conv3x3Shape& s,
                                   const float* x, const float* dy, Conv3x3Workspace::Buffers& b,
                                   Acc* acc) {
  // A group of samples' padded planes of x and dy, each kernel tile sweeping one x plane and a
  // few dy planes of every sample of the group: the group's planes should stay in L2 (about
  // kGroupBytes). Codes: every piece (samples x rows x w terms) within the exact bound as well.
  constexpr int64_t kGroupBytes = int64_t{256} << 10;
  const int64_t sample_bytes = (s.c + s.k) * g.stride * int64_t{sizeof(float)};
  const int64_t exact = codes_.enabled() ? conv3x3_exact_terms(codes_) : INT64_MAX;
  const int64_t rows = std::min(s.h, exact / s.w);  // >= 1: add() checked w against the bound
  int64_t group = 1;
  if (rows == s.h)
    group = std::clamp<int64_t>(std::min(kGroupBytes / sample_bytes, exact / (s.h * s.w)), 1, s.n);
  const int64_t hw = s.h * s.w, x_stride = s.c * g.stride, dy_stride = s.k * g.stride;
  float* xp = b.planes.get(group * x_stride);
  float* dyp = b.dy.get(group * dy_stride);
  for (int64_t n0 = 0; n0 < s.n; n0 += group) {
    const int64_t ns = std::min(group, s.n - n0);
    for (int64_t j = 0; j < ns; ++j) {
      kern.pad(x + (n0 + j) * s.c * hw, s.c, g, xp + j * x_stride);
      kern.pad(dy + (n0 + j) * s.k * hw, s.k, g, dyp + j * dy_stride);
    }
    for (int64_t y0 = 0; y0 < s.h; y0 += rows) {
      const int64_t p0 = y0 * g.row, p1 = std::min(s.h, y0 + rows) * g.row;
      if constexpr (std::is_same_v<Acc, double>)
        kern.wgrad_planes_d(xp, dyp, g, s.c, s.k, p0, p1, ns, x_stride, dy_stride, acc);
      else
        kern.wgrad_planes_f(xp, dyp, g, s.c, s.k, p0, p1, ns, x_stride, dy_stride, acc);
    }
  }
}

void Conv3x3WeightGrad::add(const Conv3x3Shape& s, const float* x, const float* dy,
                            Conv3x3Workspace* ws) {
  INT4DDP_CHECK(s.n >= 0 && s.h >= 0 && s.w >= 0, "conv3x3 weight gradient: negative size n=", s.n,
                " h=", s.h, " w=", s.w);
  INT4DDP_CHECK(s.k == k_ && s.c == c_, "conv3x3 weight gradient: reset for (k=", k_, ", c=", c_,
                ") but the chunk has k=", s.k, " c=", s.c);
  if (empty(s)) return;
  INT4DDP_CHECK(x && dy, "conv3x3 weight gradient: null tensor");
  if (codes_.enabled() && s.w > conv3x3_exact_terms(codes_)) {
    // Image rows too long to sum exactly in fp32 (never at these sizes): the int64 loop.
    for (int64_t o = 0; o < k_; ++o)
      for (int64_t ch = 0; ch < c_; ++ch)
        for (int t = 0; t < 9; ++t)
          accd()[k_lanes_ ? (ch * 9 + t) * k_ + o : (o * 9 + t) * c_ + ch] +=
              static_cast<double>(wgrad_ref_sum(s, x, dy, o, ch, t));
    return;
  }
  if (codes_.enabled())
    add_to(s, x, dy, ws, accd());
  else
    add_to(s, x, dy, ws, accf());
}

void Conv3x3WeightGrad::finish(float scale, bool accumulate, float* dw) const {
  const int64_t count = k_ * c_ * 9;
  if (count == 0) return;
  INT4DDP_CHECK(dw, "conv3x3 weight gradient: null dW");
  auto out = [&](const auto* acc) {
    for (int64_t o = 0; o < k_; ++o)
      for (int64_t ch = 0; ch < c_; ++ch)
        for (int t = 0; t < 9; ++t) {
          const auto sum = acc[k_lanes_ ? (ch * 9 + t) * k_ + o : (o * 9 + t) * c_ + ch];
          const float v = scale * static_cast<float>(sum);
          float& d = dw[(o * c_ + ch) * 9 + t];
          d = accumulate ? d + v : v;
        }
  };
  if (codes_.enabled())
    out(accd());
  else
    out(accf());
}

void Conv3x3WeightGrad::finish_exact(double* dw_sum) const {
  INT4DDP_CHECK(codes_.enabled(), "conv3x3 weight gradient: finish_exact needs code bounds");
  const int64_t count = k_ * c_ * 9;
  if (count == 0) return;
  INT4DDP_CHECK(dw_sum, "conv3x3 weight gradient: null dW sum");
  for (int64_t o = 0; o < k_; ++o)
    for (int64_t ch = 0; ch < c_; ++ch)
      for (int t = 0; t < 9; ++t)
        dw_sum[(o * c_ + ch) * 9 + t] +=
            accd()[k_lanes_ ? (ch * 9 + t) * k_ + o : (o * 9 + t) * c_ + ch];
}

void conv3x3_backward_weight(const Conv3x3Shape& s, const float* x, const float* dy, float* dw,
                             const Conv3x3Options& opt, Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_backward_weight");
  thread_local Conv3x3Workspace local;
  Conv3x3Workspace* w = ws ? ws : &local;
  Conv3x3WeightGrad& grad = w->buffers().grad;
  grad.reset(s.k, s.c, opt.codes, opt.isa);
  grad.add(s, x, dy, w);
  grad.finish(opt.scale, opt.accumulate, dw);
}

void conv3x3_backward_weight_exact(const Conv3x3Shape& s, const float* x, const float* dy,
                                   double* dw_sum, const Conv3x3Options& opt,
                                   Conv3x3Workspace* ws) {
  check_common(s, opt, "conv3x3_backward_weight_exact");
  INT4DDP_CHECK(opt.codes.enabled(), "conv3x3_backward_weight_exact: needs code bounds");
  thread_local Conv3x3Workspace local;
  Conv3x3Workspace* w = ws ? ws : &local;
  Conv3x3WeightGrad& grad = w->buffers().grad;
  grad.reset(s.k, s.c, opt.codes, opt.isa);
  grad.add(s, x, dy, w);
  grad.finish_exact(dw_sum);
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
