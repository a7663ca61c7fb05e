// The device two-shot all-reduce (see two_shot_cuda.h). Step for step the host TwoShotAllreduce
// of two_shot.cpp, with each host loop replaced by the CUDA kernel that computes the same floats:
//   v = x + e_w                          add_async
//   per-block clips of v, of m           block_clips_async (comm.grad_policy topk, mse)
//   quantize chunk j into its message    quantize_async (scales via an aligned scratch, the
//                                        message being an unaligned byte stream), trailer = the
//                                        device QuantStats record copied as it is
//   e_w' = v - dequantize(message)       dequantize_async, sub_async
//   owner: sum, /N, +e_s, requantize,    owner_step_async (one fused pass), sum_trailers_async
//          e_s' = m - Q(m)
//   all-gather, dequantize the others    dequantize_async; the own chunk is the owner step's
//                                        dequantized copy (the same q * d the host computes
//                                        from the gathered bytes)
#include "comm/two_shot_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "kernels/common/clock.h"
#include "kernels/common/error.h"
#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::comm {

namespace qc = quant::cuda;

template <typename T>
T* TwoShotAllreduceCuda::device_alloc(size_t count) {
  void* p = nullptr;
  INT4DDP_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  allocations_.push_back(p);
  return static_cast<T*>(p);
}

TwoShotAllreduceCuda::TwoShotAllreduceCuda(Communicator& comm, const CompressConfig& cfg,
                                           int64_t count, uint32_t bucket_id, cudaStream_t stream)
    : TwoShotBase(comm, cfg, count, bucket_id), stream_(stream) {
  INT4DDP_CHECK(comm.device_buffers(), "two-shot (cuda): communicator '", comm.backend(),
                "' takes host buffers; use NCCL or wrap it in a StagedCommunicator");
  if (plan_.fp32()) return;
  const int n = plan_.ranks();
  try {
    const size_t nc = static_cast<size_t>(count);
    v_ = device_alloc<float>(nc);
    tmp_ = device_alloc<float>(nc);
    scales_ = device_alloc<float>(static_cast<size_t>(plan_.total_scales()));
    send_ = device_alloc<uint8_t>(plan_.send_layout().total());
    recv_ = device_alloc<uint8_t>(plan_.recv_layout().total());
    gathered_ = device_alloc<uint8_t>(plan_.gather_layout().total());
    own_copy_ = device_alloc<uint8_t>(plan_.own_message().bytes);
    stats_ = device_alloc<quant::QuantStats>(static_cast<size_t>(n) + 1);
    if (plan_.block_clips())
      clips_ = device_alloc<float>(static_cast<size_t>(plan_.total_scales()));
    if (plan_.config().worker_error_feedback) {
      ew_ = device_alloc<float>(nc);
      ew_next_ = device_alloc<float>(nc);
      INT4DDP_CUDA_CHECK(cudaMemsetAsync(ew_, 0, nc * sizeof(float), stream_));
      INT4DDP_CUDA_CHECK(cudaMemsetAsync(ew_next_, 0, nc * sizeof(float), stream_));
    }
    if (plan_.config().server_error_feedback) {
      const size_t no = static_cast<size_t>(plan_.own().count());
      es_ = device_alloc<float>(no);
      es_next_ = device_alloc<float>(no);
      INT4DDP_CUDA_CHECK(cudaMemsetAsync(es_, 0, std::max<size_t>(no, 1) * sizeof(float), stream_));
      INT4DDP_CUDA_CHECK(
          cudaMemsetAsync(es_next_, 0, std::max<size_t>(no, 1) * sizeof(float), stream_));
    }
    // The zeroed residuals are read on stream_ (non-blocking: it does not wait for the legacy
    // stream), so they are zeroed there and finished before the first run.
    INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    INT4DDP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&gathered_h_),
                                     static_cast<size_t>(n) * sizeof(quant::QuantStats),
                                     cudaHostAllocDefault));
  } catch (...) {
    for (void* p : allocations_) cudaFree(p);
    throw;
  }
}

TwoShotAllreduceCuda::~TwoShotAllreduceCuda() {
  cudaStreamSynchronize(stream_);  // no throwing from a destructor
  for (void* p : allocations_) cudaFree(p);
  if (gathered_h_) cudaFreeHost(gathered_h_);
}

void TwoShotAllreduceCuda::sync() { INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

BucketStats TwoShotAllreduceCuda::run(float* x, uint32_t step) {
  BucketStats st;
  const int n = plan_.ranks(), r = plan_.rank();
  const int64_t count = plan_.count();
  INT4DDP_CHECK(count == 0 || x != nullptr, "two-shot (cuda): null buffer");
  const uint64_t bytes0 = comm_.bytes_sent();
  auto t = Clock::now();
  if (plan_.fp32()) {
    sync();
    comm_.allreduce_sum(x, count);
    st.comm_seconds = seconds_since(t);
    t = Clock::now();
    qc::div_async(x, count, static_cast<float>(n), stream_);
    sync();
    st.quant_seconds = seconds_since(t);
    plan_.finish_run({}, comm_.bytes_sent() - bytes0, st);
    return st;
  }

  const int bits = plan_.config().bits;
  const int64_t G = plan_.config().block_size;
  const quant::QuantParams step_p = plan_.step_params(step);
  const bool block_clips = clips_ != nullptr;  // topk, mse: the policy's per-block clips
  st.gamma = step_p.gamma;

  // 1. v = g + e_w (no add without worker feedback: x + 0 would turn -0 into +0)
  const float* v = x;
  if (ew_) {
    qc::add_async(x, ew_, v_, count, stream_);
    v = v_;
  }
  // 2-3. quantize every chunk into its message; e_w' = v - Q(v)
  for (int j = 0; j < n; ++j) {
    const ChunkRange& c = plan_.chunk(j);
    const MessageLayout& m = plan_.message(j);
    uint8_t* msg = send_ + plan_.send_layout().displs[static_cast<size_t>(j)];
    float* sc = scales_ + plan_.scale_offset(j);
    quant::QuantParams p = plan_.worker_params(step_p, j);
    if (block_clips) {
      p.clips = clips_ + plan_.scale_offset(j);
      qc::block_clips_async(v + c.begin, c.count(), G, plan_.policy_config(),
                            clips_ + plan_.scale_offset(j), stream_);
    }
    qc::quantize_async(c.count() > 0 ? v + c.begin : nullptr, c.count(), p, msg, sc, &stats_[j],
                       stream_);
    if (m.num_scales > 0)
      INT4DDP_CUDA_CHECK(cudaMemcpyAsync(msg + m.scales_at, sc, m.scale_bytes(),
                                         cudaMemcpyDeviceToDevice, stream_));
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(msg + m.stats_at, &stats_[j], sizeof(quant::QuantStats),
                                       cudaMemcpyDeviceToDevice, stream_));
    if (ew_ && c.count() > 0) {
      qc::dequantize_async(msg, sc, c.count(), bits, G, tmp_ + c.begin, stream_);
      qc::sub_async(v + c.begin, tmp_ + c.begin, ew_next_ + c.begin, c.count(), stream_);
    }
  }
  sync();
  st.quant_seconds += seconds_since(t);

  // 4. all-to-all
  t = Clock::now();
  comm_.alltoallv(send_, plan_.send_layout(), recv_, plan_.recv_layout());
  st.comm_seconds += seconds_since(t);

  // 5. owner: one fused pass over the N messages of the own chunk
  t = Clock::now();
  const ChunkRange& own = plan_.own();
  const MessageLayout& om = plan_.own_message();
  std::vector<const uint8_t*> codes(static_cast<size_t>(n)), scales(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    codes[static_cast<size_t>(i)] = recv_ + plan_.recv_layout().displs[static_cast<size_t>(i)];
    scales[static_cast<size_t>(i)] = codes[static_cast<size_t>(i)] + om.scales_at;
  }
  uint8_t* own_msg = gathered_ + plan_.gather_layout().displs[static_cast<size_t>(r)];
  float* own_sc = scales_ + plan_.scale_offset(r);
  qc::OwnerStepArgs a;
  a.ranks = n;
  a.codes = codes.data();
  a.scales = scales.data();
  a.count = om.count;
  a.params = plan_.owner_params(step_p);
  a.es = es_ && om.count > 0 ? es_ : nullptr;
  a.es_next = es_ && om.count > 0 ? es_next_ : nullptr;
  a.codes_out = own_msg;
  a.scales_out = own_sc;
  a.out = om.count > 0 ? x + own.begin : nullptr;
  a.stats = &stats_[n];
  if (block_clips) {
    a.block_rule = plan_.policy_config();
    a.clips = clips_ + plan_.scale_offset(r);
  }
  qc::owner_step_async(a, stream_);
  if (om.num_scales > 0)
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(own_msg + om.scales_at, own_sc, om.scale_bytes(),
                                       cudaMemcpyDeviceToDevice, stream_));
  qc::sum_trailers_async(recv_ + om.stats_at, om.bytes, n, &stats_[n], own_msg + om.stats_at,
                         stream_);
  INT4DDP_CUDA_CHECK(
      cudaMemcpyAsync(own_copy_, own_msg, om.bytes, cudaMemcpyDeviceToDevice, stream_));
  sync();
  st.quant_seconds += seconds_since(t);

  // 6. all-gather the requantized chunks; dequantize the other ranks' chunks
  t = Clock::now();
  comm_.allgatherv(own_copy_, om.bytes, gathered_, plan_.gather_layout());
  st.comm_seconds += seconds_since(t);

  t = Clock::now();
  for (int j = 0; j < n; ++j) {
    const ChunkRange& c = plan_.chunk(j);
    const MessageLayout& m = plan_.message(j);
    const uint8_t* msg = gathered_ + plan_.gather_layout().displs[static_cast<size_t>(j)];
    INT4DDP_CUDA_CHECK(cudaMemcpyAsync(&gathered_h_[j], msg + m.stats_at, sizeof(quant::QuantStats),
                                       cudaMemcpyDeviceToHost, stream_));
    if (j == r || c.count() == 0) continue;
    float* sc = scales_ + plan_.scale_offset(j);
    INT4DDP_CUDA_CHECK(
        cudaMemcpyAsync(sc, msg + m.scales_at, m.scale_bytes(), cudaMemcpyDeviceToDevice, stream_));
    qc::dequantize_async(msg, sc, c.count(), bits, G, x + c.begin, stream_);
  }
  sync();
  quant::QuantStats global;
  for (int j = 0; j < n; ++j) quant::add_stats(global, gathered_h_[j]);
  st.quant_seconds += seconds_since(t);
  plan_.finish_run(global, comm_.bytes_sent() - bytes0, st);
  return st;
}

void TwoShotAllreduceCuda::commit(bool apply) {
  if (!plan_.commit(apply)) return;
  std::swap(ew_, ew_next_);
  std::swap(es_, es_next_);
}

std::vector<uint8_t> TwoShotAllreduceCuda::save_state() const {
  std::vector<float> ew(plan_.worker_ef_size()), es(plan_.server_ef_size());
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (!ew.empty())
    INT4DDP_CUDA_CHECK(
        cudaMemcpy(ew.data(), ew_, ew.size() * sizeof(float), cudaMemcpyDeviceToHost));
  if (!es.empty())
    INT4DDP_CUDA_CHECK(
        cudaMemcpy(es.data(), es_, es.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return plan_.save_state(ew.data(), es.data());
}

void TwoShotAllreduceCuda::load_state(const std::vector<uint8_t>& blob) {
  const size_t ew_n = plan_.worker_ef_size(), es_n = plan_.server_ef_size();
  const TwoShotStateView v = plan_.load_state(blob);
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  // On stream_, then waited for: a copy from pageable memory may return before it lands, and
  // stream_ does not wait for the legacy stream.
  if (ew_n)
    INT4DDP_CUDA_CHECK(
        cudaMemcpyAsync(ew_, v.ew, ew_n * sizeof(float), cudaMemcpyHostToDevice, stream_));
  if (es_n)
    INT4DDP_CUDA_CHECK(
        cudaMemcpyAsync(es_, v.es, es_n * sizeof(float), cudaMemcpyHostToDevice, stream_));
  INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace int4ddp::comm
