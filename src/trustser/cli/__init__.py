"""The ``trustser`` console script: ``main()`` and the subcommand registry. Each subcommand is a
module of this package, ``trustser.cli.<command>``, exposing ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen one is imported, so ``trustser --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("trustser.cli.synth", "generate the synthetic SED-grounded corpus"),
    "annotate": ("trustser.cli.annotate", "add automatic SED labels (<field>_auto) to a corpus"),
    "evaluate": ("trustser.cli.evaluate", "evaluate a SER-SLM on a corpus split (JSON metrics)"),
    "select": ("trustser.cli.select", "score annotated captions with the CEM and keep the most reliable"),
    "explain": ("trustser.cli.explain", "explained emotion predictions for audio files"),
    "push": ("trustser.cli.push", "push a trained output directory to the Hugging Face Hub"),
    "demo": ("trustser.cli.demo", "a Gradio demo of a trained system in the browser (127.0.0.1)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trustser", description="Explainable and trustworthy speech emotion recognition."
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"trustser {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:]
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # only the chosen subcommand's module is imported
        if name in argv:
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
                p.set_defaults(_unavailable=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    if not args.command:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(
            f"trustser {args.command}: not available in this installation ({args._unavailable} missing)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        # user errors: one clear line, no traceback
        print(f"trustser {args.command}: error: {exc}", file=sys.stderr)
        return 1
