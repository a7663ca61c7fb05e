// Waiting for nonblocking requests without starving the other ranks, and driving the transport
// while a rank computes.
//
// An MPI library that has no progress thread (Open MPI's TCP transport, the shared-memory one)
// moves a nonblocking message only inside MPI calls: a large send handed to MPI_Isend is written
// to the socket piece by piece, and a rendezvous message waits for the receiver to answer, each
// time the sender or receiver enters the library. A rank that computes for a long time between
// MPI calls therefore stalls its messages; RequestList::poll() between short stretches of
// computation keeps them moving.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace int4ddp::comm {

// One pause of a waiting rank. Ranks that share cores (the simulated cluster, CI) would otherwise
// take the core from each other's compute and from the kernel's network processing; a message
// piece at 1 Gbit/s takes milliseconds, so the pauses cost little.
inline void pause_politely() { std::this_thread::sleep_for(std::chrono::microseconds(50)); }

// Waits for r: polls for a few microseconds, then pauses between polls.
inline void wait_politely(Request& r) {
  constexpr auto kSpin = std::chrono::microseconds(20);
  const auto t0 = std::chrono::steady_clock::now();
  while (!r.test())
    if (std::chrono::steady_clock::now() - t0 > kSpin) pause_politely();
}

// Waits until done() (which tests requests, so each call also moves what it can), pausing between
// calls for pause_politely()'s 50 us at first and twice as long each time up to 800 us: for waits
// that can last as long as a whole piece of other work (the hierarchy's node level), where every
// wake-up of a waiting rank costs core time its peers compute with.
template <typename Done>
void wait_backing_off(Done&& done) {
  constexpr std::chrono::microseconds kFirstPause{50}, kMaxPause{800};
  for (auto pause = kFirstPause; !done(); pause = std::min(2 * pause, kMaxPause))
    std::this_thread::sleep_for(pause);
}

// The requests of one operation, kept alive until all have completed (destroying a Request waits
// for it).
class RequestList {
 public:
  static constexpr std::chrono::microseconds kPollInterval{1000};

  // Takes r (null: nothing to track) and returns it, for the caller to test on its own.
  Request* add(std::unique_ptr<Request> r) {
    if (!r) return nullptr;
    reqs_.push_back(std::move(r));
    return reqs_.back().get();
  }
  // One step of the transport if kPollInterval has passed since the last one: tests the oldest
  // requests until one is still in flight (each test of an incomplete MPI request progresses
  // every message of the library). Called between short stretches of computation. The interval
  // keeps the cost of the calls small: a test that finds nothing to do may give the core away
  // (Open MPI yields when oversubscribed), while the kernel's socket buffers keep a link busy for
  // far longer than the interval between two steps.
  void poll() {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_poll_ < kPollInterval) return;
    last_poll_ = now;
    while (next_ < reqs_.size() && reqs_[next_]->test()) ++next_;
  }
  void wait_all() {
    for (; next_ < reqs_.size(); ++next_) wait_politely(*reqs_[next_]);
  }

 private:
  std::vector<std::unique_ptr<Request>> reqs_;
  size_t next_ = 0;  // reqs_[0, next_) have completed
  std::chrono::steady_clock::time_point last_poll_{};
};

}  // namespace int4ddp::comm
