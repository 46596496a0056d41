"""One timestep of the layers, for loops the user writes (decoders with attention, teacher forcing, sampling).

`LSTMCell` and `RNNCell` hold the parameters of one layer of `LSTM` and `RNN`, named as `torch.nn.LSTMCell`'s and
`torch.nn.RNNCell`'s (`weight_ih`, `weight_hh`, `bias_ih`, `bias_hh` without normalization), and compute one step
with the function the layer's loop calls (`recurrence.lstm_step`, `recurrence.rnn_step`). Batch norm needs the
timestep: `h, c = cell(x_t, (h, c), step=t)`. A loop over t = 0, 1, ... then equals the layer:

- in training, each step is normalized with its minibatch's statistics and folded into the population statistics
  as the layer folds that timestep (steps at or past `max_length` share the last slot, pooled as the layer pools
  them: see `_RecurrentCell._update_population`);
- in evaluation, step t uses the population statistics of t, and steps past the longest trained length reuse those
  of the last trained one (T_max).

What a cell cannot do is normalize the input term with statistics over the whole sequence (vertical batch norm,
`share_statistics_over_time` naming "input"): the later steps are not there yet. It says so at construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn import recurrence
from recurrent_bn.errors import InputError
from recurrent_bn.layers import (
    INITS,
    NONLINEARITIES,
    ORTHOGONAL_SCOPES,
    RECURRENT_INITS,
    _add_lstm_terms,
    _add_rnn_terms,
    _bias,
    _choice,
    _gamma,
    _init_lstm_terms_,
    _init_rnn_terms_,
    _lstm_options,
    _rnn_options,
    _sum_norm_name,
    init_terms,
)
from recurrent_bn.norm import RecurrentBatchNorm, refuse_single_example
from recurrent_bn.recurrence import StepNorm


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

    norm_names: tuple[str, ...]

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self._pooled: dict[str, _PooledSlot] = {}

    def _refuse_input_shared_over_time(self) -> None:
        if "input" in self.share_statistics_over_time:
            raise ValueError("a cell sees one step at a time, so it cannot normalize the input term with statistics "
                             "over the whole sequence (vbn, share_statistics_over_time with 'input'): use the layer")

    def _check(self, input: Tensor, states: list[Tensor | None], step: int | None, mask: Tensor | None):
        if input.dim() != 2 or input.shape[1] != self.input_size:
            raise InputError(f"input must be (B, {self.input_size}), one timestep of a batch; got {tuple(input.shape)}")
        batch = input.shape[0]
        if step is None:
            if any(isinstance(getattr(self, n, None), RecurrentBatchNorm) for n in self.norm_names):
                raise ValueError("batch norm has statistics per timestep: call the cell as cell(x_t, state, step=t)")
            step = 0
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        norms = [getattr(self, n, None) for n in self.norm_names]
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

    def _step_norms(self, step: int, mask: Tensor | None) -> dict[str, StepNorm]:
        """Each normalization at timestep `step` (the layer's `StepNorm`, for a sequence of one step)."""
        mask = None if mask is None else mask.unsqueeze(0)
        return {name: StepNorm(getattr(self, name, None), 1, mask, step) for name in self.norm_names}

    def _finish(self, norms: dict[str, StepNorm], step: int, mask: Tensor | None, batch: int) -> None:
        """Fold this step's minibatch statistics into the population statistics (training with batch norm)."""
        for name, norm in norms.items():
            if norm.kind == "batch":
                mean = norm.means[0]
                count = mean.new_tensor(batch) if mask is None else mask.to(mean.dtype).sum()
                self._update_population(name, norm.module, mean, norm.variances[0], count, step)

    @torch.no_grad()
    def _update_population(
        self, name: str, module: RecurrentBatchNorm, mean: Tensor, var: Tensor, count: Tensor, step: int
    ) -> None:
        """Fold one step's statistics into `module`'s population statistics as the layer folds a whole sequence.

        A slot before the last gets one update from its step, as in the layer. The last slot pools every step at or
        past it, in one update per sequence: the cell keeps the pooled statistics of the steps so far and rewrites
        that slot from its value before the sequence reached it, so after any step it holds what the layer's update
        for a sequence ending there gives. Consecutive steps (t, t + 1, ...) count as one sequence.
        """
        last = module.slots - 1
        if step < last:
            module.update_population(mean[None], var[None], count[None], step)
            return
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
    """One timestep of `LSTM` (gate order i, f, g, o): `h, c = cell(x_t, (h, c), step=t)`.

    Options as for `LSTM` (one layer); with norm="none" its state_dict loads both ways with `torch.nn.LSTMCell`.
    `forward(input, hx=None, *, step=None, mask=None)`: input (B, input_size); hx a tuple (h, c) of (B, H), zeros
    when None; `step` the timestep (needed with batch norm); `mask` (B,) bool, the examples still running: the
    others keep their state and are left out of the statistics, as padded positions in the layer.
    Returns (h, c), c un-normalized.
    """

    norm_names = ("norm_ih", "norm_hh", "norm_c")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        norm: str = "none",
        bias: bool = True,
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
        super().__init__(input_size, hidden_size)
        _lstm_options(self, norm, norm_terms, share_statistics_over_time)
        self.init = _choice("init", init, INITS)
        self._refuse_input_shared_over_time()
        self.recurrent_init = _choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        self.orthogonal_init = _choice("orthogonal_init", orthogonal_init, ORTHOGONAL_SCOPES)
        self.cell_bias = bool(cell_bias)
        self.gamma_init = _gamma(self.norm, gamma_init)
        self.forget_bias = forget_bias
        _add_lstm_terms(self, "", input_size, bias, max_length, eps, momentum)
        if hasattr(self, "shift_c"):
            self.norm_names = ("norm_ih", "norm_hh", "shift_c")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As `LSTM.reset_parameters` for one layer."""
        init_terms(self, _init_lstm_terms_)(self, "")
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
        (h, c), step, mask = self._check(input, [None, None] if hx is None else list(hx), step, mask)
        norms = self._step_norms(step, mask)
        input_term = norms["norm_ih"](F.linear(input, self.weight_ih), 0)
        bias = _bias(self, "")
        if bias is not None:
            input_term = input_term + bias
        h_next, c_next = recurrence.lstm_step(
            input_term, h, c, self.weight_hh.t(), norms["norm_hh"], norms[self.norm_names[2]], 0
        )
        if mask is not None:
            h_next = torch.where(mask[:, None], h_next, h)
            c_next = torch.where(mask[:, None], c_next, c)
        self._finish(norms, step, mask, input.shape[0])
        return h_next, c_next

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}, norm_terms={self.norm_terms}"


class RNNCell(_RecurrentCell):
    """One timestep of `RNN`: `h = cell(x_t, h, step=t)`.

    Options as for `RNN` (one layer); with norm="none" its state_dict loads both ways with `torch.nn.RNNCell`.
    `forward(input, hx=None, *, step=None, mask=None)` as for `LSTMCell`, with hx the state h (B, H).
    """

    norm_names = ("norm_ih", "norm_hh", "norm_sum")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        norm: str = "none",
        nonlinearity: str = "tanh",
        norm_placement: str = "sum",
        bias: bool = True,
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool | str | tuple[str, ...] = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        recurrent_init: str = "orthogonal",
        init: str = "pytorch",
    ) -> None:
        super().__init__(input_size, hidden_size)
        _rnn_options(self, norm, norm_placement, norm_terms, share_statistics_over_time)
        self.init = _choice("init", init, INITS)
        if norm_placement == "separate":
            self._refuse_input_shared_over_time()
        self.nonlinearity = _choice("nonlinearity", nonlinearity, NONLINEARITIES)
        self.recurrent_init = _choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        self.gamma_init = _gamma(self.norm, gamma_init)
        _add_rnn_terms(self, "", input_size, bias, max_length, eps, momentum)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As `RNN.reset_parameters` for one layer."""
        init_terms(self, _init_rnn_terms_)(self, "")
        for module in self.children():
            module.reset_parameters()

    def forward(
        self, input: Tensor, hx: Tensor | None = None, *, step: int | None = None, mask: Tensor | None = None
    ) -> Tensor:
        if input.dim() == 1:
            return _unbatched_step(self, input, hx, step, mask)
        (h,), step, mask = self._check(input, [hx], step, mask)
        norms = self._step_norms(step, mask)
        input_term = norms["norm_ih"](F.linear(input, self.weight_ih), 0)
        bias = _bias(self, "")
        if bias is not None:
            input_term = input_term + bias
        h_next = recurrence.rnn_step(
            input_term, h, self.weight_hh.t(), norms["norm_hh"], norms[_sum_norm_name("")],
            recurrence.ACTIVATIONS[self.nonlinearity], 0,
        )
        if mask is not None:
            h_next = torch.where(mask[:, None], h_next, h)
        self._finish(norms, step, mask, input.shape[0])
        return h_next

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}, nonlinearity={self.nonlinearity!r}, "
                f"norm_placement={self.norm_placement!r}, norm_terms={self.norm_terms}")
