"""Figures of the synthetic corpus (docs/synthetic.md):

1. emotion is predictable from the words and from the ground-truth descriptors, each partly:
   logistic regression on text only (bag of words), on descriptors only (one-hot pitch / volume /
   speed / gender / age) and on both (train on reference+train, test on the held-out speakers);
2. (``--audio``) population-wide thresholds on the measured features (Praat mean F0, RMS dB,
   phonemes/s, from trustser.annotation.features) mislabel the speaker-relative truth: fraction
   wrong per field with dataset tertiles (``unified``), SpeechCraft's gender-dependent pitch
   percentiles (``speechcraft``), and per-speaker z-scores + tertiles (``speaker_z``, for scale).

Prints a human-readable table and, last, one JSON line with every figure.

    python benchmarks/synthetic_figures.py --root /tmp/synth --seed 0 --size default --audio
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from trustser.data.synthetic import SPLITS, load_synthetic, synthesize_corpus
from trustser.descriptors import SED_VOCAB

DESCRIPTOR_COLUMNS = ("pitch", "volume", "speed", "gender", "age")


def _frame(root: Path):
    import pandas as pd

    frames = []
    for split in SPLITS:
        df = pd.read_csv(root / split / "metadata.csv", dtype=str, keep_default_na=False)
        df["split"] = split
        df["path"] = [str(root / split / f) for f in df["file_name"]]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def emotion_classifiers(df, seed: int = 0) -> dict[str, float]:
    """Test accuracy of text-only, descriptors-only and combined logistic regressions."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    fit = df[df["split"].isin(["reference", "train"])]
    test = df[df["split"] == "test"]
    bow = CountVectorizer(lowercase=True).fit(fit["text"])
    onehot = OneHotEncoder(categories=[list(SED_VOCAB[c]) for c in DESCRIPTOR_COLUMNS], handle_unknown="ignore")
    onehot.fit(fit[list(DESCRIPTOR_COLUMNS)])
    feats = {
        "text_only": (bow.transform(fit["text"]), bow.transform(test["text"])),
        "descriptors_only": (
            onehot.transform(fit[list(DESCRIPTOR_COLUMNS)]),
            onehot.transform(test[list(DESCRIPTOR_COLUMNS)]),
        ),
    }
    feats["text_and_descriptors"] = (
        hstack([feats["text_only"][0], feats["descriptors_only"][0]]).tocsr(),
        hstack([feats["text_only"][1], feats["descriptors_only"][1]]).tocsr(),
    )
    out = {}
    for name, (xtr, xte) in feats.items():
        clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(xtr, fit["emotion"])
        out[name] = round(float(np.mean(clf.predict(xte) == test["emotion"].to_numpy())), 4)
    out["majority_class"] = round(float(np.mean(test["emotion"] == fit["emotion"].value_counts().idxmax())), 4)
    return out


def _features(job):
    import soundfile as sf

    from trustser.annotation.features import extract_features

    path, text = job
    x, sr = sf.read(path, dtype="float32")
    return extract_features(x, sr, text)


def measure_features(df, num_proc: int) -> dict[str, np.ndarray]:
    jobs = list(zip(df["path"], df["text"]))
    if num_proc > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(num_proc) as pool:
            feats = pool.map(_features, jobs, chunksize=32)
    else:
        feats = [_features(j) for j in jobs]
    return {k: np.array([f[k] for f in feats], dtype=float) for k in ("f0_mean", "rms_db", "phonemes_per_second")}


def _bin(v, lo, hi, names):
    return np.where(v < lo, names[0], np.where(v > hi, names[2], names[1]))


def fixed_threshold_errors(df, feats) -> dict[str, dict[str, float]]:
    """Fraction of wrong labels per split, field and binning method (each split binned on its own,
    as SpeechCraft's tool bins a whole dataset)."""
    raw = {"pitch": np.log2(feats["f0_mean"]), "volume": feats["rms_db"], "speed": np.log(feats["phonemes_per_second"])}
    out: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        m = (df["split"] == split).to_numpy()
        gender = df["gender"].to_numpy()[m]
        speaker = df["speaker"].to_numpy()[m]
        res = {}
        for field, values in raw.items():
            v = values[m]
            truth = df[field].to_numpy()[m]
            names = SED_VOCAB[field]
            ok = np.isfinite(v)
            lo, hi = np.nanpercentile(v, [100 / 3, 200 / 3])
            res[f"{field}/unified"] = float(np.mean(_bin(v, lo, hi, names)[ok] != truth[ok]))
            if field == "pitch":
                pred = np.empty(len(v), dtype=object)
                for g, (a, b) in (("male", (40, 90)), ("female", (10, 60))):
                    gm = gender == g
                    lo2, hi2 = np.nanpercentile(v[gm], [a, b])
                    pred[gm] = _bin(v[gm], lo2, hi2, names)
                res["pitch/speechcraft"] = float(np.mean(pred[ok] != truth[ok]))
            z = np.full(len(v), np.nan)
            for s in np.unique(speaker):
                sm = (speaker == s) & ok
                z[sm] = (v[sm] - v[sm].mean()) / (v[sm].std() + 1e-9)
            lo, hi = np.nanpercentile(z, [100 / 3, 200 / 3])
            res[f"{field}/speaker_z"] = float(np.mean(_bin(z, lo, hi, names)[ok] != truth[ok]))
            res[f"{field}/unmeasured"] = float(np.mean(~ok))
        out[split] = {k: round(v, 4) for k, v in res.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="corpus directory (generated if absent)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="default", choices=["small", "default"])
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--audio", action="store_true", help="also measure the fixed-threshold mislabel rates on the audio")
    args = ap.parse_args(argv)
    num_proc = args.num_proc or len(os.sched_getaffinity(0))

    t0 = time.time()
    synthesize_corpus(args.root, seed=args.seed, size=args.size, num_proc=num_proc)
    t_gen = time.time() - t0
    manifest = json.loads((args.root / "manifest.json").read_text())
    load_synthetic(args.root)  # the loader accepts what the generator wrote
    df = _frame(args.root)
    result = {
        "seed": args.seed,
        "size": args.size,
        "generation_s": round(t_gen, 1),
        "utterances": {s: manifest["splits"][s]["utterances"] for s in SPLITS},
        "speakers": {s: len(manifest["splits"][s]["speakers"]) for s in SPLITS},
        "emotion_accuracy": emotion_classifiers(df, seed=args.seed),
    }
    print("emotion accuracy on test (logistic regression, ground-truth inputs):")
    for k, v in result["emotion_accuracy"].items():
        print(f"  {k:22s} {v:.3f}")
    if args.audio:
        t0 = time.time()
        feats = measure_features(df, num_proc)
        result["fixed_threshold_wrong"] = fixed_threshold_errors(df, feats)
        result["feature_s"] = round(time.time() - t0, 1)
        print("fraction of labels wrong vs speaker-relative truth:")
        for split, res in result["fixed_threshold_wrong"].items():
            print(f"  {split:10s} " + "  ".join(f"{k}={v:.3f}" for k, v in res.items() if not k.endswith("unmeasured")))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
