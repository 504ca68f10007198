"""Evaluation metrics. SER of a SER-SLM from its generated captions: WA, UA, weighted F1, per-field
SED accuracy (how trustworthy the explanation is) and the rate of captions that could not be parsed
(computed by the packaged ``evaluate`` module ``metrics/ser_metrics``). CEM confidence quality:
AUC, NCE and ECE against 0/1 correctness, per field, per utterance and pooled."""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Sequence

import numpy as np

from .descriptors import SED_FIELDS, UNPARSED, parse_caption
from .generation import generate_captions

logger = logging.getLogger(__name__)


def ser_metrics_path() -> str:
    """The ``evaluate`` module shipped in the package (``trustser/metrics/ser_metrics/ser_metrics.py``)."""
    from importlib.resources import files

    path = files("trustser") / "metrics" / "ser_metrics" / "ser_metrics.py"
    if not path.is_file():
        raise FileNotFoundError(f"the SER metrics module is missing from the trustser package ({path})")
    return str(path)


@functools.lru_cache(maxsize=1)
def load_ser_metric():
    """``evaluate.load`` of the packaged SER metrics module, by path (offline), kept in memory."""
    import evaluate

    return evaluate.load(ser_metrics_path(), keep_in_memory=True)


def ser_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], emotion_labels: Sequence[str]) -> dict[str, Any]:
    """WA, UA (mean per-class recall), weighted F1 and the confusion matrix of predicted emotion
    labels (the packaged ``evaluate`` module with ``parse=False``); a prediction outside
    ``emotion_labels`` (unparsed) counts as wrong."""
    m = load_ser_metric().compute(
        predictions=[p if isinstance(p, str) else "" for p in y_pred],
        references=list(y_true),
        emotion_labels=list(emotion_labels),
        parse=False,
    )
    return {k: m[k] for k in ("wa", "ua", "weighted_f1", "confusion_matrix")}


def evaluate_ser(
    model,
    processor,
    dataset,
    emotion_labels: Sequence[str],
    *,
    sed_source: str = "truth",
    with_sed: bool = True,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    captions: Sequence[str] | None = None,
    return_predictions: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generates (or takes) captions for ``dataset`` and scores them. SED accuracy is measured
    against the ``<field>`` (``sed_source="truth"``) or ``<field>_auto`` columns, where present.

    Rows whose audio cannot be used (unreadable/empty file, NaN samples, ...) are skipped, not
    fatal: they are left out of every metric and listed in ``skipped`` (``[{"id", "error"}]``,
    ``n_skipped``); ``n`` counts the evaluated rows. No usable row at all is a ValueError."""
    if sed_source not in ("truth", "auto"):
        raise ValueError(f"sed_source must be 'truth' or 'auto', got {sed_source!r}")
    y_true_all = list(dataset["emotion"])
    ids = list(dataset["id"]) if "id" in dataset.column_names else list(range(len(dataset)))
    unknown = sorted(set(y_true_all) - set(emotion_labels))
    if unknown:
        rows = [str(i) for i, e in zip(ids, y_true_all) if e in unknown][:5]
        raise ValueError(
            f"reference emotions {unknown} (rows {', '.join(rows)}{', ...' if len(rows) == 5 else ''}) "
            f"are not in emotion_labels {list(emotion_labels)}"
        )
    failed: dict[int, str] = {}
    if captions is None:
        captions, failed = generate_captions(
            model,
            processor,
            dataset,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
            errors="skip",
            return_errors=True,
        )
    if len(captions) != len(dataset):
        raise ValueError(f"{len(captions)} captions for {len(dataset)} rows")
    keep = [i for i in range(len(dataset)) if i not in failed]
    if not keep:
        raise ValueError(
            f"no usable utterances to evaluate: all {len(dataset)} rows failed "
            f"(first: {next(iter(failed.values()), '?')})"
        )
    captions = [captions[i] for i in keep]
    y_true = [y_true_all[i] for i in keep]
    cols = set(dataset.column_names)
    suffix = "" if sed_source == "truth" else "_auto"
    refs = None
    if with_sed:
        refs = {}
        for f in SED_FIELDS:
            if f + suffix in cols:
                ref_all = list(dataset[f + suffix])
                refs[f] = [ref_all[i] for i in keep]
    m = load_ser_metric().compute(
        predictions=captions,
        references=y_true,
        emotion_labels=list(emotion_labels),
        with_sed=with_sed,
        descriptor_references=refs,
    )
    result: dict[str, Any] = {"n": len(captions)}
    result.update(
        {
            k: m[k]
            for k in ("wa", "ua", "weighted_f1", "confusion_matrix", "unparseable_rate", "emotion_unparseable_rate")
        }
    )
    if with_sed:
        result["sed_accuracy"] = m["sed_accuracy"]
        result["sed_source"] = sed_source
    if failed:
        result["n_skipped"] = len(failed)
        result["skipped"] = [{"id": ids[i], "error": e} for i, e in sorted(failed.items())]
    if return_predictions:
        parsed = [parse_caption(c, with_sed=with_sed, emotion_labels=emotion_labels) for c in captions]
        result["predictions"] = [
            {"id": ids[i], "caption": c, "emotion": p.get("emotion"), **{f: p.get(f) for f in SED_FIELDS}}
            for i, c, p in zip(keep, captions, parsed)
        ]
    return result


# ------------------------------------------------------------------------------------------
# CEM metrics (AUC, NCE, ECE)
# ------------------------------------------------------------------------------------------
def _clean(scores, labels):
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    keep = np.isfinite(s) & (y >= 0)
    return s[keep], y[keep]


def binary_auc(scores, labels) -> float:
    """ROC AUC of confidence scores against 0/1 correctness; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = _clean(scores, labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def normalized_cross_entropy(scores, labels, eps: float = 1e-12) -> float:
    """NCE = (H(c) - H(c|p)) / H(c): the share of the correctness entropy the confidences explain
    (1 perfect, 0 = as good as the constant prior, negative = worse than the prior)."""
    s, y = _clean(scores, labels)
    if len(y) == 0:
        return float("nan")
    p_c = y.mean()
    if p_c in (0.0, 1.0):
        return float("nan")
    h_c = -(p_c * math.log(p_c) + (1 - p_c) * math.log(1 - p_c))
    s = np.clip(s, eps, 1 - eps)
    h_cp = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))
    return float((h_c - h_cp) / h_c)


def calibration_bins(scores, labels, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: count, mean confidence and accuracy per bin."""
    s, y = _clean(scores, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(s, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=s, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def expected_calibration_error(scores, labels, n_bins: int = 10) -> float:
    """ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| over equal-width bins."""
    b = calibration_bins(scores, labels, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    used = b["count"] > 0
    return float(np.sum(b["count"][used] / n * np.abs(b["accuracy"][used] - b["confidence"][used])))


def cem_metrics(scores, labels, *, field_names: Sequence[str] = SED_FIELDS, n_bins: int = 10) -> dict[str, Any]:
    """Per-field AUC/NCE/ECE for ``scores``/``labels`` of shape (N, 5), plus the utterance level:
    the mean confidence against "all five fields right" (``utterance``) and the field-pooled figures
    (``pooled``). Label entries < 0 are ignored."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 2 or s.shape != y.shape or s.shape[1] != len(field_names):
        raise ValueError(f"cem_metrics expects two (N, {len(field_names)}) arrays, got {s.shape} and {y.shape}")
    out: dict[str, Any] = {"n": int(s.shape[0])}
    for j, f in enumerate(field_names):
        out[f] = {
            "auc": binary_auc(s[:, j], y[:, j]),
            "nce": normalized_cross_entropy(s[:, j], y[:, j]),
            "ece": expected_calibration_error(s[:, j], y[:, j], n_bins),
            "accuracy": float(np.mean(y[:, j][y[:, j] >= 0])) if np.any(y[:, j] >= 0) else float("nan"),
        }
    complete = np.all(y >= 0, axis=1)
    utt_score = s[complete].mean(axis=1)
    utt_label = np.all(y[complete] == 1, axis=1).astype(np.float64)
    out["utterance"] = {
        "auc": binary_auc(utt_score, utt_label),
        "nce": normalized_cross_entropy(utt_score, utt_label),
        "ece": expected_calibration_error(utt_score, utt_label, n_bins),
        "all_correct_rate": float(utt_label.mean()) if len(utt_label) else float("nan"),
    }
    out["pooled"] = {
        "auc": binary_auc(s, y),
        "nce": normalized_cross_entropy(s, y),
        "ece": expected_calibration_error(s, y, n_bins),
    }
    out["mean_field_auc"] = float(np.nanmean([out[f]["auc"] for f in field_names]))
    return out


__all__ = [
    "generate_captions",
    "evaluate_ser",
    "ser_metrics",
    "load_ser_metric",
    "ser_metrics_path",
    "UNPARSED",
    "binary_auc",
    "normalized_cross_entropy",
    "calibration_bins",
    "expected_calibration_error",
    "cem_metrics",
]
