"""SedRectifyTrainer: caption rebuild, loss equivalence with SFT, rewards, checkpoints, warm-up."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from trustser.descriptors import SED_FIELDS
from trustser.trainers.rectify import (
    SedRectifyCollator,
    SedRectifyTrainer,
    caption_token_nll,
    emotion_cross_entropy,
    load_optimizer_state,
    rectified_caption_inputs,
    save_optimizer_state,
)
from trustser.trainers.rectify_config import SedRectifyConfig
from trustser.trainers.sft import SerSlmDataCollator, SerSlmSFTConfig, SerSlmSFTTrainer

EMOTIONS = ["neutral", "happy", "angry", "sad"]
TEXTS = ["hello there my friend", "the cat sat on the mat", "I can not believe it", "what a lovely day"]


@pytest.fixture(scope="module")
def tiny():
    from trustser.models.ser_slm import build_tiny_ser_slm

    torch.set_num_threads(2)
    model, proc = build_tiny_ser_slm(
        TEXTS, emotion_labels=EMOTIONS, max_audio_seconds=2.0, lm_hidden=64, encoder_dim=64, vocab_size=400, seed=0
    )
    return model, proc


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        out.append(
            dict(
                id=f"u{i}",
                audio={
                    "array": (0.1 * rng.standard_normal(12000 + 1000 * i)).astype(np.float32),
                    "sampling_rate": 16000,
                },
                text=TEXTS[i % 4],
                emotion=EMOTIONS[i % 4],
                speaker=f"s{i % 2}",
                gender="male",
                pitch="low",
                volume="normal",
                speed="fast",
                age="elderly",
                pitch_auto="normal",
                volume_auto="normal",
                speed_auto="fast",
                gender_auto="male",
                age_auto="middle-aged",
            )
        )
    return out


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        num_policies=3,
        use_cpu=True,
        seed=0,
        controller_n_mels=16,
        controller_hidden_size=16,
        controller_embedding_size=4,
        disable_tqdm=True,
    )
    base.update(kw)
    return SedRectifyConfig(**base)


def _trainer(tiny, rows, tmp_path, model=None, controller=None, **kw):
    import datasets

    model = model if model is not None else copy.deepcopy(tiny[0])
    return SedRectifyTrainer(
        model,
        args=_config(tmp_path, **kw),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny[1],
        controller=controller,
    )


def test_config_fields_documented_and_validated(tmp_path):
    own = {f.name for f in dataclasses.fields(SedRectifyConfig)} - {f.name for f in dataclasses.fields(SerSlmSFTConfig)}
    assert {
        "num_policies",
        "reward_timing",
        "controller_learning_rate",
        "controller_clip_epsilon",
        "controller_updates_per_step",
        "controller_entropy_coef",
        "controller_warmup_steps",
    } <= own
    for f in dataclasses.fields(SedRectifyConfig):
        if f.name in own or f.name == "sed_source":
            assert f.metadata.get("help"), f.name
    assert SedRectifyConfig(output_dir=str(tmp_path)).num_policies == 6
    with pytest.raises(ValueError, match="reward_timing"):
        SedRectifyConfig(output_dir=str(tmp_path), reward_timing="later")
    with pytest.raises(ValueError, match="num_policies"):
        SedRectifyConfig(output_dir=str(tmp_path), num_policies=0)


def test_rectified_inputs_match_processor(tiny, rows):
    _, proc = tiny
    coll = SedRectifyCollator(proc, sed_source="auto")
    batch = coll(rows[:3])
    assert batch["rectify_sed_ids"].shape == (3, 5) and batch["rectify_truth_ids"].shape == (3, 5)
    assert batch["rectify_waveforms"].shape == (3, 14000)
    assert batch["rectify_waveform_lengths"].tolist() == [12000, 13000, 14000]
    # two policies per utterance: the annotated caption and one with other descriptors
    other = {"pitch": "high", "volume": "low", "speed": "slow", "gender": "female", "age": "young adult"}
    caps = []
    for r in rows[:3]:
        caps.append(proc.build_captions([r], sed_suffix="_auto")[0])
        caps.append(proc.build_captions([{**r, **other}])[0])
    rect = rectified_caption_inputs(proc, batch["input_ids"], batch["labels"], caps, 2)
    audio = [np.asarray(r["audio"]["array"]) for r in rows[:3] for _ in range(2)]
    ref = proc(audio=audio, captions=caps, sampling_rate=16000)
    length = ref["input_ids"].shape[1]
    assert rect["input_ids"].shape[1] == length
    for key in ("input_ids", "attention_mask", "labels", "emotion_token_mask"):
        assert torch.equal(rect[key], ref[key]), key
    assert rect["emotion_token_mask"].sum(1).min() >= 1


def test_k1_always_retain_equals_sft_loss(tiny, rows, tmp_path):
    import datasets

    model, proc = tiny
    rect = _trainer(tiny, rows, tmp_path, model=copy.deepcopy(model), num_policies=1, controller_warmup_steps=10)
    sft = SerSlmSFTTrainer(
        copy.deepcopy(model),
        args=SerSlmSFTConfig(
            output_dir=str(tmp_path / "sft"), sed_source="auto", use_cpu=True, per_device_train_batch_size=4
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=proc,
    )
    batch = rect._prepare_inputs(rect.data_collator(rows[:4]))
    plain = {k: v for k, v in SerSlmDataCollator(proc, sed_source="auto")(rows[:4]).items()}
    rect.model.train()
    sft.model.train()
    rect.current_gradient_accumulation_steps = sft.current_gradient_accumulation_steps = 2  # set by the loop in train()
    for n_items in (None, int((plain["labels"] != -100).sum()) * 2):
        torch.manual_seed(0)
        a = rect.compute_loss(rect.model, batch, num_items_in_batch=n_items)
        torch.manual_seed(0)
        b = sft.compute_loss(sft.model, plain, num_items_in_batch=n_items)
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    # also when the controller is past warm-up but (almost surely) retains everything
    rect2 = _trainer(
        tiny, rows, tmp_path, model=copy.deepcopy(model), num_policies=1, controller_initial_retain_bias=60.0
    )
    rect2.model.train()
    torch.manual_seed(0)
    c = rect2.compute_loss(rect2.model, batch)
    torch.manual_seed(0)
    assert torch.allclose(c, sft.compute_loss(sft.model, plain), atol=1e-6)
    assert rect2._pending and rect2._pending[0]["actions"].sum() == 0


def test_rewards_are_minus_emotion_ce(tiny, rows, tmp_path):
    trainer = _trainer(tiny, rows, tmp_path, reward_timing="reuse_forward", num_policies=4)
    batch = trainer._prepare_inputs(trainer.data_collator(rows[:2]))
    trainer.model.eval()  # VIB takes its mean: deterministic forward
    trainer.model.training = True  # but compute_loss's training branch
    trainer.policy_generator.manual_seed(3)
    trainer.compute_loss(trainer.model, batch)
    rec = trainer._pending[-1]
    assert rec["rewards"].shape == (2, 4)
    # recompute: only emotion tokens count
    trainer.policy_generator.manual_seed(3)
    sample, caps, _, _ = trainer._sample(batch, 4, force_retain=False)
    assert torch.equal(sample.actions, rec["actions"])
    inputs = rectified_caption_inputs(trainer.processing_class, batch["input_ids"], batch["labels"], caps, 4)
    with torch.no_grad():
        emb = trainer.model.get_audio_features(
            batch["input_features"], batch["feature_attention_mask"], batch["energy"]
        ).pooler_output
        nll, valid, emo, _ = caption_token_nll(trainer.model, inputs, emb.repeat_interleave(4, 0))
    expected = -emotion_cross_entropy(nll, emo).view(2, 4)
    assert torch.allclose(rec["rewards"], expected, atol=1e-5)
    assert emo.sum(1).min() >= 1 and bool((emo & ~valid).sum() == 0)
    # emotion CE differs from the mean caption NLL: the other label tokens are masked
    assert not torch.allclose(expected, -(nll * valid).sum(1).view(2, 4) / valid.sum(1).view(2, 4))


@pytest.mark.faults
def test_optimizer_state_roundtrip(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([p], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    save_optimizer_state(opt, tmp_path / "opt")
    assert (tmp_path / "opt.safetensors").exists() and json.loads((tmp_path / "opt.json").read_text())["param_groups"]
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.Adam([q], lr=0.5)
    load_optimizer_state(opt2, tmp_path / "opt")
    assert opt2.param_groups[0]["lr"] == 0.01
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[p][k], opt2.state[q][k])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_optimizer_state(opt2, tmp_path / "nope")


def _controller_state(trainer):
    sd = {k: v.clone() for k, v in trainer.controller.state_dict().items()}
    opt = {
        (i, k): v.clone() for i, st in trainer.controller_optimizer.state_dict()["state"].items() for k, v in st.items()
    }
    return sd, opt


@pytest.mark.faults
def test_training_updates_controller_and_resume_is_exact(tiny, rows, tmp_path):
    full = _trainer(tiny, rows, tmp_path / "a", max_steps=3, save_strategy="steps", save_steps=2)
    before = {k: v.clone() for k, v in full.controller.state_dict().items()}
    full.train()
    sd_full, opt_full = _controller_state(full)
    assert any(not torch.equal(before[k], sd_full[k]) for k in before)  # the controller learned
    step = full.controller_optimizer.state_dict()["state"][0]["step"]
    assert int(step) == 3  # one controller update per SLM optimizer step
    logs = [h for h in full.state.log_history if "reward/mean" in h]
    assert len(logs) == 3
    for key in (
        "controller/loss",
        "controller/entropy",
        "reward/std",
        "rectify/label_accuracy",
        "rectify/annotation_accuracy",
    ) + tuple(f"rectify/modify_rate_{f}" for f in SED_FIELDS):
        assert key in logs[0], key
    assert logs[0]["rectify/annotation_accuracy"] == pytest.approx(0.6)  # 3 of 5 annotated fields are right
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ckpt / "controller" / "model.safetensors").exists() and (ckpt / "controller_optimizer.safetensors").exists()
    # resume from step 2 in a fresh trainer: the controller ends exactly where the uninterrupted run did
    resumed = _trainer(tiny, rows, tmp_path / "a", max_steps=3, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    sd_res, opt_res = _controller_state(resumed)
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k
    for k in opt_full:
        assert torch.equal(opt_full[k], opt_res[k]), k


@pytest.mark.faults
def test_load_controller_restores_saved_state(tiny, rows, tmp_path):
    t = _trainer(tiny, rows, tmp_path, max_steps=1)
    t.train()
    t.save_controller(tmp_path / "ck")
    sd, opt = _controller_state(t)
    gen = t.policy_generator.get_state()
    fresh = _trainer(tiny, rows, tmp_path)
    fresh.load_controller(tmp_path / "ck")
    sd2, opt2 = _controller_state(fresh)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd) and opt.keys() == opt2.keys()
    assert all(torch.equal(opt[k], opt2[k]) for k in opt)
    assert torch.equal(fresh.policy_generator.get_state(), gen)
    with pytest.raises(FileNotFoundError, match="no SED Controller"):
        fresh.load_controller(tmp_path / "missing")


def test_warmup_retains_and_freezes(tiny, rows, tmp_path):
    t = _trainer(
        tiny,
        rows,
        tmp_path,
        max_steps=2,
        controller_warmup_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    before = {k: v.clone() for k, v in t.controller.state_dict().items()}
    t.train()
    assert all(torch.equal(before[k], v) for k, v in t.controller.state_dict().items())
    logs = [h for h in t.state.log_history if "rectify/modify_rate_pitch" in h]
    assert logs and all(h[f"rectify/modify_rate_{f}"] == 0 for h in logs for f in SED_FIELDS)
    assert not any("reward/mean" in h for h in t.state.log_history)


def test_lora_and_gradient_accumulation(tiny, rows, tmp_path):
    """LoRA (peft) on the LLM and gradient accumulation: the controller still updates once per
    optimizer step and the encoder embeddings reach the LLM through the PEFT wrapper."""
    import datasets

    from trustser.models.ser_slm import lora_config_for_llm

    t = SedRectifyTrainer(
        copy.deepcopy(tiny[0]),
        args=_config(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny[1],
        peft_config=lora_config_for_llm(r=4, alpha=8),
    )
    assert hasattr(t.model, "peft_config")
    lora_before = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_B" in n}
    t.train()
    assert int(t.controller_optimizer.state_dict()["state"][0]["step"]) == 2
    assert any(not torch.equal(lora_before[n], p) for n, p in t.model.named_parameters() if n in lora_before)
    assert [h for h in t.state.log_history if "controller/loss" in h]


def test_after_update_reward_equals_full_forward(tiny, rows, tmp_path):
    """The after-update reward (LM head only from the emotion word on) equals -emotion CE of a full forward."""
    t = _trainer(tiny, rows, tmp_path, num_policies=3)
    batch = t._prepare_inputs(t.data_collator(rows[:3]))
    t.model.train()
    t.compute_loss(t.model, batch)
    rec = t._pending[-1]
    got = t._rewards_after_update(rec)
    assert t.model.training  # mode restored
    t.model.eval()
    with torch.no_grad():
        emb = t.model.get_audio_features(
            batch["input_features"], batch["feature_attention_mask"], batch["energy"]
        ).pooler_output
        full = dict(rec["rect"], first_label=torch.tensor(1))
        nll, _, emo, _ = caption_token_nll(t.model, full, emb.repeat_interleave(3, 0))
    assert torch.allclose(got, -emotion_cross_entropy(nll, emo).view(3, 3), atol=1e-5)


def test_audit_controller_counts_repairs(tiny, rows):
    """Expected / greedy label accuracy after rectification, computed by hand for a controller
    that always modifies volume and retains everything else."""
    import datasets

    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
    from trustser.trainers.rectify import audit_controller

    data = []
    for i, r in enumerate(rows[:4]):
        r = dict(r)
        for f in SED_FIELDS:
            r[f + "_auto"] = r[f]
        r["volume"] = "normal"
        r["volume_auto"] = ["low", "normal", "high", "low"][i]  # adjacent modify: right, wrong, right, right
        data.append(r)
    ds = datasets.Dataset.from_list(data)
    torch.manual_seed(0)
    ctrl = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16))
    with torch.no_grad():
        ctrl.head.weight.zero_()
        bias = torch.zeros(5, 2)
        bias[:, 0] = 20.0  # retain
        bias[SED_FIELDS.index("volume")] = torch.tensor([-20.0, 20.0])  # modify
        ctrl.head.bias.copy_(bias.flatten())
    audit = audit_controller(ctrl, ds, batch_size=3)
    vol = audit["per_field"]["volume"]
    assert vol["annotation"] == 0.25 and vol["modify_probability"] == 1.0
    # low->normal (right), normal->low|high (wrong), high->normal (right), low->normal (right)
    assert vol["expected"] == 0.75 and vol["greedy"] == 0.75
    # per utterance: the three wrong volume labels fixed (each has one right neighbour), the right one broken
    assert vol["repair"] == {
        "fixed": 3.0,
        "broken": 1,
        "unchanged_wrong": 0,
        "unchanged_right": 0,
        "expected_fixed": 3.0,
        "expected_broken": 1.0,
    }
    for f in SED_FIELDS:
        if f != "volume":
            repair = audit["per_field"][f].pop("repair")
            assert audit["per_field"][f] == {
                "annotation": 1.0,
                "expected": 1.0,
                "greedy": 1.0,
                "modify_probability": 0.0,
            }
            assert repair == {
                "fixed": 0.0,
                "broken": 0,
                "unchanged_wrong": 0,
                "unchanged_right": 4,
                "expected_fixed": 0.0,
                "expected_broken": 0.0,
            }
    assert audit["n"] == 4
    assert audit["annotation_accuracy"] == round((4 * 4 + 1) / 20, 4) and audit["expected_accuracy"] == round(
        (16 + 3) / 20, 4
    )
    with pytest.raises(ValueError, match="ground-truth"):
        audit_controller(ctrl, ds.remove_columns(list(SED_FIELDS)))


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_reward_scaling_reaches_the_controller_update(tiny, rows, tmp_path, monkeypatch, scale):
    """``controller_scale_rewards``: the advantages the clipped objective gets are r - group mean
    (``none``) or that divided by the std of all the step's rewards (``batch``)."""
    from trl.trainer.utils import nanstd

    import trustser.trainers.rectify as rectify_module

    seen = {"rewards": [], "advantages": []}
    real_normalize, real_loss = rectify_module.group_normalize, rectify_module.clipped_policy_loss

    def normalize(rewards, *a, **kw):
        seen["rewards"].append(rewards.clone())
        return real_normalize(rewards, *a, **kw)

    def loss(new, old, advantages, *a, **kw):
        seen["advantages"].append(advantages.clone())
        return real_loss(new, old, advantages, *a, **kw)

    monkeypatch.setattr(rectify_module, "group_normalize", normalize)
    monkeypatch.setattr(rectify_module, "clipped_policy_loss", loss)
    trainer = _trainer(tiny, rows, tmp_path, max_steps=1, controller_scale_rewards=scale, reward_timing="reuse_forward")
    trainer.train()
    rewards, adv = seen["rewards"][0], seen["advantages"][0]
    centered = rewards - rewards.mean(-1, keepdim=True)
    expected = centered if scale == "none" else centered / (nanstd(rewards.flatten()) + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert adv.abs().max() > 0  # the K rectified captions did differ


def test_caption_tokens_one_place_with_padding(tiny, rows):
    """``SerSlmProcessor.caption_inputs`` is what both the processor and the rectification trainer
    tokenise with: captions of different lengths give the same right-padded tensors either way."""
    _, proc = tiny
    batch = SedRectifyCollator(proc, sed_source="auto")(rows[:3])
    caps = [
        proc.build_captions([{**r, **v}])[0]
        for r, v in zip(
            rows[:3], ({"age": "young adult", "speed": "slow"}, {"age": "child"}, {"pitch": "high", "volume": "low"})
        )
    ]
    rect = rectified_caption_inputs(proc, batch["input_ids"], batch["labels"], caps, 1)
    ref = proc(audio=[np.asarray(r["audio"]["array"]) for r in rows[:3]], captions=caps, sampling_rate=16000)
    assert len(set(ref["attention_mask"].sum(1).tolist())) > 1 and not bool(ref["attention_mask"].all())  # padded
    for key in ("input_ids", "attention_mask", "labels", "emotion_token_mask"):
        assert torch.equal(rect[key], ref[key]), key
    n = ref["attention_mask"].sum(1)
    assert all(bool((ref["labels"][i, n[i] :] == -100).all()) for i in range(3))  # padding is never a label
    prompts = [ref["input_ids"][i, : int((ref["labels"][i] != -100).long().argmax())].tolist() for i in range(3)]
    direct = proc.caption_inputs(prompts, caps)
    assert all(torch.equal(direct[k], ref[k]) for k in direct)
    gen = proc(audio=[np.asarray(r["audio"]["array"]) for r in rows[:3]], sampling_rate=16000)  # prompts: left-padded
    assert torch.equal(proc.caption_inputs(prompts)["input_ids"], gen["input_ids"])
