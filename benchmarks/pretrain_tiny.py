"""Pre-train the tiny SER-SLM on the synthetic `reference` split within a time budget, then
evaluate on `test` (held-out speakers, target channel). Prints the figures as JSON.

    python benchmarks/pretrain_tiny.py --budget-minutes 10 --threads 2               # the defaults below
    python benchmarks/pretrain_tiny.py --budget-minutes 10 --threads 2 --no-energy   # energy-stream ablation

Defaults = the recipe's pre-training of the tiny preset: energy + F0 streams, auxiliary descriptor
(1.0) and CTC (0.3) losses, channel augmentation 0.8, lr 2e-3 with warm-up and cosine decay over
the budget. The corpus is generated (espeak-ng) into --corpus-root when absent. The budget covers
training only; generation for the evaluation comes on top. ``--budget-kind wall`` (default) is
wall-clock minutes, fair on an idle machine (the JSON records the load average before and after);
``cpu`` is minutes x threads of this process' CPU time, for a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-root", default=os.path.expanduser("~/.cache/trustser/synthetic-default"))
    p.add_argument("--size", default="default")
    p.add_argument("--regenerate", action="store_true", help="re-synthesise the corpus if its settings are out of date")
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument(
        "--budget-kind",
        choices=["cpu", "wall"],
        default="wall",
        help="cpu: the budget is minutes x threads of this process' CPU time (what '10 minutes on 2 cores' "
        "means on a machine shared with other jobs); wall: wall-clock minutes",
    )
    p.add_argument("--max-steps", type=int, default=100000, help="upper bound; the time budget usually stops first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-energy", action="store_true", help="ablation: no raw-waveform energy stream")
    p.add_argument("--no-f0", action="store_true", help="ablation: no Praat F0 stream")
    p.add_argument(
        "--channel-augmentation",
        type=float,
        default=0.8,
        help="probability of a random recording channel per training utterance (ChannelAugmentation)",
    )
    p.add_argument("--vib-beta", type=float, default=1e-3)
    p.add_argument(
        "--aux-sed", type=float, default=1.0, help="aux_sed_loss_weight (descriptor heads on the SED branch)"
    )
    p.add_argument(
        "--aux-ctc", type=float, default=0.3, help="aux_ctc_loss_weight (transcript CTC on the semantic branch)"
    )
    p.add_argument("--kl-warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--output-dir", default="/tmp/trustser_pretrain_tiny")
    p.add_argument("--save", action="store_true", help="save the trained model + processor in --output-dir/model")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import TrainerCallback

    from trustser.data.synthetic import load_synthetic
    from trustser.descriptors import EMOTION_LABELS
    from trustser.evaluation import evaluate_ser
    from trustser.models.ser_slm import build_tiny_ser_slm
    from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer
    from trustser.utils import atomic_write_json, set_seed

    set_seed(args.seed)
    load0 = os.getloadavg()
    # an existing corpus is used as it is (pass --regenerate to bring it up to the current generator)
    generate = args.regenerate or not (Path(args.corpus_root) / "manifest.json").is_file()
    corpus = load_synthetic(
        args.corpus_root, splits=["reference", "test"], generate=generate, size=args.size, seed=args.seed
    )
    ref, test = corpus["reference"], corpus["test"]
    labels = list(EMOTION_LABELS["synthetic"])
    model, processor = build_tiny_ser_slm(
        ref["text"],
        emotion_labels=labels,
        sed_energy_stream=not args.no_energy,
        sed_f0_stream=not args.no_f0,
        vib_beta=args.vib_beta,
        aux_sed_loss_weight=args.aux_sed,
        aux_ctc_loss_weight=args.aux_ctc,
        seed=args.seed,
    )
    budget = args.budget_minutes * 60.0 * (args.threads if args.budget_kind == "cpu" else 1)
    clock = time.process_time if args.budget_kind == "cpu" else time.perf_counter
    base_lr = args.lr

    class TimeBudget(TrainerCallback):
        """Warm-up then cosine decay over wall-clock time (or steps); stops at the budget."""

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = clock()

        def on_step_begin(self, a, state, control, optimizer=None, **kw):
            if optimizer is None:
                return
            # progress = whichever runs out first: the time budget or --max-steps
            frac = max((clock() - self.t0) / budget, state.global_step / max(1, a.max_steps))
            warm = 0.05
            f = frac / warm if frac < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm))))
            lr = base_lr * max(0.02, f)
            for g in optimizer.param_groups:
                g["lr"] = lr

        def on_step_end(self, a, state, control, **kw):
            if clock() - self.t0 >= budget:
                control.should_training_stop = True

    cfg = SerSlmSFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=base_lr,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=25,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        kl_warmup_steps=args.kl_warmup_steps,
        channel_augmentation=args.channel_augmentation,
    )
    trainer = SerSlmSFTTrainer(
        model=model, args=cfg, train_dataset=ref, processing_class=processor, callbacks=[TimeBudget()]
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    steps = trainer.state.global_step
    model = trainer.model
    if args.save:
        model.save_pretrained(Path(args.output_dir) / "model")
        processor.save_pretrained(Path(args.output_dir) / "model")
    if args.eval_limit:  # a seeded random subset (the split is ordered by speaker)
        test = test.shuffle(seed=args.seed).select(range(min(args.eval_limit, len(test))))
    t1 = time.perf_counter()
    metrics = evaluate_ser(model, processor, test, labels, sed_source="truth", batch_size=args.eval_batch_size)
    eval_s = time.perf_counter() - t1
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    out = {
        "energy_stream": not args.no_energy,
        "f0_stream": not args.no_f0,
        "vib_beta": args.vib_beta,
        "channel_augmentation": args.channel_augmentation,
        "aux_sed_loss_weight": args.aux_sed,
        "aux_ctc_loss_weight": args.aux_ctc,
        "kl_warmup_steps": args.kl_warmup_steps,
        "budget": f"{args.budget_minutes} min {args.budget_kind}"
        + (f" x {args.threads} threads" if args.budget_kind == "cpu" else ""),
        "train_wall_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "train_steps": steps,
        "samples_seen": steps * args.batch_size,
        "epochs": round(steps * args.batch_size / len(ref), 2),
        "final_lm_loss": logs[-1]["lm_loss"] if logs else None,
        "final_kl_loss": logs[-1].get("kl_loss") if logs else None,
        "final_aux_sed_loss": logs[-1].get("aux_sed_loss") if logs else None,
        "final_aux_ctc_loss": logs[-1].get("aux_ctc_loss") if logs else None,
        "eval_seconds": round(eval_s, 1),
        "test_n": metrics["n"],
        "emotion_wa": round(metrics["wa"], 4),
        "emotion_ua": round(metrics["ua"], 4),
        "emotion_weighted_f1": round(metrics["weighted_f1"], 4),
        "sed_accuracy": {k: round(v, 4) for k, v in metrics.get("sed_accuracy", {}).items()},
        "unparseable_rate": round(metrics["unparseable_rate"], 4),
        "confusion_matrix": metrics["confusion_matrix"],
        "threads": args.threads,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    if args.json_out:
        atomic_write_json(args.json_out, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
