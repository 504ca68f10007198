"""SER evaluation of a SER-SLM from its generated captions: WA, UA, weighted F1, per-field SED
accuracy (how trustworthy the explanation is) and the rate of captions that could not be parsed."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .descriptors import SED_FIELDS, parse_caption

UNPARSED = "<unparsed>"


def _rows(dataset, start: int, stop: int):
    batch = dataset[start:stop]
    return [{k: batch[k][i] for k in batch} for i in range(stop - start)]


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
) -> list[str]:
    """Greedy, batched caption generation (left-padded prompts) for every row of ``dataset``."""
    from .trainers.sft import decode_audio

    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = max_new_tokens or getattr(model.generation_config, "max_new_tokens", None) or 96
    tok = processor.tokenizer
    out: list[str] = []
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for s in starts:
        rows = _rows(dataset, s, min(len(dataset), s + batch_size))
        audio = [decode_audio(r[audio_column], r.get("id", "?")) for r in rows]
        inputs = processor(audio=audio, padding_side="left")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        out.extend(s.strip() for s in tok.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def ser_metrics(y_true: Sequence[str], y_pred: Sequence[str], emotion_labels: Sequence[str]) -> dict[str, Any]:
    """WA, UA (mean per-class recall), weighted F1 and the confusion matrix; a prediction outside
    ``emotion_labels`` (unparsed) counts as wrong."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    labels = list(emotion_labels)
    present = [l for l in labels if l in set(y_true)]
    cm_labels = labels + ([UNPARSED] if any(p not in labels for p in y_pred) else [])
    y_pred = [p if p in labels else UNPARSED for p in y_pred]
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "confusion_matrix": {"labels": cm_labels, "matrix": confusion_matrix(y_true, y_pred, labels=cm_labels).tolist()},
    }


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
    against the ``<field>`` (``sed_source="truth"``) or ``<field>_auto`` columns, where present."""
    if sed_source not in ("truth", "auto"):
        raise ValueError(f"sed_source must be 'truth' or 'auto', got {sed_source!r}")
    if captions is None:
        captions = generate_captions(
            model, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
        )
    if len(captions) != len(dataset):
        raise ValueError(f"{len(captions)} captions for {len(dataset)} rows")
    parsed = [parse_caption(c, with_sed=with_sed, emotion_labels=emotion_labels) for c in captions]
    y_true = list(dataset["emotion"])
    unknown = sorted(set(y_true) - set(emotion_labels))
    if unknown:
        raise ValueError(f"reference emotions {unknown} are not in emotion_labels {list(emotion_labels)}")
    y_pred = [p.get("emotion", UNPARSED) for p in parsed]
    result: dict[str, Any] = {"n": len(captions)}
    result.update(ser_metrics(y_true, y_pred, emotion_labels))
    result["unparseable_rate"] = float(np.mean([not p.ok for p in parsed])) if parsed else float("nan")
    result["emotion_unparseable_rate"] = float(np.mean([p.get("emotion") is None for p in parsed])) if parsed else float("nan")
    if with_sed:
        suffix = "" if sed_source == "truth" else "_auto"
        cols = set(dataset.column_names)
        sed_acc = {}
        for f in SED_FIELDS:
            if f + suffix not in cols:
                continue
            ref = list(dataset[f + suffix])
            pairs = [(p.get(f), r) for p, r in zip(parsed, ref) if r]
            if pairs:
                sed_acc[f] = float(np.mean([a == b for a, b in pairs]))
        result["sed_accuracy"] = sed_acc
        result["sed_source"] = sed_source
    if return_predictions:
        result["predictions"] = [
            {"id": i, "caption": c, "emotion": p.get("emotion"), **{f: p.get(f) for f in SED_FIELDS}}
            for i, c, p in zip(dataset["id"] if "id" in dataset.column_names else range(len(captions)), captions, parsed)
        ]
    return result


__all__ = ["generate_captions", "evaluate_ser", "ser_metrics", "UNPARSED"]
