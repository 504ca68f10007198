"""SedRectifyConfig.controller_input (issue 15): the SED Controller reads its own log-mel (the paper)
or the SER-SLM's SED-branch features of the same utterance (deterministic, no gradient to the SLM),
through one function for training and audit (``controller_input_features``)."""

from __future__ import annotations

import datasets
import pytest
import torch
from test_rectify import _config, _trainer, rows, tiny  # noqa: F401  (fixtures)

from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
from trustser.trainers.rectify import audio_inputs_of, controller_input_features
from trustser.trainers.rectify_config import SedRectifyConfig
from trustser.trainers.sft import SerSlmSFTConfig


def _batch(trainer, rows, n=4):
    return trainer._prepare_inputs(trainer.data_collator(rows[:n]))


def _sed_features_eval(model, batch):
    """The SED VIB branch's mean, straight from the SLM's latents in eval mode (the reference)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            latents = model.model._audio_latents(**audio_inputs_of(batch))
    finally:
        model.train(was)
    mask = latents["audio_mask"]
    return latents["z_sed"] * mask[..., None], mask


# ---------------------------------------------------------------------------------- (a) the option
def test_controller_input_is_validated_and_documented(tmp_path):
    assert SedRectifyConfig(output_dir=str(tmp_path)).controller_input == "log_mel"  # the paper
    assert SedRectifyConfig(output_dir=str(tmp_path), controller_input="sed_branch").controller_input == "sed_branch"
    with pytest.raises(ValueError, match="controller_input must be one of"):
        SedRectifyConfig(output_dir=str(tmp_path), controller_input="mfcc")
    import dataclasses

    help_text = next(f for f in dataclasses.fields(SedRectifyConfig) if f.name == "controller_input").metadata["help"]
    assert "sed_branch" in help_text and "log_mel" in help_text and "no_grad" in help_text


def test_controller_input_reaches_the_rectifying_posttrain_stage_only(tmp_path):
    """As controller_audio_norm: a top-level trainer setting that reaches the rectifying
    post-training and its cache key, not pre-training or plain SFT."""
    from trustser.recipe import _training_args, parse_recipe_args
    from trustser.recipe_config import RECTIFY_DEFAULTS

    cfg = parse_recipe_args(["--controller_input", "sed_branch"], system="sys10")
    post = _training_args(cfg, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    assert post.controller_input == "sed_branch"
    assert cfg.stage_training_key("posttrain", rectify=True) == dict(
        sorted({**RECTIFY_DEFAULTS, "controller_input": "sed_branch"}.items())
    )
    pre = _training_args(cfg, tmp_path, stage="pretrain", max_steps=5, epochs=1.0, lr=1e-4)
    assert isinstance(pre, SerSlmSFTConfig) and not hasattr(pre, "controller_input")
    assert cfg.stage_training_key("pretrain") == {} and cfg.stage_training_key("posttrain") == {}
    default = parse_recipe_args([], system="sys10")
    args = _training_args(default, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    # the embedded default's choice (RECTIFY_DEFAULTS), in its key; the trainer's own default is the paper's
    assert args.controller_input == RECTIFY_DEFAULTS["controller_input"] == "none"
    assert default.stage_training_key("posttrain", rectify=True)["controller_input"] == "none"
    assert SedRectifyConfig(output_dir=str(tmp_path)).controller_input == "log_mel"


# ---------------------------------------------------------------------------------- (b) input_size
def test_input_size_sets_the_lstm_width_and_round_trips(tmp_path):
    assert SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16)).lstm.input_size == 16
    torch.manual_seed(0)
    ctrl = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16, input_size=12)).eval()
    assert ctrl.lstm.input_size == 12 and not ctrl.reads_log_mel
    ctrl.save_pretrained(tmp_path)
    loaded = SedControllerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.input_size == 12 and loaded.lstm.input_size == 12
    sd = ctrl.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    feats = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    ids = torch.zeros(2, 5, dtype=torch.long)
    with torch.no_grad():
        a = ctrl(ids, input_features=feats, feature_attention_mask=mask).logits
        b = loaded(ids, input_features=feats, feature_attention_mask=mask).logits
    assert torch.equal(a, b)
    # it reads features computed outside it: its log-mel front end and wrong widths are refused
    with pytest.raises(ValueError, match="input_features / feature_attention_mask"):
        ctrl.log_mel(torch.zeros(1, 8000))
    with pytest.raises(ValueError, match="input_features / feature_attention_mask"):
        ctrl(ids[:1], input_values=torch.zeros(1, 8000))
    with pytest.raises(ValueError, match="12-wide frames .input_size., got 16-wide"):
        ctrl(ids, input_features=torch.zeros(2, 7, 16))
    with pytest.raises(Exception, match="input_size"):  # strict-dataclass validation error
        SedControllerConfig(input_size=0)
    # audio_norm standardises whichever features the LSTM reads: an affine change per feature is invisible
    for norm in (False, True):
        torch.manual_seed(0)
        c = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, input_size=12, audio_norm=norm))
        with torch.no_grad():
            same = torch.allclose(c.summarize(feats, mask), c.summarize(3.0 * feats + 2.0, mask), atol=1e-4)
        assert same == norm


# ---------------------------------------------------------------------------------- the SLM's accessor
def test_get_sed_features_is_the_deterministic_vib_mean(tiny, rows, tmp_path):
    t = _trainer(tiny, rows, tmp_path)
    model = t.model
    batch = _batch(t, rows)
    model.train()
    feats, mask = model.get_sed_features(**audio_inputs_of(batch))
    again, _ = model.get_sed_features(**audio_inputs_of(batch))
    assert model.training and all(m.training for m in model.modules())  # every module's mode is back
    assert torch.equal(feats, again)  # the mean, not a reparameterised sample
    assert not feats.requires_grad
    ref, ref_mask = _sed_features_eval(model, batch)
    assert torch.equal(feats, ref) and torch.equal(mask, ref_mask)
    assert feats.shape[-1] == model.config.sed_vib_dim
    assert bool((mask.sum(1) < mask.shape[1]).any())  # the rows differ in length: some tokens are padding
    assert float(feats[~mask].abs().sum()) == 0.0
    # in training mode the branch samples: a sample would differ from the mean
    with torch.no_grad():
        sampled = model.model._audio_latents(**audio_inputs_of(batch))["z_sed"]
    assert not torch.allclose(sampled * mask[..., None], feats)


# ---------------------------------------------------------------------------------- (c) training on SED-branch features
def test_sed_branch_controller_trains_on_the_slm_features_without_slm_gradient(tiny, rows, tmp_path, monkeypatch):
    seen = []
    real = SedControllerModel.summarize

    def summarize(self, input_features, feature_attention_mask=None):
        seen.append((tuple(input_features.shape), input_features.requires_grad))
        return real(self, input_features, feature_attention_mask)

    monkeypatch.setattr(SedControllerModel, "summarize", summarize)
    kw = dict(controller_input="sed_branch", controller_initial_retain_bias=0.0, controller_learning_rate=0.05)
    t = _trainer(tiny, rows, tmp_path / "train", max_steps=2, **kw)
    dim = t.model.config.sed_vib_dim
    assert dim != t.args.controller_n_mels  # the widths tell the two inputs apart
    assert t.controller.config.input_size == dim and t.controller.lstm.input_size == dim
    before = {k: v.clone() for k, v in t.controller.state_dict().items()}
    t.train()
    assert seen and all(shape[-1] == dim and not grad for shape, grad in seen)
    assert any(not torch.equal(before[k], v) for k, v in t.controller.state_dict().items())  # it learned
    assert len([h for h in t.state.log_history if "reward/mean" in h]) == 2

    # the features of a step are the SLM's SED-branch mean, detached; the controller's loss leaves the SLM alone
    t = _trainer(tiny, rows, tmp_path / "grad", **kw)
    batch = _batch(t, rows)
    t.model.train()
    t.compute_loss(t.model, batch)  # samples the K policies, records the controller's input
    rec = t._pending[-1]
    ref, ref_mask = _sed_features_eval(t.model, batch)
    assert torch.equal(rec["feats"], ref.float()) and torch.equal(rec["fmask"], ref_mask.long())
    assert not rec["feats"].requires_grad
    slm = t.accelerator.unwrap_model(t.model)
    slm.zero_grad(set_to_none=True)
    ctrl_before = {k: v.clone() for k, v in t.controller.state_dict().items()}
    t.controller_step()  # rewards (no-grad SLM forward) + the controller's backward and update
    assert all(p.grad is None for p in slm.parameters())
    assert any(not torch.equal(ctrl_before[k], v) for k, v in t.controller.state_dict().items())


def test_sed_branch_audit_reads_what_training_reads(tiny, rows, tmp_path):
    from trustser.trainers.controller_audit import _modify_probabilities, audit_controller

    t = _trainer(tiny, rows, tmp_path, controller_input="sed_branch", controller_initial_retain_bias=0.0)
    data = datasets.Dataset.from_list(rows[:4])
    t.controller.eval()
    p_audit, ids, _, _ = _modify_probabilities(t.controller, data, 3, "auto", slm=t.model, processor=t.processing_class)
    batch = _batch(t, rows)
    with torch.no_grad():
        feats, mask = t.controller_features(batch)
        p_train = t.controller(batch["rectify_sed_ids"], input_features=feats, feature_attention_mask=mask).logits
    assert torch.allclose(torch.from_numpy(p_audit), p_train.softmax(-1)[..., 1], atol=1e-5)
    assert torch.equal(torch.from_numpy(ids), batch["rectify_sed_ids"])
    assert audit_controller(t.controller, data, slm=t.model, processor=t.processing_class)["n"] == 4
    with pytest.raises(ValueError, match="needs the SLM"):
        audit_controller(t.controller, data)


def test_a_controller_that_reads_the_other_input_is_refused(tiny, rows, tmp_path):
    log_mel = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16))
    with pytest.raises(ValueError, match="controller_input='sed_branch' needs a controller"):
        _trainer(tiny, rows, tmp_path, controller=log_mel, controller_input="sed_branch")
    dim = tiny[0].config.sed_vib_dim
    sed = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, n_mels=16, input_size=dim))
    with pytest.raises(ValueError, match="controller_input='log_mel' needs a controller"):
        _trainer(tiny, rows, tmp_path, controller=sed, controller_input="log_mel")
    wrong = SedControllerModel(SedControllerConfig(hidden_size=8, embedding_size=4, input_size=dim + 1))
    with pytest.raises(ValueError, match="needs a controller that reads the SLM's"):
        _trainer(tiny, rows, tmp_path, controller=wrong, controller_input="sed_branch")
    with pytest.raises(ValueError, match="sed_vib_dim"):  # the shared function checks the width too
        controller_input_features(wrong, {"input_features": torch.zeros(1, 1)}, slm=tiny[0])
    with pytest.raises(ValueError, match="pass the SLM"):
        controller_input_features(sed, {})


# ---------------------------------------------------------------------------------- (d) log-mel: today's input
def test_log_mel_controller_input_is_todays(tiny, rows, tmp_path):
    t = _trainer(tiny, rows, tmp_path)
    assert t.args.controller_input == "log_mel" and t.controller.reads_log_mel
    assert t.controller.config.input_size is None and t.controller.lstm.input_size == t.args.controller_n_mels
    batch = _batch(t, rows)
    ref, ref_mask = t.controller.log_mel(batch["rectify_waveforms"], batch["rectify_waveform_lengths"])
    feats, mask = t.controller_features(batch)
    assert torch.equal(feats, ref) and torch.equal(mask, ref_mask)
    t.model.train()
    t.compute_loss(t.model, batch)
    rec = t._pending[-1]
    assert torch.equal(rec["feats"], ref) and torch.equal(rec["fmask"], ref_mask)
    # the SLM is not consulted for a log-mel controller
    feats2, _ = controller_input_features(t.controller, batch, slm=None)
    assert torch.equal(feats2, ref)
    # the audit's log-mel path reads the same features (no SLM needed)
    from trustser.trainers.controller_audit import _modify_probabilities

    t.controller.eval()
    p_audit, _, _, _ = _modify_probabilities(t.controller, datasets.Dataset.from_list(rows[:4]), 4, "auto")
    with torch.no_grad():
        logits = t.controller(batch["rectify_sed_ids"], input_features=ref, feature_attention_mask=ref_mask).logits
    assert torch.allclose(torch.from_numpy(p_audit), logits.softmax(-1)[..., 1], atol=1e-5)
