"""The layers against the mathematics: torch.nn parity, naive transcriptions of the papers' equations, gradcheck,
invariances, population statistics, padding and the failure modes of earlier implementations.

Every test runs on each backend the build has (`backend` fixture), so the fused kernels are held to the same
equations as the reference loops.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import recurrent_bn as rb

EPS = 1e-5

pytestmark = pytest.mark.usefixtures("float64")  # `backend` and `float64`: tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------
# Naive transcriptions of the equations, one timestep at a time, written independently of the package.


def bn(v, gamma, beta=None, stats=None):
    """Batch norm over the batch axis of v (B, F); `stats` = (mean, var) to use instead of the batch's."""
    mean, var = (v.mean(0), ((v - v.mean(0)) ** 2).mean(0)) if stats is None else stats
    out = gamma * (v - mean) / torch.sqrt(var + EPS)
    return out if beta is None else out + beta


def ln(v, gamma, beta=None):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = gamma * (v - mean) / torch.sqrt(var + EPS)
    return out if beta is None else out + beta


def naive_lstm(x, h, c, w_ih, w_hh, b, norm, gx=None, gh=None, gc=None, bc=None, pop=None):
    """LSTM, BN-LSTM (Cooijmans et al. eqs. 6-8) or LN-LSTM, step by step. pop: {term: (means, vars)} per step."""
    outputs = []
    for t in range(x.shape[0]):
        wx, wh = x[t] @ w_ih.T, h @ w_hh.T
        if norm == "bn":
            step = min(t, pop["x"][0].shape[0] - 1) if pop else None
            wx = bn(wx, gx, stats=None if pop is None else (pop["x"][0][step], pop["x"][1][step]))
            wh = bn(wh, gh, stats=None if pop is None else (pop["h"][0][step], pop["h"][1][step]))
        elif norm == "ln":
            wx, wh = ln(wx, gx), ln(wh, gh)
        i, f, g, o = (wx + wh + b).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if norm == "bn":
            cn = bn(c, gc, bc, stats=None if pop is None else (pop["c"][0][step], pop["c"][1][step]))
        elif norm == "ln":
            cn = ln(c, gc, bc)
        else:
            cn = c
        h = torch.sigmoid(o) * torch.tanh(cn)
        outputs.append(h)
    return torch.stack(outputs), h, c


def naive_rnn(x, h, w_ih, w_hh, act, norm, placement, gamma=None, beta=None, gx=None, gh=None, b=None):
    outputs = []
    normalize = bn if norm == "bn" else ln
    for t in range(x.shape[0]):
        wx, wh = x[t] @ w_ih.T, h @ w_hh.T
        if placement == "sum":
            pre = normalize(wx + wh, gamma, beta)
        else:
            pre = normalize(wx, gx) + normalize(wh, gh) + (0 if b is None else b)
        h = act(pre)
        outputs.append(h)
    return torch.stack(outputs), h


def randomize(model, seed=0):
    """Random values for every parameter (γ and β included), so no test passes because of a special init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=generator) * 0.8 + 0.2 if "norm" in name and "weight" in name
                    else torch.randn(p.shape, generator=generator) * 0.5)
    return model


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_close(a, b, tol=1e-9):
    assert torch.allclose(a, b, atol=tol, rtol=tol), float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# torch.nn parity


@pytest.mark.parametrize("num_layers,batch_first,with_hx", [(1, False, False), (2, True, True), (3, False, True)])
def test_lstm_none_matches_torch_lstm_outputs_states_and_gradients(backend, num_layers, batch_first, with_hx):
    torch.manual_seed(0)
    ours = rb.LSTM(3, 6, num_layers, batch_first=batch_first, backend=backend)
    theirs = nn.LSTM(3, 6, num_layers, batch_first=batch_first)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())  # both ways
    x = torch.randn(4, 7, 3) if batch_first else torch.randn(7, 4, 3)
    hx = (torch.randn(num_layers, 4, 6), torch.randn(num_layers, 4, 6)) if with_hx else None
    y1, (h1, c1) = ours(x, hx)
    y2, (h2, c2) = theirs(x, hx)
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        assert_close(a, b)
    weights = torch.randn_like(y1)
    loss1 = (y1 * weights).sum() + h1.sum() + 2 * c1.sum()
    loss2 = (y2 * weights).sum() + h2.sum() + 2 * c2.sum()
    for g1, g2 in zip(grads(loss1, list(ours.parameters())), grads(loss2, list(theirs.parameters())), strict=True):
        assert_close(g1, g2)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_none_matches_torch_rnn(backend, nonlinearity):
    torch.manual_seed(1)
    ours = rb.RNN(3, 6, 2, nonlinearity=nonlinearity, backend=backend)
    theirs = nn.RNN(3, 6, 2, nonlinearity=nonlinearity)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x, h0 = torch.randn(8, 5, 3), torch.randn(2, 5, 6)
    y1, h1 = ours(x, h0)
    y2, h2 = theirs(x, h0)
    assert_close(y1, y2)
    assert_close(h1, h2)
    loss1, loss2 = (y1**2).sum() + h1.sum(), (y2**2).sum() + h2.sum()
    for g1, g2 in zip(grads(loss1, list(ours.parameters())), grads(loss2, list(theirs.parameters())), strict=True):
        assert_close(g1, g2)


# ---------------------------------------------------------------------------------------------------------------
# The papers' equations


def lstm_params(m, layer=0):
    bias = getattr(m, f"bias_l{layer}")
    return m.weight_ih_l0, m.weight_hh_l0, bias


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_normalized_lstm_matches_the_papers_equations_in_training(backend, norm):
    torch.manual_seed(2)
    m = randomize(rb.LSTM(3, 5, norm=norm, max_length=10, backend=backend))
    x = torch.randn(6, 4, 3, requires_grad=True)
    h0, c0 = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    y1, (h1, c1) = m(x, (h0, c0))
    w_ih, w_hh, b = lstm_params(m)
    y2, h2, c2 = naive_lstm(
        x, h0[0], c0[0], w_ih, w_hh, b, norm, m.norm_ih_l0.weight, m.norm_hh_l0.weight, m.norm_c_l0.weight,
        m.norm_c_l0.bias,
    )
    assert_close(y1, y2)
    assert_close(h1[0], h2)
    assert_close(c1[0], c2)
    weights = torch.randn_like(y1)
    inputs = list(m.parameters()) + [x]
    g1 = grads((y1 * weights).sum() + (c1**2).sum(), inputs)
    g2 = grads((y2 * weights).sum() + (c2**2).sum(), inputs)
    for a, b_ in zip(g1, g2, strict=True):
        assert_close(a, b_)


def test_bn_lstm_population_statistics_are_the_moving_average_of_per_timestep_batch_statistics(backend):
    torch.manual_seed(3)
    m = randomize(rb.LSTM(3, 5, norm="bn", max_length=10, momentum=0.3, backend=backend))
    x = torch.randn(6, 8, 3)
    m(x)
    wx = x @ m.weight_ih_l0.T
    expected_mean = 0.3 * wx.mean(1)
    expected_var = 0.7 * 1.0 + 0.3 * wx.var(1, unbiased=False)
    assert_close(m.norm_ih_l0.running_mean[:6], expected_mean)
    assert_close(m.norm_ih_l0.running_var[:6], expected_var)
    # Untouched slots keep their initial values; the trained length is the sequence length.
    assert torch.equal(m.norm_ih_l0.running_mean[6:], torch.zeros(4, 20)) and int(m.norm_ih_l0.trained_length) == 6
    # The recurrent term's statistics: recompute h_{t-1} with the naive equations and compare.
    w_ih, w_hh, b = lstm_params(m)
    zeros = torch.zeros(8, 5)
    outputs, _, _ = naive_lstm(
        x, zeros, zeros, w_ih, w_hh, b, "bn", m.norm_ih_l0.weight, m.norm_hh_l0.weight, m.norm_c_l0.weight,
        m.norm_c_l0.bias,
    )
    previous = torch.cat([zeros[None], outputs[:-1]])
    wh = previous @ w_hh.T
    assert_close(m.norm_hh_l0.running_mean[:6], 0.3 * wh.mean(1))
    assert_close(m.norm_hh_l0.running_var[:6], 0.7 + 0.3 * wh.var(1, unbiased=False))


def test_bn_lstm_matches_the_papers_equations_in_evaluation_and_reuses_t_max_statistics(backend):
    torch.manual_seed(4)
    m = randomize(rb.LSTM(3, 5, norm="bn", max_length=10, backend=backend))
    m(torch.randn(6, 4, 3))  # trains 6 timesteps: T_max = 6
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # arbitrary population statistics, so that every timestep differs
        for norm in (m.norm_ih_l0, m.norm_hh_l0, m.norm_c_l0):
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=generator))
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) + 0.5)
    m.eval()
    x = torch.randn(13, 4, 3)  # longer than T_max
    y1, (h1, c1) = m(x)
    pop = {key: (n.running_mean[:6], n.running_var[:6]) for key, n in
           (("x", m.norm_ih_l0), ("h", m.norm_hh_l0), ("c", m.norm_c_l0))}
    w_ih, w_hh, b = lstm_params(m)
    zeros = torch.zeros(4, 5)
    y2, h2, c2 = naive_lstm(
        x, zeros, zeros, w_ih, w_hh, b, "bn", m.norm_ih_l0.weight, m.norm_hh_l0.weight, m.norm_c_l0.weight,
        m.norm_c_l0.bias, pop=pop,
    )
    assert_close(y1, y2)
    assert_close(c1[0], c2)


@pytest.mark.parametrize("norm", ["bn", "ln"])
@pytest.mark.parametrize("placement", ["sum", "separate"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "identity"])
def test_normalized_rnn_matches_its_equations(backend, norm, placement, nonlinearity):
    torch.manual_seed(5)
    m = randomize(rb.RNN(3, 5, norm=norm, norm_placement=placement, nonlinearity=nonlinearity, backend=backend))
    x = torch.randn(7, 6, 3, requires_grad=True)
    h0 = torch.randn(1, 6, 5)
    y1, h1 = m(x, h0)
    act = torch.tanh if nonlinearity == "tanh" else (lambda v: v)
    if placement == "sum":
        kwargs = {"gamma": m.norm_l0.weight, "beta": m.norm_l0.bias}
    else:
        kwargs = {"gx": m.norm_ih_l0.weight, "gh": m.norm_hh_l0.weight, "b": m.bias_l0}
    y2, h2 = naive_rnn(x, h0[0], m.weight_ih_l0, m.weight_hh_l0, act, norm, placement, **kwargs)
    assert_close(y1, y2)
    assert_close(h1[0], h2)
    params = list(m.parameters()) + [x]
    for a, b in zip(grads((y1**2).sum(), params), grads((y2**2).sum(), params), strict=True):
        assert_close(a, b)


def test_bn_linear_rnn_is_batch_norm_in_place_of_tanh_and_bias(backend):
    m = rb.RNN(2, 4, norm="bn", norm_placement="separate", nonlinearity="identity", bias=False, backend=backend)
    assert {n for n, _ in m.named_parameters()} == {
        "weight_ih_l0", "weight_hh_l0", "norm_ih_l0.weight", "norm_hh_l0.weight"
    }


def test_bn_linear_rnn_with_population_statistics_is_an_affine_map_of_its_input(backend):
    # Without tanh the only nonlinearity is the batch statistics: once they are fixed (evaluation), the whole
    # recurrence is affine in the input sequence, so a read-out of it is a linear classifier of the pixels.
    m = randomize(rb.RNN(2, 4, norm="bn", norm_placement="separate", nonlinearity="identity", bias=False,
                         max_length=5, backend=backend))
    m(torch.randn(5, 8, 2))  # one training pass, so the population statistics are not the initial ones
    m.eval()
    x1, x2 = torch.randn(7, 3, 2), torch.randn(7, 3, 2)  # longer than max_length: T_max's statistics reused
    a = 0.3
    mixed, _ = m(a * x1 + (1 - a) * x2)
    assert_close(mixed, a * m(x1)[0] + (1 - a) * m(x2)[0])
    tanh_rnn = randomize(rb.RNN(2, 4, norm="bn", norm_placement="sum", max_length=5, backend=backend)).eval()
    assert not torch.allclose(tanh_rnn(a * x1 + (1 - a) * x2)[0], a * tanh_rnn(x1)[0] + (1 - a) * tanh_rnn(x2)[0])


# ---------------------------------------------------------------------------------------------------------------
# gradcheck


VARIANTS = [
    ("lstm", {"norm": "none"}),
    ("lstm", {"norm": "bn"}),
    ("lstm", {"norm": "vbn"}),
    ("lstm", {"norm": "ln"}),
    ("lstm", {"norm": "bn", "share_statistics_over_time": True}),
    ("rnn", {"norm": "none"}),
    ("rnn", {"norm": "bn", "norm_placement": "sum"}),
    ("rnn", {"norm": "bn", "norm_placement": "separate", "nonlinearity": "identity", "bias": False}),
    ("rnn", {"norm": "ln"}),
]


def build(kind, backend, **kwargs):
    cls = rb.LSTM if kind == "lstm" else rb.RNN
    return randomize(cls(2, 3, max_length=4, backend=backend, **kwargs))


@pytest.mark.parametrize("kind,kwargs", VARIANTS, ids=[f"{k}-{'-'.join(map(str, a.values()))}" for k, a in VARIANTS])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend, kind, kwargs, training):
    torch.manual_seed(6)
    m = build(kind, backend, **kwargs).train(training)
    x = torch.randn(5, 3, 2, requires_grad=True)
    lengths = torch.tensor([5, 3, 4])
    names = [n for n, _ in m.named_parameters()]

    def f(x, *values):
        return torch.func.functional_call(m, dict(zip(names, values, strict=True)), (x,), {"lengths": lengths})[0]

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in m.parameters()])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Invariances (with a negligible eps: eps is the one term that breaks them)

TINY = 1e-14


def per_timestep_affine(x, generator):
    scale = torch.rand(x.shape[0], 1, 1, generator=generator) * 3 + 0.2
    shift = torch.randn(x.shape[0], 1, x.shape[2], generator=generator)
    return x * scale + shift


def test_bn_lstm_is_invariant_to_per_timestep_input_scale_and_shift(backend):
    torch.manual_seed(7)
    m = randomize(rb.LSTM(3, 5, norm="bn", eps=TINY, backend=backend))
    x = torch.randn(6, 8, 3)
    y1, _ = m(x)
    y2, _ = m(per_timestep_affine(x, torch.Generator().manual_seed(1)))
    assert_close(y1, y2, 1e-7)


def test_vertical_bn_is_invariant_to_a_shared_transform_but_not_to_per_timestep_ones(backend):
    torch.manual_seed(8)
    m = randomize(rb.LSTM(3, 5, norm="vbn", eps=TINY, backend=backend))
    x = torch.randn(6, 8, 3)
    y1, _ = m(x)
    y2, _ = m(x * 2.5 + torch.randn(1, 1, 3))
    assert_close(y1, y2, 1e-7)
    y3, _ = m(per_timestep_affine(x, torch.Generator().manual_seed(1)))
    assert (y1 - y3).abs().max() > 1e-3


def test_ln_lstm_is_invariant_to_per_example_input_scale(backend):
    torch.manual_seed(9)
    m = randomize(rb.LSTM(3, 5, norm="ln", eps=TINY, backend=backend))
    x = torch.randn(6, 8, 3)
    y1, _ = m(x)
    y2, _ = m(x * (torch.rand(1, 8, 1) * 5 + 0.1))
    assert_close(y1, y2, 1e-7)


@pytest.mark.parametrize("kind,kwargs", [("lstm", {"norm": "bn"}), ("lstm", {"norm": "ln"}),
                                         ("rnn", {"norm": "bn", "norm_placement": "separate"})])
def test_normalized_outputs_are_invariant_to_scaling_weight_hh(backend, kind, kwargs):
    torch.manual_seed(10)
    m = build(kind, backend, eps=TINY, **kwargs)
    x = torch.randn(6, 8, 2)
    y1, _ = m(x)
    with torch.no_grad():
        m.weight_hh_l0.mul_(3.7)
    y2, _ = m(x)
    assert_close(y1, y2, 1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation mode


def test_eval_outputs_do_not_depend_on_batch_composition(backend):
    torch.manual_seed(11)
    m = randomize(rb.LSTM(3, 5, 2, norm="bn", backend=backend))
    m(torch.randn(6, 8, 3))
    m.eval()
    x = torch.randn(9, 8, 3)
    y_all, _ = m(x)
    y_half, _ = m(torch.cat([x[:, :3], torch.randn(9, 5, 3) * 10], 1))
    y_one, _ = m(x[:, 3:4])
    assert_close(y_all[:, :3], y_half[:, :3])
    assert_close(y_all[:, 3:4], y_one)


def test_eval_never_updates_statistics(backend):
    m = rb.LSTM(3, 5, norm="bn", backend=backend)
    m(torch.randn(6, 4, 3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    m(torch.randn(20, 4, 3))
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_eval_before_training_and_past_max_length_runs(backend):
    m = rb.LSTM(3, 5, norm="bn", max_length=4, backend=backend).eval()
    y, _ = m(torch.randn(10, 2, 3))
    assert torch.isfinite(y).all()


def test_training_past_max_length_pools_the_tail_into_the_last_slot(backend):
    torch.manual_seed(12)
    m = rb.LSTM(3, 5, norm="bn", max_length=4, momentum=1.0, backend=backend)
    x = torch.randn(7, 6, 3)
    m(x)
    wx = x @ m.weight_ih_l0.T
    tail = wx[3:].reshape(-1, 20)
    assert_close(m.norm_ih_l0.running_mean[3], tail.mean(0))
    assert_close(m.norm_ih_l0.running_var[3], tail.var(0, unbiased=False))


def test_shared_statistics_keep_one_slot_pooled_over_time(backend):
    torch.manual_seed(13)
    m = rb.LSTM(3, 5, norm="bn", share_statistics_over_time=True, momentum=1.0, backend=backend)
    x = torch.randn(6, 8, 3)
    m(x)
    wx = (x @ m.weight_ih_l0.T).reshape(-1, 20)
    assert m.norm_hh_l0.running_mean.shape == (1, 20)
    assert_close(m.norm_ih_l0.running_mean[0], wx.mean(0))
    assert_close(m.norm_ih_l0.running_var[0], wx.var(0, unbiased=False))


# ---------------------------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("norm", ["none", "bn", "vbn", "ln"])
def test_padding_changes_nothing_at_valid_positions_nor_the_statistics(backend, norm):
    torch.manual_seed(14)
    lengths = torch.tensor([7, 3, 5, 1, 7])
    x = torch.randn(7, 5, 3)
    noisy = x.clone()
    padded = torch.arange(7)[:, None] >= lengths[None, :]
    noisy[padded] = torch.randn(int(padded.sum()), 3) * 100
    outs = []
    for inputs in (x, noisy):
        torch.manual_seed(0)
        m = randomize(rb.LSTM(3, 4, 2, norm=norm, backend=backend))
        y, (h, c) = m(inputs, lengths=lengths)
        outs.append((y, h, c, {k: v.clone() for k, v in m.state_dict().items()}))
    (y1, h1, c1, s1), (y2, h2, c2, s2) = outs
    assert_close(y1, y2)
    assert_close(h1, h2)
    assert_close(c1, c2)
    assert torch.equal(y1[padded], torch.zeros_like(y1[padded]))
    for key in s1:
        assert_close(s1[key], s2[key])


def test_final_states_are_each_sequences_state_at_its_own_last_step(backend):
    torch.manual_seed(15)
    m = randomize(rb.LSTM(3, 4, 2, norm="bn", backend=backend))
    m(torch.randn(7, 6, 3))
    m.eval()  # population statistics: each sequence can be run alone
    lengths = torch.tensor([7, 2, 5])
    x = torch.randn(7, 3, 3)
    y, (h, c) = m(x, lengths=lengths)
    for b, length in enumerate(lengths.tolist()):
        y_b, (h_b, c_b) = m(x[:length, b : b + 1])
        assert_close(y[:length, b], y_b[:, 0])
        assert_close(h[:, b], h_b[:, 0])
        assert_close(c[:, b], c_b[:, 0])


def test_masked_batch_statistics_use_only_active_sequences(backend):
    torch.manual_seed(16)
    m = rb.LSTM(3, 4, norm="bn", momentum=1.0, backend=backend)
    lengths = torch.tensor([4, 2, 3, 4])
    x = torch.randn(4, 4, 3)
    m(x, lengths=lengths)
    wx = x @ m.weight_ih_l0.T
    for t in range(4):
        active = lengths > t
        assert_close(m.norm_ih_l0.running_mean[t], wx[t, active].mean(0))
        assert_close(m.norm_ih_l0.running_var[t], wx[t, active].var(0, unbiased=False))


# ---------------------------------------------------------------------------------------------------------------
# Zero-variance timesteps (the first ~100 pixels of every MNIST digit are 0)


def leading_zeros_batch(dtype):
    x = torch.zeros(130, 16, 1, dtype=dtype)
    x[100:] = torch.rand(30, 16, 1, dtype=dtype)
    return x


def test_zero_variance_timesteps_give_finite_outputs_and_exploding_gradients_without_noise(backend):
    torch.manual_seed(17)
    m = rb.LSTM(1, 8, norm="bn", max_length=130, backend=backend, init="authors")
    x = leading_zeros_batch(torch.float64).requires_grad_(True)
    y, _ = m(x)
    assert torch.isfinite(y).all()
    names = [name for name, _ in m.named_parameters()]
    gradients = dict(zip(names, torch.autograd.grad((y[-1] * torch.randn(16, 8)).sum(), list(m.parameters())),
                         strict=True))
    assert all(torch.isfinite(g).all() for g in gradients.values())
    # The 1/sqrt(eps) of each zero-variance step multiplies the gradient reaching the gates there: finite in
    # float64 but astronomically large for the bias (it would overflow float32). The states are exactly zero in
    # those steps, so the weight gradients stay small. This is what the paper's initial-state noise prevents.
    assert gradients["bias_l0"].abs().max() > 1e100
    assert gradients["weight_hh_l0"].abs().max() < 1e3 and gradients["weight_ih_l0"].abs().max() < 1e3


def test_initial_state_noise_keeps_zero_variance_gradients_moderate_in_float32(backend):
    torch.manual_seed(18)
    m = rb.LSTM(1, 8, norm="bn", max_length=130, init_state_noise=0.1, backend=backend).float()
    x = leading_zeros_batch(torch.float32)
    y, _ = m(x)
    gradients = torch.autograd.grad((y[-1] * torch.randn(16, 8, dtype=torch.float32)).sum(), list(m.parameters()))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(g).all() and g.abs().max() < 1e3 for g in gradients)
    m.eval()
    y_eval, _ = m(x)  # no noise in evaluation: sequences identical so far give identical outputs
    assert torch.equal(y_eval[:100, 0], y_eval[:100, 1])


# ---------------------------------------------------------------------------------------------------------------
# Population statistics re-estimated as the paper reports test numbers


def test_estimate_population_statistics_is_the_plain_average_of_per_timestep_batch_statistics(backend):
    torch.manual_seed(19)
    m = nn.Sequential()
    lstm = rb.LSTM(3, 4, 2, norm="bn", dropout=0.5, momentum=0.1, backend=backend)
    lstm(torch.randn(5, 8, 3))  # some moving-average statistics to be replaced
    batches = [torch.randn(5, 8, 3) * (i + 1) for i in range(3)]
    lstm.train()
    used = rb.estimate_population_statistics(lstm, batches)
    assert used == 3 and lstm.training
    means = torch.stack([(b @ lstm.weight_ih_l0.T).mean(1) for b in batches]).mean(0)
    variances = torch.stack([(b @ lstm.weight_ih_l0.T).var(1, unbiased=False) for b in batches]).mean(0)
    assert_close(lstm.norm_ih_l0.running_mean[:5], means)
    assert_close(lstm.norm_ih_l0.running_var[:5], variances)
    # The second layer saw its input without dropout (as at test time): the estimate is deterministic.
    first = lstm.norm_ih_l1.running_mean.clone()
    rb.estimate_population_statistics(lstm, batches)
    assert_close(lstm.norm_ih_l1.running_mean, first)
    assert lstm.norm_ih_l0.momentum == 0.1
    del m


# ---------------------------------------------------------------------------------------------------------------
# Failure modes of earlier public implementations


def test_multi_layer_with_hx_none_and_batch_first(backend):
    m = rb.LSTM(3, 5, 3, norm="bn", batch_first=True, backend=backend)
    y, (h, c) = m(torch.randn(4, 6, 3))
    assert y.shape == (4, 6, 5) and h.shape == (3, 4, 5) and c.shape == (3, 4, 5)


def test_learned_initial_state_starts_at_zero_and_learns(backend):
    m = rb.LSTM(3, 5, 2, norm="bn", learn_initial_state=True, backend=backend)
    assert torch.equal(m.initial_state, torch.zeros(2, 2, 5))
    y, _ = m(torch.randn(4, 6, 3))
    (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), m.initial_state)
    assert grad.abs().sum() > 0


def test_identity_recurrent_init_sets_the_candidate_block():
    m = rb.LSTM(1, 4, recurrent_init="identity", orthogonal_init="per_gate", init="authors")
    assert torch.equal(m.weight_hh_l0[8:12], torch.eye(4))
    assert torch.allclose(m.weight_hh_l0[:4] @ m.weight_hh_l0[:4].T, torch.eye(4), atol=1e-6)
    assert torch.equal(m.bias_ih_l0[4:8], torch.ones(4)) and torch.equal(m.bias_hh_l0, torch.zeros(16))


@pytest.mark.parametrize("kwargs,match", [
    ({"norm": "batch"}, "norm='batch'"),
    ({"norm": "bn", "gamma_init": 0.0}, "gamma_init"),
    ({"norm": "bn", "norm_terms": ("input", "hidden")}, "norm_terms"),
    ({"recurrent_init": "eye"}, "recurrent_init"),
])
def test_bad_arguments_say_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rb.LSTM(3, 5, **kwargs)


def test_a_state_dict_trained_longer_than_the_population_slots_is_refused_at_load():
    # trained_length counts populated slots, so it can never exceed them; a state dict that says otherwise (edited,
    # or from another version) used to load and fail later in evaluation with an IndexError.
    m = rb.LSTM(3, 5, norm="bn", max_length=10)
    state = {**m.state_dict(), **dict(m.named_buffers())}  # every slot, as saved before untrained ones were left out
    state["norm_ih_l0.trained_length"] = torch.tensor(12)
    with pytest.raises(ValueError, match=r"norm_ih_l0\.trained_length is 12 .* 10 population slots"):
        m.load_state_dict(state)
    state["norm_ih_l0.trained_length"] = torch.tensor(10)
    m.load_state_dict(state)
    m.eval()
    m(torch.randn(14, 2, 3))  # past max_length: the last slot


OMP_LIMIT_SCRIPT = """
import copy, torch
torch.set_num_threads(2)  # before any layer is built, with OMP_THREAD_LIMIT=1 in the environment
import recurrent_bn as rb
from recurrent_bn.models import init_head_
makers = [
    lambda backend: rb.LSTM(64, 64, 2, norm="bn", backend=backend, init="authors"),
    lambda backend: rb.LSTM(64, 64, norm="ln", recurrent_init="identity", orthogonal_init="per_gate", backend=backend,
                            init="authors"),
    lambda backend: rb.LSTM(64, 64, norm="vbn", bidirectional=True, backend=backend, init="authors"),
    lambda backend: rb.RNN(64, 64, 2, norm="bn", backend=backend, init="authors"),
]
for make in makers:
    torch.manual_seed(0)
    model = make("auto")
    reference = copy.deepcopy(model)
    reference.backend = "reference"
    x = torch.randn(6, 5, 64, dtype=torch.float64)
    results = []
    for layer in (model.double(), reference.double()):
        output, _ = layer(x)
        output.square().sum().backward()
        results.append([output.detach(), *(p.grad for p in layer.parameters())])
    assert all(torch.allclose(a, b, atol=1e-10, rtol=1e-10) for a, b in zip(*results, strict=True))
init_head_(torch.nn.Linear(64, 256), "orthogonal")
rb.LSTMCell(64, 64, norm="bn")
print("OK", torch.get_num_threads())
"""


def test_layers_build_and_run_with_omp_thread_limit_below_torchs_threads():
    # nn.init.orthogonal_'s QR hung forever for a 256 x 64 matrix with OMP_THREAD_LIMIT=1 and two torch threads.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    result = subprocess.run([sys.executable, "-c", OMP_LIMIT_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["OK", "2"]  # torch's thread count is restored after each QR


def test_orthogonal_initialisation_is_nn_init_orthogonal_bit_for_bit_without_a_thread_limit(monkeypatch):
    # Seeded runs keep their numbers: the guard only acts where OMP_THREAD_LIMIT is below torch's threads.
    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    torch.manual_seed(0)
    model = rb.LSTM(3, 16, init="authors")
    torch.manual_seed(0)
    expected_ih, expected_hh = torch.empty(64, 3), torch.empty(64, 16)
    nn.init.orthogonal_(expected_ih)
    nn.init.orthogonal_(expected_hh)
    assert torch.equal(model.weight_ih_l0, expected_ih) and torch.equal(model.weight_hh_l0, expected_hh)


def test_a_state_dict_keeps_only_the_trained_statistics_slots_and_loads_back_the_same_buffers(tmp_path):
    # max_length=1000 trained on 35 steps: 965 slots of initial values need not be stored (a checkpoint was 4.9x
    # torch.nn.LSTM's for the same weights).
    torch.manual_seed(0)
    model = rb.LSTM(3, 8, 2, norm="bn", max_length=1000)
    model(torch.randn(35, 4, 3))
    state = model.state_dict()
    statistics = [k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(state[k].shape[0] == 35 for k in statistics)
    torch.save(state, tmp_path / "small.pt")
    full = {**state, **dict(model.named_buffers())}  # as saved before: every slot
    torch.save(full, tmp_path / "full.pt")
    assert (tmp_path / "small.pt").stat().st_size * 10 < (tmp_path / "full.pt").stat().st_size
    for source in ("small.pt", "full.pt"):
        restored = rb.LSTM(3, 8, 2, norm="bn", max_length=1000)
        restored.load_state_dict(torch.load(tmp_path / source, weights_only=True))
        for (name, a), (_, b) in zip(model.named_buffers(), restored.named_buffers(), strict=True):
            assert torch.equal(a, b), (source, name)
        x = torch.randn(50, 2, 3)
        assert torch.equal(model.eval()(x)[0], restored.eval()(x)[0])
        model.train()
