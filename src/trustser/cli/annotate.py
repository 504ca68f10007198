"""``trustser annotate CORPUS ROOT --method M --out OUT``: adds automatic SED labels to a corpus
and saves it with ``save_to_disk`` (atomically), plus ``annotation.json`` (settings and counts).

Works under ``accelerate launch`` (each process annotates a shard; the main process saves)."""

from __future__ import annotations

import argparse
import json

from ..annotation.binning import METHODS
from .common import add_corpus_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", help="corpus name for trustser.data.load_corpus (e.g. synthetic, iemocap, meld)")
    p.add_argument("root", help="corpus root directory")
    add_corpus_options(p)
    p.add_argument("--out", required=True, help="output directory (DatasetDict save_to_disk layout)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not an earlier annotation output"
    )
    p.add_argument("--method", choices=METHODS, default="speechcraft", help="binning method (default: speechcraft)")
    p.add_argument("--split", action="append", default=None, help="split(s) to annotate (repeatable; default: all)")
    p.add_argument(
        "--reference-split", default="reference", help="labelled split the offline classifiers/calibration use"
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="set unified/speaker-adaptive cut points at the reference label proportions",
    )
    p.add_argument(
        "--speaker-scope",
        choices=("corpus", "split"),
        default="corpus",
        help="speaker statistics over all splits or per split",
    )
    p.add_argument("--speaker-traits", action="store_true", help="gender/age = each speaker's majority prediction")
    p.add_argument(
        "--gender-backend", default="auto", help="auto | reference | Hub model id / local dir | classifier .json"
    )
    p.add_argument(
        "--age-backend", default="auto", help="auto | reference | Hub model id / local dir | classifier .json"
    )
    p.add_argument("--num-proc", type=int, default=None, help="datasets.map worker processes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import datasets

    from ..annotation import annotate, annotation_report
    from ..data import load_corpus
    from ..utils import atomic_directory, check_output_dir, end_distributed, set_seed

    check_output_dir(
        args.out, marker="annotation.json", overwrite=args.overwrite, inputs=[args.root]
    )  # before the work
    set_seed(args.seed)
    corpus = load_corpus(args.corpus, args.root, **args.corpus_options)
    if not isinstance(corpus, datasets.DatasetDict):
        corpus = datasets.DatasetDict({"train": corpus})
    wanted = args.split or list(corpus)
    unknown = [s for s in wanted if s not in corpus]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} in corpus {args.corpus!r}; available: {list(corpus)}")
    reference = corpus[args.reference_split] if args.reference_split in corpus else None
    result = annotate(
        datasets.DatasetDict({s: corpus[s] for s in wanted}),
        method=args.method,
        gender_backend=args.gender_backend,
        age_backend=args.age_backend,
        num_proc=args.num_proc,
        batch_size=args.batch_size,
        reference=reference,
        reference_split=args.reference_split,
        calibrate=args.calibrate,
        speaker_scope=args.speaker_scope,
        speaker_traits=args.speaker_traits,
        seed=args.seed,
    )
    from ..utils import distributed_state

    state = distributed_state()
    reports = {s: annotation_report(ds) for s, ds in result.items()}
    if sum(r["rows"] for r in reports.values()) == sum(r["n_errors"] for r in reports.values()):
        reasons = {s: r["errors"] for s, r in reports.items()}
        raise ValueError(
            f"{args.root}: no usable utterances in corpus {args.corpus!r} (every row failed: {reasons}); nothing written"
        )
    if state.is_main_process:
        summary = {
            "corpus": args.corpus,
            "root": str(args.root),
            "options": args.corpus_options,
            "method": args.method,
            "calibrate": args.calibrate,
            "speaker_scope": args.speaker_scope,
            "speaker_traits": args.speaker_traits,
            "gender_backend": args.gender_backend,
            "age_backend": args.age_backend,
            "seed": args.seed,
            "splits": reports,
        }
        with atomic_directory(args.out) as tmp:
            result.save_to_disk(str(tmp))
            (tmp / "annotation.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        n_err = sum(r["n_errors"] for r in reports.values())
        n_rows = sum(r["rows"] for r in reports.values())
        for s, r in reports.items():
            print(f"{s}: {r['rows']} utterances, {r['n_errors']} not annotated {r['errors'] or ''}".rstrip())
        procs = f" on {state.num_processes} processes" if state.num_processes > 1 else ""
        print(
            f"annotated {n_rows - n_err}/{n_rows} utterances ({n_err} errors) with {args.method}{procs} -> {args.out}"
        )
    end_distributed()
    return 0
