// The trainer (see trainer.h).
#include "src/train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "comm/buckets.h"
#include "comm/communicator.h"
#include "kernels/common/error.h"
#include "kernels/common/parallel.h"
#include "src/data/dataset.h"
#include "src/nn/model.h"
#include "src/train/checkpoint.h"
#include "src/train/distributed.h"
#include "src/train/optim.h"

namespace int4ddp::train {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Datasets {
  data::Dataset train, test;
};

void truncate(data::Dataset& d, int64_t max_count) {
  if (max_count <= 0 || max_count >= d.count) return;
  d.count = max_count;
  d.images.resize(static_cast<size_t>(max_count * d.image_numel()));
  d.labels.resize(static_cast<size_t>(max_count));
}

Datasets load_datasets(const Config& cfg) {
  Datasets ds;
  const auto& dc = cfg.data;
  if (dc.dataset == "fashion_mnist") {
    ds.train = data::load_fashion_mnist(dc.path, "train");
    ds.test = data::load_fashion_mnist(dc.path, "test");
  } else if (dc.dataset == "cifar10") {
    ds.train = data::load_cifar10(dc.path, "train");
    ds.test = data::load_cifar10(dc.path, "test");
  } else if (dc.dataset == "synthetic") {
    data::SyntheticConfig sc;
    sc.seed = static_cast<uint64_t>(cfg.train.seed);
    sc.train_count = dc.synthetic_train_size;
    sc.test_count = dc.synthetic_test_size;
    sc.num_classes = cfg.model.num_classes;
    ds.train = data::make_synthetic(sc, "train");
    ds.test = data::make_synthetic(sc, "test");
  } else {
    INT4DDP_FAIL("data.dataset = '", dc.dataset,
                 "' is not one of fashion_mnist, synthetic, cifar10");
  }
  truncate(ds.train, dc.max_train_examples);
  truncate(ds.test, dc.max_test_examples);
  INT4DDP_CHECK(ds.train.num_classes <= cfg.model.num_classes,
                "model.num_classes = ", cfg.model.num_classes, " is smaller than the ",
                ds.train.num_classes, " classes of ", dc.dataset);
  if (dc.normalize) {
    const data::ChannelStats stats = data::compute_channel_stats(ds.train);
    data::normalize(ds.train, stats);
    data::normalize(ds.test, stats);
  }
  INT4DDP_CHECK(ds.train.count >= cfg.train.batch_size, "train.batch_size = ", cfg.train.batch_size,
                " is larger than the ", ds.train.count, " training examples");
  return ds;
}

nn::ModelSpec model_spec(const Config& cfg, const data::Dataset& d) {
  nn::ModelSpec s;
  s.name = cfg.model.name;
  s.channels = d.channels;
  s.height = d.height;
  s.width = d.width;
  s.num_classes = cfg.model.num_classes;
  s.mlp_hidden.assign(cfg.model.mlp_hidden.begin(), cfg.model.mlp_hidden.end());
  const auto& q = cfg.quant;
  const int fp32 =
      (q.weight_bits == kFp32Bits) + (q.activation_bits == kFp32Bits) + (q.grad_bits == kFp32Bits);
  INT4DDP_CHECK(fp32 == 0 || fp32 == 3,
                "quant: weight_bits, activation_bits and grad_bits must be "
                "all 32 (fp32) or all 2..8; mixed fp32/low-bit layers are not supported yet");
  s.quantized = fp32 == 0;
  s.fp32_first = q.first_layer_fp32;
  s.fp32_last = q.last_layer_fp32;
  s.quant.weight_bits = s.quantized ? q.weight_bits : 4;
  s.quant.act_bits = s.quantized ? q.activation_bits : 4;
  s.quant.grad_bits = s.quantized ? q.grad_bits : 4;
  s.quant.grad_policy.kind = quant::parse_policy_kind(q.grad_policy);
  s.quant.grad_policy.fixed_gamma = static_cast<float>(q.fixed_gamma);
  s.quant.grad_policy.alpha = q.alpha;
  s.quant.grad_policy.eta = static_cast<float>(q.eta);
  s.quant.grad_policy.lbt_calibrate = q.lbt_calibrate;
  s.quant.grad_rounding =
      q.grad_rounding == "nearest" ? quant::Rounding::kNearest : quant::Rounding::kStochastic;
  return s;
}

struct EvalResult {
  double loss = 0.0, accuracy = 0.0;
};

// Evaluates the test set; with a communicator of N ranks, rank r takes the examples i with
// i % N == r and the sums are all-reduced (every rank returns the same result).
EvalResult evaluate(nn::Model& model, const data::Dataset& d, int64_t batch,
                    comm::Communicator* comm = nullptr) {
  Tensor x, logits;
  std::vector<int32_t> labels;
  std::vector<int64_t> idx;
  double loss_sum = 0.0;
  int64_t correct_sum = 0;
  const int64_t rank = comm ? comm->rank() : 0, world = comm ? comm->size() : 1;
  const int64_t mine = d.count / world + (rank < d.count % world ? 1 : 0);
  for (int64_t start = 0; start < mine; start += batch) {
    const int64_t b = std::min(batch, mine - start);
    x.resize({b, d.channels, d.height, d.width});
    labels.resize(static_cast<size_t>(b));
    idx.resize(static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) idx[static_cast<size_t>(i)] = (start + i) * world + rank;
    data::assemble_batch(d, idx.data(), b, data::AugmentConfig{}, 0, 0, x.data(), labels.data());
    model.forward(x, logits, /*train=*/false);
    int64_t correct = 0;
    loss_sum += nn::softmax_cross_entropy(logits, labels.data(), nullptr, &correct) *
                static_cast<double>(b);
    correct_sum += correct;
  }
  if (comm && world > 1) {
    // The loss sum travels as a float sum of per-rank partial sums: ample for a metric.
    float l = static_cast<float>(loss_sum);
    int64_t c = correct_sum;
    comm->allreduce_sum(&l, 1);
    comm->allreduce_sum_i64(&c, 1);
    loss_sum = l;
    correct_sum = c;
  }
  return {loss_sum / static_cast<double>(d.count),
          static_cast<double>(correct_sum) / static_cast<double>(d.count)};
}

bool all_finite(const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

// Where training stands; saved in checkpoints.
struct Progress {
  int64_t epoch = 0;           // current epoch
  int64_t batch_in_epoch = 0;  // batches of this epoch already done
  int64_t global_batch = 0;    // batches done (calibration and skipped ones included)
  int64_t steps = 0;           // optimizer steps taken
  int64_t skipped = 0;         // non-finite batches skipped, in total
  int64_t consecutive_skips = 0;
  double epoch_loss_sum = 0.0;  // this epoch's running training loss (sum over examples)
  int64_t epoch_correct = 0, epoch_seen = 0;
};

// The model-defining part of the config: a checkpoint must match it to be resumed or evaluated.
std::string model_signature(nn::Model& m) {
  std::ostringstream os;
  os << m.spec().name << ";" << m.num_params();
  for (Param* p : m.params()) os << ";" << p->name;
  return os.str();
}

// Collective with data parallelism: every rank's local state is gathered, rank 0 writes the file.
void save_checkpoint(const std::string& path, const Config& cfg, nn::Model& model, Optimizer& opt,
                     const Progress& pr, DataParallel& dp) {
  const std::vector<std::vector<uint8_t>> ranks =
      dp.enabled() ? dp.gather_local_states(model) : std::vector<std::vector<uint8_t>>{};
  if (dp.rank() != 0) return;
  Checkpoint ck;
  if (dp.enabled()) {
    ck.put_value<int64_t>("dp.world_size", dp.world());
    for (size_t r = 0; r < ranks.size(); ++r)
      ck.put_vector("dp.rank." + std::to_string(r), ranks[r]);
  }
  ck.put_string("config_yaml", config_to_yaml(cfg));
  ck.put_string("model_signature", model_signature(model));
  ck.put("values", model.values(), sizeof(float) * static_cast<size_t>(model.num_params()));
  std::vector<float> buffers;
  for (std::vector<float>* b : model.buffers()) buffers.insert(buffers.end(), b->begin(), b->end());
  ck.put_vector("buffers", buffers);
  ck.put_vector("sgd_momentum", opt.momentum());
  ck.put_vector("adam_m", opt.adam_m());
  ck.put_vector("adam_v", opt.adam_v());
  ck.put_value<int64_t>("optimizer_steps", opt.steps());
  ck.put_value("progress", pr);
  const auto& qops = model.quantized_ops();
  for (size_t i = 0; i < qops.size(); ++i) {
    const std::string k = "quant." + std::to_string(i);
    ck.put_vector(k + ".policy", qops[i]->grad_state().policy->save_state());
    ck.put_vector(k + ".tracker", qops[i]->grad_state().tracker.save_state());
    ck.put_value<uint8_t>(k + ".initialized", qops[i]->initialized() ? 1 : 0);
  }
  ck.write(path);
  prune_checkpoints(std::filesystem::path(path).parent_path().string(), cfg.train.keep_checkpoints);
}

// Restores model (and optimizer) state from ck, read from path (named in errors).
Progress load_checkpoint(const Checkpoint& ck, const std::string& path, nn::Model& model,
                         Optimizer* opt) {
  const std::string sig = ck.get_string("model_signature");
  INT4DDP_CHECK(sig == model_signature(model), "checkpoint ", path,
                " holds another model than the config describes (", sig.substr(0, sig.find(';')),
                " with different parameters)");
  const auto values = ck.get_vector<float>("values");
  INT4DDP_CHECK(static_cast<int64_t>(values.size()) == model.num_params(), "checkpoint ", path,
                ": parameter count differs");
  std::copy(values.begin(), values.end(), model.values());
  const auto buffers = ck.get_vector<float>("buffers");
  size_t off = 0;
  for (std::vector<float>* b : model.buffers()) {
    INT4DDP_CHECK(off + b->size() <= buffers.size(), "checkpoint ", path,
                  ": batch-norm statistics are short");
    std::copy(buffers.begin() + static_cast<std::ptrdiff_t>(off),
              buffers.begin() + static_cast<std::ptrdiff_t>(off + b->size()), b->begin());
    off += b->size();
  }
  INT4DDP_CHECK(off == buffers.size(), "checkpoint ", path, ": batch-norm statistics are long");
  const auto& qops = model.quantized_ops();
  for (size_t i = 0; i < qops.size(); ++i) {
    const std::string k = "quant." + std::to_string(i);
    const auto pol = ck.get_vector<uint8_t>(k + ".policy");
    qops[i]->grad_state_mut().policy->load_state(pol.data(), pol.size());
    const auto tr = ck.get_vector<uint8_t>(k + ".tracker");
    qops[i]->grad_state_mut().tracker.load_state(tr.data(), tr.size());
    qops[i]->set_initialized(ck.get_value<uint8_t>(k + ".initialized") != 0);
  }
  if (opt) {
    auto restore = [&](const char* name, std::vector<float>& dst) {
      const auto v = ck.get_vector<float>(name);
      INT4DDP_CHECK(v.size() == dst.size(), "checkpoint ", path, ": ", name, " has the wrong size");
      dst = v;
    };
    restore("sgd_momentum", opt->momentum());
    restore("adam_m", opt->adam_m());
    restore("adam_v", opt->adam_v());
    opt->set_steps(ck.get_value<int64_t>("optimizer_steps"));
  }
  return ck.get_value<Progress>("progress");
}

// Data parallelism: this rank's own state from a checkpoint written by the same number of ranks.
void load_rank_state(const Checkpoint& ck, const std::string& path, DataParallel& dp,
                     nn::Model& model) {
  const int64_t saved = ck.has("dp.world_size") ? ck.get_value<int64_t>("dp.world_size") : 0;
  if (!dp.enabled()) {
    INT4DDP_CHECK(saved == 0, "checkpoint ", path, " was written by ", saved,
                  " ranks (a data-parallel run); this run has 1: resume it under mpirun with ",
                  saved, " ranks");
    return;
  }
  INT4DDP_CHECK(saved == dp.world(), "checkpoint ", path, " was written by ",
                saved == 0 ? std::string("a single process") : std::to_string(saved) + " ranks",
                "; this run has ", dp.world(),
                " ranks (the error feedback and the data shards are per rank)");
  dp.load_local_state(model, ck.get_vector<uint8_t>("dp.rank." + std::to_string(dp.rank())));
}

// Per-epoch sums of the step-time breakdown (this rank), for the epoch record.
struct StepTimes {
  int64_t steps = 0;
  double step_s = 0, compute_s = 0, quant_s = 0, comm_s = 0, wait_s = 0;
  uint64_t wire_bytes = 0;
  double ratio_sum = 0;
  void add(double step, double compute, const comm::StepCommStats& cs) {
    ++steps;
    step_s += step;
    compute_s += compute;
    quant_s += cs.quant_seconds;
    comm_s += cs.comm_seconds;
    wait_s += cs.wait_seconds;
    wire_bytes += cs.wire_bytes;
    ratio_sum += cs.compression_ratio;
  }
  json to_json() const {
    const double n = static_cast<double>(std::max<int64_t>(steps, 1));
    return {{"steps", steps},
            {"step_s", step_s / n},
            {"compute_s", compute_s / n},
            {"quant_s", quant_s / n},
            {"comm_s", comm_s / n},
            {"comm_wait_s", wait_s / n},
            {"bytes_sent", static_cast<double>(wire_bytes) / n},
            {"compression_ratio", ratio_sum / n}};
  }
};

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

json comm_json(const comm::StepCommStats& cs, double rel_err, bool enabled) {
  if (!enabled) return nullptr;
  json j = {{"quant_s", cs.quant_seconds},
            {"comm_s", cs.comm_seconds},
            {"comm_wait_s", cs.wait_seconds},
            {"bytes_sent", cs.wire_bytes},
            {"compression_ratio", cs.compression_ratio},
            {"clip_fraction", cs.clip_fraction()},
            {"bucket_gamma", cs.gammas}};
  if (rel_err >= 0) j["rel_err"] = rel_err;
  return j;
}

// ||compressed mean - exact fp32 mean|| / ||exact mean|| of this step's gradients, where raw holds
// this rank's gradients before the all-reduce (collective: one extra fp32 all-reduce).
double compressed_mean_error(DataParallel& dp, nn::Model& model, std::vector<float>& raw) {
  dp.sum(raw.data(), static_cast<int64_t>(raw.size()));
  const float n = static_cast<float>(dp.world());
  double num = 0, den = 0;
  const float* g = model.grads();
  for (size_t i = 0; i < raw.size(); ++i) {
    const double exact = raw[i] / n;
    num += (g[i] - exact) * (g[i] - exact);
    den += exact * exact;
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

class MetricsLog {
 public:
  MetricsLog(const std::string& path, bool append) {
    if (path.empty()) return;
    const std::filesystem::path p(path);
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
    f_.open(path, append ? std::ios::app : std::ios::trunc);
    INT4DDP_CHECK(f_.good(), "log.metrics_path: cannot write ", path);
  }
  void write(const json& j) {
    if (f_.is_open()) f_ << j.dump() << "\n" << std::flush;
  }

 private:
  std::ofstream f_;
};

// train.threads = 0: the cores this process may use, shared among the ranks of this node. A rank
// that mpirun bound to a subset of the machine's cores (its affinity mask is smaller than the
// machine) gets its mask; an unbound one divides the machine by the ranks on the node, read from
// OMPI_COMM_WORLD_LOCAL_SIZE (Open MPI) or MPI_LOCALNRANKS (MPICH); without either, 1 rank.
int automatic_threads() {
  const int cores = available_cores();
  const unsigned machine = std::thread::hardware_concurrency();
  if (machine > 0 && cores < static_cast<int>(machine)) return cores;
  int local = 1;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"})
    if (const char* v = std::getenv(var)) {
      local = std::max(1, std::atoi(v));
      break;
    }
  return std::max(1, cores / local);
}

json quant_diagnostics(nn::Model& model) {
  json layers = json::array();
  const auto& qops = model.quantized_ops();
  for (size_t i = 0; i < qops.size(); ++i) {
    const auto& g = qops[i]->grad_state();
    layers.push_back({{"layer", i},
                      {"gamma", g.last_gamma},
                      {"R", g.pending.clip_fraction()},
                      {"E", g.last_diag.error},
                      {"E_L", g.last_diag.error_large},
                      {"nonfinite", g.pending.nonfinite}});
  }
  return layers;
}

}  // namespace

RunSummary run_training(const Config& cfg, std::ostream& out_all, std::ostream& err) {
  validate(cfg);
  DataParallel dp(cfg);
  const int rank = dp.rank(), world = dp.world();
  std::ostream null_stream(nullptr);  // what ranks other than 0 print goes nowhere
  std::ostream& out = rank == 0 ? out_all : null_stream;
  // Results do not depend on the thread count (src/nn/layer.h), so automatic may differ by machine.
  const int threads = cfg.train.threads > 0 ? cfg.train.threads : automatic_threads();
  set_num_threads(threads);
  out << "int4ddp train: resolved config\n" << config_table(cfg) << std::flush;
  if (cfg.train.threads == 0) out << "train.threads: 0 (automatic) -> " << threads << "\n";
  if (dp.enabled())
    out << "data parallel: " << world << " rank(s), backend " << dp.comm().backend()
        << ", gradients " << cfg.comm.mode << "\n";
  Datasets ds = load_datasets(cfg);
  const uint64_t seed = static_cast<uint64_t>(cfg.train.seed);
  nn::Model model(model_spec(cfg, ds.train), seed);
  nn::QuantContext& qctx = model.quant_context();
  qctx.seed = static_cast<uint32_t>(seed);
  qctx.stream = static_cast<uint32_t>(rank);
  dp.broadcast_model(model);
  dp.attach(model, cfg);
  comm::BucketEngine* engine = dp.engine();

  OptimConfig oc;
  oc.lr = cfg.optim.lr;
  oc.momentum = cfg.optim.momentum;
  oc.nesterov = cfg.optim.nesterov;
  oc.weight_decay = cfg.optim.weight_decay;
  oc.quant_lr = cfg.quant.scale_lr;
  Optimizer opt(oc, model.params(), model.values(), model.grads(), model.num_params());
  ScheduleConfig sc;
  sc.kind = cfg.schedule.kind;
  sc.milestones = cfg.schedule.milestones;
  sc.factor = cfg.schedule.gamma;
  sc.min_lr = cfg.schedule.min_lr;
  sc.warmup_fraction = cfg.schedule.warmup_epochs / cfg.train.epochs;

  const int64_t batch = cfg.train.batch_size;
  // Each rank takes an equal shard of every epoch's permutation; the remainder is dropped.
  const int64_t shard = data::shard_size(ds.train.count, world);
  INT4DDP_CHECK(shard >= batch, "train.batch_size = ", batch, " is larger than the ", shard,
                " training examples of each of the ", world, " ranks");
  const int64_t per_epoch = shard / batch;
  const int64_t total_batches = per_epoch * cfg.train.epochs;

  Progress pr;
  const bool resumed = !cfg.train.resume.empty();
  if (resumed) {
    const Checkpoint ck = Checkpoint::read(cfg.train.resume);
    pr = load_checkpoint(ck, cfg.train.resume, model, &opt);
    load_rank_state(ck, cfg.train.resume, dp, model);
    out << "resumed from " << cfg.train.resume << " at epoch " << pr.epoch + 1 << ", batch "
        << pr.batch_in_epoch << "\n";
  }
  MetricsLog metrics(rank == 0 ? cfg.log.metrics_path : std::string(), resumed);
  if (rank == 0 && !cfg.log.metrics_path.empty() && !resumed) {
    std::ofstream cj(cfg.log.metrics_path + ".config.json", std::ios::trunc);
    cj << config_to_json(cfg) << "\n";
  }
  const bool bar =
      rank == 0 && (cfg.log.progress == "on" || (cfg.log.progress == "auto" && ::isatty(2)));
  const std::string ckdir = cfg.train.checkpoint_dir;
  for (const std::string& f :
       rank == 0 ? remove_stale_temp_files(ckdir) : std::vector<std::string>{})
    err << "int4ddp: removed " << f << ", left by a checkpoint writer that is gone\n";

  Tensor x({batch, ds.train.channels, ds.train.height, ds.train.width}), logits, dlogits;
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  data::AugmentConfig aug;
  aug.crop_pad = cfg.data.random_crop_pad;
  aug.flip = cfg.data.random_flip;

  RunSummary summary;
  std::vector<std::vector<float>> saved_buffers;
  std::vector<float> raw_grads;  // sampled steps: local gradients before the all-reduce
  const auto t_start = Clock::now();
  int64_t images_done = 0;
  EvalResult last_eval;
  bool evaluated_last = false;
  for (; pr.epoch < cfg.train.epochs; ++pr.epoch, pr.batch_in_epoch = 0) {
    if (pr.batch_in_epoch == 0) pr.epoch_loss_sum = 0.0, pr.epoch_correct = pr.epoch_seen = 0;
    const std::vector<int64_t> perm =
        data::shard(data::epoch_permutation(ds.train.count, seed, pr.epoch), rank, world);
    double& loss_sum = pr.epoch_loss_sum;
    int64_t& correct_sum = pr.epoch_correct;
    int64_t& seen = pr.epoch_seen;
    const auto t_epoch = Clock::now();
    StepTimes epoch_time;
    for (; pr.batch_in_epoch < per_epoch; ++pr.batch_in_epoch) {
      if (cfg.train.max_steps > 0 && pr.steps >= cfg.train.max_steps) break;
      data::assemble_batch(ds.train, perm.data() + pr.batch_in_epoch * batch, batch, aug, seed,
                           pr.epoch, x.data(), labels.data());
      qctx.step = static_cast<uint32_t>(pr.global_batch);
      qctx.nonfinite = 0;
      qctx.diagnostics =
          cfg.log.diagnostics_every > 0 && pr.global_batch % cfg.log.diagnostics_every == 0;
      // Sampled steps compare the compressed mean with the exact fp32 mean (all buckets are then
      // launched after backward, from a copy of the local gradients).
      const bool sample_error = engine && cfg.comm.mode != "fp32" && qctx.diagnostics;
      const auto t_step = Clock::now();
      model.zero_grad();
      // BN running statistics change in a training forward; a skipped step must not keep them.
      saved_buffers.clear();
      for (std::vector<float>* b : model.buffers()) saved_buffers.push_back(*b);
      // Every rank must agree on "calibration batch: no update"; the flag is summed below.
      int64_t flags[3] = {model.needs_calibration() ? 1 : 0, 0, 0};  // calibrating, bad, correct
      // The quantizer scales s_W, u_A initialise from the first batch a layer sees, which differs
      // between ranks: rank 0's values are broadcast after that step (as at the start).
      bool initialising = false;
      for (const nn::QuantizedOp* q : model.quantized_ops()) initialising |= !q->initialized();
      model.forward(x, logits, /*train=*/true);
      int64_t correct = 0;
      float loss = nn::softmax_cross_entropy(logits, labels.data(), &dlogits, &correct);
      if (engine) engine->begin_step(static_cast<uint32_t>(pr.global_batch));
      model.backward(dlogits, engine && !sample_error
                                  ? std::function<void(int64_t)>(
                                        [engine](int64_t off) { engine->ready_from(off); })
                                  : std::function<void(int64_t)>());
      const double compute_s = seconds_since(t_step);
      comm::StepCommStats cs;
      double rel_err = -1.0;
      if (engine) {
        if (sample_error) raw_grads.assign(model.grads(), model.grads() + model.num_params());
        cs = engine->finish();
        if (sample_error) rel_err = compressed_mean_error(dp, model, raw_grads);
      }
      ++pr.global_batch;
      flags[1] = (std::isfinite(loss) && qctx.nonfinite == 0 && cs.nonfinite == 0 &&
                  all_finite(model.grads(), model.num_params()))
                     ? 0
                     : 1;
      flags[2] = correct;
      dp.sum(flags, 3);
      dp.sum(&loss, 1);
      loss /= static_cast<float>(world);
      correct = flags[2];
      const bool calibrating = flags[0] > 0;
      const bool finite = flags[1] == 0;
      if (!finite) {
        if (engine) engine->commit(false);
        model.commit_quant_step(false);
        const auto buffers = model.buffers();
        for (size_t i = 0; i < buffers.size(); ++i) *buffers[i] = saved_buffers[i];
        if (initialising) dp.broadcast_model(model);
        ++pr.skipped;
        ++pr.consecutive_skips;
        metrics.write({{"type", "skip"},
                       {"batch", pr.global_batch},
                       {"loss", std::isfinite(loss) ? loss : -1.0f},
                       {"nonfinite_grads", qctx.nonfinite}});
        if (rank == 0)
          err << "int4ddp: warning: batch " << pr.global_batch
              << " has a non-finite loss or gradient on some rank; step skipped\n";
        INT4DDP_CHECK(pr.consecutive_skips < cfg.train.max_consecutive_skips,
                      "training stopped: ", pr.consecutive_skips,
                      " consecutive steps with non-finite loss or gradients "
                      "(train.max_consecutive_skips)");
        continue;
      }
      pr.consecutive_skips = 0;
      const double lr = scheduled_lr(sc, cfg.optim.lr, pr.global_batch - 1, total_batches);
      if (calibrating) {
        model.commit_quant_step(false);  // calibration batch: no update, gamma stays calibrated
        if (engine) engine->commit(false);
      } else {
        opt.step(lr);
        model.commit_quant_step(true);
        if (engine) engine->commit(true);
        ++pr.steps;
      }
      if (initialising) dp.broadcast_model(model);
      const int64_t global_batch = batch * world;
      loss_sum += loss * static_cast<double>(global_batch);
      correct_sum += correct;
      seen += global_batch;
      images_done += global_batch;
      const double step_s = seconds_since(t_step);
      epoch_time.add(step_s, compute_s, cs);
      const double secs = std::chrono::duration<double>(Clock::now() - t_start).count();
      const double ips = images_done / std::max(secs, 1e-9);
      if (qctx.diagnostics && !model.quantized_ops().empty())
        metrics.write(
            {{"type", "quant"}, {"batch", pr.global_batch}, {"layers", quant_diagnostics(model)}});
      const bool print = cfg.log.print_every > 0 && pr.global_batch % cfg.log.print_every == 0;
      if (print || calibrating)
        metrics.write(
            {{"type", "step"},
             {"epoch", pr.epoch + 1},
             {"batch", pr.global_batch},
             {"step", pr.steps},
             {"loss", loss},
             {"accuracy", static_cast<double>(correct) / static_cast<double>(global_batch)},
             {"lr", lr},
             {"img_per_s", ips},
             {"calibration", calibrating},
             {"skipped", pr.skipped},
             {"step_s", step_s},
             {"compute_s", compute_s},
             {"comm", comm_json(cs, rel_err, engine != nullptr)}});
      if (bar) {
        err << "\r[epoch " << pr.epoch + 1 << "/" << cfg.train.epochs << "] " << std::setw(5)
            << pr.batch_in_epoch + 1 << "/" << per_epoch << "  loss " << std::fixed
            << std::setprecision(4) << loss << "  " << std::setprecision(0) << ips << " img/s   "
            << std::flush;
      } else if (print) {
        out << "epoch " << pr.epoch + 1 << " batch " << pr.batch_in_epoch + 1 << "/" << per_epoch
            << " loss " << std::fixed << std::setprecision(4) << loss << " lr "
            << std::setprecision(5) << lr << " " << std::setprecision(0) << ips << " img/s\n"
            << std::defaultfloat << std::flush;
      }
      if (cfg.train.checkpoint_every_steps > 0 && pr.steps > 0 &&
          pr.steps % cfg.train.checkpoint_every_steps == 0 && !calibrating) {
        Progress next = pr;
        ++next.batch_in_epoch;
        save_checkpoint(ckdir + "/step_" + std::to_string(pr.steps) + ".ckpt", cfg, model, opt,
                        next, dp);
      }
    }
    if (bar) err << "\n";
    const bool stopped = cfg.train.max_steps > 0 && pr.steps >= cfg.train.max_steps;
    const bool last = pr.epoch + 1 == cfg.train.epochs || stopped;
    const bool eval_now = last || (cfg.train.eval_every_epochs > 0 &&
                                   (pr.epoch + 1) % cfg.train.eval_every_epochs == 0);
    json ej = {{"type", "epoch"},
               {"epoch", pr.epoch + 1},
               {"train_loss", seen ? loss_sum / static_cast<double>(seen) : 0.0},
               {"train_accuracy", seen ? static_cast<double>(correct_sum) / seen : 0.0},
               {"seconds", std::chrono::duration<double>(Clock::now() - t_epoch).count()},
               {"skipped", pr.skipped}};
    if (engine) ej["time"] = epoch_time.to_json();
    // Ranks saw different batches: evaluate and checkpoint the mean BN statistics.
    dp.average_buffers(model);
    if (eval_now) {
      last_eval = evaluate(model, ds.test, cfg.train.eval_batch_size, &dp.comm());
      evaluated_last = true;
      ej["test_loss"] = last_eval.loss;
      ej["test_accuracy"] = last_eval.accuracy;
      out << "epoch " << pr.epoch + 1 << ": train loss " << std::fixed << std::setprecision(4)
          << ej["train_loss"].get<double>() << ", test loss " << last_eval.loss
          << ", test accuracy " << std::setprecision(2) << 100.0 * last_eval.accuracy << "%\n"
          << std::defaultfloat << std::flush;
    }
    metrics.write(ej);
    if (cfg.train.checkpoint_every_epochs > 0 &&
        ((pr.epoch + 1) % cfg.train.checkpoint_every_epochs == 0 || last)) {
      Progress next = pr;
      ++next.epoch;
      next.batch_in_epoch = 0;
      next.epoch_loss_sum = 0.0;
      next.epoch_correct = next.epoch_seen = 0;
      save_checkpoint(ckdir + "/epoch_" + std::to_string(pr.epoch + 1) + ".ckpt", cfg, model, opt,
                      next, dp);
      save_checkpoint(ckdir + "/last.ckpt", cfg, model, opt, next, dp);
    }
    if (stopped) break;
  }
  if (!evaluated_last) last_eval = evaluate(model, ds.test, cfg.train.eval_batch_size, &dp.comm());
  summary.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  summary.test_accuracy = last_eval.accuracy;
  summary.test_loss = last_eval.loss;
  summary.steps = pr.steps;
  summary.skipped = pr.skipped;
  summary.img_per_s = images_done / std::max(summary.seconds, 1e-9);
  metrics.write({{"type", "final"},
                 {"test_accuracy", summary.test_accuracy},
                 {"test_loss", summary.test_loss},
                 {"steps", summary.steps},
                 {"skipped", summary.skipped},
                 {"seconds", summary.seconds},
                 {"img_per_s", summary.img_per_s}});
  out << "final test accuracy: " << std::fixed << std::setprecision(2)
      << 100.0 * summary.test_accuracy << "% (" << summary.steps << " steps, " << summary.skipped
      << " skipped, " << std::setprecision(1) << summary.seconds << " s, " << std::setprecision(0)
      << summary.img_per_s << " img/s)\n"
      << std::defaultfloat;
  return summary;
}

EvalSummary run_eval(const std::string& checkpoint, const std::vector<std::string>& overrides,
                     std::ostream& out) {
  const Checkpoint ck = Checkpoint::read(checkpoint);
  Config cfg =
      parse_config(ck.get_string("config_yaml"), checkpoint + " (embedded config)", overrides);
  Datasets ds = load_datasets(cfg);
  nn::Model model(model_spec(cfg, ds.train), static_cast<uint64_t>(cfg.train.seed));
  load_checkpoint(ck, checkpoint, model, nullptr);
  const EvalResult r = evaluate(model, ds.test, cfg.train.eval_batch_size);
  out << "int4ddp eval: " << checkpoint << ": test accuracy " << std::fixed << std::setprecision(2)
      << 100.0 * r.accuracy << "%, loss " << std::setprecision(4) << r.loss << " on "
      << ds.test.count << " examples\n"
      << std::defaultfloat;
  json j = {{"accuracy", r.accuracy}, {"loss", r.loss}, {"count", ds.test.count}};
  out << j.dump() << "\n";
  return {r.accuracy, r.loss, ds.test.count};
}

}  // namespace int4ddp::train
