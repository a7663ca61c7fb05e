// Thread-count independence (kernels/common/parallel.h, src/nn/layer.h): parallel_for itself, and
// whole training steps of small models whose logits, losses, gradients (including the quantizer
// steps' gradients and BatchNorm running statistics) and updated weights must be bit-identical with
// 1, 2 and 3 threads. The batch (20) is not a multiple of the part size, so the last part is short;
// resnet20 covers the stride-1 (transposed) and stride-2 (col2im) convolution paths, the option-A
// shortcut and BatchNorm1d; the quantized models cover the integer GEMMs, the activation
// quantizer's u_A gradient and the stochastic gradient quantizer.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/common/parallel.h"
#include "src/nn/layer.h"
#include "src/nn/model.h"
#include "src/train/optim.h"

namespace int4ddp {
namespace {

// Restores the thread count a test changed.
struct ThreadsGuard {
  int saved = num_threads();
  ~ThreadsGuard() { set_num_threads(saved); }
};

TEST(ParallelFor, RunsEveryItemOnceOnAtMostTheThreadsAsked) {
  ThreadsGuard guard;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    std::vector<std::atomic<int>> hits(37);
    std::vector<std::atomic<int>> slot_used(8);
    parallel_for(37, [&](int64_t i) {
      hits[static_cast<size_t>(i)]++;
      const int t = thread_index();
      ASSERT_GE(t, 0);
      ASSERT_LT(t, threads);
      slot_used[static_cast<size_t>(t)]++;
    });
    for (auto& h : hits) EXPECT_EQ(h.load(), 1);
  }
  EXPECT_EQ(thread_index(), 0);  // outside a parallel_for
  EXPECT_THROW(set_num_threads(0), Error);
}

TEST(ParallelFor, RethrowsTheLowestFailingItem) {
  ThreadsGuard guard;
  for (int threads : {1, 3}) {
    set_num_threads(threads);
    try {
      parallel_for(16, [](int64_t i) {
        if (i == 5 || i == 11) throw std::runtime_error("item " + std::to_string(i));
      });
      FAIL() << "no exception";
    } catch (const std::runtime_error& e) {
      EXPECT_STREQ(e.what(), "item 5");
    }
  }
}

TEST(ParallelFor, NestedCallsRunInline) {
  ThreadsGuard guard;
  set_num_threads(2);
  std::atomic<int> total{0};
  parallel_for(4, [&](int64_t) { parallel_for(5, [&](int64_t) { total++; }); });
  EXPECT_EQ(total.load(), 20);
}

// Everything a few training steps produce, as raw floats.
struct Trace {
  std::vector<float> floats;
  void add(const float* p, int64_t n) { floats.insert(floats.end(), p, p + n); }
};

Trace train_steps(const std::string& name, bool quantized, int threads) {
  set_num_threads(threads);
  nn::ModelSpec spec;
  spec.name = name;
  spec.quantized = quantized;
  spec.height = spec.width = 12;
  spec.mlp_hidden = {40, 24};
  nn::Model model(spec, 7);
  model.quant_context().seed = 3;
  train::Optimizer opt(train::OptimConfig{}, model.params(), model.values(), model.grads(),
                       model.num_params());
  const int64_t batch = 20;
  Tensor x({batch, 1, 12, 12}), logits, dlogits;
  std::vector<int32_t> labels(batch);
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Trace t;
  for (int step = 0; step < 3; ++step) {
    for (int64_t i = 0; i < x.numel(); ++i) x[i] = normal(rng);
    for (auto& l : labels) l = static_cast<int32_t>(rng() % 10);
    model.quant_context().step = static_cast<uint32_t>(step);
    model.zero_grad();
    model.forward(x, logits, true);
    const float loss = nn::softmax_cross_entropy(logits, labels.data(), &dlogits, nullptr);
    model.backward(dlogits);
    t.add(logits.data(), logits.numel());
    t.add(&loss, 1);
    t.add(model.grads(), model.num_params());
    opt.step(0.05);
    model.commit_quant_step(true);
    t.add(model.values(), model.num_params());
    for (std::vector<float>* b : model.buffers()) t.add(b->data(), static_cast<int64_t>(b->size()));
    for (nn::QuantizedOp* q : model.quantized_ops()) {
      const float gamma = q->grad_state().policy->gamma();
      t.add(&gamma, 1);
    }
  }
  // Evaluation forward (running statistics) too.
  model.forward(x, logits, false);
  t.add(logits.data(), logits.numel());
  return t;
}

void expect_bit_identical(const std::string& name, bool quantized) {
  ThreadsGuard guard;
  const Trace one = train_steps(name, quantized, 1);
  ASSERT_GT(one.floats.size(), 0u);
  for (int threads : {2, 3}) {
    const Trace other = train_steps(name, quantized, threads);
    ASSERT_EQ(one.floats.size(), other.floats.size());
    size_t differing = 0, first = 0;
    for (size_t i = 0; i < one.floats.size(); ++i)
      if (std::memcmp(&one.floats[i], &other.floats[i], sizeof(float)) != 0 && differing++ == 0)
        first = i;
    EXPECT_EQ(differing, 0u) << name << (quantized ? " 4/4/4" : " fp32") << " with " << threads
                             << " threads: " << differing << " of " << one.floats.size()
                             << " floats differ from 1 thread, first at " << first << " ("
                             << one.floats[first] << " vs " << other.floats[first] << ")";
  }
}

TEST(ThreadCount, Resnet20Fp32StepsAreBitIdentical) { expect_bit_identical("resnet20", false); }
TEST(ThreadCount, Resnet20QuantizedStepsAreBitIdentical) { expect_bit_identical("resnet20", true); }
TEST(ThreadCount, CnnFp32StepsAreBitIdentical) { expect_bit_identical("cnn", false); }
TEST(ThreadCount, CnnQuantizedStepsAreBitIdentical) { expect_bit_identical("cnn", true); }
TEST(ThreadCount, MlpQuantizedStepsAreBitIdentical) { expect_bit_identical("mlp", true); }
// resnet18 adds the projection shortcuts (1x1 stride-2 convolutions, their BatchNorms, the add).
TEST(ThreadCount, Resnet18QuantizedStepsAreBitIdentical) { expect_bit_identical("resnet18", true); }

}  // namespace
}  // namespace int4ddp
