"""Arguments that several subcommands share, declared once."""

from __future__ import annotations

import argparse

from ..utils import json_object_argument


def add_corpus_options(p: argparse.ArgumentParser) -> None:
    """``--corpus-options JSON``: keyword arguments for ``trustser.data.load_corpus``."""
    p.add_argument(
        "--corpus-options",
        type=json_object_argument,
        default={},
        metavar="JSON",
        help='load_corpus options as a JSON object, e.g. \'{"text_column": "text", "label_map": {"joy": "happy"}}\'',
    )
