// The training batches of one rank (trainer.cpp). Single-buffered (the CPU): one host buffer,
// assembled when a step asks for it. Double-buffered (the GPU): two buffers, page-locked there,
// take turns: while step i runs, a host thread assembles batch i+1 into the other one, after
// waiting for the copy of that buffer's previous batch to the device (Slot::copied, recorded by the
// trainer after the forward that read it). assemble_batch is a pure function of the indices, the
// seed and the epoch, so the batches, and the results, are those of the serial order.
#pragma once

#include <cstdint>
#include <future>
#include <vector>

#include "src/core/device.h"
#include "src/core/tensor.h"
#include "src/data/dataset.h"

namespace int4ddp::train {

class BatchPipeline {
 public:
  struct Slot {
    Tensor x;                      // (batch, channels, height, width)
    std::vector<int32_t> labels;   // (batch)
    std::vector<int64_t> indices;  // a prefetch's own copy of its examples' indices
    StreamEvent copied;            // mark_copied(): after the forward that copied x to the device
    int64_t epoch = -1, batch = -1;
  };

  // shape: the batch tensor's; pinned: page-locked buffers (a CUDA build).
  BatchPipeline(const data::Dataset& d, const Shape& shape, const data::AugmentConfig& aug,
                uint64_t seed, bool double_buffered, bool pinned);
  ~BatchPipeline();
  BatchPipeline(const BatchPipeline&) = delete;
  BatchPipeline& operator=(const BatchPipeline&) = delete;

  // Batch `batch` of `epoch` whose examples are indices[0..batch size): the prefetched slot when
  // it holds that batch, else assembled now. Rethrows a failed prefetch's error.
  Slot& take(int64_t epoch, int64_t batch, const int64_t* indices);
  // Starts assembling batch `batch` of `epoch` into the other buffer on a host thread (double-
  // buffered only; otherwise nothing). indices are copied: the caller may change them at once.
  void prefetch(int64_t epoch, int64_t batch, const int64_t* indices);
  // After the forward that copied slot s's batch to the device (enqueued on the compute stream):
  // s may be refilled once the stream has got there. Nothing to wait for with host buffers.
  void mark_copied(Slot& s);

 private:
  void fill(Slot& s, int64_t epoch, int64_t batch, const int64_t* indices);

  const data::Dataset& data_;
  const data::AugmentConfig aug_;
  const uint64_t seed_;
  const bool double_buffered_;
  const bool pinned_;
  Slot slots_[2];
  int current_ = 1;  // the slot of the last take(); the first take() uses slot 0
  std::future<void> pending_;
};

}  // namespace int4ddp::train
