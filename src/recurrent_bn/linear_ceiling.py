"""The ceiling of batch norm in place of tanh: the best linear classifier of the pixels.

With population statistics, `bn_linear_rnn` (h_t = BN(W_x x_t) + BN(W_h h_{t-1}), no tanh, no bias) is an affine
map of the input sequence, and its read-out is linear, so at test time it is a linear classifier of the pixels: it
can do no better than the best linear classifier, and a linear classifier does not depend on the pixels' order
(sMNIST and a true-permutation pMNIST share one ceiling). What this does not bound: training-mode accuracy, where
batch statistics are a nonlinearity of the batch. The authors' pMNIST order feeds only 501 distinct pixels, so its
ceiling is that of a linear classifier of those.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0)


def linear_ceiling(
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]], pixel_max: float = 255.0, cs=DEFAULT_CS,
    order: torch.Tensor | None = None, max_iter: int = 300,
) -> dict:
    """Fit a multinomial logistic regression of the pixels on `splits["train"]` for each inverse regularization
    strength in `cs`, keep the one with the best `splits["valid"]` accuracy and score it on `splits["test"]`.

    `order`: the pixels the model sees (e.g. the authors' pMNIST draw with repeats); only their distinct columns
    matter to a linear classifier. Returns test_acc, valid_acc, the chosen C, every C's valid_acc and the counts.
    """
    columns = None if order is None else np.unique(np.asarray(order))

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        pixels, labels = splits[split]
        x = pixels.numpy().astype(np.float64) / pixel_max
        return (x if columns is None else x[:, columns]), labels.numpy()

    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (features(s) for s in ("train", "valid", "test"))
    fits = {}
    for c in cs:
        model = LogisticRegression(C=c, max_iter=max_iter)
        model.fit(x_train, y_train)
        fits[c] = (model, float(model.score(x_valid, y_valid)))
    best_c = max(fits, key=lambda c: fits[c][1])
    model, valid_acc = fits[best_c]
    return {
        "test_acc": float(model.score(x_test, y_test)), "valid_acc": valid_acc, "C": best_c,
        "valid_acc_by_C": {str(c): acc for c, (_, acc) in fits.items()}, "pixels": int(x_train.shape[1]),
        "train_size": len(y_train), "valid_size": len(y_valid), "test_size": len(y_test),
        "converged": bool(model.n_iter_.max() < max_iter),
    }
