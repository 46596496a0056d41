"""Cells: one direction of one layer, which owns its options, parameters and normalizations, and computes one
timestep (for loops the user writes: decoders with attention, teacher forcing, sampling).

`LSTMCell` and `RNNCell` name their parameters as `torch.nn.LSTMCell` and `torch.nn.RNNCell` do (`weight_ih`,
`weight_hh`, `bias_ih`, `bias_hh` without normalization, one `bias` with it) and their normalizations `norm_ih`,
`norm_hh`, `norm_c` (or `shift_c`), `norm_sum`. The layers (`layers.py`) are built from the same classes: each
direction of each layer is made by `create_terms` and initialised by `init_terms_`, and registered under torch.nn's
names (`weight_ih_l0`, `norm_c_l1_reverse`: `layer_name`), so that parameter names, their order, state dicts and
code written for torch.nn (weight norm, `functional_call`) are torch.nn's. A direction is read for a pass as a
`CellTerms`, the one thing every backend's loop takes.

Batch norm needs the timestep: `h, c = cell(x_t, (h, c), step=t)`. A loop over t = 0, 1, ... then equals the layer:

- in training, each step is normalized with its minibatch's statistics and folded into the population statistics
  as the layer folds that timestep (steps at or past `max_length` share the last slot, pooled as the layer pools
  them: see `_RecurrentCell._update_population`);
- in evaluation, step t uses the population statistics of t, and steps past the longest trained length reuse those
  of the last trained one (T_max).

What a cell cannot do is normalize the input term with statistics over the whole sequence (vertical batch norm,
`share_statistics_over_time` naming "input"): the later steps are not there yet. It says so at construction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn import recurrence
from recurrent_bn.errors import InputError
from recurrent_bn.norm import (
    CellShift,
    Kind,
    RecurrentBatchNorm,
    RecurrentLayerNorm,
    default_gamma,
    example_count,
    refuse_single_example,
)
from recurrent_bn.recurrence import DescribedNorm

LSTM_NORMS = ("none", "vbn", "bn", "ln")
RNN_NORMS = ("none", "bn", "ln")
LSTM_TERMS = ("input", "recurrent", "cell")
RNN_TERMS = ("input", "recurrent")
PLACEMENTS = ("sum", "separate")
NONLINEARITIES = ("tanh", "relu", "identity")
RECURRENT_INITS = ("orthogonal", "identity")
ORTHOGONAL_SCOPES = ("joint", "per_gate")
INITS = ("pytorch", "authors")


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, else one ValueError line naming the option and the choices."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def _omp_thread_limit() -> int | None:
    """OMP_THREAD_LIMIT as a positive integer, or None (unset or not a number: OpenMP ignores it then)."""
    try:
        limit = int(os.environ.get("OMP_THREAD_LIMIT", ""))
    except ValueError:
        return None
    return limit if limit > 0 else None


def orthogonal_(tensor: Tensor) -> Tensor:
    """`nn.init.orthogonal_` that cannot hang.

    With OMP_THREAD_LIMIT below torch's thread count, its QR (LAPACK on an OpenMP team) waited forever for threads
    OpenMP would not start (a 256 x 64 matrix, OMP_THREAD_LIMIT=1 and two torch threads): the QR then runs on the
    threads the limit allows. Otherwise the call is unchanged, so seeded initializations are bit for bit as before
    (the QR's last bits depend on the number of threads: one thread instead of two changes them by ~1e-7)."""
    threads, limit = torch.get_num_threads(), _omp_thread_limit()
    if limit is None or limit >= threads:
        return nn.init.orthogonal_(tensor)
    torch.set_num_threads(limit)
    try:
        return nn.init.orthogonal_(tensor)
    finally:
        torch.set_num_threads(threads)


def _orthogonal_blocks_(weight: Tensor, blocks: int, scope: str) -> None:
    """Orthogonal initialisation of a gate-stacked weight (blocks * H, n).

    "joint": one orthogonal matrix over all blocks, as the authors draw W_h (H, 4H) and W_x (I, 4H) in their
    layout: in torch's (4H, n) layout its columns are orthonormal, `W^T W = I` (entries of RMS 1/sqrt(4H) for W_h).
    "per_gate": each block separately orthogonal (entries sqrt(blocks) times larger).
    """
    with torch.no_grad():
        for block in weight.chunk(blocks, 0) if scope == "per_gate" else (weight,):
            orthogonal_(block)


def _make_norm(
    kind: str, features: int, max_length: int, gamma_init: float, eps: float, momentum: float | None,
    shared: bool, learn_beta: bool, factory: dict,
) -> nn.Module:
    if kind == "ln":
        return RecurrentLayerNorm(features, gamma_init=gamma_init, learn_beta=learn_beta, eps=eps).to(**factory)
    return RecurrentBatchNorm(
        features, max_length, gamma_init=gamma_init, learn_beta=learn_beta, eps=eps, momentum=momentum,
        share_statistics_over_time=shared,
    ).to(**factory)


def _shared_terms(value: bool | str | tuple[str, ...] | list[str] | None, norm: str, norm_terms: tuple[str, ...],
                  allowed: tuple[str, ...]) -> tuple[str, ...]:
    """`share_statistics_over_time` as the terms it applies to: True all, False none, or the terms named.

    Naming terms is the paper's BN-e*: ("input",) shares the input term's statistics over time (its fix for
    zero-padded inputs) and keeps per-timestep statistics for the others.
    """
    if value is None or isinstance(value, bool):
        return tuple(norm_terms) if value else ()
    terms = (value,) if isinstance(value, str) else tuple(value)
    for term in terms:
        choice("share_statistics_over_time entry", term, allowed)
    if terms and norm not in ("bn", "vbn"):
        raise ValueError("share_statistics_over_time names batch-norm statistics: it needs norm='bn'")
    missing = [t for t in terms if t not in norm_terms]
    if missing:
        raise ValueError(f"share_statistics_over_time names {missing}, which norm_terms={norm_terms} does not "
                         "normalize: add them to norm_terms or leave them out")
    return tuple(t for t in allowed if t in terms)


def _gamma(norm: str, gamma_init: float | None) -> float:
    """`gamma_init`, or the normalization's default (`norm.default_gamma`), checked once for every layer and cell."""
    gamma = default_gamma(norm) if gamma_init is None else float(gamma_init)
    if norm != "none" and gamma <= 0:
        raise ValueError(f"gamma_init must be > 0, got {gamma}")
    return gamma


def layer_name(name: str, suffix: str) -> str:
    """A cell's parameter or normalization name in a layer, as torch.nn names them: `weight_ih` of direction `l0` is
    `weight_ih_l0`. The RNN's one normalization of the summed terms is `norm_sum` in a cell (whose `norm` is the
    option) and `norm_l0` in a layer."""
    return f"norm_{suffix}" if name == "norm_sum" else f"{name}_{suffix}"


class CellTerms(NamedTuple):
    """What one direction computes with, as every backend's loop reads it (`backends.py`).

    `bias` is added to the input term: torch's two biases summed (no normalization), the one bias b of eq. 6, or
    None. `norm_out` normalizes the LSTM's cell before the output tanh (`norm_c`, or the baseline's `shift_c`), or
    the RNN's summed pre-activation (`norm_sum`); None leaves a term as it is."""

    weight_ih: Tensor
    weight_hh: Tensor
    bias: Tensor | None
    norm_ih: nn.Module | None
    norm_hh: nn.Module | None
    norm_out: nn.Module | None

    @classmethod
    def gather(cls, get: Callable[[str], object]) -> CellTerms:
        """The terms from `get(name)`: a cell's tensor or normalization by its cell name, None where absent."""
        bias_ih = get("bias_ih")
        bias = bias_ih + get("bias_hh") if bias_ih is not None else get("bias")
        norm_out = next((m for m in (get("norm_c"), get("shift_c"), get("norm_sum")) if m is not None), None)
        return cls(get("weight_ih"), get("weight_hh"), bias, get("norm_ih"), get("norm_hh"), norm_out)


def _parameter(terms: dict, shape: tuple[int, ...], factory: dict, name: str) -> None:
    terms[name] = nn.Parameter(torch.empty(shape, **factory))


def _init(init: str, recurrent_init: str) -> str:
    """`init`: "pytorch" (the default: torch.nn's uniform draw, since a user swapping torch.nn.LSTM for these layers
    expects its behaviour) or "authors" (orthogonal weights, forget bias `forget_bias`, the identity with
    `recurrent_init="identity"`; every paper preset in conf/ sets it). `recurrent_init`, `orthogonal_init` and
    `forget_bias` shape the authors' draw only, so asking for the identity with torch's draw is refused, not ignored."""
    init = choice("init", init, INITS)
    if init == "pytorch" and recurrent_init != "orthogonal":
        raise ValueError(f"recurrent_init={recurrent_init!r} shapes the authors' initialisation: set init='authors' "
                         "with it")
    return init


def torch_init_(parameters: dict[str, Tensor], hidden_size: int) -> None:
    """torch.nn.LSTM's and torch.nn.RNN's initialisation of one direction's `parameters` (by cell name): every weight
    and bias U(-1/sqrt(H), 1/sqrt(H)), drawn in torch's order, so that under the same seed norm="none" starts from the
    very weights torch.nn.LSTM starts from. A normalized variant's one bias is drawn the same way."""
    bound = 1.0 / math.sqrt(hidden_size)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "bias"):
        if name in parameters:
            nn.init.uniform_(parameters[name], -bound, bound)


def lstm_options(
    norm: str = "none", norm_terms: tuple[str, ...] | list[str] | None = None,
    share_statistics_over_time: bool | str | tuple[str, ...] | list[str] = False, gamma_init: float | None = None,
    forget_bias: float = 1.0, recurrent_init: str = "orthogonal", orthogonal_init: str = "joint",
    cell_bias: bool = False, init: str = "pytorch",
) -> dict[str, object]:
    """The options an LSTM layer and an LSTMCell share, checked once, as the attributes both carry."""
    norm = choice("norm", norm, LSTM_NORMS)
    if norm_terms is None:
        norm_terms = {"none": (), "vbn": ("input",)}.get(norm, LSTM_TERMS)
    for term in norm_terms:
        choice("norm_terms entry", term, LSTM_TERMS)
    if norm == "none" and norm_terms:
        raise ValueError("norm_terms needs a normalization: set norm to 'bn', 'ln' or 'vbn'")
    norm_terms = tuple(t for t in LSTM_TERMS if t in norm_terms)
    # Vertical batch norm shares every statistic over time by definition.
    shared = True if norm == "vbn" else share_statistics_over_time
    return {
        "norm": norm,
        "norm_terms": norm_terms,
        "share_statistics_over_time": _shared_terms(shared, norm, norm_terms, LSTM_TERMS),
        "recurrent_init": choice("recurrent_init", recurrent_init, RECURRENT_INITS),
        "orthogonal_init": choice("orthogonal_init", orthogonal_init, ORTHOGONAL_SCOPES),
        "cell_bias": bool(cell_bias),
        "gamma_init": _gamma(norm, gamma_init),
        "forget_bias": forget_bias,
        "init": _init(init, recurrent_init),
    }


def rnn_options(
    norm: str = "none", nonlinearity: str = "tanh", norm_placement: str = "sum",
    norm_terms: tuple[str, ...] | list[str] | None = None,
    share_statistics_over_time: bool | str | tuple[str, ...] | list[str] = False, gamma_init: float | None = None,
    recurrent_init: str = "orthogonal", init: str = "pytorch",
) -> dict[str, object]:
    """The options an RNN layer and an RNNCell share, checked once, as the attributes both carry."""
    norm = choice("norm", norm, RNN_NORMS)
    norm_placement = choice("norm_placement", norm_placement, PLACEMENTS)
    if norm_terms is None:
        norm_terms = () if norm == "none" else RNN_TERMS
    for term in norm_terms:
        choice("norm_terms entry", term, RNN_TERMS)
    if norm == "none" and norm_terms:
        raise ValueError("norm_terms needs a normalization: set norm to 'bn' or 'ln'")
    if norm != "none" and norm_placement == "sum" and tuple(norm_terms) not in (RNN_TERMS, RNN_TERMS[::-1]):
        raise ValueError("norm_placement='sum' normalizes the sum of both terms: use 'separate' for norm_terms")
    norm_terms = tuple(t for t in RNN_TERMS if t in norm_terms)
    shared = _shared_terms(share_statistics_over_time, norm, norm_terms, RNN_TERMS)
    if norm_placement == "sum" and shared not in ((), RNN_TERMS):
        raise ValueError("norm_placement='sum' has one normalization of the summed terms: set "
                         "share_statistics_over_time to true or false, or use norm_placement='separate'")
    return {
        "norm": norm,
        "norm_placement": norm_placement,
        "norm_terms": norm_terms,
        "share_statistics_over_time": shared,
        "nonlinearity": choice("nonlinearity", nonlinearity, NONLINEARITIES),
        "recurrent_init": choice("recurrent_init", recurrent_init, RECURRENT_INITS),
        "gamma_init": _gamma(norm, gamma_init),
        "init": _init(init, recurrent_init),
    }


@dataclass
class _PooledSlot:
    """The last population slot while a sequence's steps at or past it are pooled (see `_update_population`)."""

    step: int  # the last step folded
    saved_mean: Tensor  # the slot before this sequence reached it
    saved_var: Tensor
    saved_tracked: Tensor
    count: Tensor  # float64: active examples pooled so far
    mean: Tensor  # float64 (F,): their mean
    squares: Tensor  # float64 (F,): their summed squared deviations from it


class _RecurrentCell(nn.Module):
    """What the cells share: checks of the input and state, the step's normalizations, the population updates."""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool, options: dict, max_length: int, eps: float,
        momentum: float | None, factory: dict, *, input_shared_over_time: bool,
    ) -> None:
        """Set the checked `options` as attributes, then create, register and initialise this cell's terms.
        `input_shared_over_time`: whether options sharing the input term's statistics over time would pool them
        over the sequence (which a cell cannot see)."""
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self._pooled: dict[str, _PooledSlot] = {}
        for name, value in options.items():
            setattr(self, name, value)
        if input_shared_over_time and "input" in self.share_statistics_over_time:
            raise ValueError("a cell sees one step at a time, so it cannot normalize the input term with statistics "
                             "over the whole sequence (vbn, share_statistics_over_time with 'input'): use the layer")
        for name, value in self.create_terms(input_size, hidden_size, bias, options, max_length, eps, momentum,
                                             factory).items():
            setattr(self, name, value)
        self.reset_parameters()

    def terms(self) -> CellTerms:
        """This cell's tensors and normalizations as the loops read them (current values: after `functional_call`
        or weight norm too)."""

        def get(name: str):
            value = getattr(self, name, None)
            return value if isinstance(value, Tensor | nn.Module) else None

        return CellTerms.gather(get)

    def _check(self, input: Tensor, states: list[Tensor | None], step: int | None, mask: Tensor | None,
               terms: CellTerms):
        if input.dim() != 2 or input.shape[1] != self.input_size:
            raise InputError(f"input must be (B, {self.input_size}), one timestep of a batch; got {tuple(input.shape)}")
        batch = input.shape[0]
        norms = [terms.norm_ih, terms.norm_hh, terms.norm_out]
        if step is None:
            if any(isinstance(m, RecurrentBatchNorm) for m in norms):
                raise ValueError("batch norm has statistics per timestep: call the cell as cell(x_t, state, step=t)")
            step = 0
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if any(isinstance(m, RecurrentBatchNorm) and m.training for m in norms):
            refuse_single_example(batch)  # a cell's statistics are over the batch of its one step
        states = [input.new_zeros(batch, self.hidden_size) if s is None else s for s in states]
        for state in states:
            if state.shape != (batch, self.hidden_size):
                raise InputError(f"state has shape {tuple(state.shape)}, expected {(batch, self.hidden_size)}")
        if mask is not None:
            mask = torch.as_tensor(mask, device=input.device)
            if mask.shape != (batch,) or mask.dtype != torch.bool:
                raise InputError(f"mask must be a bool tensor of shape ({batch},), got {tuple(mask.shape)}")
        return states, step, mask

    def _input_term(self, input: Tensor, terms: CellTerms, norms: dict[str, DescribedNorm]) -> Tensor:
        """`N_x(W_x x_t) + b` of one step."""
        input_term = norms["norm_ih"](F.linear(input, terms.weight_ih), 0)
        return input_term if terms.bias is None else input_term + terms.bias

    @staticmethod
    def _step_norms(terms: CellTerms, step: int, mask: Tensor | None) -> dict[str, DescribedNorm]:
        """Each normalization at timestep `step` (as the layer's loop reads it, for a sequence of one step)."""
        mask = None if mask is None else mask.unsqueeze(0)
        modules = {"norm_ih": terms.norm_ih, "norm_hh": terms.norm_hh, "norm_out": terms.norm_out}
        return {name: DescribedNorm.recording(module, 1, mask, step) for name, module in modules.items()}

    def _finish(self, norms: dict[str, DescribedNorm], step: int, mask: Tensor | None, batch: int) -> None:
        """Fold this step's minibatch statistics into the population statistics (training with batch norm)."""
        for name, norm in norms.items():
            if norm.kind != Kind.BATCH:
                continue
            if step < norm.module.slots - 1:
                norm.finish(batch)  # a slot of its own: the layer's update (`RecurrentBatchNorm.record_pass`)
            else:
                mean = norm.means[0]
                count = example_count(None if mask is None else mask[None], 1, batch, mean)[0]
                self._update_population(name, norm.module, mean, norm.variances[0], count, step)

    @torch.no_grad()
    def _update_population(
        self, name: str, module: RecurrentBatchNorm, mean: Tensor, var: Tensor, count: Tensor, step: int
    ) -> None:
        """Fold one step at or past the last population slot into it as the layer folds a whole sequence.

        The last slot pools every step at or past it, in one update per sequence: the cell keeps the pooled statistics
        of the steps so far and rewrites that slot from its value before the sequence reached it, so after any step
        it holds what the layer's update for a sequence ending there gives. Consecutive steps (t, t + 1, ...) count
        as one sequence.
        """
        last = module.slots - 1
        pooled = self._pooled.get(name)
        if pooled is None or step != pooled.step + 1:
            zeros = torch.zeros_like(mean, dtype=torch.float64)
            pooled = _PooledSlot(step, module.running_mean[last].clone(), module.running_var[last].clone(),
                                 module.num_batches_tracked[last].clone(), zeros.new_zeros(()), zeros, zeros.clone())
            self._pooled[name] = pooled
        else:
            module.running_mean[last] = pooled.saved_mean
            module.running_var[last] = pooled.saved_var
            module.num_batches_tracked[last] = pooled.saved_tracked
        # Chan et al.'s pairwise update of a pooled mean and variance, in float64 as the layer pools.
        count, mean, var = count.double(), mean.double(), var.double()
        total = pooled.count + count
        delta = mean - pooled.mean
        pooled.squares = pooled.squares + var * count + delta.square() * (pooled.count * count / total.clamp(min=1))
        pooled.mean = pooled.mean + delta * (count / total.clamp(min=1))
        pooled.count = total
        pooled.step = step
        pooled_var = pooled.squares / total.clamp(min=1)
        module.update_population(pooled.mean[None], pooled_var[None], total[None], step)


def _unbatched_step(cell: _RecurrentCell, input: Tensor, hx, step: int | None, mask: Tensor | None):
    """torch.nn.LSTMCell's unbatched form: input (input_size,) and states (H,), run as a batch of one and returned
    in the same form. Batch norm in training refuses it, as it refuses any batch of one."""
    states = None if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    if states is not None and any(not isinstance(s, Tensor) or s.dim() != 1 for s in states):
        raise InputError(f"for unbatched 1-D input (input_size,) the states are 1-D (hidden_size,), got "
                         f"{[tuple(getattr(s, 'shape', ())) for s in states]}")
    if states is not None:
        hx = states[0][None] if isinstance(hx, Tensor) else tuple(s[None] for s in states)
    mask = None if mask is None else torch.as_tensor(mask).reshape(1)
    output = cell(input[None], hx, step=step, mask=mask)
    return output[0] if isinstance(output, Tensor) else tuple(s[0] for s in output)


class LSTMCell(_RecurrentCell):
    """One timestep of `LSTM` (gate order i, f, g, o): `h, c = cell(x_t, (h, c), step=t)`; one direction of one layer
    of `LSTM` is made by the same class (`create_terms`, `init_terms_`).

    `LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)` as `torch.nn.LSTMCell`, the options of
    `LSTM` keyword-only after them; with norm="none" its state_dict loads both ways with `torch.nn.LSTMCell`.
    `forward(input, hx=None, *, step=None, mask=None)`: input (B, input_size); hx a tuple (h, c) of (B, H), zeros
    when None; `step` the timestep (needed with batch norm); `mask` (B,) bool, the examples still running: the
    others keep their state and are left out of the statistics, as padded positions in the layer.
    Returns (h, c), c un-normalized.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm: str = "none",
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool | str | tuple[str, ...] = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        forget_bias: float = 1.0,
        recurrent_init: str = "orthogonal",
        orthogonal_init: str = "joint",
        cell_bias: bool = False,
        init: str = "pytorch",
    ) -> None:
        options = lstm_options(norm, norm_terms, share_statistics_over_time, gamma_init, forget_bias, recurrent_init,
                               orthogonal_init, cell_bias, init)
        super().__init__(input_size, hidden_size, bias, options, max_length, eps, momentum,
                         {"device": device, "dtype": dtype}, input_shared_over_time=True)

    @staticmethod
    def create_terms(
        input_size: int, hidden_size: int, bias: bool, options: dict, max_length: int, eps: float,
        momentum: float | None, factory: dict,
    ) -> dict[str, nn.Parameter | nn.Module]:
        """One direction's parameters and normalizations by their cell names, in torch's order (weights, biases,
        then the normalizations): W_x (4H, I), W_h (4H, H), torch's `bias_ih` and `bias_hh` without normalization or
        the one bias b of eq. 6 with it, `norm_ih`, `norm_hh` (4H features), `norm_c` (H, with β_c) or, for the
        authors' baseline, `shift_c`. `options` are `lstm_options`; `factory` the device and dtype."""
        features = 4 * hidden_size
        terms: dict[str, nn.Parameter | nn.Module] = {}
        _parameter(terms, (features, input_size), factory, "weight_ih")
        _parameter(terms, (features, hidden_size), factory, "weight_hh")
        if bias and options["norm"] == "none":
            _parameter(terms, (features,), factory, "bias_ih")
            _parameter(terms, (features,), factory, "bias_hh")
        elif bias:
            _parameter(terms, (features,), factory, "bias")
        kind = "ln" if options["norm"] == "ln" else "bn"
        for term, name, size, learn_beta in (
            ("input", "norm_ih", features, False),
            ("recurrent", "norm_hh", features, False),
            ("cell", "norm_c", hidden_size, True),
        ):
            if term in options["norm_terms"]:
                shared = term in options["share_statistics_over_time"]
                terms[name] = _make_norm(kind, size, max_length, options["gamma_init"], eps, momentum, shared,
                                         learn_beta, factory)
        if options["cell_bias"] and "cell" not in options["norm_terms"]:
            terms["shift_c"] = CellShift(hidden_size).to(**factory)
        return terms

    @staticmethod
    def init_terms_(parameters: dict[str, Tensor], hidden_size: int, *, init: str, recurrent_init: str,
                    orthogonal_init: str, forget_bias: float) -> None:
        """One direction's `parameters` (by cell name) as `init` says: torch's uniform draw (`torch_init_`), or the
        authors': W_x and W_h orthogonal (or identity for g), zero biases, forget bias `forget_bias`. The
        normalizations reset themselves."""
        if init == "pytorch":
            torch_init_(parameters, hidden_size)
            return
        hidden = hidden_size
        _orthogonal_blocks_(parameters["weight_ih"], 4, orthogonal_init)
        weight_hh = parameters["weight_hh"]
        if recurrent_init == "identity":
            # Gate order i, f, g, o: the f, i, o rows are orthogonal (jointly or per gate), g is the identity.
            others = torch.empty(3 * hidden, hidden, dtype=weight_hh.dtype, device=weight_hh.device)
            _orthogonal_blocks_(others, 3, orthogonal_init)
            with torch.no_grad():
                weight_hh[: 2 * hidden].copy_(others[: 2 * hidden])
                weight_hh[2 * hidden : 3 * hidden].copy_(torch.eye(hidden))
                weight_hh[3 * hidden :].copy_(others[2 * hidden :])
        else:
            _orthogonal_blocks_(weight_hh, 4, orthogonal_init)
        biases = [parameters[n] for n in ("bias_ih", "bias", "bias_hh") if n in parameters]
        for parameter in biases:
            nn.init.zeros_(parameter)
        if biases:
            with torch.no_grad():
                biases[0][hidden : 2 * hidden].fill_(forget_bias)

    def reset_parameters(self) -> None:
        """As `LSTM.reset_parameters` for one layer."""
        self.init_terms_(dict(self.named_parameters(recurse=False)), self.hidden_size, init=self.init,
                         recurrent_init=self.recurrent_init, orthogonal_init=self.orthogonal_init,
                         forget_bias=self.forget_bias)
        for module in self.children():
            module.reset_parameters()

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, *, step: int | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if input.dim() == 1:
            return _unbatched_step(self, input, hx, step, mask)
        if hx is not None and not (isinstance(hx, tuple | list) and len(hx) == 2):
            raise InputError("hx of an LSTMCell is a tuple (h, c) of (B, hidden_size) tensors, or None for zeros")
        terms = self.terms()
        (h, c), step, mask = self._check(input, [None, None] if hx is None else list(hx), step, mask, terms)
        norms = self._step_norms(terms, step, mask)
        h_next, c_next = recurrence.lstm_step(
            self._input_term(input, terms, norms), h, c, terms.weight_hh.t(), norms["norm_hh"], norms["norm_out"], 0
        )
        if mask is not None:
            h_next = torch.where(mask[:, None], h_next, h)
            c_next = torch.where(mask[:, None], c_next, c)
        self._finish(norms, step, mask, input.shape[0])
        return h_next, c_next

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}, norm_terms={self.norm_terms}"


class RNNCell(_RecurrentCell):
    """One timestep of `RNN`: `h = cell(x_t, h, step=t)`; one direction of one layer of `RNN` is made by the same
    class (`create_terms`, `init_terms_`).

    `RNNCell(input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None)` as
    `torch.nn.RNNCell`, the options of `RNN` keyword-only after them; with norm="none" its state_dict loads both ways
    with `torch.nn.RNNCell`. `forward(input, hx=None, *, step=None, mask=None)` as for `LSTMCell`, with hx the state
    h (B, H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm: str = "none",
        norm_placement: str = "sum",
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool | str | tuple[str, ...] = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        recurrent_init: str = "orthogonal",
        init: str = "pytorch",
    ) -> None:
        options = rnn_options(norm, nonlinearity, norm_placement, norm_terms, share_statistics_over_time, gamma_init,
                              recurrent_init, init)
        # With "sum" placement the one normalization is of the step's whole pre-activation: shared statistics over
        # time share its population slot only, which a cell can do.
        super().__init__(input_size, hidden_size, bias, options, max_length, eps, momentum,
                         {"device": device, "dtype": dtype}, input_shared_over_time=norm_placement == "separate")

    @staticmethod
    def create_terms(
        input_size: int, hidden_size: int, bias: bool, options: dict, max_length: int, eps: float,
        momentum: float | None, factory: dict,
    ) -> dict[str, nn.Parameter | nn.Module]:
        """One direction's parameters and normalizations by their cell names (see `LSTMCell.create_terms`): with
        "sum" placement one normalization `norm_sum` whose β is the bias, with "separate" `norm_ih`, `norm_hh` and
        the one bias."""
        hidden = hidden_size
        kind = "ln" if options["norm"] == "ln" else "bn"
        terms: dict[str, nn.Parameter | nn.Module] = {}
        _parameter(terms, (hidden, input_size), factory, "weight_ih")
        _parameter(terms, (hidden, hidden), factory, "weight_hh")
        gamma, shared_terms = options["gamma_init"], options["share_statistics_over_time"]
        if options["norm"] == "none" and bias:
            _parameter(terms, (hidden,), factory, "bias_ih")
            _parameter(terms, (hidden,), factory, "bias_hh")
        elif options["norm"] != "none" and options["norm_placement"] == "sum":
            # β of the one normalization is the bias: a separate b would be removed by the mean subtraction.
            terms["norm_sum"] = _make_norm(kind, hidden, max_length, gamma, eps, momentum, bool(shared_terms),
                                           bias, factory)
        elif options["norm"] != "none":
            if bias:
                _parameter(terms, (hidden,), factory, "bias")
            for term, name in (("input", "norm_ih"), ("recurrent", "norm_hh")):
                if term in options["norm_terms"]:
                    terms[name] = _make_norm(kind, hidden, max_length, gamma, eps, momentum, term in shared_terms,
                                             False, factory)
        return terms

    @staticmethod
    def init_terms_(parameters: dict[str, Tensor], hidden_size: int, *, init: str, recurrent_init: str) -> None:
        """torch's uniform draw (`torch_init_`) or, with init="authors", W_x orthogonal, W_h orthogonal or identity,
        zero biases, as in the authors' `construct_rnn`."""
        if init == "pytorch":
            torch_init_(parameters, hidden_size)
            return
        orthogonal_(parameters["weight_ih"])
        weight_hh = parameters["weight_hh"]
        if recurrent_init == "identity":
            with torch.no_grad():
                weight_hh.copy_(torch.eye(hidden_size))
        else:
            orthogonal_(weight_hh)
        for name in ("bias_ih", "bias_hh", "bias"):
            if name in parameters:
                nn.init.zeros_(parameters[name])

    def reset_parameters(self) -> None:
        """As `RNN.reset_parameters` for one layer."""
        self.init_terms_(dict(self.named_parameters(recurse=False)), self.hidden_size, init=self.init,
                         recurrent_init=self.recurrent_init)
        for module in self.children():
            module.reset_parameters()

    def forward(
        self, input: Tensor, hx: Tensor | None = None, *, step: int | None = None, mask: Tensor | None = None
    ) -> Tensor:
        if input.dim() == 1:
            return _unbatched_step(self, input, hx, step, mask)
        terms = self.terms()
        (h,), step, mask = self._check(input, [hx], step, mask, terms)
        norms = self._step_norms(terms, step, mask)
        h_next = recurrence.rnn_step(
            self._input_term(input, terms, norms), h, terms.weight_hh.t(), norms["norm_hh"], norms["norm_out"],
            recurrence.ACTIVATIONS[self.nonlinearity], 0,
        )
        if mask is not None:
            h_next = torch.where(mask[:, None], h_next, h)
        self._finish(norms, step, mask, input.shape[0])
        return h_next

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}, nonlinearity={self.nonlinearity!r}, "
                f"norm_placement={self.norm_placement!r}, norm_terms={self.norm_terms}")
