"""PyTorch's own LSTM and LSTMCell module tests, ported: what `test/test_nn.py` and the LSTM entries of
`torch/testing/_internal/common_modules.py` check of `torch.nn.LSTM`, run against it and against `recurrent_bn.LSTM`.

Written from what those tests check, not copied: shapes of the output and the states for every layout (bias,
batch_first, bidirectional, two layers, input 2 and hidden 3 as common_modules samples them), unbatched input,
the errors code catches, packed sequences, dropout, double precision, `to()`, deepcopy and pickle,
`functional_call`, weight norm, state-dict parity and whole-module save and load.

Each test runs on "torch" (`torch.nn.LSTM`) and "none" (`recurrent_bn.LSTM(norm="none")`), and on "bn" and "ln"
where the property does not depend on nn.LSTM's numbers.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recurrent_bn as rb

INPUT, HIDDEN, LAYERS, STEPS, BATCH = 2, 3, 2, 4, 3  # common_modules' LSTM samples: input 2, hidden 3, two layers
ALL = ("torch", "none", "bn", "ln")


def make_lstm(impl: str, num_layers: int = LAYERS, **kwargs) -> nn.Module:
    if impl == "torch":
        return nn.LSTM(INPUT, HIDDEN, num_layers, **kwargs)
    extra = {"max_length": STEPS} if impl == "bn" else {}
    return rb.LSTM(INPUT, HIDDEN, num_layers, norm=impl, **extra, **kwargs)


def make_cell(impl: str, **kwargs) -> nn.Module:
    if impl == "torch":
        return nn.LSTMCell(INPUT, HIDDEN, **kwargs)
    extra = {"max_length": STEPS} if impl == "bn" else {}
    return rb.LSTMCell(INPUT, HIDDEN, norm=impl, **extra, **kwargs)


def call_cell(cell: nn.Module, x: torch.Tensor, hx=None):
    """One step; ours takes the timestep, which batch norm needs."""
    return cell(x, hx) if isinstance(cell, nn.LSTMCell) else cell(x, hx, step=0)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, so that tests do not pass by an initialization's symmetry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return model


def states(num_layers: int = LAYERS, directions: int = 1, batch: int | None = BATCH, seed: int = 1):
    shape = (num_layers * directions, HIDDEN) if batch is None else (num_layers * directions, batch, HIDDEN)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def inputs(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ shapes and layouts


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("impl", ALL)
def test_output_and_state_shapes_are_torchs_for_every_layout(impl, bias, batch_first, bidirectional):
    model = make_lstm(impl, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    directions = 2 if bidirectional else 1
    x = inputs(BATCH, STEPS, INPUT) if batch_first else inputs(STEPS, BATCH, INPUT)
    for hx in (None, states(directions=directions)):
        output, (h_n, c_n) = model(x, hx)
        expected = (BATCH, STEPS, directions * HIDDEN) if batch_first else (STEPS, BATCH, directions * HIDDEN)
        assert output.shape == expected
        assert h_n.shape == c_n.shape == (LAYERS * directions, BATCH, HIDDEN)


@pytest.mark.parametrize("impl", ["torch", "none", "ln"])
def test_bidirectional_final_states_are_the_last_positions_each_direction_reads(impl):
    # h_n holds the forward direction's state after the last position and the reverse direction's after the first.
    model = make_lstm(impl, bidirectional=True)
    output, (h_n, _) = model(inputs(STEPS, BATCH, INPUT))
    torch.testing.assert_close(output[-1, :, :HIDDEN], h_n[-2])
    torch.testing.assert_close(output[0, :, HIDDEN:], h_n[-1])


@pytest.mark.parametrize("impl", ALL)
def test_batch_first_is_the_time_major_run_transposed(impl):
    torch.manual_seed(0)
    time_major = make_lstm(impl).eval()
    batch_first = make_lstm(impl, batch_first=True).eval()
    batch_first.load_state_dict(time_major.state_dict())
    x = inputs(STEPS, BATCH, INPUT)
    expected, (h, c) = time_major(x)
    output, (h_bf, c_bf) = batch_first(x.transpose(0, 1))
    torch.testing.assert_close(output, expected.transpose(0, 1))
    torch.testing.assert_close((h_bf, c_bf), (h, c))


@pytest.mark.parametrize("impl", ALL)
def test_no_initial_state_is_a_zero_initial_state(impl):
    model = make_lstm(impl).eval()
    x = inputs(STEPS, BATCH, INPUT)
    zeros = (torch.zeros(LAYERS, BATCH, HIDDEN), torch.zeros(LAYERS, BATCH, HIDDEN))
    torch.testing.assert_close(model(x), model(x, zeros))


@pytest.mark.parametrize("impl", ALL)
def test_a_non_contiguous_input_gives_the_contiguous_inputs_output(impl):
    model = make_lstm(impl).eval()
    x = inputs(BATCH, STEPS, INPUT).transpose(0, 1)
    assert not x.is_contiguous()
    torch.testing.assert_close(model(x), model(x.contiguous()))


# ------------------------------------------------------------------------------------------ parity with nn.LSTM


@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_none_computes_nn_lstms_outputs_and_gradients_with_its_state_dict(bias, batch_first, bidirectional,
                                                                          given_state):
    ours = randomize_(make_lstm("none", bias=bias, batch_first=batch_first, bidirectional=bidirectional).double())
    theirs = make_lstm("torch", bias=bias, batch_first=batch_first, bidirectional=bidirectional).double()
    theirs.load_state_dict(ours.state_dict())
    x = inputs(STEPS, BATCH, INPUT).double()
    x = x.transpose(0, 1) if batch_first else x
    hx = tuple(s.double() for s in states(directions=2 if bidirectional else 1)) if given_state else None
    results = []
    for model in (ours, theirs):
        model.zero_grad()
        output, (h_n, c_n) = model(x, hx)
        (output.sin().sum() + h_n.cos().sum() + c_n.square().sum()).backward()
        results.append((output, h_n, c_n, {k: p.grad for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_state_dicts_load_both_ways_between_nn_lstm_and_none(bias, bidirectional):
    ours, theirs = make_lstm("none", bias=bias, bidirectional=bidirectional), make_lstm(
        "torch", bias=bias, bidirectional=bidirectional)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(randomize_(ours).state_dict())  # strict: same names, same shapes
    ours.load_state_dict(randomize_(theirs, seed=5).state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


def test_cell_none_computes_nn_lstm_cells_step_with_its_state_dict():
    ours, theirs = randomize_(make_cell("none").double()), make_cell("torch").double()
    theirs.load_state_dict(ours.state_dict())
    x, hx = inputs(BATCH, INPUT).double(), tuple(s[0].double() for s in states())
    torch.testing.assert_close(call_cell(ours, x, hx), theirs(x, hx), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ errors code catches


def mistaken_call(mistake: str):
    """(input, hx) for one mistake test_nn.py's argument checks make, and the exception nn.LSTM raises."""
    x, (h, c) = inputs(STEPS, BATCH, INPUT), states()
    return {
        "input features": ((inputs(STEPS, BATCH, INPUT + 1), None), RuntimeError),
        "no timesteps": ((inputs(0, BATCH, INPUT), None), RuntimeError),
        "state batch": ((x, (h[:, :2], c[:, :2])), RuntimeError),
        "state hidden size": ((x, (torch.zeros(LAYERS, BATCH, HIDDEN + 1), c)), RuntimeError),
        "state layers": ((x, (h[:1], c[:1])), RuntimeError),
        "cell state only wrong": ((x, (h, c[:, :2])), RuntimeError),
        "2-D state for batched input": ((x, (h[:, 0], c[:, 0])), RuntimeError),
        "3-D state for unbatched input": ((x[:, 0], (h, c)), RuntimeError),
        "1-D input": ((x[0, 0], None), ValueError),
        "4-D input": ((x[None], None), ValueError),
    }[mistake]


MISTAKES = ["input features", "no timesteps", "state batch", "state hidden size", "state layers",
            "cell state only wrong", "2-D state for batched input", "3-D state for unbatched input",
            "1-D input", "4-D input"]


@pytest.mark.parametrize("mistake", MISTAKES)
@pytest.mark.parametrize("impl", ALL)
def test_wrong_input_or_state_raises_what_nn_lstm_raises(impl, mistake):
    (x, hx), error = mistaken_call(mistake)
    model = make_lstm(impl).eval()
    with pytest.raises(error):
        model(x, hx)


@pytest.mark.parametrize("hx", ["a tensor", "three tensors"])
@pytest.mark.parametrize("impl", ALL)
def test_a_state_that_is_not_the_pair_h_c_raises_a_runtime_error(impl, hx):
    x, (h, c) = inputs(STEPS, BATCH, INPUT), states()
    with pytest.raises(RuntimeError):
        make_lstm(impl)(x, h if hx == "a tensor" else (h, c, c))


CELL_MISTAKES = {
    "input features": ((inputs(BATCH, INPUT + 1), None), RuntimeError),
    "state batch": ((inputs(BATCH, INPUT), (torch.zeros(BATCH + 1, HIDDEN), torch.zeros(BATCH + 1, HIDDEN))),
                    RuntimeError),
    "state hidden size": ((inputs(BATCH, INPUT), (torch.zeros(BATCH, HIDDEN + 1), torch.zeros(BATCH, HIDDEN))),
                          RuntimeError),
    "one state": ((inputs(BATCH, INPUT), (torch.zeros(BATCH, HIDDEN),)), RuntimeError),
    "3-D input": ((inputs(1, BATCH, INPUT), None), ValueError),
}


@pytest.mark.parametrize("mistake", list(CELL_MISTAKES))
@pytest.mark.parametrize("impl", ALL)
def test_wrong_cell_input_or_state_raises_what_nn_lstm_cell_raises(impl, mistake):
    (x, hx), error = CELL_MISTAKES[mistake]
    cell = make_cell(impl).eval()
    with pytest.raises(error):
        call_cell(cell, x, hx)


@pytest.mark.parametrize("dropout", [-0.1, 1.1])
@pytest.mark.parametrize("impl", ALL)
def test_a_dropout_outside_zero_to_one_is_refused(impl, dropout):
    with pytest.raises(ValueError):
        make_lstm(impl, dropout=dropout)


# ------------------------------------------------------------------------------------------ unbatched input


@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("impl", ALL)
def test_unbatched_input_computes_a_batch_of_one(impl, batch_first, bidirectional, given_state):
    # common_modules' no-batch-dim reference: (T, input_size) whatever batch_first says, states (D * L, H).
    # Evaluation: batch norm in training refuses a batch of one (its statistics would be over one example).
    model = make_lstm(impl, batch_first=batch_first, bidirectional=bidirectional).eval()
    directions = 2 if bidirectional else 1
    x = inputs(STEPS, INPUT)
    hx = states(directions=directions, batch=None) if given_state else None
    output, (h_n, c_n) = model(x, hx)
    assert output.shape == (STEPS, directions * HIDDEN)
    assert h_n.shape == c_n.shape == (LAYERS * directions, HIDDEN)
    batched_hx = None if hx is None else tuple(s.unsqueeze(1) for s in hx)
    expected, (h, c) = model(x.unsqueeze(0 if batch_first else 1), batched_hx)
    torch.testing.assert_close(output, expected.squeeze(0 if batch_first else 1))
    torch.testing.assert_close((h_n, c_n), (h.squeeze(1), c.squeeze(1)))


@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("impl", ALL)
def test_unbatched_cell_input_computes_a_batch_of_one(impl, given_state):
    cell = make_cell(impl).eval()
    x = inputs(INPUT)
    hx = (inputs(HIDDEN, seed=3), inputs(HIDDEN, seed=4)) if given_state else None
    h, c = call_cell(cell, x, hx)
    assert h.shape == c.shape == (HIDDEN,)
    expected = call_cell(cell, x[None], None if hx is None else tuple(s[None] for s in hx))
    torch.testing.assert_close((h, c), tuple(s[0] for s in expected))


# ------------------------------------------------------------------------------------------ packed sequences


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("impl", ALL)
def test_a_packed_batch_gives_each_sequence_run_alone(impl, enforce_sorted, bidirectional):
    # Evaluation, so that batch norm uses population statistics and each sequence's result is its own.
    model = make_lstm(impl, bidirectional=bidirectional).eval()
    lengths = torch.tensor([4, 3, 2]) if enforce_sorted else torch.tensor([2, 4, 3])
    x = inputs(STEPS, BATCH, INPUT)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    output, (h_n, c_n) = model(packed)
    assert torch.equal(output.batch_sizes, packed.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        ours, expected = getattr(output, name), getattr(packed, name)
        assert (ours is None and expected is None) or torch.equal(ours, expected)
    padded, out_lengths = pad_packed_sequence(output)
    assert torch.equal(out_lengths, lengths)
    for b, length in enumerate(lengths.tolist()):
        alone, (h, c) = model(x[:length, b : b + 1])
        torch.testing.assert_close(padded[:length, b : b + 1], alone)
        torch.testing.assert_close((h_n[:, b : b + 1], c_n[:, b : b + 1]), (h, c))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_none_on_a_packed_batch_computes_nn_lstms_result(enforce_sorted, bidirectional):
    ours = randomize_(make_lstm("none", bidirectional=bidirectional).double())
    theirs = make_lstm("torch", bidirectional=bidirectional).double()
    theirs.load_state_dict(ours.state_dict())
    lengths = torch.tensor([4, 3, 1]) if enforce_sorted else torch.tensor([1, 4, 3])
    packed = pack_padded_sequence(inputs(STEPS, BATCH, INPUT).double(), lengths, enforce_sorted=enforce_sorted)
    hx = tuple(s.double() for s in states(directions=2 if bidirectional else 1))
    (out_ours, state_ours), (out_theirs, state_theirs) = ours(packed, hx), theirs(packed, hx)
    torch.testing.assert_close(out_ours.data, out_theirs.data, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state_ours, state_theirs, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("impl", ALL)
def test_dropout_one_drops_every_input_to_the_upper_layer_in_training(impl):
    # test_nn's dropout check with p = 1: the last layer then reads zeros, so the output no longer depends on x.
    torch.manual_seed(0)
    model = make_lstm(impl, dropout=1.0).train()
    first, second = model(inputs(STEPS, BATCH, INPUT, seed=1))[0], model(inputs(STEPS, BATCH, INPUT, seed=2))[0]
    torch.testing.assert_close(first, second)
    model.eval()  # and no dropout in evaluation
    assert not torch.allclose(model(inputs(STEPS, BATCH, INPUT, seed=1))[0], model(inputs(STEPS, BATCH, INPUT))[0])


@pytest.mark.parametrize("impl", ALL)
def test_dropout_acts_in_training_only(impl):
    model = make_lstm(impl, dropout=0.5)
    x = inputs(STEPS, BATCH, INPUT)
    torch.manual_seed(0)
    first = model(x)[0]
    torch.manual_seed(1)
    assert not torch.allclose(first, model(x)[0])
    model.eval()
    plain = make_lstm(impl).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))


@pytest.mark.parametrize("impl", ALL)
def test_changing_dropout_after_construction_takes_effect(impl):
    # test_nn's test_RNN_change_dropout: the attribute is read at every call.
    model = make_lstm(impl, dropout=0.0).train()
    x = inputs(STEPS, BATCH, INPUT)
    torch.manual_seed(0)
    before = model(x)[0]
    model.dropout = 1.0
    after = model(x)[0]
    torch.testing.assert_close(after, model(inputs(STEPS, BATCH, INPUT, seed=9))[0])
    assert not torch.allclose(before, after)


# ------------------------------------------------------------------------------------------ dtypes, devices, copies


@pytest.mark.parametrize("impl", ALL)
def test_double_precision_runs_in_double_and_passes_gradcheck(impl):
    model = make_lstm(impl, num_layers=1).double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = inputs(3, 2, INPUT).double().requires_grad_()
    h0, c0 = (s[:1, :2].double().requires_grad_() for s in states())
    output, (h_n, c_n) = model(x, (h0, c0))
    assert output.dtype == h_n.dtype == c_n.dtype == torch.float64

    def run(x, h0, c0):
        output, (h_n, c_n) = model(x, (h0, c0))
        return output, h_n, c_n

    assert torch.autograd.gradcheck(run, (x, h0, c0))


@pytest.mark.parametrize("impl", ALL)
def test_to_moves_parameters_and_buffers_and_back(impl):
    model = make_lstm(impl).eval()
    x = inputs(STEPS, BATCH, INPUT)
    expected = model(x)[0]
    assert model.to(torch.float64) is model
    assert all(t.dtype == torch.float64 for t in [*model.parameters(), *(b for b in model.buffers()
                                                                          if b.is_floating_point())])
    assert model(x.double())[0].dtype == torch.float64
    model.to("cpu", torch.float32)
    torch.testing.assert_close(model(x)[0], expected)


def trained(impl: str) -> nn.Module:
    """A model after one training forward (batch norm's population statistics moved) and in evaluation."""
    torch.manual_seed(0)
    model = make_lstm(impl)
    model(inputs(STEPS, BATCH, INPUT, seed=6))
    return model.eval()


@pytest.mark.parametrize("impl", ALL)
def test_a_deep_copy_computes_the_same_and_owns_its_parameters(impl):
    model = trained(impl)
    clone = copy.deepcopy(model)
    x = inputs(STEPS, BATCH, INPUT)
    torch.testing.assert_close(clone(x), model(x))
    with torch.no_grad():  # random, not constant: layer norm would remove a constant shift of every weight
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    assert not torch.allclose(clone(x)[0], model(x)[0])


@pytest.mark.parametrize("impl", ALL)
def test_a_pickled_model_computes_the_same(impl):
    model = trained(impl)
    x = inputs(STEPS, BATCH, INPUT)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x))


@pytest.mark.parametrize("impl", ALL)
def test_a_whole_saved_model_reloads_under_weights_only(impl):
    # torch.load's default is weights_only=True. torch.nn.LSTM itself is not on its list of safe classes (a user
    # allows it); our modules register themselves at import, so a model of them reloads with no extra step.
    model = trained(impl)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([nn.LSTM] if impl == "torch" else []):
        loaded = torch.load(buffer)
    x = inputs(STEPS, BATCH, INPUT)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("impl", ALL)
def test_functional_call_runs_with_the_parameters_given(impl):
    model = make_lstm(impl).eval()
    x = inputs(STEPS, BATCH, INPUT)
    before = model(x)[0]
    replaced = {name: torch.full_like(p, 0.2) for name, p in model.named_parameters()}
    output = functional_call(model, replaced, (x,))[0]
    reference = copy.deepcopy(model)
    reference.load_state_dict(replaced, strict=False)
    torch.testing.assert_close(output, reference(x)[0])
    assert not torch.allclose(output, before)
    torch.testing.assert_close(model(x)[0], before)  # the module's own parameters are back


@pytest.mark.parametrize("impl", ALL)
def test_weight_norm_on_a_recurrent_weight_keeps_the_output_and_trains_its_parts(impl):
    model = randomize_(make_lstm(impl)).eval()  # weights of the size that makes the recurrent term matter
    x = inputs(STEPS, BATCH, INPUT)
    expected = model(x)[0].detach()
    weight_norm(model, "weight_hh_l0")
    output = model(x)[0]
    torch.testing.assert_close(output, expected)
    output.sum().backward()
    parts = model.parametrizations.weight_hh_l0
    assert parts.original0.grad is not None and parts.original1.grad is not None
    with torch.no_grad():  # the direction reaches the computation (batch norm of W_h h ignores the magnitude)
        parts.original1.add_(torch.randn_like(parts.original1))
    assert not torch.allclose(model(x)[0], expected)


@pytest.mark.parametrize("impl", ALL)
def test_an_lstm_cell_trains_on_a_loop_of_steps(impl):
    # test_nn's LSTMCell check: a few steps from no state, a backward through all of them.
    cell = make_cell(impl)
    h = c = None
    total = 0
    for t in range(STEPS):
        x = inputs(BATCH, INPUT, seed=t)
        h, c = cell(x, None if h is None else (h, c)) if impl == "torch" else cell(
            x, None if h is None else (h, c), step=t)
        assert h.shape == c.shape == (BATCH, HIDDEN)
        total = total + h.sum()
    total.backward()
    assert all(p.grad is not None for p in (cell.weight_ih, cell.weight_hh))


# ------------------------------------------------------------------------------------------ waiting for core24


@pytest.mark.parametrize("impl", ("torch", "none", "bn"))
def test_positional_arguments_in_nn_lstms_order(impl):
    # (input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
    cls = nn.LSTM if impl == "torch" else rb.LSTM
    extra = {} if impl == "torch" else {"norm": impl}
    model = cls(INPUT, HIDDEN, 2, False, True, 0.5, True, **extra)
    assert (model.bias, model.batch_first, model.dropout, model.bidirectional) == (False, True, 0.5, True)


@pytest.mark.parametrize("impl", ("torch", "none", "bn"))
def test_factory_arguments_place_every_parameter(impl):
    model = make_lstm(impl, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("impl", ("torch", "none"))
def test_all_weights_and_flat_weights_list_the_parameters_in_torchs_order(impl):
    model = make_lstm(impl, bidirectional=True)
    names = [f"{kind}_l{layer}{suffix}" for layer in range(LAYERS) for suffix in ("", "_reverse")
             for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert model._flat_weights_names == names
    assert all(w is getattr(model, n) for w, n in zip(model._flat_weights, names, strict=True))
    assert [[w.shape for w in layer] for layer in model.all_weights] == [
        [getattr(model, n).shape for n in names[i : i + 4]] for i in range(0, len(names), 4)]


@pytest.mark.parametrize("impl", ("torch", "none", "bn"))
def test_mode_names_the_lstm(impl):
    assert make_lstm(impl).mode == "LSTM"


@pytest.mark.parametrize("impl", ("none", "bn"))
def test_proj_size_is_zero_and_a_projection_is_refused_in_one_line(impl):
    assert make_lstm(impl).proj_size == 0
    with pytest.raises(ValueError, match="proj_size"):
        make_lstm(impl, proj_size=2)


@pytest.mark.parametrize("impl", ("torch", "none", "bn"))
def test_flatten_parameters_changes_nothing_computed(impl):
    model = make_lstm(impl).eval()
    x = inputs(STEPS, BATCH, INPUT)
    expected = model(x)
    assert model.flatten_parameters() is None
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("impl", ALL)
def test_unbatched_rnn_and_rnn_cell_input_compute_a_batch_of_one(impl):
    # nn.RNN and nn.RNNCell take the same unbatched forms as the LSTM: (T, input_size) with h (L, H); (input_size,).
    if impl == "torch":
        rnn, cell = nn.RNN(INPUT, HIDDEN, LAYERS), nn.RNNCell(INPUT, HIDDEN)
    else:
        extra = {"max_length": STEPS} if impl == "bn" else {}
        rnn, cell = rb.RNN(INPUT, HIDDEN, LAYERS, norm=impl, **extra), rb.RNNCell(INPUT, HIDDEN, norm=impl, **extra)
    rnn.eval(), cell.eval()
    x, h0 = inputs(STEPS, INPUT), states(batch=None)[0]
    output, h_n = rnn(x, h0)
    expected, h = rnn(x[:, None], h0[:, None])
    torch.testing.assert_close((output, h_n), (expected[:, 0], h[:, 0]))
    step = cell(x[0], h0[0]) if impl == "torch" else cell(x[0], h0[0], step=0)
    batched = cell(x[:1], h0[:1]) if impl == "torch" else cell(x[:1], h0[:1], step=0)
    torch.testing.assert_close(step, batched[0])


# ------------------------------------------------------------------------------------------ initialization


@pytest.mark.parametrize("bidirectional", [False, True])
def test_by_default_none_starts_from_nn_lstms_weights_under_the_same_seed(bidirectional):
    # A user swapping nn.LSTM for recurrent_bn.LSTM keeps nn.LSTM's initialization (U(-1/sqrt(H), 1/sqrt(H)), drawn
    # in the same order), not the authors' orthogonal one with forget bias 1, which trained worse out of the box.
    torch.manual_seed(0)
    theirs = make_lstm("torch", bidirectional=bidirectional)
    torch.manual_seed(0)
    ours = make_lstm("none", bidirectional=bidirectional)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    torch.manual_seed(0)
    theirs_cell = make_cell("torch")
    torch.manual_seed(0)
    for name, value in make_cell("none").state_dict().items():
        assert torch.equal(theirs_cell.state_dict()[name], value), name
