// The field table and the canonical text of values (see fields.h).
#include "src/config/fields.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <type_traits>

#include "kernels/common/error.h"

namespace int4ddp::fields {

const Spellings<ModelKind>& spellings(ModelKind) {
  static const Spellings<ModelKind> s = {{ModelKind::kMlp, "mlp"},
                                         {ModelKind::kCnn, "cnn"},
                                         {ModelKind::kResNet20, "resnet20"},
                                         {ModelKind::kResNet18, "resnet18"}};
  return s;
}
const Spellings<DatasetKind>& spellings(DatasetKind) {
  static const Spellings<DatasetKind> s = {{DatasetKind::kFashionMnist, "fashion_mnist"},
                                           {DatasetKind::kSynthetic, "synthetic"},
                                           {DatasetKind::kCifar10, "cifar10"}};
  return s;
}
const Spellings<CommBackend>& spellings(CommBackend) {
  static const Spellings<CommBackend> s = {
      {CommBackend::kNone, "none"}, {CommBackend::kMpi, "mpi"}, {CommBackend::kNccl, "nccl"}};
  return s;
}
const Spellings<CommMode>& spellings(CommMode) {
  static const Spellings<CommMode> s = {{CommMode::kFp32, "fp32"},
                                        {CommMode::kInt4, "int4"},
                                        {CommMode::kInt8, "int8"},
                                        {CommMode::kAuto, "auto"}};
  return s;
}
const Spellings<ScheduleKind>& spellings(ScheduleKind) {
  static const Spellings<ScheduleKind> s = {{ScheduleKind::kMultistep, "multistep"},
                                            {ScheduleKind::kCosine, "cosine"}};
  return s;
}
const Spellings<ProgressBar>& spellings(ProgressBar) {
  static const Spellings<ProgressBar> s = {
      {ProgressBar::kAuto, "auto"}, {ProgressBar::kOn, "on"}, {ProgressBar::kOff, "off"}};
  return s;
}
const Spellings<TrainDevice>& spellings(TrainDevice) {
  static const Spellings<TrainDevice> s = {{TrainDevice::kCpu, "cpu"},
                                           {TrainDevice::kCuda, "cuda"}};
  return s;
}
const Spellings<quant::PolicyKind>& spellings(quant::PolicyKind) {
  using quant::PolicyKind;
  static const Spellings<PolicyKind> s = [] {
    Spellings<PolicyKind> v;
    for (PolicyKind k : {PolicyKind::kMinMax, PolicyKind::kFixed, PolicyKind::kLbt,
                         PolicyKind::kMse, PolicyKind::kDsgc, PolicyKind::kTopK})
      v.emplace_back(k, quant::policy_kind_name(k));  // the quantizer's own names
    return v;
  }();
  return s;
}
const Spellings<quant::Rounding>& spellings(quant::Rounding) {
  static const Spellings<quant::Rounding> s = {{quant::Rounding::kNearest, "nearest"},
                                               {quant::Rounding::kStochastic, "stochastic"}};
  return s;
}

const Spellings<comm::HierarchyMode>& spellings(comm::HierarchyMode) {
  using comm::HierarchyMode;
  static const Spellings<HierarchyMode> s = [] {
    Spellings<HierarchyMode> v;
    for (HierarchyMode m : {HierarchyMode::kAuto, HierarchyMode::kFlat, HierarchyMode::kNode})
      v.emplace_back(m, comm::hierarchy_mode_name(m));  // the comm layer's own names
    return v;
  }();
  return s;
}

std::string must_be_one_of(const std::vector<std::string>& choices) {
  std::string s = "must be one of ";
  for (size_t i = 0; i < choices.size(); ++i) s += (i > 0 ? ", " : "") + choices[i];
  return s;
}

// Shortest text that reads back as the same double, always with a '.' or an exponent so that YAML
// and a reader see a float ("25.0", "0.1", "1e-5").
std::string format_double(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  INT4DDP_CHECK(ec == std::errc(), "config: cannot format a double");
  std::string s(buf, end);
  const size_t e = s.find('e');
  if (e == std::string::npos) {
    if (s.find('.') == std::string::npos) s += ".0";
    return s;
  }
  // "1e-05" -> "1e-5": drop the exponent's leading zeros.
  size_t digits = e + 1;
  if (digits < s.size() && (s[digits] == '-' || s[digits] == '+')) ++digits;
  while (digits + 1 < s.size() && s[digits] == '0') s.erase(digits, 1);
  return s;
}

namespace {

// A range bound in a message: "100", "0.5", "1e-3".
std::string format_bound(double v) {
  std::string s = format_double(v);
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  return s;
}

}  // namespace

// YAML double-quoted scalar (also valid JSON for printable ASCII).
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch < 0x20 || ch == 0x7f) {
      static const char* kHex = "0123456789abcdef";
      out += "\\x";
      out += kHex[ch >> 4];
      out += kHex[ch & 0xf];
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

// The canonical text of a value: YAML that parses back to the same value. Used by the table, the
// YAML and the hash.
std::string format_value(const ValuePtr& value) {
  return std::visit(
      [](auto* p) -> std::string {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, bool>) {
          return *p ? "true" : "false";
        } else if constexpr (std::is_same_v<T, int> || std::is_same_v<T, int64_t>) {
          return std::to_string(*p);
        } else if constexpr (std::is_same_v<T, double>) {
          return format_double(*p);
        } else if constexpr (std::is_same_v<T, std::string>) {
          return quote(*p);
        } else if constexpr (std::is_enum_v<T>) {
          return quote(spelling_of(*p));
        } else {
          std::string s = "[";
          for (size_t i = 0; i < p->size(); ++i) {
            if (i > 0) s += ", ";
            if constexpr (std::is_same_v<T, IntList>) {
              s += std::to_string((*p)[i]);
            } else {
              s += format_double((*p)[i]);
            }
          }
          return s + "]";
        }
      },
      value);
}

// --- range checks ---------------------------------------------------------------------------

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int kMaxListLength = 16;  // model.mlp_hidden, schedule.milestones

std::string describe_range(double lo, double hi, bool lo_open, bool hi_open) {
  if (hi == kInf) return (lo_open ? "must be > " : "must be >= ") + format_bound(lo);
  return std::string("must be in ") + (lo_open ? "(" : "[") + format_bound(lo) + ", " +
         format_bound(hi) + (hi_open ? ")" : "]");
}

// An integer range reads better without ".0".
std::string describe_int_range(int64_t lo, int64_t hi) {
  if (hi == std::numeric_limits<int64_t>::max()) return "must be >= " + std::to_string(lo);
  return "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

bool in_range(double v, double lo, double hi, bool lo_open, bool hi_open) {
  return std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
}

Check real(const double* p, double lo, double hi, bool lo_open, bool hi_open) {
  return [=] {
    return in_range(*p, lo, hi, lo_open, hi_open) ? std::string()
                                                  : describe_range(lo, hi, lo_open, hi_open);
  };
}

template <typename T>
Check integer(const T* p, int64_t lo, int64_t hi = std::numeric_limits<int64_t>::max()) {
  return [=] {
    const int64_t v = *p;
    return v >= lo && v <= hi ? std::string() : describe_int_range(lo, hi);
  };
}

Check bits(const int* p) {
  return [=] {
    return (*p >= 2 && *p <= 8) || *p == kFp32Bits ? std::string()
                                                   : std::string("must be 2..8, or 32 (fp32)");
  };
}

// The field of an enumerated key that accepts the values `allowed` (default: every value of E).
template <typename E>
Field choice(std::string key, E* p, std::vector<E> allowed = {}) {
  if (allowed.empty())
    for (const auto& value_text : spellings(E{})) allowed.push_back(value_text.first);
  std::vector<std::string> names;
  for (E v : allowed) names.push_back(spelling_of(v));
  Check check = [p, allowed, names] {
    return std::find(allowed.begin(), allowed.end(), *p) != allowed.end() ? std::string()
                                                                          : must_be_one_of(names);
  };
  return {std::move(key), p, std::move(check), std::move(names)};
}

Check int_list(const IntList* p, int min_length, int max_length, int lo, int hi) {
  return [=] {
    const int n = static_cast<int>(p->size());
    if (n < min_length || n > max_length) {
      return "must hold " + std::to_string(min_length) + ".." + std::to_string(max_length) +
             " values";
    }
    for (int v : *p) {
      if (v < lo || v > hi) return "every value " + describe_int_range(lo, hi);
    }
    return std::string();
  };
}

// Values in (lo, hi), strictly increasing.
Check increasing_fractions(const RealList* p, int max_length) {
  return [=] {
    if (static_cast<int>(p->size()) > max_length) {
      return "must hold at most " + std::to_string(max_length) + " values";
    }
    for (size_t i = 0; i < p->size(); ++i) {
      if (!in_range((*p)[i], 0, 1, true, true)) return std::string("every value must be in (0, 1)");
      if (i > 0 && !((*p)[i] > (*p)[i - 1])) return std::string("must be strictly increasing");
    }
    return std::string();
  };
}

Check even_block(const int64_t* p) {
  return [=] {
    const int64_t kMax = int64_t{1} << 24;
    if (*p < 2 || *p > kMax || *p % 2 != 0) {
      return "must be even and in [2, " + std::to_string(kMax) + "] (INT4 packs 2 per byte)";
    }
    return std::string();
  };
}

}  // namespace

// --- the field table: every key, once
// -------------------------------------------------------------

std::vector<Field> make_fields(Config& c) {
  const int64_t kMaxExamples = 100000000;
  const int64_t kMaxBatch = 65536;
  const int64_t kMaxSeed = 4294967295;  // Philox keys are 32-bit words
  auto& m = c.model;
  auto& d = c.data;
  auto& q = c.quant;
  auto& k = c.comm;
  auto& o = c.optim;
  auto& s = c.schedule;
  auto& t = c.train;
  auto& l = c.log;
  return {
      choice("model.name", &m.name),
      {"model.mlp_hidden", &m.mlp_hidden, int_list(&m.mlp_hidden, 1, kMaxListLength, 1, 65536)},
      {"model.num_classes", &m.num_classes, integer(&m.num_classes, 2, 100000)},

      choice("data.dataset", &d.dataset),
      {"data.path", &d.path, nullptr},
      {"data.normalize", &d.normalize, nullptr},
      {"data.random_crop_pad", &d.random_crop_pad, integer(&d.random_crop_pad, 0, 16)},
      {"data.random_flip", &d.random_flip, nullptr},
      {"data.synthetic_train_size", &d.synthetic_train_size,
       integer(&d.synthetic_train_size, 1, kMaxExamples)},
      {"data.synthetic_test_size", &d.synthetic_test_size,
       integer(&d.synthetic_test_size, 1, kMaxExamples)},
      {"data.max_train_examples", &d.max_train_examples, integer(&d.max_train_examples, 0)},
      {"data.max_test_examples", &d.max_test_examples, integer(&d.max_test_examples, 0)},

      {"quant.weight_bits", &q.weight_bits, bits(&q.weight_bits)},
      {"quant.activation_bits", &q.activation_bits, bits(&q.activation_bits)},
      {"quant.grad_bits", &q.grad_bits, bits(&q.grad_bits)},
      choice("quant.grad_policy", &q.grad_policy,
             {quant::PolicyKind::kMinMax, quant::PolicyKind::kFixed, quant::PolicyKind::kLbt,
              quant::PolicyKind::kMse, quant::PolicyKind::kDsgc}),
      {"quant.fixed_gamma", &q.fixed_gamma, real(&q.fixed_gamma, 0, 1, true, false)},
      {"quant.alpha", &q.alpha, real(&q.alpha, 0, 1, true, true)},
      {"quant.eta", &q.eta, real(&q.eta, 0, 1, true, false)},
      {"quant.lbt_calibrate", &q.lbt_calibrate, nullptr},
      choice("quant.grad_rounding", &q.grad_rounding),
      {"quant.first_layer_fp32", &q.first_layer_fp32, nullptr},
      {"quant.last_layer_fp32", &q.last_layer_fp32, nullptr},
      {"quant.scale_lr", &q.scale_lr, real(&q.scale_lr, 0, 1, true, false)},

      choice("comm.backend", &k.backend),
      choice("comm.mode", &k.mode),
      {"comm.bucket_mb", &k.bucket_mb, real(&k.bucket_mb, 0, 4096, true, false)},
      {"comm.block_size", &k.block_size, even_block(&k.block_size)},
      {"comm.small_tensor_threshold", &k.small_tensor_threshold,
       integer(&k.small_tensor_threshold, 0)},
      {"comm.worker_error_feedback", &k.worker_error_feedback, nullptr},
      {"comm.server_error_feedback", &k.server_error_feedback, nullptr},
      choice("comm.grad_policy", &k.grad_policy,
             {quant::PolicyKind::kMinMax, quant::PolicyKind::kFixed, quant::PolicyKind::kLbt,
              quant::PolicyKind::kMse, quant::PolicyKind::kTopK}),
      {"comm.fixed_gamma", &k.fixed_gamma, real(&k.fixed_gamma, 0, 1, true, false)},
      {"comm.alpha", &k.alpha, real(&k.alpha, 0, 1, true, true)},
      {"comm.eta", &k.eta, real(&k.eta, 0, 1, true, false)},
      {"comm.topk", &k.topk, integer(&k.topk, 1, (1 << 24) - 1)},
      choice("comm.rounding", &k.rounding),
      {"comm.overlap", &k.overlap, nullptr},
      {"comm.pipeline_chunks", &k.pipeline_chunks,
       integer(&k.pipeline_chunks, 0, comm::kMaxPipelinePieces)},
      choice("comm.hierarchy", &k.hierarchy),
      {"comm.dump_buckets_every", &k.dump_buckets_every, integer(&k.dump_buckets_every, 0)},
      {"comm.dump_buckets_dir", &k.dump_buckets_dir, nullptr},

      {"optim.lr", &o.lr, real(&o.lr, 0, 100, true, false)},
      {"optim.momentum", &o.momentum, real(&o.momentum, 0, 1, false, true)},
      {"optim.weight_decay", &o.weight_decay, real(&o.weight_decay, 0, 1, false, true)},
      {"optim.nesterov", &o.nesterov, nullptr},

      choice("schedule.kind", &s.kind),
      {"schedule.milestones", &s.milestones, increasing_fractions(&s.milestones, kMaxListLength)},
      {"schedule.gamma", &s.gamma, real(&s.gamma, 0, 1, true, false)},
      {"schedule.min_lr", &s.min_lr, real(&s.min_lr, 0, kInf, false, false)},
      {"schedule.warmup_epochs", &s.warmup_epochs, real(&s.warmup_epochs, 0, kInf, false, false)},

      {"train.epochs", &t.epochs, integer(&t.epochs, 1, 100000)},
      {"train.batch_size", &t.batch_size, integer(&t.batch_size, 1, kMaxBatch)},
      {"train.eval_batch_size", &t.eval_batch_size, integer(&t.eval_batch_size, 1, kMaxBatch)},
      {"train.seed", &t.seed, integer(&t.seed, 0, kMaxSeed)},
      {"train.threads", &t.threads, integer(&t.threads, 0, 1024)},
      choice("train.device", &t.device),
      {"train.max_steps", &t.max_steps, integer(&t.max_steps, 0)},
      {"train.checkpoint_every_steps", &t.checkpoint_every_steps,
       integer(&t.checkpoint_every_steps, 0)},
      {"train.checkpoint_every_epochs", &t.checkpoint_every_epochs,
       integer(&t.checkpoint_every_epochs, 0)},
      {"train.checkpoint_dir", &t.checkpoint_dir, nullptr},
      {"train.keep_checkpoints", &t.keep_checkpoints, integer(&t.keep_checkpoints, 0)},
      {"train.resume", &t.resume, nullptr},
      {"train.overwrite", &t.overwrite, nullptr},
      {"train.max_consecutive_skips", &t.max_consecutive_skips,
       integer(&t.max_consecutive_skips, 1, 1000000)},
      {"train.eval_every_epochs", &t.eval_every_epochs, integer(&t.eval_every_epochs, 0)},

      {"log.metrics_path", &l.metrics_path, nullptr},
      choice("log.progress", &l.progress),
      {"log.print_every", &l.print_every, integer(&l.print_every, 0)},
      {"log.diagnostics_every", &l.diagnostics_every, integer(&l.diagnostics_every, 0)},
  };
}

std::vector<Field> make_fields(const Config& c) { return make_fields(const_cast<Config&>(c)); }

std::string section_of(const std::string& key) { return key.substr(0, key.find('.')); }
std::string name_of(const std::string& key) { return key.substr(key.find('.') + 1); }

}  // namespace int4ddp::fields

namespace int4ddp {

const char* spelling(ModelKind v) { return fields::spelling_of(v); }
const char* spelling(DatasetKind v) { return fields::spelling_of(v); }
const char* spelling(CommBackend v) { return fields::spelling_of(v); }
const char* spelling(CommMode v) { return fields::spelling_of(v); }
const char* spelling(ScheduleKind v) { return fields::spelling_of(v); }
const char* spelling(ProgressBar v) { return fields::spelling_of(v); }
const char* spelling(TrainDevice v) { return fields::spelling_of(v); }
const char* spelling(quant::PolicyKind v) { return fields::spelling_of(v); }
const char* spelling(quant::Rounding v) { return fields::spelling_of(v); }
const char* spelling(comm::HierarchyMode v) { return fields::spelling_of(v); }

}  // namespace int4ddp
