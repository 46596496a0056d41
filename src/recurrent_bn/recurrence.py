"""The time loops: the part of each layer that must run one timestep after another.

The input term (`W_x x_t`, normalized, plus the bias) covers every timestep at once; each step adds the recurrent
term `W_h h_{t-1}`, normalized with that timestep's statistics, and updates the state. This module holds the
plain-PyTorch reference loops, which run on any device and are differentiated by autograd, and whether the fused
CPU kernels of the LSTM (`fused.py`, the same function with a hand-written backward) may be used in this process
(`use_fused`, one step of `backends.pick_backend`, which chooses the loop).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn.norm import Kind, batch_statistics, loop_term, normalize, population_map

if TYPE_CHECKING:
    from recurrent_bn.cells import CellTerms

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda x: x}

_warned_unavailable = False


def fused_available() -> bool:
    """Whether the fused CPU kernels can be used in this process (compiles them on first use)."""
    from recurrent_bn import fused

    return fused.available()


def use_fused(backend: str) -> bool:
    """Whether a layer with this `backend` setting may use the fused kernels (a step of `backends.pick_backend`).

    "reference" never does; "fused" does, and raises if they are unavailable; "auto" does when they are available,
    and otherwise warns once per process and runs the reference loops.
    """
    global _warned_unavailable
    if backend == "reference":
        return False
    if fused_available():
        return True
    from recurrent_bn import fused

    if backend == "fused":
        raise RuntimeError(f"backend='fused' is unavailable: {fused.unavailable_reason()}; use backend='reference'")
    if not _warned_unavailable:
        _warned_unavailable = True
        warnings.warn(
            f"recurrent_bn: the fused CPU kernels are unavailable ({fused.unavailable_reason()}); "
            "the layers run the slower reference loops",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def input_term(terms: CellTerms, x: Tensor, mask: Tensor | None, start_step: int) -> Tensor:
    """`N_x(W_x x_t) + b` of every timestep (T, B, F): it does not depend on the recurrence, so it is one matrix
    product and one vectorized normalization before the loop."""
    projected = F.linear(x, terms.weight_ih)
    if terms.norm_ih is not None:
        projected = terms.norm_ih(projected, mask, start_step)
    return projected if terms.bias is None else projected + terms.bias


def lstm(terms: CellTerms, x: Tensor, state: tuple[Tensor, Tensor], mask: Tensor | None, start_step: int = 0
         ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM direction's reference loop over time (paper eqs. 6-8 with the normalizations of `terms`), the
    definition the compiled loops match (`backends.py` has the signature and chooses).

    x (T, B, I) the layer input; state (h, c) of (B, H); mask (T, B) valid positions or None (padded steps keep
    the state and output zeros); start_step the timestep index of x[0], which picks the batch-norm statistics.
    Returns the output (T, B, H) and the final (h, c).
    """
    h, c = state
    inputs = input_term(terms, x, mask, start_step)
    steps, batch = inputs.shape[:2]
    recurrent = DescribedNorm.recording(terms.norm_hh, steps, mask, start_step)
    cell = DescribedNorm.recording(terms.norm_out, steps, mask, start_step)
    output, h, c = lstm_loop(inputs, h, c, terms.weight_hh, recurrent, cell, mask)
    recurrent.finish(batch)
    cell.finish(batch)
    return output, (h, c)


def lstm_loop(
    input_term: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, recurrent, cell, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM's loop over time from its whole input term (T, B, 4H); `recurrent` and `cell` normalize their terms
    at each step (`DescribedNorm`)."""
    weight_hh_t = weight_hh.t()
    inputs = input_term.unbind(0)  # see DescribedNorm: indexing in the loop would make the backward quadratic in T
    outputs = []
    for step in range(input_term.shape[0]):
        h_next, c_next = lstm_step(inputs[step], h, c, weight_hh_t, recurrent, cell, step)
        if mask is None:
            h, c = h_next, c_next
            outputs.append(h)
        else:
            active = mask[step].unsqueeze(1)
            h = torch.where(active, h_next, h)
            c = torch.where(active, c_next, c)
            outputs.append(h_next * active)
    return torch.stack(outputs), h, c


def gradients_with_graph(forward, inputs, needs, grad_outputs) -> list[Tensor | None]:
    """Gradients of `forward(*inputs)` (weighted by `grad_outputs`) with respect to the inputs where `needs`, with
    a graph for higher derivatives: the compiled loops' backward when `create_graph=True` (see `DescribedNorm`)."""
    with torch.enable_grad():
        outputs = forward(*inputs)
    wanted = [k for k, tensor in enumerate(inputs) if needs[k] and tensor is not None]
    found = torch.autograd.grad(outputs, [inputs[k] for k in wanted], grad_outputs, create_graph=True,
                                allow_unused=True)
    grads: list[Tensor | None] = [None] * len(inputs)
    for k, grad in zip(wanted, found, strict=True):
        grads[k] = grad
    return grads


class DescribedNorm:
    """One term normalized at each step of one pass over a sequence, from its `norm.loop_term` description
    (`Kind`, eps, [gamma, beta, scale, mean]): the one reading of a term that every loop over time shares.

    - NONE: the term as it is; LAYER: per example (layer norm);
    - BATCH: each timestep's minibatch statistics, remembered when `module` is given (the reference loop) so that
      `finish` folds them into its population statistics once after the loop;
    - AFFINE: fixed per-timestep statistics, `(x - mean_t) * scale_t + beta` (batch norm in evaluation, the
      baseline's cell shift);
    - SHARED: statistics pooled over batch and time, for the input term only (`sequence`).

    The compiled loops (C++, Triton) compute the same from the same description; their hand-written backward is a
    first derivative only, so when a graph of the gradient is asked for (`create_graph=True`, as a gradient penalty
    does) they recompute the forward through this class, without `module`, and let autograd differentiate it.
    """

    def __init__(self, kind: Kind, eps: float, tensors, mask: Tensor | None, module: nn.Module | None = None,
                 start_step: int = 0) -> None:
        self.kind, self.eps, self.mask = kind, float(eps), mask
        self.gamma, self.beta, self.scale, self.mean = tensors
        self.module, self.start_step = module, start_step
        self.means: list[Tensor] = []
        self.variances: list[Tensor] = []
        if kind == Kind.AFFINE:
            # unbind, not indexing in the loop: the backward of x[t] allocates a zero tensor of x's full size per
            # step (quadratic in T); unbind's backward stacks the per-step gradients once.
            self.step_mean, self.step_scale = self.mean.unbind(0), self.scale.unbind(0)

    @classmethod
    def recording(cls, module: nn.Module | None, steps: int, mask: Tensor | None, start_step: int) -> DescribedNorm:
        """The term normalized by `module` in the reference loop, its batch statistics recorded for `finish`."""
        kind, eps, tensors = loop_term(module, steps, start_step)
        return cls(kind, eps, tensors, mask, module, start_step)

    def __call__(self, x: Tensor, step: int) -> Tensor:
        """The term x (B, F) of timestep `step`."""
        if self.kind == Kind.NONE:
            return x
        if self.kind == Kind.LAYER:
            return F.layer_norm(x, (x.shape[-1],), self.gamma, self.beta, self.eps)
        if self.kind == Kind.AFFINE:
            return population_map(x, self.step_mean[step], self.step_scale[step], self.beta)
        if self.kind == Kind.BATCH:
            mean, var = batch_statistics(x, None if self.mask is None else self.mask[step])
            if self.module is not None:
                self.means.append(mean.detach())
                self.variances.append(var.detach())
            return normalize(x, mean, var, self.gamma, self.beta, self.eps)
        raise ValueError(f"a {Kind(self.kind).name} term pools statistics over time: normalize it with `sequence`")

    def sequence(self, x: Tensor) -> Tensor:
        """The term x (T, B, F) of every timestep at once (the input term, whose SHARED statistics pool time)."""
        if self.kind == Kind.SHARED:
            flat_mask = None if self.mask is None else self.mask.reshape(1, -1)
            mean, var = batch_statistics(x.reshape(1, -1, x.shape[-1]), flat_mask)
            return normalize(x, mean, var, self.gamma, self.beta, self.eps)
        if self.kind == Kind.BATCH:
            mean, var = batch_statistics(x, self.mask)
            return normalize(x, mean.unsqueeze(1), var.unsqueeze(1), self.gamma, self.beta, self.eps)
        if self.kind == Kind.AFFINE:
            return population_map(x, self.mean.unsqueeze(1), self.scale.unsqueeze(1), self.beta)
        return self(x, 0)

    def finish(self, batch: int) -> None:
        """Fold the recorded minibatch statistics into the module's population statistics (one update per pass)."""
        if self.means:
            self.module.record_pass(torch.stack(self.means), torch.stack(self.variances), mask=self.mask,
                                    steps=len(self.means), batch=batch, start_step=self.start_step)


def lstm_step(
    input_term: Tensor, h: Tensor, c: Tensor, weight_hh_t: Tensor, recurrent: DescribedNorm, cell: DescribedNorm,
    step: int,
) -> tuple[Tensor, Tensor]:
    """One LSTM timestep (eqs. 6-8) from its input term (B, 4H): the new h and the un-normalized c.

    The layer's loop (`lstm`) and `LSTMCell` both call it, so that one cell step is one step of the layer.
    `weight_hh_t` is W_h transposed (H, 4H); `recurrent` and `cell` normalize their terms at `step`.
    """
    gates = input_term + recurrent(torch.mm(h, weight_hh_t), step)
    i, f, g, o = gates.chunk(4, 1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(cell(c_next, step))
    return h_next, c_next


def rnn_step(
    input_term: Tensor, h: Tensor, weight_hh_t: Tensor, recurrent: DescribedNorm, total: DescribedNorm, activation,
    step: int,
) -> Tensor:
    """One RNN timestep, `act(N_sum(input_term + N_hh(W_h h)))`: shared by the layer's loop (`rnn`) and `RNNCell`."""
    return activation(total(input_term + recurrent(torch.mm(h, weight_hh_t), step), step))


def rnn(terms: CellTerms, x: Tensor, state: tuple[Tensor], mask: Tensor | None, start_step: int = 0, *,
        nonlinearity: str = "tanh") -> tuple[Tensor, tuple[Tensor]]:
    """One RNN direction's loop: `h_t = act(N_sum(input_term_t + N_hh(W_h h_{t-1})))`, with the arguments of
    `lstm` and state (h,).

    `terms.norm_hh` normalizes the recurrent term alone ("separate" placement), `terms.norm_out` the whole
    pre-activation ("sum" placement); either may be None. The RNN has no compiled loops (the performance targets
    are the LSTM variants): it always runs this one, whatever its layer's backend setting.
    """
    (h,) = state
    inputs = input_term(terms, x, mask, start_step)
    steps, batch = inputs.shape[:2]
    recurrent = DescribedNorm.recording(terms.norm_hh, steps, mask, start_step)
    total = DescribedNorm.recording(terms.norm_out, steps, mask, start_step)
    activation = ACTIVATIONS[nonlinearity]
    weight_hh_t = terms.weight_hh.t()
    inputs = inputs.unbind(0)
    outputs = []
    for step in range(steps):
        h_next = rnn_step(inputs[step], h, weight_hh_t, recurrent, total, activation, step)
        if mask is None:
            h = h_next
            outputs.append(h)
        else:
            active = mask[step].unsqueeze(1)
            h = torch.where(active, h_next, h)
            outputs.append(h_next * active)
    recurrent.finish(batch)
    total.finish(batch)
    return torch.stack(outputs), (h,)
