// Config parsing, overrides, validation and printing: everything walks one field table
// (make_fields), which names each key once with a pointer to its member and its own range check.
//
// Invariant: a value is only ever stored after its type and its own range were checked; a failed
// assignment restores the old value, and apply_override works on a copy, so a failed override
// leaves the config as it was.
// Checks that relate several keys run in validate(), which names the key a user should change and,
// when the config came from a file, that key's line.
#include "src/config/config.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <type_traits>
#include <variant>

#include "kernels/common/error.h"
#include "src/config/fields.h"

namespace int4ddp {
namespace {

using namespace fields;

constexpr size_t kMaxSuggestDistance = 3;  // "did you mean": at most this many edits, and at
                                           // most a third of the unknown name's length
constexpr double kBytesPerMiB = 1048576;   // comm.bucket_mb unit

std::vector<std::string> section_names(const std::vector<Field>& fields) {
  std::vector<std::string> sections;
  for (const Field& f : fields) {
    const std::string s = section_of(f.key);
    if (std::find(sections.begin(), sections.end(), s) == sections.end()) sections.push_back(s);
  }
  return sections;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

// --- reading YAML into the table
// ------------------------------------------------------------------

// Where a value came from, for messages: "FILE line N, column M" or "--set 'TEXT'".
struct Source {
  std::string file;           // the config file (or parse_config's source name); "" for an override
  std::string override_text;  // the `--set` text when file is ""

  std::string where(const YAML::Mark& mark) const {
    if (file.empty()) return "--set '" + override_text + "'";
    if (mark.is_null()) return file;
    return file + " line " + std::to_string(mark.line + 1) + ", column " +
           std::to_string(mark.column + 1);
  }
};

std::string describe_node(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "nothing (null)";
    case YAML::NodeType::Sequence:
      return "a sequence";
    case YAML::NodeType::Map:
      return "a mapping";
    case YAML::NodeType::Scalar:
      return (node.Tag() == "!" ? "the quoted string " : "") + quote(node.Scalar());
    default:
      return "an undefined value";
  }
}

// A number or bool must be written plainly: "0.1" in quotes is a string.
template <typename T>
bool decode_plain(const YAML::Node& node, T& out) {
  return node.IsScalar() && node.Tag() != "!" && YAML::convert<T>::decode(node, out);
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, bool>) return "true or false";
  if constexpr (std::is_same_v<T, int> || std::is_same_v<T, int64_t>) return "an integer";
  if constexpr (std::is_same_v<T, double>) return "a number";
  if constexpr (std::is_same_v<T, std::string>) return "a string";
  if constexpr (std::is_same_v<T, IntList>) return "a sequence of integers, e.g. [256, 256]";
  if constexpr (std::is_same_v<T, RealList>) return "a sequence of numbers, e.g. [0.5, 0.75]";
}

// Parses node as T into out. Returns "" or what is wrong, worded to follow the key in a message:
// ": expected a number, got \"abc\"", or "[1]: expected an integer, got \"x\"" for a list item.
template <typename T>
std::string decode_as(const YAML::Node& node, T& out) {
  auto mismatch = [](const std::string& at, const char* want, const YAML::Node& got) {
    return at + ": expected " + want + ", got " + describe_node(got);
  };
  if constexpr (std::is_same_v<T, std::string>) {
    if (node.IsNull()) {
      out.clear();  // `key:` or `key: ~` is the empty string
      return "";
    }
    if (!node.IsScalar()) return mismatch("", type_name<T>(), node);
    out = node.Scalar();
    return "";
  } else if constexpr (std::is_same_v<T, IntList> || std::is_same_v<T, RealList>) {
    using Item = typename T::value_type;
    if (!node.IsSequence()) return mismatch("", type_name<T>(), node);
    T list;
    for (size_t i = 0; i < node.size(); ++i) {
      Item v{};
      if (!decode_plain(node[i], v)) {
        return mismatch("[" + std::to_string(i) + "]", type_name<Item>(), node[i]);
      }
      list.push_back(v);
    }
    out = std::move(list);
    return "";
  } else {
    return decode_plain(node, out) ? "" : mismatch("", type_name<T>(), node);
  }
}

// Reads YAML nodes into a Config through the field table, remembering where each key came from.
class Loader {
 public:
  explicit Loader(Config& config) : fields_(make_fields(config)) {
    for (Field& f : fields_) by_key_[f.key] = &f;
    for (const std::string& s : section_names(fields_)) sections_.insert(s);
  }

  // Assigns node to key: a field, a section ("optim") or the whole config (""). mark is where key
  // was written (used when node itself has no useful position).
  void assign(const std::string& key, const YAML::Node& node, const YAML::Mark& mark,
              const Source& src) {
    const YAML::Mark at = node.IsNull() || node.Mark().is_null() ? mark : node.Mark();
    auto field = by_key_.find(key);
    if (field != by_key_.end()) {
      set_field(*field->second, node, src.where(at));
      origins_[key] = src.where(at);
      return;
    }
    if (node.IsNull()) return;  // an empty section, or an empty file
    if (!node.IsMap()) {
      INT4DDP_FAIL(src.where(at), ": ", key.empty() ? "the config" : key,
                   " must be a mapping of keys, got ", describe_node(node));
    }
    std::set<std::string> seen;
    for (auto it = node.begin(); it != node.end(); ++it) {
      // Copies: it-> is a temporary pair of node handles.
      const YAML::Node name = it->first;
      const YAML::Node value = it->second;
      if (!name.IsScalar()) {
        INT4DDP_FAIL(src.where(name.Mark()), ": ", key.empty() ? "the config" : key,
                     ": keys must be plain names, got ", describe_node(name));
      }
      // One spelling per key: nested mappings, never "optim.lr: 0.1" (which would also dodge the
      // duplicate check).
      INT4DDP_CHECK(name.Scalar().find('.') == std::string::npos, src.where(name.Mark()),
                    ": key \"", name.Scalar(), "\": write nested mappings, not dotted keys");
      const std::string full = key.empty() ? name.Scalar() : key + "." + name.Scalar();
      check_known(full, src.where(name.Mark()));
      INT4DDP_CHECK(seen.insert(name.Scalar()).second, src.where(name.Mark()), ": duplicate key ",
                    full);
      assign(full, value, name.Mark(), src);
    }
  }

  void apply_override(const std::string& text) {
    const Source src{"", text};
    const size_t eq = text.find('=');
    INT4DDP_CHECK(eq != std::string::npos, src.where(YAML::Mark::null_mark()),
                  ": expected section.key=value");
    const std::string key = trim(text.substr(0, eq));
    INT4DDP_CHECK(!key.empty(), src.where(YAML::Mark::null_mark()),
                  ": expected section.key=value, the key is empty");
    check_known(key, src.where(YAML::Mark::null_mark()));
    YAML::Node node;
    try {
      node = YAML::Load(text.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      INT4DDP_FAIL(src.where(YAML::Mark::null_mark()), ": ", key, ": the value is not valid YAML (",
                   e.msg, ")");
    }
    assign(key, node, YAML::Mark::null_mark(), src);
  }

  const std::map<std::string, std::string>& origins() const { return origins_; }

 private:
  static std::string trim(const std::string& s) {
    const size_t b = s.find_first_not_of(" \t");
    if (b == std::string::npos) return "";
    return s.substr(b, s.find_last_not_of(" \t") - b + 1);
  }

  void check_known(const std::string& key, const std::string& where) const {
    if (by_key_.count(key) > 0 || sections_.count(key) > 0) return;
    std::string best;
    const size_t name_length = key.size() - key.rfind('.') - 1;  // npos + 1 == 0
    size_t best_distance = std::min(kMaxSuggestDistance, std::max<size_t>(1, name_length / 3)) + 1;
    for (const auto& candidates :
         {std::vector<std::string>(sections_.begin(), sections_.end()), config_keys()}) {
      for (const std::string& c : candidates) {
        const size_t dist = edit_distance(key, c);
        if (dist < best_distance) {
          best_distance = dist;
          best = c;
        }
      }
    }
    INT4DDP_FAIL(where, ": unknown key ", key, best.empty() ? "" : " (did you mean " + best + "?)");
  }

  static void set_field(Field& f, const YAML::Node& node, const std::string& where) {
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          T parsed{};
          if constexpr (std::is_enum_v<T>) {
            std::string text;
            const std::string mismatch = decode_as(node, text);
            if (!mismatch.empty()) INT4DDP_FAIL(where, ": ", f.key, mismatch);
            if (std::find(f.choices.begin(), f.choices.end(), text) == f.choices.end())
              INT4DDP_FAIL(where, ": ", f.key, " = ", quote(text), ": ", must_be_one_of(f.choices));
            for (const auto& [value, spelled] : spellings(T{}))
              if (text == spelled) parsed = value;
          } else {
            const std::string mismatch = decode_as(node, parsed);
            if (!mismatch.empty()) INT4DDP_FAIL(where, ": ", f.key, mismatch);
          }
          T old = std::move(*p);
          *p = std::move(parsed);
          const std::string problem = f.check ? f.check() : std::string();
          if (!problem.empty()) {
            const std::string shown = format_value(f.value);
            *p = std::move(old);
            INT4DDP_FAIL(where, ": ", f.key, " = ", shown, ": ", problem);
          }
        },
        f.value);
  }

  std::vector<Field> fields_;
  std::map<std::string, Field*> by_key_;
  std::set<std::string> sections_;
  std::map<std::string, std::string> origins_;  // key -> where its value was set
};

// --- validation
// -----------------------------------------------------------------------------------

// Runs every field's own check, then the checks across keys. origins (may be null) says where keys
// were set, for messages.
void validate_with_origins(const Config& c, const std::map<std::string, std::string>* origins) {
  const std::vector<Field> fields = make_fields(c);
  auto value_of = [&](const std::string& key) {
    for (const Field& f : fields) {
      if (f.key == key) return format_value(f.value);
    }
    INT4DDP_FAIL("config: no key ", key);  // a typo in this file
  };
  auto fail = [&](const std::string& key, const std::string& problem) {
    std::string where = "config";
    if (origins != nullptr) {
      auto it = origins->find(key);
      if (it != origins->end()) where = it->second;
    }
    INT4DDP_FAIL(where, ": ", key, " = ", value_of(key), ": ", problem);
  };

  for (const Field& f : fields) {
    const std::string problem = f.check ? f.check() : std::string();
    if (!problem.empty()) fail(f.key, problem);
  }

  const std::string dataset = spelling(c.data.dataset);
  if (c.model.num_classes != 10 && c.data.dataset != DatasetKind::kSynthetic) {
    fail("model.num_classes", "must be 10 for data.dataset = " + dataset);
  }
  if (c.data.path.empty() && c.data.dataset != DatasetKind::kSynthetic) {
    fail("data.path", "must name the dataset directory for data.dataset = " + dataset);
  }
  const double bucket_elements = std::floor(c.comm.bucket_mb * kBytesPerMiB / sizeof(float));
  if (static_cast<double>(c.comm.block_size) > bucket_elements) {
    fail("comm.block_size",
         "must not exceed a bucket of comm.bucket_mb = " + format_double(c.comm.bucket_mb) +
             " MiB (" + format_double(bucket_elements) + " fp32 elements)");
  }
  if (c.comm.grad_policy == quant::PolicyKind::kTopK && c.comm.topk >= c.comm.block_size) {
    fail("comm.topk", "must be below comm.block_size = " + std::to_string(c.comm.block_size) +
                          " (the values per block that saturate)");
  }
  if (c.comm.dump_buckets_every > 0 && c.comm.dump_buckets_dir.empty()) {
    fail("comm.dump_buckets_every", "needs comm.dump_buckets_dir (the directory of the dumps)");
  }
  if (c.comm.dump_buckets_every > 0 && c.comm.mode == CommMode::kFp32) {
    fail("comm.dump_buckets_every",
         "dumps the buckets the two-shot compresses: needs comm.mode = int4 or int8");
  }
  const bool quantized = c.quant.weight_bits != kFp32Bits || c.quant.activation_bits != kFp32Bits ||
                         c.quant.grad_bits != kFp32Bits;
  if (c.train.device == TrainDevice::kCuda) {
#ifndef INT4DDP_HAVE_CUDA
    fail("train.device",
         "this int4ddp was built without CUDA; rebuild with nvcc on PATH (cmake "
         "-DINT4DDP_CUDA=ON) or use train.device = cpu");
#endif
  }
  if (c.comm.backend == CommBackend::kNccl) {
#ifndef INT4DDP_HAVE_NCCL
    fail("comm.backend",
         "this int4ddp was built without NCCL (it needs CUDA, MPI and NCCL at configure time); "
         "use comm.backend = mpi, which stages device gradients through host memory");
#endif
    if (c.train.device != TrainDevice::kCuda)
      fail("comm.backend",
           "nccl all-reduces gradients in GPU memory and needs train.device = cuda; with "
           "train.device = cpu use comm.backend = mpi");
    if (c.comm.mode == CommMode::kAuto)
      fail("comm.mode",
           "auto measures the MPI link and the host codec; with comm.backend = nccl choose "
           "comm.mode = int4, int8 or fp32 (or comm.backend = mpi)");
    if (c.comm.hierarchy == comm::HierarchyMode::kNode)
      fail("comm.hierarchy",
           "node needs host buffers; the NCCL buckets run flat (set comm.hierarchy = auto or "
           "flat, or comm.backend = mpi)");
  }
  if (quantized && c.model.name == ModelKind::kMlp && c.model.mlp_hidden.size() == 1 &&
      c.quant.first_layer_fp32 && c.quant.last_layer_fp32) {
    fail("model.mlp_hidden",
         "quantization is requested (quant.*_bits below 32) but no layer qualifies: an mlp with "
         "one hidden layer has only its first and its last Linear, and both stay fp32 "
         "(quant.first_layer_fp32 and quant.last_layer_fp32 are true); add a hidden layer or set "
         "one of those keys to false");
  }
  if (c.optim.nesterov && c.optim.momentum == 0) {
    fail("optim.nesterov", "needs optim.momentum > 0");
  }
  if (c.schedule.min_lr > c.optim.lr) {
    fail("schedule.min_lr", "must not exceed optim.lr = " + format_double(c.optim.lr));
  }
  if (c.schedule.warmup_epochs >= c.train.epochs) {
    fail("schedule.warmup_epochs",
         "must be less than train.epochs = " + std::to_string(c.train.epochs));
  }
  if (c.train.checkpoint_dir.empty() &&
      (c.train.checkpoint_every_steps > 0 || c.train.checkpoint_every_epochs > 0)) {
    fail("train.checkpoint_dir",
         "must not be empty while train.checkpoint_every_steps or "
         "train.checkpoint_every_epochs is > 0");
  }
}

// Counts the documents of a YAML stream. Not YAML::LoadAll: on some malformed input (a ',' at
// the top level) yaml-cpp's parser hands out empty documents forever without moving, and LoadAll
// never returns; here a document that starts where the previous one did is a syntax error.
size_t count_documents(const std::string& text) {
  struct Counter : YAML::EventHandler {
    std::vector<YAML::Mark> starts;
    void OnDocumentStart(const YAML::Mark& mark) override {
      if (!starts.empty() && mark.pos == starts.back().pos)
        throw YAML::ParserException(mark, "unexpected content (the parser cannot go on)");
      starts.push_back(mark);
    }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  const std::string&) override {}
    void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                         YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                    YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}
  } counter;
  std::istringstream in(text);
  YAML::Parser parser(in);
  while (parser.HandleNextDocument(counter)) {
  }
  return counter.starts.size();
}

}  // namespace

// --- public API
// -----------------------------------------------------------------------------------

Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides) {
  const Source src{source_name.empty() ? "<config>" : source_name, ""};
  size_t documents = 0;
  YAML::Node document;
  try {
    documents = count_documents(yaml_text);
    document = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    INT4DDP_FAIL(src.where(e.mark), ": YAML syntax error: ", e.msg);
  }
  INT4DDP_CHECK(documents <= 1, src.file, ": holds ", documents, " YAML documents, expected one");
  Config config;
  Loader loader(config);
  if (documents == 1) loader.assign("", document, YAML::Mark::null_mark(), src);
  for (const std::string& o : overrides) loader.apply_override(o);
  validate_with_origins(config, &loader.origins());
  return config;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  INT4DDP_CHECK(!std::filesystem::is_directory(path, ec), "config file ", path, ": is a directory");
  std::ifstream in(path, std::ios::binary);
  INT4DDP_CHECK(in.is_open(), "config file ", path, ": cannot open (", std::strerror(errno), ")");
  std::ostringstream text;
  text << in.rdbuf();
  INT4DDP_CHECK(!in.bad(), "config file ", path, ": read error");
  return parse_config(text.str(), path, overrides);
}

void apply_override(Config& config, const std::string& key_eq_value) {
  Config updated = config;  // a section override ("optim={...}") sets several keys
  Loader loader(updated);
  loader.apply_override(key_eq_value);
  config = std::move(updated);
}

void validate(const Config& config) { validate_with_origins(config, nullptr); }

std::vector<std::string> config_keys() {
  Config c;
  std::vector<std::string> keys;
  for (const Field& f : make_fields(c)) keys.push_back(f.key);
  return keys;
}

std::string config_table(const Config& config) {
  const std::vector<Field> fields = make_fields(config);
  size_t width = 0;
  for (const Field& f : fields) width = std::max(width, f.key.size());
  std::string out;
  for (const Field& f : fields) {
    out += f.key + std::string(width - f.key.size(), ' ') + " = " + format_value(f.value) + "\n";
  }
  return out;
}

std::string config_to_yaml(const Config& config) {
  std::string out;
  std::string section;
  for (const Field& f : make_fields(config)) {
    if (section_of(f.key) != section) {
      section = section_of(f.key);
      out += section + ":\n";
    }
    out += "  " + name_of(f.key) + ": " + format_value(f.value) + "\n";
  }
  return out;
}

std::string config_to_json(const Config& config) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const Field& f : make_fields(config)) {
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_enum_v<T>) {
            j[section_of(f.key)][name_of(f.key)] = spelling_of(*p);
          } else {
            j[section_of(f.key)][name_of(f.key)] = *p;
          }
        },
        f.value);
  }
  // A path need not be UTF-8; replace what JSON cannot hold rather than fail.
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

uint64_t config_hash(const Config& config) {
  constexpr uint64_t kFnvOffset = 14695981039346656037ull;
  constexpr uint64_t kFnvPrime = 1099511628211ull;
  uint64_t h = kFnvOffset;
  for (const Field& f : make_fields(config)) {
    for (unsigned char ch : f.key + "=" + format_value(f.value) + "\n") {
      h ^= ch;
      h *= kFnvPrime;
    }
  }
  return h;
}

}  // namespace int4ddp
