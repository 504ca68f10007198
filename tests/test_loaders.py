"""Corpus loaders on fixture trees that reproduce the real layouts (tests/fixtures_real.py)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_real import build_audiofolder, build_iemocap, build_meld, build_speechcraft, write_wav  # noqa: E402

import trustser  # noqa: E402
from trustser import data as tdata  # noqa: E402
from trustser.data import FEATURES, corpus_stats, load_corpus, register_corpus  # noqa: E402
from trustser.data.meld import repair_mojibake  # noqa: E402


def _audio(row):
    a = row["audio"]
    return np.asarray(a["array"]), int(a["sampling_rate"])


def _assert_schema(dd):
    assert isinstance(dd, datasets.DatasetDict)
    for ds in dd.values():
        assert ds.features == FEATURES
        assert ds.features["audio"].sampling_rate == 16000


def _all_rows(dd):
    return {r["id"]: (split, r) for split, ds in dd.items() for r in ds.remove_columns("audio")}


# ------------------------------------------------------------------------------------------
# IEMOCAP
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iemocap(tmp_path_factory):
    return build_iemocap(tmp_path_factory.mktemp("iemocap"))


def test_iemocap_session5(iemocap, tmp_path):
    dd = load_corpus("iemocap", iemocap["root"], cache_dir=tmp_path / "cache")
    _assert_schema(dd)
    assert list(dd) == ["train", "dev", "test"]
    rows = _all_rows(dd)
    exp = iemocap["expected"]
    assert set(rows) == set(exp)  # kept = 4 classes with audio; sub-folder files and dropped codes absent
    for uid, (split, r) in rows.items():
        e = exp[uid]
        assert (r["emotion"], r["text"], r["gender"], r["speaker"]) == (
            e["emotion"],
            e["text"],
            e["gender"],
            e["speaker"],
        )
        assert (split == "test") == (e["session"] == 5)
        assert r["pitch"] == r["volume"] == r["speed"] == r["age"] == ""
    # dev holds whole dialogs, one per training session (2 dialogs per session, 10%)
    dev_dialogs = {exp[i]["dialog"] for i in dd["dev"]["id"]}
    train_dialogs = {exp[i]["dialog"] for i in dd["train"]["id"]}
    assert not dev_dialogs & train_dialogs and len(dev_dialogs) == 4
    assert {exp[i]["session"] for i in dd["dev"]["id"]} == {1, 2, 3, 4}
    stats = corpus_stats(dd)
    assert stats["dropped_labels"] == iemocap["dropped"] == {"fru": 5, "xxx": 5, "oth": 5}
    assert stats["missing_audio"] == iemocap["missing"] == ["Ses01F_impro01_M002"]
    assert stats["splits"] == {s: len(d) for s, d in dd.items()} and stats["unparseable"] == []
    # audio: 16 kHz mono, the duration written
    r = dd["test"][0]
    wav, sr = _audio(r)
    assert sr == 16000 and wav.ndim == 1
    assert abs(wav.shape[-1] / sr - exp[r["id"]]["seconds"]) < 1e-3


def test_iemocap_loso_folds_and_dev_seed(iemocap, tmp_path):
    exp = iemocap["expected"]
    for k in range(1, 6):
        dd = load_corpus("iemocap", iemocap["root"], protocol="loso", fold=k, cache_dir=tmp_path / "c")
        assert {exp[i]["session"] for i in dd["test"]["id"]} == {k}
        assert len(dd["test"]) == sum(e["session"] == k for e in exp.values())
        assert sorted(i for d in dd.values() for i in d["id"]) == sorted(exp)
    a = load_corpus("iemocap", iemocap["root"], seed=0, cache_dir=tmp_path / "c")
    b = load_corpus("iemocap", iemocap["root"], seed=0, cache_dir=tmp_path / "c2")
    assert a["dev"]["id"] == b["dev"]["id"]
    devs = {
        tuple(sorted(load_corpus("iemocap", iemocap["root"], seed=s, cache_dir=tmp_path / "c")["dev"]["id"]))
        for s in range(6)
    }
    assert len(devs) > 1  # the seed picks the held-out dialogs
    nodev = load_corpus("iemocap", iemocap["root"], dev_fraction=0, cache_dir=tmp_path / "c")
    assert list(nodev) == ["train", "test"]
    s5 = load_corpus("iemocap", iemocap["root"], protocol="loso", fold=5, cache_dir=tmp_path / "c")
    assert s5["test"]["id"] == a["test"]["id"]
    with pytest.raises(ValueError, match="fold in 1..5"):
        load_corpus("iemocap", iemocap["root"], protocol="loso", fold=7)
    with pytest.raises(ValueError, match="unknown IEMOCAP protocol"):
        load_corpus("iemocap", iemocap["root"], protocol="random")


def test_iemocap_cache_hit_and_invalidation(iemocap, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(iemocap["root"], root)
    cache = tmp_path / "cache"
    first = load_corpus("iemocap", root, cache_dir=cache)
    arrow = Path(first["test"].cache_files[0]["filename"])
    assert arrow.is_relative_to(cache)
    mtime = arrow.stat().st_mtime_ns
    second = load_corpus("iemocap", root, cache_dir=cache)
    assert second["test"]._fingerprint == first["test"]._fingerprint
    assert second["test"].cache_files == first["test"].cache_files and arrow.stat().st_mtime_ns == mtime
    # editing a label file changes the fingerprint and the content
    eva = root / "Session5" / "dialog" / "EmoEvaluation" / "Ses05F_impro01.txt"
    eva.write_text(eva.read_text().replace("Ses05F_impro01_F000\tneu", "Ses05F_impro01_F000\tang"))
    third = load_corpus("iemocap", root, cache_dir=cache)
    assert third["test"]._fingerprint != first["test"]._fingerprint
    assert dict(zip(third["test"]["id"], third["test"]["emotion"]))["Ses05F_impro01_F000"] == "angry"
    # options are part of the fingerprint too
    assert load_corpus("iemocap", root, seed=3, cache_dir=cache)["test"]._fingerprint != third["test"]._fingerprint


@pytest.mark.faults
def test_iemocap_bad_input(iemocap, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_corpus("iemocap", tmp_path / "nowhere")
    root = tmp_path / "copy"
    shutil.copytree(iemocap["root"], root)
    eva = root / "Session2" / "dialog" / "EmoEvaluation" / "Ses02F_impro01.txt"
    lines = eva.read_text().splitlines()
    lines.insert(2, "[1.0 - 2.0] broken line without tabs")
    eva.write_text("\n".join(lines) + "\n")
    dd = load_corpus("iemocap", root, cache_dir=tmp_path / "c")
    bad = corpus_stats(dd)["unparseable"]
    assert len(bad) == 1 and bad[0].startswith(f"{eva.resolve()}:3:")
    assert len(_all_rows(dd)) == len(iemocap["expected"])
    # zero usable utterances -> ValueError naming the root
    empty = tmp_path / "empty"
    for n in range(1, 6):
        d = empty / f"Session{n}" / "dialog" / "EmoEvaluation"
        d.mkdir(parents=True)
        (d / f"Ses0{n}F_impro01.txt").write_text(f"% header\n\n[1.0 - 2.0]\tSes0{n}F_impro01_F000\txxx\t[1, 1, 1]\n")
    with pytest.raises(ValueError, match=str(empty.resolve())):
        load_corpus("iemocap", empty, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------
# MELD
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meld(tmp_path_factory):
    return build_meld(tmp_path_factory.mktemp("meld"))


@pytest.fixture(scope="module")
def meld_loaded(meld, tmp_path_factory):
    cache = tmp_path_factory.mktemp("meld_cache")
    return load_corpus("meld", meld["root"], cache_dir=cache), cache


def test_meld_schema_text_audio(meld, meld_loaded):
    dd, _ = meld_loaded
    _assert_schema(dd)
    assert list(dd) == ["train", "dev", "test"]
    rows = _all_rows(dd)
    assert set(rows) == set(meld["expected"])
    for uid, (split, r) in rows.items():
        e = meld["expected"][uid]
        assert (split, r["text"], r["speaker"], r["emotion"], r["gender"]) == (
            e["split"],
            e["text"],
            e["speaker"],
            e["emotion"],
            "",
        )
    assert rows["train_dia0_utt1"][1]["text"] == "Oh. That\u2019s so Monica can keep track. \u201cThat\u201d way\u2026"
    stats = corpus_stats(dd)
    assert stats["missing_audio"] == meld["missing"] == ["train_dia1_utt1"]
    assert stats["splits"] == {"train": 3, "dev": 2, "test": 3} and stats["unreadable_audio"] == []
    for split in dd:
        for r in dd[split]:
            wav, sr = _audio(r)
            assert sr == 16000 and wav.ndim == 1
            # AAC adds up to ~1024 samples of priming/padding at 48 kHz
            assert abs(wav.shape[-1] / sr - meld["expected"][r["id"]]["seconds"]) < 0.04
            assert 0.05 < np.abs(wav).max() <= 0.35  # channels averaged, not summed


def test_meld_cache_hit_skips_decoding(meld, meld_loaded, monkeypatch):
    dd, cache = meld_loaded

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("trustser.data.meld.decode_clip", boom)
    again = load_corpus("meld", meld["root"], cache_dir=cache)
    assert again["train"].cache_files == dd["train"].cache_files
    assert again["test"]["id"] == dd["test"]["id"]


@pytest.mark.faults
def test_meld_unreadable_clip_and_layout(meld, tmp_path, monkeypatch):
    # the split folders are found by name wherever they sit
    root = tmp_path / "other"
    root.mkdir()
    for name in ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv"):
        (root / "csv").mkdir(exist_ok=True)
        shutil.copy(meld["root"] / name, root / "csv" / name)
    shutil.copytree(meld["root"] / "train" / "train_splits", root / "media" / "a" / "train_splits")
    shutil.copytree(meld["root"] / "dev" / "dev_splits_complete", root / "media" / "dev_splits_complete")
    shutil.copytree(meld["root"] / "test" / "output_repeated_splits_test", root / "output_repeated_splits_test")
    from trustser.data import meld as meld_mod

    real = meld_mod.decode_clip
    monkeypatch.setattr(
        meld_mod,
        "decode_clip",
        lambda p, *a: (
            (_ for _ in ()).throw(RuntimeError("corrupt")) if "dia0_utt0" in str(p) and "dev" in str(p) else real(p, *a)
        ),
    )
    dd = load_corpus("meld", root, splits=("dev", "test"), cache_dir=tmp_path / "c")
    assert list(dd) == ["dev", "test"]
    assert dd["dev"]["id"] == ["dev_dia0_utt1"]
    assert corpus_stats(dd)["unreadable_audio"] == ["dev_dia0_utt0"]


@pytest.mark.faults
def test_meld_cp1252_csv_and_bad_input(tmp_path):
    fx = build_meld(tmp_path / "enc", dev_encoding="cp1252")
    shutil.rmtree(fx["root"] / "train")
    with pytest.raises(FileNotFoundError, match="train_splits"):
        load_corpus("meld", fx["root"], cache_dir=tmp_path / "c")
    dd = load_corpus("meld", fx["root"], splits=("dev",), cache_dir=tmp_path / "c")
    assert dd["dev"]["text"][0] == "Oh my God, he\u2019s lost it. He\u2019s totally lost it."
    assert any("not valid UTF-8" in n for n in corpus_stats(dd)["notes"])
    (fx["root"] / "dev_sent_emo.csv").write_text("Sr No.,Text,Emotion\n1,hi,joy\n")
    with pytest.raises(ValueError, match="dev_sent_emo.csv.*missing columns"):
        load_corpus("meld", fx["root"], splits=("dev",), cache_dir=tmp_path / "c")


def test_repair_mojibake():
    assert repair_mojibake("he\u00e2\u0080\u0099s") == "he\u2019s"  # UTF-8 read as latin-1
    assert repair_mojibake("he\u00e2\u20ac\u2122s") == "he\u2019s"  # UTF-8 read as cp1252
    for ok in ("he\u2019s", "caf\u00e9", "plain"):
        assert repair_mojibake(ok) == ok


# ------------------------------------------------------------------------------------------
# SpeechCraft
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speechcraft(tmp_path_factory):
    return build_speechcraft(tmp_path_factory.mktemp("sc"))


@pytest.mark.parametrize("fmt", ["records.json", "records.jsonl", "records.txt"])
def test_speechcraft_formats(speechcraft, fmt, tmp_path):
    fx = speechcraft
    dd = load_corpus(
        "speechcraft", fx["descriptions"], descriptions=fmt, audio_root=fx["audio_root"], cache_dir=tmp_path
    )
    _assert_schema(dd)
    rows = _all_rows(dd)
    assert set(rows) == set(fx["expected"])
    for uid, (_, r) in rows.items():
        e = fx["expected"][uid]
        for col in ("age", "gender", "pitch", "volume", "speed", "emotion", "text", "speaker"):
            assert r[col] == e[col], (uid, col)
    stats = corpus_stats(dd)
    assert stats["missing_audio"] == fx["missing"]
    if fmt == "records.txt":
        assert stats["unparseable"] == [
            f"{(fx['descriptions'] / fmt).resolve()}:3: no 'key:{{value}}' fields: 'this line is garbage'"
        ]
    wav, sr = _audio(dd["train"][1])
    assert (
        sr == 16000
        and wav.ndim == 1
        and abs(wav.shape[-1] / sr - fx["expected"][dd["train"][1]["id"]]["seconds"]) < 1e-3
    )


@pytest.mark.faults
def test_speechcraft_streaming_keys_and_invalid(speechcraft, tmp_path):
    fx = speechcraft
    kw = dict(descriptions="records.jsonl", audio_root=fx["audio_root"], dev_fraction=0.5, seed=1)
    mapped = load_corpus("speechcraft", fx["descriptions"], cache_dir=tmp_path, **kw)
    streamed = load_corpus("speechcraft", fx["descriptions"], streaming=True, **kw)
    assert isinstance(streamed, datasets.IterableDatasetDict)
    assert set(streamed) == {"train", "dev"}
    for split in streamed:
        got = [r["id"] for r in streamed[split]]
        assert got == (mapped[split]["id"] if split in mapped else [])
    assert sorted(i for d in mapped.values() for i in d["id"]) == sorted(fx["expected"])
    # bare keys (no path) are found by name under the audio root; invalid values -> "" and counted
    recs = [{k: v for k, v in r.items() if k != "path"} for r in fx["records"]]
    recs[0]["pitch"] = "very high"
    (tmp_path / "keys.json").write_text(json.dumps({r.pop("key"): r for r in recs}))
    dd = load_corpus(
        "speechcraft", tmp_path, descriptions="keys.json", audio_root=fx["audio_root"], cache_dir=tmp_path / "c"
    )
    rows = _all_rows(dd)
    assert set(rows) == set(fx["expected"])
    assert rows["POD0000000001_S0000008"][1]["pitch"] == ""
    assert corpus_stats(dd)["invalid_values"] == {"pitch=very high": 1}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_corpus("speechcraft", tmp_path, descriptions="nope.json")


# ------------------------------------------------------------------------------------------
# audiofolder / csv
# ------------------------------------------------------------------------------------------
LABEL_MAP = {"joy": "happy", "mad": "angry", "calm": "neutral"}


@pytest.mark.parametrize("per_split", [False, True])
def test_audiofolder_layouts(tmp_path, per_split):
    fx = build_audiofolder(tmp_path, per_split=per_split)
    kw = dict(
        label_column="label",
        label_map=LABEL_MAP,
        speaker_column="speaker",
        text_column="transcript",
        cache_dir=tmp_path / "c",
    )
    if not per_split:
        kw["split_column"] = "split"
    dd = load_corpus("audiofolder", fx["root"], **kw)
    _assert_schema(dd)
    rows = _all_rows(dd)
    assert set(rows) == set(fx["expected"])
    for uid, (split, r) in rows.items():
        e = fx["expected"][uid]
        assert (split, r["emotion"], r["speaker"], r["text"], r["gender"]) == (
            e["split"],
            LABEL_MAP[e["raw"]],
            e["speaker"],
            e["text"],
            e["gender"],
        )
    wav, sr = _audio(dd["train"][0])
    assert sr == 16000 and wav.ndim == 1


@pytest.mark.faults
def test_audiofolder_labels_and_errors(tmp_path):
    fx = build_audiofolder(tmp_path)
    meta = fx["root"] / "metadata.csv"
    with pytest.raises(ValueError, match=rf"{meta.resolve()}:2: unknown label 'joy' in column 'label'"):
        load_corpus("audiofolder", fx["root"], label_column="label", cache_dir=tmp_path / "c")
    dd = load_corpus(
        "audiofolder",
        fx["root"],
        label_column="label",
        labels=["joy", "calm"],
        on_unknown="skip",
        cache_dir=tmp_path / "c",
    )
    assert sorted(dd["train"]["emotion"]) == ["calm", "joy", "joy"]  # a user label set, kept as given
    stats = corpus_stats(dd)
    assert stats["unknown_labels"] == {"mad": 1} and stats["unparseable"][0].startswith(f"{meta.resolve()}:3:")
    dd = load_corpus(
        "audiofolder", fx["root"], label_column="label", label_map={**LABEL_MAP, "calm": None}, cache_dir=tmp_path / "c"
    )
    assert corpus_stats(dd)["dropped_labels"] == {"calm": 1} and len(dd["train"]) == 3
    with pytest.raises(ValueError, match=str(fx["root"].resolve())):
        load_corpus(
            "audiofolder",
            fx["root"],
            label_column="label",
            label_map=dict.fromkeys(LABEL_MAP),
            cache_dir=tmp_path / "c",
        )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['emo'\]"):
        load_corpus("audiofolder", fx["root"], label_column="emo")
    # csv: one file, audio elsewhere; a missing file is reported and skipped
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("file_name,emotion\na/0001.wav,Happy\na/0002.wav,sad\nzzz.wav,sad\n")
    dd = load_corpus("csv", csv_path, audio_root=fx["root"], cache_dir=tmp_path / "c")
    assert dd["train"]["emotion"] == ["happy", "sad"] and corpus_stats(dd)["missing_audio"] == ["zzz"]
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_corpus("csv", tmp_path / "missing.csv")


def test_audiofolder_decode_video(tmp_path):
    from fixtures_real import write_mp4

    root = tmp_path / "vid"
    write_mp4(root / "c1.mp4", 0.5, channels=2)
    (root / "metadata.csv").write_text("file_name,emotion\nc1.mp4,angry\n")
    dd = load_corpus("audiofolder", root, decode=True, cache_dir=tmp_path / "c")
    wav, sr = _audio(dd["train"][0])
    assert sr == 16000 and wav.ndim == 1 and abs(wav.shape[-1] / sr - 0.5) < 0.04


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------
def test_registry(tmp_path, monkeypatch):
    assert trustser.load_corpus is load_corpus
    assert {"iemocap", "meld", "speechcraft", "audiofolder", "csv", "synthetic"} <= set(tdata.available_corpora())
    monkeypatch.setattr(tdata, "_REGISTRY", dict(tdata._REGISTRY))
    calls = []

    def mine(root, **options):
        calls.append((root, options))
        write_wav(Path(root) / "x.wav", 0.3)
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(
                    [tdata.make_row("x", str(Path(root) / "x.wav"), emotion="sad")], features=FEATURES
                )
            }
        )

    register_corpus("Mine", mine)
    dd = load_corpus("mine", tmp_path, flavour=1)
    assert calls == [(tmp_path, {"flavour": 1})] and dd["train"][0]["emotion"] == "sad"
    with pytest.raises(ValueError, match="already registered"):
        register_corpus("mine", mine)
    with pytest.raises(KeyError, match="unknown corpus 'nope'"):
        load_corpus("nope", tmp_path)
    # synthetic is resolved lazily from trustser.data.synthetic.load_synthetic
    fake = types.ModuleType("trustser.data.synthetic")
    fake.load_synthetic = lambda root, **o: ("synthetic", root, o)
    monkeypatch.setitem(sys.modules, "trustser.data.synthetic", fake)
    tdata._REGISTRY["synthetic"] = "trustser.data.synthetic:load_synthetic"
    assert load_corpus("synthetic", tmp_path, seed=2) == ("synthetic", tmp_path, {"seed": 2})
