"""Does the rectification reward single out the wrong labels, utterance by utterance? (Issue 15.)

The controller can only learn to modify the wrong labels if the reward it is trained on prefers a
modification where the annotated label is wrong and retention where it is right. This measures that
signal directly, without any controller: for every utterance of ``--split`` and every field, the
reward (minus the emotion-word cross-entropy of the true emotion, as ``SedRectifyTrainer`` computes
it) of the annotated caption and of the caption with that one field set to each other value.

Per field and scorer:

* ``truth_gain``: over the wrong labels, the reward gained by replacing the label with the true
  value (mean, nats) and the share of wrong labels where it is positive (the best-case repair);
* ``modify_gain``: the reward gained by a "modify" action on average, its replacement drawn as
  the controller draws it (``--modify-strategy``: the recipe's ``adjacent`` neighbouring value, or
  ``uniform`` over the other values); mean over wrong and over right labels, and over all labels
  (``modify_gain_mean``, no ground truth needed: a field where a modification does not cost reward
  on average is one where the reward cannot tell a repair from a corruption; leave it out of
  ``rectify_fields``), and the mean size of the gain (``modify_gain_abs_mean``, no ground truth
  either: a field whose modifications move the reward by less than ``modify_cost`` is one the
  scorer's emotion hardly reads, so no modification of it can pay for itself);
* ``modify_gain_auc``: its ROC AUC for "the annotated label is wrong". A controller whose modify
  probability followed this expected gain exactly would separate wrong from right labels this well
  and no better; issue 15's target is a modify-probability AUC of 0.70.

``--joint N`` asks whether the gains add up, which the bandit (``controller_bandit.py``) assumes and
the trainer's per-field credit relies on: for the first N utterances it also scores the captions
with two prosody fields modified at once (each to its first ``adjacent`` replacement) and reports,
per field f and partner h, how the gain of modifying f *given* h is modified, r(f+h) - r(h) (what
per-field credit compares), agrees with f's gain alone: correlation, sign agreement and the mean
absolute interaction beside the mean absolute single-field gain.

Beside it, ``--context-auc`` asks whether the information is there at all: a gradient-boosting
classifier from what a ``controller_speaker_context`` controller reads besides the audio (its
speaker-relative prosody and the annotated labels) to "the label is wrong", fitted on ``train``
and scored on ``dev`` (ROC AUC per prosody field, no scorer involved).

Scorers: any saved SER-SLM folders, e.g. the recipe's pre-trained SLM (``reward_scorer: frozen``
scores with it) and a post-trained one (``policy``, the SLM after training on the labels)::

    python benchmarks/reward_signal.py outputs/cache/annotate-<key>/data \
        outputs/cache/pretrain-<key>/model outputs/cache/posttrain-<key>/model --split train --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from descriptor_exposure import emotion_scores, load_split  # noqa: E402

from trustser.descriptors import SED_FIELDS, SED_VOCAB, build_caption  # noqa: E402
from trustser.evaluation import binary_auc  # noqa: E402


def alternatives(row: dict) -> list[tuple[str, str]]:
    """``(field, value)`` of every single-field change of the row's annotated descriptors."""
    return [(f, v) for f in SED_FIELDS for v in SED_VOCAB[f] if v != row[f + "_auto"]]


def replacements(field: str, value: str, strategy: str) -> list[str]:
    """The values a "modify" of ``value`` can draw (``modify_labels``): its neighbours in the field's
    ordered vocabulary (``adjacent``) or every other value (``uniform``)."""
    vocab = SED_VOCAB[field]
    if strategy == "uniform":
        return [v for v in vocab if v != value]
    i = vocab.index(value)
    return [vocab[j] for j in (i - 1, i + 1) if 0 <= j < len(vocab)]


def field_signal(
    rows: list[dict], alts: list[list[tuple[str, str]]], logp: np.ndarray, strategy: str = "adjacent"
) -> dict:
    """Per field: the truth gain over wrong labels, a modification's mean gain (replacement drawn by
    ``strategy``) over wrong and right labels and its AUC for "wrong", from ``logp`` (n, 1 + changes):
    column 0 is the annotated caption."""
    out = {}
    for f in SED_FIELDS:
        wrong, truth_gain, modify_gain = [], [], []
        for i, (r, a) in enumerate(zip(rows, alts)):
            cols = [1 + j for j, (g, _) in enumerate(a) if g == f]
            gains = {a[c - 1][1]: logp[i, c] - logp[i, 0] for c in cols}
            is_wrong = r[f + "_auto"] != r[f]
            wrong.append(is_wrong)
            modify_gain.append(float(np.mean([gains[v] for v in replacements(f, r[f + "_auto"], strategy)])))
            if is_wrong and r[f] in gains:
                truth_gain.append(gains[r[f]])
        wrong_arr, gain_arr = np.array(wrong), np.array(modify_gain)
        out[f] = {
            "n": len(rows),
            "wrong": int(wrong_arr.sum()),
            "truth_gain_mean": round(float(np.mean(truth_gain)), 4) if truth_gain else None,
            "truth_gain_positive": round(float(np.mean(np.array(truth_gain) > 0)), 4) if truth_gain else None,
            "modify_gain_wrong": round(float(gain_arr[wrong_arr].mean()), 4) if wrong_arr.any() else None,
            "modify_gain_right": round(float(gain_arr[~wrong_arr].mean()), 4) if (~wrong_arr).any() else None,
            "modify_gain_mean": round(float(gain_arr.mean()), 4),
            "modify_gain_abs_mean": round(float(np.abs(gain_arr).mean()), 4),
            "modify_gain_auc": round(binary_auc(gain_arr, wrong_arr.astype(float)), 4),
        }
    return out


JOINT_FIELDS = ("pitch", "volume", "speed")


def joint_changes(row: dict) -> list[tuple[tuple[str, str], ...]]:
    """The two-field modifications ``--joint`` scores: every pair of ``JOINT_FIELDS``, each field set
    to its first ``adjacent`` replacement."""
    first = {f: replacements(f, row[f + "_auto"], "adjacent")[0] for f in JOINT_FIELDS}
    return [((f, first[f]), (h, first[h])) for i, f in enumerate(JOINT_FIELDS) for h in JOINT_FIELDS[i + 1 :]]


def joint_additivity(alts: list, joints: list, single: np.ndarray, joint: np.ndarray) -> dict:
    """Per field f: over utterances and partners h, the conditional gain r(f+h) - r(h) against the
    single gain r(f) - r(0). ``single`` (n, 1 + changes) as ``field_signal``'s ``logp`` for the same
    rows; ``joint`` (n, 1 + pairs): column 0 the annotated caption, then ``joints``' captions."""
    cond, alone = {f: [] for f in JOINT_FIELDS}, {f: [] for f in JOINT_FIELDS}
    for i, (alt, pairs) in enumerate(zip(alts, joints)):
        gain = {change: single[i, 1 + j] - single[i, 0] for j, change in enumerate(alt)}
        for c, pair in enumerate(pairs):
            both = joint[i, 1 + c] - joint[i, 0]
            for me, other in (pair, pair[::-1]):
                cond[me[0]].append(both - gain[other])
                alone[me[0]].append(gain[me])
    out = {}
    for f in JOINT_FIELDS:
        c, a = np.array(cond[f]), np.array(alone[f])
        out[f] = {
            "pairs": len(c),
            "correlation": round(float(np.corrcoef(c, a)[0, 1]), 4),
            "sign_agreement": round(float(np.mean(np.sign(c) == np.sign(a))), 4),
            "mean_abs_single_gain": round(float(np.abs(a).mean()), 4),
            "mean_abs_interaction": round(float(np.abs(c - a).mean()), 4),
        }
    return out


def context_auc(train, held_out) -> dict:
    """Per prosody field: ROC AUC on ``held_out`` of a classifier fitted on ``train`` (annotated
    ``datasets.Dataset`` splits) from the speaker-relative prosody and the annotated prosody labels
    to "the annotated label is wrong"."""
    from sklearn.ensemble import GradientBoostingClassifier

    from trustser.trainers.speaker_context import speaker_relative_prosody

    prosody = ("pitch", "volume", "speed")

    def inputs(ds):
        labels = [[float(r[f + "_auto"] == v) for f in prosody for v in SED_VOCAB[f]] for r in ds]
        return np.hstack([speaker_relative_prosody(ds), np.asarray(labels)])

    x_train, x_held = inputs(train), inputs(held_out)
    out = {}
    for f in prosody:
        y_train = np.array([r[f + "_auto"] != r[f] for r in train], dtype=float)
        y_held = np.array([r[f + "_auto"] != r[f] for r in held_out], dtype=float)
        clf = GradientBoostingClassifier(random_state=0).fit(x_train, y_train)
        out[f] = round(binary_auc(clf.predict_proba(x_held)[:, 1], y_held), 4)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("annotated", help="a saved annotated DatasetDict (the recipe's annotate stage, /data)")
    p.add_argument("models", nargs="+", help="saved SER-SLM folders to score with")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=0, help="first N utterances only (0: all)")
    p.add_argument("--modify-strategy", default="adjacent", choices=("adjacent", "uniform"))
    p.add_argument(
        "--context-auc",
        action="store_true",
        help="also: how well the speaker context and annotated labels predict a wrong label (train -> dev)",
    )
    p.add_argument(
        "--table",
        default=None,
        help="also save the first scorer's reward table (.npz: rewards, changes, labels, speaker context) "
        "for benchmarks/controller_bandit.py",
    )
    p.add_argument(
        "--joint",
        type=int,
        default=0,
        help="also: for the first N utterances, do two-field modifications' gains add up? (first scorer)",
    )
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import datasets
    import torch

    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

    torch.manual_seed(0)
    table, audio, rows = load_split(a.annotated, a.split, a.limit)
    alts = [alternatives(r) for r in rows]
    captions = []
    for r, alt in zip(rows, alts):
        annotated = {f: r[f + "_auto"] for f in SED_FIELDS}
        captions.append(
            [build_caption(r["text"], r["emotion"], annotated)]
            + [build_caption(r["text"], r["emotion"], {**annotated, f: v}) for f, v in alt]
        )
    results = {}
    for folder in a.models:
        model = SerSlmForConditionalGeneration.from_pretrained(folder).eval()
        processor = SerSlmProcessor.from_pretrained(folder)
        logp = emotion_scores(model, processor, audio, captions, processor.f0_tracks_of(rows, audio))
        results[folder] = field_signal(rows, alts, logp, a.modify_strategy)
        if a.table and folder == a.models[0]:
            from trustser.trainers.speaker_context import speaker_relative_prosody

            np.savez(
                a.table,
                logp=logp,
                changes=np.array([[f"{f}={v}" for f, v in alt] for alt in alts]),
                annotated=np.array([[r[f + "_auto"] for f in SED_FIELDS] for r in rows]),
                truth=np.array([[r[f] for f in SED_FIELDS] for r in rows]),
                context=speaker_relative_prosody(table),
            )
        print(folder)
        for f, s in results[folder].items():
            print(f"  {f:7s} {json.dumps(s)}")
        if a.joint and folder == a.models[0]:
            n = min(a.joint, len(rows))
            joints = [joint_changes(r) for r in rows[:n]]
            joint_captions = [
                [captions[i][0]]
                + [
                    build_caption(r["text"], r["emotion"], {**{f: r[f + "_auto"] for f in SED_FIELDS}, **dict(pair)})
                    for pair in joints[i]
                ]
                for i, r in enumerate(rows[:n])
            ]
            joint = emotion_scores(
                model, processor, audio[:n], joint_captions, processor.f0_tracks_of(rows[:n], audio[:n])
            )
            additivity = joint_additivity(alts[:n], joints, logp[:n], joint)
            print("  joint two-field modifications:", json.dumps(additivity))
    report = {"split": a.split, "n": len(rows), "modify_strategy": a.modify_strategy, "scorers": results}
    if a.joint:
        report["joint_additivity"] = {"utterances": min(a.joint, len(rows)), "fields": additivity}
    if a.context_auc:
        splits = datasets.load_from_disk(a.annotated)
        report["context_auc"] = context_auc(
            splits["train"].remove_columns("audio"), splits["dev"].remove_columns("audio")
        )
        print("context -> wrong label, AUC on dev:", json.dumps(report["context_auc"]))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
