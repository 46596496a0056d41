"""`make bench-gpu` on a machine without CUDA: one line, exit 0, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_bench_gpu_without_cuda_says_so_in_one_line_and_exits_0():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    line = "bench_gpu: no CUDA device here; nothing timed (run it on a GPU machine)"
    assert result.stdout.strip().splitlines() == [line]
