"""CEM training data, feature extraction, training (HF ``Trainer``) and quality metrics.

Paper section 2.2: the pre-trained SER-SLM captions the reference corpus (reliable labels); each of
its five predicted descriptors is labelled correct (1) or wrong (0); the CEM learns these labels from
the SLM's last-layer hidden states for the utterance teacher-forced with its *predicted* caption. At
selection time (``trustser.selection``) the same features are taken for the *annotated* caption, so
the CEM judges whichever descriptor values a caption claims.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..descriptors import SED_FIELDS, SED_VOCAB, build_caption, normalize_sed_value, parse_caption, sed_from_row
from ..utils import has_accelerator

logger = logging.getLogger(__name__)

SED_SOURCES = ("truth", "auto", "predicted")
BALANCE_MODES = ("utterance", "field", "none")
DEFAULT_POOLING = "sed_tokens"


# ------------------------------------------------------------------------------------------
# Metrics (AUC, NCE, ECE) and the reliability diagram
# ------------------------------------------------------------------------------------------
def _clean(scores, labels):
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    keep = np.isfinite(s) & (y >= 0)
    return s[keep], y[keep]


def binary_auc(scores, labels) -> float:
    """ROC AUC of confidence scores against 0/1 correctness; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = _clean(scores, labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def normalized_cross_entropy(scores, labels, eps: float = 1e-12) -> float:
    """NCE = (H(c) - H(c|p)) / H(c): the share of the correctness entropy the confidences explain
    (1 perfect, 0 = as good as the constant prior, negative = worse than the prior)."""
    s, y = _clean(scores, labels)
    if len(y) == 0:
        return float("nan")
    p_c = y.mean()
    if p_c in (0.0, 1.0):
        return float("nan")
    h_c = -(p_c * math.log(p_c) + (1 - p_c) * math.log(1 - p_c))
    s = np.clip(s, eps, 1 - eps)
    h_cp = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))
    return float((h_c - h_cp) / h_c)


def calibration_bins(scores, labels, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: count, mean confidence and accuracy per bin."""
    s, y = _clean(scores, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(s, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=s, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def expected_calibration_error(scores, labels, n_bins: int = 10) -> float:
    """ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| over equal-width bins."""
    b = calibration_bins(scores, labels, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    used = b["count"] > 0
    return float(np.sum(b["count"][used] / n * np.abs(b["accuracy"][used] - b["confidence"][used])))


def cem_metrics(scores, labels, *, field_names: Sequence[str] = SED_FIELDS, n_bins: int = 10) -> dict[str, Any]:
    """Per-field AUC/NCE/ECE for ``scores``/``labels`` of shape (N, 5), plus the utterance level:
    the mean confidence against "all five fields right" (``utterance``) and the field-pooled figures
    (``pooled``). Label entries < 0 are ignored."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 2 or s.shape != y.shape or s.shape[1] != len(field_names):
        raise ValueError(f"cem_metrics expects two (N, {len(field_names)}) arrays, got {s.shape} and {y.shape}")
    out: dict[str, Any] = {"n": int(s.shape[0])}
    for j, f in enumerate(field_names):
        out[f] = {
            "auc": binary_auc(s[:, j], y[:, j]),
            "nce": normalized_cross_entropy(s[:, j], y[:, j]),
            "ece": expected_calibration_error(s[:, j], y[:, j], n_bins),
            "accuracy": float(np.mean(y[:, j][y[:, j] >= 0])) if np.any(y[:, j] >= 0) else float("nan"),
        }
    complete = np.all(y >= 0, axis=1)
    utt_score = s[complete].mean(axis=1)
    utt_label = np.all(y[complete] == 1, axis=1).astype(np.float64)
    out["utterance"] = {
        "auc": binary_auc(utt_score, utt_label),
        "nce": normalized_cross_entropy(utt_score, utt_label),
        "ece": expected_calibration_error(utt_score, utt_label, n_bins),
        "all_correct_rate": float(utt_label.mean()) if len(utt_label) else float("nan"),
    }
    out["pooled"] = {
        "auc": binary_auc(s, y),
        "nce": normalized_cross_entropy(s, y),
        "ece": expected_calibration_error(s, y, n_bins),
    }
    out["mean_field_auc"] = float(np.nanmean([out[f]["auc"] for f in field_names]))
    return out


def reliability_diagram(scores, labels, path, *, field_names: Sequence[str] = SED_FIELDS, n_bins: int = 10, title: str = "CEM reliability") -> Path:
    """Accuracy against mean confidence per bin, one line per field plus the utterance level; PNG,
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    curves = [(f, s[:, j], y[:, j]) for j, f in enumerate(field_names)]
    complete = np.all(y >= 0, axis=1)
    curves.append(("utterance", s[complete].mean(axis=1), np.all(y[complete] == 1, axis=1).astype(float)))
    for name, sc, lb in curves:
        b = calibration_bins(sc, lb, n_bins)
        used = b["count"] > 0
        ece = expected_calibration_error(sc, lb, n_bins)
        ax.plot(b["confidence"][used], b["accuracy"][used], marker="o", ms=3,
                lw=2.2 if name == "utterance" else 1.2, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("accuracy (share correct)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return _atomic_write_bytes(path, buf.getvalue())


def _atomic_write_bytes(path, data: bytes) -> Path:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        from ..utils import honour_umask

        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


@torch.no_grad()
def predict_cem(cem, features, batch_size: int = 1024) -> np.ndarray:
    """(N, 5) field confidences for (N, D) features; rows with non-finite features give NaN."""
    x = np.asarray(features, dtype=np.float32)
    out = np.full((len(x), cem.config.num_fields), np.nan, dtype=np.float32)
    ok = np.flatnonzero(np.all(np.isfinite(x), axis=1))
    was_training = cem.training
    cem.eval()
    device = next(cem.parameters()).device
    for start in range(0, len(ok), batch_size):
        rows = ok[start:start + batch_size]
        res = cem(torch.from_numpy(x[rows]).to(device))
        out[rows] = res.field_confidence.float().cpu().numpy()
    cem.train(was_training)
    return out


# ------------------------------------------------------------------------------------------
# Features from the SER-SLM
# ------------------------------------------------------------------------------------------
def _audio_arrays(rows: Sequence[Mapping]) -> list[np.ndarray]:
    from .sft import decode_audio

    return [decode_audio(r["audio"], r.get("id", "?")) for r in rows]


def _slm_device(slm):
    return next(slm.parameters()).device


def _rows(batch: Mapping[str, list]) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: batch[k][i] for k in batch} for i in range(n)]


@torch.no_grad()
def extract_cem_features(
    slm,
    processor,
    dataset,
    *,
    sed_source: str = "truth",
    pooling: str = DEFAULT_POOLING,
    batch_size: int = 16,
    sed: Sequence[Mapping[str, str | None]] | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """SER-SLM last-layer hidden states (before the LM head) for each utterance teacher-forced with
    the caption "transcription + emotion + descriptors", pooled to one vector:

    - ``sed_tokens``: the states at the first token of each of the five descriptor values,
      concatenated in SED_FIELDS order (5*H); each state has seen the audio and the claimed value;
    - ``mean``: the mean over the caption tokens (H).

    Descriptors come from the reliable columns (``truth``), the annotation (``auto``, columns
    ``<field>_auto``) or ``sed`` (``predicted``: a list of per-row dicts, e.g. parsed SLM output).
    Rows whose descriptors are missing/invalid (failed annotation, unparseable prediction) get a
    NaN row, so callers keep row alignment and can flag them.
    """
    from ..models.cem import CEM_POOLINGS
    from .sft import read_rows

    if sed_source not in SED_SOURCES:
        raise ValueError(f"sed_source must be one of {SED_SOURCES}, got {sed_source!r}")
    if pooling not in CEM_POOLINGS:
        raise ValueError(f"pooling must be one of {CEM_POOLINGS}, got {pooling!r}")
    if sed_source == "predicted" and (sed is None or len(sed) != len(dataset)):
        raise ValueError("sed_source='predicted' needs sed= with one descriptor dict per dataset row")
    if sed_source == "auto":
        missing = [f + "_auto" for f in SED_FIELDS if f + "_auto" not in dataset.column_names]
        if missing:
            raise ValueError(f"dataset has no annotation columns {missing}; run `trustser annotate` first")
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    hidden = slm.config.text_config.hidden_size
    dim = hidden * (len(SED_FIELDS) if pooling == "sed_tokens" else 1)
    out = np.full((len(order), dim), np.nan, dtype=np.float32)
    device = _slm_device(slm)
    was_training = slm.training
    slm.eval()
    steps = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"CEM features ({sed_source})")
    for start in steps:
        pos = order[start:start + batch_size]
        rows, wavs, errors = read_rows(dataset, pos)  # one unreadable file only flags its own row
        if sed_source == "predicted":
            seds = [dict(sed[i]) for i in pos]
        else:
            seds = [sed_from_row(r, "_auto" if sed_source == "auto" else "") for r in rows]
        captions, keep, audio = [], [], []
        for j, (row, s) in enumerate(zip(rows, seds)):
            if errors[j] is not None:  # a corpus run continues: NaN row, logged
                logger.warning("CEM features: %s", errors[j])
                continue
            try:
                caption = build_caption(row["text"], row["emotion"], s)
            except ValueError:
                continue  # invalid/missing descriptor (failed annotation, unparseable prediction): NaN row
            wav = wavs[j]
            captions.append(caption)
            audio.append(wav)
            keep.append(j)
        if not keep:
            continue
        enc = processor(audio=audio, captions=captions)
        model_inputs = {k: v.to(device) for k, v in enc.items() if k not in ("labels", "sed_token_index", "emotion_token_mask")}
        res = slm(**model_inputs, output_hidden_states=True, logits_to_keep=1, return_dict=True)
        states = res.hidden_states[-1].float()  # (B, L, H), last decoder layer (normed), before the LM head
        if pooling == "sed_tokens":
            idx = enc["sed_token_index"].to(device)
            if (idx < 0).any():
                bad = [keep[b] for b in torch.nonzero((idx < 0).any(dim=1)).flatten().tolist()]
                logger.warning("descriptor tokens not found for %d rows: left as NaN", len(bad))
            safe = idx.clamp(min=0)
            gathered = torch.gather(states, 1, safe[..., None].expand(-1, -1, states.shape[-1]))  # (B, 5, H)
            feats = gathered.reshape(len(keep), -1)
            feats[(idx < 0).any(dim=1)] = float("nan")
        else:
            cap_mask = (enc["labels"] != -100).to(device)
            feats = (states * cap_mask[..., None]).sum(1) / cap_mask.sum(1, keepdim=True).clamp(min=1)
        out[[start + j for j in keep]] = feats.cpu().numpy()
    slm.train(was_training)
    return out


@torch.no_grad()
def generate_sed_predictions(slm, processor, dataset, *, batch_size: int = 16, max_new_tokens: int = 96,
                             indices: Sequence[int] | None = None) -> tuple[list[str], list[dict]]:
    """Greedy captions from the SER-SLM and the descriptors parsed from them (a field that could
    not be parsed is ``None``)."""
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    device = _slm_device(slm)
    was_training = slm.training
    slm.eval()
    tok = processor.tokenizer
    captions: list[str] = []
    parsed: list[dict] = []
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        rows = _rows(dataset[pos])
        enc = processor(audio=_audio_arrays(rows))
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = slm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for t in texts:
            t = t.strip()
            captions.append(t)
            p = parse_caption(t)
            parsed.append({f: p.fields.get(f) for f in SED_FIELDS})
    slm.train(was_training)
    return captions, parsed


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
