"""Optimizers and schedules of the runs: Adam, RMSProp as torch does it, and RMSProp as Blocks does it.

The authors trained with Blocks' RMSProp, which divides by `max(sqrt(ms), 1 / max_scaling)` (max_scaling 1e5) where
torch divides by `sqrt(ms) + eps`. The two differ exactly where the gradient is tiny, in the vanishing-gradient phase
the paper is about: there Blocks' step is `g / 1e-5` (at most lr * 1e5 * |g|) and torch's `g / (|g| + 1e-8)`.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


class BlocksRMSprop(torch.optim.Optimizer):
    """RMSProp as in Blocks: `ms = decay * ms + (1 - decay) * g^2`, `p -= lr * g / max(sqrt(ms), floor)`.

    `ms` starts at zero; `floor` is Blocks' `1 / max_scaling` (1e-5 by default).
    """

    def __init__(self, params, lr: float = 1e-3, decay: float = 0.9, floor: float = 1e-5) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        super().__init__(params, {"lr": lr, "decay": decay, "floor": floor})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["step"] += 1
                square_avg = state["square_avg"]
                square_avg.mul_(group["decay"]).addcmul_(parameter.grad, parameter.grad, value=1 - group["decay"])
                denominator = square_avg.sqrt().clamp_(min=group["floor"])
                parameter.addcdiv_(parameter.grad, denominator, value=-group["lr"])
        return loss


def make_optimizer(optim: DictConfig, parameters) -> torch.optim.Optimizer:
    """The optimizer of `optim` (conf/optim/*.yaml)."""
    if optim.name == "rmsprop" and optim.rule == "blocks":
        if optim.weight_decay:
            raise ValueError("optim.rule=blocks has no weight decay: set optim.weight_decay=0")
        return BlocksRMSprop(parameters, lr=optim.lr, decay=optim.decay, floor=optim.eps)
    if optim.name == "rmsprop":
        return torch.optim.RMSprop(
            parameters, lr=optim.lr, alpha=optim.decay, eps=optim.eps, weight_decay=optim.weight_decay
        )
    return torch.optim.Adam(parameters, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                            weight_decay=optim.weight_decay)


def make_scheduler(optim: DictConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """A constant learning rate, or a cosine decay to zero at `max_steps`."""
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
