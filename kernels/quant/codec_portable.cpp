// Portable kernels for the fast codec driver: plain C++ over the format.h helpers, compiled without
// ISA flags. Used on CPUs without AVX2, and as the scalar head/tail of the vector kernels.
#include <algorithm>
#include <cmath>

#include "kernels/quant/codec_kernels.h"

namespace int4ddp::quant::detail {

static float absmax_portable(const float* x, int64_t n, int64_t* nonfinite) {
  float m = 0.0f;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (is_finite_value(x[i]))
      m = std::max(m, std::fabs(x[i]));
    else
      ++bad;
  }
  *nonfinite += bad;
  return m;
}

int64_t quantize_segment_scalar(const float* x, int64_t n, const SegmentQuant& q, int8_t* codes) {
  int64_t clipped = 0;
  Philox4 r{};
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t gi = static_cast<uint64_t>(q.first_index + i);
    const bool stochastic = q.rounding == Rounding::kStochastic;
    if (stochastic && (i == 0 || gi % 8 == 0)) r = philox_block(q.key, gi / 8);
    int code = 0;
    if (is_finite_value(x[i])) {
      clipped += std::fabs(x[i]) > q.clip;
      const float v = clamp_levels(x[i], q.saturate_at);
      code = stochastic ? quantize_stochastic(v, q.inv_step, uniform_from_half(r.v[gi % 8 / 2], gi),
                                              q.bits)
                        : quantize_nearest(v, q.inv_step, q.bits);
    }
    codes[i] = static_cast<int8_t>(code);
  }
  return clipped;
}

static void pack_int4_portable(const int8_t* codes, int64_t n, uint8_t* out) {
  for (int64_t k = 0; k < n / 2; ++k) out[k] = pack_nibbles(codes[2 * k], codes[2 * k + 1]);
  if (n % 2) out[n / 2] = pack_nibbles(codes[n - 1], 0);
}

static void unpack_int4_portable(const uint8_t* in, int64_t n, int8_t* codes) {
  for (int64_t i = 0; i < n; ++i)
    codes[i] = static_cast<int8_t>(i % 2 == 0 ? unpack_lo(in[i / 2]) : unpack_hi(in[i / 2]));
}

static void dequantize_segment_portable(const int8_t* codes, int64_t n, float step, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = dequantize_value(codes[i], step);
}

extern const CodecKernels kPortableKernels = {absmax_portable,
                                              quantize_segment_scalar,
                                              pack_int4_portable,
                                              unpack_int4_portable,
                                              dequantize_segment_portable,
                                              nullptr,
                                              nullptr,
                                              nullptr,
                                              nullptr,
                                              nullptr};

}  // namespace int4ddp::quant::detail
