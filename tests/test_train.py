"""The trainer end to end: every task on tiny fixtures (and the real digits), resume after SIGTERM and SIGKILL,
wandb offline, a multirun with a failing job, `make train` as the README says, and the errors a user can cause."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_mnist, make_ptb, make_text8, ptb_char_text, text8_like

from recurrent_bn import fused
from recurrent_bn.config import CONF_DIR
from recurrent_bn.errors import ConfigError, DataNotFoundError
from recurrent_bn.layers import LSTM, estimate_population_statistics
from recurrent_bn.models import build_model
from recurrent_bn.tasks import Task, without_a_batch_of_one
from recurrent_bn.trainer import Diverged, train

REPO = CONF_DIR.parent
TIMING_COLUMNS = ("elapsed_s", "seq_per_s")
WORDS = "the cat sat on a mat and dog ran far N miles <unk> to see my old friend 's house".split()


def read_metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Tiny real-format MNIST, PTB-char and text8 files."""
    root = tmp_path_factory.mktemp("data")
    make_mnist(root, num_train=60, num_test=20)
    rng = np.random.default_rng(0)
    lines = {split: [" " + " ".join(rng.choice(WORDS, 12)) + " " for _ in range(n)]
             for split, n in (("train", 40), ("valid", 8), ("test", 8))}
    make_ptb(root, lines)
    make_text8(root, text8_like(6000))
    return root


def ptb_vocabulary_size() -> int:
    return len(set(ptb_char_text([" ".join(WORDS)])[0::2]))


TINY = ["model.hidden_size=8", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3",
        "trainer.log_every=2", "logger=csv", "data.verify=false"]
TASK_OVERRIDES = {
    "pmnist": ["task=pmnist", "task.valid_size=10", "task.batch_size=5", "task.eval_batch_size=10"],
    "smnist": ["task=smnist", "task.valid_size=10", "task.batch_size=5", "task.eval_batch_size=10"],
    "ptb": ["task=ptb", "task.seq_len=12", "task.eval_seq_len=12", "task.batch_size=4", "task.eval_batch_size=8",
            "task.eval_streams=2", f"task.num_classes={ptb_vocabulary_size()}",
            f"task.input_size={ptb_vocabulary_size()}"],
    "text8": ["task=text8", "task.seq_len=12", "task.eval_seq_len=12", "task.batch_size=4", "task.eval_batch_size=8",
              "task.eval_streams=2", "task.valid_size=600", "task.test_size=600"],
    "digits": ["task=digits", "task.batch_size=16"],
}


@pytest.mark.parametrize("task", list(TASK_OVERRIDES))
@pytest.mark.parametrize("model", ["bn_lstm", "lstm"])
def test_each_task_trains_end_to_end_and_leaves_metrics_summary_and_checkpoints(tmp_path, data_root, task, model,
                                                                                 make_cfg):
    cfg = make_cfg(*TASK_OVERRIDES[task], f"model={model}", *TINY, f"data.root={data_root}")
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    rows = read_metrics(run)
    metric = "acc" if task in ("pmnist", "smnist", "digits") else "bpc"
    assert [r["split"] for r in rows].count("train") == 3 and [r["split"] for r in rows].count("valid") == 2
    assert [r["split"] for r in rows][-1] in ("test", "test_stream")
    for row in rows:
        assert float(row["loss"]) > 0 and row[metric] != "" and int(row["step"]) <= 6
        if metric == "bpc":
            assert abs(float(row["bpc"]) - float(row["loss"]) / np.log(2)) < 1e-5
        if row["split"] == "train":
            assert float(row["grad_norm"]) > 0 and float(row["lr"]) > 0 and float(row["seq_per_s"]) > 0
    saved = json.loads((run / "summary.json").read_text())
    assert saved["status"] == "completed" and saved["steps"] == 6 and saved["metric"] == metric
    assert saved["test_metric"] == summary["test_metric"]
    # the kept checkpoint is the best of the logged validations (the earliest of ties), and it is the one tested
    best_step, best_value = first_best(rows, metric)
    assert saved["best_step"] == best_step and saved["best_valid_metric"] == pytest.approx(best_value, rel=1e-6)
    assert saved["test_step"] == best_step and int(rows[-1]["step"]) == best_step
    assert saved["config"]["task"]["name"] == task and saved["torch_version"] == torch.__version__
    if task in ("pmnist", "smnist", "digits"):  # a plain LSTM has no population statistics to re-estimate
        assert ("re-estimated" in saved["test_protocol"]) == (model == "bn_lstm")
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["step"] == 6 and set(checkpoint) >= {"model", "optimizer", "scheduler", "data", "rng"}
    assert (run / "best.pt").exists() and (run / "final.pt").exists() and (run / "config.yaml").exists()
    if task == "pmnist":
        order = json.loads((run / "pixel_order.json").read_text())["order"]
        assert sorted(order) == list(range(784))


def first_best(rows: list[dict], metric: str) -> tuple[int, float]:
    """The step and value of the best validation row (highest accuracy, lowest bpc; the earliest of ties)."""
    valid = [(int(r["step"]), float(r[metric])) for r in rows if r["split"] == "valid"]
    best = max(v for _, v in valid) if metric == "acc" else min(v for _, v in valid)
    return next((step, v) for step, v in valid if v == best)


# Validation scores scripted to rise, fall below the first, and recover part way: the 2nd of 4 is the best, the 3rd
# the worst, so keeping the first, the last or the worst all give another step than 6.
SCRIPTED = {"acc": [0.3, 0.7, 0.2, 0.5], "bpc": [2.0, 1.4, 2.5, 1.9]}


@pytest.mark.parametrize("task,model,select_by", [("digits", "lstm", "metric"), ("digits", "bn_lstm", "error"),
                                                  ("ptb", "lstm", "metric"), ("ptb", "lstm", "error")])
def test_the_best_validation_is_kept_and_the_test_row_scores_exactly_its_weights(tmp_path, data_root, monkeypatch,
                                                                                  make_cfg, task, model, select_by):
    from recurrent_bn import trainer

    metric = "acc" if task == "digits" else "bpc"
    original, snapshots = trainer.validate_once, []

    def scripted_validation(task_, model_, trainer_cfg):
        result = dict(original(task_, model_, trainer_cfg))
        value = SCRIPTED[metric][len(snapshots)]
        result[metric] = value
        result["error"] = 1 - value if metric == "acc" else value / 10  # the same ranking as the metric
        snapshots.append({k: v.clone() for k, v in model_.state_dict().items()})
        return result

    monkeypatch.setattr(trainer, "validate_once", scripted_validation)
    cfg = make_cfg(*TASK_OVERRIDES[task], f"model={model}", *TINY, "trainer.max_steps=12", "trainer.eval_every=3",
                   f"trainer.select_by={select_by}", "trainer.estimate_batches=2", "trainer.eval_batches=1",
                   f"data.root={data_root}")
    summary = train(cfg, tmp_path / "run")
    assert len(snapshots) == 4
    assert summary["best_step"] == 6 and summary["test_step"] == 6
    assert summary["best_valid_metric"] == SCRIPTED[metric][1]
    assert first_best(read_metrics(tmp_path / "run"), metric) == (6, SCRIPTED[metric][1])
    selected = snapshots[1]
    for name in ("best.pt", "final.pt"):  # the parameters of step 6 (final.pt's statistics are re-estimated)
        state = torch.load(tmp_path / "run" / name, weights_only=True)["model"]
        for key, value in selected.items():
            if "running_" not in key and "num_batches" not in key and "trained_length" not in key:
                assert torch.equal(state[key], value), (name, key)
    # The test row: step 6's weights scored from scratch (statistics re-estimated over 2 training batches)
    rebuilt = build_model(cfg)
    rebuilt.load_state_dict(selected)
    scoring = Task(cfg.task, torch.device("cpu"), seed=cfg.seed, data_root=data_root, verify=False)
    if model == "bn_lstm":
        estimate_population_statistics(rebuilt, scoring.estimation_inputs(2))
    expected = (scoring.evaluate_stream(rebuilt, "test") if task == "ptb"
                else scoring.evaluate(rebuilt, scoring.batches("test")))
    test_row = [r for r in read_metrics(tmp_path / "run") if r["split"] == "test"][0]
    assert int(test_row["step"]) == 6
    assert float(test_row[metric]) == pytest.approx(expected[metric], rel=1e-6)
    assert summary["test_metric"] == pytest.approx(expected[metric], rel=1e-6)


def test_population_statistics_are_re_estimated_before_the_test(tmp_path, data_root, make_cfg):
    cfg = make_cfg(*TASK_OVERRIDES["digits"], "model=bn_lstm", *TINY, "trainer.estimate_batches=3")
    summary = train(cfg, tmp_path / "run")
    assert summary["estimation_batches"] == 3
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)["model"]
    tracked = final["recurrent.norm_hh_l0.num_batches_tracked"]
    assert tracked.max() == 3  # a plain average over 3 batches, not the moving average of training


def test_validating_with_re_estimated_statistics_scores_them_and_leaves_training_unchanged(tmp_path, make_cfg):
    runs = {}
    for mode in ("moving_average", "estimated"):
        cfg = make_cfg(*TASK_OVERRIDES["digits"], "model=bn_lstm", *TINY, "trainer.estimate_batches=2",
                       f"trainer.valid_statistics={mode}", "trainer.final_test=false")
        train(cfg, tmp_path / mode)
        runs[mode] = without_timing(read_metrics(tmp_path / mode))
    # Same training trajectory and moving averages: the estimation happens aside and is undone.
    assert [r for r in runs["moving_average"] if r["split"] == "train"] == [
        r for r in runs["estimated"] if r["split"] == "train"]
    states = [torch.load(tmp_path / mode / "last.pt", weights_only=True)["model"] for mode in runs]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    # The validation score is the one the final checkpoint gets with statistics estimated on 2 training batches.
    model = build_model(cfg)
    model.load_state_dict(states[1])
    task = Task(cfg.task, torch.device("cpu"), seed=cfg.seed)
    estimate_population_statistics(model, task.estimation_inputs(2))
    expected = task.evaluate(model, task.batches("valid"))
    last_valid = [r for r in runs["estimated"] if r["split"] == "valid"][-1]
    assert float(last_valid["acc"]) == pytest.approx(expected["acc"])
    assert float(last_valid["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    moving_valid = [r for r in runs["moving_average"] if r["split"] == "valid"][-1]
    assert float(moving_valid["loss"]) != pytest.approx(expected["loss"], rel=1e-5)


def test_same_seed_gives_identical_metrics_on_cpu(tmp_path, make_cfg):
    rows = []
    for name in ("a", "b"):
        train(make_cfg(*TASK_OVERRIDES["digits"], "model=bn_lstm", *TINY), tmp_path / name)
        rows.append(without_timing(read_metrics(tmp_path / name)))
    assert rows[0] == rows[1]


@pytest.mark.skipif(not fused.available(), reason="needs the fused CPU kernels")
@pytest.mark.parametrize("task", ["digits", "ptb"])
def test_training_runs_whose_team_has_fallen_back_give_the_same_bits(tmp_path, data_root, make_cfg, task):
    # Beside a busy core the kernels' team falls back to one thread, and the kernels' copies and products over the
    # whole sequence then run on one thread too, in their fixed blocks. Forced here for every call, on two threads:
    # the metrics must be the bits of the run whose team never falls back.
    overrides = [o for o in TASK_OVERRIDES[task] if not o.startswith("task.batch_size=")]
    overrides += ["task.batch_size=40", "model=bn_lstm", "model.hidden_size=64", "trainer.threads=2",
                  "trainer.max_steps=8", "trainer.eval_every=4", "trainer.log_every=1", "logger=csv",
                  "data.verify=false"]
    extension, threads = fused._extension, torch.get_num_threads()
    rows = []
    for solo in (False, True):
        extension.set_team_fallback(solo)
        extension.run_solo(10**9 if solo else 0)
        try:
            train(make_cfg(*overrides, f"data.root={data_root}"), tmp_path / f"solo_{solo}")
        finally:
            extension.run_solo(0)
            extension.set_team_fallback(True)
            torch.set_num_threads(threads)
        rows.append(without_timing(read_metrics(tmp_path / f"solo_{solo}")))
    assert len(rows[0]) > 8 and rows[0] == rows[1]


@pytest.mark.slow
def test_digits_bn_lstm_learns(tmp_path, make_cfg):
    """The real digits task: a short run must beat chance clearly (10 classes)."""
    cfg = make_cfg("task=digits", "model=bn_lstm", "model.hidden_size=32", "trainer.max_steps=150",
                   "trainer.eval_every=150", "logger=csv", "optim.lr=0.005")
    summary = train(cfg, tmp_path / "run")
    assert summary["best_valid_metric"] > 0.3 and summary["test_metric"] > 0.3


def test_missing_dataset_stops_before_training_with_one_line(tmp_path, make_cfg):
    cfg = make_cfg("task=pmnist", f"data.root={tmp_path / 'empty'}", "logger=csv")
    with pytest.raises(DataNotFoundError) as error:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(error.value) and "make data" in str(error.value)


def test_bad_config_value_stops_before_loading_data(tmp_path, make_cfg):
    cfg = make_cfg("task=pmnist", "model.gamma_init=-1", f"data.root={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="model.gamma_init"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize("log_every,where", [(3, "between steps 4 and 6"), (1, "at step 5")])
def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                      log_every, where, make_cfg):
    original = Task.loss
    calls = []

    def loss_that_turns_nan(self, model, x, y):
        loss, metric, count = original(self, model, x, y)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), metric, count

    monkeypatch.setattr(Task, "loss", loss_that_turns_nan)
    cfg = make_cfg(*TASK_OVERRIDES["digits"], "model=lstm", *TINY, "trainer.max_steps=40",
                   "trainer.checkpoint_every=2", f"trainer.log_every={log_every}", "trainer.eval_every=100")
    with pytest.raises(Diverged, match=f"non-finite {where};"):
        train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_wandb_runs_offline_without_network_or_key(tmp_path, monkeypatch, make_cfg):
    for variable in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stored key
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config"))
    cfg = make_cfg(*TASK_OVERRIDES["digits"], "model=lstm", *TINY, "logger=wandb")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert len(read_metrics(tmp_path / "run")) > 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


STOP_ARGS = [*TASK_OVERRIDES["digits"], "model=bn_lstm", "model.hidden_size=8", "model.init_state_noise=0.1",
             "trainer.max_steps=16", "trainer.log_every=4", "trainer.eval_every=8", "trainer.checkpoint_every=100",
             "trainer.eval_batches=1", "trainer.estimate_batches=1", "logger=csv", "trainer.threads=1"]


@pytest.mark.parametrize("stop_after", [6, 10, 13])
def test_a_run_stopped_at_a_chosen_step_and_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch, make_cfg,
                                                                                stop_after):
    """SIGTERM raised by the run itself right after step `stop_after` (between two train rows, away from every
    validation and periodic checkpoint), so last.pt holds a half-filled metrics window, moved optimizer and RNG
    states (the initial-state noise draws from the torch RNG): each must be restored for the rows to match."""
    from recurrent_bn import trainer

    expected = train(make_cfg(*STOP_ARGS), tmp_path / "uninterrupted")
    original, calls = trainer.training_step, []

    def step_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler asks for a checkpoint and a stop

    monkeypatch.setattr(trainer, "training_step", step_then_stop)
    run_dir = tmp_path / "run"
    stopped = train(make_cfg(*STOP_ARGS), run_dir)
    assert stopped["status"] == "interrupted" and stopped["steps"] == stop_after
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == stop_after
    assert stop_after % 4 and max(int(r["step"]) for r in read_metrics(run_dir)) < stop_after  # mid-window
    monkeypatch.setattr(trainer, "training_step", original)
    resumed = train(make_cfg(*STOP_ARGS, f"resume={run_dir}"), run_dir)
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(tmp_path / "uninterrupted"))
    assert resumed["status"] == "completed"
    assert (resumed["best_step"], resumed["test_metric"]) == (expected["best_step"], expected["test_metric"])


# ------------------------------------------------------------------------------------------ subprocesses


def run_cli(*args: str, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recurrent_bn.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kwargs)


# The default backend and thread count: batch 50 x hidden 64 is split over two threads, whose team may fall back to
# one thread when a core is busy.
RESUME_ARGS = ["task=digits", "model=bn_lstm", "model.hidden_size=64", "trainer.max_steps=160",
               "trainer.log_every=5", "trainer.eval_every=40", "trainer.checkpoint_every=30", "logger=csv"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(*RESUME_ARGS, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return without_timing(read_metrics(run_dir))


def start_and_stop(run_dir: Path, send: signal.Signals, after_step: int) -> None:
    """Start a run, wait until metrics.csv reaches `after_step` (and a checkpoint exists), then signal it."""
    process = subprocess.Popen([sys.executable, "-m", "recurrent_bn.train", *RESUME_ARGS, f"hydra.run.dir={run_dir}"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "last.pt").exists() and (run_dir / "metrics.csv").exists():
            rows = read_metrics(run_dir)
            if rows and int(rows[-1]["step"]) >= after_step:
                break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(send)
    output, _ = process.communicate(timeout=120)
    if send == signal.SIGTERM:
        assert process.returncode == 0, output[-2000:]
        assert "resume=" in output
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


# SIGTERM in the fast set, SIGKILL (the same resume, from an older checkpoint) in the slow one
@pytest.mark.parametrize("send,after_step", [(signal.SIGTERM, 45),
                                             pytest.param(signal.SIGKILL, 65, marks=pytest.mark.slow)])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, uninterrupted, send, after_step):
    run_dir = tmp_path / "run"
    start_and_stop(run_dir, send, after_step)
    result = run_cli(f"resume={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = without_timing(read_metrics(run_dir))
    assert resumed == uninterrupted  # every row once, the same numbers
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_seeded_run_beside_a_busy_core_gives_the_same_bits(tmp_path, uninterrupted):
    # Another process keeps a core busy: the fused kernels' thread team then waits and falls back to one thread for
    # some calls. The metrics must not change by a bit (they did: 8 of 45 rows differed over 300 steps).
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = run_cli(*RESUME_ARGS, f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        busy.kill()
        busy.wait()
    assert result.returncode == 0, result.stderr[-2000:]
    assert without_timing(read_metrics(tmp_path / "run")) == uninterrupted


@pytest.mark.slow
def test_multirun_reports_every_job_and_a_failing_one_does_not_lose_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("--multirun", "task=digits", "model=bn_lstm", "model.gamma_init=0.5,-1", "model.hidden_size=8",
                     "trainer.max_steps=4", "trainer.eval_every=2", "logger=csv", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1
    table = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [row["overrides"] for row in table] == ["task=digits model=bn_lstm model.gamma_init=0.5 "
                                                   "model.hidden_size=8 trainer.max_steps=4 trainer.eval_every=2 "
                                                   "logger=csv", table[1]["overrides"]]
    assert [row["status"] for row in table] == ["completed", "failed"]
    assert float(table[0]["best_valid"]) > 0 and "model.gamma_init" in table[1]["error"]
    assert "model.gamma_init=-1" in result.stdout and "completed" in result.stdout


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_2(tmp_path):
    result = run_cli("task=pmnist", f"data.root={tmp_path}", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "make data" in result.stderr
    result = run_cli("task=digits", "model.hidden_size=-1", f"hydra.run.dir={tmp_path / 'run2'}")
    assert result.returncode == 2 and "model.hidden_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_make_train_runs_as_the_readme_says(tmp_path):
    env = {**os.environ, "MAKEFLAGS": ""}
    result = subprocess.run(
        ["make", "train", "TASK=digits", "MODEL=lstm",
         f"ARGS=trainer.max_steps=4 trainer.eval_every=2 logger=csv hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_compile_is_refused_for_long_sequences_in_one_line(tmp_path, make_cfg):
    from recurrent_bn.trainer import COMPILE_MAX_STEPS, check_compile

    check_compile(False, 784)
    check_compile("default", COMPILE_MAX_STEPS)
    with pytest.raises(ConfigError, match="set trainer.compile=false") as error:
        train(make_cfg("task=pmnist", "model=bn_lstm", "trainer.compile=default"), tmp_path)
    assert "\n" not in str(error.value) and "784" in str(error.value)


def test_a_last_batch_of_one_joins_the_batch_before_it_where_batch_statistics_are_taken():
    # A split that leaves one example after its full batches would end the estimation of the statistics (or a
    # validation with batch statistics) in the layers' refusal of a batch of one.
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(5, 7, 1)
    labels, targets = torch.arange(7), torch.arange(5 * 7).reshape(5, 7)
    for y in (labels, targets):  # classification (B,), language model (T, B)
        batch_dim = y.dim() - 1
        batches = [(x[:, i : i + 3], y.narrow(batch_dim, i, min(3, 7 - i))) for i in range(0, 7, 3)]
        joined = list(without_a_batch_of_one(iter(batches)))
        assert [b[0].shape[1] for b in joined] == [3, 4]
        assert torch.equal(torch.cat([b[0] for b in joined], 1), x)
        assert torch.equal(torch.cat([b[1] for b in joined], batch_dim), y)
    assert [b[0].shape[1] for b in without_a_batch_of_one(iter(batches[:2]))] == [3, 3]
    batches = [(x[:, i : i + 3], labels[i : i + 3]) for i in range(0, 7, 3)]
    model = LSTM(1, 2, norm="bn")
    assert estimate_population_statistics(model, (b[0] for b in without_a_batch_of_one(iter(batches)))) == 2
