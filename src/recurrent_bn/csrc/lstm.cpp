// Fused CPU kernels for one layer of a normalized LSTM (Cooijmans et al. 2016, eqs. 6-8), forward and backward
// through time. Loaded by recurrent_bn/fused.py with torch.utils.cpp_extension; the plain-PyTorch loops in
// recurrence.py define what these kernels compute, and tests/test_fused.py holds them to it.
//
// Why a compiled loop: at the paper's sizes one timestep is a small matrix product plus a few hundred thousand
// elementwise operations. In PyTorch each of those is a kernel launch (about 170 per timestep for a BN-LSTM with
// its backward); here a timestep is one matrix product and a few passes over the gates, per thread.
//
// Design:
//   - The input projection P = W_x x of every timestep is one large matrix product before the loop (oneDNN), as
//     are its gradients after the backward loop. Its normalization (batch norm with per-timestep or shared
//     statistics, layer norm, or the population affine map in evaluation) and the bias are applied inside the loop,
//     in the same pass as the gates.
//   - One OpenMP team runs the whole sequence, each thread owning a block of examples (rows): it multiplies its
//     rows of h_{t-1} by W_h and updates their gates and cells. Rows are independent except through batch
//     statistics: for those each thread computes the mean and squared deviations of its own rows and the team
//     combines them at one barrier per normalized group and timestep. Without batch statistics (plain, layer
//     norm, evaluation) the threads never wait for each other. Splitting rows rather than hidden units keeps
//     every thread on its own cache lines (a split by units was 2x slower from false sharing).
//   - The per-step matrix products run on the calling thread inside the team: oneDNN for float32, with W_h in
//     oneDNN's blocked layout (on this AMD CPU oneDNN runs these shapes about twice as fast as MKL), ATen's mm for
//     float64.
//   - The backward pass uses only what the forward stored (gate activations, the normalized recurrent term, the
//     normalized cell and its tanh, all states), walks back through time with the same split, and computes
//     dW_h = sum_t dR_t^T h_{t-1} as one large matrix product after the loop.
//   - float32 elementwise work uses polynomial exp / tanh that the compiler vectorizes; the kernels are compiled
//     for AVX-512, AVX2 and baseline x86-64 and chosen at run time, so the binary does not depend on the machine
//     that built it (no -march=native). float64 (the equivalence tests) uses the C library's functions.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace rbn {

using at::Tensor;

// How a term is normalized (matches recurrent_bn.fused: NONE, LAYER, BATCH, SHARED, AFFINE).
enum Kind : int64_t { kNone = 0, kLayer = 1, kBatch = 2, kShared = 3, kAffine = 4 };

#define RBN_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------------
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
Tensor pack_panels(const Tensor& B) {
  const int64_t N = B.size(0), K = B.size(1), panels = (N + kPanel - 1) / kPanel;
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

// ---------------------------------------------------------------------------------------------------------------
// What the kernels see: raw pointers, sizes, and the description of each normalized term.

template <typename T>
struct Term {
  int64_t kind = kNone;
  int64_t features = 0;       // F: 4H for the input and recurrent terms, H for the cell
  const T* gamma = nullptr;   // (F) layer / batch / shared
  const T* beta = nullptr;    // (F) or null
  const T* scale = nullptr;   // (steps, F) affine
  const T* shift = nullptr;   // (steps, F) affine
  T eps = 0;
  T* mean = nullptr;          // batch: (steps, F); shared: (F); written by the forward, read by the backward
  T* var = nullptr;           // likewise
  T* row_mean = nullptr;      // layer: (steps, B), written by the forward
  T* row_rstd = nullptr;      // layer: (steps, B)
};

template <typename T>
struct Problem {
  int64_t steps = 0, batch = 0, hidden = 0;
  const T* P = nullptr;       // (steps, B, 4H) input projection W_x x
  const T* bias = nullptr;    // (4H) or null
  const bool* mask = nullptr; // (steps, B), all true when the layer has no lengths
  const T* count = nullptr;   // (steps) active examples
  Term<T> in, hh, cell;
  bool save = false;          // keep what the backward needs; otherwise the states ping-pong in (2, B, H)
  T* hs = nullptr;            // (steps + 1, B, H) or (2, B, H)
  T* cs = nullptr;
  T* A = nullptr;             // (steps, B, 4H) gate activations sigma(i), sigma(f), tanh(g), sigma(o)
  T* RH = nullptr;            // (steps, B, 4H) recurrent term normalized (batch / layer) or raw (affine)
  T* CH = nullptr;            // (steps, B, H) cell normalized (batch / layer)
  T* TC = nullptr;            // (steps, B, H) tanh of the normalized cell
  T* out = nullptr;           // (steps, B, H)
  // backward
  const T* dout = nullptr;    // (steps, B, H)
  T* dh = nullptr;            // (B, H) gradient of the state h_t, carried backwards
  T* dc = nullptr;            // (B, H)
  T* DR = nullptr;            // (steps, B, 4H) gradient of W_h h_{t-1}
  T* dP = nullptr;            // (steps, B, 4H) gradient of the projection
};

inline double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds each thread of the current call has waited at barriers (a team has at most 64 threads).
constexpr int64_t kMaxTeam = 64;
double barrier_wait[kMaxTeam];

// The barrier between the threads of a team at batch-normalized steps. A waiter spins for at most spin_seconds
// (a healthy wait is about a microsecond: the team works in lockstep), then sleeps on a futex until the last thread
// arrives. The spin is bounded by the clock, not by a count of pause instructions: a pause takes 10 cycles on some
// CPUs and 140 on others, and 4096 of them were up to 200 us. OpenMP's own barrier spins far longer. When another
// process keeps a core busy, a thread of the team is descheduled for whole time slices; a waiter that keeps spinning
// holds the one core the late thread could run on, and every one of the thousands of barriers of a step pays for it.
// Sleeping frees the core, so the scheduler can run the late thread there at once.
std::atomic<double> spin_seconds{1e-5};

struct TeamBarrier {
  std::atomic<int64_t> arrived{0};
  std::atomic<uint32_t> phase{0};  // 32 bits: then std::atomic::wait is a futex on the variable itself (Linux)
  int64_t size = 1;

  void wait() {
    const uint32_t current = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == size) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(current + 1, std::memory_order_release);
      phase.notify_all();
      return;
    }
    const double deadline = seconds() + spin_seconds.load(std::memory_order_relaxed);
    for (int spin = 1; phase.load(std::memory_order_acquire) == current; ++spin) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
      if (spin % 16 == 0 && seconds() > deadline) {
        while (phase.load(std::memory_order_acquire) == current) phase.wait(current, std::memory_order_acquire);
        return;
      }
    }
  }
};

// The threads of one call and the buffers through which they exchange column sums: `slots` arrays of
// (threads, width) each, twice (alternating timesteps, so that a fast thread never overwrites sums a slow one
// is still reading).
template <typename T>
struct Team {
  int64_t size = 1, width = 0;
  T* buffer = nullptr;
  const int64_t* starts = nullptr;  // (size + 1) first row of each thread
  TeamBarrier* sync = nullptr;

  RBN_INLINE void barrier(int64_t id) const {
    if (size == 1) return;
    const double start = seconds();
    sync->wait();
    barrier_wait[id] += seconds() - start;
  }
  RBN_INLINE T* slot(int64_t t, int64_t index, int64_t thread) const {
    return buffer + (((t & 1) * 8 + index) * size + thread) * width;
  }
};

// Per-thread sums for the parameter gradients, reduced after the loop.
template <typename T>
struct Accumulators {
  std::vector<T> dbias, dgamma_x, dbeta_x, dgamma_h, dbeta_h, dgamma_c, dbeta_c;
  std::vector<T> dscale_x, dshift_x, dscale_h, dshift_h, dscale_c, dshift_c;  // affine only: (steps, F)
  void init(const Problem<T>& p) {
    const int64_t G = 4 * p.hidden, H = p.hidden, S = p.steps;
    for (auto* v : {&dbias, &dgamma_x, &dbeta_x, &dgamma_h, &dbeta_h}) v->assign(G, T(0));
    for (auto* v : {&dgamma_c, &dbeta_c}) v->assign(H, T(0));
    if (p.in.kind == kAffine) { dscale_x.assign(S * G, T(0)); dshift_x.assign(S * G, T(0)); }
    if (p.hh.kind == kAffine) { dscale_h.assign(S * G, T(0)); dshift_h.assign(S * G, T(0)); }
    if (p.cell.kind == kAffine) { dscale_c.assign(S * H, T(0)); dshift_c.assign(S * H, T(0)); }
  }
};

// Per-thread scratch for rows [b0, b1).
template <typename T>
struct Scratch {
  std::vector<T> gate, w, xhat;      // (4H) one row
  std::vector<T> zeros;              // (4H) in place of an absent bias or beta
  std::vector<T> cn, og;             // (Bk, H) candidate cells and output gates, kept for the cell batch norm
  std::vector<T> mx, rx, mr, rr;     // (4H) column statistics: mean and 1 / sqrt(var + eps)
  std::vector<T> ax, cx;             // (4H) the input term as (x - mean) * ax + cx: ax = gamma * rstd, cx = beta + b
  std::vector<T> mc, rc;             // (H)
  std::vector<T> s1x, s2x, s1r, s2r; // (4H) combined column sums in the backward
  std::vector<T> s1c, s2c;           // (H)
  std::vector<T> dg;                 // (Bk, 4H) gate pre-activation gradients
  std::vector<T> dy;                 // (Bk, H) gradient of the normalized cell, then of the candidate cell
  void init(int64_t rows, int64_t H) {
    const int64_t G = 4 * H;
    for (auto* v : {&gate, &w, &xhat, &zeros, &mx, &rx, &mr, &rr, &ax, &cx, &s1x, &s2x, &s1r, &s2r})
      v->assign(G, T(0));
    for (auto* v : {&mc, &rc, &s1c, &s2c}) v->assign(H, T(0));
    for (auto* v : {&cn, &og, &dy}) v->assign(rows * H, T(0));
    dg.assign(rows * G, T(0));
  }
};

RBN_INLINE bool is_active(const bool* mask, int64_t b) { return mask[b]; }

template <typename T>
RBN_INLINE void fill(T* x, int64_t n, T value) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) x[k] = value;
}

// out = sum over the threads of their partial sums (slot of timestep t).
template <typename T>
RBN_INLINE void combine(const Team<T>& team, int64_t t, int64_t index, int64_t n, T* out) {
  fill(out, n, T(0));
  for (int64_t k = 0; k < team.size; ++k) {
    const T* part = team.slot(t, index, k);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += part[j];
  }
}

// Mean and biased variance of one row of n features (layer norm), two passes as F.layer_norm.
template <typename T>
RBN_INLINE void row_stats(const T* x, int64_t n, T& mean, T& var) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += x[k];
  mean = sum / T(n);
  T squares = 0;
  const T m = mean;
#pragma omp simd reduction(+ : squares)
  for (int64_t k = 0; k < n; ++k) squares += (x[k] - m) * (x[k] - m);
  var = squares / T(n);
}

// Batch statistics of the columns of one or two (rows, n) blocks over the active rows of the whole batch, whose
// rows are split among the team. Each thread computes the mean and the sum of squared deviations of its own rows
// (two passes, as the reference), the team meets at one barrier, and every thread combines the parts (Chan et
// al.'s pairwise formula: M2 = sum_k M2_k + sum_k n_k (mean_k - mean)^2). x1 / x2: this thread's rows, row
// strides ld1 / ld2; x2 may be null. mask: the activity of all B rows at this timestep.
template <typename T>
RBN_INLINE void local_moments(const T* x, int64_t ld, int64_t rows, int64_t n, const bool* mask, T count, T* mean,
                              T* m2) {
  fill(mean, n, T(0));
  fill(m2, n, T(0));
  if (count <= T(0)) return;
  for (int64_t r = 0; r < rows; ++r) {
    if (!is_active(mask, r)) continue;
    const T* a = x + r * ld;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) mean[k] += a[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) mean[k] /= count;
  for (int64_t r = 0; r < rows; ++r) {
    if (!is_active(mask, r)) continue;
    const T* a = x + r * ld;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) m2[k] += (a[k] - mean[k]) * (a[k] - mean[k]);
  }
}

template <typename T>
RBN_INLINE void combine_moments(const Team<T>& team, int64_t t, int64_t slot, const T* counts, T total, int64_t n,
                                T* mean, T* var) {
  const T denominator = total > T(0) ? total : T(1);
  if (team.size == 1) {
    const T* m = team.slot(t, slot, 0);
    const T* q = team.slot(t, slot + 1, 0);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      mean[k] = m[k];
      var[k] = q[k] / denominator;
    }
    return;
  }
  fill(mean, n, T(0));
  fill(var, n, T(0));
  for (int64_t j = 0; j < team.size; ++j) {
    const T* m = team.slot(t, slot, j);
    const T w = counts[j];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) mean[k] += w * m[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) mean[k] /= denominator;
  for (int64_t j = 0; j < team.size; ++j) {
    const T* m = team.slot(t, slot, j);
    const T* q = team.slot(t, slot + 1, j);
    const T w = counts[j];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) var[k] += q[k] + w * (m[k] - mean[k]) * (m[k] - mean[k]);
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) var[k] /= denominator;
}

template <typename T>
RBN_INLINE void team_column_stats(const Team<T>& team, int64_t id, int64_t t, int64_t slot, const T* x1,
                                  int64_t ld1, const T* x2, int64_t ld2, int64_t n, const bool* mask, T total,
                                  T* mean1, T* var1, T* mean2, T* var2) {
  T counts[kMaxTeam];
  for (int64_t j = 0; j < team.size; ++j) {
    int64_t c = 0;
    for (int64_t b = team.starts[j]; b < team.starts[j + 1]; ++b) c += is_active(mask, b);
    counts[j] = T(c);
  }
  const int64_t b0 = team.starts[id], rows = team.starts[id + 1] - b0;
  const bool* own_mask = mask + b0;
  local_moments(x1, ld1, rows, n, own_mask, counts[id], team.slot(t, slot, id), team.slot(t, slot + 1, id));
  if (x2) local_moments(x2, ld2, rows, n, own_mask, counts[id], team.slot(t, slot + 2, id), team.slot(t, slot + 3, id));
  team.barrier(id);
  combine_moments(team, t, slot, counts, total, n, mean1, var1);
  if (x2) combine_moments(team, t, slot + 2, counts, total, n, mean2, var2);
}

// Keep a term's batch statistics of timestep t (returned to Python for the population update, and read by the
// backward) and turn the variance into 1 / sqrt(var + eps).
template <typename T>
RBN_INLINE void publish_stats(const Term<T>& term, int64_t id, int64_t t, const T* mean, T* var_to_rstd) {
  const int64_t F = term.features;
  if (id == 0) {
    std::copy(mean, mean + F, term.mean + t * F);
    std::copy(var_to_rstd, var_to_rstd + F, term.var + t * F);
  }
  for (int64_t k = 0; k < F; ++k) var_to_rstd[k] = Math<T>::rsqrt(var_to_rstd[k] + term.eps);
}

// The input term of a batch-normalized projection as one multiply-add per element: (x - mean) * ax + cx.
template <typename T>
RBN_INLINE void input_coefficients(const Term<T>& in, const T* bias, const T* rstd, T* ax, T* cx, int64_t G) {
  for (int64_t k = 0; k < G; ++k) {
    ax[k] = rstd[k] * in.gamma[k];
    cx[k] = (in.beta ? in.beta[k] : T(0)) + (bias ? bias[k] : T(0));
  }
}

// out = gamma * (x - mean) * rstd (+ beta), the statistics per column (batch norm) or per row (layer norm, given
// as single values with stride 0); xhat receives the normalized value. Separate loops per case keep every loop
// free of branches, so that each one vectorizes.
template <typename T>
RBN_INLINE void normalize_row(const T* x, const T* mean, const T* rstd, int64_t stride, const T* gamma,
                              const T* beta, T* xhat, T* out, int64_t n) {
  if (stride) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) xhat[k] = (x[k] - mean[k]) * rstd[k];
  } else {
    const T m = mean[0], r = rstd[0];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) xhat[k] = (x[k] - m) * r;
  }
  if (beta) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = xhat[k] * gamma[k] + beta[k];
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = xhat[k] * gamma[k];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: one timestep of one thread's rows [b0, b1). R = W_h h_{t-1} for these rows, (b1 - b0, 4H), row stride
// ldr.

template <typename T>
RBN_INLINE void finish_row(const Problem<T>& p, int64_t t, int64_t b, const T* cn, const T* og, Scratch<T>& s) {
  using M = Math<T>;
  const int64_t B = p.batch, H = p.hidden;
  const bool active = p.mask[t * B + b];
  const int64_t cur = p.save ? t : (t & 1), nxt = p.save ? t + 1 : ((t + 1) & 1);
  const T* h_prev = p.hs + (cur * B + b) * H;
  const T* c_prev = p.cs + (cur * B + b) * H;
  T* h_next = p.hs + (nxt * B + b) * H;
  T* c_next = p.cs + (nxt * B + b) * H;
  T* out = p.out + (t * B + b) * H;
  const Term<T>& cell = p.cell;
  T* y = s.w.data();
  T* ch = p.save && p.CH ? p.CH + (t * B + b) * H : s.xhat.data();
  if (cell.kind == kBatch) {
    // below
  } else if (cell.kind == kLayer) {
    T mean, var;
    row_stats(cn, H, mean, var);
    T rstd = M::rsqrt(var + cell.eps);
    if (p.save) { cell.row_mean[t * B + b] = mean; cell.row_rstd[t * B + b] = rstd; }
    normalize_row(cn, &mean, &rstd, 0, cell.gamma, cell.beta, ch, y, H);
  } else if (cell.kind == kAffine) {
    const T* scale = cell.scale + t * H;
    const T* shift = cell.shift + t * H;
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) y[u] = shift[u] + cn[u] * scale[u];
  } else {
    y = const_cast<T*>(cn);
  }
  T* TC = p.save ? p.TC + (t * B + b) * H : s.xhat.data();
  if (active && cell.kind == kBatch) {
    // The common case in one pass: normalize, tanh, output.
    const T *m = s.mc.data(), *q = s.rc.data(), *gamma = cell.gamma;
    const T* beta = cell.beta ? cell.beta : s.zeros.data();
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) {
      const T v = (cn[u] - m[u]) * q[u];
      ch[u] = v;
      const T th = M::tanh(v * gamma[u] + beta[u]);
      const T hn = og[u] * th;
      TC[u] = th;
      h_next[u] = hn;
      c_next[u] = cn[u];
      out[u] = hn;
    }
    return;
  }
  if (cell.kind == kBatch) normalize_row(cn, s.mc.data(), s.rc.data(), 1, cell.gamma, cell.beta, ch, y, H);
  if (active) {
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) {
      const T th = M::tanh(y[u]);
      const T hn = og[u] * th;
      TC[u] = th;
      h_next[u] = hn;
      c_next[u] = cn[u];
      out[u] = hn;
    }
  } else {
    // A padded step: the state is carried, the output is zero.
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) {
      TC[u] = M::tanh(y[u]);
      h_next[u] = h_prev[u];
      c_next[u] = c_prev[u];
      out[u] = T(0);
    }
  }
}

template <typename T>
RBN_INLINE void forward_step(const Problem<T>& p, const Team<T>& team, int64_t id, int64_t t, int64_t b0,
                             int64_t b1, const T* R, int64_t ldr, Scratch<T>& s) {
  using M = Math<T>;
  const int64_t B = p.batch, H = p.hidden, G = 4 * H, rows = b1 - b0;
  const bool* mask_all = p.mask + t * B;
  const T count = p.count[t];
  const T* Pt = p.P + (t * B + b0) * G;
  const int64_t cur = p.save ? t : (t & 1);
  const T* c_state = p.cs + (cur * B + b0) * H;
  const Term<T>& in = p.in;
  const Term<T>& hh = p.hh;

  // Batch statistics of the input and recurrent terms at this timestep.
  if (in.kind == kBatch || hh.kind == kBatch) {
    const bool both = in.kind == kBatch && hh.kind == kBatch;
    const T* first = in.kind == kBatch ? Pt : R;
    const int64_t ld_first = in.kind == kBatch ? G : ldr;
    T* m1 = in.kind == kBatch ? s.mx.data() : s.mr.data();
    T* v1 = in.kind == kBatch ? s.rx.data() : s.rr.data();
    team_column_stats(team, id, t, 0, first, ld_first, both ? R : nullptr, ldr, G, mask_all, count, m1, v1,
                      s.mr.data(), s.rr.data());
    if (in.kind == kBatch) {
      publish_stats(in, id, t, s.mx.data(), s.rx.data());
      input_coefficients(in, p.bias, s.rx.data(), s.ax.data(), s.cx.data(), G);
    }
    if (hh.kind == kBatch) publish_stats(hh, id, t, s.mr.data(), s.rr.data());
  }

  const bool cell_batch = p.cell.kind == kBatch;
  T* gate = s.gate.data();
  const T* bias = p.bias ? p.bias : s.zeros.data();
  const T* in_beta = in.beta ? in.beta : s.zeros.data();
  const T* hh_beta = hh.beta ? hh.beta : s.zeros.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = b0 + r;
    const T* x = Pt + r * G;
    const T* rr = R + r * ldr;
    // The input term: the normalized projection plus the bias, gate = (gamma * xhat + beta) + bias.
    if (in.kind == kBatch || in.kind == kShared) {
      const T *m = s.mx.data(), *ax = s.ax.data(), *cx = s.cx.data();
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] = (x[k] - m[k]) * ax[k] + cx[k];
    } else if (in.kind == kLayer) {
      T m, var;
      row_stats(x, G, m, var);
      const T q = M::rsqrt(var + in.eps);
      if (p.save) { in.row_mean[t * B + b] = m; in.row_rstd[t * B + b] = q; }
      const T* gamma = in.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] = ((x[k] - m) * q * gamma[k] + in_beta[k]) + bias[k];
    } else if (in.kind == kAffine) {
      const T* scale = in.scale + t * G;
      const T* shift = in.shift + t * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] = (shift[k] + x[k] * scale[k]) + bias[k];
    } else {
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] = x[k] + bias[k];
    }
    // The recurrent term; its normalized value (raw for the affine map) is kept for the backward.
    T* rh = p.save && p.RH ? p.RH + (t * B + b) * G : s.xhat.data();
    if (hh.kind == kBatch && !hh.beta) {
      const T *m = s.mr.data(), *q = s.rr.data(), *gamma = hh.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T v = (rr[k] - m[k]) * q[k];
        rh[k] = v;
        gate[k] += v * gamma[k];
      }
    } else if (hh.kind == kBatch) {
      const T *m = s.mr.data(), *q = s.rr.data(), *gamma = hh.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T v = (rr[k] - m[k]) * q[k];
        rh[k] = v;
        gate[k] += v * gamma[k] + hh_beta[k];
      }
    } else if (hh.kind == kLayer) {
      T m, var;
      row_stats(rr, G, m, var);
      const T q = M::rsqrt(var + hh.eps);
      if (p.save) { hh.row_mean[t * B + b] = m; hh.row_rstd[t * B + b] = q; }
      const T* gamma = hh.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T v = (rr[k] - m) * q;
        rh[k] = v;
        gate[k] += v * gamma[k] + hh_beta[k];
      }
    } else if (hh.kind == kAffine) {
      const T* scale = hh.scale + t * G;
      const T* shift = hh.shift + t * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        rh[k] = rr[k];
        gate[k] += shift[k] + rr[k] * scale[k];
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] += rr[k];
    }
    // Gate activations (order i, f, g, o) and the candidate cell.
    const T* cp = c_state + r * H;
    T* cn = cell_batch ? s.cn.data() + r * H : s.cn.data();
    T* og = cell_batch ? s.og.data() + r * H : s.og.data();
    T* A = p.save ? p.A + (t * B + b) * G : gate;
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) {
      const T ig = M::sigmoid(gate[u]);
      const T fg = M::sigmoid(gate[H + u]);
      const T gg = M::tanh(gate[2 * H + u]);
      const T o = M::sigmoid(gate[3 * H + u]);
      A[u] = ig;
      A[H + u] = fg;
      A[2 * H + u] = gg;
      A[3 * H + u] = o;
      cn[u] = fg * cp[u] + ig * gg;
      og[u] = o;
    }
    if (!cell_batch) finish_row(p, t, b, cn, og, s);
  }
  if (cell_batch) {
    team_column_stats<T>(team, id, t, 4, s.cn.data(), H, nullptr, 0, H, mask_all, count, s.mc.data(),
                         s.rc.data(), nullptr, nullptr);
    publish_stats(p.cell, id, t, s.mc.data(), s.rc.data());
    for (int64_t r = 0; r < rows; ++r) finish_row(p, t, b0 + r, s.cn.data() + r * H, s.og.data() + r * H, s);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: one timestep of one thread's rows [b0, b1). Reads dh / dc (gradients of h_t, c_t) of these rows,
// writes dc <- gradient of c_{t-1}, and DR[t], dP[t] of these rows; the caller then sets dh from DR[t] W_h.
// Every normalization y = gamma * xhat (+ beta) with statistics over a group (a column of the batch for batch norm,
// a row for layer norm) back-propagates as dx = rstd * (dy * gamma - mean(dy * gamma) - xhat * mean(dy * gamma *
// xhat)), the means over the group's active members.

template <typename T>
RBN_INLINE void backward_step(const Problem<T>& p, const Team<T>& team, int64_t id, int64_t t, int64_t b0,
                              int64_t b1, Scratch<T>& s, Accumulators<T>& acc) {
  using M = Math<T>;
  const int64_t B = p.batch, H = p.hidden, G = 4 * H, rows = b1 - b0;
  const bool* mask = p.mask + t * B + b0;  // indexed by row - b0
  const T count = p.count[t];
  const T n = count > T(0) ? count : T(1);
  const T* A_t = p.A + (t * B + b0) * G;
  const T* TC_t = p.TC + (t * B + b0) * H;
  const T* CH_t = p.CH ? p.CH + (t * B + b0) * H : nullptr;
  const T* c_prev = p.cs + (t * B + b0) * H;
  const T* c_now = p.cs + ((t + 1) * B + b0) * H;
  const T* dout = p.dout + (t * B + b0) * H;
  const T* Pt = p.P + (t * B + b0) * G;
  const T* RH_t = p.RH ? p.RH + (t * B + b0) * G : nullptr;
  T* dPt = p.dP + (t * B + b0) * G;
  T* DRt = p.DR + (t * B + b0) * G;
  T* dh = p.dh + b0 * H;
  T* dc = p.dc + b0 * H;
  T* dg = s.dg.data();
  T* dy = s.dy.data();
  const Term<T>& in = p.in;
  const Term<T>& hh = p.hh;
  const Term<T>& cell = p.cell;

  // 1. Through h_t = sigma(o) * tanh(y), y the normalized cell.
  for (int64_t r = 0; r < rows; ++r) {
    const bool active = is_active(mask, r);
    const T* o = A_t + r * G + 3 * H;
    const T* th = TC_t + r * H;
    const T* go = dout + r * H;
    const T* gh = dh + r * H;
    T* dgo = dg + r * G + 3 * H;
    T* d = dy + r * H;
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) {
      const T dhn = active ? go[u] + gh[u] : T(0);
      dgo[u] = dhn * th[u] * o[u] * (T(1) - o[u]);
      d[u] = dhn * o[u] * (T(1) - th[u] * th[u]);
    }
  }
  // 2. Through the cell normalization: dy <- gradient of the candidate cell.
  if (cell.kind == kBatch) {
    T* p1 = team.slot(t, 0, id);
    T* p2 = team.slot(t, 1, id);
    fill(p1, H, T(0));
    fill(p2, H, T(0));
    for (int64_t r = 0; r < rows; ++r) {
      if (!is_active(mask, r)) continue;
      const T* d = dy + r * H;
      const T* ch = CH_t + r * H;
#pragma omp simd
      for (int64_t u = 0; u < H; ++u) {
        p1[u] += d[u];
        p2[u] += d[u] * ch[u];
      }
    }
    for (int64_t u = 0; u < H; ++u) {
      acc.dgamma_c[u] += p2[u];
      acc.dbeta_c[u] += p1[u];
    }
    team.barrier(id);
    T* m1 = s.s1c.data();
    T* m2 = s.s2c.data();
    T* rc = s.rc.data();
    combine(team, t, 0, H, m1);
    combine(team, t, 1, H, m2);
    for (int64_t u = 0; u < H; ++u) {
      rc[u] = M::rsqrt(cell.var[t * H + u] + cell.eps) * cell.gamma[u];
      m1[u] /= n;
      m2[u] /= n;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const bool active = is_active(mask, r);
      T* d = dy + r * H;
      const T* ch = CH_t + r * H;
#pragma omp simd
      for (int64_t u = 0; u < H; ++u) d[u] = active ? rc[u] * (d[u] - m1[u] - ch[u] * m2[u]) : T(0);
    }
  } else if (cell.kind == kLayer) {
    const T* gamma = cell.gamma;
    T* dgamma = acc.dgamma_c.data();
    T* dbeta = acc.dbeta_c.data();
    for (int64_t r = 0; r < rows; ++r) {
      T* d = dy + r * H;
      const T* ch = CH_t + r * H;
      T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t u = 0; u < H; ++u) {
        const T e = d[u] * gamma[u];
        m1 += e;
        m2 += e * ch[u];
      }
      m1 /= T(H);
      m2 /= T(H);
      const T rstd = cell.row_rstd[t * B + b0 + r];
#pragma omp simd
      for (int64_t u = 0; u < H; ++u) {
        dgamma[u] += d[u] * ch[u];
        dbeta[u] += d[u];
        d[u] = rstd * (d[u] * gamma[u] - m1 - ch[u] * m2);
      }
    }
  } else if (cell.kind == kAffine) {
    T* dscale = acc.dscale_c.data() + t * H;
    T* dshift = acc.dshift_c.data() + t * H;
    const T* scale = cell.scale + t * H;
    for (int64_t r = 0; r < rows; ++r) {
      T* d = dy + r * H;
      const T* c = c_now + r * H;  // the candidate cell wherever d is not zero
#pragma omp simd
      for (int64_t u = 0; u < H; ++u) {
        dscale[u] += d[u] * c[u];
        dshift[u] += d[u];
        d[u] = d[u] * scale[u];
      }
    }
  }
  // 3. Through c_t = sigma(f) c_{t-1} + sigma(i) tanh(g), and the carried states of padded steps.
  for (int64_t r = 0; r < rows; ++r) {
    const bool active = is_active(mask, r);
    const T* a = A_t + r * G;
    const T* cp = c_prev + r * H;
    const T* d = dy + r * H;
    T* gc = dc + r * H;
    T* g = dg + r * G;
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) {
      const T ig = a[u], fg = a[H + u], gg = a[2 * H + u];
      const T dcn = active ? gc[u] + d[u] : T(0);
      g[u] = dcn * gg * ig * (T(1) - ig);
      g[H + u] = dcn * cp[u] * fg * (T(1) - fg);
      g[2 * H + u] = dcn * ig * (T(1) - gg * gg);
      gc[u] = active ? dcn * fg : gc[u];
    }
  }
  // 4. The bias, and the sums that the batch statistics of the input and recurrent terms need.
  if (p.bias) {
    T* d = acc.dbias.data();
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = dg + r * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) d[k] += g[k];
    }
  }
  if (in.kind == kBatch) {
    for (int64_t k = 0; k < G; ++k) {
      s.mx[k] = in.mean[t * G + k];
      s.rx[k] = M::rsqrt(in.var[t * G + k] + in.eps);
    }
  }
  if (in.kind == kBatch || in.kind == kShared || hh.kind == kBatch) {
    // Per column: sum of the gradient and of gradient * normalized value over the active rows. For shared
    // statistics they are only accumulated here (the dP correction needs them over the whole sequence).
    const bool in_sums = in.kind == kBatch || in.kind == kShared;
    T* x1 = in.kind == kBatch ? team.slot(t, 2, id) : acc.dbeta_x.data();
    T* x2 = in.kind == kBatch ? team.slot(t, 3, id) : acc.dgamma_x.data();
    T* r1 = team.slot(t, 4, id);
    T* r2 = team.slot(t, 5, id);
    if (in.kind == kBatch) { fill(x1, G, T(0)); fill(x2, G, T(0)); }
    if (hh.kind == kBatch) { fill(r1, G, T(0)); fill(r2, G, T(0)); }
    const T* mx = s.mx.data();
    const T* rx = s.rx.data();
    for (int64_t r = 0; r < rows; ++r) {
      if (!is_active(mask, r)) continue;
      const T* g = dg + r * G;
      if (in_sums) {
        const T* x = Pt + r * G;
#pragma omp simd
        for (int64_t k = 0; k < G; ++k) {
          x1[k] += g[k];
          x2[k] += g[k] * (x[k] - mx[k]) * rx[k];
        }
      }
      if (hh.kind == kBatch) {
        const T* rh = RH_t + r * G;
#pragma omp simd
        for (int64_t k = 0; k < G; ++k) {
          r1[k] += g[k];
          r2[k] += g[k] * rh[k];
        }
      }
    }
    if (in.kind == kBatch) {
      for (int64_t k = 0; k < G; ++k) {
        acc.dgamma_x[k] += x2[k];
        acc.dbeta_x[k] += x1[k];
      }
    }
    if (hh.kind == kBatch) {
      for (int64_t k = 0; k < G; ++k) {
        acc.dgamma_h[k] += r2[k];
        acc.dbeta_h[k] += r1[k];
      }
    }
    if (in.kind == kBatch || hh.kind == kBatch) team.barrier(id);
    if (in.kind == kBatch) {
      combine(team, t, 2, G, s.s1x.data());
      combine(team, t, 3, G, s.s2x.data());
      for (int64_t k = 0; k < G; ++k) {
        s.s1x[k] /= n;
        s.s2x[k] /= n;
      }
    }
    if (hh.kind == kBatch) {
      combine(team, t, 4, G, s.s1r.data());
      combine(team, t, 5, G, s.s2r.data());
      for (int64_t k = 0; k < G; ++k) {
        s.s1r[k] /= n;
        s.s2r[k] /= n;
        s.rr[k] = M::rsqrt(hh.var[t * G + k] + hh.eps) * hh.gamma[k];
      }
    }
  }
  // 5. The input term: dP[t].
  for (int64_t r = 0; r < rows; ++r) {
    const bool active = is_active(mask, r);
    const T* g = dg + r * G;
    const T* x = Pt + r * G;
    T* d = dPt + r * G;
    if (in.kind == kNone || in.kind == kShared) {
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) d[k] = g[k];
    } else if (in.kind == kBatch) {
      const T *mx = s.mx.data(), *rx = s.rx.data(), *m1 = s.s1x.data(), *m2 = s.s2x.data(), *gamma = in.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T xhat = (x[k] - mx[k]) * rx[k];
        d[k] = active ? gamma[k] * rx[k] * (g[k] - m1[k] - xhat * m2[k]) : T(0);
      }
    } else if (in.kind == kLayer) {
      const T mean = in.row_mean[t * B + b0 + r], rstd = in.row_rstd[t * B + b0 + r];
      const T* gamma = in.gamma;
      T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t k = 0; k < G; ++k) {
        const T e = g[k] * gamma[k];
        m1 += e;
        m2 += e * (x[k] - mean) * rstd;
      }
      m1 /= T(G);
      m2 /= T(G);
      T* dgamma = acc.dgamma_x.data();
      T* dbeta = acc.dbeta_x.data();
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T xhat = (x[k] - mean) * rstd;
        dgamma[k] += g[k] * xhat;
        dbeta[k] += g[k];
        d[k] = rstd * (g[k] * gamma[k] - m1 - xhat * m2);
      }
    } else if (in.kind == kAffine) {
      const T* scale = in.scale + t * G;
      T* dscale = acc.dscale_x.data() + t * G;
      T* dshift = acc.dshift_x.data() + t * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        dscale[k] += g[k] * x[k];
        dshift[k] += g[k];
        d[k] = g[k] * scale[k];
      }
    }
  }
  // 6. The recurrent term: DR[t].
  for (int64_t r = 0; r < rows; ++r) {
    const bool active = is_active(mask, r);
    const T* g = dg + r * G;
    T* d = DRt + r * G;
    if (hh.kind == kNone) {
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) d[k] = g[k];
    } else if (hh.kind == kBatch) {
      const T* rh = RH_t + r * G;
      const T *m1 = s.s1r.data(), *m2 = s.s2r.data(), *rr = s.rr.data();
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) d[k] = active ? rr[k] * (g[k] - m1[k] - rh[k] * m2[k]) : T(0);
    } else if (hh.kind == kLayer) {
      const T* rh = RH_t + r * G;
      const T rstd = hh.row_rstd[t * B + b0 + r];
      const T* gamma = hh.gamma;
      T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t k = 0; k < G; ++k) {
        const T e = g[k] * gamma[k];
        m1 += e;
        m2 += e * rh[k];
      }
      m1 /= T(G);
      m2 /= T(G);
      T* dgamma = acc.dgamma_h.data();
      T* dbeta = acc.dbeta_h.data();
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        dgamma[k] += g[k] * rh[k];
        dbeta[k] += g[k];
        d[k] = rstd * (g[k] * gamma[k] - m1 - rh[k] * m2);
      }
    } else if (hh.kind == kAffine) {
      const T* rh = RH_t + r * G;  // the raw recurrent term
      const T* scale = hh.scale + t * G;
      T* dscale = acc.dscale_h.data() + t * G;
      T* dshift = acc.dshift_h.data() + t * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        dscale[k] += g[k] * rh[k];
        dshift[k] += g[k];
        d[k] = g[k] * scale[k];
      }
    }
  }
}

// dP of an input term normalized with statistics shared over the whole sequence, for rows [r0, r1) of (T * B):
// dP <- gamma * rstd * (dP - m1 - xhat * m2) at active positions, 0 elsewhere, with m1 = sum(dP) / N and
// m2 = sum(dP * xhat) / N over every active position.
template <typename T>
RBN_INLINE void shared_input_backward(const Problem<T>& p, int64_t r0, int64_t r1, const T* mean, const T* rstd,
                                      const T* m1, const T* m2) {
  const int64_t G = 4 * p.hidden;
  const T* gamma = p.in.gamma;
  for (int64_t r = r0; r < r1; ++r) {
    const bool active = p.mask[r];
    const T* x = p.P + r * G;
    T* d = p.dP + r * G;
#pragma omp simd
    for (int64_t k = 0; k < G; ++k) {
      const T xhat = (x[k] - mean[k]) * rstd[k];
      d[k] = active ? gamma[k] * rstd[k] * (d[k] - m1[k] - xhat * m2[k]) : T(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Instruction-set variants. The bodies above are always inlined, so each wrapper compiles them for its target.

template <typename T>
struct Kernels {
  void (*forward)(const Problem<T>&, const Team<T>&, int64_t, int64_t, int64_t, int64_t, const T*, int64_t,
                  Scratch<T>&);
  void (*backward)(const Problem<T>&, const Team<T>&, int64_t, int64_t, int64_t, int64_t, Scratch<T>&,
                   Accumulators<T>&);
  void (*shared)(const Problem<T>&, int64_t, int64_t, const T*, const T*, const T*, const T*);
  void (*moments)(const T*, int64_t, int64_t, int64_t, const bool*, T, T*, T*);
  // C = A B^T with B packed (float32 on AVX-512 only; null elsewhere: the products go to oneDNN or ATen).
  void (*gemm)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);
  const char* name;
};

#define RBN_VARIANT(SUFFIX, ATTRIBUTE, TYPE)                                                                    \
  ATTRIBUTE void forward_##SUFFIX(const Problem<TYPE>& p, const Team<TYPE>& team, int64_t id, int64_t t,       \
                                  int64_t b0, int64_t b1, const TYPE* R, int64_t ldr, Scratch<TYPE>& s) {      \
    forward_step<TYPE>(p, team, id, t, b0, b1, R, ldr, s);                                                     \
  }                                                                                                            \
  ATTRIBUTE void backward_##SUFFIX(const Problem<TYPE>& p, const Team<TYPE>& team, int64_t id, int64_t t,      \
                                   int64_t b0, int64_t b1, Scratch<TYPE>& s, Accumulators<TYPE>& acc) {        \
    backward_step<TYPE>(p, team, id, t, b0, b1, s, acc);                                                       \
  }                                                                                                            \
  ATTRIBUTE void shared_##SUFFIX(const Problem<TYPE>& p, int64_t r0, int64_t r1, const TYPE* mean,             \
                                 const TYPE* rstd, const TYPE* m1, const TYPE* m2) {                           \
    shared_input_backward<TYPE>(p, r0, r1, mean, rstd, m1, m2);                                                \
  }                                                                                                            \
  ATTRIBUTE void moments_##SUFFIX(const TYPE* x, int64_t ld, int64_t rows, int64_t n, const bool* mask,        \
                                  TYPE count, TYPE* mean, TYPE* m2) {                                          \
    local_moments<TYPE>(x, ld, rows, n, mask, count, mean, m2);                                                \
  }

RBN_VARIANT(f32_base, , float)
RBN_VARIANT(f64_base, , double)
#if defined(__x86_64__) && defined(__GNUC__)
RBN_VARIANT(f32_avx2, __attribute__((target("avx2,fma"))), float)
RBN_VARIANT(f32_avx512,
            __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"))), float)
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"))) void gemm_f32_avx512(
    const float* A, int64_t lda, int64_t M, const float* packed, int64_t K, int64_t panels, float* C, int64_t ldc) {
  gemm_panels(A, lda, M, packed, K, panels, C, ldc);
}
#endif

const Kernels<float>& float_kernels() {
  static const Kernels<float> kernels = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
      return Kernels<float>{forward_f32_avx512, backward_f32_avx512, shared_f32_avx512, moments_f32_avx512,
                            gemm_f32_avx512, "avx512"};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels<float>{forward_f32_avx2, backward_f32_avx2, shared_f32_avx2, moments_f32_avx2, nullptr, "avx2"};
#endif
    return Kernels<float>{forward_f32_base, backward_f32_base, shared_f32_base, moments_f32_base, nullptr,
                          "baseline"};
  }();
  return kernels;
}

template <typename T>
const Kernels<T>& kernels();
template <>
const Kernels<float>& kernels<float>() { return float_kernels(); }
template <>
const Kernels<double>& kernels<double>() {
  static const Kernels<double> k{forward_f64_base, backward_f64_base, shared_f64_base, moments_f64_base, nullptr,
                                 "baseline"};
  return k;
}

// ---------------------------------------------------------------------------------------------------------------
// Matrix products: x (M, K) times w (N, K) transposed. float32 goes to oneDNN when this build of PyTorch has it
// (inside the team the call runs on the calling thread: oneDNN does not start threads inside a parallel region).

using LinearOp = c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                 c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                                 std::optional<c10::string_view>)>;

const std::optional<LinearOp>& onednn_linear() {
  static const std::optional<LinearOp> op = []() -> std::optional<LinearOp> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
  }();
  return op;
}

bool use_onednn = true;

bool onednn_for(const Tensor& x) { return use_onednn && onednn_linear().has_value() && x.scalar_type() == at::kFloat; }

// w, prepared once per call for the products of every timestep: oneDNN's own blocked layout when available
// (about 10-20 % faster per product at these sizes than handing it the plain matrix each time).
Tensor prepare_weight(const Tensor& w, int64_t rows) {
  if (!onednn_for(w)) return w;
  using ReorderOp = c10::TypedOperatorHandle<Tensor(const Tensor&, std::optional<int64_t>)>;
  static const auto reorder = []() -> std::optional<ReorderOp> {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<Tensor(const Tensor&, std::optional<int64_t>)>();
  }();
  if (!reorder.has_value()) return w;
  return reorder->call(w, rows);
}

Tensor matmul_nt(const Tensor& x, const Tensor& w) {
  if (onednn_for(x))
    return onednn_linear()->call(x, w, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  return at::mm(x, w.t());
}

bool use_packed = true;

template <typename T>
bool uses_packed_gemm(const Kernels<T>& k) {
  return std::is_same_v<T, float> && use_packed && k.gemm != nullptr;
}

// C (rows, ldc) = A (rows, K; row stride lda) times the packed B, on the calling thread (float32 only).
template <typename T>
void step_product(const Kernels<T>& k, const T* A, int64_t lda, int64_t rows, const Tensor& packed, T* C,
                  int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    k.gemm(A, lda, rows, packed.data_ptr<float>(), packed.size(1), packed.size(0), C, ldc);
  }
}

// Where the time of the last call went, per thread: [matrix products, elementwise, waiting at barriers] in
// seconds, for the forward and the backward (scripts/bench.py reports it).
std::array<std::array<double, 3>, kMaxTeam> forward_profile{}, backward_profile{};
double backward_weight_gradient_seconds = 0;

// ---------------------------------------------------------------------------------------------------------------
// Drivers.

// The tensors describing one normalized term, in the order recurrent_bn/fused.py passes them; absent = empty.
struct TermTensors {
  int64_t kind;
  double eps;
  Tensor gamma, beta, scale, shift;
};

std::vector<TermTensors> terms_from(const std::vector<int64_t>& kinds, const std::vector<double>& eps,
                                    const std::vector<Tensor>& tensors) {
  TORCH_CHECK(kinds.size() == 3 && eps.size() == 3 && tensors.size() == 12, "expected three terms of four tensors");
  std::vector<TermTensors> terms;
  for (int i = 0; i < 3; ++i) {
    const Tensor* t = tensors.data() + 4 * i;
    terms.push_back(TermTensors{kinds[i], eps[i], t[0], t[1], t[2], t[3]});
  }
  return terms;
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? const_cast<T*>(t.data_ptr<T>()) : nullptr;
}

// Rows [b0, b1) of each thread: contiguous blocks of examples.
std::vector<std::pair<int64_t, int64_t>> split_rows(int64_t threads, int64_t B) {
  const int64_t n = std::max<int64_t>(1, std::min({threads, B, kMaxTeam}));
  std::vector<std::pair<int64_t, int64_t>> parts;
  for (int64_t k = 0; k < n; ++k) parts.emplace_back(B * k / n, B * (k + 1) / n);
  return parts;
}

// A team over the rows of a batch together with the storage its `Team` points into (so it is neither copied nor
// moved): the row split, the exchange buffers (16 slots of (threads, width)) and the barrier.
template <typename T>
struct TeamOverRows {
  std::vector<std::pair<int64_t, int64_t>> parts;
  std::vector<T> exchange;
  std::vector<int64_t> starts;
  TeamBarrier sync;
  Team<T> team;

  TeamOverRows(int64_t threads, int64_t B, int64_t width) : parts(split_rows(threads, B)) {
    team.size = static_cast<int64_t>(parts.size());
    team.width = width;
    exchange.assign(16 * team.size * width, T(0));
    team.buffer = exchange.data();
    for (const auto& part : parts) starts.push_back(part.first);
    starts.push_back(B);
    team.starts = starts.data();
    sync.size = team.size;
    team.sync = &sync;
  }
  TeamOverRows(const TeamOverRows&) = delete;
  TeamOverRows& operator=(const TeamOverRows&) = delete;
};

// When the threads of a team spent more than half of a call waiting for each other at barriers, the team ran slower
// than one thread would have: the machine has fewer cores free than the team has threads (another process holds a
// core; every thread of a parallel sweep asks for all of them). A barrier cannot fix that: a waiter that spins
// holds a core, one that sleeps waits for the scheduler to give one back, thousands of times per sequence. So the
// next calls run on one thread, for a number of calls that doubles while it recurs (4 up to 256), and then the team
// is tried again. Results then differ from the team's in rounding only (the batch statistics are summed per thread).
std::atomic<bool> team_fallback{true};
std::atomic<int64_t> solo_calls_left{0}, solo_calls_next{4};

int64_t team_threads(int64_t threads) {
  if (threads <= 1 || !team_fallback.load()) return threads;
  if (solo_calls_left.load() <= 0) return threads;
  solo_calls_left.fetch_sub(1);
  return 1;
}

void record_team(int64_t size, double elapsed) {
  if (size <= 1 || !team_fallback.load()) return;
  double waited = 0;
  for (int64_t id = 0; id < size; ++id) waited += barrier_wait[id];
  if (waited / size > 0.5 * elapsed) {
    const int64_t calls = solo_calls_next.load();
    solo_calls_left.store(calls);
    solo_calls_next.store(std::min<int64_t>(2 * calls, 256));
  } else {
    solo_calls_next.store(4);
  }
}

// Runs body(rows, id) on every thread of an OpenMP team over the B rows, for as many threads as asked where the
// runtime gives them. It may give fewer (OMP_THREAD_LIMIT, a call from inside another parallel region,
// omp_set_dynamic): a team split for more threads than it has would leave rows unwritten and its barrier waiting
// forever. Then no thread starts, and the team is split again for the size obtained, down to one thread, which
// every runtime gives. Returns the team that ran, for its size and split.
template <typename T, typename Body>
std::unique_ptr<TeamOverRows<T>> run_team(int64_t threads, int64_t B, int64_t width, const Body& body) {
  for (int64_t size = team_threads(threads);;) {
    auto rows = std::make_unique<TeamOverRows<T>>(size, B, width);
    size = rows->team.size;
    std::atomic<int64_t> obtained{size};
    const double start = seconds();
#pragma omp parallel num_threads(size)
    {
      const int64_t n = omp_get_num_threads();
      if (n == size) {
        body(*rows, static_cast<int64_t>(omp_get_thread_num()));
      } else {
        obtained.store(n, std::memory_order_relaxed);
      }
    }
    if (obtained.load() == size) {
      record_team(size, seconds() - start);
      return rows;
    }
    size = obtained.load();
  }
}

template <typename T>
void fill_terms(Problem<T>& p, const std::vector<TermTensors>& terms) {
  Term<T>* targets[3] = {&p.in, &p.hh, &p.cell};
  for (int i = 0; i < 3; ++i) {
    Term<T>& term = *targets[i];
    const TermTensors& tt = terms[i];
    term.kind = tt.kind;
    term.features = i == 2 ? p.hidden : 4 * p.hidden;
    term.eps = static_cast<T>(tt.eps);
    term.gamma = ptr_or_null<T>(tt.gamma);
    term.beta = ptr_or_null<T>(tt.beta);
    term.scale = ptr_or_null<T>(tt.scale);
    term.shift = ptr_or_null<T>(tt.shift);
  }
}

// Fills the sizes and inputs of p. Returns the tensors p points into that the caller must keep alive: the
// per-timestep counts of active examples and the mask (all true when there is none, so that every loop has the
// same shape: a null mask made GCC leave some of them unvectorized).
template <typename T>
std::pair<Tensor, Tensor> setup(Problem<T>& p, const Tensor& P, const Tensor& bias,
                                const std::vector<TermTensors>& terms, const Tensor& mask) {
  p.steps = P.size(0);
  p.batch = P.size(1);
  p.hidden = P.size(2) / 4;
  p.P = P.data_ptr<T>();
  p.bias = ptr_or_null<T>(bias);
  const bool given = mask.defined() && mask.numel() > 0;
  Tensor active = given ? mask.contiguous() : at::ones({p.steps, p.batch}, P.options().dtype(at::kBool));
  p.mask = active.data_ptr<bool>();
  Tensor count = given ? mask.to(P.scalar_type()).sum(1).contiguous()
                        : at::full({p.steps}, double(p.batch), P.options());
  p.count = count.data_ptr<T>();
  fill_terms(p, terms);
  return {count, active};
}

// With shared statistics the normalization of the projection is the same map at every position.
template <typename T>
void load_shared_stats(const Problem<T>& p, Scratch<T>& s) {
  if (p.in.kind != kShared) return;
  for (int64_t k = 0; k < 4 * p.hidden; ++k) {
    s.mx[k] = p.in.mean[k];
    s.rx[k] = Math<T>::rsqrt(p.in.var[k] + p.in.eps);
  }
  input_coefficients(p.in, p.bias, s.rx.data(), s.ax.data(), s.cx.data(), 4 * p.hidden);
}

// Mean and biased variance over the active rows of x (N, F) (mask (N) or empty): the statistics of an input term
// normalized with statistics shared over time and batch, as recurrent_bn.norm.batch_statistics computes them.
template <typename T>
std::vector<Tensor> column_moments_impl(const Tensor& x, const Tensor& mask, int64_t threads) {
  const int64_t N = x.size(0), F = x.size(1);
  const Tensor active = mask.defined() && mask.numel() > 0 ? mask.contiguous()
                                                           : at::ones({N}, x.options().dtype(at::kBool));
  const bool* m = active.data_ptr<bool>();
  const int64_t team = std::max<int64_t>(1, std::min<int64_t>(threads, N));
  std::vector<T> means(team * F), m2s(team * F), counts(team);
  const T* data = x.data_ptr<T>();
  const Kernels<T>& k = kernels<T>();
#pragma omp parallel num_threads(team)
  {
    omp_set_num_threads(1);  // see forward_impl
    // The chunks go round the threads the runtime gave, which may be fewer than asked (see run_team).
    for (int64_t j = omp_get_thread_num(); j < team; j += omp_get_num_threads()) {
      const int64_t r0 = N * j / team, r1 = N * (j + 1) / team;
      int64_t c = 0;
      for (int64_t r = r0; r < r1; ++r) c += is_active(m, r);
      counts[j] = T(c);
      k.moments(data + r0 * F, F, r1 - r0, F, m + r0, T(c), means.data() + j * F, m2s.data() + j * F);
    }
  }
  T total = 0;
  for (T c : counts) total += c;
  const T denominator = total > T(0) ? total : T(1);
  Tensor mean = at::zeros({F}, x.options()), var = at::zeros({F}, x.options());
  T* mu = mean.data_ptr<T>();
  T* v = var.data_ptr<T>();
  for (int64_t j = 0; j < team; ++j)
    for (int64_t f = 0; f < F; ++f) mu[f] += counts[j] * means[j * F + f];
  for (int64_t f = 0; f < F; ++f) mu[f] /= denominator;
  for (int64_t j = 0; j < team; ++j)
    for (int64_t f = 0; f < F; ++f) {
      const T d = means[j * F + f] - mu[f];
      v[f] += m2s[j * F + f] + counts[j] * d * d;
    }
  for (int64_t f = 0; f < F; ++f) v[f] /= denominator;
  return {mean, var};
}

// Forward of one layer over the whole sequence.
// Returns [output, h_T, c_T, hs, cs, A, RH, CH, TC, then per term (input, recurrent, cell): mean, var, row_mean,
// row_rstd] (empty where not applicable; hs ... TC empty unless save).
template <typename T>
std::vector<Tensor> forward_impl(const Tensor& P, const Tensor& h0, const Tensor& c0, const Tensor& W,
                                 const Tensor& bias, const std::vector<TermTensors>& terms, const Tensor& mask,
                                 bool save, int64_t threads) {
  Problem<T> p;
  const auto prepared = setup(p, P, bias, terms, mask);
  const Tensor p_mask = prepared.second.view({-1});
  const int64_t S = p.steps, B = p.batch, H = p.hidden, G = 4 * H;
  const auto opts = P.options();
  p.save = save;
  Tensor hs = at::empty({save ? S + 1 : 2, B, H}, opts), cs = at::empty({save ? S + 1 : 2, B, H}, opts);
  hs.select(0, 0).copy_(h0);
  cs.select(0, 0).copy_(c0);
  Tensor out = at::empty({S, B, H}, opts);
  Tensor none = at::empty({0}, opts);
  Tensor A = none, RH = none, CH = none, TC = none;
  if (save) {
    A = at::empty({S, B, G}, opts);
    TC = at::empty({S, B, H}, opts);
    if (terms[1].kind != kNone) RH = at::empty({S, B, G}, opts);
    if (terms[2].kind == kBatch || terms[2].kind == kLayer) CH = at::empty({S, B, H}, opts);
  }
  p.hs = hs.data_ptr<T>();
  p.cs = cs.data_ptr<T>();
  p.out = out.data_ptr<T>();
  p.A = ptr_or_null<T>(A);
  p.RH = ptr_or_null<T>(RH);
  p.CH = ptr_or_null<T>(CH);
  p.TC = ptr_or_null<T>(TC);
  std::vector<Tensor> stats;
  Term<T>* targets[3] = {&p.in, &p.hh, &p.cell};
  for (int i = 0; i < 3; ++i) {
    const int64_t F = i == 2 ? H : G;
    Tensor mean = none, var = none, row_mean = none, row_rstd = none;
    if (terms[i].kind == kBatch) {
      mean = at::empty({S, F}, opts);
      var = at::empty({S, F}, opts);
      targets[i]->mean = mean.data_ptr<T>();
      targets[i]->var = var.data_ptr<T>();
    } else if (terms[i].kind == kShared) {
      // Statistics pooled over every active position of the sequence, before the loop.
      auto moments = column_moments_impl<T>(P.view({S * B, G}), p_mask, threads);
      mean = moments[0];
      var = moments[1];
      targets[i]->mean = mean.data_ptr<T>();
      targets[i]->var = var.data_ptr<T>();
    } else if (terms[i].kind == kLayer) {
      row_mean = at::empty({S, B}, opts);
      row_rstd = at::empty({S, B}, opts);
      targets[i]->row_mean = row_mean.data_ptr<T>();
      targets[i]->row_rstd = row_rstd.data_ptr<T>();
    }
    stats.insert(stats.end(), {mean, var, row_mean, row_rstd});
  }

  const Kernels<T>& k = kernels<T>();
  const bool packed = uses_packed_gemm(k);
  const Tensor Wp = packed ? pack_panels(W) : prepare_weight(W, split_rows(threads, B)[0].second);
  const int64_t ldr = packed ? Wp.size(0) * kPanel : G;
  for (auto& entry : forward_profile) entry = {0, 0, 0};

  run_team<T>(threads, B, G, [&](const TeamOverRows<T>& rows, int64_t id) {
    // Whatever runs inside (oneDNN's products, ATen) stays on this thread: with a team of one the region is
    // inactive, and oneDNN would otherwise fork a team of its own for every small product.
    omp_set_num_threads(1);
    c10::AutoGradMode no_grad(false);
    const Team<T>& team = rows.team;
    const auto [b0, b1] = rows.parts[id];
    Scratch<T> s;
    s.init(b1 - b0, H);
    load_shared_stats(p, s);
    double matmul = 0, elementwise = 0;
    const double start = seconds();
    barrier_wait[id] = 0;
    std::vector<T> buffer(packed ? (b1 - b0) * ldr : 0);
    for (int64_t t = 0; t < S; ++t) {
      const double t0 = seconds();
      const int64_t cur = save ? t : (t & 1);
      Tensor product;
      const T* R = buffer.data();
      if (packed) {
        step_product(k, p.hs + (cur * B + b0) * H, H, b1 - b0, Wp, buffer.data(), ldr);
      } else {
        product = matmul_nt(hs.select(0, cur).narrow(0, b0, b1 - b0), Wp);
        R = product.data_ptr<T>();
      }
      const double t1 = seconds();
      k.forward(p, team, id, t, b0, b1, R, ldr, s);
      matmul += t1 - t0;
      elementwise += seconds() - t1;
    }
    const double total = seconds() - start;
    forward_profile[id] = {matmul, elementwise - barrier_wait[id], total - matmul - elementwise + barrier_wait[id]};
  });

  const int64_t last = save ? S : (S & 1);
  std::vector<Tensor> result = {out, hs.select(0, last).clone(), cs.select(0, last).clone()};
  if (save) {
    result.insert(result.end(), {hs, cs, A, RH, CH, TC});
  } else {
    result.insert(result.end(), {none, none, none, none, none, none});
  }
  result.insert(result.end(), stats.begin(), stats.end());
  return result;
}

// Backward of forward_impl (save = true).
// saved = [hs, cs, A, RH, CH, TC, then per term: mean, var, row_mean, row_rstd].
// Returns [dP, dh0, dc0, dW, dbias, then per term: dgamma, dbeta, dscale, dshift] (empty where not applicable).
template <typename T>
std::vector<Tensor> backward_impl(const Tensor& dout, const Tensor& dhT, const Tensor& dcT, const Tensor& P,
                                  const Tensor& W, const Tensor& bias, const std::vector<TermTensors>& terms,
                                  const Tensor& mask, const std::vector<Tensor>& saved, int64_t threads) {
  Problem<T> p;
  const auto prepared = setup(p, P, bias, terms, mask);
  const Tensor& count = prepared.first;
  const int64_t S = p.steps, B = p.batch, H = p.hidden, G = 4 * H;
  const auto opts = P.options();
  p.save = true;
  const Tensor& hs = saved[0];
  p.hs = hs.data_ptr<T>();
  p.cs = saved[1].data_ptr<T>();
  p.A = saved[2].data_ptr<T>();
  p.RH = ptr_or_null<T>(saved[3]);
  p.CH = ptr_or_null<T>(saved[4]);
  p.TC = saved[5].data_ptr<T>();
  Term<T>* targets[3] = {&p.in, &p.hh, &p.cell};
  for (int i = 0; i < 3; ++i) {
    if (terms[i].kind == kBatch || terms[i].kind == kShared) {
      targets[i]->mean = ptr_or_null<T>(saved[6 + 4 * i]);
      targets[i]->var = ptr_or_null<T>(saved[7 + 4 * i]);
    } else if (terms[i].kind == kLayer) {
      targets[i]->row_mean = ptr_or_null<T>(saved[8 + 4 * i]);
      targets[i]->row_rstd = ptr_or_null<T>(saved[9 + 4 * i]);
    }
  }
  Tensor dout_c = dout.contiguous();
  p.dout = dout_c.data_ptr<T>();
  Tensor dh = dhT.contiguous().clone(), dc = dcT.contiguous().clone();
  p.dh = dh.data_ptr<T>();
  p.dc = dc.data_ptr<T>();
  Tensor DR = at::empty({S, B, G}, opts), dP = at::empty({S, B, G}, opts);
  p.DR = DR.data_ptr<T>();
  p.dP = dP.data_ptr<T>();

  // One set of sums per thread of the largest team run_team may form; those of threads that never ran stay empty.
  std::vector<Accumulators<T>> accs(split_rows(threads, B).size());
  const Kernels<T>& k = kernels<T>();
  const bool packed = uses_packed_gemm(k);
  // dh_{t-1} = DR_t W_h, the product with W_h^T transposed.
  const Tensor WT = packed ? pack_panels(W.t()) : prepare_weight(W.t().contiguous(), split_rows(threads, B)[0].second);
  const int64_t ldh = packed ? WT.size(0) * kPanel : H;
  for (auto& entry : backward_profile) entry = {0, 0, 0};

  const int64_t team_size = run_team<T>(threads, B, G, [&](const TeamOverRows<T>& rows, int64_t id) {
    omp_set_num_threads(1);  // see forward_impl
    c10::AutoGradMode no_grad(false);
    const Team<T>& team = rows.team;
    const auto [b0, b1] = rows.parts[id];
    Scratch<T> s;
    s.init(b1 - b0, H);
    load_shared_stats(p, s);
    Accumulators<T>& acc = accs[id];
    acc.init(p);
    double matmul = 0, elementwise = 0;
    const double start = seconds();
    barrier_wait[id] = 0;
    std::vector<T> buffer(packed ? (b1 - b0) * ldh : 0);
    for (int64_t t = S - 1; t >= 0; --t) {
      const double t0 = seconds();
      k.backward(p, team, id, t, b0, b1, s, acc);
      const double t1 = seconds();
      Tensor product;
      const T* g = buffer.data();
      if (packed) {
        step_product(k, p.DR + (t * B + b0) * G, G, b1 - b0, WT, buffer.data(), ldh);
      } else {
        product = matmul_nt(DR.select(0, t).narrow(0, b0, b1 - b0), WT);
        g = product.data_ptr<T>();
      }
      const double t2 = seconds();
      const bool* mask_t = p.mask + t * B;
      for (int64_t b = b0; b < b1; ++b) {
        // Padded steps pass the gradient of the carried state through unchanged (their DR rows are zero).
        T* d = p.dh + b * H;
        const T* x = g + (b - b0) * ldh;
        if (is_active(mask_t, b)) {
          std::copy(x, x + H, d);
        } else {
          for (int64_t u = 0; u < H; ++u) d[u] += x[u];
        }
      }
      matmul += t2 - t1;
      elementwise += (t1 - t0) + (seconds() - t2);
    }
    const double total = seconds() - start;
    backward_profile[id] = {matmul, elementwise - barrier_wait[id], total - matmul - elementwise + barrier_wait[id]};
  })->team.size;

  // Parameter gradients: the per-thread sums, and dW_h = sum_t DR_t^T h_{t-1} as one product.
  const double weight_start = seconds();
  // dW_h^T = H_prev^T DR as oneDNN's x w^T with transposed views (oneDNN reads them in place; MKL's mm of the
  // same product runs at half the rate on AMD CPUs).
  const Tensor DR2 = DR.view({S * B, G}), H2 = hs.narrow(0, 0, S).reshape({S * B, H});
  Tensor dW = onednn_for(DR2) ? matmul_nt(H2.t(), DR2.t()).t().contiguous() : at::mm(DR2.t(), H2);
  backward_weight_gradient_seconds = seconds() - weight_start;
  auto reduce = [&](std::vector<T> Accumulators<T>::*member, int64_t size) {
    Tensor total = at::zeros({size}, opts);
    T* d = total.data_ptr<T>();
    for (int64_t j = 0; j < team_size; ++j) {
      const std::vector<T>& v = accs[j].*member;
      for (int64_t i = 0; i < size; ++i) d[i] += v[i];
    }
    return total;
  };
  Tensor none = at::empty({0}, opts);
  Tensor dbias = p.bias ? reduce(&Accumulators<T>::dbias, G) : none;
  using Member = std::vector<T> Accumulators<T>::*;
  const std::array<std::array<Member, 4>, 3> members = {{
      {&Accumulators<T>::dgamma_x, &Accumulators<T>::dbeta_x, &Accumulators<T>::dscale_x, &Accumulators<T>::dshift_x},
      {&Accumulators<T>::dgamma_h, &Accumulators<T>::dbeta_h, &Accumulators<T>::dscale_h, &Accumulators<T>::dshift_h},
      {&Accumulators<T>::dgamma_c, &Accumulators<T>::dbeta_c, &Accumulators<T>::dscale_c, &Accumulators<T>::dshift_c},
  }};
  std::vector<Tensor> term_grads;
  for (int i = 0; i < 3; ++i) {
    const int64_t F = i == 2 ? H : G;
    Tensor dgamma = none, dbeta = none, dscale = none, dshift = none;
    const int64_t kind = terms[i].kind;
    if (kind == kBatch || kind == kShared || kind == kLayer) {
      dgamma = reduce(members[i][0], F);
      if (terms[i].beta.numel() > 0) dbeta = reduce(members[i][1], F);
    } else if (kind == kAffine) {
      dscale = reduce(members[i][2], S * F).view({S, F});
      dshift = reduce(members[i][3], S * F).view({S, F});
    }
    term_grads.insert(term_grads.end(), {dgamma, dbeta, dscale, dshift});
  }
  if (p.in.kind == kShared) {
    // Statistics shared over time couple every position: finish dP now that the sums over the sequence are known.
    const T N = std::max<T>(count.sum().item<T>(), T(1));
    Tensor m1 = (reduce(&Accumulators<T>::dbeta_x, G) / N).contiguous();
    Tensor m2 = (reduce(&Accumulators<T>::dgamma_x, G) / N).contiguous();
    Tensor rstd = (saved[7].reshape({G}) + terms[0].eps).rsqrt().contiguous();
    const T* mean_ptr = p.in.mean;
    const T* rstd_ptr = rstd.data_ptr<T>();
    const T* m1_ptr = m1.data_ptr<T>();
    const T* m2_ptr = m2.data_ptr<T>();
    at::parallel_for(0, S * B, 64, [&](int64_t r0, int64_t r1) {
      k.shared(p, r0, r1, mean_ptr, rstd_ptr, m1_ptr, m2_ptr);
    });
  }
  std::vector<Tensor> result = {dP, dh, dc, dW, dbias};
  result.insert(result.end(), term_grads.begin(), term_grads.end());
  return result;
}

// x (T, B, I) times W_x (4H, I) transposed: the input projection of every timestep, (T, B, 4H).
Tensor projection(const Tensor& x, const Tensor& weight_ih) {
  const int64_t S = x.size(0), B = x.size(1);
  return matmul_nt(x.reshape({S * B, x.size(2)}).contiguous(), weight_ih.contiguous()).view({S, B, -1});
}

// The layer: projection, loop. Returns [output, h_T, c_T, then what the backward needs: P, hs, cs, A, RH, CH, TC,
// and per term (input, recurrent, cell) mean, var, row_mean, row_rstd] (empty where not applicable; P ... TC
// empty unless save). The batch statistics (mean, var) are returned in every case, for the population update.
std::vector<Tensor> lstm_forward(const Tensor& x, const Tensor& weight_ih, const Tensor& h0, const Tensor& c0,
                                 const Tensor& W, const Tensor& bias, const std::vector<int64_t>& kinds,
                                 const std::vector<double>& eps, const std::vector<Tensor>& term_tensors,
                                 const Tensor& mask, bool save, int64_t threads) {
  TORCH_CHECK(x.dim() == 3 && weight_ih.dim() == 2 && weight_ih.size(0) % 4 == 0, "expected x (T, B, I), W_x (4H, I)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the fused LSTM supports float32 and float64");
  const auto terms = terms_from(kinds, eps, term_tensors);
  c10::AutoGradMode no_grad(false);
  const Tensor P = projection(x, weight_ih);
  const Tensor Wc = W.contiguous();
  std::vector<Tensor> result = x.scalar_type() == at::kFloat
                                   ? forward_impl<float>(P, h0, c0, Wc, bias, terms, mask, save, threads)
                                   : forward_impl<double>(P, h0, c0, Wc, bias, terms, mask, save, threads);
  result.insert(result.begin() + 3, save ? P : at::empty({0}, P.options()));
  return result;
}

// Backward of lstm_forward(save = true); saved = its outputs from P on (19 tensors).
// Returns [dx, dW_x, dh0, dc0, dW_h, dbias, then per term: dgamma, dbeta, dscale, dshift] (empty where not needed).
std::vector<Tensor> lstm_backward(const Tensor& dout, const Tensor& dhT, const Tensor& dcT, const Tensor& x,
                                  const Tensor& weight_ih, const Tensor& W, const Tensor& bias,
                                  const std::vector<int64_t>& kinds, const std::vector<double>& eps,
                                  const std::vector<Tensor>& term_tensors, const Tensor& mask,
                                  const std::vector<Tensor>& saved, int64_t threads, bool need_dx) {
  TORCH_CHECK(saved.size() == 19, "expected the 19 tensors saved by lstm_forward");
  const auto terms = terms_from(kinds, eps, term_tensors);
  c10::AutoGradMode no_grad(false);
  const Tensor& P = saved[0];
  const std::vector<Tensor> rest(saved.begin() + 1, saved.end());
  const Tensor Wc = W.contiguous();
  std::vector<Tensor> grads = x.scalar_type() == at::kFloat
                                  ? backward_impl<float>(dout, dhT, dcT, P, Wc, bias, terms, mask, rest, threads)
                                  : backward_impl<double>(dout, dhT, dcT, P, Wc, bias, terms, mask, rest, threads);
  // Through the projection: dx = dP W_x, dW_x = dP^T x (as oneDNN's x w^T with transposed views).
  const int64_t S = x.size(0), B = x.size(1), I = x.size(2);
  const Tensor dP = grads[0].view({S * B, -1});
  const Tensor x2 = x.reshape({S * B, I}).contiguous();
  Tensor dx = need_dx ? matmul_nt(dP, weight_ih.t().contiguous()).view({S, B, I}) : at::empty({0}, x.options());
  Tensor dW_ih = onednn_for(dP) ? matmul_nt(x2.t(), dP.t()).t().contiguous() : at::mm(dP.t(), x2);
  grads[0] = dW_ih;
  grads.insert(grads.begin(), dx);
  return grads;
}

std::string kernel_variant() { return float_kernels().name; }

void set_onednn(bool enabled) { use_onednn = enabled; }

void set_packed_gemm(bool enabled) { use_packed = enabled; }

// Tuning and tests: how long a barrier spins before it sleeps, whether a team that mostly waited falls back to one
// thread for the next calls.
void set_barrier_spin(double seconds) { spin_seconds.store(seconds); }

void set_team_fallback(bool enabled) { team_fallback.store(enabled); }

bool onednn_available() { return onednn_linear().has_value(); }

// [threads][matrix products, elementwise, barriers] of the last forward and backward, and the dW_h product.
std::vector<std::vector<double>> last_profile() {
  std::vector<std::vector<double>> rows;
  for (const auto& table : {forward_profile, backward_profile}) {
    std::vector<double> row;
    for (const auto& entry : table) row.insert(row.end(), entry.begin(), entry.end());
    rows.push_back(row);
  }
  rows.push_back({backward_weight_gradient_seconds});
  return rows;
}

}  // namespace rbn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &rbn::lstm_forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lstm_backward", &rbn::lstm_backward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("kernel_variant", &rbn::kernel_variant);
  m.def("set_onednn", &rbn::set_onednn);
  m.def("set_packed_gemm", &rbn::set_packed_gemm);
  m.def("set_barrier_spin", &rbn::set_barrier_spin);
  m.def("set_team_fallback", &rbn::set_team_fallback);
  m.def("onednn_available", &rbn::onednn_available);
  m.def("last_profile", &rbn::last_profile);
}
