// bench_bn: BatchNorm (training forward with and without the fused ReLU, backward, eval forward)
// and the ReLU layer at resnet20's shapes (1x28x28 input, batch 128 by default), through the
// layers' own code, beside memcpy of the same tensor measured in the same run. Per op: median and
// minimum ms over --reps timed runs after one warm-up, and GB/s of the minimum at the op's nominal
// traffic (each tensor read or written once: BN forward reads x and writes y, 8 bytes per element;
// BN backward reads x and dy and writes dx, 12). Tensors stay in the caches between runs as they do
// in training (resnet20's activations fit the L3 here). Also the BN time of one resnet20 training
// step, from the medians and from the minima (on a shared machine the medians include runs that
// shared their core): per stage (16x28x28, 32x14x14, 64x7x7) 3 BN+ReLU and 3 BN, forward +
// backward, plus the stem's BN+ReLU (the 1-d bn_final is left out: 64 x 128 floats). Ends with one
// JSON line {"bench":"bn","threads":T,"batch":N,"rows":[{"op","shape","median_ms",
// "min_ms","GBps","memcpy_GBps"}...],"step_bn_ms":..,"step_bn_min_ms":..}.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/clock.h"
#include "kernels/common/parallel.h"
#include "src/nn/layer.h"

using namespace int4ddp;

namespace {

struct Timing {
  double median_ms, min_ms;
};

Timing time_op(int reps, const std::function<void()>& op) {
  op();  // warm-up: sizes the outputs, brings the tensors into the caches
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    op();
    ms.push_back(seconds_since(t0) * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

struct Row {
  std::string op, shape;
  Timing t;
  double bytes, memcpy_gbps;
  double gbps() const { return bytes / (t.min_ms * 1e-3) / 1e9; }
};

Tensor random_tensor(Shape shape, std::mt19937_64& rng, float mean) {
  Tensor t(shape);
  std::normal_distribution<float> normal(mean, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = normal(rng);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 21, threads = 1;
  int64_t batch = 128;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (a == "--threads" && i + 1 < argc)
      threads = std::atoi(argv[++i]);
    else if (a == "--batch" && i + 1 < argc)
      batch = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_bn [--reps R] [--threads T] [--batch N]\n");
      return 2;
    }
  }
  if (reps < 1 || threads < 1 || batch < 1) {
    std::fprintf(stderr, "bench_bn: --reps, --threads and --batch must be >= 1\n");
    return 2;
  }
  set_num_threads(threads);
  std::mt19937_64 rng(1);
  std::vector<Row> rows;
  double step_ms = 0.0, step_min_ms = 0.0;
  struct Stage {
    int64_t c, h, w;
  };
  for (const Stage s : {Stage{16, 28, 28}, Stage{32, 14, 14}, Stage{64, 7, 7}}) {
    const Shape shape{batch, s.c, s.h, s.w};
    const std::string name =
        std::to_string(s.c) + "x" + std::to_string(s.h) + "x" + std::to_string(s.w);
    const Tensor x = random_tensor(shape, rng, 0.5f), dy = random_tensor(shape, rng, 0.0f);
    Tensor y, dx, copy(shape);
    const double elems = static_cast<double>(x.numel());
    const Timing mc = time_op(reps, [&] {
      std::memcpy(copy.data(), x.data(), static_cast<size_t>(x.numel()) * sizeof(float));
    });
    const double memcpy_gbps = 8.0 * elems / (mc.min_ms * 1e-3) / 1e9;
    auto add = [&](const std::string& op, Timing t, double bytes_per_elem) {
      rows.push_back({op, name, t, bytes_per_elem * elems, memcpy_gbps});
    };
    add("memcpy", mc, 8.0);
    double stage_ms = 0.0, stage_min_ms = 0.0;
    for (bool relu : {false, true}) {
      auto bn =
          relu ? nn::BatchNorm::with_relu("bn", s.c) : std::make_unique<nn::BatchNorm>("bn", s.c);
      const std::string tag = relu ? "bn_relu" : "bn";
      const Timing f = time_op(reps, [&] { bn->forward(x, y, true); });
      const Timing b = time_op(reps, [&] { bn->backward(x, y, dy, &dx); });
      add(tag + "_fwd", f, 8.0);
      add(tag + "_bwd", b, 12.0);
      stage_ms += 3.0 * (f.median_ms + b.median_ms);
      stage_min_ms += 3.0 * (f.min_ms + b.min_ms);
      if (!relu) add("bn_eval", time_op(reps, [&] { bn->forward(x, y, false); }), 8.0);
      if (relu && s.c == 16) {  // the stem's BN+ReLU
        step_ms += f.median_ms + b.median_ms;
        step_min_ms += f.min_ms + b.min_ms;
      }
    }
    step_ms += stage_ms;
    step_min_ms += stage_min_ms;
    nn::ReLU relu("relu");
    add("relu_fwd", time_op(reps, [&] { relu.forward(x, y, true); }), 8.0);
    add("relu_bwd", time_op(reps, [&] { relu.backward(x, y, dy, &dx); }), 12.0);
  }

  std::printf(
      "# bench_bn: batch %lld, %d thread(s), median and min of %d runs; GB/s of the min at "
      "the nominal traffic (fwd 8, bwd 12 bytes per element)\n",
      static_cast<long long>(batch), threads, reps);
  std::printf("%-12s %-10s %10s %10s %8s %12s\n", "op", "shape", "median_ms", "min_ms", "GB/s",
              "memcpy_GB/s");
  for (const Row& r : rows)
    std::printf("%-12s %-10s %10.3f %10.3f %8.1f %12.1f\n", r.op.c_str(), r.shape.c_str(),
                r.t.median_ms, r.t.min_ms, r.gbps(), r.memcpy_gbps);
  std::printf("# resnet20 step, BN forward + backward: %.2f ms (medians), %.2f ms (minima)\n",
              step_ms, step_min_ms);
  std::printf("{\"bench\":\"bn\",\"threads\":%d,\"batch\":%lld,\"rows\":[", threads,
              static_cast<long long>(batch));
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::printf(
        "%s{\"op\":\"%s\",\"shape\":\"%s\",\"median_ms\":%.4f,\"min_ms\":%.4f,"
        "\"GBps\":%.2f,\"memcpy_GBps\":%.2f}",
        i ? "," : "", r.op.c_str(), r.shape.c_str(), r.t.median_ms, r.t.min_ms, r.gbps(),
        r.memcpy_gbps);
  }
  std::printf("],\"step_bn_ms\":%.3f,\"step_bn_min_ms\":%.3f}\n", step_ms, step_min_ms);
  return 0;
}
