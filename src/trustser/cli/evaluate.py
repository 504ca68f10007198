"""``trustser evaluate MODEL_DIR CORPUS_ROOT --corpus synthetic --split test --out metrics.json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_corpus_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="saved SER-SLM (model + processor)")
    p.add_argument("corpus_root", help="corpus directory")
    p.add_argument("--corpus", default="synthetic", help="corpus loader name (trustser.data.load_corpus)")
    add_corpus_options(p)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="metrics JSON path (default: print only)")
    p.add_argument(
        "--sed-source", choices=["truth", "auto"], default="truth", help="reference descriptors for SED accuracy"
    )
    p.add_argument("--no-sed", action="store_true", help="the model generates the plain (no-descriptor) caption")
    p.add_argument("--emotion-labels", default=None, help="comma-separated label set (default: the corpus')")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--predictions", action="store_true", help="include per-utterance captions in the JSON")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from ..data import load_corpus
    from ..descriptors import EMOTION_LABELS
    from ..evaluation import evaluate_ser
    from ..utils import atomic_write_json

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a saved model (no config.json)")
    if args.emotion_labels:
        labels = [x.strip() for x in args.emotion_labels.split(",") if x.strip()]
    elif args.corpus in EMOTION_LABELS:
        labels = list(EMOTION_LABELS[args.corpus])
    else:
        raise ValueError(f"no default emotion label set for corpus {args.corpus!r}: pass --emotion-labels")
    from ..models.loading import require_model_type

    require_model_type(model_dir, "ser_slm", "SER-SLM")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    corpus = load_corpus(args.corpus, args.corpus_root, **args.corpus_options)
    if args.split not in corpus:
        raise KeyError(f"split {args.split!r} not in corpus (available: {list(corpus)})")
    ds = corpus[args.split]
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    metrics = evaluate_ser(
        model,
        processor,
        ds,
        labels,
        sed_source=args.sed_source,
        with_sed=not args.no_sed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        return_predictions=args.predictions,
        progress=True,
    )
    metrics.update({"model_dir": str(model_dir), "corpus": args.corpus, "split": args.split})
    if args.out:
        atomic_write_json(args.out, metrics)
    summary = {k: metrics[k] for k in ("n", "wa", "ua", "weighted_f1", "unparseable_rate")}
    for s in metrics.get("skipped", []):
        print(f"trustser evaluate: skipped {s['error']}", file=sys.stderr)
    if metrics.get("n_skipped"):
        summary["n_skipped"] = metrics["n_skipped"]
    summary["sed_accuracy"] = metrics.get("sed_accuracy")
    print(json.dumps(summary, indent=2))
    return 0
