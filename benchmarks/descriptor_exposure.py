"""Does a trained SER-SLM's emotion follow the descriptors it is given? (The bracket diagnosis in
README "Dev checks".)

For each utterance of ``--split`` the caption is teacher-forced up to the emotion word with the
descriptors from one source, and the emotion is the one whose word the SLM finds most probable:

* ``own``: the descriptors the SLM generated itself (``predictions.json`` of its run, so only on
  the split it was evaluated on), i.e. what greedy decoding conditions on, but with the reference
  transcript;
* ``tool``: the annotation tool's labels (``<field>_auto``), what Sys. 4 trained on;
* ``true``: the ground truth, what the oracle-labels bracket trained on.

If the emotion accuracy with ``true`` is far above ``own``, the model relies on the descriptors
and its own descriptor perception is what limits it (exposure bias of the caption chain).

Beside it, a model that *only* reads the caption: a logistic regression from the five descriptors
to the emotion, fitted on ``train`` with the labels the run was trained on (``--trained-on``: the
tool's ``auto`` or the ``true`` ones), applied to the run's own generated descriptors
(``caption_reader_own``) and to the true ones (``caption_reader_true``). It says what the paper's
mechanism could give with the descriptors this SLM perceives.

    python benchmarks/descriptor_exposure.py outputs_dev/cache/annotate-<key>/data \
        outputs_dev/sys4-seed0 outputs_dev/oracle_labels-seed0 --split dev --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

from trustser.data.synthetic import speaker_group_kind
from trustser.descriptors import SED_FIELDS


@torch.no_grad()
def emotion_scores(model, processor, audio, captions_per_emotion, f0_tracks=None, batch_size: int = 16) -> np.ndarray:
    """(n_utts, n_emotions) log-probability of each emotion word given its caption: the caption loss
    of the trainers (``caption_token_nll``, each utterance's audio encoded once for its k captions)."""
    from trustser.trainers.rectify import emotion_cross_entropy
    from trustser.trainers.sft import caption_token_nll

    n, k = len(audio), len(captions_per_emotion[0])
    out = np.zeros((n, k))
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        f0 = [f0_tracks[i] for i in idx] if f0_tracks is not None else None
        utts = processor(audio=[audio[i] for i in idx], f0_tracks=f0)  # audio inputs, once per utterance
        caps = processor(
            audio=[audio[i] for i in idx for _ in range(k)],
            captions=[c for i in idx for c in captions_per_emotion[i]],
            f0_tracks=[t for t in f0 for _ in range(k)] if f0 is not None else None,
        )
        audio_inputs = {key: v for key, v in utts.items() if key not in ("input_ids", "attention_mask")}
        nll, _, emo, _ = caption_token_nll(model, caps, audio_inputs=audio_inputs, audio_repeats=k)
        out[idx] = (-emotion_cross_entropy(nll, emo)).reshape(len(idx), k).numpy()
    return out


def load_split(annotated: str, split: str, limit: int = 0):
    """One split of a saved annotated DatasetDict: the split without its audio column, each row's
    16 kHz waveform, and the rows as dicts (the first ``limit`` only when ``limit`` > 0)."""
    import datasets

    ds = datasets.load_from_disk(annotated)[split]
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    audio = [np.asarray(x["array"], dtype=np.float32) for x in ds["audio"]]
    table = ds.remove_columns("audio")
    return table, audio, table.to_list()


def caption_reader(train_rows, rows, own, suffix: str) -> dict:
    """Emotion accuracy % of a logistic regression from the descriptors alone (fitted on
    ``train_rows``' ``<field><suffix>`` labels), on ``rows`` from the run's own descriptors
    (where it has them) and from the true ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    x = [[r[f + suffix] for f in SED_FIELDS] for r in train_rows]
    enc = OneHotEncoder(handle_unknown="ignore").fit(x)
    clf = LogisticRegression(max_iter=2000).fit(enc.transform(x), [r["emotion"] for r in train_rows])
    gold = np.array([r["emotion"] for r in rows])
    out = {
        "caption_reader_true": round(
            100 * float(np.mean(clf.predict(enc.transform([[r[f] for f in SED_FIELDS] for r in rows])) == gold)), 2
        )
    }
    if all(r["id"] in own for r in rows):
        x_own = [[own[r["id"]][f] or "" for f in SED_FIELDS] for r in rows]
        out["caption_reader_own"] = round(100 * float(np.mean(clf.predict(enc.transform(x_own)) == gold)), 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("annotated", help="a saved annotated DatasetDict (the recipe's annotate stage, /data)")
    p.add_argument("runs", nargs="+", help="run folders (a saved SER-SLM with its predictions.json)")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=0, help="first N utterances only (0: all)")
    p.add_argument(
        "--trained-on",
        default=None,
        help="comma-separated 'auto'/'true' per run: the descriptor labels it was post-trained on (for the caption reader)",
    )
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import datasets

    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor
    from trustser.models.ser_slm.processing_ser_slm import DEFAULT_SED_TEMPLATE

    torch.manual_seed(0)
    _, audio, rows = load_split(a.annotated, a.split, a.limit)
    trained_on = dict(zip(a.runs, a.trained_on.split(","))) if a.trained_on else {}
    if trained_on and (len(trained_on) != len(a.runs) or set(trained_on.values()) - {"auto", "true"}):
        p.error("--trained-on needs one of 'auto'/'true' per run")
    train_rows = datasets.load_from_disk(a.annotated)["train"].remove_columns("audio").to_list() if trained_on else []
    results = {}
    for run in a.runs:
        model = SerSlmForConditionalGeneration.from_pretrained(run).eval()
        processor = SerSlmProcessor.from_pretrained(run)
        emotions = list(model.config.emotion_labels or sorted({r["emotion"] for r in rows}))
        f0_tracks = [processor.f0_track(w) for w in audio] if processor.f0_stream else None
        own = {x["id"]: x for x in json.loads((Path(run) / "predictions.json").read_text())}
        res = {}
        # the run's predictions cover the split it was evaluated on; elsewhere there is no "own"
        sources = ("own", "tool", "true") if all(r["id"] in own for r in rows) else ("tool", "true")
        for source in sources:

            def sed(r, f):
                if source == "own":
                    return own[r["id"]][f] or r[f]
                return r[f + "_auto"] if source == "tool" else r[f]

            caps = [
                [
                    DEFAULT_SED_TEMPLATE.format(text=r["text"], emotion=e, **{f: sed(r, f) for f in SED_FIELDS})
                    for e in emotions
                ]
                for r in rows
            ]
            pred = emotion_scores(model, processor, audio, caps, f0_tracks).argmax(1)
            by_kind = collections.defaultdict(list)
            for r, j in zip(rows, pred):
                hit = emotions[j] == r["emotion"]
                by_kind["all"].append(hit)
                by_kind[speaker_group_kind(r["group"])].append(hit)
            res[source] = {k: round(100 * float(np.mean(v)), 2) for k, v in by_kind.items()}
        if trained_on:
            res.update(caption_reader(train_rows, rows, own, suffix="_auto" if trained_on[run] == "auto" else ""))
        results[Path(run).name] = res
        print(Path(run).name, json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps({"split": a.split, "n": len(rows), "runs": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
