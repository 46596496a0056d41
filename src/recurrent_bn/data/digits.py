"""scikit-learn's 8×8 handwritten digits as 64-step pixel sequences: a tiny real task that needs no download.

1,797 real images (UCI "Optical Recognition of Handwritten Digits", bundled with scikit-learn), for smoke runs
and CPU-sized experiments. Pixels are counts of 0..16 (each 8×8 cell sums a 4×4 block of a 32×32 bitmap), so
the task scales them by 1/16, not 1/255.
"""

from __future__ import annotations

import numpy as np
import torch

PIXEL_MAX = 16.0


def load_digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return ``{"train", "valid", "test"}`` → ``(pixels uint8 (N, 64) in 0..16, labels int64 (N,))``.

    The split is fixed (60/20/20, stratified by class, ``random_state=0``): 1,077 / 360 / 360 images.
    """
    # Imported here: scikit-learn takes ~0.6 s to import, which every user of recurrent_bn.data would pay.
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_load_digits()
    pixels = digits.data.astype(np.uint8)  # the values are whole numbers 0..16 stored as float64
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        pixels, labels, test_size=0.2, stratify=labels, random_state=0
    )
    train_x, valid_x, train_y, valid_y = train_test_split(
        rest_x, rest_y, test_size=0.25, stratify=rest_y, random_state=0
    )
    return {
        name: (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
        for name, x, y in (("train", train_x, train_y), ("valid", valid_x, valid_y), ("test", test_x, test_y))
    }
