"""Several systems over several seeds, sharing the cached stages: the paper's Table 1 with intervals
and a verdict on each of its claims.

    python recipes/table1.py --systems 1,2,3,4,6,9,10,oracle_labels,pseudo_labels,oracle_sel90,oracle_sel80 --seeds 3
    python recipes/table1.py --systems v1,v2,v3,v4,v5 --seeds 3          # Table 3 (K)
    python recipes/table1.py ... --test_split dev                         # choices are made on dev

Per system: mean ± std over seeds of WA, UA, weighted F1 and per-field descriptor accuracy. Per
claim of the paper that the systems can test (``trustser.systems.paper_claims``): the paired
difference in WA over the same test utterances and seeds, with a 95% bootstrap interval over
utterances and seeds, and its verdict (holds / reversed / not resolved). Writes
``<output_dir>/table1.md`` and ``table1.json``; an interrupted table resumes from its cached stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from trustser.descriptors import SED_FIELDS
from trustser.recipe import parse_recipe_args, run_system
from trustser.recipe_config import RecipeConfig
from trustser.statistics import judge
from trustser.systems import BRACKETS, get_system, paper_claims
from trustser.utils import atomic_write_json, atomic_write_text


def _fmt(values, scale=100.0):
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _order(name: str) -> tuple:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name in BRACKETS, name.startswith("v"), float(digits) if digits else float("inf"), name)


def _repair(runs) -> str:
    """Mean share of correct descriptor labels in the (selected) training set as annotated and
    after the trained controller's rectification (expected under its policy); rectifying systems
    on a corpus with ground truth only."""
    audits = [r.get("controller_audit") for r in runs if r and r.get("controller_audit")]
    if not audits:
        return "–"
    return f"{_fmt([a['annotation_accuracy'] for a in audits])} → {_fmt([a['expected_accuracy'] for a in audits])}"


def _row(spec, runs) -> str:
    m = [r["test"][r["target_corpus"]] for r in runs]
    k = sorted({r["settings"]["num_policies_used"] for r in runs})
    sed = (
        " | ".join(_fmt([x["sed_accuracy"][f] for x in m]) for f in SED_FIELDS)
        if spec.with_sed
        else " | ".join("–" for _ in SED_FIELDS)
    )
    kept = f"{int(spec.selection_ratio * 100)}%" if spec.selection_ratio else ("100%" if spec.domain_sft else "")
    if spec.selection == "oracle":
        kept += " (oracle)"
    labels = {"auto": "", "truth": "true", "pseudo": "SLM's own"}[spec.sed_labels]
    name = spec.name[3:] if spec.name.startswith("sys") else spec.name
    return (
        f"| {name} | {'✓' if spec.with_sed else ''} | {'✓' if spec.domain_sft else ''} | {kept} | {labels} | "
        f"{'✓ (K=%s)' % ','.join(map(str, k)) if spec.rectify else ''} | **{_fmt([x['wa'] for x in m])}** | {_fmt([x['ua'] for x in m])} | "
        f"{_fmt([x['weighted_f1'] for x in m])} | {sed} | {_repair(runs)} | {spec.paper_iemocap or '–'} | {spec.paper_meld or '–'} |"
    )


def _predictions(base: RecipeConfig, spec, seed: int) -> list[dict]:
    return json.loads((Path(base.output_dir) / f"{spec.name}-seed{seed}" / "predictions.json").read_text())


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--systems", default="1,2,3,4,6,9,10," + ",".join(BRACKETS))
    pre.add_argument("--seeds", type=int, default=3)
    pre.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws per claim")
    own, rest = pre.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the recipe's parser: recipe settings, model settings and top-level trainer fields (as recipes/sysN.py)
    base = parse_recipe_args(rest)
    specs = [get_system(s.strip()) for s in own.systems.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {}
    for spec in specs:
        results = [run_system(replace(base, system=spec.name, seed=seed)) for seed in range(own.seeds)]
        if not all(results):  # a non-main process under accelerate launch
            continue
        for r, seed in zip(results, range(own.seeds)):
            r["predictions"] = _predictions(base, spec, seed)
        runs[spec.name] = results
    if not runs:
        return 0
    header = (
        "| Sys | SED | domain SFT | kept | labels | RL rectification | WA % | UA % | wF1 % | "
        + " | ".join(f"{f} acc %" for f in SED_FIELDS)
        + " | train labels correct: annotated → rectified % | paper IEMOCAP | paper MELD |\n|"
        + "---|" * (12 + len(SED_FIELDS))
    )
    rows = [_row(get_system(n), runs[n]) for n in sorted(runs, key=_order)]
    n_utts = {len(r["predictions"]) for rs in runs.values() for r in rs}
    table = (
        f"{header}\n"
        + "\n".join(rows)
        + f"\n\n{own.seeds} seeds (0..{own.seeds - 1}), mean ± std; corpus {base.target_corpus} "
        f"({base.test_split}, {'/'.join(map(str, sorted(n_utts)))} utterances).\n"
    )
    claims = []
    for c in paper_claims(runs):
        res = judge(runs[c.better], runs[c.worse], n_boot=own.bootstrap)
        claims.append({"claim": c.label, "better": c.better, "worse": c.worse, "source": c.source, **res})
    lines = [
        "| claim | from | WA difference (points) | 95% interval | per seed | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['claim']} | {c['source']} | {100 * c['diff']:+.2f} | [{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}] | "
        f"{', '.join(f'{100 * d:+.1f}' for d in c['per_seed_diff'])} | **{c['verdict']}** |"
        for c in claims
    ]
    text = (
        table + "\nPaired differences over the same utterances and seeds; 95% percentile bootstrap over utterances and "
        f"seeds ({own.bootstrap} draws).\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    out = Path(base.output_dir)
    atomic_write_text(out / f"table1-{base.test_split}.md", text)
    atomic_write_json(
        out / f"table1-{base.test_split}.json",
        {
            "systems": {
                n: [
                    {k: r[k] for k in ("test", "seed", "settings")} | {"controller_audit": r.get("controller_audit")}
                    for r in rs
                ]
                for n, rs in runs.items()
            },
            "claims": claims,
            "seeds": own.seeds,
            "split": base.test_split,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
