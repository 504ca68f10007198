"""IEMOCAP (``IEMOCAP_full_release``) in the common schema, 4 classes, session-based protocols.

Layout read (docs/corpora.md): ``Session{N}/dialog/EmoEvaluation/<dialog>.txt`` (regular files
only; the ``Categorical/``, ``Attribute/``, ``Self-evaluation/`` sub-folders are per-evaluator
detail), ``Session{N}/dialog/transcriptions/<dialog>.txt``, ``Session{N}/sentences/wav/<dialog>/<id>.wav``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .schema import (
    CorpusStats,
    build_dataset_dict,
    check_on_unknown,
    file_manifest,
    make_row,
    read_text,
    require_dir,
    seeded_fraction,
)

SESSIONS = (1, 2, 3, 4, 5)
_ID = re.compile(r"^Ses\d{2}[FM]_\S+_[FM]\w*$")
_TRANSCRIPT = re.compile(r"^(?P<id>Ses\d{2}[FM]_\S+_[FM]\w*)\s+\[[^\]]*\]:\s?(?P<text>.*)$")
_GENDER = {"F": "female", "M": "male"}


def parse_emo_evaluation(path: Path, stats: CorpusStats) -> list[tuple[str, str, int]]:
    """(utterance id, raw code, line number) for each ``[``-line; evaluator lines are skipped."""
    out = []
    for lineno, line in enumerate(read_text(path, stats, fallback="cp1252", universal_newlines=True).split("\n"), 1):
        if not line.startswith("["):
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3 or not _ID.match(parts[1].strip()) or not parts[2].strip():
            stats.bad_line(
                path, lineno, f"not a '[start - end]<TAB>id<TAB>label<TAB>[v, a, d]' line: {line.strip()[:80]!r}"
            )
            continue
        out.append((parts[1].strip(), parts[2].strip(), lineno))
    return out


def parse_transcription(path: Path, stats: CorpusStats | None = None) -> dict[str, str]:
    """id -> text; lines without an utterance id (``M: ...``, notes) are not utterances. Lines
    that are not UTF-8 are read as cp1252 and noted (``read_text``)."""
    texts = {}
    for line in read_text(path, stats, fallback="cp1252", universal_newlines=True).split("\n"):
        m = _TRANSCRIPT.match(line.strip())
        if m:
            texts.setdefault(m.group("id"), m.group("text").strip())
    return texts


def load_iemocap(
    root,
    *,
    protocol: str = "session5",
    fold: int | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
    on_unknown: str = "error",
    cache_dir=None,
    num_proc: int | None = None,
):
    """IEMOCAP, 4 classes (neutral, happy = hap + exc, angry, sad); other codes dropped and counted.

    ``protocol="session5"``: test = Session 5 (the LLM-SER papers' protocol);
    ``protocol="loso", fold=k``: test = Session k (EmoBox/emotion2vec 5-fold leave-one-session-out).
    The dev split holds out whole dialogs of the training sessions: per session
    ``max(1, round(dev_fraction * n_dialogs))`` dialogs chosen by ``seed`` (none when
    ``dev_fraction=0``), so no dialog is shared between train and dev. A code IEMOCAP does not
    define is a ValueError naming file and line (``on_unknown="skip"``: skipped and counted)."""
    root = require_dir(root, "IEMOCAP root")
    if protocol == "session5":
        if fold not in (None, 5):
            raise ValueError(f"protocol='session5' tests on Session 5; got fold={fold} (use protocol='loso')")
        fold = 5
    elif protocol == "loso":
        if fold not in SESSIONS:
            raise ValueError(f"protocol='loso' needs fold in 1..5 (the test session), got {fold!r}")
    else:
        raise ValueError(f"unknown IEMOCAP protocol {protocol!r}; use 'session5' or 'loso'")
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    options = {"protocol": protocol, "fold": fold, "dev_fraction": dev_fraction, "seed": seed}
    stats = CorpusStats("iemocap", str(root), options, on_unknown=check_on_unknown(on_unknown))
    options["on_unknown"] = on_unknown

    present = [n for n in SESSIONS if (root / f"Session{n}").is_dir()]
    if not present:
        raise FileNotFoundError(f"IEMOCAP root {root} has no Session1..Session5 folders")
    if fold not in present:
        raise FileNotFoundError(f"IEMOCAP test session folder {root / f'Session{fold}'} does not exist")
    missing_sessions = [n for n in SESSIONS if n not in present]
    if missing_sessions:
        stats.notes.append(f"sessions absent under the root: {missing_sessions}")

    read_files: list[Path] = []
    rows_by_session: dict[int, list[dict]] = {}
    for n in present:
        sdir = root / f"Session{n}"
        eval_dir = sdir / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            raise FileNotFoundError(f"IEMOCAP: {eval_dir} does not exist")
        rows = []
        seen: set[str] = set()
        transcripts: dict[str, dict[str, str]] = {}
        for eval_file in sorted(
            p for p in eval_dir.iterdir() if p.is_file() and p.suffix == ".txt" and not p.name.startswith(".")
        ):
            read_files.append(eval_file)
            for utt, code, lineno in parse_emo_evaluation(eval_file, stats):
                emotion = stats.map_label("iemocap", code, eval_file, lineno)
                if emotion is None:
                    continue
                if utt in seen:
                    stats.bad_line(eval_file, lineno, f"duplicate utterance {utt}")
                    continue
                seen.add(utt)
                dialog = utt.rsplit("_", 1)[0]
                if dialog not in transcripts:
                    tfile = sdir / "dialog" / "transcriptions" / f"{dialog}.txt"
                    if tfile.is_file():
                        read_files.append(tfile)
                        transcripts[dialog] = parse_transcription(tfile, stats)
                    else:
                        stats.notes.append(f"no transcription file {tfile}")
                        transcripts[dialog] = {}
                wav = sdir / "sentences" / "wav" / dialog / f"{utt}.wav"
                if not wav.is_file():
                    stats.missing_audio.append(utt)
                    continue
                read_files.append(wav)
                letter = utt.rsplit("_", 1)[1][0]
                rows.append(
                    make_row(
                        utt,
                        str(wav),
                        text=transcripts[dialog].get(utt, ""),
                        emotion=emotion,
                        speaker=f"Ses{n:02d}{letter}",
                        gender=_GENDER[letter],
                    )
                )
        rows_by_session[n] = rows

    splits = {"train": [], "dev": [], "test": list(rows_by_session[fold])}
    for n in present:
        if n == fold:
            continue
        dev_dialogs = _dev_dialogs(rows_by_session[n], dev_fraction, seed)
        for row in rows_by_session[n]:
            splits["dev" if row["id"].rsplit("_", 1)[0] in dev_dialogs else "train"].append(row)
    return build_dataset_dict(
        stats, splits, manifest=file_manifest(read_files), options=options, cache_dir=cache_dir, num_proc=num_proc
    )


def _dev_dialogs(rows: list[dict], fraction: float, seed: int) -> set[str]:
    dialogs = sorted({r["id"].rsplit("_", 1)[0] for r in rows})
    if fraction <= 0 or len(dialogs) < 2:
        return set()
    k = max(1, round(fraction * len(dialogs)))
    return set(sorted(dialogs, key=lambda d: seeded_fraction(seed, d))[:k])
