"""What a trained SED Controller does to a whole annotated corpus, per utterance, against the
ground truth: which wrong labels it fixes, which right ones it breaks, and whether its modify
probability singles out the wrong labels (ROC AUC), per field and per speaker group."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..audio import AudioError, read_rows
from ..descriptors import SED_FIELDS, SED_SOURCES, SED_VOCAB
from ..models.sed_controller import SedControllerModel, sed_to_ids

GROUP_COLUMN = "group"


def _r4(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 4)


def _right_if_modified(v: np.ndarray, t: np.ndarray, size: int, strategy: str) -> np.ndarray:
    """Chance that "modify" turns annotated value ``v`` into the truth ``t``: the replacement is
    drawn uniformly among the neighbours (``adjacent``, and always for a binary field) or among
    all other values (``uniform``)."""
    if strategy == "adjacent" or size == 2:
        nbrs = [[u for u in (x - 1, x + 1) if 0 <= u < size] for x in v]
    else:
        nbrs = [[u for u in range(size) if u != x] for x in v]
    return np.array([(tt in nb) / len(nb) for tt, nb in zip(t, nbrs)], dtype=float)


def _field_repair(p: np.ndarray, v: np.ndarray, t: np.ndarray, size: int, strategy: str) -> dict:
    """Per-utterance repair of one field over the rows with ground truth (p: P(modify), v:
    annotated ids, t: true ids): sums, not yet divided."""
    from ..evaluation import binary_auc

    right_if_modified = _right_if_modified(v, t, size, strategy)
    right_if_kept = (v == t).astype(float)
    modified, wrong = p > 0.5, right_if_kept == 0
    return {
        "count": int(len(v)),
        "annotation": right_if_kept.sum(),
        "expected": ((1 - p) * right_if_kept + p * right_if_modified).sum(),
        "greedy": np.where(modified, right_if_modified, right_if_kept).sum(),
        "modify_probability": p.sum(),
        "fixed": (right_if_modified * (modified & wrong)).sum(),  # the replacement is drawn: expected over the draw
        "broken": int((modified & ~wrong).sum()),
        "unchanged_wrong": int((~modified & wrong).sum()),
        "unchanged_right": int((~modified & ~wrong).sum()),
        "expected_fixed": (p * right_if_modified * wrong).sum(),
        "expected_broken": (p * ~wrong).sum(),
        "wrong": int(wrong.sum()),
        # does P(modify) rank the wrong labels above the right ones? (NaN -> None: one class only)
        "modify_auc": binary_auc(p, wrong.astype(float)),
    }


def _repair_summary(r: dict) -> dict:
    """A group's per-field entry: shares, counts and the modify AUC."""
    c = max(r["count"], 1)
    return {
        "n": r["count"],
        "wrong": r["wrong"],
        "annotation": _r4(r["annotation"] / c),
        "greedy": _r4(r["greedy"] / c),
        "modify_probability": _r4(r["modify_probability"] / c),
        "modify_auc": _r4(r["modify_auc"]),
        "fixed": _r4(r["fixed"]),
        "broken": r["broken"],
        "unchanged": r["unchanged_wrong"] + r["unchanged_right"],
        "unchanged_wrong": r["unchanged_wrong"],
        "unchanged_right": r["unchanged_right"],
    }


@torch.no_grad()
def _modify_probabilities(
    controller: SedControllerModel, dataset, batch_size: int, sed_source: str, slm=None, processor=None
):
    """(N, 5) P(modify), annotated ids, true ids (-1 = unknown) and the rows' speaker groups (or None).
    The controller's input comes from ``controller_input_features``, as in training: a log-mel
    controller's own log-mel, or the SLM's SED-branch features of the rows' audio, collated by
    ``SedRectifyCollator`` (the rectifying trainer's collator: the same audio inputs as in training).
    A controller with a context (``controller_speaker_context``) reads the speaker-relative prosody
    of ``dataset``'s own rows, computed once over the whole dataset, as the trainer does for its own."""
    from .rectify import SedRectifyCollator, controller_context, controller_input_features
    from .speaker_context import speaker_relative_prosody

    if not controller.reads_log_mel and (slm is None or processor is None):
        raise ValueError(
            f"this SED Controller reads the SER-SLM's SED-branch features (input_size={controller.config.input_size}): "
            "audit_controller needs the SLM (slm=) and its processor (processor=)"
        )
    collator = None if controller.reads_log_mel else SedRectifyCollator(processor, sed_source=sed_source)
    suffix = SED_SOURCES[sed_source]
    device = next(controller.parameters()).device
    p_all, ids_all, truth_all, groups = [], [], [], []
    has_group = GROUP_COLUMN in getattr(dataset, "column_names", ())
    context = torch.from_numpy(speaker_relative_prosody(dataset)) if controller.config.context_size else None
    for s in range(0, len(dataset), batch_size):
        rows, audio, errors = read_rows(dataset, range(s, min(len(dataset), s + batch_size)))
        if any(errors):
            raise AudioError(next(e for e in errors if e))
        ids = sed_to_ids([{f: r.get(f + suffix) for f in SED_FIELDS} for r in rows])
        if collator is None:
            wav, lengths = SedRectifyCollator.controller_inputs(audio)
            batch = {"rectify_waveforms": wav.to(device), "rectify_waveform_lengths": lengths.to(device)}
        else:
            batch = collator(rows)
        if context is not None:
            batch["rectify_context"] = context[s : s + len(rows)]
        feats, mask = controller_input_features(controller, batch, slm=slm)
        logits = controller(
            ids.to(device),
            input_features=feats,
            feature_attention_mask=mask,
            context=controller_context(controller, batch),
        ).logits
        p_all.append(logits.softmax(-1)[..., 1].cpu().numpy())
        ids_all.append(ids.numpy())
        truth_all.append(SedRectifyCollator.truth_ids(rows).numpy())
        if has_group:
            groups += [str(r.get(GROUP_COLUMN)) for r in rows]
    return np.concatenate(p_all), np.concatenate(ids_all), np.concatenate(truth_all), (groups if has_group else None)


def audit_controller(
    controller: SedControllerModel,
    dataset,
    batch_size: int = 32,
    sed_source: str = "auto",
    slm=None,
    processor=None,
) -> dict:
    """Correct descriptor labels (vs the ground-truth columns) over an annotated dataset after the
    controller's rectification, beside the annotation's own accuracy: ``expected`` under its
    stochastic policy (P(modify) x the chance that the replacement drawn by ``modify_strategy`` is
    right) and ``greedy`` (modify where P(modify) > 0.5), per field and overall. Unlike the
    training logs this has no sampling noise and sees every utterance. Rows without ground truth
    for a field are left out of that field.

    Per field, ``repair`` counts the labels the greedy policy fixes (wrong -> right, expected over
    the replacement's draw), breaks (right -> wrong) and leaves unchanged; ``modify_auc`` is the
    ROC AUC of P(modify) for "the annotated label is wrong" (0.5: it does not tell them apart;
    None: the field has only wrong or only right labels). With a ``group`` column (the speaker
    group), ``by_group`` gives the same per field and group.

    ``slm`` / ``processor``: the SER-SLM and its processor, needed (and used) only for a controller
    that reads the SLM's SED-branch features (``controller_input="sed_branch"``); it reads them as
    in training (``controller_input_features``). A controller with a speaker context
    (``controller_speaker_context``) needs ``dataset``'s ``speaker`` and measurement columns: it reads
    the z-scores within each speaker over ``dataset``'s rows (the training data in the recipe)."""
    was_training = controller.training
    controller.eval()
    try:
        p_mod, v_all, truth, groups = _modify_probabilities(
            controller, dataset, batch_size, sed_source, slm=slm, processor=processor
        )
    finally:
        controller.train(was_training)
    strategy = controller.config.modify_strategy
    known_all = truth >= 0
    if not known_all.any():
        raise ValueError("audit_controller needs ground-truth descriptor columns (pitch, volume, ...) in the dataset")

    def fields(rows: np.ndarray) -> dict[str, dict]:
        out = {}
        for j, f in enumerate(SED_FIELDS):
            known = known_all[:, j] & rows
            if known.any():
                out[f] = _field_repair(p_mod[known, j], v_all[known, j], truth[known, j], len(SED_VOCAB[f]), strategy)
        return out

    per_field = fields(np.ones(len(p_mod), dtype=bool))
    total = sum(r["count"] for r in per_field.values())
    audit = {
        "n": max(r["count"] for r in per_field.values()),
        "annotation_accuracy": _r4(sum(r["annotation"] for r in per_field.values()) / total),
        "expected_accuracy": _r4(sum(r["expected"] for r in per_field.values()) / total),
        "greedy_accuracy": _r4(sum(r["greedy"] for r in per_field.values()) / total),
        "per_field": {
            f: {
                "annotation": _r4(r["annotation"] / r["count"]),
                "expected": _r4(r["expected"] / r["count"]),
                "greedy": _r4(r["greedy"] / r["count"]),
                "modify_probability": _r4(r["modify_probability"] / r["count"]),
                # counts of labels: wrong ones the greedy policy makes right, right ones it makes wrong, untouched
                "repair": {
                    "fixed": _r4(r["fixed"]),
                    "broken": r["broken"],
                    "unchanged_wrong": r["unchanged_wrong"],
                    "unchanged_right": r["unchanged_right"],
                    "expected_fixed": _r4(r["expected_fixed"]),
                    "expected_broken": _r4(r["expected_broken"]),
                },
            }
            for f, r in per_field.items()
        },
        # does P(modify) single out the wrong labels, per utterance (not a constant field flip)?
        "modify_auc": {f: _r4(r["modify_auc"]) for f, r in per_field.items()},
    }
    if groups is not None:
        g = np.asarray(groups)
        audit["by_group"] = {
            name: {f: _repair_summary(r) for f, r in fields(g == name).items()} for name in sorted(set(groups))
        }
    return audit


__all__ = ["audit_controller"]
