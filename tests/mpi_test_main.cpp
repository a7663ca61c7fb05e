// The gtest main of the MPI suites: every rank runs every test; rank 0 prints the usual gtest
// output, the other ranks print only their failures, prefixed "[rank r]". The exit code is the same
// on every rank: non-zero when any rank had a failure (an all-reduce of the failure flags), so
// mpirun and ctest report a failure that happened on rank 3 only.
#include <gtest/gtest.h>

#include <cstdio>
#include <exception>
#include <memory>

#include "comm/communicator.h"
#include "mpi_test.h"

namespace int4ddp::test {
namespace {

std::unique_ptr<comm::Communicator> g_world;

// Failures of a rank other than 0, one line each with the rank.
class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

comm::Communicator& world() { return *g_world; }

}  // namespace int4ddp::test

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  try {
    int4ddp::test::g_world = int4ddp::comm::make_mpi_communicator();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  auto& w = int4ddp::test::world();
  if (w.rank() != 0) {
    testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new int4ddp::test::RankFailurePrinter(w.rank()));
  }
  const int rc = RUN_ALL_TESTS();
  int64_t failed = rc != 0 ? 1 : 0;
  w.allreduce_sum_i64(&failed, 1);
  if (w.rank() == 0)
    std::printf("[mpi] %d rank(s); %lld with failures\n", w.size(), static_cast<long long>(failed));
  std::fflush(stdout);
  int4ddp::test::g_world.reset();
  return failed > 0 ? 1 : 0;
}
