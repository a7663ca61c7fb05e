// GEMMs: Eigen for fp32, and the exact integer GEMM on codes built on it (see gemm.h).
#include "kernels/math/gemm.h"

// Single-threaded Eigen (see gemm.h): its blocking, hence its rounding, depends on its thread
// count.
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/common/error.h"

namespace int4ddp::math {
namespace {

using Stride = Eigen::OuterStride<>;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ColMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
using CMapR = Eigen::Map<const RowMat, 0, Stride>;
using CMapC = Eigen::Map<const ColMat, 0, Stride>;
using MapR = Eigen::Map<RowMat, 0, Stride>;

void check_dims(int64_t m, int64_t n, int64_t k, const void* a, const void* b, const void* c) {
  INT4DDP_CHECK(m >= 0 && n >= 0 && k >= 0, "gemm: negative size m=", m, " n=", n, " k=", k);
  INT4DDP_CHECK((m == 0 || n == 0) || (c && (k == 0 || (a && b))), "gemm: null operand");
}

// Element (i, p) of op(A).
inline float op_at(const float* a, int64_t ld, Trans t, int64_t i, int64_t p) {
  return t == Trans::kNo ? a[i * ld + p] : a[p * ld + i];
}

// op(X) as an Eigen expression: a row-major map, or a row-major buffer read as column-major
// (which is its transpose) when transposed.
template <typename F>
void with_op(Trans t, const float* x, int64_t rows, int64_t cols, int64_t ld, F&& f) {
  if (t == Trans::kNo)
    f(CMapR(x, rows, cols, Stride(ld)));
  else
    f(CMapC(x, rows, cols, Stride(ld)));
}

}  // namespace

void sgemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  check_dims(m, n, k, a, b, c);
  if (m == 0 || n == 0) return;
  MapR cm(c, m, n, Stride(ldc));
  if (beta == 0.0f)
    cm.setZero();
  else if (beta != 1.0f)
    cm *= beta;
  if (k == 0 || alpha == 0.0f) return;
  with_op(ta, a, m, k, lda, [&](const auto& am) {
    with_op(tb, b, k, n, ldb, [&](const auto& bm) { cm.noalias() += alpha * (am * bm); });
  });
}

void sgemm_ref(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  check_dims(m, n, k, a, b, c);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p)
        acc += static_cast<double>(op_at(a, lda, ta, i, p)) * op_at(b, ldb, tb, p, j);
      const float prev = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
      c[i * ldc + j] = alpha * static_cast<float>(acc) + prev;
    }
}

int64_t exact_chunk_k(int qmax_a, int qmax_b) {
  INT4DDP_CHECK(qmax_a > 0 && qmax_b > 0, "int_gemm: code bounds must be positive, got ", qmax_a,
                " and ", qmax_b);
  return std::max<int64_t>(1, ((int64_t{1} << 24) - 1) / (int64_t{qmax_a} * qmax_b));
}

void int_gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
              int qmax_a, const float* b, int64_t ldb, int qmax_b, float scale, bool accumulate,
              float* c, int64_t ldc) {
  check_dims(m, n, k, a, b, c);
  if (m == 0 || n == 0) return;
  const int64_t kc = exact_chunk_k(qmax_a, qmax_b);
  if (k <= kc && !accumulate) {
    // One exact chunk straight into C (exact integers), then the one rescale in place.
    sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = scale * c[i * ldc + j];
    return;
  }
  std::vector<float> part(static_cast<size_t>(m * n));
  std::vector<int64_t> total;
  if (k > kc) total.assign(static_cast<size_t>(m * n), 0);
  for (int64_t p0 = 0; p0 < k || p0 == 0; p0 += kc) {
    const int64_t kk = std::min(kc, k - p0);
    // Sub-matrices op(A)[:, p0:p0+kk] and op(B)[p0:p0+kk, :] in storage coordinates.
    const float* ap = ta == Trans::kNo ? a + p0 : a + p0 * lda;
    const float* bp = tb == Trans::kNo ? b + p0 * ldb : b + p0;
    sgemm(ta, tb, m, n, kk, 1.0f, ap, lda, bp, ldb, 0.0f, part.data(), n);
    if (k <= kc) break;
    for (size_t i = 0; i < part.size(); ++i) total[i] += static_cast<int64_t>(part[i]);
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const size_t idx = static_cast<size_t>(i * n + j);
      const float v = k > kc ? scale * static_cast<float>(total[idx]) : scale * part[idx];
      float& out = c[i * ldc + j];
      out = accumulate ? out + v : v;
    }
}

void int_gemm_ref(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float scale, bool accumulate, float* c,
                  int64_t ldc) {
  check_dims(m, n, k, a, b, c);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += static_cast<int64_t>(op_at(a, lda, ta, i, p)) *
               static_cast<int64_t>(op_at(b, ldb, tb, p, j));
      const float v = scale * static_cast<float>(acc);
      float& out = c[i * ldc + j];
      out = accumulate ? out + v : v;
    }
}

}  // namespace int4ddp::math
