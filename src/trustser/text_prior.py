"""Language knowledge for the tiny preset: a short text-only pre-training of its random-init LM on
captions whose descriptors follow the textbook relation between prosody and emotion.

The paper's LLM (Llama-3.1-8B-Instruct) arrives knowing from text that sad speech tends to be low,
quiet and slow, so the emotion word it writes after "a low pitch and a low volume" reads those
words; that is what lets wrong descriptors mislead it and right ones help. A randomly initialised
2-layer LM knows nothing, and within a few hundred post-training steps it reads the emotion from
the audio alone (README, "Does the emotion follow the caption's descriptors?"). This module gives it
the textbook knowledge first, from text only: the *direction* of each emotion's pitch / volume /
speed shift as the speech-emotion literature summarises it (Juslin & Laukka, 2003, Psychological
Bulletin 129(5): anger and happiness raise F0, intensity and rate, sadness lowers all three, fear
raises F0 and rate), at one strength for every emotion. The strength and spread are generic; no
corpus' emotion-to-prosody table is read, and the transcripts come from the pre-training corpus.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .models.ser_slm.processing_ser_slm import DEFAULT_SED_VOCAB

logger = logging.getLogger("trustser.text_prior")

# direction of the (pitch, volume, speed) shift per emotion: +1 raised, -1 lowered, 0 no consistent
# direction in the review; emotions not listed (e.g. "frustrated", "other") get no shift
TEXTBOOK_DIRECTIONS: dict[str, tuple[int, int, int]] = {
    "neutral": (0, 0, 0),
    "happy": (1, 1, 1),
    "excited": (1, 1, 1),
    "angry": (1, 1, 1),
    "sad": (-1, -1, -1),
    "fearful": (1, 0, 1),
    "surprised": (1, 0, 0),
    "disgusted": (-1, 0, -1),
}
PROSODIC_FIELDS = ("pitch", "volume", "speed")  # each vocabulary ordered lowered / normal / raised


def textbook_rows(
    texts: Sequence[str],
    emotions: Sequence[str],
    num_rows: int,
    *,
    seed: int = 0,
    strength: float = 0.75,
    spread: float = 0.6,
    sed_vocab: dict | None = None,
) -> list[dict]:
    """``num_rows`` caption rows (descriptors, text, emotion): emotion uniform over ``emotions``, each
    prosodic descriptor the category (|z| <= 0.5 normal) of ``strength`` x the textbook direction
    plus N(0, ``spread``) noise, age and gender uniform (the words carry no emotion), the transcript
    drawn from ``texts``; words from ``sed_vocab`` (the processor's). Deterministic per ``seed``."""
    if not texts or not emotions:
        raise ValueError("textbook_rows needs transcripts and emotion labels")
    vocab = sed_vocab or DEFAULT_SED_VOCAB
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(int(num_rows)):
        emotion = emotions[int(rng.integers(len(emotions)))]
        direction = TEXTBOOK_DIRECTIONS.get(emotion, (0, 0, 0))
        row = {"emotion": emotion, "text": texts[int(rng.integers(len(texts)))]}
        for field, d in zip(PROSODIC_FIELDS, direction):
            z = strength * d + spread * rng.standard_normal()
            row[field] = vocab[field][0 if z < -0.5 else 2 if z > 0.5 else 1]
        for field in ("age", "gender"):
            row[field] = vocab[field][int(rng.integers(len(vocab[field])))]
        rows.append(row)
    return rows


class TextPriorCollator:
    """Caption rows -> the SER-SLM's text-only training inputs: BOS + instruction + caption + EOS,
    the loss on the caption (the audio placeholders of a real row are simply absent)."""

    def __init__(self, processor):
        self.processor = processor
        self.prompt = processor.prompt_ids([0])[0]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        captions = self.processor.build_captions(rows)
        batch = self.processor.caption_inputs([self.prompt] * len(rows), captions)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def train_text_prior(
    model,
    processor,
    texts: Sequence[str],
    emotions: Sequence[str],
    *,
    steps: int,
    output_dir: str | Path,
    learning_rate: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Trains ``model``'s language model and LM head (in place) for ``steps`` steps on textbook
    caption rows with transformers' ``Trainer``; the audio path is untouched. Returns the log."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = textbook_rows(texts, emotions, steps * batch_size, seed=seed, sed_vocab=processor.sed_vocab)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        max_steps=steps,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=seed,
        data_seed=seed,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=TextPriorCollator(processor),
    )
    trainer.train()
    return trainer.state.log_history
