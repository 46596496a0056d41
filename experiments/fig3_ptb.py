"""Figure 3 and Table 2: LSTM and BN-LSTM on Penn Treebank characters, then bpc against the evaluation length.

    python experiments/fig3_ptb.py [--skip-train] [--lengths 100,200,...] [--limit N] [hydra overrides ...]
    RBN_SCALE=paper python experiments/fig3_ptb.py

1. Sweeps lstm and bn_lstm into <RBN_RUNS>/fig3_ptb (Figure 3a, Table 2).
2. Evaluates every completed run of that sweep on the test split cut into segments of 100, 200, ... 1000 characters,
   the BN-LSTM with its population statistics and with batch statistics (Figure 3b), into
   <RBN_ANALYSIS>/fig3b_bpc_vs_length.csv.
"""

import argparse
import sys
import time

import pandas as pd
from _launch import analysis_root, preset, relative, runs_root, sweep

from recurrent_bn import analysis
from recurrent_bn.provenance import provenance, write_analysis
from recurrent_bn.runs import load_summaries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-train", action="store_true", help="only the length analysis of existing runs")
    parser.add_argument("--lengths", default="100,200,300,400,500,600,700,800,900,1000",
                        help="comma-separated evaluation lengths in characters")
    parser.add_argument("--limit", type=int, default=None, help="at most this many batches per length")
    parser.add_argument("--split", default="test")
    args, overrides = parser.parse_known_args()
    code = 0 if args.skip_train else sweep("fig3_ptb", [preset("ptb"), "model=lstm,bn_lstm"], overrides)
    start = time.time()
    summaries = load_summaries(runs_root() / "fig3_ptb")
    done = summaries[summaries["status"] == "completed"] if not summaries.empty else summaries
    if done.empty:
        print(f"no completed runs in {runs_root() / 'fig3_ptb'}: nothing to evaluate", file=sys.stderr)
        return 1
    lengths = [int(length) for length in args.lengths.split(",")]
    try:
        frames = [analysis.bpc_vs_length(run, lengths, split=args.split, limit=args.limit) for run in done["run_dir"]]
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    frame = pd.concat(frames, ignore_index=True)
    frame["run_dir"] = frame["run_dir"].map(relative)
    out = analysis_root() / "fig3b_bpc_vs_length.csv"
    meta = provenance(split=args.split, limit=args.limit, wall_time_s=round(time.time() - start, 1))
    write_analysis(frame, out, meta)
    print(frame.to_string(index=False))
    print(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
