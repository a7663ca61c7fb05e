// The two-shot compressed all-reduce (see two_shot.h for the algorithm and the wire format).
#include "comm/two_shot.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "comm/bytes.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

constexpr int kFp32Bits = 32;
constexpr uint32_t kStreamsPerRank = 65536;  // stream = 65536 rank + chunk
constexpr int64_t kTileFloats = 16384;       // tile of the fused passes (rounded to whole blocks)

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

StatsTrailer read_trailer(const uint8_t* p) {
  StatsTrailer t;
  std::memcpy(&t, p, sizeof(t));
  return t;
}

}  // namespace

void add_trailer(StatsTrailer& a, const StatsTrailer& b) {
  a.clipped += b.clipped;
  a.count += b.count;
  a.nonfinite += b.nonfinite;
  a.absmax = std::max(a.absmax, b.absmax);
}

StatsTrailer to_trailer(const quant::QuantStats& s) {
  StatsTrailer t;
  t.clipped = s.clipped;
  t.count = s.count;
  t.nonfinite = s.nonfinite;
  t.absmax = s.absmax;
  return t;
}

void set_global_stats(const StatsTrailer& global, BucketStats& st) {
  st.count = global.count;
  st.clipped = global.clipped;
  st.nonfinite = global.nonfinite;
}

quant::QuantStats to_quant_stats(const StatsTrailer& t) {
  quant::QuantStats s;
  s.count = t.count;
  s.clipped = t.clipped;
  s.nonfinite = t.nonfinite;
  s.absmax = t.absmax;
  return s;
}

void CompressConfig::validate() const {
  INT4DDP_CHECK(bits == kFp32Bits || (bits >= 2 && bits <= 8), "comm: bits = ", bits,
                " must be 2..8 (int4, int8) or 32 (fp32)");
  if (bits == kFp32Bits) return;
  INT4DDP_CHECK(block_size >= 2 && block_size % 2 == 0 && block_size <= (int64_t{1} << 24),
                "comm.block_size = ", block_size, " must be even and in 2..2^24");
  INT4DDP_CHECK(policy.kind == quant::PolicyKind::kMinMax ||
                    policy.kind == quant::PolicyKind::kFixed ||
                    policy.kind == quant::PolicyKind::kLbt,
                "comm.grad_policy = ", quant::policy_kind_name(policy.kind),
                " is not one of minmax, fixed, lbt");
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

size_t chunk_message_bytes(int bits, int64_t count, int64_t block_size) {
  const int64_t scales = count > 0 ? (count + block_size - 1) / block_size : 0;
  return static_cast<size_t>(quant::packed_bytes(bits, count)) +
         static_cast<size_t>(scales) * sizeof(float) + kStatsTrailerBytes;
}

double predicted_wire_bytes(int bits, int64_t n, int64_t block_size, int ranks) {
  const double payload = bits == kFp32Bits ? 4.0 * n
                                           : static_cast<double>(n) * bits / 8.0 +
                                                 4.0 * static_cast<double>(n) / block_size;
  return 2.0 * (ranks - 1) / ranks * payload;
}

TwoShotAllreduce::TwoShotAllreduce(Communicator& comm, const CompressConfig& cfg, int64_t count,
                                   uint32_t bucket_id)
    : comm_(comm), cfg_(cfg), count_(count), bucket_id_(bucket_id) {
  cfg_.validate();
  INT4DDP_CHECK(count >= 0, "two-shot: negative count");
  INT4DDP_CHECK(!comm.device_buffers(),
                "two-shot: the host all-reduce needs a host communicator (use the CUDA version "
                "with NCCL)");
  INT4DDP_CHECK(comm.size() <= static_cast<int>(kStreamsPerRank), "two-shot: at most ",
                kStreamsPerRank, " ranks");
  if (cfg_.bits == kFp32Bits) return;
  quant::PolicyConfig pc = cfg_.policy;
  pc.bits = cfg_.bits;
  pc.lbt_calibrate = false;  // per-block clips: gamma starts at 1 and follows the sign rule
  policy_ = quant::make_policy(pc);

  const int n = comm.size(), r = comm.rank();
  std::vector<size_t> send_counts, recv_counts, gather_counts;
  const ChunkRange own = chunk_range(count, cfg_.block_size, n, r);
  for (int j = 0; j < n; ++j) {
    const ChunkRange c = chunk_range(count, cfg_.block_size, n, j);
    send_counts.push_back(chunk_message_bytes(cfg_.bits, c.count(), cfg_.block_size));
    recv_counts.push_back(chunk_message_bytes(cfg_.bits, own.count(), cfg_.block_size));
    gather_counts.push_back(send_counts.back());
  }
  send_layout_ = ByteLayout::packed(send_counts);
  recv_layout_ = ByteLayout::packed(recv_counts);
  gather_layout_ = ByteLayout::packed(gather_counts);
  send_.resize(send_layout_.total());
  recv_.resize(recv_layout_.total());
  gathered_.resize(gather_layout_.total());
  // Tiles of whole blocks, about 64 KiB of floats each (so v, the dequantized copy and the codes
  // stay in L2 between the passes of one tile).
  tile_ = std::max<int64_t>(cfg_.block_size, (kTileFloats / cfg_.block_size) * cfg_.block_size);
  v_.resize(static_cast<size_t>(tile_));
  tmp_.resize(static_cast<size_t>(tile_));
  int64_t max_chunk = 0;
  for (int j = 0; j < n; ++j)
    max_chunk = std::max(max_chunk, chunk_range(count, cfg_.block_size, n, j).count());
  scale_tmp_.resize(static_cast<size_t>(
      std::max<int64_t>(1, (max_chunk + cfg_.block_size - 1) / cfg_.block_size)));
  rank_scales_.resize(static_cast<size_t>(n) *
                      static_cast<size_t>((own.count() + cfg_.block_size - 1) / cfg_.block_size));
  if (cfg_.worker_error_feedback) {
    ew_.assign(static_cast<size_t>(count), 0.0f);
    ew_next_.assign(static_cast<size_t>(count), 0.0f);
  }
  if (cfg_.server_error_feedback) {
    es_.assign(static_cast<size_t>(own.count()), 0.0f);
    es_next_.assign(static_cast<size_t>(own.count()), 0.0f);
  }
}

float TwoShotAllreduce::gamma() const { return policy_ ? policy_->gamma() : 1.0f; }

BucketStats TwoShotAllreduce::run(float* x, uint32_t step) {
  BucketStats st;
  const int n = comm_.size(), r = comm_.rank();
  const uint64_t bytes0 = comm_.bytes_sent();
  auto t = Clock::now();
  if (cfg_.bits == kFp32Bits) {
    comm_.allreduce_sum(x, count_);
    st.comm_seconds = seconds_since(t);
    t = Clock::now();
    const float fn = static_cast<float>(n);
    for (int64_t i = 0; i < count_; ++i) x[i] /= fn;
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
  quant::QuantParams p;
  p.bits = bits;
  p.rounding = cfg_.rounding;
  p.gamma = gamma;
  p.block_size = G;
  p.key.seed = cfg_.seed;
  p.key.step = step;
  float* vt = v_.data();     // tile: g + e_w, then the owner's mean
  float* dqt = tmp_.data();  // tile: dequantized values
  const int64_t T = tile_;

  // 1-3. Per chunk j, in cache-sized tiles of whole blocks: v = g + e_w, quantize v into chunk j's
  // message (element index relative to the chunk: index_offset), e_w <- v - Q(v). One pass over
  // g and e_w instead of five.
  p.key.tensor_id = 2 * bucket_id_;
  for (int j = 0; j < n; ++j) {
    const ChunkRange c = chunk_range(count_, G, n, j);
    uint8_t* msg = send_.data() + send_layout_.displs[static_cast<size_t>(j)];
    const size_t code_bytes = static_cast<size_t>(quant::packed_bytes(bits, c.count()));
    const int64_t nsc = c.count() > 0 ? (c.count() + G - 1) / G : 0;
    float* sc = scale_tmp_.data();  // aligned; copied into the (unaligned) message below
    p.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(j);
    StatsTrailer tr;
    for (int64_t o = 0; o < c.count(); o += T) {
      const int64_t len = std::min(T, c.count() - o);
      const float* src = x + c.begin + o;
      if (cfg_.worker_error_feedback) {
        add_arrays(vt, src, ew_.data() + c.begin + o, len);
        src = vt;
      }
      p.index_offset = o;
      uint8_t* codes = msg + quant::packed_bytes(bits, o);
      add_trailer(tr, to_trailer(quant::quantize(src, len, p, codes, sc + o / G)));
      if (cfg_.worker_error_feedback) {
        quant::dequantize(codes, sc + o / G, len, bits, G, dqt);
        sub_arrays(ew_next_.data() + c.begin + o, src, dqt, len);
      }
    }
    std::memcpy(msg + code_bytes, sc, static_cast<size_t>(nsc) * sizeof(float));
    std::memcpy(msg + code_bytes + static_cast<size_t>(nsc) * sizeof(float), &tr, sizeof(tr));
  }
  st.quant_seconds += seconds_since(t);

  // 4. all-to-all
  t = Clock::now();
  comm_.alltoallv(send_.data(), send_layout_, recv_.data(), recv_layout_);
  st.comm_seconds += seconds_since(t);

  // 5. owner, per tile: dequantize the N versions, sum in rank order, / N, + e_s, requantize once,
  // e_s <- m - Q(m).
  t = Clock::now();
  const ChunkRange own = chunk_range(count_, G, n, r);
  const int64_t m = own.count();
  const size_t own_code_bytes = static_cast<size_t>(quant::packed_bytes(bits, m));
  const int64_t own_nsc = m > 0 ? (m + G - 1) / G : 0;
  const size_t own_scale_bytes = static_cast<size_t>(own_nsc) * sizeof(float);
  StatsTrailer sum;
  for (int i = 0; i < n; ++i) {
    const uint8_t* msg = recv_.data() + recv_layout_.displs[static_cast<size_t>(i)];
    add_trailer(sum, read_trailer(msg + own_code_bytes + own_scale_bytes));
    std::memcpy(rank_scales_.data() + static_cast<size_t>(i * own_nsc), msg + own_code_bytes,
                own_scale_bytes);
  }
  uint8_t* own_msg = gathered_.data() + gather_layout_.displs[static_cast<size_t>(r)];
  float* own_sc = scale_tmp_.data();
  p.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(r);
  p.key.tensor_id = 2 * bucket_id_ + 1;
  const float fn = static_cast<float>(n);
  for (int64_t o = 0; o < m; o += T) {
    const int64_t len = std::min(T, m - o);
    float* __restrict acc = vt;
    std::fill(acc, acc + len, 0.0f);
    for (int i = 0; i < n; ++i) {
      const uint8_t* msg = recv_.data() + recv_layout_.displs[static_cast<size_t>(i)];
      quant::dequantize(msg + quant::packed_bytes(bits, o),
                        rank_scales_.data() + static_cast<size_t>(i * own_nsc) + o / G, len, bits,
                        G, dqt);
      accumulate(acc, dqt, len);
    }
    for (int64_t k = 0; k < len; ++k) acc[k] /= fn;
    if (cfg_.server_error_feedback) accumulate(acc, es_.data() + o, len);
    p.index_offset = o;
    uint8_t* codes = own_msg + quant::packed_bytes(bits, o);
    add_trailer(sum, to_trailer(quant::quantize(acc, len, p, codes, own_sc + o / G)));
    // The own chunk's result, written now (x's own chunk is no longer read): the all-gather
    // brings every other rank these same bytes, which they dequantize the same way.
    float* result = x + own.begin + o;
    quant::dequantize(codes, own_sc + o / G, len, bits, G, result);
    if (cfg_.server_error_feedback) sub_arrays(es_next_.data() + o, acc, result, len);
  }
  std::memcpy(own_msg + own_code_bytes, own_sc, own_scale_bytes);
  std::memcpy(own_msg + own_code_bytes + own_scale_bytes, &sum, sizeof(sum));
  st.quant_seconds += seconds_since(t);

  // 6. all-gather the requantized chunks; every rank dequantizes the others' chunks (its own is
  // done above), so the result is the same function of the same bytes on every rank.
  t = Clock::now();
  // The interface has no in-place all-gather: send from a copy of the own message.
  own_copy_.assign(own_msg, own_msg + gather_layout_.counts[static_cast<size_t>(r)]);
  comm_.allgatherv(own_copy_.data(), own_copy_.size(), gathered_.data(), gather_layout_);
  st.comm_seconds += seconds_since(t);

  t = Clock::now();
  StatsTrailer global;
  for (int j = 0; j < n; ++j) {
    const ChunkRange c = chunk_range(count_, G, n, j);
    const uint8_t* msg = gathered_.data() + gather_layout_.displs[static_cast<size_t>(j)];
    const size_t code_bytes = static_cast<size_t>(quant::packed_bytes(bits, c.count()));
    const int64_t nsc = c.count() > 0 ? (c.count() + G - 1) / G : 0;
    add_trailer(global, read_trailer(msg + code_bytes + static_cast<size_t>(nsc) * sizeof(float)));
    if (j == r || c.count() == 0) continue;
    std::memcpy(scale_tmp_.data(), msg + code_bytes, static_cast<size_t>(nsc) * sizeof(float));
    quant::dequantize(msg, scale_tmp_.data(), c.count(), bits, G, x + c.begin);
  }
  st.quant_seconds += seconds_since(t);

  set_global_stats(global, st);
  st.wire_bytes = comm_.bytes_sent() - bytes0;
  pending_stats_ = to_quant_stats(global);
  pending_ = true;
  return st;
}

void TwoShotAllreduce::commit(bool apply) {
  if (!pending_) return;
  pending_ = false;
  if (!apply || cfg_.bits == kFp32Bits) return;
  if (cfg_.worker_error_feedback) ew_.swap(ew_next_);
  if (cfg_.server_error_feedback) es_.swap(es_next_);
  policy_->observe(pending_stats_);
}

namespace {
constexpr uint64_t kStateMagic = 0x53324934;  // "4I2S"
constexpr size_t kStateHeader = 4 * sizeof(uint64_t);
}  // namespace

std::vector<uint8_t> pack_two_shot_state(int64_t count, const float* ew, size_t ew_n,
                                         const float* es, size_t es_n,
                                         const quant::IntervalPolicy* policy) {
  std::vector<uint8_t> out;
  const uint64_t header[4] = {kStateMagic, static_cast<uint64_t>(count), ew_n, es_n};
  append_bytes(out, header, sizeof(header));
  append_bytes(out, ew, ew_n * sizeof(float));
  append_bytes(out, es, es_n * sizeof(float));
  if (policy) {
    const std::vector<uint8_t> ps = policy->save_state();
    append_bytes(out, ps.data(), ps.size());
  }
  return out;
}

TwoShotStateView parse_two_shot_state(const std::vector<uint8_t>& blob, int64_t count, size_t ew_n,
                                      size_t es_n, quant::IntervalPolicy* policy) {
  uint64_t header[4];
  INT4DDP_CHECK(blob.size() >= kStateHeader, "two-shot state: truncated (", blob.size(), " bytes)");
  std::memcpy(header, blob.data(), sizeof(header));
  INT4DDP_CHECK(header[0] == kStateMagic && header[1] == static_cast<uint64_t>(count) &&
                    header[2] == ew_n && header[3] == es_n,
                "two-shot state: saved for a bucket of ", header[1], " elements with ", header[2],
                "/", header[3], " error-feedback values; this bucket has ", count, " and ", ew_n,
                "/", es_n, " (other ranks, bucket or error-feedback settings?)");
  const size_t ef_end = kStateHeader + (ew_n + es_n) * sizeof(float);
  INT4DDP_CHECK(blob.size() >= ef_end, "two-shot state: truncated");
  if (policy) {
    policy->load_state(blob.data() + ef_end, blob.size() - ef_end);
  } else {
    INT4DDP_CHECK(ef_end == blob.size(), "two-shot state: trailing bytes for an fp32 bucket");
  }
  TwoShotStateView v;
  v.ew = reinterpret_cast<const float*>(blob.data() + kStateHeader);
  v.es = reinterpret_cast<const float*>(blob.data() + kStateHeader + ew_n * sizeof(float));
  return v;
}

std::vector<uint8_t> TwoShotAllreduce::save_state() const {
  return pack_two_shot_state(count_, ew_.data(), ew_.size(), es_.data(), es_.size(), policy_.get());
}

void TwoShotAllreduce::load_state(const std::vector<uint8_t>& blob) {
  const TwoShotStateView v =
      parse_two_shot_state(blob, count_, ew_.size(), es_.size(), policy_.get());
  if (!ew_.empty()) std::memcpy(ew_.data(), v.ew, ew_.size() * sizeof(float));
  if (!es_.empty()) std::memcpy(es_.data(), v.es, es_.size() * sizeof(float));
  pending_ = false;
}

}  // namespace int4ddp::comm
