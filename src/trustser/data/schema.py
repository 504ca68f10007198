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

from ..utils import TARGET_SR

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


def make_row(id: str, audio: Any, *, text: str = "", emotion: str, speaker: str = "", gender: str = "", **optional: str) -> dict:
    """One schema row; ``audio`` is a path (decoded lazily by ``datasets.Audio``) or
    ``{"path": name, "bytes": wav_bytes}`` for media decoded at load time."""
    unknown = set(optional) - set(OPTIONAL_COLUMNS)
    if unknown:
        raise TypeError(f"make_row: unknown columns {sorted(unknown)}")
    row = {"id": id, "audio": audio, "text": text or "", "emotion": emotion, "speaker": speaker or "", "gender": gender or ""}
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

    def map_label(self, corpus: str, raw: str, path: str | os.PathLike, lineno: int) -> str | None:
        """Canonical emotion of a labelled line; None (counted and reported) for labels the
        protocol drops or the corpus does not define."""
        from ..descriptors import map_emotion

        self.labelled += 1
        try:
            emotion = map_emotion(corpus, raw)
        except KeyError:
            self.unknown_labels[raw] += 1
            self.bad_line(path, lineno, f"unknown {corpus.upper()} emotion label {raw!r}")
            return None
        if emotion is None:
            self.dropped_labels[raw.lower()] += 1
        return emotion

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
        }

    def log_summary(self) -> None:
        d = self.to_dict()
        logger.info(
            "%s: kept %d (%s); dropped %d %s; missing audio %d; unreadable %d; unparseable lines %d",
            self.corpus, d["kept"], d["splits"], d["dropped_total"], d["dropped_labels"],
            len(self.missing_audio), len(self.unreadable_audio), len(self.unparseable),
        )
        if self.missing_audio:
            logger.warning("%s: %d utterances without audio skipped: %s", self.corpus, len(self.missing_audio),
                           ", ".join(self.missing_audio[:20]) + (" ..." if len(self.missing_audio) > 20 else ""))


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
    h.update(json.dumps([SCHEMA_VERSION, corpus, split, list(manifest), _jsonable(options), _jsonable(extra)],
                        sort_keys=True, default=str).encode())
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
            logger.warning("%s/%s: %d clips could not be decoded and were skipped: %s", stats.corpus, split,
                           len(lost), ", ".join(lost[:20]))
        out[split] = ds
    return finish(stats, out)


def build_iterable_dataset_dict(stats: CorpusStats, split_generators: Mapping[str, tuple[Callable, dict]]) -> datasets.IterableDatasetDict:
    """Streaming counterpart: ``{split: (generator, gen_kwargs)}`` -> IterableDatasetDict."""
    out = {
        split: datasets.IterableDataset.from_generator(gen, features=FEATURES, gen_kwargs=kw, split=datasets.NamedSplit(split))
        for split, (gen, kw) in split_generators.items()
    }
    dd = datasets.IterableDatasetDict(out)
    _attach(stats, dd, log=False)
    return dd


def finish(stats: CorpusStats, splits: Mapping[str, datasets.Dataset]) -> datasets.DatasetDict:
    stats.splits = {name: len(ds) for name, ds in splits.items()}
    if not any(stats.splits.values()):
        raise ValueError(f"{stats.corpus}: no usable utterances under {stats.root} (stats: {json.dumps(stats.to_dict())[:2000]})")
    dd = datasets.DatasetDict(splits)
    _attach(stats, dd)
    return dd


def _attach(stats: CorpusStats, dd, log: bool = True) -> None:
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
