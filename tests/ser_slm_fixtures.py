"""Small, fast inputs shared by the SER-SLM, SFT and evaluation tests (no espeak-ng needed)."""

from __future__ import annotations

import numpy as np

from trustser.descriptors import EMOTION_LABELS, SED_FIELDS, SED_VOCAB

TEXTS = [
    "She bought bread and some apples.",
    "The train leaves at nine tonight.",
    "I cannot believe you did that!",
    "We walked along the quiet river.",
    "Please close the door behind you.",
    "My brother plays the old piano.",
]
LABELS = list(EMOTION_LABELS["synthetic"])


def tone(seconds: float, f0: float, amp: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A harmonic tone with a little noise: cheap, deterministic 'speech-like' audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5))
    wav = wav * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (amp * wav / np.abs(wav).max() + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def make_rows(n: int = 8, seed: int = 0) -> list[dict]:
    """Corpus-schema rows whose descriptors follow the audio (pitch from f0, volume from amplitude)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pitch = SED_VOCAB["pitch"][i % 3]
        volume = SED_VOCAB["volume"][(i // 3) % 3]
        f0 = {"low": 110.0, "normal": 180.0, "high": 280.0}[pitch]
        amp = {"low": 0.05, "normal": 0.2, "high": 0.7}[volume]
        row = {
            "id": f"utt{i:03d}",
            "audio": {"array": tone(1.0 + 0.25 * (i % 4), f0, amp, seed=i), "sampling_rate": 16000},
            "text": TEXTS[i % len(TEXTS)],
            "emotion": LABELS[i % len(LABELS)],
            "speaker": f"spk{i % 2}",
            "gender": "female" if i % 2 else "male",
            "age": SED_VOCAB["age"][i % 5],
            "pitch": pitch,
            "volume": volume,
            "speed": SED_VOCAB["speed"][i % 3],
        }
        # the annotator disagrees on a few fields
        for f in SED_FIELDS:
            vocab = SED_VOCAB[f]
            row[f + "_auto"] = row[f] if rng.random() < 0.7 else vocab[(vocab.index(row[f]) + 1) % len(vocab)]
        row["annotation_error"] = ""
        rows.append(row)
    return rows


def make_dataset(n: int = 8, seed: int = 0):
    import datasets

    return datasets.Dataset.from_list(make_rows(n, seed))


def train_tiny(output_dir, *, rows: int, steps: int, batch: int, logging_steps: int, **build_kwargs):
    """A short real SerSlmSFTTrainer run of a fresh tiny SER-SLM on ``make_dataset(rows)``; returns
    ``(trainer, processor)``."""
    from trustser.models.ser_slm import build_tiny_ser_slm
    from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer

    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=0, **build_kwargs)
    args = SerSlmSFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=3e-3,
        logging_steps=logging_steps,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SerSlmSFTTrainer(model=model, args=args, train_dataset=make_dataset(rows), processing_class=processor)
    trainer.train()
    return trainer, processor
