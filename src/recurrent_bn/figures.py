"""The paper's figures and tables, one function per figure, drawn from the frames of `recurrent_bn.runs` (training
runs) and `recurrent_bn.analysis` (the computed analyses, as stored in results/analysis).

Every function takes data frames (and the paper's reference values) and returns a `matplotlib.figure.Figure`
(or, for tables, a DataFrame). They draw whatever exists: a missing model, task or analysis is named in the figure
and in a log line, never filled in. Each figure says the scale its runs were made at, read from their configs.
Figures are built without pyplot, so they render with Agg anywhere (scripts, tests, servers) and nothing is left
open; in a notebook a returned Figure displays itself.

`runs.Results` loads a results folder (`results/` or `$RBN_RESULTS`): runs, summaries, analyses and the reference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from recurrent_bn.analysis import settling_step
from recurrent_bn.runs import Results, reference_rows, runs_at

log = logging.getLogger("recurrent_bn")

MODEL_LABELS = {
    "lstm": "LSTM", "bn_lstm": "BN-LSTM", "vbn_lstm": "VBN-LSTM (W_x x only)", "ln_lstm": "LN-LSTM",
    "rnn": "tanh RNN", "bn_rnn": "tanh(BN(·)) RNN", "bn_linear_rnn": "BN, no tanh, no bias",
    "bn_linear_rnn2": "2 BN-linear recurrences, tanh between",
    "ln_rnn": "tanh(LN(·)) RNN", "bne_lstm": "BN-e* LSTM (W_x x shared over time)",
}
MODEL_COLORS = {
    "lstm": "tab:blue", "bn_lstm": "tab:red", "vbn_lstm": "tab:green", "ln_lstm": "tab:purple", "rnn": "tab:gray",
    "bn_rnn": "tab:orange", "bn_linear_rnn": "tab:brown", "ln_rnn": "tab:pink", "bn_linear_rnn2": "tab:olive",
    "bne_lstm": "tab:cyan",
}
TASK_LABELS = {
    "smnist": "sequential MNIST", "pmnist": "permuted MNIST", "ptb": "Penn Treebank characters", "text8": "text8",
    "digits": "sklearn digits (8×8, 64 steps)",
}
CLASSIFICATION_TASKS = ("smnist", "pmnist", "digits")
LANGUAGE_TASKS = ("ptb", "text8")
METRIC_LABELS = {"acc": "accuracy", "bpc": "bits per character"}


def _label(model: str) -> str:
    return MODEL_LABELS.get(model, str(model))


def _color(model: str) -> str | None:
    return MODEL_COLORS.get(model)


def _task_label(task: str) -> str:
    return TASK_LABELS.get(task, str(task))


def _metric_of(task: str) -> str:
    return "bpc" if task in LANGUAGE_TASKS else "acc"


def _tasks_of(runs: pd.DataFrame, preferred: Sequence[str]) -> list[str]:
    """The tasks the runs hold, those of `preferred` first in its order, the others after them sorted."""
    present = [t for t in dict.fromkeys(runs["task"] if not runs.empty else []) if isinstance(t, str)]
    return [t for t in preferred if t in present] + sorted(t for t in present if t not in preferred)


def _rows_of(runs: pd.DataFrame, task: str, models: Sequence[str]) -> pd.DataFrame:
    return runs[(runs["task"] == task) & runs["model"].isin(models)] if not runs.empty else runs


def _gamma_colors(gammas: Sequence[float]) -> dict[float, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    values = sorted(g for g in set(gammas) if not (isinstance(g, float) and math.isnan(g)))
    span = max(len(values) - 1, 1)
    return {g: cmap(0.9 * i / span) for i, g in enumerate(values)}


def _empty(ax: Axes, message: str, keep_ticks: bool = False) -> None:
    """Say in the axes (and the log) that there is nothing to draw of ours."""
    log.warning("figure: %s", message)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=9,
            color="0.35")
    if not keep_ticks:
        ax.set_xticks([])
        ax.set_yticks([])


def _footer(fig: Figure, lines: Sequence[str]) -> None:
    """Notes under the axes (scale, what is missing, provenance), wrapped, with room made for them."""
    import textwrap

    width_in, height_in = fig.get_size_inches()
    columns = max(int(width_in * 17), 60)
    wrapped = [part for line in lines if line for part in textwrap.wrap(line, columns)]
    if not wrapped:
        return
    fig.text(0.01, 0.005, "\n".join(wrapped), ha="left", va="bottom", fontsize=7.5, color="0.25")
    bottom = min(0.5, (len(wrapped) * 7.5 * 1.25 + 6) / (height_in * 72))
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.set(rect=(0, bottom, 1, 1 - bottom))  # (left, bottom, width, height)


def _missing(expected: Iterable[str], present: Iterable[str], what: str, runs: pd.DataFrame | None = None) -> str:
    """"missing <what>: a, b (diverged)" for the expected names not drawn; with `runs`, how their runs ended."""
    present = set(present)
    absent = []
    for name in expected:
        if name in present:
            continue
        ended = sorted(set(runs.loc[runs["model"] == name, "status"].astype(str))) \
            if runs is not None and not runs.empty and "model" in runs else []
        absent.append(f"{name} ({', '.join(ended)})" if ended else name)
    if not absent:
        return ""
    message = f"missing {what}: {', '.join(absent)}"
    log.warning("figure: %s", message)
    return message


def _drawn_models(rows: pd.DataFrame, split: str, metric: str) -> list[str]:
    if rows.empty:
        return []
    return list(rows.loc[(rows["split"] == split) & rows[metric].notna(), "model"].unique())


# --------------------------------------------------------------------------------------------------- scale


def _run_table(runs: pd.DataFrame) -> pd.DataFrame:
    if runs is None or runs.empty:
        return pd.DataFrame()
    return runs.drop_duplicates("run_dir") if "run_dir" in runs else runs


def scale_label(runs: pd.DataFrame) -> str:
    """The scale the runs were made at, from their configs, e.g.
    "CPU scale (cpu_pmnist): 1,500 steps, hidden 100, batch 100 — 4 runs". One clause per distinct setting."""
    table = _run_table(runs)
    if table.empty:
        return "no runs"
    clauses = []
    keys = ["task", "preset", "max_steps", "hidden_size", "batch_size"]
    table = table.assign(**{k: table[k] if k in table else None for k in keys})
    for values, group in table.groupby(keys, dropna=False, sort=False):
        task, preset, max_steps, hidden, batch = values
        preset = preset if isinstance(preset, str) else None
        kind = ("CPU scale" if preset and preset.startswith("cpu") else
                "paper scale" if preset and preset.startswith("paper") else "scale")
        parts = []
        if _is_number(max_steps):
            parts.append(f"{int(max_steps):,} steps")
        if _is_number(hidden):
            parts.append(f"hidden {int(hidden)}")
        if _is_number(batch):
            parts.append(f"batch {int(batch)}")
        unfinished = group[group["status"] != "completed"] if "status" in group else group.iloc[:0]
        count = f"{len(group)} run{'s' if len(group) != 1 else ''}"
        if len(unfinished):
            count += f", {len(unfinished)} not completed ({', '.join(sorted(set(map(str, unfinished['status']))))})"
        clauses.append(f"{task}: {kind}{f' ({preset})' if preset else ''}: {', '.join(parts)} — {count}")
    return "; ".join(clauses)


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not (
        isinstance(value, float | np.floating) and math.isnan(value))


# --------------------------------------------------------------------------------------------------- curves


def _curves(ax: Axes, runs: pd.DataFrame, split: str, metric: str, label_of, color_of, style_of=None) -> list[str]:
    """One line per run of `metric` on `split` against the step; each label once. Returns the labels drawn."""
    drawn: list[str] = []
    rows = runs[(runs["split"] == split) & runs[metric].notna()] if not runs.empty else runs
    for _, run in rows.groupby("run_dir", sort=False):
        run = run.sort_values("step")
        first = run.iloc[0]
        label = label_of(first)
        style = style_of(first) if style_of else "-"
        ax.plot(run["step"], run[metric], style, color=color_of(first), lw=1.3,
                label=None if label in drawn else label, marker="." if len(run) < 15 else None)
        drawn.append(label)
    return drawn


def _dress(ax, xlabel: str, ylabel: str, title: str, legend_loc: str = "best") -> None:
    """Labels, grid and title of one curve panel; a legend when something was drawn ("below": under the axes,
    for panels whose curves and reference lines leave no free corner)."""
    if ax.get_legend_handles_labels()[0]:
        if legend_loc == "below":
            ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        else:
            ax.legend(fontsize=7.5, loc=legend_loc)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)


def _validation_panel(ax: Axes, rows: pd.DataFrame, metric: str, title: str, empty: str, *, keep_ticks: bool = False,
                      expected: Sequence[str] = (), what: str = "models", label_of=None, xlabel: str = "training step",
                      legend_loc: str = "best") -> str:
    """Our validation `metric` against the step, one line per run coloured by its model (labelled by `label_of`,
    default the model's name), or `empty` said in the panel when there are no rows; then labels, grid, legend.

    The paper's values, drawn first by the caller, share the legend; `keep_ticks` keeps the axes when only they are
    drawn. Returns the note naming the `expected` models that drew nothing ("" when none are expected or missing).
    """
    note = ""
    if rows.empty:
        _empty(ax, empty, keep_ticks=keep_ticks)
    else:
        _curves(ax, rows, "valid", metric, label_of or (lambda r: _label(r["model"])), lambda r: _color(r["model"]))
        note = _missing(expected, _drawn_models(rows, "valid", metric), what, rows)
    _dress(ax, xlabel, f"validation {METRIC_LABELS[metric]}", title, legend_loc)
    return note


def _reached(rows: pd.DataFrame) -> str:
    """"job to step N" for each run (job) of `rows`: how far the runs have got."""
    last = rows.groupby("job")["step"].max() if not rows.empty else {}
    return ", ".join(f"{job} to step {int(step)}" for job, step in dict(last).items())


def _reference_lines(ax: Axes, reference: pd.DataFrame, color_of_model, text_prefix: str = "paper",
                     horizon: float | None = None) -> None:
    """The paper's values, named in the legend with the step each was read at: a cross at that step where it is
    within `horizon` (the steps our runs reached), else a horizontal dotted line (ours ran fewer steps)."""
    for _, row in reference.iterrows():
        color = color_of_model(row["model"]) if isinstance(row["model"], str) else "0.4"
        where = f" @ {row['step'] / 1000:g}k" if _is_number(row.get("step")) else ""
        qualifier = f" ({row['condition']})" if isinstance(row.get("condition"), str) else ""
        label = f"{text_prefix} {row['name']}{where}{qualifier}: {row['value']:g}"
        if horizon is not None and _is_number(row.get("step")) and float(row["step"]) <= horizon:
            ax.plot([row["step"]], [row["value"]], "x", ms=9, mew=2, color=color or "0.4", label=label)
        else:
            ax.axhline(row["value"], color=color or "0.4", ls=":", lw=1.1, label=label)


def _reference_steps(reference: pd.DataFrame) -> str:
    """"10k, 20k and 100k": the distinct steps the paper's values were read at."""
    steps = sorted({float(s) for s in reference.get("step", []) if _is_number(s)})
    names = [f"{s / 1000:g}k" for s in steps]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


# ------------------------------------------------------------------------------------- Figure 1a, 1b


def _flow_panel(ax: Axes, flow: pd.DataFrame, variant: str, title: str, cap: float | None = None,
                first_informative: int | None = None, extra: pd.DataFrame | None = None,
                t_min: int | None = None, paper_floor: bool = False) -> None:
    """log10 of the gradient norm over t for each γ of `variant` (and `extra` rows dashed, by model).

    `cap`: the authors' view, y capped at `cap`, with the hidden timesteps shaded. `t_min`: show t >= t_min only
    (the part after the zero-variance steps), y scaled to it. `paper_floor`: a line at the paper's 1e-26.
    """
    rows = flow[flow["variant"] == variant] if not flow.empty else flow
    if rows.empty and (extra is None or extra.empty):
        _empty(ax, f"no gradient-flow rows for {variant}")
        ax.set_title(title, fontsize=9)
        return
    if t_min is not None:
        rows = rows[rows["t"] >= t_min]
        extra = extra[extra["t"] >= t_min] if extra is not None else None
    colors = _gamma_colors(rows["gamma_init"].tolist())
    for gamma, group in rows.groupby("gamma_init", dropna=False, sort=True):
        label = f"γ={gamma:g}" if not math.isnan(gamma) else _label(group["model"].iloc[0])
        ax.plot(group["t"], group["log10_grad_norm"], color=colors.get(gamma, "k"), lw=1, label=label)
    if extra is not None:
        for (_, gamma), group in extra.groupby(["variant", "gamma_init"], dropna=False, sort=False):
            model = group["model"].iloc[0]
            suffix = f" γ={gamma:g}" if not math.isnan(gamma) else ""
            ax.plot(group["t"], group["log10_grad_norm"], color=_color(model), ls="--", lw=1.2,
                    label=f"{_label(model)}{suffix}")
    if first_informative is not None and (t_min is None or first_informative + 1 >= t_min):
        ax.axvline(first_informative + 1, color="0.5", lw=0.8, ls=":")
    if paper_floor:
        ax.axhline(-26, color="tab:red", lw=0.9, ls=":",
                   label="paper: γ ≥ 0.8 fall below 1e-26, 130–230 steps from the end")
        ax.axhspan(-3, -2, color="tab:red", alpha=0.1, label="paper: γ ≤ 0.3 roughly flat at 1e-3–1e-2")
    if cap is not None:
        top = math.log10(cap)
        values = rows["log10_grad_norm"].replace(-np.inf, np.nan)
        hidden = rows[rows["log10_grad_norm"] > top]
        low = values[values <= top].min()
        low = min(low - 1 if np.isfinite(low) else -30, -28 if paper_floor else 0)
        ax.set_ylim(low, top)
        if not hidden.empty:
            t_hidden = hidden.groupby("gamma_init")["t"].max().max()
            ax.axvspan(0, t_hidden, color="0.85", zorder=0)
            peak = hidden["log10_grad_norm"].max()
            ax.text(0.02, 0.45, f"the cap at {cap:g}\nhides t ≤ {t_hidden}:\nnorms up to\n1e{peak:.0f}",
                    transform=ax.transAxes, fontsize=7.5, va="center")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("t")
    ax.set_ylabel("log10 E‖∂loss/∂h_t‖")
    ax.grid(alpha=0.3)


def figure_1a(flow: pd.DataFrame, first_informative: int | None = None, meta: dict | None = None) -> Figure:
    """Figure 1a: gradient flow at initialization, γ_init = 0.1 … 1.0, on the whole range of t (log10 scale).

    Rows: the paper's BN tanh RNN (whole range; with the authors' y-cap at 1, what it hides shaded, the paper's
    read-offs beside; with the authors' initial-state noise 0.1); the `separate` placement with an orthogonal W_h
    (whole range and after the zero-variance steps); the BN-LSTM (whole range with the plain LSTM and LN-LSTM
    dashed; after the steps at which some example is still all zeros; with noise 0.1). `flow` is
    `analysis.gradient_flow_table`'s frame; `meta` its JSON, which gives the first (0-based) step at which some
    image of the batch has a non-zero pixel and the step by which every image has.
    """
    fig = Figure(figsize=(15, 12), layout="constrained")
    axes = fig.subplots(3, 3)
    flow = flow if flow is not None and not flow.empty else pd.DataFrame(columns=["variant", "t"])
    meta = meta or {}
    if first_informative is None:
        first_informative = meta.get("first_informative_step_0based")
    every = meta.get("all_informative_step_0based")
    after_first = first_informative + 2 if first_informative is not None else None
    after_every = every + 2 if every is not None else after_first
    others = flow[flow["variant"].isin(["lstm", "ln_lstm"])]
    panels = [
        ("bn_rnn", "tanh(BN(W_h h + W_x x)), zero h_0: the whole range", {}),
        ("bn_rnn", "the same, y capped at 1 as in the authors' plot", {"cap": 1.0, "paper_floor": True}),
        ("bn_rnn_noise", "the same with initial-state noise, std 0.1", {}),
        ("bn_rnn_separate_orthogonal", "BN(W_x x) + BN(W_h h) + b placement, W_h orthogonal", {}),
        ("bn_rnn_separate_orthogonal", f"the same, t ≥ {after_first}", {"t_min": after_first}),
        ("bn_rnn", f"tanh(BN(W_h h + W_x x)), t ≥ {after_first}", {"t_min": after_first}),
        ("bn_lstm", "BN-LSTM, zero initial state (dashed: LSTM, LN-LSTM)", {"extra": others}),
        ("bn_lstm", f"the same, t ≥ {after_every} (every image has a non-zero pixel)",
         {"extra": others, "t_min": after_every}),
        ("bn_lstm_noise", "BN-LSTM with initial-state noise 0.1", {}),
    ]
    for ax, (variant, title, options) in zip(axes.flat, panels, strict=True):
        _flow_panel(ax, flow, variant, title, first_informative=first_informative, **options)
    for ax in (axes[0, 0], axes[2, 1]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, ncol=2)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    paper_handles = [(h, label) for h, label in zip(handles, labels, strict=True) if label.startswith("paper")]
    if paper_handles:
        axes[0, 1].legend(*zip(*paper_handles, strict=True), fontsize=6.5, loc="lower right")
    task = _task_label(meta.get("task", "smnist"))
    fig.suptitle(f"Figure 1a: ‖∂loss/∂h_t‖ (batch mean of per-example norms) at initialization, {task}, float64")
    notes = []
    if first_informative is not None:
        notes.append(f"dotted line: t = {first_informative + 1}, the first step with a non-zero pixel in the batch; "
                     "before it every example is identical, the batch variance is 0 and BN divides by sqrt(eps).")
    if meta:
        notes.append(f"batch: {meta.get('batch', '?')}; produced by `{meta.get('command', '?')}` on "
                     f"{meta.get('machine', '?')}")
    notes.append("paper (read off its Figure 1a, y capped at 1): γ ≤ ~0.3 stays roughly flat near 1e-3–1e-2; "
                 "γ ≥ 0.8 falls below 1e-26 within about 130–230 steps from the end.")
    _footer(fig, notes)
    return fig


def figure_1b(tanh: pd.DataFrame) -> Figure:
    """Figure 1b: E[tanh'(z)] for z ~ N(0, σ²) with the inter-quartile band of tanh'(z)."""
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    if tanh is None or tanh.empty:
        _empty(ax, "no tanh-derivative table (run experiments/fig1b_tanh_derivative.py)")
        return fig
    ax.fill_between(tanh["sigma"], tanh["q25"], tanh["q75"], color="tab:blue", alpha=0.25,
                    label="inter-quartile range of tanh'(z)")
    ax.plot(tanh["sigma"], tanh["mean"], color="tab:blue", label="E[tanh'(z)]")
    for sigma in (0.1, 0.5, 1.0):
        row = tanh.iloc[(tanh["sigma"] - sigma).abs().argmin()]
        ax.plot(row["sigma"], row["mean"], "o", color="tab:red", ms=4)
        ax.annotate(f"{row['mean']:.2f}", (row["sigma"], row["mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("standard deviation σ of the input z ~ N(0, σ²)   (with BN: σ ≈ γ)")
    ax.set_ylabel("derivative of tanh")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Figure 1b: expected derivative of tanh (exact: quadrature and half-normal quantiles)", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------- Figure 2, 3a, 3b


def _validation_figure(runs: pd.DataFrame, tasks: Sequence[str], models: Sequence[str], width: float, paper_of,
                       text_prefix: str, title: str, footnote: str, **panel) -> Figure:
    """One validation panel per task (see `_validation_panel`), over the paper's values for it (`paper_of(task)`)
    as dotted lines; the scale, the missing models and `footnote` under the axes."""
    fig = Figure(figsize=(width * len(tasks), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(tasks)))
    notes = []
    for ax, task in zip(axes, tasks, strict=True):
        paper = paper_of(task)
        rows = _rows_of(runs, task, models)
        reached = rows["step"].max() if not rows.empty and rows["step"].notna().any() else None
        _reference_lines(ax, paper, _color, text_prefix=text_prefix, horizon=reached)
        notes.append(_validation_panel(ax, rows, _metric_of(task), _task_label(task),
                                       f"no {task} runs for {', '.join(models)}", keep_ticks=not paper.empty,
                                       expected=models, what=f"{task} models", **panel))
    fig.suptitle(title)
    _footer(fig, [scale_label(runs), *notes, footnote])
    return fig


def figure_2(runs: pd.DataFrame, reference: pd.DataFrame | None = None,
             models: Sequence[str] = ("lstm", "bn_lstm", "vbn_lstm", "ln_lstm")) -> Figure:
    """Figure 2: validation accuracy against training iteration, one panel per pixel task (sMNIST, pMNIST, and
    any other classification task the runs hold), one line per run; the paper's read-offs as dotted lines."""
    runs = runs if runs is not None else pd.DataFrame()
    tasks = _tasks_of(runs, ("smnist", "pmnist"))
    tasks = [t for t in tasks if t in CLASSIFICATION_TASKS or _metric_of(t) == "acc"] or ["smnist", "pmnist"]
    paper = reference_rows(reference, source="figure2", task=tasks, metric="valid_acc")
    return _validation_figure(
        runs, tasks, models, 6.2, lambda task: reference_rows(paper, task=task),
        "paper", "Figure 2: validation accuracy during training",
        f"dotted: the paper's validation accuracy read off its Figure 2 at the iteration named in each label "
        f"({_reference_steps(paper)}), drawn as a line across our shorter runs (a cross where our runs reach that "
        "iteration); a lower bound where the label says so" if not paper.empty else "",
        xlabel="training iteration", legend_loc="below")


def figure_3a(runs: pd.DataFrame, reference: pd.DataFrame | None = None,
              models: Sequence[str] = ("lstm", "bn_lstm")) -> Figure:
    """Figure 3a: validation bits per character against the training step (PTB; text8 too if present)."""
    runs = runs if runs is not None else pd.DataFrame()
    tasks = [t for t in _tasks_of(runs, LANGUAGE_TASKS) if t in LANGUAGE_TASKS] or ["ptb"]
    # The paper's own validation curve (its Figure 3a, read off at a few iterations), not its test numbers: the
    # test bpc of Tables 2 and 3 is another split, scored after the full training.
    paper = reference_rows(reference, source="figure3a", task=tasks, model=list(models), metric="valid_bpc")
    return _validation_figure(
        runs, tasks, models, 6.5, lambda task: reference_rows(paper, task=task),
        "paper", "Figure 3a: validation bits per character during training",
        f"the paper's validation bpc (its model: hidden 1000) read off its Figure 3a at the iteration named in each "
        f"label ({_reference_steps(paper)}): a cross where our runs reach that iteration, else a dotted line across "
        "them; its test bpc is in Table 2" if not paper.empty else "")


BPC_MODES = {"none": "", "population": "population statistics", "batch": "batch statistics"}


def _length_lines(ax: Axes, frame: pd.DataFrame, value: str = "bpc") -> None:
    for (model, mode), group in frame.groupby(["model", "mode"], sort=False):
        group = group.sort_values("length")
        label = _label(model) + (f", {BPC_MODES.get(mode, mode)}" if BPC_MODES.get(mode, mode) else "")
        ax.plot(group["length"], group[value], "-o" if mode != "batch" else "--s", color=_color(model), ms=3.5,
                label=label)


def figure_3b(bpc_length: pd.DataFrame, reference: pd.DataFrame | None = None,
              runs: pd.DataFrame | None = None) -> Figure:
    """Figure 3b: test bpc against the evaluation sequence length, LSTM and BN-LSTM with population and with batch
    statistics; ours (left) beside the paper's read-offs (right). `runs` (summaries or metrics rows of the
    evaluated runs) gives the scale."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ours, paper = fig.subplots(1, 2)
    if bpc_length is None or bpc_length.empty:
        _empty(ours, "no bpc-vs-length analysis (run experiments/fig3_ptb.py)")
        notes = []
    else:
        _length_lines(ours, bpc_length)
        ours.legend(fontsize=8)
        ours.set_xlabel("evaluation sequence length")
        ours.set_ylabel("bits per character")
        ours.grid(alpha=0.3)
        expected = [("lstm", "none"), ("bn_lstm", "population"), ("bn_lstm", "batch")]
        present = set(zip(bpc_length["model"], bpc_length["mode"], strict=True))
        notes = [_missing([f"{m} ({k})" for m, k in expected if (m, k) not in present], [], "curves")]
    ours.set_title("ours", fontsize=10)
    reference = reference_rows(reference, source="figure3b")
    if reference.empty:
        _empty(paper, "no paper reference values")
    else:
        frame = reference.rename(columns={"condition": "mode", "value": "bpc"})
        _length_lines(paper, frame)
        paper.legend(fontsize=8)
        paper.set_xlabel("evaluation sequence length")
        paper.grid(alpha=0.3)
    paper.set_title("the paper (read off its Figure 3b at lengths 100 and 1000)", fontsize=10)
    fig.suptitle("Figure 3b: generalization to longer sequences (PTB test set)")
    meta = scored = ""
    if bpc_length is not None and not bpc_length.empty:
        meta = (f"runs: {', '.join(sorted(set(map(str, bpc_length['run_dir']))))}; a segment of L characters gives "
                "L - 1 predictions; past T_max the population statistics of T_max are reused")
        scored = _scored_characters_note(bpc_length)
    _footer(fig, [scale_label(runs) if runs is not None and not runs.empty else "", meta, scored, *notes])
    return fig


def _scored_characters_note(bpc_length: pd.DataFrame) -> str:
    """What each length scored (the analysis's `characters` column): only full batches of segments are used, so
    unless every length scores the same number of predictions, the lengths are scored on different parts of the
    test split, and a note says so with the counts."""
    if "characters" not in bpc_length:
        return "the number of characters scored at each length is not recorded"
    scored = bpc_length.groupby("length")["characters"].agg(["min", "max"])
    if scored["min"].nunique() == 1 and (scored["min"] == scored["max"]).all():
        return f"every length scores the same {int(scored['min'].iloc[0]):,} predictions"
    counts = ", ".join(f"{int(length)}: {int(row['min']):,}" + (f"–{int(row['max']):,}" if row["max"] != row["min"]
                                                                 else "") for length, row in scored.iterrows())
    return ("not the same text at every length: each length scores only full batches of consecutive segments from "
            "the start of the test split, a prefix of a different size for each length (predictions scored, by "
            f"length: {counts}); a difference between lengths mixes the length with the text left out")


# ------------------------------------------------------------------------------------------------ Figure 5


def figure_5(stats: pd.DataFrame, max_t: int | None = None, meta: dict | None = None,
             runs: pd.DataFrame | None = None) -> Figure:
    """Figure 5: population mean and variance over time for random units of a trained BN-LSTM, for the recurrent
    term, the cell (and the input term when present); the median settling step in each panel (see
    `analysis.settling_step`). `meta` (the analysis JSON) names the run, `runs` (its summary) gives the scale."""
    if stats is None or stats.empty:
        fig = Figure(figsize=(6, 3), layout="constrained")
        _empty(fig.subplots(), "no population statistics (run experiments/fig5_population_statistics.py)")
        return fig
    terms = [t for t in ("recurrent", "cell", "input") if t in set(stats["term"])]
    fig = Figure(figsize=(4.6 * len(terms), 6.5), layout="constrained")
    axes = fig.subplots(2, len(terms), squeeze=False)
    settling = settling_step(stats)
    for column, term in enumerate(terms):
        rows = stats[stats["term"] == term]
        if max_t is not None:
            rows = rows[rows["t"] <= max_t]
        for row, statistic in enumerate(("mean", "var")):
            ax = axes[row, column]
            for _, unit in rows.groupby("unit"):
                ax.plot(unit["t"], unit[statistic], lw=0.8, alpha=0.8)
            found = settling[(settling["term"] == term) & (settling["statistic"] == statistic)]
            if not found.empty:
                step = found["median_settling_step"].iloc[0]
                ax.axvline(step, color="k", ls=":", lw=0.8)
                ax.text(0.98, 0.95, f"median settling step {step:g}\n({int(found['units'].iloc[0])} units)",
                        transform=ax.transAxes, ha="right", va="top", fontsize=7.5)
            ax.set_title(f"{term} term: population {statistic}" if term != "cell" else f"cell: population {statistic}",
                         fontsize=9)
            ax.set_xlabel("t")
            ax.grid(alpha=0.3)
    fig.suptitle("Figure 5: per-timestep population statistics of a trained BN-LSTM (the paper's settle within "
                 "5–10 steps)")
    notes = [scale_label(runs) if runs is not None and not runs.empty else ""]
    if meta:
        notes.append(f"run: {meta.get('run_dir', '?')}; {meta.get('units', '?')} random units per term (seed "
                     f"{meta.get('seed', '?')}); produced by `{meta.get('command', '?')}`")
    _footer(fig, notes)
    return fig


# ----------------------------------------------------------------------------------------- Figure 6, 7, 8


def figure_6(runs: pd.DataFrame) -> Figure:
    """Figure 6: training and validation curves for γ_init ∈ {0.1, 0.3, 0.5, 0.7, 1.0}, one row per task (pMNIST,
    PTB, and any other task the runs hold). PTB in bits per character."""
    runs = runs if runs is not None else pd.DataFrame()
    tasks = _tasks_of(runs, ("pmnist", "ptb")) or ["pmnist", "ptb"]
    fig = Figure(figsize=(12, 3.9 * len(tasks) + 0.8), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    notes = []
    for row, task in enumerate(tasks):
        rows = runs[runs["task"] == task] if not runs.empty else runs
        metric = _metric_of(task)
        colors = _gamma_colors(rows["gamma_init"].tolist()) if not rows.empty else {}
        for column, split in enumerate(("train", "valid")):
            ax = axes[row, column]
            if rows.empty:
                _empty(ax, f"no {task} γ-sweep runs")
            else:
                drawn = _curves(ax, rows, split, metric, lambda r: f"γ_init={r['gamma_init']:g}",
                                lambda r, colors=colors: colors.get(r["gamma_init"], "k"))
                if _divergences(ax, rows, colors) or drawn:
                    ax.legend(fontsize=8)
                ax.set_xlabel("training step")
                ax.set_ylabel(f"{split} {METRIC_LABELS[metric]}")
                ax.grid(alpha=0.3)
            ax.set_title(f"{_task_label(task)}: {split}", fontsize=10)
        if not rows.empty:
            notes.append(_missing(["0.1", "0.3", "0.5", "0.7", "1"],
                                  [f"{g:g}" for g in rows["gamma_init"].dropna().unique()], f"{task} γ values"))
    fig.suptitle("Figure 6: sensitivity to the initial γ (the paper: γ = 1.0 much worse on pMNIST; no effect on PTB)")
    _footer(fig, [scale_label(runs), *notes,
                  "PTB is in bits per character (loss / ln 2). The paper's appendix plotting script divided the step "
                  "axis by ln 2 instead of the loss, so its PTB panel is in nats."])
    return fig


def _divergences(ax: Axes, rows: pd.DataFrame, colors: dict) -> list[str]:
    """A dotted vertical line, in its γ's colour, at the step by which each γ's runs that did not complete had
    stopped (their summaries' `steps`), so that a γ that logged nothing before diverging is still on the plot.
    Returns the labels drawn."""
    if rows.empty or "status" not in rows:
        return []
    runs = rows.drop_duplicates("run_dir")
    stopped = runs[(runs["status"] != "completed") & runs["steps_done"].map(_is_number)]
    labels = []
    for (gamma, status), group in stopped.groupby(["gamma_init", "status"], sort=True):
        of_gamma = runs[np.isclose(runs["gamma_init"].astype(float), gamma)]
        steps = sorted({int(s) for s in group["steps_done"]})
        where = f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"
        logged = rows[rows["run_dir"].isin(group["run_dir"]) & rows["split"].notna()]
        label = (f"γ_init={gamma:g}: {status} by {where} ({len(group)} of {len(of_gamma)} runs"
                 f"{'; nothing logged' if logged.empty else ''})")
        for step in steps:
            ax.axvline(step, color=colors.get(gamma, "k"), ls=":", lw=1.6,
                       label=label if step == steps[0] else None)
        labels.append(label)
    return labels


def _terms_label(row) -> str:
    if row["model"] == "lstm" or row.get("norm_terms") == "none":
        return "LSTM (no normalization)"
    shared = ", statistics shared over time (partly, see below)" if row.get("share_statistics_over_time") else ""
    return f"BN of {row['norm_terms']}{shared}"


# What `model.share_statistics_over_time=true` does in this code (norm.RecurrentBatchNorm.forward and the step-wise
# loops, recurrence.StepNorm / norm.loop_term): the paper's "shared" setting only in part.
SHARED_STATISTICS_NOTE = (
    "\"statistics shared over time\" (model.share_statistics_over_time=true in the run's config.yaml) is shared only "
    "in part: every term keeps one set of population statistics for all timesteps, used in validation and test, but "
    "in training only the input term W_x x is normalized with batch statistics pooled over time; the recurrent and "
    "cell terms use each timestep's own batch statistics, as the unshared BN-LSTM does.")


def figure_7(runs: pd.DataFrame) -> Figure:
    """Figure 7 (ours): per-timestep against shared batch-norm statistics (the paper's claim that sharing "severely
    degrades performance"), and the ablation of each batch-normalized term (input, recurrent, cell). Validation
    metric against the step, one row per task."""
    runs = runs if runs is not None else pd.DataFrame()
    tasks = _tasks_of(runs, ("pmnist", "smnist", "ptb")) or ["pmnist"]
    fig = Figure(figsize=(12.5, 4.2 * len(tasks) + 0.8), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    full = "input+recurrent+cell"
    for row, task in enumerate(tasks):
        rows = runs[runs["task"] == task] if not runs.empty else runs
        metric = _metric_of(task)
        if rows.empty:
            shared_rows = terms_rows = rows
        else:
            baseline = rows["norm_terms"] == "none"
            shared_rows = rows[baseline | ((rows["norm_terms"] == full) & (rows["model"] == "bn_lstm"))]
            terms_rows = rows[baseline | ((rows["model"] == "bn_lstm") & ~rows["share_statistics_over_time"])]
        labels = sorted({_terms_label(r) for _, r in terms_rows.drop_duplicates("run_dir").iterrows()}) \
            if not terms_rows.empty else []
        palette = {label: colormaps["tab10"](i % 10) for i, label in enumerate(labels)}
        for column, (subset, title) in enumerate((
                (shared_rows, "per-timestep (solid) vs shared (dashed) statistics"),
                (terms_rows, "which terms are batch-normalized"))):
            ax = axes[row, column]
            if subset.empty:
                _empty(ax, f"no {task} runs for: {title}")
            else:
                _curves(ax, subset, "valid", metric, _terms_label,
                        lambda r, palette=palette: palette.get(_terms_label(
                            {**r, "share_statistics_over_time": False}), "k"),
                        lambda r: "--" if r["share_statistics_over_time"] else "-")
                _dress(ax, "training step", f"validation {METRIC_LABELS[metric]}", "",
                       legend_loc="below" if column else "best")
            ax.set_title(f"{_task_label(task)}: {title}", fontsize=9.5)
    fig.suptitle("Figure 7 (not in the paper): shared vs per-timestep statistics, and the per-term ablation")
    shared = not runs.empty and bool(runs["share_statistics_over_time"].fillna(False).astype(bool).any())
    _footer(fig, [scale_label(runs), SHARED_STATISTICS_NOTE if shared else ""])
    return fig


TANH_MODELS = ("rnn", "bn_rnn", "bn_linear_rnn", "ln_rnn")
TANH_FLOW_DEFAULTS = {"rnn": None, "bn_rnn": 0.1, "bn_linear_rnn": 0.1, "ln_rnn": 1.0}


def tanh_question_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task and model of the tanh question: runs, best and last validation metric (mean over runs)."""
    rows = []
    if runs is None or runs.empty:
        return pd.DataFrame(columns=["task", "model", "runs", "best_valid", "last_valid"])
    valid = runs[runs["split"] == "valid"]
    for (task, model), group in valid.groupby(["task", "model"], sort=False):
        metric = _metric_of(task)
        best = group.groupby("run_dir")[metric].max() if metric == "acc" else group.groupby("run_dir")[metric].min()
        last = group.sort_values("step").groupby("run_dir")[metric].last()
        rows.append({"task": task, "model": model, "runs": len(best), "best_valid": best.mean(),
                     "last_valid": last.mean()})
    return pd.DataFrame(rows)


def figure_8(runs: pd.DataFrame, flow: pd.DataFrame | None = None, meta: dict | None = None) -> Figure:
    """Figure 8 (ours): the tanh question. Can batch norm after W_x x and W_h h replace tanh and the bias? Left:
    validation curves of rnn, bn_rnn, bn_linear_rnn and ln_rnn per task; right: their gradient flow at
    initialization on sequential MNIST (Figure 1a's analysis, each at its default γ), whole range and after the
    steps at which some image is still all zeros (from `meta`, the analysis JSON)."""
    runs = runs if runs is not None else pd.DataFrame()
    tasks = _tasks_of(runs, ("pmnist", "smnist")) or ["pmnist"]
    fig = Figure(figsize=(5.5 * (len(tasks) + 2), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(tasks) + 2))
    notes = []
    for ax, task in zip(axes[:-2], tasks, strict=True):
        notes.append(_validation_panel(ax, _rows_of(runs, task, TANH_MODELS), _metric_of(task),
                                       f"{_task_label(task)}: validation",
                                       f"no {task} runs of {', '.join(TANH_MODELS)}", expected=TANH_MODELS,
                                       what=f"{task} models"))
    selected = []
    if flow is not None and not flow.empty:
        for model, gamma in TANH_FLOW_DEFAULTS.items():
            rows = flow[flow["variant"] == model]
            if gamma is not None:
                rows = rows[np.isclose(rows["gamma_init"], gamma)]
            if not rows.empty:
                selected.append(rows)
    shown = [rows["model"].iloc[0] for rows in selected]
    every = (meta or {}).get("all_informative_step_0based")
    tail_start = int(every) + 2 if every is not None else None
    flow_task = _task_label((meta or {}).get("task", "smnist"))
    for ax, t_min, title in ((axes[-2], None, f"gradient flow at initialization, {flow_task}, zero h_0"),
                             (axes[-1], tail_start, f"the same, t ≥ {tail_start}")):
        if not selected or (ax is axes[-1] and t_min is None):
            _empty(ax, "no gradient-flow rows for the tanh-question models (run experiments/fig1a_gradient_flow.py)"
                   if not selected else "no analysis metadata (the step by which every image has a pixel)")
            ax.set_title(title, fontsize=10)
            continue
        for rows in selected:
            rows = rows if t_min is None else rows[rows["t"] >= t_min]
            model, gamma = rows["model"].iloc[0], rows["gamma_init"].iloc[0]
            suffix = f" (γ={gamma:g})" if not math.isnan(gamma) else ""
            ax.plot(rows["t"], rows["log10_grad_norm"], color=_color(model), lw=1.2, label=_label(model) + suffix)
        ax.legend(fontsize=8)
        ax.set_xlabel("t")
        ax.set_ylabel("log10 E‖∂loss/∂h_t‖")
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
    if selected:
        notes.append(_missing(TANH_MODELS, shown, "gradient-flow models"))
    table = tanh_question_table(runs)
    facts = "; ".join(f"{r.task} {_label(r.model)}: best valid {r.best_valid:.3f} ({r.runs} run(s))"
                      for r in table.itertuples())
    fig.suptitle("Figure 8 (not in the paper): can batch norm replace tanh and the bias in a plain RNN?")
    _footer(fig, [scale_label(runs), facts, *notes])
    return fig


# ------------------------------------------------------------------------ the paper-scale campaign


PAPER_FIGURES = {"smnist": "figure2", "pmnist": "figure2", "ptb": "figure3a"}  # the figure read off, by task
# The steps the campaign runs to (PTB: 8k, and the paper's LSTM minimum at about 10k): the paper's points beyond
# them are not drawn, so that each panel's axes are those of our runs.
PAPER_HORIZON = {"smnist": 10000, "pmnist": 20000, "ptb": 10000}
CURVE_MODELS = ("lstm", "bn_lstm")


def _campaign_runs(runs: pd.DataFrame, tanh: bool) -> pd.DataFrame:
    """The runs of experiments/paper_curves.py: Figure 2/3a pairs, or the tanh question's (jobs named tanh_*)."""
    if runs is None or runs.empty:
        return pd.DataFrame(columns=["task", "model", "split", "step", "job", "run_dir", "acc", "bpc"])
    is_tanh = runs["job"].astype(str).str.startswith("tanh_")
    return runs[is_tanh] if tanh else runs[~is_tanh & runs["model"].isin(CURVE_MODELS)]


def _paper_points(ax: Axes, reference: pd.DataFrame, metric: str, horizon: int) -> list[str]:
    """The paper's values of this panel's metric read off its figures, as crosses at their steps (one legend entry
    each) up to `horizon`; returns the read-offs that are not such points, as notes (those beyond the horizon
    among them, so that a panel's axes stay those of our runs)."""
    notes = []
    for _, row in reference.iterrows():
        if row.get("metric") != f"valid_{metric}" or not _is_number(row.get("step")):
            notes.append(f"paper {row['name']}: {row['note']}")  # e.g. the LSTM erratic until about 35k steps
        elif float(row["step"]) > horizon:
            qualifier = f" ({row['condition']})" if isinstance(row.get("condition"), str) else ""
            notes.append(f"paper {row['name']} @ {row['step'] / 1000:g}k{qualifier}: {row['value']:g}, beyond the "
                         "steps our runs reached (not drawn)")
        else:
            qualifier = f" ({row['condition']})" if isinstance(row.get("condition"), str) else ""
            ax.plot([row["step"]], [row["value"]], "x", ms=9, mew=2, color=_color(row["model"]),
                    label=f"paper {row['name']} @ {row['step'] / 1000:g}k{qualifier}: {row['value']:g}")
    return notes


def figure_paper_curves(runs: pd.DataFrame, reference: pd.DataFrame | None = None) -> Figure:
    """Our paper-scale curves over the paper's (Figure 2 both panels, Figure 3a): validation accuracy or bpc with
    the statistics the runs validated with (the presets: batch statistics, as the authors' curves), and the
    paper's values read off its figures as crosses."""
    runs = _campaign_runs(runs, tanh=False)
    fig = Figure(figsize=(18, 5.0), layout="constrained")
    axes = fig.subplots(1, len(PAPER_FIGURES))
    notes = []
    for ax, task in zip(axes, PAPER_FIGURES, strict=True):
        rows = runs[runs["task"] == task]
        paper = reference_rows(reference, source=PAPER_FIGURES[task], task=task, model=list(CURVE_MODELS))
        # Up to the steps our runs reached; with no runs yet, up to the steps the campaign runs to (its targets).
        horizon = int(rows["step"].max()) if rows["step"].notna().any() else PAPER_HORIZON[task]
        notes += _paper_points(ax, paper, _metric_of(task), horizon)
        _validation_panel(ax, rows, _metric_of(task), _task_label(task), f"no paper-scale {task} runs yet",
                          keep_ticks=True, label_of=lambda r: f"ours {_label(r['model'])} ({r['job']})",
                          legend_loc="below")
        if not rows.empty:
            notes.append(f"{task}: {_reached(rows)}")
    fig.suptitle("The paper's setup (experiments/paper_curves.py): ours against the paper's Figures 2 and 3a")
    _footer(fig, [*notes, "crosses: the paper's values read off its figures (results/paper_reference.csv), up to "
                        "the steps our runs reached (a panel without runs: up to the campaign's targets, "
                        + ", ".join(f"{t} {h // 1000}k" for t, h in PAPER_HORIZON.items()) + " steps)"])
    return fig


PAPER_POINT_STEPS = {"smnist": (5000, 10000), "pmnist": (10000, 20000), "ptb": (800, 4000, 8000)}


def _against_paper(ours: float, theirs: float, condition) -> tuple[float, str]:
    """(difference, verdict) of our value against the paper's read-off. A read-off that is a bound ("lower bound":
    the paper's curve is above it) has no difference, only whether ours meets it; blank where either is missing."""
    if math.isnan(ours) or math.isnan(theirs):
        return np.nan, ""
    if condition == "lower bound":
        return np.nan, f"{'meets' if ours >= theirs else 'below'} the bound (≥ {theirs:g})"
    if condition == "upper bound":
        return np.nan, f"{'meets' if ours <= theirs else 'above'} the bound (≤ {theirs:g})"
    return ours - theirs, ""  # a value read off a plot: the difference, no verdict (the read-off is approximate)


def paper_points_table(runs: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """At the steps where the paper can be read: our validation value (the validation at that step), the paper's
    read-off where it has one and what kind it is (a value, or a bound), the difference from a value, and against
    a bound whether ours meets it; blank where a run has not got there."""
    runs = _campaign_runs(runs, tanh=False)
    rows = []
    for task, steps in PAPER_POINT_STEPS.items():
        metric = _metric_of(task)
        for model in CURVE_MODELS:
            valid = runs[(runs["task"] == task) & (runs["model"] == model) & (runs["split"] == "valid")]
            for step in steps:
                ours = valid[valid["step"] == step][metric]
                paper = reference_rows(reference, source=PAPER_FIGURES[task], task=task, model=model)
                paper = paper[paper["step"].astype(float) == step] if not paper.empty else paper
                value = float(ours.mean()) if len(ours) else np.nan
                theirs = float(paper["value"].iloc[0]) if len(paper) else np.nan
                condition = paper["condition"].iloc[0] if len(paper) else None
                bound = isinstance(condition, str) and condition.endswith("bound")
                difference, verdict = _against_paper(value, theirs, condition)
                rows.append({"task": task, "model": model, "step": step, "ours_valid": value, "runs": len(ours),
                             "paper": theirs, "paper_is": "" if math.isnan(theirs) else condition if bound else
                             "value", "difference": difference, "against_paper": verdict,
                             "paper_note": paper["note"].iloc[0] if len(paper) else ""})
    return pd.DataFrame(rows)


def figure_tanh_paper(runs: pd.DataFrame, ceiling: dict | None = None,
                      summaries: pd.DataFrame | None = None) -> Figure:
    """The tanh question at the paper's MNIST setup (pMNIST, a true permutation): validation accuracy against
    steps for rnn, bn_rnn, bn_linear_rnn, ln_rnn and bn_linear_rnn2, with the linear classifier of the pixels
    (results/analysis/linear_ceiling.json) on the same validation images as a dashed line. Test accuracies (the
    linear classifier's, which bounds bn_linear_rnn with population statistics, and the finished runs' from
    `summaries`) are in the notes: a test number is not drawn over validation curves."""
    runs = _campaign_runs(runs, tanh=True)
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.subplots()
    notes = []
    if ceiling and "any_true_permutation" in ceiling:
        line = ceiling["any_true_permutation"]
        if "valid_acc" in line:
            ax.axhline(line["valid_acc"], color="k", ls="--", lw=1.1,
                       label=f"linear classifier of the pixels, validation: {line['valid_acc']:.4f}")
        notes.append(
            f"dashed: the linear classifier's validation accuracy on the same 10,000 validation images (its C chosen "
            f"on them). Its test accuracy, {line['test_acc']:.4f}, is the ceiling of bn_linear_rnn's test accuracy "
            "with population statistics; these curves validate with batch statistics (the authors' protocol), which "
            "are not bounded by it.")
    _validation_panel(ax, runs, "acc", "pMNIST (true permutation), the paper's MNIST setup",
                      "no paper-scale tanh-question runs yet", keep_ticks=True, legend_loc="below")
    if summaries is not None and not summaries.empty:
        done = summaries[(summaries["status"] == "completed") & summaries["test_metric"].notna()]
        done = done[done["job"].astype(str).str.startswith("tanh_")]
        notes += [f"test accuracy of {r.job} (best checkpoint): {float(r.test_metric):.4f}"
                  for r in done.itertuples()]
    fig.suptitle("Can batch norm replace tanh? Trained at the paper's setup, against the linear classifier")
    _footer(fig, [_reached(runs) or "no runs", *notes])
    return fig


# --------------------------------------------------------------------------------------------------- tables


PAPER_TABLE_COLUMNS = {"table1": ("smnist", "pmnist"), "table2": ("ptb",), "table3": ("text8",)}
SEGMENT_LENGTHS = {"ptb": 100, "text8": 1000}


def paper_table(summaries: pd.DataFrame, reference: pd.DataFrame | None, table: str) -> pd.DataFrame:
    """Table 1, 2 or 3: the paper's rows and ours side by side.

    Table 1 reports test accuracy in % on sMNIST and pMNIST; Tables 2 and 3 test bits per character (ours: reading
    the whole test split as one sequence, the authors' protocol, and on segments with the state reset). Our rows
    come from `summaries` (`runs.load_summaries`): the mean over the completed runs of each model, their
    number, a note of the runs that did not complete (e.g. "1 diverged"), and the scale.
    """
    tasks = PAPER_TABLE_COLUMNS[table]
    rows = []
    paper = reference_rows(reference, source=table)
    for name, group in paper.groupby("name", sort=False):
        row = {"source": "paper", "model": name}
        for task in tasks:
            values = group[group["task"] == task]["value"]
            row[task] = float(values.iloc[0]) if len(values) else np.nan
        rows.append(row)
    if summaries is not None and not summaries.empty:
        relevant = summaries[summaries["task"].isin(tasks)]
        # Runs of the paper's presets (experiment=paper_*) are a row of their own, never averaged with smaller ones.
        setup = relevant["preset"].map(lambda p: "ours, paper setup" if isinstance(p, str) and p.startswith("paper")
                                       else "ours") if "preset" in relevant else pd.Series("ours", relevant.index)
        for (source, model), group in relevant.groupby([setup, "model"], sort=False):
            done = group[group["status"] == "completed"]
            row = {"source": source, "model": _label(model)}
            for task in tasks:
                of_task = done[done["task"] == task]
                if table == "table1":
                    values = of_task["test_metric"].dropna().astype(float)
                    row[task] = 100 * values.mean() if len(values) else np.nan
                    continue
                # The main number reads the whole test split as one sequence (the authors'); beside it segments
                # of the training length with the state reset (runs made before test_len* existed: test_metric).
                stream = of_task["test_stream_bpc"].dropna().astype(float)
                row[task] = stream.mean() if len(stream) else np.nan
                streams = of_task.loc[of_task["test_stream_bpc"].notna(), "eval_streams"] \
                    if "eval_streams" in of_task else pd.Series(dtype=float)
                row["test protocol"] = "; ".join(
                    "the whole split as one sequence" if int(n) == 1 else
                    f"the split cut into {int(n)} contiguous sequences, each read with the state carried"
                    for n in sorted({n for n in streams if _is_number(n)}))
                length = SEGMENT_LENGTHS[task]
                segments = of_task[f"test_len{length}_bpc"].fillna(
                    of_task["test_metric"].where(of_task["test_protocol"].isna())).dropna().astype(float)
                row[f"{task} (segments of {length})"] = segments.mean() if len(segments) else np.nan
            row["runs"] = len(done)
            unfinished = group[group["status"] != "completed"]
            row["note"] = ", ".join(
                f"{count} not finished (no summary.json: running, or stopped)" if status.startswith("unknown")
                else f"{count} {status}" for status, count in unfinished["status"].astype(str).value_counts().items())
            row["scale"] = scale_label(group)
            rows.append(row)
    columns = ["source", "model", *tasks, *[f"{t} (segments of {SEGMENT_LENGTHS[t]})" for t in tasks
                                             if table != "table1"],
               *(["test protocol"] if table != "table1" else []), "runs", "note", "scale"]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = np.nan if column not in ("source", "model", "test protocol", "note", "scale") else ""
    return frame[columns]


def to_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table (no extra dependency); NaN shows as an empty cell."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}f}".rstrip("0").rstrip(".") if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


OURS_ARE_MEANS = " (ours: mean over the completed runs of each task; `runs` counts them)"
TABLE_TITLES = {
    "table1": "Table 1: test accuracy (%) on sequential and permuted MNIST" + OURS_ARE_MEANS,
    "table2": "Table 2: test bits per character on Penn Treebank; ours: the test split read with the state carried "
              "as the `test protocol` column says (the authors' protocol is the whole split as one sequence; the "
              "CPU-scale runs cut it into 64 contiguous sequences), and segments of 100 with the state reset"
              + OURS_ARE_MEANS,
    "table3": "Table 3: test bits per character on text8; ours: the test split read with the state carried as the "
              "`test protocol` column says (the authors': the whole split as one sequence), and segments of 1000"
              + OURS_ARE_MEANS,
    "paper_points": "The paper's setup at the steps where its figures can be read: our validation value (the "
                    "presets' batch statistics), the paper's read-off and whether it is a value or a bound, our "
                    "difference from a value (accuracy: positive is better; bpc: negative is better) or whether we "
                    "meet a bound (blank: not read off, or not reached yet)",
}


def all_figures(results: Results) -> dict[str, Figure]:
    """Every figure of the paper (and ours) from a results folder, by file name (without .png)."""
    lengths = results.analysis("fig3b_bpc_vs_length")
    population = results.analysis_meta("fig5_population_statistics")
    return {
        "fig1a_gradient_flow": figure_1a(results.analysis("fig1a_gradient_flow"),
                                         meta=results.analysis_meta("fig1a_gradient_flow")),
        "fig1b_tanh_derivative": figure_1b(results.analysis("fig1b_tanh_derivative")),
        "fig2_mnist_accuracy": figure_2(results.runs_of("fig2"), results.reference),
        "fig3a_valid_bpc": figure_3a(results.runs_of("fig3"), results.reference),
        "fig3b_bpc_vs_length": figure_3b(lengths, results.reference, runs_at(results.summaries, lengths)),
        "fig5_population_statistics": figure_5(results.analysis("fig5_population_statistics"), meta=population,
                                               runs=runs_at(results.summaries, population)),
        "fig6_gamma_sensitivity": figure_6(results.runs_of("fig6")),
        "fig7_statistics_and_terms": figure_7(results.runs_of("fig7")),
        "fig8_tanh_question": figure_8(results.runs_of("fig8"), results.analysis("fig1a_gradient_flow"),
                                       results.analysis_meta("fig1a_gradient_flow")),
        "paper_curves": figure_paper_curves(results.runs_of("paper_curves"), results.reference),
        "tanh_question_paper": figure_tanh_paper(results.runs_of("tanh_question"),
                                                 results.analysis_meta("linear_ceiling"),
                                                 results.summaries_of("tanh_question")),
    }


TABLE_SOURCES = {"table1": "fig2", "table2": "fig3", "table3": "table3"}


def all_tables(results: Results) -> dict[str, pd.DataFrame]:
    """Tables 1–3 from the runs of fig2* (MNIST), fig3* (PTB) and table3* (text8), and of paper_curves (the
    paper's setup), and the paper_points table."""
    # The campaign's runs at the paper's setup (runs/paper_curves) give the tables a row of their own.
    campaign = results.summaries_of("paper_curves")
    tables = {name: paper_table(pd.concat([results.summaries_of(prefix), campaign], ignore_index=True),
                                results.reference, name)
              for name, prefix in TABLE_SOURCES.items()}
    tables["paper_points"] = paper_points_table(results.runs_of("paper_curves"), results.reference)
    return tables
