"""Which CEM training captions make selection work: the paper's (the SLM's own predictions on the
reliable corpus) or ours (reliable captions with descriptors replaced at random)?

Uses a recipe's cached stages (run `accelerate launch recipes/sys10.py` first): the pre-trained
SLM, the synthetic reference split, and the annotated `train` split with its ground truth.

    python benchmarks/cem_training_captions.py --output-dir outputs --mode perturbed --samples 1500

Prints the utterance AUC (annotated label set entirely right vs at least one field wrong), per-field
AUCs, and the true descriptor accuracy of the top 90/80/70/60% by confidence; final JSON line.
"""

from __future__ import annotations

import argparse
import glob
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", default="outputs")
    ap.add_argument("--mode", choices=["perturbed", "predicted"], default="perturbed")
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--score-rows", type=int, default=1200)
    ap.add_argument("--pooling", default="sed_tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import datasets
    import torch

    from trustser.data import load_corpus
    from trustser.descriptors import SED_FIELDS
    from trustser.evaluation import binary_auc
    from trustser.recipe import load_ser_slm
    from trustser.selection import score_confidence
    from trustser.trainers.cem import prepare_cem_data, prepare_cem_data_perturbed, train_cem

    torch.manual_seed(args.seed)
    cache = f"{args.output_dir}/cache"
    slm, proc = load_ser_slm(sorted(glob.glob(f"{cache}/pretrain-*/model"))[0])
    corpus = load_corpus("synthetic", sorted(glob.glob(f"{cache}/corpus-*/corpus"))[0])
    ref = corpus["reference"].shuffle(seed=args.seed).select(range(min(args.samples, len(corpus["reference"]))))
    train = datasets.load_from_disk(sorted(glob.glob(f"{cache}/annotate-*/data"))[0])["train"]
    train = train.select(range(min(args.score_rows, len(train))))
    right = np.array([[train[f][i] == train[f + "_auto"][i] for f in SED_FIELDS] for i in range(len(train))])
    if args.mode == "perturbed":
        data = prepare_cem_data_perturbed(slm, proc, ref, pooling=args.pooling, batch_size=32, seed=args.seed)
    else:
        data = prepare_cem_data(slm, proc, ref, pooling=args.pooling, batch_size=32)
    cem, _ = train_cem(
        data["features"],
        data["labels"],
        output_dir="/tmp/trustser_cem_bench",
        feature_pooling=args.pooling,
        slm_hidden_size=slm.config.text_config.hidden_size,
        training_args={"max_steps": 400},
        save=False,
        reliability_plot=False,
        seed=args.seed,
    )
    scores, field_scores = score_confidence(cem, slm, proc, train, batch_size=32, return_field_scores=True)
    out = {
        "mode": args.mode,
        "pooling": args.pooling,
        "cem_rows": len(ref),
        "scored_rows": len(train),
        "utterance_auc": binary_auc(scores, right.all(1)),
        "field_auc": {f: binary_auc(field_scores[:, j], right[:, j]) for j, f in enumerate(SED_FIELDS)},
        "full_mean_field_accuracy": float(right.mean()),
    }
    order = np.argsort(-scores, kind="stable")
    for r in (0.9, 0.8, 0.7, 0.6):
        out[f"kept{int(r * 100)}_mean_field_accuracy"] = float(right[order[: int(r * len(train))]].mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
