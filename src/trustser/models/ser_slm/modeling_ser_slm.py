"""SER-SLM: speech encoder -> two VIB branches (SED, semantic) -> projector -> causal LM.

Layout as in transformers' Voxtral / Qwen2-Audio: ``self.model`` (backbone holding ``audio_tower``,
the VIB branches, ``projector`` and ``language_model``) + ``self.lm_head``, ``base_model_prefix =
"model"`` (what TRL's fused LM head and PEFT expect). Relative imports only (trust_remote_code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_ser_slm import SerSlmConfig, conv_output_length

ENERGY_FLOOR_DB = -100.0
# encoder modules kept in fp32 under bf16/fp16 loading, as the encoder's own model declares them
# (VoxtralForConditionalGeneration: its encoder builds the positions in fp32 and casts their sum back;
# Whisper's and Qwen2-Audio's encoders do not cast back, so their positions must follow the dtype)
ENCODER_FP32_MODULES = {"voxtral_encoder": ["embed_positions"]}


@dataclass
class SerSlmCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` = ``lm_loss`` + beta * ``kl_loss`` (+ the weighted auxiliary losses when their labels
    are passed); every part is returned on its own for logging."""

    lm_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    aux_sed_loss: torch.FloatTensor | None = None
    aux_ctc_loss: torch.FloatTensor | None = None


@dataclass
class SerSlmModelOutputWithPast(BaseModelOutputWithPast):
    """The language model's output plus what the audio path produced in this call (the KL and the
    auxiliary losses are None when the encoder did not run here)."""

    kl_loss: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    aux_sed_loss: torch.FloatTensor | None = None
    aux_ctc_loss: torch.FloatTensor | None = None


@dataclass
class SerSlmAudioOutput(BaseModelOutputWithPooling):
    """``get_audio_features``: ``pooler_output`` = the audio embeddings (B, N, H) that replace the
    placeholder tokens (as Voxtral's), ``audio_mask`` (B, N) their valid positions, ``kl_loss`` the
    VIB KL of this call; ``last_hidden_state`` / ``hidden_states`` / ``attentions`` are the encoder's."""

    audio_mask: torch.BoolTensor | None = None
    kl_loss: torch.FloatTensor | None = None


def _mark_scale_preserving(module: nn.Module) -> None:
    """Flags ``module``'s Linear layers for Xavier init in ``_init_weights`` (see there)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub._scale_preserving_init = True


class SerSlmVibBranch(nn.Module):
    """Variational information bottleneck over a learnable softmax-weighted sum of encoder layers:
    mu/log-variance per frame, reparameterised sample while training, the mean in eval."""

    def __init__(self, num_layers: int, in_dim: int, extra_dim: int, hidden: int, latent: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))
        self.mlp = nn.Sequential(nn.Linear(in_dim + extra_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        _mark_scale_preserving(self)

    def forward(self, layers: torch.Tensor, extra: torch.Tensor | None = None):
        # layers: (>= num_layers, B, T, D): the last num_layers are the transformer layers' outputs
        # (encoders differ on whether hidden_states also holds the embedding output: HuBERT-large's
        # stable-layer-norm variant does not); each layer normalised so the weights compare like with like
        n = self.layer_weights.numel()
        if layers.shape[0] < n:
            raise ValueError(f"the audio encoder returned {layers.shape[0]} hidden states, the VIB branch weighs {n}")
        layers = F.layer_norm(layers[-n:], layers.shape[-1:])
        w = torch.softmax(self.layer_weights, dim=0).to(layers.dtype)
        x = torch.einsum("l,lbtd->btd", w, layers)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=-1)
        h = self.mlp(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-20.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)  # (B, T), >= 0
        return z, kl


class SerSlmProjector(nn.Module):
    """Maps the concatenated VIB samples (one per ``frame_downsample`` encoder frames) to the LM's width."""

    def __init__(self, config: SerSlmConfig):
        super().__init__()
        in_dim = config.sed_vib_dim + config.semantic_vib_dim
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)
        _mark_scale_preserving(self)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class SerSlmPreTrainedModel(PreTrainedModel):
    config: SerSlmConfig
    config_class = SerSlmConfig
    base_model_prefix = "model"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # decoding steps (text only: the audio lives in the cache) compile with fullgraph=True on a static
    # cache; the audio prefill merges a data-dependent number of embeddings and runs uncompiled, as
    # generate's prefill does
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        if getattr(module, "_scale_preserving_init", False):
            # the audio path's layers (VIB branches, projector): with the LM's N(0, 0.02) init its five
            # stacked layers shrink the audio embeddings to ~1e-3 of unit scale, under the LM's RMSNorm
            # epsilon, and a randomly initialised model then learns to ignore the audio
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)
        if isinstance(module, SerSlmVibBranch):
            init.zeros_(module.layer_weights)
            # start with little noise: the sample is close to mu until the KL term says otherwise
            init.constant_(module.logvar.bias, -6.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # a checkpoint of another type is an error naming the directory, not a random-initialised
        # model (kept inline, not imported from trustser: this file also ships as remote code)
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            try:
                found = PreTrainedConfig.get_config_dict(
                    pretrained_model_name_or_path,
                    **{
                        k: kwargs[k]
                        for k in ("subfolder", "revision", "token", "cache_dir", "local_files_only")
                        if k in kwargs
                    },
                )[0].get("model_type")
            except (OSError, ValueError):
                found = None
            if found is not None and found != cls.config_class.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: holds a {found!r} checkpoint, not a {cls.__name__} "
                    f"(model_type {cls.config_class.model_type!r}); point to the right directory"
                )
        # missing or unexpected weights (beyond the tied ones transformers leaves out) are an error
        # too, not a partly random model (as trustser.models.loading.refuse_incomplete_weights)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        bad = {k: sorted(info.get(f"{k}_keys") or ()) for k in ("missing", "unexpected")}
        if any(bad.values()):
            raise ValueError(
                f"{pretrained_model_name_or_path}: not a complete {cls.__name__} checkpoint: "
                + "; ".join(f"{len(v)} {k} weight(s) {v[:10]}" for k, v in bad.items() if v)
                + " (a renamed, truncated or foreign weights file?)"
            )
        return (model, info) if wants_info else model


def _audio_encoder_from_config(audio_config):
    encoder = AutoModel.from_config(audio_config)
    # encoder-decoder speech models (Whisper): keep the encoder only
    if getattr(encoder.config, "is_encoder_decoder", False) and hasattr(encoder, "get_encoder"):
        encoder = encoder.get_encoder()
    return encoder


class SerSlmModel(SerSlmPreTrainedModel):
    def __init__(self, config: SerSlmConfig):
        super().__init__(config)
        # layerdrop (HuBERT/wav2vec2 default 0.1) skips encoder layers at random in training, which
        # would leave the VIB branches' layer-weighted sum with a varying set of layers
        if getattr(config.audio_config, "layerdrop", 0.0):
            config.audio_config.layerdrop = 0.0
        self.audio_tower = _audio_encoder_from_config(config.audio_config)
        self.language_model = AutoModel.from_config(config.text_config)
        a = config.audio_config
        num_layers = int(getattr(a, "num_hidden_layers", None) or getattr(a, "encoder_layers"))
        width = int(getattr(a, "hidden_size", None) or getattr(a, "d_model"))
        extra = config.prosody_features
        self.sed_vib = SerSlmVibBranch(num_layers, width, extra, config.vib_hidden_size, config.sed_vib_dim)
        self.semantic_vib = SerSlmVibBranch(num_layers, width, 0, config.vib_hidden_size, config.semantic_vib_dim)
        self.projector = SerSlmProjector(config)
        # auxiliary heads (training signal for a randomly initialised encoder; unused in generation)
        self.aux_sed_heads = None
        if config.aux_sed_loss_weight > 0:
            self.aux_sed_heads = nn.ModuleList(nn.Linear(config.sed_vib_dim, n) for n in config.aux_sed_num_classes)
        self.aux_ctc_head = None
        if config.aux_ctc_loss_weight > 0:
            self.aux_ctc_head = nn.Linear(config.semantic_vib_dim, config.text_config.vocab_size)
        if config.freeze_audio_tower:
            self.audio_tower.requires_grad_(False)
        self.freeze_unread_encoder_modules()
        # per instance (post_init collects it into the top-level model's loading dtype plan)
        self._keep_in_fp32_modules_strict = [
            f"audio_tower.{name}" for name in ENCODER_FP32_MODULES.get(config.audio_config.model_type, [])
        ]
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ---------------------------------------------------------------------------------------
    def _encoder_frame_mask(self, feature_attention_mask, batch: int, frames: int, device):
        if feature_attention_mask is None:
            return torch.ones(batch, frames, dtype=torch.bool, device=device)
        lengths = feature_attention_mask.long().sum(-1).tolist()
        valid = [min(frames, conv_output_length(n, self.config.audio_conv_layers)) for n in lengths]
        ar = torch.arange(frames, device=device)
        return ar[None, :] < torch.tensor(valid, device=device)[:, None]

    @staticmethod
    def _track_features(track: torch.Tensor, valid: torch.Tensor, frames: int):
        """(B, E) 10 ms track -> (B, T) resampled to the encoder frames and (B,) mean over valid frames."""
        x = F.interpolate(track[:, None, :], size=frames, mode="linear", align_corners=False)[:, 0]
        mean = (track * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        return x, mean

    def _prosody_features(self, energy, f0, frame_mask: torch.Tensor, frames: int):
        """Raw-waveform streams -> (B, T, prosody_features), scaled to about unit range:
        frame log-energy and active-speech level; log2 F0 re 150 Hz, voicing, utterance-mean log2 F0."""
        feats = []
        if self.config.sed_energy_stream:
            if energy is None:
                raise ValueError(
                    "this SER-SLM uses the energy stream (sed_energy_stream=True): pass energy= from the processor"
                )
            # levels relative to the loudest frame decide what counts as speech, so a channel's noise
            # floor (or digital silence) does not move the features: frames are floored at peak - 40 dB
            # and the utterance level is the mean over active frames (within 25 dB of the peak)
            e = energy.to(torch.float32)
            peak = e.max(-1, keepdim=True).values
            floored = torch.maximum(e, peak - 40.0)
            active = (e > peak - 25.0).float()
            x, mean = self._track_features((floored + 40.0) / 20.0, active, frames)
            feats += [x, mean[:, None].expand_as(x)]
        if self.config.sed_f0_stream:
            if f0 is None:
                raise ValueError("this SER-SLM uses the F0 stream (sed_f0_stream=True): pass f0= from the processor")
            f = f0.to(torch.float32)
            voiced = (f > 0).float()
            logf = torch.log2(f.clamp(min=1.0) / 150.0) * voiced
            x, mean = self._track_features(logf, voiced, frames)
            v, _ = self._track_features(voiced, voiced, frames)
            feats += [x, v, mean[:, None].expand_as(x)]
        return torch.stack(feats, dim=-1) * frame_mask[..., None]

    def _encoder_layers(self) -> nn.ModuleList:
        """The audio encoder's stack of transformer layers (the ModuleList of num_hidden_layers blocks)."""
        return self._encoder_layer_stack()[1]

    def _encoder_layer_stack(self) -> tuple[str, nn.ModuleList]:
        """``(name, ModuleList)`` of the encoder's transformer layers, cached for the current tower
        (``build_ser_slm`` replaces the tower after ``__init__``)."""
        cached = getattr(self, "_encoder_layer_list", None)
        if cached is not None and cached[0] is self.audio_tower:
            return cached[1:]
        weights = self.sed_vib.layer_weights
        n = getattr(weights, "ds_numel", weights.numel())  # ZeRO-3 partitions parameters (numel() is 0 there)
        candidates = [
            (name.rsplit(".", 1)[-1] not in ("layers", "layer", "blocks", "h"), name.count("."), name, module)
            for name, module in self.audio_tower.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == n
        ]
        if candidates:  # prefer a list named like a transformer stack (not e.g. conv_layers), then the shallowest
            _, _, name, module = min(candidates, key=lambda c: c[:2])
            object.__setattr__(self, "_encoder_layer_list", (self.audio_tower, name, module))
            return name, module
        raise ValueError(
            f"cannot find the {n} transformer layers of the audio encoder {type(self.audio_tower).__name__}"
        )

    def unread_encoder_modules(self) -> list[nn.Module]:
        """The encoder's final norm, which pre-LN encoders (Whisper-style, and wav2vec2/HuBERT/WavLM
        with ``do_stable_layer_norm``) apply after their layer stack: the VIB branches read the layers'
        outputs (hooks), never the encoder's ``last_hidden_state``, so that norm gets no gradient.
        Post-LN encoders (wav2vec2/HuBERT base) apply their sibling norm before the stack: none."""
        a = self.config.audio_config
        if getattr(a, "num_mel_bins", None) is None and not getattr(a, "do_stable_layer_norm", False):
            return []
        name, stack = self._encoder_layer_stack()
        parent = self.audio_tower.get_submodule(name.rpartition(".")[0])
        return [
            m
            for m in parent.children()
            if m is not stack
            and (isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__)
            and any(True for _ in m.parameters())
        ]

    def freeze_unread_encoder_modules(self) -> None:
        """Declares the encoder's unread final norm frozen (``requires_grad=False``): it would otherwise
        count as trainable without ever training, and DDP with a trainable encoder would stop on an
        unused parameter. Frozen rather than removed, so checkpoints keep the encoder's keys, and results
        are unchanged (a parameter without a gradient is skipped by the optimizer and the clipping)."""
        for module in self.unread_encoder_modules():
            module.requires_grad_(False)

    @can_return_tuple
    def get_audio_features(
        self, input_features, feature_attention_mask=None, energy=None, f0=None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple | SerSlmAudioOutput:
        """Runs the encoder once: ``pooler_output`` holds the audio embeddings (B, N, H) to pass as
        ``audio_embeds`` (possibly ``repeat_interleave``-d) to ``forward`` to reuse them, ``audio_mask``
        their valid positions and ``kl_loss`` the KL. ``output_hidden_states`` / ``output_attentions``
        are the encoder's."""
        tower_kwargs = {
            k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if kwargs.get(k) is not None
        }
        latents = self._audio_latents(input_features, feature_attention_mask, energy, f0, **tower_kwargs)
        enc = latents["encoder_outputs"]
        return SerSlmAudioOutput(
            last_hidden_state=enc.last_hidden_state,
            pooler_output=latents["audio_embeds"],
            hidden_states=enc.get("hidden_states"),
            attentions=enc.get("attentions"),
            audio_mask=latents["audio_mask"],
            kl_loss=latents["kl"],
        )

    @torch.no_grad()
    def get_sed_features(self, input_features, feature_attention_mask=None, energy=None, f0=None):
        """The SED VIB branch's per-token features of the utterances, for a reader outside the SLM
        (the SED Controller with ``SedRectifyConfig.controller_input="sed_branch"``): ``(z_sed,
        audio_mask)``, (B, N, sed_vib_dim) zeroed at padded tokens and (B, N) bool. Deterministic:
        the model runs in eval mode for this call (no dropout, and the VIB branch returns its mean
        mu, not a sample), then every module gets its own mode back; computed without gradient, so
        nothing that reads them trains the SLM."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            latents = self._audio_latents(input_features, feature_attention_mask, energy, f0)
        finally:
            for m, training in modes:
                m.training = training
        mask = latents["audio_mask"]
        return latents["z_sed"] * mask[..., None].to(latents["z_sed"].dtype), mask

    def auxiliary_losses(self, latents: dict, sed_labels=None, ctc_labels=None) -> dict:
        """Auxiliary losses from one ``_audio_latents`` call (see SerSlmConfig): descriptor
        classification from the utterance-mean SED latent (labels (B, 5), -100 = unknown; or (B, K, 5):
        K label sets per utterance, e.g. K rectified captions, averaged) and CTC of the transcript
        tokens over the semantic latents (labels (B, L), -100 = padding)."""
        out = {}
        mask = latents["audio_mask"]
        if sed_labels is not None and self.aux_sed_heads is not None:
            m = mask[..., None].to(latents["z_sed"].dtype)
            pooled = (latents["z_sed"] * m).sum(1) / m.sum(1).clamp(min=1.0)
            sed_labels = sed_labels.to(pooled.device)
            if sed_labels.dim() == 2:
                sed_labels = sed_labels[:, None, :]
            if sed_labels.shape[0] != pooled.shape[0] or sed_labels.dim() != 3:
                raise ValueError(
                    f"sed_labels must be (B, 5) or (B, K, 5) for B = {pooled.shape[0]} utterances, "
                    f"got {tuple(sed_labels.shape)}"
                )
            k = sed_labels.shape[1]
            losses = [
                F.cross_entropy(
                    head(pooled).float().repeat_interleave(k, dim=0),
                    sed_labels[..., j].reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                for j, head in enumerate(self.aux_sed_heads)
            ]
            out["aux_sed_loss"] = torch.stack(losses).sum() / (sed_labels >= 0).sum().clamp(min=1)
        if ctc_labels is not None and self.aux_ctc_head is not None:
            ctc_labels = ctc_labels.to(mask.device)
            log_probs = torch.log_softmax(self.aux_ctc_head(latents["z_sem"]).float(), dim=-1).transpose(0, 1)
            target_lengths = (ctc_labels >= 0).sum(-1)
            blank = self.config.text_config.pad_token_id if self.config.text_config.pad_token_id is not None else 0
            out["aux_ctc_loss"] = F.ctc_loss(
                log_probs,
                ctc_labels.clamp(min=0),
                mask.sum(-1),
                target_lengths,
                blank=blank,
                reduction="mean",
                zero_infinity=True,
            )
        return out

    def _audio_latents(self, input_features, feature_attention_mask=None, energy=None, f0=None, **tower_kwargs) -> dict:
        """Encoder + VIB branches + projector: ``audio_embeds``, ``audio_mask``, ``kl``, the VIB
        samples ``z_sed`` / ``z_sem`` (B, N, dim) that the auxiliary losses read and the encoder's
        own output (``encoder_outputs``; ``tower_kwargs`` such as ``output_hidden_states`` go to it)."""
        cfg = self.config
        tower_kwargs = {**tower_kwargs, "return_dict": True}
        if feature_attention_mask is not None and getattr(cfg.audio_config, "feat_extract_norm", None) == "layer":
            tower_kwargs["attention_mask"] = feature_attention_mask
        param = next(self.audio_tower.parameters())
        input_features = input_features.to(device=param.device, dtype=param.dtype)
        # the layers' outputs are taken with forward hooks rather than output_hidden_states, whose
        # content varies between encoders and transformers versions (seen: HuBERT-large's
        # stable-layer-norm encoder returning a varying number of states)
        captured: list[torch.Tensor] = []
        hook = lambda _m, _i, out: captured.append(out[0] if isinstance(out, (tuple, list)) else out)  # noqa: E731
        handles = [layer.register_forward_hook(hook) for layer in self._encoder_layers()]
        try:
            if cfg.freeze_audio_tower:
                with torch.no_grad():
                    encoder_outputs = self.audio_tower(input_features, **tower_kwargs)
            else:
                encoder_outputs = self.audio_tower(input_features, **tower_kwargs)
        finally:
            for h in handles:
                h.remove()
        layers = torch.stack(captured, dim=0)  # (L, B, T, D)
        _, batch, frames, _ = layers.shape
        frame_mask = self._encoder_frame_mask(feature_attention_mask, batch, frames, layers.device)
        extra = None
        if cfg.prosody_features:
            extra = self._prosody_features(
                energy.to(layers.device) if energy is not None else None,
                f0.to(layers.device) if f0 is not None else None,
                frame_mask,
                frames,
            )
        # pool k consecutive frames first: the VIB MLPs then run at the (k times lower) token rate
        k = cfg.frame_downsample
        pad = (-frames) % k
        if pad:
            layers = F.pad(layers, (0, 0, 0, pad))
            frame_mask = F.pad(frame_mask, (0, pad))
            extra = F.pad(extra, (0, 0, 0, pad)) if extra is not None else None
        n_tok = (frames + pad) // k
        fm = frame_mask.reshape(batch, n_tok, k).to(layers.dtype)
        cnt = fm.sum(-1, keepdim=True).clamp(min=1.0)
        layers = (layers.reshape(layers.shape[0], batch, n_tok, k, -1) * fm[None, ..., None]).sum(-2) / cnt[None]
        if extra is not None:
            extra = (extra.reshape(batch, n_tok, k, -1) * fm[..., None]).sum(-2) / cnt
        audio_mask = fm.sum(-1) > 0
        z_sed, kl_sed = self.sed_vib(layers, extra)
        z_sem, kl_sem = self.semantic_vib(layers)
        am = audio_mask.to(kl_sed.dtype)
        kl = ((kl_sed + kl_sem) * am).sum() / am.sum().clamp(min=1.0)
        z = torch.cat([z_sed, z_sem], dim=-1) * audio_mask[..., None]
        audio_embeds = self.projector(z)
        return {
            "audio_embeds": audio_embeds,
            "audio_mask": audio_mask,
            "kl": kl,
            "z_sed": z_sed,
            "z_sem": z_sem,
            "encoder_outputs": encoder_outputs,
        }

    def merge_audio(self, input_ids, inputs_embeds, audio_embeds):
        """Row i's n_i placeholder tokens receive row i's first n_i audio embeddings."""
        is_audio = input_ids == self.config.audio_token_id
        if not bool(is_audio.any()):
            return inputs_embeds
        if audio_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"audio_embeds batch {audio_embeds.shape[0]} != input_ids batch {input_ids.shape[0]} "
                "(repeat_interleave the audio embeddings to match)"
            )
        rank = is_audio.long().cumsum(-1) - 1
        rows, cols = is_audio.nonzero(as_tuple=True)
        idx = rank[rows, cols]
        if int(idx.max()) >= audio_embeds.shape[1]:
            raise ValueError(
                f"{int(idx.max()) + 1} audio placeholder tokens in a row but only {audio_embeds.shape[1]} audio "
                "embeddings: the processor and the model disagree on the encoder's frame arithmetic"
            )
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[rows, cols] = audio_embeds[rows, idx].to(inputs_embeds.dtype)
        return inputs_embeds

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        input_features=None,
        feature_attention_mask=None,
        energy=None,
        audio_embeds=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        f0=None,
        audio_repeats: int = 1,
        sed_labels=None,
        ctc_labels=None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | SerSlmModelOutputWithPast:
        kl = None
        aux = {}
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if input_ids is not None and (audio_embeds is not None or input_features is not None):
            if audio_embeds is None:
                latents = self._audio_latents(input_features, feature_attention_mask, energy, f0)
                audio_embeds, kl = latents["audio_embeds"], latents["kl"]
                aux = self.auxiliary_losses(latents, sed_labels, ctc_labels)
                if audio_repeats > 1:  # several captions per utterance: the encoder still runs once per utterance
                    audio_embeds = audio_embeds.repeat_interleave(audio_repeats, dim=0)
            inputs_embeds = self.merge_audio(input_ids, inputs_embeds, audio_embeds)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            return_dict=True,
            **kwargs,
        )
        return SerSlmModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kl_loss=kl,
            audio_embeds=audio_embeds,
            **aux,
        )


def weighted_auxiliary_loss(config: SerSlmConfig, outputs):
    """``aux_sed_loss_weight`` x aux_sed_loss + ``aux_ctc_loss_weight`` x aux_ctc_loss of a model
    output (0 for the parts it does not hold)."""
    total = 0.0
    for key, weight in (("aux_sed_loss", config.aux_sed_loss_weight), ("aux_ctc_loss", config.aux_ctc_loss_weight)):
        value = outputs.get(key) if hasattr(outputs, "get") else getattr(outputs, key, None)
        if value is not None and weight > 0:
            total = total + weight * value
    return total


class SerSlmForConditionalGeneration(SerSlmPreTrainedModel, GenerationMixin):
    # applied only when config.tie_word_embeddings (set from the LLM's config by the presets)
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the LM's own plans cover model.language_model (embed_tokens sharded on the vocabulary); the head
    # takes the causal LMs' entries, so a tied lm_head is split the same way as the embeddings it shares
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SerSlmConfig):
        super().__init__(config)
        self.model = SerSlmModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_audio_features(self, *args, **kwargs):
        return self.model.get_audio_features(*args, **kwargs)

    def get_sed_features(self, *args, **kwargs):
        return self.model.get_sed_features(*args, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        input_features=None,
        feature_attention_mask=None,
        energy=None,
        audio_embeds=None,
        labels=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        f0=None,
        audio_repeats: int = 1,
        sed_labels=None,
        ctc_labels=None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | SerSlmCausalLMOutput:
        """Loss = LM cross-entropy on ``labels`` (-100 = ignored) + ``vib_beta`` x KL (when the
        encoder ran in this call; with precomputed ``audio_embeds`` the KL belongs to the caller).
        ``audio_repeats``: each utterance's audio serves that many consecutive rows of ``input_ids``
        (K rectified captions per utterance); the encoder runs once per utterance, inside this
        forward, so FSDP/ZeRO-3 gather its weights as for any forward. ``sed_labels`` /
        ``ctc_labels`` (from ``SerSlmDataCollator(aux_labels=True)``) add the weighted auxiliary
        losses of the config to ``loss``."""
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_features=input_features,
            feature_attention_mask=feature_attention_mask,
            energy=energy,
            f0=f0,
            audio_embeds=audio_embeds,
            audio_repeats=audio_repeats,
            sed_labels=sed_labels,
            ctc_labels=ctc_labels,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            return_dict=True,
            **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"},
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        kl = outputs.kl_loss
        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            loss = lm_loss + self.config.vib_beta * kl if kl is not None else lm_loss
            loss = loss + self.weighted_auxiliary_loss(outputs)
        return SerSlmCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            kl_loss=kl,
            aux_sed_loss=outputs.aux_sed_loss,
            aux_ctc_loss=outputs.aux_ctc_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_embeds=outputs.audio_embeds,
        )

    def weighted_auxiliary_loss(self, outputs):
        return weighted_auxiliary_loss(self.config, outputs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            # audio lives in the KV cache after the prefill
            for key in ("input_features", "feature_attention_mask", "energy", "f0", "audio_embeds"):
                model_inputs.pop(key, None)
        return model_inputs


__all__ = [
    "SerSlmPreTrainedModel",
    "SerSlmModel",
    "SerSlmForConditionalGeneration",
    "SerSlmCausalLMOutput",
    "SerSlmModelOutputWithPast",
    "SerSlmAudioOutput",
]
