// ByteLayout, the local (single-process) communicator and the launch check (see communicator.h).
#include "comm/communicator.h"

#include <cstring>
#include <numeric>

#include "kernels/common/error.h"

namespace int4ddp::comm {

size_t ByteLayout::total() const {
  return std::accumulate(counts.begin(), counts.end(), size_t{0});
}

ByteLayout ByteLayout::packed(std::vector<size_t> counts) {
  ByteLayout l;
  l.displs.resize(counts.size());
  size_t off = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    l.displs[i] = off;
    off += counts[i];
  }
  l.counts = std::move(counts);
  return l;
}

std::unique_ptr<Communicator> Communicator::split(int, int) { return nullptr; }
std::unique_ptr<Communicator> Communicator::split_node(int) { return nullptr; }

std::unique_ptr<Request> Communicator::isend(const void*, size_t, int, int) {
  INT4DDP_FAIL("the ", backend(), " communicator has no point-to-point send");
}

std::unique_ptr<Request> Communicator::irecv(void*, size_t, int, int) {
  INT4DDP_FAIL("the ", backend(), " communicator has no point-to-point receive");
}

namespace {

class DoneRequest final : public Request {
 public:
  void wait() override {}
  bool test() override { return true; }
};

// Size 1: the collectives move a rank's data to itself.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "local"; }
  void barrier() override {}
  void broadcast(void*, size_t, int root) override { check_root(root); }
  void allreduce_sum(float*, int64_t) override {}
  void allreduce_sum_i64(int64_t*, int64_t) override {}
  void alltoallv(const void* send, const ByteLayout& sl, void* recv,
                 const ByteLayout& rl) override {
    check_one(sl, "alltoallv send");
    check_one(rl, "alltoallv recv");
    INT4DDP_CHECK(sl.counts[0] == rl.counts[0], "alltoallv: send ", sl.counts[0],
                  " bytes but receive ", rl.counts[0]);
    copy(static_cast<uint8_t*>(recv) + rl.displs[0],
         static_cast<const uint8_t*>(send) + sl.displs[0], sl.counts[0]);
  }
  void allgatherv(const void* send, size_t bytes, void* recv, const ByteLayout& rl) override {
    check_one(rl, "allgatherv recv");
    INT4DDP_CHECK(rl.counts[0] == bytes, "allgatherv: send ", bytes, " bytes but receive ",
                  rl.counts[0]);
    copy(static_cast<uint8_t*>(recv) + rl.displs[0], send, bytes);
  }
  void gatherv(const void* send, size_t bytes, void* recv, const ByteLayout& rl,
               int root) override {
    check_root(root);
    allgatherv(send, bytes, recv, rl);
  }
  std::unique_ptr<Request> iallreduce_sum(float*, int64_t) override {
    return std::make_unique<DoneRequest>();
  }
  std::unique_ptr<Request> ialltoallv(const void* send, const ByteLayout& sl, void* recv,
                                      const ByteLayout& rl) override {
    alltoallv(send, sl, recv, rl);
    return std::make_unique<DoneRequest>();
  }
  std::unique_ptr<Request> iallgatherv(const void* send, size_t bytes, void* recv,
                                       const ByteLayout& rl) override {
    allgatherv(send, bytes, recv, rl);
    return std::make_unique<DoneRequest>();
  }
  std::unique_ptr<Communicator> split(int color, int) override {
    INT4DDP_CHECK(color >= 0, "split: color ", color, " must be >= 0");
    return std::make_unique<LocalCommunicator>();
  }
  std::unique_ptr<Communicator> split_node(int) override {
    return std::make_unique<LocalCommunicator>();
  }

 private:
  static void check_root(int root) {
    INT4DDP_CHECK(root == 0, "local communicator: root ", root, " out of range (size 1)");
  }
  static void check_one(const ByteLayout& l, const char* what) {
    INT4DDP_CHECK(l.counts.size() == 1 && l.displs.size() == 1, what,
                  ": layout must have one entry per rank (1)");
  }
  static void copy(void* dst, const void* src, size_t n) {
    if (n > 0 && dst != src) std::memmove(dst, src, n);
  }
};

}  // namespace

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

bool launched_with_multiple_ranks(int* world_size) {
  const int n = launcher_world_size();
  if (world_size) *world_size = n;
  return n > 1;
}

}  // namespace int4ddp::comm
