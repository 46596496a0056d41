"""The fused CPU path of the LSTM layers: a C++ loop over time with a hand-written backward through time.

`backends.pick_backend` sends a layer here when its backend allows it ("auto" or "fused") and its tensors are float32 or
float64 on the CPU. The kernels (`csrc/`: `lstm.cpp` says which file holds what; `lstm.h` is the interface, every
tensor by name) are compiled with `torch.utils.cpp_extension` the first time they are needed (about 20-60 s) and
loaded from PyTorch's extension cache (`~/.cache/torch_extensions`, or `$TORCH_EXTENSIONS_DIR`) afterwards, under a
name that hashes everything the binary depends on (`build_name`), so that checkouts and environments sharing the
cache never rebuild one entry in turn. Without a working compiler, or with the environment variable
`RBN_DISABLE_FUSED=1`, `available()` is False and the layers run the reference loops.

One call covers one layer: the projection W_x x of every timestep, its normalization and the bias, the loop over
time (recurrent term, its per-timestep normalization, gates, cell and its normalization), and in the backward the
loop back through time and the gradients of every input. What it computes is defined by the reference loops in
`recurrence.py`: per-timestep minibatch statistics over the active examples (biased variance, eps inside the square
root, gradients through the statistics), the population statistics as a per-timestep affine map in evaluation,
layer norm per example, padded steps carrying the state. The population statistics are updated here, after the
loop, with the same calls the reference makes. The RNN layers have no fused kernels.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from recurrent_bn.norm import Kind, loop_term
from recurrent_bn.recurrence import DescribedNorm, gradients_with_graph, lstm_loop

if TYPE_CHECKING:
    from recurrent_bn.cells import CellTerms

log = logging.getLogger(__name__)

TERMS = ("input", "recurrent", "cell")  # the extension's names, in the order of the term tensors
TERM_TENSORS = ("gamma", "beta", "scale", "mean")  # `norm.loop_term`; the mean is never trained
DTYPES = (torch.float32, torch.float64)
DISABLE_ENV = "RBN_DISABLE_FUSED"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "lstm.cpp", CSRC / "bindings.cpp"]
EXTENSION_NAME = "recurrent_bn_fused"
# No -march=native: the kernels carry their own AVX2 / AVX-512 variants, chosen at run time.
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)
# Below this many (batch x hidden) elements per timestep one thread does the whole step: splitting it would cost
# more in synchronisation than it saves.
MIN_PARALLEL_WORK = 2048

_extension = None
_reason: str | None = None
_loaded = False


def build_name(
    files: list[Path] | None = None, cflags: tuple[str, ...] = CFLAGS, ldflags: tuple[str, ...] = LDFLAGS
) -> str:
    """The extension's name in the build cache: EXTENSION_NAME and a hash of what the binary depends on (the C++
    files, where they are, the compile and link flags, the compiler, this PyTorch's version and location, the
    Python version).

    PyTorch's cache keys an entry by name alone and rebuilds it whenever the sources, flags or source paths differ
    from its last build, so two checkouts or virtual environments with one name rebuilt it in turn, each waiting on
    the other's lock."""
    files = sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")) if files is None else files
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.resolve()).encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (*cflags, "|", *ldflags, "|", os.environ.get("CXX", "c++"), torch.__version__,
                 str(Path(torch.__file__).resolve().parent), sys.version):
        digest.update(part.encode() + b"\0")
    return f"{EXTENSION_NAME}_{digest.hexdigest()[:16]}"


def _load():
    """Build (first use) or load (cached) the extension; remember why not if that fails."""
    global _extension, _reason, _loaded
    if _loaded:
        return _extension
    _loaded = True
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _reason = f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set"
        return None
    try:
        # Importing cpp_extension logs a warning about CUDA_HOME on CUDA builds without a CUDA toolkit.
        extension_log = logging.getLogger("torch.utils.cpp_extension")
        level = extension_log.level
        extension_log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            extension_log.setLevel(level)
        start = time.perf_counter()
        _extension = cpp_extension.load(
            name=build_name(), sources=[str(path) for path in SOURCES], extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS), verbose=False,
        )
        elapsed = time.perf_counter() - start
        # A load from the cache takes a fraction of a second; anything longer was a compilation.
        log.log(logging.INFO if elapsed > 5 else logging.DEBUG, "fused CPU kernels ready in %.1f s (%s)", elapsed,
                _extension.kernel_variant())
    except Exception as error:  # noqa: BLE001 - any failure to build means: use the reference loops
        message = str(error).strip().splitlines()
        _reason = f"building the C++ extension failed: {message[0] if message else type(error).__name__}"
        _extension = None
    return _extension


def available() -> bool:
    """Whether the fused kernels can run in this process (builds them on first use)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False, or None."""
    _load()
    return _reason


def supports(*tensors: Tensor) -> bool:
    """Whether the fused kernels cover these tensors: all on the CPU, all float32 or all float64."""
    dtype = tensors[0].dtype
    return dtype in DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)


def threads_for(batch: int, hidden: int) -> int:
    """Threads for one layer's loop: PyTorch's setting, or one thread when a timestep is too small to split."""
    return torch.get_num_threads() if batch * hidden >= MIN_PARALLEL_WORK else 1


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch's CPU operations inside run on the calling thread alone.

    For bookkeeping whose numbers do not depend on how it is split (elementwise operations, `index_add_`, whose every
    element adds its sources in index order): the population update runs in it. At (steps x features) in float64 it
    takes milliseconds, and spread over threads while another process holds a core, each of its parallel operations
    waited for a thread that was not running, for up to a time slice (about 100 ms of a 400 ms BN-LSTM training step
    at the sMNIST shape). Sets OpenMP's thread count of this thread only, which ATen's parallel loops and oneDNN
    read; `torch.set_num_threads` would also reset oneDNN's caches. Not for matrix products, nor for the kernels:
    MKL keeps the count `torch.set_num_threads` gave it, or follows this one, and its sums depend on it; the
    kernels' blocks are split by the thread count."""
    if _load() is None:
        yield
        return
    before = _extension.set_omp_threads(1)
    try:
        yield
    finally:
        _extension.set_omp_threads(before)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_empty(tensors: list[Tensor | None], like: Tensor) -> list[Tensor]:
    return [_empty(like) if t is None else t.detach() for t in tensors]


def _specs(kinds: list[Kind], eps: list[float], term_tensors: list[Tensor | None], like: Tensor) -> dict:
    """The three terms as the extension's `TermSpec`s, by name (input, recurrent, cell)."""
    tensors = _or_empty(list(term_tensors), like)
    return {name: _extension.TermSpec(int(kinds[i]), eps[i], *tensors[4 * i : 4 * i + 4])
            for i, name in enumerate(TERMS)}


def _statistics(saved) -> list[tuple[Tensor, Tensor]]:
    """(mean, var) of each term's batch statistics, for the population update."""
    return [(getattr(saved, name).mean, getattr(saved, name).var) for name in TERMS]


class FusedLSTMFunction(torch.autograd.Function):
    """One LSTM layer over a whole sequence, from its input x, with a hand-written backward through time.

    Inputs: `config` (a dict: kinds, eps, threads; the forward stores the batch statistics in it), x (T, B, I),
    W_x (4H, I), h0, c0 (B, H), W_h (4H, H), the bias (4H) or None, the mask (T, B) or None, then for each term
    (input, recurrent, cell) gamma, beta, scale, mean (`norm.loop_term`; None where absent).
    """

    @staticmethod
    def forward(ctx, config, x, weight_ih, h0, c0, weight_hh, bias, mask, *term_tensors):
        empty = _empty(x)
        specs = _specs(config["kinds"], config["eps"], term_tensors, x)
        result = _extension.lstm_forward(
            x=x, weight_ih=weight_ih, h0=h0, c0=c0, weight_hh=weight_hh, bias=empty if bias is None else bias,
            mask=empty if mask is None else mask, save=True, threads=config["threads"], **specs,
        )
        config["stats"] = _statistics(result.saved)
        ctx.saved, ctx.specs, ctx.config = result.saved, specs, config
        ctx.save_for_backward(x, weight_ih, h0, c0, weight_hh, bias, mask, *term_tensors)
        return result.output, result.h, result.c

    @staticmethod
    def backward(ctx, grad_output, grad_h, grad_c):
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is a first derivative only (a gradient penalty through it
            # silently lost its second-order part), so recompute through the reference loop and differentiate that.
            grads = gradients_with_graph(functools.partial(_reference, ctx.config), ctx.saved_tensors,
                                         ctx.needs_input_grad[1:], (grad_output, grad_h, grad_c))
            return None, *grads
        x, weight_ih, _, _, weight_hh, bias, mask, *term_tensors = ctx.saved_tensors
        empty = _empty(x)
        grads = _extension.lstm_backward(
            d_output=grad_output, d_h=grad_h, d_c=grad_c, x=x, weight_ih=weight_ih, weight_hh=weight_hh,
            bias=empty if bias is None else bias, mask=empty if mask is None else mask, saved=ctx.saved,
            threads=ctx.config["threads"], need_dx=ctx.needs_input_grad[1], **ctx.specs,
        )
        term_grads = [getattr(getattr(grads, name), part) for name in TERMS for part in TERM_TENSORS]
        term_grads = [grad if term_tensors[k] is not None and ctx.needs_input_grad[8 + k] else None
                      for k, grad in enumerate(term_grads)]
        return (None, grads.x if ctx.needs_input_grad[1] else None, grads.weight_ih, grads.h0, grads.c0,
                grads.weight_hh, grads.bias if bias is not None else None, None, *term_grads)


def _reference(config: dict, x: Tensor, weight_ih: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
               bias: Tensor | None, mask: Tensor | None, *term_tensors) -> tuple[Tensor, Tensor, Tensor]:
    """What the kernels compute from `FusedLSTMFunction`'s inputs, in plain PyTorch (for second derivatives)."""
    norms = [DescribedNorm(kind, eps, term_tensors[4 * k : 4 * k + 4], mask)
             for k, (kind, eps) in enumerate(zip(config["kinds"], config["eps"], strict=True))]
    input_term = norms[0].sequence(F.linear(x, weight_ih))
    if bias is not None:
        input_term = input_term + bias
    return lstm_loop(input_term, h0, c0, weight_hh, norms[1], norms[2], mask)


def lstm(terms: CellTerms, x: Tensor, state: tuple[Tensor, Tensor], mask: Tensor | None, start_step: int = 0
         ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`recurrence.lstm` on the fused kernels (same signature, `backends.py`): same results, same updates of the
    population statistics. The projection W_x x and its gradients run on oneDNN for float32."""
    weight_ih, weight_hh, bias = terms.weight_ih, terms.weight_hh, terms.bias
    norm_ih, norm_hh, norm_c = terms.norm_ih, terms.norm_hh, terms.norm_out
    h, c = state
    if _load() is None:
        raise RuntimeError(f"the fused kernels are unavailable ({_reason}): use backend='reference'")
    steps, batch = x.shape[:2]
    hidden = h.shape[-1]
    mask = None if mask is None else mask.contiguous()
    described = [
        loop_term(norm_ih, steps, start_step, input_term=True),
        loop_term(norm_hh, steps, start_step),
        loop_term(norm_c, steps, start_step),
    ]
    config = {
        "kinds": [kind for kind, _, _ in described],
        "eps": [float(eps) for _, eps, _ in described],
        "threads": threads_for(batch, hidden),
    }
    term_tensors = [t for _, _, tensors in described for t in tensors]
    h, c = h.contiguous(), c.contiguous()
    inputs = [x, weight_ih, h, c, weight_hh, bias, *term_tensors]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        output, h_n, c_n = FusedLSTMFunction.apply(config, x, weight_ih, h, c, weight_hh, bias, mask, *term_tensors)
    else:
        empty = _empty(x)
        result = _extension.lstm_forward(
            x=x, weight_ih=weight_ih.detach(), h0=h.detach(), c0=c.detach(), weight_hh=weight_hh.detach(),
            bias=empty if bias is None else bias.detach(), mask=empty if mask is None else mask, save=False,
            threads=config["threads"], **_specs(config["kinds"], config["eps"], term_tensors, x),
        )
        output, h_n, c_n = result.output, result.h, result.c
        config["stats"] = _statistics(result.saved)
    # The population statistics, with the reference's one update (RecurrentBatchNorm.record_pass).
    for (kind, _, _), module, (mean, var) in zip(described, (norm_ih, norm_hh, norm_c), config["stats"], strict=True):
        if kind in (Kind.SHARED, Kind.BATCH):
            with one_thread():
                module.record_pass(mean, var, mask=mask, steps=steps, batch=batch, start_step=start_step,
                                   pooled=kind == Kind.SHARED)
    return output, (h_n, c_n)


def kernel_variant() -> str | None:
    """The instruction-set variant the float32 kernels run ("avx512", "avx2", "baseline"), or None."""
    return None if _load() is None else _extension.kernel_variant()


def last_profile() -> list[list[float]] | None:
    """Where the last fused call's time went: per thread [matrix products, elementwise, waiting] seconds for the
    forward and the backward loops, then [seconds of the dW_h product]."""
    return None if _load() is None else _extension.last_profile()
