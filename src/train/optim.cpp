// SGD + Adam over the parameter arena, and the learning-rate schedules.
#include "src/train/optim.h"

#include <algorithm>
#include <cmath>

#include "kernels/common/error.h"
#include "kernels/common/parallel.h"

#ifdef INT4DDP_HAVE_CUDA
#include "kernels/math/cuda/nn_cuda.h"
#include "src/core/device_cuda.h"
#endif

namespace int4ddp::train {
namespace {

constexpr int64_t kBlock = 16384;  // elements per work item of step()

}  // namespace

Optimizer::Optimizer(const OptimConfig& cfg, const std::vector<Param*>& params, float* values,
                     float* grads, int64_t n)
    : cfg_(cfg), values_(values), grads_(grads) {
  for (const Param* p : params) {
    const int64_t off = p->value.data() - values;
    INT4DDP_CHECK(off >= 0 && off + p->value.numel() <= n, "optimizer: parameter ", p->name,
                  " is not in the arena");
    ranges_.push_back({off, p->value.numel(), p->group, p->decay});
  }
  for (size_t r = 0; r < ranges_.size(); ++r)
    for (int64_t i0 = 0; i0 < ranges_[r].count; i0 += kBlock) blocks_.push_back({r, i0});
  momentum_.assign(static_cast<size_t>(n), 0.0f);
  adam_m_.assign(static_cast<size_t>(n), 0.0f);
  adam_v_.assign(static_cast<size_t>(n), 0.0f);
}

void Optimizer::bind_device(float* device_values, float* device_grads) {
  INT4DDP_CHECK(device_values && device_grads, "optimizer: bind_device needs the device arenas");
  const auto n = static_cast<int64_t>(momentum_.size());
  device_state_.resize({3 * n}, Device::kCuda);
  device_values_ = device_values;
  device_grads_ = device_grads;
  device_runs_.clear();
  for (const Range& r : ranges_) {
    if (!device_runs_.empty()) {
      Range& last = device_runs_.back();
      if (last.offset + last.count == r.offset && last.group == r.group && last.decay == r.decay) {
        last.count += r.count;
        continue;
      }
    }
    device_runs_.push_back(r);
  }
  to_device();
}

void Optimizer::to_host() {
  if (!on_device()) return;
  const auto n = static_cast<int64_t>(momentum_.size());
  copy_floats(momentum_.data(), Device::kCpu, device_state_.data(), Device::kCuda, n);
  copy_floats(adam_m_.data(), Device::kCpu, device_state_.data() + n, Device::kCuda, n);
  copy_floats(adam_v_.data(), Device::kCpu, device_state_.data() + 2 * n, Device::kCuda, n);
}

void Optimizer::to_device() {
  if (!on_device()) return;
  const auto n = static_cast<int64_t>(momentum_.size());
  copy_floats(device_state_.data(), Device::kCuda, momentum_.data(), Device::kCpu, n);
  copy_floats(device_state_.data() + n, Device::kCuda, adam_m_.data(), Device::kCpu, n);
  copy_floats(device_state_.data() + 2 * n, Device::kCuda, adam_v_.data(), Device::kCpu, n);
}

void Optimizer::step_device(double lr, double quant_lr) {
#ifdef INT4DDP_HAVE_CUDA
  namespace mc = math::cuda;
  const int64_t n = static_cast<int64_t>(momentum_.size());
  float* momentum = device_state_.data();
  float* m = momentum + n;
  float* v = momentum + 2 * n;
  mc::SgdScalars sgd;
  sgd.lr = static_cast<float>(lr);
  sgd.momentum = static_cast<float>(cfg_.momentum);
  sgd.nesterov = cfg_.nesterov;
  const mc::AdamScalars adam =
      mc::adam_scalars(quant_lr, cfg_.adam_beta1, cfg_.adam_beta2, cfg_.adam_eps, steps_);
  cudaStream_t stream = compute_stream();
  for (const Range& r : device_runs_) {
    float* w = device_values_ + r.offset;
    const float* g = device_grads_ + r.offset;
    if (r.group == ParamGroup::kWeights) {
      sgd.weight_decay = r.decay ? static_cast<float>(cfg_.weight_decay) : 0.0f;
      mc::sgd_step_async(w, g, momentum + r.offset, r.count, sgd, stream);
    } else {
      mc::adam_step_async(w, g, m + r.offset, v + r.offset, r.count, adam, stream);
    }
  }
#else
  (void)lr, (void)quant_lr;
  INT4DDP_FAIL("optimizer: a device step needs a CUDA build");
#endif
}

void Optimizer::step(double lr) {
  ++steps_;
  if (on_device()) {
    step_device(lr, adam_lr(lr));
    return;
  }
  const float mu = static_cast<float>(cfg_.momentum), wd = static_cast<float>(cfg_.weight_decay);
  const float b1 = static_cast<float>(cfg_.adam_beta1), b2 = static_cast<float>(cfg_.adam_beta2);
  const double c1 = 1.0 - std::pow(cfg_.adam_beta1, static_cast<double>(steps_));
  const double c2 = 1.0 - std::pow(cfg_.adam_beta2, static_cast<double>(steps_));
  const double quant_lr = adam_lr(lr);
  const float alr = static_cast<float>(quant_lr / c1);
  const float inv_c2 = static_cast<float>(1.0 / c2), eps = static_cast<float>(cfg_.adam_eps);
  const float slr = static_cast<float>(lr);
  // Elementwise, so any split gives the same result: blocks of every range, on the threads.
  parallel_for(static_cast<int64_t>(blocks_.size()), [&](int64_t b) {
    const Range& r = ranges_[blocks_[static_cast<size_t>(b)].first];
    const int64_t i0 = blocks_[static_cast<size_t>(b)].second;
    const int64_t off = r.offset + i0, count = std::min(kBlock, r.count - i0);
    float* w = values_ + off;
    const float* g = grads_ + off;
    if (r.group == ParamGroup::kWeights) {
      float* v = momentum_.data() + off;
      const float decay = r.decay ? wd : 0.0f;
      for (int64_t i = 0; i < count; ++i) {
        const float gi = g[i] + decay * w[i];
        v[i] = mu * v[i] + gi;
        w[i] -= slr * (cfg_.nesterov ? gi + mu * v[i] : v[i]);
      }
    } else {
      float* m = adam_m_.data() + off;
      float* s = adam_v_.data() + off;
      for (int64_t i = 0; i < count; ++i) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        s[i] = b2 * s[i] + (1.0f - b2) * g[i] * g[i];
        w[i] -= alr * m[i] / (std::sqrt(s[i] * inv_c2) + eps);
      }
    }
  });
}

double scheduled_lr(const ScheduleConfig& s, double base_lr, int64_t step, int64_t total_steps) {
  INT4DDP_CHECK(total_steps > 0, "schedule: total steps must be positive");
  const double t = static_cast<double>(step) / static_cast<double>(total_steps);
  double lr = base_lr;
  switch (s.kind) {
    case ScheduleKind::kMultistep:
      for (double m : s.milestones)
        if (t >= m) lr *= s.factor;
      break;
    case ScheduleKind::kCosine:
      lr = s.min_lr + 0.5 * (base_lr - s.min_lr) * (1.0 + std::cos(M_PI * std::min(1.0, t)));
      break;
    default:
      INT4DDP_FAIL("schedule.kind = ", static_cast<int>(s.kind), " is not a schedule");
  }
  if (s.warmup_fraction > 0 && t < s.warmup_fraction) lr *= t / s.warmup_fraction;
  return lr;
}

}  // namespace int4ddp::train
