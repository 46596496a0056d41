"""Helpers for the tests that hold a fast path to the reference loops (test_fused.py, test_triton.py): one training
pass that returns everything to compare, and the comparison itself."""

from __future__ import annotations

import torch


def run(model, x, hx, lengths, start_step=0, seed=2):
    """Outputs, final states, gradients of a weighted loss w.r.t. the input, initial states and every parameter."""
    torch.manual_seed(seed)  # the same dropout masks for both paths
    y, (h, c) = model(x, hx, lengths, start_step=start_step)
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype) for t in (y, h, c)]
    loss = sum((t * w).sum() for t, w in zip((y, h, c), weights, strict=True))
    grads = torch.autograd.grad(loss, [x, *hx, *model.parameters()], allow_unused=True)
    return [y.detach(), h.detach(), c.detach()], list(grads)


def assert_all_close(a, b, tol, what):
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}[{i}]: one is None"
            continue
        assert u.shape == v.shape, f"{what}[{i}]: shapes {tuple(u.shape)} and {tuple(v.shape)}"
        assert torch.allclose(u, v, atol=tol, rtol=tol), f"{what}[{i}]: max difference {float((u - v).abs().max())}"


def buffers(model):
    return [b.clone() for b in model.buffers()]


def float32_errors(reference, x, hx, backends, lengths=None) -> dict[str, list[float]]:
    """Relative error against the float64 `reference` of each backend's float32 run (outputs, states, gradients)."""
    import copy

    outputs64, grads64 = run(reference, x, hx, lengths)
    errors = {}
    for backend in backends:
        model = copy.deepcopy(reference).float()
        model.backend = backend
        x32 = x.detach().float().requires_grad_(True)
        hx32 = tuple(h.detach().float().requires_grad_(True) for h in hx)
        outputs, grads = run(model, x32, hx32, lengths)
        errors[backend] = [float((a.float() - b).abs().max() / a.abs().max().clamp(min=1e-30))
                           for a, b in zip(outputs64 + grads64, outputs + grads, strict=True) if a is not None]
    return errors
