// What the step kernels see: raw pointers and sizes of one layer's sequence (Problem), the description of each
// normalized term (Term), each thread's sums for the parameter gradients (Accumulators) and its scratch rows.
#pragma once

#include <vector>

#include "common.h"

namespace rbn {

template <typename T>
struct Term {
  int64_t kind = kNone;
  int64_t features = 0;       // F: 4H for the input and recurrent terms, H for the cell
  const T* gamma = nullptr;   // (F) layer / batch / shared
  const T* beta = nullptr;    // (F) or null
  const T* scale = nullptr;   // (steps, F) affine: (x - center) * scale + beta
  const T* center = nullptr;  // (steps, F) affine: the population mean
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

// Per-thread sums of one term's parameter gradients, reduced after the loop.
template <typename T>
struct TermSums {
  std::vector<T> dgamma, dbeta;    // (F) layer / batch / shared; dbeta also affine
  std::vector<T> dscale;           // (steps, F) affine only
};

// Per-thread sums for the parameter gradients, reduced after the loop.
template <typename T>
struct Accumulators {
  std::vector<T> dbias;
  TermSums<T> in, hh, cell;
  void init(const Problem<T>& p) {
    dbias.assign(4 * p.hidden, T(0));
    const std::pair<TermSums<T>*, const Term<T>*> terms[3] = {{&in, &p.in}, {&hh, &p.hh}, {&cell, &p.cell}};
    for (const auto& [sums, term] : terms) {
      sums->dgamma.assign(term->features, T(0));
      sums->dbeta.assign(term->features, T(0));
      if (term->kind == kAffine) {
        sums->dscale.assign(p.steps * term->features, T(0));
      }
    }
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

}  // namespace rbn
