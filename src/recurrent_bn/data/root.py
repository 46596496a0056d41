"""Where the datasets live: one rule, used by every loader and by `make data`."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RBN_DATA_ROOT"
DEFAULT_ROOT = Path("data")


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the data folder as an absolute path.

    The explicit ``root`` (e.g. the config's ``data.root``) wins; else the environment variable
    ``RBN_DATA_ROOT``; else ``./data``, relative to the current directory (the repository root when run
    through ``make``). Empty strings count as unset so that ``data.root=`` on the command line falls through
    to the next rule.
    """
    for candidate in (root, os.environ.get(ENV_VAR)):
        if candidate is not None and os.fspath(candidate) != "":
            return Path(candidate).expanduser().absolute()
    return DEFAULT_ROOT.absolute()
