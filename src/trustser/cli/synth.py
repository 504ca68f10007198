"""``trustser synth OUT_DIR``: generate the synthetic SED-grounded corpus."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="corpus directory (written atomically; a no-op if up to date)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--size",
        choices=["small", "default"],
        default="default",
        help="default: ~4100 utterances, 40 speakers; small: ~410 utterances for tests",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR even if it is not a trustser synthetic corpus (kept until the new one is complete)",
    )
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..data.synthetic import synthesize_corpus

    try:
        with _set_aside(Path(args.out_dir), args.overwrite):
            out = synthesize_corpus(args.out_dir, seed=args.seed, size=args.size, num_proc=args.num_proc)
    except FileExistsError as exc:  # a user's directory is never overwritten unless --overwrite
        print(f"trustser synth: error: {exc} (or pass --overwrite)", file=sys.stderr)
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        print(
            f"{split:10s} {info['utterances']:5d} utterances  {len(info['speakers']):3d} speakers  "
            f"{info['hours'] * 60:6.1f} min  channel={info['channel']}"
        )
    print(f"corpus at {out}")
    return 0


@contextlib.contextmanager
def _set_aside(out: Path, overwrite: bool):
    """With ``overwrite``, a folder that is not a synthetic corpus is moved to a hidden sibling
    while the corpus is generated, removed once it is complete, and put back if generation fails."""
    if not overwrite or not out.exists() or (out / "manifest.json").exists():
        yield
        return
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.replace(out, aside)
    try:
        yield
    except BaseException:
        if not out.exists():
            os.replace(aside, out)
        raise
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()
