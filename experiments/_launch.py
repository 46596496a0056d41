"""What every launch script shares: the scale (CPU or the paper's), where runs and analyses go, and the trainer call.

Environment:
  RBN_SCALE     cpu (default: the conf/experiment/cpu_* presets, minutes on a laptop CPU) or paper (paper_*).
  RBN_RUNS      where sweeps go (default results/runs); each launch writes <RBN_RUNS>/<experiment>/<job>/.
  RBN_ANALYSIS  where analyses go (default results/analysis).
Command-line arguments after the script name are passed to the trainer as extra Hydra overrides, e.g.
  python experiments/fig2_mnist.py trainer.threads=1 hydra/launcher=parallel
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCALES = ("cpu", "paper")


def scale() -> str:
    value = os.environ.get("RBN_SCALE", "cpu")
    if value not in SCALES:
        raise SystemExit(f"RBN_SCALE={value!r}: use cpu or paper")
    return value


def runs_root() -> Path:
    return Path(os.environ.get("RBN_RUNS", REPO / "results" / "runs")).absolute()


def analysis_root() -> Path:
    return Path(os.environ.get("RBN_ANALYSIS", REPO / "results" / "analysis")).absolute()


def relative(path) -> str:
    """`path` relative to the working directory when it lies below it: provenance that reads the same on any machine."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def preset(task: str) -> str:
    return f"experiment={scale()}_{task}"


def sweep(name: str, overrides: list[str], extra: list[str] | None = None) -> int:
    """Run the trainer's Hydra entry point as a multirun into <RBN_RUNS>/<name>; return its exit code.

    A failing job does not stop the others; the sweep then exits 1 and its sweep.csv lists the failure.
    """
    extra = sys.argv[1:] if extra is None else extra
    command = [sys.executable, "-m", "recurrent_bn.train", "--multirun", *overrides,
               f"hydra.sweep.dir={runs_root() / name}", *extra]
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command, cwd=REPO).returncode


def finish(codes: list[int]) -> None:
    """Exit with 1 if any sweep failed (after all of them ran)."""
    sys.exit(1 if any(codes) else 0)
