"""Model folders (transformers layout). Each folder's ``register()`` adds its classes to the
Auto classes, so ``AutoModel.from_pretrained`` works on saved checkpoints once trustser is imported."""

import importlib

_MODEL_FOLDERS = ("ser_slm", "cem", "sed_controller")


def register_config_and_model(config_cls, model_cls) -> None:
    """AutoConfig + AutoModel registration of one model folder (idempotent)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)


def register_auto_classes() -> None:
    for name in _MODEL_FOLDERS:
        full = f"{__name__}.{name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:  # folder not present in this build
                continue
            raise
        module.register()
