// The trainer's metrics (internal to src/train): the pieces of the records of log.metrics_path
// (README "Training": step, skip, quant, epoch and final records). The file itself is written by
// MetricsWriter (src/train/run_safety.h), which checks every write.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "comm/buckets.h"
#include "src/nn/model.h"

namespace int4ddp::train {

using json = nlohmann::json;

// Per-epoch sums of the step-time breakdown (this rank), for the epoch record.
struct StepTimes {
  int64_t steps = 0;
  double step_s = 0, compute_s = 0, quant_s = 0, comm_s = 0, wait_s = 0;
  uint64_t wire_bytes = 0;
  double ratio_sum = 0;
  void add(double step, double compute, const comm::StepCommStats& cs);
  json to_json() const;  // the means per step
};

// A step's all-reduce figures (null without data parallelism); rel_err < 0: not sampled.
json comm_json(const comm::StepCommStats& cs, double rel_err, bool enabled);

// gamma, R, E(G), E(G_L) and the non-finite count of every quantized layer's last step.
json quant_diagnostics(nn::Model& model);

}  // namespace int4ddp::train
