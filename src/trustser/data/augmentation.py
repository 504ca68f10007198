"""Random recording channels for training audio.

A model trained on clean reference speech meets band-limited, noisy speech in the target domain
(telephone/room channels in real corpora; the synthetic corpus' ``target`` channel). Training on
randomly band-limited, randomly noisy copies makes the encoder rely on cues that survive the
channel (harmonics, F0, formant pattern below ~3 kHz) instead of the clean channel's high band and
digital silence. The utterance's RMS level is restored after filtering: loudness is a label
(``volume``), so the augmentation must not change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..audio import TARGET_SR


@dataclass
class ChannelAugmentation:
    """With probability ``probability`` per utterance: a 4th-order Butterworth band-pass with a
    random low cut in ``low_cut_hz`` and high cut in ``high_cut_hz`` (each applied with
    ``band_probability``), then white noise at a random level in ``noise_dbfs`` (applied with
    ``noise_probability``); the RMS level of the input is kept. Draws come from one generator seeded
    by ``seed``, so a run is reproducible, ``get_state``/``set_state`` carrying it through a checkpoint;
    or, with ``key``, from a generator seeded by ``(seed, *key)`` (what the training collator uses:
    epoch and utterance), so that the result does not depend on which data-loader worker augments
    the utterance, or when, and a resumed run draws what the uninterrupted one would."""

    probability: float = 0.5
    low_cut_hz: tuple[float, float] = (60.0, 300.0)
    high_cut_hz: tuple[float, float] = (2800.0, 7000.0)
    band_probability: float = 0.8
    noise_dbfs: tuple[float, float] = (-75.0, -50.0)
    noise_probability: float = 0.7
    sampling_rate: int = TARGET_SR
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        for name in ("probability", "band_probability", "noise_probability"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ChannelAugmentation.{name} must be in [0, 1], got {v}")
        lo, hi = self.low_cut_hz, self.high_cut_hz
        if not (0 < lo[0] <= lo[1] < hi[0] <= hi[1] < self.sampling_rate / 2):
            raise ValueError(
                f"ChannelAugmentation: need 0 < low_cut_hz {lo} < high_cut_hz {hi} < Nyquist ({self.sampling_rate / 2:g} Hz)"
            )
        self._rng = np.random.default_rng(self.seed)

    def get_state(self) -> dict:
        """The unkeyed generator's state (JSON-serialisable)."""
        return self._rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state

    def __call__(self, wav: np.ndarray, key=None) -> np.ndarray:
        rng = self._rng if key is None else np.random.default_rng([int(self.seed), *(int(k) for k in key)])
        if rng.random() >= self.probability:
            return wav
        x = np.asarray(wav, dtype=np.float64)
        rms = float(np.sqrt(np.mean(x**2))) if x.size else 0.0
        if rms <= 0.0:
            return wav
        if rng.random() < self.band_probability and x.size > 64:
            from scipy.signal import butter, sosfiltfilt

            band = [rng.uniform(*self.low_cut_hz), rng.uniform(*self.high_cut_hz)]
            sos = butter(4, band, btype="bandpass", fs=self.sampling_rate, output="sos")
            y = sosfiltfilt(sos, x)
            y_rms = float(np.sqrt(np.mean(y**2)))
            if y_rms > 0.0:
                x = y * (rms / y_rms)
        if rng.random() < self.noise_probability:
            x = x + rng.normal(0.0, 10 ** (rng.uniform(*self.noise_dbfs) / 20), x.shape)
        return x.astype(np.float32)


__all__ = ["ChannelAugmentation"]
