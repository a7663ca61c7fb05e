// Run safety: the checks and the writers that keep a training run from losing work it could have
// kept (DESIGN.md section 5; graceful preemption is in preempt.h).
//
// Invariant: every output location is known writable before the first step, every byte of metrics
// that reaches the file is checked, and the metrics file of a resumed run reads as one run (no
// duplicated or backwards steps). Everything here throws int4ddp::Error naming the config key, the
// path and the OS reason; nothing prints. Rank 0 is the only rank that writes today (checkpoints
// and metrics), so rank 0 is the rank that calls the checks and the writers.
//
// Where the trainer calls each piece (run_training()):
//   before the first step, fresh run:  check_fresh_run(), then check_output_locations()
//   before the first step, resume:     check_resume_config(), check_output_locations(),
//                                      rewind_metrics() (after the checkpoint is loaded)
//   every metrics record:              MetricsWriter::write()
//   the .config.json next to metrics:  write_file_atomically()
//   a skipped step's loss:             finite_or_null()
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "src/config/config.h"

namespace int4ddp::train {

class Checkpoint;

// ---- 1. Output locations, checked before the first step ----------------------------------------

// Creates the checkpoint directory and the metrics file's directory (as the run would), proves
// each writable by creating, writing and removing a small probe file in it, and checks that an
// existing metrics file and its ".config.json" sibling are regular files that can be opened for
// writing (without changing them). An empty metrics_path means "no metrics" and is not checked.
// Throws Error naming the key (train.checkpoint_dir / log.metrics_path), the path and the OS
// reason, e.g. "train.checkpoint_dir = '/ro/ck': cannot create directory '/ro/ck': Read-only
// file system". Called on every rank that writes, before the first step (a full epoch used to be
// lost to a checkpoint directory that could never be written).
void check_output_locations(const std::string& checkpoint_dir, const std::string& metrics_path);

// ---- 2. Checked metrics writer -----------------------------------------------------------------

// A JSON-lines file whose every write is checked: each line goes to the kernel with write(2) in a
// full-write loop (short writes and EINTR continue), so nothing sits in a user-space buffer. A
// failed write throws Error naming the key, the file and the OS reason (ENOSPC on a full disk),
// after cutting the file back to its last complete line, so the file stays valid JSON lines.
//
// A failed metrics write stops training (the Error propagates out of run_training()) rather than
// warning and going on: the metrics file is the run's only record of its curve, a run that goes
// on without it produces results nobody can plot or check, and the disk that refused a few
// hundred bytes of metrics will refuse the next checkpoint too. Stopping at once keeps the last
// checkpoint and a metrics file that rewind_metrics() can line up with it on --resume.
//
// An empty path gives a disabled writer (every write is a no-op), as log.metrics_path = "" asks.
class MetricsWriter {
 public:
  enum class Mode { kAppend, kTruncate };
  MetricsWriter() = default;  // disabled
  // Opens (creating it and its directory) path; key names the config key in errors.
  MetricsWriter(const std::string& path, Mode mode, const std::string& key = "log.metrics_path");
  ~MetricsWriter();
  MetricsWriter(MetricsWriter&& other) noexcept;
  MetricsWriter& operator=(MetricsWriter&& other) noexcept;
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  bool enabled() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }
  // One record as one line (strings that are not UTF-8 are replaced, never a throw from JSON).
  void write(const nlohmann::json& record);
  // line + '\n'; line must not contain '\n'.
  void write_line(std::string_view line);
  // fsync: the lines written so far survive a crash of the machine (call it when a checkpoint is
  // written, so the metrics on disk reach at least the checkpoint's step).
  void sync();
  // Checked close (network file systems report write errors at close); the destructor closes
  // without checking.
  void close();

 private:
  [[noreturn]] void fail(const char* what, int err);
  int fd_ = -1;
  std::string path_, key_;
  int64_t size_ = 0;  // bytes of complete lines in the file
};

// Writes text to path atomically: "<path>.tmp.<pid>", write + fsync, rename over path, fsync of
// the directory. A reader sees the old file or the new one, never a mix. Throws Error naming key,
// the file and the OS reason (the temp file is removed).
void write_file_atomically(const std::string& path, std::string_view text, const std::string& key);

// ---- 3. Resumed metrics continue from the checkpoint's step ------------------------------------

// What a rewind kept and dropped.
struct MetricsRewind {
  int64_t kept = 0;        // records kept
  int64_t dropped = 0;     // records after the checkpoint (and "final" records), dropped
  bool torn_tail = false;  // the last line was cut mid-write (a crash) and was dropped
};

// On --resume, before the metrics file is opened for append: rewrites the JSON-lines file at path
// (atomically, write_file_atomically) keeping only the records of the run up to the checkpoint,
// given the checkpoint's Progress (global_batch = batches done, completed_epochs = Progress.epoch,
// the epochs whose "epoch" record had been written when the checkpoint was taken):
//   - a record with an integer "batch" (types step, quant, skip, and any future per-batch record)
//     is kept iff batch <= global_batch (the trainer writes "batch" after counting the batch, so
//     batch == global_batch is the checkpoint's own last batch);
//   - an "epoch" record is kept iff epoch <= completed_epochs (a step checkpoint inside epoch e
//     has epoch = e - 1 completed, and the resumed run writes epoch e's record itself);
//   - a "final" record is dropped (the resumed run writes its own);
//   - any other record (no "batch", another type) is kept.
// Kept lines are copied byte for byte. A last line without its '\n' that is not valid JSON is a
// write cut by a crash and is dropped; an invalid line anywhere else is an Error naming the file
// and line (the file is not a metrics file this run wrote). A missing file is left missing.
MetricsRewind rewind_metrics(const std::string& path, int64_t global_batch,
                             int64_t completed_epochs);

// ---- 6. A fresh run does not clobber another ----------------------------------------------------

// For a run without --resume: if log.metrics_path already holds records (a non-empty file) or
// train.checkpoint_dir holds "*.ckpt" files, throws Error naming what is there, --resume (with the
// newest checkpoint) and train.overwrite: true; with overwrite = true returns a one-line notice of
// what will be replaced instead. Returns "" when nothing is there. Call it before
// check_output_locations (which creates the directories).
std::string check_fresh_run(const std::string& checkpoint_dir, const std::string& metrics_path,
                            bool overwrite);

// ---- 7. Resume with a changed config ------------------------------------------------------------

// One key whose value differs between the checkpoint's config and this run's.
struct ConfigChange {
  std::string key;              // "section.name"
  std::string stored, current;  // values as JSON text ("absent" if the key is missing on a side)
  bool allowed = false;         // may_change_on_resume(key)
};

// Keys that may differ on resume: those that only decide how long the run goes, where and how
// often it writes and evaluates, and how fast it runs, never the trajectory of the weights up to
// the stop point:
//   train.epochs, train.max_steps, train.checkpoint_every_steps, train.checkpoint_every_epochs,
//   train.checkpoint_dir, train.keep_checkpoints, train.overwrite, train.threads (results do not
//   depend on it), train.eval_every_epochs, train.eval_batch_size, train.max_consecutive_skips,
//   data.path (the same files elsewhere), log.* (all).
// train.resume is not compared (it always differs). train.epochs is allowed although it moves the
// learning-rate schedule (milestones, warm-up and cosine are fractions of train.epochs): training
// longer is its purpose; check_resume_config() says so in its report.
bool may_change_on_resume(const std::string& key);

// The keys (two-level "section.name", sections and keys in stored then current order) whose values
// differ between two configs as config_to_json() writes them. train.resume is skipped.
std::vector<ConfigChange> diff_configs(const std::string& stored_json,
                                       const std::string& current_json);

// Lists every changed key. Returns the text to print (one line per key, "" when nothing changed);
// throws Error with the same list when a key outside may_change_on_resume() changed, naming the
// checkpoint and what to do.
std::string check_resume_config(const std::string& stored_json, const std::string& current_json,
                                const std::string& checkpoint_path);
// The same with the config the checkpoint stores (its "config_yaml" record: the full resolved
// config, written by save_checkpoint) against the current one.
std::string check_resume_config(const Checkpoint& ck, const std::string& checkpoint_path,
                                const Config& current);

// ---- 8. Metrics values
// ---------------------------------------------------------------------------

// v as a JSON number, or null when v is NaN or infinite (a skipped step's loss is logged as null,
// not as a sentinel like -1 that a plot would draw as a real loss).
nlohmann::json finite_or_null(double v);

}  // namespace int4ddp::train
