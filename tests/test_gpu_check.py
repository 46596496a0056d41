"""`scripts/gpu_check.py` (`make gpu-check`): its dry run (every step on the CPU under Triton's interpreter, tiny
shapes, fixture data) writes the rows the GPU run would, and the bundled wheels are unpacked onto sys.path."""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fixtures import make_mnist, make_ptb

from recurrent_bn import data

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_gpu_check():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPTS))
    return gpu_check


def test_bundled_wheels_are_unpacked_onto_sys_path_only_when_hydra_is_missing(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    assert gpu_check.use_bundle() is None  # Hydra is installed here: nothing to unpack
    wheel = tmp_path / "bundle" / "fake_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/__init__.py", "VALUE = 42\n")
    monkeypatch.setattr(gpu_check, "BUNDLE", wheel.parent)
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__

    def no_hydra(name, *args, **kwargs):
        if name.split(".")[0] in ("hydra", "omegaconf"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_hydra)
    site = gpu_check.use_bundle()
    monkeypatch.undo()
    try:
        assert site is not None and (Path(site) / "fake_pkg" / "__init__.py").exists()
        assert sys.path[0] == site
    finally:
        sys.path.remove(site)


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_kind_of_row(tmp_path):
    root = tmp_path / "data"
    make_ptb(root)
    make_mnist(root)
    vocabulary = len(data.load_ptb_chars(root, verify=False)[1])
    out = tmp_path / "out"
    ptb = (f"paper_ptb=task.num_classes={vocabulary} task.input_size={vocabulary} task.eval_seq_len=5 "
           "task.eval_batch_size=4 task.eval_streams=2")
    result = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--dry-run", "--out", str(out),
                             "--data-root", str(root), "--minutes", "15", "--extra", ptb],
                            capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with (out / "gpu_check.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    checks = {r["check"] for r in rows}
    assert checks == {"environment", "correctness", "determinism", "cuda_graphs", "timing", "train"}
    correctness = [r for r in rows if r["check"] == "correctness"]
    # 4 variants x train/eval x with/without lengths x fp32/bf16
    assert len(correctness) == 32 and all(r["ok"] == "1" for r in correctness)
    assert all(r["ok"] == "1" for r in rows if r["check"] in ("determinism", "cuda_graphs", "train"))
    timing = [r for r in rows if r["check"] == "timing"]
    assert {r["cuda_graphs"] for r in timing} == {"no", "yes"}
    assert {(r["tf32_cudnn"], r["tf32_matmul"]) for r in timing} == {("0", "0"), ("1", "1")}
    assert {r["dtype"] for r in timing} == {"fp32", "bf16"}
    assert len([r for r in rows if r["check"] == "train"]) == 4
    for name in ("paper_ptb_lstm", "paper_ptb_bn_lstm", "paper_pmnist_lstm", "paper_pmnist_bn_lstm"):
        assert (out / f"{name}_metrics.csv").exists()
