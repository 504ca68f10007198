"""Fault injection (issue 9): interrupted runs, several processes, bad input, half-written outputs,
safe loading. Every test here carries the ``faults`` marker (``pytest -m faults``); the long ones
are also ``slow`` (outside the default run, in CI's ``pytest -m slow``). Bad-input cases that other
modules already test are marked ``faults`` where they are (see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from faults_helpers import nested_equal, safetensors_equal, save_tiny_model, write_corpus

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


# ------------------------------------------------------------------------------------------
# 1. SIGKILL between checkpoints, then --resume_from_checkpoint through the fine-tuning recipe
# ------------------------------------------------------------------------------------------
def _finetune_config(path: Path, model: Path, corpus: Path, out: Path) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
        model: {model}
        corpus: audiofolder
        corpus_root: {corpus}
        corpus_options: {{label_column: emotion, text_column: text, speaker_column: speaker}}
        emotion_labels: [neutral, happy, angry, sad]
        annotation_method: speechcraft
        selection_ratio: null
        rectify: true
        num_policies: 2
        max_steps: 6
        save_steps: 2
        per_device_batch_size: 4
        learning_rate: 1.0e-3
        eval_batch_size: 4
        max_eval_samples: 4
        tsne_samples: 4
        output_dir: {out}
        seed: 0
        """)
    )
    return path


# Runs the recipe script unchanged, with one callback that stops the training after step 5 (the
# last complete checkpoint is checkpoint-4, step 5's update is done and lost) so the test can
# SIGKILL it there.
_PAUSING_RUN = """
import runpy, sys, time
from transformers import TrainerCallback
import trustser.trainers.rectify as R

SENTINEL = sys.argv[1]

class Pause(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:
            with open(SENTINEL, "w") as fh:
                fh.write("5")
            time.sleep(600)

init = R.SedRectifyTrainer.__init__
def patched(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Pause())
R.SedRectifyTrainer.__init__ = patched
script = sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def _recipe(config: Path, *extra: str, cwd: Path):
    cmd = [sys.executable, str(REPO / "recipes" / "finetune_new_corpus.py"), "--config", str(config), *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _posttrain_dir(out: Path, finished: bool = True) -> Path:
    pattern = "posttrain-*" if finished else ".posttrain-*.partial"
    found = sorted((out / "cache").glob(pattern))
    assert len(found) == 1, (pattern, sorted(p.name for p in (out / "cache").iterdir()))
    return found[0]


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_is_bit_exact(tmp_path):
    """A rectified fine-tuning run killed with SIGKILL after step 5 (checkpoints every 2 steps) and
    resumed with ``--resume_from_checkpoint`` ends with the same SER-SLM weights, controller
    weights, SLM optimizer (optimizer.pt) and controller optimizer (controller_optimizer.safetensors)
    as an uninterrupted run with the same seed: bit-exact on CPU."""
    corpus = write_corpus(tmp_path / "corpus")
    model = save_tiny_model(tmp_path / "released")
    ref_cfg = _finetune_config(tmp_path / "ref.yaml", model, corpus, tmp_path / "ref")
    cut_cfg = _finetune_config(tmp_path / "cut.yaml", model, corpus, tmp_path / "cut")

    # the interrupted run: wait for checkpoint-4 to be complete and step 5 done, then SIGKILL
    (tmp_path / "pause.py").write_text(_PAUSING_RUN)
    sentinel = tmp_path / "step5"
    cmd = [
        sys.executable,
        str(tmp_path / "pause.py"),
        str(sentinel),
        str(REPO / "recipes" / "finetune_new_corpus.py"),
        "--config",
        str(cut_cfg),
    ]
    log = open(tmp_path / "cut.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while not sentinel.exists():
            assert proc.poll() is None, (tmp_path / "cut.log").read_text()[-5000:]
            assert time.time() < deadline, "the interrupted run did not reach step 5"
            time.sleep(0.5)
        partial = _posttrain_dir(tmp_path / "cut", finished=False)
        ckpts = partial / "trainer"
        assert (ckpts / "checkpoint-4" / "trustser_checkpoint.json").is_file()
        assert not (ckpts / "checkpoint-6").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    # the killed stage is not taken for a finished one, and there are no results
    assert not list((tmp_path / "cut" / "cache").glob("posttrain-*"))
    assert not (tmp_path / "cut" / "finetune-seed0" / "results.json").exists()
    # a kill during the next save would have left a checkpoint folder without its completion record
    half = ckpts / "checkpoint-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half-written")

    resumed = _recipe(cut_cfg, "--resume_from_checkpoint", cwd=tmp_path)
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    _recipe(ref_cfg, cwd=tmp_path)

    a, b = _posttrain_dir(tmp_path / "ref"), _posttrain_dir(tmp_path / "cut")
    for rel in (
        "model/model.safetensors",
        "controller/model.safetensors",
        "trainer/checkpoint-6/model.safetensors",
        "trainer/checkpoint-6/controller/model.safetensors",
        "trainer/checkpoint-6/controller_optimizer.safetensors",
        "trainer/checkpoint-6/controller_rng_0.safetensors",
    ):
        assert safetensors_equal(a / rel, b / rel) == [], rel
    assert json.loads((a / "trainer/checkpoint-6/controller_optimizer.json").read_text()) == json.loads(
        (b / "trainer/checkpoint-6/controller_optimizer.json").read_text()
    )
    opt_a = torch.load(a / "trainer/checkpoint-6/optimizer.pt", weights_only=True)
    opt_b = torch.load(b / "trainer/checkpoint-6/optimizer.pt", weights_only=True)
    assert opt_a["state"] and nested_equal(opt_a, opt_b) == []
    assert int(opt_b["state"][0]["step"]) == 6
    res = json.loads((tmp_path / "cut" / "finetune-seed0" / "results.json").read_text())
    assert {s["name"]: s["reused"] for s in res["stages"]} == {"annotate": True, "pretrain": True, "posttrain": False}


# ------------------------------------------------------------------------------------------
# 2. Two processes: identical controllers on both ranks
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_cpu_processes_keep_identical_controllers(tmp_path):
    """Two gloo CPU processes under ``accelerate launch --config_file recipes/accelerate_configs/cpu.yaml``:
    each rank samples its own policies, the controller gradients are averaged, so both ranks end
    with the same controller, which did learn; both log the documented metrics with the same values.

    Launched exactly as users do, with ``recipes/accelerate_configs/cpu.yaml`` (torchrun's launcher
    with ``use_cpu``), and checks that two processes really ran."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate_configs/cpu.yaml"),
        "--main_process_port",
        "29517",
        str(REPO / "tests" / "rectify_two_ranks.py"),
        str(out),
    ]
    env = dict(ENV, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    logs = [json.loads((out / f"log_rank{r}.json").read_text()) for r in (0, 1)]
    assert [l["num_processes"] for l in logs] == [2, 2]
    assert safetensors_equal(out / "controller_init_rank0.safetensors", out / "controller_init_rank1.safetensors") == []
    assert (
        safetensors_equal(out / "controller_final_rank0.safetensors", out / "controller_final_rank1.safetensors") == []
    )
    assert (
        safetensors_equal(out / "controller_init_rank0.safetensors", out / "controller_final_rank0.safetensors") != []
    )
    documented = [
        "lm_loss",
        "kl_loss",
        "emotion_ce",
        "reward/mean",
        "reward/std",
        "controller/loss",
        "controller/entropy",
        "controller/clip_fraction",
        "rectify/label_accuracy",
        "rectify/annotation_accuracy",
        *[f"rectify/modify_rate_{f}" for f in ("pitch", "volume", "speed", "gender", "age")],
    ]
    steps = [[{k: h[k] for k in documented} for h in l["log_history"] if "reward/mean" in h] for l in logs]
    assert len(steps[0]) == 3 and steps[0] == steps[1]  # gathered over both ranks: the same numbers
    ckpt = out / "trainer" / "checkpoint-3"
    assert (ckpt / "controller_rng_0.safetensors").is_file() and (ckpt / "controller_rng_1.safetensors").is_file()
    assert json.loads((ckpt / "trustser_checkpoint.json").read_text())["num_processes"] == 2


# ------------------------------------------------------------------------------------------
# 1b. a kill while a checkpoint is being written; a stage resumed in its partial folder
# ------------------------------------------------------------------------------------------
def _tiny_rectify_trainer(model_dir: Path, out: Path, **kw):
    import datasets
    from ser_slm_fixtures import make_rows

    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor
    from trustser.trainers.rectify import SedRectifyTrainer
    from trustser.trainers.rectify_config import SedRectifyConfig

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        num_policies=2,
        use_cpu=True,
        seed=0,
        controller_n_mels=16,
        controller_hidden_size=16,
        controller_embedding_size=4,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return SedRectifyTrainer(
        SerSlmForConditionalGeneration.from_pretrained(model_dir),
        args=SedRectifyConfig(**base),
        train_dataset=datasets.Dataset.from_list(make_rows(8)),
        processing_class=SerSlmProcessor.from_pretrained(model_dir),
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_interrupted_checkpoint_write_is_never_resumed_from(tiny_model, tmp_path):
    """An exception (a kill) while checkpoint-2's controller state is written leaves checkpoint-2
    without its completion record: ``last_complete_checkpoint`` and ``train(resume_from_checkpoint=True)``
    take checkpoint-1, which holds everything."""
    from trustser.trainers.sft import CHECKPOINT_COMPLETE, last_complete_checkpoint

    out = tmp_path / "out"
    trainer = _tiny_rectify_trainer(tiny_model, out)
    real = trainer.save_controller

    def dies_at_step_2(output_dir):
        real(output_dir)
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt("killed while saving")

    trainer.save_controller = dies_at_step_2
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # the Trainer's part was written...
    assert not (out / "checkpoint-2" / CHECKPOINT_COMPLETE).exists()  # ...but the checkpoint is not complete
    assert json.loads((out / "checkpoint-1" / CHECKPOINT_COMPLETE).read_text())["global_step"] == 1
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    resumed = _tiny_rectify_trainer(tiny_model, out)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2 and (out / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file()
    assert int(resumed.controller_optimizer.state_dict()["state"][0]["step"]) == 2
    assert last_complete_checkpoint(tmp_path / "nowhere") is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        _tiny_rectify_trainer(tiny_model, tmp_path / "empty").train(resume_from_checkpoint=True)


def test_stage_resume_keeps_the_partial_folder(tmp_path):
    """``StageRunner.run(..., resume=True)`` (the recipe's ``resume_from_checkpoint``) keeps what an
    interrupted run left in the stage's hidden partial folder; without it the folder starts afresh.
    Either way the stage is finished only when its function returns."""
    from types import SimpleNamespace

    from trustser.stages import StageRunner

    state = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    runner = StageRunner(tmp_path, state)

    def interrupted(out):
        (out / "trainer" / "checkpoint-2").mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run("posttrain", {"k": 2}, interrupted)
    assert not any(p.name.startswith("posttrain-") for p in tmp_path.iterdir())
    seen = []
    stage = runner.run(
        "posttrain", {"k": 2}, lambda out: seen.append(sorted(p.name for p in (out / "trainer").iterdir())), resume=True
    )
    assert seen == [["checkpoint-2"]] and not stage.reused and (stage.path / "STAGE.json").is_file()
    with pytest.raises(KeyboardInterrupt):
        runner.run("posttrain", {"k": 3}, interrupted)
    fresh = runner.run("posttrain", {"k": 3}, lambda out: seen.append(sorted(p.name for p in out.iterdir())))
    assert seen[-1] == [] and fresh.path.name.startswith("posttrain-")


# ------------------------------------------------------------------------------------------
# 3. Bad input, CLI and Python API
# ------------------------------------------------------------------------------------------
GOOD = ("good0", "good1", "rate8k", "stereo")


def _bad_corpus(root: Path) -> Path:
    """An audiofolder with two good clips, one at 8 kHz, one stereo, and one file of each bad kind."""
    from ser_slm_fixtures import LABELS, TEXTS, tone

    root.mkdir(parents=True, exist_ok=True)
    good = tone(1.2, 180.0, 0.3)
    sf.write(root / "good0.wav", good, 16000)
    sf.write(root / "good1.wav", tone(1.0, 120.0, 0.2, seed=1), 16000)
    sf.write(root / "rate8k.wav", tone(1.2, 150.0, 0.3, sr=8000, seed=2), 8000)
    sf.write(root / "stereo.wav", np.stack([good, 0.5 * good], axis=1), 16000)
    sf.write(root / "quad.wav", np.stack([good] * 4, axis=1), 16000)
    (root / "empty.wav").write_bytes(b"")
    (root / "corrupt.wav").write_bytes(b"RIFF" + b"\x00junk" * 40)
    sf.write(root / "silent.wav", np.zeros(16000, np.float32), 16000)
    nan = good.copy()
    nan[100:200] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    names = [*GOOD, "quad", "empty", "corrupt", "silent", "nan"]
    lines = ["file_name,emotion,text,speaker"] + [
        f"{n}.wav,{LABELS[i % 4]},{TEXTS[i % 6]},s{i % 2}" for i, n in enumerate(names)
    ]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def _classifiers(d: Path) -> dict[str, str]:
    from trustser.annotation.classifiers import OfflineClassifier
    from trustser.annotation.features import EMBEDDING_DIM

    rng = np.random.default_rng(0)
    out = {}
    for f, labels in (("gender", ["male", "female"]), ("age", ["child", "elderly"])):
        clf = OfflineClassifier.fit(rng.normal(size=(20, EMBEDDING_DIM)), [labels[i % 2] for i in range(20)], f)
        out[f] = str(clf.save(d / f"{f}.json"))
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model):
    """The bad corpus, saved gender/age classifiers, and its annotation through the CLI."""
    from trustser.cli import main

    d = tmp_path_factory.mktemp("bad")
    root = _bad_corpus(d / "corpus")
    clfs = _classifiers(d)
    ann = d / "annotated"
    rc = main(
        [
            "annotate",
            "audiofolder",
            str(root),
            "--corpus-options",
            '{"text_column": "text"}',
            "--out",
            str(ann),
            "--gender-backend",
            clfs["gender"],
            "--age-backend",
            clfs["age"],
            "--num-proc",
            "1",
        ]
    )
    assert rc == 0
    return {"root": root, "clfs": clfs, "annotated": ann, "model": tiny_model, "dir": d}


def test_annotate_cli_flags_each_bad_file_and_continues(bad, capsys):
    """``trustser annotate``: every bad file gets its reason in ``annotation_error`` (and "" labels),
    the good ones (8 kHz and stereo included) are annotated; the summary counts the reasons."""
    import datasets

    ds = datasets.load_from_disk(str(bad["annotated"]))["train"]
    errors = dict(zip(ds["id"], ds["annotation_error"]))
    assert {k: v for k, v in errors.items() if k not in GOOD} == {
        "quad": "channels",
        "empty": "unreadable",
        "corrupt": "unreadable",
        "silent": "silence",
        "nan": "nan",
    }
    assert all(errors[k] == "" for k in GOOD)
    for k, v in zip(ds["id"], ds["pitch_auto"]):
        assert (v != "") == (k in GOOD), k
    summary = json.loads((bad["annotated"] / "annotation.json").read_text())
    assert summary["splits"]["train"]["errors"] == {"channels": 1, "nan": 1, "silence": 1, "unreadable": 2}


def test_annotate_zero_usable_utterances(bad, tmp_path, capsys):
    """A corpus where no utterance is usable: the API flags every row (no crash); the CLI stops
    with an error naming the corpus root and the reasons, and writes nothing."""
    from trustser.annotation import annotate
    from trustser.cli import main
    from trustser.data import load_corpus

    root = tmp_path / "allbad"
    root.mkdir()
    sf.write(root / "a.wav", np.zeros(16000, np.float32), 16000)
    (root / "b.wav").write_bytes(b"")
    (root / "metadata.csv").write_text("file_name,emotion,text\na.wav,happy,hello there\nb.wav,sad,oh no\n")
    from trustser.annotation.classifiers import OfflineClassifier

    clf = {f: OfflineClassifier.load(p) for f, p in bad["clfs"].items()}
    out = annotate(
        load_corpus("audiofolder", root, text_column="text", cache_dir=tmp_path / "c"),
        method="unified",
        gender_backend=clf["gender"],
        age_backend=clf["age"],
    )
    assert out["train"]["annotation_error"][:] == ["silence", "unreadable"] and out["train"]["pitch_auto"][:] == [
        "",
        "",
    ]
    rc = main(
        [
            "annotate",
            "audiofolder",
            str(root),
            "--corpus-options",
            '{"text_column": "text"}',
            "--out",
            str(tmp_path / "ann"),
            "--gender-backend",
            bad["clfs"]["gender"],
            "--age-backend",
            bad["clfs"]["age"],
            "--num-proc",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "no usable utterances" in err and str(root) in err and "silence" in err
    assert not (tmp_path / "ann").exists()
    rc = main(["annotate", "audiofolder", str(tmp_path / "missing"), "--out", str(tmp_path / "ann")])
    assert rc == 1 and f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_evaluate_cli_skips_bad_files_and_names_them(bad, tmp_path, capsys):
    """``trustser evaluate`` on a corpus with bad files: those that cannot be decoded (empty,
    corrupt, NaN) are skipped and listed with file and reason, the rest (silence, 8 kHz, stereo,
    4 channels: resampled / down-mixed) are evaluated; captions that do not parse are flagged per
    utterance (``emotion: null``) and counted, not fatal."""
    from trustser.cli import main

    out = tmp_path / "m.json"
    labels = "neutral,happy,angry,sad"
    rc = main(
        [
            "evaluate",
            str(bad["model"]),
            str(bad["root"]),
            "--corpus",
            "audiofolder",
            "--split",
            "train",
            "--emotion-labels",
            labels,
            "--out",
            str(out),
            "--predictions",
            "--max-new-tokens",
            "6",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    m = json.loads(out.read_text())
    assert m["n"] == 6 and m["n_skipped"] == 3
    skipped = {s["id"]: s["error"] for s in m["skipped"]}
    assert set(skipped) == {"empty", "corrupt", "nan"}
    assert "empty.wav: empty file" in skipped["empty"] and "corrupt.wav: unreadable audio" in skipped["corrupt"]
    assert "non-finite (NaN/inf) samples" in skipped["nan"]
    for name in ("empty.wav", "corrupt.wav"):
        assert name in err
    assert [p["id"] for p in m["predictions"]] == [*GOOD, "quad", "silent"]
    assert m["unparseable_rate"] == 1.0 and all(p["emotion"] is None for p in m["predictions"])  # untrained model


def test_evaluate_cli_user_errors_name_the_path(bad, tmp_path, capsys):
    """Missing model dir / corpus, a model dir of the wrong type, unknown emotion labels, a corpus
    without a usable utterance: exit code 1 and one line naming the path or the rows."""
    from trustser.cli import main
    from trustser.models.cem import CemConfig, CemModel

    cem = tmp_path / "cem"
    CemModel(CemConfig(input_size=8)).save_pretrained(cem)
    base = ["--corpus", "audiofolder", "--split", "train", "--max-new-tokens", "4"]
    cases = [
        (
            [str(tmp_path / "nomodel"), str(bad["root"]), *base, "--emotion-labels", "happy,sad"],
            f"{tmp_path / 'nomodel'}: not a saved model",
        ),
        (
            [str(bad["model"]), str(tmp_path / "nocorpus"), *base, "--emotion-labels", "happy,sad"],
            f"{tmp_path / 'nocorpus'} does not exist",
        ),
        (
            [str(cem), str(bad["root"]), *base, "--emotion-labels", "happy,sad"],
            f"{cem}: holds a 'cem' checkpoint, not a SER-SLM",
        ),
        (
            [str(bad["model"]), str(bad["root"]), *base, "--emotion-labels", "calm,excited"],
            "reference emotions ['angry', 'happy', 'neutral', 'sad'] (rows good0",
        ),
    ]
    only_bad = tmp_path / "onlybad"
    only_bad.mkdir()
    (only_bad / "e.wav").write_bytes(b"")
    (only_bad / "metadata.csv").write_text("file_name,emotion\ne.wav,sad\n")
    cases.append(
        ([str(bad["model"]), str(only_bad), *base, "--emotion-labels", "happy,sad"], "no usable utterances to evaluate")
    )
    for argv, message in cases:
        assert main(["evaluate", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_select_cli_flags_unreadable_rows_and_wrong_models(bad, tmp_path, capsys):
    """``trustser select`` on the annotated bad corpus: rows that failed annotation or cannot be
    decoded score NaN and are never selected (counted in ``n_unscorable``); swapped --cem/--slm
    and a missing --data are one-line errors naming the directory."""
    from trustser.cli import main
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.ser_slm import SerSlmConfig

    h = SerSlmConfig.from_pretrained(bad["model"]).text_config.hidden_size
    cem = tmp_path / "cem"
    torch.manual_seed(0)
    CemModel(CemConfig(input_size=5 * h, hidden_size=8, slm_hidden_size=h)).save_pretrained(cem)
    out = tmp_path / "sel"
    rc = main(
        [
            "select",
            "--cem",
            str(cem),
            "--slm",
            str(bad["model"]),
            "--data",
            str(bad["annotated"]),
            "--ratio",
            "1.0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    stats = json.loads((out / "selection_stats.json").read_text())["train"]
    assert stats["n_total"] == 9 and stats["n_unscorable"] == 5 and stats["n_selected"] == 4
    import datasets

    assert sorted(datasets.load_from_disk(str(out))["train"]["id"]) == sorted(GOOD)
    cases = [
        (
            ["--cem", str(bad["model"]), "--slm", str(cem)],
            f"{bad['model']}: holds a 'ser_slm' checkpoint, not a CemModel",
        ),
        (
            ["--cem", str(cem), "--slm", str(bad["model"]), "--data", str(tmp_path / "nodata")],
            f"--data {tmp_path / 'nodata'}: no such directory",
        ),
    ]
    for extra, message in cases:
        argv = ["select", "--data", str(bad["annotated"]), "--ratio", "0.5", "--out", str(tmp_path / "x"), *extra]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_explain_wrong_model_directory(bad, tmp_path, capsys):
    """``trustser explain`` / ``load_explainer`` with a directory holding another model type: a
    ValueError naming the directory, before the pipeline's long multi-class error."""
    from trustser.cli import main
    from trustser.explain import load_explainer
    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel

    ctrl = tmp_path / "controller"
    SedControllerModel(SedControllerConfig()).save_pretrained(ctrl)
    with pytest.raises(ValueError, match=r"controller: holds a 'sed_controller' checkpoint, not a SER-SLM"):
        load_explainer(ctrl, device=-1)
    assert main(["explain", str(ctrl), str(bad["root"] / "good0.wav"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{ctrl}: holds a 'sed_controller' checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "cell, message",
    [
        ("MISSING", "no such file"),
        ({"bytes": b"", "path": "e.wav"}, "(e.wav): empty audio data (0 bytes)"),
        ({"bytes": b"RIFF\x00\x00junk", "path": "c.wav"}, "(c.wav): unreadable audio"),
        ({"array": np.full(1600, np.nan, np.float32), "sampling_rate": 16000}, "non-finite (NaN/inf) samples"),
        ({"array": np.r_[np.ones(1600, np.float32), np.inf], "sampling_rate": 16000}, "non-finite (NaN/inf) samples"),
        ({"array": np.ones(1600, np.float32), "sampling_rate": 0}, "invalid sampling rate 0"),
        ({"array": np.ones(1600, np.float32), "sampling_rate": None}, "invalid sampling rate None"),
        ({"array": np.ones((2, 2, 1600), np.float32), "sampling_rate": 16000}, "3 dimensions"),
        ({"array": np.zeros(0, np.float32), "sampling_rate": 16000}, "no samples"),
        ({}, "neither 'array', 'bytes' nor 'path'"),
    ],
)
def test_decode_audio_names_row_file_and_problem(cell, message, tmp_path):
    """The audio decoder behind training, evaluation and CEM scoring (Python API): a clear
    AudioError naming the row (and file) and the problem."""
    from trustser.audio import AudioError, decode_audio

    if cell == "MISSING":
        cell = {"path": str(tmp_path / "gone.wav")}
    with pytest.raises(AudioError, match="row 'r7'") as info:
        decode_audio(cell, "r7")
    assert message in str(info.value)


def test_decode_audio_resamples_and_downmixes_any_layout():
    """Wrong sample rate and multi-channel input are not errors: resampled to 16 kHz, down-mixed."""
    from ser_slm_fixtures import tone

    from trustser.audio import decode_audio

    wav8k = tone(1.0, 150.0, 0.3, sr=8000)
    assert abs(decode_audio({"array": wav8k, "sampling_rate": 8000.0}, "a").size - 16000) <= 2
    for layout in (np.stack([wav8k] * 4), np.stack([wav8k] * 2, axis=1)):
        y = decode_audio({"array": layout, "sampling_rate": 8000}, "b")
        assert y.ndim == 1 and abs(y.size - 16000) <= 2


def test_training_on_zero_usable_utterances_is_a_clear_error(tmp_path):
    """The post-training stage on a split where every row failed annotation: a ValueError naming
    the data directory and the reasons, before any model is loaded."""
    from types import SimpleNamespace

    import datasets
    from ser_slm_fixtures import make_rows

    from trustser.recipe import stage_posttrain
    from trustser.recipe_config import RecipeConfig
    from trustser.stages import Stage, StageRunner
    from trustser.systems import get_system

    rows = make_rows(3)
    for r, why in zip(rows, ("silence", "nan", "unreadable")):
        r["annotation_error"] = why
    data = tmp_path / "annotate-x"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(data / "data"))
    runner = StageRunner(tmp_path / "cache", SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    with pytest.raises(ValueError, match=r"annotate-x/data: no usable utterances in split 'train' .*'silence': 1"):
        stage_posttrain(
            runner,
            RecipeConfig(output_dir=str(tmp_path)),
            get_system("sys4"),
            Stage("annotate", "x", data, False),
            "data",
            Stage("pretrain", "y", tmp_path / "no-model", False),
        )
    assert not any(p.name.startswith("posttrain-") for p in (tmp_path / "cache").iterdir())


# ------------------------------------------------------------------------------------------
# 4. No half-written outputs
# ------------------------------------------------------------------------------------------
def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_interrupted_annotation_and_selection_writes_keep_the_previous_output(bad, tmp_path, monkeypatch):
    """An exception in the middle of writing ``trustser annotate`` / ``trustser select`` output
    (after part of the dataset is on disk) leaves the previous output byte for byte as it was and
    no folder that looks finished; the next run replaces it."""
    import shutil

    import datasets

    from trustser.cli import main
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.ser_slm import SerSlmConfig

    ann = tmp_path / "annotated"
    shutil.copytree(bad["annotated"], ann)
    before = _snapshot(ann)
    real_dd, real_ds = datasets.DatasetDict.save_to_disk, datasets.Dataset.save_to_disk

    def dies_half_way(self, path, *a, **k):
        (Path(path) / "half.arrow").write_bytes(b"\x00" * 64)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", dies_half_way)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", dies_half_way)
    argv = [
        "annotate",
        "audiofolder",
        str(bad["root"]),
        "--corpus-options",
        '{"text_column": "text"}',
        "--out",
        str(ann),
        "--gender-backend",
        bad["clfs"]["gender"],
        "--age-backend",
        bad["clfs"]["age"],
        "--num-proc",
        "1",
        "--method",
        "unified",
    ]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert _snapshot(ann) == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["annotated"]

    h = SerSlmConfig.from_pretrained(bad["model"]).text_config.hidden_size
    cem = tmp_path / ".cem"
    CemModel(CemConfig(input_size=5 * h, hidden_size=8, slm_hidden_size=h)).save_pretrained(cem)
    sel = tmp_path / "selected"
    sel_argv = [
        "select",
        "--cem",
        str(cem),
        "--slm",
        str(bad["model"]),
        "--data",
        str(ann),
        "--ratio",
        "0.5",
        "--out",
        str(sel),
    ]
    with pytest.raises(KeyboardInterrupt):
        main(sel_argv)
    assert not sel.exists()
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", real_dd)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_ds)
    assert main(sel_argv) == 0
    first = _snapshot(sel)
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        main([*sel_argv[:-4], "--ratio", "0.25", "--out", str(sel)])
    assert _snapshot(sel) == first and json.loads((sel / "selection_stats.json").read_text())["train"]["ratio"] == 0.5
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", real_dd)
    assert main(argv) == 0  # the next run replaces the previous annotation
    assert json.loads((ann / "annotation.json").read_text())["method"] == "unified"


_KILLED_WRITE = """
import json, os, signal, sys
from pathlib import Path
from trustser.utils import atomic_directory, atomic_write_json
out = Path(sys.argv[1])
if sys.argv[2] == "file":  # SIGKILL after the new content is written, before the rename
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    atomic_write_json(out / "results.json", {"wa": 0.99, "partial": True})
else:  # SIGKILL half way through a directory output (a report folder, a selection)
    with atomic_directory(out / "report") as tmp:
        (tmp / "report.md").write_text("# half")
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("what", ["file", "directory"])
def test_sigkill_during_an_atomic_write_keeps_the_previous_output(tmp_path, what):
    """results.json/report.md-style outputs (``atomic_write_*``) and directory outputs
    (``atomic_directory``: annotation, selection, controller) killed with SIGKILL while being
    written: the previous version is untouched, the leftover is a dot-named temporary."""
    from trustser.utils import atomic_write_json, atomic_write_text

    atomic_write_json(tmp_path / "results.json", {"wa": 0.5})
    atomic_write_text(tmp_path / "report" / "report.md", "# old")
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(tmp_path), what], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not any(part.startswith(".") for part in Path(k).parts)} == before
    assert len(after) == len(before) + 1  # the killed write's temporary, hidden
    assert json.loads((tmp_path / "results.json").read_text()) == {"wa": 0.5}


# ------------------------------------------------------------------------------------------
# 5. Safe loading
# ------------------------------------------------------------------------------------------
HF_PICKLES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}  # the Trainer's own


def test_rectify_checkpoint_side_state_is_safetensors_and_json(tiny_model, tmp_path):
    """trustser's own checkpoint state (controller weights, controller optimizer, policy RNG,
    completion record) is safetensors or JSON; the only pickles are the ``transformers`` Trainer's."""
    from safetensors import safe_open

    out = tmp_path / "out"
    _tiny_rectify_trainer(tiny_model, out, max_steps=1).train()
    ckpt = out / "checkpoint-1"
    files = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    ours = {f for f in files if f.startswith("controller") or f == "trustser_checkpoint.json"}
    assert {
        "controller/model.safetensors",
        "controller/config.json",
        "controller_optimizer.safetensors",
        "controller_optimizer.json",
        "controller_rng_0.safetensors",
        "trustser_checkpoint.json",
    } <= ours
    for f in ours:
        path = ckpt / f
        assert path.suffix in (".safetensors", ".json"), f
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as fh:
                assert list(fh.keys())
    assert "model.safetensors" in files and not any(f.endswith(".bin") and f != "training_args.bin" for f in files)
    pickled = {f for f in files if Path(f).suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle")}
    assert pickled <= HF_PICKLES, pickled - HF_PICKLES
    for f in files - pickled:  # no pickle under another name either (protocol 2+ starts with 0x80, torch.save zips)
        head = (ckpt / f).read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f


def _evil_module(d: Path, sentinel: Path) -> None:
    (d / "evil.py").write_text(
        textwrap.dedent(f"""\
        from pathlib import Path
        Path({str(sentinel)!r}).write_text("code from the checkpoint ran")
        from transformers import PretrainedConfig, PreTrainedModel

        class EvilConfig(PretrainedConfig):
            model_type = "trustser_evil"

        class EvilModel(PreTrainedModel):
            config_class = EvilConfig
        """)
    )


def test_trustser_classes_load_without_remote_code(tiny_model, tmp_path):
    """After ``import trustser`` every trustser checkpoint loads through the Auto classes without
    ``trust_remote_code``, as trustser's installed classes; Python files in the checkpoint (even an
    ``auto_map`` pointing at them) are not executed."""
    import shutil

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    import trustser  # noqa: F401
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
    from trustser.models.ser_slm import SerSlmForConditionalGeneration

    sentinel = tmp_path / "SENTINEL"
    slm = tmp_path / "slm"
    shutil.copytree(tiny_model, slm)
    for py in slm.glob("*.py"):  # the modules saved beside the weights for trust_remote_code users
        py.write_text(f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n" + py.read_text())
    _evil_module(slm, sentinel)
    config = json.loads((slm / "config.json").read_text())
    config["auto_map"] = {
        **config.get("auto_map", {}),
        "AutoModelForCausalLM": "evil.EvilModel",
        "AutoModel": "evil.EvilModel",
    }
    (slm / "config.json").write_text(json.dumps(config))
    cem, ctrl = tmp_path / "cem", tmp_path / "ctrl"
    CemModel(CemConfig(input_size=8)).save_pretrained(cem)
    SedControllerModel(SedControllerConfig()).save_pretrained(ctrl)

    loaded = [
        AutoModelForCausalLM.from_pretrained(slm),
        AutoModel.from_pretrained(slm),
        AutoProcessor.from_pretrained(slm),
        AutoConfig.from_pretrained(slm),
        SerSlmForConditionalGeneration.from_pretrained(slm),
        AutoModel.from_pretrained(cem),
        AutoModel.from_pretrained(ctrl),
        AutoConfig.from_pretrained(ctrl),
    ]
    for obj in loaded:
        assert type(obj).__module__.startswith("trustser."), type(obj)
    assert isinstance(loaded[0], SerSlmForConditionalGeneration) and isinstance(loaded[5], CemModel)
    assert isinstance(loaded[6], SedControllerModel)
    from trustser.explain import load_explainer

    assert load_explainer(slm, device=-1).model.__class__ is SerSlmForConditionalGeneration
    assert not sentinel.exists()


def test_remote_code_checkpoint_runs_nothing_unless_asked(tmp_path, capsys):
    """A checkpoint whose config names remote code (``auto_map``) of an unknown type: the Auto
    classes and every trustser entry point refuse it without running its Python file; only an
    explicit ``trust_remote_code=True`` imports it."""
    from transformers import AutoConfig, AutoModel

    import trustser  # noqa: F401
    from trustser.cli import main
    from trustser.explain import load_explainer
    from trustser.models.ser_slm import SerSlmForConditionalGeneration

    evil = tmp_path / "evil"
    evil.mkdir()
    sentinel = tmp_path / "SENTINEL"
    _evil_module(evil, sentinel)
    (evil / "config.json").write_text(
        json.dumps(
            {
                "model_type": "trustser_evil",
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
            }
        )
    )
    for load in (
        lambda: AutoConfig.from_pretrained(evil),
        lambda: AutoModel.from_pretrained(evil),
        lambda: AutoConfig.from_pretrained(evil, trust_remote_code=False),
        lambda: SerSlmForConditionalGeneration.from_pretrained(evil),
        lambda: load_explainer(evil, device=-1),
    ):
        with pytest.raises((ValueError, OSError)):
            load()
        assert not sentinel.exists()
    assert main(["evaluate", str(evil), str(tmp_path), "--emotion-labels", "happy,sad"]) == 1
    assert "holds a 'trustser_evil' checkpoint" in capsys.readouterr().err and not sentinel.exists()
    AutoConfig.from_pretrained(evil, trust_remote_code=True)  # the user asked: now (and only now) it runs
    assert sentinel.exists()
