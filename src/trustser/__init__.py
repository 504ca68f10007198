"""trustser: explainable and trustworthy speech emotion recognition, on the Hugging Face stack.

Public names are imported lazily (as in transformers). The model classes are registered with
transformers' Auto classes at import, so ``AutoModel.from_pretrained(checkpoint)`` works on a
trustser checkpoint after ``import trustser`` without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # descriptors and captions
    "SED_FIELDS": "trustser.descriptors",
    "SED_VOCAB": "trustser.descriptors",
    "EMOTIONS": "trustser.descriptors",
    "EMOTION_LABELS": "trustser.descriptors",
    "build_caption": "trustser.descriptors",
    "parse_caption": "trustser.descriptors",
    "ParsedCaption": "trustser.descriptors",
    # data and annotation
    "load_corpus": "trustser.data",
    "synthesize_corpus": "trustser.data.synthetic",
    "annotate": "trustser.annotation",
    # SER-SLM
    "SerSlmConfig": "trustser.models.ser_slm",
    "SerSlmForConditionalGeneration": "trustser.models.ser_slm",
    "SerSlmProcessor": "trustser.models.ser_slm",
    "build_tiny_ser_slm": "trustser.models.ser_slm",
    "build_paper_ser_slm": "trustser.models.ser_slm",
    "SerSlmDataCollator": "trustser.trainers.sft",
    "SerSlmSFTTrainer": "trustser.trainers.sft",
    "SerSlmSFTConfig": "trustser.trainers.sft",
    "ChannelAugmentation": "trustser.data.augmentation",
    # evaluation
    "generate_captions": "trustser.generation",
    "evaluate_ser": "trustser.evaluation",
    # CEM and selection
    "CemConfig": "trustser.models.cem",
    "CemModel": "trustser.models.cem",
    "train_cem": "trustser.trainers.cem",
    "score_confidence": "trustser.selection",
    "select_by_confidence": "trustser.selection",
    # controller and rectification
    "SedControllerConfig": "trustser.models.sed_controller",
    "SedControllerModel": "trustser.models.sed_controller",
    "SedRectifyConfig": "trustser.trainers.rectify_config",
    "SedRectifyTrainer": "trustser.trainers.rectify",
    "audit_controller": "trustser.trainers.controller_audit",
    # explained predictions and release
    "ExplainableSerPipeline": "trustser.explain",
    "explain_files": "trustser.explain",
    "load_explainer": "trustser.explain",
    "push_to_hub": "trustser.hub",
    "build_demo": "trustser.demo",
    "push_space": "trustser.demo",
}

__all__ = sorted(_EXPORTS) + ["register_auto_classes", "__version__"]

_registered = False


def register_auto_classes() -> None:
    """Adds trustser's configs/models/processors to transformers' Auto classes (idempotent)."""
    global _registered
    if not _registered:
        _registered = True
        from .models import register_auto_classes as _register

        _register()
        # the `explainable-ser` transformers pipeline task
        from .explain import register_pipeline

        register_pipeline()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trustser' has no attribute {name!r}")


def __dir__():
    return __all__


register_auto_classes()
