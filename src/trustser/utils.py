"""Small shared helpers: atomic file writes, seeding, audio loading and validation."""

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

TARGET_SR = 16000


class AudioError(ValueError):
    """Bad or unusable audio; the message names the file and the problem."""


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
    root = Path(root)
    mask = current_umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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


def check_output_dir(path: str | os.PathLike, *, marker: str, overwrite: bool = False,
                     inputs: tuple | list = (), option: str = "--out") -> Path:
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
            raise FileExistsError(f"{option} {path}: is or holds the input {src}; replacing it would delete the input "
                                  "(choose another folder)")
    if not path.exists() or overwrite:
        return path
    if not path.is_dir():
        raise FileExistsError(f"{option} {path}: exists and is not a folder; pass --overwrite to replace it")
    if any(path.iterdir()) and not (path / marker).exists():
        raise FileExistsError(f"{option} {path}: exists and was not written by this command (no {marker}); "
                              "choose another folder or pass --overwrite to replace it")
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


# ------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------
def to_mono_float(wav: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels)/(channels, samples) -> float32 mono by averaging channels."""
    wav = np.asarray(wav)
    if wav.ndim == 2:
        # the channel axis is the short one
        axis = 0 if wav.shape[0] < wav.shape[1] else 1
        wav = wav.mean(axis=axis)
    elif wav.ndim != 1:
        raise AudioError(f"audio array has {wav.ndim} dimensions, expected 1 or 2")
    return wav.astype(np.float32, copy=False)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    if orig_sr == target_sr:
        return wav
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), orig_sr, target_sr).numpy()


def read_encoded_audio(source: str | os.PathLike | bytes) -> tuple[np.ndarray, int]:
    """Encoded audio from a path or bytes -> ``(samples (channels, frames) float32, rate)``:
    soundfile (wav/flac/ogg), else torchcodec + FFmpeg (mp3/mp4/m4a). The backends' own
    exceptions propagate; callers turn them into an AudioError naming the row or file."""
    import io

    try:
        import soundfile as sf

        wav, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32", always_2d=True)
        return wav.T, int(sr)
    except Exception:
        from torchcodec.decoders import AudioDecoder

        samples = AudioDecoder(source if isinstance(source, bytes) else str(source)).get_all_samples()
        return samples.data.numpy(), int(samples.sample_rate)


def load_audio(path: str | os.PathLike, target_sr: int = TARGET_SR) -> np.ndarray:
    """Any common format (``read_encoded_audio``), down-mixed to mono and resampled to
    ``target_sr``. Raises AudioError naming the file."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        wav, sr = read_encoded_audio(path)
    except Exception as exc:
        raise AudioError(f"{path}: unreadable audio ({type(exc).__name__}: {exc})") from exc
    wav = to_mono_float(wav)
    if wav.size == 0:
        raise AudioError(f"{path}: no samples")
    return resample(wav, int(sr), target_sr)


def audio_problem(wav: np.ndarray, sr: int, *, min_seconds: float = 0.3, silence_dbfs: float = -60.0) -> str | None:
    """Why this waveform cannot be analysed, or None. Short reason strings, stable for tests:
    'empty', 'nan', 'too_short', 'silence', 'clipping'."""
    wav = np.asarray(wav)
    if wav.size == 0:
        return "empty"
    if not np.all(np.isfinite(wav)):
        return "nan"
    if wav.shape[-1] < int(min_seconds * sr):
        return "too_short"
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms <= 10 ** (silence_dbfs / 20):
        return "silence"
    if np.mean(np.abs(wav) >= 0.999) > 0.01:
        return "clipping"
    return None


def distributed_state():
    """accelerate's ``PartialState`` for this process, on CPU where there is no accelerator (or
    ``ACCELERATE_USE_CPU`` is set). A bare ``PartialState()`` under a torchrun-style launch on a
    CPU-only machine (``recipes/accelerate_configs/cpu.yaml``) reports a single process while
    ``Trainer`` sees them all; ``PartialState(cpu=True)`` sets up the gloo process group instead."""
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=True) if use_cpu or not has_accelerator() else PartialState()


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

