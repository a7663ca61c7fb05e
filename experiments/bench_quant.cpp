// bench_quant: single-thread throughput of the CPU codec on 2^26 floats (INT4, per-block G = 512,
// clip count on), beside memcpy measured in the same run.
//
// Bytes counted per element: 4.5 (quantize+pack reads 4 and writes 0.5; unpack+dequantize the
// reverse; the 1/128 of a byte of scales is ignored). memcpy is counted the same way, as bytes read
// plus bytes written (8 per element), so the columns compare like with like.
// Each figure is the best of --reps timed runs after one warm-up. Ends with one JSON line.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/quant/codec.h"

using namespace int4ddp;
using namespace int4ddp::quant;

namespace {

template <typename F>
double best_seconds(int reps, F&& f) {
  f();  // warm-up: page faults, caches
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

struct Row {
  std::string op, impl;
  double seconds, bytes;
  double gbps() const { return bytes / seconds / 1e9; }
};

}  // namespace

int main(int argc, char** argv) {
  int64_t n = int64_t{1} << 26;
  int reps = 5;
  bool with_ref = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--log2n" && i + 1 < argc)
      n = int64_t{1} << std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (a == "--no-ref")
      with_ref = false;
    else {
      std::fprintf(stderr, "usage: bench_quant [--log2n K] [--reps R] [--no-ref]\n");
      return 2;
    }
  }
  if (n < 1024 || reps < 1) {
    std::fprintf(stderr, "bench_quant: --log2n must be >= 10 and --reps >= 1\n");
    return 2;
  }
  const int64_t G = kDefaultBlockSize;
  std::vector<float> x(n), y(n), z(n);
  std::vector<uint8_t> codes(packed_bytes(4, n));
  std::vector<float> scales(num_scales(n, G));
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x) v = normal(rng);

  std::vector<Row> rows;
  const double nb = static_cast<double>(n);
  rows.push_back({"memcpy", "libc",
                  best_seconds(reps, [&] { std::memcpy(z.data(), x.data(), n * sizeof(float)); }),
                  8.0 * nb});

  QuantParams near;
  near.bits = 4;
  near.block_size = G;
  near.gamma = 0.9f;
  QuantParams stoch = near;
  stoch.rounding = Rounding::kStochastic;
  stoch.key = RngKey{1, 0, 1, 0};

  std::vector<Isa> isas;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
    if (isa_available(isa)) isas.push_back(isa);
  int64_t clipped = 0;
  for (Isa isa : isas) {
    const char* name = isa_name(isa);
    rows.push_back(
        {"quant_nearest", name,
         best_seconds(
             reps,
             [&] {
               clipped = quantize_isa(isa, x.data(), n, near, codes.data(), scales.data()).clipped;
             }),
         4.5 * nb});
    rows.push_back(
        {"quant_stochastic", name,
         best_seconds(reps,
                      [&] { quantize_isa(isa, x.data(), n, stoch, codes.data(), scales.data()); }),
         4.5 * nb});
    rows.push_back(
        {"dequant", name,
         best_seconds(reps,
                      [&] { dequantize_isa(isa, codes.data(), scales.data(), n, 4, G, y.data()); }),
         4.5 * nb});
  }
  if (with_ref) {  // the plain per-element loops, for scale
    const int ref_reps = std::max(1, reps / 2);
    rows.push_back(
        {"quant_nearest", "reference",
         best_seconds(ref_reps,
                      [&] { quantize_ref(x.data(), n, near, codes.data(), scales.data()); }),
         4.5 * nb});
    rows.push_back(
        {"quant_stochastic", "reference",
         best_seconds(ref_reps,
                      [&] { quantize_ref(x.data(), n, stoch, codes.data(), scales.data()); }),
         4.5 * nb});
    rows.push_back(
        {"dequant", "reference",
         best_seconds(ref_reps,
                      [&] { dequantize_ref(codes.data(), scales.data(), n, 4, G, z.data()); }),
         4.5 * nb});
  }

  // Sanity: the last fast dequantize and the reference one decode the same codes identically.
  const Isa best = best_isa();
  quantize_isa(best, x.data(), n, stoch, codes.data(), scales.data());
  dequantize_isa(best, codes.data(), scales.data(), n, 4, G, y.data());
  dequantize_ref(codes.data(), scales.data(), n, 4, G, z.data());
  const bool ok = std::memcmp(y.data(), z.data(), n * sizeof(float)) == 0;

  std::printf("# bench_quant: n = %lld floats (2^%d), INT4, per-block G = %lld, 1 thread\n",
              static_cast<long long>(n), 63 - __builtin_clzll(static_cast<unsigned long long>(n)),
              static_cast<long long>(G));
  std::printf("# bytes: 4.5 per element for the codec, 8 (read + write) for memcpy; best of %d\n",
              reps);
  std::printf("%-18s %-10s %12s %10s %10s\n", "op", "impl", "time_ms", "GB/s", "vs_memcpy");
  const double memcpy_gbps = rows[0].gbps();
  auto find = [&](const std::string& op, const std::string& impl) {
    for (const Row& r : rows)
      if (r.op == op && r.impl == impl) return r.gbps();
    return 0.0;
  };
  for (const Row& r : rows)
    std::printf("%-18s %-10s %12.3f %10.2f %9.2fx\n", r.op.c_str(), r.impl.c_str(), r.seconds * 1e3,
                r.gbps(), r.gbps() / memcpy_gbps);
  std::printf("# clip fraction at gamma 0.9: %.5f; fast == reference decode: %s\n",
              static_cast<double>(clipped) / nb, ok ? "yes" : "NO");
  const char* bn = isa_name(best);
  std::printf(
      "{\"bench\":\"quant\",\"isa\":\"%s\",\"n\":%lld,\"memcpy_GBps\":%.3f,"
      "\"quant_nearest_GBps\":%.3f,\"quant_stochastic_GBps\":%.3f,\"dequant_GBps\":%.3f,"
      "\"ref_quant_nearest_GBps\":%.3f}\n",
      bn, static_cast<long long>(n), memcpy_gbps, find("quant_nearest", bn),
      find("quant_stochastic", bn), find("dequant", bn), find("quant_nearest", "reference"));
  return ok ? 0 : 1;
}
