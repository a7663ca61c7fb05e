// Shared pieces of the fuzz harnesses (tests/fuzz/fuzz_*.cpp).
//
// Each harness defines LLVMFuzzerTestOneInput and feeds the bytes to the library's own entry point.
// A rejected input must end in int4ddp::Error: the harness swallows exactly that, so any other
// exception escapes (std::terminate, reported by libFuzzer as a crash) like a sanitizer finding.
// The same harness source links either libFuzzer (INT4DDP_FUZZ) or replay_main.cpp (ctest).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "kernels/common/error.h"

namespace int4ddp::fuzz {

// A file of this process under the temp directory, overwritten by each input, removed at exit.
class TempFile {
 public:
  explicit TempFile(const std::string& name)
      : path_((std::filesystem::temp_directory_path() /
               ("int4ddp_fuzz_" + std::to_string(::getpid()) + "_" + name))
                  .string()) {}
  ~TempFile() { std::remove(path_.c_str()); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  const std::string& path() const { return path_; }
  const std::string& write(const uint8_t* data, size_t size) const {
    std::ofstream f(path_, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    f.close();
    if (!f) std::abort();  // the harness's own temp file: not the code under test
    return path_;
  }

 private:
  std::string path_;
};

// Runs body; an int4ddp::Error is the expected answer to bad input, anything else escapes.
template <typename Body>
int run_expecting_error(Body body) {
  try {
    body();
  } catch (const ::int4ddp::Error&) {
  }
  return 0;
}

}  // namespace int4ddp::fuzz
