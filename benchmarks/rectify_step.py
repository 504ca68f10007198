"""Step cost of SED rectification on tiny SER-SLMs, per shape, in one run:

* ``sft``: a plain SerSlmSFTTrainer step (one caption per utterance);
* ``naive``: K independent full passes (processor + encoder + LLM forward/backward per policy, and
  K full reward forwards after the update) -- kept here only, as the reference to beat;
* ``trainer``: today's SedRectifyTrainer path (``shared_prefix=False``: encoder once, the K*B
  captions as K*B full rows in one LLM batch, logits only over the caption);
* ``packed``: SedRectifyTrainer with ``shared_prefix=True`` (each utterance's audio + prompt prefix
  once, its K captions packed behind it in one row);
  both rectification arms with ``reward_timing`` after_update (the paper) and reuse_forward;
* the shared-prefix bound (P + K*S) / (P + S): the LLM token work of a shared prefix relative to
  one caption per utterance (P, S = prompt / caption tokens per utterance, mean of the ratio).

Shapes: ``today`` (the tiny preset, 2-4 s utterances: P ~ 1.3 S) and the paper's proportions,
``paper`` (5 s utterances, 50 audio tokens/s as HuBERT's frame rate: P >= 4 S) and ``paper_wide``
(the same with a wider, deeper LLM, where its dense layers dominate the step as in an 8B LLM).

Per arm: seconds per step (median interval between optimizer steps after ``--warmup`` steps;
process CPU time on CPU, wall time on CUDA; collation, SLM forward/backward, optimizer step,
reward and controller update included) and LLM tokens processed per step (rows x padded length
of every LLM forward of the step, reward forwards included). Targets at the paper's proportions
(CPU): the packed step <= 1.15 x bound x SFT step and <= 0.6 x today's trainer step (checked for
each reward timing; ``targets`` in the JSON). Prints one JSON line; ``--json PATH`` also writes it.

    python benchmarks/rectify_step.py --steps 8 --batch-size 8 --num-policies 6 --threads 1 \\
        --json benchmarks/results/rectify_step.json
    python benchmarks/rectify_step.py --quick        # a tiny check that every arm runs (no figures)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch
from transformers import TrainerCallback

from trustser.descriptors import EMOTION_LABELS, SED_FIELDS, SED_VOCAB
from trustser.models.ser_slm import build_tiny_ser_slm
from trustser.trainers.rectify import SedRectifyTrainer, emotion_cross_entropy
from trustser.trainers.rectify_config import SedRectifyConfig
from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer

SENTENCES = [
    "I cannot believe you did that again",
    "the meeting starts at nine tomorrow",
    "please pass me the salt",
    "we finally won the championship",
    "nobody told me about the changes",
    "it is raining in the city today",
    "this is the best day of my life",
    "leave me alone right now",
    "my dog passed away last night",
    "the train was late this morning",
    "could you open the window please",
    "I will call you after lunch",
]

# name -> (utterance seconds (low, high), build_tiny_ser_slm overrides)
SHAPES = {
    "today": ((2.0, 4.0), {}),
    "paper": ((5.0, 5.0), {"mel_hop_ms": 10, "frame_downsample": 1}),
    "paper_wide": ((5.0, 5.0), {"mel_hop_ms": 10, "frame_downsample": 1, "lm_hidden": 384, "lm_layers": 4}),
}
PAPER_SHAPES = ("paper", "paper_wide")


class StepMeter(TrainerCallback):
    """Clock and LLM-token count at each optimizer step's end (after the controller phase, whose
    callback is registered first). On CPU the clock is this process' CPU time (all threads): on a
    shared, overloaded machine wall time mostly measures the neighbours."""

    def __init__(self, clock, tokens):
        self.clock, self.tokens = clock, tokens
        self.stamps, self.counts = [], []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(self.clock())
        self.counts.append(self.tokens[0])

    def per_step(self, warmup: int) -> tuple[float, float]:
        seconds = np.diff(self.stamps)[warmup - 1 :]
        tokens = np.diff(self.counts)[warmup - 1 :]
        return float(statistics.median(seconds)), float(np.mean(tokens))


class NaiveRectifyTrainer(SedRectifyTrainer):
    """K independent full passes per step: the processor (feature extraction), the encoder and the
    LLM run once per policy, and the after-update reward repeats all of it."""

    def _policy_inputs(self, inputs, captions, k, j):
        wav = inputs["rectify_waveforms"].cpu()
        audio = [wav[b, : int(n)].numpy() for b, n in enumerate(inputs["rectify_waveform_lengths"].cpu())]
        caps = [captions[b * k + j] for b in range(len(audio))]
        batch = self.processing_class(audio=audio, captions=caps, sampling_rate=16000)
        return {key: v.to(self.accelerator.device) for key, v in batch.items()}

    def _nll(self, model, batch):
        out = model(
            **{
                key: batch[key]
                for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "energy")
            },
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none"
        ).view(target.shape)
        return nll, target != -100, batch["emotion_token_mask"][:, 1:], out

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        k = self.args.num_policies
        sample, captions, feats, fmask = self._sample(inputs, k, force_retain=False)
        total = 0.0
        per_policy = []
        for j in range(k):
            batch = self._policy_inputs(inputs, captions, k, j)
            nll, valid, _, out = self._nll(model, batch)
            loss = nll.sum() / valid.sum() / k
            if out.kl_loss is not None:
                loss = loss + self._unwrapped_config().vib_beta * out.kl_loss / k
            self.accelerator.backward(loss)
            total += float(loss.detach())
            per_policy.append(batch)
        self._pending.append(
            {
                "feats": feats,
                "fmask": fmask,
                "sed_ids": inputs["rectify_sed_ids"],
                "actions": sample.actions,
                "old_log_probs": sample.log_probs,
                "rewards": None,
                "naive": per_policy,
            }
        )
        return torch.tensor(total)

    @torch.no_grad()
    def _rewards_after_update(self, record):
        self.model.eval()
        cols = []
        for batch in record["naive"]:
            nll, _, emo, _ = self._nll(self.model, batch)
            cols.append(-emotion_cross_entropy(nll, emo))
        self.model.train()
        return torch.stack(cols, dim=1)


def make_rows(n: int, seconds: tuple[float, float], seed: int = 0):
    rng = np.random.default_rng(seed)
    emotions = EMOTION_LABELS["synthetic"]
    rows = []
    for i in range(n):
        dur = rng.uniform(*seconds) if seconds[1] > seconds[0] else seconds[0]
        t = np.arange(int(16000 * dur)) / 16000
        wav = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 250) * t) + 0.02 * rng.standard_normal(t.size)
        sed = {f: SED_VOCAB[f][rng.integers(len(SED_VOCAB[f]))] for f in SED_FIELDS}
        rows.append(
            {
                "id": f"b{i}",
                "audio": {"array": wav.astype(np.float32), "sampling_rate": 16000},
                "text": SENTENCES[i % len(SENTENCES)],
                "emotion": emotions[i % len(emotions)],
                "speaker": "s",
                **sed,
                **{f + "_auto": v for f, v in sed.items()},
            }
        )
    return rows


def measure_shape(name: str, a, k: int) -> dict:
    import datasets

    seconds, overrides = SHAPES[name]
    rows = make_rows(a.batch_size * (a.steps + a.warmup), seconds)
    ds = datasets.Dataset.from_list(rows)
    base, proc = build_tiny_ser_slm(SENTENCES, emotion_labels=EMOTION_LABELS["synthetic"], seed=0, **overrides)
    common = dict(
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps + a.warmup,
        logging_steps=10_000,
        save_strategy="no",
        learning_rate=1e-4,
        use_cpu=a.device == "cpu",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        report_to="none",
    )
    out_dir = os.path.join(a.output_dir, name)

    def timed(cls, args):
        trainer = cls(copy.deepcopy(base), args=args, train_dataset=ds, processing_class=proc)
        tokens = [0]

        def count(_module, _args, kwargs):
            emb = kwargs.get("inputs_embeds")
            tokens[0] += int(emb.shape[0] * emb.shape[1])

        lm = trainer.accelerator.unwrap_model(trainer.model).model.language_model
        handle = lm.register_forward_pre_hook(count, with_kwargs=True)
        meter = StepMeter(time.process_time if a.device == "cpu" else time.perf_counter, tokens)
        trainer.add_callback(meter)
        trainer.train()
        handle.remove()
        return meter.per_step(a.warmup), trainer

    res = {}
    (res["sft_s"], res["sft_llm_tokens"]), sft = timed(
        SerSlmSFTTrainer, SerSlmSFTConfig(output_dir=out_dir + "/sft", sed_source="auto", **common)
    )
    rcfg = lambda timing, shared: SedRectifyConfig(
        output_dir=out_dir + "/r",
        num_policies=k,
        reward_timing=timing,  # noqa: E731
        shared_prefix=shared,
        **common,
    )
    (res["naive_s"], res["naive_llm_tokens"]), _ = timed(NaiveRectifyTrainer, rcfg("after_update", False))
    for timing in ("after_update", "reuse_forward"):
        for arm, shared in (("trainer", False), ("packed", True)):
            (res[f"{arm}_{timing}_s"], res[f"{arm}_{timing}_llm_tokens"]), _ = timed(
                SedRectifyTrainer, rcfg(timing, shared)
            )
    # the shared-prefix bound from this shape's token counts
    batch = sft.data_collator(rows[: a.batch_size])
    caption = (batch["labels"] != -100).sum(1).float()
    prefix = batch["attention_mask"].sum(1).float() - caption
    res["prompt_tokens_P"] = round(float(prefix.mean()), 2)
    res["caption_tokens_S"] = round(float(caption.mean()), 2)
    res["prefix_over_caption"] = round(float((prefix / caption).mean()), 2)
    res["shared_prefix_bound"] = round(float(((prefix + k * caption) / (prefix + caption)).mean()), 3)
    for timing in ("after_update", "reuse_forward"):
        packed, today = res[f"packed_{timing}_s"], res[f"trainer_{timing}_s"]
        res[f"packed_{timing}_over_bound_x_sft"] = round(packed / (res["shared_prefix_bound"] * res["sft_s"]), 3)
        res[f"packed_{timing}_over_trainer"] = round(packed / today, 3)
        res[f"trainer_{timing}_over_naive"] = round(today / res["naive_s"], 3)
        res[f"packed_{timing}_tokens_over_trainer"] = round(
            res[f"packed_{timing}_llm_tokens"] / res[f"trainer_{timing}_llm_tokens"], 3
        )
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after the warm-up steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-policies", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="/tmp/trustser_rectify_step")
    p.add_argument("--json", default=None, help="also write the result here (atomically)")
    p.add_argument(
        "--quick", action="store_true", help="2 steps, batch 2, K 3: checks that every arm runs (no figures)"
    )
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.batch_size, a.num_policies = 2, 1, 2, 3
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    torch.set_num_threads(a.threads)
    k = a.num_policies
    results = {
        "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(0),
        "clock": "process CPU seconds" if a.device == "cpu" else "wall seconds",
        "batch_size": a.batch_size,
        "num_policies": k,
        "threads": a.threads,
        "steps": a.steps,
        "warmup": a.warmup,
        "quick": a.quick,
        "shapes": {},
    }
    for name in shapes:
        results["shapes"][name] = measure_shape(name, a, k)
    targets = {}
    for name in shapes:
        if name in PAPER_SHAPES:
            r = results["shapes"][name]
            for timing in ("after_update", "reuse_forward"):
                targets[f"{name}/{timing}"] = {
                    "prefix_at_least_4x_caption": r["prefix_over_caption"] >= 4.0,
                    "packed_within_1.15x_bound_x_sft": r[f"packed_{timing}_over_bound_x_sft"] <= 1.15,
                    "packed_at_most_0.6x_trainer": r[f"packed_{timing}_over_trainer"] <= 0.6,
                }
    results["targets"] = targets
    results["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if a.json:
        from trustser.utils import atomic_write_json

        atomic_write_json(a.json, results)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
