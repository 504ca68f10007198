"""Cached pipeline stages.

A stage's output lives in ``<cache_dir>/<name>-<key>/`` where ``key`` hashes the stage's settings
and the keys of the stages it reads (and, through the settings, ``data_fingerprint`` of the
corpora it reads). The folder appears only when the stage has finished (it is built under a
``.partial`` name and renamed at the end, with a ``STAGE.json`` record inside), so an interrupted
stage is never taken for a finished one and a rerun, or another system with the same upstream
settings, reuses it.

Concurrent runs on one cache (two systems started together on one ``--output_dir``) are safe: a
stage is computed under an exclusive ``flock`` on ``.<name>-<key>.lock``. A second run waits for
the lock, then finds the stage finished and reuses it; only the lock holder touches the partial
folder. The kernel drops the lock when its process dies, so a lock left by a killed run is taken
over at once (its partial folder is then started afresh, or resumed with ``resume=True``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .utils import atomic_write_json

logger = logging.getLogger(__name__)

STAGE_RECORD = "STAGE.json"
# text files whose content (not only size and mtime) goes into a corpus fingerprint
_METADATA_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".txt", ".lab", ".yaml", ".yml", ".xml"}
_METADATA_MAX_BYTES = 64 << 20


def stage_key(name: str, settings: dict[str, Any], upstream: list["Stage"] | tuple = ()) -> str:
    payload = json.dumps(
        {"name": name, "settings": settings, "upstream": [s.key for s in upstream]},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def data_fingerprint(*paths: str | os.PathLike | None) -> str:
    """Identity of the input data under ``paths`` (files or folders) for stage settings: every
    file's relative path, size and mtime, plus the content of metadata files (CSV, JSON, text up to
    64 MiB). Editing a label in ``metadata.csv``, replacing or adding a clip changes it; hidden
    files and folders are left out. A missing path counts as its name."""
    h = hashlib.sha256()
    for raw in paths:
        if raw is None:
            continue
        path = Path(raw).expanduser()
        h.update(f"\0root:{path.name}".encode())
        if path.is_file():
            files = [(path.name, path)]
        elif path.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(path)
                files += [(str(rel / f), Path(dirpath) / f) for f in sorted(filenames) if not f.startswith(".")]
        else:
            h.update(b"\0missing")
            continue
        for rel, f in files:
            st = f.stat()
            h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
            if f.suffix.lower() in _METADATA_SUFFIXES and st.st_size <= _METADATA_MAX_BYTES:
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """A finished stage: where its output is and which settings made it."""

    name: str
    key: str
    path: Path
    reused: bool

    def record(self) -> dict:
        return json.loads((self.path / STAGE_RECORD).read_text())


class _StageLock:
    """An exclusive ``flock`` on one stage's lock file, held by the main process of a run. The file
    says who holds it (``run``, pid, host, since) for the run's other processes and for the log."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):  # absent, or being rewritten
            return None

    def acquire(self, run: str, what: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                h = self.holder() or {}
                logger.info(
                    "%s: being computed by another run (pid %s on %s since %s); waiting for it",
                    what,
                    h.get("pid", "?"),
                    h.get("host", "?"),
                    h.get("since", "?"),
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            record = json.dumps(
                {
                    "run": run,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            ).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def wait_for(self, run: str, poll: float = 0.5) -> None:
        """A non-main process: returns once this run's main process holds the lock (a barrier
        would time out while another run computes the stage for hours)."""
        while (self.holder() or {}).get("run") != run:
            time.sleep(poll)


class StageRunner:
    """Runs or reuses stages. Multi-process aware: ``run(..., all_processes=False)`` executes the
    stage on the main process only while the others wait; ``all_processes=True`` runs the function
    on every process (training under ``accelerate launch``) into one shared partial folder.
    Several runs may share ``cache_dir`` at once (see the module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike, state=None):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            from .utils import distributed_state

            state = distributed_state()
        self.state = state
        self.stages: list[Stage] = []
        self._run_id = self._shared_run_id()
        self._calls = 0

    def _shared_run_id(self) -> str:
        """One id for this run, the same on all its processes (they recognise their main process'
        lock by it)."""
        run_id = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        if getattr(self.state, "num_processes", 1) > 1:
            from accelerate.utils import broadcast_object_list

            run_id = broadcast_object_list([run_id], from_process=0)[0]
        return run_id

    def input_settings(self, *paths: str | os.PathLike | None) -> dict[str, str]:
        """Stage settings that identify input data: ``{"data": data_fingerprint(paths)}``, or ``{}``
        when every path is another stage's output in this cache (its key already says what it holds)."""
        outside = [p for p in paths if p is not None and not self.path_setting(p).startswith("cache:")]
        return {"data": data_fingerprint(*outside)} if outside else {}

    def path_setting(self, path: str | os.PathLike | None) -> str | None:
        """A path as a stage setting that does not depend on how it was spelled: relative to the
        cache (``cache:corpus-<key>/corpus``) when another stage wrote it, else absolute. A table run
        with ``--output_dir out`` and one with ``--output_dir /abs/out`` then share their stages."""
        if path is None:
            return None
        resolved = Path(path).expanduser().resolve()
        cache = self.cache_dir.resolve()
        if cache in resolved.parents:
            return f"cache:{resolved.relative_to(cache).as_posix()}"
        return str(resolved)

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
        single = getattr(self.state, "num_processes", 1) <= 1
        if single and (final / STAGE_RECORD).exists():  # several processes always agree under the lock
            return self._done(Stage(name, key, final, True))
        self._calls += 1
        lock = _StageLock(self.cache_dir / f".{name}-{key}.lock")
        token = f"{self._run_id}#{self._calls}"
        if self.state.is_main_process:
            lock.acquire(token, f"stage {name} ({final.name})")
        else:
            lock.wait_for(token)
        try:
            # the lock is held by this run's main process: nobody finishes or touches this stage now
            self.state.wait_for_everyone()
            if (final / STAGE_RECORD).exists():  # finished by the run we waited for
                self.state.wait_for_everyone()
                return self._done(Stage(name, key, final, True))
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
        finally:
            lock.release()
        return self._done(Stage(name, key, final, False))

    def _done(self, stage: Stage) -> Stage:
        if stage.reused:
            logger.info("stage %s: reusing %s", stage.name, stage.path)
        self.stages.append(stage)
        return stage
