"""The tiny explaining SER-SLM shared by the explain, long-audio, demo and wheel tests: over-fitted
on four espeak-ng clips so its captions parse, with a random-init CEM in ``cem/``. Session
fixtures (registered in conftest.py), so it is trained once per run."""

from __future__ import annotations

import subprocess

import pytest
import torch

from trustser.descriptors import build_caption

LABELS = ("neutral", "happy", "angry", "sad")
TEXTS = ["I am here now.", "Where did you go?", "This is great news!", "Leave me alone."]
EMOS = ["neutral", "sad", "happy", "angry"]
SEDS = [
    dict(pitch="low", volume="normal", speed="slow", gender="male", age="young adult"),
    dict(pitch="high", volume="low", speed="normal", gender="female", age="child"),
    dict(pitch="normal", volume="high", speed="fast", gender="male", age="elderly"),
    dict(pitch="high", volume="high", speed="fast", gender="female", age="middle-aged"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared (autouse where imported)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_corpus(root, clips):
    """A corpus root in the synthetic corpus' layout (``test/metadata.csv``) holding ``clips``,
    one per emotion of EMOS."""
    import csv
    import shutil
    from pathlib import Path

    (Path(root) / "test").mkdir(parents=True)
    with open(Path(root) / "test" / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "emotion"])
        for clip, emo in zip(clips, EMOS):
            shutil.copy2(clip, Path(root) / "test" / Path(clip).name)
            w.writerow([Path(clip).name, emo])
    return Path(root)


def _espeak(path, text, voice="en"):
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)


@pytest.fixture(scope="session")
def explain_clips(tmp_path_factory):
    """Four espeak-ng clips, one per emotion of LABELS (EMOS), with the descriptors SEDS."""
    d = tmp_path_factory.mktemp("clips")
    paths = []
    for i, (t, v) in enumerate(zip(TEXTS, ["en", "en+f3", "en+m3", "en+f2"])):
        _espeak(d / f"u{i}.wav", t, v)
        paths.append(str(d / f"u{i}.wav"))
    return paths


def speech_only(wav, floor=0.01, pad=0.05, sr=16000):
    """The clip between its first and last sample louder than ``floor``, ``pad`` s either side:
    about what a voice-activity detector cuts out of a recording."""
    import numpy as np

    idx = np.flatnonzero(np.abs(wav) > floor)
    return wav[max(0, idx[0] - int(pad * sr)) : idx[-1] + 1 + int(pad * sr)]


def train_explainer(out_dir, audio, captions, steps=130):
    """A tiny SER-SLM over-fitted on ``captions`` of ``audio``, saved to ``out_dir`` with a CEM in
    ``cem/`` (trained on one thread: tiny models run fastest so, and the machine is shared)."""
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.ser_slm import build_tiny_ser_slm

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, proc = build_tiny_ser_slm(
        TEXTS,
        emotion_labels=LABELS,
        vocab_size=600,
        lm_hidden=64,
        encoder_dim=64,
        encoder_layers=1,
        lm_layers=1,
        max_audio_seconds=4,
    )
    enc = proc(audio=list(audio), captions=list(captions))
    inputs = {k: v for k, v in enc.items() if k not in ("sed_token_index", "emotion_token_mask")}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.config.emotion_labels = list(LABELS)
    model.generation_config.max_new_tokens = 60
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    h = model.config.text_config.hidden_size
    cem = CemModel(CemConfig(input_size=5 * h, hidden_size=32, slm_hidden_size=h))
    with torch.no_grad():  # non-trivial BatchNorm statistics so the outputs vary
        for layer in (cem.layer1, cem.layer2, cem.layer3):
            layer.norm.running_var.fill_(0.5)
    cem.save_pretrained(out_dir / "cem")
    torch.set_num_threads(n_threads)
    return out_dir


CAPTIONS = [build_caption(t, e, s) for t, e, s in zip(TEXTS, EMOS, SEDS)]


@pytest.fixture(scope="session")
def explain_model_dir(tmp_path_factory, explain_clips):
    """The tiny SER-SLM that has memorised the four clips' captions, with a CEM in ``cem/``."""
    from trustser.audio import load_audio

    return train_explainer(tmp_path_factory.mktemp("model"), [load_audio(p) for p in explain_clips], CAPTIONS)


@pytest.fixture(scope="session")
def segment_model_dir(tmp_path_factory, explain_clips):
    """As explain_model_dir, also taught the speech-only cut of each clip (what the VAD hands it
    out of a recording), clean and over a -66 dBFS noise floor (test_long_audio's recording), so
    it knows each utterance either way. Without the noisy cuts, whether the model named the
    segments' emotions depended on the CPU's floating-point kernels (enough on one machine, 1 of 4
    on an Intel Xeon, 2026-12-07)."""
    import numpy as np

    from trustser.audio import load_audio

    audio = [load_audio(p) for p in explain_clips]
    cuts = [speech_only(w) for w in audio] + [speech_only(w, pad=0.15) for w in audio]
    rng = np.random.default_rng(1)
    noisy = [c + (5e-4 * rng.standard_normal(c.size)).astype(np.float32) for c in cuts]
    return train_explainer(tmp_path_factory.mktemp("segmodel"), audio + cuts + noisy, CAPTIONS * 5, steps=400)
