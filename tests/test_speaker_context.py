"""SedRectifyConfig.controller_speaker_context: the SED Controller also reads the utterance's
speaker-relative prosody (z-scores of log F0, level and rate within its speaker), computed once per
dataset (``speaker_relative_prosody``), through the collator, the trainer, the checkpoints and the audit."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch
from test_rectify import _config, _trainer, rows, tiny  # noqa: F401  (fixtures)

import trustser.trainers.rectify as rectify_module
from trustser.descriptors import SED_FIELDS
from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
from trustser.models.sed_controller.modeling_sed_controller import FIELD_OFFSETS
from trustser.trainers.rectify_config import SedRectifyConfig
from trustser.trainers.speaker_context import (
    PROSODY_COLUMNS,
    SPEAKER_CONTEXT_COLUMN,
    speaker_relative_prosody,
    with_speaker_context,
)

VOLUME = SED_FIELDS.index("volume")
# per row of the rows fixture (speakers s0, s1 alternate): the annotator's measurements
F0 = [100.0, 150.0, 200.0, 120.0, 400.0, 0.0, 160.0, 240.0]
RMS = [-20.0, -30.0, -30.0, -26.0, -25.0, -22.0, -35.0, -30.0]
RATE = [10.0, 11.0, 12.0, 13.0, 14.0, 9.0, 11.0, 15.0]


def _small_controller(**kw) -> SedControllerModel:
    torch.manual_seed(0)
    return SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16, **kw)).eval()


@pytest.fixture(scope="module")
def measured(rows):
    """The rows fixture with the annotated datasets' measurement columns."""
    return [
        {**r, "f0_median": f0, "rms_db": rms, "phonemes_per_second": rate}
        for r, f0, rms, rate in zip(rows, F0, RMS, RATE)
    ]


# ---------------------------------------------------------------------------------- the z-scores
def test_speaker_relative_prosody_matches_a_hand_computation():
    table = [
        # speaker a: four rows, F0 of row 2 is 0 (missing) and its rate is missing
        ("a", 100.0, -20.0, 10.0),
        ("a", 200.0, -30.0, 12.0),
        ("a", 0.0, -25.0, None),
        ("a", 400.0, -35.0, 14.0),
        ("b", 150.0, -20.0, 11.0),  # one row: no baseline
        ("", 120.0, -22.0, 9.0),  # no speaker
        ("c", float("nan"), -20.0, 8.0),  # c: one usable F0, a constant level
        ("c", 180.0, -20.0, 10.0),
    ]
    data = datasets.Dataset.from_list(
        [dict(zip(("speaker", *PROSODY_COLUMNS), row), id=f"u{i}") for i, row in enumerate(table)]
    )
    z = speaker_relative_prosody(data)
    assert z.shape == (8, 3) and z.dtype == np.float32
    s = math.sqrt(1.5)
    # a: log F0 = log 200 -/+ log 2 around log 200 (std log2 * sqrt(2/3)); level -27.5 +- (7.5, 2.5), std sqrt(31.25);
    # rate 12 -/+ 2, std sqrt(8/3)
    level = [7.5 / math.sqrt(31.25), -2.5 / math.sqrt(31.25), 2.5 / math.sqrt(31.25), -7.5 / math.sqrt(31.25)]
    expected = [
        [-s, level[0], -s],
        [0.0, level[1], 0.0],
        [0.0, level[2], 0.0],
        [s, level[3], s],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, -1.0],  # c's F0: one usable value; its level: zero spread (std floor) -> 0
        [0.0, 0.0, 1.0],
    ]
    np.testing.assert_allclose(z, np.asarray(expected, dtype=np.float32), atol=1e-5)
    # the column the trainer adds: the same values, replacing a stale one
    stale = data.add_column(SPEAKER_CONTEXT_COLUMN, [[9.0, 9.0, 9.0]] * 8)
    added = with_speaker_context(stale)
    assert added.column_names.count(SPEAKER_CONTEXT_COLUMN) == 1 and len(added) == 8
    np.testing.assert_allclose(np.asarray(added[SPEAKER_CONTEXT_COLUMN], dtype=np.float32), z, atol=1e-6)


def test_missing_columns_are_named(tiny, rows, tmp_path):
    data = datasets.Dataset.from_list([{"id": "u0", "f0_median": 100.0, "phonemes_per_second": 10.0}])
    with pytest.raises(ValueError, match=r"lacks the columns \['speaker', 'rms_db'\]"):
        speaker_relative_prosody(data)
    # the trainer with the option on, on rows without the measurements: all three named, at init
    with pytest.raises(ValueError, match=r"\['f0_median', 'rms_db', 'phonemes_per_second'\]"):
        _trainer(tiny, rows, tmp_path, controller_speaker_context=True)
    off = _trainer(tiny, rows, tmp_path / "off")  # option off: the paper's columns suffice, nothing is added
    assert off.controller.config.context_size == 0 and SPEAKER_CONTEXT_COLUMN not in off.train_dataset.column_names
    assert "rectify_context" not in off.data_collator(rows[:2])


# ---------------------------------------------------------------------------------- the controller
def test_context_reaches_the_head_and_context_size_0_is_todays():
    base = _small_controller()
    assert base.config.context_size == 0 and base.head.in_features == 8 + 5 * 4
    ctx = _small_controller(context_size=3)
    assert ctx.head.in_features == 8 + 5 * 4 + 3
    g = torch.Generator().manual_seed(0)
    feats, mask = torch.randn(2, 9, 16, generator=g), torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    ids = torch.tensor([[0, 1, 2, 0, 1], [1, 4, 0, 2, 2]])
    context = torch.randn(2, 3, generator=g)
    with torch.no_grad():
        # context_size 0: today's head over [LSTM summary; SED embeddings]
        out = base(ids, input_features=feats, feature_attention_mask=mask)
        emb = base.sed_embedding(ids + torch.tensor(FIELD_OFFSETS)).flatten(1)
        today = base.head(torch.cat([out.summary, emb], -1)).view(2, 5, 2)
        assert torch.equal(out.logits, today)
        # the same weights plus zero context columns: the same logits whatever the context
        state = base.state_dict()
        state["head.weight"] = torch.cat([state["head.weight"], torch.zeros(10, 3)], 1)
        ctx.load_state_dict(state)
        assert torch.allclose(
            ctx(ids, input_features=feats, feature_attention_mask=mask, context=context).logits, today
        )
        # with weight on the context, only the context changes and the logits follow it
        ctx.head.weight[:, -3:].normal_(generator=g)
        a = ctx(ids, input_features=feats, feature_attention_mask=mask, context=context).logits
        b = ctx(ids, input_features=feats, feature_attention_mask=mask, context=context + 1.0).logits
        assert not torch.allclose(a, b, atol=1e-3)
        assert torch.equal(a, ctx(ids, input_features=feats, feature_attention_mask=mask, context=context).logits)
    with pytest.raises(ValueError, match="pass context="):
        ctx(ids, input_features=feats, feature_attention_mask=mask)
    with pytest.raises(ValueError, match=r"context must be \(B, 3\)"):
        ctx(ids, input_features=feats, feature_attention_mask=mask, context=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reads no context"):
        base(ids, input_features=feats, feature_attention_mask=mask, context=context)
    with pytest.raises(Exception, match="context_size"):  # strict-dataclass validation error
        SedControllerConfig(context_size=-1)


def test_a_controller_saved_before_context_size_loads_as_todays(tmp_path):
    base = _small_controller()
    base.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    assert config.pop("context_size") == 0
    path.write_text(json.dumps(config))
    loaded = SedControllerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.context_size == 0 and loaded.head.in_features == base.head.in_features
    feats, ids = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(
            loaded(ids, input_features=feats).logits, base(ids, input_features=feats).logits, atol=1e-6
        )


# ---------------------------------------------------------------------------------- training
def test_speaker_context_trainer_trains_saves_and_reloads(tiny, measured, tmp_path, monkeypatch):
    seen = []
    real = rectify_module.controller_context

    def spy(controller, batch):
        out = real(controller, batch)
        seen.append(None if out is None else tuple(out.shape))
        return out

    monkeypatch.setattr(rectify_module, "controller_context", spy)
    kw = dict(controller_speaker_context=True, controller_initial_retain_bias=0.0, controller_learning_rate=0.05)
    t = _trainer(tiny, measured, tmp_path / "train", max_steps=2, retain_kl_coef=0.1, **kw)
    assert t.controller.config.context_size == 3 and t.controller.head.in_features == 16 + 5 * 4 + 3
    expected = speaker_relative_prosody(datasets.Dataset.from_list(measured))
    assert np.abs(expected).sum() > 0
    np.testing.assert_allclose(np.asarray(t.train_dataset[SPEAKER_CONTEXT_COLUMN], dtype=np.float32), expected)
    batch = t.data_collator([t.train_dataset[i] for i in range(4)])
    assert batch["rectify_context"].dtype == torch.float32 and batch["rectify_context"].shape == (4, 3)
    assert torch.allclose(batch["rectify_context"], torch.from_numpy(expected[:4]))
    before = {k: v.clone() for k, v in t.controller.state_dict().items()}
    t.train()
    assert seen and all(shape is not None and shape[1] == 3 for shape in seen)  # sampling and the records
    assert any(not torch.equal(before[k], v) for k, v in t.controller.state_dict().items())  # it learned
    assert not torch.equal(before["head.weight"][:, -3:], t.controller.head.weight[:, -3:])  # from the context too
    assert len([h for h in t.state.log_history if "reward/mean" in h]) == 2
    assert len([h for h in t.state.log_history if "controller/retain_kl" in h]) == 2  # the reference read it too

    # the final controller: saved with context_size 3, reloaded with the same logits
    t.save_model(str(tmp_path / "model"))
    loaded = SedControllerModel.from_pretrained(tmp_path / "model" / "controller").eval()
    assert loaded.config.context_size == 3
    batch = t._prepare_inputs(batch)
    t.controller.eval()
    with torch.no_grad():
        feats, mask = t.controller_features(batch)
        ctx = batch["rectify_context"]
        mine = t.controller(batch["rectify_sed_ids"], input_features=feats, feature_attention_mask=mask, context=ctx)
        theirs = loaded(batch["rectify_sed_ids"], input_features=feats, feature_attention_mask=mask, context=ctx)
    assert torch.equal(mine.logits, theirs.logits)
    # a checkpoint's controller loads into a fresh trainer with the option on (resume)
    t.save_controller(str(tmp_path / "ckpt"))
    fresh = _trainer(tiny, measured, tmp_path / "fresh", **kw)
    fresh.load_controller(str(tmp_path / "ckpt"))
    assert all(torch.equal(v, fresh.controller.state_dict()[k]) for k, v in t.controller.state_dict().items())


def test_a_controller_without_the_context_is_refused(tiny, measured, tmp_path):
    def build(controller, **kw):
        return _trainer(tiny, measured, tmp_path, controller=controller, **kw)

    with pytest.raises(ValueError, match="controller_speaker_context=True needs a controller that reads a 3-wide"):
        build(_small_controller(), controller_speaker_context=True)
    with pytest.raises(ValueError, match="controller_speaker_context=False needs a controller that reads no context"):
        build(_small_controller(context_size=3))
    assert build(_small_controller(context_size=3), controller_speaker_context=True).controller.config.context_size == 3


def test_speaker_context_reaches_the_posttrain_stage(tmp_path):
    from trustser.recipe import _training_args, parse_recipe_args

    cfg = parse_recipe_args(["--posttrain_training_args", '{"controller_speaker_context": true}'], system="sys10")
    post = _training_args(cfg, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    assert post.controller_speaker_context is True
    assert cfg.stage_training_key("posttrain", rectify=True)["controller_speaker_context"] is True
    # on in the embedded default (RECTIFY_DEFAULTS); off on request, and in the trainer's own (the paper's) default
    default = parse_recipe_args([], system="sys10")
    args = _training_args(default, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    assert args.controller_speaker_context is True
    off = parse_recipe_args(["--controller_speaker_context", "false"], system="sys10")
    assert off.stage_training_key("posttrain", rectify=True)["controller_speaker_context"] is False
    assert SedRectifyConfig(output_dir=str(tmp_path)).controller_speaker_context is False


# ---------------------------------------------------------------------------------- audit
def test_audit_of_a_context_controller(measured):
    """A controller that modifies volume where the utterance is louder than its speaker's mean (the
    wrong 'high' labels here): AUC 1, both fixed, none broken; its P(modify) is the one a direct
    forward with the dataset's speaker-relative prosody gives."""
    from trustser.trainers.controller_audit import _modify_probabilities, audit_controller

    data = []
    for i, r in enumerate(measured[:4]):
        r = {**r, **{f + "_auto": r[f] for f in SED_FIELDS}, "volume": "normal", "speaker": "a"}
        r["rms_db"] = [-20.0, -30.0, -22.0, -28.0][i]  # z > 0 for rows 0 and 2
        r["volume_auto"] = "high" if i in (0, 2) else "normal"
        data.append(r)
    data = datasets.Dataset.from_list(data)
    ctrl = _small_controller(context_size=3)
    width = 8 + 5 * 4
    with torch.no_grad():
        ctrl.head.weight.zero_()
        ctrl.head.bias.copy_(torch.tensor([[20.0, 0.0]] * 5).flatten())
        ctrl.head.bias[2 * VOLUME : 2 * VOLUME + 2] = torch.tensor([0.0, 0.0])
        ctrl.head.weight[2 * VOLUME + 1, width + PROSODY_COLUMNS.index("rms_db")] = 40.0
    audit = audit_controller(ctrl, data, batch_size=3)
    assert audit["n"] == 4 and audit["modify_auc"]["volume"] == 1.0
    vol = audit["per_field"]["volume"]["repair"]
    assert (vol["fixed"], vol["broken"], vol["unchanged_right"], vol["unchanged_wrong"]) == (2.0, 0, 2, 0)
    p, ids, _, _ = _modify_probabilities(ctrl, data, 3, "auto")
    context = torch.from_numpy(speaker_relative_prosody(data))
    assert context[[0, 2], 1].min() > 0 > context[[1, 3], 1].max()
    batch = rectify_module.SedRectifyCollator.controller_inputs([np.asarray(r["audio"]["array"]) for r in measured[:4]])
    with torch.no_grad():
        feats, mask = ctrl.log_mel(*batch)
        direct = ctrl(torch.from_numpy(ids), input_features=feats, feature_attention_mask=mask, context=context).logits
    assert np.allclose(p, direct.softmax(-1)[..., 1].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="lacks the columns"):
        audit_controller(ctrl, data.remove_columns("rms_db"))
