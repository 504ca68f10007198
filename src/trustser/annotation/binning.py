"""Turning raw features into descriptor words: three binnings, each one small function.

* ``speechcraft``: the released SpeechCraft tool's dataset-relative rule (gender-dependent pitch
  percentiles, equal volume/speed tertiles, fixed age buckets).
* ``unified``: one fixed, population-wide threshold pair per feature, the same for every speaker
  (the "unified threshold" the paper blames for unreliable labels).
* ``speaker_adaptive``: each feature is z-normalised within its own speaker, then cut at fixed
  z thresholds, so a low-voiced speaker's raised pitch is "high" for *them*.

All functions take plain arrays (NaN = missing) and return lists of words ("" where the input is
missing), so they are testable on hand-made numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

PITCH_WORDS = ("low", "normal", "high")
VOLUME_WORDS = ("low", "normal", "high")
SPEED_WORDS = ("slow", "normal", "fast")  # of phonemes per second (bigger = faster)
FEATURE_FOR_FIELD = {"pitch": "f0_median", "volume": "rms_db", "speed": "phonemes_per_second"}
WORDS_FOR_FIELD = {"pitch": PITCH_WORDS, "volume": VOLUME_WORDS, "speed": SPEED_WORDS}

# SpeechCraft's gender-dependent pitch percentiles: (low <= p_a, normal <= p_b, else high).
SPEECHCRAFT_PITCH_PERCENTILES = {"male": (40.0, 90.0), "female": (10.0, 60.0)}
# SpeechCraft's age buckets: upper bounds (exclusive) in years.
AGE_BUCKETS: tuple[tuple[float, str], ...] = ((14, "child"), (26, "teenager"), (40, "young adult"), (55, "middle-aged"))
AGE_OLDEST = "elderly"


def _arr(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def cut(values, lower: float, upper: float, words: Sequence[str]) -> list[str]:
    """words[0] if v <= lower, words[1] if v <= upper, else words[2]; "" for NaN.

    ``<=`` on both cut points follows SpeechCraft (``x <= percentile``)."""
    v = _arr(values)
    out = np.where(v <= lower, words[0], np.where(v <= upper, words[1], words[2])).astype(object)
    out[~np.isfinite(v)] = ""
    return out.tolist()


def tertile_edges(values) -> tuple[float, float]:
    """The two cut points of equal-count tertiles (``pd.qcut(x, 3)`` edges) of the finite values."""
    v = _arr(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    q = np.quantile(v, [1 / 3, 2 / 3])
    return float(q[0]), float(q[1])


def tertiles(values, words: Sequence[str]) -> list[str]:
    """Equal tertiles over the given population (SpeechCraft's volume/speed rule)."""
    lo, hi = tertile_edges(values)
    return cut(values, lo, hi, words)


def age_bucket(years) -> list[str]:
    """SpeechCraft's buckets: <14 child, <26 teenager, <40 young adult, <55 middle-aged, else elderly."""
    out = []
    for y in _arr(years):
        if not np.isfinite(y):
            out.append("")
            continue
        out.append(next((w for bound, w in AGE_BUCKETS if y < bound), AGE_OLDEST))
    return out


# ------------------------------------------------------------------------------------------
# speechcraft
# ------------------------------------------------------------------------------------------
def speechcraft_pitch(
    f0, genders: Sequence[str], percentiles: Mapping[str, tuple[float, float]] = SPEECHCRAFT_PITCH_PERCENTILES
) -> list[str]:
    """Per gender, percentiles of that gender's pitch values over the dataset: male low <= p40,
    normal <= p90; female low <= p10, normal <= p60; else high. Unknown gender -> ""."""
    v = _arr(f0)
    g = np.asarray([str(x) for x in genders], dtype=object)
    out = np.full(v.shape, "", dtype=object)
    for gender, (pa, pb) in percentiles.items():
        sel = (g == gender) & np.isfinite(v)
        if not sel.any():
            continue
        lo, hi = np.percentile(v[sel], [pa, pb])
        out[sel] = cut(v[sel], lo, hi, PITCH_WORDS)
    return out.tolist()


def speechcraft(features: Mapping[str, Sequence], genders: Sequence[str]) -> dict[str, list[str]]:
    """The released tool's binning, over the population given (one dataset split)."""
    return {
        "pitch": speechcraft_pitch(features["f0_median"], genders),
        "volume": tertiles(features["rms_db"], VOLUME_WORDS),
        "speed": tertiles(features["phonemes_per_second"], SPEED_WORDS),
    }


# ------------------------------------------------------------------------------------------
# unified: fixed population-wide thresholds
# ------------------------------------------------------------------------------------------
@dataclass
class UnifiedThresholds:
    """Fixed cut points (lower, upper), identical for every speaker and corpus. Defaults are
    population norms of adult speech: pitch in Hz of the median F0 (between typical male,
    ~120 Hz, and female, ~210 Hz, voices), volume in dBFS of active frames, speed in phonemes per
    second (conversational English: ~10-15). ``pitch_hz_by_gender``: one fixed pair per predicted
    gender instead (what a tool calibrated on its population uses, as SpeechCraft's pitch rule is
    gender-dependent); utterances of another gender fall back to ``pitch_hz``."""

    pitch_hz: tuple[float, float] = (140.0, 220.0)
    volume_db: tuple[float, float] = (-26.0, -18.0)
    speed_pps: tuple[float, float] = (11.0, 14.0)
    pitch_hz_by_gender: dict[str, tuple[float, float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def unified(
    features: Mapping[str, Sequence], thresholds: UnifiedThresholds | None = None, genders: Sequence[str] | None = None
) -> dict[str, list[str]]:
    t = thresholds or UnifiedThresholds()
    f0 = _arr(features["f0_median"])
    pitch = np.asarray(cut(f0, *t.pitch_hz, PITCH_WORDS), dtype=object)
    if t.pitch_hz_by_gender and genders is not None:
        g = np.asarray([str(x) for x in genders], dtype=object)
        for gender, edges in t.pitch_hz_by_gender.items():
            sel = g == gender
            if sel.any():
                pitch[sel] = cut(f0[sel], *edges, PITCH_WORDS)
    return {
        "pitch": pitch.tolist(),
        "volume": cut(features["rms_db"], *t.volume_db, VOLUME_WORDS),
        "speed": cut(features["phonemes_per_second"], *t.speed_pps, SPEED_WORDS),
    }


# ------------------------------------------------------------------------------------------
# speaker_adaptive: per-speaker z-scores
# ------------------------------------------------------------------------------------------
@dataclass
class AdaptiveConfig:
    """z cut points per field (z <= lower -> low/slow, z <= upper -> normal, else high/fast).
    ±0.43 are the standard-normal tertiles; pitch is normalised on log F0 (semitone-like), volume
    in dB and speed on log rate. Speakers with fewer than ``min_utterances`` usable values borrow
    the statistics of their group (the split's utterances of the same gender), then of the split."""

    z_thresholds: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"pitch": (-0.43, 0.43), "volume": (-0.43, 0.43), "speed": (-0.43, 0.43)}
    )
    min_utterances: int = 5
    log_fields: tuple[str, ...] = ("pitch", "speed")

    def to_dict(self) -> dict:
        return asdict(self)


def speaker_zscores(
    values, speakers: Sequence[str], groups: Sequence[str] | None = None, min_utterances: int = 5
) -> np.ndarray:
    """(v - mean_speaker) / std_speaker; falls back to the group's, then the population's, mean
    and std for speakers with too few finite values (or zero spread)."""
    v = _arr(values)
    spk = np.asarray([str(s) for s in speakers], dtype=object)
    grp = (
        np.asarray([str(g) for g in groups], dtype=object) if groups is not None else np.full(v.shape, "", dtype=object)
    )
    finite = np.isfinite(v)

    def stats(mask):
        x = v[mask & finite]
        if x.size >= max(2, min_utterances) and np.std(x) > 0:
            return float(np.mean(x)), float(np.std(x))
        return None

    pop = stats(np.ones_like(finite)) or (float(np.nanmean(v)) if finite.any() else 0.0, 1.0)
    z = np.full(v.shape, np.nan)
    for s in np.unique(spk):
        sel = spk == s
        st = stats(sel)
        if st is None:
            g = grp[sel][0]
            st = stats(grp == g) if g else None
        mu, sd = st or pop
        z[sel] = (v[sel] - mu) / sd
    return z


def _speaker_z(values, log: bool, speakers, genders, min_utterances) -> np.ndarray:
    """Per-speaker z-scores of one feature (of its logarithm for ratio-scale features)."""
    v = _arr(values)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(v > 0, np.log(v), np.nan)
    return speaker_zscores(v, speakers, genders, min_utterances)


def speaker_adaptive(
    features: Mapping[str, Sequence],
    speakers: Sequence[str],
    genders: Sequence[str] | None = None,
    config: AdaptiveConfig | None = None,
) -> dict[str, list[str]]:
    cfg = config or AdaptiveConfig()
    out = {}
    for name, feat in FEATURE_FOR_FIELD.items():
        z = _speaker_z(features[feat], name in cfg.log_fields, speakers, genders, cfg.min_utterances)
        out[name] = cut(z, *cfg.z_thresholds[name], WORDS_FOR_FIELD[name])
    return out


def speaker_vote(words: Sequence[str], speakers: Sequence[str]) -> list[str]:
    """Each speaker's most frequent non-empty word for all their non-empty rows (gender and age do
    not change within a speaker); ties go to the word seen first; rows of speaker "" are kept."""
    from collections import Counter

    votes: dict[str, Counter] = {}
    for w, s in zip(words, speakers):
        if w and s:
            votes.setdefault(s, Counter())[w] += 1
    return [votes[s].most_common(1)[0][0] if (w and s) else w for w, s in zip(words, speakers)]


# ------------------------------------------------------------------------------------------
# Calibration on a labelled reference split
# ------------------------------------------------------------------------------------------
def prior_edges(values, labels: Sequence[str], words: Sequence[str]) -> tuple[float, float]:
    """Cut points that reproduce the reference label proportions: the P(low) and
    P(low)+P(normal) quantiles of the values (labels outside ``words`` are ignored)."""
    v = _arr(values)
    lab = np.asarray([str(x) for x in labels], dtype=object)
    ok = np.isfinite(v) & np.isin(lab, list(words))
    if ok.sum() < 3:
        raise ValueError("calibration needs at least 3 labelled reference values per field")
    p_low = float(np.mean(lab[ok] == words[0]))
    p_mid = float(np.mean(lab[ok] == words[1]))
    lo, hi = np.quantile(v[ok], [p_low, min(1.0, p_low + p_mid)])
    return float(lo), float(hi)


def fit_unified_thresholds(
    features: Mapping[str, Sequence], labels: Mapping[str, Sequence[str]], genders: Sequence[str] | None = None
) -> UnifiedThresholds:
    """Population-wide cut points from a reference split: still one threshold pair for everybody
    (the unified method), but at the reference's label proportions instead of textbook values.
    With ``genders``: the pitch pair is fitted per gender (``pitch_hz_by_gender``; genders with
    fewer than 3 labelled values use the all-speaker pair)."""
    edges = {f: prior_edges(features[FEATURE_FOR_FIELD[f]], labels[f], WORDS_FOR_FIELD[f]) for f in FEATURE_FOR_FIELD}
    by_gender = None
    if genders is not None:
        g = np.asarray([str(x) for x in genders], dtype=object)
        f0, lab = _arr(features["f0_median"]), np.asarray([str(x) for x in labels["pitch"]], dtype=object)
        by_gender = {}
        for gender in sorted(set(g.tolist()) - {""}):
            sel = g == gender
            if (np.isfinite(f0[sel]) & np.isin(lab[sel], PITCH_WORDS)).sum() >= 3:
                by_gender[gender] = prior_edges(f0[sel], lab[sel], PITCH_WORDS)
    return UnifiedThresholds(
        pitch_hz=edges["pitch"],
        volume_db=edges["volume"],
        speed_pps=edges["speed"],
        pitch_hz_by_gender=by_gender or None,
    )


def fit_adaptive_config(
    features: Mapping[str, Sequence],
    labels: Mapping[str, Sequence[str]],
    speakers: Sequence[str],
    genders: Sequence[str] | None = None,
    base: AdaptiveConfig | None = None,
) -> AdaptiveConfig:
    """z cut points at the reference's label proportions of the per-speaker z-scores."""
    cfg = base or AdaptiveConfig()
    z_thr = {}
    for name, feat in FEATURE_FOR_FIELD.items():
        z = _speaker_z(features[feat], name in cfg.log_fields, speakers, genders, cfg.min_utterances)
        z_thr[name] = prior_edges(z, labels[name], WORDS_FOR_FIELD[name])
    return AdaptiveConfig(z_thresholds=z_thr, min_utterances=cfg.min_utterances, log_fields=cfg.log_fields)


METHODS = ("speechcraft", "unified", "speaker_adaptive")


def bin_features(
    method: str,
    features: Mapping[str, Sequence],
    *,
    genders: Sequence[str],
    speakers: Sequence[str] | None = None,
    unified_thresholds: UnifiedThresholds | None = None,
    adaptive_config: AdaptiveConfig | None = None,
) -> dict[str, list[str]]:
    """Dispatch to one binning; returns {"pitch": [...], "volume": [...], "speed": [...]}."""
    if method == "speechcraft":
        return speechcraft(features, genders)
    if method == "unified":
        return unified(features, unified_thresholds, genders)
    if method == "speaker_adaptive":
        if speakers is None:
            raise ValueError("speaker_adaptive binning needs a speaker per utterance")
        return speaker_adaptive(features, speakers, genders, adaptive_config)
    raise ValueError(f"unknown annotation method {method!r}; choose one of {METHODS}")
