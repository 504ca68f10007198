"""Model folders (transformers layout). Each folder's ``register()`` adds its classes to the
Auto classes, so ``AutoModel.from_pretrained`` works on saved checkpoints once trustser is imported."""

import importlib

_MODEL_FOLDERS = ("ser_slm", "cem", "sed_controller")


def register_config_and_model(config_cls, model_cls) -> None:
    """AutoConfig + AutoModel registration of one model folder (idempotent); the config's
    ``model_type_aliases`` (earlier names of its model type) load as the same config."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    for alias in getattr(config_cls, "model_type_aliases", ()):
        CONFIG_MAPPING.register(alias, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)


def accepted_model_types(config_cls) -> tuple[str, ...]:
    """The config's ``model_type`` and its earlier names (``model_type_aliases``)."""
    return (config_cls.model_type, *getattr(config_cls, "model_type_aliases", ()))


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
