"""Supervised caption training of the SER-SLM with TRL's SFTTrainer: reference-corpus pre-training
and domain post-training (paper Sys. 1-8).

The collator turns corpus rows (schema in docs/ARCHITECTURE.md) into model inputs: it decodes the
audio, builds the caption from the reliable (``sed_source="truth"``) or annotated (``"auto"``)
descriptors, or the no-descriptor caption (``with_sed=False``), and masks the loss to the caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from ..utils import TARGET_SR, AudioError, load_audio, resample, to_mono_float

SED_SOURCES = {"truth": "", "auto": "_auto"}
MODEL_INPUTS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "energy", "f0", "labels")


def decode_audio(value: Any, row_id: str = "?") -> np.ndarray:
    """A dataset ``audio`` cell (torchcodec AudioDecoder, ``{"array", "sampling_rate"}`` dict, or a
    path) -> float32 mono at 16 kHz. Raises AudioError naming the row."""
    try:
        if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
            return load_audio(value)
        if hasattr(value, "get_all_samples"):  # datasets 5 / torchcodec decoder
            s = value.get_all_samples()
            wav, sr = s.data.numpy(), int(s.sample_rate)
            wav = wav.mean(axis=0) if wav.ndim == 2 else wav
        elif isinstance(value, Mapping):
            if value.get("array") is None and value.get("path"):
                return load_audio(value["path"])
            wav, sr = value["array"], int(value["sampling_rate"])
        else:
            raise AudioError(f"unsupported audio value of type {type(value).__name__}")
        wav = to_mono_float(np.asarray(wav))
        if wav.size == 0:
            raise AudioError("no samples")
        return resample(wav, sr, TARGET_SR)
    except AudioError as exc:
        raise AudioError(f"row {row_id!r}: {exc}") from exc


@dataclass
class SerSlmDataCollator:
    """Corpus rows -> padded SER-SLM inputs with labels on the caption tokens only.

    ``caption_column``: use a ready caption from this column (e.g. rectified captions) instead of
    building one. The output also carries ``sed_token_index`` and ``emotion_token_mask`` (see
    SerSlmProcessor); the trainer passes only model inputs to the model."""

    processor: Any
    sed_source: str = "truth"
    with_sed: bool = True
    audio_column: str = "audio"
    caption_column: str | None = None

    def __post_init__(self):
        if self.sed_source not in SED_SOURCES:
            raise ValueError(f"sed_source must be one of {sorted(SED_SOURCES)}, got {self.sed_source!r}")

    def captions(self, rows: Sequence[Mapping]) -> list[str]:
        if self.caption_column is not None:
            return [r[self.caption_column] for r in rows]
        return self.processor.build_captions(rows, sed_suffix=SED_SOURCES[self.sed_source], with_sed=self.with_sed)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        audio = [decode_audio(f[self.audio_column], f.get("id", "?")) for f in features]
        batch = self.processor(audio=audio, captions=self.captions(features), sampling_rate=TARGET_SR, with_sed=self.with_sed)
        return dict(batch)


@dataclass
class SerSlmSFTConfig(SFTConfig):
    """SFTConfig with defaults that suit an audio SLM and CPU runs."""

    sed_source: str = field(default="truth", metadata={"help": "descriptors in the caption: 'truth' (plain columns) or 'auto' (<field>_auto)."})
    with_sed: bool = field(default=True, metadata={"help": "caption with descriptors (False: the plain caption of Sys. 1/2)."})
    kl_warmup_steps: int = field(
        default=0,
        metadata={"help": "ramp the KL weight linearly from 0 to the model's vib_beta over these steps, so the "
                  "bottleneck does not collapse to the prior before the LM has learned to use the audio."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on only where CUDA supports it."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "off by default (tiny models, CPU)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collator needs the raw columns."})
    dataset_kwargs: dict[str, Any] | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "the collator tokenizes; TRL must not prepare the dataset."},
    )
    report_to: Any = field(default="none", metadata={"help": "logging integrations."})
    save_safetensors: bool = field(default=True, metadata={"help": "weights in safetensors."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.sed_source not in SED_SOURCES:
            raise ValueError(f"sed_source must be one of {sorted(SED_SOURCES)}, got {self.sed_source!r}")
        super().__post_init__()


class SerSlmSFTTrainer(SFTTrainer):
    """SFTTrainer for the SER-SLM: builds the audio collator from the config, computes loss =
    LM loss on caption tokens + beta * VIB KL, and logs ``lm_loss`` and ``kl_loss`` separately."""

    def __init__(self, model, args: SerSlmSFTConfig | None = None, data_collator=None, processing_class=None, **kwargs):
        if args is None:
            args = SerSlmSFTConfig(output_dir="ser_slm_sft")
        if processing_class is None:
            raise ValueError("SerSlmSFTTrainer needs processing_class=SerSlmProcessor")
        if data_collator is None:
            data_collator = SerSlmDataCollator(
                processing_class, sed_source=getattr(args, "sed_source", "truth"), with_sed=getattr(args, "with_sed", True)
            )
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
        model_inputs["use_cache"] = False
        outputs = model(**model_inputs)
        labels = model_inputs["labels"]
        shift_labels = labels[:, 1:]
        valid = shift_labels != -100
        n_tokens = valid.sum()
        logits = outputs.logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        denom = num_items_in_batch if num_items_in_batch is not None else n_tokens
        lm_loss = nll.sum() / torch.as_tensor(denom, device=nll.device).clamp(min=1)
        kl = outputs.kl_loss
        beta = self._unwrapped_config().vib_beta
        warm = getattr(self.args, "kl_warmup_steps", 0)
        if warm and mode == "train":
            beta = beta * min(1.0, self.state.global_step / warm)
        loss = lm_loss
        if kl is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = lm_loss + beta * kl / steps
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            m = self._metrics[mode]
            token_lm = (nll.sum() / n_tokens.clamp(min=1)).detach()
            m["lm_loss"].append(self.accelerator.gather_for_metrics(token_lm).mean().item())
            if kl is not None:
                m["kl_loss"].append(self.accelerator.gather_for_metrics(kl.detach()).mean().item())
            acc = ((logits.argmax(-1) == shift_labels) & valid).sum() / n_tokens.clamp(min=1)
            m["mean_token_accuracy"].append(self.accelerator.gather_for_metrics(acc).mean().item())
            if mode == "train":
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(n_tokens).sum().item())
                m["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def _unwrapped_config(self):
        model = self.accelerator.unwrap_model(self.model)
        cfg = model.config
        if not hasattr(cfg, "vib_beta") and hasattr(model, "get_base_model"):
            cfg = model.get_base_model().config
        return cfg


__all__ = ["SerSlmDataCollator", "SerSlmSFTConfig", "SerSlmSFTTrainer", "decode_audio"]
