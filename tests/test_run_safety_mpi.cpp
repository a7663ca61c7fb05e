// Graceful preemption under mpirun (label mpi, 1-4 ranks): only one rank gets the signal, and
// stop_requested() makes every rank stop after the same step, without a hang. The last rank (rank
// 1 of 2) is the one signalled, so the signal never starts on rank 0.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <thread>

#include "mpi_test.h"
#include "src/train/preempt.h"

namespace int4ddp::train {
namespace {

// Whether v is the same on every rank (all-reduce of v and v^2: equal iff the variance is 0).
bool same_on_all_ranks(int64_t v) {
  comm::Communicator& w = test::world();
  int64_t s[2] = {v, v * v};
  w.allreduce_sum_i64(s, 2);
  return s[0] * s[0] == static_cast<int64_t>(w.size()) * s[1];
}

// A signal raised on one rank at a known step: all ranks stop after exactly that step.
TEST(PreemptMpi, OneRankSignalledAllStopAfterTheSameStep) {
  comm::Communicator& w = test::world();
  const int target = w.size() - 1;
  constexpr int64_t kSignalAt = 3, kMaxSteps = 50;
  PreemptGuard guard;
  int64_t stopped_after = -1;
  StopDecision d;
  for (int64_t step = 0; step < kMaxSteps; ++step) {
    if (w.rank() == target && step == kSignalAt) ::raise(SIGTERM);
    d = stop_requested(w);
    if (d.stop) {
      stopped_after = step;
      break;
    }
  }
  EXPECT_EQ(stopped_after, kSignalAt);
  EXPECT_EQ(d.signal, SIGTERM);
  EXPECT_EQ(PreemptGuard::caught_signal(), w.rank() == target ? SIGTERM : 0);
  EXPECT_TRUE(same_on_all_ranks(stopped_after));
}

// The signal comes from outside the loop (another thread sends it to this process with kill(2))
// at a time no rank knows: the ranks still agree on one step, within a bounded number of steps.
TEST(PreemptMpi, AsynchronousSignalOnOneRankStillAgrees) {
  comm::Communicator& w = test::world();
  const int target = w.size() - 1;
  constexpr int64_t kMaxSteps = 2000;  // 2000 x 1 ms: far more than the 20 ms the signal takes
  PreemptGuard guard;
  std::thread sender;
  if (w.rank() == target)
    sender = std::thread([] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ::kill(::getpid(), SIGINT);
    });
  int64_t stopped_after = -1;
  StopDecision d;
  for (int64_t step = 0; step < kMaxSteps; ++step) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the "step"
    d = stop_requested(w);
    if (d.stop) {
      stopped_after = step;
      break;
    }
  }
  if (sender.joinable()) sender.join();
  EXPECT_GE(stopped_after, 0);
  EXPECT_EQ(d.signal, SIGINT);
  EXPECT_TRUE(same_on_all_ranks(stopped_after));
}

}  // namespace
}  // namespace int4ddp::train
