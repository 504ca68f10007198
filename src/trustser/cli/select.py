"""``trustser select``: score an annotated corpus with the CEM + SER-SLM and keep the most reliable
share. Works under ``accelerate launch`` (scoring is sharded over the processes; the main process
writes the output)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cem", required=True, help="trained CEM directory (save_pretrained)")
    parser.add_argument("--slm", required=True, help="SER-SLM directory (model + processor, save_pretrained)")
    parser.add_argument(
        "--data", required=True, help="annotated corpus saved with save_to_disk (Dataset or DatasetDict)"
    )
    parser.add_argument(
        "--split",
        action="append",
        default=None,
        help="split(s) of a DatasetDict to select from (repeatable; default: every split)",
    )
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--ratio", type=float, help="share of utterances to keep (0..1), highest confidence first")
    keep.add_argument("--threshold", type=float, help="keep utterances whose confidence is >= this value")
    parser.add_argument("--out", required=True, help="output directory (selected dataset + selection_stats.json)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not an earlier selection output"
    )
    parser.add_argument(
        "--sed-source",
        default="auto",
        choices=("auto", "truth"),
        help="descriptors scored: the annotation (<field>_auto, default) or the plain columns",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="torch device (default: accelerate's device for this process)")


def _load_models(cem_dir: str, slm_dir: str, device):
    from ..models.cem import CemModel
    from ..models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

    for what, path, marker in (("CEM", cem_dir, "config.json"), ("SER-SLM", slm_dir, "config.json")):
        if not (Path(path) / marker).is_file():
            raise FileNotFoundError(f"{what} directory {path}: no {marker} (expected a save_pretrained output)")
    cem = CemModel.from_pretrained(cem_dir).to(device).eval()
    slm = SerSlmForConditionalGeneration.from_pretrained(slm_dir).to(device).eval()
    processor = SerSlmProcessor.from_pretrained(slm_dir)
    hidden = slm.config.text_config.hidden_size
    if cem.config.slm_hidden_size and cem.config.slm_hidden_size != hidden:
        raise ValueError(
            f"CEM {cem_dir} was trained on SLM hidden size {cem.config.slm_hidden_size}, "
            f"but SLM {slm_dir} has hidden size {hidden}"
        )
    return cem, slm, processor


def run(args: argparse.Namespace) -> int:
    import datasets

    from ..selection import STATS_FILENAME, select_by_confidence
    from ..utils import atomic_directory, atomic_write_json, check_output_dir, distributed_state

    state = distributed_state()
    device = args.device or state.device
    check_output_dir(args.out, marker=STATS_FILENAME, overwrite=args.overwrite, inputs=[args.data, args.cem, args.slm])
    data_path = Path(args.data)
    if not data_path.exists():
        raise FileNotFoundError(f"--data {data_path}: no such directory")
    try:
        data = datasets.load_from_disk(str(data_path))
    except Exception as exc:  # not a save_to_disk directory
        raise ValueError(f"--data {data_path}: not a dataset saved with save_to_disk ({exc})") from exc
    cem, slm, processor = _load_models(args.cem, args.slm, device)
    kw = dict(
        ratio=args.ratio,
        threshold=args.threshold,
        cem=cem,
        slm=slm,
        processor=processor,
        sed_source=args.sed_source,
        batch_size=args.batch_size,
    )
    if isinstance(data, datasets.DatasetDict):
        names = args.split or list(data)
        unknown = [s for s in names if s not in data]
        if unknown:
            raise ValueError(f"--split {unknown} not in {data_path} (splits: {list(data)})")
        selected, stats = {}, {}
        for name in names:
            selected[name], stats[name] = select_by_confidence(data[name], **kw)
        if state.is_main_process:
            with atomic_directory(args.out) as tmp:
                datasets.DatasetDict(selected).save_to_disk(str(tmp))
                atomic_write_json(tmp / STATS_FILENAME, stats)
    else:
        if args.split:
            raise ValueError(f"--split given but {data_path} holds a single Dataset")
        selected, stats = select_by_confidence(data, **kw)
        if state.is_main_process:
            with atomic_directory(args.out) as tmp:
                selected.save_to_disk(str(tmp))
                atomic_write_json(tmp / STATS_FILENAME, stats)
    state.wait_for_everyone()
    if state.is_main_process:
        print(json.dumps(stats))
        print(
            f"scored on {state.num_processes} process{'es' if state.num_processes > 1 else ''} -> {args.out}",
            file=sys.stderr,
        )
    return 0
