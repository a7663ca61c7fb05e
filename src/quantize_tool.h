// `int4ddp quantize`: quantize raw float32 tensors from a file with an interval policy, step by
// step as the trainer would, and report gamma, R, E(G), E(G_L) per step and a JSON summary.
//
// Invariant: an output file either appears complete (written to FILE.tmp.<pid>, renamed at the end)
// or not at all; on any error the temporary files are removed.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

namespace CLI {
class App;
}

namespace int4ddp {

struct QuantizeOptions {
  std::string input;                    // raw little-endian float32
  std::string output;                   // dequantized float32, same length as input ("" = none)
  std::string codes;                    // per step: scales then packed codes ("" = none)
  int64_t count = 0;                    // elements per tensor (step), > 0 when count_given
  bool count_given = false;             // --count given (else the whole file is one tensor)
  int bits = 4;                         // 2..8
  std::string policy = "lbt";           // minmax | fixed | lbt | mse | dsgc
  float gamma = 0.8f;                   // fixed only
  bool gamma_given = false;             // --gamma was on the command line
  double alpha = 1e-3;                  // lbt target and the top-alpha set of E(G_L)
  std::string rounding = "stochastic";  // nearest | stochastic
  int64_t block_size = 0;               // elements per scale; 0 = per tensor
  uint32_t seed = 0;                    // Philox key: {seed, 0, step, 0}
  bool calibrate = true;                // lbt: calibrate on the first tensor
  bool fail_on_nonfinite = false;       // a NaN/Inf in the input is an error
};

// Adds the `quantize` subcommand to app, filling *opts when it is parsed. Returns the subcommand.
CLI::App* add_quantize_command(CLI::App& app, QuantizeOptions* opts);

// Runs `quantize`: the table on out, warnings on err, the JSON summary as out's last line.
// Throws int4ddp::Error (after removing its temporary files) on bad options or input.
void run_quantize(const QuantizeOptions& opts, std::ostream& out, std::ostream& err);

}  // namespace int4ddp
