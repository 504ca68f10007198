"""MELD (``MELD.Raw``) in the common schema, 7 classes.

Labels come from ``{train,dev,test}_sent_emo.csv``; audio from ``dia{D}_utt{U}.mp4`` clips in the
split folders ``train_splits``, ``dev_splits_complete`` and ``output_repeated_splits_test``, found by
name anywhere under the root (copies of MELD place them differently). The clips are video files
with 48 kHz (sometimes 6-channel) audio, which ``datasets.Audio`` cannot decode reliably, so each
clip is decoded once at load time (torchcodec/ffmpeg, down-mixed, resampled to 16 kHz) and
stored in the Arrow cache as 16-bit WAV bytes.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import numpy as np

from ..audio import TARGET_SR
from .schema import (
    CorpusStats,
    build_dataset_dict,
    check_on_unknown,
    file_manifest,
    make_row,
    read_text,
    require_dir,
    wav_bytes,
)

logger = logging.getLogger("trustser.data")

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
REQUIRED_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")


def find_by_name(root: Path, file_names: set[str], dir_names: set[str]) -> dict[str, list[Path]]:
    """Every file/folder under ``root`` with one of the given names (clip folders are not descended)."""
    found: dict[str, list[Path]] = {n: [] for n in file_names | dir_names}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            if f in file_names:
                found[f].append(Path(dirpath) / f)
        for d in list(dirnames):
            if d in dir_names:
                found[d].append(Path(dirpath) / d)
                dirnames.remove(d)
    return found


def read_csv_text(path: Path, stats: CorpusStats) -> str:
    """The CSV as text: UTF-8 (BOM tolerated); only the lines that are not valid UTF-8 are read
    as cp1252 (MELD's CSVs carry such lines), noted with their numbers (``read_text``)."""
    return read_text(path, stats, fallback="cp1252")


def repair_mojibake(text: str) -> str:
    """Undoes UTF-8 text that was decoded as cp1252/latin-1 ("heâ€™s" -> "he’s"); other text is
    returned unchanged (the round trip fails or changes nothing)."""
    for enc in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(enc).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if fixed != text:
            return fixed
    return text


def decode_clip(path: str | os.PathLike, target_sr: int = TARGET_SR) -> np.ndarray:
    """Mono float32 at ``target_sr`` from the audio stream of a video/audio file: ffmpeg
    resamples, the channels are averaged (ffmpeg's 5.1 -> mono matrix sums channels and can clip)."""
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(str(path), sample_rate=target_sr).get_all_samples()
    wav = samples.data.numpy()  # (channels, samples)
    return wav.mean(axis=0).astype(np.float32, copy=False)


def _clip_row(rec: dict) -> dict | None:
    try:
        wav = decode_clip(rec["path"])
    except Exception as exc:  # a corrupt clip must not end the corpus build
        logger.warning("MELD: %s: unreadable clip skipped (%s: %s)", rec["path"], type(exc).__name__, exc)
        return None
    if wav.size == 0:
        logger.warning("MELD: %s: clip has no audio samples; skipped", rec["path"])
        return None
    return make_row(
        rec["id"],
        {"path": f"{rec['id']}.wav", "bytes": wav_bytes(wav)},
        text=rec["text"],
        emotion=rec["emotion"],
        speaker=rec["speaker"],
    )


def load_meld(
    root,
    *,
    splits=("train", "dev", "test"),
    repair_text: bool = False,
    clip_dirs: dict | None = None,
    on_unknown: str = "error",
    cache_dir=None,
    num_proc: int | None = None,
):
    """MELD, 7 classes (EMOTION_MAPS["meld"]). Ids are ``<split>_dia<D>_utt<U>``; ``speaker`` is
    the character name; gender is unknown (""). Clips listed in a CSV but absent on disk are
    reported (``missing_audio``) and skipped. ``repair_text=True`` undoes mojibake; by default
    the text is kept as the CSV has it. ``clip_dirs={"train": path, ...}`` overrides the search.
    An emotion outside MELD's seven is a ValueError naming file and line (``on_unknown="skip"``:
    the line is skipped and counted)."""
    root = require_dir(root, "MELD root")
    bad = [s for s in splits if s not in SPLIT_FILES]
    if bad:
        raise ValueError(f"unknown MELD splits {bad}; known: {list(SPLIT_FILES)}")
    options = {
        "splits": list(splits),
        "repair_text": repair_text,
        "clip_dirs": {k: str(v) for k, v in (clip_dirs or {}).items()},
    }
    stats = CorpusStats("meld", str(root), options, on_unknown=check_on_unknown(on_unknown))
    options["on_unknown"] = on_unknown
    found = find_by_name(root, {SPLIT_FILES[s][0] for s in splits}, {SPLIT_FILES[s][1] for s in splits})

    read_files: list[Path] = []
    records: dict[str, list[dict]] = {}
    for split in splits:
        csv_name, dir_name = SPLIT_FILES[split]
        csv_path = _unique(found[csv_name], csv_name, root, stats)
        if clip_dirs and split in clip_dirs:
            clip_dir = require_dir(clip_dirs[split], f"MELD {split} clip folder")
        else:
            clip_dir = _unique(found[dir_name], dir_name, root, stats)
        read_files.append(csv_path)
        records[split] = []
        seen = set()
        text = read_csv_text(csv_path, stats)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing_cols = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise ValueError(
                f"{csv_path}: not a MELD CSV, missing columns {missing_cols} (header: {reader.fieldnames})"
            )
        for row in reader:
            lineno = reader.line_num
            try:
                dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            except (TypeError, ValueError):
                stats.bad_line(
                    csv_path,
                    lineno,
                    f"Dialogue_ID/Utterance_ID not integers: {row.get('Dialogue_ID')!r}/{row.get('Utterance_ID')!r}",
                )
                continue
            raw_label = (row["Emotion"] or "").strip()
            emotion = stats.map_label("meld", raw_label, csv_path, lineno)
            if emotion is None:
                continue
            uid = f"{split}_dia{dia}_utt{utt}"
            if uid in seen:
                stats.bad_line(csv_path, lineno, f"duplicate utterance dia{dia}_utt{utt}")
                continue
            seen.add(uid)
            clip = clip_dir / f"dia{dia}_utt{utt}.mp4"
            if not clip.is_file():
                stats.missing_audio.append(uid)
                continue
            read_files.append(clip)
            utterance = row["Utterance"] or ""
            records[split].append(
                {
                    "id": uid,
                    "path": str(clip),
                    "emotion": emotion,
                    "speaker": (row["Speaker"] or "").strip(),
                    "text": repair_mojibake(utterance) if repair_text else utterance,
                }
            )
    return build_dataset_dict(
        stats,
        records,
        manifest=file_manifest(read_files),
        options=options,
        make=_clip_row,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )


def _unique(paths: list[Path], name: str, root: Path, stats: CorpusStats) -> Path:
    if not paths:
        raise FileNotFoundError(f"MELD: no {name!r} found anywhere under {root}")
    paths = sorted(paths)
    if len(paths) > 1:
        stats.notes.append(f"several {name!r} under the root; using {paths[0]} (others: {[str(p) for p in paths[1:]]})")
        logger.warning(stats.notes[-1])
    return paths[0]
