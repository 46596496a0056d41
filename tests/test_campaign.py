"""The campaign command: a run directory lost between sessions must neither rerun a finished run nor let a run
started again from step 0 replace the longer record committed under results/."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def campaign(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_curves", REPO / "experiments" / "paper_curves.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_curves", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", tmp_path)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results" / "paper_curves")
    monkeypatch.setattr(module, "TANH_RESULTS", tmp_path / "results" / "tanh_question")
    return module


def write_run(directory: Path, steps: int, finished: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["step,split,loss"] + [f"{s},train,1.0" for s in range(50, steps + 1, 50)]
    (directory / "metrics.csv").write_text("\n".join(rows) + "\n")
    if finished:
        (directory / "summary.json").write_text(json.dumps({"status": "completed"}))
    else:
        (directory / "last.pt").write_bytes(b"")


def test_a_restarted_run_keeps_the_longer_record(campaign, tmp_path):
    name = "smnist_lstm_s1"
    write_run(campaign.collected(name), 9000)
    write_run(tmp_path / "campaign" / name, 500)
    campaign.collect(tmp_path / "campaign", [name])
    assert campaign.recorded(name) == ("partial", 9000)
    write_run(tmp_path / "campaign" / name, 9500)  # once it has gone past the record, it replaces it
    campaign.collect(tmp_path / "campaign", [name])
    assert campaign.recorded(name)[1] == 9500


def test_a_run_started_again_behind_a_longer_record_carries_its_checkpoint_until_it_passes_it(campaign, tmp_path):
    # tanh_pmnist_bn_rnn_s1 was started again from step 0 behind its record of 11,400 steps, and its checkpoint was not
    # committed: the session's end lost it a second time.
    name = "tanh_pmnist_bn_rnn_s1"
    write_run(campaign.collected(name), 11400)
    (campaign.collected(name) / "last.pt").unlink()  # the old record lost its checkpoint with its machine
    run = tmp_path / "campaign" / name
    write_run(run, 3500)
    (run / "last.pt").write_bytes(b"restart")
    campaign.collect(tmp_path / "campaign", [name])
    assert campaign.recorded(name) == ("partial", 11400)  # the longer record stays

    shutil.rmtree(tmp_path / "campaign")  # the next session, on another machine
    assert campaign.restore(name, run)
    assert (run / "last.pt").read_bytes() == b"restart" and campaign.state(run) == ("partial", 3500)

    write_run(run, 12000)  # past the record: it replaces it, and restart/ goes
    campaign.collect(tmp_path / "campaign", [name])
    assert campaign.recorded(name)[1] == 12000
    assert not (campaign.collected(name) / campaign.RESTART).exists()


def test_a_finished_record_is_not_run_again(campaign, tmp_path, capsys):
    name = "tanh_pmnist_rnn_s1"
    write_run(campaign.collected(name), 20000, finished=True)
    assert campaign.run_all(tmp_path / "campaign", [name], jobs=1) == 0
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "campaign" / name).exists()
    write_run(tmp_path / "campaign" / name, 100)  # nor does a partial run directory replace it
    campaign.collect(tmp_path / "campaign", [name])
    assert campaign.recorded(name) == ("finished", 20000)


def test_an_unfinished_run_carries_its_checkpoints_and_is_restored_from_them(campaign, tmp_path):
    name = "pmnist_bn_lstm_authors_s1"
    run = tmp_path / "campaign" / name
    write_run(run, 1000)
    (run / "last.pt").write_bytes(b"last")
    (run / "best.pt").write_bytes(b"best")
    campaign.collect(tmp_path / "campaign", [name])
    record = campaign.collected(name)
    assert (record / "last.pt").read_bytes() == b"last" and (record / "best.pt").read_bytes() == b"best"

    shutil.rmtree(tmp_path / "campaign")  # the next session, on another machine
    assert campaign.restore(name, run)
    assert (run / "last.pt").read_bytes() == b"last" and (run / "best.pt").read_bytes() == b"best"
    assert campaign.state(run) == ("partial", 1000)
    assert f"resume={run}" in campaign.command(name, run)
    assert not campaign.restore(name, run)  # a run directory with its own checkpoint is left alone


def test_a_finished_run_leaves_its_checkpoints_out_of_the_repository(campaign, tmp_path):
    name = "pmnist_lstm_authors_s1"
    run = tmp_path / "campaign" / name
    write_run(run, 1000)
    campaign.collect(tmp_path / "campaign", [name])
    assert (campaign.collected(name) / "last.pt").exists()
    write_run(run, 2000, finished=True)
    (run / "final.pt").write_bytes(b"small")
    (run / "best.pt").write_bytes(b"best")
    campaign.collect(tmp_path / "campaign", [name])
    record = campaign.collected(name)
    assert not (record / "last.pt").exists() and not (record / "best.pt").exists()
    assert (record / "final.pt").read_bytes() == b"small"
    assert campaign.recorded(name) == ("finished", 2000)


@pytest.mark.parametrize("path", ["last.pt", "best.pt", "final.pt", "restart/last.pt", "restart/best.pt"])
def test_the_checkpoints_the_campaign_carries_are_not_ignored_by_git(path):
    # They are committed beside the records; *.pt is ignored elsewhere (restart/ was, so its checkpoint stayed behind).
    import subprocess

    target = f"results/runs/tanh_question/tanh_pmnist_bn_rnn_s1/{path}"
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", target], cwd=REPO)
    assert result.returncode == 1, f"{target} is ignored by .gitignore"



def test_a_resume_keeps_the_thread_count_the_run_was_started_with(campaign, tmp_path):
    # The thread count splits the matrix products' sums, so it is part of a run's numbers: a new run states it, a
    # resume leaves the run's own unless asked, and the campaign reads it back for OpenMP.
    name = "ptb_bn_lstm_s1"
    run = tmp_path / "campaign" / name
    assert "trainer.threads=1" in campaign.command(name, run)
    assert "trainer.threads=2" in campaign.command(name, run, threads=2)
    write_run(run, 500)
    (run / "config.yaml").write_text("trainer:\n  threads: 2\n")
    assert not any(a.startswith("trainer.threads=") for a in campaign.command(name, run))
    assert "trainer.threads=1" in campaign.command(name, run, threads=1)
    assert campaign.run_threads(run) == 2
    (run / "config.yaml").unlink()
    assert campaign.run_threads(run) == 1


def test_a_checkpoint_too_large_for_the_repository_is_not_carried(campaign, tmp_path, capsys):
    # A PTB run at hidden 1000 has a 58 MB last.pt: an hourly collect and commit would pass the campaign's budget of
    # about 80 MB after the second hour, so such a run finishes in one sitting (its best.pt alone would resume nothing).
    name = "ptb_bn_lstm_s1"
    run = tmp_path / "campaign" / name
    write_run(run, 500)
    campaign.collect(tmp_path / "campaign", [name])  # small enough at first: carried
    assert (campaign.collected(name) / "last.pt").exists()
    write_run(run, 1000)
    with (run / "last.pt").open("wb") as handle:
        handle.truncate(campaign.CARRIED_MAX_BYTES + 1)  # sparse: no disk used
    (run / "best.pt").write_bytes(b"best")
    campaign.collect(tmp_path / "campaign", [name])
    record = campaign.collected(name)
    assert campaign.state(record) == ("missing", 1000)  # the record, without a checkpoint to resume an older step
    assert not (record / "last.pt").exists() and not (record / "best.pt").exists()
    assert "too large to carry" in capsys.readouterr().out
