"""Hydra entry point: `python -m recurrent_bn.train task=pmnist model=bn_lstm trainer.max_steps=100`.

Mistakes the user can fix (a bad config value, a missing dataset) end the run with one line saying what to do and
exit code 2. In a multirun (`-m`), a failing job records its failure in its own summary.json and the sweep goes on;
the sweep report at the end lists it and the sweep exits with code 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from recurrent_bn.config import CONF_DIR, load_for_resume
from recurrent_bn.errors import UserError
from recurrent_bn.logs import write_json

log = logging.getLogger("recurrent_bn")


def _record_failure(run_dir: Path, status: str, error: str) -> None:
    """Make sure the job's summary says it failed, even when it failed before training started."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        write_json(summary, {"status": status, "error": error, "run_dir": str(run_dir)})


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from recurrent_bn.trainer import train  # after Hydra has set up logging

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        if cfg.resume:
            cfg = load_for_resume(Path(cfg.resume), list(hydra_cfg.overrides.task))
        summary = train(cfg, run_dir)
        return summary.get("best_valid_metric")
    except UserError as error:
        _record_failure(run_dir, "failed", str(error))
        print(f"error: {error}", file=sys.stderr, flush=True)
        if multirun:
            return None
        sys.exit(2)
    except Exception as error:
        _record_failure(run_dir, "failed", f"{type(error).__name__}: {error}")
        if multirun:
            log.exception("job failed: %s", error)
            return None
        raise


if __name__ == "__main__":
    main()
