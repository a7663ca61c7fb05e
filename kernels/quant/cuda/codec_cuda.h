// The CUDA codec: device versions of quant::quantize / quant::dequantize (kernels/quant/codec.h)
// and the fused owner step of the two-shot all-reduce (comm/two_shot.h, step 5).
//
// Contract: for the same inputs, parameters and keys, every function here produces the same codes,
// packed bytes, scales, stats and floats as the CPU reference (quantize_ref / dequantize_ref and
// the CPU two-shot composition), bit for bit. The arithmetic is the scalar helpers of format.h
// and philox.h compiled by nvcc with -fmad=false -prec-div=true -ftz=false (cmake/cuda.cmake),
// matching the CPU build's -ffp-contract=off; the owner step spells its sums with __fadd_rn /
// __fmul_rn / __fdiv_rn so no flag can change them.
//
// Every pointer argument is device memory (cudaMalloc, or managed) unless it says otherwise. The
// *_async functions enqueue on `stream` and return at once; their stats land in device memory.
// The plain wrappers wait for the stream and return host values. Bad arguments throw
// int4ddp::Error before anything is enqueued; a failed CUDA call throws Error naming it
// (cuda_check.h).
//
// Speed: per-block scales with a power-of-two block size 128..4096 (the communication default
// G = 512) and aligned buffers take one fused pass that reads x once. Other block sizes, the
// per-tensor scale (block_size 0: a device-wide absmax first) and misaligned buffers take a
// general path with the same results.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/quant/codec.h"
#include "kernels/quant/policy.h"

namespace int4ddp::quant::cuda {

// True when the CUDA runtime sees at least one device (never throws: false without a driver).
bool device_available();

// quantize: x (count floats) -> codes (packed_bytes(bits, count) bytes, any alignment), scales
// (num_scales(count, block_size) floats), *stats (device memory, reset by this call). Philox
// element indices count from x[0], exactly as quant::quantize. p.clips, when set, is a DEVICE
// array of the per-block clips (codec.h; their values are not checked here: they come from
// block_clips_async or a copy of quant::block_clips), in a buffer of its own: clips overlapping
// scales throw Error (the CPU codec allows clips == scales; the fused kernel would race).
void quantize_async(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                    float* scales, QuantStats* stats, cudaStream_t stream);

// dequantize: out[i] = code_i * scales[scope of i] (out: count floats).
void dequantize_async(const uint8_t* codes, const float* scales, int64_t count, int bits,
                      int64_t block_size, float* out, cudaStream_t stream);

// Synchronous wrappers (device buffers, host stats).
QuantStats quantize(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                    float* scales, cudaStream_t stream = nullptr);
void dequantize(const uint8_t* codes, const float* scales, int64_t count, int bits,
                int64_t block_size, float* out, cudaStream_t stream = nullptr);

// The device twin of quant::block_clips (policy.h), bit for bit: the clip of every block of
// block_size elements from x[0] (the last one shorter) by the block rule rule.kind into clips
// (num_scales(count, block_size) floats).
//   topk  the (k+1)-th largest finite |x| (k = rule.topk), or the block's finite max|x| when it has
//         fewer than k + 1 finite elements or that magnitude is 0: one warp per block, integer
//         counts only, so no order matters.
//   mse   OCTAV per block (quant::mse_gamma with rule.bits, rule.mse_iterations): one thread per
//         block runs the CPU's double-precision loops in the CPU's order (plain, not fast).
// Any other kind throws Error.
void block_clips_async(const float* x, int64_t count, int64_t block_size, const PolicyConfig& rule,
                       float* clips, cudaStream_t stream);

// --- the owner step of the two-shot all-reduce ------------------------------------------------
// For one chunk of `count` elements received from `ranks` = N ranks as N messages (codes with
// per-block scales, block size params.block_size > 0), computes in one pass, per element i:
//   acc = 0; for r = 0..N-1: acc += codes_r[i] * scales_r[i / G]     (fp32, rank order)
//   m = acc / N;  if es: m += es[i]
//   requantize m with `params` (per-block scales, Philox index i relative to the chunk)
//   out[i] = Q(m)[i]  (the dequantized requantization);  if es_next: es_next[i] = m - out[i]
// which is exactly the CPU composition in comm/two_shot.cpp (dequantize, +=, /=, +=, quantize,
// dequantize, -). Message pointers are device byte pointers of any alignment (the wire format
// does not align them); the scales are the little-endian fp32 bytes of the message.
// With a block rule (block_rule.kind topk or mse) the requantization takes that rule's per-block
// clips of m (block_clips_async into the scratch `clips`, then quantize with them), as the host
// two-shot does with comm.grad_policy topk or mse; params.clips must be null.
struct OwnerStepArgs {
  int ranks = 0;                           // N >= 1
  const uint8_t* const* codes = nullptr;   // HOST array of N device pointers: packed codes
  const uint8_t* const* scales = nullptr;  // HOST array of N device pointers: fp32 scale bytes
  int64_t count = 0;                       // elements in the chunk
  QuantParams params;                      // requantization: bits, rounding, gamma, G, key
  const float* es = nullptr;               // (count) server error in, or null
  float* es_next = nullptr;                // (count) server error out, or null; not == es
  uint8_t* codes_out = nullptr;            // packed_bytes(bits, count), any alignment
  float* scales_out = nullptr;             // num_scales(count, G) floats
  float* out = nullptr;                    // (count) dequantized requantization
  QuantStats* stats = nullptr;             // stats of the requantization (reset here)
  PolicyConfig block_rule;                 // kind topk or mse: clip each block of m by that rule
  float* clips = nullptr;                  // (num_scales(count, G)) scratch for those clips
};
void owner_step_async(const OwnerStepArgs& a, cudaStream_t stream);

// --- small element-wise pieces of the device two-shot (comm/two_shot_cuda.cpp) ----------------
// out[i] = a[i] + b[i]; out[i] = a[i] - b[i]; x[i] = x[i] / divisor (IEEE, as the CPU loops).
void add_async(const float* a, const float* b, float* out, int64_t count, cudaStream_t stream);
void sub_async(const float* a, const float* b, float* out, int64_t count, cudaStream_t stream);
void div_async(float* x, int64_t count, float divisor, cudaStream_t stream);

// Sums n 32-byte stats trailers (at first + i * stride, device bytes of any alignment) and *own
// (clipped, count, nonfinite added; absmax the max) into dst (device, any alignment), as the owner
// of the CPU two-shot sums its received trailers and its own requantization.
void sum_trailers_async(const uint8_t* first, size_t stride, int n, const QuantStats* own,
                        uint8_t* dst, cudaStream_t stream);

}  // namespace int4ddp::quant::cuda
