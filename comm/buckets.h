// Gradient buckets: the data-parallel all-reduce of a flat gradient arena, overlapped with the
// backward pass (DESIGN.md section 4). Knows nothing about layers: the caller describes its
// gradient tensors as segments of one float arena in forward order.
//
//   - Buckets are filled in reverse order (the last tensor first, as backward produces them) until
//     they hold comm.bucket_mb MiB of fp32 gradient; a tensor is never split.
//   - Inside a bucket, tensors with at least small_tensor_threshold elements travel compressed
//     (BucketAllreduce, one per bucket: the two-shot, flat or under the node hierarchy of
//     comm/hierarchy.h, on those tensors concatenated in arena order: in place when they are
//     contiguous in the arena, else through a staging copy); the smaller ones go uncompressed
//     with an fp32 all-reduce.
//     In fp32 mode everything is uncompressed.
//   - The trainer calls ready_from(offset) during backward whenever every gradient at arena
//     offset >= offset is final; each bucket that becomes complete is queued to one communication
//     thread, which copies it out of the arena, all-reduces it (mean) and copies the result back.
//     With overlap off, buckets are queued only by finish().
//   - finish() waits for every bucket of the step (and rethrows a communication error). On the
//     host paths the communication thread also counts the non-finite values of each bucket's
//     all-reduced result (StepCommStats::result_nonfinite), so the trainer need not scan the arena
//     again on the main thread.
//   - commit(apply) moves the error-feedback and gamma state of every bucket to the new step or
//     drops it (a skipped step).
// Between begin_step() and finish() the Communicator belongs to the communication thread.
//
// Where the arena lives (GradArena) chooses how each bucket is all-reduced; the plan (buckets,
// launch order, keys, error-feedback and gamma state, checkpoint blobs) is the same on every path:
//   host arena, host communicator (MPI, local): the host two-shot on the arena, as above;
//   device arena, host communicator ("staged"): the bucket's arena range is copied to a pinned
//     host mirror of the arena, all-reduced there exactly as on the host path (same bits), and
//     copied back;
//   device arena, device communicator (NCCL): the device two-shot (comm/two_shot_cuda.h) on the
//     engine's own CUDA stream, in place in the arena (or through a device staging copy), its error
//     feedback in device memory; the uncompressed part by the communicator's fp32 all-reduce
//     (ncclAllReduce). The hierarchy is flat there.
// On the device, ready_from() records an event on the arena's stream (where backward writes the
// gradients) for every bucket it completes; the communication thread makes its stream wait for
// that event before it reads the bucket, so the hand-off needs no host synchronisation, and
// finish() returns when every result is in the arena.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/hierarchy.h"
#include "comm/two_shot.h"

namespace int4ddp::comm {

struct Segment {
  int64_t offset = 0, count = 0;  // a tensor in the arena
};

struct BucketConfig {
  double bucket_mb = 25.0;                         // MiB of fp32 gradient per bucket, > 0
  int64_t small_tensor_threshold = 4096;           // tensors with fewer elements go uncompressed
  bool overlap = true;                             // launch buckets during backward
  HierarchyMode hierarchy = HierarchyMode::kAuto;  // of the compressed all-reduce
  CompressConfig compress;                         // bits 32 = fp32 mode
  // comm.mode auto: called once per bucket with compressible elements while the engine is built,
  // with the bucket's compressible element count. Flat: kFp32Bits sends that bucket uncompressed
  // (plan_buckets), anything else compressed at compress.bits. Under the node hierarchy it decides
  // the cross-node level only: the bucket stays on the hierarchical all-reduce, whose two-shot
  // between nodes runs at the returned bits (kFp32Bits: the shares cross nodes in fp32; the node
  // level is fp32 either way). Must decide the same on every rank. Empty: compress.bits for every
  // bucket.
  std::function<int(int64_t count)> choose_bits;
  // comm.mode auto with a start-up measurement: called once while the engine is built, on every
  // rank, after the node hierarchy is resolved (it may run collectives on it, e.g.
  // comm/auto_mode.h's measure_levels); returns the chooser, which replaces choose_bits.
  std::function<std::function<int(int64_t count)>(Hierarchy& hierarchy)> make_chooser;
};

// The gradient arena the engine reduces in place.
struct GradArena {
  float* data = nullptr;
  bool device = false;     // CUDA device memory (needs a CUDA build)
  void* stream = nullptr;  // device: the cudaStream_t backward writes gradients on (null: legacy
                           // default stream)
};

// One bucket of the plan: what every rank computes identically from the config and the tensors.
struct BucketPlan {
  int64_t begin = 0,
          end = 0;  // arena range of its tensors [begin, end); ready at ready_from(begin)
  std::vector<Segment> compressed, plain;  // each in arena order
  int64_t ncompressed = 0, nplain = 0;
  int64_t in_place = -1;        // arena offset when the compressed tensors tile one range there
  int64_t plain_in_place = -1;  // the same for the uncompressed tensors
};

// The arena offset of segs (in arena order) when they tile one range, else -1 (also when empty).
int64_t tiled_offset(const std::vector<Segment>& segs);

// x[i] /= n for the count floats of x (the mean of an fp32 sum over n ranks); returns how many of
// the results are NaN or Inf.
int64_t divide_and_count_nonfinite(float* x, int64_t count, float n);
// How many of the count floats of x are NaN or Inf.
int64_t count_nonfinite(const float* x, int64_t count);

// The buckets of tensors (any order, disjoint) in launch order, as described at the top; calls
// cfg.choose_bits once per bucket with compressible elements (the flat decision: the engine clears
// it under an active node hierarchy). Throws Error for a bad config or segment.
std::vector<BucketPlan> plan_buckets(const BucketConfig& cfg, std::vector<Segment> tensors);

// How a BucketEngine reaches its arena (see the top of this file).
enum class BucketPath : uint8_t { kHost, kStaged, kDevice };
const char* bucket_path_name(BucketPath p);  // "host", "staged", "device"

// The all-reduce of one bucket's compressed tensors (host BucketAllreduce or the device two-shot).
class BucketReducer {
 public:
  virtual ~BucketReducer() = default;
  virtual BucketStats run(float* x, uint32_t step) = 0;
  virtual void commit(bool apply) = 0;
  virtual std::vector<uint8_t> save_state() const = 0;
  virtual void load_state(const std::vector<uint8_t>& blob) = 0;
};

class DeviceBuckets;  // comm/device_buckets.h

// Per-step totals over all buckets (this rank).
struct StepCommStats {
  int64_t compressed_elements = 0, plain_elements = 0;
  int64_t clipped = 0, quantized = 0;  // global counts of the compressed parts
  int64_t nonfinite = 0;               // global NaN/Inf count of the compressed parts
  // NaN/Inf in the all-reduced gradients (every bucket's result, the whole arena), the same on
  // every rank; -1 where not counted (the device path: scan the arena instead).
  int64_t result_nonfinite = -1;
  uint64_t wire_bytes = 0;    // bytes this rank sent
  double quant_seconds = 0;   // comm thread: quantize, dequantize, reduce, copies
  double comm_seconds = 0;    // comm thread: inside collectives
  double wait_seconds = 0;    // main thread: blocked in finish()
  std::vector<float> gammas;  // per compressed bucket
  // fp32 ring all-reduce bytes of the same gradient / wire bytes (1 with one rank)
  double compression_ratio = 1.0;
  double clip_fraction() const {
    return quantized ? static_cast<double>(clipped) / quantized : 0.0;
  }
};

class BucketEngine {
 public:
  // grads: the arena (stays owned by the caller); tensors in forward order, disjoint. A device
  // arena needs a CUDA build; a host arena needs a host communicator.
  BucketEngine(Communicator& comm, const BucketConfig& cfg, GradArena grads,
               std::vector<Segment> tensors);
  BucketEngine(Communicator& comm, const BucketConfig& cfg, float* grads,
               std::vector<Segment> tensors)
      : BucketEngine(comm, cfg, GradArena{grads, false, nullptr}, std::move(tensors)) {}
  ~BucketEngine();
  BucketEngine(const BucketEngine&) = delete;
  BucketEngine& operator=(const BucketEngine&) = delete;

  void begin_step(uint32_t step);
  void ready_from(int64_t offset);
  StepCommStats finish();
  void commit(bool apply);

  int num_buckets() const { return static_cast<int>(buckets_.size()); }
  BucketPath path() const { return path_; }
  int num_compressed_buckets() const;
  // The resolved comm.hierarchy and why, e.g. "node (2 nodes x 2 ranks)".
  const std::string& hierarchy() const { return hierarchy_->description(); }
  // The arena segments each compressed bucket's two-shot sees, in its element order (one entry per
  // bucket with a two-shot, in launch order): what a bucket dump records.
  std::vector<std::vector<Segment>> compressed_segments() const;

  // Per-rank state (error feedback, gammas) for checkpoints.
  std::vector<uint8_t> save_state() const;
  void load_state(const std::vector<uint8_t>& blob);

 private:
  struct Bucket : BucketPlan {
    std::unique_ptr<BucketReducer> two_shot;    // null when nothing is compressed
    std::vector<float> staging, plain_staging;  // host and staged paths
    BucketStats stats;
    int64_t result_nonfinite = 0;  // host and staged paths: NaN/Inf in this step's result
  };
  void enqueue_ready(int64_t offset);
  void worker();
  void run_bucket(size_t index);
  void run_host(Bucket& b);  // on the host arena (the caller's or the pinned mirror)

  Communicator& comm_;
  BucketConfig cfg_;
  BucketPath path_ = BucketPath::kHost;
  float* grads_;  // host arena: the caller's, or the staged path's pinned mirror; device: null
  struct DeviceBucketsDeleter {
    void operator()(DeviceBuckets* d) const;
  };
  std::unique_ptr<DeviceBuckets, DeviceBucketsDeleter> device_;  // staged and device paths
  std::unique_ptr<Hierarchy> hierarchy_;  // made before the buckets (collective)
  std::vector<Bucket> buckets_;           // in launch order (reverse layer order)
  uint32_t step_ = 0;
  size_t next_to_queue_ = 0;  // main thread: buckets queued so far this step

  std::mutex mu_;
  std::condition_variable cv_;
  size_t queued_ = 0, done_ = 0, next_ = 0;  // guarded by mu_: queued, finished, taken
  bool stop_ = false, in_step_ = false, busy_ = false;
  std::exception_ptr error_;
  bool failed_ = false;  // main thread: finish() rethrew a communication error
  std::string failure_;  // its message
  std::thread thread_;
};

}  // namespace int4ddp::comm
