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

void add(StatsTrailer& a, const StatsTrailer& b) {
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

}  // namespace

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
  const double payload = bits == kFp32Bits
                             ? 4.0 * n
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
  v_.resize(static_cast<size_t>(count));
  tmp_.resize(static_cast<size_t>(count));
  acc_.resize(static_cast<size_t>(own.count()));
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
    const float inv_n = static_cast<float>(n);
    for (int64_t i = 0; i < count_; ++i) x[i] /= inv_n;
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

  // 1. v = g + e_w
  const float* v = x;
  if (cfg_.worker_error_feedback) {
    add_arrays(v_.data(), x, ew_.data(), count_);
    v = v_.data();
  }
  // 2-3. quantize every chunk into its message; e_w <- v - Q(v)
  quant::QuantParams p;
  p.bits = bits;
  p.rounding = cfg_.rounding;
  p.gamma = gamma;
  p.block_size = G;
  p.key.seed = cfg_.seed;
  p.key.step = step;
  p.key.tensor_id = 2 * bucket_id_;
  for (int j = 0; j < n; ++j) {
    const ChunkRange c = chunk_range(count_, G, n, j);
    uint8_t* msg = send_.data() + send_layout_.displs[static_cast<size_t>(j)];
    const size_t code_bytes = static_cast<size_t>(quant::packed_bytes(bits, c.count()));
    uint8_t* scales = msg + code_bytes;  // not float-aligned in general
    p.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(j);
    // Scales are written to an aligned temporary, then copied (the message is a byte stream).
    const int64_t nsc = c.count() > 0 ? (c.count() + G - 1) / G : 0;
    std::vector<float>& sc = scale_tmp_;
    sc.resize(static_cast<size_t>(std::max<int64_t>(nsc, 1)));
    const quant::QuantStats qs =
        c.count() > 0 ? quant::quantize(v + c.begin, c.count(), p, msg, sc.data())
                      : quant::QuantStats{};
    std::memcpy(scales, sc.data(), static_cast<size_t>(nsc) * sizeof(float));
    const StatsTrailer tr = to_trailer(qs);
    std::memcpy(msg + code_bytes + static_cast<size_t>(nsc) * sizeof(float), &tr, sizeof(tr));
    if (cfg_.worker_error_feedback && c.count() > 0) {
      quant::dequantize(msg, sc.data(), c.count(), bits, G, tmp_.data() + c.begin);
      sub_arrays(ew_next_.data() + c.begin, v + c.begin, tmp_.data() + c.begin, c.count());
    }
  }
  st.quant_seconds += seconds_since(t);

  // 4. all-to-all
  t = Clock::now();
  comm_.alltoallv(send_.data(), send_layout_, recv_.data(), recv_layout_);
  st.comm_seconds += seconds_since(t);

  // 5. owner: dequantize the N versions, sum in rank order, / N, + e_s, requantize once
  t = Clock::now();
  const ChunkRange own = chunk_range(count_, G, n, r);
  const int64_t m = own.count();
  const size_t own_code_bytes = static_cast<size_t>(quant::packed_bytes(bits, m));
  const int64_t own_nsc = m > 0 ? (m + G - 1) / G : 0;
  std::vector<float>& sc = scale_tmp_;
  sc.resize(static_cast<size_t>(std::max<int64_t>(own_nsc, 1)));
  StatsTrailer sum;
  std::fill(acc_.begin(), acc_.end(), 0.0f);
  for (int i = 0; i < n; ++i) {
    const uint8_t* msg = recv_.data() + recv_layout_.displs[static_cast<size_t>(i)];
    add(sum, read_trailer(msg + own_code_bytes + static_cast<size_t>(own_nsc) * sizeof(float)));
    if (m == 0) continue;
    std::memcpy(sc.data(), msg + own_code_bytes, static_cast<size_t>(own_nsc) * sizeof(float));
    quant::dequantize(msg, sc.data(), m, bits, G, tmp_.data());
    accumulate(acc_.data(), tmp_.data(), m);
  }
  const float fn = static_cast<float>(n);
  float* __restrict acc = acc_.data();
  for (int64_t k = 0; k < m; ++k) acc[k] /= fn;
  if (cfg_.server_error_feedback) accumulate(acc, es_.data(), m);
  uint8_t* own_msg = gathered_.data() + gather_layout_.displs[static_cast<size_t>(r)];
  p.key.stream = kStreamsPerRank * static_cast<uint32_t>(r) + static_cast<uint32_t>(r);
  p.key.tensor_id = 2 * bucket_id_ + 1;
  const quant::QuantStats os =
      m > 0 ? quant::quantize(acc_.data(), m, p, own_msg, sc.data()) : quant::QuantStats{};
  std::memcpy(own_msg + own_code_bytes, sc.data(), static_cast<size_t>(own_nsc) * sizeof(float));
  add(sum, to_trailer(os));
  std::memcpy(own_msg + own_code_bytes + static_cast<size_t>(own_nsc) * sizeof(float), &sum,
              sizeof(sum));
  if (cfg_.server_error_feedback && m > 0) {
    quant::dequantize(own_msg, sc.data(), m, bits, G, tmp_.data());
    sub_arrays(es_next_.data(), acc_.data(), tmp_.data(), m);
  }
  st.quant_seconds += seconds_since(t);

  // 6. all-gather the requantized chunks; everyone dequantizes everything (own chunk included, so
  // the result is the same function of the same bytes on every rank).
  t = Clock::now();
  // MPI_Allgatherv with MPI_IN_PLACE semantics is not in the interface: send from a copy.
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
    add(global, read_trailer(msg + code_bytes + static_cast<size_t>(nsc) * sizeof(float)));
    if (c.count() == 0) continue;
    sc.resize(static_cast<size_t>(nsc));
    std::memcpy(sc.data(), msg + code_bytes, static_cast<size_t>(nsc) * sizeof(float));
    quant::dequantize(msg, sc.data(), c.count(), bits, G, x + c.begin);
  }
  st.quant_seconds += seconds_since(t);

  st.count = global.count;
  st.clipped = global.clipped;
  st.nonfinite = global.nonfinite;
  st.wire_bytes = comm_.bytes_sent() - bytes0;
  pending_stats_ = quant::QuantStats{};
  pending_stats_.count = global.count;
  pending_stats_.clipped = global.clipped;
  pending_stats_.nonfinite = global.nonfinite;
  pending_stats_.absmax = global.absmax;
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
constexpr uint32_t kStateMagic = 0x53324934;  // "4I2S"
}

std::vector<uint8_t> TwoShotAllreduce::save_state() const {
  std::vector<uint8_t> out;
  auto put = [&out](const void* p, size_t n) { append_bytes(out, p, n); };
  const uint64_t header[4] = {kStateMagic, static_cast<uint64_t>(count_), ew_.size(), es_.size()};
  put(header, sizeof(header));
  put(ew_.data(), ew_.size() * sizeof(float));
  put(es_.data(), es_.size() * sizeof(float));
  if (policy_) {
    const std::vector<uint8_t> ps = policy_->save_state();
    put(ps.data(), ps.size());
  }
  return out;
}

void TwoShotAllreduce::load_state(const std::vector<uint8_t>& blob) {
  uint64_t header[4];
  INT4DDP_CHECK(blob.size() >= sizeof(header), "two-shot state: truncated (", blob.size(),
                " bytes)");
  std::memcpy(header, blob.data(), sizeof(header));
  INT4DDP_CHECK(header[0] == kStateMagic && header[1] == static_cast<uint64_t>(count_) &&
                    header[2] == ew_.size() && header[3] == es_.size(),
                "two-shot state: saved for a bucket of ", header[1], " elements with ", header[2],
                "/", header[3], " error-feedback values; this bucket has ", count_, " and ",
                ew_.size(), "/", es_.size(), " (other ranks, bucket or error-feedback settings?)");
  size_t off = sizeof(header);
  const size_t ew_bytes = ew_.size() * sizeof(float), es_bytes = es_.size() * sizeof(float);
  INT4DDP_CHECK(blob.size() >= off + ew_bytes + es_bytes, "two-shot state: truncated");
  std::memcpy(ew_.data(), blob.data() + off, ew_bytes);
  off += ew_bytes;
  std::memcpy(es_.data(), blob.data() + off, es_bytes);
  off += es_bytes;
  if (policy_) {
    policy_->load_state(blob.data() + off, blob.size() - off);
  } else {
    INT4DDP_CHECK(off == blob.size(), "two-shot state: trailing bytes for an fp32 bucket");
  }
  pending_ = false;
}

}  // namespace int4ddp::comm
