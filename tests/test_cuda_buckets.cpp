// The BucketEngine on a device gradient arena (label cuda; skipped without a GPU) against the host
// engine on the same gradients: the staged path (pinned host mirror, host two-shot) bit for bit
// with every policy, the device path over NCCL (one rank) bit for bit as the device two-shot is
// with the host one, checkpoint blobs interchangeable between the paths, and the hand-off from the
// compute stream: every tensor is written on a non-blocking stream behind a delay and announced at
// once, so an engine that read a bucket before its event would see NaN.
//
// With one process the staged path runs over the local communicator; under mpirun (N ranks, which
// may share one GPU: experiments/gpu_check.sh runs it with 2) over MPI. NCCL needs one GPU per
// rank and is tested with one rank.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/buckets.h"
#include "comm/communicator.h"
#include "cuda_test.h"
#include "kernels/common/error.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#ifdef INT4DDP_HAVE_NCCL
#include "comm/nccl_communicator.h"
#endif

namespace int4ddp::comm {
namespace {

// A, B, [gap], C1, C2, D, E (tests/test_comm_buckets.cpp): buckets E | D C2 C1 B | A, with plain
// tensors B and D. Variant split: C1 D C2, so bucket 1's two-shot runs on a staging copy.
std::vector<Segment> tensors(bool split) {
  if (split) return {{0, 3000}, {3000, 100}, {3110, 2000}, {5110, 50}, {5160, 1900}, {7060, 5000}};
  return {{0, 3000}, {3000, 100}, {3110, 2000}, {5110, 1900}, {7010, 50}, {7060, 5000}};
}
constexpr int64_t kArena = 12060;

bool is_plain(const Segment& s) { return s.count < 1000; }

BucketConfig config(int bits, quant::PolicyKind policy) {
  BucketConfig c;
  c.bucket_mb = 4096.0 * 4 / 1048576.0;
  c.small_tensor_threshold = 1000;
  c.compress.bits = bits;
  c.compress.block_size = 64;
  c.compress.policy.kind = policy;
  c.compress.seed = 9;
  return c;
}

// The bits cudaMemset(0xFF) leaves: what the arena holds where nothing wrote (the gap, and every
// tensor before backward writes it).
float unwritten() {
  const uint32_t bits = 0xFFFFFFFFu;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rank r's gradients at step t: off-grid values (a few outliers) for compressed tensors, integers
// for the plain ones (their fp32 mean is exact in any summation order, NCCL's included).
std::vector<float> gradients(const std::vector<Segment>& segs, int rank, uint32_t t) {
  std::vector<float> g(static_cast<size_t>(kArena), unwritten());
  std::mt19937_64 rng(1000003ull * t + 7919ull * static_cast<uint64_t>(rank) + 1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Segment& s : segs)
    for (int64_t i = s.offset; i < s.offset + s.count; ++i)
      g[static_cast<size_t>(i)] = is_plain(s)
                                      ? static_cast<float>(static_cast<int>(rng() % 41) - 20)
                                      : normal(rng) * (rng() % 64 == 0 ? 20.0f : 1.0f);
  return g;
}

int64_t count_wrong(const std::vector<float>& got, const std::vector<float>& want) {
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += std::memcmp(&got[i], &want[i], 4) != 0 ? 1 : 0;
  return wrong;
}

void delay(void*) { std::this_thread::sleep_for(std::chrono::milliseconds(2)); }

// A device gradient arena with its own non-blocking compute stream.
class DeviceArena {
 public:
  DeviceArena() {
    INT4DDP_CUDA_CHECK(cudaMalloc(&d_, kArena * sizeof(float)));
    INT4DDP_CUDA_CHECK(cudaMallocHost(&pinned_, kArena * sizeof(float)));
    INT4DDP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~DeviceArena() {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
    cudaFreeHost(pinned_);
    cudaFree(d_);
  }
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  GradArena arena() { return GradArena{d_, true, stream_}; }

  // One step as a GPU backward runs it: the arena starts unwritten; each tensor, last to first,
  // is copied in on the compute stream behind a host-side delay and announced by ready_from at
  // once, with no synchronisation.
  StepCommStats step(BucketEngine& e, const std::vector<Segment>& segs, const std::vector<float>& g,
                     uint32_t t) {
    INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));  // pinned_ is free again
    std::memcpy(pinned_, g.data(), kArena * sizeof(float));
    INT4DDP_CUDA_CHECK(cudaMemsetAsync(d_, 0xFF, kArena * sizeof(float), stream_));
    e.begin_step(t);
    for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
      INT4DDP_CUDA_CHECK(cudaLaunchHostFunc(stream_, delay, nullptr));
      INT4DDP_CUDA_CHECK(cudaMemcpyAsync(d_ + it->offset, pinned_ + it->offset,
                                         static_cast<size_t>(it->count) * sizeof(float),
                                         cudaMemcpyHostToDevice, stream_));
      e.ready_from(it->offset);
    }
    return e.finish();
  }

  std::vector<float> download() {
    std::vector<float> h(static_cast<size_t>(kArena));
    INT4DDP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    INT4DDP_CUDA_CHECK(cudaMemcpy(h.data(), d_, kArena * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  float* d_ = nullptr;
  float* pinned_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

StepCommStats host_step(BucketEngine& e, const std::vector<Segment>& segs, std::vector<float>& a,
                        const std::vector<float>& g, uint32_t t) {
  a = g;
  e.begin_step(t);
  for (auto it = segs.rbegin(); it != segs.rend(); ++it) e.ready_from(it->offset);
  return e.finish();
}

std::unique_ptr<Communicator> world() {
  return launched_with_multiple_ranks() ? make_mpi_communicator() : make_local_communicator();
}

// Runs `steps` steps (the third one dropped by commit(false), as a skipped step) on the host
// engine over `host` and the device engine over `device` with the same gradients, comparing every
// result bit, the stats and the checkpoint blobs. first_step: the step number of the first one.
void compare_engines(BucketEngine& he, std::vector<float>& ha, BucketEngine& de, DeviceArena& da,
                     const std::vector<Segment>& segs, int rank, uint32_t first_step, int steps) {
  for (uint32_t t = first_step; t < first_step + static_cast<uint32_t>(steps); ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    const std::vector<float> g = gradients(segs, rank, t);
    const StepCommStats hs = host_step(he, segs, ha, g, t);
    const StepCommStats ds = da.step(de, segs, g, t);
    const bool apply = t != first_step + 2;
    he.commit(apply);
    de.commit(apply);
    EXPECT_EQ(count_wrong(da.download(), ha), 0);
    EXPECT_EQ(ds.gammas, hs.gammas);
    EXPECT_EQ(ds.clipped, hs.clipped);
    EXPECT_EQ(ds.quantized, hs.quantized);
    EXPECT_EQ(ds.nonfinite, 0);
    EXPECT_EQ(ds.compressed_elements, hs.compressed_elements);
    EXPECT_EQ(ds.plain_elements, hs.plain_elements);
  }
  EXPECT_EQ(de.save_state(), he.save_state());
}

struct Setting {
  int bits;
  quant::PolicyKind policy;
};

std::string describe(const Setting& s, bool split) {
  return "bits " + std::to_string(s.bits) + " policy " + quant::policy_kind_name(s.policy) +
         (split ? " (staging copy)" : " (in place)");
}

// Every setting, in place and through a staging copy: the host engine over `host` and the device
// engine over `device` on the same gradients.
void compare_settings(Communicator& host, Communicator& device, const std::vector<Setting>& all,
                      BucketPath path) {
  for (const Setting& s : all)
    for (bool split : {false, true}) {
      SCOPED_TRACE(describe(s, split));
      const std::vector<Segment> segs = tensors(split);
      std::vector<float> ha(static_cast<size_t>(kArena));
      BucketEngine he(host, config(s.bits, s.policy), ha.data(), segs);
      DeviceArena da;
      BucketEngine de(device, config(s.bits, s.policy), da.arena(), segs);
      EXPECT_EQ(de.path(), path);
      EXPECT_EQ(de.num_buckets(), he.num_buckets());
      compare_engines(he, ha, de, da, segs, host.rank(), 0, 5);
    }
}

TEST(CudaBuckets, StagedMatchesHostEngine) {
  REQUIRE_GPU();
  auto comm = world();
  compare_settings(*comm, *comm,
                   {{4, quant::PolicyKind::kLbt},
                    {4, quant::PolicyKind::kTopK},
                    {8, quant::PolicyKind::kMinMax},
                    {kFp32Bits, quant::PolicyKind::kMinMax}},
                   BucketPath::kStaged);
}

// Two host steps, their state loaded into a device engine over `device` (host -> device), four
// steps of both, then the device engine's state loaded into a fresh host engine (device -> host)
// and three more steps of both: the same bits throughout.
void checkpoint_round_trip(Communicator& host, Communicator& device, bool split, BucketPath path) {
  const std::vector<Segment> segs = tensors(split);
  const BucketConfig cfg = config(4, quant::PolicyKind::kLbt);
  const int rank = host.rank();
  std::vector<float> ha(static_cast<size_t>(kArena));
  BucketEngine he(host, cfg, ha.data(), segs);
  for (uint32_t t = 0; t < 2; ++t) {
    host_step(he, segs, ha, gradients(segs, rank, t), t);
    he.commit(true);
  }
  DeviceArena da;
  BucketEngine de(device, cfg, da.arena(), segs);
  EXPECT_EQ(de.path(), path);
  de.load_state(he.save_state());
  EXPECT_EQ(de.save_state(), he.save_state());
  compare_engines(he, ha, de, da, segs, rank, 2, 4);
  std::vector<float> ha2(static_cast<size_t>(kArena));
  BucketEngine he2(host, cfg, ha2.data(), segs);
  he2.load_state(de.save_state());
  compare_engines(he2, ha2, de, da, segs, rank, 6, 3);
}

TEST(CudaBuckets, CheckpointBlobsMoveBetweenHostAndStaged) {
  REQUIRE_GPU();
  auto comm = world();
  checkpoint_round_trip(*comm, *comm, false, BucketPath::kStaged);
}

#ifdef INT4DDP_HAVE_NCCL
TEST(CudaBuckets, NcclMatchesHostEngine) {
  REQUIRE_GPU();
  if (launched_with_multiple_ranks()) GTEST_SKIP() << "NCCL is tested with one rank";
  auto host = make_local_communicator();
  auto nccl = make_nccl_communicator();
  compare_settings(*host, *nccl,
                   {{4, quant::PolicyKind::kLbt},
                    {4, quant::PolicyKind::kMinMax},
                    {4, quant::PolicyKind::kTopK},
                    {8, quant::PolicyKind::kMse},
                    {8, quant::PolicyKind::kFixed},
                    {kFp32Bits, quant::PolicyKind::kMinMax}},
                   BucketPath::kDevice);
}

TEST(CudaBuckets, NcclCheckpointBlobsMoveBetweenHostAndDevice) {
  REQUIRE_GPU();
  if (launched_with_multiple_ranks()) GTEST_SKIP() << "NCCL is tested with one rank";
  auto host = make_local_communicator();
  auto nccl = make_nccl_communicator();
  checkpoint_round_trip(*host, *nccl, true, BucketPath::kDevice);
}

TEST(CudaBuckets, NcclRefusesHostArenas) {
  REQUIRE_GPU();
  if (launched_with_multiple_ranks()) GTEST_SKIP() << "NCCL is tested with one rank";
  auto nccl = make_nccl_communicator();
  const std::vector<Segment> segs = tensors(false);
  std::vector<float> ha(static_cast<size_t>(kArena));
  try {
    BucketEngine e(*nccl, config(4, quant::PolicyKind::kLbt), ha.data(), segs);
    FAIL() << "host arena accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("device buffers"), std::string::npos) << e.what();
  }
}
#endif

}  // namespace
}  // namespace int4ddp::comm
