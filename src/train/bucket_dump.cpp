// Bucket dumps (see bucket_dump.h): the writer the trainer calls on dump steps, the reader the
// replay experiment uses, and the fresh-run check of the dump directory.
#include "src/train/bucket_dump.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "kernels/common/error.h"
#include "src/train/run_safety.h"

namespace int4ddp::train {
namespace fs = std::filesystem;
namespace {

constexpr char kKey[] = "comm.dump_buckets_dir";
constexpr char kMagic[8] = {'I', '4', 'D', 'D', 'P', 'B', 'K', 'T'};
constexpr uint32_t kVersion = 1;
constexpr size_t kModelChars = 16;
constexpr size_t kHeaderBytes =
    sizeof kMagic + 4 * sizeof(uint32_t) + sizeof(uint64_t) + kModelChars;

void put(std::string& out, const void* p, size_t nbytes) {
  out.append(static_cast<const char*>(p), nbytes);
}

// Creates dir unless it is one; throws Error naming the key.
void ensure_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!ec && !fs::is_directory(dir, ec) && !ec)
    ec = std::make_error_code(std::errc::not_a_directory);
  INT4DDP_CHECK(!ec, kKey, " = '", dir, "': cannot create the directory: ", ec.message());
}

}  // namespace

std::string bucket_dump_name(uint64_t step, uint32_t rank) {
  return "step_" + std::to_string(step) + ".rank_" + std::to_string(rank) + ".bkt";
}

void prepare_bucket_dump_dir(const std::string& dir, bool overwrite) {
  INT4DDP_CHECK(!dir.empty(), kKey, " is empty: set it to a directory");
  std::error_code ec;
  if (fs::is_directory(dir, ec)) {
    std::vector<fs::path> entries, dumps;
    for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
      entries.push_back(e.path());
      if (e.path().extension() == ".bkt") dumps.push_back(e.path());
    }
    INT4DDP_CHECK(!ec, kKey, " = '", dir, "': cannot list the directory: ", ec.message());
    INT4DDP_CHECK(entries.empty() || overwrite, kKey, " = '", dir, "' already holds ",
                  entries.size(), " entries (e.g. '", entries.empty() ? "" : entries[0].string(),
                  "'): choose another directory, or set train.overwrite: true to replace its "
                  "bucket dumps");
    for (const fs::path& p : dumps) {
      fs::remove(p, ec);
      INT4DDP_CHECK(!ec, kKey, " = '", dir, "': cannot remove '", p.string(), "': ", ec.message());
    }
  }
  ensure_dir(dir);
  // Proves the directory writable before the first step (a full or read-only file system).
  const std::string probe =
      (fs::path(dir) / (".dump-probe." + std::to_string(::getpid()))).string();
  write_file_atomically(probe, "probe\n", kKey);
  fs::remove(probe, ec);
}

void write_bucket_dump(const std::string& dir, const std::string& model, uint64_t step,
                       uint32_t rank, uint32_t ranks, const float* grads,
                       const std::vector<std::vector<comm::Segment>>& buckets) {
  INT4DDP_CHECK(model.size() < kModelChars, "bucket dump: model name '", model, "' is longer than ",
                kModelChars - 1, " characters");
  std::string out;
  put(out, kMagic, sizeof kMagic);
  const uint32_t head[4] = {kVersion, rank, ranks, static_cast<uint32_t>(buckets.size())};
  put(out, head, sizeof head);
  put(out, &step, sizeof step);
  char name[kModelChars] = {};
  std::memcpy(name, model.data(), model.size());
  put(out, name, sizeof name);
  for (const std::vector<comm::Segment>& b : buckets) {
    uint64_t count = 0;
    for (const comm::Segment& s : b) count += static_cast<uint64_t>(s.count);
    put(out, &count, sizeof count);
    for (const comm::Segment& s : b)
      put(out, grads + s.offset, sizeof(float) * static_cast<size_t>(s.count));
  }
  ensure_dir(dir);
  write_file_atomically((fs::path(dir) / bucket_dump_name(step, rank)).string(), out, kKey);
}

BucketDump read_bucket_dump(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  INT4DDP_CHECK(in.good(), "bucket dump '", path, "': cannot open the file");
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  INT4DDP_CHECK(!in.bad(), "bucket dump '", path, "': read error");
  INT4DDP_CHECK(data.size() >= kHeaderBytes && std::memcmp(data.data(), kMagic, 8) == 0,
                "bucket dump '", path, "': not a bucket dump (bad magic or shorter than its ",
                kHeaderBytes, "-byte header)");
  uint32_t head[4];
  std::memcpy(head, data.data() + 8, sizeof head);
  INT4DDP_CHECK(head[0] == kVersion, "bucket dump '", path, "': version ", head[0],
                " is not supported (expected ", kVersion, ")");
  BucketDump d;
  d.rank = head[1];
  d.ranks = head[2];
  INT4DDP_CHECK(d.ranks >= 1 && d.rank < d.ranks, "bucket dump '", path, "': rank ", d.rank, " of ",
                d.ranks);
  std::memcpy(&d.step, data.data() + 24, sizeof d.step);
  const char* name = data.data() + 32;
  d.model.assign(name, strnlen(name, kModelChars - 1));
  size_t at = kHeaderBytes;
  for (uint32_t b = 0; b < head[3]; ++b) {
    uint64_t count = 0;
    INT4DDP_CHECK(data.size() - at >= sizeof count, "bucket dump '", path,
                  "': truncated in bucket ", b, " of ", head[3]);
    std::memcpy(&count, data.data() + at, sizeof count);
    at += sizeof count;
    INT4DDP_CHECK(count <= (data.size() - at) / sizeof(float), "bucket dump '", path,
                  "': truncated in bucket ", b, " of ", head[3], " (", count, " floats announced)");
    std::vector<float> v(static_cast<size_t>(count));
    std::memcpy(v.data(), data.data() + at, sizeof(float) * v.size());
    at += sizeof(float) * v.size();
    d.buckets.push_back(std::move(v));
  }
  INT4DDP_CHECK(at == data.size(), "bucket dump '", path, "': ", data.size() - at,
                " trailing bytes after the last bucket");
  return d;
}

}  // namespace int4ddp::train
