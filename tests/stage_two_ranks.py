"""Run by tests/test_reliability.py under ``accelerate launch`` (two CPU processes): one stage
computed on both ranks, then reused; each rank writes what it saw to ``<out>/rank<r>.json``."""

import json
import sys
from pathlib import Path

from trustser.stages import StageRunner
from trustser.utils import distributed_state, end_distributed

out = Path(sys.argv[1])
state = distributed_state()
runner = StageRunner(out / "cache", state)


def fn(partial: Path):
    (partial / f"from_rank{state.process_index}.txt").write_text("1")


first = runner.run("pretrain", {"x": 1}, fn, all_processes=True)
again = runner.run("pretrain", {"x": 1}, fn, all_processes=True)
other = runner.run("cem", {"y": 2}, fn, [first])
(out / f"rank{state.process_index}.json").write_text(
    json.dumps(
        {
            "num_processes": state.num_processes,
            "run_id": runner._run_id,
            "stages": [[s.name, s.reused, sorted(p.name for p in s.path.iterdir())] for s in (first, again, other)],
        }
    )
)
end_distributed()
