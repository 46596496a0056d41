"""Who may write a run directory, and its record of how it was started and resumed.

One process at a time: `claim(run_dir)` holds an exclusive `flock` on `<run_dir>/.lock` (with the owner's pid in it)
for as long as the run goes; the kernel drops it when the process ends, however it ends, so a lock is never stale.
The command line a run was started with stays in `.hydra/` (Hydra's files, written once); each resume appends its
time and overrides to `resumes.yaml`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from recurrent_bn.errors import UserError
from recurrent_bn.provenance import git_commit

LOCK = ".lock"
RESUMES = "resumes.yaml"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_held: dict[Path, list] = {}  # run directory -> [open lock file, depth]: claims nest within one process


class RunDirBusy(UserError):
    """Another live process is writing the run directory."""


def _owner(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _busy_message(run_dir: Path, owner: str) -> str:
    return (f"{run_dir} is in use by {owner}: two runs must not write one run directory; wait for it to end, or give "
            "this run its own hydra.run.dir")


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process; raise RunDirBusy (one line naming the owner) if another process holds it."""
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        _held[run_dir][1] += 1
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = (run_dir / LOCK).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(_busy_message(run_dir, _owner(run_dir / LOCK))) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _held[run_dir] = [handle, 1]
    try:
        yield
    finally:
        _held[run_dir][1] -= 1
        if _held[run_dir][1] == 0:
            handle = _held.pop(run_dir)[0]
            with contextlib.suppress(OSError):
                handle.truncate(0)
            handle.close()  # closing the file drops the flock


def busy_owner(run_dir: Path) -> str | None:
    """Who holds `run_dir` now (None if nobody), found without creating or changing anything there."""
    lock_path = Path(run_dir) / LOCK
    if not lock_path.is_file():
        return None
    try:
        with lock_path.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return _owner(lock_path)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def check_before_hydra(arguments: list[str]) -> str | None:
    """What is wrong with a command line's run directory, found before Hydra creates or writes anything there:
    `resume=` at a folder that is not a run, or a run directory another process is writing. None if nothing."""
    values = dict(argument.lstrip("+").split("=", 1) for argument in arguments if "=" in argument)
    resume = values.get("resume")
    if resume not in (None, "", "null", "None"):
        folder = Path(resume)
        if not folder.is_dir():
            return f"resume={resume}: no such directory; give the directory of a run started by this trainer"
        if not (folder / "config.yaml").is_file():
            return (f"resume={resume}: no config.yaml there, so it is not a run directory of this trainer; give the "
                    "directory of a run started by this trainer")
        owner = busy_owner(folder)
        return _busy_message(folder.absolute(), owner) if owner else None
    run_dir = values.get("hydra.run.dir")
    if run_dir and "${" not in run_dir:
        owner = busy_owner(Path(run_dir))
        return _busy_message(Path(run_dir).absolute(), owner) if owner else None
    return None


def record_start(run_dir: Path, files: dict[str, object]) -> None:
    """Write `.hydra/<name>` for each of `files` (the composed config, Hydra's config, the overrides)."""
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        temporary = folder / f"{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, folder / name)


def record_resume(run_dir: Path, overrides: list[str]) -> None:
    """Append one resume (UTC time, the code's commit and the overrides) to `resumes.yaml`; the start's record is
    left as it was. The commit is there because a long run resumed in a later session may continue on newer code."""
    path = Path(run_dir) / RESUMES
    resumes = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    resumes.append({"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git_commit": git_commit(),
                    "overrides": list(overrides)})
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(resumes, sort_keys=False))
    os.replace(temporary, path)


def started_with(run_dir: Path) -> list[str]:
    """The overrides a run was started with (its `.hydra/overrides.yaml`), [] if it has none."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        return list(yaml.safe_load(path.read_text()) or [])
    except (OSError, yaml.YAMLError):
        return []


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def remove_temporaries(run_dir: Path) -> None:
    """Half-written files (`*.tmp`) of an atomic write that failed: the complete files beside them are intact."""
    for temporary in [*Path(run_dir).glob("*.tmp"), *Path(run_dir).glob(".hydra/*.tmp")]:
        with contextlib.suppress(OSError):
            temporary.unlink()
