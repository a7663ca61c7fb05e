// Fuzzes `int4ddp quantize`'s option and input handling: the first line of the input is the
// command line after `quantize` (split at spaces), the rest is the --input file (raw float32). The
// harness always points --input, and --output / --codes when given, at its own temp files.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "src/quantize_tool.h"
#include "tests/fuzz/fuzz_harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int4ddp::fuzz::TempFile input("input.f32"), output("output.f32"), codes("codes.bin");
  const auto* end = data + size;
  const auto* newline = std::find(data, end, uint8_t{'\n'});
  const std::string line(data, newline);
  input.write(newline == end ? end : newline + 1, newline == end ? 0 : end - newline - 1);

  std::vector<std::string> args{"int4ddp", "quantize", "--input", input.path()};
  std::istringstream words(line);
  for (std::string w; words >> w;) args.push_back(w);
  int4ddp::QuantizeOptions opts;
  CLI::App app("fuzz");
  add_quantize_command(app, &opts);
  std::vector<std::string> reversed(args.rbegin(), args.rend() - 1);  // CLI11: reversed, no argv[0]
  try {
    app.parse(reversed);
  } catch (const CLI::Error&) {
    return 0;  // CLI11 rejects it with its own message, as main() prints it
  }
  opts.input = input.path();
  if (!opts.output.empty()) opts.output = output.path();
  if (!opts.codes.empty()) opts.codes = codes.path();
  std::ostringstream out, err;
  return int4ddp::fuzz::run_expecting_error([&] { int4ddp::run_quantize(opts, out, err); });
}
