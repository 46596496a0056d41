"""The run configuration: where the Hydra configs live, the resolvers they use, and validation before any work.

Validation raises `ConfigError` with one line naming the key and what is allowed, before data is loaded.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recurrent_bn.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

TASKS = ("smnist", "pmnist", "ptb", "text8", "digits")
LSTM_MODELS = ("lstm", "vbn_lstm", "bn_lstm", "ln_lstm", "bne_lstm")
RNN_MODELS = ("rnn", "bn_rnn", "ln_rnn", "bn_linear_rnn", "bn_linear_rnn2")
OPTIMIZERS = ("rmsprop", "adam")
SCHEDULES = ("constant", "cosine")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
COMPILE_MODES = (False, "default", "reduce-overhead")
FLOAT32_MAX = 3.4028234663852886e38
_ABSENT = object()


def _run_dir(resume: str | None, default: str) -> str:
    return str(resume) if resume not in (None, "", "None", "null") else default


def _default_gamma(norm: str) -> float:
    from recurrent_bn.norm import default_gamma

    return default_gamma(norm)


def register_resolvers() -> None:
    """`${rbn.minus_one:x}` (prediction steps of a segment), `${rbn.run_dir:resume,default}` and
    `${rbn.default_gamma:norm}` (the layer's own default γ, so that the configs do not repeat it)."""
    if not OmegaConf.has_resolver("rbn.default_gamma"):
        OmegaConf.register_new_resolver("rbn.default_gamma", _default_gamma)
    if not OmegaConf.has_resolver("rbn.minus_one"):
        OmegaConf.register_new_resolver("rbn.minus_one", lambda value: int(value) - 1)
    if not OmegaConf.has_resolver("rbn.run_dir"):
        OmegaConf.register_new_resolver("rbn.run_dir", _run_dir)


register_resolvers()


def check_overrides(arguments: list[str]) -> str | None:
    """Hydra's composition errors (a key the chosen group does not have, a group option that does not exist, an
    override it cannot parse) as one line, found by composing once before Hydra runs; None if it composes. Hydra
    itself prints them over several lines with a hint about `+` that does not apply to our fixed groups."""
    if any(argument.startswith("-") for argument in arguments):  # --multirun sweeps, --cfg, --help: Hydra's own
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException

    register_resolvers()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose("config", overrides=arguments)
    except HydraException as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = lines[0].removeprefix("In 'config': ").rstrip(".") if lines else repr(error)
        heading = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
        if heading is not None:  # a group option that does not exist: name the ones that do
            options = [line for line in lines[heading + 1:] if ":" not in line and "=" not in line]
            return f"{first}; choose one of {', '.join(options)}"
        if "not in struct" in str(error.__cause__):
            return (f"{first}: the chosen groups have no such key; check the spelling against the keys that "
                    "`python -m recurrent_bn.train <your groups> --cfg job` prints")
        if isinstance(error, OverrideParseException):
            return f"cannot parse the overrides ({first}); write them as key=value, see `--help`"
        return first
    return None


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
    """Check every user-facing value; raise ConfigError naming the first bad key and what is allowed.

    The layer's own arguments (model.hidden_size, gamma_init, dropout, norm_terms, ...) are checked once, by the
    layer's constructor, when `models.build_model` builds it (before any data is loaded); here only what the layer
    cannot see: the task's batch size against batch norm, vbn's recorded sharing, a bidirectional language model."""
    from recurrent_bn.data.mnist import PERMUTATIONS
    from recurrent_bn.models import HEAD_INITS

    _require(cfg.task.name in TASKS, "task", f"one of {', '.join(TASKS)}", cfg.task.name)
    _require(cfg.model.name in LSTM_MODELS + RNN_MODELS, "model", f"one of {', '.join(LSTM_MODELS + RNN_MODELS)}",
             cfg.model.name)
    for key in ("model.max_length", "task.batch_size",
                "task.eval_batch_size", "trainer.max_steps", "trainer.eval_every", "trainer.checkpoint_every",
                "trainer.log_every"):
        _positive_int(cfg, key)
    for key in ("trainer.eval_batches", "trainer.estimate_batches", "trainer.estimate_batch_size", "trainer.threads"):
        _positive_int(cfg, key, allow_none=True)
    _positive_float(cfg, "optim.lr")
    _require(cfg.optim.lr < FLOAT32_MAX, "optim.lr", "a number below 3.4e38 (float32's largest)", cfg.optim.lr)
    _require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**63, "seed",
             "an integer >= 0", cfg.seed)
    _positive_float(cfg, "model.eps")
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
        # authors and common are orders of MNIST's 784 pixels (e.g. experiment=cpu_pmnist task=digits sets one)
        _require(cfg.task.dataset == "mnist" or cfg.task.permutation in ("none", "random"), "task.permutation",
                 f"none or random for task={cfg.task.name} ({cfg.task.steps} pixels; authors and common are orders "
                 "of MNIST's 784)", cfg.task.permutation)
    else:
        _require(not cfg.model.get("bidirectional", False), "model.bidirectional",
                 "false for a language model (the reverse direction would read the characters it predicts)",
                 cfg.model.get("bidirectional"))
        _positive_int(cfg, "task.seq_len")
        _require(cfg.task.seq_len >= 2, "task.seq_len", "at least 2 (one input and one target)", cfg.task.seq_len)
        _positive_int(cfg, "task.eval_seq_len")
        _positive_int(cfg, "task.eval_streams")
        lengths = cfg.task.test_lengths
        _require(all(isinstance(n, int) and n >= 2 for n in lengths), "task.test_lengths",
                 "a list of segment lengths >= 2 (characters)", lengths)
    _require(cfg.model.norm != "vbn" or cfg.model.share_statistics_over_time is True,
             "model.share_statistics_over_time", "true with norm=vbn (vertical batch norm shares them over time)",
             cfg.model.share_statistics_over_time)


GROUPS = ("task", "model", "optim", "logger", "experiment")
# What a resumed run may change: how it is trained further, logged and read, never what it is.
RESUME_MAY_CHANGE = ("trainer.", "logger.", "data.", "model.backend")


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys.append(prefix + str(key))
        if isinstance(value, DictConfig):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _no_such_key(key: str, cfg: DictConfig, how: str) -> ConfigError:
    close = difflib.get_close_matches(key, [k for k in _dotted_keys(cfg) if k != key], n=1)
    hint = f"did you mean {close[0]}?" if close else "see conf/ for the keys"
    return ConfigError(f"{how}{key}: no such key, and nothing would read it; {hint}")


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """`+key=value` adds a key to the config, which Hydra allows; but our files hold every key the code reads, so an
    added key is a misspelling that would be ignored (`+trainer.max_step=10`): refuse it, naming the close one."""
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.split("=", 1)[0].lstrip("+")
        if key.startswith("hydra") or key in GROUPS:
            continue
        raise _no_such_key(key, cfg, "+")


def _load_saved(path: Path, run_dir: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file: one line, never its payload run
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"resume={run_dir}: {path.name} cannot be read ({first[:160]}); restore it from a copy, "
                          "or start a new run") from None


def _started_experiment(run_dir: Path) -> str | None:
    from recurrent_bn.run_dir import started_with

    return next((o.split("=", 1)[1] for o in started_with(run_dir) if o.lstrip("+").startswith("experiment=")),
                None)


def load_for_resume(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config a run was started with (`<run_dir>/config.yaml`), with the new command line's overrides on top.

    Overrides compose as on a fresh run (`logger=csv` replaces the logger group); one that repeats the run's own
    value is no change; one that would change what the run is (its task, model, optimizer or data) is refused in
    one line naming the key, since the checkpoint could not carry it."""
    from recurrent_bn.models import drop_stale_keys

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"resume={run_dir}: no config.yaml there; give the directory of a run started by this trainer"
        )
    cfg = _load_saved(saved, run_dir)
    cfg.model = drop_stale_keys(cfg.model)
    # A trainer or data key added after the run started takes its default, which is the behaviour the run was
    # started with (data.download only acts on missing files, which a resumed run has already read).
    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    for group in ("trainer", "data"):
        for key, value in defaults[group].items():
            if key not in cfg[group]:
                cfg[group][key] = value
    for override in overrides:
        if override.startswith(("resume=", "hydra.", "hydra/", "+hydra", "~hydra")):
            continue
        if "=" not in override:
            raise ConfigError(f"resume: {override!r} cannot be applied to an existing run; give key=value")
        key, value = override.split("=", 1)
        key = key.lstrip("+")
        if key.startswith("~"):
            raise ConfigError(f"resume: {key} removes a key of an existing run; start a new run instead")
        if key in GROUPS:
            current = _started_experiment(run_dir) if key == "experiment" else cfg[key].name
            if value == current:
                continue
            group_file = CONF_DIR / key / f"{value}.yaml"
            if key != "logger":
                raise ConfigError(f"resume: {key}={value} would change the {key} of an existing run (it is "
                                  f"{current}); start a new run for it")
            if not group_file.is_file():
                choices = ", ".join(sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml")))
                raise ConfigError(f"logger={value} is not allowed: one of {choices}")
            cfg.logger = OmegaConf.load(group_file)
            continue
        old = OmegaConf.select(cfg, key, default=_ABSENT)
        if old is _ABSENT:
            raise _no_such_key(key, cfg, "resume: ")
        new = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={value}"]), key)
        if new == old:
            continue
        if not key.startswith(RESUME_MAY_CHANGE):
            raise ConfigError(f"resume: {key}={value} would change an existing run (it is {old}), and its checkpoint "
                              "could not carry that; start a new run for it")
        OmegaConf.update(cfg, key, new, merge=False)
    cfg.resume = str(run_dir)
    return cfg
