"""Inputs for the fault-injection tests (tests/test_faults.py): a tiny audiofolder corpus with a
labelled reference split, a saved tiny SER-SLM, and tensor comparisons of checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from ser_slm_fixtures import LABELS, TEXTS, tone

SR = 16000


def write_corpus(root: Path, n_train: int = 12, n_test: int = 4, n_reference: int = 8) -> Path:
    """``root/<split>/metadata.csv`` + harmonic-tone wavs; the reference split carries gender and
    age (the annotator fits its offline gender/age classifiers there, no Hub download)."""
    ages = ["child", "young adult", "middle-aged", "elderly"]
    for split, n in (("reference", n_reference), ("train", n_train), ("test", n_test)):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        lines = ["file_name,emotion,text,speaker,gender,age"]
        for i in range(n):
            f0 = (110.0, 180.0, 260.0)[i % 3]
            amp = (0.05, 0.2, 0.6)[(i // 3) % 3]
            seed = {"reference": 0, "train": 1000, "test": 2000}[split] + i
            sf.write(d / f"{split}{i:03d}.wav", tone(1.0 + 0.2 * (i % 3), f0, amp, seed=seed), SR)
            gender = "female" if f0 > 150 else "male"
            lines.append(
                f"{split}{i:03d}.wav,{LABELS[i % len(LABELS)]},{TEXTS[i % len(TEXTS)]},s{i % 3},{gender},{ages[i % 4]}"
            )
        (d / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def save_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """A random-init tiny SER-SLM (+ processor) small enough for a few CPU steps in a subprocess."""
    import torch

    from trustser.models.ser_slm import build_tiny_ser_slm

    torch.manual_seed(seed)
    model, proc = build_tiny_ser_slm(
        TEXTS,
        emotion_labels=LABELS,
        vocab_size=400,
        lm_hidden=32,
        encoder_dim=32,
        encoder_layers=1,
        lm_layers=1,
        max_audio_seconds=2,
        seed=seed,
    )
    model.generation_config.max_new_tokens = 12
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def safetensors_equal(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (or exist in one file only)."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    bad = sorted(set(ta) ^ set(tb))
    bad += [k for k in sorted(set(ta) & set(tb)) if not torch.equal(ta[k], tb[k])]
    return bad


def nested_equal(x, y, where: str = "") -> list[str]:
    """Paths where two (torch.load-ed) nested structures differ; tensors compared with torch.equal."""
    import torch

    if torch.is_tensor(x) or torch.is_tensor(y):
        ok = (
            torch.is_tensor(x)
            and torch.is_tensor(y)
            and x.dtype == y.dtype
            and x.shape == y.shape
            and torch.equal(x, y)
        )
        return [] if ok else [where]
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return [f"{where}: keys {sorted(map(str, set(x) ^ set(y)))}"]
        return [p for k in x for p in nested_equal(x[k], y[k], f"{where}/{k}")]
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if len(x) != len(y):
            return [f"{where}: lengths {len(x)} != {len(y)}"]
        return [p for i, (u, v) in enumerate(zip(x, y)) for p in nested_equal(u, v, f"{where}[{i}]")]
    if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
        return []
    return [] if x == y else [f"{where}: {x!r} != {y!r}"]
