// Checkpoint container (see checkpoint.h).
#include "src/train/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <utility>

#include "kernels/common/error.h"

namespace int4ddp::train {
namespace {

namespace fs = std::filesystem;

constexpr char kMagic[4] = {'I', '4', 'C', 'K'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 4 + 4 + 8 + 4;

uint32_t crc_of(const std::vector<uint8_t>& payload) {
  uLong crc = crc32(0L, Z_NULL, 0);
  size_t off = 0;
  while (off < payload.size()) {  // crc32 takes uInt lengths
    const uInt chunk = static_cast<uInt>(std::min<size_t>(payload.size() - off, 1u << 30));
    crc = crc32(crc, payload.data() + off, chunk);
    off += chunk;
  }
  return static_cast<uint32_t>(crc);
}

template <typename T>
void append(std::vector<uint8_t>& out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof v);
}

// This host's name, as it appears in temporary file names ("unknown-host" if it has none).
std::string host_name() {
  char buf[HOST_NAME_MAX + 1] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "unknown-host";
  return buf;
}

// write(2) until every byte is out; false (errno set) on the first failure.
bool write_all(int fd, const std::vector<uint8_t>& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      return false;
    }
    off += static_cast<size_t>(n);
  }
  return true;
}

// fsync of a directory, so that a rename inside it is durable.
void sync_directory(const std::string& dir, const std::string& path) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    INT4DDP_FAIL("checkpoint ", path, ": cannot open its directory ", dir,
                 " to sync it: ", std::strerror(err));
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot sync a directory (EINVAL); the file itself is synced already.
  INT4DDP_CHECK(rc == 0 || err == EINVAL, "checkpoint ", path, ": syncing the directory ", dir,
                " failed: ", std::strerror(err));
}

}  // namespace

void Checkpoint::put(const std::string& name, const void* data, size_t nbytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  records_[name] = std::vector<uint8_t>(p, p + nbytes);
}

const std::vector<uint8_t>& Checkpoint::get(const std::string& name) const {
  auto it = records_.find(name);
  INT4DDP_CHECK(it != records_.end(), source_, ": record '", name,
                "' is missing (not an int4ddp checkpoint of this kind?)");
  return it->second;
}

std::string Checkpoint::get_string(const std::string& name) const {
  const auto& r = get(name);
  return std::string(r.begin(), r.end());
}

void Checkpoint::check_size(const std::string& name, size_t got, size_t want) const {
  INT4DDP_CHECK(got == want, source_, ": record '", name, "' has ", got, " bytes, expected ", want);
}

void Checkpoint::check_multiple(const std::string& name, size_t got, size_t unit) const {
  INT4DDP_CHECK(got % unit == 0, source_, ": record '", name, "' has ", got,
                " bytes, not a multiple of ", unit);
}

void Checkpoint::write(const std::string& path) const {
  std::vector<uint8_t> payload;
  for (const auto& [name, data] : records_) {
    append<uint32_t>(payload, static_cast<uint32_t>(name.size()));
    payload.insert(payload.end(), name.begin(), name.end());
    append<uint64_t>(payload, data.size());
    payload.insert(payload.end(), data.begin(), data.end());
  }
  std::vector<uint8_t> header(kMagic, kMagic + 4);
  append<uint32_t>(header, kVersion);
  append<uint64_t>(header, payload.size());
  append<uint32_t>(header, crc_of(payload));

  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(dir, ec);
  INT4DDP_CHECK(!ec, "checkpoint ", path, ": cannot create the directory ", dir.string(), ": ",
                ec.message());
  const std::string tmp = path + ".tmp." + host_name() + "." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    INT4DDP_FAIL("checkpoint ", path, ": cannot create ", tmp, ": ", std::strerror(err));
  }
  // The data reaches the disk before the rename makes it the checkpoint, and the rename reaches
  // the disk (the directory is synced) before write() returns: after a crash or power loss the
  // path holds the old checkpoint or the complete new one.
  const char* failed = nullptr;
  int err = 0;
  if (!write_all(fd, header) || !write_all(fd, payload)) {
    failed = "writing";
    err = errno;
  } else if (::fsync(fd) != 0) {
    failed = "syncing";
    err = errno;
  }
  if (::close(fd) != 0 && failed == nullptr) {
    failed = "closing";
    err = errno;
  }
  if (failed != nullptr) {
    ::unlink(tmp.c_str());
    INT4DDP_FAIL("checkpoint ", path, ": ", failed, " ", tmp, " failed: ", std::strerror(err),
                 " (disk full?); the previous checkpoint, if any, is unchanged");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int rename_err = errno;
    ::unlink(tmp.c_str());
    INT4DDP_FAIL("checkpoint ", path, ": cannot rename ", tmp,
                 " to it: ", std::strerror(rename_err));
  }
  sync_directory(dir.string(), path);
}

std::vector<std::string> remove_stale_temp_files(const std::string& dir) {
  std::vector<std::string> removed;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return removed;
  const std::string host_marker = ".tmp." + host_name() + ".";
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const size_t at = name.rfind(host_marker);
    if (at == std::string::npos || name.find(".ckpt") == std::string::npos) continue;
    const std::string pid_text = name.substr(at + host_marker.size());
    if (pid_text.empty() || pid_text.size() > 9 ||
        pid_text.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const auto pid = static_cast<pid_t>(std::stol(pid_text));
    // kill(pid, 0) fails with ESRCH only if no such process exists; EPERM means it is alive.
    if (pid <= 0 || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    if (fs::remove(entry.path(), ec)) removed.push_back(entry.path().string());
  }
  return removed;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, int keep) {
  INT4DDP_CHECK(keep >= 0, "prune_checkpoints: keep = ", keep, " is negative");
  std::vector<std::string> removed;
  std::error_code ec;
  if (keep == 0 || !fs::is_directory(dir, ec)) return removed;
  // series ("step_" or "epoch_") -> (number, path), newest last after sorting
  std::map<std::string, std::vector<std::pair<uint64_t, fs::path>>> series;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    for (const char* prefix : {"step_", "epoch_"}) {
      const size_t plen = std::strlen(prefix);
      if (name.size() <= plen + 5 || name.compare(0, plen, prefix) != 0 ||
          name.compare(name.size() - 5, 5, ".ckpt") != 0)
        continue;
      const std::string digits = name.substr(plen, name.size() - plen - 5);
      if (digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos)
        continue;
      series[prefix].emplace_back(std::stoull(digits), entry.path());
    }
  }
  for (auto& [prefix, files] : series) {
    if (files.size() <= static_cast<size_t>(keep)) continue;
    std::sort(files.begin(), files.end());
    for (size_t i = 0; i + static_cast<size_t>(keep) < files.size(); ++i) {
      if (fs::remove(files[i].second, ec)) removed.push_back(files[i].second.string());
    }
  }
  return removed;
}

Checkpoint Checkpoint::read(const std::string& path) {
  std::error_code ec;
  INT4DDP_CHECK(!std::filesystem::is_directory(path, ec), "checkpoint ", path,
                ": is a directory, not a checkpoint file");
  std::ifstream f(path, std::ios::binary);
  INT4DDP_CHECK(f.good(), "checkpoint ", path, ": cannot open");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  INT4DDP_CHECK(!f.bad(), "checkpoint ", path, ": read error");
  return parse(bytes, path);
}

Checkpoint Checkpoint::parse(const std::vector<uint8_t>& bytes, const std::string& path) {
  INT4DDP_CHECK(bytes.size() >= kHeaderBytes && std::memcmp(bytes.data(), kMagic, 4) == 0,
                "checkpoint ", path, ": not an int4ddp checkpoint (bad magic or too short)");
  uint32_t version, crc;
  uint64_t size;
  std::memcpy(&version, bytes.data() + 4, 4);
  std::memcpy(&size, bytes.data() + 8, 8);
  std::memcpy(&crc, bytes.data() + 16, 4);
  INT4DDP_CHECK(version == kVersion, "checkpoint ", path, ": version ", version,
                " is not supported (expected ", kVersion, ")");
  INT4DDP_CHECK(bytes.size() - kHeaderBytes == size, "checkpoint ", path, ": truncated or padded (",
                bytes.size() - kHeaderBytes, " payload bytes, header says ", size, ")");
  std::vector<uint8_t> payload(bytes.begin() + kHeaderBytes, bytes.end());
  INT4DDP_CHECK(crc_of(payload) == crc, "checkpoint ", path, ": CRC mismatch (corrupt file)");
  Checkpoint ck;
  ck.source_ = "checkpoint " + path;
  size_t off = 0;
  // n is a length from the file (up to 2^64 - 1): compare it with what is left, never off + n.
  auto need = [&](uint64_t n) {
    INT4DDP_CHECK(n <= payload.size() - off, "checkpoint ", path, ": malformed record table");
  };
  while (off < payload.size()) {
    uint32_t nlen;
    uint64_t dlen;
    need(4);
    std::memcpy(&nlen, payload.data() + off, 4);
    off += 4;
    need(nlen);
    std::string name(payload.begin() + static_cast<std::ptrdiff_t>(off),
                     payload.begin() + static_cast<std::ptrdiff_t>(off + nlen));
    off += nlen;
    need(8);
    std::memcpy(&dlen, payload.data() + off, 8);
    off += 8;
    need(dlen);
    ck.records_[name] =
        std::vector<uint8_t>(payload.begin() + static_cast<std::ptrdiff_t>(off),
                             payload.begin() + static_cast<std::ptrdiff_t>(off + dlen));
    off += dlen;
  }
  return ck;
}

}  // namespace int4ddp::train
