"""The fused CPU kernels against the reference loops: same outputs, states, gradients and population statistics.

The reference loops (`recurrence.py`, differentiated by autograd) define the function; the fused kernels
(`csrc/lstm.cpp`, hand-written backward through time) must compute the same one, in float64 to ~1e-10, for every
LSTM variant, with and without padding, in training and evaluation, on one thread and split over several.
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from compare import assert_all_close, buffers, float32_errors, run

import recurrent_bn as rb
from recurrent_bn import fused, recurrence

needs_fused = pytest.mark.skipif(not recurrence.fused_available(), reason="fused kernels unavailable in this build")


def test_the_kernels_build_wherever_there_is_a_compiler():
    # The tests below skip where the kernels are unavailable, so an edit that breaks their build would pass them all
    # silently (195 skipped once): where a compiler is there and the kernels were not turned off, they must build.
    if os.environ.get(fused.DISABLE_ENV, "") not in ("", "0"):
        pytest.skip(f"{fused.DISABLE_ENV} is set")
    compiler = (shlex.split(os.environ.get("CXX", "c++")) or ["c++"])[0]  # CXX may be "ccache c++"
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) on this machine")
    assert fused.available(), fused.unavailable_reason()

TOL = 1e-10

VARIANTS = {
    "none": {"norm": "none"},
    "bn": {"norm": "bn"},
    "vbn": {"norm": "vbn"},
    "ln": {"norm": "ln"},
    "bn-shared": {"norm": "bn", "share_statistics_over_time": True},
    "bn-input": {"norm": "bn", "norm_terms": ("input",)},
    "bn-recurrent": {"norm": "bn", "norm_terms": ("recurrent",)},
    "bn-cell": {"norm": "bn", "norm_terms": ("cell",)},
    "bn-input-recurrent": {"norm": "bn", "norm_terms": ("input", "recurrent")},
    "ln-recurrent-cell": {"norm": "ln", "norm_terms": ("recurrent", "cell")},
    "bn-no-bias": {"norm": "bn", "bias": False},
}

# (steps, batch, input, hidden, layers, max_length, threads): batch 2, two layers, sequences longer than
# max_length, and a size that the kernels split over threads.
SHAPES = {
    "small": (7, 5, 3, 4, 1, 10, 1),
    "batch2-deep-long": (9, 2, 2, 3, 2, 4, 1),
    "threads": (6, 9, 3, 20, 2, 6, 2),
}


@pytest.fixture
def threads(monkeypatch):
    """Run the kernels on `n` threads regardless of size (they stay correct on one core), and on all of them: a busy
    machine would otherwise make a team that mostly waits fall back to one thread for the next calls."""

    def use(n):
        monkeypatch.setattr(fused, "threads_for", lambda batch, hidden: n)

    if fused.available():
        fused._extension.set_team_fallback(False)
    yield use
    if fused.available():
        fused._extension.set_team_fallback(True)


@contextlib.contextmanager
def fallen_back_for(calls):
    """The team's fallback on, its next `calls` calls run on one thread (0: by the team); off again after."""
    fused._extension.set_team_fallback(True)
    fused._extension.run_solo(calls)
    try:
        yield
    finally:
        fused._extension.run_solo(0)
        fused._extension.set_team_fallback(False)


def randomize(model, seed=0):
    """Random parameters (γ in [0.2, 1]) and random population statistics, so nothing passes by a special value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "weight" in name:
                p.copy_(torch.rand(p.shape, generator=generator) * 0.8 + 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def as_function(model, lengths):
    """The layer as a function of (x, h0, c0, *parameters), and copies of its parameters, for gradcheck."""
    names = [n for n, _ in model.named_parameters()]

    def f(x, h0, c0, *values):
        parameters = dict(zip(names, values, strict=True))
        y, (h, c) = torch.func.functional_call(model, parameters, (x, (h0, c0)), {"lengths": lengths})
        return y, h, c

    return f, [p.detach().clone().requires_grad_(True) for p in model.parameters()]


def randomize_population(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, rb.RecurrentBatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def pair(kwargs, input_size, hidden, layers, max_length, dtype=torch.float64):
    reference = randomize(rb.LSTM(input_size, hidden, layers, max_length=max_length, backend="reference", **kwargs))
    reference = reference.to(dtype)
    fast = copy.deepcopy(reference)
    fast.backend = "fused"
    return reference, fast


def inputs(steps, batch, input_size, hidden, layers, with_lengths, dtype=torch.float64, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, input_size, generator=generator, dtype=dtype).requires_grad_(True)
    hx = tuple(
        (torch.randn(layers, batch, hidden, generator=generator, dtype=dtype) * 0.5).requires_grad_(True)
        for _ in range(2)
    )
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
        if batch > 2:
            lengths[1] = 1
    return x, hx, lengths


@needs_fused
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_training_step_matches_reference(threads, variant, with_lengths, shape):
    steps, batch, input_size, hidden, layers, max_length, n_threads = SHAPES[shape]
    threads(n_threads)
    reference, fast = pair(VARIANTS[variant], input_size, hidden, layers, max_length)
    x, hx, lengths = inputs(steps, batch, input_size, hidden, layers, with_lengths)
    outputs_ref, grads_ref = run(reference, x, hx, lengths)
    outputs_fast, grads_fast = run(fast, x, hx, lengths)
    assert_all_close(outputs_ref, outputs_fast, TOL, "outputs")
    assert_all_close(grads_ref, grads_fast, TOL, "gradients")
    # The population statistics: every buffer, including the counts and the trained length.
    assert_all_close(buffers(reference), buffers(fast), TOL, "buffers")


@needs_fused
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_evaluation_matches_reference(threads, variant, with_lengths, shape):
    steps, batch, input_size, hidden, layers, max_length, n_threads = SHAPES[shape]
    threads(n_threads)
    reference, fast = pair(VARIANTS[variant], input_size, hidden, layers, max_length)
    x, hx, lengths = inputs(steps, batch, input_size, hidden, layers, with_lengths)
    train_x = torch.randn(max(2, steps - 3), batch, input_size, dtype=torch.float64)
    for model in (reference, fast):
        model(train_x)  # a trained length shorter than the evaluated sequence: T_max is reused
        randomize_population(model)
        model.eval()
    before = buffers(fast)
    outputs_ref, grads_ref = run(reference, x, hx, lengths, start_step=1)
    outputs_fast, grads_fast = run(fast, x, hx, lengths, start_step=1)
    assert_all_close(outputs_ref, outputs_fast, TOL, "outputs")
    assert_all_close(grads_ref, grads_fast, TOL, "gradients")
    assert_all_close(before, buffers(fast), 0.0, "buffers")
    with torch.no_grad():  # the forward-only path of the kernels
        y_ref, _ = reference(x, hx, lengths, start_step=1)
        y_fast, _ = fast(x, hx, lengths, start_step=1)
    assert_all_close([y_ref], [y_fast], TOL, "no-grad outputs")


@needs_fused
@pytest.mark.parametrize("variant", ["bn", "vbn", "bn-shared"])
def test_fused_no_grad_training_pass_updates_the_population_like_the_reference(threads, variant):
    # estimate_population_statistics runs batch norm in training mode under no_grad.
    threads(2)
    reference, fast = pair(VARIANTS[variant], 3, 20, 2, 5)
    x, _, lengths = inputs(8, 9, 3, 20, 2, with_lengths=True)
    with torch.no_grad():
        y_ref, _ = reference(x, lengths=lengths, start_step=2)
        y_fast, _ = fast(x, lengths=lengths, start_step=2)
    assert_all_close([y_ref], [y_fast], TOL, "outputs")
    assert_all_close(buffers(reference), buffers(fast), TOL, "buffers")


@needs_fused
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_numbers_are_the_same_bits_when_the_team_falls_back_to_one_thread(threads, variant):
    # A busy core makes a team that mostly waits run its next calls on one thread: that must not change a bit of
    # the outputs, gradients or population statistics (it did: each thread summed its own rows).
    threads(3)
    steps, batch, input_size, hidden, layers = 6, 11, 3, 20, 2
    _, model = pair(VARIANTS[variant], input_size, hidden, layers, steps, dtype=torch.float32)
    x, hx, lengths = inputs(steps, batch, input_size, hidden, layers, True, dtype=torch.float32)
    results = []
    for solo_calls in (0, 1000):
        fast = copy.deepcopy(model)
        with fallen_back_for(solo_calls):
            outputs, grads = run(fast, x, hx, lengths)
        results.append([*outputs, *grads, *buffers(fast)])
    for team, solo in zip(*results, strict=True):
        assert team is None and solo is None or torch.equal(team, solo)


@needs_fused
def test_a_fallen_back_call_keeps_the_bits_at_sizes_whose_copies_aten_splits(threads):
    # Above 32768 elements ATen spreads a copy over threads; while the team runs on one thread the kernels make
    # their copies (the incoming gradient, h_prev^T for the dW_h product) on one thread too, and the population
    # update runs on one thread always (fused.one_thread). Neither may change a bit, nor leave the thread count
    # changed for the caller.
    threads(2)
    torch.set_num_threads(2)
    steps, batch, input_size, hidden = 40, 16, 3, 64  # (steps x batch x hidden) = 40960
    _, model = pair({"norm": "bn"}, input_size, hidden, 1, steps, dtype=torch.float32)
    x, hx, _ = inputs(steps, batch, input_size, hidden, 1, False, dtype=torch.float32)
    results = []
    for solo_calls in (0, 1000):
        fast = copy.deepcopy(model)
        with fallen_back_for(solo_calls):
            output, _ = fast(x)
            output.sum().backward()  # an expanded gradient: the kernels copy it
        assert torch.get_num_threads() == 2
        results.append([output, *(p.grad for p in fast.parameters()), *buffers(fast)])
    for team, solo in zip(*results, strict=True):
        assert torch.equal(team, solo)


@needs_fused
def test_one_thread_scope_sets_one_thread_inside_and_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError), fused.one_thread():
            assert torch.get_num_threads() == 1
            raise ValueError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_population_update_gives_the_same_bits_on_one_thread_and_on_two():
    # Why fused.one_thread may run it on one thread: elementwise operations and index_add_ (each element adds its
    # sources in index order) do not depend on the split. Pooled slots (steps past max_length) and sizes above
    # ATen's grain (32768 elements) included.
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(300, 400, generator=generator) * 5
    var = torch.rand(300, 400, generator=generator)
    count = torch.randint(0, 65, (300,), generator=generator).float()
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            norm = rb.norm.RecurrentBatchNorm(400, max_length=100)
            for start in (0, 250):
                norm.update_population(mean, var, count, start_step=start)
            results.append([norm.running_mean, norm.running_var, norm.num_batches_tracked, norm.trained_length])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@needs_fused
def test_fused_all_padded_timesteps_and_zero_input_variance(threads):
    # Timesteps where no example is active (statistics 0, 0), and leading zero inputs: the input term has a zero
    # batch variance there, so its normalization divides by sqrt(eps). (The recurrent term's zero variance, whose
    # gradient explodes through time, is in test_layers.)
    threads(2)
    reference, fast = pair({"norm": "bn"}, 1, 16, 1, 10)
    x, hx, _ = inputs(8, 4, 1, 16, 1, with_lengths=False)
    with torch.no_grad():
        x[:3] = 0
    lengths = torch.tensor([5, 3, 2, 1])
    outputs_ref, grads_ref = run(reference, x, hx, lengths)
    outputs_fast, grads_fast = run(fast, x, hx, lengths)
    assert_all_close(outputs_ref, outputs_fast, TOL, "outputs")
    assert_all_close(grads_ref, grads_fast, TOL, "gradients")
    assert_all_close(buffers(reference), buffers(fast), TOL, "buffers")
    assert int(fast.norm_hh_l0.trained_length) == 5


@needs_fused
@pytest.mark.parametrize("variant", ["bn", "vbn", "ln", "bn-recurrent", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fused_gradcheck(threads, variant, training, n_threads):
    threads(n_threads)
    torch.manual_seed(4)
    model = randomize(rb.LSTM(2, 4, max_length=3, backend="fused", **VARIANTS[variant])).double()
    if not training:
        model(torch.randn(2, 4, 2, dtype=torch.float64))
        randomize_population(model)
    model.train(training)
    x = torch.randn(5, 4, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4, 3])
    f, values = as_function(model, lengths)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *values), eps=1e-6, atol=1e-6, rtol=1e-5)


FLOAT32_SHAPES = {
    "one-panel": (40, 16, 5, 32, 1),
    # 4H = 80 columns: panels of the packed product padded; 9 rows: blocks of fewer than 8 rows; 2 layers.
    "padded-odd-rows": (12, 9, 3, 20, 2),
}


@needs_fused
@pytest.mark.parametrize("shape", list(FLOAT32_SHAPES))
@pytest.mark.parametrize("variant", ["none", "bn", "vbn", "ln"])
def test_fused_float32_is_as_accurate_as_the_reference_float32(threads, variant, shape):
    # Both float32 paths against the float64 reference: the fused one may not be much further from it than the
    # reference's own float32 run (batch norm over a few active examples is ill-conditioned in float32 anyway).
    steps, batch, input_size, hidden, layers = FLOAT32_SHAPES[shape]
    threads(2)
    reference, fast = pair(VARIANTS[variant], input_size, hidden, layers, steps)
    reference32 = copy.deepcopy(reference).float()
    fast = fast.float()
    x, hx, lengths = inputs(steps, batch, input_size, hidden, layers, with_lengths=True)
    outputs64, grads64 = run(reference, x, hx, lengths)
    errors = {}
    for name, model in (("reference", reference32), ("fused", fast)):
        x32 = x.detach().float().requires_grad_(True)
        hx32 = tuple(h.detach().float().requires_grad_(True) for h in hx)
        outputs, grads = run(model, x32, hx32, lengths)
        outputs, outputs64 = [t.detach() for t in outputs], [t.detach() for t in outputs64]
        errors[name] = [
            float((a.float() - b).abs().max() / a.abs().max().clamp(min=1.0))
            for a, b in zip(outputs64 + grads64, outputs + grads, strict=True)
        ] + [float((a.float() - b).abs().max()) for a, b in zip(buffers(reference), buffers(model), strict=True)]
    for reference_error, fused_error in zip(errors["reference"], errors["fused"], strict=True):
        assert fused_error <= 4 * reference_error + 1e-5, (fused_error, reference_error)
    assert max(errors["fused"][:3]) < 1e-4  # outputs and final states


@needs_fused
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layers", [1, 2])
def test_fused_float32_error_is_within_ten_times_the_reference_float32_error(threads, training, layers):
    # Population statistics of inputs with |mean| >> std, where a map folded into x * scale + (beta - mean * scale)
    # cancels. The C++ kernels were within 3.4x of the reference loop's float32 error even folded (the Triton
    # kernels were 1000x off, mostly from their tanh); they now compute (x - mean) * scale + beta, as every path.
    threads(2)
    steps, batch, input_size, hidden = 5, 8, 3, 40
    torch.manual_seed(0)
    reference = rb.LSTM(input_size, hidden, layers, norm="bn", max_length=steps, backend="reference").double()
    generator = torch.Generator().manual_seed(1)

    def data():
        return 100.0 + torch.randn(steps, batch, input_size, generator=generator, dtype=torch.float64)

    rb.estimate_population_statistics(reference, [data() for _ in range(3)])
    reference.train(training)
    x = data().requires_grad_(True)
    hx = tuple(torch.zeros(layers, batch, hidden, dtype=torch.float64, requires_grad=True) for _ in range(2))
    errors = float32_errors(reference, x, hx, ("reference", "fused"))
    for k, (reference_error, fused_error) in enumerate(zip(errors["reference"], errors["fused"], strict=True)):
        assert fused_error <= 10 * reference_error + 1e-6, (k, fused_error, reference_error)


@needs_fused
@pytest.mark.skipif(recurrence.fused_available() and fused.kernel_variant() != "avx512",
                    reason="the packed product runs on AVX-512 only")
def test_packed_product_agrees_with_onednn_in_float32(threads):
    threads(2)
    torch.manual_seed(6)
    model = randomize(rb.LSTM(3, 20, 2, norm="bn", backend="fused")).float()
    x = torch.randn(9, 7, 3, dtype=torch.float32, requires_grad=True)
    results = []
    try:
        for packed in (True, False):
            fused._extension.set_packed_gemm(packed)
            y, (h, c) = model(x)
            results.append([y, h, c, *torch.autograd.grad((y**2).sum() + c.sum(), [x, *model.parameters()])])
    finally:
        fused._extension.set_packed_gemm(True)
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


@needs_fused
def test_tensors_the_kernels_do_not_cover_run_the_reference_loop():
    torch.manual_seed(5)
    model = rb.LSTM(3, 4, norm="bn", backend="fused").to(torch.bfloat16)
    reference = copy.deepcopy(model)
    reference.backend = "reference"
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    assert torch.equal(model(x)[0], reference(x)[0])


def test_fused_unavailable_auto_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(fused, "_extension", None)
    monkeypatch.setattr(fused, "_reason", "simulated")
    monkeypatch.setattr(recurrence, "_warned_unavailable", False)
    model = rb.LSTM(3, 4, 2, norm="bn", backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(5, 2, 3))
        model(torch.randn(5, 2, 3))
    messages = [str(w.message) for w in caught if "fused" in str(w.message)]
    assert len(messages) == 1 and "simulated" in messages[0]
    with pytest.raises(RuntimeError, match="backend='reference'"):
        rb.LSTM(3, 4, backend="fused")(torch.randn(5, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rb.LSTM(3, 4, backend="reference")(torch.randn(5, 2, 3))


def test_disable_environment_variable_gives_working_layers_and_one_warning():
    script = (
        "import warnings, torch, recurrent_bn as rb\n"
        "from recurrent_bn.recurrence import fused_available\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not fused_available()\n"
        "    m = rb.LSTM(3, 4, 2, norm='bn')\n"
        "    y, _ = m(torch.randn(5, 2, 3)); y.sum().backward(); m(torch.randn(5, 2, 3))\n"
        "print(sum('RBN_DISABLE_FUSED' in str(w.message) for w in caught))\n"
        "try:\n"
        "    rb.LSTM(3, 4, backend='fused')(torch.randn(5, 2, 3))\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    environment = {**os.environ, "RBN_DISABLE_FUSED": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "1"
    assert "RBN_DISABLE_FUSED" in lines[1] and "backend='reference'" in lines[1]


LIMITED_TEAM_SCRIPT = """
import copy, hashlib, sys, torch, recurrent_bn as rb
torch.set_num_threads(1)  # MKL's QR (the orthogonal initialisation) itself hangs under OMP_THREAD_LIMIT=1
torch.manual_seed(0)
variants = {"none": {}, "ln": {"norm": "ln"}, "bn": {"norm": "bn"},
            "bn-shared": {"norm": "bn", "share_statistics_over_time": True}}
models = {name: rb.LSTM(5, 64, backend="fused", max_length=12, **kwargs).double() for name, kwargs in variants.items()}
x = torch.randn(12, 32, 5, dtype=torch.float64)
torch.set_num_threads(2)  # B 32 x H 64 is split over two threads, which OpenMP will not give
for name, fast in models.items():
    slow = copy.deepcopy(fast)
    slow.backend = "reference"
    for model in (fast, slow):
        output, (h, c) = model(x)
        (output.sum() + (h * c).sum()).backward()
    pairs = [(fast(x)[0], slow(x)[0])] + [(p.grad, q.grad) for p, q in zip(fast.parameters(), slow.parameters())]
    pairs += list(zip(fast.buffers(), slow.buffers()))
    digest = hashlib.sha256(b"".join(a.detach().numpy().tobytes() for a, _ in pairs)).hexdigest()[:16]
    print(name, max((a - b).abs().max().item() for a, b in pairs), digest, flush=True)
"""


@needs_fused
def test_fused_kernels_are_right_when_openmp_gives_fewer_threads_than_asked():
    # OMP_THREAD_LIMIT=1 caps every team at one thread while PyTorch asks for two: the kernels must split the rows
    # over the team they got (before, rows 16-31 came back wrong and the batch-norm barrier waited forever).
    # And the numbers are the same bits as a team of two gives: they depend on the threads asked for, not on the
    # threads that run.
    digests = []
    for limit in ("1", None):
        environment = {k: v for k, v in os.environ.items() if k != "OMP_THREAD_LIMIT"}
        if limit:
            environment["OMP_THREAD_LIMIT"] = limit
        result = subprocess.run([sys.executable, "-c", LIMITED_TEAM_SCRIPT], env=environment, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = [line.split() for line in result.stdout.strip().splitlines()]
        assert [row[0] for row in rows] == ["none", "ln", "bn", "bn-shared"], result.stdout
        assert all(float(row[1]) < TOL for row in rows), rows
        digests.append([row[2] for row in rows])
    assert digests[0] == digests[1]


def test_the_build_name_changes_with_any_source_byte_flag_or_torch_and_is_stable_otherwise(tmp_path, monkeypatch):
    # The extension cache keys an entry by name and rebuilds it whenever its inputs differ from the last build: a
    # name shared by two checkouts or environments made them rebuild it in turn.
    source = tmp_path / "lstm.cpp"
    source.write_bytes(fused.SOURCES[0].read_bytes())
    name = fused.build_name([source])
    assert name.startswith(fused.EXTENSION_NAME + "_") and name.isidentifier()
    assert fused.build_name([source]) == name
    assert fused.build_name() == fused.build_name() != name  # the package's own sources, elsewhere
    assert fused.build_name([source], cflags=(*fused.CFLAGS, "-g")) != name
    assert fused.build_name([source], ldflags=()) != name
    text = bytearray(source.read_bytes())
    text[len(text) // 2] ^= 1
    source.write_bytes(bytes(text))
    assert fused.build_name([source]) != name
    source.write_bytes(fused.SOURCES[0].read_bytes())
    assert fused.build_name([source]) == name
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert fused.build_name([source]) != name


@needs_fused
@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_a_forward_keeps_nothing_alive_once_its_outputs_are_gone(norm):
    # The forward's results once held the layer's output while its autograd context held them: a cycle through C++
    # that Python's collector cannot see, which kept every step's intermediates (330 MB per pMNIST step) forever.
    import gc
    import weakref

    layer = rb.LSTM(3, 4, norm=norm, max_length=7, backend="fused").double()
    x = torch.randn(7, 5, 3, dtype=torch.float64, requires_grad=True)
    alive = weakref.ref(x)
    output, state = layer(x)
    del x, output, state
    gc.collect()
    assert alive() is None


PAGE_FAULTS = """
import resource, sys, torch
import recurrent_bn as rb
torch.set_num_threads(1)
layer = rb.LSTM(1, 100, norm="bn", max_length=400, backend="fused")
x = torch.randn(400, 64, 1)
faults = []
for step in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    output, _ = layer(x)
    output.sum().backward()
    del output
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
"""


@needs_fused
def test_a_training_step_in_a_plain_process_does_not_fault_its_intermediates_in_again():
    # A user's script does not tune glibc's malloc as the trainer does: blocks this large were mmap'ed and unmapped
    # at every call, so every step page-faulted all of them in again (about 1.6x slower at the pMNIST shape).
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, timeout=600,
                            env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    steps, batch, hidden = 400, 64, 100
    # hs, cs, A, RH, CH, TC of the forward and DR, dP of the backward, float32
    intermediates = 4 * (2 * (steps + 1) * batch * hidden + 4 * steps * batch * 4 * hidden + 2 * steps * batch * hidden)
    assert int(result.stdout.split()[-1]) < 0.4 * intermediates / resource.getpagesize()


# ------------------------------------------------------------------------------------- second derivatives


def _penalized_gradients(model, x):
    """Gradients of `out.sum() + 10 |d out.sum() / dx|^2` (a gradient penalty) w.r.t. x and every parameter."""
    x = x.detach().requires_grad_(True)
    output, _ = model(x)
    (slope,) = torch.autograd.grad(output.sum(), x, create_graph=True)
    return torch.autograd.grad(output.sum() + 10 * slope.square().sum(), [x, *model.parameters()])


@needs_fused
def test_gradient_penalty_through_the_fused_path_matches_torch_lstm():
    # The kernels' backward is a first derivative: with create_graph=True it gave |dL/dW_h| = 0.39 against torch's
    # 4.50, silently, before the layer recomputed such gradients through the reference loop.
    torch.manual_seed(0)
    expected_model = torch.nn.LSTM(3, 4, 2).double()
    model = rb.LSTM(3, 4, 2, backend="fused").double()
    model.load_state_dict(expected_model.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = _penalized_gradients(expected_model, x)
    assert_all_close(_penalized_gradients(model, x), expected, 1e-10, "penalized gradients")
    assert float(expected[2].norm()) > 0.1  # the penalty reaches W_h, so the test would see it missing


@needs_fused
@pytest.mark.parametrize("variant, training", [("none", True), ("bn", True), ("bn", False), ("ln", True)])
def test_fused_gradgradcheck(variant, training):
    torch.manual_seed(4)
    model = randomize(rb.LSTM(2, 2, max_length=2, backend="fused", **VARIANTS[variant])).double()
    if not training:
        model(torch.randn(2, 3, 2, dtype=torch.float64))
        randomize_population(model)
    model.train(training)
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 1, 2])
    f, values = as_function(model, lengths)
    assert torch.autograd.gradgradcheck(f, (x, h0, c0, *values), eps=1e-6, atol=1e-5, rtol=1e-4)


@needs_fused
def test_norm_kind_numbers_are_the_kernels():
    """`norm.Kind` is the one description of a normalized term: the C++ enum must number the kinds alike."""
    from recurrent_bn.norm import Kind

    assert fused._extension.KINDS == {kind.name: int(kind) for kind in Kind}


@needs_fused
def test_an_explicit_fused_choice_it_cannot_honour_says_why_once(monkeypatch):
    from recurrent_bn import backends

    monkeypatch.setattr(backends, "_said", set())
    model = rb.LSTM(3, 4, norm="bn", backend="fused").to(torch.bfloat16)
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"backend='fused' runs the reference loop on cpu tensors of .*bfloat16"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
