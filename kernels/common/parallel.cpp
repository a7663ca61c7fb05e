// parallel_for on a small persistent thread pool (see parallel.h).
//
// Why not OpenMP: libgomp's idle threads either spin for a long time after every parallel region
// (its default with no more threads than cores) or sleep at once (OMP_WAIT_POLICY=passive), and
// neither can be set from inside the program. On our shared 2-core machines the long spin made 2
// threads 3x SLOWER than 1 whenever another process wanted a core (the spinning thread and the one
// it waits for take turns on the CPUs), and sleeping at once pays a wake-up per region. The pool's
// workers spin for a bounded time (kSpinSeconds, longer than the serial gaps between a step's
// regions, far shorter than a scheduler slice) and then sleep on a condition variable.
#include "kernels/common/parallel.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/common/error.h"

namespace int4ddp {
namespace {

constexpr double kSpinSeconds = 100e-6;  // a worker's busy wait for the next job before it sleeps

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

thread_local int t_index = 0;        // this thread's slot in the running job
thread_local bool t_in_job = false;  // inside a parallel_for body (nested calls run inline)

// Runs each job on the calling thread (slot 0) and `workers` pool threads (slots 1..workers).
//
// Jobs alternate between two slots. A worker takes a reference on the slot of the generation it
// saw, then checks that the generation is still current (else it drops the reference unread); the
// caller reuses a slot only when no worker holds it, and returns when every item of its job is
// done. So the caller never waits for a worker that is asleep or descheduled without an item, and
// a late worker never reads a job that is being written.
class Pool {
 public:
  explicit Pool(int workers) {
    threads_.reserve(static_cast<size_t>(workers));
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this, w] { worker(w + 1); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  void run(int64_t count, const std::function<void(int64_t)>& body) {
    const uint64_t g = generation_.load() + 1;  // only this thread bumps it (under g_pool_mutex)
    Job& job = jobs_[g & 1];
    for (int spins = 0; job.refs.load() > 0; ++spins) relax(spins);
    job.body = &body;
    job.count = count;
    job.next.store(0);
    job.done.store(0);
    job.error = nullptr;
    job.error_item = count;
    generation_.store(g);  // publishes the job (seq_cst: ordered before the sleepers_ load)
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);  // a worker checks generation_ under this lock
      wake_.notify_all();
    }
    t_index = 0;
    work(job);
    for (int spins = 0; job.done.load() < count; ++spins) relax(spins);
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* body = nullptr;
    int64_t count = 0;
    std::atomic<int64_t> next{0};  // next item to claim
    std::atomic<int64_t> done{0};  // items finished
    std::atomic<int> refs{0};      // workers looking at this job
    std::mutex error_mutex;
    std::exception_ptr error;
    int64_t error_item = 0;
  };

  static void relax(int spins) {
    if (spins < 4096)
      cpu_relax();
    else
      std::this_thread::yield();
  }

  static void work(Job& job) {
    t_in_job = true;
    for (int64_t i; (i = job.next.fetch_add(1)) < job.count;) {
      try {
        (*job.body)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(job.error_mutex);
        if (i < job.error_item) {
          job.error_item = i;
          job.error = std::current_exception();
        }
      }
      job.done.fetch_add(1);
    }
    t_in_job = false;
  }

  void worker(int slot) {
    t_index = slot;
    uint64_t seen = 0;
    for (;;) {
      // Busy-wait a little for the next job (the next layer's loop usually follows at once).
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load() == seen; ++spins) {
        cpu_relax();
        if ((spins & 63) == 63 &&
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >
                kSpinSeconds)
          break;
      }
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      if (stop_.load()) return;
      const uint64_t g = generation_.load();
      Job& job = jobs_[g & 1];
      job.refs.fetch_add(1);
      if (generation_.load() == g) {
        work(job);
        seen = g;
      }
      job.refs.fetch_sub(1);
    }
  }

  std::vector<std::thread> threads_;
  Job jobs_[2];
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

std::atomic<int> g_threads{1};
std::mutex g_pool_mutex;  // one parallel_for at a time from outside the pool; guards g_pool
std::unique_ptr<Pool> g_pool;

}  // namespace

void set_num_threads(int threads) {
  INT4DDP_CHECK(threads >= 1, "thread count ", threads, " must be >= 1");
  g_threads.store(threads);
}

int num_threads() { return g_threads.load(); }

int thread_index() { return t_in_job ? t_index : 0; }

void parallel_for(int64_t count, const std::function<void(int64_t)>& body) {
  if (count <= 0) return;
  const int threads = num_threads();
  if (threads == 1 || count == 1 || t_in_job) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool || g_pool->size() != threads) {
    g_pool.reset();
    g_pool = std::make_unique<Pool>(threads - 1);
  }
  g_pool->run(count, body);
}

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

}  // namespace int4ddp
