"""The SpeechCraft-style annotator: features, binning rules, classifiers, annotate(), CLI."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trustser.annotation import binning as B
from trustser.annotation.features import (
    EMBEDDING_DIM,
    acoustic_embedding,
    count_phonemes,
    extract_features,
)

SR = 16000
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def pulse_train(f0=200.0, seconds=1.0, sr=SR, amp=0.5):
    """Glottal-like excitation: a band-limited pulse train (sum of harmonics) at f0."""
    t = np.arange(int(seconds * sr)) / sr
    n_harm = int((sr / 2 - 200) // f0)
    x = sum(np.cos(2 * np.pi * k * f0 * t) / k for k in range(1, n_harm + 1))
    return (amp * x / np.max(np.abs(x))).astype(np.float32)


def espeak_clip(tmp_path, text, pitch=50, speed=160, voice="en-us"):
    from trustser.audio import load_audio

    path = tmp_path / f"clip_{pitch}_{speed}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(path), text], check=True)
    return load_audio(path)


# ------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------
def test_pulse_train_f0():
    for f0 in (110.0, 200.0, 320.0):
        feats = extract_features(pulse_train(f0), SR, "a test")
        assert feats["f0_mean"] == pytest.approx(f0, rel=0.01)
        assert feats["f0_median"] == pytest.approx(f0, rel=0.01)
        assert feats["duration"] == pytest.approx(1.0)


def test_sine_level_in_db():
    t = np.arange(SR) / SR
    for amp in (0.5, 0.05):
        wav = (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        expected = 20 * math.log10(amp / math.sqrt(2))
        assert extract_features(wav, SR, "hello")["rms_db"] == pytest.approx(expected, abs=0.05)
    # level is measured on the raw waveform: halving the amplitude is -6 dB, and trailing
    # silence (padding) does not lower it
    wav = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    padded = np.concatenate([wav, np.zeros(SR, np.float32)])
    assert extract_features(padded, SR, "x")["rms_db"] == pytest.approx(
        extract_features(wav, SR, "x")["rms_db"], abs=0.05
    )


@needs_espeak
def test_count_phonemes_offline():
    assert count_phonemes(["cat", "the cat", "", "   "]) == [3, 5, 0, 0]
    many = count_phonemes(["I have 12 apples."] * 3)
    assert many[0] == many[1] == many[2] > 8  # digits are spoken as words


@needs_espeak
def test_espeak_clip_features(tmp_path):
    text = "The quick brown fox jumps over the lazy dog today."
    low = extract_features(espeak_clip(tmp_path, text, pitch=20), SR, text)
    high = extract_features(espeak_clip(tmp_path, text, pitch=80), SR, text)
    fast = extract_features(espeak_clip(tmp_path, text, speed=240), SR, text)
    assert 60 < low["f0_median"] < high["f0_median"] < 400
    assert high["f0_median"] / low["f0_median"] > 1.4
    assert 6 < low["phonemes_per_second"] < 16
    assert fast["phonemes_per_second"] > 1.3 * low["phonemes_per_second"]
    assert fast["duration"] < low["duration"]
    emb = acoustic_embedding(espeak_clip(tmp_path, text), SR)
    assert emb.shape == (EMBEDDING_DIM,) and np.all(np.isfinite(emb))


# The feature extractor's speed (target 200x real time per core) is measured by benchmarks/annotate.py
# (BENCHMARKS.md, "Annotation"), not by a timed test.


# ------------------------------------------------------------------------------------------
# binning rules on hand-made numbers
# ------------------------------------------------------------------------------------------
def test_cut_uses_less_or_equal_and_marks_missing():
    assert B.cut([1, 2, 2.5, 3, 4, float("nan")], 2, 3, B.PITCH_WORDS) == ["low", "low", "normal", "normal", "high", ""]


def test_speechcraft_pitch_percentiles_per_gender():
    values = list(range(1, 11)) * 2
    genders = ["male"] * 10 + ["female"] * 10
    words = B.speechcraft_pitch(values, genders)
    # male: p40 = 4.6, p90 = 9.1
    assert words[:10] == ["low"] * 4 + ["normal"] * 5 + ["high"]
    # female: p10 = 1.9, p60 = 6.4
    assert words[10:] == ["low"] + ["normal"] * 5 + ["high"] * 4
    assert B.speechcraft_pitch([100.0], [""]) == [""]


def test_tertiles_equal_counts():
    words = B.tertiles(np.arange(1, 10), B.SPEED_WORDS)
    assert words == ["slow"] * 3 + ["normal"] * 3 + ["fast"] * 3
    out = B.speechcraft(
        {"f0_median": [1.0] * 9, "rms_db": np.arange(9.0), "phonemes_per_second": np.arange(9.0)[::-1]}, ["male"] * 9
    )
    assert out["volume"][:3] == ["low"] * 3 and out["speed"][:3] == ["fast"] * 3


def test_age_buckets():
    years = [5, 13.9, 14, 25.9, 26, 39, 40, 54.9, 55, 90, float("nan")]
    assert B.age_bucket(years) == [
        "child",
        "child",
        "teenager",
        "teenager",
        "young adult",
        "young adult",
        "middle-aged",
        "middle-aged",
        "elderly",
        "elderly",
        "",
    ]


def test_unified_fixed_thresholds():
    t = B.UnifiedThresholds(pitch_hz=(140, 220), volume_db=(-26, -18), speed_pps=(11, 14))
    out = B.unified({"f0_median": [100, 180, 250], "rms_db": [-30, -20, -10], "phonemes_per_second": [9, 12, 15]}, t)
    assert out == {
        "pitch": ["low", "normal", "high"],
        "volume": ["low", "normal", "high"],
        "speed": ["slow", "normal", "fast"],
    }


def test_speaker_adaptive_is_relative_to_each_speaker():
    # a low-voiced and a high-voiced speaker, each with a low/normal/high utterance
    f0 = [90, 100, 111] * 2 + [180, 200, 222] * 2
    spk = ["a"] * 6 + ["b"] * 6
    feats = {
        "f0_median": f0,
        "rms_db": [-30, -25, -20] * 2 + [-20, -15, -10] * 2,
        "phonemes_per_second": [9, 10, 11] * 4,
    }
    cfg = B.AdaptiveConfig(min_utterances=3)
    out = B.speaker_adaptive(feats, spk, config=cfg)
    assert out["pitch"] == ["low", "normal", "high"] * 4
    assert out["volume"] == ["low", "normal", "high"] * 4
    assert out["speed"] == ["slow", "normal", "fast"] * 4
    # the unified rule calls the whole low speaker "low" and the high one "normal"
    uni = B.unified(feats, B.UnifiedThresholds(pitch_hz=(140, 220)))
    assert uni["pitch"][:6] == ["low"] * 6


def test_speaker_adaptive_fallback_for_rare_speakers():
    v = np.log([100.0, 110, 120, 130, 140, 125])
    z = B.speaker_zscores(v, ["a"] * 5 + ["rare"], groups=["m"] * 6, min_utterances=3)
    pop = (v[5] - v[:6].mean()) / v[:6].std()  # the rare speaker borrows its group's statistics
    assert z[5] == pytest.approx(pop)
    assert z[:5].mean() == pytest.approx(0.0, abs=1e-9)


def test_speaker_vote_majority_per_speaker():
    words = ["male", "female", "male", "", "female", "female", "male"]
    spk = ["a", "a", "a", "a", "b", "b", ""]
    assert B.speaker_vote(words, spk) == ["male", "male", "male", "", "female", "female", "male"]
    assert B.speaker_vote(["elderly", "child"], ["c", "c"]) == ["elderly", "elderly"]  # tie: first seen


def test_calibrated_thresholds_reproduce_reference_proportions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    labels = np.where(x < -1.0, "low", np.where(x < 0.5, "normal", "high"))
    lo, hi = B.prior_edges(x, labels, B.PITCH_WORDS)
    assert lo == pytest.approx(-1.0, abs=0.1) and hi == pytest.approx(0.5, abs=0.1)
    t = B.fit_unified_thresholds(
        {"f0_median": x, "rms_db": x, "phonemes_per_second": x},
        {
            "pitch": labels,
            "volume": labels,
            "speed": np.char.replace(np.char.replace(labels.astype(str), "low", "slow"), "high", "fast"),
        },
    )
    assert t.pitch_hz == pytest.approx((lo, hi))


def test_bin_features_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown annotation method"):
        B.bin_features("median", {"f0_median": [1], "rms_db": [1], "phonemes_per_second": [1]}, genders=["male"])


# ------------------------------------------------------------------------------------------
# bad audio
# ------------------------------------------------------------------------------------------
def _wav_bytes(wav, sr=SR):
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.mark.faults
def test_bad_audio_gets_a_reason_not_an_exception():
    from trustser.annotation.annotator import _feature_batch

    good = pulse_train(150.0)
    clipped = np.clip(pulse_train(150.0, amp=1.0) * 5, -1, 1)
    nan = good.copy()
    nan[100] = np.nan
    entries = [
        {"array": good, "sampling_rate": SR},
        {"array": np.zeros(SR, np.float32), "sampling_rate": SR},
        {"array": clipped, "sampling_rate": SR},
        {"array": good[: SR // 10], "sampling_rate": SR},
        {"array": nan, "sampling_rate": SR},
        {"bytes": b"RIFF not really a wav", "path": "broken.wav"},
        {"bytes": _wav_bytes(np.stack([good] * 4, axis=1)), "path": "four_channels.wav"},
        {"bytes": _wav_bytes(np.stack([good, good], axis=1)), "path": "stereo.wav"},
        {"array": np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32), "sampling_rate": SR},
    ]
    texts = ["a b c"] * len(entries)
    texts[-2] = ""
    out = _feature_batch(
        {"audio": entries, "text": texts}, audio_column="audio", text_column="text", embed=True, voice="en-us"
    )
    assert out["annotation_error"][:8] == [
        "",
        "silence",
        "clipping",
        "too_short",
        "nan",
        "unreadable",
        "channels",
        "no_transcript",
    ]
    assert out["annotation_error"][8] in ("unvoiced", "")  # white noise: Praat may find no voicing
    assert out["f0_median"][0] == pytest.approx(150.0, rel=0.01)
    assert out["_trustser_embedding"][1] is None and len(out["_trustser_embedding"][0]) == EMBEDDING_DIM


# ------------------------------------------------------------------------------------------
# offline classifier
# ------------------------------------------------------------------------------------------
def test_offline_classifier_fit_save_load(tmp_path):
    from trustser.annotation.classifiers import OfflineClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, EMBEDDING_DIM))
    X[:, -3] += np.sign(X[:, -3])  # a prosody column decides, with a margin
    y = np.where(X[:, -3] > 0, "female", "male")
    clf = OfflineClassifier.fit(X, y, "gender")
    assert clf.metadata["train_accuracy"] > 0.95
    path = clf.save(tmp_path / "gender.json")
    data = json.loads(path.read_text())
    assert data["type"] == "trustser.OfflineClassifier" and data["classes"] == ["female", "male"]
    loaded = OfflineClassifier.load(path)
    Xt = rng.normal(size=(50, EMBEDDING_DIM))
    Xt[:, -3] += np.sign(Xt[:, -3])
    assert loaded.predict(Xt) == clf.predict(Xt)
    assert np.mean(np.array(loaded.predict(Xt)) == np.where(Xt[:, -3] > 0, "female", "male")) > 0.9
    np.testing.assert_allclose(loaded.predict_proba(Xt).sum(1), 1.0)
    ages = rng.choice(["child", "young adult", "elderly"], size=120)
    X[:, -2] = np.select([ages == "child", ages == "young adult"], [-3.0, 0.0], 3.0) + rng.normal(0, 0.3, 120)
    age = OfflineClassifier.fit(X, ages, "age")
    assert np.mean(np.array(age.predict(X)) == ages) > 0.95
    (tmp_path / "bad.json").write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="bad.json"):
        OfflineClassifier.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="one class"):
        OfflineClassifier.fit(X, ["male"] * len(X), "gender")


# ------------------------------------------------------------------------------------------
# Hub backends with tiny local models
# ------------------------------------------------------------------------------------------
def _tiny_w2v_config(**kw):
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        vocab_size=10,
        **kw,
    )


def _save_extractor(path):
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(path)


def test_hub_gender_classifier_from_local_tiny_model(tmp_path):
    import torch
    from transformers import Wav2Vec2ForSequenceClassification

    from trustser.annotation.classifiers import HubAudioClassifier

    torch.manual_seed(0)
    model = Wav2Vec2ForSequenceClassification(
        _tiny_w2v_config(num_labels=2, id2label={0: "female", 1: "male"}, label2id={"female": 0, "male": 1})
    )
    with torch.no_grad():  # make "male" win regardless of the input
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-2.0, 2.0]))
    model.save_pretrained(tmp_path / "gender")
    _save_extractor(tmp_path / "gender")
    clf = HubAudioClassifier(str(tmp_path / "gender"), "gender", device="cpu", batch_size=2)
    assert clf.head == "classification"
    assert clf.predict([pulse_train(120.0), pulse_train(220.0, seconds=0.7), pulse_train(300.0)], SR) == ["male"] * 3
    with pytest.raises(ValueError, match="cannot load"):
        HubAudioClassifier(str(tmp_path / "missing"), "gender")


def test_hub_age_gender_regression_head(tmp_path):
    import torch

    from trustser.annotation.classifiers import HubAudioClassifier, _age_gender_classes

    torch.manual_seed(0)
    model = _age_gender_classes()(_tiny_w2v_config())
    with torch.no_grad():  # age output 0.30 -> 30 years -> young adult; gender favours female
        model.age.out_proj.weight.zero_()
        model.age.out_proj.bias.fill_(0.30)
        model.gender.out_proj.weight.zero_()
        model.gender.out_proj.bias.copy_(torch.tensor([3.0, 0.0, 1.0]))
    path = tmp_path / "tiny-age-gender"
    model.save_pretrained(path)
    _save_extractor(path)
    age = HubAudioClassifier(str(path), "age", device="cpu")
    assert age.head == "age_gender"
    waves = [pulse_train(150.0), pulse_train(250.0, seconds=0.6)]
    assert age.predict(waves, SR) == ["young adult", "young adult"]
    assert HubAudioClassifier(str(path), "gender", device="cpu").predict(waves, SR) == ["female", "female"]
    # weights are loaded by name: a reloaded model has the saved heads
    reloaded = _age_gender_classes().from_pretrained(path)
    assert reloaded.age.out_proj.bias.item() == pytest.approx(0.30)

    # the same directory as annotate()'s backends (audio decoded again for the Hub pass)
    import datasets

    from trustser.annotation import annotate

    ds = datasets.Dataset.from_dict(
        {
            "audio": [{"bytes": _wav_bytes(pulse_train(f)), "path": f"{f}.wav"} for f in (120.0, 200.0, 260.0)]
            + [{"bytes": b"x", "path": "bad.wav"}],
            "text": ["one two"] * 4,
        }
    ).cast_column("audio", datasets.Audio(sampling_rate=SR))
    out = annotate(ds, method="speechcraft", gender_backend=str(path), age_backend=str(path), batch_size=2)
    assert out["gender_auto"] == ["female"] * 3 + [""]
    assert out["age_auto"] == ["young adult"] * 3 + [""]
    assert out["pitch_auto"][:3] == ["low", "normal", "high"]  # female percentiles p10/p60 over 3 clips


# ------------------------------------------------------------------------------------------
# annotate() on the synthetic corpus
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_corpus(synthetic_small):
    import datasets

    from trustser.data.synthetic import load_synthetic

    dd = load_synthetic(synthetic_small)
    return datasets.DatasetDict({"reference": dd["reference"].shuffle(seed=0).select(range(64)), "dev": dd["dev"]})


@pytest.fixture(scope="module")
def annotated(small_corpus):
    from trustser.annotation import annotate

    return annotate(small_corpus, method="speechcraft", batch_size=16)


def test_annotate_keeps_and_adds_columns(small_corpus, annotated):
    from trustser.annotation import AUTO_COLUMNS, ERROR_COLUMN, FEATURE_COLUMNS, annotation_report
    from trustser.descriptors import SED_VOCAB

    for split, ds in annotated.items():
        orig = small_corpus[split]
        assert ds.column_names[: len(orig.column_names)] == orig.column_names
        assert set(AUTO_COLUMNS) | set(FEATURE_COLUMNS) | {ERROR_COLUMN} <= set(ds.column_names)
        assert ds["id"] == orig["id"]
        assert annotation_report(ds)["n_errors"] == 0
        for f in ("pitch", "volume", "speed", "gender", "age"):
            assert set(ds[f"{f}_auto"]) <= set(SED_VOCAB[f]), f
        assert all(60 < x < 600 for x in ds["f0_median"])
        assert ds.features["audio"].decode  # the audio column is unchanged
    # equal tertiles: each volume word covers about a third of a split
    counts = annotation_report(annotated["reference"])["labels"]["volume"]
    assert max(counts.values()) - min(counts.values()) <= 2
    # gender from the reference-fitted classifier is mostly right on the (clean) reference split
    ref = annotated["reference"]
    assert np.mean(np.array(ref["gender"]) == np.array(ref["gender_auto"])) > 0.8


def test_annotator_leaves_the_slm_f0_stream_and_generation_reads_it(annotated, monkeypatch):
    """Praat runs once per clip in the whole pipeline: the annotator stores each clip's SER-SLM F0
    stream (``f0_track``), equal to what the processor computes, and caption generation reads it
    instead of running Praat again, with the same captions."""
    from trustser.annotation import F0_TRACK_COLUMN
    from trustser.audio import decode_audio
    from trustser.generation import generate_captions
    from trustser.models.ser_slm import build_tiny_ser_slm
    from trustser.models.ser_slm import processing_ser_slm as P

    dev = annotated["dev"].select(range(12))
    assert dev.features[F0_TRACK_COLUMN].feature.dtype == "float32"
    model, processor = build_tiny_ser_slm(list(dev["text"]), emotion_labels=["happy", "sad"], sed_f0_stream=True)
    voiced = 0
    for row in dev:
        computed = processor.f0_track(decode_audio(row["audio"]))
        stored = np.asarray(row[F0_TRACK_COLUMN], dtype=np.float32)
        assert np.array_equal(stored, computed), row["id"]
        voiced += int((stored > 0).sum())
    assert voiced > 100
    without = generate_captions(model, processor, dev.remove_columns([F0_TRACK_COLUMN]), batch_size=4, max_new_tokens=8)
    calls = []
    real = P.praat_f0
    monkeypatch.setattr(P, "praat_f0", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_tracks = generate_captions(model, processor, dev, batch_size=4, max_new_tokens=8)
    assert calls == [] and with_tracks == without


def test_rebin_speaker_adaptive_beats_unified(annotated):
    from trustser.annotation import rebin

    def acc(ds, f):
        return float(np.mean(np.array(ds[f]) == np.array(ds[f + "_auto"])))

    uni = rebin(annotated, "unified", calibrate=True)
    ada = rebin(annotated, "speaker_adaptive", calibrate=True)
    assert ada.column_names == annotated.column_names
    assert ada["reference"]["gender_auto"] == annotated["reference"]["gender_auto"]
    voted = rebin(annotated, "speaker_adaptive", calibrate=True, speaker_traits=True)["reference"]
    for spk in set(voted["speaker"]):
        assert len({g for g, s in zip(voted["gender_auto"], voted["speaker"]) if s == spk}) == 1
    for f in ("pitch", "volume"):
        assert acc(ada["reference"], f) > acc(uni["reference"], f) + 0.1, f


@pytest.mark.faults
def test_annotate_flags_bad_rows_and_continues(tmp_path):
    import datasets

    from trustser.annotation import annotate
    from trustser.annotation.classifiers import OfflineClassifier

    rng = np.random.default_rng(0)
    clfs = {}
    for f, labels in (("gender", ["male", "female"]), ("age", ["child", "elderly"])):
        X = rng.normal(size=(20, EMBEDDING_DIM))
        clfs[f] = OfflineClassifier.fit(X, [labels[i % 2] for i in range(20)], f)
    rows = {
        "id": ["ok1", "silent", "broken", "ok2", "ok3"],
        "audio": [
            {"bytes": _wav_bytes(pulse_train(130.0)), "path": "ok1.wav"},
            {"bytes": _wav_bytes(np.zeros(SR, np.float32)), "path": "silent.wav"},
            {"bytes": b"garbage", "path": "broken.wav"},
            {"bytes": _wav_bytes(pulse_train(180.0)), "path": "ok2.wav"},
            {"bytes": _wav_bytes(pulse_train(240.0, amp=0.2)), "path": "ok3.wav"},
        ],
        "text": ["one two three"] * 5,
        "speaker": ["s1"] * 5,
    }
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(sampling_rate=SR))
    out = annotate(ds, method="unified", gender_backend=clfs["gender"], age_backend=clfs["age"], batch_size=2)
    assert out["annotation_error"] == ["", "silence", "unreadable", "", ""]
    assert out["pitch_auto"] == ["low", "", "", "normal", "high"]
    assert out["gender_auto"][1] == out["age_auto"][2] == ""
    assert all(out["gender_auto"][i] in ("male", "female") for i in (0, 3, 4))
    assert [t is not None for t in out["f0_track"]] == [True, False, False, True, True]
    # a first batch of unusable clips only (None tracks and embeddings) does not fix the column types
    bad_first = ds.select([1, 2, 0, 3, 4])
    out2 = annotate(bad_first, method="unified", gender_backend=clfs["gender"], age_backend=clfs["age"], batch_size=2)
    assert out2["annotation_error"] == ["silence", "unreadable", "", "", ""]
    assert out2["f0_track"][2:] == out["f0_track"][::3] + out["f0_track"][4:]
    with pytest.raises(ValueError, match="unknown annotation method"):
        annotate(ds, method="bogus")
    with pytest.raises(ValueError, match="reference"):
        annotate(ds, gender_backend="reference", age_backend=clfs["age"])


def test_cli_annotate_with_saved_classifiers(synthetic_small, annotated, tmp_path):
    import datasets

    from trustser.annotation import fit_reference_classifiers
    from trustser.cli import main

    clfs = fit_reference_classifiers(annotated["reference"].select(range(40)))
    paths = {f: clf.save(tmp_path / f"{f}.json") for f, clf in clfs.items()}
    out = tmp_path / "annotated"
    rc = main(
        [
            "annotate",
            "synthetic",
            str(synthetic_small),
            "--out",
            str(out),
            "--split",
            "dev",
            "--method",
            "speaker_adaptive",
            "--gender-backend",
            str(paths["gender"]),
            "--age-backend",
            str(paths["age"]),
            "--speaker-scope",
            "split",
        ]
    )
    assert rc == 0
    dd = datasets.load_from_disk(str(out))
    assert list(dd) == ["dev"] and "pitch_auto" in dd["dev"].column_names
    summary = json.loads((out / "annotation.json").read_text())
    assert summary["method"] == "speaker_adaptive" and summary["splits"]["dev"]["n_errors"] == 0
    assert (
        main(
            [
                "annotate",
                "synthetic",
                str(synthetic_small),
                "--out",
                str(tmp_path / "x"),
                "--split",
                "nope",
                "--gender-backend",
                str(paths["gender"]),
                "--age-backend",
                str(paths["age"]),
            ]
        )
        == 1
    )
    assert not (tmp_path / "x").exists()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_annotate_under_accelerate_two_processes(synthetic_small, annotated, tmp_path):
    """Two processes each annotate a shard; the merged result equals the single-process one."""
    import datasets

    from trustser.annotation import fit_reference_classifiers

    clfs = fit_reference_classifiers(annotated["reference"])
    paths = {f: clf.save(tmp_path / f"{f}.json") for f, clf in clfs.items()}
    common = [
        "synthetic",
        str(synthetic_small),
        "--split",
        "dev",
        "--method",
        "speechcraft",
        "--gender-backend",
        str(paths["gender"]),
        "--age-backend",
        str(paths["age"]),
    ]
    subprocess.run(
        [sys.executable, "-m", "trustser.annotation.cli", *common, "--out", str(tmp_path / "one")], check=True
    )
    two_proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "recipes/accelerate_configs/cpu.yaml"),
            "-m",
            "trustser.annotation.cli",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "on 2 processes" in two_proc.stdout + two_proc.stderr, two_proc.stderr[-2000:]
    one, two = (
        datasets.load_from_disk(str(tmp_path / "one"))["dev"],
        datasets.load_from_disk(str(tmp_path / "two"))["dev"],
    )
    for c in ("id", "pitch_auto", "volume_auto", "speed_auto", "gender_auto", "age_auto"):
        assert one[c] == two[c], c
    np.testing.assert_allclose(one["f0_median"], two["f0_median"])
