// Data-parallel plumbing of the trainer (DESIGN.md section 4): the same config on every rank,
// identical initial parameters, rank-local state in checkpoints, and the bucketed gradient
// all-reduce. With one rank (comm.backend = none, or mpi without mpirun) there is no all-reduce.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "comm/buckets.h"
#include "comm/communicator.h"
#include "src/config/config.h"
#include "src/nn/model.h"

namespace int4ddp::train {

class DataParallel {
 public:
  // Builds the communicator of cfg.comm.backend. Refuses (on every rank) a config whose hash
  // differs between ranks, naming the ranks. comm.backend = nccl: the host-memory collectives
  // (config hash, parameter broadcast, BN averages, sums, checkpoint gathers) go through MPI, the
  // gradient buckets through NCCL.
  explicit DataParallel(const Config& cfg);

  int rank() const { return comm_->rank(); }
  int world() const { return comm_->size(); }
  bool enabled() const { return enabled_; }      // more than one rank: gradients are all-reduced
  comm::Communicator& comm() { return *comm_; }  // host buffers
  // The transport of the gradient buckets ("mpi", "nccl", "local").
  const char* bucket_backend() const { return (device_comm_ ? device_comm_ : comm_)->backend(); }

  // Rank 0's parameters and BN statistics to every rank.
  void broadcast_model(nn::Model& model);
  // BN running statistics <- their mean over ranks (before evaluation and epoch checkpoints).
  void average_buffers(nn::Model& model);

  // The gradient buckets over model's arena (after the model is built); null engine without
  // data parallelism. A model on the GPU hands over its device arena: the buckets go through
  // NCCL in device memory, or through pinned host memory over MPI (comm/buckets.h). With
  // comm.mode auto it measures the link and the codec first (collective) and writes each bucket's
  // choice and its reason to log.
  void attach(nn::Model& model, const Config& cfg, std::ostream& log);
  comm::BucketEngine* engine() { return engine_.get(); }
  // Ends the gradient buckets (joins their thread) before the model whose arena they read goes.
  void detach() { engine_.reset(); }

  // This rank's state that other ranks do not share: BN statistics, the gradient quantizers'
  // interval policies and trackers, the buckets' error feedback and gammas.
  std::vector<uint8_t> save_local_state(nn::Model& model) const;
  void load_local_state(nn::Model& model, const std::vector<uint8_t>& blob);
  // Every rank's save_local_state(), on rank 0 (empty vector elsewhere). Collective.
  std::vector<std::vector<uint8_t>> gather_local_states(nn::Model& model);

  // Sum over ranks of v (in place). Collective; no-op with one rank.
  void sum(int64_t* v, int64_t n);
  void sum(float* v, int64_t n);

 private:
  std::unique_ptr<comm::Communicator> comm_;
  std::unique_ptr<comm::Communicator> device_comm_;  // comm.backend = nccl with 2+ ranks
  std::unique_ptr<comm::BucketEngine> engine_;       // destroyed before the communicators
  bool enabled_ = false;
};

}  // namespace int4ddp::train
