"""Long recordings: cut into speech segments that fit the SER-SLM's window.

A voice-activity detector (Silero VAD, whose model ships inside the ``silero-vad`` package, so
nothing is downloaded) finds the speech; segments longer than the window are split at a pause
(Silero's own ``max_speech_duration_s`` rule: the last silence of at least 98 ms, else just before
the limit) and, if still too long, into equal parts; segments shorter than ``min_seconds`` are
merged with a neighbour across a short pause when the union still fits. Used by the
``explainable-ser`` pipeline's ``long_audio="segment"`` and ``trustser explain --long-audio segment``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .audio import TARGET_SR, AudioError

# a recording longer than this is refused up front (decoding it alone would take GBs of memory)
MAX_RECORDING_SECONDS = 4 * 3600.0
# target segment length for models without a fixed window (raw-waveform encoders)
NO_WINDOW_SECONDS = 30.0
# the pipeline refuses shorter clips (utils.audio_problem's "too_short")
MIN_CLIP_SECONDS = 0.3


@functools.lru_cache(maxsize=1)
def load_vad():
    """The packaged Silero VAD (TorchScript), loaded once. Importing ``silero_vad`` sets torch to
    one thread: the caller's thread count is restored."""
    n = torch.get_num_threads()
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError("long_audio='segment' needs the silero-vad package: pip install silero-vad") from exc
    finally:
        torch.set_num_threads(n)
    return load_silero_vad(), get_speech_timestamps


def speech_segments(
    wav: np.ndarray,
    *,
    max_seconds: float | None = None,
    threshold: float = 0.5,
    min_silence_seconds: float = 0.25,
    pad_seconds: float = 0.05,
) -> list[tuple[float, float]]:
    """``[(start_s, end_s), ...]`` of the speech in a 16 kHz mono waveform, in time order, each at
    most ``max_seconds`` long (Silero splits longer speech at its pauses)."""
    model, get_speech_timestamps = load_vad()
    limit = float("inf") if not max_seconds else max(0.5, max_seconds - 2 * pad_seconds)
    with torch.inference_mode():
        spans = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)),
            model,
            threshold=threshold,
            sampling_rate=TARGET_SR,
            min_silence_duration_ms=int(min_silence_seconds * 1000),
            speech_pad_ms=int(pad_seconds * 1000),
            max_speech_duration_s=limit,
        )
    return [(s["start"] / TARGET_SR, s["end"] / TARGET_SR) for s in spans]


def fit_segments(
    segments: list[tuple[float, float]],
    max_seconds: float,
    total_seconds: float,
    *,
    min_seconds: float = 1.0,
    max_merge_gap: float = 0.5,
) -> list[tuple[float, float]]:
    """Segments made to fit the window: longer ones cut into equal parts of at most
    ``max_seconds``; ones shorter than ``min_seconds`` merged with the nearer neighbour when the
    pause between is at most ``max_merge_gap`` and the union fits; any still under
    ``MIN_CLIP_SECONDS`` widened (within the recording) to that length."""
    out: list[tuple[float, float]] = []
    for a, b in segments:
        n = max(1, math.ceil((b - a) / max_seconds - 1e-9))
        step = (b - a) / n
        out.extend((a + i * step, a + (i + 1) * step) for i in range(n))
    merged = True
    while merged and len(out) > 1:
        merged = False
        for i, (a, b) in enumerate(out):
            if b - a >= min_seconds:
                continue
            cands = []
            if i > 0 and a - out[i - 1][1] <= max_merge_gap and b - out[i - 1][0] <= max_seconds:
                cands.append((a - out[i - 1][1], i - 1))
            if i + 1 < len(out) and out[i + 1][0] - b <= max_merge_gap and out[i + 1][1] - a <= max_seconds:
                cands.append((out[i + 1][0] - b, i + 1))
            if cands:
                j = min(cands)[1]
                lo, hi = min(i, j), max(i, j)
                out[lo : hi + 1] = [(out[lo][0], out[hi][1])]
                merged = True
                break
    widened = []
    for a, b in out:
        if b - a < MIN_CLIP_SECONDS:
            mid = (a + b) / 2
            a = max(0.0, min(mid - MIN_CLIP_SECONDS / 2, total_seconds - MIN_CLIP_SECONDS))
            b = min(total_seconds, a + MIN_CLIP_SECONDS)
        widened.append((a, b))
    return widened


def segment_recording(
    wav: np.ndarray,
    max_seconds: float | None,
    *,
    name: str = "<array>",
    max_recording_seconds: float = MAX_RECORDING_SECONDS,
    **vad_kwargs,
) -> list[tuple[float, float]]:
    """Speech segments of a recording that fit a window of ``max_seconds`` (None: no fixed window,
    segments of at most ``NO_WINDOW_SECONDS``). No speech at all, or a recording over
    ``max_recording_seconds``, is an AudioError naming the file."""
    total = wav.size / TARGET_SR
    check_recording_length(total, name, max_recording_seconds)
    window = max_seconds or NO_WINDOW_SECONDS
    spans = speech_segments(wav, max_seconds=window, **vad_kwargs)
    if not spans:
        raise AudioError(f"{name}: no speech found by the voice-activity detector in {total:.1f} s of audio")
    return fit_segments(spans, window, total)


def check_recording_length(
    seconds: float | None, name: str, max_recording_seconds: float = MAX_RECORDING_SECONDS
) -> None:
    if seconds is not None and seconds > max_recording_seconds:
        raise AudioError(
            f"{name}: {seconds / 60:.1f} min is longer than the {max_recording_seconds / 60:g} min a recording may have "
            "(decoded at 16 kHz it takes 230 MB per hour); cut it into parts, or raise max_recording_seconds "
            "(--max-recording-minutes)"
        )


__all__ = [
    "speech_segments",
    "fit_segments",
    "segment_recording",
    "check_recording_length",
    "load_vad",
    "MAX_RECORDING_SECONDS",
]
