"""Ready-made SER-SLMs: the paper's recipe (HuBERT-large frozen + Llama-3.1-8B-Instruct + LoRA on
the LLM) from Hub ids or local paths, and a tiny random-init model with a corpus-trained
tokenizer that learns on 2 CPU cores. Any other encoder/LLM pair via ``build_ser_slm``."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Iterable, Sequence

import torch

from .configuration_ser_slm import SerSlmConfig, infer_audio_conv_layers
from .modeling_ser_slm import SerSlmForConditionalGeneration
from .processing_ser_slm import (
    DEFAULT_PLAIN_TEMPLATE,
    DEFAULT_SED_TEMPLATE,
    DEFAULT_SED_VOCAB,
    SED_FIELDS,
    SerSlmProcessor,
)

AUDIO_TOKEN = "<audio>"
# LoRA on the LLM only: PEFT matches this against full module names (model.language_model.layers...)
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# new (randomly initialised) parts that must train fully next to the LoRA adapters
NEW_MODULES = ["sed_vib", "semantic_vib", "projector"]


def _feature_extractor_for(audio_config, max_audio_seconds: int, hop_length: int = 160):
    from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    if getattr(audio_config, "num_mel_bins", None) is not None:
        return WhisperFeatureExtractor(
            feature_size=audio_config.num_mel_bins,
            sampling_rate=16000,
            hop_length=hop_length,
            chunk_length=int(max_audio_seconds),
            n_fft=400,
            return_attention_mask=True,
        )
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )


def _add_audio_token(tokenizer) -> int:
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)


# ------------------------------------------------------------------------------------------------
# tiny preset
# ------------------------------------------------------------------------------------------------
def train_caption_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000, emotion_labels: Sequence[str] = ()):
    """Byte-level BPE trained on the corpus transcripts plus every caption skeleton, so each
    descriptor word and emotion word is one token (and decoding round-trips exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    emotions = list(emotion_labels) or ["neutral", "happy", "angry", "sad", "surprised", "disgusted", "fearful"]
    texts = list(texts)
    skeleton = []
    rng = itertools.cycle(texts or ["hello"])
    for combo in itertools.product(*[DEFAULT_SED_VOCAB[f] for f in SED_FIELDS]):
        sed = dict(zip(SED_FIELDS, combo))
        for e in emotions:
            skeleton.append(DEFAULT_SED_TEMPLATE.format(text=next(rng), emotion=e, **sed))
        skeleton.append(DEFAULT_PLAIN_TEMPLATE.format(text=next(rng), emotion=emotions[0]))
    skeleton.append("Describe the speaker's voice and emotion.")
    specials = ["<pad>", "<s>", "</s>", "<unk>", AUDIO_TOKEN]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts * 3 + skeleton, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=[AUDIO_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_tiny_ser_slm(
    texts: Iterable[str],
    *,
    emotion_labels: Sequence[str] = (),
    max_audio_seconds: int = 7,
    mel_hop_ms: int = 20,
    encoder_dim: int = 128,
    encoder_layers: int = 2,
    num_mel_bins: int = 80,
    lm: str = "qwen2",
    lm_hidden: int = 128,
    lm_layers: int = 2,
    vocab_size: int = 1000,
    sed_energy_stream: bool = True,
    sed_f0_stream: bool = False,
    frame_downsample: int = 2,
    vib_beta: float = 1e-3,
    freeze_audio_tower: bool = False,
    aux_sed_loss_weight: float = 0.0,
    aux_ctc_loss_weight: float = 0.0,
    seed: int = 0,
):
    """Random-init SER-SLM for CPU: a tiny Whisper-style log-mel encoder, a tiny Qwen2/Llama LM and a
    tokenizer trained on ``texts``. The encoder trains (random init); the paper's freezes.
    Log-mel at ``mel_hop_ms`` (20 ms: half Whisper's frame rate, half the encoder cost), the
    encoder's stride 2 then gives 25 frames/s and ``frame_downsample=2`` 12.5 audio tokens/s."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    tok = train_caption_tokenizer(texts, vocab_size=vocab_size, emotion_labels=emotion_labels)
    fe = _feature_extractor_for(
        SimpleNamespace(num_mel_bins=num_mel_bins), max_audio_seconds, hop_length=16 * mel_hop_ms
    )
    audio_config = AutoConfig.for_model(
        "voxtral_encoder",
        hidden_size=encoder_dim,
        intermediate_size=encoder_dim * 4,
        num_hidden_layers=encoder_layers,
        num_attention_heads=4,
        num_mel_bins=num_mel_bins,
        max_source_positions=fe.nb_max_frames // 2,
    )
    heads = max(2, lm_hidden // 64)
    text_config = AutoConfig.for_model(
        lm,
        vocab_size=len(tok),
        hidden_size=lm_hidden,
        intermediate_size=lm_hidden * 3,
        num_hidden_layers=lm_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = SerSlmConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN),
        audio_token=AUDIO_TOKEN,
        sed_vib_dim=32,
        semantic_vib_dim=64,
        vib_hidden_size=256,
        vib_beta=vib_beta,
        sed_energy_stream=sed_energy_stream,
        sed_f0_stream=sed_f0_stream,
        frame_downsample=frame_downsample,
        freeze_audio_tower=freeze_audio_tower,
        aux_sed_loss_weight=aux_sed_loss_weight,
        aux_ctc_loss_weight=aux_ctc_loss_weight,
        aux_sed_num_classes=[len(DEFAULT_SED_VOCAB[f]) for f in SED_FIELDS],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = SerSlmForConditionalGeneration(config)
    _set_generation_defaults(model, tok)
    processor = SerSlmProcessor(
        fe,
        tok,
        audio_token=AUDIO_TOKEN,
        audio_conv_layers=config.audio_conv_layers,
        frame_downsample=frame_downsample,
        f0_stream=sed_f0_stream,
    )
    return model, processor


def _set_generation_defaults(model, tok):
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.do_sample = False
    gc.max_new_tokens = 96


# ------------------------------------------------------------------------------------------------
# any encoder + any LLM, and the paper's recipe
# ------------------------------------------------------------------------------------------------
def build_ser_slm(
    audio_model: str,
    text_model: str,
    *,
    dtype: torch.dtype | None = None,
    sed_vib_dim: int = 64,
    semantic_vib_dim: int = 128,
    vib_hidden_size: int = 256,
    vib_beta: float = 1e-3,
    sed_energy_stream: bool = True,
    sed_f0_stream: bool = False,
    frame_downsample: int = 4,
    freeze_audio_tower: bool = True,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
):
    """Pretrained encoder (Hub id or local path, ``AutoModel``) + pretrained causal LM
    (``AutoModelForCausalLM``) joined by freshly initialised VIB branches and projector.
    ``from_pretrained_kwargs`` (``revision``, ``token``, ``cache_dir``, ...) go to every loader;
    ``attn_implementation`` to the two models only."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_model, **from_pretrained_kwargs)
    audio_token_id = _add_audio_token(tok)
    audio_config = AutoConfig.from_pretrained(audio_model, **from_pretrained_kwargs)
    text_config = AutoConfig.from_pretrained(text_model, **from_pretrained_kwargs)
    config = SerSlmConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_id=audio_token_id,
        audio_token=AUDIO_TOKEN,
        sed_vib_dim=sed_vib_dim,
        semantic_vib_dim=semantic_vib_dim,
        vib_hidden_size=vib_hidden_size,
        vib_beta=vib_beta,
        sed_energy_stream=sed_energy_stream,
        sed_f0_stream=sed_f0_stream,
        frame_downsample=frame_downsample,
        freeze_audio_tower=freeze_audio_tower,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.device("meta"):
        model = SerSlmForConditionalGeneration(config)
    model_kwargs = dict(
        from_pretrained_kwargs, **({"attn_implementation": attn_implementation} if attn_implementation else {})
    )
    encoder = AutoModel.from_pretrained(audio_model, dtype=dtype, **model_kwargs)
    if getattr(encoder.config, "layerdrop", 0.0):  # see SerSlmModel: a fixed set of layers is weighed
        encoder.config.layerdrop = 0.0
    if getattr(encoder.config, "is_encoder_decoder", False) and hasattr(encoder, "get_encoder"):
        encoder = encoder.get_encoder()
    lm = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype, **model_kwargs)
    model.model.audio_tower = encoder
    model.model.language_model = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    model.lm_head = lm.get_output_embeddings()
    target_dtype = next(lm.parameters()).dtype
    for name in NEW_MODULES:
        module = getattr(model.model, name)
        module.to_empty(device="cpu")
        for sub in module.modules():
            sub._is_hf_initialized = False
        module.apply(model._init_weights)
        module.to(target_dtype)
    if len(tok) != config.text_config.vocab_size:
        model.resize_token_embeddings(len(tok))
        model.config.text_config.vocab_size = len(tok)
        model.config.vocab_size = len(tok)
    if freeze_audio_tower:
        model.model.audio_tower.requires_grad_(False)
    model.model.freeze_unread_encoder_modules()  # the swapped-in encoder's final norm (see SerSlmModel)
    _set_generation_defaults(model, tok)
    fe = AutoFeatureExtractor.from_pretrained(audio_model, **from_pretrained_kwargs)
    if hasattr(fe, "return_attention_mask"):
        fe.return_attention_mask = True
    processor = SerSlmProcessor(
        fe,
        tok,
        audio_token=AUDIO_TOKEN,
        audio_conv_layers=infer_audio_conv_layers(audio_config),
        frame_downsample=frame_downsample,
        f0_stream=sed_f0_stream,
    )
    return model, processor


def llm_lora_targets(modules: Sequence[str] | str | None = None) -> str:
    """PEFT ``target_modules`` regex for LoRA inside the LLM only: ``None`` -> every attention and
    MLP projection; a list of module names (``["q_proj", "v_proj"]``) -> those names under
    ``language_model`` (a bare list would also match the speech encoder's ``q_proj``); a string is
    taken as the regex itself."""
    import re

    if modules is None:
        return LLM_LORA_TARGETS
    if isinstance(modules, str):
        return modules
    names = [str(m) for m in modules if str(m)]
    if not names:
        raise ValueError("lora_target_modules: an empty list (None adapts every LLM projection)")
    return r".*language_model.*\.(" + "|".join(re.escape(n) for n in names) + ")"


def lora_config_for_llm(
    r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Sequence[str] | str | None = None
):
    """PEFT LoRA on the LLM's projections only; VIB branches and projector train fully
    (``modules_to_save``, so the adapter holds their trained copies)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=llm_lora_targets(target_modules),
        modules_to_save=list(NEW_MODULES),
        task_type="CAUSAL_LM",
    )


def build_paper_ser_slm(
    audio_model: str = "facebook/hubert-large-ll60k",
    text_model: str = "meta-llama/Llama-3.1-8B-Instruct",
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] | str | None = None,
    use_lora: bool = True,
    dtype: torch.dtype | None = torch.bfloat16,
    attn_implementation: str | None = None,
    revision: str | None = None,
    **kwargs,
):
    """The paper's SER-SLM: frozen HuBERT-large, Llama-3.1-8B-Instruct with LoRA on the LLM only;
    any encoder/LLM (Hub id or local folder) in their place. The recipe passes its model settings
    (``SerSlmModelArguments.build_kwargs()``). Returns ``(peft_model, processor)`` (plain model
    when ``use_lora=False``, e.g. to hand the LoRA config to ``SerSlmSFTTrainer(peft_config=...)``
    instead)."""
    if revision not in (None, "main"):
        kwargs["revision"] = revision
    model, processor = build_ser_slm(
        audio_model, text_model, dtype=dtype, freeze_audio_tower=True, attn_implementation=attn_implementation, **kwargs
    )
    if use_lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config_for_llm(lora_r, lora_alpha, lora_dropout, lora_target_modules))
    return model, processor


__all__ = [
    "build_tiny_ser_slm",
    "build_paper_ser_slm",
    "build_ser_slm",
    "train_caption_tokenizer",
    "lora_config_for_llm",
    "llm_lora_targets",
    "LLM_LORA_TARGETS",
]
