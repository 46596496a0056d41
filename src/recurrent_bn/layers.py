"""Normalized recurrent layers shaped like `torch.nn.LSTM` and `torch.nn.RNN`.

Every layer computes its input term `W_x x_t` for all timesteps in one matrix product and normalizes it in one
vectorized pass before the time loop: it does not depend on the recurrence. Only the recurrent term, its per-timestep
normalization and the cell update stay in the loop (`recurrence.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn import recurrence
from recurrent_bn.norm import CellShift, RecurrentBatchNorm, RecurrentLayerNorm, batch_norms

LSTM_NORMS = ("none", "vbn", "bn", "ln")
RNN_NORMS = ("none", "bn", "ln")
LSTM_TERMS = ("input", "recurrent", "cell")
RNN_TERMS = ("input", "recurrent")
PLACEMENTS = ("sum", "separate")
NONLINEARITIES = ("tanh", "relu", "identity")
RECURRENT_INITS = ("orthogonal", "identity")
ORTHOGONAL_SCOPES = ("joint", "per_gate")
NOISE_MODES = ("training", "authors")
BACKENDS = ("auto", "reference", "fused")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def _orthogonal_(weight: Tensor, blocks: int, scope: str) -> None:
    """Orthogonal initialisation of a gate-stacked weight (blocks * H, n).

    "joint": one orthogonal matrix over all blocks, as the authors draw W_h (H, 4H) and W_x (I, 4H) in their
    layout: in torch's (4H, n) layout its columns are orthonormal, `W^T W = I` (entries of RMS 1/sqrt(4H) for W_h).
    "per_gate": each block separately orthogonal (entries sqrt(blocks) times larger).
    """
    with torch.no_grad():
        for block in weight.chunk(blocks, 0) if scope == "per_gate" else (weight,):
            nn.init.orthogonal_(block)


def _make_norm(
    kind: str, features: int, max_length: int, gamma_init: float, eps: float, momentum: float | None,
    shared: bool, learn_beta: bool,
) -> nn.Module:
    if kind == "ln":
        return RecurrentLayerNorm(features, gamma_init=gamma_init, learn_beta=learn_beta, eps=eps)
    return RecurrentBatchNorm(
        features, max_length, gamma_init=gamma_init, learn_beta=learn_beta, eps=eps, momentum=momentum,
        share_statistics_over_time=shared,
    )


class _RecurrentStack(nn.Module):
    """What the LSTM and the RNN share: initial states, masks from lengths, stacking and dropout between layers."""

    state_count: int  # 2 for the LSTM (h, c), 1 for the RNN

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int, batch_first: bool, dropout: float,
        learn_initial_state: bool, init_state_noise: float, init_state_noise_mode: str, backend: str,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init_state_noise < 0:
            raise ValueError(f"init_state_noise must be >= 0, got {init_state_noise}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.dropout = dropout
        self.init_state_noise = init_state_noise
        self.init_state_noise_mode = _choice("init_state_noise_mode", init_state_noise_mode, NOISE_MODES)
        self.backend = _choice("backend", backend, BACKENDS)
        self.learn_initial_state = learn_initial_state
        if learn_initial_state:
            # h_0 (and c_0) learned, starting at zero, as in the authors' code.
            self.initial_state = nn.Parameter(torch.zeros(self.state_count, num_layers, hidden_size))

    def _initial_states(self, hx: Tensor | tuple[Tensor, ...] | None, batch: int, like: Tensor) -> list[Tensor]:
        """Initial states as a list of (num_layers, B, H) tensors: h (and c)."""
        if hx is not None:
            states = list(hx) if isinstance(hx, tuple | list) else [hx]
            expected = (self.num_layers, batch, self.hidden_size)
            for state in states:
                if state.shape != expected:
                    raise ValueError(f"initial state has shape {tuple(state.shape)}, expected {expected}")
            return states
        if self.learn_initial_state:
            states = [s.unsqueeze(1).expand(-1, batch, -1) for s in self.initial_state]
        else:
            zeros = like.new_zeros(self.num_layers, batch, self.hidden_size)
            states = [zeros] * self.state_count
        if self.init_state_noise > 0 and self.init_state_noise_mode == "authors":
            # The authors' graphs add the noise to h_0 only, in training and in the graphs that re-estimate the
            # statistics and test.
            states[0] = states[0] + self.init_state_noise * torch.randn_like(states[0])
        elif self.init_state_noise > 0 and self.training:
            # The paper's fix for sequential MNIST: identical initial states and constant leading inputs give a
            # zero batch variance, through which the gradient explodes as 1/sqrt(eps).
            states = [s + self.init_state_noise * torch.randn_like(s) for s in states]
        return states

    def _check_input(self, input: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if input.dim() != 3:
            raise ValueError(f"input must be 3-D (T, B, {self.input_size}) or batch-first, got {tuple(input.shape)}")
        if self.batch_first:
            input = input.transpose(0, 1)
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input has {input.shape[-1]} features, expected input_size={self.input_size}")
        if input.shape[0] == 0:
            raise ValueError("input has no timesteps")
        if lengths is None:
            return input, None
        lengths = torch.as_tensor(lengths, device=input.device)
        if lengths.shape != (input.shape[1],):
            raise ValueError(f"lengths must have shape ({input.shape[1]},), got {tuple(lengths.shape)}")
        steps = torch.arange(input.shape[0], device=input.device)
        return input, steps[:, None] < lengths[None, :]

    def _between_layers(self, output: Tensor) -> Tensor:
        """What the next layer reads of this layer's output (the RNN's `layer_activation`)."""
        return output

    def _use_fused(self) -> bool:
        return recurrence.use_fused(self.backend)

    def forward(
        self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None, lengths: Tensor | None = None,
        *, start_step: int = 0,
    ):
        """Run the stack over `input` (T, B, I), or (B, T, I) with batch_first.

        Args:
            hx: initial states (num_layers, B, H), a tuple (h_0, c_0) for the LSTM; zeros (or the learned initial
                state) when None.
            lengths: (B,) valid length of each sequence of a padded batch. Padded positions are left out of the
                batch statistics, their outputs are zero, and the final states are each sequence's state at its own
                last step.
            start_step: index of the first timestep, for a sequence fed in consecutive pieces with its state
                carried: batch norm then picks the population statistics of the right timesteps.

        Returns `(output, h_n)` for the RNN, `(output, (h_n, c_n))` for the LSTM, with torch.nn's shapes.
        """
        input, mask = self._check_input(input, lengths)
        states = self._initial_states(hx, input.shape[1], input)
        layer_input = input
        finals = []
        for layer in range(self.num_layers):
            output, final = self._layer(layer, layer_input, [s[layer] for s in states], mask, start_step)
            finals.append(final)
            if layer < self.num_layers - 1:
                output = self._between_layers(output)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                output = F.dropout(output, self.dropout, training=True)
            layer_input = output
        if self.batch_first:
            output = output.transpose(0, 1)
        stacked = [torch.stack(parts) for parts in zip(*finals, strict=True)]
        return output, (stacked[0] if self.state_count == 1 else tuple(stacked))


class LSTM(_RecurrentStack):
    """LSTM with optional normalization, a drop-in for `torch.nn.LSTM` (gate order i, f, g, o).

    `norm` selects the variant:
      - "none": the vanilla LSTM; its state_dict loads both ways with `torch.nn.LSTM`.
      - "vbn": Laurent et al. 2016 "vertical" batch norm: only `W_x x_t` is normalized, with statistics shared over
        batch and time.
      - "bn": Cooijmans et al. 2016 (eqs. 6-8): `gates = BN(W_h h_{t-1}; γ_h, 0) + BN(W_x x_t; γ_x, 0) + b`,
        `c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)`, `h_t = σ(o) ⊙ tanh(BN(c_t; γ_c, β_c))`, with statistics
        per timestep; the un-normalized c_t is carried to t + 1.
      - "ln": Ba et al. 2016 layer norm in the same places, over the 4H features of each term.

    Normalized variants have one bias `bias_l{k}` (b of eq. 6) in place of torch's `bias_ih`/`bias_hh`.

    Args (beyond torch.nn.LSTM's):
        max_length: timesteps with their own batch-norm population statistics (T_max).
        gamma_init: initial γ of every normalization (default 0.1 for batch norm, 1.0 for layer norm).
        eps, momentum: of the batch norms (see `RecurrentBatchNorm`).
        share_statistics_over_time: one population slot for all timesteps (the paper reports that this "severely
            degrades performance"); always on for "vbn". In training the input term is normalized with statistics
            over batch and time, the recurrent and cell terms with each timestep's batch statistics (later steps
            are not known yet when a step is computed).
        norm_terms: which terms to normalize, a subset of ("input", "recurrent", "cell"); default all for "bn"
            and "ln", ("input",) for "vbn". For ablations.
        forget_bias: initial bias of the forget gate (1.0 in the authors' code).
        recurrent_init: "orthogonal" or "identity" (the candidate block g of W_h is the identity, the other three
            blocks orthogonal: the authors' MNIST setting).
        orthogonal_init: "joint" (the authors'): W_h is one orthogonal matrix over all four gates, `W_h^T W_h = I`
            (with "identity": the f, i, o blocks together), W_x likewise; "per_gate": each gate's block separately
            orthogonal, which makes the entries 2x larger (sqrt(3)x for the f, i, o blocks under "identity").
        cell_bias: a learned shift inside the output tanh, `h = σ(o) ⊙ tanh(c + β_c)`, when the cell is not
            normalized: the authors' baseline LSTM is their BN graph with BN(x) = x + β, which keeps it. A
            normalized cell has its own β_c, so True changes nothing there. False keeps torch.nn.LSTM's parameters.
        learn_initial_state: learn h_0 and c_0 (starting at zero) instead of zeros.
        init_state_noise: std of Gaussian noise added to the initial state (the paper uses 0.1 on sequential MNIST).
        init_state_noise_mode: "training" (h_0 and c_0, training-mode forwards only) or "authors" (h_0 only, in
            every forward: the authors' training, statistics-estimation and test graphs all add it).
        backend: "reference" (plain PyTorch, any device), "fused" (the compiled CPU kernels) or "auto".
    """

    state_count = 2

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        norm: str = "none",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        forget_bias: float = 1.0,
        recurrent_init: str = "orthogonal",
        orthogonal_init: str = "joint",
        cell_bias: bool = False,
        learn_initial_state: bool = False,
        init_state_noise: float = 0.0,
        init_state_noise_mode: str = "training",
        backend: str = "auto",
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, batch_first, dropout, learn_initial_state, init_state_noise,
            init_state_noise_mode, backend,
        )
        self.norm = _choice("norm", norm, LSTM_NORMS)
        self.recurrent_init = _choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        self.orthogonal_init = _choice("orthogonal_init", orthogonal_init, ORTHOGONAL_SCOPES)
        self.cell_bias = bool(cell_bias)
        if norm_terms is None:
            norm_terms = {"none": (), "vbn": ("input",)}.get(norm, LSTM_TERMS)
        for term in norm_terms:
            _choice("norm_terms entry", term, LSTM_TERMS)
        if norm == "none" and norm_terms:
            raise ValueError("norm_terms needs a normalization: set norm to 'bn', 'ln' or 'vbn'")
        self.norm_terms = tuple(t for t in LSTM_TERMS if t in norm_terms)
        self.share_statistics_over_time = share_statistics_over_time or norm == "vbn"
        self.gamma_init = (1.0 if norm == "ln" else 0.1) if gamma_init is None else float(gamma_init)
        if self.norm != "none" and self.gamma_init <= 0:
            raise ValueError(f"gamma_init must be > 0, got {self.gamma_init}")
        self.forget_bias = forget_bias
        self.bias = bias
        kind = "ln" if norm == "ln" else "bn"
        features = 4 * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(features, layer_input)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(features, hidden_size)))
            if bias and norm == "none":
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(features)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(features)))
            elif bias:
                self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(features)))
            for term, name, size, learn_beta in (
                ("input", "norm_ih", features, False),
                ("recurrent", "norm_hh", features, False),
                ("cell", "norm_c", hidden_size, True),
            ):
                if term in self.norm_terms:
                    module = _make_norm(
                        kind, size, max_length, self.gamma_init, eps, momentum, self.share_statistics_over_time,
                        learn_beta,
                    )
                    self.add_module(f"{name}_l{layer}", module)
            if self.cell_bias and "cell" not in self.norm_terms:
                self.add_module(f"shift_c_l{layer}", CellShift(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: W_x and W_h orthogonal (or identity for g), zero biases, forget bias 1."""
        hidden = self.hidden_size
        for layer in range(self.num_layers):
            _orthogonal_(getattr(self, f"weight_ih_l{layer}"), 4, self.orthogonal_init)
            weight_hh = getattr(self, f"weight_hh_l{layer}")
            if self.recurrent_init == "identity":
                # Gate order i, f, g, o: the f, i, o rows are orthogonal (jointly or per gate), g is the identity.
                others = torch.empty(3 * hidden, hidden, dtype=weight_hh.dtype, device=weight_hh.device)
                _orthogonal_(others, 3, self.orthogonal_init)
                with torch.no_grad():
                    weight_hh[: 2 * hidden].copy_(others[: 2 * hidden])
                    weight_hh[2 * hidden : 3 * hidden].copy_(torch.eye(hidden))
                    weight_hh[3 * hidden :].copy_(others[2 * hidden :])
            else:
                _orthogonal_(weight_hh, 4, self.orthogonal_init)
            biases = [getattr(self, n) for n in (f"bias_ih_l{layer}", f"bias_l{layer}") if hasattr(self, n)]
            for parameter in biases + [getattr(self, f"bias_hh_l{layer}", None)]:
                if parameter is not None:
                    nn.init.zeros_(parameter)
            if biases:
                with torch.no_grad():
                    biases[0][hidden : 2 * hidden].fill_(self.forget_bias)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.learn_initial_state:
            nn.init.zeros_(self.initial_state)

    def _bias(self, layer: int) -> Tensor | None:
        if self.norm == "none":
            if not self.bias:
                return None
            return getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")
        return getattr(self, f"bias_l{layer}", None)

    def _layer(self, layer: int, x: Tensor, state: list[Tensor], mask: Tensor | None, start_step: int):
        # The loop computes the input term norm_ih(W_x x) + b (the fused kernels in the same pass as the gates).
        output, h, c = recurrence.lstm(
            x,
            state[0],
            state[1],
            getattr(self, f"weight_hh_l{layer}"),
            getattr(self, f"norm_hh_l{layer}", None),
            getattr(self, f"norm_c_l{layer}", getattr(self, f"shift_c_l{layer}", None)),
            mask,
            start_step,
            fused=self._use_fused(),
            weight_ih=getattr(self, f"weight_ih_l{layer}"),
            norm_ih=getattr(self, f"norm_ih_l{layer}", None),
            bias=self._bias(layer),
        )
        return output, (h, c)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}, "
            f"norm_terms={self.norm_terms}, batch_first={self.batch_first}, dropout={self.dropout}"
        )


class RNN(_RecurrentStack):
    """Elman RNN with optional normalization, a drop-in for `torch.nn.RNN`.

    `norm` in {"none", "bn", "ln"}; `nonlinearity` in {"tanh", "relu", "identity"}; `norm_placement`:
      - "sum": `h_t = act(N(W_h h_{t-1} + W_x x_t; γ, β))`, one normalization of the pre-activation with a learned
        shift β in place of the bias. With batch norm and tanh this is the paper's Figure 1a model.
      - "separate": `h_t = act(N(W_x x_t; γ_x, 0) + N(W_h h_{t-1}; γ_h, 0) + b)`, each term normalized, as in the
        BN-LSTM. `RNN(norm="bn", norm_placement="separate", nonlinearity="identity", bias=False)` is batch norm in
        place of tanh and the bias.

    With norm="none" the parameters are torch.nn.RNN's. Other arguments as for `LSTM`; `recurrent_init="identity"`
    sets W_h to the identity (the paper's Figure 1a model uses it, with W_x orthogonal).

    `layer_activation` ("identity", "tanh" or "relu") is applied to each layer's output before the next layer reads
    it (never after the last). With `nonlinearity="identity"` and batch norm this keeps every recurrence free of a
    nonlinearity and puts one between the recurrences, as modern linear recurrences do: the network is then no
    longer an affine map of its input at test time.
    """

    state_count = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        norm: str = "none",
        nonlinearity: str = "tanh",
        norm_placement: str = "sum",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        recurrent_init: str = "orthogonal",
        learn_initial_state: bool = False,
        init_state_noise: float = 0.0,
        init_state_noise_mode: str = "training",
        layer_activation: str = "identity",
        backend: str = "auto",
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, batch_first, dropout, learn_initial_state, init_state_noise,
            init_state_noise_mode, backend,
        )
        self.norm = _choice("norm", norm, RNN_NORMS)
        self.layer_activation = _choice("layer_activation", layer_activation, NONLINEARITIES)
        if layer_activation != "identity" and num_layers < 2:
            raise ValueError("layer_activation acts between layers: it needs num_layers >= 2")
        self.nonlinearity = _choice("nonlinearity", nonlinearity, NONLINEARITIES)
        self.norm_placement = _choice("norm_placement", norm_placement, PLACEMENTS)
        self.recurrent_init = _choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        if norm_terms is None:
            norm_terms = () if norm == "none" else RNN_TERMS
        for term in norm_terms:
            _choice("norm_terms entry", term, RNN_TERMS)
        if norm == "none" and norm_terms:
            raise ValueError("norm_terms needs a normalization: set norm to 'bn' or 'ln'")
        if norm != "none" and norm_placement == "sum" and tuple(norm_terms) not in (RNN_TERMS, RNN_TERMS[::-1]):
            raise ValueError("norm_placement='sum' normalizes the sum of both terms: use 'separate' for norm_terms")
        self.norm_terms = tuple(t for t in RNN_TERMS if t in norm_terms)
        self.share_statistics_over_time = share_statistics_over_time
        self.gamma_init = (1.0 if norm == "ln" else 0.1) if gamma_init is None else float(gamma_init)
        if self.norm != "none" and self.gamma_init <= 0:
            raise ValueError(f"gamma_init must be > 0, got {self.gamma_init}")
        self.bias = bias
        kind = "ln" if norm == "ln" else "bn"
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(hidden_size, layer_input)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(hidden_size, hidden_size)))
            if norm == "none" and bias:
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(hidden_size)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(hidden_size)))
            elif norm != "none" and norm_placement == "sum":
                # β of the one normalization is the bias: a separate b would be removed by the mean subtraction.
                self.add_module(
                    f"norm_l{layer}",
                    _make_norm(kind, hidden_size, max_length, self.gamma_init, eps, momentum,
                               share_statistics_over_time, learn_beta=bias),
                )
            elif norm != "none":
                if bias:
                    self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(hidden_size)))
                for term, name in (("input", "norm_ih"), ("recurrent", "norm_hh")):
                    if term in self.norm_terms:
                        self.add_module(
                            f"{name}_l{layer}",
                            _make_norm(kind, hidden_size, max_length, self.gamma_init, eps, momentum,
                                       share_statistics_over_time, learn_beta=False),
                        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_x orthogonal, W_h orthogonal or identity, zero biases, as in the authors' `construct_rnn`."""
        for layer in range(self.num_layers):
            nn.init.orthogonal_(getattr(self, f"weight_ih_l{layer}"))
            weight_hh = getattr(self, f"weight_hh_l{layer}")
            if self.recurrent_init == "identity":
                with torch.no_grad():
                    weight_hh.copy_(torch.eye(self.hidden_size))
            else:
                nn.init.orthogonal_(weight_hh)
            for name in (f"bias_ih_l{layer}", f"bias_hh_l{layer}", f"bias_l{layer}"):
                if hasattr(self, name):
                    nn.init.zeros_(getattr(self, name))
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.learn_initial_state:
            nn.init.zeros_(self.initial_state)

    def _between_layers(self, output: Tensor) -> Tensor:
        return recurrence.ACTIVATIONS[self.layer_activation](output)

    def _layer(self, layer: int, x: Tensor, state: list[Tensor], mask: Tensor | None, start_step: int):
        input_term = F.linear(x, getattr(self, f"weight_ih_l{layer}"))
        norm_ih = getattr(self, f"norm_ih_l{layer}", None)
        if norm_ih is not None:
            input_term = norm_ih(input_term, mask, start_step)
        if self.norm == "none" and self.bias:
            input_term = input_term + getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")
        elif hasattr(self, f"bias_l{layer}"):
            input_term = input_term + getattr(self, f"bias_l{layer}")
        output, h = recurrence.rnn(
            input_term,
            state[0],
            getattr(self, f"weight_hh_l{layer}"),
            getattr(self, f"norm_hh_l{layer}", None),
            getattr(self, f"norm_l{layer}", None),
            self.nonlinearity,
            mask,
            start_step,
            fused=self._use_fused(),
        )
        return output, (h,)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}, "
            f"nonlinearity={self.nonlinearity!r}, norm_placement={self.norm_placement!r}, "
            f"norm_terms={self.norm_terms}, batch_first={self.batch_first}, dropout={self.dropout}"
        )


@torch.no_grad()
def estimate_population_statistics(model: nn.Module, batches, forward=None) -> int:
    """Re-estimate every batch norm's population statistics as the paper reports its test numbers.

    Resets the statistics, then runs `model` over `batches` (one pass of a data loader) with batch statistics and
    sets each timestep's population mean and variance to the plain average of its per-minibatch statistics.
    Everything else runs as in evaluation (no dropout, no initial-state noise), so the statistics describe the
    activations the model sees at test time.

    Args:
        model: any module containing recurrent-bn layers.
        batches: an iterable of model inputs: a tensor, a tuple of positional arguments or a dict of keywords.
        forward: optional `forward(model, batch)` for models called differently.

    Returns the number of batches used.
    """
    norms = batch_norms(model)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    used = 0
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, tuple | list):
                model(*batch)
            else:
                model(batch)
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    if norms and used == 0:
        raise ValueError("estimate_population_statistics got no batches")
    return used

