// INT4DDP_MPI_CHECK: the check of every MPI call in comm/, on the error generator of
// kernels/common/error.h. MPI_COMM_WORLD returns error codes (MPI_ERRORS_RETURN, set when
// make_mpi_communicator() initialises MPI); a failed call throws int4ddp::Error naming the call,
// the caller's file:line, the rank and MPI's error string.
#pragma once

#include <mpi.h>

#include <string>

#include "kernels/common/error.h"

namespace int4ddp::detail {
inline std::string mpi_error_text(int rc) {
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return std::string(msg, static_cast<size_t>(len));
}
}  // namespace int4ddp::detail

#define INT4DDP_MPI_CHECK(call) \
  INT4DDP_LIBRARY_CHECK("MPI", call, #call, MPI_SUCCESS, ::int4ddp::detail::mpi_error_text)
