"""Training cost (issue 19): the SFT loss taken once with the LM head over the caption only, and the
K rectified captions packed behind one shared prefix. Both must give what the plain computation
gives: the old SFT loss (kept here as the reference) and the unpacked K*B rows."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from ser_slm_fixtures import LABELS, TEXTS, make_rows

from trustser.descriptors import SED_FIELDS, SED_VOCAB
from trustser.trainers.rectify import (
    SedRectifyCollator,
    SedRectifyTrainer,
    audio_inputs_of,
    caption_token_nll,
    emotion_cross_entropy,
    pack_rectified_captions,
    packed_attention_mask,
    packed_caption_token_nll,
    rectified_caption_inputs,
)
from trustser.trainers.rectify_config import SedRectifyConfig
from trustser.trainers.sft import MODEL_INPUTS, SerSlmSFTConfig, SerSlmSFTTrainer


@pytest.fixture(scope="module")
def tiny():
    from trustser.models.ser_slm import build_tiny_ser_slm

    torch.set_num_threads(2)
    return build_tiny_ser_slm(
        TEXTS,
        emotion_labels=LABELS,
        max_audio_seconds=2.0,
        lm_hidden=64,
        encoder_dim=64,
        vocab_size=400,
        aux_sed_loss_weight=0.5,
        seed=0,
    )


@pytest.fixture(scope="module")
def rows():
    return make_rows(4)  # 1 to 1.75 s: prefixes of different lengths


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, rtol=2e-4):
    assert a.keys() == b.keys() and a
    scale = max(float(g.abs().max()) for g in a.values())
    for n in a:
        assert torch.allclose(a[n], b[n], atol=rtol * scale, rtol=rtol), (n, float((a[n] - b[n]).abs().max()), scale)


# ------------------------------------------------------------------------------------------------ SFT
def _old_sft_loss(trainer, model, inputs, num_items_in_batch=None):
    """SerSlmSFTTrainer.compute_loss before issue 19: labels to the model (its own full-vocabulary
    loss) and the NLL again over the whole sequence, audio prefix included."""
    from trustser.models.ser_slm.modeling_ser_slm import weighted_auxiliary_loss

    model_inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
    outputs = model(**model_inputs, use_cache=False)
    shift_labels = model_inputs["labels"][:, 1:]
    valid = shift_labels != -100
    logp = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    lm_loss = nll.sum() / torch.as_tensor(denom).clamp(min=1)
    steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
    cfg = trainer._unwrapped_config()
    return lm_loss + cfg.vib_beta * outputs.kl_loss / steps + weighted_auxiliary_loss(cfg, outputs) / steps


def test_sft_loss_and_gradients_equal_the_old_computation(tiny, rows, tmp_path):
    import datasets

    model, proc = tiny
    trainer = SerSlmSFTTrainer(
        copy.deepcopy(model),
        args=SerSlmSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=proc,
    )
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    assert "sed_labels" in inputs  # the auxiliary loss is part of the comparison
    m = trainer.model
    m.train()
    trainer.current_gradient_accumulation_steps = 2
    head_rows = []
    hook = m.lm_head.register_forward_hook(lambda _m, i, _o: head_rows.append(i[0].shape[1]))
    n_items = int((inputs["labels"] != -100).sum()) * 2
    try:
        for items in (None, n_items):
            torch.manual_seed(0)
            new = trainer.compute_loss(m, inputs, num_items_in_batch=items)
            m.zero_grad()
            new.backward()
            g_new = _grads(m)
            torch.manual_seed(0)
            old = _old_sft_loss(trainer, m, inputs, num_items_in_batch=items)
            m.zero_grad()
            old.backward()
            assert torch.allclose(new, old, rtol=1e-5, atol=1e-6), (new, old)
            _assert_grads_close(g_new, _grads(m))
    finally:
        hook.remove()
    first = int((inputs["labels"] != -100).long().argmax(1).min())
    length = inputs["input_ids"].shape[1]
    # new path: the LM head over first-1 .. L-1 only; the old one over all L positions
    assert head_rows[0] == length - first + 1 < length and head_rows[1] == length
    torch.manual_seed(0)
    _, out = trainer.compute_loss(m, inputs, return_outputs=True)
    assert out.loss is None  # the model did not compute a loss of its own


# ------------------------------------------------------------------------------------------------ packing
def _policy_batch(proc, rows, k, seed=0):
    """Collated utterances and k rectified captions each, descriptors drawn at random (captions of
    different lengths), and the unpacked and packed inputs for them."""
    rng = np.random.default_rng(seed)
    batch = SedRectifyCollator(proc, sed_source="auto")(rows)
    caps = []
    for r in rows:
        for _ in range(k):
            sed = {f: SED_VOCAB[f][rng.integers(len(SED_VOCAB[f]))] for f in SED_FIELDS}
            caps.append(proc.build_captions([{**r, **sed}])[0])
    rect = rectified_caption_inputs(proc, batch["input_ids"], batch["labels"], caps, k)
    return batch, rect, pack_rectified_captions(rect, k)


def _run(model, fn, k):
    torch.manual_seed(0)  # the VIB samples: the same draws in both paths (the encoder runs once per utterance in both)
    nll, valid, emo, out = fn()
    loss = nll.sum() / valid.sum() + 1e-3 * out.kl_loss
    model.zero_grad()
    loss.backward()
    per_policy = (nll.sum(1) / valid.sum(1)).detach()
    return per_policy, emotion_cross_entropy(nll.detach(), emo).view(-1, k), _grads(model)


def _compare(model, batch, rect, packed, k, impl):
    audio = audio_inputs_of(batch)
    ref = _run(model, lambda: caption_token_nll(model, rect, audio_inputs=audio, audio_repeats=k), k)
    got = _run(model, lambda: packed_caption_token_nll(model, packed, audio_inputs=audio, attn_implementation=impl), k)
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-5), (got[0], ref[0])
    assert torch.allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
    _assert_grads_close(got[2], ref[2])


@pytest.mark.parametrize(
    "k,impl",
    [
        (1, "sdpa"),
        (2, "sdpa"),
        (6, "sdpa"),
        (6, "eager"),
        pytest.param(1, "eager", marks=pytest.mark.slow),
        pytest.param(2, "eager", marks=pytest.mark.slow),
    ],
)
def test_packed_equals_unpacked(tiny, rows, k, impl):
    model = copy.deepcopy(tiny[0])
    model.set_attn_implementation(impl)
    model.train()
    batch, rect, packed = _policy_batch(tiny[1], rows, k)
    lengths = (packed["segments"] >= 0).sum(1)
    assert len(set(lengths.tolist())) > 1  # padded packed rows
    assert len(set((rect["labels"] != -100).long().argmax(1).tolist())) > 1  # prefixes of different lengths
    if k > 1:
        assert len(set((rect["labels"] != -100).sum(1).tolist())) > 1  # captions of different lengths
    # the packed rows hold P + K*S tokens per utterance instead of K*(P + S)
    assert int(lengths.sum()) == int(rect["attention_mask"].sum()) - (k - 1) * int(
        (rect["labels"] != -100).long().argmax(1)[::k].sum()
    )
    _compare(model, batch, rect, packed, k, impl)


@pytest.mark.parametrize("impl", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
def test_packed_equals_unpacked_with_lora_and_gradient_checkpointing(tiny, rows, impl):
    from peft import get_peft_model

    from trustser.models.ser_slm import lora_config_for_llm

    model = copy.deepcopy(tiny[0])
    model.set_attn_implementation(impl)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config_for_llm(r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():  # LoRA B starts at 0: give the adapters a non-zero effect
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch, rect, packed = _policy_batch(tiny[1], rows, 6, seed=1)
    _compare(model, batch, rect, packed, 6, impl)


def test_packed_mask_blocks():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    allowed = packed_attention_mask(seg, "sdpa")[0, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False, False]  # caption 1: prefix + itself
    assert allowed[5].tolist() == [True, True, False, False, True, True, False, False]  # caption 2 skips caption 1
    assert allowed[7].tolist() == [False] * 7 + [True]  # padding: itself only
    eager = packed_attention_mask(seg, "eager")[0, 0]
    assert torch.equal(eager == 0, allowed) and float(eager.min()) == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="sdpa"):
        packed_attention_mask(seg, "flash_attention_2")


# ------------------------------------------------------------------------------------------------ trainer
def _rectify_trainer(tiny, rows, tmp_path, **kw):
    import datasets

    args = SedRectifyConfig(
        **{
            "output_dir": str(tmp_path),
            "per_device_train_batch_size": 4,
            "max_steps": 1,
            "save_strategy": "no",
            "use_cpu": True,
            "seed": 0,
            "num_policies": 6,
            "reward_timing": "reuse_forward",
            "controller_n_mels": 16,
            "controller_hidden_size": 16,
            "controller_embedding_size": 4,
            "report_to": "none",
            **kw,
        }
    )
    return SedRectifyTrainer(
        copy.deepcopy(tiny[0]), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tiny[1]
    )


def test_trainer_packed_step_equals_unpacked_and_processes_fewer_tokens(tiny, rows, tmp_path):
    results = {}
    for shared in (True, False):
        t = _rectify_trainer(tiny, rows, tmp_path / str(shared), shared_prefix=shared)
        tokens = []
        hook = t._language_model().register_forward_pre_hook(
            lambda _m, _a, kw: tokens.append(kw["inputs_embeds"].shape[0] * kw["inputs_embeds"].shape[1]),
            with_kwargs=True,
        )
        batch = t._prepare_inputs(t.data_collator(rows))
        t.model.train()
        t.policy_generator.manual_seed(5)
        torch.manual_seed(0)
        loss = t.compute_loss(t.model, batch)
        t.model.zero_grad()
        loss.backward()
        hook.remove()
        results[shared] = (loss.detach(), t._pending[-1]["rewards"], _grads(t.model), sum(tokens))
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-5, atol=1e-5)
    _assert_grads_close(results[True][2], results[False][2])
    assert results[True][3] < 0.7 * results[False][3]


def test_after_update_reward_packed_equals_unpacked(tiny, rows, tmp_path):
    t = _rectify_trainer(tiny, rows, tmp_path, reward_timing="after_update")
    batch = t._prepare_inputs(t.data_collator(rows))
    t.model.train()
    t.compute_loss(t.model, batch)
    rec = t._pending[-1]
    assert rec["packed"] is not None
    packed_reward = t._rewards_after_update(rec)
    unpacked_reward = t._rewards_after_update(dict(rec, packed=None))
    assert torch.isfinite(packed_reward).all()
    assert torch.allclose(packed_reward, unpacked_reward, rtol=1e-5, atol=1e-5)


def test_unsupported_attention_falls_back_with_a_warning(tiny, rows, tmp_path):
    t = _rectify_trainer(tiny, rows, tmp_path)
    rect = {"input_ids": torch.zeros(1)}  # not read: the fallback decides before packing
    t._language_model().config._attn_implementation = "flash_attention_2"
    with pytest.warns(UserWarning, match="flash_attention_2.*K full rows"):
        assert t._pack(rect, 6) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert t._pack(rect, 6) is None
    t2 = _rectify_trainer(tiny, rows, tmp_path / "w")
    t2._language_model().config.sliding_window = 8
    _, rect2, _ = _policy_batch(tiny[1], rows, 6)
    with pytest.warns(UserWarning, match="sliding window"):
        assert t2._pack(rect2, 6) is None
    assert _rectify_trainer(tiny, rows, tmp_path / "off", shared_prefix=False)._pack(rect2, 6) is None


# ------------------------------------------------------------------------------------------------ data loading
@pytest.mark.parametrize("rectify", [False, True])
def test_data_loader_workers_give_the_batches_of_zero_workers(rows, tmp_path, rectify):
    """Decoding, resampling, Praat F0 and the channel augmentation in 2 worker processes: the
    batches equal those of 0 workers (augmentation draws keyed by epoch and utterance)."""
    import datasets

    from trustser.models.ser_slm import build_tiny_ser_slm

    model, proc = build_tiny_ser_slm(
        TEXTS,
        emotion_labels=LABELS,
        max_audio_seconds=2.0,
        lm_hidden=32,
        encoder_dim=32,
        vocab_size=400,
        sed_f0_stream=True,
        seed=0,
    )
    data = [
        dict(
            r,
            id=f"{r['id']}-{j}",
            audio={"array": np.asarray(r["audio"]["array"])[::2].repeat(2), "sampling_rate": 22050},
        )
        for j in range(2)
        for r in rows
    ]  # 22.05 kHz: resampled in the collator
    ds = datasets.Dataset.from_list(data)

    def batches(workers):
        common = dict(
            output_dir=str(tmp_path / str(workers)),
            use_cpu=True,
            per_device_train_batch_size=2,
            seed=0,
            dataloader_num_workers=workers,
            report_to="none",
        )
        if rectify:
            t = SedRectifyTrainer(
                model, args=SedRectifyConfig(**common, controller_n_mels=16), train_dataset=ds, processing_class=proc
            )
        else:
            t = SerSlmSFTTrainer(
                model, args=SerSlmSFTConfig(**common, channel_augmentation=1.0), train_dataset=ds, processing_class=proc
            )
        t.data_collator.epoch = 1
        torch.manual_seed(0)  # the sampler's order
        return list(t.get_train_dataloader()), t

    zero, t0 = batches(0)
    two, _ = batches(2)
    assert len(zero) == len(two) == 4
    for a, b in zip(zero, two):
        assert a.keys() == b.keys() and "f0" in a
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    if not rectify:  # another epoch, other channels; the trainer's callback sets the epoch
        from transformers import TrainerState

        t0.callback_handler.on_epoch_begin(t0.args, TrainerState(epoch=2.0), t0.control)
        assert t0.data_collator.epoch == 2
        again = t0.data_collator([data[0], data[1]])
        t0.data_collator.epoch = 1
        first = t0.data_collator([data[0], data[1]])
        assert not torch.equal(again["input_features"], first["input_features"])
        with pytest.raises(ValueError, match="persistent"):
            SerSlmSFTTrainer(
                model,
                args=SerSlmSFTConfig(
                    output_dir=str(tmp_path / "p"),
                    use_cpu=True,
                    channel_augmentation=0.5,
                    dataloader_num_workers=2,
                    dataloader_persistent_workers=True,
                ),
                train_dataset=ds,
                processing_class=proc,
            )
