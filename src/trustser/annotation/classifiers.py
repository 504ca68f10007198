"""Pluggable gender and age backends.

* ``HubAudioClassifier``: a Hugging Face model by id or local path. Standard
  ``audio-classification`` checkpoints (SpeechCraft's gender model
  ``alefiury/wav2vec2-large-xlsr-53-gender-recognition-librispeech``) run through the
  ``transformers`` pipeline and their labels are mapped onto the descriptor vocabulary. audEERING's
  age/gender checkpoint (``audeering/wav2vec2-large-robust-24-ft-age-gender``) is not a standard
  classification head: ``Wav2Vec2AgeGenderModel`` below mirrors its published class so its weights
  load by name; the age head is a regression read as ``years = clip(output, 0, 1) * 100`` and
  bucketed with SpeechCraft's age bounds.
* ``OfflineClassifier``: multinomial logistic regression on a cheap acoustic embedding
  (``features.acoustic_embedding``: MFCC mean/std + log-F0 statistics), fitted on a labelled
  reference split. Its state is plain JSON (scaler statistics, coefficients, classes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..audio import TARGET_SR
from ..descriptors import SED_VOCAB, normalize_sed_value
from ..utils import atomic_write_json
from .binning import age_bucket

DEFAULT_GENDER_MODEL = "alefiury/wav2vec2-large-xlsr-53-gender-recognition-librispeech"
DEFAULT_AGE_MODEL = "audeering/wav2vec2-large-robust-24-ft-age-gender"
EMBEDDING_VERSION = "mfcc20-meanstd+prosody6-v1"
# Embedding column groups each offline classifier reads by default (features.EMBEDDING_GROUPS).
# MFCC means are left out: they encode the recording channel, which differs between a reference
# corpus and a target corpus; on the synthetic corpus (clean reference, band-limited target)
# including them cost 15-30 points of age accuracy (docs/annotation.md).
DEFAULT_FEATURE_GROUPS: dict[str, tuple[str, ...]] = {"gender": ("mfcc_std", "prosody"), "age": ("prosody",)}


def group_columns(groups: Sequence[str]) -> list[int]:
    from .features import EMBEDDING_GROUPS

    unknown = [g for g in groups if g not in EMBEDDING_GROUPS]
    if unknown:
        raise ValueError(f"unknown embedding groups {unknown}; known: {list(EMBEDDING_GROUPS)}")
    return [i for g in groups for i in range(*EMBEDDING_GROUPS[g])]


_LABEL_ALIASES = {
    "gender": {"m": "male", "man": "male", "f": "female", "woman": "female"},
    "age": {"young": "young adult", "adult": "young adult", "old": "elderly", "senior": "elderly"},
}


def label_to_vocab(field_name: str, label: str) -> str | None:
    """A model's label as a descriptor word (None if it has no counterpart)."""
    v = normalize_sed_value(field_name, label)
    if v is None:
        v = _LABEL_ALIASES[field_name].get(str(label).strip().lower())
    return v


# ------------------------------------------------------------------------------------------
# Offline backend
# ------------------------------------------------------------------------------------------
@dataclass
class OfflineClassifier:
    """Standardise -> linear scores -> argmax; fitted with scikit-learn, applied with numpy."""

    field: str
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (n_classes, dim), or (1, dim) for two classes (sklearn's binary layout)
    intercept: np.ndarray
    columns: list[int] | None = None  # embedding columns read (None = all)
    metadata: dict = field(default_factory=dict)

    needs_embedding = True

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        labels: Sequence[str],
        field: str,
        *,
        groups: Sequence[str] | None = None,
        C: float = 0.1,
        seed: int = 0,
    ) -> "OfflineClassifier":
        """``groups``: embedding column groups to use (default DEFAULT_FEATURE_GROUPS[field];
        ``()`` = every column). Fails with ValueError on fewer than 2 labelled rows/classes."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if field not in ("gender", "age"):
            raise ValueError(f"OfflineClassifier predicts gender or age, not {field!r}")
        X = np.asarray(embeddings, dtype=np.float64)
        y = [label_to_vocab(field, l) if l else None for l in labels]
        keep = np.asarray([v is not None for v in y]) & np.all(np.isfinite(X), axis=1)
        if keep.sum() < 2:
            raise ValueError(f"OfflineClassifier({field}): fewer than 2 labelled reference utterances")
        X, y = X[keep], [v for v, k in zip(y, keep) if k]
        groups = DEFAULT_FEATURE_GROUPS[field] if groups is None else tuple(groups)
        columns = group_columns(groups) if groups else None
        if columns is not None:
            X = X[:, columns]
        classes = sorted(set(y))
        if len(classes) < 2:
            raise ValueError(f"OfflineClassifier({field}): the reference labels hold one class only ({classes})")
        scaler = StandardScaler().fit(X)
        lr = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(scaler.transform(X), y)
        train_acc = float(lr.score(scaler.transform(X), y))
        return cls(
            field=field,
            classes=[str(c) for c in lr.classes_],
            mean=scaler.mean_.copy(),
            scale=scaler.scale_.copy(),
            coef=lr.coef_.copy(),
            intercept=lr.intercept_.copy(),
            columns=columns,
            metadata={
                "n_train": int(len(y)),
                "train_accuracy": train_acc,
                "C": C,
                "seed": seed,
                "groups": list(groups),
                "embedding": EMBEDDING_VERSION,
            },
        )

    def decision(self, embeddings: np.ndarray) -> np.ndarray:
        X = np.asarray(embeddings, dtype=np.float64)
        if self.columns is not None:
            X = X[:, self.columns]
        X = (X - self.mean) / self.scale
        scores = X @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary: sklearn stores the positive class (classes[1]) only
            scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
        return scores

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        s = self.decision(embeddings)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        return s / s.sum(axis=1, keepdims=True)

    def predict(self, embeddings: np.ndarray) -> list[str]:
        X = np.asarray(embeddings, dtype=np.float64)
        dim = (max(self.columns) + 1) if self.columns is not None else self.mean.shape[0]
        if X.ndim != 2 or X.shape[1] < dim or (self.columns is None and X.shape[1] != dim):
            raise ValueError(f"OfflineClassifier({self.field}): embeddings of shape {X.shape}, expected (n, {dim})")
        idx = self.decision(X).argmax(axis=1)
        return [self.classes[i] for i in idx]

    def to_dict(self) -> dict:
        return {
            "type": "trustser.OfflineClassifier",
            "field": self.field,
            "classes": list(self.classes),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "columns": self.columns,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OfflineClassifier":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a trustser OfflineClassifier JSON file ({exc})") from exc
        if d.get("type") != "trustser.OfflineClassifier":
            raise ValueError(f"{path}: not a trustser OfflineClassifier JSON file (type={d.get('type')!r})")
        if d.get("metadata", {}).get("embedding", EMBEDDING_VERSION) != EMBEDDING_VERSION:
            raise ValueError(
                f"{path}: fitted on embedding {d['metadata']['embedding']!r}, this version computes {EMBEDDING_VERSION!r}"
            )
        return cls(
            field=d["field"],
            classes=list(d["classes"]),
            mean=np.asarray(d["mean"], dtype=np.float64),
            scale=np.asarray(d["scale"], dtype=np.float64),
            coef=np.asarray(d["coef"], dtype=np.float64),
            intercept=np.asarray(d["intercept"], dtype=np.float64),
            columns=d.get("columns"),
            metadata=d.get("metadata", {}),
        )


# ------------------------------------------------------------------------------------------
# Hub backends
# ------------------------------------------------------------------------------------------
def _age_gender_classes():
    """Defined lazily so importing this module does not import torch/transformers."""
    import torch
    from torch import nn
    from transformers import Wav2Vec2Model, Wav2Vec2PreTrainedModel

    class AgeGenderHead(nn.Module):
        def __init__(self, config, num_labels):
            super().__init__()
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.dropout = nn.Dropout(config.final_dropout)
            self.out_proj = nn.Linear(config.hidden_size, num_labels)

        def forward(self, x):
            x = self.dropout(x)
            x = torch.tanh(self.dense(x))
            return self.out_proj(self.dropout(x))

    class Wav2Vec2AgeGenderModel(Wav2Vec2PreTrainedModel):
        """audEERING's age/gender model: mean-pooled wav2vec2 states -> age regression (1 output,
        ~years/100) and gender softmax (female, male, child)."""

        def __init__(self, config):
            super().__init__(config)
            self.wav2vec2 = Wav2Vec2Model(config)
            self.age = AgeGenderHead(config, 1)
            self.gender = AgeGenderHead(config, 3)
            self.post_init()

        def forward(self, input_values, attention_mask=None):
            hidden = self.wav2vec2(input_values, attention_mask=attention_mask)[0]
            if attention_mask is not None:
                # mean over real frames only (padding would drag the pooled state)
                frames = self.wav2vec2._get_feat_extract_output_lengths(attention_mask.sum(-1))
                mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < frames[:, None]).to(hidden.dtype)
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            else:
                pooled = hidden.mean(1)
            return pooled, self.age(pooled), torch.softmax(self.gender(pooled), dim=-1)

    return Wav2Vec2AgeGenderModel


AGE_GENDER_GENDER_LABELS = ("female", "male", "child")


class HubAudioClassifier:
    """Gender or age from a Hub model id or a local directory.

    ``head="auto"`` picks audEERING's age/gender layout when the id/config says so
    (``age-gender`` in the name or an ``AgeGender`` architecture), else a standard
    ``AutoModelForAudioClassification`` through the ``audio-classification`` pipeline. A standard
    model with a single output is read as an age regression in units of 100 years."""

    needs_embedding = False

    def __init__(
        self,
        model_id: str,
        field: str,
        *,
        head: str = "auto",
        device: str | int | None = None,
        batch_size: int = 8,
        max_seconds: float | None = 5.0,
    ):
        if field not in ("gender", "age"):
            raise ValueError(f"HubAudioClassifier predicts gender or age, not {field!r}")
        self.model_id, self.field, self.batch_size, self.max_seconds = str(model_id), field, batch_size, max_seconds
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.model_id)
        except OSError as exc:
            raise ValueError(
                f"cannot load {field} classifier {self.model_id!r} ({exc}); offline, fit the reference-split "
                f"backend instead (gender_backend='reference')"
            ) from exc
        archs = " ".join(getattr(config, "architectures", None) or [])
        if head == "auto":
            head = "age_gender" if ("age-gender" in self.model_id.lower() or "AgeGender" in archs) else "classification"
        self.head = head
        import torch

        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if head == "age_gender":
            from transformers import AutoFeatureExtractor

            self.feature_extractor = AutoFeatureExtractor.from_pretrained(self.model_id)
            self.model = _age_gender_classes().from_pretrained(self.model_id).to(self.device).eval()
        elif head == "classification":
            from transformers import pipeline

            self.pipe = pipeline("audio-classification", model=self.model_id, device=self.device)
            labels = list(self.pipe.model.config.id2label.values())
            self.regression = self.pipe.model.config.num_labels == 1
            if not self.regression:
                unmapped = [l for l in labels if label_to_vocab(field, l) is None]
                if unmapped:
                    raise ValueError(
                        f"{self.model_id}: labels {unmapped} have no {field} descriptor ({SED_VOCAB[field]})"
                    )
        else:
            raise ValueError(f"unknown head {head!r} (auto, age_gender, classification)")

    def _clip(self, wav: np.ndarray, sr: int) -> np.ndarray:
        # SpeechCraft classifies the first 5 s only
        if self.max_seconds:
            wav = wav[: int(self.max_seconds * sr)]
        return np.asarray(wav, dtype=np.float32)

    def predict(self, waveforms: Sequence[np.ndarray], sr: int = TARGET_SR) -> list[str]:
        waves = [self._clip(w, sr) for w in waveforms]
        if not waves:
            return []
        if self.head == "age_gender":
            return self._predict_age_gender(waves, sr)
        if self.regression:
            import torch

            fe = self.pipe.feature_extractor
            out = []
            for i in range(0, len(waves), self.batch_size):
                inputs = fe(waves[i : i + self.batch_size], sampling_rate=sr, return_tensors="pt", padding=True)
                with torch.no_grad():
                    logits = self.pipe.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits[:, 0]
                out += age_bucket(np.clip(logits.float().cpu().numpy(), 0, 1) * 100)
            return out
        results = self.pipe([{"raw": w, "sampling_rate": sr} for w in waves], top_k=None, batch_size=self.batch_size)
        out = []
        for scores in results:
            best = {}
            for s in scores:  # several model labels may map to one word: sum them
                v = label_to_vocab(self.field, s["label"])
                best[v] = best.get(v, 0.0) + float(s["score"])
            out.append(max(best, key=best.get))
        return out

    def _predict_age_gender(self, waves, sr) -> list[str]:
        import torch

        out = []
        for i in range(0, len(waves), self.batch_size):
            inputs = self.feature_extractor(
                waves[i : i + self.batch_size],
                sampling_rate=sr,
                return_tensors="pt",
                padding=True,
                return_attention_mask=True,
            )
            with torch.no_grad():
                _, age, gender = self.model(
                    inputs["input_values"].to(self.device),
                    inputs.get("attention_mask").to(self.device) if "attention_mask" in inputs else None,
                )
            if self.field == "age":
                out += age_bucket(np.clip(age[:, 0].float().cpu().numpy(), 0, 1) * 100)
            else:
                # the "child" class has no gender word: take the larger of female/male
                g = gender[:, :2].float().cpu().numpy()
                out += [AGE_GENDER_GENDER_LABELS[j] for j in g.argmax(axis=1)]
        return out


def resolve_backend(spec, field: str):
    """A backend object from a spec: an object with ``predict``, a path to an OfflineClassifier
    JSON file, or a Hub model id / local model directory."""
    if hasattr(spec, "predict"):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.suffix == ".json":
            if not p.exists():
                raise FileNotFoundError(f"{p}: no such classifier file")
            clf = OfflineClassifier.load(p)
            if clf.field != field:
                raise ValueError(f"{p}: a {clf.field} classifier, used as the {field} backend")
            return clf
        return HubAudioClassifier(str(spec), field)
    raise TypeError(f"{field}_backend: expected a model id, a path or a backend object, got {type(spec).__name__}")
