// The node layout, its resolution to flat or node, and the hierarchical all-reduce (hierarchy.h).
#include "comm/hierarchy.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "comm/progress.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

// INT4DDP_RANKS_PER_NODE as a count of ranks, 0 when unset or empty.
int ranks_per_node_from_env(int world_size) {
  const char* text = std::getenv(kRanksPerNodeEnv);
  if (text == nullptr || *text == '\0') return 0;
  errno = 0;
  char* end = nullptr;
  const long k = std::strtol(text, &end, 10);
  INT4DDP_CHECK(errno == 0 && end != text && *end == '\0' && k >= 1 && k <= world_size,
                kRanksPerNodeEnv, " = '", text, "' must be a whole number of ranks in 1..",
                world_size);
  return static_cast<int>(k);
}

}  // namespace

const char* hierarchy_mode_name(HierarchyMode m) {
  switch (m) {
    case HierarchyMode::kAuto:
      return "auto";
    case HierarchyMode::kFlat:
      return "flat";
    case HierarchyMode::kNode:
      return "node";
  }
  return "?";
}

Hierarchy::Hierarchy(Communicator& world, HierarchyMode mode, int ranks_per_node) : world_(world) {
  INT4DDP_CHECK(
      mode == HierarchyMode::kAuto || mode == HierarchyMode::kFlat || mode == HierarchyMode::kNode,
      "comm.hierarchy: unknown mode ", static_cast<int>(mode));
  const int n = world.size(), r = world.rank();
  INT4DDP_CHECK(ranks_per_node >= 0 && ranks_per_node <= n,
                "hierarchy: ranks_per_node = ", ranks_per_node, " must be in 0..", n);
  ranks_per_node_ = n;
  if (mode == HierarchyMode::kFlat || n == 1) {
    description_ = mode == HierarchyMode::kFlat ? "flat (comm.hierarchy = flat)" : "flat (1 rank)";
    return;
  }
  const int forced = ranks_per_node > 0 ? ranks_per_node : ranks_per_node_from_env(n);
  std::unique_ptr<Communicator> node =
      forced > 0 ? world.split(r / forced, r) : world.split_node(r);
  if (!node) {
    INT4DDP_CHECK(mode != HierarchyMode::kNode, "comm.hierarchy = node: the ", world.backend(),
                  " backend cannot group ranks by node");
    description_ = std::string("flat (the ") + world.backend() + " backend has no node grouping)";
    return;
  }
  // Every rank learns every rank's (local rank, node size): the node count and whether the nodes
  // are alike decide the same way on every rank.
  const int64_t mine[2] = {node->rank(), node->size()};
  std::vector<int64_t> all(2 * static_cast<size_t>(n));
  world.allgatherv(mine, sizeof mine, all.data(),
                   ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(n), sizeof mine)));
  int64_t smallest = n, largest = 0;
  nodes_ = 0;
  for (int i = 0; i < n; ++i) {
    nodes_ += all[2 * static_cast<size_t>(i)] == 0 ? 1 : 0;
    smallest = std::min(smallest, all[2 * static_cast<size_t>(i) + 1]);
    largest = std::max(largest, all[2 * static_cast<size_t>(i) + 1]);
  }
  const std::string source =
      forced > 0 ? std::string(", grouped by rank / ") + std::to_string(forced) : std::string();
  if (smallest != largest) {
    ranks_per_node_ = 0;
    INT4DDP_CHECK(mode != HierarchyMode::kNode,
                  "comm.hierarchy = node needs the same number of "
                  "ranks on every node; found ",
                  nodes_, " nodes of ", smallest, " to ", largest, " ranks", source);
    description_ = "flat (" + std::to_string(nodes_) + " nodes of " + std::to_string(smallest) +
                   " to " + std::to_string(largest) + " ranks" + source + ")";
    return;
  }
  ranks_per_node_ = static_cast<int>(largest);
  const std::string layout = std::to_string(nodes_) + " node" + (nodes_ > 1 ? "s" : "") + " x " +
                             std::to_string(ranks_per_node_) + " rank" +
                             (ranks_per_node_ > 1 ? "s" : "") + source;
  if (nodes_ == 1 || ranks_per_node_ == 1) {
    description_ = "flat (" + layout + ")";
    return;
  }
  // The ranks with this local index, one per node, in world order.
  cross_ = world.split(node->rank(), r);
  INT4DDP_CHECK(cross_ && cross_->size() == nodes_, "hierarchy: the cross-node communicator of ",
                "local rank ", node->rank(), " has ", cross_ ? cross_->size() : 0, " ranks, not ",
                nodes_);
  node_ = std::move(node);
  description_ = "node (" + layout + ")";
}

// ---- BucketAllreduce ----------------------------------------------------------------------------

BucketAllreduce::BucketAllreduce(Hierarchy& hierarchy, const CompressConfig& cfg, int64_t count,
                                 uint32_t bucket_id)
    : h_(hierarchy), count_(count) {
  cfg.validate();
  INT4DDP_CHECK(count >= 0, "bucket all-reduce: negative count");
  if (!h_.active()) {
    share_ = {0, count};
    two_shot_ = std::make_unique<TwoShotAllreduce>(h_.world(), cfg, count, bucket_id);
    return;
  }
  const int k = h_.ranks_per_node(), l = h_.node().rank();
  // fp32 mode has no blocks: shares of whole 2-element pairs are as good as any.
  const int64_t G = cfg.bits == kFp32Bits ? 2 : cfg.block_size;
  std::vector<size_t> counts, displs;
  for (int j = 0; j < k; ++j) {
    const ChunkRange s = chunk_range(count, G, k, j);
    counts.push_back(sizeof(float) * static_cast<size_t>(s.count()));
    displs.push_back(sizeof(float) * static_cast<size_t>(s.begin));
    if (j == l) share_ = s;
  }
  scatter_send_.counts = counts;
  scatter_send_.displs = displs;
  gather_ = scatter_send_;
  scatter_recv_ = ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(k), counts[l]));
  // The own version of the own share is read from x in place: no message to itself.
  scatter_send_.counts[static_cast<size_t>(l)] = 0;
  scatter_recv_.counts[static_cast<size_t>(l)] = 0;
  received_.resize(static_cast<size_t>(k) * static_cast<size_t>(share_.count()));
  mean_.resize(static_cast<size_t>(share_.count()));
  // Each local index rounds its own share: distinct Philox keys (bucket_id k + l), and the flat
  // keys when k = 1.
  two_shot_ = std::make_unique<TwoShotAllreduce>(
      h_.cross(), cfg, share_.count(),
      bucket_id * static_cast<uint32_t>(k) + static_cast<uint32_t>(l));
}

void BucketAllreduce::node_mean(const float* x) {
  const int k = h_.node().size(), l = h_.node().rank();
  const int64_t m = share_.count();
  std::vector<const float*> version;  // local rank i's version of the own share
  for (int i = 0; i < k; ++i)
    version.push_back(i == l ? x + share_.begin
                             : received_.data() + static_cast<size_t>(i) * static_cast<size_t>(m));
  const float fk = static_cast<float>(k);
  // In cache-sized tiles: one pass over the versions, mean = (v_0 + v_1 + ... + v_k-1) / k.
  constexpr int64_t kTile = 4096;
  for (int64_t o = 0; o < m; o += kTile) {
    const int64_t len = std::min(kTile, m - o);
    float* __restrict mean = mean_.data() + o;
    std::copy(version[0] + o, version[0] + o + len, mean);
    for (int i = 1; i < k; ++i) {
      const float* __restrict v = version[static_cast<size_t>(i)] + o;
      for (int64_t e = 0; e < len; ++e) mean[e] += v[e];
    }
    for (int64_t e = 0; e < len; ++e) mean[e] /= fk;
  }
}

BucketStats BucketAllreduce::run(float* x, uint32_t step) {
  if (!h_.active()) return two_shot_->run(x, step);
  Communicator& node = h_.node();
  const int64_t m = share_.count();

  // 1. Node reduce-scatter: every local rank's version of the own share, summed in local-rank
  // order (the same order on every node), / k.
  // The node's collectives are waited for politely (comm/progress.h): a rank of the node that gets
  // there first must not spin on a core its node peers still compute on.
  auto t = Clock::now();
  wait_politely(*node.ialltoallv(x, scatter_send_, received_.data(), scatter_recv_));
  double node_seconds = seconds_since(t);
  t = Clock::now();
  node_mean(x);
  double sum_seconds = seconds_since(t);
  phases_.scatter_wait_s = node_seconds;
  phases_.node_sum_s = sum_seconds;

  // 2. The two-shot across nodes on the share.
  t = Clock::now();
  BucketStats st = two_shot_->run(mean_.data(), step);
  phases_.cross_s = seconds_since(t);

  // 3. Node all-gather of the shares, straight into x.
  t = Clock::now();
  wait_politely(
      *node.iallgatherv(mean_.data(), sizeof(float) * static_cast<size_t>(m), x, gather_));
  int64_t totals[3] = {st.count, st.clipped, st.nonfinite};
  node.allreduce_sum_i64(totals, 3);
  phases_.gather_wait_s = seconds_since(t);
  node_seconds += seconds_since(t);
  st.count = totals[0];
  st.clipped = totals[1];
  st.nonfinite = totals[2];
  st.comm_seconds += node_seconds;
  st.quant_seconds += sum_seconds;
  return st;
}

void BucketAllreduce::commit(bool apply) { two_shot_->commit(apply); }

std::vector<uint8_t> BucketAllreduce::save_state() const { return two_shot_->save_state(); }

void BucketAllreduce::load_state(const std::vector<uint8_t>& blob) {
  try {
    two_shot_->load_state(blob);
  } catch (const Error& e) {
    // A checkpoint of another hierarchy holds state for other shares: say which this run uses.
    INT4DDP_FAIL(e.what(), "; this run's all-reduce is ", h_.description(),
                 ", and comm.hierarchy and the node layout must be the checkpoint's");
  }
}

}  // namespace int4ddp::comm
