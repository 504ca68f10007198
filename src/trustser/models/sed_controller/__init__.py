"""SED Controller: the RL policy that rectifies annotated speech emotion descriptors."""

from .configuration_sed_controller import SedControllerConfig
from .modeling_sed_controller import (
    MODIFY,
    RETAIN,
    PolicySample,
    SedControllerModel,
    SedControllerOutput,
    SedControllerPreTrainedModel,
    ids_to_sed,
    modify_labels,
    sample_policies,
    sed_to_ids,
)
from .modeling_sed_controller import __all__ as _modeling_all

# the RL objective moved to trustser.trainers.rectify_objective (beside the trainer); the old
# import path keeps working, resolved on first use so that the model package imports no trainer
_OBJECTIVE = ("action_log_probs", "bernoulli_entropy", "clipped_policy_loss", "group_normalize")


def __getattr__(name: str):
    if name in _OBJECTIVE:
        from ...trainers import rectify_objective

        return getattr(rectify_objective, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Adds the controller to AutoConfig/AutoModel (idempotent)."""
    from .. import register_config_and_model

    register_config_and_model(SedControllerConfig, SedControllerModel)


__all__ = ["SedControllerConfig", *_modeling_all, "register"]
