"""The Triton path of the LSTM layers (`backend="triton"`, and `"auto"` on CUDA tensors).

Shaped like the fused CPU path (`fused.py`): the input term `norm_ih(W_x x) + b` of every timestep is one matrix
product and one vectorized normalization (the same module calls as the reference, so its population statistics are
updated the same way); then one autograd function runs the loop over time. Per timestep forward: one matrix product
`W_h h_{t-1}` and one fused kernel (`triton_kernels.py`: the recurrent term's statistics, its normalization, the
input term and bias, the gates, the cell update, the cell's normalization and h). Per timestep backward: one fused
kernel and one matrix product (`dh_{t-1} = keep + dr_t W_h`); `dW_h` is one matrix product after the loop, and the
γ/β (or per-timestep scale/mean) gradients are vectorized reductions after it. In evaluation the batch norms'
population statistics become per-timestep maps `(x - mean_t) * scale_t + β` before the loop (never folded into
`x * scale_t + shift_t`, which cancels in float32 when |mean| >> std). The batch statistics the
kernels compute update the population statistics after the loop, with the calls the reference makes.

Under autocast (CUDA's, or the CPU's in the tests) the loop runs in float32: the input product is in the autocast
dtype, the statistics, states and per-step products are float32. The cast is done here rather than by
`custom_fwd(cast_inputs=...)`, which copies every dict argument and is tied to one device type.

A layer call never waits for the device (no `torch.tensor` from Python numbers, no `.item()`): the constants the kernels
read from memory are built once per (values, dtype, device) with fills, and the batch statistics come back as outputs
of the autograd function. That is also what CUDA-graph capture needs. Every launch runs under the tensors' device
(`on_device`): Triton launches on the current CUDA device, which need not be the tensors' (`trainer.device=cuda:1`).

On the CPU the kernels only run under Triton's interpreter, `TRITON_INTERPRET=1` set before this module is first
imported (for tests: slow, one program after another).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn.norm import loop_term
from recurrent_bn.recurrence import DescribedNorm, gradients_with_graph, lstm_loop

# How a term is normalized: the C++ enum's numbers (csrc/common.h), which the kernels use too (triton_kernels.py).
NONE, LAYER, BATCH, SHARED, AFFINE = 0, 1, 2, 3, 4
KINDS = {"none": NONE, "layer": LAYER, "batch": BATCH, "shared": SHARED, "affine": AFFINE}
KIND_NAMES = {code: name for name, code in KINDS.items()}


def kind_code(kind: str | int) -> int:
    """The kernels' code of the kind `norm.loop_term` returns: its name today; after #24 `norm.Kind`, an IntEnum with
    the same numbers, whose value is the code (then this is `int(kind)`). SHARED never reaches the kernels: only an
    input term, normalized before the loop, pools its statistics over time."""
    return KINDS[kind] if isinstance(kind, str) else int(kind)
INTERPRET_ENV = "TRITON_INTERPRET"
# Read once: the interpreter replaces @triton.jit at the moment the kernels are defined.
INTERPRETED = os.environ.get(INTERPRET_ENV, "0") not in ("", "0")

# The oldest versions the Triton path was tested with (tests/test_triton*.py under the interpreter; the kernels
# compile for sm_90): the GPU machines this project can borrow run torch 2.11 and Triton 3.6.
MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.11.0+cu130"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def version_problem(torch_version: str, triton_version: str) -> str | None:
    """Why these torch and Triton versions are too old for the Triton path, in one line, or None."""
    for name, version, floor in (("torch", torch_version, MIN_TORCH), ("triton", triton_version, MIN_TRITON)):
        if _release(version) < floor:
            return (f"backend='triton' needs {name} >= {'.'.join(map(str, floor))} (found {version}); upgrade it "
                    "(pip install 'recurrent-bn[gpu]') or use backend='reference'")
    return None


try:
    import triton

    from recurrent_bn import triton_kernels as kernels

    _import_error: str | None = None
    _version_error = version_problem(torch.__version__, triton.__version__)
except ImportError as error:  # e.g. macOS wheels of torch come without triton
    triton = None
    kernels = None
    _import_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    _version_error = None


def unusable_reason(x: Tensor) -> str | None:
    """Why the Triton path cannot run on tensors like `x`, in one line, or None."""
    if _import_error is not None:
        return f"backend='triton' needs triton, which cannot be imported ({_import_error}); use backend='reference'"
    if _version_error is not None:
        return _version_error
    if x.device.type == "cuda":
        if x.dtype not in (torch.float32, torch.float64):
            return (f"backend='triton' on a GPU takes float32 or float64 parameters and inputs (bf16 through "
                    f"autocast), got {x.dtype}; use backend='reference'")
        return None
    if x.device.type == "cpu":
        if not INTERPRETED:
            return (f"backend='triton' on CPU tensors needs {INTERPRET_ENV}=1 in the environment before recurrent_bn "
                    "is imported (Triton's slow interpreter, for tests); on the CPU use backend='fused' or 'auto'")
        if x.dtype not in (torch.float32, torch.float64):
            return f"backend='triton' under the interpreter takes float32 or float64, got {x.dtype}"
        return None
    return f"backend='triton' runs on CUDA tensors (or CPU ones under {INTERPRET_ENV}=1), not on {x.device.type}"


def covers(x: Tensor) -> bool:
    """Whether `backend="auto"` takes the Triton path for `x`: a CUDA tensor the kernels take. A CUDA tensor they do
    not take (bf16/fp16 parameters) goes to the reference loop, tens of times slower: say so, once per dtype."""
    if x.device.type != "cuda":
        return False
    reason = unusable_reason(x)
    if reason is not None and x.dtype not in _warned_dtypes:
        _warned_dtypes.add(x.dtype)
        warnings.warn(f"backend='auto' runs the slow reference loop for {x.dtype} CUDA tensors: the Triton kernels "
                      "take float32 or float64 parameters; keep them float32 and use bf16 through autocast",
                      stacklevel=3)
    return reason is None


_warned_dtypes: set[torch.dtype] = set()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context the kernels launch in: `device` current for CUDA tensors (Triton launches on the current device,
    cuBLAS follows the tensors), nothing otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def eps_tensor(eps_recurrent: float, eps_cell: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[eps_recurrent, eps_cell] in the working dtype on `device`, built once: filled on the device (a `torch.tensor`
    from Python numbers would be a host-to-device copy that waits for the stream and breaks graph capture) and
    reused by every later call, which a captured graph needs. The kernels read eps from memory because a float
    argument would be rounded to float32."""
    eps = torch.empty(2, dtype=dtype, device=device)
    eps[0].fill_(eps_recurrent)
    eps[1].fill_(eps_cell)
    return eps


def check(x: Tensor) -> None:
    """Raise with one line if the Triton path cannot run on tensors like `x`."""
    reason = unusable_reason(x)
    if reason is not None:
        raise RuntimeError(reason)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def layout(kinds: tuple[int, int]) -> str:
    """"rows" when a term is layer-normalized (its statistics are over a row), otherwise "columns"."""
    return "rows" if LAYER in kinds else "columns"


def launch_config(batch: int, hidden: int, rows: bool) -> dict:
    """Block sizes, grid and warps of one timestep's kernels (`scripts/gpu_kernels.py` compiles these).

    Columns: the whole batch in one tile and about 1024 elements per gate tile (BLOCK_H = 8 at batch 128, which
    ptxas compiles without spills for sm_90). Rows: one program per batch row, blocks of up to 256 hidden units.
    """
    if rows:
        block_h = min(_next_power_of_2(hidden), 256)
        return {"blocks": {"BLOCK_H": block_h}, "grid": (batch,), "num_warps": 4 if block_h >= 128 else 1}
    block_b = _next_power_of_2(batch)
    block_h = max(1, min(_next_power_of_2(hidden), 1024 // block_b))
    return {"blocks": {"BLOCK_B": block_b, "BLOCK_H": block_h}, "grid": (-(-hidden // block_h),), "num_warps": 4}


def _term(module: nn.Module | None, steps: int, start_step: int) -> tuple[int, float, list[Tensor | None]]:
    """(kind code, eps, [gamma, beta, scale, mean]) of one term in the loop (`norm.loop_term`)."""
    kind, eps, tensors = loop_term(module, steps, start_step)
    return kind_code(kind), eps, tensors


def _forward(config: dict, x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor, mask: Tensor,
             recurrent: list[Tensor | None], cell: list[Tensor | None]) -> dict:
    steps, batch, gates_size = x.shape
    hidden = gates_size // 4
    kr, kc = config["kinds"]
    new = x.new_empty
    dummy = new(1)
    h = new(steps + 1, batch, hidden)
    c = new(steps + 1, batch, hidden)
    h[0], c[0] = h0, c0
    saved = {
        "h": h, "c": c, "out": new(steps, batch, hidden), "gates": new(steps, batch, gates_size),
        "rs": new(steps, batch, gates_size) if kr != NONE else dummy, "cs": new(steps, batch, hidden),
    }
    for name, kind, size in (("r", kr, gates_size), ("c", kc, hidden)):
        # (0,) where a term has no statistics: they are outputs of the autograd function, each its own tensor.
        shape = {BATCH: (steps, size), LAYER: (steps, batch)}.get(kind, (0,))
        saved[f"{name}mean"] = new(shape)
        saved[f"{name}var"] = new(shape)
    rows = layout((kr, kc)) == "rows"
    launch = launch_config(batch, hidden, rows)
    kernel = kernels.lstm_step_forward_rows if rows else kernels.lstm_step_forward_columns
    kernel = kernel[launch["grid"]]
    params = [dummy if p is None else p for p in (*recurrent, *cell)]
    weight_hh_t = weight_hh.t()
    r = new(batch, gates_size)
    eps = eps_tensor(*config["eps"], x.dtype, x.device)
    with on_device(x.device):
        for step in range(steps):
            torch.mm(h[step], weight_hh_t, out=r)
            kernel(
                step, batch, hidden, r, x, h, c, saved["out"], saved["gates"], saved["rs"], saved["cs"], mask,
                *params[:4], saved["rmean"], saved["rvar"], *params[4:], saved["cmean"], saved["cvar"], eps,
                KR=kr, KC=kc, HAS_BETA_R=recurrent[1] is not None, HAS_BETA_C=cell[1] is not None,
                num_warps=launch["num_warps"], **launch["blocks"],
            )
    return saved


class TritonLSTMFunction(torch.autograd.Function):
    """One LSTM layer's loop over time from its input term (T, B, 4H), with a hand-written backward through time.

    Inputs: `config` (kinds, and eps as Python floats), the input term, h0, c0, W_h, the mask (T, B) as 0/1 in the
    working dtype, then gamma, beta, scale, mean of the recurrent and of the cell term (`norm.loop_term`; None where
    absent). Outputs: the layer output, h_T, c_T, and the batch statistics the loop computed (mean and variance of the
    recurrent term, then of the cell term; empty where a term has none), which carry no gradient.
    """

    @staticmethod
    def forward(ctx, config, x, h0, c0, weight_hh, mask, *terms):
        inputs = (x, h0, c0, weight_hh)  # as given: a second derivative recomputes from them (`backward`)
        x, h0, c0, weight_hh = x.contiguous(), h0.contiguous(), c0.contiguous(), weight_hh.contiguous()
        recurrent, cell = list(terms[:4]), list(terms[4:])
        saved = _forward(config, x, h0, c0, weight_hh, mask, recurrent, cell)
        statistics = (saved["rmean"], saved["rvar"], saved["cmean"], saved["cvar"])
        ctx.mark_non_differentiable(*statistics)
        ctx.config = config
        output = saved.pop("out")  # not kept on ctx: an output held by its own node would be a reference cycle
        ctx.saved = saved
        ctx.save_for_backward(*inputs, mask, *terms)
        return output, saved["h"][-1].clone(), saved["c"][-1].clone(), *statistics

    @staticmethod
    def backward(ctx, grad_output, grad_h, grad_c, *_statistics):
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is a first derivative only, so recompute through the
            # reference loop and let autograd differentiate that (second derivatives, e.g. a gradient penalty).
            grads = gradients_with_graph(functools.partial(_reference, ctx.config), ctx.saved_tensors,
                                         ctx.needs_input_grad[1:], (grad_output, grad_h, grad_c))
            return None, *grads
        _, _, _, weight_hh, mask, *terms = ctx.saved_tensors
        saved, config = ctx.saved, ctx.config
        kr, kc = config["kinds"]
        gates = saved["gates"]
        steps, batch, gates_size = gates.shape
        hidden = gates_size // 4
        zeros = gates.new_zeros
        dout = zeros(steps, batch, hidden) if grad_output is None else grad_output.contiguous()
        dh = zeros(batch, hidden) if grad_h is None else grad_h.clone(memory_format=torch.contiguous_format)
        dc = zeros(batch, hidden) if grad_c is None else grad_c.clone(memory_format=torch.contiguous_format)
        dc_next = torch.empty_like(dc)
        keep = torch.empty_like(dh)
        dgates = torch.empty_like(gates)
        dr = torch.empty_like(gates)
        dyc = gates.new_empty(steps, batch, hidden)
        dummy = gates.new_empty(1)
        rows = layout((kr, kc)) == "rows"
        launch = launch_config(batch, hidden, rows)
        kernel = kernels.lstm_step_backward_rows if rows else kernels.lstm_step_backward_columns
        kernel = kernel[launch["grid"]]
        gr, _, sr, _, gc, bc, sc, mc = [dummy if p is None else p for p in terms]
        eps = eps_tensor(*config["eps"], gates.dtype, gates.device)
        with on_device(gates.device):
            for step in reversed(range(steps)):
                kernel(
                    step, batch, hidden, dh, dout, dc, dc_next, keep, gates, saved["rs"], saved["cs"], saved["c"],
                    mask, dgates, dr, dyc, gr, sr, saved["rvar"], gc, bc, sc, mc, saved["cvar"], eps,
                    KR=kr, KC=kc, HAS_BETA_C=terms[5] is not None, num_warps=launch["num_warps"], **launch["blocks"],
                )
                # dh becomes the gradient reaching h[step]; the kernel has read the one reaching h[step + 1].
                torch.addmm(keep, dr[step], weight_hh, out=dh)
                dc, dc_next = dc_next, dc
        d_weight_hh = dr.reshape(-1, gates_size).t().mm(saved["h"][:-1].reshape(-1, hidden))
        needs = ctx.needs_input_grad
        term_grads = (_term_grads(kr, terms[:4], dgates, saved["rs"], needs[6:10])
                      + _term_grads(kc, terms[4:], dyc, saved["cs"], needs[10:14]))
        return (None, dgates, dh, dc, d_weight_hh, None, *term_grads)


def _reference(config: dict, x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor, mask: Tensor, *terms
               ) -> tuple[Tensor, Tensor, Tensor]:
    """What the kernels compute from `TritonLSTMFunction`'s inputs, in plain PyTorch (for second derivatives)."""
    active = mask > 0
    recurrent, cell = (DescribedNorm(KIND_NAMES[kind], eps, terms[4 * k : 4 * k + 4], active)
                       for k, (kind, eps) in enumerate(zip(config["kinds"], config["eps"], strict=True)))
    return lstm_loop(x, h0, c0, weight_hh, recurrent, cell, active)


def _term_grads(kind: int, tensors, dy: Tensor, normalized: Tensor, needs) -> list[Tensor | None]:
    """Gradients of gamma, beta (summed over time and batch) and of scale, mean (per timestep) of one term, from the
    gradient `dy` of its output and its input normalized without γ (`normalized`, the raw input for an affine map)."""
    grads: list[Tensor | None] = [None] * 4
    if kind in (BATCH, LAYER) and needs[0]:
        grads[0] = (dy * normalized).sum((0, 1))
    if kind in (BATCH, LAYER, AFFINE) and tensors[1] is not None and needs[1]:
        grads[1] = dy.sum((0, 1))
    if kind == AFFINE and needs[2]:
        grads[2] = (dy * (normalized - tensors[3][:, None])).sum(1)
    if kind == AFFINE and needs[3]:
        grads[3] = -tensors[2] * dy.sum(1)
    return grads


def lstm(
    x: Tensor,
    weight_ih: Tensor,
    h: Tensor,
    c: Tensor,
    weight_hh: Tensor,
    norm_ih: nn.Module | None,
    bias: Tensor | None,
    norm_hh: nn.Module | None,
    norm_c: nn.Module | None,
    mask: Tensor | None,
    start_step: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """`recurrence.lstm` on the Triton kernels, from the layer input x (T, B, I) and W_x: same results, same updates
    of the population statistics."""
    check(x)
    input_term = F.linear(x, weight_ih)
    if norm_ih is not None:
        input_term = norm_ih(input_term, mask, start_step)
    if bias is not None:
        input_term = input_term + bias
    steps, batch = x.shape[:2]
    terms = [_term(norm_hh, steps, start_step), _term(norm_c, steps, start_step)]
    tensors = [t for _, _, group in terms for t in group]
    inputs = [input_term, h, c, weight_hh]
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:  # the loop in float32 from the autocast-dtype input product (module docstring)
        inputs, tensors = _float32(inputs), _float32(tensors)
    dtype = inputs[0].dtype
    weights = torch.ones(steps, batch, dtype=dtype, device=x.device) if mask is None else mask.to(dtype)
    config = {"kinds": (terms[0][0], terms[1][0]), "eps": (float(terms[0][1]), float(terms[1][1]))}
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        output, h_n, c_n, *statistics = TritonLSTMFunction.apply(config, *inputs, weights.contiguous(), *tensors)
    # The population statistics, with the reference's one update (RecurrentBatchNorm.record_pass).
    for (kind, _, _), module, mean, var in zip(terms, (norm_hh, norm_c), statistics[::2], statistics[1::2],
                                               strict=True):
        if kind == BATCH:
            module.record_pass(mean, var, mask=mask, steps=steps, batch=batch, start_step=start_step)
    return output, h_n, c_n


def _float32(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Floating tensors below float32 cast up (what `custom_fwd(cast_inputs=torch.float32)` does, float64 kept)."""
    return [t.float() if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]
