"""Audio: one reader for every form an audio value takes (a file path, encoded bytes, a dataset
``audio`` cell, a torchcodec decoder), down-mixing to mono, resampling to 16 kHz and the checks
that name a bad file or row. Training, evaluation, CEM features, plots, annotation and the
explain pipeline all read their audio through here."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

TARGET_SR = 16000


class AudioError(ValueError):
    """Bad or unusable audio; the message names the file and the problem."""


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
    try:
        import soundfile as sf

        wav, sr = sf.read(
            io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32", always_2d=True
        )
        return wav.T, int(sr)
    except Exception:
        from torchcodec.decoders import AudioDecoder

        samples = AudioDecoder(source if isinstance(source, bytes) else str(source)).get_all_samples()
        return samples.data.numpy(), int(samples.sample_rate)


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``read_encoded_audio`` of a file, with an AudioError naming it when it is missing, empty
    or unreadable."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        return read_encoded_audio(path)
    except Exception as exc:
        raise AudioError(f"{path}: unreadable audio ({type(exc).__name__}: {exc})") from exc


def load_audio(path: str | os.PathLike, target_sr: int = TARGET_SR) -> np.ndarray:
    """Any common format (``read_encoded_audio``), down-mixed to mono and resampled to
    ``target_sr``. Raises AudioError naming the file."""
    wav, sr = read_audio_file(path)
    wav = to_mono_float(wav)
    if wav.size == 0:
        raise AudioError(f"{Path(path)}: no samples")
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


# ------------------------------------------------------------------------------------------
# Dataset audio cells
# ------------------------------------------------------------------------------------------
def audio_cell_samples(value: Any) -> tuple[np.ndarray, Any]:
    """The samples of an ``audio`` value as stored, and its rate: a path (``read_audio_file``), a
    torchcodec decoder (datasets' decoded cell), a ``{"array", "sampling_rate"}`` dict or an
    undecoded ``{"bytes", "path"}`` dict. Raises AudioError (or the backends' own exceptions)."""
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return read_audio_file(value)
    if hasattr(value, "get_all_samples"):  # datasets 5 / torchcodec decoder
        s = value.get_all_samples()
        return s.data.numpy(), int(s.sample_rate)
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            return np.asarray(value["array"]), value.get("sampling_rate")
        if value.get("bytes") is not None:
            if len(value["bytes"]) == 0:
                raise AudioError("empty audio data (0 bytes)")
            return read_encoded_audio(value["bytes"])
        if value.get("path"):
            return read_audio_file(value["path"])
        raise AudioError("no audio (the cell has neither 'array', 'bytes' nor 'path')")
    raise AudioError(f"unsupported audio value of type {type(value).__name__}")


def _sampling_rate(sr) -> int:
    try:
        ok = sr is not None and not isinstance(sr, bool) and float(sr) == int(sr) and int(sr) > 0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise AudioError(f"invalid sampling rate {sr!r} (expected a positive number of Hz)")
    return int(sr)


def decode_audio(value: Any, row_id: str = "?") -> np.ndarray:
    """A dataset ``audio`` cell (see ``audio_cell_samples``) -> float32 mono at 16 kHz, for
    training and inference. Raises AudioError naming the row (and the file where known):
    unreadable or empty audio, a missing or invalid sampling rate, more than 2 dimensions,
    non-finite (NaN/inf) samples."""
    where = f"row {row_id!r}"
    path = str(value["path"]) if isinstance(value, Mapping) and value.get("path") else None
    try:
        wav, sr = audio_cell_samples(value)
        sr = _sampling_rate(sr)
        wav = to_mono_float(np.asarray(wav))
        if wav.size == 0:
            raise AudioError("no samples")
        if not np.all(np.isfinite(wav)):
            raise AudioError("non-finite (NaN/inf) samples")
        return resample(wav, sr, TARGET_SR)
    except Exception as exc:  # AudioError, or the decoding backends' own types
        msg = str(exc) if isinstance(exc, AudioError) else f"unreadable audio ({type(exc).__name__}: {exc})"
        if path and not msg.startswith(path):
            where += f" ({path})"
        raise AudioError(f"{where}: {msg}") from exc


def analysis_waveform(value: Any) -> np.ndarray:
    """A dataset ``audio`` cell -> 16 kHz mono float32 for signal analysis (annotation), where a
    bad clip is a reason, not a failure: AudioError("unreadable: ...") for media that cannot be
    read and AudioError("channels: N") for more than two channels; an empty clip comes back empty
    and non-finite samples come back as they are, for ``audio_problem`` to name."""
    if value is None:
        raise AudioError("unreadable: no audio")
    try:
        wav, sr = audio_cell_samples(value)
    except Exception as exc:
        raise AudioError(f"unreadable: {type(exc).__name__}") from exc
    wav, sr = np.asarray(wav), int(sr)
    if wav.ndim == 2 and min(wav.shape) > 2:
        raise AudioError(f"channels: {min(wav.shape)}")
    if wav.size == 0:
        return np.zeros(0, dtype=np.float32)
    wav = to_mono_float(np.squeeze(wav) if wav.ndim == 2 and min(wav.shape) == 1 else wav)
    return resample(wav, sr, TARGET_SR) if np.all(np.isfinite(wav)) else wav


def undecoded_audio(dataset, audio_column: str = "audio"):
    """The dataset with its audio column not decoded (``{"bytes", "path"}`` cells), for readers that
    decode with ``decode_audio``: the same samples at ~1 ms per clip with soundfile, where datasets'
    torchcodec decoder takes ~8.5 ms (BENCHMARKS.md, "Audio decoding"), and a bad file is an
    AudioError naming the row instead of a failed batch."""
    import datasets

    feat = dataset.features.get(audio_column) if getattr(dataset, "features", None) else None
    if isinstance(feat, datasets.Audio) and feat.decode:
        return dataset.cast_column(audio_column, datasets.Audio(sampling_rate=feat.sampling_rate, decode=False))
    return dataset


def read_rows(dataset, indices: Sequence[int], audio_column: str = "audio") -> tuple[list[dict], list, list]:
    """Rows ``indices`` of ``dataset`` as dicts, each row's audio decoded (``decode_audio``).
    Returns ``(rows, audio, errors)``: ``audio[i]`` is a 16 kHz float32 array or None, ``errors[i]``
    None or the AudioError message naming the row and file. The rows are read as one batch with the
    audio undecoded (``undecoded_audio``) and each row's audio decoded here, so one bad file only
    flags its own row and a corpus run continues."""
    indices = [int(i) for i in indices]
    dataset = undecoded_audio(dataset, audio_column)
    try:
        batch = dataset[indices]
        rows = [{k: batch[k][j] for k in batch} for j in range(len(indices))]
    except Exception:  # not indexable by a list of indices (e.g. a list of row dicts)
        rows = [dataset[i] for i in indices]
    audio, errors = [], []
    for row in rows:
        wav = err = None
        try:
            wav = decode_audio(row[audio_column], row.get("id", "?"))
        except AudioError as exc:
            err = str(exc)
        audio.append(wav)
        errors.append(err)
    return rows, audio, errors


__all__ = [
    "TARGET_SR",
    "AudioError",
    "to_mono_float",
    "resample",
    "read_encoded_audio",
    "read_audio_file",
    "load_audio",
    "audio_problem",
    "audio_cell_samples",
    "decode_audio",
    "analysis_waveform",
    "undecoded_audio",
    "read_rows",
]
