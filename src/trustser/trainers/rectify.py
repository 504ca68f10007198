"""SedRectifyTrainer: on-the-fly RL rectification of annotated descriptors (paper section 3.2).

One optimizer step t of the SER-SLM, alternating with the SED Controller:
  1. controller frozen: K rectification policies per utterance -> K rectified captions;
  2. SLM update on the mean over the K of the caption LM loss (+ beta x VIB KL, once per utterance);
  3. reward of each policy = -(emotion-token cross-entropy of the SLM), every other label masked,
     group-normalised over the K (GRPO); with ``reward_timing="after_update"`` (the paper) it is
     computed right after the SLM's optimizer step, with ``"reuse_forward"`` from the loss forward;
  4. controller update with the clipped new/old ratio objective (+ optional entropy bonus).
With ``controller_fit="table"`` (frozen scorer, single-field credit) 3-4 happen once, before the
first step, over the whole training set (``fit_controller_to_table``), and the controller then
stays fixed while the SLM trains on its K samples.

Speed: the speech encoder runs once per utterance; with ``shared_prefix`` (default) each
utterance's audio + prompt prefix goes through the LLM once, its K captions packed behind it in one
row (block attention mask, positions restarting after the prefix: P + K*S tokens instead of
K*(P + S)), otherwise the K*B captions go as one batch of full rows (encoder embeddings
``repeat_interleave``-d); logits are computed only from the first caption position on, and with
``reuse_forward`` the reward comes from the loss logits.

Distributed: the controller is a plain fp32 module with its own Adam (never ``accelerator.prepare``-d,
which DeepSpeed/FSDP refuse for a second model); its gradients are averaged over processes with
``accelerator.reduce``. Checkpoints carry the controller (safetensors), its optimizer (tensors in
safetensors + JSON) and each process' policy-sampling generator state.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..audio import TARGET_SR, decode_audio
from ..descriptors import SED_FIELDS, SED_SOURCES, SED_VOCAB, normalize_sed_value
from ..models.sed_controller import (
    MODIFY,
    RETAIN,
    SedControllerConfig,
    SedControllerModel,
    ids_to_sed,
    modify_labels,
    sample_policies,
    sed_to_ids,
)
from ..models.sed_controller.modeling_sed_controller import rectify_field_indices
from ..models.ser_slm.modeling_ser_slm import weighted_auxiliary_loss
from ..utils import atomic_directory
from .controller_audit import audit_controller
from .optimizer_state import load_optimizer_state, save_optimizer_state, save_tensors
from .rectify_config import SedRectifyConfig
from .rectify_objective import (
    action_log_probs,
    bernoulli_entropy,
    bernoulli_kl,
    best_response_loss,
    clipped_policy_loss,
    early_stopped_fit,
    group_normalize,
    hold_out_gains,
    per_field_advantages,
    single_field_gains,
    single_field_variants,
)
from .sft import SerSlmDataCollator, SerSlmSFTTrainer, caption_token_nll, trains_auxiliary_heads
from .speaker_context import SPEAKER_CONTEXT_COLUMN, SPEAKER_CONTEXT_SIZE, with_speaker_context

CONTROLLER_DIR = "controller"
CONTROLLER_OPTIMIZER = "controller_optimizer"
REWARD_EMA = "reward_ema.safetensors"


# ------------------------------------------------------------------------------------------------
# Collator
# ------------------------------------------------------------------------------------------------
@dataclass
class SedRectifyCollator(SerSlmDataCollator):
    """SerSlmDataCollator output (annotated captions: prompt, audio features, label count) plus
    what the controller and the caption rebuild need: ``rectify_waveforms``/``_lengths`` (raw
    16 kHz audio for the controller's log-mel; with ``controller_input="sed_branch"`` the controller
    reads the SLM's SED-branch features of the batch's own audio inputs instead), ``rectify_sed_ids``
    (B x 5 annotated value ids), ``rectify_truth_ids`` (B x 5 ground truth, -1 where the corpus has none), ``rectify_text`` and
    ``rectify_emotion`` (lists of strings), and ``rectify_context`` (B x 3 float32) when the rows carry a
    ``speaker_context`` (``controller_speaker_context``: the trainer adds it to its train dataset)."""

    sed_source: str = "auto"

    def __call__(self, features: Sequence[Mapping]) -> dict[str, Any]:
        audio = [decode_audio(f[self.audio_column], f.get("id", "?")) for f in features]
        batch = dict(
            self.processor(
                audio=audio,
                captions=self.captions(features),
                sampling_rate=TARGET_SR,
                with_sed=True,
                f0_tracks=self._f0_tracks(features, audio),
            )
        )
        suffix = SED_SOURCES[self.sed_source]
        batch["rectify_sed_ids"] = sed_to_ids([{f: row.get(f + suffix) for f in SED_FIELDS} for row in features])
        batch["rectify_truth_ids"] = self.truth_ids(features)
        batch["rectify_waveforms"], batch["rectify_waveform_lengths"] = self.controller_inputs(audio)
        batch["rectify_text"] = [row["text"] for row in features]
        batch["rectify_emotion"] = [row["emotion"] for row in features]
        if all(row.get(SPEAKER_CONTEXT_COLUMN) is not None for row in features):
            batch["rectify_context"] = torch.tensor(
                [row[SPEAKER_CONTEXT_COLUMN] for row in features], dtype=torch.float32
            ).reshape(len(features), -1)
        return batch

    @staticmethod
    def truth_ids(rows: Sequence[Mapping]) -> torch.Tensor:
        """(B, 5) ground-truth value ids, -1 where a row has no (or an unknown) value."""
        truth = torch.full((len(rows), len(SED_FIELDS)), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            for j, f in enumerate(SED_FIELDS):
                v = normalize_sed_value(f, row.get(f))
                if v is not None:
                    truth[i, j] = SED_VOCAB[f].index(v)
        return truth

    @staticmethod
    def controller_inputs(audio: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, S) float32 waveforms and their lengths, for the controller's log-mel."""
        lengths = torch.tensor([a.size for a in audio], dtype=torch.long)
        wav = torch.zeros(len(audio), int(lengths.max()), dtype=torch.float32)
        for i, a in enumerate(audio):
            wav[i, : a.size] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return wav, lengths


# ------------------------------------------------------------------------------------------------
# Rectified caption batch
# ------------------------------------------------------------------------------------------------
def rectified_caption_inputs(
    processor, input_ids, labels, captions: Sequence[str], repeats: int
) -> dict[str, torch.Tensor]:
    """Token inputs for ``captions`` (row ``b*repeats + j`` is utterance b's j-th policy), reusing
    each utterance's prompt (audio placeholders + instruction) from the collated ``input_ids``/
    ``labels`` instead of re-running the processor's feature extraction K times; the tokens come
    from ``SerSlmProcessor.caption_inputs``, as the processor's own (prompt + caption + EOS, labels
    on caption and EOS, right padding, ``emotion_token_mask`` on the emotion word's tokens)."""
    has_label = labels != -100
    if not bool(has_label.any(1).all()):
        raise ValueError("a collated row has no caption labels; cannot rebuild its rectified captions")
    starts = has_label.long().argmax(1).tolist()
    ids_cpu = input_ids.detach().cpu()
    prompts = [ids_cpu[i // repeats, : starts[i // repeats]].tolist() for i in range(len(captions))]
    tokens = processor.caption_inputs(prompts, list(captions), with_sed=True)
    dev = input_ids.device
    return {
        **{k: tokens[k].to(dev) for k in ("input_ids", "attention_mask", "labels", "emotion_token_mask")},
        "first_label": torch.tensor(min(starts)),
    }


AUDIO_INPUTS = ("input_features", "feature_attention_mask", "energy", "f0")


def audio_inputs_of(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The SER-SLM's audio inputs present in a collated batch."""
    return {key: batch[key] for key in AUDIO_INPUTS if batch.get(key) is not None}


def controller_input_features(
    controller: SedControllerModel, batch: Mapping[str, Any], slm=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the SED Controller reads for a collated batch, the one place the rectifying trainer and
    ``audit_controller`` get it from: (B, T, D) float32 features and their (B, T) long frame mask,
    on the controller's device.

    A log-mel controller (``config.input_size`` None, the paper; ``controller_input="log_mel"``):
    its own ``log_mel`` of ``rectify_waveforms`` / ``rectify_waveform_lengths``. A controller with
    ``input_size`` (``controller_input="sed_branch"``): the SER-SLM ``slm``'s SED-branch features of
    the batch's audio inputs (``input_features``, ``feature_attention_mask``, ``energy``, ``f0``, as
    the SLM's own forward gets them): ``get_sed_features``, the SED VIB branch's mean in eval mode,
    under no_grad and detached, with the audio tokens' mask. A controller that reads no audio
    (``config.reads_audio`` False, ``controller_input="none"``): one zero frame per row, nothing computed."""
    if not controller.config.reads_audio:
        b = len(batch["rectify_waveform_lengths"])
        device = next(controller.parameters()).device
        width = controller.config.input_size or controller.config.n_mels
        return torch.zeros(b, 1, width, device=device), torch.ones(b, 1, dtype=torch.long, device=device)
    if controller.reads_log_mel:
        return controller.log_mel(batch["rectify_waveforms"], batch["rectify_waveform_lengths"])
    want = controller.config.input_size
    if slm is None:
        raise ValueError(
            f"this SED Controller reads the SER-SLM's SED-branch features (input_size={want}): pass the SLM (slm=)"
        )
    base = slm.get_base_model() if hasattr(slm, "get_base_model") else slm  # PEFT: the model under the adapter
    if not hasattr(base, "get_sed_features"):
        raise ValueError(f"{type(base).__name__} has no get_sed_features (not a SerSlmForConditionalGeneration)")
    dim = int(base.config.sed_vib_dim)
    if dim != want:
        raise ValueError(
            f"the SED Controller reads {want}-wide features (input_size) but the SER-SLM's SED branch is {dim} wide "
            "(sed_vib_dim): a controller trained with another SLM?"
        )
    audio = audio_inputs_of(batch)
    if "input_features" not in audio:
        raise ValueError("controller_input='sed_branch' needs the SLM's audio inputs (input_features) in the batch")
    slm_device = next(base.parameters()).device
    feats, mask = base.get_sed_features(**{k: v.to(slm_device) for k, v in audio.items()})
    device = next(controller.parameters()).device
    return feats.detach().to(device=device, dtype=torch.float32), mask.to(device=device, dtype=torch.long)


def controller_context(controller: SedControllerModel, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The per-utterance context the SED Controller reads beside its features, the one place the
    rectifying trainer and ``audit_controller`` get it from: the batch's ``rectify_context`` (B, 3)
    when ``config.context_size`` > 0 (``controller_speaker_context``; the controller moves it to its
    device and checks its shape), else None."""
    if not controller.config.context_size:
        return None
    context = batch.get("rectify_context")
    if context is None:
        raise ValueError(
            f"this SED Controller reads a {controller.config.context_size}-wide speaker context: the batch has no "
            f"rectify_context (rows without a {SPEAKER_CONTEXT_COLUMN!r} column; see with_speaker_context)"
        )
    return context


def emotion_cross_entropy(nll: torch.Tensor, emotion_mask: torch.Tensor) -> torch.Tensor:
    """(N,) mean NLL over each row's emotion tokens (all other label tokens masked); NaN if none."""
    m = emotion_mask.to(nll.dtype)
    count = m.sum(1)
    return torch.where(count > 0, (nll * m).sum(1) / count.clamp(min=1), torch.full_like(count, float("nan")))


# ------------------------------------------------------------------------------------------------
# Shared-prefix packing of the K rectified captions
# ------------------------------------------------------------------------------------------------
PACKABLE_ATTENTION = ("sdpa", "eager")


def pack_rectified_captions(rect: Mapping[str, torch.Tensor], repeats: int) -> dict[str, torch.Tensor]:
    """The K*B rows of ``rectified_caption_inputs`` as B packed rows: utterance b's audio + prompt
    prefix once, then its K captions one after the other. ``segments`` (B, L) says what each
    position is (0 = prefix, j + 1 = caption j, -1 = padding; ``packed_attention_mask`` lets a
    caption attend to the prefix and to itself only) and ``position_ids`` restart after the prefix
    for every caption, so each caption sees exactly what its own unpacked row would. The LLM then
    processes P + K*S tokens per utterance instead of K*(P + S).

    Per caption (N = K*B rows, caption-relative columns): ``caption_row`` (N,) packed row,
    ``caption_predictor`` (N, S) the position whose logits predict each caption token (the prefix's
    last position for the first token, shared by the K captions), ``caption_targets``,
    ``caption_valid``, ``emotion_token_mask``; ``first_predictor``: the earliest predictor position
    (the LM head runs from there on)."""
    ids, mask, labels, emo = (
        rect[k].detach().cpu() for k in ("input_ids", "attention_mask", "labels", "emotion_token_mask")
    )
    n = ids.shape[0]
    if n % repeats:
        raise ValueError(f"{n} rectified rows are not a multiple of {repeats} policies")
    b_count = n // repeats
    starts = (labels != -100).long().argmax(1).tolist()
    ends = mask.sum(1).tolist()
    prefix = [starts[b * repeats] for b in range(b_count)]
    cap_len = [ends[i] - starts[i] for i in range(n)]
    if any(starts[i] != prefix[i // repeats] for i in range(n)) or min(prefix) < 1:
        raise ValueError("the K rectified rows of an utterance must share one non-empty prompt")
    row_len = [prefix[b] + sum(cap_len[b * repeats : (b + 1) * repeats]) for b in range(b_count)]
    length, s_max = max(row_len), max(cap_len)
    pad_id = int(ids[0, ends[0] - 1])  # a caption's EOS: any token but an audio placeholder will do
    out_ids = torch.full((b_count, length), pad_id, dtype=torch.long)
    segments = torch.full((b_count, length), -1, dtype=torch.long)
    positions = torch.zeros((b_count, length), dtype=torch.long)
    predictor = torch.zeros((n, s_max), dtype=torch.long)
    targets = torch.full((n, s_max), -100, dtype=torch.long)
    emo_out = torch.zeros((n, s_max), dtype=torch.bool)
    for b in range(b_count):
        p = prefix[b]
        out_ids[b, :p] = ids[b * repeats, :p]
        segments[b, :p] = 0
        positions[b, :p] = torch.arange(p)
        off = p
        for j in range(repeats):
            i = b * repeats + j
            s = cap_len[i]
            out_ids[b, off : off + s] = ids[i, p : p + s]
            segments[b, off : off + s] = j + 1
            positions[b, off : off + s] = torch.arange(p, p + s)
            predictor[i, 0] = p - 1
            predictor[i, 1:s] = torch.arange(off, off + s - 1)
            targets[i, :s] = labels[i, p : p + s]
            emo_out[i, :s] = emo[i, p : p + s]
            off += s
    first = min(prefix) - 1
    dev = rect["input_ids"].device
    return {
        "input_ids": out_ids.to(dev),
        "segments": segments.to(dev),
        "position_ids": positions.to(dev),
        "caption_row": (torch.arange(n) // repeats).to(dev),
        "caption_predictor": predictor.to(dev),
        "caption_targets": targets.to(dev),
        "caption_valid": (targets != -100).to(dev),
        "emotion_token_mask": emo_out.to(dev),
        "first_predictor": torch.tensor(first),
    }


def packed_attention_mask(
    segments: torch.Tensor, implementation: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, 1, L, L) mask of packed rows (``segments`` from ``pack_rectified_captions``): causal, and
    a caption's tokens see the prefix and their own caption only. Boolean (True = attend) for
    ``sdpa``, additive (0 / dtype min) for ``eager``; a padding position sees itself only, so no
    row is fully masked."""
    length = segments.shape[1]
    ar = torch.arange(length, device=segments.device)
    sq, sk = segments[:, :, None], segments[:, None, :]
    allowed = (ar[None, :] <= ar[:, None]) & (sq >= 0) & (sk >= 0) & ((sk == 0) | (sk == sq))
    allowed = (allowed | torch.eye(length, dtype=torch.bool, device=segments.device))[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    if implementation == "sdpa":
        return allowed
    raise ValueError(f"packed rows need the 'sdpa' or 'eager' attention implementation, not {implementation!r}")


def packed_caption_token_nll(
    model,
    packed: Mapping[str, torch.Tensor],
    *,
    audio_inputs: Mapping[str, torch.Tensor],
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
    from_predictor: int | None = None,
):
    """``caption_token_nll`` of packed rows: one LLM forward over the B packed rows (the encoder
    once per utterance), the LM head from ``first_predictor`` (or ``from_predictor``) on, and the
    NLL of every caption token read off its predictor's logits. Returns (nll (N, S), valid mask,
    emotion mask, outputs) in caption-relative columns, equal to the unpacked path's up to float
    rounding."""
    ids = packed["input_ids"]
    length = ids.shape[1]
    first = int(packed["first_predictor"]) if from_predictor is None else int(from_predictor)
    keep = length - first
    out = model(
        input_ids=ids,
        attention_mask=packed_attention_mask(packed["segments"], attn_implementation, dtype),
        position_ids=packed["position_ids"],
        use_cache=False,
        logits_to_keep=keep,
        **audio_inputs,
    )
    logits = out.logits.float()  # (B, keep, V)
    valid = packed["caption_valid"]
    if from_predictor is not None:
        valid = valid & (packed["caption_predictor"] >= first)
    rows = packed["caption_row"][:, None].expand_as(valid)
    pos = (packed["caption_predictor"] - first).clamp(min=0)
    tok = packed["caption_targets"].clamp(min=0)
    nll = (logits.logsumexp(-1)[rows, pos] - logits[rows, pos, tok]) * valid
    return nll, valid, packed["emotion_token_mask"] & valid, out


class _StepEndFlush(TrainerCallback):
    """Runs the controller's reward + update phase right after each SLM optimizer step, and with
    ``controller_fit="table"`` its one fit before the first step (not on resume: the checkpoint
    carries the fitted controller)."""

    def __init__(self, trainer: "SedRectifyTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.args.controller_fit == "table" and state.global_step == 0:
            self.trainer.fit_controller_to_table()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_reward_model()
        self.trainer.controller_step()
        return control


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class SedRectifyTrainer(SerSlmSFTTrainer):
    """SerSlmSFTTrainer whose captions are rectified on the fly by an RL-trained SED Controller.

    ``controller``: a SedControllerModel (default: loaded from ``args.controller_name_or_path`` or
    built from the ``controller_*`` fields). Logged (``self._metrics``): ``rectify/modify_rate_<field>``,
    ``rectify/label_accuracy`` (+ per field) and ``rectify/annotation_accuracy`` when the rows have
    ground truth, ``reward/mean``, ``reward/std``, ``controller/loss``, ``controller/entropy``,
    ``controller/clip_fraction``."""

    def __init__(
        self,
        model,
        args: SedRectifyConfig | None = None,
        data_collator=None,
        processing_class=None,
        controller: SedControllerModel | None = None,
        **kwargs,
    ):
        if args is None:
            args = SedRectifyConfig(output_dir="sed_rectify")
        if not isinstance(args, SedRectifyConfig):
            raise TypeError(f"SedRectifyTrainer needs a SedRectifyConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("SedRectifyTrainer needs processing_class=SerSlmProcessor")
        if data_collator is None:
            data_collator = SedRectifyCollator(processing_class, sed_source=args.sed_source)
        if args.controller_speaker_context:  # once per dataset: the collator only reads the column
            if kwargs.get("train_dataset") is None:
                raise ValueError("controller_speaker_context needs a train_dataset (its speakers' statistics)")
            kwargs["train_dataset"] = with_speaker_context(kwargs["train_dataset"])
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        # controller_input="sed_branch": the LSTM reads the SLM's SED-branch features, sed_vib_dim wide
        input_size = int(self._unwrapped_config().sed_vib_dim) if args.controller_input == "sed_branch" else None
        # controller_speaker_context: the head also reads the utterance's speaker-relative prosody
        context_size = SPEAKER_CONTEXT_SIZE if args.controller_speaker_context else 0
        reads_audio = args.controller_input != "none"
        if controller is None:
            if args.controller_name_or_path:
                controller = SedControllerModel.from_pretrained(args.controller_name_or_path)
            else:
                torch.manual_seed(args.seed)
                controller = SedControllerModel(
                    SedControllerConfig(
                        hidden_size=args.controller_hidden_size,
                        embedding_size=args.controller_embedding_size,
                        n_mels=args.controller_n_mels,
                        input_size=input_size,
                        frame_stride=args.controller_frame_stride,
                        modify_strategy=args.controller_modify_strategy,
                        head_hidden_size=args.controller_head_hidden_size,
                        initial_retain_bias=args.controller_initial_retain_bias,
                        audio_norm=args.controller_audio_norm,
                        context_size=context_size,
                        reads_audio=reads_audio,
                        rectify_fields=args.rectify_fields,
                    )
                )
        if controller.config.input_size != input_size:
            reads = "its log-mel" if controller.reads_log_mel else f"{controller.config.input_size}-wide features"
            wants = "its log-mel" if input_size is None else f"the SLM's {input_size}-wide SED-branch features"
            raise ValueError(
                f"controller_input={args.controller_input!r} needs a controller that reads {wants}; "
                f"the given controller reads {reads} (SedControllerConfig.input_size={controller.config.input_size})"
            )
        if controller.config.reads_audio != reads_audio:
            raise ValueError(
                f"controller_input={args.controller_input!r} needs a controller with "
                f"SedControllerConfig.reads_audio={reads_audio}; the given controller has "
                f"reads_audio={controller.config.reads_audio}"
            )
        if set(controller.config.rectify_fields or SED_FIELDS) != set(args.rectify_fields or SED_FIELDS):
            raise ValueError(
                f"rectify_fields={args.rectify_fields} needs a controller that may modify those fields; the given "
                f"controller has SedControllerConfig.rectify_fields={controller.config.rectify_fields}"
            )
        if args.advantage == "single_field" and controller.config.modify_strategy != "adjacent":
            raise ValueError(
                "advantage='single_field' scores each field's adjacent values; the given controller has "
                f"SedControllerConfig.modify_strategy={controller.config.modify_strategy!r}"
            )
        if controller.config.context_size != context_size:
            wants = f"a {context_size}-wide speaker context" if context_size else "no context"
            raise ValueError(
                f"controller_speaker_context={args.controller_speaker_context} needs a controller that reads {wants}; "
                f"the given controller has SedControllerConfig.context_size={controller.config.context_size}"
            )
        self.controller = controller.to(device=self.accelerator.device, dtype=torch.float32)
        self.controller.train()
        self.controller_optimizer = torch.optim.Adam(self.controller.parameters(), lr=args.controller_learning_rate)
        # the initial policy, for the KL penalty toward it (no state of its own: rebuilt the same way on resume)
        self.reference_controller = None
        if args.retain_kl_coef > 0:
            self.reference_controller = copy.deepcopy(self.controller).requires_grad_(False).eval()
        # the reward's scorer when it is not the SLM being trained: a copy of the SLM as post-training
        # starts (before any checkpoint is loaded), outside the optimizer; 'ema' follows the SLM's weights
        self.reward_model = None
        if args.reward_scorer != "policy":
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(
                    f"reward_scorer={args.reward_scorer!r} keeps a full copy of the SLM beside it; "
                    "it is not supported with DeepSpeed or FSDP (sharded weights): use 'policy' there"
                )
            self.reward_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            # an instance-level forward patched in by TRL's trainer closes over the *trained* model's
            # forward, which the copy would then call: the copy runs its class' own forward
            for module in self.reward_model.modules():
                module.__dict__.pop("forward", None)
        gen_device = self.accelerator.device if self.accelerator.device.type == "cuda" else "cpu"
        self.policy_generator = torch.Generator(device=gen_device)
        self.policy_generator.manual_seed(int(args.seed) * 1000003 + self.accelerator.process_index)
        self._pending: list[dict[str, Any]] = []
        self._trains_aux = trains_auxiliary_heads(args, self._unwrapped_config())
        self._aux_index: list[torch.Tensor] | None = None
        self.add_callback(_StepEndFlush(self))

    # ---------------------------------------------------------------------------- helpers
    def _warming_up(self) -> bool:
        return self.state.global_step < self.args.controller_warmup_steps

    def _slm_frozen(self) -> bool:
        """In the ``frozen_slm_steps`` after the warm-up: the controller learns, the SLM does not."""
        return 0 <= self.state.global_step - self.args.controller_warmup_steps < self.args.frozen_slm_steps

    def _ema_parameters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (scorer parameter, SLM parameter), for the weights the SLM trains."""
        scorer = dict(self.reward_model.named_parameters())
        return {
            n: (scorer[n], p)
            for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update_reward_model(self) -> None:
        """After each SLM optimizer step, with ``reward_scorer="ema"``: scorer = d x scorer + (1 - d) x SLM."""
        if self.args.reward_scorer != "ema":
            return
        d = self.args.reward_ema_decay
        for ema, p in self._ema_parameters().values():
            ema.mul_(d).add_(p.detach().to(ema.dtype), alpha=1.0 - d)

    def _log_mean(self, key: str, value: torch.Tensor, mode: str = "train") -> None:
        value = value.detach().float().reshape(1).to(self.accelerator.device)
        self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).nanmean().item())

    def _sample(self, inputs: Mapping[str, Any], k: int, force_retain: bool, return_logits: bool = False):
        """Controller frozen: its input features once, logits, K policies and their captions."""
        with torch.no_grad():
            feats, fmask = self.controller_features(inputs)
            logits = self.controller(
                inputs["rectify_sed_ids"],
                input_features=feats,
                feature_attention_mask=fmask,
                context=controller_context(self.controller, inputs),
            ).logits
        sample = sample_policies(
            logits,
            inputs["rectify_sed_ids"],
            k,
            generator=self.policy_generator,
            strategy=self.controller.config.modify_strategy,
            force_retain=force_retain,
        )
        captions = self._captions(inputs, sample.rectified_ids)
        return (sample, captions, feats, fmask, logits) if return_logits else (sample, captions, feats, fmask)

    def controller_features(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the controller reads for a collated batch (``controller_input_features``): its log-mel,
        or with ``controller_input="sed_branch"`` the SLM being trained's SED-branch features (no gradient)."""
        return controller_input_features(self.controller, inputs, slm=self.accelerator.unwrap_model(self.model))

    def _captions(self, inputs: Mapping[str, Any], rectified_ids: torch.Tensor) -> list[str]:
        """Captions of (B, K, 5) rectified labels, row ``b*K + j`` = utterance b's j-th."""
        k = rectified_ids.shape[1]
        seds = ids_to_sed(rectified_ids.reshape(-1, len(SED_FIELDS)))
        rows = [
            {"text": inputs["rectify_text"][i // k], "emotion": inputs["rectify_emotion"][i // k], **sed}
            for i, sed in enumerate(seds)
        ]
        return self.processing_class.build_captions(rows, with_sed=True)

    def _argmax_ids(self, inputs: Mapping[str, Any], logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, 5): one label set per utterance, the controller's most probable action per field
        (the replacement a "modify" draws comes from the policy generator, as for the samples)."""
        actions = (logits[..., MODIFY] > logits[..., RETAIN]).long()[:, None, :]
        ids = inputs["rectify_sed_ids"][:, None, :]
        return modify_labels(ids, actions, self.controller.config.modify_strategy, self.policy_generator)

    def _auxiliary_labels(self, inputs: Mapping[str, Any], rectified_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Targets of the SLM's auxiliary heads for the label sets it trains on in this step
        ((B, K, 5) rectified ids): ``sed_labels`` (B, K, 5) in the processor's vocabulary, so the SED
        branch learns the same (rectified) descriptors as the captions, and the transcript's
        ``ctc_labels`` (B, L), which rectification leaves as they are. Empty when the heads are not trained."""
        if not self._trains_aux:
            return {}
        device = inputs["input_ids"].device
        if self._aux_index is None:  # SED_VOCAB id -> the processor's sed_vocab index (-100: not in it), per field
            vocab = self.processing_class.sed_vocab
            self._aux_index = [
                torch.tensor([vocab[f].index(v) if v in vocab[f] else -100 for v in SED_VOCAB[f]], device=device)
                for f in SED_FIELDS
            ]
        ids = rectified_ids.to(device)
        sed = torch.stack(
            [
                table[ids[..., j].clamp(min=0)].masked_fill(ids[..., j] < 0, -100)
                for j, table in enumerate(self._aux_index)
            ],
            dim=-1,
        )
        # the transcript once per utterance (with_sed=False: its descriptor labels are all -100)
        rows = [{"text": t} for t in inputs["rectify_text"]]
        ctc = self.processing_class.auxiliary_labels(rows, with_sed=False)["ctc_labels"]
        return {"sed_labels": sed, "ctc_labels": ctc.to(device)}

    # ---------------------------------------------------------------------------- shared prefix
    def _language_model(self):
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return getattr(getattr(model, "model", None), "language_model", None)

    def _shared_prefix_reason(self) -> str | None:
        """Why the K captions cannot be packed behind one shared prefix with this model (None: they can)."""
        lm = self._language_model()
        if lm is None:
            return "the model has no model.language_model (not a SerSlmForConditionalGeneration)"
        impl = getattr(lm.config, "_attn_implementation", None)
        if impl not in PACKABLE_ATTENTION:
            return f"the LLM's attention implementation is {impl!r} (packing needs one of {PACKABLE_ATTENTION})"
        if "position_ids" not in inspect.signature(lm.forward).parameters:
            return f"{type(lm).__name__}.forward takes no position_ids"
        return None

    def _pack(self, rect: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor] | None:
        """The packed layout of ``rect`` when ``args.shared_prefix`` is on and the LLM can take it
        (else None: the K*B unpacked rows, with a warning the first time)."""
        if not self.args.shared_prefix or k < 2:  # one caption: nothing to share
            return None
        if not hasattr(self, "_packing_blocked"):
            self._packing_blocked = self._shared_prefix_reason()
            if self._packing_blocked:
                warnings.warn(
                    f"shared_prefix: {self._packing_blocked}; the K rectified captions go through the LLM "
                    "as K full rows instead",
                    stacklevel=3,
                )
        if self._packing_blocked:
            return None
        packed = pack_rectified_captions(rect, k)
        window = getattr(self._language_model().config, "sliding_window", None)
        if isinstance(window, int) and packed["input_ids"].shape[1] > window:
            if not getattr(self, "_warned_window", False):
                warnings.warn(
                    f"shared_prefix: a packed row ({packed['input_ids'].shape[1]} tokens) is longer than the "
                    f"LLM's sliding window ({window}); such batches go through unpacked",
                    stacklevel=3,
                )
                self._warned_window = True
            return None
        return packed

    def _packed_nll(self, model, packed, audio_inputs, from_predictor: int | None = None):
        lm = self._language_model()
        return packed_caption_token_nll(
            model,
            packed,
            audio_inputs=audio_inputs,
            attn_implementation=lm.config._attn_implementation,
            dtype=lm.get_input_embeddings().weight.dtype,
            from_predictor=from_predictor,
        )

    # ---------------------------------------------------------------------------- SLM step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training or "rectify_sed_ids" not in inputs:
            # evaluation: the plain caption loss on the collated (annotated) captions
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        args = self.args
        warm = self._warming_up()
        k = 1 if warm else args.num_policies  # always-retain policies are identical: one is enough
        sample, captions, feats, fmask, logits = self._sample(inputs, k, force_retain=warm, return_logits=True)
        rect = rectified_caption_inputs(self.processing_class, inputs["input_ids"], inputs["labels"], captions, k)
        packed = self._pack(rect, k)
        if not warm and self._slm_frozen():
            return self._frozen_slm_step(inputs, sample, rect, packed, feats, fmask, return_outputs)

        # the SLM's training captions: the K samples (the paper), or the controller's most probable one
        slm_k, slm_ids, slm_rect, slm_packed = k, sample.rectified_ids, rect, packed
        if not warm and args.slm_targets == "argmax":
            slm_k, slm_ids = 1, self._argmax_ids(inputs, logits)
            slm_rect = rectified_caption_inputs(
                self.processing_class, inputs["input_ids"], inputs["labels"], self._captions(inputs, slm_ids), 1
            )
            slm_packed = None
        slm_inputs = {**audio_inputs_of(inputs), **self._auxiliary_labels(inputs, slm_ids)}
        if slm_packed is not None:
            nll, valid, emo_mask, outputs = self._packed_nll(model, slm_packed, slm_inputs)
        else:
            nll, valid, emo_mask, outputs = caption_token_nll(
                model, slm_rect, audio_inputs=slm_inputs, audio_repeats=slm_k
            )
        kl = outputs.kl_loss
        n_tokens = valid.sum()
        denom = num_items_in_batch * slm_k if num_items_in_batch is not None else n_tokens
        lm_loss = nll.sum() / torch.as_tensor(denom, device=nll.device).clamp(min=1)  # mean over the K policies
        loss = lm_loss
        steps = (
            getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
            if num_items_in_batch is not None
            else 1
        )
        if kl is not None:
            loss = lm_loss + self._unwrapped_config().vib_beta * kl / steps
        loss = loss + weighted_auxiliary_loss(self._unwrapped_config(), outputs) / steps
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        with torch.no_grad():
            b = inputs["input_ids"].shape[0]
            emo_ce = emotion_cross_entropy(nll.detach(), emo_mask)
            if not warm and args.controller_fit == "online":
                record = self._record(inputs, sample, feats, fmask)
                if args.reward_timing == "reuse_forward":
                    record["rewards"] = -emo_ce.view(b, k)
                else:  # recomputed after the optimizer step: keep what the forward needs
                    record.update(slm_inputs=audio_inputs_of(inputs), **self._scored_captions(inputs, rect, packed, k))
                self._pending.append(record)
            self._log_metrics(inputs, sample, nll, valid, emo_ce, kl)
            for key in ("aux_sed_loss", "aux_ctc_loss"):
                if getattr(outputs, key, None) is not None:
                    self._log_mean(key, getattr(outputs, key))
        return (loss, outputs) if return_outputs else loss

    def _record(self, inputs, sample, feats, fmask) -> dict[str, Any]:
        """What the controller update needs of a micro-batch's policies (rewards filled in later)."""
        return {
            "feats": feats,
            "fmask": fmask,
            "context": controller_context(self.controller, inputs),
            "sed_ids": inputs["rectify_sed_ids"],
            "actions": sample.actions,
            "old_log_probs": sample.log_probs,
            "rewards": None,
        }

    def _scored_captions(self, inputs, rect, packed, k: int) -> dict[str, Any]:
        """The captions the controller's rewards are computed on after the step: the K sampled
        rectifications, or with ``advantage="single_field"`` those of ``_single_field_captions``,
        whatever was sampled for the SLM."""
        if self.args.advantage != "single_field":
            return {"rect": rect, "packed": packed, "num_captions": k}
        return self._single_field_captions(inputs)

    def _single_field_captions(self, inputs) -> dict[str, Any]:
        """The annotated caption and every one-field modification of it (``single_field_variants``),
        collated and packed behind the shared prefix, as ``_rewards_after_update`` scores them."""
        variants = single_field_variants(
            inputs["rectify_sed_ids"], rectify_field_indices(self.controller.config.rectify_fields)
        )
        m = variants.shape[1]
        rect_v = rectified_caption_inputs(
            self.processing_class, inputs["input_ids"], inputs["labels"], self._captions(inputs, variants), m
        )
        return {"rect": rect_v, "packed": self._pack(rect_v, m), "num_captions": m}

    def _frozen_slm_step(self, inputs, sample, rect, packed, feats, fmask, return_outputs):
        """A ``frozen_slm_steps`` micro-batch: no SLM forward with gradient (the loss is a constant
        0, so no SLM parameter gets a gradient and the optimizer leaves them all as they are); the
        K policies' rewards come from one no-grad forward of the (unchanged) scorer after the step."""
        with torch.no_grad():
            record = self._record(inputs, sample, feats, fmask)
            k = sample.actions.shape[1]
            record.update(slm_inputs=audio_inputs_of(inputs), **self._scored_captions(inputs, rect, packed, k))
            self._pending.append(record)
            self._log_metrics(inputs, sample)
        loss = torch.zeros((), device=inputs["input_ids"].device, requires_grad=True)
        return (loss, None) if return_outputs else loss

    def _log_metrics(self, inputs, sample, nll=None, valid=None, emo_ce=None, kl=None):
        if nll is not None:
            self._log_mean("lm_loss", nll.sum() / valid.sum().clamp(min=1))
            if kl is not None:
                self._log_mean("kl_loss", kl)
            self._log_mean("emotion_ce", torch.nanmean(emo_ce))
        rates = sample.actions.float().mean(dim=(0, 1))
        for j, f in enumerate(SED_FIELDS):
            self._log_mean(f"rectify/modify_rate_{f}", rates[j])
        truth = inputs["rectify_truth_ids"]
        known = truth >= 0
        if bool(known.any()):
            k = sample.rectified_ids.shape[1]
            hit = (sample.rectified_ids == truth[:, None, :]) & known[:, None, :]
            self._log_mean("rectify/label_accuracy", hit.sum() / (known.sum() * k))
            ann = (inputs["rectify_sed_ids"] == truth) & known
            self._log_mean("rectify/annotation_accuracy", ann.sum() / known.sum())
            # per utterance: wrong annotated labels a sampled rectification makes right, right ones it makes wrong
            fixed = hit & ~ann[:, None, :]
            broken = ann[:, None, :] & ~hit
            for j, f in enumerate(SED_FIELDS):
                if bool(known[:, j].any()):
                    n = known[:, j].sum() * k
                    self._log_mean(f"rectify/label_accuracy_{f}", hit[..., j].sum() / n)
                    self._log_mean(f"rectify/fixed_{f}", fixed[..., j].sum() / n)
                    self._log_mean(f"rectify/broken_{f}", broken[..., j].sum() / n)
        if valid is not None:
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(valid.sum().reshape(1)).sum().item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    # ---------------------------------------------------------------------------- controller step
    @torch.no_grad()
    def _rewards_after_update(self, record) -> torch.Tensor:
        model = self.reward_model if self.reward_model is not None else self.model
        was_training = model.training
        model.eval()
        try:
            k = record["num_captions"]
            packed = record.get("packed")
            if packed is not None:  # the LM head from the earliest emotion word's predictor on
                emo = packed["emotion_token_mask"]
                start = int(packed["caption_predictor"][emo].min()) if bool(emo.any(1).all()) else None
                nll, _, emo_mask, _ = self._packed_nll(model, packed, record["slm_inputs"], from_predictor=start)
                return -emotion_cross_entropy(nll, emo_mask).view(-1, k)
            rect = dict(record["rect"])
            emo = rect["emotion_token_mask"]
            if bool(emo.any(1).all()):  # the LM head is needed only from the emotion word on
                rect["first_label"] = torch.tensor(int(emo.long().argmax(1).min()))
            nll, _, emo_mask, _ = caption_token_nll(model, rect, audio_inputs=record["slm_inputs"], audio_repeats=k)
            return -emotion_cross_entropy(nll, emo_mask).view(-1, k)
        finally:
            model.train(was_training)

    def controller_step(self) -> None:
        """Rewards of the pending policies (after the SLM update, or reused), their advantages, and
        ``controller_updates_per_step`` updates of the controller: the clipped objective of the
        sampled policies, or with ``advantage="single_field"`` the best response to the measured
        one-field gains."""
        records, self._pending = self._pending, []
        if not records:
            return
        args = self.args
        for r in records:
            if r["rewards"] is None:
                r["rewards"] = self._rewards_after_update(r)
        from trl.trainer.utils import nanstd

        if args.advantage == "single_field":
            objective = self._single_field_credit(records)
        else:
            objective = self._sampled_credit(records)
        # spread the controller can learn from: the within-group (K policies, or one-field variants) std
        self._log_mean("reward/std", torch.cat([nanstd(r["rewards"], dim=-1) for r in records]).nanmean())
        self._with_reference_logits(records)
        logged: dict[str, list[torch.Tensor]] = {}
        for _ in range(args.controller_updates_per_step):
            self._update_controller(records, objective, logged)
        for key, values in logged.items():
            self._log_mean(key, torch.stack(values).mean())

    def fit_controller_to_table(self) -> dict[str, float]:
        """``controller_fit="table"``: the frozen scorer's single-field gains of every training
        utterance, measured once (``single_field_variants``, as the online credit scores them), and
        the controller fitted to their best response full-batch: ``_update_controller`` over all of
        them, a seeded fifth of the utterances held out (``hold_out_gains``), stopped when the
        held-out loss has not improved for ``TABLE_PATIENCE`` updates (``early_stopped_fit``), the
        best held-out state kept (with too few utterances to hold any out, the fitted loss decides).
        Returns (and logs) the updates to the kept state, its held-out loss and the number of
        utterances (over all processes)."""
        args = self.args
        fields = rectify_field_indices(self.controller.config.rectify_fields)
        loader = self.get_test_dataloader(self.train_dataset)
        split = torch.Generator().manual_seed(int(args.seed) * 7919 + self.accelerator.process_index)
        records = []
        with torch.no_grad():
            for batch in tqdm(loader, desc="controller table: scoring", disable=not self.is_local_process_zero()):
                inputs = self._prepare_inputs(batch)
                feats, fmask = self.controller_features(inputs)
                record = {
                    "feats": feats,
                    "fmask": fmask,
                    "context": controller_context(self.controller, inputs),
                    "sed_ids": inputs["rectify_sed_ids"],
                    "slm_inputs": audio_inputs_of(inputs),
                    **self._single_field_captions(inputs),
                }
                record["rewards"] = self._rewards_after_update(record)
                for key in ("slm_inputs", "rect", "packed"):  # only the rewards are kept of the scoring
                    record.pop(key)
                records.append(record)
        if not records:
            raise ValueError("controller_fit='table' needs a non-empty train_dataset")
        objective = self._single_field_credit(records)  # sets each record's "gains" and logs their means
        for r in records:
            r["gains"], r["heldout_gains"] = hold_out_gains(r["gains"], split)
        if not self._summed(sum(torch.isfinite(r["heldout_gains"]).sum() for r in records)):
            for r in records:  # too few utterances to hold any out: stop on the fitted loss itself
                r["heldout_gains"] = r["gains"]
        self._with_reference_logits(records)
        cost, temperature = args.modify_cost, args.controller_entropy_coef

        @torch.no_grad()
        def heldout_loss() -> float:
            total = torch.zeros(2, device=self.accelerator.device)
            for r in records:
                logits = self.controller(
                    r["sed_ids"], input_features=r["feats"], feature_attention_mask=r["fmask"], context=r["context"]
                ).logits
                n = torch.isfinite(r["heldout_gains"]).sum().float()
                total += torch.stack([best_response_loss(logits, r["heldout_gains"], fields, cost, temperature) * n, n])
            total = self._summed(total)
            return float(total[0] / total[1].clamp(min=1))

        best_at, best = early_stopped_fit(
            self.controller,
            lambda: self._update_controller(records, objective, {}),  # its training loss: not kept
            heldout_loss,
            args.controller_table_max_iterations,
            progress=self.is_local_process_zero(),
        )
        report = {
            "controller/table_updates": float(best_at),
            "controller/table_heldout_loss": best,
            "controller/table_utterances": float(self._summed(sum(len(r["sed_ids"]) for r in records))),
        }
        for key, value in report.items():
            self._log_mean(key, torch.tensor(value))
        return report

    def _summed(self, value) -> torch.Tensor:
        """``value`` (a number or tensor) summed over the processes (itself with one process)."""
        value = torch.as_tensor(value, device=self.accelerator.device)
        return self.accelerator.reduce(value, reduction="sum") if self.accelerator.num_processes > 1 else value

    @torch.no_grad()
    def _with_reference_logits(self, records) -> None:
        """The initial policy's logits of each record, for the KL toward it (``retain_kl_coef``)."""
        if self.reference_controller is None:
            return
        for r in records:
            r["reference_logits"] = self.reference_controller(
                r["sed_ids"], input_features=r["feats"], feature_attention_mask=r["fmask"], context=r["context"]
            ).logits

    def _update_controller(self, records, objective, logged: dict[str, list[torch.Tensor]]) -> None:
        """One Adam update of the controller: ``objective(record, logits)`` averaged over ``records``
        (+ ``retain_kl_coef`` x KL to the initial policy), gradients averaged over processes and clipped."""
        args = self.args
        params = [p for p in self.controller.parameters() if p.requires_grad]
        self.controller_optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            for r in records:
                logits = self.controller(
                    r["sed_ids"], input_features=r["feats"], feature_attention_mask=r["fmask"], context=r["context"]
                ).logits
                loss, metrics = objective(r, logits)
                if self.reference_controller is not None:  # penalty toward the initial (retain-heavy) policy
                    kl = bernoulli_kl(logits, r["reference_logits"]).mean()
                    loss = loss + args.retain_kl_coef * kl
                    metrics["controller/retain_kl"] = kl
                (loss / len(records)).backward()
                for key, value in metrics.items():
                    logged.setdefault(key, []).append(value.detach())
        if self.accelerator.num_processes > 1:
            for p in params:
                p.grad = self.accelerator.reduce(p.grad.contiguous(), reduction="mean")
        if args.controller_max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, args.controller_max_grad_norm)
        self.controller_optimizer.step()

    def _sampled_credit(self, records):
        """The paper's credit (GRPO-style group advantages, or ``per_field``) of the K sampled
        policies, and their clipped surrogate with the entropy bonus."""
        args = self.args
        from trl.trainer.utils import nanstd

        # what the controller is credited with: the emotion reward less the cost of its modifications
        shaped = [r["rewards"] - args.modify_cost * r["actions"].sum(-1).to(r["rewards"].dtype) for r in records]
        scale = args.controller_scale_rewards
        # "batch": one std over the whole step's rewards (all its micro-batches), as TRL
        step_std = nanstd(torch.cat([x.flatten() for x in shaped])) + 1e-4 if scale == "batch" else None
        for r, credited in zip(records, shaped):
            if args.advantage == "per_field":
                r["advantages"] = per_field_advantages(credited, r["actions"], scale=scale, batch_std=step_std)
            elif step_std is not None:
                r["advantages"] = group_normalize(credited, scale="none") / step_std
            else:
                r["advantages"] = group_normalize(credited, scale=scale)
        self._log_mean("reward/mean", torch.nanmean(torch.cat([r["rewards"].flatten() for r in records])))

        def objective(r, logits):
            new = action_log_probs(logits, r["actions"])
            pg, clip = clipped_policy_loss(new, r["old_log_probs"], r["advantages"], args.controller_clip_epsilon)
            ent = bernoulli_entropy(logits).mean()
            metrics = {"controller/loss": pg, "controller/entropy": ent, "controller/clip_fraction": clip}
            return pg - args.controller_entropy_coef * ent, metrics

        return objective

    def _single_field_credit(self, records):
        """``advantage="single_field"``: each field's gain is the scorer's reward of modifying it
        alone less that of the annotated caption (measured, not sampled), and the controller is
        fitted by cross-entropy to the entropy-regularised best response to it, temperature
        ``controller_entropy_coef`` (``best_response_loss``)."""
        args = self.args
        fields = rectify_field_indices(self.controller.config.rectify_fields)
        for r in records:
            r["gains"] = single_field_gains(r["rewards"], len(fields))
        gains = torch.cat([r["gains"] for r in records])
        self._log_mean("reward/mean", torch.nanmean(torch.cat([r["rewards"][:, 0] for r in records])))
        for i, j in enumerate(fields):
            self._log_mean(f"reward/gain_{SED_FIELDS[j]}", torch.nanmean(gains[:, i]))

        def objective(r, logits):
            loss = best_response_loss(logits, r["gains"], fields, args.modify_cost, args.controller_entropy_coef)
            return loss, {"controller/loss": loss, "controller/entropy": bernoulli_entropy(logits).mean()}

        return objective

    # ---------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        self.controller_step()  # nothing pending survives into a checkpoint
        super()._save_checkpoint(model, trial)  # -> _save_extra_state, then the completion record

    def _save_extra_state(self, output_dir: str) -> None:
        self.save_controller(output_dir)

    def save_controller(self, output_dir: str | os.PathLike) -> None:
        """Controller weights (``controller/``, safetensors), its Adam state and this process'
        policy-sampling generator state."""
        os.makedirs(output_dir, exist_ok=True)
        if self.args.should_save:
            with atomic_directory(os.path.join(output_dir, CONTROLLER_DIR)) as tmp:
                self.controller.save_pretrained(tmp)
            save_optimizer_state(self.controller_optimizer, os.path.join(output_dir, CONTROLLER_OPTIMIZER))
            if self.args.reward_scorer == "ema":  # the scorer's state (a frozen scorer is rebuilt from the start model)
                ema = {n: e.detach().cpu().contiguous() for n, (e, _) in self._ema_parameters().items()}
                save_tensors(ema, os.path.join(output_dir, REWARD_EMA))
        rank = self.accelerator.process_index
        save_tensors(
            {"policy_generator": self.policy_generator.get_state()},
            os.path.join(output_dir, f"controller_rng_{rank}.safetensors"),
        )

    def load_controller(self, checkpoint: str | os.PathLike) -> None:
        weights = os.path.join(checkpoint, CONTROLLER_DIR, "model.safetensors")
        if not os.path.exists(weights):
            raise FileNotFoundError(
                f"{weights}: the checkpoint has no SED Controller (not a SedRectifyTrainer checkpoint?)"
            )
        state = load_file(weights, device=str(self.accelerator.device))
        self.controller.load_state_dict(state)
        load_optimizer_state(self.controller_optimizer, os.path.join(checkpoint, CONTROLLER_OPTIMIZER))
        rng = os.path.join(checkpoint, f"controller_rng_{self.accelerator.process_index}.safetensors")
        if os.path.exists(rng):
            self.policy_generator.set_state(load_file(rng)["policy_generator"])
        if self.args.reward_scorer == "ema":
            path = os.path.join(checkpoint, REWARD_EMA)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path}: the checkpoint has no EMA reward scorer (saved with another reward_scorer?)"
                )
            saved, pairs = load_file(path), self._ema_parameters()
            missing = sorted(set(pairs) - set(saved))
            if missing:
                raise ValueError(f"{path}: no EMA weights for {missing[:3]}{'...' if len(missing) > 3 else ''}")
            with torch.no_grad():
                for n, (e, _) in pairs.items():
                    e.copy_(saved[n].to(e.device))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_controller(checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The SER-SLM as usual, plus the final controller in ``<output_dir>/controller``."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.args.should_save:
            out = output_dir or self.args.output_dir
            with atomic_directory(os.path.join(out, CONTROLLER_DIR)) as tmp:
                self.controller.save_pretrained(tmp)


# the names before the naming convention (docs/ARCHITECTURE.md), kept for existing imports
SEDRectifyTrainer, SEDRectifyCollator = SedRectifyTrainer, SedRectifyCollator

__all__ = [
    "audit_controller",
    "controller_input_features",
    "controller_context",
    "SedRectifyTrainer",
    "SedRectifyCollator",
    "rectified_caption_inputs",
    "caption_token_nll",
    "emotion_cross_entropy",
    "pack_rectified_captions",
    "packed_attention_mask",
    "packed_caption_token_nll",
    "save_optimizer_state",
    "load_optimizer_state",
]
