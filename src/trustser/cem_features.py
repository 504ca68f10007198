"""The CEM's input features and its scores for them, one definition for CEM training, selection and
the explain pipeline: the SER-SLM's last-layer hidden states (before the LM head) for an utterance
teacher-forced with a caption, pooled at the descriptor tokens (``sed_tokens``) or over the caption
(``mean``); ``predict_cem`` turns features into per-field confidences."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import torch

from .descriptors import SED_FIELDS, SED_SOURCES, build_caption, sed_from_row
from .models.cem import CEM_POOLINGS, DEFAULT_POOLING

logger = logging.getLogger(__name__)

# where the claimed descriptors come from: a column source (SED_SOURCES) or given per row (sed=)
FEATURE_SED_SOURCES: tuple[str, ...] = (*SED_SOURCES, "predicted")


def cem_features(states: torch.Tensor, enc, pooling: str) -> torch.Tensor:
    """The CEM's input pooled from (B, L, H) teacher-forced hidden states and the processor's
    output for the captions (``sed_token_index``, ``labels``): ``sed_tokens`` concatenates the
    states at the first token of each descriptor value (B, 5*H; a row lacking a descriptor token
    is NaN), ``mean`` averages the caption tokens' states (B, H)."""
    if pooling == "sed_tokens":
        idx = enc["sed_token_index"].to(states.device)
        gathered = torch.gather(states, 1, idx.clamp(min=0)[..., None].expand(-1, -1, states.shape[-1]))
        feats = gathered.reshape(states.shape[0], -1).clone()
        feats[(idx < 0).any(dim=1)] = float("nan")
        return feats
    if pooling == "mean":
        m = (enc["labels"] != -100).to(states.device)
        return (states * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    raise ValueError(f"unknown CEM feature pooling {pooling!r}")


@torch.no_grad()
def extract_cem_features(
    slm,
    processor,
    dataset,
    *,
    sed_source: str = "truth",
    pooling: str = DEFAULT_POOLING,
    batch_size: int = 16,
    sed: Sequence[Mapping[str, str | None]] | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """SER-SLM last-layer hidden states (before the LM head) for each utterance teacher-forced with
    the caption "transcription + emotion + descriptors", pooled to one vector:

    - ``sed_tokens``: the states at the first token of each of the five descriptor values,
      concatenated in SED_FIELDS order (5*H); each state has seen the audio and the claimed value;
    - ``mean``: the mean over the caption tokens (H).

    Descriptors come from the reliable columns (``truth``), the annotation (``auto``, columns
    ``<field>_auto``), the pseudo-labels (``pseudo``, ``<field>_pseudo``) or ``sed`` (``predicted``:
    a list of per-row dicts, e.g. parsed SLM output). Pooling: ``cem_features``.
    Rows whose descriptors are missing/invalid (failed annotation, unparseable prediction) get a
    NaN row, so callers keep row alignment and can flag them.
    """
    from .audio import read_rows

    if sed_source not in FEATURE_SED_SOURCES:
        raise ValueError(f"sed_source must be one of {FEATURE_SED_SOURCES}, got {sed_source!r}")
    if pooling not in CEM_POOLINGS:
        raise ValueError(f"pooling must be one of {CEM_POOLINGS}, got {pooling!r}")
    if sed_source == "predicted" and (sed is None or len(sed) != len(dataset)):
        raise ValueError("sed_source='predicted' needs sed= with one descriptor dict per dataset row")
    if sed_source in ("auto", "pseudo"):
        missing = [
            f + SED_SOURCES[sed_source] for f in SED_FIELDS if f + SED_SOURCES[sed_source] not in dataset.column_names
        ]
        if missing:
            made_by = "`trustser annotate`" if sed_source == "auto" else "the controller's pseudo-labelling"
            raise ValueError(f"dataset has no {sed_source} descriptor columns {missing}; run {made_by} first")
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    hidden = slm.config.text_config.hidden_size
    dim = hidden * (len(SED_FIELDS) if pooling == "sed_tokens" else 1)
    out = np.full((len(order), dim), np.nan, dtype=np.float32)
    device = next(slm.parameters()).device
    was_training = slm.training
    slm.eval()
    steps = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"CEM features ({sed_source})")
    for start in steps:
        pos = order[start : start + batch_size]
        rows, wavs, errors = read_rows(dataset, pos)  # one unreadable file only flags its own row
        if sed_source == "predicted":
            seds = [dict(sed[i]) for i in pos]
        else:
            seds = [sed_from_row(r, SED_SOURCES[sed_source]) for r in rows]
        captions, keep, audio, kept_rows = [], [], [], []
        for j, (row, s) in enumerate(zip(rows, seds)):
            if errors[j] is not None:  # a corpus run continues: NaN row, logged
                logger.warning("CEM features: %s", errors[j])
                continue
            try:
                caption = build_caption(row["text"], row["emotion"], s)
            except ValueError:
                continue  # invalid/missing descriptor (failed annotation, unparseable prediction): NaN row
            wav = wavs[j]
            captions.append(caption)
            audio.append(wav)
            kept_rows.append(row)
            keep.append(j)
        if not keep:
            continue
        enc = processor(audio=audio, captions=captions, f0_tracks=processor.f0_tracks_of(kept_rows, audio))
        model_inputs = {
            k: v.to(device) for k, v in enc.items() if k not in ("labels", "sed_token_index", "emotion_token_mask")
        }
        res = slm(**model_inputs, output_hidden_states=True, logits_to_keep=1, return_dict=True)
        states = res.hidden_states[-1].float()  # (B, L, H), last decoder layer (normed), before the LM head
        if pooling == "sed_tokens" and bool((enc["sed_token_index"] < 0).any()):
            bad = int((enc["sed_token_index"] < 0).any(dim=1).sum())
            logger.warning("descriptor tokens not found for %d rows: left as NaN", bad)
        out[[start + j for j in keep]] = cem_features(states, enc, pooling).cpu().numpy()
    slm.train(was_training)
    return out


@torch.no_grad()
def predict_cem(cem, features, batch_size: int = 1024) -> np.ndarray:
    """(N, 5) field confidences for (N, D) features; rows with non-finite features give NaN."""
    x = np.asarray(features, dtype=np.float32)
    out = np.full((len(x), cem.config.num_fields), np.nan, dtype=np.float32)
    ok = np.flatnonzero(np.all(np.isfinite(x), axis=1))
    was_training = cem.training
    cem.eval()
    device = next(cem.parameters()).device
    for start in range(0, len(ok), batch_size):
        rows = ok[start : start + batch_size]
        res = cem(torch.from_numpy(x[rows]).to(device))
        out[rows] = res.field_confidence.float().cpu().numpy()
    cem.train(was_training)
    return out


__all__ = ["cem_features", "extract_cem_features", "predict_cem", "FEATURE_SED_SOURCES", "DEFAULT_POOLING"]
