// Checkpoint files: named binary records behind a header with a CRC, written atomically.
//
// Layout (host byte order, little-endian on every supported target):
//   "I4CK" | u32 version | u64 payload bytes | u32 crc32(payload) | payload
//   payload = records back to back: u32 name bytes | name | u64 data bytes | data
// write() goes to "<path>.tmp.<host>.<pid>", fsyncs it, renames it over path and fsyncs the
// directory, so a reader (even after a crash or power loss) sees the old file or the complete new
// one, never a partial one; a failed write removes its temporary file. read() refuses a file with
// another magic or version, a size that disagrees with the header, or a CRC mismatch (truncated or
// corrupt), naming the file.
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
  // Throws Error naming path if it is a directory, cannot be read, or fails parse()'s checks.
  static Checkpoint read(const std::string& path);
  // The checkpoint held in bytes (a whole file); path names it in messages.
  static Checkpoint parse(const std::vector<uint8_t>& bytes, const std::string& path);

 private:
  void check_size(const std::string& name, size_t got, size_t want) const;
  void check_multiple(const std::string& name, size_t got, size_t unit) const;
  std::map<std::string, std::vector<uint8_t>> records_;
  std::string source_ = "checkpoint";
};

// Removes the temporary files "*.ckpt.tmp.<host>.<pid>" in dir that writers on this host left
// behind when they died: only files naming this host (other hosts' pids cannot be checked) and a
// pid with no live process (kill(pid, 0) fails with ESRCH), so the file of a rank that is still
// writing is never touched. Older names without a host (".tmp.<pid>") are left alone. Returns the
// removed paths; a missing dir removes nothing.
std::vector<std::string> remove_stale_temp_files(const std::string& dir);

// Retention: keeps the `keep` newest (by number) of step_<N>.ckpt and, separately, of
// epoch_<N>.ckpt in dir and removes the older ones; any other file (last.ckpt, a checkpoint named
// by the user) stays. keep = 0 keeps everything. Returns the removed paths.
std::vector<std::string> prune_checkpoints(const std::string& dir, int keep);

}  // namespace int4ddp::train
