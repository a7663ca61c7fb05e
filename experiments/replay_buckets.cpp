// replay_buckets: replays recorded weight-gradient buckets (comm.dump_buckets_every, see
// src/train/bucket_dump.h) through the two-shot all-reduce the trainer uses (comm::TwoShotAllreduce
// over the MPI communicator, one process per recorded rank) with each bucket interval policy at
// equal bytes, and reports the relative error of the all-reduced mean against the exact mean:
//   step error  mean over the dumps of ||mean^_t - mean_t|| / ||mean_t||
//   sum error   ||sum_t (mean^_t - mean_t)|| / ||sum_t mean_t||, what error feedback bounds
// over all compressed buckets of a dump, in step order (the dumps play as consecutive steps: error
// feedback and the lbt state carry from one to the next). The exact mean is summed in double from
// every rank's dump on rank 0. Nothing here quantizes: every code comes from the two-shot.
//
// Usage: mpirun -np N replay_buckets --dir DUMPS [--policies LIST] [--bits 4] [--block-size 512]
//   LIST: comma-separated minmax | fixed:GAMMA | lbt | lbt:ALPHA:ETA | mse | topk:K
// Prints a table and ends with one JSON line: {"model", "ranks", "dumps", "elements",
// "policies": {NAME: {"ef_step", "ef_sum", "noef_step", "noef_sum", "clip_fraction"}}}.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/two_shot.h"
#include "kernels/common/error.h"
#include "src/train/bucket_dump.h"

namespace {
using namespace int4ddp;
namespace fs = std::filesystem;

struct PolicySpec {
  std::string name;
  quant::PolicyConfig cfg;
};

PolicySpec parse_spec(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  for (std::string p; std::getline(ss, p, ':');) parts.push_back(p);
  INT4DDP_CHECK(!parts.empty(), "--policies: empty entry");
  PolicySpec spec{s, {}};
  spec.cfg.kind = quant::parse_policy_kind(parts[0]);
  const auto num = [&](size_t i) {
    INT4DDP_CHECK(parts.size() > i, "--policies: '", s, "' needs a value after ':'");
    return std::stod(parts[i]);
  };
  switch (spec.cfg.kind) {
    case quant::PolicyKind::kFixed:
      spec.cfg.fixed_gamma = static_cast<float>(num(1));
      break;
    case quant::PolicyKind::kLbt:
      if (parts.size() > 1) spec.cfg.alpha = num(1);
      if (parts.size() > 2) spec.cfg.eta = static_cast<float>(num(2));
      break;
    case quant::PolicyKind::kTopK:
      spec.cfg.topk = static_cast<int>(num(1));
      break;
    default:
      break;
  }
  return spec;
}

// Steps that have a dump for every rank, ascending.
std::vector<uint64_t> dump_steps(const std::string& dir, int ranks) {
  std::map<uint64_t, int> seen;
  for (const auto& e : fs::directory_iterator(dir)) {
    unsigned long long step = 0;
    unsigned rank = 0;
    if (std::sscanf(e.path().filename().c_str(), "step_%llu.rank_%u.bkt", &step, &rank) == 2)
      ++seen[step];
  }
  std::vector<uint64_t> steps;
  for (const auto& [step, n] : seen)
    if (n == ranks) steps.push_back(step);
  return steps;
}

std::string dump_path(const std::string& dir, uint64_t step, int rank) {
  return (fs::path(dir) / train::bucket_dump_name(step, static_cast<uint32_t>(rank))).string();
}

struct Errors {
  double step = 0, sum = 0, clip_fraction = 0;
  std::vector<double> per_step, mean_norm;  // relative error and ||exact mean|| of each dump
};

// Plays every dump through fresh two-shots configured by cc (one per bucket). Rank 0 returns the
// errors; exact[t] is the exact mean of dump t (rank 0 only).
Errors replay(comm::Communicator& comm, const std::string& dir, const std::vector<uint64_t>& steps,
              const comm::CompressConfig& cc, const std::vector<std::vector<double>>& exact,
              size_t skip) {
  std::vector<std::unique_ptr<comm::TwoShotAllreduce>> shots;
  std::vector<double> err_sum, mean_sum;  // rank 0: running sums over the dumps
  Errors e;
  int64_t clipped = 0, quantized = 0;
  for (size_t t = 0; t < steps.size(); ++t) {
    train::BucketDump d = train::read_bucket_dump(dump_path(dir, steps[t], comm.rank()));
    if (shots.empty()) {
      for (size_t b = 0; b < d.buckets.size(); ++b)
        shots.push_back(std::make_unique<comm::TwoShotAllreduce>(
            comm, cc, static_cast<int64_t>(d.buckets[b].size()), static_cast<uint32_t>(b)));
    }
    INT4DDP_CHECK(d.buckets.size() == shots.size(), dump_path(dir, steps[t], comm.rank()),
                  ": bucket count changed between dumps");
    std::vector<float> flat;
    for (size_t b = 0; b < d.buckets.size(); ++b) {
      INT4DDP_CHECK(static_cast<int64_t>(d.buckets[b].size()) == shots[b]->count(),
                    "bucket sizes changed between dumps");
      const comm::BucketStats st =
          shots[b]->run(d.buckets[b].data(), static_cast<uint32_t>(steps[t]));
      shots[b]->commit(true);
      clipped += st.clipped;
      quantized += st.count;
      flat.insert(flat.end(), d.buckets[b].begin(), d.buckets[b].end());
    }
    if (comm.rank() != 0 || t < skip) continue;  // warm-up dumps: state only, not scored
    const std::vector<double>& m = exact[t];
    if (err_sum.empty()) err_sum.assign(m.size(), 0.0), mean_sum.assign(m.size(), 0.0);
    double num = 0, den = 0;
    for (size_t i = 0; i < m.size(); ++i) {
      const double diff = static_cast<double>(flat[i]) - m[i];
      num += diff * diff;
      den += m[i] * m[i];
      err_sum[i] += diff;
      mean_sum[i] += m[i];
    }
    e.step += den > 0 ? std::sqrt(num / den) / static_cast<double>(steps.size() - skip) : 0.0;
    e.per_step.push_back(den > 0 ? std::sqrt(num / den) : 0.0);
    e.mean_norm.push_back(std::sqrt(den));
  }
  if (comm.rank() == 0) {
    double num = 0, den = 0;
    for (size_t i = 0; i < err_sum.size(); ++i) {
      num += err_sum[i] * err_sum[i];
      den += mean_sum[i] * mean_sum[i];
    }
    e.sum = den > 0 ? std::sqrt(num / den) : 0.0;
    e.clip_fraction = quantized ? static_cast<double>(clipped) / quantized : 0.0;
  }
  return e;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  std::string policies =
      "minmax,fixed:0.9,fixed:0.8,fixed:0.7,fixed:0.6,fixed:0.5,lbt,lbt:0.0293:0.001,"
      "lbt:0.0293:0.02,topk:1,topk:2,topk:4,topk:8,topk:16,mse";
  int bits = 4;
  int64_t block_size = 512;
  bool per_step = false;
  size_t skip = 0;
  CLI::App app{"replay_buckets: recorded gradient buckets through the two-shot, per policy"};
  app.add_option("--dir", dir, "folder of one training's bucket dumps")->required();
  app.add_option("--policies", policies,
                 "comma-separated: minmax, fixed:G, lbt[:ALPHA:ETA], mse, topk:K");
  app.add_option("--bits", bits, "2..8 (equal bytes for every policy)");
  app.add_option("--block-size", block_size, "G, elements per scale");
  app.add_option("--skip", skip,
                 "replay the first S dumps (error feedback warms up) without scoring them");
  app.add_flag("--per-step", per_step, "also print each dump's relative error");
  CLI11_PARSE(app, argc, argv);
  try {
    std::vector<PolicySpec> specs;
    std::stringstream ss(policies);
    for (std::string p; std::getline(ss, p, ',');)
      if (!p.empty()) specs.push_back(parse_spec(p));
    std::unique_ptr<comm::Communicator> comm = comm::make_mpi_communicator();
    const int N = comm->size();
    const bool root = comm->rank() == 0;
    const std::vector<uint64_t> steps = dump_steps(dir, N);
    INT4DDP_CHECK(steps.size() > skip, "--dir '", dir, "': no step has a dump for each of ", N,
                  " ranks beyond the --skip ", skip, " (run as many ranks as the training had)");
    // The exact means, in double, from every rank's dump (rank 0).
    std::vector<std::vector<double>> exact;
    std::string model;
    if (root) {
      for (uint64_t s : steps) {
        std::vector<double> m;
        if (exact.size() < skip) {  // not scored
          exact.push_back(std::move(m));
          continue;
        }
        for (int r = 0; r < N; ++r) {
          const train::BucketDump d = train::read_bucket_dump(dump_path(dir, s, r));
          INT4DDP_CHECK(static_cast<int>(d.ranks) == N, dump_path(dir, s, r), ": recorded with ",
                        d.ranks, " ranks, replayed with ", N);
          model = d.model;
          size_t at = 0;
          for (const auto& b : d.buckets)
            for (float v : b) {
              if (r == 0) m.push_back(0.0);
              m[at++] += static_cast<double>(v) / N;
            }
        }
        exact.push_back(std::move(m));
      }
      std::printf(
          "# replay_buckets: %s, %d ranks, %zu dumps (steps %llu..%llu), %zu elements per "
          "dump, int%d, G = %lld, stochastic rounding\n",
          model.c_str(), N, steps.size(), static_cast<unsigned long long>(steps.front()),
          static_cast<unsigned long long>(steps.back()), exact.back().size(), bits,
          static_cast<long long>(block_size));
      std::printf("%-18s %10s %10s %10s %10s %9s %9s %8s\n", "policy", "EF step", "EF sum",
                  "noEF step", "noEF sum", "EF/minmx", "noEF/mm", "clip%");
    }
    nlohmann::json out = {{"model", model},
                          {"ranks", N},
                          {"dumps", steps.size()},
                          {"elements", root ? exact.back().size() : 0},
                          {"skip", skip}};
    double base_ef = 0, base_noef = 0;
    for (const PolicySpec& spec : specs) {
      comm::CompressConfig cc;
      cc.bits = bits;
      cc.block_size = block_size;
      cc.policy = spec.cfg;
      cc.seed = 0;
      const Errors ef = replay(*comm, dir, steps, cc, exact, skip);
      cc.worker_error_feedback = cc.server_error_feedback = false;
      const Errors noef = replay(*comm, dir, steps, cc, exact, skip);
      if (!root) continue;
      if (per_step) {
        std::printf("#   %s per dump (EF, noEF, ||mean||):", spec.name.c_str());
        for (size_t t = 0; t < steps.size(); ++t)
          std::printf(" %.3f/%.3f/%.3g", ef.per_step[t], noef.per_step[t], ef.mean_norm[t]);
        std::printf("\n");
      }
      if (spec.name == "minmax") base_ef = ef.step, base_noef = noef.step;
      std::printf("%-18s %10.5f %10.5f %10.5f %10.5f %9.3f %9.3f %8.4f\n", spec.name.c_str(),
                  ef.step, ef.sum, noef.step, noef.sum, base_ef > 0 ? ef.step / base_ef : 0.0,
                  base_noef > 0 ? noef.step / base_noef : 0.0, 100 * ef.clip_fraction);
      std::fflush(stdout);
      out["policies"][spec.name] = {{"ef_step", ef.step},
                                    {"ef_sum", ef.sum},
                                    {"noef_step", noef.step},
                                    {"noef_sum", noef.sum},
                                    {"clip_fraction", ef.clip_fraction}};
    }
    if (root) std::printf("%s\n", out.dump().c_str());
  } catch (const Error& e) {
    std::fprintf(stderr, "replay_buckets: %s\n", e.what());
    return 2;
  }
  return 0;
}
