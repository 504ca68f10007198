"""ChannelAugmentation: level kept, band actually limited, reproducible, reaches the training batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ser_slm_fixtures import LABELS, TEXTS, make_dataset, make_rows

import trustser
from trustser.models.ser_slm import build_tiny_ser_slm
from trustser.trainers.sft import SerSlmDataCollator, SerSlmSFTConfig, SerSlmSFTTrainer

SR = 16000


def _tones(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.05 * (np.sin(2 * np.pi * 40 * t) + np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 7500 * t))).astype(
        np.float32
    )


def _band_power(x: np.ndarray, f: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    return float(spec[np.argmin(np.abs(freqs - f))])


def test_band_limits_keeps_level_and_adds_the_noise_floor():
    x = _tones()
    aug = trustser.ChannelAugmentation(
        probability=1.0,
        band_probability=1.0,
        noise_probability=1.0,
        low_cut_hz=(200.0, 250.0),
        high_cut_hz=(3000.0, 3500.0),
        noise_dbfs=(-60.0, -60.0),
    )
    y = aug(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    rms = lambda v: float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))  # noqa: E731
    # the level is the input's (+ the -60 dBFS noise floor, 0.001 RMS)
    assert rms(y) == pytest.approx(np.sqrt(rms(x) ** 2 + 1e-6), rel=0.02)
    # in-band tone survives, out-of-band tones drop by > 40 dB relative to it
    ref = _band_power(y, 1000) / _band_power(x, 1000)
    assert _band_power(y, 7500) / _band_power(x, 7500) < ref * 1e-4
    assert _band_power(y, 40) / _band_power(x, 40) < ref * 1e-4


def test_probability_zero_is_identity_and_draws_are_seeded():
    x = _tones(0.5)
    assert trustser.ChannelAugmentation(probability=0.0)(x) is x
    a = trustser.ChannelAugmentation(probability=0.7, seed=3)
    b = trustser.ChannelAugmentation(probability=0.7, seed=3)
    c = trustser.ChannelAugmentation(probability=0.7, seed=4)
    outs_a, outs_b, outs_c = ([aug(x) for _ in range(10)] for aug in (a, b, c))
    assert all(np.array_equal(u, v) for u, v in zip(outs_a, outs_b))
    assert not all(np.array_equal(u, v) for u, v in zip(outs_a, outs_c))
    changed = sum(not np.array_equal(u, x) for u in outs_a)
    assert 3 <= changed <= 10  # roughly 70% of utterances pass through a channel


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"probability": 1.5}, "probability"),
        ({"low_cut_hz": (500.0, 400.0)}, "low_cut_hz"),
        ({"high_cut_hz": (3000.0, 9000.0)}, "Nyquist"),
    ],
)
def test_invalid_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trustser.ChannelAugmentation(**kwargs)


def test_collator_applies_it_and_the_trainer_builds_it_from_the_config(tmp_path):
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS)
    rows = make_rows(4)
    plain = SerSlmDataCollator(processor)(rows)
    aug = trustser.ChannelAugmentation(probability=1.0, band_probability=1.0, noise_probability=0.0)
    augmented = SerSlmDataCollator(processor, augmentation=aug)(rows)
    assert torch.equal(plain["input_ids"], augmented["input_ids"]) and torch.equal(plain["labels"], augmented["labels"])
    assert not torch.allclose(plain["input_features"], augmented["input_features"])
    # level kept: the energy stream's loudest frames barely move
    assert torch.allclose(plain["energy"].max(-1).values, augmented["energy"].max(-1).values, atol=3.0)

    args = SerSlmSFTConfig(output_dir=str(tmp_path), use_cpu=True, channel_augmentation=0.3, seed=5, max_steps=1)
    trainer = SerSlmSFTTrainer(model=model, args=args, train_dataset=make_dataset(4), processing_class=processor)
    built = trainer.data_collator.augmentation
    assert isinstance(built, trustser.ChannelAugmentation) and built.probability == 0.3 and built.seed == 5
    off = SerSlmSFTTrainer(
        model=model,
        args=SerSlmSFTConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=1),
        train_dataset=make_dataset(4),
        processing_class=processor,
    )
    assert off.data_collator.augmentation is None


def test_evaluation_batches_are_not_augmented(tmp_path):
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS)
    args = SerSlmSFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        channel_augmentation=1.0,
        max_steps=1,
        per_device_eval_batch_size=4,
        report_to="none",
    )
    ds = make_dataset(4)
    trainer = SerSlmSFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=processor)
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    plain = SerSlmDataCollator(processor)(make_rows(4))
    assert torch.allclose(eval_batch["input_features"].cpu(), plain["input_features"])
    assert trainer.data_collator.augmentation is not None  # training batches still are
