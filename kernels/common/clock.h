// The monotonic clock of every timing in int4ddp (step, quantize and collective times).
#pragma once

#include <chrono>

namespace int4ddp {

using Clock = std::chrono::steady_clock;

// Seconds from t to now.
inline double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace int4ddp
