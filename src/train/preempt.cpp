// Graceful preemption (see preempt.h). The handler uses only async-signal-safe operations: a
// lock-free atomic, write(2), sigaction, sigprocmask, raise and _exit.
#include "src/train/preempt.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "comm/communicator.h"
#include "kernels/common/error.h"

namespace int4ddp::train {
namespace {

static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");
std::atomic<int> g_caught{0};          // the first signal caught, 0 if none
std::atomic<bool> g_installed{false};  // a PreemptGuard is alive
struct sigaction g_previous[kStopVotes];

constexpr const char* kFirstLine[kStopVotes] = {
    "int4ddp: SIGTERM received: finishing this step, then writing a checkpoint (send it again to "
    "stop at once)\n",
    "int4ddp: SIGINT received: finishing this step, then writing a checkpoint (press Ctrl-C again "
    "to stop at once)\n",
    "int4ddp: SIGUSR1 received: finishing this step, then writing a checkpoint (send it again to "
    "stop at once)\n"};
constexpr char kSecondLine[] = "int4ddp: second signal: stopping now, without a checkpoint\n";

int slot_of(int sig) {
  for (int i = 0; i < kStopVotes; ++i)
    if (kPreemptSignals[i] == sig) return i;
  return -1;
}

void say(const char* text) {
  // Nothing to do if stderr is gone; the signal is recorded either way.
  (void)!::write(STDERR_FILENO, text, std::strlen(text));
}

extern "C" void on_preempt_signal(int sig) {
  const int saved_errno = errno;
  int expected = 0;
  if (g_caught.compare_exchange_strong(expected, sig)) {
    const int slot = slot_of(sig);
    if (slot >= 0) say(kFirstLine[slot]);
    errno = saved_errno;
    return;
  }
  // Second signal: die of it now. The signal is blocked while its handler runs, so unblock it
  // after restoring the default action; _exit is the fallback should it not be fatal after all.
  say(kSecondLine);
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  ::sigprocmask(SIG_UNBLOCK, &set, nullptr);
  ::raise(sig);
  ::_exit(128 + sig);
}

}  // namespace

PreemptGuard::PreemptGuard() {
  INT4DDP_CHECK(!g_installed.exchange(true), "PreemptGuard: only one guard may be alive at a time");
  g_caught.store(0);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_preempt_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);  // one handler at a time: the others wait while one runs
  for (int sig : kPreemptSignals) sigaddset(&sa.sa_mask, sig);
  for (int i = 0; i < kStopVotes; ++i) ::sigaction(kPreemptSignals[i], &sa, &g_previous[i]);
}

PreemptGuard::~PreemptGuard() {
  for (int i = 0; i < kStopVotes; ++i) ::sigaction(kPreemptSignals[i], &g_previous[i], nullptr);
  g_installed.store(false);
}

int PreemptGuard::caught_signal() { return g_caught.load(); }

void stop_votes(int64_t votes[kStopVotes]) {
  const int slot = slot_of(PreemptGuard::caught_signal());
  for (int i = 0; i < kStopVotes; ++i) votes[i] = i == slot ? 1 : 0;
}

StopDecision decide_stop(const int64_t summed_votes[kStopVotes]) {
  for (int i = 0; i < kStopVotes; ++i)
    if (summed_votes[i] > 0) return {true, kPreemptSignals[i]};
  return {};
}

StopDecision stop_requested(comm::Communicator& comm) {
  int64_t votes[kStopVotes];
  stop_votes(votes);
  comm.allreduce_sum_i64(votes, kStopVotes);
  return decide_stop(votes);
}

std::string signal_name(int signal) {
  switch (signal) {
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    case SIGUSR1:
      return "SIGUSR1";
    default:
      return "signal " + std::to_string(signal);
  }
}

int preempt_exit_code(int signal) { return 128 + signal; }

namespace {

// arg as one word of a POSIX shell command.
std::string shell_quote(const std::string& arg) {
  const bool plain = !arg.empty() && arg.find_first_not_of(
                                         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                         "0123456789_./=:,+-@%") == std::string::npos;
  if (plain) return arg;
  std::string q = "'";
  for (char c : arg) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

std::string resume_command(const std::vector<std::string>& argv, const std::string& checkpoint,
                           int world_size) {
  std::vector<std::string> kept;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    const bool next_is_resume_set =
        i + 1 < argv.size() && starts_with(argv[i + 1], "train.resume=");
    if (a == "--resume" || (a == "--set" && next_is_resume_set)) {
      ++i;  // the option and its value
      continue;
    }
    if (starts_with(a, "--resume=") || starts_with(a, "--set=train.resume=") ||
        starts_with(a, "train.resume="))
      continue;
    kept.push_back(a);
  }
  kept.push_back("--resume");
  kept.push_back(checkpoint);
  std::string cmd = world_size > 1 ? "mpirun -np " + std::to_string(world_size) + " " : "";
  for (size_t i = 0; i < kept.size(); ++i) cmd += (i ? " " : "") + shell_quote(kept[i]);
  return cmd;
}

std::string preempt_message(int signal, int64_t step, const std::string& checkpoint,
                            const std::string& resume_cmd) {
  std::ostringstream os;
  os << "int4ddp: stopped by " << signal_name(signal) << " after step " << step
     << "; checkpoint written to " << checkpoint << "\n"
     << "int4ddp: resume with: " << resume_cmd << "\n"
     << "int4ddp: exit code " << preempt_exit_code(signal) << " (128 + " << signal_name(signal)
     << ")\n";
  return os.str();
}

}  // namespace int4ddp::train
