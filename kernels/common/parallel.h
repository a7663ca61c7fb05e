// Thread-level parallelism of the trainer (train.threads): parallel_for over a FIXED set of work
// items on one persistent pool of num_threads() - 1 workers plus the calling thread, and nothing
// else threaded (the Eigen GEMMs always run on the calling thread).
//
// Invariant that keeps results independent of the thread count: callers split their work into items
// whose boundaries depend only on the problem (e.g. BatchParts of src/nn/layer.h),
// never on num_threads(); each item writes disjoint outputs, and a reduction keeps one partial per
// item and combines the partials in item order afterwards. Which thread runs which item, and in
// what order, is then invisible in the results.
#pragma once

#include <cstdint>
#include <functional>

namespace int4ddp {

// Threads of parallel_for (>= 1; 1 runs every item inline on the calling thread, in order).
void set_num_threads(int threads);
int num_threads();

// The calling thread's slot in the running parallel_for, 0..num_threads()-1 (0 outside one): an
// index into per-thread scratch buffers. Never use it to decide what an item computes.
int thread_index();

// Runs body(i) for every i in [0, count), spread over num_threads() threads (dynamically: on a
// shared machine a thread that gets less CPU takes fewer items). Returns when all are done; if
// bodies throw, rethrows the exception of the lowest item that threw. Nested calls run inline.
void parallel_for(int64_t count, const std::function<void(int64_t)>& body);

// Cores this process may run on (sched_getaffinity; hardware_concurrency as fallback), >= 1.
int available_cores();

}  // namespace int4ddp
