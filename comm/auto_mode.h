// comm.mode auto (DESIGN.md section 4): per bucket, the fp32 ring all-reduce or the INT-b two-shot,
// whichever the link and codec bandwidth measured at start-up make faster.
//
// Two parts: measure_bandwidth() times a short ring exchange and an encode + decode on every rank
// and agrees on one figure (the slowest rank's), so every rank sees the same inputs; and
// choose_bucket_mode(), a pure function of those figures and the bucket's size, so every rank
// takes the same decision for every bucket (a rank that chose differently would wait forever in a
// collective the others never start).
//
// The model, per rank, for a bucket of n floats over N ranks, link bandwidth B (bytes/s), per-hop
// latency a (s), encode and decode rates E and D (floats/s):
//   fp32 ring:     2 (N-1) a + 2 (N-1)/N 4n / B
//   INT-b two-shot: 2 (N-1) a + 2 (N-1)/N (n b/8 + 4n/G) / B + (1 + 1/N) n / E + 2 n / D
// (the two-shot encodes every element once and its own chunk again after the reduction, and
// decodes the N versions of its chunk and the gathered result: DESIGN.md section 4, steps 3-6).
// Both rise linearly with n, so on one link the choice is the same for every bucket above a few
// blocks; it differs between links (a slow network: INT4; shared memory: fp32) and between machines
// with fast and slow codecs.
//
// Per level of the node hierarchy (comm/hierarchy.h): a bucket's all-reduce there crosses two
// levels. The node level (reduce-scatter and all-gather among a node's ranks) is fp32 by
// construction; it is measured and logged. The cross level (each local index's two-shot of its
// share between nodes) is fp32 or INT-b, chosen from the link between nodes, measured with every
// local index exchanging at once over its own cross-node communicator, as in the all-reduce (the
// node's ranks share the node's link). measure_levels() and choose_level_mode() are the per-level
// counterparts of measure_bandwidth() and choose_bucket_mode().
#pragma once

#include <cstdint>
#include <string>

#include "comm/communicator.h"
#include "comm/hierarchy.h"

namespace int4ddp::comm {

struct MeasuredBandwidth {
  double link_bytes_per_s = 0;     // what one rank sends per second in a ring all-reduce, > 0
  double hop_latency_s = 0;        // one ring hop of a tiny message, >= 0
  double encode_floats_per_s = 0;  // quantize + pack, per-block scales, stochastic rounding, > 0
  double decode_floats_per_s = 0;  // unpack + dequantize, > 0
};

struct ModeChoice {
  int bits = 32;            // kFp32Bits (32): the ring; otherwise the INT-b two-shot
  double fp32_seconds = 0;  // modelled time of the fp32 ring
  double int_seconds = 0;   // modelled time of the two-shot at `bits`
  std::string reason;       // one line for the log: the choice and the figures behind it
};

// The choice for one bucket of `count` floats over `ranks` ranks, between fp32 and the two-shot at
// `bits` (2..8) with block size block_size. One rank: fp32 (nothing to send). Ties go to fp32 (no
// quantization error for nothing). Throws Error on a measurement that is not positive and finite.
ModeChoice choose_bucket_mode(const MeasuredBandwidth& m, int64_t count, int ranks,
                              int64_t block_size, int bits = 4);

// Collective: times a ring all-reduce of probe_floats floats (after one untimed warm-up), a
// one-float ring all-reduce (the hop latency), and an encode and a decode of probe_floats floats at
// `bits` with block_size, on every rank; returns the slowest rank's figures on every rank. With one
// rank the link is not measured (link_bytes_per_s and hop_latency_s stay 0; one rank chooses fp32).
MeasuredBandwidth measure_bandwidth(Communicator& comm, int64_t probe_floats, int bits,
                                    int64_t block_size);

// The figures of every level a bucket's all-reduce crosses, the same on every rank of the world.
struct LevelBandwidth {
  bool hierarchical = false;  // the node hierarchy is active: node and cross are measured
  MeasuredBandwidth flat;     // !hierarchical: the world's ring
  MeasuredBandwidth node;     // hierarchical: among the ranks of one node
  MeasuredBandwidth cross;    // hierarchical: between nodes, every local index at once
  int world_ranks = 1;        // ranks of the world
  int nodes = 1;              // hierarchical: nodes (the cross level's ranks)
  int ranks_per_node = 1;     // hierarchical: ranks per node (the number of shares)
};

// Collective over h.world(): the flat measurement (measure_bandwidth on the world), or, when h is
// active, measure_bandwidth on h.node() and on h.cross(); each figure is then the slowest over
// the whole world, so every rank decides the same for every bucket.
LevelBandwidth measure_levels(Hierarchy& h, int64_t probe_floats, int bits, int64_t block_size);

// The decision for a bucket with `count` compressible floats: flat, choose_bucket_mode over the
// world's ranks; hierarchical, the cross level's choice for the largest share (local index 0's:
// chunk_range(count, block_size, ranks_per_node, 0)) over the nodes, with the node level fp32.
// bits = kFp32Bits then means: the shares cross nodes in fp32 (still under the hierarchy). The
// reason names each level, e.g. "node level fp32 (...); cross level int4: modelled ...".
ModeChoice choose_level_mode(const LevelBandwidth& m, int64_t count, int64_t block_size,
                             int bits = 4);

}  // namespace int4ddp::comm
