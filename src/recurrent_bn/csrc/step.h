// One timestep of one thread's rows, forward and backward: the gates, the cell and h, with each term's
// normalization from norm.h.
#pragma once

#include "common.h"
#include "norm.h"
#include "problem.h"
#include "team.h"
#include "vector_math.h"

namespace rbn {

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
    T mean, rstd;
    layer_stats(cell, cn, H, t * B + b, p.save, mean, rstd);
    normalize_row(cn, &mean, &rstd, 0, cell.gamma, cell.beta, ch, y, H);
  } else if (cell.kind == kAffine) {
    const T* scale = cell.scale + t * H;
    const T* center = cell.center + t * H;
    const T* beta = cell.beta ? cell.beta : s.zeros.data();
#pragma omp simd
    for (int64_t u = 0; u < H; ++u) y[u] = (cn[u] - center[u]) * scale[u] + beta[u];
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
      T m, q;
      layer_stats(in, x, G, t * B + b, p.save, m, q);
      const T* gamma = in.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] = ((x[k] - m) * q * gamma[k] + in_beta[k]) + bias[k];
    } else if (in.kind == kAffine) {
      const T* scale = in.scale + t * G;
      const T* center = in.center + t * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) gate[k] = ((x[k] - center[k]) * scale[k] + in_beta[k]) + bias[k];
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
      T m, q;
      layer_stats(hh, rr, G, t * B + b, p.save, m, q);
      const T* gamma = hh.gamma;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T v = (rr[k] - m) * q;
        rh[k] = v;
        gate[k] += v * gamma[k] + hh_beta[k];
      }
    } else if (hh.kind == kAffine) {
      const T* scale = hh.scale + t * G;
      const T* center = hh.center + t * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        rh[k] = rr[k];
        gate[k] += (rr[k] - center[k]) * scale[k] + hh_beta[k];
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
// Parameter-gradient sums go to accs[k] for the rows of block k, so that they do not depend on the threads.

template <typename T>
RBN_INLINE void backward_step(const Problem<T>& p, const Team<T>& team, int64_t id, int64_t t, int64_t b0,
                              int64_t b1, Scratch<T>& s, Accumulators<T>* accs) {
  const int64_t B = p.batch, H = p.hidden, G = 4 * H, rows = b1 - b0;
  const bool* mask = p.mask + t * B + b0;  // indexed by row - b0
  const T count = p.count[t];
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
  // 2. Through the cell normalization: dy <- gradient of the candidate cell (the normalized cell CH is kept; the
  // affine map reads the candidate cell, which is c_t wherever dy is not zero).
  if (cell.kind == kBatch) {
    batch_norm_partial(team, id, t, 0, dy, CH_t, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                       mask, H);
    team.barrier(id);
    batch_norm_means(team, id, t, 0, accs[0].cell, H, count, s.s1c.data(), s.s2c.data());
    batch_norm_coefficients(cell, t, s.rc.data());
    for (int64_t r = 0; r < rows; ++r)
      batch_norm_backward_row(dy + r * H, CH_t + r * H, static_cast<const T*>(nullptr),
                              static_cast<const T*>(nullptr), s.rc.data(), s.s1c.data(), s.s2c.data(),
                              is_active(mask, r), H, dy + r * H);
  } else {
    const T* x = cell.kind == kLayer ? CH_t : c_now;
    team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
      rowwise_backward(cell, accs[k].cell, t, B, b0 + r0, r1 - r0, dy + r0 * H, x + r0 * H, true, dy + r0 * H);
    });
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
  // 4. The bias, and the batch-norm sums of the input and recurrent terms (one barrier for both). With statistics
  // shared over time the input's sums are only accumulated here: its dP is finished after the loop.
  if (p.bias) {
    team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
      T* d = accs[k].dbias.data();
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = dg + r * G;
#pragma omp simd
        for (int64_t j = 0; j < G; ++j) d[j] += g[j];
      }
    });
  }
  if (in.kind == kBatch) {
    for (int64_t k = 0; k < G; ++k) {
      s.mx[k] = in.mean[t * G + k];
      s.rx[k] = Math<T>::rsqrt(in.var[t * G + k] + in.eps);
      s.ax[k] = in.gamma[k] * s.rx[k];
    }
    batch_norm_partial(team, id, t, 2, dg, Pt, s.mx.data(), s.rx.data(), mask, G);
  } else if (in.kind == kShared) {
    team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
      batch_norm_sums(dg + r0 * G, Pt + r0 * G, s.mx.data(), s.rx.data(), mask + r0, r1 - r0, G,
                      accs[k].in.dbeta.data(), accs[k].in.dgamma.data());
    });
  }
  if (hh.kind == kBatch)
    batch_norm_partial(team, id, t, 4, dg, RH_t, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                       mask, G);
  if (in.kind == kBatch || hh.kind == kBatch) team.barrier(id);
  if (in.kind == kBatch) batch_norm_means(team, id, t, 2, accs[0].in, G, count, s.s1x.data(), s.s2x.data());
  if (hh.kind == kBatch) {
    batch_norm_means(team, id, t, 4, accs[0].hh, G, count, s.s1r.data(), s.s2r.data());
    batch_norm_coefficients(hh, t, s.rr.data());
  }
  // 5. The input term: dP[t].
  if (in.kind == kBatch) {
    for (int64_t r = 0; r < rows; ++r)
      batch_norm_backward_row(dg + r * G, Pt + r * G, s.mx.data(), s.rx.data(), s.ax.data(), s.s1x.data(),
                              s.s2x.data(), is_active(mask, r), G, dPt + r * G);
  } else if (in.kind == kLayer || in.kind == kAffine) {
    team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
      rowwise_backward(in, accs[k].in, t, B, b0 + r0, r1 - r0, dg + r0 * G, Pt + r0 * G, false, dPt + r0 * G);
    });
  } else {
    std::copy(dg, dg + rows * G, dPt);
  }
  // 6. The recurrent term: DR[t] (RH holds its normalized value, or its raw value for the affine map).
  if (hh.kind == kBatch) {
    for (int64_t r = 0; r < rows; ++r)
      batch_norm_backward_row(dg + r * G, RH_t + r * G, static_cast<const T*>(nullptr),
                              static_cast<const T*>(nullptr), s.rr.data(), s.s1r.data(), s.s2r.data(),
                              is_active(mask, r), G, DRt + r * G);
  } else if (hh.kind == kLayer || hh.kind == kAffine) {
    team.for_each_block(id, [&](int64_t k, int64_t r0, int64_t r1) {
      rowwise_backward(hh, accs[k].hh, t, B, b0 + r0, r1 - r0, dg + r0 * G, RH_t + r0 * G, true, DRt + r0 * G);
    });
  } else {
    std::copy(dg, dg + rows * G, DRt);
  }
}

}  // namespace rbn
