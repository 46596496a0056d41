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
from omegaconf import DictConfig, OmegaConf

from recurrent_bn.config import CONF_DIR, check_added_keys, check_overrides, load_for_resume
from recurrent_bn.errors import UserError
from recurrent_bn.logs import write_json
from recurrent_bn.run_dir import check_before_hydra, claim, record_resume, record_start

log = logging.getLogger("recurrent_bn")


def _record_failure(run_dir: Path, status: str, error: str) -> None:
    """Make sure the job's summary says it failed, even when it failed before training started."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        write_json(summary, {"status": status, "error": error, "run_dir": str(run_dir)})


def _record(run_dir: Path, cfg: DictConfig, hydra_cfg, resumed: bool) -> None:
    """Hydra's record of the command line, written once when the run starts; a resume appends to resumes.yaml."""
    overrides = list(hydra_cfg.overrides.task)
    if resumed:
        record_resume(run_dir, overrides)
        return
    hydra_node = OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)})
    record_start(run_dir, {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_node),
                           "overrides.yaml": overrides})


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from recurrent_bn.trainer import finished_already, train  # after Hydra has set up logging

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    claimed = False
    try:
        with claim(run_dir):
            claimed = True
            overrides = list(hydra_cfg.overrides.task)
            check_added_keys(cfg, overrides)
            resumed = bool(cfg.resume)
            if resumed:
                cfg = load_for_resume(Path(cfg.resume), overrides)
            if not (resumed and finished_already(run_dir, cfg.trainer.max_steps)):  # train() says it is finished
                _record(run_dir, cfg, hydra_cfg, resumed)
            summary = train(cfg, run_dir)
        return summary.get("best_valid_metric")
    except UserError as error:
        if claimed:  # a run directory that another process holds is left as it is
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


def cli() -> None:
    """Check the run directory and the overrides before Hydra creates or writes anything, then run."""
    problem = check_before_hydra(sys.argv[1:]) or check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
