// The device side of a BucketEngine whose gradient arena is in GPU memory (comm/buckets.h): the
// staged path (a pinned host mirror of the arena, copies of a bucket's range down and up) and the
// device path (the device two-shot and the fp32 all-reduce of a bucket in device memory). Free of
// CUDA types; comm/device_buckets_cuda.cpp implements it in CUDA builds, and elsewhere
// make_device_buckets() throws Error.
//
// Threads: mark_ready() runs on the thread that runs backward (it records the bucket's event on
// the arena's stream); bind_thread(), to_host(), to_device() and run() on the communication thread,
// one bucket at a time; the reducers it makes run on its stream.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "comm/buckets.h"
#include "comm/communicator.h"
#include "comm/two_shot.h"

namespace int4ddp::comm {

class DeviceBuckets {
 public:
  virtual ~DeviceBuckets() = default;

  // The communication thread's first call: makes the arena's GPU current for that thread.
  virtual void bind_thread() = 0;
  // Bucket i's gradients are final once the work queued so far on the arena's stream is done.
  virtual void mark_ready(size_t i) = 0;

  // Staged path: the pinned host mirror of the whole arena; bucket i's range [begin, end) is
  // copied into it (after its event) and back (returning when the copy is done). Bytes between a
  // bucket's tensors (none in a model's arena) make the round trip unchanged.
  virtual float* host_mirror() = 0;
  virtual void to_host(size_t i) = 0;
  virtual void to_device(size_t i) = 0;

  // Device path: the device two-shot of a bucket's compressed part (on this object's stream), and
  // bucket i's whole all-reduce (mean) in the arena: after its event, the compressed part by
  // two_shot (in place or through a device staging copy), the rest by the communicator's fp32
  // all-reduce; returns when the results are in the arena.
  virtual std::unique_ptr<BucketReducer> make_reducer(const CompressConfig& cfg, int64_t count,
                                                      uint32_t bucket_id) = 0;
  virtual BucketStats run(size_t i, BucketReducer* two_shot, uint32_t step) = 0;
};

// plan: the engine's buckets in launch order; arena_size: floats of the arena (the mirror's size).
// The device path when comm.device_buffers(), else the staged path.
std::unique_ptr<DeviceBuckets> make_device_buckets(Communicator& comm, const GradArena& arena,
                                                   int64_t arena_size,
                                                   const std::vector<BucketPlan>& plan);

// A BucketReducer over any type with the two-shot interface (run, commit, save_state, load_state).
template <typename T>
class ReducerOf final : public BucketReducer {
 public:
  template <typename... Args>
  explicit ReducerOf(Args&&... args) : impl_(std::forward<Args>(args)...) {}
  BucketStats run(float* x, uint32_t step) override { return impl_.run(x, step); }
  void commit(bool apply) override { impl_.commit(apply); }
  std::vector<uint8_t> save_state() const override { return impl_.save_state(); }
  void load_state(const std::vector<uint8_t>& blob) override { impl_.load_state(blob); }

 private:
  T impl_;
};

}  // namespace int4ddp::comm
