"""The analyses against mathematics: the expected tanh derivative, the stepwise gradient flow (equal to one call
and to plain autograd, exact through zero-variance steps and past float64's range), population statistics,
bpc against the evaluation length, and the loaders of runs."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

import recurrent_bn
from recurrent_bn import analysis
from recurrent_bn.models import SequenceClassifier
from recurrent_bn.runs import effective_norm_terms, load_runs, load_summaries, load_trained_model, select

REPO = Path(__file__).resolve().parents[1]


def classifier(layer: torch.nn.Module) -> SequenceClassifier:
    return SequenceClassifier(layer, 10).double()


def pixels(steps: int = 24, batch: int = 12, zero_steps: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative pixel-like inputs (T, B, 1), the first `zero_steps` all zero as at the top of MNIST images."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(steps, batch, 1, generator=generator, dtype=torch.float64)
    x[:zero_steps] = 0
    return x, torch.randint(0, 10, (batch,), generator=generator)


# ------------------------------------------------------------------------------------------------ Figure 1b


def test_expected_tanh_derivative_matches_the_paper_and_monte_carlo():
    table = analysis.expected_tanh_derivative([0.1, 0.5, 1.0])
    assert table["mean"].round(2).tolist() == [0.99, 0.83, 0.61]
    generator = np.random.default_rng(0)
    samples = 400_000
    for row in table.itertuples():
        derivative = analysis.tanh_derivative(row.sigma * generator.standard_normal(samples))
        standard_error = derivative.std() / math.sqrt(samples)
        assert abs(derivative.mean() - row.mean) < 4 * standard_error
        for q, column in ((0.25, "q25"), (0.5, "q50"), (0.75, "q75")):
            assert abs(np.quantile(derivative, q) - getattr(row, column)) < 3e-3


def test_expected_tanh_derivative_is_one_at_zero_and_decreases():
    table = analysis.expected_tanh_derivative(np.linspace(0, 2, 21))
    assert table["mean"].iloc[0] == pytest.approx(1.0)
    assert (np.diff(table["mean"]) < 0).all()
    assert ((table["q25"] <= table["q50"]) & (table["q50"] <= table["q75"])).all()


# ------------------------------------------------------------------------------------------------ Figure 1a


# The plain-PyTorch loops (what the analysis differentiates), initialised as the paper's models are.
REFERENCE = {"backend": "reference", "init": "authors"}
LAYERS = {
    "bn_rnn_sum": lambda: recurrent_bn.RNN(1, 8, norm="bn", recurrent_init="identity", gamma_init=0.5, max_length=30,
                                           **REFERENCE),
    "bn_rnn_separate_noise": lambda: recurrent_bn.RNN(1, 8, norm="bn", norm_placement="separate", max_length=30,
                                                      init_state_noise=0.1, **REFERENCE),
    "bn_lstm_noise": lambda: recurrent_bn.LSTM(1, 8, norm="bn", max_length=30, init_state_noise=0.1, **REFERENCE),
    "ln_lstm": lambda: recurrent_bn.LSTM(1, 8, norm="ln", max_length=30, **REFERENCE),
    "lstm_two_layers": lambda: recurrent_bn.LSTM(1, 8, 2, max_length=30, **REFERENCE),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_stepwise_run_equals_the_one_call_run_in_training_mode(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().double().train()
    x, _ = pixels()
    torch.manual_seed(1)
    expected, final = layer(x)
    torch.manual_seed(1)
    output, _, produced = analysis.stepwise_forward(layer, x)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    for ours, theirs in zip(produced[-1], final if isinstance(final, tuple) else (final,), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["bn_rnn_sum", "bn_rnn_separate_noise", "bn_lstm_noise", "ln_lstm"])
def test_stepwise_gradient_flow_equals_plain_autograd(name):
    """The rescaled step-by-step backward pass gives the same ‖∂loss/∂h_t‖ as one autograd pass with retained
    gradients, where no norm leaves float64's range."""
    torch.manual_seed(0)
    model = classifier(LAYERS[name]())
    x, y = pixels()
    flow = analysis.gradient_flow(model, x, y, seed=3)
    reference = copy.deepcopy(model).train()
    torch.manual_seed(3)
    _, _, produced = analysis.stepwise_forward(reference.recurrent, x)
    states = [state[0] for state in produced]
    for state in states:
        state.retain_grad()
    F.cross_entropy(reference.head(states[-1][-1]), y).backward()
    expected = np.array([float(s.grad[-1].norm(dim=-1).mean()) for s in states])
    np.testing.assert_allclose(flow["grad_norm"], expected, rtol=1e-9)
    assert flow["t"].tolist() == list(range(1, x.shape[0] + 1))


def test_tanh_rnn_with_zero_recurrent_weights_has_no_gradient_before_the_last_step():
    torch.manual_seed(0)
    model = classifier(recurrent_bn.RNN(1, 8, **REFERENCE))
    with torch.no_grad():
        model.recurrent.weight_hh_l0.zero_()
    x, y = pixels()
    flow = analysis.gradient_flow(model, x, y)
    assert flow["grad_norm"][-1] > 0
    assert (flow["grad_norm"][:-1] == 0).all() and np.isneginf(flow["log10_grad_norm"][:-1]).all()


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_zero_variance_steps_multiply_the_gradient_by_gamma_over_sqrt_eps_past_float64s_range(gamma):
    """While every example is identical (zero inputs, zero h_0), BN's Jacobian is γ/sqrt(eps) (I - 11ᵀ/B) and
    tanh'(0) = 1, so with W_h = I each step back multiplies the (batch-centred) gradient by γ/sqrt(eps) exactly:
    300 such steps reach 1e+450 (γ=0.1) or 1e+750, far past float64, without overflowing."""
    torch.manual_seed(0)
    model = classifier(recurrent_bn.RNN(1, 8, norm="bn", recurrent_init="identity", gamma_init=gamma,
                                        max_length=400, **REFERENCE))
    x, y = pixels(steps=320, zero_steps=300)
    assert analysis.first_informative_step(x) == 300 and analysis.all_informative_step(x) == 300
    log10 = analysis.gradient_flow(model, x, y)["log10_grad_norm"]
    per_step = np.diff(log10[:299])
    np.testing.assert_allclose(-per_step, math.log10(gamma / math.sqrt(1e-5)), atol=1e-9)
    assert np.isfinite(log10).all() and log10[0] > 300


def test_initial_state_noise_removes_the_zero_variance_explosion():
    torch.manual_seed(0)
    layer = recurrent_bn.RNN(1, 8, norm="bn", recurrent_init="identity", gamma_init=0.5, max_length=60, **REFERENCE)
    x, y = pixels(steps=60, zero_steps=40)
    plain = analysis.gradient_flow(classifier(layer), x, y)["log10_grad_norm"]
    layer.init_state_noise = 0.1
    noisy = analysis.gradient_flow(classifier(layer), x, y)["log10_grad_norm"]
    assert plain[0] > 30 and noisy[0] < 2


def test_gradient_flow_leaves_the_model_and_its_statistics_untouched():
    torch.manual_seed(0)
    model = SequenceClassifier(recurrent_bn.LSTM(1, 8, norm="bn", max_length=30, **REFERENCE), 10).eval()
    before = copy.deepcopy(model.state_dict())
    analysis.gradient_flow(model, *pixels())
    assert not model.training and next(model.parameters()).dtype == torch.float32
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradient_flow_table_builds_models_from_the_trainers_configs():
    x, y = pixels(steps=64, batch=10, zero_steps=5)
    variants = (analysis.FlowVariant("bn_rnn", "bn_rnn", ("model.init_state_noise=0", "model.hidden_size=6"),
                                     (0.1, 1.0)),
                analysis.FlowVariant("lstm", "lstm", ("model.hidden_size=6",)))
    flow = analysis.gradient_flow_table(variants, x.float(), y, task="digits")
    assert len(flow) == 3 * 64
    assert sorted(flow["gamma_init"].dropna().unique()) == [0.1, 1.0] and flow["gamma_init"].isna().sum() == 64
    assert set(flow["recurrent_init"]) == {"identity"} and set(flow["hidden_size"]) == {6}
    summary = analysis.summarize_gradient_flow(flow, first_informative=5)
    bn = summary[summary["variant"] == "bn_rnn"].set_index("gamma_init")
    assert (bn["t_of_max"] == 1).all() and (bn["n_above_1"] >= 3).all()  # the 5 zero steps explode
    assert summary.loc[summary["variant"] == "lstm", "n_above_1"].item() == 0


def test_summary_counts_steps_from_the_end_below_1e_26():
    flow = pd.DataFrame({"variant": "v", "gamma_init": 0.5, "t": np.arange(1, 11),
                         "log10_grad_norm": [5, -30, -30, -27, -20, -10, -5, -3, -2, -1]})
    row = analysis.summarize_gradient_flow(flow).iloc[0]
    assert row["steps_below_1e-26"] == 6 and row["n_above_1"] == 1 and row["max_log10"] == 5


# ------------------------------------------------------------------------------- Figure 5, Figure 3b, runs


def test_population_statistics_are_the_per_timestep_buffers_with_their_gates():
    torch.manual_seed(0)
    model = SequenceClassifier(recurrent_bn.LSTM(1, 6, norm="bn", max_length=20, **REFERENCE), 10)
    batches = [pixels(steps=12, seed=s)[0].float() for s in range(3)]
    recurrent_bn.estimate_population_statistics(model, batches)
    stats = analysis.population_statistics(model.state_dict(), units=5, seed=1)
    assert set(stats["term"]) == {"recurrent", "cell", "input"} and stats["t"].max() == 12  # trained_length
    norm = model.recurrent.norm_hh_l0
    for unit, rows in stats[stats["term"] == "recurrent"].groupby("unit"):
        np.testing.assert_allclose(rows["mean"], norm.running_mean[:12, unit].double().numpy())
        np.testing.assert_allclose(rows["var"], norm.running_var[:12, unit].double().numpy())
        assert rows["gate"].iloc[0] == "ifgo"[unit // 6]
    assert set(stats.loc[stats["term"] == "cell", "gate"]) == {""}
    assert (analysis.settling_step(stats)["median_settling_step"] >= 1).all()


def test_population_statistics_refuse_a_model_without_batch_norm():
    with pytest.raises(ValueError, match="no per-timestep"):
        analysis.population_statistics(SequenceClassifier(recurrent_bn.LSTM(1, 4, **REFERENCE), 10).state_dict())


def test_batch_statistics_copy_normalizes_with_each_minibatch_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = SequenceClassifier(recurrent_bn.LSTM(1, 6, norm="bn", max_length=20, **REFERENCE), 10)
    recurrent_bn.estimate_population_statistics(model, [pixels(steps=12, seed=s)[0].float() for s in range(3)])
    model.eval()
    before = copy.deepcopy(model.state_dict())
    batch_model = analysis.with_batch_statistics(model)
    x = pixels(steps=30, seed=7)[0].float()  # longer than T_max = 12
    with torch.no_grad():
        ours = batch_model(x)
        train_copy = copy.deepcopy(model).train()
        expected = train_copy(x)
        population = model(x)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, population)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bpc_vs_length_and_loaders_on_real_short_runs(results_tree, one_thread):
    runs_root = results_tree / "runs"
    bn_run = runs_root / "fig3_ptb" / "1"
    frame = analysis.bpc_vs_length(bn_run, lengths=[12, 30], batch_size=2, limit=3)
    assert set(frame["mode"]) == {"population", "batch"} and sorted(frame["length"].unique()) == [12, 30]
    assert ((frame["bpc"] > 0) & (frame["bpc"] < 10)).all()
    assert (frame.groupby("length")["characters"].nunique() == 1).all()  # the same segments in both modes
    lstm = analysis.bpc_vs_length(runs_root / "fig3_ptb" / "0", lengths=[12], batch_size=2, limit=3)
    assert lstm["mode"].tolist() == ["none"]

    runs = load_runs(runs_root)
    assert {"fig2_digits", "fig3_ptb", "fig8_tanh_digits"} <= set(runs["experiment"])
    assert set(runs["split"]) >= {"train", "valid", "test"}
    one = runs[runs["run_dir"] == str(bn_run)]
    assert set(one["task"]) == {"ptb"} and set(one["model"]) == {"bn_lstm"} and set(one["status"]) == {"completed"}
    assert set(one["norm_terms"]) == {"input+recurrent+cell"} and set(one["hidden_size"]) == {8}
    summaries = load_summaries(runs_root)
    assert len(summaries) == runs["run_dir"].nunique() and summaries["test_metric"].notna().all()
    assert set(select(summaries, "fig2")["experiment"]) == {"fig2_digits"}
    # vbn shares its statistics by definition (and its model file says so); among the others only Figure 7's runs do
    shared = summaries[summaries["share_statistics_over_time"] & (summaries["norm"] != "vbn")]
    assert set(shared["experiment"]) == {"fig7_shared_digits"}
    assert load_runs(runs_root / "nothing here").empty


@pytest.fixture
def one_thread():
    """One torch thread for the analyses of tiny models: per-op synchronisation of two threads dominates them (and
    costs ten times more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def copy_of_run(run_dir: Path, to: Path) -> Path:
    """A copy of a run's config, summary and final.pt, whose final.pt a test may change."""
    to.mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "final.pt"):
        (to / name).write_bytes((run_dir / name).read_bytes())
    return to


def edit_final(run_dir: Path, edit) -> None:
    checkpoint = torch.load(run_dir / "final.pt", weights_only=True)
    edit(checkpoint["model"])
    torch.save(checkpoint, run_dir / "final.pt")


def ptb_test_ids(results_tree) -> torch.Tensor:
    """The PTB-format test split of the results tree, read from its files (not through the analysis)."""
    from recurrent_bn import data

    return data.load_ptb_chars(results_tree.parent / "data", verify=False)[0]["test"].long()


def bits_by_hand(model, segments: torch.Tensor, batch_size: int) -> float:
    """Mean -log2 p(next character) over consecutive full batches of `segments` (N, L), from log-softmax in float64:
    the definition of bits per character, written out."""
    bits, count = 0.0, 0
    for start in range(0, len(segments) - batch_size + 1, batch_size):
        batch = segments[start : start + batch_size].t()  # (L, B)
        with torch.no_grad():
            logits, _ = model(batch[:-1])
        log_p = torch.log_softmax(logits.double(), -1).gather(-1, batch[1:, :, None])
        bits -= float(log_p.sum()) / math.log(2)
        count += batch[1:].numel()
    return bits / count


def test_bpc_of_a_model_that_predicts_a_fixed_distribution_is_its_cross_entropy_in_bits(results_tree, tmp_path,
                                                                                      one_thread):
    """Zero read-out weights make the model predict softmax(bias) at every step, whatever it read: uniform gives
    log2 V bits exactly; a bias of log q gives the cross-entropy -Σ_c n_c log2 q_c / N of the targets' counts n_c."""
    run = copy_of_run(results_tree / "runs" / "fig3_ptb" / "1", tmp_path / "run")
    vocabulary = torch.load(run / "final.pt", weights_only=True)["model"]["head.bias"].numel()
    edit_final(run, lambda state: (state["head.weight"].zero_(), state["head.bias"].zero_()))
    uniform = analysis.bpc_vs_length(run, lengths=[12, 30], batch_size=2)
    assert set(uniform["mode"]) == {"population", "batch"}
    np.testing.assert_allclose(uniform["bpc"], math.log2(vocabulary), rtol=1e-12)

    generator = np.random.default_rng(0)
    q = generator.dirichlet(np.ones(vocabulary))
    edit_final(run, lambda state: state["head.bias"].copy_(torch.from_numpy(np.log(q))))
    ids = ptb_test_ids(results_tree)
    for length in (12, 30):
        frame = analysis.bpc_vs_length(run, lengths=[length], batch_size=2)
        segments = ids[: len(ids) // length * length].view(-1, length)
        segments = segments[: len(segments) // 2 * 2]  # full batches of 2 only
        counts = np.bincount(segments[:, 1:].reshape(-1).numpy(), minlength=vocabulary)
        expected = -(counts * np.log2(q)).sum() / counts.sum()
        np.testing.assert_allclose(frame["bpc"], expected, rtol=1e-6)  # log q stored in float32
        assert (frame["characters"] == counts.sum()).all()


def sharpen(state: dict) -> None:
    """Random weights of unit scale in place of the 6-step run's (whose predictions are nearly uniform whatever its
    statistics): the modes then differ by far more than rounding. The stored population statistics stay."""
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith(("weight", "bias")) or "weight_" in key or "bias_" in key:
            value.copy_(torch.randn(value.shape, generator=generator) * (0.3 if "norm" in key else 1.0)
                        + (0.7 if "norm" in key and key.endswith("weight") else 0.0))


def test_bpc_vs_length_equals_log2_probabilities_by_hand_in_each_statistics_mode(results_tree, tmp_path, one_thread):
    """"population": the model in evaluation mode (final.pt's population statistics); "batch": the whole model in
    training mode (no dropout, no noise in this run), so each minibatch is normalized with its own statistics."""
    run = copy_of_run(results_tree / "runs" / "fig3_ptb" / "1", tmp_path / "run")
    edit_final(run, sharpen)
    model, cfg = load_trained_model(run)
    assert float(cfg.model.dropout) == 0 and float(cfg.model.init_state_noise) == 0
    frame = analysis.bpc_vs_length(run, lengths=[12, 30], batch_size=2).set_index(["mode", "length"])["bpc"]
    ids = ptb_test_ids(results_tree)
    for length in (12, 30):
        segments = ids[: len(ids) // length * length].view(-1, length)
        population = bits_by_hand(copy.deepcopy(model).eval(), segments, 2)
        batch = bits_by_hand(copy.deepcopy(model).train(), segments, 2)
        assert abs(population - batch) > 0.1  # the modes differ here, so a swap cannot pass
        assert frame["population", length] == pytest.approx(population, rel=1e-9)
        assert frame["batch", length] == pytest.approx(batch, rel=1e-9)


def test_only_the_population_mode_reads_the_population_statistics(results_tree, tmp_path, one_thread):
    """Shifting every stored population mean by 3 and dividing every variance by 1000 must change the "population"
    bpc and leave the "batch" bpc exactly as it was."""
    run = copy_of_run(results_tree / "runs" / "fig3_ptb" / "1", tmp_path / "run")
    edit_final(run, sharpen)
    before = analysis.bpc_vs_length(run, lengths=[12], batch_size=2).set_index("mode")["bpc"]

    def corrupt(state):
        for key, value in state.items():
            if key.endswith("running_mean"):
                value.add_(3.0)
            elif key.endswith("running_var"):
                value.mul_(1e-3)

    edit_final(run, corrupt)
    after = analysis.bpc_vs_length(run, lengths=[12], batch_size=2).set_index("mode")["bpc"]
    assert after["batch"] == before["batch"]
    assert abs(after["population"] - before["population"]) > 0.1


def test_a_run_without_its_checkpoints_says_why_and_what_to_do(results_tree, tmp_path):
    # A clone of results/ has the runs' curves and configs but no *.pt files (they are git-ignored).
    clone = tmp_path / "fig3_ptb" / "1"
    clone.mkdir(parents=True)
    for name in ("config.yaml", "summary.json"):
        (clone / name).write_bytes((results_tree / "runs" / "fig3_ptb" / "1" / name).read_bytes())
    for call in (lambda: analysis.bpc_vs_length(clone, lengths=[12]), lambda: analysis.population_statistics(clone)):
        with pytest.raises(FileNotFoundError, match=r"final.pt does not exist.*not in git.*rerun the experiment"):
            call()


def test_effective_norm_terms_resolve_each_models_default():
    cases = {"lstm": "none", "bn_lstm": "input+recurrent+cell", "vbn_lstm": "input", "ln_lstm": "input+recurrent+cell",
             "rnn": "none", "bn_rnn": "sum", "bn_linear_rnn": "input+recurrent", "ln_rnn": "sum"}
    for model, expected in cases.items():
        cfg = analysis.compose_config(model, task="digits")
        assert effective_norm_terms(cfg.model) == expected, model
    cfg = analysis.compose_config("bn_lstm", ["model.norm_terms=[recurrent,cell]"], task="digits")
    assert effective_norm_terms(cfg.model) == "recurrent+cell"


# ------------------------------------------------------------------------------------------------- wandb


def load_export_script():
    spec = importlib.util.spec_from_file_location("export_wandb", REPO / "scripts" / "export_wandb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wandb_export_converts_a_run_into_the_layout_load_runs_reads(tmp_path):
    export = load_export_script()
    config = analysis.compose_config("bn_lstm", task="digits")
    from omegaconf import OmegaConf

    history = [  # as our trainer logs: one dict per step, train and valid rows of the same step merged
        {"_step": 10, "_runtime": 1.0, "train/loss": 2.0, "train/acc": 0.2, "train/grad_norm": 0.5, "train/lr": 1e-3},
        {"_step": 20, "train/loss": 1.5, "train/acc": 0.4, "valid/loss": 1.6, "valid/acc": 0.35, "valid/bpc": None},
        {"_step": 20, "test/loss": 1.7, "test/acc": 0.33},
    ]
    run = SimpleNamespace(id="abc123", name="digits-bn_lstm-0", state="finished", url="https://wandb.ai/x/y/abc123",
                          config={**OmegaConf.to_container(config, resolve=True), "_wandb": {"x": 1}},
                          summary={"best_valid_metric": 0.35, "best_step": 20, "test_metric": 0.33, "steps": 20},
                          scan_history=lambda: iter(history))
    run_dir = export.run_to_files(run, tmp_path / "fig2_wandb")
    runs = load_runs(tmp_path)
    assert runs[["step", "split"]].values.tolist() == [[10, "train"], [20, "train"], [20, "valid"], [20, "test"]]
    assert runs["acc"].tolist() == [0.2, 0.4, 0.35, 0.33] and runs["lr_now"].iloc[0] == 1e-3
    assert set(runs["task"]) == {"digits"} and set(runs["model"]) == {"bn_lstm"}
    assert set(runs["status"]) == {"completed"} and set(runs["experiment"]) == {"fig2_wandb"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_metric"] == 0.33 and "_wandb" not in summary["config"]


def test_a_run_directory_inside_another_run_is_not_a_second_run(tmp_path):
    # The campaign carries a run started again behind its longer record in <record>/restart/: one run, not two
    # (figures and summaries read every run found under results/runs/).
    from recurrent_bn.runs import find_run_dirs

    tanh = tmp_path / "tanh"
    for directory in (tanh / "bn_rnn", tanh / "bn_rnn" / "restart", tanh / "rnn"):
        directory.mkdir(parents=True)
        (directory / "metrics.csv").write_text("step,split,loss\n50,train,1.0\n")
    assert find_run_dirs(tmp_path) == [tanh / "rnn", tanh / "bn_rnn"]
    assert find_run_dirs(tanh / "bn_rnn") == [tanh / "bn_rnn"]
