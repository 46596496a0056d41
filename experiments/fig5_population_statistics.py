"""Figure 5: per-timestep population mean and variance of ~30 random units of a trained BN-LSTM.

    python experiments/fig5_population_statistics.py [--run RUN_DIR] [--units 30] [--seed 0]

Reads RUN_DIR/final.pt (default: the first completed bn_lstm run of <RBN_RUNS>/fig3_ptb, so run fig3_ptb.py first)
and writes <RBN_ANALYSIS>/fig5_population_statistics.csv. Seconds.
"""

import argparse
import sys

from _launch import analysis_root, relative, runs_root

from recurrent_bn import analysis
from recurrent_bn.provenance import provenance, write_analysis
from recurrent_bn.runs import load_summaries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a BN-LSTM run directory holding final.pt")
    parser.add_argument("--units", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = args.run
    if run is None:
        summaries = load_summaries(runs_root() / "fig3_ptb")
        found = summaries[(summaries["model"] == "bn_lstm") & (summaries["status"] == "completed")] \
            if not summaries.empty else summaries
        if found.empty:
            print(f"no completed bn_lstm run in {runs_root() / 'fig3_ptb'}: run experiments/fig3_ptb.py or pass --run",
                  file=sys.stderr)
            return 1
        run = found["run_dir"].iloc[0]
    run = relative(run)
    try:
        stats = analysis.population_statistics(run, units=args.units, seed=args.seed)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = analysis_root() / "fig5_population_statistics.csv"
    write_analysis(stats, out, provenance(run_dir=str(run), units=args.units, seed=args.seed))
    print(analysis.settling_step(stats).to_string(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
