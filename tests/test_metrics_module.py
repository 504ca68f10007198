"""The packaged `evaluate` module (trustser/metrics/ser_metrics): loadable offline by path, equal
to scikit-learn's figures on random captions, and the one evaluate_ser uses."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from trustser.descriptors import SED_FIELDS, SED_VOCAB, UNPARSED, build_caption
from trustser.evaluation import evaluate_ser, ser_metrics_path

LABELS = ["neutral", "happy", "angry", "sad"]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(ser_metrics_path(), keep_in_memory=True)


def _random_captions(n, seed):
    """Captions with random emotions and descriptors; some garbled (unparseable), some with an
    emotion outside the label set."""
    rng = np.random.default_rng(seed)
    refs = [LABELS[i] for i in rng.integers(0, 4, n)]
    sed_ref = {f: [SED_VOCAB[f][i] for i in rng.integers(0, len(SED_VOCAB[f]), n)] for f in SED_FIELDS}
    caps, pred_emo, pred_sed = [], [], []
    for i in range(n):
        emo = refs[i] if rng.random() < 0.5 else LABELS[rng.integers(0, 4)]
        sed = {
            f: sed_ref[f][i] if rng.random() < 0.6 else SED_VOCAB[f][rng.integers(0, len(SED_VOCAB[f]))]
            for f in SED_FIELDS
        }
        cap = build_caption(f"words number {i}", emo, sed)
        r = rng.random()
        if r < 0.1:
            cap, emo, sed = "The speaker mumbles something.", None, {f: None for f in SED_FIELDS}
        elif r < 0.15:
            cap, emo = cap.replace(f"is {emo}.", "is bored."), None
        caps.append(cap)
        pred_emo.append(emo)
        pred_sed.append(sed)
    sed_ref["age"][0] = ""  # an empty reference is left out
    return caps, refs, pred_emo, pred_sed, sed_ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_scikit_learn(metric, seed):
    caps, refs, pred_emo, pred_sed, sed_ref = _random_captions(120, seed)
    m = metric.compute(predictions=caps, references=refs, emotion_labels=LABELS, descriptor_references=sed_ref)
    y_pred = [e if e is not None else UNPARSED for e in pred_emo]
    present = sorted(set(refs), key=LABELS.index)
    assert m["wa"] == pytest.approx(accuracy_score(refs, y_pred))
    assert m["ua"] == pytest.approx(recall_score(refs, y_pred, labels=present, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(
        f1_score(refs, y_pred, labels=present, average="weighted", zero_division=0)
    )
    assert m["emotion_unparseable_rate"] == pytest.approx(np.mean([e is None for e in pred_emo]))
    garbled = [c.startswith("The speaker mumbles") or c.endswith("is bored.") for c in caps]
    assert m["unparseable_rate"] == pytest.approx(np.mean(garbled)) and 0 < m["unparseable_rate"] < 0.3
    for f in SED_FIELDS:
        pairs = [(p[f], r) for p, r in zip(pred_sed, sed_ref[f]) if r]
        assert m["sed_accuracy"][f] == pytest.approx(np.mean([a == b for a, b in pairs])), f
    cm = m["confusion_matrix"]
    assert cm["labels"] == LABELS + [UNPARSED]
    assert np.asarray(cm["matrix"]).sum() == 120
    assert [row[-1] for row in cm["matrix"]][:4] == [
        sum(r == l and p == UNPARSED for r, p in zip(refs, y_pred)) for l in LABELS
    ]


def test_plain_labels_and_bad_arguments(metric):
    m = metric.compute(
        predictions=["happy", "sad", "xx"], references=["happy", "happy", "sad"], emotion_labels=LABELS, parse=False
    )
    assert m["wa"] == pytest.approx(1 / 3) and m["unparseable_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="emotion_labels is required"):
        metric.compute(predictions=["happy"], references=["happy"])
    with pytest.raises(ValueError, match=r"descriptor_references\['pitch'\] has 1 values for 2"):
        metric.compute(
            predictions=["a", "b"],
            references=["happy", "sad"],
            emotion_labels=LABELS,
            descriptor_references={"pitch": ["low"]},
        )


def test_evaluate_ser_reports_the_modules_figures(metric):
    import datasets

    caps, refs, _, _, sed_ref = _random_captions(40, 3)
    ds = datasets.Dataset.from_dict({"emotion": refs, **sed_ref})
    got = evaluate_ser(None, None, ds, LABELS, captions=caps)
    want = metric.compute(predictions=caps, references=refs, emotion_labels=LABELS, descriptor_references=sed_ref)
    for k in (
        "wa",
        "ua",
        "weighted_f1",
        "unparseable_rate",
        "emotion_unparseable_rate",
        "sed_accuracy",
        "confusion_matrix",
    ):
        assert got[k] == want[k], k
