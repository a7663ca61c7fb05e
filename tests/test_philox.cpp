// Philox4x32-10 against Random123's published known-answer vectors, and the int4ddp keying.
#include <gtest/gtest.h>

#include <set>

#include "kernels/quant/philox.h"

namespace int4ddp::quant {
namespace {

struct Kat {
  Philox4 ctr;
  uint32_t k0, k1;
  Philox4 expected;
};

// Random123 tests/kat_vectors, philox4x32 10 rounds.
const Kat kKats[] = {
    {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
    {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
     0xffffffffu,
     0xffffffffu,
     {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
    {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
     0xa4093822u,
     0x299f31d0u,
     {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
};

TEST(Philox, Random123KnownAnswers) {
  for (const Kat& k : kKats) {
    const Philox4 out = philox4x32_10(k.ctr, k.k0, k.k1);
    for (int w = 0; w < 4; ++w) EXPECT_EQ(out.v[w], k.expected.v[w]) << "word " << w;
  }
}

TEST(Philox, KeyingPutsIndexStepAndTensorInTheCounter) {
  const RngKey key{7, 3, 11, 5};
  const uint64_t group = (uint64_t{2} << 32) | 9;  // exercises the high counter word
  const Philox4 a = philox_block(key, group);
  const Philox4 b = philox4x32_10(Philox4{{9, 2, 11, 5}}, 7, 3);
  for (int w = 0; w < 4; ++w) EXPECT_EQ(a.v[w], b.v[w]);
  // element 8g + 2w + h takes half h (0 low, 1 high) of word w
  for (int j = 0; j < 8; ++j) {
    const uint32_t word = a.v[j / 2];
    const uint32_t h = j % 2 ? word >> 16 : word & 0xFFFFu;
    EXPECT_EQ(philox_uniform(key, 8 * group + j), static_cast<float>(h) / 65536.0f) << j;
  }
}

// A pinned vector computed by hand from the Random123 known answer above: key (0, 0), counter
// (0, 0, 0, 0) gives words 0x6627e8d5 0xe169c58d 0xbc57ac4c 0x9b00dbd8, so elements 0..7 of the
// stream (seed 0, stream 0, step 0, tensor 0) take the 16-bit halves e8d5 6627 c58d e169 ac4c bc57
// dbd8 9b00, each divided by 65536.
TEST(Philox, SixteenBitLayoutPinned) {
  const RngKey key{0, 0, 0, 0};
  const uint32_t halves[8] = {0xe8d5, 0x6627, 0xc58d, 0xe169, 0xac4c, 0xbc57, 0xdbd8, 0x9b00};
  for (int i = 0; i < 8; ++i)
    EXPECT_EQ(philox_uniform(key, i), static_cast<float>(halves[i]) * 0x1p-16f) << "element " << i;
  // Element 8 starts the next call (counter 1), not a new half of the same one.
  EXPECT_EQ(
      philox_uniform(key, 8),
      static_cast<float>(philox4x32_10(Philox4{{1, 0, 0, 0}}, 0, 0).v[0] & 0xFFFFu) * 0x1p-16f);
}

TEST(Philox, UniformIsInUnitIntervalAndDistinctAcrossKeys) {
  EXPECT_EQ(uniform_from_half(0, 0), 0.0f);
  EXPECT_EQ(uniform_from_half(0xffff0000u, 0), 0.0f);
  EXPECT_EQ(uniform_from_half(0xffffffffu, 1), 1.0f - 0x1p-16f);
  EXPECT_EQ(uniform_from_half(0x00010000u, 1), 0x1p-16f);
  EXPECT_EQ(uniform_from_half(0x00000001u, 2), 0x1p-16f);
  // Each key field changes the stream.
  const RngKey base{1, 2, 3, 4};
  RngKey keys[5] = {base, base, base, base, base};
  keys[1].seed ^= 1;
  keys[2].stream ^= 1;
  keys[3].step ^= 1;
  keys[4].tensor_id ^= 1;
  std::set<uint32_t> first_words;
  for (const RngKey& k : keys) first_words.insert(philox_block(k, 0).v[0]);
  EXPECT_EQ(first_words.size(), 5u);
}

}  // namespace
}  // namespace int4ddp::quant
