"""Settings of a system run (one recipe), parsed by ``trl.TrlParser`` from a YAML file
(``--config``) and the command line. The defaults are the embedded default: the synthetic corpus
and the tiny preset, sized to finish on 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RecipeConfig:
    system: str = field(default="sys10", metadata={"help": "Which system of the paper's Table 1 (sys1..sys13) or Table 3 (v1..v5)."})
    output_dir: str = field(default="outputs", metadata={"help": "Root of all outputs: cached stages under <output_dir>/cache, this system's results under <output_dir>/<system>-seed<seed>."})
    seed: int = field(default=0, metadata={"help": "Seed of the training stages (initialisation, data order, policy sampling)."})
    corpus_seed: int = field(default=0, metadata={"help": "Seed of the synthetic corpus (fixed across training seeds, so that seeds compare on the same data)."})
    # ---- data
    pretrain_corpus: str = field(default="synthetic", metadata={"help": "Corpus for SER-SLM pre-training and CEM training (reliable labels): 'synthetic' or 'speechcraft'."})
    pretrain_root: str | None = field(default=None, metadata={"help": "Root of the pre-training corpus; None with 'synthetic' synthesises it under the cache."})
    pretrain_split: str = field(default="reference", metadata={"help": "Split of the pre-training corpus used for pre-training and CEM training."})
    target_corpus: str = field(default="synthetic", metadata={"help": "Target emotion corpus for domain post-training and testing: 'synthetic', 'iemocap', 'meld' or 'audiofolder'."})
    target_root: str | None = field(default=None, metadata={"help": "Root of the target corpus; None with 'synthetic' uses the synthesised corpus."})
    target_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra load_corpus options for the target corpus (e.g. {'protocol': 'session5'})."})
    train_split: str = field(default="train", metadata={"help": "Target split used for post-training."})
    test_split: str = field(default="test", metadata={"help": "Target split used for evaluation."})
    synth_size: str = field(default="default", metadata={"help": "Size of the synthetic corpus: 'small' or 'default'."})
    annotation_method: str = field(default="unified", metadata={"help": "Automatic SED annotation of the target corpus: 'speechcraft', 'unified' or 'speaker_adaptive'."})
    annotation_calibrate: bool = field(default=True, metadata={"help": "Calibrate the unified thresholds (pitch per gender) / speaker-adaptive cut points once on the pre-training split's labels, as a released tool is calibrated on its population, when the annotated corpus has that split (the embedded default); otherwise the tool's fixed defaults."})
    pretrain_sed_source: str | None = field(default=None, metadata={"help": "Descriptor labels of pre-training and CEM training: 'auto' (the annotation tool's labels of the pre-training split, as SpeechCraft's come from its tool; needs that split in the annotated corpus) or 'truth' (the corpus' own label columns, e.g. SpeechCraft's shipped labels). None: 'auto' when the pre-training split is part of the annotated corpus (the embedded default), else 'truth'."})
    # ---- model
    preset: str = field(default="tiny", metadata={"help": "SER-SLM preset: 'tiny' (random init, CPU) or 'paper' (HuBERT-large + Llama-3.1-8B-Instruct with LoRA)."})
    # ---- pre-training
    pretrain_epochs: float = field(default=2.0, metadata={"help": "SER-SLM pre-training epochs (the paper: 2); used when pretrain_max_steps <= 0."})
    pretrain_max_steps: int = field(default=2000, metadata={"help": "If > 0, overrides pretrain_epochs (embedded default: 2000 steps, 8 epochs of the synthetic reference split)."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate for pre-training (tiny preset default)."})
    per_device_batch_size: int = field(default=8, metadata={"help": "Per-device batch size of SER-SLM training."})
    kl_warmup_steps: int = field(default=100, metadata={"help": "Steps over which the VIB KL weight ramps up from 0 (keeps the bottleneck from collapsing before the LM reads the audio)."})
    f0_stream: bool = field(default=True, metadata={"help": "Tiny preset: feed the SED branch a Praat F0 stream besides the energy stream."})
    aux_sed_loss_weight: float = field(default=1.0, metadata={"help": "Tiny preset: weight of the auxiliary descriptor-classification loss on the SED branch during pre-training (a random-init encoder needs it to learn from the audio in minutes; 0 = off)."})
    aux_ctc_loss_weight: float = field(default=0.3, metadata={"help": "Tiny preset: weight of the auxiliary transcript CTC loss on the semantic branch during pre-training (0 = off)."})
    channel_augmentation: float = field(default=0.8, metadata={"help": "Pre-training: probability that a reference utterance passes through a random recording channel (band-pass + noise floor, level kept), so the SLM transfers to the target corpus' channel; 0 = off."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up ratio of the SLM's learning-rate schedule."})
    # ---- CEM and selection
    cem_max_steps: int = field(default=400, metadata={"help": "CEM training steps."})
    cem_max_samples: int | None = field(default=1500, metadata={"help": "Reference utterances the pre-trained SLM captions for CEM training data (None: all)."})
    cem_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the CEM."})
    cem_training_captions: str = field(default="perturbed", metadata={"help": "CEM training captions: 'perturbed' (reliable captions with descriptors replaced at random, matched to scoring annotated captions; our default) or 'predicted' (the SLM's own predictions, as the paper)."})
    cem_corrupt_prob: float = field(default=0.3, metadata={"help": "With 'perturbed': probability that each descriptor is replaced."})
    cem_pooling: str = field(default="sed_tokens", metadata={"help": "CEM input pooling: 'sed_tokens' or 'mean'."})
    selection_ratio: float | None = field(default=None, metadata={"help": "Override the system's kept share (0-1]."})
    # ---- post-training
    posttrain_max_steps: int = field(default=200, metadata={"help": "Domain post-training steps (the paper: 20k)."})
    posttrain_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate for post-training (all systems; chosen on the synthetic dev split, the real configs set 1e-4)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loader worker processes of the training stages: per-utterance decoding, resampling and Praat F0 run there instead of on the training process (batches identical to 0 workers)."})
    cpu_threads: int = field(default=0, metadata={"help": "Torch threads per process on a machine without an accelerator (0: the cores divided among the processes; `accelerate launch` alone would set 1)."})
    annotation_num_proc: int | None = field(default=None, metadata={"help": "Processes for annotation feature extraction (None: all cores)."})
    num_policies: int | None = field(default=None, metadata={"help": "Override the system's K (policies per utterance)."})
    controller_learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of the SED controller (the real configs: 1e-3)."})
    controller_updates_per_step: int = field(default=4, metadata={"help": "Controller optimisation epochs per SLM step on the same policies."})
    controller_scale_rewards: str = field(default="none", metadata={"help": "Advantage scaling: 'group' (divide by the std of the K rewards, the paper's GRPO normalisation), 'batch' or 'none' (r - group mean; see docs/rectify.md for why the embedded default uses it)."})
    controller_entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus on the controller's retain/modify distributions (keeps it exploring)."})
    controller_head_hidden_size: int = field(default=64, metadata={"help": "Controller head: 0 = one Linear layer (the paper's), > 0 = a tanh hidden layer of this size first."})
    reward_timing: str = field(default="after_update", metadata={"help": "'after_update' (reward from the updated SLM, the paper) or 'reuse_forward' (from the loss forward)."})
    # ---- interruption
    save_steps: int = field(default=0, metadata={"help": "Checkpoint the training stages (pre- and post-training) every N optimizer steps inside their unfinished stage folder (0: no checkpoints; the last two are kept). Does not change the stage keys or the results."})
    resume_from_checkpoint: bool = field(default=False, metadata={"help": "Resume an interrupted training stage from the newest complete checkpoint in its unfinished stage folder (needs save_steps > 0 in the interrupted run), instead of starting it over."})
    # ---- evaluation
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of caption generation at evaluation."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many test utterances."})
    tsne_samples: int = field(default=600, metadata={"help": "Utterances in the t-SNE plot of last hidden states."})
