"""The common corpus schema and the machinery every loader shares to build it.

Every loader reduces its corpus to plain row dicts (``make_row``) and hands them, split by split,
to ``build_dataset_dict``, which runs ``Dataset.from_generator`` with an explicit fingerprint
computed from the files actually read (path, size, mtime) and the loader's options. A second load
of an unchanged corpus therefore hits the ``datasets`` cache; editing a label file, adding a clip or
changing an option builds a new cache entry.

What a loader dropped or skipped (labels outside the protocol, missing media, unparseable lines)
travels with the result as JSON in ``dataset.info.description`` of every split; ``corpus_stats``
reads it back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import datasets
import numpy as np

from ..audio import TARGET_SR

logger = logging.getLogger("trustser.data")

# Bumped when a loader's output for the same files would change (invalidates caches).
SCHEMA_VERSION = "1"

COLUMNS: tuple[str, ...] = ("id", "audio", "text", "emotion", "speaker", "gender", "pitch", "volume", "speed", "age")
OPTIONAL_COLUMNS: tuple[str, ...] = ("pitch", "volume", "speed", "age")


def corpus_features(sampling_rate: int = TARGET_SR) -> datasets.Features:
    """The features of every loader's splits (docs/ARCHITECTURE.md "Dataset schema")."""
    feats = {"id": datasets.Value("string"), "audio": datasets.Audio(sampling_rate=sampling_rate)}
    for name in COLUMNS[2:]:
        feats[name] = datasets.Value("string")
    return datasets.Features(feats)


FEATURES = corpus_features()


def make_row(
    id: str, audio: Any, *, text: str = "", emotion: str, speaker: str = "", gender: str = "", **optional: str
) -> dict:
    """One schema row; ``audio`` is a path (decoded lazily by ``datasets.Audio``) or
    ``{"path": name, "bytes": wav_bytes}`` for media decoded at load time."""
    unknown = set(optional) - set(OPTIONAL_COLUMNS)
    if unknown:
        raise TypeError(f"make_row: unknown columns {sorted(unknown)}")
    row = {
        "id": id,
        "audio": audio,
        "text": text or "",
        "emotion": emotion,
        "speaker": speaker or "",
        "gender": gender or "",
    }
    for name in OPTIONAL_COLUMNS:
        row[name] = optional.get(name) or ""
    return row


def wav_bytes(wav: np.ndarray, sampling_rate: int = TARGET_SR) -> bytes:
    """16-bit PCM WAV bytes of a mono float waveform (what decoded clips are cached as)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), sampling_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# Load statistics: what was kept, dropped and skipped, and why.
# ------------------------------------------------------------------------------------------
@dataclass
class CorpusStats:
    """Counts a loader reports; serialised into each split's ``info.description``.

    ``dropped_labels``: raw label -> count of utterances whose label the protocol drops
    (e.g. IEMOCAP ``fru``/``xxx``). ``missing_audio``: ids whose media file is absent.
    ``unreadable_audio``: ids whose media could not be decoded. ``unparseable``:
    ``"file:line: reason"`` entries. ``invalid_values``: ``"field=value"`` -> count of values
    outside the descriptor vocabulary (stored as ""). ``splits``: rows per split."""

    corpus: str
    root: str
    options: dict = field(default_factory=dict)
    labelled: int = 0
    dropped_labels: Counter = field(default_factory=Counter)
    unknown_labels: Counter = field(default_factory=Counter)
    missing_audio: list = field(default_factory=list)
    unreadable_audio: list = field(default_factory=list)
    unparseable: list = field(default_factory=list)
    invalid_values: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)
    splits: dict = field(default_factory=dict)
    bad_audio: list = field(default_factory=list)
    # what an unknown label is: "error" (ValueError naming file:line) or "skip" (reported and counted)
    on_unknown: str = "skip"

    def __post_init__(self):
        check_on_unknown(self.on_unknown)

    def map_label(self, corpus: str, raw: str, path: str | os.PathLike, lineno: int) -> str | None:
        """Canonical emotion of a labelled line; None (counted and reported) for labels the
        protocol drops or the corpus does not define."""
        from ..descriptors import map_emotion

        self.labelled += 1
        try:
            emotion = map_emotion(corpus, raw)
        except KeyError:
            self.unknown_label(path, lineno, f"unknown {corpus.upper()} emotion label {raw!r}", raw)
            return None
        if emotion is None:
            self.dropped_labels[raw.lower()] += 1
        return emotion

    def unknown_label(self, path: str | os.PathLike, lineno: int, reason: str, raw: str) -> None:
        """An unknown label: a ValueError naming file and line (``on_unknown="error"``), or counted,
        reported and the line skipped (``"skip"``)."""
        if self.on_unknown == "error":
            raise ValueError(f"{path}:{lineno}: {reason}; pass on_unknown='skip' to skip (and count) such lines")
        self.unknown_labels[raw] += 1
        self.bad_line(path, lineno, reason)

    def bad_line(self, path: str | os.PathLike, lineno: int, reason: str) -> None:
        msg = f"{path}:{lineno}: {reason}"
        self.unparseable.append(msg)
        logger.warning("skipped %s", msg)

    def to_dict(self) -> dict:
        return {
            "corpus": self.corpus,
            "root": self.root,
            "options": self.options,
            "labelled": self.labelled,
            "kept": sum(self.splits.values()),
            "splits": dict(self.splits),
            "dropped_labels": dict(sorted(self.dropped_labels.items())),
            "dropped_total": sum(self.dropped_labels.values()),
            "unknown_labels": dict(sorted(self.unknown_labels.items())),
            "missing_audio": list(self.missing_audio),
            "unreadable_audio": list(self.unreadable_audio),
            "unparseable": list(self.unparseable),
            "invalid_values": dict(sorted(self.invalid_values.items())),
            "notes": list(self.notes),
            "bad_audio": list(self.bad_audio),
        }

    def log_summary(self) -> None:
        d = self.to_dict()
        logger.info(
            "%s: kept %d (%s); dropped %d %s; missing audio %d; unreadable %d; unparseable lines %d",
            self.corpus,
            d["kept"],
            d["splits"],
            d["dropped_total"],
            d["dropped_labels"],
            len(self.missing_audio),
            len(self.unreadable_audio),
            len(self.unparseable),
        )
        if self.missing_audio:
            logger.warning(
                "%s: %d utterances without audio skipped: %s",
                self.corpus,
                len(self.missing_audio),
                ", ".join(self.missing_audio[:20]) + (" ..." if len(self.missing_audio) > 20 else ""),
            )


def check_on_unknown(value: str) -> str:
    if value not in ("error", "skip"):
        raise ValueError(f"on_unknown must be 'error' or 'skip', got {value!r}")
    return value


def read_text(
    path: str | os.PathLike,
    stats: CorpusStats | None = None,
    *,
    fallback: str | None = None,
    universal_newlines: bool = False,
) -> str:
    """A text file, decoded line by line as UTF-8 (a BOM tolerated). A line that is not valid
    UTF-8 is a ValueError naming the file and line, or, with ``fallback`` (e.g. ``"cp1252"``,
    latin-1 for the bytes it leaves undefined), that line alone is read in ``fallback`` and noted
    with its line number: the valid lines are never decoded otherwise. ``universal_newlines``:
    ``\r\n`` and ``\r`` become ``\n`` (as ``open()`` in text mode); CSV readers want them kept."""
    text = _decode_lines(path, stats, fallback)
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text


def _decode_lines(path, stats, fallback) -> str:
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines, bad = raw.split(b"\n"), []  # 0x0A never occurs inside a UTF-8 or cp1252 character
    for i, line in enumerate(lines):
        try:
            lines[i] = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if fallback is None:
                raise ValueError(
                    f"{path}:{i + 1}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                    "save the file as UTF-8"
                ) from exc
            bad.append(i + 1)
            lines[i] = "".join(bytes([b]).decode(fallback, errors="ignore") or chr(b) for b in line)
    note = (
        f"{path}: line(s) {bad[:20]}{' ...' if len(bad) > 20 else ''} ({len(bad)}) not valid UTF-8; "
        f"those lines read as {fallback}"
    )
    if stats is not None:
        stats.notes.append(note)
    logger.warning(note)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Audio validation: unusable clips found at load time, before any training
# ------------------------------------------------------------------------------------------
def audio_problem_of(cell, max_seconds: float | None = None, silence_dbfs: float = -60.0) -> str | None:
    """Why an undecoded ``audio`` cell (``{"bytes", "path"}``) cannot be trained on, or None: no
    such file, empty file, unreadable, no samples, non-finite samples, silent, longer than
    ``max_seconds``."""
    from ..audio import read_encoded_audio

    data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, Mapping) else (None, cell)
    if isinstance(cell, Mapping) and cell.get("array") is not None:  # decoded in memory
        wav, sr = np.asarray(cell["array"], dtype=np.float32), cell.get("sampling_rate")
        return _samples_problem(wav, sr, max_seconds, silence_dbfs)
    if data is None:
        if not path or not os.path.isfile(path):
            return "no such file"
        if os.path.getsize(path) == 0:
            return "empty file"
    elif len(data) == 0:
        return "empty file"
    try:
        wav, sr = read_encoded_audio(data if data is not None else path)
    except Exception as exc:
        return f"unreadable audio ({type(exc).__name__}: {str(exc)[:200]})"
    return _samples_problem(np.asarray(wav), sr, max_seconds, silence_dbfs)


def _samples_problem(wav: np.ndarray, sr, max_seconds, silence_dbfs) -> str | None:
    if wav.size == 0 or not sr:
        return "no samples"
    if not np.all(np.isfinite(wav)):
        return "non-finite (NaN/inf) samples"
    if float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) <= 10 ** (silence_dbfs / 20):
        return "silent"
    seconds = wav.shape[-1] / float(sr)
    if max_seconds is not None and seconds > max_seconds:
        return f"longer than {max_seconds:g} s ({seconds:.1f} s)"
    return None


def _problem_column(cell, max_seconds, silence_dbfs):
    return {"_audio_problem": audio_problem_of(cell, max_seconds, silence_dbfs) or ""}


def validate_audio(
    dataset,
    *,
    max_seconds: float | None = None,
    silence_dbfs: float = -60.0,
    num_proc: int | None = None,
    audio_column: str = "audio",
):
    """``dataset`` (a Dataset or DatasetDict from ``load_corpus``) without the rows whose audio is
    missing, empty, unreadable, without samples, non-finite, silent or longer than ``max_seconds``:
    each is logged with its file and reason and listed in the load statistics (``bad_audio``:
    ``"file: reason"``). Decodes every clip once, so a bad file is found before training instead of
    in the middle of it."""
    single = not isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict))
    splits = {str(dataset.split or "train"): dataset} if single else dict(dataset)
    out, found = {}, []
    for name, ds in splits.items():
        out[name], bad = _validate_split(ds, name, max_seconds, silence_dbfs, num_proc, audio_column)
        found += bad
    if found:
        try:
            payload = json.loads(next(iter(out.values())).info.description or "")
            payload["trustser_stats"]["bad_audio"] = payload["trustser_stats"].get("bad_audio", []) + found
            payload["trustser_stats"]["splits"].update({name: len(ds) for name, ds in out.items()})
            for ds in out.values():
                ds.info.description = json.dumps(payload, ensure_ascii=False)
        except (ValueError, KeyError, TypeError):  # not built by load_corpus: no statistics to record into
            pass
    return next(iter(out.values())) if single else datasets.DatasetDict(out)


def _validate_split(ds, name, max_seconds, silence_dbfs, num_proc, audio_column):
    if isinstance(ds, datasets.IterableDataset):
        raise ValueError(
            "validate_audio needs a map-style dataset (the training collators reject the bad clips of a streamed one)"
        )
    feature = ds.features.get(audio_column)
    raw = (
        ds.cast_column(audio_column, datasets.Audio(sampling_rate=feature.sampling_rate, decode=False))
        if isinstance(feature, datasets.Audio)
        else ds
    )
    problems = raw.map(
        _problem_column,
        input_columns=audio_column,
        fn_kwargs={"max_seconds": max_seconds, "silence_dbfs": silence_dbfs},
        num_proc=num_proc if num_proc and num_proc > 1 and len(raw) >= num_proc else None,
        remove_columns=raw.column_names,
        desc=f"checking {name} audio",
    )["_audio_problem"]
    bad = [i for i, p in enumerate(problems) if p]
    if not bad:
        return ds, []
    rows = raw.select(bad)
    ids = rows["id"] if "id" in rows.column_names else [str(i) for i in bad]
    cells = rows[audio_column]
    found = [
        f"{(c.get('path') if isinstance(c, Mapping) else c) or uid}: {problems[i]}"
        for uid, c, i in zip(ids, cells, bad)
    ]
    logger.warning(
        "%s: %d clip(s) skipped before training: %s%s",
        name,
        len(found),
        "; ".join(found[:20]),
        " ..." if len(found) > 20 else "",
    )
    if len(bad) == len(ds):
        raise ValueError(f"split {name!r}: no usable audio (every clip failed the check: {'; '.join(found[:5])} ...)")
    bad_set = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in bad_set]), found


def corpus_stats(dataset) -> dict:
    """The load statistics of a split or DatasetDict returned by ``load_corpus``."""
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        dataset = next(iter(dataset.values()))
    desc = dataset.info.description or ""
    try:
        payload = json.loads(desc)
    except json.JSONDecodeError as exc:
        raise ValueError("this dataset carries no trustser load statistics (not built by load_corpus?)") from exc
    return payload["trustser_stats"]


# ------------------------------------------------------------------------------------------
# Fingerprints and building
# ------------------------------------------------------------------------------------------
def file_manifest(paths: Iterable[str | os.PathLike]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each existing file; what the cache fingerprint is made of."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return sorted(out)


def fingerprint(corpus: str, split: str, manifest: Sequence, options: Mapping, extra: Any = None) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [SCHEMA_VERSION, corpus, split, list(manifest), _jsonable(options), _jsonable(extra)],
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()[:32]


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple, set)):
        items = [_jsonable(v) for v in obj]
        return sorted(items, key=str) if isinstance(obj, set) else items
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _rows_from_records(records: list, make: Callable) -> Iterable[dict]:
    for rec in records:
        row = make(rec)
        if row is not None:
            yield row


def _plain_rows(rows: list) -> Iterable[dict]:
    yield from rows


def build_dataset_dict(
    stats: CorpusStats,
    splits: Mapping[str, list],
    *,
    manifest: Sequence,
    options: Mapping,
    make: Callable[[Any], dict | None] | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    keep_in_memory: bool = False,
) -> datasets.DatasetDict:
    """One cached ``Dataset`` per non-empty split.

    ``splits`` maps a split name to its records; ``make(record)`` (a module-level function, so
    it pickles for ``num_proc``) turns a record into a row, or returns None to skip it (e.g. an
    undecodable clip). Without ``make`` the records are rows already. Records that produced no row
    are found by id afterwards (so the count survives a cache hit) and reported as unreadable."""
    out = {}
    features = FEATURES
    for split, records in splits.items():
        if not records:
            continue
        fp = fingerprint(stats.corpus, split, manifest, options, extra=[_record_id(r) for r in records])
        gen_kwargs = {"records": list(records), "make": make} if make else {"rows": list(records)}
        ds = datasets.Dataset.from_generator(
            _rows_from_records if make else _plain_rows,
            features=features,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            gen_kwargs=gen_kwargs,
            num_proc=num_proc if num_proc and num_proc > 1 and len(records) >= num_proc else None,
            split=datasets.NamedSplit(split),
            fingerprint=fp,
            keep_in_memory=keep_in_memory,
        )
        if make is not None and len(ds) != len(records):
            present = set(ds["id"])
            lost = [_record_id(r) for r in records if _record_id(r) not in present]
            stats.unreadable_audio.extend(lost)
            logger.warning(
                "%s/%s: %d clips could not be decoded and were skipped: %s",
                stats.corpus,
                split,
                len(lost),
                ", ".join(lost[:20]),
            )
        out[split] = ds
    return finish(stats, out)


def build_iterable_dataset_dict(
    stats: CorpusStats, split_generators: Mapping[str, tuple[Callable, dict]]
) -> datasets.IterableDatasetDict:
    """Streaming counterpart: ``{split: (generator, gen_kwargs)}`` -> IterableDatasetDict."""
    out = {
        split: datasets.IterableDataset.from_generator(
            gen, features=FEATURES, gen_kwargs=kw, split=datasets.NamedSplit(split)
        )
        for split, (gen, kw) in split_generators.items()
    }
    dd = datasets.IterableDatasetDict(out)
    attach_stats(stats, dd, log=False)
    return dd


def finish(stats: CorpusStats, splits: Mapping[str, datasets.Dataset]) -> datasets.DatasetDict:
    stats.splits = {name: len(ds) for name, ds in splits.items()}
    if not any(stats.splits.values()):
        raise ValueError(
            f"{stats.corpus}: no usable utterances under {stats.root} (stats: {json.dumps(stats.to_dict())[:2000]})"
        )
    dd = datasets.DatasetDict(splits)
    attach_stats(stats, dd)
    return dd


def attach_stats(stats: CorpusStats, dd, log: bool = True) -> None:
    """Records the loader's statistics in every split's ``info.description`` (``corpus_stats`` reads them)."""
    desc = json.dumps({"trustser_stats": stats.to_dict()}, ensure_ascii=False)
    for ds in dd.values():
        ds.info.description = desc
    if log:
        stats.log_summary()


def _record_id(rec) -> str:
    return rec["id"] if isinstance(rec, Mapping) else rec[0]


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser().resolve()  # rows keep absolute audio paths (decoded lazily, from any cwd)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} is not a directory")
    return path


def seeded_fraction(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (split assignment that is the same
    in streaming and map-style loading and across machines)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
