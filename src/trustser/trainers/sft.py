"""Supervised caption training of the SER-SLM with TRL's SFTTrainer: reference-corpus pre-training
and domain post-training (paper Sys. 1-8).

The collator turns corpus rows (schema in docs/ARCHITECTURE.md) into model inputs: it decodes the
audio, builds the caption from the reliable (``sed_source="truth"``) or annotated (``"auto"``)
descriptors, or the no-descriptor caption (``with_sed=False``), and masks the loss to the caption.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ..audio import TARGET_SR, decode_audio, undecoded_audio
from ..descriptors import SED_SOURCES
from ..models.ser_slm.modeling_ser_slm import weighted_auxiliary_loss
from ..models.ser_slm.processing_ser_slm import F0_TRACK_COLUMN
from ..utils import has_accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "trustser_checkpoint.json"
# per process: what the Trainer's checkpoint lacks for an exact resume (trainer._save_training_state)
TRAINING_STATE = "trustser_training_state_{rank}.json"
# a collated batch carries its augmentation generator's state after collating it (JSON), so the
# checkpoint holds the state of the batches trained on, not of the one the dataloader prefetched
AUGMENTATION_STATE = "augmentation_state"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "input_features",
    "feature_attention_mask",
    "energy",
    "f0",
    "labels",
    "sed_labels",
    "ctc_labels",
)


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` whose writing finished (it holds
    ``trustser_checkpoint.json``, written last); None when there is none. A folder without the
    record (a kill during the save) is skipped. Checkpoints of plain ``transformers`` trainers,
    which never carry the record, count as complete when they hold ``trainer_state.json``, but only
    when no folder under ``output_dir`` has the record."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    found = sorted(
        (
            (int(m.group(1)), os.path.join(output_dir, d))
            for d in os.listdir(output_dir)
            if (m := _CHECKPOINT_RE.match(d)) and os.path.isdir(os.path.join(output_dir, d))
        ),
        reverse=True,
    )
    marked = [p for _, p in found if os.path.isfile(os.path.join(p, CHECKPOINT_COMPLETE))]
    if marked:
        return marked[0]
    plain = [p for _, p in found if os.path.isfile(os.path.join(p, "trainer_state.json"))]
    return plain[0] if plain else None


def first_caption_position(labels: torch.Tensor) -> int:
    """The earliest position of a caption label (``labels`` != -100) over the batch's rows; 0 when
    a row has none."""
    has = labels != -100
    return int(has.long().argmax(1).min()) if bool(has.any(1).all()) else 0


def caption_token_nll(
    model,
    inputs: Mapping[str, torch.Tensor],
    audio_embeds: torch.Tensor | None = None,
    *,
    audio_inputs: Mapping[str, torch.Tensor] | None = None,
    audio_repeats: int = 1,
    return_logits: bool = False,
    **model_kwargs,
):
    """Per-token NLL (N, T') of the caption tokens, the one place where the caption loss is taken
    (SFT and rectification). The LM head runs only from the first caption position on (the audio
    prefix needs none; ``inputs["first_label"]`` or the first label of ``inputs["labels"]``). Audio
    either as precomputed ``audio_embeds`` (N rows) or as the B utterances' ``audio_inputs`` (and any
    other model inputs, ``model_kwargs``) encoded inside the model's forward and repeated
    ``audio_repeats`` = N / B times (wrappers such as FSDP only gather the weights for a forward of
    the wrapped model). Returns (nll, valid mask, emotion mask or None, outputs), plus the kept
    logits and their targets with ``return_logits``."""
    ids = inputs["input_ids"]
    labels = inputs["labels"]
    length = ids.shape[1]
    first = int(inputs["first_label"]) if inputs.get("first_label") is not None else first_caption_position(labels)
    first = max(first, 1)
    keep = length - first + 1  # logits at positions first-1 .. L-1
    audio = (
        {"audio_embeds": audio_embeds}
        if audio_embeds is not None
        else {**(audio_inputs or {}), "audio_repeats": audio_repeats}
    )
    out = model(
        input_ids=ids,
        attention_mask=inputs["attention_mask"],
        use_cache=False,
        logits_to_keep=keep,
        **audio,
        **model_kwargs,
    )
    logits = out.logits[:, :-1]
    target = labels[:, length - keep + 1 :]
    nll = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none"
    )
    nll = nll.view(target.shape)
    emo = inputs.get("emotion_token_mask")
    emo = emo[:, length - keep + 1 :] if emo is not None else None
    if return_logits:
        return nll, target != -100, emo, out, logits, target
    return nll, target != -100, emo, out


def utterance_key(row: Mapping, wav: np.ndarray) -> int:
    """A stable integer for an utterance: its row id, or its samples where it has none."""
    rid = row.get("id")
    data = str(rid).encode() if rid is not None else np.ascontiguousarray(wav, dtype=np.float32).tobytes()
    return zlib.crc32(data)


class _CollatorEpoch(TrainerCallback):
    """Tells the training collator the epoch before each epoch's data-loader workers start."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        collator = self.trainer.data_collator
        if hasattr(collator, "epoch"):
            collator.epoch = int((state.epoch or 0.0) + 1e-6)
        return control


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
    augmentation: Any = None  # callable(wav, key=(epoch, utterance)) -> wav, e.g. ChannelAugmentation (training only)
    aux_labels: bool = False  # also return the auxiliary-loss targets (sed_labels, ctc_labels) of the rows
    # F0 streams by row id: Praat is the costliest part of collating (~60 ms per batch of 8), and an
    # utterance's F0 does not change between epochs (taken before augmentation: a channel barely moves it);
    # rows that carry the annotator's track (``f0_track``) need no Praat at all
    max_cached_f0: int = 200_000
    # the augmentation draws of an utterance are keyed by (epoch, utterance), not by the order of the
    # calls, so data-loader workers give the batches 0 workers give; the trainer sets the epoch
    epoch: int = 0
    _f0_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.sed_source not in SED_SOURCES:
            raise ValueError(f"sed_source must be one of {sorted(SED_SOURCES)}, got {self.sed_source!r}")

    def _f0_tracks(self, features: Sequence[Mapping], audio: Sequence[np.ndarray]):
        if not getattr(self.processor, "f0_stream", False):
            return None
        tracks = []
        for f, wav in zip(features, audio):
            key = (f.get("id"), wav.size)
            track = self._f0_cache.get(key) if key[0] is not None else None
            if track is None:
                track = self.processor.f0_track(wav, f.get(F0_TRACK_COLUMN))
                if key[0] is not None and len(self._f0_cache) < self.max_cached_f0:
                    self._f0_cache[key] = track
            tracks.append(track)
        return tracks

    def captions(self, rows: Sequence[Mapping]) -> list[str]:
        if self.caption_column is not None:
            return [r[self.caption_column] for r in rows]
        return self.processor.build_captions(rows, sed_suffix=SED_SOURCES[self.sed_source], with_sed=self.with_sed)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        audio = [decode_audio(f[self.audio_column], f.get("id", "?")) for f in features]
        f0_tracks = self._f0_tracks(features, audio)
        if self.augmentation is not None:
            audio = [self.augmentation(a, key=(self.epoch, utterance_key(f, a))) for f, a in zip(features, audio)]
        batch = dict(
            self.processor(
                audio=audio,
                captions=self.captions(features),
                sampling_rate=TARGET_SR,
                with_sed=self.with_sed,
                f0_tracks=f0_tracks,
            )
        )
        if self.aux_labels and self.caption_column is None:
            batch.update(
                self.processor.auxiliary_labels(features, SED_SOURCES[self.sed_source], with_sed=self.with_sed)
            )
        if hasattr(self.augmentation, "get_state"):
            batch[AUGMENTATION_STATE] = json.dumps(self.augmentation.get_state())
        return batch


def trains_auxiliary_heads(args, cfg) -> bool:
    """Whether a trainer with ``args`` trains the auxiliary descriptor/CTC heads of a model with
    config ``cfg``: its ``aux_losses`` is on and the config weighs at least one of them."""
    return bool(getattr(args, "aux_losses", True)) and bool(
        getattr(cfg, "aux_sed_loss_weight", 0) or getattr(cfg, "aux_ctc_loss_weight", 0)
    )


@dataclass
class SerSlmSFTConfig(SFTConfig):
    """SFTConfig with defaults that suit an audio SLM and CPU runs."""

    sed_source: str = field(
        default="truth",
        metadata={
            "help": "descriptors in the caption: 'truth' (plain columns), 'auto' (<field>_auto) or 'pseudo' (<field>_pseudo)."
        },
    )
    with_sed: bool = field(
        default=True, metadata={"help": "caption with descriptors (False: the plain caption of Sys. 1/2)."}
    )
    kl_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "ramp the KL weight linearly from 0 to the model's vib_beta over these steps, so the "
            "bottleneck does not collapse to the prior before the LM has learned to use the audio."
        },
    )
    channel_augmentation: float = field(
        default=0.0,
        metadata={
            "help": "probability that a training utterance passes through a random recording channel "
            "(band-pass + noise floor, level kept; trustser.ChannelAugmentation); 0 = off."
        },
    )
    aux_losses: bool = field(
        default=True,
        metadata={
            "help": "train the model's auxiliary descriptor/CTC heads where its config weighs them "
            "(aux_sed_loss_weight, aux_ctc_loss_weight); False: captions only (e.g. domain post-training)."
        },
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on only where CUDA supports it."}
    )
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
        if not 0.0 <= self.channel_augmentation <= 1.0:
            raise ValueError(f"channel_augmentation is a probability in [0, 1], got {self.channel_augmentation}")
        if not self.use_cpu and not has_accelerator():
            self.use_cpu = True  # several CPU processes (cpu.yaml) then share a gloo process group
        super().__post_init__()


class SerSlmSFTTrainer(SFTTrainer):
    """SFTTrainer for the SER-SLM: builds the audio collator from the config, computes loss =
    LM loss on caption tokens + beta * VIB KL (+ the model's weighted auxiliary losses, see
    SerSlmConfig), and logs ``lm_loss``, ``kl_loss``, ``aux_sed_loss``, ``aux_ctc_loss`` separately."""

    def __init__(self, model, args: SerSlmSFTConfig | None = None, data_collator=None, processing_class=None, **kwargs):
        if args is None:
            args = SerSlmSFTConfig(output_dir="ser_slm_sft")
        if processing_class is None:
            raise ValueError("SerSlmSFTTrainer needs processing_class=SerSlmProcessor")
        if data_collator is None:
            augmentation = None
            if getattr(args, "channel_augmentation", 0.0) > 0:
                from ..data.augmentation import ChannelAugmentation

                augmentation = ChannelAugmentation(probability=args.channel_augmentation, seed=args.seed)
            data_collator = SerSlmDataCollator(
                processing_class,
                sed_source=getattr(args, "sed_source", "truth"),
                with_sed=getattr(args, "with_sed", True),
                augmentation=augmentation,
                aux_labels=trains_auxiliary_heads(args, getattr(model, "config", None)),
            )
        if (
            getattr(data_collator, "augmentation", None) is not None
            and args.dataloader_num_workers > 0
            and args.dataloader_persistent_workers
        ):
            raise ValueError(
                "channel augmentation with dataloader_persistent_workers=True: persistent workers would not "
                "see the epoch that keys the augmentation draws; use non-persistent workers"
            )
        # the collator decodes each row's audio itself (decode_audio): datasets' decoder would give the
        # same samples 8x slower, on the training process
        audio_column = getattr(data_collator, "audio_column", "audio")
        for split in ("train_dataset", "eval_dataset"):
            ds = kwargs.get(split)
            if isinstance(ds, dict):
                kwargs[split] = {k: undecoded_audio(v, audio_column) for k, v in ds.items()}
            elif ds is not None:
                kwargs[split] = undecoded_audio(ds, audio_column)
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        self.add_callback(_CollatorEpoch(self))
        self._augmentation_state: str | None = None
        self._resume_checkpoint: str | None = None
        self.add_callback(_RestoreTrainingState(self))

    def training_step(self, model, inputs, *args, **kwargs):
        state = inputs.pop(AUGMENTATION_STATE, None) if isinstance(inputs, dict) else None
        if state is not None:
            self._augmentation_state = state
        return super().training_step(model, inputs, *args, **kwargs)

    def _save_training_state(self, output_dir: str) -> None:
        """What the Trainer's checkpoint lacks for an exact resume, per process: the channel
        augmentation's generator (as of the last batch trained on), the metrics accumulated since
        the last log (TRL's ``_metrics``: lm/kl/aux losses, the rectification figures) and the
        Trainer's loss accumulator, so the first log after a resume covers the same steps."""
        from ..utils import atomic_write_json

        state = {
            "global_step": self.state.global_step,
            "augmentation": json.loads(self._augmentation_state) if self._augmentation_state else None,
            "metrics": {k: list(v) for k, v in self._metrics["train"].items()},
            "total_train_tokens": int(getattr(self, "_total_train_tokens", 0)),
            "tr_loss": float(self._tr_loss.item()) if torch.is_tensor(getattr(self, "_tr_loss", None)) else 0.0,
            "total_loss_scalar": float(getattr(self, "_total_loss_scalar", 0.0)),
            "globalstep_last_logged": int(getattr(self, "_globalstep_last_logged", self.state.global_step)),
            "initial_global_step": int(getattr(self, "_initial_global_step", 0)),
        }
        atomic_write_json(os.path.join(output_dir, TRAINING_STATE.format(rank=self.accelerator.process_index)), state)

    def _restore_training_state(self) -> None:
        """Undoes ``_save_training_state`` of the checkpoint being resumed from (at train begin,
        before the first batch is collated). Checkpoints written before it existed resume as before."""
        checkpoint, self._resume_checkpoint = self._resume_checkpoint, None
        path = (
            os.path.join(checkpoint, TRAINING_STATE.format(rank=self.accelerator.process_index)) if checkpoint else None
        )
        if not path or not os.path.isfile(path):
            if checkpoint:
                logger.warning(
                    "%s has no %s: augmentation draws and the first log after the resume differ from an "
                    "uninterrupted run",
                    checkpoint,
                    os.path.basename(str(path)),
                )
            return
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        augmentation = getattr(self.data_collator, "augmentation", None)
        if state.get("augmentation") is not None and hasattr(augmentation, "set_state"):
            augmentation.set_state(state["augmentation"])
            self._augmentation_state = json.dumps(state["augmentation"])
        self._metrics["train"].clear()
        self._metrics["train"].update({k: list(v) for k, v in state["metrics"].items()})
        self._total_train_tokens = state["total_train_tokens"]
        self._tr_loss.fill_(state["tr_loss"])
        self._total_loss_scalar = state["total_loss_scalar"]
        self._globalstep_last_logged = state["globalstep_last_logged"]
        self._initial_global_step = state["initial_global_step"]

    def _without_augmentation(self, build, *args, **kwargs):
        """Runs a dataloader builder with the collator's augmentation switched off (evaluation data
        is scored as recorded)."""
        collator = self.data_collator
        if getattr(collator, "augmentation", None) is None:
            return build(*args, **kwargs)
        self.data_collator = dataclasses.replace(collator, augmentation=None)
        try:
            return build(*args, **kwargs)
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset=None):
        return self._without_augmentation(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._without_augmentation(super().get_test_dataloader, test_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # no labels to the model (it would compute a second, full-sequence loss): the caption NLL is
        # taken once, with the LM head only from the first caption position on
        extra = {
            k: v for k, v in inputs.items() if k in MODEL_INPUTS and k not in ("input_ids", "attention_mask", "labels")
        }
        nll, valid, _, outputs, logits, target = caption_token_nll(model, inputs, return_logits=True, **extra)
        n_tokens = valid.sum()
        denom = num_items_in_batch if num_items_in_batch is not None else n_tokens
        lm_loss = nll.sum() / torch.as_tensor(denom, device=nll.device).clamp(min=1)
        kl = outputs.kl_loss
        beta = self._unwrapped_config().vib_beta
        warm = getattr(self.args, "kl_warmup_steps", 0)
        if warm and mode == "train":
            beta = beta * min(1.0, self.state.global_step / warm)
        loss = lm_loss
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        if kl is not None:
            loss = lm_loss + beta * kl / steps
        loss = loss + weighted_auxiliary_loss(self._unwrapped_config(), outputs) / steps
        aux_parts = {k: getattr(outputs, k, None) for k in ("aux_sed_loss", "aux_ctc_loss")}
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            m = self._metrics[mode]
            token_lm = (nll.sum() / n_tokens.clamp(min=1)).detach()
            m["lm_loss"].append(self.accelerator.gather_for_metrics(token_lm).mean().item())
            if kl is not None:
                m["kl_loss"].append(self.accelerator.gather_for_metrics(kl.detach()).mean().item())
            for key, value in aux_parts.items():
                if value is not None:
                    m[key].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
            acc = ((logits.argmax(-1) == target) & valid).sum() / n_tokens.clamp(min=1)
            m["mean_token_accuracy"].append(self.accelerator.gather_for_metrics(acc).mean().item())
            if mode == "train":
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(n_tokens).sum().item())
                m["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    # ---------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, then the subclass' side state (``_save_extra_state``), then, once
        every process has written its part, ``trustser_checkpoint.json``: a checkpoint without it was
        interrupted while being written and is never resumed from (``last_complete_checkpoint``)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from ..utils import atomic_write_json

        super()._save_checkpoint(model, trial)
        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        self._save_extra_state(output_dir)
        self._save_training_state(output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            atomic_write_json(
                os.path.join(output_dir, CHECKPOINT_COMPLETE),
                {"global_step": self.state.global_step, "num_processes": self.accelerator.num_processes},
            )

    def _save_extra_state(self, output_dir: str) -> None:
        """Side state a subclass adds to each checkpoint (before the completion record)."""

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """``resume_from_checkpoint=True`` resumes from the newest *complete* checkpoint in
        ``output_dir`` (the Trainer's own choice would be the newest folder, possibly half written)."""
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(f"{self.args.output_dir}: no complete checkpoint to resume from")
            resume_from_checkpoint = found
        elif resume_from_checkpoint:
            if not os.path.isfile(os.path.join(resume_from_checkpoint, CHECKPOINT_COMPLETE)):
                logger.warning(
                    "%s has no %s: it may have been interrupted while being saved",
                    resume_from_checkpoint,
                    CHECKPOINT_COMPLETE,
                )
        self._resume_checkpoint = str(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _unwrapped_config(self):
        model = self.accelerator.unwrap_model(self.model)
        cfg = model.config
        if not hasattr(cfg, "vib_beta") and hasattr(model, "get_base_model"):
            cfg = model.get_base_model().config
        return cfg


class _RestoreTrainingState(TrainerCallback):
    """Restores the resumed checkpoint's ``_save_training_state`` at train begin: after the Trainer
    reset its loss accumulators, before the first batch is collated."""

    def __init__(self, trainer: "SerSlmSFTTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._restore_training_state()
        return control


__all__ = [
    "SerSlmDataCollator",
    "SerSlmSFTConfig",
    "SerSlmSFTTrainer",
    "last_complete_checkpoint",
    "CHECKPOINT_COMPLETE",
    "caption_token_nll",
    "first_caption_position",
]
