// The config: defaults and every file in configs/ validate; YAML round trips; `--set` overrides;
// every bad input (unknown key, wrong type, out-of-range value, syntax error, missing file) is an
// Error naming the key and, for files, the file and line; the hash tells configs apart.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "src/config/config.h"
#include "src/train/bucket_dump.h"

namespace int4ddp {
namespace {

namespace fs = std::filesystem;

// A temporary directory, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("int4ddp_test_config_" + std::to_string(::getpid()) + "_" + std::to_string(next_++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Writes text to name inside the directory; returns the full path.
  std::string write(const std::string& name, const std::string& text) const {
    const fs::path p = path_ / name;
    std::ofstream(p, std::ios::binary) << text;
    return p.string();
  }
  const fs::path& path() const { return path_; }

 private:
  static inline int next_ = 0;
  fs::path path_;
};

// The message of the Error that fn throws; fails the test if it throws nothing or something else.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-int4ddp exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

#define EXPECT_CONTAINS(haystack, needle)                          \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "expected \"" << (needle) << "\" in the message:\n  " << (haystack)

std::string override_error(const std::string& text) {
  Config c;
  return error_of([&] { apply_override(c, text); });
}

TEST(Config, DefaultsValidateAndFollowThePaperRecipe) {
  const Config c;
  EXPECT_NO_THROW(validate(c));
  EXPECT_EQ(c.model.name, ModelKind::kCnn);
  EXPECT_EQ(c.train.batch_size, 128);
  EXPECT_DOUBLE_EQ(c.optim.lr, 0.1);
  EXPECT_DOUBLE_EQ(c.optim.momentum, 0.9);
  EXPECT_DOUBLE_EQ(c.optim.weight_decay, 1e-4);
  EXPECT_EQ(c.schedule.milestones, (std::vector<double>{0.5, 0.75}));
  EXPECT_DOUBLE_EQ(c.schedule.gamma, 0.1);
  EXPECT_EQ(c.quant.weight_bits, 4);
  EXPECT_EQ(c.quant.activation_bits, 4);
  EXPECT_EQ(c.quant.grad_bits, 4);
  EXPECT_EQ(c.quant.grad_policy, quant::PolicyKind::kLbt);
  EXPECT_DOUBLE_EQ(c.quant.alpha, 1e-3);
  EXPECT_DOUBLE_EQ(c.quant.eta, 1e-3);
  EXPECT_DOUBLE_EQ(c.quant.scale_lr, 1e-5);
  EXPECT_TRUE(c.quant.first_layer_fp32);
  EXPECT_TRUE(c.quant.last_layer_fp32);
  EXPECT_DOUBLE_EQ(c.comm.bucket_mb, 25.0);
  EXPECT_EQ(c.comm.block_size, 512);
  EXPECT_EQ(c.comm.grad_policy, quant::PolicyKind::kTopK);
  EXPECT_EQ(c.comm.topk, 4);
  EXPECT_EQ(c.data.path, "/usr/share/datasets/fashion-mnist");
}

TEST(Config, EveryFileInConfigsLoadsAndValidates) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(INT4DDP_CONFIG_DIR)) {
    if (entry.path().extension() == ".yaml") files.push_back(entry.path());
  }
  std::set<std::string> names;
  for (const fs::path& p : files) {
    SCOPED_TRACE(p.string());
    names.insert(p.filename().string());
    Config c;
    ASSERT_NO_THROW(c = load_config(p.string()));
    EXPECT_NO_THROW(validate(c));
    // And each survives its own round trip.
    EXPECT_EQ(config_hash(parse_config(config_to_yaml(c), "round trip")), config_hash(c));
  }
  for (const char* want : {"default.yaml", "mlp.yaml", "cnn.yaml", "resnet20.yaml", "cnn_fp32.yaml",
                           "resnet18_cifar.yaml"}) {
    EXPECT_EQ(names.count(want), 1u) << want << " is missing from configs/";
  }

  const Config d = load_config(std::string(INT4DDP_CONFIG_DIR) + "/default.yaml");
  EXPECT_EQ(d.model.name, ModelKind::kCnn);
  EXPECT_EQ(d.quant.weight_bits, 4);
  EXPECT_EQ(d.quant.activation_bits, 4);
  EXPECT_EQ(d.quant.grad_bits, 4);
  EXPECT_EQ(d.quant.grad_policy, quant::PolicyKind::kLbt);
  EXPECT_EQ(d.data.dataset, DatasetKind::kFashionMnist);
  EXPECT_EQ(load_config(std::string(INT4DDP_CONFIG_DIR) + "/mlp.yaml").model.name, ModelKind::kMlp);
  EXPECT_EQ(load_config(std::string(INT4DDP_CONFIG_DIR) + "/resnet20.yaml").model.name,
            ModelKind::kResNet20);
  const Config r18 = load_config(std::string(INT4DDP_CONFIG_DIR) + "/resnet18_cifar.yaml");
  EXPECT_EQ(r18.model.name, ModelKind::kResNet18);
  EXPECT_EQ(r18.data.dataset, DatasetKind::kCifar10);
  const Config fp32 = load_config(std::string(INT4DDP_CONFIG_DIR) + "/cnn_fp32.yaml");
  EXPECT_EQ(fp32.quant.weight_bits, kFp32Bits);
  EXPECT_EQ(fp32.comm.mode, CommMode::kFp32);
}

TEST(Config, YamlRoundTripKeepsEveryValue) {
  Config c;
  c.model.name = ModelKind::kMlp;
  c.model.mlp_hidden = {2048, 1024, 7};
  c.data.path = "/tmp/a dir/with \"quotes\" and \\ and: colon # not a comment";
  c.data.random_flip = true;
  c.quant.grad_bits = 32;
  c.quant.fixed_gamma = 0.6;
  c.quant.alpha = 1.0 / 3.0;  // needs all 17 digits
  c.comm.bucket_mb = 0.5;
  c.comm.block_size = 4096;
  c.optim.lr = 0.05;
  c.schedule.kind = ScheduleKind::kCosine;
  c.schedule.milestones = {};
  c.schedule.min_lr = 1e-7;
  c.train.seed = 4294967295;
  c.train.resume = "";
  c.log.progress = ProgressBar::kOff;
  ASSERT_NO_THROW(validate(c));

  const std::string yaml = config_to_yaml(c);
  const Config back = parse_config(yaml, "round trip");
  EXPECT_EQ(config_to_yaml(back), yaml);
  EXPECT_EQ(config_to_json(back), config_to_json(c));
  EXPECT_EQ(config_hash(back), config_hash(c));
  EXPECT_EQ(back.model.mlp_hidden, c.model.mlp_hidden);
  EXPECT_EQ(back.data.path, c.data.path);
  EXPECT_EQ(back.quant.alpha, c.quant.alpha);
  EXPECT_EQ(back.train.seed, c.train.seed);
  EXPECT_TRUE(back.schedule.milestones.empty());

  // Through a file as well.
  TempDir dir;
  EXPECT_EQ(config_hash(load_config(dir.write("c.yaml", yaml))), config_hash(c));
}

TEST(Config, TableAndJsonListEveryKey) {
  const Config c;
  const std::string table = config_table(c);
  const nlohmann::json j = nlohmann::json::parse(config_to_json(c));
  const std::vector<std::string> keys = config_keys();
  EXPECT_GT(keys.size(), 50u);

  std::istringstream lines(table);
  std::string line;
  size_t n_lines = 0;
  size_t eq_column = std::string::npos;
  while (std::getline(lines, line)) {
    ASSERT_LT(n_lines, keys.size());
    EXPECT_EQ(line.rfind(keys[n_lines], 0), 0u) << line;
    const size_t eq = line.find(" = ");
    if (eq_column == std::string::npos) eq_column = eq;
    EXPECT_EQ(eq, eq_column) << "values not aligned: " << line;
    ++n_lines;
  }
  EXPECT_EQ(n_lines, keys.size());
  EXPECT_NE(table.find("optim.lr"), std::string::npos);

  for (const std::string& key : keys) {
    const std::string section = key.substr(0, key.find('.'));
    const std::string name = key.substr(key.find('.') + 1);
    EXPECT_TRUE(j.contains(section) && j[section].contains(name)) << key;
  }
  EXPECT_EQ(j["optim"]["lr"].get<double>(), 0.1);
  EXPECT_EQ(j["model"]["name"].get<std::string>(), "cnn");
  EXPECT_EQ(j["schedule"]["milestones"].get<std::vector<double>>(),
            (std::vector<double>{0.5, 0.75}));
  EXPECT_EQ(j["quant"]["first_layer_fp32"].get<bool>(), true);
}

TEST(Config, OverridesSetScalarsSequencesAndStrings) {
  Config c;
  apply_override(c, "optim.lr=0.05");
  apply_override(c, "train.epochs=7");
  apply_override(c, "quant.grad_bits=8");
  apply_override(c, "quant.first_layer_fp32=false");
  apply_override(c, "schedule.milestones=[0.3,0.6, 0.9]");
  apply_override(c, "model.mlp_hidden=[2048]");
  apply_override(c, " data.path = /data/fashion mnist ");
  apply_override(c, "comm.mode=int8");
  apply_override(c, "log.progress=off");  // a YAML bool word, read as the string it is
  apply_override(c, "train.seed=0x10");
  apply_override(c, "optim={lr: 0.2, momentum: 0.8}");  // a whole section
  EXPECT_DOUBLE_EQ(c.optim.lr, 0.2);
  EXPECT_DOUBLE_EQ(c.optim.momentum, 0.8);
  EXPECT_EQ(c.train.epochs, 7);
  EXPECT_EQ(c.quant.grad_bits, 8);
  EXPECT_FALSE(c.quant.first_layer_fp32);
  EXPECT_EQ(c.schedule.milestones, (std::vector<double>{0.3, 0.6, 0.9}));
  EXPECT_EQ(c.model.mlp_hidden, (std::vector<int>{2048}));
  EXPECT_EQ(c.data.path, "/data/fashion mnist");
  EXPECT_EQ(c.comm.mode, CommMode::kInt8);
  EXPECT_EQ(c.log.progress, ProgressBar::kOff);
  EXPECT_EQ(c.train.seed, 16);
  EXPECT_NO_THROW(validate(c));

  apply_override(c, "train.resume=");  // empty value: the empty string
  EXPECT_EQ(c.train.resume, "");
  apply_override(c, "schedule.milestones=[]");
  EXPECT_TRUE(c.schedule.milestones.empty());
}

TEST(Config, OverrideErrorsNameTheKey) {
  std::string msg = override_error("optim.lrr=0.1");
  EXPECT_CONTAINS(msg, "unknown key optim.lrr");
  EXPECT_CONTAINS(msg, "did you mean optim.lr?");
  EXPECT_CONTAINS(override_error("optimizer.lr=0.1"), "unknown key optimizer.lr");
  EXPECT_EQ(override_error("foo=1").find("did you mean"), std::string::npos);  // nothing close
  EXPECT_CONTAINS(override_error("optim.lr.x=0.1"), "unknown key optim.lr.x");

  msg = override_error("optim.lr=abc");
  EXPECT_CONTAINS(msg, "optim.lr");
  EXPECT_CONTAINS(msg, "expected a number");
  EXPECT_CONTAINS(msg, "\"abc\"");
  EXPECT_CONTAINS(msg, "--set");
  EXPECT_CONTAINS(override_error("train.epochs=1.5"), "train.epochs: expected an integer");
  EXPECT_CONTAINS(override_error("optim.lr=\"0.1\""), "the quoted string");
  EXPECT_CONTAINS(override_error("optim.nesterov=maybe"), "expected true or false");
  EXPECT_CONTAINS(override_error("schedule.milestones=0.5"), "schedule.milestones: expected a");
  EXPECT_CONTAINS(override_error("schedule.milestones=[0.5, x]"),
                  "schedule.milestones[1]: expected a number, got \"x\"");
  EXPECT_CONTAINS(override_error("model.name=[cnn]"), "model.name: expected a string");
  EXPECT_CONTAINS(override_error("optim.lr="), "optim.lr: expected a number, got nothing");
  EXPECT_CONTAINS(override_error("optim.lr=[1"), "not valid YAML");
  EXPECT_CONTAINS(override_error("optim.lr"), "expected section.key=value");
  EXPECT_CONTAINS(override_error("=1"), "the key is empty");

  msg = override_error("quant.grad_bits=9");
  EXPECT_CONTAINS(msg, "quant.grad_bits = 9");
  EXPECT_CONTAINS(msg, "must be 2..8, or 32");
  msg = override_error("optim.lr=-1");
  EXPECT_CONTAINS(msg, "optim.lr = -1.0");
  EXPECT_CONTAINS(msg, "must be in (0, 100]");
  EXPECT_CONTAINS(override_error("optim.lr=.nan"), "optim.lr");
  EXPECT_CONTAINS(override_error("quant.alpha=1"), "quant.alpha");
  EXPECT_CONTAINS(override_error("model.name=vgg"), "model.name = \"vgg\": must be one of mlp");
  EXPECT_CONTAINS(override_error("comm.block_size=511"), "comm.block_size");
  EXPECT_CONTAINS(override_error("train.seed=-1"), "train.seed");
  EXPECT_CONTAINS(override_error("train.seed=4294967296"), "train.seed");
  EXPECT_CONTAINS(override_error("schedule.milestones=[0.75, 0.5]"), "strictly increasing");
  EXPECT_CONTAINS(override_error("schedule.milestones=[0.5, 1.0]"), "(0, 1)");
  EXPECT_CONTAINS(override_error("model.mlp_hidden=[]"), "model.mlp_hidden");

  // A failed override leaves the config as it was.
  Config c;
  c.optim.lr = 0.3;
  EXPECT_THROW(apply_override(c, "optim.lr=-1"), Error);
  EXPECT_DOUBLE_EQ(c.optim.lr, 0.3);
  EXPECT_THROW(apply_override(c, "schedule.milestones=[0.9, 0.1]"), Error);
  EXPECT_EQ(c.schedule.milestones, (std::vector<double>{0.5, 0.75}));
  EXPECT_THROW(apply_override(c, "optim={lr: 0.2, momentum: 5}"), Error);  // lr fine, momentum not
  EXPECT_DOUBLE_EQ(c.optim.lr, 0.3);
}

TEST(Config, EnumeratedKeysParseEverySpellingAndNothingElse) {
  // Every spelling of every enumerated key reads into its value and prints back the same.
  const std::vector<std::pair<std::string, std::vector<std::string>>> keys = {
      {"model.name", {"mlp", "cnn", "resnet20", "resnet18"}},
      {"data.dataset", {"fashion_mnist", "synthetic", "cifar10"}},
      {"quant.grad_policy", {"minmax", "fixed", "lbt", "mse", "dsgc"}},
      {"quant.grad_rounding", {"nearest", "stochastic"}},
      {"comm.backend", {"none", "mpi", "nccl"}},
      {"comm.mode", {"fp32", "int4", "int8"}},
      {"comm.grad_policy", {"minmax", "fixed", "lbt", "mse", "topk"}},
      {"comm.rounding", {"nearest", "stochastic"}},
      {"comm.hierarchy", {"auto", "flat", "node"}},
      {"schedule.kind", {"multistep", "cosine"}},
      {"log.progress", {"auto", "on", "off"}},
      {"train.device", {"cpu", "cuda"}}};
  for (const auto& [key, names] : keys) {
    std::string all;
    for (const std::string& n : names) all += (all.empty() ? "" : ", ") + n;
    for (const std::string& n : names) {
      Config c;
      apply_override(c, key + "=" + n);
      const std::string line = "  " + key.substr(key.find('.') + 1) + ": \"" + n + "\"\n";
      EXPECT_CONTAINS(config_to_yaml(c), line);
    }
    // Anything else is an error naming the key and the spellings it accepts; nothing falls back
    // to a default.
    for (const std::string& bad : {std::string("int16"), std::string("LBT"), std::string("")}) {
      EXPECT_CONTAINS(override_error(key + "=" + bad),
                      key + " = \"" + bad + "\": must be one of " + all);
    }
  }
  EXPECT_CONTAINS(override_error("comm.grad_policy=dsgc"),
                  "comm.grad_policy = \"dsgc\": must be one of minmax, fixed, lbt, mse, topk");
  EXPECT_CONTAINS(override_error("quant.grad_policy=topk"),
                  "quant.grad_policy = \"topk\": must be one of minmax, fixed, lbt, mse, dsgc");
  Config c;
  apply_override(c, "comm.mode=int8");
  apply_override(c, "quant.grad_rounding=nearest");
  EXPECT_EQ(c.comm.mode, CommMode::kInt8);
  EXPECT_EQ(c.quant.grad_rounding, quant::Rounding::kNearest);
  EXPECT_STREQ(spelling(c.comm.mode), "int8");
  EXPECT_STREQ(spelling(quant::PolicyKind::kDsgc), "dsgc");
  // A value set in code is validated as well.
  c = Config{};
  c.comm.grad_policy = quant::PolicyKind::kDsgc;
  EXPECT_CONTAINS(error_of([&] { validate(c); }),
                  "comm.grad_policy = \"dsgc\": must be one of minmax, fixed, lbt, mse, topk");
  c = Config{};
  c.comm.mode = static_cast<CommMode>(9);
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "comm.mode = \"?\": must be one of fp32");

  // From a file: the key and its line.
  TempDir dir;
  const std::string path = dir.write("mode.yaml", "comm:\n  backend: mpi\n  mode: int3\n");
  const std::string msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, path + " line 3");
  EXPECT_CONTAINS(msg, "comm.mode = \"int3\": must be one of fp32, int4, int8");
}

TEST(Config, ValidateChecksKeysAgainstEachOther) {
  Config c;
  c.optim.lr = 0;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "optim.lr");

  c = Config{};
  c.schedule.warmup_epochs = 20;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "schedule.warmup_epochs");
  c = Config{};
  c.model.num_classes = 5;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "model.num_classes = 5: must be 10");
  c.data.dataset = DatasetKind::kSynthetic;
  EXPECT_NO_THROW(validate(c));
  c = Config{};
  c.comm.bucket_mb = 0.001;  // 262 elements < block_size 512
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "comm.block_size");
  c = Config{};
  c.optim.nesterov = true;
  c.optim.momentum = 0;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "optim.nesterov");
  c = Config{};
  c.schedule.min_lr = 1;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "schedule.min_lr");
  c = Config{};
  c.train.device = TrainDevice::kCuda;  // a CPU-only build refuses it; a CUDA build runs every
                                        // model, quantized (the default) or fp32, on the GPU
#ifndef INT4DDP_HAVE_CUDA
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "train.device = \"cuda\": ");
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "built without CUDA");
#else
  EXPECT_NO_THROW(validate(c));  // quantized
  c.quant.weight_bits = c.quant.activation_bits = c.quant.grad_bits = kFp32Bits;
  EXPECT_NO_THROW(validate(c));
  for (ModelKind m : {ModelKind::kResNet20, ModelKind::kResNet18}) {  // every model has GPU layers
    c.model.name = m;
    EXPECT_NO_THROW(validate(c)) << spelling(m);
  }
#endif
  c = Config{};
  c.comm.backend = CommBackend::kNccl;  // device buffers: only with train.device = cuda
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "comm.backend = \"nccl\": ");
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "use comm.backend = mpi");
#ifndef INT4DDP_HAVE_NCCL
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "built without NCCL");
#else
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "needs train.device = cuda");
#endif
#ifdef INT4DDP_HAVE_NCCL
  c.train.device = TrainDevice::kCuda;
  c.quant.weight_bits = c.quant.activation_bits = c.quant.grad_bits = kFp32Bits;
  c.comm.mode = CommMode::kFp32;
  EXPECT_NO_THROW(validate(c));
  c.comm.mode = CommMode::kInt4;  // every policy runs on the device two-shot, block clips too
  for (quant::PolicyKind p :
       {quant::PolicyKind::kMinMax, quant::PolicyKind::kFixed, quant::PolicyKind::kLbt,
        quant::PolicyKind::kTopK, quant::PolicyKind::kMse}) {
    c.comm.grad_policy = p;
    EXPECT_NO_THROW(validate(c)) << quant::policy_kind_name(p);
  }
  c.comm.mode = CommMode::kAuto;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "comm.mode = \"auto\": ");
  c.comm.mode = CommMode::kInt4;
  c.comm.hierarchy = comm::HierarchyMode::kNode;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "comm.hierarchy = \"node\": ");
  c.comm.backend = CommBackend::kMpi;  // staged through host memory: the host two-shot, any setting
  c.comm.grad_policy = quant::PolicyKind::kTopK;
  EXPECT_NO_THROW(validate(c));
#endif
  c = Config{};
  c.model.name = ModelKind::kMlp;
  c.model.mlp_hidden = {256};  // fc1 and fc_out, the first and the last layer: both stay fp32
  std::string msg = error_of([&] { validate(c); });
  EXPECT_CONTAINS(msg, "model.mlp_hidden = [256]: ");
  EXPECT_CONTAINS(msg, "no layer qualifies");
  c.quant.last_layer_fp32 = false;
  EXPECT_NO_THROW(validate(c));
  c.quant.last_layer_fp32 = true;
  c.quant.weight_bits = c.quant.activation_bits = c.quant.grad_bits = kFp32Bits;
  EXPECT_NO_THROW(validate(c));
  c = Config{};
  c.train.checkpoint_dir = "";
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "train.checkpoint_dir");
  c.train.checkpoint_every_epochs = 0;
  EXPECT_NO_THROW(validate(c));
}

TEST(Config, FileErrorsNameTheFileKeyAndLine) {
  TempDir dir;
  std::string path = dir.write("unknown.yaml",
                               "model:\n"
                               "  name: cnn\n"
                               "optim:\n"
                               "  lr: 0.1\n"
                               "  momentun: 0.9\n");  // line 5
  std::string msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, path);
  EXPECT_CONTAINS(msg, "line 5");
  EXPECT_CONTAINS(msg, "unknown key optim.momentun");
  EXPECT_CONTAINS(msg, "did you mean optim.momentum?");

  path = dir.write("section.yaml", "model:\n  name: cnn\n\noptimiser:\n  lr: 0.1\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "line 4");
  EXPECT_CONTAINS(msg, "unknown key optimiser");

  path = dir.write("type.yaml", "# comment\ntrain:\n  epochs: 3\n  batch_size: lots\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "line 4");
  EXPECT_CONTAINS(msg, "train.batch_size: expected an integer");

  path = dir.write("range.yaml", "quant:\n  weight_bits: 4\n  grad_bits: 9\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, path);
  EXPECT_CONTAINS(msg, "line 3");
  EXPECT_CONTAINS(msg, "quant.grad_bits = 9");

  path = dir.write("null.yaml", "optim:\n  lr:\n  momentum: 0.9\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "line 2");
  EXPECT_CONTAINS(msg, "optim.lr: expected a number, got nothing");

  // Across keys: the line of the key to change.
  path = dir.write("cross.yaml", "train:\n  epochs: 3\nschedule:\n  warmup_epochs: 5\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "line 4");
  EXPECT_CONTAINS(msg, "schedule.warmup_epochs = 5.0: must be less than train.epochs = 3");
  // ... fixed by an override, which load_config applies before validating.
  EXPECT_NO_THROW(load_config(path, {"train.epochs=10"}));
  msg = error_of([&] { load_config(path, {"schedule.warmup_epochs=4"}); });
  EXPECT_CONTAINS(msg, "--set 'schedule.warmup_epochs=4'");

  path = dir.write("dup.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "line 3");
  EXPECT_CONTAINS(msg, "duplicate key optim.lr");

  path = dir.write("dotted.yaml", "optim.lr: 0.1\n");
  EXPECT_CONTAINS(error_of([&] { load_config(path); }), "dotted keys");

  path = dir.write("scalar_section.yaml", "model:\n  name: cnn\noptim: 0.1\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "line 3");
  EXPECT_CONTAINS(msg, "optim must be a mapping");

  path = dir.write("list.yaml", "- 1\n- 2\n");
  EXPECT_CONTAINS(error_of([&] { load_config(path); }), "the config must be a mapping");

  path = dir.write("two_docs.yaml", "optim:\n  lr: 0.1\n---\noptim:\n  lr: 0.2\n");
  EXPECT_CONTAINS(error_of([&] { load_config(path); }), "2 YAML documents");
}

TEST(Config, SyntaxErrorsAndMissingFiles) {
  TempDir dir;
  std::string path = dir.write("syntax.yaml",
                               "model:\n"
                               "  name: cnn\n"
                               "schedule:\n"
                               "  milestones: [0.5, 0.75\n"  // unclosed flow sequence
                               "train:\n"
                               "  epochs: 3\n");
  std::string msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, path);
  EXPECT_CONTAINS(msg, "YAML syntax error");
  EXPECT_CONTAINS(msg, "line ");

  path = dir.write("indent.yaml", "optim:\n  lr: 0.1\n    momentum: 0.9\n");
  msg = error_of([&] { load_config(path); });
  EXPECT_CONTAINS(msg, "YAML syntax error");
  EXPECT_CONTAINS(msg, "line 3");

  const std::string missing = (dir.path() / "missing.yaml").string();
  msg = error_of([&] { load_config(missing); });
  EXPECT_CONTAINS(msg, missing);
  EXPECT_CONTAINS(msg, "cannot open");
  EXPECT_CONTAINS(error_of([&] { load_config(dir.path().string()); }), "is a directory");

  // An empty file (or one with only comments) is the defaults.
  EXPECT_EQ(config_hash(load_config(dir.write("empty.yaml", ""))), config_hash(Config{}));
  EXPECT_EQ(config_hash(load_config(dir.write("comment.yaml", "# nothing\n"))),
            config_hash(Config{}));
}

TEST(Config, HashIsEqualForEqualConfigsOnly) {
  const Config a;
  const Config b;
  EXPECT_EQ(config_hash(a), config_hash(b));
  EXPECT_EQ(config_hash(a), config_hash(parse_config("optim:\n  lr: 0.1\n", "same")));
  EXPECT_EQ(config_hash(a), config_hash(parse_config("optim:\n  lr: 1e-1\n", "same value")));

  std::set<uint64_t> seen = {config_hash(a)};
  for (const char* o :
       {"optim.lr=0.10000000000000002", "train.seed=1", "comm.mode=fp32", "comm.hierarchy=node",
        "data.path=/usr/share/datasets/fashion-mnist/", "quant.lbt_calibrate=false",
        "schedule.milestones=[0.5]", "model.mlp_hidden=[256, 256, 256]"}) {
    Config c;
    apply_override(c, o);
    EXPECT_TRUE(seen.insert(config_hash(c)).second) << o << " did not change the hash";
  }
}

// yaml-cpp 0.7's LoadAll never returned on a ',' at the top level (its parser repeats an empty
// document forever); found by tests/fuzz/fuzz_config.
TEST(Config, TopLevelCommaIsASyntaxErrorNotAHang) {
  for (const char* text : {",a", ",n:\n? ?", "a: 1\n---\n,"}) {
    EXPECT_CONTAINS(error_of([&] { parse_config(text, "comma.yaml"); }), "comma.yaml line");
  }
  EXPECT_CONTAINS(error_of([&] { parse_config("a: 1\n---\nb: 2\n", "two.yaml"); }),
                  "2 YAML documents");
}

// --- comm.dump_buckets_every / comm.dump_buckets_dir and the dump files
// ---------------------------

TEST(Config, DumpBucketKeysAreValidated) {
  Config c;
  EXPECT_EQ(c.comm.dump_buckets_every, 0);  // off by default
  EXPECT_CONTAINS(override_error("comm.dump_buckets_every=-1"), "comm.dump_buckets_every");
  c.comm.dump_buckets_every = 5;
  EXPECT_CONTAINS(error_of([&] { validate(c); }),
                  "comm.dump_buckets_every = 5: needs comm.dump_buckets_dir");
  c.comm.dump_buckets_dir = "runs/dumps";
  EXPECT_NO_THROW(validate(c));
  c.comm.mode = CommMode::kFp32;
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "needs comm.mode = int4 or int8");
  c = Config{};
  apply_override(c, "comm.grad_policy=topk");
  apply_override(c, "comm.topk=512");
  EXPECT_CONTAINS(error_of([&] { validate(c); }), "comm.topk = 512: must be below comm.block_size");
  EXPECT_CONTAINS(override_error("comm.topk=0"), "comm.topk");
}

TEST(BucketDump, WritesAtomicallyReadsBackAndRefusesForeignFiles) {
  TempDir dir;
  const std::string d = (dir.path() / "dumps").string();
  train::prepare_bucket_dump_dir(d, false);  // creates it
  std::vector<float> grads(100);
  for (size_t i = 0; i < grads.size(); ++i) grads[i] = static_cast<float>(i) - 50.5f;
  const std::vector<std::vector<comm::Segment>> buckets = {{{60, 40}}, {{0, 10}, {20, 5}}};
  train::write_bucket_dump(d, "resnet20", 35, 2, 4, grads.data(), buckets);
  const std::string file = (fs::path(d) / "step_35.rank_2.bkt").string();
  EXPECT_EQ(train::bucket_dump_name(35, 2), "step_35.rank_2.bkt");
  const train::BucketDump back = train::read_bucket_dump(file);
  EXPECT_EQ(back.model, "resnet20");
  EXPECT_EQ(back.step, 35u);
  EXPECT_EQ(back.rank, 2u);
  EXPECT_EQ(back.ranks, 4u);
  ASSERT_EQ(back.buckets.size(), 2u);
  EXPECT_EQ(back.buckets[0], std::vector<float>(grads.begin() + 60, grads.end()));
  std::vector<float> b1(grads.begin(), grads.begin() + 10);
  b1.insert(b1.end(), grads.begin() + 20, grads.begin() + 25);
  EXPECT_EQ(back.buckets[1], b1);
  for (const auto& e : fs::directory_iterator(d))  // no temp file left behind
    EXPECT_EQ(e.path().extension(), ".bkt") << e.path();

  // A cut or extended file and a foreign file are errors naming the file.
  std::string bytes;
  {
    std::ifstream in(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::string cut = dir.write("cut.bkt", bytes.substr(0, bytes.size() - 4));
  EXPECT_CONTAINS(error_of([&] { train::read_bucket_dump(cut); }), "truncated");
  const std::string longer = dir.write("long.bkt", bytes + "x");
  EXPECT_CONTAINS(error_of([&] { train::read_bucket_dump(longer); }), "trailing bytes");
  const std::string foreign = dir.write("foreign.bkt", "model: cnn\n");
  EXPECT_CONTAINS(error_of([&] { train::read_bucket_dump(foreign); }), "not a bucket dump");
  EXPECT_CONTAINS(error_of([&] { train::read_bucket_dump(d + "/missing.bkt"); }), "missing.bkt");
}

TEST(BucketDump, AFreshRunRefusesANonEmptyDirUnlessOverwrite) {
  TempDir dir;
  const std::string d = (dir.path() / "dumps").string();
  fs::create_directories(d);
  std::vector<float> g(8, 1.0f);
  train::write_bucket_dump(d, "cnn", 0, 0, 2, g.data(), {{{0, 8}}});
  dir.write("dumps/notes.txt", "keep me\n");
  const std::string msg = error_of([&] { train::prepare_bucket_dump_dir(d, false); });
  EXPECT_CONTAINS(msg, "comm.dump_buckets_dir");
  EXPECT_CONTAINS(msg, "train.overwrite");
  EXPECT_TRUE(fs::exists(fs::path(d) / "step_0.rank_0.bkt"));  // untouched
  train::prepare_bucket_dump_dir(d, true);  // overwrite: the earlier dumps go, nothing else
  EXPECT_FALSE(fs::exists(fs::path(d) / "step_0.rank_0.bkt"));
  EXPECT_TRUE(fs::exists(fs::path(d) / "notes.txt"));
  // A path that is a file is refused with the key.
  const std::string file = dir.write("plain", "x");
  EXPECT_CONTAINS(error_of([&] { train::prepare_bucket_dump_dir(file, false); }),
                  "comm.dump_buckets_dir");
}

}  // namespace
}  // namespace int4ddp
