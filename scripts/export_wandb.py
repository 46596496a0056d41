"""Pull the runs of a wandb project into the results layout, so that `load_runs` and the figures read them.

    python scripts/export_wandb.py ENTITY/PROJECT --out results/runs/fig2_pmnist_wandb [--state finished]

Each run becomes <out>/<run id>/ with metrics.csv (every history row, through `scan_history()`: `history()` is
down-sampled to 500 points), summary.json and config.yaml, as the trainer writes them. Name --out after the figure
the runs belong to (fig2_*, fig3_*, fig6_*, ...), since figures select runs by the name of their sweep directory.
Needs network access and a wandb login (WANDB_API_KEY); it cannot be exercised offline, but `run_to_files`, which
does the conversion, is tested with a stand-in run object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

COLUMNS = ("step", "split", "loss", "acc", "bpc", "grad_norm", "lr", "elapsed_s", "seq_per_s")
STATES = {"finished": "completed", "crashed": "failed", "failed": "failed", "killed": "interrupted",
          "running": "running"}


def history_to_metrics(rows: Iterable[dict]) -> pd.DataFrame:
    """wandb history rows ({"_step": 50, "train/loss": ..., "valid/acc": ...}) → metrics.csv rows, one per split."""
    records = []
    for row in rows:
        by_split: dict[str, dict] = {}
        for key, value in row.items():
            if key.startswith("_") or "/" not in key or value is None:
                continue
            split, metric = key.split("/", 1)
            if metric in COLUMNS:
                by_split.setdefault(split, {})[metric] = value
        for split, values in by_split.items():
            records.append({"step": int(row["_step"]), "split": split, **values})
    frame = pd.DataFrame(records, columns=list(COLUMNS))
    order = {"train": 0, "valid": 1, "test": 2, "test_stream": 3}
    return frame.sort_values(["step", "split"], key=lambda c: c.map(order).fillna(9) if c.name == "split" else c,
                             kind="stable").reset_index(drop=True)


def run_to_files(run, out_dir: Path) -> Path:
    """Write one wandb run (a `wandb.apis.public.Run`, or anything with id, name, state, config, summary,
    scan_history() and url) as <out_dir>/<run.id>/{metrics.csv, summary.json, config.yaml}; return that folder."""
    run_dir = Path(out_dir) / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    metrics = history_to_metrics(run.scan_history())
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    summary_values = dict(run.summary)
    summary = {
        "status": summary_values.get("status") or STATES.get(run.state, run.state),
        "task": (config.get("task") or {}).get("name"),
        "model": (config.get("model") or {}).get("name"),
        "metric": "bpc" if (config.get("task") or {}).get("kind") == "language_model" else "acc",
        **{key: summary_values.get(key) for key in ("best_valid_metric", "best_step", "test_metric", "steps")},
        "run_dir": str(run_dir),
        "config": config,
        "wandb": {"id": run.id, "name": run.name, "state": run.state, "url": getattr(run, "url", None)},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", help="ENTITY/PROJECT")
    parser.add_argument("--out", required=True, help="the sweep-like folder to fill, e.g. results/runs/fig2_wandb")
    parser.add_argument("--state", default=None, help="only runs in this state (finished, crashed, running...)")
    args = parser.parse_args(argv)
    import wandb

    filters = {"state": args.state} if args.state else None
    runs = wandb.Api(timeout=60).runs(args.project, filters=filters)
    written = [run_to_files(run, Path(args.out)) for run in runs]
    print(f"wrote {len(written)} runs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
