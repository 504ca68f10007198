"""SED Controller: the RL policy that rectifies annotated speech emotion descriptors."""

from .configuration_sed_controller import SedControllerConfig
from .modeling_sed_controller import (
    MODIFY,
    RETAIN,
    PolicySample,
    SedController,
    SedControllerOutput,
    SedControllerPreTrainedModel,
    action_log_probs,
    bernoulli_entropy,
    clipped_policy_loss,
    group_normalize,
    ids_to_sed,
    modify_labels,
    sample_policies,
    sed_to_ids,
)


def register() -> None:
    """Adds the controller to AutoConfig/AutoModel (idempotent)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(SedControllerConfig.model_type, SedControllerConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModel.register(SedControllerConfig, SedController)
    except ValueError:
        pass


__all__ = [
    "SedControllerConfig",
    "SedController",
    "SedControllerOutput",
    "SedControllerPreTrainedModel",
    "PolicySample",
    "sample_policies",
    "modify_labels",
    "action_log_probs",
    "bernoulli_entropy",
    "group_normalize",
    "clipped_policy_loss",
    "sed_to_ids",
    "ids_to_sed",
    "RETAIN",
    "MODIFY",
    "register",
]
