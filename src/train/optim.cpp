// SGD + Adam over the parameter arena, and the learning-rate schedules.
#include "src/train/optim.h"

#include <algorithm>
#include <cmath>
#include <cstring>

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
  if (on_device()) {
    ++steps_;
    step_device(lr, adam_lr(lr));
    return;
  }
  begin_step(lr);
  end_step(true);
}

void Optimizer::begin_step(double lr) {
  INT4DDP_CHECK(!on_device(), "optimizer: a step in pieces runs on the host arena only");
  ++steps_;
  const double c1 = 1.0 - std::pow(cfg_.adam_beta1, static_cast<double>(steps_));
  const double c2 = 1.0 - std::pow(cfg_.adam_beta2, static_cast<double>(steps_));
  scalars_.lr = static_cast<float>(lr);
  scalars_.mu = static_cast<float>(cfg_.momentum);
  scalars_.wd = static_cast<float>(cfg_.weight_decay);
  scalars_.b1 = static_cast<float>(cfg_.adam_beta1);
  scalars_.b2 = static_cast<float>(cfg_.adam_beta2);
  scalars_.alr = static_cast<float>(adam_lr(lr) / c1);
  scalars_.inv_c2 = static_cast<float>(1.0 / c2);
  scalars_.eps = static_cast<float>(cfg_.adam_eps);
  updated_.clear();
  in_step_ = true;
}

bool Optimizer::update(int64_t begin, int64_t end) {
  INT4DDP_CHECK(in_step_, "optimizer: update() outside begin_step() .. end_step()");
  const auto n = static_cast<int64_t>(momentum_.size());
  INT4DDP_CHECK(0 <= begin && begin <= end && end <= n, "optimizer: update of [", begin, ", ", end,
                ") outside the arena of ", n, " elements");
  for (const auto& [b, e] : updated_)
    INT4DDP_CHECK(end <= b || e <= begin, "optimizer: update of [", begin, ", ", end,
                  ") overlaps [", b, ", ", e, ") of this step");
  if (backup_w_.size() != static_cast<size_t>(n)) {
    backup_w_.resize(static_cast<size_t>(n));
    backup_s1_.resize(static_cast<size_t>(n));
    backup_s2_.resize(static_cast<size_t>(n));
  }
  updated_.emplace_back(begin, end);
  return update_host(begin, end, /*backup=*/true);
}

void Optimizer::end_step(bool keep) {
  INT4DDP_CHECK(in_step_, "optimizer: end_step() without begin_step()");
  in_step_ = false;
  std::sort(updated_.begin(), updated_.end());
  if (keep) {
    int64_t at = 0;  // the elements between the updated ranges, and after the last one
    for (const auto& [b, e] : updated_) {
      if (at < b) update_host(at, b, /*backup=*/false);
      at = e;
    }
    const auto n = static_cast<int64_t>(momentum_.size());
    if (at < n) update_host(at, n, /*backup=*/false);
    updated_.clear();
    return;
  }
  // What update() saved, per parameter range (the state arrays depend on its group).
  for (const auto& [b, e] : updated_)
    for (const Range& r : ranges_) {
      const int64_t lo = std::max(b, r.offset), hi = std::min(e, r.offset + r.count);
      if (lo >= hi) continue;
      const auto count = static_cast<size_t>(hi - lo);
      std::copy_n(backup_w_.data() + lo, count, values_ + lo);
      if (r.group == ParamGroup::kWeights) {
        std::copy_n(backup_s1_.data() + lo, count, momentum_.data() + lo);
      } else {
        std::copy_n(backup_s1_.data() + lo, count, adam_m_.data() + lo);
        std::copy_n(backup_s2_.data() + lo, count, adam_v_.data() + lo);
      }
    }
  updated_.clear();
  --steps_;
}

bool Optimizer::update_host(int64_t begin, int64_t end, bool backup) {
  // Work items: blocks of the ranges clipped to [begin, end).
  std::vector<std::pair<const Range*, std::pair<int64_t, int64_t>>> items;
  for (const Range& r : ranges_) {
    const int64_t lo = std::max(begin, r.offset), hi = std::min(end, r.offset + r.count);
    for (int64_t i0 = lo; i0 < hi; i0 += kBlock)
      items.push_back({&r, {i0, std::min(hi, i0 + kBlock)}});
  }
  std::vector<uint8_t> finite(items.size(), 1);
  const Scalars k = scalars_;
  const bool nesterov = cfg_.nesterov;
  // Elementwise, so any split gives the same result: the blocks on the threads.
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t it) {
    const Range& r = *items[static_cast<size_t>(it)].first;
    const auto [off, stop] = items[static_cast<size_t>(it)].second;
    const int64_t count = stop - off;
    float* w = values_ + off;
    const float* g = grads_ + off;
    // A float is finite unless its exponent bits are all ones (an integer OR that vectorises).
    uint32_t nonfinite = 0;
    if (r.group == ParamGroup::kWeights) {
      float* v = momentum_.data() + off;
      if (backup) {
        std::copy_n(w, count, backup_w_.data() + off);
        std::copy_n(v, count, backup_s1_.data() + off);
      }
      const float decay = r.decay ? k.wd : 0.0f;
      for (int64_t i = 0; i < count; ++i) {
        uint32_t bits;
        std::memcpy(&bits, g + i, sizeof bits);
        nonfinite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
        const float gi = g[i] + decay * w[i];
        v[i] = k.mu * v[i] + gi;
        w[i] -= k.lr * (nesterov ? gi + k.mu * v[i] : v[i]);
      }
    } else {
      float* m = adam_m_.data() + off;
      float* s = adam_v_.data() + off;
      if (backup) {
        std::copy_n(w, count, backup_w_.data() + off);
        std::copy_n(m, count, backup_s1_.data() + off);
        std::copy_n(s, count, backup_s2_.data() + off);
      }
      for (int64_t i = 0; i < count; ++i) {
        uint32_t bits;
        std::memcpy(&bits, g + i, sizeof bits);
        nonfinite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
        m[i] = k.b1 * m[i] + (1.0f - k.b1) * g[i];
        s[i] = k.b2 * s[i] + (1.0f - k.b2) * g[i] * g[i];
        w[i] -= k.alr * m[i] / (std::sqrt(s[i] * k.inv_c2) + k.eps);
      }
    }
    finite[static_cast<size_t>(it)] = nonfinite == 0;
  });
  return std::all_of(finite.begin(), finite.end(), [](uint8_t f) { return f != 0; });
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
