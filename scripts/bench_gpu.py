"""GPU benchmark of the LSTM layers: cuDNN's torch.nn.LSTM against our Triton path and the reference path.

On a CUDA machine, in one process: Triton's compilation is timed separately (the first call of each model), then
after warm-up, with the implementations interleaved in every repeat, a training step (forward + backward) and an
evaluation forward (no grad) of
  - `torch.nn.LSTM` (cuDNN),
  - recurrent_bn's `lstm`, `vbn_lstm`, `bn_lstm`, `ln_lstm` with backend="triton",
  - `bn_lstm` with backend="reference" (the plain-PyTorch loop, about 81 kernels per timestep),
at the paper's pMNIST (B 100, T 784, H 100), PTB (B 64, T 100, H 1000) and text8 (B 128, T 180, H 2000) shapes, in
float32 and under bf16 autocast. Then the trainer's steps per second on experiment=paper_pmnist (bn_lstm, 200 steps)
when its data is there. It prints ms per step (median), the ratio to cuDNN and to the reference bn_lstm, and writes
results/bench_gpu.csv with the GPU's name. CUDA graphs are not implemented yet: every row says cuda_graphs=no.

Timings use CUDA events around each call after a synchronize. CUBLAS_WORKSPACE_CONFIG=:4096:8 is set (before CUDA
starts) so that cuBLAS picks deterministic reductions, as a deterministic training run would; pass
--no-deterministic to time without it.

Without CUDA it prints one line and exits 0.

    python scripts/bench_gpu.py [--quick] [--shapes pmnist,ptb,text8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "results" / "bench_gpu.csv"

SHAPES = {
    "pmnist": {"steps": 784, "input": 1, "hidden": 100, "batch": 100},
    "ptb": {"steps": 100, "input": 50, "hidden": 1000, "batch": 64},
    "text8": {"steps": 180, "input": 27, "hidden": 2000, "batch": 128},
}
OURS = {"lstm": "none", "vbn_lstm": "vbn", "bn_lstm": "bn", "ln_lstm": "ln"}
CUDNN = "torch.nn.LSTM (cuDNN)"
REFERENCE = "bn_lstm reference"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, float32 only, no trainer run")
    parser.add_argument("--trainer-steps", type=int, default=200)
    parser.add_argument("--no-deterministic", action="store_true")
    return parser.parse_args(argv)


def models(shape: dict, torch, nn, rb) -> dict:
    size = (shape["input"], shape["hidden"])
    built = {CUDNN: nn.LSTM(*size)}
    for name, norm in OURS.items():
        built[f"{name} triton"] = rb.LSTM(*size, norm=norm, max_length=shape["steps"], backend="triton")
    built[REFERENCE] = rb.LSTM(*size, norm="bn", max_length=shape["steps"], backend="reference")
    return {name: model.cuda() for name, model in built.items()}


def make_step(torch, model, x, mode: str, dtype):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")

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


def timed(torch, step) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def trainer_rate(torch, steps: int) -> dict | None:
    """The trainer's sequences per second on experiment=paper_pmnist with bn_lstm on the GPU, or None."""
    from hydra import compose, initialize_config_dir

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


def main(args) -> int:
    if not args.no_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    from torch import nn

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing timed (run it on a GPU machine)")
        return 0
    import recurrent_bn as rb

    gpu = torch.cuda.get_device_name()
    repeats = 2 if args.quick else args.repeats
    dtypes = ("fp32",) if args.quick else ("fp32", "bf16")
    print(f"{gpu}, torch {torch.__version__}, CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}"
          f"; cuda_graphs: not implemented (every row without)")
    rows = []
    began = time.perf_counter()
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        torch.manual_seed(0)
        built = models(shape, torch, nn, rb)
        x = torch.randn(shape["steps"], shape["batch"], shape["input"], device="cuda")
        for dtype in dtypes:
            steps = {(name, mode): make_step(torch, model, x, mode, dtype)
                     for name, model in built.items() for mode in ("train", "eval")}
            first = {key: timed(torch, step) for key, step in steps.items()}  # includes Triton's compilation
            for step in steps.values():
                step()  # warm-up
            times: dict = {key: [] for key in steps}
            for _ in range(repeats):
                for key, step in steps.items():
                    times[key].append(timed(torch, step))
            for (name, mode), values in times.items():
                rows.append({
                    "gpu": gpu, "shape": shape_name, **shape, "dtype": dtype, "mode": mode, "implementation": name,
                    "cuda_graphs": "no", "ms": round(statistics.median(values), 3), "ms_min": round(min(values), 3),
                    "first_call_ms": round(first[(name, mode)], 1), "repeats": repeats,
                })
            for mode in ("train", "eval"):
                here = {r["implementation"]: r["ms"] for r in rows
                        if r["shape"] == shape_name and r["dtype"] == dtype and r["mode"] == mode}
                for name, ms in here.items():
                    print(f"{shape_name:6} {dtype} {mode:5} {name:24} {ms:9.2f} ms  x{ms / here[CUDNN]:6.2f} cuDNN  "
                          f"x{ms / here[REFERENCE]:6.3f} reference  (first call {first[(name, mode)]:.0f} ms)",
                          flush=True)
        del built
        torch.cuda.empty_cache()
    if not args.quick:
        result = trainer_rate(torch, args.trainer_steps)
        if result is not None:
            print(f"trainer paper_pmnist bn_lstm (backend {result['backend']}): {result['steps_per_s']:.2f} steps/s")
            rows.append({"gpu": gpu, "shape": "paper_pmnist trainer", "implementation": "trainer bn_lstm",
                         "mode": "train", "dtype": "fp32", "cuda_graphs": "no",
                         "ms": round(1000 / result["steps_per_s"], 3), "repeats": args.trainer_steps})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with OUT.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {OUT} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
