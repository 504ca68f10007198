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
from .modeling_sed_controller import __all__ as _modeling_all


def register() -> None:
    """Adds the controller to AutoConfig/AutoModel (idempotent)."""
    from .. import register_config_and_model

    register_config_and_model(SedControllerConfig, SedController)


__all__ = ["SedControllerConfig", *_modeling_all, "register"]
