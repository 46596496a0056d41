"""Draw every figure and table of the paper from the stored results: `make figures`.

    python scripts/make_figures.py [--results results] [--out results/figures] [--only fig2 ...]

Reads <results>/runs (training runs), <results>/analysis (computed analyses) and <results>/paper_reference.csv;
writes <out>/<name>.png for each figure and <out>/table{1,2,3}.md and .csv. Whatever is missing is drawn as missing
and logged; nothing is filled in. --results defaults to $RBN_RESULTS, else the repository's results/.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from recurrent_bn import figures
from recurrent_bn.runs import Results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None, help="results folder (default $RBN_RESULTS or results/)")
    parser.add_argument("--out", default=None, help="where the PNGs and tables go (default <results>/figures)")
    parser.add_argument("--only", nargs="*", default=None, help="names (or prefixes) of the figures/tables to make")
    parser.add_argument("--dpi", type=int, default=130)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.time()
    results = Results(args.results)
    out = Path(args.out) if args.out else results.root / "figures"
    out.mkdir(parents=True, exist_ok=True)

    def wanted(name: str) -> bool:
        return not args.only or any(name.startswith(prefix) for prefix in args.only)

    made = []
    for name, table in figures.all_tables(results).items():
        if not wanted(name):
            continue
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(f"{figures.TABLE_TITLES[name]}\n\n{figures.to_markdown(table)}")
        made.append(f"{name}.md")
    for name, figure in figures.all_figures(results).items():
        if not wanted(name):
            continue
        figure.savefig(out / f"{name}.png", dpi=args.dpi)
        made.append(f"{name}.png")
    print(f"wrote {len(made)} files to {out} in {time.time() - start:.1f} s: {', '.join(made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
