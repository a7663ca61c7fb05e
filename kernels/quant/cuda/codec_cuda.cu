// The CUDA codec (see codec_cuda.h for the contract). Every code, scale and float comes from the
// scalar helpers of format.h / philox.h, the same functions the CPU reference calls, so equality
// with quantize_ref is a matter of doing the same IEEE operations in the same order:
//   clip = gamma * absmax; d = clip / L; r = L / clip (once per scope);
//   q = clamp(rint(x * r)) or clamp(floor(x * r + u)), u a 16-bit uniform, one Philox call per 8.
// absmax is a max (exact in any order) and the counters are integers, so the parallel reductions
// need no fixed order. This file is compiled with -fmad=false -prec-div=true -ftz=false
// (cmake/cuda.cmake): without them nvcc may contract a*b+c into an FMA, or divide approximately.
//
// Kernels:
//   quantize_fused_kernel<V>  per-block scales, G = 128 V * warps_per_scope: one warp (or a few,
//                             joined through shared memory) per scale block, the block's values in
//                             registers, so x is read once. The fast path for G = 512.
//   owner_fused_kernel<V,A>   the same tile walk for the owner step: N messages are dequantized and
//                             summed in registers, requantized, and the own copy written.
//   tensor_absmax_kernel, encode_kernel
//                             per-tensor scale: two passes, the global absmax (an integer atomicMax
//                             on the bit pattern, order-independent) then quantize+pack, eight
//                             elements (one Philox call) per thread, 16-byte loads when aligned.
//   scope_clips_kernel, encode_kernel, clips_to_steps_kernel
//                             the general per-block path (any G, any alignment): clips (and stats)
//                             into the scales array, then the codes (eight elements per thread;
//                             INT4 bytes may straddle a scope boundary), then the clips become
//                             steps.
//   dequantize_kernel<Per>    Per = 8 or 32 elements per thread, vectorised when aligned.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "kernels/common/error.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/codec_cuda_lanes.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "kernels/quant/format.h"
#include "kernels/quant/philox.h"

#if defined(__USE_FAST_MATH__)
#error "the CUDA codec must not be built with --use_fast_math: its results must equal the CPU's"
#endif

namespace int4ddp::quant::cuda {
namespace {

constexpr int kThreads = 256;       // threads per CUDA block (8 warps)
constexpr int kWarp = 32;           //
constexpr int kMaxFusedRanks = 64;  // owner messages passed by value to the fused kernel
constexpr unsigned kFullMask = 0xffffffffu;

// Minimum resident blocks per SM asked of ptxas for the fused quantize and owner kernels (a
// register budget: 3 -> 80 registers, 4 -> 64). On an H200, 4 was 4% faster for quantize+pack
// (despite 52 bytes of spills) and 6-7% for the owner step with 4 and 8 ranks than 3
// (experiments/RESULTS.md). Overridable at build time (-DINT4DDP_FUSED_MIN_BLOCKS=N) to compare.
#ifndef INT4DDP_FUSED_MIN_BLOCKS
#define INT4DDP_FUSED_MIN_BLOCKS 4
#endif

// What a kernel needs of QuantParams.
struct KernelQuant {
  int bits;
  Rounding rounding;
  float gamma;
  RngKey key;
  const float* clips;  // per-block clips (device), or null: gamma * absmax
};

KernelQuant kernel_quant(const QuantParams& p) {
  return KernelQuant{p.bits, p.rounding, p.gamma, p.key, p.clips};
}

constexpr float kNoSaturation = __builtin_huge_valf();  // +inf: clamp_levels(x, +inf) = x

// The bound finite values are clamped to before quantizing (codec.h): the clip when the caller
// gave per-block clips, +inf (no clamp) otherwise.
__host__ __device__ __forceinline__ float saturation_of(const KernelQuant& kq, float clip) {
  return kq.clips ? clip : kNoSaturation;
}

// ---- device helpers -----------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Adds a thread's counters to *stats, one atomic per CUDA block and field. Every thread of the
// block must call it (it synchronises). absmax >= 0 and finite: non-negative floats order as their
// bit patterns, so the float max is an unsigned-int max.
__device__ void flush_stats(unsigned long long clipped, unsigned long long nonfinite, float absmax,
                            QuantStats* stats) {
  __shared__ unsigned long long s_clipped[32], s_nonfinite[32];
  __shared__ float s_absmax[32];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  clipped = warp_sum(clipped);
  nonfinite = warp_sum(nonfinite);
  absmax = warp_max(absmax);
  if (lane == 0) {
    s_clipped[warp] = clipped;
    s_nonfinite[warp] = nonfinite;
    s_absmax[warp] = absmax;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = blockDim.x / kWarp;
    for (int w = 1; w < warps; ++w) {
      clipped += s_clipped[w];
      nonfinite += s_nonfinite[w];
      absmax = fmaxf(absmax, s_absmax[w]);
    }
    if (clipped) atomicAdd(reinterpret_cast<unsigned long long*>(&stats->clipped), clipped);
    if (nonfinite) atomicAdd(reinterpret_cast<unsigned long long*>(&stats->nonfinite), nonfinite);
    if (absmax > 0.0f)
      atomicMax(reinterpret_cast<unsigned int*>(&stats->absmax), __float_as_uint(absmax));
  }
}

// One code of a finite or non-finite value (non-finite: 0), exactly as quantize_ref; inv_step is
// the scope's r = inv_step_for_clip(clip, bits), sat its saturation_of().
__device__ __forceinline__ int code_of(float v, float inv_step, float sat, float u,
                                       const KernelQuant& q) {
  if (!is_finite_value(v)) return 0;
  v = clamp_levels(v, sat);
  return q.rounding == Rounding::kNearest ? quantize_nearest(v, inv_step, q.bits)
                                          : quantize_stochastic(v, inv_step, u, q.bits);
}

// The 16-bit uniforms of elements 8g .. 8g + 7 (one Philox call), in element order.
__device__ __forceinline__ void uniforms8(const RngKey& key, uint64_t g, float (&u)[8]) {
  const Philox4 r = philox_block(key, g);
#pragma unroll
  for (int j = 0; j < 8; ++j) u[j] = uniform_from_half(r.v[j / 2], j);
}

__device__ __forceinline__ float load_f32_bytes(const uint8_t* p) {
  const uint32_t b = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                     (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
  return __uint_as_float(b);
}

// Code i of a packed buffer (any alignment).
__device__ __forceinline__ int load_code(const uint8_t* codes, int64_t i, int bits) {
  if (bits != 4) return static_cast<int8_t>(codes[i]);
  const uint8_t b = codes[i / 2];
  return i % 2 == 0 ? unpack_lo(b) : unpack_hi(b);
}

// ---- the fused tile walk (quantize and owner) ------------------------------------------------
// A scope (scale block) of G = 128 V wps elements is covered by wps warps; lane l of warp w holds
// V groups of four consecutive elements, group k at scope_begin + 128 V w + 128 k + 4 l, so each
// load instruction of a warp reads 512 contiguous bytes (16 bytes per lane). A Philox call serves
// eight elements, the groups of lanes 2m and 2m + 1: for V >= 2 the even lane runs the call of its
// group k and the odd lane that of its group k + 1, and the two swap the words the other needs
// (two shuffles per call), so no call is made twice. The index math is codec_cuda_lanes.h (tested
// on the CPU by replaying a warp: tests/test_cuda_lanes.cpp).

struct TileGeometry {
  int64_t scope;        // scale block index of this warp
  int64_t base;         // element index of the lane's group 0
  bool first_in_scope;  // warp 0 of its scope
};

template <int V>
__device__ __forceinline__ TileGeometry tile_geometry(int64_t tile, int wps) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int scopes_per_block = blockDim.x / kWarp / wps;
  const int scope_in_block = warp / wps, warp_in_scope = warp % wps;
  TileGeometry t;
  t.scope = tile * scopes_per_block + scope_in_block;
  t.base = lanes::group_base(t.scope, V, wps, warp_in_scope, lane);
  t.first_in_scope = warp_in_scope == 0 && lane == 0;
  return t;
}

// The scope's absmax from each warp's; every thread of the block calls it (it synchronises when a
// scope spans several warps).
__device__ __forceinline__ float scope_max(float lane_max, int wps) {
  __shared__ float s_max[32];
  float m = warp_max(lane_max);
  if (wps == 1) return m;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) s_max[warp] = m;
  __syncthreads();
  const int first = warp / wps * wps;
  m = 0.0f;
  for (int w = 0; w < wps; ++w) m = fmaxf(m, s_max[first + w]);
  __syncthreads();  // s_max is rewritten by the next tile
  return m;
}

// The 16-bit uniforms of the lane's V groups of four (elements base + 128 k + j). Every lane of the
// warp must call it (it shuffles).
template <int V>
__device__ __forceinline__ void lane_uniforms(const RngKey& key, int64_t base, float (&u)[V][4]) {
  const bool odd = threadIdx.x & 1;  // the lane's half of its 8-element Philox group
  if constexpr (V == 1) {
    // Both lanes of a pair make the call of their shared group; each keeps its two words.
    const lanes::SplitWords w =
        lanes::split_call(philox_block(key, lanes::pair_call_group(base, 0, false)), odd);
    lanes::fill_uniforms(w.keep0, w.keep1, u[0]);
  } else {
    static_assert(V % 2 == 0, "lanes pair their Philox calls over groups k, k + 1");
#pragma unroll
    for (int k = 0; k < V; k += 2) {
      const lanes::SplitWords w =
          lanes::split_call(philox_block(key, lanes::pair_call_group(base, k, odd)), odd);
      const uint32_t recv0 = __shfl_xor_sync(kFullMask, w.send0, 1);
      const uint32_t recv1 = __shfl_xor_sync(kFullMask, w.send1, 1);
      const lanes::PairWords pw = lanes::pair_words(w, recv0, recv1, odd);
      lanes::fill_uniforms(pw.k0, pw.k1, u[k]);
      lanes::fill_uniforms(pw.k10, pw.k11, u[k + 1]);
    }
  }
}

// Codes of the lane's V groups from registers; stores them, counts clipped elements and hands each
// group's codes to epilogue(k, e, q) (the owner step dequantizes them there). Every lane of the
// warp must call it.
struct NoEpilogue {
  __device__ void operator()(int, int64_t, const int (&)[4]) const {}
};

template <int V, typename Epilogue>
__device__ __forceinline__ void encode_groups(const float (&val)[V][4], int64_t base, int64_t count,
                                              float inv_step, float clip, float sat,
                                              const KernelQuant& kq, uint8_t* codes,
                                              unsigned long long& clipped,
                                              const Epilogue& epilogue) {
  float u[V][4] = {};
  if (kq.rounding == Rounding::kStochastic) lane_uniforms<V>(kq.key, base, u);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t e = lanes::group_element(base, k);
    int q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float v = val[k][j];
      q[j] = code_of(v, inv_step, sat, u[k][j], kq);
      // Padding past count is 0.0f: finite and never above clip, so it counts nowhere.
      if (is_finite_value(v) && fabsf(v) > clip) ++clipped;
    }
    if (e >= count) continue;
    epilogue(k, e, q);
    if (kq.bits == 4) {
      const uint8_t b0 = pack_nibbles(q[0], q[1]), b1 = pack_nibbles(q[2], q[3]);
      if (e + 4 <= count) {
        *reinterpret_cast<uint16_t*>(codes + e / 2) =
            static_cast<uint16_t>(b0 | (static_cast<uint16_t>(b1) << 8));
      } else {
        codes[e / 2] = b0;  // padding codes are 0: an odd tail leaves the high nibble 0
        if (e + 2 < count) codes[e / 2 + 1] = b1;
      }
    } else if (e + 4 <= count) {
      const uint32_t w = (static_cast<uint32_t>(q[0]) & 0xFFu) |
                         ((static_cast<uint32_t>(q[1]) & 0xFFu) << 8) |
                         ((static_cast<uint32_t>(q[2]) & 0xFFu) << 16) |
                         ((static_cast<uint32_t>(q[3]) & 0xFFu) << 24);
      *reinterpret_cast<uint32_t*>(codes + e) = w;
    } else {
      for (int j = 0; j < 4 && e + j < count; ++j)
        codes[e + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
    }
  }
}

// quantize, per-block scales, G = 128 V wps. Requires x 16-byte aligned, codes 2-byte (INT4) or
// 4-byte aligned. Called by quantize_async.
template <int V>
__global__ void __launch_bounds__(kThreads, INT4DDP_FUSED_MIN_BLOCKS)
    quantize_fused_kernel(const float* __restrict__ x, int64_t count, KernelQuant kq, int wps,
                          uint8_t* __restrict__ codes, float* __restrict__ scales,
                          QuantStats* stats) {
  const int64_t G = lanes::scope_size(V, wps);
  const int64_t nscopes = (count + G - 1) / G;
  const int scopes_per_block = blockDim.x / kWarp / wps;
  const int64_t ntiles = (nscopes + scopes_per_block - 1) / scopes_per_block;
  unsigned long long clipped = 0, nonfinite = 0;
  float absmax_all = 0.0f;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const TileGeometry t = tile_geometry<V>(tile, wps);
    float val[V][4];
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t e = lanes::group_element(t.base, k);
      if (e + 4 <= count) {
        const float4 f = __ldcs(reinterpret_cast<const float4*>(x + e));
        val[k][0] = f.x, val[k][1] = f.y, val[k][2] = f.z, val[k][3] = f.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) val[k][j] = e + j < count ? x[e + j] : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (is_finite_value(val[k][j]))
          m = fmaxf(m, fabsf(val[k][j]));
        else
          ++nonfinite;
      }
    }
    m = scope_max(m, wps);
    absmax_all = fmaxf(absmax_all, m);
    // Warps past the last scope hold padding only (never stored): clip 0 for them.
    const float clip = kq.clips ? (t.scope < nscopes ? kq.clips[t.scope] : 0.0f) : kq.gamma * m;
    if (t.first_in_scope && t.scope < nscopes) scales[t.scope] = step_for_clip(clip, kq.bits);
    encode_groups<V>(val, t.base, count, inv_step_for_clip(clip, kq.bits), clip,
                     saturation_of(kq, clip), kq, codes, clipped, NoEpilogue{});
  }
  flush_stats(clipped, nonfinite, absmax_all, stats);
}

// The owner step (codec_cuda.h): N messages of the chunk summed in registers, requantized, the
// dequantized copy and the new server error written. kAligned: every message's codes and
// codes_out are 2-byte (INT4) / 4-byte aligned, and es, es_next, out 16-byte aligned.
struct OwnerMessages {
  const uint8_t* codes[kMaxFusedRanks];
  const uint8_t* scales[kMaxFusedRanks];
};

template <int V, bool kAligned>
__global__ void __launch_bounds__(kThreads, INT4DDP_FUSED_MIN_BLOCKS)
    owner_fused_kernel(OwnerMessages msgs, int ranks, int64_t count, KernelQuant kq, int wps,
                       const float* __restrict__ es, float* __restrict__ es_next,
                       uint8_t* __restrict__ codes_out, float* __restrict__ scales_out,
                       float* __restrict__ out, QuantStats* stats) {
  const int64_t G = lanes::scope_size(V, wps);
  const int64_t nscopes = (count + G - 1) / G;
  const int scopes_per_block = blockDim.x / kWarp / wps;
  const int64_t ntiles = (nscopes + scopes_per_block - 1) / scopes_per_block;
  const float fn = static_cast<float>(ranks);
  unsigned long long clipped = 0, nonfinite = 0;
  float absmax_all = 0.0f;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const TileGeometry t = tile_geometry<V>(tile, wps);
    float val[V][4];
#pragma unroll
    for (int k = 0; k < V; ++k)
#pragma unroll
      for (int j = 0; j < 4; ++j) val[k][j] = 0.0f;  // acc = 0, as the CPU's fill
    const int64_t scale_offset = 4 * (t.scope < nscopes ? t.scope : 0);
#pragma unroll 4
    for (int r = 0; r < ranks; ++r) {
      const uint8_t* c = msgs.codes[r];
      const float d = t.scope < nscopes ? load_f32_bytes(msgs.scales[r] + scale_offset) : 0.0f;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t e = lanes::group_element(t.base, k);
        int qc[4] = {0, 0, 0, 0};
        if (kAligned && e + 4 <= count) {
          if (kq.bits == 4) {
            const uint32_t w = *reinterpret_cast<const uint16_t*>(c + e / 2);
#pragma unroll
            for (int j = 0; j < 4; ++j) qc[j] = nibble_to_int(w >> (4 * j));
          } else {
            const uint32_t w = *reinterpret_cast<const uint32_t*>(c + e);
#pragma unroll
            for (int j = 0; j < 4; ++j) qc[j] = static_cast<int8_t>((w >> (8 * j)) & 0xFFu);
          }
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (e + j < count) qc[j] = load_code(c, e + j, kq.bits);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
          val[k][j] = __fadd_rn(val[k][j], __fmul_rn(static_cast<float>(qc[j]), d));
      }
    }
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t e = lanes::group_element(t.base, k);
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (es) {
        if (kAligned && e + 4 <= count) {
          const float4 f = *reinterpret_cast<const float4*>(es + e);
          s[0] = f.x, s[1] = f.y, s[2] = f.z, s[3] = f.w;
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (e + j < count) s[j] = es[e + j];
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // Padding stays 0: 0 / N = 0 and no es is added past count.
        float v = __fdiv_rn(val[k][j], fn);
        if (es) v = __fadd_rn(v, s[j]);
        val[k][j] = v;
        if (is_finite_value(v))
          m = fmaxf(m, fabsf(v));
        else if (e + j < count)
          ++nonfinite;
      }
    }
    m = scope_max(m, wps);
    absmax_all = fmaxf(absmax_all, m);
    const float clip = kq.gamma * m;
    const float step = step_for_clip(clip, kq.bits);
    if (t.first_in_scope && t.scope < nscopes) scales_out[t.scope] = step;
    // The dequantized requantization and the new server error, group by group as codes are made.
    auto epilogue = [&](int k, int64_t e, const int(&q)[4]) {
      float dq[4], en[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dq[j] = dequantize_value(q[j], step);
        en[j] = __fsub_rn(val[k][j], dq[j]);
      }
      if (kAligned && e + 4 <= count) {
        *reinterpret_cast<float4*>(out + e) = make_float4(dq[0], dq[1], dq[2], dq[3]);
        if (es_next)
          *reinterpret_cast<float4*>(es_next + e) = make_float4(en[0], en[1], en[2], en[3]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (e + j >= count) break;
          out[e + j] = dq[j];
          if (es_next) es_next[e + j] = en[j];
        }
      }
    };
    encode_groups<V>(val, t.base, count, inv_step_for_clip(clip, kq.bits), clip, kNoSaturation, kq,
                     codes_out, clipped, epilogue);
  }
  flush_stats(clipped, nonfinite, absmax_all, stats);
}

// ---- the general path --------------------------------------------------------------------

__global__ void init_stats_kernel(QuantStats* stats, int64_t count) {
  stats->clipped = 0;
  stats->count = count;
  stats->nonfinite = 0;
  stats->absmax = 0.0f;
  stats->reserved = 0;
}

// Per-block scales (block_size > 0), general path pass 1: one warp per scope computes absmax, the
// clip c = gamma * absmax (written to scales[scope]; clips_to_steps_kernel turns it into the step
// once encode_kernel has derived r from it) and the scope's clipped and non-finite counts. Called
// by quantize_general.
__global__ void __launch_bounds__(kThreads)
    scope_clips_kernel(const float* __restrict__ x, int64_t count, int64_t G, KernelQuant kq,
                       float* __restrict__ clips, QuantStats* stats) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t nscopes = (count + G - 1) / G;
  unsigned long long clipped = 0, nonfinite = 0;
  float absmax_all = 0.0f;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       s < nscopes; s += warps) {
    const int64_t begin = s * G, end = begin + G < count ? begin + G : count;
    float m = 0.0f;
    for (int64_t i = begin + lane; i < end; i += kWarp) {
      const float v = x[i];
      if (is_finite_value(v))
        m = fmaxf(m, fabsf(v));
      else
        ++nonfinite;
    }
    m = warp_max(m);
    absmax_all = fmaxf(absmax_all, m);
    const float clip = kq.clips ? kq.clips[s] : kq.gamma * m;
    if (lane == 0) clips[s] = clip;
    for (int64_t i = begin + lane; i < end; i += kWarp) {
      const float v = x[i];
      if (is_finite_value(v) && fabsf(v) > clip) ++clipped;
    }
  }
  flush_stats(clipped, nonfinite, absmax_all, stats);
}

// General per-block path, pass 3: scales[s] = step_for_clip(clip of s).
__global__ void __launch_bounds__(kThreads)
    clips_to_steps_kernel(float* scales, int64_t nscopes, int bits) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < nscopes;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x)
    scales[s] = step_for_clip(scales[s], bits);
}

// topk's clip of every block (block_clips_async), one warp per block. The (k+1)-th largest finite
// magnitude is built bit by bit from the top: the largest bit pattern t with
// #{finite |x| : bits(|x|) >= t} >= k + 1. For non-negative floats the integer order of the bit
// patterns is the float order, so t is exactly that magnitude (duplicates counted, as the CPU's
// scan does), and the counts are integers: the result does not depend on any order. 31 counting
// passes re-read the block (from L1).
__global__ void __launch_bounds__(kThreads)
    topk_clips_kernel(const float* __restrict__ x, int64_t count, int64_t G, int k,
                      float* __restrict__ clips) {
  constexpr uint32_t kMaxFiniteBits = 0x7f7fffffu;  // FLT_MAX
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t nscopes = (count + G - 1) / G;
  const unsigned long long need = static_cast<unsigned long long>(k) + 1;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       s < nscopes; s += warps) {
    const int64_t begin = s * G, end = begin + G < count ? begin + G : count;
    unsigned long long finite = 0;
    uint32_t m = 0;
    for (int64_t i = begin + lane; i < end; i += kWarp) {
      const uint32_t b = __float_as_uint(x[i]) & 0x7fffffffu;
      if (b <= kMaxFiniteBits) {
        ++finite;
        m = b > m ? b : m;
      }
    }
    finite = warp_sum(finite);
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const uint32_t other = __shfl_xor_sync(kFullMask, m, o);
      m = other > m ? other : m;
    }
    uint32_t clip = m;  // the block's finite max: the fallback of degenerate blocks
    if (m > 0 && finite >= need) {
      uint32_t t = 0;
      for (int bit = 30; bit >= 0; --bit) {  // finite magnitudes are below 2^31
        const uint32_t cand = t | (1u << bit);
        unsigned long long above = 0;
        for (int64_t i = begin + lane; i < end; i += kWarp) {
          const uint32_t b = __float_as_uint(x[i]) & 0x7fffffffu;
          above += b <= kMaxFiniteBits && b >= cand;
        }
        if (warp_sum(above) >= need) t = cand;  // the same total on every lane
      }
      if (t > 0) clip = t;
    }
    if (lane == 0) clips[s] = __uint_as_float(clip);
  }
}

// mse's clip of every block (block_clips_async): quant::block_clip with PolicyKind::kMse, i.e.
// quant::mse_gamma's OCTAV iteration on the block, one thread per block running the CPU's loops
// with the same double operations in the same order (IEEE, no contraction: cmake/cuda.cmake), so
// the sums and the clip are the CPU's bit for bit. 4^-b is exact either way (ldexp on both sides).
__global__ void __launch_bounds__(kThreads)
    mse_clips_kernel(const float* __restrict__ x, int64_t count, int64_t G, int bits,
                     int iterations, float* __restrict__ clips) {
  const int64_t nscopes = (count + G - 1) / G;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < nscopes;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = s * G, end = begin + G < count ? begin + G : count;
    float absmax = 0.0f;
    int64_t finite = 0;
    double sum_abs = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      const float v = x[i];
      if (!is_finite_value(v)) continue;
      absmax = fmaxf(absmax, fabsf(v));
      ++finite;
      sum_abs += fabs(static_cast<double>(v));
    }
    float clip = absmax;  // no finite non-zero element: the block's max (gamma 1)
    if (absmax > 0.0f) {
      const double noise = ldexp(1.0, -2 * bits) / 3.0;
      const double nf = static_cast<double>(finite);
      double c = sum_abs / nf;
      for (int k = 0; k < iterations; ++k) {
        double sum_above = 0.0;
        int64_t above = 0;
        for (int64_t i = begin; i < end; ++i) {
          const float v = x[i];
          if (!is_finite_value(v)) continue;
          const double a = fabs(static_cast<double>(v));
          if (a > c) {
            sum_above += a;
            ++above;
          }
        }
        if (above == 0) break;
        const double next = (sum_above / nf) / (noise * static_cast<double>(finite - above) / nf +
                                                static_cast<double>(above) / nf);
        const bool converged = fabs(next - c) <= kMseRelativeTolerance * c;
        c = next;
        if (converged) break;
      }
      float g = static_cast<float>(c / static_cast<double>(absmax));
      g = g < kMinGamma ? kMinGamma : (g > kMaxGamma ? kMaxGamma : g);
      if (g < kMaxGamma) clip = g * absmax;
    }
    clips[s] = clip;
  }
}

// Loads elements e .. e + 7 (past count: 0.0f, finite and never clipped). kVec: x 16-byte aligned.
template <bool kVec>
__device__ __forceinline__ void load8(const float* __restrict__ x, int64_t e, int64_t count,
                                      float (&v)[8]) {
  if (kVec && e + 8 <= count) {
    const float4 a = __ldcs(reinterpret_cast<const float4*>(x + e));
    const float4 b = __ldcs(reinterpret_cast<const float4*>(x + e) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = e + j < count ? x[e + j] : 0.0f;
  }
}

// Per-tensor scale, pass 1: absmax and non-finite count of the whole tensor into *stats (absmax by
// an integer atomicMax on the bit pattern: a max is exact in any order). kVec: x 16-byte aligned;
// each thread keeps two 8-element loads in flight.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    tensor_absmax_kernel(const float* __restrict__ x, int64_t count, QuantStats* stats) {
  unsigned long long nonfinite = 0;
  float m = 0.0f;
  const int64_t ngroups = (count + 7) / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < ngroups;
       g += 2 * stride) {
    float v[2][8];
    load8<kVec>(x, 8 * g, count, v[0]);
    load8<kVec>(x, 8 * (g + stride), g + stride < ngroups ? count : 0, v[1]);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (is_finite_value(v[h][j]))
          m = fmaxf(m, fabsf(v[h][j]));
        else
          ++nonfinite;
      }
  }
  flush_stats(0, nonfinite, m, stats);
}

// Codes, eight elements (one Philox call) per thread; INT4 bytes may hold two scopes. per_tensor:
// the clip comes from stats->absmax (pass 1), scales[0] gets the step here, and clipped elements
// are counted here; otherwise scales holds each scope's clip (scope_clips_kernel counted already)
// and r is derived from it once per scope change. kVec: x 16-byte aligned and codes 4-byte (INT4)
// or 8-byte aligned.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    encode_kernel(const float* __restrict__ x, int64_t count, int64_t G, KernelQuant kq,
                  bool per_tensor, uint8_t* __restrict__ codes, const float* __restrict__ clips,
                  float* __restrict__ tensor_scale, QuantStats* stats) {
  float tensor_clip = 0.0f, tensor_inv = 0.0f;
  if (per_tensor) {
    tensor_clip = kq.gamma * stats->absmax;
    tensor_inv = inv_step_for_clip(tensor_clip, kq.bits);
    if (blockIdx.x == 0 && threadIdx.x == 0) *tensor_scale = step_for_clip(tensor_clip, kq.bits);
  }
  const int64_t ngroups = (count + 7) / 8;
  unsigned long long clipped = 0;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 8 * g;
    float v[8], u[8] = {};
    load8<kVec>(x, e, count, v);
    if (kq.rounding == Rounding::kStochastic) uniforms8(kq.key, static_cast<uint64_t>(g), u);
    int q[8];
    int64_t scope = -1;
    float inv = tensor_inv, sat = kNoSaturation;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (!per_tensor && e + j < count && (e + j) / G != scope) {
        scope = (e + j) / G;
        inv = inv_step_for_clip(clips[scope], kq.bits);
        sat = saturation_of(kq, clips[scope]);
      }
      q[j] = code_of(v[j], inv, sat, u[j], kq);
      if (per_tensor && is_finite_value(v[j]) && fabsf(v[j]) > tensor_clip) ++clipped;
    }
    if (kVec && e + 8 <= count) {
      if (kq.bits == 4) {
        uint32_t w = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) w |= static_cast<uint32_t>(q[j] & 0xF) << (4 * j);
        *reinterpret_cast<uint32_t*>(codes + e / 2) = w;
      } else {
        uint2 w{0u, 0u};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w.x |= (static_cast<uint32_t>(q[j]) & 0xFFu) << (8 * j);
          w.y |= (static_cast<uint32_t>(q[4 + j]) & 0xFFu) << (8 * j);
        }
        *reinterpret_cast<uint2*>(codes + e) = w;
      }
    } else if (kq.bits == 4) {
      // Past count the codes are 0, so an odd tail leaves the last high nibble 0.
      for (int k = 0; k < 4 && e + 2 * k < count; ++k)
        codes[e / 2 + k] = pack_nibbles(q[2 * k], e + 2 * k + 1 < count ? q[2 * k + 1] : 0);
    } else {
      for (int j = 0; j < 8 && e + j < count; ++j)
        codes[e + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
    }
  }
  flush_stats(clipped, 0, 0.0f, stats);
}

// out[i] = code_i * scale; kPer elements per thread (8 or 32), in sub-groups of eight that share a
// scale. kVec: G % 8 == 0 (or per tensor), out 16-byte aligned and the codes of kPer elements
// aligned to their size (INT4: kPer / 2 bytes, INT8: kPer bytes), so they load in 4-, 8- or 16-byte
// words.
template <int kPer, bool kVec>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                      int64_t count, int bits, int64_t scope, float* __restrict__ out) {
  static_assert(kPer == 8 || kPer == 32, "8 or 32 elements per thread");
  const int64_t ngroups = (count + kPer - 1) / kPer;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = int64_t{kPer} * g;
    if (kVec && e0 + kPer <= count) {
      // kPer / 8 words of eight codes each: INT4 32-bit words, INT8 pairs of 32-bit words.
      uint32_t w[kPer / 4];
      if (bits == 4) {
        if constexpr (kPer == 32) {
          const uint4 v = __ldcs(reinterpret_cast<const uint4*>(codes + e0 / 2));
          w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
        } else {
          w[0] = __ldcs(reinterpret_cast<const unsigned int*>(codes + e0 / 2));
        }
      } else {
        if constexpr (kPer == 32) {
          const uint4 a = __ldcs(reinterpret_cast<const uint4*>(codes + e0));
          const uint4 b = __ldcs(reinterpret_cast<const uint4*>(codes + e0) + 1);
          w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z,
          w[7] = b.w;
        } else {
          const uint2 a = __ldcs(reinterpret_cast<const uint2*>(codes + e0));
          w[0] = a.x, w[1] = a.y;
        }
      }
#pragma unroll
      for (int s = 0; s < kPer / 8; ++s) {
        const int64_t e = e0 + 8 * s;
        const float d = scales[e / scope];
        int q[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
          q[j] = bits == 4 ? nibble_to_int(w[s] >> (4 * j))
                           : static_cast<int8_t>((w[2 * s + j / 4] >> (8 * (j % 4))) & 0xFFu);
        float4* o = reinterpret_cast<float4*>(out + e);
        __stcs(o, make_float4(dequantize_value(q[0], d), dequantize_value(q[1], d),
                              dequantize_value(q[2], d), dequantize_value(q[3], d)));
        __stcs(o + 1, make_float4(dequantize_value(q[4], d), dequantize_value(q[5], d),
                                  dequantize_value(q[6], d), dequantize_value(q[7], d)));
      }
    } else {
      for (int64_t i = e0; i < e0 + kPer && i < count; ++i)
        out[i] = dequantize_value(load_code(codes, i, bits), scales[i / scope]);
    }
  }
}

// Owner step, general path, pass r: m[i] (+)= code_r(i) * scale_r(i / G); r == 0 starts from 0.0f
// exactly as the CPU's zero-filled accumulator.
__global__ void __launch_bounds__(kThreads)
    owner_accumulate_kernel(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                            int64_t count, int64_t G, int bits, bool first, float* __restrict__ m) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float dq = __fmul_rn(static_cast<float>(load_code(codes, i, bits)),
                               load_f32_bytes(scales + 4 * (i / G)));
    m[i] = __fadd_rn(first ? 0.0f : m[i], dq);
  }
}

// Owner step, general path: m = m / N (+ es).
__global__ void __launch_bounds__(kThreads)
    owner_mean_kernel(float* __restrict__ m, int64_t count, float fn,
                      const float* __restrict__ es) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = __fdiv_rn(m[i], fn);
    if (es) v = __fadd_rn(v, es[i]);
    m[i] = v;
  }
}

// Owner step, general path, last pass: out = Q(m) dequantized; es_next = m - out. m aliases
// es_next, or out when there is no es_next (then only out is written).
__global__ void __launch_bounds__(kThreads)
    owner_epilogue_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                          int64_t count, int64_t G, int bits, const float* m, float* out,
                          float* es_next) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float dq = dequantize_value(load_code(codes, i, bits), scales[i / G]);
    if (es_next) es_next[i] = __fsub_rn(m[i], dq);
    out[i] = dq;
  }
}

__global__ void __launch_bounds__(kThreads)
    binary_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                  int64_t count, bool subtract) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = subtract ? __fsub_rn(a[i], b[i]) : __fadd_rn(a[i], b[i]);
}

__global__ void __launch_bounds__(kThreads) div_kernel(float* x, int64_t count, float divisor) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = __fdiv_rn(x[i], divisor);
}

__device__ int64_t load_i64_bytes(const uint8_t* p) {
  uint64_t v = 0;
  for (int b = 7; b >= 0; --b) v = (v << 8) | p[b];
  return static_cast<int64_t>(v);
}

__device__ void store_bytes(uint8_t* dst, uint64_t v, int n) {
  for (int b = 0; b < n; ++b) dst[b] = static_cast<uint8_t>(v >> (8 * b));
}

__global__ void sum_trailers_kernel(const uint8_t* first, size_t stride, int n,
                                    const QuantStats* own, uint8_t* dst) {
  int64_t clipped = 0, cnt = 0, nonfinite = 0;
  float absmax = 0.0f;
  for (int i = 0; i < n; ++i) {
    const uint8_t* t = first + static_cast<size_t>(i) * stride;
    clipped += load_i64_bytes(t + offsetof(QuantStats, clipped));
    cnt += load_i64_bytes(t + offsetof(QuantStats, count));
    nonfinite += load_i64_bytes(t + offsetof(QuantStats, nonfinite));
    absmax = fmaxf(absmax, load_f32_bytes(t + offsetof(QuantStats, absmax)));
  }
  clipped += own->clipped;
  cnt += own->count;
  nonfinite += own->nonfinite;
  absmax = fmaxf(absmax, own->absmax);
  store_bytes(dst + offsetof(QuantStats, clipped), static_cast<uint64_t>(clipped), 8);
  store_bytes(dst + offsetof(QuantStats, count), static_cast<uint64_t>(cnt), 8);
  store_bytes(dst + offsetof(QuantStats, nonfinite), static_cast<uint64_t>(nonfinite), 8);
  store_bytes(dst + offsetof(QuantStats, absmax), __float_as_uint(absmax), 4);
  store_bytes(dst + offsetof(QuantStats, reserved), 0, 4);
}

// ---- host side ----------------------------------------------------------------------------

// Block shapes of the fused kernels: G -> (float4 groups per lane V, warps per scope). One table:
// a G not in it takes the general path.
struct FusedShape {
  int64_t block_size;
  int v, warps_per_scope;
};
// At most 8 warps per scope, so a scope fits one CUDA block of kThreads.
constexpr FusedShape kFusedShapes[] = {{128, 1, 1},  {256, 2, 1},  {512, 4, 1},
                                       {1024, 4, 2}, {2048, 4, 4}, {4096, 4, 8}};

// Every shape: G = 128 V wps (the kernels' walk), V = 1 or even (paired Philox calls), a scope's
// warps inside one CUDA block.
constexpr bool fused_shapes_consistent() {
  for (const FusedShape& s : kFusedShapes)
    if (s.block_size != lanes::scope_size(s.v, s.warps_per_scope) || (s.v != 1 && s.v % 2 != 0) ||
        s.warps_per_scope < 1 || kThreads / kWarp % s.warps_per_scope != 0)
      return false;
  return true;
}
static_assert(fused_shapes_consistent(), "kFusedShapes: G must be 128 V wps with wps | 8");

const FusedShape* fused_shape(int64_t block_size) {
  for (const FusedShape& s : kFusedShapes)
    if (s.block_size == block_size) return &s;
  return nullptr;
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Whether the n floats at a and at b share an element.
bool overlap(const float* a, const float* b, int64_t n) {
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  const uintptr_t bytes = static_cast<uintptr_t>(n) * sizeof(float);
  return n > 0 && pa < pb + bytes && pb < pa + bytes;
}

int sm_count() {
  int dev = 0, n = 0;
  INT4DDP_CUDA_CHECK(cudaGetDevice(&dev));
  INT4DDP_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// Grid of a grid-stride kernel: enough blocks to fill the device, at most `work` blocks.
unsigned grid_for(int64_t work, int threads) {
  const int64_t resident = static_cast<int64_t>(sm_count()) * (2048 / threads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(work, resident)));
}

// As grid_for, for a kernel whose registers allow fewer than 2048 / threads blocks per SM (the
// fused quantize and owner kernels fit 3 of 256 threads): one full wave of resident blocks, so
// the grid-stride loop has no partial last wave (ncu on an H200 estimated up to 33% lost to it).
template <typename Kernel>
unsigned grid_for_kernel(Kernel kernel, int64_t work, int threads) {
  int per_sm = 0;
  INT4DDP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int64_t resident = static_cast<int64_t>(sm_count()) * std::max(per_sm, 1);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(work, resident)));
}

unsigned elementwise_grid(int64_t count) {
  return grid_for((count + kThreads - 1) / kThreads, kThreads);
}

void check_launch() { INT4DDP_CUDA_CHECK(cudaGetLastError()); }

void check_stats_ptr(const QuantStats* stats, const char* what) {
  INT4DDP_CHECK(stats != nullptr, what, ": stats must point to device memory");
  INT4DDP_CHECK(aligned(stats, alignof(QuantStats)), what, ": stats is misaligned");
}

template <int V>
void launch_quantize_fused(const FusedShape& s, const float* x, int64_t count,
                           const KernelQuant& kq, uint8_t* codes, float* scales, QuantStats* stats,
                           cudaStream_t stream) {
  const int threads = kThreads;
  const int scopes_per_block = threads / kWarp / s.warps_per_scope;
  const int64_t tiles = (num_scales(count, s.block_size) + scopes_per_block - 1) / scopes_per_block;
  quantize_fused_kernel<V>
      <<<grid_for_kernel(quantize_fused_kernel<V>, tiles, threads), threads, 0, stream>>>(
          x, count, kq, s.warps_per_scope, codes, scales, stats);
  check_launch();
}

template <int V, bool kAligned>
void launch_owner_fused(const FusedShape& s, const OwnerMessages& msgs, const OwnerStepArgs& a,
                        const KernelQuant& kq, cudaStream_t stream) {
  const int threads = kThreads;
  const int scopes_per_block = threads / kWarp / s.warps_per_scope;
  const int64_t tiles =
      (num_scales(a.count, s.block_size) + scopes_per_block - 1) / scopes_per_block;
  owner_fused_kernel<V, kAligned>
      <<<grid_for_kernel(owner_fused_kernel<V, kAligned>, tiles, threads), threads, 0, stream>>>(
          msgs, a.ranks, a.count, kq, s.warps_per_scope, a.es, a.es_next, a.codes_out, a.scales_out,
          a.out, a.stats);
  check_launch();
}

template <bool kAligned>
void dispatch_owner_fused(const FusedShape& s, const OwnerMessages& msgs, const OwnerStepArgs& a,
                          const KernelQuant& kq, cudaStream_t stream) {
  switch (s.v) {
    case 1:
      return launch_owner_fused<1, kAligned>(s, msgs, a, kq, stream);
    case 2:
      return launch_owner_fused<2, kAligned>(s, msgs, a, kq, stream);
    case 4:
      return launch_owner_fused<4, kAligned>(s, msgs, a, kq, stream);
  }
  INT4DDP_FAIL("owner step: no fused kernel for V = ", s.v);
}

// The per-tensor path (two passes) and the general per-block path (three passes: clips, codes,
// steps), any block size and alignment.
void quantize_general(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                      float* scales, QuantStats* stats, cudaStream_t stream) {
  const KernelQuant kq = kernel_quant(p);
  const bool per_tensor = p.block_size == 0;
  const bool vec = aligned(x, 16) && aligned(codes, p.bits == 4 ? 4 : 8);
  const int64_t groups = (count + 7) / 8;
  if (per_tensor) {
    const int64_t work = (groups + 2 * kThreads - 1) / (2 * kThreads);
    if (aligned(x, 16))
      tensor_absmax_kernel<true>
          <<<grid_for_kernel(tensor_absmax_kernel<true>, work, kThreads), kThreads, 0, stream>>>(
              x, count, stats);
    else
      tensor_absmax_kernel<false>
          <<<grid_for_kernel(tensor_absmax_kernel<false>, work, kThreads), kThreads, 0, stream>>>(
              x, count, stats);
  } else {
    const int64_t warps_needed = num_scales(count, p.block_size);
    scope_clips_kernel<<<grid_for((warps_needed + 7) / 8, kThreads), kThreads, 0, stream>>>(
        x, count, p.block_size, kq, scales, stats);
  }
  check_launch();
  const int64_t G = per_tensor ? count : p.block_size;
  const int64_t work = (groups + kThreads - 1) / kThreads;
  // scales is either the clips encode_kernel reads (per block) or the step it writes (per tensor),
  // never both: the other pointer is null, so its __restrict__ parameters never alias.
  const float* clips = per_tensor ? nullptr : scales;
  float* tensor_scale = per_tensor ? scales : nullptr;
  if (vec)
    encode_kernel<true>
        <<<grid_for_kernel(encode_kernel<true>, work, kThreads), kThreads, 0, stream>>>(
            x, count, G, kq, per_tensor, codes, clips, tensor_scale, stats);
  else
    encode_kernel<false>
        <<<grid_for_kernel(encode_kernel<false>, work, kThreads), kThreads, 0, stream>>>(
            x, count, G, kq, per_tensor, codes, clips, tensor_scale, stats);
  check_launch();
  if (!per_tensor) {
    const int64_t nscopes = num_scales(count, p.block_size);
    clips_to_steps_kernel<<<grid_for((nscopes + kThreads - 1) / kThreads, kThreads), kThreads, 0,
                            stream>>>(scales, nscopes, p.bits);
    check_launch();
  }
}

template <int kPer, bool kVec>
void launch_dequantize(const uint8_t* codes, const float* scales, int64_t count, int bits,
                       int64_t scope, float* out, cudaStream_t stream) {
  const int64_t work = ((count + kPer - 1) / kPer + kThreads - 1) / kThreads;
  dequantize_kernel<kPer, kVec>
      <<<grid_for_kernel(dequantize_kernel<kPer, kVec>, work, kThreads), kThreads, 0, stream>>>(
          codes, scales, count, bits, scope, out);
  check_launch();
}

}  // namespace

bool device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error state this probe left
    return false;
  }
  return n > 0;
}

void quantize_async(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                    float* scales, QuantStats* stats, cudaStream_t stream) {
  validate(p);
  INT4DDP_CHECK(p.index_offset == 0, "cuda quantize: index_offset = ", p.index_offset,
                " is not supported by the CUDA codec (quantize the whole tensor in one call)");
  INT4DDP_CHECK(count >= 0, "cuda quantize: count = ", count, " is negative");
  INT4DDP_CHECK(count == 0 || (x && codes && scales), "cuda quantize: null buffer for ", count,
                " elements");
  INT4DDP_CHECK(!scales || aligned(scales, alignof(float)), "cuda quantize: scales misaligned");
  check_stats_ptr(stats, "cuda quantize");
  // The fused kernel writes a scope's step while other warps of that scope may still read its clip.
  const int64_t nscales = num_scales(count, p.block_size);
  INT4DDP_CHECK(p.clips == nullptr || !overlap(p.clips, scales, nscales),
                "cuda quantize: clips and scales overlap (give the clips their own buffer)");
  init_stats_kernel<<<1, 1, 0, stream>>>(stats, count);
  check_launch();
  if (count == 0) {
    // quantize_ref writes the one per-tensor scale of an empty tensor: 0.
    if (p.block_size == 0 && scales)
      INT4DDP_CUDA_CHECK(cudaMemsetAsync(scales, 0, sizeof(float), stream));
    return;
  }
  const FusedShape* s = fused_shape(p.block_size);
  if (s && aligned(x, 16) && aligned(codes, p.bits == 4 ? 2 : 4)) {
    const KernelQuant kq = kernel_quant(p);
    switch (s->v) {
      case 1:
        return launch_quantize_fused<1>(*s, x, count, kq, codes, scales, stats, stream);
      case 2:
        return launch_quantize_fused<2>(*s, x, count, kq, codes, scales, stats, stream);
      case 4:
        return launch_quantize_fused<4>(*s, x, count, kq, codes, scales, stats, stream);
    }
  }
  quantize_general(x, count, p, codes, scales, stats, stream);
}

void dequantize_async(const uint8_t* codes, const float* scales, int64_t count, int bits,
                      int64_t block_size, float* out, cudaStream_t stream) {
  INT4DDP_CHECK(valid_bits(bits), "cuda dequantize: bits = ", bits, " is outside ", kMinBits, "..",
                kMaxBits);
  INT4DDP_CHECK(block_size >= 0, "cuda dequantize: block_size = ", block_size, " is negative");
  INT4DDP_CHECK(count >= 0, "cuda dequantize: count = ", count, " is negative");
  INT4DDP_CHECK(count == 0 || (out && codes && scales), "cuda dequantize: null buffer for ", count,
                " elements");
  if (count == 0) return;
  INT4DDP_CHECK(aligned(scales, alignof(float)) && aligned(out, alignof(float)),
                "cuda dequantize: scales and out must be float-aligned");
  const int64_t scope = block_size == 0 ? count : block_size;
  const bool vec = (block_size == 0 || block_size % 8 == 0) && aligned(out, 16);
  // 32 elements per thread (16-byte code loads) when the codes allow it, else 8.
  if (vec && aligned(codes, 16))
    return launch_dequantize<32, true>(codes, scales, count, bits, scope, out, stream);
  if (vec && aligned(codes, bits == 4 ? 4 : 8))
    return launch_dequantize<8, true>(codes, scales, count, bits, scope, out, stream);
  launch_dequantize<8, false>(codes, scales, count, bits, scope, out, stream);
}

QuantStats quantize(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                    float* scales, cudaStream_t stream) {
  QuantStats* d_stats = nullptr;
  INT4DDP_CUDA_CHECK(cudaMalloc(&d_stats, sizeof(QuantStats)));
  QuantStats h;
  try {
    quantize_async(x, count, p, codes, scales, d_stats, stream);
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(&h, d_stats, sizeof(h), cudaMemcpyDeviceToHost, stream));
    INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (...) {
    cudaFree(d_stats);
    throw;
  }
  INT4DDP_CUDA_CHECK(cudaFree(d_stats));
  return h;
}

void dequantize(const uint8_t* codes, const float* scales, int64_t count, int bits,
                int64_t block_size, float* out, cudaStream_t stream) {
  dequantize_async(codes, scales, count, bits, block_size, out, stream);
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void owner_step_async(const OwnerStepArgs& a, cudaStream_t stream) {
  const QuantParams& p = a.params;
  validate(p);
  INT4DDP_CHECK(p.index_offset == 0, "owner step: index_offset is not supported on CUDA");
  INT4DDP_CHECK(p.block_size > 0, "owner step: block_size must be > 0 (per-block scales)");
  INT4DDP_CHECK(a.ranks >= 1, "owner step: ranks = ", a.ranks, " must be >= 1");
  INT4DDP_CHECK(a.count >= 0, "owner step: count = ", a.count, " is negative");
  INT4DDP_CHECK((a.es == nullptr) == (a.es_next == nullptr),
                "owner step: es and es_next go together");
  INT4DDP_CHECK(a.es == nullptr || a.es != a.es_next, "owner step: es_next must not alias es");
  check_stats_ptr(a.stats, "owner step");
  INT4DDP_CHECK(a.count == 0 || (a.codes && a.scales && a.codes_out && a.scales_out && a.out),
                "owner step: null buffer for ", a.count, " elements");
  INT4DDP_CHECK(!a.scales_out || aligned(a.scales_out, alignof(float)),
                "owner step: scales_out misaligned");
  for (int r = 0; a.count > 0 && r < a.ranks; ++r)
    INT4DDP_CHECK(a.codes[r] && a.scales[r], "owner step: null message of rank ", r);

  INT4DDP_CHECK(p.clips == nullptr,
                "owner step: params.clips must be null (the owner's clips come from m)");
  const bool block_rule =
      a.block_rule.kind == PolicyKind::kTopK || a.block_rule.kind == PolicyKind::kMse;
  INT4DDP_CHECK(!block_rule || a.count == 0 || (a.clips && aligned(a.clips, alignof(float))),
                "owner step: a block rule needs a float-aligned clips scratch");

  const FusedShape* s = fused_shape(p.block_size);
  const size_t code_align = p.bits == 4 ? 2 : 4;
  // The fused kernel derives each clip from the block's max; a block rule takes the general path.
  if (a.count > 0 && s && a.ranks <= kMaxFusedRanks && !block_rule) {
    OwnerMessages msgs{};
    bool codes_aligned = aligned(a.codes_out, code_align);
    for (int r = 0; r < a.ranks; ++r) {
      msgs.codes[r] = a.codes[r];
      msgs.scales[r] = a.scales[r];
      codes_aligned = codes_aligned && aligned(a.codes[r], code_align);
    }
    const bool floats_aligned =
        aligned(a.out, 16) && (!a.es || (aligned(a.es, 16) && aligned(a.es_next, 16)));
    // encode_groups stores codes_out with vector stores: only the aligned variant may run when
    // codes_out is aligned, and the unaligned one needs codes_out aligned too; otherwise general.
    if (aligned(a.codes_out, code_align)) {
      init_stats_kernel<<<1, 1, 0, stream>>>(a.stats, a.count);
      check_launch();
      const KernelQuant kq = kernel_quant(p);
      if (codes_aligned && floats_aligned)
        return dispatch_owner_fused<true>(*s, msgs, a, kq, stream);
      return dispatch_owner_fused<false>(*s, msgs, a, kq, stream);
    }
  }

  // General path: accumulate rank by rank into m (es_next, or out), then the codec, then the
  // epilogue. Same operations, in the same order, as the fused kernel and the CPU.
  if (a.count == 0) {
    init_stats_kernel<<<1, 1, 0, stream>>>(a.stats, 0);
    check_launch();
    return;
  }
  float* m = a.es_next ? a.es_next : a.out;
  const unsigned grid = elementwise_grid(a.count);
  for (int r = 0; r < a.ranks; ++r) {
    owner_accumulate_kernel<<<grid, kThreads, 0, stream>>>(a.codes[r], a.scales[r], a.count,
                                                           p.block_size, p.bits, r == 0, m);
    check_launch();
  }
  owner_mean_kernel<<<grid, kThreads, 0, stream>>>(m, a.count, static_cast<float>(a.ranks), a.es);
  check_launch();
  QuantParams q = p;
  if (block_rule) {
    block_clips_async(m, a.count, p.block_size, a.block_rule, a.clips, stream);
    q.clips = a.clips;
  }
  quantize_async(m, a.count, q, a.codes_out, a.scales_out, a.stats, stream);
  owner_epilogue_kernel<<<grid, kThreads, 0, stream>>>(a.codes_out, a.scales_out, a.count,
                                                       p.block_size, p.bits, m, a.out, a.es_next);
  check_launch();
}

void block_clips_async(const float* x, int64_t count, int64_t block_size, const PolicyConfig& rule,
                       float* clips, cudaStream_t stream) {
  INT4DDP_CHECK(rule.kind == PolicyKind::kTopK || rule.kind == PolicyKind::kMse,
                "block clips: policy ", policy_kind_name(rule.kind), " has no per-block rule");
  rule.validate();
  INT4DDP_CHECK(block_size > 0, "block clips: block_size = ", block_size, " must be > 0");
  INT4DDP_CHECK(count >= 0, "block clips: count = ", count, " is negative");
  if (count == 0) return;
  INT4DDP_CHECK(x && clips && aligned(clips, alignof(float)),
                "block clips: null or misaligned buffer for ", count, " elements");
  const int64_t nscopes = num_scales(count, block_size);
  if (rule.kind == PolicyKind::kTopK) {
    const int64_t warps_per_block = kThreads / kWarp;
    topk_clips_kernel<<<grid_for((nscopes + warps_per_block - 1) / warps_per_block, kThreads),
                        kThreads, 0, stream>>>(x, count, block_size, rule.topk, clips);
  } else {
    mse_clips_kernel<<<grid_for((nscopes + kThreads - 1) / kThreads, kThreads), kThreads, 0,
                       stream>>>(x, count, block_size, rule.bits, rule.mse_iterations, clips);
  }
  check_launch();
}

void add_async(const float* a, const float* b, float* out, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  binary_kernel<<<elementwise_grid(count), kThreads, 0, stream>>>(a, b, out, count, false);
  check_launch();
}

void sub_async(const float* a, const float* b, float* out, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  binary_kernel<<<elementwise_grid(count), kThreads, 0, stream>>>(a, b, out, count, true);
  check_launch();
}

void div_async(float* x, int64_t count, float divisor, cudaStream_t stream) {
  if (count <= 0) return;
  div_kernel<<<elementwise_grid(count), kThreads, 0, stream>>>(x, count, divisor);
  check_launch();
}

void sum_trailers_async(const uint8_t* first, size_t stride, int n, const QuantStats* own,
                        uint8_t* dst, cudaStream_t stream) {
  INT4DDP_CHECK(n >= 0 && own && dst && (n == 0 || first), "sum_trailers: bad arguments");
  sum_trailers_kernel<<<1, 1, 0, stream>>>(first, stride, n, own, dst);
  check_launch();
}

}  // namespace int4ddp::quant::cuda
