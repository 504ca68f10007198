"""Issue 17: concurrent runs on one cache, existing output folders, edited corpora, exact resume,
bad audio and metadata found before training, checkpoints with missing weights. Each test
reproduces one defect the issue lists (docs/reliability.md maps promises to tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


class SingleProcess(SimpleNamespace):
    is_main_process = True
    num_processes = 1

    def wait_for_everyone(self):
        pass

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------
# 1. Two runs on one cache: a lock per stage
# ------------------------------------------------------------------------------------------
_STAGE_RUN = """
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
from trustser.stages import StageRunner

class P(SimpleNamespace):
    is_main_process = True
    def wait_for_everyone(self): pass

cache, log, seconds, kill = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "kill"

def fn(out):
    with log.open("a") as fh:
        fh.write(f"start {os.getpid()}\\n")
    (out / "half.bin").write_bytes(b"x" * 100)
    if kill:
        Path(str(log) + ".ready").write_text("1")
        time.sleep(600)  # SIGKILLed here by the test
    time.sleep(seconds)
    assert (out / "half.bin").read_bytes() == b"x" * 100, "another run touched this run's partial folder"
    (out / "model.bin").write_text(str(os.getpid()))

stage = StageRunner(cache, P()).run("pretrain", {"steps": 3}, fn)
print(json.dumps({"path": str(stage.path), "reused": stage.reused, "files": sorted(p.name for p in stage.path.iterdir())}))
"""


def _stage_proc(tmp_path, log, seconds=0.0, kill=False):
    script = tmp_path / "stage_run.py"
    script.write_text(_STAGE_RUN)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "cache"), str(log), str(seconds), "kill" if kill else "-"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_runs_of_one_stage_compute_it_once_and_keep_each_others_work(tmp_path):
    """Two processes start the same stage together: one computes it while the other waits (and
    deletes nothing); the second then reuses the finished stage instead of replacing it."""
    log = tmp_path / "calls.log"
    procs = [_stage_proc(tmp_path, log, seconds=3.0) for _ in range(2)]
    results = [_result(p) for p in procs]
    assert len(log.read_text().splitlines()) == 1  # computed once
    assert sorted(r["reused"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["files"] == ["STAGE.json", "half.bin", "model.bin"]
    assert not list((tmp_path / "cache").glob(".pretrain-*.partial"))


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    """A run SIGKILLed inside a stage leaves its lock file and partial folder; a run waiting for it
    (and a later one) takes the stage over and finishes it, without the killed run's leftovers."""
    log = tmp_path / "calls.log"
    first = _stage_proc(tmp_path, log, kill=True)
    deadline = time.time() + 60
    while not Path(str(log) + ".ready").exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
        time.sleep(0.1)
    waiting = _stage_proc(tmp_path, log, seconds=0.0)
    time.sleep(2.0)
    assert waiting.poll() is None  # blocked on the first run's lock
    assert len(log.read_text().splitlines()) == 1
    first.send_signal(signal.SIGKILL)
    first.wait()
    res = _result(waiting)
    assert res["reused"] is False and res["files"] == ["STAGE.json", "half.bin", "model.bin"]
    assert len(log.read_text().splitlines()) == 2
    lock = json.loads(next((tmp_path / "cache").glob(".pretrain-*.lock")).read_text())
    assert lock["pid"] == waiting.pid and lock["host"]


def test_stage_lock_names_the_holder_and_waits(tmp_path, caplog):
    """In one process: a second runner blocks on the first's lock; its log says who holds it."""
    import threading

    from trustser.stages import StageRunner

    entered, release, order = threading.Event(), threading.Event(), []

    def slow(out):
        entered.set()
        release.wait(30)
        order.append("first done")
        (out / "v.txt").write_text("1")

    t = threading.Thread(target=lambda: StageRunner(tmp_path, SingleProcess()).run("cem", {"a": 1}, slow))
    t.start()
    entered.wait(30)
    second = []
    caplog.set_level("INFO", logger="trustser.stages")
    t2 = threading.Thread(
        target=lambda: second.append(
            StageRunner(tmp_path, SingleProcess()).run("cem", {"a": 1}, lambda o: order.append("second ran"))
        )
    )
    t2.start()
    time.sleep(0.5)
    release.set()
    t.join(30)
    t2.join(30)
    assert order == ["first done"] and second[0].reused
    assert any(
        "being computed by another run" in r.getMessage() and f"pid {os.getpid()}" in r.getMessage()
        for r in caplog.records
    )


# ------------------------------------------------------------------------------------------
# 3. Stage keys follow the input data
# ------------------------------------------------------------------------------------------
def test_data_fingerprint_follows_metadata_and_audio(tmp_path):
    from trustser.stages import StageRunner, data_fingerprint

    root = tmp_path / "corpus"
    (root / "train").mkdir(parents=True)
    meta = root / "train" / "metadata.csv"
    meta.write_text("file_name,emotion\na.wav,happy\n")
    sf.write(root / "train" / "a.wav", np.zeros(1600, np.float32), 16000)
    fp = data_fingerprint(root)
    assert fp == data_fingerprint(root)
    st = meta.stat()
    meta.write_text("file_name,emotion\na.wav,angry\n")  # one label fixed, same size and mtime
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_fingerprint(root) != fp
    fp2 = data_fingerprint(root)
    sf.write(root / "train" / "a.wav", np.zeros(3200, np.float32), 16000)  # a clip replaced
    assert data_fingerprint(root) != fp2
    fp3 = data_fingerprint(root)
    (root / ".cache").mkdir()
    (root / ".cache" / "x").write_text("ignored")
    assert data_fingerprint(root) == fp3
    runner = StageRunner(tmp_path / "cache", SingleProcess())
    assert runner.input_settings(root) == {"data": fp3}
    inside = runner.cache_dir / "corpus-abc" / "corpus"
    inside.mkdir(parents=True)
    assert runner.input_settings(inside) == {}  # a stage's output: its key already says what it holds


# ------------------------------------------------------------------------------------------
# 2. Commands refuse to replace a folder they did not write, unless --overwrite
# ------------------------------------------------------------------------------------------
def _foreign(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("keep me")
    return folder


def _fake_synthetic(root: Path) -> Path:
    """The layout the issue's probe destroyed: manifest, metadata, audio and a user's notes."""
    (root / "train" / "wav").mkdir(parents=True)
    sf.write(root / "train" / "wav" / "u0.wav", np.zeros(1600, np.float32), 16000)
    (root / "train" / "metadata.csv").write_text("id,file_name\nu0,wav/u0.wav\n")
    (root / "manifest.json").write_text("{}")
    return _foreign(root)


def test_annotate_refuses_to_replace_its_input_or_a_foreign_folder(tmp_path, capsys):
    from trustser.cli import main

    corpus = _fake_synthetic(tmp_path / "corpus")
    before = sorted(p.relative_to(corpus) for p in corpus.rglob("*"))
    for extra in ([], ["--overwrite"]):  # replacing the input is refused even with --overwrite
        assert main(["annotate", "synthetic", str(corpus), "--out", str(corpus), "--split", "train", *extra]) == 1
        assert "replacing it would delete the input" in capsys.readouterr().err
    assert (
        main(["annotate", "synthetic", str(corpus / "train"), "--out", str(corpus)]) == 1
    )  # a folder holding the input
    assert "holds the input" in capsys.readouterr().err
    other = _foreign(tmp_path / "other")
    assert main(["annotate", "synthetic", str(corpus), "--out", str(other), "--split", "train"]) == 1
    err = capsys.readouterr().err
    assert (
        f"--out {other}: exists and was not written by this command (no annotation.json)" in err
        and "--overwrite" in err
    )
    assert sorted(p.relative_to(corpus) for p in corpus.rglob("*")) == before
    assert (other / "notes.txt").read_text() == "keep me" and (corpus / "notes.txt").read_text() == "keep me"


def test_annotate_overwrite_replaces_and_reruns_replace_their_own_output(tmp_path, capsys):
    from faults_helpers import write_corpus

    from trustser.cli import main

    corpus = write_corpus(tmp_path / "corpus", n_train=4, n_test=2, n_reference=8)
    out = _foreign(tmp_path / "annotated")
    args = [
        "annotate",
        "audiofolder",
        str(corpus),
        "--corpus-options",
        '{"text_column": "text"}',
        "--out",
        str(out),
        "--split",
        "train",
        "--num-proc",
        "1",
        "--gender-backend",
        "reference",
        "--age-backend",
        "reference",
    ]
    assert main(args) == 1 and (out / "notes.txt").exists()
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert (
        not (out / "notes.txt").exists()
        and (out / "annotation.json").is_file()
        and (out / "dataset_dict.json").is_file()
    )
    assert main(args) == 0  # its own earlier output: replaced without --overwrite
    assert json.loads((out / "annotation.json").read_text())["splits"]["train"]["rows"] == 4


def test_select_and_push_refuse_foreign_folders(tmp_path, capsys):
    from trustser.cli import main

    data = _foreign(tmp_path / "data")
    out = _foreign(tmp_path / "out")
    base = [
        "select",
        "--cem",
        str(tmp_path / "cem"),
        "--slm",
        str(tmp_path / "slm"),
        "--data",
        str(data),
        "--ratio",
        "0.5",
    ]
    assert main([*base, "--out", str(out)]) == 1
    assert "no selection_stats.json" in capsys.readouterr().err
    assert main([*base, "--out", str(data), "--overwrite"]) == 1
    assert "replacing it would delete the input" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--overwrite"]) == 1  # past the guard: the missing models are the error now
    assert "not a dataset saved with save_to_disk" in capsys.readouterr().err
    run = _foreign(tmp_path / "run")
    assert main(["push", str(run), "user/repo", "--export-dir", str(out)]) == 1
    assert "--export-dir" in (err := capsys.readouterr().err) and "no trustser_results.json" in err
    assert main(["push", str(run), "user/repo", "--export-dir", str(run / "sub" / ".."), "--overwrite"]) == 1
    assert "replacing it would delete the input" in capsys.readouterr().err
    for d in (data, out, run):
        assert (d / "notes.txt").read_text() == "keep me"


def test_check_output_dir_accepts_new_empty_and_own_folders(tmp_path):
    from trustser.utils import check_output_dir

    assert check_output_dir(tmp_path / "new", marker="m.json") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", marker="m.json")
    own = _foreign(tmp_path / "own")
    (own / "m.json").write_text("{}")
    check_output_dir(own, marker="m.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_output_dir(tmp_path / "file", marker="m.json")
    check_output_dir(tmp_path / "file", marker="m.json", overwrite=True)


def test_synth_overwrite_replaces_a_foreign_folder_only_when_asked(tmp_path, capsys):
    import shutil

    from trustser.cli import main

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = _foreign(tmp_path / "corpus")
    assert main(["synth", str(out), "--size", "small", "--num-proc", "2"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "notes.txt").exists()
    assert main(["synth", str(out), "--size", "small", "--num-proc", "2", "--overwrite"]) == 0
    assert (out / "manifest.json").is_file() and not (out / "notes.txt").exists()
    assert not list(tmp_path.glob(".corpus.replaced-*"))


# ------------------------------------------------------------------------------------------
# 4. Exact resume: augmentation generator, pending metrics and loss accumulator in the checkpoint
# ------------------------------------------------------------------------------------------
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


class _DieAtStep5:
    """Interrupts training after step 5's update (checkpoint-4 is the last complete one)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Die(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 5:
                    raise KeyboardInterrupt("killed after step 5")

        return Die()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from faults_helpers import save_tiny_model

    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _trainer(kind: str, model_dir: Path, out: Path):
    import datasets
    from ser_slm_fixtures import make_rows

    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=3,
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        learning_rate=3e-3,
    )
    model = SerSlmForConditionalGeneration.from_pretrained(model_dir)
    processor = SerSlmProcessor.from_pretrained(model_dir)
    train = datasets.Dataset.from_list(make_rows(12))  # 3 batches an epoch: checkpoint-4 is inside epoch 2
    if kind == "pretrain":
        from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer

        args = SerSlmSFTConfig(channel_augmentation=1.0, **common)
        return SerSlmSFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    from trustser.trainers.rectify import SedRectifyTrainer
    from trustser.trainers.rectify_config import SedRectifyConfig

    args = SedRectifyConfig(
        num_policies=2,
        controller_n_mels=16,
        controller_hidden_size=16,
        controller_embedding_size=4,
        sed_source="auto",
        **common,
    )
    return SedRectifyTrainer(model=model, args=args, train_dataset=train, processing_class=processor)


@pytest.mark.parametrize("kind", ["pretrain", "posttrain"])
def test_resumed_training_equals_the_uninterrupted_run(kind, tiny_model, tmp_path):
    """Pre-training with channel augmentation (every utterance) and RL-rectified post-training,
    interrupted after step 5 and resumed from checkpoint-4 (inside an epoch, logs every 3 steps):
    the same weights and the same log history, figures of the step-6 log included, as a run that
    was never interrupted."""
    import torch

    from trustser.report import rectification_summary
    from trustser.trainers.sft import TRAINING_STATE

    ref = _trainer(kind, tiny_model, tmp_path / "ref")
    ref.train()
    cut = _trainer(kind, tiny_model, tmp_path / "cut")
    cut.add_callback(_DieAtStep5())
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    saved = json.loads((tmp_path / "cut" / "checkpoint-4" / TRAINING_STATE.format(rank=0)).read_text())
    assert saved["metrics"] and saved["globalstep_last_logged"] == 3
    assert (saved["augmentation"] is not None) == (kind == "pretrain")
    resumed = _trainer(kind, tiny_model, tmp_path / "cut")
    resumed.train(resume_from_checkpoint=True)

    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    strip = lambda h: [{k: v for k, v in e.items() if k not in TIMING} for e in h]
    assert strip(resumed.state.log_history) == strip(ref.state.log_history)
    assert [e["step"] for e in ref.state.log_history if "loss" in e] == [3, 6]
    if kind == "posttrain":
        ca, cb = ref.controller.state_dict(), resumed.controller.state_dict()
        assert [k for k in ca if not torch.equal(ca[k], cb[k])] == []
        summary = rectification_summary(resumed.state.log_history)
        assert (
            summary and "rectify/label_accuracy" in summary and summary == rectification_summary(ref.state.log_history)
        )


# ------------------------------------------------------------------------------------------
# 6. Checkpoints with missing or unexpected weights are refused
# ------------------------------------------------------------------------------------------
def _rename_tensor(weights: Path, old_part: str, new_part: str) -> list[str]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    renamed = [k for k in tensors if old_part in k]
    save_file({k.replace(old_part, new_part): v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    return renamed


def test_from_pretrained_refuses_missing_or_unexpected_weights(tiny_model, tmp_path, capsys):
    import shutil

    import torch

    from trustser.cli import main
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
    from trustser.models.ser_slm import SerSlmForConditionalGeneration

    slm = tmp_path / "slm"
    shutil.copytree(tiny_model, slm)
    renamed = _rename_tensor(slm / "model.safetensors", "model.projector.", "model.projector_v2.")
    assert renamed
    with pytest.raises(
        ValueError,
        match=r"slm: not a complete SerSlmForConditionalGeneration checkpoint: \d+ missing weight\(s\) "
        r"\['model\.projector\.linear_1.*unexpected weight\(s\) \['model\.projector_v2",
    ):
        SerSlmForConditionalGeneration.from_pretrained(slm)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.float32) + 0.01, 16000)
    assert main(["explain", str(slm), str(wav)]) == 1  # was: exit 0 with explanations from a random projector
    assert "missing weight" in capsys.readouterr().err

    torch.manual_seed(0)
    for model, part in (
        (CemModel(CemConfig(input_size=8)), "layer1"),
        (SedControllerModel(SedControllerConfig()), None),
    ):
        d = tmp_path / type(model).__name__
        model.save_pretrained(d)
        assert type(model).from_pretrained(d) is not None  # a complete checkpoint loads
        from safetensors.torch import load_file

        first = part or sorted(load_file(str(d / "model.safetensors")))[0].rsplit(".", 1)[0]
        _rename_tensor(d / "model.safetensors", first, first + "_old")
        with pytest.raises(
            ValueError, match=rf"{type(model).__name__}: not a complete {type(model).__name__} checkpoint: .*missing"
        ):
            type(model).from_pretrained(d)
    # a complete checkpoint loads, with the loading report when asked for
    model, info = SerSlmForConditionalGeneration.from_pretrained(tiny_model, output_loading_info=True)
    assert (
        isinstance(model, SerSlmForConditionalGeneration) and not info["missing_keys"] and not info["unexpected_keys"]
    )


# ------------------------------------------------------------------------------------------
# 5. Bad audio and metadata found at load time
# ------------------------------------------------------------------------------------------
def _bad_clips(d: Path, prefix: str = "") -> dict[str, str]:
    """Clip name -> the reason validate_audio gives (None: a good clip)."""
    from ser_slm_fixtures import tone

    sf.write(d / f"{prefix}good.wav", tone(1.0, 180.0, 0.3), 16000)
    (d / f"{prefix}empty.wav").write_bytes(b"")
    (d / f"{prefix}corrupt.wav").write_bytes(b"RIFF" + b"\x00junk" * 40)
    sf.write(d / f"{prefix}silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / f"{prefix}long.wav", tone(3.0, 150.0, 0.3), 16000)
    nan = tone(1.0, 180.0, 0.3)
    nan[10:20] = np.nan
    sf.write(d / f"{prefix}nan.wav", nan, 16000, subtype="FLOAT")
    reasons = {
        "good": None,
        "empty": "empty file",
        "corrupt": "unreadable audio",
        "silent": "silent",
        "long": "longer than 2 s (3.0 s)",
        "nan": "non-finite",
    }
    return {f"{prefix}{k}.wav": v for k, v in reasons.items()}


def test_load_corpus_check_audio_names_and_skips_bad_clips_in_every_split(tmp_path):
    from trustser.data import corpus_stats, load_corpus

    root = tmp_path / "corpus"
    for split in ("reference", "train"):
        (root / split).mkdir(parents=True)
        clips = _bad_clips(root / split, prefix=split)
        lines = ["file_name,emotion"] + [f"{c},happy" for c in clips] + [f"{split}gone.wav,sad"]
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    kept = load_corpus("audiofolder", root, cache_dir=tmp_path / "c")  # as before: only the absent file is left out
    assert {s: len(ds) for s, ds in kept.items()} == {"reference": 6, "train": 6}
    dd = load_corpus("audiofolder", root, check_audio=True, max_audio_seconds=2, cache_dir=tmp_path / "c")
    assert {s: list(ds["id"]) for s, ds in dd.items()} == {"reference": ["referencegood"], "train": ["traingood"]}
    stats = corpus_stats(dd["train"])
    assert stats["splits"] == {"reference": 1, "train": 1} and len(stats["missing_audio"]) == 2
    bad = stats["bad_audio"]
    assert len(bad) == 10
    for split in ("reference", "train"):
        for clip, reason in _bad_clips(root / split, prefix=split).items():
            if reason:
                assert any(b.startswith(str((root / split / clip).resolve()) + ": " + reason) for b in bad), (clip, bad)
    assert dd["train"][0]["audio"] is not None  # still decodable audio after the check


def test_recipe_pretraining_skips_an_empty_wav_instead_of_dying_midway(tmp_path, caplog):
    """The issue's probe: one empty wav in the pre-training split killed training mid-run with a raw
    decoder error from inside ``datasets``; the pre-training stage now names and skips it."""
    from faults_helpers import write_corpus

    from trustser.recipe import stage_pretrain
    from trustser.recipe_config import RecipeConfig
    from trustser.stages import StageRunner
    from trustser.systems import get_system

    root = write_corpus(tmp_path / "corpus", n_train=4, n_test=2, n_reference=8)
    (root / "reference" / "empty.wav").write_bytes(b"")
    with (root / "reference" / "metadata.csv").open("a") as fh:
        fh.write("empty.wav,sad,The train leaves at nine tonight.,s0,male,child\n")
    cfg = RecipeConfig(
        output_dir=str(tmp_path / "out"),
        pretrain_corpus="audiofolder",
        pretrain_root=str(root),
        target_corpus="audiofolder",
        target_root=str(root),
        pretrain_split="reference",
        pretrain_max_steps=3,
        text_prior_steps=2,
        per_device_batch_size=3,
        cpu_threads=1,
    )
    caplog.set_level("WARNING", logger="trustser.data")
    stage = stage_pretrain(
        StageRunner(tmp_path / "out" / "cache", SingleProcess()),
        cfg,
        get_system("sys1"),
        str(root),
        annotated=None,
        sed_source="truth",
        upstream=[],
    )
    assert (stage.path / "model" / "model.safetensors").is_file()
    assert any("empty.wav: empty file" in r.getMessage() for r in caplog.records)
    assert json.loads((stage.path / "log_history.json").read_text())[-1]["step"] == 3


def _synthetic_layout(root: Path, rows: list[str], *, with_wavs: bool = True) -> Path:
    header = "file_name,id,text,emotion,speaker,group,gender,age,pitch,volume,speed,pitch_z,volume_z,speed_z"
    (root / "train" / "wav").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    (root / "train" / "metadata.csv").write_bytes(("\n".join([header, *rows]) + "\n").encode("utf-8"))
    for r in rows:
        sf.write(root / "train" / r.split(",")[0], np.full(1600, 0.1, np.float32), 16000)
    return root / "train" / "metadata.csv"


ROW = (
    "wav/u{i}.wav,u{i},Hello there.,{emotion},spk0,female/young adult,female,young adult,normal,high,slow,0.1,0.2,-0.3"
)


def test_synthetic_loader_flags_missing_wavs_unknown_labels_and_bad_text(tmp_path):
    from trustser.data import corpus_stats, load_corpus

    meta = _synthetic_layout(
        tmp_path / "a", [ROW.format(i=i, emotion=e) for i, e in enumerate(["happy", "sad", "angry"])]
    )
    (meta.parent / "wav" / "u1.wav").unlink()  # crashed annotation at the final save before
    dd = load_corpus("synthetic", meta.parent.parent, splits=["train"])
    assert list(dd["train"]["id"]) == ["u0", "u2"]
    assert corpus_stats(dd)["missing_audio"] == [str(meta.parent / "wav" / "u1.wav")]

    meta = _synthetic_layout(tmp_path / "b", [ROW.format(i=0, emotion="happy"), ROW.format(i=1, emotion="joyful")])
    with pytest.raises(ValueError, match=rf"{meta}:3: unknown label\(s\) emotion 'joyful'.*on_unknown='skip'"):
        load_corpus("synthetic", meta.parent.parent, splits=["train"])  # was: trained on silently
    dd = load_corpus("synthetic", meta.parent.parent, splits=["train"], on_unknown="skip")
    assert list(dd["train"]["id"]) == ["u0"] and corpus_stats(dd)["unknown_labels"] == {"joyful": 1}
    bad_pitch = ROW.format(i=2, emotion="sad").replace(",normal,high,", ",squeaky,high,")
    meta = _synthetic_layout(tmp_path / "c", [ROW.format(i=0, emotion="happy"), bad_pitch])
    with pytest.raises(ValueError, match=rf"{meta}:3: unknown label\(s\) pitch 'squeaky'"):
        load_corpus("synthetic", meta.parent.parent, splits=["train"])

    meta = _synthetic_layout(tmp_path / "d", [ROW.format(i=0, emotion="happy"), ROW.format(i=1, emotion="sad")])
    meta.write_bytes(meta.read_bytes().replace(b"Hello there.,sad", b"Hell\xf6 there.,sad"))
    with pytest.raises(ValueError, match=rf"{meta}:3: not valid UTF-8"):  # was: a UnicodeDecodeError naming no file
        load_corpus("synthetic", meta.parent.parent, splits=["train"])


def test_audiofolder_reads_only_the_bad_line_in_another_encoding(tmp_path):
    """One stray cp1252 byte used to make the whole CSV decode as cp1252 (mojibake in every
    accented transcript); now only that line is, and the note names it."""
    from trustser.data import corpus_stats, load_corpus

    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", np.full(1600, 0.1, np.float32), 16000)
    text = (
        "file_name,emotion,text\n".encode()
        + "a.wav,happy,Très bien café\n".encode("utf-8")
        + "b.wav,sad,Na\xefve\n".encode("cp1252")
        + "c.wav,angry,Zoë\n".encode("utf-8")
    )
    (tmp_path / "metadata.csv").write_bytes(text)
    dd = load_corpus("audiofolder", tmp_path, text_column="text", cache_dir=tmp_path / "c")
    assert list(dd["train"]["text"]) == ["Très bien café", "Na\u00efve", "Zoë"]
    assert any("line(s) [3]" in n and "cp1252" in n for n in corpus_stats(dd)["notes"])


def test_iemocap_unknown_code_is_an_error_naming_the_line(tmp_path):
    from fixtures_real import build_iemocap

    from trustser.data import corpus_stats, load_corpus

    fx = build_iemocap(tmp_path / "iemocap")
    eva = next((fx["root"] / "Session2" / "dialog" / "EmoEvaluation").glob("*.txt"))
    lines = eva.read_text().split("\n")
    i = next(k for k, l in enumerate(lines) if l.startswith("["))
    parts = lines[i].split("\t")
    lines[i] = "\t".join([parts[0], parts[1], "zzz", *parts[3:]])
    eva.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"{eva}:{i + 1}: unknown IEMOCAP emotion label 'zzz'"):
        load_corpus("iemocap", fx["root"], cache_dir=tmp_path / "c")
    dd = load_corpus("iemocap", fx["root"], on_unknown="skip", cache_dir=tmp_path / "c")
    assert corpus_stats(dd)["unknown_labels"] == {"zzz": 1}


def test_edited_corpus_is_annotated_afresh(tmp_path):
    """Stage keys used to hash the corpus path only: after fixing a label in metadata.csv every
    stage was reused with the old label. The annotation stage now reruns and sees the new one."""
    import datasets
    from faults_helpers import write_corpus

    from trustser.recipe import stage_annotate
    from trustser.recipe_config import RecipeConfig
    from trustser.stages import StageRunner

    root = write_corpus(tmp_path / "corpus", n_train=4, n_test=2, n_reference=8)
    cfg = RecipeConfig(
        output_dir=str(tmp_path / "out"),
        target_corpus="audiofolder",
        target_root=str(root),
        target_options={"text_column": "text"},
        annotation_num_proc=1,
        cpu_threads=1,
    )
    runner = StageRunner(tmp_path / "out" / "cache", SingleProcess())
    first = stage_annotate(runner, cfg, str(root), [])
    assert stage_annotate(runner, cfg, str(root), []).reused  # unchanged: reused
    meta = root / "train" / "metadata.csv"
    lines = meta.read_text().split("\n")
    old = lines[1].split(",")[1]
    lines[1] = lines[1].replace(f",{old},", ",sad," if old != "sad" else ",happy,", 1)
    meta.write_text("\n".join(lines))
    second = stage_annotate(runner, cfg, str(root), [])
    assert not second.reused and second.key != first.key
    new = datasets.load_from_disk(str(second.path / "data"))["train"]
    assert new[0]["emotion"] != old and datasets.load_from_disk(str(first.path / "data"))["train"][0]["emotion"] == old


# ------------------------------------------------------------------------------------------
# 1b. Two whole recipe runs started together on one --output_dir
# ------------------------------------------------------------------------------------------
_RECIPE_RUN = """
import json, sys
from trustser.recipe import run_system
from trustser.recipe_config import RecipeConfig
res = run_system(RecipeConfig(**json.loads(sys.argv[1])))
print("RESULT " + json.dumps({"stages": res["stages"], "test": res["test"]}))
"""


def _recipe_cfg(out: Path, corpus: Path, system: str) -> dict:
    return dict(
        system=system,
        output_dir=str(out),
        target_root=str(corpus),
        pretrain_root=str(corpus),
        synth_size="small",
        pretrain_max_steps=4,
        text_prior_steps=2,
        posttrain_max_steps=2,
        per_device_batch_size=4,
        max_eval_samples=8,
        tsne_samples=16,
        eval_batch_size=8,
        annotation_num_proc=1,
        cpu_threads=1,
    )


def _recipe_together(tmp_path, out: Path, corpus: Path, systems: list[str]) -> list[dict]:
    script = tmp_path / "recipe_run.py"
    script.write_text(_RECIPE_RUN)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(_recipe_cfg(out, corpus, s))],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in systems
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=3000)
        assert p.returncode == 0, stderr[-4000:]
        results.append(json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:]))
    return results


@pytest.mark.slow
def test_two_recipe_runs_started_together_compute_each_stage_once(tmp_path, synthetic_small):
    """Two runs on one --output_dir, started together, of the same system and of two systems that
    share stages: both finish, each shared stage is computed once (the other run reuses it), nothing
    is left half done, and the results equal runs made alone."""
    from trustser.recipe import run_system
    from trustser.recipe_config import RecipeConfig

    alone = {
        s: run_system(RecipeConfig(**_recipe_cfg(tmp_path / "alone", synthetic_small, s))) for s in ("sys4", "sys3")
    }
    for name, systems in (("same", ["sys4", "sys4"]), ("different", ["sys4", "sys3"])):
        out = tmp_path / name
        results = _recipe_together(tmp_path, out, synthetic_small, systems)
        cache = out / "cache"
        assert not list(cache.glob(".*.partial")), sorted(p.name for p in cache.iterdir())
        for stage in ("annotate", "pretrain", "posttrain"):
            folders = list(cache.glob(f"{stage}-*"))
            assert len(folders) == 1 and (folders[0] / "STAGE.json").is_file(), (stage, folders)
        assert (next(cache.glob("posttrain-*")) / "model" / "model.safetensors").is_file()
        assert (next(cache.glob("annotate-*")) / "data" / "dataset_dict.json").is_file()
        for stage in ("annotate", "pretrain"):  # computed by one run, reused by the other
            assert sorted(next(s["reused"] for s in r["stages"] if s["name"] == stage) for r in results) == [
                False,
                True,
            ]
        for system, r in zip(systems, results):
            assert r["test"] == alone[system]["test"], (name, system)


@pytest.mark.slow
def test_stage_lock_under_two_processes(tmp_path):
    """Under ``accelerate launch`` (two gloo CPU processes) the main process takes the lock, the
    other recognises its run's lock by the broadcast run id; both agree on computing and reusing."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate_configs/cpu.yaml"),
        "--main_process_port",
        "29533",
        str(REPO / "tests" / "stage_two_ranks.py"),
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=dict(ENV, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["num_processes"] for s in seen] == [2, 2] and seen[0]["run_id"] == seen[1]["run_id"]
    assert (
        seen[0]["stages"]
        == seen[1]["stages"]
        == [
            ["pretrain", False, ["STAGE.json", "from_rank0.txt", "from_rank1.txt"]],
            ["pretrain", True, ["STAGE.json", "from_rank0.txt", "from_rank1.txt"]],
            ["cem", False, ["STAGE.json", "from_rank0.txt"]],
        ]
    )
