"""The explainable-ser pipeline, explain_files and `trustser explain`: a tiny SER-SLM over-fitted on
four espeak-ng clips (so its captions parse), a random-init CEM, and bad files of every kind."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
from explain_fixtures import EMOS, LABELS, SEDS, TEXTS, one_thread  # noqa: F401  (autouse)

from trustser.descriptors import SED_FIELDS, build_caption


@pytest.fixture(scope="module")
def clips(explain_clips):
    return explain_clips


@pytest.fixture(scope="module")
def model_dir(explain_model_dir):
    return explain_model_dir


@pytest.fixture(scope="module")
def pipe(model_dir):
    from transformers import pipeline

    import trustser  # noqa: F401  (registers the task)

    return pipeline("explainable-ser", model=str(model_dir), device=-1)


@pytest.fixture(scope="module")
def batched(pipe, clips):
    return pipe(clips, batch_size=4)


def test_task_registered_and_cem_found(pipe):
    from trustser import ExplainableSerPipeline

    assert isinstance(pipe, ExplainableSerPipeline)
    assert pipe.cem is not None and pipe.emotion_labels == LABELS
    assert pipe.max_seconds == pytest.approx(4.0)


def test_explanations(batched, clips):
    parsed = [r for r in batched if not r["unparsed"]]
    assert len(parsed) >= 2, [r["caption"] for r in batched]
    for r, path in zip(batched, clips):
        assert r["file"] == path and r["error"] is None
    for r in parsed:
        assert r["emotion"] in LABELS and set(r["descriptors"]) == set(SED_FIELDS)
        assert r["transcription"] in TEXTS
        p = r["probabilities"]
        assert list(p) == list(LABELS) and sum(p.values()) == pytest.approx(1.0, abs=1e-5)
        assert max(p, key=p.get) == r["emotion"]  # greedy decoding chose the same label
        c = r["confidence"]
        assert list(c) == list(SED_FIELDS) and all(0.0 < v < 1.0 for v in c.values())
        assert r["trust"] == pytest.approx(np.mean(list(c.values())), abs=1e-6)
    # the over-fitted model reproduces what it learned for most clips
    assert sum(r["caption"] == build_caption(TEXTS[i], EMOS[i], SEDS[i]) for i, r in enumerate(batched)) >= 2


def test_cem_scores_equal_the_cem_helpers_features(pipe, batched, clips):
    """The pipeline pools the CEM input exactly as trainers.cem.extract_cem_features does."""
    import datasets

    from trustser.audio import load_audio
    from trustser.cem_features import extract_cem_features, predict_cem

    rows = [(r, p) for r, p in zip(batched, clips) if r["confidence"]]
    ds = datasets.Dataset.from_dict(
        {
            "audio": [{"array": load_audio(p), "sampling_rate": 16000} for _, p in rows],
            "text": [r["transcription"] for r, _ in rows],
            "emotion": [r["emotion"] for r, _ in rows],
        }
    )
    feats = extract_cem_features(
        pipe.model,
        pipe.processor,
        ds,
        sed_source="predicted",
        sed=[r["descriptors"] for r, _ in rows],
        pooling="sed_tokens",
    )
    scores = predict_cem(pipe.cem, feats)
    got = np.array([[r["confidence"][f] for f in SED_FIELDS] for r, _ in rows])
    np.testing.assert_allclose(got, scores, atol=1e-4)


def test_batched_equals_one_at_a_time(pipe, batched, clips):
    single = [pipe(p) for p in clips]
    for a, b in zip(batched, single):
        assert a["caption"] == b["caption"]
        if a["probabilities"]:
            for k in LABELS:
                assert a["probabilities"][k] == pytest.approx(b["probabilities"][k], abs=1e-4)
            assert a["trust"] == pytest.approx(b["trust"], abs=1e-4)


@pytest.mark.faults
def test_formats_rates_and_channels(pipe, clips, tmp_path):
    """mp3 (stereo, 44.1 kHz) and flac (48 kHz) decode, down-mix and resample."""
    mp3, flac = tmp_path / "x.mp3", tmp_path / "y.flac"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", clips[0], "-ac", "2", "-ar", "44100", str(mp3)], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", clips[2], "-ar", "48000", str(flac)], check=True)
    out = pipe([str(mp3), str(flac)], batch_size=2)
    assert all(r["error"] is None and r["caption"] for r in out)


def _bad_files(d, clips):
    d.mkdir(exist_ok=True)
    (d / "empty.wav").write_bytes(b"")
    (d / "junk.wav").write_bytes(b"RIFF" + b"\x00junk" * 40)
    sf.write(d / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(d / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(d / "long.wav", (0.1 * np.random.default_rng(0).standard_normal(16000 * 6)).astype(np.float32), 16000)
    return {
        "missing.wav": "no such file",
        "empty.wav": "empty file",
        "junk.wav": "unreadable",
        "silent.wav": "silent",
        "nan.wav": "non-finite",
        "long.wav": "longer than the model's 4 s window",
    }


@pytest.mark.faults
def test_bad_files_are_named_and_skipped(pipe, clips, tmp_path):
    from trustser import explain_files

    expected = _bad_files(tmp_path / "bad", clips)
    files = [clips[0]] + [str(tmp_path / "bad" / n) for n in expected]
    out = explain_files(pipe, files, batch_size=3, progress=False)
    assert [r["file"] for r in out] == files
    assert out[0]["error"] is None and out[0]["caption"]
    for r, (name, why) in zip(out[1:], expected.items()):
        assert r["error"] and name in r["error"] and why in r["error"], r["error"]
        assert r["caption"] is None and r["trust"] is None


@pytest.mark.faults
def test_pipeline_raises_naming_the_file(pipe, tmp_path):
    from trustser.audio import AudioError

    sf.write(tmp_path / "quiet.wav", np.zeros(8000, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="quiet.wav: silent"):
        pipe(str(tmp_path / "quiet.wav"))


def test_long_audio_truncate(pipe, clips, tmp_path):
    from trustser.audio import load_audio

    wav = np.concatenate([load_audio(clips[1])] * 4)
    assert wav.size > 4 * 16000
    r = pipe({"array": wav, "sampling_rate": 16000, "path": "long-array"}, long_audio="truncate")
    assert r["error"] is None and r["file"] == "long-array"


@pytest.mark.faults
def test_cli(model_dir, clips, tmp_path):
    from trustser.cli import main

    expected = _bad_files(tmp_path / "bad", clips)
    out = tmp_path / "out.jsonl"
    rc = main(
        [
            "explain",
            str(model_dir),
            *clips[:2],
            str(tmp_path / "bad" / "silent.wav"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 1  # one file failed
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["file"] for l in lines] == [*clips[:2], str(tmp_path / "bad" / "silent.wav")]
    assert lines[2]["error"] and "silent" in lines[2]["error"] and lines[0]["error"] is None
    table = tmp_path / "t.txt"
    clip_dir = str(tmp_path / "dir")
    (tmp_path / "dir").mkdir()
    for p in clips[:2]:
        (tmp_path / "dir" / p.split("/")[-1]).write_bytes(open(p, "rb").read())
    assert (
        main(["explain", str(model_dir), clip_dir, "--format", "table", "--out", str(table), "--batch-size", "2"]) == 0
    )
    text = table.read_text().splitlines()
    assert text[0].split()[:4] == ["file", "emotion", "p", "trust"] and len(text) == 3
    assert len(expected) == 6


def test_label_first_tokens_and_clash(pipe, model_dir):
    from transformers import pipeline

    from trustser.explain import label_first_token_ids

    tok = pipe.processor.tokenizer
    ids = label_first_token_ids(tok, LABELS)
    assert len(set(ids)) == 4
    assert [tok.decode([i]).strip() for i in ids] == list(LABELS)  # one token each in the tiny tokenizer
    # labels sharing their first token: no probabilities, everything else still works
    p2 = pipeline("explainable-ser", model=str(model_dir), device=-1, emotion_labels=["neutral", "neutralish"])
    assert p2._label_ids is None


def test_resolve_trustser_output_dir(model_dir, tmp_path):
    from trustser.explain import resolve_model_dir

    cache = tmp_path / "out" / "cache"
    (cache / "pretrain-a").mkdir(parents=True)
    (cache / "pretrain-a" / "model").symlink_to(model_dir)
    (cache / "cem-b").mkdir()
    (cache / "cem-b" / "cem").symlink_to(model_dir / "cem")
    run = tmp_path / "out" / "sys3-seed0"
    run.mkdir()
    stages = [
        {"name": "pretrain", "key": "a", "path": str(cache / "pretrain-a")},
        {"name": "cem", "key": "b", "path": str(cache / "cem-b")},
    ]
    (run / "results.json").write_text(json.dumps({"target_corpus": "iemocap", "stages": stages, "settings": {}}))
    for where in (tmp_path / "out", run):
        got = resolve_model_dir(where)
        assert got["model"] == str(cache / "pretrain-a" / "model")
        assert got["cem"] == str(cache / "cem-b" / "cem")
        assert got["cem_slm"] is None  # the CEM's SLM is the evaluated model itself
        assert got["emotion_labels"] == LABELS
    assert resolve_model_dir(model_dir)["model"] == str(model_dir)


def test_cem_slm_gives_the_features(model_dir, batched, clips):
    """A separate SLM for the CEM features (here the same weights) gives the same confidences."""
    from transformers import pipeline

    p2 = pipeline("explainable-ser", model=str(model_dir), device=-1, cem_slm=str(model_dir))
    assert p2.cem_slm is not None
    for a, b in zip(batched, p2(clips, batch_size=4)):
        if a["confidence"]:
            for f in SED_FIELDS:
                assert b["confidence"][f] == pytest.approx(a["confidence"][f], abs=1e-4)
