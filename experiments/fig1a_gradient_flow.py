"""Figure 1a (and the gradient panel of Figure 8): ‖∂loss/∂h_t‖ over t at initialization on a real MNIST batch.

    python experiments/fig1a_gradient_flow.py [--batch 100] [--seed 0]

Writes <RBN_ANALYSIS>/fig1a_gradient_flow.csv (one row per variant, γ and t), fig1a_gradient_flow_summary.csv
(what a y-axis capped at 1 hides, per variant and γ) and a .json beside each with the command and machine.
Needs MNIST under RBN_DATA_ROOT (or ./data). The same at every scale: it is a property of the initialization.
About 2 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from _launch import analysis_root

from recurrent_bn import analysis, data
from recurrent_bn.provenance import provenance, write_analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100, help="MNIST training images (the paper's batch: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and initial-state noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="output CSV (default <RBN_ANALYSIS>/fig1a_gradient_flow.csv)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    out = analysis_root() / "fig1a_gradient_flow.csv" if args.out is None else Path(args.out)
    start = time.time()
    x, y = analysis.mnist_batch(size=args.batch)
    first = analysis.first_informative_step(x)
    variants = analysis.FIGURE_1A_VARIANTS + analysis.TANH_QUESTION_VARIANTS
    flow = analysis.gradient_flow_table(variants, x, y, seed=args.seed)
    meta = provenance(
        data_root=str(data.resolve_data_root(None)), task="smnist",
        batch=f"the first {args.batch} images of the MNIST training split, scanline order (sequential MNIST)",
        first_informative_step_0based=first,
        all_informative_step_0based=analysis.all_informative_step(x), seed=args.seed, dtype="float64",
        mode="training (batch statistics)",
        loss="mean cross-entropy of the linear read-out of h_T", wall_time_s=round(time.time() - start, 1),
        variants={v.name: {"model": v.model, "overrides": list(v.overrides), "gammas": list(v.gammas),
                           "description": v.description} for v in variants},
    )
    # The per-variant settings (overrides, noise, placement, init) are in the JSON: the CSV keeps what is plotted.
    columns = ["variant", "model", "gamma_init", "init_state_noise", "t", "log10_grad_norm"]
    write_analysis(flow[columns], out, meta, float_format="%.5g")  # log10 norms: 5 digits keep it < 2 MB
    summary = analysis.summarize_gradient_flow(flow, first_informative=first)
    write_analysis(summary, out.with_name(out.stem + "_summary.csv"), meta)
    print(summary.round(2).to_string(index=False))
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
