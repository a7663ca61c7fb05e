// bench_gpu: the CUDA codec and the device two-shot all-reduce (run by experiments/gpu_check.sh).
//
//   bench_gpu kernels [--log2n 28] [--reps 20] [--torch-eager-ms X] [--torch-compile-ms Y]
//                     [--torch-compile-dequant-ms Z] [--torch-eager-dequant-ms W]
//                     [--torch-compile-tensor-ms T] [--torch-eager-tensor-ms U]
//     On 2^log2n floats (INT4): a device-to-device cudaMemcpy; quantize+pack with per-block
//     G = 512 (stochastic and nearest); unpack+dequantize; per-tensor quantize+pack (the compute
//     path: two passes, global absmax then quantize; stochastic and nearest); and the owner step
//     for N = 2, 4, 8. Every figure is also a fraction of the copy measured in the same run. The
//     PyTorch figures (the same operations, eager and torch.compile) are measured by gpu_check.sh
//     in the same run and passed in (negative: not measured, printed as null). The codes, scales
//     and floats of what was timed are checked against the CPU codec on a prefix (per-tensor: a
//     2^20-element tensor); #wrong > 0 exits 1. Ends with one JSON line {"bench":"gpu",...}.
//
//   bench_gpu allreduce --backend nccl|mpi [--log2n-max 24] [--reps 5]
//     The device two-shot all-reduce (TwoShotAllreduceCuda) at a few sizes, nccl-tests style, and
//     #wrong = elements that differ from the host TwoShotAllreduce on the same inputs and keys.
//     nccl: one rank; mpi: any number of ranks, device buffers staged through pinned host memory.
//     Ends with one JSON line {"bench":"gpu_allreduce",...}; exits 1 when #wrong > 0.
//
// Bytes counted (GB/s = bytes / best time of --reps after a warm-up):
//   copy           8 n        (4 n read + 4 n written, as bench_quant counts memcpy)
//   quantize       4.5 n      (4 n read, n/2 of codes written; the 4n/G of scales ignored)
//                  per tensor: the same 4.5 n (the logical bytes); its "traffic" column counts the
//                  8.5 n the two passes move (x read twice), so at most 4.5 / 8.5 = 53% of copy
//                  in the logical column when x does not fit in L2.
//   dequantize     4.5 n      (n/2 read, 4 n written)
//   owner step     n (N (1/2 + 4/G) + 4 + 1/2 + 4/G + 4 + 4): the N messages' codes and scales
//                  read, the server error read, the requantized codes and scales written, the
//                  dequantized own copy and the new server error written (server error feedback
//                  on, the default). This is the traffic the step cannot avoid.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/staged_communicator.h"
#include "comm/two_shot.h"
#include "comm/two_shot_cuda.h"
#include "experiments/cuda_bench.h"
#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#ifdef INT4DDP_HAVE_NCCL
#include "comm/nccl_communicator.h"
#endif

using namespace int4ddp;
namespace qc = int4ddp::quant::cuda;

namespace {

using bench::DeviceMem;

constexpr int64_t kG = 512;

// Best time in seconds of `reps` runs of f() (enqueued on the legacy stream) after one warm-up.
template <typename F>
double best_seconds(int reps, F&& f) {
  cudaEvent_t a, b;
  INT4DDP_CUDA_CHECK(cudaEventCreate(&a));
  INT4DDP_CUDA_CHECK(cudaEventCreate(&b));
  f();
  INT4DDP_CUDA_CHECK(cudaDeviceSynchronize());
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    INT4DDP_CUDA_CHECK(cudaEventRecord(a, nullptr));
    f();
    INT4DDP_CUDA_CHECK(cudaEventRecord(b, nullptr));
    INT4DDP_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    INT4DDP_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, ms * 1e-3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return best;
}

// Normal data: 2^22 host values replicated over the device buffer (the pattern does not matter to
// the bandwidth; generating 2^28 normals on the host would take longer than the benchmark).
void fill_normal(float* d, int64_t n, uint64_t seed) {
  const int64_t piece = std::min<int64_t>(n, int64_t{1} << 22);
  std::vector<float> h(static_cast<size_t>(piece));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : h) v = normal(rng);
  for (int64_t off = 0; off < n; off += piece) {
    const int64_t m = std::min(piece, n - off);
    INT4DDP_CUDA_CHECK(
        cudaMemcpy(d + off, h.data(), static_cast<size_t>(m) * 4, cudaMemcpyHostToDevice));
  }
}

std::string json_number(double v) {
  if (!(v >= 0) || !std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.4g", v);
  return buf;
}

std::string gpu_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  INT4DDP_CUDA_CHECK(cudaGetDevice(&dev));
  INT4DDP_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return prop.name;
}

int run_kernels(int argc, char** argv) {
  int64_t log2n = 28;
  int reps = 20;
  double torch_eager = -1, torch_compile = -1, torch_eager_dq = -1, torch_compile_dq = -1;
  double torch_eager_tensor = -1, torch_compile_tensor = -1;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      INT4DDP_CHECK(i + 1 < argc, a, " needs a value");
      return argv[++i];
    };
    if (a == "--log2n")
      log2n = std::atoi(next());
    else if (a == "--reps")
      reps = std::atoi(next());
    else if (a == "--torch-eager-ms")
      torch_eager = std::atof(next());
    else if (a == "--torch-compile-ms")
      torch_compile = std::atof(next());
    else if (a == "--torch-eager-dequant-ms")
      torch_eager_dq = std::atof(next());
    else if (a == "--torch-compile-dequant-ms")
      torch_compile_dq = std::atof(next());
    else if (a == "--torch-eager-tensor-ms")
      torch_eager_tensor = std::atof(next());
    else if (a == "--torch-compile-tensor-ms")
      torch_compile_tensor = std::atof(next());
    else
      INT4DDP_FAIL("bench_gpu kernels: unknown argument ", a);
  }
  INT4DDP_CHECK(log2n >= 12 && log2n <= 30 && reps >= 1,
                "bench_gpu: --log2n in 12..30, --reps >= 1");
  const int64_t n = int64_t{1} << log2n;
  const double nb = static_cast<double>(n);
  const int64_t nsc = quant::num_scales(n, kG);

  DeviceMem x(n * 4), y(n * 4), codes(n / 2), scales(nsc * 4), stats(sizeof(quant::QuantStats));
  fill_normal(x.as<float>(), n, 1);

  quant::QuantParams p;
  p.bits = 4;
  p.rounding = quant::Rounding::kStochastic;
  p.block_size = kG;
  p.gamma = 0.9f;
  p.key = quant::RngKey{1234, 0, 7, 3};

  quant::QuantParams p_near = p;
  p_near.rounding = quant::Rounding::kNearest;
  quant::QuantParams p_tensor = p;  // the compute path: one scale, stochastic
  p_tensor.block_size = 0;
  quant::QuantParams p_tensor_near = p_tensor;
  p_tensor_near.rounding = quant::Rounding::kNearest;

  struct Row {
    std::string op;
    double seconds, bytes;
    double traffic;   // bytes the algorithm moves (two-pass per tensor: x read twice)
    double torch_ms;  // torch.compile of the same operation, or -1
    double gbps() const { return bytes / seconds / 1e9; }
  };
  std::vector<Row> rows;
  rows.push_back(
      {"copy (cudaMemcpy D2D)",
       best_seconds(
           reps,
           [&] { INT4DDP_CUDA_CHECK(cudaMemcpyAsync(y.p, x.p, n * 4, cudaMemcpyDeviceToDevice)); }),
       8.0 * nb, 8.0 * nb, -1});
  auto time_quantize = [&](const char* op, const quant::QuantParams& qp, double traffic,
                           double torch_ms) {
    rows.push_back({op,
                    best_seconds(reps,
                                 [&] {
                                   qc::quantize_async(x.as<float>(), n, qp, codes.as<uint8_t>(),
                                                      scales.as<float>(),
                                                      stats.as<quant::QuantStats>(), nullptr);
                                 }),
                    4.5 * nb, traffic, torch_ms});
    return rows.size() - 1;
  };
  const size_t row_quant =
      time_quantize("quantize+pack int4 G=512 stoch", p, 4.5 * nb, torch_compile);
  const size_t row_quant_near =
      time_quantize("quantize+pack int4 G=512 nearest", p_near, 4.5 * nb, -1);
  const size_t row_tensor =
      time_quantize("quantize+pack int4 tensor stoch", p_tensor, 8.5 * nb, torch_compile_tensor);
  const size_t row_tensor_near =
      time_quantize("quantize+pack int4 tensor nearest", p_tensor_near, 8.5 * nb, -1);
  qc::quantize_async(x.as<float>(), n, p, codes.as<uint8_t>(), scales.as<float>(),
                     stats.as<quant::QuantStats>(), nullptr);
  rows.push_back({"unpack+dequantize int4 G=512",
                  best_seconds(reps,
                               [&] {
                                 qc::dequantize_async(codes.as<uint8_t>(), scales.as<float>(), n, 4,
                                                      kG, y.as<float>(), nullptr);
                               }),
                  4.5 * nb, 4.5 * nb, torch_compile_dq});
  const size_t row_dequant = rows.size() - 1;

  // Correctness of what was timed, on a prefix (blocks are aligned, keys are by index): the CPU
  // codec must produce the same codes, scales and floats. Per tensor: a 2^20-element tensor (the
  // prefix of x) through the same kernels.
  int64_t wrong = 0;
  {
    const int64_t m = std::min<int64_t>(n, int64_t{1} << 20);
    std::vector<float> hx(m), hy(m), ref_y(m), hs(m / kG), ref_s(m / kG);
    std::vector<uint8_t> hc(m / 2), ref_c(m / 2);
    INT4DDP_CUDA_CHECK(cudaMemcpy(hx.data(), x.p, m * 4, cudaMemcpyDeviceToHost));
    for (const quant::QuantParams& qp : {p, p_near}) {
      qc::quantize_async(x.as<float>(), n, qp, codes.as<uint8_t>(), scales.as<float>(),
                         stats.as<quant::QuantStats>(), nullptr);
      qc::dequantize_async(codes.as<uint8_t>(), scales.as<float>(), n, 4, kG, y.as<float>(),
                           nullptr);
      INT4DDP_CUDA_CHECK(cudaMemcpy(hy.data(), y.p, m * 4, cudaMemcpyDeviceToHost));
      INT4DDP_CUDA_CHECK(cudaMemcpy(hc.data(), codes.p, m / 2, cudaMemcpyDeviceToHost));
      INT4DDP_CUDA_CHECK(cudaMemcpy(hs.data(), scales.p, (m / kG) * 4, cudaMemcpyDeviceToHost));
      quant::quantize(hx.data(), m, qp, ref_c.data(), ref_s.data());
      quant::dequantize(ref_c.data(), ref_s.data(), m, 4, kG, ref_y.data());
      for (int64_t i = 0; i < m / 2; ++i) wrong += hc[i] != ref_c[i];
      for (int64_t i = 0; i < m / kG; ++i) wrong += std::memcmp(&hs[i], &ref_s[i], 4) != 0;
      for (int64_t i = 0; i < m; ++i) wrong += std::memcmp(&hy[i], &ref_y[i], 4) != 0;
    }
    for (const quant::QuantParams& qp : {p_tensor, p_tensor_near}) {
      float hs0 = 0.0f, ref_s0 = 0.0f;
      qc::quantize_async(x.as<float>(), m, qp, codes.as<uint8_t>(), scales.as<float>(),
                         stats.as<quant::QuantStats>(), nullptr);
      INT4DDP_CUDA_CHECK(cudaMemcpy(hc.data(), codes.p, m / 2, cudaMemcpyDeviceToHost));
      INT4DDP_CUDA_CHECK(cudaMemcpy(&hs0, scales.p, 4, cudaMemcpyDeviceToHost));
      quant::quantize(hx.data(), m, qp, ref_c.data(), &ref_s0);
      for (int64_t i = 0; i < m / 2; ++i) wrong += hc[i] != ref_c[i];
      wrong += std::memcmp(&hs0, &ref_s0, 4) != 0;
    }
  }

  // Owner step: N messages made by quantizing x with N keys; server error feedback on.
  double owner_gbps[3] = {0, 0, 0};
  const int owner_ranks[3] = {2, 4, 8};
  {
    DeviceMem es(n * 4), es_next(n * 4), codes_out(n / 2), scales_out(nsc * 4);
    INT4DDP_CUDA_CHECK(cudaMemset(es.p, 0, n * 4));
    std::vector<std::unique_ptr<DeviceMem>> msg_codes, msg_scales;
    for (int r = 0; r < 8; ++r) {
      msg_codes.push_back(std::make_unique<DeviceMem>(n / 2));
      msg_scales.push_back(std::make_unique<DeviceMem>(nsc * 4));
      quant::QuantParams pr = p;
      pr.key.stream = 65536u * r;
      qc::quantize_async(x.as<float>(), n, pr, msg_codes.back()->as<uint8_t>(),
                         msg_scales.back()->as<float>(), stats.as<quant::QuantStats>(), nullptr);
    }
    std::vector<const uint8_t*> c(8), s(8);
    for (int r = 0; r < 8; ++r) {
      c[r] = msg_codes[r]->as<uint8_t>();
      s[r] = msg_scales[r]->as<uint8_t>();
    }
    for (int k = 0; k < 3; ++k) {
      const int N = owner_ranks[k];
      qc::OwnerStepArgs a;
      a.ranks = N;
      a.codes = c.data();
      a.scales = s.data();
      a.count = n;
      a.params = p;
      a.es = es.as<float>();
      a.es_next = es_next.as<float>();
      a.codes_out = codes_out.as<uint8_t>();
      a.scales_out = scales_out.as<float>();
      a.out = y.as<float>();
      a.stats = stats.as<quant::QuantStats>();
      const double bytes = nb * (N * (0.5 + 4.0 / kG) + 4.0 + 0.5 + 4.0 / kG + 4.0 + 4.0);
      rows.push_back({"owner step N=" + std::to_string(N),
                      best_seconds(reps, [&] { qc::owner_step_async(a, nullptr); }), bytes, bytes,
                      -1});
      owner_gbps[k] = rows.back().gbps();
    }
  }

  const double copy = rows[0].gbps();
  auto pct = [&](size_t r) { return 100.0 * rows[r].gbps() / copy; };
  std::printf("bench_gpu kernels: %s, n = 2^%lld floats, best of %d\n", gpu_name().c_str(),
              static_cast<long long>(log2n), reps);
  std::printf(
      "# %%copy: logical bytes / time vs the copy's 8 n; traffic: bytes moved / time vs copy; "
      "x torch: torch.compile time / ours\n");
  std::printf("%-34s %10s %12s %10s %9s %9s %9s %9s\n", "op", "time_ms", "bytes", "GB/s", "%copy",
              "%traffic", "torch_ms", "x_torch");
  for (const Row& r : rows) {
    const double traffic_pct = 100.0 * r.traffic / r.seconds / 1e9 / copy;
    std::printf("%-34s %10.4f %12.4g %10.1f %8.1f%% %8.1f%% %9s %9s\n", r.op.c_str(),
                r.seconds * 1e3, r.bytes, r.gbps(), 100.0 * r.gbps() / copy, traffic_pct,
                json_number(r.torch_ms).c_str(),
                json_number(r.torch_ms > 0 ? r.torch_ms / (r.seconds * 1e3) : -1).c_str());
  }
  std::printf("%-34s %10s\n", "pytorch int4 quantize+pack eager", json_number(torch_eager).c_str());
  std::printf("%-34s %10s\n", "pytorch int4 quantize+pack compile",
              json_number(torch_compile).c_str());
  std::printf("%-34s %10s\n", "pytorch unpack+dequantize eager",
              json_number(torch_eager_dq).c_str());
  std::printf("%-34s %10s\n", "pytorch unpack+dequantize compile",
              json_number(torch_compile_dq).c_str());
  std::printf("%-34s %10s\n", "pytorch per-tensor quantize eager",
              json_number(torch_eager_tensor).c_str());
  std::printf("%-34s %10s\n", "pytorch per-tensor quantize compile",
              json_number(torch_compile_tensor).c_str());
  std::printf("#wrong (prefix of 2^20 / a 2^20 tensor against the CPU codec): %lld\n",
              static_cast<long long>(wrong));
  const size_t row_owner8 = rows.size() - 1;
  auto vs_torch = [&](double torch_ms, size_t r) {
    return json_number(torch_ms > 0 ? torch_ms / (rows[r].seconds * 1e3) : -1);
  };
  std::printf(
      "{\"bench\":\"gpu\",\"gpu\":\"%s\",\"n\":%lld,\"copy_GBps\":%s,\"quant_GBps\":%s,"
      "\"dequant_GBps\":%s,\"owner_GBps\":{\"2\":%s,\"4\":%s,\"8\":%s},"
      "\"torch_compile_quant_ms\":%s,\"torch_eager_quant_ms\":%s,\"torch_compile_dequant_ms\":%s,"
      "\"torch_eager_dequant_ms\":%s,\"torch_compile_tensor_ms\":%s,\"torch_eager_tensor_ms\":%s,"
      "\"quant_ms\":%s,\"dequant_ms\":%s,\"tensor_quant_ms\":%s,\"quant_pct_copy\":%s,"
      "\"quant_nearest_pct_copy\":%s,\"dequant_pct_copy\":%s,\"tensor_quant_pct_copy\":%s,"
      "\"tensor_quant_nearest_pct_copy\":%s,\"tensor_quant_pct_copy_traffic\":%s,"
      "\"owner2_pct_copy\":%s,\"owner4_pct_copy\":%s,\"owner8_pct_copy\":%s,"
      "\"quant_x_torch_compile\":%s,\"dequant_x_torch_compile\":%s,"
      "\"tensor_quant_x_torch_compile\":%s,\"wrong\":%lld}\n",
      gpu_name().c_str(), static_cast<long long>(n), json_number(copy).c_str(),
      json_number(rows[row_quant].gbps()).c_str(), json_number(rows[row_dequant].gbps()).c_str(),
      json_number(owner_gbps[0]).c_str(), json_number(owner_gbps[1]).c_str(),
      json_number(owner_gbps[2]).c_str(), json_number(torch_compile).c_str(),
      json_number(torch_eager).c_str(), json_number(torch_compile_dq).c_str(),
      json_number(torch_eager_dq).c_str(), json_number(torch_compile_tensor).c_str(),
      json_number(torch_eager_tensor).c_str(), json_number(rows[row_quant].seconds * 1e3).c_str(),
      json_number(rows[row_dequant].seconds * 1e3).c_str(),
      json_number(rows[row_tensor].seconds * 1e3).c_str(), json_number(pct(row_quant)).c_str(),
      json_number(pct(row_quant_near)).c_str(), json_number(pct(row_dequant)).c_str(),
      json_number(pct(row_tensor)).c_str(), json_number(pct(row_tensor_near)).c_str(),
      json_number(pct(row_tensor) * 8.5 / 4.5).c_str(), json_number(pct(row_owner8 - 2)).c_str(),
      json_number(pct(row_owner8 - 1)).c_str(), json_number(pct(row_owner8)).c_str(),
      vs_torch(torch_compile, row_quant).c_str(), vs_torch(torch_compile_dq, row_dequant).c_str(),
      vs_torch(torch_compile_tensor, row_tensor).c_str(), static_cast<long long>(wrong));
  return wrong == 0 ? 0 : 1;
}

int run_allreduce(int argc, char** argv) {
  std::string backend = "nccl";
  int log2n_max = 24, reps = 5;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      INT4DDP_CHECK(i + 1 < argc, a, " needs a value");
      return argv[++i];
    };
    if (a == "--backend")
      backend = next();
    else if (a == "--log2n-max")
      log2n_max = std::atoi(next());
    else if (a == "--reps")
      reps = std::atoi(next());
    else
      INT4DDP_FAIL("bench_gpu allreduce: unknown argument ", a);
  }
  INT4DDP_CHECK(log2n_max >= 16 && log2n_max <= 28 && reps >= 1,
                "bench_gpu allreduce: --log2n-max in 16..28, --reps >= 1");
  std::unique_ptr<comm::Communicator> host, device;
  if (backend == "nccl") {
#ifdef INT4DDP_HAVE_NCCL
    device = comm::make_nccl_communicator();
    INT4DDP_CHECK(device->size() == 1, "bench_gpu: the nccl run is for one rank");
    host = comm::make_local_communicator();
#else
    INT4DDP_FAIL("bench_gpu: this build has no NCCL");
#endif
  } else if (backend == "mpi") {
    host = comm::make_mpi_communicator();
    device = std::make_unique<comm::StagedCommunicator>(comm::make_mpi_communicator());
  } else {
    INT4DDP_FAIL("bench_gpu: --backend must be nccl or mpi, not ", backend);
  }
  const int N = device->size(), rank = device->rank();
  comm::CompressConfig cfg;  // the defaults: int4, G = 512, stochastic, both error feedbacks, lbt
  cfg.seed = 7;
  if (rank == 0) {
    std::printf("bench_gpu allreduce: %s, backend %s%s, %d rank(s), int4 G=512, best of %d\n",
                gpu_name().c_str(), backend.c_str(), backend == "mpi" ? " (staged)" : "", N, reps);
    std::printf("%12s %12s %10s %10s %10s %12s %8s\n", "size(B)", "count", "time(us)",
                "algbw(GB/s)", "busbw(GB/s)", "wire(B)", "#wrong");
  }
  int64_t wrong_total = 0;
  std::string json_rows;
  for (int log2n = 16; log2n <= log2n_max; log2n += 4) {
    const int64_t n = int64_t{1} << log2n;
    std::vector<float> g(static_cast<size_t>(n));
    std::mt19937_64 rng(100 + rank);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : g) v = normal(rng);
    DeviceMem dx(n * 4);
    comm::TwoShotAllreduce h(*host, cfg, n, 1);
    comm::TwoShotAllreduceCuda d(*device, cfg, n, 1);
    // Correctness: step 0 on both, compared element by element.
    std::vector<float> ref = g, got(static_cast<size_t>(n));
    h.run(ref.data(), 0);
    INT4DDP_CUDA_CHECK(cudaMemcpy(dx.p, g.data(), n * 4, cudaMemcpyHostToDevice));
    const comm::BucketStats st = d.run(dx.as<float>(), 0);
    d.commit(false);
    INT4DDP_CUDA_CHECK(cudaMemcpy(got.data(), dx.p, n * 4, cudaMemcpyDeviceToHost));
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) wrong += std::memcmp(&got[i], &ref[i], 4) != 0;
    host->allreduce_sum_i64(&wrong, 1);
    wrong_total += wrong;
    // Timing: the same input each time (restored outside the timed region), state not committed.
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      INT4DDP_CUDA_CHECK(cudaMemcpy(dx.p, g.data(), n * 4, cudaMemcpyHostToDevice));
      device->barrier();
      const auto t0 = std::chrono::steady_clock::now();
      d.run(dx.as<float>(), 1);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      d.commit(false);
      best = std::min(best, s);
    }
    double worst_best = best;  // the slowest rank's best time is the collective's
    {
      // max over ranks through the fp32 sum is not a max; use the i64 sum of one-hot microseconds
      std::vector<int64_t> us(static_cast<size_t>(N), 0);
      us[static_cast<size_t>(rank)] = static_cast<int64_t>(best * 1e6);
      host->allreduce_sum_i64(us.data(), N);
      worst_best = *std::max_element(us.begin(), us.end()) * 1e-6;
    }
    const double algbw = 4.0 * n / worst_best / 1e9;
    const double busbw = algbw * 2.0 * (N - 1) / N;
    if (rank == 0) {
      std::printf("%12lld %12lld %10.1f %10.2f %10.2f %12llu %8lld\n",
                  static_cast<long long>(4 * n), static_cast<long long>(n), worst_best * 1e6, algbw,
                  busbw, static_cast<unsigned long long>(st.wire_bytes),
                  static_cast<long long>(wrong));
    }
    char row[256];
    std::snprintf(row, sizeof(row),
                  "%s{\"count\":%lld,\"time_us\":%.1f,\"algbw_GBps\":%.3f,"
                  "\"busbw_GBps\":%.3f,\"wire_bytes\":%llu,\"wrong\":%lld}",
                  json_rows.empty() ? "" : ",", static_cast<long long>(n), worst_best * 1e6, algbw,
                  busbw, static_cast<unsigned long long>(st.wire_bytes),
                  static_cast<long long>(wrong));
    json_rows += row;
  }
  if (rank == 0)
    std::printf(
        "{\"bench\":\"gpu_allreduce\",\"backend\":\"%s\",\"ranks\":%d,\"rows\":[%s],"
        "\"wrong\":%lld}\n",
        backend.c_str(), N, json_rows.c_str(), static_cast<long long>(wrong_total));
  return wrong_total == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "kernels") return run_kernels(argc, argv);
    if (mode == "allreduce") return run_allreduce(argc, argv);
    std::fprintf(stderr,
                 "usage: bench_gpu kernels [--log2n K] [--reps R] [--torch-eager-ms X] "
                 "[--torch-compile-ms Y] ...\n"
                 "       bench_gpu allreduce --backend nccl|mpi [--log2n-max K] [--reps R]\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    comm::abort_world(1);
    return 1;
  }
}
