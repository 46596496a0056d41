// Shared by every part of the fused kernels: the normalization kinds, the inlining macro, the clock, a scoped
// OpenMP thread count, and the two smallest loops (see lstm.cpp for the design and for what each file holds).
#pragma once

#include <ATen/ATen.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdint>

namespace rbn {

using at::Tensor;

// How a term is normalized: recurrent_bn.norm.Kind, with the same numbers (bindings.cpp exports them as KINDS
// and the tests compare).
enum Kind : int64_t { kNone = 0, kLayer = 1, kBatch = 2, kShared = 3, kAffine = 4 };

#define RBN_INLINE inline __attribute__((always_inline))

inline double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// For the scope's lifetime, the calling thread's parallel regions (ATen's loops among them) have `threads`
// threads. One thread for setup and copies whose numbers do not depend on the split: spread over a team while
// another process holds a core, each of them waits for a thread that is not running, for up to a time slice.
struct OmpThreads {
  int before;
  explicit OmpThreads(int64_t threads) : before(omp_get_max_threads()) {
    omp_set_num_threads(static_cast<int>(threads > 1 ? threads : 1));
  }
  ~OmpThreads() { omp_set_num_threads(before); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;
};

RBN_INLINE bool is_active(const bool* mask, int64_t b) { return mask[b]; }

template <typename T>
RBN_INLINE void fill(T* x, int64_t n, T value) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) x[k] = value;
}

}  // namespace rbn
