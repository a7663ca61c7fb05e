// Little helpers for the byte blobs comm/ saves in checkpoints (host byte order).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace int4ddp::comm {

inline void append_bytes(std::vector<uint8_t>& out, const void* p, size_t n) {
  if (n == 0) return;
  const size_t at = out.size();
  out.resize(at + n);
  std::memcpy(out.data() + at, p, n);
}

}  // namespace int4ddp::comm
