"""One system of the paper, end to end, as cached stages:

    corpus -> annotate -> pretrain (SER-SLM) -> cem -> select -> posttrain (SFT or RL-rectified)
    -> evaluate -> results.json, report.md, plots

Each stage is cached under ``<output_dir>/cache`` by a hash of its settings and of the stages it
reads (``trustser.stages``), so a rerun or another system reuses what it shares: Sys. 4 after
Sys. 10 re-runs only its own post-training and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .descriptors import EMOTION_LABELS, SED_FIELDS
from .recipe_config import RecipeConfig
from .report import read_json, run_results, write_results
from .stages import Stage, StageRunner
from .systems import SystemSpec, get_system
from .utils import atomic_write_json, set_seed

logger = logging.getLogger("trustser.recipe")

TARGET_SPLITS = ("train", "dev", "test")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _emotion_labels(corpus: str, dataset=None) -> tuple[str, ...]:
    if corpus in EMOTION_LABELS:
        return EMOTION_LABELS[corpus]
    labels = sorted(set(dataset["emotion"])) if dataset is not None else []
    return tuple(labels)


def load_ser_slm(path: Path):
    from .models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

    model = SerSlmForConditionalGeneration.from_pretrained(path)
    processor = SerSlmProcessor.from_pretrained(path)
    return model, processor


def _audio_window(processor) -> float | None:
    """Seconds of audio the SER-SLM sees (its feature extractor's window); longer clips are skipped."""
    fe = getattr(processor, "feature_extractor", None)
    return (
        fe.n_samples / fe.sampling_rate
        if getattr(fe, "n_samples", None) and getattr(fe, "sampling_rate", None)
        else None
    )


def _training_args(
    cfg: RecipeConfig, output_dir: Path, *, stage: str, max_steps: int, epochs: float, lr: float, cls=None, **extra
):
    """The trainer config of an SER-SLM training ``stage`` ('pretrain' or 'posttrain'): the
    recipe's fields (steps, learning rate, batch, seed, checkpointing), then the trainer fields
    set for all stages or for this one (``RecipeConfig.stage_training_args``), which win."""
    from .trainers.rectify_config import SedRectifyConfig
    from .trainers.sft import SerSlmSFTConfig

    cls = cls or SerSlmSFTConfig
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_batch_size,
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=cfg.warmup_ratio,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        **extra,
    )
    kwargs.update(cfg.stage_training_args(stage, rectify=issubclass(cls, SedRectifyConfig)))
    strategy = str(getattr(kwargs.get("eval_strategy", "no"), "value", kwargs.get("eval_strategy", "no")))
    if stage == "posttrain" and strategy != "no":
        raise ValueError(
            f"eval_strategy={strategy!r} in post-training: the recipe evaluates the post-trained model on "
            f"test_split afterwards; evaluation during training is for pre-training (pretrain_training_args "
            f"with pretrain_eval_split)"
        )
    return cls(**kwargs)


def _with_lora(model, cfg: RecipeConfig):
    """The paper preset trains LoRA adapters on the LLM (plus the new VIB/projector modules in
    full); a loaded (merged) SER-SLM gets a fresh adapter for its next training stage."""
    if cfg.preset != "paper" or not cfg.model_args.use_peft:
        return model
    from peft import PeftModel, get_peft_model

    from .models.ser_slm.presets import lora_config_for_llm

    if isinstance(model, PeftModel):
        return model
    m = cfg.model_args
    return get_peft_model(model, lora_config_for_llm(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules))


def _save_trained(trainer, processor, model_dir: Path, base) -> None:
    """Saves a training stage's SER-SLM as a full checkpoint in ``model_dir`` (loadable by
    ``from_pretrained`` everywhere). With LoRA the adapter (with the trained VIB/projector copies)
    is saved to ``model_dir/adapter`` first, on every process (DeepSpeed/FSDP gather there), and
    the main process merges it into ``base()``, the untrained model the stage started from."""
    from peft import PeftModel

    if trainer.is_fsdp_enabled:  # a loadable checkpoint, not per-rank shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    lora = isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel)
    trainer.save_model(str(model_dir / "adapter" if lora else model_dir))
    if trainer.accelerator.is_main_process:
        if lora:
            merged = PeftModel.from_pretrained(base(), str(model_dir / "adapter")).merge_and_unload()
            merged.save_pretrained(str(model_dir))
            for junk in ("training_args.bin",):
                (model_dir / "adapter" / junk).unlink(missing_ok=True)
        (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the settings are in STAGE.json
        processor.save_pretrained(str(model_dir))
    trainer.accelerator.wait_for_everyone()


def _train(trainer, cfg: RecipeConfig, trainer_dir: Path) -> None:
    """``trainer.train()``, resumed from the newest complete checkpoint in ``trainer_dir`` when
    ``cfg.resume_from_checkpoint`` is set and an interrupted run left one."""
    from .trainers.sft import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(trainer_dir) if cfg.resume_from_checkpoint else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def stage_corpus(runner: StageRunner, cfg: RecipeConfig) -> tuple[str | None, Stage | None]:
    """The synthetic corpus when a root is not given (the embedded default)."""
    if cfg.target_corpus != "synthetic" and cfg.pretrain_corpus != "synthetic":
        return None, None
    if cfg.target_root and cfg.pretrain_root:
        return None, None
    from .data.synthetic import GENERATOR_VERSION, synthesize_corpus

    # the generator's version is part of the key: a cache from another version of the corpus is not reused
    settings = {"seed": cfg.corpus_seed, "size": cfg.synth_size, "generator": GENERATOR_VERSION}
    stage = runner.run(
        "corpus", settings, lambda out: synthesize_corpus(out / "corpus", seed=cfg.corpus_seed, size=cfg.synth_size)
    )
    return str(stage.path / "corpus"), stage


def _pretrain_in_target(cfg: RecipeConfig, target_root: str, pretrain_root: str) -> bool:
    """Whether the pre-training split is a split of the annotated (target) corpus (the embedded default)."""
    return cfg.pretrain_corpus == cfg.target_corpus and str(pretrain_root) == str(target_root)


def _pretrain_sed_source(cfg: RecipeConfig, target_root: str, pretrain_root: str) -> str:
    source = cfg.pretrain_sed_source or ("auto" if _pretrain_in_target(cfg, target_root, pretrain_root) else "truth")
    if source not in ("auto", "truth"):
        raise ValueError(f"pretrain_sed_source must be 'auto' or 'truth', got {source!r}")
    if source == "auto" and not _pretrain_in_target(cfg, target_root, pretrain_root):
        raise ValueError(
            "pretrain_sed_source='auto' needs the pre-training split inside the annotated corpus "
            f"(pretrain_corpus == target_corpus and the same root); got {cfg.pretrain_corpus!r} at {pretrain_root} "
            f"and {cfg.target_corpus!r} at {target_root}: use 'truth' (the corpus' own labels)"
        )
    return source


def stage_annotate(
    runner: StageRunner, cfg: RecipeConfig, target_root: str, upstream: list[Stage], pretrain_root: str | None = None
) -> Stage:
    """Automatic SED labels (``<field>_auto``) on the target corpus' splits, and on the pre-training
    split when it is part of the same corpus (the embedded default, whose pre-training descriptors
    come from the tool as SpeechCraft's do). With ``annotation_calibrate`` the tool's fixed
    thresholds are calibrated once on the pre-training split's own labels."""
    with_pretrain = pretrain_root is not None and _pretrain_in_target(cfg, target_root, pretrain_root)

    def run(out: Path):
        import os

        import datasets

        from .annotation import annotate, annotation_report
        from .data import load_corpus

        state = runner.state
        with state.main_process_first():  # one process builds the datasets cache, the others read it
            corpus = load_corpus(cfg.target_corpus, target_root, **cfg.target_options)
        names = [
            *([cfg.pretrain_split] if with_pretrain and cfg.pretrain_split in corpus else []),
            *(s for s in TARGET_SPLITS if s in corpus),
        ]
        splits = {s: corpus[s] for s in names}
        reference = corpus["reference"] if "reference" in corpus else None
        calibrate = bool(
            cfg.annotation_calibrate
            and reference is not None
            and cfg.annotation_method != "speechcraft"
            and all(f in reference.column_names and any(reference[f]) for f in ("pitch", "volume", "speed"))
        )
        annotated = annotate(
            datasets.DatasetDict(splits),
            method=cfg.annotation_method,
            reference=reference,
            seed=cfg.corpus_seed,
            calibrate=calibrate,
            num_proc=cfg.annotation_num_proc or max(1, (os.cpu_count() or 1) // state.num_processes),
            gender_backend=_annotation_backend(cfg, "gender"),
            age_backend=_annotation_backend(cfg, "age"),
        )
        if state.is_main_process:
            annotated.save_to_disk(str(out / "data"))
            atomic_write_json(out / "annotation_report.json", {s: annotation_report(annotated[s]) for s in annotated})

    settings = {
        "corpus": cfg.target_corpus,
        "root": runner.path_setting(target_root),
        "options": cfg.target_options,
        "method": cfg.annotation_method,
        "seed": cfg.corpus_seed,
        "calibrate": cfg.annotation_calibrate,
        "with_pretrain_split": with_pretrain,
    }
    settings.update(runner.input_settings(target_root))  # an edited corpus is annotated afresh
    settings.update(
        {f"{f}_model": getattr(cfg, f"{f}_model") for f in ("gender", "age") if getattr(cfg, f"{f}_model") != "auto"}
    )
    # every process annotates its shard (trustser.annotation gathers them)
    return runner.run("annotate", settings, run, upstream, all_processes=True)


def _pretrain_split(
    cfg: RecipeConfig,
    pretrain_root: str,
    annotated: Stage,
    sed_source: str,
    *,
    as_reliable: bool = False,
    part: str = "all",
):
    """The pre-training split with the labels pre-training reads: the corpus as loaded ('truth'), or
    its annotated copy ('auto', rows the tool could not annotate left out). ``as_reliable``: the
    ``_auto`` labels moved into the plain columns, for code that reads "the reliable labels" there
    (CEM training data). ``part``: with ``cem_holdout_speakers`` > 0, 'slm' leaves the held-out
    speakers out (pre-training), 'cem' keeps only them (CEM training); 'all' or no holdout: every row."""
    if sed_source == "truth":
        from .data import load_corpus

        split = load_corpus(cfg.pretrain_corpus, pretrain_root)[cfg.pretrain_split]
    else:
        import datasets

        split = datasets.load_from_disk(str(annotated.path / "data"))[cfg.pretrain_split]
        split = split.filter(lambda e: not e, input_columns="annotation_error")
        if as_reliable:
            split = split.remove_columns(list(SED_FIELDS)).rename_columns({f"{f}_auto": f for f in SED_FIELDS})
    if cfg.cem_holdout_speakers and part != "all":
        from .trainers.cem import split_holdout_speakers

        slm_rows, cem_rows = split_holdout_speakers(split, cfg.cem_holdout_speakers, cfg.seed)
        split = slm_rows if part == "slm" else cem_rows
    return split


def _build_slm(cfg: RecipeConfig, corpus, train, *, use_lora: bool = True):
    """A fresh SER-SLM of ``cfg.preset``: the tiny random-init model (tokenizer trained on the
    corpus' transcripts) or the paper's (``cfg.model_args``: encoder, LLM, dtype, LoRA)."""
    from .models.ser_slm import build_paper_ser_slm, build_tiny_ser_slm

    set_seed(cfg.seed)
    if cfg.preset == "tiny":
        texts = list(train["text"])
        if cfg.target_corpus == cfg.pretrain_corpus and "train" in corpus:
            texts += list(corpus["train"]["text"])
        return build_tiny_ser_slm(
            texts,
            emotion_labels=_emotion_labels(cfg.pretrain_corpus, train),
            seed=cfg.seed,
            sed_f0_stream=cfg.f0_stream,
            aux_sed_loss_weight=cfg.aux_sed_loss_weight,
            aux_ctc_loss_weight=cfg.aux_ctc_loss_weight,
        )
    if cfg.preset == "paper":
        kwargs = cfg.model_args.build_kwargs()
        kwargs["use_lora"] = kwargs["use_lora"] and use_lora
        return build_paper_ser_slm(**kwargs)
    raise ValueError(f"unknown preset {cfg.preset!r}: 'tiny' or 'paper'")


def _annotation_backend(cfg: RecipeConfig, field: str):
    """``gender_model`` / ``age_model`` as an annotate() backend: 'auto', 'reference' and
    OfflineClassifier .json files as they are, a Hub id or model folder as a HubAudioClassifier
    on ``annotation_device`` with ``annotation_batch_size``."""
    spec = getattr(cfg, f"{field}_model")
    if spec in ("auto", "reference", None) or str(spec).endswith(".json"):
        return spec
    from .annotation.classifiers import HubAudioClassifier

    return HubAudioClassifier(spec, field, device=cfg.annotation_device, batch_size=cfg.annotation_batch_size)


def text_prior_steps_for(cfg: RecipeConfig, spec: SystemSpec) -> int:
    """Text-prior steps of a system's pre-training: ``cfg.text_prior_steps`` for the tiny preset
    when the system's captions carry descriptors, else 0. The prior's captions all read descriptors
    before the emotion; a plain-caption SLM (Sys. 1/2) given it collapsed to one emotion on `dev`
    (Sys. 2 WA 25.0 against 43.0 without; README, "The embedded default")."""
    return int(cfg.text_prior_steps) if cfg.preset == "tiny" and spec.with_sed else 0


def stage_pretrain(
    runner: StageRunner,
    cfg: RecipeConfig,
    spec: SystemSpec,
    pretrain_root: str,
    annotated: Stage,
    sed_source: str,
    upstream: list[Stage],
) -> Stage:
    """SER-SLM pre-training on the pre-training corpus (SpeechCraft's role), with its automatic
    labels ('auto': the annotation stage's) or its own label columns ('truth'). The tiny preset's
    text prior runs first for systems whose captions carry descriptors (``text_prior_steps_for``)."""
    prior_steps = text_prior_steps_for(cfg, spec)

    def run(out: Path):
        from .data import load_corpus, validate_audio
        from .trainers.sft import SerSlmSFTTrainer

        with runner.state.main_process_first():
            corpus = load_corpus(cfg.pretrain_corpus, pretrain_root)
            train = _pretrain_split(cfg, pretrain_root, annotated, sed_source, part="slm")
        model, processor = _build_slm(cfg, corpus, train)
        if prior_steps > 0:
            from .text_prior import train_text_prior

            log = train_text_prior(
                model,
                processor,
                list(train["text"]),
                _emotion_labels(cfg.pretrain_corpus, train),
                steps=prior_steps,
                output_dir=out / "text_prior",
                seed=cfg.seed,
            )
            if runner.state.is_main_process:
                atomic_write_json(out / "text_prior_log.json", log)
        train = validate_audio(
            train, max_seconds=_audio_window(processor)
        )  # bad clips named and skipped now, not mid-run
        args = _training_args(
            cfg,
            out / "trainer",
            stage="pretrain",
            max_steps=cfg.pretrain_max_steps,
            epochs=cfg.pretrain_epochs,
            lr=cfg.pretrain_learning_rate,
            sed_source=sed_source,
            with_sed=spec.with_sed,
            kl_warmup_steps=cfg.kl_warmup_steps,
            channel_augmentation=cfg.channel_augmentation,
        )
        eval_dataset = _eval_split(corpus, cfg.pretrain_eval_split, args, "pretrain_eval_split", cfg.pretrain_corpus)
        trainer = SerSlmSFTTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=eval_dataset, processing_class=processor
        )
        _train(trainer, cfg, out / "trainer")
        _save_trained(trainer, processor, out / "model", base=lambda: _build_slm(cfg, corpus, train, use_lora=False)[0])
        if trainer.accelerator.is_main_process:
            atomic_write_json(out / "log_history.json", trainer.state.log_history)

    settings = {
        "corpus": cfg.pretrain_corpus,
        "root": runner.path_setting(cfg.pretrain_root) or "synthetic",
        "split": cfg.pretrain_split,
        "preset": cfg.preset,
        "with_sed": spec.with_sed,
        "epochs": cfg.pretrain_epochs,
        "max_steps": cfg.pretrain_max_steps,
        "lr": cfg.pretrain_learning_rate,
        "batch": cfg.per_device_batch_size,
        "warmup": cfg.warmup_ratio,
        "seed": cfg.seed,
        "kl_warmup": cfg.kl_warmup_steps,
        "f0": cfg.f0_stream,
        "channel_augmentation": cfg.channel_augmentation,
        "sed_source": sed_source,
    }
    if cfg.preset == "tiny":
        settings.update(aux_sed=cfg.aux_sed_loss_weight, aux_ctc=cfg.aux_ctc_loss_weight)
    else:  # the tiny preset reads no model setting (and keeps the keys it had before they existed)
        settings["model"] = dataclasses.asdict(cfg.model_args)
    # only when set, so that the stages cached before these settings existed keep their keys
    for name, value in (
        ("training", cfg.stage_training_key("pretrain")),
        ("eval_split", cfg.pretrain_eval_split),
        ("cem_holdout_speakers", cfg.cem_holdout_speakers),
        ("text_prior_steps", prior_steps),
    ):
        if value:
            settings[name] = value
    settings.update(runner.input_settings(pretrain_root))
    return runner.run("pretrain", settings, run, upstream, all_processes=True, resume=cfg.resume_from_checkpoint)


def _eval_split(corpus, split: str | None, args, setting: str, corpus_name: str):
    """The evaluation split of a training stage, or None; an ``eval_strategy`` without one is an
    error naming the setting to add."""
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if split is None:
        if strategy != "no":
            raise ValueError(
                f"eval_strategy={strategy!r} needs an evaluation split: set {setting} (a split of the {corpus_name} corpus)"
            )
        return None
    if split not in corpus:
        raise ValueError(f"{setting}={split!r}: the {corpus_name} corpus has splits {sorted(corpus)}")
    return corpus[split]


def stage_cem(
    runner: StageRunner, cfg: RecipeConfig, pretrain_root: str, pretrain: Stage, annotated: Stage, sed_source: str
) -> Stage:
    """CEM trained on the pre-trained SLM's states over the pre-training corpus, against that corpus'
    labels (the paper's "reliable SED": the tool's labels with 'auto'); with ``cem_holdout_speakers``
    only on the speakers pre-training left out."""

    def run(out: Path):
        from .data import validate_audio
        from .trainers.cem import eval_split_by_utterance, prepare_cem_training_data, train_cem

        set_seed(cfg.seed)
        slm, processor = load_ser_slm(pretrain.path / "model")
        ref = validate_audio(
            _pretrain_split(cfg, pretrain_root, annotated, sed_source, as_reliable=True, part="cem"),
            max_seconds=_audio_window(processor),
        )
        if cfg.cem_max_samples and len(ref) > cfg.cem_max_samples:
            ref = ref.shuffle(seed=cfg.seed).select(range(cfg.cem_max_samples))
        data = prepare_cem_training_data(
            slm,
            processor,
            ref,
            captions=cfg.cem_training_captions,
            corrupt_prob=cfg.cem_corrupt_prob,
            perturbation=cfg.cem_perturbation,
            captions_per_utterance=cfg.cem_captions_per_utterance,
            pooling=cfg.cem_pooling,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
        )
        # a held-out fifth of the utterances (all their captions) measures the CEM (AUC, NCE, ECE, reliability)
        fit, held = eval_split_by_utterance(data["utterance"], 0.2)
        feats, labels = data["features"], data["labels"]
        train_cem(
            feats[fit],
            labels[fit],
            eval_features=feats[held],
            eval_labels=labels[held],
            output_dir=out / "cem",
            feature_pooling=cfg.cem_pooling,
            balance=cfg.cem_balance,
            slm_hidden_size=slm.config.text_config.hidden_size,
            learning_rate=cfg.cem_learning_rate,
            seed=cfg.seed,
            training_args={"max_steps": cfg.cem_max_steps, **cfg.stage_training_args("cem")},
            data_summary={
                "utterances": len(ref),
                "rows": int(len(labels)),
                "eval_rows": int(len(held)),
                "captions": cfg.cem_training_captions,
                "holdout_speakers": cfg.cem_holdout_speakers,
                "speakers": sorted(set(ref["speaker"])) if "speaker" in ref.column_names else None,
            },
        )

    settings = {
        "pooling": cfg.cem_pooling,
        "steps": cfg.cem_max_steps,
        "lr": cfg.cem_learning_rate,
        "seed": cfg.seed,
        "samples": cfg.cem_max_samples,
        "eval_share": 0.2,
        "captions": cfg.cem_training_captions,
        "corrupt": cfg.cem_corrupt_prob if cfg.cem_training_captions == "perturbed" else None,
        "sed_source": sed_source,
    }
    if cfg.stage_training_key("cem"):  # only when set: earlier cached stages keep their keys
        settings["training"] = cfg.stage_training_key("cem")
    for name, value, default in (
        ("holdout_speakers", cfg.cem_holdout_speakers, 0),
        ("captions_per_utterance", cfg.cem_captions_per_utterance, 1),
        ("perturbation", cfg.cem_perturbation, "random"),
        ("balance", cfg.cem_balance, "utterance"),
    ):
        if value != default:  # likewise: a setting enters the key only when it differs from the earlier behaviour
            settings[name] = value
    # all processes: the CEM's Trainer joins the process group (the features are computed on each)
    return runner.run(
        "cem", settings, run, [pretrain, annotated] if sed_source == "auto" else [pretrain], all_processes=True
    )


def stage_select(
    runner: StageRunner, cfg: RecipeConfig, ratio: float, annotated: Stage, pretrain: Stage, cem: Stage
) -> Stage:
    """Scores the annotated target captions with the CEM and keeps the top share; on a corpus with
    ground truth also writes how well the scores find the wrong labels (``selection_quality.json``),
    and the same for the CEM's scores of ``cem_quality_split`` (``selection_quality_<split>.json``:
    scores only, no selection), where CEM variants are compared."""

    def run(out: Path):
        import datasets

        from .models.cem import CemModel
        from .selection import annotation_correctness, score_confidence, select_by_confidence, selection_quality

        slm, processor = load_ser_slm(pretrain.path / "model")
        cem_model = CemModel.from_pretrained(cem.path / "cem")
        data = datasets.load_from_disk(str(annotated.path / "data"))
        train = data[cfg.train_split]
        # scoring is sharded over the processes and gathered; the selection is written once
        scores, field_scores = score_confidence(
            cem_model,
            slm,
            processor,
            train,
            sed_source="auto",
            batch_size=cfg.eval_batch_size,
            return_field_scores=True,
        )
        if runner.state.is_main_process:
            select_by_confidence(train, scores, field_scores=field_scores, ratio=ratio, output_dir=out / "data")
            quality = selection_quality(train, scores, field_scores, seed=cfg.seed)
            if quality is not None:
                atomic_write_json(out / "selection_quality.json", quality)
        split = cfg.cem_quality_split
        if split and split != cfg.train_split and split in data and annotation_correctness(data[split]) is not None:
            dev_scores, dev_field_scores = score_confidence(
                cem_model,
                slm,
                processor,
                data[split],
                sed_source="auto",
                batch_size=cfg.eval_batch_size,
                return_field_scores=True,
            )
            if runner.state.is_main_process:
                atomic_write_json(
                    out / f"selection_quality_{split}.json",
                    selection_quality(data[split], dev_scores, dev_field_scores, seed=cfg.seed),
                )

    return runner.run(
        "select", {"ratio": ratio, "split": cfg.train_split}, run, [annotated, pretrain, cem], all_processes=True
    )


def stage_oracle_select(runner: StageRunner, cfg: RecipeConfig, ratio: float, annotated: Stage) -> Stage:
    """Bracket: keeps the share of the target's training rows with the most right annotated labels."""

    def run(out: Path):
        import datasets

        from .selection import oracle_scores, select_by_confidence

        train = datasets.load_from_disk(str(annotated.path / "data"))[cfg.train_split]
        select_by_confidence(train, oracle_scores(train, cfg.seed), ratio=ratio, output_dir=out / "data")

    return runner.run("oracle-select", {"ratio": ratio, "split": cfg.train_split, "seed": cfg.seed}, run, [annotated])


def stage_pseudo_labels(runner: StageRunner, cfg: RecipeConfig, annotated: Stage, pretrain: Stage) -> Stage:
    """Bracket: the pre-trained SLM's own descriptor predictions on the target's training rows, as
    ``<field>_pseudo`` columns (the annotation where the SLM's caption does not give the field)."""

    def run(out: Path):
        import datasets

        from .descriptors import normalize_sed_value
        from .generation import generate_sed_predictions

        slm, processor = load_ser_slm(pretrain.path / "model")
        train = datasets.load_from_disk(str(annotated.path / "data"))[cfg.train_split]
        train = train.filter(lambda e: not e, input_columns="annotation_error")
        _, predicted = generate_sed_predictions(slm, processor, train, batch_size=cfg.eval_batch_size)
        auto = train.select_columns([f"{f}_auto" for f in SED_FIELDS])[:]
        missing = Counter()
        for f in SED_FIELDS:
            values = []
            for i, p in enumerate(predicted):
                v = normalize_sed_value(f, p.get(f)) if p.get(f) else None
                missing[f] += v is None
                values.append(v if v is not None else auto[f"{f}_auto"][i])
            train = train.add_column(f"{f}_pseudo", values)
        train.save_to_disk(str(out / "data"))
        atomic_write_json(out / "pseudo_labels.json", {"rows": len(train), "missing_from_caption": dict(missing)})

    return runner.run(
        "pseudo-labels", {"split": cfg.train_split, "batch": cfg.eval_batch_size}, run, [annotated, pretrain]
    )


def posttrain_training_args(cfg: RecipeConfig, spec: SystemSpec, output_dir: Path):
    """The trainer config of domain post-training: ``SedRectifyConfig`` (K = the system's unless
    ``cfg.num_policies`` overrides it; the controller settings via ``stage_training_args``) with
    rectification, else ``SerSlmSFTConfig``. The auxiliary heads train too with
    ``cfg.posttrain_aux_losses`` (where the model weighs them: the tiny preset)."""
    common = dict(
        max_steps=cfg.posttrain_max_steps,
        epochs=1.0,
        lr=cfg.posttrain_learning_rate,
        sed_source=spec.sed_labels,
        with_sed=spec.with_sed,
        aux_losses=cfg.posttrain_aux_losses,
    )
    if not spec.rectify:
        return _training_args(cfg, output_dir, stage="posttrain", **common)
    from .trainers.rectify_config import SedRectifyConfig

    return _training_args(
        cfg, output_dir, stage="posttrain", cls=SedRectifyConfig, num_policies=num_policies_used(cfg, spec), **common
    )


def num_policies_used(cfg: RecipeConfig, spec: SystemSpec) -> int:
    """K of a rectifying post-training: ``cfg.num_policies`` when set, else the system's."""
    return cfg.num_policies or spec.num_policies


def stage_posttrain(
    runner: StageRunner, cfg: RecipeConfig, spec: SystemSpec, data: Stage, data_subdir: str, pretrain: Stage
) -> Stage:
    """Domain post-training on the (selected) annotated target data: plain SFT, or SFT with the
    RL SED controller rectifying the descriptor labels on the fly."""

    def run(out: Path):
        import datasets

        from .trainers.sft import SerSlmSFTTrainer

        set_seed(cfg.seed)
        loaded = datasets.load_from_disk(str(data.path / data_subdir))
        train = loaded[cfg.train_split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if "annotation_error" in train.column_names:
            errors = Counter(e for e in train["annotation_error"] if e)
            train = train.filter(lambda e: not e, input_columns="annotation_error")
            if len(train) == 0:
                raise ValueError(
                    f"{data.path / data_subdir}: no usable utterances in split {cfg.train_split!r} "
                    f"(every row failed annotation: {dict(errors)})"
                )
        if len(train) == 0:
            raise ValueError(f"{data.path / data_subdir}: split {cfg.train_split!r} has no utterances to train on")
        model, processor = load_ser_slm(pretrain.path / "model")
        model = _with_lora(model, cfg)
        if spec.rectify:
            from .trainers.rectify import SedRectifyTrainer as trainer_cls
        else:
            trainer_cls = SerSlmSFTTrainer
        trainer = trainer_cls(
            model=model,
            args=posttrain_training_args(cfg, spec, out / "trainer"),
            train_dataset=train,
            processing_class=processor,
        )
        _train(trainer, cfg, out / "trainer")
        _save_trained(trainer, processor, out / "model", base=lambda: load_ser_slm(pretrain.path / "model")[0])
        if trainer.accelerator.is_main_process:
            if spec.rectify:
                trainer.controller.save_pretrained(str(out / "controller"))
                # ground truth known for some field (synthetic; IEMOCAP's gender): audit the repair (MELD has none)
                if any(f in train.column_names and any(train[f]) for f in SED_FIELDS):
                    from .trainers.controller_audit import audit_controller

                    atomic_write_json(
                        out / "controller_audit.json",
                        audit_controller(
                            trainer.controller,
                            train,
                            batch_size=cfg.eval_batch_size,
                            slm=trainer.accelerator.unwrap_model(trainer.model),  # read with controller_input
                            processor=processor,
                        ),
                    )
            atomic_write_json(out / "log_history.json", trainer.state.log_history)

    settings = {
        "rectify": spec.rectify,
        "num_policies": num_policies_used(cfg, spec) if spec.rectify else None,
        "with_sed": spec.with_sed,
        "steps": cfg.posttrain_max_steps,
        "lr": cfg.posttrain_learning_rate,
        "batch": cfg.per_device_batch_size,
        "seed": cfg.seed,
        "split": cfg.train_split,
        **({"sed_labels": spec.sed_labels} if spec.sed_labels != "auto" else {}),
    }
    if cfg.stage_training_key("posttrain", spec.rectify):  # only when set: earlier cached stages keep their keys
        settings["training"] = cfg.stage_training_key("posttrain", spec.rectify)
    if cfg.preset == "tiny" and cfg.posttrain_aux_losses and (cfg.aux_sed_loss_weight or cfg.aux_ctc_loss_weight):
        settings["aux_losses"] = True
    return runner.run(
        "posttrain", settings, run, [data, pretrain], all_processes=True, resume=cfg.resume_from_checkpoint
    )


# ----------------------------------------------------------------------------------------------
# evaluation and report
# ----------------------------------------------------------------------------------------------
EVALUATION_FILES = ("metrics.json", "predictions.json", "confusion_matrix.png", "tsne.png")


def evaluate_system(
    cfg: RecipeConfig, spec: SystemSpec, model_dir: Path, target_root: str, annotated: Stage, out_dir: Path
) -> dict[str, Any]:
    """Metrics of a trained SLM on ``cfg.test_split``, written with the per-utterance predictions
    (``predictions.json``: paired comparisons between systems read them) and the plots into
    ``out_dir`` (``EVALUATION_FILES``); returns the metrics."""
    import datasets

    from .evaluation import evaluate_ser
    from .plots import plot_confusion_matrix, plot_tsne

    model, processor = load_ser_slm(model_dir)
    test = datasets.load_from_disk(str(annotated.path / "data"))[cfg.test_split]
    if cfg.max_eval_samples:
        test = test.select(range(min(cfg.max_eval_samples, len(test))))
    labels = _emotion_labels(cfg.target_corpus, test)
    has_truth = all(any(test[f]) for f in SED_FIELDS)
    metrics = evaluate_ser(
        model,
        processor,
        test,
        emotion_labels=labels,
        with_sed=spec.with_sed,
        sed_source="truth" if has_truth else "auto",
        batch_size=cfg.eval_batch_size,
        return_predictions=True,
    )
    predictions = metrics.pop("predictions")
    truth = dict(zip(test["id"], test["emotion"]))
    groups = dict(zip(test["id"], test["group"])) if "group" in test.column_names else {}
    if groups:  # emotion accuracy per speaker group: where do atypical voices lose?
        by_group: dict[str, list[bool]] = {}
        for p in predictions:
            by_group.setdefault(groups[p["id"]], []).append(p["emotion"] == truth[p["id"]])
        metrics["wa_by_group"] = {g: round(float(sum(v) / len(v)), 4) for g, v in sorted(by_group.items())}
    atomic_write_json(
        out_dir / "predictions.json",
        [
            {
                "id": p["id"],
                "emotion": truth[p["id"]],
                "prediction": p["emotion"],
                **{f: p[f] for f in SED_FIELDS},
                **({"group": groups[p["id"]]} if groups else {}),
            }
            for p in predictions
        ],
    )
    atomic_write_json(out_dir / "metrics.json", metrics)
    cm = metrics["confusion_matrix"]
    where = f"{cfg.target_corpus} {cfg.test_split}"
    plot_confusion_matrix(cm["matrix"], cm["labels"], out_dir / "confusion_matrix.png", title=f"{spec.name} on {where}")
    plot_tsne(
        model,
        processor,
        test,
        out_dir / "tsne.png",
        max_samples=cfg.tsne_samples,
        seed=cfg.seed,
        title=f"{spec.name}: last hidden states ({where})",
    )
    return metrics


def stage_evaluate(
    runner: StageRunner, cfg: RecipeConfig, spec: SystemSpec, model_stage: Stage, annotated: Stage
) -> Stage:
    """``evaluate_system`` as a cached stage, so an interrupted table resumes without evaluating again
    (systems with the same model, e.g. Sys. 10 and Table 3's V3, share it)."""

    def run(out: Path):
        evaluate_system(cfg, spec, model_stage.path / "model", "", annotated, out)

    settings = {
        "split": cfg.test_split,
        "max_samples": cfg.max_eval_samples,
        "with_sed": spec.with_sed,
        "batch": cfg.eval_batch_size,
        "tsne": cfg.tsne_samples,
        "seed": cfg.seed,
    }
    return runner.run("evaluate", settings, run, [model_stage, annotated])


def run_system(cfg: RecipeConfig) -> dict[str, Any]:
    """Runs (or reuses) every stage of ``cfg.system`` and writes its results; returns results.json's content."""
    from .utils import distributed_state, use_cpu_cores

    state = distributed_state()
    threads = use_cpu_cores(state.num_processes, cfg.cpu_threads)
    spec = get_system(cfg.system)
    check_model_sources(cfg)  # a missing or unreachable model fails now, not after hours of earlier stages
    started = time.time()
    out_root = Path(cfg.output_dir)
    runner = StageRunner(out_root / "cache", state)
    set_seed(cfg.seed)

    synth_root, corpus_stage = stage_corpus(runner, cfg)
    upstream = [corpus_stage] if corpus_stage else []
    target_root = cfg.target_root or synth_root
    pretrain_root = cfg.pretrain_root or synth_root
    sed_source = _pretrain_sed_source(cfg, target_root, pretrain_root)
    annotated = stage_annotate(runner, cfg, target_root, upstream, pretrain_root)
    pretrain = stage_pretrain(
        runner,
        cfg,
        spec,
        pretrain_root,
        annotated,
        sed_source,
        upstream + ([annotated] if sed_source == "auto" else []),
    )

    ratio = cfg.selection_ratio if cfg.selection_ratio is not None else spec.selection_ratio
    cem = selected = None
    if spec.domain_sft:
        data_stage, subdir = annotated, "data"
        if spec.sed_labels == "pseudo":
            data_stage = stage_pseudo_labels(runner, cfg, annotated, pretrain)
        if ratio is not None and ratio < 1.0:
            if spec.selection == "oracle":
                selected = stage_oracle_select(runner, cfg, ratio, annotated)
            else:
                cem = stage_cem(runner, cfg, pretrain_root, pretrain, annotated, sed_source)
                selected = stage_select(runner, cfg, ratio, annotated, pretrain, cem)
            data_stage, subdir = selected, "data"
        post = stage_posttrain(runner, cfg, spec, data_stage, subdir, pretrain)
    else:
        post = None
    model_dir = (post or pretrain).path / "model"
    evaluated = stage_evaluate(runner, cfg, spec, post or pretrain, annotated)

    results: dict[str, Any] = {}
    if state.is_main_process:
        import shutil

        run_dir = out_root / f"{spec.name}-seed{cfg.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in EVALUATION_FILES:
            shutil.copy2(evaluated.path / name, run_dir / name)
        metrics = read_json(evaluated.path / "metrics.json")
        results = run_results(
            spec,
            cfg.target_corpus,
            metrics,
            annotated=annotated,
            cem=cem,
            selected=selected,
            post=post,
            settings={**cfg.to_dict(), "num_policies_used": num_policies_used(cfg, spec)},
            seed=cfg.seed,
            stages=runner.stages,
            started=started,
            relative_to=run_dir,
            processes={"num_processes": state.num_processes, "torch_threads_per_process": threads},
        )
        if post is not None and spec.rectify:
            from .plots import plot_rectification

            plot_rectification(
                read_json(post.path / "log_history.json") or [],
                run_dir / "rectification.png",
                title=f"{spec.name}: on-the-fly SED rectification",
            )
        results["model_folder"] = export_model_folder(
            run_dir,
            model_dir,
            pretrained=pretrain.path / "model" if post is not None else None,
            cem=cem.path / "cem" if cem else None,
            controller=post.path / "controller" if post is not None and spec.rectify else None,
            emotion_labels=_evaluated_labels(metrics, cfg),
        )
        write_results(results, run_dir)
        from .utils import honour_umask_tree

        for folder in [
            run_dir,
            *(s.path for s in runner.stages),
        ]:  # readable as the umask says (also the linked stage files)
            honour_umask_tree(folder)
        logger.info("results written to %s", run_dir)
    state.wait_for_everyone()
    return results


def parse_recipe_args(argv: list[str] | None = None, system: str | None = None) -> RecipeConfig:
    """``TrlParser`` over the recipe's settings, the model settings and the trainer fields, from
    ``--config FILE`` and the command line (which wins); the latter two land in
    ``cfg.model_args`` and ``cfg.training_args``."""
    import sys

    from trl import TrlParser

    from .recipe_config import SerSlmModelArguments, training_settings_class

    args = list(argv if argv is not None else sys.argv[1:])
    parser = TrlParser((RecipeConfig, SerSlmModelArguments, training_settings_class()))
    cfg, model_args, training_args = parser.parse_args_and_config(args=args)
    cfg.model_args, cfg.training_args = model_args, training_args
    cfg._origins = _setting_origins(args)
    if system is not None and not _system_given(args):
        cfg.system = system
    return cfg


def main(system: str | None = None, argv: list[str] | None = None) -> dict:
    """Entry point of ``recipes/sysN.py`` (``parse_recipe_args``, then ``run_system``); a model
    that cannot be found or fetched ends the run with one line saying which and how to fix it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .utils import end_distributed

    cfg = parse_recipe_args(argv, system)
    try:
        results = run_system(cfg)
    except ModelSourceError as exc:
        raise SystemExit(f"trustser: {exc}") from None
    end_distributed()
    return results


def _system_given(argv: list[str] | None) -> bool:
    import sys

    args = argv if argv is not None else sys.argv[1:]
    return any(a == "--system" or a.startswith("--system=") for a in args)


def _setting_origins(args: list[str]) -> dict[str, str]:
    """Where each setting given came from ('the command line' or the YAML file), for error messages."""
    origins: dict[str, str] = {}
    if "--config" in args:
        import yaml

        path = args[args.index("--config") + 1]
        with open(path) as fh:
            origins.update({k: path for k in (yaml.safe_load(fh) or {})})
    for a in args:
        if a.startswith("--") and a != "--config":
            origins[a[2:].split("=", 1)[0].replace("-", "_")] = "the command line"
    return origins


# ----------------------------------------------------------------------------------------------
# models named by the settings: checked before any stage runs
# ----------------------------------------------------------------------------------------------
class ModelSourceError(OSError):
    """A model a setting names cannot be found locally nor fetched from the Hub (one line)."""


def _models_needed(cfg: RecipeConfig) -> list[tuple[str, str]]:
    """``(setting, id_or_path)`` of every pretrained model the run would load."""
    from .annotation.classifiers import DEFAULT_AGE_MODEL, DEFAULT_GENDER_MODEL

    needed = []
    if cfg.preset == "paper":
        needed += [("audio_model", cfg.model_args.audio_model), ("text_model", cfg.model_args.text_model)]
    # 'auto' falls back to SpeechCraft's classifiers where the target corpus has no labelled reference split
    defaults = {"gender": DEFAULT_GENDER_MODEL, "age": DEFAULT_AGE_MODEL}
    for f in ("gender", "age"):
        spec = getattr(cfg, f"{f}_model")
        if spec == "auto" and cfg.target_corpus != "synthetic":
            spec = defaults[f]
        if spec not in ("auto", "reference") and not str(spec).endswith(".json"):
            needed.append((f"{f}_model", spec))
    return needed


def check_model_sources(cfg: RecipeConfig) -> None:
    """Every model the settings name is a local folder with a ``config.json``, or a Hub id whose
    config can be fetched (or is in the local Hugging Face cache); else a ModelSourceError naming
    the id, the setting that chose it and how to point that setting at a local copy."""
    origins = getattr(cfg, "_origins", {})
    for setting, name in _models_needed(cfg):
        origin = origins.get(setting, "the default")
        where = f"set by {setting} ({'default' if origin == 'the default' else 'from ' + origin})"
        fix = (
            f"to use a local copy, download it where the Hub is reachable (`hf download {name} --local-dir DIR`), "
            f"then pass --{setting} DIR or set `{setting}: DIR` in the YAML"
        )
        path = Path(str(name)).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSourceError(
                    f"model folder {str(name)!r} ({where}) has no config.json: point {setting} at a folder written by save_pretrained"
                )
            continue
        if str(name).startswith((".", "/", "~")) or str(name).count("/") > 1 or (os.sep != "/" and os.sep in str(name)):
            raise ModelSourceError(
                f"model folder {str(name)!r} ({where}) does not exist; point {setting} at a folder written by save_pretrained or a Hub id"
            )
        problem = _hub_problem(
            str(name), cfg.model_args.model_revision if setting in ("audio_model", "text_model") else None
        )
        if problem:
            raise ModelSourceError(f"cannot load {str(name)!r} ({where}): {problem}; {fix}")


def _hub_problem(repo_id: str, revision: str | None) -> str | None:
    """Why the Hub model ``repo_id`` cannot be used here (None: its config is fetched or cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(repo_id, "config.json", revision=None if revision in (None, "main") else revision)
    except GatedRepoError:
        return f"the Hub repository is gated: accept its licence at https://huggingface.co/{repo_id} and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "no such Hub repository (or a private one: log in with `hf auth login`) and no such local folder"
    except HFValidationError:
        return "neither a local folder nor a valid Hub id"
    except LocalEntryNotFoundError:
        return "not in the local Hugging Face cache and the Hub cannot be reached (offline)"
    except (OSError, ValueError) as exc:  # connection errors, missing revision, ...
        return f"the Hub cannot serve it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


# ----------------------------------------------------------------------------------------------
# the run folder as a model
# ----------------------------------------------------------------------------------------------
# files a run folder holds besides the model (never part of the SER-SLM's checkpoint)
RUN_FILES = ("results.json", "report.md", "confusion_matrix.png", "tsne.png", "rectification.png")
MODEL_SUBFOLDERS = ("cem", "controller", "pretrained", "adapter")


def _evaluated_labels(metrics: dict, cfg: RecipeConfig) -> list[str]:
    labels = (metrics.get("confusion_matrix") or {}).get("labels") or list(EMOTION_LABELS.get(cfg.target_corpus, ()))
    return [l for l in labels if not str(l).startswith("<")]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (no second copy of an 8B checkpoint; stage files
    are never rewritten in place), else a copy; atomic either way."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _place_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    from .utils import atomic_directory

    with atomic_directory(dst) as tmp:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if any(part in skip or part.startswith(".") for part in rel.parts):
                continue
            if f.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            elif f.is_file():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(f, tmp / rel)


def export_model_folder(
    run_dir: Path,
    model_dir: Path,
    *,
    pretrained: Path | None = None,
    cem: Path | None = None,
    controller: Path | None = None,
    emotion_labels: list[str] | None = None,
) -> dict[str, Any]:
    """Makes ``run_dir`` (``<output_dir>/<system>-seed<N>/``) the run's model: the evaluated
    SER-SLM with its processor at the root (``config.json`` gains ``emotion_labels``), ``cem/``,
    ``controller/``, ``pretrained/`` (the pre-trained SER-SLM: the one the CEM reads, and the base
    of the post-training adapter) and, after LoRA training, ``adapter/`` (the final stage's LoRA
    adapter). The root holds merged weights, so ``from_pretrained``, ``pipeline(...)``,
    ``trustser explain`` and ``trustser push`` need nothing else. Returns the layout (relative
    paths) that results.json records."""
    import glob

    run_dir = Path(run_dir)
    for stale in [*glob.glob(str(run_dir / "*.safetensors")), *glob.glob(str(run_dir / "*.safetensors.index.json"))]:
        os.unlink(stale)  # a previous run's (possibly differently sharded) weights
    for name in MODEL_SUBFOLDERS:
        import shutil

        shutil.rmtree(run_dir / name, ignore_errors=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in RUN_FILES + ("README.md", "training_args.bin"):
            _link_or_copy(f, run_dir / f.name)
    if emotion_labels:
        config = json.loads((run_dir / "config.json").read_text())
        config["emotion_labels"] = list(emotion_labels)
        atomic_write_json(run_dir / "config.json", config)
    layout: dict[str, Any] = {"model": ".", "lora": (model_dir / "adapter" / "adapter_config.json").is_file()}
    for name, src in (
        ("cem", cem),
        ("controller", controller),
        ("pretrained", pretrained),
        ("adapter", model_dir / "adapter" if layout["lora"] else None),
    ):
        if src is not None and src.is_dir():
            _place_folder(
                src,
                run_dir / name,
                skip=("trainer", "adapter", "controller", "README.md", "training_args.bin")
                if name != "controller"
                else ("README.md",),
            )
            layout[name] = name
        else:
            layout[name] = None
    if layout[
        "adapter"
    ]:  # the adapter's base, relative to the run folder (None: the preset's build from the model ids)
        adapter_cfg = run_dir / "adapter" / "adapter_config.json"
        data = json.loads(adapter_cfg.read_text())
        data["base_model_name_or_path"] = "../pretrained" if layout["pretrained"] else None
        atomic_write_json(adapter_cfg, data)
    return layout
