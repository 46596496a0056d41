"""Reading stored results: find the run directories under a folder, read what each says about itself (config.yaml,
summary.json, .hydra/overrides.yaml, metrics.csv) into pandas frames, rebuild a run's trained model, and read a
results folder (`Results`: its runs, the computed analyses and the paper's reference values).

The figures group and label runs by these frames; the analyses of trained models (`analysis.py`) load their
models here. Nothing here computes or draws.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from recurrent_bn.config import CONF_DIR
from recurrent_bn.models import build_model, drop_stale_keys

log = logging.getLogger("recurrent_bn")

RUN_FILES = ("summary.json", "metrics.csv")
ATTRIBUTES = (
    "experiment", "job", "run_dir", "task", "model", "cell", "norm", "gamma_init", "norm_terms",
    "share_statistics_over_time", "norm_placement", "nonlinearity", "init_state_noise", "recurrent_init",
    "hidden_size", "max_steps", "batch_size", "seq_len", "eval_streams", "permutation", "optimizer", "lr", "seed",
    "preset", "status",
    "metric", "steps_done", "device",
)
RESULTS_ENV = "RBN_RESULTS"
REFERENCE_COLUMNS = ("source", "task", "model", "name", "metric", "value", "step", "length", "condition", "note")
METRIC_COLUMNS = ("step", "split", "loss", "acc", "bpc", "grad_norm", "lr_now", "elapsed_s", "seq_per_s")


@dataclass
class RunInfo:
    """What one run directory says about itself (from summary.json, config.yaml and .hydra/overrides.yaml)."""

    run_dir: Path
    attributes: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` (or `root` itself) holding a run's summary.json or metrics.csv, except those inside
    another run's directory (the campaign's `restart/` copy of a run started again is the same run)."""
    root = Path(root)
    if not root.exists():
        return []
    found = {p.parent for name in RUN_FILES for p in root.rglob(name) if "wandb" not in p.parts[len(root.parts):]}
    found = {p for p in found if not any(parent in found for parent in p.parents)}
    return sorted(found, key=lambda p: [(len(part), part) for part in p.parts])


def load_run_config(run_dir: Path) -> DictConfig:
    """A run's resolved config: `config.yaml`, else the copy inside `summary.json`; an RNN config saved before the
    contract without the LSTM-only keys it never used (`models.drop_stale_keys`), so that `build_model` takes it."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        cfg = OmegaConf.load(run_dir / "config.yaml")
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        if not summary.get("config"):
            raise FileNotFoundError(f"{run_dir} has neither config.yaml nor a config in summary.json")
        cfg = OmegaConf.create(summary["config"])
    if "model" in cfg:
        cfg.model = drop_stale_keys(cfg.model)
    return cfg


def effective_norm_terms(model_cfg) -> str:
    """Which terms a model normalizes, resolving the config's null to the variant's own choice: e.g.
    "input+recurrent+cell" for bn_lstm, "input" for vbn_lstm, "sum" for bn_rnn, "none" without normalization."""
    norm = model_cfg.get("norm", "none")
    if norm == "none":
        return "none"
    terms = model_cfg.get("norm_terms")
    if model_cfg.get("cell") == "rnn":
        if model_cfg.get("norm_placement", "sum") == "sum":
            return "sum"
        return "+".join(terms) if terms else "input+recurrent"
    if norm == "vbn" and not terms:
        return "input"
    return "+".join(terms) if terms else "input+recurrent+cell"


def _preset(run_dir: Path) -> str | None:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    for override in yaml.safe_load(overrides.read_text()) or []:
        if override.startswith("experiment="):
            return override.split("=", 1)[1]
    return None


def run_info(run_dir: Path) -> RunInfo:
    """The attributes of a run that the figures group and label by, taken from the run's own files."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    try:
        cfg = OmegaConf.to_container(load_run_config(run_dir), resolve=False)
    except (FileNotFoundError, json.JSONDecodeError):
        cfg = {}
    model = cfg.get("model", {}) or {}
    task = cfg.get("task", {}) or {}
    trainer = cfg.get("trainer", {}) or {}
    optim = cfg.get("optim", {}) or {}
    normalized = model.get("norm", "none") != "none"
    attributes = {
        "experiment": run_dir.parent.name, "job": run_dir.name, "run_dir": str(run_dir),
        "task": task.get("name", summary.get("task")), "model": model.get("name", summary.get("model")),
        "cell": model.get("cell"), "norm": model.get("norm"),
        "gamma_init": float(model["gamma_init"]) if normalized and model.get("gamma_init") is not None else np.nan,
        "norm_terms": effective_norm_terms(model) if model else None,
        "share_statistics_over_time": bool(model.get("share_statistics_over_time", False)),
        "norm_placement": model.get("norm_placement") if model.get("cell") == "rnn" else None,
        "nonlinearity": model.get("nonlinearity") if model.get("cell") == "rnn" else None,
        "init_state_noise": model.get("init_state_noise"), "recurrent_init": model.get("recurrent_init"),
        "hidden_size": model.get("hidden_size"), "max_steps": trainer.get("max_steps"),
        "batch_size": task.get("batch_size"), "seq_len": task.get("seq_len"),
        "eval_streams": task.get("eval_streams"),  # language models: the test split read as this many sequences
        "permutation": task.get("permutation"),
        "optimizer": optim.get("name"), "lr": optim.get("lr"), "seed": cfg.get("seed"), "preset": _preset(run_dir),
        "status": summary.get("status", "unknown (no summary.json)"), "metric": summary.get("metric"),
        "steps_done": summary.get("steps"), "device": summary.get("device"),
    }
    return RunInfo(run_dir, attributes, summary)


def load_runs(root: Path) -> pd.DataFrame:
    """Every metrics row of every run under `root`, with the run's attributes on each row.

    `root` may be the runs folder (results/runs), one sweep directory or one run directory. Attributes come from
    each run's own config and summary, never from directory names, except `experiment` (the name of the directory
    holding the run, i.e. the sweep) and `job`. Columns: the attributes of `run_info` and metrics.csv's step,
    split, loss, acc, bpc, grad_norm, lr_now (the logged learning rate), elapsed_s, seq_per_s. A run without
    metrics rows (it failed before logging) appears once, with no split. Empty (with those columns) when there are
    no runs.
    """
    frames = []
    for run_dir in find_run_dirs(root):
        info = run_info(run_dir)
        metrics_path = run_dir / "metrics.csv"
        metrics = pd.read_csv(metrics_path) if metrics_path.is_file() else pd.DataFrame()
        metrics = metrics.rename(columns={"lr": "lr_now"})
        if metrics.empty:
            # A run that failed before logging still gets one row (no split, no metrics), so that the figures can
            # say it exists and how it ended.
            metrics = pd.DataFrame({"step": [np.nan], "split": [None]})
        for key, value in info.attributes.items():
            metrics[key] = value
        frames.append(metrics)
    columns = [*ATTRIBUTES, *METRIC_COLUMNS]
    if not frames:
        return pd.DataFrame(columns=columns)
    frame = pd.concat(frames, ignore_index=True)
    return frame[[c for c in columns if c in frame.columns] + [c for c in frame.columns if c not in columns]]


def load_summaries(root: Path) -> pd.DataFrame:
    """One row per run under `root`: the attributes of `run_info` and the summary's results (best_valid_metric,
    best_step, test_metric, test_loss, test_stream_bpc, test_len100_bpc, test_len1000_bpc, test_protocol,
    wall_time_s, error)."""
    rows = []
    for run_dir in find_run_dirs(root):
        info = run_info(run_dir)
        row = dict(info.attributes)
        for key in ("best_valid_metric", "best_step", "test_metric", "test_loss", "test_stream_bpc",
                    "test_len100_bpc", "test_len1000_bpc", "test_protocol", "wall_time_s", "error"):
            row[key] = info.summary.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def select(frame: pd.DataFrame, experiment_prefix: str) -> pd.DataFrame:
    """Rows whose experiment (sweep directory name) starts with `experiment_prefix`, e.g. "fig2"."""
    if frame.empty or "experiment" not in frame:
        return frame
    return frame[frame["experiment"].astype(str).str.startswith(experiment_prefix)]


def checkpoint_file(path: Path) -> Path:
    """`path` if the checkpoint exists, else a FileNotFoundError that says why it may be missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has not finished its final test, or its checkpoints "
                                "were not kept (*.pt files are not in git): rerun the experiment that made it")
    return path


def load_trained_model(run_dir: Path, checkpoint: str = "final.pt", device: str = "cpu") -> tuple[nn.Module,
                                                                                                  DictConfig]:
    """The model of a run with the weights of `checkpoint` (final.pt: best weights, population statistics
    re-estimated over the training set), in evaluation mode, and the run's config."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    path = checkpoint_file(run_dir / checkpoint)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return model.to(device).eval(), cfg


def reference_rows(reference: pd.DataFrame | None, **where) -> pd.DataFrame:
    """The rows of the paper's reference values (results/paper_reference.csv) whose columns take the given values
    (a value or a list of them), e.g. `source="table2", task="ptb"`; empty, with its columns, without a reference."""
    if reference is None or reference.empty:
        return pd.DataFrame(columns=list(REFERENCE_COLUMNS))
    mask = np.ones(len(reference), dtype=bool)
    for key, value in where.items():
        values = value if isinstance(value, list | tuple | set) else [value]
        mask &= reference[key].isin(values).to_numpy()
    return reference[mask]


def results_root(path=None) -> Path:
    """The results folder: `path`, else $RBN_RESULTS, else the repository's results/."""
    if path is not None:
        return Path(path)
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return CONF_DIR.parent / "results"


class Results:
    """A results folder (see the README's layout): runs/, analysis/, paper_reference.csv, figures/."""

    def __init__(self, root=None) -> None:
        self.root = results_root(root)

    @cached_property
    def runs(self) -> pd.DataFrame:
        return load_runs(self.root / "runs")

    @cached_property
    def summaries(self) -> pd.DataFrame:
        return load_summaries(self.root / "runs")

    @cached_property
    def reference(self) -> pd.DataFrame:
        path = self.root / "paper_reference.csv"
        if not path.is_file():
            log.warning("no %s: figures are drawn without the paper's values", path)
            return reference_rows(None)
        return pd.read_csv(path)

    def runs_of(self, prefix: str) -> pd.DataFrame:
        """Metrics rows of the runs whose sweep directory name starts with `prefix` (e.g. "fig2")."""
        return select(self.runs, prefix)

    def summaries_of(self, prefix: str) -> pd.DataFrame:
        return select(self.summaries, prefix)

    def analysis(self, name: str) -> pd.DataFrame:
        """results/analysis/<name>.csv, or an empty frame (with a log line) when it has not been computed."""
        path = self.root / "analysis" / f"{name}.csv"
        if not path.is_file():
            log.warning("no %s", path)
            return pd.DataFrame()
        return pd.read_csv(path)

    def analysis_meta(self, name: str) -> dict:
        path = self.root / "analysis" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def runs_at(summaries: pd.DataFrame, source) -> pd.DataFrame:
    """The summaries of the runs an analysis was computed from (its frame's run_dir column, or its JSON's)."""
    if isinstance(source, pd.DataFrame):
        run_dirs = set(source["run_dir"].astype(str)) if "run_dir" in source else set()
    else:
        run_dirs = {str(source["run_dir"])} if source and source.get("run_dir") else set()
    if summaries.empty or not run_dirs:
        return pd.DataFrame()
    # An analysis records its run relative to where it ran (results/runs/...) or as an absolute path in the checkout
    # it ran in, the summaries hold absolute paths in this one: the same run when one path ends with the other, or
    # when both name the same run under a `runs` folder.
    wanted = [Path(p).parts for p in run_dirs]

    def under_runs(parts: tuple[str, ...]) -> tuple[str, ...] | None:
        return parts[len(parts) - parts[::-1].index("runs"):] if "runs" in parts else None

    def recorded(run_dir: str) -> bool:
        parts = Path(run_dir).parts
        return any(parts[-len(w):] == w or w[-len(parts):] == parts
                   or (under_runs(parts) is not None and under_runs(parts) == under_runs(w)) for w in wanted)

    return summaries[[recorded(p) for p in summaries["run_dir"]]]
