"""Installed, not cloned: a wheel built from the repository carries its data files (model-card
templates, the SER metrics `evaluate` module); installed with --no-deps into a fresh virtual
environment (the shared environment's site-packages on PYTHONPATH give the dependencies, and its
.pth files, hence the editable trustser, are not processed that way), it runs the README's "Using
it" blocks as written, from a folder outside the repository: install, explain a folder, a long
recording, the demo, and push (with --space) against a local stand-in for the Hub."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from explain_fixtures import LABELS, write_corpus

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DATA_FILES = [
    "trustser/model_cards/ser_slm.md",
    "trustser/model_cards/cem.md",
    "trustser/model_cards/sed_controller.md",
    "trustser/metrics/ser_metrics/ser_metrics.py",
    "trustser/metrics/ser_metrics/README.md",
]


def readme_blocks(lang: str) -> list[str]:
    """The ```lang blocks of the README's "Using it" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Using it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _run(cmd, env, cwd, timeout=600, check=True):
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``pip wheel`` of a copy of the repository's package files (the build leaves build/ and
    *.egg-info next to the sources, so not in the working tree)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        env=os.environ,
        cwd=tree,
    )
    (whl,) = dist.glob("trustser-*.whl")
    return whl


def test_wheel_carries_the_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert "trustser/segments.py" in names and "trustser/demo.py" in names


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory):
    """(venv dir, environment for its commands): a fresh venv, no pip of its own, no trustser
    but the wheel's (the README's pip line installs it)."""
    import torch

    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=os.environ, cwd=venv.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PYTHONPATH=str(Path(torch.__file__).resolve().parents[1]),
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONNOUSERSITE="1",
    )
    return venv, env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, wheel, explain_model_dir, explain_clips):
    """A folder outside the repository with what the README's commands name: the wheel, a trustser
    output directory (outputs/sys10-seed0: its model, CEM and synthetic-layout corpus stages),
    clips/ and a multi-utterance conversation.wav."""
    d = tmp_path_factory.mktemp("user")
    assert REPO not in d.parents
    shutil.copy2(wheel, d / wheel.name)
    cache = d / "outputs" / "cache"
    post, cem, corpus = cache / "posttrain-k1", cache / "cem-k2", cache / "corpus-k0" / "corpus"
    shutil.copytree(explain_model_dir, post / "model", ignore=shutil.ignore_patterns("cem"))
    shutil.copytree(explain_model_dir / "cem", cem / "cem")
    write_corpus(corpus, explain_clips)
    (d / "clips").mkdir()
    for clip in explain_clips:
        shutil.copy2(clip, d / "clips" / Path(clip).name)
    gap = np.zeros(16000, np.float32)
    parts = [gap]
    for clip in explain_clips[:3]:
        parts += [sf.read(clip, dtype="float32")[0], gap]
    sf.write(d / "conversation.wav", np.concatenate(parts), 16000)
    run = d / "outputs" / "sys10-seed0"
    run.mkdir()
    metrics = {
        "wa": 0.5,
        "ua": 0.5,
        "weighted_f1": 0.5,
        "unparseable_rate": 0.0,
        "n": 4,
        "sed_accuracy": {"pitch": 0.75},
        "confusion_matrix": {"labels": list(LABELS), "matrix": [[1, 0, 0, 0]] * 4},
    }
    results = {
        "system": {"name": "sys10", "with_sed": True, "domain_sft": True, "rectify": False},
        "target_corpus": "synthetic",
        "test": {"synthetic": metrics},
        "seed": 0,
        "settings": {"preset": "tiny", "pretrain_corpus": "synthetic", "emotion_labels": list(LABELS)},
        "stages": [
            {"name": "corpus", "key": "k0", "path": str(corpus.parent)},
            {"name": "cem", "key": "k2", "path": str(cem)},
            {"name": "posttrain", "key": "k1", "path": str(post)},
        ],
    }
    (run / "results.json").write_text(json.dumps(results))
    for f in (post / "model").iterdir():  # the run folder is the model (recipe.export_model_folder's layout)
        if f.is_file():
            shutil.copy2(f, run / f.name)
    shutil.copytree(cem / "cem", run / "cem")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_stop(cmd, env, cwd, log):
    """Starts the demo command, waits for its page on loopback, stops it."""
    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200 and b"gradio" in r.read().lower()
                    return
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, f"{cmd} did not serve:\n{log.read_text()[-3000:]}"
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PUSH_DRIVER = """
import os, runpy, sys
sys.path.insert(0, {tests!r})
import hub_fake
hub_fake.install({hub!r})
import trustser
from trustser.cli import main
print("TRUSTSER_FILE", trustser.__file__)
rc = main({args!r})
assert rc == 0, rc
# the Space's app.py builds the demo on the pushed model (a local folder here: TRUSTSER_MODEL)
space = os.path.join({hub!r}, "spaces", {space!r})
os.chdir(space)
os.environ["TRUSTSER_MODEL"] = os.path.join({hub!r}, {repo!r})
app = runpy.run_path("app.py", run_name="space")
import gradio
assert isinstance(app["demo"], gradio.Blocks)
# the metrics evaluate module from the installed package
from trustser.evaluation import ser_metrics_path, ser_metrics
print("METRICS", ser_metrics_path(), ser_metrics(["happy", "sad"], ["happy", "happy"], ["happy", "sad"])["wa"])
"""


def test_readme_user_paths_from_the_installed_wheel(fresh, workdir, tmp_path):
    venv, env = fresh
    (bash,) = readme_blocks("bash")
    (python,) = readme_blocks("python")
    lines = [l.strip() for l in bash.splitlines() if l.strip() and not l.strip().startswith("#")]
    done = []
    for line in lines:
        args = shlex.split(line.split("  #")[0])
        if args[0] == "pip":
            assert args[1] == "install"
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "--python",
                    str(venv / "bin" / "python"),
                    "install",
                    "--no-deps",
                    "-q",
                    *args[2:],
                ],
                env={**os.environ, "PIP_NO_INDEX": "1"},
                cwd=workdir,
            )
            found = _run(
                [str(venv / "bin" / "python"), "-c", "import trustser; print(trustser.__file__)"], env, workdir
            )
            assert found.stdout.strip().startswith(str(venv)), found.stdout  # the wheel's, not the repository's
        elif args[:2] == ["trustser", "explain"]:
            p = _run([str(venv / "bin" / "trustser"), *args[1:], "--no-progress", "--device", "cpu"], env, workdir)
            rows = p.stdout.splitlines()
            assert rows[0].split()[0] == "file" and "0 failed" in p.stderr
            if "--long-audio" in args:
                assert rows[0].split()[1:3] == ["start", "end"] and len(rows) == 1 + 3  # three utterances
                assert (workdir / "timelines" / "conversation.wav.timeline.png").is_file()
            else:
                assert len(rows) == 1 + 4 and all(Path(r.split()[0]).parent.name == "clips" for r in rows[1:])
        elif args[:2] == ["trustser", "demo"]:
            _serve_and_stop(
                [str(venv / "bin" / "trustser"), *args[1:], "--device", "cpu"], env, workdir, tmp_path / "demo.log"
            )
        elif args[:2] == ["trustser", "push"]:
            hub = tmp_path / "hub"
            repo, space = args[3], args[args.index("--space") + 1]
            driver = PUSH_DRIVER.format(tests=str(TESTS), hub=str(hub), args=args[1:], space=space, repo=repo)
            p = _run([str(venv / "bin" / "python"), "-c", driver], env, workdir)
            assert f"TRUSTSER_FILE {venv}" in p.stdout and re.search(
                r"METRICS \S+site-packages/trustser/metrics\S+ 0.5", p.stdout
            )
            card = (hub / repo / "README.md").read_text()
            assert card.startswith("---\n") and "model-index" in card and 'pipeline("explainable-ser"' in card
            assert (hub / repo / "cem" / "README.md").is_file() and (hub / repo / "model.safetensors").is_file()
            sp = hub / "spaces" / space
            assert (
                "sdk: gradio" in (sp / "README.md").read_text()
                and (sp / "requirements.txt").read_text().strip() == "trustser"
            )
            assert sorted(p.name for p in (sp / "examples").iterdir()) == [f"{i:02d}-u{i}.wav" for i in range(4)]
        else:
            raise AssertionError(f"README command not covered by this test: {line}")
        done.append(args[:2])
    assert [a[0] if a[0] == "pip" else a[1] for a in done] == ["pip", "explain", "explain", "demo", "push"]
    # the Python block, as written
    p = _run([str(venv / "bin" / "python"), "-c", python], env, workdir)
    out = p.stdout.splitlines()
    assert out[0].strip() and len(out) == 1 + 3, p.stdout  # a caption, then the three utterances
    assert all(len(l.split()) == 4 and float(l.split()[0]) < float(l.split()[1]) for l in out[1:])
