"""Confidence-based data selection (paper section 2.2): score each utterance's *annotated* caption
with the CEM on top of the SER-SLM and keep the most reliable share (top X %) or those above a
threshold tau.

Scoring is batched; under ``accelerate launch`` with several processes every process scores its
own contiguous shard and the scores are gathered back in the original row order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .descriptors import SED_FIELDS, normalize_sed_value

logger = logging.getLogger(__name__)

STATS_FILENAME = "selection_stats.json"


def _distributed_state():
    try:
        from .utils import distributed_state

        state = distributed_state()
        return state if state.num_processes > 1 else None
    except Exception:  # accelerate not initialisable: single process
        return None


def score_confidence(
    cem,
    slm,
    processor,
    dataset,
    *,
    sed_source: str = "auto",
    batch_size: int = 16,
    return_field_scores: bool = False,
    progress: bool = False,
):
    """Utterance confidence (N,) of each row's caption (``sed_source="auto"``: the annotated
    descriptors); with ``return_field_scores`` also the (N, 5) per-field confidences. Rows that
    cannot be captioned (failed annotation) score NaN. The features are pooled the way the CEM was
    trained (``cem.config.feature_pooling``)."""
    from .cem_features import extract_cem_features, predict_cem

    n = len(dataset)
    state = _distributed_state()
    indices = list(range(n))
    if state is not None:
        with state.split_between_processes(indices) as shard:
            my_indices = list(shard)
    else:
        my_indices = indices
    cem = cem.to(next(slm.parameters()).device)
    feats = extract_cem_features(
        slm,
        processor,
        dataset,
        sed_source=sed_source,
        pooling=cem.config.feature_pooling,
        batch_size=batch_size,
        indices=my_indices,
        progress=progress,
    )
    field_scores = predict_cem(cem, feats)
    if state is not None:
        from accelerate.utils import gather_object

        pieces = gather_object([(my_indices, field_scores.tolist())])
        merged = np.full((n, cem.config.num_fields), np.nan, dtype=np.float32)
        for idx, vals in pieces:
            if idx:
                merged[np.asarray(idx)] = np.asarray(vals, dtype=np.float32)
        field_scores = merged
    scores = field_scores.mean(axis=1)  # the CEM's mean pooling; NaN rows stay NaN
    return (scores, field_scores) if return_field_scores else scores


def select_indices(scores, *, ratio: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Sorted row indices to keep. ``ratio``: the ``round(ratio * N)`` highest scores (N = all rows;
    ties broken by row order; NaN scores are never kept). ``threshold``: every score >= tau."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio= (share to keep, 0..1) or threshold= (minimum confidence)")
    finite = np.isfinite(s)
    if ratio is not None:
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        k = min(int(round(float(ratio) * len(s))), int(finite.sum()))
        ranked = np.lexsort((np.arange(len(s)), -np.where(finite, s, -np.inf)))  # score desc, then index
        return np.sort(ranked[:k])
    return np.flatnonzero(finite & (s >= float(threshold)))


def annotation_correctness(dataset) -> np.ndarray | None:
    """(N, 5) bool: each row's annotated descriptor (``<field>_auto``) equals the ground truth
    (``<field>``); None when the corpus has no ground truth (the synthetic corpus has it)."""
    cols = [f for f in SED_FIELDS] + [f + "_auto" for f in SED_FIELDS]
    if any(c not in dataset.column_names for c in cols):
        return None
    table = dataset.select_columns(cols)[:]
    if any(v in ("", None) for f in SED_FIELDS for v in table[f]):
        return None
    return np.array(
        [
            [normalize_sed_value(f, table[f + "_auto"][i]) == normalize_sed_value(f, table[f][i]) for f in SED_FIELDS]
            for i in range(len(dataset))
        ],
        dtype=bool,
    ).reshape(len(dataset), len(SED_FIELDS))


def _annotation_accuracy(dataset, rows: np.ndarray | None, correct: np.ndarray | None = None) -> dict[str, Any] | None:
    """True accuracy of the annotated descriptors of the given rows (all rows: None)."""
    correct = annotation_correctness(dataset) if correct is None else correct
    if correct is None:
        return None
    correct = correct if rows is None else correct[rows]
    if len(correct) == 0:
        return None
    out = {f: float(correct[:, j].mean()) for j, f in enumerate(SED_FIELDS)}
    out["mean_field"] = float(correct.mean())
    out["all_fields"] = float(correct.all(axis=1).mean())
    return out


def oracle_scores(dataset, seed: int = 0) -> np.ndarray:
    """Scores of oracle selection (a bracket, not a method): the number of right annotated labels of
    each row, ties broken at random (seeded), so keeping the top share keeps the cleanest rows."""
    correct = annotation_correctness(dataset)
    if correct is None:
        raise ValueError(
            "oracle selection needs ground-truth descriptor columns beside the annotation (<field> and <field>_auto)"
        )
    return correct.sum(1) + np.random.default_rng(seed).uniform(0.0, 0.5, len(correct))


KEPT_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def selection_quality(
    dataset, scores, field_scores=None, *, shares=KEPT_SHARES, seed: int = 0
) -> dict[str, Any] | None:
    """How well confidence scores find the wrong annotated labels, measured against the ground
    truth: AUC of each field's score for "this label is right", AUC of the utterance score for "all
    five are right", their expected calibration errors (``field_ece``, ``utterance_ece``: the
    scores read as probabilities of those events; meaningful for CEM probabilities, not for ranks),
    and the kept-share curve (mean label accuracy of the top share) of the scores beside oracle
    selection and the full set. None without ground truth."""
    from .evaluation import binary_auc, expected_calibration_error

    correct = annotation_correctness(dataset)
    if correct is None:
        return None
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    oracle = oracle_scores(dataset, seed)
    curve = []
    for share in shares:
        row = {"share": share}
        for name, sc in (("scores", scores), ("oracle", oracle)):
            keep = select_indices(sc, ratio=share)
            row[name] = round(float(correct[keep].mean()), 4) if len(keep) else None
        curve.append(row)
    out: dict[str, Any] = {
        "n": int(len(correct)),
        "utterance_auc": round(float(binary_auc(scores, correct.all(1))), 4),
        "utterance_ece": round(float(expected_calibration_error(scores, correct.all(1))), 4),
        "annotation_accuracy": _annotation_accuracy(dataset, None, correct),
        "kept_share_accuracy": curve,
    }
    if field_scores is not None:
        fs = np.asarray(field_scores, dtype=np.float64)
        out["field_auc"] = {f: round(float(binary_auc(fs[:, j], correct[:, j])), 4) for j, f in enumerate(SED_FIELDS)}
        out["field_ece"] = {
            f: round(float(expected_calibration_error(fs[:, j], correct[:, j])), 4) for j, f in enumerate(SED_FIELDS)
        }
    return out


def select_by_confidence(
    dataset,
    scores=None,
    *,
    ratio: float | None = None,
    threshold: float | None = None,
    field_scores=None,
    cem=None,
    slm=None,
    processor=None,
    sed_source: str = "auto",
    batch_size: int = 16,
    output_dir: str | Path | None = None,
    stats_path: str | Path | None = None,
):
    """Keeps the most reliable rows of an annotated corpus; returns ``(selected_dataset, stats)``.

    Scores are computed with ``cem``/``slm``/``processor`` unless given. The selected rows keep
    their order and carry ``confidence`` (and ``confidence_<field>`` when per-field scores are
    known). ``output_dir``: the selected dataset (``save_to_disk``, so ``load_from_disk(output_dir)``
    works) with ``selection_stats.json`` beside its files, written atomically; ``stats_path``: the statistics JSON alone."""
    from .utils import atomic_directory, atomic_write_json

    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio= (share to keep, 0..1) or threshold= (minimum confidence)")
    if scores is None:
        if cem is None or slm is None or processor is None:
            raise ValueError("select_by_confidence needs scores= or cem=, slm= and processor= to compute them")
        scores, field_scores = score_confidence(
            cem, slm, processor, dataset, sed_source=sed_source, batch_size=batch_size, return_field_scores=True
        )
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(dataset):
        raise ValueError(f"{len(scores)} scores for a dataset of {len(dataset)} rows")
    keep = select_indices(scores, ratio=ratio, threshold=threshold)

    scored = dataset
    for name in ["confidence"] + [f"confidence_{f}" for f in SED_FIELDS]:
        if name in scored.column_names:
            scored = scored.remove_columns(name)
    scored = scored.add_column("confidence", [float(x) for x in scores])
    if field_scores is not None:
        fs = np.asarray(field_scores, dtype=np.float64)
        if fs.shape != (len(dataset), len(SED_FIELDS)):
            raise ValueError(f"field_scores must have shape ({len(dataset)}, {len(SED_FIELDS)}), got {fs.shape}")
        for j, f in enumerate(SED_FIELDS):
            scored = scored.add_column(f"confidence_{f}", [float(x) for x in fs[:, j]])
    selected = scored.select(keep)

    finite = np.isfinite(scores)
    kept_scores = scores[keep]
    stats: dict[str, Any] = {
        "mode": "ratio" if ratio is not None else "threshold",
        "ratio": ratio,
        "threshold": threshold,
        "n_total": int(len(dataset)),
        "n_scored": int(finite.sum()),
        "n_unscorable": int((~finite).sum()),
        "n_selected": int(len(keep)),
        "kept_share": float(len(keep) / len(dataset)) if len(dataset) else float("nan"),
        "min_kept_confidence": float(kept_scores.min()) if len(keep) else None,
        "mean_confidence_all": float(scores[finite].mean()) if finite.any() else None,
        "mean_confidence_selected": float(kept_scores.mean()) if len(keep) else None,
    }
    acc_all, acc_sel = _annotation_accuracy(dataset, None), _annotation_accuracy(dataset, keep)
    if acc_all is not None:
        stats["annotation_accuracy_all"] = acc_all
        stats["annotation_accuracy_selected"] = acc_sel
    if output_dir is not None:
        with atomic_directory(output_dir) as tmp:
            selected.save_to_disk(str(tmp))
            atomic_write_json(tmp / STATS_FILENAME, stats)
    if stats_path is not None:
        atomic_write_json(stats_path, stats)
    return selected, stats


__all__ = [
    "score_confidence",
    "select_by_confidence",
    "select_indices",
    "annotation_correctness",
    "oracle_scores",
    "selection_quality",
    "KEPT_SHARES",
    "STATS_FILENAME",
]
