// The three normalizations (batch norm over the active rows of the batch, layer norm over a row, and the
// population statistics' per-timestep affine map), forward and backward, each written once and used for every
// term (the input projection W_x x, the recurrent term W_h h, the cell).
//
// Every normalization y = gamma * xhat (+ beta) with statistics over a group (a column of the batch for batch norm,
// a row for layer norm) back-propagates as dx = rstd * (dy * gamma - mean(dy * gamma) - xhat * mean(dy * gamma *
// xhat)), the means over the group's active members. Where a term's normalized value was kept by the forward, the
// backward reads it (x_mean null, or 0 with x_rstd 1); the input term recomputes it from the projection.
#pragma once

#include "common.h"
#include "problem.h"
#include "team.h"
#include "vector_math.h"

namespace rbn {

// ---------------------------------------------------------------------------------------------------------------
// Forward: statistics and the normalized value.

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

// Layer norm's statistics of row i (of steps x B) of a term, x its n features: mean and 1 / sqrt(var + eps), kept
// for the backward when save.
template <typename T>
RBN_INLINE void layer_stats(const Term<T>& term, const T* x, int64_t n, int64_t i, bool save, T& mean, T& rstd) {
  T var;
  row_stats(x, n, mean, var);
  rstd = Math<T>::rsqrt(var + term.eps);
  if (save) {
    term.row_mean[i] = mean;
    term.row_rstd[i] = rstd;
  }
}

// Batch statistics of the columns of one or two (rows, n) blocks over the active rows of the whole batch, whose
// rows are split into the team's blocks. Each thread computes the mean and the sum of squared deviations of each
// of its blocks (two passes, as the reference), the team meets at one barrier, and every thread combines the parts
// in block order (Chan et al.'s pairwise formula: M2 = sum_k M2_k + sum_k n_k (mean_k - mean)^2). x1 / x2: this
// thread's rows, row strides ld1 / ld2; x2 may be null. mask: the activity of all B rows at this timestep.
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
  if (team.blocks == 1) {
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
  for (int64_t j = 0; j < team.blocks; ++j) {
    const T* m = team.slot(t, slot, j);
    const T w = counts[j];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) mean[k] += w * m[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) mean[k] /= denominator;
  for (int64_t j = 0; j < team.blocks; ++j) {
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
  for (int64_t j = 0; j < team.blocks; ++j) {
    int64_t c = 0;
    for (int64_t b = team.starts[j]; b < team.starts[j + 1]; ++b) c += is_active(mask, b);
    counts[j] = T(c);
  }
  const bool* own_mask = mask + team.starts[team.first_block[id]];
  team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
    local_moments(x1 + r0 * ld1, ld1, r1 - r0, n, own_mask + r0, counts[k], team.slot(t, slot, k),
                  team.slot(t, slot + 1, k));
    if (x2)
      local_moments(x2 + r0 * ld2, ld2, r1 - r0, n, own_mask + r0, counts[k], team.slot(t, slot + 2, k),
                    team.slot(t, slot + 3, k));
  });
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
// Backward.

// Layer norm of one row of n features: g is dL/dy, xhat = (x - x_mean) * x_rstd (pass 0 and 1 where x is xhat
// itself), rstd the row's 1 / sqrt(var + eps). Adds g * xhat and g to dgamma and dbeta and writes dx (may be g).
template <typename T>
RBN_INLINE void layer_norm_backward_row(const T* g, const T* x, T x_mean, T x_rstd, T rstd, const T* gamma,
                                        int64_t n, T* dgamma, T* dbeta, T* dx) {
  T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
  for (int64_t k = 0; k < n; ++k) {
    const T e = g[k] * gamma[k];
    m1 += e;
    m2 += e * ((x[k] - x_mean) * x_rstd);
  }
  m1 /= T(n);
  m2 /= T(n);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const T xhat = (x[k] - x_mean) * x_rstd;
    dgamma[k] += g[k] * xhat;
    dbeta[k] += g[k];
    dx[k] = rstd * (g[k] * gamma[k] - m1 - xhat * m2);
  }
}

// The affine map y = (x - center) * scale + beta of one row (the population statistics of timestep t): adds
// g * (x - center) to dscale (of that timestep) and g to dbeta, and writes dx = g * scale (may be g).
template <typename T>
RBN_INLINE void affine_backward_row(const T* g, const T* x, const T* center, const T* scale, int64_t n, T* dscale,
                                    T* dbeta, T* dx) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    dscale[k] += g[k] * (x[k] - center[k]);
    dbeta[k] += g[k];
    dx[k] = g[k] * scale[k];
  }
}

// A term that is normalized row by row (layer norm) or by the affine map, for this thread's rows [b0, b0 + rows)
// at timestep t: g (rows, n) in, dx (rows, n) out (may be g). x: the term's normalized value for layer norm when
// `normalized`, else its raw value.
template <typename T>
RBN_INLINE void rowwise_backward(const Term<T>& term, TermSums<T>& sums, int64_t t, int64_t B, int64_t b0,
                                 int64_t rows, const T* g, const T* x, bool normalized, T* dx) {
  const int64_t n = term.features;
  if (term.kind == kLayer) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = t * B + b0 + r;
      const T x_mean = normalized ? T(0) : term.row_mean[i], x_rstd = normalized ? T(1) : term.row_rstd[i];
      layer_norm_backward_row(g + r * n, x + r * n, x_mean, x_rstd, term.row_rstd[i], term.gamma, n,
                              sums.dgamma.data(), sums.dbeta.data(), dx + r * n);
    }
  } else if (term.kind == kAffine) {
    for (int64_t r = 0; r < rows; ++r)
      affine_backward_row(g + r * n, x + r * n, term.center + t * n, term.scale + t * n, n,
                          sums.dscale.data() + t * n, sums.dbeta.data(), dx + r * n);
  }
}

// Batch norm, first half: s1 += g and s2 += g * xhat over the active rows (xhat = (x - x_mean) * x_rstd, or x
// itself where x_mean is null). Rows of g, x and the mask are this thread's.
template <typename T>
RBN_INLINE void batch_norm_sums(const T* g, const T* x, const T* x_mean, const T* x_rstd, const bool* mask,
                                int64_t rows, int64_t n, T* s1, T* s2) {
  for (int64_t r = 0; r < rows; ++r) {
    if (!is_active(mask, r)) continue;
    const T* gr = g + r * n;
    const T* xr = x + r * n;
    if (x_mean) {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        s1[k] += gr[k];
        s2[k] += gr[k] * ((xr[k] - x_mean[k]) * x_rstd[k]);
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        s1[k] += gr[k];
        s2[k] += gr[k] * xr[k];
      }
    }
  }
}

// Batch norm, the team's sums of timestep t: the part of each of this thread's blocks in slots (slot, slot + 1).
// The caller meets the team at the barrier, then calls batch_norm_means.
template <typename T>
RBN_INLINE void batch_norm_partial(const Team<T>& team, int64_t id, int64_t t, int64_t slot, const T* g, const T* x,
                                   const T* x_mean, const T* x_rstd, const bool* mask, int64_t n) {
  team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
    T* s1 = team.slot(t, slot, k);
    T* s2 = team.slot(t, slot + 1, k);
    fill(s1, n, T(0));
    fill(s2, n, T(0));
    batch_norm_sums(g + r0 * n, x + r0 * n, x_mean, x_rstd, mask + r0, r1 - r0, n, s1, s2);
  });
}

// Batch norm, after the barrier: m1 = mean(g), m2 = mean(g * xhat) over the count active rows of the batch. The
// sums over the whole batch are also the term's dbeta and dgamma of this timestep: thread 0 adds them to its
// (block 0's) sums, so that they do not depend on how the blocks were shared among threads.
template <typename T>
RBN_INLINE void batch_norm_means(const Team<T>& team, int64_t id, int64_t t, int64_t slot, TermSums<T>& sums,
                                 int64_t n, T count, T* m1, T* m2) {
  const T active = count > T(0) ? count : T(1);
  combine(team, t, slot, n, m1);
  combine(team, t, slot + 1, n, m2);
  if (id == 0) {
    for (int64_t k = 0; k < n; ++k) {
      sums.dgamma[k] += m2[k];
      sums.dbeta[k] += m1[k];
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    m1[k] /= active;
    m2[k] /= active;
  }
}

// Batch norm, second half, one row: dx = coef * (g - m1 - xhat * m2) where active, 0 elsewhere; coef = gamma *
// rstd per column; xhat as in batch_norm_sums. dx may be g.
template <typename T>
RBN_INLINE void batch_norm_backward_row(const T* g, const T* x, const T* x_mean, const T* x_rstd, const T* coef,
                                        const T* m1, const T* m2, bool active, int64_t n, T* dx) {
  if (x_mean) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const T xhat = (x[k] - x_mean[k]) * x_rstd[k];
      dx[k] = active ? coef[k] * (g[k] - m1[k] - xhat * m2[k]) : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dx[k] = active ? coef[k] * (g[k] - m1[k] - x[k] * m2[k]) : T(0);
  }
}

// coef = gamma / sqrt(var + eps) of a batch-normalized term at timestep t (var as the forward kept it).
template <typename T>
RBN_INLINE void batch_norm_coefficients(const Term<T>& term, int64_t t, T* coef) {
  for (int64_t k = 0; k < term.features; ++k)
    coef[k] = Math<T>::rsqrt(term.var[t * term.features + k] + term.eps) * term.gamma[k];
}

// dP of an input term normalized with statistics shared over the whole sequence, for rows [r0, r1) of (T * B),
// in place: m1 = sum(dP) / N and m2 = sum(dP * xhat) / N over every active position; coef = gamma * rstd.
template <typename T>
RBN_INLINE void shared_input_backward(const Problem<T>& p, int64_t r0, int64_t r1, const T* mean, const T* rstd,
                                      const T* coef, const T* m1, const T* m2) {
  const int64_t G = 4 * p.hidden;
  for (int64_t r = r0; r < r1; ++r)
    batch_norm_backward_row(p.dP + r * G, p.P + r * G, mean, rstd, coef, m1, m2, p.mask[r], G, p.dP + r * G);
}

}  // namespace rbn
