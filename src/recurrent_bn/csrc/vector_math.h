// Elementwise math (float32 polynomials that vectorize, float64 from the C library) and the register-blocked
// per-timestep matrix product for AVX-512.
#pragma once

#include <algorithm>

#include "common.h"

namespace rbn {

// Elementwise math. float32: Cephes-style polynomials (about 1-2 ulp), written without branches so that loops over
// them vectorize. float64: the C library.

RBN_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // x = n ln2 + r with |r| <= ln2 / 2; round-to-nearest by the 1.5 * 2^23 trick.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

RBN_INLINE float tanh_approx(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = a + a * z * p;
  const float large = 1.0f - 2.0f / (exp_approx(2.0f * a) + 1.0f);
  const float r = a < 0.625f ? small : large;
  return x < 0.0f ? -r : r;
}

template <typename T>
struct Math;

template <>
struct Math<float> {
  static RBN_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
  static RBN_INLINE float tanh(float x) { return tanh_approx(x); }
  static RBN_INLINE float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
};

template <>
struct Math<double> {
  static RBN_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static RBN_INLINE double tanh(double x) { return std::tanh(x); }
  static RBN_INLINE double rsqrt(double x) { return 1.0 / std::sqrt(x); }
};

// The per-timestep matrix product C = A B^T (A: a thread's rows of h_{t-1} or of dR_t; B: W_h or W_h^T), float32 on
// AVX-512. oneDNN computes it well, but each call costs several microseconds of set-up, as much as the product
// itself at hidden size 100. This register-blocked kernel (8 rows x 32 columns of C in 16 zmm accumulators, B packed
// once per call into panels of 32 columns) has no set-up, and runs near the core's peak at these sizes (about 9 us
// for 64 x 100 x 400 on two cores, against 16 us through oneDNN). Other instruction sets use oneDNN.

constexpr int64_t kPanel = 32;  // columns of C per panel: two 16-float vectors
typedef float v16f __attribute__((vector_size(64), aligned(4)));

template <int MR>
RBN_INLINE void gemm_block(const float* A, int64_t lda, const float* panel, int64_t K, float* C, int64_t ldc) {
  v16f lo[MR], hi[MR];
  for (int i = 0; i < MR; ++i) {
    lo[i] = v16f{};
    hi[i] = v16f{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const v16f b0 = *reinterpret_cast<const v16f*>(panel + k * kPanel);
    const v16f b1 = *reinterpret_cast<const v16f*>(panel + k * kPanel + 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * lda + k];
      lo[i] += a * b0;
      hi[i] += a * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    *reinterpret_cast<v16f*>(C + i * ldc) = lo[i];
    *reinterpret_cast<v16f*>(C + i * ldc + 16) = hi[i];
  }
}

// C (M, panels * 32), row stride ldc, from A (M, K) with row stride lda and B packed by pack_panels.
RBN_INLINE void gemm_panels(const float* A, int64_t lda, int64_t M, const float* packed, int64_t K, int64_t panels,
                            float* C, int64_t ldc) {
  for (int64_t q = 0; q < panels; ++q) {
    const float* panel = packed + q * K * kPanel;
    float* c = C + q * kPanel;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) gemm_block<8>(A + m * lda, lda, panel, K, c + m * ldc, ldc);
    const float* a = A + m * lda;
    c += m * ldc;
    switch (M - m) {
      case 7: gemm_block<7>(a, lda, panel, K, c, ldc); break;
      case 6: gemm_block<6>(a, lda, panel, K, c, ldc); break;
      case 5: gemm_block<5>(a, lda, panel, K, c, ldc); break;
      case 4: gemm_block<4>(a, lda, panel, K, c, ldc); break;
      case 3: gemm_block<3>(a, lda, panel, K, c, ldc); break;
      case 2: gemm_block<2>(a, lda, panel, K, c, ldc); break;
      case 1: gemm_block<1>(a, lda, panel, K, c, ldc); break;
      default: break;
    }
  }
}

// B (N, K) row-major into panels of 32 rows of B, k-major inside a panel, zero-padded: (ceil(N / 32), K, 32).
inline Tensor pack_panels(const Tensor& B) {
  const int64_t N = B.size(0), K = B.size(1), panels = (N + kPanel - 1) / kPanel;
  const OmpThreads one(1);  // tens of thousands of elements: not worth a team
  Tensor packed = at::zeros({panels, K, kPanel}, B.options());
  const Tensor source = B.contiguous();
  const float* b = source.data_ptr<float>();
  float* d = packed.data_ptr<float>();
  for (int64_t q = 0; q < panels; ++q) {
    const int64_t width = std::min(kPanel, N - q * kPanel);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < width; ++j) d[(q * K + k) * kPanel + j] = b[(q * kPanel + j) * K + k];
  }
  return packed;
}

}  // namespace rbn
