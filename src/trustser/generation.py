"""Greedy caption generation by the SER-SLM, the one loop: evaluation (``generate_captions``), CEM
training data and pseudo-labels (``generate_sed_predictions``) and the explain pipeline
(``greedy_captions`` on its prompts) all generate through ``greedy_captions``, so a caption is the
same whichever of them asks for it (left-padded prompts, greedy, one beam, EOS of the tokenizer)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .descriptors import SED_FIELDS, parse_caption

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 96


def max_new_tokens_of(model, max_new_tokens: int | None = None) -> int:
    """``max_new_tokens``, else the model's generation config's, else 96."""
    return max_new_tokens or getattr(model.generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS


@torch.no_grad()
def greedy_captions(
    model, processor, prompts, *, max_new_tokens: int, audio_embeds: torch.Tensor | None = None
) -> list[str]:
    """Greedy captions (stripped) for a batch of generation prompts
    (``processor(audio=..., padding_side="left")``, on the model's device). With ``audio_embeds``
    (``model.get_audio_features(...).pooler_output`` of the prompts) the audio is not encoded again."""
    tok = processor.tokenizer
    if audio_embeds is None:
        inputs = dict(prompts)
    else:
        inputs = {
            "input_ids": prompts["input_ids"],
            "attention_mask": prompts["attention_mask"],
            "audio_embeds": audio_embeds,
        }
    gen = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return [t.strip() for t in tok.batch_decode(gen[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)]


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
    from .audio import AudioError, read_rows

    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = max_new_tokens_of(model, max_new_tokens)
    out: list[str | None] = []
    failed: dict[int, str] = {}
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for s in starts:
        idx = list(range(s, min(len(dataset), s + batch_size)))
        rows, audio, errs = read_rows(dataset, idx, audio_column)
        for i, e in zip(idx, errs):
            if e is not None:
                if errors == "raise":
                    raise AudioError(e)
                logger.warning("skipped: %s", e)
                failed[i] = e
        good = [(r, a) for r, a in zip(rows, audio) if a is not None]
        texts = iter([])
        if good:
            good_rows, good_audio = zip(*good)
            prompts = processor(
                audio=list(good_audio), padding_side="left", f0_tracks=processor.f0_tracks_of(good_rows, good_audio)
            )
            prompts = {k: v.to(device) for k, v in prompts.items()}
            texts = iter(greedy_captions(model, processor, prompts, max_new_tokens=max_new_tokens))
        out.extend(None if a is None else next(texts) for a in audio)
    return (out, failed) if return_errors else out


def generate_sed_predictions(
    slm,
    processor,
    dataset,
    *,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    indices: Sequence[int] | None = None,
) -> tuple[list[str], list[dict]]:
    """Greedy captions from the SER-SLM (``generate_captions``; an unusable row raises) and the
    descriptors parsed from them (a field that could not be parsed is ``None``); the model's
    training mode is kept."""
    data = dataset if indices is None else dataset.select([int(i) for i in indices])
    was_training = slm.training
    captions = generate_captions(slm, processor, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
    slm.train(was_training)
    parsed = []
    for t in captions:
        p = parse_caption(t)
        parsed.append({f: p.fields.get(f) for f in SED_FIELDS})
    return captions, parsed


__all__ = [
    "greedy_captions",
    "generate_captions",
    "generate_sed_predictions",
    "max_new_tokens_of",
    "DEFAULT_MAX_NEW_TOKENS",
]
