"""Small fixture trees that reproduce the real corpus layouts (docs/corpora.md,
shared/research/corpora.md), audio generated at test time. Each builder returns the tree's root
and what a correct loader must find there."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf


def sine(seconds: float, sr: int, freq: float = 220.0, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    cols = [amp * np.sin(2 * np.pi * (freq + 37.0 * c) * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32) if channels > 1 else cols[0].astype(np.float32)


def write_wav(path: Path, seconds: float, sr: int = 16000, freq: float = 220.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), sine(seconds, sr, freq), sr, subtype="PCM_16")


def write_mp4(path: Path, seconds: float, *, channels: int = 6, sr: int = 48000, freq: float = 330.0) -> None:
    """A video clip like MELD's: a tiny H.264 picture track + AAC audio at 48 kHz, ``channels`` channels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_wav = path.with_suffix(".src.wav")
    sf.write(str(tmp_wav), sine(seconds, sr, freq, channels), sr, subtype="PCM_16")
    subprocess.run(
        [
            "ffmpeg",
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=c=black:s=32x32:r=5",
            "-i",
            str(tmp_wav),
            "-shortest",
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-ac",
            str(channels),
            "-ar",
            str(sr),
            str(path),
        ],
        check=True,
    )
    tmp_wav.unlink()


# ------------------------------------------------------------------------------------------
# IEMOCAP
# ------------------------------------------------------------------------------------------
# per session: dialog -> [(utterance suffix, label code, transcript)]
_IEMOCAP_DIALOGS = {
    "F_impro01": [
        ("F000", "neu", "Excuse me."),
        ("M000", "hap", "Do you have your forms?"),
        ("F001", "exc", "Yeah, I got them!"),
        ("M001", "fru", "Let me see them."),
    ],
    "M_script01_1": [
        ("F000", "ang", "Oh, stop it."),
        ("M000", "sad", "I miss him."),
        ("M001", "xxx", "Well, okay."),
        ("F001", "oth", "Whatever."),
    ],
}
_MAP = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}


def build_iemocap(root: Path, *, seconds: float = 0.4) -> dict:
    """Five sessions, two dialogs each (one improvised, one scripted), with the awkward parts:
    evaluator lines, Categorical/Attribute/Self-evaluation sub-folders, transcript lines without an
    id, dropped codes (fru, xxx, oth), and in Session 1 an utterance whose wav is missing."""
    root = Path(root) / "IEMOCAP_full_release"
    expected, dropped, missing = {}, {}, []
    for n in range(1, 6):
        sdir = root / f"Session{n}"
        eva = sdir / "dialog" / "EmoEvaluation"
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            (eva / sub).mkdir(parents=True, exist_ok=True)
        for k, (suffix, utts) in enumerate(_IEMOCAP_DIALOGS.items()):
            dialog = f"Ses{n:02d}{suffix}"
            utts = list(utts)
            if n == 1 and k == 0:
                utts.append(("M002", "neu", "Nothing."))  # labelled, transcribed, but its wav is missing
            eval_lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            tr_lines = []
            t = 6.2901
            cat_lines = []
            for i, (u, code, text) in enumerate(utts):
                uid = f"{dialog}_{u}"
                start, end = t, t + seconds + 1.0
                eval_lines += [
                    f"[{start:.4f} - {end:.4f}]\t{uid}\t{code}\t[2.5000, 2.5000, 2.5000]",
                    "C-E2:\tNeutral;\t()",
                    "C-E3:\tNeutral;\t()",
                    "C-F1:\tNeutral;\t(curious)",
                    "A-E3:\tval 3; act 2; dom  2;\t()",
                    "A-F1:\tval 3; act 2; dom  1;\t()",
                    "",
                ]
                tr_lines.append(f"{uid} [{start:08.4f}-{end:08.4f}]: {text}")
                if i == 1:
                    tr_lines.append("M: [BREATHING]")  # no utterance id: not an utterance
                cat_lines.append(f"{uid} :Neutral state; ()")
                t = end + 0.5
                if code not in _MAP:
                    dropped[code] = dropped.get(code, 0) + 1
                    continue
                if u == "M002":
                    missing.append(uid)
                    continue
                write_wav(sdir / "sentences" / "wav" / dialog / f"{uid}.wav", seconds + 0.05 * i, freq=200 + 20 * i)
                expected[uid] = {
                    "emotion": _MAP[code],
                    "text": text,
                    "gender": "female" if u[0] == "F" else "male",
                    "speaker": f"Ses{n:02d}{u[0]}",
                    "session": n,
                    "dialog": dialog,
                    "seconds": seconds + 0.05 * i,
                }
            (eva / f"{dialog}.txt").write_text("\n".join(eval_lines) + "\n")
            (eva / "Categorical" / f"{dialog}_e2_cat.txt").write_text("\n".join(cat_lines) + "\n")
            (eva / "Attribute" / f"{dialog}_e2_atr.txt").write_text(f"[1.0 - 2.0]\t{dialog}_F999\tneu\t[1, 1, 1]\n")
            (eva / "Self-evaluation" / f"{dialog}.anvil").write_text("<annotation/>\n")
            tdir = sdir / "dialog" / "transcriptions"
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / f"{dialog}.txt").write_text("\n".join(tr_lines) + "\n")
    return {"root": root, "expected": expected, "dropped": dropped, "missing": missing}


# ------------------------------------------------------------------------------------------
# MELD
# ------------------------------------------------------------------------------------------
MELD_HEADER = [
    "Sr No.",
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
    "Episode",
    "StartTime",
    "EndTime",
]
_MELD_ROWS = {
    "train": [
        (
            "Why do all you\u2019re coffee mugs have numbers on the bottom?",
            "Mark",
            "surprise",
            "positive",
            0,
            0,
            0.6,
            6,
        ),
        (
            "Oh. That\u2019s so Monica can keep track. \u201cThat\u201d way\u2026",
            "Rachel",
            "joy",
            "positive",
            0,
            1,
            0.5,
            2,
        ),
        ("Y\u2019know what? I\u2019m gonna go.", "Ross", "anger", "negative", 1, 0, 0.45, 6),
        ("Missing clip here.", "Joey", "sadness", "negative", 1, 1, 0.5, 6),  # no mp4 on disk
    ],
    "dev": [
        ("Oh my God, he\u2019s lost it. He\u2019s totally lost it.", "Phoebe", "sadness", "negative", 0, 0, 0.5, 6),
        ("What?", "Monica", "surprise", "negative", 0, 1, 0.35, 2),
    ],
    "test": [
        ("Why?!", "Chandler", "fear", "negative", 0, 0, 0.4, 6),
        ("Ew, gross.", "Rachel", "disgust", "negative", 0, 1, 0.55, 2),
        ("Okay.", "Ross", "neutral", "neutral", 1, 0, 0.3, 1),
    ],
}
_MELD_MAP = {
    "neutral": "neutral",
    "joy": "happy",
    "anger": "angry",
    "sadness": "sad",
    "surprise": "surprised",
    "disgust": "disgusted",
    "fear": "fearful",
}
_MELD_DIRS = {
    "train": ("train", "train_splits"),
    "dev": ("dev", "dev_splits_complete"),
    "test": ("test", "output_repeated_splits_test"),
}


def build_meld(root: Path, *, dev_encoding: str = "utf-8") -> dict:
    """MELD.Raw: the three CSVs (curly quotes, ellipsis), clips in the split folders (48 kHz;
    6-channel and stereo/mono), one clip missing in train, an extra ``final_videos_test*`` file in
    the test folder. ``dev_encoding="cp1252"`` writes the dev CSV mis-encoded."""
    root = Path(root) / "MELD.Raw"
    expected, missing = {}, []
    for split, rows in _MELD_ROWS.items():
        parent, folder = _MELD_DIRS[split]
        clip_dir = root / parent / folder
        clip_dir.mkdir(parents=True, exist_ok=True)
        csv_path = root / f"{split}_sent_emo.csv"
        with open(csv_path, "w", encoding=dev_encoding if split == "dev" else "utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(MELD_HEADER)
            for i, (text, spk, emo, sent, dia, utt, secs, ch) in enumerate(rows, 1):
                w.writerow([i, text, spk, emo, sent, dia, utt, 3, 19, "00:14:38,127", "00:14:40,378"])
                uid = f"{split}_dia{dia}_utt{utt}"
                if text == "Missing clip here.":
                    missing.append(uid)
                    continue
                write_mp4(clip_dir / f"dia{dia}_utt{utt}.mp4", secs, channels=ch, freq=300 + 40 * i)
                expected[uid] = {
                    "text": text,
                    "speaker": spk,
                    "emotion": _MELD_MAP[emo],
                    "seconds": secs,
                    "split": split,
                }
    # an extra file the test folder of the release contains; must be ignored
    (root / "test" / "output_repeated_splits_test" / "final_videos_testdia0_utt0.mp4").write_bytes(b"not a video")
    return {"root": root, "expected": expected, "missing": missing}


# ------------------------------------------------------------------------------------------
# SpeechCraft
# ------------------------------------------------------------------------------------------
_SC = [
    ("POD0000000001_S0000008", "Young Adult", "Male", "normal", "low", "fast", "Happy", "hello there"),
    ("POD0000000001_S0000009", "Middle-aged", "Female", "high", "normal", "normal", "Sad", "what a day"),
    ("YOU0000000315_S0000660", "Elderly", "Male", "low", "high", "slow", "Angry", "get out"),
    ("YOU0000000315_S0000661", "Teenager", "Female", "Normal", "Low", "Slow", "Other", "okay then"),
    ("AUD0000000003_S0000020", "Child", "Female", "high", "high", "fast", "Fearful", "no audio here"),
]


def build_speechcraft(root: Path) -> dict:
    """GigaSpeech-style audio tree (``audio/<source>/<P0000>/<segment>.wav``) and the same records
    as JSON (list), JSON lines and tab-separated ``key:{value}`` text; the last record's audio is
    missing."""
    root = Path(root) / "speechcraft"
    audio_root = root / "gigaspeech"
    recs, expected, missing = [], {}, []
    for i, (key, age, gender, pitch, volume, speed, emo, text) in enumerate(_SC):
        rel = f"audio/{key[:3].lower()}/P0000/{key}.wav"
        if "no audio" in text:
            missing.append(key)
        else:
            write_wav(audio_root / rel, 0.3 + 0.1 * i, freq=180 + 30 * i)
            expected[key] = {
                "age": age.lower(),
                "gender": gender.lower(),
                "pitch": pitch.lower(),
                "volume": volume.lower(),
                "speed": speed.lower(),
                "emotion": "neutral" if emo == "Other" else emo.lower(),
                "text": text,
                "speaker": key.rsplit("_S", 1)[0],
                "seconds": 0.3 + 0.1 * i,
            }
        recs.append(
            {
                "key": key,
                "path": rel,
                "age": age,
                "gender": gender,
                "pitch": pitch,
                "volume": volume,
                "speed": speed,
                "emotion": emo,
                "transcription": text,
            }
        )
    desc = root / "descriptions"
    desc.mkdir(parents=True)
    (desc / "records.json").write_text(json.dumps(recs, ensure_ascii=False, indent=1))
    (desc / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = []
    for r in recs:
        lines.append(
            r["path"]
            + "\t"
            + "\t".join(
                f"{k}:{{{r[k]}}}" for k in ("age", "gender", "pitch", "volume", "speed", "emotion", "transcription")
            )
        )
    lines.insert(2, "this line is garbage")
    (desc / "records.txt").write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "audio_root": audio_root,
        "descriptions": desc,
        "expected": expected,
        "missing": missing,
        "records": recs,
    }


# ------------------------------------------------------------------------------------------
# audiofolder
# ------------------------------------------------------------------------------------------
def build_audiofolder(root: Path, *, per_split: bool = False) -> dict:
    """A user's corpus: wavs + metadata.csv (raw labels "joy"/"mad"/"calm"); either one metadata
    file with a ``split`` column or one folder per split."""
    root = Path(root) / "mycorpus"
    rows = [
        ("a/0001.wav", "joy", "spk1", "hi there", "train", "female"),
        ("a/0002.wav", "mad", "spk1", "go away", "train", "female"),
        ("b/0003.wav", "calm", "spk2", "fine", "test", "male"),
        ("b/0004.wav", "joy", "spk2", "yay", "test", "Male"),
    ]
    expected = {}
    for split in ("train", "test"):
        base = root / split if per_split else root
        sel = [r for r in rows if r[4] == split]
        for i, (f, label, spk, text, _, gender) in enumerate(sel):
            write_wav(base / f, 0.3 + 0.1 * i)
        if per_split:
            _write_meta(base / "metadata.csv", [r[:4] + (r[5],) for r in sel], with_split=False)
    if not per_split:
        _write_meta(root / "metadata.csv", rows, with_split=True)
    for f, label, spk, text, split, gender in rows:
        expected[str(Path(f).with_suffix(""))] = {
            "raw": label,
            "speaker": spk,
            "text": text,
            "split": split,
            "gender": gender.lower(),
        }
    return {"root": root, "expected": expected}


def _write_meta(path: Path, rows, with_split: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "label", "speaker", "transcript"] + (["split"] if with_split else []) + ["gender"])
        for r in rows:
            if with_split:
                w.writerow([r[0], r[1], r[2], r[3], r[4], r[5]])
            else:
                w.writerow([r[0], r[1], r[2], r[3], r[4]])


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------
# Rehearsal: the real layouts filled with synthetic speech, and local stand-ins for the Hub models
# ------------------------------------------------------------------------------------------
_IEMOCAP_CODES = {"neutral": "neu", "happy": "hap", "angry": "ang", "sad": "sad"}
_MELD_CODES = {"neutral": "neutral", "happy": "joy", "angry": "anger", "sad": "sadness"}
_SC_WORDS = {
    "young adult": "Young Adult",
    "middle-aged": "Middle-aged",
    "elderly": "Elderly",
    "teenager": "Teenager",
    "child": "Child",
}


def speech_rows(corpus_root: Path | None, n: int, seed: int = 0) -> list[dict]:
    """``n`` utterances of synthetic speech with their labels: from a trustser synthetic corpus
    (espeak-ng speech, all splits) when ``corpus_root`` is given, else harmonic tones whose pitch
    and level follow the descriptors (for machines without espeak-ng)."""
    if corpus_root is not None:
        rows = []
        for split in ("reference", "train", "dev", "test"):
            meta = Path(corpus_root) / split / "metadata.csv"
            with open(meta, newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    wav, sr = sf.read(str(meta.parent / r["file_name"]), dtype="float32")
                    rows.append(
                        {
                            **{
                                k: r[k]
                                for k in ("text", "emotion", "speaker", "gender", "age", "pitch", "volume", "speed")
                            },
                            "wav": wav,
                            "sr": sr,
                        }
                    )
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        return [rows[i] for i in order[:n]]
    from ser_slm_fixtures import make_rows

    out = []
    for r in make_rows(n, seed):
        out.append(
            {
                **{k: r[k] for k in ("text", "emotion", "speaker", "gender", "age", "pitch", "volume", "speed")},
                "wav": r["audio"]["array"],
                "sr": r["audio"]["sampling_rate"],
            }
        )
    return out


def _resampled(wav: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wav
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), sr, target).numpy()


def build_speechcraft_recipe_tree(root: Path, rows: list[dict]) -> Path:
    """What ``pretrain_root`` of the real configs points at: SpeechCraft description records (JSON
    lines, SpeechCraft's capitalised values) next to their audio in the GigaSpeech layout
    (``audio/<source>/P0000/<segment>.wav``, 16 kHz)."""
    root = Path(root) / "speechcraft"
    lines = []
    for i, r in enumerate(rows):
        key = f"{('POD', 'YOU', 'AUD')[i % 3]}{i // 3:010d}_S{i:07d}"
        rel = f"audio/{key[:3].lower()}/P0000/{key}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / rel), _resampled(r["wav"], r["sr"], 16000), 16000, subtype="PCM_16")
        lines.append(
            json.dumps(
                {
                    "key": key,
                    "path": rel,
                    "age": _SC_WORDS.get(r["age"], r["age"].title()),
                    "gender": r["gender"].title(),
                    "pitch": r["pitch"].title(),
                    "volume": r["volume"].title(),
                    "speed": r["speed"].title(),
                    "emotion": r["emotion"].title(),
                    "transcription": r["text"],
                    "speaker": r["speaker"],
                }
            )
        )
    (root / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def build_iemocap_recipe_tree(root: Path, rows: list[dict], *, per_dialog: int = 4) -> Path:
    """``IEMOCAP_full_release``: five sessions of dialogs, EmoEvaluation lines with evaluator
    comments, transcriptions, and each utterance's wav (16 kHz PCM, readable by soundfile without
    FFmpeg) under ``sentences/wav/<dialog>/``; every fifth utterance is labelled ``fru`` (dropped)."""
    root = Path(root) / "IEMOCAP_full_release"
    per_session = max(1, len(rows) // 5)
    for n in range(1, 6):
        sdir = root / f"Session{n}"
        chunk = rows[(n - 1) * per_session : n * per_session]
        dialogs = [chunk[i : i + per_dialog] for i in range(0, len(chunk), per_dialog)]
        for d, utts in enumerate(dialogs):
            dialog = f"Ses{n:02d}{'F' if d % 2 == 0 else 'M'}_{'impro' if d % 2 == 0 else 'script'}{d + 1:02d}"
            eval_lines, tr_lines, t = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""], [], 4.0
            for i, r in enumerate(utts):
                letter = "F" if r["gender"] == "female" else "M"
                uid = f"{dialog}_{letter}{i:03d}"
                wav = _resampled(r["wav"], r["sr"], 16000)
                start, end = t, t + len(wav) / 16000
                code = "fru" if (n + i) % 5 == 0 else _IEMOCAP_CODES[r["emotion"]]
                eval_lines += [
                    f"[{start:.4f} - {end:.4f}]\t{uid}\t{code}\t[2.5000, 3.0000, 2.5000]",
                    "C-E2:\tNeutral;\t()",
                    "A-E3:\tval 3; act 2; dom  2;\t()",
                    "",
                ]
                tr_lines.append(f"{uid} [{start:08.4f}-{end:08.4f}]: {r['text']}")
                t = end + 0.7
                path = sdir / "sentences" / "wav" / dialog / f"{uid}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), wav, 16000, subtype="PCM_16")
            eva = sdir / "dialog" / "EmoEvaluation"
            for sub in ("Categorical", "Attribute", "Self-evaluation"):
                (eva / sub).mkdir(parents=True, exist_ok=True)
            (eva / f"{dialog}.txt").write_text("\n".join(eval_lines) + "\n")
            tdir = sdir / "dialog" / "transcriptions"
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / f"{dialog}.txt").write_text("\n".join(tr_lines) + "\n")
    return root


def build_meld_recipe_tree(root: Path, rows: dict[str, list[dict]]) -> Path:
    """``MELD.Raw``: the three ``*_sent_emo.csv`` files (MELD's columns) and one mp4 per utterance
    in the split folders, as the release has them: an H.264 picture and 48 kHz six-channel AAC."""
    root = Path(root) / "MELD.Raw"
    for split, split_rows in rows.items():
        parent, folder = _MELD_DIRS[split]
        clip_dir = root / parent / folder
        clip_dir.mkdir(parents=True, exist_ok=True)
        with open(root / f"{split}_sent_emo.csv", "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(MELD_HEADER)
            for i, r in enumerate(split_rows):
                dia, utt = i // 3, i % 3
                w.writerow(
                    [
                        i + 1,
                        r["text"],
                        r["speaker"],
                        _MELD_CODES[r["emotion"]],
                        "neutral",
                        dia,
                        utt,
                        1,
                        1,
                        "00:00:01,000",
                        "00:00:03,000",
                    ]
                )
                wav = _resampled(r["wav"], r["sr"], 48000)
                src = clip_dir / f"dia{dia}_utt{utt}.src.wav"
                sf.write(str(src), np.repeat(wav[:, None], 6, axis=1), 48000, subtype="PCM_16")
                subprocess.run(
                    [
                        "ffmpeg",
                        "-y",
                        "-loglevel",
                        "error",
                        "-f",
                        "lavfi",
                        "-i",
                        "color=c=black:s=32x32:r=5",
                        "-i",
                        str(src),
                        "-shortest",
                        "-map",
                        "0:v",
                        "-map",
                        "1:a",
                        "-c:v",
                        "libx264",
                        "-pix_fmt",
                        "yuv420p",
                        "-c:a",
                        "aac",
                        "-ac",
                        "6",
                        "-ar",
                        "48000",
                        str(clip_dir / f"dia{dia}_utt{utt}.mp4"),
                    ],
                    check=True,
                )
                src.unlink()
    return root


def save_stand_ins(root: Path, texts: list[str], *, seed: int = 0) -> dict[str, str]:
    """Tiny randomly initialised models saved where the real configs' Hub ids would be fetched
    from, in the same architectures and file layouts: HuBERT with its feature extractor, a
    Llama-architecture LM with a byte-level BPE tokenizer (no ``<audio>`` token: the preset adds
    it), a wav2vec2 ``audio-classification`` gender model (SpeechCraft's layout) and an
    audEERING-style age/gender model. Returns ``{setting: folder}``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        HubertConfig,
        HubertModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForSequenceClassification,
    )

    from trustser.annotation.classifiers import _age_gender_classes
    from trustser.descriptors import build_caption

    root = Path(root)
    torch.manual_seed(seed)
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    out = {}
    # facebook/hubert-large-ll60k
    hub = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        feat_extract_norm="layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True,
    )
    HubertModel(hub).save_pretrained(root / "hubert-large-ll60k")
    fe.save_pretrained(root / "hubert-large-ll60k")
    out["audio_model"] = str(root / "hubert-large-ll60k")
    # meta-llama/Llama-3.1-8B-Instruct
    samples = [
        build_caption(
            t,
            "neutral",
            {"pitch": "high", "volume": "low", "speed": "normal", "gender": "female", "age": "young adult"},
        )
        for t in texts
    ] + list(texts)
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        samples * 2,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", clean_up_tokenization_spaces=False
    )
    llama = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(llama).save_pretrained(root / "Llama-3.1-8B-Instruct")
    tok.save_pretrained(root / "Llama-3.1-8B-Instruct")
    out["text_model"] = str(root / "Llama-3.1-8B-Instruct")
    w2v = dict(
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
    )
    # alefiury/wav2vec2-large-xlsr-53-gender-recognition-librispeech
    gender = Wav2Vec2ForSequenceClassification(
        Wav2Vec2Config(num_labels=2, id2label={0: "female", 1: "male"}, label2id={"female": 0, "male": 1}, **w2v)
    )
    gender.save_pretrained(root / "wav2vec2-large-xlsr-53-gender-recognition-librispeech")
    fe.save_pretrained(root / "wav2vec2-large-xlsr-53-gender-recognition-librispeech")
    out["gender_model"] = str(root / "wav2vec2-large-xlsr-53-gender-recognition-librispeech")
    # audeering/wav2vec2-large-robust-24-ft-age-gender
    age = _age_gender_classes()(Wav2Vec2Config(**w2v))
    age.save_pretrained(root / "wav2vec2-large-robust-24-ft-age-gender")
    fe.save_pretrained(root / "wav2vec2-large-robust-24-ft-age-gender")
    out["age_model"] = str(root / "wav2vec2-large-robust-24-ft-age-gender")
    return out


def build_rehearsal(root: Path, corpus_root: Path | None = None, *, meld: bool = True) -> dict:
    """Everything the rehearsal of the real configs reads: the SpeechCraft, IEMOCAP and (with
    ``meld``) MELD trees filled with synthetic speech, and the stand-in models. Returns the paths."""
    root = Path(root)
    rows = speech_rows(corpus_root, 32 + 40 + (26 if meld else 0))
    out = {
        "speechcraft": str(build_speechcraft_recipe_tree(root, rows[:32])),
        "iemocap": str(build_iemocap_recipe_tree(root, rows[32:72])),
    }
    if meld:
        m = rows[72:]
        out["meld"] = str(build_meld_recipe_tree(root, {"train": m[:16], "dev": m[16:20], "test": m[20:26]}))
    out["models"] = save_stand_ins(root / "stand-ins", [r["text"] for r in rows])
    return out


if __name__ == "__main__":  # python tests/fixtures_real.py OUT [SYNTHETIC_CORPUS] [--no-meld]: the rehearsal inputs
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(
        json.dumps(
            build_rehearsal(Path(args[0]), Path(args[1]) if len(args) > 1 else None, meld="--no-meld" not in sys.argv)
        )
    )
