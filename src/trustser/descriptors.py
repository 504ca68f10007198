"""Speech emotion descriptors (SEDs), emotion label sets and the structured caption.

The caption is the SER-SLM's supervision target and its explanation: one template, built and
parsed here and nowhere else. Parsing never raises on model output; it reports what it could not
read so that evaluation can count unparseable captions instead of crashing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

# Canonical order of the five descriptors wherever they form a vector (CEM outputs, controller
# actions, correctness labels). The caption itself speaks them in a different, natural order.
SED_FIELDS: tuple[str, ...] = ("pitch", "volume", "speed", "gender", "age")

SED_VOCAB: dict[str, tuple[str, ...]] = {
    "pitch": ("low", "normal", "high"),
    "volume": ("low", "normal", "high"),
    "speed": ("slow", "normal", "fast"),
    "gender": ("male", "female"),
    "age": ("child", "teenager", "young adult", "middle-aged", "elderly"),
}
# Where a row's descriptors come from -> the suffix of their columns (``pitch``, ``pitch_auto``, ...):
# the reliable labels, the automatic annotation, the controller's pseudo-labels.
SED_SOURCES: dict[str, str] = {"truth": "", "auto": "_auto", "pseudo": "_pseudo"}

# Fields whose values are ordered (low < normal < high): "adjacent value" is meaningful there.
ORDINAL_FIELDS: tuple[str, ...] = ("pitch", "volume", "speed", "age")

# One canonical emotion vocabulary; each corpus uses a subset of it.
EMOTIONS: tuple[str, ...] = ("neutral", "happy", "angry", "sad", "surprised", "disgusted", "fearful")

EMOTION_LABELS: dict[str, tuple[str, ...]] = {
    "iemocap": ("neutral", "happy", "angry", "sad"),
    "meld": ("neutral", "happy", "angry", "sad", "surprised", "disgusted", "fearful"),
    "speechcraft": ("neutral", "happy", "angry", "sad", "surprised", "disgusted", "fearful"),
    "synthetic": ("neutral", "happy", "angry", "sad"),
}

# Raw corpus codes -> canonical emotion; a code mapped to None is dropped (and counted) by loaders.
EMOTION_MAPS: dict[str, dict[str, str | None]] = {
    "iemocap": {
        "neu": "neutral",
        "hap": "happy",
        "exc": "happy",
        "ang": "angry",
        "sad": "sad",
        "fru": None,
        "sur": None,
        "fea": None,
        "dis": None,
        "oth": None,
        "xxx": None,
    },
    "meld": {
        "neutral": "neutral",
        "joy": "happy",
        "anger": "angry",
        "sadness": "sad",
        "surprise": "surprised",
        "disgust": "disgusted",
        "fear": "fearful",
    },
    "speechcraft": {
        "neutral": "neutral",
        "happy": "happy",
        "angry": "angry",
        "sad": "sad",
        "surprised": "surprised",
        "disgusted": "disgusted",
        "fearful": "fearful",
        # labels emotion2vec can emit beyond the seven; SpeechCraft maps them to neutral
        "other": "neutral",
        "unknown": "neutral",
        "<unk>": "neutral",
    },
    "synthetic": {e: e for e in EMOTION_LABELS["synthetic"]},
}


def map_emotion(corpus: str, raw: str) -> str | None:
    """Canonical emotion for a corpus' raw label; None for labels the corpus' protocol drops.

    Raises KeyError naming the label for codes the corpus does not define (unknown label)."""
    table = EMOTION_MAPS[corpus]
    key = raw.strip().lower()
    if key not in table:
        raise KeyError(f"unknown {corpus} emotion label {raw!r}; known: {sorted(table)}")
    return table[key]


def normalize_sed_value(field_name: str, value: str | None) -> str | None:
    """Lower-cases and canonicalises spellings ("Young Adult", "middle aged"); None if not in the vocabulary."""
    if value is None:
        return None
    v = " ".join(str(value).strip().lower().replace("_", " ").split())
    if field_name == "age":
        v = {"middle aged": "middle-aged", "young-adult": "young adult", "teen": "teenager"}.get(v, v)
    return v if v in SED_VOCAB[field_name] else None


# --------------------------------------------------------------------------------------------
# Caption template
# --------------------------------------------------------------------------------------------
# The words just before the emotion label: the LM's distribution after them is the emotion's.
EMOTION_PREFIX = "the emotional state of this speaker is "
_EMO_SUFFIX = ". Based on the audio caption, " + EMOTION_PREFIX
SED_TEMPLATE = (
    "The {age} {gender} speaks with a {speed} speed, a {pitch} pitch and a {volume} volume, "
    "saying '{text}'" + _EMO_SUFFIX + "{emotion}."
)
PLAIN_TEMPLATE = "The speaker says '{text}'" + _EMO_SUFFIX + "{emotion}."


def build_caption(
    text: str,
    emotion: str,
    sed: Mapping[str, str] | None = None,
    *,
    with_sed: bool = True,
    return_spans: bool = False,
):
    """The supervision caption; with ``return_spans`` also ``{name: (start, end)}`` character
    spans of every descriptor value, the transcription (``"text"``) and the emotion, which the
    processor turns into token positions (emotion-only reward, descriptor-token CEM features)."""
    if with_sed:
        if sed is None:
            raise ValueError("build_caption(with_sed=True) needs the five descriptors")
        values = {}
        for f in SED_FIELDS:
            v = normalize_sed_value(f, sed.get(f))
            if v is None:
                raise ValueError(f"invalid or missing {f!r} descriptor: {sed.get(f)!r} (allowed: {SED_VOCAB[f]})")
            values[f] = v
        template = SED_TEMPLATE
    else:
        values = {}
        template = PLAIN_TEMPLATE
    values["text"] = text
    values["emotion"] = emotion
    pieces = re.split(r"(\{\w+\})", template)
    out, spans, pos = [], {}, 0
    for piece in pieces:
        m = re.fullmatch(r"\{(\w+)\}", piece)
        s = values[m.group(1)] if m else piece
        if m:
            spans[m.group(1)] = (pos, pos + len(s))
        out.append(s)
        pos += len(s)
    caption = "".join(out)
    return (caption, spans) if return_spans else caption


# The emotion label an unparseable caption is scored as (a class of its own in the confusion matrix).
UNPARSED = "<unparsed>"


@dataclass
class ParsedCaption:
    """What could be read back from a (possibly generated) caption."""

    fields: dict[str, str] = field(default_factory=dict)  # SED fields, "text" and "emotion" found
    missing: list[str] = field(default_factory=list)  # expected but not found
    invalid: list[str] = field(default_factory=list)  # found, but not a known value

    @property
    def ok(self) -> bool:
        return not self.missing and not self.invalid

    def get(self, name: str, default=None):
        return self.fields.get(name, default)


_word = r"[^\s,'.]+"
_STRICT_SED = re.compile(
    r"^\s*The (?P<age>.+?) (?P<gender>\S+) speaks with an? (?P<speed>.+?) speed, an? (?P<pitch>.+?) pitch"
    r" and an? (?P<volume>.+?) volume, saying '(?P<text>.*)'\. Based on the audio caption, the emotional"
    r" state of this speaker is (?P<emotion>[^.\n]+?)\s*\.?\s*$",
    re.DOTALL,
)
_STRICT_PLAIN = re.compile(
    r"^\s*The speaker says '(?P<text>.*)'\. Based on the audio caption, the emotional state of this"
    r" speaker is (?P<emotion>[^.\n]+?)\s*\.?\s*$",
    re.DOTALL,
)
# Piecewise fall-backs for damaged output: each field on its own.
_LOOSE = {
    "age_gender": re.compile(r"\bThe (?P<age>[\w\- ]+?) (?P<gender>\w+) speaks\b", re.IGNORECASE),
    "speed": re.compile(r"\ban? (?P<v>[\w\-]+) speed\b", re.IGNORECASE),
    "pitch": re.compile(r"\ban? (?P<v>[\w\-]+) pitch\b", re.IGNORECASE),
    "volume": re.compile(r"\ban? (?P<v>[\w\-]+) volume\b", re.IGNORECASE),
    "text": re.compile(r"\bsay(?:s|ing) '(?P<v>.*)'", re.DOTALL),
    "emotion": re.compile(r"emotional state of this speaker is (?P<v>[\w\-]+)", re.IGNORECASE),
}


def parse_caption(
    text: str,
    *,
    with_sed: bool = True,
    emotion_labels: Sequence[str] | None = None,
) -> ParsedCaption:
    """Reads the fields back from a caption. Never raises: unreadable parts go to
    ``missing`` (absent) or ``invalid`` (present but outside the vocabulary)."""
    result = ParsedCaption()
    labels = tuple(emotion_labels) if emotion_labels is not None else EMOTIONS
    wanted = (list(SED_FIELDS) if with_sed else []) + ["text", "emotion"]
    if not isinstance(text, str):
        result.missing = wanted
        return result
    raw: dict[str, str] = {}
    m = (_STRICT_SED if with_sed else _STRICT_PLAIN).match(text)
    if m:
        raw = m.groupdict()
    else:
        if with_sed:
            ag = _LOOSE["age_gender"].search(text)
            if ag:
                raw["age"], raw["gender"] = ag.group("age"), ag.group("gender")
            for f in ("speed", "pitch", "volume"):
                mm = _LOOSE[f].search(text)
                if mm:
                    raw[f] = mm.group("v")
        for f in ("text", "emotion"):
            mm = _LOOSE[f].search(text)
            if mm:
                raw[f] = mm.group("v")
    for name in wanted:
        if name not in raw or raw[name] is None:
            result.missing.append(name)
            continue
        value = raw[name]
        if name == "text":
            result.fields["text"] = value
        elif name == "emotion":
            v = value.strip().lower()
            if v in labels:
                result.fields["emotion"] = v
            else:
                result.invalid.append("emotion")
        else:
            v = normalize_sed_value(name, value)
            if v is None:
                result.invalid.append(name)
            else:
                result.fields[name] = v
    return result


def sed_from_row(row: Mapping, suffix: str = "") -> dict[str, str]:
    """The five descriptors of a dataset row, from columns ``<field><suffix>`` (e.g. ``_auto``)."""
    return {f: row[f + suffix] for f in SED_FIELDS}


def sed_accuracy(predicted: Iterable[Mapping], reference: Iterable[Mapping]) -> dict[str, float]:
    """Per-field accuracy of predicted descriptors; a missing prediction counts as wrong."""
    hits = {f: 0 for f in SED_FIELDS}
    n = 0
    for p, r in zip(predicted, reference):
        n += 1
        for f in SED_FIELDS:
            hits[f] += int(p.get(f) is not None and p.get(f) == r.get(f))
    return {f: (hits[f] / n if n else float("nan")) for f in SED_FIELDS}
