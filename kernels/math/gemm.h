// GEMMs of the trainer, row-major, counts in elements (never bytes).
//
//   sgemm      C = alpha * op(A) * op(B) + beta * C in fp32 (Eigen), beta = 0 never reads C.
//   int_gemm   C (=, or +=) scale * (op(A) * op(B)) where A and B hold integer codes stored as
//              floats (|a| <= qmax_a, |b| <= qmax_b). The product is exact: an fp32 GEMM of
//              integer-valued floats is exact while every partial sum stays below 2^24, which holds
//              when K * qmax_a * qmax_b < 2^24; longer K is split into chunks that satisfy it and
//              the chunk results (exact integers) are summed in int64. One float rescale per
//              output.
//   *_ref      plain loops, the definitions the tests compare against.
// op(A) is M x K, op(B) is K x N, C is M x N; lda/ldb/ldc are the row strides of A, B, C as stored.
// Every GEMM runs on the calling thread (Eigen's own threading is compiled out: its blocking
// depends on its thread count, so results would too). Callers parallelise over fixed pieces of
// their work with parallel_for (kernels/common/parallel.h) and may call these from several threads
// at once.
#pragma once

#include <cstdint>

namespace int4ddp::math {

enum class Trans : uint8_t { kNo = 0, kYes = 1 };

void sgemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

void sgemm_ref(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Largest K for which an fp32 GEMM of codes bounded by qmax_a and qmax_b is exact.
int64_t exact_chunk_k(int qmax_a, int qmax_b);

void int_gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
              int qmax_a, const float* b, int64_t ldb, int qmax_b, float scale, bool accumulate,
              float* c, int64_t ldc);

// The definition: int64 dot products of the integer codes, then one rescale.
void int_gemm_ref(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float scale, bool accumulate, float* c, int64_t ldc);

}  // namespace int4ddp::math
