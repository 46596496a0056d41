"""scripts/bench.py writes results/bench.* only for the standard run: any option that changes the numbers keeps its
tables out of results/ unless --out names a folder."""

from __future__ import annotations

import importlib.util

import pytest

from recurrent_bn.config import CONF_DIR

SPEC = importlib.util.spec_from_file_location("bench", CONF_DIR.parent / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.fixture
def untimed(tmp_path, monkeypatch):
    """bench.main with nothing timed and ROOT in tmp_path: what it writes, and where, is all that is left."""
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench.fused, "available", lambda: False)
    monkeypatch.setattr(bench, "machine", lambda: {"cpu": "test"})
    monkeypatch.setattr(bench, "run_shape", lambda name, shape, args, log: [])
    monkeypatch.setattr(bench, "malloc_comparison", lambda args, log: [])
    monkeypatch.setattr(bench, "tables", lambda rows, off_rows, info: "| tables |\n")
    threads = bench.torch.get_num_threads()
    yield tmp_path
    bench.torch.set_num_threads(threads)  # --threads sets it


@pytest.mark.parametrize("argv", [[], ["--modes", "eval,train"]])
def test_the_standard_run_writes_its_tables_to_results(untimed, argv):
    bench.main(bench.parse_args(argv))
    assert (untimed / "results" / "bench.csv").exists() and (untimed / "results" / "bench.md").exists()


@pytest.mark.parametrize("option", [["--quick"], ["--shapes", "pmnist"], ["--impls", "nn"], ["--modes", "train"],
                                    ["--repeats", "3"], ["--warmup", "0"], ["--threads", "1"], ["--malloc", "off"],
                                    ["--no-malloc-compare"], ["--no-memory"], ["--denormals", "keep"]])
def test_an_option_that_changes_the_numbers_keeps_its_tables_out_of_results(untimed, option):
    bench.main(bench.parse_args(option))
    assert not (untimed / "results").exists()
    bench.main(bench.parse_args([*option, "--out", str(untimed / "kept")]))  # --out keeps them where it says
    assert (untimed / "kept" / "bench.csv").exists()
