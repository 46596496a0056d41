"""The training loop shared by every task and model: optimise, evaluate, checkpoint, log, and test at the end.

One plain loop (nanoGPT's shape): a training step, a train row in metrics.csv every `log_every` steps, a validation
every `eval_every` (population statistics: the moving averages, or re-estimated), `last.pt` every `checkpoint_every`
and on SIGTERM/SIGINT, `best.pt` when the validation metric improves. At the end the best checkpoint is tested after
its population statistics are re-estimated over the training set, as the paper reports its numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from recurrent_bn import __version__
from recurrent_bn.config import CONF_DIR, validate
from recurrent_bn.errors import UserError
from recurrent_bn.layers import estimate_population_statistics
from recurrent_bn.logs import MetricsCSV, WandbRun, write_json
from recurrent_bn.models import build_model
from recurrent_bn.norm import batch_norms
from recurrent_bn.optim import make_optimizer, make_scheduler
from recurrent_bn.tasks import Task

log = logging.getLogger("recurrent_bn")

PAPER_SCALE_SECONDS = 3600  # a CPU run estimated to take longer than this gets pointed to the cpu_* preset


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
    torch.save(content, temporary)
    os.replace(temporary, path)


def git_commit() -> str | None:
    try:
        repository = CONF_DIR.parent
        commit = subprocess.run(["git", "-C", str(repository), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repository), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return None


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

    def add(self, loss: torch.Tensor, metric: torch.Tensor, grad_norm: torch.Tensor, count: int, sequences: int):
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
        statistics = estimated_statistics(model, task.estimation_inputs(trainer_cfg.estimate_batches))
    with statistics:
        return task.evaluate(model, task.batches("valid", batches))


def _improved(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def _warn_if_paper_scale(cfg: DictConfig, seconds_per_step: float, remaining_steps: int) -> None:
    """Say once that a run will take hours on this CPU, and point to the task's cpu_* preset."""
    remaining = seconds_per_step * remaining_steps
    if remaining <= PAPER_SCALE_SECONDS:
        return
    preset = f"experiment=cpu_{cfg.task.name}"
    if (CONF_DIR / "experiment" / f"cpu_{cfg.task.name}.yaml").exists():
        hint = f"for a CPU-sized run use {preset} (make train TASK={cfg.task.name} ARGS={preset})"
    else:
        hint = "lower trainer.max_steps or model.hidden_size for a CPU-sized run"
    log.warning("paper-scale run on a CPU: about %.1f hours for %d more steps at %.2f s/step; %s",
                remaining / 3600, remaining_steps, seconds_per_step, hint)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (or, with `cfg.resume`, continue) one run in `run_dir`; return its summary (also in summary.json)."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer_cfg = cfg.trainer
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
    torch.manual_seed(cfg.seed)
    task = Task(cfg.task, device, seed=cfg.seed, data_root=cfg.data.root, verify=cfg.data.verify)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(cfg.optim, model.parameters())
    scheduler = make_scheduler(cfg.optim, optimizer, trainer_cfg.max_steps)
    amp = trainer_cfg.amp in (True, "bf16")
    if amp and device.type != "cuda":
        log.warning("trainer.amp is for CUDA devices; running in float32 on %s", device)
        amp = False
    step_model = model
    if trainer_cfg.compile:
        step_model = torch.compile(model, mode=None if trainer_cfg.compile == "default" else trainer_cfg.compile)

    # The checkpoint kept for the test: the best task metric, or the lowest error rate (the authors' choice).
    select_key = task.metric if trainer_cfg.select_by == "metric" else "error"
    higher_is_better = task.higher_is_better and select_key == task.metric
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    step, best, best_step, elapsed_before, wandb_id = 0, None, None, 0.0, None
    best_metric = None  # the task metric at the selected checkpoint (`best` is the selected quantity)
    window = Window(device)
    resumed = bool(cfg.resume) and last_path.exists()
    if resumed:
        checkpoint = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        task.train.load_state_dict(checkpoint["data"])
        window.load_state_dict(checkpoint["window"])
        _set_rng_state(checkpoint["rng"])
        step, best, best_step = int(checkpoint["step"]), checkpoint["best"], checkpoint["best_step"]
        best_metric = checkpoint.get("best_metric", best)
        elapsed_before, wandb_id = float(checkpoint["elapsed_s"]), checkpoint.get("wandb_id")
        log.info("resuming %s at step %d", run_dir, step)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if task.order is not None:
        write_json(run_dir / "pixel_order.json", {"permutation": cfg.task.permutation,
                                                  "order": task.order.tolist()})

    metrics = MetricsCSV(run_dir / "metrics.csv", keep_through_step=step if cfg.resume else None)
    name = f"{cfg.task.name}-{cfg.model.name}-{run_dir.name}"
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    wandb_run = WandbRun(cfg.logger, config_dict, run_dir, name, run_id=wandb_id)
    summary = {
        "status": "running", "task": cfg.task.name, "model": cfg.model.name, "metric": task.metric,
        "selected_by": select_key, "valid_statistics": trainer_cfg.valid_statistics,
        "best_valid_metric": best_metric, "best_valid_selected": best, "best_step": best_step, "test_metric": None,
        "steps": step,
        "device": str(device), "torch_version": torch.__version__, "recurrent_bn_version": __version__,
        "git_commit": git_commit(), "run_dir": str(run_dir), "config": config_dict,
    }
    session_start = time.time()
    timing_start: tuple[int, float] | None = None
    warned_scale = False

    def elapsed() -> float:
        return elapsed_before + time.time() - session_start

    def write(row: dict) -> None:
        metrics.write(row)
        wandb_run.log(row)

    def check_finite() -> list[float]:
        values = window.values()
        if not all(math.isfinite(v) for v in values):
            first = step - window.steps + 1
            where = f"at step {step}" if first == step else f"between steps {first} and {step}"
            raise Diverged(
                f"loss or gradient became non-finite {where}; {last_path} "
                "holds the last good checkpoint: try a smaller optim.lr or trainer.clip_grad_norm"
            )
        return values

    def checkpoint_now() -> None:
        check_finite()
        save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "data": task.train.state_dict(), "window": window.state_dict(), "rng": _rng_state(), "step": step,
            "best": best, "best_metric": best_metric, "best_step": best_step, "elapsed_s": elapsed(),
            "wandb_id": wandb_run.id,
            "config": OmegaConf.to_yaml(cfg, resolve=True),
        }, last_path)

    status, error = "completed", None
    progress = tqdm(total=trainer_cfg.max_steps, initial=step, disable=None, unit="step", dynamic_ncols=True,
                    desc=f"{cfg.task.name}/{cfg.model.name}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    model.train()
    try:
        with StopSignal() as stop:
            window_clock = time.time()
            while step < trainer_cfg.max_steps:
                x, y = task.train.next()
                with autocast:
                    loss, metric, count = task.loss(step_model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), trainer_cfg.clip_grad_norm or float("inf")
                )
                optimizer.step()
                scheduler.step()
                step += 1
                window.add(loss, metric, grad_norm, count, x.shape[1])
                progress.update(1)

                if step % trainer_cfg.log_every == 0 or step == trainer_cfg.max_steps:
                    loss_sum, metric_sum, grad_sum = check_finite()
                    window.seconds += time.time() - window_clock
                    row = {"step": step, "split": "train", **task.summarize(loss_sum, metric_sum, window.count),
                           "grad_norm": grad_sum / window.steps, "lr": scheduler.get_last_lr()[0],
                           "elapsed_s": elapsed(), "seq_per_s": window.sequences / max(window.seconds, 1e-9)}
                    write(row)
                    progress.set_postfix(loss=f"{row['loss']:.4f}", **{task.metric: f"{row[task.metric]:.4f}"},
                                         seq_s=f"{row['seq_per_s']:.0f}")
                    window = Window(device)
                    window_clock = time.time()

                if timing_start is None and step >= 3:
                    timing_start = (step, time.time())
                elif not warned_scale and timing_start and step - timing_start[0] >= 10:
                    warned_scale = True
                    seconds_per_step = (time.time() - timing_start[1]) / (step - timing_start[0])
                    if device.type == "cpu":
                        _warn_if_paper_scale(cfg, seconds_per_step, trainer_cfg.max_steps - step)

                if step % trainer_cfg.eval_every == 0 or step == trainer_cfg.max_steps:
                    eval_start = time.time()
                    with autocast:
                        result = validate_once(task, model, trainer_cfg)
                    write({"step": step, "split": "valid", **result, "elapsed_s": elapsed()})
                    log.info("step %d | valid loss %.4f %s %.4f error %.4f | %.0f s", step, result["loss"],
                             task.metric, result[task.metric], result["error"], elapsed())
                    selected = result[select_key]
                    if _improved(selected, best, higher_is_better):
                        best, best_step, best_metric = selected, step, result[task.metric]
                        save_atomic({"model": model.state_dict(), "step": step, "metric": best}, best_path)
                    summary.update(best_valid_metric=best_metric, best_valid_selected=best, best_step=best_step,
                                   steps=step)
                    window_clock += time.time() - eval_start  # throughput counts training time only

                if stop.requested or step % trainer_cfg.checkpoint_every == 0 or step == trainer_cfg.max_steps:
                    checkpoint_now()
                if stop.requested:
                    status = "interrupted"
                    log.warning("%s: stopped at step %d; continue with: python -m recurrent_bn.train resume=%s",
                                stop.requested, step, run_dir)
                    break
        progress.close()
        summary["steps"] = step
        if status == "completed" and trainer_cfg.final_test:
            summary.update(final_test(cfg, task, model, best_path, run_dir, write, autocast))
    except Diverged as diverged:
        status, error = "diverged", str(diverged)
        raise
    except BaseException as failure:
        status, error = "failed", f"{type(failure).__name__}: {failure}"
        raise
    finally:
        progress.close()
        metrics.close()
        summary.update(status=status, error=error, steps=step, wall_time_s=elapsed())
        write_json(run_dir / "summary.json", summary)
        wandb_run.finish(summary, exit_code=0 if status in ("completed", "interrupted") else 1)
    return summary


def final_test(cfg: DictConfig, task: Task, model: torch.nn.Module, best_path: Path, run_dir: Path, write,
               autocast) -> dict:
    """Test the best checkpoint after re-estimating its population statistics over the training set (the paper's
    protocol); save the re-estimated model as final.pt."""
    best_step = None
    if best_path.exists():
        best = torch.load(best_path, map_location=task.device, weights_only=True)
        model.load_state_dict(best["model"])
        best_step = int(best["step"])
    estimated = 0
    if batch_norms(model):
        with autocast:
            estimated = estimate_population_statistics(model, task.estimation_inputs(cfg.trainer.estimate_batches))
    save_atomic({"model": model.state_dict(), "step": best_step, "estimated_batches": estimated}, run_dir / "final.pt")
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
        out["test_protocol"] = "test set, population statistics re-estimated over the training set"
    write({"step": step, "split": "test", **result})
    log.info("test (best checkpoint, step %s, statistics from %d training batches): loss %.4f %s %.4f",
             best_step, estimated, result["loss"], task.metric, result[task.metric])
    out.update(test_metric=result[task.metric], test_loss=result["loss"])
    return out
