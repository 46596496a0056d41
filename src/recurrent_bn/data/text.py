"""Character-level language modelling data: Penn Treebank (Mikolov's char files) and text8.

Both loaders return ``({"train", "valid", "test"} → uint8 id tensor (1-D), vocabulary)`` where
``vocabulary[i]`` is the character of id ``i``. Decoding is vectorised (byte slicing and a 256-entry lookup
table): PTB's 5M training characters decode in well under a second.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from recurrent_bn.data.download import require_files
from recurrent_bn.errors import DataCorruptError

SPLITS = ("train", "valid", "test")
TEXT8_SYMBOLS = " abcdefghijklmnopqrstuvwxyz"
_UNKNOWN = 255  # lookup-table value of a byte outside the vocabulary (vocabularies here have < 255 symbols)


def load_ptb_chars(root: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load ``<root>/ptb/ptb.char.{train,valid,test}.txt`` as character ids and the vocabulary.

    The files hold "c1 c2 … cn \\n " for each sentence: every token is one character followed by one space,
    and the newline that ends a sentence is itself a token, so the tokens are the bytes at even offsets. ``_``
    separates words. The vocabulary is the sorted set of training symbols (50, counting ``_`` and ``\\n``);
    the real splits have 5,017,482 / 393,042 / 442,423 tokens. A symbol in valid/test that train lacks raises
    :class:`DataCorruptError`.
    """
    paths = require_files("ptb", root, verify=verify)
    tokens = {split: _ptb_tokens(paths[f"ptb.char.{split}.txt"]) for split in SPLITS}
    symbols = np.unique(tokens["train"])
    vocabulary = [chr(symbol) for symbol in symbols]
    ids = {
        split: _encode(tokens[split], symbols, paths[f"ptb.char.{split}.txt"], "the training split")
        for split in SPLITS
    }
    return ids, vocabulary


def _ptb_tokens(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 2 or not (raw[1::2] == ord(" ")).all():
        raise DataCorruptError(
            f"{path} is not in the PTB char layout (each character followed by one space): "
            "delete it and run `make data`"
        )
    return raw[0::2]


def load_text8(
    root: Path, *, num_valid: int = 5_000_000, num_test: int = 5_000_000, verify: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load text8 as character ids: train = the first 90M characters, valid the next 5M, test the last 5M.

    Reads ``<root>/text8/text8`` if it was extracted already (faster), else ``<root>/text8/text8.zip``. The 27
    symbols are the space and ``a``–``z``, in that (sorted) order. ``num_valid``/``num_test`` set the sizes of
    the last two splits; train is the rest.
    """
    path = next(iter(require_files("text8", root, verify=verify).values()))
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                raw = np.frombuffer(archive.read("text8"), dtype=np.uint8)  # a full read checks the CRC
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as error:
            raise DataCorruptError(
                f"{path} is not a readable zip holding `text8` ({error}): delete it and run `make data`"
            ) from error
    else:
        raw = np.fromfile(path, dtype=np.uint8)
    symbols = np.frombuffer(TEXT8_SYMBOLS.encode(), dtype=np.uint8)
    ids = _encode(raw, symbols, path, "text8's 27 symbols (space and a-z)")
    num_train = len(ids) - num_valid - num_test
    if num_valid <= 0 or num_test <= 0 or num_train <= 0:
        raise ValueError(
            f"{path} has {len(ids):,} characters, too few for num_valid={num_valid:,} num_test={num_test:,}"
        )
    splits = {
        "train": ids[:num_train],
        "valid": ids[num_train : num_train + num_valid],
        "test": ids[num_train + num_valid :],
    }
    return splits, list(TEXT8_SYMBOLS)


def _encode(tokens: np.ndarray, symbols: np.ndarray, path: Path, vocabulary_name: str) -> torch.Tensor:
    """Map bytes to ids with a lookup table; a byte outside ``symbols`` raises :class:`DataCorruptError`."""
    lookup = np.full(256, _UNKNOWN, dtype=np.uint8)
    lookup[symbols] = np.arange(len(symbols), dtype=np.uint8)
    ids = lookup[tokens]
    unknown = ids == _UNKNOWN
    if unknown.any():
        position = int(np.argmax(unknown))
        raise DataCorruptError(
            f"{path} has symbol {chr(tokens[position])!r} (token {position:,}), not in {vocabulary_name}: "
            "delete it and run `make data`"
        )
    return torch.from_numpy(ids)
