// The NCCL Communicator (see nccl_communicator.h). The only file that calls NCCL.
#include "comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <vector>

#include "kernels/common/error.h"

namespace int4ddp::comm {

namespace nccl_detail {

void nccl_fail(ncclResult_t rc, ncclComm_t comm, const char* call, const char* file, int line) {
  std::string what = ncclGetErrorString(rc);
  const char* last = ncclGetLastError(comm);
  if (last && *last) what += std::string(" (") + last + ")";
  ::int4ddp::cuda_detail::fail_call("NCCL", call, file, line, what);
}

}  // namespace nccl_detail

namespace {

// With the comm handle: NCCL's last-error text of that communicator.
#define NCCL_CALL(comm, call)                                                             \
  do {                                                                                    \
    const ncclResult_t rc_ = (call);                                                      \
    if (rc_ != ncclSuccess) nccl_detail::nccl_fail(rc_, comm, #call, __FILE__, __LINE__); \
  } while (0)

// NCCL reports failures of work already queued (a peer gone, a network error) asynchronously.
void check_async(ncclComm_t comm, const char* what) {
  ncclResult_t async = ncclSuccess;
  NCCL_CALL(comm, ncclCommGetAsyncError(comm, &async));
  if (async != ncclSuccess) nccl_detail::nccl_fail(async, comm, what, __FILE__, __LINE__);
}

class NcclRequest final : public Request {
 public:
  NcclRequest(ncclComm_t comm, cudaStream_t stream, const char* what) : comm_(comm), what_(what) {
    INT4DDP_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    INT4DDP_CUDA_CHECK(cudaEventRecord(done_, stream));
  }
  ~NcclRequest() override {
    if (done_) {
      cudaEventSynchronize(done_);  // a Request that has not completed is waited for
      cudaEventDestroy(done_);
    }
  }
  void wait() override {
    INT4DDP_CUDA_CHECK(cudaEventSynchronize(done_));
    check_async(comm_, what_);
  }
  bool test() override {
    const cudaError_t rc = cudaEventQuery(done_);
    if (rc == cudaErrorNotReady) {
      check_async(comm_, what_);
      return false;
    }
    INT4DDP_CUDA_CHECK(rc);
    check_async(comm_, what_);
    return true;
  }

 private:
  ncclComm_t comm_;
  const char* what_;
  cudaEvent_t done_ = nullptr;
};

void mpi_check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  ::int4ddp::cuda_detail::fail_call("MPI", call, __FILE__, __LINE__, std::string(msg, len));
}

// The node-local rank and size (ranks sharing memory with this one).
void node_rank(int world_rank, MPI_Comm* node, int* local_rank, int* local_size) {
  mpi_check(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, node),
      "MPI_Comm_split_type");
  mpi_check(MPI_Comm_rank(*node, local_rank), "MPI_Comm_rank");
  mpi_check(MPI_Comm_size(*node, local_size), "MPI_Comm_size");
}

}  // namespace

NcclCommunicator::NcclCommunicator() : mpi_(make_mpi_communicator()) {
  rank_ = mpi_->rank();
  size_ = mpi_->size();

  // One GPU per rank: local rank i takes device i % count, and NCCL's "Duplicate GPU" failure is
  // turned into a message that says what to do. Every rank of the node sees the same bus ids, so
  // either all of them throw or none does.
  MPI_Comm node = MPI_COMM_NULL;
  int local_rank = 0, local_size = 1, ndev = 0;
  node_rank(rank_, &node, &local_rank, &local_size);
  const cudaError_t dc = cudaGetDeviceCount(&ndev);
  if (dc != cudaSuccess) ndev = 0;
  int any_without = ndev == 0 ? 1 : 0;
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, &any_without, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD),
            "MPI_Allreduce");
  if (any_without) {
    MPI_Comm_free(&node);
    INT4DDP_FAIL("comm.backend = nccl: rank ", rank_, (ndev == 0 ? " sees" : ": some rank sees"),
                 " no CUDA device (", cudaGetErrorString(dc), ")");
  }
  device_ = local_rank % ndev;
  INT4DDP_CUDA_CHECK(cudaSetDevice(device_));
  char bus[32] = {0};
  INT4DDP_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus) - 1, device_));
  std::vector<char> all(static_cast<size_t>(local_size) * sizeof(bus));
  mpi_check(MPI_Allgather(bus, sizeof(bus), MPI_CHAR, all.data(), sizeof(bus), MPI_CHAR, node),
            "MPI_Allgather");
  MPI_Comm_free(&node);
  std::set<std::string> distinct;
  for (int i = 0; i < local_size; ++i) distinct.insert(std::string(&all[i * sizeof(bus)]));
  INT4DDP_CHECK(static_cast<int>(distinct.size()) == local_size,
                "comm.backend = nccl: ", local_size, " ranks on this node share ", distinct.size(),
                " GPU(s); NCCL needs one GPU per rank. Start at most one rank per GPU, or use "
                "comm.backend = mpi (device buffers staged through host memory) to share a GPU");

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank_ == 0) INT4DDP_NCCL_CHECK(ncclGetUniqueId(&id));
  mpi_->broadcast(&id, sizeof(id), 0);
  INT4DDP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  INT4DDP_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  INT4DDP_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
  mpi_->reset_bytes_sent();
}

NcclCommunicator::~NcclCommunicator() {
  // No throwing from a destructor: errors at teardown leave nothing to recover.
  if (stream_) cudaStreamSynchronize(stream_);
  if (comm_) ncclCommDestroy(comm_);
  if (ready_) cudaEventDestroy(ready_);
  if (stream_) cudaStreamDestroy(stream_);
}

void NcclCommunicator::begin() {
  INT4DDP_CUDA_CHECK(cudaSetDevice(device_));
  INT4DDP_CUDA_CHECK(cudaEventRecord(ready_, compute_));
  INT4DDP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
}

void NcclCommunicator::sync() {
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  check_async(comm_, "ncclCommGetAsyncError after a collective");
}

std::unique_ptr<Request> NcclCommunicator::request(const char* what) {
  return std::make_unique<NcclRequest>(comm_, stream_, what);
}

void NcclCommunicator::wait_on(cudaStream_t stream) {
  INT4DDP_CUDA_CHECK(cudaEventRecord(ready_, stream_));
  INT4DDP_CUDA_CHECK(cudaStreamWaitEvent(stream, ready_, 0));
}

void NcclCommunicator::check_layout(const ByteLayout& l, const char* what) const {
  INT4DDP_CHECK(
      static_cast<int>(l.counts.size()) == size_ && static_cast<int>(l.displs.size()) == size_,
      what, ": layout has ", l.counts.size(), " counts and ", l.displs.size(),
      " displacements for ", size_, " ranks");
}

void NcclCommunicator::barrier() {
  sync();  // this rank's queued NCCL work first
  mpi_->barrier();
}

void NcclCommunicator::broadcast(void* buf, size_t bytes, int root) {
  INT4DDP_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " out of range (", size_,
                " ranks)");
  begin();
  if (bytes > 0) NCCL_CALL(comm_, ncclBroadcast(buf, buf, bytes, ncclUint8, root, comm_, stream_));
  sync();
  if (rank_ == root) bytes_sent_ += bytes;
}

void NcclCommunicator::allreduce_sum(float* buf, int64_t count) {
  iallreduce_sum(buf, count)->wait();
}

std::unique_ptr<Request> NcclCommunicator::iallreduce_sum(float* buf, int64_t count) {
  INT4DDP_CHECK(count >= 0, "allreduce_sum: negative count ", count);
  begin();
  if (count > 0)
    NCCL_CALL(comm_, ncclAllReduce(buf, buf, static_cast<size_t>(count), ncclFloat32, ncclSum,
                                   comm_, stream_));
  bytes_sent_ += static_cast<uint64_t>(2.0 * (size_ - 1) / size_ * 4.0 * count + 0.5);
  return request("ncclAllReduce");
}

void NcclCommunicator::allreduce_sum_i64(int64_t* buf, int64_t count) {
  const uint64_t before = mpi_->bytes_sent();
  mpi_->allreduce_sum_i64(buf, count);
  bytes_sent_ += mpi_->bytes_sent() - before;
}

void NcclCommunicator::gatherv(const void* send, size_t send_bytes, void* recv,
                               const ByteLayout& rl, int root) {
  const uint64_t before = mpi_->bytes_sent();
  mpi_->gatherv(send, send_bytes, recv, rl, root);
  bytes_sent_ += mpi_->bytes_sent() - before;
}

void NcclCommunicator::enqueue_alltoallv(const void* send, const ByteLayout& sl, void* recv,
                                         const ByteLayout& rl) {
  check_layout(sl, "alltoallv send");
  check_layout(rl, "alltoallv recv");
  const size_t me = static_cast<size_t>(rank_);
  INT4DDP_CHECK(sl.counts[me] == rl.counts[me], "alltoallv: rank ", rank_, " sends itself ",
                sl.counts[me], " bytes but expects ", rl.counts[me]);
  const auto* s = static_cast<const uint8_t*>(send);
  auto* r = static_cast<uint8_t*>(recv);
  begin();
  if (sl.counts[me] > 0 && s + sl.displs[me] != r + rl.displs[me])
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(r + rl.displs[me], s + sl.displs[me], sl.counts[me],
                                       cudaMemcpyDeviceToDevice, stream_));
  NCCL_CALL(comm_, ncclGroupStart());
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    const size_t jj = static_cast<size_t>(j);
    if (sl.counts[jj] > 0)
      NCCL_CALL(comm_, ncclSend(s + sl.displs[jj], sl.counts[jj], ncclUint8, j, comm_, stream_));
    if (rl.counts[jj] > 0)
      NCCL_CALL(comm_, ncclRecv(r + rl.displs[jj], rl.counts[jj], ncclUint8, j, comm_, stream_));
    if (j != rank_) bytes_sent_ += sl.counts[jj];
  }
  NCCL_CALL(comm_, ncclGroupEnd());
}

void NcclCommunicator::alltoallv(const void* send, const ByteLayout& sl, void* recv,
                                 const ByteLayout& rl) {
  enqueue_alltoallv(send, sl, recv, rl);
  sync();
}

std::unique_ptr<Request> NcclCommunicator::ialltoallv(const void* send, const ByteLayout& sl,
                                                      void* recv, const ByteLayout& rl) {
  enqueue_alltoallv(send, sl, recv, rl);
  return request("ncclSend/ncclRecv (alltoallv)");
}

void NcclCommunicator::enqueue_allgatherv(const void* send, size_t bytes, void* recv,
                                          const ByteLayout& rl) {
  check_layout(rl, "allgatherv recv");
  const size_t me = static_cast<size_t>(rank_);
  INT4DDP_CHECK(rl.counts[me] == bytes, "allgatherv: rank ", rank_, " sends ", bytes,
                " bytes but the layout expects ", rl.counts[me]);
  auto* r = static_cast<uint8_t*>(recv);
  bool uniform = true;
  for (int i = 0; i < size_; ++i)
    uniform = uniform && rl.counts[static_cast<size_t>(i)] == bytes &&
              rl.displs[static_cast<size_t>(i)] == static_cast<size_t>(i) * bytes;
  begin();
  if (uniform) {
    // ncclAllGather takes the per-rank count; send may be recv + rank * bytes (in place).
    if (bytes > 0) NCCL_CALL(comm_, ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream_));
  } else {
    if (bytes > 0 && r + rl.displs[me] != send)
      INT4DDP_CUDA_CHECK(
          cudaMemcpyAsync(r + rl.displs[me], send, bytes, cudaMemcpyDeviceToDevice, stream_));
    NCCL_CALL(comm_, ncclGroupStart());
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      const size_t jj = static_cast<size_t>(j);
      if (bytes > 0) NCCL_CALL(comm_, ncclSend(send, bytes, ncclUint8, j, comm_, stream_));
      if (rl.counts[jj] > 0)
        NCCL_CALL(comm_, ncclRecv(r + rl.displs[jj], rl.counts[jj], ncclUint8, j, comm_, stream_));
    }
    NCCL_CALL(comm_, ncclGroupEnd());
  }
  // As the MPI backend counts it: (N-1)/N of the gathered total.
  bytes_sent_ += static_cast<uint64_t>(static_cast<double>(rl.total()) * (size_ - 1) / size_ + 0.5);
}

void NcclCommunicator::allgatherv(const void* send, size_t bytes, void* recv,
                                  const ByteLayout& rl) {
  enqueue_allgatherv(send, bytes, recv, rl);
  sync();
}

std::unique_ptr<Request> NcclCommunicator::iallgatherv(const void* send, size_t bytes, void* recv,
                                                       const ByteLayout& rl) {
  enqueue_allgatherv(send, bytes, recv, rl);
  return request("ncclAllGather (allgatherv)");
}

std::unique_ptr<Communicator> make_nccl_communicator() {
  return std::make_unique<NcclCommunicator>();
}

}  // namespace int4ddp::comm
