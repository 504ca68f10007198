"""Speaker-relative prosody, the context a SED Controller reads with
``SedRectifyConfig.controller_speaker_context``.

The annotator labels pitch / volume / speed from fixed thresholds on absolute measurements, while
the true descriptors are relative to the speaker; one utterance's audio does not reveal its
speaker's baseline. This gives the controller that baseline: per utterance, the z-score of each of
the annotator's measurements within its speaker, over the rows of one dataset.
"""

from __future__ import annotations

import numpy as np

from ..annotation.binning import FEATURE_FOR_FIELD

SPEAKER_COLUMN = "speaker"
# the annotator's measurement columns, in SED field order (pitch, volume, speed)
PROSODY_COLUMNS: tuple[str, ...] = tuple(FEATURE_FOR_FIELD.values())
# ratio-scale measurements, z-scored on their logarithm
LOG_COLUMNS: tuple[str, ...] = ("f0_median",)
SPEAKER_CONTEXT_COLUMN = "speaker_context"
SPEAKER_CONTEXT_SIZE = len(PROSODY_COLUMNS)
STD_FLOOR = 1e-6


def _measurements(values, log: bool) -> np.ndarray:
    """float64 array, NaN where a value is missing, not finite, or (``log``) not positive."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    v[~np.isfinite(v)] = np.nan
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(v > 0, np.log(v), np.nan)
    return v


def speaker_relative_prosody(dataset) -> np.ndarray:
    """(N, 3) float32: per row, the z-score of log ``f0_median``, ``rms_db`` and
    ``phonemes_per_second`` within the row's speaker (mean and population std over that speaker's
    rows of ``dataset`` with a usable value; std floored at 1e-6). 0 says "no information": a
    missing (or non-positive F0) value, an empty speaker, or a speaker with fewer than 2 usable
    values. Unlike the annotator's ``speaker_zscores`` nothing is borrowed from the group or the
    population, so the context never carries another speaker's baseline.

    Raises ValueError naming the columns ``dataset`` lacks (``speaker`` and the three measurements)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        raise ValueError(
            f"speaker-relative prosody needs a dataset with columns (a datasets.Dataset), got {type(dataset).__name__}"
        )
    missing = [c for c in (SPEAKER_COLUMN, *PROSODY_COLUMNS) if c not in names]
    if missing:
        raise ValueError(
            f"speaker-relative prosody (controller_speaker_context): the dataset lacks the columns {missing} (it "
            f"needs the speaker and the annotator's measurements {list(PROSODY_COLUMNS)}, as the recipe's annotated "
            "datasets carry them)"
        )
    table = dataset.select_columns([SPEAKER_COLUMN, *PROSODY_COLUMNS])  # leaves the audio undecoded
    speakers = np.asarray(["" if s is None else str(s) for s in table[SPEAKER_COLUMN]], dtype=object)
    context = np.zeros((len(speakers), SPEAKER_CONTEXT_SIZE), dtype=np.float64)
    for j, column in enumerate(PROSODY_COLUMNS):
        v = _measurements(table[column], log=column in LOG_COLUMNS)
        for speaker in np.unique(speakers):
            if not speaker:
                continue
            rows = (speakers == speaker) & ~np.isnan(v)
            if rows.sum() < 2:
                continue
            x = v[rows]
            context[rows, j] = (x - x.mean()) / max(float(x.std()), STD_FLOOR)
    return context.astype(np.float32)


def with_speaker_context(dataset):
    """``dataset`` with a ``speaker_context`` column (``speaker_relative_prosody`` of its own rows,
    replacing any such column), computed once so that the collator only reads it."""
    context = speaker_relative_prosody(dataset)
    if SPEAKER_CONTEXT_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(SPEAKER_CONTEXT_COLUMN)
    return dataset.add_column(SPEAKER_CONTEXT_COLUMN, context.tolist())


__all__ = [
    "speaker_relative_prosody",
    "with_speaker_context",
    "PROSODY_COLUMNS",
    "SPEAKER_CONTEXT_COLUMN",
    "SPEAKER_CONTEXT_SIZE",
]
