// Bucket dumps: every rank's real weight-gradient buckets as the two-shot all-reduce receives them
// (fp32, before error feedback and compression), written every comm.dump_buckets_every steps into
// comm.dump_buckets_dir, for offline study: experiments/replay_buckets replays them through the
// two-shot with each interval policy.
//
// One file per (step, rank), "step_<S>.rank_<R>.bkt", written atomically (temp file, fsync,
// rename), little-endian:
//   char[8] "I4DDPBKT" | u32 version = 1 | u32 rank | u32 ranks | u32 num_buckets | u64 step |
//   char[16] model name, NUL-padded | per bucket: u64 count, count fp32 values
// The buckets are those with a compressed part, in launch order (reverse layer order), each the
// concatenation of its compressed tensors in arena order: exactly the x of TwoShotAllreduce::run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/buckets.h"

namespace int4ddp::train {

struct BucketDump {
  std::string model;  // model.name, at most 15 characters
  uint64_t step = 0;  // the global batch index the gradients belong to
  uint32_t rank = 0, ranks = 1;
  std::vector<std::vector<float>> buckets;  // (num_buckets) x (count) fp32 gradients
};

// "step_<S>.rank_<R>.bkt"
std::string bucket_dump_name(uint64_t step, uint32_t rank);

// Before the first step of a fresh run (rank 0): creates dir and proves it writable. A dir that
// already holds entries is refused (Error naming comm.dump_buckets_dir and train.overwrite) unless
// overwrite, which removes the earlier run's "*.bkt" files (and nothing else) instead.
void prepare_bucket_dump_dir(const std::string& dir, bool overwrite);

// Gathers each bucket's segments of grads and writes dir/bucket_dump_name(step, rank) atomically
// (creating dir). Throws Error naming comm.dump_buckets_dir, the file and the OS reason.
void write_bucket_dump(const std::string& dir, const std::string& model, uint64_t step,
                       uint32_t rank, uint32_t ranks, const float* grads,
                       const std::vector<std::vector<comm::Segment>>& buckets);

// Reads one dump; throws Error naming the file for a missing, short, long or foreign file.
BucketDump read_bucket_dump(const std::string& path);

}  // namespace int4ddp::train
