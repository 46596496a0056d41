// Shared by every part of the fused kernels: the normalization kinds, the inlining macro, the clock, and the two
// smallest loops (see lstm.cpp for the design and for what each file holds).
#pragma once

#include <ATen/ATen.h>

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

RBN_INLINE bool is_active(const bool* mask, int64_t b) { return mask[b]; }

template <typename T>
RBN_INLINE void fill(T* x, int64_t n, T value) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) x[k] = value;
}

}  // namespace rbn
