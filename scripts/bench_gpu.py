"""GPU benchmark of the LSTM layers: cuDNN's torch.nn.LSTM against our Triton path and the reference path.

On a CUDA machine, in one process: Triton's compilation is timed separately (the first call of each model), then
after warm-up, with the implementations interleaved in every repeat, a training step (forward + backward) and an
evaluation forward (no grad) of
  - `torch.nn.LSTM` (cuDNN),
  - recurrent_bn's `lstm`, `vbn_lstm`, `bn_lstm`, `ln_lstm` with backend="triton",
  - `bn_lstm` with backend="reference" (the plain-PyTorch loop, about 81 kernels per timestep), at pMNIST only
    unless `--reference-shapes` says otherwise (it takes seconds per step at the larger shapes),
at the paper's pMNIST (B 100, T 784, H 100), PTB (B 64, T 100, H 1000) and text8 (B 128, T 180, H 2000) shapes, in
float32 and under bf16 autocast, with TF32 off and on (`--tf32`). TF32 is set for both sides at once, cuDNN's
(`torch.backends.cudnn.allow_tf32`, on by default in torch) and the matrix products' (`torch.backends.cuda.matmul.
allow_tf32`, off by default): comparing cuDNN with TF32 against our float32 products is unfair by 2-5x at PTB and
text8. Every row records both settings. Then the trainer's steps per second on experiment=paper_pmnist (bn_lstm, 200
steps) when its data is there and Hydra can be imported (`make gpu-bundle` carries it to a bare machine).

Each row is appended to the CSV (results/bench_gpu.csv, or --out) and flushed as soon as it is measured, so that an
exception later in the run loses nothing. Timings use CUDA events around each call after a synchronize.
CUBLAS_WORKSPACE_CONFIG=:4096:8 is set (before CUDA starts) so that cuBLAS picks deterministic reductions, as a
deterministic training run would; pass --no-deterministic to time without it.

Without CUDA it prints one line and exits 0; `--dry-run` runs every step on the CPU under Triton's interpreter at a
tiny shape instead (for the tests: the numbers mean nothing). `scripts/gpu_check.py` uses these functions.

    python scripts/bench_gpu.py [--quick] [--shapes pmnist,ptb,text8] [--repeats 5] [--tf32 off,on] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "results" / "bench_gpu.csv"

SHAPES = {
    "pmnist": {"steps": 784, "input": 1, "hidden": 100, "batch": 100},
    "ptb": {"steps": 100, "input": 50, "hidden": 1000, "batch": 64},
    "text8": {"steps": 180, "input": 27, "hidden": 2000, "batch": 128},
}
# --dry-run: every step of the benchmark at a shape the interpreter runs in seconds.
TINY = {"tiny": {"steps": 3, "input": 2, "hidden": 4, "batch": 3}}
OURS = {"lstm": "none", "vbn_lstm": "vbn", "bn_lstm": "bn", "ln_lstm": "ln"}
CUDNN = "torch.nn.LSTM (cuDNN)"
REFERENCE = "bn_lstm reference"
# One header for every row the benchmark and gpu_check.py write: a row leaves the fields it has no value for empty.
FIELDS = [
    "time_utc", "check", "gpu", "torch", "triton", "shape", "steps", "input", "hidden", "batch", "dtype",
    "tf32_cudnn", "tf32_matmul", "mode", "implementation", "cuda_graphs", "ms", "ms_min", "first_call_ms", "repeats",
    "x_cudnn", "value", "limit", "ok", "note",
]


class CsvRows:
    """A CSV file written one row at a time: the header at once, each row flushed as it is written."""

    def __init__(self, path: Path, fields: list[str] = FIELDS) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=fields, restval="")
        self._writer.writeheader()
        self._handle.flush()
        self.count = 0

    def write(self, row: dict) -> dict:
        """Append `row` (stamped with the UTC time) and flush it to disk; returns it."""
        row = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
        self._writer.writerow(row)
        self._handle.flush()
        os.fsync(self._handle.fileno())  # a machine taken back mid-run keeps what was measured
        self.count += 1
        return row

    def close(self) -> None:
        self._handle.close()


def set_tf32(torch, on: bool) -> dict:
    """Set TF32 for cuDNN and for the matrix products (cuBLAS) at once; returns both settings as the rows record
    them. The legacy flags: the same names on torch 2.11 and 2.14."""
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    return tf32_state(torch)


def tf32_state(torch) -> dict:
    """The TF32 settings now in force, as CSV fields."""
    return {"tf32_cudnn": int(torch.backends.cudnn.allow_tf32),
            "tf32_matmul": int(torch.backends.cuda.matmul.allow_tf32)}


def environment(torch, device: str) -> dict:
    """GPU name (or "cpu"), torch and triton versions, as CSV fields."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version}


def models(shape: dict, torch, nn, rb, device: str, reference: bool) -> dict:
    size = (shape["input"], shape["hidden"])
    built = {CUDNN: nn.LSTM(*size)}
    for name, norm in OURS.items():
        built[f"{name} triton"] = rb.LSTM(*size, norm=norm, max_length=shape["steps"], backend="triton")
    if reference:
        built[REFERENCE] = rb.LSTM(*size, norm="bn", max_length=shape["steps"], backend="reference")
    return {name: model.to(device) for name, model in built.items()}


def make_step(torch, model, x, mode: str, dtype: str) -> Callable[[], None]:
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def train():
        model.train()
        with autocast:
            y, _ = model(x)
        y.float().square().mean().backward()

    def evaluate():
        model.eval()
        with torch.no_grad(), autocast:
            model(x)

    return train if mode == "train" else evaluate


def timed(torch, step: Callable[[], None]) -> float:
    """Milliseconds of one call of `step`: CUDA events on a GPU, the wall clock on the CPU (dry runs)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1000
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def measure(torch, rb, shape_name: str, shape: dict, dtypes, tf32_settings, repeats: int, device: str,
            reference: bool, steps_for: Callable | None = None) -> Iterator[dict]:
    """Rows of one shape, yielded as each (dtype, TF32) block is measured: per implementation and mode, the median
    and minimum ms per call, the first call's ms (Triton's compilation) and the ratio to cuDNN.

    `steps_for(name, model, x, mode, dtype)` may return extra (name suffix, cuda_graphs, step) triples to time
    beside the eager step (gpu_check.py's CUDA-graph steps)."""
    from torch import nn

    torch.manual_seed(0)
    built = models(shape, torch, nn, rb, device, reference)
    x = torch.randn(shape["steps"], shape["batch"], shape["input"], device=device)
    for tf32 in tf32_settings:
        settings = set_tf32(torch, tf32)
        for dtype in dtypes:
            steps = {}
            for name, model in built.items():
                for mode in ("train", "eval"):
                    steps[(name, mode, "no")] = make_step(torch, model, x, mode, dtype)
                    for suffix, graphs, step in (steps_for(name, model, x, mode, dtype) if steps_for else ()):
                        steps[(name + suffix, mode, graphs)] = step
            first = {key: timed(torch, step) for key, step in steps.items()}  # includes Triton's compilation
            for step in steps.values():
                step()  # warm-up
            times: dict = {key: [] for key in steps}
            for _ in range(repeats):
                for key, step in steps.items():
                    times[key].append(timed(torch, step))
            cudnn = {mode: statistics.median(times[(CUDNN, mode, "no")]) for mode in ("train", "eval")}
            for (name, mode, graphs), values in times.items():
                ms = statistics.median(values)
                yield {
                    "shape": shape_name, **shape, "dtype": dtype, **settings, "mode": mode, "implementation": name,
                    "cuda_graphs": graphs, "ms": round(ms, 3), "ms_min": round(min(values), 3),
                    "first_call_ms": round(first[(name, mode, graphs)], 1), "repeats": repeats,
                    "x_cudnn": round(ms / cudnn[mode], 3),
                }
    del built
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def trainer_rate(torch, steps: int) -> dict | None:
    """The trainer's sequences per second on experiment=paper_pmnist with bn_lstm on the GPU, or None (no data, or no
    Hydra: a bare GPU image has none; `make gpu-bundle` carries it)."""
    try:
        from hydra import compose, initialize_config_dir
    except ImportError as error:
        print(f"trainer: skipped, Hydra cannot be imported ({error}); `make gpu-bundle` carries it")
        return None
    from recurrent_bn.config import CONF_DIR
    from recurrent_bn.errors import DataNotFoundError
    from recurrent_bn.trainer import train

    window = max(steps // 4, 1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=paper_pmnist", "model=bn_lstm", "trainer.device=cuda", f"trainer.max_steps={steps}",
            f"trainer.log_every={window}", f"trainer.eval_every={steps * 10}",
            f"trainer.checkpoint_every={steps * 10}", "trainer.final_test=false", "trainer.eval_batches=1",
            "logger=csv",
        ])
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            train(cfg, Path(run_dir))
        except DataNotFoundError as error:
            print(f"trainer: skipped, {error}")
            return None
        with open(Path(run_dir) / "metrics.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    rates = sorted(float(r["seq_per_s"]) for r in rows[1:] or rows)  # the first window includes warm-up
    rate = rates[len(rates) // 2]
    return {"seq_per_s": rate, "steps_per_s": rate / cfg.task.batch_size, "backend": cfg.model.backend}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reference-shapes", default="pmnist", help="shapes that also time the reference loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tf32", default="off,on", help="off, on, or off,on (both, for cuDNN and ours at once)")
    parser.add_argument("--quick", action="store_true", help="2 repeats, float32 only, no trainer run")
    parser.add_argument("--trainer-steps", type=int, default=200)
    parser.add_argument("--no-deterministic", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton's interpreter, a tiny shape: checks the script, times nothing real")
    return parser.parse_args(argv)


def main(args) -> int:
    if not args.no_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before recurrent_bn defines the kernels
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing timed (run it on a GPU machine)")
        return 0
    import recurrent_bn as rb

    device = "cpu" if args.dry_run else "cuda"
    shapes = TINY if args.dry_run else {name: SHAPES[name] for name in args.shapes.split(",")}
    reference_shapes = set(shapes) if args.dry_run else set(args.reference_shapes.split(","))
    repeats = 1 if args.dry_run else 2 if args.quick else args.repeats
    dtypes = ("fp32",) if args.quick else ("fp32", "bf16")
    tf32_settings = [{"off": False, "on": True}[s] for s in args.tf32.split(",")]
    env = environment(torch, device)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
          f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}; cuda_graphs: see gpu_check.py")
    rows = CsvRows(args.out)
    began = time.perf_counter()
    try:
        for shape_name, shape in shapes.items():
            for row in measure(torch, rb, shape_name, shape, dtypes, tf32_settings, repeats, device,
                               reference=shape_name in reference_shapes):
                rows.write({**env, **row})
                print(f"{shape_name:6} {row['dtype']} tf32 {row['tf32_matmul']} {row['mode']:5} "
                      f"{row['implementation']:24} {row['ms']:9.2f} ms  x{row['x_cudnn']:6.2f} cuDNN  "
                      f"(first call {row['first_call_ms']:.0f} ms)", flush=True)
        if not args.quick and not args.dry_run:
            set_tf32(torch, False)
            result = trainer_rate(torch, args.trainer_steps)
            if result is not None:
                print(f"trainer paper_pmnist bn_lstm (backend {result['backend']}): "
                      f"{result['steps_per_s']:.2f} steps/s")
                rows.write({**env, "shape": "paper_pmnist trainer", "implementation": "trainer bn_lstm",
                            "mode": "train", "dtype": "fp32", **tf32_state(torch), "cuda_graphs": "no",
                            "ms": round(1000 / result["steps_per_s"], 3), "repeats": args.trainer_steps})
    finally:
        rows.close()
        print(f"wrote {rows.count} rows to {args.out} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
