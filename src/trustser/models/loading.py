"""Loading guard shared by trustser's model classes: a checkpoint of another type, or one with
missing or unexpected weights, is an error naming the directory, not a silently
random-initialised model."""

from __future__ import annotations

_HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only")


def checkpoint_model_type(path, **kwargs) -> str | None:
    """``model_type`` in a checkpoint's config.json; None when there is no readable config."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    except (OSError, ValueError):
        return None
    return config.get("model_type")


class CheckedFromPretrainedMixin:
    """``from_pretrained`` refuses a checkpoint whose config names another model type."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            from . import accepted_model_types

            found = checkpoint_model_type(pretrained_model_name_or_path, **kwargs)
            wanted = cls.config_class.model_type
            if found is not None and found not in accepted_model_types(cls.config_class):
                raise ValueError(
                    f"{pretrained_model_name_or_path}: holds a {found!r} checkpoint, not a {cls.__name__} "
                    f"(model_type {wanted!r}); point to the right directory"
                )
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        refuse_incomplete_weights(pretrained_model_name_or_path, info, cls.__name__)
        return (model, info) if wants_info else model


def refuse_incomplete_weights(path, info: dict, what: str) -> None:
    """A checkpoint whose weights miss some of the model's parameters (left randomly initialised)
    or hold ones the model does not have is a ValueError naming the directory and the keys.
    ``transformers`` already leaves out what may be absent: tied weights (``_tied_weights_keys``),
    non-persistent buffers and the class' ``_keys_to_ignore_on_load_*``."""
    problems = []
    for kind in ("missing", "unexpected"):
        keys = sorted(info.get(f"{kind}_keys") or ())
        if keys:
            problems.append(f"{len(keys)} {kind} weight(s) {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    if problems:
        raise ValueError(
            f"{path}: not a complete {what} checkpoint: {'; '.join(problems)} "
            "(a renamed, truncated or foreign weights file?)"
        )


def require_model_type(path, wanted: str, what: str) -> None:
    """A local checkpoint directory whose config names another ``model_type`` is a ValueError
    naming the directory (before any Auto class or pipeline turns it into a long, unclear one)."""
    from pathlib import Path

    if not Path(str(path)).is_dir():
        return
    found = checkpoint_model_type(str(path))
    if found is not None and found != wanted:
        raise ValueError(
            f"{path}: holds a {found!r} checkpoint, not a {what} (model_type {wanted!r}); point to the right directory"
        )
