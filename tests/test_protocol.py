"""The authors' protocol, each switch against its definition: the initialisation, the read-out, validation with batch
statistics, the language-model test on the whole split, Blocks' RMSProp, the initial-state noise, the baseline's cell
bias, the common pMNIST order and the pooling of population statistics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fixtures import make_ptb
from torch.nn import functional as F

import recurrent_bn as rb
from recurrent_bn import fused
from recurrent_bn.data import load_ptb_chars, pixel_order
from recurrent_bn.models import CharLanguageModel, build_model
from recurrent_bn.norm import RecurrentBatchNorm, batch_norms
from recurrent_bn.optim import BlocksRMSprop
from recurrent_bn.tasks import Task


def has_orthonormal_columns(weight: torch.Tensor) -> bool:
    gram = weight.double().T @ weight.double()
    return torch.allclose(gram, torch.eye(weight.shape[1], dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("norm", ["none", "vbn", "bn", "ln"])
def test_the_authors_init_is_one_orthogonal_matrix_over_all_gates(norm):
    layer = rb.LSTM(3, 8, 2, norm=norm, init="authors")
    for k in range(2):
        assert has_orthonormal_columns(layer.get_parameter(f"weight_hh_l{k}"))  # W_h^T W_h = I, (4H, H)
        assert has_orthonormal_columns(layer.get_parameter(f"weight_ih_l{k}"))  # one orthogonal (4H, I)
    # Entries: RMS 1/(2 sqrt(H)) jointly, against 1/sqrt(H) with each gate's block orthogonal.
    joint = layer.weight_hh_l0.square().mean().sqrt()
    per_gate = rb.LSTM(3, 8, norm=norm, orthogonal_init="per_gate", init="authors").weight_hh_l0.square().mean().sqrt()
    assert float(joint) == pytest.approx(0.5 / np.sqrt(8), rel=1e-5)
    assert float(per_gate / joint) == pytest.approx(2.0, rel=1e-5)


def test_identity_init_keeps_the_f_i_o_blocks_orthonormal_together():
    hidden = 6
    weight = rb.LSTM(1, hidden, norm="bn", recurrent_init="identity", init="authors").weight_hh_l0.detach()
    i, f, g, o = weight.chunk(4, 0)
    assert torch.equal(g, torch.eye(hidden))
    assert has_orthonormal_columns(torch.cat([i, f, o]))
    assert not has_orthonormal_columns(i)  # one (3H, H) matrix, not three orthogonal blocks


def test_read_out_is_orthogonal_with_zero_bias_unless_asked_for_torchs_default(make_cfg):
    head = build_model(make_cfg("task=digits", "model=bn_lstm", "model.hidden_size=32")).head
    gram = head.weight.double() @ head.weight.double().T  # (10, 32): orthonormal rows
    assert torch.allclose(gram, torch.eye(10, dtype=torch.float64), atol=1e-5) and not head.bias.any()
    torch_head = build_model(make_cfg("task=digits", "model=bn_lstm", "model.hidden_size=32",
                                      "task.head_init=torch")).head
    assert not torch.allclose(torch_head.weight @ torch_head.weight.T, torch.eye(10), atol=0.1)


def test_validation_with_batch_statistics_is_a_training_forward_that_updates_nothing(make_cfg):
    cfg = make_cfg("task=digits", "model=bn_lstm", "model.hidden_size=16", "model.init_state_noise=0")
    torch.manual_seed(0)
    model = build_model(cfg)
    task = Task(cfg.task, torch.device("cpu"), seed=0)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    result = task.evaluate(model, task.batches("valid", batch_size=50), statistics="batch")
    assert not model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    # Independently: the same batches through a copy in training mode, with no gradient.
    reference = copy.deepcopy(model).train()
    losses, wrong, count = [], 0, 0
    with torch.no_grad():
        for x, y in task.batches("valid", batch_size=50):
            logits = reference(x)
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            wrong += int((logits.argmax(-1) != y).sum())
            count += len(y)
    assert result["loss"] == pytest.approx(float(sum(losses)) / count, rel=1e-5)
    assert result["error"] == pytest.approx(wrong / count) and result["acc"] == pytest.approx(1 - wrong / count)
    population = task.evaluate(model, task.batches("valid", batch_size=50))
    assert population["loss"] != pytest.approx(result["loss"], rel=1e-5)  # population statistics differ


def test_whole_split_test_equals_carrying_the_state_step_by_step(tmp_path, make_cfg):
    make_ptb(tmp_path)
    vocabulary = len(load_ptb_chars(tmp_path, verify=False)[1])
    cfg = make_cfg("task=ptb", "task.eval_streams=1", "task.seq_len=8", "task.batch_size=2",
                   f"task.num_classes={vocabulary}",
                   f"task.input_size={vocabulary}")
    task = Task(cfg.task, torch.device("cpu"), seed=0, data_root=str(tmp_path), verify=False)
    torch.manual_seed(0)
    model = CharLanguageModel(rb.LSTM(vocabulary, 5, norm="bn", max_length=4), vocabulary).double()
    for norm in batch_norms(model):  # population statistics of 4 trained steps, reused past T_max
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.trained_length.fill_(4)
    result = task.evaluate_stream(model, "test")
    ids = task.splits["test"].long()
    model.eval()
    state, total = None, 0.0
    with torch.no_grad():
        for t in range(len(ids) - 1):
            logits, state = model(ids[t : t + 1, None], state, start_step=t)
            total += float(F.cross_entropy(logits[0], ids[t + 1 : t + 2], reduction="sum"))
        whole, _ = model(ids[:-1, None])
    assert result["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-6)  # the loss is summed in float32
    whole_loss = F.cross_entropy(whole[:, 0], ids[1:], reduction="mean")
    assert result["loss"] == pytest.approx(float(whole_loss), rel=1e-6)  # the loss is summed in float32


def test_blocks_rmsprop_step_equals_its_formula():
    parameter = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = BlocksRMSprop([parameter], lr=0.1, decay=0.9, floor=1e-5)
    gradient = torch.tensor([0.5, 1e-7], dtype=torch.float64)
    parameter.grad = gradient.clone()
    optimizer.step()
    # ms = 0.1 g^2 = [0.025, 1e-15]; divide by max(sqrt(ms), 1e-5) = [0.1581139, 1e-5].
    assert parameter.detach().tolist() == pytest.approx([1.0 - 0.1 * 0.5 / np.sqrt(0.025), -2.0 - 0.1 * 1e-7 / 1e-5])
    parameter.grad = gradient.clone()
    optimizer.step()
    square = 0.9 * 0.025 + 0.1 * 0.25
    assert parameter.detach()[0].item() == pytest.approx(1.0 - 0.05 / np.sqrt(0.025) - 0.05 / np.sqrt(square))
    # torch's RMSprop with eps 1e-8 moves the tiny-gradient entry about 30x as far.
    torch_parameter = torch.nn.Parameter(torch.tensor([-2.0], dtype=torch.float64))
    torch_parameter.grad = torch.tensor([1e-7], dtype=torch.float64)
    torch.optim.RMSprop([torch_parameter], lr=0.1, alpha=0.9, eps=1e-8).step()
    assert abs(torch_parameter.item() + 2.0) > 25 * 1e-3


def test_authors_noise_is_on_h0_only_and_in_every_forward():
    x = torch.zeros(3, 4, 1)
    ours = rb.LSTM(1, 5, norm="bn", init_state_noise=0.1)
    authors = rb.LSTM(1, 5, norm="bn", init_state_noise=0.1, init_state_noise_mode="authors")
    for layer, mode in ((ours, "training"), (authors, "authors")):
        for training in (True, False):
            layer.train(training)
            h, c = layer._initial_states(None, 4, x)
            noisy_h = training or mode == "authors"
            noisy_c = training and mode == "training"
            assert bool(h.abs().sum() > 0) == noisy_h and bool(c.abs().sum() > 0) == noisy_c
    # The noise reaches the re-estimated statistics: the recurrent term's first-step variance is not zero.
    inputs = [torch.zeros(3, 8, 1) for _ in range(2)]
    for layer, expect_zero in ((ours, True), (authors, False)):
        rb.estimate_population_statistics(layer, inputs)
        assert bool((layer.norm_hh_l0.running_var[0] == 0).all()) == expect_zero


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_baseline_cell_bias_is_a_shift_inside_the_output_tanh(backend):
    if backend == "fused" and not fused.available():
        pytest.skip(f"fused kernels unavailable: {fused.unavailable_reason()}")
    torch.manual_seed(0)
    layer = rb.LSTM(3, 4, norm="none", cell_bias=True, backend=backend).double()
    with torch.no_grad():
        layer.shift_c_l0.bias.normal_()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output, (h_n, c_n) = layer(x)
    beta = layer.shift_c_l0.bias
    h = c = torch.zeros(2, 4, dtype=torch.float64)
    naive = []
    for t in range(5):
        gates = (x[t] @ layer.weight_ih_l0.T + layer.bias_ih_l0 + h @ layer.weight_hh_l0.T + layer.bias_hh_l0)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c + beta)
        naive.append(h)
    naive = torch.stack(naive)
    assert torch.allclose(output, naive, atol=1e-12) and torch.allclose(c_n[0], c, atol=1e-12)
    (grad,) = torch.autograd.grad(output.sum(), beta, retain_graph=True)
    (naive_grad,) = torch.autograd.grad(naive.sum(), beta)
    assert torch.allclose(grad, naive_grad, atol=1e-12) and grad.abs().sum() > 0
    assert "shift_c_l0.bias" not in rb.LSTM(3, 4, norm="none").state_dict()  # torch.nn.LSTM parity stays


def test_common_pmnist_order_is_the_one_later_papers_draw():
    # tk-rusch/unicornn psMNIST/psMNIST_task.py: torch.manual_seed(5544), then torch.randperm(784).
    saved = torch.get_rng_state()
    try:
        torch.manual_seed(5544)
        theirs = torch.randperm(784)
    finally:
        torch.set_rng_state(saved)
    order = pixel_order("common", seed=123)
    assert torch.equal(order, theirs) and sorted(order.tolist()) == list(range(784))
    assert not torch.equal(order, pixel_order("random", seed=0))


@pytest.mark.parametrize("steps,max_length", [(1, 4), (6, 2)])  # one step per slot, and steps pooled past T_max
def test_population_variance_survives_a_large_mean_in_float32(steps, max_length):
    norm = RecurrentBatchNorm(3, max_length, momentum=None)
    generator = torch.Generator().manual_seed(0)
    x = 30.0 + 0.01 * torch.randn(steps, 4096, 3, generator=generator)  # float32, mean 30, std 0.01
    mean, var = x.mean(1), x.var(1, correction=0)
    norm.update_population(mean, var, torch.full((steps,), 4096.0))
    pooled = x[max(0, max_length - 1) :].double() if steps > max_length else x[:1].double()
    true_var = pooled.reshape(-1, 3).var(0, correction=0)
    slot = min(steps, max_length) - 1
    assert torch.allclose(norm.running_var[slot].double(), true_var, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_example_counts_are_exact_whatever_the_precision_of_the_statistics(dtype):
    # Statistics in half precision (autocast) must not make the counts half: 70,000 is inf in float16, 301 is 300
    # in bfloat16, and the pooled slot's weights would be NaN or off.
    generator = torch.Generator().manual_seed(5)
    mean = (3.0 * torch.randn(4, 3, generator=generator)).to(dtype)
    var = torch.rand(4, 3, generator=generator).to(dtype)
    mask = torch.ones(4, 70_000, dtype=torch.bool)
    mask[1:, 301:] = False  # timesteps 1-3, pooled into the last slot, have 301 active examples
    low, exact = RecurrentBatchNorm(3, 2), RecurrentBatchNorm(3, 2)
    low.record_pass(mean, var, mask=mask, steps=4, batch=70_000)
    exact.record_pass(mean.float(), var.float(), mask=mask, steps=4, batch=70_000)
    mask[1, :] = True  # and an unequal weighting of the pooled timesteps, where a count off by one shows
    low.record_pass(mean, var, mask=mask, steps=4, batch=70_000)
    exact.record_pass(mean.float(), var.float(), mask=mask, steps=4, batch=70_000)
    assert torch.equal(low.running_mean, exact.running_mean) and torch.equal(low.running_var, exact.running_var)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_timesteps_with_slots_of_their_own_get_the_bits_of_the_pooled_update(momentum):
    # Slots 0-8 of `own` take the update where every timestep has a slot (update_population's short path); `pooled`
    # sees a tenth timestep past max_length with no active example, so it takes the general path (pooling in
    # float64), which must give every slot the same bits. Counts of 0 included (a padded timestep leaves its slot).
    generator = torch.Generator().manual_seed(3)
    own, pooled = (RecurrentBatchNorm(6, 9, momentum=momentum) for _ in range(2))
    for _ in range(3):
        mean = 40.0 * torch.randn(10, 6, generator=generator)
        var = torch.rand(10, 6, generator=generator)
        count = torch.randint(0, 3, (10,), generator=generator).float() * 7
        count[9] = 0
        own.update_population(mean[:9], var[:9], count[:9])
        pooled.update_population(mean, var, count)
    for name, buffer in own.named_buffers():
        other = dict(pooled.named_buffers())[name]
        if buffer.is_floating_point():  # bits, so that -0.0 and +0.0 differ
            buffer, other = buffer.view(torch.int32), other.view(torch.int32)
        assert torch.equal(buffer, other), name
