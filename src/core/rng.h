// The project's one deterministic generator: SplitMix64 (Steele et al. 2014). The standard
// library's distributions and std::shuffle are implementation-defined, so anything that must be
// reproducible across compilers (initial weights, epoch permutations, augmentation) draws from
// this.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common/error.h"

namespace int4ddp {

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // Uniform in [0, bound), unbiased (rejection of the low 2^64 mod bound values); bound >= 1.
  uint64_t below(uint64_t bound) {
    INT4DDP_CHECK(bound >= 1, "Rng::below: bound must be >= 1");
    const uint64_t threshold = (0 - bound) % bound;
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % bound;
    }
  }

  // Uniform float in [0, 1) with 24 random bits.
  float uniform() { return static_cast<float>(next() >> 40) * 0x1p-24f; }

  // Uniform double in [0, 1) with 53 random bits.
  double uniform53() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  // Standard normal by Box-Muller (one value per call). Uses libm's log/cos/sqrt, so it is
  // reproducible for a given libm; weights are initialised with it, data never.
  double normal() {
    double u1 = uniform53();
    if (u1 <= 0.0) u1 = 0x1.0p-53;
    const double u2 = uniform53();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

}  // namespace int4ddp
