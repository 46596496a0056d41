"""scripts/bench.py writes results/bench.* only for the standard run: any option that changes the numbers keeps its
tables out of results/ unless --out names a folder."""

from __future__ import annotations

import importlib.util

import pytest

from recurrent_bn.config import CONF_DIR

SPEC = importlib.util.spec_from_file_location("bench", CONF_DIR.parent / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_only_the_standard_run_replaces_the_tables_in_results():
    assert bench.standard_run(bench.parse_args([]))
    assert bench.standard_run(bench.parse_args(["--out", "elsewhere"]))  # --out only says where


@pytest.mark.parametrize("option", [["--quick"], ["--shapes", "pmnist"], ["--impls", "nn"], ["--modes", "train"],
                                    ["--repeats", "3"], ["--warmup", "0"], ["--threads", "1"], ["--malloc", "off"],
                                    ["--no-malloc-compare"], ["--no-memory"], ["--denormals", "keep"]])
def test_an_option_that_changes_the_numbers_is_not_the_standard_run(option):
    assert not bench.standard_run(bench.parse_args(option))
