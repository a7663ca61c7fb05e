// GPU GEMMs (see gemm_cuda.h). The integer GEMM's results are exact integers whatever the
// summation order, so the only float operations are the epilogue's float(sum) * scale and the
// optional + C, spelled __fmul_rn / __fadd_rn so that no flag can contract them into an FMA:
// those are the two roundings of math::int_gemm_ref.
//
// Kernels:
//   pack_kernel<T>        op(X) -> (rows_pad, kp) int8, K contiguous, zero-padded, optionally
//                         code - 128: a 64 x 64 byte tile through shared memory so that both the
//                         read (along X's contiguous dimension) and the write are coalesced.
//   row_sums_kernel       128 * the sum over K of each row of a K-contiguous int8 matrix (the
//                         correction of an offset operand), one warp per row.
//   epilogue_kernel<F>    C from the int32 result (+ corrections): float(s) * scale (+ C), or s.
//   fallback_kernel<F>    64 x 64 output tile per 256 threads, 4 x 4 outputs per thread, int32
//                         multiply-adds over K tiles of 16 read straight from the operands (any
//                         layout, int8 or uint8 codes): the path for whatever cuBLASLt refuses.
//   unpack_int4_kernel    nibbles -> int8 codes.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>

#include "kernels/common/error.h"
#include "kernels/math/cuda/cublas_check.h"
#include "kernels/math/cuda/gemm_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "kernels/quant/format.h"

namespace int4ddp::math::cuda {

namespace {

constexpr size_t kBlasWorkspaceBytes = size_t{32} << 20;  // cuBLAS sgemm (fixed: reproducible)
constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;    // cuBLASLt IMMA algorithms
constexpr int64_t kPackK = 16;   // K of packed operands: a multiple of 16 (16-byte rows)
constexpr int64_t kPackN = 4;    // rows of the packed B (cuBLASLt's m): a multiple of 4
constexpr int64_t kAlign = 256;  // workspace sub-buffers start on 256 bytes
constexpr int kTile = 64;        // pack tile and fallback output tile
constexpr int kFallbackK = 16;   // fallback K tile

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int check_int(int64_t v, const char* what) {
  INT4DDP_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "gemm (cuda): ", what, " = ", v,
                " does not fit the 32-bit size cuBLAS takes");
  return static_cast<int>(v);
}

// Row stride check of a row-major (rows, cols) matrix as stored.
void check_ld(int64_t ld, int64_t cols, const char* what) {
  INT4DDP_CHECK(ld >= std::max<int64_t>(1, cols), "gemm (cuda): ", what, " = ", ld,
                " is less than the ", cols, " columns it holds");
}

// ---- kernels --------------------------------------------------------------------------------

// dst (rows_pad, kp) row-major: dst[r, p] = op(X)[r, p] (as int8, minus 128 when `offset`) for
// r < rows, p < k, else 0. op(X)[r, p] = X[r * ld + p] (kNo) or X[p * ld + r] (kYes).
template <bool kTrans>
__global__ void pack_kernel(const uint8_t* __restrict__ x, int64_t ld, int64_t rows, int64_t k,
                            int64_t rows_pad, int64_t kp, bool offset, int8_t* __restrict__ dst) {
  __shared__ uint8_t tile[kTile][kTile + 1];  // [r local][p local]
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int outer = i / kTile, inner = i % kTile;  // inner runs along X's contiguous dimension
    const int rl = kTrans ? inner : outer, pl = kTrans ? outer : inner;
    const int64_t r = r0 + rl, p = p0 + pl;
    uint8_t v = 0;
    if (r < rows && p < k) {
      v = kTrans ? x[p * ld + r] : x[r * ld + p];
      if (offset) v ^= 0x80u;  // uint8 u -> int8 u - 128
    }
    tile[rl][pl] = v;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int rl = i / kTile, pl = i % kTile;
    const int64_t r = r0 + rl, p = p0 + pl;
    if (r < rows_pad && p < kp) dst[r * kp + p] = static_cast<int8_t>(tile[rl][pl]);
  }
}

// out[r] = 128 * sum_p x[r * ld + p] (int8 codes), one warp per row.
__global__ void row_sums_kernel(const int8_t* __restrict__ x, int64_t ld, int64_t rows, int64_t k,
                                int32_t* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  int32_t s = 0;
  for (int64_t p = lane; p < k; p += 32) s += x[r * ld + p];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) out[r] = 128 * s;
}

struct EpilogueArgs {
  const int32_t* sums;      // (m, ld_sums) int32 products
  int64_t ld_sums;          //
  const int32_t* row_corr;  // (m) or null
  const int32_t* col_corr;  // (n) or null
  int64_t m, n;
  float scale;
  bool accumulate;
  void* c;  // float or int32_t
  int64_t ldc;
};

template <bool kFloatOut>
__global__ void epilogue_kernel(EpilogueArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.m * a.n) return;
  const int64_t i = idx / a.n, j = idx % a.n;
  int32_t s = a.sums[i * a.ld_sums + j];
  if (a.row_corr) s += a.row_corr[i];
  if (a.col_corr) s += a.col_corr[j];
  if (kFloatOut) {
    float* c = static_cast<float*>(a.c) + i * a.ldc + j;
    const float v = __fmul_rn(a.scale, __int2float_rn(s));
    *c = a.accumulate ? __fadd_rn(*c, v) : v;
  } else {
    static_cast<int32_t*>(a.c)[i * a.ldc + j] = s;
  }
}

struct FallbackArgs {
  int64_t m, n, k;
  IntOperand a, b;
  float scale;
  bool accumulate;
  void* c;  // float or int32_t
  int64_t ldc;
};

// Code (r, p) of op(X), 0 outside (rows, cols).
__device__ __forceinline__ int code_at(const IntOperand& x, int64_t r, int64_t p, int64_t rows,
                                       int64_t cols) {
  if (r >= rows || p >= cols) return 0;
  const int64_t off = x.trans == Trans::kNo ? r * x.ld + p : p * x.ld + r;
  const uint8_t byte = static_cast<const uint8_t*>(x.data)[off];
  return x.type == CodeType::kU8 ? static_cast<int>(byte)
                                 : static_cast<int>(static_cast<int8_t>(byte));
}

template <bool kFloatOut>
__global__ void __launch_bounds__(256) fallback_kernel(FallbackArgs f) {
  __shared__ int as[kFallbackK][kTile + 1];  // [p][i]
  __shared__ int bs[kFallbackK][kTile + 1];  // [p][j]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  int acc[4][4] = {};
  for (int64_t p0 = 0; p0 < f.k; p0 += kFallbackK) {
    for (int e = threadIdx.x; e < kTile * kFallbackK; e += blockDim.x) {
      const int row = e / kFallbackK, p = e % kFallbackK;
      as[p][row] = code_at(f.a, i0 + row, p0 + p, f.m, f.k);
      const int col = e % kTile, q = e / kTile;
      bs[q][col] = code_at(f.b, p0 + q, j0 + col, f.k, f.n);
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < kFallbackK; ++p) {
      int av[4], bv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        av[u] = as[p][ty + 16 * u];
        bv[u] = bs[p][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += av[u] * bv[v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = i0 + ty + 16 * u, j = j0 + tx + 16 * v;
      if (i >= f.m || j >= f.n) continue;
      if (kFloatOut) {
        float* c = static_cast<float*>(f.c) + i * f.ldc + j;
        const float val = __fmul_rn(f.scale, __int2float_rn(acc[u][v]));
        *c = f.accumulate ? __fadd_rn(*c, val) : val;
      } else {
        static_cast<int32_t*>(f.c)[i * f.ldc + j] = acc[u][v];
      }
    }
}

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ packed, int64_t count,
                                   int8_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const uint8_t byte = packed[i / 2];
  out[i] = static_cast<int8_t>(i % 2 == 0 ? quant::unpack_lo(byte) : quant::unpack_hi(byte));
}

unsigned blocks_for(int64_t count, int threads) {
  return static_cast<unsigned>((count + threads - 1) / threads);
}

// One RAII holder per cuBLASLt descriptor type.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

// ---- context --------------------------------------------------------------------------------

struct GemmContext::Impl {
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* blas_ws = nullptr;  // (kBlasWorkspaceBytes) device
  void* lt_ws = nullptr;    // (kLtWorkspaceBytes) device
  void* scratch = nullptr;  // (scratch_bytes) device: packed operands, int32 sums, corrections
  size_t scratch_bytes = 0;
  bool tf32 = false;
  IntGemmPath last = IntGemmPath::kFallback;

  // Scratch of at least `bytes`; growing waits for `stream` (the old buffer may be in use).
  char* reserve(size_t bytes, cudaStream_t stream) {
    if (bytes > scratch_bytes) {
      INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (scratch) INT4DDP_CUDA_CHECK(cudaFree(scratch));
      scratch = nullptr;
      scratch_bytes = 0;
      INT4DDP_CUDA_CHECK(cudaMalloc(&scratch, bytes));
      scratch_bytes = bytes;
    }
    return static_cast<char*>(scratch);
  }
};

GemmContext::GemmContext() : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  INT4DDP_CUBLAS_CHECK(cublasCreate(&s.blas));
  INT4DDP_CUBLAS_CHECK(cublasLtCreate(&s.lt));
  INT4DDP_CUBLAS_CHECK(cublasSetAtomicsMode(s.blas, CUBLAS_ATOMICS_NOT_ALLOWED));
  INT4DDP_CUBLAS_CHECK(cublasSetMathMode(s.blas, CUBLAS_DEFAULT_MATH));
  INT4DDP_CUBLAS_CHECK(cublasSetPointerMode(s.blas, CUBLAS_POINTER_MODE_HOST));
  INT4DDP_CUDA_CHECK(cudaMalloc(&s.blas_ws, kBlasWorkspaceBytes));
  INT4DDP_CUDA_CHECK(cudaMalloc(&s.lt_ws, kLtWorkspaceBytes));
}

GemmContext::~GemmContext() {
  Impl& s = *impl_;
  // Destructors do not throw: a failure here has nothing left to protect.
  if (s.scratch) cudaFree(s.scratch);
  if (s.lt_ws) cudaFree(s.lt_ws);
  if (s.blas_ws) cudaFree(s.blas_ws);
  if (s.lt) cublasLtDestroy(s.lt);
  if (s.blas) cublasDestroy(s.blas);
}

void GemmContext::set_tf32(bool on) {
  INT4DDP_CUBLAS_CHECK(
      cublasSetMathMode(impl_->blas, on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  impl_->tf32 = on;
}

bool GemmContext::tf32() const { return impl_->tf32; }

IntGemmPath GemmContext::last_int_path() const { return impl_->last; }

// ---- sgemm ----------------------------------------------------------------------------------

void sgemm(GemmContext& ctx, Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc, cudaStream_t stream) {
  INT4DDP_CHECK(m >= 0 && n >= 0 && k >= 0, "sgemm (cuda): negative size m=", m, " n=", n,
                " k=", k);
  if (m == 0 || n == 0) return;
  INT4DDP_CHECK(c && (k == 0 || (a && b)), "sgemm (cuda): null operand");
  check_ld(lda, ta == Trans::kNo ? k : m, "lda");
  check_ld(ldb, tb == Trans::kNo ? n : k, "ldb");
  check_ld(ldc, n, "ldc");
  GemmContext::Impl& s = ctx.impl();
  // Row-major C (m, n) is column-major C^T (n, m) = op(B)^T op(A)^T; a row-major X read as
  // column-major is X^T, so op(B)^T is B as stored when tb = kNo, else its transpose.
  const cublasOperation_t ob = tb == Trans::kNo ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t oa = ta == Trans::kNo ? CUBLAS_OP_N : CUBLAS_OP_T;
  INT4DDP_CUBLAS_CHECK(cublasSetStream(s.blas, stream));
  // cublasSetStream resets the workspace to the default pool: set ours again after it.
  INT4DDP_CUBLAS_CHECK(cublasSetWorkspace(s.blas, s.blas_ws, kBlasWorkspaceBytes));
  INT4DDP_CUBLAS_CHECK(cublasSgemm(s.blas, ob, oa, check_int(n, "n"), check_int(m, "m"),
                                   check_int(k, "k"), &alpha, b, check_int(ldb, "ldb"), a,
                                   check_int(lda, "lda"), &beta, c, check_int(ldc, "ldc")));
}

// ---- integer GEMM ---------------------------------------------------------------------------

int64_t int32_max_k(int qmax_a, int qmax_b) {
  INT4DDP_CHECK(qmax_a > 0 && qmax_b > 0, "int_gemm (cuda): code bounds must be positive, got ",
                qmax_a, " and ", qmax_b);
  // K * qmax_a * qmax_b < 2^31, i.e. <= 2^31 - 1.
  return ((int64_t{1} << 31) - 1) / (int64_t{qmax_a} * qmax_b);
}

namespace {

void check_operand(const IntOperand& x, const char* name, int64_t rows, int64_t cols) {
  const int limit = x.type == CodeType::kS8 ? 127 : 255;
  INT4DDP_CHECK(x.qmax >= 1 && x.qmax <= limit, "int_gemm (cuda): qmax of ", name, " = ", x.qmax,
                " is outside 1..", limit, " for ", x.type == CodeType::kS8 ? "int8" : "uint8",
                " codes");
  // op(X) is (rows, cols); X as stored is that or its transpose.
  check_ld(x.ld, x.trans == Trans::kNo ? cols : rows, name);
}

// Where an operand comes from in the cuBLASLt call: as it is, or packed into the workspace.
struct LtOperand {
  bool direct;  // used in place (K contiguous int8 codes, aligned, no offset)
  bool offset;  // packed as code - 128
  const int8_t* ptr;
  int64_t ld;
};

bool offset_needed(const IntOperand& x) { return x.type == CodeType::kU8 && x.qmax > 127; }

}  // namespace

bool lt_refused(cublasStatus_t heuristic_status, int found, cublasStatus_t algo_state) {
  if (heuristic_status == CUBLAS_STATUS_NOT_SUPPORTED) return true;
  return heuristic_status == CUBLAS_STATUS_SUCCESS &&
         (found <= 0 || algo_state != CUBLAS_STATUS_SUCCESS);
}

namespace {

// The largest power of two up to 256 dividing p's address. cuBLASLt's heuristic assumes 256-byte
// aligned buffers unless CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES says less, and an operand used
// in place need only be 16-byte aligned.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

// An operand op(X) (rows, k) whose K-contiguous form is X itself (trans == want) can enter
// cuBLASLt in place when it needs no offset and K, ld, rows and the pointer meet IMMA's rules.
bool usable_in_place(const IntOperand& x, Trans want, int64_t k, int64_t rows_multiple_of,
                     int64_t rows) {
  return x.trans == want && !offset_needed(x) && k % kPackK == 0 && x.ld % kPackK == 0 &&
         rows % rows_multiple_of == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
}

}  // namespace

LtPlan plan_lt(int64_t m, int64_t n, int64_t k, const IntOperand& a, const IntOperand& b) {
  LtPlan p;
  p.kp = round_up(k, kPackK);
  p.np = round_up(n, kPackN);
  // A as (m, kp) with K contiguous: stored A when ta = kNo. B as (np, kp): stored B when tb = kYes.
  p.a_direct = usable_in_place(a, Trans::kNo, k, 1, m);
  p.b_direct = usable_in_place(b, Trans::kYes, k, kPackN, n);
  p.a_offset = offset_needed(a);
  p.b_offset = offset_needed(b);
  p.ld_a = p.a_direct ? a.ld : p.kp;
  p.ld_b = p.b_direct ? b.ld : p.kp;
  // Scratch: packed A, packed B, int32 sums (m, np), the offset operand's corrections; each part
  // starts on kAlign bytes.
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = static_cast<size_t>(round_up(static_cast<int64_t>(off + bytes), kAlign));
    return at;
  };
  p.a_at = p.a_direct ? 0 : take(static_cast<size_t>(m * p.kp));
  p.b_at = p.b_direct ? 0 : take(static_cast<size_t>(p.np * p.kp));
  p.sums_at = take(static_cast<size_t>(m * p.np) * sizeof(int32_t));
  p.corr_at = take(static_cast<size_t>(p.a_offset ? p.np : (p.b_offset ? m : 0)) * sizeof(int32_t));
  p.scratch_bytes = std::max<size_t>(off, 1);
  // The pack grid's y dimension (K tiles) is limited to 65535.
  p.fits_pack_grid = (p.kp + kTile - 1) / kTile <= 65535;
  return p;
}

namespace {

// C (float, or int32 when c32) through cuBLASLt. Returns false (nothing enqueued) when cuBLASLt
// finds no algorithm for the problem.
bool lt_gemm(GemmContext::Impl& s, int64_t m, int64_t n, int64_t k, const IntOperand& a,
             const IntOperand& b, float scale, bool accumulate, void* c, bool c32, int64_t ldc,
             cudaStream_t stream) {
  const LtPlan pl = plan_lt(m, n, k, a, b);
  if (!pl.fits_pack_grid) return false;
  const int64_t kp = pl.kp, np = pl.np, ld_a = pl.ld_a, ld_b = pl.ld_b;
  const bool a_direct = pl.a_direct, b_direct = pl.b_direct;
  const bool a_off = pl.a_offset, b_off = pl.b_offset;

  LtDescs d;
  INT4DDP_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32I, CUDA_R_32I));
  const cublasOperation_t opt = CUBLAS_OP_T, opn = CUBLAS_OP_N;
  INT4DDP_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &opt, sizeof opt));
  INT4DDP_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &opn, sizeof opn));
  // Column-major view: cuBLASLt's A is our B in (np, kp) K-contiguous form, i.e. a column-major
  // (kp, np) matrix used transposed; its B is our A, column-major (kp, m); D = A^T B is
  // column-major (np, m), which is row-major (m, np): C's sums with row stride np.
  INT4DDP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.la, CUDA_R_8I, static_cast<uint64_t>(kp),
                                                  static_cast<uint64_t>(np), ld_b));
  INT4DDP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.lb, CUDA_R_8I, static_cast<uint64_t>(kp),
                                                  static_cast<uint64_t>(m), ld_a));
  INT4DDP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.lc, CUDA_R_32I, static_cast<uint64_t>(np),
                                                  static_cast<uint64_t>(m), np));
  INT4DDP_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  const uint64_t ws = kLtWorkspaceBytes;
  INT4DDP_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  // cuBLASLt's A is our B, its B our A; packed operands and the sums start on kAlign bytes.
  const uint32_t align_lt_a = b_direct ? alignment_of(b.data) : 256;
  const uint32_t align_lt_b = a_direct ? alignment_of(a.data) : 256;
  INT4DDP_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_lt_a, sizeof align_lt_a));
  INT4DDP_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_lt_b, sizeof align_lt_b));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const cublasStatus_t hs =
      cublasLtMatmulAlgoGetHeuristic(s.lt, d.op, d.la, d.lb, d.lc, d.lc, d.pref, 1, &heur, &found);
  if (lt_refused(hs, found, heur.state)) return false;
  INT4DDP_CUBLAS_CHECK(hs);

  char* ws_base = s.reserve(pl.scratch_bytes, stream);
  int8_t* a_pack = reinterpret_cast<int8_t*>(ws_base + pl.a_at);
  int8_t* b_pack = reinterpret_cast<int8_t*>(ws_base + pl.b_at);
  int32_t* sums = reinterpret_cast<int32_t*>(ws_base + pl.sums_at);
  int32_t* corr = reinterpret_cast<int32_t*>(ws_base + pl.corr_at);
  auto pack = [&](const IntOperand& x, Trans k_contiguous, int64_t rows, int64_t rows_pad,
                  bool offset, int8_t* dst) {
    const dim3 grid(static_cast<unsigned>((rows_pad + kTile - 1) / kTile),
                    static_cast<unsigned>((kp + kTile - 1) / kTile));
    const auto* src = static_cast<const uint8_t*>(x.data);
    if (x.trans == k_contiguous)
      pack_kernel<false><<<grid, 256, 0, stream>>>(src, x.ld, rows, k, rows_pad, kp, offset, dst);
    else
      pack_kernel<true><<<grid, 256, 0, stream>>>(src, x.ld, rows, k, rows_pad, kp, offset, dst);
    INT4DDP_CUDA_CHECK(cudaGetLastError());
  };
  const int8_t* a_ptr = static_cast<const int8_t*>(a.data);
  const int8_t* b_ptr = static_cast<const int8_t*>(b.data);
  if (!a_direct) {
    pack(a, Trans::kNo, m, m, a_off, a_pack);
    a_ptr = a_pack;
  }
  if (!b_direct) {
    pack(b, Trans::kYes, n, np, b_off, b_pack);
    b_ptr = b_pack;
  }
  // Offset operand: sum (x - 128 + 128) y = sum (x - 128) y + 128 * sum y over K.
  const int32_t* row_corr = nullptr;
  const int32_t* col_corr = nullptr;
  if (a_off) {
    row_sums_kernel<<<blocks_for(np, 8), 256, 0, stream>>>(b_ptr, ld_b, np, kp, corr);
    INT4DDP_CUDA_CHECK(cudaGetLastError());
    col_corr = corr;
  } else if (b_off) {
    row_sums_kernel<<<blocks_for(m, 8), 256, 0, stream>>>(a_ptr, ld_a, m, kp, corr);
    INT4DDP_CUDA_CHECK(cudaGetLastError());
    row_corr = corr;
  }
  const int32_t one = 1, zero = 0;
  // An algorithm the heuristic offered can still be refused at the call (NOT_SUPPORTED, nothing
  // enqueued): the caller falls back as for no algorithm (the packs above only wrote scratch).
  const cublasStatus_t ms =
      cublasLtMatmul(s.lt, d.op, &one, b_ptr, d.la, a_ptr, d.lb, &zero, sums, d.lc, sums, d.lc,
                     &heur.algo, s.lt_ws, kLtWorkspaceBytes, stream);
  if (ms == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  INT4DDP_CUBLAS_CHECK(ms);
  EpilogueArgs e{sums, np, row_corr, col_corr, m, n, scale, accumulate, c, ldc};
  if (c32)
    epilogue_kernel<false><<<blocks_for(m * n, 256), 256, 0, stream>>>(e);
  else
    epilogue_kernel<true><<<blocks_for(m * n, 256), 256, 0, stream>>>(e);
  INT4DDP_CUDA_CHECK(cudaGetLastError());
  return true;
}

void fallback_gemm(int64_t m, int64_t n, int64_t k, const IntOperand& a, const IntOperand& b,
                   float scale, bool accumulate, void* c, bool c32, int64_t ldc,
                   cudaStream_t stream) {
  const int64_t tiles_m = (m + kTile - 1) / kTile, tiles_n = (n + kTile - 1) / kTile;
  INT4DDP_CHECK(tiles_n <= 65535, "int_gemm (cuda): n = ", n, " exceeds the fallback's grid");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  FallbackArgs f{m, n, k, a, b, scale, accumulate, c, ldc};
  if (c32)
    fallback_kernel<false><<<grid, 256, 0, stream>>>(f);
  else
    fallback_kernel<true><<<grid, 256, 0, stream>>>(f);
  INT4DDP_CUDA_CHECK(cudaGetLastError());
}

void int_gemm_any(GemmContext& ctx, int64_t m, int64_t n, int64_t k, const IntOperand& a,
                  const IntOperand& b, float scale, bool accumulate, void* c, bool c32, int64_t ldc,
                  cudaStream_t stream, IntGemmPath path) {
  INT4DDP_CHECK(m >= 0 && n >= 0 && k >= 0, "int_gemm (cuda): negative size m=", m, " n=", n,
                " k=", k);
  if (m == 0 || n == 0) return;
  INT4DDP_CHECK(c && (k == 0 || (a.data && b.data)), "int_gemm (cuda): null operand");
  check_operand(a, "A", m, k);
  check_operand(b, "B", k, n);
  check_ld(ldc, n, "ldc");
  INT4DDP_CHECK(!(offset_needed(a) && offset_needed(b)),
                "int_gemm (cuda): both operands are uint8 codes above 127; at most one may be");
  const int64_t kmax = int32_max_k(a.qmax, b.qmax);
  INT4DDP_CHECK(k <= kmax, "int_gemm (cuda): K = ", k, " with codes up to ", a.qmax, " and ",
                b.qmax, " can overflow the int32 sums (K * qmax_a * qmax_b must stay below 2^31, ",
                "K <= ", kmax, "): split K");
  INT4DDP_CHECK(path == IntGemmPath::kAuto || path == IntGemmPath::kCublasLt ||
                    path == IntGemmPath::kFallback,
                "int_gemm (cuda): unknown path ", static_cast<int>(path));
  GemmContext::Impl& s = ctx.impl();
  // K = 0 (every sum 0) always takes the fallback kernel: there is nothing to multiply.
  if (path != IntGemmPath::kFallback && k > 0) {
    if (lt_gemm(s, m, n, k, a, b, scale, accumulate, c, c32, ldc, stream)) {
      s.last = IntGemmPath::kCublasLt;
      return;
    }
    INT4DDP_CHECK(path == IntGemmPath::kAuto, "int_gemm (cuda): cuBLASLt has no IMMA algorithm for",
                  " m=", m, " n=", n, " k=", k, " (use IntGemmPath::kAuto or kFallback)");
  }
  fallback_gemm(m, n, k, a, b, scale, accumulate, c, c32, ldc, stream);
  s.last = IntGemmPath::kFallback;
}

}  // namespace

void int_gemm(GemmContext& ctx, int64_t m, int64_t n, int64_t k, const IntOperand& a,
              const IntOperand& b, float scale, bool accumulate, float* c, int64_t ldc,
              cudaStream_t stream, IntGemmPath path) {
  int_gemm_any(ctx, m, n, k, a, b, scale, accumulate, c, false, ldc, stream, path);
}

void int_gemm_i32(GemmContext& ctx, int64_t m, int64_t n, int64_t k, const IntOperand& a,
                  const IntOperand& b, int32_t* c, int64_t ldc, cudaStream_t stream,
                  IntGemmPath path) {
  int_gemm_any(ctx, m, n, k, a, b, 1.0f, false, c, true, ldc, stream, path);
}

void unpack_int4_async(const uint8_t* packed, int64_t count, int8_t* out, cudaStream_t stream) {
  INT4DDP_CHECK(count >= 0, "unpack_int4 (cuda): negative count ", count);
  if (count == 0) return;
  INT4DDP_CHECK(packed && out, "unpack_int4 (cuda): null buffer");
  unpack_int4_kernel<<<blocks_for(count, 256), 256, 0, stream>>>(packed, count, out);
  INT4DDP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace int4ddp::math::cuda
