"""The README's "Using it" examples, executed on a finished run of the real IEMOCAP config
(the real-path rehearsal, tests/rehearsal.py), from a directory where `outputs/` is that run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

pytestmark = pytest.mark.real_path


def _section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


@pytest.fixture
def user_dir(tmp_path, iemocap_run, rehearsal_inputs):
    """A user's working directory: ``outputs/`` (the finished run), ``speech.wav`` and ``clips/``."""
    (tmp_path / "outputs").symlink_to(iemocap_run["out"], target_is_directory=True)
    import numpy as np
    import soundfile as sf

    clips = sorted(Path(rehearsal_inputs["iemocap"]).glob("Session5/sentences/wav/*/*.wav"))[:2]
    shutil.copy(clips[0], tmp_path / "speech.wav")
    (tmp_path / "clips").mkdir()
    for c in clips:
        shutil.copy(c, tmp_path / "clips" / c.name)
    shutil.copy(clips[0], tmp_path / "clips" / "u0.wav")  # the name the README's Python block uses
    gap = np.zeros(16000, np.float32)
    parts = [gap]
    for c in clips:  # a recording of the clips with a second of silence around each
        wav, sr = sf.read(c, dtype="float32", always_2d=True)
        parts += [
            wav.mean(1)
            if sr == 16000
            else np.interp(np.arange(0, len(wav), sr / 16000), np.arange(len(wav)), wav.mean(1)).astype(np.float32),
            gap,
        ]
    sf.write(tmp_path / "conversation.wav", np.concatenate(parts), 16000)
    return tmp_path


def test_python_example(user_dir):
    block = re.search(r"```python\n(.*?)```", _section("Using it"), re.S).group(1)
    assert 'pipeline("explainable-ser", model="outputs/sys10-seed0")' in block
    check = (
        "\nprint(type(model).__name__, result['error'] is None and bool(result['caption']), pipe.cem is not None,"
        " result['emotion'] in (*pipe.emotion_labels, None))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", block + check], cwd=user_dir, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "SerSlmForConditionalGeneration True True True"


def test_explain_and_push_examples(user_dir, tmp_path):
    bash = re.search(r"```bash\n(.*?)```", _section("Using it"), re.S).group(1)
    explain = re.search(r"^trustser (explain outputs/sys10-seed0 clips/ --format table)$", bash, re.M).group(1).split()
    push = re.search(r"^trustser (push outputs/sys10-seed0 \S+)", bash, re.M).group(1).split()
    cli = [sys.executable, "-m", "trustser.cli"]
    proc = subprocess.run(
        [*cli, *explain, "--no-progress"], cwd=user_dir, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert all(name in table for name in os.listdir(user_dir / "clips")) and "3 explained, 0 failed" in proc.stderr
    # pushing needs the Hub: the same command writes the repository's content with --export-dir
    proc = subprocess.run(
        [*cli, *push, "--export-dir", str(tmp_path / "repo")],
        cwd=user_dir,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "repo" / "config.json").read_text())["model_type"] == "ser_slm"
    assert (tmp_path / "repo" / "README.md").is_file() and (tmp_path / "repo" / "cem" / "README.md").is_file()
