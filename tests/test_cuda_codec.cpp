// The CUDA codec against the CPU reference (kernels/quant/cuda/codec_cuda.h): codes, packed
// bytes, scales and stats of quantize, the floats of dequantize, and the owner step against the
// CPU two-shot composition, all bit for bit. Every test that needs a GPU skips without one.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda_test.h"
#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "kernels/quant/policy.h"

namespace int4ddp::quant {
namespace {

// A device allocation with an optional byte offset (to test misaligned buffers).
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t count, size_t offset_bytes = 0)
      : count_(count), offset_(offset_bytes) {
    INT4DDP_CUDA_CHECK(cudaMalloc(&base_, count * sizeof(T) + offset_bytes + 16));
    INT4DDP_CUDA_CHECK(cudaMemset(base_, 0xAB, count * sizeof(T) + offset_bytes + 16));
  }
  ~DeviceArray() { cudaFree(base_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() { return reinterpret_cast<T*>(static_cast<uint8_t*>(base_) + offset_); }
  void upload(const std::vector<T>& v) {
    INT4DDP_CUDA_CHECK(cudaMemcpy(get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  // count_ elements plus `extra` guard elements past the end.
  std::vector<T> download(size_t extra = 0) {
    std::vector<T> v(count_ + extra);
    INT4DDP_CUDA_CHECK(cudaMemcpy(v.data(), get(), v.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }

 private:
  void* base_ = nullptr;
  size_t count_, offset_;
};

// Gaussian data with outliers, exact zeros, ties for rint, and optionally NaN/Inf (as test_codec).
std::vector<float> make_input(int64_t n, uint64_t seed, bool nonfinite) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) {
    const int k = pick(rng);
    if (k < 3)
      v = 0.0f;
    else if (k < 5)
      v = 50.0f * normal(rng);
    else if (k < 7)
      v = 0.5f * static_cast<float>(static_cast<int>(normal(rng) * 8));
    else if (k < 8)
      v = 1e-41f * static_cast<float>(static_cast<int>(normal(rng) * 8));  // denormals
    else
      v = normal(rng);
  }
  if (nonfinite && n > 3) {
    x[static_cast<size_t>(n / 3)] = std::numeric_limits<float>::quiet_NaN();
    x[static_cast<size_t>(n / 2)] = std::numeric_limits<float>::infinity();
    x[static_cast<size_t>(n - 1)] = -std::numeric_limits<float>::infinity();
  }
  return x;
}

void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t ua, ub;
    std::memcpy(&ua, &a[i], 4);
    std::memcpy(&ub, &b[i], 4);
    ASSERT_EQ(ua, ub) << what << " differs at " << i << ": " << a[i] << " vs " << b[i];
  }
}

// quantize on the device (buffers offset by `misalign` bytes) against quantize_ref, then
// dequantize of the reference codes against dequantize_ref. clips: per-block clips for both (host
// copy for the reference, device copy for the GPU), or null.
void check_against_reference(const std::vector<float>& x, const QuantParams& p, size_t misalign,
                             const std::vector<float>* clips = nullptr) {
  const int64_t n = static_cast<int64_t>(x.size());
  const size_t nbytes = static_cast<size_t>(packed_bytes(p.bits, n));
  const size_t nsc = static_cast<size_t>(num_scales(n, p.block_size));
  std::vector<uint8_t> ref_codes(nbytes + 1, 0xAB);
  std::vector<float> ref_scales(nsc);
  QuantParams ph = p, pd = p;
  ph.clips = clips ? clips->data() : nullptr;
  const QuantStats ref = quantize_ref(x.data(), n, ph, ref_codes.data(), ref_scales.data());

  DeviceArray<float> dx(x.size(), misalign * 4);
  DeviceArray<uint8_t> dcodes(nbytes, misalign);
  DeviceArray<float> dscales(nsc);
  DeviceArray<float> dclips(clips ? clips->size() : 0);
  if (clips) {
    dclips.upload(*clips);
    pd.clips = dclips.get();
  }
  dx.upload(x);
  const QuantStats got = cuda::quantize(dx.get(), n, pd, dcodes.get(), dscales.get());
  ASSERT_EQ(dcodes.download(1), ref_codes) << "codes (or the guard byte after them)";
  expect_same_bits(dscales.download(), ref_scales, "scale");
  EXPECT_EQ(got.count, ref.count);
  EXPECT_EQ(got.clipped, ref.clipped);
  EXPECT_EQ(got.nonfinite, ref.nonfinite);
  EXPECT_EQ(got.absmax, ref.absmax);

  std::vector<float> ref_out(x.size());
  dequantize_ref(ref_codes.data(), ref_scales.data(), n, p.bits, p.block_size, ref_out.data());
  DeviceArray<float> dout(x.size(), misalign * 4);
  dcodes.upload(std::vector<uint8_t>(ref_codes.begin(), ref_codes.end() - 1));
  dscales.upload(ref_scales);
  cuda::dequantize(dcodes.get(), dscales.get(), n, p.bits, p.block_size, dout.get());
  expect_same_bits(dout.download(), ref_out, "dequantized");
}

class CudaCodec : public testing::TestWithParam<int> {};

// Every b, both roundings, the sizes and block sizes of the issue (0 = per tensor; 1, 2, 7, 64
// take the general path; 128..4096 the fused one), clipping (gamma < 1) and NaN/Inf.
TEST_P(CudaCodec, MatchesReference) {
  REQUIRE_GPU();
  const int bits = GetParam();
  const int64_t sizes[] = {0, 1, 3, 511, 513, 4096 * 3 + 5, (int64_t{1} << 20) + 7};
  const int64_t blocks[] = {0, 1, 2, 7, 64, 128, 256, 512, 1024, 4096};
  for (int64_t n : sizes) {
    const std::vector<float> x = make_input(n, 1000 + n, n % 2 == 1);
    for (int64_t g : blocks) {
      if (n > 100000 && (g == 1 || g == 2)) continue;  // CPU reference time; 7 covers odd G
      for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
        QuantParams p;
        p.bits = bits;
        p.rounding = r;
        p.block_size = g;
        p.gamma = g % 3 == 0 ? 0.37f : (g == 512 ? 0.8f : 1.0f);
        p.key = RngKey{123456789u, 3, 100000, static_cast<uint32_t>(g)};
        SCOPED_TRACE(testing::Message() << "bits=" << bits << " rounding=" << static_cast<int>(r)
                                        << " G=" << g << " n=" << n);
        check_against_reference(x, p, 0);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// Misaligned input and code buffers take the general or scalar paths with the same results. An
// offset of `misalign` elements puts x at 4 * misalign bytes and the codes at misalign bytes: 1 and
// 3 misalign both; 4 keeps x 16-byte aligned with codes 4-byte aligned (INT4 vector stores, the
// 8-per-thread dequantize); 8 gives 8-byte aligned codes (INT8 vector stores).
TEST_P(CudaCodec, MisalignedBuffers) {
  REQUIRE_GPU();
  const std::vector<float> x = make_input(10001, 5, true);
  for (int64_t g : {0, 7, 512, 4096}) {
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      QuantParams p;
      p.bits = GetParam();
      p.rounding = r;
      p.block_size = g;
      p.key = RngKey{1, 2, 3, 4};
      for (size_t misalign : {1, 3, 4, 8}) {
        SCOPED_TRACE(testing::Message() << "G=" << g << " rounding=" << static_cast<int>(r)
                                        << " misalign=" << misalign);
        check_against_reference(x, p, misalign);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// Scopes at the edges of the definition, block by block (b = block index % 4):
//   0: exact ties of rint: max |x| = L (gamma 1: c = L, r = 1, d = 1) and x in -L, -L + 1/2, ..;
//   1: denormals only: c < L / FLT_MAX, so r saturates at FLT_MAX;
//   2: all zero: c = d = r = 0;
//   3: one value near FLT_MAX among normal values (z of the others underflows towards 0).
// G = 0 (one scope) takes the ties pattern over the whole tensor.
std::vector<float> edge_input(int64_t n, int64_t G, int bits) {
  const float lim = static_cast<float>(levels(bits));
  const int64_t scope = G == 0 ? std::max<int64_t>(n, 1) : G;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / scope, j = i % scope;
    float& v = x[static_cast<size_t>(i)];
    switch (G == 0 ? 0 : b % 4) {
      case 0:
        v = j == 0 ? (b % 2 ? -lim : lim) : static_cast<float>(j % (4 * levels(bits))) * 0.5f - lim;
        break;
      case 1:
        v = 1e-41f * static_cast<float>(j % 17 - 8);
        break;
      case 2:
        v = 0.0f;
        break;
      default:
        v = j == 1 ? -3.0e38f : static_cast<float>(j % 9) - 4.0f;
    }
  }
  return x;
}

// check_against_reference for both roundings, buffers aligned and misaligned by one element.
void check_both_roundings(const std::vector<float>& x, int bits, int64_t block_size,
                          const RngKey& key, const std::vector<float>* clips = nullptr) {
  for (Rounding r : {Rounding::kNearest, Rounding::kStochastic})
    for (size_t misalign : {size_t{0}, size_t{1}}) {
      QuantParams p;
      p.bits = bits;
      p.rounding = r;
      p.block_size = block_size;
      p.key = key;
      SCOPED_TRACE(testing::Message() << "G=" << block_size << " rounding=" << static_cast<int>(r)
                                      << " misalign=" << misalign);
      check_against_reference(x, p, misalign, clips);
      if (testing::Test::HasFatalFailure()) return;
    }
}

TEST_P(CudaCodec, EdgeScopesMatchReference) {
  REQUIRE_GPU();
  const int bits = GetParam();
  for (int64_t g : {0, 1, 7, 64, 128, 256, 512, 1024, 2048, 4096}) {
    const int64_t n = g == 0 ? 4099 : 5 * g + g / 2 + 1;
    const std::vector<float> x = edge_input(n, g, bits);
    check_both_roundings(x, bits, g, RngKey{7, 8, 9, 10});
    if (HasFatalFailure()) return;
  }
}

// Given per-block clips (QuantParams::clips) of every kind the codec accepts, on the fused
// (G = 128 .. 4096, every V and warps-per-scope shape) and general paths: c_b = 0 (all codes 0,
// every non-zero element clipped), half the block's max (saturation), twice the max (nothing
// clipped) and a denormal (r saturated at FLT_MAX).
TEST_P(CudaCodec, GivenClipsMatchReference) {
  REQUIRE_GPU();
  const int bits = GetParam();
  for (int64_t g : {7, 128, 256, 512, 1024, 2048, 4096}) {
    const int64_t n = 6 * g + g / 3 + 1;
    const std::vector<float> x = make_input(n, 500 + g, true);
    std::vector<float> clips(static_cast<size_t>(num_scales(n, g)));
    for (size_t b = 0; b < clips.size(); ++b) {
      float m = 0.0f;
      for (int64_t i = static_cast<int64_t>(b) * g;
           i < std::min(n, static_cast<int64_t>(b + 1) * g); ++i)
        if (std::isfinite(x[static_cast<size_t>(i)]))
          m = std::max(m, std::fabs(x[static_cast<size_t>(i)]));
      const float kinds[] = {0.0f, 0.5f * m, 2.0f * m, 1e-40f};
      clips[b] = kinds[b % 4];
    }
    check_both_roundings(x, bits, g, RngKey{17, 18, 19, 20}, &clips);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Bits, CudaCodec, testing::Range(kMinBits, kMaxBits + 1),
                         [](const testing::TestParamInfo<int>& i) {
                           return "int" + std::to_string(i.param);
                         });

// ---- per-block clips (topk) --------------------------------------------------------------------

// Blocks of a bucket that exercise topk's fallbacks: outliers and NaN/Inf (make_input), one
// all-zero block, one sparse block (2 non-zero) and one of ties.
std::vector<float> clip_input(int64_t n, int64_t G, uint64_t seed) {
  std::vector<float> x = make_input(n, seed, true);
  for (int64_t i = 0; i < std::min(n, G); ++i) x[static_cast<size_t>(i)] = 0.0f;
  for (int64_t i = G; i < std::min(n, 2 * G); ++i)
    x[static_cast<size_t>(i)] = i % G < 2 ? 3.0f : 0.0f;
  for (int64_t i = 2 * G; i < std::min(n, 3 * G); ++i)
    x[static_cast<size_t>(i)] = static_cast<float>(i % 5) - 2.0f;
  return x;
}

// block_clips_async against quant::block_clips (topk with several k, mse with several b), then
// quantize with those clips (fused and general paths, aligned and not) against quantize_ref with
// them: bit for bit.
TEST(CudaCodecClips, BlockClipsAndQuantizeMatchTheCpu) {
  REQUIRE_GPU();
  for (int64_t G : {2, 6, 64, 128, 512, 1000, 4096})
    for (int k : {1, 4, 16, -2, -4, -8}) {  // k < 0: mse with bits -k
      if (k >= G) continue;
      const int64_t n = 7 * G + G / 2 + 1;
      SCOPED_TRACE(testing::Message() << "G " << G << " k " << k);
      const std::vector<float> x = clip_input(n, G, 31 + static_cast<uint64_t>(G) + k);
      PolicyConfig cfg;
      cfg.kind = k > 0 ? PolicyKind::kTopK : PolicyKind::kMse;
      cfg.topk = k > 0 ? k : 4;
      cfg.bits = k > 0 ? 4 : -k;
      std::vector<float> want(static_cast<size_t>(num_scales(n, G)));
      block_clips(x.data(), n, G, cfg, want.data());
      DeviceArray<float> dx(x.size()), dclips(want.size());
      dx.upload(x);
      cuda::block_clips_async(dx.get(), n, G, cfg, dclips.get(), nullptr);
      INT4DDP_CUDA_CHECK(cudaDeviceSynchronize());
      expect_same_bits(dclips.download(), want, "topk clip");
      if (HasFatalFailure()) return;
      for (int bits : {4, 8, 3}) {
        check_both_roundings(x, bits, G, RngKey{3, 4, 5, 6}, &want);
        if (HasFatalFailure()) return;
      }
    }
}

// ---- owner step ------------------------------------------------------------------------------

// The CPU composition of comm/two_shot.cpp step 5 for one chunk.
struct OwnerRef {
  std::vector<uint8_t> codes;
  std::vector<float> scales, out, es_next;
  QuantStats stats;
};

OwnerRef owner_reference(const std::vector<std::vector<uint8_t>>& codes,
                         const std::vector<std::vector<float>>& scales, int64_t count,
                         QuantParams p, const std::vector<float>* es, const PolicyConfig& rule) {
  const int n = static_cast<int>(codes.size());
  std::vector<float> acc(static_cast<size_t>(count), 0.0f), tmp(static_cast<size_t>(count));
  for (int r = 0; r < n; ++r) {
    dequantize_ref(codes[r].data(), scales[r].data(), count, p.bits, p.block_size, tmp.data());
    for (int64_t k = 0; k < count; ++k) acc[k] += tmp[k];
  }
  const float fn = static_cast<float>(n);
  for (int64_t k = 0; k < count; ++k) acc[k] /= fn;
  if (es)
    for (int64_t k = 0; k < count; ++k) acc[k] += (*es)[k];
  OwnerRef ref;
  ref.codes.assign(static_cast<size_t>(packed_bytes(p.bits, count)), 0);
  ref.scales.assign(static_cast<size_t>(num_scales(count, p.block_size)), 0.0f);
  std::vector<float> clips(ref.scales.size());
  if (rule.kind == PolicyKind::kTopK || rule.kind == PolicyKind::kMse) {  // the host owner's
    block_clips(acc.data(), count, p.block_size, rule, clips.data());     // block-rule clips
    p.clips = clips.data();
  }
  ref.stats = quantize_ref(acc.data(), count, p, ref.codes.data(), ref.scales.data());
  ref.out.resize(static_cast<size_t>(count));
  dequantize_ref(ref.codes.data(), ref.scales.data(), count, p.bits, p.block_size, ref.out.data());
  if (es) {
    ref.es_next.resize(static_cast<size_t>(count));
    for (int64_t k = 0; k < count; ++k) ref.es_next[k] = acc[k] - ref.out[k];
  }
  return ref;
}

struct OwnerCase {
  int ranks;
  int64_t count, block_size;
  int bits;
  bool server_ef;
  bool packed_messages;  // messages back to back in one byte buffer (unaligned), as on the wire
};

void check_owner(const OwnerCase& c, Rounding rounding, const PolicyConfig& rule = PolicyConfig{}) {
  SCOPED_TRACE(testing::Message() << "N=" << c.ranks << " n=" << c.count << " G=" << c.block_size
                                  << " bits=" << c.bits << " es=" << c.server_ef << " packed="
                                  << c.packed_messages << " rounding=" << static_cast<int>(rounding)
                                  << " rule=" << policy_kind_name(rule.kind) << " k=" << rule.topk);
  const int64_t n = c.count;
  QuantParams p;
  p.bits = c.bits;
  p.rounding = rounding;
  p.block_size = c.block_size;
  const bool block_rule = rule.kind == PolicyKind::kTopK || rule.kind == PolicyKind::kMse;
  p.gamma = block_rule ? 1.0f : 0.9f;
  // The ranks' own messages, made by the CPU quantizer with the two-shot's worker keys.
  std::vector<std::vector<uint8_t>> codes(c.ranks);
  std::vector<std::vector<float>> scales(c.ranks);
  for (int r = 0; r < c.ranks; ++r) {
    const std::vector<float> v = make_input(n, 77 + r, false);
    codes[r].assign(static_cast<size_t>(packed_bytes(p.bits, n)), 0);
    scales[r].assign(static_cast<size_t>(num_scales(n, p.block_size)), 0.0f);
    QuantParams pw = p;
    pw.key = RngKey{11, 65536u * r + 1, 5, 6};
    quantize_ref(v.data(), n, pw, codes[r].data(), scales[r].data());
  }
  std::vector<float> es = make_input(n, 999, false);
  for (float& e : es) e *= 0.01f;
  p.key = RngKey{11, 65536u + 1, 5, 7};
  const OwnerRef ref = owner_reference(codes, scales, n, p, c.server_ef ? &es : nullptr, rule);

  // Device messages: codes then scale bytes, either each in its own allocation or packed with odd
  // offsets.
  const size_t code_bytes = static_cast<size_t>(packed_bytes(p.bits, n));
  const size_t scale_bytes = scales[0].size() * 4;
  const size_t msg_bytes = code_bytes + scale_bytes + 32;  // + the trailer, as on the wire
  DeviceArray<uint8_t> wire(static_cast<size_t>(c.ranks) * msg_bytes + 1,
                            c.packed_messages ? 1 : 0);
  std::vector<std::unique_ptr<DeviceArray<uint8_t>>> own;
  std::vector<const uint8_t*> dcodes(c.ranks), dscales(c.ranks);
  for (int r = 0; r < c.ranks; ++r) {
    uint8_t* base;
    if (c.packed_messages) {
      base = wire.get() + static_cast<size_t>(r) * msg_bytes;
    } else {
      own.push_back(std::make_unique<DeviceArray<uint8_t>>(code_bytes + scale_bytes));
      base = own.back()->get();
    }
    if (code_bytes)
      INT4DDP_CUDA_CHECK(cudaMemcpy(base, codes[r].data(), code_bytes, cudaMemcpyHostToDevice));
    if (scale_bytes)
      INT4DDP_CUDA_CHECK(
          cudaMemcpy(base + code_bytes, scales[r].data(), scale_bytes, cudaMemcpyHostToDevice));
    dcodes[r] = base;
    dscales[r] = base + code_bytes;
  }
  DeviceArray<float> des(static_cast<size_t>(n)), des_next(static_cast<size_t>(n)),
      dout(static_cast<size_t>(n)), dscales_out(scales[0].size());
  DeviceArray<uint8_t> dcodes_out(code_bytes);
  DeviceArray<QuantStats> dstats(1);
  des.upload(es);
  cuda::OwnerStepArgs a;
  a.ranks = c.ranks;
  a.codes = dcodes.data();
  a.scales = dscales.data();
  a.count = n;
  a.params = p;
  a.es = c.server_ef ? des.get() : nullptr;
  a.es_next = c.server_ef ? des_next.get() : nullptr;
  a.codes_out = dcodes_out.get();
  a.scales_out = dscales_out.get();
  a.out = dout.get();
  a.stats = dstats.get();
  DeviceArray<float> dclips(scales[0].size());
  a.block_rule = rule;
  a.clips = block_rule ? dclips.get() : nullptr;
  cuda::owner_step_async(a, nullptr);
  INT4DDP_CUDA_CHECK(cudaDeviceSynchronize());
  ASSERT_EQ(dcodes_out.download(), ref.codes);
  expect_same_bits(dscales_out.download(), ref.scales, "owner scales");
  expect_same_bits(dout.download(), ref.out, "owner dequantized copy");
  if (c.server_ef) expect_same_bits(des_next.download(), ref.es_next, "server error");
  const QuantStats st = dstats.download()[0];
  EXPECT_EQ(st.count, ref.stats.count);
  EXPECT_EQ(st.clipped, ref.stats.clipped);
  EXPECT_EQ(st.nonfinite, ref.stats.nonfinite);
  EXPECT_EQ(st.absmax, ref.stats.absmax);
}

TEST(CudaOwnerStep, MatchesCpuComposition) {
  REQUIRE_GPU();
  const OwnerCase cases[] = {
      {1, 513, 512, 4, true, false},
      {2, 512 * 9 + 3, 512, 4, true, false},
      {2, 512 * 9 + 3, 512, 4, true, true},
      {3, 1000, 128, 8, true, false},
      {4, 4096 * 3 + 1, 4096, 4, false, false},
      {8, 65536 + 17, 512, 4, true, true},
      {8, 20000, 256, 2, true, false},
      {5, 3001, 64, 4, true, false},  // general path (G)
      {3, 777, 6, 3, false, true},
      {70, 2049, 512, 4, true, false},  // N > fused maximum
      {2, 0, 512, 4, true, false},
      {4, 1, 512, 8, true, true},
  };
  for (const OwnerCase& c : cases)
    for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
      check_owner(c, r);
      if (HasFatalFailure()) return;
    }
}

// The owner step with a block rule's clips of m (topk, mse: the general path) against the host
// composition.
TEST(CudaOwnerStep, BlockRuleClipsMatchCpuComposition) {
  REQUIRE_GPU();
  const OwnerCase cases[] = {
      {2, 512 * 9 + 3, 512, 4, true, true},
      {4, 20001, 6, 4, true, false},
      {3, 1000, 128, 8, false, true},
      {1, 3, 512, 4, true, false},  // fewer elements than k + 1
      {2, 0, 512, 4, true, false},
  };
  for (const OwnerCase& c : cases)
    for (int k : {1, 4, 0})  // 0: mse
      for (Rounding r : {Rounding::kNearest, Rounding::kStochastic}) {
        PolicyConfig rule;
        rule.kind = k > 0 ? PolicyKind::kTopK : PolicyKind::kMse;
        rule.topk = k > 0 ? k : 4;
        rule.bits = c.bits;
        check_owner(c, r, rule);
        if (HasFatalFailure()) return;
      }
}

// ---- errors ------------------------------------------------------------------------------------

// A failed CUDA call is an Error naming the call, file and rank (runs with or without a GPU: with
// no device or driver, the call fails all the same).
TEST(CudaErrors, FailedCallNamesCallFileAndRank) {
  void* p = nullptr;
  try {
    INT4DDP_CUDA_CHECK(cudaMalloc(&p, size_t{1} << 62));  // 4 EiB: always fails
    cudaFree(p);
    FAIL() << "cudaMalloc of 4 EiB succeeded";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cudaMalloc(&p, size_t{1} << 62)"), std::string::npos) << what;
    EXPECT_NE(what.find("test_cuda_codec.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("on rank"), std::string::npos) << what;
  }
  (void)cudaGetLastError();
}

// Bad arguments are refused before anything is enqueued (no device needed).
TEST(CudaErrors, BadArgumentsThrow) {
  QuantParams p;
  p.bits = 9;
  float* x = nullptr;
  EXPECT_THROW(cuda::quantize_async(x, 10, p, nullptr, nullptr, nullptr, nullptr), Error);
  p.bits = 4;
  EXPECT_THROW(cuda::quantize_async(x, 10, p, nullptr, nullptr, nullptr, nullptr), Error);
  EXPECT_THROW(cuda::dequantize_async(nullptr, nullptr, 10, 1, 0, nullptr, nullptr), Error);
  cuda::OwnerStepArgs a;
  a.ranks = 0;
  EXPECT_THROW(cuda::owner_step_async(a, nullptr), Error);
}

// Clips sharing memory with the scales are refused before anything is enqueued (the fused kernel
// writes a scope's step while other warps may still read its clip). No device needed.
TEST(CudaErrors, ClipsOverlappingScalesThrow) {
  float x[40] = {}, scales[8] = {};
  uint8_t codes[40] = {};
  QuantStats stats;
  QuantParams p;
  p.block_size = 4;
  const float* const overlapping[] = {scales, scales + 3};
  for (const float* clips : overlapping) {
    p.clips = clips;
    try {
      cuda::quantize_async(x, 40, p, codes, scales, &stats, nullptr);
      ADD_FAILURE() << "overlapping clips accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("clips and scales overlap"), std::string::npos)
          << e.what();
    }
  }
  (void)cudaGetLastError();
}

}  // namespace
}  // namespace int4ddp::quant
