"""How much of the emotion is in the prosody of one utterance? Upper references for the tiny
SER-SLM's emotion accuracy on the synthetic `test` split (held-out speakers, shifted channel):
scikit-learn classifiers trained on `train`+`dev` from (a) the generator's exact speaker-relative
prosody offsets + true gender/age, (b) the true binned descriptors, (c) the annotator's measured
single-utterance features (Praat F0, RMS dB, phonemes/s, duration), (d) (c) + true gender/age.
The words carry the rest (docs/synthetic.md: text only 0.555, descriptors + text 0.702).

    python benchmarks/emotion_ceiling.py outputs/cache/annotate-<key>/data
"""

from __future__ import annotations

import argparse
import json

import pandas as pd


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "annotated", help="a saved annotated synthetic DatasetDict (train, dev, test with the annotator's features)"
    )
    a = p.parse_args(argv)
    import datasets
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = datasets.load_from_disk(a.annotated)
    frame = lambda split: d[split].remove_columns(["audio"]).to_pandas()
    train = pd.concat([frame("train"), frame("dev")], ignore_index=True)
    test = frame("test")

    def features(df, numeric, categorical):
        x = df[list(numeric)].astype(float).reset_index(drop=True)
        for c in categorical:
            x = x.join(pd.get_dummies(df[c], prefix=c).astype(float).reset_index(drop=True))
        return x

    measured = ("f0_mean", "f0_median", "rms_db", "phonemes_per_second", "duration")
    inputs = {
        "true prosody offsets (pitch_z, volume_z, speed_z) + true gender, age": (
            ("pitch_z", "volume_z", "speed_z"),
            ("gender", "age"),
        ),
        "true binned descriptors (pitch, volume, speed, gender, age)": (
            (),
            ("pitch", "volume", "speed", "gender", "age"),
        ),
        "measured F0, RMS dB, phonemes/s, duration of the utterance": (measured, ()),
        "measured features + true gender, age": (measured, ("gender", "age")),
    }
    out = {}
    for name, (numeric, categorical) in inputs.items():
        xa = features(train, numeric, categorical)
        xb = features(test, numeric, categorical).reindex(columns=xa.columns, fill_value=0.0)
        out[name] = {}
        for model_name, model in (
            ("logistic regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
            ("gradient boosting", HistGradientBoostingClassifier(max_iter=200, random_state=0)),
        ):
            model.fit(xa, train["emotion"])
            out[name][model_name] = round(float((model.predict(xb) == test["emotion"]).mean()), 4)
            print(f"{name:75s} {model_name:20s} test accuracy {out[name][model_name]:.3f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
