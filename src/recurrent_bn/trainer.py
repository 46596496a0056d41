"""The training loop shared by every task and model: optimise, evaluate, checkpoint, log, and test at the end.

One plain loop (nanoGPT's shape): a training step, a train row in metrics.csv every `log_every` steps, a validation
every `eval_every` (population statistics: the moving averages, or re-estimated), `last.pt` every `checkpoint_every`
and on SIGTERM/SIGINT, `best.pt` when the validation metric improves. At the end the best checkpoint is tested after
its population statistics are re-estimated over the training set, as the paper reports its numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from recurrent_bn import __version__
from recurrent_bn.config import CONF_DIR, validate
from recurrent_bn.errors import ConfigError, UserError
from recurrent_bn.layers import estimate_population_statistics
from recurrent_bn.logs import MetricsCSV, WandbRun, write_json
from recurrent_bn.models import build_model
from recurrent_bn.norm import batch_norms
from recurrent_bn.optim import make_optimizer, make_scheduler
from recurrent_bn.provenance import git_commit
from recurrent_bn.run_dir import claim, is_disk_full, remove_temporaries
from recurrent_bn.tasks import Task

log = logging.getLogger("recurrent_bn")

PAPER_SCALE_SECONDS = 3600  # a CPU run estimated to take longer than this gets pointed to the cpu_* preset
# torch.compile unrolls the whole time loop: its cold compile took 27 / 41 / 85 s at T = 10 / 20 / 40 here, growing
# faster than linearly (public reports: about five hours at T = 1500). Longer sequences are refused.
COMPILE_MAX_STEPS = 64


class Diverged(UserError):
    """The loss or the gradient became NaN or infinite."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here: use trainer.device=auto or cpu")
    return device


def save_atomic(content: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    temporary = path.with_suffix(".tmp")
    try:
        try:
            torch.save(content, temporary)
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - whatever torch's writer raised, the plain write below says why
            # torch's zip writer reports a failed write as a RuntimeError ("[enforce fail at inline_container.cc]
            # unexpected pos ..."), which hides a full disk from `is_disk_full`. Serialize in memory and write the
            # bytes with plain OS writes: a full disk then raises OSError(ENOSPC), and a passing hiccup saves.
            buffer = io.BytesIO()
            torch.save(content, buffer)
            with open(temporary, "wb") as file:
                file.write(buffer.getbuffer())
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    os.replace(temporary, path)


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step (clusters preempt jobs)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))  # a second signal is not delayed

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Window:
    """Sums over the steps since the last train row, kept on the device so that the loop never waits for it."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, metric numerator, grad norm
        self.count = 0
        self.steps = 0
        self.sequences = 0
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, metric: torch.Tensor, grad_norm: torch.Tensor, *, count: int, sequences: int):
        self.sums += torch.stack([loss.detach().double() * count, metric.detach().double(),
                                  grad_norm.detach().double()])
        self.count += count
        self.steps += 1
        self.sequences += sequences

    def values(self) -> list[float]:
        return self.sums.tolist()

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "count": self.count, "steps": self.steps, "sequences": self.sequences,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(self.sums.device)
        self.count, self.steps = int(state["count"]), int(state["steps"])
        self.sequences, self.seconds = int(state["sequences"]), float(state["seconds"])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def estimated_statistics(model: torch.nn.Module, inputs):
    """Inside the block the batch norms use population statistics re-estimated from `inputs`; afterwards their
    moving averages are restored, so training continues exactly as without the block."""
    norms = batch_norms(model)
    saved = [[buffer.clone() for buffer in norm.buffers()] for norm in norms]
    if norms:
        estimate_population_statistics(model, inputs)
    try:
        yield
    finally:
        for norm, buffers in zip(norms, saved, strict=True):
            for buffer, value in zip(norm.buffers(), buffers, strict=True):
                buffer.copy_(value)


def validate_once(task: Task, model: torch.nn.Module, trainer_cfg: DictConfig) -> dict:
    """Score the validation split with the statistics `trainer.valid_statistics` names: "batch" (the authors'
    curves and model selection: the training graph, in batches of the training size), "moving_average" (the
    population statistics as trained) or "estimated" (re-estimated over training batches, then restored)."""
    batches = trainer_cfg.eval_batches
    if trainer_cfg.valid_statistics == "batch":
        train_cfg = task.cfg
        seq_len = train_cfg.seq_len if task.kind == "language_model" else None
        return task.evaluate(model, task.batches("valid", batches, seq_len=seq_len, batch_size=train_cfg.batch_size),
                             statistics="batch")
    statistics = contextlib.nullcontext()
    if trainer_cfg.valid_statistics == "estimated":
        inputs = task.estimation_inputs(trainer_cfg.estimate_batches, trainer_cfg.estimate_batch_size)
        statistics = estimated_statistics(model, inputs)
    with statistics:
        return task.evaluate(model, task.batches("valid", batches))


def training_step(parts: Parts, step_model: torch.nn.Module, autocast, clip_grad_norm: float | None) -> None:
    """One optimizer step on the next training batch; its loss, metric and gradient norm go to the window."""
    x, y = parts.task.train.next()
    with autocast:
        loss, metric, count = parts.task.loss(step_model, x, y)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), clip_grad_norm or float("inf"))
    parts.optimizer.step()
    parts.scheduler.step()
    parts.window.add(loss, metric, grad_norm, count=count, sequences=x.shape[1])


def keep_if_best(run: Run, result: dict, progress: Progress, model: torch.nn.Module) -> None:
    """best.pt when the selected quantity improved (higher accuracy, lower bpc or error rate)."""
    task, select_key = run.task, run.select_key
    value, best = result[select_key], progress.best
    higher_is_better = task.higher_is_better and select_key == task.metric
    if best is None or (value > best if higher_is_better else value < best):
        progress.best, progress.best_step, progress.best_metric = value, progress.step, result[task.metric]
        save_atomic({"model": model.state_dict(), "step": progress.step, "metric": value}, run.best_path)


class ScaleWarning:
    """Say once, after a few timed steps, that a CPU run will take hours, and point to the task's cpu_* preset."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.on_cpu = cfg, device.type == "cpu"
        self.start: tuple[int, float] | None = None
        self.done = not self.on_cpu

    def tick(self, step: int, max_steps: int) -> None:
        if self.done:
            return
        if self.start is None:
            if step >= 3:
                self.start = (step, time.time())
            return
        if step - self.start[0] < 10:
            return
        self.done = True
        seconds_per_step = (time.time() - self.start[1]) / (step - self.start[0])
        remaining = seconds_per_step * (max_steps - step)
        if remaining <= PAPER_SCALE_SECONDS:
            return
        task = self.cfg.task.name
        preset = f"experiment=cpu_{task}"
        if (CONF_DIR / "experiment" / f"cpu_{task}.yaml").exists():
            hint = f"for a CPU-sized run use {preset} (make train TASK={task} ARGS={preset})"
        else:
            hint = "lower trainer.max_steps or model.hidden_size for a CPU-sized run"
        log.warning("paper-scale run on a CPU: about %.1f hours for %d more steps at %.2f s/step; %s",
                    remaining / 3600, max_steps - step, seconds_per_step, hint)


def check_compile(compile_mode, steps: int) -> None:
    """Refuse `trainer.compile` for sequences it would spend hours compiling, in one line."""
    if compile_mode and steps > COMPILE_MAX_STEPS:
        raise ConfigError(
            f"trainer.compile unrolls all {steps} timesteps and would compile for a very long time (85 s at T = 40); "
            f"it is allowed up to {COMPILE_MAX_STEPS} steps: set trainer.compile=false"
        )


@dataclass
class Progress:
    """Where a run is, carried by last.pt: the step, what it selected so far, its time and its wandb id."""

    step: int = 0
    best: float | None = None  # the selected quantity (`select_by`) at best.pt
    best_metric: float | None = None  # the task metric at best.pt
    best_step: int | None = None
    elapsed_before: float = 0.0
    wandb_id: str | None = None
    saved_step: int | None = None  # the step of the last.pt on disk, for messages after a failure


@dataclass
class Parts:
    """What a training step changes, saved and restored together."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task: Task
    window: Window


@dataclass(frozen=True)
class Run:
    """What one run fixes at its start and the loop's helpers read: its config, directory, data and device, and
    the quantity that selects best.pt."""

    cfg: DictConfig
    run_dir: Path
    task: Task
    device: torch.device
    select_key: str  # the task metric, or "error" (the authors' choice): `trainer.select_by`

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"


def set_up_runtime(trainer_cfg: DictConfig) -> torch.device:
    device = pick_device(str(trainer_cfg.device))
    if trainer_cfg.threads:
        torch.set_num_threads(trainer_cfg.threads)
    if device.type == "cpu":
        # Vanishing gradients through hundreds of steps produce denormal floats, which x86 CPUs process many times
        # slower than normal ones; flushing them to zero changes nothing measurable in training.
        torch.set_flush_denormal(True)
    with contextlib.suppress(ImportError):
        from recurrent_bn.malloc import tune_malloc

        tune_malloc()
    return device


def load_task(cfg: DictConfig, device: torch.device) -> Task:
    """The task's data; a value the data cannot serve (a batch larger than a split) is a config error."""
    try:
        return Task(cfg.task, device, seed=cfg.seed, data_root=cfg.data.root, verify=cfg.data.verify,
                    download=cfg.data.download)
    except PermissionError as error:
        raise UserError(f"cannot read {error.filename}: permission denied; make it readable, or set data.root "
                        "(or $RBN_DATA_ROOT) to a copy you can read") from None
    except ValueError as error:
        message = str(error)
        raise ConfigError(f"task.{message}" if "=" in message.split(" ", 1)[0] else f"task: {message}") from None


def save_checkpoint(run: Run, parts: Parts, progress: Progress, elapsed: float) -> None:
    """last.pt: everything a resume needs to continue exactly, with the resolved config."""
    save_atomic({
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "data": parts.task.train.state_dict(),
        "window": parts.window.state_dict(), "rng": _rng_state(), "step": progress.step, "best": progress.best,
        "best_metric": progress.best_metric, "best_step": progress.best_step, "elapsed_s": elapsed,
        "wandb_id": progress.wandb_id, "config": OmegaConf.to_yaml(run.cfg, resolve=True),
    }, run.last_path)
    progress.saved_step = progress.step


def load_checkpoint(path: Path, parts: Parts, device: torch.device, progress: Progress) -> None:
    """Restore `parts` and `progress` from last.pt; a file that is not a checkpoint of this run is one line, not a
    traceback."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        parts.model.load_state_dict(checkpoint["model"])
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        parts.task.train.load_state_dict(checkpoint["data"])
        parts.window.load_state_dict(checkpoint["window"])
        _set_rng_state(checkpoint["rng"])
    except Exception as error:  # noqa: BLE001 - truncated, foreign or crafted files all end the same way
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path} is not a readable checkpoint of this run ({type(error).__name__}: {first[:200]}); "
                        "restore it from a copy, or start a new run") from None
    progress.step = progress.saved_step = int(checkpoint["step"])
    progress.best, progress.best_step = checkpoint["best"], checkpoint["best_step"]
    progress.best_metric = checkpoint.get("best_metric", checkpoint["best"])
    progress.elapsed_before, progress.wandb_id = float(checkpoint["elapsed_s"]), checkpoint.get("wandb_id")


def write_run_files(run: Run) -> None:
    (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    if run.task.order is not None:
        write_json(run.run_dir / "pixel_order.json",
                   {"permutation": run.cfg.task.permutation, "order": run.task.order.tolist()})


def first_summary(run: Run, progress: Progress, config_dict: dict) -> dict:
    cfg = run.cfg
    return {
        "status": "running", "task": cfg.task.name, "model": cfg.model.name, "metric": run.task.metric,
        "selected_by": run.select_key, "valid_statistics": cfg.trainer.valid_statistics,
        "best_valid_metric": progress.best_metric, "best_valid_selected": progress.best,
        "best_step": progress.best_step, "test_metric": None, "steps": progress.step,
        "device": str(run.device), "torch_version": torch.__version__, "recurrent_bn_version": __version__,
        "git_commit": git_commit(), "run_dir": str(run.run_dir), "config": config_dict,
    }


def finished_already(run_dir: Path, max_steps: int) -> dict | None:
    """The summary of a completed run that a resume would not extend (nothing to do), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") == "completed" and int(summary.get("steps") or 0) >= max_steps:
        return summary
    return None


def check_finite(run: Run, window: Window, step: int, progress: Progress) -> list[float]:
    values = window.values()
    if not all(math.isfinite(v) for v in values):
        first = step - window.steps + 1
        where = f"at step {step}" if first == step else f"between steps {first} and {step}"
        if progress.saved_step is not None:
            kept = f"{run.last_path} (step {progress.saved_step}) holds the last good checkpoint"
        else:
            kept = f"no checkpoint was written yet (the first was due at step {run.cfg.trainer.checkpoint_every})"
        raise Diverged(f"loss or gradient became non-finite {where}; {kept}: try a smaller optim.lr or "
                       "trainer.clip_grad_norm")
    return values


def train_row(task: Task, window: Window, *, step: int, lr: float, elapsed: float) -> dict:
    loss_sum, metric_sum, grad_sum = window.values()
    return {"step": step, "split": "train", **task.summarize(loss_sum, metric_sum, window.count),
            "grad_norm": grad_sum / window.steps, "lr": lr, "elapsed_s": elapsed,
            "seq_per_s": window.sequences / max(window.seconds, 1e-9)}


def disk_full_message(run_dir: Path, progress: Progress) -> str:
    kept = (f"last.pt of step {progress.saved_step}" if progress.saved_step is not None else "no checkpoint yet")
    return (f"the disk holding {run_dir} is full (stopped at step {progress.step}); kept: {kept}, metrics.csv as far "
            f"as written; free space (or copy the directory to a larger disk), then: "
            f"python -m recurrent_bn.train resume={run_dir}")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (or, with `cfg.resume`, continue) one run in `run_dir`; return its summary (also in summary.json)."""
    validate(cfg)
    check_compile(cfg.trainer.compile, int(cfg.task.steps))
    run_dir = Path(run_dir)
    with claim(run_dir):
        last_path = run_dir / "last.pt"
        resumed = bool(cfg.resume) and last_path.exists()
        done = finished_already(run_dir, cfg.trainer.max_steps) if resumed else None
        if done is not None:
            log.warning("%s is finished (step %s of trainer.max_steps=%d); nothing to do. To train it further, "
                        "resume with a larger trainer.max_steps", run_dir, done.get("steps"), cfg.trainer.max_steps)
            return done
        progress = Progress()
        try:
            return _train(cfg, run_dir, resumed, progress)
        except OSError as error:
            if not is_disk_full(error):
                raise
            remove_temporaries(run_dir)
            raise UserError(disk_full_message(run_dir, progress)) from None


def _train(cfg: DictConfig, run_dir: Path, resumed: bool, progress: Progress) -> dict:
    trainer_cfg = cfg.trainer
    device = set_up_runtime(trainer_cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)  # before the data: a bad or oversized model stops at once
    task = load_task(cfg, device)
    optimizer = make_optimizer(cfg.optim, model.parameters())
    parts = Parts(model, optimizer, make_scheduler(cfg.optim, optimizer, trainer_cfg.max_steps), task, Window(device))
    amp = trainer_cfg.amp in (True, "bf16")
    if amp and device.type != "cuda":
        log.warning("trainer.amp is for CUDA devices; running in float32 on %s", device)
        amp = False
    step_model = model
    if trainer_cfg.compile:
        step_model = torch.compile(model, mode=None if trainer_cfg.compile == "default" else trainer_cfg.compile)
    # The checkpoint kept for the test: the best task metric, or the lowest error rate (the authors' choice).
    run = Run(cfg, run_dir, task, device, select_key=task.metric if trainer_cfg.select_by == "metric" else "error")
    if resumed:
        load_checkpoint(run.last_path, parts, device, progress)
        log.info("resuming %s at step %d", run_dir, progress.step)
    write_run_files(run)

    # A resume redoes the steps after its checkpoint, and the test at the end: their old rows go.
    metrics = MetricsCSV(run_dir / "metrics.csv", keep_through_step=progress.step if cfg.resume else None,
                         drop_splits_starting="test")
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    wandb_run = WandbRun(cfg.logger, config_dict, run_dir, f"{cfg.task.name}-{cfg.model.name}-{run_dir.name}",
                         run_id=progress.wandb_id)
    progress.wandb_id = wandb_run.id
    summary = first_summary(run, progress, config_dict)
    session_start = time.time()

    def elapsed() -> float:
        return progress.elapsed_before + time.time() - session_start

    def write(row: dict) -> None:
        metrics.write(row)
        wandb_run.log(row)

    status, error = "completed", None
    bar = tqdm(total=trainer_cfg.max_steps, initial=progress.step, disable=None, unit="step", dynamic_ncols=True,
               desc=f"{cfg.task.name}/{cfg.model.name}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    timer = ScaleWarning(cfg, device)
    model.train()
    try:
        with StopSignal() as stop:
            window_clock = time.time()
            while progress.step < trainer_cfg.max_steps:
                training_step(parts, step_model, autocast, trainer_cfg.clip_grad_norm)
                progress.step += 1
                step, last_step = progress.step, progress.step == trainer_cfg.max_steps
                bar.update(1)
                timer.tick(step, trainer_cfg.max_steps)

                # a train row
                if step % trainer_cfg.log_every == 0 or last_step:
                    check_finite(run, parts.window, step, progress)
                    parts.window.seconds += time.time() - window_clock
                    row = train_row(task, parts.window, step=step, lr=parts.scheduler.get_last_lr()[0],
                                    elapsed=elapsed())
                    write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", **{task.metric: f"{row[task.metric]:.4f}"},
                                    seq_s=f"{row['seq_per_s']:.0f}")
                    parts.window, window_clock = Window(device), time.time()

                # validation, and best.pt when the selected quantity improves
                if step % trainer_cfg.eval_every == 0 or last_step:
                    eval_start = time.time()
                    with autocast:
                        result = validate_once(task, model, trainer_cfg)
                    write({"step": step, "split": "valid", **result, "elapsed_s": elapsed()})
                    log.info("step %d | valid loss %.4f %s %.4f error %.4f | %.0f s", step, result["loss"],
                             task.metric, result[task.metric], result["error"], elapsed())
                    keep_if_best(run, result, progress, model)
                    summary.update(best_valid_metric=progress.best_metric, best_valid_selected=progress.best,
                                   best_step=progress.best_step, steps=step)
                    window_clock += time.time() - eval_start  # throughput counts training time only

                # last.pt, and a clean stop on SIGTERM/SIGINT
                if stop.requested or step % trainer_cfg.checkpoint_every == 0 or last_step:
                    check_finite(run, parts.window, step, progress)
                    save_checkpoint(run, parts, progress, elapsed())
                if stop.requested:
                    status = "interrupted"
                    log.warning("%s: stopped at step %d; continue with: python -m recurrent_bn.train resume=%s",
                                stop.requested, step, run_dir)
                    break
        bar.close()
        if status == "completed" and trainer_cfg.final_test:
            summary.update(final_test(run, model, write=write, autocast=autocast))
    except Diverged as diverged:
        status, error = "diverged", str(diverged)
        raise
    except BaseException as failure:
        status, error = "failed", f"{type(failure).__name__}: {failure}"
        if is_disk_full(failure):
            error = disk_full_message(run_dir, progress)
        raise
    finally:
        bar.close()
        summary.update(status=status, error=error, steps=progress.step, wall_time_s=elapsed())
        close_records(run_dir, metrics, wandb_run, summary=summary, status=status)
    return summary


def close_records(run_dir: Path, metrics: MetricsCSV, wandb_run: WandbRun, *, summary: dict, status: str) -> None:
    """Close metrics.csv, write summary.json and finish wandb, each on its own: one failing (a full disk) neither
    hides the others nor the error that ended the run."""
    with contextlib.suppress(OSError):
        metrics.close()
    try:
        write_json(run_dir / "summary.json", summary)
    except OSError as error:
        remove_temporaries(run_dir)
        log.error("summary.json could not be written (%s)", error.strerror or error)
    wandb_run.finish(summary, exit_code=0 if status in ("completed", "interrupted") else 1)


def final_test(run: Run, model: torch.nn.Module, *, write, autocast) -> dict:
    """Test the best checkpoint after re-estimating its population statistics over the training set (the paper's
    protocol); save the re-estimated model as final.pt."""
    cfg, task = run.cfg, run.task
    best_step = None
    if run.best_path.exists():
        best = torch.load(run.best_path, map_location=task.device, weights_only=True)
        model.load_state_dict(best["model"])
        best_step = int(best["step"])
    estimated = 0
    if batch_norms(model):
        with autocast:
            inputs = task.estimation_inputs(cfg.trainer.estimate_batches, cfg.trainer.estimate_batch_size)
            estimated = estimate_population_statistics(model, inputs)
    save_atomic({"model": model.state_dict(), "step": best_step, "estimated_batches": estimated},
                run.run_dir / "final.pt")
    step = best_step or 0
    out = {"test_step": best_step, "estimation_batches": estimated}
    if task.kind == "language_model":
        # The authors' protocol: the main number reads the whole test split as one sequence (state carried,
        # T_max's statistics past T_max); segments of fixed lengths (in characters, as the training segments),
        # state reset, are reported beside it.
        for length in task.cfg.test_lengths:
            if length > len(task.splits["test"]):
                log.warning("test on segments of %d skipped: the test split has %d characters",
                            length, len(task.splits["test"]))
                continue
            with autocast:
                piece = task.evaluate(model, task.batches("test", seq_len=length))
            write({"step": step, "split": f"test_len{length}", **piece})
            out[f"test_len{length}_bpc"] = piece["bpc"]
            log.info("test on subsequences of %d: bpc %.4f", length, piece["bpc"])
        with autocast:
            result = task.evaluate_stream(model, "test")
        out["test_stream_bpc"] = result["bpc"]
        out["test_protocol"] = f"whole split as {task.cfg.eval_streams} sequence(s), state carried"
    else:
        with autocast:
            result = task.evaluate(model, task.batches("test"))
        out["test_protocol"] = ("test set, population statistics re-estimated over the training set"
                                if batch_norms(model) else "test set")
    write({"step": step, "split": "test", **result})
    statistics = f", statistics from {estimated} training batches" if batch_norms(model) else ""
    log.info("test (best checkpoint, step %s%s): loss %.4f %s %.4f", best_step, statistics, result["loss"],
             task.metric, result[task.metric])
    out.update(test_metric=result[task.metric], test_loss=result["loss"])
    return out
