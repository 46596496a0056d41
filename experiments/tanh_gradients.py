"""The tanh question's gradient answer: ‖∂loss/∂h_t‖ over t on permuted MNIST (true permutation) for rnn, bn_rnn,
bn_linear_rnn, ln_rnn and bn_linear_rnn2, at initialization (γ = 0.1 and 1.0, the paper's MNIST setup) and after
training, at the γ it was trained with: from the final weights of a finished campaign run (final.pt in its record
under results/runs/tanh_question/), else from the campaign directory's last.pt (an unfinished run, or a finished one
whose final weights were not kept).

    python experiments/tanh_gradients.py               # writes results/analysis/tanh_gradients.csv and .json
    python experiments/tanh_gradients.py --split-only  # only the split below, from the stored csv

The factor is also split by the pixel at each step (results/analysis/tanh_gradients_by_pixel.csv): steps whose
pixel is the same for every image of the batch (0 at the border; the input term's batch norm is then 0) against
steps whose pixel varies, over the same last 400 steps.

The per-step factor is the geometric mean of g_t / g_{t+1} over the last 400 steps (backwards in time): below 1 the
gradient vanishes into the past, above 1 it explodes. Needs MNIST; the trained rows need $RBN_CAMPAIGN_DIR's runs.
"""


import sys

import numpy as np
import pandas as pd
import torch
from _launch import analysis_root
from paper_curves import campaign_dir, collected

from recurrent_bn import analysis
from recurrent_bn.models import build_model
from recurrent_bn.provenance import provenance, write_analysis
from recurrent_bn.runs import load_trained_model

MODELS = ("rnn", "bn_rnn", "bn_linear_rnn", "ln_rnn", "bn_linear_rnn2")
PRESET = ["experiment=paper_pmnist", "task.permutation=random", "model.init_state_noise=0"]
WINDOW = 400


def factor(log10_norms: np.ndarray) -> float:
    """Geometric mean over the last WINDOW steps of the backward ratio g_t / g_{t+1}."""
    tail = log10_norms[-WINDOW:]
    return float(10 ** ((tail[0] - tail[-1]) / (len(tail) - 1)))


def flows(x, y) -> pd.DataFrame:
    frames = []
    campaign = campaign_dir()
    for model in MODELS:
        gammas = (None,) if model == "rnn" else (0.1, 1.0)
        for gamma in gammas:
            overrides = PRESET + ([f"model.gamma_init={gamma}"] if gamma is not None else [])
            torch.manual_seed(0)
            network = build_model(analysis.compose_config(model, overrides, task="pmnist"))
            frames.append(frame(network, x, y, model, gamma, "initialization"))
        name = f"tanh_pmnist_{model}_s1"
        record, run_dir = collected(name), campaign / name
        found = [(d, f) for d, f in ((record, "final.pt"), (run_dir, "last.pt")) if (d / f).exists()]
        if found:
            directory, checkpoint = found[0]
            network, cfg = load_trained_model(directory, checkpoint)
            step = torch.load(directory / checkpoint, weights_only=True)["step"]
            gamma = float(cfg.model.gamma_init) if cfg.model.norm != "none" else None
            when = f"trained (final weights, step {step})" if checkpoint == "final.pt" else f"trained ({step} steps)"
            frames.append(frame(network, x, y, model, gamma, when))
    return pd.concat(frames, ignore_index=True)


def frame(network, x, y, model, gamma, when) -> pd.DataFrame:
    flow = analysis.gradient_flow(network, x, y, seed=0)
    print(f"{model:15s} gamma={gamma!s:5s} {when:22s} factor/step {factor(flow['log10_grad_norm']):.4f} "
          f"log10 norm t=1 {flow['log10_grad_norm'][0]:.1f}, t=T {flow['log10_grad_norm'][-1]:.1f}", flush=True)
    return pd.DataFrame({"model": model, "gamma_init": np.nan if gamma is None else gamma, "when": when,
                         "t": flow["t"], "log10_grad_norm": flow["log10_grad_norm"]})


def by_pixel(table: pd.DataFrame, x: torch.Tensor) -> pd.DataFrame:
    """The per-step factor g_t / g_{t+1} over the last WINDOW steps, split by whether the pixel of step t has zero
    variance over the batch (x: (T, B, 1), the batch the flows were computed on)."""
    constant = (x[:, :, 0].var(1, unbiased=False) == 0).numpy()
    rows = []
    for (model, gamma, when), group in table.groupby(["model", "gamma_init", "when"], dropna=False, sort=False):
        log10 = group.sort_values("t")["log10_grad_norm"].to_numpy()
        steps = np.arange(len(log10) - 1)[-(WINDOW - 1):]  # ratio i: g_{i+1} / g_{i+2} (t is 1-based)
        ratio = log10[steps] - log10[steps + 1]
        for name, chosen in (("pixel constant over the batch", constant[steps]),
                             ("pixel varies", ~constant[steps])):
            rows.append({"model": model, "gamma_init": gamma, "when": when, "steps": name,
                         "count": int(chosen.sum()), "factor_per_step": float(10 ** ratio[chosen].mean())})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    x, y = analysis.mnist_batch(task="pmnist", size=100)
    if "--split-only" in sys.argv[1:]:
        split = by_pixel(pd.read_csv(analysis_root() / "tanh_gradients.csv"), x)
        write_analysis(split, analysis_root() / "tanh_gradients_by_pixel.csv", provenance(window=WINDOW))
        print(split.to_string(index=False))
        sys.exit(0)
    table = flows(x, y)
    split = by_pixel(table, x)
    write_analysis(split, analysis_root() / "tanh_gradients_by_pixel.csv", provenance(window=WINDOW))
    print(split.to_string(index=False))
    summary = [{"model": m, "gamma_init": g, "when": w, "factor_per_step": factor(group["log10_grad_norm"].to_numpy()),
                "log10_at_t1": group["log10_grad_norm"].iloc[0], "log10_at_T": group["log10_grad_norm"].iloc[-1]}
               for (m, g, w), group in table.groupby(["model", "gamma_init", "when"], dropna=False, sort=False)]
    meta = provenance(window=WINDOW, overrides=PRESET, factors=summary)
    write_analysis(table, analysis_root() / "tanh_gradients.csv", meta)
    print(pd.DataFrame(summary).to_string(index=False))
