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
        ["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:r=5", "-i", str(tmp_wav),
         "-shortest", "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
         "-ac", str(channels), "-ar", str(sr), str(path)],
        check=True,
    )
    tmp_wav.unlink()


# ------------------------------------------------------------------------------------------
# IEMOCAP
# ------------------------------------------------------------------------------------------
# per session: dialog -> [(utterance suffix, label code, transcript)]
_IEMOCAP_DIALOGS = {
    "F_impro01": [("F000", "neu", "Excuse me."), ("M000", "hap", "Do you have your forms?"),
                  ("F001", "exc", "Yeah, I got them!"), ("M001", "fru", "Let me see them.")],
    "M_script01_1": [("F000", "ang", "Oh, stop it."), ("M000", "sad", "I miss him."),
                     ("M001", "xxx", "Well, okay."), ("F001", "oth", "Whatever.")],
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
                    "C-E2:\tNeutral;\t()", "C-E3:\tNeutral;\t()", "C-F1:\tNeutral;\t(curious)",
                    "A-E3:\tval 3; act 2; dom  2;\t()", "A-F1:\tval 3; act 2; dom  1;\t()", "",
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
                expected[uid] = {"emotion": _MAP[code], "text": text, "gender": "female" if u[0] == "F" else "male",
                                 "speaker": f"Ses{n:02d}{u[0]}", "session": n, "dialog": dialog,
                                 "seconds": seconds + 0.05 * i}
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
MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
               "Season", "Episode", "StartTime", "EndTime"]
_MELD_ROWS = {
    "train": [
        ("Why do all you\u2019re coffee mugs have numbers on the bottom?", "Mark", "surprise", "positive", 0, 0, 0.6, 6),
        ("Oh. That\u2019s so Monica can keep track. \u201cThat\u201d way\u2026", "Rachel", "joy", "positive", 0, 1, 0.5, 2),
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
_MELD_MAP = {"neutral": "neutral", "joy": "happy", "anger": "angry", "sadness": "sad",
             "surprise": "surprised", "disgust": "disgusted", "fear": "fearful"}
_MELD_DIRS = {"train": ("train", "train_splits"), "dev": ("dev", "dev_splits_complete"),
              "test": ("test", "output_repeated_splits_test")}


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
                expected[uid] = {"text": text, "speaker": spk, "emotion": _MELD_MAP[emo], "seconds": secs, "split": split}
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
            expected[key] = {"age": age.lower(), "gender": gender.lower(), "pitch": pitch.lower(),
                             "volume": volume.lower(), "speed": speed.lower(),
                             "emotion": "neutral" if emo == "Other" else emo.lower(), "text": text,
                             "speaker": key.rsplit("_S", 1)[0], "seconds": 0.3 + 0.1 * i}
        recs.append({"key": key, "path": rel, "age": age, "gender": gender, "pitch": pitch, "volume": volume,
                     "speed": speed, "emotion": emo, "transcription": text})
    desc = root / "descriptions"
    desc.mkdir(parents=True)
    (desc / "records.json").write_text(json.dumps(recs, ensure_ascii=False, indent=1))
    (desc / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = []
    for r in recs:
        lines.append(r["path"] + "\t" + "\t".join(f"{k}:{{{r[k]}}}" for k in
                                                   ("age", "gender", "pitch", "volume", "speed", "emotion", "transcription")))
    lines.insert(2, "this line is garbage")
    (desc / "records.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, "audio_root": audio_root, "descriptions": desc, "expected": expected, "missing": missing,
            "records": recs}


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
        expected[str(Path(f).with_suffix(""))] = {"raw": label, "speaker": spk, "text": text, "split": split,
                                                   "gender": gender.lower()}
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
