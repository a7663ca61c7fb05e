// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator behind stochastic rounding. Host and device share this scalar definition;
// the vectorized CPU codecs reimplement the same rounds and are tested against it.
//
// Keying used by int4ddp (DESIGN.md section 2):
//   key     = (seed, stream)
//   counter = (low and high 32 bits of i / 8, step, tensor_id)        (i: the element index)
//   element i takes output word (i % 8) / 2 of that call, its low 16 bits when i is even and its
//   high 16 bits when i is odd (format.h, uniform_from_half). Read as little-endian memory, the
//   four words of a call are the eight 16-bit uniforms of elements 8g .. 8g + 7 in order.
#pragma once

#include <cstdint>

#include "kernels/quant/format.h"

namespace int4ddp::quant {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t v[4];
};

// The random stream of one tensor in one step.
struct RngKey {
  uint32_t seed = 0;       // run seed
  uint32_t stream = 0;     // e.g. rank
  uint32_t step = 0;       // training step
  uint32_t tensor_id = 0;  // layer or bucket id
};

INT4DDP_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * ctr.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

constexpr int kElementsPerPhilox = 8;  // one Philox4x32-10 call serves 8 consecutive elements

// The four random words for elements 8*group .. 8*group+7 of the tensor keyed by `key`.
INT4DDP_HD Philox4 philox_block(const RngKey& key, uint64_t group) {
  Philox4 ctr{
      {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), key.step, key.tensor_id}};
  return philox4x32_10(ctr, key.seed, key.stream);
}

// u in [0, 1) for element `index`.
INT4DDP_HD float philox_uniform(const RngKey& key, uint64_t index) {
  return uniform_from_half(philox_block(key, index / 8).v[(index % 8) / 2], index);
}

}  // namespace int4ddp::quant
