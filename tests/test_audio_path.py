"""The audio path of a randomly initialised SER-SLM: embeddings at a usable scale, the auxiliary
descriptor/CTC losses, the F0 cache of the collator, and a short training that must use the audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ser_slm_fixtures import LABELS, TEXTS, make_rows, train_tiny

import trustser  # noqa: F401
from trustser.descriptors import SED_FIELDS, SED_VOCAB, parse_caption
from trustser.models.ser_slm import SerSlmForConditionalGeneration, build_tiny_ser_slm
from trustser.models.ser_slm import processing_ser_slm as P
from trustser.trainers.sft import MODEL_INPUTS, SerSlmDataCollator

torch.set_num_threads(1)


def _inputs(b):
    return {k: v for k, v in b.items() if k in MODEL_INPUTS}


def _audio_token_rows(model, b):
    n = (b["input_ids"] == model.config.audio_token_id).sum(-1)
    with torch.no_grad():
        emb = (
            model.eval().get_audio_features(b["input_features"], b["feature_attention_mask"], b["energy"]).pooler_output
        )
    return torch.cat([emb[i, : int(k)] for i, k in enumerate(n)])


def test_audio_embeddings_start_above_the_text_embedding_scale():
    """Regression: with the LM's N(0, 0.02) init on the five audio-path layers, audio embeddings
    started at std ~1e-3, under the LM's RMSNorm epsilon, and the model learned to ignore audio."""
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=0)
    rows = make_rows(4)
    b = processor(audio=[r["audio"]["array"] for r in rows], captions=processor.build_captions(rows))
    audio_std = float(_audio_token_rows(model, b).std())
    text_std = float(model.get_input_embeddings().weight.detach().std())
    assert audio_std > 2 * text_std and audio_std > 0.05
    # Xavier on the flagged layers only: the LM keeps its own init
    assert float(model.model.projector.linear_2.weight.std()) == pytest.approx((2 / 256) ** 0.5, rel=0.1)
    assert float(model.lm_head.weight.std()) == pytest.approx(0.02, rel=0.1)


def test_auxiliary_labels_from_rows():
    _, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS)
    rows = make_rows(5)
    rows[1]["pitch"] = "squeaky"  # outside the vocabulary -> ignored, not an error
    aux = processor.auxiliary_labels(rows)
    assert aux["sed_labels"].shape == (5, len(SED_FIELDS))
    for i, r in enumerate(rows):
        for j, f in enumerate(SED_FIELDS):
            expected = -100 if (i, f) == (1, "pitch") else SED_VOCAB[f].index(r[f])
            assert int(aux["sed_labels"][i, j]) == expected
        ids = [t for t in aux["ctc_labels"][i].tolist() if t != -100]
        assert processor.tokenizer.decode(ids) == r["text"]
    auto = processor.auxiliary_labels(rows, sed_suffix="_auto")
    assert int(auto["sed_labels"][0, 0]) == SED_VOCAB["pitch"].index(rows[0]["pitch_auto"])
    assert (processor.auxiliary_labels(rows, with_sed=False)["sed_labels"] == -100).all()


def test_auxiliary_losses_add_up_and_match_a_hand_computation():
    model, processor = build_tiny_ser_slm(
        TEXTS, emotion_labels=LABELS, aux_sed_loss_weight=0.5, aux_ctc_loss_weight=0.25, seed=0
    )
    assert [h.out_features for h in model.model.aux_sed_heads] == [len(SED_VOCAB[f]) for f in SED_FIELDS]
    assert model.model.aux_ctc_head.out_features == model.config.text_config.vocab_size
    rows = make_rows(4)
    b = SerSlmDataCollator(processor, aux_labels=True)(rows)
    assert {"sed_labels", "ctc_labels"} <= set(b)
    model.eval()  # VIB mean: the latents are deterministic
    with torch.no_grad():
        out = model(**_inputs(b))
        lat = model.model._audio_latents(b["input_features"], b["feature_attention_mask"], b["energy"])
    cfg = model.config
    torch.testing.assert_close(
        out.loss, out.lm_loss + cfg.vib_beta * out.kl_loss + 0.5 * out.aux_sed_loss + 0.25 * out.aux_ctc_loss
    )
    m = lat["audio_mask"][..., None].float()
    pooled = (lat["z_sed"] * m).sum(1) / m.sum(1)
    ce = [
        F.cross_entropy(h(pooled), b["sed_labels"][:, j], reduction="sum")
        for j, h in enumerate(model.model.aux_sed_heads)
    ]
    torch.testing.assert_close(out.aux_sed_loss, torch.stack(ce).sum() / b["sed_labels"].numel())
    assert out.aux_ctc_loss > 0 and torch.isfinite(out.aux_ctc_loss)
    # without labels (generation, evaluation) the heads cost nothing and change nothing
    with torch.no_grad():
        plain = model(**{k: v for k, v in _inputs(b).items() if k not in ("sed_labels", "ctc_labels")})
    assert plain.aux_sed_loss is None and plain.aux_ctc_loss is None
    torch.testing.assert_close(plain.loss, out.lm_loss + cfg.vib_beta * out.kl_loss)
    # a model without aux heads ignores the labels
    base, _ = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=0)
    assert base.model.aux_sed_heads is None and base.model.aux_ctc_head is None
    with torch.no_grad():
        assert base.eval()(**_inputs(b)).aux_sed_loss is None


def test_aux_heads_save_and_load(tmp_path):
    model, processor = build_tiny_ser_slm(
        TEXTS, emotion_labels=LABELS, aux_sed_loss_weight=1.0, aux_ctc_loss_weight=0.3, seed=0
    )
    model.save_pretrained(tmp_path)
    loaded = SerSlmForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.aux_sed_loss_weight == 1.0 and loaded.config.aux_ctc_loss_weight == 0.3
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_collator_caches_f0_per_row(monkeypatch):
    _, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, sed_f0_stream=True)
    rows = make_rows(3)
    fresh = SerSlmDataCollator(processor)(rows)["f0"]
    calls = []
    real = P.praat_f0
    monkeypatch.setattr(P, "praat_f0", lambda *a, **k: calls.append(1) or real(*a, **k))
    coll = SerSlmDataCollator(processor)
    first = coll(rows)["f0"]
    second = coll(rows)["f0"]
    assert len(calls) == 3  # once per row, not once per batch
    assert torch.equal(first, fresh) and torch.equal(second, fresh)  # the same stream as computing it in the processor
    # channel augmentation changes the features, not the cached F0
    aug = SerSlmDataCollator(
        processor, augmentation=trustser.ChannelAugmentation(probability=1.0, noise_probability=0.0)
    )
    assert torch.equal(aug(rows)["f0"], fresh)


def test_frame_log_energy_frames():
    """25 ms frames every 10 ms from the clip's start, dB of the mean square, -100 dB padding after the
    clip: equal, to the bit, to gathering every frame explicitly."""
    rng = np.random.default_rng(0)
    for size in (100, 400, 401, 16000, 33333):
        wav = (0.1 * rng.standard_normal(size)).astype(np.float32)
        num_frames = 250
        n = min(num_frames, -(-size // 160))
        padded = np.pad(wav, (0, max(0, (n - 1) * 160 + 400 - size)))
        gathered = padded[np.arange(400)[None, :] + 160 * np.arange(n)[:, None]]
        expected = np.full(num_frames, -100.0, dtype=np.float32)
        expected[:n] = 10.0 * np.log10(np.mean(np.square(gathered, dtype=np.float64), axis=1) + 1e-10)
        assert np.array_equal(P.frame_log_energy(wav, num_frames), expected), size
    assert np.all(P.frame_log_energy(np.zeros(0, dtype=np.float32), 5) == -100.0)


def test_collator_reads_the_stored_f0_track_where_it_is_the_clips(monkeypatch):
    """Rows with the annotator's ``f0_track`` need no Praat; a track that is not this clip's (another
    frame count) or a clip longer than the feature window gets Praat's own."""
    _, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, sed_f0_stream=True)
    rows = make_rows(3)
    fresh = SerSlmDataCollator(processor)(rows)["f0"]
    tracks = [processor.f0_track(r["audio"]["array"]) for r in rows]
    calls = []
    real = P.praat_f0
    monkeypatch.setattr(P, "praat_f0", lambda *a, **k: calls.append(1) or real(*a, **k))
    stored = [{**r, "f0_track": t.tolist()} for r, t in zip(rows, tracks)]
    assert torch.equal(SerSlmDataCollator(processor)(stored)["f0"], fresh) and calls == []
    stored[0]["f0_track"] = tracks[0][:-1].tolist()  # not this clip's track
    assert torch.equal(SerSlmDataCollator(processor)(stored)["f0"], fresh) and len(calls) == 1
    window = processor.feature_extractor.n_samples
    long_clip = np.tile(rows[1]["audio"]["array"], window // rows[1]["audio"]["array"].size + 2)
    full = P.praat_f0(long_clip, 16000, -(-long_clip.size // 160))
    assert processor.f0_track(long_clip, full).size == -(-window // 160)  # cut to the window, computed again


def test_trainer_reads_audio_files_itself_with_the_same_samples(tmp_path):
    """The trainers hand the collator undecoded audio cells (decode_audio reads the file, 8x faster
    than datasets' decoder): the batch is the one decoded rows give, tensor for tensor."""
    import datasets
    import soundfile as sf

    from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer

    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=0, sed_f0_stream=True)
    rows = make_rows(4)
    for i, r in enumerate(rows):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, r["audio"]["array"], 16000, subtype="PCM_16")
        r["audio"] = str(path)
    ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(sampling_rate=16000))
    args = SerSlmSFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, use_cpu=True, report_to="none")
    trainer = SerSlmSFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=processor)
    assert trainer.train_dataset.features["audio"].decode is False
    assert trainer.eval_dataset.features["audio"].decode is False
    assert isinstance(trainer.train_dataset[0]["audio"], dict) and trainer.train_dataset[0]["audio"]["path"]
    via_files = SerSlmDataCollator(processor)([trainer.train_dataset[i] for i in range(4)])
    via_datasets = SerSlmDataCollator(processor)([ds[i] for i in range(4)])
    assert via_files.keys() == via_datasets.keys()
    for k in via_files:
        assert torch.equal(via_files[k], via_datasets[k]), k


def test_short_training_learns_to_use_the_audio(tmp_path):
    """Pitch and volume of the fixture follow its audio (F0 ladder, amplitude), not its text: after a
    short run with the auxiliary losses, generated captions state them right from the real audio and
    not from silence; the aux losses are logged and fall. (The same run without the auxiliary losses
    gets 0.28: the captions are learnt from the text prior.)"""
    trainer, processor = train_tiny(
        tmp_path, rows=9, steps=100, batch=9, logging_steps=20, aux_sed_loss_weight=1.0, aux_ctc_loss_weight=0.3
    )
    logs = [h for h in trainer.state.log_history if "aux_sed_loss" in h]
    assert len(logs) == 5 and logs[-1]["aux_sed_loss"] < 0.5 * logs[0]["aux_sed_loss"]
    assert logs[-1]["aux_ctc_loss"] < logs[0]["aux_ctc_loss"]
    rows = make_rows(9)
    prompts = processor(audio=[r["audio"]["array"] for r in rows])
    silent = dict(
        prompts,
        input_features=torch.full_like(prompts["input_features"], float(prompts["input_features"].min())),
        energy=torch.full_like(prompts["energy"], -100.0),
    )

    def pitch_volume_accuracy(batch):
        with torch.no_grad():
            out = trainer.model.eval().generate(**batch, max_new_tokens=60)
        captions = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        fields = [parse_caption(c).fields for c in captions]
        return float(np.mean([f.get(k) == r[k] for f, r in zip(fields, rows) for k in ("pitch", "volume")]))

    assert pitch_volume_accuracy(prompts) >= 0.85
    assert pitch_volume_accuracy(silent) <= 0.5
