// bench_conv: the 3x3 stride-1 convolutions of resnet20 (1x28x28 inputs) at batch 128, one thread:
// (a) the current path of src/nn (grouped im2col + Eigen sgemm, dx of the transposed convolution
//     from an im2col of dy, dW from the same columns; Conv2d's own im2col, the GEMMs of math::)
//     beside
// (b) the direct kernels of kernels/math/conv3x3.h, called per chunk of --chunk samples (default
//     1, as a caller threading over samples would; dW summed over the chunks by one
//     Conv3x3WeightGrad, written out once).
// fp32 and 4-bit codes (the quantized layers: int_gemm against the exact direct kernels).
// Per layer and op: median ms over --reps timed runs (the two paths alternate, after one warm-up
// each), GFLOP/s of the median at the nominal 2 * n * k * c * 9 * h * w, and the minimum ms (on a
// shared machine the median is bimodal: a run that shares its core with another process takes
// twice as long). "max diff": largest |direct - gemm| relative to max |gemm| (0 on codes: both
// exact). Also an estimate of the convolution
// time of one resnet20 training step (stride-1 3x3 convs only: 1 x conv1 fwd + dW, 6 x 16-16 at
// 28x28, 5 x 32-32 at 14x14, 5 x 64-64 at 7x7, each fwd + dx + dW).
// Ends with one JSON line {"bench":"conv", "rows":[{"layer","mode","op","gemm_ms","direct_ms",
// "speedup","gemm_best_ms","direct_best_ms"}...], "step_gemm_ms_MODE", "step_direct_ms_MODE",
// "step_gemm_best_ms_MODE", "step_direct_best_ms_MODE"} with MODE fp32 / codes4 (step estimates
// from the medians and from the minima).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/conv3x3.h"
#include "kernels/math/gemm.h"
#include "src/nn/layer.h"

using namespace int4ddp;
using namespace int4ddp::math;

namespace {

// ---- the current path: src/nn's own im2col pieces (k = 3, stride 1, pad 1) -------------------

// nn::Conv2d's grouped im2col, column budget and group gather/scatter, exposed so that the GEMM
// path is timed op by op with the code the layer runs. For dy (the transposed convolution's
// columns) an instance over the output channels: at k = 3, pad 1 its im2col is Conv2d::dy_im2col.
class Im2col : public nn::Conv2d {
 public:
  explicit Im2col(int64_t channels) : Conv2d("bench", channels, 1, 3, 1, 1, false) {}
  using Conv2d::gather_group;
  using Conv2d::scatter_group;
  // col (channels*9, g*h*w) of samples s0..s0+g-1 of images (n, channels, h, w).
  void operator()(const float* images, int64_t s0, int64_t g, int64_t h, int64_t w,
                  float* col) const {
    im2col(images, s0, g, h, w, col);
  }
  // Samples per group under Conv2d's default column budget.
  int64_t group(int64_t n, int64_t rows, int64_t cols) const { return group_size(n, rows, cols); }
};

// The GEMM of the current path: sgemm (fp32) or int_gemm (codes, scale 1).
struct Gemm {
  bool codes;
  int qa, qb;
  void operator()(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) const {
    if (codes)
      int_gemm(ta, tb, m, n, k, a, lda, qa, b, ldb, qb, 1.0f, accumulate, c, ldc);
    else
      sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
  }
};

struct Layer {
  const char* name;
  int64_t c, k, h, w;
  int count;   // stride-1 convs of this shape in resnet20
  bool first;  // the input layer: no dx, dW from the im2col of x
};

struct Tensors {
  std::vector<float> x, w, y, dy, dx, dw;
};

// ---- timing -----------------------------------------------------------------------------------

// --cpu-time: the thread's CPU time instead of wall time (a loaded machine shares the core; CPU
// time leaves out the slices another process ran, though not its effect on the caches).
bool g_cpu_time = false;

double now() {
  if (g_cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Alternating runs of two functions after one warm-up each: medians and minima in ms.
struct PairTimes {
  double median_a, median_b, best_a, best_b;
};

PairTimes time_pair(int reps, const std::function<void()>& a, const std::function<void()>& b) {
  a();
  b();
  std::vector<double> ta, tb;
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    a();
    ta.push_back(now() - t0);
    t0 = now();
    b();
    tb.push_back(now() - t0);
  }
  return {1e3 * median(ta), 1e3 * median(tb), 1e3 * *std::min_element(ta.begin(), ta.end()),
          1e3 * *std::min_element(tb.begin(), tb.end())};
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) scale = std::max(scale, std::fabs(double(b[i])));
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return scale > 0 ? m / scale : m;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 11;
  int64_t batch = 128, chunk = 1;
  std::string modes = "both", only, algo_name = "auto";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (a == "--batch" && i + 1 < argc)
      batch = std::atoll(argv[++i]);
    else if (a == "--chunk" && i + 1 < argc)
      chunk = std::atoll(argv[++i]);
    else if (a == "--mode" && i + 1 < argc)
      modes = argv[++i];
    else if (a == "--layer" && i + 1 < argc)
      only = argv[++i];
    else if (a == "--algo" && i + 1 < argc)
      algo_name = argv[++i];
    else if (a == "--cpu-time")
      g_cpu_time = true;
    else {
      std::fprintf(stderr,
                   "usage: bench_conv [--reps R] [--batch N] [--chunk S] [--mode fp32|codes|both] "
                   "[--layer SUBSTRING] [--algo auto|spatial|channels] [--cpu-time]\n");
      return 2;
    }
  }
  Conv3x3Algo algo = Conv3x3Algo::kAuto;
  if (algo_name == "spatial")
    algo = Conv3x3Algo::kSpatial;
  else if (algo_name == "channels")
    algo = Conv3x3Algo::kChannels;
  else if (algo_name != "auto")
    reps = 0;  // rejected below
  if (reps < 1 || batch < 1 || chunk < 1 ||
      (modes != "fp32" && modes != "codes" && modes != "both")) {
    std::fprintf(stderr,
                 "bench_conv: --reps, --batch, --chunk must be >= 1; --mode fp32|codes|both\n");
    return 2;
  }
  // Every math:: GEMM runs on the calling thread (no Eigen threading): one thread throughout.
  const Layer layers[] = {{"conv1 1-16 28x28", 1, 16, 28, 28, 1, true},
                          {"16-16 28x28", 16, 16, 28, 28, 6, false},
                          {"32-32 14x14", 32, 32, 14, 14, 5, false},
                          {"64-64 7x7", 64, 64, 7, 7, 5, false}};
  std::printf(
      "# bench_conv: batch %lld, direct chunk %lld sample(s), 1 thread, median of %d, "
      "direct isa %s, %s time\n",
      static_cast<long long>(batch), static_cast<long long>(chunk), reps,
      conv3x3_isa_name(conv3x3_resolve(Conv3x3Isa::kAuto)), g_cpu_time ? "thread CPU" : "wall");
  std::printf("%-18s %-5s %-4s %10s %8s %10s %8s %8s %9s %9s %9s\n", "layer", "mode", "op",
              "gemm ms", "GFLOP/s", "direct ms", "GFLOP/s", "speedup", "gemm min", "dir. min",
              "max diff");
  std::string json = "{\"bench\":\"conv\",\"batch\":" + std::to_string(batch) +
                     ",\"chunk\":" + std::to_string(chunk) + ",\"rows\":[";
  bool first_row = true;
  std::vector<std::string> mode_list;
  if (modes != "codes") mode_list.push_back("fp32");
  if (modes != "fp32") mode_list.push_back("codes4");
  std::string step_json;
  for (const std::string& mode : mode_list) {
    const bool codes = mode == "codes4";
    const int qa = 15, qw = 7, qg = 7;  // 4-bit: unsigned activations, signed weights / grads
    double step_gemm = 0.0, step_direct = 0.0, step_gemm_best = 0.0, step_direct_best = 0.0;
    for (const Layer& L : layers) {
      if (!only.empty() && std::string(L.name).find(only) == std::string::npos) continue;
      const int64_t n = batch, c = L.c, k = L.k, h = L.h, w = L.w, hw = h * w;
      const int64_t ckk = c * 9, okk = k * 9;
      const Im2col im2col_x(c), im2col_dy(k);
      std::mt19937_64 rng(42);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      auto fill = [&](std::vector<float>& v, int64_t count, int q) {
        v.resize(static_cast<size_t>(count));
        for (float& f : v)
          f = q ? std::clamp(std::rint(nd(rng) * q / 3.0f), float(-q), float(q)) : nd(rng);
      };
      Tensors t;
      fill(t.x, n * c * hw, codes ? qa : 0);
      if (codes)
        for (float& f : t.x) f = std::fabs(f);  // unsigned activation grid
      fill(t.w, k * c * 9, codes ? qw : 0);
      fill(t.dy, n * k * hw, codes ? qg : 0);
      const double flops = 2.0 * n * k * c * 9 * hw;

      // (a) current path buffers
      std::vector<float> col, ybuf, dcol, inbuf, xbuf, wt(static_cast<size_t>(c * okk)),
          dwt(static_cast<size_t>(c * okk)), y_a(static_cast<size_t>(n * k * hw)),
          dx_a(static_cast<size_t>(n * c * hw)), dw_a(static_cast<size_t>(k * c * 9));
      for (int64_t o = 0; o < k; ++o)
        for (int64_t ch = 0; ch < c; ++ch)
          for (int t9 = 0; t9 < 9; ++t9)
            wt[static_cast<size_t>((ch * k + o) * 9 + (8 - t9))] = t.w[(o * c + ch) * 9 + t9];
      auto fwd_a = [&] {
        const int64_t g = im2col_x.group(n, ckk, hw);
        col.resize(static_cast<size_t>(ckk * g * hw));
        ybuf.resize(static_cast<size_t>(k * g * hw));
        for (int64_t s0 = 0; s0 < n; s0 += g) {
          const int64_t gs = std::min(g, n - s0), cols = gs * hw;
          im2col_x(t.x.data(), s0, gs, h, w, col.data());
          float* yg = gs == 1 ? y_a.data() + s0 * k * hw : ybuf.data();
          Gemm{codes, qw, qa}(Trans::kNo, Trans::kNo, k, cols, ckk, t.w.data(), ckk, col.data(),
                              cols, false, yg, cols);
          if (gs > 1) Im2col::scatter_group(yg, s0, gs, k, hw, y_a.data());
        }
      };
      // Backward of the current path, with_dx / with_dw selecting the products (they share the
      // im2col of dy). The first layer: dW from the im2col of x (no dx).
      auto bwd_a = [&](bool with_dx, bool with_dw) {
        if (L.first) {
          const int64_t g = im2col_x.group(n, ckk, hw);
          col.resize(static_cast<size_t>(ckk * g * hw));
          ybuf.resize(static_cast<size_t>(k * g * hw));
          std::fill(dw_a.begin(), dw_a.end(), 0.0f);
          for (int64_t s0 = 0; s0 < n; s0 += g) {
            const int64_t gs = std::min(g, n - s0), cols = gs * hw;
            im2col_x(t.x.data(), s0, gs, h, w, col.data());
            const float* dyg = t.dy.data() + s0 * k * hw;
            if (gs > 1) {
              Im2col::gather_group(t.dy.data(), s0, gs, k, hw, ybuf.data());
              dyg = ybuf.data();
            }
            Gemm{codes, qg, qa}(Trans::kNo, Trans::kYes, k, ckk, cols, dyg, cols, col.data(), cols,
                                true, dw_a.data(), ckk);
          }
          return;
        }
        const int64_t g = im2col_x.group(n, okk, hw);
        dcol.resize(static_cast<size_t>(okk * g * hw));
        inbuf.resize(static_cast<size_t>(c * g * hw));
        xbuf.resize(inbuf.size());
        std::fill(dwt.begin(), dwt.end(), 0.0f);
        for (int64_t s0 = 0; s0 < n; s0 += g) {
          const int64_t gs = std::min(g, n - s0), cols = gs * hw;
          im2col_dy(t.dy.data(), s0, gs, h, w, dcol.data());
          if (with_dw) {
            const float* xg = t.x.data() + s0 * c * hw;
            if (gs > 1) {
              Im2col::gather_group(t.x.data(), s0, gs, c, hw, xbuf.data());
              xg = xbuf.data();
            }
            Gemm{codes, qa, qg}(Trans::kNo, Trans::kYes, c, okk, cols, xg, cols, dcol.data(), cols,
                                true, dwt.data(), okk);
          }
          if (with_dx) {
            float* dxg = gs == 1 ? dx_a.data() + s0 * c * hw : inbuf.data();
            Gemm{codes, qw, qg}(Trans::kNo, Trans::kNo, c, cols, okk, wt.data(), okk, dcol.data(),
                                cols, false, dxg, cols);
            if (gs > 1) Im2col::scatter_group(dxg, s0, gs, c, hw, dx_a.data());
          }
        }
        if (with_dw)
          for (int64_t o = 0; o < k; ++o)
            for (int64_t ch = 0; ch < c; ++ch)
              for (int t9 = 0; t9 < 9; ++t9)
                dw_a[static_cast<size_t>((o * c + ch) * 9 + t9)] =
                    dwt[static_cast<size_t>((ch * k + o) * 9 + (8 - t9))];
      };

      // (b) direct
      Conv3x3Weights packed;
      Conv3x3Workspace ws;
      std::vector<float> y_b(y_a.size()), dx_b(dx_a.size()), dw_b(dw_a.size());
      Conv3x3Options fo, bo, wo;
      fo.algo = bo.algo = algo;
      if (codes) {
        fo.codes = {qa, qw};
        bo.codes = {qg, qw};
        wo.codes = {qa, qg};
      }
      auto fwd_b = [&] {
        packed.pack(t.w.data(), k, c);  // once per weight update: counted with the forward
        for (int64_t s0 = 0; s0 < n; s0 += chunk) {
          const Conv3x3Shape s{std::min(chunk, n - s0), c, k, h, w};
          conv3x3_forward(s, t.x.data() + s0 * c * hw, packed, y_b.data() + s0 * k * hw, fo, &ws);
        }
      };
      auto dx_b_fn = [&] {
        for (int64_t s0 = 0; s0 < n; s0 += chunk) {
          const Conv3x3Shape s{std::min(chunk, n - s0), c, k, h, w};
          conv3x3_backward_data(s, t.dy.data() + s0 * k * hw, packed, dx_b.data() + s0 * c * hw, bo,
                                &ws);
        }
      };
      Conv3x3WeightGrad wgrad;
      auto dw_b_fn = [&] {
        wgrad.reset(k, c, wo.codes);
        for (int64_t s0 = 0; s0 < n; s0 += chunk) {
          const Conv3x3Shape s{std::min(chunk, n - s0), c, k, h, w};
          wgrad.add(s, t.x.data() + s0 * c * hw, t.dy.data() + s0 * k * hw, &ws);
        }
        wgrad.finish(1.0f, false, dw_b.data());
      };

      struct OpRow {
        const char* op;
        std::function<void()> a, b;
        const std::vector<float>*ra, *rb;
        double flops;
      };
      std::vector<OpRow> ops;
      ops.push_back({"fwd", fwd_a, fwd_b, &y_a, &y_b, flops});
      if (!L.first)
        ops.push_back({"dx", [&] { bwd_a(true, false); }, dx_b_fn, &dx_a, &dx_b, flops});
      ops.push_back({"dW", [&] { bwd_a(false, true); }, dw_b_fn, &dw_a, &dw_b, flops});
      if (!L.first)
        ops.push_back({"bwd", [&] { bwd_a(true, true); },
                       [&] {
                         dx_b_fn();
                         dw_b_fn();
                       },
                       nullptr, nullptr, 2 * flops});
      double layer_a = 0.0, layer_b = 0.0, layer_a_best = 0.0, layer_b_best = 0.0;
      for (const OpRow& op : ops) {
        const PairTimes pt = time_pair(reps, op.a, op.b);
        const double ms_a = pt.median_a, ms_b = pt.median_b;
        const double diff = op.ra ? max_rel_diff(*op.rb, *op.ra) : 0.0;
        if (std::string(op.op) == "fwd" || std::string(op.op) == "bwd" ||
            (L.first && std::string(op.op) == "dW")) {
          layer_a += ms_a;
          layer_b += ms_b;
          layer_a_best += pt.best_a;
          layer_b_best += pt.best_b;
        }
        std::printf("%-18s %-5s %-4s %10.2f %8.1f %10.2f %8.1f %7.2fx %9.2f %9.2f %9.1e\n", L.name,
                    codes ? "int4" : "fp32", op.op, ms_a, op.flops / ms_a * 1e-6, ms_b,
                    op.flops / ms_b * 1e-6, ms_a / ms_b, pt.best_a, pt.best_b, diff);
        char row[256];
        std::snprintf(row, sizeof row,
                      "%s{\"layer\":\"%s\",\"mode\":\"%s\",\"op\":\"%s\",\"gemm_ms\":%.3f,"
                      "\"direct_ms\":%.3f,\"speedup\":%.3f,\"gemm_best_ms\":%.3f,"
                      "\"direct_best_ms\":%.3f}",
                      first_row ? "" : ",", L.name, mode.c_str(), op.op, ms_a, ms_b, ms_a / ms_b,
                      pt.best_a, pt.best_b);
        json += row;
        first_row = false;
      }
      step_gemm += L.count * layer_a;
      step_direct += L.count * layer_b;
      step_gemm_best += L.count * layer_a_best;
      step_direct_best += L.count * layer_b_best;
    }
    std::printf("%-18s %-5s %-4s %10.1f %8s %10.1f %8s %7.2fx %9.1f %9.1f\n", "resnet20 step est.",
                codes ? "int4" : "fp32", "all", step_gemm, "", step_direct, "",
                step_gemm / step_direct, step_gemm_best, step_direct_best);
    char s[300];
    std::snprintf(
        s, sizeof s,
        ",\"step_gemm_ms_%s\":%.2f,\"step_direct_ms_%s\":%.2f,\"step_gemm_best_ms_%s\":%.2f,"
        "\"step_direct_best_ms_%s\":%.2f",
        mode.c_str(), step_gemm, mode.c_str(), step_direct, mode.c_str(), step_gemm_best,
        mode.c_str(), step_direct_best);
    step_json += s;
  }
  json += "]" + step_json + "}";
  std::printf("%s\n", json.c_str());
  return 0;
}
