"""Automatic SED annotation (SpeechCraft-style). The logic lives in ``annotator.py`` (the two
passes), ``features.py`` (per-clip signal features), ``binning.py`` (features -> words) and
``classifiers.py`` (gender/age backends); this file re-exports the public names."""

from . import annotator
from .annotator import (
    AUTO_COLUMNS,
    ERROR_COLUMN,
    F0_TRACK_COLUMN,
    FEATURE_COLUMNS,
    annotate,
    annotation_report,
    fit_reference_classifiers,
    rebin,
)
from .binning import METHODS, AdaptiveConfig, UnifiedThresholds
from .classifiers import HubAudioClassifier, OfflineClassifier

__all__ = [
    *annotator.__all__,
    "UnifiedThresholds",
    "AdaptiveConfig",
    "OfflineClassifier",
    "HubAudioClassifier",
    "METHODS",
]
