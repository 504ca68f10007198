"""Report figures: the confusion matrix, the t-SNE of last hidden states (the paper's Figure 2), the
CEM reliability diagram, the rectification curves and the emotion/descriptor timeline of a
segmented recording."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .descriptors import SED_FIELDS


def save_figure(fig, path: str | Path, *, bbox_inches: str | None = "tight") -> Path:
    """A matplotlib figure as a PNG (120 dpi), written atomically with the umask's mode."""
    from .utils import atomic_file

    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches=bbox_inches)
    return Path(path)


def plot_confusion_matrix(matrix, labels: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: reference, columns: prediction) with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    cols = list(labels)
    norm = m / np.clip(m.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


@torch.no_grad()
def prompt_hidden_states(model, processor, dataset, *, batch_size: int = 32, return_rows: bool = False):
    """Mean over the prompt (audio + instruction) positions of the SLM's last-layer hidden states:
    what the LM knows about the utterance before it writes the caption (no label leakage).
    Rows whose audio cannot be used are skipped (logged); ``return_rows``: also the indices of
    the rows the features belong to."""
    from .audio import read_rows

    model.eval()
    device = next(model.parameters()).device
    feats, usable = [], []
    for s in range(0, len(dataset), batch_size):
        idx = list(range(s, min(len(dataset), s + batch_size)))
        rows, audio, errors = read_rows(dataset, idx)
        for e in errors:
            if e:
                logging.getLogger(__name__).warning("hidden states: skipped %s", e)
        usable += [i for i, e in zip(idx, errors) if e is None]
        rows = [r for r, a in zip(rows, audio) if a is not None]
        audio = [a for a in audio if a is not None]
        if not audio:
            continue
        enc = processor(audio=audio, padding_side="right", f0_tracks=processor.f0_tracks_of(rows, audio))
        inputs = {k: v.to(device) for k, v in enc.items()}
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        h = out.hidden_states[-1].float()
        m = inputs["attention_mask"].unsqueeze(-1).float()
        feats.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy())
    x = np.concatenate(feats) if feats else np.zeros((0, 0), dtype=np.float32)
    return (x, usable) if return_rows else x


def plot_tsne(
    model, processor, dataset, path: str | Path, *, max_samples: int = 600, seed: int = 0, title: str = ""
) -> Path:
    """t-SNE (scikit-learn) of last hidden states, coloured by reference emotion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    if len(dataset) > max_samples:
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    x, usable = prompt_hidden_states(model, processor, dataset, return_rows=True)
    column = list(dataset["emotion"])  # read once: indexing it per row re-reads the column (quadratic)
    emotions = [column[i] for i in usable]  # unreadable audio is left out (evaluate_ser lists it)
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in sorted(set(emotions)):
        idx = [i for i, e in enumerate(emotions) if e == label]
        ax.scatter(emb[idx, 0], emb[idx, 1], s=8, label=label, alpha=0.7)
    ax.legend(markerscale=2, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_rectification(log_history: Sequence[dict], path: str | Path, *, title: str = "") -> Path | None:
    """Rectification over post-training from the trainer's log history: accuracy of the rectified
    descriptor labels vs the annotation's on the same batches (when the data has ground truth),
    the controller's modify rate per field, and (with ground truth) per field the share of labels
    the sampled rectifications fix (wrong -> right, solid) and break (right -> wrong, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .descriptors import SED_FIELDS

    rows = [h for h in log_history if "rectify/label_accuracy" in h or "rectify/modify_rate_pitch" in h]
    if not rows:
        return None
    steps = [h.get("step", i) for i, h in enumerate(rows)]
    repair = [f for f in SED_FIELDS if any(f"rectify/fixed_{f}" in h for h in rows)]
    fig, axes = plt.subplots(1, 3 if repair else 2, figsize=(15 if repair else 10, 3.8))
    a1, a2 = axes[0], axes[1]
    for key, label in (
        ("rectify/label_accuracy", "rectified labels"),
        ("rectify/annotation_accuracy", "annotated labels"),
    ):
        ys = [h.get(key) for h in rows]
        if any(y is not None for y in ys):
            a1.plot(steps, ys, marker="o", ms=3, label=label)
    a1.set_xlabel("step")
    a1.set_ylabel("descriptor accuracy vs ground truth")
    a1.legend(fontsize=8)
    for f in SED_FIELDS:
        a2.plot(steps, [h.get(f"rectify/modify_rate_{f}") for h in rows], label=f)
    a2.set_xlabel("step")
    a2.set_ylabel("modify rate")
    a2.legend(fontsize=8)
    if repair:
        a3 = axes[2]
        for f in repair:
            colour = f"C{SED_FIELDS.index(f)}"
            a3.plot(steps, [h.get(f"rectify/fixed_{f}") for h in rows], color=colour, label=f"{f} fixed")
            a3.plot(steps, [h.get(f"rectify/broken_{f}") for h in rows], color=colour, ls="--", label=f"{f} broken")
        a3.set_xlabel("step")
        a3.set_ylabel("share of labels fixed / broken")
        a3.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_timeline(segments: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """The emotion and descriptor timeline of one segmented recording (``long_audio="segment"``
    results): one row for the emotion and one per descriptor, each segment a box from its start
    to its end, coloured by value and as opaque as the model is sure (the emotion's probability,
    the descriptor's CEM confidence; full when unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = [s for s in segments if s.get("start") is not None and not s.get("error")]
    if not segs:
        raise ValueError(f"{path}: no explained segment to plot")
    rows = ["emotion", *SED_FIELDS]
    cmap = plt.get_cmap("tab10")
    colours: dict[tuple[str, str], tuple] = {}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * segs[-1]["end"] + 2), 0.55 * len(rows) + 1.2))
    for y, row in enumerate(rows):
        for s in segs:
            if row == "emotion":
                value, sure = s.get("emotion"), (s.get("probabilities") or {}).get(s.get("emotion"))
            else:
                value, sure = (s.get("descriptors") or {}).get(row), (s.get("confidence") or {}).get(row)
            value = value or "?"
            key = (row, value)
            if key not in colours:
                colours[key] = cmap(sum(1 for k in colours if k[0] == row) % 10)
            alpha = 0.25 + 0.75 * (1.0 if sure is None else float(sure))
            ax.barh(
                y,
                s["end"] - s["start"],
                left=s["start"],
                height=0.8,
                color=colours[key],
                alpha=alpha,
                edgecolor="black",
                linewidth=0.5,
            )
            ax.text(
                (s["start"] + s["end"]) / 2,
                y,
                value if sure is None else f"{value}\n{sure:.2f}",
                ha="center",
                va="center",
                fontsize=7,
            )
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlim(0, segs[-1]["end"] + 0.2)
    ax.set_xlabel("time (s)")
    ax.set_title(title)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def reliability_diagram(
    scores, labels, path, *, field_names: Sequence[str] = SED_FIELDS, n_bins: int = 10, title: str = "CEM reliability"
) -> Path:
    """Accuracy against mean confidence per bin, one line per field plus the utterance level; PNG,
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation import calibration_bins, expected_calibration_error

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
        ax.plot(
            b["confidence"][used],
            b["accuracy"][used],
            marker="o",
            ms=3,
            lw=2.2 if name == "utterance" else 1.2,
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("accuracy (share correct)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = save_figure(fig, path, bbox_inches=None)
    plt.close(fig)
    return out
