// The backend factory (make_communicator) and the stand-ins for transports this build lacks.
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "kernels/common/error.h"

#ifdef INT4DDP_HAVE_NCCL
#include "comm/nccl_communicator.h"
#endif

namespace int4ddp::comm {

#ifndef INT4DDP_HAVE_MPI
std::unique_ptr<Communicator> make_mpi_communicator() {
  INT4DDP_FAIL("comm.backend = mpi: this build has no MPI (configure with -DINT4DDP_MPI=ON)");
}
std::unique_ptr<Communicator> make_mpi_node_communicator() {
  INT4DDP_FAIL("node-local ranks: this build has no MPI (configure with -DINT4DDP_MPI=ON)");
}
void abort_world(int) {}
#endif

std::unique_ptr<Communicator> make_communicator(const std::string& backend) {
  if (backend == "none") {
    int n = 1;
    INT4DDP_CHECK(!launched_with_multiple_ranks(&n),
                  "comm.backend = none, but this process is one of ", n,
                  " ranks: set comm.backend = mpi (or nccl) for data-parallel training");
    return make_local_communicator();
  }
  if (backend == "mpi") return make_mpi_communicator();
  if (backend == "nccl") {
#ifdef INT4DDP_HAVE_NCCL
    return make_nccl_communicator();
#else
    INT4DDP_FAIL(
        "comm.backend = nccl: this build has no NCCL (needs CUDA and NCCL at configure time)");
#endif
  }
  INT4DDP_FAIL("comm.backend = '", backend, "' is not one of none, mpi, nccl");
}

}  // namespace int4ddp::comm
