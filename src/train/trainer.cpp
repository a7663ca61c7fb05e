// The training loop (see trainer.h). run_training() reads top to bottom, as llm.c's main does:
//
//   for each epoch, for each batch:
//     load_batch    this rank's shard of the epoch's permutation
//     train_step    forward -> loss -> backward (buckets launched as they fill) -> wait for the
//                   all-reduce -> agree across ranks (calibration? non-finite?) -> update
//     log_step      metrics records, progress bar or line
//     checkpoint    every train.checkpoint_every_steps optimizer steps
//   end_epoch       BN statistics averaged over ranks, evaluation, epoch record, epoch checkpoint
//
// Everything a step needs lives in one Trainer, built before the first step (ranks, data, model,
// optimizer, a resumed checkpoint).
#include "src/train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <iomanip>
#include <memory>
#include <string>
#include <vector>

#include "comm/buckets.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"
#include "kernels/common/parallel.h"
#include "src/nn/layers_cuda.h"
#include "src/nn/model.h"
#include "src/train/batch_pipeline.h"
#include "src/train/bucket_dump.h"
#include "src/train/checkpoint.h"
#include "src/train/distributed.h"
#include "src/train/metrics.h"
#include "src/train/optim.h"
#include "src/train/preempt.h"
#include "src/train/run_safety.h"
#include "src/train/setup.h"
#include "src/train/train_state.h"

namespace int4ddp::train {
namespace {

// ||compressed mean - exact fp32 mean|| / ||exact mean|| of this step's gradients, where raw holds
// this rank's gradients before the all-reduce (collective: one extra fp32 all-reduce).
double compressed_mean_error(DataParallel& dp, nn::Model& model, std::vector<float>& raw) {
  dp.sum(raw.data(), static_cast<int64_t>(raw.size()));
  const float n = static_cast<float>(dp.world());
  double num = 0, den = 0;
  const float* g = model.grads();
  for (size_t i = 0; i < raw.size(); ++i) {
    const double exact = raw[i] / n;
    num += (g[i] - exact) * (g[i] - exact);
    den += exact * exact;
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

ScheduleConfig schedule_of(const Config& cfg) {
  ScheduleConfig sc;
  sc.kind = cfg.schedule.kind;
  sc.milestones = cfg.schedule.milestones;
  sc.factor = cfg.schedule.gamma;
  sc.min_lr = cfg.schedule.min_lr;
  sc.warmup_fraction = cfg.schedule.warmup_epochs / cfg.train.epochs;
  return sc;
}

OptimConfig optimizer_of(const Config& cfg) {
  OptimConfig oc;
  oc.lr = cfg.optim.lr;
  oc.momentum = cfg.optim.momentum;
  oc.nesterov = cfg.optim.nesterov;
  oc.weight_decay = cfg.optim.weight_decay;
  oc.quant_lr = cfg.quant.scale_lr;
  return oc;
}

data::AugmentConfig augment_of(const Config& cfg) {
  data::AugmentConfig aug;
  aug.crop_pad = cfg.data.random_crop_pad;
  aug.flip = cfg.data.random_flip;
  return aug;
}

// What one training step did. All but the timings and nonfinite_grads agree on every rank.
struct StepResult {
  float loss = 0.0f;                  // training loss, mean over the ranks' batches
  int64_t correct = 0;                // correct predictions, summed over the ranks
  bool calibration = false;           // the gradient quantizers calibrated on this batch: no update
  bool skipped = false;               // a non-finite loss or gradient on some rank: no update
  bool diagnostics = false;           // the quantized layers computed E(G), E(G_L) this step
  double lr = 0.0;                    // the schedule's SGD learning rate (0 when skipped)
  int64_t nonfinite_grads = 0;        // this rank's NaN/Inf count in quantized output gradients
  double compute_s = 0.0;             // forward + backward on this rank
  double step_s = 0.0;                // the whole step on this rank
  comm::StepCommStats comm;           // the gradient all-reduce (data parallelism only)
  double rel_err = -1.0;              // sampled error of the compressed mean; < 0: not sampled
  StopDecision stop;                  // a preemption signal reached some rank: stop after this step
  std::vector<std::string> warnings;  // this rank's quantized layers' warnings
};

class Trainer {
 public:
  Trainer(const Config& cfg, std::ostream& out, std::ostream& err);
  // The buckets stop before the model (declared after dp_) frees the arena they read, also when
  // a step throws with buckets in flight.
  ~Trainer() {
    engine_ = nullptr;
    dp_.detach();
  }
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  RunSummary run();

 private:
  bool step_limit_reached() const {
    return cfg_.train.max_steps > 0 && pr_.steps >= cfg_.train.max_steps;
  }
  void announce();
  void begin_epoch();
  void load_batch();
  StepResult train_step();
  void log_step(const StepResult& r);
  void check_skips() const;
  void checkpoint_step(const StepResult& r);
  void checkpoint_and_stop(const StepResult& r);
  void end_epoch();
  RunSummary finish();
  // Rank 0's parameters and BN statistics to every rank (through the host copies on the GPU).
  void broadcast_model();

  const Config& cfg_;
  std::ostream& err_;
  DataParallel dp_;
  const int rank_, world_;
  std::ostream null_stream_{nullptr};  // what ranks other than 0 print goes nowhere
  std::ostream& out_;
  const int threads_;  // train.threads, resolved
  Datasets ds_;
  nn::Model model_;
  comm::BucketEngine* engine_ = nullptr;  // the gradient buckets; null without data parallelism
  Optimizer opt_;
  const ScheduleConfig schedule_;
  const int64_t batch_;        // examples per step on each rank
  int64_t per_epoch_ = 0;      // batches per epoch on each rank
  int64_t total_batches_ = 0;  // batches of the whole run (the schedule's length)
  Progress pr_;
  bool resumed_ = false;
  std::unique_ptr<MetricsWriter> metrics_;
  bool bar_ = false;  // progress bar on stderr (rank 0)

  // The batches, the step's batch, its activations' ends and scratch of a step.
  std::unique_ptr<BatchPipeline> batches_;
  BatchPipeline::Slot* batch_slot_ = nullptr;
  Tensor logits_, dlogits_;
  std::vector<int64_t> perm_;     // this rank's shard of the epoch's permutation
  std::vector<float> raw_grads_;  // sampled steps: local gradients before the all-reduce

  // Timing and results.
  Clock::time_point t_start_, t_epoch_;
  int64_t images_done_ = 0;
  StepTimes epoch_time_;
  EvalResult last_eval_;
  bool evaluated_last_ = false;
  bool stopped_ = false;         // train.max_steps reached
  int stop_signal_ = 0;          // the preemption signal the run stopped on; 0 = none
  std::string stop_checkpoint_;  // where that stop's checkpoint went
};

Trainer::Trainer(const Config& cfg, std::ostream& out, std::ostream& err)
    : cfg_(cfg),
      err_(err),
      dp_(cfg),
      rank_(dp_.rank()),
      world_(dp_.world()),
      out_(rank_ == 0 ? out : null_stream_),
      threads_(resolve_threads(cfg)),
      ds_((set_num_threads(threads_), announce(), load_datasets(cfg))),
      model_(model_spec(cfg, ds_.train), static_cast<uint64_t>(cfg.train.seed)),
      opt_(optimizer_of(cfg), model_.params(), model_.values(), model_.grads(),
           model_.num_params()),
      schedule_(schedule_of(cfg)),
      batch_(cfg.train.batch_size) {
  nn::QuantContext& qctx = model_.quant_context();
  qctx.seed = static_cast<uint32_t>(cfg.train.seed);
  qctx.stream = static_cast<uint32_t>(rank_);
  // On the GPU the optimizer steps the device arenas, its state on the device too.
  if (model_.device() == Device::kCuda)
    opt_.bind_device(model_.device_values(), model_.device_grads());
  broadcast_model();
  dp_.attach(model_, cfg, out_);
  engine_ = dp_.engine();
  if (engine_)
    out_ << "comm.hierarchy: " << spelling(cfg.comm.hierarchy) << " -> " << engine_->hierarchy()
         << "\n";

  // Each rank takes an equal shard of every epoch's permutation; the remainder is dropped.
  const int64_t shard = data::shard_size(ds_.train.count, world_);
  INT4DDP_CHECK(shard >= batch_, "train.batch_size = ", batch_, " is larger than the ", shard,
                " training examples of each of the ", world_, " ranks");
  per_epoch_ = shard / batch_;
  total_batches_ = per_epoch_ * cfg.train.epochs;

  // Outputs are checked before the first step (rank 0 writes the checkpoints and the metrics): a
  // fresh run never replaces another run's files unless train.overwrite says so, and an unwritable
  // location fails now rather than after an epoch of training.
  resumed_ = !cfg.train.resume.empty();
  const std::string& metrics_path = cfg.log.metrics_path;
  if (rank_ == 0 && !resumed_) {
    const std::string notice =
        check_fresh_run(cfg.train.checkpoint_dir, metrics_path, cfg.train.overwrite);
    if (!notice.empty()) err_ << "int4ddp: " << notice << "\n";
  }
  INT4DDP_CHECK(cfg.comm.dump_buckets_every == 0 || engine_,
                "comm.dump_buckets_every = ", cfg.comm.dump_buckets_every,
                ": a single process all-reduces nothing, so there are "
                "no buckets to dump (run 2+ ranks under mpirun)");
  if (rank_ == 0 && !resumed_ && cfg.comm.dump_buckets_every > 0)
    prepare_bucket_dump_dir(cfg.comm.dump_buckets_dir, cfg.train.overwrite);
  if (rank_ == 0) {
    check_output_locations(cfg.train.checkpoint_dir, metrics_path);
    for (const std::string& f : remove_stale_temp_files(cfg.train.checkpoint_dir))
      err_ << "int4ddp: removed " << f << ", left by a checkpoint writer that is gone\n";
  }
  if (resumed_) {
    const Checkpoint ck = Checkpoint::read(cfg.train.resume);
    // Every rank reads the same checkpoint, so every rank takes the same decision.
    const std::string changes = check_resume_config(ck, cfg.train.resume, cfg);
    if (!changes.empty()) out_ << changes << "\n";
    pr_ = load_checkpoint(ck, cfg.train.resume, model_, &opt_);
    load_rank_state(ck, cfg.train.resume, dp_, model_);
    out_ << "resumed from " << cfg.train.resume << " at epoch " << pr_.epoch + 1 << ", batch "
         << pr_.batch_in_epoch << "\n";
    // The metrics file continues from the checkpoint's step: records of steps after it (written
    // before a crash or preemption) go, so the file reads as one run.
    if (rank_ == 0 && !metrics_path.empty()) {
      const MetricsRewind rw = rewind_metrics(metrics_path, pr_.global_batch, pr_.epoch);
      if (rw.dropped > 0 || rw.torn_tail)
        out_ << "metrics: kept " << rw.kept << " records of " << metrics_path << ", dropped "
             << rw.dropped << " written after the checkpoint"
             << (rw.torn_tail ? " and a torn last line" : "") << "\n";
    }
  }
  metrics_ = std::make_unique<MetricsWriter>(
      rank_ == 0 ? metrics_path : std::string(),
      resumed_ ? MetricsWriter::Mode::kAppend : MetricsWriter::Mode::kTruncate);
  if (rank_ == 0 && !metrics_path.empty() && !resumed_)
    write_file_atomically(metrics_path + ".config.json", config_to_json(cfg) + "\n",
                          "log.metrics_path");
  bar_ = rank_ == 0 && (cfg.log.progress == ProgressBar::kOn ||
                        (cfg.log.progress == ProgressBar::kAuto && ::isatty(2)));

  // On the GPU the batches are assembled in page-locked memory, so the model's copy of one to the
  // device is asynchronous on the compute stream, and the next one is assembled meanwhile.
  const bool on_gpu = model_.device() == Device::kCuda;
  if (on_gpu) out_ << "train.device: cuda, rank 0 on " << describe_gpu() << "\n";
  batches_ = std::make_unique<BatchPipeline>(
      ds_.train, Shape{batch_, ds_.train.channels, ds_.train.height, ds_.train.width},
      augment_of(cfg), static_cast<uint64_t>(cfg.train.seed), /*double_buffered=*/on_gpu,
      /*pinned=*/on_gpu);
}

void Trainer::broadcast_model() {
  if (!dp_.enabled()) return;
  model_.to_host();
  dp_.broadcast_model(model_);
  model_.to_device();
}

RunSummary Trainer::run() {
  t_start_ = Clock::now();
  for (; pr_.epoch < cfg_.train.epochs; ++pr_.epoch, pr_.batch_in_epoch = 0) {
    begin_epoch();
    for (; pr_.batch_in_epoch < per_epoch_; ++pr_.batch_in_epoch) {
      if (step_limit_reached()) break;
      load_batch();
      const StepResult step = train_step();
      log_step(step);
      check_skips();
      checkpoint_step(step);
      if (step.stop.stop) {
        checkpoint_and_stop(step);
        return finish();
      }
    }
    end_epoch();
    if (stopped_) break;
  }
  return finish();
}

// Rank 0 prints the resolved config (before the data is read, so a failure shows what was asked).
void Trainer::announce() {
  out_ << "int4ddp train: resolved config\n" << config_table(cfg_) << std::flush;
  // Results do not depend on the thread count (src/nn/layer.h), so automatic may differ by machine.
  if (cfg_.train.threads == 0) out_ << "train.threads: 0 (automatic) -> " << threads_ << "\n";
  if (dp_.enabled())
    out_ << "data parallel: " << world_ << " rank(s), backend " << dp_.bucket_backend()
         << ", gradients " << spelling(cfg_.comm.mode) << "\n";
}

void Trainer::begin_epoch() {
  if (pr_.batch_in_epoch == 0) pr_.epoch_loss_sum = 0.0, pr_.epoch_correct = pr_.epoch_seen = 0;
  perm_ = data::shard(
      data::epoch_permutation(ds_.train.count, static_cast<uint64_t>(cfg_.train.seed), pr_.epoch),
      rank_, world_);
  t_epoch_ = Clock::now();
  epoch_time_ = StepTimes{};
}

void Trainer::load_batch() {
  const int64_t b = pr_.batch_in_epoch;
  batch_slot_ = &batches_->take(pr_.epoch, b, perm_.data() + b * batch_);
  if (b + 1 < per_epoch_) batches_->prefetch(pr_.epoch, b + 1, perm_.data() + (b + 1) * batch_);
}

StepResult Trainer::train_step() {
  StepResult r;
  nn::QuantContext& qctx = model_.quant_context();
  qctx.step = static_cast<uint32_t>(pr_.global_batch);
  qctx.nonfinite = 0;
  qctx.diagnostics =
      cfg_.log.diagnostics_every > 0 && pr_.global_batch % cfg_.log.diagnostics_every == 0;
  r.diagnostics = qctx.diagnostics;
  // Sampled steps compare the compressed mean with the exact fp32 mean (all buckets are then
  // launched after backward, from a copy of the local gradients).
  const bool sample_error = engine_ && cfg_.comm.mode != CommMode::kFp32 && qctx.diagnostics;
  // Dump steps record this rank's buckets before the all-reduce (launched after backward too).
  const bool dump = engine_ && cfg_.comm.dump_buckets_every > 0 &&
                    pr_.global_batch % cfg_.comm.dump_buckets_every == 0;
  const auto t_step = Clock::now();
  model_.zero_grad();
  // BN running statistics change in a training forward; a skipped step must not keep them.
  model_.save_buffers();
  const bool calibrating = model_.needs_calibration();
  // The quantizer scales s_W, u_A initialise from the first batch a layer sees, which differs
  // between ranks: rank 0's values are broadcast after that step (as at the start).
  bool initialising = false;
  for (const nn::QuantizedOp* q : model_.quantized_ops()) initialising |= !q->initialized();

  // Forward and loss.
  model_.forward(batch_slot_->x, logits_, /*train=*/true);
  batches_->mark_copied(*batch_slot_);  // refilled once the forward has read it
  int64_t correct = 0;
  float loss =
      nn::softmax_cross_entropy_any(logits_, batch_slot_->labels.data(), &dlogits_, &correct);

  // Backward; each bucket's all-reduce starts as soon as its gradients are final. The buckets read
  // the model's gradient arena where it lives (on the GPU the device arena: the engine waits for
  // an event recorded on the compute stream at ready(), comm/device_buckets.h).
  if (engine_) engine_->begin_step(static_cast<uint32_t>(pr_.global_batch));
  comm::BucketEngine* engine = engine_;
  model_.backward(dlogits_, engine && !sample_error && !dump
                                ? std::function<void(int64_t)>(
                                      [engine](int64_t off) { engine->ready_from(off); })
                                : std::function<void(int64_t)>());
  r.compute_s = seconds_since(t_step);
  r.warnings.swap(qctx.warnings);

  // Wait for the all-reduce; the means replace the local gradients in the arena. The sampled error
  // and the dumps read the host arena (grads_to_host: a no-op on the CPU).
  if (engine_) {
    if (sample_error || dump) model_.grads_to_host();
    if (sample_error) raw_grads_.assign(model_.grads(), model_.grads() + model_.num_params());
    if (dump)
      write_bucket_dump(cfg_.comm.dump_buckets_dir, spelling(cfg_.model.name),
                        static_cast<uint64_t>(pr_.global_batch), static_cast<uint32_t>(rank_),
                        static_cast<uint32_t>(world_), model_.grads(),
                        engine_->compressed_segments());
    r.comm = engine_->finish();
    if (sample_error) {
      model_.grads_to_host();
      r.rel_err = compressed_mean_error(dp_, model_, raw_grads_);
    }
  }
  ++pr_.global_batch;

  // The all-reduced gradients are the same on every rank; the buckets counted their non-finite
  // values on the communication thread where they could (the host paths), else the arena is
  // scanned here.
  const bool grads_finite = engine_ && r.comm.result_nonfinite >= 0 ? r.comm.result_nonfinite == 0
                                                                    : model_.grads_finite();
  // Every rank must take the same decision: a batch is a calibration batch, or skipped, when it
  // is one on any rank. The votes and the correct counts are summed over the ranks.
  const bool finite =
      std::isfinite(loss) && qctx.nonfinite == 0 && r.comm.nonfinite == 0 && grads_finite;
  // The preemption votes ride along: a signal caught by any rank stops every rank after this
  // step. The calibration batch is not a place to stop (its quantizer state is not checkpointed
  // mid-calibration): the vote is taken again on the next batch.
  int64_t votes[3 + kStopVotes] = {calibrating ? 1 : 0, finite ? 0 : 1, correct};
  stop_votes(votes + 3);
  dp_.sum(votes, 3 + kStopVotes);
  dp_.sum(&loss, 1);
  r.loss = loss / static_cast<float>(world_);
  r.calibration = votes[0] > 0;
  r.skipped = votes[1] > 0;
  r.correct = votes[2];
  if (!r.calibration) r.stop = decide_stop(votes + 3);
  r.nonfinite_grads = qctx.nonfinite;

  // Update: weights and quantizer scales, then the interval policies (the buckets' and the
  // layers'). A skipped step changes nothing and restores the BN statistics.
  if (r.skipped) {
    if (engine_) engine_->commit(false);
    model_.commit_quant_step(false);
    model_.restore_buffers();
    if (initialising) broadcast_model();
    ++pr_.skipped;
    ++pr_.consecutive_skips;
    return r;
  }
  pr_.consecutive_skips = 0;
  r.lr = scheduled_lr(schedule_, cfg_.optim.lr, pr_.global_batch - 1, total_batches_);
  if (r.calibration) {
    model_.commit_quant_step(false);  // calibration batch: no update, gamma stays calibrated
    if (engine_) engine_->commit(false);
  } else {
    opt_.step(r.lr);
    model_.commit_quant_step(true);
    if (engine_) engine_->commit(true);
    ++pr_.steps;
  }
  if (initialising) broadcast_model();
  const int64_t global_batch = batch_ * world_;
  pr_.epoch_loss_sum += r.loss * static_cast<double>(global_batch);
  pr_.epoch_correct += r.correct;
  pr_.epoch_seen += global_batch;
  images_done_ += global_batch;
  r.step_s = seconds_since(t_step);
  return r;
}

void Trainer::log_step(const StepResult& r) {
  for (const std::string& w : r.warnings)
    err_ << "int4ddp: warning: " << (world_ > 1 ? "rank " + std::to_string(rank_) + ": " : "") << w
         << "\n";
  if (r.skipped) {
    metrics_->write({{"type", "skip"},
                     {"batch", pr_.global_batch},
                     {"loss", finite_or_null(r.loss)},
                     {"nonfinite_grads", r.nonfinite_grads}});
    if (rank_ == 0)
      err_ << "int4ddp: warning: batch " << pr_.global_batch
           << " has a non-finite loss or gradient on some rank; step skipped\n";
    return;
  }
  epoch_time_.add(r.step_s, r.compute_s, r.comm);
  const double ips = images_done_ / std::max(seconds_since(t_start_), 1e-9);
  if (r.diagnostics && !model_.quantized_ops().empty())
    metrics_->write(
        {{"type", "quant"}, {"batch", pr_.global_batch}, {"layers", quant_diagnostics(model_)}});
  const int64_t global_batch = batch_ * world_;
  const bool print = cfg_.log.print_every > 0 && pr_.global_batch % cfg_.log.print_every == 0;
  if (print || r.calibration)
    metrics_->write(
        {{"type", "step"},
         {"epoch", pr_.epoch + 1},
         {"batch", pr_.global_batch},
         {"step", pr_.steps},
         {"loss", r.loss},
         {"accuracy", static_cast<double>(r.correct) / static_cast<double>(global_batch)},
         {"lr", r.lr},
         {"img_per_s", ips},
         {"calibration", r.calibration},
         {"skipped", pr_.skipped},
         {"step_s", r.step_s},
         {"compute_s", r.compute_s},
         {"comm", comm_json(r.comm, r.rel_err, engine_ != nullptr)}});
  if (bar_) {
    err_ << "\r[epoch " << pr_.epoch + 1 << "/" << cfg_.train.epochs << "] " << std::setw(5)
         << pr_.batch_in_epoch + 1 << "/" << per_epoch_ << "  loss " << std::fixed
         << std::setprecision(4) << r.loss << "  " << std::setprecision(0) << ips << " img/s   "
         << std::flush;
  } else if (print) {
    out_ << "epoch " << pr_.epoch + 1 << " batch " << pr_.batch_in_epoch + 1 << "/" << per_epoch_
         << " loss " << std::fixed << std::setprecision(4) << r.loss << " lr "
         << std::setprecision(5) << r.lr << " " << std::setprecision(0) << ips << " img/s\n"
         << std::defaultfloat << std::flush;
  }
}

void Trainer::check_skips() const {
  INT4DDP_CHECK(pr_.consecutive_skips < cfg_.train.max_consecutive_skips,
                "training stopped: ", pr_.consecutive_skips,
                " consecutive steps with non-finite loss or gradients "
                "(train.max_consecutive_skips)");
}

void Trainer::checkpoint_step(const StepResult& r) {
  const int64_t every = cfg_.train.checkpoint_every_steps;
  if (every <= 0 || r.skipped || r.calibration || pr_.steps == 0 || pr_.steps % every != 0) return;
  Progress next = pr_;  // the checkpoint resumes after this batch
  ++next.batch_in_epoch;
  save_checkpoint(cfg_.train.checkpoint_dir + "/step_" + std::to_string(pr_.steps) + ".ckpt", cfg_,
                  model_, opt_, next, dp_);
  metrics_->sync();  // the metrics on disk cover at least what the checkpoint does
}

// After a preemption signal: every rank has finished the same step; the state after it goes to
// last.ckpt (collective), the metrics are synced, and the run ends without evaluation (the time
// before the hard kill is short). main prints where the checkpoint is and how to resume.
void Trainer::checkpoint_and_stop(const StepResult& r) {
  if (bar_) err_ << "\n";
  Progress next = pr_;  // the checkpoint resumes after this batch
  ++next.batch_in_epoch;
  stop_checkpoint_ = cfg_.train.checkpoint_dir + "/last.ckpt";
  save_checkpoint(stop_checkpoint_, cfg_, model_, opt_, next, dp_);
  metrics_->sync();
  // No rank exits before rank 0 has the checkpoint on disk: a launcher takes the first non-zero
  // exit as a failure and kills the ranks still running.
  if (dp_.enabled()) dp_.comm().barrier();
  stop_signal_ = r.stop.signal;
}

void Trainer::end_epoch() {
  if (bar_) err_ << "\n";
  stopped_ = step_limit_reached();
  const bool last = pr_.epoch + 1 == cfg_.train.epochs || stopped_;
  const bool eval_now = last || (cfg_.train.eval_every_epochs > 0 &&
                                 (pr_.epoch + 1) % cfg_.train.eval_every_epochs == 0);
  const int64_t seen = pr_.epoch_seen;
  json ej = {{"type", "epoch"},
             {"epoch", pr_.epoch + 1},
             {"train_loss", seen ? pr_.epoch_loss_sum / static_cast<double>(seen) : 0.0},
             {"train_accuracy", seen ? static_cast<double>(pr_.epoch_correct) / seen : 0.0},
             {"seconds", seconds_since(t_epoch_)},
             {"skipped", pr_.skipped}};
  if (engine_) ej["time"] = epoch_time_.to_json();
  // Ranks saw different batches: evaluate and checkpoint the mean BN statistics.
  if (dp_.enabled()) {
    model_.buffers_to_host();
    dp_.average_buffers(model_);
    model_.buffers_to_device();
  }
  if (eval_now) {
    last_eval_ = evaluate(model_, ds_.test, cfg_.train.eval_batch_size, &dp_.comm());
    evaluated_last_ = true;
    ej["test_loss"] = last_eval_.loss;
    ej["test_accuracy"] = last_eval_.accuracy;
    out_ << "epoch " << pr_.epoch + 1 << ": train loss " << std::fixed << std::setprecision(4)
         << ej["train_loss"].get<double>() << ", test loss " << last_eval_.loss
         << ", test accuracy " << std::setprecision(2) << 100.0 * last_eval_.accuracy << "%\n"
         << std::defaultfloat << std::flush;
  }
  metrics_->write(ej);
  const int every = cfg_.train.checkpoint_every_epochs;
  if (every > 0 && ((pr_.epoch + 1) % every == 0 || last)) {
    Progress next = pr_;  // the checkpoint resumes at the next epoch
    ++next.epoch;
    next.batch_in_epoch = 0;
    next.epoch_loss_sum = 0.0;
    next.epoch_correct = next.epoch_seen = 0;
    const std::string& dir = cfg_.train.checkpoint_dir;
    save_checkpoint(dir + "/epoch_" + std::to_string(pr_.epoch + 1) + ".ckpt", cfg_, model_, opt_,
                    next, dp_);
    save_checkpoint(dir + "/last.ckpt", cfg_, model_, opt_, next, dp_);
    metrics_->sync();
  }
}

RunSummary Trainer::finish() {
  if (stop_signal_ != 0) {
    RunSummary summary;
    summary.seconds = seconds_since(t_start_);
    summary.steps = pr_.steps;
    summary.skipped = pr_.skipped;
    summary.img_per_s = images_done_ / std::max(summary.seconds, 1e-9);
    summary.stop_signal = stop_signal_;
    summary.checkpoint = stop_checkpoint_;
    return summary;
  }
  if (!evaluated_last_)
    last_eval_ = evaluate(model_, ds_.test, cfg_.train.eval_batch_size, &dp_.comm());
  RunSummary summary;
  summary.seconds = seconds_since(t_start_);
  summary.test_accuracy = last_eval_.accuracy;
  summary.test_loss = last_eval_.loss;
  summary.steps = pr_.steps;
  summary.skipped = pr_.skipped;
  summary.img_per_s = images_done_ / std::max(summary.seconds, 1e-9);
  metrics_->write({{"type", "final"},
                   {"test_accuracy", summary.test_accuracy},
                   {"test_loss", summary.test_loss},
                   {"steps", summary.steps},
                   {"skipped", summary.skipped},
                   {"seconds", summary.seconds},
                   {"img_per_s", summary.img_per_s}});
  out_ << "final test accuracy: " << std::fixed << std::setprecision(2)
       << 100.0 * summary.test_accuracy << "% (" << summary.steps << " steps, " << summary.skipped
       << " skipped, " << std::setprecision(1) << summary.seconds << " s, " << std::setprecision(0)
       << summary.img_per_s << " img/s)\n"
       << std::defaultfloat;
  return summary;
}

}  // namespace

RunSummary run_training(const Config& cfg, std::ostream& out, std::ostream& err) {
  validate(cfg);
  // From here on SIGTERM / SIGINT / SIGUSR1 end the run gracefully after the current step; a
  // second signal ends it at once.
  PreemptGuard preempt;
  Trainer trainer(cfg, out, err);
  return trainer.run();
}

EvalSummary run_eval(const std::string& checkpoint, const std::vector<std::string>& overrides,
                     std::ostream& out) {
  const Checkpoint ck = Checkpoint::read(checkpoint);
  Config cfg =
      parse_config(ck.get_string("config_yaml"), checkpoint + " (embedded config)", overrides);
  Datasets ds = load_datasets(cfg);
  nn::Model model(model_spec(cfg, ds.train), static_cast<uint64_t>(cfg.train.seed));
  load_checkpoint(ck, checkpoint, model, nullptr);
  const EvalResult r = evaluate(model, ds.test, cfg.train.eval_batch_size);
  out << "int4ddp eval: " << checkpoint << ": test accuracy " << std::fixed << std::setprecision(2)
      << 100.0 * r.accuracy << "%, loss " << std::setprecision(4) << r.loss << " on "
      << ds.test.count << " examples\n"
      << std::defaultfloat;
  json j = {{"accuracy", r.accuracy}, {"loss", r.loss}, {"count", ds.test.count}};
  out << j.dump() << "\n";
  return {r.accuracy, r.loss, ds.test.count};
}

}  // namespace int4ddp::train
