// The NCCL Communicator (device buffers), DESIGN.md section 4.
//
// One NCCL communicator over MPI_COMM_WORLD: MPI (make_mpi_communicator()) starts the processes'
// rendezvous, rank 0's ncclUniqueId reaches the others by MPI_Bcast, and each rank drives the GPU
// given by its node-local rank (one GPU per rank: NCCL refuses two ranks on one GPU, so that is
// checked first with a clear message). Collectives run on the communicator's own CUDA stream:
//   alltoallv      grouped ncclSend/ncclRecv (the rank's own block by cudaMemcpyAsync)
//   allgatherv     ncclAllGather when every count is equal and the layout packed, else grouped
//                  send/recv
//   allreduce_sum  ncclAllReduce (fp32 sum); broadcast ncclBroadcast
//   barrier, allreduce_sum_i64, gatherv (host memory) go through MPI.
// Hand-off with the compute stream: every call first makes the NCCL stream wait for an event
// recorded on the compute stream (set_compute_stream; default the legacy default stream), so
// kernels queued there before the call are complete for it. Blocking calls return when their
// result is in device memory; nonblocking ones return an NcclRequest whose event marks completion,
// and wait_on(stream) lets a compute stream wait for all queued NCCL work without blocking the
// host. Errors (including NCCL's asynchronous ones) throw int4ddp::Error with the call, file:line,
// rank and NCCL's message.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "comm/communicator.h"
#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::comm {

namespace nccl_detail {
[[noreturn]] void nccl_fail(ncclResult_t rc, ncclComm_t comm, const char* call, const char* file,
                            int line);
}  // namespace nccl_detail

// INT4DDP_NCCL_CHECK(call): throws int4ddp::Error naming the call, file:line, rank and NCCL's
// error string (and its last-error text) when call does not return ncclSuccess. The macro form
// without a communicator handle; INT4DDP_NCCL_CHECK_COMM also reports the comm's async error.
#define INT4DDP_NCCL_CHECK(call)                                                        \
  do {                                                                                  \
    const ncclResult_t rc_ = (call);                                                    \
    if (rc_ != ncclSuccess)                                                             \
      ::int4ddp::comm::nccl_detail::nccl_fail(rc_, nullptr, #call, __FILE__, __LINE__); \
  } while (0)

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator();  // collective over MPI_COMM_WORLD
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }
  bool device_buffers() const override { return true; }

  void barrier() override;
  void broadcast(void* buf, size_t bytes, int root) override;
  void allreduce_sum(float* buf, int64_t count) override;
  void allreduce_sum_i64(int64_t* buf, int64_t count) override;  // host memory (MPI)
  void alltoallv(const void* send, const ByteLayout& send_layout, void* recv,
                 const ByteLayout& recv_layout) override;
  void allgatherv(const void* send, size_t send_bytes, void* recv,
                  const ByteLayout& recv_layout) override;
  void gatherv(const void* send, size_t send_bytes, void* recv, const ByteLayout& recv_layout,
               int root) override;  // host memory (MPI)
  std::unique_ptr<Request> iallreduce_sum(float* buf, int64_t count) override;
  std::unique_ptr<Request> ialltoallv(const void* send, const ByteLayout& send_layout, void* recv,
                                      const ByteLayout& recv_layout) override;
  std::unique_ptr<Request> iallgatherv(const void* send, size_t send_bytes, void* recv,
                                       const ByteLayout& recv_layout) override;

  // The stream whose queued work each collective waits for (nullptr: legacy default stream).
  void set_compute_stream(cudaStream_t stream) { compute_ = stream; }
  cudaStream_t stream() const { return stream_; }  // where the NCCL work runs
  int device() const { return device_; }
  // Makes `stream` wait (on the device, without blocking the host) for all NCCL work queued so far.
  void wait_on(cudaStream_t stream);

 private:
  void begin();                                        // hand-off from the compute stream
  void sync();                                         // wait for the NCCL stream, check errors
  std::unique_ptr<Request> request(const char* what);  // event marking the queued work
  void enqueue_alltoallv(const void* send, const ByteLayout& sl, void* recv, const ByteLayout& rl);
  void enqueue_allgatherv(const void* send, size_t bytes, void* recv, const ByteLayout& rl);
  void check_layout(const ByteLayout& l, const char* what) const;

  std::unique_ptr<Communicator> mpi_;  // rendezvous and host-memory calls
  int rank_ = 0, size_ = 1, device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaStream_t compute_ = nullptr;
  cudaEvent_t ready_ = nullptr;
};

// NCCL over MPI_COMM_WORLD (initialises MPI if needed). Throws Error when this node has fewer GPUs
// than ranks, or when NCCL fails.
std::unique_ptr<Communicator> make_nccl_communicator();

}  // namespace int4ddp::comm
