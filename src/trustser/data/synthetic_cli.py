"""``trustser synth OUT_DIR``: generate the synthetic SED-grounded corpus."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="corpus directory (written atomically; a no-op if up to date)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--size", choices=["small", "default"], default="default",
                        help="default: ~4100 utterances, 40 speakers; small: ~410 utterances for tests")
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all cores)")


def run_cli(args: argparse.Namespace) -> int:
    import sys

    from .synthetic import synthesize_corpus

    try:
        out = synthesize_corpus(args.out_dir, seed=args.seed, size=args.size, num_proc=args.num_proc)
    except FileExistsError as exc:  # a user's directory is never overwritten
        print(f"trustser synth: error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        print(f"{split:10s} {info['utterances']:5d} utterances  {len(info['speakers']):3d} speakers  "
              f"{info['hours'] * 60:6.1f} min  channel={info['channel']}")
    print(f"corpus at {out}")
    return 0
