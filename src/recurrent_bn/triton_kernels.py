"""Triton kernels of one LSTM timestep, forward and backward, with the recurrent and cell normalizations fused in.

Imported only by `triton_lstm.py`, and only when the Triton path runs (importing triton costs about a second).
What each kernel computes is defined by the reference loop (`recurrence.lstm`); `triton_lstm.py` holds the loop over
time, the matrix products (cuBLAS) and the autograd function.

Per timestep t, with r = W_h h_{t-1} (B, 4H) already computed by one matrix product:
  gates = x_t + N_r(r);  c_new = σ(f) c + σ(i) tanh(g);  h_new = σ(o) tanh(N_c(c_new));
  carried states where(active, new, old), output h_new * active.
Term kinds (the same numbers as `triton_lstm.NONE, BATCH, AFFINE, LAYER`): 0 none, 1 batch statistics of the active
rows of this step, 2 a per-timestep affine map `(x - mean_t) * scale_t + β` (evaluation with population statistics,
or the baseline's cell shift; never folded into `x * scale + shift`, which cancels when |mean| >> std), 3 layer norm
per row.

Two layouts, so that every statistic stays inside one program:
  - "columns" (kinds 0, 1, 2): a program owns BLOCK_H hidden units of all four gates and the whole batch, so the
    batch statistics of its features are reductions inside the program;
  - "rows" (kinds 0, 2, 3): a program owns one batch row and loops over the hidden units, so a layer norm's
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


@triton.jit
def _column_stats(x, w, count):
    """Mean and biased variance over the rows where w (BLOCK_B, 1) is 1."""
    mean = tl.sum(x * w, axis=0) / count
    diff = (x - mean[None, :]) * w
    var = tl.sum(diff * diff, axis=0) / count
    return mean, var


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
    if KIND == 1:
        mean, var = _column_stats(r, w, count)
        tl.store(mean_ptr + t * G + feat, mean, mask=col_ok)
        tl.store(var_ptr + t * G + feat, var, mask=col_ok)
        rhat = (r - mean[None, :]) / tl.sqrt(var[None, :] + eps)
        tl.store(rs_ptr + step + offs, rhat, mask=tile_ok)
        term = rhat * tl.load(gamma_ptr + feat, mask=col_ok, other=0.0)[None, :]
        if HAS_BETA:
            term = term + tl.load(beta_ptr + feat, mask=col_ok, other=0.0)[None, :]
    elif KIND == 2:
        tl.store(rs_ptr + step + offs, r, mask=tile_ok)
        scale = tl.load(scale_ptr + t * G + feat, mask=col_ok, other=0.0)
        term = (r - tl.load(center_ptr + t * G + feat, mask=col_ok, other=0.0)[None, :]) * scale[None, :]
        if HAS_BETA:
            term = term + tl.load(beta_ptr + feat, mask=col_ok, other=0.0)[None, :]
    else:
        term = r
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
    (pre-activations), rs[t] (r normalized without γ, or r for kind 2), cs[t] (c_new normalized without γ, or
    c_new), and the batch statistics (T, F) of kind-1 terms. g, b, s, m: a term's γ, β, and for kind 2 its
    per-timestep scale and mean (`norm.loop_term`).
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
    if KC == 1:
        mean, var = _column_stats(c_new, w, count)
        tl.store(cmean_ptr + t * H + cols, mean, mask=col_ok)
        tl.store(cvar_ptr + t * H + cols, var, mask=col_ok)
        chat = (c_new - mean[None, :]) / tl.sqrt(var[None, :] + eps_c)
        tl.store(cs_ptr + state + hoffs, chat, mask=tile_ok)
        cell = chat * tl.load(gc_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BETA_C:
            cell = cell + tl.load(bc_ptr + cols, mask=col_ok, other=0.0)[None, :]
    elif KC == 2:
        tl.store(cs_ptr + state + hoffs, c_new, mask=tile_ok)
        scale = tl.load(sc_ptr + t * H + cols, mask=col_ok, other=0.0)
        cell = (c_new - tl.load(mc_ptr + t * H + cols, mask=col_ok, other=0.0)[None, :]) * scale[None, :]
        if HAS_BETA_C:
            cell = cell + tl.load(bc_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        tl.store(cs_ptr + state + hoffs, c_new, mask=tile_ok)
        cell = c_new
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
    if KIND == 1:
        # Through the batch statistics: dr = γ/σ (dy - mean(dy) - r̂ mean(dy r̂)) over the active rows.
        rhat = tl.load(rs_ptr + offs, mask=tile_ok, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.load(var_ptr + t * G + feat, mask=col_ok, other=0.0) + eps)
        gdy = d_pre * tl.load(gamma_ptr + feat, mask=col_ok, other=0.0)[None, :]
        m1 = tl.sum(gdy * w, axis=0) / count
        m2 = tl.sum(gdy * rhat * w, axis=0) / count
        d_r = w * rstd[None, :] * (gdy - m1[None, :] - rhat * m2[None, :])
    elif KIND == 2:
        d_r = d_pre * tl.load(scale_ptr + t * G + feat, mask=col_ok, other=0.0)[None, :]
    else:
        d_r = d_pre
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
    if KC == 1:
        gamma_c = tl.load(gc_ptr + cols, mask=col_ok, other=0.0)[None, :]
        cell = cs * gamma_c
        if HAS_BETA_C:
            cell = cell + tl.load(bc_ptr + cols, mask=col_ok, other=0.0)[None, :]
    elif KC == 2:
        scale_c = tl.load(sc_ptr + t * H + cols, mask=col_ok, other=0.0)[None, :]
        cell = (cs - tl.load(mc_ptr + t * H + cols, mask=col_ok, other=0.0)[None, :]) * scale_c
        if HAS_BETA_C:
            cell = cell + tl.load(bc_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        cell = cs
    tanh_cell = _tanh(cell)
    d_cell = dh_new * gate_o * (1.0 - tanh_cell * tanh_cell)
    tl.store(dyc_ptr + state + hoffs, d_cell, mask=tile_ok)
    if KC == 1:
        rstd_c = 1.0 / tl.sqrt(tl.load(cvar_ptr + t * H + cols, mask=col_ok, other=0.0) + eps_c)
        gdy = d_cell * gamma_c
        m1 = tl.sum(gdy * w, axis=0) / count
        m2 = tl.sum(gdy * cs * w, axis=0) / count
        d_c = w * rstd_c[None, :] * (gdy - m1[None, :] - cs * m2[None, :])
    elif KC == 2:
        d_c = d_cell * scale_c
    else:
        d_c = d_cell
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
def _row_gate_forward(
    k, t, b, B, H, j, ok, r_ptr, x_ptr, gates_ptr, rs_ptr, gamma_ptr, beta_ptr, scale_ptr, center_ptr, mean, rstd,
    KIND: tl.constexpr, HAS_BETA: tl.constexpr,
):
    G = 4 * H
    feat = k * H + j
    r = tl.load(r_ptr + b * G + feat, mask=ok, other=0.0)
    offs = t * B * G + b * G + feat
    if KIND == 3:
        rhat = (r - mean) * rstd
        tl.store(rs_ptr + offs, rhat, mask=ok)
        term = rhat * tl.load(gamma_ptr + feat, mask=ok, other=0.0)
        if HAS_BETA:
            term = term + tl.load(beta_ptr + feat, mask=ok, other=0.0)
    elif KIND == 2:
        tl.store(rs_ptr + offs, r, mask=ok)
        term = (r - tl.load(center_ptr + t * G + feat, mask=ok, other=0.0)) * tl.load(scale_ptr + t * G + feat,
                                                                                      mask=ok, other=0.0)
        if HAS_BETA:
            term = term + tl.load(beta_ptr + feat, mask=ok, other=0.0)
    else:
        term = r
    pre = tl.load(x_ptr + offs, mask=ok, other=0.0) + term
    tl.store(gates_ptr + offs, pre, mask=ok)
    return pre


@triton.jit
def _row_stats(ptr, n, lane, BLOCK: tl.constexpr):
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


@triton.jit(do_not_specialize=["t"])
def lstm_step_forward_rows(
    t, B, H,
    r_ptr, x_ptr, h_ptr, c_ptr, out_ptr, gates_ptr, rs_ptr, cs_ptr, mask_ptr,
    gr_ptr, br_ptr, sr_ptr, mr_ptr, rmean_ptr, rvar_ptr,
    gc_ptr, bc_ptr, sc_ptr, mc_ptr, cmean_ptr, cvar_ptr, eps_ptr,
    KR: tl.constexpr, KC: tl.constexpr, HAS_BETA_R: tl.constexpr, HAS_BETA_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One forward timestep; program b owns batch row b and loops over the hidden units in blocks of BLOCK_H.

    Same arguments and outputs as `lstm_step_forward_columns`; the statistics of kind-3 terms are per row, (T, B).
    """
    b = tl.program_id(0)
    G = 4 * H
    lane = tl.arange(0, BLOCK_H)
    a = tl.load(mask_ptr + t * B + b)
    eps_r = tl.load(eps_ptr)
    eps_c = tl.load(eps_ptr + 1)
    if KR == 3:
        mean_r, var_r = _row_stats(r_ptr + b * G, G, lane, BLOCK_H)
        tl.store(rmean_ptr + t * B + b, mean_r)
        tl.store(rvar_ptr + t * B + b, var_r)
        rstd_r = 1.0 / tl.sqrt(var_r + eps_r)
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
        if KC != 3:
            tl.store(cs_ptr + state + j, c_new, mask=ok)
            if KC == 2:
                cell = (c_new - tl.load(mc_ptr + t * H + j, mask=ok, other=0.0)) * tl.load(sc_ptr + t * H + j, mask=ok,
                                                                                           other=0.0)
                if HAS_BETA_C:
                    cell = cell + tl.load(bc_ptr + j, mask=ok, other=0.0)
            else:
                cell = c_new
            h_new = gate_o * _tanh(cell)
            h_prev = tl.load(h_ptr + state + j, mask=ok, other=0.0)
            tl.store(h_ptr + state + B * H + j, tl.where(a > 0, h_new, h_prev), mask=ok)
            tl.store(out_ptr + state + j, h_new * a, mask=ok)
    if KC == 3:
        # The row's c_new is in c[t + 1] (or c[t] carried where the row is padded: its outputs are discarded).
        tl.debug_barrier()
        mean_c, var_c = _row_stats(c_ptr + state + B * H, H, lane, BLOCK_H)
        tl.store(cmean_ptr + t * B + b, mean_c)
        tl.store(cvar_ptr + t * B + b, var_c)
        rstd_c = 1.0 / tl.sqrt(var_c + eps_c)
        for start in range(0, H, BLOCK_H):
            j = start + lane
            ok = j < H
            chat = (tl.load(c_ptr + state + B * H + j, mask=ok, other=0.0) - mean_c) * rstd_c
            tl.store(cs_ptr + state + j, chat, mask=ok)
            cell = chat * tl.load(gc_ptr + j, mask=ok, other=0.0)
            if HAS_BETA_C:
                cell = cell + tl.load(bc_ptr + j, mask=ok, other=0.0)
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
    """dh_new, σ(o), tanh(N_c(c_new)) and the gradient of N_c(c_new) for hidden units j of row b."""
    G = 4 * H
    state = t * B * H + b * H
    dh_new = a * (tl.load(dh_ptr + b * H + j, mask=ok, other=0.0) + tl.load(dout_ptr + state + j, mask=ok, other=0.0))
    gate_o = _sigmoid(tl.load(gates_ptr + t * B * G + b * G + 3 * H + j, mask=ok, other=0.0))
    cs = tl.load(cs_ptr + state + j, mask=ok, other=0.0)
    if KC == 3:
        cell = cs * tl.load(gc_ptr + j, mask=ok, other=0.0)
        if HAS_BETA_C:
            cell = cell + tl.load(bc_ptr + j, mask=ok, other=0.0)
    elif KC == 2:
        cell = (cs - tl.load(mc_ptr + t * H + j, mask=ok, other=0.0)) * tl.load(sc_ptr + t * H + j, mask=ok, other=0.0)
        if HAS_BETA_C:
            cell = cell + tl.load(bc_ptr + j, mask=ok, other=0.0)
    else:
        cell = cs
    tanh_cell = _tanh(cell)
    return dh_new, gate_o, tanh_cell, cs, dh_new * gate_o * (1.0 - tanh_cell * tanh_cell)


@triton.jit(do_not_specialize=["t"])
def lstm_step_backward_rows(
    t, B, H,
    dh_ptr, dout_ptr, dc_in_ptr, dc_out_ptr, keep_ptr,
    gates_ptr, rs_ptr, cs_ptr, c_ptr, mask_ptr, dgates_ptr, dr_ptr, dyc_ptr,
    gr_ptr, sr_ptr, rvar_ptr, gc_ptr, bc_ptr, sc_ptr, mc_ptr, cvar_ptr, eps_ptr,
    KR: tl.constexpr, KC: tl.constexpr, HAS_BETA_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One backward timestep in the rows layout; same arguments and outputs as `lstm_step_backward_columns`."""
    b = tl.program_id(0)
    G = 4 * H
    lane = tl.arange(0, BLOCK_H)
    a = tl.load(mask_ptr + t * B + b)
    eps_r = tl.load(eps_ptr)
    eps_c = tl.load(eps_ptr + 1)
    state = t * B * H + b * H
    cell_args = (dh_ptr, dout_ptr, gates_ptr, cs_ptr, gc_ptr, bc_ptr, sc_ptr, mc_ptr)
    if KC == 3:
        # Layer norm of the cell: the row sums of γ dy and γ dy ĉ first.
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
        if KC == 3:
            d_c = rstd_c * (d_cell * tl.load(gc_ptr + j, mask=ok, other=0.0) - m1_c - cs * m2_c)
        elif KC == 2:
            d_c = d_cell * tl.load(sc_ptr + t * H + j, mask=ok, other=0.0)
        else:
            d_c = d_cell
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
            if KR == 3:
                gdy = d_pre * tl.load(gr_ptr + k * H + j, mask=ok, other=0.0)
                acc1 += gdy
                acc2 += gdy * tl.load(rs_ptr + goffs + k * H, mask=ok, other=0.0)
            elif KR == 2:
                tl.store(dr_ptr + goffs + k * H, d_pre * tl.load(sr_ptr + t * G + k * H + j, mask=ok, other=0.0),
                         mask=ok)
            else:
                tl.store(dr_ptr + goffs + k * H, d_pre, mask=ok)
    if KR == 3:
        # Layer norm of the recurrent term: dr = rstd (γ dy - mean(γ dy) - r̂ mean(γ dy r̂)) over the row's 4H.
        tl.debug_barrier()
        rstd_r = 1.0 / tl.sqrt(tl.load(rvar_ptr + t * B + b) + eps_r)
        m1_r = tl.sum(acc1, axis=0) / G
        m2_r = tl.sum(acc2, axis=0) / G
        row = t * B * G + b * G
        for start in range(0, G, BLOCK_H):
            j = start + lane
            ok = j < G
            gdy = tl.load(dgates_ptr + row + j, mask=ok, other=0.0) * tl.load(gr_ptr + j, mask=ok, other=0.0)
            rhat = tl.load(rs_ptr + row + j, mask=ok, other=0.0)
            tl.store(dr_ptr + row + j, rstd_r * (gdy - m1_r - rhat * m2_r), mask=ok)
