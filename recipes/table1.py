"""Several systems over several seeds, sharing the cached stages, printed as the paper's Table 1.

    python recipes/table1.py --systems 2,4,6,9,10 --seeds 3 [--config FILE] [--field value ...]

Prints a Markdown table (mean and std of WA over seeds, with UA, weighted F1 and per-field SED
accuracy) with the paper's numbers beside ours, and writes it to <output_dir>/table1.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from trustser.descriptors import SED_FIELDS
from trustser.recipe import run_system
from trustser.recipe_config import RecipeConfig
from trustser.systems import get_system
from trustser.utils import atomic_write_text


def _fmt(values, scale=100.0):
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _system_number(name: str) -> float:
    digits = "".join(ch for ch in name if ch.isdigit())
    return float(digits) if digits else float("inf")


def _repair(runs) -> str:
    """Mean share of correct descriptor labels in the (selected) training set as annotated and
    after the trained controller's rectification (expected under its policy); rectifying systems
    on a corpus with ground truth only."""
    audits = [r.get("controller_audit") for r in runs if r and r.get("controller_audit")]
    if not audits:
        return "–"
    return f"{_fmt([a['annotation_accuracy'] for a in audits])} → {_fmt([a['expected_accuracy'] for a in audits])}"


def main(argv=None):
    from trl import TrlParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--systems", default="2,4,6,9,10")
    pre.add_argument("--seeds", type=int, default=3)
    own, rest = pre.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (base,) = TrlParser((RecipeConfig,)).parse_args_and_config(args=rest)
    systems = [get_system(s.strip()) for s in own.systems.split(",") if s.strip()]
    rows = []
    for spec in systems:
        runs = [run_system(replace(base, system=spec.name, seed=seed)) for seed in range(own.seeds)]
        m = [r["test"][base.target_corpus] for r in runs if r]
        if not m:  # non-main process under accelerate launch
            continue
        paper = spec.paper_iemocap, spec.paper_meld
        sed = " | ".join(_fmt([x["sed_accuracy"][f] for x in m]) for f in SED_FIELDS) if spec.with_sed else " | ".join("–" for _ in SED_FIELDS)
        rows.append((_system_number(spec.name),
            f"| {spec.name[3:] if spec.name.startswith('sys') else spec.name} | {'✓' if spec.with_sed else ''} | {'✓' if spec.domain_sft else ''} | "
            f"{f'{int(spec.selection_ratio * 100)}%' if spec.selection_ratio else ('100%' if spec.domain_sft else '')} | "
            f"{'✓ (K=%d)' % spec.num_policies if spec.rectify else ''} | **{_fmt([x['wa'] for x in m])}** | {_fmt([x['ua'] for x in m])} | "
            f"{_fmt([x['weighted_f1'] for x in m])} | {sed} | {_repair(runs)} | {paper[0]} | {paper[1]} |"
        ))
    if not rows:
        return 0
    header = (
        "| Sys | SED | domain SFT | kept | RL rectification | WA % | UA % | wF1 % | "
        + " | ".join(f"{f} acc %" for f in SED_FIELDS)
        + " | train labels correct: annotated → rectified % | paper IEMOCAP | paper MELD |\n|" + "---|" * (11 + len(SED_FIELDS))
    )
    table = f"{header}\n" + "\n".join(row for _, row in sorted(rows)) + f"\n\n{own.seeds} seeds (0..{own.seeds - 1}), mean ± std; corpus {base.target_corpus} ({base.test_split}).\n"
    print(table)
    atomic_write_text(Path(base.output_dir) / "table1.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
