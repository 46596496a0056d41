"""Runs never lose or misreport results, and every user mistake is one line: one writer per run directory, a
resume that keeps the record and composes its overrides, one test row, a full disk, wandb that never prompts or
waits long, and one-line errors where a traceback used to be (one test per defect of the robustness review)."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from recurrent_bn import trainer
from recurrent_bn.config import CONF_DIR, check_added_keys
from recurrent_bn.errors import ConfigError, UserError
from recurrent_bn.provenance import git_commit
from recurrent_bn.run_dir import RunDirBusy, claim, record_resume
from recurrent_bn.trainer import Diverged, train

REPO = CONF_DIR.parent
SMALL = ["task=digits", "task.batch_size=16", "model=lstm", "model.hidden_size=8", "logger=csv",
         "trainer.threads=1"]


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recurrent_bn.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------- 1. one writer per directory


@pytest.mark.slow
def test_a_second_process_cannot_write_a_run_directory_in_use(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "recurrent_bn.train", *SMALL, "trainer.max_steps=100000",
                              "trainer.eval_every=100000", "seed=1", f"hydra.run.dir={run_dir}"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.csv").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second started"
        for second in (cli(*SMALL, "trainer.max_steps=5", "seed=2", f"hydra.run.dir={run_dir}"),
                       cli(f"resume={run_dir}", "trainer.max_steps=5")):
            line = one_error_line(second)
            assert str(run_dir) in line and f"pid {first.pid}" in line
        # in-process, the claim itself refuses (the race the command-line check cannot see)
        with pytest.raises(RunDirBusy, match=f"pid {first.pid}"), claim(run_dir):
            pass
        assert "seed=2" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 1
    finally:
        first.terminate()
        first.wait(timeout=600)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def kernel_lock_is_free(run_dir: Path) -> bool:
    """Whether a new open file description can take the exclusive flock on `<run_dir>/.lock` now, as another process
    would try: flock locks belong to open file descriptions, so this sees the claim of this very process too."""
    with (run_dir / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_claim_holds_the_kernel_lock_and_a_held_lock_refuses_the_claim_and_the_trainer(tmp_path, make_cfg):
    run_dir = tmp_path / "run"
    with claim(run_dir):
        assert not kernel_lock_is_free(run_dir)
        assert f"pid {os.getpid()}" in (run_dir / ".lock").read_text()
    assert kernel_lock_is_free(run_dir)  # released at the end of the claim

    # Another holder (a second open of the lock file stands for a second process): the claim and train() refuse.
    with (run_dir / ".lock").open("a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 999999 on elsewhere\n")
        other.flush()
        with pytest.raises(RunDirBusy, match="in use by pid 999999 on elsewhere"), claim(run_dir):
            pass
        with pytest.raises(RunDirBusy, match="two runs must not write one run directory"):
            train(make_cfg(*SMALL, "trainer.max_steps=2"), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # the refused run wrote nothing


# ------------------------------------------------- 2, 4, 5. resume keeps the record, composes, and tests once


def test_each_resume_records_the_commit_of_the_code_that_continued_the_run(tmp_path):
    # a campaign run resumed in a later session may continue on newer code: its record says which
    record_resume(tmp_path, ["a=1"])
    record_resume(tmp_path, ["b=2"])
    resumes = yaml.safe_load((tmp_path / "resumes.yaml").read_text())
    assert [entry["overrides"] for entry in resumes] == [["a=1"], ["b=2"]]
    assert git_commit() is not None and [entry["git_commit"] for entry in resumes] == [git_commit()] * 2


def test_the_commit_is_dirty_when_code_changed_not_when_a_run_wrote_its_records(tmp_path):
    # A campaign running from a frozen worktree collects its records into that worktree's results/ while it runs;
    # the code it ran is still the commit's, and the records must say so.
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.csv").write_text("step\n")
    (tmp_path / "model.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    clean = git_commit(tmp_path)
    assert clean is not None and not clean.endswith("-dirty")
    (tmp_path / "results" / "metrics.csv").write_text("step\n1\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "model.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"


@pytest.mark.slow
def test_resume_keeps_the_start_record_composes_overrides_and_keeps_one_test_row(tmp_path):
    run_dir = tmp_path / "run"
    start = [*SMALL, "trainer.max_steps=10", "trainer.eval_every=5", "trainer.checkpoint_every=5", "seed=3"]
    assert cli(*start, f"hydra.run.dir={run_dir}").returncode == 0
    started = (run_dir / ".hydra" / "overrides.yaml").read_text()
    before = (run_dir / "metrics.csv").read_bytes()

    finished = cli(f"resume={run_dir}")  # nothing to do: said, and nothing written
    assert finished.returncode == 0 and "is finished" in finished.stdout + finished.stderr
    assert (run_dir / "metrics.csv").read_bytes() == before and not (run_dir / "resumes.yaml").exists()

    # the run's own command line again, with a group override (logger=wandb would be a change, logger=csv is not)
    extended = cli(f"resume={run_dir}", *start, "logger=csv", "trainer.max_steps=15")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == started
    resumes = yaml.safe_load((run_dir / "resumes.yaml").read_text())
    assert resumes[-1]["overrides"][-1] == "trainer.max_steps=15"
    tests = [row for row in rows(run_dir) if row["split"] == "test"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(tests) == 1 and float(tests[0]["acc"]) == pytest.approx(summary["test_metric"], rel=1e-6)
    assert int(tests[0]["step"]) == summary["test_step"]
    assert max(int(row["step"]) for row in rows(run_dir)) == 15

    switched = cli(f"resume={run_dir}", "logger=wandb", "logger.mode=disabled", "trainer.max_steps=16")
    assert switched.returncode == 0, switched.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]["name"] == "wandb"

    for change, key in (("model.hidden_size=32", "model.hidden_size"), ("task=smnist", "task"),
                        ("+trainer.max_step=10", "trainer.max_steps")):
        assert key in one_error_line(cli(f"resume={run_dir}", change))


@pytest.mark.slow
def test_the_preset_of_a_resumed_run_is_read_from_its_start_record(tmp_path):
    from fixtures import make_mnist

    from recurrent_bn.runs import run_info

    make_mnist(tmp_path / "data", num_train=30, num_test=10)
    run_dir = tmp_path / "run"
    started = cli("experiment=cpu_pmnist", "model=lstm", "model.hidden_size=8", "logger=csv", "trainer.threads=1",
                  "task.valid_size=10", "task.batch_size=5", "task.eval_batch_size=10", "trainer.max_steps=2",
                  "trainer.eval_every=2", "trainer.estimate_batches=1", f"data.root={tmp_path / 'data'}",
                  "data.verify=false", f"hydra.run.dir={run_dir}")
    assert started.returncode == 0, started.stderr[-3000:]
    assert cli(f"resume={run_dir}", "trainer.max_steps=3").returncode == 0
    assert run_info(run_dir).attributes["preset"] == "cpu_pmnist"


# ------------------------------------------------------------------------------------------ 3, 11. wandb


@pytest.mark.slow
def test_wandb_online_without_a_key_in_a_terminal_never_prompts(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / ".config"))
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "recurrent_bn.train", *SMALL, "logger=wandb",
                                "logger.mode=online", "trainer.max_steps=2", "trainer.eval_every=2",
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, stdin=follower,
                               stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    output, deadline = b"", time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            output += chunk
            if b"Enter your choice" in output:
                break
        elif process.poll() is not None:
            break
    process.kill()
    process.wait()
    os.close(leader)
    text = output.decode(errors="replace")
    assert "Enter your choice" not in text
    assert "no API key" in text and "logging offline" in text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow  # two runs and the timeouts themselves: about 40 s on a quiet machine
def test_a_wandb_server_that_never_answers_costs_at_most_the_timeouts(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(64)], daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / ".netrc"), WANDB_CONFIG_DIR=str(tmp_path / ".config"),
               WANDB_API_KEY="0" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{server.getsockname()[1]}")
    base = [*SMALL, "trainer.max_steps=2", "trainer.eval_every=2", "trainer.final_test=false", "logger=wandb",
            "logger.init_timeout=4", "logger.finish_timeout=2"]
    start = time.time()  # wandb offline: its own start-up and teardown, no network
    assert cli(*base, "logger.mode=offline", f"hydra.run.dir={tmp_path / 'offline'}", env=env).returncode == 0
    offline = time.time() - start
    start = time.time()
    result = cli(*base, "logger.mode=online", f"hydra.run.dir={tmp_path / 'online'}", env=env)
    online = time.time() - start
    server.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "did not answer within 4 s" in result.stdout + result.stderr
    assert online - offline < 4 + 2 + 10, (online, offline)  # the two timeouts, and some slack for a busy machine


# ------------------------------------------------------------------------------------------ 6. a full disk


def test_a_full_disk_ends_in_one_line_naming_what_was_saved_and_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                                           make_cfg):
    original, calls = torch.save, []

    def save_until_the_disk_is_full(content, path, *args, **kwargs):
        calls.append(Path(path).name)
        if Path(path).name == "last.tmp" and calls.count("last.tmp") == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(content, path, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", save_until_the_disk_is_full)
    run_dir = tmp_path / "run"
    cfg = make_cfg(*SMALL, "trainer.max_steps=20", "trainer.checkpoint_every=5", "trainer.eval_every=100")
    with pytest.raises(UserError) as error:
        train(cfg, run_dir)
    message = str(error.value)
    assert "\n" not in message and str(run_dir) in message and "full" in message
    assert "last.pt of step 5" in message and "stopped at step 10" in message
    assert not list(run_dir.rglob("*.tmp"))
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 5
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), where every write is ENOSPC")
@pytest.mark.parametrize("full_at, nth", [("last.tmp", 2), ("best.tmp", 1)])
def test_a_full_disk_under_torchs_own_writer_ends_in_the_same_one_line(tmp_path, monkeypatch, make_cfg, full_at, nth):
    # torch.save's zip writer reports ENOSPC as "RuntimeError: [enforce fail at inline_container.cc:...] unexpected
    # pos ...", not as an OSError: the run ended in that traceback with status=failed. Here the temporary file of the
    # second write of last.pt (or the first of best.pt) is /dev/full, so torch's real writer meets a real ENOSPC.
    original, calls = torch.save, []

    def save_onto_a_full_disk(content, path, *args, **kwargs):
        if isinstance(path, str | os.PathLike):
            calls.append(Path(path).name)
            if Path(path).name == full_at and calls.count(full_at) == nth:
                Path(path).symlink_to("/dev/full")
        return original(content, path, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", save_onto_a_full_disk)
    run_dir = tmp_path / "run"
    cfg = make_cfg(*SMALL, "trainer.max_steps=20", "trainer.checkpoint_every=5", "trainer.eval_every=5",
                   "trainer.valid_statistics=moving_average", "model.hidden_size=4")
    with pytest.raises(UserError) as error:
        train(cfg, run_dir)
    message = str(error.value)
    assert "\n" not in message and str(run_dir) in message and "full" in message
    assert not list(run_dir.rglob("*.tmp"))
    if full_at == "last.tmp":
        assert "kept: last.pt of step 5" in message and "stopped at step 10" in message
        assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 5
    else:
        assert "kept: no checkpoint yet" in message and "stopped at step 5" in message
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == message


# ------------------------------------------------------------------- 7, 8, 9, 10. one line, and nothing touched


@pytest.mark.parametrize("override,key", [
    ("seed=abc", "seed"), ("seed=1.5", "seed"), ("optim.lr=1e39", "optim.lr"),
    ("model.hidden_size=100000000000000000000", "model.hidden_size"), ("model.hidden_size=1000000", "model.hidden"),
    ("task.batch_size=5000", "task.batch_size"),
])
def test_values_that_used_to_give_a_traceback_give_one_line(tmp_path, override, key, make_cfg):
    cfg = make_cfg(*SMALL, "trainer.max_steps=2", override)
    with pytest.raises(ConfigError) as error:
        train(cfg, tmp_path / "run")
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


def test_batch_larger_than_the_split_is_exit_2_on_the_command_line(tmp_path):
    assert "task.batch_size=5000" in one_error_line(cli(*SMALL, "task.batch_size=5000",
                                                        f"hydra.run.dir={tmp_path / 'run'}"))


def test_damaged_or_crafted_run_files_are_refused_in_one_line(tmp_path, make_cfg):
    run_dir = tmp_path / "run"
    cfg = make_cfg(*SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=4")
    train(cfg, run_dir)
    checkpoint = (run_dir / "last.pt").read_bytes()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    resume_cfg = make_cfg(*SMALL, "trainer.max_steps=8", f"resume={run_dir}")
    for content in (checkpoint[: len(checkpoint) // 2], None):
        if content is None:
            torch.save({"step": Payload()}, run_dir / "last.pt")
        else:
            (run_dir / "last.pt").write_bytes(content)
        with pytest.raises(UserError, match="not a readable checkpoint") as error:
            train(resume_cfg, run_dir)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "pwned").exists()
    (run_dir / "config.yaml").write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    line = one_error_line(cli(f"resume={run_dir}"))
    assert "config.yaml cannot be read" in line and not (REPO / "pwned").exists()


def test_unreadable_data_is_one_line_naming_the_file(tmp_path, monkeypatch, make_cfg):
    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/MNIST/raw/train-images-idx3-ubyte")

    monkeypatch.setattr(trainer, "Task", unreadable)
    with pytest.raises(UserError, match="cannot read /data/MNIST/raw/train-images-idx3-ubyte: permission denied"):
        train(make_cfg(*SMALL), tmp_path / "run")


def test_resume_at_a_folder_that_is_not_a_run_touches_nothing(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert "not a run directory" in one_error_line(cli(f"resume={folder}"))
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    missing = tmp_path / "missing"
    assert "no such directory" in one_error_line(cli(f"resume={missing}"))
    assert not missing.exists()


def test_divergence_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch, make_cfg):
    original = trainer.Task.loss

    def nan_at_step_3(self, model, x, y):
        loss, metric, count = original(self, model, x, y)
        nan_at_step_3.calls += 1
        return (loss * float("nan") if nan_at_step_3.calls == 3 else loss), metric, count

    nan_at_step_3.calls = 0
    monkeypatch.setattr(trainer.Task, "loss", nan_at_step_3)
    run_dir = tmp_path / "run"
    cfg = make_cfg(*SMALL, "trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.log_every=1")
    with pytest.raises(Diverged, match=r"no checkpoint was written yet \(the first was due at step 10\)"):
        train(cfg, run_dir)
    assert not (run_dir / "last.pt").exists()


def test_an_added_key_that_nothing_reads_is_refused_naming_the_close_one(tmp_path, make_cfg):
    cfg = make_cfg("+trainer.max_step=10")
    with pytest.raises(ConfigError, match=r"^\+trainer.max_step: no such key.*did you mean trainer.max_steps\?"):
        check_added_keys(cfg, ["+trainer.max_step=10"])
    check_added_keys(make_cfg("trainer.max_steps=10"), ["trainer.max_steps=10"])
    assert "trainer.max_steps" in one_error_line(cli(*SMALL, "+trainer.max_step=10",
                                                     f"hydra.run.dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run" / "metrics.csv").exists()
