"""SpeechCraft description records joined with their (GigaSpeech) audio, in the common schema.

A record carries age, gender, pitch, volume, speed, emotion and transcription plus a key/id and/or
a relative audio path. Accepted files: JSON (a list of records, or an object mapping key ->
record), JSON lines, and the tab-separated ``key:{value}`` text form
(``POD0000000001_S0000008.wav<TAB>age:{Young Adult}<TAB>gender:{Male}...``). Values are normalised
to the descriptor vocabulary; emotions through ``EMOTION_MAPS["speechcraft"]``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from ..descriptors import SED_FIELDS, map_emotion, normalize_sed_value
from .schema import (
    CorpusStats,
    build_dataset_dict,
    build_iterable_dataset_dict,
    check_on_unknown,
    file_manifest,
    make_row,
    read_text,
    require_dir,
    seeded_fraction,
)

logger = logging.getLogger("trustser.data")

DESCRIPTION_SUFFIXES = (".json", ".jsonl", ".txt", ".tsv")
AUDIO_EXTENSIONS = (".wav", ".flac", ".opus", ".mp3", ".ogg", ".m4a")
_KEY_FIELDS = ("key", "id", "utt", "utt_id", "segment_id", "sid", "name")
_PATH_FIELDS = ("path", "audio", "audio_path", "wav", "wav_path", "file", "file_name", "filepath")
_TEXT_FIELDS = ("transcription", "transcript", "text")
_PAIR = re.compile(r"(?P<key>[A-Za-z_][\w ]*?)\s*:\s*\{(?P<value>.*?)\}(?=\s*(?:\t|$))")
_GIGA_SEGMENT = re.compile(r"^(?P<rec>.+)_S\d+$")


def iter_records(path: Path, stats: CorpusStats | None = None) -> Iterator[tuple[int, dict]]:
    """(line number or index, record with lower-cased keys) for each record in a description file."""

    def bad(lineno, reason):
        if stats is not None:
            stats.bad_line(path, lineno, reason)
        else:
            logger.warning("skipped %s:%d: %s", path, lineno, reason)

    text = read_text(path, stats, fallback="cp1252", universal_newlines=True)
    stripped = text.lstrip()
    first_line = stripped.split("\n", 1)[0].strip()
    if path.suffix.lower() == ".jsonl" or (
        stripped.startswith("{")
        and _is_json_object(first_line)
        and (path.suffix.lower() != ".json" or "\n{" in stripped)
    ):
        yield from _json_lines(path, text, bad)
        return
    if path.suffix.lower() == ".json" or stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            items = [{"key": k, **v} for k, v in data.items()]  # {key: record, ...}
        elif isinstance(data, dict):
            items = [data]  # a single record
        elif isinstance(data, list):
            items = data
        else:
            raise ValueError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")
        for i, rec in enumerate(items, 1):
            if not isinstance(rec, dict):
                bad(i, f"record {i} is not an object")
                continue
            yield i, {str(k).strip().lower(): v for k, v in rec.items()}
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pairs = list(_PAIR.finditer(line))
        if not pairs:
            bad(lineno, f"no 'key:{{value}}' fields: {line.strip()[:80]!r}")
            continue
        rec = {m.group("key").strip().lower(): m.group("value") for m in pairs}
        lead = line[: pairs[0].start()].strip().strip("\t")
        if lead:
            rec.setdefault("path", lead)
        yield lineno, rec


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _json_lines(path, text, bad):
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            bad(lineno, f"invalid JSON line ({exc.msg})")
            continue
        if not isinstance(rec, dict):
            bad(lineno, "JSON line is not an object")
            continue
        yield lineno, {str(k).strip().lower(): v for k, v in rec.items()}


class _AudioResolver:
    """Finds a record's audio: a relative path joined with the audio root, or (for a bare key)
    the file named ``<key>.<ext>`` anywhere under it (one directory walk, on first need)."""

    def __init__(self, audio_root: Path):
        self.audio_root = audio_root
        self._index: dict[str, Path] | None = None

    def __call__(self, rel: str | None, key: str | None) -> Path | None:
        if rel:
            p = Path(rel)
            p = p if p.is_absolute() else self.audio_root / p
            if p.is_file():
                return p
            if not p.suffix:
                for ext in AUDIO_EXTENSIONS:
                    if p.with_suffix(ext).is_file():
                        return p.with_suffix(ext)
            return None
        if key:
            return self.index().get(key)
        return None

    def index(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for dirpath, _, files in os.walk(self.audio_root):
                for f in files:
                    stem, ext = os.path.splitext(f)
                    if ext.lower() in AUDIO_EXTENSIONS:
                        self._index.setdefault(stem, Path(dirpath) / f)
        return self._index


def _first(rec: dict, names) -> str | None:
    for n in names:
        v = rec.get(n)
        if v not in (None, ""):
            return str(v).strip()
    return None


def record_to_row(rec: dict, where: str, resolve: _AudioResolver, stats: CorpusStats) -> dict | None:
    """The schema row of one record, or None (reported) when its emotion or audio is unusable."""
    rel = _first(rec, _PATH_FIELDS)
    key = _first(rec, _KEY_FIELDS) or (Path(rel).stem if rel else None)
    if not key:
        _bad(stats, where, "record has neither a key/id nor an audio path")
        return None
    raw_emotion = _first(rec, ("emotion",))
    try:
        emotion = map_emotion("speechcraft", raw_emotion or "")
    except KeyError:
        path, _, line = where.rpartition(":")
        stats.unknown_label(
            path, int(line), f"unknown SpeechCraft emotion {raw_emotion!r} for {key}", raw_emotion or ""
        )
        return None
    stats.labelled += 1
    if emotion is None:
        stats.dropped_labels[raw_emotion.lower()] += 1
        return None
    audio = resolve(rel, key)
    if audio is None:
        stats.missing_audio.append(key)
        return None
    values = {}
    for f in SED_FIELDS:
        raw = _first(rec, (f,))
        v = normalize_sed_value(f, raw) if raw is not None else None
        if raw is not None and v is None:
            stats.invalid_values[f"{f}={raw}"] += 1
        values[f] = v or ""
    speaker = _first(rec, ("speaker", "spk", "speaker_id"))
    if speaker is None:
        m = _GIGA_SEGMENT.match(key)
        speaker = m.group("rec") if m else ""
    return make_row(key, str(audio), text=_first(rec, _TEXT_FIELDS) or "", emotion=emotion, speaker=speaker, **values)


def _bad(stats: CorpusStats, where: str, reason: str) -> None:
    path, _, line = where.rpartition(":")
    stats.bad_line(path, int(line), reason)


def _split_of(row_id: str, dev_fraction: float, seed: int) -> str:
    return "dev" if dev_fraction > 0 and seeded_fraction(seed, row_id) < dev_fraction else "train"


def _stream_rows(
    files: list[str], audio_root: str, split: str, dev_fraction: float, seed: int, root: str, on_unknown: str = "error"
) -> Iterator[dict]:
    stats = CorpusStats("speechcraft", root, on_unknown=on_unknown)
    resolve = _AudioResolver(Path(audio_root))
    seen = set()
    for f in files:
        for lineno, rec in iter_records(Path(f), stats):
            row = record_to_row(rec, f"{f}:{lineno}", resolve, stats)
            if row is None or row["id"] in seen or _split_of(row["id"], dev_fraction, seed) != split:
                continue
            seen.add(row["id"])
            yield row
    if stats.missing_audio:
        logger.warning(
            "speechcraft/%s (streaming): %d records without audio skipped: %s",
            split,
            len(stats.missing_audio),
            ", ".join(stats.missing_audio[:20]),
        )


def load_speechcraft(
    root,
    *,
    descriptions=None,
    audio_root=None,
    streaming: bool = False,
    dev_fraction: float = 0.0,
    seed: int = 0,
    on_unknown: str = "error",
    cache_dir=None,
    num_proc: int | None = None,
):
    """SpeechCraft records in the common schema. An emotion outside ``EMOTION_MAPS["speechcraft"]``
    is a ValueError naming file and line (``on_unknown="skip"``: the record is skipped and counted).

    ``descriptions``: a description file or a list of them (relative to ``root`` or absolute);
    default every ``*.json``/``*.jsonl``/``*.txt``/``*.tsv`` directly in ``root``. ``audio_root``
    (default ``root``) is where relative audio paths (GigaSpeech layout) are joined, or where a
    bare key ``K`` is looked up as ``K.<wav|flac|opus|...>``. Split ``train`` (and ``dev``: the
    records whose seeded hash of the id falls under ``dev_fraction``, the same in streaming and
    map-style loading). ``speaker``: the record's speaker field, else the GigaSpeech source
    recording (the id without its ``_S<n>`` segment suffix), as GigaSpeech has no speaker labels.
    ``streaming=True`` returns an ``IterableDatasetDict`` (records are parsed while iterating;
    skips are logged, not counted in the attached statistics)."""
    root = require_dir(root, "SpeechCraft root")
    audio_root = require_dir(audio_root if audio_root is not None else root, "SpeechCraft audio root")
    if descriptions is None:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in DESCRIPTION_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"SpeechCraft: no description files (*{', *'.join(DESCRIPTION_SUFFIXES)}) in {root}"
            )
    else:
        items = [descriptions] if isinstance(descriptions, (str, os.PathLike)) else list(descriptions)
        files = []
        for d in items:
            p = Path(d) if Path(d).is_absolute() else root / d
            if not p.is_file():
                raise FileNotFoundError(f"SpeechCraft description file {p} does not exist")
            files.append(p)
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    options = {
        "descriptions": [str(f) for f in files],
        "audio_root": str(audio_root),
        "dev_fraction": dev_fraction,
        "seed": seed,
    }
    stats = CorpusStats("speechcraft", str(root), options, on_unknown=check_on_unknown(on_unknown))
    options["on_unknown"] = on_unknown

    if streaming:
        splits = ["train"] + (["dev"] if dev_fraction > 0 else [])
        stats.notes.append("streaming: skipped records are logged while iterating, not counted here")
        return build_iterable_dataset_dict(
            stats,
            {
                s: (
                    _stream_rows,
                    {
                        "files": [str(f) for f in files],
                        "audio_root": str(audio_root),
                        "split": s,
                        "dev_fraction": dev_fraction,
                        "seed": seed,
                        "root": str(root),
                        "on_unknown": on_unknown,
                    },
                )
                for s in splits
            },
        )

    resolve = _AudioResolver(audio_root)
    rows: dict[str, list[dict]] = {"train": [], "dev": []}
    seen: set[str] = set()
    for f in files:
        for lineno, rec in iter_records(f, stats):
            row = record_to_row(rec, f"{f}:{lineno}", resolve, stats)
            if row is None:
                continue
            if row["id"] in seen:
                stats.bad_line(f, lineno, f"duplicate record {row['id']}")
                continue
            seen.add(row["id"])
            rows[_split_of(row["id"], dev_fraction, seed)].append(row)
    manifest = file_manifest(list(files) + [r["audio"] for split in rows.values() for r in split])
    return build_dataset_dict(stats, rows, manifest=manifest, options=options, cache_dir=cache_dir, num_proc=num_proc)
