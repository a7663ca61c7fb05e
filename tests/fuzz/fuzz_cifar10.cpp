// Fuzzes the CIFAR-10 binary batch reader (load_cifar10_files, plain or gzip). Input: one file.
#include "src/data/dataset.h"
#include "tests/fuzz/fuzz_harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int4ddp::fuzz::TempFile batch("batch.bin");
  batch.write(data, size);
  return int4ddp::fuzz::run_expecting_error(
      [&] { int4ddp::data::load_cifar10_files({batch.path()}); });
}
