"""A new corpus from a folder of audio + ``metadata.csv`` (or any CSV), in the common schema.

The layout follows ``datasets``' audiofolder convention: ``root/metadata.csv`` with a
``file_name`` column (paths relative to the CSV's folder) and, optionally, a split column; or one
folder per split, each with its own ``metadata.csv``. Unlike the packaged audiofolder builder,
labels are validated and mapped (``label_map``) so the result has the canonical schema, and a bad
row is reported by file and line.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

from ..descriptors import EMOTIONS, SED_FIELDS, normalize_sed_value
from .meld import decode_clip, read_csv_text
from .schema import CorpusStats, build_dataset_dict, check_on_unknown, file_manifest, make_row, require_dir, wav_bytes


def _decoded_row(rec: dict) -> dict | None:
    import logging

    try:
        wav = decode_clip(rec["audio"])
    except Exception as exc:
        logging.getLogger("trustser.data").warning(
            "%s: unreadable audio skipped (%s: %s)", rec["audio"], type(exc).__name__, exc
        )
        return None
    if wav.size == 0:
        return None
    return {**rec, "audio": {"path": f"{rec['id']}.wav", "bytes": wav_bytes(wav)}}


class _LabelMapper:
    def __init__(self, label_map: Mapping | None, labels: Sequence[str] | None):
        self.label_map = dict(label_map) if label_map is not None else None
        self.lower_map = {str(k).strip().lower(): v for k, v in (label_map or {}).items()}
        self.labels = {str(l).strip().lower(): str(l) for l in (labels if labels is not None else EMOTIONS)}

    def known(self) -> list[str]:
        return sorted(map(str, self.label_map)) if self.label_map is not None else sorted(self.labels.values())

    def __call__(self, raw: str):
        """(True, label or None for dropped) or (False, None) for an unknown label."""
        if self.label_map is not None:
            if raw in self.label_map:
                return True, self.label_map[raw]
            if raw.lower() in self.lower_map:
                return True, self.lower_map[raw.lower()]
            return False, None
        if raw.lower() in self.labels:
            return True, self.labels[raw.lower()]
        return False, None


def _read_metadata(
    csv_path: Path,
    audio_dir: Path,
    split_default: str,
    cfg: dict,
    mapper: _LabelMapper,
    stats: CorpusStats,
    splits: dict,
    seen: set,
    read_files: list,
) -> None:
    read_files.append(csv_path)
    reader = csv.DictReader(io.StringIO(read_csv_text(csv_path, stats), newline=""))
    header = reader.fieldnames or []
    needed = [cfg["file_column"], cfg["label_column"]] + [
        c for c in (cfg["text_column"], cfg["speaker_column"], cfg["split_column"], cfg["id_column"]) if c
    ]
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; header is {header}")
    desc_cols = {f: (cfg["gender_column"] if f == "gender" else f) for f in SED_FIELDS}
    for row in reader:
        lineno = reader.line_num
        raw = (row[cfg["label_column"]] or "").strip()
        stats.labelled += 1
        ok, label = mapper(raw)
        if not ok:
            stats.unknown_labels[raw] += 1
            msg = f"unknown label {raw!r} in column {cfg['label_column']!r} (known: {mapper.known()})"
            if cfg["on_unknown"] == "error":
                raise ValueError(f"{csv_path}:{lineno}: {msg}; pass label_map=... or on_unknown='skip'")
            stats.bad_line(csv_path, lineno, msg)
            continue
        if label is None:
            stats.dropped_labels[raw] += 1
            continue
        rel = (row[cfg["file_column"]] or "").strip()
        if not rel:
            stats.bad_line(csv_path, lineno, f"empty {cfg['file_column']!r}")
            continue
        audio = Path(rel) if Path(rel).is_absolute() else audio_dir / rel
        uid = (
            (row[cfg["id_column"]] or "").strip()
            if cfg["id_column"]
            else str(Path(rel).with_suffix("")).replace("\\", "/")
        )
        if uid in seen:
            stats.bad_line(csv_path, lineno, f"duplicate id {uid!r}")
            continue
        seen.add(uid)
        if not audio.is_file():
            stats.missing_audio.append(uid)
            continue
        read_files.append(audio)
        values = {}
        for f, col in desc_cols.items():
            v = (row.get(col) or "").strip() if col else ""
            norm = normalize_sed_value(f, v) if v else None
            if v and norm is None:
                stats.invalid_values[f"{f}={v}"] += 1
            values[f] = norm or ""
        split = (row[cfg["split_column"]] or "").strip() if cfg["split_column"] else split_default
        if not split:
            stats.bad_line(csv_path, lineno, f"empty split column {cfg['split_column']!r}")
            continue
        splits.setdefault(split, []).append(
            make_row(
                uid,
                str(audio),
                text=(row[cfg["text_column"]] or "") if cfg["text_column"] else "",
                emotion=label,
                speaker=(row[cfg["speaker_column"]] or "").strip() if cfg["speaker_column"] else "",
                **values,
            )
        )


def _load(
    kind,
    root,
    sources,
    *,
    label_column,
    label_map,
    labels,
    on_unknown,
    text_column,
    speaker_column,
    gender_column,
    id_column,
    file_column,
    split_column,
    decode,
    cache_dir,
    num_proc,
):
    check_on_unknown(on_unknown)
    cfg = dict(
        label_column=label_column,
        text_column=text_column,
        speaker_column=speaker_column,
        gender_column=gender_column or "gender",
        id_column=id_column,
        file_column=file_column,
        split_column=split_column,
        on_unknown=on_unknown,
    )
    options = {**cfg, "label_map": label_map, "labels": list(labels) if labels is not None else None, "decode": decode}
    stats = CorpusStats(kind, str(root), options)
    mapper = _LabelMapper(label_map, labels)
    splits: dict[str, list] = {}
    seen: set[str] = set()
    read_files: list[Path] = []
    for csv_path, audio_dir, split in sources:
        _read_metadata(csv_path, audio_dir, split, cfg, mapper, stats, splits, seen, read_files)
    return build_dataset_dict(
        stats,
        splits,
        manifest=file_manifest(read_files),
        options=options,
        make=_decoded_row if decode else None,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )


def load_audiofolder(
    root,
    *,
    label_column: str = "emotion",
    label_map: Mapping[str, str | None] | None = None,
    labels: Sequence[str] | None = None,
    on_unknown: str = "error",
    text_column: str | None = None,
    speaker_column: str | None = None,
    gender_column: str | None = None,
    id_column: str | None = None,
    file_column: str = "file_name",
    split_column: str | None = None,
    metadata: str = "metadata.csv",
    default_split: str = "train",
    decode: bool = False,
    cache_dir=None,
    num_proc: int | None = None,
):
    """A folder corpus. ``root/metadata.csv`` (rows go to ``split_column``'s value, else
    ``default_split``), or, without it, ``root/<split>/metadata.csv`` for each split folder.

    Labels: ``label_map`` maps raw -> canonical emotion or any user label (None drops and counts
    the row); without it labels must be ``labels`` (default: the canonical EMOTIONS), matched
    case-insensitively. An unknown label raises ValueError naming file, line and label, or is
    reported and skipped with ``on_unknown="skip"``. Columns named ``gender`` (or
    ``gender_column``), ``pitch``, ``volume``, ``speed``, ``age`` are read and normalised to the
    descriptor vocabulary. ``decode=True`` decodes each file at load time into the cache (for
    video containers such as mp4 that ``datasets.Audio`` cannot read)."""
    root = require_dir(root, "audiofolder root")
    top = root / metadata
    if top.is_file():
        sources = [(top, root, default_split)]
    else:
        sources = [(d / metadata, d, d.name) for d in sorted(root.iterdir()) if d.is_dir() and (d / metadata).is_file()]
        if not sources:
            raise FileNotFoundError(f"audiofolder: neither {top} nor any {root}/<split>/{metadata} exists")
    return _load(
        "audiofolder",
        root,
        sources,
        label_column=label_column,
        label_map=label_map,
        labels=labels,
        on_unknown=on_unknown,
        text_column=text_column,
        speaker_column=speaker_column,
        gender_column=gender_column,
        id_column=id_column,
        file_column=file_column,
        split_column=split_column,
        decode=decode,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )


def load_csv(root, *, audio_root=None, default_split: str = "train", **options):
    """One CSV file (``root`` is its path); audio paths are relative to ``audio_root`` (default:
    the CSV's folder). Other options as ``load_audiofolder``."""
    path = Path(root).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"csv corpus: {path} does not exist or is not a file")
    audio_dir = require_dir(audio_root, "csv audio root") if audio_root is not None else path.parent
    defaults = dict(
        label_column="emotion",
        label_map=None,
        labels=None,
        on_unknown="error",
        text_column=None,
        speaker_column=None,
        gender_column=None,
        id_column=None,
        file_column="file_name",
        split_column=None,
        decode=False,
        cache_dir=None,
        num_proc=None,
    )
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"load_csv: unknown options {sorted(unknown)}")
    return _load("csv", path, [(path, audio_dir, default_split)], **{**defaults, **options})
