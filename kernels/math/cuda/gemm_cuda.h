// GEMMs on the GPU, row-major like kernels/math/gemm.h, counts in elements (never bytes). Every
// pointer is device memory; every call enqueues on `stream` and returns at once.
//
//   sgemm      C = alpha * op(A) * op(B) + beta * C in fp32 through cuBLAS (beta = 0 never reads
//              C). TF32 tensor cores are off unless GemmContext::set_tf32(true); atomics are
//              disallowed and the handle has its own fixed workspace, so a rerun on the same GPU
//              and toolkit gives the same bits (cuBLAS's reproducibility rule). Not bit-equal to
//              the CPU sgemm (another summation order): within K * 2^-24 * sum |a||b|.
//   int_gemm   C (=, or +=) scale * (op(A) * op(B)) on integer codes held one per byte, the
//              product summed exactly in int32 and rescaled once per output as
//              float(int32 sum) * scale (then + C when accumulating, a separate rounding, never an
//              FMA): bit for bit math::int_gemm / int_gemm_ref on the same codes.
//   int_gemm_i32  the exact int32 sums only, C = op(A) * op(B), for callers that add several
//              products exactly before one rescale (e.g. a long K split by the caller).
//
// int8 tensor cores through cuBLASLt IMMA (CUDA_R_8I inputs, CUBLAS_COMPUTE_32I, CUDA_R_32I
// output). IMMA takes only the "TN" column-major form with K contiguous in both operands, m and k
// multiples of 4, 4-aligned leading dimensions. In row-major terms that is op(A) (M, K) and op(B)^T
// (N, K) both with K contiguous: A with Trans::kNo and B with Trans::kYes. Operands in any other
// form (or with K, N, ld or the pointer not a multiple of 16) are first copied into the context's
// workspace in that form, K padded with zero codes to a multiple of 16 and N to a multiple of 4
// (zeros add nothing to an integer sum); the int32 result lands in the workspace and an epilogue
// kernel writes C. A plain tiled integer kernel (int32 multiply-adds, any layout, no workspace) is
// the fallback: IntGemmPath picks it, cuBLASLt, or (kAuto) cuBLASLt unless it refuses the problem.
//
// Codes: CodeType::kS8 bytes are int8 codes (|code| <= 127: weights, gradients, signed
// activations, b = 2..8); kU8 bytes are uint8 codes 0..255 (the unsigned activation grid, up to
// 2^8 - 1 at b = 8). A kU8 operand whose codes fit 0..127 (qmax <= 127) is read as int8 as it is;
// one with qmax > 127 enters the tensor cores as code - 128 (an int8) and the result is corrected
// exactly by 128 * the other operand's sums over K. At most one operand may be kU8 (the layers
// never multiply two activation operands). qmax is the caller's bound on |code| of each operand.
//
// Overflow guard: every partial sum of K products stays inside int32 when
// K * qmax_a * qmax_b < 2^31 (and so does the offset form's: |code - 128| <= 128 <= qmax); beyond
// it the call throws int4ddp::Error (split K and add int_gemm_i32 results in int64 instead).
//
// A GemmContext holds the cuBLAS and cuBLASLt handles and the workspaces of one device; create it
// once, after cudaSetDevice, and use it from one host thread with one stream at a time (calls on
// different streams must be ordered by the caller: the workspace is shared). Bad arguments throw
// int4ddp::Error before anything is enqueued; a failed CUDA or cuBLAS call throws Error naming it.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "kernels/math/gemm.h"

namespace int4ddp::math::cuda {

enum class CodeType : uint8_t { kS8 = 0, kU8 = 1 };

// One integer operand: op(X) is (rows, K) for A and (K, N) for B, X stored row-major with row
// stride ld (elements).
struct IntOperand {
  const void* data = nullptr;  // device, int8_t (kS8) or uint8_t (kU8) codes
  int64_t ld = 0;              // row stride of X as stored
  Trans trans = Trans::kNo;
  CodeType type = CodeType::kS8;
  int qmax = 127;  // bound on |code|: 1..127 for kS8, 1..255 for kU8
};

enum class IntGemmPath : uint8_t {
  kAuto = 0,      // cuBLASLt IMMA, or the fallback kernel where cuBLASLt finds no algorithm
  kCublasLt = 1,  // cuBLASLt IMMA or an Error
  kFallback = 2,  // the tiled integer kernel
};

// Largest K for which int_gemm accepts codes bounded by qmax_a and qmax_b (the int32 guard).
int64_t int32_max_k(int qmax_a, int qmax_b);

// How int_gemm lays out its cuBLASLt IMMA call for C (m, n) = op(A) op(B) (host planning only;
// exposed for tests). cuBLASLt sees the column-major "TN" problem D (np, m) = A'^T B' with
// A' = our B as a column-major (kp, np) matrix of leading dimension ld_b, B' = our A as (kp, m)
// of leading dimension ld_a, D the int32 sums (ld np): IMMA's rules want np, kp and every leading
// dimension multiples of 4, and K contiguous in both operands.
struct LtPlan {
  int64_t kp = 0, np = 0;                   // K padded to a multiple of 16, N to a multiple of 4
  bool a_direct = false, b_direct = false;  // the operand used in place (else packed)
  bool a_offset = false, b_offset = false;  // packed as code - 128 (uint8 codes above 127)
  int64_t ld_a = 0, ld_b = 0;               // leading dimensions of B' and A' (see above)
  // Scratch offsets (bytes) of packed A, packed B, the sums and the offset corrections, and its
  // size; each part starts on 256 bytes.
  size_t a_at = 0, b_at = 0, sums_at = 0, corr_at = 0, scratch_bytes = 0;
  bool fits_pack_grid = true;  // the pack kernels' K tiles fit a grid's y dimension
};
LtPlan plan_lt(int64_t m, int64_t n, int64_t k, const IntOperand& a, const IntOperand& b);

// Whether cuBLASLt's heuristic answer (its status, the count of results and the first result's
// state) means "no IMMA algorithm for this problem", which kAuto answers with the fallback kernel:
// NOT_SUPPORTED, or success with no result or with a result whose state is not success (its
// other fields are then invalid). Any other status is an error. A cublasLtMatmul call answering
// NOT_SUPPORTED is a refusal as well.
bool lt_refused(cublasStatus_t heuristic_status, int found, cublasStatus_t algo_state);

class GemmContext {
 public:
  GemmContext();  // on the current device
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  // TF32 tensor cores for sgemm (off by default: fp32 products and sums).
  void set_tf32(bool on);
  bool tf32() const;

  // The path the last int_gemm / int_gemm_i32 call took (kCublasLt or kFallback), for tests and
  // benchmarks.
  IntGemmPath last_int_path() const;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

void sgemm(GemmContext& ctx, Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc, cudaStream_t stream);

void int_gemm(GemmContext& ctx, int64_t m, int64_t n, int64_t k, const IntOperand& a,
              const IntOperand& b, float scale, bool accumulate, float* c, int64_t ldc,
              cudaStream_t stream, IntGemmPath path = IntGemmPath::kAuto);

void int_gemm_i32(GemmContext& ctx, int64_t m, int64_t n, int64_t k, const IntOperand& a,
                  const IntOperand& b, int32_t* c, int64_t ldc, cudaStream_t stream,
                  IntGemmPath path = IntGemmPath::kAuto);

// INT4 nibble-packed codes (the codec's layout, kernels/quant/format.h: element 2k in the low
// nibble of byte k) to one int8 code per element, e.g. the gradient codes of the CUDA codec before
// an int_gemm. out: count bytes.
void unpack_int4_async(const uint8_t* packed, int64_t count, int8_t* out, cudaStream_t stream);

}  // namespace int4ddp::math::cuda
