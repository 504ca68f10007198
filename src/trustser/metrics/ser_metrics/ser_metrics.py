"""trustser's SER metrics as a Hugging Face ``evaluate`` module: emotion WA, UA, weighted F1 and
the confusion matrix, the share of captions that could not be parsed, and per-descriptor (SED)
accuracy of the generated captions.

Shipped inside the trustser package and loaded offline by path::

    import evaluate
    from trustser.evaluation import ser_metrics_path
    metric = evaluate.load(ser_metrics_path())
    metric.compute(predictions=captions, references=emotions, emotion_labels=["neutral", "happy", "angry", "sad"],
                   descriptor_references={"pitch": [...], ...})

This file is the one place these figures are computed: ``trustser.evaluation.ser_metrics`` and
``evaluate_ser`` call it.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from trustser.descriptors import SED_FIELDS, UNPARSED, parse_caption

_DESCRIPTION = """Speech emotion recognition from a speech LLM's generated captions: WA (accuracy), UA (mean
per-class recall over the emotions present in the references), weighted F1, the confusion matrix
(an extra <unparsed> column when some prediction has no readable emotion; those count as wrong),
the share of captions with any unreadable field, and the accuracy of each speech emotion descriptor
(pitch, volume, speed, gender, age) against reference descriptors."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated captions (or, with parse=False, predicted emotion labels).
    references (list of str): reference emotion labels.
    emotion_labels (list of str): the label set; a prediction outside it counts as wrong.
    with_sed (bool, default True): captions carry descriptors (the SED template) or not (plain).
    parse (bool, default True): False when predictions are already emotion labels.
    descriptor_references (dict field -> list of str, optional): reference descriptor values, one
        per prediction; empty or None values are left out of that field's accuracy.
Returns:
    wa, ua, weighted_f1, confusion_matrix ({labels, matrix}), unparseable_rate,
    emotion_unparseable_rate, and sed_accuracy ({field: accuracy}) when descriptor_references is given.
Examples:
    >>> metric.compute(predictions=["... the emotional state of this speaker is happy."], references=["happy"],
    ...                emotion_labels=["neutral", "happy"], with_sed=False)["wa"]
    1.0
"""


class SerMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(
        self, predictions, references, emotion_labels=None, with_sed=True, parse=True, descriptor_references=None
    ):
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

        if not emotion_labels:
            raise ValueError("ser_metrics: emotion_labels is required (the label set the captions use)")
        labels = [str(l) for l in emotion_labels]
        if parse:
            parsed = [parse_caption(p or "", with_sed=with_sed, emotion_labels=labels) for p in predictions]
            emotions = [p.get("emotion") for p in parsed]
            unparseable = [not p.ok for p in parsed]
        else:
            parsed = None
            emotions = [p if p in labels else None for p in predictions]
            unparseable = [e is None for e in emotions]
        y_pred = [e if e in labels else UNPARSED for e in emotions]
        y_true = list(references)
        present = [l for l in labels if l in set(y_true)]
        cm_labels = labels + ([UNPARSED] if UNPARSED in y_pred else [])
        n = len(y_true)
        out = {
            "wa": float(accuracy_score(y_true, y_pred)) if n else float("nan"),
            "ua": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
            if n
            else float("nan"),
            "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0))
            if n
            else float("nan"),
            "confusion_matrix": {
                "labels": cm_labels,
                "matrix": confusion_matrix(y_true, y_pred, labels=cm_labels).tolist() if n else [],
            },
            "unparseable_rate": float(np.mean(unparseable)) if n else float("nan"),
            "emotion_unparseable_rate": float(np.mean([e is None for e in emotions])) if n else float("nan"),
        }
        if descriptor_references is not None:
            if parsed is None:
                raise ValueError("ser_metrics: descriptor_references needs captions (parse=True)")
            acc = {}
            for f in SED_FIELDS:
                ref = descriptor_references.get(f)
                if ref is None:
                    continue
                if len(ref) != n:
                    raise ValueError(
                        f"ser_metrics: descriptor_references[{f!r}] has {len(ref)} values for {n} predictions"
                    )
                pairs = [(p.get(f), r) for p, r in zip(parsed, ref) if r]
                if pairs:
                    acc[f] = float(np.mean([a == b for a, b in pairs]))
            out["sed_accuracy"] = acc
        return out
