"""SerSlmDataCollator / SerSlmSFTConfig / SerSlmSFTTrainer: label masking, caption sources, a real short run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ser_slm_fixtures import LABELS, TEXTS, make_dataset, make_rows, train_tiny

import trustser  # noqa: F401
from trustser.audio import AudioError, decode_audio
from trustser.descriptors import build_caption, parse_caption, sed_from_row
from trustser.models.ser_slm import build_tiny_ser_slm
from trustser.trainers.sft import SerSlmDataCollator, SerSlmSFTConfig, SerSlmSFTTrainer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_ser_slm(TEXTS, emotion_labels=LABELS)[1]


def _caption_text(processor, b, i):
    keep = b["labels"][i] != -100
    return processor.tokenizer.decode(b["input_ids"][i][keep], skip_special_tokens=True)


@pytest.mark.parametrize("source,suffix", [("truth", ""), ("auto", "_auto")])
def test_collator_builds_captions_from_the_chosen_columns(processor, source, suffix):
    rows = make_rows(6)
    b = SerSlmDataCollator(processor, sed_source=source)(rows)
    for i, r in enumerate(rows):
        assert _caption_text(processor, b, i) == build_caption(r["text"], r["emotion"], sed_from_row(r, suffix))


def test_collator_label_masking(processor):
    rows = make_rows(4)
    b = SerSlmDataCollator(processor)(rows)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert ((labels == -100) | (labels == ids)).all()
    assert (labels[mask == 0] == -100).all()  # padding
    assert (labels[ids == processor.audio_token_id] == -100).all()  # audio placeholders
    for i in range(len(rows)):
        lab = (labels[i] != -100).nonzero().flatten()
        # one contiguous block that ends with eos: caption only
        assert torch.equal(lab, torch.arange(int(lab[0]), int(lab[-1]) + 1))
        assert int(ids[i, lab[-1]]) == processor.tokenizer.eos_token_id
        assert int(lab[-1]) == int(mask[i].sum()) - 1  # right padding
    assert b["sed_token_index"].shape == (4, 5) and (b["sed_token_index"] >= 0).all()


def test_collator_plain_caption_and_ready_captions(processor):
    rows = make_rows(3)
    b = SerSlmDataCollator(processor, with_sed=False)(rows)
    text = _caption_text(processor, b, 0)
    assert text == build_caption(rows[0]["text"], rows[0]["emotion"], with_sed=False)
    assert parse_caption(text, with_sed=False).ok
    assert (b["sed_token_index"] == -1).all() and b["emotion_token_mask"].any(-1).all()
    ready = [
        dict(
            r,
            caption=f"The speaker says '{r['text']}'. Based on the audio caption, the emotional state of this speaker is sad.",
        )
        for r in rows
    ]
    b2 = SerSlmDataCollator(processor, with_sed=False, caption_column="caption")(ready)
    assert _caption_text(processor, b2, 1).endswith("is sad.")


@pytest.mark.faults
def test_collator_errors_name_the_row(processor):
    rows = make_rows(2)
    rows[1]["volume_auto"] = ""
    with pytest.raises(ValueError, match="utt001.*volume_auto"):
        SerSlmDataCollator(processor, sed_source="auto")(rows)
    rows = make_rows(2)
    rows[0]["audio"] = {"array": np.zeros(0, np.float32), "sampling_rate": 16000}
    with pytest.raises(AudioError, match="utt000"):
        SerSlmDataCollator(processor)(rows)
    with pytest.raises(ValueError, match="sed_source"):
        SerSlmDataCollator(processor, sed_source="oracle")


def test_decode_audio_resamples_and_downmixes():
    x = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32)
    y = decode_audio({"array": x, "sampling_rate": 8000}, "r1")
    assert y.ndim == 1 and abs(y.size - 16000) <= 2 and y.dtype == np.float32


def test_sft_config_defaults(tmp_path):
    cfg = SerSlmSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False and cfg.remove_unused_columns is False
    assert cfg.dataset_kwargs == {"skip_prepare_dataset": True} and cfg.sed_source == "truth" and cfg.with_sed
    with pytest.raises(ValueError, match="sed_source"):
        SerSlmSFTConfig(output_dir=str(tmp_path), sed_source="nope")


def test_short_training_lowers_loss_and_logs_parts(tmp_path):
    """A real (short) TRL run: the loss falls and lm_loss / kl_loss are logged separately."""
    trainer, _ = train_tiny(tmp_path, rows=8, steps=12, batch=4, logging_steps=4)
    model = trainer.model
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert len(logs) == 3
    assert all(h["kl_loss"] > 0 for h in logs)
    assert logs[-1]["lm_loss"] < 0.8 * logs[0]["lm_loss"]
    # the logged total is lm + beta * kl (same batches)
    assert logs[0]["loss"] == pytest.approx(logs[0]["lm_loss"] + model.config.vib_beta * logs[0]["kl_loss"], rel=0.02)


@pytest.mark.slow
def test_training_until_generated_captions_parse(tmp_path):
    from trustser.evaluation import evaluate_ser

    ds = make_dataset(8)
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=0)
    args = SerSlmSFTConfig(
        output_dir=str(tmp_path),
        max_steps=150,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=50,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    SerSlmSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor).train()
    metrics = evaluate_ser(model, processor, ds, LABELS)
    assert metrics["unparseable_rate"] <= 0.25
    assert metrics["wa"] >= 0.5  # memorised training set
