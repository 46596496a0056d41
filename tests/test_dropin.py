"""The drop-in features against independent formulations: bidirectional layers (torch.nn.LSTM for norm="none"; a
forward layer over manually reversed valid parts for the normalized ones), PackedSequence (each sequence run alone,
or each step over the sequences still running), the cells (the paper's equations written out; a loop of cells
against the layer, population statistics included) and per-term sharing of statistics over time (the paper's BN-e*,
against a step-by-step transcription).

Every test runs on each backend the build has, so the fused kernels are held to the same formulations.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import recurrent_bn as rb
from recurrent_bn.recurrence import fused_available

EPS = 1e-5
pytestmark = pytest.mark.usefixtures("float64")  # `backend` and `float64`: tests/conftest.py


def randomize(model, seed=0):
    """Random values for every parameter (γ in [0.2, 1]), so that nothing passes by a special initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=generator) * 0.8 + 0.2 if "norm" in name and "weight" in name
                    else torch.randn(p.shape, generator=generator) * 0.5)
    return model


def assert_close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), float((a - b).abs().max())


def assert_states_close(a: dict, b: dict, tol=1e-10):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        assert_close(a[key].double(), b[key].double(), tol)


def reverse_valid(x, lengths):
    """Each sequence's first lengths[b] positions reversed, the padding left where it is (written with a loop)."""
    out = x.clone()
    for b, n in enumerate(lengths.tolist()):
        out[:n, b] = x[:n, b].flip(0)
    return out


def weighted_loss(output, states, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=generator)).sum() for t in (output, *states))


# ---------------------------------------------------------------------------------------------------------------
# Bidirectional, norm="none": torch.nn.LSTM(bidirectional=True) with the same state dict


@pytest.mark.parametrize("num_layers,batch_first,mode", [
    (1, False, "plain"), (2, True, "plain"), (1, False, "lengths"), (2, True, "lengths"), (3, False, "lengths"),
    (1, True, "packed"), (2, False, "packed"), (3, True, "packed"),
])
def test_bidirectional_none_matches_torch_lstm_both_ways(backend, num_layers, batch_first, mode):
    torch.manual_seed(0)
    ours = randomize(rb.LSTM(3, 5, num_layers, batch_first=batch_first, bidirectional=True, backend=backend))
    theirs = nn.LSTM(3, 5, num_layers, batch_first=batch_first, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())  # both ways, strict: the same names and shapes
    lengths = torch.tensor([6, 2, 4, 6, 1])  # unsorted, as users pass them
    x = torch.randn(5, 6, 3) if batch_first else torch.randn(6, 5, 3)
    x.requires_grad_(True)
    hx = tuple(torch.randn(2 * num_layers, 5, 5, requires_grad=True) for _ in range(2))
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    if mode == "plain":
        y1, s1 = ours(x, hx)
        y2, s2 = theirs(x, hx)
    elif mode == "lengths":
        y1, s1 = ours(x, hx, lengths=lengths)
        y2, s2 = theirs(packed, hx)
        y2, _ = pad_packed_sequence(y2, batch_first=batch_first, total_length=6)
    else:
        y1, s1 = ours(packed, hx)
        y2, s2 = theirs(packed, hx)
        assert isinstance(y1, PackedSequence)
        assert torch.equal(y1.batch_sizes, y2.batch_sizes) and torch.equal(y1.sorted_indices, y2.sorted_indices)
        y1, y2 = y1.data, y2.data
    assert y1.shape[-1] == 10 and s1[0].shape == (2 * num_layers, 5, 5)
    for a, b in zip((y1, *s1), (y2, *s2), strict=True):
        assert_close(a, b, 1e-12)
    params1, params2 = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert params1.keys() == params2.keys()
    g1 = torch.autograd.grad(weighted_loss(y1, s1), [*params1.values(), x, *hx], retain_graph=True)
    g2 = torch.autograd.grad(weighted_loss(y2, s2), [*params2.values(), x, *hx])
    for a, b in zip(g1, g2, strict=True):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_bidirectional_rnn_none_matches_torch_rnn(packed):
    torch.manual_seed(10)
    ours = randomize(rb.RNN(3, 5, 2, nonlinearity="relu", bidirectional=True))
    theirs = nn.RNN(3, 5, 2, nonlinearity="relu", bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 4, 3)
    inputs = pack_padded_sequence(x, torch.tensor([6, 3, 1, 5]), enforce_sorted=False) if packed else x
    (y1, h1), (y2, h2) = ours(inputs), theirs(inputs)
    if packed:
        y1, y2 = y1.data, y2.data
    assert_close(y1, y2, 1e-12)
    assert_close(h1, h2, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Bidirectional, normalized: each direction equals a one-directional layer, the reverse one over reversed valid parts


def one_direction(bi, layer, reverse, backend, **kwargs):
    """A one-directional, one-layer LSTM holding the parameters and statistics of one direction of `bi`."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    input_size = bi.input_size if layer == 0 else 2 * bi.hidden_size
    uni = rb.LSTM(input_size, bi.hidden_size, backend=backend, **kwargs)
    state = {}
    for key, value in bi.state_dict().items():
        module, _, rest = key.partition(".")
        if module.endswith(suffix):
            state[module[: -len(suffix)] + "_l0" + ("." + rest if rest else "")] = value
    uni.load_state_dict(state)
    return uni


def bi_name(name, layer, reverse):
    """The name in the bidirectional stack of a one-directional layer's parameter (`norm_ih_l0.weight`)."""
    module, _, rest = name.partition(".")
    module = module[:-3] + f"_l{layer}" + ("_reverse" if reverse else "")
    return module + ("." + rest if rest else "")


def composed(unis, x, lengths):
    """The bidirectional stack written out: forward layers on x, reverse layers on reversed valid parts."""
    layer_input, finals = x, []
    for forward, backward in unis:
        y_f, (h_f, c_f) = forward(layer_input, lengths=lengths)
        y_b, (h_b, c_b) = backward(reverse_valid(layer_input, lengths), lengths=lengths)
        layer_input = torch.cat([y_f, reverse_valid(y_b, lengths)], -1)
        finals += [(h_f[0], c_f[0]), (h_b[0], c_b[0])]
    return layer_input, tuple(torch.stack(s) for s in zip(*finals, strict=True))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kwargs", [
    {"norm": "bn"}, {"norm": "ln"}, {"norm": "vbn"}, {"norm": "bn", "share_statistics_over_time": ("input",)},
], ids=["bn", "ln", "vbn", "bn-e*"])
def test_bidirectional_directions_equal_one_directional_layers_on_reversed_valid_parts(backend, num_layers, kwargs):
    torch.manual_seed(1)
    kwargs = {"max_length": 10, "momentum": 0.5, **kwargs}
    bi = randomize(rb.LSTM(3, 4, num_layers, bidirectional=True, backend=backend, **kwargs))
    unis = [tuple(one_direction(bi, k, r, backend, **kwargs) for r in (False, True)) for k in range(num_layers)]
    # The composed stack's parameters in the order of bi's, matched by name.
    by_name = {bi_name(name, k, r): p for k, pair in enumerate(unis) for r, u in enumerate(pair)
               for name, p in u.named_parameters()}
    names = [name for name, _ in bi.named_parameters()]
    assert sorted(by_name) == sorted(names)
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])
    for training in (True, False):  # the training pass updates the statistics that evaluation then uses
        bi.train(training)
        for pair in unis:
            for u in pair:
                u.train(training)
        x = torch.randn(7, 6, 3, requires_grad=True)
        y1, s1 = bi(x, lengths=lengths)
        y2, s2 = composed(unis, x, lengths)
        for a, b in zip((y1, *s1), (y2, *s2), strict=True):
            assert_close(a, b)
        g1 = torch.autograd.grad(weighted_loss(y1, s1), [x, *bi.parameters()])
        g2 = torch.autograd.grad(weighted_loss(y2, s2), [x, *(by_name[n] for n in names)])
        for a, b in zip(g1, g2, strict=True):
            assert_close(a, b)
        for k, pair in enumerate(unis):
            for r, u in enumerate(pair):
                assert_states_close(one_direction(bi, k, r, backend, **kwargs).state_dict(), u.state_dict())


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_bidirectional_padding_changes_nothing_at_valid_positions_nor_the_statistics(backend, norm):
    torch.manual_seed(2)
    lengths = torch.tensor([6, 2, 4, 1])
    x = torch.randn(6, 4, 3)
    noisy = x.clone()
    padded = torch.arange(6)[:, None] >= lengths[None, :]
    noisy[padded] = torch.randn(int(padded.sum()), 3) * 100
    results = []
    for inputs in (x, noisy):
        m = randomize(rb.LSTM(3, 4, 2, norm=norm, bidirectional=True, backend=backend))
        y, (h, c) = m(inputs, lengths=lengths)
        results.append((y, h, c, m.state_dict()))
    for a, b in zip(results[0][:3], results[1][:3], strict=True):
        assert_close(a, b)
    assert torch.equal(results[0][0][padded], torch.zeros_like(results[0][0][padded]))
    assert_states_close(results[0][3], results[1][3])


def test_bidirectional_reverse_direction_reads_the_valid_part_backwards_at_step_t():
    """The reverse direction's first step reads x[lengths[b] - 1, b]: with population statistics of step 0 only
    (trained length 1), output[p, b, H:] for p = lengths[b] - 1 depends on that position alone."""
    torch.manual_seed(3)
    m = randomize(rb.LSTM(3, 4, norm="bn", bidirectional=True, backend="reference"))
    lengths = torch.tensor([5, 2, 3])
    x = torch.randn(5, 3, 3)
    m.eval()
    y, _ = m(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone, _ = m(x[n - 1 : n, b : b + 1])
        assert_close(y[n - 1, b, 4:], alone[0, 0, 4:])


# ---------------------------------------------------------------------------------------------------------------
# PackedSequence: each sequence's valid part run alone (evaluation), or each step run over the sequences still
# running (training): compositions of plain calls without lengths, so that nothing of the lengths path is shared


def states_of(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("cls,kwargs", [
    (rb.LSTM, {"norm": "bn", "bidirectional": True, "num_layers": 2}),
    (rb.LSTM, {"norm": "bn", "batch_first": True}),
    (rb.LSTM, {"norm": "bn", "share_statistics_over_time": ("input",), "bidirectional": True}),
    (rb.RNN, {"norm": "bn", "bidirectional": True, "num_layers": 2}),
], ids=["bilstm", "lstm-batch-first", "bilstm-bn-e*", "birnn"])
def test_packed_sequence_in_evaluation_equals_each_sequence_run_alone(backend, cls, kwargs):
    torch.manual_seed(4)
    batch_first = kwargs.get("batch_first", False)
    m = randomize(cls(3, 4, max_length=5, momentum=0.5, backend=backend, **kwargs))
    m(torch.randn(5, 7, 3) if batch_first else torch.randn(7, 5, 3))  # population statistics from a training pass
    m.eval()
    lengths = torch.tensor([3, 7, 1, 5, 7])
    x = (torch.randn(5, 7, 3) if batch_first else torch.randn(7, 5, 3)).requires_grad_(True)
    packed_in = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    y, state = m(packed_in)
    assert isinstance(y, PackedSequence)
    assert torch.equal(y.batch_sizes, packed_in.batch_sizes)
    assert torch.equal(y.sorted_indices, packed_in.sorted_indices)
    padded, out_lengths = pad_packed_sequence(y, batch_first=batch_first, total_length=7)
    assert torch.equal(out_lengths, lengths)
    generator = torch.Generator().manual_seed(7)
    weights = torch.randn(padded.shape, generator=generator)
    state_weights = [torch.randn(s.shape, generator=generator) for s in states_of(state)]
    loss = (padded * weights).sum() + sum((s * w).sum() for s, w in zip(states_of(state), state_weights, strict=True))
    alone_loss = 0
    for b, n in enumerate(lengths.tolist()):
        part = x[b : b + 1, :n] if batch_first else x[:n, b : b + 1]
        y_b, state_b = m(part)
        ours = padded[b : b + 1, :n] if batch_first else padded[:n, b : b + 1]
        assert_close(ours, y_b)
        padding = padded[b, n:] if batch_first else padded[n:, b]
        assert torch.equal(padding, torch.zeros_like(padding))
        for s, s_b in zip(states_of(state), states_of(state_b), strict=True):
            assert_close(s[:, b : b + 1], s_b)
        w = weights[b : b + 1, :n] if batch_first else weights[:n, b : b + 1]
        alone_loss = alone_loss + (y_b * w).sum() + sum(
            (s_b * sw[:, b : b + 1]).sum() for s_b, sw in zip(states_of(state_b), state_weights, strict=True))
    for u, v in zip(torch.autograd.grad(loss, [x, *m.parameters()]),
                    torch.autograd.grad(alone_loss, [x, *m.parameters()]), strict=True):
        assert_close(u, v)


@pytest.mark.parametrize("cls,kwargs", [(rb.LSTM, {"norm": "bn"}), (rb.RNN, {"norm": "bn"}),
                                        (rb.RNN, {"norm": "bn", "norm_placement": "separate"})],
                         ids=["lstm", "rnn-sum", "rnn-separate"])
def test_packed_sequence_in_training_normalizes_each_step_over_the_sequences_still_running(backend, cls, kwargs):
    """Batch statistics at step t are those of the sequences with length > t: the same as a one-step call (plain,
    without lengths) on just those sequences, the population statistics included."""
    torch.manual_seed(5)
    m = randomize(cls(3, 4, max_length=10, momentum=0.5, backend=backend, **kwargs))
    composed = copy.deepcopy(m)
    lengths = torch.tensor([3, 7, 2, 5, 7, 4])
    x = torch.randn(7, 6, 3)
    y, state = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, _ = pad_packed_sequence(y, total_length=7)
    lstm = cls is rb.LSTM
    running = [torch.zeros(1, 6, 4) for _ in range(2 if lstm else 1)]
    expected = torch.zeros(7, 6, 4)
    for t in range(7):
        active = lengths > t
        hx = tuple(s[:, active] for s in running) if lstm else running[0][:, active]
        y_t, new = composed(x[t : t + 1, active], hx, start_step=t)
        expected[t, active] = y_t[0]
        for s, n in zip(running, states_of(new), strict=True):
            s[:, active] = n
    assert_close(padded, expected)
    for s, r in zip(states_of(state), running, strict=True):
        assert_close(s, r)
    statistics = {k: v for k, v in m.state_dict().items() if "running_" in k}
    assert statistics and all(torch.allclose(v, composed.state_dict()[k], atol=1e-10) for k, v in statistics.items())


# ---------------------------------------------------------------------------------------------------------------
# Cells: a loop of cells is the layer


def cell_state(layer_state: dict) -> dict:
    """A one-layer state dict renamed for a cell: `weight_ih_l0` -> `weight_ih`, `norm_l0.*` -> `norm_sum.*`."""
    state = {}
    for key, value in layer_state.items():
        module, _, rest = key.partition(".")
        assert module.endswith("_l0"), key
        module = module[:-3]
        module = "norm_sum" if module == "norm" else module
        state[module + ("." + rest if rest else "")] = value
    return state


def run_cells(cell, x, lengths, lstm):
    """The user's loop: one cell call per step, the mask marking the sequences still running."""
    batch = x.shape[1]
    state = (torch.zeros(batch, cell.hidden_size), torch.zeros(batch, cell.hidden_size)) if lstm else None
    outputs = []
    for t in range(x.shape[0]):
        mask = None if lengths is None else t < lengths
        state = cell(x[t], state, step=t, mask=mask)
        h = state[0] if lstm else state
        outputs.append(h if mask is None else h * mask[:, None])
    return torch.stack(outputs), state if lstm else (state,)


LSTM_CELL_VARIANTS = {
    "bn": {"norm": "bn"},
    "bn-cumulative": {"norm": "bn", "momentum": None},
    "bn-shared-recurrent-cell": {"norm": "bn", "share_statistics_over_time": ("recurrent", "cell")},
    "bn-cell-bias": {"norm": "bn", "norm_terms": ("input", "recurrent"), "cell_bias": True},
    "ln": {"norm": "ln"},
    "none": {"norm": "none"},
}
RNN_CELL_VARIANTS = {
    "bn-sum": {"norm": "bn"},
    "bn-sum-shared": {"norm": "bn", "share_statistics_over_time": True, "momentum": None},
    "bn-separate": {"norm": "bn", "norm_placement": "separate", "nonlinearity": "relu"},
    "bn-separate-shared-recurrent": {"norm": "bn", "norm_placement": "separate",
                                     "share_statistics_over_time": ("recurrent",)},
}
CELL_CASES = ([("lstm", k, v) for k, v in LSTM_CELL_VARIANTS.items()]
              + [("rnn", k, v) for k, v in RNN_CELL_VARIANTS.items()])


@pytest.mark.parametrize("kind,name,kwargs", CELL_CASES, ids=[f"{c[0]}-{c[1]}" for c in CELL_CASES])
def test_a_loop_of_cells_equals_the_layer_in_training_and_evaluation(backend, kind, name, kwargs):
    torch.manual_seed(5)
    lstm = kind == "lstm"
    kwargs = {"max_length": 4, "momentum": 0.5, **kwargs}
    layer = randomize((rb.LSTM if lstm else rb.RNN)(3, 5, backend=backend, **kwargs))
    cell = (rb.LSTMCell if lstm else rb.RNNCell)(3, 5, **kwargs)
    cell.load_state_dict(cell_state(layer.state_dict()))
    # Sequences longer and shorter than max_length (the last slot pools the steps at or past it), with padding.
    for steps, lengths in ((6, None), (3, torch.tensor([3, 1, 2, 3])), (7, torch.tensor([7, 5, 7, 2])), (2, None)):
        x = torch.randn(steps, 4, 3)
        y1, s1 = layer(x, lengths=lengths)
        y2, s2 = run_cells(cell, x, lengths, lstm)
        s1 = s1 if lstm else (s1,)
        for a, b in zip((y1, *s1), (y2, *(s[None] for s in s2)), strict=True):
            assert_close(a, b)
        g1 = torch.autograd.grad(weighted_loss(y1, s1), list(layer.parameters()))
        g2 = torch.autograd.grad(weighted_loss(y2, [s[None] for s in s2]), list(cell.parameters()))
        for a, b in zip(g1, g2, strict=True):
            assert_close(a, b)
        assert_states_close(cell_state(layer.state_dict()), cell.state_dict())
    layer.eval()
    cell.eval()
    with torch.no_grad():
        x = torch.randn(9, 4, 3)  # past the trained length (7) and max_length: the last slot's statistics reused
        y1, s1 = layer(x)
        y2, s2 = run_cells(cell, x, None, lstm)
    assert_close(y1, y2)
    assert_close((s1 if lstm else (s1,))[0], s2[0][None])
    assert_states_close(cell_state(layer.state_dict()), cell.state_dict())  # evaluation updated nothing


def masked_statistics(v, active):
    """Mean and biased variance over the active rows (the paper's batch statistics of the running sequences)."""
    return v[active].mean(0), v[active].var(0, unbiased=False)


@pytest.mark.parametrize("training", [True, False])
def test_bn_lstm_cell_computes_the_papers_equations_written_out(training):
    """Eqs. 6-8: gates = BN(W_h h; γ_h) + BN(W_x x; γ_x) + b, c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g) (carried
    un-normalized), h' = σ(o) ⊙ tanh(BN(c'; γ_c, β_c)); statistics of step t over the active rows in training, the
    stored population statistics of slot t in evaluation; a masked row keeps its state; the population moves by
    momentum towards the batch statistics (biased variance)."""
    torch.manual_seed(11)
    cell = randomize(rb.LSTMCell(3, 5, norm="bn", max_length=4, momentum=0.5)).train(training)
    with torch.no_grad():  # population statistics that are not the initial zeros and ones
        for norm in (cell.norm_ih, cell.norm_hh, cell.norm_c):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 1.5)
            norm.trained_length.fill_(4)  # every slot estimated: evaluation reads slot t at step t
    before = copy.deepcopy(cell.state_dict())
    w = {k: v.detach() for k, v in cell.state_dict().items()}
    x = torch.randn(3, 6, 3)
    masks = [torch.ones(6, dtype=torch.bool), torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool),
             torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)]
    h, c = torch.randn(6, 5), torch.randn(6, 5)
    state, expected_mean = (h, c), {name: before[f"{name}.running_mean"].clone() for name in ("norm_ih", "norm_hh",
                                                                                               "norm_c")}
    for t in range(3):
        state = cell(x[t], state, step=t, mask=masks[t])
        wx, wh = x[t] @ w["weight_ih"].T, h @ w["weight_hh"].T

        def bn(v, name, beta=None, t=t):
            if training:
                mean, var = masked_statistics(v, masks[t])
                expected_mean[name][t] = 0.5 * before[f"{name}.running_mean"][t] + 0.5 * mean
            else:
                mean, var = before[f"{name}.running_mean"][t], before[f"{name}.running_var"][t]
            out = w[f"{name}.weight"] * (v - mean) / torch.sqrt(var + EPS)
            return out if beta is None else out + beta

        gates = bn(wh, "norm_hh") + bn(wx, "norm_ih") + w["bias"]
        i, f, g, o = gates.chunk(4, 1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(bn(c_next, "norm_c", w["norm_c.bias"]))
        h = torch.where(masks[t][:, None], h_next, h)
        c = torch.where(masks[t][:, None], c_next, c)
        assert_close(state[0], h)
        assert_close(state[1], c)
    for name, mean in expected_mean.items():
        assert_close(cell.state_dict()[f"{name}.running_mean"], mean)


def test_bn_rnn_cell_computes_tanh_of_one_batch_norm_of_the_sum():
    """The paper's Figure 1a RNN: h' = tanh(BN(W_x x + W_h h; γ, β)), statistics over the active rows."""
    torch.manual_seed(12)
    cell = randomize(rb.RNNCell(3, 5, norm="bn", max_length=4))
    w = {k: v.detach() for k, v in cell.state_dict().items()}
    x, h = torch.randn(3, 6, 3), torch.randn(6, 5)
    masks = [torch.ones(6, dtype=torch.bool), torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)] * 2
    state = h
    for t in range(3):
        state = cell(x[t], state, step=t, mask=masks[t])
        z = x[t] @ w["weight_ih"].T + h @ w["weight_hh"].T
        mean, var = masked_statistics(z, masks[t])
        h_next = torch.tanh(w["norm_sum.weight"] * (z - mean) / torch.sqrt(var + EPS) + w["norm_sum.bias"])
        h = torch.where(masks[t][:, None], h_next, h)
        assert_close(state, h)


def test_lstm_cell_none_matches_torch_lstm_cell_and_rnn_cell_matches_torch_rnn_cell():
    torch.manual_seed(6)
    for ours, theirs in ((randomize(rb.LSTMCell(3, 5)), nn.LSTMCell(3, 5)),
                         (randomize(rb.RNNCell(3, 5, nonlinearity="relu")), nn.RNNCell(3, 5, nonlinearity="relu"))):
        theirs.load_state_dict(ours.state_dict())
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(4, 3, requires_grad=True)
        hx = (torch.randn(4, 5), torch.randn(4, 5)) if isinstance(ours, rb.LSTMCell) else torch.randn(4, 5)
        a, b = ours(x, hx), theirs(x, hx)
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for u, v in zip(a, b, strict=True):
            assert_close(u, v, 1e-12)
        g1 = torch.autograd.grad(weighted_loss(x, a), [x, *ours.parameters()])
        g2 = torch.autograd.grad(weighted_loss(x, b), [x, *theirs.parameters()])
        for u, v in zip(g1, g2, strict=True):
            assert_close(u, v, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Per-term sharing: BN-e*


def bn(v, gamma, beta, mean, var):
    out = gamma * (v - mean) / torch.sqrt(var + EPS)
    return out if beta is None else out + beta


def test_bn_e_star_shares_the_input_terms_statistics_over_time_and_keeps_the_others_per_timestep(backend):
    torch.manual_seed(7)
    m = randomize(rb.LSTM(3, 5, norm="bn", share_statistics_over_time=("input",), momentum=1.0, max_length=10,
                          backend=backend))
    assert m.norm_ih_l0.running_mean.shape == (1, 20) and m.norm_hh_l0.running_mean.shape == (10, 20)
    x = torch.randn(6, 8, 3)
    y, (h_n, c_n) = m(x)
    # The transcription: W_x x normalized with the statistics of the whole (T, B) batch, the rest per timestep.
    w_ih, w_hh, b = m.weight_ih_l0, m.weight_hh_l0, m.bias_l0
    wx = x @ w_ih.T
    flat = wx.reshape(-1, 20)
    pooled = (flat.mean(0), flat.var(0, unbiased=False))
    h = c = torch.zeros(8, 5)
    outputs, recurrent_means, cell_vars = [], [], []
    for t in range(6):
        wh = h @ w_hh.T
        recurrent_means.append(wh.mean(0))
        gates = bn(wx[t], m.norm_ih_l0.weight, None, *pooled) + bn(
            wh, m.norm_hh_l0.weight, None, wh.mean(0), wh.var(0, unbiased=False)) + b
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        cell_vars.append(c.var(0, unbiased=False))
        h = torch.sigmoid(o) * torch.tanh(bn(c, m.norm_c_l0.weight, m.norm_c_l0.bias, c.mean(0),
                                             c.var(0, unbiased=False)))
        outputs.append(h)
    assert_close(y, torch.stack(outputs))
    assert_close(c_n[0], c)
    assert_close(m.norm_ih_l0.running_mean[0], pooled[0])
    assert_close(m.norm_ih_l0.running_var[0], pooled[1])
    assert_close(m.norm_hh_l0.running_mean[:6], torch.stack(recurrent_means))
    assert_close(m.norm_c_l0.running_var[:6], torch.stack(cell_vars))


def test_bn_e_star_input_statistics_with_lengths_are_those_of_the_valid_positions(backend):
    torch.manual_seed(8)
    m = rb.LSTM(3, 5, norm="bn", share_statistics_over_time=("input",), momentum=1.0, backend=backend)
    lengths = torch.tensor([6, 2, 4, 5])
    x = torch.randn(6, 4, 3)
    m(x, lengths=lengths)
    valid = torch.arange(6)[:, None] < lengths[None, :]
    wx = (x @ m.weight_ih_l0.T)[valid]
    assert_close(m.norm_ih_l0.running_mean[0], wx.mean(0))
    assert_close(m.norm_ih_l0.running_var[0], wx.var(0, unbiased=False))
    assert m.norm_ih_l0.slots == 1 and m.norm_hh_l0.slots == 1000 and int(m.norm_hh_l0.trained_length) == 6


# ---------------------------------------------------------------------------------------------------------------
# The fused kernels on the new cases: the same as the reference loops


@pytest.mark.skipif(not fused_available(), reason="fused kernels unavailable in this build")
@pytest.mark.parametrize("kwargs", [{"norm": "bn", "share_statistics_over_time": ("input",)},
                                    {"norm": "bn", "share_statistics_over_time": ("recurrent",)}, {"norm": "ln"}])
def test_fused_bidirectional_with_lengths_and_per_term_sharing_matches_the_reference(kwargs):
    torch.manual_seed(9)
    reference = randomize(rb.LSTM(3, 4, 2, bidirectional=True, max_length=5, backend="reference", **kwargs))
    fused = copy.deepcopy(reference)
    fused.backend = "fused"
    lengths = torch.tensor([7, 3, 6, 1])
    for training in (True, False):
        reference.train(training)
        fused.train(training)
        x = torch.randn(7, 4, 3, requires_grad=True)
        y1, s1 = reference(x, lengths=lengths)
        y2, s2 = fused(x, lengths=lengths)
        for a, b in zip((y1, *s1), (y2, *s2), strict=True):
            assert_close(a, b)
        g1 = torch.autograd.grad(weighted_loss(y1, s1), [x, *reference.parameters()])
        g2 = torch.autograd.grad(weighted_loss(y2, s2), [x, *fused.parameters()])
        for a, b in zip(g1, g2, strict=True):
            assert_close(a, b)
        assert_states_close(reference.state_dict(), fused.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Bad combinations: one line saying what to do


@pytest.mark.parametrize("make,match", [
    (lambda: rb.LSTM(3, 4, norm="ln", share_statistics_over_time=("input",)), "needs norm='bn'"),
    (lambda: rb.LSTM(3, 4, norm="bn", share_statistics_over_time=("gates",)), "share_statistics_over_time entry"),
    (lambda: rb.LSTM(3, 4, norm="bn", norm_terms=("recurrent",), share_statistics_over_time=("input",)),
     "does not normalize"),
    (lambda: rb.RNN(3, 4, norm="bn", share_statistics_over_time=("input",)), "norm_placement='separate'"),
    (lambda: rb.LSTMCell(3, 4, norm="vbn"), "cannot normalize the input term"),
    (lambda: rb.LSTMCell(3, 4, norm="bn", share_statistics_over_time=("input",)), "use the layer"),
    (lambda: rb.LSTMCell(3, 4, norm="bn")(torch.randn(2, 3)), "step=t"),
    (lambda: rb.LSTMCell(3, 4, norm="bn")(torch.randn(2, 3), step=-1), "step must be"),
    (lambda: rb.LSTMCell(3, 4)(torch.randn(2, 5)), "input must be"),
    (lambda: rb.LSTMCell(3, 4)(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(3, 4))), "state has shape"),
    (lambda: rb.LSTMCell(3, 4)(torch.randn(2, 3), torch.zeros(2, 4)), "tuple"),
    (lambda: rb.RNNCell(3, 4, norm="bn")(torch.randn(2, 3), step=0, mask=torch.ones(3, dtype=torch.bool)),
     "mask must be"),
    (lambda: rb.LSTM(3, 4, bidirectional=True)(torch.randn(5, 2, 3), start_step=5), "bidirectional"),
    (lambda: rb.LSTM(3, 4)(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), lengths=torch.tensor([5, 3])),
     "PackedSequence carries its lengths"),
    (lambda: rb.LSTM(3, 4, bidirectional=True)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),) * 2),
     "initial state has shape"),
])
def test_bad_combinations_raise_one_line_value_errors(make, match):
    with pytest.raises(ValueError, match=match) as error:
        make()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# The model configs: a bidirectional key, BN-e* as a named model


def make_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from recurrent_bn.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_bne_lstm_model_shares_only_the_input_terms_statistics():
    from recurrent_bn.config import validate
    from recurrent_bn.models import build_model

    cfg = make_cfg("task=digits", "model=bne_lstm", "model.hidden_size=8")
    validate(cfg)
    layer = build_model(cfg).recurrent
    assert layer.share_statistics_over_time == ("input",)
    assert layer.norm_ih_l0.slots == 1
    assert layer.norm_hh_l0.slots == layer.norm_c_l0.slots == cfg.task.steps


def test_bidirectional_classifier_reads_each_directions_final_state():
    from recurrent_bn.config import validate
    from recurrent_bn.models import build_model

    cfg = make_cfg("task=digits", "model=bn_lstm", "model.hidden_size=6", "model.bidirectional=true")
    validate(cfg)
    net = build_model(cfg).double().eval()
    x = torch.rand(cfg.task.steps, 3, cfg.task.input_size)
    _, (h_n, _) = net.recurrent(x)
    assert_close(net(x), net.head(torch.cat([h_n[0], h_n[1]], -1)))


def test_bidirectional_language_model_is_refused():
    from recurrent_bn.config import validate
    from recurrent_bn.errors import ConfigError

    with pytest.raises(ConfigError, match="model.bidirectional"):
        validate(make_cfg("task=ptb", "model=lstm", "model.hidden_size=8", "model.bidirectional=true"))


# ------------------------------------------------------------------------------------- batches of one and of none


EMPTY_BATCH_VARIANTS = {
    "none": {"norm": "none"}, "bn": {"norm": "bn"}, "vbn": {"norm": "vbn"}, "ln": {"norm": "ln"},
    "bn-e*": {"norm": "bn", "share_statistics_over_time": ("input",)},
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(EMPTY_BATCH_VARIANTS))
def test_an_empty_batch_gives_what_torch_lstm_gives(backend, variant, training):
    # The fused kernels stopped with "cannot reshape tensor of 0 elements"; the reference loop's batch statistics
    # of no example were NaN and went into the population statistics.
    expected_model = nn.LSTM(3, 4, 2, bidirectional=True)
    model = rb.LSTM(3, 4, 2, bidirectional=True, backend=backend, **EMPTY_BATCH_VARIANTS[variant]).train(training)
    before = [b.clone() for b in model.buffers()]
    results = []
    for layer in (expected_model, model):
        x = torch.randn(5, 0, 3, requires_grad=True)
        output, (h, c) = layer(x)
        (output.sum() + h.sum() + c.sum()).backward()
        results.append((output, h, c, x.grad))
    for expected, got in zip(*results, strict=True):
        assert got.shape == expected.shape
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))


@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_an_empty_batch_through_the_rnn_and_the_cells_gives_empty_states(norm):
    x = torch.randn(4, 0, 2)
    models = rb.RNN(2, 3, 2, norm=norm), rb.LSTMCell(2, 3, norm=norm), rb.RNNCell(2, 3, norm=norm)
    output, h = models[0](x)
    assert output.shape == (4, 0, 3) and h.shape == (2, 0, 3)
    h, c = models[1](x[0], step=0)
    assert h.shape == c.shape == (0, 3)
    assert models[2](x[0], step=0).shape == (0, 3)
    assert nn.RNN(2, 3, 2)(x)[0].shape == (4, 0, 3)  # torch's, for the shapes above
    buffers = [b for model in models for b in model.buffers() if b.is_floating_point()]
    assert all(torch.isfinite(b).all() for b in buffers)  # statistics of no example are not NaN


@pytest.mark.parametrize("make, call", [
    (lambda b: rb.LSTM(2, 3, norm="bn", backend=b), lambda m, x: m(x)),
    (lambda b: rb.LSTM(2, 3, norm="bn", norm_terms=("recurrent",), backend=b), lambda m, x: m(x)),
    (lambda b: rb.LSTM(2, 3, norm="bn", share_statistics_over_time=("input",), backend=b), lambda m, x: m(x)),
    (lambda b: rb.LSTM(2, 3, norm="vbn", backend=b), lambda m, x: m(x[:1])),  # one value: one step of one example
    (lambda b: rb.RNN(2, 3, norm="bn"), lambda m, x: m(x)),
    (lambda b: rb.RNN(2, 3, norm="bn", norm_placement="separate"), lambda m, x: m(x)),
    (lambda b: rb.LSTMCell(2, 3, norm="bn"), lambda m, x: m(x[0], step=0)),
    (lambda b: rb.RNNCell(2, 3, norm="bn"), lambda m, x: m(x[0], step=0)),
], ids=["bn", "bn-recurrent", "bn-e*", "vbn-one-step", "bn-rnn", "bn-rnn-separate", "bn-lstm-cell", "bn-rnn-cell"])
def test_batch_norm_in_training_refuses_a_batch_of_one_in_one_line(backend, make, call):
    # Every example would be normalized by its own statistics: the output would not depend on the input.
    model = make(backend)
    x = torch.randn(4, 1, 2)
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="more than one example per batch") as error:
        call(model, x)
    assert "\n" not in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    model.eval()
    assert torch.isfinite(call(model, x)[0]).all()  # the population statistics take a batch of one


def test_a_batch_of_one_trains_where_no_statistic_is_over_the_batch_alone(backend):
    x = torch.randn(4, 1, 2)
    for model in (rb.LSTM(2, 3, norm="ln", backend=backend), rb.LSTM(2, 3, backend=backend), rb.RNN(2, 3, norm="ln"),
                  rb.LSTMCell(2, 3, norm="ln")):
        output = model(x[0], step=0) if isinstance(model, rb.LSTMCell) else model(x)
        assert torch.isfinite(output[0]).all()
    # Vertical batch norm pools the input term over the batch and time: several values for one example.
    output, _ = rb.LSTM(2, 3, norm="vbn", backend=backend)(x)
    assert output.std() > 0


def test_a_padded_batch_with_one_active_sequence_at_some_steps_trains(backend):
    torch.manual_seed(0)
    model = rb.LSTM(2, 3, norm="bn", backend=backend)
    reference = copy.deepcopy(model)
    reference.backend = "reference"
    x = torch.randn(4, 2, 2)
    lengths = torch.tensor([4, 1])  # from the second step on, one active sequence
    assert_close(model(x, lengths=lengths)[0], reference(x, lengths=lengths)[0])


@pytest.mark.parametrize("build", [
    lambda: rb.LSTM(3, 4, 2, norm="bn", max_length=5, bidirectional=True),
    lambda: rb.LSTM(3, 4, norm="ln", max_length=5, cell_bias=True),
    lambda: rb.LSTM(3, 4, norm="none"),
    lambda: rb.RNN(3, 4, norm="bn", max_length=5),
    lambda: rb.LSTMCell(3, 4, norm="bn", max_length=5),
    lambda: rb.RNNCell(3, 4, norm="ln", max_length=5),
], ids=["bn-lstm", "ln-lstm", "lstm", "bn-rnn", "bn-cell", "ln-rnn-cell"])
def test_a_whole_saved_model_loads_under_torch_loads_default_weights_only(build, tmp_path):
    # Code written for nn.LSTM saves the module itself and reloads it with torch.load's default (weights_only=True):
    # "Unsupported global: GLOBAL recurrent_bn.layers.LSTM" before the package registered its classes.
    torch.manual_seed(0)
    model = build()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt")
    assert type(loaded) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mistake", ["features", "state shape", "no timesteps"])
@pytest.mark.parametrize("make", [lambda: torch.nn.LSTM(3, 4, 2), lambda: rb.LSTM(3, 4, 2, norm="bn", max_length=5)],
                         ids=["torch", "ours"])
def test_wrong_inputs_raise_a_runtime_error_as_torch_lstm_does(make, mistake):
    # Code written for nn.LSTM catches RuntimeError; ours is also a ValueError with a message saying what to pass.
    model, x, state = make(), torch.randn(5, 2, 3), None
    if mistake == "features":
        x = torch.randn(5, 2, 7)
    elif mistake == "state shape":
        state = (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    else:
        x = torch.randn(0, 2, 3)
    with pytest.raises(RuntimeError):
        model(x, state)


@pytest.mark.parametrize("make", [lambda: torch.nn.LSTMCell(3, 4), lambda: rb.LSTMCell(3, 4, norm="ln")],
                         ids=["torch", "ours"])
def test_wrong_cell_inputs_raise_a_runtime_error_as_torch_lstm_cell_does(make):
    cell = make()
    with pytest.raises(RuntimeError):
        cell(torch.randn(2, 7))
    with pytest.raises(RuntimeError):
        cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(3, 4)))


def trained_bn_lstm(steps: int = 6) -> rb.LSTM:
    """A BN-LSTM whose population statistics differ from step to step (a few training passes on drifting inputs)."""
    torch.manual_seed(0)
    lstm = rb.LSTM(3, 4, norm="bn", max_length=steps)
    drift = torch.linspace(0, 2, steps)[:, None, None]
    for _ in range(3):
        lstm(torch.randn(steps, 8, 3) * (1 + drift) + drift)
    return lstm.eval()


def test_generating_one_token_at_a_time_with_start_step_equals_the_whole_sequence():
    lstm, x = trained_bn_lstm(), torch.randn(6, 2, 3)
    whole, _ = lstm(x)
    state, with_step, from_zero = None, [], []
    for t in range(6):
        output, state = lstm(x[t : t + 1], state, start_step=t)
        with_step.append(output)
    torch.testing.assert_close(torch.cat(with_step), whole)
    state = None
    with pytest.warns(UserWarning, match="start_step"):
        for t in range(6):
            output, state = lstm(x[t : t + 1], state)  # the mistake: every step normalized as step 0
            from_zero.append(output)
    assert not torch.allclose(torch.cat(from_zero), whole)


def test_a_bn_layer_stepped_from_step_zero_warns_once_and_only_then(recwarn):
    lstm, x = trained_bn_lstm(), torch.randn(1, 2, 3)
    zeros = (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    state = lstm(x, zeros)[1]  # the first token with an explicit zero state, as torch's example passes it
    for t in range(1, 4):
        state = lstm(x, state, start_step=t)[1]
    lstm(torch.randn(6, 2, 3))  # whole sequences
    ln = rb.LSTM(3, 4, norm="ln").eval()
    ln(x, ln(x, zeros)[1])  # layer norm has no per-step statistics
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    state = lstm(x, zeros)[1]
    with pytest.warns(UserWarning, match="start_step=t"):
        state = lstm(x, state)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstm(x, state)  # once per layer


def stateful_lm_batches(pieces: int = 4, steps: int = 5, batch: int = 6) -> list[torch.Tensor]:
    """Consecutive pieces of `batch` streams, as torch's word-language-model example feeds them."""
    torch.manual_seed(1)
    streams = torch.randn(pieces * steps, batch, 3).cumsum(0) * 0.3  # drifting: a piece's start depends on the past
    return list(streams.split(steps))


def population(lstm: rb.LSTM) -> dict:
    return {k: v.clone() for k, v in lstm.state_dict().items() if "running" in k}


def test_estimate_population_statistics_carries_the_state_across_batches_when_asked():
    lstm, batches = rb.LSTM(3, 4, norm="bn", max_length=5), stateful_lm_batches()

    def carried_by_hand(model, batches):
        state = None
        for batch in batches:
            state = model(batch, state)[1]

    rb.estimate_population_statistics(lstm, batches, carry_state=True)
    carried = population(lstm)
    for norm in rb.layers.batch_norms(lstm):
        norm.reset_running_stats()
        norm.momentum = None
    lstm.train()
    carried_by_hand(lstm, batches)
    assert_states_close(population(lstm), carried)
    rb.estimate_population_statistics(lstm, [(b,) for b in batches], carry_state=True)  # tuple batches too
    assert_states_close(population(lstm), carried)
    rb.estimate_population_statistics(lstm, batches)  # each batch from zeros: other statistics
    fresh = population(lstm)
    assert not all(torch.allclose(fresh[k], carried[k]) for k in carried)
    assert lstm.training  # the mode is put back


def test_estimate_population_statistics_with_a_forward_gets_the_state_when_carrying():
    lstm, batches, seen = rb.LSTM(3, 4, norm="bn", max_length=5), stateful_lm_batches(), []

    def forward(model, batch, state):
        seen.append(state is None)
        return model(batch, state)

    assert rb.estimate_population_statistics(lstm, batches, forward, carry_state=True) == len(batches)
    assert seen == [True] + [False] * (len(batches) - 1)
    with pytest.raises(ValueError, match="output, state"):
        rb.estimate_population_statistics(lstm, batches, lambda model, batch, state: model(batch)[0],
                                          carry_state=True)
