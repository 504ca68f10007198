"""Release a trained trustser system on the Hugging Face Hub: one repository holding the SER-SLM
with its processor at the root, the CEM in ``cem/`` and the SED controller in ``controller/``,
each with a model card generated from ``trustser/model_cards/*.md`` (package data) and the run's ``results.json``.

One repository (not three) because the parts only make sense together: the CEM reads this SLM's
hidden states, the controller was trained against it, and the ``explainable-ser`` pipeline finds
the CEM in ``cem/`` by itself. Each part loads with ``from_pretrained(repo_id, subfolder=...)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .descriptors import EMOTION_LABELS, SED_FIELDS, UNPARSED, build_caption
from .utils import atomic_directory, atomic_write_json

logger = logging.getLogger(__name__)

PAPER_BASE_MODELS = ["facebook/hubert-large-ll60k", "meta-llama/Llama-3.1-8B-Instruct"]
CORPUS_NAMES = {
    "iemocap": "IEMOCAP",
    "meld": "MELD",
    "synthetic": "trustser synthetic SED corpus",
    "speechcraft": "SpeechCraft",
    "audiofolder": "audiofolder corpus",
    "csv": "CSV corpus",
}


# ------------------------------------------------------------------------------------------------
# finding the parts of a run
# ------------------------------------------------------------------------------------------------
def find_run(output_dir: str | os.PathLike) -> tuple[Path, dict]:
    """``(run_dir, results)`` for a trustser output directory or one of its ``<system>-seed<seed>`` folders."""
    p = Path(output_dir)
    if (p / "results.json").is_file():
        run = p
    else:
        found = sorted(p.glob("*-seed*/results.json"))
        if not found:
            raise FileNotFoundError(
                f"{p}: no results.json here nor in a <system>-seed<seed>/ folder; run a recipe first"
            )
        if len(found) > 1:
            raise ValueError(
                f"{p} holds several runs ({', '.join(f.parent.name for f in found)}): pass one of those folders"
            )
        run = found[0].parent
    return run, json.loads((run / "results.json").read_text())


def run_artifacts(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Paths of the evaluated SER-SLM, its CEM and controller (None when the system has none)."""
    run, results = find_run(output_dir)
    if (run / "config.json").is_file():  # the run folder is the model (recipe.export_model_folder)
        return {
            "run_dir": run,
            "results": results,
            "model": run,
            "cem": run / "cem" if (run / "cem" / "config.json").is_file() else None,
            "controller": run / "controller" if (run / "controller" / "config.json").is_file() else None,
        }
    # older run folders: the stages' paths (relative to the run folder)
    stages = {s["name"]: run / s["path"] for s in results.get("stages", [])}
    model_stage = stages.get("posttrain", stages.get("pretrain"))
    if model_stage is None or not (model_stage / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"{run}/results.json: no saved model under the posttrain/pretrain stage ({sorted(stages)})"
        )
    cem = stages.get("cem")
    controller = stages.get("posttrain")
    return {
        "run_dir": run,
        "results": results,
        "model": model_stage / "model",
        "cem": cem / "cem" if cem is not None and (cem / "cem" / "config.json").is_file() else None,
        "controller": controller / "controller"
        if controller is not None and (controller / "controller" / "config.json").is_file()
        else None,
    }


def emotion_labels_of(results: Mapping) -> list[str]:
    """The run's emotion label set: as its settings name it (fine-tuning), else the evaluation's
    confusion-matrix labels, else the corpus' set."""
    named = (results.get("settings") or {}).get("emotion_labels")
    if named:
        return list(named)
    for metrics in (results.get("test") or {}).values():
        labels = (metrics.get("confusion_matrix") or {}).get("labels")
        if labels:
            return [l for l in labels if l != UNPARSED]
    corpus = results.get("target_corpus")
    if corpus in EMOTION_LABELS:
        return list(EMOTION_LABELS[corpus])
    raise ValueError("results.json names no emotion labels (no confusion matrix, unknown corpus)")


# ------------------------------------------------------------------------------------------------
# model cards
# ------------------------------------------------------------------------------------------------
def _template(name: str) -> str:
    """The text of ``trustser/model_cards/<name>``, read from the installed package (a wheel ships
    the templates as package data; a source checkout reads the same folder)."""
    from importlib.resources import files

    path = files("trustser") / "model_cards" / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in the trustser package ({path})")
    return path.read_text(encoding="utf-8")


def eval_results(results: Mapping) -> list:
    """``EvalResult`` entries (model-index) for every test corpus: WA, UA, weighted F1 and the
    per-field SED accuracy, values exactly as in results.json."""
    from huggingface_hub import EvalResult

    out = []
    settings = results.get("settings") or {}
    for corpus, m in (results.get("test") or {}).items():
        common = dict(
            task_type="audio-classification",
            task_name="Speech emotion recognition",
            dataset_type=corpus,
            dataset_name=CORPUS_NAMES.get(corpus, corpus),
            dataset_split=settings.get("test_split", "test"),
        )
        for key, name, mtype in (
            ("wa", "WA (accuracy)", "accuracy"),
            ("ua", "UA (unweighted accuracy)", "recall"),
            ("weighted_f1", "Weighted F1", "f1"),
        ):
            if m.get(key) is not None:
                out.append(
                    EvalResult(
                        metric_type=mtype, metric_name=name, metric_value=float(m[key]), metric_config=key, **common
                    )
                )
        for f, v in (m.get("sed_accuracy") or {}).items():
            out.append(
                EvalResult(
                    metric_type="accuracy",
                    metric_name=f"SED accuracy: {f}",
                    metric_value=float(v),
                    metric_config=f"sed_{f}",
                    **common,
                )
            )
    return out


def _base_models(results: Mapping, model_dir: Path) -> list[str] | None:
    settings = results.get("settings") or {}
    if settings.get("preset") == "paper":
        return list(PAPER_BASE_MODELS)
    cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    names = [c.get("_name_or_path") for c in (cfg.get("audio_config") or {}, cfg.get("text_config") or {})]
    names = [n for n in names if n and "/" in n and not Path(n).exists()]
    return names or None


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else f"{float(x):.3f}"


def build_model_cards(artifacts: Mapping, repo_id: str, *, license: str | None = None) -> dict[str, Any]:
    """``{"": ModelCard, "cem": ..., "controller": ...}`` (parts present only) from the templates."""
    from huggingface_hub import ModelCard, ModelCardData

    results = artifacts["results"]
    settings = results.get("settings") or {}
    system = results.get("system") or {}
    corpus = results.get("target_corpus") or settings.get("target_corpus", "unknown")
    labels = emotion_labels_of(results)
    license = license or ("llama3.1" if settings.get("preset") == "paper" else "apache-2.0")
    name = repo_id.split("/")[-1]
    base = _base_models(results, Path(artifacts["model"]))
    datasets_meta = [corpus] + (
        [settings["pretrain_corpus"]] if settings.get("pretrain_corpus") not in (None, corpus) else []
    )
    tags = ["trustser", "speech-emotion-recognition", "explainable-ai", "audio", "speech-llm"]
    metrics = (results.get("test") or {}).get(corpus) or next(iter((results.get("test") or {}).values()), {})
    metric_rows = [
        (k, float(metrics[m]))
        for k, m in (
            ("WA", "wa"),
            ("UA", "ua"),
            ("weighted F1", "weighted_f1"),
            ("unparseable captions", "unparseable_rate"),
        )
        if metrics.get(m) is not None
    ]
    metric_rows += [(f"SED accuracy: {f}", float(v)) for f, v in (metrics.get("sed_accuracy") or {}).items()]
    proc_cfg = Path(artifacts["model"]) / "processor_config.json"
    fe = json.loads(proc_cfg.read_text()).get("feature_extractor", {}) if proc_cfg.is_file() else {}
    max_seconds = f"{fe['n_samples'] / fe.get('sampling_rate', 16000):g} s" if fe.get("n_samples") else "no fixed limit"
    sel = results.get("selection") or {}
    parts = [
        f"pre-trained on `{settings.get('pretrain_corpus', '?')}` ({settings.get('pretrain_split', 'reference')} split, reliable descriptors)"
    ]
    if system.get("domain_sft"):
        parts.append(
            f"post-trained on `{corpus}` `{settings.get('train_split', 'train')}` with automatically annotated descriptors "
            f"(`{settings.get('annotation_method', '?')}` annotation, {settings.get('posttrain_max_steps', '?')} steps)"
        )
    if sel:
        parts.append(
            f"after keeping the {sel.get('n_selected')} of {sel.get('n_total')} most confident captions (CEM selection)"
        )
    if system.get("rectify"):
        parts.append(
            f"with RL rectification of the descriptors (K = {settings.get('num_policies_used', system.get('num_policies'))})"
        )
    training = "The SER-SLM was " + "; ".join(parts) + "."
    summary = (
        f"descriptors in caption: {system.get('with_sed')}, domain SFT: {system.get('domain_sft')}, "
        f"selection: {system.get('selection_ratio') or '100%'}, RL rectification: {system.get('rectify')}"
    )
    paper = None
    if system.get("paper_iemocap") is not None:
        paper = f"{system['paper_iemocap']}% accuracy on IEMOCAP and {system['paper_meld']}% on MELD"
    example = build_caption(
        "I can't believe you did that",
        labels[0],
        {"pitch": "high", "volume": "high", "speed": "fast", "gender": "female", "age": "young adult"},
    )
    common_meta = dict(license=license, library_name="transformers", tags=tags, datasets=datasets_meta, language="en")

    cards: dict[str, Any] = {}
    data = ModelCardData(
        model_name=name,
        base_model=base,
        pipeline_tag="audio-text-to-text",
        eval_results=eval_results(results) or None,
        **common_meta,
    )
    cards[""] = ModelCard.from_template(
        data,
        template_str=_template("ser_slm.md"),
        model_name=name,
        repo_id=repo_id,
        system_name=system.get("name", "?"),
        system_summary=summary,
        example_caption=example,
        has_cem=artifacts.get("cem") is not None,
        has_controller=artifacts.get("controller") is not None,
        emotion_labels=labels,
        max_seconds=max_seconds,
        target_corpus=corpus,
        test_split=settings.get("test_split", "test"),
        metric_rows=metric_rows,
        sed_reference=(
            "ground-truth descriptors" if metrics.get("sed_source", "truth") == "truth" else "automatic annotation"
        ),
        paper_reference=paper,
        training_summary=training,
        base_models_text=", ".join(f"`{b}`" for b in base)
        if base
        else "none (random initialisation, corpus-trained tokenizer)",
        preset=settings.get("preset", "?"),
        seed=results.get("seed"),
    )

    def component_card(suffix: str, template: str, **fields) -> ModelCard:
        data = ModelCardData(model_name=f"{name}-{suffix}", base_model=repo_id, **common_meta)
        return ModelCard.from_template(
            data, template_str=_template(template), model_name=name, repo_id=repo_id, **fields
        )

    if artifacts.get("cem") is not None:
        cem_dir = Path(artifacts["cem"])
        ccfg = json.loads((cem_dir / "config.json").read_text())
        report = results.get("cem") or (
            json.loads((cem_dir / "cem_metrics.json").read_text()) if (cem_dir / "cem_metrics.json").is_file() else {}
        )
        ev = report.get("eval") or {}
        rows = [
            (f, *(_fmt(ev[f].get(k)) for k in ("auc", "nce", "ece")))
            for f in (*ccfg.get("field_names", SED_FIELDS), "utterance")
            if f in ev
        ]
        cards["cem"] = component_card(
            "cem",
            "cem.md",
            pooling=ccfg.get("feature_pooling"),
            input_size=ccfg.get("input_size"),
            field_names=ccfg.get("field_names", SED_FIELDS),
            quality_rows=rows,
            training_summary=(
                f"{report.get('balanced_rows', '?')} balanced rows ({report.get('balance', '?')} balancing) "
                f"of {report.get('train_rows', '?')}, Adam, BCE; final training loss {_fmt(report.get('train_loss'))}."
            ),
        )
    if artifacts.get("controller") is not None:
        rect = results.get("rectification") or {}
        rows = [(k, _fmt(v.get("first")), _fmt(v.get("last"))) for k, v in rect.items() if isinstance(v, Mapping)]
        cards["controller"] = component_card(
            "sed-controller",
            "sed_controller.md",
            num_policies=settings.get("num_policies_used", system.get("num_policies")),
            rectification_rows=rows,
        )
    return cards


# ------------------------------------------------------------------------------------------------
# staging and pushing
# ------------------------------------------------------------------------------------------------
def _copy_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in skip or f.name.startswith("."):
            continue
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def export_release(
    output_dir: str | os.PathLike, dest: str | os.PathLike, repo_id: str, *, license: str | None = None
) -> Path:
    """Writes the repository's content to ``dest`` (atomically): SLM + processor + README at the
    root (``config.json`` gains ``emotion_labels``), ``cem/`` and ``controller/`` with their cards,
    and ``trustser_results.json``. ``from_pretrained(dest[, subfolder=...])`` works on it."""
    art = run_artifacts(output_dir)
    cards = build_model_cards(art, repo_id, license=license)
    with atomic_directory(dest) as tmp:
        # a run folder's own results/report/plots are not part of the model (trustser_results.json is)
        _copy_files(
            Path(art["model"]),
            tmp,
            skip=(
                "README.md",
                "training_args.bin",
                "results.json",
                "report.md",
                "confusion_matrix.png",
                "tsne.png",
                "rectification.png",
            ),
        )
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["emotion_labels"] = emotion_labels_of(art["results"])
        atomic_write_json(cfg_path, cfg)
        for sub in ("cem", "controller"):
            if art.get(sub) is not None:
                _copy_files(Path(art[sub]), tmp / sub, skip=("README.md", "trainer"))
        for sub, card in cards.items():
            card.save(str(tmp / sub / "README.md") if sub else str(tmp / "README.md"))
        atomic_write_json(tmp / "trustser_results.json", art["results"])
    return Path(dest)


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    api=None,
    *,
    private: bool = False,
    token: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
) -> dict[str, Any]:
    """Pushes a trained system (SER-SLM + processor, CEM, controller, model cards) to ``repo_id``
    in one commit. ``api``: an ``huggingface_hub.HfApi`` (default: a new one with ``token``); anything
    with ``create_repo`` and ``upload_folder`` works (tests use a local fake)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="trustser-push-") as tmp:
        folder = export_release(output_dir, Path(tmp) / "repo", repo_id, license=license)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message
            or f"trustser: release {find_run(output_dir)[1].get('system', {}).get('name', 'model')}",
        )
    url = str(getattr(repo, "url", None) or repo or f"https://huggingface.co/{repo_id}")
    logger.info("pushed %d files to %s", len(files), url)
    return {"repo_id": repo_id, "url": url, "files": files, "commit": str(getattr(commit, "oid", "") or commit or "")}


__all__ = [
    "push_to_hub",
    "export_release",
    "build_model_cards",
    "eval_results",
    "run_artifacts",
    "find_run",
    "emotion_labels_of",
]
