"""Paired differences between systems with bootstrap intervals, and the verdict on a claim.

Why: one run is not evidence (the same seed on two machines differed by 6 points), and 2400 test
utterances still leave ~1 point of sampling error per system. A claim "A beats B" is judged on the
per-utterance correctness of both systems over the same test utterances and the same seeds: the
mean paired difference, and a 95% interval from a bootstrap that resamples utterances (the same
draw for both systems, so the pairing is kept) and seeds (training randomness).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

VERDICTS = ("holds", "reversed", "not resolved")


def correctness_matrix(
    runs: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """(seeds, utterances) 0/1 matrix from runs' predictions (``[{"id", "emotion", "prediction"}]``
    each), on the utterances every run evaluated (in ``ids`` order when given)."""
    maps = [{p["id"]: float(p["prediction"] == p["emotion"]) for p in r["predictions"]} for r in runs]
    common = [i for i in (ids if ids is not None else list(maps[0])) if all(i in m for m in maps)]
    if not common:
        raise ValueError("the runs share no evaluated utterance")
    return np.array([[m[i] for i in common] for m in maps]), list(common)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Mean of ``a - b`` (two (seeds, utterances) correctness matrices on the same utterances and
    seeds, matched row for row) with a percentile bootstrap interval over seeds and utterances."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired matrices differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    n_seeds, n_utts = d.shape
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for k in range(n_boot):
        s = rng.integers(n_seeds, size=n_seeds)
        u = rng.integers(n_utts, size=n_utts)
        draws[k] = d[s][:, u].mean()
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return {
        "diff": float(d.mean()),
        "ci": [float(lo), float(hi)],
        "seeds": int(n_seeds),
        "utterances": int(n_utts),
        "per_seed_diff": [float(x) for x in d.mean(1)],
    }


def verdict(ci: Sequence[float]) -> str:
    """ "holds" when the whole interval is above 0, "reversed" when below, else "not resolved"."""
    lo, hi = ci
    return "holds" if lo > 0 else "reversed" if hi < 0 else "not resolved"


def judge(better_runs, worse_runs, **kw) -> dict[str, Any]:
    """Paired bootstrap + verdict for "``better`` beats ``worse``", runs matched by position (seed),
    on the utterances that every run of both systems evaluated."""
    if len(better_runs) != len(worse_runs):
        raise ValueError(f"claims compare runs seed by seed: {len(better_runs)} vs {len(worse_runs)} runs")
    _, ids = correctness_matrix([*better_runs, *worse_runs])
    a, _ = correctness_matrix(better_runs, ids)
    b, _ = correctness_matrix(worse_runs, ids)
    out = paired_bootstrap(a, b, **kw)
    out["verdict"] = verdict(out["ci"])
    return out


__all__ = ["correctness_matrix", "paired_bootstrap", "verdict", "judge", "VERDICTS"]
