// The fp32 ring over its own TCP connections (see socket_ring.h).
#include "comm/socket_ring.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "kernels/common/error.h"

namespace int4ddp::comm {
namespace {

constexpr uint64_t kMagic = 0x69346464'72696e67ull;  // "i4ddring"
constexpr int kMaxAddrs = 8;
constexpr int kConnectTimeoutMs = 3000;  // per address of the next rank
constexpr int kAcceptTimeoutMs = 30000;  // for the previous rank to connect and say hello

// What each rank publishes (all-gathered).
struct Endpoint {
  uint32_t addrs[kMaxAddrs];  // IPv4, network byte order
  uint32_t naddrs;
  uint32_t port;  // host byte order
  uint64_t token;
};

// First message on a connection (connector -> listener) and its answer.
struct Hello {
  uint64_t magic, token;  // the listener's token
  uint64_t rank;          // the connector's rank
};

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

bool set_nonblocking(int fd) {
  const int fl = ::fcntl(fd, F_GETFL, 0);
  return fl >= 0 && ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0;
}

// Waits up to timeout_ms for events on fd; true when they came.
bool wait_fd(int fd, short events, int timeout_ms) {
  pollfd p{fd, events, 0};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) return false;
    const int r = ::poll(&p, 1, static_cast<int>(left));
    if (r > 0) return (p.revents & (events | POLLERR | POLLHUP)) != 0;
    if (r < 0 && errno != EINTR) return false;
  }
}

// Sends / receives exactly n bytes on a non-blocking socket within timeout_ms.
bool send_all(int fd, const void* p, size_t n, int timeout_ms) {
  const auto* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w > 0) {
      c += w, n -= static_cast<size_t>(w);
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      if (!wait_fd(fd, POLLOUT, timeout_ms)) return false;
    } else {
      return false;
    }
  }
  return true;
}

bool recv_all(int fd, void* p, size_t n, int timeout_ms) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = ::recv(fd, c, n, 0);
    if (r > 0) {
      c += r, n -= static_cast<size_t>(r);
    } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      if (!wait_fd(fd, POLLIN, timeout_ms)) return false;
    } else {
      return false;  // closed or failed
    }
  }
  return true;
}

void tune(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// This host's IPv4 addresses that other hosts may reach: up, not loopback.
void local_addresses(Endpoint& e) {
  e.naddrs = 0;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return;
  for (ifaddrs* a = list; a && e.naddrs < kMaxAddrs; a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET) continue;
    if (!(a->ifa_flags & IFF_UP) || (a->ifa_flags & IFF_LOOPBACK)) continue;
    e.addrs[e.naddrs++] = reinterpret_cast<const sockaddr_in*>(a->ifa_addr)->sin_addr.s_addr;
  }
  ::freeifaddrs(list);
}

// Connects to one address of `to` and exchanges the hello: the connection, or -1.
int connect_to(const Endpoint& to, uint32_t addr, uint64_t my_rank) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(to.port));
  sa.sin_addr.s_addr = addr;
  int err = 0;
  socklen_t len = sizeof err;
  const Hello hello{kMagic, to.token, my_rank};
  Hello ack{};
  const bool ok = set_nonblocking(fd) &&
                  (::connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof sa) == 0 ||
                   (errno == EINPROGRESS && wait_fd(fd, POLLOUT, kConnectTimeoutMs) &&
                    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0)) &&
                  send_all(fd, &hello, sizeof hello, kConnectTimeoutMs) &&
                  recv_all(fd, &ack, sizeof ack, kAcceptTimeoutMs) && ack.magic == kMagic &&
                  ack.token == to.token;
  if (!ok) close_fd(fd);
  return fd;
}

// Accepts connections on listener until the previous rank says hello with our token (answered
// with the same), or the timeout: the connection, or -1.
int accept_from(int listener, uint64_t token, uint64_t prev_rank) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(kAcceptTimeoutMs);
  while (std::chrono::steady_clock::now() < deadline) {
    if (!wait_fd(listener, POLLIN, 200)) continue;
    int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    Hello hello{};
    if (set_nonblocking(fd) && recv_all(fd, &hello, sizeof hello, kConnectTimeoutMs) &&
        hello.magic == kMagic && hello.token == token && hello.rank == prev_rank &&
        send_all(fd, &hello, sizeof hello, kConnectTimeoutMs))
      return fd;
    close_fd(fd);  // someone else, or a failed attempt: keep listening
  }
  return -1;
}

}  // namespace

std::unique_ptr<SocketRing> SocketRing::connect(Communicator& comm) {
  const int n = comm.size(), r = comm.rank();
  if (n < 2) return nullptr;
  Endpoint me{};
  me.token = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}() ^
             (static_cast<uint64_t>(::getpid()) << 16);
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof sa;
  const bool listening = listener >= 0 &&
                         ::bind(listener, reinterpret_cast<const sockaddr*>(&sa), sizeof sa) == 0 &&
                         ::listen(listener, 16) == 0 &&
                         ::getsockname(listener, reinterpret_cast<sockaddr*>(&sa), &len) == 0 &&
                         set_nonblocking(listener);
  if (listening) {
    me.port = ntohs(sa.sin_port);
    local_addresses(me);
  }
  std::vector<Endpoint> all(static_cast<size_t>(n));
  comm.allgatherv(&me, sizeof me, all.data(),
                  ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(n), sizeof me)));
  const Endpoint& next = all[static_cast<size_t>((r + 1) % n)];
  // The previous rank's connection is accepted on a helper thread while this one connects to the
  // next rank (every rank connects first, so accepting afterwards would leave all of them waiting
  // for an answer).
  int recv_fd = -1, send_fd = -1;
  std::thread acceptor;
  if (listening)
    acceptor = std::thread(
        [&] { recv_fd = accept_from(listener, me.token, static_cast<uint64_t>((r + n - 1) % n)); });
  if (listening)
    for (uint32_t i = 0; i < next.naddrs && i < kMaxAddrs && send_fd < 0; ++i)
      send_fd = connect_to(next, next.addrs[i], static_cast<uint64_t>(r));
  if (acceptor.joinable()) acceptor.join();
  close_fd(listener);
  int64_t failed = (send_fd >= 0 && recv_fd >= 0) ? 0 : 1;
  comm.allreduce_sum_i64(&failed, 1);
  if (failed > 0) {
    close_fd(send_fd);
    close_fd(recv_fd);
    return nullptr;
  }
  tune(send_fd);
  tune(recv_fd);
  return std::unique_ptr<SocketRing>(new SocketRing(r, n, send_fd, recv_fd));
}

SocketRing::~SocketRing() {
  close_fd(send_fd_);
  close_fd(recv_fd_);
}

void SocketRing::allreduce_sum(float* buf, int64_t count, std::vector<float>& scratch,
                               size_t segment_bytes) {
  INT4DDP_CHECK(count >= 0, "socket ring all-reduce: negative count ", count);
  INT4DDP_CHECK(segment_bytes >= sizeof(float), "socket ring all-reduce: segment of ",
                segment_bytes, " bytes holds no float");
  const int n = size_;
  if (n == 1 || count == 0) return;
  const RingLayout g{count, n, rank_, static_cast<int64_t>(segment_bytes / sizeof(float))};
  const int steps = 2 * (n - 1);
  scratch.resize(static_cast<size_t>(std::min<int64_t>(g.seg, count)));

  // A position in one direction's stream: segment s of step k, `bytes` of it done.
  struct Cursor {
    int k = 0;
    int64_t s = 0;
    size_t bytes = 0;
  };
  Cursor snd, rcv;
  const auto send_segments = [&](int k) { return g.num_segments(g.send_chunk(k)); };
  const auto recv_segments = [&](int k) { return g.num_segments(g.recv_chunk(k)); };
  // Past the segments of empty chunks (counts below the rank count) and finished steps.
  const auto settle = [&](Cursor& c, auto segments) {
    while (c.k < steps && c.s >= segments(c.k)) ++c.k, c.s = 0;
  };
  // Whether segment s of step k has been received in full (and, in the reduce-scatter, added).
  const auto received = [&](int k, int64_t s) { return rcv.k > k || (rcv.k == k && rcv.s > s); };
  // The segment of step k + 1 is the one received in step k, plus this rank's addition.
  const auto sendable = [&] { return snd.k < steps && (snd.k == 0 || received(snd.k - 1, snd.s)); };

  settle(snd, send_segments);
  settle(rcv, recv_segments);
  while (snd.k < steps || rcv.k < steps) {
    pollfd fds[2];
    nfds_t nfds = 0;
    const bool want_send = sendable(), want_recv = rcv.k < steps;
    if (want_send) fds[nfds++] = pollfd{send_fd_, POLLOUT, 0};
    if (want_recv) fds[nfds++] = pollfd{recv_fd_, POLLIN, 0};
    INT4DDP_CHECK(nfds > 0, "socket ring all-reduce: rank ", rank_,
                  " has nothing to send or receive before the end (step ", snd.k, ")");
    const int ready = ::poll(fds, nfds, kTimeoutSeconds * 1000);
    if (ready < 0 && errno == EINTR) continue;
    INT4DDP_CHECK(ready >= 0, "socket ring all-reduce: poll failed: ", std::strerror(errno));
    INT4DDP_CHECK(ready > 0, "socket ring all-reduce: rank ", rank_, " waited ", kTimeoutSeconds,
                  " s for its neighbours (ranks ", g.mod(rank_ - 1), " and ", g.mod(rank_ + 1),
                  ")");
    // Write while the socket takes bytes and segments are ready.
    while (want_send && sendable()) {
      const int j = g.send_chunk(snd.k);
      const size_t total = sizeof(float) * static_cast<size_t>(g.seg_len(j, snd.s));
      const char* p = reinterpret_cast<const char*>(buf + g.seg_lo(j, snd.s)) + snd.bytes;
      const ssize_t w = ::send(send_fd_, p, total - snd.bytes, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (w < 0 && errno == EINTR) continue;
      INT4DDP_CHECK(w > 0, "socket ring all-reduce: rank ", rank_, " cannot send to rank ",
                    g.mod(rank_ + 1), ": ", std::strerror(errno));
      snd.bytes += static_cast<size_t>(w);
      if (snd.bytes == total) {
        snd.bytes = 0;
        ++snd.s;
        settle(snd, send_segments);
      }
    }
    // Read what has arrived.
    while (want_recv && rcv.k < steps) {
      const int j = g.recv_chunk(rcv.k);
      const int64_t len = g.seg_len(j, rcv.s);
      const size_t total = sizeof(float) * static_cast<size_t>(len);
      float* dst = scratch.data();
      const ssize_t got = ::recv(recv_fd_, reinterpret_cast<char*>(dst) + rcv.bytes,
                                 total - rcv.bytes, MSG_DONTWAIT);
      if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (got < 0 && errno == EINTR) continue;
      INT4DDP_CHECK(got > 0, "socket ring all-reduce: rank ", rank_, " lost rank ",
                    g.mod(rank_ - 1), got == 0 ? ": connection closed" : ": ",
                    got == 0 ? "" : std::strerror(errno));
      rcv.bytes += static_cast<size_t>(got);
      if (rcv.bytes < total) continue;
      float* out = buf + g.seg_lo(j, rcv.s);
      const float* in = scratch.data();
      if (rcv.k < n - 1) {  // reduce-scatter: add the partial sum that arrived
        for (int64_t i = 0; i < len; ++i) out[i] = out[i] + in[i];
      } else {
        // All-gather: the finished sum replaces the region this rank sent in step k + 1 - n, which
        // is written out by now (the previous rank's segment depends on it through the ring).
        INT4DDP_CHECK(snd.k > rcv.k + 1 - n || (snd.k == rcv.k + 1 - n && snd.s > rcv.s),
                      "socket ring all-reduce: all-gather data before its region was sent");
        std::memcpy(out, in, total);
      }
      rcv.bytes = 0;
      ++rcv.s;
      settle(rcv, recv_segments);
    }
  }
}

}  // namespace int4ddp::comm
