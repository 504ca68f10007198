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
def correctness_labels(predicted: Sequence[Mapping[str, str | None]], reference: Sequence[Mapping[str, str]],
                       field_names: Sequence[str] = SED_FIELDS) -> np.ndarray:
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


def balanced_sample(labels, *, mode: str = "utterance", num_pairs: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
                logger.warning("field %d has %d positives and %d negatives: left out of CEM training", j, len(pos), len(neg))
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
        flat.update(utterance_auc=m["utterance"]["auc"], mean_field_auc=m["mean_field_auc"], pooled_nce=m["pooled"]["nce"])
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
):
    """Trains a CEM on (N, D) features and (N, 5) 0/1 correctness labels with BCE (paper eq. 1).

    Balanced pairs are drawn first (``balance``, see :func:`balanced_sample`); optimiser Adam
    (``torch.optim.Adam`` through ``Trainer(optimizer_cls_and_kwargs=...)``, as the paper), constant
    learning rate. The evaluation set is used as it comes (not balanced), so its metrics describe the
    natural error rate. Saves the model (safetensors), ``cem_metrics.json`` and
    ``reliability.png`` under ``output_dir`` when ``save``. Returns ``(model, report)``.
    """
    from transformers import Trainer, TrainingArguments

    from ..models.cem import CemConfig, ConfidenceEstimationModel
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
        input_size=int(features.shape[1]), hidden_size=hidden_size, dropout=dropout,
        feature_pooling=feature_pooling, slm_hidden_size=slm_hidden_size,
    )
    model = ConfidenceEstimationModel(config)
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
def prepare_cem_data(slm, processor, dataset, *, pooling: str = DEFAULT_POOLING, batch_size: int = 16,
                     max_new_tokens: int = 96) -> dict[str, Any]:
    """CEM training data from a corpus with reliable descriptors (paper section 2.2): the SLM's
    greedy captions, the 0/1 correctness of each predicted descriptor against the reliable columns,
    and the features of the utterance teacher-forced with its *predicted* descriptors (transcription
    and emotion from the corpus, as in the captions scored at selection). Rows whose prediction
    misses a descriptor keep their labels (that field is wrong) but have NaN features; train_cem
    drops them, and ``unparseable`` counts them."""
    captions, predicted = generate_sed_predictions(slm, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens)
    cols = dataset.select_columns(list(SED_FIELDS))[:]
    reference = [{f: cols[f][i] for f in SED_FIELDS} for i in range(len(dataset))]
    labels = correctness_labels(predicted, reference)
    # a descriptor the SLM did not produce counts as wrong (label 0); to still score the utterance,
    # the caption is teacher-forced with the field's first vocabulary value in its place
    filled = [{f: (p.get(f) or SED_VOCAB[f][0]) for f in SED_FIELDS} for p in predicted]
    features = extract_cem_features(slm, processor, dataset, sed_source="predicted", pooling=pooling,
                                    batch_size=batch_size, sed=filled)
    return {
        "features": features,
        "labels": labels,
        "captions": captions,
        "predicted": predicted,
        "unparseable": int(sum(any(v is None for v in p.values()) for p in predicted)),
    }


def prepare_cem_data_perturbed(slm, processor, dataset, *, corrupt_prob: float = 0.3, pooling: str = DEFAULT_POOLING,
                               batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """CEM training data matched to how selection uses the CEM (our option; the paper's is
    :func:`prepare_cem_data`): each reliable caption's descriptors are replaced, field by field with
    probability ``corrupt_prob``, by another value of the field (uniformly), and the CEM learns
    whether each *claimed* descriptor is right from the SLM's states teacher-forced with it. At
    selection the CEM reads annotated captions (claims made by the annotator, not by the SLM), so
    training on claims the SLM did not make avoids the shift between the two."""
    rng = np.random.default_rng(seed)
    cols = dataset.select_columns(list(SED_FIELDS))[:]
    claimed, labels = [], np.ones((len(dataset), len(SED_FIELDS)), dtype=np.float32)
    for i in range(len(dataset)):
        row = {}
        for j, f in enumerate(SED_FIELDS):
            true = cols[f][i]
            if rng.random() < corrupt_prob:
                others = [v for v in SED_VOCAB[f] if v != true]
                row[f] = others[int(rng.integers(len(others)))]
                labels[i, j] = 0.0
            else:
                row[f] = true
        claimed.append(row)
    features = extract_cem_features(slm, processor, dataset, sed_source="predicted", pooling=pooling,
                                    batch_size=batch_size, sed=claimed)
    return {"features": features, "labels": labels, "claimed": claimed}
