"""Throughput of explained predictions: batched (default 16 files per batch) against one file at a
time, on the tiny preset briefly trained on the benchmark's own espeak-ng clips (so captions parse
and the teacher-forced pass for probabilities and CEM confidences runs too).

    python benchmarks/explain.py [--files 32] [--batch-size 16] [--train-steps 60] [--threads 2]

Prints progress lines and, last, one JSON line with the timings and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

SENTENCES = [
    "I can't believe you did that.",
    "Where are my keys?",
    "This is the best day ever!",
    "Leave me alone, please.",
    "The meeting starts at nine.",
    "We won the game!",
    "Why would you say that?",
    "I miss her so much.",
]
VOICES = ["en", "en+f3", "en+m3", "en+f2", "en-us", "en-us+f4", "en+m5", "en+f5"]
EMOTIONS = ["angry", "neutral", "happy", "angry", "neutral", "happy", "sad", "sad"]


def make_clips(folder: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = folder / f"clip{i:03d}.wav"
        speed = 140 + 15 * (i % 5)
        subprocess.run(
            ["espeak-ng", "-v", VOICES[i % len(VOICES)], "-s", str(speed), "-w", str(p), SENTENCES[i % len(SENTENCES)]],
            check=True,
            capture_output=True,
        )
        paths.append(str(p))
    return paths


def make_arrays(n: int) -> list[dict]:
    """Voiced-like harmonic tones with a syllable envelope (no espeak-ng / soundfile needed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sr, dur = 16000, 1.5 + 0.25 * (i % 5)
        t = np.arange(int(sr * dur)) / sr
        f0 = 110 + 25 * (i % 8) + 10 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        wav = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
        wav = (0.1 + 0.05 * (i % 3)) * wav / np.abs(wav).max() + 0.003 * rng.standard_normal(t.size)
        out.append({"array": wav.astype(np.float32), "sampling_rate": sr, "path": f"tone{i:03d}"})
    return out


def _load(x):
    from trustser.audio import load_audio

    return x["array"] if isinstance(x, dict) else load_audio(x)


def build_model(paths: list, steps: int, out: Path, device: str = "cpu"):
    import torch

    from trustser.descriptors import build_caption
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.ser_slm import build_tiny_ser_slm

    model, proc = build_tiny_ser_slm(SENTENCES, emotion_labels=("neutral", "happy", "angry", "sad"), seed=0)
    if steps:
        seds = [
            dict(pitch=p, volume=v, speed=s, gender=g, age=a)
            for p, v, s, g, a in [
                ("high", "high", "fast", "male", "young adult"),
                ("normal", "normal", "normal", "female", "middle-aged"),
            ]
        ]
        k = min(len(paths), 16)
        caps = [
            build_caption(SENTENCES[i % len(SENTENCES)], EMOTIONS[i % len(EMOTIONS)], seds[i % 2]) for i in range(k)
        ]
        enc = proc(audio=[_load(p) for p in paths[:k]], captions=caps)
        model.to(device)
        inputs = {key: v.to(device) for key, v in enc.items() if key not in ("sed_token_index", "emotion_token_mask")}
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(steps):
            loss = model(**inputs).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval().cpu()
    model.config.emotion_labels = ["neutral", "happy", "angry", "sad"]
    model.save_pretrained(out)
    proc.save_pretrained(out)
    h = model.config.text_config.hidden_size
    CemModel(CemConfig(input_size=5 * h, slm_hidden_size=h)).save_pretrained(out / "cem")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--audio",
        choices=("espeak", "synthetic"),
        default="espeak",
        help="espeak-ng files (decoded per file) or in-memory harmonic tones",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import trustser  # noqa: F401
    from trustser.explain import load_explainer

    with tempfile.TemporaryDirectory(prefix="trustser-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        paths = make_clips(tmp / "clips", args.files) if args.audio == "espeak" else make_arrays(args.files)
        t = time.perf_counter()
        build_model(paths, args.train_steps, tmp / "model", args.device)
        print(f"model ready in {time.perf_counter() - t:.1f} s", flush=True)
        pipe = load_explainer(str(tmp / "model"), device=args.device)
        pipe(paths[:2], batch_size=2, errors="record")  # warm-up

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        t = time.perf_counter()
        batched = pipe(paths, batch_size=args.batch_size, errors="record")
        sync()
        t_batched = time.perf_counter() - t
        print(f"batch {args.batch_size}: {t_batched:.2f} s", flush=True)
        t = time.perf_counter()
        single = pipe(paths, batch_size=1, errors="record")
        sync()
        t_single = time.perf_counter() - t
        print(f"one at a time: {t_single:.2f} s", flush=True)
    result = {
        "benchmark": "explain",
        "files": len(paths),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": str(pipe.device),
        "audio": args.audio,
        "train_steps": args.train_steps,
        "batched_seconds": round(t_batched, 3),
        "single_seconds": round(t_single, 3),
        "batched_files_per_second": round(len(paths) / t_batched, 2),
        "single_files_per_second": round(len(paths) / t_single, 2),
        "speedup": round(t_single / t_batched, 2),
        "errors": sum(r["error"] is not None for r in batched),
        "parsed_share": sum(not r["unparsed"] and r["error"] is None for r in batched) / len(paths),
        "with_trust_score": sum(r["trust"] is not None for r in batched) / len(paths),
        "identical_captions": sum(a["caption"] == b["caption"] for a, b in zip(batched, single)) / len(paths),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
