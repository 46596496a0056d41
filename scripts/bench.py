"""Time one training step (forward + backward) and one evaluation forward of the recurrent layers.

In one process, after warm-up, with the implementations interleaved in every repeat:
  - `torch.nn.LSTM` (PyTorch's fused kernel: oneDNN on the CPU);
  - a per-timestep BN-LSTM written the way popular PyTorch implementations write it (a cell called once per timestep
    in a Python loop, both projections inside the cell, `F.batch_norm` with running statistics per timestep);
  - recurrent_bn's `lstm`, `vbn_lstm`, `bn_lstm`, `ln_lstm` on the fused path and on the reference path;
at the pMNIST shape (T 784, input 1, hidden 100, batch 64), the PTB shape (T 100, input 50, hidden 256, batch 64),
the paper's PTB size (hidden 1000) and the text8 size (T 180, input 27, hidden 2000, batch 128; one repeat).

Reported per implementation and mode: ms per step (median, min-max), the ratio to `torch.nn.LSTM` and to the
per-timestep BN-LSTM in the same mode, sequences per second, the achieved GFLOP/s of the matrix products, and the peak
memory of a training step. The standard run (no option but --out) writes the rows to results/bench.csv (with the machine
description) and the tables to results/bench.md; a run with any other option (a subset, other repeats, no malloc tuning,
...) prints them, and writes them only to a folder given with --out. glibc malloc tuning (recurrent_bn.malloc) is
applied at start-up; child processes time torch.nn.LSTM and bn_lstm (fused) each alone, with the tuning and without it,
for comparison. Denormals are flushed to zero for every implementation, as the trainer does
(`torch.set_flush_denormal`): on Intel CPUs `torch.nn.LSTM`'s backward through 784 steps decays into denormals and ran
8x slower with them. `--oversubscribed` times the BN-LSTM training step on one and on two threads while another process
keeps one core busy (see `oversubscribed`). The script prints numbers; it asserts nothing.

    python scripts/bench.py                 # everything (about 10-15 minutes on 2 cores)
    python scripts/bench.py --quick         # pMNIST and PTB shapes, 2 repeats
    python scripts/bench.py --shapes ptb --impls nn,bn_lstm
    python scripts/bench.py --oversubscribed    # only the busy-core measurement (about 3 minutes)
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from recurrent_bn.malloc import is_glibc, tune_malloc  # noqa: E402  (before torch allocates anything)

SHAPES = {
    "pmnist": {"steps": 784, "input": 1, "hidden": 100, "batch": 64},
    "ptb": {"steps": 100, "input": 50, "hidden": 256, "batch": 64},
    "ptb-1000": {"steps": 100, "input": 50, "hidden": 1000, "batch": 64},
    # PyTorch's word-language-model example at its small size (sequence 35, batch 20): the drop-in's shape.
    # Its step takes about 5 ms, and a median of 5 moved by 20 % from one run to the next: at least 40 repeats.
    "lm-small": {"steps": 35, "input": 128, "hidden": 128, "batch": 20, "min_repeats": 40},
    "text8-2000": {"steps": 180, "input": 27, "hidden": 2000, "batch": 128, "repeats": 1},
}
VARIANTS = {"lstm": "none", "vbn_lstm": "vbn", "bn_lstm": "bn", "ln_lstm": "ln"}
NN = "torch.nn.LSTM"
PER_TIMESTEP = "per-timestep BN-LSTM"
MODES = ("train", "eval")
MEMORY_NOTE = (
    "peak memory = the resident memory a training step adds (Linux VmHWM after resetting it with "
    "/proc/self/clear_refs, minus VmRSS before the step; freed heap handed back with malloc_trim first), "
    "measured one implementation at a time after the timings"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pMNIST and PTB shapes, 2 repeats, 1 warm-up")
    parser.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--impls", default=None,
                        help="comma-separated substrings selecting implementations, e.g. nn,bn_lstm/fused")
    parser.add_argument("--modes", default="train,eval", help="train, eval or both")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per implementation (default 5; lm-small takes at least 40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--malloc", choices=("on", "off"), default="on", help="apply the glibc malloc tuning")
    parser.add_argument("--no-malloc-compare", action="store_true", help="skip the child run without tuning")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--oversubscribed", action="store_true",
                        help="only time bn_lstm (fused) on 1 and 2 threads with another process busy on one core")
    parser.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                        help="flush denormals to zero (default, as the trainer does) or keep them")
    parser.add_argument("--out", default=None,
                        help="folder for bench.csv and bench.md (default: results/ for the standard run, every other "
                             "option at its default; any other run writes only where this is given)")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # child runs: write rows here
    return parser.parse_args(argv)


def standard_run(args: argparse.Namespace) -> bool:
    """Whether `args` is the standard run, every option at its default but --out: only its tables go to results/
    by default. A subset of shapes, other repeats, untuned malloc or kept denormals each change the numbers."""
    def options(namespace: argparse.Namespace) -> dict:
        chosen = {key: value for key, value in vars(namespace).items() if key not in ("out", "json")}
        return {**chosen, "modes": set(chosen["modes"].split(","))}

    return options(args) == options(parse_args([]))


# The malloc settings must be in place before the first large allocation, hence before importing torch.
ARGS = parse_args() if __name__ == "__main__" else None
MALLOC_TUNED = tune_malloc() if ARGS is not None and ARGS.malloc == "on" else False

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import recurrent_bn as rb  # noqa: E402
from recurrent_bn import fused  # noqa: E402

# Before any timing, for every implementation alike (False where the CPU has no such mode).
FLUSH_DENORMAL = torch.set_flush_denormal(True) if ARGS is not None and ARGS.denormals == "flush" else False


class PerTimestepBNLSTM(nn.Module):
    """A BN-LSTM in the style of the popular PyTorch implementations (the baseline the issue measures against).

    A cell is called once per timestep from a Python loop; it computes both projections, `W_x x_t` and
    `W_h h_{t-1}`, and normalizes each with `F.batch_norm` using that timestep's running statistics (one pair of
    buffers per timestep and term, γ and β shared over time), as `SeparatedBatchNorm1d` does in those repositories.
    """

    def __init__(self, input_size: int, hidden_size: int, max_length: int, gamma: float = 0.1) -> None:
        super().__init__()
        features = 4 * hidden_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(features, input_size))
        self.weight_hh = nn.Parameter(torch.empty(features, hidden_size))
        self.bias = nn.Parameter(torch.zeros(features))
        nn.init.orthogonal_(self.weight_ih)
        nn.init.orthogonal_(self.weight_hh)
        self.gamma_ih = nn.Parameter(torch.full((features,), gamma))
        self.gamma_hh = nn.Parameter(torch.full((features,), gamma))
        self.gamma_c = nn.Parameter(torch.full((hidden_size,), gamma))
        self.beta_c = nn.Parameter(torch.zeros(hidden_size))
        for term, size in (("ih", features), ("hh", features), ("c", hidden_size)):
            self.register_buffer(f"running_mean_{term}", torch.zeros(max_length, size))
            self.register_buffer(f"running_var_{term}", torch.ones(max_length, size))

    def bn(self, x, term, step, gamma, beta=None):
        mean, var = getattr(self, f"running_mean_{term}"), getattr(self, f"running_var_{term}")
        step = min(step, mean.shape[0] - 1)
        return F.batch_norm(x, mean[step], var[step], gamma, beta, self.training, 0.1, 1e-5)

    def cell(self, x, h, c, step):
        wi = torch.mm(x, self.weight_ih.t())
        wh = torch.mm(h, self.weight_hh.t())
        gates = self.bn(wi, "ih", step, self.gamma_ih) + self.bn(wh, "hh", step, self.gamma_hh) + self.bias
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.bn(c, "c", step, self.gamma_c, self.beta_c))
        return h, c

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.hidden_size)
        outputs = []
        for step in range(x.shape[0]):
            h, c = self.cell(x[step], h, c, step)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


def implementations(shape: dict) -> dict:
    steps, inputs, hidden = shape["steps"], shape["input"], shape["hidden"]
    builders = {NN: lambda: nn.LSTM(inputs, hidden), PER_TIMESTEP: lambda: PerTimestepBNLSTM(inputs, hidden, steps)}
    for variant, norm in VARIANTS.items():
        for backend in ("fused", "reference"):
            builders[f"{variant}/{backend}"] = (
                lambda norm=norm, backend=backend: rb.LSTM(inputs, hidden, norm=norm, max_length=steps,
                                                           backend=backend)
            )
    return builders


def selected(name: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    aliases = {"nn": NN, "per-timestep": PER_TIMESTEP}
    # "=name": that implementation only (a plain pattern is a substring: bn_lstm/fused also selects vbn_lstm/fused)
    return any(p[1:] == name if p.startswith("=") else aliases.get(p, p) == name or (p not in aliases and p in name)
               for p in patterns)


def matmul_flops(shape: dict) -> int:
    """Multiply-adds x 2 of the forward's matrix products: the input projection and the recurrent products."""
    steps, batch, inputs, hidden = shape["steps"], shape["batch"], shape["input"], shape["hidden"]
    return 2 * steps * batch * 4 * hidden * (inputs + hidden)


def make_step(model: nn.Module, x: torch.Tensor, mode: str):
    if mode == "train":
        def step():
            output, _ = model(x)
            output.sum().backward()
    else:
        def step():
            with torch.no_grad():
                model(x)
    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_step_memory(step) -> float | None:
    """Resident memory (MB) that one call of `step` adds at its peak; None where Linux's counters are missing."""
    gc.collect()
    if is_glibc():
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = proc_status("VmRSS")
    step()
    peak = proc_status("VmHWM")
    return None if before is None or peak is None else (peak - before) / 2**20


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "libc": "-".join(platform.libc_ver()),
        "fused_kernels": fused.kernel_variant() or f"unavailable ({fused.unavailable_reason()})",
        "malloc_tuned": MALLOC_TUNED,
        "flush_denormal": FLUSH_DENORMAL,
    }


def run_shape(name: str, shape: dict, args, log) -> list[dict]:
    repeats = shape.get("repeats", max(args.repeats, shape.get("min_repeats", 0)))
    warmup = min(args.warmup, 1) if shape.get("repeats") == 1 else args.warmup
    patterns = args.impls.split(",") if args.impls else None
    modes = [m for m in MODES if m in args.modes.split(",")]
    torch.manual_seed(0)
    x = torch.randn(shape["steps"], shape["batch"], shape["input"])
    models, steps = {}, {}
    for impl, build in implementations(shape).items():
        if not selected(impl, patterns):
            continue
        if impl.endswith("/fused") and not fused.available():
            log(f"  skipping {impl}: {fused.unavailable_reason()}")
            continue
        models[impl] = build()
        for mode in modes:
            steps[(impl, mode)] = make_step(models[impl], x, mode)
    log(f"{name}: T={shape['steps']} input={shape['input']} hidden={shape['hidden']} batch={shape['batch']}, "
        f"{len(models)} implementations x {modes}, {warmup} warm-up + {repeats} repeats")
    for (impl, mode), step in steps.items():  # warm-up; evaluation uses the statistics of these training steps
        models[impl].train(mode == "train")
        for _ in range(warmup):
            step()
        models[impl].zero_grad(set_to_none=True)
    times = {key: [] for key in steps}
    order = list(steps)
    for repeat in range(repeats):
        # Interleaved, and rotated so that no implementation always runs right after the same one.
        for key in order[repeat % len(order):] + order[: repeat % len(order)]:
            impl, mode = key
            models[impl].train(mode == "train")
            times[key].append(timed(steps[key]))
            models[impl].zero_grad(set_to_none=True)
    profile = None
    if fused.available() and ("bn_lstm/fused", "train") in steps:
        models["bn_lstm/fused"].train()
        steps[("bn_lstm/fused", "train")]()
        profile = fused.last_profile()
        models["bn_lstm/fused"].zero_grad(set_to_none=True)
    memory = {}
    if not args.no_memory and "train" in modes:
        for impl in models:
            models[impl].train()
            memory[impl] = peak_step_memory(steps[(impl, "train")])
            models[impl].zero_grad(set_to_none=True)
    rows = []
    flops = matmul_flops(shape)
    for (impl, mode), values in times.items():
        median = statistics.median(values)
        rows.append({
            "shape": name, **{k: shape[k] for k in ("steps", "input", "hidden", "batch")}, "impl": impl,
            "mode": mode, "repeats": len(values), "ms_median": 1e3 * median, "ms_min": 1e3 * min(values),
            "ms_max": 1e3 * max(values), "sequences_per_s": shape["batch"] / median,
            "matmul_gflops": (3 if mode == "train" else 1) * flops / median / 1e9,
            "peak_memory_mb": memory.get(impl) if mode == "train" else None,
        })
    for row in rows:
        base = {r["impl"]: r["ms_median"] for r in rows if r["mode"] == row["mode"]}
        row["vs_torch_lstm"] = row["ms_median"] / base[NN] if NN in base else None
        row["vs_per_timestep"] = row["ms_median"] / base[PER_TIMESTEP] if PER_TIMESTEP in base else None
    if profile is not None:
        rows.append({"shape": name, "impl": "bn_lstm/fused profile", "mode": "train", "profile": profile})
    return rows


def malloc_comparison(args, log) -> list[dict]:
    """Time torch.nn.LSTM and bn_lstm (fused) each alone in a child process, with the malloc tuning and with glibc's
    defaults: alone, because in one process the implementations' allocations disturb each other's heap."""
    shapes = [s for s in (args.shapes.split(",") if args.shapes else ["pmnist", "ptb"]) if s in ("pmnist", "ptb")]
    if not shapes:
        return []
    folder = tempfile.TemporaryDirectory(prefix="bench-malloc-")
    out = Path(folder.name) / "rows.json"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    rows = []
    for impl in ("nn", "=bn_lstm/fused"):
        for malloc in ("on", "off"):
            command = [sys.executable, str(Path(__file__).resolve()), "--malloc", malloc, "--no-malloc-compare",
                       "--no-memory", "--shapes", ",".join(shapes), "--impls", impl, "--modes", "train",
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--denormals", args.denormals,
                       "--json", str(out)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            log(f"malloc comparison: {impl.lstrip('=')} alone in a child process, tuning {malloc} ...")
            result = subprocess.run(command, env=environment, capture_output=True, text=True)
            if result.returncode != 0:
                log(f"  child failed: {result.stderr.strip().splitlines()[-1:]}")
                continue
            rows += [{**row, "malloc": malloc} for row in json.loads(out.read_text())]
            out.unlink()
    folder.cleanup()
    return rows


SMNIST = {"steps": 784, "input": 1, "hidden": 100, "batch": 100}


def oversubscribed(args, log, rounds: int = 4, block: int = 25) -> list[dict]:
    """bn_lstm (fused) training steps at the sMNIST shape on one thread and on two while a child process spins on
    CPU 0 the whole time, as a neighbour in a parallel sweep does: a thread team must not be much slower than one
    thread when a core is taken. Two threads run three ways: as shipped (barrier spin 10 us, then falling back to one
    thread after a call that mostly waited, trying the team again after 4, 8, ... up to 256 calls), without the
    fallback, and without it with a 200 us spin (about the earlier barrier's 4096 pause instructions).

    The variants take turns in blocks of `block` consecutive steps, `rounds` blocks each; a variant's mean over all
    its steps is what a training run beside the neighbour pays. Each variant keeps the fallback's state between its
    blocks (the others neither read nor change it), so "2 threads" sees one run of rounds * block steps, and the mean
    of its first block alone (the fallback still learning, the team retried after 4, 8 and 16 calls) is printed too.
    """
    torch.manual_seed(0)
    shape = SMNIST
    model = rb.LSTM(shape["input"], shape["hidden"], norm="bn", max_length=shape["steps"], backend="fused")
    step = make_step(model, torch.randn(shape["steps"], shape["batch"], shape["input"]), "train")
    extension = fused._extension
    # name: (threads, barrier spin in seconds, fall back to one thread)
    variants = {"1 thread": (1, 1e-5, True), "2 threads": (2, 1e-5, True),
                "2 threads, no fallback": (2, 1e-5, False), "2 threads, no fallback, 200 us spin": (2, 2e-4, False)}
    spin = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"
    threads_before = torch.get_num_threads()
    step()  # warm-up (allocations, the first products) before the neighbour starts
    model.zero_grad(set_to_none=True)
    busy = subprocess.Popen([sys.executable, "-c", spin])
    times = {name: [] for name in variants}
    try:
        time.sleep(0.5)
        for repeat in range(rounds):
            names = list(variants) if repeat % 2 else list(variants)[::-1]
            for name in names:
                threads, spin_seconds, fallback = variants[name]
                torch.set_num_threads(threads)
                extension.set_barrier_spin(spin_seconds)
                extension.set_team_fallback(fallback)
                for _ in range(block):
                    times[name].append(timed(step))
                    model.zero_grad(set_to_none=True)
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(threads_before)
        extension.set_barrier_spin(1e-5)
        extension.set_team_fallback(True)
    rows = [{"shape": "smnist-busy-core", **shape, "impl": f"bn_lstm/fused, {name}", "mode": "train",
             "repeats": len(values), "ms_mean": 1e3 * statistics.mean(values),
             "ms_first_block": 1e3 * statistics.mean(values[:block]), "ms_median": 1e3 * statistics.median(values),
             "ms_min": 1e3 * min(values), "ms_max": 1e3 * max(values)} for name, values in times.items()]
    one = rows[0]["ms_mean"]
    load = os.getloadavg()[0]
    log(f"CPU 0 busy, load average {load:.1f} on {os.cpu_count()} CPUs, sMNIST shape (B {shape['batch']}), "
        f"bn_lstm fused training step, {rounds} blocks of {block} steps per variant, taking turns:")
    for row in rows:
        name = row["impl"].split(", ", 1)[1]
        log(f"  {name:38s} mean {row['ms_mean']:5.0f} ms ({row['ms_mean'] / one:.2f}x 1 thread), first block "
            f"{row['ms_first_block']:5.0f} ms ({row['ms_first_block'] / rows[0]['ms_first_block']:.2f}x)")
    return rows


def fmt(value, digits=1):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def tables(rows: list[dict], off_rows: list[dict], info: dict) -> str:
    lines = [
        "# Benchmark: one layer, one step",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} PyTorch threads), torch "
        f"{info['torch']}, Python {info['python']}, {info['libc']}; fused kernels: {info['fused_kernels']}; "
        f"malloc tuning: {'on' if info['malloc_tuned'] else 'off'}.",
        "",
        "Training step = forward + backward of `output.sum()`; evaluation = forward under `torch.no_grad()` with "
        "population statistics. ms per step: median (min-max) of interleaved repeats after warm-up. GFLOP/s: the "
        "matrix products' FLOPs (forward x 3 for a training step) per second. " + MEMORY_NOTE + ".",
    ]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        timing = [r for r in rows if r["shape"] == shape and "ms_median" in r]
        if not timing:
            continue
        s = timing[0]
        lines += ["", f"## {shape}: T {s['steps']}, input {s['input']}, hidden {s['hidden']}, batch {s['batch']}", "",
                  "| implementation | mode | ms/step median (min-max) | × torch.nn.LSTM | × per-timestep | "
                  "sequences/s | GFLOP/s | peak MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(timing, key=lambda r: (MODES.index(r["mode"]), r["ms_median"])):
            lines.append(
                f"| {r['impl']} | {r['mode']} | {fmt(r['ms_median'])} ({fmt(r['ms_min'])}-{fmt(r['ms_max'])}) | "
                f"{fmt(r['vs_torch_lstm'], 2)} | {fmt(r['vs_per_timestep'], 2)} | {fmt(r['sequences_per_s'], 0)} | "
                f"{fmt(r['matmul_gflops'], 0)} | {fmt(r['peak_memory_mb'], 0)} |"
            )
        for r in rows:
            if r["shape"] == shape and "profile" in r:
                forward, backward, weight = r["profile"]
                threads = max(1, info["torch_threads"])
                parts = []
                for label, table in (("forward", forward), ("backward", backward)):
                    per_thread = [table[3 * k: 3 * k + 3] for k in range(threads) if any(table[3 * k: 3 * k + 3])]
                    mean = [sum(t[i] for t in per_thread) / max(1, len(per_thread)) * 1e3 for i in range(3)]
                    parts.append(f"{label} loop {mean[0]:.1f} ms matrix products + {mean[1]:.1f} ms elementwise + "
                                 f"{mean[2]:.1f} ms other/waiting per thread")
                lines += ["", f"bn_lstm/fused, where the time goes (last training step): {'; '.join(parts)}; "
                          f"dW_h product after the loop {weight[0] * 1e3:.1f} ms."]
    if off_rows:
        lines += ["", "## glibc malloc tuning (training step, ms median, each implementation alone in a process)", "",
                  "| shape | implementation | tuned (M_MMAP_MAX=0, large M_TRIM_THRESHOLD) | glibc defaults | defaults "
                  "/ tuned |", "|---|---|---|---|---|"]
        for key in dict.fromkeys((r["shape"], r["impl"]) for r in off_rows):
            on, off = (next((r["ms_median"] for r in off_rows if (r["shape"], r["impl"]) == key
                             and r["malloc"] == malloc), None) for malloc in ("on", "off"))
            ratio = f"{off / on:.2f}" if on and off else "n/a"
            lines.append(f"| {key[0]} | {key[1]} | {fmt(on)} | {fmt(off)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(args) -> None:
    standard = standard_run(args)  # before the defaults below are filled in
    if args.quick:
        args.repeats = args.repeats or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.shapes = args.shapes or "pmnist,ptb"
    args.repeats = args.repeats or 5
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.oversubscribed:
        fused.available()
        oversubscribed(args, log)
        return
    names = args.shapes.split(",") if args.shapes else list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
    fused.available()  # build the kernels (first use) before anything is timed
    info = machine()
    log(f"machine: {info}")
    rows = []
    for name in names:
        shape = dict(SHAPES[name])
        rows += run_shape(name, shape, args, log)
    if args.json:
        Path(args.json).write_text(json.dumps([r for r in rows if "ms_median" in r]))
        return
    off_rows = [] if args.no_malloc_compare or args.malloc == "off" else malloc_comparison(args, log)
    text = tables(rows, off_rows, info)
    print(text)
    if args.out is None and not standard:  # its tables would replace the standard ones in results/
        log("not the standard run (an option other than --out was given): the tables are printed, not written "
            "(give --out DIR to keep them)")
        return
    out = Path(args.out) if args.out else ROOT / "results"
    out.mkdir(parents=True, exist_ok=True)
    fields = ["shape", "steps", "input", "hidden", "batch", "impl", "mode", "repeats", "ms_median", "ms_min",
              "ms_max", "vs_torch_lstm", "vs_per_timestep", "sequences_per_s", "matmul_gflops", "peak_memory_mb",
              "malloc"] + list(info)
    with (out / "bench.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            if "ms_median" in row:
                writer.writerow({**row, "malloc": "tuned" if MALLOC_TUNED else "default", **info})
        for row in off_rows:
            writer.writerow({**row, "malloc": "default", **{**info, "malloc_tuned": False}})
    (out / "bench.md").write_text(text)
    log(f"wrote {out / 'bench.csv'} and {out / 'bench.md'}")


if __name__ == "__main__":
    main(ARGS)
