// The training state a checkpoint holds (internal to src/train): where training stands (Progress),
// the model, the optimizer, the quantizers' interval policies and, with data parallelism, every
// rank's own state. A resumed run continues bit for bit from it.
#pragma once

#include <cstdint>
#include <string>

#include "src/config/config.h"
#include "src/nn/model.h"
#include "src/train/checkpoint.h"
#include "src/train/distributed.h"
#include "src/train/optim.h"

namespace int4ddp::train {

// Where training stands; saved in checkpoints as it is (plain data).
struct Progress {
  int64_t epoch = 0;           // current epoch
  int64_t batch_in_epoch = 0;  // batches of this epoch already done
  int64_t global_batch = 0;    // batches done (calibration and skipped ones included)
  int64_t steps = 0;           // optimizer steps taken
  int64_t skipped = 0;         // non-finite batches skipped, in total
  int64_t consecutive_skips = 0;
  double epoch_loss_sum = 0.0;  // this epoch's running training loss (sum over examples)
  int64_t epoch_correct = 0, epoch_seen = 0;
};

// Writes the checkpoint file path. Collective with data parallelism: every rank's local state is
// gathered and rank 0 writes the file.
void save_checkpoint(const std::string& path, const Config& cfg, nn::Model& model, Optimizer& opt,
                     const Progress& pr, DataParallel& dp);

// Restores the model (and, when opt is not null, the optimizer) from ck, read from path (named in
// errors). Throws Error when ck holds another model than `model`.
Progress load_checkpoint(const Checkpoint& ck, const std::string& path, nn::Model& model,
                         Optimizer* opt);

// Data parallelism: this rank's own state from a checkpoint written by the same number of ranks.
void load_rank_state(const Checkpoint& ck, const std::string& path, DataParallel& dp,
                     nn::Model& model);

}  // namespace int4ddp::train
