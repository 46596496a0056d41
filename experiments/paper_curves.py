"""The paper-scale campaign: Figure 2 (sMNIST, pMNIST) and Figure 3a (PTB) at the paper's exact setup, and the
tanh question's RNNs at the paper's MNIST setup, run to the steps where the paper's figures can be read.

One command that can be run again and again, in every working session, until everything is done:

    python experiments/paper_curves.py              # start missing runs, resume unfinished ones, skip finished ones
    python experiments/paper_curves.py --status     # how far each run got
    python experiments/paper_curves.py --collect    # copy the records into results/runs/{paper_curves,tanh_question}/

Runs write into $RBN_CAMPAIGN_DIR (default: rbn_campaign beside the repository), so that git operations in the work
tree never touch a file a run has open. Only the repository is sure to reach the next working session, maybe on
another machine, so `--collect` copies each run's record into results/runs/{paper_curves,tanh_question}/<run>/ and,
while the run is unfinished, its checkpoints too (last.pt, and best.pt, which the final test needs; not over
CARRIED_MAX_BYTES, which only a PTB run's reach): commit them at least every hour. A run whose directory is missing
(a new machine) is restored from that copy and resumed there; a run started again from step 0 behind a longer record
carries its own in <run>/restart/ until it passes it. Once a run has finished, its checkpoints leave results/ and
only the record stays, with final.pt (the tested weights) where it is under FINAL_KEPT_BYTES. Each run checkpoints
every 250 steps. Runs use one torch thread each; `--jobs 2` runs two side by side (on two cores that is the
throughput-best arrangement: the fused kernels' thread team loses more to a busy neighbour than a second thread
gains). A PTB run, whose 58 MB checkpoint is too large to carry, runs alone on both cores (`--jobs 1
--threads 2`) to finish in one sitting. The thread count is part of a run's numbers (the matrix products split their
sums by it; see the README's *Same seed, same numbers*), so it is in each run's config.yaml and a resume keeps it
unless `--threads` is given. Everything runs under `nice` so that interactive work keeps the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "runs" / "paper_curves"
TANH_RESULTS = REPO / "results" / "runs" / "tanh_question"  # the tanh_* runs
RECORD = ("metrics.csv", "summary.json", "config.yaml", "train.log", "pixel_order.json", "resumes.yaml")
CARRIED = ("last.pt", "best.pt")  # what an unfinished run needs to go on elsewhere, committed beside its record
# A larger checkpoint is not carried: the campaign may add about 80 MB of checkpoints to the repository's history in
# all, and a PTB run at hidden 1000 has 58 MB (weights and Adam's moments), so it finishes in one sitting instead.
CARRIED_MAX_BYTES = 10_000_000
# A run started again from step 0 while a longer record of it stays (its checkpoints were lost once) carries its own
# record and checkpoints here, inside the longer record's directory, until it passes that record.
RESTART = "restart"
# final.pt stays in results/ when at most this large: the LSTMs and the tanh question's RNNs (1.3 MB with batch norm,
# 2.6 MB for bn_linear_rnn2), whose gradient after training `tanh_gradients.py` measures; not the BN-LSTMs' 6 MB.
FINAL_KEPT_BYTES = 3_000_000
# Only the step counts and the validation cadence differ from the paper_* presets.
COMMON = ["logger=csv", "trainer.checkpoint_every=250", "seed=1"]  # with trainer.threads=<--threads, default 1>
MNIST = ["trainer.log_every=50", "trainer.eval_every=250"]
# pMNIST validation (all 10,000 images through 784 steps) costs minutes: every 500 steps still draws the curve.
PMNIST = ["trainer.log_every=50", "trainer.eval_every=500"]
RUNS: dict[str, list[str]] = {
    # Figure 2, permuted MNIST with the authors' order (their Table 1 task): read at 10k and 20k steps.
    "pmnist_lstm_authors_s1": ["experiment=paper_pmnist", "model=lstm", "trainer.max_steps=20000", *PMNIST],
    "pmnist_bn_lstm_authors_s1": ["experiment=paper_pmnist", "model=bn_lstm", "trainer.max_steps=20000", *PMNIST],
    # Figure 3a, PTB at hidden 1000: read at 800, 4k and 8k steps; validated every 400 on the whole split. No final
    # test (a re-estimation pass over the training set, then the test split as one sequence): the BN-LSTM's run had
    # to drop it to end within the sitting its uncarried checkpoints allow, the pair is compared on the same
    # validation curves, and Table 2's numbers are of 39,200 steps anyway.
    "ptb_lstm_s1": ["experiment=paper_ptb", "model=lstm", "trainer.max_steps=8000", "trainer.eval_every=400",
                    "trainer.log_every=50", "trainer.final_test=false"],
    "ptb_bn_lstm_s1": ["experiment=paper_ptb", "model=bn_lstm", "trainer.max_steps=8000", "trainer.eval_every=400",
                       "trainer.log_every=50", "trainer.final_test=false"],
    # The tanh question on pMNIST with a true permutation (a linear classifier's ceiling is then order-free). The
    # tanh RNN finished (validated every 250 steps); the others validate every 500.
    "tanh_pmnist_rnn_s1": ["experiment=paper_pmnist", "model=rnn", "task.permutation=random",
                           "trainer.max_steps=20000", *MNIST],
    **{
        f"tanh_pmnist_{model}_s1": ["experiment=paper_pmnist", f"model={model}", "task.permutation=random",
                                    "trainer.max_steps=20000", *PMNIST]
        for model in ("bn_rnn", "bn_linear_rnn", "ln_rnn", "bn_linear_rnn2")  # the last: the way out, tanh between
    },
    # Figure 2, sequential MNIST (finished): the paper's BN-LSTM is above 0.95 by about 10k steps.
    "smnist_lstm_s1": ["experiment=paper_smnist", "model=lstm", "trainer.max_steps=10000", *MNIST],
    "smnist_bn_lstm_s1": ["experiment=paper_smnist", "model=bn_lstm", "trainer.max_steps=10000", *MNIST],
}


def campaign_dir() -> Path:
    return Path(os.environ.get("RBN_CAMPAIGN_DIR", REPO.parent / "rbn_campaign")).expanduser().absolute()


def state(run_dir: Path) -> tuple[str, int]:
    """("finished" | "failed" | "partial" | "missing", last recorded step)."""
    summary = run_dir / "summary.json"
    steps = 0
    if (run_dir / "metrics.csv").exists():
        with (run_dir / "metrics.csv").open(newline="") as handle:
            steps = max((int(row["step"]) for row in csv.DictReader(handle) if row["split"] == "train"), default=0)
    if summary.exists():
        status = json.loads(summary.read_text()).get("status")
        if status == "completed":
            return "finished", steps
        if status in ("failed", "diverged"):
            return "failed", steps
    if (run_dir / "last.pt").exists():
        return "partial", steps
    return "missing", steps


def running_pid(run_dir: Path) -> int | None:
    """The pid of a live process this campaign started in `run_dir`, if any (two writers must never share one)."""
    try:
        pid = int((run_dir / "campaign.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    return pid if str(run_dir) in cmdline else None  # a recycled pid belongs to something else


def command(name: str, run_dir: Path, threads: int | None = None) -> list[str]:
    """The trainer's command line: a new run on `threads` (default 1), or a resume on the run's own thread count
    unless `threads` is given."""
    base = [sys.executable, "-m", "recurrent_bn.train"]
    if (run_dir / "last.pt").exists():
        return [*base, f"resume={run_dir}", *([f"trainer.threads={threads}"] if threads else [])]
    return [*base, *RUNS[name], *COMMON, f"trainer.threads={threads or 1}", f"hydra.run.dir={run_dir}"]


def run_threads(run_dir: Path) -> int:
    """The thread count a run was started with (its config.yaml), 1 where it does not say."""
    try:
        return int(OmegaConf.load(run_dir / "config.yaml").trainer.threads or 1)
    except Exception:  # noqa: BLE001 - no readable config: the campaign's default
        return 1


def collected(name: str) -> Path:
    return (TANH_RESULTS if name.startswith("tanh_") else RESULTS) / name


def recorded(name: str) -> tuple[str, int]:
    """The state of the run's record committed under results/ (it outlives the run directory; an unfinished record
    is "partial", whether it carries a checkpoint or, from before checkpoints were carried, not)."""
    record_state, steps = state(collected(name))
    return ("partial" if record_state == "missing" and steps else record_state), steps


def copy_record(source: Path, target: Path, files: tuple[str, ...]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        if (source / file).exists():
            shutil.copy2(source / file, target / file)
    if (source / ".hydra").exists():
        shutil.copytree(source / ".hydra", target / ".hydra", dirs_exist_ok=True)


def restore(name: str, run_dir: Path) -> bool:
    """Lay out a run from the checkpoint committed beside its record, when the run directory has none (a new
    machine, or a lost directory); True if it did. The trainer drops the record's rows past the checkpoint's step."""
    record = collected(name)
    if not (record / "last.pt").exists():
        record = record / RESTART  # a run started again behind a longer record
    if (run_dir / "last.pt").exists() or not (record / "last.pt").exists():
        return False
    if run_dir.exists():
        shutil.rmtree(run_dir)
    copy_record(record, run_dir, RECORD + CARRIED)
    print(f"{name}: restored from {record.relative_to(REPO)} (checkpoint committed in the repository)", flush=True)
    return True


def launch(name: str, root: Path, threads: int | None = None) -> subprocess.Popen:
    run_dir = root / name
    restore(name, run_dir)
    run_state, steps = state(run_dir)
    if run_state == "missing" and run_dir.exists():
        print(f"{name}: {run_dir} has no checkpoint; starting it again from step 0", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = command(name, run_dir, threads)
    print(f"{name}: {'resuming at step ' + str(steps) if run_state == 'partial' else 'starting'}: "
          f"{' '.join(argv[1:])}", flush=True)
    team = threads or (run_threads(run_dir) if run_state == "partial" else 1)
    # The runs import this checkout's package (not whichever one the interpreter has installed), so that a campaign
    # started from a frozen copy of the repository is not changed by edits to another.
    environment = {**os.environ, "OMP_NUM_THREADS": str(team), "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": str(REPO / "src")}
    log = (run_dir / "campaign.log").open("a")
    process = subprocess.Popen(["nice", "-n", "19", *argv], cwd=REPO, env=environment, stdout=log, stderr=log)
    (run_dir / "campaign.pid").write_text(str(process.pid))
    return process


def run_all(root: Path, names: list[str], jobs: int, threads: int | None = None) -> int:
    busy = {n: running_pid(root / n) for n in names if running_pid(root / n)}
    for name, pid in busy.items():
        print(f"{name}: already running (pid {pid}); left alone", flush=True)
    # A run whose directory is gone but whose committed record says finished is not run again.
    done = {n for n in names if state(root / n)[0] != "finished" and recorded(n)[0] == "finished"}
    pending = [n for n in names if state(root / n)[0] in ("missing", "partial") and n not in set(busy) | done]
    for name in names:
        if name in done:
            print(f"{name}: finished (its record is in {collected(name).relative_to(REPO)}), skipped", flush=True)
        elif state(root / name)[0] == "finished":
            print(f"{name}: finished, skipped", flush=True)
        elif state(root / name)[0] == "failed":
            print(f"{name}: failed (see {root / name / 'summary.json'}); not restarted", flush=True)
    running: dict[str, subprocess.Popen] = {}
    failures = 0
    while pending or running or busy:
        for name in [n for n in busy if not running_pid(root / n)]:  # started by an earlier call, now done
            del busy[name]
            collect(root, [name])
        while pending and len(running) + len(busy) < jobs:
            name = pending.pop(0)
            running[name] = launch(name, root, threads)
        time.sleep(5)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                print(f"{name}: exited {process.returncode}, now {state(root / name)[0]}", flush=True)
                failures += process.returncode != 0
                collect(root, [name])
    return 1 if failures else 0


def carry(name: str, source: Path, target: Path) -> bool:
    """Copy an unfinished run's record with its checkpoints, or without them where last.pt is larger than
    CARRIED_MAX_BYTES (then any carried before go too: they would resume the run from an older step); True if the
    checkpoints went with it."""
    last = source / "last.pt"
    small = not last.exists() or last.stat().st_size <= CARRIED_MAX_BYTES
    copy_record(source, target, RECORD + (CARRIED if small else ()))
    if not small:
        for file in CARRIED:
            (target / file).unlink(missing_ok=True)
        print(f"{name}: its checkpoints ({last.stat().st_size / 1e6:.0f} MB) are too large to carry in the repository "
              f"and stay in {source}: finish the run in one sitting, alone on the machine (--jobs 1)", flush=True)
    return small


def collect(root: Path, names: list[str]) -> None:
    """Copy each run's record into results/runs/paper_curves/<name>/ (tanh_question/ for tanh_*), with its
    checkpoints while it is unfinished; a finished run's checkpoints leave results/ (final.pt stays if small)."""
    for name in names:
        source = root / name
        if not source.exists():
            continue
        target = collected(name)
        (run_state, ours), (kept_state, kept) = state(source), recorded(name)
        if (kept_state == "finished" and run_state != "finished") or kept > ours:
            # A run started again from step 0 (its directory was lost) must not replace a longer record; while it is
            # behind an unfinished one, it carries its checkpoints in restart/, so that it is not lost again.
            carried = kept_state != "finished" and run_state == "partial" and carry(name, source, target / RESTART)
            print(f"{name}: kept the record in {target.relative_to(REPO)} (step {kept}); this run is at step {ours}"
                  f"{f', carried in {RESTART}/' if carried else ''}", flush=True)
            continue
        shutil.rmtree(target / RESTART, ignore_errors=True)
        if run_state == "finished":
            copy_record(source, target, RECORD)
            for file in CARRIED:
                (target / file).unlink(missing_ok=True)
            final = source / "final.pt"
            if final.exists() and final.stat().st_size <= FINAL_KEPT_BYTES:
                shutil.copy2(final, target / "final.pt")
        else:
            carry(name, source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one torch thread each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: 1 for a new run, the run's own for a resume; a PTB "
                             "run alone: --jobs 1 --threads 2)")
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of: {' '.join(RUNS)}")
    parser.add_argument("--status", action="store_true", help="print each run's state and stop")
    parser.add_argument("--collect", action="store_true",
                        help="copy the records (and unfinished runs' checkpoints) into results/ and stop")
    args = parser.parse_args()
    names = args.only or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    root = campaign_dir()
    if args.status:
        for name in names:
            run_state, steps = state(root / name)
            run_state = "running" if running_pid(root / name) else run_state
            target = next((o.split("=")[1] for o in RUNS[name] if o.startswith("trainer.max_steps=")), "?")
            kept_state, kept = recorded(name)
            print(f"{name:32s} {run_state:9s} step {steps:>6} of {target}   record in results/: {kept_state} "
                  f"at step {kept}")
        return 0
    if args.collect:
        collect(root, names)
        print(f"copied the records of {root} into {RESULTS.relative_to(REPO)} and {TANH_RESULTS.relative_to(REPO)}")
        return 0
    print(f"campaign directory: {root}", flush=True)
    return run_all(root, names, args.jobs, args.threads)


if __name__ == "__main__":
    sys.exit(main())
