"""Sys. 2 of the paper's Table 1. `accelerate launch recipes/sys2.py [--config FILE] [--field value ...]`;
with no arguments it runs on the embedded default (synthetic corpus, tiny preset)."""

from trustser.recipe import main

if __name__ == "__main__":
    main(system="sys2")
