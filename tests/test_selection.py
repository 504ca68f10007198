"""Confidence-based selection: exact shares, highest scores, threshold mode, columns, statistics
files, scoring through the CEM + a tiny SER-SLM, and the ``trustser select`` command."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from trustser.descriptors import SED_FIELDS
from trustser.selection import STATS_FILENAME, score_confidence, select_by_confidence, select_indices


def _table(n=20, seed=0):
    rng = np.random.default_rng(seed)
    truth = {f: ["low"] * n for f in ("pitch", "volume")} | {
        "speed": ["slow"] * n,
        "gender": ["male"] * n,
        "age": ["child"] * n,
    }
    auto = {f + "_auto": list(v) for f, v in truth.items()}
    wrong = rng.random(n) < 0.4
    auto["pitch_auto"] = ["high" if w else "low" for w in wrong]
    return datasets.Dataset.from_dict({"id": [f"u{i}" for i in range(n)], **truth, **auto}), wrong


@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.7, 0.6, 0.5, 0.0, 1.0])
def test_ratio_keeps_exact_share_of_highest_scores(ratio):
    rng = np.random.default_rng(1)
    s = rng.random(50)
    keep = select_indices(s, ratio=ratio)
    k = round(ratio * 50)
    assert len(keep) == k
    assert np.all(np.diff(keep) > 0)  # original order
    if 0 < k < 50:
        rest = np.setdiff1d(np.arange(50), keep)
        assert s[keep].min() > s[rest].max()


@pytest.mark.faults
def test_ties_nan_and_threshold():
    s = np.array([0.5, 0.9, 0.5, np.nan, 0.5, 0.1])
    assert select_indices(s, ratio=0.5).tolist() == [0, 1, 2]  # tie at 0.5: earlier rows first
    assert select_indices(s, ratio=1.0).tolist() == [0, 1, 2, 4, 5]  # NaN never kept
    assert select_indices(s, threshold=0.5).tolist() == [0, 1, 2, 4]
    assert select_indices(s, threshold=0.95).tolist() == []
    with pytest.raises(ValueError, match="exactly one"):
        select_indices(s, ratio=0.5, threshold=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        select_indices(s)
    with pytest.raises(ValueError, match="ratio"):
        select_indices(s, ratio=1.5)


def test_select_by_confidence_columns_stats_and_files(tmp_path):
    ds, wrong = _table(20)
    scores = np.where(wrong, 0.2, 0.8) + np.linspace(0, 0.01, 20)
    fields = np.tile(scores[:, None], (1, 5))
    sel, stats = select_by_confidence(
        ds, scores, ratio=0.5, field_scores=fields, output_dir=tmp_path / "out", stats_path=tmp_path / "stats.json"
    )
    assert len(sel) == 10 and stats["n_selected"] == 10 and stats["kept_share"] == 0.5
    assert {"confidence", *(f"confidence_{f}" for f in SED_FIELDS)} <= set(sel.column_names)
    expected = np.sort(np.argsort(-scores, kind="stable")[:10])
    assert sel["id"] == [f"u{i}" for i in expected]
    np.testing.assert_allclose(sel["confidence"], scores[expected])
    # ground truth is present: annotation accuracy before/after selection
    acc_all = stats["annotation_accuracy_all"]["pitch"]
    assert acc_all == pytest.approx(1 - wrong.mean())
    assert stats["annotation_accuracy_selected"]["pitch"] >= acc_all
    on_disk = datasets.load_from_disk(str(tmp_path / "out"))
    assert on_disk["id"] == sel["id"]
    assert json.loads((tmp_path / "out" / STATS_FILENAME).read_text()) == json.loads(
        (tmp_path / "stats.json").read_text()
    )
    assert json.loads((tmp_path / "stats.json").read_text())["n_selected"] == 10
    # threshold mode
    sel2, stats2 = select_by_confidence(ds, scores, threshold=0.5)
    assert len(sel2) == int((~wrong).sum()) and stats2["mode"] == "threshold"
    assert all(c >= 0.5 for c in sel2["confidence"])
    with pytest.raises(ValueError, match="scores"):
        select_by_confidence(ds, scores[:5], ratio=0.5)
    with pytest.raises(ValueError, match="cem="):
        select_by_confidence(ds, ratio=0.5)


# ---------------------------------------------------------------------------------- with models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.ser_slm import build_tiny_ser_slm

    texts = [f"the parcel number {i} arrived today" for i in range(6)]
    slm, proc = build_tiny_ser_slm(texts, lm_hidden=32, encoder_dim=32, vocab_size=500, max_audio_seconds=3, seed=0)
    torch.manual_seed(0)
    cem = CemModel(CemConfig(input_size=5 * 32, slm_hidden_size=32, hidden_size=8))
    with torch.no_grad():  # spread the scores so that ranking is meaningful
        cem.head.weight.normal_(0, 3.0)
        cem.layer1.linear.weight.normal_(0, 1.0)
    cem.eval()
    root = tmp_path_factory.mktemp("models")
    slm.save_pretrained(root / "slm")
    proc.save_pretrained(root / "slm")
    cem.save_pretrained(root / "cem")
    return slm.eval(), proc, cem, root


@pytest.fixture(scope="module")
def annotated():
    rng = np.random.default_rng(0)
    n = 6
    return datasets.Dataset.from_dict(
        {
            "id": [f"u{i}" for i in range(n)],
            "audio": [
                {"array": (0.1 * rng.normal(size=12000 + 1500 * i)).astype(np.float32), "sampling_rate": 16000}
                for i in range(n)
            ],
            "text": [f"the parcel number {i} arrived today" for i in range(n)],
            "emotion": ["happy", "sad", "neutral", "angry", "happy", "sad"],
            "pitch": ["low"] * n,
            "volume": ["high"] * n,
            "speed": ["fast"] * n,
            "gender": ["male"] * n,
            "age": ["child"] * n,
            "pitch_auto": ["low", "", "high", "low", "normal", "high"],
            "volume_auto": ["high"] * n,
            "speed_auto": ["fast"] * n,
            "gender_auto": ["male", "male", "female", "male", "female", "male"],
            "age_auto": ["child"] * n,
        }
    ).cast_column("audio", datasets.Audio(sampling_rate=16000))


def test_score_confidence_matches_cem_on_features(models, annotated):
    from trustser.cem_features import extract_cem_features, predict_cem

    slm, proc, cem, _ = models
    scores, fields = score_confidence(cem, slm, proc, annotated, batch_size=4, return_field_scores=True)
    assert scores.shape == (6,) and fields.shape == (6, 5)
    assert np.isnan(scores[1]) and np.isfinite(np.delete(scores, 1)).all()  # failed annotation
    expected = predict_cem(cem, extract_cem_features(slm, proc, annotated, sed_source="auto", batch_size=2))
    np.testing.assert_allclose(fields, expected, atol=1e-5)
    np.testing.assert_allclose(scores, expected.mean(1), atol=1e-5)
    # the annotated descriptors matter: scoring the ground-truth columns gives other scores
    truth = score_confidence(cem, slm, proc, annotated, sed_source="truth")
    assert truth[0] == pytest.approx(scores[0], abs=1e-6)  # row 0: annotation == truth
    assert abs(truth[2] - scores[2]) > 1e-4  # row 2: pitch and gender differ


def test_select_with_models_and_cli(models, annotated, tmp_path):
    from trustser.cli import main

    slm, proc, cem, root = models
    sel, stats = select_by_confidence(annotated, ratio=0.5, cem=cem, slm=slm, processor=proc)
    scores = score_confidence(cem, slm, proc, annotated)
    expected = select_indices(scores, ratio=0.5)
    assert sel["id"] == [f"u{i}" for i in expected] and stats["n_unscorable"] == 1
    annotated.save_to_disk(str(tmp_path / "data"))
    rc = main(
        [
            "select",
            "--cem",
            str(root / "cem"),
            "--slm",
            str(root / "slm"),
            "--data",
            str(tmp_path / "data"),
            "--ratio",
            "0.5",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert out["id"] == sel["id"]
    np.testing.assert_allclose(out["confidence"], sel["confidence"], atol=1e-5)
    saved = json.loads((tmp_path / "out" / STATS_FILENAME).read_text())
    assert saved["n_selected"] == 3 and saved["ratio"] == 0.5
    # DatasetDict input: per split, and a clear error for a missing directory
    datasets.DatasetDict({"train": annotated, "dev": annotated.select(range(4))}).save_to_disk(str(tmp_path / "dd"))
    assert (
        main(
            [
                "select",
                "--cem",
                str(root / "cem"),
                "--slm",
                str(root / "slm"),
                "--data",
                str(tmp_path / "dd"),
                "--split",
                "dev",
                "--threshold",
                "0.0",
                "--out",
                str(tmp_path / "out2"),
            ]
        )
        == 0
    )
    dd = datasets.load_from_disk(str(tmp_path / "out2"))
    assert list(dd) == ["dev"] and len(dd["dev"]) == 3  # row 1 (failed annotation) is unscorable
    assert (
        main(
            [
                "select",
                "--cem",
                str(root / "cem"),
                "--slm",
                str(root / "slm"),
                "--data",
                str(tmp_path / "nope"),
                "--ratio",
                "0.5",
                "--out",
                str(tmp_path / "out3"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "out3").exists()


@pytest.mark.slow
def test_select_under_accelerate_launch_two_processes(models, annotated, tmp_path):
    """Two CPU processes each score a shard; the gathered scores equal the single-process ones, in order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    slm, proc, cem, root = models
    annotated.save_to_disk(str(tmp_path / "data"))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs" / "cpu.yaml"
    cmd = [
        str(accelerate),
        "launch",
        "--config_file",
        str(config),
        "-m",
        "trustser.cli",
        "select",
        "--cem",
        str(root / "cem"),
        "--slm",
        str(root / "slm"),
        "--data",
        str(tmp_path / "data"),
        "--ratio",
        "1.0",
        "--out",
        str(tmp_path / "out"),
        "--batch-size",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "scored on 2 processes" in res.stderr
    out = datasets.load_from_disk(str(tmp_path / "out"))
    expected = score_confidence(cem, slm, proc, annotated)
    keep = np.isfinite(expected)
    assert out["id"] == [f"u{i}" for i in np.flatnonzero(keep)]
    np.testing.assert_allclose(out["confidence"], expected[keep], atol=1e-5)


def test_selection_quality_reports_the_calibration_error_of_the_cem_probabilities():
    from trustser.selection import selection_quality

    n = 10
    truth = {
        "pitch": ["low"] * n,
        "volume": ["low"] * n,
        "speed": ["slow"] * n,
        "gender": ["male"] * n,
        "age": ["child"] * n,
    }
    auto = {f + "_auto": list(v) for f, v in truth.items()}
    auto["pitch_auto"] = ["high"] * 4 + ["low"] * 6  # 4 wrong pitch labels, the rest right
    ds = datasets.Dataset.from_dict({**truth, **auto})
    field_scores = np.ones((n, 5))
    field_scores[:, 0] = 0.9  # pitch claimed 90% likely right, 60% are
    q = selection_quality(ds, field_scores.mean(1), field_scores)
    assert q["field_ece"]["pitch"] == pytest.approx(0.3) and all(q["field_ece"][f] == 0.0 for f in SED_FIELDS[1:])
    assert q["utterance_ece"] == pytest.approx(0.98 - 0.6)  # mean confidence 0.98, all five right in 6 of 10
    # a calibrated, separating score: ECE 0 and AUC 1
    field_scores[:, 0] = [0.0] * 4 + [1.0] * 6
    q = selection_quality(ds, field_scores.mean(1), field_scores)
    assert q["field_ece"]["pitch"] == 0.0 and q["field_auc"]["pitch"] == 1.0 and q["utterance_auc"] == 1.0
    assert q["kept_share_accuracy"][-1] == {"share": 0.5, "scores": 1.0, "oracle": 1.0}
