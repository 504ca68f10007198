"""The rehearsal of the real configs (tests marked ``real_path``): fixture trees in the real
layouts, local stand-ins for the Hub models, and the two recipe runs, once per test session.

The runs are exactly `accelerate launch recipes/sys10.py --config recipes/configs/<corpus>_sys10.yaml`
with only paths, model ids and step counts changed on the command line. The MELD run shares the
IEMOCAP run's stage cache (a ``cache`` link), so the SpeechCraft pre-training and the CEM, which
the two configs share, run once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = [
    "--pretrain_max_steps",
    "2",
    "--text_prior_steps",
    "2",
    "--cem_max_steps",
    "2",
    "--posttrain_max_steps",
    "2",
]


def launch_recipe(
    config: str, out: Path, inputs: dict, target: str, cwd: Path, *extra: str, env=None
) -> subprocess.CompletedProcess:
    """``accelerate launch recipes/sys10.py --config recipes/configs/<config>`` with the fixture's
    paths and stand-in models (umask 022, one CPU process)."""
    models = inputs["models"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        str(REPO / "recipes/sys10.py"),
        "--config",
        str(REPO / "recipes/configs" / config),
        "--output_dir",
        str(out),
        "--pretrain_root",
        inputs["speechcraft"],
        "--target_root",
        inputs[target],
        *[a for k in ("audio_model", "text_model", "gender_model", "age_model") for a in (f"--{k}", models[k])],
        *STEPS,
        *extra,
    ]
    env = dict(
        os.environ if env is None else env,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800, preexec_fn=lambda: os.umask(0o022)
    )


@pytest.fixture(scope="session")
def rehearsal_inputs(tmp_path_factory, synthetic_small):
    from fixtures_real import build_rehearsal

    return build_rehearsal(tmp_path_factory.mktemp("rehearsal"), synthetic_small)


def _run(tmp_path_factory, inputs, config, target, name, cache_from=None):
    base = tmp_path_factory.mktemp(name)
    out = base / "out"
    if cache_from is not None:
        out.mkdir()
        (out / "cache").symlink_to(cache_from / "cache", target_is_directory=True)
    proc = launch_recipe(config, out, inputs, target, base)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    run = out / "sys10-seed0"
    return {
        "out": out,
        "run": run,
        "results": json.loads((run / "results.json").read_text()),
        "log": proc.stdout + proc.stderr,
    }


@pytest.fixture(scope="session")
def iemocap_run(tmp_path_factory, rehearsal_inputs):
    return _run(tmp_path_factory, rehearsal_inputs, "iemocap_sys10.yaml", "iemocap", "iemocap_run")


@pytest.fixture(scope="session")
def meld_run(tmp_path_factory, rehearsal_inputs, iemocap_run):
    return _run(
        tmp_path_factory, rehearsal_inputs, "meld_sys10.yaml", "meld", "meld_run", cache_from=iemocap_run["out"]
    )
