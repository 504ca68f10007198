"""``trustser push OUTPUT_DIR REPO_ID``: release a trained system on the Hugging Face Hub (or,
with ``--export-dir``, write the repository's content locally without pushing). ``--space SPACE_ID``
also creates a Gradio Space serving the pushed model (:mod:`trustser.demo`)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a trustser output directory (or its <system>-seed<seed> folder)")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/trustser-sys10-iemocap")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / `hf auth login`)")
    parser.add_argument(
        "--license", default=None, help="license id for the cards (default: apache-2.0; llama3.1 for the paper preset)"
    )
    parser.add_argument("--export-dir", default=None, help="write the repository folder here instead of pushing")
    parser.add_argument(
        "--space",
        default=None,
        metavar="SPACE_ID",
        help="also create/update a Gradio Space (e.g. you/trustser-demo) serving REPO_ID",
    )
    parser.add_argument(
        "--space-requirement",
        default="trustser",
        help="the pip requirement that installs trustser in the Space (e.g. a git URL)",
    )
    parser.add_argument(
        "--space-wheel", default=None, help="a trustser wheel to upload into the Space and install from there"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --export-dir even if it is not an earlier export"
    )


def run(args: argparse.Namespace) -> int:
    from ..hub import export_release, push_to_hub

    if args.export_dir:
        from ..utils import check_output_dir

        check_output_dir(
            args.export_dir,
            marker="trustser_results.json",
            overwrite=args.overwrite,
            inputs=[args.output_dir],
            option="--export-dir",
        )
        path = export_release(args.output_dir, args.export_dir, args.repo_id, license=args.license)
        print(f"trustser push: repository content written to {path}")
        if args.space:
            from pathlib import Path

            from ..demo import example_clips, space_files

            space = space_files(
                Path(args.export_dir).with_name(Path(args.export_dir).name + "-space"),
                args.repo_id,
                examples=example_clips(args.output_dir),
                requirement=args.space_requirement,
                wheel=args.space_wheel,
            )
            print(f"trustser push: Space content written to {space}")
        return 0
    out = push_to_hub(args.output_dir, args.repo_id, private=args.private, token=args.token, license=args.license)
    if args.space:
        from ..demo import example_clips, push_space

        out["space"] = push_space(
            args.space,
            args.repo_id,
            examples=example_clips(args.output_dir),
            requirement=args.space_requirement,
            wheel=args.space_wheel,
            private=args.private,
            token=args.token,
        )
    print(json.dumps(out, indent=2))
    return 0
