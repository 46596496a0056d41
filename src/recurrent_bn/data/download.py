"""Where each dataset comes from, what its files must hash to, and how `make data` fetches them.

``DATASETS`` lists every file a loader reads: its place under the data root, its size and its published
checksums, and the download that yields it. Loaders call :func:`require_files` (present and verified) before
they parse anything; ``scripts/download_data.py`` (``make data``) calls :func:`download`, which fetches only
what is missing or fails its check. Checking every file on every load is cheap (MNIST's 55 MB hash in
< 0.1 s), so a truncated or altered file is always reported by name and never used.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from tqdm import tqdm

from recurrent_bn.errors import ConfigError, DataCorruptError, DataNotFoundError

# Per socket operation (connect, each read): a dead mirror fails in seconds instead of hanging `make data`.
TIMEOUT_S = 30.0
GET_COMMAND = "`make data` (python scripts/download_data.py)"


@dataclass(frozen=True)
class FileSpec:
    """One file a loader reads: its path relative to the data root, its size in bytes and its checksums."""

    path: str
    size: int
    md5: str | None = None
    sha1: str | None = None
    sha256: str | None = None
    # For a zip: the member it must hold and that member's size (checked on top of the zip's own checksum).
    zip_member: str | None = None
    zip_member_size: int | None = None


@dataclass(frozen=True)
class Source:
    """One download: the mirrors tried in order, how it is unpacked, and the files it yields.

    ``unpack`` is ``"gunzip"`` (one .gz gives one file), ``"tar"`` (``members[i]`` of a .tgz gives
    ``files[i]``) or ``"none"`` (the download is the file). ``by_hand`` says how to make the files by hand
    (``{folder}`` is filled in) when there is no network. ``instead`` lists files that make the download
    unnecessary when present and valid (an extracted text8).
    """

    urls: tuple[str, ...]
    unpack: str
    files: tuple[FileSpec, ...]
    by_hand: str
    members: tuple[str, ...] = ()
    instead: tuple[FileSpec, ...] = ()


# torchvision's mirrors, in its order. The md5s are those of the *uncompressed* IDX files (the published
# values, see shared/data/README.md); the .gz files are not kept, as torchvision with download=False needs
# only these.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_MNIST_FILES = (
    (
        "train-images-idx3-ubyte",
        47_040_016,
        "6bbc9ace898e44ae57da46a324031adb",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        60_008,
        "a25bea736e30d166cdddb491f175f624",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        7_840_016,
        "2646ac647ad5339dbf082846283269ea",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        10_008,
        "27ae3e4e09519cfbb04c329615203637",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
)

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
# Checksums of the char-level files as distributed in simple-examples (shared/data/README.md). The archive
# itself is not checked: only the three files we keep from it are.
_PTB_FILES = (
    (
        "train",
        10_034_964,
        "874909f99060142f6b88cc74c34baaa2",
        "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    ),
    (
        "valid",
        786_084,
        "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
        "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    ),
    (
        "test",
        884_846,
        "1f9a2d1afe00f76e8bfbe09a65439681",
        "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
    ),
)

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
# No md5 of text8.zip was found published. The size is the one in TensorFlow's word2vec tutorial; the sha1s
# are GluonNLP's (dmlc/gluon-nlp, src/gluonnlp/data/corpora/large_text_compression_benchmark.py: text8.zip and
# the extracted text8). They could not be checked against a real copy here (none is reachable offline), so on
# top of them `download` checks that the zip is intact and holds one 100,000,000-byte member `text8`.
TEXT8_ZIP = FileSpec(
    "text8/text8.zip",
    31_344_016,
    sha1="6c70299b93b7e1f927b42cd8f6ac1a31547c7a2e",
    zip_member="text8",
    zip_member_size=100_000_000,
)
TEXT8_EXTRACTED = FileSpec("text8/text8", 100_000_000, sha1="0dc3edebc970dcc96137e7deda4d9995af9d93de")

DATASETS: dict[str, tuple[Source, ...]] = {
    "mnist": tuple(
        Source(
            urls=tuple(mirror + name + ".gz" for mirror in MNIST_MIRRORS),
            unpack="gunzip",
            files=(FileSpec(f"MNIST/raw/{name}", size, md5=md5, sha256=sha256),),
            by_hand=f"download {MNIST_MIRRORS[0]}{name}.gz and gunzip it into {{folder}}",
        )
        for name, size, md5, sha256 in _MNIST_FILES
    ),
    "ptb": (
        Source(
            urls=(PTB_URL,),
            unpack="tar",
            members=tuple(f"simple-examples/data/ptb.char.{split}.txt" for split, *_ in _PTB_FILES),
            files=tuple(
                FileSpec(f"ptb/ptb.char.{split}.txt", size, md5=md5, sha256=sha256)
                for split, size, md5, sha256 in _PTB_FILES
            ),
            by_hand=f"download {PTB_URL} and copy its simple-examples/data/ptb.char.*.txt into {{folder}}",
        ),
    ),
    "text8": (
        Source(
            urls=(TEXT8_URL,),
            unpack="none",
            files=(TEXT8_ZIP,),
            by_hand=f"download {TEXT8_URL} into {{folder}}",
            instead=(TEXT8_EXTRACTED,),
        ),
    ),
}


def missing_message(dataset: str, path: Path, source: Source) -> str:
    """One line: which file is missing, where it was looked for, and how to get it."""
    return (
        f"{dataset} file {path.name} not found in {path.parent}; run `make data` "
        f"(python scripts/download_data.py {dataset}) or {source.by_hand.format(folder=path.parent)} "
        "(or point RBN_DATA_ROOT / data.root at a folder that has it)"
    )


def verify_file(
    path: str | os.PathLike[str],
    *,
    size: int,
    md5: str | None = None,
    sha1: str | None = None,
    sha256: str | None = None,
) -> None:
    """Raise :class:`DataCorruptError` naming ``path`` unless it has exactly this size and these checksums.

    The size is checked first (free, and it catches truncated downloads); the given checksums are then
    computed in one pass over the file.
    """
    path = Path(path)
    actual_size = path.stat().st_size
    if actual_size != size:
        raise DataCorruptError(
            f"{path} is {actual_size:,} bytes, expected {size:,}: delete it and run {GET_COMMAND}"
        )
    expected = {name: value for name, value in (("md5", md5), ("sha1", sha1), ("sha256", sha256)) if value}
    hashers = {name: hashlib.new(name) for name in expected}
    if not hashers:
        return
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(chunk)
    for name, hasher in hashers.items():
        if hasher.hexdigest() != expected[name].lower():
            raise DataCorruptError(
                f"{path} has {name} {hasher.hexdigest()}, expected {expected[name]}: "
                f"delete it and run {GET_COMMAND}"
            )


def verify_spec(path: Path, spec: FileSpec) -> None:
    """:func:`verify_file` with the size and checksums of ``spec``, plus its zip member check if any."""
    verify_file(path, size=spec.size, md5=spec.md5, sha1=spec.sha1, sha256=spec.sha256)
    if spec.zip_member is not None:
        _check_zip_member(path, spec.zip_member, spec.zip_member_size)


def _check_zip_member(path: Path, name: str, size: int | None) -> None:
    """Raise :class:`DataCorruptError` unless ``path`` is an intact zip holding ``name`` of ``size`` bytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            member_size = archive.getinfo(name).file_size
            damaged = archive.testzip()  # decompresses every member and checks its CRC
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as error:
        raise DataCorruptError(
            f"{path} is not a zip holding {name} ({_reason(error)}): delete it and run {GET_COMMAND}"
        ) from error
    if damaged is not None or (size is not None and member_size != size):
        raise DataCorruptError(
            f"{path} holds a damaged or wrong-sized {name} ({member_size:,} bytes, expected {size:,}): "
            f"delete it and run {GET_COMMAND}"
        )


def require_files(dataset: str, root: Path, *, verify: bool = True) -> dict[str, Path]:
    """Return ``{file name: path}`` for every file of ``dataset`` under ``root``, checking each one first.

    Raises :class:`DataNotFoundError` for a missing file and, when ``verify``, :class:`DataCorruptError` for
    one whose size or checksum is wrong. A file listed in a source's ``instead`` (an extracted text8) stands
    in for that source's download when present. ``verify=False`` is for small hand-made fixtures in tests.
    """
    paths = {}
    for source in _sources(dataset):
        present_instead = [spec for spec in source.instead if (Path(root) / spec.path).is_file()]
        for spec in present_instead[:1] or source.files:
            path = Path(root) / spec.path
            if not path.is_file():
                raise DataNotFoundError(missing_message(dataset, path, source))
            if verify:
                # Size and checksums only: the zip member check of `download` would decompress text8 twice.
                verify_file(path, size=spec.size, md5=spec.md5, sha1=spec.sha1, sha256=spec.sha256)
            paths[path.name] = path
    return paths


def download(dataset: str, root: Path, *, log: Callable[[str], None] | None = None) -> list[str]:
    """Fetch what of ``dataset`` is missing or corrupt under ``root``, verify every file, say what was done.

    Returns one human-readable line per file ("present, verified", "downloaded from <url>, verified", ...),
    also passed to ``log`` as it happens. Files already present and valid are never fetched, so this works
    offline. Raises :class:`DataNotFoundError` when no mirror can be reached and :class:`DataCorruptError`
    when what was fetched fails its check; both messages are one line and say where to put a copy made by
    hand.
    """
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        if log is not None:
            log(line)

    for source in _sources(dataset):
        substitute = _valid_substitute(source, Path(root))
        if substitute is not None:
            report(f"{substitute.path}: present, verified (so {source.files[0].path} is not needed)")
            continue
        needed = False
        for spec in source.files:
            path = Path(root) / spec.path
            if not path.is_file():
                needed = True
                report(f"{spec.path}: missing")
                continue
            try:
                verify_spec(path, spec)
                report(f"{spec.path}: present, verified")
            except DataCorruptError:
                needed = True
                report(f"{spec.path}: present but fails its size/checksum check; downloading it again")
        if needed:
            url = _fetch_and_install(source, Path(root), dataset)
            for spec in source.files:
                report(f"{spec.path}: downloaded from {url}, verified")
    return lines


def _sources(dataset: str) -> tuple[Source, ...]:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset]


def _valid_substitute(source: Source, root: Path) -> FileSpec | None:
    for spec in source.instead:
        path = root / spec.path
        if path.is_file():
            verify_spec(path, spec)  # a corrupt substitute is reported, not silently shadowed by a download
            return spec
    return None


def _fetch_and_install(source: Source, root: Path, dataset: str) -> str:
    """Try each mirror until one yields files that pass their checks; move them into place; return its URL."""
    folder = (root / source.files[0].path).parent
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / (source.urls[0].rsplit("/", 1)[-1] + ".download")
    parts = [root / (spec.path + ".part") for spec in source.files]
    unreachable: list[str] = []
    corrupt: list[str] = []
    try:
        for url in source.urls:
            try:
                with urlopen(url, timeout=TIMEOUT_S) as response, open(archive, "wb") as out:
                    _copy_with_progress(response, out, url)
            except (OSError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors
                unreachable.append(f"{url}: {_reason(error)}")
                continue
            try:
                _unpack(source, archive, parts)
                for part, spec in zip(parts, source.files, strict=True):
                    verify_spec(part, spec)
            except DataCorruptError as error:
                corrupt.append(f"{url}: {error}")
                continue
            for part, spec in zip(parts, source.files, strict=True):
                os.replace(part, root / spec.path)
            return url
    finally:
        for leftover in (archive, *parts):
            leftover.unlink(missing_ok=True)
        for parent in created:  # innermost first; a failed download leaves no empty folders behind
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    if corrupt:
        raise DataCorruptError(f"downloaded {dataset} but it fails its check: {'; '.join(corrupt)}")
    raise DataNotFoundError(
        f"could not reach {' or '.join(unreachable)}; by hand: {source.by_hand.format(folder=folder)}"
    )


def _copy_with_progress(response, out, url: str) -> None:
    """Copy a download to ``out`` with a progress bar on a terminal (tqdm stays silent in logs and CI)."""
    total = response.headers.get("Content-Length") if getattr(response, "headers", None) is not None else None
    with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
              desc=url.rsplit("/", 1)[-1], disable=None, leave=False) as bar:
        while chunk := response.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


def fetch_on_first_use(dataset: str, root: Path, *, log: Callable[[str], None] | None = None) -> None:
    """Download what of ``dataset`` is missing under ``root`` before a loader reads it, as torchvision's datasets
    do with ``download=True``: checksummed, with a progress bar, into the data root.

    Does nothing when every file is there (the loader then verifies them as always). When no mirror can be
    reached (an offline machine), raises the loader's own one-line :class:`DataNotFoundError`, which asks for
    ``make data`` or a copy made by hand: the first run on a new machine then reads as it did before downloads
    on first use existed. What was fetched but fails its check raises :class:`DataCorruptError`.
    """
    try:
        require_files(dataset, Path(root), verify=False)
        return
    except DataNotFoundError as error:
        missing = error
    if log is not None:
        log(f"{dataset}: {missing}; downloading it into {root}")
    try:
        download(dataset, Path(root), log=log)
    except DataNotFoundError:
        raise missing from None


def _unpack(source: Source, archive: Path, parts: list[Path]) -> None:
    """Turn the downloaded ``archive`` into the ``parts`` files (still to be verified)."""
    try:
        if source.unpack == "none":
            os.replace(archive, parts[0])
        elif source.unpack == "gunzip":
            with gzip.open(archive, "rb") as src, open(parts[0], "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        elif source.unpack == "tar":
            with tarfile.open(archive, "r:*") as tar:
                # Archives list members as "./simple-examples/..." or "simple-examples/...": accept both.
                by_name = {member.name.removeprefix("./"): member for member in tar.getmembers()}
                for name, part in zip(source.members, parts, strict=True):
                    if name not in by_name or not by_name[name].isfile():
                        raise DataCorruptError(f"{archive.name} has no member {name}")
                    src = tar.extractfile(by_name[name])
                    assert src is not None  # isfile() members always have a file object
                    with src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        else:
            raise ValueError(f"unknown unpack kind {source.unpack!r}")
    except (OSError, EOFError, tarfile.TarError) as error:
        raise DataCorruptError(f"{archive.name} could not be unpacked ({_reason(error)})") from error


def _reason(error: BaseException) -> str:
    """A short one-line reason for a failed fetch or unpack (URLError hides the useful part in ``reason``)."""
    reason = error.reason if isinstance(error, URLError) else error
    return " ".join(str(reason).split()) or type(error).__name__
