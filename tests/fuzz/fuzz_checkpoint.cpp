// Fuzzes the checkpoint reader (Checkpoint::parse, the body of Checkpoint::read) and its typed
// getters. Input: one flag byte, then the file. With flag bit 0 set the harness first rewrites the
// header's payload size and CRC to match the payload, so mutations reach the record table instead
// of stopping at the CRC check.
#include <zlib.h>

#include <cstring>
#include <vector>

#include "src/train/checkpoint.h"
#include "tests/fuzz/fuzz_harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  constexpr size_t kHeaderBytes = 20;  // "I4CK" | u32 version | u64 size | u32 crc
  if (size < 1) return 0;
  std::vector<uint8_t> file(data + 1, data + size);
  if ((data[0] & 1) && file.size() >= kHeaderBytes) {
    const uint64_t payload = file.size() - kHeaderBytes;
    const auto crc = static_cast<uint32_t>(
        crc32(crc32(0L, Z_NULL, 0), file.data() + kHeaderBytes, static_cast<uInt>(payload)));
    std::memcpy(file.data() + 8, &payload, 8);
    std::memcpy(file.data() + 16, &crc, 4);
  }
  return int4ddp::fuzz::run_expecting_error([&] {
    const auto ck = int4ddp::train::Checkpoint::parse(file, "fuzz.ckpt");
    for (const char* name : {"config_yaml", "model_signature"})
      if (ck.has(name)) (void)ck.get_string(name);
    if (ck.has("optimizer_steps")) (void)ck.get_value<int64_t>("optimizer_steps");
    if (ck.has("values")) (void)ck.get_vector<float>("values");
    (void)ck.get("missing");  // throws Error naming the record
  });
}
