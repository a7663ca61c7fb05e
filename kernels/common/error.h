// int4ddp::Error and the check macros every library layer uses.
//
// Library code throws int4ddp::Error; only main() turns it into a message and a non-zero exit, so
// every failure path can be unit-tested with EXPECT_THROW. The message always names what was wrong.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace int4ddp {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace int4ddp

// INT4DDP_CHECK(cond, msg...): throw int4ddp::Error with the message (streamed pieces) if cond is
// false.
#define INT4DDP_CHECK(cond, ...)                                                 \
  do {                                                                           \
    if (!(cond)) throw ::int4ddp::Error(::int4ddp::detail::concat(__VA_ARGS__)); \
  } while (0)

#define INT4DDP_FAIL(...) throw ::int4ddp::Error(::int4ddp::detail::concat(__VA_ARGS__))
