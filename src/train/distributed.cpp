// Data-parallel plumbing (see distributed.h).
#include "src/train/distributed.h"

#include <cstring>
#include <ostream>
#include <sstream>

#include "comm/auto_mode.h"
#include "comm/bytes.h"
#include "kernels/common/error.h"
#ifdef INT4DDP_HAVE_CUDA
#include "kernels/quant/cuda/cuda_check.h"
#include "src/core/device.h"
#include "src/core/device_cuda.h"
#endif

namespace int4ddp::train {
namespace {

int comm_bits(CommMode mode) {
  switch (mode) {
    case CommMode::kFp32:
      return kFp32Bits;
    case CommMode::kInt4:
      return 4;
    case CommMode::kInt8:
      return 8;
    case CommMode::kAuto:  // per bucket: this or fp32 (DataParallel::attach)
      return 4;
  }
  INT4DDP_FAIL("comm.mode = ", static_cast<int>(mode), " is not a mode");
}

// Length-prefixed pieces of a local-state blob.
void put_piece(std::vector<uint8_t>& out, const void* p, size_t n) {
  const uint64_t len = n;
  comm::append_bytes(out, &len, sizeof(len));
  comm::append_bytes(out, p, n);
}

class PieceReader {
 public:
  explicit PieceReader(const std::vector<uint8_t>& b) : b_(b) {}
  std::vector<uint8_t> next(const char* what) {
    uint64_t len = 0;
    INT4DDP_CHECK(off_ + sizeof(len) <= b_.size(), "checkpoint rank state: truncated at ", what);
    std::memcpy(&len, b_.data() + off_, sizeof(len));
    off_ += sizeof(len);
    INT4DDP_CHECK(len <= b_.size() - off_, "checkpoint rank state: truncated in ", what);
    std::vector<uint8_t> v(b_.begin() + static_cast<std::ptrdiff_t>(off_),
                           b_.begin() + static_cast<std::ptrdiff_t>(off_ + len));
    off_ += len;
    return v;
  }
  bool done() const { return off_ == b_.size(); }

 private:
  const std::vector<uint8_t>& b_;
  size_t off_ = 0;
};

}  // namespace

DataParallel::DataParallel(const Config& cfg) {
  const bool nccl = cfg.comm.backend == CommBackend::kNccl;
#ifndef INT4DDP_HAVE_NCCL
  // Fails with the factory's message (this build has no NCCL).
  if (nccl) comm::make_communicator("nccl");
#endif
  comm_ = comm::make_communicator(nccl ? std::string("mpi") : spelling(cfg.comm.backend));
  // One rank has nothing to all-reduce (and compressing its gradients would only add error).
  enabled_ = comm_->size() > 1;
  if (comm_->size() == 1) return;
  if (nccl) {
    device_comm_ = comm::make_communicator("nccl");
#ifdef INT4DDP_HAVE_CUDA
    // The NCCL communicator chose its GPU from its MPI node rank and left it current; the model
    // takes select_gpu()'s (the launcher's local rank). They must be one GPU, or the buckets
    // would hand NCCL another device's memory.
    int nccl_device = -1;
    INT4DDP_CUDA_CHECK(cudaGetDevice(&nccl_device));
    const int model_device = select_gpu();
    INT4DDP_CHECK(nccl_device == model_device, "comm.backend = nccl: rank ", comm_->rank(),
                  " runs NCCL on GPU ", nccl_device, " (its MPI node rank) but the model on GPU ",
                  model_device,
                  " (the launcher's local rank); start the ranks with a launcher "
                  "that sets OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID or SLURM_LOCALID in "
                  "node-rank order, or use comm.backend = mpi");
#endif
  }
  // Every rank must train the same thing: compare config hashes.
  const uint64_t mine = config_hash(cfg);
  const int n = comm_->size();
  std::vector<uint64_t> all(static_cast<size_t>(n));
  comm::ByteLayout layout =
      comm::ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(n), 8));
  comm_->allgatherv(&mine, sizeof(mine), all.data(), layout);
  std::ostringstream bad;
  for (int r = 1; r < n; ++r)
    if (all[static_cast<size_t>(r)] != all[0]) bad << " " << r;
  INT4DDP_CHECK(
      bad.str().empty(), "the resolved config differs between ranks: rank(s)", bad.str(),
      " differ from rank 0 (same file, same --set overrides and same build on every rank?)");
}

void DataParallel::broadcast_model(nn::Model& model) {
  if (comm_->size() == 1) return;
  comm_->broadcast(model.values(), sizeof(float) * static_cast<size_t>(model.num_params()), 0);
  for (std::vector<float>* b : model.buffers())
    comm_->broadcast(b->data(), sizeof(float) * b->size(), 0);
}

void DataParallel::average_buffers(nn::Model& model) {
  if (comm_->size() == 1) return;
  const float n = static_cast<float>(comm_->size());
  for (std::vector<float>* b : model.buffers()) {
    comm_->allreduce_sum(b->data(), static_cast<int64_t>(b->size()));
    for (float& v : *b) v /= n;
  }
}

void DataParallel::attach(nn::Model& model, const Config& cfg, std::ostream& log) {
  if (!enabled_) return;
  comm::BucketConfig bc;
  bc.bucket_mb = cfg.comm.bucket_mb;
  bc.small_tensor_threshold = cfg.comm.small_tensor_threshold;
  bc.overlap = cfg.comm.overlap;
  bc.hierarchy = cfg.comm.hierarchy;
  bc.compress.bits = comm_bits(cfg.comm.mode);
  bc.compress.block_size = cfg.comm.block_size;
  bc.compress.rounding = cfg.comm.rounding;
  bc.compress.worker_error_feedback = cfg.comm.worker_error_feedback;
  bc.compress.server_error_feedback = cfg.comm.server_error_feedback;
  bc.compress.policy.kind = cfg.comm.grad_policy;
  bc.compress.policy.fixed_gamma = static_cast<float>(cfg.comm.fixed_gamma);
  bc.compress.policy.alpha = cfg.comm.alpha;
  bc.compress.policy.eta = static_cast<float>(cfg.comm.eta);
  bc.compress.policy.topk = cfg.comm.topk;
  bc.compress.seed = static_cast<uint32_t>(cfg.train.seed);
  bc.compress.pipeline_chunks = cfg.comm.pipeline_chunks;
  if (cfg.comm.mode == CommMode::kAuto) {
    // A 4 MiB ring exchange and encode: tens of milliseconds on a 1 Gbit/s link.
    constexpr int64_t kProbeFloats = int64_t{1} << 20;
    // Per level of the hierarchy when it is active; flat over the host communicator otherwise
    // (the probe needs host buffers, also when the buckets go over NCCL).
    bc.make_chooser = [this, &log, G = cfg.comm.block_size,
                       bits = bc.compress.bits](comm::Hierarchy& h) -> std::function<int(int64_t)> {
      comm::LevelBandwidth m;
      if (h.active()) {
        m = comm::measure_levels(h, kProbeFloats, bits, G);
      } else {
        m.flat = comm::measure_bandwidth(*comm_, kProbeFloats, bits, G);
        m.world_ranks = comm_->size();
      }
      return [m, &log, G, bits, bucket = 0](int64_t count) mutable {
        const comm::ModeChoice c = comm::choose_level_mode(m, count, G, bits);
        log << "comm.mode auto: bucket " << bucket++ << ": " << c.reason << "\n";
        return c.bits;
      };
    };
  }
  std::vector<comm::Segment> segs;
  for (const auto& [off, count] : model.param_segments()) segs.push_back({off, count});
  comm::GradArena arena{model.grads(), false, nullptr};
  if (model.device() == Device::kCuda) {
#ifdef INT4DDP_HAVE_CUDA
    arena = comm::GradArena{model.device_grads(), true, compute_stream()};
#endif
  }
  engine_ = std::make_unique<comm::BucketEngine>(device_comm_ ? *device_comm_ : *comm_, bc, arena,
                                                 std::move(segs));
  if (arena.device)
    log << "gradient buckets: " << engine_->num_buckets() << " in device memory, all-reduced over "
        << bucket_backend() << " ("
        << (engine_->path() == comm::BucketPath::kDevice ? "device two-shot"
                                                         : "staged through pinned host memory")
        << ")\n";
}

std::vector<uint8_t> DataParallel::save_local_state(nn::Model& model) const {
  std::vector<uint8_t> out;
  for (std::vector<float>* b : model.buffers())
    put_piece(out, b->data(), sizeof(float) * b->size());
  for (nn::QuantizedOp* q : model.quantized_ops()) {
    const auto pol = q->grad_state().policy->save_state();
    const auto tr = q->grad_state().tracker.save_state();
    const uint8_t init = q->initialized() ? 1 : 0;
    put_piece(out, pol.data(), pol.size());
    put_piece(out, tr.data(), tr.size());
    put_piece(out, &init, 1);
  }
  const std::vector<uint8_t> eng = engine_ ? engine_->save_state() : std::vector<uint8_t>{};
  put_piece(out, eng.data(), eng.size());
  return out;
}

void DataParallel::load_local_state(nn::Model& model, const std::vector<uint8_t>& blob) {
  PieceReader rd(blob);
  for (std::vector<float>* b : model.buffers()) {
    const auto v = rd.next("batch-norm statistics");
    INT4DDP_CHECK(v.size() == sizeof(float) * b->size(),
                  "checkpoint rank state: batch-norm statistics have the wrong size");
    std::memcpy(b->data(), v.data(), v.size());
  }
  for (nn::QuantizedOp* q : model.quantized_ops()) {
    const auto pol = rd.next("policy");
    q->grad_state_mut().policy->load_state(pol.data(), pol.size());
    const auto tr = rd.next("tracker");
    q->grad_state_mut().tracker.load_state(tr.data(), tr.size());
    const auto init = rd.next("initialized");
    INT4DDP_CHECK(init.size() == 1, "checkpoint rank state: bad initialized flag");
    q->set_initialized(init[0] != 0);
  }
  const auto eng = rd.next("buckets");
  if (engine_) {
    engine_->load_state(eng);
  } else {
    INT4DDP_CHECK(eng.empty(), "checkpoint rank state: bucket state but no data parallelism");
  }
  INT4DDP_CHECK(rd.done(), "checkpoint rank state: trailing bytes");
}

std::vector<std::vector<uint8_t>> DataParallel::gather_local_states(nn::Model& model) {
  const std::vector<uint8_t> mine = save_local_state(model);
  const int n = comm_->size();
  std::vector<int64_t> sizes(static_cast<size_t>(n), 0);
  sizes[static_cast<size_t>(comm_->rank())] = static_cast<int64_t>(mine.size());
  comm_->allreduce_sum_i64(sizes.data(), n);
  std::vector<size_t> counts(sizes.begin(), sizes.end());
  const comm::ByteLayout layout = comm::ByteLayout::packed(counts);
  std::vector<uint8_t> all(comm_->rank() == 0 ? layout.total() : 0);
  comm_->gatherv(mine.data(), mine.size(), all.data(), layout, 0);
  std::vector<std::vector<uint8_t>> out;
  if (comm_->rank() != 0) return out;
  for (int r = 0; r < n; ++r) {
    const auto* p = all.data() + layout.displs[static_cast<size_t>(r)];
    out.emplace_back(p, p + layout.counts[static_cast<size_t>(r)]);
  }
  return out;
}

void DataParallel::sum(int64_t* v, int64_t n) {
  if (comm_->size() > 1) comm_->allreduce_sum_i64(v, n);
}

void DataParallel::sum(float* v, int64_t n) {
  if (comm_->size() > 1) comm_->allreduce_sum(v, n);
}

}  // namespace int4ddp::train
