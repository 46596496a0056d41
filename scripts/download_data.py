"""Fetch and verify the data: `make data`, or `python scripts/download_data.py [--root DIR] [DATASET ...]`.

Files already present are only verified, so this also runs offline, as a check. Each failure is printed as one
line saying where to put a copy made by hand; the exit status is 1 if any dataset is missing or corrupt.
"""

from __future__ import annotations

import argparse
import sys

from recurrent_bn.data.download import DATASETS, download
from recurrent_bn.data.root import resolve_data_root
from recurrent_bn.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="data folder (default: $RBN_DATA_ROOT, else ./data)")
    parser.add_argument(
        "datasets", nargs="*", metavar="DATASET", help=f"any of {', '.join(DATASETS)} (default: all)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.datasets if name not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    root = resolve_data_root(args.root)
    print(f"data root: {root}")
    failed = []
    for dataset in args.datasets or list(DATASETS):
        print(f"{dataset}:", flush=True)
        try:
            download(dataset, root, log=lambda line: print(f"  {line}", flush=True))
        except UserError as error:
            print(f"  error: {error}", file=sys.stderr, flush=True)
            failed.append(dataset)
        except OSError as error:  # e.g. a read-only data folder: still one line, not a traceback
            print(f"  error: cannot write under {root}: {error}", file=sys.stderr, flush=True)
            failed.append(dataset)
    if failed:
        print(f"not ready: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
