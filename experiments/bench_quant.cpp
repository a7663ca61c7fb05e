// bench_quant: single-thread throughput of the CPU codec on 2^26 floats (INT4, per-block G = 512,
// clip count on), each figure a ratio to memcpy measured in the same run, beside a read-only stream
// (the sum of the input: the ceiling of a read-dominated kernel such as quantize+pack).
//
// Bytes counted per element: 4.5 (quantize+pack reads 4 and writes 0.5; unpack+dequantize the
// reverse; the 1/128 of a byte of scales is ignored). memcpy is counted the same way, as bytes read
// plus bytes written (8 per element), and the read-only stream as 4, so the columns compare like
// with like. Each figure is the best of --reps timed runs after one warm-up. The codes and scales
// of the timed quantize runs (every ISA, both roundings) and the timed decodes are compared with
// the reference codec; any difference exits non-zero. Ends with one JSON line.
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

// Sum of x with 16 independent accumulators (vectorisable without reassociation flags): a pure
// read stream.
float stream_sum(const float* x, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j];
  for (; i < n; ++i) acc[0] += x[i];
  float s = 0.0f;
  for (float a : acc) s += a;
  return s;
}

struct Encoded {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  bool operator==(const Encoded& o) const {
    return codes == o.codes &&
           std::memcmp(scales.data(), o.scales.data(), scales.size() * sizeof(float)) == 0;
  }
};

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
  std::string only_isa;  // --isa NAME: time that instruction set only
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--log2n" && i + 1 < argc)
      n = int64_t{1} << std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (a == "--no-ref")
      with_ref = false;
    else if (a == "--isa" && i + 1 < argc)
      only_isa = argv[++i];
    else {
      std::fprintf(
          stderr,
          "usage: bench_quant [--log2n K] [--reps R] [--no-ref] [--isa portable|avx2|avx512]\n");
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
  std::vector<float> e(n);  // an error-feedback buffer
  for (float& v : e) v = 0.05f * normal(rng);

  std::vector<Row> rows;
  const double nb = static_cast<double>(n);
  rows.push_back({"memcpy", "libc",
                  best_seconds(reps, [&] { std::memcpy(z.data(), x.data(), n * sizeof(float)); }),
                  8.0 * nb});
  volatile float sink = 0.0f;  // keeps the read-only stream from being optimised away
  rows.push_back({"read_sum", "stream", best_seconds(reps, [&] { sink = stream_sum(x.data(), n); }),
                  4.0 * nb});

  QuantParams near;
  near.bits = 4;
  near.block_size = G;
  near.gamma = 0.9f;
  QuantParams stoch = near;
  stoch.rounding = Rounding::kStochastic;
  stoch.key = RngKey{1, 0, 1, 0};

  std::vector<Isa> isas;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
    if (isa_available(isa) && (only_isa.empty() || only_isa == isa_name(isa))) isas.push_back(isa);
  if (isas.empty()) {
    std::fprintf(stderr, "bench_quant: --isa %s is not available here\n", only_isa.c_str());
    return 2;
  }
  // The reference encodings the timed runs are checked against, and the reference decode.
  Encoded ref_near{codes, scales}, ref_stoch{codes, scales};
  quantize_ref(x.data(), n, near, ref_near.codes.data(), ref_near.scales.data());
  quantize_ref(x.data(), n, stoch, ref_stoch.codes.data(), ref_stoch.scales.data());
  std::vector<float> ref_out(n);
  dequantize_ref(ref_stoch.codes.data(), ref_stoch.scales.data(), n, 4, G, ref_out.data());
  std::vector<std::string> mismatches;

  int64_t clipped = 0;
  for (Isa isa : isas) {
    const char* name = isa_name(isa);
    Encoded got{codes, scales};
    rows.push_back({"quant_nearest", name,
                    best_seconds(reps,
                                 [&] {
                                   clipped = quantize_isa(isa, x.data(), n, near, got.codes.data(),
                                                          got.scales.data())
                                                 .clipped;
                                 }),
                    4.5 * nb});
    if (!(got == ref_near)) mismatches.push_back(std::string("quant_nearest/") + name);
    rows.push_back(
        {"quant_stochastic", name,
         best_seconds(
             reps,
             [&] { quantize_isa(isa, x.data(), n, stoch, got.codes.data(), got.scales.data()); }),
         4.5 * nb});
    if (!(got == ref_stoch)) mismatches.push_back(std::string("quant_stochastic/") + name);
    rows.push_back({"dequant", name,
                    best_seconds(reps,
                                 [&] {
                                   dequantize_isa(isa, ref_stoch.codes.data(),
                                                  ref_stoch.scales.data(), n, 4, G, y.data());
                                 }),
                    4.5 * nb});
    if (std::memcmp(y.data(), ref_out.data(), n * sizeof(float)) != 0)
      mismatches.push_back(std::string("dequant/") + name);
    // Error feedback as the two-shot's worker does it, in tiles of whole blocks: v = x + e
    // quantized, e_out = v - Q(v); step by step (v, quantize, dequantize, subtract) and fused
    // (quantize_feedback). Bytes: x and e read, e_out written, codes and scales.
    const int64_t tile = 16384;
    std::vector<float> vt(tile), dqt(tile);
    auto ef_steps = [&] {
      for (int64_t o = 0; o < n; o += tile) {
        const int64_t len = std::min(tile, n - o);
        for (int64_t i = 0; i < len; ++i) vt[i] = x[o + i] + e[o + i];
        quantize_isa(isa, vt.data(), len, stoch, got.codes.data() + o / 2,
                     got.scales.data() + o / G);
        dequantize_isa(isa, got.codes.data() + o / 2, got.scales.data() + o / G, len, 4, G,
                       dqt.data());
        for (int64_t i = 0; i < len; ++i) y[o + i] = vt[i] - dqt[i];
      }
    };
    auto ef_fused = [&] {
      for (int64_t o = 0; o < n; o += tile) {
        const int64_t len = std::min(tile, n - o);
        quantize_feedback_isa(isa, x.data() + o, e.data() + o, len, stoch, got.codes.data() + o / 2,
                              got.scales.data() + o / G, z.data() + o, nullptr, true);
      }
    };
    rows.push_back({"quant_ef_steps", name, best_seconds(reps, ef_steps), 12.5 * nb});
    const Encoded steps_enc = got;
    rows.push_back({"quant_ef_fused", name, best_seconds(reps, ef_fused), 12.5 * nb});
    if (!(got == steps_enc) || std::memcmp(y.data(), z.data(), n * sizeof(float)) != 0)
      mismatches.push_back(std::string("quant_ef_fused/") + name);
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

  const Isa best = only_isa.empty() ? best_isa() : isas.front();
  const bool ok = mismatches.empty();

  std::printf("# bench_quant: n = %lld floats (2^%d), INT4, per-block G = %lld, 1 thread\n",
              static_cast<long long>(n), 63 - __builtin_clzll(static_cast<unsigned long long>(n)),
              static_cast<long long>(G));
  std::printf(
      "# bytes: 4.5 per element for the codec, 8 (read + write) for memcpy, 4 for the read-only "
      "sum; best of %d\n",
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
  std::printf(
      "# clip fraction at gamma 0.9: %.5f; timed codes, scales and decodes == reference: %s\n",
      static_cast<double>(clipped) / nb, ok ? "yes" : "NO");
  for (const std::string& m : mismatches) std::printf("# MISMATCH: %s\n", m.c_str());
  const char* bn = isa_name(best);
  std::printf(
      "{\"bench\":\"quant\",\"isa\":\"%s\",\"n\":%lld,\"memcpy_GBps\":%.3f,"
      "\"read_sum_GBps\":%.3f,\"quant_nearest_GBps\":%.3f,\"quant_stochastic_GBps\":%.3f,"
      "\"dequant_GBps\":%.3f,\"read_sum_vs_memcpy\":%.3f,\"quant_nearest_vs_memcpy\":%.3f,"
      "\"quant_stochastic_vs_memcpy\":%.3f,\"dequant_vs_memcpy\":%.3f,"
      "\"ref_quant_nearest_GBps\":%.3f,\"match_reference\":%s}\n",
      bn, static_cast<long long>(n), memcpy_gbps, find("read_sum", "stream"),
      find("quant_nearest", bn), find("quant_stochastic", bn), find("dequant", bn),
      find("read_sum", "stream") / memcpy_gbps, find("quant_nearest", bn) / memcpy_gbps,
      find("quant_stochastic", bn) / memcpy_gbps, find("dequant", bn) / memcpy_gbps,
      find("quant_nearest", "reference"), ok ? "true" : "false");
  return ok ? 0 : 1;
}
