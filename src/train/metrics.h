// The trainer's metrics (internal to src/train): the JSON-lines file of log.metrics_path and the
// pieces of its records (README "Training": step, skip, quant, epoch and final records).
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "comm/buckets.h"
#include "src/nn/model.h"

namespace int4ddp::train {

using json = nlohmann::json;

// One JSON object per line, flushed after each. An empty path writes nothing.
class MetricsLog {
 public:
  // Creates the parent directory; append keeps what a resumed run's file holds. Throws Error
  // (naming log.metrics_path) when the file cannot be opened for writing.
  MetricsLog(const std::string& path, bool append);
  void write(const json& j);

 private:
  std::ofstream f_;
};

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
