// Datasets, model spec, thread count and evaluation of the trainer (see setup.h).
#include "src/train/setup.h"

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <vector>

#include "kernels/common/error.h"
#include "kernels/common/parallel.h"
#include "src/nn/layers_cuda.h"

namespace int4ddp::train {
namespace {

void truncate(data::Dataset& d, int64_t max_count) {
  if (max_count <= 0 || max_count >= d.count) return;
  d.count = max_count;
  d.images.resize(static_cast<size_t>(max_count * d.image_numel()));
  d.labels.resize(static_cast<size_t>(max_count));
}

}  // namespace

Datasets load_datasets(const Config& cfg) {
  Datasets ds;
  const auto& dc = cfg.data;
  switch (dc.dataset) {
    case DatasetKind::kFashionMnist:
      ds.train = data::load_fashion_mnist(dc.path, "train");
      ds.test = data::load_fashion_mnist(dc.path, "test");
      break;
    case DatasetKind::kCifar10:
      ds.train = data::load_cifar10(dc.path, "train");
      ds.test = data::load_cifar10(dc.path, "test");
      break;
    case DatasetKind::kSynthetic: {
      data::SyntheticConfig sc;
      sc.seed = static_cast<uint64_t>(cfg.train.seed);
      sc.train_count = dc.synthetic_train_size;
      sc.test_count = dc.synthetic_test_size;
      sc.num_classes = cfg.model.num_classes;
      ds.train = data::make_synthetic(sc, "train");
      ds.test = data::make_synthetic(sc, "test");
      break;
    }
    default:
      INT4DDP_FAIL("data.dataset = ", static_cast<int>(dc.dataset), " is not a dataset");
  }
  truncate(ds.train, dc.max_train_examples);
  truncate(ds.test, dc.max_test_examples);
  INT4DDP_CHECK(ds.train.num_classes <= cfg.model.num_classes,
                "model.num_classes = ", cfg.model.num_classes, " is smaller than the ",
                ds.train.num_classes, " classes of ", spelling(dc.dataset));
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
  s.name = spelling(cfg.model.name);
  s.channels = d.channels;
  s.height = d.height;
  s.width = d.width;
  s.num_classes = cfg.model.num_classes;
  s.mlp_hidden.assign(cfg.model.mlp_hidden.begin(), cfg.model.mlp_hidden.end());
  s.signed_input = d.normalized();  // raw pixels are in [0, 1]
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
  s.quant.grad_policy.kind = q.grad_policy;
  s.quant.grad_policy.fixed_gamma = static_cast<float>(q.fixed_gamma);
  s.quant.grad_policy.alpha = q.alpha;
  s.quant.grad_policy.eta = static_cast<float>(q.eta);
  s.quant.grad_policy.lbt_calibrate = q.lbt_calibrate;
  s.quant.grad_rounding = q.grad_rounding;
  s.device = cfg.train.device == TrainDevice::kCuda ? Device::kCuda : Device::kCpu;
  return s;
}

int resolve_threads(const Config& cfg) {
  if (cfg.train.threads > 0) return cfg.train.threads;
  const int cores = available_cores();
  const unsigned machine = std::thread::hardware_concurrency();
  if (machine > 0 && cores < static_cast<int>(machine)) return cores;
  return std::max(1, cores / launcher_local_size());
}

EvalResult evaluate(nn::Model& model, const data::Dataset& d, int64_t batch,
                    comm::Communicator* comm) {
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
    loss_sum += nn::softmax_cross_entropy_any(logits, labels.data(), nullptr, &correct) *
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

}  // namespace int4ddp::train
