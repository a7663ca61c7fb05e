// Shared by the comm/ test files (tests/test_comm_*.cpp, label mpi, run with 1-4 ranks): the world
// communicator's shortcuts, cross-rank comparisons and the grid-valued two-shot inputs of
// tests/verifiable.h as whole vectors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "comm/communicator.h"
#include "comm/two_shot.h"
#include "kernels/quant/policy.h"
#include "mpi_test.h"
#include "verifiable.h"

namespace int4ddp::comm {

using namespace ::int4ddp::test;  // NOLINT: verifiable data

inline Communicator& W() { return test::world(); }
inline int R() { return W().size(); }
inline int me() { return W().rank(); }

// True on every rank iff every rank holds the same n bytes at p (a hash per rank, all-gathered).
inline bool same_on_all_ranks(const void* p, size_t n) {
  const uint64_t h = fnv1a(p, n);
  std::vector<uint64_t> all(static_cast<size_t>(R()));
  W().allgatherv(&h, sizeof h, all.data(),
                 ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(R()), sizeof h)));
  return std::all_of(all.begin(), all.end(), [&](uint64_t x) { return x == all[0]; });
}

inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

inline int64_t count_wrong(const std::vector<float>& got, const std::vector<float>& want) {
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += same_bits(got[i], want[i]) ? 0 : 1;
  return wrong;
}

constexpr uint64_t kGridSeed = 1234;

// The exact grid-valued mean of n elements (verifiable.h) and rank r's input for it.
inline std::vector<float> grid_mean(int64_t n, int64_t G, int bits, bool stochastic,
                                    uint64_t seed) {
  std::vector<float> m(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    m[static_cast<size_t>(i)] = grid_mean_value(seed, i, G, bits, stochastic);
  return m;
}

inline std::vector<float> grid_input(const std::vector<float>& mean, int r, int ranks) {
  std::vector<float> x(mean);
  const float c = rank_factor(r, ranks);
  for (float& v : x) v *= c;
  return x;
}

// The config under which grid-valued inputs give exact means: gamma 1 (minmax), fixed seed.
inline CompressConfig exact_config(int bits, int64_t G, quant::Rounding rounding) {
  CompressConfig cfg;
  cfg.bits = bits;
  cfg.block_size = G;
  cfg.rounding = rounding;
  cfg.policy.kind = quant::PolicyKind::kMinMax;
  cfg.seed = 42;
  return cfg;
}

}  // namespace int4ddp::comm
