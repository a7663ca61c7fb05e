// The two-shot compressed all-reduce on DEVICE buffers: the plan of comm/two_shot.h (TwoShotPlan:
// algorithm, keys, chunking, wire format and state), with the quantizer on the GPU
// (kernels/quant/cuda/codec_cuda.h). For the same inputs, keys and state every rank ends with the
// same bits as the host version, and save_state() blobs are interchangeable with it.
//
// Transport: any Communicator with device_buffers(): NCCL (make_nccl_communicator()), or MPI
// staged through pinned host memory (StagedCommunicator over make_mpi_communicator()).
//
// Streams: run() enqueues on `stream` (the constructor's; nullptr is the legacy default stream),
// so x may be produced by kernels queued there. It waits for the stream before each collective
// (the transports take device pointers and run on their own streams) and returns when x holds the
// result, as the host version does.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "comm/two_shot.h"
#include "kernels/quant/cuda/codec_cuda.h"

namespace int4ddp::comm {

class TwoShotAllreduceCuda final : public TwoShotBase {
 public:
  TwoShotAllreduceCuda(Communicator& comm, const CompressConfig& cfg, int64_t count,
                       uint32_t bucket_id, cudaStream_t stream = nullptr);
  ~TwoShotAllreduceCuda();
  TwoShotAllreduceCuda(const TwoShotAllreduceCuda&) = delete;
  TwoShotAllreduceCuda& operator=(const TwoShotAllreduceCuda&) = delete;

  // In place: x <- the compressed mean over ranks of x (count floats, device memory).
  BucketStats run(float* x, uint32_t step);
  // Accept (true) or drop (false) the error-feedback and gamma updates of the last run().
  void commit(bool apply);

  // The host version's blob format (header, e_w, e_s, policy state).
  std::vector<uint8_t> save_state() const;
  void load_state(const std::vector<uint8_t>& blob);

 private:
  template <typename T>
  T* device_alloc(size_t count);
  void sync();

  cudaStream_t stream_;
  // Device buffers (sizes in elements of their type).
  float* ew_ = nullptr;                      // (count) worker error, when worker_error_feedback
  float* ew_next_ = nullptr;                 // (count)
  float* es_ = nullptr;                      // (own chunk) server error, when server_error_feedback
  float* es_next_ = nullptr;                 // (own chunk)
  float* v_ = nullptr;                       // (count) g + e_w
  float* tmp_ = nullptr;                     // (count) dequantized worker messages
  float* scales_ = nullptr;                  // (plan_.total_scales()) aligned scales of every chunk
  uint8_t* send_ = nullptr;                  // (send_layout().total()) worker messages
  uint8_t* recv_ = nullptr;                  // (recv_layout().total()) messages of the own chunk
  uint8_t* gathered_ = nullptr;              // (gather_layout().total()) requantized chunks
  uint8_t* own_copy_ = nullptr;              // (own message) all-gather send buffer
  quant::QuantStats* stats_ = nullptr;       // (N + 1): worker chunks, owner
  float* clips_ = nullptr;                   // (plan_.total_scales()) block clips (topk, mse)
  quant::QuantStats* gathered_h_ = nullptr;  // (N) pinned host copies of the gathered stats
  std::vector<void*> allocations_;
};

}  // namespace int4ddp::comm
