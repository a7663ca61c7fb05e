// Communicator: the transport under every collective of int4ddp (DESIGN.md section 4).
//
// One object per process and backend. Buffers are host memory for the MPI backend and device memory
// for the NCCL backend (device_buffers() says which); counts are in bytes for the byte collectives
// and in floats for the fp32 all-reduce. Every call is collective over all ranks of the
// communicator unless it says otherwise, and every rank must make the same calls in the same order.
//
// Threading: a Communicator is used by one thread at a time (the trainer hands it to its
// communication thread while a step's buckets are in flight, and uses it itself only between
// steps). Errors throw int4ddp::Error naming the call, the rank and the backend's message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace int4ddp::comm {

// A nonblocking operation in flight. wait() blocks until it completed (and rethrows its error);
// test() returns whether it has completed without blocking. Destroying a Request that has not
// completed waits for it.
class Request {
 public:
  virtual ~Request() = default;
  virtual void wait() = 0;
  virtual bool test() = 0;
};

// Per-rank byte counts and displacements of an all-to-all / all-gather (size() entries each).
struct ByteLayout {
  std::vector<size_t> counts, displs;
  size_t total() const;  // sum of counts
  // counts -> displs as an exclusive prefix sum (packed layout).
  static ByteLayout packed(std::vector<size_t> counts);
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;               // "local", "mpi", "nccl"
  virtual bool device_buffers() const { return false; }  // true: pointers are CUDA device memory

  virtual void barrier() = 0;
  // bytes from root's buf to every rank's buf.
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  // In place: buf <- sum over ranks of buf (count floats). Divide by size() for the mean.
  virtual void allreduce_sum(float* buf, int64_t count) = 0;
  // In place, int64 sum (small host buffers: counters, flags). Always host memory.
  virtual void allreduce_sum_i64(int64_t* buf, int64_t count) = 0;
  // send.counts[j] bytes from send + send.displs[j] go to rank j, which stores them at
  // recv + recv.displs[i] for source rank i (recv.counts[i] bytes). Counts must agree pairwise.
  virtual void alltoallv(const void* send, const ByteLayout& send_layout, void* recv,
                         const ByteLayout& recv_layout) = 0;
  // Every rank contributes send_bytes (= recv_layout.counts[rank]); rank i's block lands at
  // recv + recv_layout.displs[i] on every rank.
  virtual void allgatherv(const void* send, size_t send_bytes, void* recv,
                          const ByteLayout& recv_layout) = 0;
  // Rank i's send_bytes land at recv + recv_layout.displs[i] on root only (recv may be null
  // elsewhere). Host memory.
  virtual void gatherv(const void* send, size_t send_bytes, void* recv,
                       const ByteLayout& recv_layout, int root) = 0;

  // Nonblocking variants; the buffers (and layouts) must stay alive until the request completes.
  virtual std::unique_ptr<Request> iallreduce_sum(float* buf, int64_t count) = 0;
  virtual std::unique_ptr<Request> ialltoallv(const void* send, const ByteLayout& send_layout,
                                              void* recv, const ByteLayout& recv_layout) = 0;
  virtual std::unique_ptr<Request> iallgatherv(const void* send, size_t send_bytes, void* recv,
                                               const ByteLayout& recv_layout) = 0;

  // Sub-communicators (collective; same buffer kind as this one). split: the ranks that passed the
  // same color (>= 0), ranked by key, then by rank here. split_node: the ranks that share this
  // node's memory (MPI_COMM_TYPE_SHARED), ranked by key. Both return null where the backend cannot
  // split (the default).
  virtual std::unique_ptr<Communicator> split(int color, int key);
  virtual std::unique_ptr<Communicator> split_node(int key);

  // Point-to-point, nonblocking, host memory: bytes from buf to rank dest / from rank source into
  // buf. Messages between one pair of ranks with one tag match in posting order. Not collective.
  // Backends without point-to-point (local, nccl) throw Error.
  virtual std::unique_ptr<Request> isend(const void* buf, size_t bytes, int dest, int tag);
  virtual std::unique_ptr<Request> irecv(void* buf, size_t bytes, int source, int tag);

  // The algorithm behind allreduce_sum on the MPI backend: kRing (default) is the pipelined
  // reduce-scatter + all-gather ring of comm/ring_allreduce.h, bandwidth-optimal and
  // deterministic (every rank gets the same bits), for buffers of kRingMinBytes and more (smaller
  // ones are latency-bound and go to MPI_Allreduce); kLibrary is the MPI library's MPI_Allreduce,
  // kept as the reference it is measured against. Other backends ignore it (NCCL's is already a
  // ring).
  enum class AllreduceAlgorithm { kRing, kLibrary };
  void set_allreduce_algorithm(AllreduceAlgorithm a) { allreduce_algorithm_ = a; }
  AllreduceAlgorithm allreduce_algorithm() const { return allreduce_algorithm_; }

  // Bytes this rank has put on the wire (sent to other ranks) since construction or the last
  // reset: the payload of the collectives above, counted by the layout (point-to-point: the bytes
  // sent; the ring fp32 all-reduce therefore counts what it sends, about 2 (N-1)/N * 4 count; the
  // library all-reduce is counted as a ring: 2 (N-1)/N * 4 count).
  uint64_t bytes_sent() const { return bytes_sent_; }
  void reset_bytes_sent() { bytes_sent_ = 0; }

 protected:
  uint64_t bytes_sent_ = 0;
  AllreduceAlgorithm allreduce_algorithm_ = AllreduceAlgorithm::kRing;
};

// A single process (size 1): every collective is a copy or nothing. Always available.
std::unique_ptr<Communicator> make_local_communicator();

// MPI_COMM_WORLD (MPI initialised with MPI_THREAD_SERIALIZED on first use, finalised at exit).
// Throws Error when the build has no MPI.
std::unique_ptr<Communicator> make_mpi_communicator();

// The ranks of MPI_COMM_WORLD that share this node's memory (MPI_COMM_TYPE_SHARED), ranked in world
// order: host buffers, collective over MPI_COMM_WORLD. Throws Error when the build has no MPI.
std::unique_ptr<Communicator> make_mpi_node_communicator();

// True when this process was started by mpirun/srun with more than one rank (the launcher's
// environment, kernels/common/error.h; does not initialise MPI). *world_size gets the size it
// found (1 when none).
bool launched_with_multiple_ranks(int* world_size = nullptr);

// After a fatal error on this rank: if MPI is initialised with more than one rank, MPI_Abort so the
// other ranks exit too instead of waiting in a collective forever; otherwise returns.
void abort_world(int code);

// Builds the transport named by comm.backend: "none" -> local, "mpi" -> MPI, "nccl" -> NCCL
// (device buffers; throws when the build has no NCCL). In comm/make_communicator.cpp.
std::unique_ptr<Communicator> make_communicator(const std::string& backend);

}  // namespace int4ddp::comm
