// Layer and optimizer kernels (see nn_cuda.h for the contract and which results equal the CPU's
// bit for bit). The CPU definitions these follow, line by line: src/nn/layers.cpp (im2col_group,
// col2im_group, BatchNorm, ReLU, MaxPool2d, GlobalAvgPool, ResidualBlock, softmax_cross_entropy,
// Linear's bias) and src/train/optim.cpp (Optimizer::step).
//
// Reductions: BatchNorm splits each channel's n*hw elements into slices of kBnSlice (a function of
// the shape only), each summed by one CUDA block in a fixed order (per thread strided, then a
// butterfly over the warp, then the warps in order), and one thread per channel adds the slices in
// order. The other reductions are short and run on one thread in the CPU's own order.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>

#include "kernels/common/error.h"
#include "kernels/math/cuda/nn_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"

#if defined(__USE_FAST_MATH__)
#error \
    "the layer kernels must not be built with --use_fast_math: their results must equal the CPU's"
#endif

namespace int4ddp::math::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kBnSlice = 8192;  // elements of one channel summed by one CUDA block

unsigned blocks_for(int64_t count) {
  return static_cast<unsigned>((count + kThreads - 1) / kThreads);
}

void check_launch() { INT4DDP_CUDA_CHECK(cudaGetLastError()); }

void check_count(int64_t count, const char* what) {
  INT4DDP_CHECK(count >= 0, what, ": negative size ", count);
}

// ---- im2col / col2im ----------------------------------------------------------------------------

// Consecutive threads write consecutive elements of col in either layout.
template <typename T>
__global__ void im2col_kernel(const T* __restrict__ images, int64_t s0, ColGeometry c,
                              bool transposed, T* __restrict__ col) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= c.rows * c.cols) return;
  const int64_t src = im2col_source(c, idx, transposed);
  col[idx] = src >= 0 ? images[s0 * c.channels * c.h * c.w + src] : T(0);
}

// acc = acc + col[i] for each term of an image element, in the order col2im_terms gives them.
struct AddColumnTerm {
  const float* col;
  float* acc;
  __device__ void operator()(int64_t i) const { *acc = __fadd_rn(*acc, col[i]); }
};

__global__ void col2im_kernel(const float* __restrict__ col, int64_t s0, int64_t g, ColGeometry c,
                              bool transposed, float* __restrict__ images) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g * c.channels * c.h * c.w) return;
  float* out = images + s0 * c.channels * c.h * c.w + idx;
  float acc = *out;
  // The CPU adds (c, ky, kx) rows one after another; this element receives at most one term per
  // (ky, kx), so adding them in (ky, kx) order repeats its sums exactly.
  col2im_terms(c, idx, transposed, AddColumnTerm{col, &acc});
  *out = acc;
}

void check_geometry(const ConvGeometry& geo, int64_t s0, int64_t g) {
  INT4DDP_CHECK(geo.channels > 0 && geo.h > 0 && geo.w > 0 && geo.kernel > 0 && geo.stride > 0 &&
                    geo.pad >= 0 && s0 >= 0 && g >= 0,
                "im2col (cuda): bad geometry channels=", geo.channels, " h=", geo.h, " w=", geo.w,
                " kernel=", geo.kernel, " stride=", geo.stride, " pad=", geo.pad, " s0=", s0,
                " g=", g);
  INT4DDP_CHECK(geo.out_h() > 0 && geo.out_w() > 0, "im2col (cuda): input ", geo.h, "x", geo.w,
                " is too small for kernel ", geo.kernel, " pad ", geo.pad);
}

// ---- BatchNorm ----------------------------------------------------------------------------------

int64_t bn_slices(const BatchNormShape& s) {
  return std::max<int64_t>(1, (s.n * s.hw + kBnSlice - 1) / kBnSlice);
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums two per-thread doubles over the block in a fixed order; thread 0 gets the totals.
__device__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kWarps], sb[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = sa[0];
    b = sb[0];
    for (int w = 1; w < kWarps; ++w) {
      a = __dadd_rn(a, sa[w]);
      b = __dadd_rn(b, sb[w]);
    }
  }
}

// Element e of channel ch of the flattened (n, hw) index.
__device__ __forceinline__ int64_t bn_index(const BatchNormShape& s, int64_t ch, int64_t e) {
  return ((e / s.hw) * s.channels + ch) * s.hw + e % s.hw;
}

// Partial sums of (x - origin) and (x - origin)^2 per (channel, slice); origin = the channel's
// first value (the CPU's shift).
__global__ void bn_moments_kernel(BatchNormShape s, const float* __restrict__ x, int64_t slices,
                                  double* __restrict__ ws) {
  const int64_t ch = blockIdx.y, slice = blockIdx.x, total = s.n * s.hw;
  const double origin = static_cast<double>(x[ch * s.hw]);
  const int64_t e1 = min(total, (slice + 1) * kBnSlice);
  double a = 0.0, b = 0.0;
  for (int64_t e = slice * kBnSlice + threadIdx.x; e < e1; e += blockDim.x) {
    const double d = __dsub_rn(static_cast<double>(x[bn_index(s, ch, e)]), origin);
    a = __dadd_rn(a, d);
    b = __dadd_rn(b, __dmul_rn(d, d));
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    ws[(ch * slices + slice) * 2] = a;
    ws[(ch * slices + slice) * 2 + 1] = b;
  }
}

// The per-channel statistics, scale and shift (BatchNorm::forward's per-channel block).
__global__ void bn_finish_forward_kernel(BatchNormShape s, const float* __restrict__ x, bool train,
                                         BatchNormParams p, int64_t slices,
                                         const double* __restrict__ ws) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= s.channels) return;
  float mean, var;
  if (train) {
    const double count = static_cast<double>(s.n * s.hw);
    const double origin = s.n * s.hw > 0 ? static_cast<double>(x[ch * s.hw]) : 0.0;
    double sum = 0.0, sum2 = 0.0;
    for (int64_t k = 0; k < slices; ++k) {
      sum = __dadd_rn(sum, ws[(ch * slices + k) * 2]);
      sum2 = __dadd_rn(sum2, ws[(ch * slices + k) * 2 + 1]);
    }
    const double m = __ddiv_rn(sum, count);
    const double ss = fmax(0.0, __dsub_rn(sum2, __dmul_rn(sum, m)));
    mean = static_cast<float>(__dadd_rn(origin, m));
    var = static_cast<float>(__ddiv_rn(ss, count));
    const float unbiased = count > 1 ? static_cast<float>(__ddiv_rn(ss, count - 1)) : var;
    const float keep = __fsub_rn(1.0f, p.momentum);
    p.running_mean[ch] =
        __fadd_rn(__fmul_rn(keep, p.running_mean[ch]), __fmul_rn(p.momentum, mean));
    p.running_var[ch] =
        __fadd_rn(__fmul_rn(keep, p.running_var[ch]), __fmul_rn(p.momentum, unbiased));
  } else {
    mean = p.running_mean[ch];
    var = p.running_var[ch];
  }
  const float invstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, p.eps)));
  const float g = __fmul_rn(p.gamma[ch], invstd);
  p.save_mean[ch] = mean;
  p.save_invstd[ch] = invstd;
  p.save_scale[ch] = g;
  p.save_shift[ch] = __fsub_rn(p.beta[ch], __fmul_rn(mean, g));
}

__global__ void bn_apply_kernel(BatchNormShape s, const float* __restrict__ x,
                                const float* __restrict__ scale, const float* __restrict__ shift,
                                bool relu, float* __restrict__ y) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.n * s.channels * s.hw) return;
  const int64_t ch = (idx / s.hw) % s.channels;
  const float v = __fadd_rn(__fmul_rn(x[idx], scale[ch]), shift[ch]);
  y[idx] = relu ? (v > 0.0f ? v : 0.0f) : v;
}

// dy with the fused ReLU's mask: y > 0 exactly where x * scale + shift > 0.
__device__ __forceinline__ float bn_masked_dy(float x, float dy, float scale, float shift,
                                              bool relu) {
  return !relu || __fadd_rn(__fmul_rn(x, scale), shift) > 0.0f ? dy : 0.0f;
}

// Partial sums of d and d * (x - mean) per (channel, slice), d the (masked) dy.
__global__ void bn_dy_moments_kernel(BatchNormShape s, const float* __restrict__ x,
                                     const float* __restrict__ dy, BatchNormParams p,
                                     int64_t slices, double* __restrict__ ws) {
  const int64_t ch = blockIdx.y, slice = blockIdx.x, total = s.n * s.hw;
  const double mean = static_cast<double>(p.save_mean[ch]);
  const float scale = p.save_scale[ch], shift = p.save_shift[ch];
  const int64_t e1 = min(total, (slice + 1) * kBnSlice);
  double a = 0.0, b = 0.0;
  for (int64_t e = slice * kBnSlice + threadIdx.x; e < e1; e += blockDim.x) {
    const int64_t i = bn_index(s, ch, e);
    const double d = static_cast<double>(bn_masked_dy(x[i], dy[i], scale, shift, p.relu));
    a = __dadd_rn(a, d);
    b = __dadd_rn(b, __dmul_rn(d, __dsub_rn(static_cast<double>(x[i]), mean)));
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    ws[(ch * slices + slice) * 2] = a;
    ws[(ch * slices + slice) * 2 + 1] = b;
  }
}

// gamma/beta gradients and dx's per-channel coefficients (g, k, g * mean(dy)) into coef (3 per
// channel), as BatchNorm::backward.
__global__ void bn_finish_backward_kernel(BatchNormShape s, BatchNormParams p, int64_t slices,
                                          const double* __restrict__ ws, float* gamma_grad,
                                          float* beta_grad, double* __restrict__ coef) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= s.channels) return;
  const double count = static_cast<double>(s.n * s.hw);
  double sdy = 0.0, sb = 0.0;
  for (int64_t k = 0; k < slices; ++k) {
    sdy = __dadd_rn(sdy, ws[(ch * slices + k) * 2]);
    sb = __dadd_rn(sb, ws[(ch * slices + k) * 2 + 1]);
  }
  const float invstd = p.save_invstd[ch];
  const double sdy_xhat = __dmul_rn(static_cast<double>(invstd), sb);
  gamma_grad[ch] = __fadd_rn(gamma_grad[ch], static_cast<float>(sdy_xhat));
  beta_grad[ch] = __fadd_rn(beta_grad[ch], static_cast<float>(sdy));
  const float g = __fmul_rn(p.gamma[ch], invstd);
  coef[ch * 3] = g;
  coef[ch * 3 + 1] = static_cast<float>(
      __dmul_rn(static_cast<double>(__fmul_rn(g, invstd)), __ddiv_rn(sdy_xhat, count)));
  coef[ch * 3 + 2] = static_cast<float>(__dmul_rn(static_cast<double>(g), __ddiv_rn(sdy, count)));
}

// dx = (g * d - (x - mean) * k) - g * mean(d).
__global__ void bn_dx_kernel(BatchNormShape s, const float* __restrict__ x,
                             const float* __restrict__ dy, BatchNormParams p,
                             const double* __restrict__ coef, float* __restrict__ dx) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.n * s.channels * s.hw) return;
  const int64_t ch = (idx / s.hw) % s.channels;
  const float g = static_cast<float>(coef[ch * 3]), k = static_cast<float>(coef[ch * 3 + 1]);
  const float gmdy = static_cast<float>(coef[ch * 3 + 2]);
  const float d = bn_masked_dy(x[idx], dy[idx], p.save_scale[ch], p.save_shift[ch], p.relu);
  dx[idx] =
      __fsub_rn(__fsub_rn(__fmul_rn(g, d), __fmul_rn(__fsub_rn(x[idx], p.save_mean[ch]), k)), gmdy);
}

void check_bn(const BatchNormShape& s, const BatchNormParams& p, const void* x, const void* ws) {
  INT4DDP_CHECK(s.n > 0 && s.channels > 0 && s.hw > 0, "batchnorm (cuda): bad shape n=", s.n,
                " channels=", s.channels, " hw=", s.hw);
  INT4DDP_CHECK(s.channels <= 65535, "batchnorm (cuda): ", s.channels,
                " channels exceed the kernel grid's 65535");
  INT4DDP_CHECK(x && ws && p.gamma && p.beta && p.running_mean && p.running_var && p.save_mean &&
                    p.save_invstd && p.save_scale && p.save_shift,
                "batchnorm (cuda): null buffer");
}

// ---- element-wise, pooling, shortcut ----------------------------------------------------------

__global__ void relu_forward_kernel(const float* __restrict__ x, float* __restrict__ y,
                                    int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

__global__ void relu_backward_kernel(const float* __restrict__ x, const float* __restrict__ dy,
                                     float* __restrict__ dx, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

__global__ void bias_add_rows_kernel(float* __restrict__ y, const float* __restrict__ bias,
                                     int64_t rows, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows * cols) y[i] = __fadd_rn(y[i], bias[i % cols]);
}

__global__ void bias_grad_rows_kernel(const float* __restrict__ dy, int64_t rows, int64_t cols,
                                      float* __restrict__ grad) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float acc = grad[j];
  for (int64_t i = 0; i < rows; ++i) acc = __fadd_rn(acc, dy[i * cols + j]);
  grad[j] = acc;
}

// The output rows (or columns) whose clipped windows hold input index i: [first, last], empty when
// first > last.
__device__ inline void pool_outputs_of(int64_t i, int64_t out, const PoolGeometry& g,
                                       int64_t* first, int64_t* last) {
  // o * stride - pad <= i  and  i < o * stride - pad + window.
  const int64_t lo = i + g.pad - g.window + 1;
  *first = lo <= 0 ? 0 : (lo + g.stride - 1) / g.stride;
  *last = min((i + g.pad) / g.stride, out - 1);
}

__global__ void maxpool_forward_kernel(const float* __restrict__ x, int64_t planes, int64_t h,
                                       int64_t w, PoolGeometry g, float* __restrict__ y,
                                       int32_t* __restrict__ argmax) {
  const int64_t ho = g.out_size(h), wo = g.out_size(w);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= planes * ho * wo) return;
  const int64_t p = idx / (ho * wo), oy = (idx / wo) % ho, ox = idx % wo;
  const float* plane = x + p * h * w;
  // The window clipped to the plane (padding never wins), scanned as MaxPool2d::forward does:
  // row-major, strict >, the first NaN wins over numbers.
  const int64_t y0 = max(int64_t{0}, oy * g.stride - g.pad);
  const int64_t y1 = min(h, oy * g.stride - g.pad + g.window);
  const int64_t x0 = max(int64_t{0}, ox * g.stride - g.pad);
  const int64_t x1 = min(w, ox * g.stride - g.pad + g.window);
  float best = plane[y0 * w + x0];
  int64_t arg = y0 * w + x0;
  for (int64_t iy = y0; iy < y1; ++iy)
    for (int64_t ix = x0; ix < x1; ++ix) {
      const float v = plane[iy * w + ix];
      if (v > best || (isnan(v) && !isnan(best))) best = v, arg = iy * w + ix;
    }
  y[idx] = best;
  argmax[idx] = static_cast<int32_t>(arg);
}

// One thread per input element gathers the dy of every output whose maximum it is, in output
// order (MaxPool2d::backward's order of +=, starting from 0): deterministic, no atomics.
__global__ void maxpool_backward_kernel(const float* __restrict__ dy,
                                        const int32_t* __restrict__ argmax, int64_t planes,
                                        int64_t h, int64_t w, PoolGeometry g,
                                        float* __restrict__ dx) {
  const int64_t ho = g.out_size(h), wo = g.out_size(w);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= planes * h * w) return;
  const int64_t p = idx / (h * w), iy = (idx / w) % h, ix = idx % w;
  const int32_t self = static_cast<int32_t>(iy * w + ix);
  int64_t oy0, oy1, ox0, ox1;
  pool_outputs_of(iy, ho, g, &oy0, &oy1);
  pool_outputs_of(ix, wo, g, &ox0, &ox1);
  float v = 0.0f;  // 0 + dy as the CPU's zero fill and += (a -0 gradient becomes +0 there too)
  for (int64_t oy = oy0; oy <= oy1; ++oy)
    for (int64_t ox = ox0; ox <= ox1; ++ox) {
      const int64_t o = (p * ho + oy) * wo + ox;
      if (argmax[o] == self) v = __fadd_rn(v, dy[o]);
    }
  dx[idx] = v;
}

__global__ void avgpool_forward_kernel(const float* __restrict__ x, int64_t planes, int64_t hw,
                                       float* __restrict__ y) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= planes) return;
  double s = 0.0;
  for (int64_t j = 0; j < hw; ++j) s = __dadd_rn(s, static_cast<double>(x[p * hw + j]));
  y[p] = static_cast<float>(__ddiv_rn(s, static_cast<double>(hw)));
}

__global__ void avgpool_backward_kernel(const float* __restrict__ dy, int64_t planes, int64_t hw,
                                        float inv, float* __restrict__ dx) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < planes * hw) dx[i] = __fmul_rn(dy[i / hw], inv);
}

struct ShortcutDims {
  ShortcutShape s;
  int64_t ho, wo;
};

ShortcutDims shortcut_dims(const ShortcutShape& s) {
  INT4DDP_CHECK(s.n >= 0 && s.in_channels > 0 && s.out_channels >= s.in_channels && s.h > 0 &&
                    s.w > 0 && (s.stride == 1 || s.stride == 2),
                "shortcut (cuda): bad shape n=", s.n, " in=", s.in_channels,
                " out=", s.out_channels, " h=", s.h, " w=", s.w, " stride=", s.stride,
                " (stride 1 or 2, out >= in)");
  return {s, (s.h + s.stride - 1) / s.stride, (s.w + s.stride - 1) / s.stride};
}

__global__ void residual_forward_kernel(ShortcutDims d, const float* __restrict__ body,
                                        const float* __restrict__ x, float* __restrict__ y) {
  const ShortcutShape& s = d.s;
  const int64_t hw = d.ho * d.wo;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.n * s.out_channels * hw) return;
  const int64_t i = idx / (s.out_channels * hw), c = (idx / hw) % s.out_channels;
  const int64_t oy = (idx % hw) / d.wo, ox = idx % d.wo;
  const float b = body[idx];
  float v = b;
  if (c < s.in_channels)
    v = __fadd_rn(b, x[((i * s.in_channels + c) * s.h + oy * s.stride) * s.w + ox * s.stride]);
  y[idx] = v > 0.0f ? v : 0.0f;
}

__global__ void shortcut_backward_add_kernel(ShortcutDims d, const float* __restrict__ dsum,
                                             float* __restrict__ dx) {
  const ShortcutShape& s = d.s;
  const int64_t hw = d.ho * d.wo;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.n * s.in_channels * hw) return;  // only channels < in_channels have a target
  const int64_t i = idx / (s.in_channels * hw), c = (idx / hw) % s.in_channels;
  const int64_t oy = (idx % hw) / d.wo, ox = idx % d.wo;
  float& t = dx[((i * s.in_channels + c) * s.h + oy * s.stride) * s.w + ox * s.stride];
  t = __fadd_rn(t, dsum[((i * s.out_channels + c) * d.ho + oy) * d.wo + ox]);
}

// ---- softmax cross-entropy --------------------------------------------------------------------

// Per sample: ws[i] = its loss term, ws[n + i] = 1 if the argmax is the label, 0 if not, -1 if the
// label is out of range.
__global__ void xent_sample_kernel(const float* __restrict__ logits,
                                   const int32_t* __restrict__ labels, int64_t n, int64_t k,
                                   float* __restrict__ dlogits, double* __restrict__ ws) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* z = logits + i * k;
  const int32_t label = labels[i];
  if (label < 0 || label >= k) {
    ws[i] = NAN;
    ws[n + i] = -1.0;
    if (dlogits)
      for (int64_t j = 0; j < k; ++j) dlogits[i * k + j] = 0.0f;
    return;
  }
  int64_t arg = 0;  // std::max_element: the first element no later one exceeds
  for (int64_t j = 1; j < k; ++j)
    if (z[arg] < z[j]) arg = j;
  const float zmax = z[arg];
  double s = 0.0;
  for (int64_t j = 0; j < k; ++j) s = __dadd_rn(s, exp(static_cast<double>(__fsub_rn(z[j], zmax))));
  ws[i] = __dsub_rn(log(s), static_cast<double>(__fsub_rn(z[label], zmax)));
  ws[n + i] = arg == label ? 1.0 : 0.0;
  if (dlogits)
    for (int64_t j = 0; j < k; ++j) {
      const double p = __ddiv_rn(exp(static_cast<double>(__fsub_rn(z[j], zmax))), s);
      dlogits[i * k + j] = static_cast<float>(
          __ddiv_rn(__dsub_rn(p, j == label ? 1.0 : 0.0), static_cast<double>(n)));
    }
}

__global__ void xent_finish_kernel(const int32_t* __restrict__ labels, int64_t n,
                                   const double* __restrict__ ws, CrossEntropyResult* result) {
  double loss = 0.0;
  int64_t hits = 0, bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    loss = __dadd_rn(loss, ws[i]);
    if (ws[n + i] > 0.0) ++hits;
    if (ws[n + i] < 0.0 && bad < 0) bad = i;
  }
  result->loss = static_cast<float>(__ddiv_rn(loss, static_cast<double>(n)));
  result->correct = hits;
  result->bad_sample = bad;
  result->bad_label = bad >= 0 ? labels[bad] : 0;
}

// ---- optimizers -------------------------------------------------------------------------------

__global__ void sgd_kernel(float* __restrict__ w, const float* __restrict__ g,
                           float* __restrict__ v, int64_t count, SgdScalars s) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const float gi = __fadd_rn(g[i], __fmul_rn(s.weight_decay, w[i]));
  const float vi = __fadd_rn(__fmul_rn(s.momentum, v[i]), gi);
  v[i] = vi;
  const float step = s.nesterov ? __fadd_rn(gi, __fmul_rn(s.momentum, vi)) : vi;
  w[i] = __fsub_rn(w[i], __fmul_rn(s.lr, step));
}

__global__ void adam_kernel(float* __restrict__ w, const float* __restrict__ g,
                            float* __restrict__ m, float* __restrict__ s, int64_t count,
                            AdamScalars a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const float gi = g[i];
  const float mi = __fadd_rn(__fmul_rn(a.beta1, m[i]), __fmul_rn(__fsub_rn(1.0f, a.beta1), gi));
  const float si =
      __fadd_rn(__fmul_rn(a.beta2, s[i]), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, a.beta2), gi), gi));
  m[i] = mi;
  s[i] = si;
  const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(si, a.inv_c2)), a.eps);
  w[i] = __fsub_rn(w[i], __fdiv_rn(__fmul_rn(a.lr_t, mi), denom));
}

// ---- checks -----------------------------------------------------------------------------------

__global__ void flag_nonfinite_kernel(const float* __restrict__ x, int64_t count,
                                      int32_t* __restrict__ flag) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count && !(fabsf(x[i]) <= 3.40282347e+38f)) *flag = 1;
}

}  // namespace

// ---- im2col / col2im ----------------------------------------------------------------------------

template <typename T>
void im2col_async(const T* images, int64_t s0, int64_t g, const ConvGeometry& geo, bool transposed,
                  T* col, cudaStream_t stream) {
  check_geometry(geo, s0, g);
  const ColGeometry c = col_geometry(geo, g);
  if (c.rows * c.cols == 0) return;
  INT4DDP_CHECK(images && col, "im2col (cuda): null buffer");
  im2col_kernel<T>
      <<<blocks_for(c.rows * c.cols), kThreads, 0, stream>>>(images, s0, c, transposed, col);
  check_launch();
}

template void im2col_async<float>(const float*, int64_t, int64_t, const ConvGeometry&, bool, float*,
                                  cudaStream_t);
template void im2col_async<int8_t>(const int8_t*, int64_t, int64_t, const ConvGeometry&, bool,
                                   int8_t*, cudaStream_t);
template void im2col_async<uint8_t>(const uint8_t*, int64_t, int64_t, const ConvGeometry&, bool,
                                    uint8_t*, cudaStream_t);

void col2im_async(const float* col, int64_t s0, int64_t g, const ConvGeometry& geo, bool transposed,
                  float* images, cudaStream_t stream) {
  check_geometry(geo, s0, g);
  const ColGeometry c = col_geometry(geo, g);
  const int64_t count = g * geo.channels * geo.h * geo.w;
  if (count == 0) return;
  INT4DDP_CHECK(images && col, "col2im (cuda): null buffer");
  col2im_kernel<<<blocks_for(count), kThreads, 0, stream>>>(col, s0, g, c, transposed, images);
  check_launch();
}

// ---- BatchNorm ----------------------------------------------------------------------------------

int64_t batchnorm_workspace_count(const BatchNormShape& s) {
  return s.channels * bn_slices(s) * 2 + s.channels * 3;
}

void batchnorm_forward_async(const BatchNormShape& s, const float* x, float* y, bool train,
                             const BatchNormParams& p, double* workspace, cudaStream_t stream) {
  check_bn(s, p, x, workspace);
  INT4DDP_CHECK(y, "batchnorm (cuda): null output");
  const int64_t slices = bn_slices(s);
  if (train) {
    INT4DDP_CHECK(slices <= 0x7fffffff, "batchnorm (cuda): too many elements per channel");
    bn_moments_kernel<<<dim3(static_cast<unsigned>(slices), static_cast<unsigned>(s.channels)),
                        kThreads, 0, stream>>>(s, x, slices, workspace);
    check_launch();
  }
  bn_finish_forward_kernel<<<blocks_for(s.channels), kThreads, 0, stream>>>(s, x, train, p, slices,
                                                                            workspace);
  check_launch();
  bn_apply_kernel<<<blocks_for(s.n * s.channels * s.hw), kThreads, 0, stream>>>(
      s, x, p.save_scale, p.save_shift, p.relu, y);
  check_launch();
}

void batchnorm_backward_async(const BatchNormShape& s, const float* x, const float* dy, float* dx,
                              float* gamma_grad, float* beta_grad, const BatchNormParams& p,
                              double* workspace, cudaStream_t stream) {
  check_bn(s, p, x, workspace);
  INT4DDP_CHECK(dy && gamma_grad && beta_grad, "batchnorm (cuda): null gradient buffer");
  const int64_t slices = bn_slices(s);
  double* coef = workspace + s.channels * slices * 2;
  bn_dy_moments_kernel<<<dim3(static_cast<unsigned>(slices), static_cast<unsigned>(s.channels)),
                         kThreads, 0, stream>>>(s, x, dy, p, slices, workspace);
  check_launch();
  bn_finish_backward_kernel<<<blocks_for(s.channels), kThreads, 0, stream>>>(
      s, p, slices, workspace, gamma_grad, beta_grad, coef);
  check_launch();
  if (!dx) return;
  bn_dx_kernel<<<blocks_for(s.n * s.channels * s.hw), kThreads, 0, stream>>>(s, x, dy, p, coef, dx);
  check_launch();
}

// ---- element-wise
// ----------------------------------------------------------------------------------

void relu_forward_async(const float* x, float* y, int64_t count, cudaStream_t stream) {
  check_count(count, "relu (cuda)");
  if (count == 0) return;
  relu_forward_kernel<<<blocks_for(count), kThreads, 0, stream>>>(x, y, count);
  check_launch();
}

void relu_backward_async(const float* x, const float* dy, float* dx, int64_t count,
                         cudaStream_t stream) {
  check_count(count, "relu backward (cuda)");
  if (count == 0) return;
  relu_backward_kernel<<<blocks_for(count), kThreads, 0, stream>>>(x, dy, dx, count);
  check_launch();
}

void bias_add_rows_async(float* y, const float* bias, int64_t rows, int64_t cols,
                         cudaStream_t stream) {
  check_count(rows * cols, "bias add (cuda)");
  if (rows * cols == 0) return;
  bias_add_rows_kernel<<<blocks_for(rows * cols), kThreads, 0, stream>>>(y, bias, rows, cols);
  check_launch();
}

void bias_grad_rows_async(const float* dy, int64_t rows, int64_t cols, float* grad,
                          cudaStream_t stream) {
  INT4DDP_CHECK(rows >= 0 && cols >= 0, "bias grad (cuda): bad shape ", rows, "x", cols);
  if (cols == 0) return;
  bias_grad_rows_kernel<<<blocks_for(cols), kThreads, 0, stream>>>(dy, rows, cols, grad);
  check_launch();
}

// ---- pooling
// ---------------------------------------------------------------------------------------

// The geometry MaxPool2d's constructor and forward accept; h * w must fit the int32 argmax.
void check_pool(const char* what, int64_t n, int64_t c, int64_t h, int64_t w,
                const PoolGeometry& g) {
  INT4DDP_CHECK(g.window >= 1 && g.stride >= 1 && g.pad >= 0 && 2 * g.pad <= g.window, what,
                ": bad pooling geometry (window ", g.window, ", stride ", g.stride, ", pad ", g.pad,
                "): needs window >= 1, stride >= 1 and 0 <= pad <= window / 2");
  INT4DDP_CHECK(
      n >= 0 && c > 0 && h > 0 && w > 0 && h + 2 * g.pad >= g.window && w + 2 * g.pad >= g.window,
      what, ": input ", n, "x", c, "x", h, "x", w, " too small for window ", g.window, " (pad ",
      g.pad, ")");
  INT4DDP_CHECK(h * w <= std::numeric_limits<int32_t>::max(), what, ": input ", n, "x", c, "x", h,
                "x", w, " has planes too large for int32 argmax indices");
}

void maxpool_forward_async(const float* x, int64_t n, int64_t c, int64_t h, int64_t w,
                           const PoolGeometry& g, float* y, int32_t* argmax, cudaStream_t stream) {
  check_pool("maxpool (cuda)", n, c, h, w, g);
  const int64_t count = n * c * g.out_size(h) * g.out_size(w);
  if (count == 0) return;
  maxpool_forward_kernel<<<blocks_for(count), kThreads, 0, stream>>>(x, n * c, h, w, g, y, argmax);
  check_launch();
}

void maxpool_backward_async(const float* dy, const int32_t* argmax, int64_t n, int64_t c, int64_t h,
                            int64_t w, const PoolGeometry& g, float* dx, cudaStream_t stream) {
  check_pool("maxpool backward (cuda)", n, c, h, w, g);
  const int64_t count = n * c * h * w;
  if (count == 0) return;
  maxpool_backward_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dy, argmax, n * c, h, w, g,
                                                                      dx);
  check_launch();
}

void global_avgpool_forward_async(const float* x, int64_t n, int64_t c, int64_t hw, float* y,
                                  cudaStream_t stream) {
  INT4DDP_CHECK(n >= 0 && c > 0 && hw > 0, "avgpool (cuda): bad shape ", n, "x", c, "x", hw);
  if (n == 0) return;
  avgpool_forward_kernel<<<blocks_for(n * c), kThreads, 0, stream>>>(x, n * c, hw, y);
  check_launch();
}

void global_avgpool_backward_async(const float* dy, int64_t n, int64_t c, int64_t hw, float* dx,
                                   cudaStream_t stream) {
  INT4DDP_CHECK(n >= 0 && c > 0 && hw > 0, "avgpool backward (cuda): bad shape ", n, "x", c, "x",
                hw);
  if (n == 0) return;
  const float inv = 1.0f / static_cast<float>(hw);
  avgpool_backward_kernel<<<blocks_for(n * c * hw), kThreads, 0, stream>>>(dy, n * c, hw, inv, dx);
  check_launch();
}

// ---- shortcut
// --------------------------------------------------------------------------------------

void residual_forward_async(const ShortcutShape& s, const float* body, const float* x, float* y,
                            cudaStream_t stream) {
  const ShortcutDims d = shortcut_dims(s);
  const int64_t count = s.n * s.out_channels * d.ho * d.wo;
  if (count == 0) return;
  residual_forward_kernel<<<blocks_for(count), kThreads, 0, stream>>>(d, body, x, y);
  check_launch();
}

void residual_backward_async(const ShortcutShape& s, const float* y, const float* dy, float* dsum,
                             cudaStream_t stream) {
  const ShortcutDims d = shortcut_dims(s);
  relu_backward_async(y, dy, dsum, s.n * s.out_channels * d.ho * d.wo, stream);
}

void shortcut_backward_add_async(const ShortcutShape& s, const float* dsum, float* dx,
                                 cudaStream_t stream) {
  const ShortcutDims d = shortcut_dims(s);
  const int64_t count = s.n * s.in_channels * d.ho * d.wo;
  if (count == 0) return;
  shortcut_backward_add_kernel<<<blocks_for(count), kThreads, 0, stream>>>(d, dsum, dx);
  check_launch();
}

// ---- loss
// ----------------------------------------------------------------------------------------

int64_t cross_entropy_workspace_count(int64_t n) { return 2 * std::max<int64_t>(n, 1); }

void softmax_cross_entropy_async(const float* logits, const int32_t* labels, int64_t n, int64_t k,
                                 float* dlogits, double* workspace, CrossEntropyResult* result,
                                 cudaStream_t stream) {
  INT4DDP_CHECK(n >= 0 && k > 0, "cross-entropy (cuda): bad shape ", n, "x", k);
  INT4DDP_CHECK(workspace && result && (n == 0 || (logits && labels)),
                "cross-entropy (cuda): null buffer");
  if (n > 0) {
    xent_sample_kernel<<<blocks_for(n), kThreads, 0, stream>>>(logits, labels, n, k, dlogits,
                                                               workspace);
    check_launch();
  }
  xent_finish_kernel<<<1, 1, 0, stream>>>(labels, n, workspace, result);
  check_launch();
}

CrossEntropyResult softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t n,
                                         int64_t k, float* dlogits, cudaStream_t stream) {
  double* ws = nullptr;
  CrossEntropyResult* dres = nullptr;
  const size_t ws_bytes = static_cast<size_t>(cross_entropy_workspace_count(n)) * sizeof(double);
  INT4DDP_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&ws), ws_bytes, stream));
  CrossEntropyResult r;
  try {
    INT4DDP_CUDA_CHECK(
        cudaMallocAsync(reinterpret_cast<void**>(&dres), sizeof(CrossEntropyResult), stream));
    softmax_cross_entropy_async(logits, labels, n, k, dlogits, ws, dres, stream);
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(&r, dres, sizeof r, cudaMemcpyDeviceToHost, stream));
    INT4DDP_CUDA_CHECK(cudaFreeAsync(dres, stream));
    INT4DDP_CUDA_CHECK(cudaFreeAsync(ws, stream));
    INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (...) {
    cudaStreamSynchronize(stream);
    if (dres) cudaFree(dres);
    cudaFree(ws);
    throw;
  }
  INT4DDP_CHECK(r.bad_sample < 0, "cross-entropy (cuda): label ", r.bad_label, " of sample ",
                r.bad_sample, " is outside 0..", k - 1);
  return r;
}

// ---- optimizers --------------------------------------------------------------------------------

void sgd_step_async(float* w, const float* g, float* v, int64_t count, const SgdScalars& s,
                    cudaStream_t stream) {
  check_count(count, "sgd (cuda)");
  if (count == 0) return;
  INT4DDP_CHECK(w && g && v, "sgd (cuda): null buffer");
  sgd_kernel<<<blocks_for(count), kThreads, 0, stream>>>(w, g, v, count, s);
  check_launch();
}

AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, int64_t step) {
  INT4DDP_CHECK(step >= 1, "adam (cuda): step ", step, " must be >= 1");
  // train::Optimizer::step's scalars, the same double expressions.
  const double c1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double c2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamScalars a;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.lr_t = static_cast<float>(lr / c1);
  a.inv_c2 = static_cast<float>(1.0 / c2);
  a.eps = static_cast<float>(eps);
  return a;
}

void adam_step_async(float* w, const float* g, float* m, float* s, int64_t count,
                     const AdamScalars& a, cudaStream_t stream) {
  check_count(count, "adam (cuda)");
  if (count == 0) return;
  INT4DDP_CHECK(w && g && m && s, "adam (cuda): null buffer");
  adam_kernel<<<blocks_for(count), kThreads, 0, stream>>>(w, g, m, s, count, a);
  check_launch();
}

void flag_nonfinite_async(const float* x, int64_t count, int32_t* flag, cudaStream_t stream) {
  check_count(count, "non-finite check (cuda)");
  if (count == 0) return;
  INT4DDP_CHECK(x && flag, "non-finite check (cuda): null buffer");
  flag_nonfinite_kernel<<<blocks_for(count), kThreads, 0, stream>>>(x, count, flag);
  check_launch();
}

}  // namespace int4ddp::math::cuda
