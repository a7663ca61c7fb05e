// Data-parallel training end to end: the int4ddp binary under mpirun (label mpi).
//   - fp32 all-reduce on N ranks with batch B follows single-process training with batch N*B
//     step for step (same examples per global batch; only the float summation order differs);
//   - the INT4 two-shot trains, and a resumed 2-rank run continues bit for bit; so does the
//     hierarchical all-reduce on 4 ranks grouped as 2 nodes of 2 (INT4DDP_RANKS_PER_NODE=2);
//   - mismatched configs are refused, a killed rank takes the job down instead of hanging, and a
//     checkpoint is refused by a run with another number of ranks.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kBin = INT4DDP_BIN;
const std::string kMpirun = std::string(INT4DDP_MPIEXEC) +
                            " --allow-run-as-root --oversubscribe --bind-to none"
                            " --mca btl self,vader,tcp";

std::string temp_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("int4ddp_test_dp_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

// A small synthetic mlp run; `extra` is appended YAML-free as --set overrides by the caller.
std::string write_config(const std::string& dir, int bits, const std::string& mode) {
  const std::string path = dir + "/config.yaml";
  std::ofstream f(path);
  f << "model: {name: mlp, mlp_hidden: [128, 128]}\n"
    << "data: {dataset: synthetic, synthetic_train_size: 4096, synthetic_test_size: 1024}\n"
    << "quant: {weight_bits: " << bits << ", activation_bits: " << bits << ", grad_bits: " << bits
    << "}\n"
    << "comm: {backend: mpi, mode: " << mode << ", bucket_mb: 0.25, block_size: 64}\n"
    << "optim: {lr: 0.05}\n"
    << "train: {epochs: 1, eval_batch_size: 512, checkpoint_every_epochs: 0, threads: 1}\n"
    << "log: {progress: 'off', print_every: 1, diagnostics_every: 10}\n";
  return path;
}

struct Result {
  int status = -1;
  double seconds = 0;
  std::string output;
};

Result run(const std::string& cmd, const std::string& log) {
  const auto t0 = std::chrono::steady_clock::now();
  const int st = std::system((cmd + " > " + log + " 2>&1").c_str());
  Result r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  r.output = ss.str();
  return r;
}

std::string train_cmd(const std::string& config, const std::string& dir, const std::string& tag,
                      const std::string& sets) {
  return kBin + " train --config " + config + " --set log.metrics_path=" + dir + "/" + tag +
         ".jsonl --set train.checkpoint_dir=" + dir + "/ck_" + tag + " " + sets;
}

std::vector<json> records(const std::string& path, const std::string& type) {
  std::vector<json> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    json j = json::parse(line);
    if (j["type"] == type) out.push_back(j);
  }
  return out;
}

// Metrics without wall-clock fields, for exact comparison.
std::vector<json> untimed(const std::string& path) {
  std::vector<json> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    json j = json::parse(line);
    for (const char* k : {"img_per_s", "seconds", "step_s", "compute_s", "time"}) j.erase(k);
    if (j.contains("comm") && j["comm"].is_object())
      for (const char* k : {"quant_s", "comm_s", "comm_wait_s"}) j["comm"].erase(k);
    out.push_back(j);
  }
  return out;
}

// Resumes the run tagged "full" in dir from its step-40 checkpoint (launcher: the mpirun prefix)
// and expects the resumed metrics to equal the tail of the full run's, line for line.
void expect_resume_continues_bit_for_bit(const std::string& launcher, const std::string& cfg,
                                         const std::string& dir, const std::string& sets) {
  Result resumed =
      run(launcher + train_cmd(cfg, dir, "resumed",
                               sets + " --set train.resume=" + dir + "/ck_full/step_40.ckpt"),
          dir + "/resumed.log");
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  const auto a = untimed(dir + "/full.jsonl"), b = untimed(dir + "/resumed.jsonl");
  ASSERT_GT(b.size(), 20u);
  ASSERT_LE(b.size(), a.size());
  const size_t off = a.size() - b.size();
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(b[i], a[off + i]) << "line " << i;
}

TEST(DataParallel, Fp32MatchesSingleProcessWithNTimesTheBatch) {
  const std::string dir = temp_dir("fp32");
  const std::string cfg = write_config(dir, 32, "fp32");
  const std::string common = "--set train.max_steps=25 --set optim.momentum=0.9";
  Result single = run(
      train_cmd(cfg, dir, "single", common + " --set comm.backend=none --set train.batch_size=128"),
      dir + "/single.log");
  ASSERT_EQ(single.status, 0) << single.output;
  const auto ref = records(dir + "/single.jsonl", "step");
  ASSERT_EQ(ref.size(), 25u);
  for (int n : {2, 4}) {
    const std::string tag = "dp" + std::to_string(n);
    Result dp = run(
        kMpirun + " -np " + std::to_string(n) + " " +
            train_cmd(cfg, dir, tag, common + " --set train.batch_size=" + std::to_string(128 / n)),
        dir + "/" + tag + ".log");
    ASSERT_EQ(dp.status, 0) << dp.output;
    const auto got = records(dir + "/" + tag + ".jsonl", "step");
    ASSERT_EQ(got.size(), ref.size()) << n << " ranks";
    // The same examples make each global batch; the mean of N per-rank means differs from the
    // mean of 128 only by float rounding, which 25 steps of SGD keep far below 1e-4.
    for (size_t i = 0; i < ref.size(); ++i) {
      const double a = ref[i]["loss"], b = got[i]["loss"];
      EXPECT_NEAR(a, b, 1e-4 * std::max(1.0, std::fabs(a))) << n << " ranks, step " << i;
      EXPECT_EQ(ref[i]["accuracy"], got[i]["accuracy"]) << n << " ranks, step " << i;
    }
    const double acc_ref = records(dir + "/single.jsonl", "final")[0]["test_accuracy"];
    const double acc_dp = records(dir + "/" + tag + ".jsonl", "final")[0]["test_accuracy"];
    EXPECT_NEAR(acc_ref, acc_dp, 2.0 / 1024) << n << " ranks";  // at most 2 test examples apart
  }
  fs::remove_all(dir);
}

// 2 ranks with the INT4 two-shot and 4/4/4 layers learn the synthetic task (nearest-centroid
// accuracy 0.87; chance 0.1), report the compressed traffic, and a run resumed from a mid-epoch
// checkpoint (error feedback, gammas, per-rank quantizer state) continues bit for bit.
TEST(DataParallel, Int4TrainsAndResumesBitForBit) {
  const std::string dir = temp_dir("int4");
  const std::string cfg = write_config(dir, 4, "int4");
  const std::string sets =
      "--set train.epochs=3 --set train.batch_size=64 --set train.checkpoint_every_steps=40";
  Result full = run(kMpirun + " -np 2 " + train_cmd(cfg, dir, "full", sets), dir + "/full.log");
  ASSERT_EQ(full.status, 0) << full.output;
  const double acc = records(dir + "/full.jsonl", "final")[0]["test_accuracy"];
  EXPECT_GT(acc, 0.8);
  const auto steps = records(dir + "/full.jsonl", "step");
  ASSERT_FALSE(steps.empty());
  const json& c = steps.back()["comm"];
  ASSERT_TRUE(c.is_object());
  EXPECT_GT(c["bytes_sent"].get<double>(), 0);
  EXPECT_GT(c["compression_ratio"].get<double>(), 4.0);  // INT4 + scales vs fp32, 2 ranks

  expect_resume_continues_bit_for_bit(kMpirun + " -np 2 ", cfg, dir, sets);

  // The same checkpoint with one rank: refused, naming the rank counts.
  Result one =
      run(train_cmd(cfg, dir, "one", sets + " --set train.resume=" + dir + "/ck_full/step_40.ckpt"),
          dir + "/one.log");
  EXPECT_NE(one.status, 0);
  EXPECT_NE(one.output.find("written by 2 ranks"), std::string::npos) << one.output;
  fs::remove_all(dir);
}

// The hierarchy (comm/hierarchy.h) under the trainer: 2 nodes x 2 ranks (all ranks share this
// machine, so the grouping is forced), trains, and resumes bit for bit (error feedback and gammas
// of each rank's share are in the checkpoint).
TEST(DataParallel, HierarchicalInt4TrainsAndResumesBitForBit) {
  const std::string dir = temp_dir("hier");
  const std::string cfg = write_config(dir, 4, "int4");
  const std::string sets =
      "--set train.epochs=3 --set train.batch_size=32 --set train.checkpoint_every_steps=40 "
      "--set comm.hierarchy=node";
  const std::string mpirun = kMpirun + " -np 4 -x INT4DDP_RANKS_PER_NODE=2 ";
  Result full = run(mpirun + train_cmd(cfg, dir, "full", sets), dir + "/full.log");
  ASSERT_EQ(full.status, 0) << full.output;
  EXPECT_NE(full.output.find("comm.hierarchy: node -> node (2 nodes x 2 ranks"), std::string::npos)
      << full.output;
  EXPECT_GT(records(dir + "/full.jsonl", "final")[0]["test_accuracy"].get<double>(), 0.8);
  expect_resume_continues_bit_for_bit(mpirun, cfg, dir, sets);
  fs::remove_all(dir);
}

TEST(DataParallel, MismatchedConfigsAreRefused) {
  const std::string dir = temp_dir("mismatch");
  const std::string cfg = write_config(dir, 32, "fp32");
  // MPMD: rank 1 gets another seed.
  Result r = run(kMpirun + " -np 1 " + train_cmd(cfg, dir, "a", "") + " : -np 1 " +
                     train_cmd(cfg, dir, "a", "--set train.seed=7"),
                 dir + "/mismatch.log");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("config differs between ranks"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

TEST(DataParallel, KilledRankStopsTheJobInBoundedTime) {
  const std::string dir = temp_dir("kill");
  const std::string cfg = write_config(dir, 32, "fp32");
  const std::string train = train_cmd(cfg, dir, "k", "--set train.epochs=1000");
  // Rank 1 is started by a shell that kills it with SIGKILL after 3 s of training.
  const std::string victim = "bash -c '" + train + " & p=$!; sleep 3; kill -9 $p; wait $p'";
  Result r =
      run("timeout 120 " + kMpirun + " -np 1 " + train + " : -np 1 " + victim, dir + "/kill.log");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.status, 124) << "mpirun still running after 120 s: the surviving rank hung";
  EXPECT_LT(r.seconds, 60.0) << r.output;
  fs::remove_all(dir);
}

}  // namespace
