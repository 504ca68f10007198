"""The tiny preset's text prior: textbook caption rows and their text-only training."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from trustser.models.ser_slm import build_tiny_ser_slm
from trustser.models.ser_slm.processing_ser_slm import DEFAULT_SED_VOCAB
from trustser.text_prior import TextPriorCollator, textbook_rows, train_text_prior

TEXTS = [
    "the weather is fine today",
    "please close the door",
    "i will be there at noon",
    "we read the book together",
    "they walked home slowly",
    "she found the keys on the table",
]
EMOTIONS = ["neutral", "happy", "angry", "sad"]


def test_rows_are_deterministic_and_follow_the_textbook_directions():
    rows = textbook_rows(TEXTS, EMOTIONS, 4000, seed=3)
    assert rows == textbook_rows(TEXTS, EMOTIONS, 4000, seed=3)
    assert rows != textbook_rows(TEXTS, EMOTIONS, 4000, seed=4)
    for row in rows[:50]:
        for field, vocab in DEFAULT_SED_VOCAB.items():
            assert row[field] in vocab
        assert row["text"] in TEXTS and row["emotion"] in EMOTIONS
    by_emotion = {e: [r for r in rows if r["emotion"] == e] for e in EMOTIONS}
    assert all(800 < len(v) < 1200 for v in by_emotion.values())  # uniform emotions

    def share(e, field, value):
        return sum(r[field] == value for r in by_emotion[e]) / len(by_emotion[e])

    # strength 0.75, spread 0.6: P(z > 0.5) = P(N > -0.42) ~ 0.66 when raised, ~0.20 when not, ~0.02 when lowered
    for field, raised, lowered in (("pitch", "high", "low"), ("volume", "high", "low"), ("speed", "fast", "slow")):
        assert share("sad", field, lowered) > 0.6 and share("sad", field, raised) < 0.05
        assert share("angry", field, raised) > 0.6 and share("angry", field, lowered) < 0.05
        assert 0.12 < share("neutral", field, raised) < 0.28
    # age and gender carry no emotion: the same spread for every emotion
    for e in EMOTIONS:
        genders = Counter(r["gender"] for r in by_emotion[e])
        assert abs(genders["female"] / len(by_emotion[e]) - 0.5) < 0.06


def test_rows_need_texts_and_emotions():
    with pytest.raises(ValueError, match="transcripts and emotion"):
        textbook_rows([], EMOTIONS, 3)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_ser_slm(
        TEXTS * 5, emotion_labels=EMOTIONS, vocab_size=400, lm_hidden=64, lm_layers=1, encoder_dim=64, seed=0
    )


def test_collator_gives_text_only_rows_with_the_loss_on_the_caption(tiny):
    _, processor = tiny
    rows = textbook_rows(TEXTS, EMOTIONS, 3, seed=0)
    batch = TextPriorCollator(processor)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert not (batch["input_ids"] == processor.audio_token_id).any()
    captions = processor.build_captions(rows)
    for i, caption in enumerate(captions):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert processor.tokenizer.decode(labelled, skip_special_tokens=True) == caption
        n_prompt = int((batch["labels"][i] == -100).logical_and(batch["attention_mask"][i] == 1).sum())
        assert n_prompt == len(TextPriorCollator(processor).prompt)


def _emotion_probs(model, processor, pitch, volume, speed):
    """P(emotion word) after a teacher-forced caption with these descriptors."""
    row = dict(age="young adult", gender="female", pitch=pitch, volume=volume, speed=speed)
    row.update(text=TEXTS[1], emotion=EMOTIONS[0])
    batch = processor.caption_inputs([TextPriorCollator(processor).prompt], processor.build_captions([row]))
    at = int(batch["emotion_token_mask"][0].nonzero()[0]) - 1  # the position that predicts the emotion word
    ids = [processor.tokenizer(" " + e, add_special_tokens=False)["input_ids"][0] for e in EMOTIONS]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return dict(zip(EMOTIONS, torch.softmax(logits[0, at, ids], -1).tolist()))


def test_training_teaches_the_lm_to_read_the_descriptors(tiny, tmp_path):
    model, processor = tiny
    audio_before = {
        k: v.clone() for k, v in model.named_parameters() if "language_model" not in k and "lm_head" not in k
    }
    log = train_text_prior(
        model, processor, TEXTS, EMOTIONS, steps=200, output_dir=tmp_path, batch_size=32, learning_rate=5e-3
    )
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] / 3
    model.eval()
    low = _emotion_probs(model, processor, "low", "low", "slow")
    high = _emotion_probs(model, processor, "high", "high", "fast")
    normal = _emotion_probs(model, processor, "normal", "normal", "normal")
    assert low["sad"] > 0.6 and high["sad"] < 0.05
    assert high["happy"] + high["angry"] > 0.7
    assert max(normal, key=normal.get) == "neutral"
    # only the language model and its head learn: the audio path is as it was
    for k, v in model.named_parameters():
        if k in audio_before:
            assert torch.equal(v, audio_before[k]), k
