"""SER-SLM: speech encoder + VIB branches + projector + causal LM (transformers model folder)."""

from .configuration_ser_slm import SerSlmConfig
from .modeling_ser_slm import SerSlmForConditionalGeneration, SerSlmModel, SerSlmPreTrainedModel
from .presets import build_paper_ser_slm, build_ser_slm, build_tiny_ser_slm, lora_config_for_llm
from .processing_ser_slm import SerSlmProcessor

_done = False


def register() -> None:
    """Auto-class registration for this process, and ``auto_map`` entries so that saved
    checkpoints also load with ``trust_remote_code=True`` where trustser is not installed."""
    global _done
    if _done:
        return
    _done = True
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    AutoConfig.register(SerSlmConfig.model_type, SerSlmConfig, exist_ok=True)
    AutoModel.register(SerSlmConfig, SerSlmForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(SerSlmConfig, SerSlmForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(SerSlmConfig, SerSlmProcessor, exist_ok=True)
    SerSlmConfig.register_for_auto_class()
    SerSlmForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
    SerSlmProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "SerSlmConfig",
    "SerSlmModel",
    "SerSlmPreTrainedModel",
    "SerSlmForConditionalGeneration",
    "SerSlmProcessor",
    "build_tiny_ser_slm",
    "build_paper_ser_slm",
    "build_ser_slm",
    "lora_config_for_llm",
    "register",
]
