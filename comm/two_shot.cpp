// The two-shot compressed all-reduce (see two_shot.h for the algorithm and the wire format): the
// plan shared with the device version, and the host loops.
#include "comm/two_shot.h"

#include <algorithm>
#include <cstring>

#include "comm/bytes.h"
#include "comm/progress.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

constexpr int64_t kTileFloats = 16384;  // tile of the fused passes (rounded to whole blocks)
// Error-feedback buffers of this size and more are written with non-temporal stores: they are read
// again only at the next step, long after they have left the cache.
constexpr size_t kStreamErrorBytes = size_t{8} << 20;
constexpr uint64_t kStateMagic = 0x53324934;  // "4I2S"
constexpr size_t kStateHeader = 4 * sizeof(uint64_t);

// Elementwise loops on non-aliasing arrays (so the compiler vectorises them).
void add_arrays(float* __restrict out, const float* __restrict a, const float* __restrict b,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}
void accumulate(float* __restrict acc, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

quant::QuantStats read_stats(const uint8_t* msg, const MessageLayout& m) {
  quant::QuantStats s;
  std::memcpy(&s, msg + m.stats_at, sizeof(s));
  return s;
}

void seal_message(uint8_t* msg, const MessageLayout& m, const quant::QuantStats& s) {
  std::memcpy(msg + m.stats_at, &s, sizeof(s));
}

// The trailer of the owner's message: its requantization's stats plus every rank's trailer.
quant::QuantStats owner_stats(quant::QuantStats sum, const std::vector<const uint8_t*>& source,
                              const MessageLayout& m) {
  for (const uint8_t* msg : source) quant::add_stats(sum, read_stats(msg, m));
  return sum;
}

// Chunk j's message in a buffer of the plan's layout l.
template <typename Buffer>
auto message_at(Buffer& buf, const ByteLayout& l, int j) {
  return buf.data() + l.displs[static_cast<size_t>(j)];
}

// The scales of the blocks of piece (chunk-relative elements, starting on a block): their first
// index and their bytes, in a message's scales (unaligned) and in the chunk's aligned floats.
struct ScaleSpan {
  int64_t first = 0;
  size_t bytes = 0;
  size_t offset() const { return static_cast<size_t>(first) * sizeof(float); }
};
ScaleSpan scale_span(ChunkRange piece, int64_t G) {
  const int64_t s1 = (piece.end + G - 1) / G;
  ScaleSpan s;
  s.first = piece.begin / G;
  s.bytes = static_cast<size_t>(std::max<int64_t>(0, s1 - s.first)) * sizeof(float);
  return s;
}
void scales_to_message(const float* sc, ChunkRange piece, int64_t G, uint8_t* msg_scales) {
  const ScaleSpan s = scale_span(piece, G);
  if (s.bytes) std::memcpy(msg_scales + s.offset(), sc + s.first, s.bytes);
}
void scales_from_message(const uint8_t* msg_scales, ChunkRange piece, int64_t G, float* sc) {
  const ScaleSpan s = scale_span(piece, G);
  if (s.bytes) std::memcpy(sc + s.first, msg_scales + s.offset(), s.bytes);
}

template <typename F>
void timed(double& seconds, F&& f) {
  const auto t = Clock::now();
  f();
  seconds += seconds_since(t);
}

// Message tags of the pipelined two-shot's point-to-point messages (comm/ring_allreduce.h has
// another).
constexpr int kScatterTag = 0x3253;  // all-to-all pieces
constexpr int kGatherTag = 0x3247;   // all-gather pieces

// The messages of one piece between two ranks; null: nothing to transfer. done once both have
// completed.
struct Arrival {
  Request* codes = nullptr;
  Request* tail = nullptr;
  bool done = false;
  bool test() {
    if (!done) done = (!codes || codes->test()) && (!tail || tail->test());
    return done;
  }
};

}  // namespace

void CompressConfig::validate() const {
  INT4DDP_CHECK(bits == kFp32Bits || (bits >= 2 && bits <= 8), "comm: bits = ", bits,
                " must be 2..8 (int4, int8) or 32 (fp32)");
  INT4DDP_CHECK(pipeline_chunks >= 0 && pipeline_chunks <= kMaxPipelinePieces,
                "comm.pipeline_chunks = ", pipeline_chunks, " must be 0 (auto) or 1..",
                kMaxPipelinePieces);
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

int pipeline_pieces(const CompressConfig& cfg, int64_t n, int ranks) {
  if (cfg.bits == kFp32Bits || ranks <= 1 || cfg.pipeline_chunks == 1) return 1;
  const int64_t largest = chunk_range(n, cfg.block_size, ranks, 0).count();  // chunk 0 is largest
  const int64_t blocks = (largest + cfg.block_size - 1) / cfg.block_size;
  const int64_t want = cfg.pipeline_chunks > 1
                           ? cfg.pipeline_chunks
                           : std::min<int64_t>(kAutoPipelinePieces, largest / kPipelinePieceFloats);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, blocks)));
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
  pieces_ = pipeline_pieces(cfg_, count, ranks);
  send_layout_ = ByteLayout::packed(send_counts);
  recv_layout_ =
      ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(ranks), own_message().bytes));
}

ChunkRange TwoShotPlan::piece(int j, int k) const {
  const int64_t G = cfg_.block_size, n = chunk(j).count();
  const int64_t blocks = (n + G - 1) / G;
  ChunkRange p;
  p.begin = std::min(n, blocks * k / pieces_ * G);
  p.end = std::min(n, blocks * (k + 1) / pieces_ * G);
  return p;
}

PieceBytes TwoShotPlan::piece_bytes(int j, int k) const {
  const ChunkRange p = piece(j, k);
  const MessageLayout& m = message(j);
  const int64_t G = cfg_.block_size;
  PieceBytes b;
  b.codes_begin = static_cast<size_t>(quant::packed_bytes(cfg_.bits, p.begin));
  b.codes_end = static_cast<size_t>(quant::packed_bytes(cfg_.bits, p.end));
  b.tail_begin = m.scales_at + static_cast<size_t>(p.begin / G) * sizeof(float);
  b.tail_end = m.scales_at + static_cast<size_t>((p.end + G - 1) / G) * sizeof(float);
  if (k == pieces_ - 1) b.tail_end = m.bytes;  // the stats record goes with the last piece
  return b;
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

BucketStats TwoShotAllreduce::run(float* x, uint32_t step, PieceHooks* hooks) {
  BucketStats st;
  const int n = plan_.ranks();
  const int64_t count = plan_.count();
  const uint64_t bytes0 = comm_.bytes_sent();
  auto t = Clock::now();
  if (plan_.fp32()) {
    if (hooks) hooks->input_piece(0);
    comm_.allreduce_sum(x, count);
    st.comm_seconds = seconds_since(t);
    t = Clock::now();
    const float fn = static_cast<float>(n);
    for (int64_t i = 0; i < count; ++i) x[i] /= fn;
    st.quant_seconds = seconds_since(t);
    if (hooks) hooks->result_ready({0, count});
    plan_.finish_run({}, comm_.bytes_sent() - bytes0, st);
    return st;
  }

  const quant::QuantParams step_p = plan_.step_params(step);
  st.gamma = step_p.gamma;
  if (plan_.pieces() > 1) {
    run_pipelined(x, step_p, st, hooks);
  } else {
    run_collectives(x, step_p, st, hooks);
  }
  // Every chunk's message is in gathered_ now: the global stats are the sum of their trailers.
  quant::QuantStats global;
  for (int j = 0; j < n; ++j)
    quant::add_stats(global,
                     read_stats(message_at(gathered_, plan_.gather_layout(), j), plan_.message(j)));
  st.quant_seconds = st.quantize_seconds + st.reduce_seconds + st.dequantize_seconds;
  st.comm_seconds = std::max(0.0, seconds_since(t) - st.quant_seconds);
  plan_.finish_run(global, comm_.bytes_sent() - bytes0, st);
  return st;
}

void TwoShotAllreduce::quantize_piece(const float* x, int j, ChunkRange piece,
                                      const quant::QuantParams& step_p, quant::QuantStats& stats,
                                      RequestList* progress) {
  const bool worker_ef = !ew_.empty();
  const bool block_clips = plan_.block_clips();  // a block-scope policy (topk, mse)
  const int bits = plan_.config().bits;
  const int64_t G = plan_.config().block_size, T = tile_;
  const ChunkRange& c = plan_.chunk(j);
  uint8_t* msg = message_at(send_, plan_.send_layout(), j);
  float* sc = scales_.data() + plan_.scale_offset(j);  // aligned; copied into the message
  float* vt = v_.data();                               // tile: g + e_w (block policies)
  quant::QuantParams p = plan_.worker_params(step_p, j);
  // In tiles of whole blocks: v = g + e_w, quantize v (element index relative to the chunk:
  // index_offset), e_w <- v - Q(v), fused in the codec (one pass over g and e_w). A block policy
  // needs v first for its clips.
  for (int64_t o = piece.begin; o < piece.end; o += T) {
    const int64_t len = std::min(T, piece.end - o);
    const float* src = x + c.begin + o;
    const float* e = worker_ef ? ew_.data() + c.begin + o : nullptr;
    if (block_clips) {
      if (e) {
        add_arrays(vt, src, e, len);
        src = vt;
        e = nullptr;
      }
      p.clips = plan_.block_clips(src, len, clips_.data());
    }
    p.index_offset = o;
    uint8_t* codes = msg + quant::packed_bytes(bits, o);
    quant::add_stats(stats, quant::quantize_feedback(
                                src, e, len, p, codes, sc + o / G,
                                worker_ef ? ew_next_.data() + c.begin + o : nullptr, nullptr,
                                ew_next_.size() * sizeof(float) >= kStreamErrorBytes));
    if (progress) progress->poll();
  }
  scales_to_message(sc, piece, G, msg + plan_.message(j).scales_at);
}

void TwoShotAllreduce::reduce_piece(float* x, const std::vector<const uint8_t*>& source,
                                    ChunkRange piece, const quant::QuantParams& step_p,
                                    quant::QuantStats& stats, RequestList* progress) {
  const int n = plan_.ranks(), r = plan_.rank();
  const bool server_ef = !es_.empty();
  const bool block_clips = plan_.block_clips();
  const int bits = plan_.config().bits;
  const int64_t G = plan_.config().block_size, T = tile_;
  const ChunkRange& own = plan_.own();
  const MessageLayout& om = plan_.own_message();
  for (int i = 0; i < n; ++i)
    scales_from_message(source[static_cast<size_t>(i)] + om.scales_at, piece, G,
                        rank_scales_.data() + static_cast<size_t>(i * om.num_scales));
  uint8_t* own_msg = message_at(gathered_, plan_.gather_layout(), r);
  float* own_sc = scales_.data() + plan_.scale_offset(r);
  float* dqt = tmp_.data();  // tile: dequantized values
  quant::QuantParams p = plan_.owner_params(step_p);
  const float fn = static_cast<float>(n);
  // Per tile: dequantize the N versions, sum in rank order, / N, + e_s, requantize once,
  // e_s <- m - Q(m).
  for (int64_t o = piece.begin; o < piece.end; o += T) {
    const int64_t len = std::min(T, piece.end - o);
    float* __restrict acc = v_.data();  // tile: the owner's mean
    std::fill(acc, acc + len, 0.0f);
    for (int i = 0; i < n; ++i) {
      quant::dequantize(source[static_cast<size_t>(i)] + quant::packed_bytes(bits, o),
                        rank_scales_.data() + static_cast<size_t>(i * om.num_scales) + o / G, len,
                        bits, G, dqt);
      accumulate(acc, dqt, len);
    }
    for (int64_t k = 0; k < len; ++k) acc[k] /= fn;
    const float* es = server_ef ? es_.data() + o : nullptr;
    if (block_clips) {  // the clips are those of m = mean + e_s
      if (es) accumulate(acc, es, len);
      es = nullptr;
      p.clips = plan_.block_clips(acc, len, clips_.data());
    }
    p.index_offset = o;
    uint8_t* codes = own_msg + quant::packed_bytes(bits, o);
    // m = mean + e_s quantized, e_s <- m - Q(m), and the own chunk's result Q(m) written now
    // (x's own chunk is no longer read): the all-gather brings every other rank these same
    // bytes, which they dequantize the same way.
    quant::add_stats(stats, quant::quantize_feedback(
                                acc, es, len, p, codes, own_sc + o / G,
                                server_ef ? es_next_.data() + o : nullptr, x + own.begin + o,
                                es_next_.size() * sizeof(float) >= kStreamErrorBytes));
    if (progress) progress->poll();
  }
  scales_to_message(own_sc, piece, G, own_msg + om.scales_at);
}

void TwoShotAllreduce::dequantize_piece(float* x, int j, const uint8_t* msg, ChunkRange piece) {
  if (piece.count() == 0) return;
  const int bits = plan_.config().bits;
  const int64_t G = plan_.config().block_size;
  float* sc = scales_.data() + plan_.scale_offset(j);
  scales_from_message(msg + plan_.message(j).scales_at, piece, G, sc);
  quant::dequantize(msg + quant::packed_bytes(bits, piece.begin), sc + piece.begin / G,
                    piece.count(), bits, G, x + plan_.chunk(j).begin + piece.begin);
}

void TwoShotAllreduce::run_collectives(float* x, const quant::QuantParams& step_p, BucketStats& st,
                                       PieceHooks* hooks) {
  const int n = plan_.ranks(), r = plan_.rank();
  const ChunkRange whole_own{0, plan_.own().count()};
  if (hooks) hooks->input_piece(0);
  // 1-3. every chunk j, whole.
  for (int j = 0; j < n; ++j) {
    quant::QuantStats stats;
    timed(st.quantize_seconds, [&] {
      quantize_piece(x, j, {0, plan_.chunk(j).count()}, step_p, stats, nullptr);
    });
    seal_message(message_at(send_, plan_.send_layout(), j), plan_.message(j), stats);
  }
  // 4. all-to-all
  comm_.alltoallv(send_.data(), plan_.send_layout(), recv_.data(), plan_.recv_layout());
  // 5. owner
  std::vector<const uint8_t*> source;
  for (int i = 0; i < n; ++i) source.push_back(message_at(recv_, plan_.recv_layout(), i));
  quant::QuantStats sum;
  timed(st.reduce_seconds, [&] { reduce_piece(x, source, whole_own, step_p, sum, nullptr); });
  uint8_t* own_msg = message_at(gathered_, plan_.gather_layout(), r);
  seal_message(own_msg, plan_.own_message(), owner_stats(sum, source, plan_.own_message()));
  if (hooks) hooks->result_ready(plan_.own());
  // 6. all-gather the requantized chunks; every rank dequantizes the others' chunks (its own is
  // done above), so the result is the same function of the same bytes on every rank. The
  // interface has no in-place all-gather: send from a copy of the own message.
  own_copy_.assign(own_msg, own_msg + plan_.own_message().bytes);
  comm_.allgatherv(own_copy_.data(), own_copy_.size(), gathered_.data(), plan_.gather_layout());
  timed(st.dequantize_seconds, [&] {
    for (int j = 0; j < n; ++j)
      if (j != r)
        dequantize_piece(x, j, message_at(gathered_, plan_.gather_layout(), j),
                         {0, plan_.chunk(j).count()});
  });
  if (hooks)
    for (int j = 0; j < n; ++j)
      if (j != r) hooks->result_ready(plan_.chunk(j));
}

void TwoShotAllreduce::run_pipelined(float* x, const quant::QuantParams& step_p, BucketStats& st,
                                     PieceHooks* hooks) {
  const int n = plan_.ranks(), r = plan_.rank(), P = plan_.pieces();
  RequestList reqs;
  // The messages of piece k of chunk j between this rank and `peer` (codes, then tail; none of 0
  // bytes): sent from or received into msg, chunk j's message. Both sides cut the same chunk the
  // same way, and messages of one tag between two ranks match in posting order.
  auto transfer = [&](bool send, uint8_t* msg, int j, int k, int peer, int tag) {
    const PieceBytes b = plan_.piece_bytes(j, k);
    Arrival a;
    auto one = [&](size_t lo, size_t hi) -> Request* {
      if (hi <= lo) return nullptr;
      return reqs.add(send ? comm_.isend(msg + lo, hi - lo, peer, tag)
                           : comm_.irecv(msg + lo, hi - lo, peer, tag));
    };
    a.codes = one(b.codes_begin, b.codes_end);
    a.tail = one(b.tail_begin, b.tail_end);
    return a;
  };
  // All receives up front: [i P + k] = piece k from rank i of the own chunk (all-to-all) and of
  // rank i's chunk (all-gather). The own rank's entries need no message.
  std::vector<Arrival> scattered(static_cast<size_t>(n * P)), gathered(scattered.size());
  for (int k = 0; k < P; ++k)
    for (int i = 0; i < n; ++i) {
      const size_t at = static_cast<size_t>(i * P + k);
      if (i == r) {
        scattered[at].done = gathered[at].done = true;
        continue;
      }
      scattered[at] =
          transfer(false, message_at(recv_, plan_.recv_layout(), i), r, k, i, kScatterTag);
      gathered[at] =
          transfer(false, message_at(gathered_, plan_.gather_layout(), i), i, k, i, kGatherTag);
    }
  std::vector<const uint8_t*> source;  // rank i's version of the own chunk
  for (int i = 0; i < n; ++i)
    source.push_back(i == r ? message_at(send_, plan_.send_layout(), r)
                            : message_at(recv_, plan_.recv_layout(), i));
  uint8_t* own_msg = message_at(gathered_, plan_.gather_layout(), r);

  std::vector<quant::QuantStats> worker(static_cast<size_t>(n));
  quant::QuantStats owner;
  int quantized = 0, reduced = 0;  // pieces done by this rank in steps 3 and 5
  std::vector<int> dequantized(static_cast<size_t>(n), 0);  // per chunk, in step 6
  // 5. the owner's next piece, once this rank and every other has quantized it; then its
  // all-gather.
  auto try_reduce = [&] {
    if (reduced == quantized) return false;
    const int k = reduced;
    for (int i = 0; i < n; ++i)
      if (!scattered[static_cast<size_t>(i * P + k)].test()) return false;
    const ChunkRange piece = plan_.piece(r, k);
    timed(st.reduce_seconds, [&] { reduce_piece(x, source, piece, step_p, owner, &reqs); });
    if (hooks)
      hooks->result_ready({plan_.own().begin + piece.begin, plan_.own().begin + piece.end});
    if (k == P - 1)
      seal_message(own_msg, plan_.own_message(), owner_stats(owner, source, plan_.own_message()));
    for (int j = 0; j < n; ++j)
      if (j != r) transfer(true, own_msg, r, k, j, kGatherTag);
    ++reduced;
    return true;
  };
  // 6. every gathered piece that has arrived, in order per chunk.
  auto try_dequantize = [&] {
    bool any = false;
    for (int j = 0; j < n; ++j) {
      int& k = dequantized[static_cast<size_t>(j)];
      if (j == r) {  // the owner wrote its own chunk's result
        k = reduced;
        continue;
      }
      for (; k < P && gathered[static_cast<size_t>(j * P + k)].test(); ++k, any = true) {
        const ChunkRange piece = plan_.piece(j, k);
        timed(st.dequantize_seconds, [&] {
          dequantize_piece(x, j, message_at(gathered_, plan_.gather_layout(), j), piece);
        });
        if (hooks)
          hooks->result_ready(
              {plan_.chunk(j).begin + piece.begin, plan_.chunk(j).begin + piece.end});
      }
    }
    return any;
  };

  // 1-4. piece by piece, every chunk (the own one last, the others from rank r + 1 on so that the
  // ranks send to different ranks at a time), each piece sent as soon as it is quantized.
  for (int k = 0; k < P; ++k) {
    if (hooks) hooks->input_piece(k);
    for (int d = 1; d <= n; ++d) {
      const int j = (r + d) % n;
      timed(st.quantize_seconds, [&] {
        quantize_piece(x, j, plan_.piece(j, k), step_p, worker[static_cast<size_t>(j)], &reqs);
      });
      uint8_t* msg = message_at(send_, plan_.send_layout(), j);
      if (k == P - 1) seal_message(msg, plan_.message(j), worker[static_cast<size_t>(j)]);
      if (j != r) transfer(true, msg, j, k, j, kScatterTag);
    }
    quantized = k + 1;
    while (try_reduce()) {
    }
    try_dequantize();
  }
  for (;;) {
    const bool moved = try_reduce() | try_dequantize();
    if (reduced == P &&
        std::all_of(dequantized.begin(), dequantized.end(), [&](int k) { return k == P; }))
      break;
    if (!moved) pause_politely();
  }
  reqs.wait_all();  // the sends
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
