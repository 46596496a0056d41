"""Tiny datasets written in the real file formats (IDX, Mikolov's PTB char layout, text8 zip), for tests."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

import recurrent_bn.data.download as dl

PTB_WORD_LINES = {
    "train": [" the cat sat on the mat ", " a dog 's <unk> ran N miles ", " x y z & co. $ 5 "],
    "valid": [" the dog sat ", " <unk> on N mats "],
    "test": [" a cat ran ", " the end "],
}


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """An IDX file: big-endian magic, one count per dimension, then the unsigned bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, num_train: int = 60, num_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / "MNIST" / "raw" / name, 2051 if "images" in name else 2049, array)
    return arrays


def ptb_char_text(word_lines: list[str]) -> str:
    """The shared README's word→char rule: '_' joins the words, '\\n' ends a line, each token then a space."""
    tokens = [token for line in word_lines for token in [*"_".join(line.split()), "\n"]]
    return "".join(token + " " for token in tokens)


def make_ptb(root: Path, lines: dict[str, list[str]] = PTB_WORD_LINES) -> None:
    (root / "ptb").mkdir(parents=True, exist_ok=True)
    for split, word_lines in lines.items():
        (root / "ptb" / f"ptb.char.{split}.txt").write_text(ptb_char_text(word_lines))


def text8_like(length: int = 2000) -> bytes:
    rng = np.random.default_rng(0)
    words = "anarchism originated as a term of abuse first used zebra quixotic".split()
    text = " " + " ".join(words[i] for i in rng.integers(0, len(words), length))
    return text[:length].encode()


def make_text8(root: Path, text: bytes, *, extracted: bool = False) -> Path:
    (root / "text8").mkdir(parents=True, exist_ok=True)
    if extracted:
        path = root / "text8" / "text8"
        path.write_bytes(text)
    else:
        path = root / "text8" / "text8.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("text8", text)
    return path


def spec_of(path: Path, relative: str, **extra) -> dl.FileSpec:
    data = path.read_bytes()
    md5, sha256 = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    return dl.FileSpec(relative, len(data), md5=md5, sha256=sha256, **extra)
