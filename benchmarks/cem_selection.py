"""CEM + confidence-based selection on the synthetic corpus (paper section 2).

1. synthetic corpus (generated if absent); the ``train`` split annotated with the SpeechCraft-style
   tool (noisy ``<field>_auto`` labels), the ``reference`` split keeps its reliable labels;
2. a tiny SER-SLM pre-trained briefly on ``reference`` (SerSlmSFTTrainer);
3. CEM training data: the SLM's greedy captions on ``reference``, per-field correctness against the
   reliable labels, features from the SLM teacher-forced with its predicted descriptors;
   CEM trained per pooling (``sed_tokens`` and ``mean``) on 80 % of the reference rows, evaluated on
   the other 20 % (AUC / NCE / ECE per field, reliability diagram);
4. target: the CEM scores the *annotated* captions of ``train``; the utterance confidence is
   compared with the ground truth (annotation entirely right vs at least one wrong field: AUC) and
   the top 90/80/70/60 % are kept; their true descriptor accuracy is tabulated.

Every stage is cached under ``--work`` (delete a sub-directory to redo it). The last stdout line is
one JSON object with the figures.

    python benchmarks/cem_selection.py --work /tmp/trustser-cem-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)
POOLINGS = ("sed_tokens", "mean")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/trustser-cem-bench", help="cache/output directory")
    p.add_argument(
        "--corpus", default=None, help="synthetic corpus directory (default: WORK/corpus; generated if absent)"
    )
    p.add_argument("--size", default="default", choices=("small", "default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotation", default="speechcraft", help="annotation method for the target split")
    p.add_argument(
        "--slm",
        default=None,
        help="use this pre-trained SER-SLM (save_pretrained dir with its processor) "
        "instead of pre-training one, e.g. benchmarks/pretrain_tiny.py --save's output-dir/model",
    )
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--lm-hidden", type=int, default=128, help="tiny SER-SLM LLM width")
    p.add_argument("--encoder-dim", type=int, default=64, help="tiny SER-SLM encoder width")
    p.add_argument("--ref-rows", type=int, default=1000, help="reference rows the CEM data is built from")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cem-epochs", type=float, default=30)
    p.add_argument("--cem-lr", type=float, default=1e-3)
    p.add_argument("--balance", default="utterance", choices=("utterance", "field", "none"))
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def log(msg):
    print(f"[cem-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus_and_annotation(args, work: Path):
    import datasets

    from trustser.annotation import annotate
    from trustser.data.synthetic import load_synthetic

    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    t = time.time()
    dd = load_synthetic(corpus, generate=True, seed=args.seed, size=args.size)
    log(f"corpus {corpus}: { ({k: len(v) for k, v in dd.items()}) } ({time.time() - t:.0f}s)")
    ann_dir = work / f"annotated_{args.annotation}"
    if not (ann_dir / "dataset_info.json").exists():
        t = time.time()
        ann = annotate(dd["train"], method=args.annotation, reference=dd["reference"], seed=args.seed)
        from trustser.utils import atomic_directory

        with atomic_directory(ann_dir) as tmp:
            ann.save_to_disk(str(tmp))
        log(f"annotated train ({args.annotation}) in {time.time() - t:.0f}s")
    return dd["reference"], datasets.load_from_disk(str(ann_dir))


def pretrain_slm(args, work: Path, reference, target):
    from trustser.descriptors import EMOTION_LABELS
    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor, build_tiny_ser_slm
    from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer
    from trustser.utils import atomic_directory

    slm_dir = Path(args.slm) if args.slm else work / f"slm_{args.pretrain_steps}_{args.lm_hidden}_{args.encoder_dim}"
    if args.slm and not (slm_dir / "config.json").exists():
        raise FileNotFoundError(f"--slm {slm_dir}: no config.json (expected a save_pretrained SER-SLM directory)")
    if not (slm_dir / "config.json").exists():
        t = time.time()
        texts = list(reference["text"]) + list(target["text"])
        slm, proc = build_tiny_ser_slm(
            texts,
            emotion_labels=EMOTION_LABELS["synthetic"],
            max_audio_seconds=7.0,
            lm_hidden=args.lm_hidden,
            encoder_dim=args.encoder_dim,
            seed=args.seed,
        )
        cfg = SerSlmSFTConfig(
            output_dir=str(work / "slm_trainer"),
            max_steps=args.pretrain_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.pretrain_lr,
            warmup_steps=max(1, args.pretrain_steps // 20),
            lr_scheduler_type="cosine",
            logging_steps=25,
            save_strategy="no",
            seed=args.seed,
            sed_source="truth",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = SerSlmSFTTrainer(model=slm, args=cfg, train_dataset=reference, processing_class=proc)
        out = trainer.train()
        with atomic_directory(slm_dir) as tmp:
            slm.save_pretrained(tmp)
            proc.save_pretrained(tmp)
        log(f"SER-SLM pre-trained {args.pretrain_steps} steps, loss {out.training_loss:.3f} ({time.time() - t:.0f}s)")
    slm = SerSlmForConditionalGeneration.from_pretrained(slm_dir).eval()
    proc = SerSlmProcessor.from_pretrained(slm_dir)
    return slm, proc


def _tag(args) -> str:
    if args.slm:
        import hashlib

        return "ext" + hashlib.sha256(str(Path(args.slm).resolve()).encode()).hexdigest()[:8]
    return f"{args.pretrain_steps}_{args.lm_hidden}_{args.encoder_dim}"


def cem_training_data(args, work: Path, slm, proc, reference):
    from trustser.cem_features import extract_cem_features
    from trustser.descriptors import SED_FIELDS
    from trustser.generation import generate_sed_predictions
    from trustser.trainers.cem import correctness_labels

    path = work / f"cem_data_{_tag(args)}_{args.ref_rows}.npz"
    if not path.exists():
        t = time.time()
        captions, predicted = generate_sed_predictions(slm, proc, reference, batch_size=32, max_new_tokens=72)
        ref = reference.select_columns(list(SED_FIELDS))[:]
        labels = correctness_labels(predicted, [{f: ref[f][i] for f in SED_FIELDS} for i in range(len(reference))])
        log(f"generated {len(captions)} captions on reference ({time.time() - t:.0f}s); e.g. {captions[0]!r}")
        feats = {}
        for pooling in POOLINGS:
            t = time.time()
            feats[pooling] = extract_cem_features(
                slm, proc, reference, sed_source="predicted", sed=predicted, pooling=pooling, batch_size=32
            )
            log(f"reference features ({pooling}) {feats[pooling].shape} ({time.time() - t:.0f}s)")
        unparseable = np.array([any(v is None for v in p.values()) for p in predicted])
        np.savez(path, labels=labels, unparseable=unparseable, **{f"features_{k}": v for k, v in feats.items()})
    z = np.load(path)
    return z["labels"], z["unparseable"], {k: z[f"features_{k}"] for k in POOLINGS}


def target_truth(target):
    from trustser.descriptors import SED_FIELDS, normalize_sed_value

    t = target.select_columns(list(SED_FIELDS) + [f + "_auto" for f in SED_FIELDS])[:]
    return np.array(
        [
            [float(normalize_sed_value(f, t[f + "_auto"][i]) == normalize_sed_value(f, t[f][i])) for f in SED_FIELDS]
            for i in range(len(target))
        ],
        dtype=np.float32,
    )


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from trustser.cem_features import extract_cem_features, predict_cem
    from trustser.descriptors import SED_FIELDS
    from trustser.evaluation import cem_metrics
    from trustser.plots import reliability_diagram
    from trustser.selection import select_indices
    from trustser.trainers.cem import train_cem
    from trustser.utils import atomic_write_json, set_seed

    t0 = time.time()
    set_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    reference, target = corpus_and_annotation(args, work)
    slm, proc = pretrain_slm(args, work, reference, target)
    reference = reference.shuffle(seed=args.seed).select(range(min(args.ref_rows, len(reference))))
    labels, unparseable, ref_feats = cem_training_data(args, work, slm, proc, reference)
    ref_acc = {f: float(labels[:, j].mean()) for j, f in enumerate(SED_FIELDS)}
    log(
        f"SLM on reference: per-field accuracy {ref_acc}, all-correct {np.all(labels == 1, 1).mean():.3f}, "
        f"unparseable {unparseable.mean():.3f}"
    )

    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(labels))
    n_eval = len(labels) // 5
    eval_idx, train_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])

    truth = target_truth(target)
    scorable = np.all([[v != "" for v in target[f + "_auto"]] for f in SED_FIELDS], axis=0)
    all_right = np.all(truth == 1, axis=1)
    results = {
        "annotation": args.annotation,
        "target_rows": len(target),
        "target_unscorable": int((~scorable).sum()),
        "target_annotation_accuracy": {f: float(truth[:, j].mean()) for j, f in enumerate(SED_FIELDS)},
        "target_all_fields_right": float(all_right.mean()),
        "slm_reference_accuracy": ref_acc,
        "slm_unparseable": float(unparseable.mean()),
        "poolings": {},
    }
    h = slm.config.text_config.hidden_size
    for pooling in POOLINGS:
        t = time.time()
        out_dir = work / f"cem_{pooling}"
        x = ref_feats[pooling]
        cem, report = train_cem(
            x[train_idx],
            labels[train_idx],
            eval_features=x[eval_idx],
            eval_labels=labels[eval_idx],
            output_dir=out_dir,
            feature_pooling=pooling,
            slm_hidden_size=h,
            balance=args.balance,
            num_train_epochs=args.cem_epochs,
            learning_rate=args.cem_lr,
            batch_size=64,
            seed=args.seed,
        )
        feats_path = work / f"target_features_{pooling}_{_tag(args)}.npy"
        if not feats_path.exists():
            np.save(
                feats_path, extract_cem_features(slm, proc, target, sed_source="auto", pooling=pooling, batch_size=32)
            )
        fs = predict_cem(cem, np.load(feats_path))
        scores = fs.mean(axis=1)
        tm = cem_metrics(fs[scorable], truth[scorable])
        reliability_diagram(
            fs[scorable],
            truth[scorable],
            out_dir / "reliability_target.png",
            title=f"CEM on annotated train captions ({pooling})",
        )
        table = {}
        for r in RATIOS:
            keep = select_indices(scores, ratio=r) if r < 1.0 else np.arange(len(target))
            row = {f: float(truth[keep, j].mean()) for j, f in enumerate(SED_FIELDS)}
            row["mean_field"] = float(truth[keep].mean())
            row["all_fields"] = float(all_right[keep].mean())
            row["n"] = int(len(keep))
            table[f"{int(r * 100)}%"] = row
        results["poolings"][pooling] = {
            "reference_eval": {k: report["eval"][k] for k in ("utterance", "mean_field_auc", *SED_FIELDS)},
            "cem_train_rows": report["balanced_rows"],
            "target_utterance_auc": tm["utterance"]["auc"],
            "target_field_auc": {f: tm[f]["auc"] for f in SED_FIELDS},
            "target_nce": {f: tm[f]["nce"] for f in SED_FIELDS},
            "target_ece": {f: tm[f]["ece"] for f in SED_FIELDS},
            "selection": table,
        }
        log(
            f"{pooling}: reference-eval utterance AUC {report['eval']['utterance']['auc']:.3f}, "
            f"target utterance AUC {tm['utterance']['auc']:.3f} ({time.time() - t:.0f}s)"
        )
    best = max(POOLINGS, key=lambda p: results["poolings"][p]["target_utterance_auc"])
    results["best_pooling"] = best
    b = results["poolings"][best]
    results["claims"] = {
        "utterance_auc_ge_0.75": b["target_utterance_auc"] >= 0.75,
        "every_subset_more_accurate": all(
            b["selection"][f"{int(r * 100)}%"]["mean_field"] > b["selection"]["100%"]["mean_field"] for r in RATIOS[1:]
        ),
    }
    results["wall_s"] = round(time.time() - t0, 1)
    _plot_selection(results, work / "selection_accuracy.png")
    atomic_write_json(work / "results.json", results)
    for p in POOLINGS:
        log(
            f"selection ({p}): "
            + ", ".join(
                f"{k}: {v['mean_field']:.3f}/{v['all_fields']:.3f}"
                for k, v in results["poolings"][p]["selection"].items()
            )
        )
    print(json.dumps(results))


def _plot_selection(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trustser.plots import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for pooling, r in results["poolings"].items():
        keys = list(r["selection"])
        xs = [int(k[:-1]) for k in keys]
        ax.plot(
            xs, [r["selection"][k]["mean_field"] for k in keys], marker="o", label=f"{pooling}: mean field accuracy"
        )
        ax.plot(
            xs, [r["selection"][k]["all_fields"] for k in keys], marker="s", ls="--", label=f"{pooling}: all five right"
        )
    ax.invert_xaxis()
    ax.set_xlabel("share kept (%)")
    ax.set_ylabel("true accuracy of annotated descriptors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, bbox_inches=None)
    plt.close(fig)


if __name__ == "__main__":
    main()
