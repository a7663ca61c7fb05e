// Run safety (src/train/run_safety.h) and graceful preemption (src/train/preempt.h), one process:
// output locations that cannot be written fail before the first step naming the key (a path under
// a regular file, /proc, a read-only file system); metrics writes fail loudly on a full disk
// (/dev/full, a full tmpfs) and leave only complete lines; a resumed run's metrics are cut back to
// the checkpoint (the issue's 30, 40, 50, 51 -> resume at 50 -> 60 case); a fresh run refuses an
// existing run directory; a resume with a changed config lists the keys and refuses training keys;
// a first signal is recorded, a second one kills.
//
// Read-only and full file systems as root: chmod does not stop root, so these tests mount a small
// tmpfs (read-only, or of a few pages) inside a private mount namespace of a forked child; where
// mounting is not allowed (no CAP_SYS_ADMIN) they skip, and a non-root run tests chmod instead.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kernels/common/error.h"
#include "src/config/config.h"
#include "src/train/checkpoint.h"
#include "src/train/preempt.h"
#include "src/train/run_safety.h"

namespace int4ddp::train {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Whether text contains part (printing both when it does not).
::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << part << "\" is not in \"" << text << "\"";
}

// A fresh directory for one test.
std::string temp_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path p =
      fs::temp_directory_path() /
      ("int4ddp_test_run_safety_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

// The message of the Error that fn throws ("" if it throws none; other exceptions fail the test).
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---- a tmpfs in a private mount namespace -------------------------------------------------------

constexpr int kNoMountExit = 77;

// Runs body in a forked child that has its own mount namespace and a tmpfs of size_kb mounted at
// dir; setup runs on the writable tmpfs first, then (read_only) it is remounted read-only. The
// mounts vanish with the child. Returns body's result, or nullopt where this machine does not let
// a process mount (then the test skips).
std::optional<std::string> on_tmpfs(const std::string& dir, int size_kb, bool read_only,
                                    const std::function<void()>& setup,
                                    const std::function<std::string()>& body) {
  int fds[2];
  if (::pipe(fds) != 0) return std::string("pipe failed");
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    const std::string opts = "size=" + std::to_string(size_kb) + "k";
    if (::unshare(CLONE_NEWNS) != 0 ||
        ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("tmpfs", dir.c_str(), "tmpfs", 0, opts.c_str()) != 0)
      ::_exit(kNoMountExit);
    std::string out;
    try {
      setup();
      if (read_only &&
          ::mount("tmpfs", dir.c_str(), "tmpfs", MS_REMOUNT | MS_RDONLY, opts.c_str()) != 0)
        ::_exit(kNoMountExit);
      out = body();
    } catch (const std::exception& e) {
      out = std::string("unexpected exception: ") + e.what();
    }
    (void)!::write(fds[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;)
    out.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == kNoMountExit) return std::nullopt;
  return out;
}

// ---- 1. output locations
// --------------------------------------------------------------------------

TEST(OutputLocations, CreatesMissingParentsAndLeavesNoProbeFiles) {
  const std::string d = temp_dir();
  const std::string ck = d + "/a/b/ck", metrics = d + "/x/y/metrics.jsonl";
  EXPECT_NO_THROW(check_output_locations(ck, metrics));
  EXPECT_TRUE(fs::is_directory(ck));
  EXPECT_TRUE(fs::is_directory(d + "/x/y"));
  EXPECT_TRUE(fs::is_empty(ck));
  EXPECT_TRUE(fs::is_empty(d + "/x/y"));  // no metrics file yet, no probe left behind
  // Existing files are not changed.
  write_text(metrics, "{\"type\":\"step\",\"batch\":1}\n");
  EXPECT_NO_THROW(check_output_locations(ck, metrics));
  EXPECT_EQ(read_file(metrics), "{\"type\":\"step\",\"batch\":1}\n");
  // No metrics: only the checkpoint directory is checked.
  EXPECT_NO_THROW(check_output_locations(ck, ""));
}

TEST(OutputLocations, PathUnderARegularFileNamesKeyPathAndReason) {
  const std::string d = temp_dir();
  write_text(d + "/file", "x");
  const std::string ck_msg = error_of([&] { check_output_locations(d + "/file/ck", ""); });
  EXPECT_TRUE(Contains(ck_msg, "train.checkpoint_dir = '" + d + "/file/ck'"));
  EXPECT_TRUE(Contains(ck_msg, "Not a directory"));
  const std::string m_msg =
      error_of([&] { check_output_locations(d + "/ck", d + "/file/sub/metrics.jsonl"); });
  EXPECT_TRUE(Contains(m_msg, "log.metrics_path = '" + d + "/file/sub/metrics.jsonl'"));
  EXPECT_TRUE(Contains(m_msg, "Not a directory"));
  // The checkpoint directory is a regular file itself.
  EXPECT_TRUE(
      Contains(error_of([&] { check_output_locations(d + "/file", ""); }), "train.checkpoint_dir"));
}

TEST(OutputLocations, ProcRefusesEvenRoot) {
  if (!fs::is_directory("/proc/self")) GTEST_SKIP() << "no /proc";
  const std::string msg = error_of([] { check_output_locations("/proc/int4ddp_ck", ""); });
  EXPECT_TRUE(Contains(msg, "train.checkpoint_dir = '/proc/int4ddp_ck'"));
  EXPECT_TRUE(Contains(msg, "cannot create directory"));
}

TEST(OutputLocations, MetricsPathThatIsADirectory) {
  const std::string d = temp_dir();
  fs::create_directories(d + "/m.jsonl");
  EXPECT_TRUE(
      Contains(error_of([&] { check_output_locations(d + "/ck", d + "/m.jsonl"); }),
               "log.metrics_path = '" + d + "/m.jsonl': '" + d + "/m.jsonl' is a directory"));
  fs::create_directories(d + "/n.jsonl.config.json");
  EXPECT_TRUE(Contains(error_of([&] { check_output_locations(d + "/ck", d + "/n.jsonl"); }),
                       "n.jsonl.config.json' is a directory"));
}

TEST(OutputLocations, ReadOnlyFileSystem) {
  const std::string d = temp_dir();
  const std::string ro = d + "/ro";
  fs::create_directories(ro);
  const auto out = on_tmpfs(
      ro, 64, /*read_only=*/true, [&] { fs::create_directories(ro + "/ck"); },
      [&] {
        // An existing directory on a read-only file system: only the probe file finds out.
        std::string r = error_of([&] { check_output_locations(ro + "/ck", ""); }) + "\n";
        // A directory still to be created there.
        r += error_of([&] { check_output_locations(ro + "/new/ck", ""); }) + "\n";
        r += error_of([&] { check_output_locations(d + "/ck", ro + "/metrics.jsonl"); });
        return r;
      });
  if (!out) GTEST_SKIP() << "this machine does not allow mounting a tmpfs";
  EXPECT_TRUE(Contains(*out, "train.checkpoint_dir = '" + ro +
                                 "/ck': cannot create a file in "
                                 "directory '" +
                                 ro + "/ck': Read-only file system"));
  EXPECT_TRUE(Contains(*out, "train.checkpoint_dir = '" + ro +
                                 "/new/ck': cannot create "
                                 "directory '" +
                                 ro + "/new/ck': Read-only file system"));
  EXPECT_TRUE(Contains(*out, "log.metrics_path = '" + ro + "/metrics.jsonl'"));
}

TEST(OutputLocations, UnwritableDirectoryForNonRoot) {
  if (::geteuid() == 0) GTEST_SKIP() << "root writes through chmod; see ReadOnlyFileSystem";
  const std::string d = temp_dir();
  fs::create_directories(d + "/ck");
  fs::permissions(d + "/ck", fs::perms::owner_read | fs::perms::owner_exec);
  EXPECT_TRUE(
      Contains(error_of([&] { check_output_locations(d + "/ck", ""); }), "Permission denied"));
  fs::permissions(d + "/ck", fs::perms::owner_all);
}

// ---- 2. checked metrics writer ----------------------------------------------------------------

TEST(MetricsWriter, WritesCompleteLinesAppendsAndTruncates) {
  const std::string d = temp_dir();
  const std::string path = d + "/sub/metrics.jsonl";
  {
    MetricsWriter w(path, MetricsWriter::Mode::kTruncate);
    w.write({{"type", "step"}, {"batch", 1}});
    w.write_line("{\"type\":\"step\",\"batch\":2}");
    w.sync();
    w.close();
  }
  EXPECT_EQ(read_file(path), "{\"batch\":1,\"type\":\"step\"}\n{\"type\":\"step\",\"batch\":2}\n");
  {
    MetricsWriter w(path, MetricsWriter::Mode::kAppend);
    w.write({{"type", "final"}});
  }
  EXPECT_EQ(read_file(path),
            "{\"batch\":1,\"type\":\"step\"}\n{\"type\":\"step\",\"batch\":2}\n"
            "{\"type\":\"final\"}\n");
  { MetricsWriter w(path, MetricsWriter::Mode::kTruncate); }
  EXPECT_EQ(read_file(path), "");
  EXPECT_TRUE(Contains(error_of([&] {
                         MetricsWriter w(path, MetricsWriter::Mode::kAppend);
                         w.write_line("a\nb");
                       }),
                       "one line"));
  MetricsWriter off;  // log.metrics_path = "": nothing is written, nothing fails
  EXPECT_FALSE(off.enabled());
  EXPECT_NO_THROW(off.write({{"type", "step"}}));
}

TEST(MetricsWriter, FullDeviceIsAnErrorNamingTheFile) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  MetricsWriter w("/dev/full", MetricsWriter::Mode::kAppend);
  const std::string msg = error_of([&] { w.write({{"type", "step"}, {"batch", 1}}); });
  EXPECT_TRUE(Contains(msg, "log.metrics_path = '/dev/full'"));
  EXPECT_TRUE(Contains(msg, "No space left on device"));
}

TEST(MetricsWriter, FullFileSystemKeepsOnlyCompleteLines) {
  const std::string d = temp_dir();
  const std::string mnt = d + "/small";
  fs::create_directories(mnt);
  const std::string path = mnt + "/metrics.jsonl";
  const auto out = on_tmpfs(
      mnt, 16, /*read_only=*/false, [] {},
      [&] {
        MetricsWriter w(path, MetricsWriter::Mode::kTruncate);
        const std::string pad(100, 'x');
        std::string msg;
        int64_t lines = 0;
        for (; lines < 100000 && msg.empty(); ++lines)
          msg = error_of([&] { w.write({{"type", "step"}, {"batch", lines}, {"pad", pad}}); });
        // Hand the file's content back through the pipe after the error.
        return msg + "\n--file--\n" + read_file(path);
      });
  if (!out) GTEST_SKIP() << "this machine does not allow mounting a tmpfs";
  const size_t split = out->find("\n--file--\n");
  ASSERT_NE(split, std::string::npos);
  const std::string msg = out->substr(0, split), file = out->substr(split + 10);
  EXPECT_TRUE(Contains(msg, "log.metrics_path = '" + path + "'"));
  EXPECT_TRUE(Contains(msg, "No space left on device"));
  ASSERT_FALSE(file.empty());
  EXPECT_EQ(file.back(), '\n');  // cut back to the last complete record
  std::istringstream lines(file);
  int64_t n = 0;
  for (std::string line; std::getline(lines, line); ++n) {
    const json r = json::parse(line, nullptr, false);
    ASSERT_FALSE(r.is_discarded()) << "line " << n + 1 << ": " << line;
    EXPECT_EQ(r["batch"].get<int64_t>(), n);
  }
  EXPECT_GT(n, 10);
}

TEST(WriteFileAtomically, ReplacesAndFailsNamingTheKey) {
  const std::string d = temp_dir();
  const std::string path = d + "/metrics.jsonl.config.json";
  write_file_atomically(path, "{\"a\":1}\n", "log.metrics_path");
  write_file_atomically(path, "{\"a\":2}\n", "log.metrics_path");
  EXPECT_EQ(read_file(path), "{\"a\":2}\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(d), fs::directory_iterator()), 1);  // no temp
  write_text(d + "/file", "x");
  const std::string msg =
      error_of([&] { write_file_atomically(d + "/file/c.json", "{}", "log.metrics_path"); });
  EXPECT_TRUE(Contains(msg, "log.metrics_path = '" + d + "/file/c.json'"));
  EXPECT_TRUE(Contains(msg, "Not a directory"));
}

// ---- 3. resumed metrics
// --------------------------------------------------------------------------

json step_record(int64_t batch, int epoch) {
  return {{"type", "step"}, {"epoch", epoch}, {"batch", batch}, {"step", batch}, {"loss", 0.5}};
}

// The "batch" of every step record, in file order.
std::vector<int64_t> step_batches(const std::string& path) {
  std::vector<int64_t> out;
  std::istringstream lines(read_file(path));
  for (std::string line; std::getline(lines, line);) {
    const json r = json::parse(line);
    if (r["type"] == "step") out.push_back(r["batch"].get<int64_t>());
  }
  return out;
}

// The issue's case: steps 30, 40, 50, 51 were written, the run was killed, and resumed from the
// checkpoint of step 50; before the rewind the file read 30, 40, 50, 51, 40, 50, 51, 60.
TEST(RewindMetrics, IssueScenarioHasNoDuplicatedOrBackwardsSteps) {
  const std::string d = temp_dir();
  const std::string path = d + "/metrics.jsonl";
  {
    MetricsWriter w(path, MetricsWriter::Mode::kTruncate);
    for (int64_t b : {10, 20, 30}) w.write(step_record(b, 1));
    w.write({{"type", "epoch"}, {"epoch", 1}, {"train_loss", 0.7}});
    w.write(step_record(40, 2));
    w.write({{"type", "quant"}, {"batch", 50}, {"layers", json::array()}});
    w.write(step_record(50, 2));
    w.write({{"type", "skip"}, {"batch", 51}, {"loss", nullptr}});
    w.write(step_record(51, 2));
  }
  // The kill cut the next record mid-line.
  std::ofstream(path, std::ios::app) << "{\"type\":\"step\",\"epoch\":2,\"bat";

  // Resume from the checkpoint of batch 50 (inside epoch 2: one epoch completed).
  const MetricsRewind r = rewind_metrics(path, /*global_batch=*/50, /*completed_epochs=*/1);
  EXPECT_EQ(r.kept, 7);
  EXPECT_EQ(r.dropped, 2);  // the skip and the step of batch 51
  EXPECT_TRUE(r.torn_tail);
  {
    MetricsWriter w(path, MetricsWriter::Mode::kAppend);  // the resumed run goes on
    for (int64_t b : {60, 70}) w.write(step_record(b, 2));
  }
  EXPECT_EQ(step_batches(path), (std::vector<int64_t>{10, 20, 30, 40, 50, 60, 70}));
  EXPECT_EQ(std::distance(fs::directory_iterator(d), fs::directory_iterator()), 1);  // no temp
}

TEST(RewindMetrics, EpochAndFinalRecords) {
  const std::string d = temp_dir();
  const std::string path = d + "/metrics.jsonl";
  {
    MetricsWriter w(path, MetricsWriter::Mode::kTruncate);
    w.write(step_record(10, 1));
    w.write({{"type", "epoch"}, {"epoch", 1}});
    w.write(step_record(20, 2));
    w.write({{"type", "epoch"}, {"epoch", 2}});
    w.write({{"type", "final"}, {"steps", 20}});
  }
  // Resumed from the end-of-epoch-2 checkpoint (to train more epochs): both epochs stay, the old
  // final record goes (the resumed run writes its own).
  const MetricsRewind r = rewind_metrics(path, 20, 2);
  EXPECT_EQ(r.kept, 4);
  EXPECT_EQ(r.dropped, 1);
  EXPECT_FALSE(r.torn_tail);
  // Resumed from a step checkpoint at batch 15 inside epoch 2: epoch 2's record is dropped.
  rewind_metrics(path, 15, 1);
  EXPECT_EQ(read_file(path),
            "{\"batch\":10,\"epoch\":1,\"loss\":0.5,\"step\":10,\"type\":\"step\"}\n"
            "{\"epoch\":1,\"type\":\"epoch\"}\n");
}

TEST(RewindMetrics, CompleteLastLineWithoutNewlineIsKept) {
  const std::string d = temp_dir();
  const std::string path = d + "/metrics.jsonl";
  write_text(path, "{\"type\":\"step\",\"batch\":1}\n{\"type\":\"step\",\"batch\":2}");
  const MetricsRewind r = rewind_metrics(path, 5, 0);
  EXPECT_EQ(r.kept, 2);
  EXPECT_FALSE(r.torn_tail);
  EXPECT_EQ(read_file(path), "{\"type\":\"step\",\"batch\":1}\n{\"type\":\"step\",\"batch\":2}\n");
}

TEST(RewindMetrics, BrokenLineInTheMiddleIsAnErrorAndMissingFileIsFine) {
  const std::string d = temp_dir();
  const std::string path = d + "/metrics.jsonl";
  const std::string text =
      "{\"type\":\"step\",\"batch\":1}\nnot json\n{\"type\":\"step\",\"batch\":2}\n";
  write_text(path, text);
  const std::string msg = error_of([&] { rewind_metrics(path, 5, 0); });
  EXPECT_TRUE(Contains(msg, "log.metrics_path = '" + path + "'"));
  EXPECT_TRUE(Contains(msg, "line 2"));
  EXPECT_EQ(read_file(path), text);  // untouched
  const MetricsRewind none = rewind_metrics(d + "/absent.jsonl", 5, 0);
  EXPECT_EQ(none.kept + none.dropped, 0);
  EXPECT_FALSE(fs::exists(d + "/absent.jsonl"));
}

// ---- 6. fresh run over an existing run
// ------------------------------------------------------------

TEST(FreshRun, RefusesAnExistingRunUnlessOverwrite) {
  const std::string d = temp_dir();
  const std::string ck = d + "/ck", metrics = d + "/metrics.jsonl";
  EXPECT_EQ(check_fresh_run(ck, metrics, false), "");  // nothing there yet
  fs::create_directories(ck);
  write_text(metrics, "");
  write_text(ck + "/notes.txt", "x");
  EXPECT_EQ(check_fresh_run(ck, metrics, false), "");  // an empty file, no checkpoints

  write_text(metrics, "{\"type\":\"step\",\"batch\":1}\n");
  std::string msg = error_of([&] { check_fresh_run(ck, metrics, false); });
  EXPECT_TRUE(Contains(msg, "log.metrics_path = '" + metrics + "'"));
  EXPECT_TRUE(Contains(msg, "no checkpoint to continue it with --resume"));
  EXPECT_TRUE(Contains(msg, "train.overwrite: true"));

  write_text(ck + "/epoch_1.ckpt", "x");
  write_text(ck + "/last.ckpt", "x");
  msg = error_of([&] { check_fresh_run(ck, metrics, false); });
  EXPECT_TRUE(Contains(msg, "train.checkpoint_dir = '" + ck + "'"));
  EXPECT_TRUE(Contains(msg, "2 checkpoint(s)"));
  EXPECT_TRUE(Contains(msg, "--resume " + ck + "/last.ckpt"));
  EXPECT_TRUE(Contains(msg, "train.overwrite: true"));

  fs::remove(metrics);  // checkpoints alone are a run too
  EXPECT_TRUE(Contains(error_of([&] { check_fresh_run(ck, metrics, false); }), "--resume"));

  std::string notice;
  EXPECT_NO_THROW(notice = check_fresh_run(ck, metrics, true));
  EXPECT_TRUE(Contains(notice, "train.overwrite: true"));
  EXPECT_TRUE(Contains(notice, ck));
}

// ---- 7. resume with a changed config (keys set through apply_override, the config's public API)
// --------------------------------------------------------------

TEST(ResumeConfig, SameConfigAndResumeKeyAreNoChange) {
  Config a;
  Config b = a;
  apply_override(b, "train.resume=runs/checkpoints/last.ckpt");
  EXPECT_EQ(check_resume_config(config_to_json(a), config_to_json(b), "x.ckpt"), "");
}

TEST(ResumeConfig, AllowedChangesArePrintedWithTheScheduleNote) {
  Config a;
  Config b = a;
  apply_override(b, "train.epochs=40");
  apply_override(b, "log.print_every=7");
  apply_override(b, "data.path=/elsewhere");
  std::string text;
  EXPECT_NO_THROW(text = check_resume_config(config_to_json(a), config_to_json(b), "x.ckpt"));
  EXPECT_TRUE(Contains(text, "x.ckpt"));
  EXPECT_TRUE(Contains(text, "in 3 key(s)"));
  EXPECT_TRUE(Contains(text, "train.epochs: 20 -> 40"));
  EXPECT_TRUE(Contains(text, "learning-rate schedule"));
  EXPECT_TRUE(Contains(text, "log.print_every: 50 -> 7"));
  EXPECT_TRUE(Contains(text, "data.path: \"/usr/share/datasets/fashion-mnist\" -> \"/elsewhere\""));
}

TEST(ResumeConfig, DeviceMayChangeAndMayBeAbsentFromOldCheckpoints) {
  // A CPU checkpoint resumes on the GPU and back (the bits then differ, DESIGN.md section 3), and
  // a checkpoint written before train.device existed resumes.
  Config a;
  Config b = a;
  b.train.device = TrainDevice::kCuda;
  std::string text;
  EXPECT_NO_THROW(text = check_resume_config(config_to_json(a), config_to_json(b), "x.ckpt"));
  EXPECT_TRUE(Contains(text, "train.device: \"cpu\" -> \"cuda\""));
  nlohmann::json old = nlohmann::json::parse(config_to_json(a));
  old["train"].erase("device");
  EXPECT_NO_THROW(text = check_resume_config(old.dump(), config_to_json(a), "x.ckpt"));
  EXPECT_TRUE(Contains(text, "train.device: absent -> \"cpu\""));
}

TEST(ResumeConfig, TrainingKeysAreRefusedListingEveryChange) {
  Config a;
  Config b = a;
  apply_override(b, "optim.lr=0.2");
  apply_override(b, "quant.grad_policy=minmax");
  apply_override(b, "train.epochs=30");
  const std::string msg =
      error_of([&] { check_resume_config(config_to_json(a), config_to_json(b), "x.ckpt"); });
  EXPECT_TRUE(Contains(msg, "optim.lr: 0.1 -> 0.2  (may not change on resume)"));
  EXPECT_TRUE(Contains(msg, "quant.grad_policy: \"lbt\" -> \"minmax\"  (may not change"));
  EXPECT_TRUE(Contains(msg, "train.epochs: 20 -> 30"));  // listed although allowed
  EXPECT_TRUE(Contains(msg, "refusing to resume: quant.grad_policy, optim.lr"));
}

TEST(ResumeConfig, ReadsTheCheckpointsEmbeddedConfig) {
  Config a;
  Checkpoint ck;
  ck.put_string("config_yaml", config_to_yaml(a));
  Config b = a;
  EXPECT_EQ(check_resume_config(ck, "x.ckpt", b), "");
  apply_override(b, "model.name=mlp");
  EXPECT_TRUE(Contains(error_of([&] { check_resume_config(ck, "x.ckpt", b); }),
                       "model.name: \"cnn\" -> \"mlp\""));
}

TEST(ResumeConfig, KeysOnOneSideOnly) {
  const auto changes = diff_configs(R"({"train":{"epochs":2,"old_key":1}})",
                                    R"({"train":{"epochs":2,"keep_checkpoints":3}})");
  ASSERT_EQ(changes.size(), 2u);
  EXPECT_EQ(changes[0].key, "train.old_key");
  EXPECT_EQ(changes[0].current, "absent");
  EXPECT_FALSE(changes[0].allowed);
  EXPECT_EQ(changes[1].key, "train.keep_checkpoints");
  EXPECT_EQ(changes[1].stored, "absent");
  EXPECT_TRUE(changes[1].allowed);
  EXPECT_TRUE(Contains(error_of([] { diff_configs("not json", "{}"); }), "checkpoint's config"));
}

// ---- 8. null loss -------------------------------------------------------------------------------

TEST(FiniteOrNull, NonFiniteIsNull) {
  EXPECT_TRUE(finite_or_null(std::numeric_limits<double>::quiet_NaN()).is_null());
  EXPECT_TRUE(finite_or_null(-std::numeric_limits<double>::infinity()).is_null());
  EXPECT_EQ(finite_or_null(1.5), json(1.5));
  const json skip = {{"type", "skip"}, {"loss", finite_or_null(std::nan(""))}};
  EXPECT_EQ(skip.dump(), "{\"loss\":null,\"type\":\"skip\"}");
}

// ---- 4. preemption, one process ----------------------------------------------------------------

TEST(Preempt, FirstSignalIsRecordedAndDoesNotKill) {
  for (int sig : kPreemptSignals) {
    PreemptGuard guard;
    EXPECT_EQ(PreemptGuard::caught_signal(), 0);
    ::raise(sig);
    EXPECT_EQ(PreemptGuard::caught_signal(), sig) << signal_name(sig);
    int64_t votes[kStopVotes];
    stop_votes(votes);
    const StopDecision d = decide_stop(votes);
    EXPECT_TRUE(d.stop);
    EXPECT_EQ(d.signal, sig);
  }
}

TEST(Preempt, SecondSignalKillsAtOnce) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        PreemptGuard guard;
        ::raise(SIGTERM);
        ::raise(SIGTERM);
        std::_Exit(0);  // not reached
      },
      ::testing::KilledBySignal(SIGTERM), "second signal");
  EXPECT_EXIT(
      {
        PreemptGuard guard;
        ::raise(SIGINT);
        ::raise(SIGTERM);
        std::_Exit(0);
      },
      ::testing::KilledBySignal(SIGTERM), "SIGINT received.*\n.*second signal");
}

TEST(Preempt, RestoresThePreviousDispositionAndIsUnique) {
  struct sigaction ignore, before, after;
  std::memset(&ignore, 0, sizeof ignore);
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ASSERT_EQ(::sigaction(SIGUSR1, &ignore, &before), 0);
  {
    PreemptGuard guard;
    EXPECT_TRUE(Contains(error_of([] { PreemptGuard second; }), "one guard"));
  }
  ASSERT_EQ(::sigaction(SIGUSR1, &before, &after), 0);
  EXPECT_EQ(after.sa_handler, SIG_IGN);
  PreemptGuard again;  // the first one is gone
}

TEST(Preempt, DecisionIsTheSameWhateverRankVoted) {
  const int64_t none[kStopVotes] = {0, 0, 0};
  EXPECT_FALSE(decide_stop(none).stop);
  const int64_t int_and_term[kStopVotes] = {1, 2, 0};  // SIGTERM preferred
  EXPECT_EQ(decide_stop(int_and_term).signal, SIGTERM);
  const int64_t usr1[kStopVotes] = {0, 0, 3};
  EXPECT_EQ(decide_stop(usr1).signal, SIGUSR1);
  // One rank, no signal: no stop; after a signal: stop.
  auto comm = comm::make_local_communicator();
  PreemptGuard guard;
  EXPECT_FALSE(stop_requested(*comm).stop);
  ::raise(SIGINT);
  const StopDecision d = stop_requested(*comm);
  EXPECT_TRUE(d.stop);
  EXPECT_EQ(d.signal, SIGINT);
}

TEST(Preempt, MessageAndResumeCommand) {
  EXPECT_EQ(preempt_exit_code(SIGTERM), 143);
  EXPECT_EQ(preempt_exit_code(SIGINT), 130);
  EXPECT_EQ(resume_command(
                {"./build/int4ddp", "train", "--config", "configs/cnn.yaml", "--resume", "old.ckpt",
                 "--set", "log.metrics_path=my runs/m.jsonl", "--set", "train.resume=older.ckpt"},
                "runs/ck/last.ckpt", 2),
            "mpirun -np 2 ./build/int4ddp train --config configs/cnn.yaml --set "
            "'log.metrics_path=my runs/m.jsonl' --resume runs/ck/last.ckpt");
  EXPECT_EQ(resume_command({"int4ddp", "train", "-c", "it's.yaml", "--resume=a.ckpt"}, "b.ckpt", 1),
            "int4ddp train -c 'it'\\''s.yaml' --resume b.ckpt");
  const std::string msg = preempt_message(SIGTERM, 1234, "runs/ck/last.ckpt", "int4ddp train x");
  EXPECT_TRUE(Contains(msg, "stopped by SIGTERM after step 1234"));
  EXPECT_TRUE(Contains(msg, "checkpoint written to runs/ck/last.ckpt"));
  EXPECT_TRUE(Contains(msg, "resume with: int4ddp train x"));
  EXPECT_TRUE(Contains(msg, "exit code 143"));
}

}  // namespace
}  // namespace int4ddp::train
