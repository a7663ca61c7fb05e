// `int4ddp quantize`: the command-line view of the quantizer for people who study gradient
// quantization on their own tensors. Each step runs what the trainer runs per tensor:
//   gamma = policy gamma; quantize with key {seed, 0, step, 0}; dequantize; diagnostics;
//   policy.observe(stats)
// Outputs go to FILE.tmp.<pid> and are renamed into place only after the last step, so a failed run
// leaves nothing behind.
#include "src/quantize_tool.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/diagnostics.h"
#include "kernels/quant/policy.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "int4ddp quantize reads and writes little-endian float32 as host floats"
#endif

namespace int4ddp {
namespace {

namespace fs = std::filesystem;
using quant::QuantParams;
using quant::QuantStats;

constexpr const char* kCodesLayout =
    "Codes file layout (--codes), little-endian, one record per step, records back to back:\n"
    "  S float32 steps d (S = 1 with --block-size 0, else ceil(count / block-size)), then\n"
    "  the codes of the step's count elements: with --bits 4, ceil(count / 2) bytes, byte k "
    "holding\n"
    "  element 2k in its low nibble and 2k+1 in its high nibble (4-bit two's complement, an odd\n"
    "  tail leaves the last high nibble 0); other bit-widths one int8 per element.\n"
    "  Element i of a step dequantizes to code[i] * d[i / block-size] (d[0] with --block-size 0);\n"
    "  codes lie in -L..L, L = 2^(bits-1) - 1; NaN/Inf inputs have code 0.";

// One output file written to PATH.tmp.<pid> and renamed to PATH by commit(); removed otherwise.
class AtomicOutput {
 public:
  explicit AtomicOutput(std::string path)
      : path_(std::move(path)), tmp_(path_ + ".tmp." + std::to_string(::getpid())) {
    file_.open(tmp_, std::ios::binary | std::ios::trunc);
    if (!file_)
      INT4DDP_FAIL("cannot create '", tmp_, "' (for '", path_, "'): ", std::strerror(errno));
  }
  AtomicOutput(const AtomicOutput&) = delete;
  AtomicOutput& operator=(const AtomicOutput&) = delete;
  ~AtomicOutput() {
    if (committed_) return;
    file_.close();
    std::error_code ec;
    fs::remove(tmp_, ec);  // best effort: we are already failing
  }

  void write(const void* data, size_t nbytes) {
    file_.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
    if (!file_) INT4DDP_FAIL("writing '", tmp_, "' failed: ", std::strerror(errno));
  }

  // Closes the temporary file; check every output with this before renaming any.
  void close() {
    file_.close();
    if (!file_) INT4DDP_FAIL("closing '", tmp_, "' failed: ", std::strerror(errno));
  }

  void commit() {
    std::error_code ec;
    fs::rename(tmp_, path_, ec);
    if (ec) INT4DDP_FAIL("cannot rename '", tmp_, "' to '", path_, "': ", ec.message());
    committed_ = true;
  }

 private:
  std::string path_;
  std::string tmp_;
  std::ofstream file_;
  bool committed_ = false;
};

quant::Rounding parse_rounding(const std::string& s) {
  if (s == "nearest") return quant::Rounding::kNearest;
  if (s == "stochastic") return quant::Rounding::kStochastic;
  INT4DDP_FAIL("--rounding: unknown rounding '", s, "' (expected nearest or stochastic)");
}

// Checks the options that do not need the input file; returns the policy config.
quant::PolicyConfig policy_config(const QuantizeOptions& o) {
  INT4DDP_CHECK(quant::valid_bits(o.bits), "--bits = ", o.bits, " is outside ", quant::kMinBits,
                "..", quant::kMaxBits);
  quant::PolicyConfig cfg;
  try {
    cfg.kind = quant::parse_policy_kind(o.policy);
  } catch (const Error& e) {
    INT4DDP_FAIL("--policy: ", e.what());
  }
  INT4DDP_CHECK(cfg.kind != quant::PolicyKind::kTopK,
                "--policy topk is a per-block rule of the communication path (comm.grad_policy); "
                "use minmax, fixed, lbt, mse or dsgc");
  INT4DDP_CHECK(!o.gamma_given || cfg.kind == quant::PolicyKind::kFixed,
                "--gamma is only used by --policy fixed (the policy is ", o.policy, ")");
  INT4DDP_CHECK(std::isfinite(o.gamma) && o.gamma > 0.0f && o.gamma <= 1.0f, "--gamma = ", o.gamma,
                " is outside (0, 1]");
  INT4DDP_CHECK(std::isfinite(o.alpha) && o.alpha > 0.0 && o.alpha < 1.0, "--alpha = ", o.alpha,
                " is outside (0, 1)");
  INT4DDP_CHECK(o.block_size >= 0, "--block-size = ", o.block_size, " is negative");
  INT4DDP_CHECK(!o.count_given || o.count > 0, "--count = ", o.count, " must be positive");
  INT4DDP_CHECK(!o.input.empty(), "--input is empty");
  INT4DDP_CHECK(o.output.empty() || o.codes.empty() || o.output != o.codes,
                "--output and --codes name the same file '", o.output, "'");
  cfg.bits = o.bits;
  cfg.fixed_gamma = o.gamma;
  cfg.alpha = o.alpha;
  cfg.lbt_calibrate = o.calibrate;
  cfg.validate();
  return cfg;
}

// Elements in the input file; throws for a missing, empty or ragged file.
int64_t input_elements(const QuantizeOptions& o) {
  std::error_code ec;
  const fs::file_status st = fs::status(o.input, ec);
  INT4DDP_CHECK(!ec && fs::exists(st), "--input: file '", o.input, "' does not exist");
  INT4DDP_CHECK(fs::is_regular_file(st), "--input: '", o.input, "' is not a regular file");
  const uintmax_t nbytes = fs::file_size(o.input, ec);
  INT4DDP_CHECK(!ec, "--input: cannot read the size of '", o.input, "': ", ec.message());
  INT4DDP_CHECK(nbytes > 0, "--input: file '", o.input, "' is empty");
  INT4DDP_CHECK(nbytes % sizeof(float) == 0, "--input: file '", o.input, "' is ", nbytes,
                " bytes, not a multiple of 4 (raw float32)");
  const int64_t elements = static_cast<int64_t>(nbytes / sizeof(float));
  INT4DDP_CHECK(!o.count_given || elements % o.count == 0, "--input: file '", o.input, "' holds ",
                elements, " floats, not a multiple of --count ", o.count, " (", nbytes,
                " bytes is not a multiple of ", o.count * 4, ")");
  return elements;
}

std::string step_line(int64_t step, float gamma, const quant::TensorDiagnostics& d) {
  std::ostringstream os;
  os << std::setw(6) << step << "  " << std::fixed << std::setprecision(6) << gamma << "  "
     << std::scientific << std::setprecision(4) << d.clip_fraction << "  " << d.error << "  ";
  if (d.large > 0)
    os << d.error_large;
  else
    os << std::setw(10) << "n/a";
  os << "  " << std::setw(9) << d.nonfinite;
  return os.str();
}

}  // namespace

CLI::App* add_quantize_command(CLI::App& app, QuantizeOptions* opts) {
  CLI::App* sub = app.add_subcommand(
      "quantize",
      "Quantize raw float32 tensors with an interval policy, as the trainer quantizes a gradient "
      "each step, and report gamma, clip fraction R, E(G) and E(G_L) per step. The last output "
      "line is a JSON summary.");
  sub->add_option("--input,-i", opts->input,
                  "Raw little-endian float32 file: one tensor, or several of --count elements in a "
                  "row (one per step)")
      ->required();
  sub->add_option("--count,-n", opts->count,
                  "Elements per tensor (step); default: the whole file is one tensor");
  sub->add_option("--bits,-b", opts->bits, "Bit-width, 2..8")->capture_default_str();
  sub->add_option("--policy,-p", opts->policy, "Interval policy: minmax, fixed, lbt, mse, dsgc")
      ->capture_default_str();
  sub->add_option("--gamma", opts->gamma, "Clip gamma in (0, 1] for --policy fixed")
      ->capture_default_str();
  sub->add_option("--alpha", opts->alpha,
                  "Fraction of large gradients: lbt's target R = alpha / (2^bits - 1), and the "
                  "top-alpha set of E(G_L)")
      ->capture_default_str();
  sub->add_option("--rounding", opts->rounding, "nearest or stochastic")->capture_default_str();
  sub->add_option("--block-size", opts->block_size, "Elements per scale; 0 = one per tensor")
      ->capture_default_str();
  sub->add_option("--seed", opts->seed, "Stochastic rounding seed (Philox key {seed, 0, step, 0})")
      ->capture_default_str();
  sub->add_option("--output,-o", opts->output,
                  "Dequantized float32, the same length as the input (every tensor, the "
                  "calibration tensor included)");
  sub->add_option("--codes", opts->codes, "Packed codes and scales per step (layout below)");
  sub->add_flag("--calibrate,!--no-calibrate", opts->calibrate,
                "lbt: calibrate gamma on the first tensor (default), which is then quantized "
                "with the calibrated gamma like every later one; --no-calibrate starts at gamma 1");
  sub->add_flag("--fail-on-nonfinite", opts->fail_on_nonfinite,
                "Exit non-zero (writing nothing) if a tensor holds NaN or Inf; by default they "
                "are coded 0, counted and warned about");
  sub->footer(kCodesLayout);
  CLI::Option* count_opt = sub->get_option("--count");
  CLI::Option* gamma_opt = sub->get_option("--gamma");
  sub->parse_complete_callback([opts, count_opt, gamma_opt] {
    opts->count_given = count_opt->count() > 0;
    opts->gamma_given = gamma_opt->count() > 0;
  });
  return sub;
}

void run_quantize(const QuantizeOptions& opts, std::ostream& out, std::ostream& err) {
  const quant::PolicyConfig cfg = policy_config(opts);
  const quant::Rounding rounding = parse_rounding(opts.rounding);
  const int64_t elements = input_elements(opts);
  const int64_t count = opts.count_given ? opts.count : elements;
  const int64_t steps = elements / count;
  INT4DDP_CHECK(steps <= int64_t{std::numeric_limits<uint32_t>::max()}, "--input: ", steps,
                " steps do not fit the 32-bit step counter of the random key");

  std::ifstream in(opts.input, std::ios::binary);
  if (!in) INT4DDP_FAIL("--input: cannot open '", opts.input, "': ", std::strerror(errno));
  std::unique_ptr<AtomicOutput> output, codes_out;
  if (!opts.output.empty()) output = std::make_unique<AtomicOutput>(opts.output);
  if (!opts.codes.empty()) codes_out = std::make_unique<AtomicOutput>(opts.codes);

  std::unique_ptr<quant::IntervalPolicy> policy = quant::make_policy(cfg);
  quant::LargeGradientTracker tracker(cfg.alpha);
  // A block longer than the tensor is the whole tensor (one scale); clamped so that the codec's
  // block arithmetic (count + block_size - 1) cannot overflow.
  const int64_t block_size = std::min(opts.block_size, count);
  const int64_t nscales = quant::num_scales(count, block_size);
  std::vector<float> x(static_cast<size_t>(count)), xhat(static_cast<size_t>(count));
  std::vector<float> scales(static_cast<size_t>(nscales));
  std::vector<uint8_t> codes(static_cast<size_t>(quant::packed_bytes(opts.bits, count)));

  out << "int4ddp quantize: " << opts.input << ": " << steps << " step(s) of " << count
      << " floats, bits " << opts.bits << ", policy " << opts.policy << ", rounding "
      << opts.rounding << ", block size " << opts.block_size << "\n";
  out << "  step  gamma     R           E(G)        E(G_L)      nonfinite\n";

  nlohmann::json gammas = nlohmann::json::array();
  double sum_r = 0.0, sum_e = 0.0, sum_el = 0.0;
  int64_t steps_el = 0, nonfinite_total = 0, calibration_step = -1;
  for (int64_t step = 0; step < steps; ++step) {
    in.read(reinterpret_cast<char*>(x.data()), static_cast<std::streamsize>(count * 4));
    INT4DDP_CHECK(in.gcount() == count * 4, "--input: short read at step ", step, " of '",
                  opts.input, "' (did the file change?)");
    if (policy->needs_calibration()) {
      if (policy->calibrate(x.data(), count)) {
        calibration_step = step;
        out << "lbt calibrated on step " << step << ": gamma = " << policy->gamma() << "\n";
      } else {
        err << "int4ddp: warning: step " << step
            << ": cannot calibrate lbt on an all-zero or non-finite tensor; trying the next one\n";
      }
    }
    QuantParams p;
    p.bits = opts.bits;
    p.rounding = rounding;
    p.gamma = policy->gamma_for(x.data(), count);
    p.block_size = block_size;
    p.key = quant::RngKey{opts.seed, 0, static_cast<uint32_t>(step), 0};
    const QuantStats stats = quant::quantize(x.data(), count, p, codes.data(), scales.data());
    quant::dequantize(codes.data(), scales.data(), count, p.bits, p.block_size, xhat.data());
    const quant::TensorDiagnostics d =
        quant::diagnose(x.data(), xhat.data(), count, stats, tracker);
    policy->observe(stats);

    out << step_line(step, p.gamma, d) << "\n";
    if (stats.nonfinite > 0) {
      INT4DDP_CHECK(!opts.fail_on_nonfinite, "step ", step, ": ", stats.nonfinite,
                    " non-finite value(s) (NaN/Inf) in the input (--fail-on-nonfinite)");
      err << "int4ddp: warning: step " << step << ": " << stats.nonfinite
          << " non-finite value(s) (NaN/Inf) coded as 0 and left out of R, E(G), E(G_L)\n";
    }
    if (output) output->write(xhat.data(), xhat.size() * sizeof(float));
    if (codes_out) {
      codes_out->write(scales.data(), scales.size() * sizeof(float));
      codes_out->write(codes.data(), codes.size());
    }
    gammas.push_back(p.gamma);
    sum_r += d.clip_fraction;
    sum_e += d.error;
    if (d.large > 0) {
      sum_el += d.error_large;
      ++steps_el;
    }
    nonfinite_total += stats.nonfinite;
  }

  if (output) output->close();
  if (codes_out) codes_out->close();
  if (output) output->commit();
  if (codes_out) codes_out->commit();

  nlohmann::json summary;
  summary["bits"] = opts.bits;
  summary["policy"] = opts.policy;
  summary["rounding"] = opts.rounding;
  summary["block_size"] = opts.block_size;
  summary["alpha"] = opts.alpha;
  summary["steps"] = steps;
  summary["count"] = count;
  summary["gammas"] = gammas;
  summary["final_gamma"] = policy->gamma();
  summary["calibration_step"] = calibration_step >= 0 ? nlohmann::json(calibration_step) : nullptr;
  summary["mean_R"] = sum_r / static_cast<double>(steps);
  summary["mean_E"] = sum_e / static_cast<double>(steps);
  summary["mean_E_L"] = steps_el > 0 ? nlohmann::json(sum_el / static_cast<double>(steps_el))
                                     : nlohmann::json(nullptr);
  summary["nonfinite"] = nonfinite_total;
  out << summary.dump() << std::endl;
}

}  // namespace int4ddp
