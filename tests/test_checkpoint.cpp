// Checkpoint container: round trip, durability of write() (no partial file on failure, the path
// named), the stale temporary files of dead writers, retention, and a directory given as a file.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <climits>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "src/train/checkpoint.h"

namespace fs = std::filesystem;
using int4ddp::Error;
using int4ddp::train::Checkpoint;
using int4ddp::train::prune_checkpoints;
using int4ddp::train::remove_stale_temp_files;

namespace {

// A fresh directory under the temp dir, removed with its contents at the end of the test.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("int4ddp_test_checkpoint_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

void touch(const std::string& path) { std::ofstream(path) << "x"; }

std::string host() {
  char buf[HOST_NAME_MAX + 1] = {};
  EXPECT_EQ(::gethostname(buf, sizeof buf - 1), 0);
  return buf;
}

// The pid of a child that has exited and been reaped: no process has it (until it is reused).
pid_t dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return pid;
}

Checkpoint sample(size_t floats) {
  Checkpoint ck;
  ck.put_string("config_yaml", "model:\n  name: mlp\n");
  ck.put_value<int64_t>("optimizer_steps", 42);
  ck.put_vector("values", std::vector<float>(floats, 0.25f));
  return ck;
}

}  // namespace

TEST(Checkpoint, RoundTripLeavesNoTemporaryFile) {
  TempDir dir;
  sample(100).write(dir / "a.ckpt");
  EXPECT_EQ(names_in(dir.path()), std::set<std::string>{"a.ckpt"});
  const Checkpoint ck = Checkpoint::read(dir / "a.ckpt");
  EXPECT_EQ(ck.get_value<int64_t>("optimizer_steps"), 42);
  EXPECT_EQ(ck.get_vector<float>("values"), std::vector<float>(100, 0.25f));
  EXPECT_EQ(ck.get_string("config_yaml"), "model:\n  name: mlp\n");
}

TEST(Checkpoint, DirectoryAsCheckpointNamesThePath) {
  TempDir dir;
  const std::string msg = error_of([&] { Checkpoint::read(dir.path().string()); });
  EXPECT_NE(msg.find(dir.path().string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("is a directory"), std::string::npos) << msg;
}

TEST(Checkpoint, MissingFileNamesThePath) {
  TempDir dir;
  const std::string msg = error_of([&] { Checkpoint::read(dir / "nope.ckpt"); });
  EXPECT_NE(msg.find(dir / "nope.ckpt"), std::string::npos) << msg;
}

TEST(Checkpoint, DirectoryUnderARegularFileNamesThePath) {
  TempDir dir;
  touch(dir / "file");
  const std::string target = dir / "file/sub/a.ckpt";
  const std::string msg = error_of([&] { sample(10).write(target); });
  EXPECT_NE(msg.find(target), std::string::npos) << msg;
}

// A write that fails part way (here: the file size limit, as a full disk would) leaves no
// temporary file, keeps the previous checkpoint and names the path.
TEST(Checkpoint, FailedWriteLeavesNoPartialFile) {
  TempDir dir;
  const std::string target = dir / "last.ckpt";
  sample(10).write(target);
  const auto old_size = fs::file_size(target);

  struct rlimit saved;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string msg = error_of([&] { sample(1 << 16).write(target); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, old_handler);

  EXPECT_NE(msg.find(target), std::string::npos) << msg;
  EXPECT_NE(msg.find("writing"), std::string::npos) << msg;
  EXPECT_EQ(names_in(dir.path()), std::set<std::string>{"last.ckpt"});
  EXPECT_EQ(fs::file_size(target), old_size);
  EXPECT_EQ(Checkpoint::read(target).get_vector<float>("values").size(), 10u);
}

TEST(Checkpoint, StaleTemporaryFileOfADeadWriterIsRemoved) {
  TempDir dir;
  const std::string dead = dir / ("step_10.ckpt.tmp." + host() + "." + std::to_string(dead_pid()));
  const std::string live = dir / ("step_20.ckpt.tmp." + host() + "." + std::to_string(::getpid()));
  const std::string live_parent =
      dir / ("epoch_1.ckpt.tmp." + host() + "." + std::to_string(::getppid()));
  const std::string other_host =
      dir / ("last.ckpt.tmp.some-other-host." + std::to_string(dead_pid()));
  const std::string no_host = dir / ("last.ckpt.tmp." + std::to_string(dead_pid()));
  for (const auto& f : {dead, live, live_parent, other_host, no_host}) touch(f);
  touch(dir / "step_10.ckpt");

  EXPECT_EQ(remove_stale_temp_files(dir.path().string()), std::vector<std::string>{dead});
  EXPECT_FALSE(fs::exists(dead));
  for (const auto& f : {live, live_parent, other_host, no_host, dir / "step_10.ckpt"})
    EXPECT_TRUE(fs::exists(f)) << f;
  EXPECT_TRUE(remove_stale_temp_files(dir / "missing").empty());
}

TEST(Checkpoint, RetentionKeepsExactlyTheNewestK) {
  TempDir dir;
  for (int n : {1, 2, 3, 10, 20, 100}) touch(dir / ("step_" + std::to_string(n) + ".ckpt"));
  for (int n : {1, 2, 3, 4}) touch(dir / ("epoch_" + std::to_string(n) + ".ckpt"));
  for (const char* other : {"last.ckpt", "best.ckpt", "step_x.ckpt", "notes.txt"})
    touch(dir / other);

  EXPECT_TRUE(prune_checkpoints(dir.path().string(), 0).empty());  // 0 keeps everything
  EXPECT_EQ(names_in(dir.path()).size(), 14u);

  const auto removed = prune_checkpoints(dir.path().string(), 3);
  EXPECT_EQ(removed.size(), 4u);
  EXPECT_EQ(names_in(dir.path()),
            (std::set<std::string>{"step_10.ckpt", "step_20.ckpt", "step_100.ckpt", "epoch_2.ckpt",
                                   "epoch_3.ckpt", "epoch_4.ckpt", "last.ckpt", "best.ckpt",
                                   "step_x.ckpt", "notes.txt"}));
  EXPECT_TRUE(prune_checkpoints(dir.path().string(), 3).empty());
  prune_checkpoints(dir.path().string(), 1);
  EXPECT_TRUE(fs::exists(dir / "step_100.ckpt"));
  EXPECT_TRUE(fs::exists(dir / "epoch_4.ckpt"));
  EXPECT_FALSE(fs::exists(dir / "step_20.ckpt"));
  EXPECT_FALSE(fs::exists(dir / "epoch_3.ckpt"));
  EXPECT_THROW(prune_checkpoints(dir.path().string(), -1), Error);
}

// A record length near 2^64 (with a correct CRC) once wrapped the bounds check (off + length) and
// reached std::vector's length_error; found by fuzz_checkpoint.
TEST(Checkpoint, HugeRecordLengthIsMalformed) {
  std::vector<uint8_t> payload;
  const uint32_t name_bytes = 1;
  const uint64_t data_bytes = ~uint64_t{0} - 2;
  payload.insert(payload.end(), reinterpret_cast<const uint8_t*>(&name_bytes),
                 reinterpret_cast<const uint8_t*>(&name_bytes) + 4);
  payload.push_back('v');
  payload.insert(payload.end(), reinterpret_cast<const uint8_t*>(&data_bytes),
                 reinterpret_cast<const uint8_t*>(&data_bytes) + 8);
  payload.insert(payload.end(), 4, 0);
  std::vector<uint8_t> file = {'I', '4', 'C', 'K', 1, 0, 0, 0};
  const uint64_t size = payload.size();
  const auto crc = static_cast<uint32_t>(
      crc32(crc32(0L, Z_NULL, 0), payload.data(), static_cast<uInt>(payload.size())));
  file.insert(file.end(), reinterpret_cast<const uint8_t*>(&size),
              reinterpret_cast<const uint8_t*>(&size) + 8);
  file.insert(file.end(), reinterpret_cast<const uint8_t*>(&crc),
              reinterpret_cast<const uint8_t*>(&crc) + 4);
  file.insert(file.end(), payload.begin(), payload.end());
  const std::string msg = error_of([&] { Checkpoint::parse(file, "huge.ckpt"); });
  EXPECT_NE(msg.find("huge.ckpt: malformed record table"), std::string::npos) << msg;
}
