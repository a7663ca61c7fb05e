// StagedCommunicator: device buffers through pinned host memory (see staged_communicator.h).
#include "comm/staged_communicator.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>

#include "kernels/common/error.h"
#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::comm {
namespace {

class DoneRequest final : public Request {
 public:
  void wait() override {}
  bool test() override { return true; }
};

// The bytes a layout spans from its buffer's start (displacements need not be packed).
size_t extent(const ByteLayout& l) {
  size_t e = 0;
  for (size_t i = 0; i < l.counts.size() && i < l.displs.size(); ++i)
    if (l.counts[i] > 0) e = std::max(e, l.displs[i] + l.counts[i]);
  return e;
}

// buf (pinned, cap bytes) grown to at least `bytes`; its contents are not kept.
uint8_t* grow_pinned(uint8_t*& buf, size_t& cap, size_t bytes) {
  if (bytes > cap) {
    if (buf) INT4DDP_CUDA_CHECK(cudaFreeHost(buf));
    buf = nullptr;
    cap = 0;
    INT4DDP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&buf), bytes, cudaHostAllocDefault));
    cap = bytes;
  }
  return buf;
}

}  // namespace

StagedCommunicator::StagedCommunicator(std::unique_ptr<Communicator> host)
    : host_(std::move(host)) {
  INT4DDP_CHECK(host_ && !host_->device_buffers(),
                "staged communicator: needs a host-buffer transport underneath");
  // A blocking stream: it is ordered after the legacy default stream as well.
  INT4DDP_CUDA_CHECK(cudaStreamCreate(&stream_));
  INT4DDP_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
}

StagedCommunicator::~StagedCommunicator() {
  // Destructors do not throw: errors here leave nothing to recover.
  if (stream_) cudaStreamSynchronize(stream_);
  if (send_h_) cudaFreeHost(send_h_);
  if (recv_h_) cudaFreeHost(recv_h_);
  if (ready_) cudaEventDestroy(ready_);
  if (stream_) cudaStreamDestroy(stream_);
}

void StagedCommunicator::wait_for_compute() {
  INT4DDP_CUDA_CHECK(cudaEventRecord(ready_, nullptr));
  INT4DDP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
}

uint8_t* StagedCommunicator::host_send(size_t bytes) {
  return grow_pinned(send_h_, send_cap_, bytes);
}

uint8_t* StagedCommunicator::host_recv(size_t bytes) {
  return grow_pinned(recv_h_, recv_cap_, bytes);
}

void StagedCommunicator::to_host(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  INT4DDP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void StagedCommunicator::to_device(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  INT4DDP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
}

void StagedCommunicator::finish() { INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void StagedCommunicator::account(uint64_t before) { bytes_sent_ += host_->bytes_sent() - before; }

void StagedCommunicator::barrier() {
  wait_for_compute();
  finish();
  host_->barrier();
}

void StagedCommunicator::broadcast(void* buf, size_t bytes, int root) {
  const uint64_t before = host_->bytes_sent();
  wait_for_compute();
  uint8_t* h = host_send(std::max<size_t>(bytes, 1));
  if (rank() == root) to_host(h, buf, bytes);
  host_->broadcast(h, bytes, root);
  to_device(buf, h, bytes);
  finish();
  account(before);
}

void StagedCommunicator::allreduce_sum(float* buf, int64_t count) {
  INT4DDP_CHECK(count >= 0, "allreduce_sum: negative count ", count);
  const uint64_t before = host_->bytes_sent();
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  wait_for_compute();
  auto* h = reinterpret_cast<float*>(host_send(std::max<size_t>(bytes, 1)));
  to_host(h, buf, bytes);
  host_->allreduce_sum(h, count);
  to_device(buf, h, bytes);
  finish();
  account(before);
}

void StagedCommunicator::allreduce_sum_i64(int64_t* buf, int64_t count) {
  const uint64_t before = host_->bytes_sent();
  host_->allreduce_sum_i64(buf, count);
  account(before);
}

void StagedCommunicator::staged(const void* send, size_t send_bytes, void* recv, size_t recv_bytes,
                                const std::function<void(uint8_t*, uint8_t*)>& host_op) {
  const uint64_t before = host_->bytes_sent();
  wait_for_compute();
  uint8_t* hs = host_send(std::max<size_t>(send_bytes, 1));
  uint8_t* hr = host_recv(std::max<size_t>(recv_bytes, 1));
  to_host(hs, send, send_bytes);
  host_op(hs, hr);
  to_device(recv, hr, recv_bytes);
  finish();
  account(before);
}

void StagedCommunicator::alltoallv(const void* send, const ByteLayout& sl, void* recv,
                                   const ByteLayout& rl) {
  staged(send, extent(sl), recv, extent(rl),
         [&](uint8_t* hs, uint8_t* hr) { host_->alltoallv(hs, sl, hr, rl); });
}

void StagedCommunicator::allgatherv(const void* send, size_t send_bytes, void* recv,
                                    const ByteLayout& rl) {
  staged(send, send_bytes, recv, extent(rl),
         [&](uint8_t* hs, uint8_t* hr) { host_->allgatherv(hs, send_bytes, hr, rl); });
}

void StagedCommunicator::gatherv(const void* send, size_t send_bytes, void* recv,
                                 const ByteLayout& rl, int root) {
  const uint64_t before = host_->bytes_sent();
  host_->gatherv(send, send_bytes, recv, rl, root);
  account(before);
}

std::unique_ptr<Request> StagedCommunicator::iallreduce_sum(float* buf, int64_t count) {
  allreduce_sum(buf, count);
  return std::make_unique<DoneRequest>();
}

std::unique_ptr<Request> StagedCommunicator::ialltoallv(const void* send, const ByteLayout& sl,
                                                        void* recv, const ByteLayout& rl) {
  alltoallv(send, sl, recv, rl);
  return std::make_unique<DoneRequest>();
}

std::unique_ptr<Request> StagedCommunicator::iallgatherv(const void* send, size_t send_bytes,
                                                         void* recv, const ByteLayout& rl) {
  allgatherv(send, send_bytes, recv, rl);
  return std::make_unique<DoneRequest>();
}

}  // namespace int4ddp::comm
