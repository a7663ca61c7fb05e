// Checkpoint container (see checkpoint.h).
#include "src/train/checkpoint.h"

#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "kernels/common/error.h"

namespace int4ddp::train {
namespace {

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

  const std::filesystem::path target(path);
  if (target.has_parent_path()) std::filesystem::create_directories(target.parent_path());
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    INT4DDP_CHECK(f.good(), "checkpoint: cannot write ", tmp);
    f.write(reinterpret_cast<const char*>(header.data()),
            static_cast<std::streamsize>(header.size()));
    f.write(reinterpret_cast<const char*>(payload.data()),
            static_cast<std::streamsize>(payload.size()));
    f.flush();
    if (!f.good()) {
      std::remove(tmp.c_str());
      INT4DDP_FAIL("checkpoint: writing ", tmp, " failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    INT4DDP_FAIL("checkpoint: cannot rename ", tmp, " to ", path, ": ", std::strerror(err));
  }
}

Checkpoint Checkpoint::read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  INT4DDP_CHECK(f.good(), "checkpoint ", path, ": cannot open");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
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
  auto need = [&](size_t n) {
    INT4DDP_CHECK(off + n <= payload.size(), "checkpoint ", path, ": malformed record table");
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
