"""``trustser explain MODEL AUDIO_OR_DIR...``: explained emotion predictions, one per file.

Bad files are reported on stderr (one line each, naming the file) and skipped; the exit code is 1
when any file failed, 0 otherwise."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="SER-SLM folder, Hub id, or a trustser output directory (finds model, CEM, labels)")
    parser.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files (wav/flac/mp3/ogg/mp4...) or directories")
    parser.add_argument("--cem", default=None, help="CEM folder or Hub id (default: MODEL's cem/ subfolder or its output directory's CEM)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    parser.add_argument("--out", default=None, help="write here (atomically) instead of stdout")
    parser.add_argument("--emotion-labels", default=None, help="comma-separated label set (default: from the model)")
    parser.add_argument("--long-audio", choices=("error", "truncate"), default="error",
                        help="audio longer than the model's window: report an error (default) or keep its start")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: GPU if available)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-cem-slm", action="store_true",
                        help="with an output directory: compute CEM features with the explaining model instead of "
                             "loading the pre-trained SLM the CEM was trained on (half the memory)")


def run_cli(args: argparse.Namespace) -> int:
    from .explain import explain_files, format_table
    from .utils import atomic_write_text

    labels = [l.strip() for l in args.emotion_labels.split(",") if l.strip()] if args.emotion_labels else None
    results = explain_files(
        args.model, args.inputs, cem=args.cem, batch_size=args.batch_size, emotion_labels=labels, errors="record",
        long_audio=args.long_audio, max_new_tokens=args.max_new_tokens, device=args.device,
        progress=False if args.no_progress else None, use_cem_slm=not args.no_cem_slm,
    )
    failed = [r for r in results if r["error"]]
    for r in failed:
        print(f"trustser explain: {r['error']}", file=sys.stderr)
    if args.format == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    else:
        text = format_table(results) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    print(f"trustser explain: {len(results) - len(failed)} explained, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0
