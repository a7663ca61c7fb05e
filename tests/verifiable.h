// Verifiable data for the collective tests and bench_allreduce, in the nccl-tests manner: every
// rank's input is a deterministic function of (seed, rank, index), so each rank can compute every
// other rank's input and the exact result locally.
//
// Grid-valued inputs whose two-shot mean is exact (grid_mean_value, rank_factor): the exact mean
// is m_i = k_i * d_b with an integer code k_i and a power-of-two step d_b per block b of G
// elements; the first element of every non-zero block is the largest code (+-L), every fifth block
// is all zero. Rank r holds c_r * m_i with c_r = 1 + (2r - (N-1)) / 32 (a dyadic rational, sum
// over ranks N), so:
//   - rank r's block max is c_r L d_b, its step (c_r L d_b) / L = c_r d_b exactly, and its codes
//     are k_i exactly (x / step is an exact integer);
//   - the owner's FP32 sum of the dequantized versions is exactly N m_i (small dyadic numbers),
//     / N gives m_i exactly, and requantizing m_i (block max L d_b) gives the codes k_i again.
// Stochastic rounding: floor(k + u) in float equals k for every u in [0, 1) only when k + u is
// exact or the clamp undoes a round-up, i.e. for k in {-1, 0, L} (for k = 1, u = 1 - 2^-24 rounds
// 1 + u up to 2.0). The stochastic cases use only those codes.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/quant/format.h"

namespace int4ddp::test {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A 64-bit hash of (seed, rank, index).
inline uint64_t key(uint64_t seed, int rank, int64_t i) {
  return splitmix64(seed * 0x100000001b3ull ^
                    splitmix64(static_cast<uint64_t>(rank) << 40 ^ static_cast<uint64_t>(i)));
}

// Uniform in [-1, 1).
inline float uniform(uint64_t seed, int rank, int64_t i) {
  return static_cast<float>(static_cast<double>(key(seed, rank, i) >> 11) * 0x1.0p-52 - 1.0);
}

// Random gradient-like values: block-dependent magnitude (2^-6 .. 2^2) and a rare outlier (x8).
inline float random_grad(uint64_t seed, int rank, int64_t i, int64_t block) {
  const float scale = std::ldexp(1.0f, static_cast<int>((i / block) % 9) - 6);
  const uint64_t k = key(seed + 7, rank, i);
  const float outlier = (k % 997 == 0) ? 8.0f : 1.0f;
  return scale * outlier * uniform(seed, rank, i);
}

// FNV-1a hash of n bytes (to compare results across ranks).
inline uint64_t fnv1a(const void* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

// Element i of the exact grid-valued mean (see the top of this file), with G elements per block
// and bits 2..8; stochastic: codes only from {-1, 0, L}.
inline float grid_mean_value(uint64_t seed, int64_t i, int64_t G, int bits, bool stochastic) {
  const int L = quant::levels(bits);
  const int64_t b = i / G;
  const float d = std::ldexp(1.0f, static_cast<int>(b % 7) - 4);
  const uint64_t k = key(seed, 99, i);
  int code;
  if (b % 5 == 4) {
    code = 0;
  } else if (i % G == 0) {
    code = stochastic ? L : ((b % 2) ? -L : L);
  } else if (stochastic) {
    const int allowed[3] = {-1, 0, L};
    code = allowed[k % 3];
  } else {
    code = static_cast<int>(k % static_cast<uint64_t>(2 * L + 1)) - L;
  }
  return static_cast<float>(code) * d;
}

// c_r: rank r of `ranks` holds c_r times the grid mean (> 0 for up to 16 ranks; sum = ranks).
inline float rank_factor(int r, int ranks) {
  return 1.0f + static_cast<float>(2 * r - (ranks - 1)) / 32.0f;
}

}  // namespace int4ddp::test
