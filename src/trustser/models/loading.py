"""Loading guard shared by trustser's model classes: a checkpoint of another type is an error
naming the directory, not a silently random-initialised model."""

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
            found = checkpoint_model_type(pretrained_model_name_or_path, **kwargs)
            wanted = cls.config_class.model_type
            if found is not None and found != wanted:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: holds a {found!r} checkpoint, not a {cls.__name__} "
                    f"(model_type {wanted!r}); point to the right directory"
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def require_model_type(path, wanted: str, what: str) -> None:
    """A local checkpoint directory whose config names another ``model_type`` is a ValueError
    naming the directory (before any Auto class or pipeline turns it into a long, unclear one)."""
    from pathlib import Path

    if not Path(str(path)).is_dir():
        return
    found = checkpoint_model_type(str(path))
    if found is not None and found != wanted:
        raise ValueError(f"{path}: holds a {found!r} checkpoint, not a {what} (model_type {wanted!r}); point to the right directory")
