"""benchmarks/reward_signal.py: the per-field reward signal read off a constructed reward table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from trustser.descriptors import SED_FIELDS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reward_signal():
    spec = importlib.util.spec_from_file_location("reward_signal", REPO / "benchmarks" / "reward_signal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(pitch_auto: str, pitch_true: str) -> dict:
    row = {"pitch": pitch_true, "pitch_auto": pitch_auto}
    for f, v in (("volume", "normal"), ("speed", "normal"), ("gender", "male"), ("age", "young adult")):
        row[f] = row[f + "_auto"] = v
    return row


def test_field_signal_reads_truth_gain_and_auc(reward_signal):
    rows = [_row("low", "normal"), _row("high", "normal"), _row("normal", "normal"), _row("low", "low")]
    alts = [reward_signal.alternatives(r) for r in rows]
    # 2 pitch + 2 volume + 2 speed + 1 gender + 4 age changes for every row
    assert [len(a) for a in alts] == [11] * 4
    assert all(("pitch", r["pitch_auto"]) not in a for r, a in zip(rows, alts))
    # reward: annotated caption 0; the true pitch +1, any other pitch change -1; other fields 0
    logp = np.zeros((4, 12))
    for i, (r, a) in enumerate(zip(rows, alts)):
        for j, (f, v) in enumerate(a):
            if f == "pitch":
                logp[i, 1 + j] = 1.0 if v == r["pitch"] else -1.0
    out = reward_signal.field_signal(rows, alts, logp, "uniform")
    assert set(out) == set(SED_FIELDS)
    pitch = out["pitch"]
    assert pitch["wrong"] == 2 and pitch["truth_gain_mean"] == 1.0 and pitch["truth_gain_positive"] == 1.0
    # a uniform modification of a wrong label: (+1 - 1) / 2; of a right one: -1
    assert pitch["modify_gain_wrong"] == 0.0 and pitch["modify_gain_right"] == -1.0
    assert pitch["modify_gain_auc"] == 1.0
    # fields that are never wrong: no truth gain, AUC undefined
    assert out["volume"]["wrong"] == 0 and out["volume"]["truth_gain_mean"] is None
    assert np.isnan(out["volume"]["modify_gain_auc"])
    # adjacent: low -> normal (the truth, +1), high -> normal (+1), normal -> low | high (-1)
    adjacent = reward_signal.field_signal(rows, alts, logp, "adjacent")["pitch"]
    assert adjacent["modify_gain_wrong"] == 1.0 and adjacent["modify_gain_right"] == -1.0


def test_replacements_follow_modify_labels(reward_signal):
    assert reward_signal.replacements("pitch", "low", "adjacent") == ["normal"]
    assert reward_signal.replacements("pitch", "normal", "adjacent") == ["low", "high"]
    assert reward_signal.replacements("gender", "male", "adjacent") == ["female"]
    assert reward_signal.replacements("age", "elderly", "adjacent") == ["middle-aged"]
    assert reward_signal.replacements("age", "child", "uniform") == [
        "teenager",
        "young adult",
        "middle-aged",
        "elderly",
    ]
