// The device side of the BucketEngine (see device_buckets.h): one CUDA stream of its own, one event
// per bucket (recorded on the arena's stream when the bucket's gradients are final), and the
// buffers of the staged path (a pinned mirror of the arena) or of the device path (device staging
// for a bucket's compressed or uncompressed tensors when they do not tile one arena range).
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "comm/device_buckets.h"
#include "comm/two_shot_cuda.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::comm {
namespace {

class CudaBuckets final : public DeviceBuckets {
 public:
  CudaBuckets(Communicator& comm, const GradArena& arena, int64_t arena_size,
              const std::vector<BucketPlan>& plan);
  ~CudaBuckets() override { release(); }
  CudaBuckets(const CudaBuckets&) = delete;
  CudaBuckets& operator=(const CudaBuckets&) = delete;

  void bind_thread() override { INT4DDP_CUDA_CHECK(cudaSetDevice(device_)); }
  void mark_ready(size_t i) override {
    INT4DDP_CUDA_CHECK(cudaEventRecord(ready_.at(i), compute_));
  }
  float* host_mirror() override { return mirror_; }
  void to_host(size_t i) override;
  void to_device(size_t i) override;
  std::unique_ptr<BucketReducer> make_reducer(const CompressConfig& cfg, int64_t count,
                                              uint32_t bucket_id) override {
    return std::make_unique<ReducerOf<TwoShotAllreduceCuda>>(comm_, cfg, count, bucket_id, stream_);
  }
  BucketStats run(size_t i, BucketReducer* two_shot, uint32_t step) override;

 private:
  struct Buffers {
    float* staging = nullptr;  // (ncompressed) when the compressed tensors are not contiguous
    float* plain = nullptr;    // (nplain) when the plain tensors are not contiguous
  };
  float* device_floats(int64_t count);
  void gather(const std::vector<Segment>& segs, float* dst);         // arena -> dst, packed
  void scatter(const std::vector<Segment>& segs, const float* src);  // packed src -> arena
  void sync() { INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  void release();  // no throwing: used by the destructor and after a failed construction

  Communicator& comm_;
  float* arena_;
  cudaStream_t compute_;
  int device_ = 0;
  std::vector<BucketPlan> plan_;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> ready_;
  std::vector<Buffers> buffers_;
  std::vector<void*> allocations_;
  float* mirror_ = nullptr;  // staged path: pinned host copy of the arena
};

CudaBuckets::CudaBuckets(Communicator& comm, const GradArena& arena, int64_t arena_size,
                         const std::vector<BucketPlan>& plan)
    : comm_(comm),
      arena_(arena.data),
      compute_(static_cast<cudaStream_t>(arena.stream)),
      plan_(plan) {
  INT4DDP_CHECK(arena.device && (arena_ != nullptr || arena_size == 0),
                "gradient buckets: no device gradient arena");
  try {
    INT4DDP_CUDA_CHECK(cudaGetDevice(&device_));
    INT4DDP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ready_.assign(plan_.size(), nullptr);
    for (cudaEvent_t& e : ready_)
      INT4DDP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    if (!comm_.device_buffers()) {
      const size_t bytes = sizeof(float) * static_cast<size_t>(std::max<int64_t>(arena_size, 1));
      INT4DDP_CUDA_CHECK(
          cudaHostAlloc(reinterpret_cast<void**>(&mirror_), bytes, cudaHostAllocDefault));
      return;
    }
    buffers_.resize(plan_.size());
    for (size_t i = 0; i < plan_.size(); ++i) {
      const BucketPlan& b = plan_[i];
      if (b.ncompressed > 0 && b.in_place < 0) buffers_[i].staging = device_floats(b.ncompressed);
      if (b.nplain > 0 && b.plain_in_place < 0) buffers_[i].plain = device_floats(b.nplain);
    }
  } catch (...) {
    release();
    throw;
  }
}

float* CudaBuckets::device_floats(int64_t count) {
  void* p = nullptr;
  INT4DDP_CUDA_CHECK(cudaMalloc(&p, sizeof(float) * static_cast<size_t>(count)));
  allocations_.push_back(p);
  return static_cast<float*>(p);
}

void CudaBuckets::release() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (void* p : allocations_) cudaFree(p);
  allocations_.clear();
  for (cudaEvent_t e : ready_)
    if (e) cudaEventDestroy(e);
  ready_.clear();
  if (mirror_) cudaFreeHost(mirror_);
  mirror_ = nullptr;
  if (stream_) cudaStreamDestroy(stream_);
  stream_ = nullptr;
}

void CudaBuckets::to_host(size_t i) {
  const BucketPlan& b = plan_.at(i);
  INT4DDP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_[i], 0));
  INT4DDP_CUDA_CHECK(cudaMemcpyAsync(mirror_ + b.begin, arena_ + b.begin,
                                     sizeof(float) * static_cast<size_t>(b.end - b.begin),
                                     cudaMemcpyDeviceToHost, stream_));
  sync();
}

void CudaBuckets::to_device(size_t i) {
  const BucketPlan& b = plan_.at(i);
  INT4DDP_CUDA_CHECK(cudaMemcpyAsync(arena_ + b.begin, mirror_ + b.begin,
                                     sizeof(float) * static_cast<size_t>(b.end - b.begin),
                                     cudaMemcpyHostToDevice, stream_));
  sync();
}

void CudaBuckets::gather(const std::vector<Segment>& segs, float* dst) {
  for (const Segment& s : segs) {
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(dst, arena_ + s.offset,
                                       sizeof(float) * static_cast<size_t>(s.count),
                                       cudaMemcpyDeviceToDevice, stream_));
    dst += s.count;
  }
}

void CudaBuckets::scatter(const std::vector<Segment>& segs, const float* src) {
  for (const Segment& s : segs) {
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(arena_ + s.offset, src,
                                       sizeof(float) * static_cast<size_t>(s.count),
                                       cudaMemcpyDeviceToDevice, stream_));
    src += s.count;
  }
}

BucketStats CudaBuckets::run(size_t i, BucketReducer* two_shot, uint32_t step) {
  const BucketPlan& b = plan_.at(i);
  const Buffers& buf = buffers_.at(i);
  BucketStats st;
  double copy_seconds = 0;
  auto t = Clock::now();
  // Everything below is queued on stream_ behind backward's writes of this bucket.
  INT4DDP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_[i], 0));
  if (two_shot) {
    float* x = b.in_place >= 0 ? arena_ + b.in_place : buf.staging;
    if (b.in_place < 0) gather(b.compressed, x);
    copy_seconds += seconds_since(t);
    st = two_shot->run(x, step);  // on stream_; returns when x holds the mean
    t = Clock::now();
    if (b.in_place < 0) scatter(b.compressed, x);
  }
  if (b.nplain > 0) {
    const bool in_place = b.plain_in_place >= 0;
    float* p = in_place ? arena_ + b.plain_in_place : buf.plain;
    if (!in_place) gather(b.plain, p);
    // The communicator orders its work after the legacy default stream only: finish ours first.
    sync();
    copy_seconds += seconds_since(t);
    const uint64_t bytes0 = comm_.bytes_sent();
    const auto tc = Clock::now();
    comm_.allreduce_sum(p, b.nplain);
    st.comm_seconds += seconds_since(tc);
    st.wire_bytes += comm_.bytes_sent() - bytes0;
    t = Clock::now();
    quant::cuda::div_async(p, b.nplain, static_cast<float>(comm_.size()), stream_);
    if (!in_place) scatter(b.plain, p);
  }
  sync();
  copy_seconds += seconds_since(t);
  st.quant_seconds += copy_seconds;
  return st;
}

}  // namespace

std::unique_ptr<DeviceBuckets> make_device_buckets(Communicator& comm, const GradArena& arena,
                                                   int64_t arena_size,
                                                   const std::vector<BucketPlan>& plan) {
  return std::make_unique<CudaBuckets>(comm, arena, arena_size, plan);
}

}  // namespace int4ddp::comm
