// bench_train: training throughput (img/s), optimizer step included, for mlp, cnn, resnet20 and
// resnet18 in fp32 and 4/4/4, on the synthetic set (normalised) at batch 128 and 1x28x28 by
// default; --batch N and --input CxHxW change both (resnet18's stem follows the input: CIFAR-style
// up to 64x64, e.g. --input 3x32x32, ImageNet-style above, e.g. --input 3x224x224). One warm-up
// step (the 4/4/4 warm-up is also the lbt calibration batch, which updates no weights, as in
// training), then the best of --reps timed runs of --steps steps each. Every step's loss must be
// finite: a non-finite one ends the benchmark with exit status 1 (a speed of a diverged run means
// nothing).
// Each row also gives the process's CPU time per step (all threads; the rep with the least), which
// on a loaded machine tracks the work better than the wall clock does.
// Threads: --threads T runs only T (default: 1 and 2); it sets train.threads (the layers' loops
// over the batch, kernels/common/parallel.h). --bits 32 or 4 runs only fp32 or 4/4/4. Ends with one
// JSON line
// {"bench":"train","device":..,"rows":[{"model","bits","threads","img_per_s","cpu_ms_per_step",
// "batch","input"},
// ...]}.
// --profile also prints, per row, where a step's time goes (nn::profile: each layer type's forward
// and backward, the quantizer passes, loss, optimizer, exclusive wall-clock ms per step over all
// timed steps, and what no scope covers as "other") and adds it to the row's JSON as
// "profile_ms"; the timing scopes cost a clock read each, so take img/s from runs without it.
// --device cuda trains on the GPU (train.device = cuda: the CUDA layers, the device optimizer, the
// batch copied from page-locked memory on the compute stream, fp32 GEMMs with TF32 off); the loss
// is read back every step (as the trainer does) and the clock is read after the GPU is idle.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/common/parallel.h"
#include "src/core/device.h"
#include "src/data/dataset.h"
#include "src/nn/layers_cuda.h"
#include "src/nn/model.h"
#include "src/train/optim.h"

using namespace int4ddp;

namespace {

// "CxHxW" (e.g. 3x32x32) into c, h, w; false if it is not three positive integers.
bool parse_input_shape(const std::string& text, int* c, int* h, int* w) {
  char tail = 0;
  return std::sscanf(text.c_str(), "%dx%dx%d%c", c, h, w, &tail) == 3 && *c > 0 && *h > 0 && *w > 0;
}

// Synthetic examples to cycle through: 8 batches' worth, at most 256 MiB of images, at least one
// batch (a 3x224x224 set of 8 batches of 256 would take 1.2 GB).
int64_t synthetic_count(int64_t batch, int64_t image_numel) {
  constexpr int64_t kMaxImageBytes = int64_t{256} << 20;
  const int64_t fit = kMaxImageBytes / (image_numel * int64_t{sizeof(float)});
  return std::max(batch, std::min(batch * 8, fit));
}

// Prints the profile of `steps` timed steps of mean wall time step_s (seconds) as a table and
// returns it as the JSON fragment ,"profile_ms":{"key":ms per step,...,"other":...}.
std::string profile_table(int steps, double step_s) {
  std::string json = ",\"profile_ms\":{";
  double covered = 0.0;
  std::printf("#   %-32s %10s %7s\n", "profile (exclusive)", "ms/step", "share");
  auto line = [&](const std::string& key, double ms) {
    std::printf("#   %-32s %10.2f %6.1f%%\n", key.c_str(), ms, 100.0 * ms / (1e3 * step_s));
    char item[160];
    std::snprintf(item, sizeof item, "%s\"%s\":%.3f", json.back() == '{' ? "" : ",", key.c_str(),
                  ms);
    json += item;
  };
  for (const nn::profile::Entry& e : nn::profile::entries()) {
    line(e.key, 1e3 * e.seconds / steps);
    covered += e.seconds / steps;
  }
  line("other", 1e3 * (step_s - covered));
  return json + "}";
}

// CPU time of the whole process (every thread), seconds.
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

}  // namespace

int main(int argc, char** argv) try {
  int steps = 10, reps = 3;
  int64_t batch = 128;
  int channels = 1, height = 28, width = 28;
  std::vector<std::string> models = {"mlp", "cnn", "resnet20"};
  std::vector<int> thread_counts = {1, 2};
  std::vector<int> bit_widths = {32, 4};  // 32 = fp32, 4 = 4/4/4
  Device device = Device::kCpu;
  bool profile = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--profile")
      profile = true;
    else if (a == "--steps" && i + 1 < argc)
      steps = std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (a == "--model" && i + 1 < argc)
      models = {argv[++i]};
    else if (a == "--threads" && i + 1 < argc)
      thread_counts = {std::atoi(argv[++i])};
    else if (a == "--bits" && i + 1 < argc)
      bit_widths = {std::atoi(argv[++i])};
    else if (a == "--batch" && i + 1 < argc)
      batch = std::atoll(argv[++i]);
    else if (a == "--device" && i + 1 < argc) {
      const std::string d = argv[++i];
      if (d != "cpu" && d != "cuda") {
        std::fprintf(stderr, "bench_train: --device %s is not cpu or cuda\n", d.c_str());
        return 2;
      }
      device = d == "cuda" ? Device::kCuda : Device::kCpu;
    } else if (a == "--input" && i + 1 < argc) {
      if (!parse_input_shape(argv[++i], &channels, &height, &width)) {
        std::fprintf(stderr, "bench_train: --input %s is not CxHxW (e.g. 3x32x32)\n", argv[i]);
        return 2;
      }
    } else {
      std::fprintf(stderr,
                   "usage: bench_train [--steps N] [--reps R] [--model mlp|cnn|resnet20|resnet18] "
                   "[--threads T] [--bits 32|4] [--batch N] [--input CxHxW] [--device cpu|cuda] "
                   "[--profile]\n");
      return 2;
    }
  }
  if (steps < 1 || reps < 1 || thread_counts[0] < 1 || batch < 1 ||
      (bit_widths[0] != 32 && bit_widths[0] != 4)) {
    std::fprintf(stderr,
                 "bench_train: --steps, --reps, --threads and --batch must be >= 1, --bits 32 or "
                 "4\n");
    return 2;
  }
  if (device == Device::kCuda) {
    // The host threads only assemble batches here: one thread count, stated as 1.
    thread_counts = {1};
    std::printf("# device: %s\n", describe_gpu().c_str());  // throws naming the rank: no GPU
  }
  const double kLr = train::OptimConfig{}.lr;  // the schedule at its start
  data::SyntheticConfig sc;  // validates the input shape (channels 1..16, sides 8..1024)
  sc.channels = channels;
  sc.height = height;
  sc.width = width;
  sc.train_count = synthetic_count(batch, int64_t{channels} * height * width);
  sc.test_count = 1;
  data::Dataset ds = data::make_synthetic(sc, "train");
  data::normalize(ds, data::compute_channel_stats(ds));
  const std::string input =
      std::to_string(channels) + "x" + std::to_string(height) + "x" + std::to_string(width);
  std::printf("# bench_train: %s, batch %lld, %s, SGD step included, best of %d x %d steps\n",
              device_name(device), static_cast<long long>(batch), input.c_str(), reps, steps);
  std::printf("%-10s %-6s %8s %12s %12s %12s\n", "model", "bits", "threads", "ms/step", "img/s",
              "cpu ms/step");
  std::string json =
      std::string("{\"bench\":\"train\",\"device\":\"") + device_name(device) + "\",\"rows\":[";
  bool first = true;
  for (const std::string& name : models)
    for (int threads : thread_counts)
      for (int bits : bit_widths) {
        set_num_threads(threads);
        nn::ModelSpec spec;
        spec.name = name;
        spec.channels = channels;
        spec.height = height;
        spec.width = width;
        spec.quantized = bits != 32;
        spec.device = device;
        nn::Model model(spec, 1);
        train::Optimizer opt(train::OptimConfig{}, model.params(), model.values(), model.grads(),
                             model.num_params());
        Tensor x, logits, dl;
        if (device == Device::kCuda) {
          opt.bind_device(model.device_values(), model.device_grads());
          x.resize_pinned({batch, channels, height, width});  // asynchronous copies to the GPU
        } else {
          x.resize({batch, channels, height, width});
        }
        std::vector<int32_t> labels(batch);
        std::vector<int64_t> idx(batch);
        auto one_step = [&](int s) {
          {
            nn::profile::Scope scope("data");
            for (int64_t i = 0; i < batch; ++i) idx[i] = (s * batch + i) % ds.count;
            data::assemble_batch(ds, idx.data(), batch, data::AugmentConfig{}, 0, 0, x.data(),
                                 labels.data());
          }
          model.quant_context().step = static_cast<uint32_t>(s);
          const bool calibrating = model.needs_calibration();
          {
            nn::profile::Scope scope("zero_grad");
            model.zero_grad();
          }
          model.forward(x, logits, true);
          float loss;
          {
            nn::profile::Scope scope("loss");
            loss = nn::softmax_cross_entropy_any(logits, labels.data(), &dl, nullptr);
          }
          model.backward(dl);
          if (!std::isfinite(loss)) {
            std::fprintf(stderr, "bench_train: %s %s: step %d has a non-finite loss\n",
                         name.c_str(), bits == 32 ? "fp32" : "4/4/4", s);
            std::exit(1);
          }
          if (calibrating) {  // the calibration batch: no update, as the trainer does
            model.commit_quant_step(false);
            return;
          }
          nn::profile::Scope scope("optimizer");
          opt.step(kLr);
          model.commit_quant_step(true);
        };
        one_step(0);
        nn::profile::reset();
        nn::profile::enable(profile);
        double best = 1e30, total = 0.0, best_cpu = 1e30;
        for (int r = 0; r < reps; ++r) {
          const double c0 = process_cpu_seconds();
          const auto t0 = std::chrono::steady_clock::now();
          for (int s = 0; s < steps; ++s) one_step(1 + r * steps + s);
          if (device == Device::kCuda) synchronize_device();
          const double t =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          best = std::min(best, t);
          best_cpu = std::min(best_cpu, process_cpu_seconds() - c0);
          total += t;
        }
        nn::profile::enable(false);
        const double ips = steps * batch / best;
        const char* label = bits == 32 ? "fp32" : "4/4/4";
        std::printf("%-10s %-6s %8d %12.1f %12.1f %12.1f\n", name.c_str(), label, threads,
                    1e3 * best / steps, ips, 1e3 * best_cpu / steps);
        char row[256];
        std::snprintf(row, sizeof row,
                      "%s{\"model\":\"%s\",\"bits\":\"%s\",\"threads\":%d,\"img_per_s\":%.1f,"
                      "\"cpu_ms_per_step\":%.2f,"
                      "\"batch\":%lld,\"input\":\"%s\"",
                      first ? "" : ",", name.c_str(), label, threads, ips, 1e3 * best_cpu / steps,
                      static_cast<long long>(batch), input.c_str());
        json += row;
        if (profile) json += profile_table(steps * reps, total / (steps * reps));
        json += "}";
        first = false;
      }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
} catch (const Error& e) {  // a bad model name or input shape
  std::fprintf(stderr, "bench_train: %s\n", e.what());
  return 2;
}
