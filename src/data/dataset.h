// Datasets for the trainer: readers for Fashion-MNIST / MNIST IDX files (gzip or plain) and the
// CIFAR-10 binary format, a seeded synthetic set, per-channel normalisation, and the seeded epoch
// permutation, data-parallel sharding and batch assembly (with optional random crop and flip).
//
// Invariants:
// - A loader either returns a Dataset that passes Dataset::validate() or throws int4ddp::Error
//   naming the file and what is wrong (missing, bad magic, sizes that disagree, truncated or
//   corrupt gzip, a label out of range). Nothing is half-loaded.
// - Every random choice (permutation, crop offsets, flips, synthetic samples) comes from Rng
//   (SplitMix64) keyed by explicit integers, with our own Fisher-Yates and bounded draws: results
//   are identical on every compiler and platform (std::shuffle and std::*_distribution are
//   implementation-defined, so they are never used here).
// - Augmentation of a sample depends only on (seed, epoch, dataset index), never on the rank, the
//   world size or the batch it lands in, so 2 ranks x batch 64 see what 1 rank x batch 128 sees.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/core/rng.h"

namespace int4ddp::data {

// Where the Debian package dataset-fashion-mnist installs the four .gz files.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// Per-channel statistics of pixel values in [0, 1]; normalise maps x -> (x - mean[c]) / stddev[c].
struct ChannelStats {
  std::vector<float> mean;    // (channels)
  std::vector<float> stddev;  // (channels), > 0
};

// The Fashion-MNIST train split's statistics (pixels / 255): mean 0.2860, std 0.3530.
ChannelStats fashion_mnist_stats();

struct Dataset {
  std::string name;  // e.g. "fashion_mnist:train", used in messages
  int64_t count = 0;
  int channels = 0;
  int height = 0;
  int width = 0;
  int num_classes = 0;
  // (count, channels, height, width) fp32 NCHW; pixel / 255 in [0, 1] until normalize()
  std::vector<float> images;
  std::vector<int32_t> labels;  // (count) in [0, num_classes)
  ChannelStats normalization;   // the one applied by normalize(); empty while raw

  // Elements per image: channels * height * width.
  int64_t image_numel() const { return int64_t{channels} * height * width; }
  bool normalized() const { return !normalization.mean.empty(); }
  // The value a black (0) pixel has now: 0 raw, -mean[c] / stddev[c] once normalised.
  float background(int channel) const;
  // Throws Error naming the dataset if the shapes disagree or a label is outside [0, num_classes).
  void validate() const;
};

// ---- readers ------------------------------------------------------------------------------------
// Every reader detects gzip by its 1f 8b magic (not the file name) and reads plain files otherwise.
// A gzip stream is inflated to its end, so a truncated stream, a bad CRC or length trailer and
// corrupt deflate data are all errors (concatenated members read as one stream, as with gzip -d).
// Extra bytes after the expected data are an error too.

// An MNIST-family IDX pair: images magic 0x00000803 (uint8, count x 28 x 28), labels magic
// 0x00000801 (uint8, count), labels 0..9. Pixels become value / 255 in [0, 1], shape (count, 1, 28,
// 28).
Dataset load_mnist_idx(const std::string& images_path, const std::string& labels_path);

// Fashion-MNIST (or MNIST, same names) from a directory: split "train" reads
// train-{images-idx3,labels-idx1}-ubyte, "test" reads t10k-..., each plain if present, else .gz.
Dataset load_fashion_mnist(const std::string& dir, const std::string& split);

// CIFAR-10 binary batches: records of 1 label byte (0..9) + 3072 bytes (1024 R, 1024 G, 1024 B,
// each 32 x 32 row-major), so the pixels are already CHW. Shape (count, 3, 32, 32), value / 255.
Dataset load_cifar10_files(const std::vector<std::string>& paths);
// split "train": dir/data_batch_1.bin .. data_batch_5.bin; "test": dir/test_batch.bin.
Dataset load_cifar10(const std::string& dir, const std::string& split);

// ---- synthetic data -----------------------------------------------------------------------------
// Each class has a fixed prototype (the sum of three soft round bumps at seeded positions, clamped
// to [0, 1]); a sample is brightness * prototype shifted by up to max_shift pixels, plus per-pixel
// noise (zero mean, std `noise`, a sum of four uniforms), clamped to [0, 1]. Classes share the
// prototypes across splits; sample i of a split depends only on (seed, split, i).
struct SyntheticConfig {
  uint64_t seed = 0;
  int64_t train_count = 10000;
  int64_t test_count = 2000;
  int num_classes = 10;  // 2..256
  int channels = 1;      // 1..16
  int height = 28;       // 8..1024
  int width = 28;        // 8..1024
  float noise = 0.3f;    // per-pixel noise std, in [0, 2]
  int max_shift = 2;     // |shift| <= max_shift pixels in each direction, 0..8

  void validate() const;  // throws Error naming the field out of range
};

// split "train" or "test".
Dataset make_synthetic(const SyntheticConfig& config, const std::string& split);

// ---- normalisation ------------------------------------------------------------------------------
// Mean and (population) standard deviation per channel over all images, accumulated in double in a
// fixed order. Throws if the dataset is empty or already normalised.
ChannelStats compute_channel_stats(const Dataset& data);

// x -> (x - mean[c]) / stddev[c] in place, and records stats in data.normalization. Apply the train
// split's stats to the test split. Throws if already normalised, if the channel counts differ or a
// stddev is not > 0 and finite.
void normalize(Dataset& data, const ChannelStats& stats);

// ---- seeded order and sharding ------------------------------------------------------------------

using Rng = ::int4ddp::Rng;  // SplitMix64, src/core/rng.h

// A seed for a stream keyed by (seed, domain, a, b), each word folded in through SplitMix64 mixing.
uint64_t derive_seed(uint64_t seed, uint64_t domain, uint64_t a, uint64_t b);

// The order of epoch `epoch`: a permutation of 0..count-1 by Fisher-Yates (i from count-1 down to
// 1, swap i with Rng::below(i + 1)) from Rng(derive_seed(seed, shuffle, epoch, 0)).
std::vector<int64_t> epoch_permutation(int64_t count, uint64_t seed, int64_t epoch);

// Samples per rank: count / world_size (the remainder of every epoch is dropped).
int64_t shard_size(int64_t count, int world_size);

// Rank `rank` of `world_size` takes perm[k * world_size + rank] for k < shard_size(): disjoint,
// equal-size shards whose union is perm's first world_size * shard_size() entries, interleaved so
// that local batch b of all ranks together is global batch b of a single rank. Throws on a bad
// rank/world size or when the permutation has fewer entries than ranks.
std::vector<int64_t> shard(const std::vector<int64_t>& perm, int rank, int world_size);

// ---- batch assembly -----------------------------------------------------------------------------

struct AugmentConfig {
  int crop_pad = 0;   // random crop: pad by crop_pad background pixels, crop back; 0 = off, 0..16
  bool flip = false;  // random horizontal flip with probability 1/2

  void validate() const;
};

// One sample's augmentation: the crop window's offset from the identity (shift_y, shift_x in
// [-crop_pad, crop_pad]; 0, 0 is the identity) and whether to mirror the result.
struct AugmentParams {
  int shift_y = 0;
  int shift_x = 0;
  bool flip = false;
};

// The params of dataset sample `index` in epoch `epoch`, from Rng(derive_seed(seed, augment, epoch,
// index)): shift_y, shift_x, flip drawn in that order whatever is enabled (disabled ones are then
// reset), so turning flips on does not change the crops.
AugmentParams draw_augment(const AugmentConfig& config, uint64_t seed, int64_t epoch,
                           int64_t index);

// The transform assemble_batch applies to one image (channels, height, width):
//   cropped(c, y, x) = src(c, y + shift_y, x + shift_x), or background[c] outside src;
//   dst(c, y, x) = flip ? cropped(c, y, width - 1 - x) : cropped(c, y, x).
// (Padding by crop_pad and cropping at offset crop_pad + shift is the same thing.) background:
// (channels) values; dst must not alias src.
void augment_image(const float* src, int channels, int height, int width,
                   const AugmentParams& params, const float* background, float* dst);

// Copies samples indices[0..batch_size) into images (batch_size, C, H, W) fp32 and labels
// (batch_size), applying the augmentation of (seed, epoch, index) to each. Throws on an index
// outside the dataset or a non-positive batch size.
void assemble_batch(const Dataset& data, const int64_t* indices, int64_t batch_size,
                    const AugmentConfig& augment, uint64_t seed, int64_t epoch, float* images,
                    int32_t* labels);

}  // namespace int4ddp::data
