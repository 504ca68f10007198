"""Fine-tuning a released (or locally saved) trustser SER-SLM on a new corpus with its own emotion
label set: annotate -> select with the CEM -> (rectified) post-training -> evaluate, as cached
stages of the lead's recipe (``trustser.recipe``), starting from the checkpoint instead of
pre-training.

New label words must be single, distinct tokens for the emotion probabilities (first-token
softmax) and the rectification reward to be about the label only: ``add_emotion_label_tokens``
adds each label that the tokenizer splits (or whose first token another label shares) as a
whole-word token and initialises its embedding and LM-head rows with the mean of the pieces it
replaced, so the model starts from what it knew about the word.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .explain import label_first_token_ids, label_token_ids
from .trainers.rectify_config import DEFAULT_NUM_POLICIES, SedRectifyConfig

logger = logging.getLogger("trustser.finetune")


# ------------------------------------------------------------------------------------------------
# label tokens
# ------------------------------------------------------------------------------------------------
def labels_needing_tokens(tokenizer, labels: Sequence[str]) -> list[str]:
    """Labels the tokenizer splits into several pieces or whose first piece another label shares."""
    firsts = label_first_token_ids(tokenizer, labels)
    return [l for l, f in zip(labels, firsts) if len(label_token_ids(tokenizer, l)) > 1 or firsts.count(f) > 1]


def add_emotion_label_tokens(model, processor, labels: Sequence[str], mode: str = "auto") -> list[str]:
    """Adds label words as whole-word tokens (``mode``: ``auto`` = only those that need it,
    ``always``, ``never``), resizes the model's embeddings and LM head, initialises the new rows with
    the mean of the label's former pieces, and records ``config.emotion_labels``. Returns the labels added."""
    from tokenizers import AddedToken

    if mode not in ("auto", "always", "never"):
        raise ValueError(f"add_label_tokens must be 'auto', 'always' or 'never', got {mode!r}")
    tok = processor.tokenizer
    labels = [str(l).strip().lower() for l in labels]
    todo = [] if mode == "never" else (list(labels) if mode == "always" else labels_needing_tokens(tok, labels))
    todo = [l for l in todo if l not in tok.get_vocab()]
    pieces = {l: label_token_ids(tok, l) for l in todo}
    if todo:
        tok.add_tokens([AddedToken(l, single_word=True, normalized=False) for l in todo])
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        model.config.text_config.vocab_size = len(tok)
        model.config.vocab_size = len(tok)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        with torch.no_grad():
            for l in todo:
                new = tok.convert_tokens_to_ids(l)
                old = torch.tensor(pieces[l], device=emb.device)
                emb[new] = emb[old].mean(0)
                head[new] = head[old].mean(0)
        logger.info("added emotion label tokens %s (vocabulary now %d)", todo, len(tok))
    clash = labels_needing_tokens(tok, labels) if mode != "never" else []
    if clash:
        raise ValueError(f"emotion labels {clash} are still not single distinct tokens after adding tokens")
    model.config.emotion_labels = labels
    return todo


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    model: str = field(
        default="", metadata={"help": "Released/saved SER-SLM folder or Hub id, or a trustser output directory."}
    )
    cem: str | None = field(
        default=None,
        metadata={
            "help": "CEM folder/Hub id (default: the model's cem/ subfolder or output directory's CEM); needed for selection."
        },
    )
    corpus: str = field(
        default="audiofolder", metadata={"help": "load_corpus name of the new corpus ('audiofolder', 'csv', ...)."}
    )
    corpus_root: str = field(default="", metadata={"help": "Root of the new corpus."})
    corpus_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "load_corpus options: label_column, label_map, labels, text_column, speaker_column, ..."},
    )
    emotion_labels: list[str] | None = field(
        default=None, metadata={"help": "The new label set, in order (default: the labels of the train split, sorted)."}
    )
    add_label_tokens: str = field(
        default="auto", metadata={"help": "'auto' (labels the tokenizer splits), 'always' or 'never'."}
    )
    output_dir: str = field(
        default="outputs/finetune",
        metadata={"help": "Cached stages under <output_dir>/cache, results under <output_dir>/finetune-seed<seed>."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every stage."})
    annotation_method: str = field(
        default="speechcraft", metadata={"help": "'speechcraft', 'unified' or 'speaker_adaptive'."}
    )
    train_split: str = field(default="train", metadata={"help": "Split used for fine-tuning."})
    test_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    selection_ratio: float | None = field(
        default=0.9, metadata={"help": "Share of annotated captions kept by CEM confidence (None or 1: keep all)."}
    )
    rectify: bool = field(
        default=True, metadata={"help": "RL rectification of the descriptors during fine-tuning (SED controller)."}
    )
    num_policies: int = field(
        default=DEFAULT_NUM_POLICIES, metadata={"help": "K policies per utterance (with rectify)."}
    )
    max_steps: int = field(default=300, metadata={"help": "Fine-tuning steps."})
    learning_rate: float = field(
        default=5e-4,
        metadata={"help": "AdamW learning rate (tiny preset default; use ~1e-4 with LoRA on the paper preset)."},
    )
    controller_learning_rate: float = field(
        default=SedRectifyConfig.controller_learning_rate,
        metadata={"help": "Adam learning rate of the SED controller (SedRectifyConfig's default)."},
    )
    per_device_batch_size: int = field(default=16, metadata={"help": "Per-device batch size."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of generation at evaluation and scoring."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many test utterances."}
    )
    tsne_samples: int = field(default=300, metadata={"help": "Utterances in the t-SNE plot."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up of the learning-rate schedule."})
    save_steps: int = field(
        default=0,
        metadata={"help": "Checkpoint the fine-tuning every N steps inside its unfinished stage folder (0: none)."},
    )
    resume_from_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume an interrupted fine-tuning from the newest complete checkpoint in its unfinished stage folder."
        },
    )


def _recipe_config(cfg: FinetuneConfig):
    """The lead's RecipeConfig carrying this run's settings, so its stage functions can run them."""
    from .recipe_config import RecipeConfig

    return RecipeConfig(
        system="finetune",
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        target_corpus=cfg.corpus,
        target_root=cfg.corpus_root,
        target_options=dict(cfg.corpus_options),
        train_split=cfg.train_split,
        test_split=cfg.test_split,
        annotation_method=cfg.annotation_method,
        selection_ratio=cfg.selection_ratio,
        posttrain_max_steps=cfg.max_steps,
        posttrain_learning_rate=cfg.learning_rate,
        num_policies=cfg.num_policies,
        training_args={"controller_learning_rate": cfg.controller_learning_rate},
        per_device_batch_size=cfg.per_device_batch_size,
        eval_batch_size=cfg.eval_batch_size,
        max_eval_samples=cfg.max_eval_samples,
        tsne_samples=cfg.tsne_samples,
        warmup_ratio=cfg.warmup_ratio,
        save_steps=cfg.save_steps,
        resume_from_checkpoint=cfg.resume_from_checkpoint,
    )


def _fingerprint(path: str) -> str:
    """Identity of a checkpoint for stage keys: its config and the weights' sizes and mtimes."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    parts = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(p.iterdir()) if f.is_file()]
    return json.dumps(parts)


def _evaluate(
    rcfg, spec, model_dir: Path, root: str, annotated, run_dir: Path, labels: Sequence[str]
) -> dict[str, Any]:
    """The recipe's evaluation (metrics + confusion matrix + t-SNE plots); where this build's
    evaluation module lacks the plots, the same metrics without them."""
    from . import recipe

    try:
        return recipe.evaluate_system(rcfg, spec, model_dir, root, annotated, run_dir)
    except ImportError as exc:
        logger.warning("evaluation plots unavailable (%s): metrics only", exc)
    import datasets

    from .descriptors import SED_FIELDS
    from .evaluation import evaluate_ser

    model, processor = recipe.load_ser_slm(model_dir)
    test = datasets.load_from_disk(str(annotated.path / "data"))[rcfg.test_split]
    if rcfg.max_eval_samples:
        test = test.select(range(min(rcfg.max_eval_samples, len(test))))
    has_truth = all(any(test[f]) for f in SED_FIELDS)
    return evaluate_ser(
        model,
        processor,
        test,
        emotion_labels=list(labels),
        with_sed=True,
        sed_source="truth" if has_truth else "auto",
        batch_size=rcfg.eval_batch_size,
    )


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Runs (or reuses) every stage and writes ``<output_dir>/finetune-seed<seed>/results.json`` in
    the recipe's format, so ``trustser explain`` and ``trustser push`` work on ``output_dir``."""
    import time

    from . import recipe
    from .explain import resolve_model_dir
    from .report import run_results, write_results
    from .stages import StageRunner
    from .systems import SystemSpec
    from .utils import atomic_write_json, distributed_state, set_seed, use_cpu_cores

    if not cfg.model or not cfg.corpus_root:
        raise ValueError("finetune needs model= (checkpoint) and corpus_root= (the new corpus)")
    started = time.time()
    state = distributed_state()
    use_cpu_cores(state.num_processes)
    set_seed(cfg.seed)
    rcfg = _recipe_config(cfg)
    out_root = Path(cfg.output_dir)
    runner = StageRunner(out_root / "cache", state)
    found = resolve_model_dir(cfg.model)
    cem_src = (
        cfg.cem
        or found["cem"]
        or (str(Path(found["model"]) / "cem") if (Path(found["model"]) / "cem" / "config.json").is_file() else None)
    )
    ratio = cfg.selection_ratio if cfg.selection_ratio is not None and cfg.selection_ratio < 1.0 else None
    if ratio is not None and cem_src is None:
        raise ValueError(
            "selection_ratio < 1 needs a CEM: pass cem=... (or selection_ratio: null to keep every caption)"
        )

    annotated = recipe.stage_annotate(runner, rcfg, cfg.corpus_root, [])

    def base(out: Path):
        """The checkpoint with the new label words as tokens (the run's 'pretrain' stage)."""
        import datasets

        from .models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

        model = SerSlmForConditionalGeneration.from_pretrained(found["model"])
        processor = SerSlmProcessor.from_pretrained(found["model"])
        labels = cfg.emotion_labels or sorted(
            set(datasets.load_from_disk(str(annotated.path / "data"))[cfg.train_split]["emotion"])
        )
        added = add_emotion_label_tokens(model, processor, labels, cfg.add_label_tokens)
        model.save_pretrained(str(out / "model"))
        processor.save_pretrained(str(out / "model"))
        atomic_write_json(
            out / "labels.json", {"emotion_labels": list(model.config.emotion_labels), "added_tokens": added}
        )

    pretrain = runner.run(
        "pretrain",
        {
            "from": found["model"],
            "fingerprint": _fingerprint(found["model"]),
            "labels": cfg.emotion_labels,
            "add_label_tokens": cfg.add_label_tokens,
        },
        base,
        [annotated],
    )
    labels = json.loads((pretrain.path / "labels.json").read_text())["emotion_labels"]

    cem = selected = None
    data_stage = annotated
    if ratio is not None:
        cem = runner.run(
            "cem",
            {"from": cem_src, "fingerprint": _fingerprint(cem_src)},
            lambda out: shutil.copytree(cem_src, out / "cem", ignore=shutil.ignore_patterns("trainer", "README.md")),
        )
        selected = recipe.stage_select(runner, rcfg, ratio, annotated, pretrain, cem)
        data_stage = selected
    spec = SystemSpec(
        "finetune",
        with_sed=True,
        domain_sft=True,
        selection_ratio=ratio,
        rectify=cfg.rectify,
        num_policies=cfg.num_policies,
    )
    post = recipe.stage_posttrain(runner, rcfg, spec, data_stage, "data", pretrain)

    results: dict[str, Any] = {}
    if state.is_main_process:
        run_dir = out_root / f"finetune-seed{cfg.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = _evaluate(rcfg, spec, post.path / "model", cfg.corpus_root, annotated, run_dir, labels)
        results = run_results(
            spec,
            cfg.corpus,
            metrics,
            annotated=annotated,
            cem=cem,
            selected=selected,
            post=post,
            settings={
                **rcfg.to_dict(),
                "emotion_labels": labels,
                "base_model": cfg.model,
                "num_policies_used": cfg.num_policies,
                "finetune": asdict(cfg),
            },
            seed=cfg.seed,
            stages=runner.stages,
            started=started,
            ground_truth_checks=False,
        )
        write_results(results, run_dir)
    state.wait_for_everyone()
    return results


def main(argv: list[str] | None = None) -> dict:
    """``recipes/finetune_new_corpus.py``: ``--config FILE`` plus command-line overrides (TrlParser)."""
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .utils import end_distributed

    (cfg,) = TrlParser((FinetuneConfig,)).parse_args_and_config(args=argv)
    results = run_finetune(cfg)
    end_distributed()
    return results


__all__ = ["FinetuneConfig", "run_finetune", "add_emotion_label_tokens", "labels_needing_tokens", "main"]
