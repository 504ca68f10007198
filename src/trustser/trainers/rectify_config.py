"""Configuration of SED rectification training (paper section 3.2): SerSlmSFTConfig plus the
controller's settings, as TRL does for its trainers (every field documented in ``metadata``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.sed_controller.configuration_sed_controller import checked_rectify_fields
from .rectify_objective import ADVANTAGES
from .sft import SerSlmSFTConfig

REWARD_TIMINGS = ("after_update", "reuse_forward")
REWARD_SCORERS = ("policy", "frozen", "ema")
SLM_TARGETS = ("samples", "argmax")
CONTROLLER_INPUTS = ("log_mel", "sed_branch", "none")
CONTROLLER_FITS = ("online", "table")
# K, the rectification policies sampled per utterance (the paper's best): the one default of the
# trainer, the systems (trustser.systems) and finetune
DEFAULT_NUM_POLICIES = 6


@dataclass
class SedRectifyConfig(SerSlmSFTConfig):
    """Alternating SER-SLM / SED Controller training with K sampled rectification policies."""

    sed_source: str = field(
        default="auto",
        metadata={"help": "descriptors the controller rectifies: 'auto' (<field>_auto annotation columns) or 'truth'."},
    )
    num_policies: int = field(
        default=DEFAULT_NUM_POLICIES,
        metadata={"help": "K: rectification policies sampled per utterance and step (paper's best: 6)."},
    )
    reward_timing: str = field(
        default="after_update",
        metadata={
            "help": "'after_update' (the paper): each policy's emotion cross-entropy is computed with the SER-SLM "
            "after its optimizer step (one extra no-grad forward); 'reuse_forward': taken from the logits of the "
            "loss forward, before the update (no extra forward)."
        },
    )
    shared_prefix: bool = field(
        default=True,
        metadata={
            "help": "pack each utterance's K rectified captions behind one copy of its audio + prompt prefix (one LLM "
            "row with a block attention mask and positions restarting after the prefix: P + K*S tokens instead of "
            "K*(P + S)); needs the 'sdpa' or 'eager' attention implementation, otherwise K full rows with a warning."
        },
    )
    controller_name_or_path: str | None = field(
        default=None,
        metadata={"help": "saved SedControllerModel to start from; default: a new one built from the fields below."},
    )
    controller_hidden_size: int = field(
        default=128, metadata={"help": "LSTM hidden size of a new controller (paper: 128)."}
    )
    controller_embedding_size: int = field(
        default=32, metadata={"help": "SED token embedding size of a new controller (paper: 32)."}
    )
    controller_n_mels: int = field(default=64, metadata={"help": "mel bands the controller's LSTM reads."})
    controller_frame_stride: int = field(
        default=1, metadata={"help": "mel frames averaged into one LSTM step (1 = every 10 ms frame)."}
    )
    controller_modify_strategy: str = field(
        default="adjacent",
        metadata={"help": "'adjacent' (neighbouring ordinal value; the other gender) or 'uniform' (any other value)."},
    )
    controller_initial_retain_bias: float = field(
        default=2.0, metadata={"help": "initial retain-over-modify logit margin of a new controller (P(modify)~0.12)."}
    )
    controller_head_hidden_size: int = field(
        default=0,
        metadata={
            "help": "a new controller's head: 0 = one Linear layer (the paper's), > 0 = a tanh hidden layer of this size first."
        },
    )
    controller_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the controller."})
    controller_clip_epsilon: float = field(
        default=0.2, metadata={"help": "clip range of the new/old probability ratio (PPO/GRPO surrogate)."}
    )
    controller_updates_per_step: int = field(
        default=1,
        metadata={
            "help": "controller optimisation epochs per SLM optimizer step on the same policies (ratio != 1 from the 2nd)."
        },
    )
    controller_entropy_coef: float = field(
        default=0.0, metadata={"help": "weight of the entropy bonus on the retain/modify distributions."}
    )
    controller_scale_rewards: str = field(
        default="group",
        metadata={
            "help": "advantage scaling, as TRL's GRPOConfig.scale_rewards: 'group' ((r - mean) / std within the K "
            "policies, the paper's normalisation), 'batch' (divide by the std of the step's rewards) or 'none' "
            "(r - mean only, Dr. GRPO)."
        },
    )
    controller_max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "gradient-norm clip of the controller update (None: no clipping)."}
    )
    controller_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "optimizer steps during which the controller always retains and is not updated (K=1 captions)."
        },
    )

    # ---- options that make the reward trustworthy (docs/rectify.md, "Options"); defaults = the paper
    reward_scorer: str = field(
        default="policy",
        metadata={
            "help": "which SER-SLM scores the rectified captions (the reward): 'policy' (the SLM being trained, the "
            "paper), 'frozen' (a copy of the SLM as post-training starts, never updated) or 'ema' (an exponential "
            "moving average of the SLM's weights, decay reward_ema_decay). 'frozen'/'ema' keep a second copy of the "
            "SLM on the same device, outside the optimizer, and need reward_timing='after_update'."
        },
    )
    reward_ema_decay: float = field(
        default=0.99,
        metadata={
            "help": "with reward_scorer='ema': after each optimizer step, scorer = decay x scorer + (1 - decay) x SLM."
        },
    )
    advantage: str = field(
        default="group",
        metadata={
            "help": "credit assignment: 'group' (one advantage per policy shared by its five decisions, the paper), "
            "'per_field' (field f of a policy is credited with its reward minus the mean reward of the group's other "
            "policies that made the same choices on the four other fields; scaled as controller_scale_rewards) or "
            "'single_field' (no sampled credit: after each step the scorer rewards the annotated caption and every "
            "modification of one field alone, to each adjacent value, so each field's gain is measured without the "
            "other fields' changes or sampling noise; the controller is fitted by cross-entropy to the "
            "entropy-regularised best response sigmoid((gain - modify_cost) / controller_entropy_coef), "
            "controller_scale_rewards and controller_clip_epsilon unused. The SLM still trains on the K samples. "
            "Needs reward_timing='after_update' and the 'adjacent' modify strategy; 1 + 2 x len(rectify_fields) "
            "scored captions per utterance)."
        },
    )
    controller_fit: str = field(
        default="online",
        metadata={
            "help": "when the controller learns: 'online' (after every SLM step, from that step's rewards: the "
            "paper) or 'table' (with reward_scorer='frozen' and advantage='single_field' each utterance's "
            "single-field gains never change, so before the first step the frozen scorer measures them once over "
            "the whole training set and the controller is fitted to them full-batch, early-stopped on a held-out "
            "fifth of the utterances (at most controller_table_max_iterations updates); it is then kept fixed and "
            "nothing is scored during training: one scoring pass instead of one per step, and a fit to every "
            "utterance's gain instead of a running one to 8 at a time)."
        },
    )
    controller_table_max_iterations: int = field(
        default=1000,
        metadata={
            "help": "with controller_fit='table': the most full-batch controller updates (Adam, "
            "controller_learning_rate); the fit stops earlier when the held-out loss has not improved "
            "for 100 updates, and keeps the best held-out state."
        },
    )
    retain_kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "weight of KL(controller || its initial policy), the initial policy being retain-heavy "
            "(controller_initial_retain_bias): a penalty toward 'retain' (0 = off, the paper)."
        },
    )
    modify_cost: float = field(
        default=0.0,
        metadata={
            "help": "reward cost, in nats of emotion cross-entropy, of each field a policy modifies: a change must pay "
            "for itself. The emotion reward of a modification that does not matter to the emotion is ~0 on average "
            "whether the label was right or wrong (gender and age on the embedded benchmark; "
            "benchmarks/reward_signal.py), so without a cost the controller drifts into flipping whole fields "
            "(0 = off, the paper)."
        },
    )
    frozen_slm_steps: int = field(
        default=0,
        metadata={
            "help": "optimizer steps (after controller_warmup_steps) during which the controller trains against a "
            "frozen SER-SLM: the SLM's loss is not applied (no gradient, its weights unchanged; its learning-rate "
            "schedule runs on) and the rewards come from one no-grad forward; afterwards the SLM trains on the "
            "rectified captions (0 = off, the paper)."
        },
    )
    slm_targets: str = field(
        default="samples",
        metadata={
            "help": "captions the SER-SLM trains on: 'samples' (the K sampled rectifications, the paper) or 'argmax' "
            "(the controller's most probable rectification, one caption per utterance; the K samples still give the "
            "controller its rewards, so it needs reward_timing='after_update')."
        },
    )
    controller_audio_norm: bool = field(
        default=False,
        metadata={
            "help": "a new controller normalises its input per utterance (each mel band, or each SED-branch feature "
            "with controller_input='sed_branch', to zero mean and unit variance over the utterance's valid frames) "
            "before the LSTM (False = the raw log-mel, the paper)."
        },
    )
    controller_input: str = field(
        default="log_mel",
        metadata={
            "help": "what the controller's LSTM reads: 'log_mel' (the utterance's log-mel spectrogram, the paper) or "
            "'sed_branch' (the SER-SLM's SED-branch features of the same utterance: the SED VIB branch's "
            "deterministic mean mu, the eval-mode z_sed, never a sample; computed by the SLM being trained under "
            "torch.no_grad() in eval mode and detached, so no controller gradient reaches the SLM; with the audio "
            "tokens' mask, sed_vib_dim wide). A new controller is then built with input_size = the SLM's "
            "sed_vib_dim; controller_audio_norm and controller_frame_stride apply to whichever features it reads. "
            "Measured once on dev, with the frozen scorer and per-field credit: no per-utterance repair (docs/rectify.md). "
            "'none': the controller reads no audio, only the annotated labels and, with controller_speaker_context, "
            "the speaker-relative prosody (SedControllerConfig.reads_audio=False): a per-utterance audio summary "
            "lets the head fit each utterance's reward noise instead of a rule (benchmarks/controller_bandit.py)."
        },
    )
    rectify_fields: list[str] | None = field(
        default=None,
        metadata={
            "help": "the SED fields the controller may modify (SedControllerConfig.rectify_fields); the others are "
            "always retained: never sampled as 'modify', never costed, no gradient. A field belongs here when "
            "modifying its label costs emotion reward on average: then the reward can tell a repair from a "
            "corruption (benchmarks/reward_signal.py measures it without ground truth, on the training split). "
            "On the embedded benchmark modifying gender or age is paid, not penalised, and the controller "
            "flips those fields whole (docs/rectify.md). None = all five (the paper)."
        },
    )
    controller_speaker_context: bool = field(
        default=False,
        metadata={
            "help": "the controller also reads, per utterance, its speaker-relative prosody: the z-scores of log "
            "f0_median, rms_db and phonemes_per_second within the utterance's speaker over the training dataset "
            "(0 where a value is missing, the speaker is empty or has fewer than 2 usable values), which one "
            "utterance's audio cannot show while the annotation's errors come from absolute thresholds. Computed "
            "once at init (column 'speaker_context'); needs the 'speaker' column and the three measurement columns "
            "of the annotated datasets; a new controller is built with context_size=3 (False = the paper)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_policies < 1:
            raise ValueError(f"num_policies must be >= 1, got {self.num_policies}")
        if self.reward_timing not in REWARD_TIMINGS:
            raise ValueError(f"reward_timing must be one of {REWARD_TIMINGS}, got {self.reward_timing!r}")
        if self.controller_modify_strategy not in ("adjacent", "uniform"):
            raise ValueError(
                f"controller_modify_strategy must be 'adjacent' or 'uniform', got {self.controller_modify_strategy!r}"
            )
        if self.controller_scale_rewards not in ("group", "batch", "none"):
            raise ValueError(
                f"controller_scale_rewards must be 'group', 'batch' or 'none', got {self.controller_scale_rewards!r}"
            )
        if self.controller_updates_per_step < 1:
            raise ValueError(f"controller_updates_per_step must be >= 1, got {self.controller_updates_per_step}")
        if not 0 < self.controller_clip_epsilon < 1:
            raise ValueError(f"controller_clip_epsilon must be in (0, 1), got {self.controller_clip_epsilon}")
        if self.controller_warmup_steps < 0:
            raise ValueError(f"controller_warmup_steps must be >= 0, got {self.controller_warmup_steps}")
        if self.reward_scorer not in REWARD_SCORERS:
            raise ValueError(f"reward_scorer must be one of {REWARD_SCORERS}, got {self.reward_scorer!r}")
        if not 0 <= self.reward_ema_decay < 1:
            raise ValueError(f"reward_ema_decay must be in [0, 1), got {self.reward_ema_decay}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.retain_kl_coef < 0:
            raise ValueError(f"retain_kl_coef must be >= 0, got {self.retain_kl_coef}")
        if self.modify_cost < 0:
            raise ValueError(f"modify_cost must be >= 0, got {self.modify_cost}")
        if self.frozen_slm_steps < 0:
            raise ValueError(f"frozen_slm_steps must be >= 0, got {self.frozen_slm_steps}")
        if self.advantage == "single_field" and self.reward_timing != "after_update":
            raise ValueError(
                "advantage='single_field' needs reward_timing='after_update': its rewards are of captions the SLM "
                f"did not train on in the step (got reward_timing={self.reward_timing!r})"
            )
        if self.advantage == "single_field" and self.controller_modify_strategy != "adjacent":
            raise ValueError(
                "advantage='single_field' scores each field's adjacent values; it needs "
                f"controller_modify_strategy='adjacent', got {self.controller_modify_strategy!r}"
            )
        if self.controller_fit not in CONTROLLER_FITS:
            raise ValueError(f"controller_fit must be one of {CONTROLLER_FITS}, got {self.controller_fit!r}")
        if self.controller_table_max_iterations < 1:
            raise ValueError(
                f"controller_table_max_iterations must be >= 1, got {self.controller_table_max_iterations}"
            )
        if self.controller_fit == "table":
            for name, value, needs in (
                ("advantage", self.advantage, "single_field"),
                ("reward_scorer", self.reward_scorer, "frozen"),
                ("frozen_slm_steps", self.frozen_slm_steps, 0),
            ):
                if value != needs:
                    raise ValueError(
                        f"controller_fit='table' fits the controller once to gains that never change: it needs "
                        f"{name}={needs!r}, got {value!r} (controller_fit='online' learns after every step)"
                    )
        if self.slm_targets not in SLM_TARGETS:
            raise ValueError(f"slm_targets must be one of {SLM_TARGETS}, got {self.slm_targets!r}")
        self.rectify_fields = checked_rectify_fields(self.rectify_fields)
        if self.controller_input not in CONTROLLER_INPUTS:
            raise ValueError(f"controller_input must be one of {CONTROLLER_INPUTS}, got {self.controller_input!r}")
        for name, value, needs in (
            ("reward_scorer", self.reward_scorer, "policy"),
            ("slm_targets", self.slm_targets, "samples"),
        ):
            if value != needs and self.reward_timing != "after_update":
                raise ValueError(
                    f"{name}={value!r} needs reward_timing='after_update': the rewards are not the logits "
                    f"of the SLM's loss forward (got reward_timing={self.reward_timing!r})"
                )
        if not self.with_sed:
            raise ValueError("SED rectification needs captions with descriptors (with_sed=True)")


# the names before the naming convention (docs/ARCHITECTURE.md), kept for existing imports
SEDRectifyConfig = SedRectifyConfig

__all__ = [
    "SedRectifyConfig",
    "DEFAULT_NUM_POLICIES",
    "REWARD_TIMINGS",
    "REWARD_SCORERS",
    "SLM_TARGETS",
    "CONTROLLER_INPUTS",
    "CONTROLLER_FITS",
]
