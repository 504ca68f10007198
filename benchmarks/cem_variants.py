"""Which CEM training data finds the wrong annotated labels of the target (issue 15, deliverable 1)?

Trains one CEM per variant on a recipe's cached pre-trained SLM and annotated corpus, and measures
each on the target's `dev` annotated captions against the ground truth (`trustser.selection.
selection_quality`: per-field and utterance AUC, ECE, kept-share accuracy beside oracle selection):

- captions: `predicted` (the paper: the SLM's own greedy predictions) or `perturbed` (reliable
  captions with perturbed descriptors; recipe option `cem_training_captions`);
- perturbation: `random` / `adjacent` / `speaker` (`cem_perturbation`);
- captions per utterance: 1 or 4 (+ the unperturbed one; `cem_captions_per_utterance`);
- holdout: with `--holdout-slm` (the pre-trained SLM of a recipe run with `cem_holdout_speakers=N`,
  same seed), every variant again on that SLM with the CEM trained on the N held-out speakers only.

The CEM training rows are built as the recipe's `cem` stage builds them (the reference split's
`_auto` labels as the reliable ones, as with `pretrain_sed_source=auto`; `--reliable truth` for the
ground truth), `--samples` utterances drawn with the seed. Run a recipe first, e.g.

    accelerate launch recipes/sys10.py --output_dir outputs                                # SLM on all speakers
    cp -r outputs/sys10-seed0 outputs/sys10-seed0-all    # keeps the run's stage list (paths relative to outputs/)
    accelerate launch recipes/sys10.py --output_dir outputs --cem_holdout_speakers 8       # SLM without 8 speakers
    python benchmarks/cem_variants.py --slm outputs/sys10-seed0-all/results.json \\
        --holdout-slm outputs/sys10-seed0/results.json --holdout-speakers 8 --out /tmp/cem_variants

`--slm` / `--holdout-slm` take a model folder or a run's results.json (its pre-training stage's
model; `--annotated` then defaults to its annotation stage's data).

Prints one line per variant and writes `results.json` under `--out` (also the last stdout line).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = [  # (name, captions, perturbation, captions per utterance)
    ("predicted", "predicted", "random", 1),
    ("random-c1", "perturbed", "random", 1),
    ("adjacent-c1", "perturbed", "adjacent", 1),
    ("speaker-c1", "perturbed", "speaker", 1),
    ("random-c4", "perturbed", "random", 4),
    ("adjacent-c4", "perturbed", "adjacent", 4),
    ("speaker-c4", "perturbed", "speaker", 4),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--annotated",
        default=None,
        help="the annotate stage's data folder (DatasetDict: reference, train, dev, ...); "
        "default: the annotation stage of --slm's results.json",
    )
    p.add_argument(
        "--slm",
        required=True,
        help="pre-trained SER-SLM folder (model + processor) trained on every reference speaker, "
        "or a run's results.json (its pretrain stage)",
    )
    p.add_argument(
        "--holdout-slm", default=None, help="the same for a run with cem_holdout_speakers=--holdout-speakers"
    )
    p.add_argument("--holdout-speakers", type=int, default=0, help="the cem_holdout_speakers of --holdout-slm's run")
    p.add_argument("--out", default="/tmp/trustser_cem_variants")
    p.add_argument("--reference-split", default="reference")
    p.add_argument("--split", default="dev", help="target split measured (the recipe default is chosen on dev)")
    p.add_argument(
        "--reliable", choices=("auto", "truth"), default="auto", help="labels the CEM training data counts as reliable"
    )
    p.add_argument(
        "--variants",
        default="all",
        help="comma-separated variant names (" + ",".join(v[0] for v in VARIANTS) + ") or 'all'",
    )
    p.add_argument("--samples", type=int, default=1500, help="CEM training utterances (cem_max_samples)")
    p.add_argument("--corrupt-prob", type=float, default=0.3)
    p.add_argument("--balance", default="utterance", choices=("utterance", "field", "none"))
    p.add_argument("--steps", type=int, default=400, help="CEM training steps (cem_max_steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pooling", default="sed_tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-score-rows", type=int, default=None, help="score at most this many rows of --split")
    p.add_argument(
        "--seed", type=int, default=0, help="the recipe seed (holdout speakers, sampling, perturbation, CEM)"
    )
    return p.parse_args(argv)


def log(msg):
    print(f"[cem-variants {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_folder(path: str, stage: str, inner: str) -> Path:
    """``path`` itself, or for a run's results.json the folder of its ``stage`` (+ ``inner``)."""
    p = Path(path)
    if p.suffix != ".json":
        return p
    results = json.loads(p.read_text())
    run_dir = p.parent  # stage paths are relative to the run folder
    for st in results["stages"]:
        if st["name"] == stage:
            folder = Path(st["path"])
            return (folder if folder.is_absolute() else (run_dir / folder).resolve()) / inner
    raise SystemExit(f"{path}: no {stage!r} stage among {[st['name'] for st in results['stages']]}")


def reliable_reference(dd, args):
    """The reference rows with the labels CEM training reads in the plain columns (as the recipe's
    ``_pretrain_split(..., as_reliable=True)``)."""
    from trustser.descriptors import SED_FIELDS

    ref = dd[args.reference_split]
    if "annotation_error" in ref.column_names:
        ref = ref.filter(lambda e: not e, input_columns="annotation_error")
    if args.reliable == "auto":
        ref = ref.remove_columns(list(SED_FIELDS)).rename_columns({f"{f}_auto": f for f in SED_FIELDS})
    return ref


def main(argv=None):
    args = parse_args(argv)
    import datasets
    import numpy as np

    from trustser.cem_features import extract_cem_features, predict_cem
    from trustser.recipe import _load_model
    from trustser.selection import annotation_correctness, selection_quality
    from trustser.trainers.cem import (
        eval_split_by_utterance,
        prepare_cem_training_data,
        split_holdout_speakers,
        train_cem,
    )
    from trustser.utils import atomic_write_json, set_seed

    wanted = [v for v in VARIANTS if args.variants == "all" or v[0] in args.variants.split(",")]
    if not wanted:
        raise SystemExit(f"--variants {args.variants!r}: none of {[v[0] for v in VARIANTS]}")
    if args.holdout_slm and args.holdout_speakers <= 0:
        raise SystemExit("--holdout-slm needs --holdout-speakers N (the cem_holdout_speakers of its recipe run)")
    out_dir = Path(args.out)
    args.annotated = str(stage_folder(args.annotated or args.slm, "annotate", "data"))
    args.slm = str(stage_folder(args.slm, "pretrain", "model"))
    if args.holdout_slm:
        args.holdout_slm = str(stage_folder(args.holdout_slm, "pretrain", "model"))
    dd = datasets.load_from_disk(args.annotated)
    target = dd[args.split]
    if args.max_score_rows:
        target = target.select(range(min(args.max_score_rows, len(target))))
    if annotation_correctness(target) is None:
        raise SystemExit(f"{args.annotated}: split {args.split!r} has no ground truth beside its annotation")
    reference = reliable_reference(dd, args)
    slms = [("all", args.slm, reference)]
    if args.holdout_slm:
        slms.append(
            ("holdout", args.holdout_slm, split_holdout_speakers(reference, args.holdout_speakers, args.seed)[1])
        )

    results = []
    for slm_name, slm_dir, ref in slms:
        slm, processor = _load_model(Path(slm_dir))
        if args.samples and len(ref) > args.samples:
            ref = ref.shuffle(seed=args.seed).select(range(args.samples))
        log(
            f"SLM {slm_name} ({slm_dir}): {len(ref)} CEM training utterances of {len(set(ref['speaker']))} speakers; "
            f"scoring {len(target)} {args.split} captions"
        )
        target_feats = extract_cem_features(
            slm, processor, target, sed_source="auto", pooling=args.pooling, batch_size=args.batch_size
        )
        for name, captions, perturbation, per_utt in wanted:
            set_seed(args.seed)
            t0 = time.time()
            data = prepare_cem_training_data(
                slm,
                processor,
                ref,
                captions=captions,
                corrupt_prob=args.corrupt_prob,
                perturbation=perturbation,
                captions_per_utterance=per_utt,
                pooling=args.pooling,
                batch_size=args.batch_size,
                seed=args.seed,
            )
            fit, held = eval_split_by_utterance(data["utterance"], 0.2)
            cem, report = train_cem(
                data["features"][fit],
                data["labels"][fit],
                eval_features=data["features"][held],
                eval_labels=data["labels"][held],
                output_dir=out_dir / f"{slm_name}-{name}",
                feature_pooling=args.pooling,
                balance=args.balance,
                learning_rate=args.lr,
                slm_hidden_size=slm.config.text_config.hidden_size,
                seed=args.seed,
                training_args={"max_steps": args.steps},
            )
            field_scores = predict_cem(cem, target_feats)
            q = selection_quality(target, field_scores.mean(axis=1), field_scores, seed=args.seed)
            kept90 = next(r for r in q["kept_share_accuracy"] if r["share"] == 0.9)
            row = {
                "slm": slm_name,
                "variant": name,
                "captions": captions,
                "perturbation": perturbation,
                "captions_per_utterance": per_utt,
                "training_rows": int(len(fit)),
                "balanced_rows": report["balanced_rows"],
                "training_positive_rate": float(np.mean(data["labels"][fit])),
                "reference_eval_mean_field_auc": report.get("eval", {}).get("mean_field_auc"),
                "seconds": round(time.time() - t0, 1),
                args.split: q,
            }
            results.append(row)
            auc = " ".join(f"{f}={v:.3f}" for f, v in q["field_auc"].items())
            ece = " ".join(f"{f}={v:.3f}" for f, v in q["field_ece"].items())
            log(
                f"{slm_name:7s} {name:11s} rows={len(fit):5d}  {args.split} utterance AUC {q['utterance_auc']:.3f}  "
                f"ECE {q['utterance_ece']:.3f}  field AUC {auc}  field ECE {ece}  "
                f"kept 90%: {kept90['scores']:.4f} (oracle {kept90['oracle']:.4f}, all {q['kept_share_accuracy'][0]['scores']:.4f})"
            )
    summary = {"annotated": args.annotated, "split": args.split, "settings": vars(args), "variants": results}
    atomic_write_json(out_dir / "results.json", summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
