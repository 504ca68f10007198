"""SED Controller: modify semantics, sampling, group normalisation, clipped objective, I/O."""

from __future__ import annotations

import math

import pytest
import torch

from trustser.descriptors import SED_FIELDS, SED_VOCAB
from trustser.models.sed_controller import (
    MODIFY,
    SedControllerConfig,
    SedControllerModel,
    action_log_probs,
    clipped_policy_loss,
    group_normalize,
    ids_to_sed,
    modify_labels,
    sample_policies,
    sed_to_ids,
)

SED = {"pitch": "normal", "volume": "high", "speed": "slow", "gender": "male", "age": "young adult"}


def _all_ids():
    """Every (field, value) combination, as rows of a (N, 5) tensor varying one field."""
    rows = []
    for fi, f in enumerate(SED_FIELDS):
        for vi in range(len(SED_VOCAB[f])):
            row = sed_to_ids([SED])[0].clone()
            row[fi] = vi
            rows.append((fi, vi, row))
    return rows


def test_sed_ids_roundtrip_and_errors():
    ids = sed_to_ids([SED, {**SED, "age": "Middle Aged"}])
    assert ids.shape == (2, 5)
    assert ids_to_sed(ids)[0] == SED
    assert ids_to_sed(ids)[1]["age"] == "middle-aged"
    with pytest.raises(ValueError, match="row 0.*'pitch'"):
        sed_to_ids([{**SED, "pitch": "loud"}])


def test_modify_adjacent_semantics():
    g = torch.Generator().manual_seed(0)
    for fi, vi, row in _all_ids():
        n = len(SED_VOCAB[SED_FIELDS[fi]])
        mask = torch.zeros(400, 5, dtype=torch.long)
        mask[:, fi] = 1
        out = modify_labels(row.expand(400, 5), mask, "adjacent", g)
        other = [j for j in range(5) if j != fi]
        assert torch.equal(out[:, other], row.expand(400, 5)[:, other])  # untouched fields
        got = out[:, fi]
        expected = {v for v in (vi - 1, vi + 1) if 0 <= v < n}
        assert set(got.tolist()) == expected
        if len(expected) == 2:  # uniform among the two neighbours
            frac = (got == vi - 1).float().mean().item()
            assert 0.4 < frac < 0.6
    # gender: the other value, always
    ids = sed_to_ids([{**SED, "gender": "female"}]).expand(10, 5)
    m = torch.zeros(10, 5, dtype=torch.long)
    m[:, SED_FIELDS.index("gender")] = 1
    assert {r["gender"] for r in ids_to_sed(modify_labels(ids, m, "adjacent", g))} == {"male"}


def test_modify_uniform_semantics():
    g = torch.Generator().manual_seed(1)
    for fi, vi, row in _all_ids():
        n = len(SED_VOCAB[SED_FIELDS[fi]])
        mask = torch.zeros(600, 5, dtype=torch.long)
        mask[:, fi] = 1
        got = modify_labels(row.expand(600, 5), mask, "uniform", g)[:, fi]
        assert set(got.tolist()) == set(range(n)) - {vi}
    with pytest.raises(ValueError, match="modify strategy"):
        modify_labels(row[None], mask[:1], "nearest", g)


def test_sampling_reproducible_and_consistent():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 2)
    ids = sed_to_ids([SED] * 3)
    a = sample_policies(logits, ids, 6, generator=torch.Generator().manual_seed(7))
    b = sample_policies(logits, ids, 6, generator=torch.Generator().manual_seed(7))
    c = sample_policies(logits, ids, 6, generator=torch.Generator().manual_seed(8))
    assert a.actions.shape == a.log_probs.shape == a.rectified_ids.shape == (3, 6, 5)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.rectified_ids, b.rectified_ids)
    assert not torch.equal(a.actions, c.actions)
    # rectified differs from the annotation exactly where the action is "modify"
    assert torch.equal(a.rectified_ids != ids[:, None, :], a.actions.bool())
    # log-probs are those of the sampled actions
    assert torch.allclose(a.log_probs, action_log_probs(logits, a.actions))
    assert torch.allclose(a.policy_log_probs, a.log_probs.sum(-1))
    r = sample_policies(logits, ids, 4, generator=torch.Generator().manual_seed(7), force_retain=True)
    assert r.actions.sum() == 0 and torch.equal(r.rectified_ids, ids[:, None, :].expand(3, 4, 5))


def test_sampling_frequency_matches_probability():
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 5])  # P(modify) = 0.75
    s = sample_policies(logits, sed_to_ids([SED]), 4000, generator=torch.Generator().manual_seed(0))
    assert abs(s.actions.float().mean().item() - 0.75) < 0.02


def test_group_normalize():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_normalize(r)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(3))  # no spread, no signal
    assert torch.equal(group_normalize(torch.tensor([[4.0], [2.0]])), torch.zeros(2, 1))  # K = 1
    nan = group_normalize(torch.tensor([[1.0, float("nan"), 3.0]]))
    assert nan[0, 1] == 0 and nan[0, 0] < 0 < nan[0, 2]
    # invariant to shift and scale of the rewards
    assert torch.allclose(group_normalize(10 * r[:1] - 3), group_normalize(r[:1]), atol=1e-4)


def test_group_normalize_scaling_options():
    r = torch.tensor([[1.0, 1.02, 0.98], [0.0, 2.0, 1.0]])
    # "none" keeps the size of the reward differences (Dr. GRPO): r - group mean
    assert torch.allclose(
        group_normalize(r, scale="none"), torch.tensor([[0.0, 0.02, -0.02], [-1.0, 1.0, 0.0]]), atol=1e-6
    )
    # "group" turns a 0.02-nat spread into the same unit-size advantages as a 1-nat spread
    g = group_normalize(r, scale="group")
    assert torch.allclose(g[0], g[1][[2, 1, 0]], atol=1e-2)
    b = group_normalize(r, scale="batch")
    assert torch.allclose(b, group_normalize(r, scale="none") / (r.flatten().std() + 1e-4), atol=1e-6)
    assert torch.equal(group_normalize(torch.tensor([[3.0]]), scale="none"), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="reward scaling"):
        group_normalize(r, scale="rank")


def test_hidden_head_option(tmp_path):
    cfg = SedControllerConfig(hidden_size=16, embedding_size=4, n_mels=16, head_hidden_size=8)
    torch.manual_seed(0)
    model = SedControllerModel(cfg).eval()
    assert model.head_hidden[0].out_features == 8 and model.head.in_features == 8
    ids = sed_to_ids([SED, SED])
    feats = torch.randn(2, 30, 16)
    logits = model(ids, input_features=feats).logits
    assert logits.shape == (2, 5, 2)
    # the retain bias still sets the starting point: P(modify) ~ sigmoid(-2)
    p = logits.softmax(-1)[..., MODIFY]
    assert torch.all((p > 0.08) & (p < 0.16))
    model.save_pretrained(tmp_path)
    again = SedControllerModel.from_pretrained(tmp_path).eval()
    assert torch.equal(again(ids, input_features=feats).logits, logits)
    with pytest.raises(Exception, match="head_hidden_size"):  # strict-dataclass validation error
        SedControllerConfig(head_hidden_size=-1)
    assert (
        SedControllerModel(SedControllerConfig(hidden_size=16, embedding_size=4, n_mels=16)).head_hidden is None
    )  # paper: linear


def test_clipped_loss_clips_gradient():
    old = torch.log(torch.full((1, 2, 5), 0.5))
    adv = torch.tensor([[1.0, -1.0]])
    new = old.clone().requires_grad_(True)
    loss, frac = clipped_policy_loss(new, old, adv, 0.2)
    loss.backward()
    # at ratio 1: d(-mean(ratio*A))/dlogp = -A / N
    assert torch.allclose(new.grad[0, 0], torch.full((5,), -1.0 / 10))
    assert torch.allclose(new.grad[0, 1], torch.full((5,), 1.0 / 10))
    assert frac == 0
    # ratio far above 1+eps with positive advantage: clipped, no gradient
    new2 = (old + 1.0).clone().requires_grad_(True)
    loss2, frac2 = clipped_policy_loss(new2, old, adv, 0.2)
    loss2.backward()
    assert torch.all(new2.grad[0, 0] == 0) and torch.all(new2.grad[0, 1] != 0)
    assert frac2 == 1


def _controller(**kw):
    torch.manual_seed(0)
    return SedControllerModel(SedControllerConfig(n_mels=16, hidden_size=16, embedding_size=4, **kw))


def test_policy_gradient_direction():
    """After updates on group-normalised rewards, the higher-reward policy is more likely."""
    ctrl = _controller()
    opt = torch.optim.Adam(ctrl.parameters(), lr=0.05)
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    ids = sed_to_ids([SED, {**SED, "pitch": "high"}])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits0 = ctrl(ids, input_values=wav).logits
    sample = sample_policies(logits0, ids, 8, generator=g)
    # reward: +1 for modifying pitch, -1 otherwise (a controller should learn to modify pitch)
    pitch = SED_FIELDS.index("pitch")
    rewards = sample.actions[..., pitch].float() * 2 - 1
    if rewards.std() == 0:  # make sure both outcomes are present
        sample.actions[:, 0, pitch] = 1 - sample.actions[:, 0, pitch]
        rewards = sample.actions[..., pitch].float() * 2 - 1
        sample.log_probs.copy_(action_log_probs(logits0, sample.actions))
    adv = group_normalize(rewards)
    for _ in range(3):
        new = action_log_probs(ctrl(ids, input_values=wav).logits, sample.actions)
        loss, _ = clipped_policy_loss(new, sample.log_probs, adv, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits1 = ctrl(ids, input_values=wav).logits
    p0 = logits0.softmax(-1)[:, pitch, MODIFY]
    p1 = logits1.softmax(-1)[:, pitch, MODIFY]
    assert torch.all(p1 > p0 + 0.05), (p0, p1)


def test_initial_bias_prefers_retain():
    ctrl = _controller(initial_retain_bias=2.0)
    with torch.no_grad():
        p = ctrl(sed_to_ids([SED]), input_values=torch.randn(1, 4000)).logits.softmax(-1)
    assert torch.allclose(p[..., MODIFY], torch.full((1, 5), torch.sigmoid(torch.tensor(-2.0)).item()), atol=0.05)


@pytest.mark.parametrize("pooling,stride", [("last", 1), ("mean", 1), ("last", 3), ("mean", 4)])
def test_padding_does_not_change_summary(pooling, stride):
    ctrl = _controller(pooling=pooling, frame_stride=stride).eval()
    wav = torch.randn(1, 6400, generator=torch.Generator().manual_seed(2))
    feats, mask = ctrl.log_mel(wav)
    padded = torch.cat([feats, torch.randn(1, 17, feats.shape[-1])], 1)
    pmask = torch.cat([mask, torch.zeros(1, 17, dtype=torch.long)], 1)
    with torch.no_grad():
        a = ctrl.summarize(feats, mask)
        b = ctrl.summarize(padded, pmask)
    assert torch.allclose(a, b, atol=1e-5)


def test_waveform_and_logmel_inputs_agree_and_errors():
    ctrl = _controller().eval()
    wav = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 5000])
    am = (torch.arange(8000)[None] < lengths[:, None]).long()
    ids = sed_to_ids([SED] * 2)
    with torch.no_grad():
        a = ctrl(ids, input_values=wav * am, attention_mask=am).logits
        feats, mask = ctrl.log_mel(wav * am, lengths)
        b = ctrl(ids, input_features=feats, feature_attention_mask=mask).logits
        # second utterance alone (no padding) equals its padded version
        c = ctrl(ids[1:], input_values=wav[1:, :5000]).logits
    assert torch.allclose(a, b) and torch.allclose(a[1:], c, atol=1e-5)
    with pytest.raises(ValueError, match="input_features .* or input_values"):
        ctrl(ids)
    with pytest.raises(Exception, match="pooling"):  # strict-dataclass validation error
        SedControllerConfig(pooling="max")


def test_save_load_auto(tmp_path):
    from transformers import AutoConfig, AutoModel

    import trustser  # noqa: F401  (registers the Auto classes)

    ctrl = _controller()
    ctrl.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "sed_controller"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, SedControllerModel)
    for (k, v), (k2, v2) in zip(ctrl.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
