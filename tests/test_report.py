"""The one results/report writer (trustser.report) in the two shapes its callers use: a system of
the paper (recipe.run_system) and fine-tuning (finetune.run_finetune)."""

import dataclasses
import json
import os

import pytest

from trustser.descriptors import SED_FIELDS
from trustser.report import read_json, rectification_summary, run_results, write_results
from trustser.stages import STAGE_RECORD, Stage
from trustser.systems import SystemSpec, get_system

# results.json's keys, in order, as each caller has always written them
RECIPE_KEYS = [
    "system",
    "target_corpus",
    "test",
    "annotation",
    "cem",
    "cem_target",
    "selection",
    "rectification",
    "controller_audit",
    "settings",
    "seed",
    "num_processes",
    "torch_threads_per_process",
    "stages",
    "wall_seconds",
]
FINETUNE_KEYS = [
    "system",
    "target_corpus",
    "test",
    "annotation",
    "cem",
    "selection",
    "rectification",
    "settings",
    "seed",
    "stages",
    "wall_seconds",
]

ACC = {**{f: 0.5 for f in SED_FIELDS}, "n": 10, "all_right": 0.1}
METRICS = {
    "n": 10,
    "wa": 0.5,
    "ua": 0.25,
    "weighted_f1": 0.4,
    "unparseable_rate": 0.0,
    "sed_accuracy": {f: 0.6 for f in SED_FIELDS},
    "wa_by_group": {"adult": 0.5},
}
LOGS = [
    {"step": 1, "rectify/label_accuracy": 0.4, "reward_mean": 0.1, "loss": 2.0},
    {"step": 2, "rectify/label_accuracy": 0.6, "reward_mean": 0.3, "loss": 1.0},
]


def _stage(root, name, files, seconds=1.5):
    path = root / f"{name}-abc"
    for rel, content in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(json.dumps(content))
    (path / STAGE_RECORD).write_text(json.dumps({"seconds": seconds}))
    return Stage(name, "abc", path, reused=False)


@pytest.fixture
def stages(tmp_path):
    cache = tmp_path / "cache"
    audit = {
        "n": 10,
        "annotation_accuracy": 0.5,
        "expected_accuracy": 0.6,
        "greedy_accuracy": 0.7,
        "per_field": {
            f: {
                "annotation": 0.5,
                "expected": 0.6,
                "greedy": 0.7,
                "modify_probability": 0.1,
                "repair": {"fixed": 1.0, "broken": 0, "unchanged_wrong": 4, "unchanged_right": 5},
            }
            for f in SED_FIELDS
        },
    }
    return {
        "annotated": _stage(
            cache,
            "annotate",
            {"annotation_report.json": {"train": {"rows": 10, "accuracy": ACC, "accuracy_by_group": {"adult": ACC}}}},
        ),
        "cem": _stage(cache, "cem", {"cem/cem_metrics.json": {"auc": 0.7}}),
        "selected": _stage(
            cache,
            "select",
            {
                "data/selection_stats.json": {"n_total": 10, "n_selected": 9},
                "selection_quality.json": {
                    "n": 10,
                    "utterance_auc": 0.6,
                    "field_auc": {"pitch": 0.55},
                    "kept_share_accuracy": [{"share": 0.9, "scores": 0.5, "oracle": 0.6}],
                },
            },
        ),
        "post": _stage(cache, "posttrain", {"log_history.json": LOGS, "controller_audit.json": audit}),
    }


def test_both_callers_write_one_structure(tmp_path, stages):
    spec = get_system("sys10")
    run_dir = tmp_path / "out" / "sys10-seed0"
    run_dir.mkdir(parents=True)
    order = list(stages.values())
    recipe = run_results(
        spec,
        "synthetic",
        METRICS,
        **stages,
        settings={"seed": 0, "num_policies_used": 6},
        seed=0,
        stages=order,
        started=0.0,
        relative_to=run_dir,
        processes={"num_processes": 1, "torch_threads_per_process": 2},
    )
    ft_spec = SystemSpec("finetune", with_sed=True, domain_sft=True, selection_ratio=0.9, rectify=True, num_policies=2)
    finetune = run_results(
        ft_spec,
        "audiofolder",
        METRICS,
        **stages,
        settings={"seed": 0, "num_policies_used": 2},
        seed=0,
        stages=order,
        started=0.0,
        ground_truth_checks=False,
    )
    assert list(recipe) == RECIPE_KEYS and list(finetune) == FINETUNE_KEYS
    # the stage outputs read the same way by both; fine-tuning leaves out the checks against the ground truth
    for key in FINETUNE_KEYS[3:7]:  # annotation, cem, selection, rectification
        assert recipe[key] == finetune[key], key
    assert recipe["test"] == {"synthetic": METRICS} and finetune["test"] == {"audiofolder": METRICS}
    assert recipe["cem"] == {"auc": 0.7} and recipe["selection"]["n_selected"] == 9
    assert recipe["cem_target"]["utterance_auc"] == 0.6 and recipe["controller_audit"]["n"] == 10
    assert recipe["rectification"] == {
        "rectify/label_accuracy": {"first": 0.4, "last": 0.6},
        "reward_mean": {"first": 0.1, "last": 0.3},
    }
    assert recipe["num_processes"] == 1 and recipe["torch_threads_per_process"] == 2
    # stage paths: relative to the run folder (the recipe), as the runner gave them (fine-tuning)
    assert [s["path"] for s in recipe["stages"]] == [os.path.join("..", "..", "cache", s.path.name) for s in order]
    assert [s["path"] for s in finetune["stages"]] == [str(s.path) for s in order]
    assert [s["seconds"] for s in finetune["stages"]] == [1.5] * 4 and recipe["wall_seconds"] > 0
    for results, folder in ((recipe, run_dir), (finetune, tmp_path / "ft")):
        folder.mkdir(exist_ok=True)
        write_results(results, folder)
        assert json.loads((folder / "results.json").read_text()) == results
        report = (folder / "report.md").read_text()
        name = results["system"]["name"]
        assert report.startswith(f"# trustser {name} — {results['target_corpus']}")
        for section in (
            "| WA (accuracy) | 0.5000 |",
            "Annotation accuracy against the ground truth",
            "## Confidence estimation",
            "## Selection",
            "## Rectification (last logged values)",
            "| posttrain | abc | False | 1.5 |",
            "rectification.png",
        ):
            assert section in report, (name, section)
    # the ground-truth sections only where the caller reports them
    assert "Descriptor labels after rectification" in (run_dir / "report.md").read_text()
    assert "Descriptor labels after rectification" not in (tmp_path / "ft" / "report.md").read_text()
    assert "(K=6)" in (run_dir / "report.md").read_text() and "(K=2)" in (tmp_path / "ft" / "report.md").read_text()


def test_missing_stage_outputs_are_none(tmp_path, stages):
    spec = get_system("sys4")  # no selection, no rectification
    res = run_results(
        spec,
        "synthetic",
        METRICS,
        annotated=stages["annotated"],
        post=stages["post"],
        settings={"seed": 1},
        seed=1,
        stages=[stages["annotated"]],
        started=0.0,
        relative_to=tmp_path,
    )
    assert (
        res["cem"] is res["cem_target"] is res["selection"] is res["rectification"] is res["controller_audit"] is None
    )
    assert read_json(tmp_path / "absent.json") is None
    assert rectification_summary([]) is None and rectification_summary([{"loss": 1.0}]) is None


def test_report_tables_carry_the_measured_values(tmp_path):
    """report.md's tables: one row per metric, kept share, audited field and stage, values as measured."""
    from trustser.report import write_report

    repair = {"fixed": 180.5, "broken": 468, "unchanged_wrong": 12, "unchanged_right": 40}
    per_field = {
        f: {"annotation": 0.6, "expected": 0.5, "greedy": 0.4, "modify_probability": 0.25, "repair": repair}
        for f in SED_FIELDS
    }
    results = {
        "system": dataclasses.asdict(get_system("sys10")),
        "target_corpus": "synthetic",
        "settings": {"seed": 3, "num_policies_used": 6},
        "test": {
            "synthetic": {
                "n": 2400,
                "wa": 0.444,
                "ua": 0.44,
                "weighted_f1": 0.396,
                "unparseable_rate": 0.0,
                "sed_accuracy": {f: 0.5 for f in SED_FIELDS},
            }
        },
        "cem_target": {
            "n": 800,
            "utterance_auc": 0.607,
            "field_auc": {"pitch": 0.55},
            "kept_share_accuracy": [{"share": 0.9, "scores": 0.665, "oracle": 0.717}],
        },
        "controller_audit": {
            "per_field": per_field,
            "annotation_accuracy": 0.66,
            "expected_accuracy": 0.56,
            "greedy_accuracy": 0.55,
        },
        "stages": [{"name": "pretrain", "key": "abc", "reused": False, "seconds": 374.0}],
    }
    write_report(results, tmp_path / "report.md")
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| WA (accuracy) | 0.4440 |" in lines and "| SED accuracy: speed | 0.5000 |" in lines
    assert "| 90% | 0.6650 | 0.7170 |" in lines
    assert "| volume | 0.6000 | 0.5000 | 0.4000 | 0.2500 |" in lines
    assert "| **all** | 0.6600 | 0.5600 | 0.5500 |  |" in lines
    assert sum(line == "| age | 180.5 | 468 | 12 | 40 |" for line in lines) == 1
    assert "| pretrain | abc | False | 374.0 |" in lines
    # every table has its rule right under its header, with as many cells
    for i, line in enumerate(lines[:-1]):
        if lines[i + 1].startswith("|---"):
            assert lines[i + 1].count("---|") == line.count("|") - 1
