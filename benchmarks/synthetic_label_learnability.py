"""How learnable are the synthetic target's true descriptors from one utterance, and how much do
they say about the emotion? (The bracket diagnosis in README "Dev checks".)

Reads an annotated corpus (the recipe's ``annotate`` stage folder: raw features ``f0_mean``,
``rms_db``, ``phonemes_per_second``, ``duration``, the tool's ``<field>_auto`` and the true
``<field>`` columns), fits on ``train`` and reports on ``--split``:

* per prosody field: a gradient-boosting classifier from the acoustics + the speaker's true gender
  and age -> the true label, beside the tool's accuracy (can a model learn the truth at all?);
* emotion from the true descriptors, from the tool's descriptors (logistic regression on one-hot
  values), and from the acoustics directly.

    python benchmarks/synthetic_label_learnability.py --annotated outputs/cache/annotate-<key>/data --split dev
"""

from __future__ import annotations

import argparse
import json

import datasets
import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

PROSODY = ("pitch", "volume", "speed")
VALUES = ("low", "normal", "high", "slow", "fast")


def acoustic_features(split: datasets.Dataset, ages: list[str]) -> np.ndarray:
    female = np.array([g == "female" for g in split["gender"]], float)
    age = np.array([[a == k for k in ages] for a in split["age"]], float)
    return np.c_[split["f0_mean"], split["rms_db"], split["phonemes_per_second"], split["duration"], female, age]


def descriptor_one_hot(split: datasets.Dataset, suffix: str) -> np.ndarray:
    cols = {f: split[f + suffix] for f in PROSODY}
    return np.array([[cols[f][i] == v for f in PROSODY for v in VALUES] for i in range(len(split))], float)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotated", required=True, help="the annotate stage's data folder (a DatasetDict)")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = datasets.load_from_disk(args.annotated)
    train, held = (data[s].remove_columns("audio") for s in ("train", args.split))
    ages = sorted(set(train["age"]))
    x_train, x_held = acoustic_features(train, ages), acoustic_features(held, ages)
    out: dict = {"split": args.split, "n": len(held), "truth_from_acoustics": {}, "tool": {}, "emotion_from": {}}
    for f in PROSODY:
        model = GradientBoostingClassifier(random_state=args.seed).fit(x_train, train[f])
        out["truth_from_acoustics"][f] = round(float(np.mean(model.predict(x_held) == np.array(held[f]))), 3)
        out["tool"][f] = round(float(np.mean(np.array(held[f + "_auto"]) == np.array(held[f]))), 3)
    for name, suffix in (("true_descriptors", ""), ("tool_descriptors", "_auto")):
        model = LogisticRegression(max_iter=2000).fit(descriptor_one_hot(train, suffix), train["emotion"])
        out["emotion_from"][name] = round(
            float(np.mean(model.predict(descriptor_one_hot(held, suffix)) == np.array(held["emotion"]))), 3
        )
    model = GradientBoostingClassifier(random_state=args.seed).fit(x_train, train["emotion"])
    out["emotion_from"]["acoustics"] = round(float(np.mean(model.predict(x_held) == np.array(held["emotion"]))), 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
