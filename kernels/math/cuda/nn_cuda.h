// Device kernels of the trainer's layers (src/nn/layers.cpp) and optimizers (src/train/optim.cpp),
// each the CPU definition's formula in the CPU's operation order. Every pointer is device memory;
// every *_async call enqueues on `stream` and returns at once; bad arguments throw int4ddp::Error
// before anything is enqueued, a failed CUDA call throws Error naming it.
//
// Determinism: no float atomics anywhere. Every reduction runs in an order fixed by the shape
// alone (never by the GPU's SM count or by timing), so a rerun gives the same bits.
//
// Equality with the CPU, kernel by kernel:
//   bit for bit   im2col, col2im (a gather that adds each image element's contributions in the
//                 CPU scatter's (ky, kx) order), ReLU, max pooling, global average pooling (one
//                 thread per plane sums in double in the CPU's order), the option-A shortcut, the
//                 bias sums of Linear, SGD and Adam steps.
//   close         BatchNorm: the batch sums are double sums in another (fixed) order, so mean and
//                 variance can differ from the CPU's in the last float bit; everything after them
//                 is the CPU's float expression. Softmax cross-entropy: the device's double exp and
//                 log are within 1 ulp of glibc's, so loss and dlogits can differ in the last
//                 float bit; the argmax count is exact.
// Built with -fmad=false -prec-div=true -prec-sqrt=true -ftz=false (cmake/cuda.cmake); the float
// expressions that must equal the CPU's are also spelled with __fmul_rn / __fadd_rn / __fdiv_rn so
// that no flag can contract them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/math/cuda/conv_index.h"  // ConvGeometry and the columns' index math

namespace int4ddp::math::cuda {

// ---- convolution columns ------------------------------------------------------------------------

// Columns of samples s0..s0+g-1 of `images`: col (channels*k*k, g*ho*wo), row r = (c*k + ky)*k +
// kx, sample s at column offset s*ho*wo (Conv2d::im2col's layout), zero (code 0) outside the image.
// transposed = true writes col^T instead, (g*ho*wo, channels*k*k) row-major: K contiguous, the
// integer GEMM's native B operand (gemm_cuda.h). T: float, int8_t, uint8_t (codes).
template <typename T>
void im2col_async(const T* images, int64_t s0, int64_t g, const ConvGeometry& geo, bool transposed,
                  T* col, cudaStream_t stream);

// The adjoint, accumulated: images[samples s0..s0+g-1] += col2im(col), col in either layout. Each
// image element gathers its contributions and adds them in (ky, kx) order: the CPU scatter's
// order, so the result is bit-identical to Conv2d::col2im on the same input.
void col2im_async(const float* col, int64_t s0, int64_t g, const ConvGeometry& geo, bool transposed,
                  float* images, cudaStream_t stream);

// ---- BatchNorm (over (n, hw) per channel of an (n, c, hw) tensor, hw = 1 for (n, c)) ------------

struct BatchNormShape {
  int64_t n = 0, channels = 0, hw = 1;
};

struct BatchNormParams {
  const float* gamma = nullptr;   // (channels)
  const float* beta = nullptr;    // (channels)
  float* running_mean = nullptr;  // (channels) updated by a training forward
  float* running_var = nullptr;   // (channels) updated by a training forward (unbiased variance)
  // Written by forward, read by the backward of the same step: the statistics used (batch or
  // running) and y = x * scale + shift.
  float* save_mean = nullptr;    // (channels)
  float* save_invstd = nullptr;  // (channels)
  float* save_scale = nullptr;   // (channels)
  float* save_shift = nullptr;   // (channels)
  float momentum = 0.1f;
  float eps = 1e-5f;
  bool relu = false;  // fused ReLU: y = max(0, BN(x)), as BatchNorm::with_relu
};

// Doubles of workspace forward and backward need (the per-slice partial sums).
int64_t batchnorm_workspace_count(const BatchNormShape& s);

// y = BN(x) with batch statistics (train: running statistics updated as the CPU does it, with
// the unbiased variance) or the running ones (eval).
void batchnorm_forward_async(const BatchNormShape& s, const float* x, float* y, bool train,
                             const BatchNormParams& p, double* workspace, cudaStream_t stream);

// Training-mode backward from the forward's saved statistics: gamma_grad and beta_grad are
// ACCUMULATED (+=, as Param::grad); dx (may be null) is written. With relu, dy is masked where
// x * scale + shift <= 0 (the forward's own float expression, so exactly where y was 0).
void batchnorm_backward_async(const BatchNormShape& s, const float* x, const float* dy, float* dx,
                              float* gamma_grad, float* beta_grad, const BatchNormParams& p,
                              double* workspace, cudaStream_t stream);

// ---- element-wise
// ----------------------------------------------------------------------------------

// y = x > 0 ? x : 0;  dx = x > 0 ? dy : 0 (count elements).
void relu_forward_async(const float* x, float* y, int64_t count, cudaStream_t stream);
void relu_backward_async(const float* x, const float* dy, float* dx, int64_t count,
                         cudaStream_t stream);

// Linear's bias: y (rows, cols) += bias per column; grad[j] += sum over rows i of dy[i, j], added
// one row at a time in row order (Linear::backward's order).
void bias_add_rows_async(float* y, const float* bias, int64_t rows, int64_t cols,
                         cudaStream_t stream);
void bias_grad_rows_async(const float* dy, int64_t rows, int64_t cols, float* grad,
                          cudaStream_t stream);

// ---- pooling
// ---------------------------------------------------------------------------------------

// MaxPool2d (nn::MaxPool2d): square window, stride >= 1, 0 <= pad <= window / 2; output size
// (h + 2 pad - window) / stride + 1. Padding never wins (each window is clipped to the plane); a
// NaN in a window is its maximum.
struct PoolGeometry {
  int window = 2, stride = 2, pad = 0;
  __host__ __device__ int64_t out_size(int64_t in) const {
    return (in + 2 * pad - window) / stride + 1;
  }
};
// argmax (n*c*ho*wo) holds the index within the (h, w) plane of each output's first maximum
// (row-major scan of the clipped window, strict >, the first NaN), as the CPU caches it.
void maxpool_forward_async(const float* x, int64_t n, int64_t c, int64_t h, int64_t w,
                           const PoolGeometry& g, float* y, int32_t* argmax, cudaStream_t stream);
// dx (n, c, h, w) written whole: each element is 0 plus the dy of every output whose argmax it is,
// added in output order (overlapping windows, stride < window, sum in MaxPool2d::backward's order;
// one thread per input element gathers, no atomics).
void maxpool_backward_async(const float* dy, const int32_t* argmax, int64_t n, int64_t c, int64_t h,
                            int64_t w, const PoolGeometry& g, float* dx, cudaStream_t stream);

// GlobalAvgPool: y (n, c) = mean over hw (double sum in element order); dx = dy / hw.
void global_avgpool_forward_async(const float* x, int64_t n, int64_t c, int64_t hw, float* y,
                                  cudaStream_t stream);
void global_avgpool_backward_async(const float* dy, int64_t n, int64_t c, int64_t hw, float* dx,
                                   cudaStream_t stream);

// ---- the residual block's option-A shortcut
// --------------------------------------------------------

// x (n, in_channels, h, w); body and y (n, out_channels, ho, wo) with ho = ceil(h / stride). The
// shortcut is x subsampled by stride for channels < in_channels and zero for the rest.
struct ShortcutShape {
  int64_t n = 0, in_channels = 0, out_channels = 0, h = 0, w = 0;
  int stride = 1;  // 1 or 2
};
// y = relu(body + shortcut(x)).
void residual_forward_async(const ShortcutShape& s, const float* body, const float* x, float* y,
                            cudaStream_t stream);
// dsum = y > 0 ? dy : 0 (the gradient of body and shortcut).
void residual_backward_async(const ShortcutShape& s, const float* y, const float* dy, float* dsum,
                             cudaStream_t stream);
// dx += shortcut^T(dsum): channels < in_channels at the subsampled positions.
void shortcut_backward_add_async(const ShortcutShape& s, const float* dsum, float* dx,
                                 cudaStream_t stream);

// ---- loss
// ----------------------------------------------------------------------------------------

// Mean softmax cross-entropy over n samples of k logits (nn::softmax_cross_entropy).
struct CrossEntropyResult {
  float loss = 0.0f;        // mean loss
  int64_t correct = 0;      // samples whose first maximum logit is the label
  int64_t bad_sample = -1;  // first sample whose label is outside 0..k-1, or -1
  int32_t bad_label = 0;    // its label
};
// Doubles of workspace softmax_cross_entropy_async needs.
int64_t cross_entropy_workspace_count(int64_t n);
// result: device. dlogits (n, k), already divided by n, may be null. A bad label leaves loss NaN
// and bad_sample set (the synchronous wrapper throws).
void softmax_cross_entropy_async(const float* logits, const int32_t* labels, int64_t n, int64_t k,
                                 float* dlogits, double* workspace, CrossEntropyResult* result,
                                 cudaStream_t stream);
// Waits for the stream and returns the result; a bad label throws int4ddp::Error naming it.
CrossEntropyResult softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t n,
                                         int64_t k, float* dlogits, cudaStream_t stream);

// ---- optimizers (train::Optimizer::step)
// -----------------------------------------------------------

// v <- mu v + (g + wd w); w <- w - lr v (nesterov: w <- w - lr ((g + wd w) + mu v)). weight_decay
// is 0 for parameters without decay.
struct SgdScalars {
  float lr = 0.0f, momentum = 0.9f, weight_decay = 0.0f;
  bool nesterov = false;
};
void sgd_step_async(float* w, const float* g, float* v, int64_t count, const SgdScalars& s,
                    cudaStream_t stream);

// m <- b1 m + (1 - b1) g; s <- b2 s + (1 - b2) g g; w <- w - lr_t m / (sqrt(s * inv_c2) + eps)
struct AdamScalars {
  float beta1 = 0.9f, beta2 = 0.999f;
  float lr_t = 0.0f;    // lr / (1 - beta1^step)
  float inv_c2 = 1.0f;  // 1 / (1 - beta2^step)
  float eps = 1e-8f;
};
// The scalars of step `step` (1-based, counted as train::Optimizer counts them).
AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, int64_t step);
void adam_step_async(float* w, const float* g, float* m, float* s, int64_t count,
                     const AdamScalars& a, cudaStream_t stream);

// ---- checks
// ----------------------------------------------------------------------------------------

// *flag (device int32) = 1 when some x[i] of count is NaN or +-Inf (|x| > FLT_MAX, the test of
// std::isfinite); left as it is otherwise, so zero it first. Every thread that finds one stores
// the same 1: no atomics, and the result does not depend on the order.
void flag_nonfinite_async(const float* x, int64_t count, int32_t* flag, cudaStream_t stream);

}  // namespace int4ddp::math::cuda
