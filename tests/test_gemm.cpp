// The GEMMs against their plain-loop definitions: fp32 within a stated tolerance, the integer GEMM
// on codes exactly (including the chunked path for long K).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/gemm.h"

namespace int4ddp::math {
namespace {

std::vector<float> random_matrix(int64_t rows, int64_t ld, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> m(static_cast<size_t>(rows * ld));
  for (float& v : m) v = d(rng);
  return m;
}

std::vector<float> random_codes(int64_t rows, int64_t ld, int qmax, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(-qmax, qmax);
  std::vector<float> m(static_cast<size_t>(rows * ld));
  for (float& v : m) v = static_cast<float>(d(rng));
  return m;
}

// Eigen reassociates the K sum; the reference accumulates in double. For N(0,1) inputs the fp32
// rounding error of a length-K dot product is about sqrt(K) * 2^-24 * |terms|; 1e-4 relative to
// sqrt(K) leaves a wide margin at these sizes.
constexpr float kRelTolerance = 1e-4f;

TEST(Gemm, SgemmMatchesReferenceForEveryTransposeAndStride) {
  for (Trans ta : {Trans::kNo, Trans::kYes})
    for (Trans tb : {Trans::kNo, Trans::kYes})
      for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1},
                             {7, 5, 3},
                             {33, 17, 65},
                             {64, 128, 9},
                             {3, 200, 1},
                             {5, 4, 0}}) {
        const int64_t lda = (ta == Trans::kNo ? k : m) + 3;  // padded rows
        const int64_t ldb = (tb == Trans::kNo ? n : k) + 1;
        const int64_t ldc = n + 2;
        const auto a = random_matrix(ta == Trans::kNo ? m : k, lda, 1);
        const auto b = random_matrix(tb == Trans::kNo ? k : n, ldb, 2);
        auto c = random_matrix(m, ldc, 3), ref = c;
        sgemm(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f, c.data(), ldc);
        sgemm_ref(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f, ref.data(), ldc);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < ldc; ++j) {
            const size_t idx = static_cast<size_t>(i * ldc + j);
            const float tol = kRelTolerance * (1.0f + std::sqrt(static_cast<float>(k))) *
                              (1.0f + std::fabs(ref[idx]));
            ASSERT_NEAR(c[idx], ref[idx], tol)
                << "m=" << m << " n=" << n << " k=" << k << " ta=" << int(ta) << " tb=" << int(tb)
                << " at " << i << "," << j;
          }
      }
}

TEST(Gemm, IntGemmIsExact) {
  struct Case {
    int64_t m, n, k;
    int qa, qb;
  };
  // The last two need chunking: 127 * 255 * K exceeds 2^24 for K > 518.
  const Case cases[] = {
      {9, 7, 576, 7, 15}, {16, 33, 1000, 7, 7}, {5, 6, 2000, 127, 255}, {3, 4, 1037, 127, 127}};
  for (const Case& cs : cases)
    for (Trans ta : {Trans::kNo, Trans::kYes})
      for (Trans tb : {Trans::kNo, Trans::kYes}) {
        const int64_t lda = ta == Trans::kNo ? cs.k : cs.m;
        const int64_t ldb = tb == Trans::kNo ? cs.n : cs.k;
        const auto a = random_codes(ta == Trans::kNo ? cs.m : cs.k, lda, cs.qa, 4);
        const auto b = random_codes(tb == Trans::kNo ? cs.k : cs.n, ldb, cs.qb, 5);
        // Worst case for the exactness guard: every product at its maximum.
        auto amax = a, bmax = b;
        for (float& v : amax) v = static_cast<float>(cs.qa);
        for (float& v : bmax) v = static_cast<float>(-cs.qb);
        for (int pass = 0; pass < 2; ++pass) {
          const auto& aa = pass ? amax : a;
          const auto& bb = pass ? bmax : b;
          for (bool acc : {false, true}) {
            std::vector<float> c(static_cast<size_t>(cs.m * cs.n), 0.25f), ref = c;
            int_gemm(ta, tb, cs.m, cs.n, cs.k, aa.data(), lda, cs.qa, bb.data(), ldb, cs.qb,
                     0.0078125f, acc, c.data(), cs.n);
            int_gemm_ref(ta, tb, cs.m, cs.n, cs.k, aa.data(), lda, bb.data(), ldb, 0.0078125f, acc,
                         ref.data(), cs.n);
            ASSERT_EQ(c, ref) << "k=" << cs.k << " qa=" << cs.qa << " qb=" << cs.qb;
          }
        }
      }
}

TEST(Gemm, ExactChunkGuard) {
  EXPECT_EQ(exact_chunk_k(7, 15), ((1 << 24) - 1) / 105);
  EXPECT_EQ(exact_chunk_k(127, 255), ((1 << 24) - 1) / (127 * 255));
  EXPECT_THROW(exact_chunk_k(0, 7), Error);
}

}  // namespace
}  // namespace int4ddp::math
