"""Which loop runs one direction of an LSTM layer over a sequence, chosen once per call (`pick_backend`), and the one
signature every loop has:

    run(terms, x, state, mask, start_step) -> (output, state)

`terms` is the direction's `cells.CellTerms` (weights, bias, normalizations), x the time-major input (T, B, I),
state (h, c) of (B, H), mask (T, B) of valid positions or None, start_step the index of x[0] (which picks the
batch-norm statistics). Each loop folds its batch statistics into the population statistics once after the loop,
with `RecurrentBatchNorm.record_pass`. The loops: the reference (`recurrence.lstm`, plain PyTorch, any device), the
C++ kernels (`fused.lstm`, CPU) and the Triton kernels (`triton_lstm.lstm`, CUDA). The RNN has only the reference
loop (`recurrence.rnn`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from recurrent_bn import recurrence

BACKENDS = ("auto", "reference", "fused", "triton")


def pick_backend(setting: str, x: Tensor, *tensors: Tensor) -> str:
    """Which loop runs one LSTM layer: "triton", "fused" or "reference", decided once per call from the layer's
    `backend` setting, its input x (T, B, I) and the other tensors the kernels would read (W_x, h_0, c_0, W_h).

    - "reference": the reference loop.
    - "triton": the Triton kernels, or one RuntimeError line saying why they cannot run on x.
    - "fused": the compiled CPU kernels on CPU tensors they cover (all float32 or all float64), else the reference
      loop with one warning per process and reason saying why; one RuntimeError line when the kernels are
      unavailable.
    - "auto": Triton on CUDA tensors its kernels take, the fused kernels on CPU tensors they cover (one warning per
      process when they are unavailable), else the reference loop.
    An empty batch runs the reference loop, which returns empty outputs as torch.nn.LSTM does.
    """
    if triton_chosen(setting, x):
        return "triton" if x.shape[1] > 0 else "reference"
    if fused_chosen(setting, x) and x.shape[1] > 0:
        from recurrent_bn import fused

        if fused.supports(x, *tensors):
            return "fused"
    if setting == "fused" and x.shape[1] > 0:
        dtypes = sorted({str(t.dtype) for t in (x, *tensors)})
        _say_once(f"backend='fused' runs the reference loop on {x.device.type} tensors of {dtypes}: the fused "
                  "kernels take CPU tensors, all float32 or all float64")
    return "reference"


_said: set[str] = set()


def _say_once(message: str) -> None:
    """A warning the first time this process cannot honour an explicit choice for this reason."""
    if message not in _said:
        _said.add(message)
        warnings.warn(f"recurrent_bn: {message}", RuntimeWarning, stacklevel=4)


def triton_chosen(setting: str, x: Tensor) -> bool:
    """"triton" (which raises with one line when its kernels cannot run on x), or "auto" on a CUDA tensor they take."""
    if setting not in ("triton", "auto") or (setting == "auto" and x.device.type != "cuda"):
        return False
    from recurrent_bn import triton_lstm

    if setting == "triton":
        triton_lstm.check(x)
        return True
    return triton_lstm.covers(x)


def fused_chosen(setting: str, x: Tensor) -> bool:
    """"fused" or "auto" on a CPU tensor, with the kernels available (`recurrence.use_fused` raises or warns when
    not). Only CPU tensors can use them: the extension is never built for a GPU run."""
    return x.device.type == "cpu" and setting != "triton" and recurrence.use_fused(setting)


def _fused(terms, x: Tensor, state, mask: Tensor | None, start_step: int):
    from recurrent_bn import fused

    return fused.lstm(terms, x, state, mask, start_step)


def _triton(terms, x: Tensor, state, mask: Tensor | None, start_step: int):
    """triton_lstm.lstm with its own argument order (its module is rewritten separately; adapt here, not there)."""
    from recurrent_bn import triton_lstm

    (h, c) = state
    output, h, c = triton_lstm.lstm(x, terms.weight_ih, h, c, terms.weight_hh, terms.norm_ih, terms.bias,
                                    terms.norm_hh, terms.norm_out, mask, start_step)
    return output, (h, c)


LSTM_LOOPS: dict[str, Callable] = {"reference": recurrence.lstm, "fused": _fused, "triton": _triton}


def run_lstm(setting: str, terms, x: Tensor, state: tuple[Tensor, Tensor], mask: Tensor | None, start_step: int
             ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM direction over x on the loop `pick_backend` chooses for the `backend` setting."""
    h, c = state
    backend = pick_backend(setting, x, terms.weight_ih, h, c, terms.weight_hh)
    return LSTM_LOOPS[backend](terms, x, state, mask, start_step)
