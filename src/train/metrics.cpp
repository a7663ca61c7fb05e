// The trainer's metrics records (see metrics.h).
#include "src/train/metrics.h"

#include <algorithm>

#include "kernels/common/error.h"

namespace int4ddp::train {

void StepTimes::add(double step, double compute, const comm::StepCommStats& cs) {
  ++steps;
  step_s += step;
  compute_s += compute;
  quant_s += cs.quant_seconds;
  comm_s += cs.comm_seconds;
  wait_s += cs.wait_seconds;
  wire_bytes += cs.wire_bytes;
  ratio_sum += cs.compression_ratio;
}

json StepTimes::to_json() const {
  const double n = static_cast<double>(std::max<int64_t>(steps, 1));
  return {{"steps", steps},
          {"step_s", step_s / n},
          {"compute_s", compute_s / n},
          {"quant_s", quant_s / n},
          {"comm_s", comm_s / n},
          {"comm_wait_s", wait_s / n},
          {"bytes_sent", static_cast<double>(wire_bytes) / n},
          {"compression_ratio", ratio_sum / n}};
}

json comm_json(const comm::StepCommStats& cs, double rel_err, bool enabled) {
  if (!enabled) return nullptr;
  json j = {{"quant_s", cs.quant_seconds},
            {"comm_s", cs.comm_seconds},
            {"comm_wait_s", cs.wait_seconds},
            {"bytes_sent", cs.wire_bytes},
            {"compression_ratio", cs.compression_ratio},
            {"clip_fraction", cs.clip_fraction()},
            {"bucket_gamma", cs.gammas}};
  if (rel_err >= 0) j["rel_err"] = rel_err;
  return j;
}

json quant_diagnostics(nn::Model& model) {
  json layers = json::array();
  const auto& qops = model.quantized_ops();
  for (size_t i = 0; i < qops.size(); ++i) {
    const auto& g = qops[i]->grad_state();
    layers.push_back({{"layer", i},
                      {"gamma", g.last_gamma},
                      {"R", g.pending.clip_fraction()},
                      {"E", g.last_diag.error},
                      {"E_L", g.last_diag.error_large},
                      {"nonfinite", g.pending.nonfinite}});
  }
  return layers;
}

}  // namespace int4ddp::train
