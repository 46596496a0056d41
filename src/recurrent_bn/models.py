"""The networks the tasks train: a recurrent layer from the model config, and the task's read-out around it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn.layers import LSTM, RNN

# Model config keys passed to the layer constructor, per cell; everything else in the file is for the trainer.
COMMON_KEYS = (
    "hidden_size", "num_layers", "norm", "dropout", "max_length", "gamma_init", "eps", "momentum",
    "share_statistics_over_time", "norm_terms", "recurrent_init", "learn_initial_state", "init_state_noise",
    "init_state_noise_mode", "backend",
)
LAYER_KEYS = {
    "lstm": COMMON_KEYS + ("forget_bias", "orthogonal_init", "cell_bias"),
    "rnn": COMMON_KEYS + ("nonlinearity", "norm_placement", "bias", "layer_activation"),
}
HEAD_INITS = ("orthogonal", "torch")


def init_head_(head: nn.Linear, how: str) -> None:
    """The read-out's initialisation: "orthogonal" with a zero bias (the authors' W_y, b_y), or "torch"
    (nn.Linear's default)."""
    if how == "orthogonal":
        nn.init.orthogonal_(head.weight)
        nn.init.zeros_(head.bias)


def layer_kwargs(model: DictConfig, input_size: int) -> dict:
    """Constructor arguments of the recurrent layer; building it here lets its own checks judge the values."""
    cell = model.cell
    options = OmegaConf.to_container(model, resolve=True)
    kwargs = {key: options[key] for key in LAYER_KEYS[cell] if key in options}
    if kwargs.get("norm_terms") is not None:
        kwargs["norm_terms"] = tuple(kwargs["norm_terms"])
    # Build once on the meta device: cheap, and it runs every check of the constructor.
    import torch

    with torch.device("meta"):
        make_layer(cell, input_size, kwargs)
    return kwargs


def make_layer(cell: str, input_size: int, kwargs: dict) -> nn.Module:
    kwargs = dict(kwargs)
    hidden_size = kwargs.pop("hidden_size")
    num_layers = kwargs.pop("num_layers")
    layer_class = LSTM if cell == "lstm" else RNN
    return layer_class(input_size, hidden_size, num_layers, **kwargs)


class SequenceClassifier(nn.Module):
    """A recurrent layer over the pixels and a linear read-out of its last hidden state (MNIST, digits)."""

    def __init__(self, recurrent: nn.Module, num_classes: int, head_init: str = "orthogonal") -> None:
        super().__init__()
        self.recurrent = recurrent
        self.head = nn.Linear(recurrent.hidden_size, num_classes)
        init_head_(self.head, head_init)

    def forward(self, x: Tensor) -> Tensor:
        """x: (T, B, 1) pixels in [0, 1] → logits (B, classes)."""
        output, _ = self.recurrent(x)
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
    """The task's network for this config (on the CPU; the trainer moves it)."""
    kwargs = layer_kwargs(cfg.model, cfg.task.input_size)
    recurrent = make_layer(cfg.model.cell, cfg.task.input_size, kwargs)
    head_init = cfg.task.head_init
    if cfg.task.kind == "classification":
        return SequenceClassifier(recurrent, cfg.task.num_classes, head_init)
    return CharLanguageModel(recurrent, cfg.task.num_classes, head_init)
