"""For the test modules that run the Triton path on the CPU (test_triton.py, test_triton_gpu_path.py,
test_cuda_graphs.py): `recurrent_bn.triton_lstm` with its kernels defined under Triton's interpreter, and recorders
of host synchronizations and allocations that leave the kernel launches out."""

from __future__ import annotations

import contextlib
import importlib
import os
import types

from torch.overrides import TorchFunctionMode


def import_interpreted():
    """recurrent_bn.triton_lstm with its kernels defined under the interpreter (its `_import_error` says if triton is
    missing). TRITON_INTERPRET=1 has to be set when the kernels are defined, and triton reads it again when they run:
    it stays set for this process."""
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module("recurrent_bn.triton_lstm")
    if not module.INTERPRETED:  # imported earlier without the interpreter: define the kernels again
        if module.kernels is not None:
            importlib.reload(module.kernels)
        module = importlib.reload(module)
    return module


# Calls that copy device memory to the host (or host numbers to the device) and so wait for the stream.
SYNCHRONIZING = {"tensor", "as_tensor", "item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero",
                 "numpy", "cpu", "masked_select", "unique", "_local_scalar_dense"}
KERNELS = ("lstm_step_forward_columns", "lstm_step_forward_rows", "lstm_step_backward_columns",
           "lstm_step_backward_rows")


class HostSyncs(TorchFunctionMode):
    """Records every synchronizing torch call made while it is active, except inside kernel launches (the interpreter
    itself copies tensors to numpy; on a GPU the launch is asynchronous)."""

    watched = SYNCHRONIZING

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if not self._paused and name in self.watched:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        """Record nothing inside (a kernel launch)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


class Allocations(HostSyncs):
    """Records every call that allocates a tensor while it is active (outside kernel launches)."""

    watched = {"empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_empty",
               "new_zeros", "new_ones", "new_full", "clone", "tensor", "randn", "arange", "stack", "cat"}


def wrap_kernels(monkeypatch, triton_lstm, around):
    """Replace the four kernels of `triton_lstm` by ones that run inside `around()` (a context manager) at each
    launch."""

    class Wrapped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                with around():
                    return launch(*args, **kwargs)

            return call

    namespace = types.SimpleNamespace(**{name: Wrapped(getattr(triton_lstm.kernels, name)) for name in KERNELS})
    monkeypatch.setattr(triton_lstm, "kernels", namespace)
