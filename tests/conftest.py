"""Fixtures shared by the test modules: the Hydra config exactly as the trainer composes it, and a small results
folder of real short runs and their analyses (built once per session, used by test_figures.py, test_analysis.py
and test_notebooks.py). The tiny datasets in real file formats are in fixtures.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import make_ptb
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from recurrent_bn import analysis, data
from recurrent_bn.config import CONF_DIR
from recurrent_bn.provenance import provenance, write_analysis
from recurrent_bn.recurrence import fused_available
from recurrent_bn.trainer import train

REPO = CONF_DIR.parent


def compose_config(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The config `python -m recurrent_bn.train <overrides>` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def make_cfg():
    """`make_cfg(*overrides)`: the composed config (`compose_config`)."""
    return compose_config


@pytest.fixture(params=["reference"] + (["fused"] if fused_available() else []))
def backend(request):
    """Each backend of the layers that runs on this machine's CPU."""
    return request.param


@pytest.fixture
def float64():
    """float64 as the default dtype for the test (equivalences to 1e-10); modules ask for it with usefixtures."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ------------------------------------------------------------------------------------------ the results tree


TINY = ["model.hidden_size=8", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3",
        "trainer.log_every=2", "logger=csv", "data.verify=false", "trainer.threads=1",
        "model.backend=reference"]  # the fused LSTM kernels are tested elsewhere; here they would only cost a build
DIGITS = ["task=digits", "task.batch_size=16"]
WORDS = "the cat sat on a mat and dog ran far N miles <unk> to see my old friend 's house".split()
RUNS = {  # sweep directory → one list of overrides per job, as the experiments/ scripts lay them out
    "fig2_digits": [[*DIGITS, f"model={m}"] for m in ("lstm", "bn_lstm", "vbn_lstm", "ln_lstm")],
    "fig3_ptb": [["PTB", f"model={m}"] for m in ("lstm", "bn_lstm")],
    "fig6_gamma_digits": [[*DIGITS, "model=bn_lstm", f"model.gamma_init={g}"] for g in (0.1, 1.0)],
    "fig6_gamma_ptb": [["PTB", "model=bn_lstm", f"model.gamma_init={g}"] for g in (0.1, 1.0)],
    "fig7_terms_digits": [[*DIGITS, "model=bn_lstm", f"model.norm_terms={t}"]
                          for t in ("[input]", "[recurrent,cell]", "[input,recurrent,cell]")],
    "fig7_shared_digits": [[*DIGITS, "model=bn_lstm", "model.share_statistics_over_time=true"]],
    "fig7_baseline_digits": [[*DIGITS, "model=lstm"]],
    "fig8_tanh_digits": [[*DIGITS, f"model={m}"] for m in ("rnn", "bn_rnn", "bn_linear_rnn", "ln_rnn")],
}


def build_results_tree(root: Path) -> Path:
    """results/ in miniature: runs/<sweep>/<job>/ from real 6-step trainings, the analyses, the reference."""
    torch.manual_seed(0)
    data_root = root / "data"
    generator = np.random.default_rng(0)
    make_ptb(data_root, {split: [" " + " ".join(generator.choice(WORDS, 12)) + " " for _ in range(count)]
                         for split, count in (("train", 40), ("valid", 8), ("test", 8))})
    vocabulary = len(data.load_ptb_chars(data_root, verify=False)[1])
    ptb = ["task=ptb", "task.seq_len=12", "task.eval_seq_len=12", "task.batch_size=4", "task.eval_batch_size=8",
           "task.eval_streams=2", f"task.num_classes={vocabulary}", f"task.input_size={vocabulary}",
           f"data.root={data_root}"]
    results = root / "results"
    for sweep, jobs in RUNS.items():
        for job, overrides in enumerate(jobs):
            overrides = [o for part in overrides for o in (ptb if part == "PTB" else [part])]
            train(compose_config(*overrides, *TINY), results / "runs" / sweep / str(job))
    torch.set_num_threads(1)

    pixels, labels = data.load_digits()["train"]
    blank_top = (pixels[:, :3] == 0).all(1).nonzero()[:20, 0]  # 3 zero steps for every example, as MNIST's ~100
    x, y = next(data.class_eval_batches(pixels[blank_top], labels[blank_top], 20, device="cpu", pixel_max=16))
    variants = [analysis.FlowVariant(v.name, v.model, (*v.overrides, "model.hidden_size=6"),
                                     tuple(g for g in v.gammas if g in (None, 0.1, 1.0)))
                for v in analysis.FIGURE_1A_VARIANTS + analysis.TANH_QUESTION_VARIANTS]
    flow = analysis.gradient_flow_table(variants, x, y, task="digits")
    meta = provenance("tests", task="digits", batch="20 sklearn digits whose first 3 pixels are 0",
                      first_informative_step_0based=analysis.first_informative_step(x),
                      all_informative_step_0based=analysis.all_informative_step(x))
    write_analysis(flow, results / "analysis" / "fig1a_gradient_flow.csv", meta)
    write_analysis(analysis.expected_tanh_derivative(np.linspace(0, 2, 41)),
                   results / "analysis" / "fig1b_tanh_derivative.csv", provenance("tests"))
    lengths = pd.concat([analysis.bpc_vs_length(results / "runs" / "fig3_ptb" / job, [12, 24], batch_size=2, limit=2)
                         for job in ("0", "1")], ignore_index=True)
    write_analysis(lengths, results / "analysis" / "fig3b_bpc_vs_length.csv", provenance("tests"))
    stats = analysis.population_statistics(results / "runs" / "fig3_ptb" / "1", units=5)
    write_analysis(stats, results / "analysis" / "fig5_population_statistics.csv",
                   provenance("tests", run_dir=str(results / "runs" / "fig3_ptb" / "1"), units=5))
    shutil.copy(REPO / "results" / "paper_reference.csv", results / "paper_reference.csv")
    return results


@pytest.fixture(scope="session")
def results_tree(tmp_path_factory) -> Path:
    """The small results folder of `build_results_tree`, built once per test session."""
    threads = torch.get_num_threads()
    try:
        return build_results_tree(tmp_path_factory.mktemp("results_tree"))
    finally:
        torch.set_num_threads(threads)
