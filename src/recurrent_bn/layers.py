"""Normalized recurrent layers shaped like `torch.nn.LSTM` and `torch.nn.RNN`: a stack of cells.

Each direction of each layer is made by its cell class (`cells.LSTMCell`, `cells.RNNCell`: options, parameters,
normalizations, initialisation) and registered under torch.nn's names (`weight_ih_l0`, `norm_c_l0_reverse`), so that
parameter names, their order and state dicts are torch.nn's. A pass reads each direction as a `cells.CellTerms` and
runs it on the loop `backends.pick_backend` chooses (reference, C++ or Triton; one signature). The stack adds what
the cells do not have: initial states, lengths and masks, the reverse direction, stacking and dropout between
layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from recurrent_bn import backends, recurrence
from recurrent_bn.backends import BACKENDS
from recurrent_bn.cells import (
    NONLINEARITIES,
    CellTerms,
    LSTMCell,
    RNNCell,
    choice,
    layer_name,
    lstm_options,
    rnn_options,
)
from recurrent_bn.errors import InputError
from recurrent_bn.norm import RecurrentBatchNorm, batch_norms, refuse_single_example

NOISE_MODES = ("training", "authors")
# A cell's tensors and normalizations by their cell names (`cells.CellTerms.gather` reads them).
WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "bias")
CELL_TERM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "bias", "norm_ih", "norm_hh", "norm_c", "shift_c",
                   "norm_sum")


class _RecurrentStack(nn.Module):
    """What the LSTM and the RNN share: their directions made by a cell class, initial states, masks from lengths,
    stacking and dropout between layers."""

    state_count: int  # 2 for the LSTM (h, c), 1 for the RNN
    cell_class: type[LSTMCell] | type[RNNCell]

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool, dropout: float,
        bidirectional: bool, proj_size: int, factory: dict, options: dict, *, max_length: int, eps: float,
        momentum: float | None, learn_initial_state: bool, init_state_noise: float, init_state_noise_mode: str,
        backend: str,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if proj_size != 0:
            raise ValueError(f"proj_size={proj_size} is not supported: recurrent_bn layers have no projection of h "
                             "(torch.nn.LSTM's proj_size); use proj_size=0, or a linear layer on the output")
        if not 0.0 <= dropout <= 1.0:  # 1.0 as torch.nn.LSTM allows: the upper layers then read zeros in training
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if init_state_noise < 0:
            raise ValueError(f"init_state_noise must be >= 0, got {init_state_noise}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.proj_size = proj_size
        self.init_state_noise = init_state_noise
        self.init_state_noise_mode = choice("init_state_noise_mode", init_state_noise_mode, NOISE_MODES)
        self.backend = backend
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.learn_initial_state = learn_initial_state
        if learn_initial_state:
            # h_0 (and c_0) learned, starting at zero, as in the authors' code.
            self.initial_state = nn.Parameter(
                torch.zeros(self.state_count, num_layers * self.num_directions, hidden_size, **factory)
            )
        for name, value in options.items():
            setattr(self, name, value)
        for layer in range(num_layers):
            for suffix in self._layer_names(layer):
                terms = self.cell_class.create_terms(self._layer_input_size(layer), hidden_size, bias, options,
                                                     max_length, eps, momentum, factory)
                for name, value in terms.items():
                    setattr(self, layer_name(name, suffix), value)

    def _term_names(self) -> list[dict[str, str]]:
        """For each direction (layer by layer, forward then reverse) its cell names and this layer's names for them
        (`weight_ih` → `weight_ih_l0`). Found once from what is registered (a whole model pickled before this
        existed has no list), and the same for the life of the layer: registration happens in `__init__` only."""
        names = self.__dict__.get("_cell_names")
        if names is None:
            suffixes = [s for layer in range(self.num_layers) for s in self._layer_names(layer)]
            names = [{name: layer_name(name, suffix) for name in CELL_TERM_NAMES
                      if hasattr(self, layer_name(name, suffix))} for suffix in suffixes]
            self.__dict__["_cell_names"] = names
        return names

    # What code written for torch.nn.LSTM reads of its weights. The normalizations' γ and β are parameters of their
    # own modules (`norm_hh_l0.weight`), as torch.nn's modules keep theirs, and are not among these.
    @property
    def _all_weights(self) -> list[list[str]]:
        """The names of each direction's weights and biases (torch.nn.RNNBase's `_all_weights`)."""
        return [[flat for name, flat in names.items() if name in WEIGHT_NAMES] for names in self._term_names()]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """Each direction's weights and biases, as torch.nn.LSTM's `all_weights`."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """Does nothing, and is here because code written for torch.nn.LSTM calls it: torch packs its weights into
        one buffer for cuDNN, and these layers have no cuDNN path."""

    def _terms(self, index: int) -> CellTerms:
        """Direction `index`'s tensors and normalizations now (after `functional_call` or weight norm too)."""
        names = self._term_names()[index]
        return CellTerms.gather(lambda name: getattr(self, names[name]) if name in names else None)

    def _reset(self) -> None:
        """Each direction's cell initialisation, then each normalization's own reset and h_0 = 0."""
        for names in self._term_names():
            parameters = {name: getattr(self, flat) for name, flat in names.items()}
            self._init_direction_({n: p for n, p in parameters.items() if isinstance(p, Tensor)})
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.learn_initial_state:
            nn.init.zeros_(self.initial_state)

    def _init_direction_(self, parameters: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _run(self, terms: CellTerms, x: Tensor, state: tuple[Tensor, ...], mask: Tensor | None, start_step: int
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One direction over the time-major x (the signature of `backends.py`)."""
        raise NotImplementedError

    @property
    def backend(self) -> str:
        """The `backend` setting that `pick_backend` reads at every call; checked whenever it is set."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = choice("backend", value, BACKENDS)

    def _layer_names(self, layer: int) -> list[str]:
        """Suffixes of one layer's parameters and normalizations, one per direction, as torch names them."""
        return [f"l{layer}", f"l{layer}_reverse"][: self.num_directions]

    def _layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size * self.num_directions

    def _initial_states(self, hx: Tensor | tuple[Tensor, ...] | None, batch: int, like: Tensor) -> list[Tensor]:
        """Initial states as a list of (num_layers * num_directions, B, H) tensors: h (and c)."""
        if hx is not None:
            states = list(hx) if isinstance(hx, tuple | list) else [hx]
            expected = (self.num_layers * self.num_directions, batch, self.hidden_size)
            for state in states:
                if state.shape != expected:
                    raise InputError(f"initial state has shape {tuple(state.shape)}, expected {expected}")
            return states
        if self.learn_initial_state:
            states = [s.unsqueeze(1).expand(-1, batch, -1) for s in self.initial_state]
        else:
            zeros = like.new_zeros(self.num_layers * self.num_directions, batch, self.hidden_size)
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

    def _check_input(
        self, input: Tensor, lengths: Tensor | None, batch_first: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The input time-major, the (T, B) mask of valid positions and the lengths (None without lengths)."""
        if input.dim() != 3:
            raise InputError(f"input must be 3-D (T, B, {self.input_size}) or batch-first, got {tuple(input.shape)}")
        if batch_first:
            input = input.transpose(0, 1)
        if input.shape[-1] != self.input_size:
            raise InputError(f"input has {input.shape[-1]} features, expected input_size={self.input_size}")
        if input.shape[0] == 0:
            raise InputError("input has no timesteps")
        if lengths is None:
            return input, None, None
        lengths = torch.as_tensor(lengths)
        if lengths.shape != (input.shape[1],):
            raise InputError(f"lengths must have shape ({input.shape[1]},), got {tuple(lengths.shape)}")
        # Checked where it costs no device synchronisation (lengths are usually on the CPU, as torch's packing wants).
        if lengths.device.type == "cpu" and len(lengths) and not 0 <= int(lengths.min()) <= int(lengths.max()) <= (
            input.shape[0]
        ):
            raise InputError(f"lengths must be in [0, {input.shape[0]}] (the number of timesteps)")
        lengths = lengths.to(input.device)
        steps = torch.arange(input.shape[0], device=input.device)
        return input, steps[:, None] < lengths[None, :], lengths

    def _refuse_single_example(self, batch: int, steps: int) -> None:
        """One line, before anything runs, where a batch norm in training would normalize a batch of one example.

        Only an input term with `share_statistics_over_time` pools its statistics over time (vertical batch norm);
        every other batch-norm term has statistics per timestep, over the batch alone."""
        if batch != 1:
            return
        for name, module in self.named_children():
            if isinstance(module, RecurrentBatchNorm) and module.training:
                pooled = name.startswith("norm_ih") and module.share_statistics_over_time
                refuse_single_example(steps if pooled else 1)

    def _between_layers(self, output: Tensor) -> Tensor:
        """What the next layer reads of this layer's output (the RNN's `layer_activation`)."""
        return output

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None, *, start_step: int = 0,
    ):
        """Run the stack over `input` (T, B, I), or (B, T, I) with batch_first, or a PackedSequence.

        Args:
            hx: initial states (num_layers * num_directions, B, H), a tuple (h_0, c_0) for the LSTM; zeros (or the
                learned initial state) when None.
            lengths: (B,) valid length of each sequence of a padded batch. Padded positions are left out of the
                batch statistics, their outputs are zero, and the final states are each sequence's state at its own
                last step. A PackedSequence carries its lengths (it is unpacked, run as with `lengths`, and the
                output packed again, as torch.nn does).
            start_step: index of the first timestep, for a sequence fed in consecutive pieces with its state
                carried: batch norm then picks the population statistics of the right timesteps. Generating one
                token at a time is such a sequence: call `lstm(x_t, state, start_step=t)` with t the token's
                position (0, 1, 2, ...). The layer keeps no count across calls, as torch.nn.LSTM keeps no state:
                the caller, who carries the state, carries t with it. A batch-norm layer in evaluation called
                twice in a row with one timestep, a carried state and start_step=0 warns once, since every token
                would then be normalized with step 0's statistics. Layer norm and norm="none" ignore it.

        Returns `(output, h_n)` for the RNN, `(output, (h_n, c_n))` for the LSTM, with torch.nn's shapes: the
        output has num_directions * H features, the states are ordered layer by layer, forward then reverse.
        """
        _check_state_form(self, hx)
        if not isinstance(input, PackedSequence) and input.dim() == 2:
            return _run_unbatched(self, input, hx, lengths, start_step)
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None:
            if lengths is not None:
                raise ValueError("a PackedSequence carries its lengths: do not pass lengths too")
            input, lengths = pad_packed_sequence(packed)  # time-major, lengths in the caller's batch order
        if self.bidirectional and start_step != 0:
            raise ValueError("start_step continues a sequence fed in pieces, which a bidirectional layer cannot "
                             "read backwards: feed the whole sequence with start_step=0")
        input, mask, lengths = self._check_input(input, lengths, self.batch_first and packed is None)
        _warn_if_stepping_from_zero(self, input.shape[0], hx, start_step)
        self._refuse_single_example(input.shape[1], input.shape[0])
        states = self._initial_states(hx, input.shape[1], input)
        reverse_index = _reverse_index(lengths, input.shape[0]) if self.bidirectional else None
        layer_input = input
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                # The reverse direction reads each sequence's valid part backwards, its padding left in place, so
                # that its step t holds the t-th position it reads (the paper's reversal of the unpadded portion).
                x = layer_input if direction == 0 else _reverse(layer_input, reverse_index)
                output, final = self._run(self._terms(index), x, tuple(s[index] for s in states), mask, start_step)
                outputs.append(output if direction == 0 else _reverse(output, reverse_index))
                finals.append(final)
            output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)
            if layer < self.num_layers - 1:
                output = self._between_layers(output)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                output = F.dropout(output, self.dropout, training=True)
            layer_input = output
        stacked = [torch.stack(parts) for parts in zip(*finals, strict=True)]
        state = stacked[0] if self.state_count == 1 else tuple(stacked)
        if packed is not None:
            return _repack(output, lengths, packed), state
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, state


def _warn_if_stepping_from_zero(stack: _RecurrentStack, steps: int, hx, start_step: int) -> None:
    """Warn once per layer when a batch-norm layer in evaluation is fed one timestep at a time from step 0.

    The first such call is legitimate (the first token, with an explicit zero state, as torch's word-language-model
    example passes); the second in a row, with the state carried, is a generation loop that forgot `start_step`.
    A call of another shape ends the run of such calls."""
    if stack.training or not any(isinstance(m, RecurrentBatchNorm) and m.slots > 1 for m in stack.children()):
        return
    stepping = steps == 1 and hx is not None and start_step == 0
    count = getattr(stack, "_calls_at_step_zero", 0) + 1 if stepping else 0
    stack._calls_at_step_zero = count
    if count == 2 and not getattr(stack, "_warned_step_zero", False):
        stack._warned_step_zero = True
        warnings.warn(
            "a batch-norm layer was called one timestep at a time with its state carried and start_step=0: every "
            "step is normalized with the statistics of step 0. Pass start_step=t, the position of the token in "
            "its sequence (see LSTM.forward).", stacklevel=3,
        )


def _check_state_form(stack: _RecurrentStack, hx) -> None:
    """One InputError line (a RuntimeError, as torch.nn.LSTM raises) for an hx that is not the LSTM's pair (h, c)
    or the RNN's one tensor: unpacking it further down would raise a bare ValueError that code catching
    RuntimeError misses."""
    if hx is None:
        return
    count = len(hx) if isinstance(hx, tuple | list) else 1
    if stack.state_count == 2 and (count != 2 or isinstance(hx, Tensor)):
        raise InputError("hx of an LSTM is a tuple (h_0, c_0) of (num_layers * num_directions, B, hidden_size) "
                         "tensors, or None for zeros")
    if stack.state_count == 1 and not isinstance(hx, Tensor):
        raise InputError("hx of an RNN is one (num_layers * num_directions, B, hidden_size) tensor, or None for zeros")


def _run_unbatched(stack: _RecurrentStack, input: Tensor, hx, lengths, start_step: int):
    """torch.nn.LSTM's unbatched form: input (T, input_size) whatever batch_first says, states
    (num_layers * num_directions, H), run as a batch of one and returned in the same form."""
    states = None if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    if states is not None and any(s.dim() != 2 for s in states):
        raise InputError(f"for unbatched 2-D input (T, input_size) the states are 2-D (num_layers * num_directions, "
                         f"hidden_size), got {[tuple(s.shape) for s in states]}")
    if states is not None:
        hx = states[0].unsqueeze(1) if stack.state_count == 1 else tuple(s.unsqueeze(1) for s in states)
    lengths = None if lengths is None else torch.as_tensor(lengths).reshape(1)
    batch_dim = 0 if stack.batch_first else 1
    output, state = stack(input.unsqueeze(batch_dim), hx, lengths, start_step=start_step)
    state = state.squeeze(1) if stack.state_count == 1 else tuple(s.squeeze(1) for s in state)
    return output.squeeze(batch_dim), state


def _reverse_index(lengths: Tensor | None, steps: int) -> Tensor | None:
    """(T, B) positions the reverse direction reads: lengths[b] - 1 - t for t < lengths[b], t on the padding.

    The map is its own inverse, so the same gather puts the reverse direction's outputs back in place. None
    without lengths: every sequence is reversed whole.
    """
    if lengths is None:
        return None
    step = torch.arange(steps, device=lengths.device)[:, None]
    return torch.where(step < lengths[None, :], lengths[None, :] - 1 - step, step)


def _reverse(x: Tensor, index: Tensor | None) -> Tensor:
    """x (T, B, F) with each sequence's valid part reversed (`_reverse_index`)."""
    if index is None:
        return x.flip(0)
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


def _repack(output: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """The padded output (T, B, F) packed with the batch sizes and sorting of the input `like`, as torch.nn does."""
    order = like.sorted_indices
    if order is not None:
        output, lengths = output.index_select(1, order), lengths[order.to(lengths.device)]
    data = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


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

    `LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    proj_size=0, device=None, dtype=None)` as torch.nn.LSTM (proj_size must be 0), the options below keyword-only.

    Args (beyond torch.nn.LSTM's):
        max_length: timesteps with their own batch-norm population statistics (T_max).
        gamma_init: initial γ of every normalization (default 0.1 for batch norm, 1.0 for layer norm).
        eps, momentum: of the batch norms (see `RecurrentBatchNorm`).
        share_statistics_over_time: one population slot for all timesteps (the paper reports that this "severely
            degrades performance"); always on for "vbn". In training the input term is normalized with statistics
            over batch and time, the recurrent and cell terms with each timestep's batch statistics (later steps
            are not known yet when a step is computed). True shares every normalized term, or name the terms:
            ("input",) is the paper's BN-e* (shared statistics for W_x x only, per-timestep ones elsewhere).
        norm_terms: which terms to normalize, a subset of ("input", "recurrent", "cell"); default all for "bn"
            and "ln", ("input",) for "vbn". For ablations.
        init: "pytorch" (default): every weight and bias U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.LSTM draws them
            (under the same seed, norm="none" starts from torch.nn.LSTM's very weights), so that swapping the class
            keeps nn.LSTM's behaviour; "authors": the paper's code's initialisation below, which every preset in
            conf/ sets. forget_bias, recurrent_init and orthogonal_init shape the authors' draw only.
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
        backend: "reference" (plain PyTorch, any device), "fused" (the compiled CPU kernels, CPU tensors),
            "triton" (one fused Triton kernel per timestep, `triton_lstm.py`: CUDA tensors in float32 or float64,
            bf16 through autocast; CPU tensors only under TRITON_INTERPRET=1, for tests) or "auto" (triton on float32
            and float64 CUDA tensors, fused on CPU tensors, otherwise the reference loop, with a warning once for
            half-precision CUDA parameters).
        bidirectional: a second direction per layer (`*_reverse` parameters, torch's names) that reads each
            sequence's valid part backwards and leaves the padding in place (the paper's reversal): with lengths,
            its step t reads x[lengths[b] - 1 - t, b], and its outputs are put back at the positions read. Each
            direction has its own normalizations and per-timestep statistics.
    """

    state_count = 2
    cell_class = LSTMCell
    mode = "LSTM"  # torch.nn.RNNBase's name of the recurrence

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm: str = "none",
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool | str | tuple[str, ...] | list[str] = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        forget_bias: float = 1.0,
        recurrent_init: str = "orthogonal",
        orthogonal_init: str = "joint",
        cell_bias: bool = False,
        learn_initial_state: bool = False,
        init_state_noise: float = 0.0,
        init_state_noise_mode: str = "training",
        backend: str = "auto",
        init: str = "pytorch",
    ) -> None:
        options = lstm_options(norm, norm_terms, share_statistics_over_time, gamma_init, forget_bias, recurrent_init,
                               orthogonal_init, cell_bias, init)
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            {"device": device, "dtype": dtype}, options, max_length=max_length, eps=eps, momentum=momentum,
            learn_initial_state=learn_initial_state, init_state_noise=init_state_noise,
            init_state_noise_mode=init_state_noise_mode, backend=backend,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`init`: torch.nn.LSTM's uniform draw, or the authors' (W_x and W_h orthogonal, or identity for g; zero
        biases; forget bias `forget_bias`)."""
        self._reset()

    def _init_direction_(self, parameters: dict[str, Tensor]) -> None:
        LSTMCell.init_terms_(parameters, self.hidden_size, init=self.init, recurrent_init=self.recurrent_init,
                             orthogonal_init=self.orthogonal_init, forget_bias=self.forget_bias)

    # The two halves of `backends.pick_backend` on this layer's setting (the tests check each alone).
    def _uses_triton(self, x: Tensor) -> bool:
        return backends.triton_chosen(self.backend, x)

    def _use_fused(self, x: Tensor) -> bool:
        return backends.fused_chosen(self.backend, x)

    def _run(self, terms: CellTerms, x: Tensor, state: tuple[Tensor, ...], mask: Tensor | None, start_step: int
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return backends.run_lstm(self.backend, terms, x, state, mask, start_step)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}, "
            f"norm_terms={self.norm_terms}, batch_first={self.batch_first}, dropout={self.dropout}, "
            f"bidirectional={self.bidirectional}"
        )


class RNN(_RecurrentStack):
    """Elman RNN with optional normalization, a drop-in for `torch.nn.RNN`.

    `norm` in {"none", "bn", "ln"}; `nonlinearity` in {"tanh", "relu", "identity"}; `norm_placement`:
      - "sum": `h_t = act(N(W_h h_{t-1} + W_x x_t; γ, β))`, one normalization of the pre-activation with a learned
        shift β in place of the bias. With batch norm and tanh this is the paper's Figure 1a model.
      - "separate": `h_t = act(N(W_x x_t; γ_x, 0) + N(W_h h_{t-1}; γ_h, 0) + b)`, each term normalized, as in the
        BN-LSTM. `RNN(norm="bn", norm_placement="separate", nonlinearity="identity", bias=False)` is batch norm in
        place of tanh and the bias.

    With norm="none" the parameters are torch.nn.RNN's. Other arguments as for `LSTM`; `init="authors"` with
    `recurrent_init="identity"` sets W_h to the identity (the paper's Figure 1a model uses it, with W_x orthogonal).

    `layer_activation` ("identity", "tanh" or "relu") is applied to each layer's output before the next layer reads
    it (never after the last). With `nonlinearity="identity"` and batch norm this keeps every recurrence free of a
    nonlinearity and puts one between the recurrences, as modern linear recurrences do: the network is then no
    longer an affine map of its input at test time.

    `RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None)` as torch.nn.RNN, the options keyword-only.

    The RNN has no fused or Triton kernels: every backend runs the reference loop.
    """

    state_count = 1
    cell_class = RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm: str = "none",
        norm_placement: str = "sum",
        max_length: int = 1000,
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        share_statistics_over_time: bool | str | tuple[str, ...] | list[str] = False,
        norm_terms: tuple[str, ...] | list[str] | None = None,
        recurrent_init: str = "orthogonal",
        learn_initial_state: bool = False,
        init_state_noise: float = 0.0,
        init_state_noise_mode: str = "training",
        layer_activation: str = "identity",
        backend: str = "auto",
        init: str = "pytorch",
    ) -> None:
        options = rnn_options(norm, nonlinearity, norm_placement, norm_terms, share_statistics_over_time, gamma_init,
                              recurrent_init, init)
        choice("layer_activation", layer_activation, NONLINEARITIES)
        if layer_activation != "identity" and num_layers < 2:
            raise ValueError("layer_activation acts between layers: it needs num_layers >= 2")
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
            {"device": device, "dtype": dtype}, options, max_length=max_length, eps=eps, momentum=momentum,
            learn_initial_state=learn_initial_state, init_state_noise=init_state_noise,
            init_state_noise_mode=init_state_noise_mode, backend=backend,
        )
        self.layer_activation = layer_activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`init`: torch.nn.RNN's uniform draw, or the authors' (W_x orthogonal, W_h orthogonal or identity, zero
        biases, as in their `construct_rnn`)."""
        self._reset()

    @property
    def mode(self) -> str:
        """torch.nn.RNN's name of the recurrence: "RNN_TANH", "RNN_RELU" (and "RNN_IDENTITY", which torch has not)."""
        return f"RNN_{self.nonlinearity.upper()}"

    def _init_direction_(self, parameters: dict[str, Tensor]) -> None:
        RNNCell.init_terms_(parameters, self.hidden_size, init=self.init, recurrent_init=self.recurrent_init)

    def _between_layers(self, output: Tensor) -> Tensor:
        return recurrence.ACTIVATIONS[self.layer_activation](output)

    def _run(self, terms: CellTerms, x: Tensor, state: tuple[Tensor, ...], mask: Tensor | None, start_step: int
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return recurrence.rnn(terms, x, state, mask, start_step, nonlinearity=self.nonlinearity)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}, "
            f"nonlinearity={self.nonlinearity!r}, norm_placement={self.norm_placement!r}, "
            f"norm_terms={self.norm_terms}, batch_first={self.batch_first}, dropout={self.dropout}, "
            f"bidirectional={self.bidirectional}"
        )


def set_backend(model: nn.Module, backend: str) -> None:
    """Run every recurrent-bn layer inside `model` on `backend` ("auto", "reference", "fused", "triton"), checked as
    the constructor checks it."""
    for module in model.modules():
        if isinstance(module, _RecurrentStack):
            module.backend = backend


@torch.no_grad()
def estimate_population_statistics(model: nn.Module, batches, forward=None, *, carry_state: bool = False) -> int:
    """Re-estimate every batch norm's population statistics as the paper reports its test numbers.

    Resets the statistics, then runs `model` over `batches` (one pass of a data loader) with batch statistics and
    sets each timestep's population mean and variance to the plain average of its per-minibatch statistics.
    Everything else runs as in evaluation (no dropout, no initial-state noise), so the statistics describe the
    activations the model sees at test time.

    Args:
        model: any module containing recurrent-bn layers.
        batches: an iterable of model inputs: a tensor, a tuple of positional arguments or a dict of keywords.
        forward: optional `forward(model, batch)` for models called differently; `forward(model, batch, state)`
            returning `(output, state)` with `carry_state`.
        carry_state: for a stateful language model, whose batches are consecutive pieces of the same streams
            (torch's word-language-model example, truncated backpropagation) and which is evaluated with its state
            carried from piece to piece: each batch then starts from the previous batch's final state, as at test
            time. Without it every batch starts from the model's initial state (zeros), and the statistics describe
            activations the model never sees at test time (a language model's validation perplexity went from 97.1
            to 103.2 that way, 97.5 with the state carried). The model is called as `model(batch, state)` (a tuple
            batch: `model(*batch, state)`), state None for the first batch, and must return `(output, state)` as
            torch.nn.LSTM does; the batches must all have the same batch size, as such streams do.

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
    used, state = 0, None
    try:
        for batch in batches:
            result = _run_batch(model, batch, forward, carry_state, state)
            if carry_state:
                state = _final_state(result)
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    if norms and used == 0:
        raise ValueError("estimate_population_statistics got no batches")
    return used


def _run_batch(model: nn.Module, batch, forward, carry_state: bool, state):
    """One batch of `estimate_population_statistics`, the state passed last when carried."""
    carried = (state,) if carry_state else ()
    if forward is not None:
        return forward(model, batch, *carried)
    if isinstance(batch, dict):
        if carry_state:
            raise ValueError("carry_state with dict batches: pass forward(model, batch, state) -> (output, state)")
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch, *carried)
    return model(batch, *carried)


def _final_state(result):
    """The state in a model's `(output, state)`, for the next batch."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise ValueError("carry_state needs the model (or forward) to return (output, state), as torch.nn.LSTM does")
    return result[1]
