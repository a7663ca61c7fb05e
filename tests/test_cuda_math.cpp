// The GPU math of kernels/math/cuda against the CPU definitions: the integer GEMM (cuBLASLt IMMA
// and the fallback kernel, separately) bit for bit against math::int_gemm_ref for b = 2..8 codes,
// sgemm within a derived tolerance of sgemm_ref, and every layer kernel against its CPU layer
// (src/nn) or optimizer (src/train), bit for bit where nn_cuda.h says so, else within a derived
// tolerance. A determinism test reruns everything and compares bits. Every test that needs a GPU
// skips without one (as test_cuda_codec).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "conv_cases.h"
#include "cuda_test.h"
#include "kernels/common/error.h"
#include "kernels/math/cuda/gemm_cuda.h"
#include "kernels/math/cuda/nn_cuda.h"
#include "kernels/math/gemm.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "kernels/quant/format.h"
#include "src/nn/layer.h"
#include "src/train/optim.h"

namespace int4ddp::math::cuda {
namespace {

// ---- helpers ----------------------------------------------------------------------------------

// A device copy of a host vector (or `count` uninitialised elements).
template <typename T>
class Dev {
 public:
  explicit Dev(size_t count) : count_(count) {
    INT4DDP_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(1, count) * sizeof(T)));
  }
  explicit Dev(const std::vector<T>& v) : Dev(v.size()) { upload(v); }
  ~Dev() { cudaFree(ptr_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  T* get() { return ptr_; }
  void upload(const std::vector<T>& v) {
    INT4DDP_CUDA_CHECK(cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() {
    std::vector<T> v(count_);
    INT4DDP_CUDA_CHECK(cudaDeviceSynchronize());
    INT4DDP_CUDA_CHECK(cudaMemcpy(v.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }

 private:
  T* ptr_ = nullptr;
  size_t count_;
};

std::vector<float> normal(size_t n, uint64_t seed, float scale = 1.0f, float mean = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(mean, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

void expect_bits(const std::vector<float>& got, const std::vector<float>& want,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(bits_of(got[i]), bits_of(want[i]))
        << what << " differs at " << i << ": " << got[i] << " vs " << want[i];
}

// |got - want| <= tol[i] elementwise.
void expect_within(const std::vector<float>& got, const std::vector<float>& want,
                   const std::vector<double>& tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - want[i]), tol[i])
        << what << " at " << i << ": " << got[i] << " vs " << want[i];
}

// ---- integer GEMM -----------------------------------------------------------------------------

// No GPU needed: the int32 guard K * qmax_a * qmax_b < 2^31.
TEST(CudaIntGemm, Int32Guard) {
  EXPECT_EQ(int32_max_k(127, 127), 133144);  // 133144 * 16129 < 2^31 <= 133145 * 16129
  EXPECT_LT(int64_t{133144} * 127 * 127, int64_t{1} << 31);
  EXPECT_GE(int64_t{133145} * 127 * 127, int64_t{1} << 31);
  EXPECT_EQ(int32_max_k(7, 7), ((int64_t{1} << 31) - 1) / 49);
  EXPECT_EQ(int32_max_k(255, 127), ((int64_t{1} << 31) - 1) / (255 * 127));
  EXPECT_THROW(int32_max_k(0, 7), Error);
}

struct IntCase {
  int64_t m, n, k;
  Trans ta, tb;
};

// Codes of op(X) stored as (rows, cols) or transposed with row stride ld = cols + pad.
struct HostCodes {
  std::vector<float> f;      // codes as floats, the CPU GEMM's operand
  std::vector<uint8_t> raw;  // the same codes as int8 / uint8 bytes
  int64_t ld;
};

HostCodes make_codes(int64_t rows, int64_t cols, int64_t pad, int lo, int hi, uint64_t seed) {
  HostCodes h;
  h.ld = std::max<int64_t>(1, cols + pad);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  h.f.assign(static_cast<size_t>(std::max<int64_t>(1, rows * h.ld)), 0.0f);
  h.raw.assign(h.f.size(), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      // Mostly random, with runs of the extreme codes (overflow-prone sums).
      const int v = (r + c) % 7 == 0 ? hi : d(rng);
      h.f[static_cast<size_t>(r * h.ld + c)] = static_cast<float>(v);
      h.raw[static_cast<size_t>(r * h.ld + c)] = static_cast<uint8_t>(v);
    }
  return h;
}

// One GEMM on both sides: C = scale * op(A) op(B) (+ C0) against int_gemm_ref.
void check_int_gemm(GemmContext& ctx, const IntCase& c, CodeType ta_type, int qa, CodeType tb_type,
                    int qb, bool accumulate, IntGemmPath path, int64_t pad, uint64_t seed) {
  const int64_t ar = c.ta == Trans::kNo ? c.m : c.k, ac = c.ta == Trans::kNo ? c.k : c.m;
  const int64_t br = c.tb == Trans::kNo ? c.k : c.n, bc = c.tb == Trans::kNo ? c.n : c.k;
  const int alo = ta_type == CodeType::kU8 ? 0 : -qa, blo = tb_type == CodeType::kU8 ? 0 : -qb;
  const HostCodes a = make_codes(ar, ac, pad, alo, qa, seed);
  const HostCodes b = make_codes(br, bc, pad, blo, qb, seed + 1);
  const int64_t ldc = c.n + pad;  // n >= 1 in every case
  std::vector<float> cref = normal(static_cast<size_t>(std::max<int64_t>(1, c.m * ldc)), seed + 2);
  std::vector<float> c0 = cref;
  const float scale = seed % 2 ? 0.37f : -1.0f / 3.0f;
  math::int_gemm_ref(c.ta, c.tb, c.m, c.n, c.k, a.f.data(), a.ld, b.f.data(), b.ld, scale,
                     accumulate, cref.data(), ldc);
  Dev<uint8_t> da(a.raw), db(b.raw);
  Dev<float> dc(c0);
  const IntOperand oa{da.get(), a.ld, c.ta, ta_type, qa}, ob{db.get(), b.ld, c.tb, tb_type, qb};
  const std::string what = "m=" + std::to_string(c.m) + " n=" + std::to_string(c.n) +
                           " k=" + std::to_string(c.k) + " ta=" + std::to_string(int(c.ta)) +
                           " tb=" + std::to_string(int(c.tb)) + " qa=" + std::to_string(qa) +
                           " qb=" + std::to_string(qb) + " path=" + std::to_string(int(path)) +
                           " acc=" + std::to_string(accumulate) + " pad=" + std::to_string(pad);
  try {
    int_gemm(ctx, c.m, c.n, c.k, oa, ob, scale, accumulate, dc.get(), ldc, nullptr, path);
  } catch (const Error& e) {
    // cuBLASLt may find no IMMA algorithm for a tiny problem (kAuto then takes the fallback); it
    // must accept every problem with m, n, k >= 16.
    const bool refusal = std::string(e.what()).find("no IMMA algorithm") != std::string::npos;
    ASSERT_TRUE(refusal) << what << ": " << e.what();
    ASSERT_FALSE(c.m >= 16 && c.n >= 16 && c.k >= 16) << what << ": " << e.what();
    return;
  }
  if (path != IntGemmPath::kAuto && c.k > 0) {
    ASSERT_EQ(ctx.last_int_path(), path) << what;
  }
  expect_bits(dc.download(), cref, what);
}

// Shapes: M/N/K of 1, K not a multiple of 4/16/32, the native TN form with aligned K (in place),
// and a resnet-like K = 9 * Cin.
std::vector<IntCase> int_cases() {
  std::vector<IntCase> out;
  const int64_t shapes[][3] = {{1, 1, 1},     {1, 7, 3},   {5, 1, 17},   {3, 9, 1},
                               {13, 11, 33},  {16, 8, 32}, {64, 64, 64}, {33, 65, 100},
                               {70, 40, 576}, {8, 12, 0}};
  for (const auto& s : shapes)
    for (Trans ta : {Trans::kNo, Trans::kYes})
      for (Trans tb : {Trans::kNo, Trans::kYes}) out.push_back({s[0], s[1], s[2], ta, tb});
  return out;
}

class CudaIntGemmPaths : public testing::TestWithParam<IntGemmPath> {};

// Signed codes b = 2..8 (both operands), every transpose, both accumulate modes, padded strides.
TEST_P(CudaIntGemmPaths, SignedCodesBitExact) {
  REQUIRE_GPU();
  GemmContext ctx;
  uint64_t seed = 1;
  for (int bits = 2; bits <= 8; ++bits) {
    const int q = quant::levels(bits);
    for (const IntCase& c : int_cases())
      for (bool acc : {false, true}) {
        const int64_t pad = (seed % 3 == 0) ? 0 : (seed % 3 == 1 ? 16 : 5);
        check_int_gemm(ctx, c, CodeType::kS8, q, CodeType::kS8, q, acc, GetParam(), pad, ++seed);
        if (HasFatalFailure()) return;
      }
  }
}

// Unsigned activation codes 0..2^b - 1 (b = 2..8; above 127 at b = 8: the offset path) as A or B
// against signed codes, as the layers multiply them.
TEST_P(CudaIntGemmPaths, UnsignedActivationCodesBitExact) {
  REQUIRE_GPU();
  GemmContext ctx;
  uint64_t seed = 1000;
  for (int bits = 2; bits <= 8; ++bits) {
    const int qa = (1 << bits) - 1, qs = quant::levels(4);
    for (const IntCase& c : int_cases()) {
      check_int_gemm(ctx, c, CodeType::kU8, qa, CodeType::kS8, qs, false, GetParam(), 0, ++seed);
      check_int_gemm(ctx, c, CodeType::kS8, qs, CodeType::kU8, qa, true, GetParam(), 3, ++seed);
      if (HasFatalFailure()) return;
    }
  }
}

std::string path_name(const testing::TestParamInfo<IntGemmPath>& p) {
  switch (p.param) {
    case IntGemmPath::kCublasLt:
      return "CublasLt";
    case IntGemmPath::kFallback:
      return "Fallback";
    default:
      return "Auto";
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, CudaIntGemmPaths,
                         testing::Values(IntGemmPath::kCublasLt, IntGemmPath::kFallback,
                                         IntGemmPath::kAuto),
                         path_name);

// Operands that enter cuBLASLt in place (TN form, K, ld and n aligned) at an address aligned to
// 16 bytes only: the contract's minimum, below the 256 bytes cuBLASLt's heuristic assumes unless
// told otherwise.
// cuBLASLt's heuristic answers that mean "no algorithm" (kAuto falls back) and those that are
// errors. A result whose state is not success has no valid algorithm to call. Needs no GPU.
TEST(CudaIntGemm, HeuristicRefusals) {
  EXPECT_TRUE(lt_refused(CUBLAS_STATUS_NOT_SUPPORTED, 0, CUBLAS_STATUS_SUCCESS));
  EXPECT_TRUE(lt_refused(CUBLAS_STATUS_SUCCESS, 0, CUBLAS_STATUS_SUCCESS));
  EXPECT_TRUE(lt_refused(CUBLAS_STATUS_SUCCESS, 1, CUBLAS_STATUS_NOT_SUPPORTED));
  EXPECT_TRUE(lt_refused(CUBLAS_STATUS_SUCCESS, 1, CUBLAS_STATUS_INVALID_VALUE));
  EXPECT_FALSE(lt_refused(CUBLAS_STATUS_SUCCESS, 1, CUBLAS_STATUS_SUCCESS));
  EXPECT_FALSE(lt_refused(CUBLAS_STATUS_INVALID_VALUE, 0, CUBLAS_STATUS_SUCCESS));
  EXPECT_FALSE(lt_refused(CUBLAS_STATUS_EXECUTION_FAILED, 1, CUBLAS_STATUS_SUCCESS));
}

// The cuBLASLt call int_gemm plans meets IMMA's "TN" rules for every shape, transpose, code type,
// row stride and operand alignment (multiples of 4 for m, k and the leading dimensions, K
// contiguous), uses an operand in place only where its layout is already that form, and lays the
// scratch out in disjoint 256-byte-aligned parts. Host planning only: needs no GPU.
TEST(CudaIntGemm, LtPlanMeetsImmaRules) {
  int64_t cases = 0, in_place = 0;
  const int64_t sizes[] = {1, 3, 4, 16, 17, 64, 100, 576};
  for (int64_t m : sizes)
    for (int64_t n : sizes)
      for (int64_t k : sizes)
        for (Trans ta : {Trans::kNo, Trans::kYes})
          for (Trans tb : {Trans::kNo, Trans::kYes})
            for (int variant = 0; variant < 4; ++variant) {
              const int64_t pad = variant % 2 ? 16 : 0;
              const uintptr_t base = variant < 2 ? 0x100000 : 0x100008;  // 16- or 8-aligned
              const bool a_u8 = variant == 1, b_u8 = variant == 3;
              const IntOperand a{reinterpret_cast<const void*>(base),
                                 (ta == Trans::kNo ? k : m) + pad, ta,
                                 a_u8 ? CodeType::kU8 : CodeType::kS8, a_u8 ? 255 : 127};
              const IntOperand b{reinterpret_cast<const void*>(base + 0x10000),
                                 (tb == Trans::kNo ? n : k) + pad, tb,
                                 b_u8 ? CodeType::kU8 : CodeType::kS8, b_u8 ? 200 : 7};
              const LtPlan p = plan_lt(m, n, k, a, b);
              const std::string what = "m=" + std::to_string(m) + " n=" + std::to_string(n) +
                                       " k=" + std::to_string(k) + " variant " +
                                       std::to_string(variant) + " ta=" + std::to_string(int(ta)) +
                                       " tb=" + std::to_string(int(tb));
              ++cases;
              // Padding: K to 16, N to 4, never a whole step more.
              ASSERT_TRUE(p.kp % 16 == 0 && p.kp >= k && p.kp < k + 16) << what;
              ASSERT_TRUE(p.np % 4 == 0 && p.np >= n && p.np < n + 4) << what;
              // IMMA: cuBLASLt's m (np) and k (kp) multiples of 4, leading dimensions multiples of
              // 4 and at least the K rows they hold.
              EXPECT_TRUE(p.ld_a % 4 == 0 && p.ld_a >= p.kp) << what;
              EXPECT_TRUE(p.ld_b % 4 == 0 && p.ld_b >= p.kp) << what;
              EXPECT_EQ(p.a_offset, a_u8) << what;
              EXPECT_EQ(p.b_offset, b_u8) << what;
              // In place only as K-contiguous int8 codes at 16 bytes, K needing no padding (and
              // B's rows no padding either).
              if (p.a_direct) {
                EXPECT_TRUE(ta == Trans::kNo && !a_u8 && k == p.kp && base % 16 == 0) << what;
                EXPECT_EQ(p.ld_a, a.ld) << what;
              } else {
                EXPECT_EQ(p.ld_a, p.kp) << what;
              }
              if (p.b_direct) {
                EXPECT_TRUE(tb == Trans::kYes && !b_u8 && k == p.kp && n == p.np && base % 16 == 0)
                    << what;
                EXPECT_EQ(p.ld_b, b.ld) << what;
              } else {
                EXPECT_EQ(p.ld_b, p.kp) << what;
              }
              in_place += p.a_direct && p.b_direct;
              // Scratch: disjoint parts on 256 bytes, inside scratch_bytes.
              struct Part {
                size_t at, bytes;
              };
              std::vector<Part> parts;
              if (!p.a_direct) parts.push_back({p.a_at, static_cast<size_t>(m * p.kp)});
              if (!p.b_direct) parts.push_back({p.b_at, static_cast<size_t>(p.np * p.kp)});
              parts.push_back({p.sums_at, static_cast<size_t>(m * p.np) * 4});
              const int64_t corr = a_u8 ? p.np : (b_u8 ? m : 0);
              if (corr > 0) parts.push_back({p.corr_at, static_cast<size_t>(corr) * 4});
              for (size_t i = 0; i < parts.size(); ++i) {
                EXPECT_EQ(parts[i].at % 256, 0u) << what;
                EXPECT_LE(parts[i].at + parts[i].bytes, p.scratch_bytes) << what;
                for (size_t j = 0; j < i; ++j)
                  EXPECT_TRUE(parts[i].at >= parts[j].at + parts[j].bytes ||
                              parts[j].at >= parts[i].at + parts[i].bytes)
                      << what << ": scratch parts " << j << " and " << i << " overlap";
              }
              EXPECT_TRUE(p.fits_pack_grid) << what;
              if (HasFailure()) return;
            }
  EXPECT_GT(in_place, 0) << "no case used both operands in place (the TN fast path)";
  // The layers' native form: A (m, k) and B stored (n, k), aligned: both in place.
  const LtPlan tn = plan_lt(64, 32, 576, {reinterpret_cast<const void*>(0x1000), 576},
                            {reinterpret_cast<const void*>(0x2000), 576, Trans::kYes});
  EXPECT_TRUE(tn.a_direct && tn.b_direct);
  // K beyond the pack grid (65535 tiles of 64): refused, for the fallback kernel.
  const int64_t huge_k = int64_t{65536} * 64;
  EXPECT_FALSE(plan_lt(4, 4, huge_k, {reinterpret_cast<const void*>(0x1000), huge_k, Trans::kYes},
                       {reinterpret_cast<const void*>(0x1000), 4})
                   .fits_pack_grid);
  EXPECT_GT(cases, 0);
}

TEST(CudaIntGemm, InPlaceOperandsAlignedTo16Bytes) {
  REQUIRE_GPU();
  GemmContext ctx;
  const int64_t m = 32, n = 32, k = 64, shift = 16;
  const HostCodes a = make_codes(m, k, 0, -127, 127, 71), b = make_codes(n, k, 0, -127, 127, 72);
  std::vector<float> want(static_cast<size_t>(m * n), 0.0f);
  math::int_gemm_ref(Trans::kNo, Trans::kYes, m, n, k, a.f.data(), a.ld, b.f.data(), b.ld, 0.25f,
                     false, want.data(), n);
  std::vector<uint8_t> ra(static_cast<size_t>(shift), 0), rb(static_cast<size_t>(shift), 0);
  ra.insert(ra.end(), a.raw.begin(), a.raw.end());
  rb.insert(rb.end(), b.raw.begin(), b.raw.end());
  Dev<uint8_t> da(ra), db(rb);
  Dev<float> dc(static_cast<size_t>(m * n));
  int_gemm(ctx, m, n, k, {da.get() + shift, a.ld, Trans::kNo, CodeType::kS8, 127},
           {db.get() + shift, b.ld, Trans::kYes, CodeType::kS8, 127}, 0.25f, false, dc.get(), n,
           nullptr, IntGemmPath::kCublasLt);
  EXPECT_EQ(ctx.last_int_path(), IntGemmPath::kCublasLt);
  expect_bits(dc.download(), want, "in-place operands at a 16-byte offset");
}

// The raw int32 sums at the largest K the guard allows for 8-bit codes (every product at the
// extreme): no overflow, exactly the int64 sum.
TEST(CudaIntGemm, Int32SumsAtTheGuard) {
  REQUIRE_GPU();
  GemmContext ctx;
  // m, n >= 16: cuBLASLt may refuse a tinier problem, and kCublasLt must not fall back.
  const int64_t k = int32_max_k(127, 127), m = 16, n = 16;
  std::vector<uint8_t> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(n * k));
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t i = 0; i < m; ++i)
      a[i * k + p] = static_cast<uint8_t>(static_cast<int8_t>(i % 2 ? -127 : 127));
    for (int64_t j = 0; j < n; ++j)
      b[j * k + p] = static_cast<uint8_t>(static_cast<int8_t>(j % 2 ? -127 : 127));
  }
  Dev<uint8_t> da(a), db(b);
  for (IntGemmPath path : {IntGemmPath::kCublasLt, IntGemmPath::kFallback}) {
    Dev<int32_t> dc(static_cast<size_t>(m * n));
    int_gemm_i32(ctx, m, n, k, {da.get(), k, Trans::kNo, CodeType::kS8, 127},
                 {db.get(), k, Trans::kYes, CodeType::kS8, 127}, dc.get(), n, nullptr, path);
    EXPECT_EQ(ctx.last_int_path(), path);
    const std::vector<int32_t> c = dc.download();
    const int64_t full = k * 127 * 127;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        EXPECT_EQ(c[static_cast<size_t>(i * n + j)], ((i + j) % 2 ? -full : full))
            << "path " << int(path) << " (" << i << ", " << j << ")";
  }
}

TEST(CudaIntGemm, BadInputThrows) {
  REQUIRE_GPU();
  GemmContext ctx;
  Dev<uint8_t> buf(64);
  float* c = reinterpret_cast<float*>(buf.get());
  const IntOperand s8{buf.get(), 200000, Trans::kNo, CodeType::kS8, 127};
  // K beyond the int32 guard.
  EXPECT_THROW(int_gemm(ctx, 1, 1, int32_max_k(127, 127) + 1, s8,
                        {buf.get(), 1, Trans::kNo, CodeType::kS8, 127}, 1.0f, false, c, 1, nullptr),
               Error);
  // Both operands uint8 codes above 127.
  const IntOperand u8{buf.get(), 4, Trans::kNo, CodeType::kU8, 255};
  EXPECT_THROW(int_gemm(ctx, 1, 1, 4, u8, {buf.get(), 1, Trans::kNo, CodeType::kU8, 255}, 1.0f,
                        false, c, 1, nullptr),
               Error);
  // qmax out of range, a short row stride.
  EXPECT_THROW(int_gemm(ctx, 1, 1, 4, {buf.get(), 4, Trans::kNo, CodeType::kS8, 128}, u8, 1.0f,
                        false, c, 1, nullptr),
               Error);
  EXPECT_THROW(int_gemm(ctx, 2, 2, 4, {buf.get(), 3, Trans::kNo, CodeType::kS8, 7},
                        {buf.get(), 2, Trans::kNo, CodeType::kS8, 7}, 1.0f, false, c, 2, nullptr),
               Error);
  EXPECT_NO_THROW(INT4DDP_CUDA_CHECK(cudaDeviceSynchronize()));
}

TEST(CudaIntGemm, UnpackInt4) {
  REQUIRE_GPU();
  for (int64_t n : {1, 2, 7, 1000}) {
    std::vector<int> codes(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) codes[static_cast<size_t>(i)] = static_cast<int>(i % 15) - 7;
    std::vector<uint8_t> packed(static_cast<size_t>(quant::packed_bytes(4, n)), 0);
    for (int64_t i = 0; i < n; i += 2)
      packed[static_cast<size_t>(i / 2)] =
          quant::pack_nibbles(codes[i], i + 1 < n ? codes[static_cast<size_t>(i + 1)] : 0);
    Dev<uint8_t> dp(packed);
    Dev<int8_t> dout(static_cast<size_t>(n));
    unpack_int4_async(dp.get(), n, dout.get(), nullptr);
    const std::vector<int8_t> out = dout.download();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[static_cast<size_t>(i)], codes[i]) << i;
  }
}

// ---- fp32 GEMM ---------------------------------------------------------------------------------

// Any fp32 summation order (with or without FMA) of K products is within
// (K + 2) * 2^-24 * sum_p |a_ip b_pj| of the exact value (gamma_K bound, plus alpha's and beta's
// roundings); sgemm_ref sums in double, so its own error is negligible against that.
double sgemm_tolerance(int64_t k, double abs_sum) {
  return (static_cast<double>(k) + 2) * std::ldexp(1.0, -24) * abs_sum + 1e-30;
}

TEST(CudaSgemm, MatchesReferenceWithinBound) {
  REQUIRE_GPU();
  GemmContext ctx;
  ASSERT_FALSE(ctx.tf32());
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {17, 1, 33}, {64, 64, 576}, {100, 30, 0}};
  uint64_t seed = 7;
  for (const auto& s : shapes)
    for (Trans ta : {Trans::kNo, Trans::kYes})
      for (Trans tb : {Trans::kNo, Trans::kYes})
        for (float beta : {0.0f, 0.5f}) {
          const int64_t m = s[0], n = s[1], k = s[2];
          const int64_t lda = (ta == Trans::kNo ? k : m) + 1, ldb = (tb == Trans::kNo ? n : k) + 2;
          const int64_t ldc = n + 3;
          const auto a = normal(static_cast<size_t>((ta == Trans::kNo ? m : k) * lda + 1), ++seed);
          const auto b = normal(static_cast<size_t>((tb == Trans::kNo ? k : n) * ldb + 1), ++seed);
          auto c0 = normal(static_cast<size_t>(m * ldc), ++seed);
          std::vector<float> ref = c0, absa(a.size()), absb(b.size()), absc(c0.size(), 0.0f);
          const float alpha = 1.5f;
          math::sgemm_ref(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, ref.data(),
                          ldc);
          for (size_t i = 0; i < a.size(); ++i) absa[i] = std::fabs(a[i]);
          for (size_t i = 0; i < b.size(); ++i) absb[i] = std::fabs(b[i]);
          math::sgemm_ref(ta, tb, m, n, k, alpha, absa.data(), lda, absb.data(), ldb, 0.0f,
                          absc.data(), ldc);
          std::vector<double> tol(ref.size());
          for (size_t i = 0; i < ref.size(); ++i)
            tol[i] = sgemm_tolerance(k, absc[i] + std::fabs(beta * c0[i])) +
                     std::ldexp(std::fabs(ref[i]), -23);
          Dev<float> da(a), db(b), dc(c0);
          sgemm(ctx, ta, tb, m, n, k, alpha, da.get(), lda, db.get(), ldb, beta, dc.get(), ldc,
                nullptr);
          expect_within(dc.download(), ref, tol,
                        "sgemm m=" + std::to_string(m) + " n=" + std::to_string(n) +
                            " k=" + std::to_string(k) + " ta=" + std::to_string(int(ta)) +
                            " tb=" + std::to_string(int(tb)));
          if (HasFatalFailure()) return;
        }
}

// TF32 (10-bit mantissa inputs): each product is within 2^-10 relative, so the sum within
// (K * 2^-10 + (K + 2) * 2^-24) * sum |a||b|. Only checks the switch works and stays sane.
TEST(CudaSgemm, Tf32Switch) {
  REQUIRE_GPU();
  GemmContext ctx;
  ctx.set_tf32(true);
  EXPECT_TRUE(ctx.tf32());
  const int64_t m = 128, n = 96, k = 256;
  const auto a = normal(static_cast<size_t>(m * k), 1), b = normal(static_cast<size_t>(k * n), 2);
  std::vector<float> ref(static_cast<size_t>(m * n)), absc(ref.size());
  math::sgemm_ref(Trans::kNo, Trans::kNo, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, ref.data(),
                  n);
  std::vector<float> absa(a.size()), absb(b.size());
  for (size_t i = 0; i < a.size(); ++i) absa[i] = std::fabs(a[i]);
  for (size_t i = 0; i < b.size(); ++i) absb[i] = std::fabs(b[i]);
  math::sgemm_ref(Trans::kNo, Trans::kNo, m, n, k, 1.0f, absa.data(), k, absb.data(), n, 0.0f,
                  absc.data(), n);
  std::vector<double> tol(ref.size());
  for (size_t i = 0; i < ref.size(); ++i)
    tol[i] = (std::ldexp(2.0, -10) + sgemm_tolerance(k, 1.0)) * absc[i];
  Dev<float> da(a), db(b), dc(ref.size());
  sgemm(ctx, Trans::kNo, Trans::kNo, m, n, k, 1.0f, da.get(), k, db.get(), n, 0.0f, dc.get(), n,
        nullptr);
  expect_within(dc.download(), ref, tol, "tf32 sgemm");
  ctx.set_tf32(false);
  EXPECT_FALSE(ctx.tf32());
}

// ---- im2col / col2im -----------------------------------------------------------------------

using test::ColCase;
using test::ConvProbe;
using test::kColCases;

template <typename T>
std::vector<T> to_codes(const std::vector<float>& f) {
  std::vector<T> out(f.size());
  for (size_t i = 0; i < f.size(); ++i) out[i] = static_cast<T>(f[i]);
  return out;
}

TEST(CudaConvColumns, Im2colMatchesConv2d) {
  REQUIRE_GPU();
  for (const ColCase& cc : kColCases) {
    ConvProbe conv("probe", cc.c, 1, cc.k, cc.stride, cc.pad);
    const ConvGeometry geo{cc.c, cc.h, cc.w, cc.k, cc.stride, cc.pad};
    const int64_t rows = geo.rows(), cols = cc.g * geo.out_h() * geo.out_w();
    // Integer-valued images so the int8/uint8 instantiations see the same values.
    std::vector<float> img(static_cast<size_t>(cc.n * cc.c * cc.h * cc.w));
    for (size_t i = 0; i < img.size(); ++i)
      img[i] = static_cast<float>(static_cast<int>(i * 37 % 101) + 1);
    std::vector<float> ref(static_cast<size_t>(rows * cols)), ref_t(ref.size());
    conv.im2col(img.data(), cc.s0, cc.g, cc.h, cc.w, ref.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < cols; ++q) ref_t[q * rows + r] = ref[r * cols + q];
    for (bool transposed : {false, true}) {
      const std::vector<float>& want = transposed ? ref_t : ref;
      const std::string what = "im2col k=" + std::to_string(cc.k) +
                               " s=" + std::to_string(cc.stride) + " p=" + std::to_string(cc.pad) +
                               " t=" + std::to_string(transposed);
      Dev<float> di(img), dcol(ref.size());
      im2col_async(di.get(), cc.s0, cc.g, geo, transposed, dcol.get(), nullptr);
      expect_bits(dcol.download(), want, what);
      Dev<uint8_t> du(to_codes<uint8_t>(img)), dcu(ref.size());
      im2col_async(du.get(), cc.s0, cc.g, geo, transposed, dcu.get(), nullptr);
      EXPECT_EQ(dcu.download(), to_codes<uint8_t>(want)) << what << " uint8";
      std::vector<float> img_s(img.size());
      for (size_t i = 0; i < img.size(); ++i) img_s[i] = img[i] - 60.0f;
      std::vector<float> want_s(want.size());
      // Padding stays code 0: shift only the values that came from the image.
      Dev<int8_t> ds(to_codes<int8_t>(img_s)), dcs(ref.size());
      im2col_async(ds.get(), cc.s0, cc.g, geo, transposed, dcs.get(), nullptr);
      std::vector<float> ref_s(ref.size());
      conv.im2col(img_s.data(), cc.s0, cc.g, cc.h, cc.w, ref_s.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t q = 0; q < cols; ++q)
          want_s[transposed ? q * rows + r : r * cols + q] = ref_s[r * cols + q];
      EXPECT_EQ(dcs.download(), to_codes<int8_t>(want_s)) << what << " int8";
    }
  }
}

TEST(CudaConvColumns, Col2imMatchesConv2dBitExact) {
  REQUIRE_GPU();
  uint64_t seed = 50;
  for (const ColCase& cc : kColCases) {
    ConvProbe conv("probe", cc.c, 1, cc.k, cc.stride, cc.pad);
    const ConvGeometry geo{cc.c, cc.h, cc.w, cc.k, cc.stride, cc.pad};
    const int64_t rows = geo.rows(), cols = cc.g * geo.out_h() * geo.out_w();
    const auto col = normal(static_cast<size_t>(rows * cols), ++seed);
    std::vector<float> col_t(col.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < cols; ++q) col_t[q * rows + r] = col[r * cols + q];
    const auto img0 = normal(static_cast<size_t>(cc.n * cc.c * cc.h * cc.w), ++seed);
    std::vector<float> ref = img0;  // accumulated into a non-zero image
    conv.col2im(col.data(), cc.s0, cc.g, cc.h, cc.w, ref.data());
    for (bool transposed : {false, true}) {
      Dev<float> dcol(transposed ? col_t : col), dimg(img0);
      col2im_async(dcol.get(), cc.s0, cc.g, geo, transposed, dimg.get(), nullptr);
      expect_bits(dimg.download(), ref,
                  "col2im k=" + std::to_string(cc.k) + " s=" + std::to_string(cc.stride) +
                      " p=" + std::to_string(cc.pad) + " t=" + std::to_string(transposed));
      if (HasFatalFailure()) return;
    }
  }
}

// ---- BatchNorm -------------------------------------------------------------------------------

// The device sums differ from the CPU's only in double rounding (order), so mean and variance agree
// to 1 float ulp; invstd, scale, shift each carry at most ~3 float roundings more. Hence
//   |y - y_cpu| <= kBnUlps * 2^-24 * (|x * scale| + |shift| + |mean * scale|),
// and for dx the same bound on its three terms; kBnUlps = 16 leaves margin.
constexpr double kBnUlps = 16;

std::vector<float> values_of(const Param& p) {
  return std::vector<float>(p.value.data(), p.value.data() + p.value.numel());
}

struct BnDevice {
  Dev<float> gamma, beta, rm, rv, mean, invstd, scale, shift;
  Dev<double> ws;
  BatchNormParams p;
  BnDevice(nn::BatchNorm& bn, const BatchNormShape& s, bool relu)
      : gamma(values_of(*bn.params()[0])),
        beta(values_of(*bn.params()[1])),
        rm(bn.running_mean()),
        rv(bn.running_var()),
        mean(static_cast<size_t>(s.channels)),
        invstd(static_cast<size_t>(s.channels)),
        scale(static_cast<size_t>(s.channels)),
        shift(static_cast<size_t>(s.channels)),
        ws(static_cast<size_t>(batchnorm_workspace_count(s))) {
    p.gamma = gamma.get();
    p.beta = beta.get();
    p.running_mean = rm.get();
    p.running_var = rv.get();
    p.save_mean = mean.get();
    p.save_invstd = invstd.get();
    p.save_scale = scale.get();
    p.save_shift = shift.get();
    p.relu = relu;
  }
};

void check_batchnorm(int64_t n, int64_t c, int64_t h, int64_t w, bool relu, bool as_2d,
                     uint64_t seed) {
  const BatchNormShape s{n, c, as_2d ? 1 : h * w};
  auto bn = relu ? nn::BatchNorm::with_relu("bn", c) : std::make_unique<nn::BatchNorm>("bn", c);
  const auto gam = normal(static_cast<size_t>(c), seed, 0.5f, 1.0f);
  const auto bet = normal(static_cast<size_t>(c), seed + 1, 0.3f);
  std::copy(gam.begin(), gam.end(), bn->params()[0]->value.data());
  std::copy(bet.begin(), bet.end(), bn->params()[1]->value.data());
  bn->running_mean() = normal(static_cast<size_t>(c), seed + 2, 0.1f);
  bn->running_var() = normal(static_cast<size_t>(c), seed + 3, 0.1f, 1.0f);
  Tensor x(as_2d ? Shape{n, c} : Shape{n, c, h, w});
  // An offset mean per element (BN's shifted sums matter when |mean| >> std).
  const auto xv = normal(static_cast<size_t>(x.numel()), seed + 4, 2.0f, 3.0f);
  std::copy(xv.begin(), xv.end(), x.data());
  BnDevice d(*bn, s, relu);
  Dev<float> dx_in(xv), dy_out(xv.size());
  const std::string what = "bn n=" + std::to_string(n) + " c=" + std::to_string(c) +
                           " hw=" + std::to_string(s.hw) + " relu=" + std::to_string(relu);
  // Training forward.
  Tensor y;
  bn->forward(x, y, true);
  batchnorm_forward_async(s, dx_in.get(), dy_out.get(), true, d.p, d.ws.get(), nullptr);
  const auto mean = d.mean.download(), scale = d.scale.download(), shift = d.shift.download();
  std::vector<double> tol(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) {
    const size_t ch = (i / static_cast<size_t>(s.hw)) % static_cast<size_t>(c);
    tol[i] =
        kBnUlps * std::ldexp(1.0, -24) *
        (std::fabs(xv[i] * scale[ch]) + std::fabs(shift[ch]) + std::fabs(mean[ch] * scale[ch]));
  }
  expect_within(dy_out.download(), std::vector<float>(y.data(), y.data() + y.numel()), tol,
                what + " forward");
  std::vector<double> rtol(static_cast<size_t>(c));
  const auto rm = d.rm.download(), rv = d.rv.download();
  for (int64_t ch = 0; ch < c; ++ch)
    rtol[ch] = kBnUlps * std::ldexp(1.0, -24) * (std::fabs(rv[ch]) + 1e-30);
  expect_within(rv, bn->running_var(), rtol, what + " running var");
  for (int64_t ch = 0; ch < c; ++ch)
    rtol[ch] = kBnUlps * std::ldexp(1.0, -24) * (std::fabs(rm[ch]) + std::fabs(mean[ch]));
  expect_within(rm, bn->running_mean(), rtol, what + " running mean");
  // Backward (gradients accumulated onto non-zero ones).
  const auto dyv = normal(xv.size(), seed + 5);
  Tensor dy(x.shape()), dx;
  std::copy(dyv.begin(), dyv.end(), dy.data());
  const auto g0 = normal(static_cast<size_t>(c), seed + 6),
             b0 = normal(static_cast<size_t>(c), seed + 7);
  std::copy(g0.begin(), g0.end(), bn->params()[0]->grad.data());
  std::copy(b0.begin(), b0.end(), bn->params()[1]->grad.data());
  bn->backward(x, y, dy, &dx);
  Dev<float> ddy(dyv), ddx(xv.size()), dgg(g0), dbg(b0);
  batchnorm_backward_async(s, dx_in.get(), ddy.get(), ddx.get(), dgg.get(), dbg.get(), d.p,
                           d.ws.get(), nullptr);
  // Gradient sums: sum |dy| and sum |dy (x - mean)| * invstd scale the rounding of both sides.
  // With the fused ReLU, an element whose pre-activation is within its forward tolerance of 0
  // may be masked on one side only: its whole term enters the bound (amb*).
  std::vector<double> asum(static_cast<size_t>(c), 0.0), bsum(static_cast<size_t>(c), 0.0);
  std::vector<double> amba(static_cast<size_t>(c), 0.0), ambb(static_cast<size_t>(c), 0.0);
  const auto invstd = d.invstd.download();
  for (size_t i = 0; i < xv.size(); ++i) {
    const size_t ch = (i / static_cast<size_t>(s.hw)) % static_cast<size_t>(c);
    const double a = std::fabs(dyv[i]), b = std::fabs(dyv[i] * (xv[i] - mean[ch]) * invstd[ch]);
    asum[ch] += a;
    bsum[ch] += b;
    const double pre = static_cast<double>(xv[i]) * scale[ch] + shift[ch];
    if (relu && std::fabs(pre) <= tol[i]) {
      amba[ch] += a;
      ambb[ch] += b;
    }
  }
  std::vector<double> gtol(static_cast<size_t>(c)), btol(static_cast<size_t>(c));
  const auto gg = dgg.download(), bg = dbg.download();
  for (int64_t ch = 0; ch < c; ++ch) {
    gtol[ch] = kBnUlps * std::ldexp(1.0, -24) * (bsum[ch] + std::fabs(g0[ch]) + std::fabs(gg[ch])) +
               ambb[ch];
    btol[ch] = kBnUlps * std::ldexp(1.0, -24) * (asum[ch] + std::fabs(b0[ch]) + std::fabs(bg[ch])) +
               amba[ch];
  }
  const Param& pg = *bn->params()[0];
  const Param& pb = *bn->params()[1];
  expect_within(gg, std::vector<float>(pg.grad.data(), pg.grad.data() + c), gtol, what + " dgamma");
  expect_within(bg, std::vector<float>(pb.grad.data(), pb.grad.data() + c), btol, what + " dbeta");
  // dx = g dy - (x - mean) k - g mean(dy): each term to kBnUlps ulps of its size. Elements whose
  // pre-activation is within its own tolerance of 0 may be masked differently: skipped.
  const auto got = ddx.download();
  const double count = static_cast<double>(n * s.hw);
  int compared = 0;
  for (size_t i = 0; i < xv.size(); ++i) {
    const size_t ch = (i / static_cast<size_t>(s.hw)) % static_cast<size_t>(c);
    const double pre = static_cast<double>(xv[i]) * scale[ch] + shift[ch];
    if (relu && std::fabs(pre) <= tol[i]) continue;
    const double g = std::fabs(scale[ch]);  // gamma * invstd
    // The three terms of dx, each to kBnUlps ulps (|mean| too: a 1-ulp mean moves x - mean).
    const double xm = std::fabs(xv[i] - mean[ch]) + std::fabs(mean[ch]);
    const double t = kBnUlps * std::ldexp(1.0, -24) *
                         (g * std::fabs(dyv[i]) + g * invstd[ch] * xm * bsum[ch] / count +
                          g * asum[ch] / count + std::fabs(dx[i])) +
                     g * invstd[ch] * xm * ambb[ch] / count + g * amba[ch] / count;
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - dx[i]), t) << what << " dx at " << i;
    ++compared;
  }
  EXPECT_GT(compared, static_cast<int>(xv.size() / 2)) << what;
  // Eval forward from the (updated) running statistics.
  bn->forward(x, y, false);
  batchnorm_forward_async(s, dx_in.get(), dy_out.get(), false, d.p, d.ws.get(), nullptr);
  const auto scale_e = d.scale.download(), shift_e = d.shift.download(), mean_e = d.mean.download();
  for (size_t i = 0; i < xv.size(); ++i) {
    const size_t ch = (i / static_cast<size_t>(s.hw)) % static_cast<size_t>(c);
    tol[i] = kBnUlps * std::ldexp(1.0, -24) *
             (std::fabs(xv[i] * scale_e[ch]) + std::fabs(shift_e[ch]) +
              std::fabs(mean_e[ch] * scale_e[ch]));
  }
  expect_within(dy_out.download(), std::vector<float>(y.data(), y.data() + y.numel()), tol,
                what + " eval forward");
}

TEST(CudaBatchNorm, MatchesCpuWithinBound) {
  REQUIRE_GPU();
  uint64_t seed = 100;
  for (bool relu : {false, true}) {
    check_batchnorm(1, 3, 5, 5, relu, false, seed += 10);
    check_batchnorm(4, 7, 3, 3, relu, false, seed += 10);
    check_batchnorm(3, 5, 1, 1, relu, true, seed += 10);      // BatchNorm1d (n, c)
    check_batchnorm(16, 9, 32, 32, relu, false, seed += 10);  // several slices per channel
    check_batchnorm(2, 64, 8, 8, relu, false, seed += 10);
    if (HasFatalFailure()) return;
  }
}

// ---- element-wise, pooling, shortcut, loss --------------------------------------------------

TEST(CudaLayers, ReluAndBiasBitExact) {
  REQUIRE_GPU();
  Tensor x({3, 5, 7}), dy({3, 5, 7}), y, dx;
  auto xv = normal(static_cast<size_t>(x.numel()), 1), dyv = normal(xv.size(), 2);
  xv[0] = -0.0f;
  xv[1] = 0.0f;
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(dyv.begin(), dyv.end(), dy.data());
  nn::ReLU relu("relu");
  relu.forward(x, y, true);
  relu.backward(x, y, dy, &dx);
  Dev<float> dxv(xv), ddy(dyv), dout(xv.size()), dgrad(xv.size());
  relu_forward_async(dxv.get(), dout.get(), x.numel(), nullptr);
  relu_backward_async(dxv.get(), ddy.get(), dgrad.get(), x.numel(), nullptr);
  expect_bits(dout.download(), std::vector<float>(y.data(), y.data() + y.numel()), "relu");
  expect_bits(dgrad.download(), std::vector<float>(dx.data(), dx.data() + dx.numel()), "relu dx");
  // Linear's bias: y += b per column; grad += dy summed row by row (Linear::backward's loops).
  const int64_t rows = 9, cols = 13;
  const auto yv = normal(static_cast<size_t>(rows * cols), 3),
             b = normal(static_cast<size_t>(cols), 4);
  const auto g = normal(static_cast<size_t>(rows * cols), 5),
             g0 = normal(static_cast<size_t>(cols), 6);
  std::vector<float> yref = yv, gref = g0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      yref[i * cols + j] += b[j];
      gref[j] += g[i * cols + j];
    }
  Dev<float> dyy(yv), db(b), dg(g), dgr(g0);
  bias_add_rows_async(dyy.get(), db.get(), rows, cols, nullptr);
  bias_grad_rows_async(dg.get(), rows, cols, dgr.get(), nullptr);
  expect_bits(dyy.download(), yref, "bias add");
  expect_bits(dgr.download(), gref, "bias grad");
}

TEST(CudaLayers, PoolingBitExact) {
  REQUIRE_GPU();
  // Odd sizes (a remainder the pooling ignores) and ties (values on a coarse grid).
  const int64_t shapes[][4] = {{1, 1, 2, 2}, {2, 3, 5, 7}, {3, 4, 28, 28}, {1, 2, 9, 9}};
  uint64_t seed = 30;
  for (const auto& sh : shapes)
    for (int window : {2, 3}) {
      if (sh[2] < window || sh[3] < window) continue;
      Tensor x({sh[0], sh[1], sh[2], sh[3]}), y, dx;
      auto xv = normal(static_cast<size_t>(x.numel()), ++seed);
      for (float& v : xv) v = std::round(v * 2.0f) / 2.0f;
      std::copy(xv.begin(), xv.end(), x.data());
      nn::MaxPool2d pool("pool", window);
      pool.forward(x, y, true);
      Tensor dy(y.shape());
      const auto dyv = normal(static_cast<size_t>(y.numel()), ++seed);
      std::copy(dyv.begin(), dyv.end(), dy.data());
      pool.backward(x, y, dy, &dx);
      Dev<float> dxin(xv), dyout(static_cast<size_t>(y.numel())), ddy(dyv), ddx(xv.size());
      Dev<int32_t> arg(static_cast<size_t>(y.numel()));
      const PoolGeometry geo{window, window, 0};
      maxpool_forward_async(dxin.get(), sh[0], sh[1], sh[2], sh[3], geo, dyout.get(), arg.get(),
                            nullptr);
      maxpool_backward_async(ddy.get(), arg.get(), sh[0], sh[1], sh[2], sh[3], geo, ddx.get(),
                             nullptr);
      const std::string what = "maxpool " + std::to_string(sh[2]) + "x" + std::to_string(sh[3]) +
                               " window " + std::to_string(window);
      expect_bits(dyout.download(), std::vector<float>(y.data(), y.data() + y.numel()), what);
      expect_bits(ddx.download(), std::vector<float>(dx.data(), dx.data() + dx.numel()),
                  what + " dx");
      // Global average pooling of the same input.
      nn::GlobalAvgPool gap("gap");
      Tensor ya, dxa;
      gap.forward(x, ya, true);
      Tensor dya(ya.shape());
      const auto dyav = normal(static_cast<size_t>(ya.numel()), ++seed);
      std::copy(dyav.begin(), dyav.end(), dya.data());
      gap.backward(x, ya, dya, &dxa);
      const int64_t hw = sh[2] * sh[3];
      Dev<float> dya_d(dyav), ya_d(static_cast<size_t>(ya.numel())), dxa_d(xv.size());
      global_avgpool_forward_async(dxin.get(), sh[0], sh[1], hw, ya_d.get(), nullptr);
      global_avgpool_backward_async(dya_d.get(), sh[0], sh[1], hw, dxa_d.get(), nullptr);
      expect_bits(ya_d.download(), std::vector<float>(ya.data(), ya.data() + ya.numel()),
                  "avgpool");
      expect_bits(dxa_d.download(), std::vector<float>(dxa.data(), dxa.data() + dxa.numel()),
                  "avgpool dx");
      if (HasFatalFailure()) return;
    }
}

// ResidualBlock's option-A shortcut, its loops restated (the block has no entry point for the
// shortcut alone): y = relu(body + [x subsampled, zero channels]); dsum = y > 0 ? dy : 0; dx +=
// dsum at the subsampled positions of the first in_channels channels.
TEST(CudaLayers, ShortcutBitExact) {
  REQUIRE_GPU();
  const ShortcutShape shapes[] = {
      {2, 3, 3, 5, 5, 1}, {3, 3, 8, 7, 7, 2}, {1, 16, 32, 8, 8, 2}, {2, 5, 6, 6, 9, 2}};
  uint64_t seed = 70;
  for (const ShortcutShape& s : shapes) {
    const int64_t ho = (s.h + s.stride - 1) / s.stride, wo = (s.w + s.stride - 1) / s.stride;
    const int64_t hw = ho * wo;
    const auto x = normal(static_cast<size_t>(s.n * s.in_channels * s.h * s.w), ++seed);
    const auto body = normal(static_cast<size_t>(s.n * s.out_channels * hw), ++seed);
    const auto dy = normal(body.size(), ++seed);
    const auto dx0 = normal(x.size(), ++seed);
    std::vector<float> y(body.size()), dsum(body.size()), dx = dx0;
    for (int64_t i = 0; i < s.n; ++i)
      for (int64_t c = 0; c < s.out_channels; ++c)
        for (int64_t oy = 0; oy < ho; ++oy)
          for (int64_t ox = 0; ox < wo; ++ox) {
            const size_t o = static_cast<size_t>(((i * s.out_channels + c) * ho + oy) * wo + ox);
            float v = body[o];
            if (c < s.in_channels)
              v = body[o] +
                  x[static_cast<size_t>(((i * s.in_channels + c) * s.h + oy * s.stride) * s.w +
                                        ox * s.stride)];
            y[o] = v > 0.0f ? v : 0.0f;
            dsum[o] = y[o] > 0.0f ? dy[o] : 0.0f;
            if (c < s.in_channels)
              dx[static_cast<size_t>(((i * s.in_channels + c) * s.h + oy * s.stride) * s.w +
                                     ox * s.stride)] += dsum[o];
          }
    Dev<float> dxin(x), dbody(body), dyout(body.size()), ddy(dy), dds(body.size()), ddx(dx0);
    residual_forward_async(s, dbody.get(), dxin.get(), dyout.get(), nullptr);
    residual_backward_async(s, dyout.get(), ddy.get(), dds.get(), nullptr);
    shortcut_backward_add_async(s, dds.get(), ddx.get(), nullptr);
    expect_bits(dyout.download(), y, "shortcut y");
    expect_bits(dds.download(), dsum, "shortcut dsum");
    expect_bits(ddx.download(), dx, "shortcut dx");
    if (HasFatalFailure()) return;
  }
}

// The device's double exp/log are within 1 ulp (2^-52) of glibc's; after the cast to float the
// loss and dlogits differ by at most 1 float rounding: 2^-23 relative (plus a tiny absolute term
// for values near 0, where the double error 2^-50 * (p + 1) / n dominates).
TEST(CudaLayers, SoftmaxCrossEntropy) {
  REQUIRE_GPU();
  const int64_t shapes[][2] = {{1, 1}, {1, 10}, {7, 3}, {128, 10}, {33, 1000}};
  uint64_t seed = 90;
  for (const auto& sh : shapes) {
    const int64_t n = sh[0], k = sh[1];
    Tensor logits({n, k}), dl;
    auto lv = normal(static_cast<size_t>(n * k), ++seed, 3.0f);
    if (k > 2) lv[1] = lv[2];  // a tie for the argmax
    std::copy(lv.begin(), lv.end(), logits.data());
    std::vector<int32_t> labels(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) labels[i] = static_cast<int32_t>((i * 7 + 1) % k);
    int64_t correct = -1;
    const float loss = nn::softmax_cross_entropy(logits, labels.data(), &dl, &correct);
    Dev<float> dlog(lv), ddl(lv.size());
    Dev<int32_t> dlab(labels);
    const CrossEntropyResult r =
        softmax_cross_entropy(dlog.get(), dlab.get(), n, k, ddl.get(), nullptr);
    EXPECT_EQ(r.correct, correct);
    EXPECT_LE(std::fabs(r.loss - loss), std::ldexp(std::fabs(loss), -23) + 1e-12) << n << "x" << k;
    std::vector<double> tol(lv.size());
    for (size_t i = 0; i < tol.size(); ++i)
      tol[i] = std::ldexp(std::fabs(dl[static_cast<int64_t>(i)]), -23) + std::ldexp(2.0 / n, -50);
    expect_within(ddl.download(), std::vector<float>(dl.data(), dl.data() + dl.numel()), tol,
                  "dlogits");
  }
  // A label outside 0..k-1 is an error naming it.
  Dev<float> dlog(std::vector<float>(6, 0.0f));
  Dev<int32_t> dlab(std::vector<int32_t>{0, 3});
  try {
    softmax_cross_entropy(dlog.get(), dlab.get(), 2, 3, nullptr, nullptr);
    FAIL() << "no error for label 3 of 3 classes";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("label 3 of sample 1"), std::string::npos) << e.what();
  }
}

// ---- optimizers ----------------------------------------------------------------------------

// train::Optimizer over a small arena (weights with decay, a bias without, two quantizer steps)
// against the device steps, three updates, bit for bit, plain and Nesterov momentum.
TEST(CudaOptim, SgdAndAdamBitExact) {
  REQUIRE_GPU();
  for (bool nesterov : {false, true}) {
    const int64_t nw = 1000, nb = 37, nq = 2, n = nw + nb + nq;
    std::vector<float> values = normal(static_cast<size_t>(n), 11), grads(static_cast<size_t>(n));
    Param w, b, q;
    w.name = "w";
    w.value = Tensor::view(values.data(), {nw});
    b.name = "b";
    b.decay = false;
    b.value = Tensor::view(values.data() + nw, {nb});
    q.name = "s_w";
    q.group = ParamGroup::kQuantizer;
    q.decay = false;
    q.value = Tensor::view(values.data() + nw + nb, {nq});
    train::OptimConfig cfg;
    cfg.nesterov = nesterov;
    cfg.quant_lr = 1e-3;  // larger than the default so the Adam update is visible in float
    train::Optimizer opt(cfg, {&w, &b, &q}, values.data(), grads.data(), n);
    Dev<float> dv(values), dg(static_cast<size_t>(n)),
        dmom(std::vector<float>(static_cast<size_t>(n), 0.0f));
    Dev<float> dm(std::vector<float>(static_cast<size_t>(n), 0.0f)),
        ds(std::vector<float>(static_cast<size_t>(n), 0.0f));
    for (int step = 1; step <= 3; ++step) {
      grads = normal(static_cast<size_t>(n), 100 + step, 0.1f);
      dg.upload(grads);
      const double lr = 0.1 / step;
      opt.step(lr);
      SgdScalars sw{static_cast<float>(lr), static_cast<float>(cfg.momentum),
                    static_cast<float>(cfg.weight_decay), nesterov};
      SgdScalars sb = sw;
      sb.weight_decay = 0.0f;
      sgd_step_async(dv.get(), dg.get(), dmom.get(), nw, sw, nullptr);
      sgd_step_async(dv.get() + nw, dg.get() + nw, dmom.get() + nw, nb, sb, nullptr);
      const AdamScalars a =
          adam_scalars(cfg.quant_lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, step);
      adam_step_async(dv.get() + nw + nb, dg.get() + nw + nb, dm.get() + nw + nb,
                      ds.get() + nw + nb, nq, a, nullptr);
      const std::string what =
          "step " + std::to_string(step) + " nesterov " + std::to_string(nesterov);
      expect_bits(dv.download(), values, what + " values");
      const auto mom = dmom.download();
      expect_bits(std::vector<float>(mom.begin(), mom.begin() + nw + nb),
                  std::vector<float>(opt.momentum().begin(), opt.momentum().begin() + nw + nb),
                  what + " momentum");
      const auto am = dm.download(), av = ds.download();
      expect_bits(std::vector<float>(am.begin() + nw + nb, am.end()),
                  std::vector<float>(opt.adam_m().begin() + nw + nb, opt.adam_m().end()),
                  what + " adam m");
      expect_bits(std::vector<float>(av.begin() + nw + nb, av.end()),
                  std::vector<float>(opt.adam_v().begin() + nw + nb, opt.adam_v().end()),
                  what + " adam v");
      if (HasFatalFailure()) return;
    }
  }
}

// ---- determinism
// ---------------------------------------------------------------------------------

// Two runs of the reducing kernels (BatchNorm forward and backward, sgemm, both integer paths,
// cross-entropy) on the same inputs give the same bits.
TEST(CudaDeterminism, RerunSameBits) {
  REQUIRE_GPU();
  auto run = [](std::vector<std::vector<float>>* out) {
    GemmContext ctx;
    const BatchNormShape s{32, 8, 16 * 16};
    const int64_t count = s.n * s.channels * s.hw;
    const auto xv = normal(static_cast<size_t>(count), 1, 2.0f, 1.0f);
    const auto dyv = normal(xv.size(), 2);
    nn::BatchNorm bn("bn", s.channels);
    BnDevice d(bn, s, true);
    Dev<float> x(xv), y(xv.size()), dy(dyv), dx(xv.size());
    Dev<float> gg(std::vector<float>(static_cast<size_t>(s.channels), 0.0f));
    Dev<float> bg(std::vector<float>(static_cast<size_t>(s.channels), 0.0f));
    batchnorm_forward_async(s, x.get(), y.get(), true, d.p, d.ws.get(), nullptr);
    batchnorm_backward_async(s, x.get(), dy.get(), dx.get(), gg.get(), bg.get(), d.p, d.ws.get(),
                             nullptr);
    out->push_back(y.download());
    out->push_back(dx.download());
    out->push_back(gg.download());
    out->push_back(bg.download());
    out->push_back(d.rv.download());
    const int64_t m = 256, n = 64, k = 576;
    const auto a = normal(static_cast<size_t>(m * k), 3), b = normal(static_cast<size_t>(k * n), 4);
    Dev<float> da(a), db(b), dc(static_cast<size_t>(m * n));
    sgemm(ctx, Trans::kNo, Trans::kNo, m, n, k, 1.0f, da.get(), k, db.get(), n, 0.0f, dc.get(), n,
          nullptr);
    out->push_back(dc.download());
    const HostCodes ca = make_codes(m, k, 0, -7, 7, 5), cb = make_codes(k, n, 0, 0, 15, 6);
    Dev<uint8_t> ia(ca.raw), ib(cb.raw);
    for (IntGemmPath p : {IntGemmPath::kCublasLt, IntGemmPath::kFallback}) {
      int_gemm(ctx, m, n, k, {ia.get(), k, Trans::kNo, CodeType::kS8, 7},
               {ib.get(), n, Trans::kNo, CodeType::kU8, 15}, 0.01f, false, dc.get(), n, nullptr, p);
      out->push_back(dc.download());
    }
    std::vector<int32_t> labels(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) labels[i] = static_cast<int32_t>(i % n);
    Dev<int32_t> dl(labels);
    Dev<float> dlog(static_cast<size_t>(m * n));
    const CrossEntropyResult r =
        softmax_cross_entropy(dc.get(), dl.get(), m, n, dlog.get(), nullptr);
    out->push_back(dlog.download());
    out->push_back({r.loss, static_cast<float>(r.correct)});
  };
  std::vector<std::vector<float>> first, second;
  run(&first);
  run(&second);
  ASSERT_EQ(first.size(), second.size());
  for (size_t i = 0; i < first.size(); ++i)
    expect_bits(second[i], first[i], "rerun output " + std::to_string(i));
}

}  // namespace
}  // namespace int4ddp::math::cuda
