// The small synthetic training run the trainer tests share (test_train on the CPU, test_cuda_layers
// against the GPU): two hidden layers for mlp, 1 epoch of 64-image batches, no checkpoints unless
// a test asks, metrics in dir/metrics.jsonl, and a run() that keeps the trainer's output quiet.
#pragma once

#include <sstream>
#include <string>

#include "src/config/config.h"
#include "src/train/trainer.h"

namespace int4ddp::test {

inline Config small_config(const std::string& dir, ModelKind model, int bits) {
  Config c;
  c.model.name = model;
  c.model.mlp_hidden = {128, 128};
  c.data.dataset = DatasetKind::kSynthetic;
  c.data.synthetic_train_size = 4096;
  c.data.synthetic_test_size = 1024;
  c.quant.weight_bits = c.quant.activation_bits = c.quant.grad_bits = bits;
  c.comm.backend = CommBackend::kNone;
  c.comm.mode = CommMode::kFp32;
  c.optim.lr = 0.05;
  c.train.epochs = 1;
  c.train.batch_size = 64;
  c.train.eval_batch_size = 512;
  c.train.checkpoint_every_epochs = 0;
  c.train.checkpoint_dir = dir + "/ck";
  c.log.metrics_path = dir + "/metrics.jsonl";
  c.log.progress = ProgressBar::kOff;
  c.log.print_every = 1;
  c.log.diagnostics_every = 10;
  return c;
}

inline train::RunSummary run(const Config& c) {
  std::ostringstream out, err;
  return train::run_training(c, out, err);
}

}  // namespace int4ddp::test
