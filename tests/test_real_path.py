"""The real path, rehearsed: `recipes/configs/iemocap_sys10.yaml` and `meld_sys10.yaml` through
`accelerate launch recipes/sys10.py` on fixture trees in the real formats (SpeechCraft records,
IEMOCAP_full_release, MELD.Raw with 48 kHz six-channel mp4) and tiny local stand-ins for every
Hub model the configs name; only paths, model ids and step counts change (tests/rehearsal.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from rehearsal import REPO, launch_recipe

from trustser.recipe_config import RECTIFY_DEFAULTS

pytestmark = pytest.mark.real_path

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ALL_STAGES = ["annotate", "pretrain", "cem", "select", "posttrain", "evaluate"]


def _check_run(run: dict, corpus: str, target_root: str, inputs: dict) -> dict:
    from trustser.data import load_corpus

    res, run_dir = run["results"], run["run"]
    assert [s["name"] for s in res["stages"]] == ALL_STAGES
    expected = load_corpus(corpus, target_root, **({"protocol": "session5"} if corpus == "iemocap" else {}))
    m = res["test"][corpus]
    assert m["n"] == len(expected["test"]) > 0
    for key in ("wa", "ua", "weighted_f1", "unparseable_rate"):
        assert 0.0 <= m[key] <= 1.0
    # the Hub-style classifiers labelled every training utterance
    ann = res["annotation"]["train"]
    assert ann["rows"] == len(expected["train"]) and ann["n_errors"] == 0
    assert sum(ann["labels"]["gender"].values()) == ann["rows"] and sum(ann["labels"]["age"].values()) == ann["rows"]
    assert res["selection"]["n_selected"] == round(0.9 * len(expected["train"]))
    assert res["cem"] is not None and res["rectification"] is not None
    # the settings came from the YAML, the paths and model ids from the command line
    s = res["settings"]
    assert s["model_args"]["audio_model"] == inputs["models"]["audio_model"] and s["model_args"]["dtype"] == "bfloat16"
    assert s["model_args"]["lora_r"] == 16 and s["gender_model"] == inputs["models"]["gender_model"]
    assert s["training_args"] == {
        "bf16": True,
        "gradient_checkpointing": True,
        "dataloader_num_workers": 2,
        "controller_learning_rate": 1e-3,
        "controller_head_hidden_size": 0,
        "controller_scale_rewards": "group",
        "controller_updates_per_step": 1,
        "controller_frame_stride": 1,
        # the paper's reward and credit (the embedded default's RECTIFY_DEFAULTS differ)
        "reward_scorer": "policy",
        "advantage": "group",
        "controller_fit": "online",
        "controller_speaker_context": False,
        "controller_input": "log_mel",
        "controller_embedding_size": 32,
        "modify_cost": 0.0,
        "controller_entropy_coef": 0.0,
        "rectify_fields": None,
    }
    assert s["training_args"]["controller_scale_rewards"] == "group" and s["posttrain_max_steps"] == 2
    stages = {st["name"]: run_dir / st["path"] for st in res["stages"]}
    for name in ("pretrain", "posttrain"):
        record = json.loads((stages[name] / "STAGE.json").read_text())
        # the rectifying post-training's key also carries the controller settings as they resolved
        controller = {k: v for k, v in s["training_args"].items() if k in RECTIFY_DEFAULTS}
        expected = {"bf16": True, "gradient_checkpointing": True, **(controller if name == "posttrain" else {})}
        assert record["settings"]["training"] == expected
        logs = json.loads((stages[name] / "log_history.json").read_text())
        assert logs[-1]["step"] == 2
    assert (
        json.loads((stages["annotate"] / "STAGE.json").read_text())["settings"]["age_model"]
        == inputs["models"]["age_model"]
    )
    # the run folder is the model: merged SER-SLM + processor, cem/, controller/, pretrained/, adapter/
    assert res["model_folder"] == {
        "model": ".",
        "lora": True,
        "cem": "cem",
        "controller": "controller",
        "pretrained": "pretrained",
        "adapter": "adapter",
    }
    for f in (
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "cem/config.json",
        "controller/config.json",
        "pretrained/model.safetensors",
        "adapter/adapter_model.safetensors",
    ):
        assert (run_dir / f).is_file(), f
    config = json.loads((run_dir / "config.json").read_text())
    assert config["emotion_labels"] == [l for l in m["confusion_matrix"]["labels"] if not l.startswith("<")]
    assert (
        json.loads((run_dir / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == "../pretrained"
    )
    # outputs honour the umask (022 here): readable by the group and others
    for f in ("results.json", "model.safetensors", "cem/model.safetensors", "report.md", "confusion_matrix.png"):
        assert (run_dir / f).stat().st_mode & 0o777 == 0o644, f
    return res


def test_iemocap_config_every_stage(iemocap_run, rehearsal_inputs):
    _check_run(iemocap_run, "iemocap", rehearsal_inputs["iemocap"], rehearsal_inputs)
    assert not any(s["reused"] for s in iemocap_run["results"]["stages"])


def test_meld_config_every_stage(meld_run, rehearsal_inputs):
    res = _check_run(meld_run, "meld", rehearsal_inputs["meld"], rehearsal_inputs)
    # the SpeechCraft pre-training and the CEM are the IEMOCAP run's (same settings, shared cache)
    assert {s["name"]: s["reused"] for s in res["stages"]} == {
        "annotate": False,
        "pretrain": True,
        "cem": True,
        "select": False,
        "posttrain": False,
        "evaluate": False,
    }


def test_iemocap_fixture_audio_decodes_without_ffmpeg(rehearsal_inputs):
    """The GPU machines have no FFmpeg: the IEMOCAP and SpeechCraft trees are soundfile-readable."""
    for tree in ("iemocap", "speechcraft"):
        wavs = list(Path(rehearsal_inputs[tree]).rglob("*.wav"))
        assert wavs
        for w in wavs:
            info = sf.info(str(w))
            assert info.samplerate == 16000 and info.channels == 1
    clips = list(Path(rehearsal_inputs["meld"]).rglob("*.mp4"))
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "a:0",
            "-show_entries",
            "stream=sample_rate,channels",
            "-of",
            "csv=p=0",
            str(clips[0]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "48000,6"


_LOAD = r"""
import json, sys, torch, numpy as np, soundfile as sf
import trustser
from transformers import AutoModel, AutoProcessor, pipeline
from peft import PeftModel
run, clip = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(run, dtype=torch.float32).eval()
pipe = pipeline("explainable-ser", model=run)
out = pipe(clip)
# LoRA: the merged weights at the root == the pre-trained SER-SLM + the post-training adapter
base = AutoModel.from_pretrained(run + "/pretrained", dtype=torch.float32)
lora = PeftModel.from_pretrained(base, run + "/adapter").eval()
proc = AutoProcessor.from_pretrained(run)
wav, sr = sf.read(clip, dtype="float32")
enc = proc(audio=[wav], captions=["hello"])
keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "energy", "f0")
inputs = {k: v for k, v in enc.items() if k in keys}
with torch.no_grad():
    a, b = model(**inputs).logits, lora(**inputs).logits
print(json.dumps({"type": type(model).__name__, "result": out, "cem": pipe.cem is not None, "cem_slm": pipe.cem_slm is not None,
                  "lora_maxdiff": float((a - b).abs().max()), "logit_scale": float(a.abs().max())}))
"""


def _clip(inputs) -> str:
    return str(sorted(Path(inputs["iemocap"]).glob("Session5/sentences/wav/*/*.wav"))[0])


def test_run_folder_loads_in_a_fresh_process(iemocap_run, rehearsal_inputs):
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, str(iemocap_run["run"]), _clip(rehearsal_inputs)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=iemocap_run["out"].parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["type"] == "SerSlmForConditionalGeneration"
    r = got["result"]
    # a 2-step model writes no parseable caption yet, so emotion/trust may be None; the parts are there
    assert r["error"] is None and isinstance(r["caption"], str) and r["caption"]
    assert {"emotion", "probabilities", "descriptors", "confidence", "trust", "transcription"} <= set(r)
    assert got["cem"] and got["cem_slm"]  # cem/ found, and the pre-trained SLM it was trained on (pretrained/)
    # merged bf16 weights vs base + adapter: equal up to bf16 rounding
    assert got["lora_maxdiff"] <= 0.02 * max(1.0, got["logit_scale"])


def test_moved_output_folder_explains_from_another_directory(iemocap_run, rehearsal_inputs, tmp_path):
    """Paths inside a run's output are relative to it: a moved copy explains and releases from any
    directory, reading its own files (the original is renamed away meanwhile)."""
    moved = tmp_path / "elsewhere" / "iemocap-out"
    shutil.copytree(iemocap_run["out"], moved, symlinks=False)
    results = json.loads((moved / "sys10-seed0" / "results.json").read_text())
    assert all(not Path(s["path"]).is_absolute() for s in results["stages"])
    assert (moved / "sys10-seed0" / results["stages"][1]["path"] / "STAGE.json").is_file()
    original = iemocap_run["out"]
    hidden = original.with_name(original.name + ".hidden")
    os.rename(original, hidden)
    try:
        cwd = tmp_path / "somewhere"
        cwd.mkdir()
        cli = [sys.executable, "-m", "trustser.cli"]
        proc = subprocess.run(
            [*cli, "explain", str(moved / "sys10-seed0"), _clip(rehearsal_inputs), "--no-progress"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
            cwd=cwd,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["error"] is None and row["caption"] and row["emotion"] in {"neutral", "happy", "angry", "sad", None}
        assert "trust" in row and "explained" in proc.stderr
        proc = subprocess.run(
            [*cli, "push", str(moved), "you/trustser-sys10-iemocap", "--export-dir", str(tmp_path / "release")],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
            cwd=cwd,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        release = tmp_path / "release"
        assert (release / "model.safetensors").is_file() and (release / "cem" / "config.json").is_file()
        assert (release / "controller" / "config.json").is_file() and not (release / "results.json").exists()
        assert json.loads((release / "config.json").read_text())["emotion_labels"]
    finally:
        os.rename(hidden, original)


def test_missing_model_is_one_line_naming_id_setting_and_fix(tmp_path, rehearsal_inputs):
    """Offline, a Hub id that is not cached ends the run at once with one line."""
    proc = launch_recipe(
        "iemocap_sys10.yaml",
        tmp_path / "out",
        {
            **rehearsal_inputs,
            "models": {**rehearsal_inputs["models"], "text_model": "meta-llama/Llama-3.1-8B-Instruct"},
        },
        "iemocap",
        tmp_path,
    )
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("trustser:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert "'meta-llama/Llama-3.1-8B-Instruct'" in line and "set by text_model (from the command line)" in line
    assert "offline" in line and "--text_model DIR" in line and "hf download meta-llama/Llama-3.1-8B-Instruct" in line
    assert not (tmp_path / "out" / "cache").exists() or not any((tmp_path / "out" / "cache").iterdir())


def test_gpu_rehearsal_script_cpu_safe_parts(tmp_path, rehearsal_inputs):
    """benchmarks/gpu_rehearsal.sh parses, reuses prepared inputs and, without a GPU, prints one
    JSON line per config saying so (the GPU part is run by hand: BENCHMARKS.md)."""
    import torch

    script = REPO / "benchmarks" / "gpu_rehearsal.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    configs = ["ddp", "zero2", "zero3", "fsdp"]
    for c in configs:
        assert (REPO / "recipes" / "accelerate_configs" / f"{c}.yaml").is_file()
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: run the script itself")
    (tmp_path / "inputs.json").write_text(json.dumps(rehearsal_inputs))
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(ENV, PYTHON=sys.executable),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [json.loads(l) for l in proc.stdout.strip().splitlines()]
    assert [l["config"] for l in lines] == configs
    assert all(l["error"] == "no CUDA GPU visible" and l["exit_status"] is None for l in lines)
    assert set(lines[0]) == {"config", "exit_status", "seconds", "peak_gpu_memory_mib", "metrics", "stages", "error"}
