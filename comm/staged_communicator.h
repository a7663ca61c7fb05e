// A device-buffer Communicator over a host transport: the GPU rank that talks MPI (DESIGN.md
// section 4, "a GPU rank with MPI stages through host memory").
//
// Every collective on device buffers copies them to pinned host memory on the adapter's own CUDA
// stream, runs the host transport's collective there, and copies the result back; it returns when
// the result is in device memory (the nonblocking variants complete before they return). The
// host-memory calls (allreduce_sum_i64, gatherv) and barrier go straight to the host transport.
// Ordering with the caller's kernels: the copies wait for an event recorded on the legacy default
// stream, so work queued there before a call is visible to it.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>
#include <memory>

#include "comm/communicator.h"

namespace int4ddp::comm {

class StagedCommunicator final : public Communicator {
 public:
  explicit StagedCommunicator(std::unique_ptr<Communicator> host);
  ~StagedCommunicator() override;
  StagedCommunicator(const StagedCommunicator&) = delete;
  StagedCommunicator& operator=(const StagedCommunicator&) = delete;

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  const char* backend() const override { return host_->backend(); }
  bool device_buffers() const override { return true; }

  void barrier() override;
  void broadcast(void* buf, size_t bytes, int root) override;
  void allreduce_sum(float* buf, int64_t count) override;
  void allreduce_sum_i64(int64_t* buf, int64_t count) override;  // host memory
  void alltoallv(const void* send, const ByteLayout& send_layout, void* recv,
                 const ByteLayout& recv_layout) override;
  void allgatherv(const void* send, size_t send_bytes, void* recv,
                  const ByteLayout& recv_layout) override;
  void gatherv(const void* send, size_t send_bytes, void* recv, const ByteLayout& recv_layout,
               int root) override;  // host memory
  std::unique_ptr<Request> iallreduce_sum(float* buf, int64_t count) override;
  std::unique_ptr<Request> ialltoallv(const void* send, const ByteLayout& send_layout, void* recv,
                                      const ByteLayout& recv_layout) override;
  std::unique_ptr<Request> iallgatherv(const void* send, size_t send_bytes, void* recv,
                                       const ByteLayout& recv_layout) override;

 private:
  void wait_for_compute();
  uint8_t* host_send(size_t bytes);  // pinned staging buffers, grown on demand
  uint8_t* host_recv(size_t bytes);
  void to_host(void* dst, const void* src, size_t bytes);
  void to_device(void* dst, const void* src, size_t bytes);
  void finish();  // wait for the copies to device
  void account(uint64_t host_bytes_before);
  // Device send -> pinned host -> host_op(host send, host recv) -> device recv.
  void staged(const void* send, size_t send_bytes, void* recv, size_t recv_bytes,
              const std::function<void(uint8_t*, uint8_t*)>& host_op);

  std::unique_ptr<Communicator> host_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  uint8_t* send_h_ = nullptr;
  uint8_t* recv_h_ = nullptr;
  size_t send_cap_ = 0, recv_cap_ = 0;
};

}  // namespace int4ddp::comm
