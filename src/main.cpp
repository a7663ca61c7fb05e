// The int4ddp executable: one CLI11 app, one subcommand per tool (quantize, train, eval), each an
// add_*_command that registers its options and a run_* that does the work.
// This is the only place where an int4ddp::Error becomes a message and a non-zero exit.
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kernels/common/error.h"
#include "src/config/config.h"
#include "src/quantize_tool.h"
#include "src/train/preempt.h"
#include "src/train/trainer.h"

namespace {
constexpr int kExitError = 2;  // bad command line, options or input

// "rank R: " when this process is one of several MPI ranks.
std::string rank_prefix() {
  const int rank = int4ddp::launcher_rank();
  if (!int4ddp::comm::launched_with_multiple_ranks() || rank < 0) return "";
  return "rank " + std::to_string(rank) + ": ";
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"int4ddp: fully quantized (INT4 fixed-point) data-parallel training", "int4ddp"};
  app.require_subcommand(1);
  int4ddp::QuantizeOptions quantize_opts;
  CLI::App* quantize = int4ddp::add_quantize_command(app, &quantize_opts);

  std::string config_path, resume, checkpoint;
  std::vector<std::string> overrides;
  CLI::App* train = app.add_subcommand("train", "Train a model as a YAML config describes");
  train->add_option("-c,--config", config_path, "YAML config (see configs/)")->required();
  train->add_option("--set", overrides, "Override a key: --set section.key=value (repeatable)");
  train->add_option("--resume", resume, "Continue from this checkpoint (same as train.resume)");
  CLI::App* eval = app.add_subcommand("eval", "Evaluate a checkpoint on its dataset's test split");
  eval->add_option("--checkpoint", checkpoint, "Checkpoint file")->required();
  eval->add_option("--set", overrides, "Override a key of the checkpoint's config (data.path...)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // help
    std::cerr << "int4ddp: error: " << e.what() << "\nRun with --help for more information.\n";
    return kExitError;
  }

  try {
    if (quantize->parsed()) int4ddp::run_quantize(quantize_opts, std::cout, std::cerr);
    if (train->parsed()) {
      if (!resume.empty()) overrides.push_back("train.resume=" + resume);
      const int4ddp::Config cfg = int4ddp::load_config(config_path, overrides);
      const int4ddp::train::RunSummary run =
          int4ddp::train::run_training(cfg, std::cout, std::cerr);
      if (run.stop_signal != 0) {
        // Preempted: the checkpoint is written; say where and how to go on, exit non-zero so a
        // scheduler (and a script) sees the run did not finish.
        if (int4ddp::launcher_rank() <= 0)
          std::cerr << int4ddp::train::preempt_message(
                           run.stop_signal, run.steps, run.checkpoint,
                           int4ddp::train::resume_command({argv, argv + argc}, run.checkpoint,
                                                          int4ddp::launcher_world_size()))
                    << std::flush;
        return int4ddp::train::preempt_exit_code(run.stop_signal);
      }
    }
    if (eval->parsed()) int4ddp::train::run_eval(checkpoint, overrides, std::cout);
    return 0;
  } catch (const int4ddp::Error& e) {
    std::cerr << "int4ddp: " << rank_prefix() << "error: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "int4ddp: " << rank_prefix() << "error: " << e.what() << "\n";
  }
  // Under mpirun the other ranks may be waiting for this one in a collective: take them down.
  std::cerr << std::flush;
  int4ddp::comm::abort_world(kExitError);
  return kExitError;
}
