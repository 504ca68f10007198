"""Recipe settings from YAML and the command line (TrlParser over the recipe, model and trainer
dataclasses), the one-line missing-model error, and outputs that honour the umask."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trustser.recipe import ModelSourceError, _models_needed, _training_args, check_model_sources, parse_recipe_args
from trustser.recipe_config import RECTIFY_DEFAULTS, RecipeConfig

REPO = Path(__file__).resolve().parents[1]
IEMOCAP = str(REPO / "recipes/configs/iemocap_sys10.yaml")


def test_yaml_and_command_line_reach_every_trainer_field(tmp_path):
    from trustser.trainers.rectify_config import SedRectifyConfig

    cfg = parse_recipe_args(
        [
            "--config",
            IEMOCAP,
            "--gradient_accumulation_steps",
            "4",
            "--report_to",
            "tensorboard",
            "--hub_model_id",
            "me/sys10",
            "--posttrain_training_args",
            '{"logging_steps": 3, "max_grad_norm": 0.5}',
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--lora_r",
            "8",
        ],
        system="sys10",
    )
    assert cfg.system == "sys10" and cfg.target_options == {"protocol": "session5"} and cfg.pretrain_max_steps == -1
    m = cfg.model_args
    assert (m.audio_model, m.text_model, m.dtype, m.attn_implementation) == (
        "facebook/hubert-large-ll60k",
        "meta-llama/Llama-3.1-8B-Instruct",
        "bfloat16",
        "sdpa",
    )
    assert (m.lora_r, m.lora_alpha, m.lora_target_modules) == (8, 32, ["q_proj", "v_proj"])
    assert cfg.gender_model.startswith("alefiury/") and cfg.age_model.startswith("audeering/")
    pre = _training_args(cfg, tmp_path, stage="pretrain", max_steps=cfg.pretrain_max_steps, epochs=2.0, lr=1e-4)
    post = _training_args(cfg, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=5, epochs=1.0, lr=1e-4)
    for args in (pre, post):  # YAML (all stages), command line (all stages)
        assert args.bf16 and args.gradient_checkpointing and args.dataloader_num_workers == 2
        assert (
            args.gradient_accumulation_steps == 4
            and args.report_to == ["tensorboard"]
            and args.hub_model_id == "me/sys10"
        )
        assert args.lr_scheduler_type == "cosine" and args.per_device_train_batch_size == 8
    assert (pre.logging_steps, pre.max_grad_norm) == (10, 1.0) and (post.logging_steps, post.max_grad_norm) == (3, 0.5)
    assert post.max_steps == 5 and pre.num_train_epochs == 2.0
    # the CEM's small Trainer gets what was set explicitly, minus the SER-SLM-only fields
    cem = cfg.stage_training_args("cem")
    assert cem["gradient_accumulation_steps"] == 4 and cem["bf16"] is True and "gradient_checkpointing" not in cem
    # what changes results is in the stage keys; logging/hub/report settings are not
    assert cfg.stage_training_key("posttrain") == {
        "bf16": True,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
        "max_grad_norm": 0.5,
    }
    saved = cfg.to_dict()
    assert saved["training_args"]["hub_model_id"] == "me/sys10" and saved["model_args"]["lora_r"] == 8
    json.dumps(saved)


def test_defaults_keep_the_stage_keys_and_unknown_fields_are_errors():
    cfg = RecipeConfig()
    assert all(cfg.stage_training_key(s) == {} for s in ("pretrain", "posttrain", "cem"))
    assert cfg.stage_training_args("cem") == {}
    with pytest.raises(ValueError, match=r"posttrain_training_args: \['grad_acc'\] is not a SedRectifyConfig field"):
        RecipeConfig(posttrain_training_args={"grad_acc": 2})
    with pytest.raises(ValueError, match="--cem_training_args: not a JSON object"):
        RecipeConfig(cem_training_args="{bad")
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_recipe_args(["--dtype", "float8"])
    with pytest.raises(ValueError, match="post-training"):
        _training_args(
            RecipeConfig(posttrain_training_args={"eval_strategy": "steps"}),
            Path("x"),
            stage="posttrain",
            max_steps=1,
            epochs=1.0,
            lr=1e-3,
        )


def test_controller_settings_reach_only_the_rectification_trainer(tmp_path):
    """A controller field given for all stages must not reach (or re-key) pre-training, and the plain
    SFT post-training of Sys. 4-8 must not fail on it."""
    from trustser.trainers.rectify_config import SedRectifyConfig
    from trustser.trainers.sft import SerSlmSFTConfig

    cfg = parse_recipe_args(["--controller_frame_stride", "4", "--max_grad_norm", "0.5"], system="sys10")
    assert cfg.stage_training_key("pretrain") == {"max_grad_norm": 0.5}
    assert cfg.stage_training_key("posttrain") == {"max_grad_norm": 0.5}  # Sys. 4-8's post-training key
    # the rectifying post-training's key carries every controller setting as it resolved (a changed
    # RECTIFY_DEFAULTS never reuses a stage trained with the old value)
    assert cfg.stage_training_key("posttrain", rectify=True) == {
        **RECTIFY_DEFAULTS,
        "controller_frame_stride": 4,
        "max_grad_norm": 0.5,
    }
    stride = parse_recipe_args(["--controller_frame_stride", "1"], system="sys10")
    assert stride.stage_training_key("posttrain", rectify=True) == {**RECTIFY_DEFAULTS, "controller_frame_stride": 1}
    pre = _training_args(cfg, tmp_path, stage="pretrain", max_steps=1, epochs=1.0, lr=1e-3)
    sft = _training_args(cfg, tmp_path, stage="posttrain", max_steps=1, epochs=1.0, lr=1e-3)
    rect = _training_args(cfg, tmp_path, stage="posttrain", cls=SedRectifyConfig, max_steps=1, epochs=1.0, lr=1e-3)
    assert (
        type(pre) is SerSlmSFTConfig and type(sft) is SerSlmSFTConfig and pre.max_grad_norm == sft.max_grad_norm == 0.5
    )
    assert rect.controller_frame_stride == 4 and rect.max_grad_norm == 0.5
    with pytest.raises(ValueError, match=r"pretrain_training_args: \['num_policies'\] is not a SerSlmSFTConfig field"):
        RecipeConfig(pretrain_training_args={"num_policies": 2})


def test_missing_model_errors_name_the_id_the_setting_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = parse_recipe_args(["--config", IEMOCAP])
    assert [s for s, _ in _models_needed(cfg)] == ["audio_model", "text_model", "gender_model", "age_model"]
    with pytest.raises(ModelSourceError) as err:
        check_model_sources(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "'facebook/hubert-large-ll60k'" in msg and f"set by audio_model (from {IEMOCAP})" in msg
    assert "offline" in msg and "--audio_model DIR" in msg and "`audio_model: DIR` in the YAML" in msg
    (tmp_path / "empty").mkdir()
    for given, expected in (
        (str(tmp_path / "nope"), "does not exist"),
        (str(tmp_path / "empty"), "has no config.json"),
    ):
        cfg = parse_recipe_args(["--config", IEMOCAP, "--audio_model", given])
        with pytest.raises(ModelSourceError, match=expected) as err:
            check_model_sources(cfg)
        assert "set by audio_model (from the command line)" in str(err.value)
    # the embedded default (tiny preset, reference-fitted classifiers) needs no model at all
    assert _models_needed(RecipeConfig()) == []


def test_paper_preset_from_model_settings(tmp_path):
    from fixtures_real import save_stand_ins

    from trustser.recipe import _build_slm

    models = save_stand_ins(tmp_path, ["hello there", "what a day"])
    cfg = parse_recipe_args(
        [
            "--config",
            IEMOCAP,
            "--audio_model",
            models["audio_model"],
            "--text_model",
            models["text_model"],
            "--lora_target_modules",
            "q_proj,v_proj",
            "--lora_r",
            "4",
            "--dtype",
            "float32",
            "--attn_implementation",
            "eager",
        ]
    )
    import datasets

    model, processor = _build_slm(cfg, None, datasets.Dataset.from_dict({"text": ["hi"], "emotion": ["happy"]}))
    lora = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora and all(".language_model." in n and (".q_proj." in n or ".v_proj." in n) for n in lora)
    assert model.peft_config["default"].r == 4
    base = model.get_base_model()
    assert base.model.language_model.config._attn_implementation == "eager"
    assert (
        next(base.model.audio_tower.parameters()).dtype.is_floating_point
        and "<audio>" in processor.tokenizer.get_vocab()
    )


def test_outputs_honour_the_umask(tmp_path):
    from trustser.utils import atomic_directory, atomic_write_text

    old = os.umask(0o027)
    try:
        f = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as d:
            (d / "inner").write_text("y")
        assert f.stat().st_mode & 0o777 == 0o640 and (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


class _KeyRunner:
    """Records the settings a stage would be keyed by, runs nothing."""

    def run(self, name, settings, fn, upstream=(), **kw):
        return settings

    def input_settings(self, root):
        return {}

    def path_setting(self, path):
        return path


def test_cem_options_enter_the_stage_keys_only_when_set():
    from trustser.recipe import stage_cem, stage_pretrain
    from trustser.systems import get_system

    def keys(**kw):
        cfg = RecipeConfig(**kw)
        return (
            stage_pretrain(_KeyRunner(), cfg, get_system("sys10"), "root", None, "auto", []),
            stage_cem(_KeyRunner(), cfg, "root", None, None, "truth"),
        )

    pre, cem = keys()
    assert "cem_holdout_speakers" not in pre
    assert not {"holdout_speakers", "captions_per_utterance", "perturbation", "balance"} & set(cem)
    assert keys(cem_quality_split=None) == (pre, cem)  # measuring dev changes no result
    pre2, cem2 = keys(
        cem_holdout_speakers=4, cem_captions_per_utterance=4, cem_perturbation="speaker", cem_balance="field"
    )
    assert pre2 == {**pre, "cem_holdout_speakers": 4}
    assert cem2 == {
        **cem,
        "holdout_speakers": 4,
        "captions_per_utterance": 4,
        "perturbation": "speaker",
        "balance": "field",
    }


def test_cem_option_errors_name_the_setting():
    with pytest.raises(ValueError, match="cem_perturbation='sideways'"):
        RecipeConfig(cem_perturbation="sideways")
    with pytest.raises(ValueError, match="cem_balance='pairs'"):
        RecipeConfig(cem_balance="pairs")
    with pytest.raises(ValueError, match="cem_training_captions='perturbed' only"):
        RecipeConfig(cem_training_captions="predicted", cem_captions_per_utterance=4)
    with pytest.raises(ValueError, match="cem_holdout_speakers must be >= 0"):
        RecipeConfig(cem_holdout_speakers=-1)
    RecipeConfig(cem_training_captions="predicted", cem_holdout_speakers=4)  # the paper's captions with the holdout


def test_holdout_speakers_leave_pretraining_for_the_cem(synthetic_small):
    from trustser.recipe import _pretrain_split

    root = str(synthetic_small)
    cfg = RecipeConfig(cem_holdout_speakers=3, pretrain_root=root, target_root=root, synth_size="small")
    every = _pretrain_split(cfg, root, None, "truth")
    slm_rows = _pretrain_split(cfg, root, None, "truth", part="slm")
    cem_rows = _pretrain_split(cfg, root, None, "truth", part="cem")
    held = set(cem_rows["speaker"])
    assert len(held) == 3 and not held & set(slm_rows["speaker"])  # disjoint
    assert len(slm_rows) + len(cem_rows) == len(every) and set(slm_rows["speaker"]) | held == set(every["speaker"])
    assert len(set(cem_rows["group"])) == 3  # spread over the speaker groups
    assert len(_pretrain_split(RecipeConfig(), root, None, "truth", part="slm")) == len(every)  # default: no holdout
    assert (
        set(_pretrain_split(RecipeConfig(cem_holdout_speakers=3, seed=1), root, None, "truth", part="cem")["speaker"])
        != held
    )


# The controller settings SedRectifyTrainer got before they moved from RecipeConfig fields to one
# RECTIFY_DEFAULTS table (embedded default) and top-level trainer keys (the real configs' YAML).
_CONTROLLER_BEFORE = {
    "embedded": dict(
        num_policies=6,
        controller_learning_rate=1e-2,
        controller_updates_per_step=4,
        controller_scale_rewards="none",
        controller_head_hidden_size=64,
        reward_timing="after_update",
        # issue 15's choice for the embedded default (docs/rectify.md, "Single-field credit")
        controller_entropy_coef=0.02,
        reward_scorer="frozen",
        advantage="single_field",
        controller_fit="table",
        controller_speaker_context=True,
        controller_input="none",
        controller_embedding_size=4,
        modify_cost=0.05,
        rectify_fields=["pitch", "volume"],
    ),
    # the real configs keep the paper's controller and reward (issue 15, item 5)
    "real": dict(
        num_policies=6,
        controller_learning_rate=1e-3,
        controller_updates_per_step=1,
        controller_scale_rewards="group",
        controller_head_hidden_size=0,
        reward_timing="after_update",
        controller_entropy_coef=0.0,
        reward_scorer="policy",
        advantage="group",
        controller_fit="online",
        controller_speaker_context=False,
        controller_input="log_mel",
        controller_embedding_size=32,
        modify_cost=0.0,
        rectify_fields=None,
    ),
}


@pytest.mark.parametrize(
    "config,before", [(None, "embedded"), (IEMOCAP, "real"), (str(REPO / "recipes/configs/meld_sys10.yaml"), "real")]
)
def test_rectifying_posttrain_gets_the_same_controller_settings(tmp_path, config, before):
    from trustser.recipe import posttrain_training_args
    from trustser.systems import get_system
    from trustser.trainers.rectify_config import SedRectifyConfig
    from trustser.trainers.sft import SerSlmSFTConfig

    cfg = parse_recipe_args((["--config", config] if config else []) + ["--bf16", "false"], system="sys10")
    args = posttrain_training_args(cfg, get_system("sys10"), tmp_path)
    assert type(args) is SedRectifyConfig
    assert {k: getattr(args, k) for k in _CONTROLLER_BEFORE[before]} == _CONTROLLER_BEFORE[before]
    assert args.controller_clip_epsilon == 0.2 and args.controller_max_grad_norm == 1.0  # the trainer's own
    # K: the override, and the plain SFT post-training (Sys. 4) gets no controller field
    cfg.num_policies = 3
    assert posttrain_training_args(cfg, get_system("sys10"), tmp_path).num_policies == 3
    assert type(posttrain_training_args(cfg, get_system("sys4"), tmp_path)) is SerSlmSFTConfig


def test_finetune_gets_the_same_controller_settings(tmp_path):
    from trustser.finetune import FinetuneConfig, _recipe_config
    from trustser.recipe import posttrain_training_args
    from trustser.systems import SystemSpec

    ft = FinetuneConfig(corpus="audiofolder", corpus_root=str(tmp_path))
    spec = SystemSpec(
        "finetune", with_sed=True, domain_sft=True, selection_ratio=0.9, rectify=True, num_policies=ft.num_policies
    )
    args = posttrain_training_args(_recipe_config(ft), spec, tmp_path)
    assert {k: getattr(args, k) for k in _CONTROLLER_BEFORE["embedded"]} == {
        **_CONTROLLER_BEFORE["embedded"],
        "controller_learning_rate": 1e-3,
    }


def test_text_prior_enters_the_pretrain_key_only_when_set_and_only_for_the_tiny_preset():
    from trustser.recipe import stage_pretrain
    from trustser.systems import get_system

    def key(**kw):
        return stage_pretrain(_KeyRunner(), RecipeConfig(**kw), get_system("sys4"), "root", None, "auto", [])

    plain = key(text_prior_steps=0)
    assert "text_prior_steps" not in plain  # the caches made before the option keep their keys
    assert key() == {**plain, "text_prior_steps": 300}  # the embedded default
    paper = key(preset="paper")
    assert key(preset="paper", text_prior_steps=300) == paper  # the paper's LLM brings its own
    # a plain-caption system (Sys. 1/2) gets no prior: its captions carry no descriptors to read
    plain_caption = stage_pretrain(
        _KeyRunner(), RecipeConfig(text_prior_steps=300), get_system("sys1"), "root", None, "auto", []
    )
    assert "text_prior_steps" not in plain_caption


def test_posttrain_aux_losses_reach_the_trainer_and_the_key_of_the_tiny_preset(tmp_path):
    """``posttrain_aux_losses`` (default on) sets the post-training trainer's ``aux_losses`` for every
    system and enters the post-training key only where a model trains the heads (the tiny preset
    with weights)."""
    from trustser.recipe import posttrain_training_args, stage_posttrain
    from trustser.systems import get_system

    def key(system="sys4", **kw):
        return stage_posttrain(_KeyRunner(), RecipeConfig(**kw), get_system(system), "data", "train", "pre")

    for system in ("sys4", "sys10"):
        assert key(system)["aux_losses"] is True
        assert "aux_losses" not in key(system, posttrain_aux_losses=False)
        on = posttrain_training_args(RecipeConfig(), get_system(system), tmp_path)
        off = posttrain_training_args(RecipeConfig(posttrain_aux_losses=False), get_system(system), tmp_path)
        assert on.aux_losses is True and off.aux_losses is False
    assert "aux_losses" not in key(aux_sed_loss_weight=0.0, aux_ctc_loss_weight=0.0)
    assert "aux_losses" not in key(preset="paper")
