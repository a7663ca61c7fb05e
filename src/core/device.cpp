// Device storage, copies and GPU selection (see device.h). Without CUDA, kCpu operations work and
// every kCuda one throws.
#include "src/core/device.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "kernels/common/error.h"

#ifdef INT4DDP_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/math/cuda/gemm_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "src/core/device_cuda.h"
#endif

namespace int4ddp {

const char* device_name(Device d) { return d == Device::kCuda ? "cuda" : "cpu"; }

#ifdef INT4DDP_HAVE_CUDA

namespace {
// The rank errors name: the launcher's, 0 for a process started without one.
int this_rank() { return std::max(0, launcher_rank()); }
}  // namespace

bool cuda_built() { return true; }

int select_gpu() {
  static int device = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    int count = 0;
    const cudaError_t rc = cudaGetDeviceCount(&count);
    INT4DDP_CHECK(rc == cudaSuccess && count > 0, "train.device = cuda: no CUDA device on rank ",
                  this_rank(), " (cudaGetDeviceCount: ",
                  rc == cudaSuccess ? std::string("0 devices") : detail::cuda_error_text(rc), ")");
    device = launcher_local_rank() % count;
    INT4DDP_CUDA_CHECK(cudaSetDevice(device));
  });
  INT4DDP_CUDA_CHECK(cudaSetDevice(device));  // this thread too
  return device;
}

std::string describe_gpu() {
  const int device = select_gpu();
  cudaDeviceProp prop;
  INT4DDP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return detail::concat("GPU ", device, ": ", prop.name, ", ", prop.totalGlobalMem >> 30, " GiB");
}

cudaStream_t compute_stream() {
  static cudaStream_t stream = [] {
    select_gpu();
    cudaStream_t s = nullptr;
    INT4DDP_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return s;
  }();
  return stream;
}

math::cuda::GemmContext& gemm_context() {
  static math::cuda::GemmContext* ctx = [] {
    select_gpu();
    return new math::cuda::GemmContext();
  }();
  return *ctx;
}

std::shared_ptr<float> allocate_floats(Device device, bool pinned, int64_t count) {
  INT4DDP_CHECK(count >= 0, "allocate_floats: negative count ", count);
  const size_t nbytes = sizeof(float) * static_cast<size_t>(std::max<int64_t>(1, count));
  if (device == Device::kCpu && !pinned) {
    float* p = static_cast<float*>(
        std::calloc(static_cast<size_t>(std::max<int64_t>(1, count)), sizeof(float)));
    INT4DDP_CHECK(p, "out of host memory allocating ", nbytes, " bytes");
    return std::shared_ptr<float>(p, [](float* q) { std::free(q); });
  }
  select_gpu();
  void* p = nullptr;
  if (device == Device::kCuda) {
    const cudaError_t rc = cudaMalloc(&p, nbytes);
    if (rc == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // an allocation failure is not sticky: clear it
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      INT4DDP_FAIL("CUDA error in cudaMalloc on rank ", this_rank(), ": out of device memory ",
                   "allocating ", nbytes, " bytes (", free_bytes, " of ", total_bytes,
                   " bytes free on GPU ", select_gpu(), "); use a smaller train.batch_size");
    }
    INT4DDP_CUDA_CHECK(rc);
    INT4DDP_CUDA_CHECK(cudaMemsetAsync(p, 0, nbytes, compute_stream()));
    return std::shared_ptr<float>(static_cast<float*>(p), [](float* q) { cudaFree(q); });
  }
  const cudaError_t rc = cudaMallocHost(&p, nbytes);
  if (rc == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    INT4DDP_FAIL("CUDA error in cudaMallocHost on rank ", this_rank(),
                 ": out of page-locked host memory allocating ", nbytes,
                 " bytes; use a smaller train.batch_size");
  }
  INT4DDP_CUDA_CHECK(rc);
  std::memset(p, 0, nbytes);
  return std::shared_ptr<float>(static_cast<float*>(p), [](float* q) { cudaFreeHost(q); });
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes) {
  if (nbytes <= 0) return;
  if (dst_device == Device::kCpu && src_device == Device::kCpu) {
    std::memcpy(dst, src, static_cast<size_t>(nbytes));
    return;
  }
  cudaStream_t s = compute_stream();
  INT4DDP_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(nbytes), cudaMemcpyDefault, s));
  if (dst_device == Device::kCpu) INT4DDP_CUDA_CHECK(cudaStreamSynchronize(s));
}

void zero_floats(float* p, Device device, int64_t count) {
  if (count <= 0) return;
  if (device == Device::kCpu) {
    std::memset(p, 0, sizeof(float) * static_cast<size_t>(count));
    return;
  }
  INT4DDP_CUDA_CHECK(
      cudaMemsetAsync(p, 0, sizeof(float) * static_cast<size_t>(count), compute_stream()));
}

void synchronize_device() { INT4DDP_CUDA_CHECK(cudaStreamSynchronize(compute_stream())); }

StreamEvent::~StreamEvent() {
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));  // no throw from a destructor
}

void StreamEvent::record() {
  if (!event_) {
    select_gpu();
    cudaEvent_t e = nullptr;
    INT4DDP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    event_ = e;
  }
  INT4DDP_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event_), compute_stream()));
  recorded_ = true;
}

void StreamEvent::wait() {
  if (!recorded_) return;
  select_gpu();  // this thread too (the batch loader's)
  INT4DDP_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
}

#else  // no CUDA

bool cuda_built() { return false; }

namespace {
[[noreturn]] void no_cuda(const char* what) {
  INT4DDP_FAIL(what,
               ": this int4ddp was built without CUDA (train.device = cuda needs a CUDA "
               "build)");
}
}  // namespace

int select_gpu() { no_cuda("select_gpu"); }

std::string describe_gpu() { no_cuda("describe_gpu"); }

std::shared_ptr<float> allocate_floats(Device device, bool pinned, int64_t count) {
  if (device == Device::kCuda || pinned) no_cuda("allocate_floats");
  float* p = static_cast<float*>(
      std::calloc(static_cast<size_t>(std::max<int64_t>(1, count)), sizeof(float)));
  INT4DDP_CHECK(p, "out of host memory allocating ", count, " floats");
  return std::shared_ptr<float>(p, [](float* q) { std::free(q); });
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, int64_t nbytes) {
  if (dst_device == Device::kCuda || src_device == Device::kCuda) no_cuda("copy_bytes");
  if (nbytes > 0) std::memcpy(dst, src, static_cast<size_t>(nbytes));
}

void zero_floats(float* p, Device device, int64_t count) {
  if (device == Device::kCuda) no_cuda("zero_floats");
  if (count > 0) std::memset(p, 0, sizeof(float) * static_cast<size_t>(count));
}

void synchronize_device() {}

StreamEvent::~StreamEvent() = default;
void StreamEvent::record() {}
void StreamEvent::wait() {}

#endif

void copy_floats(float* dst, Device dst_device, const float* src, Device src_device,
                 int64_t count) {
  copy_bytes(dst, dst_device, src, src_device, static_cast<int64_t>(sizeof(float)) * count);
}

}  // namespace int4ddp
