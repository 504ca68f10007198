"""Per-field accuracy of the automatic SED annotation against the synthetic corpus' ground truth,
for the three binnings (and their reference-calibrated variants), on every split. Prints a
Markdown table; last line: JSON.

    python benchmarks/annotation_accuracy.py --root /tmp/synth --size small   # generates if absent
    python benchmarks/annotation_accuracy.py --root /tmp/synth_default --size default --num-proc 2

Features and gender/age predictions are computed once (``annotate``, offline classifiers fitted on
the ``reference`` split); every binning is then applied to the same features (``rebin``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

FIELDS = ("pitch", "volume", "speed", "gender", "age")
# (method, calibrate, speaker-voted gender/age)
VARIANTS = (
    ("speechcraft", False, False),
    ("unified", False, False),
    ("unified", True, False),
    ("speaker_adaptive", False, False),
    ("speaker_adaptive", True, False),
    ("speaker_adaptive", True, True),
)


def accuracy(ds, field: str) -> float:
    truth, auto = np.asarray(ds[field], dtype=object), np.asarray(ds[f"{field}_auto"], dtype=object)
    return float(np.mean(truth == auto))  # unannotated rows ("") count as wrong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="synthetic corpus directory (generated there if absent)")
    p.add_argument("--size", default="small", choices=("small", "default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--out", help="also write the JSON result to this file (atomically)")
    args = p.parse_args()

    import datasets
    import torch

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    from trustser.annotation import annotate, annotation_report, rebin
    from trustser.data.synthetic import load_synthetic, synthesize_corpus
    from trustser.utils import atomic_write_json

    if not (Path(args.root) / "manifest.json").exists():
        synthesize_corpus(args.root, seed=args.seed, size=args.size, num_proc=args.num_proc)
    corpus = load_synthetic(args.root)
    manifest = json.loads((Path(args.root) / "manifest.json").read_text())
    t0 = time.perf_counter()
    base = annotate(corpus, method="speechcraft", num_proc=args.num_proc, seed=args.seed)
    t_annotate = time.perf_counter() - t0

    results: dict[str, dict[str, dict[str, float]]] = {}
    for method, calibrate, vote in VARIANTS:
        name = method + (" (calibrated)" if calibrate else "") + (" + speaker-voted traits" if vote else "")
        ds = base if method == "speechcraft" else rebin(base, method, calibrate=calibrate, speaker_traits=vote)
        results[name] = {split: {f: round(accuracy(ds[split], f), 4) for f in FIELDS} for split in ds}
    errors = {split: annotation_report(base[split])["n_errors"] for split in base}

    print(
        f"Synthetic corpus {args.root} (size {manifest['settings']['size']}, seed {manifest['settings']['seed']}); "
        f"annotation errors per split: {errors}; feature pass {t_annotate:.0f} s\n"
    )
    print("| method | split | " + " | ".join(FIELDS) + " |")
    print("|---|---|" + "---|" * len(FIELDS))
    for name, per_split in results.items():
        for split, acc in per_split.items():
            print(f"| {name} | {split} | " + " | ".join(f"{acc[f]:.3f}" for f in FIELDS) + " |")
    target = [s for s in ("train", "dev", "test") if s in base]
    checks = {}
    for f in ("pitch", "volume", "speed"):
        checks[f] = {
            "adaptive_beats_unified_everywhere": all(
                results["speaker_adaptive"][s][f] > results["unified"][s][f] for s in target
            ),
            "adaptive_cal_beats_unified_cal_everywhere": all(
                results["speaker_adaptive (calibrated)"][s][f] > results["unified (calibrated)"][s][f] for s in target
            ),
            "unified_max_error_target": round(max(1 - results["unified"][s][f] for s in target), 4),
            "unified_cal_max_error_target": round(max(1 - results["unified (calibrated)"][s][f] for s in target), 4),
        }
    summary = {
        "benchmark": "annotation_accuracy",
        "root": str(args.root),
        "size": manifest["settings"]["size"],
        "seed": manifest["settings"]["seed"],
        "rows": {s: len(base[s]) for s in base},
        "errors": errors,
        "accuracy": results,
        "checks": checks,
        "feature_pass_seconds": round(t_annotate, 1),
    }
    print()
    print(json.dumps(checks))
    if args.out:
        atomic_write_json(args.out, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
