"""The run configuration: where the Hydra configs live, the resolvers they use, and validation before any work.

Validation raises `ConfigError` with one line naming the key and what is allowed, before data is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recurrent_bn.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

TASKS = ("smnist", "pmnist", "ptb", "text8", "digits")
LSTM_MODELS = ("lstm", "vbn_lstm", "bn_lstm", "ln_lstm")
RNN_MODELS = ("rnn", "bn_rnn", "ln_rnn", "bn_linear_rnn", "bn_linear_rnn2")
OPTIMIZERS = ("rmsprop", "adam")
SCHEDULES = ("constant", "cosine")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
COMPILE_MODES = (False, "default", "reduce-overhead")


def _run_dir(resume: str | None, default: str) -> str:
    return str(resume) if resume not in (None, "", "None", "null") else default


def register_resolvers() -> None:
    """`${rbn.minus_one:x}` (prediction steps of a segment) and `${rbn.run_dir:resume,default}`."""
    if not OmegaConf.has_resolver("rbn.minus_one"):
        OmegaConf.register_new_resolver("rbn.minus_one", lambda value: int(value) - 1)
    if not OmegaConf.has_resolver("rbn.run_dir"):
        OmegaConf.register_new_resolver("rbn.run_dir", _run_dir)


register_resolvers()


def _require(condition: bool, key: str, allowed: str, value) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive_int(cfg: DictConfig, key: str, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
             "a positive integer" + (" or null" if allow_none else ""), value)


def _positive_float(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, int | float) and not isinstance(value, bool) and value > 0, key,
             "a number > 0", value)


def validate(cfg: DictConfig) -> None:
    """Check every user-facing value; raise ConfigError naming the first bad key and what is allowed."""
    from recurrent_bn.data.mnist import PERMUTATIONS
    from recurrent_bn.models import HEAD_INITS

    _require(cfg.task.name in TASKS, "task", f"one of {', '.join(TASKS)}", cfg.task.name)
    _require(cfg.model.name in LSTM_MODELS + RNN_MODELS, "model", f"one of {', '.join(LSTM_MODELS + RNN_MODELS)}",
             cfg.model.name)
    _require(cfg.model.cell in ("lstm", "rnn"), "model.cell", "lstm or rnn", cfg.model.cell)
    for key in ("model.hidden_size", "model.num_layers", "model.max_length", "task.batch_size",
                "task.eval_batch_size", "trainer.max_steps", "trainer.eval_every", "trainer.checkpoint_every",
                "trainer.log_every"):
        _positive_int(cfg, key)
    for key in ("trainer.eval_batches", "trainer.estimate_batches", "trainer.threads"):
        _positive_int(cfg, key, allow_none=True)
    _positive_float(cfg, "optim.lr")
    _positive_float(cfg, "model.eps")
    if cfg.model.norm != "none":
        _positive_float(cfg, "model.gamma_init")
    dropout = cfg.model.dropout
    _require(isinstance(dropout, int | float) and 0 <= dropout < 1, "model.dropout", "a number in [0, 1)", dropout)
    noise = cfg.model.init_state_noise
    _require(isinstance(noise, int | float) and noise >= 0, "model.init_state_noise", "a number >= 0", noise)
    momentum = cfg.model.momentum
    _require(momentum is None or (isinstance(momentum, int | float) and 0 < momentum <= 1), "model.momentum",
             "a number in (0, 1] or null (cumulative average)", momentum)
    uses_batch_norm = cfg.model.norm in ("bn", "vbn")
    _require(not (uses_batch_norm and cfg.task.batch_size < 2), "task.batch_size",
             "at least 2 with batch norm (a batch of 1 has no batch statistics)", cfg.task.batch_size)
    clip = cfg.trainer.clip_grad_norm
    _require(clip is None or (isinstance(clip, int | float) and clip > 0), "trainer.clip_grad_norm",
             "a number > 0 or null (no clipping)", clip)
    _require(cfg.trainer.valid_statistics in ("batch", "moving_average", "estimated"), "trainer.valid_statistics",
             "batch, moving_average or estimated", cfg.trainer.valid_statistics)
    _require(cfg.trainer.select_by in ("metric", "error"), "trainer.select_by", "metric or error",
             cfg.trainer.select_by)
    _require(cfg.task.head_init in HEAD_INITS, "task.head_init", f"one of {', '.join(HEAD_INITS)}", cfg.task.head_init)
    if cfg.optim.name == "rmsprop":
        _require(cfg.optim.rule in ("torch", "blocks"), "optim.rule", "torch or blocks", cfg.optim.rule)
        _require(not (cfg.optim.rule == "blocks" and cfg.optim.weight_decay), "optim.weight_decay",
                 "0 with optim.rule=blocks (Blocks' RMSProp has no weight decay)", cfg.optim.weight_decay)
    _require(cfg.optim.name in OPTIMIZERS, "optim", f"one of {', '.join(OPTIMIZERS)}", cfg.optim.name)
    _require(cfg.optim.schedule in SCHEDULES, "optim.schedule", f"one of {', '.join(SCHEDULES)}", cfg.optim.schedule)
    device = str(cfg.trainer.device)
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None, "trainer.device",
             "auto, cpu, cuda or cuda:N", device)
    _require(cfg.trainer.amp in (False, "bf16", True), "trainer.amp", "false or bf16", cfg.trainer.amp)
    _require(cfg.trainer.compile in COMPILE_MODES, "trainer.compile", "false, default or reduce-overhead",
             cfg.trainer.compile)
    _require(cfg.logger.mode in LOGGER_MODES, "logger.mode", f"one of {', '.join(LOGGER_MODES)}", cfg.logger.mode)
    if cfg.task.kind == "classification":
        _require(cfg.task.permutation in PERMUTATIONS, "task.permutation", ", ".join(PERMUTATIONS),
                 cfg.task.permutation)
    else:
        _positive_int(cfg, "task.seq_len")
        _require(cfg.task.seq_len >= 2, "task.seq_len", "at least 2 (one input and one target)", cfg.task.seq_len)
        _positive_int(cfg, "task.eval_seq_len")
        _positive_int(cfg, "task.eval_streams")
        lengths = cfg.task.test_lengths
        _require(all(isinstance(n, int) and n >= 2 for n in lengths), "task.test_lengths",
                 "a list of segment lengths >= 2 (characters)", lengths)
    _build_check(cfg)


def _build_check(cfg: DictConfig) -> None:
    """Let the layer constructors judge the model options (norm, norm_terms, inits...), reported as config keys."""
    from recurrent_bn.models import layer_kwargs

    try:
        layer_kwargs(cfg.model, cfg.task.input_size)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def load_for_resume(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config a run was started with (`<run_dir>/config.yaml`), with the new command line's overrides on top."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"resume={run_dir}: no config.yaml there; give the directory of a run started by this trainer"
        )
    cfg = OmegaConf.load(saved)
    extra = [o for o in overrides if not o.startswith(("resume=", "hydra.", "hydra/"))]
    for override in extra:
        if "=" not in override or override.split("=", 1)[0].lstrip("+~") in ("task", "model", "optim", "experiment"):
            raise ConfigError(f"resume: cannot change {override.split('=', 1)[0]!r} of an existing run")
    if extra:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in extra]))
    cfg.resume = str(run_dir)
    return cfg
