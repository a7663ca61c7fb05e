// Checkpoint files: named binary records behind a header with a CRC, written atomically.
//
// Layout (host byte order, little-endian on every supported target):
//   "I4CK" | u32 version | u64 payload bytes | u32 crc32(payload) | payload
//   payload = records back to back: u32 name bytes | name | u64 data bytes | data
// write() goes to "<path>.tmp.<pid>", flushes, then renames over path, so a reader sees the old
// file or the new one, never a partial one. read() refuses a file with another magic or version, a
// size that disagrees with the header, or a CRC mismatch (truncated or corrupt), naming the file.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace int4ddp::train {

class Checkpoint {
 public:
  void put(const std::string& name, const void* data, size_t nbytes);
  void put_string(const std::string& name, const std::string& s) { put(name, s.data(), s.size()); }
  template <typename T>
  void put_vector(const std::string& name, const std::vector<T>& v) {
    put(name, v.data(), v.size() * sizeof(T));
  }
  template <typename T>
  void put_value(const std::string& name, T v) {
    put(name, &v, sizeof v);
  }

  bool has(const std::string& name) const { return records_.count(name) > 0; }
  // Throws Error (naming the file and record) if the record is missing or has another size.
  const std::vector<uint8_t>& get(const std::string& name) const;
  std::string get_string(const std::string& name) const;
  template <typename T>
  std::vector<T> get_vector(const std::string& name) const {
    const auto& r = get(name);
    check_multiple(name, r.size(), sizeof(T));
    std::vector<T> v(r.size() / sizeof(T));
    if (!r.empty()) std::memcpy(v.data(), r.data(), r.size());
    return v;
  }
  template <typename T>
  T get_value(const std::string& name) const {
    const auto& r = get(name);
    check_size(name, r.size(), sizeof(T));
    T v;
    std::memcpy(&v, r.data(), sizeof v);
    return v;
  }

  void write(const std::string& path) const;
  static Checkpoint read(const std::string& path);

 private:
  void check_size(const std::string& name, size_t got, size_t want) const;
  void check_multiple(const std::string& name, size_t got, size_t unit) const;
  std::map<std::string, std::vector<uint8_t>> records_;
  std::string source_ = "checkpoint";
};

}  // namespace int4ddp::train
