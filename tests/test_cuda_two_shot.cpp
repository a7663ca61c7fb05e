// The device two-shot all-reduce against the host one (comm/two_shot.h) for the same inputs,
// keys and state, over every device transport: the pinned-host staging adapter over the local
// communicator, over MPI (any number of ranks: run under mpirun with 2 and 4 ranks sharing one GPU
// by experiments/gpu_check.sh), and NCCL with one rank; the NCCL communicator's collectives; and
// NCCL failures surfacing as Errors. Results must be equal bit for bit, state blobs included.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/staged_communicator.h"
#include "comm/two_shot.h"
#include "comm/two_shot_cuda.h"
#include "cuda_test.h"
#include "kernels/common/error.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#ifdef INT4DDP_HAVE_NCCL
#include "comm/nccl_communicator.h"
#endif

namespace int4ddp::comm {
namespace {

std::vector<float> make_grad(int64_t n, uint64_t seed, bool with_nan) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = normal(rng) * (rng() % 50 == 0 ? 30.0f : 1.0f);
  if (with_nan && n > 2) x[static_cast<size_t>(n / 2)] = std::numeric_limits<float>::quiet_NaN();
  return x;
}

// Index of the first element whose bits differ, or -1. Two NaNs count as equal whatever their
// payloads: IEEE leaves the payload of an operation on a NaN to the implementation (x / 1 keeps
// the host's 0x7fc00000 but gives the GPU's canonical 0x7fffffff), and a bucket with a NaN is
// never applied (the step is skipped), so only "it is NaN" is part of the contract.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

struct Case {
  int bits;
  int64_t count, block_size;
  bool worker_ef, server_ef;
  quant::Rounding rounding;
  quant::PolicyKind policy = quant::PolicyKind::kLbt;  // comm.grad_policy
  int topk = 4;
};

std::string describe(const Case& c) {
  std::ostringstream os;
  os << "bits=" << c.bits << " n=" << c.count << " G=" << c.block_size << " ew=" << c.worker_ef
     << " es=" << c.server_ef << " rounding=" << static_cast<int>(c.rounding)
     << " policy=" << quant::policy_kind_name(c.policy) << " topk=" << c.topk;
  return os.str();
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {4, 100000, 512, true, true, quant::Rounding::kStochastic},
      {4, 512 * 7 + 5, 512, true, false, quant::Rounding::kNearest},
      {8, 33333, 256, false, true, quant::Rounding::kStochastic},
      {4, 20001, 6, true, true, quant::Rounding::kStochastic},  // general kernels, odd chunks
      {2, 777, 4096, true, true, quant::Rounding::kStochastic},
      {4, 3, 512, true, true, quant::Rounding::kStochastic},  // fewer blocks than ranks
      {4, 0, 512, true, true, quant::Rounding::kStochastic},
      {32, 12345, 512, false, false, quant::Rounding::kStochastic},  // fp32 mode
      // topk (the default comm.grad_policy): per-block clips on the device
      {4, 100000, 512, true, true, quant::Rounding::kStochastic, quant::PolicyKind::kTopK, 4},
      {4, 512 * 7 + 5, 512, true, false, quant::Rounding::kNearest, quant::PolicyKind::kTopK, 1},
      {8, 33333, 256, false, true, quant::Rounding::kStochastic, quant::PolicyKind::kTopK, 16},
      {4, 20001, 6, true, true, quant::Rounding::kStochastic, quant::PolicyKind::kTopK, 4},
      {4, 3, 512, true, true, quant::Rounding::kStochastic, quant::PolicyKind::kTopK, 4},
      // mse (OCTAV per block)
      {4, 100000, 512, true, true, quant::Rounding::kStochastic, quant::PolicyKind::kMse},
      {8, 20001, 6, true, false, quant::Rounding::kNearest, quant::PolicyKind::kMse},
  };
  return all;
}

// Runs `steps` all-reduces of both versions on the same per-rank data and compares every result.
// host and device must be transports over the same ranks (same rank() and size()).
void compare(Communicator& host, Communicator& device, const Case& c, int steps) {
  SCOPED_TRACE(describe(c));
  CompressConfig cfg;
  cfg.bits = c.bits;
  cfg.block_size = c.block_size;
  cfg.rounding = c.rounding;
  cfg.worker_error_feedback = c.worker_ef;
  cfg.server_error_feedback = c.server_ef;
  cfg.policy.kind = c.policy;
  cfg.policy.topk = c.topk;
  cfg.seed = 1234;
  TwoShotAllreduce h(host, cfg, c.count, 3);
  TwoShotAllreduceCuda d(device, cfg, c.count, 3);
  const size_t n = static_cast<size_t>(c.count);
  float* dx = nullptr;
  INT4DDP_CUDA_CHECK(cudaMalloc(&dx, std::max<size_t>(n, 1) * sizeof(float)));
  std::unique_ptr<float, decltype(&cudaFree)> guard(dx, &cudaFree);
  for (int s = 0; s < steps; ++s) {
    SCOPED_TRACE(testing::Message() << "step " << s << " rank " << host.rank());
    const bool with_nan = s == 2;  // a skipped step in the middle
    std::vector<float> x = make_grad(c.count, 1000 * s + 17 * host.rank() + 5, with_nan);
    if (n) INT4DDP_CUDA_CHECK(cudaMemcpy(dx, x.data(), n * 4, cudaMemcpyHostToDevice));
    const BucketStats hs = h.run(x.data(), static_cast<uint32_t>(s));
    const BucketStats ds = d.run(dx, static_cast<uint32_t>(s));
    std::vector<float> got(n);
    if (n) INT4DDP_CUDA_CHECK(cudaMemcpy(got.data(), dx, n * 4, cudaMemcpyDeviceToHost));
    const int64_t bad = first_difference(got, x);
    ASSERT_EQ(bad, -1) << "results differ at " << bad << ": device "
                       << got[static_cast<size_t>(bad)] << ", host " << x[static_cast<size_t>(bad)];
    EXPECT_EQ(ds.count, hs.count);
    EXPECT_EQ(ds.clipped, hs.clipped);
    EXPECT_EQ(ds.nonfinite, hs.nonfinite);
    EXPECT_EQ(ds.gamma, hs.gamma);
    EXPECT_EQ(ds.wire_bytes, hs.wire_bytes);
    const bool apply = hs.nonfinite == 0;
    h.commit(apply);
    d.commit(apply);
    ASSERT_EQ(d.save_state(), h.save_state()) << "error-feedback or policy state differs";
    EXPECT_EQ(d.gamma(), h.gamma());
  }
  // A device bucket resumes from a host blob (and the other way round: same format).
  TwoShotAllreduceCuda d2(device, cfg, c.count, 3);
  d2.load_state(h.save_state());
  EXPECT_EQ(d2.save_state(), h.save_state());
}

TEST(CudaTwoShot, StagedLocalMatchesHost) {
  REQUIRE_GPU();
  auto host = make_local_communicator();
  StagedCommunicator device(make_local_communicator());
  for (const Case& c : cases()) {
    compare(*host, device, c, 4);
    if (HasFatalFailure()) return;
  }
}

#ifdef INT4DDP_HAVE_MPI
// Under mpirun with N ranks (sharing one GPU is fine: staging does not care), or one rank alone.
TEST(CudaTwoShot, StagedMpiMatchesHost) {
  REQUIRE_GPU();
  auto host = make_mpi_communicator();
  StagedCommunicator device(make_mpi_communicator());
  for (const Case& c : cases()) {
    compare(*host, device, c, 4);
    if (HasFatalFailure()) return;
  }
}
#endif

#ifdef INT4DDP_HAVE_NCCL
// NCCL needs one GPU per rank: on the one-GPU machine it runs with one rank only.
bool nccl_single_rank_possible() { return !launched_with_multiple_ranks(); }

TEST(CudaTwoShot, NcclOneRankMatchesHost) {
  REQUIRE_GPU();
  if (!nccl_single_rank_possible()) GTEST_SKIP() << "NCCL is tested with one rank";
  auto host = make_local_communicator();
  auto device = make_nccl_communicator();
  ASSERT_EQ(device->size(), 1);
  for (const Case& c : cases()) {
    compare(*host, *device, c, 4);
    if (HasFatalFailure()) return;
  }
}

TEST(CudaNccl, CollectivesOnDeviceBuffers) {
  REQUIRE_GPU();
  if (!nccl_single_rank_possible()) GTEST_SKIP() << "NCCL is tested with one rank";
  auto comm = make_nccl_communicator();
  ASSERT_TRUE(comm->device_buffers());
  EXPECT_STREQ(comm->backend(), "nccl");
  const std::vector<float> v = {1.0f, -2.5f, 3.0f, 1e-40f};
  float* d = nullptr;
  INT4DDP_CUDA_CHECK(cudaMalloc(&d, 64 * sizeof(float)));
  std::unique_ptr<float, decltype(&cudaFree)> guard(d, &cudaFree);
  auto download = [&](size_t count) {
    std::vector<float> h(count);
    INT4DDP_CUDA_CHECK(cudaMemcpy(h.data(), d, count * 4, cudaMemcpyDeviceToHost));
    return h;
  };
  INT4DDP_CUDA_CHECK(cudaMemcpy(d, v.data(), 16, cudaMemcpyHostToDevice));
  comm->allreduce_sum(d, 4);
  EXPECT_EQ(download(4), v);
  comm->iallreduce_sum(d, 4)->wait();
  EXPECT_EQ(download(4), v);
  comm->broadcast(d, 16, 0);
  EXPECT_EQ(download(4), v);
  // alltoallv and allgatherv with one rank: a copy to the displacement.
  const ByteLayout send = ByteLayout::packed({16});
  ByteLayout recv = ByteLayout::packed({16});
  recv.displs[0] = 64;
  comm->alltoallv(d, send, d, recv);
  std::vector<float> all = download(32);
  EXPECT_EQ(std::vector<float>(all.begin() + 16, all.begin() + 20), v);
  INT4DDP_CUDA_CHECK(cudaMemset(d + 16, 0, 16));
  comm->iallgatherv(d, 16, d, recv)->wait();
  all = download(32);
  EXPECT_EQ(std::vector<float>(all.begin() + 16, all.begin() + 20), v);
  int64_t counters[2] = {3, 4};
  comm->allreduce_sum_i64(counters, 2);
  EXPECT_EQ(counters[0], 3);
  comm->barrier();
  EXPECT_THROW(comm->broadcast(d, 4, 1), Error);  // root out of range
  EXPECT_THROW(comm->alltoallv(d, ByteLayout::packed({16, 16}), d, recv), Error);  // bad layout
}

TEST(CudaNccl, FailedCallNamesCallFileAndRank) {
  // ncclGetUniqueId(nullptr) fails with ncclInvalidArgument without touching a device.
  try {
    INT4DDP_NCCL_CHECK(ncclGetUniqueId(nullptr));
    FAIL() << "ncclGetUniqueId(nullptr) succeeded";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("NCCL error in ncclGetUniqueId(nullptr)"), std::string::npos) << what;
    EXPECT_NE(what.find("test_cuda_two_shot.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("on rank"), std::string::npos) << what;
  }
}
#endif

TEST(CudaTwoShot, HostCommunicatorRefused) {
  auto host = make_local_communicator();
  CompressConfig cfg;
  EXPECT_THROW(TwoShotAllreduceCuda(*host, cfg, 100, 0), Error);
}

}  // namespace
}  // namespace int4ddp::comm
