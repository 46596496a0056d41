// The fused LSTM layer's interface to Python (bound in bindings.cpp, called by recurrent_bn/fused.py): every
// tensor crosses it by name. Absent tensors are empty.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace rbn {

using at::Tensor;

// How one term (the input projection, the recurrent term, the cell) is normalized: kind (Kind in common.h), eps,
// gamma and beta (layer / batch norm), or the affine map (x - mean) * scale + beta of population statistics, with
// its per-timestep scale and mean (steps, F) and beta (F, or empty). The map is never folded into x * scale +
// shift: when |mean| >> std that sum cancels and float32 keeps only a few digits of the result.
struct TermSpec {
  int64_t kind = 0;
  double eps = 0;
  Tensor gamma, beta, scale, mean;
};

// A term's statistics from the forward: batch (steps, F) or shared (F) mean and biased variance, returned for the
// population update; layer norm's per-row mean and 1 / sqrt(var + eps) (steps, B).
struct TermStats {
  Tensor mean, var, row_mean, row_rstd;
};

// What the backward reads: the projection P = W_x x (steps, B, 4H), the states hs, cs (steps + 1, B, H), the gate
// activations A (steps, B, 4H), the recurrent term normalized (raw for the affine map) RH (steps, B, 4H), the
// normalized cell CH and its tanh TC (steps, B, H); empty unless the forward saved them. The statistics always.
struct Saved {
  Tensor P, hs, cs, A, RH, CH, TC;
  TermStats input, recurrent, cell;
};

struct ForwardResult {
  Tensor output, h, c;  // (steps, B, H), h_T and c_T (B, H)
  Saved saved;
};

struct TermGrads {
  Tensor gamma, beta, scale, mean;  // mean: always empty (the population statistics are not trained)
};

struct BackwardResult {
  Tensor x, weight_ih, h0, c0, weight_hh, bias;
  TermGrads input, recurrent, cell;
};

// One layer over the sequence x (steps, B, I), from h0, c0 (B, H), W_x (4H, I), W_h (4H, H), the bias (4H) and the
// mask (steps, B) of active examples. save: keep what the backward needs.
ForwardResult lstm_forward(const Tensor& x, const Tensor& weight_ih, const Tensor& h0, const Tensor& c0,
                           const Tensor& weight_hh, const Tensor& bias, const TermSpec& input,
                           const TermSpec& recurrent, const TermSpec& cell, const Tensor& mask, bool save,
                           int64_t threads);

// The gradients of lstm_forward(save = true) from those of its output, h_T and c_T.
BackwardResult lstm_backward(const Tensor& d_output, const Tensor& d_h, const Tensor& d_c, const Tensor& x,
                             const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias,
                             const TermSpec& input, const TermSpec& recurrent, const TermSpec& cell,
                             const Tensor& mask, const Saved& saved, int64_t threads, bool need_dx);

// The instruction-set variant of the float32 kernels: "avx512", "avx2" or "baseline".
std::string kernel_variant();
bool onednn_available();
// Tuning and tests: oneDNN for the products, the packed AVX-512 product, how long a barrier spins before it
// sleeps, whether a team that mostly waited falls back to one thread for the next calls.
void set_onednn(bool enabled);
void set_packed_gemm(bool enabled);
void set_barrier_spin(double seconds);
void set_team_fallback(bool enabled);
// The next `calls` calls run on one thread, as after a call that mostly waited (tests of the fallback).
void run_solo(int64_t calls);
// The OpenMP thread count of the calling thread's next parallel regions (ATen's parallel loops read it); returns the
// one it replaces.
int64_t set_omp_threads(int64_t threads);
// [threads][matrix products, elementwise, barriers] of the last forward and backward, and the dW_h product.
std::vector<std::vector<double>> last_profile();

}  // namespace rbn
