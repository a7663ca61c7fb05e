// Run safety checks and writers (see run_safety.h). Files are written with POSIX calls, not
// iostreams, so that every error comes back with its errno (a stream only says "failed").
#include "src/train/run_safety.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <system_error>
#include <utility>

#include "kernels/common/error.h"
#include "src/train/checkpoint.h"

namespace int4ddp::train {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string os_reason(int err) { return std::generic_category().message(err); }

// Writes all n bytes (continuing after short writes and EINTR). Returns 0 or the errno of the
// failure; *written gets the bytes that did reach the file.
int write_all(int fd, const char* data, size_t n, size_t* written) {
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(fd, data + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      *written = done;
      return errno;
    }
    if (w == 0) {  // no progress and no error: treat as an I/O error rather than loop forever
      *written = done;
      return EIO;
    }
    done += static_cast<size_t>(w);
  }
  *written = done;
  return 0;
}

// fsync, where the file system supports it (EINVAL: a special file or a file system that cannot
// sync, nothing to do).
int sync_fd(int fd) {
  if (::fsync(fd) == 0 || errno == EINVAL) return 0;
  return errno;
}

// "." for a bare file name.
fs::path directory_of(const fs::path& file) {
  return file.has_parent_path() ? file.parent_path() : fs::path(".");
}

// "KEY = 'VALUE': " in front of every location error.
std::string where(const std::string& key, const std::string& value) {
  return key + " = '" + value + "': ";
}

// Creates dir (and its parents) unless it exists as a directory.
void ensure_directory(const std::string& key, const std::string& value, const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!ec && !fs::is_directory(dir, ec) && !ec)
    ec = std::make_error_code(std::errc::not_a_directory);
  INT4DDP_CHECK(!ec, where(key, value), "cannot create directory '", dir.string(),
                "': ", ec.message());
}

// Creates, writes and removes a small file in dir: proves that files can be created there (a
// directory can exist, and even look writable, on a read-only or full file system).
void probe_directory(const std::string& key, const std::string& value, const fs::path& dir) {
  char host[HOST_NAME_MAX + 1] = {};
  if (::gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  const fs::path probe =
      dir / (".int4ddp-write-probe." + std::string(host) + "." + std::to_string(::getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  INT4DDP_CHECK(fd >= 0, where(key, value), "cannot create a file in directory '", dir.string(),
                "': ", os_reason(errno));
  static constexpr char kText[] = "int4ddp write probe\n";
  size_t written = 0;
  int err = write_all(fd, kText, sizeof kText - 1, &written);
  if (::close(fd) != 0 && err == 0) err = errno;
  const int unlink_err = ::unlink(probe.c_str()) == 0 ? 0 : errno;
  INT4DDP_CHECK(err == 0, where(key, value), "cannot write a file in directory '", dir.string(),
                "': ", os_reason(err));
  INT4DDP_CHECK(unlink_err == 0, where(key, value), "cannot remove the probe file '",
                probe.string(), "': ", os_reason(unlink_err));
}

// An existing file the run will write to: a regular file (or a device) that opens for writing.
// Opens with O_APPEND and no O_CREAT/O_TRUNC, so the file is not changed. A missing file is fine
// (its directory was probed).
void check_existing_file(const std::string& key, const std::string& value, const fs::path& file) {
  struct stat st;
  if (::stat(file.c_str(), &st) != 0) {
    const int err = errno;
    INT4DDP_CHECK(err == ENOENT, where(key, value), "cannot inspect '", file.string(),
                  "': ", os_reason(err));
    return;
  }
  INT4DDP_CHECK(!S_ISDIR(st.st_mode), where(key, value), "'", file.string(),
                "' is a directory, not a file");
  const int fd = ::open(file.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  INT4DDP_CHECK(fd >= 0, where(key, value), "cannot open '", file.string(),
                "' for writing: ", os_reason(errno));
  ::close(fd);
}

}  // namespace

// ---- 1 -----------------------------------------------------------------------------------------

void check_output_locations(const std::string& checkpoint_dir, const std::string& metrics_path) {
  const std::string ck_key = "train.checkpoint_dir";
  INT4DDP_CHECK(!checkpoint_dir.empty(), ck_key, " is empty: set it to a directory");
  ensure_directory(ck_key, checkpoint_dir, checkpoint_dir);
  probe_directory(ck_key, checkpoint_dir, checkpoint_dir);

  if (metrics_path.empty()) return;
  const std::string m_key = "log.metrics_path";
  const fs::path dir = directory_of(metrics_path);
  ensure_directory(m_key, metrics_path, dir);
  probe_directory(m_key, metrics_path, dir);
  check_existing_file(m_key, metrics_path, metrics_path);
  check_existing_file(m_key, metrics_path, metrics_path + ".config.json");
}

// ---- 2 -----------------------------------------------------------------------------------------

MetricsWriter::MetricsWriter(const std::string& path, Mode mode, const std::string& key)
    : path_(path), key_(key) {
  if (path.empty()) return;
  ensure_directory(key, path, directory_of(path));
  // Always O_APPEND (also after O_TRUNC): the file offset is the end of the file, which is what
  // size_ and the cut back to the last complete line rely on.
  const int flags =
      O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (mode == Mode::kTruncate ? O_TRUNC : 0);
  fd_ = ::open(path.c_str(), flags, 0644);
  INT4DDP_CHECK(fd_ >= 0, where(key, path), "cannot open the file for writing: ", os_reason(errno));
  struct stat st;
  size_ = ::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode) ? static_cast<int64_t>(st.st_size) : 0;
}

MetricsWriter::~MetricsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

MetricsWriter::MetricsWriter(MetricsWriter&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      path_(std::move(other.path_)),
      key_(std::move(other.key_)),
      size_(other.size_) {}

MetricsWriter& MetricsWriter::operator=(MetricsWriter&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    key_ = std::move(other.key_);
    size_ = other.size_;
  }
  return *this;
}

void MetricsWriter::fail(const char* what, int err) {
  INT4DDP_FAIL(where(key_, path_), what, ": ", os_reason(err),
               "; the file keeps its records up to the last complete line, training stops");
}

void MetricsWriter::write(const json& record) {
  if (fd_ < 0) return;
  write_line(record.dump(-1, ' ', false, json::error_handler_t::replace));
}

void MetricsWriter::write_line(std::string_view line) {
  if (fd_ < 0) return;
  INT4DDP_CHECK(line.find('\n') == std::string_view::npos, where(key_, path_),
                "a metrics record must be one line");
  std::string buf;
  buf.reserve(line.size() + 1);
  buf.append(line);
  buf.push_back('\n');
  size_t written = 0;
  const int err = write_all(fd_, buf.data(), buf.size(), &written);
  if (err != 0) {
    // Best effort: cut a partly written line so the file stays valid JSON lines (a device such as
    // /dev/full cannot be truncated and needs no cut).
    struct stat st;
    if (written > 0 && ::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode))
      (void)!::ftruncate(fd_, static_cast<off_t>(size_));
    fail("cannot write a metrics record", err);
  }
  size_ += static_cast<int64_t>(buf.size());
}

void MetricsWriter::sync() {
  if (fd_ < 0) return;
  const int err = sync_fd(fd_);
  if (err != 0) fail("cannot sync the file to disk", err);
}

void MetricsWriter::close() {
  if (fd_ < 0) return;
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) fail("closing the file failed", errno);
}

void write_file_atomically(const std::string& path, std::string_view text, const std::string& key) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  INT4DDP_CHECK(fd >= 0, where(key, path), "cannot create '", tmp, "': ", os_reason(errno));
  size_t written = 0;
  int err = write_all(fd, text.data(), text.size(), &written);
  if (err == 0) err = sync_fd(fd);
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    INT4DDP_FAIL(where(key, path), "cannot write the file: ", os_reason(err));
  }
  // The rename itself is durable once the directory is synced.
  const int dfd = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    err = sync_fd(dfd);
    ::close(dfd);
    INT4DDP_CHECK(err == 0, where(key, path), "cannot sync its directory: ", os_reason(err));
  }
}

// ---- 3 -----------------------------------------------------------------------------------------

namespace {

// Whether a metrics record belongs to the run up to the checkpoint (the rules in run_safety.h).
bool keep_record(const json& r, int64_t global_batch, int64_t completed_epochs) {
  const auto type = r.find("type");
  const std::string t = type != r.end() && type->is_string() ? type->get<std::string>() : "";
  if (t == "final") return false;
  if (t == "epoch") {
    const auto e = r.find("epoch");
    return e == r.end() || !e->is_number_integer() || e->get<int64_t>() <= completed_epochs;
  }
  const auto b = r.find("batch");
  if (b != r.end() && b->is_number_integer()) return b->get<int64_t>() <= global_batch;
  return true;
}

}  // namespace

MetricsRewind rewind_metrics(const std::string& path, int64_t global_batch,
                             int64_t completed_epochs) {
  MetricsRewind result;
  std::error_code ec;
  if (!fs::exists(path, ec)) return result;
  std::ifstream f(path, std::ios::binary);
  INT4DDP_CHECK(f.is_open(), where("log.metrics_path", path),
                "cannot read the file: ", os_reason(errno));
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  INT4DDP_CHECK(!f.bad(), where("log.metrics_path", path), "reading the file failed");

  std::string kept;
  kept.reserve(text.size());
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const bool terminated = nl != std::string::npos;
    const std::string_view line(text.data() + pos, (terminated ? nl : text.size()) - pos);
    pos = terminated ? nl + 1 : text.size();
    ++line_no;
    if (line.empty()) continue;
    const json r = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
    if (r.is_discarded() || !r.is_object()) {
      if (!terminated) {  // the last line, cut mid-write
        result.torn_tail = true;
        continue;
      }
      INT4DDP_FAIL(where("log.metrics_path", path), "line ", line_no,
                   " is not a JSON record; the file cannot be lined up with the checkpoint "
                   "(move it away to start a new metrics file)");
    }
    if (!keep_record(r, global_batch, completed_epochs)) {
      ++result.dropped;
      continue;
    }
    ++result.kept;
    kept.append(line);
    kept.push_back('\n');
  }
  if (kept != text) write_file_atomically(path, kept, "log.metrics_path");
  return result;
}

// ---- 6 -----------------------------------------------------------------------------------------

std::string check_fresh_run(const std::string& checkpoint_dir, const std::string& metrics_path,
                            bool overwrite) {
  std::vector<std::string> found;
  std::error_code ec;
  if (!metrics_path.empty() && fs::is_regular_file(metrics_path, ec)) {
    const uintmax_t bytes = fs::file_size(metrics_path, ec);
    if (!ec && bytes > 0)
      found.push_back(where("log.metrics_path", metrics_path) + "holds " + std::to_string(bytes) +
                      " bytes of metrics");
  }
  // The run's checkpoints, newest first.
  std::vector<std::pair<fs::file_time_type, std::string>> ckpts;
  if (!checkpoint_dir.empty() && fs::is_directory(checkpoint_dir, ec)) {
    for (fs::directory_iterator it(checkpoint_dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code e2;
      if (it->path().extension() == ".ckpt" && it->is_regular_file(e2))
        ckpts.emplace_back(it->last_write_time(e2), it->path().filename().string());
    }
  }
  std::sort(ckpts.begin(), ckpts.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  if (!ckpts.empty()) {
    std::string names;
    for (size_t i = 0; i < ckpts.size() && i < 3; ++i) names += (i ? ", " : "") + ckpts[i].second;
    if (ckpts.size() > 3) names += ", ...";
    found.push_back(where("train.checkpoint_dir", checkpoint_dir) + "holds " +
                    std::to_string(ckpts.size()) + " checkpoint(s) (" + names + ")");
  }
  if (found.empty()) return "";
  std::string what;
  for (const std::string& s : found) what += (what.empty() ? "" : "; ") + s;
  if (overwrite)
    return "train.overwrite: true: this fresh run replaces an earlier run's output: " + what;

  // Resume from last.ckpt when there is one (written after every epoch checkpoint), else from
  // the newest.
  std::string hint = "There is no checkpoint to continue it with --resume; ";
  if (!ckpts.empty()) {
    const bool has_last = std::any_of(ckpts.begin(), ckpts.end(),
                                      [](const auto& c) { return c.second == "last.ckpt"; });
    const fs::path latest = fs::path(checkpoint_dir) / (has_last ? "last.ckpt" : ckpts[0].second);
    hint = "Continue that run with --resume " + latest.string() + ", or ";
  }
  INT4DDP_FAIL("a fresh run (no --resume) would overwrite an earlier run: ", what, ". ", hint,
               "start over in place with train.overwrite: true (--set train.overwrite=true), or "
               "choose another train.checkpoint_dir and log.metrics_path");
}

// ---- 7 -----------------------------------------------------------------------------------------

bool may_change_on_resume(const std::string& key) {
  static const char* const kAllowed[] = {"train.epochs",
                                         "train.max_steps",
                                         "train.checkpoint_every_steps",
                                         "train.checkpoint_every_epochs",
                                         "train.checkpoint_dir",
                                         "train.keep_checkpoints",
                                         "train.overwrite",
                                         "train.threads",
                                         "train.device",
                                         "train.eval_every_epochs",
                                         "train.eval_batch_size",
                                         "train.max_consecutive_skips",
                                         "train.resume",
                                         "data.path"};
  if (key.rfind("log.", 0) == 0) return true;
  return std::find(std::begin(kAllowed), std::end(kAllowed), key) != std::end(kAllowed);
}

namespace {

// "section.name" -> value as JSON text, in document order. A top-level value that is not a
// section becomes its own key.
std::vector<std::pair<std::string, std::string>> flatten(const std::string& config_json,
                                                         const char* which) {
  const nlohmann::ordered_json j =
      nlohmann::ordered_json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  INT4DDP_CHECK(j.is_object(), "resume: the ", which, " config is not a JSON object");
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [section, body] : j.items()) {
    if (!body.is_object()) {
      out.emplace_back(section, body.dump());
      continue;
    }
    for (const auto& [name, value] : body.items())
      out.emplace_back(section + "." + name, value.dump());
  }
  return out;
}

}  // namespace

std::vector<ConfigChange> diff_configs(const std::string& stored_json,
                                       const std::string& current_json) {
  const auto stored = flatten(stored_json, "checkpoint's");
  const auto current = flatten(current_json, "current");
  auto lookup = [](const auto& kv, const std::string& key) -> const std::string* {
    for (const auto& [k, v] : kv)
      if (k == key) return &v;
    return nullptr;
  };
  std::vector<ConfigChange> changes;
  auto add = [&](const std::string& key, const std::string* s, const std::string* c) {
    if (key == "train.resume" || (s && c && *s == *c)) return;
    changes.push_back({key, s ? *s : "absent", c ? *c : "absent", may_change_on_resume(key)});
  };
  for (const auto& [k, v] : stored) add(k, &v, lookup(current, k));
  for (const auto& [k, v] : current)
    if (!lookup(stored, k)) add(k, nullptr, &v);
  return changes;
}

std::string check_resume_config(const std::string& stored_json, const std::string& current_json,
                                const std::string& checkpoint_path) {
  const std::vector<ConfigChange> changes = diff_configs(stored_json, current_json);
  if (changes.empty()) return "";
  std::ostringstream list;
  std::string refused;
  for (const ConfigChange& c : changes) {
    list << "  " << c.key << ": " << c.stored << " -> " << c.current;
    if (!c.allowed) {
      list << "  (may not change on resume)";
      refused += (refused.empty() ? "" : ", ") + c.key;
    } else if (c.key == "train.epochs") {
      list << "  (the learning-rate schedule is a fraction of train.epochs: from here on the lr "
              "follows the schedule of "
           << c.current << " epochs)";
    }
    list << "\n";
  }
  const std::string head = "resume: the config differs from the one checkpoint " + checkpoint_path +
                           " was trained with in " + std::to_string(changes.size()) + " key(s):\n";
  INT4DDP_CHECK(refused.empty(), head, list.str(), "refusing to resume: ", refused,
                " would change the training itself; set them back to the checkpoint's values "
                "(its config_yaml record), or start a fresh run");
  return head + list.str();
}

std::string check_resume_config(const Checkpoint& ck, const std::string& checkpoint_path,
                                const Config& current) {
  const Config stored =
      parse_config(ck.get_string("config_yaml"), checkpoint_path + " (embedded config)");
  return check_resume_config(config_to_json(stored), config_to_json(current), checkpoint_path);
}

// ---- 8 -----------------------------------------------------------------------------------------

json finite_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

}  // namespace int4ddp::train
