"""The paper's analyses as functions: gradient flow at initialization (Figure 1a), the expected derivative of tanh
(Figure 1b), bits per character against the evaluation length (Figure 3b), population statistics over time and the
step at which they settle (Figure 5).

Everything here computes numbers: `runs.py` reads the runs it analyses, `provenance.py` writes the results with what
produced them, `figures.py` draws them. Nothing reaches into the layers: the gradient flow runs the unchanged layer
one timestep at a time through its public `forward(..., hx, start_step=t)`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn import data
from recurrent_bn.config import CONF_DIR
from recurrent_bn.layers import set_backend
from recurrent_bn.models import build_model
from recurrent_bn.norm import batch_norms
from recurrent_bn.runs import checkpoint_file, load_trained_model

log = logging.getLogger("recurrent_bn")

LN2 = math.log(2.0)
PAPER_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# ------------------------------------------------------------------------------------------ Figure 1a: gradient flow


def compose_config(model: str, overrides: Sequence[str] = (), task: str = "smnist") -> DictConfig:
    """The run config of `model` on `task` with Hydra overrides, exactly as the trainer would compose it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"task={task}", f"model={model}", "logger=csv",
                                                        *overrides])


def mnist_batch(data_root=None, size: int = 100, task: str = "smnist", start: int = 0) -> tuple[Tensor, Tensor]:
    """`size` consecutive real MNIST training images from `start`, as the task feeds them: (784, B, 1), labels (B,).

    `task` "smnist" keeps the scanline order; "pmnist" applies the default config's permutation (seed 0).
    """
    splits = data.load_mnist(data.resolve_data_root(data_root))
    pixels, labels = splits["train"]
    order = data.pixel_order("none" if task == "smnist" else "random", 0)
    return next(data.class_eval_batches(pixels[start : start + size], labels[start : start + size], size,
                                        device="cpu", order=order))


def first_informative_step(x: Tensor) -> int | None:
    """The first timestep (0-based) at which some example of the batch has a non-zero input, None if none has.

    Before it every example has seen the same inputs (zeros), so with identical initial states every batch-norm
    input has zero batch variance and is normalized through 1/sqrt(eps).
    """
    active = (x.reshape(x.shape[0], -1) != 0).any(1).nonzero()
    return int(active[0]) if len(active) else None


def all_informative_step(x: Tensor) -> int | None:
    """The first timestep (0-based) by which every example of the batch has had a non-zero input (None if some
    example never has). Before it some example's state may still be exactly its zero start, which layer norm,
    normalizing each example over its own features, divides by sqrt(eps) as batch norm does for the batch."""
    nonzero = x.reshape(x.shape[0], x.shape[1], -1).ne(0).any(-1)  # (T, B)
    if not nonzero.any(0).all():
        return None
    return int(nonzero.float().argmax(0).max())


def _states(state) -> tuple[Tensor, ...]:
    return tuple(state) if isinstance(state, tuple | list) else (state,)


def _pack(states: tuple[Tensor, ...]):
    return states if len(states) > 1 else states[0]


def stepwise_forward(recurrent: nn.Module, x: Tensor, hx=None, detach_states: bool = False):
    """Run a recurrent-bn layer over `x` (T, B, I) one timestep at a time, carrying its state.

    Each step calls the layer's own forward with `start_step=t`, so batch norm picks timestep t's statistics (in
    training, that timestep's batch statistics): the result equals one call over the whole sequence. With
    `detach_states` every state enters the next step as a fresh leaf, so that each step's graph stands alone.

    Returns (output (T, B, H), fed, produced): `fed[t]` is the state tuple step t started from (None where the
    layer made its own initial state) and `produced[t]` the state tuple it returned, (h,) or (h, c), each
    (num_layers, B, H).
    """
    outputs, fed, produced = [], [], []
    state = None if hx is None else _states(hx)
    for t in range(x.shape[0]):
        if state is not None and detach_states:
            state = tuple(s.detach().requires_grad_(True) for s in state)
        fed.append(state)
        output, new_state = recurrent(x[t : t + 1], None if state is None else _pack(state), start_step=t)
        outputs.append(output)
        state = _states(new_state)
        produced.append(state)
    return torch.cat(outputs), fed, produced


def _vjp(outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], grads) -> list[Tensor]:
    result = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    return [torch.zeros_like(s) if g is None else g for s, g in zip(inputs, result, strict=True)]


def gradient_flow(model: nn.Module, x: Tensor, y: Tensor, seed: int = 0, layer: int = -1) -> dict[str, np.ndarray]:
    """The batch mean of the per-example norm ‖∂loss/∂h_t‖ for t = 1 … T (paper Figure 1a), in float64.

    `model` is a `SequenceClassifier` (a recurrent layer and a linear read-out of its last state); the loss is the
    mean cross-entropy of that read-out. The model runs in training mode (batch statistics, initial-state noise
    drawn from `seed`) on a float64 deep copy, so the caller's model and its population statistics are untouched;
    the copy runs the layers' reference loops (autograd of the paper's equations), whatever backend the model was
    built with. For an LSTM, ∂loss/∂h_t is the derivative with respect to h_t with the cell c_t held as its own
    variable.

    The backward pass runs step by step, g_t = (∂s_{t+1}/∂s_t)ᵀ g_{t+1} with s = h (or (h, c)), each step a
    vector-Jacobian product of the unchanged layer. After every step the vector is rescaled and the scale kept as
    a logarithm: the mathematics is that of one backward pass, but norms far outside float64's range (sequential
    MNIST's zero-variance steps pass 1e+300 for some models) neither overflow nor underflow.

    Returns {"t": 1..T, "log10_grad_norm": (T,), "grad_norm": (T,) (10 ** log10; inf past float64's range)}, where
    h_t is the state after reading input t (1-based), so t = T is the state the read-out sees.
    """
    model = copy.deepcopy(model).double().train()
    set_backend(model, "reference")
    x = x.double()
    recurrent, head = model.recurrent, model.head
    torch.manual_seed(seed)
    steps = x.shape[0]
    log10_norms = np.full(steps, -np.inf)
    with torch.enable_grad():
        _, fed, produced = stepwise_forward(recurrent, x, detach_states=True)
        loss = F.cross_entropy(head(produced[-1][0][layer]), y)
        grads = _vjp((loss,), produced[-1], None)
        log_scale = 0.0  # natural log of the factor divided out of `grads` so far
        for t in range(steps - 1, -1, -1):  # grads = ∂loss/∂(state after input t+1), divided by exp(log_scale)
            mean_norm = grads[0][layer].norm(dim=-1).mean().item()
            if mean_norm > 0:
                log10_norms[t] = math.log10(mean_norm) + log_scale / math.log(10)
            if t == 0:
                break
            size = max(float(g.abs().max()) for g in grads)
            if size == 0:
                break  # every earlier gradient is exactly zero as well
            if not math.isfinite(size):
                raise FloatingPointError(f"the gradient at t={t + 1} is not finite even after rescaling")
            grads = [g / size for g in grads]
            log_scale += math.log(size)
            grads = _vjp(produced[t], fed[t], grads)  # step t started from the state after input t
    with np.errstate(over="ignore"):
        grad_norm = np.power(10.0, log10_norms)
    return {"t": np.arange(1, steps + 1), "log10_grad_norm": log10_norms, "grad_norm": grad_norm}


@dataclass(frozen=True)
class FlowVariant:
    """One model of the gradient-flow analysis: a model config, Hydra overrides, and the γ_init values to try."""

    name: str
    model: str
    overrides: tuple[str, ...] = ()
    gammas: tuple[float | None, ...] = (None,)  # None: the model's own gamma_init (or none at all)
    description: str = ""


# Figure 1a and the variants. Every BN model starts from a zero initial state unless it says otherwise, as in
# the paper's Figure 1a (the smnist task config would otherwise give the BN models the authors' noise of 0.1).
FIGURE_1A_VARIANTS = (
    FlowVariant("bn_rnn", "bn_rnn", ("model.init_state_noise=0",), PAPER_GAMMAS,
                "tanh(BN(W_h h + W_x x)): the paper's Figure 1a model (W_h identity, W_x orthogonal, zero h_0)"),
    FlowVariant("bn_rnn_noise", "bn_rnn", ("model.init_state_noise=0.1",), PAPER_GAMMAS,
                "as bn_rnn, with Gaussian initial-state noise of std 0.1 (the authors' fix)"),
    FlowVariant("bn_rnn_separate_orthogonal", "bn_rnn",
                ("model.norm_placement=separate", "model.recurrent_init=orthogonal", "model.init_state_noise=0"),
                PAPER_GAMMAS, "tanh(BN(W_x x) + BN(W_h h) + b), W_h orthogonal, zero h_0"),
    FlowVariant("bn_lstm", "bn_lstm", ("model.init_state_noise=0",), PAPER_GAMMAS,
                "BN-LSTM (input, recurrent and cell normalized), zero initial state"),
    FlowVariant("bn_lstm_noise", "bn_lstm", ("model.init_state_noise=0.1",), PAPER_GAMMAS,
                "BN-LSTM with initial-state noise 0.1 (the authors' sequential-MNIST setting)"),
    FlowVariant("ln_lstm", "ln_lstm", ("model.init_state_noise=0",), (0.1, 1.0),
                "LN-LSTM (layer norm in the BN-LSTM's places), zero initial state"),
    FlowVariant("lstm", "lstm", (), (None,), "the plain LSTM"),
)
# Figure 8, the tanh question: the same analysis for the plain RNN, BN in place of tanh and the bias, and LN.
TANH_QUESTION_VARIANTS = (
    FlowVariant("rnn", "rnn", (), (None,), "tanh(W_h h + W_x x + b), W_h identity"),
    FlowVariant("bn_linear_rnn", "bn_linear_rnn", ("model.init_state_noise=0",), PAPER_GAMMAS,
                "BN(W_x x) + BN(W_h h): batch norm in place of tanh and the bias, zero h_0"),
    FlowVariant("ln_rnn", "ln_rnn", ("model.init_state_noise=0",), (0.1, 1.0), "tanh(LN(W_h h + W_x x)), zero h_0"),
)


def gradient_flow_table(
    variants: Iterable[FlowVariant], x: Tensor, y: Tensor, task: str = "smnist", seed: int = 0,
    extra_overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Run `gradient_flow` for every variant and γ; one row per (variant, γ, t).

    Each model is built by the trainer's own code from its config (`compose_config`), with the same seed for every
    γ, so that within a variant only γ differs (W_x is the same draw). Columns: variant, model, gamma_init (NaN where
    the model has no normalization), init_state_noise, norm_placement, recurrent_init, hidden_size, overrides, t,
    steps_from_end, log10_grad_norm, grad_norm, seconds.
    """
    frames = []
    for variant in variants:
        for gamma in variant.gammas:
            overrides = [*variant.overrides, *extra_overrides]
            if gamma is not None:
                overrides.append(f"model.gamma_init={gamma}")
            cfg = compose_config(variant.model, overrides, task=task)
            torch.manual_seed(seed)
            model = build_model(cfg)
            start = time.time()
            flow = gradient_flow(model, x, y, seed=seed)
            seconds = time.time() - start
            normalized = cfg.model.norm != "none"
            frame = pd.DataFrame({
                "variant": variant.name, "model": cfg.model.name,
                "gamma_init": float(cfg.model.gamma_init) if normalized else float("nan"),
                "init_state_noise": float(cfg.model.init_state_noise),
                "norm_placement": cfg.model.get("norm_placement", ""), "recurrent_init": cfg.model.recurrent_init,
                "hidden_size": int(cfg.model.hidden_size), "overrides": " ".join(overrides),
                "t": flow["t"], "steps_from_end": x.shape[0] - flow["t"],
                "log10_grad_norm": flow["log10_grad_norm"], "grad_norm": flow["grad_norm"], "seconds": seconds,
            })
            frames.append(frame)
            log.info("gradient flow %s gamma=%s: %.1f s, log10 norm at t=1: %.1f, t=T: %.1f", variant.name, gamma,
                     seconds, flow["log10_grad_norm"][0], flow["log10_grad_norm"][-1])
    return pd.concat(frames, ignore_index=True)


def summarize_gradient_flow(flow: pd.DataFrame, first_informative: int | None = None,
                            at: Sequence[int] = (1, 50, 100, 200, 300, 400, 600)) -> pd.DataFrame:
    """One row per (variant, γ): what a y-axis capped at 1 shows and what it hides.

    Columns: max_log10 and t_of_max (over all t), n_above_1 (timesteps with a norm > 1, which a cap at 1 hides),
    log10 at each t in `at` and at t = T, min_log10_after (the smallest norm after the first informative step),
    steps_below_1e-26 (the fewest steps from the end at which the norm is below 1e-26, NaN if never).
    """
    rows = []
    for (variant, gamma), group in flow.groupby(["variant", "gamma_init"], dropna=False, sort=False):
        group = group.sort_values("t")
        values = group["log10_grad_norm"].to_numpy()
        t = group["t"].to_numpy()
        row = {"variant": variant, "gamma_init": gamma, "max_log10": values.max(), "t_of_max": int(t[values.argmax()]),
               "n_above_1": int((values > 0).sum())}
        for step in at:
            if step <= t[-1]:
                row[f"log10_at_t{step}"] = values[t == step][0]
        row["log10_at_T"] = values[-1]
        if first_informative is not None:
            row["min_log10_after_informative"] = values[t > first_informative].min()
        below = np.nonzero(values < -26)[0]
        row["steps_below_1e-26"] = int(t[-1] - t[below[-1]]) if len(below) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- Figure 1b: tanh derivative


def tanh_derivative(z):
    """tanh'(z) = 1 - tanh(z)²."""
    return 1.0 - np.tanh(z) ** 2


def expected_tanh_derivative(sigmas: Iterable[float], quantiles: Sequence[float] = (0.25, 0.5, 0.75),
                             nodes: int = 200) -> pd.DataFrame:
    """E[tanh'(z)] for z ~ N(0, σ²) and quantiles of tanh'(z) (paper Figure 1b), computed exactly.

    The mean is Gauss–Hermite quadrature with `nodes` points (exact to ~1e-12 here). Quantiles need no sampling:
    tanh'(z) decreases in |z|, so its q-quantile is tanh' at the (1 - q)-quantile of |z|, which is half-normal:
    σ · Φ⁻¹(1 - q / 2). With batch norm the pre-activation's standard deviation is γ, so σ reads as γ_init.

    Returns columns sigma, mean and q25 / q50 / q75 (one per quantile, named by percent).
    """
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)  # ∫ f(z) exp(-z²/2) dz
    weights = weights / np.sqrt(2 * np.pi)
    standard = NormalDist()
    rows = []
    for sigma in sigmas:
        row = {"sigma": float(sigma), "mean": float(np.sum(weights * tanh_derivative(sigma * points)))}
        for q in quantiles:
            row[f"q{round(q * 100)}"] = float(tanh_derivative(sigma * standard.inv_cdf(1 - q / 2)))
        rows.append(row)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------- Figure 3b: bpc vs length


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that normalizes with each minibatch's own statistics ("batch statistics").

    Everything else stays in evaluation mode (no dropout, no initial-state noise); the copy's population statistics
    change as it runs, the original's never do.
    """
    copied = copy.deepcopy(model).eval()
    for norm in batch_norms(copied):
        norm.train()
    return copied


@torch.no_grad()
def _text_bpc(model: nn.Module, batches) -> tuple[float, int]:
    loss_sum, count = 0.0, 0
    for x, y in batches:
        logits, _ = model(x)
        loss_sum += float(F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                          reduction="sum"))
        count += y.numel()
    return loss_sum / max(count, 1) / LN2, count


def bpc_vs_length(
    run_dir: Path, lengths: Iterable[int] = range(100, 1001, 100), split: str = "test", batch_size: int | None = None,
    limit: int | None = None, data_root=None, device: str = "cpu",
) -> pd.DataFrame:
    """Bits per character of a trained language model on `split` cut into segments of each length (Figure 3b).

    A segment of L characters gives L - 1 predictions, as in training (segments of 100 → T_max = 99). Each batch
    norm is evaluated two ways: "population" (the re-estimated statistics of final.pt; timesteps past T_max reuse
    T_max's, as the paper prescribes) and "batch" (each minibatch's own statistics, see `with_batch_statistics`).
    A model without batch norm is evaluated once, mode "none". Only full batches of `batch_size` segments (default
    the task's eval_batch_size) are used, the same ones in every mode, so batch statistics always see the same
    number of examples; `limit` caps the batches per length.

    Returns columns run_dir, task, model, mode, length, bpc, characters (the number of predictions scored).
    """
    model, cfg = load_trained_model(run_dir, device=device)
    if cfg.task.kind != "language_model":
        raise ValueError(f"{run_dir} is a {cfg.task.name} run; bpc_vs_length needs a language model (ptb, text8)")
    from recurrent_bn.tasks import Task

    task = Task(cfg.task, torch.device(device), seed=int(cfg.seed),
                data_root=data_root if data_root is not None else cfg.data.root, verify=False)
    ids = task.splits[split]
    batch_size = batch_size or int(cfg.task.eval_batch_size)
    models = {"population": model, "batch": with_batch_statistics(model)} if batch_norms(model) else {"none": model}
    rows = []
    for length in lengths:
        def batches(length=length):
            for index, (x, y) in enumerate(b for b in data.text_eval_batches(ids, length, batch_size, device=device)
                                           if b[0].shape[1] == batch_size):
                if limit is not None and index >= limit:
                    return
                yield x, y

        for mode, evaluated in models.items():
            bpc, count = _text_bpc(evaluated, batches())
            if count == 0:
                log.warning("%s: no full batch of %d segments of %d characters in %s", run_dir, batch_size, length,
                            split)
                continue
            rows.append({"run_dir": str(run_dir), "task": cfg.task.name, "model": cfg.model.name, "mode": mode,
                         "length": int(length), "bpc": bpc, "characters": count})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- Figure 5: population statistics


TERM_MODULES = {"input": "norm_ih", "recurrent": "norm_hh", "cell": "norm_c", "sum": "norm"}
GATES = ("i", "f", "g", "o")


def population_statistics(source, units: int = 30, seed: int = 0, layer: int = 0,
                          terms: Sequence[str] = ("recurrent", "cell", "input")) -> pd.DataFrame:
    """Per-timestep population mean and variance of `units` random features of each batch-normalized term.

    `source` is a run directory (its final.pt is read), a checkpoint path, or a state dict. Only the timesteps the
    statistics were estimated for (`trained_length`) are returned. For the 4H-wide terms of an LSTM the gate (i,
    f, g, o) of each feature is given. Columns: term, unit, gate, t (1-based), mean, var.
    """
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        path = checkpoint_file(path / "final.pt" if path.is_dir() else path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    generator = np.random.default_rng(seed)
    frames = []
    for term in terms:
        prefix = next((k[: -len(".running_mean")] for k in state
                       if k.endswith(f"{TERM_MODULES[term]}_l{layer}.running_mean")), None)
        if prefix is None:
            continue
        mean, var = state[f"{prefix}.running_mean"].double(), state[f"{prefix}.running_var"].double()
        length = int(state[f"{prefix}.trained_length"]) or mean.shape[0]
        features = mean.shape[1]
        weight_hh = state.get(prefix.rsplit(".", 1)[0] + f".weight_hh_l{layer}" if "." in prefix
                              else f"weight_hh_l{layer}")
        hidden = None if weight_hh is None else weight_hh.shape[1]
        chosen = np.sort(generator.choice(features, size=min(units, features), replace=False))
        for unit in chosen:
            gate = GATES[unit // hidden] if hidden and features == 4 * hidden else ""
            frames.append(pd.DataFrame({
                "term": term, "unit": int(unit), "gate": gate, "t": np.arange(1, length + 1),
                "mean": mean[:length, unit].numpy(), "var": var[:length, unit].numpy(),
            }))
    if not frames:
        raise ValueError("no per-timestep batch-norm statistics in this state dict (is it a BN model?)")
    return pd.concat(frames, ignore_index=True)


def settling_step(stats: pd.DataFrame, tolerance: float = 0.1, noise_band: float = 4.0) -> pd.DataFrame:
    """For each term and statistic, the median over units of the step from which the statistic stays settled.

    A unit's stationary value is the median over the second half of its timesteps; it is settled from the first t
    after which it stays within max(`noise_band` × the standard deviation over that second half, `tolerance` × its
    distance from the stationary value at t = 1) of it. The noise band keeps estimation noise (statistics averaged
    over few batches) from counting as drift. Columns: term, statistic, median_settling_step, units.
    """
    rows = []
    for term, group in stats.groupby("term", sort=False):
        for statistic in ("mean", "var"):
            steps = []
            for _, unit in group.groupby("unit"):
                values = unit.sort_values("t")[statistic].to_numpy()
                tail = values[len(values) // 2 :]
                stationary = np.median(tail)
                band = max(noise_band * tail.std(), tolerance * abs(values[0] - stationary), 1e-12)
                outside = np.nonzero(np.abs(values - stationary) > band)[0]
                steps.append(int(outside[-1]) + 2 if len(outside) else 1)
            rows.append({"term": term, "statistic": statistic, "median_settling_step": float(np.median(steps)),
                         "units": len(steps)})
    return pd.DataFrame(rows)
