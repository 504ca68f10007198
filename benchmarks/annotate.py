"""Speed of the annotator's per-clip work on one core: signal features (F0, level, phoneme
rate) and the offline classifiers' embedding, as utterances/second and real-time factor
(audio seconds per compute second). Last line: JSON.

    python benchmarks/annotate.py --root /tmp/synth_small --split train --limit 200
    python benchmarks/annotate.py            # espeak-ng clips generated on the fly
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np


def espeak_clips(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    from trustser.audio import load_audio

    rng = np.random.default_rng(seed)
    words = "the meeting is on Tuesday at noon and the train leaves from platform four after lunch".split()
    waves, texts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(5, 14))))
            path = os.path.join(tmp, f"{i}.wav")
            subprocess.run(
                [
                    "espeak-ng",
                    "-v",
                    "en-us",
                    "-p",
                    str(int(rng.integers(20, 80))),
                    "-s",
                    str(int(rng.integers(130, 200))),
                    "-w",
                    path,
                    text,
                ],
                check=True,
            )
            waves.append(load_audio(path))
            texts.append(text)
    return waves, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="synthetic corpus directory (default: generate espeak-ng clips)")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timing passes; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from trustser.annotation.features import acoustic_embedding, count_phonemes, signal_features

    if args.root:
        from trustser.data.synthetic import load_synthetic

        ds = load_synthetic(args.root, splits=[args.split])[args.split]
        ds = ds.select(range(min(args.limit, len(ds))))
        waves = [np.asarray(r["audio"]["array"], dtype=np.float32) for r in ds]
        texts = ds["text"]
        source = f"{args.root}:{args.split}"
    else:
        waves, texts = espeak_clips(args.limit, args.seed)
        source = "espeak-ng clips"
    sr = 16000
    audio_s = sum(len(w) for w in waves) / sr

    def timed(fn):
        # CPU time of this process (not wall time): on a shared machine other processes' load
        # would otherwise count against us; wall times are printed for reference
        best, best_wall = float("inf"), float("inf")
        for _ in range(args.repeats):
            t, w = time.process_time(), time.perf_counter()
            fn()
            best, best_wall = min(best, time.process_time() - t), min(best_wall, time.perf_counter() - w)
        walls.append(best_wall)
        return best

    walls: list[float] = []
    feats = [signal_features(w, sr) for w in waves]  # warm-up (+ F0 tracks for the embedding)
    t_signal = timed(lambda: [signal_features(w, sr) for w in waves])
    t_phon = timed(lambda: count_phonemes(texts))
    t_emb = timed(lambda: [acoustic_embedding(w, sr, f0) for w, (_, f0) in zip(waves, feats)])
    n = len(waves)
    result = {
        "benchmark": "annotation_features",
        "source": source,
        "utterances": n,
        "audio_seconds": round(audio_s, 2),
        "threads": 1,
        "timing": "process CPU time, best of repeats",
        "signal_features": {
            "utt_per_s": round(n / (t_signal + t_phon), 1),
            "rtf": round(audio_s / (t_signal + t_phon), 1),
            "ms_per_utt": round(1000 * (t_signal + t_phon) / n, 2),
        },
        "phoneme_count_ms_per_utt": round(1000 * t_phon / n, 3),
        "classifier_embedding": {
            "utt_per_s": round(n / t_emb, 1),
            "rtf": round(audio_s / t_emb, 1),
            "ms_per_utt": round(1000 * t_emb / n, 2),
        },
        "all_per_clip_work": {
            "utt_per_s": round(n / (t_signal + t_phon + t_emb), 1),
            "rtf": round(audio_s / (t_signal + t_phon + t_emb), 1),
        },
        "wall_seconds": {"signal": round(walls[0], 3), "phonemes": round(walls[1], 3), "embedding": round(walls[2], 3)},
        "load_average": os.getloadavg()[0],
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"{n} utterances, {audio_s:.1f} s of audio ({source}), one thread")
    print(
        f"signal features: {result['signal_features']['ms_per_utt']} ms/utt, {result['signal_features']['rtf']}x real time"
    )
    print(
        f"classifier embedding: {result['classifier_embedding']['ms_per_utt']} ms/utt, {result['classifier_embedding']['rtf']}x real time"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
