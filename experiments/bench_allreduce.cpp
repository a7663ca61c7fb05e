// bench_allreduce: the all-reduce (mean) of an fp32 gradient across the ranks of mpirun, in the
// manner of nccl-tests: fp32 (the Communicator's pipelined ring reduce-scatter + all-gather,
// comm/ring_allreduce.h, then / N: what comm.mode fp32 runs), fp32-mpi (the MPI library's
// MPI_Allreduce, the reference the ring is measured against) and the two-shot compressed
// all-reduce (int4, int8), from --min-bytes to --max-bytes of fp32 gradient. x_fp32 is the speed-up
// over the fp32 (ring) row of the same size.
//
//   mpirun -np 4 bench_allreduce [--min-bytes 4K] [--max-bytes 256M] [--step-factor 4]
//          [--iters 20] [--warmup 3] [--modes fp32,fp32-mpi,int4,int8] [--block-size 512]
//          [--no-check] [--hierarchy flat,node] [--pipeline-chunks 0]
//
// --pipeline-chunks: comm.pipeline_chunks of the two-shot (pieces per chunk; 0 = auto, 1 = the
// unpipelined all-to-all / all-gather collectives); the column `pcs` says what ran (flat).
//
// --hierarchy: each mode once per listed comm.hierarchy (comm/hierarchy.h): flat, node or auto.
// The node grouping is MPI's (MPI_COMM_TYPE_SHARED: on launch/netns_cluster.sh --ranks-per-node K
// the K ranks of each simulated node), or rank / K with INT4DDP_RANKS_PER_NODE=K. The column `hier`
// says what ran (flat, or node MxK); x_flat = the first listed hierarchy's time of the same mode
// and size / this time. Under the hierarchy wire_mod counts only the bytes that cross nodes, and
// formula_mod is the two-shot's formula for the largest share (n/K) over the M nodes. A node row is
// followed by its phase split (BucketAllreduce::phases(): waiting for the node reduce-scatter,
// the node sum, the cross-node two-shot, the node all-gather; each the slowest rank's median).
//
// Timing: every iteration restores the input (untimed), passes a barrier, and times run() on each
// rank (--barrier polite, the default: a 1-float non-blocking all-reduce waited for with
// comm/progress.h's pauses, so that ranks done with their run() do not spin on the cores the
// slower ranks still compute on, as MPI_Barrier does when ranks share cores; --barrier mpi:
// MPI_Barrier); an iteration's time is the maximum over ranks and `time` is the median over
// iterations. algbw_eff = 4 n / time (logical fp32 bytes), busbw_eff = algbw_eff * 2 (N-1) / N.
// With --policy lbt every iteration commits its step, as training does: gamma follows the sign rule
// and the error feedback carries over (the row prints the gamma reached). With minmax and fixed
// each iteration is an independent first step: commit(false) keeps the error-feedback buffers zero
// (the quantize and error-feedback work is done and timed all the same).
//
// quant / coll: the part of a run() spent quantizing, dequantizing and reducing (error feedback
// included) and the rest of it, in collectives or waiting for messages (median over iterations,
// slowest rank). quant splits into qz (worker quantization), red (the owner's reduction and
// requantization) and dq (dequantization of the gathered chunks), each the slowest rank's median.
// With the pipeline these overlap the transfers, so quant + coll is no longer the sum of phases
// on the critical path: time - quant is the transfer time not hidden behind computation.
//
// Wire bytes, both MODELLED (nothing here measures an interface): wire_mod = what this rank handed
// to the collectives during run() as Communicator::bytes_sent counts it (all-to-all payload to
// other ranks, (N-1)/N of an all-gather, 2 (N-1)/N of a ring all-reduce; maximum over ranks),
// beside formula_mod = modelled_wire_bytes() = 2 (N-1)/N (n b/8 + 4 n/G), and their difference
// in %.
//
// Checks (on by default): rel_err = ||out - mean|| / ||mean|| on the random timing data against the
// exact mean (accumulated in double from every rank's input, which every rank can regenerate:
// inputs are a hash of (seed, rank, index)), for the first step (rel_err1: a fresh bucket, no error
// feedback yet, the error of one compressed all-reduce) and the last one (rel_err: with --policy
// lbt it includes the error feedback carried over from the previous steps on the same input, so it
// is not the one-shot error and is larger than rel_err1 by design); #wrong = elements (summed over
// ranks) that differ from the exact mean on grid-valued inputs whose compressed mean is exact by
// construction (tests/verifiable.h; run on a fresh bucket: gamma 1, no error feedback yet), plus
// one per rank whose output differs from rank 0's (every mode but fp32-mpi, whose library
// algorithm promises no identical bits). Any #wrong > 0 makes the exit status
// non-zero.
//
// Output on rank 0 only: a table, then one JSON line
//   {"bench":"allreduce","ranks":N,"block_size":G,"policy":P,"rows":[{"mode","bytes","time_s",
//    "gamma","wire_bytes_modelled","formula_wire_bytes_modelled","rel_err_first","rel_err","wrong"},...]}
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/hierarchy.h"
#include "comm/progress.h"
#include "comm/two_shot.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/format.h"
#include "kernels/quant/policy.h"
#include "tests/verifiable.h"

using namespace int4ddp;
using namespace int4ddp::comm;

namespace {

// ---- inputs (tests/verifiable.h): every rank can regenerate every rank's input ----------------
// Gradient-like: uniform in [-1, 1) times a scale that changes every 512 elements (2^-6 .. 2^2).
float random_value(uint64_t seed, int rank, int64_t i) {
  return std::ldexp(test::uniform(seed, rank, i), static_cast<int>((i / 512) % 9) - 6);
}

// The exact grid-valued mean (tests/verifiable.h); fp32 mode uses the int8 grid (any small dyadic
// values are exact).
float grid_mean_value(uint64_t seed, int64_t i, int64_t G, int bits, bool stochastic) {
  return test::grid_mean_value(seed, i, G, bits == kFp32Bits ? 8 : bits, stochastic);
}

// ---- small collectives on top of the Communicator --------------------------------------------
template <typename T>
std::vector<T> gather_to_root(Communicator& c, const std::vector<T>& mine) {
  const size_t bytes = mine.size() * sizeof(T);
  std::vector<T> all(c.rank() == 0 ? mine.size() * static_cast<size_t>(c.size()) : 0);
  const ByteLayout l =
      ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(c.size()), bytes));
  c.gatherv(mine.data(), bytes, all.data(), l, 0);
  return all;
}

std::vector<uint64_t> allgather_u64(Communicator& c, uint64_t v) {
  std::vector<uint64_t> all(static_cast<size_t>(c.size()));
  c.allgatherv(&v, sizeof v, all.data(),
               ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(c.size()), sizeof v)));
  return all;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size();
  return m % 2 ? v[m / 2] : 0.5 * (v[m / 2 - 1] + v[m / 2]);
}

struct Mode {
  std::string name;
  int bits;
  bool library_allreduce = false;  // fp32 through MPI_Allreduce instead of the ring
  size_t hierarchy = 0;            // index into --hierarchy
};

Mode parse_mode(const std::string& s) {
  if (s == "fp32") return {s, kFp32Bits};
  if (s == "fp32-mpi") return {s, kFp32Bits, true};
  if (s.size() == 4 && s.rfind("int", 0) == 0 && s[3] >= '2' && s[3] <= '8') return {s, s[3] - '0'};
  INT4DDP_FAIL("--modes: '", s, "' is not one of fp32, fp32-mpi, int2 .. int8");
}

std::string human_bytes(uint64_t b) {
  char buf[32];
  if (b >= (uint64_t{1} << 30) && b % (uint64_t{1} << 30) == 0)
    std::snprintf(buf, sizeof buf, "%lluG", static_cast<unsigned long long>(b >> 30));
  else if (b >= (uint64_t{1} << 20) && b % (uint64_t{1} << 20) == 0)
    std::snprintf(buf, sizeof buf, "%lluM", static_cast<unsigned long long>(b >> 20));
  else if (b >= 1024 && b % 1024 == 0)
    std::snprintf(buf, sizeof buf, "%lluK", static_cast<unsigned long long>(b >> 10));
  else
    std::snprintf(buf, sizeof buf, "%llu", static_cast<unsigned long long>(b));
  return buf;
}

struct Row {
  std::string mode;
  std::string hierarchy = "flat";  // flat, or "node MxK"
  double x_flat = 0;               // the first listed hierarchy's time / this time
  uint64_t bytes = 0;
  int64_t count = 0;
  double time_s = 0;
  double quant_s = 0, comm_s = 0;  // median over iterations, maximum over ranks
  double quantize_s = 0, reduce_s = 0, dequantize_s = 0;  // quant_s by phase, likewise
  int pieces = 1;                                         // pipeline pieces per chunk (flat)
  float gamma = 1.0f;                                     // after the timed iterations
  uint64_t wire_bytes = 0;    // modelled: Communicator::bytes_sent, maximum over ranks
  double predicted = 0;       // modelled: modelled_wire_bytes()
  double rel_err_first = -1;  // of the first step (fresh bucket)
  double rel_err = -1;        // of the last step
  int64_t wrong = -1;
  double node_phases_s[4] = {0, 0, 0, 0};  // HierarchyPhases in order, slowest rank's median
};

struct Options {
  uint64_t min_bytes = 4096, max_bytes = uint64_t{256} << 20;
  int step_factor = 4, iters = 20, warmup = 3;
  std::string modes = "fp32,fp32-mpi,int4,int8";
  int64_t block_size = quant::kDefaultBlockSize;
  bool check = true, error_feedback = true;
  std::string rounding = "stochastic", policy = "lbt";
  std::string hierarchy = "flat";
  uint64_t seed = 1;
  int pipeline_chunks = 0;
  std::string barrier = "polite";
};

// The barrier before each timed run (see Timing above).
void iteration_barrier(Communicator& comm, const Options& o) {
  if (o.barrier == "mpi") {
    comm.barrier();
    return;
  }
  float token = 0.0f;
  const std::unique_ptr<Request> r = comm.iallreduce_sum(&token, 1);
  wait_politely(*r);
}

// One (size, mode) cell: warm-up, timed iterations, then the checks.
Row bench_one(Hierarchy& hier, const Options& o, const Mode& mode, int64_t n,
              std::vector<float>& input, std::vector<float>& work) {
  Communicator& comm = hier.world();
  const int N = comm.size(), me = comm.rank();
  // The fp32 algorithm of this row, restored on the way out.
  struct AlgorithmScope {
    Communicator& c;
    ~AlgorithmScope() { c.set_allreduce_algorithm(Communicator::AllreduceAlgorithm::kRing); }
  } scope{comm};
  comm.set_allreduce_algorithm(mode.library_allreduce ? Communicator::AllreduceAlgorithm::kLibrary
                                                      : Communicator::AllreduceAlgorithm::kRing);
  CompressConfig cfg;
  cfg.bits = mode.bits;
  cfg.block_size = o.block_size;
  cfg.rounding = o.rounding == "nearest" ? quant::Rounding::kNearest : quant::Rounding::kStochastic;
  cfg.worker_error_feedback = cfg.server_error_feedback = o.error_feedback;
  cfg.policy.kind = quant::parse_policy_kind(o.policy);
  cfg.seed = static_cast<uint32_t>(o.seed);
  cfg.pipeline_chunks = o.pipeline_chunks;
  BucketAllreduce ts(hier, cfg, n, 0);
  const bool commit_steps = cfg.policy.kind == quant::PolicyKind::kLbt;

  Row row;
  row.mode = mode.name;
  row.bytes = static_cast<uint64_t>(n) * sizeof(float);
  row.count = n;
  row.predicted = modelled_wire_bytes(mode.bits, n, o.block_size, N);
  row.pieces = pipeline_pieces(cfg, n, N);
  if (hier.active()) {
    const int K = hier.ranks_per_node(), M = hier.nodes();
    row.hierarchy = "node " + std::to_string(M) + "x" + std::to_string(K);
    const int64_t G = mode.bits == kFp32Bits ? 2 : o.block_size;  // as BucketAllreduce splits
    row.predicted =
        modelled_wire_bytes(mode.bits, chunk_range(n, G, K, 0).count(), o.block_size, M);
  }

  std::vector<double> times, quant_times, comm_times, phase_times[3], node_times[4];
  std::vector<float> first_out;  // the first step's output, for rel_err_first
  uint64_t wire = 0;
  for (int it = 0; it < o.warmup + o.iters; ++it) {
    std::memcpy(work.data(), input.data(), static_cast<size_t>(n) * sizeof(float));
    iteration_barrier(comm, o);
    const auto t0 = Clock::now();
    const BucketStats st = ts.run(work.data(), static_cast<uint32_t>(it));
    const double t = seconds_since(t0);
    ts.commit(commit_steps);
    if (it == 0 && o.check) first_out = work;
    if (it >= o.warmup) {
      times.push_back(t);
      quant_times.push_back(st.quant_seconds);
      comm_times.push_back(st.comm_seconds);
      phase_times[0].push_back(st.quantize_seconds);
      phase_times[1].push_back(st.reduce_seconds);
      phase_times[2].push_back(st.dequantize_seconds);
      const HierarchyPhases& hp = ts.phases();
      node_times[0].push_back(hp.scatter_wait_s);
      node_times[1].push_back(hp.node_sum_s);
      node_times[2].push_back(hp.cross_s);
      node_times[3].push_back(hp.gather_wait_s);
    }
    wire = st.wire_bytes;
  }
  // Per iteration the slowest rank; the median of those. The split into quantize and collective
  // time: each rank's median, the slowest rank's.
  const std::vector<double> all_times = gather_to_root(comm, times);
  const std::vector<double> split = gather_to_root(
      comm, std::vector<double>{median(quant_times), median(comm_times), median(phase_times[0]),
                                median(phase_times[1]), median(phase_times[2])});
  if (me == 0)
    for (int r = 0; r < N; ++r) {
      const double* s = split.data() + 5 * static_cast<size_t>(r);
      row.quant_s = std::max(row.quant_s, s[0]);
      row.comm_s = std::max(row.comm_s, s[1]);
      row.quantize_s = std::max(row.quantize_s, s[2]);
      row.reduce_s = std::max(row.reduce_s, s[3]);
      row.dequantize_s = std::max(row.dequantize_s, s[4]);
    }
  if (hier.active()) {  // the node phases likewise
    const std::vector<double> node_split =
        gather_to_root(comm, std::vector<double>{median(node_times[0]), median(node_times[1]),
                                                 median(node_times[2]), median(node_times[3])});
    if (me == 0)
      for (size_t i = 0; i < node_split.size(); ++i)
        row.node_phases_s[i % 4] = std::max(row.node_phases_s[i % 4], node_split[i]);
  }
  const std::vector<uint64_t> wires = allgather_u64(comm, wire);
  row.wire_bytes = *std::max_element(wires.begin(), wires.end());
  row.gamma = ts.gamma();
  if (me == 0 && !times.empty()) {
    std::vector<double> slowest(times.size(), 0.0);
    for (int r = 0; r < N; ++r)
      for (size_t k = 0; k < times.size(); ++k)
        slowest[k] = std::max(slowest[k], all_times[static_cast<size_t>(r) * times.size() + k]);
    row.time_s = median(slowest);
  }
  if (!o.check) return row;

  // The outputs are compared across ranks (compressed modes must be bit-identical); rel_err of
  // the first and the last output against the exact mean, each rank summing a slice.
  int64_t wrong = 0;
  const std::vector<uint64_t> hashes =
      allgather_u64(comm, test::fnv1a(work.data(), static_cast<size_t>(n) * sizeof(float)));
  if (!mode.library_allreduce) wrong += hashes[static_cast<size_t>(me)] != hashes[0];
  const int64_t lo = n * me / N, hi = n * (me + 1) / N;
  auto rel_err_of = [&](const std::vector<float>& out) {
    std::vector<double> sums(2, 0.0);  // ||out - mean||^2, ||mean||^2 over this rank's slice
    for (int64_t i = lo; i < hi; ++i) {
      double mean = 0;
      for (int r = 0; r < N; ++r) mean += random_value(o.seed, r, i);
      mean /= N;
      const double e = out[static_cast<size_t>(i)] - mean;
      sums[0] += e * e;
      sums[1] += mean * mean;
    }
    const std::vector<double> all_sums = gather_to_root(comm, sums);
    double e2 = 0, m2 = 0;
    if (me == 0)
      for (int r = 0; r < N; ++r) {
        e2 += all_sums[2 * static_cast<size_t>(r)];
        m2 += all_sums[2 * static_cast<size_t>(r) + 1];
      }
    return m2 > 0 ? std::sqrt(e2 / m2) : 0.0;
  };
  row.rel_err_first = rel_err_of(first_out);
  row.rel_err = rel_err_of(work);

  // #wrong on grid-valued inputs, on a fresh bucket (exact only with gamma = 1 and no error
  // feedback yet: not under --policy fixed).
  BucketAllreduce fresh(hier, cfg, n, 0);
  if (cfg.bits != kFp32Bits && fresh.gamma() != 1.0f) {
    comm.allreduce_sum_i64(&wrong, 1);
    row.wrong = wrong > 0 ? wrong : -1;
    return row;
  }
  const bool stochastic = cfg.rounding == quant::Rounding::kStochastic;
  const float c = test::rank_factor(me, N);
  for (int64_t i = 0; i < n; ++i)
    work[static_cast<size_t>(i)] =
        c * grid_mean_value(o.seed, i, o.block_size, mode.bits, stochastic);
  fresh.run(work.data(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const float want = grid_mean_value(o.seed, i, o.block_size, mode.bits, stochastic);
    wrong += std::memcmp(&want, &work[static_cast<size_t>(i)], sizeof want) != 0;
  }
  comm.allreduce_sum_i64(&wrong, 1);
  row.wrong = wrong;
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{
      "bench_allreduce: fp32 ring and MPI all-reduce vs the two-shot INT4/INT8 all-reduce"};
  app.add_option("--min-bytes", o.min_bytes, "smallest fp32 gradient (bytes; K, M, G suffixes)")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--max-bytes", o.max_bytes, "largest fp32 gradient (bytes; K, M, G suffixes)")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--step-factor", o.step_factor, "size multiplier between rows")
      ->check(CLI::Range(2, 1024));
  app.add_option("--iters", o.iters, "timed iterations per cell")->check(CLI::Range(1, 100000));
  app.add_option("--warmup", o.warmup, "untimed iterations per cell")->check(CLI::Range(0, 100000));
  app.add_option("--modes", o.modes,
                 "comma-separated: fp32 (ring), fp32-mpi (MPI_Allreduce), int4, int8 (int2..int8)");
  app.add_option("--block-size", o.block_size, "G, elements per scale (even)");
  app.add_flag("--check,!--no-check", o.check, "compute rel_err and #wrong (default on)");
  app.add_flag("--error-feedback,!--no-error-feedback", o.error_feedback,
               "worker and server error feedback (default on)");
  app.add_option("--rounding", o.rounding, "stochastic or nearest")
      ->check(CLI::IsMember({"stochastic", "nearest"}));
  app.add_option("--policy", o.policy, "minmax, fixed, lbt or topk (k = 4)")
      ->check(CLI::IsMember({"minmax", "fixed", "lbt", "topk"}));
  app.add_option("--seed", o.seed, "input and rounding seed");
  app.add_option("--pipeline-chunks", o.pipeline_chunks,
                 "two-shot pieces per chunk: 0 = auto, 1 = unpipelined collectives")
      ->check(CLI::Range(0, kMaxPipelinePieces));
  app.add_option("--hierarchy", o.hierarchy,
                 "comma-separated comm.hierarchy values to run each mode under: flat, node, auto");
  app.add_option("--barrier", o.barrier,
                 "before each timed run: polite (waits without spinning) or mpi (MPI_Barrier)")
      ->check(CLI::IsMember({"polite", "mpi"}));
  CLI11_PARSE(app, argc, argv);

  std::unique_ptr<Communicator> comm;
  try {
    INT4DDP_CHECK(o.min_bytes >= 4 && o.min_bytes % 4 == 0 && o.max_bytes % 4 == 0,
                  "--min-bytes and --max-bytes must be positive multiples of 4 (fp32)");
    INT4DDP_CHECK(o.min_bytes <= o.max_bytes, "--min-bytes ", o.min_bytes, " > --max-bytes ",
                  o.max_bytes);
    std::vector<Mode> modes;
    std::stringstream ss(o.modes);
    for (std::string m; std::getline(ss, m, ',');)
      if (!m.empty()) modes.push_back(parse_mode(m));
    INT4DDP_CHECK(!modes.empty(), "--modes is empty");
    std::vector<HierarchyMode> hier_modes;
    std::stringstream hs(o.hierarchy);
    for (std::string h; std::getline(hs, h, ',');) {
      if (h.empty()) continue;
      bool known = false;
      for (HierarchyMode m : {HierarchyMode::kAuto, HierarchyMode::kFlat, HierarchyMode::kNode})
        if (h == hierarchy_mode_name(m)) hier_modes.push_back(m), known = true;
      INT4DDP_CHECK(known, "--hierarchy: '", h, "' is not one of auto, flat, node");
    }
    INT4DDP_CHECK(!hier_modes.empty(), "--hierarchy is empty");
    {  // every mode under every hierarchy, the hierarchies of one mode together
      std::vector<Mode> cells;
      for (const Mode& m : modes)
        for (size_t h = 0; h < hier_modes.size(); ++h)
          cells.push_back({m.name, m.bits, m.library_allreduce, h});
      modes = cells;
    }
    {
      CompressConfig probe;
      probe.block_size = o.block_size;
      probe.validate();  // refuses a block size that cannot work, before MPI starts
    }

    comm = make_mpi_communicator();
    const int N = comm->size();
    const bool root = comm->rank() == 0;
    std::vector<std::unique_ptr<Hierarchy>> hierarchies;  // collective to make: all up front
    for (HierarchyMode m : hier_modes) hierarchies.push_back(std::make_unique<Hierarchy>(*comm, m));
    if (root) {
      std::printf(
          "# bench_allreduce: %d rank(s), block %lld, %s rounding, policy %s, error feedback %s, "
          "codec %s\n",
          N, static_cast<long long>(o.block_size), o.rounding.c_str(), o.policy.c_str(),
          o.error_feedback ? "on" : "off", quant::isa_name(quant::current_isa()));
      std::printf(
          "# time: median over %d iterations (after %d warm-up) of the slowest rank; "
          "algbw = 4n/t, busbw = algbw * 2(N-1)/N\n",
          o.iters, o.warmup);
      for (size_t h = 0; h < hierarchies.size(); ++h)
        std::printf("# hierarchy %s: %s\n", hierarchy_mode_name(hier_modes[h]),
                    hierarchies[h]->description().c_str());
      std::printf(
          "# wire bytes per rank are MODELLED, not measured: wire_mod = Communicator::bytes_sent "
          "(max over ranks), formula_mod = 2(N-1)/N (n b/8 + 4n/G)\n");
      std::printf(
          "%10s %11s %8s %9s %11s %10s %10s %7s %7s %11s %11s %11s %11s %11s %4s %7s %12s %12s "
          "%7s %10s %10s %7s\n",
          "size", "count", "mode", "hier", "time(us)", "algbw", "busbw", "x_fp32", "x_flat",
          "quant(us)", "qz(us)", "red(us)", "dq(us)", "coll(us)", "pcs", "gamma", "wire_mod",
          "formula_mod", "diff%", "rel_err1", "rel_err", "#wrong");
      std::printf(
          "%10s %11s %8s %9s %11s %10s %10s %7s %7s %11s %11s %11s %11s %11s %4s %7s %12s %12s "
          "%7s %10s %10s %7s\n",
          "(B)", "(floats)", "", "", "", "(GB/s)", "(GB/s)", "", "", "", "", "", "", "", "", "",
          "(B)", "(B)", "", "", "", "");
      std::fflush(stdout);
    }

    std::vector<Row> rows;
    bool any_wrong = false;
    std::vector<float> input, work;
    for (uint64_t bytes = o.min_bytes; bytes <= o.max_bytes;) {
      const int64_t n = static_cast<int64_t>(bytes / sizeof(float));
      input.resize(static_cast<size_t>(n));
      work.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i)
        input[static_cast<size_t>(i)] = random_value(o.seed, comm->rank(), i);
      double fp32_time = 0, flat_time = 0;
      for (const Mode& m : modes) {
        Row row = bench_one(*hierarchies[m.hierarchy], o, m, n, input, work);
        if (m.name == "fp32" && fp32_time == 0) fp32_time = row.time_s;
        if (m.hierarchy == 0) flat_time = row.time_s;
        if (row.time_s > 0) row.x_flat = flat_time / row.time_s;
        any_wrong = any_wrong || row.wrong > 0;
        if (root) {
          const double algbw = row.time_s > 0 ? 4.0 * n / row.time_s / 1e9 : 0.0;
          const double busbw = algbw * 2.0 * (N - 1) / N;
          char speed[16] = "-", diff[16] = "-", rel1[16] = "-", rel[16] = "-", wrong[24] = "-";
          char x_flat[16] = "-";
          if (fp32_time > 0 && row.time_s > 0)
            std::snprintf(speed, sizeof speed, "%.2f", fp32_time / row.time_s);
          if (m.hierarchy > 0 && row.x_flat > 0)
            std::snprintf(x_flat, sizeof x_flat, "%.2f", row.x_flat);
          if (row.predicted > 0)
            std::snprintf(diff, sizeof diff, "%+.2f",
                          100.0 * (row.wire_bytes - row.predicted) / row.predicted);
          if (row.rel_err_first >= 0) std::snprintf(rel1, sizeof rel1, "%.3e", row.rel_err_first);
          if (row.rel_err >= 0) std::snprintf(rel, sizeof rel, "%.3e", row.rel_err);
          if (row.wrong >= 0)
            std::snprintf(wrong, sizeof wrong, "%lld", static_cast<long long>(row.wrong));
          std::printf(
              "%10s %11lld %8s %9s %11.1f %10.3f %10.3f %7s %7s %11.1f %11.1f %11.1f %11.1f "
              "%11.1f %4d %7.4f %12llu %12.0f %7s %10s %10s %7s\n",
              human_bytes(bytes).c_str(), static_cast<long long>(n), m.name.c_str(),
              row.hierarchy.c_str(), row.time_s * 1e6, algbw, busbw, speed, x_flat,
              row.quant_s * 1e6, row.quantize_s * 1e6, row.reduce_s * 1e6, row.dequantize_s * 1e6,
              row.comm_s * 1e6, row.pieces, row.gamma,
              static_cast<unsigned long long>(row.wire_bytes), row.predicted, diff, rel1, rel,
              wrong);
          if (m.hierarchy > 0 && row.hierarchy != "flat")
            std::printf(
                "# %s %s phases (us): scatter_wait %.1f, node_sum %.1f, cross %.1f, "
                "gather_wait %.1f\n",
                m.name.c_str(), row.hierarchy.c_str(), row.node_phases_s[0] * 1e6,
                row.node_phases_s[1] * 1e6, row.node_phases_s[2] * 1e6, row.node_phases_s[3] * 1e6);
          std::fflush(stdout);
        }
        rows.push_back(row);
      }
      if (bytes > o.max_bytes / static_cast<uint64_t>(o.step_factor)) break;
      bytes *= static_cast<uint64_t>(o.step_factor);
    }

    if (root) {
      std::printf(
          "{\"bench\":\"allreduce\",\"ranks\":%d,\"block_size\":%lld,\"policy\":\"%s\","
          "\"rows\":[",
          N, static_cast<long long>(o.block_size), o.policy.c_str());
      for (size_t k = 0; k < rows.size(); ++k) {
        const Row& r = rows[k];
        char rel1[32] = "null", rel[32] = "null", wrong[32] = "null";
        if (r.rel_err_first >= 0) std::snprintf(rel1, sizeof rel1, "%.6e", r.rel_err_first);
        if (r.rel_err >= 0) std::snprintf(rel, sizeof rel, "%.6e", r.rel_err);
        if (r.wrong >= 0)
          std::snprintf(wrong, sizeof wrong, "%lld", static_cast<long long>(r.wrong));
        std::printf(
            "%s{\"mode\":\"%s\",\"hierarchy\":\"%s\",\"x_flat\":%.4g,\"bytes\":%llu,"
            "\"time_s\":%.9g,\"quant_s\":%.6g,\"quantize_s\":%.6g,\"reduce_s\":%.6g,"
            "\"dequantize_s\":%.6g,\"comm_s\":%.6g,\"pieces\":%d,\"gamma\":%.6g,"
            "\"wire_bytes_modelled\":%llu,\"formula_wire_bytes_modelled\":%.0f,"
            "\"rel_err_first\":%s,\"rel_err\":%s,"
            "\"node_phases_s\":[%.6g,%.6g,%.6g,%.6g],\"wrong\":%s}",
            k ? "," : "", r.mode.c_str(), r.hierarchy.c_str(), r.x_flat,
            static_cast<unsigned long long>(r.bytes), r.time_s, r.quant_s, r.quantize_s, r.reduce_s,
            r.dequantize_s, r.comm_s, r.pieces, r.gamma,
            static_cast<unsigned long long>(r.wire_bytes), r.predicted, rel1, rel,
            r.node_phases_s[0], r.node_phases_s[1], r.node_phases_s[2], r.node_phases_s[3], wrong);
      }
      std::printf("]}\n");
      std::fflush(stdout);
      if (any_wrong) std::fprintf(stderr, "bench_allreduce: wrong results (see #wrong)\n");
    }
    return any_wrong ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_allreduce: error: %s\n", e.what());
    abort_world(2);
    return 2;
  }
}
