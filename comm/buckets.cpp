// Gradient buckets and the communication thread (see buckets.h).
#include "comm/buckets.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "comm/bytes.h"
#include "comm/device_buckets.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"
#include "kernels/quant/codec.h"

namespace int4ddp::comm {
namespace {
constexpr double kBytesPerMiB = 1048576.0;
}  // namespace

const char* bucket_path_name(BucketPath p) {
  switch (p) {
    case BucketPath::kHost:
      return "host";
    case BucketPath::kStaged:
      return "staged";
    case BucketPath::kDevice:
      return "device";
  }
  return "?";
}

std::vector<BucketPlan> plan_buckets(const BucketConfig& cfg, std::vector<Segment> tensors) {
  INT4DDP_CHECK(cfg.bucket_mb > 0, "comm.bucket_mb = ", cfg.bucket_mb, " must be positive");
  INT4DDP_CHECK(cfg.small_tensor_threshold >= 0, "comm.small_tensor_threshold must be >= 0");
  cfg.compress.validate();
  const bool fp32 = cfg.compress.bits == kFp32Bits;
  const double cap = cfg.bucket_mb * kBytesPerMiB / sizeof(float);
  INT4DDP_CHECK(fp32 || static_cast<double>(cfg.compress.block_size) <= cap,
                "comm.block_size = ", cfg.compress.block_size,
                " is larger than a bucket of comm.bucket_mb = ", cfg.bucket_mb, " MiB");
  std::sort(tensors.begin(), tensors.end(),
            [](const Segment& a, const Segment& b) { return a.offset > b.offset; });
  std::vector<BucketPlan> plan;
  BucketPlan cur;
  int64_t cur_elems = 0;
  auto flush = [&] {
    if (cur_elems == 0) return;
    plan.push_back(std::move(cur));
    cur = BucketPlan{};
    cur_elems = 0;
  };
  for (const Segment& s : tensors) {
    INT4DDP_CHECK(s.count >= 0 && s.offset >= 0, "bucket: bad tensor segment");
    if (s.count == 0) continue;
    if (cur_elems > 0 && static_cast<double>(cur_elems + s.count) > cap) flush();
    if (!fp32 && s.count >= cfg.small_tensor_threshold) {
      cur.compressed.push_back(s);
      cur.ncompressed += s.count;
    } else {
      cur.plain.push_back(s);
      cur.nplain += s.count;
    }
    if (cur_elems == 0) cur.end = s.offset + s.count;  // descending offsets: the first is the top
    cur.begin = s.offset;                              // and the last one added the lowest
    cur_elems += s.count;
  }
  flush();
  const auto by_offset = [](const Segment& a, const Segment& c) { return a.offset < c.offset; };
  for (BucketPlan& b : plan) {
    if (cfg.choose_bits && b.ncompressed > 0 && cfg.choose_bits(b.ncompressed) == kFp32Bits) {
      b.plain.insert(b.plain.end(), b.compressed.begin(), b.compressed.end());
      b.nplain += b.ncompressed;
      b.compressed.clear();
      b.ncompressed = 0;
    }
    std::sort(b.compressed.begin(), b.compressed.end(), by_offset);
    std::sort(b.plain.begin(), b.plain.end(), by_offset);
    // Staging holds the tensors in arena order; when they tile one arena range, the two-shot runs
    // in place there instead (no staging copies, same element order, same result).
    b.in_place = tiled_offset(b.compressed);
    b.plain_in_place = tiled_offset(b.plain);  // likewise the fp32 all-reduce
  }
  return plan;
}

namespace {
// 1 when the float with these bits is NaN or Inf (all exponent bits set), else 0: an integer test
// that vectorises (std::isfinite in a loop does not).
inline int64_t nonfinite_bit(uint32_t bits) { return (bits & 0x7f800000u) == 0x7f800000u; }
}  // namespace

int64_t divide_and_count_nonfinite(float* x, int64_t count, float n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float v = x[i] / n;
    x[i] = v;
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bad += nonfinite_bit(bits);
  }
  return bad;
}

int64_t count_nonfinite(const float* x, int64_t count) {
  int64_t bad = 0;
  quant::finite_absmax(x, count, &bad);  // the codec's vectorised scan counts them
  return bad;
}

int64_t tiled_offset(const std::vector<Segment>& segs) {
  if (segs.empty()) return -1;
  for (size_t i = 1; i < segs.size(); ++i)
    if (segs[i].offset != segs[i - 1].offset + segs[i - 1].count) return -1;
  return segs.front().offset;
}

void BucketEngine::DeviceBucketsDeleter::operator()(DeviceBuckets* d) const { delete d; }

BucketEngine::BucketEngine(Communicator& comm, const BucketConfig& cfg, GradArena grads,
                           std::vector<Segment> tensors)
    : comm_(comm), cfg_(cfg), grads_(grads.data) {
  if (grads.device) {
    path_ = comm_.device_buffers() ? BucketPath::kDevice : BucketPath::kStaged;
  } else {
    INT4DDP_CHECK(!comm_.device_buffers(), "gradient buckets: communicator '", comm_.backend(),
                  "' takes device buffers but the gradient arena is in host memory (use "
                  "train.device = cuda, or comm.backend = mpi)");
  }
  int64_t arena_size = 0;
  for (const Segment& s : tensors) arena_size = std::max(arena_size, s.offset + s.count);
  cfg_.compress.validate();
  hierarchy_ = std::make_unique<Hierarchy>(comm_, cfg.hierarchy);
  INT4DDP_CHECK(path_ != BucketPath::kDevice || !hierarchy_->active(),
                "comm.hierarchy: the node hierarchy needs host buffers; the ", comm_.backend(),
                " buckets run flat (set comm.hierarchy = flat or auto)");
  if (cfg_.make_chooser) cfg_.choose_bits = cfg_.make_chooser(*hierarchy_);
  // Under the hierarchy the chooser decides the cross level of each compressed bucket (below),
  // not whether the bucket is compressed.
  BucketConfig plan_cfg = cfg_;
  if (hierarchy_->active()) plan_cfg.choose_bits = nullptr;
  std::vector<BucketPlan> plan = plan_buckets(plan_cfg, std::move(tensors));
  if (path_ != BucketPath::kHost) {
    device_.reset(make_device_buckets(comm_, grads, arena_size, plan).release());
    if (path_ == BucketPath::kStaged) grads_ = device_->host_mirror();
  }
  uint32_t id = 0;
  for (BucketPlan& p : plan) {
    Bucket b;
    static_cast<BucketPlan&>(b) = std::move(p);
    if (b.ncompressed > 0) {
      if (path_ == BucketPath::kDevice) {
        b.two_shot = device_->make_reducer(cfg_.compress, b.ncompressed, id);
      } else {
        CompressConfig c = cfg_.compress;
        if (hierarchy_->active() && cfg_.choose_bits && c.bits != kFp32Bits)
          c.bits = cfg_.choose_bits(b.ncompressed);
        b.two_shot =
            std::make_unique<ReducerOf<BucketAllreduce>>(*hierarchy_, c, b.ncompressed, id);
        if (b.in_place < 0) b.staging.resize(static_cast<size_t>(b.ncompressed));
      }
    }
    if (path_ != BucketPath::kDevice && b.plain_in_place < 0)
      b.plain_staging.resize(static_cast<size_t>(b.nplain));
    buckets_.push_back(std::move(b));
    ++id;
  }
  thread_ = std::thread([this] { worker(); });
}

BucketEngine::~BucketEngine() {
  bool in_flight;
  {
    std::lock_guard<std::mutex> lk(mu_);
    in_flight = in_step_;
  }
  // A step abandoned mid-way (an error on this rank) leaves the other ranks inside a collective
  // that this rank will never join, and possibly our own thread too: take the whole job down
  // rather than hang. So does a failed all-reduce on the device: the communicator's stream may
  // hold collectives that never complete, and tearing it down would wait for them.
  if (comm_.size() > 1 && (in_flight || (failed_ && path_ == BucketPath::kDevice))) {
    if (in_flight)
      std::fprintf(stderr,
                   "int4ddp: rank %d: a gradient all-reduce was abandoned; aborting all ranks\n",
                   comm_.rank());
    else
      std::fprintf(stderr, "int4ddp: rank %d: error: %s; aborting all ranks\n", comm_.rank(),
                   failure_.c_str());
    std::fflush(stderr);
    abort_world(1);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int BucketEngine::num_compressed_buckets() const {
  int n = 0;
  for (const Bucket& b : buckets_) n += b.two_shot ? 1 : 0;
  return n;
}

std::vector<std::vector<Segment>> BucketEngine::compressed_segments() const {
  std::vector<std::vector<Segment>> out;
  for (const Bucket& b : buckets_)
    if (b.two_shot) out.push_back(b.compressed);
  return out;
}

void BucketEngine::begin_step(uint32_t step) {
  std::lock_guard<std::mutex> lk(mu_);
  INT4DDP_CHECK(!in_step_, "BucketEngine: begin_step() before finish() of the previous step");
  step_ = step;
  next_to_queue_ = 0;
  queued_ = done_ = next_ = 0;
  error_ = nullptr;
  in_step_ = true;
}

void BucketEngine::ready_from(int64_t offset) {
  if (cfg_.overlap) enqueue_ready(offset);
}

void BucketEngine::enqueue_ready(int64_t offset) {
  size_t n = next_to_queue_;
  while (n < buckets_.size() && buckets_[n].begin >= offset) ++n;
  if (n == next_to_queue_) return;
  if (device_)
    for (size_t i = next_to_queue_; i < n; ++i) device_->mark_ready(i);
  next_to_queue_ = n;
  {
    std::lock_guard<std::mutex> lk(mu_);
    queued_ = n;
  }
  cv_.notify_all();
}

StepCommStats BucketEngine::finish() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    INT4DDP_CHECK(in_step_, "BucketEngine: finish() without begin_step()");
  }
  const auto t0 = Clock::now();
  enqueue_ready(0);
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lk(mu_);
    // After an error the thread takes no more buckets: wait until it is idle, then rethrow.
    cv_.wait(lk, [&] { return done_ == buckets_.size() || (error_ && !busy_); });
    err = error_;
    in_step_ = false;
  }
  if (err) {
    failed_ = true;
    try {
      std::rethrow_exception(err);
    } catch (const std::exception& e) {
      failure_ = e.what();
    } catch (...) {
      failure_ = "unknown error";
    }
    std::rethrow_exception(err);
  }
  StepCommStats s;
  s.wait_seconds = seconds_since(t0);
  if (path_ != BucketPath::kDevice) s.result_nonfinite = 0;
  double fp32_ring = 0;
  const int n = comm_.size();
  for (const Bucket& b : buckets_) {
    s.compressed_elements += b.ncompressed;
    s.plain_elements += b.nplain;
    s.clipped += b.stats.clipped;
    s.quantized += b.stats.count;
    s.nonfinite += b.stats.nonfinite;
    if (path_ != BucketPath::kDevice) s.result_nonfinite += b.result_nonfinite;
    s.wire_bytes += b.stats.wire_bytes;
    s.quant_seconds += b.stats.quant_seconds;
    s.comm_seconds += b.stats.comm_seconds;
    if (b.two_shot) s.gammas.push_back(b.stats.gamma);
    fp32_ring += 2.0 * (n - 1) / n * 4.0 * static_cast<double>(b.ncompressed + b.nplain);
  }
  s.compression_ratio = s.wire_bytes > 0 ? fp32_ring / static_cast<double>(s.wire_bytes) : 1.0;
  return s;
}

void BucketEngine::commit(bool apply) {
  for (Bucket& b : buckets_)
    if (b.two_shot) b.two_shot->commit(apply);
}

void BucketEngine::worker() {
  std::exception_ptr bind_error;
  if (device_) {
    try {
      device_->bind_thread();
    } catch (...) {
      bind_error = std::current_exception();
    }
  }
  for (;;) {
    size_t idx;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || (in_step_ && !error_ && next_ < queued_); });
      if (stop_) return;
      idx = next_++;
      busy_ = true;
    }
    std::exception_ptr err = bind_error;
    try {
      if (!err) run_bucket(idx);
    } catch (...) {
      err = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (err) error_ = err;
      ++done_;
      busy_ = false;
    }
    cv_.notify_all();
  }
}

void BucketEngine::run_bucket(size_t index) {
  Bucket& b = buckets_[index];
  switch (path_) {
    case BucketPath::kHost:
      run_host(b);
      return;
    case BucketPath::kStaged: {
      auto t = Clock::now();
      device_->to_host(index);
      double copy_seconds = seconds_since(t);
      run_host(b);
      t = Clock::now();
      device_->to_device(index);
      copy_seconds += seconds_since(t);
      b.stats.quant_seconds += copy_seconds;
      return;
    }
    case BucketPath::kDevice:
      b.stats = device_->run(index, b.two_shot.get(), step_);
      return;
  }
}

namespace {

// Copies the segments of the arena into staging, one after another (to_staging), or back.
void copy_segments(float* arena, const std::vector<Segment>& segs, float* staging,
                   bool to_staging) {
  int64_t off = 0;
  for (const Segment& s : segs) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(s.count);
    if (to_staging)
      std::memcpy(staging + off, arena + s.offset, bytes);
    else
      std::memcpy(arena + s.offset, staging + off, bytes);
    off += s.count;
  }
}

}  // namespace

void BucketEngine::run_host(Bucket& b) {
  b.stats = BucketStats{};
  b.result_nonfinite = 0;
  const auto t0 = Clock::now();
  // Gather: the arena -> staging (the arena is written by backward elsewhere meanwhile), unless
  // the tensors tile one arena range, where the all-reduce runs in place (same elements in the same
  // order, so the same result).
  if (b.two_shot && b.in_place < 0) copy_segments(grads_, b.compressed, b.staging.data(), true);
  if (b.nplain > 0 && b.plain_in_place < 0)
    copy_segments(grads_, b.plain, b.plain_staging.data(), true);
  double copy_seconds = seconds_since(t0);
  if (b.two_shot) {
    float* x = b.in_place >= 0 ? grads_ + b.in_place : b.staging.data();
    b.stats = b.two_shot->run(x, step_);
    const auto t = Clock::now();
    b.result_nonfinite += count_nonfinite(x, b.ncompressed);
    copy_seconds += seconds_since(t);
  }
  if (b.nplain > 0) {
    float* plain = b.plain_in_place >= 0 ? grads_ + b.plain_in_place : b.plain_staging.data();
    const uint64_t bytes0 = comm_.bytes_sent();
    auto t = Clock::now();
    comm_.allreduce_sum(plain, b.nplain);
    b.stats.comm_seconds += seconds_since(t);
    b.stats.wire_bytes += comm_.bytes_sent() - bytes0;
    t = Clock::now();
    b.result_nonfinite +=
        divide_and_count_nonfinite(plain, b.nplain, static_cast<float>(comm_.size()));
    copy_seconds += seconds_since(t);
  }
  // Scatter the means back into the arena.
  const auto t1 = Clock::now();
  if (b.two_shot && b.in_place < 0) copy_segments(grads_, b.compressed, b.staging.data(), false);
  if (b.nplain > 0 && b.plain_in_place < 0)
    copy_segments(grads_, b.plain, b.plain_staging.data(), false);
  copy_seconds += seconds_since(t1);
  b.stats.quant_seconds += copy_seconds;
}

std::vector<uint8_t> BucketEngine::save_state() const {
  std::vector<uint8_t> out;
  const uint64_t nb = buckets_.size();
  append_bytes(out, &nb, sizeof(nb));
  for (const Bucket& b : buckets_) {
    const std::vector<uint8_t> s = b.two_shot ? b.two_shot->save_state() : std::vector<uint8_t>{};
    const uint64_t len = s.size();
    append_bytes(out, &len, sizeof(len));
    append_bytes(out, s.data(), s.size());
  }
  return out;
}

void BucketEngine::load_state(const std::vector<uint8_t>& blob) {
  size_t off = 0;
  auto read_u64 = [&](const char* what) {
    INT4DDP_CHECK(off + 8 <= blob.size(), "bucket state: truncated at ", what);
    uint64_t v;
    std::memcpy(&v, blob.data() + off, 8);
    off += 8;
    return v;
  };
  const uint64_t nb = read_u64("bucket count");
  INT4DDP_CHECK(nb == buckets_.size(), "bucket state: saved with ", nb, " buckets, this run has ",
                buckets_.size(),
                " (comm.bucket_mb, comm.small_tensor_threshold or the model differ)");
  for (Bucket& b : buckets_) {
    const uint64_t len = read_u64("bucket length");
    INT4DDP_CHECK(off + len <= blob.size(), "bucket state: truncated");
    if (b.two_shot) {
      b.two_shot->load_state(
          std::vector<uint8_t>(blob.begin() + static_cast<std::ptrdiff_t>(off),
                               blob.begin() + static_cast<std::ptrdiff_t>(off + len)));
    } else {
      INT4DDP_CHECK(len == 0, "bucket state: a compressed bucket where this run has none");
    }
    off += len;
  }
  INT4DDP_CHECK(off == blob.size(), "bucket state: trailing bytes");
}

#ifndef INT4DDP_HAVE_CUDA
std::unique_ptr<DeviceBuckets> make_device_buckets(Communicator&, const GradArena&, int64_t,
                                                   const std::vector<BucketPlan>&) {
  INT4DDP_FAIL(
      "gradient buckets in device memory: this int4ddp was built without CUDA (cmake "
      "-DINT4DDP_CUDA=ON)");
}
#endif

}  // namespace int4ddp::comm
