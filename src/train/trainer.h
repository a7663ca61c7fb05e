// The training loop (DESIGN.md sections 3 and 5): per batch, train_step() runs forward -> loss ->
// backward (gradient buckets all-reduced as they fill) -> wait -> non-finite check -> update (SGD +
// Adam) -> commit the quantizers' interval policies, then log_step() writes metrics and progress
// and a checkpoint follows every N steps; evaluation and checkpoints every N epochs (trainer.cpp).
// The first batch of a run with `lbt` calibration calibrates the gradient quantizers and updates no
// weights. A step whose loss or gradients hold NaN/Inf is skipped (no weight, optimizer or gamma
// update), counted, and the run stops with an Error after train.max_consecutive_skips in a row.
// A run resumed from a checkpoint continues bit for bit (same machine, any train.threads: results
// do not depend on the thread count).
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "src/config/config.h"

namespace int4ddp::train {

struct RunSummary {
  double test_accuracy = 0.0;  // fraction in [0, 1]
  double test_loss = 0.0;
  int64_t steps = 0;       // optimizer steps taken (calibration and skipped steps excluded)
  int64_t skipped = 0;     // non-finite steps skipped
  double seconds = 0.0;    // wall time of the training loop
  double img_per_s = 0.0;  // training throughput
  int stop_signal = 0;     // a preemption signal stopped the run after a checkpoint; 0 = none
  std::string checkpoint;  // that checkpoint (when stop_signal != 0)
};

// Trains as configured. `out` gets the config table, progress and the final result.
RunSummary run_training(const Config& cfg, std::ostream& out, std::ostream& err);

struct EvalSummary {
  double accuracy = 0.0, loss = 0.0;
  int64_t count = 0;
};

// Evaluates a checkpoint on the test split of the dataset of its own config (overrides may change
// data.* keys, e.g. data.path).
EvalSummary run_eval(const std::string& checkpoint, const std::vector<std::string>& overrides,
                     std::ostream& out);

}  // namespace int4ddp::train
