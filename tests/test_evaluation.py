"""SER metrics from captions, generation, and the `trustser evaluate` command."""

from __future__ import annotations

import json

import pytest
import torch
from ser_slm_fixtures import LABELS, TEXTS, make_dataset

import trustser  # noqa: F401
from trustser.descriptors import UNPARSED, build_caption, sed_from_row
from trustser.evaluation import evaluate_ser, ser_metrics
from trustser.generation import generate_captions

torch.set_num_threads(1)


def test_ser_metrics_values():
    y_true = ["neutral", "neutral", "happy", "angry", "sad", "sad"]
    y_pred = ["neutral", "happy", "happy", "angry", "sad", "garbage"]
    m = ser_metrics(y_true, y_pred, LABELS)
    assert m["wa"] == pytest.approx(4 / 6)
    # per-class recall: neutral 1/2, happy 1, angry 1, sad 1/2
    assert m["ua"] == pytest.approx((0.5 + 1 + 1 + 0.5) / 4)
    # weighted F1 by hand: neutral p=1 r=.5 -> 2/3; happy p=.5 r=1 -> 2/3; angry 1; sad p=1 r=.5 -> 2/3
    assert m["weighted_f1"] == pytest.approx((2 * 2 / 3 + 1 * 2 / 3 + 1 * 1 + 2 * 2 / 3) / 6)
    cm = m["confusion_matrix"]
    assert cm["labels"] == LABELS + [UNPARSED]
    assert cm["matrix"][LABELS.index("sad")][-1] == 1 and sum(map(sum, cm["matrix"])) == 6


@pytest.mark.faults
def test_evaluate_ser_from_given_captions():
    ds = make_dataset(6)
    rows = list(ds)
    captions = [build_caption(r["text"], r["emotion"], sed_from_row(r, "_auto")) for r in rows]
    captions[0] = "The speaker mumbles."  # unparseable
    m = evaluate_ser(None, None, ds, LABELS, captions=captions, sed_source="auto", return_predictions=True)
    assert m["n"] == 6 and m["unparseable_rate"] == pytest.approx(1 / 6)
    assert m["wa"] == pytest.approx(5 / 6)
    assert all(v == pytest.approx(5 / 6) for v in m["sed_accuracy"].values())  # _auto captions vs _auto reference
    m_truth = evaluate_ser(None, None, ds, LABELS, captions=captions, sed_source="truth")
    agree = {f: sum(r[f] == r[f + "_auto"] for r in rows[1:]) / 6 for f in m_truth["sed_accuracy"]}
    assert m_truth["sed_accuracy"] == pytest.approx(agree)
    assert m["predictions"][1]["emotion"] == rows[1]["emotion"] and m["predictions"][0]["emotion"] is None
    with pytest.raises(ValueError, match="captions for"):
        evaluate_ser(None, None, ds, LABELS, captions=captions[:2])


def test_generate_captions_batched_equals_single():
    from trustser.models.ser_slm import build_tiny_ser_slm

    ds = make_dataset(3)
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=1)
    a = generate_captions(model, processor, ds, batch_size=3, max_new_tokens=5)
    b = generate_captions(model, processor, ds, batch_size=1, max_new_tokens=5)
    assert len(a) == 3 and a == b


def test_evaluate_cli_writes_metrics(tmp_path, capsys):
    from trustser.cli import main
    from trustser.data import register_corpus
    from trustser.models.ser_slm import build_tiny_ser_slm

    ds = make_dataset(4)
    import datasets

    register_corpus("unit_eval_corpus", lambda root, **kw: datasets.DatasetDict({"test": ds}), overwrite=True)
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=2)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    out = tmp_path / "metrics.json"
    rc = main(
        [
            "evaluate",
            str(tmp_path / "m"),
            str(tmp_path),
            "--corpus",
            "unit_eval_corpus",
            "--emotion-labels",
            ",".join(LABELS),
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--predictions",
        ]
    )
    assert rc == 0
    m = json.loads(out.read_text())
    assert (
        m["n"] == 4
        and len(m["predictions"]) == 4
        and set(m["sed_accuracy"]) <= {"pitch", "volume", "speed", "gender", "age"}
    )
    assert 0.0 <= m["wa"] <= 1.0 and m["split"] == "test"
    assert main(["evaluate", str(tmp_path / "missing"), str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
