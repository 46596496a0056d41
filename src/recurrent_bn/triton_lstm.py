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

import collections
import contextlib
import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn.norm import Kind, loop_term
from recurrent_bn.recurrence import DescribedNorm, gradients_with_graph, lstm_loop

# How a term is normalized: `norm.Kind`, whose numbers the kernels compare against too (triton_kernels.py).
# SHARED never reaches the kernels: only an input term, normalized before the loop, pools its statistics over time.
NONE, LAYER, BATCH, SHARED, AFFINE = Kind.NONE, Kind.LAYER, Kind.BATCH, Kind.SHARED, Kind.AFFINE
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


# The loops' inputs by name: what a captured graph reads from its static buffers (module docstring of `_StaticLoop`).
TERMS = ("gr", "br", "sr", "mr", "gc", "bc", "sc", "mc")  # gamma, beta, scale, mean of the recurrent and cell terms
FORWARD_INPUTS = ("x", "h0", "c0", "weight_hh", "mask", *TERMS)
BACKWARD_INPUTS = ("dout", "dh_in", "dc_in", "gates", "rs", "cs", "c", "mask", "weight_hh", "rvar", "cvar", *TERMS)


def _forward_buffers(inputs: dict, kinds: tuple[int, int]) -> dict:
    """What the forward loop writes, allocated for the shapes of `inputs` (FORWARD_INPUTS): states (T + 1, B, H),
    output, pre-activations and what the backward reads, the batch statistics, and the workspace r = W_h h."""
    x = inputs["x"]
    steps, batch, gates_size = x.shape
    hidden = gates_size // 4
    new = x.new_empty
    kr, kc = kinds
    buffers = {
        "h": new(steps + 1, batch, hidden), "c": new(steps + 1, batch, hidden), "out": new(steps, batch, hidden),
        "gates": new(steps, batch, gates_size), "rs": new(steps, batch, gates_size) if kr != NONE else new(1),
        "cs": new(steps, batch, hidden), "r": new(batch, gates_size), "dummy": new(1),
    }
    for name, kind, size in (("r", kr, gates_size), ("c", kc, hidden)):
        # (0,) where a term has no statistics: they are outputs of the autograd function, each its own tensor.
        shape = {BATCH: (steps, size), LAYER: (steps, batch)}.get(kind, (0,))
        buffers[f"{name}mean"] = new(shape)
        buffers[f"{name}var"] = new(shape)
    return buffers


def _forward_loop(b: dict, config: dict) -> dict:
    """The forward loop over time on the buffers `b` (inputs and `_forward_buffers`): kernel launches and products
    into buffers that exist already, nothing allocated, nothing read back to the host, so that it can be captured
    in a CUDA graph. Returns the results by name (tensors of `b`)."""
    x, h, c = b["x"], b["h"], b["c"]
    steps, batch, gates_size = x.shape
    hidden = gates_size // 4
    kr, kc = config["kinds"]
    rows = layout((kr, kc)) == "rows"
    launch = launch_config(batch, hidden, rows)
    kernel = kernels.lstm_step_forward_rows if rows else kernels.lstm_step_forward_columns
    kernel = kernel[launch["grid"]]
    params = [b["dummy"] if b[name] is None else b[name] for name in TERMS]
    weight_hh_t = b["weight_hh"].t()
    eps = eps_tensor(*config["eps"], x.dtype, x.device)
    with on_device(x.device):
        h[0].copy_(b["h0"])
        c[0].copy_(b["c0"])
        for step in range(steps):
            torch.mm(h[step], weight_hh_t, out=b["r"])
            kernel(
                step, batch, hidden, b["r"], x, h, c, b["out"], b["gates"], b["rs"], b["cs"], b["mask"],
                *params[:4], b["rmean"], b["rvar"], *params[4:], b["cmean"], b["cvar"], eps,
                KR=kr, KC=kc, HAS_BETA_R=b["br"] is not None, HAS_BETA_C=b["bc"] is not None,
                num_warps=launch["num_warps"], **launch["blocks"],
            )
    return {name: b[name] for name in ("h", "c", "out", "gates", "rs", "cs", "rmean", "rvar", "cmean", "cvar")}


def _backward_buffers(inputs: dict, kinds: tuple[int, int]) -> dict:
    """What the backward loop writes, for the shapes of `inputs` (BACKWARD_INPUTS): the carried gradients of h and c
    (c's in two buffers, ping-ponged), the gradients of the input term, of r = W_h h and of the cell's output."""
    gates = inputs["gates"]
    steps, batch, gates_size = gates.shape
    hidden = gates_size // 4
    new = gates.new_empty
    return {"dh": new(batch, hidden), "dc": new(batch, hidden), "dc_next": new(batch, hidden),
            "keep": new(batch, hidden), "dgates": new(steps, batch, gates_size), "dr": new(steps, batch, gates_size),
            "dyc": new(steps, batch, hidden), "dummy": new(1)}


def _backward_loop(b: dict, config: dict) -> dict:
    """The backward loop over time on the buffers `b`, as `_forward_loop`: nothing allocated, no host sync."""
    gates = b["gates"]
    steps, batch, gates_size = gates.shape
    hidden = gates_size // 4
    kr, kc = config["kinds"]
    rows = layout((kr, kc)) == "rows"
    launch = launch_config(batch, hidden, rows)
    kernel = kernels.lstm_step_backward_rows if rows else kernels.lstm_step_backward_columns
    kernel = kernel[launch["grid"]]
    gr, _, sr, _, gc, bc, sc, mc = [b["dummy"] if b[name] is None else b[name] for name in TERMS]
    dh, dc, dc_next, keep, dr = b["dh"], b["dc"], b["dc_next"], b["keep"], b["dr"]
    eps = eps_tensor(*config["eps"], gates.dtype, gates.device)
    with on_device(gates.device):
        dh.copy_(b["dh_in"])
        dc.copy_(b["dc_in"])
        for step in reversed(range(steps)):
            kernel(
                step, batch, hidden, dh, b["dout"], dc, dc_next, keep, gates, b["rs"], b["cs"], b["c"], b["mask"],
                b["dgates"], dr, b["dyc"], gr, sr, b["rvar"], gc, bc, sc, mc, b["cvar"], eps,
                KR=kr, KC=kc, HAS_BETA_C=b["bc"] is not None, num_warps=launch["num_warps"], **launch["blocks"],
            )
            # dh becomes the gradient reaching h[step]; the kernel has read the one reaching h[step + 1].
            torch.addmm(keep, dr[step], b["weight_hh"], out=dh)
            dc, dc_next = dc_next, dc
    return {"dgates": b["dgates"], "dr": dr, "dyc": b["dyc"], "dh": dh, "dc": dc}


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs of the loops over time (off by default until measured on a GPU: `set_cuda_graphs`, RBN_CUDA_GRAPHS=1).

_cuda_graphs = os.environ.get("RBN_CUDA_GRAPHS", "0") not in ("", "0")
GRAPH_CACHE_SIZE = 16  # loops kept captured (each holds its static buffers: about two layer calls' activations)


def set_cuda_graphs(enabled: bool) -> bool:
    """Run the loops over time as captured CUDA graphs (replayed per call) or eagerly; returns the previous setting.

    At T = 784 eager launching costs ~3,100 Triton launches per training step from Python; a graph replays the whole
    loop with one launch. Each (direction, kinds, shapes, dtype, device) is captured once, on its first call; every
    call copies its inputs into the graph's static buffers and its results out of them (the same loop shape may run
    again, e.g. in the next layer, before the backward of this one)."""
    global _cuda_graphs
    previous, _cuda_graphs = _cuda_graphs, bool(enabled)
    return previous


def cuda_graphs_enabled() -> bool:
    """Whether the loops run as captured CUDA graphs (`set_cuda_graphs`)."""
    return _cuda_graphs


class _StaticLoop:
    """A loop over time on static buffers: captured in a CUDA graph on its first call and replayed on later ones.
    Off CUDA (the tests, under the interpreter) there is no graph: a replay runs the launches again on the same
    buffers, so that everything up to the capture itself (static buffers, no host sync, the cache) runs on a CPU."""

    def __init__(self, inputs: dict, allocate: Callable[[dict], dict], run: Callable[[dict], dict]) -> None:
        self.inputs = {name: None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                       for name, t in inputs.items()}
        self.buffers = {**self.inputs, **allocate(self.inputs)}
        self.run = run
        self.outputs: dict | None = None
        self.replay: Callable[[], None] | None = None
        self.calls = 0

    def __call__(self, inputs: dict) -> dict:
        """The loop's results for `inputs`, in the static buffers (valid until the next call)."""
        for name, tensor in inputs.items():
            if tensor is not None:
                self.inputs[name].copy_(tensor)
        if self.replay is None:
            self.outputs, self.replay = _capture(self.run, self.buffers, next(iter(inputs.values())).device)
        else:
            self.replay()
        self.calls += 1
        return self.outputs


def _capture(run: Callable[[dict], dict], buffers: dict, device: torch.device):
    """(results of one run, replay): on CUDA a warm-up run on a side stream (Triton compiles and loads its kernels,
    cuBLAS picks its algorithms: neither may happen during capture) and the capture; elsewhere no graph."""
    if device.type != "cuda":
        return run(buffers), lambda: run(buffers)
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = run(buffers)  # the first call's results
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the backward is captured in autograd's device thread while other threads may run.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            run(buffers)
    return outputs, graph.replay


_graphs: collections.OrderedDict[tuple, _StaticLoop] = collections.OrderedDict()


def _graph_key(direction: str, config: dict, inputs: dict) -> tuple:
    """What a captured loop is specific to: direction, kinds, eps, which inputs are absent, shapes, dtype, device."""
    shapes = tuple((name, None if t is None else tuple(t.shape)) for name, t in inputs.items())
    first = inputs[next(iter(inputs))]
    return direction, config["kinds"], config["eps"], shapes, first.dtype, first.device


def _loop(direction: str, config: dict, inputs: dict) -> dict:
    """Run the forward or backward loop on `inputs`: eagerly on them, or replayed from a captured graph (results
    copied out of its static buffers)."""
    allocate, run = {"forward": (_forward_buffers, _forward_loop),
                     "backward": (_backward_buffers, _backward_loop)}[direction]
    if not _cuda_graphs or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return run({**inputs, **allocate(inputs, config["kinds"])}, config)
    key = _graph_key(direction, config, inputs)
    loop = _graphs.get(key)
    if loop is None:
        loop = _StaticLoop(inputs, functools.partial(allocate, kinds=config["kinds"]),
                           functools.partial(run, config=config))
        _graphs[key] = loop
        while len(_graphs) > GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    return {name: tensor.clone() for name, tensor in loop(inputs).items()}


def clear_cuda_graphs() -> None:
    """Drop every captured loop and its static buffers."""
    _graphs.clear()


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
        values = (x.contiguous(), h0.contiguous(), c0.contiguous(), weight_hh.contiguous(), mask, *terms)
        saved = _loop("forward", config, dict(zip(FORWARD_INPUTS, values, strict=True)))
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
        inputs = {
            "dout": zeros(steps, batch, hidden) if grad_output is None else grad_output.contiguous(),
            "dh_in": zeros(batch, hidden) if grad_h is None else grad_h,
            "dc_in": zeros(batch, hidden) if grad_c is None else grad_c,
            **{name: saved[name] for name in ("gates", "rs", "cs", "c")}, "mask": mask,
            "weight_hh": weight_hh.contiguous(), "rvar": saved["rvar"], "cvar": saved["cvar"],
            **dict(zip(TERMS, terms, strict=True)),
        }
        grads = _loop("backward", config, inputs)
        dgates, dyc = grads["dgates"], grads["dyc"]
        d_weight_hh = grads["dr"].reshape(-1, gates_size).t().mm(saved["h"][:-1].reshape(-1, hidden))
        needs = ctx.needs_input_grad
        term_grads = (_term_grads(kr, terms[:4], dgates, saved["rs"], needs[6:10])
                      + _term_grads(kc, terms[4:], dyc, saved["cs"], needs[10:14]))
        return (None, dgates, grads["dh"], grads["dc"], d_weight_hh, None, *term_grads)


def _reference(config: dict, x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor, mask: Tensor, *terms
               ) -> tuple[Tensor, Tensor, Tensor]:
    """What the kernels compute from `TritonLSTMFunction`'s inputs, in plain PyTorch (for second derivatives)."""
    active = mask > 0
    recurrent, cell = (DescribedNorm(Kind(kind), eps, terms[4 * k : 4 * k + 4], active)
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
    terms = [loop_term(norm_hh, steps, start_step), loop_term(norm_c, steps, start_step)]
    tensors = [t for _, _, group in terms for t in group]
    inputs = [input_term, h, c, weight_hh]
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:  # the loop in float32 from the autocast-dtype input product (module docstring)
        inputs, tensors = _float32(inputs), _float32(tensors)
    dtype = inputs[0].dtype
    weights = torch.ones(steps, batch, dtype=dtype, device=x.device) if mask is None else mask.to(dtype)
    config = {"kinds": (int(terms[0][0]), int(terms[1][0])), "eps": (float(terms[0][1]), float(terms[1][1]))}
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
