// `int4ddp quantize` end to end: runs the binary (INT4DDP_BIN) on files in a temporary directory
// and checks its outputs against the library called directly, its JSON line, and that every bad
// input fails with a message naming the problem and leaves no file behind.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/quant/codec.h"
#include "kernels/quant/diagnostics.h"
#include "kernels/quant/policy.h"

namespace int4ddp {
namespace {

namespace fs = std::filesystem;
using quant::QuantParams;

struct RunResult {
  int code = -1;
  std::string out;
  std::string err;
  std::string last_line;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

std::vector<float> read_floats(const fs::path& p) {
  const std::string bytes = slurp(p);
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

void write_bytes(const fs::path& p, const void* data, size_t nbytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
}

void write_floats(const fs::path& p, const std::vector<float>& v) {
  write_bytes(p, v.data(), v.size() * sizeof(float));
}

std::vector<float> laplace(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::exponential_distribution<float> expo(1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = (rng() & 1) ? expo(rng) : -expo(rng);
  return v;
}

class QuantizeTool : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "int4ddp_qt_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    work_ = root_ / "work";
    fs::create_directory(work_);
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string path(const std::string& name) const { return (work_ / name).string(); }

  RunResult run(const std::string& args) const {
    const fs::path out = root_ / "stdout.txt", err = root_ / "stderr.txt";
    const std::string cmd = std::string(INT4DDP_BIN) + " " + args + " >" + out.string() + " 2>" +
                            err.string() + " </dev/null";
    const int status = std::system(cmd.c_str());
    RunResult r;
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.out = slurp(out);
    r.err = slurp(err);
    std::istringstream lines(r.out);
    for (std::string line; std::getline(lines, line);)
      if (!line.empty()) r.last_line = line;
    return r;
  }

  std::set<std::string> work_files() const {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(work_)) names.insert(e.path().filename().string());
    return names;
  }

  fs::path root_, work_;
};

// The library's answer for one tensor: dequantize(quantize(x)) plus the codes file record.
struct Expected {
  std::vector<float> xhat;
  std::vector<uint8_t> record;  // scales then codes
  quant::QuantStats stats;
};

Expected library_step(const std::vector<float>& x, const QuantParams& p) {
  const int64_t n = static_cast<int64_t>(x.size());
  Expected e;
  std::vector<float> scales(static_cast<size_t>(quant::num_scales(n, p.block_size)));
  std::vector<uint8_t> codes(static_cast<size_t>(quant::packed_bytes(p.bits, n)));
  e.stats = quant::quantize_ref(x.data(), n, p, codes.data(), scales.data());
  e.xhat.resize(x.size());
  quant::dequantize_ref(codes.data(), scales.data(), n, p.bits, p.block_size, e.xhat.data());
  const auto* sb = reinterpret_cast<const uint8_t*>(scales.data());
  e.record.assign(sb, sb + scales.size() * sizeof(float));
  e.record.insert(e.record.end(), codes.begin(), codes.end());
  return e;
}

void expect_same_floats(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0)
        << "element " << i << ": " << got[i] << " vs " << want[i];
}

TEST_F(QuantizeTool, MinMaxNearestEqualsTheLibrary) {
  const std::vector<float> x = laplace(1001, 1);  // odd: the last INT4 byte is half used
  write_floats(path("in.f32"), x);
  const RunResult r =
      run("quantize --input " + path("in.f32") + " --output " + path("out.f32") + " --codes " +
          path("codes.bin") + " --policy minmax --rounding nearest --bits 4");
  ASSERT_EQ(r.code, 0) << r.err;
  QuantParams p;
  p.gamma = 1.0f;
  const Expected e = library_step(x, p);
  expect_same_floats(read_floats(path("out.f32")), e.xhat);
  const std::string codes = slurp(path("codes.bin"));
  ASSERT_EQ(codes.size(), e.record.size());
  EXPECT_EQ(std::memcmp(codes.data(), e.record.data(), codes.size()), 0);

  const nlohmann::json j = nlohmann::json::parse(r.last_line);
  for (const char* key : {"bits", "policy", "steps", "count", "gammas", "final_gamma", "mean_R",
                          "mean_E", "mean_E_L", "nonfinite"})
    EXPECT_TRUE(j.contains(key)) << key << " missing from " << r.last_line;
  EXPECT_EQ(j["bits"], 4);
  EXPECT_EQ(j["policy"], "minmax");
  EXPECT_EQ(j["steps"], 1);
  EXPECT_EQ(j["count"], 1001);
  EXPECT_EQ(j["gammas"], nlohmann::json::array({1.0}));
  EXPECT_EQ(j["final_gamma"], 1.0);
  EXPECT_EQ(j["mean_R"], 0.0);  // gamma 1 clips nothing
  EXPECT_EQ(j["nonfinite"], 0);
  // E(G) from the library's figures for the same tensor.
  const quant::QuantError qe = quant::quantization_error(x.data(), e.xhat.data(), 1001, 1.0f);
  EXPECT_NEAR(j["mean_E"].get<double>(), qe.error, 1e-12);
  EXPECT_EQ(work_files(), (std::set<std::string>{"in.f32", "out.f32", "codes.bin"}));
}

TEST_F(QuantizeTool, MultiStepLbtEqualsTheLibraryLoop) {
  constexpr int64_t kCount = 3000, kSteps = 6;
  std::vector<float> x = laplace(kCount * kSteps, 2);
  write_floats(path("in.f32"), x);
  const RunResult r = run("quantize -i " + path("in.f32") + " -o " + path("out.f32") + " --codes " +
                          path("codes.bin") + " --count 3000 --seed 77 --block-size 512");
  ASSERT_EQ(r.code, 0) << r.err;

  // The same loop, by hand: calibrate on step 0, quantize every step (step 0 too), observe.
  quant::PolicyConfig cfg;  // lbt, 4 bits, alpha 1e-3
  auto policy = quant::make_policy(cfg);
  std::vector<float> want;
  std::vector<uint8_t> want_codes;
  std::vector<float> gammas;
  for (int64_t s = 0; s < kSteps; ++s) {
    const std::vector<float> t(x.begin() + s * kCount, x.begin() + (s + 1) * kCount);
    if (policy->needs_calibration()) {
      ASSERT_TRUE(policy->calibrate(t.data(), kCount));
    }
    QuantParams p;
    p.rounding = quant::Rounding::kStochastic;
    p.gamma = policy->gamma_for(t.data(), kCount);
    p.block_size = 512;
    p.key = quant::RngKey{77, 0, static_cast<uint32_t>(s), 0};
    const Expected e = library_step(t, p);
    policy->observe(e.stats);
    gammas.push_back(p.gamma);
    want.insert(want.end(), e.xhat.begin(), e.xhat.end());
    want_codes.insert(want_codes.end(), e.record.begin(), e.record.end());
  }
  expect_same_floats(read_floats(path("out.f32")), want);
  const std::string codes = slurp(path("codes.bin"));
  ASSERT_EQ(codes.size(), want_codes.size());
  EXPECT_EQ(std::memcmp(codes.data(), want_codes.data(), codes.size()), 0);

  const nlohmann::json j = nlohmann::json::parse(r.last_line);
  EXPECT_EQ(j["steps"], kSteps);
  EXPECT_EQ(j["count"], kCount);
  EXPECT_EQ(j["policy"], "lbt");
  EXPECT_EQ(j["calibration_step"], 0);
  ASSERT_EQ(j["gammas"].size(), static_cast<size_t>(kSteps));
  for (int64_t s = 0; s < kSteps; ++s)
    EXPECT_EQ(j["gammas"][s].get<float>(), gammas[s]) << "step " << s;
  EXPECT_EQ(j["final_gamma"].get<float>(), policy->gamma());
  EXPECT_LT(gammas[0], 1.0f) << "calibration moved gamma";
  EXPECT_GT(j["mean_R"].get<double>(), 0.0);
  EXPECT_GT(j["mean_E_L"].get<double>(), j["mean_E"].get<double>());
  // One table line per step before the JSON.
  for (int64_t s = 0; s < kSteps; ++s)
    EXPECT_NE(r.out.find("\n     " + std::to_string(s) + "  "), std::string::npos) << r.out;
}

TEST_F(QuantizeTool, EveryPolicyRuns) {
  write_floats(path("in.f32"), laplace(4000, 3));
  for (const char* policy : {"minmax", "fixed", "lbt", "mse", "dsgc"}) {
    const RunResult r =
        run("quantize --input " + path("in.f32") + " --count 1000 --bits 3 --policy " + policy +
            " --output " + path("out.f32"));
    ASSERT_EQ(r.code, 0) << policy << ": " << r.err;
    const nlohmann::json j = nlohmann::json::parse(r.last_line);
    EXPECT_EQ(j["policy"], policy);
    EXPECT_EQ(j["bits"], 3);
    EXPECT_EQ(j["steps"], 4);
    EXPECT_EQ(fs::file_size(path("out.f32")), 16000u);
  }
  const RunResult fixed =
      run("quantize --input " + path("in.f32") + " --policy fixed --gamma 0.6 --no-calibrate");
  ASSERT_EQ(fixed.code, 0) << fixed.err;
  EXPECT_EQ(nlohmann::json::parse(fixed.last_line)["gammas"][0].get<float>(), 0.6f);
  const RunResult nocal = run("quantize --input " + path("in.f32") + " --no-calibrate");
  ASSERT_EQ(nocal.code, 0) << nocal.err;
  const nlohmann::json j = nlohmann::json::parse(nocal.last_line);
  EXPECT_EQ(j["gammas"][0], 1.0);
  EXPECT_TRUE(j["calibration_step"].is_null());
}

TEST_F(QuantizeTool, NonFiniteIsCountedAndWarnedOrFatal) {
  std::vector<float> x = laplace(2000, 4);
  x[1500] = std::numeric_limits<float>::quiet_NaN();
  x[1501] = -std::numeric_limits<float>::infinity();
  write_floats(path("in.f32"), x);
  const RunResult r = run("quantize --input " + path("in.f32") + " --count 1000 --output " +
                          path("out.f32") + " --policy minmax");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("step 1: 2 non-finite"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("step 0"), std::string::npos) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.last_line)["nonfinite"], 2);
  const std::vector<float> out = read_floats(path("out.f32"));
  ASSERT_EQ(out.size(), x.size());
  EXPECT_EQ(out[1500], 0.0f);  // coded 0, never a NaN passed on
  EXPECT_EQ(out[1501], 0.0f);

  fs::remove(path("out.f32"));
  const RunResult f =
      run("quantize --input " + path("in.f32") + " --count 1000 --output " + path("out.f32") +
          " --codes " + path("codes.bin") + " --fail-on-nonfinite");
  EXPECT_NE(f.code, 0);
  EXPECT_NE(f.err.find("int4ddp: error:"), std::string::npos) << f.err;
  EXPECT_NE(f.err.find("non-finite"), std::string::npos) << f.err;
  EXPECT_EQ(work_files(), std::set<std::string>{"in.f32"});
}

struct BadCase {
  const char* name;
  std::string args;      // after "quantize"; {in} and {out} are replaced by paths
  std::string mentions;  // must appear in stderr
};

TEST_F(QuantizeTool, BadInputFailsCleanly) {
  const std::vector<float> eight = laplace(8, 5);
  write_floats(path("good.f32"), eight);
  write_bytes(path("empty.f32"), nullptr, 0);
  write_bytes(path("ragged.f32"), eight.data(), 10);
  // A previous output must survive a failed run untouched.
  const std::vector<float> old = {1.0f, 2.0f};
  write_floats(path("out.f32"), old);
  const std::set<std::string> before = work_files();
  const std::vector<BadCase> cases = {
      {"missing", "--input {dir}/nope.f32 -o {out}", "does not exist"},
      {"directory", "--input {dir} -o {out}", "not a regular file"},
      {"empty", "--input {dir}/empty.f32 -o {out}", "is empty"},
      {"ragged", "--input {dir}/ragged.f32 -o {out}", "not a multiple of 4"},
      {"count_mismatch", "--input {in} --count 3 -o {out}", "not a multiple of --count 3"},
      {"count_zero", "--input {in} --count 0 -o {out}", "--count"},
      {"count_negative", "--input {in} --count -4 -o {out}", "--count"},
      {"bits_high", "--input {in} --bits 9 -o {out}", "--bits = 9"},
      {"bits_low", "--input {in} --bits 1 -o {out}", "--bits = 1"},
      {"bits_text", "--input {in} --bits four -o {out}", "--bits"},
      {"policy", "--input {in} --policy octav -o {out}", "'octav'"},
      {"rounding", "--input {in} --rounding up -o {out}", "'up'"},
      {"gamma_range", "--input {in} --policy fixed --gamma 1.5 -o {out}", "--gamma = 1.5"},
      {"gamma_policy", "--input {in} --gamma 0.5 -o {out}", "--gamma is only used"},
      {"alpha", "--input {in} --alpha 0 -o {out}", "--alpha"},
      {"block_size", "--input {in} --block-size -1 -o {out}", "--block-size"},
      {"output_dir", "--input {in} -o {dir}/no/such/dir/out.f32", "cannot create"},
      {"same_outputs", "--input {in} -o {out} --codes {out}", "same file"},
      {"no_input", "-o {out}", "--input"},
      {"unknown_option", "--input {in} --frobnicate -o {out}", "frobnicate"},
  };
  for (const BadCase& c : cases) {
    std::string args = c.args;
    for (auto [key, value] : {std::pair<std::string, std::string>{"{in}", path("good.f32")},
                              {"{out}", path("out.f32")},
                              {"{dir}", work_.string()}}) {
      for (size_t at; (at = args.find(key)) != std::string::npos;)
        args.replace(at, key.size(), value);
    }
    const RunResult r = run("quantize " + args);
    EXPECT_NE(r.code, 0) << c.name;
    EXPECT_NE(r.err.find("int4ddp: error:"), std::string::npos) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.mentions), std::string::npos) << c.name << ": " << r.err;
    EXPECT_EQ(work_files(), before) << c.name << " left a file behind";
    expect_same_floats(read_floats(path("out.f32")), old);
  }
  const RunResult none = run("");
  EXPECT_NE(none.code, 0);
  EXPECT_NE(none.err.find("int4ddp: error:"), std::string::npos) << none.err;
}

TEST_F(QuantizeTool, HelpDocumentsTheCodesLayout) {
  const RunResult r = run("quantize --help");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("--no-calibrate"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("low nibble"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--fail-on-nonfinite"), std::string::npos) << r.out;
}

// A block longer than the tensor is one block, however long: --block-size 2^63-1 once overflowed
// the codec's block count (found by tests/fuzz/fuzz_quantize).
TEST_F(QuantizeTool, BlockLongerThanTheTensorIsOneBlock) {
  write_floats(path("in.f32"), laplace(1000, 5));
  const std::string in = "quantize -i " + path("in.f32") + " --rounding nearest ";
  const RunResult whole =
      run(in + "-o " + path("a.f32") + " --codes " + path("a.bin") + " --block-size 1000");
  const RunResult huge = run(in + "-o " + path("b.f32") + " --codes " + path("b.bin") +
                             " --block-size 9223372036854775807");
  ASSERT_EQ(whole.code, 0) << whole.err;
  ASSERT_EQ(huge.code, 0) << huge.err;
  EXPECT_EQ(slurp(path("a.f32")), slurp(path("b.f32")));
  EXPECT_EQ(slurp(path("a.bin")), slurp(path("b.bin")));
}

}  // namespace
}  // namespace int4ddp
