"""``trustser explain MODEL AUDIO_OR_DIR...``: explained emotion predictions, one per file.

Bad files are reported on stderr (one line each, naming the file) and skipped; the exit code is 1
when any file failed, 0 otherwise. ``--long-audio segment`` explains each speech segment of long
recordings (one line / row per segment, with start and end); ``--plot-dir`` draws their timelines."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="SER-SLM folder, Hub id, or a trustser output directory (finds model, CEM, labels)"
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files (wav/flac/mp3/ogg/mp4...) or directories"
    )
    parser.add_argument(
        "--cem",
        default=None,
        help="CEM folder or Hub id (default: MODEL's cem/ subfolder or its output directory's CEM)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    parser.add_argument("--out", default=None, help="write here (atomically) instead of stdout")
    parser.add_argument("--emotion-labels", default=None, help="comma-separated label set (default: from the model)")
    parser.add_argument(
        "--long-audio",
        choices=("error", "truncate", "segment"),
        default="error",
        help="audio longer than the model's window: report an error (default), keep its start, or "
        "'segment': cut each file into speech segments (voice-activity detection) and explain "
        "each with its start and end time",
    )
    parser.add_argument(
        "--max-recording-minutes",
        type=float,
        default=None,
        help="with --long-audio segment: refuse longer recordings (default 240)",
    )
    parser.add_argument(
        "--plot-dir",
        default=None,
        help="with --long-audio segment: write each recording's emotion/descriptor timeline to "
        "DIR/<file name>.timeline.png",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: GPU if available)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--no-cem-slm",
        action="store_true",
        help="with an output directory: compute CEM features with the explaining model instead of "
        "loading the pre-trained SLM the CEM was trained on (half the memory)",
    )


def run(args: argparse.Namespace) -> int:
    from ..explain import explain_files, format_table
    from ..utils import atomic_write_text

    if args.plot_dir and args.long_audio != "segment":
        raise ValueError("--plot-dir draws the timeline of segmented recordings: add --long-audio segment")
    labels = [l.strip() for l in args.emotion_labels.split(",") if l.strip()] if args.emotion_labels else None
    results = explain_files(
        args.model,
        args.inputs,
        cem=args.cem,
        batch_size=args.batch_size,
        emotion_labels=labels,
        errors="record",
        long_audio=args.long_audio,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        progress=False if args.no_progress else None,
        use_cem_slm=not args.no_cem_slm,
        max_recording_seconds=args.max_recording_minutes * 60 if args.max_recording_minutes else None,
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
    if args.plot_dir:
        for path in write_timelines(results, args.plot_dir):
            print(f"trustser explain: timeline {path}", file=sys.stderr)
    print(f"trustser explain: {len(results) - len(failed)} explained, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def write_timelines(results, plot_dir) -> list:
    """One timeline PNG per recording that has explained segments; names made unique."""
    from pathlib import Path

    from ..plots import plot_timeline

    by_file: dict[str, list] = {}
    for r in results:
        by_file.setdefault(r["file"], []).append(r)
    out, used = [], set()
    for name, segs in by_file.items():
        if not any(s.get("start") is not None and not s.get("error") for s in segs):
            continue
        stem = Path(name).name
        base, k = stem, 1
        while stem in used:
            k += 1
            stem = f"{base}-{k}"
        used.add(stem)
        out.append(plot_timeline(segs, Path(plot_dir) / f"{stem}.timeline.png", title=name))
    return out
