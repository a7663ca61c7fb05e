// The two-shot compressed all-reduce (mean) of one bucket, DESIGN.md section 4:
//   1. v = g + e_w                      (worker error feedback, optional)
//   2. split v into N chunks aligned to G; rank r owns chunk r
//   3. quantize each chunk j of v with per-block scales (c = gamma * max|block|), stochastic
//      rounding keyed (seed, stream = 65536 rank + j, step, tensor_id = 2 bucket), element index
//      relative to the chunk; e_w <- v - Q(v)
//   4. all-to-all: chunk j's codes + scales (+ a 32-byte stats trailer) go to rank j
//   5. owner r: dequantize the N versions of chunk r, sum in FP32 in rank order, divide by N, add
//      its server error e_s, requantize once (key: stream = 65536 r + r, tensor_id = 2 bucket + 1,
//      element index relative to the chunk), e_s <- m - Q(m)
//   6. all-gather of the requantized chunks; every rank dequantizes all of them, so every rank
//      holds bit-identical results.
// Each element is quantized exactly twice whatever N is. Bytes on the wire per rank:
//   2 (N-1)/N (n b/8 + 4 n/G)  (+ 32 bytes of stats per message). At most 65536 ranks.
//
// The stats trailer (StatsTrailer) carries (clipped, count, nonfinite, absmax) of the quantization
// that made the message; owners sum the worker trailers of their chunk and add their own
// requantization, so after the all-gather every rank holds the same global clip fraction and
// non-finite count. The `lbt` gamma of a bucket follows that global clip fraction and is therefore
// identical on every rank.
//
// A step is provisional until commit(): the error-feedback buffers and the interval policy move to
// their new state only with commit(true) (the trainer skips steps with non-finite gradients on
// every rank and then calls commit(false)).
//
// Mode fp32 (bits = 32) is a plain allreduce_sum / N with no state.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/policy.h"

namespace int4ddp::comm {

struct CompressConfig {
  int bits = 4;                                             // 4, 8 (any 2..8 works), 32 = fp32
  int64_t block_size = 512;                                 // G, even, >= 2
  quant::Rounding rounding = quant::Rounding::kStochastic;  //
  bool worker_error_feedback = true;                        //
  bool server_error_feedback = true;                        //
  quant::PolicyConfig policy;  // kind minmax | fixed | lbt (bits is set from `bits`)
  uint32_t seed = 0;

  void validate() const;  // throws Error naming the field
};

// Element range [begin, end) of chunk r when n elements in blocks of G are split over N ranks:
// the ceil(n/G) blocks are divided as evenly as possible (the first nb % N chunks get one block
// more); chunks may be empty when there are fewer blocks than ranks.
struct ChunkRange {
  int64_t begin = 0, end = 0;
  int64_t count() const { return end - begin; }
};
ChunkRange chunk_range(int64_t n, int64_t block_size, int ranks, int r);

// Message of one chunk: packed codes, then fp32 scales (one per block), then this trailer (copied
// with memcpy: the message is not aligned).
struct StatsTrailer {
  int64_t clipped = 0, count = 0, nonfinite = 0;
  float absmax = 0.0f;
  uint32_t reserved = 0;
};
constexpr size_t kStatsTrailerBytes = sizeof(StatsTrailer);
static_assert(kStatsTrailerBytes == 32, "the trailer is part of the wire format");

// a <- a + b: counts add, absmax is the larger.
void add_trailer(StatsTrailer& a, const StatsTrailer& b);
StatsTrailer to_trailer(const quant::QuantStats& s);
quant::QuantStats to_quant_stats(const StatsTrailer& t);
struct BucketStats;
// st.count, clipped, nonfinite <- the step's global figures (the sum of the gathered trailers).
void set_global_stats(const StatsTrailer& global, BucketStats& st);
size_t chunk_message_bytes(int bits, int64_t count, int64_t block_size);

// Wire bytes per rank predicted by DESIGN.md for a bucket of n floats (without the trailers).
double predicted_wire_bytes(int bits, int64_t n, int64_t block_size, int ranks);

struct BucketStats {
  int64_t count = 0;         // elements quantized in steps 3 and 5, over all ranks
  int64_t clipped = 0;       // of those, clipped
  int64_t nonfinite = 0;     // NaN/Inf in any rank's input (the result is then not usable)
  float gamma = 1.0f;        // the gamma used this step
  uint64_t wire_bytes = 0;   // bytes this rank sent
  double quant_seconds = 0;  // time in quantize / dequantize / reduce on this rank
  double comm_seconds = 0;   // time in the collectives
  double clip_fraction() const { return count ? static_cast<double>(clipped) / count : 0.0; }
};

// The per-bucket checkpoint blob, shared by the host and the CUDA two-shot (host byte order):
//   u64 magic "4I2S" | u64 count | u64 |e_w| | u64 |e_s| | e_w floats | e_s floats | policy state
// (no policy state in fp32 mode). pack_ copies from host arrays; parse_ checks the header against
// what this bucket expects and returns where the pieces are.
std::vector<uint8_t> pack_two_shot_state(int64_t count, const float* ew, size_t ew_n,
                                         const float* es, size_t es_n,
                                         const quant::IntervalPolicy* policy);
struct TwoShotStateView {
  const float* ew = nullptr;  // ew_n floats (unaligned: memcpy them)
  const float* es = nullptr;  // es_n floats
};
// Loads the policy state into `policy` (when not null) and returns the error-feedback pieces.
TwoShotStateView parse_two_shot_state(const std::vector<uint8_t>& blob, int64_t count, size_t ew_n,
                                      size_t es_n, quant::IntervalPolicy* policy);

class TwoShotAllreduce {
 public:
  // A bucket of `count` floats with id bucket_id (keys the rounding). Allocates its buffers once.
  TwoShotAllreduce(Communicator& comm, const CompressConfig& cfg, int64_t count,
                   uint32_t bucket_id);

  // In place: x <- the compressed mean over ranks of x (count floats, host memory).
  BucketStats run(float* x, uint32_t step);

  // Accept (true) or drop (false) the error-feedback and gamma updates of the last run().
  void commit(bool apply);

  int64_t count() const { return count_; }
  float gamma() const;
  const CompressConfig& config() const { return cfg_; }

  // Error-feedback buffers and policy state, for checkpoints (per rank).
  std::vector<uint8_t> save_state() const;
  void load_state(const std::vector<uint8_t>& blob);  // throws Error on a mismatched blob

 private:
  Communicator& comm_;
  CompressConfig cfg_;
  int64_t count_;
  uint32_t bucket_id_;
  std::unique_ptr<quant::IntervalPolicy> policy_;
  std::vector<float> ew_, ew_next_;  // worker error (count_)
  std::vector<float> es_, es_next_;  // server error (own chunk)
  int64_t tile_ = 0;                 // elements per tile of the fused passes (whole blocks)
  std::vector<float> v_;             // tile: g + e_w, then the owner's mean
  std::vector<uint8_t> send_, recv_, gathered_;
  std::vector<float> tmp_, scale_tmp_, rank_scales_;
  std::vector<uint8_t> own_copy_;
  ByteLayout send_layout_, recv_layout_, gather_layout_;
  bool pending_ = false;
  quant::QuantStats pending_stats_;  // global stats of the last run(), for the policy
};

}  // namespace int4ddp::comm
