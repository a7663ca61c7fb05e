// Where a tensor's storage lives (train.device) and the few device operations the CPU-side code
// needs: allocation, copies, zeroing, and the choice of this rank's GPU. Free of CUDA types, so
// every file may include it; in a build without CUDA every kCuda operation throws int4ddp::Error.
//
// One compute stream per process (device_cuda.h): every device copy here and every CUDA layer
// enqueues on it, so work on the GPU runs in program order without further synchronisation. A copy
// whose destination is host memory returns once the host can read it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace int4ddp {

enum class Device : uint8_t { kCpu = 0, kCuda = 1 };

const char* device_name(Device d);  // "cpu", "cuda"

// True when this int4ddp was built with CUDA (a GPU may still be absent).
bool cuda_built();

// Selects this process's GPU, node-local rank modulo the visible devices (the NCCL communicator's
// rule), once; later calls return the same device. Throws Error naming the rank when there is no
// GPU or CUDA is not built in.
int select_gpu();

// "GPU <index>: <name>, <GiB> GiB" of the selected GPU (selecting it), for the trainer's banner.
std::string describe_gpu();

// Storage of count floats: kCuda in device memory (cudaMalloc on the selected GPU), kCpu with
// pinned = true in page-locked host memory (cudaMallocHost, for asynchronous copies), zeroed.
// Too little memory throws Error naming the bytes asked for, the free memory and the rank.
std::shared_ptr<float> allocate_floats(Device device, bool pinned, int64_t count);

// dst <- src, count floats, on the compute stream. Returns when a host dst is readable; a copy
// into device memory may still be in flight (later work on the stream sees it).
void copy_floats(float* dst, Device dst_device, const float* src, Device src_device, int64_t count);
// The same for raw bytes (labels, indices).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes);

// p[0..count) = 0 on the compute stream (device) or at once (host).
void zero_floats(float* p, Device device, int64_t count);

// Waits for everything enqueued on the compute stream (no-op without CUDA).
void synchronize_device();

// A marker on the compute stream (a CUDA event): record() marks the work enqueued so far, wait()
// blocks the calling thread until that work is done (at once when nothing was recorded). The
// trainer's double-buffered batch loading waits on it before it overwrites a pinned buffer whose
// copy to the GPU may still be in flight. Without CUDA both are no-ops.
class StreamEvent {
 public:
  StreamEvent() = default;
  ~StreamEvent();
  StreamEvent(const StreamEvent&) = delete;
  StreamEvent& operator=(const StreamEvent&) = delete;
  void record();
  void wait();

 private:
  void* event_ = nullptr;  // cudaEvent_t, created on the first record()
  bool recorded_ = false;
};

}  // namespace int4ddp
