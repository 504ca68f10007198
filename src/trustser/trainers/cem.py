"""CEM training: its data (correctness labels, balanced pairs) and the training itself (HF ``Trainer``).
The features and the CEM's scores for them are ``trustser.cem_features``, the metrics
``trustser.evaluation.cem_metrics``, the reliability diagram ``trustser.plots``.

Paper section 2.2: the pre-trained SER-SLM captions the reference corpus (reliable labels); each of
its five predicted descriptors is labelled correct (1) or wrong (0); the CEM learns these labels from
the SLM's last-layer hidden states for the utterance teacher-forced with its *predicted* caption. At
selection time (``trustser.selection``) the same features are taken for the *annotated* caption, so
the CEM judges whichever descriptor values a caption claims.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..cem_features import DEFAULT_POOLING, extract_cem_features, predict_cem
from ..descriptors import SED_FIELDS, SED_VOCAB, normalize_sed_value
from ..evaluation import cem_metrics
from ..generation import generate_sed_predictions
from ..plots import reliability_diagram
from ..utils import has_accelerator

logger = logging.getLogger(__name__)

BALANCE_MODES = ("utterance", "field", "none")


# ------------------------------------------------------------------------------------------
# Correctness labels and balanced sampling
# ------------------------------------------------------------------------------------------
def correctness_labels(
    predicted: Sequence[Mapping[str, str | None]],
    reference: Sequence[Mapping[str, str]],
    field_names: Sequence[str] = SED_FIELDS,
) -> np.ndarray:
    """(N, 5) array: 1 where the predicted descriptor equals the reliable one, 0 otherwise (a missing
    or unparseable prediction is wrong)."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions for {len(reference)} references")
    out = np.zeros((len(predicted), len(field_names)), dtype=np.float32)
    for i, (p, r) in enumerate(zip(predicted, reference)):
        for j, f in enumerate(field_names):
            pv, rv = normalize_sed_value(f, p.get(f)), normalize_sed_value(f, r.get(f))
            out[i, j] = float(pv is not None and pv == rv)
    return out


def balanced_sample(
    labels, *, mode: str = "utterance", num_pairs: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced positive/negative pairs for CEM training; returns (row indices, labels for those rows).

    ``utterance`` (default; the paper's counts, 261.3k incorrect vs 408.7k correct of 670k utterances,
    are per utterance): positives are utterances whose five predicted descriptors are all right,
    negatives those with at least one wrong; ``n = min(#pos, #neg, num_pairs)`` of each are drawn
    without replacement and keep their full 5-field labels.
    ``field``: per field, ``n_f = min(#pos_f, #neg_f, num_pairs)`` positive and negative entries are
    drawn; the other entries of the chosen rows are set to -100 (ignored by the loss), rows with no
    chosen entry are dropped.
    ``none``: every row, unchanged.
    """
    y = np.asarray(labels, dtype=np.float32)
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, fields), got shape {y.shape}")
    rng = np.random.default_rng(seed)
    if mode == "none":
        return np.arange(len(y)), y.copy()
    if mode == "utterance":
        good = np.all(y == 1, axis=1)
        pos, neg = np.flatnonzero(good), np.flatnonzero(~good)
        n = min(len(pos), len(neg), num_pairs if num_pairs is not None else len(y))
        if n == 0:
            raise ValueError(f"cannot balance: {len(pos)} all-correct and {len(neg)} partly-wrong utterances")
        idx = np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))
        return idx, y[idx].copy()
    if mode == "field":
        chosen = np.zeros_like(y, dtype=bool)
        for j in range(y.shape[1]):
            pos, neg = np.flatnonzero(y[:, j] == 1), np.flatnonzero(y[:, j] == 0)
            n = min(len(pos), len(neg), num_pairs if num_pairs is not None else len(y))
            if n == 0:
                logger.warning(
                    "field %d has %d positives and %d negatives: left out of CEM training", j, len(pos), len(neg)
                )
                continue
            chosen[rng.choice(pos, n, replace=False), j] = True
            chosen[rng.choice(neg, n, replace=False), j] = True
        idx = np.flatnonzero(chosen.any(axis=1))
        if len(idx) == 0:
            raise ValueError("cannot balance: no field has both correct and wrong predictions")
        out = np.where(chosen[idx], y[idx], -100.0).astype(np.float32)
        return idx, out
    raise ValueError(f"unknown balance mode {mode!r}; choose one of {BALANCE_MODES}")


# ------------------------------------------------------------------------------------------
# Training (HF Trainer)
# ------------------------------------------------------------------------------------------
def _features_dataset(features: np.ndarray, labels: np.ndarray | None = None):
    from datasets import Dataset

    data = {"features": np.asarray(features, dtype=np.float32)}
    if labels is not None:
        data["labels"] = np.asarray(labels, dtype=np.float32)
    return Dataset.from_dict(data).with_format("torch")


def _trainer_metrics(field_names):
    def compute(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        scores = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
        m = cem_metrics(scores, eval_pred.label_ids, field_names=field_names)
        flat = {f"auc_{f}": m[f]["auc"] for f in field_names}
        flat.update(
            utterance_auc=m["utterance"]["auc"], mean_field_auc=m["mean_field_auc"], pooled_nce=m["pooled"]["nce"]
        )
        return flat

    return compute


def train_cem(
    features,
    labels,
    *,
    output_dir: str | Path,
    eval_features=None,
    eval_labels=None,
    feature_pooling: str = DEFAULT_POOLING,
    slm_hidden_size: int = 0,
    hidden_size: int = 256,
    dropout: float = 0.1,
    balance: str = "utterance",
    num_pairs: int | None = None,
    learning_rate: float = 1e-3,
    num_train_epochs: float = 20.0,
    batch_size: int = 64,
    seed: int = 0,
    save: bool = True,
    reliability_plot: bool = True,
    training_args: Mapping[str, Any] | None = None,
    data_summary: Mapping[str, Any] | None = None,
):
    """Trains a CEM on (N, D) features and (N, 5) 0/1 correctness labels with BCE (paper eq. 1).

    Balanced pairs are drawn first (``balance``, see :func:`balanced_sample`); optimiser Adam
    (``torch.optim.Adam`` through ``Trainer(optimizer_cls_and_kwargs=...)``, as the paper), constant
    learning rate. The evaluation set is used as it comes (not balanced), so its metrics describe the
    natural error rate. Saves the model (safetensors), ``cem_metrics.json`` and
    ``reliability.png`` under ``output_dir`` when ``save``; ``data_summary`` (where the training
    data came from) is recorded in the report as ``data``. Returns ``(model, report)``.
    """
    from transformers import Trainer, TrainingArguments

    from ..models.cem import CemConfig, CemModel
    from ..utils import atomic_write_json, set_seed

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"train_cem needs (N, D) features and (N, 5) labels, got {features.shape} and {labels.shape}")
    finite = np.all(np.isfinite(features), axis=1)
    if not finite.all():
        logger.warning("train_cem: dropping %d rows with non-finite features", int((~finite).sum()))
        features, labels = features[finite], labels[finite]
    set_seed(seed)
    try:
        idx, y_bal = balanced_sample(labels, mode=balance, num_pairs=num_pairs, seed=seed)
    except ValueError as exc:  # e.g. an SLM that gets no utterance entirely right yet
        fallback = "field" if balance == "utterance" else "none"
        logger.warning("train_cem: %s; falling back to balance=%r", exc, fallback)
        try:
            idx, y_bal = balanced_sample(labels, mode=fallback, num_pairs=num_pairs, seed=seed)
        except ValueError:
            idx, y_bal = balanced_sample(labels, mode="none", seed=seed)
    x_bal = features[idx]
    if len(x_bal) < 2:
        raise ValueError(f"train_cem: only {len(x_bal)} training rows after balancing")
    config = CemConfig(
        input_size=int(features.shape[1]),
        hidden_size=hidden_size,
        dropout=dropout,
        feature_pooling=feature_pooling,
        slm_hidden_size=slm_hidden_size,
    )
    model = CemModel(config)
    output_dir = Path(output_dir)
    args = dict(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=min(batch_size, len(x_bal)),
        per_device_eval_batch_size=256,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        dataloader_drop_last=True,  # BatchNorm needs more than one sample per batch
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not has_accelerator(),
    )
    args.update(training_args or {})
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=_features_dataset(x_bal, y_bal),
        optimizer_cls_and_kwargs=(torch.optim.Adam, {"lr": learning_rate}),
        compute_metrics=_trainer_metrics(config.field_names),
    )
    train_out = trainer.train()
    # under several processes every rank trains (DDP: a Trainer on one rank alone would wait for
    # the others in its first collective); the main one writes
    save = save and trainer.is_world_process_zero()
    try:  # the Trainer's scratch directory stays empty (save_strategy="no")
        if trainer.is_world_process_zero():
            (output_dir / "trainer").rmdir()
    except OSError:
        pass
    model.eval()
    report: dict[str, Any] = {
        "train_rows": int(len(features)),
        "balance": balance,
        "balanced_rows": int(len(x_bal)),
        "balanced_positive_rate": float(np.mean(y_bal[y_bal >= 0])),
        "train_loss": float(train_out.training_loss),
        "feature_pooling": feature_pooling,
        "input_size": int(features.shape[1]),
    }
    if data_summary:
        report["data"] = dict(data_summary)
    if eval_features is not None and eval_labels is not None:
        scores = predict_cem(model, eval_features)
        report["eval"] = cem_metrics(scores, eval_labels, field_names=config.field_names)
        if save and reliability_plot:
            reliability_diagram(scores, eval_labels, output_dir / "reliability.png", field_names=config.field_names)
    if save:
        model.save_pretrained(output_dir)
        atomic_write_json(output_dir / "cem_metrics.json", report)
    return model, report


# ------------------------------------------------------------------------------------------
# Training data from the SER-SLM
# ------------------------------------------------------------------------------------------
def prepare_cem_data(
    slm, processor, dataset, *, pooling: str = DEFAULT_POOLING, batch_size: int = 16, max_new_tokens: int = 96
) -> dict[str, Any]:
    """CEM training data from a corpus with reliable descriptors (paper section 2.2): the SLM's
    greedy captions, the 0/1 correctness of each predicted descriptor against the reliable columns,
    and the features of the utterance teacher-forced with its *predicted* descriptors (transcription
    and emotion from the corpus, as in the captions scored at selection). Rows whose prediction
    misses a descriptor keep their labels (that field is wrong) but have NaN features; train_cem
    drops them, and ``unparseable`` counts them."""
    captions, predicted = generate_sed_predictions(
        slm, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    cols = dataset.select_columns(list(SED_FIELDS))[:]
    reference = [{f: cols[f][i] for f in SED_FIELDS} for i in range(len(dataset))]
    labels = correctness_labels(predicted, reference)
    # a descriptor the SLM did not produce counts as wrong (label 0); to still score the utterance,
    # the caption is teacher-forced with the field's first vocabulary value in its place
    filled = [{f: (p.get(f) or SED_VOCAB[f][0]) for f in SED_FIELDS} for p in predicted]
    features = extract_cem_features(
        slm, processor, dataset, sed_source="predicted", pooling=pooling, batch_size=batch_size, sed=filled
    )
    return {
        "features": features,
        "labels": labels,
        "captions": captions,
        "predicted": predicted,
        "unparseable": int(sum(any(v is None for v in p.values()) for p in predicted)),
    }


PERTURBATIONS = ("random", "adjacent", "speaker")
TRAINING_CAPTIONS = ("perturbed", "predicted")


def _shifted(field_name: str, value: str, step: int) -> str:
    """The value ``step`` places away in the field's ordered vocabulary (low < normal < high, child <
    ... < elderly), clipped at the ends; gender's two values swap."""
    vocab = SED_VOCAB[field_name]
    if len(vocab) == 2:
        return vocab[1 - vocab.index(value)]
    return vocab[min(max(vocab.index(value) + step, 0), len(vocab) - 1)]


def perturb_descriptors(
    truth: Sequence[Mapping[str, str]],
    *,
    mode: str = "random",
    corrupt_prob: float = 0.3,
    rng=None,
    speakers: Sequence[str] | None = None,
) -> tuple[list[dict[str, str]], np.ndarray]:
    """Claimed descriptors for CEM training and their (N, 5) 0/1 correctness, one caption per row.

    Each field is perturbed with probability ``corrupt_prob``:

    - ``random``: the value is replaced by any other value of the field (uniformly);
    - ``adjacent``: it moves one step (low <-> normal <-> high, slow <-> normal <-> fast, to a
      neighbouring age, the other gender), the annotator's typical error near a threshold;
    - ``speaker``: a shift of one step up or down is drawn once per speaker and field and applied to
      every utterance of that speaker (clipped at the scale's ends, where the claim stays right), as a
      threshold miscalibrated for a voice errs; needs ``speakers`` (one id per row).

    A truth value outside the vocabulary is left alone by ``speaker`` and replaced by any valid value
    otherwise (its row cannot be captioned unperturbed: NaN features downstream).
    """
    if mode not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {mode!r}; choose one of {PERTURBATIONS}")
    rng = np.random.default_rng(0) if rng is None else rng
    labels = np.ones((len(truth), len(SED_FIELDS)), dtype=np.float32)
    claimed: list[dict[str, str]] = []
    if mode == "speaker":
        if speakers is None or len(speakers) != len(truth):
            raise ValueError("perturbation 'speaker' needs one speaker id per row (a 'speaker' column)")
        shift = {}  # (speaker, field) -> -1, 0, +1, drawn in sorted speaker order (reproducible)
        for spk in sorted(set(speakers)):
            for f in SED_FIELDS:
                shift[spk, f] = int(rng.choice((-1, 1))) if rng.random() < corrupt_prob else 0
    for i, row in enumerate(truth):
        out = {}
        for j, f in enumerate(SED_FIELDS):
            true, valid = row[f], row[f] in SED_VOCAB[f]
            if mode == "speaker":
                claim = _shifted(f, true, shift[speakers[i], f]) if shift[speakers[i], f] and valid else true
            elif rng.random() < corrupt_prob:
                if mode == "random" or not valid:
                    others = [v for v in SED_VOCAB[f] if v != true]
                    claim = others[int(rng.integers(len(others)))]
                else:  # adjacent: one step, either way where both exist
                    steps = [s for s in (-1, 1) if _shifted(f, true, s) != true]
                    claim = _shifted(f, true, steps[int(rng.integers(len(steps)))] if len(steps) > 1 else steps[0])
            else:
                claim = true
            out[f] = claim
            labels[i, j] = float(claim == true)
        claimed.append(out)
    return claimed, labels


def prepare_cem_data_perturbed(
    slm,
    processor,
    dataset,
    *,
    corrupt_prob: float = 0.3,
    pooling: str = DEFAULT_POOLING,
    batch_size: int = 16,
    seed: int = 0,
    perturbation: str = "random",
    captions_per_utterance: int = 1,
) -> dict[str, Any]:
    """CEM training data matched to how selection uses the CEM (our option; the paper's is
    :func:`prepare_cem_data`): each reliable caption's descriptors are perturbed field by field with
    probability ``corrupt_prob`` (``perturbation``, see :func:`perturb_descriptors`), and the CEM
    learns whether each *claimed* descriptor is right from the SLM's states teacher-forced with it.
    At selection the CEM reads annotated captions (claims made by the annotator, not by the SLM), so
    training on claims the SLM did not make avoids the shift between the two.

    ``captions_per_utterance`` > 1: that many independently perturbed captions per utterance plus
    the unperturbed one (so a few hundred utterances give thousands of pairs); rows are grouped by
    utterance (``utterance`` gives each row's dataset index), the unperturbed caption first."""
    if captions_per_utterance < 1:
        raise ValueError(f"captions_per_utterance must be >= 1, got {captions_per_utterance}")
    rng = np.random.default_rng(seed)
    cols = dataset.select_columns(list(SED_FIELDS))[:]
    truth = [{f: cols[f][i] for f in SED_FIELDS} for i in range(len(dataset))]
    speakers = list(dataset["speaker"]) if perturbation == "speaker" and "speaker" in dataset.column_names else None
    if perturbation == "speaker" and speakers is None:
        raise ValueError("perturbation 'speaker' needs a 'speaker' column in the CEM training split")
    copies = [
        perturb_descriptors(truth, mode=perturbation, corrupt_prob=corrupt_prob, rng=rng, speakers=speakers)
        for _ in range(captions_per_utterance)
    ]
    if captions_per_utterance > 1:
        copies.insert(0, ([dict(t) for t in truth], correctness_labels(truth, truth)))
    # rows grouped by utterance: utterance i's captions are rows i*C .. i*C+C-1
    n, c = len(dataset), len(copies)
    claimed = [copies[k][0][i] for i in range(n) for k in range(c)]
    labels = (
        np.stack([copies[k][1][i] for i in range(n) for k in range(c)])
        if n
        else np.zeros((0, len(SED_FIELDS)), np.float32)
    )
    utterance = np.repeat(np.arange(n), c)
    expanded = dataset if c == 1 else dataset.select(utterance.tolist())
    features = extract_cem_features(
        slm, processor, expanded, sed_source="predicted", pooling=pooling, batch_size=batch_size, sed=claimed
    )
    return {"features": features, "labels": labels.astype(np.float32), "claimed": claimed, "utterance": utterance}


def prepare_cem_training_data(
    slm,
    processor,
    dataset,
    *,
    captions: str = "perturbed",
    corrupt_prob: float = 0.3,
    perturbation: str = "random",
    captions_per_utterance: int = 1,
    pooling: str = DEFAULT_POOLING,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """The CEM's training data in one of its two forms (``captions``): ``predicted`` (the paper:
    the SLM's own greedy predictions, :func:`prepare_cem_data`) or ``perturbed`` (reliable captions
    with perturbed descriptors, :func:`prepare_cem_data_perturbed`). Both carry ``utterance``, the
    dataset row of each training row, so held-out rows can be split by utterance."""
    if captions == "perturbed":
        return prepare_cem_data_perturbed(
            slm,
            processor,
            dataset,
            corrupt_prob=corrupt_prob,
            pooling=pooling,
            batch_size=batch_size,
            seed=seed,
            perturbation=perturbation,
            captions_per_utterance=captions_per_utterance,
        )
    if captions == "predicted":
        if captions_per_utterance != 1 or perturbation != "random":
            raise ValueError(
                "captions_per_utterance and perturbation apply to 'perturbed' CEM training captions only "
                "('predicted' uses the SLM's one greedy caption per utterance)"
            )
        data = prepare_cem_data(slm, processor, dataset, pooling=pooling, batch_size=batch_size)
        data["utterance"] = np.arange(len(dataset))
        return data
    raise ValueError(f"CEM training captions must be one of {TRAINING_CAPTIONS}, got {captions!r}")


def eval_split_by_utterance(utterance, eval_share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows) of CEM training data: the rows of the first ``eval_share`` of the
    utterances (at least one) are held out, so every caption of an utterance lands on one side."""
    u = np.asarray(utterance)
    n_utt = int(u.max()) + 1 if len(u) else 0
    held = u < max(1, int(n_utt * eval_share))
    return np.flatnonzero(~held), np.flatnonzero(held)


# ------------------------------------------------------------------------------------------
# Speakers held out from the SLM's pre-training for CEM training
# ------------------------------------------------------------------------------------------
def holdout_speakers(dataset, n: int, seed: int = 0) -> list[str]:
    """``n`` speakers of ``dataset`` chosen from ``seed``, spread over the speaker groups when the
    split has a ``group`` column (one speaker of each group in turn, groups in a seeded order), so
    the CEM sees SLM states of voices the SLM never trained on, across the kinds of voices."""
    if "speaker" not in dataset.column_names:
        raise ValueError(
            f"holding out {n} speakers for the CEM needs a 'speaker' column; the split has {dataset.column_names}"
        )
    speakers = list(dataset["speaker"])
    groups = list(dataset["group"]) if "group" in dataset.column_names else ["all"] * len(speakers)
    by_group: dict[str, list[str]] = {}
    for spk, grp in sorted(set(zip(speakers, groups))):
        by_group.setdefault(str(grp), []).append(str(spk))
    total = sum(len(v) for v in by_group.values())
    if not 0 < n < total:
        raise ValueError(f"cannot hold out {n} of the split's {total} speakers for the CEM (need 0 < n < {total})")
    rng = np.random.default_rng(seed)
    pools = {g: [v[i] for i in rng.permutation(len(v))] for g, v in sorted(by_group.items())}
    order = [sorted(pools)[i] for i in rng.permutation(len(pools))]
    chosen: list[str] = []
    while len(chosen) < n:
        for g in order:
            if pools[g] and len(chosen) < n:
                chosen.append(pools[g].pop(0))
    return sorted(chosen)


def split_holdout_speakers(dataset, n: int, seed: int = 0):
    """(rows for the SLM, rows for the CEM): the rows of :func:`holdout_speakers` go to the CEM only."""
    held = set(holdout_speakers(dataset, n, seed))
    is_held = [s in held for s in dataset["speaker"]]
    return (
        dataset.select([i for i, h in enumerate(is_held) if not h]),
        dataset.select([i for i, h in enumerate(is_held) if h]),
    )
