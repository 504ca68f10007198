"""Corpus loaders behind one registry: ``load_corpus(name, root, **options) -> DatasetDict``.

Every loader returns the common schema (``trustser.data.schema``; docs/corpora.md) built with
``datasets.Dataset.from_generator`` and cached by ``datasets``. Users add corpora with
``register_corpus(name, fn)`` where ``fn(root, **options)`` returns a ``DatasetDict``.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .schema import COLUMNS, FEATURES, CorpusStats, corpus_features, corpus_stats, make_row, validate_audio

# Built-in loaders, imported on first use (MELD pulls in torchcodec, synthetic espeak-ng).
_BUILTIN: dict[str, str] = {
    "iemocap": "trustser.data.iemocap:load_iemocap",
    "meld": "trustser.data.meld:load_meld",
    "speechcraft": "trustser.data.speechcraft:load_speechcraft",
    "audiofolder": "trustser.data.audiofolder:load_audiofolder",
    "csv": "trustser.data.audiofolder:load_csv",
    "synthetic": "trustser.data.synthetic:load_synthetic",
}
_REGISTRY: dict[str, Callable | str] = dict(_BUILTIN)


def register_corpus(name: str, fn: Callable, *, overwrite: bool = False) -> None:
    """Makes ``load_corpus(name, root, **options)`` call ``fn(root, **options)``."""
    key = name.lower()
    if not callable(fn):
        raise TypeError(f"register_corpus({name!r}): loader must be callable, got {type(fn).__name__}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"corpus {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = fn


def available_corpora() -> list[str]:
    return sorted(_REGISTRY)


def get_loader(name: str) -> Callable:
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown corpus {name!r}; registered: {available_corpora()}")
    fn = _REGISTRY[key]
    if isinstance(fn, str):
        module, attr = fn.split(":")
        fn = getattr(importlib.import_module(module), attr)
        _REGISTRY[key] = fn
    return fn


def load_corpus(name: str, root, *, check_audio: bool = False, max_audio_seconds: float | None = None, **options):
    """Loads corpus ``name`` from ``root`` into the common schema (a ``datasets.DatasetDict``;
    an ``IterableDatasetDict`` with ``streaming=True`` where the loader supports it).

    Common options: ``cache_dir`` (the ``datasets`` cache), ``num_proc``. Per-corpus options are
    documented in docs/corpora.md and in each loader's docstring. ``check_audio=True`` decodes every
    clip and drops (logging file and reason, listing them in ``corpus_stats(...)["bad_audio"]``) the
    missing, empty, unreadable, silent, non-finite and, with ``max_audio_seconds``, over-long ones
    (``validate_audio``): what training corpora need, so a bad file cannot stop a run midway."""
    corpus = get_loader(name)(root, **options)
    if check_audio or max_audio_seconds is not None:
        corpus = validate_audio(corpus, max_seconds=max_audio_seconds, num_proc=options.get("num_proc"))
    return corpus


__all__ = [
    "COLUMNS",
    "FEATURES",
    "CorpusStats",
    "available_corpora",
    "corpus_features",
    "corpus_stats",
    "get_loader",
    "load_corpus",
    "make_row",
    "register_corpus",
    "validate_audio",
]
