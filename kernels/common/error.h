// int4ddp::Error, the check macros every library layer uses, and the one generator of library-call
// errors behind INT4DDP_CUDA_CHECK (kernels/quant/cuda/cuda_check.h), INT4DDP_NCCL_CHECK
// (comm/nccl_communicator.h) and INT4DDP_MPI_CHECK (comm/mpi_check.h).
//
// Library code throws int4ddp::Error; only main() turns it into a message and a non-zero exit, so
// every failure path can be unit-tested with EXPECT_THROW. The message always names what was wrong.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace int4ddp {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// The environment variables by which launchers (Open MPI's mpirun, MPICH's PMI, PMIx, SLURM's
// srun) tell a process its rank, the number of ranks, the number of ranks on its node and its rank
// on the node; the first one set wins (nullptr: that launcher has none). Read without MPI, so
// kernels/, error messages and the thread count can use them.
struct LauncherVars {
  const char* rank;
  const char* size;
  const char* local_size;
  const char* local_rank;
};
inline constexpr LauncherVars kLauncherVars[] = {
    {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK"},
    {"PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"},
    {"PMIX_RANK", "PMIX_SIZE", nullptr, nullptr},
    {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_LOCALID"}};

// This process's rank from the launcher's environment; -1 when no launcher set one.
inline int launcher_rank() {
  for (const LauncherVars& v : kLauncherVars)
    if (const char* s = std::getenv(v.rank)) return std::atoi(s);
  return -1;
}

// The number of ranks from the launcher's environment; 1 when no launcher set it.
inline int launcher_world_size() {
  for (const LauncherVars& v : kLauncherVars)
    if (const char* s = std::getenv(v.size)) return std::max(1, std::atoi(s));
  return 1;
}

// The number of ranks on this node from the launcher's environment; 1 when no launcher set it.
inline int launcher_local_size() {
  for (const LauncherVars& v : kLauncherVars)
    if (v.local_size != nullptr)
      if (const char* s = std::getenv(v.local_size)) return std::max(1, std::atoi(s));
  return 1;
}

// This process's rank on its node from the launcher's environment; 0 when no launcher set it.
inline int launcher_local_rank() {
  for (const LauncherVars& v : kLauncherVars)
    if (v.local_rank != nullptr)
      if (const char* s = std::getenv(v.local_rank)) return std::max(0, std::atoi(s));
  return 0;
}

namespace detail {
// The message of every failed library call: "<library> error in <call> at <file>:<line> on rank
// <r>: <what>", with file:line of the check macro's caller.
[[noreturn]] inline void fail_call(const char* library, const char* call, const char* file,
                                   int line, const std::string& what) {
  throw Error(concat(library, " error in ", call, " at ", file, ":", line, " on rank ",
                     launcher_rank(), ": ", what));
}
}  // namespace detail

}  // namespace int4ddp

// INT4DDP_CHECK(cond, msg...): throw int4ddp::Error with the message (streamed pieces) if cond is
// false.
#define INT4DDP_CHECK(cond, ...)                                                 \
  do {                                                                           \
    if (!(cond)) throw ::int4ddp::Error(::int4ddp::detail::concat(__VA_ARGS__)); \
  } while (0)

#define INT4DDP_FAIL(...) throw ::int4ddp::Error(::int4ddp::detail::concat(__VA_ARGS__))

// The generator of every library check (CUDA, cuBLAS, NCCL, MPI): evaluates call once and, when
// its status is not ok, throws through fail_call() naming the library, the call as written
// (call_text: the check macro's #call, stringized before any macro in the call is expanded), the
// caller's file:line and the rank, with error_text(status) as the library's own message.
#define INT4DDP_LIBRARY_CHECK(library, call, call_text, ok, error_text)                      \
  do {                                                                                       \
    const auto rc_ = (call);                                                                 \
    if (rc_ != (ok))                                                                         \
      ::int4ddp::detail::fail_call(library, call_text, __FILE__, __LINE__, error_text(rc_)); \
  } while (0)
