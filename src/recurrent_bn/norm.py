"""Normalizations used inside recurrent layers, and where their statistics live.

`RecurrentBatchNorm` is the batch norm of Cooijmans et al. 2016 (eq. 5): in training it normalizes with the current
minibatch's statistics, separately for each timestep; in evaluation with per-timestep population statistics, reusing
those of the last trained timestep T_max for every later one. With `share_statistics_over_time=True` it keeps a single
set of statistics for all timesteps instead (the sequence-wise batch norm of Laurent et al. 2016).

`RecurrentLayerNorm` is the layer norm of Ba et al. 2016: per example, over the features, no statistics to keep.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor, nn


class Kind(IntEnum):
    """How one term is normalized in a loop over time: the one description every backend reads (`loop_term`).

    - NONE: left as it is.
    - LAYER: per example over its features (layer norm); no statistics kept.
    - BATCH: each timestep's minibatch statistics (training).
    - SHARED: minibatch statistics pooled over batch and time (an input term shared over time, in training).
    - AFFINE: fixed per-timestep statistics, `(x - mean_t) * scale_t + beta` (batch norm in evaluation, and the
      baseline's cell shift with mean 0 and scale 1).

    The numbers are the C++ kernels' `rbn::Kind` (csrc/common.h; the extension exports them and a test compares).
    A new normalization variant is a new kind here plus its math in each backend.
    """

    NONE = 0
    LAYER = 1
    BATCH = 2
    SHARED = 3
    AFFINE = 4


SINGLE_EXAMPLE = ("batch norm in training needs more than one example per batch: with one, each example is normalized "
                  "by its own statistics and the output no longer depends on the input; use a batch of 2 or more, or "
                  "call .eval() to normalize with the population statistics")


def refuse_single_example(values: int) -> None:
    """Raise `SINGLE_EXAMPLE` when training-mode batch statistics would be over `values` = 1 value per feature (as
    `torch.nn.BatchNorm1d` does). A padded batch with one active example at some timestep is fine."""
    if values == 1:
        raise ValueError(SINGLE_EXAMPLE)


def batch_statistics(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the batch axis (-2) of `x` (..., B, F), counting only rows where `mask` (..., B).

    A timestep with no active example, or a batch of none, gets mean 0 and variance 0 (its outputs are discarded by
    the caller, and an update of the population statistics with count 0 changes nothing, where NaN would).
    """
    if mask is None and x.shape[-2] == 0:
        zeros = x.new_zeros(x.shape[:-2] + x.shape[-1:])
        return zeros, zeros.clone()
    if mask is None:
        var, mean = torch.var_mean(x, dim=-2, correction=0)
        return mean, var
    weight = mask.to(x.dtype).unsqueeze(-1)
    count = weight.sum(-2).clamp(min=1)
    mean = (x * weight).sum(-2) / count
    var = ((x - mean.unsqueeze(-2)).square() * weight).sum(-2) / count
    return mean, var


def example_count(mask: Tensor | None, steps: int, batch: int, like: Tensor) -> Tensor:
    """Number of active examples at each of `steps` timesteps, (steps,), in float64 on `like`'s device: exact
    whatever the statistics' precision (in float16 70,000 is inf, in bfloat16 301 is 300)."""
    if mask is None:
        return torch.full((steps,), batch, dtype=torch.float64, device=like.device)
    return mask.to(torch.float64).sum(-1)


def normalize(x: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor | None, eps: float) -> Tensor:
    """`gamma * (x - mean) / sqrt(var + eps) + beta` (beta None: no shift), statistics broadcast against x."""
    y = (x - mean) * torch.rsqrt(var + eps) * gamma
    return y if beta is None else y + beta


def population_map(x: Tensor, mean: Tensor, scale: Tensor, beta: Tensor | None) -> Tensor:
    """`(x - mean) * scale + beta`: a batch norm with fixed statistics (`RecurrentBatchNorm.scale`). Never folded into
    `x * scale + (beta - mean * scale)`, which cancels in float32 when |mean| >> std."""
    y = (x - mean) * scale
    return y if beta is None else y + beta


# The per-slot population statistics of RecurrentBatchNorm, (slots, ...): saved up to the trained length only.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

# The one place for the initial γ of each normalization: batch norm's is the paper's 0.1 (1.0 saturates tanh and the
# gradient through time vanishes; 0.01 or less was unstable), layer norm's is Ba et al.'s 1.0.
DEFAULT_GAMMA = {"bn": 0.1, "ln": 1.0}


def default_gamma(norm: str) -> float:
    """The initial γ of a layer with this `norm` ("none", "vbn", "bn" or "ln"): layer norm's for "ln", else batch
    norm's. The model configs read it too (`${rbn.default_gamma:${.norm}}`)."""
    return DEFAULT_GAMMA["ln" if norm == "ln" else "bn"]


class RecurrentBatchNorm(nn.Module):
    """Batch norm with per-timestep statistics: `gamma * (x - mean_t) / sqrt(var_t + eps) + beta` (paper eq. 5).

    Args:
        num_features: size of the normalized feature axis.
        max_length: how many timesteps get their own population statistics (T_max). Timesteps at or past the
            longest length seen in training use the statistics of the last one seen, as the paper prescribes.
        gamma_init: initial gamma. The paper uses 0.1: with 1.0 the normalized pre-activations saturate tanh and the
            gradient through time vanishes.
        learn_beta: learn a shift beta (starting at 0). Off where the layer's own bias plays that role.
        eps: added to the variance; 1e-5 as in the paper's code.
        momentum: weight of the new minibatch in the moving average of the population statistics,
            `population = (1 - momentum) * population + momentum * batch` (the authors used 0.01 on MNIST, 0.05 on
            PTB and text8). None gives a cumulative average, which `estimate_population_statistics` uses.
        share_statistics_over_time: keep one set of population statistics for all timesteps. The normalization
            of a whole sequence at once (`forward`) then also uses statistics pooled over time and batch in training.

    Buffers: `running_mean`, `running_var` (slots, F) with slots = max_length (1 if shared); `num_batches_tracked`
    (slots,) for the cumulative average; `trained_length`, the longest populated prefix of timesteps.
    """

    def __init__(
        self,
        num_features: int,
        max_length: int,
        *,
        gamma_init: float = DEFAULT_GAMMA["bn"],
        learn_beta: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool = False,
    ) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.num_features = num_features
        self.max_length = max_length
        self.gamma_init = gamma_init
        self.eps = eps
        self.momentum = momentum
        self.share_statistics_over_time = share_statistics_over_time
        slots = 1 if share_statistics_over_time else max_length
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features)) if learn_beta else None
        self.register_buffer("running_mean", torch.zeros(slots, num_features))
        self.register_buffer("running_var", torch.ones(slots, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(slots, dtype=torch.long))
        self.register_buffer("trained_length", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    @property
    def slots(self) -> int:
        return self.running_mean.shape[0]

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.trained_length.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_length={self.max_length}, gamma_init={self.gamma_init}, "
            f"learn_beta={self.bias is not None}, eps={self.eps}, momentum={self.momentum}, "
            f"share_statistics_over_time={self.share_statistics_over_time}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # Slots past the longest trained timestep still hold their initial values: they are left out (a layer built
        # with max_length=1000 and trained on 35 steps stores 35 slots), and _load_from_state_dict puts them back.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        kept = int(self.trained_length)
        for name in STATISTICS:
            destination[prefix + name] = destination[prefix + name][:kept].clone()  # a view would save it all

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # trained_length counts populated slots; more than there are would index past them in evaluation.
        length = state_dict.get(prefix + "trained_length")
        if length is not None and int(length) > self.slots:
            raise ValueError(
                f"{prefix}trained_length is {int(length)} but the layer has {self.slots} population slots: the state "
                "dict is corrupt, was edited or is of a layer with a larger max_length; reset it to at most that"
            )
        # Fewer slots than this layer has: the untrained ones were left out when saving; they hold initial values.
        for name in STATISTICS:
            saved, own = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.dim() == own.dim() and saved.shape[0] < own.shape[0]:
                initial = torch.ones_like(own) if name == "running_var" else torch.zeros_like(own)
                state_dict[prefix + name] = torch.cat([saved.to(own), initial[saved.shape[0]:]])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def slot_index(self, start_step: int, steps: int) -> Tensor:
        """Population slot of each timestep in [start_step, start_step + steps): t, clamped to the last trained one."""
        index = torch.arange(start_step, start_step + steps, device=self.running_mean.device)
        # A tensor bound, not a Python int, so that evaluation never waits for the device.
        return torch.minimum(index, self.trained_length.clamp(min=1, max=self.slots) - 1)

    def population_statistics(self, start_step: int, steps: int) -> tuple[Tensor, Tensor]:
        """Population mean and variance, (steps, F), for the timesteps [start_step, start_step + steps)."""
        index = self.slot_index(start_step, steps)
        return self.running_mean[index], self.running_var[index]

    def scale(self, var: Tensor) -> Tensor:
        """`gamma / sqrt(var + eps)`: this normalization with fixed statistics is `(x - mean) * scale + beta`.

        Never folded into `x * scale + (beta - mean * scale)`: when |mean| >> std that sum cancels, and float32
        keeps only a few digits of the result (the second layer's cell term in evaluation lost 3 of 7)."""
        return self.weight * torch.rsqrt(var + self.eps)

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """`gamma * (x - mean) / sqrt(var + eps) + beta` with statistics broadcast against x."""
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    @torch.no_grad()
    def update_population(self, mean: Tensor, var: Tensor, count: Tensor, start_step: int = 0) -> None:
        """Fold one minibatch's per-timestep statistics (T, F) into the population statistics.

        Timesteps that share a slot (those past `max_length`, or all of them when statistics are shared over time)
        are pooled first, weighted by their example counts, so the slot receives the mean and variance of the
        pooled activations. The update is a moving average with weight `momentum`, or a cumulative average of
        minibatches when `momentum` is None.
        """
        steps = mean.shape[0]
        position = torch.arange(start_step + 1, start_step + steps + 1, device=mean.device)  # 1-based
        active = count > 0
        if start_step + steps <= self.slots:
            # Every timestep has a slot of its own (the usual case, and half the operations): pooling one timestep
            # gives back its statistics, without rounding for float32 statistics and integer counts (mean x count
            # and back in float64), so they go in as they are, with the bits pooling gives them. `(mean - mean)^2`
            # is 0, or NaN where pooling's between-timestep term is.
            rows, touched = slice(start_step, start_step + steps), active
            batch_mean, batch_var = mean, var + (mean - mean).square()
        else:
            rows, index = slice(None), (position - 1).clamp(max=self.slots - 1)
            # Pooled in float64 and as within- plus between-timestep variance: rebuilding the variance as
            # E[x^2] - mean^2 in float32 loses it entirely when |mean| >> std (mean 30, std 0.01 gave 0).
            mean, var, weight = mean.double(), var.double(), count.double()
            pooled_count = mean.new_zeros(self.slots).index_add_(0, index, weight)
            touched = pooled_count > 0
            denominator = pooled_count.clamp(min=1)[:, None]
            batch_mean = mean.new_zeros(self.slots, self.num_features).index_add_(0, index, mean * weight[:, None])
            batch_mean = batch_mean / denominator
            spread = var + (mean - batch_mean[index]).square()
            batch_var = mean.new_zeros(self.slots, self.num_features).index_add_(0, index, spread * weight[:, None])
            batch_var = batch_var / denominator
        # Masked arithmetic instead of boolean indexing: no host synchronisation on a GPU.
        if self.momentum is None:
            factor = 1.0 / (self.num_batches_tracked[rows] + 1).to(torch.float64)
        else:
            factor = torch.full(touched.shape, self.momentum, dtype=torch.float64, device=mean.device)
        factor = (factor * touched)[:, None].to(self.running_mean.dtype)
        running_mean, running_var = self.running_mean[rows], self.running_var[rows]  # views: updated in place
        running_mean += factor * (batch_mean.to(running_mean.dtype) - running_mean)
        running_var += factor * (batch_var.to(running_var.dtype) - running_var)
        self.num_batches_tracked[rows] += touched
        last_active = torch.where(active, position, 0).max().clamp(max=self.slots)
        torch.maximum(self.trained_length, last_active, out=self.trained_length)

    def record_pass(
        self, mean: Tensor, var: Tensor, *, mask: Tensor | None, steps: int, batch: int, start_step: int = 0,
        pooled: bool = False,
    ) -> None:
        """Fold the minibatch statistics of one pass over a sequence into the population, as every backend does after
        its loop: per-timestep statistics (steps, F), each step weighted by its active examples (`mask` (steps, B),
        or all `batch`), or with `pooled` one set pooled over batch and time (an input term shared over time)."""
        count = example_count(mask, steps, batch, mean)
        if pooled:
            self.update_population(mean.reshape(1, -1), var.reshape(1, -1), count.sum(0, keepdim=True), 0)
        else:
            self.update_population(mean, var, count, start_step)

    def forward(self, x: Tensor, mask: Tensor | None = None, start_step: int = 0) -> Tensor:
        """Normalize a whole sequence `x` (T, B, F) at once; `mask` (T, B) marks the valid (unpadded) positions.

        Used for terms that do not depend on the recurrence, such as `W_x x_t`, so that the statistics of every
        timestep are one reduction over the batch axis of a (T, B, F) tensor.
        """
        steps = x.shape[0]
        if not self.training:
            mean, var = self.population_statistics(start_step, steps)
            return self.normalize(x, mean.unsqueeze(1), var.unsqueeze(1))
        refuse_single_example(x.shape[1] * (steps if self.share_statistics_over_time else 1))
        if self.share_statistics_over_time:
            flat_mask = None if mask is None else mask.reshape(1, -1)
            mean, var = batch_statistics(x.reshape(1, -1, x.shape[-1]), flat_mask)
            self.record_pass(mean.detach(), var.detach(), mask=mask, steps=steps, batch=x.shape[1], pooled=True)
            return self.normalize(x, mean, var)
        mean, var = batch_statistics(x, mask)
        self.record_pass(mean.detach(), var.detach(), mask=mask, steps=steps, batch=x.shape[1], start_step=start_step)
        return self.normalize(x, mean.unsqueeze(1), var.unsqueeze(1))


class CellShift(nn.Module):
    """A learned shift `x + beta` (beta starting at 0), no statistics: the cell term of the authors' baseline LSTM,
    whose graph is the BN-LSTM's with BN(x) = x + beta, so that `h = σ(o) ⊙ tanh(c + β_c)`."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = nn.Parameter(torch.zeros(num_features))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}"

    def forward(self, x: Tensor, mask: Tensor | None = None, start_step: int = 0) -> Tensor:
        return x + self.bias


def batch_norms(module: nn.Module) -> list[RecurrentBatchNorm]:
    """Every RecurrentBatchNorm inside `module` (where population statistics live)."""
    return [m for m in module.modules() if isinstance(m, RecurrentBatchNorm)]


class RecurrentLayerNorm(nn.Module):
    """Layer norm over the last axis (Ba et al. 2016): `gamma * (x - mean) / sqrt(var + eps) + beta`, per example."""

    def __init__(
        self, num_features: int, *, gamma_init: float = DEFAULT_GAMMA["ln"], learn_beta: bool = False, eps: float = 1e-5
    ):
        super().__init__()
        self.num_features = num_features
        self.gamma_init = gamma_init
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features)) if learn_beta else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, gamma_init={self.gamma_init}, learn_beta={self.bias is not None}, eps={self.eps}"

    def forward(self, x: Tensor, mask: Tensor | None = None, start_step: int = 0) -> Tensor:
        return nn.functional.layer_norm(x, (self.num_features,), self.weight, self.bias, self.eps)


def loop_term(module: nn.Module | None, steps: int, start_step: int = 0, input_term: bool = False
              ) -> tuple[Kind, float, list[Tensor | None]]:
    """How one term's normalization enters a loop over time (every backend reads it): its `Kind`, eps, and
    [gamma, beta, scale, mean] with None where absent.

    In evaluation a batch norm is a per-timestep affine map `(x - mean_t) * scale_t + beta` with its population
    statistics (`RecurrentBatchNorm.scale`), and the cell's `x + beta` is that map with mean 0 and scale 1. In
    training the statistics are per timestep; only an input term (the projection, normalized before the loop's
    recurrence) of `share_statistics_over_time` pools them over time (SHARED), as `RecurrentBatchNorm.forward`
    does; inside the loop only the population slots are shared."""
    if module is None:
        return Kind.NONE, 0.0, [None] * 4
    if isinstance(module, RecurrentLayerNorm):
        return Kind.LAYER, module.eps, [module.weight, module.bias, None, None]
    if isinstance(module, CellShift):
        mean = module.bias.new_zeros(steps, module.num_features)
        return Kind.AFFINE, 0.0, [None, module.bias, torch.ones_like(mean), mean]
    if not isinstance(module, RecurrentBatchNorm):
        raise TypeError(f"unsupported normalization module {type(module).__name__}")
    if not module.training:
        mean, var = module.population_statistics(start_step, steps)
        return Kind.AFFINE, 0.0, [None, module.bias, module.scale(var).contiguous(), mean.contiguous()]
    kind = Kind.SHARED if input_term and module.share_statistics_over_time else Kind.BATCH
    return kind, module.eps, [module.weight, module.bias, None, None]
