// The trainer's configuration: one struct with in-struct defaults (DESIGN.md section 5), read from
// YAML, overridden with `--set section.key=value`, validated, echoed as a table on rank 0, saved as
// JSON next to the metrics and hashed for the cross-rank check of data-parallel runs.
//
// Invariant: every key is listed once, in config.cpp's field table; parsing, overrides, validation,
// the table, YAML, JSON and the hash all walk that table, so a key added there (and here) is
// everywhere at once. Keys are `section.name`, snake_case. Enumerated keys are enums here, parsed
// once from their lower-case YAML spelling (an unknown spelling is an error naming the key), so the
// code that reads them switches over every value and never compares strings; spelling() gives the
// YAML text back (the table, YAML, JSON and hash print exactly that). Bit-widths use 32 for "not
// quantized (fp32)".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/hierarchy.h"
#include "kernels/quant/format.h"
#include "kernels/quant/policy.h"

namespace int4ddp {

// quant.*_bits value meaning "keep this operand in fp32" (defined with the quantizer's format).
using quant::kFp32Bits;

// The enumerated keys. quant.grad_policy and comm.grad_policy are quant::PolicyKind,
// quant.grad_rounding and comm.rounding quant::Rounding, comm.hierarchy comm::HierarchyMode.
enum class ModelKind : uint8_t { kMlp, kCnn, kResNet20, kResNet18 };       // model.name
enum class DatasetKind : uint8_t { kFashionMnist, kSynthetic, kCifar10 };  // data.dataset
enum class CommBackend : uint8_t { kNone, kMpi, kNccl };                   // comm.backend
enum class CommMode : uint8_t { kFp32, kInt4, kInt8, kAuto };              // comm.mode
enum class ScheduleKind : uint8_t { kMultistep, kCosine };                 // schedule.kind
enum class ProgressBar : uint8_t { kAuto, kOn, kOff };                     // log.progress
enum class TrainDevice : uint8_t { kCpu, kCuda };                          // train.device

// The YAML spelling of a value: "resnet20", "fashion_mnist", "int4", "lbt", "stochastic", ...
const char* spelling(ModelKind v);
const char* spelling(DatasetKind v);
const char* spelling(CommBackend v);
const char* spelling(CommMode v);
const char* spelling(ScheduleKind v);
const char* spelling(ProgressBar v);
const char* spelling(TrainDevice v);
const char* spelling(quant::PolicyKind v);
const char* spelling(quant::Rounding v);
const char* spelling(comm::HierarchyMode v);

struct Config {
  struct Model {
    ModelKind name = ModelKind::kCnn;          // mlp | cnn | resnet20 | resnet18
    std::vector<int> mlp_hidden = {256, 256};  // mlp: hidden layer widths, 1..16 layers of 1..65536
    int num_classes = 10;  // classifier outputs, 2..100000 (10 for fashion_mnist, cifar10)
  };
  struct Data {
    DatasetKind dataset = DatasetKind::kFashionMnist;        // fashion_mnist | synthetic | cifar10
    std::string path = "/usr/share/datasets/fashion-mnist";  // directory of the dataset files
    bool normalize = true;     // subtract the training-set mean, divide by its std
    int random_crop_pad = 0;   // train augmentation: zero-pad by this many pixels, random crop
                               // back to size; 0 = off, 0..16
    bool random_flip = false;  // train augmentation: random horizontal flip
    int64_t synthetic_train_size = 8192;  // synthetic: training examples, 1..10^8
    int64_t synthetic_test_size = 2048;   // synthetic: test examples, 1..10^8
    int64_t max_train_examples = 0;       // use only the first N training examples; 0 = all
    int64_t max_test_examples = 0;        // use only the first N test examples; 0 = all
  };
  struct Quant {
    int weight_bits = 4;      // W bit-width: 2..8, or 32 = fp32
    int activation_bits = 4;  // A bit-width: 2..8, or 32 = fp32
    int grad_bits = 4;        // G bit-width (dL/dY of quantized layers): 2..8, or 32 = fp32
    quant::PolicyKind grad_policy = quant::PolicyKind::kLbt;  // gradient interval: minmax | fixed |
                                                              // lbt | mse | dsgc
    double fixed_gamma = 0.8;   // fixed: clip = gamma * max|g|, in (0, 1]
    double alpha = 1e-3;        // lbt: fraction of "large" gradients, in (0, 1)
    double eta = 1e-3;          // lbt: gamma step per training step, in (0, 1]
    bool lbt_calibrate = true;  // lbt: calibrate gamma on the first batch (no update on it)
    quant::Rounding grad_rounding = quant::Rounding::kStochastic;  // nearest | stochastic
    bool first_layer_fp32 = true;  // keep the first conv/linear in fp32
    bool last_layer_fp32 = true;   // keep the last linear (classifier) in fp32
    double scale_lr = 1e-5;        // Adam lr of the quantizer scales s_W, u_A, in (0, 1]
  };
  struct Comm {
    CommBackend backend = CommBackend::kMpi;  // none (single process) | mpi | nccl (device
                                              // gradient buckets: train.device = cuda)
    CommMode mode = CommMode::kInt4;          // gradient all-reduce: fp32 | int4 | int8 (two-shot)
                                              // | auto (per bucket fp32 or int4, measured;
                                              // per cross-node level under the hierarchy)
    double bucket_mb = 25.0;   // bucket size in MiB (2^20 bytes) of fp32 gradient, (0, 4096]
    int64_t block_size = 512;  // G: elements per scale in compressed buckets, even, 2..2^24
    int64_t small_tensor_threshold = 4096;  // tensors with fewer elements go uncompressed (fp32)
    bool worker_error_feedback = true;      // keep e = v - Q(v) on each worker, add it next step
    bool server_error_feedback = true;      // keep the owner's requantization error likewise
    // Bucket interval: minmax | fixed | lbt | mse (OCTAV per block) | topk (each block clipped at
    // its (topk+1)-th largest magnitude; kernels/quant/policy.h). topk is the default: with error
    // feedback it gives the smallest error of the all-reduced mean on recorded gradients
    // (experiments/replay_buckets.sh) and data-parallel accuracy at least minmax's
    // (experiments/dp_accuracy.sh; figures in experiments/RESULTS.md).
    quant::PolicyKind grad_policy = quant::PolicyKind::kTopK;
    double fixed_gamma = 0.8;  // fixed: bucket clip = gamma * max|block|, (0, 1]
    double alpha = 1e-3;       // lbt: fraction of "large" gradients, in (0, 1)
    double eta = 1e-3;         // lbt: gamma step per training step, in (0, 1]
    int topk = 4;  // topk: values per block that saturate (clip at the (k+1)-th largest), < G
    quant::Rounding rounding = quant::Rounding::kStochastic;  // nearest | stochastic
    bool overlap = true;      // launch buckets during backward (false: all after backward)
    int pipeline_chunks = 0;  // pieces per chunk of the host two-shot, overlapping quantization
                              // and transfers: 0 = auto (comm/two_shot.h), 1 = off, up to 64
    comm::HierarchyMode hierarchy = comm::HierarchyMode::kAuto;  // auto | flat | node: reduce
                                                                 // within nodes first
    int64_t dump_buckets_every = 0;  // every N steps each rank writes its compressed buckets'
                                     // gradients (fp32, before compression) to dump_buckets_dir
                                     // (src/train/bucket_dump.h); 0 = off
    std::string dump_buckets_dir;    // where those dumps go; a fresh run refuses a non-empty one
                                     // unless train.overwrite
  };
  struct Optim {
    double lr = 0.1;             // SGD base learning rate, (0, 100]
    double momentum = 0.9;       // SGD momentum, [0, 1)
    double weight_decay = 1e-4;  // L2 decay of weights (not BN, not quantizer scales), [0, 1)
    bool nesterov = false;       // Nesterov momentum
  };
  struct Schedule {
    ScheduleKind kind = ScheduleKind::kMultistep;  // multistep | cosine
    std::vector<double> milestones = {0.5, 0.75};  // multistep: fractions of train.epochs, strictly
                                                   // increasing, each in (0, 1); may be empty
    double gamma = 0.1;                            // multistep: lr factor at each milestone, (0, 1]
    double min_lr = 0.0;                           // cosine: final lr, [0, optim.lr]
    double warmup_epochs = 0.0;  // linear warm-up from 0 over this many epochs, [0, train.epochs)
  };
  struct Train {
    int epochs = 20;                 // training epochs, 1..100000
    int64_t batch_size = 128;        // examples per step on each rank, 1..65536
    int64_t eval_batch_size = 1000;  // examples per evaluation batch, 1..65536
    int64_t seed = 0;                // seeds init, shuffling, augmentation and rounding, 0..2^32-1
    int threads = 0;                 // threads per rank, 0 = automatic (cores / ranks on the node)
    // cpu | cuda (a CUDA build; rank r uses the GPU of its node-local rank)
    TrainDevice device = TrainDevice::kCpu;
    int64_t max_steps = 0;               // stop after this many optimizer steps; 0 = no limit
    int64_t checkpoint_every_steps = 0;  // write a checkpoint every N steps; 0 = never
    int checkpoint_every_epochs = 1;     // write a checkpoint every N epochs; 0 = never
    std::string checkpoint_dir = "runs/checkpoints";  // where checkpoints go
    int keep_checkpoints = 5;  // keep the newest N step_*, N epoch_* (and last); 0 = all
    std::string resume;        // checkpoint file to resume from; "" = start fresh
    bool overwrite = false;    // a fresh run may replace an earlier run's metrics and checkpoints
    int max_consecutive_skips = 10;  // stop after this many NaN/Inf steps in a row, 1..10^6
    int eval_every_epochs = 1;       // evaluate every N epochs; 0 = only after the last one
  };
  struct Log {
    std::string metrics_path = "runs/metrics.jsonl";  // JSON-lines metrics; "" = none
    ProgressBar progress = ProgressBar::kAuto;        // auto (if stderr is a terminal) | on | off
    int print_every = 50;        // plain progress line every N steps; 0 = per epoch only
    int diagnostics_every = 50;  // per-layer gamma, R, E(G), E(G_L) every N steps; 0 = never
  };

  Model model;
  Data data;
  Quant quant;
  Comm comm;
  Optim optim;
  Schedule schedule;
  Train train;
  Log log;
};

// Reads the YAML file at path (a mapping of sections; missing keys keep their defaults, an empty
// file gives the defaults), applies overrides ("section.key=value", in order, as apply_override
// does) and validates the result. Throws Error for a missing or unreadable file, a YAML syntax
// error, an unknown key, a wrong type or an out-of-range value; the message names the full key and,
// for what came from the file, "FILE line N, column M" (1-based).
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// As load_config, for YAML text; source_name stands for the file name in messages.
Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides = {});

// Applies one `--set` override "section.key=value" (or "section={key: value, ...}"): value is
// parsed as YAML, so `schedule.milestones=[0.5,0.75]` sets a sequence and `data.path=` an empty
// string. Checks the key, the type and the value's own range (throws Error naming the key and
// "--set"); checks that relate several keys are left to validate(). On error, config is left
// unchanged.
void apply_override(Config& config, const std::string& key_eq_value);

// Throws Error naming the key if any value is out of range or keys disagree (e.g.
// schedule.warmup_epochs >= train.epochs).
void validate(const Config& config);

// Every key, "section.name", in table order.
std::vector<std::string> config_keys();

// "key = value" lines for every key, values aligned, for the rank-0 echo.
std::string config_table(const Config& config);

// The full config as YAML; parse_config / load_config of it gives the same config (same hash).
std::string config_to_yaml(const Config& config);

// The full config as one line of JSON: {"model":{"name":"cnn",...},...} in table order.
std::string config_to_json(const Config& config);

// FNV-1a 64 of the canonical text: one "key=value\n" per key in table order, values as in
// config_to_yaml. Stable across runs, ranks and machines for the same config and build. Every key
// counts: none may legitimately differ between ranks today (a key that may, e.g. a per-node path,
// would be marked so in the field table and left out).
uint64_t config_hash(const Config& config);

}  // namespace int4ddp
