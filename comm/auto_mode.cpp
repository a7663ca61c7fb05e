// comm.mode auto: the start-up measurement and the per-bucket decision (see auto_mode.h).
#include "comm/auto_mode.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "comm/two_shot.h"
#include "kernels/common/clock.h"
#include "kernels/common/error.h"
#include "kernels/quant/codec.h"
#include "kernels/quant/format.h"

namespace int4ddp::comm {
namespace {

void check_rate(double v, const char* what, bool may_be_zero) {
  INT4DDP_CHECK(std::isfinite(v) && (v > 0 || (may_be_zero && v == 0)), "comm.mode auto: measured ",
                what, " = ", v, " is not ",
                may_be_zero ? "finite and >= 0" : "positive and finite");
}

// The largest of every rank's v, on every rank.
double max_over_ranks(Communicator& comm, double v) {
  std::vector<double> all(static_cast<size_t>(comm.size()));
  comm.allgatherv(&v, sizeof v, all.data(),
                  ByteLayout::packed(std::vector<size_t>(all.size(), sizeof v)));
  return *std::max_element(all.begin(), all.end());
}

// Every rank's m, reduced to the slowest figures (lowest rates, highest latency) on every rank.
MeasuredBandwidth slowest_over_ranks(Communicator& comm, const MeasuredBandwidth& m) {
  const double mine[4] = {-m.link_bytes_per_s, m.hop_latency_s, -m.encode_floats_per_s,
                          -m.decode_floats_per_s};
  std::vector<double> all(4 * static_cast<size_t>(comm.size()));
  comm.allgatherv(
      mine, sizeof mine, all.data(),
      ByteLayout::packed(std::vector<size_t>(static_cast<size_t>(comm.size()), sizeof mine)));
  double worst[4] = {mine[0], mine[1], mine[2], mine[3]};
  for (size_t i = 0; i < all.size(); ++i) worst[i % 4] = std::max(worst[i % 4], all[i]);
  return MeasuredBandwidth{-worst[0], worst[1], -worst[2], -worst[3]};
}

}  // namespace

ModeChoice choose_bucket_mode(const MeasuredBandwidth& m, int64_t count, int ranks,
                              int64_t block_size, int bits) {
  INT4DDP_CHECK(ranks >= 1, "comm.mode auto: ", ranks, " ranks");
  INT4DDP_CHECK(count >= 0, "comm.mode auto: bucket of ", count, " floats");
  INT4DDP_CHECK(bits >= 2 && bits <= 8, "comm.mode auto: bits ", bits, " not in 2..8");
  INT4DDP_CHECK(block_size > 0, "comm.mode auto: block size ", block_size);
  ModeChoice c;
  c.bits = kFp32Bits;
  char buf[256];
  if (ranks == 1) {
    c.reason = "fp32: one rank, nothing to send";
    return c;
  }
  check_rate(m.link_bytes_per_s, "link bandwidth", false);
  check_rate(m.hop_latency_s, "hop latency", true);
  check_rate(m.encode_floats_per_s, "encode rate", false);
  check_rate(m.decode_floats_per_s, "decode rate", false);
  const double n = static_cast<double>(count), N = ranks;
  const double hops = 2.0 * (N - 1) * m.hop_latency_s;
  c.fp32_seconds =
      hops + modelled_wire_bytes(kFp32Bits, count, block_size, ranks) / m.link_bytes_per_s;
  c.int_seconds = hops + modelled_wire_bytes(bits, count, block_size, ranks) / m.link_bytes_per_s +
                  (1.0 + 1.0 / N) * n / m.encode_floats_per_s + 2.0 * n / m.decode_floats_per_s;
  if (c.int_seconds < c.fp32_seconds) c.bits = bits;
  std::snprintf(buf, sizeof buf,
                "%s: modelled int%d %.3g ms vs fp32 %.3g ms for %lld floats (link %.3g MB/s, hop "
                "%.3g us, encode %.3g and decode %.3g Gfloat/s)",
                c.bits == kFp32Bits ? "fp32" : ("int" + std::to_string(bits)).c_str(), bits,
                1e3 * c.int_seconds, 1e3 * c.fp32_seconds, static_cast<long long>(count),
                m.link_bytes_per_s / 1e6, 1e6 * m.hop_latency_s, m.encode_floats_per_s / 1e9,
                m.decode_floats_per_s / 1e9);
  c.reason = buf;
  return c;
}

MeasuredBandwidth measure_bandwidth(Communicator& comm, int64_t probe_floats, int bits,
                                    int64_t block_size) {
  INT4DDP_CHECK(probe_floats > 0, "comm.mode auto: probe of ", probe_floats, " floats");
  INT4DDP_CHECK(!comm.device_buffers(), "comm.mode auto: the probe needs host buffers (mpi)");
  std::vector<float> x(static_cast<size_t>(probe_floats));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i % 255) - 127);
  MeasuredBandwidth m;
  if (comm.size() > 1) {
    std::vector<float> work = x;
    comm.allreduce_sum(work.data(), probe_floats);  // warm-up: connections, buffers
    comm.barrier();
    const uint64_t bytes0 = comm.bytes_sent();
    auto t = Clock::now();
    comm.allreduce_sum(work.data(), probe_floats);
    const double big = max_over_ranks(comm, seconds_since(t));
    const double bytes = max_over_ranks(comm, static_cast<double>(comm.bytes_sent() - bytes0));
    float one = 1.0f;
    comm.barrier();
    t = Clock::now();
    comm.allreduce_sum(&one, 1);
    const double tiny = max_over_ranks(comm, seconds_since(t));
    m.hop_latency_s = tiny / (2.0 * (comm.size() - 1));
    m.link_bytes_per_s = bytes / std::max(big - 2.0 * (comm.size() - 1) * m.hop_latency_s, 1e-9);
  }
  quant::QuantParams p;
  p.bits = bits;
  p.rounding = quant::Rounding::kStochastic;
  p.block_size = block_size;
  quant::validate(p);
  std::vector<uint8_t> codes(static_cast<size_t>(quant::packed_bytes(bits, probe_floats)));
  std::vector<float> scales(static_cast<size_t>(quant::num_scales(probe_floats, block_size)));
  auto t = Clock::now();
  quant::quantize(x.data(), probe_floats, p, codes.data(), scales.data());
  const double enc = max_over_ranks(comm, seconds_since(t));
  t = Clock::now();
  quant::dequantize(codes.data(), scales.data(), probe_floats, bits, block_size, x.data());
  const double dec = max_over_ranks(comm, seconds_since(t));
  m.encode_floats_per_s = static_cast<double>(probe_floats) / std::max(enc, 1e-9);
  m.decode_floats_per_s = static_cast<double>(probe_floats) / std::max(dec, 1e-9);
  return m;
}

LevelBandwidth measure_levels(Hierarchy& h, int64_t probe_floats, int bits, int64_t block_size) {
  LevelBandwidth m;
  m.world_ranks = h.world().size();
  if (!h.active()) {
    m.flat = measure_bandwidth(h.world(), probe_floats, bits, block_size);
    return m;
  }
  m.hierarchical = true;
  m.nodes = h.nodes();
  m.ranks_per_node = h.ranks_per_node();
  m.node =
      slowest_over_ranks(h.world(), measure_bandwidth(h.node(), probe_floats, bits, block_size));
  h.world().barrier();  // the cross-level probes start together: they share each node's link
  m.cross =
      slowest_over_ranks(h.world(), measure_bandwidth(h.cross(), probe_floats, bits, block_size));
  return m;
}

ModeChoice choose_level_mode(const LevelBandwidth& m, int64_t count, int64_t block_size, int bits) {
  if (!m.hierarchical) return choose_bucket_mode(m.flat, count, m.world_ranks, block_size, bits);
  INT4DDP_CHECK(m.ranks_per_node >= 1 && m.nodes >= 1, "comm.mode auto: a hierarchy of ", m.nodes,
                " nodes x ", m.ranks_per_node, " ranks");
  INT4DDP_CHECK(count >= 0 && block_size > 0, "comm.mode auto: bucket of ", count,
                " floats, block size ", block_size);
  const int64_t share = chunk_range(count, block_size, m.ranks_per_node, 0).count();
  ModeChoice c = choose_bucket_mode(m.cross, share, m.nodes, block_size, bits);
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "node level fp32 (the hierarchy's; %d ranks per node, link %.3g MB/s); cross "
                "level (%d nodes, share of %lld floats) ",
                m.ranks_per_node, m.node.link_bytes_per_s / 1e6, m.nodes,
                static_cast<long long>(share));
  c.reason = buf + c.reason;
  return c;
}

}  // namespace int4ddp::comm
