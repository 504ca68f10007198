"""The synthetic SED-grounded corpus: determinism, cache, layout, ground truth, loaders."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

from trustser.data import synthetic as S  # noqa: E402
from trustser.descriptors import EMOTION_LABELS, SED_VOCAB  # noqa: E402


def _rows(root: Path, split: str) -> list[dict]:
    with (root / split / "metadata.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# generation: determinism, cache, atomicity
# ------------------------------------------------------------------------------------------
def test_two_generations_are_byte_identical(synthetic_small, tmp_path):
    again = S.synthesize_corpus(tmp_path / "again", seed=0, size="small", num_proc=2)
    a, b = _tree(synthetic_small), _tree(again)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".wav")]) == sum(S.SIZES["small"].values())
    assert [k for k in a if a[k] != b[k]] == []


def test_output_does_not_depend_on_num_proc(synthetic_small, tmp_path):
    _, utts = S.make_plan(0, "small")
    S._ESPEAK = None
    with tempfile.TemporaryDirectory() as scratch:
        data = S._make_data_dir(Path(scratch))
        work = Path(scratch)
        for u in [utts[0], utts[-1]]:  # one clean-channel and one target-channel utterance
            out = tmp_path / f"{u.id}.wav"
            S._render_job((u, str(data), str(work), str(out)))
            assert out.read_bytes() == (synthetic_small / u.split / "wav" / f"{u.id}.wav").read_bytes()


def test_other_seed_gives_other_plan():
    _, a = S.make_plan(0, "small")
    _, b = S.make_plan(1, "small")
    _, a2 = S.make_plan(0, "small")
    assert [(u.text, u.emotion, u.z) for u in a] == [(u.text, u.emotion, u.z) for u in a2]
    assert [(u.text, u.emotion, u.z) for u in a] != [(u.text, u.emotion, u.z) for u in b]


def test_second_call_is_a_noop(synthetic_small):
    before = {p: p.stat().st_mtime_ns for p in synthetic_small.rglob("*")}
    assert S.synthesize_corpus(synthetic_small, seed=0, size="small") == synthetic_small
    assert {p: p.stat().st_mtime_ns for p in synthetic_small.rglob("*")} == before


def test_manifest_records_settings_and_detects_tampering(synthetic_small, tmp_path):
    manifest = json.loads((synthetic_small / "manifest.json").read_text())
    st = manifest["settings"]
    assert st["version"] == S.GENERATOR_VERSION and st["seed"] == 0 and st["size"] == "small"
    assert st["espeak_ng"] == S.espeak_version()
    assert st == json.loads(json.dumps(S.settings(0, "small")))
    assert S._is_current(synthetic_small, st)
    assert not S._is_current(synthetic_small, json.loads(json.dumps(S.settings(1, "small"))))
    # a corpus whose metadata no longer matches its manifest is not taken for finished
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_small, copy)
    assert S._is_current(copy, st)
    wav = copy / "test" / "wav" / "test-00003.wav"
    data = wav.read_bytes()
    wav.unlink()
    assert not S._is_current(copy, st)  # a lost audio file forces regeneration
    wav.write_bytes(data)
    assert S._is_current(copy, st)
    with (copy / "dev" / "metadata.csv").open("a") as fh:
        fh.write("x\n")
    assert not S._is_current(copy, st)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a trustser synthetic corpus"):
        S.synthesize_corpus(tmp_path / "mine", size="small")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.faults
def test_interrupted_generation_leaves_nothing_finished(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = S.render_utterance

    def failing(u, data_dir, work_dir):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(u, data_dir, work_dir)

    monkeypatch.setattr(S, "render_utterance", failing)
    with pytest.raises(KeyboardInterrupt):
        S.synthesize_corpus(tmp_path / "corpus", size="small", num_proc=1)
    assert not (tmp_path / "corpus").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.faults
def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic corpus size"):
        S.synthesize_corpus(tmp_path / "x", size="huge")


# ------------------------------------------------------------------------------------------
# content: schema, vocabulary, speakers, ground truth
# ------------------------------------------------------------------------------------------
def test_layout_columns_and_vocab(synthetic_small):
    ids = set()
    for split in S.SPLITS:
        rows = _rows(synthetic_small, split)
        assert len(rows) == S.SIZES["small"][split]
        extra = [S.TRUE_EMOTION_COLUMN] if split == "reference" else []
        assert list(rows[0]) == ["file_name", *S.LABEL_COLUMNS, *S.OFFSET_COLUMNS, *extra]
        for r in rows:
            assert (synthetic_small / split / r["file_name"]).is_file()
            assert r["emotion"] in EMOTION_LABELS["synthetic"]
            assert r["group"] in S.GROUP_NORMS
            for f in ("pitch", "volume", "speed", "gender", "age"):
                assert r[f] in SED_VOCAB[f], (f, r[f])
            for f in ("pitch", "volume", "speed"):  # the label is the category of the recorded offset
                assert r[f] == S.sed_category(f, float(r[f + "_z"]))
            assert r["text"] and r["id"] not in ids
            ids.add(r["id"])


def test_speakers_groups_and_split_roles(synthetic_small):
    spk = {s: {r["speaker"] for r in _rows(synthetic_small, s)} for s in S.SPLITS}
    for a in S.SPLITS:  # every speaker records for one split only: dev and test are held out
        for b in S.SPLITS:
            assert a == b or not spk[a] & spk[b], (a, b)
    assert len(set().union(*spk.values())) >= 8
    for split in S.SPLITS:
        rows = _rows(synthetic_small, split)
        assert {r["gender"] for r in rows} == {"male", "female"}
        assert len({r["age"] for r in rows}) >= 3
        # a speaker always has the same group, gender and age
        assert len({(r["speaker"], r["group"], r["gender"], r["age"]) for r in rows}) == len(
            {r["speaker"] for r in rows}
        )
    kinds = {s: {S.speaker_group_kind(r["group"]) for r in _rows(synthetic_small, s)} for s in S.SPLITS}
    assert {"high voice", "low voice"}.isdisjoint(kinds["reference"])  # the tool's population has no unusual voices
    for split in ("train", "dev", "test"):  # the target corpus has every kind
        assert kinds[split] == set(S.KINDS)


def test_speaker_table_matches_metadata(synthetic_small):
    table = {s["speaker"]: s for s in json.loads((synthetic_small / "speakers.json").read_text())}
    for split in S.SPLITS:
        for r in _rows(synthetic_small, split):
            s = table[r["speaker"]]
            assert (s["group"], s["gender"], s["age"]) == (r["group"], r["gender"], r["age"])
            assert s["split"] == split
            norm = S.GROUP_NORMS[s["group"]]
            # baseline = group norm + less than one category of individual deviation
            assert abs(12 * np.log2(s["f0_hz"] / norm.f0_hz)) < S.UNITS["pitch_semitones"] * S.INDIVIDUAL_CLIP + 0.01
            assert abs(s["level_dbfs"] - norm.level_dbfs) < S.UNITS["volume_db"] * S.INDIVIDUAL_CLIP + 0.01


def test_default_size_plan_mirrors_the_paper_regime():
    speakers, utts = S.make_plan(0, "default")
    by_split = {s: [x for x in speakers if x.split == s] for s in S.SPLITS}
    assert Counter(u.split for u in utts) == Counter(S.SIZES["default"])
    # SpeechCraft's role: >= 32 speakers, mostly typical adults; the target's training split is small beside it
    assert len(by_split["reference"]) >= 32
    assert np.mean([x.kind == "typical" for x in by_split["reference"]]) >= 0.8
    assert S.SIZES["default"]["train"] <= S.SIZES["default"]["reference"] / 4
    # test: >= 2400 utterances of >= 16 held-out speakers, half of them voices a calibrated tool gets wrong
    assert S.SIZES["default"]["test"] >= 2400 and len(by_split["test"]) >= 16
    assert np.mean([x.kind != "typical" for x in by_split["test"]]) == 0.5
    # distinct voices: no two speakers share a variant definition
    voices = {(s.f0_hz, s.rate_wpm, s.level_dbfs, s.formants) for s in speakers}
    assert len(voices) == len(speakers)
    # individual deviation from the group norm stays below one category's width
    assert max(abs(d) for s in speakers for d in s.deviation) <= S.INDIVIDUAL_CLIP < 1.0


def test_emotion_priors_expression_and_labeller_differ_between_domains():
    _, utts = S.make_plan(0, "default")
    ref = [u for u in utts if u.split == "reference"]
    target = [u for u in utts if u.split != "reference"]
    share = lambda us, e: np.mean([u.emotion == e for u in us])
    assert share(ref, "neutral") > 0.5 and all(0.2 < share(target, e) < 0.3 for e in S.EMOTIONS)
    # the automatic emotion labeller is wrong for about a quarter of the pre-training corpus; the target's labels are true
    assert 0.2 < np.mean([u.emotion_label != u.emotion for u in ref]) < 0.3
    assert all(u.emotion_label == u.emotion for u in target)
    # acted expression is stronger and shaped differently (happy speeds up, anger does not)
    mean_z = lambda us, e: np.mean([u.z for u in us if u.emotion == e], axis=0)
    assert mean_z(target, "angry")[1] > mean_z(ref, "angry")[1] + 0.3
    assert mean_z(target, "happy")[2] > mean_z(target, "angry")[2] + 0.3
    assert mean_z(ref, "angry")[2] > mean_z(ref, "happy")[2]
    # probabilistic: every target emotion shows every pitch category
    for e in S.EMOTIONS:
        assert {u.labels["pitch"] for u in target if u.emotion == e} == {"low", "normal", "high"}, e
    # each domain speaks its own sentence bank
    assert all(any(c.lower() in u.text.lower() for c in S.READ_SENTENCES) for u in ref)
    assert all(any(c.lower() in u.text.lower() for c in S.TARGET_CLAUSES) for u in target)
    emotional = {p.lower() for ps in S.EMOTIONAL_PHRASES["target"].values() for p in ps}
    worded = [any(u.text.lower().startswith(p) for p in emotional) for u in target]
    assert 0.2 < np.mean(worded) < 0.5  # a minority carries emotional words


def test_espeak_variant_keeps_pitch_away_from_zero():
    _, utts = S.make_plan(0, "default")
    f0 = np.array([u.f0_hz for u in utts])
    assert f0.min() > 60 and f0.max() < 500
    rates = np.array([u.rate_wpm for u in utts])
    assert rates.min() >= 80 and rates.max() <= 450


# ------------------------------------------------------------------------------------------
# the audio follows the controls
# ------------------------------------------------------------------------------------------
def _audio(root: Path, split: str, row: dict) -> tuple[np.ndarray, int]:
    import soundfile as sf

    return sf.read(str(root / split / row["file_name"]), dtype="float32")


def test_audio_is_16k_mono_unclipped_and_emotion_moves_energy(synthetic_small):
    rms = {"angry": [], "sad": []}
    durations = []
    for split in ("reference", "train"):
        for r in _rows(synthetic_small, split):
            x, sr = _audio(synthetic_small, split, r)
            assert sr == 16000 and x.ndim == 1 and np.abs(x).max() < 0.999
            durations.append(len(x) / sr)
            if split == "train" and r["emotion"] in rms:  # acted emotions, true labels
                rms[r["emotion"]].append(20 * np.log10(np.sqrt(np.mean(x**2))))
    assert np.mean(rms["angry"]) > np.mean(rms["sad"]) + 2.0
    assert 1.5 < np.median(durations) < 4.0


def test_measured_f0_follows_the_pitch_label_within_speakers(synthetic_small):
    import parselmouth

    rows = _rows(synthetic_small, "train")
    diffs = []
    for spk in sorted({r["speaker"] for r in rows}):
        f0 = {"low": [], "high": []}
        for r in rows:
            if r["speaker"] == spk and r["pitch"] in f0:
                x, sr = _audio(synthetic_small, "train", r)
                p = parselmouth.Sound(x.astype(np.float64), sr).to_pitch_ac(pitch_floor=60, pitch_ceiling=600)
                v = p.selected_array["frequency"]
                f0[r["pitch"]].append(np.mean(v[v > 0]))
        if f0["low"] and f0["high"]:
            diffs.append(12 * np.log2(np.mean(f0["high"]) / np.mean(f0["low"])))
    assert len(diffs) >= 4 and min(diffs) > 2.0  # semitones


def test_target_channel_is_a_reverberant_room(synthetic_small):
    """The target's channel smears the signal in time (reverberation) and adds a low-passed noise
    floor: the energy envelope decays slowly after the speech stops, unlike the clean reference."""

    def tail_ratio(split):
        out = []
        for r in _rows(synthetic_small, split)[:15]:
            x, sr = _audio(synthetic_small, split, r)
            frame = sr // 100
            env = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(frame) / frame, mode="same"))
            active = np.flatnonzero(env > 0.1 * env.max())
            end = active[-1]
            after = env[end + frame : end + 6 * frame]  # 10-60 ms after the last loud frame
            out.append(20 * np.log10(after.mean() / env[active].mean() + 1e-12) if after.size else -120.0)
        return np.median(out)

    assert tail_ratio("test") > tail_ratio("reference") + 6.0  # dB


# ------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------
def test_load_synthetic(synthetic_small):
    import datasets

    dd = S.load_synthetic(synthetic_small)
    assert list(dd) == list(S.SPLITS)
    assert isinstance(dd["train"].features["audio"], datasets.Audio)
    assert dd["train"].features["audio"].sampling_rate == 16000
    for c in ("id", "text", "emotion", "speaker", "group", "gender", "age", "pitch", "volume", "speed"):
        assert dd["dev"].features[c].dtype == "string"
    # the pre-training split's emotion column is the automatic labeller's, the truth stays beside it
    assert S.TRUE_EMOTION_COLUMN in dd["reference"].column_names and S.TRUE_EMOTION_COLUMN not in dd["dev"].column_names
    ref_rows = _rows(synthetic_small, "reference")
    assert dd["reference"][S.TRUE_EMOTION_COLUMN] == [r[S.TRUE_EMOTION_COLUMN] for r in ref_rows]
    rows = _rows(synthetic_small, "dev")
    assert dd["dev"]["id"] == [r["id"] for r in rows]
    assert dd["dev"]["pitch"] == [r["pitch"] for r in rows]
    ex = dd["dev"][0]
    assert ex["audio"]["sampling_rate"] == 16000
    assert np.asarray(ex["audio"]["array"]).ndim == 1 and len(ex["audio"]["array"]) > 16000
    only = S.load_synthetic(synthetic_small, splits=["test"])
    assert list(only) == ["test"]
    with pytest.raises(ValueError, match="unknown synthetic split"):
        S.load_synthetic(synthetic_small, splits=["validation"])


def test_loads_with_audiofolder(synthetic_small, tmp_path):
    import datasets

    # the whole corpus: audiofolder maps train/dev/test to train/validation/test ...
    dd = datasets.load_dataset("audiofolder", data_dir=str(synthetic_small), cache_dir=str(tmp_path / "hf"))
    assert {k: len(v) for k, v in dd.items()} == {
        "train": S.SIZES["small"]["train"],
        "validation": S.SIZES["small"]["dev"],
        "test": S.SIZES["small"]["test"],
    }
    # ... and one split directory at a time (the reference split included)
    ref = datasets.load_dataset(
        "audiofolder", data_dir=str(synthetic_small / "reference"), cache_dir=str(tmp_path / "hf")
    )
    (ds,) = ref.values()
    assert len(ds) == S.SIZES["small"]["reference"]
    cols = {"audio", "id", "emotion", "pitch", "volume", "speed", "gender", "age", "speaker", "text"}
    assert cols <= set(ds.column_names) and cols <= set(dd["test"].column_names)
    ex = ds[0]
    assert ex["audio"]["sampling_rate"] == 16000
    assert ex["id"] == _rows(synthetic_small, "reference")[0]["id"]
    assert ex["emotion"] in EMOTION_LABELS["synthetic"]


@pytest.mark.faults
def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trustser synth") as info:
        S.load_synthetic(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        S.load_synthetic(tmp_path / "empty")


def test_cli_synth_on_an_up_to_date_corpus(synthetic_small, capsys):
    from trustser.cli import main

    assert main(["synth", str(synthetic_small), "--seed", "0", "--size", "small", "--num-proc", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "200 utterances" in out and str(synthetic_small) in out


@pytest.mark.faults
def test_cli_synth_refuses_a_foreign_directory(tmp_path, capsys):
    from trustser.cli import main

    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["synth", str(tmp_path), "--size", "small"]) == 1
    assert "not a trustser synthetic corpus" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
