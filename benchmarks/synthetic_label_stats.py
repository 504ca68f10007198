"""The annotation tool's label statistics on the synthetic corpus, per split and kind of speaker:
accuracy of each descriptor against the ground truth, the share with all five right, and each
field's label shares (docs/synthetic.md's table). The tool is the recipe's: ``unified`` calibrated
on the reference split (pitch per predicted gender), offline gender/age classifiers.

    python benchmarks/synthetic_label_stats.py --root /tmp/synth_v2 [--size default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from trustser.annotation import annotate, annotation_report
from trustser.data.synthetic import GROUP_NORMS, load_synthetic, synthesize_corpus

FIELDS = ("pitch", "volume", "speed", "gender", "age")


def by_kind(report: dict) -> dict:
    kinds: dict[str, dict] = {}
    for group, acc in report["accuracy_by_group"].items():
        d = kinds.setdefault(GROUP_NORMS[group].kind, {"n": 0, **{f: 0.0 for f in (*FIELDS, "all_right")}})
        d["n"] += acc["n"]
        for f in (*FIELDS, "all_right"):
            d[f] += acc[f] * acc["n"]
    return {k: {"n": d["n"], **{f: round(d[f] / d["n"], 4) for f in (*FIELDS, "all_right")}} for k, d in kinds.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--size", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    dd = load_synthetic(synthesize_corpus(args.root, seed=args.seed, size=args.size, num_proc=args.num_proc))
    ann = annotate(
        dd, method="unified", reference=dd["reference"], calibrate=True, num_proc=args.num_proc, seed=args.seed
    )
    out = {}
    print("| split | speakers | n | " + " | ".join(FIELDS) + " | all five right |\n|---|---|---|" + "---|" * 6)
    for split in ann:
        rep = annotation_report(ann[split])
        rows = {"all": rep["accuracy"], **by_kind(rep)}
        for kind, a in rows.items():
            print(
                f"| {split} | {kind} | {a['n']} | "
                + " | ".join(f"{a[f]:.2f}" for f in FIELDS)
                + f" | {a['all_right']:.2f} |"
            )
        total = rep["rows"] - rep["n_errors"]
        shares = {f: {k: round(v / total, 3) for k, v in rep["labels"][f].items()} for f in FIELDS}
        out[split] = {"accuracy": rows, "label_shares": shares, "errors": rep["errors"]}
    for split, v in out.items():
        print(split, "label shares:", json.dumps(v["label_shares"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
