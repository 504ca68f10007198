"""Cached pipeline stages.

A stage's output lives in ``<cache_dir>/<name>-<key>/`` where ``key`` hashes the stage's settings
and the keys of the stages it reads. The folder appears only when the stage has finished (it is
built under a ``.partial`` name and renamed at the end, with a ``STAGE.json`` record inside), so an
interrupted stage is never taken for a finished one and a rerun, or another system with the same
upstream settings, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .utils import atomic_write_json

logger = logging.getLogger(__name__)

STAGE_RECORD = "STAGE.json"


def stage_key(name: str, settings: dict[str, Any], upstream: list["Stage"] | tuple = ()) -> str:
    payload = json.dumps(
        {"name": name, "settings": settings, "upstream": [s.key for s in upstream]},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Stage:
    """A finished stage: where its output is and which settings made it."""

    name: str
    key: str
    path: Path
    reused: bool

    def record(self) -> dict:
        return json.loads((self.path / STAGE_RECORD).read_text())


class StageRunner:
    """Runs or reuses stages. Multi-process aware: ``run(..., all_processes=False)`` executes the
    stage on the main process only while the others wait; ``all_processes=True`` runs the function
    on every process (training under ``accelerate launch``) into one shared partial folder."""

    def __init__(self, cache_dir: str | os.PathLike, state=None):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            from .utils import distributed_state
            state = distributed_state()
        self.state = state
        self.stages: list[Stage] = []

    def path_for(self, name: str, key: str) -> Path:
        return self.cache_dir / f"{name}-{key}"

    def run(
        self,
        name: str,
        settings: dict[str, Any],
        fn: Callable[[Path], Any],
        upstream: list[Stage] | tuple = (),
        *,
        all_processes: bool = False,
        resume: bool = False,
    ) -> Stage:
        """``resume``: keep what an interrupted run of this stage left in its (unfinished, hidden)
        partial folder, e.g. training checkpoints the stage function resumes from; by default the
        partial folder is started afresh. Either way the stage counts as finished only once ``fn``
        returned and ``STAGE.json`` is written."""
        key = stage_key(name, settings, upstream)
        final = self.path_for(name, key)
        if (final / STAGE_RECORD).exists():
            logger.info("stage %s: reusing %s", name, final)
            stage = Stage(name, key, final, True)
            self.stages.append(stage)
            return stage
        partial = self.cache_dir / f".{name}-{key}.partial"
        if self.state.is_main_process:
            if resume and partial.is_dir():
                logger.info("stage %s: resuming in %s", name, partial)
            else:
                shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted run
                partial.mkdir(parents=True)
        self.state.wait_for_everyone()
        started = time.time()
        if all_processes or self.state.is_main_process:
            logger.info("stage %s: running into %s", name, partial)
            fn(partial)
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            atomic_write_json(
                partial / STAGE_RECORD,
                {
                    "name": name,
                    "key": key,
                    "settings": settings,
                    "upstream": {s.name: s.key for s in upstream},
                    "seconds": round(time.time() - started, 2),
                },
            )
            if final.exists():  # a stale, unrecorded folder from an older layout
                shutil.rmtree(final)
            os.replace(partial, final)
        self.state.wait_for_everyone()
        stage = Stage(name, key, final, False)
        self.stages.append(stage)
        return stage
