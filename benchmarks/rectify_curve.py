"""Does on-the-fly rectification repair the annotator's descriptor labels? On the synthetic corpus
(ground truth known), with target labels from the ``unified`` fixed-threshold annotator on
``train``:

1. a tiny SER-SLM is pre-trained on ``reference`` (reliable labels; the paper's SpeechCraft stage);
2. from that same model, ``--steps`` of plain SFT on the annotated ``train`` captions (Sys. 4) and
   ``--steps`` of SedRectifyTrainer (Sys. 9) with the same data order and learning rate;
3. the fraction of correct descriptor labels in the rectified captions (vs ground truth) is logged
   every ``--log-every`` steps, against the annotation's own accuracy; emotion accuracy of both
   models on ``test`` (held-out speakers, generated captions).

Writes the curve (PNG) and a JSON of every figure. Example (about 10 min on 2 CPU threads):

    python benchmarks/rectify_curve.py --corpus-root /tmp/trustser-synth-small --size small \
        --png docs/figures/rectify_curve.png --json benchmarks/results/rectify_curve.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-root", default=os.path.expanduser("~/.cache/trustser/synthetic-small"))
    p.add_argument("--size", default="small")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-policies", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3, help="SLM learning rate (pre-training)")
    p.add_argument("--post-lr", type=float, default=5e-4, help="SLM learning rate (post-training, both arms)")
    p.add_argument("--controller-lr", type=float, default=1e-2)
    p.add_argument("--reward-timing", default="after_update", choices=["after_update", "reuse_forward"])
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--eval-pretrained", action="store_true", help="also evaluate the pre-trained starting point")
    p.add_argument(
        "--max-audio-seconds", type=float, default=8.0, help="the tiny encoder's fixed window (longer audio is cut)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/trustser_rectify_curve")
    p.add_argument(
        "--pretrained",
        default=None,
        help="start from this saved SER-SLM (e.g. the recipe's cached pre-training stage, "
        "outputs/cache/pretrain-*/model) instead of pre-training here",
    )
    p.add_argument(
        "--annotated",
        default=None,
        help="a saved annotated DatasetDict (e.g. outputs/cache/annotate-*/data) to take "
        "the annotated train split from instead of annotating here",
    )
    p.add_argument("--entropy-coef", type=float, default=0.0)
    p.add_argument("--controller-updates", type=int, default=1)
    p.add_argument(
        "--head-hidden", type=int, default=0, help="controller head hidden size (0: the paper's linear head)"
    )
    p.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])
    p.add_argument("--skip-sft", action="store_true", help="only the rectification arm (no SFT comparison)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate emotion on the first N test utterances")
    p.add_argument("--png", default="docs/figures/rectify_curve.png")
    p.add_argument("--json", default="benchmarks/results/rectify_curve.json")
    a = p.parse_args(argv)

    import datasets
    import torch

    torch.set_num_threads(a.threads)
    from trustser.annotation import annotate
    from trustser.data.synthetic import load_synthetic
    from trustser.descriptors import EMOTION_LABELS, SED_FIELDS
    from trustser.evaluation import evaluate_ser
    from trustser.models.ser_slm import build_tiny_ser_slm
    from trustser.trainers.rectify import SedRectifyTrainer, audit_controller
    from trustser.trainers.rectify_config import SedRectifyConfig
    from trustser.trainers.sft import SerSlmSFTConfig, SerSlmSFTTrainer
    from trustser.utils import atomic_write_json, set_seed

    t_start, c_start = time.perf_counter(), time.process_time()
    set_seed(a.seed)
    work = Path(a.work_dir)
    corpus = load_synthetic(
        a.corpus_root,
        splits=["test"] if a.pretrained and a.annotated else ["reference", "train", "test"],
        generate=True,
        size=a.size,
        seed=a.seed,
    )
    if a.annotated:
        train = datasets.load_from_disk(a.annotated)["train"]
    else:
        cache = work / f"train_unified_{a.size}_{a.seed}"
        if cache.exists():
            train = datasets.load_from_disk(str(cache))
        else:
            train = annotate(corpus["train"], method="unified", reference=corpus["reference"], seed=a.seed)
            train.save_to_disk(str(cache))
    n_all = len(train)
    train = train.filter(lambda e: not e["annotation_error"])
    ann_acc = {f: sum(x == y for x, y in zip(train[f], train[f + "_auto"])) / len(train) for f in SED_FIELDS}
    labels = list(EMOTION_LABELS["synthetic"])
    common = dict(
        use_cpu=not torch.cuda.is_available(),
        seed=a.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=a.batch_size,
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

    t0 = time.perf_counter()
    if a.pretrained:
        start_dir = Path(a.pretrained)
        processor = SerSlmProcessor.from_pretrained(start_dir)
    else:
        # 1. pre-training on the reliable reference labels
        texts = list(corpus["reference"]["text"]) + list(train["text"])
        model, processor = build_tiny_ser_slm(
            texts, emotion_labels=labels, seed=a.seed, max_audio_seconds=a.max_audio_seconds
        )
        pre = SerSlmSFTTrainer(
            model,
            args=SerSlmSFTConfig(
                output_dir=str(work / "pre"),
                max_steps=a.pretrain_steps,
                learning_rate=a.lr,
                lr_scheduler_type="cosine",
                warmup_steps=max(1, a.pretrain_steps // 20),
                logging_steps=50,
                sed_source="truth",
                **common,
            ),
            train_dataset=corpus["reference"],
            processing_class=processor,
        )
        pre.train()
        # each arm starts from a fresh load of the pre-trained weights: a deepcopy of a model that went
        # through TRL's SFTTrainer would keep its patched forward bound to the original model
        start_dir = work / "pretrained"
        pre.model.save_pretrained(start_dir)
    pretrain_s = time.perf_counter() - t0
    fresh = lambda: SerSlmForConditionalGeneration.from_pretrained(start_dir)

    # 2. post-training: plain SFT on annotated captions vs rectification, same steps/data/lr
    post = dict(
        max_steps=a.steps, learning_rate=a.post_lr, lr_scheduler_type="constant", logging_steps=a.log_every, **common
    )
    t0 = time.perf_counter()
    sft = None
    if not a.skip_sft:
        sft = SerSlmSFTTrainer(
            fresh(),
            args=SerSlmSFTConfig(output_dir=str(work / "sft"), sed_source="auto", **post),
            train_dataset=train,
            processing_class=processor,
        )
        sft.train()
    sft_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rect = SedRectifyTrainer(
        fresh(),
        args=SedRectifyConfig(
            output_dir=str(work / "rect"),
            num_policies=a.num_policies,
            controller_learning_rate=a.controller_lr,
            reward_timing=a.reward_timing,
            controller_entropy_coef=a.entropy_coef,
            controller_updates_per_step=a.controller_updates,
            controller_scale_rewards=a.scale_rewards,
            controller_head_hidden_size=a.head_hidden,
            **post,
        ),
        train_dataset=train,
        processing_class=processor,
    )
    rect.train()
    rect_s = time.perf_counter() - t0

    # 3. figures
    logs = [h for h in rect.state.log_history if "rectify/label_accuracy" in h]
    curve = {
        "step": [h["step"] for h in logs],
        "label_accuracy": [h["rectify/label_accuracy"] for h in logs],
        "annotation_accuracy": [h["rectify/annotation_accuracy"] for h in logs],
        **{f"label_accuracy_{f}": [h.get(f"rectify/label_accuracy_{f}") for h in logs] for f in SED_FIELDS},
        **{f"modify_rate_{f}": [h.get(f"rectify/modify_rate_{f}") for h in logs] for f in SED_FIELDS},
        "reward_mean": [h.get("reward/mean") for h in logs],
    }
    audit = audit_controller(rect.controller, train, batch_size=32, slm=rect.model, processor=processor)
    test = corpus["test"]
    if a.max_test:
        test = test.select(range(min(a.max_test, len(test))))
    t0 = time.perf_counter()
    ev_base = (
        evaluate_ser(fresh(), processor, test, labels, sed_source="truth", batch_size=32) if a.eval_pretrained else None
    )
    ev_sft = (
        evaluate_ser(sft.model, processor, test, labels, sed_source="truth", batch_size=32) if sft is not None else None
    )
    ev_rect = evaluate_ser(rect.model, processor, test, labels, sed_source="truth", batch_size=32)
    eval_s = time.perf_counter() - t0
    q = max(1, len(logs) // 4)  # first / last quarter of the logged steps
    first = sum(curve["label_accuracy"][:q]) / q
    last = sum(curve["label_accuracy"][-q:]) / q
    pick = lambda ev: {
        "wa": round(ev["wa"], 4),
        "ua": round(ev["ua"], 4),
        "weighted_f1": round(ev["weighted_f1"], 4),
        "sed_accuracy": {k: round(v, 4) for k, v in ev.get("sed_accuracy", {}).items()},
        "unparseable_rate": round(ev["unparseable_rate"], 4),
    }
    result = {
        "command": "python benchmarks/rectify_curve.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "corpus": {"size": a.size, "train_rows": n_all, "train_rows_annotated": len(train), "test_rows": len(test)},
        "annotation_accuracy_unified_train": {f: round(v, 4) for f, v in ann_acc.items()},
        "annotation_accuracy_mean": round(sum(ann_acc.values()) / len(ann_acc), 4),
        "rectified_label_accuracy_first_quarter": round(first, 4),
        "rectified_label_accuracy_last_quarter": round(last, 4),
        # same batches, rectified minus annotated: > 0 means the controller repaired more labels than it broke
        "rectified_minus_annotation_first_quarter": round(
            sum(x - y for x, y in zip(curve["label_accuracy"][:q], curve["annotation_accuracy"][:q])) / q, 4
        ),
        "rectified_minus_annotation_last_quarter": round(
            sum(x - y for x, y in zip(curve["label_accuracy"][-q:], curve["annotation_accuracy"][-q:])) / q, 4
        ),
        # the trained controller applied to every annotated train utterance (no sampling noise):
        # expected correct labels under its policy and with the most likely action per field
        "controller_audit": audit,
        "test_emotion": {
            "pretrained": pick(ev_base) if ev_base else None,
            "sft": pick(ev_sft) if ev_sft else None,
            "rectify": pick(ev_rect),
        },
        "settings": {k: v for k, v in vars(a).items() if k not in ("png", "json", "work_dir", "corpus_root")},
        "seconds": {
            "pretrain": round(pretrain_s, 1),
            "sft": round(sft_s, 1),
            "rectify": round(rect_s, 1),
            "eval": round(eval_s, 1),
            "total_wall": round(time.perf_counter() - t_start, 1),
            "total_cpu": round(time.process_time() - c_start, 1),
        },
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "curve": curve,
    }
    _plot(curve, ann_acc, result, a.png)
    atomic_write_json(a.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    return result


def _plot(curve, ann_acc, result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from trustser.descriptors import SED_FIELDS

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    steps = np.array(curve["step"])
    acc = np.array(curve["label_accuracy"], dtype=float)
    ax.plot(steps, acc, color="C0", alpha=0.35, label="rectified captions (per log)")
    w = max(1, len(acc) // 8)
    if len(acc) >= w:
        smooth = np.convolve(acc, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="C0", lw=2, label=f"rectified captions ({w}-log mean)")
    ann = np.array(curve["annotation_accuracy"], dtype=float)
    if len(ann) >= w:
        ax.plot(
            steps[w - 1 :],
            np.convolve(ann, np.ones(w) / w, mode="valid"),
            color="C3",
            ls="--",
            lw=1.5,
            label=f"same batches, annotation as is ({w}-log mean)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("correct descriptor labels (all 5 fields)")
    ax.set_title("Descriptor labels vs ground truth (synthetic train)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, f in enumerate(SED_FIELDS):
        v = np.array([x if x is not None else np.nan for x in curve[f"label_accuracy_{f}"]], dtype=float)
        if len(v) >= w:
            ax.plot(steps[w - 1 :], np.convolve(v, np.ones(w) / w, mode="valid"), color=f"C{i}", label=f)
        ax.axhline(ann_acc[f], color=f"C{i}", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_title("per field (dotted: annotation)")
    ax.legend(fontsize=8)
    te = result["test_emotion"]
    sft_wa = f"{te['sft']['wa']:.3f}" if te["sft"] else "n/a"
    au = result["controller_audit"]
    fig.suptitle(
        f"test emotion WA: SFT {sft_wa} vs rectify {te['rectify']['wa']:.3f}; trained controller on all train labels: "
        f"{au['expected_accuracy']:.3f} expected / {au['greedy_accuracy']:.3f} greedy vs annotation {au['annotation_accuracy']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
