// The device two-shot all-reduce (see two_shot_cuda.h). Step for step the host TwoShotAllreduce
// of two_shot.cpp, with each host loop replaced by the CUDA kernel that computes the same floats:
//   v = x + e_w                          add_async
//   quantize chunk j into its message    quantize_async (scales via an aligned scratch, the
//                                        message being an unaligned byte stream), trailer = the
//                                        device stats copied as they are (same 32-byte layout)
//   e_w' = v - dequantize(message)       dequantize_async, sub_async
//   owner: sum, /N, +e_s, requantize,    owner_step_async (one fused pass), sum_trailers_async
//          e_s' = m - Q(m)
//   all-gather, dequantize the others    dequantize_async; the own chunk is the owner step's
//                                        dequantized copy (the same q * d the host computes
//                                        from the gathered bytes)
#include "comm/two_shot_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>

#include "kernels/common/error.h"
#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::comm {
namespace {

using Clock = std::chrono::steady_clock;
namespace qc = quant::cuda;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

constexpr int kFp32Bits = 32;
constexpr uint32_t kStreamsPerRank = 65536;  // stream = 65536 rank + chunk, as two_shot.cpp

// The device stats are the wire trailer: same fields at the same offsets.
static_assert(sizeof(qc::DeviceQuantStats) == sizeof(StatsTrailer), "trailer size");
static_assert(offsetof(qc::DeviceQuantStats, clipped) == offsetof(StatsTrailer, clipped) &&
                  offsetof(qc::DeviceQuantStats, count) == offsetof(StatsTrailer, count) &&
                  offsetof(qc::DeviceQuantStats, nonfinite) == offsetof(StatsTrailer, nonfinite) &&
                  offsetof(qc::DeviceQuantStats, absmax) == offsetof(StatsTrailer, absmax) &&
                  offsetof(qc::DeviceQuantStats, reserved) == offsetof(StatsTrailer, reserved),
              "DeviceQuantStats must have the StatsTrailer layout");

int64_t chunk_scales(int64_t count, int64_t block_size) {
  return count > 0 ? (count + block_size - 1) / block_size : 0;
}

}  // namespace

template <typename T>
T* TwoShotAllreduceCuda::device_alloc(size_t count) {
  void* p = nullptr;
  INT4DDP_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  allocations_.push_back(p);
  return static_cast<T*>(p);
}

TwoShotAllreduceCuda::TwoShotAllreduceCuda(Communicator& comm, const CompressConfig& cfg,
                                           int64_t count, uint32_t bucket_id, cudaStream_t stream)
    : comm_(comm), cfg_(cfg), count_(count), bucket_id_(bucket_id), stream_(stream) {
  cfg_.validate();
  INT4DDP_CHECK(count >= 0, "two-shot (cuda): negative count");
  INT4DDP_CHECK(comm.device_buffers(), "two-shot (cuda): communicator '", comm.backend(),
                "' takes host buffers; use NCCL or wrap it in a StagedCommunicator");
  INT4DDP_CHECK(comm.size() <= static_cast<int>(kStreamsPerRank), "two-shot: at most ",
                kStreamsPerRank, " ranks");
  if (cfg_.bits == kFp32Bits) return;
  quant::PolicyConfig pc = cfg_.policy;
  pc.bits = cfg_.bits;
  pc.lbt_calibrate = false;  // as the host version: gamma starts at 1 and follows the sign rule
  policy_ = quant::make_policy(pc);

  const int n = comm.size(), r = comm.rank();
  const int64_t G = cfg_.block_size;
  own_ = chunk_range(count, G, n, r);
  std::vector<size_t> send_counts, recv_counts;
  int64_t scales_total = 0;
  for (int j = 0; j < n; ++j) {
    const ChunkRange c = chunk_range(count, G, n, j);
    send_counts.push_back(chunk_message_bytes(cfg_.bits, c.count(), G));
    recv_counts.push_back(chunk_message_bytes(cfg_.bits, own_.count(), G));
    scale_offsets_.push_back(scales_total);
    scales_total += chunk_scales(c.count(), G);
  }
  send_layout_ = ByteLayout::packed(send_counts);
  recv_layout_ = ByteLayout::packed(recv_counts);
  gather_layout_ = ByteLayout::packed(send_counts);
  try {
    const size_t nc = static_cast<size_t>(count);
    v_ = device_alloc<float>(nc);
    tmp_ = device_alloc<float>(nc);
    scales_ = device_alloc<float>(static_cast<size_t>(scales_total));
    send_ = device_alloc<uint8_t>(send_layout_.total());
    recv_ = device_alloc<uint8_t>(recv_layout_.total());
    gathered_ = device_alloc<uint8_t>(gather_layout_.total());
    own_copy_ = device_alloc<uint8_t>(send_counts[static_cast<size_t>(r)]);
    stats_ = device_alloc<qc::DeviceQuantStats>(static_cast<size_t>(n) + 1);
    if (cfg_.worker_error_feedback) {
      ew_ = device_alloc<float>(nc);
      ew_next_ = device_alloc<float>(nc);
      INT4DDP_CUDA_CHECK(cudaMemset(ew_, 0, nc * sizeof(float)));
      INT4DDP_CUDA_CHECK(cudaMemset(ew_next_, 0, nc * sizeof(float)));
    }
    if (cfg_.server_error_feedback) {
      const size_t no = static_cast<size_t>(own_.count());
      es_ = device_alloc<float>(no);
      es_next_ = device_alloc<float>(no);
      INT4DDP_CUDA_CHECK(cudaMemset(es_, 0, std::max<size_t>(no, 1) * sizeof(float)));
      INT4DDP_CUDA_CHECK(cudaMemset(es_next_, 0, std::max<size_t>(no, 1) * sizeof(float)));
    }
    INT4DDP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&trailers_h_),
                                     static_cast<size_t>(n) * sizeof(StatsTrailer),
                                     cudaHostAllocDefault));
  } catch (...) {
    for (void* p : allocations_) cudaFree(p);
    throw;
  }
}

TwoShotAllreduceCuda::~TwoShotAllreduceCuda() {
  cudaStreamSynchronize(stream_);  // no throwing from a destructor
  for (void* p : allocations_) cudaFree(p);
  if (trailers_h_) cudaFreeHost(trailers_h_);
}

float TwoShotAllreduceCuda::gamma() const { return policy_ ? policy_->gamma() : 1.0f; }

void TwoShotAllreduceCuda::sync() { INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

BucketStats TwoShotAllreduceCuda::run(float* x, uint32_t step) {
  BucketStats st;
  const int n = comm_.size(), r = comm_.rank();
  INT4DDP_CHECK(count_ == 0 || x != nullptr, "two-shot (cuda): null buffer");
  const uint64_t bytes0 = comm_.bytes_sent();
  auto t = Clock::now();
  if (cfg_.bits == kFp32Bits) {
    sync();
    comm_.allreduce_sum(x, count_);
    st.comm_seconds = seconds_since(t);
    t = Clock::now();
    qc::div_async(x, count_, static_cast<float>(n), stream_);
    sync();
    st.quant_seconds = seconds_since(t);
    st.count = count_;
    st.wire_bytes = comm_.bytes_sent() - bytes0;
    pending_ = true;
    return st;
  }

  const int bits = cfg_.bits;
  const int64_t G = cfg_.block_size;
  const float gamma = policy_->gamma_for(nullptr, 0);
  st.gamma = gamma;

  // 1. v = g + e_w (no add without worker feedback: x + 0 would turn -0 into +0)
  const float* v = x;
  if (cfg_.worker_error_feedback) {
    qc::add_async(x, ew_, v_, count_, stream_);
    v = v_;
  }
  // 2-3. quantize every chunk into its message; e_w' = v - Q(v)
  quant::QuantParams p;
  p.bits = bits;
  p.rounding = cfg_.rounding;
  p.gamma = gamma;
  p.block_size = G;
  p.key.seed = cfg_.seed;
  p.key.step = step;
  p.key.tensor_id = 2 * bucket_id_;
  for (int j = 0; j < n; ++j) {
    const size_t jj = static_cast<size_t>(j);
    const ChunkRange c = chunk_range(count_, G, n, j);
    uint8_t* msg = send_ + send_layout_.displs[jj];
    const size_t code_bytes = static_cast<size_t>(quant::packed_bytes(bits, c.count()));
    const int64_t nsc = chunk_scales(c.count(), G);
    float* sc = scales_ + scale_offsets_[jj];
    p.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(j);
    qc::quantize_async(c.count() > 0 ? v + c.begin : nullptr, c.count(), p, msg, sc, &stats_[j],
                       stream_);
    if (nsc > 0)
      INT4DDP_CUDA_CHECK(cudaMemcpyAsync(msg + code_bytes, sc, static_cast<size_t>(nsc) * 4,
                                         cudaMemcpyDeviceToDevice, stream_));
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(msg + code_bytes + static_cast<size_t>(nsc) * 4, &stats_[j],
                                       sizeof(StatsTrailer), cudaMemcpyDeviceToDevice, stream_));
    if (cfg_.worker_error_feedback && c.count() > 0) {
      qc::dequantize_async(msg, sc, c.count(), bits, G, tmp_ + c.begin, stream_);
      qc::sub_async(v + c.begin, tmp_ + c.begin, ew_next_ + c.begin, c.count(), stream_);
    }
  }
  sync();
  st.quant_seconds += seconds_since(t);

  // 4. all-to-all
  t = Clock::now();
  comm_.alltoallv(send_, send_layout_, recv_, recv_layout_);
  st.comm_seconds += seconds_since(t);

  // 5. owner: one fused pass over the N messages of the own chunk
  t = Clock::now();
  const int64_t m = own_.count();
  const size_t own_code_bytes = static_cast<size_t>(quant::packed_bytes(bits, m));
  const int64_t own_nsc = chunk_scales(m, G);
  std::vector<const uint8_t*> codes(static_cast<size_t>(n)), scales(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    codes[static_cast<size_t>(i)] = recv_ + recv_layout_.displs[static_cast<size_t>(i)];
    scales[static_cast<size_t>(i)] = codes[static_cast<size_t>(i)] + own_code_bytes;
  }
  uint8_t* own_msg = gathered_ + gather_layout_.displs[static_cast<size_t>(r)];
  quant::QuantParams po = p;
  po.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(r);
  po.key.tensor_id = 2 * bucket_id_ + 1;
  qc::OwnerStepArgs a;
  a.ranks = n;
  a.codes = codes.data();
  a.scales = scales.data();
  a.count = m;
  a.params = po;
  a.es = cfg_.server_error_feedback && m > 0 ? es_ : nullptr;
  a.es_next = cfg_.server_error_feedback && m > 0 ? es_next_ : nullptr;
  a.codes_out = own_msg;
  a.scales_out = scales_;
  a.out = m > 0 ? x + own_.begin : nullptr;
  a.stats = &stats_[n];
  qc::owner_step_async(a, stream_);
  if (own_nsc > 0)
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(own_msg + own_code_bytes, scales_,
                                       static_cast<size_t>(own_nsc) * 4, cudaMemcpyDeviceToDevice,
                                       stream_));
  const size_t trailer_at = own_code_bytes + static_cast<size_t>(own_nsc) * 4;
  qc::sum_trailers_async(recv_ + trailer_at, recv_layout_.counts[0], n, &stats_[n],
                         own_msg + trailer_at, stream_);
  const size_t own_bytes = gather_layout_.counts[static_cast<size_t>(r)];
  INT4DDP_CUDA_CHECK(
      cudaMemcpyAsync(own_copy_, own_msg, own_bytes, cudaMemcpyDeviceToDevice, stream_));
  sync();
  st.quant_seconds += seconds_since(t);

  // 6. all-gather the requantized chunks; dequantize the other ranks' chunks
  t = Clock::now();
  comm_.allgatherv(own_copy_, own_bytes, gathered_, gather_layout_);
  st.comm_seconds += seconds_since(t);

  t = Clock::now();
  for (int j = 0; j < n; ++j) {
    const size_t jj = static_cast<size_t>(j);
    const ChunkRange c = chunk_range(count_, G, n, j);
    const uint8_t* msg = gathered_ + gather_layout_.displs[jj];
    const size_t code_bytes = static_cast<size_t>(quant::packed_bytes(bits, c.count()));
    const int64_t nsc = chunk_scales(c.count(), G);
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(&trailers_h_[j],
                                       msg + code_bytes + static_cast<size_t>(nsc) * 4,
                                       sizeof(StatsTrailer), cudaMemcpyDeviceToHost, stream_));
    if (j == r || c.count() == 0) continue;
    float* sc = scales_ + scale_offsets_[jj];
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(sc, msg + code_bytes, static_cast<size_t>(nsc) * 4,
                                       cudaMemcpyDeviceToDevice, stream_));
    qc::dequantize_async(msg, sc, c.count(), bits, G, x + c.begin, stream_);
  }
  sync();
  StatsTrailer global;
  for (int j = 0; j < n; ++j) {
    add_trailer(global, trailers_h_[j]);
  }
  st.quant_seconds += seconds_since(t);

  set_global_stats(global, st);
  st.wire_bytes = comm_.bytes_sent() - bytes0;
  pending_stats_ = to_quant_stats(global);
  pending_ = true;
  return st;
}

void TwoShotAllreduceCuda::commit(bool apply) {
  if (!pending_) return;
  pending_ = false;
  if (!apply || cfg_.bits == kFp32Bits) return;
  if (cfg_.worker_error_feedback) std::swap(ew_, ew_next_);
  if (cfg_.server_error_feedback) std::swap(es_, es_next_);
  policy_->observe(pending_stats_);
}

std::vector<uint8_t> TwoShotAllreduceCuda::save_state() const {
  const size_t ew_n = ew_ ? static_cast<size_t>(count_) : 0;
  const size_t es_n = es_ ? static_cast<size_t>(own_.count()) : 0;
  std::vector<float> ew(ew_n), es(es_n);
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (ew_n)
    INT4DDP_CUDA_CHECK(cudaMemcpy(ew.data(), ew_, ew_n * sizeof(float), cudaMemcpyDeviceToHost));
  if (es_n)
    INT4DDP_CUDA_CHECK(cudaMemcpy(es.data(), es_, es_n * sizeof(float), cudaMemcpyDeviceToHost));
  return pack_two_shot_state(count_, ew.data(), ew_n, es.data(), es_n, policy_.get());
}

void TwoShotAllreduceCuda::load_state(const std::vector<uint8_t>& blob) {
  const size_t ew_n = ew_ ? static_cast<size_t>(count_) : 0;
  const size_t es_n = es_ ? static_cast<size_t>(own_.count()) : 0;
  const TwoShotStateView v = parse_two_shot_state(blob, count_, ew_n, es_n, policy_.get());
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (ew_n) INT4DDP_CUDA_CHECK(cudaMemcpy(ew_, v.ew, ew_n * sizeof(float), cudaMemcpyHostToDevice));
  if (es_n) INT4DDP_CUDA_CHECK(cudaMemcpy(es_, v.es, es_n * sizeof(float), cudaMemcpyHostToDevice));
  pending_ = false;
}

}  // namespace int4ddp::comm
