"""MNIST as pixel sequences: sequential MNIST (scanline order) and permuted MNIST (a fixed pixel order).

The split is the authors': train = the first 50,000 training images, valid = the last 10,000, test = the
10,000 test images. Images stay ``uint8`` here; batching scales them on the device (see ``batches.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recurrent_bn.data.download import require_files
from recurrent_bn.errors import ConfigError, DataCorruptError

NUM_PIXELS = 28 * 28
IMAGE_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension
PERMUTATIONS = ("none", "random", "authors", "common")
# The order most later pMNIST papers share: the uRNN/oRNN lineage seeds torch with 5544 and draws randperm(784)
# (read in tk-rusch/unicornn psMNIST/psMNIST_task.py: `torch.manual_seed(5544)` then `torch.randperm(784)`).
COMMON_PERMUTATION_SEED = 5544


def load_mnist(
    root: Path, *, num_valid: int = 10_000, verify: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load ``{"train", "valid", "test"}`` → ``(images uint8 (N, 784) in scanline order, labels int64 (N,))``.

    Reads the uncompressed IDX files in ``<root>/MNIST/raw/`` (torchvision's layout). ``valid`` is the last
    ``num_valid`` training images, ``train`` the ones before. Every file is checked against its published size
    and checksums first (``verify``; < 0.1 s), so a damaged file raises :class:`DataCorruptError` naming it; a
    missing one raises :class:`DataNotFoundError` saying how to get it.
    """
    paths = require_files("mnist", root, verify=verify)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        image_path, label_path = paths[f"{prefix}-images-idx3-ubyte"], paths[f"{prefix}-labels-idx1-ubyte"]
        images = _read_idx(image_path, IMAGE_MAGIC, (28, 28))
        labels = _read_idx(label_path, LABEL_MAGIC, ())
        if len(images) != len(labels):
            raise DataCorruptError(
                f"{image_path} holds {len(images):,} images, {label_path.name} has {len(labels):,} labels: "
                "delete both and run `make data`"
            )
        if labels.size and labels.max() > 9:
            raise DataCorruptError(
                f"{label_path} has label {labels.max()}, not 0-9: delete it and run `make data`"
            )
        splits[split] = (
            torch.from_numpy(images.reshape(len(images), NUM_PIXELS)),
            torch.from_numpy(labels).long(),
        )
    train_images, train_labels = splits.pop("train")
    if not 0 < num_valid < len(train_images):
        raise ValueError(f"num_valid={num_valid} must be between 1 and {len(train_images) - 1}")
    cut = len(train_images) - num_valid
    return {
        "train": (train_images[:cut], train_labels[:cut]),
        "valid": (train_images[cut:], train_labels[cut:]),
        "test": splits["test"],
    }


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking its header and length against each other.

    Parsed here rather than with torchvision's ``read_image_file``: that one reads non-strictly and asserts,
    so a truncated file would surface as a bare AssertionError/RuntimeError instead of a message naming the
    file.
    """
    data = bytearray(path.read_bytes())  # writable, so torch.from_numpy shares it without a warning
    header_len = 4 * (2 + len(item_shape))
    if len(data) < header_len:
        raise DataCorruptError(
            f"{path} is {len(data)} bytes, too short for an IDX header: delete it and run `make data`"
        )
    header = np.frombuffer(data, dtype=">u4", count=2 + len(item_shape))
    if header[0] != magic or tuple(int(d) for d in header[2:]) != item_shape:
        raise DataCorruptError(
            f"{path} has IDX header {header.tolist()}, expected magic {magic} and items of {item_shape}: "
            "delete it and run `make data`"
        )
    count = int(header[1])
    expected_len = header_len + count * int(np.prod(item_shape))
    if len(data) != expected_len:
        raise DataCorruptError(
            f"{path} is {len(data):,} bytes but its header promises {expected_len:,} ({count:,} items): "
            "delete it and run `make data`"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(count, *item_shape)


def pixel_order(kind: str, seed: int, num_pixels: int = NUM_PIXELS) -> torch.Tensor | None:
    """The order in which pixels are fed: ``None`` for scanline order, else an int64 tensor of ``num_pixels``
    indices (784 for MNIST; only ``"none"`` and ``"random"`` apply to other sizes).

    - ``"none"``: sequential MNIST, scanline order.
    - ``"random"``: permuted MNIST with a true permutation of the 784 pixels, drawn from ``seed``.
    - ``"authors"``: the authors' pMNIST task. Their code draws ``randint(0, 784, 784)`` at seed 1, i.e. *with
      replacement*, so only 501 distinct pixels are ever seen and some are seen several times. Reproduced
      exactly; ``seed`` is ignored because the authors' seed is part of the task's definition.
    - ``"common"``: the permutation most later pMNIST papers share (``torch.manual_seed(5544)`` then
      ``torch.randperm(784)``), so that our numbers can be set beside theirs; ``seed`` is ignored.
    """
    if kind == "none":
        return None
    if kind == "random":
        return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))
    if kind in ("common", "authors") and num_pixels != NUM_PIXELS:
        raise ConfigError(f"task.permutation={kind} is an order of MNIST's {NUM_PIXELS} pixels and this task has "
                          f"{num_pixels}; use task.permutation=none or random")
    if kind == "common":
        return torch.randperm(NUM_PIXELS, generator=torch.Generator().manual_seed(COMMON_PERMUTATION_SEED))
    if kind == "authors":
        return torch.from_numpy(np.random.RandomState(1).randint(0, NUM_PIXELS, size=NUM_PIXELS)).long()
    raise ConfigError(f"task.permutation={kind!r} is not allowed; choose one of {', '.join(PERMUTATIONS)}")
