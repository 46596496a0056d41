"""The end of a multirun: one table of its jobs (overrides, best validation metric, test metric, status)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("recurrent_bn")


def sweep_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per job directory of a sweep, from its .hydra/overrides.yaml and summary.json."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
                          key=lambda p: (len(p.name), p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        rows.append({
            "job": job_dir.name,
            "overrides": " ".join(overrides or []),
            "metric": summary.get("metric"),
            "best_valid": summary.get("best_valid_metric"),
            "best_step": summary.get("best_step"),
            "test": summary.get("test_metric"),
            "status": summary.get("status", "failed (no summary.json)"),
            "error": summary.get("error"),
        })
    return pd.DataFrame(rows)


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, print the table, write it as sweep.csv, and exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = sweep_table(sweep_dir)
        table.to_csv(sweep_dir / "sweep.csv", index=False)
        shown = table.drop(columns=["error"])
        print(f"\nSweep {sweep_dir} ({len(table)} jobs):\n{shown.to_string(index=False)}\n", flush=True)
        failed = table[table["status"] != "completed"]
        if len(failed):
            for _, row in failed.iterrows():
                log.error("job %s (%s): %s%s", row["job"], row["overrides"], row["status"],
                          f": {row['error']}" if row["error"] else "")
            raise SystemExit(1)
