// The two-shot compressed all-reduce (see two_shot.h for the algorithm and the wire format): the
// plan shared with the device version, and the host loops.
#include "comm/two_shot.h"

#include <algorithm>
#include <cstring>

#include "comm/bytes.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

constexpr int64_t kTileFloats = 16384;        // tile of the fused passes (rounded to whole blocks)
constexpr uint64_t kStateMagic = 0x53324934;  // "4I2S"
constexpr size_t kStateHeader = 4 * sizeof(uint64_t);

// Elementwise loops on non-aliasing arrays (so the compiler vectorises them).
void add_arrays(float* __restrict out, const float* __restrict a, const float* __restrict b,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}
void sub_arrays(float* __restrict out, const float* __restrict a, const float* __restrict b,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] - b[i];
}
void accumulate(float* __restrict acc, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

quant::QuantStats read_stats(const uint8_t* msg, const MessageLayout& m) {
  quant::QuantStats s;
  std::memcpy(&s, msg + m.stats_at, sizeof(s));
  return s;
}

}  // namespace

void CompressConfig::validate() const {
  INT4DDP_CHECK(bits == kFp32Bits || (bits >= 2 && bits <= 8), "comm: bits = ", bits,
                " must be 2..8 (int4, int8) or 32 (fp32)");
  if (bits == kFp32Bits) return;
  INT4DDP_CHECK(block_size >= 2 && block_size % 2 == 0 && block_size <= (int64_t{1} << 24),
                "comm.block_size = ", block_size, " must be even and in 2..2^24");
  INT4DDP_CHECK(policy.kind != quant::PolicyKind::kDsgc,
                "comm.grad_policy = ", quant::policy_kind_name(policy.kind),
                " is not one of minmax, fixed, lbt, mse, topk");
  quant::PolicyConfig p = policy;
  p.bits = bits;
  p.validate();
}

ChunkRange chunk_range(int64_t n, int64_t block_size, int ranks, int r) {
  INT4DDP_CHECK(ranks >= 1 && r >= 0 && r < ranks, "chunk_range: rank ", r, " of ", ranks);
  const int64_t blocks = (n + block_size - 1) / block_size;
  const int64_t base = blocks / ranks, extra = blocks % ranks;
  const int64_t first = r * base + std::min<int64_t>(r, extra);
  const int64_t nblk = base + (r < extra ? 1 : 0);
  ChunkRange c;
  c.begin = std::min(n, first * block_size);
  c.end = std::min(n, (first + nblk) * block_size);
  return c;
}

MessageLayout message_layout(int bits, int64_t count, int64_t block_size) {
  MessageLayout m;
  m.count = count;
  m.num_scales = count > 0 ? quant::num_scales(count, block_size) : 0;
  m.scales_at = static_cast<size_t>(quant::packed_bytes(bits, count));
  m.stats_at = m.scales_at + m.scale_bytes();
  m.bytes = m.stats_at + sizeof(quant::QuantStats);
  return m;
}

double modelled_wire_bytes(int bits, int64_t n, int64_t block_size, int ranks) {
  const double payload = bits == kFp32Bits ? 4.0 * n
                                           : static_cast<double>(n) * bits / 8.0 +
                                                 4.0 * static_cast<double>(n) / block_size;
  return 2.0 * (ranks - 1) / ranks * payload;
}

// ---- TwoShotPlan ------------------------------------------------------------------------------

TwoShotPlan::TwoShotPlan(const CompressConfig& cfg, int64_t count, uint32_t bucket_id, int ranks,
                         int rank)
    : cfg_(cfg), count_(count), bucket_id_(bucket_id), ranks_(ranks), rank_(rank) {
  cfg_.validate();
  INT4DDP_CHECK(count >= 0, "two-shot: negative count");
  INT4DDP_CHECK(ranks <= static_cast<int>(kStreamsPerRank), "two-shot: at most ", kStreamsPerRank,
                " ranks");
  scale_offsets_.push_back(0);
  if (fp32()) return;
  policy_cfg_ = cfg_.policy;
  policy_cfg_.bits = cfg_.bits;
  policy_cfg_.lbt_calibrate = false;  // per-block clips: gamma starts at 1, follows the sign rule
  policy_ = quant::make_policy(policy_cfg_);

  std::vector<size_t> send_counts;
  for (int j = 0; j < ranks; ++j) {
    chunks_.push_back(chunk_range(count, cfg_.block_size, ranks, j));
    messages_.push_back(message_layout(cfg_.bits, chunks_.back().count(), cfg_.block_size));
    send_counts.push_back(messages_.back().bytes);
    scale_offsets_.push_back(scale_offsets_.back() + messages_.back().num_scales);
  }
  send_layout_ = ByteLayout::packed(send_counts);
  recv_layout_ =
      ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(ranks), own_message().bytes));
}

size_t TwoShotPlan::worker_ef_size() const {
  return !fp32() && cfg_.worker_error_feedback ? static_cast<size_t>(count_) : 0;
}

size_t TwoShotPlan::server_ef_size() const {
  return !fp32() && cfg_.server_error_feedback ? static_cast<size_t>(own().count()) : 0;
}

quant::QuantParams TwoShotPlan::step_params(uint32_t step) const {
  quant::QuantParams p;
  p.bits = cfg_.bits;
  p.rounding = cfg_.rounding;
  p.gamma = policy_->gamma_for(nullptr, 0);
  p.block_size = cfg_.block_size;
  p.key.seed = cfg_.seed;
  p.key.step = step;
  return p;
}

quant::QuantParams TwoShotPlan::worker_params(quant::QuantParams p, int j) const {
  p.key.stream = kStreamsPerRank * static_cast<uint32_t>(rank_) + static_cast<uint32_t>(j);
  p.key.tensor_id = 2 * bucket_id_;
  return p;
}

quant::QuantParams TwoShotPlan::owner_params(quant::QuantParams p) const {
  p.key.stream = kStreamsPerRank * static_cast<uint32_t>(rank_) + static_cast<uint32_t>(rank_);
  p.key.tensor_id = 2 * bucket_id_ + 1;
  return p;
}

const float* TwoShotPlan::block_clips(const float* x, int64_t n, float* clips) const {
  quant::block_clips(x, n, cfg_.block_size, policy_cfg_, clips);
  return clips;
}

void TwoShotPlan::finish_run(const quant::QuantStats& global, uint64_t wire_bytes,
                             BucketStats& st) {
  st.wire_bytes = wire_bytes;
  if (fp32()) {
    st.count = count_;
  } else {
    st.count = global.count;
    st.clipped = global.clipped;
    st.nonfinite = global.nonfinite;
    pending_stats_ = global;
  }
  pending_ = true;
}

bool TwoShotPlan::commit(bool apply) {
  if (!pending_) return false;
  pending_ = false;
  if (!apply || fp32()) return false;
  policy_->observe(pending_stats_);
  return true;
}

std::vector<uint8_t> TwoShotPlan::save_state(const float* ew, const float* es) const {
  const size_t ew_n = worker_ef_size(), es_n = server_ef_size();
  std::vector<uint8_t> out;
  const uint64_t header[4] = {kStateMagic, static_cast<uint64_t>(count_), ew_n, es_n};
  append_bytes(out, header, sizeof(header));
  append_bytes(out, ew, ew_n * sizeof(float));
  append_bytes(out, es, es_n * sizeof(float));
  if (policy_) {
    const std::vector<uint8_t> ps = policy_->save_state();
    append_bytes(out, ps.data(), ps.size());
  }
  return out;
}

TwoShotStateView TwoShotPlan::load_state(const std::vector<uint8_t>& blob) {
  const size_t ew_n = worker_ef_size(), es_n = server_ef_size();
  uint64_t header[4];
  INT4DDP_CHECK(blob.size() >= kStateHeader, "two-shot state: truncated (", blob.size(), " bytes)");
  std::memcpy(header, blob.data(), sizeof(header));
  INT4DDP_CHECK(header[0] == kStateMagic && header[1] == static_cast<uint64_t>(count_) &&
                    header[2] == ew_n && header[3] == es_n,
                "two-shot state: saved for a bucket of ", header[1], " elements with ", header[2],
                "/", header[3], " error-feedback values; this bucket has ", count_, " and ", ew_n,
                "/", es_n, " (other ranks, bucket or error-feedback settings?)");
  const size_t ef_end = kStateHeader + (ew_n + es_n) * sizeof(float);
  INT4DDP_CHECK(blob.size() >= ef_end, "two-shot state: truncated");
  if (policy_) {
    policy_->load_state(blob.data() + ef_end, blob.size() - ef_end);
  } else {
    INT4DDP_CHECK(ef_end == blob.size(), "two-shot state: trailing bytes for an fp32 bucket");
  }
  pending_ = false;
  TwoShotStateView v;
  v.ew = reinterpret_cast<const float*>(blob.data() + kStateHeader);
  v.es = reinterpret_cast<const float*>(blob.data() + kStateHeader + ew_n * sizeof(float));
  return v;
}

// ---- TwoShotAllreduce (host) --------------------------------------------------------------------

TwoShotAllreduce::TwoShotAllreduce(Communicator& comm, const CompressConfig& cfg, int64_t count,
                                   uint32_t bucket_id)
    : TwoShotBase(comm, cfg, count, bucket_id) {
  INT4DDP_CHECK(!comm.device_buffers(),
                "two-shot: the host all-reduce needs a host communicator (use the CUDA version "
                "with NCCL)");
  if (plan_.fp32()) return;
  const int64_t G = plan_.config().block_size;
  send_.resize(plan_.send_layout().total());
  recv_.resize(plan_.recv_layout().total());
  gathered_.resize(plan_.gather_layout().total());
  // Tiles of whole blocks, about 64 KiB of floats each (so v, the dequantized copy and the codes
  // stay in L2 between the passes of one tile).
  tile_ = std::max<int64_t>(G, (kTileFloats / G) * G);
  v_.resize(static_cast<size_t>(tile_));
  tmp_.resize(static_cast<size_t>(tile_));
  if (plan_.block_clips()) clips_.resize(static_cast<size_t>(tile_ / G));
  scales_.resize(static_cast<size_t>(std::max<int64_t>(1, plan_.total_scales())));
  rank_scales_.resize(static_cast<size_t>(plan_.ranks()) *
                      static_cast<size_t>(plan_.own_message().num_scales));
  ew_.assign(plan_.worker_ef_size(), 0.0f);
  ew_next_.assign(plan_.worker_ef_size(), 0.0f);
  es_.assign(plan_.server_ef_size(), 0.0f);
  es_next_.assign(plan_.server_ef_size(), 0.0f);
}

BucketStats TwoShotAllreduce::run(float* x, uint32_t step) {
  BucketStats st;
  const int n = plan_.ranks(), r = plan_.rank();
  const int64_t count = plan_.count();
  const uint64_t bytes0 = comm_.bytes_sent();
  auto t = Clock::now();
  if (plan_.fp32()) {
    comm_.allreduce_sum(x, count);
    st.comm_seconds = seconds_since(t);
    t = Clock::now();
    const float fn = static_cast<float>(n);
    for (int64_t i = 0; i < count; ++i) x[i] /= fn;
    st.quant_seconds = seconds_since(t);
    plan_.finish_run({}, comm_.bytes_sent() - bytes0, st);
    return st;
  }

  const bool worker_ef = !ew_.empty(), server_ef = !es_.empty();
  const bool block_clips = plan_.block_clips();  // a block-scope policy (topk, mse)
  const int bits = plan_.config().bits;
  const int64_t G = plan_.config().block_size;
  const quant::QuantParams step_p = plan_.step_params(step);
  st.gamma = step_p.gamma;
  float* vt = v_.data();     // tile: g + e_w, then the owner's mean
  float* dqt = tmp_.data();  // tile: dequantized values
  const int64_t T = tile_;

  // 1-3. Per chunk j, in cache-sized tiles of whole blocks: v = g + e_w, quantize v into chunk j's
  // message (element index relative to the chunk: index_offset), e_w <- v - Q(v). One pass over
  // g and e_w instead of five.
  for (int j = 0; j < n; ++j) {
    const ChunkRange& c = plan_.chunk(j);
    const MessageLayout& m = plan_.message(j);
    uint8_t* msg = send_.data() + plan_.send_layout().displs[static_cast<size_t>(j)];
    float* sc = scales_.data() + plan_.scale_offset(j);  // aligned; copied into the message
    quant::QuantParams p = plan_.worker_params(step_p, j);
    quant::QuantStats stats;
    for (int64_t o = 0; o < c.count(); o += T) {
      const int64_t len = std::min(T, c.count() - o);
      const float* src = x + c.begin + o;
      if (worker_ef) {
        add_arrays(vt, src, ew_.data() + c.begin + o, len);
        src = vt;
      }
      p.clips = block_clips ? plan_.block_clips(src, len, clips_.data()) : nullptr;
      p.index_offset = o;
      uint8_t* codes = msg + quant::packed_bytes(bits, o);
      quant::add_stats(stats, quant::quantize(src, len, p, codes, sc + o / G));
      if (worker_ef) {
        quant::dequantize(codes, sc + o / G, len, bits, G, dqt);
        sub_arrays(ew_next_.data() + c.begin + o, src, dqt, len);
      }
    }
    std::memcpy(msg + m.scales_at, sc, m.scale_bytes());
    std::memcpy(msg + m.stats_at, &stats, sizeof(stats));
  }
  st.quant_seconds += seconds_since(t);

  // 4. all-to-all
  t = Clock::now();
  comm_.alltoallv(send_.data(), plan_.send_layout(), recv_.data(), plan_.recv_layout());
  st.comm_seconds += seconds_since(t);

  // 5. owner, per tile: dequantize the N versions, sum in rank order, / N, + e_s, requantize once,
  // e_s <- m - Q(m).
  t = Clock::now();
  const ChunkRange& own = plan_.own();
  const MessageLayout& om = plan_.own_message();
  quant::QuantStats sum;
  for (int i = 0; i < n; ++i) {
    const uint8_t* msg = recv_.data() + plan_.recv_layout().displs[static_cast<size_t>(i)];
    quant::add_stats(sum, read_stats(msg, om));
    std::memcpy(rank_scales_.data() + static_cast<size_t>(i * om.num_scales), msg + om.scales_at,
                om.scale_bytes());
  }
  uint8_t* own_msg = gathered_.data() + plan_.gather_layout().displs[static_cast<size_t>(r)];
  float* own_sc = scales_.data() + plan_.scale_offset(r);
  quant::QuantParams p = plan_.owner_params(step_p);
  const float fn = static_cast<float>(n);
  for (int64_t o = 0; o < om.count; o += T) {
    const int64_t len = std::min(T, om.count - o);
    float* __restrict acc = vt;
    std::fill(acc, acc + len, 0.0f);
    for (int i = 0; i < n; ++i) {
      const uint8_t* msg = recv_.data() + plan_.recv_layout().displs[static_cast<size_t>(i)];
      quant::dequantize(msg + quant::packed_bytes(bits, o),
                        rank_scales_.data() + static_cast<size_t>(i * om.num_scales) + o / G, len,
                        bits, G, dqt);
      accumulate(acc, dqt, len);
    }
    for (int64_t k = 0; k < len; ++k) acc[k] /= fn;
    if (server_ef) accumulate(acc, es_.data() + o, len);
    p.clips = block_clips ? plan_.block_clips(acc, len, clips_.data()) : nullptr;
    p.index_offset = o;
    uint8_t* codes = own_msg + quant::packed_bytes(bits, o);
    quant::add_stats(sum, quant::quantize(acc, len, p, codes, own_sc + o / G));
    // The own chunk's result, written now (x's own chunk is no longer read): the all-gather
    // brings every other rank these same bytes, which they dequantize the same way.
    float* result = x + own.begin + o;
    quant::dequantize(codes, own_sc + o / G, len, bits, G, result);
    if (server_ef) sub_arrays(es_next_.data() + o, acc, result, len);
  }
  std::memcpy(own_msg + om.scales_at, own_sc, om.scale_bytes());
  std::memcpy(own_msg + om.stats_at, &sum, sizeof(sum));
  st.quant_seconds += seconds_since(t);

  // 6. all-gather the requantized chunks; every rank dequantizes the others' chunks (its own is
  // done above), so the result is the same function of the same bytes on every rank.
  t = Clock::now();
  // The interface has no in-place all-gather: send from a copy of the own message.
  own_copy_.assign(own_msg, own_msg + om.bytes);
  comm_.allgatherv(own_copy_.data(), own_copy_.size(), gathered_.data(), plan_.gather_layout());
  st.comm_seconds += seconds_since(t);

  t = Clock::now();
  quant::QuantStats global;
  for (int j = 0; j < n; ++j) {
    const ChunkRange& c = plan_.chunk(j);
    const MessageLayout& m = plan_.message(j);
    const uint8_t* msg = gathered_.data() + plan_.gather_layout().displs[static_cast<size_t>(j)];
    quant::add_stats(global, read_stats(msg, m));
    if (j == r || c.count() == 0) continue;
    float* sc = scales_.data() + plan_.scale_offset(j);
    std::memcpy(sc, msg + m.scales_at, m.scale_bytes());
    quant::dequantize(msg, sc, c.count(), bits, G, x + c.begin);
  }
  st.quant_seconds += seconds_since(t);
  plan_.finish_run(global, comm_.bytes_sent() - bytes0, st);
  return st;
}

void TwoShotAllreduce::commit(bool apply) {
  if (!plan_.commit(apply)) return;
  ew_.swap(ew_next_);
  es_.swap(es_next_);
}

std::vector<uint8_t> TwoShotAllreduce::save_state() const {
  return plan_.save_state(ew_.data(), es_.data());
}

void TwoShotAllreduce::load_state(const std::vector<uint8_t>& blob) {
  const TwoShotStateView v = plan_.load_state(blob);
  if (!ew_.empty()) std::memcpy(ew_.data(), v.ew, ew_.size() * sizeof(float));
  if (!es_.empty()) std::memcpy(es_.data(), v.es, es_.size() * sizeof(float));
}

}  // namespace int4ddp::comm
