// Dataset readers, synthetic data, normalisation, seeded order and batch assembly (dataset.h).
//
// Invariant: every byte of a dataset file is accounted for before a Dataset is returned. A file is
// read through ByteReader, which inflates a gzip stream to its end (so zlib checks the CRC and
// length trailer) and turns every short read, zlib error and trailing byte into an Error naming the
// file.
// Buffers grow as data actually arrives, so a header that claims a huge count cannot make us
// allocate more than the file holds.
#include "src/data/dataset.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <limits>
#include <sstream>
#include <system_error>
#include <utility>

#include "kernels/common/error.h"

namespace int4ddp::data {
namespace {

namespace fs = std::filesystem;

// Streams keyed by derive_seed(seed, domain, ...) never overlap between uses.
constexpr uint64_t kDomainShuffle = 1;
constexpr uint64_t kDomainAugment = 2;
constexpr uint64_t kDomainPrototype = 3;
constexpr uint64_t kDomainSample = 4;

constexpr int kMnistSide = 28;
constexpr int kMnistClasses = 10;
constexpr int kCifarSide = 32;
constexpr int kCifarChannels = 3;
constexpr int kCifarClasses = 10;
constexpr size_t kCifarRecordBytes = 1 + kCifarChannels * kCifarSide * kCifarSide;  // 3073
constexpr size_t kReadChunkBytes = size_t{8} << 20;  // buffers grow by at most this per read
constexpr int kMaxAugmentPad = 16;

std::string hex32(uint32_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << std::setw(8) << std::setfill('0') << v;
  return os.str();
}

uint32_t read_be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Reads a dataset file, gzip (detected by its 1f 8b magic) or plain. Every failure throws Error
// with the path.
//
// gzip goes through zlib's inflate rather than gzread: gzread reports a file cut inside the CRC and
// length trailer as a clean end of file when the last read ends exactly at the end of the data
// (zlib 1.2.13, seen on the real Fashion-MNIST file), and such a file must be an error. Here the
// data ends only at inflate's Z_STREAM_END, which comes after the trailer has been checked.
class ByteReader {
 public:
  explicit ByteReader(std::string path) : path_(std::move(path)) {
    std::error_code ec;
    const fs::file_status st = fs::status(path_, ec);
    INT4DDP_CHECK(fs::exists(st), "dataset file ", path_, ": no such file");
    INT4DDP_CHECK(!fs::is_directory(st), "dataset file ", path_, ": is a directory, not a file");
    file_ = std::fopen(path_.c_str(), "rb");
    if (file_ == nullptr) {
      const int err = errno;
      INT4DDP_FAIL("dataset file ", path_, ": cannot open (", std::strerror(err), ")");
    }
    uint8_t magic[2] = {0, 0};
    const size_t got = std::fread(magic, 1, 2, file_);
    check_file_error();
    std::rewind(file_);
    if (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
      // 16 + MAX_WBITS: a gzip wrapper only; inflate checks its header, CRC-32 and length.
      INT4DDP_CHECK(inflateInit2(&zs_, 16 + MAX_WBITS) == Z_OK, "dataset file ", path_,
                    ": cannot initialise zlib");
      gzip_ = true;
      in_buf_.resize(kInflateInputBytes);
    }
  }
  ~ByteReader() {
    if (gzip_) inflateEnd(&zs_);
    std::fclose(file_);
  }
  ByteReader(const ByteReader&) = delete;
  ByteReader& operator=(const ByteReader&) = delete;

  const std::string& path() const { return path_; }
  bool gzip() const { return gzip_; }

  // Reads up to n bytes; fewer only at the end of the (decompressed) data.
  size_t read_some(uint8_t* dst, size_t n) {
    if (!gzip_) {
      const size_t got = std::fread(dst, 1, n, file_);
      if (got < n) check_file_error();
      return got;
    }
    size_t total = 0;
    while (total < n) {
      const auto want = static_cast<uInt>(std::min<size_t>(n - total, 1u << 30));
      const size_t got = inflate_some(dst + total, want);
      total += got;
      if (got < want) break;
    }
    return total;
  }

  // Exactly n bytes of `what`, or an Error saying the file is truncated.
  void read_exact(uint8_t* dst, size_t n, const char* what) {
    const size_t got = read_some(dst, n);
    INT4DDP_CHECK(got == n, "dataset file ", path_, ": truncated: ", what, " needs ", n,
                  " bytes but the ", gzip_ ? "decompressed data ends" : "file ends", " after ",
                  got);
  }

  // Like read_exact into a vector that grows with the data read.
  std::vector<uint8_t> read_vector(size_t n, const char* what) {
    std::vector<uint8_t> out;
    while (out.size() < n) {
      const size_t have = out.size();
      const size_t want = std::min(n - have, kReadChunkBytes);
      out.resize(have + want);
      const size_t got = read_some(out.data() + have, want);
      INT4DDP_CHECK(got == want, "dataset file ", path_, ": truncated: ", what, " needs ", n,
                    " bytes but the ", gzip_ ? "decompressed data ends" : "file ends", " after ",
                    have + got);
    }
    return out;
  }

  // Everything up to the end of the (decompressed) data.
  std::vector<uint8_t> read_all() {
    std::vector<uint8_t> out;
    for (;;) {
      const size_t have = out.size();
      out.resize(have + kReadChunkBytes);
      const size_t got = read_some(out.data() + have, kReadChunkBytes);
      out.resize(have + got);
      if (got < kReadChunkBytes) return out;
    }
  }

  // The data must end here (for gzip: the stream and its trailer are complete and correct). Extra
  // data is read to its end first, so a corrupt gzip stream reports zlib's finding, and an
  // overlong file how many bytes too many it has.
  void expect_end(const char* after) {
    uint8_t byte = 0;
    if (read_some(&byte, 1) == 0) return;
    std::vector<uint8_t> scratch(size_t{1} << 16);
    uint64_t extra = 1;
    for (;;) {
      const size_t got = read_some(scratch.data(), scratch.size());
      extra += got;
      if (got < scratch.size()) break;
    }
    INT4DDP_FAIL("dataset file ", path_, ": ", extra, extra == 1 ? " byte" : " bytes",
                 " of unexpected data after ", after, " (the ",
                 gzip_ ? "decompressed data is" : "file is", " longer than its header says)");
  }

 private:
  static constexpr size_t kInflateInputBytes = size_t{1} << 17;

  void check_file_error() {
    if (std::ferror(file_)) {
      const int err = errno;
      INT4DDP_FAIL("dataset file ", path_, ": read error (", std::strerror(err), ")");
    }
  }

  // Tops up inflate's input; false at the end of the file.
  bool refill() {
    if (zs_.avail_in > 0) return true;
    const size_t got = std::fread(in_buf_.data(), 1, in_buf_.size(), file_);
    if (got < in_buf_.size()) check_file_error();
    zs_.next_in = in_buf_.data();
    zs_.avail_in = static_cast<uInt>(got);
    return got > 0;
  }

  // Inflates up to n bytes into dst; fewer only at the clean end of the last gzip member.
  size_t inflate_some(uint8_t* dst, uInt n) {
    zs_.next_out = dst;
    zs_.avail_out = n;
    while (zs_.avail_out > 0) {
      if (stream_end_) {
        // After a member: the end of the file, or another member (as gzip -d accepts).
        if (!refill()) break;
        INT4DDP_CHECK(zs_.next_in[0] == 0x1f, "dataset file ", path_,
                      ": unexpected bytes after the end of the gzip stream");
        inflateReset(&zs_);
        stream_end_ = false;
      }
      INT4DDP_CHECK(refill(), "dataset file ", path_,
                    ": truncated gzip stream (the file ends before the end of the compressed data "
                    "and its CRC/length trailer)");
      const int ret = inflate(&zs_, Z_NO_FLUSH);
      if (ret == Z_STREAM_END) {
        stream_end_ = true;
      } else if (ret != Z_OK && ret != Z_BUF_ERROR) {
        INT4DDP_FAIL("dataset file ", path_,
                     ": corrupt gzip data (zlib: ", zs_.msg != nullptr ? zs_.msg : zError(ret),
                     ")");
      }
    }
    return n - zs_.avail_out;
  }

  std::string path_;
  std::FILE* file_ = nullptr;
  bool gzip_ = false;
  z_stream zs_{};                // inflate state, gzip only
  std::vector<uint8_t> in_buf_;  // (kInflateInputBytes) compressed input, gzip only
  bool stream_end_ = false;      // inflate finished a member (trailer checked)
};

// Reads and checks an IDX header for uint8 data with `ndims` dimensions; returns the dims.
std::vector<uint32_t> read_idx_header(ByteReader& in, int ndims, const char* kind) {
  uint8_t magic_bytes[4];
  in.read_exact(magic_bytes, 4, "the IDX header");
  const uint32_t magic = read_be32(magic_bytes);
  const uint32_t expected = 0x00000800u | static_cast<uint32_t>(ndims);
  if (magic != expected) {
    std::string hint;
    if (magic == 0x00000801u) hint = "; this looks like an IDX labels file";
    if (magic == 0x00000803u) hint = "; this looks like an IDX images file";
    if (magic_bytes[0] == 0x1f && magic_bytes[1] == 0x8b) hint = "; nested gzip?";
    INT4DDP_FAIL("dataset file ", in.path(), ": bad magic ", hex32(magic), ", expected ",
                 hex32(expected), " (IDX ", kind, ": uint8, ", ndims, " dimension",
                 ndims == 1 ? "" : "s", ")", hint);
  }
  std::vector<uint8_t> dim_bytes(4 * static_cast<size_t>(ndims));
  in.read_exact(dim_bytes.data(), dim_bytes.size(), "the IDX header");
  std::vector<uint32_t> dims(static_cast<size_t>(ndims));
  for (int d = 0; d < ndims; ++d) dims[static_cast<size_t>(d)] = read_be32(&dim_bytes[4 * d]);
  return dims;
}

// pixel / 255 for every byte value, so the conversion is one exact division per value.
const float* byte_to_unit_table() {
  static const auto table = [] {
    std::vector<float> t(256);
    for (int v = 0; v < 256; ++v) t[static_cast<size_t>(v)] = static_cast<float>(v) / 255.0f;
    return t;
  }();
  return table.data();
}

bool is_train_split(const std::string& split) {
  if (split == "train") return true;
  if (split == "test") return false;
  INT4DDP_FAIL("unknown dataset split '", split, "' (expected train or test)");
}

// The plain file if present, else the .gz one, else an Error naming both.
std::string find_idx_file(const std::string& dir, const std::string& base,
                          const std::string& split) {
  const fs::path plain = fs::path(dir) / base;
  const fs::path gz = fs::path(dir) / (base + ".gz");
  std::error_code ec;
  if (fs::exists(plain, ec)) return plain.string();
  if (fs::exists(gz, ec)) return gz.string();
  const bool dir_exists = fs::is_directory(dir, ec);
  INT4DDP_FAIL("Fashion-MNIST ", split, " split: missing file ", plain.string(), "[.gz]",
               dir_exists ? "" : " (the directory does not exist)",
               "; install the Debian package dataset-fashion-mnist (it fills ", kFashionMnistDir,
               ") or point the data directory at the IDX files");
}

// One bump of a synthetic prototype: amp * max(0, 1 - d^2 / r^2)^2 around (cy, cx). Polynomial,
// so every platform computes the same floats.
struct Bump {
  float cy, cx, inv_r2, amp;
};

constexpr int kBumpsPerPrototype = 3;

float prototype_value(const Bump* bumps, float y, float x) {
  float v = 0.0f;
  for (int k = 0; k < kBumpsPerPrototype; ++k) {
    const float dy = y - bumps[k].cy;
    const float dx = x - bumps[k].cx;
    const float t = 1.0f - (dy * dy + dx * dx) * bumps[k].inv_r2;
    if (t > 0.0f) v += bumps[k].amp * t * t;
  }
  return std::min(v, 1.0f);
}

}  // namespace

// ---- Dataset ------------------------------------------------------------------------------------

ChannelStats fashion_mnist_stats() { return ChannelStats{{0.2860f}, {0.3530f}}; }

float Dataset::background(int channel) const {
  INT4DDP_CHECK(channel >= 0 && channel < channels, "dataset ", name, ": channel ", channel,
                " outside 0..", channels - 1);
  if (!normalized()) return 0.0f;
  const auto c = static_cast<size_t>(channel);
  return (0.0f - normalization.mean[c]) / normalization.stddev[c];
}

void Dataset::validate() const {
  INT4DDP_CHECK(count >= 0, "dataset ", name, ": negative count ", count);
  INT4DDP_CHECK(channels > 0 && height > 0 && width > 0, "dataset ", name, ": bad image shape ",
                channels, "x", height, "x", width);
  INT4DDP_CHECK(num_classes > 0, "dataset ", name, ": num_classes ", num_classes, " must be > 0");
  INT4DDP_CHECK(static_cast<int64_t>(images.size()) == count * image_numel(), "dataset ", name,
                ": ", images.size(), " image values for ", count, " images of ", image_numel());
  INT4DDP_CHECK(static_cast<int64_t>(labels.size()) == count, "dataset ", name, ": ", labels.size(),
                " labels for ", count, " images");
  for (size_t i = 0; i < labels.size(); ++i) {
    INT4DDP_CHECK(labels[i] >= 0 && labels[i] < num_classes, "dataset ", name, ": label ",
                  labels[i], " of sample ", i, " outside 0..", num_classes - 1);
  }
  const size_t c = static_cast<size_t>(channels);
  INT4DDP_CHECK(normalization.mean.size() == normalization.stddev.size() &&
                    (normalization.mean.empty() || normalization.mean.size() == c),
                "dataset ", name, ": normalisation has ", normalization.mean.size(), " means and ",
                normalization.stddev.size(), " stddevs for ", channels, " channels");
}

// ---- readers ------------------------------------------------------------------------------------

Dataset load_mnist_idx(const std::string& images_path, const std::string& labels_path) {
  // Both headers first: disagreeing files fail before tens of MB are decompressed.
  ByteReader images_in(images_path);
  const std::vector<uint32_t> image_dims = read_idx_header(images_in, 3, "images");
  ByteReader labels_in(labels_path);
  const std::vector<uint32_t> label_dims = read_idx_header(labels_in, 1, "labels");

  const uint32_t count = image_dims[0];
  INT4DDP_CHECK(image_dims[1] == kMnistSide && image_dims[2] == kMnistSide, "dataset file ",
                images_path, ": images are ", image_dims[1], "x", image_dims[2], ", expected ",
                kMnistSide, "x", kMnistSide);
  INT4DDP_CHECK(count > 0, "dataset file ", images_path, ": holds 0 images");
  INT4DDP_CHECK(label_dims[0] == count, "dataset file ", labels_path, ": holds ", label_dims[0],
                " labels but ", images_path, " holds ", count, " images");

  const size_t numel = size_t{kMnistSide} * kMnistSide;
  const std::vector<uint8_t> pixels = images_in.read_vector(count * numel, "the pixels");
  images_in.expect_end("the pixels");
  const std::vector<uint8_t> label_bytes = labels_in.read_vector(count, "the labels");
  labels_in.expect_end("the labels");

  Dataset data;
  data.name = images_path;
  data.count = count;
  data.channels = 1;
  data.height = kMnistSide;
  data.width = kMnistSide;
  data.num_classes = kMnistClasses;
  data.labels.resize(count);
  for (size_t i = 0; i < count; ++i) {
    INT4DDP_CHECK(label_bytes[i] < kMnistClasses, "dataset file ", labels_path, ": label ",
                  int{label_bytes[i]}, " at index ", i, " is outside 0..", kMnistClasses - 1);
    data.labels[i] = label_bytes[i];
  }
  const float* to_unit = byte_to_unit_table();
  data.images.resize(pixels.size());
  for (size_t i = 0; i < pixels.size(); ++i) data.images[i] = to_unit[pixels[i]];
  data.validate();
  return data;
}

Dataset load_fashion_mnist(const std::string& dir, const std::string& split) {
  const std::string prefix = is_train_split(split) ? "train" : "t10k";
  const std::string images = find_idx_file(dir, prefix + "-images-idx3-ubyte", split);
  const std::string labels = find_idx_file(dir, prefix + "-labels-idx1-ubyte", split);
  Dataset data = load_mnist_idx(images, labels);
  data.name = "fashion_mnist:" + split;
  return data;
}

Dataset load_cifar10_files(const std::vector<std::string>& paths) {
  INT4DDP_CHECK(!paths.empty(), "CIFAR-10: no batch files given");
  Dataset data;
  data.name =
      paths.size() == 1 ? paths[0] : paths[0] + " (+" + std::to_string(paths.size() - 1) + " more)";
  data.channels = kCifarChannels;
  data.height = kCifarSide;
  data.width = kCifarSide;
  data.num_classes = kCifarClasses;
  const size_t numel = kCifarRecordBytes - 1;
  const float* to_unit = byte_to_unit_table();
  for (const std::string& path : paths) {
    ByteReader in(path);
    const std::vector<uint8_t> bytes = in.read_all();
    INT4DDP_CHECK(!bytes.empty() && bytes.size() % kCifarRecordBytes == 0, "dataset file ", path,
                  ": ", bytes.size(), " bytes is not a whole number of ", kCifarRecordBytes,
                  "-byte CIFAR-10 records (1 label byte + 3x32x32 pixels)",
                  bytes.empty() ? "" : "; truncated or not a CIFAR-10 binary batch");
    const size_t records = bytes.size() / kCifarRecordBytes;
    const size_t first_value = data.images.size();
    data.images.resize(first_value + records * numel);
    for (size_t r = 0; r < records; ++r) {
      const uint8_t* rec = &bytes[r * kCifarRecordBytes];
      INT4DDP_CHECK(rec[0] < kCifarClasses, "dataset file ", path, ": record ", r, " has label ",
                    int{rec[0]}, ", outside 0..", kCifarClasses - 1);
      data.labels.push_back(rec[0]);
      float* dst = &data.images[first_value + r * numel];
      for (size_t i = 0; i < numel; ++i) dst[i] = to_unit[rec[1 + i]];
    }
  }
  data.count = static_cast<int64_t>(data.labels.size());
  data.validate();
  return data;
}

Dataset load_cifar10(const std::string& dir, const std::string& split) {
  std::vector<std::string> paths;
  if (is_train_split(split)) {
    for (int b = 1; b <= 5; ++b) {
      paths.push_back((fs::path(dir) / ("data_batch_" + std::to_string(b) + ".bin")).string());
    }
  } else {
    paths.push_back((fs::path(dir) / "test_batch.bin").string());
  }
  Dataset data = load_cifar10_files(paths);
  data.name = "cifar10:" + split;
  return data;
}

// ---- synthetic data -----------------------------------------------------------------------------

void SyntheticConfig::validate() const {
  INT4DDP_CHECK(train_count >= 1 && train_count <= (int64_t{1} << 27),
                "synthetic data: train_count ", train_count, " outside 1..2^27");
  INT4DDP_CHECK(test_count >= 1 && test_count <= (int64_t{1} << 27), "synthetic data: test_count ",
                test_count, " outside 1..2^27");
  INT4DDP_CHECK(num_classes >= 2 && num_classes <= 256, "synthetic data: num_classes ", num_classes,
                " outside 2..256");
  INT4DDP_CHECK(channels >= 1 && channels <= 16, "synthetic data: channels ", channels,
                " outside 1..16");
  INT4DDP_CHECK(height >= 8 && height <= 1024, "synthetic data: height ", height,
                " outside 8..1024");
  INT4DDP_CHECK(width >= 8 && width <= 1024, "synthetic data: width ", width, " outside 8..1024");
  INT4DDP_CHECK(noise >= 0.0f && noise <= 2.0f, "synthetic data: noise ", noise, " outside [0, 2]");
  INT4DDP_CHECK(max_shift >= 0 && max_shift <= 8, "synthetic data: max_shift ", max_shift,
                " outside 0..8");
}

Dataset make_synthetic(const SyntheticConfig& config, const std::string& split) {
  config.validate();
  const bool train = is_train_split(split);
  const uint64_t stream = train ? 0 : 1;

  const auto classes = static_cast<size_t>(config.num_classes);
  const auto channels = static_cast<size_t>(config.channels);
  const float h = static_cast<float>(config.height);
  const float w = static_cast<float>(config.width);
  const float side = std::min(h, w);
  std::vector<Bump> bumps(classes * channels * kBumpsPerPrototype);  // (class, channel, bump)
  for (size_t k = 0; k < classes; ++k) {
    for (size_t c = 0; c < channels; ++c) {
      Rng rng(derive_seed(config.seed, kDomainPrototype, k, c));
      for (int b = 0; b < kBumpsPerPrototype; ++b) {
        Bump& bump = bumps[(k * channels + c) * kBumpsPerPrototype + static_cast<size_t>(b)];
        bump.cy = h * (0.2f + 0.6f * rng.uniform());
        bump.cx = w * (0.2f + 0.6f * rng.uniform());
        const float r = side * (0.12f + 0.12f * rng.uniform());
        bump.inv_r2 = 1.0f / (r * r);
        bump.amp = 0.6f + 0.4f * rng.uniform();
      }
    }
  }

  Dataset data;
  data.name = "synthetic:" + split;
  data.count = train ? config.train_count : config.test_count;
  data.channels = config.channels;
  data.height = config.height;
  data.width = config.width;
  data.num_classes = config.num_classes;
  data.images.resize(static_cast<size_t>(data.count * data.image_numel()));
  data.labels.resize(static_cast<size_t>(data.count));
  const auto shifts = static_cast<uint64_t>(2 * config.max_shift + 1);
  constexpr float kSqrt3 = 1.7320508f;  // sum of 4 uniforms has variance 1/3
  for (int64_t i = 0; i < data.count; ++i) {
    Rng rng(derive_seed(config.seed, kDomainSample, stream, static_cast<uint64_t>(i)));
    const auto label = static_cast<size_t>(rng.below(classes));
    const int shift_y = static_cast<int>(rng.below(shifts)) - config.max_shift;
    const int shift_x = static_cast<int>(rng.below(shifts)) - config.max_shift;
    const float brightness = 0.7f + 0.3f * rng.uniform();
    data.labels[static_cast<size_t>(i)] = static_cast<int32_t>(label);
    float* dst = &data.images[static_cast<size_t>(i * data.image_numel())];
    for (size_t c = 0; c < channels; ++c) {
      const Bump* proto = &bumps[(label * channels + c) * kBumpsPerPrototype];
      for (int y = 0; y < config.height; ++y) {
        for (int x = 0; x < config.width; ++x) {
          const float clean = brightness * prototype_value(proto, static_cast<float>(y - shift_y),
                                                           static_cast<float>(x - shift_x));
          const float u = rng.uniform() + rng.uniform() + rng.uniform() + rng.uniform();
          const float v = clean + config.noise * ((u - 2.0f) * kSqrt3);
          *dst++ = std::min(std::max(v, 0.0f), 1.0f);
        }
      }
    }
  }
  data.validate();
  return data;
}

// ---- normalisation ------------------------------------------------------------------------------

ChannelStats compute_channel_stats(const Dataset& data) {
  data.validate();
  INT4DDP_CHECK(data.count > 0, "dataset ", data.name, ": no images to compute statistics of");
  INT4DDP_CHECK(!data.normalized(), "dataset ", data.name,
                ": already normalised; compute statistics on the raw data");
  const auto channels = static_cast<size_t>(data.channels);
  const auto plane = static_cast<size_t>(data.height) * static_cast<size_t>(data.width);
  const auto count = static_cast<size_t>(data.count);
  std::vector<double> sum(channels, 0.0);
  for (size_t i = 0; i < count; ++i) {
    for (size_t c = 0; c < channels; ++c) {
      const float* p = &data.images[(i * channels + c) * plane];
      for (size_t k = 0; k < plane; ++k) sum[c] += p[k];
    }
  }
  const double n = static_cast<double>(count * plane);
  std::vector<double> mean(channels);
  for (size_t c = 0; c < channels; ++c) mean[c] = sum[c] / n;
  std::vector<double> sq(channels, 0.0);  // second pass: no cancellation from E[x^2] - E[x]^2
  for (size_t i = 0; i < count; ++i) {
    for (size_t c = 0; c < channels; ++c) {
      const float* p = &data.images[(i * channels + c) * plane];
      for (size_t k = 0; k < plane; ++k) {
        const double d = p[k] - mean[c];
        sq[c] += d * d;
      }
    }
  }
  ChannelStats stats;
  for (size_t c = 0; c < channels; ++c) {
    stats.mean.push_back(static_cast<float>(mean[c]));
    stats.stddev.push_back(static_cast<float>(std::sqrt(sq[c] / n)));
  }
  return stats;
}

void normalize(Dataset& data, const ChannelStats& stats) {
  data.validate();
  INT4DDP_CHECK(!data.normalized(), "dataset ", data.name, ": already normalised");
  const auto channels = static_cast<size_t>(data.channels);
  INT4DDP_CHECK(stats.mean.size() == channels && stats.stddev.size() == channels, "dataset ",
                data.name, ": normalisation has ", stats.mean.size(), " means and ",
                stats.stddev.size(), " stddevs for ", channels, " channels");
  for (size_t c = 0; c < channels; ++c) {
    INT4DDP_CHECK(
        std::isfinite(stats.mean[c]) && std::isfinite(stats.stddev[c]) && stats.stddev[c] > 0.0f,
        "dataset ", data.name, ": channel ", c, " has mean ", stats.mean[c], " and stddev ",
        stats.stddev[c], "; the stddev must be finite and > 0");
  }
  const auto plane = static_cast<size_t>(data.height) * static_cast<size_t>(data.width);
  for (size_t i = 0; i < static_cast<size_t>(data.count); ++i) {
    for (size_t c = 0; c < channels; ++c) {
      float* p = &data.images[(i * channels + c) * plane];
      const float m = stats.mean[c];
      const float s = stats.stddev[c];
      for (size_t k = 0; k < plane; ++k) p[k] = (p[k] - m) / s;
    }
  }
  data.normalization = stats;
}

// ---- seeded order and sharding ------------------------------------------------------------------

uint64_t derive_seed(uint64_t seed, uint64_t domain, uint64_t a, uint64_t b) {
  uint64_t h = Rng(seed).next();
  h = Rng(h ^ domain).next();
  h = Rng(h ^ a).next();
  return Rng(h ^ b).next();
}

std::vector<int64_t> epoch_permutation(int64_t count, uint64_t seed, int64_t epoch) {
  INT4DDP_CHECK(count >= 0, "epoch_permutation: negative count ", count);
  std::vector<int64_t> perm(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) perm[static_cast<size_t>(i)] = i;
  Rng rng(derive_seed(seed, kDomainShuffle, static_cast<uint64_t>(epoch), 0));
  for (int64_t i = count - 1; i > 0; --i) {
    const auto j = rng.below(static_cast<uint64_t>(i) + 1);
    std::swap(perm[static_cast<size_t>(i)], perm[j]);
  }
  return perm;
}

int64_t shard_size(int64_t count, int world_size) {
  INT4DDP_CHECK(world_size >= 1, "data sharding: world size ", world_size, " must be >= 1");
  INT4DDP_CHECK(count >= 0, "data sharding: negative sample count ", count);
  return count / world_size;
}

std::vector<int64_t> shard(const std::vector<int64_t>& perm, int rank, int world_size) {
  const int64_t per_rank = shard_size(static_cast<int64_t>(perm.size()), world_size);
  INT4DDP_CHECK(rank >= 0 && rank < world_size, "data sharding: rank ", rank, " outside 0..",
                world_size - 1);
  INT4DDP_CHECK(per_rank >= 1, "data sharding: an epoch of ", perm.size(),
                " samples cannot give each of ", world_size, " ranks a sample");
  std::vector<int64_t> out(static_cast<size_t>(per_rank));
  for (int64_t k = 0; k < per_rank; ++k) {
    out[static_cast<size_t>(k)] = perm[static_cast<size_t>(k * world_size + rank)];
  }
  return out;
}

// ---- batch assembly -----------------------------------------------------------------------------

void AugmentConfig::validate() const {
  INT4DDP_CHECK(crop_pad >= 0 && crop_pad <= kMaxAugmentPad, "augmentation: crop_pad ", crop_pad,
                " outside 0..", kMaxAugmentPad);
}

AugmentParams draw_augment(const AugmentConfig& config, uint64_t seed, int64_t epoch,
                           int64_t index) {
  config.validate();
  Rng rng(derive_seed(seed, kDomainAugment, static_cast<uint64_t>(epoch),
                      static_cast<uint64_t>(index)));
  const auto window = static_cast<uint64_t>(2 * config.crop_pad + 1);
  AugmentParams params;
  params.shift_y = static_cast<int>(rng.below(window)) - config.crop_pad;
  params.shift_x = static_cast<int>(rng.below(window)) - config.crop_pad;
  params.flip = (rng.next() >> 63) != 0 && config.flip;
  return params;
}

void augment_image(const float* src, int channels, int height, int width,
                   const AugmentParams& params, const float* background, float* dst) {
  for (int c = 0; c < channels; ++c) {
    const float* in = src + static_cast<size_t>(c) * height * width;
    float* out = dst + static_cast<size_t>(c) * height * width;
    for (int y = 0; y < height; ++y) {
      const int sy = y + params.shift_y;
      float* row = out + static_cast<size_t>(y) * width;
      if (sy < 0 || sy >= height) {
        std::fill(row, row + width, background[c]);
        continue;
      }
      const float* in_row = in + static_cast<size_t>(sy) * width;
      for (int x = 0; x < width; ++x) {
        const int sx = (params.flip ? width - 1 - x : x) + params.shift_x;
        row[x] = sx >= 0 && sx < width ? in_row[sx] : background[c];
      }
    }
  }
}

void assemble_batch(const Dataset& data, const int64_t* indices, int64_t batch_size,
                    const AugmentConfig& augment, uint64_t seed, int64_t epoch, float* images,
                    int32_t* labels) {
  augment.validate();
  INT4DDP_CHECK(batch_size > 0, "assemble_batch: batch size ", batch_size, " must be > 0");
  INT4DDP_CHECK(indices != nullptr && images != nullptr && labels != nullptr,
                "assemble_batch: null buffer");
  const auto numel = static_cast<size_t>(data.image_numel());
  INT4DDP_CHECK(data.images.size() == static_cast<size_t>(data.count) * numel &&
                    data.labels.size() == static_cast<size_t>(data.count),
                "assemble_batch: dataset ", data.name, " is inconsistent");
  std::vector<float> background(static_cast<size_t>(data.channels));
  for (int c = 0; c < data.channels; ++c) background[static_cast<size_t>(c)] = data.background(c);
  const bool augmenting = augment.crop_pad > 0 || augment.flip;
  for (int64_t b = 0; b < batch_size; ++b) {
    const int64_t index = indices[b];
    INT4DDP_CHECK(index >= 0 && index < data.count, "assemble_batch: entry ", b, " is sample ",
                  index, ", outside dataset ", data.name, " of ", data.count, " samples");
    const float* src = &data.images[static_cast<size_t>(index) * numel];
    float* dst = images + static_cast<size_t>(b) * numel;
    labels[b] = data.labels[static_cast<size_t>(index)];
    if (!augmenting) {
      std::copy(src, src + numel, dst);
      continue;
    }
    const AugmentParams params = draw_augment(augment, seed, epoch, index);
    augment_image(src, data.channels, data.height, data.width, params, background.data(), dst);
  }
}

}  // namespace int4ddp::data
