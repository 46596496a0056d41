"""What a run leaves behind: metrics.csv (appended and flushed as training goes), summary.json, and wandb.

wandb is optional at every point: it is offline unless the user is logged in, it never prompts (online without a key
is offline, with a warning), online asks the server once itself (wandb's own retries wait far longer than
init_timeout on a server that never answers) and goes offline if no answer comes within logger.init_timeout, and
any failure of it turns it off with one warning instead of stopping the run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("recurrent_bn")

COLUMNS = ("step", "split", "loss", "acc", "bpc", "error", "grad_norm", "lr", "elapsed_s", "seq_per_s")


class MetricsCSV:
    """`metrics.csv`: one row per logged event, flushed at every write so a killed run loses nothing written."""

    def __init__(self, path: Path, keep_through_step: int | None = None, drop_splits_starting: str | None = None
                 ) -> None:
        """Open for appending; with `keep_through_step`, first drop rows after that step (a resumed run redoes them)
        and rows whose split starts with `drop_splits_starting` (the test a resumed run repeats at its end)."""
        self.path = path
        rows = []
        if keep_through_step is not None and path.exists():
            with path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= keep_through_step
                        and not (drop_splits_starting and row["split"].startswith(drop_splits_starting))]
        self._rewrite(rows)
        self.handle = path.open("a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=COLUMNS, extrasaction="ignore")

    def _rewrite(self, rows: list[dict]) -> None:
        temporary = self.path.with_suffix(".csv.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.path)

    def write(self, row: dict) -> None:
        self.writer.writerow({key: _format(row.get(key)) for key in COLUMNS})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _format(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e4 or value == 0 else f"{value:.8g}"
    return value


def write_json(path: Path, content: dict) -> None:
    """Write atomically (temporary file, then rename): a reader never sees half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        temporary.write_text(json.dumps(content, indent=2, default=str) + "\n")
    except BaseException:
        if temporary.exists():
            temporary.unlink()
        raise
    os.replace(temporary, path)


def _has_wandb_key() -> bool:
    """Whether wandb has credentials (environment, ~/.netrc, its settings), found without prompting or network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import wandb

        return bool(wandb.login(anonymous="never", prompt=False, verify=False))
    except Exception:  # no key, no terminal, anything else: no key
        return False


def _wandb_mode(requested: str) -> str:
    """online / offline / disabled, decided without prompting: wandb never asks for a key (it would wait forever
    in a terminal), so online without credentials is offline with one warning."""
    mode = requested
    if requested == "auto":
        mode = os.environ.get("WANDB_MODE", "")
        if mode not in ("online", "offline", "disabled"):
            mode = "online" if _has_wandb_key() else "offline"
    if mode == "online" and not _has_wandb_key():
        log.warning("logger.mode=%s but wandb has no API key here (WANDB_API_KEY or `wandb login`): logging offline; "
                    "sync later with `wandb sync <run dir>/wandb/offline-run-*`", requested)
        mode = "offline"
    return mode


def _server_answers(timeout: float) -> str | None:
    """None if the wandb server gives any HTTP answer within `timeout` seconds, else why not. wandb itself retries
    a server that accepts connections but never answers for far longer than its init_timeout (28 s more than
    offline with init 4 s and finish 2 s, measured here), so the run asks once itself before handing over."""
    import urllib.error
    import urllib.request

    import wandb

    url = wandb.setup().settings.base_url  # WANDB_BASE_URL, then wandb's settings files, then its default
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:  # an answer, even 401 or 404: the server is there
        return None
    except (OSError, ValueError) as error:  # refused, unknown host, timed out, a malformed URL
        return f"{url} did not answer within {timeout:g} s ({getattr(error, 'reason', error)})"
    return None


class WandbRun:
    """The run's wandb mirror of metrics.csv and its config; a no-op when disabled or broken."""

    def __init__(self, logger_cfg, config: dict, run_dir: Path, name: str, run_id: str | None = None) -> None:
        self.run = None
        self.mode = _wandb_mode(logger_cfg.mode)
        if self.mode == "disabled":
            return
        try:
            import wandb
        except Exception as error:
            log.warning("wandb is unavailable (%s); metrics go to metrics.csv only", error)
            return
        if self.mode == "online" and (problem := _server_answers(float(logger_cfg.get("init_timeout", 20)))):
            log.warning("wandb: %s; logging offline (sync later with `wandb sync %s/wandb/offline-run-*`)",
                        problem, run_dir)
            self.mode = "offline"
        for mode in (self.mode, "offline") if self.mode == "online" else (self.mode,):
            try:
                self.run = wandb.init(
                    project=logger_cfg.project,
                    entity=logger_cfg.get("entity"),
                    group=logger_cfg.get("group"),
                    tags=list(logger_cfg.get("tags") or []),
                    name=name,
                    id=run_id,
                    resume="allow" if run_id else None,
                    dir=str(run_dir),
                    config=config,
                    mode=mode,
                    # Bounded at both ends: a server that never answers costs init_timeout + finish_timeout.
                    settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout", 20)),
                                            finish_timeout=float(logger_cfg.get("finish_timeout", 10)),
                                            login_timeout=float(logger_cfg.get("init_timeout", 20)), console="off"),
                )
                self.mode = mode
                return
            except Exception as error:
                log.warning("wandb %s init failed (%s)", mode, str(error).splitlines()[0] if str(error) else error)
        log.warning("wandb is off for this run; metrics go to metrics.csv only")

    @property
    def id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        split = row["split"]
        values = {f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split") and v is not None}
        try:
            self.run.log(values, step=int(row["step"]))
        except Exception as error:
            log.warning("wandb log failed (%s); wandb is off for the rest of this run", error)
            self.run = None

    def finish(self, summary: dict, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            for key in ("status", "best_valid_metric", "best_step", "test_metric", "steps"):
                if summary.get(key) is not None:
                    self.run.summary[key] = summary[key]
            self.run.finish(exit_code=exit_code)
        except Exception as error:
            log.warning("wandb finish failed (%s)", error)
        self.run = None
