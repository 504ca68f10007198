"""End to end: the recipe runner on the small synthetic corpus (the same code path as
`accelerate launch recipes/sys10.py`, with few steps)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trustser.descriptors import SED_FIELDS
from trustser.recipe import run_system
from trustser.recipe_config import RecipeConfig

REPO = Path(__file__).resolve().parents[1]


def _quick(tmp_path, corpus, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        target_root=str(corpus),
        pretrain_root=str(corpus),
        synth_size="small",
        pretrain_max_steps=12,
        text_prior_steps=2,
        cem_max_steps=10,
        cem_max_samples=48,
        posttrain_max_steps=3,
        per_device_batch_size=4,
        max_eval_samples=12,
        tsne_samples=24,
        eval_batch_size=12,
        annotation_num_proc=1,
        cpu_threads=1,
    )
    base.update(kw)
    return RecipeConfig(**base)


def test_rectified_system_end_to_end_and_stage_reuse(tmp_path, synthetic_small):
    cfg = _quick(tmp_path, synthetic_small, system="sys9", num_policies=2)
    res = run_system(cfg)
    run_dir = tmp_path / "out" / "sys9-seed0"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["system"]["name"] == "sys9" and saved["system"]["rectify"] is True
    m = saved["test"]["synthetic"]
    assert m["n"] == 12
    for key in ("wa", "ua", "weighted_f1", "unparseable_rate"):
        assert 0.0 <= m[key] <= 1.0
    assert set(m["sed_accuracy"]) <= set(SED_FIELDS)
    assert saved["settings"]["num_policies_used"] == 2 and saved["seed"] == 0
    assert saved["annotation"]["train"]["rows"] == 80
    names = [s["name"] for s in saved["stages"]]
    assert names == ["annotate", "pretrain", "posttrain", "evaluate"]
    # the annotation measured against the ground truth, per field and speaker group, the pre-training split included
    ann = saved["annotation"]
    assert set(ann) == {"reference", "train", "dev", "test"}
    for split in ann:
        assert set(SED_FIELDS) <= set(ann[split]["accuracy"]) and ann[split]["accuracy"]["n"] > 0
        assert sum(g["n"] for g in ann[split]["accuracy_by_group"].values()) == ann[split]["accuracy"]["n"]
    assert "Annotation accuracy against the ground truth" in (run_dir / "report.md").read_text()
    # pre-training read the tool's labels of the pre-training split (SpeechCraft's regime)
    pre_stage = next(st for st in saved["stages"] if st["name"] == "pretrain")
    assert json.loads((run_dir / pre_stage["path"] / "STAGE.json").read_text())["settings"]["sed_source"] == "auto"
    # per-utterance predictions for paired comparisons
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert len(preds) == 12 and {"id", "emotion", "prediction", "group"} <= set(preds[0])
    assert np.mean([p["prediction"] == p["emotion"] for p in preds]) == pytest.approx(m["wa"])
    assert set(m["wa_by_group"]) == {p["group"] for p in preds}
    assert res["test"]["synthetic"]["wa"] == m["wa"]
    for png in ("confusion_matrix.png", "tsne.png", "rectification.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    report = (run_dir / "report.md").read_text()
    assert "# trustser sys9" in report and "UA (balanced accuracy)" in report
    # the trained controller audited on every training utterance against the ground truth
    audit = saved["controller_audit"]
    assert audit["n"] == 80 and set(audit["per_field"]) == set(SED_FIELDS)
    for v in audit["per_field"].values():
        assert 0.0 <= v["expected"] <= 1.0 and 0.0 <= v["modify_probability"] <= 1.0
    annotation_right = np.mean([audit["per_field"][f]["annotation"] for f in SED_FIELDS])
    assert audit["annotation_accuracy"] == pytest.approx(annotation_right, abs=1e-3)
    for v in audit["per_field"].values():  # per-utterance repair: every label is fixed, broken or left alone
        r = v["repair"]
        assert r["broken"] + r["unchanged_right"] == round(v["annotation"] * audit["n"])
        assert 0 <= r["fixed"] <= audit["n"] - r["broken"] - r["unchanged_right"] - r["unchanged_wrong"] + 1e-6
    assert "Descriptor labels after rectification" in report
    assert saved["settings"]["training_args"]["controller_scale_rewards"] == "none" and saved["num_processes"] == 1
    assert saved["torch_threads_per_process"] == 1
    # the auxiliary heads train in pre-training and, by default (posttrain_aux_losses), in the
    # rectifying post-training too, where they log their losses beside the caption's
    pre = run_dir / next(s["path"] for s in saved["stages"] if s["name"] == "pretrain")  # relative to the run folder
    pre_logs = json.loads((pre / "log_history.json").read_text())
    assert any("aux_sed_loss" in h and "aux_ctc_loss" in h for h in pre_logs)
    assert json.loads((pre / "model" / "config.json").read_text())["aux_sed_loss_weight"] == 1.0
    post = run_dir / next(s["path"] for s in saved["stages"] if s["name"] == "posttrain")
    post_logs = json.loads((post / "log_history.json").read_text())
    assert any("aux_sed_loss" in h and "aux_ctc_loss" in h and "rectify/modify_rate_pitch" in h for h in post_logs)
    assert (post / "controller" / "model.safetensors").exists() or any((post / "controller").glob("*.safetensors"))
    # Sys. 4 shares the annotation and the pre-trained SLM: only its own post-training runs
    res4 = run_system(replace(cfg, system="sys4"))
    reused = {s["name"]: s["reused"] for s in res4["stages"]}
    assert reused == {"annotate": True, "pretrain": True, "posttrain": False, "evaluate": False}
    assert res4["system"]["rectify"] is False
    # the CEM and selection stages on the same cache (annotation and pre-training reused): the CEM on 3
    # held-out reference speakers with 2 adjacent-perturbed captions (+ the unperturbed one) each, its
    # scores measured against the ground truth on train (the selected split) and on dev
    from trustser.recipe import stage_annotate, stage_cem, stage_pretrain, stage_select
    from trustser.stages import StageRunner
    from trustser.systems import get_system
    from trustser.utils import distributed_state

    root = str(synthetic_small)
    runner = StageRunner(tmp_path / "out" / "cache", distributed_state())
    annotated = stage_annotate(runner, cfg, root, [], root)
    pretrain = stage_pretrain(runner, cfg, get_system("sys9"), root, annotated, "auto", [annotated])
    assert annotated.reused and pretrain.reused
    ccfg = replace(
        cfg, cem_holdout_speakers=3, cem_captions_per_utterance=2, cem_perturbation="adjacent", cem_balance="field"
    )
    cem = stage_cem(runner, ccfg, root, pretrain, annotated, "auto")
    report = json.loads((cem.path / "cem" / "cem_metrics.json").read_text())
    assert (
        len(report["data"]["speakers"]) == 3 and report["data"]["utterances"] == 48
    )  # cem_max_samples of the 3 speakers
    assert report["data"]["rows"] == 48 * 3 and report["data"]["eval_rows"] == 9 * 3 and report["train_rows"] == 39 * 3
    assert report["balance"] == "field"
    selected = stage_select(runner, ccfg, 0.9, annotated, pretrain, cem)
    quality = json.loads((selected.path / "selection_quality.json").read_text())
    dev = json.loads((selected.path / "selection_quality_dev.json").read_text())
    assert quality["n"] == 80 and dev["n"] == 40
    for q in (quality, dev):
        assert set(q["field_auc"]) == set(q["field_ece"]) == set(SED_FIELDS) and 0.0 <= q["utterance_ece"] <= 1.0
        assert [r["share"] for r in q["kept_share_accuracy"]][:2] == [1.0, 0.9]
    assert not (selected.path / "data" / "selection_quality_dev.json").exists()


@pytest.mark.slow
def test_sys10_two_cpu_processes(tmp_path, synthetic_small):
    """`accelerate launch` with two CPU processes runs the whole Sys. 10 (CEM, selection, RL)."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate_configs/cpu.yaml"),
        str(REPO / "recipes/sys10.py"),
        "--output_dir",
        str(out),
        "--target_root",
        str(synthetic_small),
        "--pretrain_root",
        str(synthetic_small),
        "--pretrain_max_steps",
        "16",
        "--text_prior_steps",
        "2",
        "--cem_max_steps",
        "10",
        "--cem_max_samples",
        "48",
        "--posttrain_max_steps",
        "3",
        "--per_device_batch_size",
        "4",
        "--max_eval_samples",
        "12",
        "--tsne_samples",
        "24",
        "--num_policies",
        "2",
        "--annotation_num_proc",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "sys10-seed0" / "results.json").read_text())
    assert saved["num_processes"] == 2  # cpu.yaml really starts two processes
    assert [s["name"] for s in saved["stages"]] == ["annotate", "pretrain", "cem", "select", "posttrain", "evaluate"]
    sel = saved["selection"]
    assert sel is not None and sel["n_selected"] == 72  # 90% of the 80 train utterances
    assert saved["cem"] is not None and saved["cem_target"]["n"] == 80


def test_use_cpu_cores_divides_the_cores_among_processes():
    import torch

    from trustser.utils import use_cpu_cores

    before = torch.get_num_threads()
    try:
        assert use_cpu_cores(1) == max(1, os.cpu_count() // 1) == torch.get_num_threads()
        assert use_cpu_cores(os.cpu_count() * 4) == 1  # never zero
        assert use_cpu_cores(2, threads=3) == 3 == torch.get_num_threads()  # an explicit count wins
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_text_prior_runs_inside_the_pretrain_stage(tmp_path, synthetic_small):
    """``text_prior_steps`` trains the LM on textbook captions before pre-training, in the same stage
    (its log beside the model); the pre-trained model then differs from the one without it."""
    from trustser.recipe import stage_annotate, stage_pretrain
    from trustser.stages import StageRunner
    from trustser.systems import get_system
    from trustser.utils import distributed_state

    root = str(synthetic_small)
    cfg = _quick(tmp_path, synthetic_small, pretrain_max_steps=2, text_prior_steps=0)
    runner = StageRunner(tmp_path / "out" / "cache", distributed_state())
    annotated = stage_annotate(runner, cfg, root, [], root)
    plain = stage_pretrain(runner, cfg, get_system("sys4"), root, annotated, "auto", [annotated])
    prior = stage_pretrain(
        runner, replace(cfg, text_prior_steps=4), get_system("sys4"), root, annotated, "auto", [annotated]
    )
    assert prior.path != plain.path
    log = json.loads((prior.path / "text_prior_log.json").read_text())
    assert log[-1]["step"] == 4 and log[0]["loss"] > 0
    assert not (plain.path / "text_prior_log.json").exists()
    from safetensors.torch import load_file

    a, b = load_file(plain.path / "model" / "model.safetensors"), load_file(prior.path / "model" / "model.safetensors")
    lm = [k for k in a if "language_model" in k]
    assert lm and any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in lm)
