// Checkpoints of the training state (see train_state.h).
#include "src/train/train_state.h"

#include <algorithm>
#include <filesystem>
#include <sstream>
#include <vector>

#include "kernels/common/error.h"

namespace int4ddp::train {
namespace {

// The model-defining part of the config: a checkpoint must match it to be resumed or evaluated.
std::string model_signature(nn::Model& m) {
  std::ostringstream os;
  os << m.spec().name << ";" << m.num_params();
  for (Param* p : m.params()) os << ";" << p->name;
  return os.str();
}

}  // namespace

void save_checkpoint(const std::string& path, const Config& cfg, nn::Model& model, Optimizer& opt,
                     const Progress& pr, DataParallel& dp) {
  // A model on the GPU: the checkpoint reads the host copies (the same format on both devices).
  model.to_host();
  opt.to_host();
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
  // A model on the GPU computes with its device copies: send the loaded state there.
  model.to_device();
  if (opt) opt->to_device();
  return ck.get_value<Progress>("progress");
}

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
  model.buffers_to_device();  // this rank's BN statistics, on a GPU model
}

}  // namespace int4ddp::train
