// Direct 3x3 convolution, stride 1, pad 1, on NCHW fp32 tensors: no im2col, no GEMM packing.
//
//   forward          y  (n, k, h, w) (=, or +=) scale * conv(x (n, c, h, w), W (k, c, 3, 3))
//   backward_data    dx (n, c, h, w) (=, or +=) scale * conv(dy (n, k, h, w), W^T flipped)
//                    (the adjoint of forward: dx[c,i,j] = sum_{o,ky,kx} W[o,c,ky,kx]
//                     dy[o, i+1-ky, j+1-kx])
//   backward_weight  dW (k, c, 3, 3) (=, or +=) scale * sum over the chunk's samples of
//                    sum_{i,j} dy[o,i,j] x[c, i+ky-1, j+kx-1]
//   *_ref            plain loops (double accumulation; int64 for codes): the definitions.
//
// Every function handles one chunk of samples and is single-threaded and reentrant: a caller
// threads over sample chunks, each thread with its own Conv3x3Workspace, and sums dW partials in a
// fixed order (Conv3x3WeightGrad: one per thread, add per chunk, finish in thread order). Weights
// are repacked once per weight update into a Conv3x3Weights (read-only afterwards, shared).
// Scratch: a Conv3x3Workspace per thread, grown on demand and reused (one sample's padded planes
// and transpose, under 200 KB for the resnet20 shapes; the AVX2 dW adds a group of samples' padded
// planes of x and dy, about 256 KB); nullptr uses a thread_local one.
//
// Integer codes (the quantized layers, DESIGN.md section 3): with Conv3x3Codes set, the operands
// hold integers stored as floats, |a| <= qmax_a and |b| <= qmax_b (qmax <= 255, so an unsigned
// 8-bit activation grid fits). The result is then EXACT: out = scale * float(T) (and out + that for
// +=), T the exact integer sum, rounded to float once, the same formula as math::int_gemm_ref. An
// fp32 FMA chain on integers is exact while every partial sum stays below 2^24; the kernels
// guarantee it by splitting every reduction into pieces of at most floor((2^24 - 1) / (qmax_a *
// qmax_b)) terms and adding the pieces (exact integers) in int64 or double:
//   forward / backward_data: 9 * channels terms per output (576 at 64 channels). One piece while
//     9 * channels * qmax_a * qmax_b < 2^24: always for 4-bit codes (576 * 15 * 7 = 60480), and for
//     8-bit signed ones (576 * 127 * 127 = 9.3e6); unsigned 8-bit activations against 8-bit weights
//     (576 * 255 * 127 = 1.87e7) are split into channel pieces.
//   backward_weight: n * h * w terms per weight (784 per 28x28 sample: 8-bit codes exceed 2^24
//     within ONE sample, 784 * 255 * 127 = 2.5e7; 4-bit ones, 784 * 15 * 7 = 82320 per sample,
//     after about 200 samples). The sum is formed per sample in pieces of whole image rows, at
//     most floor(bound / w) rows (18 at 28x28 for 8-bit, the whole image for 4-bit), each exact
//     in fp32, and the pieces are accumulated in double (exact below 2^53). finish_exact hands
//     the exact integer totals out, for a caller that sums chunks and rescales once.
//
// Instruction sets: an AVX-512F path (conv3x3_avx512.cpp, compiled with -mavx512f for that file
// only), an AVX2 + FMA path (conv3x3_avx2.cpp, -mavx2 -mfma) and a portable path (plain C++); the
// vector paths run after a run-time CPU check. Conv3x3Isa::kAuto picks the widest available one
// that the environment allows: INT4DDP_ISA (the codec's override) = avx2 rules AVX-512 out,
// = portable both vector paths. All give exact results on codes; on fp32 they differ only by float
// rounding (the vector paths use FMAs, each its own summation order). The portable path is a
// correct fallback, not a fast one (slower than im2col + Eigen): callers should keep their GEMM
// path when conv3x3_resolve(Conv3x3Isa::kAuto) is kPortable. experiments/bench_conv times them.
#pragma once

#include <cstdint>
#include <vector>

namespace int4ddp::math {

namespace detail {
struct Conv3x3Kernels;
struct Conv3x3Plane;
}  // namespace detail

enum class Conv3x3Isa : uint8_t { kAuto = 0, kPortable = 1, kAvx512 = 2, kAvx2 = 3 };

// How forward / backward_data lay out a tile (AVX-512; the AVX2 and portable paths are always
// kSpatial):
//   kSpatial   16 consecutive flat output positions per vector (row stride w + 1, so one junk lane
//              per image row and a partial last vector: 96% of the lanes useful at 28x28, 88% at
//              14x14, 77% at 7x7);
//   kChannels  16 output channels per vector, a segment of one image row per tile, every lane
//              useful; needs a multiple of 16 output channels; scattered stores.
//   kAuto      kChannels where kSpatial would leave more than 15% of its lanes idle (7x7) and there
//              are >= 32 output channels, else kSpatial (the faster one of the two in
//              experiments/bench_conv at each size).
enum class Conv3x3Algo : uint8_t { kAuto = 0, kSpatial = 1, kChannels = 2 };

const char* conv3x3_isa_name(Conv3x3Isa isa);
bool conv3x3_isa_available(Conv3x3Isa isa);  // compiled in and supported by this CPU (kAuto: true)
Conv3x3Isa conv3x3_resolve(Conv3x3Isa isa);  // kAuto -> what it runs; others checked, returned

struct Conv3x3Shape {
  int64_t n = 0;  // samples in the chunk
  int64_t c = 0;  // input channels
  int64_t k = 0;  // output channels
  int64_t h = 0;  // image height (input and output)
  int64_t w = 0;  // image width (input and output)
};

// Integer-code operands: {0, 0} = plain fp32. For forward, a = x and b = W; for backward_data,
// a = dy and b = W; for backward_weight, a = x and b = dy.
struct Conv3x3Codes {
  int qmax_a = 0;
  int qmax_b = 0;
  bool enabled() const { return qmax_a > 0 || qmax_b > 0; }
};

// W (k, c, 3, 3) repacked for the kernels: the forward layout (output-channel blocks) and the
// backward-data layout (transposed, taps flipped). Pack once per weight update, read by any number
// of threads.
class Conv3x3Weights {
 public:
  Conv3x3Weights() = default;
  Conv3x3Weights(const float* w, int64_t k, int64_t c) { pack(w, k, c); }
  void pack(const float* w, int64_t k, int64_t c);
  int64_t k() const { return k_; }
  int64_t c() const { return c_; }
  // Internal layouts (conv3x3.cpp): blocks of kBlock output channels, block b at b * kBlock * c * 9
  // holding [c][tap][j < min(kBlock, k - b * kBlock)].
  static constexpr int kBlock = 8;
  const float* forward_packed() const { return fwd_.data(); }     // (k, c, 9) blocked
  const float* backward_packed() const { return bwd_.data(); }    // (c, k, 9) blocked, flipped
  const float* forward_lanes() const { return fwd_cl_.data(); }   // (c, 9, k)
  const float* backward_lanes() const { return bwd_cl_.data(); }  // (k, 9, c), flipped
  const float* plain() const { return plain_.data(); }            // (k, c, 3, 3) as given

 private:
  int64_t k_ = 0, c_ = 0;
  std::vector<float> fwd_, bwd_, fwd_cl_, bwd_cl_, plain_;
};

// Per-thread scratch (padded planes, transposes, accumulators), grown on demand and reused: keep
// one per thread for the lifetime of the layer. Never shared by two concurrent calls.
class Conv3x3Workspace {
 public:
  Conv3x3Workspace();
  ~Conv3x3Workspace();
  Conv3x3Workspace(const Conv3x3Workspace&) = delete;
  Conv3x3Workspace& operator=(const Conv3x3Workspace&) = delete;
  struct Buffers;  // conv3x3.cpp
  Buffers& buffers() { return *b_; }
  int64_t bytes() const;  // currently allocated

 private:
  Buffers* b_;
};

// The options every product takes. accumulate: out += result (out's previous contents are read);
// otherwise out = result and out's contents are never read.
struct Conv3x3Options {
  float scale = 1.0f;
  bool accumulate = false;
  Conv3x3Codes codes;
  Conv3x3Isa isa = Conv3x3Isa::kAuto;
  Conv3x3Algo algo = Conv3x3Algo::kAuto;  // forward / backward_data tiling (results agree)
};

// dW summed over any number of sample chunks in the kernels' own layout and written out once:
// reset, add per chunk, finish. A caller threading over samples keeps one per thread and sums the
// finished partials in a fixed order; calling add per sample costs no more than one call per chunk
// (the layout change and rescale happen once, in finish). add is single-threaded.
class Conv3x3WeightGrad {
 public:
  // Starts an empty sum for W (k, c, 3, 3). codes: integer-code operands (a = x, b = dy).
  void reset(int64_t k, int64_t c, const Conv3x3Codes& codes = {},
             Conv3x3Isa isa = Conv3x3Isa::kAuto);
  // += the chunk's sum over its samples: x (s.n, c, h, w), dy (s.n, k, h, w); s.k, s.c as reset.
  void add(const Conv3x3Shape& s, const float* x, const float* dy, Conv3x3Workspace* ws = nullptr);
  // dw (k, c, 3, 3) (=, or += when accumulate) scale * the sum. Codes: scale * float(T) exactly.
  void finish(float scale, bool accumulate, float* dw) const;
  // Codes only: dw_sum (k, c, 3, 3) += the exact integer totals T (doubles, exact below 2^53).
  void finish_exact(double* dw_sum) const;

 private:
  template <typename Acc>
  void add_to(const Conv3x3Shape& s, const float* x, const float* dy, Conv3x3Workspace* ws,
              Acc* acc);
  template <typename Acc>
  void add_planes(const detail::Conv3x3Kernels& kern, const detail::Conv3x3Plane& g,
                  const Conv3x3Shape& s, const float* x, const float* dy,
                  Conv3x3Workspace::Buffers& b, Acc* acc);
  int64_t k_ = 0, c_ = 0;
  Conv3x3Codes codes_;
  Conv3x3Isa isa_ = Conv3x3Isa::kPortable;  // resolved
  bool k_lanes_ = false;                    // layout (c, 9, k) instead of (k, 9, c)
  // The sums, 64-byte aligned inside the vectors (the kernels update them a cache line at a time).
  float* accf() { return align64(accf_.data()); }
  const float* accf() const { return align64(accf_.data()); }
  double* accd() { return align64(accd_.data()); }
  const double* accd() const { return align64(accd_.data()); }
  template <typename T>
  static T* align64(T* p) {
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
  }
  std::vector<float> accf_;   // fp32 sums (+ 16 floats of alignment slack)
  std::vector<double> accd_;  // exact integer sums, codes (+ 8 doubles of slack)
};

// ws == nullptr uses a thread_local workspace.
void conv3x3_forward(const Conv3x3Shape& s, const float* x, const Conv3x3Weights& w, float* y,
                     const Conv3x3Options& opt = {}, Conv3x3Workspace* ws = nullptr);
void conv3x3_backward_data(const Conv3x3Shape& s, const float* dy, const Conv3x3Weights& w,
                           float* dx, const Conv3x3Options& opt = {},
                           Conv3x3Workspace* ws = nullptr);
// dW (k, c, 3, 3) from x (n, c, h, w) and dy (n, k, h, w): Conv3x3WeightGrad reset + add + finish.
void conv3x3_backward_weight(const Conv3x3Shape& s, const float* x, const float* dy, float* dw,
                             const Conv3x3Options& opt = {}, Conv3x3Workspace* ws = nullptr);
// Codes only: dw_sum (k, c, 3, 3) += the exact integer sums (as doubles, exact below 2^53), for a
// caller that adds chunk partials and rescales once. opt.scale and opt.accumulate are ignored.
void conv3x3_backward_weight_exact(const Conv3x3Shape& s, const float* x, const float* dy,
                                   double* dw_sum, const Conv3x3Options& opt,
                                   Conv3x3Workspace* ws = nullptr);

// Definitions. fp32: double accumulation, out = scale * float(sum) (+ out). Codes (codes.enabled):
// int64 accumulation, out = scale * float(T) (+ out) exactly as documented above.
void conv3x3_forward_ref(const Conv3x3Shape& s, const float* x, const float* w, float* y,
                         const Conv3x3Options& opt = {});
void conv3x3_backward_data_ref(const Conv3x3Shape& s, const float* dy, const float* w, float* dx,
                               const Conv3x3Options& opt = {});
void conv3x3_backward_weight_ref(const Conv3x3Shape& s, const float* x, const float* dy, float* dw,
                                 const Conv3x3Options& opt = {});

// Largest number of terms an exact fp32 sum of code products may have (see above).
int64_t conv3x3_exact_terms(const Conv3x3Codes& codes);

}  // namespace int4ddp::math
