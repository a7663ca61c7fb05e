// Graceful preemption (DESIGN.md section 5): on the first SIGTERM (what SLURM sends before the time
// limit), SIGINT (Ctrl-C) or SIGUSR1, every rank finishes the current step, a checkpoint is written
// and the run exits with a message and a non-zero code; a second signal exits at once.
//
// Invariant: the signal handler only records the signal (a lock-free atomic) and writes a fixed
// line to stderr; everything else happens in the training loop, where the summed votes make all
// ranks agree, in the all-reduce each step already does, on the step after which they stop. A rank
// that got the signal first therefore never leaves the others waiting in a collective.
//
// SIGUSR1 is there for mpirun: Open MPI 4's mpirun answers SIGTERM and SIGINT by aborting the job
// (it stops forwarding output, sends every rank SIGCONT, waits odls_base_sigkill_timeout seconds,
// default 1, sends SIGTERM, waits as long again, then SIGKILL, and exits 1 whatever the ranks
// did), but it forwards SIGUSR1 to every rank unchanged and reports their exit code. Under mpirun,
// preempt with SIGUSR1 (launch/slurm.sbatch passes the signal SLURM gives its batch shell on as
// SIGUSR1; by hand, kill -USR1 the mpirun); srun and a single process take SIGTERM directly.
//
// Exit code convention: 128 + the signal number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1), what a
// shell reports for a process killed by that signal, so job scripts see "stopped by a signal" and
// never mistake a preempted run for a finished one (0) or a failed one (2, main's error code).
//
// Where the trainer calls it (run_training()):
//   before the first step:        PreemptGuard guard;   (lives until run_training returns)
//   every step, all ranks:        stop_votes() ride in the step's existing all-reduce of its
//                                 flags; decide_stop() on the sums (not on the calibration batch)
//                                 -> checkpoint, barrier, return the signal
//   (stop_requested() is the same agreement as a collective of its own, for callers without one)
//   main():                       exit with preempt_exit_code(signal)
#pragma once

#include <csignal>
#include <cstdint>
#include <string>
#include <vector>

namespace int4ddp::comm {
class Communicator;
}

namespace int4ddp::train {

// The signals a PreemptGuard catches, in the order decide_stop() prefers them.
inline constexpr int kPreemptSignals[] = {SIGTERM, SIGINT, SIGUSR1};
inline constexpr int kStopVotes = 3;  // one vote slot per preemption signal
static_assert(sizeof kPreemptSignals / sizeof kPreemptSignals[0] == kStopVotes);

// Installs the handlers of kPreemptSignals (SA_RESTART, so interrupted system calls continue) and
// clears the caught signal; the destructor restores the previous dispositions. One guard at a time
// (a second one throws Error). First signal: recorded, a line on stderr, the process goes on.
// Second signal (any of them): the default disposition is restored and the signal re-raised, so
// the process dies of it at once, without a checkpoint.
class PreemptGuard {
 public:
  PreemptGuard();
  ~PreemptGuard();
  PreemptGuard(const PreemptGuard&) = delete;
  PreemptGuard& operator=(const PreemptGuard&) = delete;

  // The first preemption signal this process caught since the guard was installed, 0 if none.
  // This rank only: the ranks agree through stop_requested().
  static int caught_signal();
};

// What the ranks agreed on: stop after this step, and the signal that asked for it (the first of
// kPreemptSignals that any rank caught; the same on every rank).
struct StopDecision {
  bool stop = false;
  int signal = 0;
};

// Collective, called by every rank once per step at the same point (after the update): an int64
// sum all-reduce of the ranks' votes. Every rank gets the same decision, so all stop after the
// same step, however the signal reached them.
StopDecision stop_requested(comm::Communicator& comm);

// The two halves of stop_requested(), to fold the votes into an all-reduce the step already does
// (e.g. the trainer's flags): this rank's votes (1 in the slot of the signal it caught), and the
// decision from the votes summed over ranks.
void stop_votes(int64_t votes[kStopVotes]);
StopDecision decide_stop(const int64_t summed_votes[kStopVotes]);

// "SIGTERM", "SIGINT", "SIGUSR1", or "signal N".
std::string signal_name(int signal);

// 128 + signal (see the exit code convention above).
int preempt_exit_code(int signal);

// The command that resumes this run: argv as it was (quoted for a POSIX shell) without any
// --resume / train.resume it had, plus "--resume checkpoint"; behind "mpirun -np N" when the run
// had world_size > 1 ranks (add the launcher options the run used).
std::string resume_command(const std::vector<std::string>& argv, const std::string& checkpoint,
                           int world_size);

// What rank 0 prints after the preemption checkpoint is written: the signal, the step, where the
// checkpoint is, the command that resumes, the exit code.
std::string preempt_message(int signal, int64_t step, const std::string& checkpoint,
                            const std::string& resume_cmd);

}  // namespace int4ddp::train
