"""Dataset loaders, verification, downloads and device-side batching.

Loaders run on tiny fixtures written here in the real file formats; one test reads the real shared copies of
MNIST and PTB when they are present. No test touches the network: downloads are served from file:// URLs or
fail through a patched ``urlopen``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import runpy
import tarfile
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from fixtures import PTB_WORD_LINES, make_mnist, make_ptb, make_text8, ptb_char_text, spec_of, text8_like, write_idx

import recurrent_bn.data.download as dl
from recurrent_bn.data import (
    ClassBatches,
    TextBatches,
    class_eval_batches,
    load_digits,
    load_mnist,
    load_ptb_chars,
    load_text8,
    pixel_order,
    resolve_data_root,
    text_eval_batches,
    text_streams,
    verify_file,
)
from recurrent_bn.errors import ConfigError, DataCorruptError, DataNotFoundError

REPO = Path(__file__).resolve().parents[1]
# The real copies: $RBN_SHARED_DATA, else ../shared/data next to the repository.
SHARED_DATA = Path(os.environ.get("RBN_SHARED_DATA") or REPO.parent / "shared" / "data")

# ---------------------------------------------------------------- data root


def test_data_root_is_explicit_value_then_env_var_then_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("RBN_DATA_ROOT", str(tmp_path / "from_env"))
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root("") == tmp_path / "from_env"
    assert resolve_data_root(None) == tmp_path / "from_env"
    monkeypatch.delenv("RBN_DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root(None) == tmp_path / "data"
    assert resolve_data_root("relative").is_absolute()


# ---------------------------------------------------------------- MNIST


def test_mnist_loads_uint8_scanline_images_and_int64_labels_in_a_train_valid_test_split(tmp_path):
    arrays = make_mnist(tmp_path, num_train=60, num_test=10)
    data = load_mnist(tmp_path, num_valid=15, verify=False)
    assert {split: len(data[split][0]) for split in data} == {"train": 45, "valid": 15, "test": 10}
    for images, labels in data.values():
        assert images.dtype == torch.uint8 and images.shape[1] == 784
        assert labels.dtype == torch.int64 and labels.shape == images.shape[:1]
    train_images = arrays["train-images-idx3-ubyte"]
    # Row-major scanline order: pixel (row, col) is step row * 28 + col.
    assert data["train"][0][3, 5 * 28 + 7] == train_images[3, 5, 7]
    assert np.array_equal(data["valid"][0].numpy(), train_images[45:].reshape(15, 784))
    assert np.array_equal(data["valid"][1].numpy(), arrays["train-labels-idx1-ubyte"][45:])
    assert np.array_equal(data["test"][0].numpy(), arrays["t10k-images-idx3-ubyte"].reshape(10, 784))


def test_mnist_truncated_or_mislabelled_idx_file_raises_corrupt_naming_the_file(tmp_path):
    make_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataCorruptError, match="train-images-idx3-ubyte.*header promises"):
        load_mnist(tmp_path, num_valid=10, verify=False)
    make_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    write_idx(labels, 2051, np.zeros(10, dtype=np.uint8))  # an image magic on a label file
    with pytest.raises(DataCorruptError, match="t10k-labels-idx1-ubyte.*magic 2049"):
        load_mnist(tmp_path, num_valid=10, verify=False)


def test_mnist_files_that_differ_from_the_published_ones_are_rejected_not_used(tmp_path):
    make_mnist(tmp_path)  # valid IDX files, but not the real MNIST: wrong size for the registry
    with pytest.raises(DataCorruptError, match=r"images-idx3-ubyte is [\d,]+ bytes, expected 47,040,016"):
        load_mnist(tmp_path)


def test_verify_file_reports_truncated_and_modified_files_by_name(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"0123456789")
    md5, sha256 = hashlib.md5(b"0123456789").hexdigest(), hashlib.sha256(b"0123456789").hexdigest()
    verify_file(path, size=10, md5=md5, sha256=sha256)
    path.write_bytes(b"012345678")
    with pytest.raises(DataCorruptError, match=r"file\.bin is 9 bytes, expected 10"):
        verify_file(path, size=10, md5=md5)
    path.write_bytes(b"0123456780")  # same size, one byte changed
    with pytest.raises(DataCorruptError, match=r"file\.bin has md5 .* expected " + md5):
        verify_file(path, size=10, md5=md5)
    with pytest.raises(DataCorruptError, match=r"file\.bin has sha256"):
        verify_file(path, size=10, sha256=sha256)


def test_loaders_verify_every_file_against_the_registry(monkeypatch, tmp_path):
    make_mnist(tmp_path)
    specs = [spec_of(tmp_path / s.files[0].path, s.files[0].path) for s in dl.DATASETS["mnist"]]
    sources = tuple(dl.Source(urls=(), unpack="gunzip", files=(spec,), by_hand="") for spec in specs)
    monkeypatch.setitem(dl.DATASETS, "mnist", sources)
    assert len(load_mnist(tmp_path, num_valid=10)["train"][0]) == 50
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # a still well-formed file with one wrong label
    labels.write_bytes(bytes(data))
    with pytest.raises(DataCorruptError, match="train-labels-idx1-ubyte has md5"):
        load_mnist(tmp_path, num_valid=10)


# ---------------------------------------------------------------- pixel orders


def test_random_pixel_order_is_a_true_permutation_reproducible_per_seed():
    order = pixel_order("random", seed=3)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(784))
    assert torch.equal(order, pixel_order("random", seed=3))
    assert not torch.equal(order, pixel_order("random", seed=4))


def test_authors_pixel_order_is_their_randint_with_replacement_501_distinct_pixels():
    order = pixel_order("authors", seed=123)
    assert order.dtype == torch.int64 and order.shape == (784,)
    assert np.array_equal(order.numpy(), np.random.RandomState(1).randint(0, 784, size=784))
    assert len(order.unique()) == 501


def test_no_pixel_order_is_none_and_an_unknown_kind_names_the_config_key():
    assert pixel_order("none", seed=0) is None
    with pytest.raises(ConfigError, match="task.permutation.*none, random, authors"):
        pixel_order("shuffled", seed=0)


# ---------------------------------------------------------------- PTB characters


def test_ptb_chars_are_the_even_bytes_with_a_sorted_train_vocabulary(tmp_path):
    make_ptb(tmp_path)
    ids, vocabulary = load_ptb_chars(tmp_path, verify=False)
    assert vocabulary == sorted(vocabulary) and {"_", "\n"} <= set(vocabulary)
    assert set(vocabulary) == set(ptb_char_text(PTB_WORD_LINES["train"])[0::2])
    for split, word_lines in PTB_WORD_LINES.items():
        assert ids[split].dtype == torch.uint8 and ids[split].dim() == 1
        assert "".join(vocabulary[i] for i in ids[split]) == ptb_char_text(word_lines)[0::2]
        assert len(ids[split]) == sum(len("_".join(line.split())) + 1 for line in word_lines)
    assert "".join(vocabulary[i] for i in ids["valid"][:8]) == "the_dog_"


def test_ptb_symbol_missing_from_train_raises_corrupt_naming_the_split_file(tmp_path):
    make_ptb(tmp_path, {**PTB_WORD_LINES, "test": [" a cat ran ", " quiz "]})  # 'q' is not in train
    with pytest.raises(DataCorruptError, match=r"ptb\.char\.test\.txt has symbol 'q'"):
        load_ptb_chars(tmp_path, verify=False)


def test_ptb_file_not_in_char_layout_raises_corrupt(tmp_path):
    make_ptb(tmp_path)
    (tmp_path / "ptb" / "ptb.char.valid.txt").write_text(" the dog sat \n")  # the word-level layout
    with pytest.raises(DataCorruptError, match=r"ptb\.char\.valid\.txt is not in the PTB char layout"):
        load_ptb_chars(tmp_path, verify=False)


# ---------------------------------------------------------------- text8


@pytest.mark.parametrize("extracted", [False, True], ids=["zip", "extracted"])
def test_text8_splits_in_order_into_27_symbol_ids(tmp_path, extracted):
    text = text8_like(2000)
    make_text8(tmp_path, text, extracted=extracted)
    ids, vocabulary = load_text8(tmp_path, num_valid=300, num_test=200, verify=False)
    assert vocabulary == list(" abcdefghijklmnopqrstuvwxyz")
    assert [len(ids[split]) for split in ("train", "valid", "test")] == [1500, 300, 200]
    decoded = "".join(vocabulary[i] for split in ("train", "valid", "test") for i in ids[split])
    assert decoded == text.decode()
    assert all(ids[split].dtype == torch.uint8 for split in ids)


def test_text8_byte_outside_the_alphabet_raises_corrupt(tmp_path):
    make_text8(tmp_path, text8_like(1000)[:500] + b"Capital" + text8_like(1000)[507:])
    with pytest.raises(DataCorruptError, match=r"text8\.zip has symbol 'C'"):
        load_text8(tmp_path, num_valid=100, num_test=100, verify=False)


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("load", "dataset", "folder", "file_name"),
    [
        (load_mnist, "mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        (load_ptb_chars, "ptb", "ptb", "ptb.char.train.txt"),
        (load_text8, "text8", "text8", "text8.zip"),
    ],
    ids=["mnist", "ptb", "text8"],
)
def test_missing_dataset_raises_one_line_not_found_naming_file_folder_and_make_data(
    tmp_path, load, dataset, folder, file_name
):
    with pytest.raises(DataNotFoundError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert file_name in message and str(tmp_path / folder) in message
    assert "`make data`" in message and f"download_data.py {dataset}" in message and "http" in message


# ---------------------------------------------------------------- sklearn digits


def test_digits_have_a_fixed_stratified_60_20_20_split_of_0_to_16_pixels():
    data = load_digits()
    assert {split: len(data[split][0]) for split in data} == {"train": 1077, "valid": 360, "test": 360}
    for pixels, labels in data.values():
        assert pixels.dtype == torch.uint8 and pixels.shape[1] == 64 and int(pixels.max()) == 16
        assert labels.dtype == torch.int64 and torch.bincount(labels, minlength=10).min() >= 35
    again = load_digits()
    assert all(torch.equal(data[split][0], again[split][0]) for split in data)


# ---------------------------------------------------------------- classification batches


def test_class_batches_are_time_major_scaled_and_in_the_requested_pixel_order():
    pixels = torch.randint(0, 256, (20, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20)  # the label names the example, so a batch can be checked against its source
    order = pixel_order("authors", seed=0)
    x, y = ClassBatches(pixels, labels, 4, seed=0, device="cpu", order=order).next()
    assert x.shape == (784, 4, 1) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (4,) and y.dtype == torch.int64
    for column, example in enumerate(y):
        assert torch.equal(x[:, column, 0], pixels[example][order].float() / 255)
    x, _ = ClassBatches(pixels[:, :64], labels, 4, seed=0, device="cpu", pixel_max=16.0).next()
    assert x.shape == (64, 4, 1)


def test_class_batches_epoch_sees_each_example_at_most_once_in_full_batches():
    labels = torch.arange(10)
    batches = ClassBatches(torch.zeros(10, 3, dtype=torch.uint8), labels, 3, seed=1, device="cpu")
    epochs = {}
    for _ in range(9):
        _, y = batches.next()
        assert len(y) == 3
        epochs.setdefault(batches.epoch, []).extend(y.tolist())
    assert sorted(epochs) == [0, 1, 2]
    for seen in epochs.values():
        assert len(seen) == 9 and len(set(seen)) == 9  # 10 // 3 full batches; one example dropped
    assert epochs[0] != epochs[1]


def test_class_batches_resumed_from_a_saved_state_repeat_the_uninterrupted_stream():
    pixels = torch.randint(0, 256, (10, 5), dtype=torch.uint8)
    uninterrupted = ClassBatches(pixels, torch.arange(10), 3, seed=7, device="cpu")
    for _ in range(4):  # into the second epoch
        uninterrupted.next()
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = ClassBatches(pixels, torch.arange(10), 3, seed=999, device="cpu")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(8):  # across further epoch boundaries
        (x1, y1), (x2, y2) = uninterrupted.next(), resumed.next()
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and uninterrupted.epoch == resumed.epoch


def test_class_eval_batches_cover_every_example_in_order_with_a_short_last_batch():
    pixels = torch.arange(70, dtype=torch.uint8).reshape(10, 7)
    batches = list(class_eval_batches(pixels, torch.arange(10), 4, device="cpu", pixel_max=1.0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    assert torch.equal(batches[2][0][:, :, 0].t(), pixels[8:].float())


# ---------------------------------------------------------------- text batches


def positions(length: int) -> torch.Tensor:
    """ids equal to their own position (length < 256), so a batch shows where each segment was cut."""
    return torch.arange(length, dtype=torch.uint8)


def test_text_batches_are_time_major_aligned_segments_with_targets_shifted_by_one():
    batches = TextBatches(positions(250), seq_len=10, batch_size=4, seed=0, device="cpu")
    starts = []
    for _ in range(6):  # one epoch has at least 24 // 4 = 6 batches
        x, y = batches.next()
        assert x.shape == y.shape == (9, 4) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:-1], x[1:]) and torch.equal(y, x + 1)  # contiguous, next character
        assert torch.all((x[0] - batches.offset) % 10 == 0)  # cut at offset + k * seq_len
        starts += x[0].tolist()
    assert len(set(starts)) == len(starts)  # no segment twice in an epoch


def test_text_batches_draw_a_new_crop_offset_each_epoch():
    batches = TextBatches(positions(100), seq_len=10, batch_size=9, seed=0, device="cpu")
    offsets = set()
    for _ in range(20):  # one batch per epoch
        x, _ = batches.next()
        offsets.add(int(x[0, 0]) % 10)
    assert batches.epoch == 19 and len(offsets) > 2


def test_text_batches_resumed_from_a_saved_state_repeat_the_uninterrupted_stream():
    uninterrupted = TextBatches(positions(200), seq_len=7, batch_size=5, seed=3, device="cpu")
    for _ in range(7):  # mid second epoch (5 full batches per epoch)
        uninterrupted.next()
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = TextBatches(positions(200), seq_len=7, batch_size=5, seed=0, device="cpu")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(12):
        (x1, y1), (x2, y2) = uninterrupted.next(), resumed.next()
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and uninterrupted.epoch == resumed.epoch


def test_text_eval_batches_are_consecutive_segments_from_the_start():
    ids = positions(95)
    batches = list(text_eval_batches(ids, seq_len=10, batch_size=4, device="cpu"))
    assert [x.shape for x, _ in batches] == [(9, 4), (9, 4), (9, 1)]  # 9 segments; the last 5 ids dropped
    segments = torch.cat([torch.cat([x, y[-1:]]) for x, y in batches], dim=1)
    assert torch.equal(segments.t().reshape(-1), ids[:90].long())


def test_text_streams_cut_the_split_into_contiguous_columns():
    streams = text_streams(positions(103), 4, device="cpu")
    assert streams.shape == (25, 4) and streams.dtype == torch.int64
    assert torch.equal(streams[:, 1], torch.arange(25, 50))


# ---------------------------------------------------------------- downloads


def serve_fixtures(monkeypatch, tmp_path) -> Path:
    """Build the three datasets' downloads in a local folder and point the registry at them (file:// URLs)."""
    made = tmp_path / "made"
    served = tmp_path / "served"
    served.mkdir()
    make_mnist(made)
    make_ptb(made)
    text = text8_like(1000)
    make_text8(made, text)
    mnist = []
    for source in dl.DATASETS["mnist"]:
        relative = source.files[0].path
        name = Path(relative).name
        (served / f"{name}.gz").write_bytes(gzip.compress((made / relative).read_bytes()))
        urls = ((served / "dead-mirror" / f"{name}.gz").as_uri(), (served / f"{name}.gz").as_uri())
        mnist.append(dl.Source(urls, "gunzip", (spec_of(made / relative, relative),), "gunzip into {folder}"))
    with tarfile.open(served / "simple-examples.tgz", "w:gz") as archive:
        for split in ("train", "valid", "test"):
            name = f"ptb.char.{split}.txt"
            archive.add(made / "ptb" / name, f"./simple-examples/data/{name}")  # "./" as in Mikolov's tgz
    ptb_files = tuple(spec_of(made / s.path, s.path) for s in dl.DATASETS["ptb"][0].files)
    ptb_url = (served / "simple-examples.tgz").as_uri()
    ptb = dl.Source((ptb_url,), "tar", ptb_files, "by hand", members=dl.DATASETS["ptb"][0].members)
    (served / "text8.zip").write_bytes((made / "text8" / "text8.zip").read_bytes())
    zip_path = dl.TEXT8_ZIP.path
    text8_spec = spec_of(made / zip_path, zip_path, zip_member="text8", zip_member_size=1000)
    text8 = dl.Source(((served / "text8.zip").as_uri(),), "none", (text8_spec,), "by hand")
    monkeypatch.setitem(dl.DATASETS, "mnist", tuple(mnist))
    monkeypatch.setitem(dl.DATASETS, "ptb", (ptb,))
    monkeypatch.setitem(dl.DATASETS, "text8", (text8,))
    return made


def test_download_fetches_unpacks_and_verifies_then_only_verifies(monkeypatch, tmp_path):
    made = serve_fixtures(monkeypatch, tmp_path)
    root = tmp_path / "data"
    for dataset in ("mnist", "ptb", "text8"):
        lines = dl.download(dataset, root)
        assert lines and all("downloaded from file://" in line for line in lines if "missing" not in line)
        assert all("dead-mirror" not in line for line in lines)  # fell back to the second mirror
        assert all(line.endswith("present, verified") for line in dl.download(dataset, root))
    for relative in ("MNIST/raw/t10k-images-idx3-ubyte", "ptb/ptb.char.valid.txt", "text8/text8.zip"):
        assert (root / relative).read_bytes() == (made / relative).read_bytes()
    assert not list(root.rglob("*.part")) and not list(root.rglob("*.download"))
    assert len(load_mnist(root, num_valid=10)["test"][0]) == 10  # verified against the (patched) registry
    (root / "ptb" / "ptb.char.test.txt").write_text("damaged")
    lines = dl.download("ptb", root)
    assert any("ptb.char.test.txt: present but fails" in line for line in lines)
    assert (root / "ptb/ptb.char.test.txt").read_bytes() == (made / "ptb/ptb.char.test.txt").read_bytes()


def test_unreachable_mirrors_give_a_one_line_error_without_waiting_or_leaving_files(monkeypatch, tmp_path):
    timeouts = []

    def unreachable(url, timeout):
        timeouts.append(timeout)
        raise URLError(TimeoutError("timed out"))

    monkeypatch.setattr(dl, "urlopen", unreachable)
    started = time.perf_counter()
    with pytest.raises(DataNotFoundError) as caught:
        dl.download("mnist", tmp_path / "data")
    message = str(caught.value)
    assert time.perf_counter() - started < 5 and timeouts and all(0 < t <= 30 for t in timeouts)
    assert "\n" not in message and message.startswith("could not reach https://ossci-datasets")
    assert "timed out" in message and str(tmp_path / "data" / "MNIST" / "raw") in message
    assert not (tmp_path / "data").exists()  # the folders it made for the download are gone again


def test_download_script_verifies_offline_and_exits_nonzero_with_one_line_on_failure(
    monkeypatch, tmp_path, capsys
):
    serve_fixtures(monkeypatch, tmp_path)
    main = runpy.run_path(str(REPO / "scripts" / "download_data.py"))["main"]
    root = tmp_path / "data"
    assert main(["--root", str(root), "mnist", "ptb"]) == 0
    monkeypatch.setattr(dl, "urlopen", lambda url, timeout: (_ for _ in ()).throw(URLError("offline")))
    assert main(["--root", str(root), "mnist", "ptb"]) == 0  # present files: verified, no network needed
    assert "present, verified" in capsys.readouterr().out
    assert main(["--root", str(root), "text8"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("  error: could not reach file://") and "offline" in errors[0]
    assert errors[1:] == ["not ready: text8"]


def offline(url, timeout):
    raise URLError("offline")


def test_a_missing_dataset_is_fetched_on_first_use_and_present_files_need_no_network(monkeypatch, tmp_path):
    made = serve_fixtures(monkeypatch, tmp_path)
    root, logged = tmp_path / "data", []
    dl.fetch_on_first_use("ptb", root, log=logged.append)
    for split in ("train", "valid", "test"):
        relative = f"ptb/ptb.char.{split}.txt"
        assert (root / relative).read_bytes() == (made / relative).read_bytes()
    assert "downloading it into" in logged[0] and any("verified" in line for line in logged[1:])
    monkeypatch.setattr(dl, "urlopen", offline)
    dl.fetch_on_first_use("ptb", root)  # everything there: nothing fetched, no network needed
    assert load_ptb_chars(root)[1]  # and the loader verifies them against the (patched) registry


def test_offline_first_use_stops_with_the_loaders_one_line_asking_for_make_data(monkeypatch, tmp_path):
    monkeypatch.setattr(dl, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError) as fetched:
        dl.fetch_on_first_use("mnist", root)
    with pytest.raises(DataNotFoundError) as loaded:
        load_mnist(root)
    assert str(fetched.value) == str(loaded.value)  # today's line, unchanged
    assert "\n" not in str(fetched.value) and "make data" in str(fetched.value)
    assert not root.exists()


def test_the_trainer_fetches_its_tasks_data_on_first_use_unless_data_download_is_off(monkeypatch, tmp_path,
                                                                                         make_cfg):
    from recurrent_bn.trainer import load_task

    serve_fixtures(monkeypatch, tmp_path)
    small = ["task=ptb", "task.seq_len=5", "task.batch_size=2", "task.eval_seq_len=5", "task.eval_batch_size=2",
             "task.num_classes=29", "task.input_size=29"]  # the fixture's vocabulary
    cfg = make_cfg(*small, f"data.root={tmp_path / 'data'}")
    assert cfg.data.download is True  # the default: `make train` on a new machine fetches what it needs
    assert load_task(cfg, torch.device("cpu")).vocabulary
    monkeypatch.setattr(dl, "urlopen", lambda url, timeout: pytest.fail("data.download=false must not fetch"))
    cfg = make_cfg(*small, f"data.root={tmp_path / 'empty'}", "data.download=false")
    with pytest.raises(DataNotFoundError, match="make data"):
        load_task(cfg, torch.device("cpu"))


# ---------------------------------------------------------------- the real data, when present


@pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir() or not (SHARED_DATA / "ptb").is_dir(),
    reason=f"no real MNIST/PTB copy in {SHARED_DATA} (set RBN_SHARED_DATA to a folder that has one)",
)
def test_real_mnist_and_ptb_chars_match_their_known_facts():
    mnist = load_mnist(SHARED_DATA)
    assert [len(mnist[split][0]) for split in ("train", "valid", "test")] == [50_000, 10_000, 10_000]
    assert mnist["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist["test"][1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    ids, vocabulary = load_ptb_chars(SHARED_DATA)
    assert [len(ids[split]) for split in ("train", "valid", "test")] == [5_017_482, 393_042, 442_423]
    assert len(vocabulary) == 50 and {"_", "\n"} <= set(vocabulary)
    assert "".join(vocabulary[i] for i in ids["valid"][:18]) == "consumers_may_want"
