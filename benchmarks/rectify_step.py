"""Step time of SED rectification on the tiny SER-SLM preset, in one run:

* ``sft``: a plain SerSlmSFTTrainer step (one caption per utterance);
* ``naive``: K independent full passes (processor + encoder + LLM forward/backward per policy, and
  K full reward forwards after the update) -- kept here only, as the reference to beat;
* ``trainer``: SEDRectifyTrainer at K (encoder once, K*B captions in one LLM batch, logits only over
  the caption), with ``reward_timing`` after_update (paper) and reuse_forward;
* the shared-prefix bound (P + K*S) / (P + S): LLM token work of a shared audio+prompt prefix
  relative to one caption per utterance (P, S = mean prompt / caption tokens), against K for full
  expansion.

Each step = collation + SLM forward/backward + optimizer step + reward + controller update; the
time is the median interval between optimizer steps after warm-up (process CPU time on CPU, wall
time on CUDA). Prints a final JSON line.

    python benchmarks/rectify_step.py --steps 6 --batch-size 8 --num-policies 6 [--device cpu|cuda]
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
from trustser.trainers.rectify import SEDRectifyTrainer, emotion_cross_entropy
from trustser.trainers.rectify_config import SEDRectifyConfig
from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer

SENTENCES = [
    "I cannot believe you did that again", "the meeting starts at nine tomorrow", "please pass me the salt",
    "we finally won the championship", "nobody told me about the changes", "it is raining in the city today",
    "this is the best day of my life", "leave me alone right now", "my dog passed away last night",
    "the train was late this morning", "could you open the window please", "I will call you after lunch",
]


class StepTimer(TrainerCallback):
    """Median interval between optimizer steps. On CPU the clock is this process' CPU time (all
    threads): on a shared, overloaded machine wall time mostly measures the neighbours."""

    def __init__(self, clock):
        self.clock = clock
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(self.clock())

    def median_step(self, warmup: int) -> float:
        d = np.diff(self.stamps)[warmup:]
        return float(statistics.median(d))


class NaiveRectifyTrainer(SEDRectifyTrainer):
    """K independent full passes per step: the processor (feature extraction), the encoder and the
    LLM run once per policy, and the after-update reward repeats all of it."""

    def _policy_inputs(self, inputs, captions, k, j):
        wav = inputs["rectify_waveforms"].cpu()
        audio = [wav[b, : int(n)].numpy() for b, n in enumerate(inputs["rectify_waveform_lengths"].cpu())]
        caps = [captions[b * k + j] for b in range(len(audio))]
        batch = self.processing_class(audio=audio, captions=caps, sampling_rate=16000)
        return {key: v.to(self.accelerator.device) for key, v in batch.items()}

    def _nll(self, model, batch):
        out = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "energy")}, use_cache=False)
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none").view(target.shape)
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
        self._pending.append({"feats": feats, "fmask": fmask, "sed_ids": inputs["rectify_sed_ids"], "actions": sample.actions,
                              "old_log_probs": sample.log_probs, "rewards": None, "naive": per_policy})
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


def make_rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    emotions = EMOTION_LABELS["synthetic"]
    rows = []
    for i in range(n):
        dur = rng.uniform(2.0, 4.0)
        t = np.arange(int(16000 * dur)) / 16000
        wav = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 250) * t) + 0.02 * rng.standard_normal(t.size)
        sed = {f: SED_VOCAB[f][rng.integers(len(SED_VOCAB[f]))] for f in SED_FIELDS}
        rows.append({"id": f"b{i}", "audio": {"array": wav.astype(np.float32), "sampling_rate": 16000},
                     "text": SENTENCES[i % len(SENTENCES)], "emotion": emotions[i % len(emotions)], "speaker": "s",
                     **sed, **{f + "_auto": v for f, v in sed.items()}})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-policies", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="/tmp/trustser_rectify_step")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import datasets

    warm = 2
    k = a.num_policies
    rows = make_rows(a.batch_size * (a.steps + warm))
    ds = datasets.Dataset.from_list(rows)
    base, proc = build_tiny_ser_slm(SENTENCES, emotion_labels=EMOTION_LABELS["synthetic"], seed=0)
    common = dict(per_device_train_batch_size=a.batch_size, max_steps=a.steps + warm, logging_steps=10_000, save_strategy="no",
                  learning_rate=1e-4, use_cpu=a.device == "cpu", seed=0, disable_tqdm=True, dataloader_num_workers=0)

    def timed(cls, args, **kw):
        trainer = cls(copy.deepcopy(base), args=args, train_dataset=ds, processing_class=proc, **kw)
        timer = StepTimer(time.process_time if a.device == "cpu" else time.perf_counter)
        trainer.add_callback(timer)
        trainer.train()
        return timer.median_step(warm), trainer

    results = {"device": a.device if a.device == "cpu" else torch.cuda.get_device_name(0),
               "clock": "process CPU seconds" if a.device == "cpu" else "wall seconds", "batch_size": a.batch_size,
               "num_policies": k, "threads": a.threads}
    results["sft_s"], _ = timed(SerSlmSFTTrainer, SerSlmSFTConfig(output_dir=a.output_dir + "/sft", sed_source="auto", **common))
    rcfg = lambda timing: SEDRectifyConfig(output_dir=a.output_dir + "/r", num_policies=k, reward_timing=timing, **common)
    results["naive_s"], _ = timed(NaiveRectifyTrainer, rcfg("after_update"))
    results["trainer_s"], tr = timed(SEDRectifyTrainer, rcfg("after_update"))
    results["trainer_reuse_forward_s"], _ = timed(SEDRectifyTrainer, rcfg("reuse_forward"))
    # shared-prefix bound from this corpus' token counts
    batch = tr.data_collator(rows[: a.batch_size])
    valid = batch["attention_mask"].sum(1).float()
    S = (batch["labels"] != -100).sum(1).float()
    P = valid - S
    results["prompt_tokens_P"] = float(P.mean())
    results["caption_tokens_S"] = float(S.mean())
    results["shared_prefix_bound"] = float(((P + k * S) / (P + S)).mean())
    results["ratio_trainer_over_naive"] = results["trainer_s"] / results["naive_s"]
    results["ratio_trainer_over_sft"] = results["trainer_s"] / results["sft_s"]
    results["ratio_reuse_forward_over_naive"] = results["trainer_reuse_forward_s"] / results["naive_s"]
    results["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
