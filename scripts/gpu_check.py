"""Check, time and train on a bare GPU machine in about ten minutes: `make gpu-check` (issue #26).

It needs only torch and Triton as the machine has them, plus what the repository carries: `src/`, and the wheels of
the pure-Python packages a training run needs and a bare image lacks (Hydra, OmegaConf, antlr4), which
`make gpu-bundle` puts in the git-ignored `.gpu-bundle/`; they are unpacked into a temporary folder and put on
sys.path (and PYTHONPATH for the training processes), never installed. Every result is one CSV row
(`<out>/gpu_check.csv`, the columns of `bench_gpu.FIELDS`), written and flushed as soon as it is measured, so a run
that is cut off keeps everything before the cut. In order:

  1. environment: GPU name, torch, Triton, CUDA, cuDNN versions, TF32 settings as found, CUBLAS_WORKSPACE_CONFIG;
  2. correctness on the GPU against the float64 reference loop for every LSTM variant, train and eval, with and
     without lengths, float32 (TF32 off) and bf16 autocast, each with the error of the reference loop's own run at
     that precision beside it; run-to-run bitwise determinism of the Triton path (a race between programs would show
     here, which the interpreter cannot); the CUDA-graph path against the eager one, bit for bit (the capture);
  3. timing against cuDNN's nn.LSTM at the paper's pMNIST, PTB and text8 shapes, TF32 off and on for both sides,
     float32 and bf16 autocast, the Triton path eager and with CUDA graphs, the reference loop at pMNIST only
     (`bench_gpu.measure`);
  4. with the minutes left, the paper-scale PTB pair (experiment=paper_ptb, lstm and bn_lstm, both on the Triton
     path: our layers have no cuDNN dispatch, and the paper's baseline keeps β_c inside the output tanh, which cuDNN
     cannot) side by side until the time is up, each `metrics.csv` copied into the output folder as it grows; if
     both finish, the pMNIST pair.

`--dry-run` runs every step on the CPU under Triton's interpreter at tiny shapes (a few minutes; the numbers mean
nothing): `tests/test_gpu_check.py` runs it in `make test-slow`.

    python scripts/gpu_check.py [--minutes 10] [--out results/gpu_check/<time>] [--data-root DIR] [--dry-run]
    python scripts/gpu_check.py --make-bundle     # what `make gpu-bundle` runs (needs pip and the registry)
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
BUNDLE = ROOT / ".gpu-bundle"
# The pure-Python packages a training run imports that a bare torch + Triton image lacks (Hydra's own included).
BUNDLED = ("hydra-core", "omegaconf", "antlr4-python3-runtime")

# Every LSTM variant of the Triton path (tests/test_triton.py imports this list).
VARIANTS = {
    "none": {"norm": "none"},
    "none-cell-bias": {"norm": "none", "cell_bias": True},
    "bn": {"norm": "bn"},
    "vbn": {"norm": "vbn"},
    "ln": {"norm": "ln"},
    "bn-shared": {"norm": "bn", "share_statistics_over_time": True},
    "bn-recurrent": {"norm": "bn", "norm_terms": ("recurrent",)},
    "bn-cell": {"norm": "bn", "norm_terms": ("cell",)},
    "bn-input-recurrent-cell-bias": {"norm": "bn", "norm_terms": ("input", "recurrent"), "cell_bias": True},
    "ln-recurrent": {"norm": "ln", "norm_terms": ("recurrent",)},
    "ln-cell": {"norm": "ln", "norm_terms": ("cell",)},
    "bn-no-bias": {"norm": "bn", "bias": False},
}
DRY_VARIANTS = ("none", "bn", "ln", "bn-shared")
# (steps, batch, input, hidden, layers, max_length): T > max_length, two layers, padding.
CHECK_SHAPE = (24, 16, 8, 32, 2, 16)
DRY_SHAPE = (4, 3, 2, 3, 2, 3)
# Dry run: PTB on the Triton path under the interpreter at T = 5; pMNIST's 784 steps would take the interpreter
# minutes, so its pair checks only the orchestration, on the reference loop.
DRY_TRAIN = {
    "paper_ptb": ["model.backend=triton", "task.seq_len=5", "task.batch_size=4"],
    "paper_pmnist": ["model.backend=reference", "task.valid_size=10", "task.batch_size=5", "task.eval_batch_size=10"],
}
# Relative error (to the largest reference value) allowed beside the reference loop's own error at that precision.
FLOAT32_SLACK, BF16_FLOOR = 1e-5, 2e-2


def make_bundle() -> int:
    """Wheels of BUNDLED at the versions installed here into .gpu-bundle/ (built from sdists where needed)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in BUNDLED]
    shutil.rmtree(BUNDLE, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(BUNDLE), *pins],
                   check=True)
    size = sum(p.stat().st_size for p in BUNDLE.glob("*.whl"))
    print(f"gpu-bundle: {', '.join(pins)} in {BUNDLE} ({size / 1e6:.1f} MB)")
    return 0


def use_bundle() -> str | None:
    """Unpack the bundled wheels into a temporary folder and put it on sys.path (where the packages are not
    importable already); returns the folder, for the training processes' PYTHONPATH, or None."""
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401

        return None
    except ImportError:
        pass
    wheels = sorted(BUNDLE.glob("*.whl"))
    if not wheels:
        return None
    site = tempfile.mkdtemp(prefix="rbn-gpu-bundle-")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    sys.path.insert(0, site)
    return site


def randomize(model, torch, rb, seed: int = 0):
    """Random parameters (γ in [0.2, 1]) and population statistics, so that nothing passes by a special value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            values = (torch.rand(p.shape, generator=generator) * 0.8 + 0.2 if "norm" in name and "weight" in name
                      else torch.randn(p.shape, generator=generator) * 0.5)
            p.copy_(values)
        for module in model.modules():
            if isinstance(module, rb.RecurrentBatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.trained_length.fill_(module.slots)
    return model


def run_once(torch, model, x, hx, lengths, autocast: bool):
    """Outputs and the gradients of a fixed weighted loss w.r.t. input, initial states and parameters."""
    x = x.detach().clone().requires_grad_(True)
    hx = tuple(h.detach().clone().requires_grad_(True) for h in hx)
    torch.manual_seed(2)  # the same dropout masks for every run
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y, (h, c) = model(x, hx, lengths)
    generator = torch.Generator().manual_seed(2)
    outputs = [t.float() if t.dtype == torch.bfloat16 else t for t in (y, h, c)]
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in outputs]
    loss = sum((t * w).sum() for t, w in zip(outputs, weights, strict=True))
    grads = torch.autograd.grad(loss, [x, *hx, *model.parameters()], allow_unused=True)
    return [t.detach() for t in outputs] + [g for g in grads if g is not None]


def relative_error(exact, approximate) -> float:
    return max(float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp(min=1e-3))
               for a, b in zip(exact, approximate, strict=True))


def check_correctness(torch, rb, device: str, variants, shape, write: Callable[[dict], dict]) -> None:
    """Step 2a: the Triton path against float64, every variant x train/eval x lengths x float32/bf16."""
    steps, batch, input_size, hidden, layers, max_length = shape
    from bench_gpu import set_tf32

    set_tf32(torch, False)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(steps, batch, input_size, generator=generator, dtype=torch.float64).to(device)
    hx = tuple((torch.randn(layers, batch, hidden, generator=generator, dtype=torch.float64) * 0.5).to(device)
               for _ in range(2))
    for variant in variants:
        for training in (True, False):
            for with_lengths in (False, True):
                # one sequence of every length down to 1, then full ones
                lengths = (torch.tensor(([steps, 1, *range(steps - 2, 0, -1)] + [steps] * batch)[:batch])
                           if with_lengths else None)
                reference = rb.LSTM(input_size, hidden, layers, max_length=max_length, backend="reference",
                                    dropout=0.3, **VARIANTS[variant])
                reference = randomize(reference, torch, rb).double().to(device).train(training)
                exact = run_once(torch, copy.deepcopy(reference), x, hx, lengths, autocast=False)
                for dtype in ("fp32", "bf16"):
                    errors = {}
                    for backend in ("reference", "triton"):
                        model = copy.deepcopy(reference).float()
                        model.backend = backend
                        got = run_once(torch, model, x.float(), tuple(h.float() for h in hx), lengths,
                                       autocast=dtype == "bf16")
                        errors[backend] = relative_error(exact, got)
                    limit = (10 * errors["reference"] + FLOAT32_SLACK if dtype == "fp32"
                             else max(3 * errors["reference"], BF16_FLOOR))
                    write({"check": "correctness", "implementation": f"{variant} triton", "dtype": dtype,
                           "mode": "train" if training else "eval", "value": f"{errors['triton']:.3g}",
                           "limit": f"{limit:.3g}", "ok": int(errors["triton"] <= limit), "steps": steps,
                           "batch": batch, "input": input_size, "hidden": hidden,
                           "note": f"{'lengths' if with_lengths else 'full'}; relative error to float64; the "
                                   f"reference loop's own: {errors['reference']:.3g}"})


def check_determinism_and_graphs(torch, rb, device: str, shape, write: Callable[[dict], dict]) -> None:
    """Step 2b: two runs of the Triton path on the same inputs are bitwise equal; so are CUDA-graph replays and the
    eager loops (on a GPU this is the capture itself)."""
    from recurrent_bn import triton_lstm

    steps, batch, input_size, hidden, layers, max_length = shape
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(steps, batch, input_size, generator=generator).to(device)
    hx = tuple(torch.randn(layers, batch, hidden, generator=generator).to(device) for _ in range(2))
    lengths = torch.tensor([steps] + [max(1, steps - k) for k in range(1, batch)])
    for variant in ("none", "bn", "ln"):
        base = randomize(rb.LSTM(input_size, hidden, layers, max_length=max_length, backend="triton",
                                 **VARIANTS[variant]), torch, rb).to(device)
        runs = [run_once(torch, copy.deepcopy(base), x, hx, lengths, autocast=False) for _ in range(2)]
        difference = max(float((a - b).abs().max()) for a, b in zip(*runs, strict=True))
        write({"check": "determinism", "implementation": f"{variant} triton", "mode": "train", "dtype": "fp32",
               "value": difference, "limit": 0, "ok": int(all(torch.equal(a, b) for a, b in zip(*runs, strict=True))),
               "note": "two runs, same inputs"})
        previous = triton_lstm.set_cuda_graphs(True)
        try:
            graphed = [run_once(torch, copy.deepcopy(base), x, hx, lengths, autocast=False) for _ in range(2)]
        finally:
            triton_lstm.set_cuda_graphs(previous)
            triton_lstm.clear_cuda_graphs()
        equal = all(torch.equal(a, b) for g in graphed for a, b in zip(runs[0], g, strict=True))
        difference = max(float((a - b).abs().max()) for g in graphed for a, b in zip(runs[0], g, strict=True))
        write({"check": "cuda_graphs", "implementation": f"{variant} triton", "mode": "train", "dtype": "fp32",
               "cuda_graphs": "yes", "value": difference, "limit": 0, "ok": int(equal),
               "note": "capture + replay against the eager loops"})


def graph_steps(torch, rb) -> Callable:
    """`bench_gpu.measure`'s extra steps: each Triton model once more with its loops replayed from CUDA graphs."""
    from bench_gpu import make_step

    from recurrent_bn import triton_lstm

    def steps_for(name, model, x, mode, dtype):
        if not name.endswith("triton"):
            return ()
        eager = make_step(torch, model, x, mode, dtype)

        def graphed():
            previous = triton_lstm.set_cuda_graphs(True)
            try:
                eager()
            finally:
                triton_lstm.set_cuda_graphs(previous)

        return ((" graphs", "yes", graphed),)

    return steps_for


def check_timing(torch, rb, device: str, dry_run: bool, write: Callable[[dict], dict], env: dict) -> None:
    """Step 3: bench_gpu.measure at the paper's shapes (the tiny one in a dry run), TF32 off and on, eager and
    graphs, the reference loop at pMNIST only."""
    import bench_gpu

    shapes = bench_gpu.TINY if dry_run else bench_gpu.SHAPES
    repeats = 1 if dry_run else 3
    for shape_name, shape in shapes.items():
        for row in bench_gpu.measure(torch, rb, shape_name, shape, ("fp32", "bf16"), (False, True), repeats, device,
                                     reference=dry_run or shape_name == "pmnist", steps_for=graph_steps(torch, rb)):
            write({**env, "check": "timing", **row})
            print(f"timing {shape_name:6} {row['dtype']} tf32 {row['tf32_matmul']} {row['mode']:5} "
                  f"{row['implementation']:26} {row['ms']:9.2f} ms  x{row['x_cudnn']:6.2f} cuDNN", flush=True)


def train_pairs(args, deadline: float, site: str | None, write: Callable[[dict], dict]) -> None:
    """Step 4: the paper-scale PTB pair side by side until the deadline, then the pMNIST pair if time is left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), site,
                                                                    os.environ.get("PYTHONPATH")) if p)}
    overrides = ["logger=csv", "trainer.device=cpu" if args.dry_run else "trainer.device=cuda"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.dry_run:  # two steps of a tiny model (on fixture data in the tests)
        env["TRITON_INTERPRET"] = "1"
        overrides += ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.log_every=1",
                      "trainer.checkpoint_every=2", "trainer.eval_batches=1", "trainer.final_test=false",
                      "model.hidden_size=8", "data.verify=false", "trainer.estimate_batches=1"]
    for experiment in ("paper_ptb", "paper_pmnist"):
        if time.monotonic() > deadline - 30:
            write({"check": "train", "implementation": experiment, "ok": "", "note": "no time left"})
            return
        processes = {}
        for model in ("lstm", "bn_lstm"):
            run_dir = args.out / "runs" / f"{experiment}_{model}"
            extra = [*(DRY_TRAIN[experiment] if args.dry_run else ()),
                     *(o for item in args.extra if item.startswith(f"{experiment}=")
                       for o in item.split("=", 1)[1].split())]
            command = [sys.executable, "-m", "recurrent_bn.train", f"experiment={experiment}", f"model={model}",
                       f"hydra.run.dir={run_dir}", *overrides, *extra]
            log = (args.out / f"{experiment}_{model}.log").open("w")
            processes[model] = (subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                                run_dir, log)
        while any(p.poll() is None for p, _, _ in processes.values()) and time.monotonic() < deadline:
            time.sleep(1 if args.dry_run else 15)
            copy_metrics(args.out, experiment, processes)
        finished = True
        for model, (process, run_dir, log) in processes.items():
            stopped = process.poll() is None
            if stopped:  # out of time: SIGTERM, on which the trainer writes its checkpoint
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()
            copy_metrics(args.out, experiment, {model: (process, run_dir, log)})
            rows = (args.out / f"{experiment}_{model}_metrics.csv")
            lines = rows.read_text().splitlines() if rows.exists() else []
            done = process.returncode == 0
            finished &= done
            # ok: 1 finished, 0 failed, empty: stopped at the deadline (as far as it got: its metrics are here)
            write({"check": "train", "implementation": f"{experiment} {model}",
                   "ok": "" if stopped else int(done), "value": len(lines) - 1 if lines else 0,
                   "note": (f"{'stopped at the deadline' if stopped else f'exit {process.returncode}'}; "
                            + (f"last metrics row: {lines[-1]}" if lines
                               else f"no metrics.csv (see {experiment}_{model}.log)"))})
        if not finished:
            return


def copy_metrics(out: Path, experiment: str, processes: dict) -> None:
    for model, (_, run_dir, _) in processes.items():
        source = Path(run_dir) / "metrics.csv"
        if source.exists():
            shutil.copyfile(source, out / f"{experiment}_{model}_metrics.csv")


def step(name: str, write: Callable[[dict], dict], function: Callable[[], None]) -> None:
    """Run one step; an exception becomes a failed row (and its traceback on stderr), and the next step runs."""
    began = time.monotonic()
    try:
        function()
    except Exception as error:  # noqa: BLE001 - a check that fails must not stop the ones after it
        traceback.print_exc()
        write({"check": name, "ok": 0, "note": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
    print(f"gpu_check: {name} took {time.monotonic() - began:.0f} s", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the whole run's budget; training gets the rest")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/gpu_check/<time>)")
    parser.add_argument("--data-root", default=None, help="data root for the training runs (else RBN_DATA_ROOT)")
    parser.add_argument("--extra", action="append", default=[], metavar="EXPERIMENT=OVERRIDES",
                        help="more overrides for one experiment's runs, e.g. 'paper_ptb=task.num_classes=29' "
                             "(space-separated; for fixture data)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out: correctness, timing, train")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--make-bundle", action="store_true", help="build .gpu-bundle/ (make gpu-bundle)")
    return parser.parse_args(argv)


def main(args) -> int:
    if args.make_bundle:
        return make_bundle()
    began = time.monotonic()
    deadline = began + args.minutes * 60
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before recurrent_bn defines the kernels
    sys.path[:0] = [str(ROOT / "src"), str(SCRIPTS)]
    site = use_bundle()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to check the script on the CPU)")
        return 1
    import bench_gpu

    import recurrent_bn as rb

    device = "cpu" if args.dry_run else "cuda"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out = Path(args.out or ROOT / "results" / "gpu_check" / stamp)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = bench_gpu.CsvRows(args.out / "gpu_check.csv")
    env = bench_gpu.environment(torch, device)

    failures = []

    def write(row: dict) -> dict:
        if row.get("ok") == 0:
            failures.append(row)
        return rows.write({**env, **row})

    skip = set(filter(None, args.skip.split(",")))
    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    write({"check": "environment", **bench_gpu.tf32_state(torch), "ok": 1,
           "note": f"cuda {cuda}; cudnn {cudnn}; CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}; "
                   f"bundle {'unpacked' if site else 'not needed or missing'}; python {sys.version.split()[0]}"})
    print(f"gpu_check: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuda {cuda}, cudnn {cudnn}; "
          f"rows in {rows.path}", flush=True)
    shape = DRY_SHAPE if args.dry_run else CHECK_SHAPE
    variants = DRY_VARIANTS if args.dry_run else tuple(VARIANTS)
    try:
        if "correctness" not in skip:
            step("correctness", write, lambda: check_correctness(torch, rb, device, variants, shape, write))
            step("determinism", write, lambda: check_determinism_and_graphs(torch, rb, device, shape, write))
        if "timing" not in skip:
            step("timing", write, lambda: check_timing(torch, rb, device, args.dry_run, write, env))
        bench_gpu.set_tf32(torch, False)
        if "train" not in skip:
            step("train", write, lambda: train_pairs(args, deadline, site, write))
    finally:
        rows.close()
    print(f"gpu_check: {rows.count} rows, {len(failures)} failed, in {rows.path} "
          f"({time.monotonic() - began:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
