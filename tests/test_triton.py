"""The Triton path (`backend="triton"`) against the reference loops, run on the CPU under Triton's interpreter.

The reference loops (`recurrence.py`, differentiated by autograd) define the function; the Triton kernels
(`triton_kernels.py`, one fused kernel per timestep and a hand-written backward) must compute the same one: in
float64 to ~1e-10 and in float32 about as accurately as the reference's own float32, for every LSTM variant, in
training and evaluation, with padding, with sequences longer than `max_length`, on two layers, population statistics
included. The interpreter runs each program one after another in numpy (slow, and blind to races between programs):
shapes are tiny, and the full matrix is marked slow.

TRITON_INTERPRET=1 has to be set when the kernels are defined (and triton reads it again when they run):
`interpreted.import_interpreted` sets it in this process before it imports (or re-imports)
`recurrent_bn.triton_lstm`; only the Triton test modules use triton.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compare import assert_all_close, buffers, float32_errors, run
from interpreted import import_interpreted

import recurrent_bn as rb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gpu_check import VARIANTS  # noqa: E402  (every LSTM variant of the Triton path: one list, checked on GPUs too)

triton_lstm = import_interpreted()
needs_triton = pytest.mark.skipif(
    triton_lstm._import_error is not None, reason=f"triton cannot be imported: {triton_lstm._import_error}"
)
pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")]

TOL = 1e-10

# (steps, batch, input, hidden, layers, max_length): T > max_length, two layers, batch 3 so that one sequence is
# padded from its second step.
SHAPE = (5, 3, 2, 3, 2, 3)
# Fast in `make test`: every kernel kind (none, batch, affine, layer; both layouts) once in training and once in
# evaluation; everything else is in `make test-slow`.
FAST = {("bn", True, True), ("bn", False, True), ("ln", True, True),
        ("bn-input-recurrent-cell-bias", True, False), ("none", True, True)}


def cases():
    for variant in VARIANTS:
        for training in (True, False):
            for with_lengths in (False, True):
                marks = () if (variant, training, with_lengths) in FAST else (pytest.mark.slow,)
                name = f"{variant}-{'train' if training else 'eval'}-{'lengths' if with_lengths else 'full'}"
                yield pytest.param(variant, training, with_lengths, marks=marks, id=name)


def randomize(model, seed=0):
    """Random parameters (γ in [0.2, 1]) and random population statistics, so nothing passes by a special value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "weight" in name:
                p.copy_(torch.rand(p.shape, generator=generator) * 0.8 + 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        for module in model.modules():
            if isinstance(module, rb.RecurrentBatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.trained_length.fill_(module.slots)
    return model


def pair(kwargs, input_size, hidden, layers, max_length, dtype=torch.float64, **extra):
    reference = rb.LSTM(input_size, hidden, layers, max_length=max_length, backend="reference", **kwargs, **extra)
    reference = randomize(reference).to(dtype)
    fast = copy.deepcopy(reference)
    fast.backend = "triton"
    return reference, fast


def inputs(steps, batch, input_size, hidden, layers, with_lengths, dtype=torch.float64, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, input_size, generator=generator, dtype=dtype).requires_grad_(True)
    hx = tuple(
        (torch.randn(layers, batch, hidden, generator=generator, dtype=dtype) * 0.5).requires_grad_(True)
        for _ in range(2)
    )
    lengths = torch.tensor([steps, 1, *range(steps - 2, 0, -1)][:batch]) if with_lengths else None
    assert lengths is None or len(lengths) == batch
    return x, hx, lengths


@pytest.mark.parametrize("variant, training, with_lengths", list(cases()))
def test_triton_matches_reference_in_float64(variant, training, with_lengths):
    steps, batch, input_size, hidden, layers, max_length = SHAPE
    reference, fast = pair(VARIANTS[variant], input_size, hidden, layers, max_length, dropout=0.3)
    reference.train(training)
    fast.train(training)
    x, hx, lengths = inputs(steps, batch, input_size, hidden, layers, with_lengths)
    before = buffers(fast)
    outputs_ref, grads_ref = run(reference, x, hx, lengths, start_step=1)
    outputs_fast, grads_fast = run(fast, x, hx, lengths, start_step=1)
    assert_all_close(outputs_ref, outputs_fast, TOL, "outputs")
    assert_all_close(grads_ref, grads_fast, TOL, "gradients")
    assert_all_close(buffers(reference), buffers(fast), TOL, "buffers")
    if training and VARIANTS[variant]["norm"] in ("bn", "vbn"):
        # The population statistics moved (the test would pass trivially if neither path updated them).
        assert not all(torch.equal(a, b) for a, b in zip(before, buffers(fast), strict=True))


@pytest.mark.parametrize("variant", ["bn", pytest.param("ln", marks=pytest.mark.slow), "none"])
def test_triton_float32_is_as_accurate_as_the_reference_float32(variant):
    # Both float32 paths against the float64 reference: the Triton one may not be much further from it than the
    # reference's own float32 run.
    steps, batch, input_size, hidden, layers, max_length = 6, 4, 3, 5, 1, 6
    reference, fast = pair(VARIANTS[variant], input_size, hidden, layers, max_length)
    reference32 = copy.deepcopy(reference).float()
    fast = fast.float()
    x, hx, lengths = inputs(steps, batch, input_size, hidden, layers, with_lengths=True)
    outputs64, grads64 = run(reference, x, hx, lengths)
    errors = {}
    for name, model in (("reference", reference32), ("triton", fast)):
        x32 = x.detach().float().requires_grad_(True)
        hx32 = tuple(h.detach().float().requires_grad_(True) for h in hx)
        outputs, grads = run(model, x32, hx32, lengths)
        errors[name] = [
            float((a.float() - b).abs().max() / a.abs().max().clamp(min=1.0))
            for a, b in zip(outputs64 + grads64, outputs + grads, strict=True)
        ] + [float((a.float() - b).abs().max()) for a, b in zip(buffers(reference), buffers(model), strict=True)]
    for reference_error, triton_error in zip(errors["reference"], errors["triton"], strict=True):
        assert triton_error <= 4 * reference_error + 1e-5, (triton_error, reference_error)
    assert max(errors["triton"][:3]) < 1e-5  # outputs and final states


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layers", [1, 2])
def test_triton_float32_error_is_within_ten_times_the_reference_float32_error(training, layers):
    # Small activations (γ = 0.001: every output ~1e-5) and inputs with |mean| >> std, from population statistics
    # of such data: a tanh with an absolute error of one ulp of 1 (2 sigmoid(2x) - 1) lost 2 to 4 of float32's
    # 7 digits here, and an affine map folded into x * scale + shift cancels when |mean| >> std.
    steps, batch, input_size, hidden = 5, 8, 3, 4
    torch.manual_seed(0)
    reference = rb.LSTM(input_size, hidden, layers, norm="bn", gamma_init=1e-3, max_length=steps,
                        backend="reference").double()
    generator = torch.Generator().manual_seed(1)

    def data():
        noise = torch.randn(steps, batch, input_size, generator=generator, dtype=torch.float64)
        return 3.0 + 0.01 * noise

    rb.estimate_population_statistics(reference, [data() for _ in range(3)])
    reference.train(training)
    x = data().requires_grad_(True)
    hx = tuple(torch.zeros(layers, batch, hidden, dtype=torch.float64, requires_grad=True) for _ in range(2))
    errors = float32_errors(reference, x, hx, ("reference", "triton"))
    assert len(errors["triton"]) == len(errors["reference"])
    for k, (reference_error, triton_error) in enumerate(zip(errors["reference"], errors["triton"], strict=True)):
        assert triton_error <= 10 * reference_error + 1e-6, (k, triton_error, reference_error)


def test_triton_no_grad_passes_update_the_population_like_the_reference():
    # The pass that re-estimates the statistics runs without autograd, in training mode, over several batches.
    reference, fast = pair({"norm": "bn"}, 2, 3, 1, 3)
    batches = [inputs(4, 3, 2, 3, 1, with_lengths=True, seed=s)[0].detach() for s in range(2)]
    for model in (reference, fast):
        rb.estimate_population_statistics(model, batches)
    assert_all_close(buffers(reference), buffers(fast), TOL, "buffers")
    reference.eval()
    fast.eval()
    with torch.no_grad():
        assert_all_close([reference(batches[0])[0]], [fast(batches[0])[0]], TOL, "outputs")


def test_triton_zero_variance_and_fully_padded_timesteps():
    # Leading zero inputs and equal initial states: the recurrent term's batch variance is exactly zero (the
    # normalization divides by sqrt(eps), where a float32 eps would show); a timestep where no example is active.
    reference, fast = pair({"norm": "bn"}, 1, 3, 1, 10)
    x = torch.zeros(4, 3, 1, dtype=torch.float64)
    x[2:] = torch.randn(2, 3, 1, dtype=torch.float64)
    x.requires_grad_(True)
    hx = tuple(torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lengths = torch.tensor([3, 2, 1])
    outputs_ref, grads_ref = run(reference, x, hx, lengths)
    outputs_fast, grads_fast = run(fast, x, hx, lengths)
    assert_all_close(outputs_ref, outputs_fast, TOL, "outputs")
    assert_all_close(grads_ref, grads_fast, 1e-8, "gradients")  # gradients of size 1/sqrt(eps)
    assert_all_close(buffers(reference), buffers(fast), TOL, "buffers")


def _gradcheck(variant, training, fast_mode):
    torch.manual_seed(4)
    model = randomize(rb.LSTM(2, 2, max_length=2, backend="triton", **VARIANTS[variant])).double()
    model.train(training)
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 1, 2])
    names = [n for n, _ in model.named_parameters()]

    def f(x, h0, c0, *values):
        parameters = dict(zip(names, values, strict=True))
        y, (h, c) = torch.func.functional_call(model, parameters, (x, (h0, c0)), {"lengths": lengths})
        return y, h, c

    values = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    assert torch.autograd.gradcheck(f, (x, h0, c0, *values), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.slow
@pytest.mark.parametrize("variant, training", [("bn", True), ("ln", True)])
def test_triton_gradcheck_fast_mode(variant, training):
    _gradcheck(variant, training, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant, training", [("bn", True), ("bn", False), ("ln", True), ("none", True)])
def test_triton_gradcheck(variant, training):
    _gradcheck(variant, training, fast_mode=False)


def test_gradient_penalty_through_the_triton_path_matches_torch_lstm():
    # A gradient of a gradient (create_graph=True) recomputes through the reference loop: the kernels' backward is a
    # first derivative only, and without that its second-order part was silently missing.
    torch.manual_seed(0)
    expected_model = torch.nn.LSTM(2, 3).double()
    model = rb.LSTM(2, 3, backend="triton").double()
    model.load_state_dict(expected_model.state_dict())
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    gradients = []
    for layer in (expected_model, model):
        x_layer = x.clone().requires_grad_(True)
        output, _ = layer(x_layer)
        (slope,) = torch.autograd.grad(output.sum(), x_layer, create_graph=True)
        gradients.append(torch.autograd.grad(output.sum() + 10 * slope.square().sum(), [x_layer, *layer.parameters()]))
    assert_all_close(gradients[1], gradients[0], TOL, "penalized gradients")


@pytest.mark.parametrize("variant, training", [("bn", True), ("bn", False),
                                               pytest.param("ln", True, marks=pytest.mark.slow)])
def test_triton_gradgradcheck(variant, training):
    torch.manual_seed(4)
    model = randomize(rb.LSTM(1, 2, max_length=2, backend="triton", **VARIANTS[variant])).double()
    model.train(training)
    x = torch.randn(2, 3, 1, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 1, 2])
    names = [n for n, _ in model.named_parameters()]

    def f(x, *values):
        parameters = dict(zip(names, values, strict=True))
        y, (h, c) = torch.func.functional_call(model, parameters, (x,), {"lengths": lengths})
        return y, h, c

    values = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    assert torch.autograd.gradgradcheck(f, (x, *values), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_empty_batch_gives_what_torch_lstm_gives_and_a_batch_of_one_is_refused_in_training(training):
    expected_model = torch.nn.LSTM(2, 3, 2)
    model = rb.LSTM(2, 3, 2, norm="bn", backend="triton").train(training)
    shapes = []
    for layer in (expected_model, model):
        x = torch.randn(4, 0, 2, requires_grad=True)
        output, (h, c) = layer(x)
        (output.sum() + h.sum()).backward()
        shapes.append([tuple(t.shape) for t in (output, h, c, x.grad)])
    assert shapes[1] == shapes[0]
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())
    if training:
        with pytest.raises(ValueError, match="more than one example per batch"):
            model(torch.randn(4, 1, 2))


def test_cpu_tensors_without_the_interpreter_stop_with_one_line(monkeypatch):
    monkeypatch.setattr(triton_lstm, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1") as error:
        rb.LSTM(2, 3, backend="triton")(torch.randn(4, 2, 2))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_cpu_tensors_without_the_interpreter_stop_with_one_line_in_a_fresh_process():
    code = (
        "import torch, recurrent_bn as rb\n"
        "try:\n"
        "    rb.LSTM(2, 3, norm='bn', backend='triton')(torch.randn(4, 2, 2))\n"
        "except RuntimeError as error:\n"
        "    print('ERROR', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "TRITON_INTERPRET=1" in lines[0], result.stdout + result.stderr


def test_missing_triton_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(triton_lstm, "_import_error", "No module named 'triton'")
    with pytest.raises(RuntimeError, match="needs triton, which cannot be imported") as error:
        rb.LSTM(2, 3, backend="triton")(torch.randn(4, 2, 2))
    assert "\n" not in str(error.value)


def test_dtypes_the_kernels_do_not_take_stop_with_one_line():
    model = rb.LSTM(2, 3, norm="bn", backend="triton").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        model(torch.randn(4, 2, 2, dtype=torch.bfloat16))


def test_auto_on_cpu_never_takes_the_triton_path_and_off_cpu_never_the_fused_one(monkeypatch):
    # "auto" must not build the CPU extension for tensors it cannot take, nor run the interpreter on the CPU.
    from recurrent_bn import recurrence

    def refuse(*args, **kwargs):
        raise AssertionError("asked for the fused kernels")

    model = rb.LSTM(2, 3, norm="bn", backend="auto")
    monkeypatch.setattr(recurrence, "use_fused", refuse)
    assert not model._use_fused(torch.empty(1, device="meta"))
    assert not model._uses_triton(torch.empty(1))
    assert not model._uses_triton(torch.empty(1, device="meta"))
    assert triton_lstm.covers(torch.empty(1)) is False


def test_rnn_with_backend_triton_is_torch_rnn_without_norm_and_the_bn_rnn_equations_with_it():
    """The RNN has no Triton kernels: backend="triton" must still compute the RNN. Against torch.nn.RNN (norm
    "none", same state dict) and against a float64 transcription of h_t = tanh(BN(W_x x_t + W_h h_{t-1}; γ, β))
    with per-timestep batch statistics in training, the stored population statistics in evaluation."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    ours = rb.RNN(2, 3, backend="triton").double()
    theirs = torch.nn.RNN(2, 3).double()
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(ours(x), theirs(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    model = randomize(rb.RNN(2, 3, norm="bn", max_length=5, backend="triton")).double()
    w_ih, w_hh = model.weight_ih_l0, model.weight_hh_l0
    norm = model.norm_l0
    for training in (True, False):
        model.train(training)
        mean, var = norm.running_mean.clone(), norm.running_var.clone()  # what evaluation reads
        output, h_n = model(x)
        h, expected = torch.zeros(4, 3, dtype=torch.float64), []
        for t in range(5):
            z = x[t] @ w_ih.T + h @ w_hh.T
            m, v = (z.mean(0), z.var(0, unbiased=False)) if training else (mean[t], var[t])
            h = torch.tanh(norm.weight * (z - m) / torch.sqrt(v + 1e-5) + norm.bias)
            expected.append(h)
        torch.testing.assert_close(output, torch.stack(expected), rtol=0, atol=1e-12)
        torch.testing.assert_close(h_n[0], h, rtol=0, atol=1e-12)


@needs_triton
def test_the_kernels_number_the_kinds_as_norm_kind():
    # the kernels compare plain integers: they must be norm.Kind's, as the C++ enum's are (test_fused)
    from recurrent_bn.norm import Kind

    assert {kind.name: triton_lstm.kernels.__dict__[kind.name].value for kind in Kind} == {k.name: int(k) for k in Kind}
