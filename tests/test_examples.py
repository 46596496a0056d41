"""The example a researcher copies (examples/char_language_model.py) runs end to end: trains briefly, estimates the
population statistics, saves the whole model, reloads it under weights_only=True and samples."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from torch import nn

from recurrent_bn.config import CONF_DIR

EXAMPLE = CONF_DIR.parent / "examples" / "char_language_model.py"


@pytest.fixture
def example(monkeypatch):
    """The example as a module, registered under its name so that torch.load finds its class."""
    spec = importlib.util.spec_from_file_location("char_language_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "char_language_model", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["bn", "torch.nn.LSTM"])
def test_the_example_trains_saves_reloads_and_samples_with_either_layer(example, layer, tmp_path, monkeypatch):
    # "torch.nn.LSTM" undoes the one changed line: the same script runs with the layer it was written for.
    if layer == "torch.nn.LSTM":
        monkeypatch.setattr(example, "make_rnn", lambda e, h, n, d, bptt: nn.LSTM(e, h, n, dropout=d))
    args = example.parse(["--seconds", "20", "--sample", "40", "--estimation-pieces", "20",
                          "--save", str(tmp_path / "model.pt"), "--hidden", "64"])
    result = example.train(args)
    assert result["steps"] > 0
    assert result["reloaded_perplexity"] == result["valid_perplexity"]  # the reloaded model is the trained one
    assert result["valid_perplexity"] < result["vocabulary"]  # it learned something: better than uniform


def test_the_bundled_text_is_small_and_plain():
    text = (EXAMPLE.parent / "shakespeare.txt").read_text()
    assert 100_000 < len(text.encode()) < 400_000 and text.isascii()
