"""Settings of a system run (one recipe), parsed by ``trl.TrlParser`` from a YAML file
(``--config``) and the command line, as TRL's and open-r1's scripts do:

* ``RecipeConfig``: corpora, stages, the paper's hyper-parameters (one field each);
* ``SerSlmModelArguments``: TRL ``ModelConfig``-style model settings (encoder and LLM by Hub id or
  local path, dtype, attention implementation, LoRA);
* ``TrainingSettings``: every ``SedRectifyConfig`` / ``SerSlmSFTConfig`` / ``TrainingArguments``
  field the recipe does not set itself (``bf16``, ``gradient_accumulation_steps``,
  ``gradient_checkpointing``, ``dataloader_num_workers``, ``eval_strategy``, ``report_to``,
  ``hub_model_id``, ...): a top-level YAML key applies to every training stage, and
  ``pretrain_training_args`` / ``cem_training_args`` / ``posttrain_training_args`` override any
  field for one stage.

The defaults are the embedded default: the synthetic corpus and the tiny preset, sized to finish
on 2 CPU cores. Each default is written once: in a field below, in ``TRAINING_DEFAULTS`` (the
recipe's choices for trainer fields), in ``RECTIFY_DEFAULTS`` (the embedded default's controller
choices, rectifying post-training only), else the trainer config's own default."""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

# The recipe's own defaults for trainer fields (everything else: the trainer config's default).
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "save_total_limit": 2,
    "dataloader_num_workers": 0,
    "disable_tqdm": False,
    "report_to": "none",
}
# The embedded default's tuned choices for the rectifying post-training's controller (docs/rectify.md,
# "Repair"): they win over SedRectifyConfig's own defaults (the paper's) in that stage only; a top-level
# YAML key (the real configs: the paper's values) or posttrain_training_args overrides them. Unlike
# TRAINING_DEFAULTS they are always in the rectifying post-training's stage key, so changing one here
# never reuses a stage trained with the old value.
RECTIFY_DEFAULTS: dict[str, Any] = {
    "controller_learning_rate": 1e-2,
    "controller_updates_per_step": 4,
    "controller_scale_rewards": "none",
    "controller_head_hidden_size": 64,
    # 40 ms LSTM steps instead of 10 ms: the controller's update was 2/3 of the post-training step on CPU
    # (BENCHMARKS.md, "Main job"); the utterance summary keeps the prosody's time scale
    "controller_frame_stride": 4,
    # a reward the controller can trust and credit it can use (issue 15; setting S5 of docs/rectify.md,
    # "Single-field credit", chosen on dev over 3 seeds): the frozen pre-trained SLM scores, every
    # one-field modification of every training utterance is scored once and the controller is fitted
    # (early-stopped) to the best response to those gains before the SLM trains; it
    # reads the labels and the speaker-relative prosody, not the audio; a modification must gain 0.05
    # nats; and only pitch and volume, the fields whose modification moves the reward by more than
    # that on average (benchmarks/reward_signal.py, no ground truth), may be modified
    "reward_scorer": "frozen",
    "advantage": "single_field",
    "controller_fit": "table",
    "controller_speaker_context": True,
    "controller_input": "none",
    "controller_embedding_size": 4,
    "modify_cost": 0.05,
    "controller_entropy_coef": 0.02,
    "rectify_fields": ["pitch", "volume"],
}
# Trainer fields each stage sets from the recipe (its learning rate, steps, batch, seed, ...), so
# they are not top-level settings; a stage's ``*_training_args`` may still override them.
STAGE_OWNED = (
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "per_device_train_batch_size",
    "warmup_steps",
    "data_seed",
    "sed_source",
    "with_sed",
    "aux_losses",
    "dataset_kwargs",
    "remove_unused_columns",
)
# Trainer fields that do not change what a stage computes (not part of its cache key).
NOT_IN_STAGE_KEY = frozenset(
    {
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_dir",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "disable_tqdm",
        "dataloader_num_workers",
        "dataloader_prefetch_factor",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "save_on_each_node",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "per_device_eval_batch_size",
        "eval_on_start",
        "include_num_input_tokens_seen",
        "skip_memory_metrics",
        "ddp_timeout",
    }
)
# never written to results.json
SECRET_FIELDS = ("hub_token",)
# trainer fields meaningful for the SER-SLM only (not for the CEM's small MLP)
SLM_ONLY = frozenset(
    {
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
    }
)


@dataclass
class SerSlmModelArguments:
    """Model settings of the ``paper`` preset, named as in TRL's ``ModelConfig`` where it has the
    setting. The tiny preset (random init) reads none of them."""

    audio_model: str = field(
        default="facebook/hubert-large-ll60k",
        metadata={
            "help": "Speech encoder: a Hub id or a local folder (AutoModel + AutoFeatureExtractor); the paper: HuBERT-large, frozen."
        },
    )
    text_model: str = field(
        default="meta-llama/Llama-3.1-8B-Instruct",
        metadata={
            "help": "LLM: a Hub id or a local folder (AutoModelForCausalLM + AutoTokenizer); the paper: Llama-3.1-8B-Instruct."
        },
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) of both models."}
    )
    dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Weights dtype of the pretrained parts: 'bfloat16', 'float16', 'float32' or 'auto' (the checkpoints' own)."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention implementation of both models ('sdpa', 'eager', 'flash_attention_2', ...); None: transformers' choice."
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "LoRA on the LLM (the paper); False trains the LLM fully."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LLM module names LoRA adapts (e.g. q_proj v_proj), matched inside the LLM only; None: every attention and MLP projection."
        },
    )

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.lora_target_modules is not None:  # "q_proj v_proj", "q_proj,v_proj" or a list
            items = (
                [self.lora_target_modules] if isinstance(self.lora_target_modules, str) else self.lora_target_modules
            )
            self.lora_target_modules = [m for item in items for m in str(item).replace(",", " ").split() if m]

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``build_paper_ser_slm``."""
        import torch

        return dict(
            audio_model=self.audio_model,
            text_model=self.text_model,
            revision=self.model_revision,
            dtype=None if self.dtype == "auto" else getattr(torch, self.dtype),
            attn_implementation=self.attn_implementation,
            use_lora=self.use_peft,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_target_modules=self.lora_target_modules,
        )


DTYPES = ("bfloat16", "float16", "float32", "auto")


def _training_settings_class():
    """A dataclass of every ``SedRectifyConfig`` field the recipe does not own, with the recipe's
    default (``TRAINING_DEFAULTS``, ``RECTIFY_DEFAULTS``) or the config's own, so that ``TrlParser`` parses them next to
    ``RecipeConfig`` without clashing names."""
    from .trainers.rectify_config import SedRectifyConfig

    owned = {f.name for f in dataclasses.fields(RecipeConfig)} | set(STAGE_OWNED)
    hints = typing.get_type_hints(SedRectifyConfig)
    recipe_defaults = {**TRAINING_DEFAULTS, **RECTIFY_DEFAULTS}
    fields = []
    for f in dataclasses.fields(SedRectifyConfig):
        if not f.init or f.name in owned:
            continue
        if f.name in recipe_defaults:
            default = recipe_defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        spec = (
            field(default_factory=lambda v=default: copy.deepcopy(v))
            if isinstance(default, (list, dict, set))
            else field(default=default)
        )
        spec.metadata = f.metadata  # help texts of the trainer config
        fields.append((f.name, _parsable_type(SedRectifyConfig, f.name, hints[f.name]), spec))
    cls = dataclasses.make_dataclass("TrainingSettings", fields)
    cls.__module__ = __name__
    cls.__doc__ = "Trainer fields settable for every training stage (see the module docstring)."
    return cls


def _parsable_type(cls, name, hint):
    """A field typed ``Any`` (``report_to`` in SerSlmSFTConfig) takes a base class' type, which
    argparse can parse."""
    if hint is not Any:
        return hint
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base) and name in getattr(base, "__dataclass_fields__", {}):
            base_hint = typing.get_type_hints(base).get(name, Any)
            if base_hint is not Any:
                return base_hint
    return str


_TRAINING_SETTINGS = None


def rectify_only_fields() -> frozenset[str]:
    """``SedRectifyConfig`` fields that ``SerSlmSFTConfig`` lacks (meaningful for rectification only)."""
    from .trainers.rectify_config import SedRectifyConfig
    from .trainers.sft import SerSlmSFTConfig

    return frozenset(f.name for f in dataclasses.fields(SedRectifyConfig)) - {
        f.name for f in dataclasses.fields(SerSlmSFTConfig)
    }


def training_settings_class():
    global _TRAINING_SETTINGS
    if _TRAINING_SETTINGS is None:
        _TRAINING_SETTINGS = _training_settings_class()
    return _TRAINING_SETTINGS


def explicit_training_settings(settings) -> dict[str, Any]:
    """The fields of a ``TrainingSettings`` the user set: those that differ from their default
    both as declared and as the parser renders it (argparse turns some defaults, e.g. ``debug=""``,
    into equivalent values)."""
    if settings is None:
        return {}
    parsed = _parsed_defaults(type(settings))
    out = {}
    for f in dataclasses.fields(settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(settings, f.name)
        if value != default and value != getattr(parsed, f.name):
            out[f.name] = value
    return out


_PARSED_DEFAULTS: dict = {}


def _parsed_defaults(cls):
    if cls not in _PARSED_DEFAULTS:
        from transformers import HfArgumentParser

        _PARSED_DEFAULTS[cls] = HfArgumentParser(cls).parse_args_into_dataclasses(args=[])[0]
    return _PARSED_DEFAULTS[cls]


def _json_setting(name: str, value):
    """A dict setting given as a YAML mapping or (command line) a JSON object."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"--{name}: not a JSON object ({exc}); e.g. --{name} '{{\"gradient_accumulation_steps\": 4}}'"
            ) from exc
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping, got {type(value).__name__}")
    return dict(value)


@dataclass
class RecipeConfig:
    system: str = field(
        default="sys10", metadata={"help": "Which system of the paper's Table 1 (sys1..sys13) or Table 3 (v1..v5)."}
    )
    output_dir: str = field(
        default="outputs",
        metadata={
            "help": "Root of all outputs: cached stages under <output_dir>/cache, this system's results under <output_dir>/<system>-seed<seed>."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the training stages (initialisation, data order, policy sampling)."}
    )
    corpus_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the synthetic corpus (fixed across training seeds, so that seeds compare on the same data)."
        },
    )
    # ---- data
    pretrain_corpus: str = field(
        default="synthetic",
        metadata={
            "help": "Corpus for SER-SLM pre-training and CEM training (reliable labels): 'synthetic' or 'speechcraft'."
        },
    )
    pretrain_root: str | None = field(
        default=None,
        metadata={"help": "Root of the pre-training corpus; None with 'synthetic' synthesises it under the cache."},
    )
    pretrain_split: str = field(
        default="reference",
        metadata={"help": "Split of the pre-training corpus used for pre-training and CEM training."},
    )
    target_corpus: str = field(
        default="synthetic",
        metadata={
            "help": "Target emotion corpus for domain post-training and testing: 'synthetic', 'iemocap', 'meld' or 'audiofolder'."
        },
    )
    target_root: str | None = field(
        default=None, metadata={"help": "Root of the target corpus; None with 'synthetic' uses the synthesised corpus."}
    )
    target_options: dict | str | None = field(
        default_factory=dict,
        metadata={
            "help": 'Extra load_corpus options for the target corpus (a YAML mapping, or JSON on the command line: \'{"protocol": "session5"}\').'
        },
    )
    train_split: str = field(default="train", metadata={"help": "Target split used for post-training."})
    test_split: str = field(default="test", metadata={"help": "Target split used for evaluation."})
    synth_size: str = field(default="default", metadata={"help": "Size of the synthetic corpus: 'small' or 'default'."})
    annotation_method: str = field(
        default="unified",
        metadata={
            "help": "Automatic SED annotation of the target corpus: 'speechcraft', 'unified' or 'speaker_adaptive'."
        },
    )
    annotation_calibrate: bool = field(
        default=True,
        metadata={
            "help": "Calibrate the unified thresholds (pitch per gender) / speaker-adaptive cut points once on the pre-training split's labels, as a released tool is calibrated on its population, when the annotated corpus has that split (the embedded default); otherwise the tool's fixed defaults."
        },
    )
    pretrain_sed_source: str | None = field(
        default=None,
        metadata={
            "help": "Descriptor labels of pre-training and CEM training: 'auto' (the annotation tool's labels of the pre-training split, as SpeechCraft's come from its tool; needs that split in the annotated corpus) or 'truth' (the corpus' own label columns, e.g. SpeechCraft's shipped labels). None: 'auto' when the pre-training split is part of the annotated corpus (the embedded default), else 'truth'."
        },
    )
    pretrain_eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the pre-training corpus evaluated during pre-training when eval_strategy is not 'no' (None: no evaluation during training)."
        },
    )
    # ---- annotation
    gender_model: str = field(
        default="auto",
        metadata={
            "help": "Gender classifier of the annotation: a Hub id or local folder (audio-classification or audEERING age/gender layout), an OfflineClassifier .json, 'reference' (fitted on the target's reference split) or 'auto' (the reference fit when the target corpus has a labelled reference split, else SpeechCraft's alefiury/wav2vec2-large-xlsr-53-gender-recognition-librispeech)."
        },
    )
    age_model: str = field(
        default="auto",
        metadata={
            "help": "Age classifier of the annotation, as gender_model ('auto' without a reference split: SpeechCraft's audeering/wav2vec2-large-robust-24-ft-age-gender)."
        },
    )
    annotation_batch_size: int = field(default=8, metadata={"help": "Batch size of the Hub gender/age classifiers."})
    annotation_device: str | None = field(
        default=None,
        metadata={
            "help": "Device of the Hub gender/age classifiers (e.g. 'cuda:0', 'cpu'); None: the process' GPU if any, else CPU."
        },
    )
    # ---- model
    preset: str = field(
        default="tiny",
        metadata={
            "help": "SER-SLM preset: 'tiny' (random init, CPU) or 'paper' (HuBERT-large + Llama-3.1-8B-Instruct with LoRA)."
        },
    )
    # ---- pre-training
    pretrain_epochs: float = field(
        default=2.0, metadata={"help": "SER-SLM pre-training epochs (the paper: 2); used when pretrain_max_steps <= 0."}
    )
    pretrain_max_steps: int = field(
        default=2000,
        metadata={
            "help": "If > 0, overrides pretrain_epochs (embedded default: 2000 steps, 8 epochs of the synthetic reference split)."
        },
    )
    pretrain_learning_rate: float = field(
        default=2e-3, metadata={"help": "AdamW learning rate for pre-training (tiny preset default)."}
    )
    text_prior_steps: int = field(
        default=300,
        metadata={
            "help": "Tiny preset only: steps of text-only pre-training of the random-init LM on captions whose "
            "descriptors follow the textbook prosody-emotion directions (trustser.text_prior), before SER-SLM "
            "pre-training; the language knowledge the paper's LLM brings. Systems whose captions carry no "
            "descriptors (Sys. 1/2) get none. 0: none."
        },
    )
    per_device_batch_size: int = field(default=8, metadata={"help": "Per-device batch size of SER-SLM training."})
    kl_warmup_steps: int = field(
        default=100,
        metadata={
            "help": "Steps over which the VIB KL weight ramps up from 0 (keeps the bottleneck from collapsing before the LM reads the audio)."
        },
    )
    f0_stream: bool = field(
        default=True, metadata={"help": "Tiny preset: feed the SED branch a Praat F0 stream besides the energy stream."}
    )
    aux_sed_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Tiny preset: weight of the auxiliary descriptor-classification loss on the SED branch during pre-training (a random-init encoder needs it to learn from the audio in minutes; 0 = off)."
        },
    )
    aux_ctc_loss_weight: float = field(
        default=0.3,
        metadata={
            "help": "Tiny preset: weight of the auxiliary transcript CTC loss on the semantic branch during pre-training (0 = off)."
        },
    )
    channel_augmentation: float = field(
        default=0.8,
        metadata={
            "help": "Pre-training: probability that a reference utterance passes through a random recording channel (band-pass + noise floor, level kept), so the SLM transfers to the target corpus' channel; 0 = off."
        },
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up ratio of the SLM's learning-rate schedule."})
    # ---- CEM and selection
    cem_max_steps: int = field(default=400, metadata={"help": "CEM training steps."})
    cem_max_samples: int | None = field(
        default=1500,
        metadata={"help": "Reference utterances the pre-trained SLM captions for CEM training data (None: all)."},
    )
    cem_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the CEM."})
    cem_training_captions: str = field(
        default="perturbed",
        metadata={
            "help": "CEM training captions: 'perturbed' (reliable captions with descriptors replaced at random, matched to scoring annotated captions; our default) or 'predicted' (the SLM's own predictions, as the paper)."
        },
    )
    cem_corrupt_prob: float = field(
        default=0.3, metadata={"help": "With 'perturbed': probability that each descriptor is replaced."}
    )
    cem_pooling: str = field(default="sed_tokens", metadata={"help": "CEM input pooling: 'sed_tokens' or 'mean'."})
    cem_holdout_speakers: int = field(
        default=0,
        metadata={
            "help": "Speakers of the pre-training split (chosen from the seed, spread over the speaker groups) removed from the SLM's pre-training and used only for CEM training, so that the CEM learns from SLM states of voices the SLM never trained on, as on the target (0: the CEM reads the pre-training utterances, as the paper)."
        },
    )
    cem_captions_per_utterance: int = field(
        default=1,
        metadata={
            "help": "With 'perturbed' captions: independently perturbed captions per CEM training utterance (> 1: plus the unperturbed caption), so a few hundred utterances give thousands of (caption, right/wrong) pairs."
        },
    )
    cem_perturbation: str = field(
        default="random",
        metadata={
            "help": "With 'perturbed' captions, how a descriptor is perturbed: 'random' (any other value), 'adjacent' (one step: low<->normal<->high, slow<->normal<->fast, a neighbouring age, the other gender; the annotator's error near a threshold) or 'speaker' (a one-step shift drawn once per speaker and field, applied to all of that speaker's utterances, as a threshold miscalibrated for a voice errs)."
        },
    )
    cem_balance: str = field(
        default="utterance",
        metadata={
            "help": "Balancing of the CEM's right/wrong training pairs: 'utterance' (all five right vs not, the paper's counts), 'field' (right and wrong entries balanced per field, the others ignored by the loss) or 'none'."
        },
    )
    cem_quality_split: str | None = field(
        default="dev",
        metadata={
            "help": "Target split that the select stage also scores with the CEM (no selection) and measures against the ground truth, into selection_quality_<split>.json, so that CEM variants are compared on it; skipped when the split is absent or has no ground truth (None: off)."
        },
    )
    selection_ratio: float | None = field(default=None, metadata={"help": "Override the system's kept share (0-1]."})
    # ---- post-training
    posttrain_max_steps: int = field(default=600, metadata={"help": "Domain post-training steps (the paper: 20k)."})
    posttrain_learning_rate: float = field(
        default=5e-4,
        metadata={
            "help": "AdamW learning rate for post-training (all systems; chosen on the synthetic dev split, the real configs set 1e-4)."
        },
    )
    posttrain_aux_losses: bool = field(
        default=True,
        metadata={
            "help": "Tiny preset: post-training also trains the auxiliary descriptor/CTC heads (weighted as in "
            "pre-training) on the descriptors its captions carry: the annotation, the selected rows', the "
            "oracle's or, with rectification, the controller's rectified labels. False: captions only."
        },
    )
    cpu_threads: int = field(
        default=0,
        metadata={
            "help": "Torch threads per process on a machine without an accelerator (0: the cores divided among the processes; `accelerate launch` alone would set 1)."
        },
    )
    annotation_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for annotation feature extraction (None: all cores)."}
    )
    num_policies: int | None = field(
        default=None, metadata={"help": "Override the system's K (policies per utterance)."}
    )
    # ---- trainer fields for one stage (any SedRectifyConfig / SerSlmSFTConfig / TrainingArguments field)
    pretrain_training_args: dict | str | None = field(
        default_factory=dict,
        metadata={
            "help": "Trainer fields for pre-training only (a YAML mapping, or JSON on the command line); they win over the top-level ones and the recipe's."
        },
    )
    cem_training_args: dict | str | None = field(
        default_factory=dict, metadata={"help": "TrainingArguments fields for the CEM's Trainer only."}
    )
    posttrain_training_args: dict | str | None = field(
        default_factory=dict,
        metadata={
            "help": "Trainer fields for post-training only (SedRectifyConfig with rectification, else SerSlmSFTConfig)."
        },
    )
    # ---- set by the parser from the other two dataclasses (recipe.main); not command-line options
    model_args: Any = field(
        default=None,
        metadata={"help": "SerSlmModelArguments (set from the model settings; a YAML mapping also works)."},
    )
    training_args: Any = field(
        default=None, metadata={"help": "TrainingSettings (set from the top-level trainer fields)."}
    )
    # ---- interruption
    save_steps: int = field(
        default=0,
        metadata={
            "help": "Checkpoint the training stages (pre- and post-training) every N optimizer steps inside their unfinished stage folder (0: no checkpoints; the last two are kept). Does not change the stage keys or the results."
        },
    )
    resume_from_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume an interrupted training stage from the newest complete checkpoint in its unfinished stage folder (needs save_steps > 0 in the interrupted run), instead of starting it over."
        },
    )
    # ---- evaluation
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of caption generation at evaluation."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many test utterances."}
    )
    tsne_samples: int = field(default=600, metadata={"help": "Utterances in the t-SNE plot of last hidden states."})

    def __post_init__(self):
        self.target_options = _json_setting("target_options", self.target_options)
        for name in ("pretrain_training_args", "cem_training_args", "posttrain_training_args"):
            setattr(self, name, _json_setting(name, getattr(self, name)))
        if self.model_args is None or isinstance(self.model_args, dict):
            self.model_args = SerSlmModelArguments(**(self.model_args or {}))
        if self.training_args is None or isinstance(self.training_args, dict):
            self.training_args = training_settings_class()(**(self.training_args or {}))
        _check_stage_fields(self)
        _check_cem_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """The settings as results.json records them: the recipe's fields, the model settings and
        the trainer fields that were set and the controller's (``RECTIFY_DEFAULTS``; secrets left out)."""
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("model_args", "training_args")
        }
        out["model_args"] = dataclasses.asdict(self.model_args)
        explicit = explicit_training_settings(self.training_args)
        out["training_args"] = {
            k: v
            for k, v in {**{k: getattr(self.training_args, k) for k in RECTIFY_DEFAULTS}, **explicit}.items()
            if k not in SECRET_FIELDS
        }
        for name in ("pretrain_training_args", "cem_training_args", "posttrain_training_args"):
            out[name] = {k: v for k, v in out[name].items() if k not in SECRET_FIELDS}
        return out

    def stage_training_args(self, stage: str, rectify: bool = False) -> dict[str, Any]:
        """Trainer fields for ``stage`` ('pretrain', 'posttrain' or 'cem'): the recipe's defaults
        (SER-SLM stages only; ``RECTIFY_DEFAULTS`` too for a rectifying post-training), then the
        top-level settings that were set, then the stage's own. Top-level rectification fields
        (``controller_*``, ``reward_scorer``, ...) reach only a rectifying
        post-training (``rectify``), not pre-training or plain SFT (nor their keys)."""
        explicit = explicit_training_settings(self.training_args)
        if stage == "posttrain" and rectify:
            explicit = {**RECTIFY_DEFAULTS, **explicit}
        else:
            explicit = {k: v for k, v in explicit.items() if k not in rectify_only_fields()}
        own = getattr(self, f"{stage}_training_args")
        if stage == "cem":
            from transformers import TrainingArguments

            allowed = {f.name for f in dataclasses.fields(TrainingArguments)} - SLM_ONLY
            return {**{k: v for k, v in explicit.items() if k in allowed}, **own}
        return {**TRAINING_DEFAULTS, **explicit, **own}

    def stage_training_key(self, stage: str, rectify: bool = False) -> dict[str, Any]:
        """The part of ``stage_training_args`` that changes results (the stage's cache key): what
        differs from ``TRAINING_DEFAULTS`` (so the key is empty when nothing else is set), and for a
        rectifying post-training every controller setting of ``RECTIFY_DEFAULTS`` as it resolved."""
        args = self.stage_training_args(stage, rectify)
        base = {} if stage == "cem" else TRAINING_DEFAULTS
        return {k: v for k, v in sorted(args.items()) if k not in NOT_IN_STAGE_KEY and not (k in base and base[k] == v)}


def _check_stage_fields(cfg: RecipeConfig) -> None:
    """Unknown trainer fields in a stage's overrides are an error naming the setting."""
    from transformers import TrainingArguments

    from .trainers.rectify_config import SedRectifyConfig
    from .trainers.sft import SerSlmSFTConfig

    for name, cls in (
        ("pretrain_training_args", SerSlmSFTConfig),
        ("posttrain_training_args", SedRectifyConfig),
        ("cem_training_args", TrainingArguments),
    ):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(getattr(cfg, name)) - known)
        if unknown:
            raise ValueError(
                f"{name}: {unknown} {'is not a' if len(unknown) == 1 else 'are not'} {cls.__name__} field"
                f"{'' if len(unknown) == 1 else 's'}; see `python recipes/sys10.py --help` for the fields"
            )


def _check_cem_fields(cfg: RecipeConfig) -> None:
    """The CEM training options named in the error, at configuration time (not after pre-training)."""
    from .trainers.cem import BALANCE_MODES, PERTURBATIONS, TRAINING_CAPTIONS

    for name, allowed in (
        ("cem_training_captions", TRAINING_CAPTIONS),
        ("cem_perturbation", PERTURBATIONS),
        ("cem_balance", BALANCE_MODES),
    ):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: choose one of {allowed}")
    if cfg.cem_holdout_speakers < 0 or cfg.cem_captions_per_utterance < 1:
        raise ValueError(
            f"cem_holdout_speakers must be >= 0 and cem_captions_per_utterance >= 1, got "
            f"{cfg.cem_holdout_speakers} and {cfg.cem_captions_per_utterance}"
        )
    if cfg.cem_training_captions == "predicted" and (
        cfg.cem_captions_per_utterance != 1 or cfg.cem_perturbation != "random"
    ):
        raise ValueError(
            "cem_captions_per_utterance and cem_perturbation apply to cem_training_captions='perturbed' only "
            "('predicted' is the SLM's one greedy caption per utterance)"
        )
