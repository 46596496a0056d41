"""`recurrent_bn.triton_lstm` with its kernels defined under Triton's interpreter, for the test modules that run the
Triton path on the CPU (test_triton.py, test_triton_gpu_path.py, test_cuda_graphs.py)."""

from __future__ import annotations

import importlib
import os


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
