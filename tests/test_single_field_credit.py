"""``advantage="single_field"`` (issue 15): every one-field modification is scored, and the
controller is fitted to the best response to those measured gains."""

from __future__ import annotations

import pytest
import torch
from test_rectify import _config, _trainer, rows, tiny  # noqa: F401  (fixtures)
from test_rectify_options import _controller_logits

from trustser.descriptors import SED_FIELDS
from trustser.models.sed_controller.modeling_sed_controller import FIELD_SIZES
from trustser.trainers.rectify_objective import best_response_loss, single_field_gains, single_field_variants

PITCH, VOLUME, GENDER = (SED_FIELDS.index(f) for f in ("pitch", "volume", "gender"))


def test_variants_modify_one_field_to_each_neighbour():
    ids = torch.tensor([[0, 1, 2, 1, 4], [1, 0, 1, 0, 2]])  # ends, middles, gender both ways
    fields = [PITCH, VOLUME, GENDER, SED_FIELDS.index("age")]
    v = single_field_variants(ids, fields)
    assert v.shape == (2, 1 + 2 * len(fields), 5)
    assert torch.equal(v[:, 0], ids)  # row 0: the annotation
    for i, f in enumerate(fields):
        for row in (1 + 2 * i, 2 + 2 * i):
            differs = v[:, row] != ids
            assert torch.equal(differs.sum(-1), torch.ones(2, dtype=torch.long))  # one field changed ...
            assert bool(differs[:, f].all())  # ... this one
            assert bool(((v[:, row, f] - ids[:, f]).abs() == 1).all() or f == GENDER)  # to a neighbour
            assert bool((v[:, row, f] >= 0).all()) and bool((v[:, row, f] < FIELD_SIZES[f]).all())
    # a middle value: one row down, one row up; an end value: its one neighbour twice
    assert v[1, 1, PITCH] == 0 and v[1, 2, PITCH] == 2
    assert v[0, 1, PITCH] == 1 and v[0, 2, PITCH] == 1
    assert v[0, 3, VOLUME] == 0 and v[0, 4, VOLUME] == 2
    assert v[0, 5, GENDER] == 0 and v[1, 5, GENDER] == 1


def test_gains_average_the_two_neighbours():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 0.0, 0.0], [0.0, 1.0, 1.0, float("nan"), 1.0]])
    g = single_field_gains(rewards, 2)
    assert torch.allclose(g[0], torch.tensor([2.0, -1.0]))
    assert g[1, 0] == 1.0 and torch.isnan(g[1, 1])
    with pytest.raises(ValueError, match="2 fields"):
        single_field_gains(rewards[:, :4], 2)


def test_best_response_loss_reaches_the_entropy_regularised_optimum():
    """Free logits fitted to the loss reach sigmoid((gain - cost) / temperature) per decision; with
    temperature 0 the sign of gain - cost; a held field and a NaN gain get no gradient; unlike the
    expected reward, the loss still moves a logit that has collapsed to 'retain'."""
    gains = torch.tensor([[0.3, -0.2], [0.05, float("nan")]])
    fields, cost, tau = [PITCH, VOLUME], 0.1, 0.1
    logits = torch.zeros(2, 5, 2, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(600):
        opt.zero_grad()
        best_response_loss(logits, gains, fields, cost, tau).backward()
        opt.step()
    p = torch.softmax(logits.detach(), -1)[..., 1]
    want = torch.sigmoid((gains - cost) / tau)
    assert torch.allclose(p[0, fields], want[0], atol=0.02) and abs(float(p[1, PITCH] - want[1, 0])) < 0.02
    assert p[1, VOLUME] == 0.5 and bool((p[:, [2, 3, 4]] == 0.5).all())  # never fitted
    # collapsed to retain (P(modify) ~ 1e-4) but the modification pays: the gradient is not ~0
    collapsed = torch.tensor([[[5.0, -4.0]] * 5], requires_grad=True)
    best_response_loss(collapsed, torch.tensor([[1.0]]), [PITCH], 0.0, 0.0).backward()
    assert float(collapsed.grad[0, PITCH, 1]) < -0.5
    hard = torch.zeros(1, 5, 2, requires_grad=True)
    best_response_loss(hard, torch.tensor([[0.2, -0.2]]), fields, 0.0, 0.0).backward()
    assert float(hard.grad[0, PITCH, 1]) < 0 < float(hard.grad[0, VOLUME, 1])


def test_single_field_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="after_update"):
        _config(tmp_path, advantage="single_field", reward_timing="reuse_forward")
    with pytest.raises(ValueError, match="adjacent"):
        _config(tmp_path, advantage="single_field", reward_timing="after_update", controller_modify_strategy="uniform")
    assert _config(tmp_path, advantage="single_field", reward_timing="after_update").advantage == "single_field"


def test_trainer_scores_every_one_field_modification(tiny, rows, tmp_path):
    """The rewards after a step are of 1 + 2F captions per utterance: the annotated one first, then
    each allowed field modified alone; the SLM still trains on the K samples."""
    t = _trainer(
        tiny,
        rows,
        tmp_path / "t",
        advantage="single_field",
        reward_timing="after_update",
        reward_scorer="frozen",
        rectify_fields=["volume", "pitch"],
        num_policies=3,
    )
    batch = t._prepare_inputs(t.data_collator(rows[:2]))
    t.model.train()
    t.compute_loss(t.model, batch)
    rec = t._pending[-1]
    assert rec["num_captions"] == 5 and rec["actions"].shape == (2, 3, 5)
    text = t.processing_class.tokenizer.batch_decode(rec["rect"]["input_ids"], skip_special_tokens=True)
    assert len(text) == 2 * 5
    annotated = batch["rectify_sed_ids"]
    variants = single_field_variants(annotated, [PITCH, VOLUME])
    want = t._captions(batch, variants)
    for got, caption in zip(text, want):
        assert caption.split(". Based on")[0].lower() in got.lower()
    rewards = t._rewards_after_update(rec)
    assert rewards.shape == (2, 5) and bool(torch.isfinite(rewards).all())


# a controller that may modify pitch and volume, trained 3 steps where modifying pitch pays
PITCH_PAYS = dict(
    max_steps=3,
    advantage="single_field",
    reward_timing="after_update",
    rectify_fields=["pitch", "volume"],
    controller_learning_rate=0.05,
    controller_entropy_coef=0.1,
    modify_cost=0.05,
)


def pitch_pays_rewards(self, record):
    """Stands in for ``_rewards_after_update``: modifying pitch alone gains 1 nat, volume alone
    loses 1 (the 1 + 2F single-field rows, fields in SED_FIELDS order: pitch, then volume)."""
    b, m = record["rect"]["input_ids"].shape[0] // record["num_captions"], record["num_captions"]
    r = torch.zeros(b, m)
    r[:, 1:3] = 1.0
    r[:, 3:5] = -1.0
    return r


def assert_learnt_pitch(t, rows, before: torch.Tensor) -> None:
    """The controller's modify probability rose for pitch, fell for volume, and is 0 for held fields."""
    after = torch.softmax(_controller_logits(t, rows[:8]), -1)[..., 1]
    assert float(after[:, PITCH].mean()) > float(before[:, PITCH].mean()) + 0.3
    assert float(after[:, VOLUME].mean()) < float(before[:, VOLUME].mean())
    assert float(after[:, [2, 3, 4]].max()) == 0.0


def test_controller_learns_the_field_whose_modification_pays(tiny, rows, tmp_path, monkeypatch):
    """With rewards where modifying pitch alone gains 1 nat and volume alone loses 1, the
    controller's modify probability rises for pitch and falls for volume; the gains are logged."""
    import trustser.trainers.rectify as rectify_module

    monkeypatch.setattr(rectify_module.SedRectifyTrainer, "_rewards_after_update", pitch_pays_rewards)
    t = _trainer(tiny, rows, tmp_path / "learn", controller_updates_per_step=4, **PITCH_PAYS)
    before = torch.softmax(_controller_logits(t, rows[:8]), -1)[..., 1]
    t.train()
    assert_learnt_pitch(t, rows, before)
    gains = [h for h in t.state.log_history if "reward/gain_pitch" in h]
    assert gains and all(h["reward/gain_pitch"] == 1.0 and h["reward/gain_volume"] == -1.0 for h in gains)
    assert not any("controller/clip_fraction" in h for h in t.state.log_history)


def test_table_fit_config_is_validated(tmp_path):
    table = dict(controller_fit="table", advantage="single_field", reward_timing="after_update")
    with pytest.raises(ValueError, match="reward_scorer='frozen'"):
        _config(tmp_path, **table)
    with pytest.raises(ValueError, match="advantage='single_field'"):
        _config(tmp_path, **{**table, "advantage": "group", "reward_scorer": "frozen"})
    with pytest.raises(ValueError, match="frozen_slm_steps=0"):
        _config(tmp_path, **table, reward_scorer="frozen", frozen_slm_steps=2)
    with pytest.raises(ValueError, match="controller_fit must be one of"):
        _config(tmp_path, controller_fit="offline")
    with pytest.raises(ValueError, match="controller_table_max_iterations"):
        _config(tmp_path, **table, reward_scorer="frozen", controller_table_max_iterations=0)
    assert _config(tmp_path, **table, reward_scorer="frozen").controller_fit == "table"


def test_table_fit_scores_once_then_keeps_the_controller(tiny, rows, tmp_path, monkeypatch):
    """``controller_fit="table"``: the rewards are computed once, before the first step, over the
    whole training set (1 + 2F captions per utterance); the controller learns the field whose
    modification pays from them and is not updated (nor anything scored) during the SLM's steps."""
    import trustser.trainers.rectify as rectify_module

    scored = []

    def rewards(self, record):
        scored.append((record["rect"]["input_ids"].shape[0] // record["num_captions"], record["num_captions"]))
        assert self.state.global_step == 0
        return pitch_pays_rewards(self, record)

    monkeypatch.setattr(rectify_module.SedRectifyTrainer, "_rewards_after_update", rewards)
    t = _trainer(
        tiny,
        rows,
        tmp_path / "table",
        reward_scorer="frozen",
        controller_fit="table",
        per_device_eval_batch_size=3,
        **PITCH_PAYS,
    )
    before = torch.softmax(_controller_logits(t, rows[:8]), -1)[..., 1]
    fitted = {}
    fit = t.fit_controller_to_table

    def fit_and_keep():
        report = fit()
        fitted.update({k: v.clone() for k, v in t.controller.state_dict().items()})
        fitted["report"] = report
        return report

    t.fit_controller_to_table = fit_and_keep
    t.train()
    # one scoring pass over the 8 rows in batches of 3, all before the first step, 5 captions each
    assert scored == [(3, 5), (3, 5), (2, 5)]
    assert fitted["report"]["controller/table_utterances"] == 8.0
    assert fitted["report"]["controller/table_updates"] >= 1
    for key, value in t.controller.state_dict().items():  # unchanged by the SLM's three steps
        assert torch.equal(value, fitted[key]), key
    assert_learnt_pitch(t, rows, before)
    logs = t.state.log_history
    assert any(h.get("controller/table_updates", 0) >= 1 for h in logs)
    assert any(h.get("reward/gain_pitch") == 1.0 for h in logs)
    assert not any("reward/std" in h or "controller/loss" in h for h in logs)  # no per-step update
    assert t.state.global_step == 3


def test_table_fit_runs_once_not_on_resume(tiny, rows, tmp_path, monkeypatch):
    """The fit runs when training starts from step 0 only: a resumed run's checkpoint carries it."""
    from transformers import TrainerControl, TrainerState

    from trustser.trainers.rectify import _StepEndFlush

    t = _trainer(
        tiny,
        rows,
        tmp_path / "resume",
        advantage="single_field",
        reward_timing="after_update",
        reward_scorer="frozen",
        controller_fit="table",
    )
    calls = []
    t.fit_controller_to_table = lambda: calls.append(1)
    callback = next(c for c in t.callback_handler.callbacks if isinstance(c, _StepEndFlush))
    callback.on_train_begin(t.args, TrainerState(global_step=5), TrainerControl())
    assert calls == []
    callback.on_train_begin(t.args, TrainerState(global_step=0), TrainerControl())
    assert calls == [1]
    t.args.controller_fit = "online"
    callback.on_train_begin(t.args, TrainerState(global_step=0), TrainerControl())
    assert calls == [1]
