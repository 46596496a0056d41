"""What the Triton path must get right before its first GPU run, checked on the CPU under Triton's interpreter
(issue #26): bf16 autocast (CPU autocast stands in for CUDA's), no host synchronization inside a layer call (a
`torch.tensor` from Python numbers, `.item()`, `.tolist()`... would wait for the GPU and break CUDA-graph capture),
the kernels launched on the tensors' device, and `backend="auto"` saying why it leaves the kernels."""

from __future__ import annotations

import contextlib
import types
import warnings

import pytest
import torch
from interpreted import HostSyncs, import_interpreted, wrap_kernels

import recurrent_bn as rb

triton_lstm = import_interpreted()
pytestmark = [
    pytest.mark.skipif(triton_lstm._import_error is not None, reason=f"no triton: {triton_lstm._import_error}"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
]

def model_and_input(norm: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = rb.LSTM(2, 3, norm=norm, max_length=4, backend="triton").to(dtype)
    x = torch.randn(4, 3, 2, dtype=dtype, requires_grad=True)
    return model, x


@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_bf16_autocast_runs_and_is_as_accurate_as_the_reference_under_the_same_autocast(norm):
    # Under autocast the loop runs in float32 from a bf16 input product. custom_fwd(cast_inputs=...) handed the
    # forward a copy of the config dict, so the statistics it wrote there never reached the caller: KeyError 'stats'.
    torch.manual_seed(0)
    model = rb.LSTM(8, 6, norm=norm, max_length=4, backend="triton")
    reference = rb.LSTM(8, 6, norm=norm, max_length=4, backend="reference")
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 5, 8)
    results = {}
    for name, layer, autocast in (("float32", reference, False), ("reference", reference, True),
                                  ("triton", model, True)):
        x_layer = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, (h, c) = layer(x_layer)
            (y.float().square().sum() + h.float().sum()).backward()
        results[name] = [y.float(), h.float(), c.float(), x_layer.grad, *[p.grad for p in layer.parameters()]]
        for p in layer.parameters():
            p.grad = None
    # Relative to the float32 run: bf16's 8 bits in both autocast runs, the Triton one no further off.
    for k, (exact, ours, theirs) in enumerate(zip(*results.values(), strict=True)):
        scale = exact.abs().max().clamp(min=1e-3)
        error, reference_error = float((ours - exact).abs().max() / scale), float((theirs - exact).abs().max() / scale)
        assert error <= max(3 * reference_error, 2e-2), (k, error, reference_error)
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())


def test_autocast_keeps_float32_states_and_statistics():
    model, x = model_and_input("bn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = model(x)
    assert (y.dtype, h.dtype, c.dtype) == (torch.float32,) * 3
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_a_layer_call_does_not_synchronize_with_the_host(monkeypatch, norm, training):
    model, x = model_and_input(norm)
    model.train(training)
    model(x)[0].sum().backward()  # the first call may build what later calls reuse
    mode = HostSyncs()
    wrap_kernels(monkeypatch, triton_lstm, mode.paused)
    with mode:
        y, (h, c) = model(x)
        (y.sum() + h.sum()).backward()
    assert mode.calls == []


def test_device_guard_is_the_tensors_device():
    guard = triton_lstm.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(triton_lstm.on_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_every_launch_runs_under_the_device_guard_of_its_tensors(monkeypatch, norm):
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.pop()

    launches: list[list[torch.device]] = []

    @contextlib.contextmanager
    def check_guard():
        launches.append(list(entered))
        yield

    monkeypatch.setattr(triton_lstm, "on_device", recording)
    wrap_kernels(monkeypatch, triton_lstm, check_guard)
    model, x = model_and_input(norm)
    model(x)[0].sum().backward()
    assert len(launches) == 2 * x.shape[0]  # forward and backward of every timestep
    assert all(guards and guards[-1] == x.device for guards in launches)


def test_auto_on_cuda_takes_float64_and_says_in_one_line_why_it_leaves_half_precision():
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float64)
    assert triton_lstm.unusable_reason(cuda) is None
    assert triton_lstm.covers(cuda)
    half = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not triton_lstm.covers(half)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "reference" in messages[0] and "autocast" in messages[0]
    assert "\n" not in messages[0]


def test_versions_older_than_the_floor_stop_with_one_line(monkeypatch):
    assert triton_lstm.version_problem("2.11.0+cu130", "3.6.0") is None
    assert triton_lstm.version_problem("2.14.1", "3.8.0") is None
    for versions, name in ((("2.10.1+cu128", "3.6.0"), "torch >= 2.11"), (("2.11.0", "3.5.1"), "triton >= 3.6")):
        message = triton_lstm.version_problem(*versions)
        assert name in message and "\n" not in message
    monkeypatch.setattr(triton_lstm, "_version_error", triton_lstm.version_problem("2.11.0", "3.5.1"))
    with pytest.raises(RuntimeError, match="needs triton >= 3.6"):
        rb.LSTM(2, 3, backend="triton")(torch.randn(4, 2, 2))
