"""SER-SLM model, processor and presets: shapes, token positions, KL, save/load, remote code, LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ser_slm_fixtures import LABELS, TEXTS, make_rows, tone

import trustser  # noqa: F401  (registers the Auto classes)
from trustser import descriptors
from trustser.descriptors import SED_FIELDS, build_caption
from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor, build_tiny_ser_slm
from trustser.models.ser_slm import processing_ser_slm as P

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor = tiny
    rows = make_rows(3)
    audio = [r["audio"]["array"] for r in rows]
    captions = processor.build_captions(rows)
    return rows, audio, captions, processor(audio=audio, captions=captions)


def _model_inputs(b):
    return {k: v for k, v in b.items() if k not in ("sed_token_index", "emotion_token_mask")}


def test_templates_match_descriptors():
    assert P.DEFAULT_SED_TEMPLATE == descriptors.SED_TEMPLATE
    assert P.DEFAULT_PLAIN_TEMPLATE == descriptors.PLAIN_TEMPLATE
    assert P.SED_FIELDS == descriptors.SED_FIELDS
    assert {k: tuple(v) for k, v in P.DEFAULT_SED_VOCAB.items()} == descriptors.SED_VOCAB


def test_build_captions_matches_build_caption(tiny):
    _, processor = tiny
    rows = make_rows(4)
    for suffix in ("", "_auto"):
        expected = [build_caption(r["text"], r["emotion"], descriptors.sed_from_row(r, suffix)) for r in rows]
        assert processor.build_captions(rows, sed_suffix=suffix) == expected
    # a column batch (datasets' batched format) works the same
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    assert processor.build_captions(cols) == processor.build_captions(rows)
    plain = processor.build_captions(rows, with_sed=False)
    assert plain[0] == build_caption(rows[0]["text"], rows[0]["emotion"], with_sed=False)
    bad = dict(rows[0], pitch_auto="")
    with pytest.raises(ValueError, match="utt000.*pitch_auto"):
        processor.build_captions([bad], sed_suffix="_auto")


def test_tokenizer_keeps_descriptor_and_emotion_words_whole(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    for word in ["low", "normal", "high", "slow", "fast", "male", "female", "child", "elderly", *LABELS]:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    caption = build_caption(
        TEXTS[2], "angry", dict(pitch="high", volume="low", speed="fast", gender="male", age="teenager")
    )
    assert tok.decode(tok(caption, add_special_tokens=False)["input_ids"]) == caption


def test_processor_layout_labels_and_positions(tiny, batch):
    _, processor = tiny
    rows, audio, captions, b = batch
    tok = processor.tokenizer
    B, L = b["input_ids"].shape
    assert (
        b["labels"].shape == (B, L) and b["sed_token_index"].shape == (B, 5) and b["emotion_token_mask"].shape == (B, L)
    )
    for i in range(B):
        ids, labels = b["input_ids"][i], b["labels"][i]
        n_audio = int((ids == processor.audio_token_id).sum())
        valid = int(b["feature_attention_mask"][i].sum())
        assert n_audio == processor.num_audio_tokens(valid) > 0
        # right padding; labels: -100 up to the caption, then exactly the caption tokens + eos
        caption_pos = (labels != -100).nonzero().flatten()
        first = int(caption_pos[0])
        assert (ids[:first] == processor.audio_token_id).sum() == n_audio
        assert torch.equal(labels[caption_pos], ids[caption_pos])
        assert tok.decode(ids[caption_pos], skip_special_tokens=True) == captions[i]
        assert int(ids[caption_pos[-1]]) == tok.eos_token_id
        # descriptor positions point at the first token of each value
        for f, pos in zip(SED_FIELDS, b["sed_token_index"][i].tolist()):
            assert pos >= first
            assert rows[i][f].startswith(tok.decode([int(ids[pos])]).strip()), (f, pos)
        assert tok.decode(ids[b["emotion_token_mask"][i]]).strip() == rows[i]["emotion"]
    # prompts for generation: left-padded, no labels
    g = processor(audio=audio)
    assert "labels" not in g and (g["attention_mask"][:, -1] == 1).all()
    # a caption outside the template: positions -1 / empty mask, no error
    odd = processor(audio=audio[:1], captions=["something else entirely"])
    assert odd["sed_token_index"].tolist() == [[-1] * 5] and not odd["emotion_token_mask"].any()


def test_energy_stream_tracks_level_of_the_raw_waveform(tiny):
    _, processor = tiny
    x = tone(1.0, 150.0, 0.1)
    e = processor(audio=[x, 2 * x])["energy"]
    voiced = e[0] > -60
    assert voiced.sum() > 50
    assert torch.allclose(e[1][voiced] - e[0][voiced], torch.full_like(e[0][voiced], 6.02), atol=0.05)
    assert (e[0][~voiced] == -100).all()  # padding


def test_forward_kl_and_loss_parts(tiny, batch):
    model, _ = tiny
    b = _model_inputs(batch[3])
    model.train()
    try:
        out = model(**b)
    finally:
        model.eval()
    assert out.kl_loss.ndim == 0 and out.kl_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.vib_beta * out.kl_loss)
    assert out.logits.shape == (*b["input_ids"].shape, model.config.text_config.vocab_size)
    # eval uses the VIB mean: deterministic
    with torch.no_grad():
        f1 = model.get_audio_features(b["input_features"], b["feature_attention_mask"], b["energy"])
        a1, m1 = f1.pooler_output, f1.audio_mask
        a2 = model.get_audio_features(b["input_features"], b["feature_attention_mask"], b["energy"]).pooler_output
    assert torch.equal(a1, a2) and m1.dtype == torch.bool
    assert m1.sum(-1).tolist() == [int((r == model.config.audio_token_id).sum()) for r in b["input_ids"]]


def test_precomputed_audio_embeds_repeat_interleave(tiny, batch):
    model, _ = tiny
    b = _model_inputs(batch[3])
    with torch.no_grad():
        ref = model(**b).logits
        emb = model.get_audio_features(b["input_features"], b["feature_attention_mask"], b["energy"]).pooler_output
        K = 2
        rep = model(
            input_ids=b["input_ids"].repeat_interleave(K, 0),
            attention_mask=b["attention_mask"].repeat_interleave(K, 0),
            audio_embeds=emb.repeat_interleave(K, 0),
        ).logits
    torch.testing.assert_close(rep[::K], ref)
    torch.testing.assert_close(rep[1::K], ref)


def test_generate_with_cache_matches_greedy_loop(tiny, batch):
    model, processor = tiny
    g = processor(audio=batch[1][:2])
    with torch.no_grad():
        out = model.generate(**g, max_new_tokens=6, do_sample=False)
        ids, mask = g["input_ids"], g["attention_mask"]
        emb = model.get_audio_features(g["input_features"], g["feature_attention_mask"], g["energy"]).pooler_output
        for _ in range(6):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, audio_embeds=emb, position_ids=pos).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_save_load_roundtrip_identical_logits(tiny, batch, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor

    model, processor = tiny
    b = _model_inputs(batch[3])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "ser_slm" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "modeling_ser_slm.py").is_file()
    for auto in (AutoModel, AutoModelForCausalLM):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, SerSlmForConditionalGeneration)
        p2 = AutoProcessor.from_pretrained(tmp_path)
        assert isinstance(p2, SerSlmProcessor)
        b2 = _model_inputs(p2(audio=batch[1], captions=batch[2]))
        assert all(torch.equal(b[k], b2[k]) for k in b)
        with torch.no_grad():
            assert torch.equal(model(**b).logits, loaded(**b2).logits)


def test_remote_code_loads_without_trustser(tiny, batch, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    np.save(tmp_path / "audio.npy", batch[1][0])
    with torch.no_grad():
        ref = model(**_model_inputs(processor(audio=[batch[1][0]]))).logits
    torch.save(ref, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "trustser" or name.startswith("trustser."):
                    raise ImportError("trustser must not be imported here")
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        d = {str(tmp_path / "ckpt")!r}
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        p = AutoProcessor.from_pretrained(d, trust_remote_code=True)
        b = p(audio=[np.load({str(tmp_path / "audio.npy")!r})])
        with torch.no_grad():
            logits = m(**b).logits
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        assert "trustser" not in sys.modules
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        print("MAXDIFF", float((logits - ref).abs().max()))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MAXDIFF 0.0" in res.stdout


def test_paper_preset_path_with_tiny_local_models(tmp_path):
    """build_paper_ser_slm on locally saved tiny HuBERT + tiny Llama: the same code path as the Hub ids."""
    from transformers import HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM, Wav2Vec2FeatureExtractor

    from trustser.models.ser_slm import build_paper_ser_slm
    from trustser.models.ser_slm.presets import train_caption_tokenizer

    hub = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        feat_extract_norm="layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True,
    )
    HubertModel(hub).save_pretrained(tmp_path / "hubert")
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(tmp_path / "hubert")
    tok = train_caption_tokenizer(TEXTS, vocab_size=600)
    llama_cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_cfg)
    lm.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")

    model, processor = build_paper_ser_slm(
        str(tmp_path / "hubert"), str(tmp_path / "llama"), dtype=torch.float32, lora_r=4
    )
    base = model.get_base_model()
    # pretrained weights were loaded, not re-initialised
    torch.testing.assert_close(
        base.model.language_model.embed_tokens.weight[: len(tok)], lm.model.embed_tokens.weight, rtol=0, atol=0
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert not any("audio_tower" in n for n in trainable)
    assert all(not p.requires_grad for p in base.model.audio_tower.parameters())
    for new in ("sed_vib", "semantic_vib", "projector"):
        assert any(new in n for n in trainable), new
    assert not any(n.startswith("base_model.model.model.language_model") and "lora_" not in n for n in trainable)
    # the model runs on the processor's output (raw waveform, sample-level mask)
    rows = make_rows(2)
    b = processor(audio=[r["audio"]["array"] for r in rows], captions=processor.build_captions(rows))
    assert b["input_features"].ndim == 2  # raw waveform for HuBERT
    model.train()
    out = model(**_model_inputs(b))
    assert torch.isfinite(out.loss) and out.kl_loss.item() > 0
    out.loss.backward()
    assert all(p.grad is None for p in base.model.audio_tower.parameters())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "lora_B" in n or "sed_vib" in n
    )


def test_f0_stream_option(tmp_path):
    from transformers import AutoModel, AutoProcessor

    model, processor = build_tiny_ser_slm(TEXTS, emotion_labels=LABELS, sed_f0_stream=True, seed=0)
    model.eval()
    rows = make_rows(3)
    b = processor(audio=[r["audio"]["array"] for r in rows], captions=processor.build_captions(rows))
    f0 = b["f0"]
    assert f0.shape == b["energy"].shape
    medians = [float(x[x > 0].median()) for x in f0]
    assert medians == pytest.approx([110.0, 180.0, 280.0], rel=0.02)  # the fixture's pitch ladder
    mi = _model_inputs(b)
    with pytest.raises(ValueError, match="f0"):
        model(**{k: v for k, v in mi.items() if k != "f0"})
    with torch.no_grad():
        ref = model(**mi).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    p2 = AutoProcessor.from_pretrained(tmp_path)
    assert p2.f0_stream
    with torch.no_grad():
        assert torch.equal(
            AutoModel.from_pretrained(tmp_path)(
                **_model_inputs(p2(audio=[r["audio"]["array"] for r in rows], captions=processor.build_captions(rows)))
            ).logits,
            ref,
        )


def test_any_pair_with_tied_llm_embeddings_saves_and_loads(tmp_path):
    """build_ser_slm with a tied-embedding LLM (Qwen2-style) and a wav2vec2 encoder keeps the tie across save/load."""
    from transformers import (
        AutoModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    from trustser.models.ser_slm import build_ser_slm
    from trustser.models.ser_slm.presets import train_caption_tokenizer

    enc = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2Model(enc).save_pretrained(tmp_path / "enc")
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(tmp_path / "enc")
    tok = train_caption_tokenizer(TEXTS, vocab_size=500)
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    model, processor = build_ser_slm(str(tmp_path / "enc"), str(tmp_path / "lm"), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path / "slm")
    processor.save_pretrained(tmp_path / "slm")
    loaded = AutoModel.from_pretrained(tmp_path / "slm").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    b = _model_inputs(processor(audio=[tone(1.0, 150.0, 0.2)]))
    with torch.no_grad():
        assert torch.equal(model.eval()(**b).logits, loaded(**b).logits)


def test_energy_features_ignore_the_noise_floor(tiny):
    """Digital silence vs a -62 dBFS noise floor around the same speech: same level features."""
    model, processor = tiny
    speech = tone(1.0, 150.0, 0.1)
    pad = np.zeros(8000, np.float32)
    clean = np.concatenate([pad, speech, pad])
    noisy = clean + (10 ** (-62 / 20) * np.random.default_rng(0).standard_normal(clean.size)).astype(np.float32)
    loud = 2 * clean
    e = processor(audio=[clean, noisy, loud])["energy"]
    frames = 175
    mask = torch.ones(3, frames, dtype=torch.bool)
    feats = model.model._prosody_features(e, None, mask, frames)
    level = feats[:, 0, 1]  # utterance level (constant over frames)
    assert abs(float(level[1] - level[0])) < 0.02  # noise floor: < 0.4 dB
    assert float(level[2] - level[0]) == pytest.approx(6.02 / 20, abs=0.02)  # +6 dB is seen
