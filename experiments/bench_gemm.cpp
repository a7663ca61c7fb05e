// bench_gemm: the three training GEMMs of every quantized layer of resnet20 and cnn (src/nn/
// model.cpp; 1x28x28 inputs, --batch samples), one thread, as whole-batch GEMMs:
//   conv forward          M = batch * Ho * Wo, K = Cin * 9, N = Cout   (activations x weights)
//   conv backward-data    stride 1: M = batch * H * W, K = Cout * 9, N = Cin (the transposed
//                         convolution); stride 2: M = batch * Ho * Wo, K = Cout, N = Cin * 9
//   conv backward-weight  M = Cout, N = Cin * 9, K = batch * Ho * Wo     (gradients x activations)
//   linear                forward M = batch, K = in, N = out; backward-data M = batch, K = out,
//                         N = in; backward-weight M = out, N = in, K = batch
// Per GEMM, in the same run: Eigen's fp32 sgemm on random floats (math::sgemm), our exact fp32
// path on integer-valued float codes (math::int_gemm, what the quantized layers ran before
// igemm), and the int8 igemm on --bits codes for every ISA present. Median of --reps timed runs
// after one warm-up; rates at the nominal 2 * M * N * K (GFLOP/s for fp32, GOP/s for int8).
// Every igemm result is compared with int_gemm's bit for bit (exit 1 on a mismatch).
// Then the 3x3 stride-1 convolutions of the same layers as convolutions (forward, backward-data
// as the transposed convolution, backward-weight), whole batch, one thread, in the same run: our
// fp32 direct kernel (math::conv3x3_forward / conv3x3_backward_data on floats), the quantized
// layers' im2col path (igemm_pack_conv into panels + igemm_packed, groups of samples as QConv2d
// forms them; backward-data builds only the columns it reads; backward-weight packs the gathered x
// and dy's transposed columns) and the implicit-GEMM integer convolution (math::iconv3x3 per
// sample, iconv3x3_wgrad on the batch), which must equal the im2col path bit for bit. Ends with one
// JSON line {"bench":"gemm","bits","batch","isas":[...],"rows":[{"model","layer",
// "op","m","n","k","eigen_gflops","int_gemm_gflops","<isa>_gops"...}],"geomean_<isa>_vs_eigen",
// "geomean_<isa>_vs_int_gemm","iconv3x3_isa","conv":[{"model","layer","op","fp32_direct_gflops",
// "im2col_igemm_gops","iconv3x3_gops"}...]} (iconv3x3_isa: the kernel that ran, INT4DDP_ISA
// caps it: avx2 for the AVX2 one on a VNNI machine).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/math/conv3x3.h"
#include "kernels/math/gemm.h"
#include "kernels/math/iconv3x3.h"
#include "kernels/math/igemm.h"

using namespace int4ddp;
using namespace int4ddp::math;

namespace {

struct Gemm {
  std::string model, layer, op;
  int64_t m, n, k;
  Trans ta, tb;
  bool a_unsigned, b_unsigned;  // activation codes (0..2^b-1) on that side
};

void add_conv(std::vector<Gemm>* v, const std::string& model, const std::string& layer,
              int64_t batch, int64_t cin, int64_t cout, int64_t h, int stride) {
  const int64_t ho = (h + 2 - 3) / stride + 1, mo = batch * ho * ho;
  v->push_back({model, layer, "fwd", mo, cout, cin * 9, Trans::kNo, Trans::kYes, true, false});
  if (stride == 1)
    v->push_back({model, layer, "bwd_data", batch * h * h, cin, cout * 9, Trans::kNo, Trans::kNo,
                  false, false});
  else
    v->push_back(
        {model, layer, "bwd_data", mo, cin * 9, cout, Trans::kNo, Trans::kNo, false, false});
  v->push_back(
      {model, layer, "bwd_weight", cout, cin * 9, mo, Trans::kYes, Trans::kNo, false, true});
}

void add_linear(std::vector<Gemm>* v, const std::string& model, const std::string& layer,
                int64_t batch, int64_t in, int64_t out) {
  v->push_back({model, layer, "fwd", batch, out, in, Trans::kNo, Trans::kYes, true, false});
  v->push_back({model, layer, "bwd_data", batch, in, out, Trans::kNo, Trans::kNo, false, false});
  v->push_back({model, layer, "bwd_weight", out, in, batch, Trans::kYes, Trans::kNo, false, true});
}

// The quantized layers (first conv and last linear stay fp32), one entry per distinct shape.
std::vector<Gemm> training_gemms(int64_t batch) {
  std::vector<Gemm> v;
  add_conv(&v, "resnet20", "s1 16-16 28x28", batch, 16, 16, 28, 1);
  add_conv(&v, "resnet20", "s2 16-32 /2", batch, 16, 32, 28, 2);
  add_conv(&v, "resnet20", "s2 32-32 14x14", batch, 32, 32, 14, 1);
  add_conv(&v, "resnet20", "s3 32-64 /2", batch, 32, 64, 14, 2);
  add_conv(&v, "resnet20", "s3 64-64 7x7", batch, 64, 64, 7, 1);
  add_conv(&v, "cnn", "conv2 32-64 14x14", batch, 32, 64, 14, 1);
  add_linear(&v, "cnn", "fc1 3136-256", batch, 3136, 256);
  return v;
}

double median_seconds(int reps, const std::function<void()>& f) {
  f();  // warm-up (page faults, packing buffers)
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <typename T>
std::vector<T> random_codes(int64_t n, int lo, int hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<T> v(static_cast<size_t>(n));
  for (T& x : v) x = static_cast<T>(d(rng));
  return v;
}

struct Conv {
  std::string model, layer;
  int64_t cin, cout, h;
};

// Samples per group of QConv2d's im2col path (Conv2d::group_size with its 512 KiB budget).
int64_t conv_group(int64_t batch, int64_t rows, int64_t cols) {
  return std::clamp<int64_t>((int64_t{1} << 19) / (rows * cols * 4), 1, batch);
}

// One layer's forward and backward-data, three ways (see the header); returns the JSON rows and
// counts results of iconv3x3 that differ from the im2col path in *wrong.
std::string bench_conv(const Conv& cv, int64_t batch, int bits, int reps, int* wrong) {
  const int qa = (1 << bits) - 1, qs = (1 << (bits - 1)) - 1;
  const int64_t hw = cv.h * cv.h, ckk = cv.cin * 9, okk = cv.cout * 9;
  const double ops = 2.0 * static_cast<double>(batch * cv.cout * ckk * hw);
  const auto w8 = random_codes<int8_t>(cv.cout * ckk, -qs, qs, 3);
  const auto x8 = random_codes<uint8_t>(batch * cv.cin * hw, 0, qa, 4);
  const auto dy8 = random_codes<int8_t>(batch * cv.cout * hw, -qs, qs, 5);
  const std::vector<float> wf(w8.begin(), w8.end()), xf(x8.begin(), x8.end()),
      dyf(dy8.begin(), dy8.end());
  Conv3x3Weights w3(wf.data(), cv.cout, cv.cin);
  Conv3x3Options o;
  o.codes = {qa, qs};
  // The im2col path's weights: W (cout, ckk) forward, the flipped transpose (cin, okk) backward.
  std::vector<int8_t> wflip(w8.size());
  for (int64_t k = 0; k < cv.cout; ++k)
    for (int64_t c = 0; c < cv.cin; ++c)
      for (int t = 0; t < 9; ++t)
        wflip[static_cast<size_t>((c * cv.cout + k) * 9 + 8 - t)] =
            w8[static_cast<size_t>((k * cv.cin + c) * 9 + t)];
  const IgemmIsa isa = IgemmIsa::kAvx2;
  IgemmPackedA wa_fwd, wa_bwd;
  wa_fwd.pack(isa, cv.cout, ckk, codes_s8(w8.data(), ckk, qs));
  wa_bwd.pack(isa, cv.cin, okk, codes_s8(wflip.data(), okk, qs));
  Iconv3x3Weights wi_fwd, wi_bwd;
  wi_fwd.pack(w8.data(), cv.cout, cv.cin, qs);
  wi_bwd.pack_transposed(w8.data(), cv.cout, cv.cin, qs);
  const ConvColumns x_geo{cv.cin, cv.h, cv.h, 3, 1, 1, cv.h, cv.h};
  const ConvColumns dy_geo{cv.cout, cv.h, cv.h, 3, 1, 1, cv.h, cv.h};
  std::string rows;
  auto report = [&](const char* op, double t_f, double t_old, double t_new) {
    std::printf("%-9s %-18s %-10s | %10.1f %10.1f %10.1f %6.2f %6.2f\n", cv.model.c_str(),
                cv.layer.c_str(), op, ops / t_f * 1e-9, ops / t_old * 1e-9, ops / t_new * 1e-9,
                t_old / t_new, t_f / t_new);
    std::fflush(stdout);
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "%s{\"model\":\"%s\",\"layer\":\"%s\",\"op\":\"%s\",\"fp32_direct_gflops\":%.2f,"
                  "\"im2col_igemm_gops\":%.2f,\"iconv3x3_gops\":%.2f}",
                  rows.empty() ? "" : ",", cv.model.c_str(), cv.layer.c_str(), op, ops / t_f * 1e-9,
                  ops / t_old * 1e-9, ops / t_new * 1e-9);
    rows += buf;
  };
  for (bool fwd : {true, false}) {
    const int64_t cin = fwd ? cv.cin : cv.cout, cout = fwd ? cv.cout : cv.cin;
    const int64_t g = conv_group(batch, fwd ? ckk : okk, hw);
    std::vector<float> y_old(static_cast<size_t>(batch * cout * hw)), y_new(y_old.size()),
        y_f(y_old.size());
    const Conv3x3Shape sh{batch, cv.cin, cv.cout, cv.h, cv.h};
    const double t_f = median_seconds(reps, [&] {
      if (fwd)
        conv3x3_forward(sh, xf.data(), w3, y_f.data(), o);
      else
        conv3x3_backward_data(sh, dyf.data(), w3, y_f.data(), o);
    });
    const double t_old = median_seconds(reps, [&] {
      IgemmPackedB panels;
      for (int64_t s0 = 0; s0 < batch; s0 += g) {
        const int64_t gs = std::min(g, batch - s0);
        if (fwd)
          igemm_pack_conv(isa, x_geo, x8.data(), true, qa, s0, gs, &panels, nullptr);
        else
          igemm_pack_conv(isa, dy_geo, dy8.data(), false, qs, s0, gs, &panels, nullptr);
        igemm_packed(fwd ? wa_fwd : wa_bwd, panels, 0.5f, false, y_old.data() + s0 * cout * hw,
                     gs * hw);
      }
    });
    const double t_new = median_seconds(reps, [&] {
      for (int64_t s = 0; s < batch; ++s) {
        if (fwd)
          iconv3x3(wi_fwd, cv.h, cv.h, x8.data() + s * cin * hw, false, qa, 0.5f,
                   y_new.data() + s * cout * hw, hw);
        else
          iconv3x3(wi_bwd, cv.h, cv.h, dy8.data() + s * cin * hw, true, qs, 0.5f,
                   y_new.data() + s * cout * hw, hw);
      }
    });
    // The im2col path's groups are (cout, gs * hw): sample s of group s0 at column (s - s0) * hw.
    for (int64_t s = 0; s < batch; ++s) {
      const int64_t s0 = s / g * g, gs = std::min(g, batch - s0);
      for (int64_t c = 0; c < cout; ++c)
        if (std::memcmp(y_new.data() + (s * cout + c) * hw,
                        y_old.data() + s0 * cout * hw + c * gs * hw + (s - s0) * hw,
                        sizeof(float) * static_cast<size_t>(hw)) != 0)
          ++*wrong;
    }
    report(fwd ? "fwd" : "bwd_data", t_f, t_old, t_new);
  }
  // Backward-weight: fp32 direct; the im2col path as QConv2d ran it (x's group gathered and
  // packed, dy's transposed columns, igemm_packed, summed as doubles); iconv3x3_wgrad's sums.
  {
    const int64_t g = conv_group(batch, okk, hw);
    std::vector<float> dw_f(static_cast<size_t>(cv.cout * ckk)), dwg(dw_f.size());
    std::vector<double> dw_old(dw_f.size()), dw_new(dw_f.size());
    std::vector<uint8_t> xg(static_cast<size_t>(cv.cin * g * hw));
    const Conv3x3Shape sh{batch, cv.cin, cv.cout, cv.h, cv.h};
    const double t_f = median_seconds(
        reps, [&] { conv3x3_backward_weight(sh, xf.data(), dyf.data(), dw_f.data(), o); });
    const double t_old = median_seconds(reps, [&] {
      std::fill(dw_old.begin(), dw_old.end(), 0.0);
      IgemmPackedB cols_t;
      IgemmPackedA xa;
      for (int64_t s0 = 0; s0 < batch; s0 += g) {
        const int64_t gs = std::min(g, batch - s0), icols = gs * hw;
        for (int64_t s = 0; s < gs; ++s)
          for (int64_t c = 0; c < cv.cin; ++c)
            std::memcpy(xg.data() + c * icols + s * hw, x8.data() + ((s0 + s) * cv.cin + c) * hw,
                        static_cast<size_t>(hw));
        igemm_pack_conv(isa, dy_geo, dy8.data(), false, qs, s0, gs, nullptr, &cols_t);
        xa.pack(isa, cv.cin, icols, codes_u8(xg.data(), icols, qa));
        igemm_packed(xa, cols_t, 1.0f, false, dwg.data(), okk);
        for (size_t i = 0; i < dwg.size(); ++i) dw_old[i] += dwg[i];
      }
    });
    const double t_new = median_seconds(reps, [&] {
      std::fill(dw_new.begin(), dw_new.end(), 0.0);
      iconv3x3_wgrad(cv.cin, cv.cout, cv.h, cv.h, batch, x8.data(), false, qa, dy8.data(), qs,
                     /*transposed=*/true, dw_new.data());
    });
    if (dw_old != dw_new) ++*wrong;
    report("bwd_weight", t_f, t_old, t_new);
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  int bits = 4, reps = 3;
  int64_t batch = 128;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key == "--bits")
      bits = std::atoi(argv[i + 1]);
    else if (key == "--reps")
      reps = std::atoi(argv[i + 1]);
    else if (key == "--batch")
      batch = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "bench_gemm: unknown option %s (use --bits N --reps N --batch N)\n",
                   key.c_str());
      return 2;
    }
  }
  if (bits < 2 || bits > 8 || reps < 1 || batch < 1) {
    std::fprintf(stderr, "bench_gemm: --bits must be 2..8, --reps and --batch >= 1\n");
    return 2;
  }
  std::vector<IgemmIsa> isas;
  for (IgemmIsa isa : kIgemmIsas)
    if (isa != IgemmIsa::kRef && igemm_isa_available(isa)) isas.push_back(isa);
  const int qa = (1 << bits) - 1, qs = (1 << (bits - 1)) - 1;
  std::printf(
      "bench_gemm: batch %lld, %d-bit codes (activations 0..%d, weights/grads -%d..%d), "
      "one thread, median of %d\n",
      static_cast<long long>(batch), bits, qa, qs, qs, reps);
  std::printf("%-9s %-18s %-10s %7s %5s %7s | %8s %8s", "model", "layer", "op", "M", "N", "K",
              "eigen", "int_gemm");
  for (IgemmIsa isa : isas) std::printf(" %10s x_eig", igemm_isa_name(isa));
  std::printf("   (GFLOP/s fp32, GOP/s int8)\n");
  std::string rows;
  std::map<IgemmIsa, double> log_vs_eigen, log_vs_int;
  int count = 0, wrong = 0;
  for (const Gemm& g : training_gemms(batch)) {
    const int64_t ar = g.ta == Trans::kNo ? g.m : g.k, ac = g.ta == Trans::kNo ? g.k : g.m;
    const int64_t br = g.tb == Trans::kNo ? g.k : g.n, bc = g.tb == Trans::kNo ? g.n : g.k;
    const int qmax_a = g.a_unsigned ? qa : qs, qmax_b = g.b_unsigned ? qa : qs;
    auto a8 = random_codes<int>(ar * ac, g.a_unsigned ? 0 : -qs, qmax_a, 1);
    auto b8 = random_codes<int>(br * bc, g.b_unsigned ? 0 : -qs, qmax_b, 2);
    std::vector<float> af(a8.begin(), a8.end()), bf(b8.begin(), b8.end());
    std::vector<int8_t> as(a8.begin(), a8.end()), bs(b8.begin(), b8.end());
    std::vector<uint8_t> au(a8.begin(), a8.end()), bu(b8.begin(), b8.end());
    const CodeMatrix am = g.a_unsigned ? codes_u8(au.data(), ac, qmax_a, g.ta)
                                       : codes_s8(as.data(), ac, qmax_a, g.ta);
    const CodeMatrix bm = g.b_unsigned ? codes_u8(bu.data(), bc, qmax_b, g.tb)
                                       : codes_s8(bs.data(), bc, qmax_b, g.tb);
    std::vector<float> c_ref(static_cast<size_t>(g.m * g.n)), c(c_ref.size());
    const double ops = 2.0 * static_cast<double>(g.m) * static_cast<double>(g.n) * g.k;
    const double t_eigen = median_seconds(reps, [&] {
      sgemm(g.ta, g.tb, g.m, g.n, g.k, 1.0f, af.data(), ac, bf.data(), bc, 0.0f, c.data(), g.n);
    });
    const double t_int = median_seconds(reps, [&] {
      int_gemm(g.ta, g.tb, g.m, g.n, g.k, af.data(), ac, qmax_a, bf.data(), bc, qmax_b, 0.5f, false,
               c_ref.data(), g.n);
    });
    std::printf("%-9s %-18s %-10s %7lld %5lld %7lld | %8.1f %8.1f", g.model.c_str(),
                g.layer.c_str(), g.op.c_str(), static_cast<long long>(g.m),
                static_cast<long long>(g.n), static_cast<long long>(g.k), ops / t_eigen * 1e-9,
                ops / t_int * 1e-9);
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "%s{\"model\":\"%s\",\"layer\":\"%s\",\"op\":\"%s\",\"m\":%lld,\"n\":%lld,"
                  "\"k\":%lld,\"eigen_gflops\":%.2f,\"int_gemm_gflops\":%.2f",
                  rows.empty() ? "" : ",", g.model.c_str(), g.layer.c_str(), g.op.c_str(),
                  static_cast<long long>(g.m), static_cast<long long>(g.n),
                  static_cast<long long>(g.k), ops / t_eigen * 1e-9, ops / t_int * 1e-9);
    rows += buf;
    for (IgemmIsa isa : isas) {
      const double t = median_seconds(
          reps, [&] { igemm(g.m, g.n, g.k, am, bm, 0.5f, false, c.data(), g.n, isa); });
      if (std::memcmp(c.data(), c_ref.data(), c.size() * sizeof(float)) != 0) ++wrong;
      std::printf(" %10.1f %5.2f", ops / t * 1e-9, t_eigen / t);
      std::snprintf(buf, sizeof buf, ",\"%s_gops\":%.2f", igemm_isa_name(isa), ops / t * 1e-9);
      rows += buf;
      log_vs_eigen[isa] += std::log(t_eigen / t);
      log_vs_int[isa] += std::log(t_int / t);
    }
    rows += "}";
    ++count;
    std::printf("\n");
    std::fflush(stdout);
  }
  std::string isa_list, geo;
  for (IgemmIsa isa : isas) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s\"%s\"", isa_list.empty() ? "" : ",", igemm_isa_name(isa));
    isa_list += buf;
    const double ge = std::exp(log_vs_eigen[isa] / count), gi = std::exp(log_vs_int[isa] / count);
    std::printf("geomean speedup of %s: %.2fx vs Eigen sgemm, %.2fx vs int_gemm\n",
                igemm_isa_name(isa), ge, gi);
    std::snprintf(buf, sizeof buf, ",\"geomean_%s_vs_eigen\":%.3f,\"geomean_%s_vs_int_gemm\":%.3f",
                  igemm_isa_name(isa), ge, igemm_isa_name(isa), gi);
    geo += buf;
  }
  if (wrong) std::printf("WRONG: %d igemm results differ from int_gemm\n", wrong);
  std::string conv_rows;
  const bool have_iconv = igemm_isa_available(IgemmIsa::kAvx2) && [&] {
    Iconv3x3Weights probe;
    const int8_t w1[9] = {};
    probe.pack(w1, 1, 1, (1 << (bits - 1)) - 1);
    return iconv3x3_supports(probe, (1 << bits) - 1, false) &&
           iconv3x3_supports(probe, (1 << (bits - 1)) - 1, true);
  }();
  const char* iconv_isa = iconv3x3_isa_name(iconv3x3_resolve(Iconv3x3Isa::kAuto));
  if (have_iconv) {
    std::printf(
        "\n3x3 stride-1 convolutions, batch %lld, one thread (GFLOP/s fp32, GOP/s int8); "
        "iconv3x3 on %s (INT4DDP_ISA=avx2 for the AVX2 kernel)\n",
        static_cast<long long>(batch), iconv_isa);
    std::printf("%-9s %-18s %-10s | %10s %10s %10s %6s %6s\n", "model", "layer", "op", "fp32_dir",
                "im2col+ig", "iconv3x3", "x_old", "x_fp32");
    const Conv convs[] = {{"resnet20", "s1 16-16 28x28", 16, 16, 28},
                          {"resnet20", "s2 32-32 14x14", 32, 32, 14},
                          {"resnet20", "s3 64-64 7x7", 64, 64, 7},
                          {"cnn", "conv2 32-64 14x14", 32, 64, 14}};
    int conv_wrong = 0;
    for (const Conv& cv : convs) {
      const std::string r = bench_conv(cv, batch, bits, reps, &conv_wrong);
      conv_rows += (conv_rows.empty() ? "" : ",") + r;
    }
    if (conv_wrong)
      std::printf("WRONG: %d iconv3x3 planes differ from the im2col path\n", conv_wrong);
    wrong += conv_wrong;
  } else {
    std::printf(
        "iconv3x3: not available here (no AVX2, INT4DDP_ISA, or %d-bit sums saturate the AVX2 "
        "kernel's int16 pairs without AVX512-VNNI)\n",
        bits);
  }
  std::printf(
      "{\"bench\":\"gemm\",\"bits\":%d,\"batch\":%lld,\"isas\":[%s],\"wrong\":%d,\"rows\":[%s]%s,"
      "\"iconv3x3_isa\":\"%s\",\"conv\":[%s]}\n",
      bits, static_cast<long long>(batch), isa_list.c_str(), wrong, rows.c_str(), geo.c_str(),
      have_iconv ? iconv_isa : "none", conv_rows.c_str());
  return wrong ? 1 : 0;
}
