"""Automatic SED annotation (SpeechCraft-style): ``annotate(dataset, method=...)``.

Two passes per split: (1) a batched ``datasets.map`` (``num_proc`` workers; one shard per process
under ``accelerate launch``) decodes each clip, validates it and computes the raw features and the
gender/age predictions; (2) the dataset-relative binning turns features into words over the whole
split (all processes' shards merged first), because percentiles, tertiles and speaker statistics
are properties of the population, not of one clip.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Any

import numpy as np

from ..audio import TARGET_SR, AudioError, analysis_waveform, audio_problem, undecoded_audio
from ..descriptors import SED_FIELDS
from ..models.ser_slm.processing_ser_slm import F0_TRACK_COLUMN
from .binning import METHODS, AdaptiveConfig, UnifiedThresholds, bin_features, speaker_vote
from .classifiers import DEFAULT_AGE_MODEL, DEFAULT_GENDER_MODEL, OfflineClassifier, resolve_backend
from .features import (
    SIGNAL_FEATURES,
    acoustic_embedding,
    count_phonemes,
    f0_stream_track,
    praat_pitch,
    prepare_embedding,
    signal_features,
)

logger = logging.getLogger("trustser.annotation")

AUTO_COLUMNS: tuple[str, ...] = tuple(f"{f}_auto" for f in SED_FIELDS)
FEATURE_COLUMNS: tuple[str, ...] = SIGNAL_FEATURES
ERROR_COLUMN = "annotation_error"
# F0_TRACK_COLUMN: each clip's SER-SLM F0 stream from the annotator's own Praat analysis (None where
# not computed), which the SER-SLM's collator and generation read instead of running Praat again
_EMB = "_trustser_embedding"
_TRAIT_COLS = ("_trustser_gender", "_trustser_age")

__all__ = [
    "annotate",
    "rebin",
    "annotation_report",
    "fit_reference_classifiers",
    "AUTO_COLUMNS",
    "FEATURE_COLUMNS",
    "ERROR_COLUMN",
    "F0_TRACK_COLUMN",
]


# ------------------------------------------------------------------------------------------
# Per-clip features
# ------------------------------------------------------------------------------------------
def _reason(exc: AudioError) -> str:
    return str(exc).split(":")[0].strip() or "unreadable"


def _feature_batch(batch, *, audio_column: str, text_column: str | None, embed: bool, voice: str) -> dict:
    n = len(batch[audio_column])
    texts = batch[text_column] if text_column else [""] * n
    counts = count_phonemes(texts, voice=voice)
    out: dict[str, list] = {k: [] for k in (*SIGNAL_FEATURES, ERROR_COLUMN, F0_TRACK_COLUMN)}
    if embed:
        out[_EMB] = []
    for i in range(n):
        feats, emb, err, track = {k: float("nan") for k in SIGNAL_FEATURES}, None, "", None
        try:
            wav = analysis_waveform(batch[audio_column][i])
            err = audio_problem(wav, TARGET_SR) or ""
            if not err:
                pitch = praat_pitch(wav, TARGET_SR)
                sig, f0 = signal_features(wav, TARGET_SR, pitch=pitch)
                track = f0_stream_track(wav, TARGET_SR, pitch)
                feats.update({k: sig[k] for k in ("f0_mean", "f0_median", "rms_db", "duration")})
                if counts[i] > 0 and sig["speech_duration"] > 0:
                    feats["phonemes_per_second"] = counts[i] / sig["speech_duration"]
                if f0.size == 0:
                    err = "unvoiced"
                elif counts[i] == 0:
                    err = "no_transcript"
                if embed and not err:
                    emb = acoustic_embedding(wav, TARGET_SR, f0, feats["rms_db"], feats["phonemes_per_second"]).tolist()
            else:
                feats["duration"] = wav.shape[-1] / TARGET_SR
        except AudioError as exc:
            err = _reason(exc)
        for k in SIGNAL_FEATURES:
            out[k].append(feats[k])
        out[ERROR_COLUMN].append(err)
        out[F0_TRACK_COLUMN].append(None if track is None else track.tolist())
        if embed:
            out[_EMB].append(emb)
    return out


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------
def fit_reference_classifiers(
    reference,
    *,
    num_proc: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    fields=("gender", "age"),
    voice: str = "en-us",
    extracted=None,
) -> dict[str, OfflineClassifier]:
    """Offline gender/age classifiers fitted on a labelled split (its ``gender``/``age`` columns)."""
    if extracted is None:
        extracted = _extract(reference, embed=True, num_proc=num_proc, batch_size=batch_size, voice=voice)
    emb_rows = extracted[_EMB]
    ok = [e is not None for e in emb_rows]
    X = np.asarray([e for e in emb_rows if e is not None], dtype=np.float64)
    out = {}
    for f in fields:
        if f not in reference.column_names:
            raise ValueError(f"reference split has no {f!r} column to fit the {f} classifier on")
        labels = [l for l, k in zip(reference[f], ok) if k]
        out[f] = OfflineClassifier.fit(X, labels, f, seed=seed)
    return out


def _resolve(spec, field, reference_clfs):
    if spec in (None, "auto"):
        if reference_clfs is not None:
            return reference_clfs[field]
        spec = DEFAULT_GENDER_MODEL if field == "gender" else DEFAULT_AGE_MODEL
    if spec == "reference":
        if reference_clfs is None:
            raise ValueError(
                f"{field}_backend='reference' needs a reference split (a DatasetDict with one, or reference=)"
            )
        return reference_clfs[field]
    return resolve_backend(spec, field)


# ------------------------------------------------------------------------------------------
# Passes
# ------------------------------------------------------------------------------------------
def _extract(ds, *, embed: bool, num_proc, batch_size, voice, audio_column="audio", text_column="text"):
    import datasets

    raw = undecoded_audio(ds, audio_column)
    text_column = text_column if text_column in ds.column_names else None
    keep = [audio_column] + ([text_column] if text_column else [])
    raw = raw.select_columns(keep)  # the map then writes features only, never a copy of the audio
    fn_kwargs = dict(audio_column=audio_column, text_column=text_column, embed=embed, voice=voice)
    if embed:
        prepare_embedding(TARGET_SR)  # inherited by the workers, which then run no torch op
    # the types are given, not inferred: a first batch of unusable clips has only None tracks/embeddings
    features = datasets.Features(
        {
            **{k: datasets.Value("float64") for k in SIGNAL_FEATURES},
            ERROR_COLUMN: datasets.Value("string"),
            F0_TRACK_COLUMN: datasets.List(datasets.Value("float32")),
            **({_EMB: datasets.List(datasets.Value("float64"))} if embed else {}),
        }
    )
    return raw.map(
        _feature_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        fn_kwargs=fn_kwargs,
        remove_columns=keep,
        features=features,
        desc="annotation features",
    )


def _traits(ds, extracted, backends: dict, *, audio_column, batch_size) -> dict[str, list[str]]:
    """Gender/age words for the valid rows ("" elsewhere)."""
    errors = extracted[ERROR_COLUMN]
    valid = [i for i, e in enumerate(errors) if not e]
    out = {}
    for f, backend in backends.items():
        words = [""] * len(errors)
        if getattr(backend, "needs_embedding", False):
            preds = []
            if valid:  # a split may have no usable utterance at all: every row keeps its error
                preds = backend.predict(
                    np.asarray([extracted[_EMB][i] for i in valid], dtype=np.float64).reshape(len(valid), -1)
                )
        else:
            raw = undecoded_audio(ds, audio_column)
            preds = []
            for start in range(0, len(valid), batch_size):
                idx = valid[start : start + batch_size]
                preds += backend.predict([analysis_waveform(a) for a in raw.select(idx)[audio_column]], TARGET_SR)
        for i, p in zip(valid, preds):
            words[i] = p
        out[f] = words
    return out


def _process_split(ds, backends, *, num_proc, batch_size, voice, audio_column, text_column, extracted=None):
    """Pass 1 on this process' rows: features + traits, as a small table (no audio)."""
    import datasets

    embed = any(getattr(b, "needs_embedding", False) for b in backends.values())
    ext = (
        extracted
        if extracted is not None
        else _extract(
            ds,
            embed=embed,
            num_proc=num_proc,
            batch_size=batch_size,
            voice=voice,
            audio_column=audio_column,
            text_column=text_column,
        )
    )
    traits = _traits(ds, ext, backends, audio_column=audio_column, batch_size=batch_size)
    cols = {k: ext[k] for k in (*FEATURE_COLUMNS, ERROR_COLUMN, F0_TRACK_COLUMN)}
    cols["_trustser_gender"], cols["_trustser_age"] = traits["gender"], traits["age"]
    return datasets.Dataset.from_dict(cols)


def _sharded(ds, fn):
    """``fn(ds)`` (a small Dataset without audio), computed shard-wise under ``accelerate launch``:
    each process handles a contiguous shard and writes it under a directory the main process chose
    (``tempfile``; on several nodes point TMPDIR at a shared disk), and every process reads all
    shards back in order, so all ranks hold the same merged table."""
    import datasets

    state = None
    try:
        from ..utils import distributed_state

        state = distributed_state()
    except Exception:  # pragma: no cover - accelerate always present in this package
        pass
    if state is None or state.num_processes == 1:
        return fn(ds)
    from accelerate.utils import broadcast_object_list

    path = [tempfile.mkdtemp(prefix="trustser-annotate-") if state.is_main_process else None]
    broadcast_object_list(path)
    shard = ds.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
    fn(shard).save_to_disk(os.path.join(path[0], f"shard-{state.process_index:05d}"))
    state.wait_for_everyone()
    parts = [datasets.load_from_disk(os.path.join(path[0], f"shard-{r:05d}")) for r in range(state.num_processes)]
    merged = datasets.concatenate_datasets(parts)
    merged = datasets.Dataset.from_dict(merged.to_dict(), features=merged.features)  # in memory: the files can go
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(path[0], ignore_errors=True)
    return merged


def _distributed_pass1(ds, backends, extracted=None, **kw):
    if extracted is not None:  # features already computed (and gathered) for this split
        return _process_split(ds, backends, extracted=extracted, **kw)
    return _sharded(ds, lambda shard: _process_split(shard, backends, **kw))


def _bin_tables(
    tables: list, speakers: list, method, *, unified_thresholds, adaptive_config, vote: bool = False
) -> list[dict[str, list[str]]]:
    """Bins the valid rows of the given tables as one population (one table = per-split binning;
    several = speaker statistics pooled over splits) and scatters the words back per table.
    ``vote``: gender/age become each speaker's majority prediction first."""
    cat = lambda key: np.concatenate([np.asarray(t[key], dtype=object) for t in tables]) if tables else np.zeros(0)
    errors = cat(ERROR_COLUMN)
    valid = np.asarray([not e for e in errors], dtype=bool)
    feats = {k: np.concatenate([np.asarray(t[k], dtype=np.float64) for t in tables]) for k in FEATURE_COLUMNS}
    spk = np.concatenate([np.asarray(s, dtype=object) for s in speakers])
    traits = {}
    for f in ("gender", "age"):
        col = np.where(valid, cat(f"_trustser_{f}"), "").astype(object)
        traits[f] = np.asarray(speaker_vote(col.tolist(), spk.tolist()), dtype=object) if vote else col
    genders = traits["gender"]
    words = {f: np.full(len(errors), "", dtype=object) for f in SED_FIELDS}
    idx = np.flatnonzero(valid)
    if idx.size:
        binned = bin_features(
            method,
            {k: v[idx] for k, v in feats.items()},
            genders=genders[idx].tolist(),
            speakers=spk[idx].tolist(),
            unified_thresholds=unified_thresholds,
            adaptive_config=adaptive_config,
        )
        for f, vals in binned.items():
            words[f][idx] = vals
    for f in ("gender", "age"):
        words[f][idx] = traits[f][idx]
    out, start = [], 0
    for t in tables:
        n = len(t)
        out.append({f: words[f][start : start + n].tolist() for f in SED_FIELDS})
        start += n
    return out


def _as_splits(dataset, method: str, speaker_scope: str) -> tuple[bool, dict]:
    """(whether ``dataset`` is a DatasetDict, its splits by name), once the binning settings are checked."""
    import datasets

    if method not in METHODS:
        raise ValueError(f"unknown annotation method {method!r}; choose one of {METHODS}")
    if speaker_scope not in ("corpus", "split"):
        raise ValueError(f"speaker_scope must be 'corpus' or 'split', not {speaker_scope!r}")
    is_dict = isinstance(dataset, datasets.DatasetDict)
    return is_dict, (dict(dataset) if is_dict else {"_": dataset})


def _bin_splits(
    tables: dict, splits: dict, speaker_column: str, method, speaker_scope, unified_thresholds, adaptive_config, vote
) -> dict[str, dict[str, list[str]]]:
    """Words per split: speaker statistics pooled over all splits (``speaker_scope="corpus"``,
    speaker_adaptive only) or each split binned as its own population. Speakers come from
    ``speaker_column`` (absent: the split counts as one speaker); ``vote``: gender and age become
    each speaker's majority prediction."""
    kw = dict(unified_thresholds=unified_thresholds, adaptive_config=adaptive_config, vote=vote)
    names = list(splits)
    speakers = {
        n: ([str(x) for x in ds[speaker_column]] if speaker_column in ds.column_names else [""] * len(ds))
        for n, ds in splits.items()
    }
    if method == "speaker_adaptive" and speaker_scope == "corpus":
        return dict(zip(names, _bin_tables([tables[n] for n in names], [speakers[n] for n in names], method, **kw)))
    return {n: _bin_tables([tables[n]], [speakers[n]], method, **kw)[0] for n in names}


def _calibrate(method, ref_table, reference, speaker_column):
    from .binning import fit_adaptive_config, fit_unified_thresholds

    missing = [f for f in ("pitch", "volume", "speed") if f not in reference.column_names or not any(reference[f])]
    if missing:
        raise ValueError(f"calibrate=True needs reference labels for {missing}")
    ok = np.asarray([not e for e in ref_table[ERROR_COLUMN]])
    feats = {k: np.asarray(ref_table[k], dtype=np.float64)[ok] for k in FEATURE_COLUMNS}
    labels = {f: np.asarray(reference[f], dtype=object)[ok].tolist() for f in ("pitch", "volume", "speed")}
    if method == "unified":
        gen = np.asarray(reference["gender"], dtype=object)[ok].tolist() if "gender" in reference.column_names else None
        return fit_unified_thresholds(feats, labels, gen), None
    if method == "speaker_adaptive":
        spk = np.asarray(
            reference[speaker_column] if speaker_column in reference.column_names else [""] * len(reference),
            dtype=object,
        )[ok]
        gen = np.asarray(
            reference["gender"] if "gender" in reference.column_names else [""] * len(reference), dtype=object
        )[ok]
        return None, fit_adaptive_config(feats, labels, spk.tolist(), gen.tolist())
    return None, None


def annotate(
    dataset,
    method: str = "speechcraft",
    *,
    gender_backend: Any = "auto",
    age_backend: Any = "auto",
    num_proc: int | None = None,
    batch_size: int = 32,
    reference=None,
    reference_split: str = "reference",
    calibrate: bool = False,
    speaker_scope: str = "corpus",
    speaker_traits: bool = False,
    unified_thresholds: UnifiedThresholds | None = None,
    adaptive_config: AdaptiveConfig | None = None,
    audio_column: str = "audio",
    text_column: str = "text",
    speaker_column: str = "speaker",
    voice: str = "en-us",
    seed: int = 0,
):
    """Adds ``pitch_auto``, ``volume_auto``, ``speed_auto``, ``gender_auto``, ``age_auto``, the raw
    features (``f0_mean``, ``f0_median``, ``rms_db``, ``phonemes_per_second``, ``duration``) and
    ``annotation_error`` ("" or a reason; such rows get "" labels) to a Dataset or every split of a
    DatasetDict, keeping all original columns.

    Populations: ``speechcraft`` percentiles/tertiles are taken over each split separately (the
    released tool bins the dataset it annotates); ``speaker_adaptive`` speaker statistics pool a
    speaker's utterances over all splits (``speaker_scope="corpus"``; speaker ids are corpus-wide)
    or within each split (``"split"``); ``unified`` uses fixed numbers. With ``calibrate=True`` the
    unified thresholds / speaker-adaptive z cut points are set at the reference split's label
    proportions (``binning.fit_unified_thresholds`` / ``fit_adaptive_config``). With
    ``speaker_traits=True`` gender and age become each speaker's majority prediction (within the
    population being binned: the corpus for speaker_adaptive/corpus scope, else the split) before
    binning; SpeechCraft labels each clip alone.

    Gender/age backends: ``"auto"`` fits the offline classifier on ``reference`` (or the
    DatasetDict's ``reference_split``) when one with gender/age labels is available, else uses
    SpeechCraft's Hub models; ``"reference"`` forces the offline fit; a ``.json`` path loads a
    saved OfflineClassifier; any other string is a Hub model id or local model directory; an
    object with ``predict`` is used as is. Speakers come from ``speaker_column`` (absent: the split
    counts as one speaker)."""
    import datasets

    is_dict, splits = _as_splits(dataset, method, speaker_scope)
    for name, ds in splits.items():
        if audio_column not in ds.column_names:
            raise ValueError(f"split {name!r} has no {audio_column!r} column (columns: {ds.column_names})")
    if reference is None and is_dict and reference_split in dataset:
        ref = dataset[reference_split]
        if all(c in ref.column_names and any(ref[c]) for c in ("gender", "age")) or calibrate:
            reference = ref
    needs_ref = any(b in ("auto", None, "reference") for b in (gender_backend, age_backend))
    if calibrate and reference is None:
        raise ValueError("calibrate=True needs a labelled reference split (reference= or a DatasetDict with one)")
    ref_clfs, ref_ext = None, None
    if (needs_ref or calibrate) and reference is not None:
        ref_ext = _sharded(
            reference,
            lambda shard: _extract(
                shard,
                embed=True,
                num_proc=num_proc,
                batch_size=batch_size,
                voice=voice,
                audio_column=audio_column,
                text_column=text_column,
            ),
        )
        if needs_ref and all(c in reference.column_names and any(reference[c]) for c in ("gender", "age")):
            ref_clfs = fit_reference_classifiers(reference, seed=seed, extracted=ref_ext)
            logger.info("offline classifiers fitted on %d reference utterances", len(reference))
    backends = {"gender": _resolve(gender_backend, "gender", ref_clfs), "age": _resolve(age_backend, "age", ref_clfs)}
    if calibrate:
        cal_u, cal_a = _calibrate(method, ref_ext, reference, speaker_column)
        unified_thresholds = cal_u or unified_thresholds
        adaptive_config = cal_a or adaptive_config

    tables = {}
    for name, ds in splits.items():
        reuse = ref_ext if (ref_ext is not None and ds is reference) else None
        tables[name] = _distributed_pass1(
            ds,
            backends,
            reuse,
            num_proc=num_proc,
            batch_size=batch_size,
            voice=voice,
            audio_column=audio_column,
            text_column=text_column,
        )
    words = _bin_splits(
        tables, splits, speaker_column, method, speaker_scope, unified_thresholds, adaptive_config, speaker_traits
    )

    out = {}
    for name, ds in splits.items():
        table = tables[name]
        drop = [c for c in (*AUTO_COLUMNS, *FEATURE_COLUMNS, ERROR_COLUMN, F0_TRACK_COLUMN) if c in ds.column_names]
        res = ds.remove_columns(drop) if drop else ds
        for f in SED_FIELDS:
            res = res.add_column(f"{f}_auto", words[name][f])
        for k in FEATURE_COLUMNS:
            res = res.add_column(k, [float(x) for x in table[k]], feature=datasets.Value("float64"))
        res = res.add_column(ERROR_COLUMN, table[ERROR_COLUMN])
        res = res.add_column(F0_TRACK_COLUMN, table[F0_TRACK_COLUMN], feature=datasets.List(datasets.Value("float32")))
        n_err = sum(1 for e in table[ERROR_COLUMN] if e)
        if n_err:
            logger.warning(
                "split %s: %d of %d utterances not annotated (%s)%s",
                name,
                n_err,
                len(ds),
                annotation_report(res)["errors"],
                ": no usable utterance" if n_err == len(ds) else "",
            )
        out[name] = res
    return datasets.DatasetDict(out) if is_dict else out["_"]


def rebin(
    annotated,
    method: str,
    *,
    reference_split: str = "reference",
    calibrate: bool = False,
    speaker_scope: str = "corpus",
    speaker_traits: bool = False,
    unified_thresholds: UnifiedThresholds | None = None,
    adaptive_config: AdaptiveConfig | None = None,
    speaker_column: str = "speaker",
):
    """Re-derives ``pitch_auto``/``volume_auto``/``speed_auto`` of an already annotated Dataset or
    DatasetDict with another binning, from its stored features (no audio is decoded again);
    gender/age labels (unless ``speaker_traits`` votes them per speaker) and errors are kept.
    Same population rules as ``annotate``."""
    import datasets

    is_dict, splits = _as_splits(annotated, method, speaker_scope)
    need = [*FEATURE_COLUMNS, ERROR_COLUMN, "gender_auto", "age_auto"]
    for name, ds in splits.items():
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise ValueError(f"split {name!r} is not annotated (missing {missing}); run annotate() first")
    tables = {
        n: ds.select_columns(need).rename_columns({"gender_auto": "_trustser_gender", "age_auto": "_trustser_age"})
        for n, ds in splits.items()
    }
    if calibrate:
        if not is_dict or reference_split not in splits:
            raise ValueError(f"calibrate=True needs the annotated {reference_split!r} split in the DatasetDict")
        cal_u, cal_a = _calibrate(method, splits[reference_split], splits[reference_split], speaker_column)
        unified_thresholds = cal_u or unified_thresholds
        adaptive_config = cal_a or adaptive_config
    words = _bin_splits(
        tables, splits, speaker_column, method, speaker_scope, unified_thresholds, adaptive_config, speaker_traits
    )
    out = {}
    for name, ds in splits.items():
        fields = SED_FIELDS if speaker_traits else ("pitch", "volume", "speed")
        res = ds.remove_columns([f"{f}_auto" for f in fields])
        for f in fields:
            res = res.add_column(f"{f}_auto", words[name][f])
        out[name] = res.select_columns(ds.column_names)  # original column order
    return datasets.DatasetDict(out) if is_dict else out["_"]


def annotation_report(ds, group_column: str = "group") -> dict:
    """Counts of annotated rows, errors by reason and label distributions of one split; where the
    split has ground-truth descriptor columns (the synthetic corpus), the annotation's accuracy per
    field, the share of utterances with all five labels right, and both per speaker group
    (``group_column``)."""
    errors = Counter(e for e in ds[ERROR_COLUMN] if e)
    report = {
        "rows": len(ds),
        "errors": dict(sorted(errors.items())),
        "n_errors": int(sum(errors.values())),
        "labels": {f: dict(sorted(Counter(v for v in ds[f"{f}_auto"] if v).items())) for f in SED_FIELDS},
    }
    if all(f in ds.column_names for f in SED_FIELDS) and all(any(ds[f]) for f in SED_FIELDS):
        ok = np.asarray([not e for e in ds[ERROR_COLUMN]], dtype=bool)
        right = np.stack(
            [np.asarray(ds[f], dtype=object) == np.asarray(ds[f"{f}_auto"], dtype=object) for f in SED_FIELDS], 1
        )[ok]

        def summary(rows: np.ndarray) -> dict:
            return {
                "n": int(len(rows)),
                **{f: round(float(rows[:, j].mean()), 4) for j, f in enumerate(SED_FIELDS)},
                "all_right": round(float(rows.all(1).mean()), 4),
            }

        report["accuracy"] = summary(right) if len(right) else None
        if group_column in ds.column_names and len(right):
            groups = np.asarray(ds[group_column], dtype=object)[ok]
            report["accuracy_by_group"] = {g: summary(right[groups == g]) for g in sorted(set(groups.tolist()))}
    return report
