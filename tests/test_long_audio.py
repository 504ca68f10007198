"""Long recordings (`long_audio="segment"`, `trustser explain --long-audio segment`): a synthetic
multi-utterance recording — the four espeak-ng clips the tiny model memorised, with known silences
between them — is cut at the right places (within 0.3 s), every utterance is explained once, in
time order, with the emotion it has; silence-only, over-long and pause-free inputs are handled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from explain_fixtures import EMOS, LABELS, TEXTS, one_thread, speech_only  # noqa: F401  (one_thread: autouse)

from trustser.audio import TARGET_SR, AudioError, load_audio
from trustser.segments import fit_segments, segment_recording

GAPS = [0.7, 1.2, 0.6, 1.5, 0.9]  # lead-in, three pauses, tail (s)


def _speech_bounds(wav, floor=0.01):
    """First and last sample louder than ``floor``: where an espeak-ng clip's speech is."""
    idx = np.flatnonzero(np.abs(wav) > floor)
    return idx[0] / TARGET_SR, (idx[-1] + 1) / TARGET_SR


@pytest.fixture(scope="module")
def recording(explain_clips, tmp_path_factory):
    """(path, [(start, end) of each utterance's speech]): the clips, untouched, between silences
    with a -66 dBFS noise floor."""
    rng = np.random.default_rng(0)
    parts, bounds, t = [], [], 0.0
    for i, gap in enumerate(GAPS):
        parts.append(np.zeros(int(gap * TARGET_SR), np.float32))
        t += gap
        if i < len(explain_clips):
            w = load_audio(explain_clips[i])
            a, b = _speech_bounds(w)
            bounds.append((t + a, t + b))
            parts.append(w)
            t += w.size / TARGET_SR
    wav = np.concatenate(parts)
    wav = wav + (5e-4 * rng.standard_normal(wav.size)).astype(np.float32)
    path = tmp_path_factory.mktemp("long") / "conversation.wav"
    sf.write(path, wav, TARGET_SR)
    assert wav.size / TARGET_SR > 2 * 4  # well past the tiny model's 4 s window
    return str(path), bounds


@pytest.fixture(scope="module")
def pipe(segment_model_dir):
    from transformers import pipeline

    import trustser  # noqa: F401

    return pipeline("explainable-ser", model=str(segment_model_dir), device=-1)


def test_vad_boundaries(recording):
    path, bounds = recording
    spans = segment_recording(load_audio(path), 4.0, name=path)
    assert len(spans) == len(bounds), spans
    for (a, b), (ta, tb) in zip(spans, bounds):
        assert abs(a - ta) <= 0.3 and abs(b - tb) <= 0.3, (spans, bounds)


def test_pipeline_segments(pipe, recording, explain_clips):
    path, bounds = recording
    out = pipe(path, long_audio="segment", batch_size=4)
    assert [r["segment"] for r in out] == [0, 1, 2, 3]
    assert [r["start"] for r in out] == sorted(r["start"] for r in out)
    assert all(r["file"] == path and r["error"] is None for r in out)
    for r, (ta, tb) in zip(out, bounds):
        assert abs(r["start"] - ta) <= 0.3 and abs(r["end"] - tb) <= 0.3
    # each segment's explanation is the model's explanation of that stretch of the recording ...
    wav = load_audio(path)
    alone = pipe(
        [
            {
                "array": wav[int(round(r["start"] * TARGET_SR)) : int(round(r["end"] * TARGET_SR))],
                "sampling_rate": TARGET_SR,
            }
            for r in out
        ],
        batch_size=1,
    )
    assert [r["caption"] for r in out] == [a["caption"] for a in alone]
    # ... and names the utterance's known emotion and words (the tiny model, memorising four clips
    # on CPU, is not robust to the cut: at least half of them)
    right = [r["emotion"] == e for r, e in zip(out, EMOS)]
    assert sum(right) >= 2, ([r["caption"] for r in out], EMOS)
    assert sum(r["transcription"] == t for r, t in zip(out, TEXTS)) >= 2
    # a list of recordings gives a list of lists
    both = pipe([path, path], long_audio="segment", batch_size=4)
    assert len(both) == 2 and [r["caption"] for r in both[1]] == [r["caption"] for r in out]


def test_cli_jsonl_table_and_timeline(segment_model_dir, recording, explain_clips, tmp_path):
    from trustser.cli import main

    path, bounds = recording
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "explain",
                str(segment_model_dir),
                path,
                explain_clips[0],
                "--long-audio",
                "segment",
                "--out",
                str(out),
                "--plot-dir",
                str(tmp_path / "plots"),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [path] * 4 + [explain_clips[0]]
    assert [r["segment"] for r in rows] == [0, 1, 2, 3, 0]
    assert all(isinstance(r["start"], float) and r["end"] > r["start"] for r in rows)
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["conversation.wav.timeline.png", "u0.wav.timeline.png"]
    assert (tmp_path / "plots" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = tmp_path / "t.txt"
    assert (
        main(
            [
                "explain",
                str(segment_model_dir),
                path,
                "--long-audio",
                "segment",
                "--format",
                "table",
                "--out",
                str(table),
            ]
        )
        == 0
    )
    lines = table.read_text().splitlines()
    assert lines[0].split()[:6] == ["file", "start", "end", "emotion", "p", "trust"] and len(lines) == 5
    assert [float(l.split()[1]) for l in lines[1:]] == pytest.approx([r["start"] for r in rows[:4]], abs=0.006)
    # without segmentation the same file is refused, naming the way out
    rc = main(["explain", str(segment_model_dir), path, "--out", str(tmp_path / "x.jsonl")])
    err = json.loads((tmp_path / "x.jsonl").read_text())["error"]
    assert rc == 1 and "longer than the model's 4 s window" in err and "--long-audio segment" in err
    assert main(["explain", str(segment_model_dir), path, "--plot-dir", str(tmp_path)]) == 1  # needs segment


@pytest.mark.faults
def test_silence_and_over_long_inputs(pipe, recording, tmp_path, capsys):
    from trustser import explain_files
    from trustser.cli import main

    rng = np.random.default_rng(1)
    sf.write(tmp_path / "zeros.wav", np.zeros(4 * TARGET_SR, np.float32), TARGET_SR)
    sf.write(tmp_path / "hiss.wav", (0.003 * rng.standard_normal(4 * TARGET_SR)).astype(np.float32), TARGET_SR)
    with pytest.raises(AudioError, match=r"hiss.wav: no speech found by the voice-activity detector in 4.0 s"):
        pipe(str(tmp_path / "hiss.wav"), long_audio="segment")
    path, _ = recording
    out = explain_files(
        pipe,
        [str(tmp_path / "zeros.wav"), str(tmp_path / "hiss.wav"), path],
        long_audio="segment",
        max_recording_seconds=6,
        progress=False,
    )
    assert len(out) == 3 and all(r["error"] and r["start"] is None for r in out)
    assert "zeros.wav: silent" in out[0]["error"] and "no speech found" in out[1]["error"]
    assert "conversation.wav: 0.2 min is longer than the 0.1 min a recording may have" in out[2]["error"]
    rc = main(
        [
            "explain",
            str(pipe.model.name_or_path),
            path,
            "--long-audio",
            "segment",
            "--max-recording-minutes",
            "0.1",
            "--format",
            "table",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1 and "longer than the 0.1 min" in captured.err and "ERROR" in captured.out


def test_speech_without_pauses_is_split_to_fit(pipe, explain_clips):
    """Back-to-back utterances (no pause for the detector) longer than the window: pieces that fit."""
    wav = np.concatenate([speech_only(load_audio(p), pad=0) for p in explain_clips * 3])
    assert wav.size / TARGET_SR > 2 * 4
    out = pipe({"array": wav, "sampling_rate": TARGET_SR, "path": "run-on"}, long_audio="segment")
    assert len(out) >= 2 and all(r["error"] is None for r in out)
    assert all(r["end"] - r["start"] <= 4.0 + 1e-6 for r in out)
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(out, out[1:]))
    covered = sum(r["end"] - r["start"] for r in out)
    assert covered >= 0.8 * wav.size / TARGET_SR


def test_fit_segments_merges_and_splits():
    # a 9 s stretch into three 3 s parts; a 0.4 s blip merged with its neighbour across 0.3 s;
    # a lone 0.1 s blip widened to 0.3 s
    got = fit_segments([(0.0, 9.0), (10.0, 12.0), (12.3, 12.7), (20.0, 20.1)], 4.0, 30.0)
    np.testing.assert_allclose(got, [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (10.0, 12.7), (19.9, 20.2)])
    np.testing.assert_allclose(fit_segments([(29.9, 30.0)], 4.0, 30.0), [(29.7, 30.0)])
    assert LABELS  # the label set the model knows
