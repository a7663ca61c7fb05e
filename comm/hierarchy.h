// The hierarchical all-reduce (DESIGN.md section 4, "Hierarchy"): ranks that share a node reduce in
// fp32 over the node's fast path first, each node-local index then runs the two-shot across nodes
// on its share of the bucket, and an all-gather inside the node completes it. With k ranks on each
// of M nodes, for a bucket of n floats:
//   1. node reduce-scatter in fp32: share l = chunk_range(n, G, k, l) (whole blocks) of every local
//      rank goes to local rank l (an all-to-all over the node communicator), which sums the k
//      versions in local-rank order and divides by k: the node mean of share l;
//   2. local rank l runs the two-shot (TwoShotAllreduce, comm/two_shot.h) on that share over the
//      communicator of the ranks with local index l, one per node: the mean over nodes, which is
//      the mean over all ranks since every node has k ranks;
//   3. node all-gather of the k shares.
// The three steps overlap piece by piece (PieceHooks, comm/two_shot.h): the share's pieces are the
// cross-node two-shot's (TwoShotPlan::piece of each chunk, in the order piece 0 of chunk 0, 1, ..,
// piece 1 of chunk 0, ..). Every rank sends each local peer that peer's share piece by piece at
// the start of run(); before the two-shot quantizes piece p, the rank waits for piece p of every
// peer's version and writes the node mean of it over its own share of x in place; as soon as the
// two-shot has written the result of a piece, the rank sends it to every peer (in the same fixed
// order, so that a single tag matches them), and it receives the peers' results straight into x
// (into a range only once its own reduce-scatter send from that range has completed).
// The arithmetic is that of the three steps one after the other, so the bits do not depend on the
// pieces or on the timing.
// Invariants: every rank ends with bit-identical results (step 2 makes share l identical on every
// node, step 3 copies bytes), and the shares' blocks are the bucket's blocks (shares start at
// multiples of G). Only step 2 crosses nodes: each rank sends 2 (M-1)/M (n/k b/8 + 4 n/(k G)) bytes
// between nodes, so a node sends what one rank of a flat M-rank two-shot would.
//
// Error feedback and the interval policy live in the two-shot of each rank's share (state per rank,
// checkpointed as the flat two-shot's, for a bucket of the share's size). The stats of a run
// (count, clipped, nonfinite) are summed over the node, so every rank of the world holds the same
// totals and agrees on skipping a step with non-finite gradients.
//
// Node grouping: MPI_COMM_TYPE_SHARED (Communicator::split_node), or rank / K when
// INT4DDP_RANKS_PER_NODE=K is set (simulated clusters and tests, where every rank is on one machine
// as far as MPI knows) or a Hierarchy is made with ranks_per_node = K.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/two_shot.h"

namespace int4ddp::comm {

// comm.hierarchy: auto = node when there is more than one node and more than one rank per node,
// else flat; flat = the two-shot over all ranks; node = the hierarchy (an error where the node
// layout cannot have one; flat where it would be the identity: one node, or one rank per node).
enum class HierarchyMode : uint8_t { kAuto, kFlat, kNode };
const char* hierarchy_mode_name(HierarchyMode m);  // "auto", "flat", "node"

// The environment variable that overrides the node grouping (node = rank / K).
constexpr const char* kRanksPerNodeEnv = "INT4DDP_RANKS_PER_NODE";

// The resolved hierarchy of one communicator (collective to make: every rank must make it at the
// same point, with the same mode). Holds the node and the cross-node communicators when active.
class Hierarchy {
 public:
  // ranks_per_node > 0 forces node = rank / ranks_per_node; 0 reads INT4DDP_RANKS_PER_NODE, and
  // without it asks the backend (split_node). Throws Error for mode node on a layout that cannot
  // have one (backend cannot split, nodes of different sizes) and for a bad override.
  Hierarchy(Communicator& world, HierarchyMode mode, int ranks_per_node = 0);

  bool active() const { return node_ != nullptr; }  // false: flat
  int nodes() const { return nodes_; }
  int ranks_per_node() const { return ranks_per_node_; }  // 0 when nodes differ in size
  // What was chosen and why, e.g. "node (2 nodes x 2 ranks)", "flat (one node of 4 ranks)".
  const std::string& description() const { return description_; }

  Communicator& world() { return world_; }
  // Active only: the ranks of this node, and the ranks with this local index (one per node).
  Communicator& node() { return *node_; }
  Communicator& cross() { return *cross_; }

 private:
  Communicator& world_;
  std::unique_ptr<Communicator> node_, cross_;
  int nodes_ = 1, ranks_per_node_ = 1;
  std::string description_;
};

// Where the last run() of a hierarchical bucket spent its time on this rank (seconds; all zero when
// flat). The levels overlap, so these are the parts not hidden behind one another:
struct HierarchyPhases {
  double scatter_wait_s = 0;  // waiting for the node reduce-scatter's pieces
  double node_sum_s = 0;      // summing the node's versions of the own share
  double cross_s = 0;         // in the cross-node two-shot, less its calls of the node level
  double gather_wait_s = 0;   // after the two-shot: the rest of the node all-gather, the stats
};

// The all-reduce (mean) of one bucket: the flat two-shot over hierarchy->world(), or, when the
// hierarchy is active, the three steps above. The same interface as TwoShotAllreduce.
class BucketAllreduce final : private PieceHooks {
 public:
  BucketAllreduce(Hierarchy& hierarchy, const CompressConfig& cfg, int64_t count,
                  uint32_t bucket_id);

  int64_t count() const { return count_; }
  float gamma() const { return two_shot_->gamma(); }  // of this rank's share

  // In place: x <- the compressed mean over all ranks (count floats, host memory).
  // st.wire_bytes: bytes this rank sent across nodes (the flat two-shot: all it sent).
  BucketStats run(float* x, uint32_t step);
  void commit(bool apply);
  std::vector<uint8_t> save_state() const;
  void load_state(const std::vector<uint8_t>& blob);
  const HierarchyPhases& phases() const { return phases_; }  // of the last run()

 private:
  Hierarchy& h_;
  int64_t count_;
  // One local rank's share and its pieces: ranges relative to the share, non-empty, in the order
  // of the cross-node two-shot (the node messages of the share go in this order, one per range);
  // piece p is ranges [piece_end[p - 1], piece_end[p]).
  struct SharePieces {
    ChunkRange share;  // of the bucket
    std::vector<ChunkRange> ranges;
    std::vector<size_t> piece_end;
  };
  // The hooks of the cross-node two-shot: steps 1 and 3 of piece p / range r.
  void input_piece(int p) override;
  void result_ready(ChunkRange r) override;
  // Step 1's sum over range r of the own share: x's own share <- the node mean, summed in
  // local-rank order (x: this rank's version, the others' in received_), in place.
  void node_mean(float* x, ChunkRange r);
  // Posts what has become possible: the all-gather receive of each range whose reduce-scatter send
  // from the same bytes of x has completed, and the all-gather sends of the results ready in order.
  void progress();
  bool node_done();  // every node message of this run has completed (tests them)

  ChunkRange share_;                            // this rank's share (the whole bucket when flat)
  std::vector<SharePieces> pieces_;             // per local rank (active only)
  std::vector<size_t> by_begin_;                // the own ranges' indexes, by where they begin
  std::vector<float> received_;                 // (k x share) the node's versions of the own share
  std::vector<float> tile_;                     // a tile of the node mean
  std::unique_ptr<TwoShotAllreduce> two_shot_;  // over cross() (active) or world()
  HierarchyPhases phases_;

  // The node messages of one run(), per local peer i (empty for the own index) and range t of the
  // SharePieces order: scatter_send_[i][t] (x's share i, range t) and gather_recv_[i][t] (into the
  // same bytes of x, posted once the send has completed: gather_posted_[i] of them so far);
  // scatter_recv_[i][t] (peer i's version of the own range t) and gather_send_ (the own results).
  float* x_ = nullptr;
  std::vector<std::vector<std::unique_ptr<Request>>> scatter_send_, scatter_recv_, gather_recv_;
  std::vector<size_t> gather_posted_;
  std::vector<std::unique_ptr<Request>> gather_send_;
  std::vector<uint8_t> ready_;  // per own range: its result is in x
  size_t sent_ = 0;             // own ranges [0, sent_) sent to every peer
  double hook_seconds_ = 0;     // in the hooks during this run's two-shot
};

}  // namespace int4ddp::comm
