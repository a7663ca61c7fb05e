// The NCCL Communicator (see nccl_communicator.h). The only file that calls NCCL; it calls NCCL
// and CUDA only (MPI through the Communicator interface).
#include "comm/nccl_communicator.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp {

namespace detail {

std::string nccl_error_text(ncclResult_t rc, ncclComm_t comm) {
  std::string what = ncclGetErrorString(rc);
  const char* last = ncclGetLastError(comm);
  if (last && *last) what += std::string(" (") + last + ")";
  return what;
}

}  // namespace detail

namespace comm {
namespace {

// NCCL reports failures of work already queued (a peer gone, a network error) asynchronously: a
// check after waiting for the work, reporting the caller's file:line.
#define INT4DDP_NCCL_CHECK_ASYNC(comm, what)                                          \
  do {                                                                                \
    ncclResult_t async_ = ncclSuccess;                                                \
    INT4DDP_NCCL_CHECK_COMM(comm, ncclCommGetAsyncError(comm, &async_));              \
    if (async_ != ncclSuccess)                                                        \
      ::int4ddp::detail::fail_call("NCCL", what, __FILE__, __LINE__,                  \
                                   ::int4ddp::detail::nccl_error_text(async_, comm)); \
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

 private:
  void begin();                                        // hand-off from the default stream
  void sync();                                         // wait for the NCCL stream, check errors
  std::unique_ptr<Request> request(const char* what);  // event marking the queued work
  void enqueue_alltoallv(const void* send, const ByteLayout& sl, void* recv, const ByteLayout& rl);
  void enqueue_allgatherv(const void* send, size_t bytes, void* recv, const ByteLayout& rl);
  void check_layout(const ByteLayout& l, const char* what) const;

  std::unique_ptr<Communicator> mpi_;  // rendezvous and host-memory calls
  int rank_ = 0, size_ = 1, device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  bool aborted_ = false;  // ncclCommAbort ran after an error: comm_ is gone
};

// NCCL's asynchronous error of comm, or ncclSuccess (also while an operation is in progress).
ncclResult_t async_error(ncclComm_t comm) {
  ncclResult_t async = ncclSuccess;
  if (ncclCommGetAsyncError(comm, &async) != ncclSuccess) return ncclSystemError;
  return async == ncclInProgress ? ncclSuccess : async;
}

// Waits until query() stops answering cudaErrorNotReady, polling NCCL's asynchronous error on the
// way: a collective whose peer died never completes, so a plain synchronize would hang. On an
// NCCL error the communicator is aborted (its kernels stop, *aborted is set) and Error names the
// operation, the call and the rank (fail_call).
template <typename Query>
void wait_or_abort(ncclComm_t comm, bool* aborted, const char* what, Query&& query) {
  for (;;) {
    const cudaError_t rc = query();
    if (rc != cudaErrorNotReady) {
      INT4DDP_CUDA_CHECK(rc);
      break;
    }
    const ncclResult_t async = async_error(comm);
    if (async != ncclSuccess) {
      const std::string text = detail::nccl_error_text(async, comm);
      ncclCommAbort(comm);
      *aborted = true;
      detail::fail_call("NCCL", what, __FILE__, __LINE__, text);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  INT4DDP_NCCL_CHECK_ASYNC(comm, what);
}

class NcclRequest final : public Request {
 public:
  NcclRequest(ncclComm_t comm, bool* aborted, cudaStream_t stream, const char* what)
      : comm_(comm), aborted_(aborted), what_(what) {
    INT4DDP_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    INT4DDP_CUDA_CHECK(cudaEventRecord(done_, stream));
  }
  ~NcclRequest() override {
    if (!done_) return;
    // A Request that has not completed is waited for; no throwing from a destructor.
    if (!*aborted_) {
      try {
        wait_or_abort(comm_, aborted_, what_, [this] { return cudaEventQuery(done_); });
      } catch (...) {
      }
    }
    cudaEventDestroy(done_);
  }
  void wait() override {
    INT4DDP_CHECK(!*aborted_, what_, ": the NCCL communicator was aborted after an error");
    wait_or_abort(comm_, aborted_, what_, [this] { return cudaEventQuery(done_); });
  }
  bool test() override {
    INT4DDP_CHECK(!*aborted_, what_, ": the NCCL communicator was aborted after an error");
    const cudaError_t rc = cudaEventQuery(done_);
    if (rc == cudaErrorNotReady) {
      if (async_error(comm_) != ncclSuccess) wait();  // aborts and throws naming the error
      return false;
    }
    INT4DDP_CUDA_CHECK(rc);
    INT4DDP_NCCL_CHECK_ASYNC(comm_, what_);
    return true;
  }

 private:
  ncclComm_t comm_;
  bool* aborted_;  // the communicator's
  const char* what_;
  cudaEvent_t done_ = nullptr;
};

}  // namespace

NcclCommunicator::NcclCommunicator() : mpi_(make_mpi_communicator()) {
  rank_ = mpi_->rank();
  size_ = mpi_->size();

  // One GPU per rank: local rank i takes device i % count, and NCCL's "Duplicate GPU" failure is
  // turned into a message that says what to do. Every rank of the node sees the same bus ids, so
  // either all of them throw or none does.
  const std::unique_ptr<Communicator> node = make_mpi_node_communicator();
  const int local_rank = node->rank(), local_size = node->size();
  int ndev = 0;
  const cudaError_t dc = cudaGetDeviceCount(&ndev);
  if (dc != cudaSuccess) ndev = 0;
  int64_t ranks_without = ndev == 0 ? 1 : 0;
  mpi_->allreduce_sum_i64(&ranks_without, 1);
  INT4DDP_CHECK(ranks_without == 0, "comm.backend = nccl: rank ", rank_,
                (ndev == 0 ? " sees" : ": some rank sees"), " no CUDA device (",
                cudaGetErrorString(dc), ")");
  device_ = local_rank % ndev;
  INT4DDP_CUDA_CHECK(cudaSetDevice(device_));
  char bus[32] = {0};
  INT4DDP_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus) - 1, device_));
  std::vector<char> all(static_cast<size_t>(local_size) * sizeof(bus));
  node->allgatherv(
      bus, sizeof(bus), all.data(),
      ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(local_size), sizeof(bus))));
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
  // No throwing from a destructor: errors at teardown leave nothing to recover. Queued work is
  // waited for unless NCCL reports an error (then the communicator is aborted, not destroyed: a
  // collective whose peer is gone never completes).
  if (comm_ && !aborted_ && stream_) {
    try {
      wait_or_abort(comm_, &aborted_, "teardown", [this] { return cudaStreamQuery(stream_); });
    } catch (...) {
    }
  }
  if (comm_ && !aborted_) ncclCommDestroy(comm_);
  if (ready_) cudaEventDestroy(ready_);
  if (stream_) cudaStreamDestroy(stream_);
}

void NcclCommunicator::begin() {
  INT4DDP_CUDA_CHECK(cudaSetDevice(device_));
  INT4DDP_CUDA_CHECK(cudaEventRecord(ready_, nullptr));
  INT4DDP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
}

void NcclCommunicator::sync() {
  INT4DDP_CHECK(!aborted_, "NCCL: the communicator was aborted after an error on rank ", rank_);
  wait_or_abort(comm_, &aborted_, "a queued collective",
                [this] { return cudaStreamQuery(stream_); });
}

std::unique_ptr<Request> NcclCommunicator::request(const char* what) {
  return std::make_unique<NcclRequest>(comm_, &aborted_, stream_, what);
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
  if (bytes > 0)
    INT4DDP_NCCL_CHECK_COMM(comm_, ncclBroadcast(buf, buf, bytes, ncclUint8, root, comm_, stream_));
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
    INT4DDP_NCCL_CHECK_COMM(comm_, ncclAllReduce(buf, buf, static_cast<size_t>(count), ncclFloat32,
                                                 ncclSum, comm_, stream_));
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
  INT4DDP_NCCL_CHECK_COMM(comm_, ncclGroupStart());
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    const size_t jj = static_cast<size_t>(j);
    if (sl.counts[jj] > 0)
      INT4DDP_NCCL_CHECK_COMM(
          comm_, ncclSend(s + sl.displs[jj], sl.counts[jj], ncclUint8, j, comm_, stream_));
    if (rl.counts[jj] > 0)
      INT4DDP_NCCL_CHECK_COMM(
          comm_, ncclRecv(r + rl.displs[jj], rl.counts[jj], ncclUint8, j, comm_, stream_));
    if (j != rank_) bytes_sent_ += sl.counts[jj];
  }
  INT4DDP_NCCL_CHECK_COMM(comm_, ncclGroupEnd());
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
    if (bytes > 0)
      INT4DDP_NCCL_CHECK_COMM(comm_, ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream_));
  } else {
    if (bytes > 0 && r + rl.displs[me] != send)
      INT4DDP_CUDA_CHECK(
          cudaMemcpyAsync(r + rl.displs[me], send, bytes, cudaMemcpyDeviceToDevice, stream_));
    INT4DDP_NCCL_CHECK_COMM(comm_, ncclGroupStart());
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      const size_t jj = static_cast<size_t>(j);
      if (bytes > 0)
        INT4DDP_NCCL_CHECK_COMM(comm_, ncclSend(send, bytes, ncclUint8, j, comm_, stream_));
      if (rl.counts[jj] > 0)
        INT4DDP_NCCL_CHECK_COMM(
            comm_, ncclRecv(r + rl.displs[jj], rl.counts[jj], ncclUint8, j, comm_, stream_));
    }
    INT4DDP_NCCL_CHECK_COMM(comm_, ncclGroupEnd());
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

}  // namespace comm
}  // namespace int4ddp
