// The MPI Communicator on MPI_COMM_WORLD, or on the ranks of this node (host buffers).
//
// MPI is initialised on first use with MPI_THREAD_SERIALIZED (the trainer's communication thread
// and its main thread never call MPI at the same time) and finalised at process exit. Errors come
// back as return codes (MPI_ERRORS_RETURN) and become int4ddp::Error naming the call and the rank.
// MPI counts are int: a message of 2^31 bytes or more is refused with a clear error (a bucket of
// the largest configurable size, 4096 MiB, compresses to 512 MiB of INT4 codes).
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_check.h"
#include "comm/ring_allreduce.h"
#include "comm/socket_ring.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

void finalize_at_exit() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Finalize();
}

void ensure_initialized() {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return;
  int provided = 0;
  INT4DDP_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  std::atexit(finalize_at_exit);
  INT4DDP_CHECK(provided >= MPI_THREAD_SERIALIZED, "MPI provides thread level ", provided,
                " but int4ddp needs MPI_THREAD_SERIALIZED (its communication thread calls MPI)");
}

int to_int(size_t n, const char* what) {
  INT4DDP_CHECK(n <= static_cast<size_t>(INT_MAX), what, ": ", n,
                " bytes exceed MPI's int count; use smaller buckets (comm.bucket_mb)");
  return static_cast<int>(n);
}

struct IntLayout {
  std::vector<int> counts, displs;
};

IntLayout to_int(const ByteLayout& l, int size, const char* what) {
  INT4DDP_CHECK(
      static_cast<int>(l.counts.size()) == size && static_cast<int>(l.displs.size()) == size, what,
      ": layout has ", l.counts.size(), " counts and ", l.displs.size(), " displacements for ",
      size, " ranks");
  IntLayout r;
  for (int i = 0; i < size; ++i) {
    r.counts.push_back(to_int(l.counts[static_cast<size_t>(i)], what));
    r.displs.push_back(to_int(l.displs[static_cast<size_t>(i)], what));
  }
  return r;
}

class MpiRequest final : public Request {
 public:
  // Keeps the int layouts alive for as long as MPI may read them.
  explicit MpiRequest(IntLayout a = {}, IntLayout b = {}) : a_(std::move(a)), b_(std::move(b)) {}
  ~MpiRequest() override {
    if (req_ != MPI_REQUEST_NULL) MPI_Wait(&req_, MPI_STATUS_IGNORE);
  }
  void wait() override {
    if (req_ == MPI_REQUEST_NULL) return;
    INT4DDP_MPI_CHECK(MPI_Wait(&req_, MPI_STATUS_IGNORE));
  }
  bool test() override {
    if (req_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    INT4DDP_MPI_CHECK(MPI_Test(&req_, &done, MPI_STATUS_IGNORE));
    return done != 0;
  }
  MPI_Request* handle() { return &req_; }
  IntLayout& a() { return a_; }
  IntLayout& b() { return b_; }

 private:
  IntLayout a_, b_;
  MPI_Request req_ = MPI_REQUEST_NULL;
};

class MpiCommunicator final : public Communicator {
 public:
  // comm: MPI_COMM_WORLD, or a communicator this object owns (freed by the destructor).
  explicit MpiCommunicator(MPI_Comm comm)
      : comm_(comm), socket_ring_allowed_(comm == MPI_COMM_WORLD) {
    INT4DDP_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    INT4DDP_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (comm_ != MPI_COMM_WORLD && !fin) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }

  void barrier() override { INT4DDP_MPI_CHECK(MPI_Barrier(comm_)); }

  void broadcast(void* buf, size_t bytes, int root) override {
    check_root(root, "broadcast");
    // Large broadcasts (a model's parameters) in pieces below MPI's int limit.
    auto* p = static_cast<uint8_t*>(buf);
    for (size_t off = 0; off < bytes;) {
      const size_t n = std::min<size_t>(bytes - off, size_t{1} << 30);
      INT4DDP_MPI_CHECK(MPI_Bcast(p + off, static_cast<int>(n), MPI_BYTE, root, comm_));
      off += n;
    }
    if (rank_ == root) bytes_sent_ += bytes;  // a tree sends about this much per rank
  }

  void allreduce_sum(float* buf, int64_t count) override {
    if (allreduce_algorithm_ == AllreduceAlgorithm::kRing && ring_pays_off(count)) {
      if (use_socket_ring()) {
        socket_ring_->allreduce_sum(buf, count, ring_scratch_);
        bytes_sent_ += ring_bytes_sent(count, rank_, size_);
      } else {
        ring_allreduce_sum(*this, buf, count, ring_scratch_);  // isend counts its bytes
      }
      return;
    }
    for (int64_t off = 0; off < count;) {
      const int64_t n = std::min<int64_t>(count - off, int64_t{1} << 28);
      INT4DDP_MPI_CHECK(
          MPI_Allreduce(MPI_IN_PLACE, buf + off, static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm_));
      off += n;
    }
    count_ring(count);
  }

  void allreduce_sum_i64(int64_t* buf, int64_t count) override {
    INT4DDP_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf,
                                    to_int(static_cast<size_t>(count), "allreduce_i64"),
                                    MPI_INT64_T, MPI_SUM, comm_));
  }

  void alltoallv(const void* send, const ByteLayout& sl, void* recv,
                 const ByteLayout& rl) override {
    const IntLayout s = to_int(sl, size_, "alltoallv send"),
                    r = to_int(rl, size_, "alltoallv recv");
    INT4DDP_MPI_CHECK(MPI_Alltoallv(send, s.counts.data(), s.displs.data(), MPI_BYTE, recv,
                                    r.counts.data(), r.displs.data(), MPI_BYTE, comm_));
    count_alltoall(sl);
  }

  void allgatherv(const void* send, size_t bytes, void* recv, const ByteLayout& rl) override {
    const IntLayout r = to_int(rl, size_, "allgatherv recv");
    INT4DDP_CHECK(rl.counts[static_cast<size_t>(rank_)] == bytes, "allgatherv: rank ", rank_,
                  " sends ", bytes, " bytes but the layout expects ",
                  rl.counts[static_cast<size_t>(rank_)]);
    INT4DDP_MPI_CHECK(MPI_Allgatherv(send, to_int(bytes, "allgatherv send"), MPI_BYTE, recv,
                                     r.counts.data(), r.displs.data(), MPI_BYTE, comm_));
    count_allgather(rl);
  }

  void gatherv(const void* send, size_t bytes, void* recv, const ByteLayout& rl,
               int root) override {
    check_root(root, "gatherv");
    IntLayout r;
    if (rank_ == root) r = to_int(rl, size_, "gatherv recv");
    INT4DDP_MPI_CHECK(MPI_Gatherv(send, to_int(bytes, "gatherv send"), MPI_BYTE, recv,
                                  rank_ == root ? r.counts.data() : nullptr,
                                  rank_ == root ? r.displs.data() : nullptr, MPI_BYTE, root,
                                  comm_));
    if (rank_ != root) bytes_sent_ += bytes;
  }

  std::unique_ptr<Request> isend(const void* buf, size_t bytes, int dest, int tag) override {
    check_rank(dest, "isend", "destination");
    auto req = std::make_unique<MpiRequest>();
    INT4DDP_MPI_CHECK(
        MPI_Isend(buf, to_int(bytes, "isend"), MPI_BYTE, dest, tag, comm_, req->handle()));
    if (dest != rank_) bytes_sent_ += bytes;
    return req;
  }

  std::unique_ptr<Request> irecv(void* buf, size_t bytes, int source, int tag) override {
    check_rank(source, "irecv", "source");
    auto req = std::make_unique<MpiRequest>();
    INT4DDP_MPI_CHECK(
        MPI_Irecv(buf, to_int(bytes, "irecv"), MPI_BYTE, source, tag, comm_, req->handle()));
    return req;
  }

  // Nonblocking: always the library's MPI_Iallreduce (allreduce_algorithm() applies to the
  // blocking call, which is what the buckets use).
  std::unique_ptr<Request> iallreduce_sum(float* buf, int64_t count) override {
    auto req = std::make_unique<MpiRequest>();
    INT4DDP_CHECK(count >= 0 && count <= INT_MAX, "iallreduce_sum: ", count,
                  " floats exceed MPI's int count; use smaller buckets (comm.bucket_mb)");
    INT4DDP_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                                     comm_, req->handle()));
    count_ring(count);
    return req;
  }

  std::unique_ptr<Request> ialltoallv(const void* send, const ByteLayout& sl, void* recv,
                                      const ByteLayout& rl) override {
    auto req = std::make_unique<MpiRequest>(to_int(sl, size_, "ialltoallv send"),
                                            to_int(rl, size_, "ialltoallv recv"));
    INT4DDP_MPI_CHECK(MPI_Ialltoallv(send, req->a().counts.data(), req->a().displs.data(), MPI_BYTE,
                                     recv, req->b().counts.data(), req->b().displs.data(), MPI_BYTE,
                                     comm_, req->handle()));
    count_alltoall(sl);
    return req;
  }

  std::unique_ptr<Request> iallgatherv(const void* send, size_t bytes, void* recv,
                                       const ByteLayout& rl) override {
    auto req = std::make_unique<MpiRequest>(to_int(rl, size_, "iallgatherv recv"));
    INT4DDP_MPI_CHECK(MPI_Iallgatherv(send, to_int(bytes, "iallgatherv send"), MPI_BYTE, recv,
                                      req->a().counts.data(), req->a().displs.data(), MPI_BYTE,
                                      comm_, req->handle()));
    count_allgather(rl);
    return req;
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    INT4DDP_CHECK(color >= 0, "split: color ", color, " must be >= 0");
    MPI_Comm sub = MPI_COMM_NULL;
    INT4DDP_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    return adopt(sub);
  }

  std::unique_ptr<Communicator> split_node(int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    INT4DDP_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, key, MPI_INFO_NULL, &sub));
    return adopt(sub);
  }

 private:
  // A communicator this process made: errors come back as codes, and the new object frees it.
  static std::unique_ptr<Communicator> adopt(MPI_Comm sub) {
    MPI_Comm_set_errhandler(sub, MPI_ERRORS_RETURN);
    try {
      return std::make_unique<MpiCommunicator>(sub);
    } catch (...) {
      MPI_Comm_free(&sub);
      throw;
    }
  }
  void check_root(int root, const char* what) const { check_rank(root, what, "root"); }
  void check_rank(int rank, const char* what, const char* role) const {
    INT4DDP_CHECK(rank >= 0 && rank < size_, what, ": ", role, " ", rank, " out of range (", size_,
                  " ranks)");
  }
  // Wire bytes as the algorithms move them: a ring all-reduce sends 2 (N-1)/N of the buffer, an
  // all-gather (N-1)/N of the gathered total, an all-to-all what goes to other ranks.
  void count_ring(int64_t count) {
    bytes_sent_ += static_cast<uint64_t>(2.0 * (size_ - 1) / size_ * 4.0 * count + 0.5);
  }
  void count_alltoall(const ByteLayout& sl) {
    for (int j = 0; j < size_; ++j)
      if (j != rank_) bytes_sent_ += sl.counts[static_cast<size_t>(j)];
  }
  void count_allgather(const ByteLayout& rl) {
    bytes_sent_ +=
        static_cast<uint64_t>(static_cast<double>(rl.total()) * (size_ - 1) / size_ + 0.5);
  }

  // The ring's transport on MPI_COMM_WORLD: its own TCP connections (comm/socket_ring.h), made at
  // the first ring all-reduce (collective, as that call is), unless the environment sets
  // INT4DDP_SOCKET_RING=0 or some rank cannot connect; then MPI's point-to-point messages.
  // Sub-communicators (a node's shared memory, the hierarchy's cross-node groups) keep MPI's.
  bool use_socket_ring() {
    if (!socket_ring_tried_) {
      socket_ring_tried_ = true;
      const uint64_t bytes_before = bytes_sent_;
      const char* env = std::getenv("INT4DDP_SOCKET_RING");
      const bool wanted = socket_ring_allowed_ && !(env && std::strcmp(env, "0") == 0);
      // Every rank must decide alike: the environment is checked by all of them together.
      int64_t votes = wanted ? 1 : 0;
      allreduce_sum_i64(&votes, 1);
      if (votes == size_) socket_ring_ = SocketRing::connect(*this);
      bytes_sent_ = bytes_before;  // the set-up's few bytes are not the all-reduce's
    }
    return socket_ring_ != nullptr;
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::vector<float> ring_scratch_;  // receive space of the ring (either transport)
  bool socket_ring_allowed_ = false, socket_ring_tried_ = false;
  std::unique_ptr<SocketRing> socket_ring_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator() {
  ensure_initialized();
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
}

std::unique_ptr<Communicator> make_mpi_node_communicator() {
  ensure_initialized();
  int world_rank = 0;
  INT4DDP_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
  MpiCommunicator world(MPI_COMM_WORLD);
  return world.split_node(world_rank);
}

void abort_world(int code) {
  int init = 0, fin = 0, size = 1;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (!init || fin) return;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
}

}  // namespace int4ddp::comm
