"""Small shared helpers: atomic file writes, the --overwrite guard, seeding, processes and cores.
(Audio reading and validation live in ``trustser.audio``; its names stay importable from here.)"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# moved to trustser.audio; importable from here as before
from .audio import TARGET_SR, AudioError, audio_problem, load_audio, read_encoded_audio, resample, to_mono_float  # noqa: F401


# ------------------------------------------------------------------------------------------
# Atomic outputs: a reader never sees a half-written file or directory.
# ------------------------------------------------------------------------------------------
def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """``mkstemp``/``mkdtemp`` create 0600/0700 entries whatever the umask; outputs get the mode an
    ordinary ``open``/``mkdir`` would give them, so lab-mates in the group can read them."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def honour_umask_tree(root: str | os.PathLike) -> None:
    """``honour_umask`` for a folder and everything in it (libraries that write through temporary
    files, e.g. safetensors shards, leave 0600 files)."""
    mask = current_umask()
    paths = [(Path(root), True)]
    # os.walk skips a folder that vanishes while it is listed; chmod skips an entry that does: another
    # run on the same output folder may rename its temporary files away meanwhile
    for top, dirs, files in os.walk(root):
        paths += [(Path(top) / d, True) for d in dirs] + [(Path(top) / f, False) for f in files]
    for p, is_dir in paths:
        try:
            if p.is_symlink():
                continue
            os.chmod(p, (0o777 if is_dir else 0o666) & ~mask)
        except FileNotFoundError:
            continue


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write; on success it replaces ``path`` in one rename
    (with the mode the umask gives), on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs) -> Path:
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", False)
    return atomic_write_text(path, json.dumps(obj, default=_json_default, **kwargs) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces ``path`` in one rename.
    On an exception (or a kill) the final path is untouched and the temporary one is removed
    (or left under a dot-name that is never taken for a finished output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        honour_umask(tmp, directory=True)
        yield tmp
        for attempt in range(8):  # another writer may put the path in place between our check and our rename
            try:
                if path.exists():
                    # a name of its own: two writers of one path never remove each other's old copy
                    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                    try:
                        os.replace(path, old / "previous")
                    except FileNotFoundError:  # the other writer moved it first
                        pass
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, path)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 7:
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(
    path: str | os.PathLike, *, marker: str, overwrite: bool = False, inputs: tuple | list = (), option: str = "--out"
) -> Path:
    """Before a command replaces the folder ``path``: refuses (FileExistsError naming it) a file, or
    a non-empty folder without ``marker`` (the file the command writes into its outputs, so a
    folder it made is replaced as before), unless ``overwrite``; and always refuses a folder that is
    or holds one of ``inputs`` (replacing it would delete what the command reads)."""
    path = Path(path).expanduser()
    resolved = path.resolve()
    for src in inputs:
        if src is None:
            continue
        src_path = Path(src).expanduser().resolve()
        if src_path == resolved or resolved in src_path.parents:
            raise FileExistsError(
                f"{option} {path}: is or holds the input {src}; replacing it would delete the input "
                "(choose another folder)"
            )
    if not path.exists() or overwrite:
        return path
    if not path.is_dir():
        raise FileExistsError(f"{option} {path}: exists and is not a folder; pass --overwrite to replace it")
    if any(path.iterdir()) and not (path / marker).exists():
        raise FileExistsError(
            f"{option} {path}: exists and was not written by this command (no {marker}); "
            "choose another folder or pass --overwrite to replace it"
        )
    return path


def set_seed(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and CUDA)."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def distributed_state():
    """accelerate's ``PartialState`` for this process, on CPU where there is no accelerator (or
    ``ACCELERATE_USE_CPU`` is set). A bare ``PartialState()`` under a torchrun-style launch on a
    CPU-only machine (``recipes/accelerate_configs/cpu.yaml``) reports a single process while
    ``Trainer`` sees them all; ``PartialState(cpu=True)`` sets up the gloo process group instead."""
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=True) if use_cpu or not has_accelerator() else PartialState()


def end_distributed() -> None:
    """Waits for every process, then destroys the process group (accelerate's ``PartialState``),
    before the interpreter exits. Left to exit, a gloo group's threads were still running when its
    destructor ran, and a rank aborted with "terminate called without an active exception" after
    finishing its work (1 run in 6 of tests/rectify_two_ranks.py; pytorch#190489). Call it on
    success only: after a failure the other ranks may never reach the barrier."""
    state = distributed_state()
    state.wait_for_everyone()
    state.destroy_process_group()


def use_cpu_cores(num_processes: int = 1, threads: int | None = None) -> int:
    """On a machine without an accelerator, gives each process ``threads`` torch threads (default:
    the cores divided among the processes) and returns the number set; with an accelerator, changes
    nothing. ``accelerate launch`` without a config exports OMP_NUM_THREADS=1, which left one of two
    cores idle in a single-process CPU run."""
    import torch

    if has_accelerator():
        return torch.get_num_threads()
    n = int(threads) if threads else max(1, (os.cpu_count() or 1) // max(1, int(num_processes)))
    torch.set_num_threads(n)
    return n


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator). Without one, training arguments are set
    to ``use_cpu`` so that a multi-process CPU launch gets its gloo process group."""
    import torch

    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def json_object_argument(text: str) -> dict:
    """argparse ``type=`` for options taking a JSON object (e.g. ``--corpus-options``)."""
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value
