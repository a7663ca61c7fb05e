// The reference codec: one obvious loop per scope, element by element, straight from DESIGN.md
// section 2. It is the definition the fast paths are tested against; keep it plain.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/codec_kernels.h"

namespace int4ddp::quant {

int64_t num_scales(int64_t count, int64_t block_size) {
  if (block_size == 0) return 1;
  return (count + block_size - 1) / block_size;
}

void validate(const QuantParams& p) {
  INT4DDP_CHECK(valid_bits(p.bits), "quantizer: bits = ", p.bits, " is outside ", kMinBits, "..",
                kMaxBits);
  INT4DDP_CHECK(std::isfinite(p.gamma) && p.gamma > 0.0f && p.gamma <= 1.0f,
                "quantizer: gamma = ", p.gamma, " is outside (0, 1]");
  INT4DDP_CHECK(p.block_size >= 0, "quantizer: block_size = ", p.block_size, " is negative");
  INT4DDP_CHECK(p.index_offset >= 0, "quantizer: index_offset = ", p.index_offset, " is negative");
  INT4DDP_CHECK(p.clips == nullptr || p.block_size > 0,
                "quantizer: per-block clips need block_size > 0 (got a per-tensor scale)");
}

namespace detail {

float scope_clip(const QuantParams& p, int64_t scope, float absmax) {
  if (!p.clips) return p.gamma * absmax;
  const float c = p.clips[scope];
  INT4DDP_CHECK(c >= 0.0f && is_finite_value(c), "quantizer: clip of block ", scope, " = ", c,
                " is negative or not finite");
  return c;
}

float saturation_bound(const QuantParams& p, float clip) {
  return p.clips ? clip : std::numeric_limits<float>::infinity();
}

}  // namespace detail

static void check_buffers(const void* x, int64_t count, const void* codes, const void* scales) {
  INT4DDP_CHECK(count >= 0, "quantizer: count = ", count, " is negative");
  INT4DDP_CHECK(count == 0 || (x && codes && scales), "quantizer: null buffer for ", count,
                " elements");
}

QuantStats quantize_ref(const float* x, int64_t count, const QuantParams& p, uint8_t* codes,
                        float* scales) {
  validate(p);
  check_buffers(x, count, codes, scales);
  QuantStats st;
  st.count = count;
  const int64_t scope = p.block_size == 0 ? count : p.block_size;
  const int64_t nscales = num_scales(count, p.block_size);
  for (int64_t s = 0; s < nscales; ++s) {
    const int64_t begin = s * scope;
    const int64_t end = std::min(count, begin + scope);
    float absmax = 0.0f;
    for (int64_t i = begin; i < end; ++i)
      if (is_finite_value(x[i])) absmax = std::max(absmax, std::fabs(x[i]));
    const float clip = detail::scope_clip(p, s, absmax);
    // Given clips saturate: elements beyond +-c code as +-c (clamp_levels is clamp(x, -c, c)).
    const float saturate_at = detail::saturation_bound(p, clip);
    const float step = step_for_clip(clip, p.bits);          // d, stored
    const float inv_step = inv_step_for_clip(clip, p.bits);  // r, quantizes
    scales[s] = step;
    st.absmax = std::max(st.absmax, absmax);
    for (int64_t i = begin; i < end; ++i) {
      int q = 0;
      if (!is_finite_value(x[i])) {
        ++st.nonfinite;
      } else {
        if (std::fabs(x[i]) > clip) ++st.clipped;
        const float v = clamp_levels(x[i], saturate_at);
        q = p.rounding == Rounding::kNearest
                ? quantize_nearest(v, inv_step, p.bits)
                : quantize_stochastic(v, inv_step, philox_uniform(p.key, p.index_offset + i),
                                      p.bits);
      }
      if (p.bits != 4) {
        codes[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      } else if (i % 2 == 0) {
        codes[i / 2] = pack_nibbles(q, 0);
      } else {
        codes[i / 2] = static_cast<uint8_t>(codes[i / 2] | pack_nibbles(0, q));
      }
    }
  }
  return st;
}

void dequantize_ref(const uint8_t* codes, const float* scales, int64_t count, int bits,
                    int64_t block_size, float* out) {
  INT4DDP_CHECK(valid_bits(bits), "dequantize: bits = ", bits, " is outside ", kMinBits, "..",
                kMaxBits);
  INT4DDP_CHECK(block_size >= 0, "dequantize: block_size = ", block_size, " is negative");
  check_buffers(out, count, codes, scales);
  const int64_t scope = block_size == 0 ? count : block_size;
  for (int64_t i = 0; i < count; ++i) {
    int q;
    if (bits != 4)
      q = static_cast<int8_t>(codes[i]);
    else
      q = i % 2 == 0 ? unpack_lo(codes[i / 2]) : unpack_hi(codes[i / 2]);
    out[i] = dequantize_value(q, scales[i / scope]);
  }
}

QuantStats quantize_feedback_ref(const float* x, const float* e, int64_t count,
                                 const QuantParams& p, uint8_t* codes, float* scales, float* e_out,
                                 float* dq_out) {
  check_buffers(x, count, codes, scales);
  std::vector<float> v(x, x + count);
  if (e)
    for (int64_t i = 0; i < count; ++i) v[static_cast<size_t>(i)] = x[i] + e[i];
  const QuantStats st = quantize_ref(v.data(), count, p, codes, scales);
  std::vector<float> dq(static_cast<size_t>(count));
  dequantize_ref(codes, scales, count, p.bits, p.block_size, dq.data());
  for (int64_t i = 0; i < count; ++i) {
    const size_t k = static_cast<size_t>(i);
    if (e_out) e_out[i] = v[k] - dq[k];
    if (dq_out) dq_out[i] = dq[k];
  }
  return st;
}

}  // namespace int4ddp::quant
