"""Per-utterance acoustic features behind the pitch, volume and speed descriptors.

Deviations from the released SpeechCraft tool (see docs/annotation.md): pitch is the Praat F0 of
voiced frames (not ``librosa.piptrack`` spectral peaks), volume is the RMS level in dB of the raw,
un-normalised, un-padded waveform (not the mean RMS of a normalised padded batch) and speed is
phonemes per second of *this* utterance's transcript (not the batch's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import subprocess
import threading
from typing import Sequence

import numpy as np

# Praat pitch range: wide enough for low male and child voices.
F0_FLOOR = 60.0
F0_CEILING = 600.0
F0_TIME_STEP = 0.01
# Frames more than this many dB below the loudest frame (or below the absolute floor) are pauses.
ACTIVITY_RANGE_DB = 40.0
ACTIVITY_FLOOR_DBFS = -60.0
FRAME_SECONDS = 0.025
HOP_SECONDS = 0.010
DEFAULT_ESPEAK_VOICE = "en-us"

SIGNAL_FEATURES: tuple[str, ...] = ("f0_mean", "f0_median", "rms_db", "phonemes_per_second", "duration")


# ------------------------------------------------------------------------------------------
# Phoneme counting (offline G2P through espeak-ng)
# ------------------------------------------------------------------------------------------
class _EspeakLibrary:
    """libespeak-ng through ctypes: one in-process G2P call per text (~0.1 ms), no subprocess.

    espeak-ng is not thread safe, hence the lock; each worker process loads its own copy."""

    _AUDIO_OUTPUT_SYNCHRONOUS = 2
    _CHARS_UTF8 = 1
    _IPA = 0x02

    def __init__(self, voice: str):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        self.lib = ctypes.cdll.LoadLibrary(name)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        if self.lib.espeak_Initialize(self._AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0) <= 0:
            raise RuntimeError("espeak-ng: initialisation failed")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng: unknown voice {voice!r}")
        self.lock = threading.Lock()

    def ipa(self, text: str) -> str:
        # phonemes separated by "_" (bits 8-23 of phonememode), words by spaces, one result per clause
        mode = (ord("_") << 8) | self._IPA
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        out = []
        with self.lock:
            while ptr.value:
                res = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), self._CHARS_UTF8, mode)
                if res is None:
                    break
                out.append(res.decode("utf-8", errors="replace"))
        return " ".join(out)


@functools.lru_cache(maxsize=4)
def _espeak(voice: str, pid: int) -> _EspeakLibrary | None:
    try:
        return _EspeakLibrary(voice)
    except OSError:
        return None


def _count_ipa(ipa: str) -> int:
    count = 0
    for word in ipa.split():
        for ph in word.split("_"):
            ph = ph.replace("ˈ", "").replace("ˌ", "").strip()
            if ph:
                count += 1
    return count


def count_phonemes(texts: Sequence[str], voice: str = DEFAULT_ESPEAK_VOICE) -> list[int]:
    """Phoneme counts of many transcripts, offline (espeak-ng's English G2P; digits are
    expanded to words). Uses libespeak-ng in-process; falls back to one ``espeak-ng`` process
    per text when only the executable is present. Raises RuntimeError if neither exists."""
    texts = [t if isinstance(t, str) else "" for t in texts]
    lib = _espeak(voice, os.getpid())
    if lib is not None:
        return [_count_ipa(lib.ipa(t)) if t.strip() else 0 for t in texts]
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is needed to count phonemes: install it (apt-get install espeak-ng)")
    counts = []
    for t in texts:
        if not t.strip():
            counts.append(0)
            continue
        res = subprocess.run(
            [exe, "-q", "--ipa", "--sep=_", "-v", voice, t], capture_output=True, text=True, check=True
        )
        counts.append(_count_ipa(res.stdout))
    return counts


# ------------------------------------------------------------------------------------------
# Signal features
# ------------------------------------------------------------------------------------------
def _frame_power(wav: np.ndarray, sr: int) -> np.ndarray:
    frame = max(1, int(round(FRAME_SECONDS * sr)))
    hop = max(1, int(round(HOP_SECONDS * sr)))
    if wav.size < frame:
        return np.array([np.mean(np.square(wav, dtype=np.float64))])
    frames = np.lib.stride_tricks.sliding_window_view(wav, frame)[::hop]
    return np.mean(np.square(frames, dtype=np.float64), axis=1)


def activity(wav: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame power, active mask): a frame is active when within ACTIVITY_RANGE_DB of the
    loudest frame and above ACTIVITY_FLOOR_DBFS."""
    power = _frame_power(wav, sr)
    db = 10 * np.log10(power + 1e-20)
    active = (db > db.max() - ACTIVITY_RANGE_DB) & (db > ACTIVITY_FLOOR_DBFS)
    return power, active


def praat_pitch(wav: np.ndarray, sr: int, floor: float = F0_FLOOR, ceiling: float = F0_CEILING):
    """Praat's autocorrelation pitch analysis (10 ms steps) of the clip: the one analysis behind both
    the pitch descriptor and, at the default range, the SER-SLM's F0 stream (``f0_stream_track``)."""
    import parselmouth

    snd = parselmouth.Sound(np.asarray(wav, dtype=np.float64), sampling_frequency=float(sr))
    return snd.to_pitch_ac(time_step=F0_TIME_STEP, pitch_floor=floor, pitch_ceiling=ceiling)


def pitch_track(
    wav: np.ndarray, sr: int, floor: float = F0_FLOOR, ceiling: float = F0_CEILING, pitch=None
) -> np.ndarray:
    """F0 (Hz) of the voiced frames, Praat's autocorrelation method; empty if none is voiced.
    ``pitch``: the clip's ``praat_pitch`` when already computed."""
    f0 = (pitch if pitch is not None else praat_pitch(wav, sr, floor, ceiling)).selected_array["frequency"]
    return f0[f0 > 0]


def f0_stream_track(wav: np.ndarray, sr: int, pitch) -> np.ndarray | None:
    """The SER-SLM's F0 stream of the clip (``processing_ser_slm.clip_f0_track``) from its
    ``praat_pitch`` at the default range, whose 10 ms step is the stream's at 16 kHz; None at another
    rate. The annotator stores it so that training and evaluation do not run Praat again."""
    from ..models.ser_slm.processing_ser_slm import clip_f0_track

    return clip_f0_track(np.asarray(wav, dtype=np.float32), sr, pitch=pitch) if sr == 16000 else None


def signal_features(wav: np.ndarray, sr: int, pitch=None) -> tuple[dict[str, float], np.ndarray]:
    """The audio-only features and the voiced F0 track (reused by the offline classifiers).
    ``pitch``: the clip's ``praat_pitch`` when already computed."""
    wav = np.asarray(wav, dtype=np.float32)
    duration = wav.shape[-1] / float(sr)
    power, active = activity(wav, sr)
    rms_db = float(10 * np.log10(np.mean(power[active]) + 1e-20)) if active.any() else float("nan")
    # active (non-pause) time: leading/trailing silence and long pauses do not slow a speaker down
    speech_seconds = float(active.sum()) * HOP_SECONDS
    f0 = pitch_track(wav, sr, pitch=pitch)
    feats = {
        "f0_mean": float(np.mean(f0)) if f0.size else float("nan"),
        "f0_median": float(np.median(f0)) if f0.size else float("nan"),
        "rms_db": rms_db,
        "duration": float(duration),
        "speech_duration": float(min(speech_seconds, duration)),
    }
    return feats, f0


def extract_features(waveform: np.ndarray, sr: int, text: str, *, n_phonemes: int | None = None) -> dict[str, float]:
    """``f0_mean``/``f0_median`` (Hz, voiced frames), ``rms_db`` (dBFS of the active frames of the
    raw waveform), ``phonemes_per_second`` (transcript phonemes / active speech time, i.e. the
    frames within ACTIVITY_RANGE_DB of the loudest one, so silence padding and pauses do not slow a
    speaker down),
    ``duration`` (s, whole clip). Missing quantities (no voiced frame, empty text) are NaN."""
    feats, _ = signal_features(waveform, sr)
    n = count_phonemes([text])[0] if n_phonemes is None else n_phonemes
    feats["phonemes_per_second"] = (
        n / feats["speech_duration"] if n > 0 and feats["speech_duration"] > 0 else float("nan")
    )
    feats.pop("speech_duration")
    return {k: feats[k] for k in SIGNAL_FEATURES}


# ------------------------------------------------------------------------------------------
# Cheap acoustic embedding for the offline gender/age classifiers
# ------------------------------------------------------------------------------------------
N_MELS = 40
N_MFCC = 20
# Named column groups of the embedding; classifiers pick groups (classifiers.DEFAULT_FEATURE_GROUPS).
EMBEDDING_GROUPS: dict[str, tuple[int, int]] = {
    "mfcc_mean": (0, N_MFCC),
    "mfcc_std": (N_MFCC, 2 * N_MFCC),
    "prosody": (2 * N_MFCC, 2 * N_MFCC + 6),
}
EMBEDDING_DIM = 2 * N_MFCC + 6


def embedding_fft_size(sr: int) -> int:
    """The FFT size of ``acoustic_embedding``'s frames at ``sr``."""
    return 1 << int(np.ceil(np.log2(FRAME_SECONDS * sr)))


def prepare_embedding(sr: int) -> None:
    """Builds ``acoustic_embedding``'s mel filters (torchaudio) in this process, before worker
    processes are forked: a torch op in a forked worker can hang when the parent has already run
    torch's thread pool (seen: a ``num_proc`` annotation worker idle in ``melscale_fbanks``)."""
    _mel_filters(sr, embedding_fft_size(sr))


@functools.lru_cache(maxsize=4)
def _mel_filters(sr: int, n_fft: int) -> np.ndarray:
    import torchaudio.functional as AF

    return (
        AF.melscale_fbanks(n_fft // 2 + 1, 40.0, sr / 2, N_MELS, sr, norm="slaney", mel_scale="slaney")
        .numpy()
        .astype(np.float32)
    )


@functools.lru_cache(maxsize=4)
def _window(n: int) -> np.ndarray:
    return np.hanning(n).astype(np.float32)


def acoustic_embedding(
    wav: np.ndarray,
    sr: int,
    f0: np.ndarray | None = None,
    rms_db: float = float("nan"),
    phonemes_per_second: float = float("nan"),
) -> np.ndarray:
    """A fixed-length vector for the offline gender/age classifiers: MFCC means and standard
    deviations over active frames (``mfcc_mean``, ``mfcc_std``) and ``prosody`` = log-F0 mean,
    median and std, voiced fraction, level (dBFS) and log phoneme rate. MFCC means carry the
    recording channel as much as the voice, so the default classifiers leave them out."""
    from scipy.fft import dct, rfft

    wav = np.asarray(wav, dtype=np.float32)
    if f0 is None:
        f0 = pitch_track(wav, sr)
    n_fft = embedding_fft_size(sr)
    hop = int(HOP_SECONDS * sr)
    if wav.size < n_fft:
        wav = np.pad(wav, (0, n_fft - wav.size))
    frames = np.lib.stride_tricks.sliding_window_view(wav, n_fft)[::hop] * _window(n_fft)
    spec = np.abs(rfft(frames, axis=1)) ** 2
    logmel = np.log(spec @ _mel_filters(sr, n_fft) + 1e-10)
    energy = logmel.max(axis=1)
    keep = energy > energy.max() - ACTIVITY_RANGE_DB * np.log(10) / 10
    mfcc = dct(logmel[keep], type=2, axis=1, norm="ortho")[:, :N_MFCC]
    n_frames = max(1, frames.shape[0])
    if f0.size:
        lf0 = np.log(f0)
        f0_stats = [float(np.mean(lf0)), float(np.median(lf0)), float(np.std(lf0)), f0.size / n_frames]
    else:
        f0_stats = [0.0, 0.0, 0.0, 0.0]
    rate = float(np.log(phonemes_per_second)) if np.isfinite(phonemes_per_second) and phonemes_per_second > 0 else 0.0
    level = float(rms_db) if np.isfinite(rms_db) else 0.0
    return np.concatenate([mfcc.mean(axis=0), mfcc.std(axis=0), np.asarray(f0_stats + [level, rate])]).astype(
        np.float32
    )
