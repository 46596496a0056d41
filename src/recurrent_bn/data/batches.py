"""Device-side minibatches for pixel classification and character language modelling.

The whole split is moved to the device once, as ``uint8``; a batch is an index into it, converted to float
or int64 on the device after indexing. No DataLoader, no per-example Python: a batch costs a few tensor ops.
Batches are time-major, ``(time, batch, ...)``, the layout the recurrent layers loop over.

Training streams (:class:`ClassBatches`, :class:`TextBatches`) shuffle with their own seeded CPU
``torch.Generator`` and can be checkpointed: ``state_dict()`` holds only tensors and ints (so
``torch.load(weights_only=True)`` accepts it) and a stream restored with ``load_state_dict`` yields exactly
the batches the uninterrupted stream would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Device = torch.device | str


def _check_batch_size(batch_size: int, available: int, what: str) -> None:
    if not 0 < batch_size <= available:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {available:,} {what} available")


def _pixels_to_sequence(pixels: torch.Tensor, order: torch.Tensor | None, pixel_max: float) -> torch.Tensor:
    """uint8 (B, T) → float32 (T, B, 1), reordered and scaled to [0, 1], converted on the device."""
    if order is not None:
        pixels = pixels.index_select(1, order)
    return pixels.t().contiguous().unsqueeze(-1).to(torch.float32).div_(pixel_max)


class ClassBatches:
    """An endless stream of shuffled training batches ``(x float32 (T, B, 1), y int64 (B,))``.

    Each epoch visits a fresh permutation of the N examples in full batches; the last ``N % batch_size``
    examples of each permutation are dropped. ``order`` (e.g. from ``pixel_order``) reorders the T pixel
    steps; ``pixel_max`` scales them (255 for MNIST, 16 for sklearn digits). ``epoch`` is the 0-based epoch
    of the batch last returned.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        device: Device,
        pixel_max: float = 255.0,
        order: torch.Tensor | None = None,
    ) -> None:
        if pixels.dtype != torch.uint8 or pixels.dim() != 2 or labels.shape != pixels.shape[:1]:
            raise ValueError(
                f"expected uint8 pixels (N, T) and labels (N,), got {pixels.dtype} {tuple(pixels.shape)} "
                f"and {tuple(labels.shape)}"
            )
        _check_batch_size(batch_size, len(pixels), "examples")
        self.device = torch.device(device)
        self.pixels = pixels.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.order = None if order is None else order.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.pixel_max = float(pixel_max)
        self.batches_per_epoch = len(pixels) // batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.permutation = self._new_permutation()

    def _new_permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.pixels), generator=self.generator).to(self.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; a new epoch (new permutation) starts when this one has no full batch left."""
        if self.position + self.batch_size > len(self.permutation):
            self.epoch += 1
            self.position = 0
            self.permutation = self._new_permutation()
        index = self.permutation[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        pixels = self.pixels.index_select(0, index)  # faster than pixels[index] for uint8 on the CPU
        return _pixels_to_sequence(pixels, self.order, self.pixel_max), self.labels.index_select(0, index)

    def state_dict(self) -> dict[str, int | torch.Tensor]:
        """Where the stream is: epoch, position in the epoch, generator state and the epoch's permutation."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self.generator.get_state(),
            "permutation": self.permutation.cpu(),
        }

    def load_state_dict(self, state: dict[str, int | torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict` taken from a stream over the same data and batch size."""
        if len(state["permutation"]) != len(self.pixels):
            raise ValueError(
                f"this state is for {len(state['permutation']):,} examples, this stream has "
                f"{len(self.pixels):,}; resume with the same data"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
        self.permutation = state["permutation"].to(self.device)


def class_eval_batches(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    device: Device,
    pixel_max: float = 255.0,
    order: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order: ``(x float32 (T, B, 1), y int64 (B,))``; the last batch may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    pixels = pixels.to(device)
    labels = labels.to(device, torch.int64)
    order = None if order is None else order.to(device, torch.int64)
    for start in range(0, len(pixels), batch_size):
        stop = start + batch_size
        yield _pixels_to_sequence(pixels[start:stop], order, pixel_max), labels[start:stop]


def _segments_to_batch(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, L) → inputs and next-character targets, int64 (L-1, B) each."""
    sequence = segments.t().to(torch.int64)
    return sequence[:-1], sequence[1:]


class TextBatches:
    """An endless stream of shuffled training batches of character segments ``(x, y)``, int64 (seq_len-1, B).

    As in the authors' code: each epoch draws a random crop offset in [0, seq_len), cuts ``ids[offset:]`` into
    non-overlapping segments of ``seq_len`` characters (dropping the tail), shuffles the segments and serves
    ``batch_size`` per batch (dropping the last partial batch). ``x`` is a segment without its last character,
    ``y`` without its first, so 100-character segments give 99 prediction steps. ``epoch`` is the 0-based
    epoch of the batch last returned.
    """

    def __init__(
        self, ids: torch.Tensor, seq_len: int, batch_size: int, *, seed: int, device: Device
    ) -> None:
        if ids.dtype != torch.uint8 or ids.dim() != 1:
            raise ValueError(f"expected 1-D uint8 ids, got {ids.dtype} {tuple(ids.shape)}")
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be at least 2 (one input and one target)")
        # The fewest segments an epoch can have is at the largest offset, seq_len - 1.
        _check_batch_size(
            batch_size, (len(ids) - seq_len + 1) // seq_len, f"segments of {seq_len} characters"
        )
        self.device = torch.device(device)
        self.ids = ids.to(self.device)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.offset, self.permutation = self._new_epoch()

    def _new_epoch(self) -> tuple[int, torch.Tensor]:
        offset = int(torch.randint(self.seq_len, (1,), generator=self.generator))
        num_segments = (len(self.ids) - offset) // self.seq_len
        return offset, torch.randperm(num_segments, generator=self.generator).to(self.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; a new epoch (offset, shuffle) starts when this one has no full batch left."""
        if self.position + self.batch_size > len(self.permutation):
            self.epoch += 1
            self.position = 0
            self.offset, self.permutation = self._new_epoch()
        chosen = self.permutation[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        end = self.offset + len(self.permutation) * self.seq_len
        segments = self.ids[self.offset : end].view(-1, self.seq_len)  # a view: nothing is copied
        return _segments_to_batch(segments.index_select(0, chosen))

    def state_dict(self) -> dict[str, int | torch.Tensor]:
        """Where the stream is: epoch, position, crop offset, generator state, the epoch's segment order."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "generator": self.generator.get_state(),
            "permutation": self.permutation.cpu(),
        }

    def load_state_dict(self, state: dict[str, int | torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict` of a stream over the same ids, seq_len and batch size."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.offset = int(state["offset"])
        self.generator.set_state(state["generator"])
        self.permutation = state["permutation"].to(self.device)


def text_eval_batches(
    ids: torch.Tensor, seq_len: int, batch_size: int, *, device: Device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping segments from offset 0, as ``(x, y)`` int64 (seq_len-1, B); deterministic.

    Only an incomplete final segment is dropped; the last batch may hold fewer than ``batch_size`` segments.
    """
    num_segments = len(ids) // seq_len
    if batch_size < 1 or num_segments < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} give no batch from {len(ids):,} ids")
    segments = ids[: num_segments * seq_len].to(device).view(num_segments, seq_len)
    for start in range(0, num_segments, batch_size):
        yield _segments_to_batch(segments[start : start + batch_size])


def text_streams(ids: torch.Tensor, num_streams: int, *, device: Device) -> torch.Tensor:
    """The split cut into ``num_streams`` contiguous streams: int64 (len(ids) // num_streams, num_streams).

    For evaluating "the whole split as one sequence" with the state carried across chunks: the caller feeds
    ``streams[t:t+k]`` and predicts ``streams[t+1:t+k+1]``. Only the last ``len(ids) % num_streams``
    characters are dropped.
    """
    if num_streams < 1 or len(ids) // num_streams < 2:
        raise ValueError(f"num_streams={num_streams} cannot cut {len(ids):,} ids into streams of 2 or more")
    length = len(ids) // num_streams
    return ids[: length * num_streams].to(device).view(num_streams, length).t().to(torch.int64).contiguous()
