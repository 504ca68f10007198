"""A trained run's results: ``results.json`` (assembled from the stage folders' outputs) and
``report.md``. One writer for the paper's systems (``trustser.recipe.run_system``) and for
fine-tuning (``trustser.finetune.run_finetune``), so both run folders read the same way
(``trustser explain``, ``trustser push`` and ``recipes/table1.py`` read them)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .descriptors import SED_FIELDS
from .utils import atomic_write_json, atomic_write_text


def read_json(path: Path):
    """A stage's JSON output, or None where the stage did not write it."""
    return json.loads(path.read_text()) if path.exists() else None


def rectification_summary(log_history: list[dict] | None) -> dict | None:
    """First and last logged value of each rectification quantity (rewards, controller, label accuracy)."""
    if not log_history:
        return None
    last = {}
    for entry in log_history:
        for k, v in entry.items():
            if any(t in k for t in ("rectif", "reward", "controller", "correct")):
                last.setdefault(k, []).append(v)
    return {k: {"first": v[0], "last": v[-1]} for k, v in last.items()} or None


def run_results(
    spec,
    target_corpus: str,
    metrics: dict,
    *,
    annotated,
    cem=None,
    selected=None,
    post=None,
    settings: dict,
    seed: int,
    stages: list,
    started: float,
    relative_to: Path | None = None,
    processes: dict | None = None,
    ground_truth_checks: bool = True,
) -> dict[str, Any]:
    """results.json's content: the system, the test metrics, what the stages wrote (annotation
    report, CEM metrics, selection statistics, rectification summary), the settings and the stage
    table. ``ground_truth_checks`` adds the CEM's scores of the target's captions (``cem_target``)
    and the controller's audit (``controller_audit``); ``processes`` (process and thread counts)
    follows ``seed``; stage paths are relative to ``relative_to`` when given."""
    results: dict[str, Any] = {
        "system": spec.to_dict(),
        "target_corpus": target_corpus,
        "test": {target_corpus: metrics},
        "annotation": read_json(annotated.path / "annotation_report.json"),
        "cem": read_json(cem.path / "cem" / "cem_metrics.json") if cem else None,
    }
    if ground_truth_checks:
        # the CEM's scores of the target's annotated captions against the ground truth (never utterances the SLM trained on)
        results["cem_target"] = read_json(selected.path / "selection_quality.json") if cem else None
    results["selection"] = read_json(selected.path / "data" / "selection_stats.json") if selected else None
    results["rectification"] = (
        rectification_summary(read_json(post.path / "log_history.json")) if post and spec.rectify else None
    )
    if ground_truth_checks:
        results["controller_audit"] = read_json(post.path / "controller_audit.json") if post and spec.rectify else None
    results["settings"] = settings
    results["seed"] = seed
    results.update(processes or {})
    results["stages"] = [
        {
            "name": s.name,
            "key": s.key,
            "reused": s.reused,
            "path": os.path.relpath(s.path, relative_to) if relative_to is not None else str(s.path),
            "seconds": s.record().get("seconds"),
        }
        for s in stages
    ]
    results["wall_seconds"] = round(time.time() - started, 1)
    return results


def write_results(results: dict, run_dir: Path) -> None:
    """``run_dir/results.json`` and ``run_dir/report.md`` (each written atomically), and the one-line
    summary on stdout."""
    atomic_write_json(run_dir / "results.json", results)
    write_report(results, run_dir / "report.md")
    m = results["test"][results["target_corpus"]]
    print(
        f"[trustser] {results['system']['name']}: WA {m['wa']:.4f}  UA {m['ua']:.4f}  wF1 {m['weighted_f1']:.4f}  -> {run_dir}/results.json"
    )


def write_report(results: dict, path: Path) -> None:
    """report.md: the test metrics, the annotation's and the CEM's accuracy against the ground
    truth, the CEM, selection and rectification outputs, the controller audit and the stage table."""
    spec = results["system"]
    lines = [f"# trustser {spec['name']} — {results['target_corpus']}", ""]
    lines.append(
        f"Settings: SED in caption {spec['with_sed']}, domain SFT {spec['domain_sft']}, selection {spec['selection_ratio'] or '100%'}, "
        f"RL rectification {spec['rectify']}{' (K=%d)' % results['settings'].get('num_policies_used', spec['num_policies']) if spec['rectify'] else ''}; seed {results['settings']['seed']}."
    )
    lines.append("")
    for corpus, m in results["test"].items():
        metrics = [
            ("WA (accuracy)", m["wa"]),
            ("UA (balanced accuracy)", m["ua"]),
            ("weighted F1", m["weighted_f1"]),
            ("unparseable captions", m["unparseable_rate"]),
        ]
        metrics += [(f"SED accuracy: {f}", m.get("sed_accuracy", {}).get(f, float("nan"))) for f in SED_FIELDS]
        lines += [f"## Test: {corpus} ({m['n']} utterances)", ""]
        lines += _md_table(["metric", "value"], [(k, f"{v:.4f}") for k, v in metrics])
        if spec.get("paper_iemocap") is not None:
            lines.append(
                f"The paper reports {spec['paper_iemocap']}% (IEMOCAP) and {spec['paper_meld']}% (MELD) for this system."
            )
            lines.append("")
        if m.get("wa_by_group"):
            lines += [
                "Emotion accuracy per speaker group: " + ", ".join(f"{g} {v:.3f}" for g, v in m["wa_by_group"].items()),
                "",
            ]
    lines += _annotation_lines(results.get("annotation"))
    target = results.get("cem_target")
    if target:
        lines += [
            f"## Confidence scores of the target's annotated captions ({target['n']} training utterances, against the ground truth)",
            "",
            f"Utterance AUC (all five labels right): {target['utterance_auc']:.4f}; per field: "
            + ", ".join(f"{f} {v:.4f}" for f, v in (target.get("field_auc") or {}).items()),
            "",
        ]
        lines += _md_table(
            ["kept share", "label accuracy, CEM selection", "oracle selection"],
            [(f"{r['share']:.0%}", f"{r['scores']:.4f}", f"{r['oracle']:.4f}") for r in target["kept_share_accuracy"]],
        )
    for key, title in (
        ("cem", "Confidence estimation"),
        ("selection", "Selection"),
        ("rectification", "Rectification (last logged values)"),
    ):
        if results.get(key):
            lines += [f"## {title}", "", "```json", json.dumps(results[key], indent=1)[:3000], "```", ""]
    audit = results.get("controller_audit")
    if audit:
        fields = audit["per_field"].items()
        lines += ["## Descriptor labels after rectification (trained controller, every training utterance)", ""]
        lines += _md_table(
            ["field", "annotation", "rectified (expected under the policy)", "rectified (greedy)", "P(modify)"],
            [
                *(
                    (f, *(f"{v[k]:.4f}" for k in ("annotation", "expected", "greedy", "modify_probability")))
                    for f, v in fields
                ),
                ("**all**", *(f"{audit[f'{k}_accuracy']:.4f}" for k in ("annotation", "expected", "greedy")), ""),
            ],
        )
        lines += [
            "Per-utterance repair (greedy policy; labels): wrong labels fixed, right labels broken, left as they were.",
            "",
        ]
        lines += _md_table(
            ["field", "fixed", "broken", "unchanged wrong", "unchanged right"],
            [
                (f, f"{r['fixed']:.1f}", r["broken"], r["unchanged_wrong"], r["unchanged_right"])
                for f, r in ((f, v["repair"]) for f, v in fields if "repair" in v)
            ],
        )
    lines += ["## Stages", ""]
    lines += _md_table(
        ["stage", "key", "reused", "seconds"],
        [(s["name"], s["key"], s["reused"], s.get("seconds", "")) for s in results["stages"]],
    )
    lines += [
        "Plots: `confusion_matrix.png`, `tsne.png` (last hidden states coloured by emotion, the paper's Figure 2)"
        + (", `rectification.png` (rectified vs annotated label accuracy, modify rates)." if spec["rectify"] else "."),
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _annotation_lines(report: dict | None) -> list[str]:
    """The annotation's accuracy against the ground truth per split and speaker group (report.md)."""
    rows = [(split, "all", r["accuracy"]) for split, r in (report or {}).items() if r.get("accuracy")]
    rows += [
        (split, g, a) for split, r in (report or {}).items() for g, a in (r.get("accuracy_by_group") or {}).items()
    ]
    if not rows:
        return []
    return ["## Annotation accuracy against the ground truth", ""] + _md_table(
        ["split", "speaker group", "n", *SED_FIELDS, "all five"],
        [(split, g, a["n"], *(f"{a[f]:.3f}" for f in SED_FIELDS), f"{a['all_right']:.3f}") for split, g, a in rows],
    )


def _md_table(header: list[str], rows) -> list[str]:
    """A Markdown table's lines (header, rule, one line per row of already formatted cells), then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
