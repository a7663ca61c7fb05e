// Kernels of the quantized layers on the GPU (see qlayer_cuda.h). The element expressions are those
// of src/nn/quant_layers.cpp spelled with __fdiv_rn / __fmul_rn / __fsub_rn, so no compiler flag
// can change them (the library is built with -fmad=false -prec-div=true as well).
#include <cuda_runtime.h>

#include "kernels/common/error.h"
#include "kernels/math/cuda/qlayer_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "kernels/quant/format.h"

#if defined(__USE_FAST_MATH__)
#error "the quantized-layer kernels must not be built with --use_fast_math"
#endif

namespace int4ddp::math::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceBlocks = 512;  // blocks of a step-gradient reduction (fixed: the sum order)

unsigned blocks_for(int64_t count) {
  return static_cast<unsigned>((count + kThreads - 1) / kThreads);
}

void check_launch() { INT4DDP_CUDA_CHECK(cudaGetLastError()); }

void check_args(int64_t n, int bits, const char* what) {
  INT4DDP_CHECK(n >= 0, what, ": negative size ", n);
  INT4DDP_CHECK(quant::valid_bits(bits), what, ": bit-width ", bits, " is outside 2..8");
}

__device__ float clamp_to(float t, float lo, float hi) { return t < lo ? lo : (hi < t ? hi : t); }

__global__ void weight_codes_kernel(const float* __restrict__ w, int64_t n, float s, float lim,
                                    int8_t* __restrict__ codes) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float q = clamp_to(rintf(__fmul_rn(__fdiv_rn(w[i], s), lim)), -lim, lim);
  codes[i] = static_cast<int8_t>(static_cast<int>(q));
}

__global__ void act_codes_kernel(const float* __restrict__ x, int64_t n, float u, float q, float lo,
                                 bool is_signed, uint8_t* __restrict__ codes,
                                 unsigned long long* __restrict__ nans) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (nans != nullptr && x[i] != x[i]) atomicAdd(nans, 1ULL);  // a count: order-free
  const float c = rintf(__fmul_rn(clamp_to(__fdiv_rn(x[i], u), lo, 1.0f), q));
  const int v = static_cast<int>(c);
  codes[i] = is_signed ? static_cast<uint8_t>(static_cast<int8_t>(v)) : static_cast<uint8_t>(v);
}

// Block-level fixed-order sum of one double per thread (tree over shared memory); thread 0 gets it.
__device__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sh[threadIdx.x] += sh[threadIdx.x + stride];
    __syncthreads();
  }
  return sh[0];
}

// Thread t of block b sums elements b * kThreads + t + k * (kReduceBlocks * kThreads) in k order.
__global__ void weight_backward_kernel(const float* __restrict__ w, int64_t n, float s, float lim,
                                       const float* __restrict__ dwhat, float* __restrict__ dw,
                                       double* __restrict__ partial) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const float v = __fmul_rn(__fdiv_rn(w[i], s), lim);
    const float g = dwhat[i];
    if (fabsf(v) <= lim) {
      dw[i] = __fadd_rn(dw[i], g);
      acc += static_cast<double>(g) * static_cast<double>(__fsub_rn(rintf(v), v)) /
             static_cast<double>(lim);
    } else {
      acc += v > 0.0f ? g : -g;
    }
  }
  const double total = block_sum(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void act_backward_kernel(const float* __restrict__ x, int64_t n, float u, float q,
                                    float lo, float below, const float* __restrict__ dxhat,
                                    float* __restrict__ dx, double* __restrict__ partial) {
  __shared__ double sh[kThreads];
  double in_acc = 0.0, out_acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const float v = __fdiv_rn(x[i], u);
    const bool inside = v >= lo && v <= 1.0f;
    const float g = dxhat[i];
    if (dx) dx[i] = inside ? g : 0.0f;
    if (inside) {
      const float vq = __fmul_rn(v, q);
      in_acc += static_cast<double>(g) * static_cast<double>(__fsub_rn(rintf(vq), vq));
    } else {
      out_acc += static_cast<double>(__fmul_rn(g, v > 1.0f ? 1.0f : below));
    }
  }
  const double in_total = block_sum(in_acc, sh);
  __syncthreads();
  const double out_total = block_sum(out_acc, sh);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = in_total;
    partial[kReduceBlocks + blockIdx.x] = out_total;
  }
}

// One thread: the partials in block order; *out = in / divisor + out_part (out_part optional).
__global__ void finish_sum_kernel(const double* __restrict__ partial, int blocks, bool two,
                                  double divisor, double* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double a = 0.0, b = 0.0;
  for (int i = 0; i < blocks; ++i) a += partial[i];
  if (two)
    for (int i = 0; i < blocks; ++i) b += partial[kReduceBlocks + i];
  *out = two ? a / divisor + b : a;
}

__global__ void bias_grad_kernel(const int8_t* __restrict__ codes, int64_t rows, int64_t cols,
                                 float step, float* __restrict__ bias_grad) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float acc = bias_grad[j];
  for (int64_t i = 0; i < rows; ++i)
    acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(codes[i * cols + j]), step));
  bias_grad[j] = acc;
}

// dst (b, a, hw) = src (a, b, hw) with its two leading dimensions swapped; idx walks dst in order.
template <typename T>
__global__ void swap_planes_kernel(const T* __restrict__ src, int64_t a, int64_t b, int64_t hw,
                                   T* __restrict__ dst) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a * b * hw) return;
  dst[idx] = src[swap_planes_source(idx, a, b, hw)];
}

// acc += col[i] for each column entry of an image element (exact: the caller's int32 guard bounds
// every element's sum).
struct AddIntTerm {
  const int32_t* col;
  int32_t* acc;
  __device__ void operator()(int64_t i) const { *acc += col[i]; }
};

__global__ void col2im_i32_kernel(const int32_t* __restrict__ col, int64_t s0, int64_t g,
                                  ColGeometry c, float scale, float* __restrict__ images) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t image = c.channels * c.h * c.w;
  if (idx >= g * image) return;
  int32_t acc = 0;
  col2im_terms(c, idx, /*transposed=*/false, AddIntTerm{col, &acc});
  images[s0 * image + idx] = __fmul_rn(scale, static_cast<float>(acc));
}

__global__ void accumulate_i64_kernel(const int32_t* __restrict__ part, int64_t n, bool first,
                                      int64_t* __restrict__ acc) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc[i] = (first ? int64_t{0} : acc[i]) + part[i];
}

__global__ void scale_i64_kernel(const int64_t* __restrict__ acc, int64_t n, float scale,
                                 float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = __fmul_rn(scale, __ll2float_rn(static_cast<long long>(acc[i])));
}

__global__ void add_double_kernel(const double* __restrict__ value, float* __restrict__ grad) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *grad = __fadd_rn(*grad, static_cast<float>(*value));
}

unsigned reduce_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kReduceBlocks ? kReduceBlocks : b));
}

}  // namespace

int64_t step_grad_scratch_count() { return 2 * kReduceBlocks; }

void weight_codes_async(const float* w, int64_t n, float s, int bits, int8_t* codes,
                        cudaStream_t stream) {
  check_args(n, bits, "weight_codes (cuda)");
  if (n == 0) return;
  weight_codes_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      w, n, s, static_cast<float>(quant::levels(bits)), codes);
  check_launch();
}

void act_codes_async(const float* x, int64_t n, float u, int bits, bool is_signed, void* codes,
                     unsigned long long* nans, cudaStream_t stream) {
  check_args(n, bits, "act_codes (cuda)");
  if (n == 0) return;
  const float q = static_cast<float>(is_signed ? quant::levels(bits) : (1 << bits) - 1);
  act_codes_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      x, n, u, q, is_signed ? -1.0f : 0.0f, is_signed, static_cast<uint8_t*>(codes), nans);
  check_launch();
}

void weight_quant_backward_async(const float* w, int64_t n, float s, int bits, const float* dwhat,
                                 float* dw, double* ds, double* scratch, cudaStream_t stream) {
  check_args(n, bits, "weight_quant_backward (cuda)");
  const unsigned blocks = reduce_blocks(n);
  weight_backward_kernel<<<blocks, kThreads, 0, stream>>>(
      w, n, s, static_cast<float>(quant::levels(bits)), dwhat, dw, scratch);
  check_launch();
  finish_sum_kernel<<<1, 1, 0, stream>>>(scratch, static_cast<int>(blocks), false, 1.0, ds);
  check_launch();
}

void act_quant_backward_async(const float* x, int64_t n, float u, int bits, bool is_signed,
                              const float* dxhat, float* dx, double* du, double* scratch,
                              cudaStream_t stream) {
  check_args(n, bits, "act_quant_backward (cuda)");
  const float q = static_cast<float>(is_signed ? quant::levels(bits) : (1 << bits) - 1);
  const float lo = is_signed ? -1.0f : 0.0f;
  const unsigned blocks = reduce_blocks(n);
  act_backward_kernel<<<blocks, kThreads, 0, stream>>>(x, n, u, q, lo, lo, dxhat, dx, scratch);
  check_launch();
  finish_sum_kernel<<<1, 1, 0, stream>>>(scratch, static_cast<int>(blocks), true,
                                         static_cast<double>(q), du);
  check_launch();
}

void bias_grad_codes_async(const int8_t* codes, int64_t rows, int64_t cols, float step,
                           float* bias_grad, cudaStream_t stream) {
  INT4DDP_CHECK(rows >= 0 && cols >= 0, "bias_grad_codes (cuda): negative size");
  if (cols == 0) return;
  bias_grad_kernel<<<blocks_for(cols), kThreads, 0, stream>>>(codes, rows, cols, step, bias_grad);
  check_launch();
}

namespace {
template <typename T>
void swap_planes(const T* src, int64_t a, int64_t b, int64_t hw, T* dst, cudaStream_t stream,
                 const char* what) {
  INT4DDP_CHECK(a >= 0 && b >= 0 && hw >= 0, what, ": negative size");
  const int64_t n = a * b * hw;
  if (n == 0) return;
  swap_planes_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src, a, b, hw, dst);
  check_launch();
}
}  // namespace

void planes_by_channel_async(const int8_t* src, int64_t g, int64_t c, int64_t hw, int8_t* dst,
                             cudaStream_t stream) {
  swap_planes(src, g, c, hw, dst, stream, "planes_by_channel (cuda)");
}

void planes_by_sample_async(const float* src, int64_t g, int64_t c, int64_t hw, float* dst,
                            cudaStream_t stream) {
  swap_planes(src, c, g, hw, dst, stream, "planes_by_sample (cuda)");
}

void col2im_i32_scaled_async(const int32_t* col, int64_t s0, int64_t g, const ConvGeometry& geo,
                             float scale, float* images, cudaStream_t stream) {
  INT4DDP_CHECK(g >= 0 && s0 >= 0 && geo.out_h() > 0 && geo.out_w() > 0,
                "col2im_i32 (cuda): bad geometry");
  const int64_t n = g * geo.channels * geo.h * geo.w;
  if (n == 0) return;
  col2im_i32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(col, s0, g, col_geometry(geo, g), scale,
                                                            images);
  check_launch();
}

void accumulate_i64_async(const int32_t* part, int64_t n, bool first, int64_t* acc,
                          cudaStream_t stream) {
  INT4DDP_CHECK(n >= 0, "accumulate_i64 (cuda): negative size");
  if (n == 0) return;
  accumulate_i64_kernel<<<blocks_for(n), kThreads, 0, stream>>>(part, n, first, acc);
  check_launch();
}

void scale_i64_async(const int64_t* acc, int64_t n, float scale, float* out, cudaStream_t stream) {
  INT4DDP_CHECK(n >= 0, "scale_i64 (cuda): negative size");
  if (n == 0) return;
  scale_i64_kernel<<<blocks_for(n), kThreads, 0, stream>>>(acc, n, scale, out);
  check_launch();
}

void add_double_to_float_async(const double* value, float* grad, cudaStream_t stream) {
  add_double_kernel<<<1, 1, 0, stream>>>(value, grad);
  check_launch();
}

}  // namespace int4ddp::math::cuda
