"""`scripts/bench_gpu.py`: one line without CUDA; on the CPU under Triton's interpreter (`--dry-run`), every row
reaches the CSV as it is measured (an exception later loses nothing), with TF32 recorded for cuDNN and for the
matrix products, and nothing of Hydra imported (a bare GPU image has none)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# Run before the script: Hydra, OmegaConf, antlr4 and wandb cannot be imported, as on a bare GPU image.
NO_HYDRA = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hydra", "omegaconf", "antlr4", "wandb"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Missing())
"""


def run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(SCRIPTS)])}
    return subprocess.run([sys.executable, "-c", NO_HYDRA + code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_bench_gpu_without_cuda_says_so_in_one_line_and_exits_0():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    line = "bench_gpu: no CUDA device here; nothing timed (run it on a GPU machine)"
    assert result.stdout.strip().splitlines() == [line]


def test_rows_measured_before_an_exception_are_in_the_csv_with_tf32_recorded_and_no_hydra(tmp_path):
    out = tmp_path / "bench.csv"
    code = f"""
import bench_gpu
measure = bench_gpu.measure
def failing(*args, **kwargs):
    for k, row in enumerate(measure(*args, **kwargs)):
        yield row
        if k == 2:
            raise RuntimeError("injected failure after three rows")
bench_gpu.measure = failing
bench_gpu.main(bench_gpu.parse_args(["--dry-run", "--quick", "--tf32", "on", "--out", {str(out)!r}]))
"""
    result = run_python(code)
    assert result.returncode != 0 and "injected failure after three rows" in result.stderr, result.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 3
    assert all(r["tf32_cudnn"] == "1" and r["tf32_matmul"] == "1" and float(r["ms"]) > 0 for r in rows)
    assert {r["implementation"] for r in rows} <= {"torch.nn.LSTM (cuDNN)", "lstm triton", "vbn_lstm triton",
                                                   "bn_lstm triton", "ln_lstm triton", "bn_lstm reference"}
    assert "wrote 3 rows" in result.stdout


def test_tf32_is_set_for_cudnn_and_the_matrix_products_together():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(SCRIPTS))
    before = bench_gpu.tf32_state(torch)
    try:
        assert bench_gpu.set_tf32(torch, True) == {"tf32_cudnn": 1, "tf32_matmul": 1}
        assert bench_gpu.set_tf32(torch, False) == {"tf32_cudnn": 0, "tf32_matmul": 0}
    finally:
        torch.backends.cudnn.allow_tf32 = bool(before["tf32_cudnn"])
        torch.backends.cuda.matmul.allow_tf32 = bool(before["tf32_matmul"])


@pytest.mark.slow
def test_bench_gpu_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "bench.csv"
    result = run_python(f"""
import bench_gpu
raise SystemExit(bench_gpu.main(bench_gpu.parse_args(["--dry-run", "--out", {str(out)!r}])))
""")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out)
    # 6 implementations x 2 modes x 2 dtypes x 2 TF32 settings
    assert len(rows) == 48
    assert {(r["tf32_cudnn"], r["tf32_matmul"]) for r in rows} == {("0", "0"), ("1", "1")}
