"""The networks the tasks train: a recurrent layer from the model config, and the task's read-out around it."""

from __future__ import annotations

import inspect
import os

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn.cells import orthogonal_
from recurrent_bn.errors import ConfigError
from recurrent_bn.layers import LSTM, RNN

# A model config is exactly its layer's constructor arguments plus these two: `name` (the file) and `cell` (which
# constructor). input_size comes from the task, and the tasks feed (T, B, features), so batch_first stays False.
META_KEYS = ("name", "cell")
LAYER_CLASSES = {"lstm": LSTM, "rnn": RNN}
FROM_TASK = ("input_size", "batch_first")
# torch.nn's constructor arguments that no model config holds: the trainer places the model and picks its dtype, and
# proj_size has one allowed value (0).
NOT_CONFIGURED = ("proj_size", "device", "dtype")
# Keys that conf/model/rnn.yaml inherited from lstm.yaml before the contract: no RNN ever received them, so a saved
# config that has them (a run started before) is read without them.
STALE_RNN_KEYS = ("forget_bias", "orthogonal_init", "cell_bias")
PARAMETER_BUDGET = 0.5  # a model's parameters and optimizer state may take at most this share of the memory
HEAD_INITS = ("orthogonal", "torch")


def init_head_(head: nn.Linear, how: str) -> None:
    """The read-out's initialisation: "orthogonal" with a zero bias (the authors' W_y, b_y), or "torch"
    (nn.Linear's default)."""
    if how == "orthogonal":
        orthogonal_(head.weight)  # never hangs under OMP_THREAD_LIMIT (cells.orthogonal_)
        nn.init.zeros_(head.bias)


def layer_parameters(cell: str) -> set[str]:
    """The constructor arguments a model config of this cell holds."""
    signature = inspect.signature(LAYER_CLASSES[cell].__init__)
    return {name for name in signature.parameters if name not in ("self", *FROM_TASK, *NOT_CONFIGURED)}


def drop_stale_keys(model: DictConfig) -> DictConfig:
    """A saved (resolved) config read as today's: an RNN's without the LSTM-only keys it never used (saved before
    the contract), and `init: authors` where it was saved before the option existed."""
    if model.get("cell") == "rnn":
        model = OmegaConf.masked_copy(model, [key for key in model if key not in STALE_RNN_KEYS])
    if model.get("cell") in LAYER_CLASSES and "init" not in model:
        # Saved before the layers had `init`: every run used the authors' initialisation, which is no longer the
        # layers' default, so a rebuilt run must ask for it.
        model = OmegaConf.merge(OmegaConf.create({"init": "authors"}), model)
    return model


def layer_kwargs(model: DictConfig) -> dict:
    """The constructor arguments in a model config; a key the layer does not take is a config error naming it.
    A saved config is read through `drop_stale_keys` first (`config.load_for_resume`, `runs.load_run_config`)."""
    cell = model.get("cell")
    if cell not in LAYER_CLASSES:
        raise ConfigError(f"model.cell={cell!r} is not allowed: one of {', '.join(LAYER_CLASSES)}")
    options = OmegaConf.to_container(model, resolve=True)
    kwargs = {key: value for key, value in options.items() if key not in META_KEYS}
    unknown = sorted(set(kwargs) - layer_parameters(cell))
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not an argument of recurrent_bn.{LAYER_CLASSES[cell].__name__} "
                          f"(model={options.get('name')}): remove it")
    if kwargs.get("norm_terms") is not None:
        kwargs["norm_terms"] = tuple(kwargs["norm_terms"])
    return kwargs


def parameter_count(cell: str, input_size: int, output_size: int, kwargs: dict) -> int:
    """Weights and biases of the layer and read-out (normalization parameters are O(H) and left out): a bound
    checked before anything is allocated."""
    hidden, layers = kwargs.get("hidden_size", 1), kwargs.get("num_layers", 1)
    if not (isinstance(hidden, int) and isinstance(layers, int)):
        return 0  # not a size: the layer's constructor refuses it in one line
    directions = 2 if kwargs.get("bidirectional") else 1
    gates = 4 if cell == "lstm" else 1
    first = gates * hidden * (input_size + hidden + 1)
    later = gates * hidden * (directions * hidden + hidden + 1)
    return directions * (first + (layers - 1) * later) + output_size * (directions * hidden + 1)


def _check_memory(count: int) -> None:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    needed = count * 4 * 4  # float32 weights, gradients and two optimizer moments
    if needed > PARAMETER_BUDGET * memory:
        raise ConfigError(f"model.hidden_size / model.num_layers: {count:.3g} parameters need about "
                          f"{needed / 2**30:.3g} GiB with gradients and optimizer state, more than half of this "
                          f"machine's {memory / 2**30:.0f} GiB: choose a smaller model")


def make_layer(cell: str, input_size: int, kwargs: dict) -> nn.Module:
    """The layer. Its constructor is the one check of the model's values: an error that starts with the argument's
    name (`gamma_init must be > 0, got 0.0`) becomes a config error naming the key (`model.gamma_init must ...`)."""
    kwargs = dict(kwargs)
    hidden_size = kwargs.pop("hidden_size")
    num_layers = kwargs.pop("num_layers")
    try:
        return LAYER_CLASSES[cell](input_size, hidden_size, num_layers, **kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)
        argument = message.split(" ", 1)[0].split("=", 1)[0]
        raise ConfigError(f"model.{message}" if argument in layer_parameters(cell) else f"model: {message}") from None


class SequenceClassifier(nn.Module):
    """A recurrent layer over the pixels and a linear read-out of its last hidden state (MNIST, digits).

    A bidirectional layer is read where each direction has seen the whole sequence: the forward half of the last
    output and the reverse half of the first.
    """

    def __init__(self, recurrent: nn.Module, num_classes: int, head_init: str = "orthogonal") -> None:
        super().__init__()
        self.recurrent = recurrent
        self.head = nn.Linear(recurrent.hidden_size * getattr(recurrent, "num_directions", 1), num_classes)
        init_head_(self.head, head_init)

    def forward(self, x: Tensor) -> Tensor:
        """x: (T, B, 1) pixels in [0, 1] → logits (B, classes)."""
        output, _ = self.recurrent(x)
        if getattr(self.recurrent, "bidirectional", False):
            hidden = self.recurrent.hidden_size
            return self.head(torch.cat([output[-1, :, :hidden], output[0, :, hidden:]], -1))
        return self.head(output[-1])


class CharLanguageModel(nn.Module):
    """One-hot characters → recurrent layer → a softmax over the vocabulary at every step (PTB, text8)."""

    def __init__(self, recurrent: nn.Module, vocabulary_size: int, head_init: str = "orthogonal") -> None:
        super().__init__()
        self.recurrent = recurrent
        self.vocabulary_size = vocabulary_size
        self.head = nn.Linear(recurrent.hidden_size, vocabulary_size)
        init_head_(self.head, head_init)

    def forward(self, ids: Tensor, state=None, start_step: int = 0):
        """ids: (T, B) int64 → logits (T, B, V) and the final state (to carry into the next piece of a sequence)."""
        x = F.one_hot(ids, self.vocabulary_size).to(self.head.weight.dtype)
        output, state = self.recurrent(x, state, start_step=start_step)
        return self.head(output), state


def build_model(cfg: DictConfig) -> nn.Module:
    """The task's network for this config (on the CPU; the trainer moves it): the one path from the model config
    to the layer's constructor. Bad model options (the constructor's own checks), and a model too large for this
    machine, are config errors raised before any data is loaded."""
    kwargs = layer_kwargs(cfg.model)
    _check_memory(parameter_count(cfg.model.cell, cfg.task.input_size, cfg.task.num_classes, kwargs))
    recurrent = make_layer(cfg.model.cell, cfg.task.input_size, kwargs)
    head_init = cfg.task.head_init
    if cfg.task.kind == "classification":
        return SequenceClassifier(recurrent, cfg.task.num_classes, head_init)
    return CharLanguageModel(recurrent, cfg.task.num_classes, head_init)
