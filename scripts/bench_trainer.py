"""End-to-end training throughput of the cpu_* presets: data + model + loss + backward + clipping + optimizer.

    python scripts/bench_trainer.py [--steps 40] [--models lstm,bn_lstm] [--presets cpu_pmnist,cpu_ptb]

Runs each preset x model for a few logged windows through the real trainer (no validation or test), reads the
throughput the trainer itself logs (sequences per second over the training steps), and writes the rows to
results/bench_trainer.csv with the machine. It prints numbers; it asserts nothing. Presets whose data is missing
are skipped with a note.
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from recurrent_bn.config import CONF_DIR
from recurrent_bn.errors import DataNotFoundError
from recurrent_bn.trainer import train

OUT = CONF_DIR.parent / "results" / "bench_trainer.csv"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(preset: str, model: str, steps: int) -> dict | None:
    window = max(steps // 4, 1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"experiment={preset}", f"model={model}", f"trainer.max_steps={steps}", f"trainer.log_every={window}",
            f"trainer.eval_every={steps * 10}", f"trainer.checkpoint_every={steps * 10}", "trainer.final_test=false",
            "trainer.eval_batches=1", "logger=csv",
        ])
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            train(cfg, Path(run_dir))
        except DataNotFoundError as error:
            print(f"skip {preset}: {error}")
            return None
        with open(Path(run_dir) / "metrics.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    rates = sorted(float(r["seq_per_s"]) for r in rows[1:])  # the first window includes warm-up
    rate = rates[len(rates) // 2]
    return {
        "preset": preset, "model": model, "task": cfg.task.name, "hidden_size": cfg.model.hidden_size,
        "batch_size": cfg.task.batch_size, "steps": steps, "seq_per_s": round(rate, 1),
        "ms_per_step": round(1000 * cfg.task.batch_size / rate, 1), "threads": torch.get_num_threads(),
        "cpu": cpu_model(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--models", default="lstm,bn_lstm,ln_lstm,vbn_lstm")
    parser.add_argument("--presets", default="cpu_pmnist,cpu_ptb,cpu_text8")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        for model in args.models.split(","):
            row = measure(preset, model, args.steps)
            if row is None:
                break
            rows.append(row)
            rate, step_ms = row["seq_per_s"], row["ms_per_step"]
            print(f"{preset:12s} {model:10s} {rate:8.1f} seq/s {step_ms:8.1f} ms/step", flush=True)
    if rows:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
