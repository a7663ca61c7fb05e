// The node layout, its resolution to flat or node, and the hierarchical all-reduce (hierarchy.h).
#include "comm/hierarchy.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

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

namespace {

// Message tags of the node level (on the node communicator, which carries nothing else during a
// run()).
constexpr int kNodeScatterTag = 0x4e53;  // reduce-scatter ranges
constexpr int kNodeGatherTag = 0x4e47;   // all-gather ranges
constexpr int64_t kSumTile = 4096;       // floats per tile of the node mean

}  // namespace

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
  const int k = h_.ranks_per_node(), l = h_.node().rank(), M = h_.nodes();
  // fp32 mode has no blocks: shares of whole 2-element pairs are as good as any.
  const int64_t G = cfg.bits == kFp32Bits ? 2 : cfg.block_size;
  for (int i = 0; i < k; ++i) {
    SharePieces sp;
    sp.share = chunk_range(count, G, k, i);
    const int64_t m = sp.share.count();
    if (cfg.bits == kFp32Bits) {  // the two-shot's fp32 mode is one piece, the whole share
      if (m > 0) sp.ranges.push_back({0, m});
      sp.piece_end.push_back(sp.ranges.size());
    } else {  // the pieces of the two-shot that local rank i runs on its share
      const TwoShotPlan plan(cfg, m, 0, M, 0);
      for (int p = 0; p < plan.pieces(); ++p) {
        for (int j = 0; j < M; ++j) {
          const ChunkRange c = plan.chunk(j), piece = plan.piece(j, p);
          if (piece.count() > 0) sp.ranges.push_back({c.begin + piece.begin, c.begin + piece.end});
        }
        sp.piece_end.push_back(sp.ranges.size());
      }
    }
    pieces_.push_back(std::move(sp));
  }
  share_ = pieces_[static_cast<size_t>(l)].share;
  const std::vector<ChunkRange>& own = pieces_[static_cast<size_t>(l)].ranges;
  by_begin_.resize(own.size());
  for (size_t t = 0; t < own.size(); ++t) by_begin_[t] = t;
  std::sort(by_begin_.begin(), by_begin_.end(),
            [&](size_t a, size_t b) { return own[a].begin < own[b].begin; });
  received_.resize(static_cast<size_t>(k) * static_cast<size_t>(share_.count()));
  tile_.resize(static_cast<size_t>(kSumTile));
  // Each local index rounds its own share: distinct Philox keys (bucket_id k + l), and the flat
  // keys when k = 1.
  two_shot_ = std::make_unique<TwoShotAllreduce>(
      h_.cross(), cfg, share_.count(),
      bucket_id * static_cast<uint32_t>(k) + static_cast<uint32_t>(l));
}

void BucketAllreduce::node_mean(float* x, ChunkRange r) {
  const int k = h_.node().size(), l = h_.node().rank();
  const size_t m = static_cast<size_t>(share_.count());
  float* own = x + share_.begin;
  const float fk = static_cast<float>(k);
  // In cache-sized tiles: mean = (v_0 + v_1 + ... + v_k-1) / k, written over the own version
  // once the tile has read it.
  for (int64_t o = r.begin; o < r.end; o += kSumTile) {
    const int64_t len = std::min(kSumTile, r.end - o);
    auto version = [&](int i) -> const float* {
      return (i == l ? own : received_.data() + static_cast<size_t>(i) * m) + o;
    };
    float* __restrict acc = tile_.data();
    const float* __restrict v0 = version(0);
    const float* __restrict v1 = version(1);  // k >= 2 where the hierarchy is active
    for (int64_t e = 0; e < len; ++e) acc[e] = v0[e] + v1[e];
    for (int i = 2; i < k; ++i) {
      const float* __restrict v = version(i);
      for (int64_t e = 0; e < len; ++e) acc[e] += v[e];
    }
    float* __restrict out = own + o;
    for (int64_t e = 0; e < len; ++e) out[e] = acc[e] / fk;
  }
}

void BucketAllreduce::progress() {
  Communicator& node = h_.node();
  const int k = node.size();
  for (int i = 0; i < k; ++i) {
    const SharePieces& sp = pieces_[static_cast<size_t>(i)];
    auto& sends = scatter_send_[static_cast<size_t>(i)];
    size_t& t = gather_posted_[static_cast<size_t>(i)];
    for (; t < sends.size() && sends[t]->test(); ++t) {
      const ChunkRange r = sp.ranges[t];
      gather_recv_[static_cast<size_t>(i)].push_back(
          node.irecv(x_ + sp.share.begin + r.begin, sizeof(float) * static_cast<size_t>(r.count()),
                     i, kNodeGatherTag));
    }
  }
  const SharePieces& own = pieces_[static_cast<size_t>(node.rank())];
  for (; sent_ < ready_.size() && ready_[sent_]; ++sent_) {
    const ChunkRange r = own.ranges[sent_];
    for (int i = 0; i < k; ++i)
      if (i != node.rank())
        gather_send_.push_back(node.isend(x_ + share_.begin + r.begin,
                                          sizeof(float) * static_cast<size_t>(r.count()), i,
                                          kNodeGatherTag));
  }
}

bool BucketAllreduce::node_done() {
  const int k = h_.node().size();
  if (sent_ < ready_.size()) return false;
  auto all_done = [](std::vector<std::unique_ptr<Request>>& reqs) {
    return std::all_of(reqs.begin(), reqs.end(), [](auto& r) { return r->test(); });
  };
  for (int i = 0; i < k; ++i)
    if (gather_posted_[static_cast<size_t>(i)] < scatter_send_[static_cast<size_t>(i)].size() ||
        !all_done(gather_recv_[static_cast<size_t>(i)]) ||
        !all_done(scatter_recv_[static_cast<size_t>(i)]))
      return false;
  return all_done(gather_send_);
}

void BucketAllreduce::input_piece(int p) {
  const auto t0 = Clock::now();
  const SharePieces& own = pieces_[static_cast<size_t>(h_.node().rank())];
  INT4DDP_CHECK(static_cast<size_t>(p) < own.piece_end.size(), "hierarchy: the two-shot asked for ",
                "piece ", p, " of ", own.piece_end.size());
  const size_t t_begin = p == 0 ? 0 : own.piece_end[static_cast<size_t>(p) - 1];
  const size_t t_end = own.piece_end[static_cast<size_t>(p)];
  // 1. Every peer's version of the piece (the own one is in x).
  for (auto& from : scatter_recv_) {
    if (from.empty()) continue;  // the own index: its version is x
    for (size_t t = t_begin; t < t_end; ++t)
      wait_backing_off([&] {
        progress();
        return from[t]->test();
      });
  }
  const auto t1 = Clock::now();
  phases_.scatter_wait_s += std::chrono::duration<double>(t1 - t0).count();
  for (size_t t = t_begin; t < t_end; ++t) node_mean(x_, own.ranges[t]);
  phases_.node_sum_s += seconds_since(t1);
  progress();
  hook_seconds_ += seconds_since(t0);
}

void BucketAllreduce::result_ready(ChunkRange r) {
  if (r.count() == 0) return;
  const auto t0 = Clock::now();
  const std::vector<ChunkRange>& ranges = pieces_[static_cast<size_t>(h_.node().rank())].ranges;
  const auto it = std::lower_bound(by_begin_.begin(), by_begin_.end(), r.begin,
                                   [&](size_t t, int64_t b) { return ranges[t].begin < b; });
  INT4DDP_CHECK(it != by_begin_.end() && ranges[*it].begin == r.begin && ranges[*it].end == r.end &&
                    !ready_[*it],
                "hierarchy: the two-shot's result range [", r.begin, ", ", r.end,
                ") is not a piece of the share, or came twice");
  ready_[*it] = 1;
  progress();
  hook_seconds_ += seconds_since(t0);
}

BucketStats BucketAllreduce::run(float* x, uint32_t step) {
  if (!h_.active()) return two_shot_->run(x, step);
  const auto t_run = Clock::now();
  Communicator& node = h_.node();
  const int k = node.size(), l = node.rank();
  const size_t m = static_cast<size_t>(share_.count());
  phases_ = {};
  hook_seconds_ = 0;
  x_ = x;
  for (auto* reqs : {&scatter_send_, &scatter_recv_, &gather_recv_}) {
    reqs->clear();
    reqs->resize(static_cast<size_t>(k));
  }
  gather_posted_.assign(static_cast<size_t>(k), 0);
  gather_send_.clear();
  const SharePieces& own = pieces_[static_cast<size_t>(l)];
  ready_.assign(own.ranges.size(), 0);
  sent_ = 0;
  // 1. The node reduce-scatter, every range of every share at once, in the SharePieces order:
  // MPI moves them while the two-shot runs, and the two-shot waits for each piece (input_piece).
  // The own version of the own share is read from x in place: no message to itself.
  for (int i = 0; i < k; ++i) {
    if (i == l) continue;
    const SharePieces& sp = pieces_[static_cast<size_t>(i)];
    for (const ChunkRange& r : own.ranges)
      scatter_recv_[static_cast<size_t>(i)].push_back(
          node.irecv(received_.data() + static_cast<size_t>(i) * m + r.begin,
                     sizeof(float) * static_cast<size_t>(r.count()), i, kNodeScatterTag));
    for (const ChunkRange& r : sp.ranges)
      scatter_send_[static_cast<size_t>(i)].push_back(
          node.isend(x + sp.share.begin + r.begin, sizeof(float) * static_cast<size_t>(r.count()),
                     i, kNodeScatterTag));
  }

  // 2. The two-shot across nodes on the own share of x, in place; the hooks do steps 1 and 3
  // piece by piece.
  auto t = Clock::now();
  BucketStats st = two_shot_->run(x + share_.begin, step, this);
  phases_.cross_s = std::max(0.0, seconds_since(t) - hook_seconds_);

  // 3. The rest of the node all-gather (the peers' last results), waited for politely: a rank of
  // the node that gets there first must not spin on a core its node peers still compute on.
  t = Clock::now();
  wait_backing_off([&] {
    progress();
    return node_done();
  });
  x_ = nullptr;
  int64_t totals[3] = {st.count, st.clipped, st.nonfinite};
  node.allreduce_sum_i64(totals, 3);
  phases_.gather_wait_s = seconds_since(t);
  st.count = totals[0];
  st.clipped = totals[1];
  st.nonfinite = totals[2];
  st.quant_seconds += phases_.node_sum_s;
  st.comm_seconds = std::max(0.0, seconds_since(t_run) - st.quant_seconds);
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
