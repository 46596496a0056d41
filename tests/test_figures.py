"""Every figure and table function draws from a small results tree made of real short runs (sklearn digits and
tiny PTB-format text, trained here), says what is missing instead of failing, and `make figures` writes them all.

The tree is the session fixture `results_tree` of conftest.py (test_analysis.py and test_notebooks.py use it too).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from recurrent_bn import figures
from recurrent_bn.config import CONF_DIR
from recurrent_bn.runs import Results, results_root, runs_at

REPO = CONF_DIR.parent
@pytest.fixture(scope="module")
def results(results_tree) -> Results:
    return Results(results_tree)


def lines_of(fig: Figure) -> int:
    return sum(len(ax.get_lines()) for ax in fig.axes)


def texts_of(fig: Figure) -> str:
    return "\n".join([t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts])


def labels_of(fig: Figure) -> list[str]:
    return [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]


def saves(fig: Figure, tmp_path: Path) -> bool:
    path = tmp_path / "figure.png"
    fig.savefig(path, dpi=40)
    return path.stat().st_size > 1000


# ------------------------------------------------------------------------------------------------- figures


def test_figure_1a_shows_the_whole_range_and_what_the_cap_hides(results, tmp_path):
    flow = results.analysis("fig1a_gradient_flow")
    fig = figures.figure_1a(flow, meta=results.analysis_meta("fig1a_gradient_flow"))
    assert len(fig.axes) == 9 and lines_of(fig) > 30 and saves(fig, tmp_path)
    capped = fig.axes[1]
    assert capped.get_ylim()[1] == 0  # log10(1)
    hidden = flow[(flow["variant"] == "bn_rnn") & (flow["log10_grad_norm"] > 0)]
    assert not hidden.empty and "hides" in texts_of(fig)
    assert fig.axes[0].get_ylim()[1] >= hidden["log10_grad_norm"].max()  # the uncapped panel shows the peak


def test_figure_1b_draws_the_mean_and_the_band(results, tmp_path):
    fig = figures.figure_1b(results.analysis("fig1b_tanh_derivative"))
    assert "0.61" in texts_of(fig) and "0.83" in texts_of(fig) and saves(fig, tmp_path)


def test_figure_2_draws_one_line_per_run_and_names_missing_models(results, tmp_path):
    runs = results.runs_of("fig2")
    fig = figures.figure_2(runs, results.reference)
    assert [ax.get_title() for ax in fig.axes] == ["sklearn digits (8×8, 64 steps)"]
    assert lines_of(fig) == runs["run_dir"].nunique() and saves(fig, tmp_path)
    assert "6 steps, hidden 8, batch 16" in texts_of(fig)
    fewer = figures.figure_2(runs[runs["model"].isin(["lstm", "bn_lstm"])], results.reference)
    assert "missing digits models: vbn_lstm, ln_lstm" in texts_of(fewer)


def valid_curves_from_files(run_dirs, metric: str) -> list[list[tuple[float, float]]]:
    """Each run's validation rows (step, metric), read from its metrics.csv with the csv module (not through
    load_runs), sorted: what a validation figure must plot."""
    curves = []
    for run_dir in run_dirs:
        with (Path(run_dir) / "metrics.csv").open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["split"] == "valid"]
        assert rows, run_dir
        curves.append([(float(row["step"]), float(row[metric])) for row in rows])
    return sorted(curves)


def drawn_curves(ax) -> list[list[tuple[float, float]]]:
    """The plotted data of an axes' curves (the paper's values are dotted horizontal lines, left out)."""
    return sorted([tuple(map(float, point)) for point in line.get_xydata()]
                  for line in ax.get_lines() if line.get_linestyle() != ":")


@pytest.mark.parametrize("name,prefix,metric", [("figure_2", "fig2", "acc"), ("figure_3a", "fig3", "bpc"),
                                                ("figure_8", "fig8", "acc")])
def test_validation_figures_plot_exactly_each_runs_validation_rows(results, name, prefix, metric):
    runs = results.runs_of(prefix)
    fig = getattr(figures, name)(runs, results.reference) if name != "figure_8" else figures.figure_8(runs)
    panel = fig.axes[0]
    expected = valid_curves_from_files(runs["run_dir"].unique(), metric)
    assert len(expected) >= 2 and drawn_curves(panel) == expected
    train_steps = {int(s) for s in runs.loc[runs["split"] == "train", "step"]}
    assert {x for curve in drawn_curves(panel) for x, _ in curve} != train_steps


def test_figure_2_shows_the_papers_values_for_the_mnist_tasks(results):
    runs = results.runs_of("fig2").assign(task="pmnist")  # relabelled in memory only, to reach the pMNIST panel
    fig = figures.figure_2(runs, results.reference)
    assert {"paper BN-LSTM @ 20k: 0.92", "paper LSTM @ 100k (plateau): 0.9"} <= set(labels_of(fig))


def test_figure_3a_and_3b_put_the_papers_values_beside_ours(results, tmp_path):
    fig = figures.figure_3a(results.runs_of("fig3"), results.reference)
    assert lines_of(fig) == 5 and "paper BN-LSTM @ 0.8k: 1.68" in labels_of(fig) and saves(fig, tmp_path)
    fig = figures.figure_3b(results.analysis("fig3b_bpc_vs_length"), results.reference)
    ours, paper = fig.axes
    assert [line.get_label() for line in ours.get_lines()] == [
        "LSTM", "BN-LSTM, population statistics", "BN-LSTM, batch statistics"]
    assert paper.get_lines()[1].get_ydata().tolist() == [1.398, 1.333]
    with (results.root / "analysis" / "fig3b_bpc_vs_length.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    for line, (model, mode) in zip(ours.get_lines(), [("lstm", "none"), ("bn_lstm", "population"),
                                                      ("bn_lstm", "batch")], strict=True):
        expected = sorted((float(r["length"]), float(r["bpc"])) for r in table
                          if (r["model"], r["mode"]) == (model, mode))
        assert [tuple(map(float, point)) for point in line.get_xydata()] == expected, (model, mode)


def test_figure_5_draws_every_sampled_unit_and_names_the_run(results, tmp_path):
    stats = results.analysis("fig5_population_statistics")
    fig = figures.all_figures(results)["fig5_population_statistics"]
    units = stats.groupby("term")["unit"].nunique()
    assert lines_of(fig) == 2 * units.sum() + 2 * len(units)  # a line per unit and statistic, plus settling marks
    assert "ptb: scale: 6 steps, hidden 8, batch 4 — 1 run" in texts_of(fig) and "fig3_ptb/1" in texts_of(fig)
    assert saves(fig, tmp_path)


def test_an_analysis_recorded_with_a_relative_run_path_finds_its_run(results):
    # The launch scripts record "results/runs/fig3_ptb/1" (relative to the repository); the summaries are absolute.
    relative = {"run_dir": "results/runs/fig3_ptb/1"}
    found = runs_at(results.summaries, relative)
    assert list(found["run_dir"]) == [str(results.root / "runs" / "fig3_ptb" / "1")]
    assert runs_at(results.summaries, {"run_dir": "results/runs/fig3_ptb/7"}).empty


def test_figure_6_plots_ptb_in_bits_and_says_the_paper_used_nats(results, tmp_path):
    runs = results.runs_of("fig6")
    fig = figures.figure_6(runs)
    assert len(fig.axes) == 4 and "nats" in texts_of(fig) and saves(fig, tmp_path)
    ptb_valid = [ax for ax in fig.axes if ax.get_title() == "Penn Treebank characters: valid"][0]
    expected = runs[(runs["task"] == "ptb") & (runs["split"] == "valid")]["bpc"]
    drawn = np.concatenate([line.get_ydata() for line in ptb_valid.get_lines()])
    assert sorted(drawn) == sorted(expected)
    assert "missing digits γ values: 0.3, 0.5, 0.7" in texts_of(fig)


def test_figure_7_separates_shared_statistics_and_term_ablations(results, tmp_path):
    fig = figures.figure_7(results.runs_of("fig7"))
    shared, terms = fig.axes[:2]
    assert sorted(line.get_label() for line in shared.get_lines()) == [
        "BN of input+recurrent+cell", "BN of input+recurrent+cell, statistics shared over time (partly, see below)",
        "LSTM (no normalization)"]
    assert {line.get_linestyle() for line in shared.get_lines()} == {"-", "--"}
    assert len(terms.get_lines()) == 4 and saves(fig, tmp_path)
    runs = results.runs_of("fig7")
    every_run = valid_curves_from_files(runs["run_dir"].unique(), "acc")
    for panel in (shared, terms):  # each curve is one run's validation rows
        assert all(curve in every_run for curve in drawn_curves(panel))


def test_figure_8_compares_the_tanh_question_models_and_their_gradient_flow(results, tmp_path):
    fig = figures.figure_8(results.runs_of("fig8"), results.analysis("fig1a_gradient_flow"),
                           results.analysis_meta("fig1a_gradient_flow"))
    curves, flow, tail = fig.axes
    assert len(curves.get_lines()) == 4 and len(flow.get_lines()) == 4 and len(tail.get_lines()) == 4
    assert "best valid" in texts_of(fig) and saves(fig, tmp_path)


@pytest.mark.parametrize("function", [figures.figure_2, figures.figure_3a, figures.figure_6, figures.figure_7,
                                      figures.figure_8, figures.figure_1a, figures.figure_1b, figures.figure_3b,
                                      figures.figure_5])
def test_every_figure_says_what_is_missing_instead_of_failing(function, tmp_path, caplog):
    fig = function(pd.DataFrame())
    assert isinstance(fig, Figure) and saves(fig, tmp_path)
    assert "no " in texts_of(fig) and caplog.records


# -------------------------------------------------------------------------------------------------- tables


def test_paper_tables_hold_the_papers_rows_and_ours(results):
    table2 = figures.paper_table(results.summaries_of("fig3"), results.reference, "table2")
    paper = table2[table2["source"] == "paper"]
    assert len(paper) == 8 and paper.set_index("model").loc["BN-LSTM", "ptb"] == 1.32
    ours = table2[table2["source"] == "ours"].set_index("model")
    assert set(ours.index) == {"LSTM", "BN-LSTM"} and (ours["runs"] == 1).all()
    summaries = results.summaries_of("fig3").set_index("model")
    # The main column is the authors' protocol (the whole split as one sequence); segments of 100 beside it.
    assert ours.loc["BN-LSTM", "ptb"] == summaries.loc["bn_lstm", "test_metric"]
    assert summaries.loc["bn_lstm", "test_metric"] == summaries.loc["bn_lstm", "test_stream_bpc"]
    assert ours.loc["BN-LSTM", "ptb (segments of 100)"] == summaries.loc["bn_lstm", "test_len100_bpc"]
    assert ours.loc["BN-LSTM", "ptb (segments of 100)"] != ours.loc["BN-LSTM", "ptb"]
    assert "6 steps, hidden 8" in ours.loc["BN-LSTM", "scale"]

    mnist = results.summaries_of("fig2").assign(task="smnist")  # relabelled in memory only
    table1 = figures.paper_table(mnist, results.reference, "table1")
    assert table1[table1["source"] == "paper"].set_index("model").loc["BN-LSTM", "pmnist"] == 95.4
    ours = table1[table1["source"] == "ours"].set_index("model")
    assert ours.loc["LSTM", "smnist"] == pytest.approx(100 * mnist.set_index("model").loc["lstm", "test_metric"])
    assert np.isnan(ours.loc["LSTM", "pmnist"])
    table3 = figures.paper_table(results.summaries_of("table3"), results.reference, "table3")
    assert set(table3["source"]) == {"paper"} and len(table3) == 6
    markdown = figures.to_markdown(table3)
    assert markdown.splitlines()[0].startswith("| source | model | text8 |")
    assert "| paper | BN-LSTM | 1.36 |" in markdown


def test_scale_label_reads_the_runs_configs(results):
    label = figures.scale_label(results.runs_of("fig6"))
    assert "digits: scale: 6 steps, hidden 8, batch 16 — 2 runs" in label and "ptb: scale: 6 steps, hidden 8" in label
    assert figures.scale_label(pd.DataFrame()) == "no runs"


def test_make_figures_writes_every_figure_and_table(results_tree, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_figures
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = tmp_path / "figures"
    assert make_figures.main(["--results", str(results_tree), "--out", str(out), "--dpi", "30"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {f"{name}.png" for name in figures.all_figures(Results(results_tree))} <= names
    assert {"table1.md", "table1.csv", "table2.md", "table3.md"} <= names


def test_paper_points_table_reads_our_validation_at_the_papers_steps():
    reference = pd.read_csv(results_root() / "paper_reference.csv")
    rows = [{"task": "pmnist", "model": model, "split": "valid", "step": step, "acc": acc, "bpc": np.nan,
             "job": f"pmnist_{model}_authors_s1", "run_dir": f"r/{model}"}
            for model, values in (("bn_lstm", {10000: 0.80, 20000: 0.90}), ("lstm", {10000: 0.70}))
            for step, acc in values.items()]
    rows.append({"task": "pmnist", "model": "rnn", "split": "valid", "step": 20000, "acc": 0.5, "bpc": np.nan,
                 "job": "tanh_pmnist_rnn_s1", "run_dir": "r/rnn"})  # the tanh question's runs stay out
    table = figures.paper_points_table(pd.DataFrame(rows), reference).set_index(["task", "model", "step"])
    bn = table.loc[("pmnist", "bn_lstm", 20000)]
    assert bn["ours_valid"] == 0.90 and bn["paper"] == 0.92 and bn["difference"] == pytest.approx(-0.02)
    assert np.isnan(table.loc[("pmnist", "lstm", 20000), "ours_valid"])  # not reached yet: blank, not filled in
    assert np.isnan(table.loc[("pmnist", "bn_lstm", 10000), "paper"])  # the paper is not read off there
    assert table.loc[("ptb", "bn_lstm", 800), "paper"] == 1.68 and table["runs"].max() == 1
    fig = figures.figure_paper_curves(pd.DataFrame(rows), reference)
    assert "pmnist: pmnist_bn_lstm_authors_s1 to step 20000, pmnist_lstm_authors_s1 to step 10000" in texts_of(fig)
    # Only the panel's own metric as crosses, and only up to the steps the campaign runs to: the sMNIST LSTM's
    # "erratic until 35k" read-off is a note, not a point at accuracy 35,000, and pMNIST's 100k points are left out.
    crosses = {ax.get_title(): [tuple(line.get_xydata()[0]) for line in ax.get_lines() if line.get_marker() == "x"]
               for ax in fig.axes}
    assert crosses["sequential MNIST"] == [(10000.0, 0.95)]
    assert sorted(crosses["permuted MNIST"]) == [(20000.0, 0.88), (20000.0, 0.92)]
    assert "erratic until about 35k" in texts_of(fig)


# ------------------------------------------------------------- the committed records: what each figure plots (#22)


@pytest.fixture(scope="module")
def committed() -> Results:
    """The repository's own results folder: the figures drawn from the committed records."""
    return Results(REPO / "results")


def valid_rows(runs: pd.DataFrame, metric: str) -> dict[str, list[tuple[float, float]]]:
    """(step, metric) of each run's validation rows, by run directory, as the records hold them."""
    rows = runs[(runs["split"] == "valid") & runs[metric].notna()]
    return {run_dir: sorted(zip(group["step"], group[metric], strict=True))
            for run_dir, group in rows.groupby("run_dir")}


def plotted(ax) -> list[list[tuple[float, float]]]:
    """The xy data of every line in `ax` that is a curve (more than one point, not a reference line)."""
    return [sorted(map(tuple, line.get_xydata())) for line in ax.get_lines()
            if len(line.get_xydata()) > 1 and line.get_linestyle() != ":"]


def test_figure_2_footnote_names_the_steps_the_papers_values_were_read_at(committed):
    fig = figures.figure_2(committed.runs_of("fig2"), committed.reference)
    notes = texts_of(fig)
    assert "after 100k iterations" not in notes and "(10k, 20k and 100k)" in notes
    smnist, pmnist = fig.axes
    assert "paper BN-LSTM @ 10k (lower bound): 0.95" in smnist.get_legend_handles_labels()[1]
    assert {"paper BN-LSTM @ 20k: 0.92", "paper LSTM @ 20k: 0.88"} <= set(pmnist.get_legend_handles_labels()[1])
    runs = committed.runs_of("fig2")
    for ax, task in ((smnist, "smnist"), (pmnist, "pmnist")):
        assert sorted(plotted(ax)) == sorted(valid_rows(runs[runs["task"] == task], "acc").values())


def test_figure_3a_sets_our_validation_against_the_papers_validation_not_its_test(committed):
    runs = committed.runs_of("fig3")
    fig = figures.figure_3a(runs, committed.reference)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert not any("test" in label for label in labels)
    assert {"paper BN-LSTM @ 0.8k: 1.68", "paper BN-LSTM @ 8k (minimum): 1.47",
            "paper LSTM @ 10k (minimum): 1.485"} <= set(labels)
    crosses = [tuple(line.get_xydata()[0]) for line in ax.get_lines() if line.get_marker() == "x"]
    assert crosses == [(800.0, 1.68)]  # within our 3,000 steps: a point; 8k and 10k are beyond them: lines
    assert sorted(plotted(ax)) == sorted(valid_rows(runs, "bpc").values())


def test_figure_3b_says_how_much_test_text_each_length_scored(committed):
    lengths = committed.analysis("fig3b_bpc_vs_length")
    notes = texts_of(figures.figure_3b(lengths, committed.reference))
    assert "not the same text at every length" in notes
    for length, characters in lengths.groupby("length")["characters"].first().items():
        assert f"{length}: {characters:,}" in notes
    same = lengths.assign(characters=1000)
    assert "every length scores the same 1,000 predictions" in texts_of(figures.figure_3b(same, committed.reference))


def test_figure_6_marks_where_gamma_1_diverged_on_the_pmnist_panels(committed):
    runs = committed.runs_of("fig6")
    fig = figures.figure_6(runs)
    diverged = runs[(runs["task"] == "pmnist") & (runs["status"] == "diverged")].drop_duplicates("run_dir")
    assert len(diverged) == 2 and set(diverged["gamma_init"]) == {1.0} and set(diverged["steps_done"]) == {25}
    for split in ("train", "valid"):
        ax = next(a for a in fig.axes if a.get_title() == f"permuted MNIST: {split}")
        marks = [line for line in ax.get_lines() if line.get_label().startswith("γ_init=1:")]
        assert [m.get_label() for m in marks] == ["γ_init=1: diverged by step 25 (2 of 2 runs; nothing logged)"]
        assert list(marks[0].get_xdata()) == [25, 25]
    valid = next(a for a in fig.axes if a.get_title() == "permuted MNIST: valid")
    assert sorted(plotted(valid)) == sorted(valid_rows(runs[runs["task"] == "pmnist"], "acc").values())


def test_figure_7_says_the_shared_statistics_are_shared_only_in_part(committed):
    runs = committed.runs_of("fig7")
    fig = figures.figure_7(runs)
    shared = fig.axes[0]
    dashed = [line for line in shared.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_label() for line in dashed] == [
        "BN of input+recurrent+cell, statistics shared over time (partly, see below)"]
    records = runs[runs["share_statistics_over_time"].astype(bool) & (runs["split"] == "valid")]
    assert sorted(map(tuple, dashed[0].get_xydata())) == sorted(zip(records["step"], records["acc"], strict=True))
    def unwrapped(fig) -> str:  # the footer wraps its lines
        return " ".join(texts_of(fig).split())

    assert figures.SHARED_STATISTICS_NOTE in unwrapped(fig)
    assert figures.SHARED_STATISTICS_NOTE not in unwrapped(figures.figure_7(runs[~runs["share_statistics_over_time"]]))


def test_tanh_figure_draws_the_linear_classifiers_validation_not_its_test_accuracy(committed):
    ceiling = committed.analysis_meta("linear_ceiling")
    fig = figures.figure_tanh_paper(committed.runs_of("tanh_question"), ceiling,
                                    committed.summaries_of("tanh_question"))
    (ax,) = fig.axes
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {ceiling["any_true_permutation"]["valid_acc"]}
    notes = texts_of(fig)
    assert f"{ceiling['any_true_permutation']['test_acc']:.4f}" in notes
    summary = committed.summaries_of("tanh_question").set_index("job").loc["tanh_pmnist_rnn_s1"]
    assert f"test accuracy of tanh_pmnist_rnn_s1 (best checkpoint): {summary['test_metric']:.4f}" in notes


def test_paper_curves_draw_the_papers_values_only_up_to_the_steps_we_ran(committed):
    runs = committed.runs_of("paper_curves")
    fig = figures.figure_paper_curves(runs, committed.reference)
    panels = {ax.get_title(): ax for ax in fig.axes}
    for title, task, metric in (("sequential MNIST", "smnist", "acc"), ("Penn Treebank characters", "ptb", "bpc")):
        of_task = runs[runs["task"] == task]
        ax = panels[title]
        crosses = [tuple(line.get_xydata()[0]) for line in ax.get_lines() if line.get_marker() == "x"]
        assert crosses and all(step <= of_task["step"].max() for step, _ in crosses)
        assert sorted(plotted(ax)) == sorted(valid_rows(of_task, metric).values())
    reached = runs[runs["task"] == "ptb"]["step"].max()
    if reached < 8000:
        assert "paper BN-LSTM @ 8k (minimum): 1.47, beyond the steps our runs reached (not drawn)" in texts_of(fig)


def test_paper_points_compare_a_lower_bound_by_whether_we_meet_it():
    reference = pd.read_csv(results_root() / "paper_reference.csv")
    rows = [{"task": "smnist", "model": "bn_lstm", "split": "valid", "step": 10000, "acc": acc, "bpc": np.nan,
             "job": f"smnist_bn_lstm_s{seed}", "run_dir": f"r/{seed}"} for seed, acc in ((1, 0.962),)]
    table = figures.paper_points_table(pd.DataFrame(rows), reference).set_index(["task", "model", "step"])
    point = table.loc[("smnist", "bn_lstm", 10000)]
    assert point["paper_is"] == "lower bound" and np.isnan(point["difference"])
    assert point["against_paper"] == "meets the bound (≥ 0.95)"
    rows[0]["acc"] = 0.94
    below = figures.paper_points_table(pd.DataFrame(rows), reference).set_index(["task", "model", "step"])
    assert below.loc[("smnist", "bn_lstm", 10000), "against_paper"] == "below the bound (≥ 0.95)"
    assert table.loc[("ptb", "bn_lstm", 800), "paper_is"] == "value"


def test_tables_hold_the_paper_setup_runs_and_the_test_protocol_the_records_used(committed):
    tables = figures.all_tables(committed)
    summaries = committed.summaries_of("paper_curves")
    table1 = tables["table1"].set_index(["source", "model"])
    for model, label in (("lstm", "LSTM"), ("bn_lstm", "BN-LSTM")):
        done = summaries[(summaries["task"] == "smnist") & (summaries["model"] == model)
                         & (summaries["status"] == "completed")]
        assert table1.loc[("ours, paper setup", label), "smnist"] == pytest.approx(100 * done["test_metric"].mean())
        assert "paper scale (paper_smnist)" in table1.loc[("ours, paper setup", label), "scale"]
    cpu = committed.summaries_of("fig3")
    assert set(cpu["eval_streams"]) == {64}
    table2 = tables["table2"].set_index(["source", "model"])
    assert table2.loc[("ours", "BN-LSTM"), "test protocol"] == (
        "the split cut into 64 contiguous sequences, each read with the state carried")
    assert "whole test split read as one sequence" not in figures.TABLE_TITLES["table2"]


def test_an_analysis_recorded_in_another_checkout_finds_its_run(results):
    # fig5's analysis names /work/main/results/runs/fig3_ptb/1; a clone elsewhere holds the same run.
    elsewhere = {"run_dir": "/elsewhere/checkout/results/runs/fig3_ptb/1"}
    assert list(runs_at(results.summaries, elsewhere)["run_dir"]) == [str(results.root / "runs" / "fig3_ptb" / "1")]
