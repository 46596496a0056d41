"""The tanh question: the linear classifier that bounds batch norm in place of tanh, and the variant that keeps the
recurrences linear but puts a nonlinearity between them."""

from __future__ import annotations

import pytest
import torch

import recurrent_bn as rb
from recurrent_bn import data
from recurrent_bn.linear_ceiling import linear_ceiling


def test_linear_ceiling_of_real_digits_is_far_above_chance_and_a_broken_fit_is_not():
    splits = data.load_digits()
    result = linear_ceiling(splits, pixel_max=16.0, cs=(0.01, 0.1), max_iter=100)
    assert result["test_acc"] > 0.85 and result["C"] in (0.01, 0.1) and result["pixels"] == 64
    shuffled = dict(splits)
    pixels, labels = splits["train"]
    shuffled["train"] = (pixels, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])
    assert linear_ceiling(shuffled, pixel_max=16.0, cs=(0.1,), max_iter=100)["test_acc"] < 0.3


def test_linear_ceiling_with_an_order_drawn_with_replacement_fits_its_distinct_pixels_only():
    """The authors' pMNIST order repeats pixels: the ceiling is the classifier of the distinct pixels it feeds, fitted
    here by hand with scikit-learn on those columns."""
    from sklearn.linear_model import LogisticRegression

    splits = data.load_digits()
    order = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(0))
    distinct = sorted(set(order.tolist()))
    assert 30 < len(distinct) < 50
    result = linear_ceiling(splits, pixel_max=16.0, cs=(0.1,), max_iter=100, order=order)
    assert result["pixels"] == len(distinct)

    def columns(split):
        pixels, labels = splits[split]
        return pixels.numpy()[:, distinct] / 16.0, labels.numpy()

    fit = LogisticRegression(C=0.1, max_iter=100).fit(*columns("train"))
    assert result["test_acc"] == fit.score(*columns("test")) and result["valid_acc"] == fit.score(*columns("valid"))


def real_mnist_or_skip() -> dict:
    """MNIST from the folder the trainer reads (data.root=null: $RBN_DATA_ROOT, else ./data); a skip, naming the
    folder, only when its files are not there. A file that is there but unreadable or corrupt is a failure."""
    from recurrent_bn.data.download import require_files
    from recurrent_bn.errors import DataNotFoundError

    root = data.resolve_data_root(None)
    try:
        require_files("mnist", root, verify=False)
    except DataNotFoundError as error:
        pytest.skip(f"no MNIST under {root} (set RBN_DATA_ROOT or run `make data`): {error}")
    return data.load_mnist(root, num_valid=10_000, verify=False)


@pytest.mark.slow  # loading MNIST and two fits of 2,000 images: about 20 s on two busy cores
def test_linear_ceiling_of_mnist_pixels_on_a_small_real_split():
    mnist = real_mnist_or_skip()
    splits = {"train": tuple(t[:2000] for t in mnist["train"]), "valid": tuple(t[:500] for t in mnist["valid"]),
              "test": tuple(t[:1000] for t in mnist["test"])}
    result = linear_ceiling(splits, cs=(0.1,), max_iter=100)
    assert 0.8 < result["test_acc"] < 0.97  # a linear model of the pixels: well above chance, below the MLPs
    assert result["pixels"] == 784 and (result["train_size"], result["test_size"]) == (2000, 1000)
    order = data.pixel_order("authors", 0)
    authors = linear_ceiling(splits, cs=(0.1,), max_iter=100, order=order)
    assert authors["pixels"] == len(set(order.tolist())) < 784  # drawn with replacement: repeats carry nothing new


def two_linear_recurrences(**kwargs) -> rb.RNN:
    """The bn_linear_rnn presets' layer, initialised as the presets are (the authors' orthogonal weights: torch's
    smaller uniform draw keeps the activations where tanh is nearly linear)."""
    return rb.RNN(2, 4, 2, norm="bn", norm_placement="separate", nonlinearity="identity", bias=False, max_length=5,
                  init="authors", **kwargs)


@pytest.mark.parametrize("training", [True, False])
def test_bn_linear_rnn2_is_two_linear_recurrences_with_tanh_between(training):
    torch.manual_seed(0)
    stacked = two_linear_recurrences(layer_activation="tanh")
    first, second = (rb.RNN(size, 4, norm="bn", norm_placement="separate", nonlinearity="identity", bias=False,
                            max_length=5) for size in (2, 4))
    for layer, single in enumerate((first, second)):
        single.load_state_dict({key.replace(f"_l{layer}", "_l0"): value for key, value in stacked.state_dict().items()
                                if key.endswith(f"_l{layer}") or f"_l{layer}." in key})
    warm = torch.randn(5, 8, 2)
    stacked(warm)  # population statistics from one training pass, the same in the composition
    with torch.no_grad():
        hidden, _ = first(warm)
        second(torch.tanh(hidden))
    for module in (stacked, first, second):
        module.train(training)
    x = torch.randn(7, 8, 2)
    output, h_n = stacked(x)
    hidden, h_first = first(x)
    expected, h_second = second(torch.tanh(hidden))
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, torch.cat([h_first, h_second]))


def test_bn_linear_rnn2_is_not_an_affine_map_but_bn_linear_rnn_with_two_layers_is():
    torch.manual_seed(1)
    x1, x2, a = torch.randn(7, 3, 2), torch.randn(7, 3, 2), 0.3
    for activation, affine in (("identity", True), ("tanh", False)):
        model = two_linear_recurrences(layer_activation=activation)
        model(torch.randn(5, 8, 2))
        model.eval()
        mixed = model(a * x1 + (1 - a) * x2)[0]
        assert torch.allclose(mixed, a * model(x1)[0] + (1 - a) * model(x2)[0], atol=1e-5) == affine


def test_layer_activation_needs_two_layers():
    with pytest.raises(ValueError, match="num_layers >= 2"):
        rb.RNN(2, 4, layer_activation="tanh")
