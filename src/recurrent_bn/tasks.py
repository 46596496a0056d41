"""Tasks: the data of a run, its loss and its metric (accuracy for the pixel tasks, bits per character for text)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from recurrent_bn import data
from recurrent_bn.data.download import DATASETS, fetch_on_first_use
from recurrent_bn.errors import ConfigError
from recurrent_bn.norm import batch_norms

logger = logging.getLogger(__name__)
LN2 = math.log(2.0)
STREAM_CHUNK = 1000  # characters per call when a split is read as one sequence


class Task:
    """The loaded data of one task and how a model is scored on it.

    `train` is the endless, resumable stream of training batches; `batches(split)` iterates a split once in a fixed
    order; `loss` gives a training step's loss and metric counts; `evaluate` scores a split.
    """

    def __init__(
        self, cfg: DictConfig, device: torch.device, seed: int, data_root: str | None = None, verify: bool = True,
        download: bool = False,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.kind = cfg.kind
        self.device = device
        self.metric = "acc" if self.kind == "classification" else "bpc"
        self.higher_is_better = self.kind == "classification"
        self.order = None
        self.vocabulary: list[str] | None = None
        root = data.resolve_data_root(data_root)
        if download and cfg.dataset in DATASETS:
            # The first run on a new machine fetches what it needs (config `data.download`); offline it stops
            # with the loader's one line asking for `make data`, as before.
            fetch_on_first_use(cfg.dataset, root, log=logger.info)
        if cfg.dataset == "mnist":
            self.splits = data.load_mnist(root, num_valid=cfg.valid_size, verify=verify)
            self.order = data.pixel_order(cfg.permutation, cfg.permutation_seed)
        elif cfg.dataset == "digits":
            self.splits = data.load_digits()
            self.order = data.pixel_order(cfg.permutation, cfg.permutation_seed, num_pixels=cfg.steps)
        elif cfg.dataset == "ptb":
            self.splits, self.vocabulary = data.load_ptb_chars(root, verify=verify)
        elif cfg.dataset == "text8":
            self.splits, self.vocabulary = data.load_text8(
                root, num_valid=cfg.valid_size, num_test=cfg.test_size, verify=verify
            )
        if self.vocabulary is not None:
            if len(self.vocabulary) != cfg.num_classes or cfg.input_size != cfg.num_classes:
                raise ConfigError(
                    f"task.num_classes and task.input_size must equal the {cfg.dataset} vocabulary size "
                    f"{len(self.vocabulary)}, got {cfg.num_classes} and {cfg.input_size}"
                )
        if self.kind == "classification":
            pixels, labels = self.splits["train"]
            if pixels.shape[1] != cfg.steps:
                raise ConfigError(f"task.steps={cfg.steps} but {cfg.dataset} sequences have {pixels.shape[1]} pixels")
            self.train = data.ClassBatches(
                pixels, labels, cfg.batch_size, seed=seed, device=device, pixel_max=cfg.pixel_max, order=self.order
            )
        else:
            self.train = data.TextBatches(self.splits["train"], cfg.seq_len, cfg.batch_size, seed=seed, device=device)

    def batches(
        self, split: str, limit: int | None = None, seq_len: int | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The split once, in order, in evaluation batches (at most `limit` of them)."""
        batch_size = batch_size or self.cfg.eval_batch_size
        if self.kind == "classification":
            pixels, labels = self.splits[split]
            iterator = data.class_eval_batches(
                pixels, labels, min(batch_size, len(pixels)), device=self.device, pixel_max=self.cfg.pixel_max,
                order=self.order,
            )
        else:
            iterator = data.text_eval_batches(
                self.splits[split], seq_len or self.cfg.eval_seq_len, batch_size, device=self.device
            )
        for index, batch in enumerate(iterator):
            if limit is not None and index >= limit:
                return
            yield batch

    def _score(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """Mean cross-entropy (nats), the metric's numerator (correct predictions, or the summed loss), the number
        of wrong argmax predictions (of the class, or of the next character) and the count."""
        logits = model(x) if self.kind == "classification" else model(x)[0]
        logits = logits.float().reshape(-1, logits.shape[-1])
        targets = y.reshape(-1)
        loss = F.cross_entropy(logits, targets)
        wrong = (logits.argmax(-1) != targets).sum()
        if self.kind == "classification":
            return loss, targets.numel() - wrong, wrong, targets.numel()
        return loss, loss.detach() * targets.numel(), wrong, targets.numel()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
        """Mean cross-entropy (nats), the metric's numerator (correct predictions, or the summed loss) and the count."""
        loss, metric, _, count = self._score(model, x, y)
        return loss, metric, count

    def summarize(self, loss_sum: float, metric_sum: float, count: int) -> dict[str, float]:
        """{"loss": mean nats, "acc" or "bpc": ...} from sums over examples (or characters)."""
        loss = loss_sum / max(count, 1)
        if self.kind == "classification":
            return {"loss": loss, "acc": metric_sum / max(count, 1)}
        return {"loss": loss, "bpc": loss / LN2}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches, statistics: str = "population") -> dict[str, float]:
        """Score `model` on an iterable of batches: loss, the task's metric and `error`, the error rate of the
        argmax prediction (the authors' "error rate": of the class, or of the next character).

        `statistics="population"` runs the model in evaluation mode; `"batch"` runs it as in training (batch
        statistics, initial-state noise, dropout: the authors' "training graph") without updating anything.
        """
        was_training = model.training
        norms = batch_norms(model)
        saved = [[buffer.clone() for buffer in norm.buffers()] for norm in norms] if statistics == "batch" else []
        if statistics == "batch" and norms:
            batches = without_a_batch_of_one(batches)
        model.train(statistics == "batch")
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        metric_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        wrong_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        try:
            for x, y in batches:
                loss, metric, wrong, n = self._score(model, x, y)
                loss_sum += loss.double() * n
                metric_sum += metric.double()
                wrong_sum += wrong.double()
                count += n
        finally:
            for norm, buffers in zip(norms, saved, strict=False):
                for buffer, value in zip(norm.buffers(), buffers, strict=True):
                    buffer.copy_(value)
            model.train(was_training)
        return {**self.summarize(float(loss_sum), float(metric_sum), count), "error": float(wrong_sum) / max(count, 1)}

    @torch.no_grad()
    def evaluate_stream(self, model: nn.Module, split: str, chunk: int | None = None) -> dict[str, float]:
        """Bits per character of a language model reading the split as one long sequence per stream.

        The split is cut into `task.eval_streams` contiguous streams (1: the authors' protocol, the whole split as
        one sequence), read in chunks of `chunk` characters with the state carried across chunks; timesteps count on
        from chunk to chunk, so batch norm uses the population statistics of T_max for every step past it, as the
        paper prescribes. The chunking changes nothing but speed.
        """
        streams = data.text_streams(self.splits[split], self.cfg.eval_streams, device=self.device)
        chunk = chunk or STREAM_CHUNK
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        state = None
        for start in range(0, streams.shape[0] - 1, chunk):
            x = streams[start : start + chunk]
            y = streams[start + 1 : start + chunk + 1]
            x = x[: y.shape[0]]
            logits, state = model(x, state, start_step=start)
            loss_sum += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        model.train(was_training)
        count = (streams.shape[0] - 1) * streams.shape[1]
        return self.summarize(float(loss_sum), float(loss_sum), count)

    def estimation_inputs(self, limit: int | None, batch_size: int | None = None) -> Iterator[Tensor]:
        """Model inputs for re-estimating population statistics: the training split once, in order, in batches of
        `batch_size` examples (None: the training batch size; the authors used 5,000 on MNIST, 100 on PTB and
        1,000 on text8, and the size matters: a batch's variance is biased low by a factor (n - 1) / n)."""
        batch_size = batch_size or self.cfg.batch_size
        if self.kind == "classification":
            pixels, labels = self.splits["train"]
            iterator = data.class_eval_batches(
                pixels, labels, batch_size, device=self.device, pixel_max=self.cfg.pixel_max, order=self.order
            )
        else:
            iterator = data.text_eval_batches(self.splits["train"], self.cfg.seq_len, batch_size, device=self.device)
        for index, (x, _) in enumerate(without_a_batch_of_one(iterator)):
            if limit is not None and index >= limit:
                return
            yield x


def without_a_batch_of_one(batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """`batches` (x (T, B, ...), y (B,) or (T, B)) with a last batch of one example joined to the one before it.

    Batch statistics of one example normalize it to zero (the layers refuse it); a split whose size leaves a
    remainder of one after full batches would otherwise end in that error, or before it in a meaningless batch."""
    previous = None
    for x, y in batches:
        if previous is not None and x.shape[1] == 1:
            yield torch.cat([previous[0], x], 1), torch.cat([previous[1], y], y.dim() - 1)
            return
        if previous is not None:
            yield previous
        previous = (x, y)
    if previous is not None:
        yield previous
