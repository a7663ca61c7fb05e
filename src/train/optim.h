// Optimizers over a model's flat parameter arena (DESIGN.md section 3): network weights by SGD with
// momentum and weight decay (PyTorch semantics: v <- mu v + (g + wd w), w <- w - lr v), the
// quantizer step sizes s_W, u_A by Adam (lr 1e-5, no decay), both scaled by the lr schedule. Both
// keep their state in flat arrays aligned with the arena so a checkpoint can store them as they
// are. One Optimizer serves both devices: bound to a GPU model's device arenas (bind_device) it
// keeps its state on the device and steps there with the same formula (nn_cuda.h's sgd and adam
// kernels, bit for bit the host loop's float expressions).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "src/config/config.h"
#include "src/core/tensor.h"

namespace int4ddp::train {

struct OptimConfig {
  double lr = 0.1;  // SGD learning rate (scaled by the schedule)
  double momentum = 0.9;
  bool nesterov = false;       // w <- w - lr (g' + mu v) with g' = g + wd w
  double weight_decay = 1e-4;  // applied to Param::decay parameters
  double quant_lr = 1e-5;      // Adam learning rate for the quantizer steps, at lr (scheduled)
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_eps = 1e-8;
};

class Optimizer {
 public:
  // params: views into the arena starting at `values` (n elements); grads likewise.
  Optimizer(const OptimConfig& cfg, const std::vector<Param*>& params, float* values, float* grads,
            int64_t n);
  // One update with the SGD learning rate lr (the schedule's value for this step); the quantizer
  // steps' Adam rate follows the same schedule: quant_lr * lr / OptimConfig::lr.
  void step(double lr);
  int64_t steps() const { return steps_; }

  // From now on step() updates device_values (n floats, the layout of `values`) from device_grads
  // on the GPU, with the momentum and Adam moments in device memory (uploaded from the host
  // state now). Needs a CUDA build.
  void bind_device(float* device_values, float* device_grads);
  bool on_device() const { return device_values_ != nullptr; }
  // Host <-> device syncs of the state (no-ops unless bound to the device): to_host() before the
  // host state is read (a checkpoint), to_device() after it was written (a loaded checkpoint).
  void to_host();
  void to_device();

  // Flat state for checkpoints: momentum (n), adam m (n), adam v (n), and the step count. On the
  // device these are host copies (to_host, to_device).
  std::vector<float>& momentum() { return momentum_; }
  std::vector<float>& adam_m() { return adam_m_; }
  std::vector<float>& adam_v() { return adam_v_; }
  void set_steps(int64_t s) { steps_ = s; }

 private:
  struct Range {
    int64_t offset, count;
    ParamGroup group;
    bool decay;
  };
  OptimConfig cfg_;
  std::vector<Range> ranges_;
  std::vector<std::pair<size_t, int64_t>> blocks_;  // step()'s work items: (range, first element)
  float* values_;
  float* grads_;
  // The quantizer steps' Adam rate at SGD rate lr: quant_lr scaled by the schedule's factor.
  double adam_lr(double lr) const { return cfg_.quant_lr * (lr / cfg_.lr); }
  // step()'s device loop: one kernel launch per run of adjacent ranges of the same group and decay
  // (elementwise, so merging them changes nothing).
  void step_device(double lr, double quant_lr);
  std::vector<float> momentum_, adam_m_, adam_v_;
  int64_t steps_ = 0;
  float* device_values_ = nullptr;  // bind_device: the model's device arenas
  float* device_grads_ = nullptr;
  std::vector<Range> device_runs_;
  Tensor device_state_;  // (3 n) device: momentum, adam m, adam v
};

// Learning-rate schedule over the whole run, evaluated per step.
struct ScheduleConfig {
  ScheduleKind kind = ScheduleKind::kMultistep;  // multistep | cosine
  std::vector<double> milestones = {0.5, 0.75};  // fractions of the total steps (multistep)
  double factor = 0.1;                           // multistep: lr *= factor at each milestone
  double min_lr = 0.0;                           // cosine: the final learning rate
  double warmup_fraction = 0.0;                  // linear warm-up over this fraction of the steps
};

double scheduled_lr(const ScheduleConfig& s, double base_lr, int64_t step, int64_t total_steps);

}  // namespace int4ddp::train
