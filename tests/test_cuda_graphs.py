"""The CUDA-graph path of the Triton loops (`triton_lstm.set_cuda_graphs`), everything up to the capture itself, on
the CPU under Triton's interpreter: off CUDA a "replay" runs the same launches again on the same static buffers, so
these tests see what a capture needs (the same numbers as the eager loops, static buffers reused, nothing allocated
and no host synchronization in a replay, a cache keyed by shape, dtype and device). The capture itself runs in
`scripts/gpu_check.py` on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from compare import buffers, run
from interpreted import Allocations, HostSyncs, import_interpreted, wrap_kernels

import recurrent_bn as rb

triton_lstm = import_interpreted()
pytestmark = [
    pytest.mark.skipif(triton_lstm._import_error is not None, reason=f"no triton: {triton_lstm._import_error}"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
]


@pytest.fixture
def graphs():
    """CUDA graphs on, with an empty cache, for one test."""
    triton_lstm.clear_cuda_graphs()
    previous = triton_lstm.set_cuda_graphs(True)
    yield triton_lstm._graphs
    triton_lstm.set_cuda_graphs(previous)
    triton_lstm.clear_cuda_graphs()


def make(norm: str, training: bool, dtype=torch.float64):
    torch.manual_seed(0)
    model = rb.LSTM(2, 3, norm=norm, max_length=4, backend="triton").to(dtype).train(training)
    x = torch.randn(5, 3, 2, dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(1, 3, 3, dtype=dtype, requires_grad=True) for _ in range(2))
    return model, x, hx


def test_switch_is_off_by_default_until_measured_on_a_gpu():
    assert triton_lstm.cuda_graphs_enabled() is False


@pytest.mark.parametrize("norm, training", [("bn", True), ("bn", False), ("ln", True), ("none", True)])
def test_replayed_loops_give_the_eager_numbers_bit_for_bit(graphs, norm, training):
    model, x, hx = make(norm, training)
    eager = copy.deepcopy(model)
    lengths = torch.tensor([5, 2, 4])
    triton_lstm.set_cuda_graphs(False)
    expected = [run(eager, x, hx, lengths) for _ in range(2)]
    triton_lstm.set_cuda_graphs(True)
    got = [run(model, x, hx, lengths) for _ in range(2)]  # the first call captures, the second replays
    for (outputs_e, grads_e), (outputs_g, grads_g) in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(outputs_e, outputs_g, strict=True))
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_e, grads_g, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers(eager), buffers(model), strict=True))
    assert sorted(key[0] for key in graphs) == ["backward", "forward"]
    assert all(loop.calls == 2 for loop in graphs.values())


def test_static_buffers_are_reused_and_the_cache_is_keyed_by_shape_and_dtype(graphs):
    model, x, hx = make("bn", True)
    run(model, x, hx, None)
    pointers = {key: {n: t.data_ptr() for n, t in loop.buffers.items() if t is not None}
                for key, loop in graphs.items()}
    run(model, x, hx, None)
    assert {key: {n: t.data_ptr() for n, t in loop.buffers.items() if t is not None}
            for key, loop in graphs.items()} == pointers
    def leaf(t, batch=3, dtype=torch.float64):
        return t[:, :batch].detach().to(dtype).requires_grad_(True)

    run(model, leaf(x, 2), tuple(leaf(h, 2) for h in hx), None)  # another batch size
    run(model.float(), leaf(x, dtype=torch.float32), tuple(leaf(h, dtype=torch.float32) for h in hx), None)
    assert len(graphs) == 6
    assert {(key[0], key[4]) for key in graphs} == {(d, t) for d in ("forward", "backward")
                                                    for t in (torch.float64, torch.float32)}


def test_the_cache_keeps_the_most_recent_loops(graphs, monkeypatch):
    monkeypatch.setattr(triton_lstm, "GRAPH_CACHE_SIZE", 2)
    model, x, hx = make("none", True)
    for batch in (3, 2, 1):
        with torch.no_grad():
            model(x[:, :batch], tuple(h[:, :batch] for h in hx))
    assert [key[3][0][1][1] for key in graphs] == [2, 1]  # the batch of x's shape, oldest first


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_a_replay_allocates_nothing_and_waits_for_nothing(graphs, monkeypatch, norm):
    model, x, hx = make(norm, True)
    run(model, x, hx, None)  # captures
    syncs, allocations = HostSyncs(), Allocations()

    def paused():
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(syncs.paused())
        stack.enter_context(allocations.paused())
        return stack

    wrap_kernels(monkeypatch, triton_lstm, paused)
    for loop in graphs.values():
        with syncs, allocations:
            loop.replay()
    assert syncs.calls == [] and allocations.calls == []


def test_a_graphed_layer_call_does_not_synchronize_with_the_host(graphs, monkeypatch):
    model, x, hx = make("bn", True)
    run(model, x, hx, None)
    mode = HostSyncs()
    wrap_kernels(monkeypatch, triton_lstm, mode.paused)
    with mode:
        y, (h, c) = model(x, hx)
        (y.sum() + c.sum()).backward()
    assert mode.calls == []
    assert all(loop.calls == 2 for loop in graphs.values())
