"""SedRectifyConfig's options beyond the paper (issue 15): each changes what it says it changes,
and the per-utterance audit and training logs of fixed / broken labels."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rectify import _config, _controller_state, _trainer, rows, tiny  # noqa: F401  (fixtures)

from trustser.descriptors import SED_FIELDS
from trustser.trainers.rectify_config import SedRectifyConfig
from trustser.trainers.rectify_objective import bernoulli_kl, group_normalize, per_field_advantages
from trustser.trainers.sft import SerSlmDataCollator, SerSlmSFTConfig, SerSlmSFTTrainer

PITCH, VOLUME = SED_FIELDS.index("pitch"), SED_FIELDS.index("volume")


def _slm_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


# ---------------------------------------------------------------------------------- per-field credit
def test_per_field_advantage_credits_only_the_field_that_matters():
    """A reward table where only pitch's choice matters: per-field credit gives every other field
    exactly zero and pitch the right sign; the group advantage credits all five alike."""
    g = torch.Generator().manual_seed(0)
    actions = (torch.rand(64, 12, 5, generator=g) < 0.3).long()
    rewards = 1.0 * actions[..., PITCH].float()  # modifying pitch helps, nothing else matters
    adv = per_field_advantages(rewards, actions, scale="none")
    assert adv.shape == (64, 12, 5)
    others = [j for j in range(5) if j != PITCH]
    assert torch.equal(adv[..., others], torch.zeros_like(adv[..., others]))
    p = adv[..., PITCH]
    modified = actions[..., PITCH] == 1
    assert bool((p[modified] >= 0).all()) and bool((p[~modified] <= 0).all())
    assert p[modified].mean() > 0.2 and p[~modified].mean() < -0.05  # (decisions without a comparison policy get 0)
    # the group advantage is shared: volume's decisions get the same non-zero credit as pitch's
    shared = group_normalize(rewards, scale="none")
    assert shared.abs().sum() > 0 and not torch.equal(adv[..., VOLUME], shared)
    # with noise, an irrelevant field gets ~zero credit on average, the relevant one its effect
    noisy = rewards + 0.05 * torch.randn(rewards.shape, generator=g)
    adv = per_field_advantages(noisy, actions, scale="none")
    vol = adv[..., VOLUME]
    assert abs(float(vol[actions[..., VOLUME] == 1].mean())) < 0.05
    assert float(adv[..., PITCH][modified].mean()) > 0.2
    # scalings as group_normalize's; a NaN reward gets 0 and is never anyone's baseline
    std = torch.std(noisy, dim=-1, keepdim=True)
    assert torch.allclose(per_field_advantages(noisy, actions, scale="group"), adv / (std[..., None] + 1e-4), atol=1e-5)
    holed = noisy.clone()
    holed[:, 0] = float("nan")
    h = per_field_advantages(holed, actions, scale="none")
    assert torch.equal(h[:, 0], torch.zeros_like(h[:, 0])) and bool(torch.isfinite(h).all())


def test_per_field_advantage_one_field_deviation():
    """Three identical policies and one that also modifies volume: volume's credit is the reward
    difference, every other field's is 0 (the deviating policy matches no one elsewhere)."""
    actions = torch.zeros(1, 4, 5, dtype=torch.long)
    actions[0, 3, VOLUME] = 1
    rewards = torch.tensor([[1.0, 1.0, 1.0, 2.0]])
    adv = per_field_advantages(rewards, actions, scale="none")
    assert adv[0, 3, VOLUME] == 1.0  # 2 - mean(1, 1, 1)
    assert torch.allclose(adv[0, :3, VOLUME], torch.full((3,), -1.0 / 3))  # 1 - mean of the other three
    assert float(adv[..., [j for j in range(5) if j != VOLUME]].abs().sum()) == 0.0


def test_advantage_option_reaches_the_controller_update(tiny, rows, tmp_path, monkeypatch):
    import trustser.trainers.rectify as rectify_module

    seen = []
    real = rectify_module.clipped_policy_loss

    def loss(new, old, advantages, *a, **kw):
        seen.append((advantages.clone(), old))
        return real(new, old, advantages, *a, **kw)

    monkeypatch.setattr(rectify_module, "clipped_policy_loss", loss)
    t = _trainer(
        tiny,
        rows,
        tmp_path,
        max_steps=1,
        advantage="per_field",
        reward_timing="reuse_forward",
        controller_scale_rewards="none",
        controller_initial_retain_bias=0.0,
    )
    t.train()
    adv = seen[0][0]
    assert adv.shape == (4, 3, 5)  # one advantage per policy and field, not one per policy


# ---------------------------------------------------------------------------------- the reward's scorer
def test_frozen_scorer_ignores_the_slm_update(tiny, rows, tmp_path):
    scored = {}
    for scorer in ("policy", "frozen"):
        t = _trainer(tiny, rows, tmp_path / scorer, reward_scorer=scorer, num_policies=3)
        batch = t._prepare_inputs(t.data_collator(rows[:2]))
        t.model.train()
        t.compute_loss(t.model, batch)
        rec = t._pending[-1]
        before = t._rewards_after_update(rec)
        with torch.no_grad():  # the SLM moves (as an optimizer step would)
            t.model.get_output_embeddings().weight.mul_(1.5)
        scored[scorer] = (before, t._rewards_after_update(rec))
        if scorer == "frozen":
            ids = {id(p) for group in t.create_optimizer().param_groups for p in group["params"]}
            assert not any(id(p) in ids or p.requires_grad for p in t.reward_model.parameters())
            assert next(t.reward_model.parameters()).device == next(t.model.parameters()).device
    assert torch.equal(*scored["frozen"])  # the frozen scorer did not see the change
    assert not torch.allclose(*scored["policy"])  # the paper's scorer did
    with pytest.raises(ValueError, match="reward_timing='after_update'"):
        SedRectifyConfig(output_dir=str(tmp_path), reward_scorer="frozen", reward_timing="reuse_forward")


@pytest.mark.faults
def test_ema_scorer_follows_the_slm_and_resumes_exactly(tiny, rows, tmp_path):
    kw = dict(max_steps=3, save_strategy="steps", save_steps=2, reward_scorer="ema", reward_ema_decay=0.5)
    full = _trainer(tiny, rows, tmp_path / "a", **kw)
    start = _slm_state(full)
    full.train()
    end = _slm_state(full)
    ema = {n: e.detach().clone() for n, (e, _) in full._ema_parameters().items()}
    moved = [n for n in ema if not torch.equal(start[n], end[n])]
    assert moved
    n = moved[0]
    assert not torch.equal(ema[n], start[n]) and not torch.equal(ema[n], end[n])  # in between
    # the update rule itself: scorer = d * scorer + (1 - d) * SLM
    e, p = full._ema_parameters()[n]
    prev = e.detach().clone()
    full.update_reward_model()
    assert torch.allclose(e, 0.5 * prev + 0.5 * p.detach())
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ckpt / "reward_ema.safetensors").exists()
    resumed = _trainer(tiny, rows, tmp_path / "a", **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for name, (e2, _) in resumed._ema_parameters().items():
        assert torch.equal(ema[name], e2), name
    sd_full, _ = _controller_state(full)
    sd_res, _ = _controller_state(resumed)
    assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full)


# a controller that learns visibly in two steps (4 updates at a high rate on unscaled rewards)
FAST_CONTROLLER = dict(
    controller_learning_rate=0.05,
    controller_updates_per_step=4,
    controller_scale_rewards="none",
    reward_timing="reuse_forward",
)


def _controller_logits(trainer, rows, controller=None):
    """(B, 5, 2) logits of ``controller`` (default: the trainer's) for ``rows``, reading what it reads in training."""
    from trustser.trainers.rectify import controller_input_features

    controller = controller if controller is not None else trainer.controller
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        feats, mask = controller_input_features(controller, batch)
        return controller(batch["rectify_sed_ids"], input_features=feats, feature_attention_mask=mask).logits


# ---------------------------------------------------------------------------------- KL toward retain
def test_retain_kl_keeps_the_controller_near_its_initial_policy(tiny, rows, tmp_path):
    drift = {}
    for coef in (0.0, 50.0):
        t = _trainer(
            tiny,
            rows,
            tmp_path / str(coef),
            max_steps=2,
            retain_kl_coef=coef,
            controller_initial_retain_bias=0.5,
            **FAST_CONTROLLER,
        )
        initial = copy.deepcopy(t.controller)
        t.train()
        now, then = _controller_logits(t, rows[:4]), _controller_logits(t, rows[:4], initial)
        drift[coef] = float(bernoulli_kl(now, then).mean())
        logged = [h for h in t.state.log_history if "controller/retain_kl" in h]
        assert bool(logged) == (coef > 0)
    assert drift[0.0] > 0 and drift[50.0] < 0.5 * drift[0.0]


# ---------------------------------------------------------------------------------- a cost per modification
def test_modify_cost_teaches_the_controller_to_retain(tiny, rows, tmp_path):
    """A cost of 1 nat per modified field dwarfs the tiny SLM's emotion-reward differences, so every
    modification's advantage is negative and the controller's modify probability falls; without the
    cost it does not fall like that."""
    p_modify = {}
    for cost in (0.0, 1.0):
        t = _trainer(
            tiny,
            rows,
            tmp_path / str(cost),
            max_steps=2,
            modify_cost=cost,
            controller_initial_retain_bias=0.0,
            **FAST_CONTROLLER,
        )
        t.train()
        logits = _controller_logits(t, rows[:8])
        p_modify[cost] = float(torch.softmax(logits, -1)[..., 1].mean())
        # the logged reward stays the emotion reward (finite, negative cross-entropy), not the shaped one
        logged = [h["reward/mean"] for h in t.state.log_history if "reward/mean" in h]
        assert logged and all(np.isfinite(v) and v < 0 for v in logged)
    assert p_modify[1.0] < 0.35 and p_modify[1.0] < p_modify[0.0] - 0.1, p_modify


def test_modify_cost_is_validated():
    with pytest.raises(ValueError, match="modify_cost"):
        _config(Path("/tmp/unused"), modify_cost=-0.1)


# ---------------------------------------------------------------------------------- a controller without audio
def test_controller_input_none_reads_labels_not_audio(tiny, rows, tmp_path):
    from trustser.models.sed_controller import SedControllerModel

    t = _trainer(tiny, rows, tmp_path / "n", max_steps=2, controller_input="none", controller_initial_retain_bias=0.0)
    ctrl = t.controller
    assert ctrl.config.reads_audio is False and not any(p.requires_grad for p in ctrl.lstm.parameters())
    lstm = {k: v.clone() for k, v in ctrl.lstm.state_dict().items()}
    head = {k: v.clone() for k, v in ctrl.head.state_dict().items()}
    batch = t._prepare_inputs(t.data_collator(rows[:4]))
    feats, mask = ctrl.log_mel(batch["rectify_waveforms"], batch["rectify_waveform_lengths"])
    with torch.no_grad():
        a = ctrl(batch["rectify_sed_ids"], input_features=feats, feature_attention_mask=mask).logits
        b = ctrl(batch["rectify_sed_ids"], input_features=torch.randn_like(feats), feature_attention_mask=mask).logits
    assert torch.equal(a, b)  # the audio does not reach the decision
    t.train()
    assert all(torch.equal(lstm[k], v) for k, v in ctrl.lstm.state_dict().items())
    assert any(not torch.equal(head[k], v) for k, v in ctrl.head.state_dict().items())  # the head learnt
    ctrl.save_pretrained(tmp_path / "saved")
    assert SedControllerModel.from_pretrained(tmp_path / "saved").config.reads_audio is False
    # a controller that reads audio is refused for controller_input="none", and the other way round
    with pytest.raises(ValueError, match="reads_audio"):
        _trainer(tiny, rows, tmp_path / "m", controller=SedControllerModel.from_pretrained(tmp_path / "saved"))
    with pytest.raises(ValueError, match="reads_audio"):
        _trainer(
            tiny,
            rows,
            tmp_path / "o",
            controller_input="none",
            controller=copy.deepcopy(_trainer(tiny, rows, tmp_path / "p").controller),
        )


# ---------------------------------------------------------------------------------- fields it may modify
def test_rectify_fields_keep_the_other_fields_as_annotated(tiny, rows, tmp_path):
    from trustser.models.sed_controller import SedControllerModel

    may, held = [0, 2], [1, 3, 4]  # pitch and speed may change; volume, gender and age may not
    # a start that modifies most labels it may (retain bias -2: P(modify) ~0.88)
    t = _trainer(
        tiny,
        rows,
        tmp_path / "r",
        max_steps=2,
        rectify_fields=["speed", "pitch"],
        controller_initial_retain_bias=-2.0,
        **FAST_CONTROLLER,
    )
    assert t.args.rectify_fields == ["pitch", "speed"] and t.controller.config.rectify_fields == ["pitch", "speed"]
    p = torch.softmax(_controller_logits(t, rows[:8]), -1)[..., 1]
    assert float(p[:, may].min()) > 0.7 and float(p[:, held].max()) == 0.0
    batch = t._prepare_inputs(t.data_collator(rows[:8]))
    sample, *_ = t._sample(batch, 64, force_retain=False)
    assert int(sample.actions[..., held].sum()) == 0 and float(sample.actions[..., may].float().mean()) > 0.7
    annotated = batch["rectify_sed_ids"][:, None, :].expand_as(sample.rectified_ids)
    assert torch.equal(sample.rectified_ids[..., held], annotated[..., held])
    assert bool((sample.rectified_ids[..., may] != annotated[..., may]).any())
    assert torch.equal(sample.log_probs[..., held], torch.zeros_like(sample.log_probs[..., held]))
    t.train()
    rates = {
        f: [h[f"rectify/modify_rate_{f}"] for h in t.state.log_history if f"rectify/modify_rate_{f}" in h]
        for f in SED_FIELDS
    }
    assert all(v == 0.0 for j in held for v in rates[SED_FIELDS[j]]) and max(rates["pitch"]) > 0.3
    logged = [h["controller/entropy"] for h in t.state.log_history if "controller/entropy" in h]
    assert logged and all(np.isfinite(v) for v in logged)  # a held field's entropy is 0, not NaN
    p = torch.softmax(_controller_logits(t, rows[:8]), -1)[..., 1]
    assert float(p[:, held].max()) == 0.0
    t.controller.save_pretrained(tmp_path / "saved")
    saved = SedControllerModel.from_pretrained(tmp_path / "saved")
    assert saved.config.rectify_fields == ["pitch", "speed"]
    # a controller for other fields is refused
    with pytest.raises(ValueError, match="rectify_fields"):
        _trainer(tiny, rows, tmp_path / "m", controller=saved)
    with pytest.raises(ValueError, match="rectify_fields"):
        _config(tmp_path, rectify_fields=["pitch", "tone"])
    with pytest.raises(ValueError, match="rectify_fields"):
        _config(tmp_path, rectify_fields=[])


def test_bernoulli_kl():
    p = torch.tensor([[[2.0, 0.0]]])
    assert float(bernoulli_kl(p, p)) == 0.0
    q = torch.tensor([[[0.0, 0.0]]])
    a = torch.sigmoid(torch.tensor(2.0))
    expected = a * torch.log(a / 0.5) + (1 - a) * torch.log((1 - a) / 0.5)
    assert torch.allclose(bernoulli_kl(p, q), expected.reshape(1, 1))


# ---------------------------------------------------------------------------------- controller warm-up vs frozen SLM
def test_frozen_slm_steps_train_the_controller_only(tiny, rows, tmp_path):
    t = _trainer(tiny, rows, tmp_path / "f", max_steps=2, frozen_slm_steps=2, controller_initial_retain_bias=0.0)
    slm, ctrl = _slm_state(t), {k: v.clone() for k, v in t.controller.state_dict().items()}
    t.train()
    assert all(torch.equal(slm[n], p) for n, p in _slm_state(t).items())  # the SLM did not move
    assert any(not torch.equal(ctrl[k], v) for k, v in t.controller.state_dict().items())  # the controller did
    assert len([h for h in t.state.log_history if "reward/mean" in h]) == 2
    # one frozen step, then the SLM trains on the rectified captions
    t2 = _trainer(tiny, rows, tmp_path / "g", max_steps=2, frozen_slm_steps=1, controller_initial_retain_bias=0.0)
    t2.train()
    assert any(not torch.equal(slm[n], p) for n, p in _slm_state(t2).items())


# ---------------------------------------------------------------------------------- what the SLM trains on
def test_argmax_targets_train_on_the_most_probable_rectification(tiny, rows, tmp_path):
    """P(modify pitch) = 0.4: the K samples modify pitch now and then, the most probable
    rectification never does, so with 'argmax' the SLM's loss is SFT's on the annotated captions."""
    import datasets

    model, proc = tiny
    sft = SerSlmSFTTrainer(
        copy.deepcopy(model),
        args=SerSlmSFTConfig(output_dir=str(tmp_path / "sft"), sed_source="auto", use_cpu=True),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=proc,
    )
    plain = SerSlmDataCollator(proc, sed_source="auto")(rows[:4])
    sft.model.train()
    torch.manual_seed(0)
    reference = sft.compute_loss(sft.model, plain)
    losses = {}
    for targets in ("samples", "argmax"):
        t = _trainer(tiny, rows, tmp_path / targets, num_policies=6, slm_targets=targets)
        with torch.no_grad():
            t.controller.head.weight.zero_()
            bias = torch.tensor([[60.0, 0.0]] * 5)
            bias[PITCH] = torch.tensor([0.0, float(np.log(0.4 / 0.6))])
            t.controller.head.bias.copy_(bias.flatten())
        t.model.train()
        t.policy_generator.manual_seed(1)
        batch = t._prepare_inputs(t.data_collator(rows[:4]))
        torch.manual_seed(0)
        losses[targets] = t.compute_loss(t.model, batch)
        rec = t._pending[-1]
        assert rec["actions"].shape == (4, 6, 5) and rec["actions"][..., PITCH].sum() > 0  # the samples still vary
        assert rec["rect"]["input_ids"].shape[0] == 24  # and are what the reward scores
    assert torch.allclose(losses["argmax"], reference, atol=1e-6)
    assert not torch.allclose(losses["samples"], reference, atol=1e-4)
    with pytest.raises(ValueError, match="slm_targets='argmax' needs reward_timing"):
        SedRectifyConfig(output_dir=str(tmp_path), slm_targets="argmax", reward_timing="reuse_forward")


# ---------------------------------------------------------------------------------- controller input
def test_audio_norm_makes_the_summary_level_invariant(tiny, rows, tmp_path):
    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel

    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(1, 16000, generator=g)
    padded = torch.cat([wav, torch.zeros(1, 3000)], 1)
    for norm in (False, True):
        torch.manual_seed(0)
        ctrl = SedControllerModel(
            SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16, audio_norm=norm)
        ).eval()
        with torch.no_grad():
            quiet = ctrl.summarize(*ctrl.log_mel(wav))
            loud = ctrl.summarize(*ctrl.log_mel(4.0 * wav))
            pad = ctrl.summarize(*ctrl.log_mel(padded, torch.tensor([16000])))
        assert torch.allclose(quiet, pad, atol=1e-5)  # padding never changes the summary
        assert torch.allclose(quiet, loud, atol=1e-4) == norm  # a gain shifts raw log-mel, not the normalised one
    t = _trainer(tiny, rows, tmp_path, controller_audio_norm=True)
    assert t.controller.config.audio_norm is True


# ---------------------------------------------------------------------------------- repair logs and audit
def test_fixed_and_broken_are_logged_per_field(tiny, rows, tmp_path):
    from trustser.plots import plot_rectification

    t = _trainer(tiny, rows, tmp_path, max_steps=1, controller_initial_retain_bias=0.0, reward_timing="reuse_forward")
    t.train()
    log = next(h for h in t.state.log_history if "rectify/label_accuracy" in h)
    annotated_right = {"pitch": 0.0, "volume": 1.0, "speed": 1.0, "gender": 1.0, "age": 0.0}  # the rows' annotation
    for f in SED_FIELDS:
        # rectified accuracy = annotation's + fixed - broken
        assert log[f"rectify/label_accuracy_{f}"] == pytest.approx(
            annotated_right[f] + log[f"rectify/fixed_{f}"] - log[f"rectify/broken_{f}"], abs=1e-4
        )
        assert log[f"rectify/fixed_{f}"] == 0 if annotated_right[f] else log[f"rectify/broken_{f}"] == 0
    assert any(log[f"rectify/fixed_{f}"] + log[f"rectify/broken_{f}"] > 0 for f in SED_FIELDS)

    import matplotlib.figure

    drawn = []
    real = matplotlib.figure.Figure.savefig
    matplotlib.figure.Figure.savefig = lambda self, *a, **kw: (drawn.append(self), real(self, *a, **kw))[1]
    try:
        assert plot_rectification(t.state.log_history, tmp_path / "r.png").exists()
    finally:
        matplotlib.figure.Figure.savefig = real
    labels = {line.get_label() for ax in drawn[0].axes for line in ax.get_lines()}
    assert {"volume fixed", "volume broken", "pitch fixed"} <= labels


def test_audit_reports_modify_auc_and_groups(tiny, rows):
    """A controller that modifies volume exactly where the annotation says low or high (the wrong
    labels here): AUC 1 for volume, three fixed, none broken, and the same per speaker group."""
    import datasets

    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
    from trustser.models.sed_controller.modeling_sed_controller import FIELD_OFFSETS
    from trustser.trainers.controller_audit import audit_controller

    data = []
    for i, r in enumerate(rows[:4]):
        r = {**r, **{f + "_auto": r[f] for f in SED_FIELDS}, "volume": "normal", "group": "ab"[i // 2]}
        r["volume_auto"] = ["low", "normal", "high", "low"][i]
        data.append(r)
    torch.manual_seed(0)
    ctrl = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16))
    h, e = 8, 4
    with torch.no_grad():
        ctrl.head.weight.zero_()
        ctrl.head.bias.copy_(torch.tensor([[20.0, 0.0]] * 5).flatten())
        ctrl.sed_embedding.weight.zero_()
        for value in (0, 2):  # volume low / high
            ctrl.sed_embedding.weight[FIELD_OFFSETS[VOLUME] + value, 0] = 1.0
        ctrl.head.bias[2 * VOLUME : 2 * VOLUME + 2] = torch.tensor([0.0, -20.0])
        ctrl.head.weight[2 * VOLUME + 1, h + VOLUME * e] = 40.0
    audit = audit_controller(ctrl, datasets.Dataset.from_list(data), batch_size=3)
    assert audit["modify_auc"]["volume"] == 1.0
    assert audit["modify_auc"]["pitch"] is None  # every pitch label is right: nothing to tell apart
    vol = audit["per_field"]["volume"]["repair"]
    assert (vol["fixed"], vol["broken"], vol["unchanged_right"], vol["unchanged_wrong"]) == (3.0, 0, 1, 0)
    a, b = audit["by_group"]["a"]["volume"], audit["by_group"]["b"]["volume"]
    assert (a["n"], a["wrong"], a["fixed"], a["broken"], a["unchanged"], a["modify_auc"]) == (2, 1, 1.0, 0, 1, 1.0)
    assert (b["n"], b["wrong"], b["fixed"], b["broken"], b["unchanged"], b["modify_auc"]) == (2, 2, 2.0, 0, 0, None)
    assert audit["by_group"]["a"]["pitch"]["unchanged_right"] == 2
    assert "by_group" not in audit_controller(ctrl, datasets.Dataset.from_list(data).remove_columns("group"))


# ---------------------------------------------------------------------------------- recipe pass-through
def test_options_reach_the_rectifying_posttrain_stage_only(tmp_path):
    from trustser.recipe import _training_args, parse_recipe_args
    from trustser.recipe_config import RECTIFY_DEFAULTS

    flags = {
        "reward_scorer": "ema",
        "reward_ema_decay": 0.9,
        "advantage": "per_field",
        "controller_fit": "online",  # the embedded default's table fit needs the frozen scorer
        "retain_kl_coef": 0.1,
        "modify_cost": 0.05,
        "frozen_slm_steps": 5,
        "slm_targets": "argmax",
        "controller_audio_norm": True,
    }
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))] + ["--rectify_fields", "pitch", "volume"]
    cfg = parse_recipe_args(argv, system="sys10")
    post = _training_args(cfg, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    assert {k: getattr(post, k) for k in flags} == flags and post.rectify_fields == ["pitch", "volume"]
    # the key: the options set, beside the embedded default's controller settings as they resolved
    flags["rectify_fields"] = ["pitch", "volume"]
    assert cfg.stage_training_key("posttrain", rectify=True) == dict(sorted({**RECTIFY_DEFAULTS, **flags}.items()))
    # pre-training and plain SFT post-training neither get them nor change their cache keys
    pre = _training_args(cfg, tmp_path, stage="pretrain", max_steps=5, epochs=1.0, lr=1e-4)
    assert isinstance(pre, SerSlmSFTConfig) and not hasattr(pre, "reward_scorer")
    assert cfg.stage_training_key("pretrain") == {} and cfg.stage_training_key("posttrain") == {}
    # the embedded default: issue 15's setting S5 (RECTIFY_DEFAULTS); the trainer's own defaults: the paper's
    default = parse_recipe_args([], system="sys10")
    args = _training_args(default, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    names = ("reward_scorer", "advantage", "retain_kl_coef", "modify_cost", "frozen_slm_steps", "slm_targets")
    names += ("controller_audio_norm", "rectify_fields", "controller_fit")
    assert tuple(getattr(args, n) for n in names) == (
        "frozen",
        "single_field",
        0.0,
        0.05,
        0,
        "samples",
        False,
        ["pitch", "volume"],
        "table",
    )
    paper = SedRectifyConfig(output_dir=str(tmp_path))
    assert tuple(getattr(paper, n) for n in names) == ("policy", "group", 0.0, 0.0, 0, "samples", False, None, "online")


# ---------------------------------------------------------------------------------- auxiliary heads
@pytest.fixture(scope="module")
def tiny_aux():
    from test_rectify import EMOTIONS, TEXTS

    from trustser.models.ser_slm import build_tiny_ser_slm

    return build_tiny_ser_slm(
        TEXTS,
        emotion_labels=EMOTIONS,
        max_audio_seconds=2.0,
        lm_hidden=64,
        encoder_dim=64,
        vocab_size=400,
        aux_sed_loss_weight=1.0,
        aux_ctc_loss_weight=0.3,
        seed=0,
    )


def test_auxiliary_loss_averages_k_label_sets(tiny_aux, rows):
    """(B, K, 5) labels: the mean of the K per-set losses; K equal sets give the (B, 5) loss."""
    model, proc = tiny_aux
    batch = SerSlmDataCollator(proc, sed_source="auto")(rows[:4])
    model.eval()
    with torch.no_grad():
        latents = model.model._audio_latents(
            batch["input_features"], batch["feature_attention_mask"], batch.get("energy"), batch.get("f0")
        )
        a = proc.auxiliary_labels(rows[:4], "_auto")["sed_labels"]
        b = proc.auxiliary_labels(rows[:4])["sed_labels"]  # the true descriptors: other values
        one = model.model.auxiliary_losses(latents, a)["aux_sed_loss"]
        same = model.model.auxiliary_losses(latents, torch.stack([a, a, a], 1))["aux_sed_loss"]
        other = model.model.auxiliary_losses(latents, b)["aux_sed_loss"]
        mixed = model.model.auxiliary_losses(latents, torch.stack([a, b], 1))["aux_sed_loss"]
    assert torch.allclose(one, same, atol=1e-6)
    assert not torch.allclose(one, other, atol=1e-3)
    assert torch.allclose(mixed, (one + other) / 2, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 5\) or \(B, K, 5\)"):
        model.model.auxiliary_losses(latents, torch.cat([a, a]))


def test_rectifying_trainer_trains_the_auxiliary_heads_on_the_rectified_labels(tiny_aux, rows, tmp_path, monkeypatch):
    import datasets

    model, proc = tiny_aux
    plain = SerSlmDataCollator(proc, sed_source="auto", aux_labels=True)(rows[:4])
    sft = SerSlmSFTTrainer(
        copy.deepcopy(model),
        args=SerSlmSFTConfig(output_dir=str(tmp_path / "sft"), sed_source="auto", use_cpu=True),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=proc,
    )
    sft.model.train()
    torch.manual_seed(0)
    reference = sft.compute_loss(sft.model, plain)
    # warm-up (K = 1, always retain): the heads learn the annotated labels, exactly as in SFT
    warm = _trainer((model, proc), rows, tmp_path / "warm", num_policies=1, controller_warmup_steps=10)
    assert warm._trains_aux
    batch = warm._prepare_inputs(warm.data_collator(rows[:4]))
    warm.model.train()
    torch.manual_seed(0)
    assert torch.allclose(warm.compute_loss(warm.model, batch), reference, atol=1e-6)
    assert warm._metrics["train"]["aux_sed_loss"] and warm._metrics["train"]["aux_ctc_loss"]
    off = _trainer((model, proc), rows, tmp_path / "off", num_policies=1, controller_warmup_steps=10, aux_losses=False)
    assert not off._trains_aux
    off.model.train()
    torch.manual_seed(0)
    assert not torch.allclose(off.compute_loss(off.model, batch), reference, atol=1e-4)

    # past warm-up, the controller modifies every pitch label: the SED heads see the K rectified label sets
    t = _trainer((model, proc), rows, tmp_path / "rect", num_policies=3)
    with torch.no_grad():
        t.controller.head.weight.zero_()
        bias = torch.tensor([[60.0, 0.0]] * 5)
        bias[PITCH] = torch.tensor([0.0, 60.0])
        t.controller.head.bias.copy_(bias.flatten())
    seen = []
    inner = t.accelerator.unwrap_model(t.model).model
    original = inner.auxiliary_losses
    monkeypatch.setattr(
        inner, "auxiliary_losses", lambda latents, s=None, c=None: seen.append((s, c)) or original(latents, s, c)
    )
    t.model.train()
    t.compute_loss(t.model, t._prepare_inputs(t.data_collator(rows[:4])))
    sed, ctc = seen[-1]
    annotated = plain["sed_labels"]
    assert sed.shape == (4, 3, 5)
    assert (sed[..., PITCH] != annotated[:, None, PITCH]).all() and (sed[..., PITCH] >= 0).all()
    others = [j for j in range(5) if j != PITCH]
    assert torch.equal(sed[..., others], annotated[:, None, others].expand(-1, 3, -1))
    assert torch.equal(ctc, plain["ctc_labels"])
