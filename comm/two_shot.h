// The two-shot compressed all-reduce (mean) of one bucket, DESIGN.md section 4:
//   1. v = g + e_w                      (worker error feedback, optional)
//   2. split v into N chunks aligned to G; rank r owns chunk r
//   3. quantize each chunk j of v with per-block scales (c = gamma * max|block|, or the policy's
//      per-block clip c_b for topk and mse: quant::block_clips), stochastic
//      rounding keyed (seed, stream = 65536 rank + j, step, tensor_id = 2 bucket), element index
//      relative to the chunk; e_w <- v - Q(v)
//   4. all-to-all: chunk j's message (MessageLayout: codes, scales, stats) goes to rank j
//   5. owner r: dequantize the N versions of chunk r, sum in FP32 in rank order, divide by N, add
//      its server error e_s, requantize once (key: stream = 65536 r + r, tensor_id = 2 bucket + 1,
//      element index relative to the chunk), e_s <- m - Q(m)
//   6. all-gather of the requantized chunks; every rank dequantizes all of them, so every rank
//      holds bit-identical results.
// Each element is quantized exactly twice whatever N is. Bytes on the wire per rank:
//   2 (N-1)/N (n b/8 + 4 n/G)  (+ 32 bytes of stats per message). At most 65536 ranks.
//
// The stats trailer (a quant::QuantStats record, 32 bytes) carries (clipped, count, nonfinite,
// absmax) of the quantization that made the message; owners sum the worker trailers of their chunk
// and add their own requantization, so after the all-gather every rank holds the same global clip
// fraction and non-finite count. The `lbt` gamma of a bucket follows that global clip fraction and
// is therefore identical on every rank.
//
// A step is provisional until commit(): the error-feedback buffers and the interval policy move to
// their new state only with commit(true) (the trainer skips steps with non-finite gradients on
// every rank and then calls commit(false)).
//
// Mode fp32 (bits = 32) is a plain allreduce_sum / N with no state.
//
// Pipelining (host version): each chunk is cut into P pieces of whole blocks (TwoShotPlan::piece),
// and steps 3-6 run piece by piece on nonblocking point-to-point messages: rank r quantizes
// piece k of every chunk and sends it at once while it quantizes piece k + 1; the owner reduces
// and requantizes piece k as soon as every rank's piece k has arrived and sends it to every rank;
// every rank dequantizes a gathered piece as soon as it has arrived. The codec works per block
// with element indices relative to the chunk, so the pieces give exactly the bytes of P = 1 (the
// all-to-all / all-gather collectives), and the result is bit-identical. P comes from
// pipeline_pieces(); while it computes, a rank tests its requests every tile so that the MPI
// library moves the messages (Open MPI's TCP transport only progresses inside MPI calls).
//
// TwoShotPlan holds what the host (TwoShotAllreduce, here) and the device (TwoShotAllreduceCuda,
// comm/two_shot_cuda.h) versions share: chunking, message layouts, Philox keys, the interval
// policy, the pending stats of a step and its commit, and the checkpoint blob. The two versions
// differ only in their loops or kernels and in where their buffers live.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/policy.h"

namespace int4ddp::comm {

class RequestList;  // comm/progress.h

using quant::kFp32Bits;                      // CompressConfig::bits of the uncompressed mode
constexpr uint32_t kStreamsPerRank = 65536;  // Philox stream = kStreamsPerRank * rank + chunk

struct CompressConfig {
  int bits = 4;                                             // 4, 8 (any 2..8 works), 32 = fp32
  int64_t block_size = 512;                                 // G, even, >= 2
  quant::Rounding rounding = quant::Rounding::kStochastic;  //
  bool worker_error_feedback = true;                        //
  bool server_error_feedback = true;                        //
  quant::PolicyConfig policy;  // minmax | fixed | lbt | mse | topk (bits is set from `bits`)
  uint32_t seed = 0;
  int pipeline_chunks = 0;  // pieces per chunk (comm.pipeline_chunks): 0 = auto, 1 = no pipeline

  void validate() const;  // throws Error naming the field
};

// Limits of the pipeline: at most kMaxPipelinePieces pieces per chunk; the automatic choice gives
// every piece at least kPipelinePieceFloats elements (large enough that the per-message cost of
// the transport stays small against its wire time, small enough that a bucket of a few MiB is
// already cut into several pieces).
constexpr int kMaxPipelinePieces = 64;
constexpr int kAutoPipelinePieces = 16;
constexpr int64_t kPipelinePieceFloats = int64_t{1} << 17;

// Pieces per chunk for a bucket of n floats over `ranks` ranks: 1 for fp32, a single rank or
// cfg.pipeline_chunks = 1; else cfg.pipeline_chunks (> 1) or, for 0 (auto),
// min(kAutoPipelinePieces, largest chunk / kPipelinePieceFloats); never more than the blocks of
// the largest chunk and never less than 1.
int pipeline_pieces(const CompressConfig& cfg, int64_t n, int ranks);

// Element range [begin, end) of chunk r when n elements in blocks of G are split over N ranks:
// the ceil(n/G) blocks are divided as evenly as possible (the first nb % N chunks get one block
// more); chunks may be empty when there are fewer blocks than ranks.
struct ChunkRange {
  int64_t begin = 0, end = 0;
  int64_t count() const { return end - begin; }
};
ChunkRange chunk_range(int64_t n, int64_t block_size, int ranks, int r);

// The message of one chunk of `count` elements, a byte stream with no alignment:
//   packed codes (quant::packed_bytes) | fp32 scales, one per block | QuantStats (32 bytes)
// The codes of the chunk's elements from o on (o a multiple of G, so even) start at byte
// quant::packed_bytes(bits, o). Copy the scales and the stats with memcpy.
struct MessageLayout {
  int64_t count = 0;       // elements
  int64_t num_scales = 0;  // quant::num_scales(count, G); 0 for an empty chunk
  size_t scales_at = 0;    // byte offset of the scales (= the code bytes)
  size_t stats_at = 0;     // byte offset of the stats record
  size_t bytes = 0;        // the whole message
  size_t scale_bytes() const { return static_cast<size_t>(num_scales) * sizeof(float); }
};
MessageLayout message_layout(int bits, int64_t count, int64_t block_size);

// Wire bytes per rank modelled by DESIGN.md for a bucket of n floats (without the stats records):
// 2 (N-1)/N (n b/8 + 4 n/G), or the ring's 2 (N-1)/N 4n in fp32 mode.
double modelled_wire_bytes(int bits, int64_t n, int64_t block_size, int ranks);

// Where piece k of a chunk's message lies in the message (byte offsets), for a piece of chunk
// elements [begin, end): its codes [codes_begin, codes_end) and its tail [tail_begin, tail_end),
// the piece's scales, followed by the stats record for the last piece.
struct PieceBytes {
  size_t codes_begin = 0, codes_end = 0, tail_begin = 0, tail_end = 0;
};

struct BucketStats {
  int64_t count = 0;         // elements quantized in steps 3 and 5, over all ranks
  int64_t clipped = 0;       // of those, clipped
  int64_t nonfinite = 0;     // NaN/Inf in any rank's input (the result is then not usable)
  float gamma = 1.0f;        // the gamma used this step
  uint64_t wire_bytes = 0;   // bytes this rank sent (Communicator::bytes_sent)
  double quant_seconds = 0;  // time in quantize / dequantize / reduce on this rank
  double comm_seconds = 0;   // the rest of run(): in the collectives, or waiting for messages
  // quant_seconds split by step (host two-shot): worker quantization (steps 1-3), the owner's
  // reduction and requantization (5), dequantization of the gathered chunks (6).
  double quantize_seconds = 0, reduce_seconds = 0, dequantize_seconds = 0;
  double clip_fraction() const { return count ? static_cast<double>(clipped) / count : 0.0; }
};

// Where the error-feedback floats of a checkpoint blob are (unaligned: memcpy them).
struct TwoShotStateView {
  const float* ew = nullptr;  // worker_ef_size() floats
  const float* es = nullptr;  // server_ef_size() floats
};

// The shared part of the host and device two-shot of one bucket on one rank.
class TwoShotPlan {
 public:
  // Validates cfg; throws Error for a negative count or more than kStreamsPerRank ranks.
  TwoShotPlan(const CompressConfig& cfg, int64_t count, uint32_t bucket_id, int ranks, int rank);

  const CompressConfig& config() const { return cfg_; }
  bool fp32() const { return cfg_.bits == kFp32Bits; }
  int64_t count() const { return count_; }
  int ranks() const { return ranks_; }
  int rank() const { return rank_; }

  // Chunk j (elements of the bucket) and its message; own() is this rank's chunk.
  const ChunkRange& chunk(int j) const { return chunks_[static_cast<size_t>(j)]; }
  const ChunkRange& own() const { return chunk(rank_); }
  // Pipelining: pieces() pieces per chunk (pipeline_pieces); piece k of chunk j is a range of
  // whole blocks relative to the chunk (blocks nb k / P .. nb (k+1) / P of its nb blocks; may be
  // empty), and piece_bytes() says where it lies in the chunk's message.
  int pieces() const { return pieces_; }
  ChunkRange piece(int j, int k) const;
  PieceBytes piece_bytes(int j, int k) const;
  const MessageLayout& message(int j) const { return messages_[static_cast<size_t>(j)]; }
  const MessageLayout& own_message() const { return message(rank_); }
  // All-to-all: chunk j's message to rank j; every rank's message of the own chunk. All-gather:
  // every chunk's requantized message.
  const ByteLayout& send_layout() const { return send_layout_; }
  const ByteLayout& recv_layout() const { return recv_layout_; }
  const ByteLayout& gather_layout() const { return send_layout_; }
  // Chunk j's scales in an aligned array of every chunk's scales (total_scales() floats).
  int64_t scale_offset(int j) const { return scale_offsets_[static_cast<size_t>(j)]; }
  int64_t total_scales() const { return scale_offsets_.back(); }
  // Error-feedback floats kept by this rank (0 when switched off or in fp32 mode).
  size_t worker_ef_size() const;
  size_t server_ef_size() const;

  float gamma() const { return policy_ ? policy_->gamma() : 1.0f; }
  // A block-scope policy (topk, mse: quant::is_block_rule): the codec quantizes v with the
  // policy's per-block clips (QuantParams::clips), saturating each block at its clip.
  bool block_clips() const { return !fp32() && quant::is_block_rule(policy_cfg_.kind); }
  // The policy's clip of every block of x (blocks of G from x[0], as the chunks and tiles are)
  // into clips (quant::num_scales(n, G) floats); returns clips.
  const float* block_clips(const float* x, int64_t n, float* clips) const;
  const quant::PolicyConfig& policy_config() const { return policy_cfg_; }
  // The quantizer of one run(): bits, rounding, this step's gamma, G, seed and step.
  quant::QuantParams step_params(uint32_t step) const;
  // p keyed for step 3 (quantize chunk j of this rank's v) and step 5 (the owner's requantization).
  quant::QuantParams worker_params(quant::QuantParams p, int j) const;
  quant::QuantParams owner_params(quant::QuantParams p) const;

  // End of a run(): st.count, clipped, nonfinite <- the global stats (the sum of the gathered
  // trailers; fp32 mode: count only), kept for commit(); st.wire_bytes <- wire_bytes.
  void finish_run(const quant::QuantStats& global, uint64_t wire_bytes, BucketStats& st);
  // Accept (true) or drop (false) the last run's updates: returns true when the caller must adopt
  // the run's new error-feedback buffers; the interval policy observes the step here.
  bool commit(bool apply);

  // The per-bucket checkpoint blob (host byte order):
  //   u64 magic "4I2S" | u64 count | u64 |e_w| | u64 |e_s| | e_w floats | e_s floats | policy state
  // (no policy state in fp32 mode). ew, es: host arrays of worker_ef_size(), server_ef_size().
  std::vector<uint8_t> save_state(const float* ew, const float* es) const;
  // Checks the blob against this bucket (throws Error on a mismatch), loads the policy state,
  // drops a pending step and returns where the error-feedback floats are.
  TwoShotStateView load_state(const std::vector<uint8_t>& blob);

 private:
  CompressConfig cfg_;
  int64_t count_;
  uint32_t bucket_id_;
  int ranks_, rank_;
  quant::PolicyConfig policy_cfg_;                 // cfg_.policy with bits set
  std::unique_ptr<quant::IntervalPolicy> policy_;  // null in fp32 mode
  std::vector<ChunkRange> chunks_;
  int pieces_ = 1;
  std::vector<MessageLayout> messages_;
  std::vector<int64_t> scale_offsets_;  // ranks + 1 prefix sums
  ByteLayout send_layout_, recv_layout_;
  bool pending_ = false;
  quant::QuantStats pending_stats_;  // global stats of the last run(), for the policy
};

// A caller that produces run()'s input and consumes its result piece by piece (the hierarchical
// all-reduce, comm/hierarchy.h). Called on the thread of run(), between its steps; run() polls
// no request of the caller's, but an MPI test inside a hook or run() progresses every message.
class PieceHooks {
 public:
  // Before the first read of piece k (TwoShotPlan::piece; k = 0 only, the whole bucket, without
  // the pipeline and in fp32 mode) of any chunk: when it returns, x's elements of piece k of every
  // chunk must hold the input. Called for k = 0, 1, ... in order.
  virtual void input_piece(int k) = 0;
  // x's elements [r.begin, r.end) of the bucket now hold their result and are not written again
  // in this run(): one piece of one chunk (the whole bucket in fp32 mode). Every element is in
  // exactly one call; r may be empty.
  virtual void result_ready(ChunkRange r) = 0;

 protected:
  ~PieceHooks() = default;
};

// What the host and the device two-shot of one bucket have in common: the communicator and the
// plan, and the accessors that read them.
class TwoShotBase {
 public:
  int64_t count() const { return plan_.count(); }
  float gamma() const { return plan_.gamma(); }
  const CompressConfig& config() const { return plan_.config(); }

 protected:
  TwoShotBase(Communicator& comm, const CompressConfig& cfg, int64_t count, uint32_t bucket_id)
      : comm_(comm), plan_(cfg, count, bucket_id, comm.size(), comm.rank()) {}
  ~TwoShotBase() = default;

  Communicator& comm_;
  TwoShotPlan plan_;
};

class TwoShotAllreduce final : public TwoShotBase {
 public:
  // A bucket of `count` floats with id bucket_id (keys the rounding). Allocates its buffers once.
  TwoShotAllreduce(Communicator& comm, const CompressConfig& cfg, int64_t count,
                   uint32_t bucket_id);

  // In place: x <- the compressed mean over ranks of x (count floats, host memory). hooks (or
  // null): told when each piece's input is needed and each piece's result is ready.
  BucketStats run(float* x, uint32_t step, PieceHooks* hooks = nullptr);
  // Accept (true) or drop (false) the error-feedback and gamma updates of the last run().
  void commit(bool apply);
  // Error-feedback buffers and policy state, for checkpoints (per rank).
  std::vector<uint8_t> save_state() const;
  void load_state(const std::vector<uint8_t>& blob);  // throws Error on a mismatched blob

 private:
  // Steps 1-3 for elements piece of chunk j (relative to the chunk; starts on a block): v = g +
  // e_w, quantize into chunk j's message in send_ (codes and scales), e_w <- v - Q(v); stats
  // accumulates. progress (or null) is polled every tile.
  void quantize_piece(const float* x, int j, ChunkRange piece, const quant::QuantParams& step_p,
                      quant::QuantStats& stats, RequestList* progress);
  // Step 5 for elements piece of the own chunk: dequantize the N versions (source[i]: rank i's
  // message), sum in rank order, / N, + e_s, requantize into the own message in gathered_, x's
  // own chunk <- the result, e_s <- m - Q(m); stats accumulates the requantization.
  void reduce_piece(float* x, const std::vector<const uint8_t*>& source, ChunkRange piece,
                    const quant::QuantParams& step_p, quant::QuantStats& stats,
                    RequestList* progress);
  // Step 6 for elements piece of chunk j: x <- the dequantized codes of chunk j's message msg.
  void dequantize_piece(float* x, int j, const uint8_t* msg, ChunkRange piece);
  // run() in int4/int8 mode: one piece per chunk on the all-to-all and all-gather collectives, or
  // plan_.pieces() pieces on point-to-point messages. Both leave every chunk's message in
  // gathered_ and add their compute times to st.
  void run_collectives(float* x, const quant::QuantParams& step_p, BucketStats& st,
                       PieceHooks* hooks);
  void run_pipelined(float* x, const quant::QuantParams& step_p, BucketStats& st,
                     PieceHooks* hooks);

  std::vector<float> ew_, ew_next_;  // worker error (count)
  std::vector<float> es_, es_next_;  // server error (own chunk)
  int64_t tile_ = 0;                 // elements per tile of the fused passes (whole blocks)
  std::vector<float> v_;             // (tile) g + e_w, then the owner's mean
  std::vector<float> tmp_;           // (tile) dequantized values
  std::vector<float> clips_;         // (tile / G) the block clips of a tile (block policies)
  std::vector<float> scales_;        // (plan_.total_scales()) aligned scales of every chunk
  std::vector<float> rank_scales_;   // (N x own scales) aligned scales of the received messages
  std::vector<uint8_t> send_, recv_, gathered_, own_copy_;  // the plan's byte layouts
};

}  // namespace int4ddp::comm
