"""SER evaluation of a SER-SLM from its generated captions: WA, UA, weighted F1, per-field SED
accuracy (how trustworthy the explanation is) and the rate of captions that could not be parsed."""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import numpy as np
import torch

from .descriptors import SED_FIELDS, parse_caption

logger = logging.getLogger(__name__)

UNPARSED = "<unparsed>"


@torch.no_grad()
def generate_captions(
    model,
    processor,
    dataset,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    audio_column: str = "audio",
    progress: bool = False,
    errors: str = "raise",
    return_errors: bool = False,
):
    """Greedy, batched caption generation (left-padded prompts) for every row of ``dataset``.

    A row whose audio cannot be used (unreadable or empty file, NaN samples, invalid sampling
    rate) raises AudioError naming the row and file (``errors="raise"``), or, with
    ``errors="skip"``, gets the caption None and the run continues. ``return_errors``: also return
    ``{row index: message}`` of the skipped rows."""
    from .trainers.sft import read_rows
    from .utils import AudioError

    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = max_new_tokens or getattr(model.generation_config, "max_new_tokens", None) or 96
    tok = processor.tokenizer
    out: list[str | None] = []
    failed: dict[int, str] = {}
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for s in starts:
        idx = list(range(s, min(len(dataset), s + batch_size)))
        _, audio, errs = read_rows(dataset, idx, audio_column)
        for i, e in zip(idx, errs):
            if e is not None:
                if errors == "raise":
                    raise AudioError(e)
                logger.warning("skipped: %s", e)
                failed[i] = e
        good = [a for a in audio if a is not None]
        texts = iter([])
        if good:
            inputs = processor(audio=good, padding_side="left")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            gen = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            texts = iter(tok.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        out.extend(None if a is None else next(texts).strip() for a in audio)
    return (out, failed) if return_errors else out


def ser_metrics_path() -> str:
    """The ``evaluate`` module shipped in the package (``trustser/metrics/ser_metrics/ser_metrics.py``)."""
    from importlib.resources import files

    path = files("trustser") / "metrics" / "ser_metrics" / "ser_metrics.py"
    if not path.is_file():
        raise FileNotFoundError(f"the SER metrics module is missing from the trustser package ({path})")
    return str(path)


@functools.lru_cache(maxsize=1)
def load_ser_metric():
    """``evaluate.load`` of the packaged SER metrics module, by path (offline), kept in memory."""
    import evaluate

    return evaluate.load(ser_metrics_path(), keep_in_memory=True)


def ser_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], emotion_labels: Sequence[str]) -> dict[str, Any]:
    """WA, UA (mean per-class recall), weighted F1 and the confusion matrix of predicted emotion
    labels (the packaged ``evaluate`` module with ``parse=False``); a prediction outside
    ``emotion_labels`` (unparsed) counts as wrong."""
    m = load_ser_metric().compute(predictions=[p if isinstance(p, str) else "" for p in y_pred], references=list(y_true),
                                  emotion_labels=list(emotion_labels), parse=False)
    return {k: m[k] for k in ("wa", "ua", "weighted_f1", "confusion_matrix")}


def evaluate_ser(
    model,
    processor,
    dataset,
    emotion_labels: Sequence[str],
    *,
    sed_source: str = "truth",
    with_sed: bool = True,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    captions: Sequence[str] | None = None,
    return_predictions: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generates (or takes) captions for ``dataset`` and scores them. SED accuracy is measured
    against the ``<field>`` (``sed_source="truth"``) or ``<field>_auto`` columns, where present.

    Rows whose audio cannot be used (unreadable/empty file, NaN samples, ...) are skipped, not
    fatal: they are left out of every metric and listed in ``skipped`` (``[{"id", "error"}]``,
    ``n_skipped``); ``n`` counts the evaluated rows. No usable row at all is a ValueError."""
    if sed_source not in ("truth", "auto"):
        raise ValueError(f"sed_source must be 'truth' or 'auto', got {sed_source!r}")
    y_true_all = list(dataset["emotion"])
    ids = list(dataset["id"]) if "id" in dataset.column_names else list(range(len(dataset)))
    unknown = sorted(set(y_true_all) - set(emotion_labels))
    if unknown:
        rows = [str(i) for i, e in zip(ids, y_true_all) if e in unknown][:5]
        raise ValueError(f"reference emotions {unknown} (rows {', '.join(rows)}{', ...' if len(rows) == 5 else ''}) "
                         f"are not in emotion_labels {list(emotion_labels)}")
    failed: dict[int, str] = {}
    if captions is None:
        captions, failed = generate_captions(
            model, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
            errors="skip", return_errors=True,
        )
    if len(captions) != len(dataset):
        raise ValueError(f"{len(captions)} captions for {len(dataset)} rows")
    keep = [i for i in range(len(dataset)) if i not in failed]
    if not keep:
        raise ValueError(f"no usable utterances to evaluate: all {len(dataset)} rows failed "
                         f"(first: {next(iter(failed.values()), '?')})")
    captions = [captions[i] for i in keep]
    y_true = [y_true_all[i] for i in keep]
    cols = set(dataset.column_names)
    suffix = "" if sed_source == "truth" else "_auto"
    refs = None
    if with_sed:
        refs = {}
        for f in SED_FIELDS:
            if f + suffix in cols:
                ref_all = list(dataset[f + suffix])
                refs[f] = [ref_all[i] for i in keep]
    m = load_ser_metric().compute(predictions=captions, references=y_true, emotion_labels=list(emotion_labels),
                                  with_sed=with_sed, descriptor_references=refs)
    result: dict[str, Any] = {"n": len(captions)}
    result.update({k: m[k] for k in ("wa", "ua", "weighted_f1", "confusion_matrix", "unparseable_rate",
                                     "emotion_unparseable_rate")})
    if with_sed:
        result["sed_accuracy"] = m["sed_accuracy"]
        result["sed_source"] = sed_source
    if failed:
        result["n_skipped"] = len(failed)
        result["skipped"] = [{"id": ids[i], "error": e} for i, e in sorted(failed.items())]
    if return_predictions:
        parsed = [parse_caption(c, with_sed=with_sed, emotion_labels=emotion_labels) for c in captions]
        result["predictions"] = [
            {"id": ids[i], "caption": c, "emotion": p.get("emotion"), **{f: p.get(f) for f in SED_FIELDS}}
            for i, c, p in zip(keep, captions, parsed)
        ]
    return result


__all__ = ["generate_captions", "evaluate_ser", "ser_metrics", "load_ser_metric", "ser_metrics_path", "UNPARSED"]
