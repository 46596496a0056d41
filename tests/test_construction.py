"""Construction and attributes as torch.nn's: code written for torch.nn.LSTM (and RNN, LSTMCell, RNNCell) builds our
layers with the same arguments, positional or keyword, and reads the same attributes (#25)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import recurrent_bn as rb


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def test_lstm_takes_torchs_positional_arguments_in_torchs_order():
    arguments = (10, 20, 2, False, True, 0.25, True)  # input, hidden, layers, bias, batch_first, dropout, bidirectional
    ours, theirs = rb.LSTM(*arguments), nn.LSTM(*arguments)
    for name in ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert shapes(ours) == shapes(theirs)
    y, (h, c) = ours(torch.randn(3, 5, 10))  # batch_first: (B, T, I)
    assert y.shape == theirs(torch.randn(3, 5, 10))[0].shape == (3, 5, 40)


def test_rnn_takes_torchs_positional_arguments_in_torchs_order():
    arguments = (4, 6, 2, "relu", False, False, 0.0, True)  # ..., nonlinearity, bias, batch_first, dropout, bidir.
    ours, theirs = rb.RNN(*arguments), nn.RNN(*arguments)
    for name in ("nonlinearity", "bias", "bidirectional", "dropout"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert shapes(ours) == shapes(theirs)


@pytest.mark.parametrize("ours, theirs", [
    (lambda *a, **k: rb.LSTMCell(*a, **k), nn.LSTMCell),
    (lambda *a, **k: rb.RNNCell(*a, **k), nn.RNNCell),
])
def test_cells_take_torchs_positional_arguments(ours, theirs):
    for bias in (True, False):
        assert shapes(ours(3, 5, bias)) == shapes(theirs(3, 5, bias))


@pytest.mark.parametrize("make", [
    lambda **f: rb.LSTM(3, 4, 2, **f), lambda **f: rb.LSTM(3, 4, norm="bn", bidirectional=True, **f),
    lambda **f: rb.LSTM(3, 4, norm="ln", cell_bias=True, learn_initial_state=True, **f),
    lambda **f: rb.RNN(3, 4, norm="bn", **f), lambda **f: rb.LSTMCell(3, 4, norm="bn", **f),
    lambda **f: rb.RNNCell(3, 4, norm="ln", norm_placement="separate", **f),
])
def test_factory_arguments_place_every_parameter_and_buffer_as_torch_does(make):
    reference = nn.LSTM(3, 4, dtype=torch.float64, device="meta").weight_ih_l0
    model = make(dtype=torch.float64, device="meta")
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    assert tensors and all(t.dtype == reference.dtype and t.device == reference.device for t in tensors)
    assert all(b.device == reference.device for b in model.buffers())
    # And real tensors compute in that dtype.
    model = make(dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output = model(x[0], step=0) if isinstance(model, rb.LSTMCell | rb.RNNCell) else model(x)[0]
    output = output[0] if isinstance(output, tuple) else output
    assert output.dtype == torch.float64


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_weights_read_as_torch_reads_them(layers, bidirectional):
    ours = rb.LSTM(3, 4, layers, bidirectional=bidirectional)
    theirs = nn.LSTM(3, 4, layers, bidirectional=bidirectional)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert [tuple(w.shape) for w in ours._flat_weights] == [tuple(w.shape) for w in theirs._flat_weights]
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == [
        [tuple(w.shape) for w in ws] for ws in theirs.all_weights]
    assert all(w is getattr(ours, name) for w, name in zip(ours._flat_weights, ours._flat_weights_names, strict=True))
    assert ours.weight_hh_l0 is dict(ours.named_parameters())["weight_hh_l0"]


def test_normalized_layers_list_their_own_weights_and_bias():
    model = rb.LSTM(3, 4, norm="bn", bidirectional=True)
    assert model._flat_weights_names == ["weight_ih_l0", "weight_hh_l0", "bias_l0", "weight_ih_l0_reverse",
                                         "weight_hh_l0_reverse", "bias_l0_reverse"]


@pytest.mark.parametrize("ours, theirs", [
    (rb.LSTM(3, 4, norm="bn"), nn.LSTM(3, 4)), (rb.RNN(3, 4), nn.RNN(3, 4)),
    (rb.RNN(3, 4, nonlinearity="relu", norm="ln"), nn.RNN(3, 4, nonlinearity="relu")),
])
def test_mode_is_torchs(ours, theirs):
    assert ours.mode == theirs.mode


def test_flatten_parameters_exists_and_changes_nothing():
    model = rb.LSTM(3, 4, norm="bn").eval()  # a forward in training would update the population statistics
    x = torch.randn(5, 2, 3)
    before = model(x)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.flatten_parameters() is None and nn.LSTM(3, 4).flatten_parameters() is None
    assert torch.equal(model(x)[0], before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_proj_size_zero_is_accepted_and_any_other_is_refused_in_one_line():
    assert rb.LSTM(3, 4, proj_size=0).proj_size == nn.LSTM(3, 4, proj_size=0).proj_size == 0
    nn.LSTM(3, 4, proj_size=2)  # torch has it; we say that we have not
    with pytest.raises(ValueError, match=r"^proj_size=2 is not supported"):
        rb.LSTM(3, 4, proj_size=2)


def test_parameter_order_is_the_one_checkpoints_were_written_with():
    # An optimizer's state is saved by parameter position: a checkpoint written before the layers were built from
    # cells resumes only if the order is unchanged (weights and biases of every direction, then the normalizations).
    model = rb.LSTM(2, 3, 2, norm="bn", bidirectional=True, learn_initial_state=True)
    directions = ("l0", "l0_reverse", "l1", "l1_reverse")
    assert [name for name, _ in model.named_parameters()] == [
        "initial_state",
        *(f"{kind}_{d}" for d in directions for kind in ("weight_ih", "weight_hh", "bias")),
        *(f"{norm}_{d}.{p}" for d in directions
          for norm, p in (("norm_ih", "weight"), ("norm_hh", "weight"), ("norm_c", "weight"), ("norm_c", "bias"))),
    ]
