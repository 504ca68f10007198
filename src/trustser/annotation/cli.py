"""``python -m trustser.annotation.cli ARGS`` = ``trustser annotate ARGS`` (its errors as tracebacks),
kept for the ``accelerate launch -m trustser.annotation.cli`` lines written before the command moved
to :mod:`trustser.cli.annotate`; ``accelerate launch -m trustser.cli annotate`` is the same."""

if __name__ == "__main__":  # pragma: no cover
    import argparse
    import sys

    from trustser.cli.annotate import add_arguments, run

    parser = argparse.ArgumentParser(prog="trustser annotate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
