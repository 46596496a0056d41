"""Provenance of the computed analyses: what produced a file in results/analysis (the command, the machine,
versions, the commit, the time), written as a JSON beside its CSV."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from recurrent_bn.config import CONF_DIR

if TYPE_CHECKING:  # the trainer imports this module: pandas is not loaded for it
    import pandas as pd


def git_commit(repository: Path = CONF_DIR.parent) -> str | None:
    """The repository's HEAD commit, with "-dirty" when tracked files outside results/ changed; None outside a git
    checkout. Records under results/ are what runs write (a campaign's collect writes them while it runs), not code."""
    try:
        commit = subprocess.run(["git", "-C", str(repository), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repository), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)results"], capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return None


def provenance(command: Sequence[str] | str | None = None, **extra) -> dict:
    """What produced an analysis file: the command, the machine, versions, the commit and the time."""
    if command is None:
        command = ["python", *sys.argv]
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "command": command if isinstance(command, str) else " ".join(str(part) for part in command),
        "machine": f"{socket.gethostname()}: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **extra,
    }


def write_analysis(frame: pd.DataFrame, path: Path, meta: dict, float_format: str = "%.7g") -> Path:
    """Write `frame` as CSV (7 significant digits) and `meta` (see `provenance`) as the sibling JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format=float_format)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path
