"""Hydra configs: every task x model composes and builds; bad values give one line naming the key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from recurrent_bn.config import CONF_DIR, LSTM_MODELS, RNN_MODELS, TASKS, check_overrides, validate
from recurrent_bn.data import pixel_order
from recurrent_bn.errors import ConfigError
from recurrent_bn.models import build_model

MODELS = LSTM_MODELS + RNN_MODELS
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model", MODELS)
def test_every_task_and_model_composes_validates_and_builds(task, model, make_cfg):
    cfg = make_cfg(f"task={task}", f"model={model}", "model.hidden_size=8")
    validate(cfg)
    assert cfg.task.name == task and cfg.model.name == model
    net = build_model(cfg)
    recurrent = net.recurrent
    assert recurrent.hidden_size == 8
    if cfg.model.norm in ("bn", "vbn"):
        # max_length follows the task's sequence length by interpolation
        norms = [m for m in recurrent.modules() if hasattr(m, "max_length")]
        assert norms and all(m.max_length == cfg.task.steps for m in norms)


def test_task_files_carry_the_papers_setup(make_cfg):
    pmnist = make_cfg("task=pmnist")
    assert (pmnist.optim.name, pmnist.optim.lr, pmnist.optim.decay) == ("rmsprop", 1e-3, 0.9)
    assert (pmnist.model.hidden_size, pmnist.task.batch_size, pmnist.trainer.max_steps) == (100, 100, 100000)
    assert pmnist.model.recurrent_init == "identity" and pmnist.trainer.clip_grad_norm == 1.0
    ptb = make_cfg("task=ptb")
    assert (ptb.optim.name, ptb.optim.lr, ptb.model.hidden_size, ptb.task.batch_size) == ("adam", 2e-3, 1000, 64)
    assert ptb.task.steps == 99 and ptb.model.max_length == 99 and ptb.model.recurrent_init == "orthogonal"
    text8 = make_cfg("task=text8")
    assert (text8.optim.lr, text8.model.hidden_size, text8.task.batch_size, text8.task.steps) == (1e-3, 2000, 128, 179)
    # initial-state noise for the BN models on sequential MNIST only, as the authors did
    assert make_cfg("task=smnist", "model=bn_lstm").model.init_state_noise == 0.1
    assert make_cfg("task=smnist", "model=lstm").model.init_state_noise == 0.0
    assert make_cfg("task=pmnist", "model=bn_lstm").model.init_state_noise == 0.0


def test_command_line_overrides_beat_the_task_setup(make_cfg):
    cfg = make_cfg("task=ptb", "optim=rmsprop", "model.hidden_size=32", "optim.lr=0.01")
    assert (cfg.optim.name, cfg.model.hidden_size, cfg.optim.lr) == ("rmsprop", 32, 0.01)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, make_cfg):
    cfg = make_cfg(f"experiment={experiment}", "model=lstm")
    validate(cfg)
    task = experiment.split("_", 1)[1]
    assert cfg.task.name == task
    if experiment.startswith("cpu_"):
        paper = make_cfg(f"experiment=paper_{task}", "model=lstm")
        assert cfg.trainer.max_steps < paper.trainer.max_steps


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_launcher_presets_compose(launcher, make_cfg):
    cfg = make_cfg(f"hydra/launcher={launcher}", return_hydra_config=True)
    assert "launcher" in cfg.hydra.launcher._target_.lower()


@pytest.mark.parametrize("override,key", [
    ("model.hidden_size=-3", "model.hidden_size"),
    ("model.gamma_init=0", "model.gamma_init"),
    ("model.gamma_init=-0.1", "model.gamma_init"),
    ("task.batch_size=1", "task.batch_size"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("optim.lr=-1", "optim.lr"),
    ("trainer.device=gpu", "trainer.device"),
    ("task.permutation=shuffled", "task.permutation"),
    ("model.dropout=1.5", "model.dropout"),
    ("logger.mode=maybe", "logger.mode"),
    ("model.norm_terms=[input,hidden]", "model"),
    ("model.recurrent_init=eye", "model"),
    ("trainer.valid_statistics=population", "trainer.valid_statistics"),
])
def test_bad_values_raise_one_line_naming_the_key(override, key, make_cfg):
    cfg = make_cfg(override)
    with pytest.raises(ConfigError) as error:
        validate(cfg)
        build_model(cfg)  # the layer's own checks (norm_terms, recurrent_init) run when it is built
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message


def test_a_batch_of_one_is_fine_without_batch_norm(make_cfg):
    validate(make_cfg("model=ln_lstm", "task.batch_size=1"))


def test_configs_resolve_without_missing_values(make_cfg):
    for task in TASKS:
        cfg = make_cfg(f"task={task}")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("model", MODELS)
def test_a_model_file_holds_exactly_its_layers_arguments(model, make_cfg):
    import inspect

    from recurrent_bn import LSTM, RNN
    from recurrent_bn.models import NOT_CONFIGURED

    cfg = make_cfg(f"model={model}")
    layer = {"lstm": LSTM, "rnn": RNN}[cfg.model.cell]
    arguments = set(inspect.signature(layer.__init__).parameters) - {"self", "input_size", "batch_first",
                                                                     *NOT_CONFIGURED}
    assert set(cfg.model) - {"name", "cell"} == arguments


def test_a_key_the_layer_does_not_take_is_a_config_error_naming_it(make_cfg):
    from recurrent_bn.models import layer_kwargs

    cfg = make_cfg("model=rnn", "+model.forget_bias=5.0")
    with pytest.raises(ConfigError, match=r"^model.forget_bias is not an argument of recurrent_bn.RNN"):
        build_model(cfg)
    with pytest.raises(ConfigError, match="model.forget_bias"):
        layer_kwargs(cfg.model)


def test_vbn_records_the_sharing_it_runs_with(make_cfg):
    assert make_cfg("model=vbn_lstm").model.share_statistics_over_time is True
    with pytest.raises(ConfigError, match="^model.share_statistics_over_time"):
        validate(make_cfg("model=vbn_lstm", "model.share_statistics_over_time=false"))


@pytest.mark.parametrize("overrides, expected", [
    (["model=rnn", "model.forget_bias=5"], "Could not override 'model.forget_bias': the chosen groups have no such"),
    (["model=lsm"], "Could not find 'model/lsm'; choose one of bn_linear_rnn, bn_linear_rnn2, bn_lstm"),
    (["model.hidden_size=[1"], "cannot parse the overrides"),
])
def test_an_override_hydra_cannot_compose_is_one_line(overrides, expected):
    problem = check_overrides(overrides)
    assert problem is not None and problem.startswith(expected) and "\n" not in problem
    assert check_overrides(["model=rnn", "model.hidden_size=5"]) is None


def test_an_mnist_pixel_order_on_another_task_is_refused_before_the_data(make_cfg):
    # experiment=cpu_pmnist sets the authors' order of MNIST's 784 pixels; on 64-pixel digits it indexed past them
    with pytest.raises(ConfigError, match="task.permutation='authors' is not allowed: none or random for task=digits"):
        validate(make_cfg("experiment=cpu_pmnist", "task=digits"))
    order = pixel_order("random", 0, num_pixels=64)
    assert sorted(order.tolist()) == list(range(64))
    with pytest.raises(ConfigError, match="order of MNIST's 784 pixels"):
        pixel_order("common", 0, num_pixels=64)


def test_a_run_saved_before_a_trainer_key_existed_resumes_with_its_default(make_cfg, tmp_path):
    from recurrent_bn.config import load_for_resume

    cfg = OmegaConf.to_container(make_cfg("task=digits", "model=bn_lstm"), resolve=True)
    del cfg["trainer"]["estimate_batch_size"]  # a config.yaml written before the key was added
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    resumed = load_for_resume(tmp_path, [])
    assert resumed.trainer.estimate_batch_size is None


def test_estimation_batches_have_the_size_asked_for(make_cfg, tmp_path):
    import torch

    from recurrent_bn.tasks import Task

    cfg = make_cfg("task=digits", "model=bn_lstm", "task.batch_size=16")
    task = Task(cfg.task, torch.device("cpu"), seed=0)
    assert [x.shape[1] for x in task.estimation_inputs(2)] == [16, 16]
    assert [x.shape[1] for x in task.estimation_inputs(2, 500)] == [500, 500]
    assert sum(x.shape[1] for x in task.estimation_inputs(None, 500)) == len(task.splits["train"][1])


@pytest.mark.parametrize("task", ["pmnist", "ptb"])
@pytest.mark.parametrize("model", MODELS)
def test_every_preset_builds_its_layer_with_the_authors_initialisation(model, task, make_cfg):
    # The layers' own default is torch.nn.LSTM's uniform draw (for users swapping the class); the paper's presets
    # must keep the authors' orthogonal weights, zero biases and forget bias 1, so that no preset's numbers change.
    cfg = make_cfg(f"task={task}", f"model={model}", "model.hidden_size=8")
    layer = build_model(cfg).recurrent
    assert layer.init == "authors"
    identity = task == "pmnist"  # the MNIST tasks' h->h identity on the candidate block (RNN: all of W_h)
    weight_hh = layer.weight_hh_l0.detach()
    if cfg.model.cell == "rnn":
        torch.testing.assert_close(weight_hh if identity else weight_hh.T @ weight_hh, torch.eye(8), atol=1e-5,
                                   rtol=0)
        return
    if identity:
        torch.testing.assert_close(weight_hh[16:24], torch.eye(8))
    else:
        torch.testing.assert_close(weight_hh.T @ weight_hh, torch.eye(8), atol=1e-5, rtol=0)
    bias = layer.bias_ih_l0 if layer.norm == "none" else layer.bias_l0
    assert torch.equal(bias[8:16], torch.full((8,), 1.0))  # forget gate
    assert torch.equal(bias[:8], torch.zeros(8)) and torch.equal(bias[16:], torch.zeros(16))


def test_a_saved_config_from_before_the_init_option_rebuilds_with_the_authors_initialisation(make_cfg):
    from recurrent_bn.models import drop_stale_keys, layer_kwargs

    saved = OmegaConf.create(OmegaConf.to_container(make_cfg("model=bn_lstm").model, resolve=True))
    del saved["init"]
    assert layer_kwargs(drop_stale_keys(saved))["init"] == "authors"


def test_a_run_saved_before_data_download_existed_resumes_with_it(make_cfg, tmp_path):
    # The trainer reads cfg.data.download: a resumed run of the campaign, saved without the key, must not fail.
    from recurrent_bn.config import load_for_resume

    saved = OmegaConf.create(OmegaConf.to_container(make_cfg("task=digits"), resolve=True))
    del saved.data["download"]
    OmegaConf.save(saved, tmp_path / "config.yaml")
    assert load_for_resume(tmp_path, []).data.download is True
