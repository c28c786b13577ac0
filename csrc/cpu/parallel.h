// Thread-count policy for the CPU kernels: all cores for large inputs, one
// thread for small ones (an OpenMP fork/join costs more than a small op).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace recserve::cpu {

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Cap the threads of kernels called from the calling thread (OpenMP's per-thread
// nthreads ICV; other threads keep theirs). The server's model loader uses 1 so that
// verifying a new version leaves the serving threads the cores.
inline void set_calling_thread_limit(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(std::max(n, 1));
#else
  (void)n;
#endif
}

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads for `work` units when each thread should get at least `min_per_thread`.
inline int threads_for(int64_t work, int64_t min_per_thread) {
  const int64_t t = work / std::max<int64_t>(min_per_thread, 1);
  return int(std::clamp<int64_t>(t, 1, max_threads()));
}

// Smallest position at which some thread found a bad value (-1 if none), so the
// reported error does not depend on thread scheduling.
class FirstError {
 public:
  void record(int64_t pos) {
    int64_t cur = pos_.load(std::memory_order_relaxed);
    while ((cur < 0 || pos < cur) && !pos_.compare_exchange_weak(cur, pos)) {
    }
  }
  int64_t get() const { return pos_.load(); }
  bool any() const { return pos_.load(std::memory_order_relaxed) >= 0; }

 private:
  std::atomic<int64_t> pos_{-1};
};

}  // namespace recserve::cpu
