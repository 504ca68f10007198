"""``trustser demo MODEL_OR_OUTPUT_DIR``: the Gradio demo (:mod:`trustser.demo`) on 127.0.0.1."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULT_PORT

    parser.add_argument(
        "model", help="SER-SLM folder, Hub id, or a trustser output directory (finds model, CEM, labels)"
    )
    parser.add_argument(
        "--examples",
        default=None,
        help="example clips: a corpus root (one clip per emotion of its test split) or a folder of audio "
        "(default: an output directory's own synthetic corpus)",
    )
    parser.add_argument("--cem", default=None, help="CEM folder or Hub id (default: found with the model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: GPU if available)")


def run(args: argparse.Namespace) -> int:
    from ..demo import launch

    launch(args.model, host=args.host, port=args.port, examples=args.examples, cem=args.cem, device=args.device)
    return 0
