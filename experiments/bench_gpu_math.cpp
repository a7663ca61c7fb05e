// bench_gpu_math: the int8 tensor-core GEMM (kernels/math/cuda/gemm_cuda.h) beside the fp32 GEMM
// it replaces, at the convolution GEMMs of a CIFAR resnet18 (M = batch * H * W, K = 9 * Cin,
// N = Cout), in the same run (run by experiments/gpu_math_check.sh).
//
//   bench_gpu_math [--batch 256] [--reps 10]
//
// Per shape: fp32 sgemm (cuBLAS, TF32 off), the same with TF32 on, int_gemm through cuBLASLt IMMA
// with the operands already in its native form (A (M, K) and B (N, K), K contiguous: used in
// place), the same with A given transposed (K, M) (packed into the workspace first), and the
// fallback kernel. Times are the best of --reps after a warm-up; TFLOP/s and TOP/s count 2 M N K.
// #wrong: outputs where the cuBLASLt and fallback int_gemm results differ (they must be equal bit
// for bit); the exit status is 1 when any differs. Ends with one JSON line
//   {"bench":"gpu_math","gpu":..,"batch":..,"shapes":[{"m":..,"n":..,"k":..,"fp32_ms":..,
//    "tf32_ms":..,"int8_ms":..,"int8_packed_ms":..,"fallback_ms":..,"int8_vs_fp32":..,
//    "int8_vs_tf32":..},..],"wrong":..}
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "experiments/cuda_bench.h"
#include "kernels/common/error.h"
#include "kernels/math/cuda/gemm_cuda.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"

using namespace int4ddp;
using math::Trans;
namespace mc = int4ddp::math::cuda;

namespace {

using bench::DeviceMem;

// Best time in ms of `reps` runs of f after one warm-up, by CUDA events on the default stream.
double best_ms(const std::function<void()>& f, int reps) {
  f();
  INT4DDP_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  INT4DDP_CUDA_CHECK(cudaEventCreate(&a));
  INT4DDP_CUDA_CHECK(cudaEventCreate(&b));
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    INT4DDP_CUDA_CHECK(cudaEventRecord(a));
    f();
    INT4DDP_CUDA_CHECK(cudaEventRecord(b));
    INT4DDP_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0.0f;
    INT4DDP_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, static_cast<double>(ms));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return best;
}

std::string gpu_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess)
    return "unknown";
  return prop.name;
}

// Integers lo..hi from a splitmix64 hash of the index (the operands are up to 151M elements: a
// cheap generator keeps set-up short).
template <typename T>
void upload_random(T* dst, size_t count, int lo, int hi, uint64_t seed) {
  std::vector<T> h(count);
  const uint64_t span = static_cast<uint64_t>(hi - lo + 1);
  for (size_t i = 0; i < count; ++i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    h[i] = static_cast<T>(lo + static_cast<int>((z ^ (z >> 31)) % span));
  }
  INT4DDP_CUDA_CHECK(cudaMemcpy(dst, h.data(), count * sizeof(T), cudaMemcpyHostToDevice));
}

struct Shape {
  const char* name;
  int64_t hw, cin, cout;  // output plane size, input and output channels (3x3 convolution)
};

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 256;
  int reps = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--batch" && i + 1 < argc)
      batch = std::atoll(argv[++i]);
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_gpu_math [--batch 256] [--reps 10]\n");
      return 2;
    }
  }
  if (!quant::cuda::device_available()) {
    std::fprintf(stderr, "bench_gpu_math: no CUDA device found: this benchmark needs a GPU\n");
    return 2;
  }
  if (batch < 1 || reps < 1) {
    std::fprintf(stderr, "bench_gpu_math: --batch and --reps must be positive\n");
    return 2;
  }
  try {
    const Shape shapes[] = {{"layer1 32x32x64", 32 * 32, 64, 64},
                            {"layer2 16x16x128", 16 * 16, 128, 128},
                            {"layer3 8x8x256", 8 * 8, 256, 256},
                            {"layer4 4x4x512", 4 * 4, 512, 512}};
    mc::GemmContext ctx;
    std::printf("bench_gpu_math on %s, batch %lld, best of %d (ms; TFLOP/s and TOP/s = 2MNK/t)\n",
                gpu_name().c_str(), static_cast<long long>(batch), reps);
    std::printf("%-18s %8s %6s %6s | %8s %7s | %8s %7s | %8s %7s | %9s | %9s | %6s %6s | %6s\n",
                "shape", "M", "K", "N", "fp32", "TFLOP/s", "tf32", "TFLOP/s", "int8", "TOP/s",
                "int8 pack", "fallback", "x fp32", "x tf32", "#wrong");
    std::string json = "{\"bench\":\"gpu_math\",\"gpu\":\"" + gpu_name() +
                       "\",\"batch\":" + std::to_string(batch) + ",\"shapes\":[";
    int64_t wrong_total = 0;
    bool first = true;
    for (const Shape& s : shapes) {
      const int64_t m = batch * s.hw, k = 9 * s.cin, n = s.cout;
      const double ops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * k;
      DeviceMem af(static_cast<size_t>(m * k) * 4), bf(static_cast<size_t>(n * k) * 4);
      DeviceMem cf(static_cast<size_t>(m * n) * 4), c2(static_cast<size_t>(m * n) * 4);
      DeviceMem a8(static_cast<size_t>(m * k)), at8(static_cast<size_t>(m * k));
      DeviceMem b8(static_cast<size_t>(n * k));
      upload_random(a8.as<int8_t>(), static_cast<size_t>(m * k), 0, 15, 1);  // 4-bit activations
      upload_random(at8.as<int8_t>(), static_cast<size_t>(m * k), 0, 15, 2);
      upload_random(b8.as<int8_t>(), static_cast<size_t>(n * k), -7, 7, 3);  // 4-bit weights
      upload_random(af.as<float>(), static_cast<size_t>(m * k), -7, 7, 4);
      upload_random(bf.as<float>(), static_cast<size_t>(n * k), -7, 7, 5);
      // y (M, N) = col^T (M, K) W^T: W stored (N, K).
      auto fp32 = [&] {
        mc::sgemm(ctx, Trans::kNo, Trans::kYes, m, n, k, 1.0f, af.as<float>(), k, bf.as<float>(), k,
                  0.0f, cf.as<float>(), n, nullptr);
      };
      const double t_fp32 = best_ms(fp32, reps);
      ctx.set_tf32(true);
      const double t_tf32 = best_ms(fp32, reps);
      ctx.set_tf32(false);
      const mc::IntOperand a{a8.p, k, Trans::kNo, mc::CodeType::kU8, 15};
      const mc::IntOperand at{at8.p, m, Trans::kYes, mc::CodeType::kU8, 15};
      const mc::IntOperand b{b8.p, k, Trans::kYes, mc::CodeType::kS8, 7};
      auto int8 = [&](const mc::IntOperand& x, mc::IntGemmPath path, void* out) {
        mc::int_gemm(ctx, m, n, k, x, b, 0.01f, false, static_cast<float*>(out), n, nullptr, path);
      };
      const double t_int8 = best_ms([&] { int8(a, mc::IntGemmPath::kCublasLt, cf.p); }, reps);
      const double t_pack = best_ms([&] { int8(at, mc::IntGemmPath::kCublasLt, cf.p); }, reps);
      const double t_fb =
          best_ms([&] { int8(a, mc::IntGemmPath::kFallback, c2.p); }, std::max(1, reps / 3));
      // cuBLASLt and the fallback on the same operands: equal bit for bit.
      int8(a, mc::IntGemmPath::kCublasLt, cf.p);
      INT4DDP_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<uint32_t> h1(static_cast<size_t>(m * n)), h2(h1.size());
      INT4DDP_CUDA_CHECK(cudaMemcpy(h1.data(), cf.p, h1.size() * 4, cudaMemcpyDeviceToHost));
      INT4DDP_CUDA_CHECK(cudaMemcpy(h2.data(), c2.p, h2.size() * 4, cudaMemcpyDeviceToHost));
      int64_t wrong = 0;
      for (size_t i = 0; i < h1.size(); ++i) wrong += h1[i] != h2[i];
      wrong_total += wrong;
      auto tf = [&](double ms) { return ops / (ms * 1e-3) / 1e12; };
      std::printf(
          "%-18s %8lld %6lld %6lld | %8.3f %7.1f | %8.3f %7.1f | %8.3f %7.1f | %9.3f | %9.3f | "
          "%6.2f %6.2f | %6lld\n",
          s.name, static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(n),
          t_fp32, tf(t_fp32), t_tf32, tf(t_tf32), t_int8, tf(t_int8), t_pack, t_fb, t_fp32 / t_int8,
          t_tf32 / t_int8, static_cast<long long>(wrong));
      char buf[512];
      std::snprintf(buf, sizeof buf,
                    "%s{\"name\":\"%s\",\"m\":%lld,\"n\":%lld,\"k\":%lld,\"fp32_ms\":%.4f,"
                    "\"tf32_ms\":%.4f,\"int8_ms\":%.4f,\"int8_packed_ms\":%.4f,"
                    "\"fallback_ms\":%.4f,\"int8_vs_fp32\":%.3f,\"int8_vs_tf32\":%.3f}",
                    first ? "" : ",", s.name, static_cast<long long>(m), static_cast<long long>(n),
                    static_cast<long long>(k), t_fp32, t_tf32, t_int8, t_pack, t_fb,
                    t_fp32 / t_int8, t_tf32 / t_int8);
      json += buf;
      first = false;
    }
    json += "],\"wrong\":" + std::to_string(wrong_total) + "}";
    std::printf("%s\n", json.c_str());
    return wrong_total == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_math: %s\n", e.what());
    return 1;
  }
}
