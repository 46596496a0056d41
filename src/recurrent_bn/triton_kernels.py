"""Triton kernels of one LSTM timestep, forward and backward, with the recurrent and cell normalizations fused in.

Imported only by `triton_lstm.py`, and only when the Triton path runs (importing triton costs about a second).
What each kernel computes is defined by the reference loop (`recurrence.lstm`); `triton_lstm.py` holds the loop over
time, the matrix products (cuBLAS) and the autograd function.

Per timestep t, with r = W_h h_{t-1} (B, 4H) already computed by one matrix product:
  gates = x_t + N_r(r);  c_new = σ(f) c + σ(i) tanh(g);  h_new = σ(o) tanh(N_c(c_new));
  carried states where(active, new, old), output h_new * active.
Term kinds, numbered as the C++ enum (`csrc/common.h`) and `triton_lstm`: NONE 0, LAYER 1 (layer norm per row),
BATCH 2 (batch statistics of the active rows of this step), SHARED 3 (statistics pooled over time: input terms only,
normalized before the loop, never in these kernels), AFFINE 4 (a per-timestep map `(x - mean_t) * scale_t + β`:
evaluation with population statistics, or the baseline's cell shift; never folded into `x * scale + shift`, which
cancels when |mean| >> std).

Each normalization is written once, as `csrc/norm.h` does for the C++: `_norm_output` (a term's output from the
value the forward keeps for the backward), `_term_forward` (standardize, then `_norm_output`) and `_norm_backward`
(the gradient of a term's input from that of its output), called per term: the four gates' recurrent terms and the
cell, in both layouts. The statistics are the layouts' own reductions: `_column_stats` (batch norm over the active
rows of a column) and `_row_stats` (layer norm over a row); so are the group means of the backward.

The rows kernels take the hidden size H as a compile-time constant (one compilation per hidden size): their loops over
the hidden units then have a constant bound, which Triton 3.6's interpreter needs (`range(0, n, BLOCK)` with a
runtime n is a TypeError there: its scalars are 1-element arrays that numpy 2 will not turn into an index).

Two layouts, so that every statistic stays inside one program:
  - "columns" (NONE, BATCH, AFFINE): a program owns BLOCK_H hidden units of all four gates and the whole batch, so
    the batch statistics of its features are reductions inside the program;
  - "rows" (NONE, AFFINE, LAYER): a program owns one batch row and loops over the hidden units, so a layer norm's
    statistics over the row are too.
No two programs write the same memory: a program writes only its own columns (or its own row) of every output, and
the carried gradients are ping-ponged between two buffers by the caller. Inside a rows program, values written by one
pass and read back by the next are separated by `tl.debug_barrier()` (threads of the program exchange them through
memory). The interpreter (TRITON_INTERPRET=1) runs programs one after another and cannot show races between them.

Constants `eps` arrive through a tensor (`eps_ptr`: [eps_recurrent, eps_cell]) in the working dtype: a float argument
would be rounded to float32, which shows in float64 comparisons where a variance is zero.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    # exp of -|x| only: never overflows (the interpreter would warn, and inf / inf would be NaN).
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _expm1_negative(u):
    # exp(u) - 1 for u <= 0 to a few ulps, also where exp(u) is close to 1 (Kahan: (w - 1) u / log w, w = exp(u)):
    # exp(u) - 1 itself keeps only an absolute error of one ulp of 1 there.
    w = tl.exp(u)
    inside = (w > 0.0) & (w < 1.0)
    ratio = (w - 1.0) * u / tl.log(tl.where(inside, w, 0.5))  # log of 0.5 where unused: no log(0) or 0 / 0
    return tl.where(w >= 1.0, u, tl.where(inside, ratio, -1.0))


@triton.jit
def _tanh(x):
    # tanh(|x|) = -e / (2 + e) with e = expm1(-2|x|): triton.language has no tanh that both the interpreter and the
    # compiler take in float32 and float64, and 2 sigmoid(2x) - 1 has an absolute error of one ulp of 1, which made
    # small activations (|h| ~ 1e-5) 1e4 times less accurate than the reference loop's float32.
    e = _expm1_negative(-2.0 * tl.abs(x))
    magnitude = -e / (2.0 + e)
    return tl.where(x >= 0, magnitude, -magnitude)


# The kinds (module docstring); constexpr globals, so that every `KIND == BATCH` is decided at compile time.
NONE = tl.constexpr(0)  # norm.Kind's numbers (tests/test_triton.py compares)
LAYER = tl.constexpr(1)
BATCH = tl.constexpr(2)
SHARED = tl.constexpr(3)
AFFINE = tl.constexpr(4)


@triton.jit
def _norm_output(kept, t, F, feat, ok, gamma_ptr, beta_ptr, scale_ptr, center_ptr, KIND: tl.constexpr,
                 HAS_BETA: tl.constexpr):
    """A term's output from what the forward keeps for the backward (`kept`: the input standardized for LAYER and
    BATCH, the input itself otherwise): γ kept (+ β); (kept - mean_t) scale_t (+ β) for AFFINE; kept for NONE.
    feat: the term's feature index of each column of `kept` (F features), ok: which of them exist."""
    if KIND == LAYER or KIND == BATCH:
        y = kept * tl.load(gamma_ptr + feat, mask=ok, other=0.0)
    elif KIND == AFFINE:
        center = tl.load(center_ptr + t * F + feat, mask=ok, other=0.0)
        y = (kept - center) * tl.load(scale_ptr + t * F + feat, mask=ok, other=0.0)
    else:
        y = kept
    if KIND != NONE and HAS_BETA:
        y = y + tl.load(beta_ptr + feat, mask=ok, other=0.0)
    return y


@triton.jit
def _term_forward(v, mean, rstd, t, F, feat, ok, gamma_ptr, beta_ptr, scale_ptr, center_ptr, KIND: tl.constexpr,
                  HAS_BETA: tl.constexpr):
    """(output, kept) of one term from its input v and, for LAYER and BATCH, its statistics (mean, 1/sqrt(var + eps))
    broadcast against v."""
    if KIND == LAYER or KIND == BATCH:
        kept = (v - mean) * rstd
    else:
        kept = v
    return _norm_output(kept, t, F, feat, ok, gamma_ptr, beta_ptr, scale_ptr, center_ptr, KIND, HAS_BETA), kept


@triton.jit
def _norm_backward(dy, kept, t, F, feat, ok, gamma_ptr, scale_ptr, rstd, m1, m2, KIND: tl.constexpr):
    """The gradient of a term's input from the gradient dy of its output. LAYER and BATCH, through the statistics:
    rstd (γ dy - m1 - kept m2), with m1, m2 the means of γ dy and γ dy kept over the group's active members (a row,
    or a column's active rows; padded members of a column are zeroed by the caller). AFFINE: dy scale_t."""
    if KIND == LAYER or KIND == BATCH:
        return rstd * (dy * tl.load(gamma_ptr + feat, mask=ok, other=0.0) - m1 - kept * m2)
    elif KIND == AFFINE:
        return dy * tl.load(scale_ptr + t * F + feat, mask=ok, other=0.0)
    else:
        return dy


@triton.jit
def _column_stats(x, w, count):
    """Mean and biased variance over the rows where w (BLOCK_B, 1) is 1."""
    mean = tl.sum(x * w, axis=0) / count
    diff = (x - mean[None, :]) * w
    var = tl.sum(diff * diff, axis=0) / count
    return mean, var


@triton.jit
def _column_term_forward(v, t, F, feat, ok, w, count, gamma_ptr, beta_ptr, scale_ptr, center_ptr, mean_ptr, var_ptr,
                         eps, KIND: tl.constexpr, HAS_BETA: tl.constexpr):
    """One term in the columns layout: for BATCH, its statistics over the active rows, kept in mean/var (T, F) for
    the population update and the backward; then `_term_forward`."""
    if KIND == BATCH:
        mean, var = _column_stats(v, w, count)
        tl.store(mean_ptr + t * F + feat, mean, mask=ok)
        tl.store(var_ptr + t * F + feat, var, mask=ok)
        return _term_forward(v, mean[None, :], 1.0 / tl.sqrt(var[None, :] + eps), t, F, feat, ok, gamma_ptr,
                             beta_ptr, scale_ptr, center_ptr, KIND, HAS_BETA)
    return _term_forward(v, 0.0, 1.0, t, F, feat, ok, gamma_ptr, beta_ptr, scale_ptr, center_ptr, KIND, HAS_BETA)


@triton.jit
def _column_term_backward(dy, kept, t, F, feat, ok, w, count, gamma_ptr, scale_ptr, var_ptr, eps,
                          KIND: tl.constexpr):
    """`_norm_backward` of one term in the columns layout, its group means over the active rows of each column."""
    if KIND == BATCH:
        rstd = 1.0 / tl.sqrt(tl.load(var_ptr + t * F + feat, mask=ok, other=0.0) + eps)
        gdy = dy * tl.load(gamma_ptr + feat, mask=ok, other=0.0)[None, :]
        m1 = tl.sum(gdy * w, axis=0) / count
        m2 = tl.sum(gdy * kept * w, axis=0) / count
        return w * _norm_backward(dy, kept, t, F, feat, ok, gamma_ptr, scale_ptr, rstd[None, :], m1[None, :],
                                  m2[None, :], KIND)
    return _norm_backward(dy, kept, t, F, feat, ok, gamma_ptr, scale_ptr, 1.0, 0.0, 0.0, KIND)


@triton.jit
def _column_gate_forward(
    k, t, B, H, r_ptr, x_ptr, gates_ptr, rs_ptr, gamma_ptr, beta_ptr, scale_ptr, center_ptr, mean_ptr, var_ptr, eps,
    rows, cols, tile_ok, col_ok, w, count, KIND: tl.constexpr, HAS_BETA: tl.constexpr,
):
    G = 4 * H
    feat = k * H + cols
    offs = rows[:, None] * G + feat[None, :]
    step = t * B * G
    r = tl.load(r_ptr + offs, mask=tile_ok, other=0.0)
    term, kept = _column_term_forward(r, t, G, feat, col_ok, w, count, gamma_ptr, beta_ptr, scale_ptr, center_ptr,
                                      mean_ptr, var_ptr, eps, KIND, HAS_BETA)
    if KIND != NONE:
        tl.store(rs_ptr + step + offs, kept, mask=tile_ok)
    pre = tl.load(x_ptr + step + offs, mask=tile_ok, other=0.0) + term
    tl.store(gates_ptr + step + offs, pre, mask=tile_ok)
    return pre


@triton.jit(do_not_specialize=["t"])
def lstm_step_forward_columns(
    t, B, H,
    r_ptr, x_ptr, h_ptr, c_ptr, out_ptr, gates_ptr, rs_ptr, cs_ptr, mask_ptr,
    gr_ptr, br_ptr, sr_ptr, mr_ptr, rmean_ptr, rvar_ptr,
    gc_ptr, bc_ptr, sc_ptr, mc_ptr, cmean_ptr, cvar_ptr, eps_ptr,
    KR: tl.constexpr, KC: tl.constexpr, HAS_BETA_R: tl.constexpr, HAS_BETA_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One forward timestep; program p owns hidden units [p * BLOCK_H, (p + 1) * BLOCK_H) of every gate and row.

    Reads r (B, 4H), x[t], h[t], c[t], mask[t]; writes h[t + 1], c[t + 1], out[t], and for the backward gates[t]
    (pre-activations), rs[t] (r as `_term_forward` keeps it), cs[t] (c_new as kept), and the batch statistics (T, F)
    of BATCH terms. g, b, s, m: a term's γ, β, and for AFFINE its per-timestep scale and mean (`norm.loop_term`).
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    col_ok = cols < H
    tile_ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(mask_ptr + t * B + rows, mask=row_ok, other=0.0)[:, None]
    count = tl.maximum(tl.sum(w, axis=0), 1.0)
    eps_r = tl.load(eps_ptr)
    eps_c = tl.load(eps_ptr + 1)
    args = (t, B, H, r_ptr, x_ptr, gates_ptr, rs_ptr, gr_ptr, br_ptr, sr_ptr, mr_ptr, rmean_ptr, rvar_ptr, eps_r,
            rows, cols, tile_ok, col_ok, w, count)
    gate_i = _sigmoid(_column_gate_forward(0, *args, KR, HAS_BETA_R))
    gate_f = _sigmoid(_column_gate_forward(1, *args, KR, HAS_BETA_R))
    gate_g = _tanh(_column_gate_forward(2, *args, KR, HAS_BETA_R))
    gate_o = _sigmoid(_column_gate_forward(3, *args, KR, HAS_BETA_R))
    hoffs = rows[:, None] * H + cols[None, :]
    state = t * B * H
    c_prev = tl.load(c_ptr + state + hoffs, mask=tile_ok, other=0.0)
    c_new = gate_f * c_prev + gate_i * gate_g
    cell, kept = _column_term_forward(c_new, t, H, cols, col_ok, w, count, gc_ptr, bc_ptr, sc_ptr, mc_ptr, cmean_ptr,
                                      cvar_ptr, eps_c, KC, HAS_BETA_C)
    tl.store(cs_ptr + state + hoffs, kept, mask=tile_ok)
    h_new = gate_o * _tanh(cell)
    active = w > 0
    h_prev = tl.load(h_ptr + state + hoffs, mask=tile_ok, other=0.0)
    tl.store(h_ptr + state + B * H + hoffs, tl.where(active, h_new, h_prev), mask=tile_ok)
    tl.store(c_ptr + state + B * H + hoffs, tl.where(active, c_new, c_prev), mask=tile_ok)
    tl.store(out_ptr + state + hoffs, h_new * w, mask=tile_ok)


@triton.jit
def _column_gate_backward(
    k, d_pre, t, B, H, dgates_ptr, dr_ptr, rs_ptr, gamma_ptr, scale_ptr, var_ptr, eps, rows, cols, tile_ok, col_ok,
    w, count, KIND: tl.constexpr,
):
    G = 4 * H
    feat = k * H + cols
    offs = t * B * G + rows[:, None] * G + feat[None, :]
    tl.store(dgates_ptr + offs, d_pre, mask=tile_ok)
    if KIND == BATCH:
        rhat = tl.load(rs_ptr + offs, mask=tile_ok, other=0.0)
    else:
        rhat = d_pre  # not read
    d_r = _column_term_backward(d_pre, rhat, t, G, feat, col_ok, w, count, gamma_ptr, scale_ptr, var_ptr, eps, KIND)
    tl.store(dr_ptr + offs, d_r, mask=tile_ok)


@triton.jit(do_not_specialize=["t"])
def lstm_step_backward_columns(
    t, B, H,
    dh_ptr, dout_ptr, dc_in_ptr, dc_out_ptr, keep_ptr,
    gates_ptr, rs_ptr, cs_ptr, c_ptr, mask_ptr, dgates_ptr, dr_ptr, dyc_ptr,
    gr_ptr, sr_ptr, rvar_ptr, gc_ptr, bc_ptr, sc_ptr, mc_ptr, cvar_ptr, eps_ptr,
    KR: tl.constexpr, KC: tl.constexpr, HAS_BETA_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One backward timestep in the columns layout.

    Reads dh (B, H): the gradient reaching h[t + 1] as a carried state; dout[t]; dc_in: the gradient reaching
    c[t + 1]. Writes dgates[t] (the gradient of the input term), dr[t] (of r = W_h h[t]), dyc[t] (of N_c(c_new)),
    dc_out (of c[t]) and keep = the part of dh that passes to h[t] around the step (padded rows); the caller adds
    dr[t] @ W_h to keep.
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    col_ok = cols < H
    tile_ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(mask_ptr + t * B + rows, mask=row_ok, other=0.0)[:, None]
    count = tl.maximum(tl.sum(w, axis=0), 1.0)
    eps_r = tl.load(eps_ptr)
    eps_c = tl.load(eps_ptr + 1)
    hoffs = rows[:, None] * H + cols[None, :]
    state = t * B * H
    dh_state = tl.load(dh_ptr + hoffs, mask=tile_ok, other=0.0)
    dh_new = w * (dh_state + tl.load(dout_ptr + state + hoffs, mask=tile_ok, other=0.0))
    tl.store(keep_ptr + hoffs, (1.0 - w) * dh_state, mask=tile_ok)
    dc_state = tl.load(dc_in_ptr + hoffs, mask=tile_ok, other=0.0)
    G = 4 * H
    goffs = t * B * G + rows[:, None] * G + cols[None, :]
    gate_i = _sigmoid(tl.load(gates_ptr + goffs, mask=tile_ok, other=0.0))
    gate_f = _sigmoid(tl.load(gates_ptr + goffs + H, mask=tile_ok, other=0.0))
    gate_g = _tanh(tl.load(gates_ptr + goffs + 2 * H, mask=tile_ok, other=0.0))
    gate_o = _sigmoid(tl.load(gates_ptr + goffs + 3 * H, mask=tile_ok, other=0.0))
    cs = tl.load(cs_ptr + state + hoffs, mask=tile_ok, other=0.0)
    tanh_cell = _tanh(_norm_output(cs, t, H, cols, col_ok, gc_ptr, bc_ptr, sc_ptr, mc_ptr, KC, HAS_BETA_C))
    d_cell = dh_new * gate_o * (1.0 - tanh_cell * tanh_cell)
    tl.store(dyc_ptr + state + hoffs, d_cell, mask=tile_ok)
    d_c = _column_term_backward(d_cell, cs, t, H, cols, col_ok, w, count, gc_ptr, sc_ptr, cvar_ptr, eps_c, KC)
    d_c = d_c + w * dc_state
    c_prev = tl.load(c_ptr + state + hoffs, mask=tile_ok, other=0.0)
    tl.store(dc_out_ptr + hoffs, d_c * gate_f + (1.0 - w) * dc_state, mask=tile_ok)
    args = (t, B, H, dgates_ptr, dr_ptr, rs_ptr, gr_ptr, sr_ptr, rvar_ptr, eps_r, rows, cols, tile_ok, col_ok, w,
            count)
    _column_gate_backward(0, d_c * gate_g * gate_i * (1.0 - gate_i), *args, KR)
    _column_gate_backward(1, d_c * c_prev * gate_f * (1.0 - gate_f), *args, KR)
    _column_gate_backward(2, d_c * gate_i * (1.0 - gate_g * gate_g), *args, KR)
    _column_gate_backward(3, dh_new * tanh_cell * gate_o * (1.0 - gate_o), *args, KR)


@triton.jit
def _row_stats(ptr, n: tl.constexpr, lane, BLOCK: tl.constexpr):
    """Mean and biased variance of ptr[0:n], two passes (the one-pass E[x^2] - mean^2 cancels in float32)."""
    acc = tl.zeros([BLOCK], dtype=ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        acc += tl.load(ptr + start + lane, mask=start + lane < n, other=0.0)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK], dtype=ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        ok = start + lane < n
        diff = tl.where(ok, tl.load(ptr + start + lane, mask=ok, other=0.0) - mean, 0.0)
        acc += diff * diff
    return mean, tl.sum(acc, axis=0) / n


@triton.jit
def _row_layer_stats(ptr, n: tl.constexpr, lane, i, mean_ptr, var_ptr, eps, BLOCK: tl.constexpr):
    """Layer norm's statistics of row i (of T x B) of a term, its n features at ptr: kept in mean/var (T, B) for the
    backward; returns mean and 1/sqrt(var + eps)."""
    mean, var = _row_stats(ptr, n, lane, BLOCK)
    tl.store(mean_ptr + i, mean)
    tl.store(var_ptr + i, var)
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _row_gate_forward(
    k, t, b, B, H, j, ok, r_ptr, x_ptr, gates_ptr, rs_ptr, gamma_ptr, beta_ptr, scale_ptr, center_ptr, mean, rstd,
    KIND: tl.constexpr, HAS_BETA: tl.constexpr,
):
    G = 4 * H
    feat = k * H + j
    r = tl.load(r_ptr + b * G + feat, mask=ok, other=0.0)
    offs = t * B * G + b * G + feat
    term, kept = _term_forward(r, mean, rstd, t, G, feat, ok, gamma_ptr, beta_ptr, scale_ptr, center_ptr, KIND,
                               HAS_BETA)
    if KIND != NONE:
        tl.store(rs_ptr + offs, kept, mask=ok)
    pre = tl.load(x_ptr + offs, mask=ok, other=0.0) + term
    tl.store(gates_ptr + offs, pre, mask=ok)
    return pre


@triton.jit(do_not_specialize=["t"])
def lstm_step_forward_rows(
    t, B, H: tl.constexpr,
    r_ptr, x_ptr, h_ptr, c_ptr, out_ptr, gates_ptr, rs_ptr, cs_ptr, mask_ptr,
    gr_ptr, br_ptr, sr_ptr, mr_ptr, rmean_ptr, rvar_ptr,
    gc_ptr, bc_ptr, sc_ptr, mc_ptr, cmean_ptr, cvar_ptr, eps_ptr,
    KR: tl.constexpr, KC: tl.constexpr, HAS_BETA_R: tl.constexpr, HAS_BETA_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One forward timestep; program b owns batch row b and loops over the hidden units in blocks of BLOCK_H.

    Same arguments and outputs as `lstm_step_forward_columns`; the statistics of LAYER terms are per row, (T, B).
    """
    b = tl.program_id(0)
    G: tl.constexpr = 4 * H  # a constant loop bound (module docstring)
    lane = tl.arange(0, BLOCK_H)
    a = tl.load(mask_ptr + t * B + b)
    eps_r = tl.load(eps_ptr)
    eps_c = tl.load(eps_ptr + 1)
    if KR == LAYER:
        mean_r, rstd_r = _row_layer_stats(r_ptr + b * G, G, lane, t * B + b, rmean_ptr, rvar_ptr, eps_r, BLOCK_H)
    else:
        mean_r = 0.0
        rstd_r = 1.0
    state = t * B * H + b * H
    for start in range(0, H, BLOCK_H):
        j = start + lane
        ok = j < H
        args = (t, b, B, H, j, ok, r_ptr, x_ptr, gates_ptr, rs_ptr, gr_ptr, br_ptr, sr_ptr, mr_ptr, mean_r, rstd_r)
        gate_i = _sigmoid(_row_gate_forward(0, *args, KR, HAS_BETA_R))
        gate_f = _sigmoid(_row_gate_forward(1, *args, KR, HAS_BETA_R))
        gate_g = _tanh(_row_gate_forward(2, *args, KR, HAS_BETA_R))
        gate_o = _sigmoid(_row_gate_forward(3, *args, KR, HAS_BETA_R))
        c_prev = tl.load(c_ptr + state + j, mask=ok, other=0.0)
        c_new = gate_f * c_prev + gate_i * gate_g
        tl.store(c_ptr + state + B * H + j, tl.where(a > 0, c_new, c_prev), mask=ok)
        if KC != LAYER:
            cell, kept = _term_forward(c_new, 0.0, 1.0, t, H, j, ok, gc_ptr, bc_ptr, sc_ptr, mc_ptr, KC, HAS_BETA_C)
            tl.store(cs_ptr + state + j, kept, mask=ok)
            h_new = gate_o * _tanh(cell)
            h_prev = tl.load(h_ptr + state + j, mask=ok, other=0.0)
            tl.store(h_ptr + state + B * H + j, tl.where(a > 0, h_new, h_prev), mask=ok)
            tl.store(out_ptr + state + j, h_new * a, mask=ok)
    if KC == LAYER:
        # The row's c_new is in c[t + 1] (or c[t] carried where the row is padded: its outputs are discarded).
        tl.debug_barrier()
        mean_c, rstd_c = _row_layer_stats(c_ptr + state + B * H, H, lane, t * B + b, cmean_ptr, cvar_ptr, eps_c,
                                          BLOCK_H)
        for start in range(0, H, BLOCK_H):
            j = start + lane
            ok = j < H
            c_new = tl.load(c_ptr + state + B * H + j, mask=ok, other=0.0)
            cell, kept = _term_forward(c_new, mean_c, rstd_c, t, H, j, ok, gc_ptr, bc_ptr, sc_ptr, mc_ptr, KC,
                                       HAS_BETA_C)
            tl.store(cs_ptr + state + j, kept, mask=ok)
            gate_o = _sigmoid(tl.load(gates_ptr + t * B * G + b * G + 3 * H + j, mask=ok, other=0.0))
            h_new = gate_o * _tanh(cell)
            h_prev = tl.load(h_ptr + state + j, mask=ok, other=0.0)
            tl.store(h_ptr + state + B * H + j, tl.where(a > 0, h_new, h_prev), mask=ok)
            tl.store(out_ptr + state + j, h_new * a, mask=ok)


@triton.jit
def _row_cell_gradient(
    t, b, B, H, j, ok, a, dh_ptr, dout_ptr, gates_ptr, cs_ptr, gc_ptr, bc_ptr, sc_ptr, mc_ptr,
    KC: tl.constexpr, HAS_BETA_C: tl.constexpr,
):
    """dh_new, σ(o), tanh(N_c(c_new)), c_new as kept, and the gradient of N_c(c_new) for hidden units j of row b."""
    G = 4 * H
    state = t * B * H + b * H
    dh_new = a * (tl.load(dh_ptr + b * H + j, mask=ok, other=0.0) + tl.load(dout_ptr + state + j, mask=ok, other=0.0))
    gate_o = _sigmoid(tl.load(gates_ptr + t * B * G + b * G + 3 * H + j, mask=ok, other=0.0))
    cs = tl.load(cs_ptr + state + j, mask=ok, other=0.0)
    tanh_cell = _tanh(_norm_output(cs, t, H, j, ok, gc_ptr, bc_ptr, sc_ptr, mc_ptr, KC, HAS_BETA_C))
    return dh_new, gate_o, tanh_cell, cs, dh_new * gate_o * (1.0 - tanh_cell * tanh_cell)


@triton.jit(do_not_specialize=["t"])
def lstm_step_backward_rows(
    t, B, H: tl.constexpr,
    dh_ptr, dout_ptr, dc_in_ptr, dc_out_ptr, keep_ptr,
    gates_ptr, rs_ptr, cs_ptr, c_ptr, mask_ptr, dgates_ptr, dr_ptr, dyc_ptr,
    gr_ptr, sr_ptr, rvar_ptr, gc_ptr, bc_ptr, sc_ptr, mc_ptr, cvar_ptr, eps_ptr,
    KR: tl.constexpr, KC: tl.constexpr, HAS_BETA_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One backward timestep in the rows layout; same arguments and outputs as `lstm_step_backward_columns`."""
    b = tl.program_id(0)
    G: tl.constexpr = 4 * H  # a constant loop bound (module docstring)
    lane = tl.arange(0, BLOCK_H)
    a = tl.load(mask_ptr + t * B + b)
    eps_r = tl.load(eps_ptr)
    eps_c = tl.load(eps_ptr + 1)
    state = t * B * H + b * H
    cell_args = (dh_ptr, dout_ptr, gates_ptr, cs_ptr, gc_ptr, bc_ptr, sc_ptr, mc_ptr)
    if KC == LAYER:
        # Layer norm of the cell: the row means of γ dy and γ dy ĉ first.
        rstd_c = 1.0 / tl.sqrt(tl.load(cvar_ptr + t * B + b) + eps_c)
        acc1 = tl.zeros([BLOCK_H], dtype=gates_ptr.dtype.element_ty)
        acc2 = tl.zeros([BLOCK_H], dtype=gates_ptr.dtype.element_ty)
        for start in range(0, H, BLOCK_H):
            j = start + lane
            ok = j < H
            _, _, _, chat, d_cell = _row_cell_gradient(t, b, B, H, j, ok, a, *cell_args, KC, HAS_BETA_C)
            gdy = d_cell * tl.load(gc_ptr + j, mask=ok, other=0.0)
            acc1 += gdy
            acc2 += gdy * chat
        m1_c = tl.sum(acc1, axis=0) / H
        m2_c = tl.sum(acc2, axis=0) / H
    else:
        rstd_c = 1.0
        m1_c = 0.0
        m2_c = 0.0
    acc1 = tl.zeros([BLOCK_H], dtype=gates_ptr.dtype.element_ty)
    acc2 = tl.zeros([BLOCK_H], dtype=gates_ptr.dtype.element_ty)
    for start in range(0, H, BLOCK_H):
        j = start + lane
        ok = j < H
        dh_new, gate_o, tanh_cell, cs, d_cell = _row_cell_gradient(t, b, B, H, j, ok, a, *cell_args, KC, HAS_BETA_C)
        tl.store(dyc_ptr + state + j, d_cell, mask=ok)
        dh_state = tl.load(dh_ptr + b * H + j, mask=ok, other=0.0)
        tl.store(keep_ptr + b * H + j, (1.0 - a) * dh_state, mask=ok)
        d_c = _norm_backward(d_cell, cs, t, H, j, ok, gc_ptr, sc_ptr, rstd_c, m1_c, m2_c, KC)
        dc_state = tl.load(dc_in_ptr + b * H + j, mask=ok, other=0.0)
        d_c = a * (d_c + dc_state)
        goffs = t * B * G + b * G + j
        gate_i = _sigmoid(tl.load(gates_ptr + goffs, mask=ok, other=0.0))
        gate_f = _sigmoid(tl.load(gates_ptr + goffs + H, mask=ok, other=0.0))
        gate_g = _tanh(tl.load(gates_ptr + goffs + 2 * H, mask=ok, other=0.0))
        c_prev = tl.load(c_ptr + state + j, mask=ok, other=0.0)
        tl.store(dc_out_ptr + b * H + j, d_c * gate_f + (1.0 - a) * dc_state, mask=ok)
        for k in tl.static_range(4):
            if k == 0:
                d_pre = d_c * gate_g * gate_i * (1.0 - gate_i)
            elif k == 1:
                d_pre = d_c * c_prev * gate_f * (1.0 - gate_f)
            elif k == 2:
                d_pre = d_c * gate_i * (1.0 - gate_g * gate_g)
            else:
                d_pre = dh_new * tanh_cell * gate_o * (1.0 - gate_o)
            tl.store(dgates_ptr + goffs + k * H, d_pre, mask=ok)
            if KR == LAYER:
                # Its group is the whole row of 4H: the means first, the gradient in a second pass below.
                gdy = d_pre * tl.load(gr_ptr + k * H + j, mask=ok, other=0.0)
                acc1 += gdy
                acc2 += gdy * tl.load(rs_ptr + goffs + k * H, mask=ok, other=0.0)
            else:
                d_r = _norm_backward(d_pre, d_pre, t, G, k * H + j, ok, gr_ptr, sr_ptr, 1.0, 0.0, 0.0, KR)
                tl.store(dr_ptr + goffs + k * H, d_r, mask=ok)
    if KR == LAYER:
        tl.debug_barrier()
        rstd_r = 1.0 / tl.sqrt(tl.load(rvar_ptr + t * B + b) + eps_r)
        m1_r = tl.sum(acc1, axis=0) / G
        m2_r = tl.sum(acc2, axis=0) / G
        row = t * B * G + b * G
        for start in range(0, G, BLOCK_H):
            j = start + lane
            ok = j < G
            d_pre = tl.load(dgates_ptr + row + j, mask=ok, other=0.0)
            rhat = tl.load(rs_ptr + row + j, mask=ok, other=0.0)
            tl.store(dr_ptr + row + j, _norm_backward(d_pre, rhat, t, G, j, ok, gr_ptr, sr_ptr, rstd_r, m1_r, m2_r,
                                                      KR), mask=ok)
