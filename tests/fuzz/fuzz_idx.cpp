// Fuzzes the MNIST IDX reader (load_mnist_idx: plain or gzip images + labels files).
// Input: u16 little-endian n, then n bytes of the images file, then the labels file (n is clamped
// to what is there).
#include <algorithm>

#include "src/data/dataset.h"
#include "tests/fuzz/fuzz_harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int4ddp::fuzz::TempFile images("images"), labels("labels");
  if (size < 2) return 0;
  const size_t n = std::min<size_t>(data[0] | (size_t{data[1]} << 8), size - 2);
  images.write(data + 2, n);
  labels.write(data + 2 + n, size - 2 - n);
  return int4ddp::fuzz::run_expecting_error(
      [&] { int4ddp::data::load_mnist_idx(images.path(), labels.path()); });
}
