"""Explained emotion predictions for users' audio: the ``explainable-ser`` transformers pipeline.

For each file the SER-SLM generates its caption (greedy); the caption is parsed into the emotion,
the five speech emotion descriptors (SEDs) and the transcription. The utterance is then
teacher-forced once with the canonical caption: the LM's distribution at the emotion word gives
probabilities over the emotion labels (softmax restricted to each label's first token), and the
last-layer hidden states give the CEM features, so the CEM returns a confidence per descriptor and
their mean, the trust score. The audio encoder runs once per batch (its embeddings feed both
passes).

    from transformers import pipeline
    import trustser  # registers the task
    pipe = pipeline("explainable-ser", model="path/or/hub-id", cem="path/to/cem")  # cem optional
    pipe(["a.wav", "b.mp3"], batch_size=16)
    pipe("conversation.wav", long_audio="segment")   # one explanation per speech segment, with start/end

``model`` may also be given to :func:`load_explainer` / :func:`explain_files` / ``trustser explain``
as a trustser output directory (``<output_dir>`` or its ``<system>-seed<seed>`` run folder): the
evaluated SER-SLM, its CEM and the emotion label set are then found from ``results.json``.
A Hub/released folder made by ``trustser push`` carries its CEM in the ``cem/`` subfolder, which
is found automatically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from transformers import Pipeline

from .audio import TARGET_SR, AudioError, audio_problem, load_audio, resample, to_mono_float
from .cem_features import cem_features
from .descriptors import EMOTION_LABELS, EMOTION_PREFIX, EMOTIONS, SED_FIELDS, build_caption, parse_caption
from .generation import greedy_captions, max_new_tokens_of

logger = logging.getLogger(__name__)

TASK = "explainable-ser"
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".mp4", ".aac", ".webm")
# audio_problem() reasons that make an explanation meaningless; "clipping" only warns
_FATAL_PROBLEMS = {
    "empty": "no samples",
    "nan": "non-finite (NaN/inf) samples",
    "too_short": "shorter than 0.3 s",
    "silence": "silent (below -60 dBFS)",
}


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def max_audio_seconds(processor) -> float | None:
    """The longest input the processor keeps: Whisper-style extractors pad/truncate to a fixed
    window; raw-waveform extractors (HuBERT, wav2vec2) have no window (None)."""
    fe = processor.feature_extractor
    n = getattr(fe, "n_samples", None)
    return float(n) / fe.sampling_rate if n else None


def label_token_ids(tokenizer, label: str) -> list[int]:
    """The token ids of an emotion label as it occurs in the caption (after "... speaker is ")."""
    enc = tokenizer(EMOTION_PREFIX + label, add_special_tokens=False, return_offsets_mapping=True)
    start = len(EMOTION_PREFIX)
    return [int(t) for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if e > start and e > s]


def label_first_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """Id of each label's first token as it occurs in the caption."""
    ids = []
    for label in labels:
        pieces = label_token_ids(tokenizer, label)
        if not pieces:
            raise ValueError(f"emotion label {label!r} produces no token")
        ids.append(pieces[0])
    return ids


def _load_cem(cem, device):
    if cem is None:
        return None
    from .models.cem import CemModel

    if not isinstance(cem, torch.nn.Module):
        path = Path(str(cem))
        if path.is_dir() and not (path / "config.json").exists() and (path / "cem" / "config.json").exists():
            path = path / "cem"
        cem = CemModel.from_pretrained(str(path) if path.exists() else str(cem))
    return cem.to(device).eval()


def _as_audio(inputs) -> tuple[str, np.ndarray]:
    """(name, mono float32 waveform at 16 kHz) from a path, an array (16 kHz) or a dict with
    ``array``/``raw`` + ``sampling_rate`` (+ ``path``/``id`` for the name)."""
    if isinstance(inputs, (str, os.PathLike)):
        return str(inputs), load_audio(inputs)
    if isinstance(inputs, dict):
        name = str(inputs.get("path") or inputs.get("id") or "<array>")
        arr = inputs.get("array", inputs.get("raw"))
        if arr is None:
            if inputs.get("path"):
                return name, load_audio(inputs["path"])
            raise AudioError(f"{name}: dict input needs 'array' (or 'raw') and 'sampling_rate', or 'path'")
        sr = int(inputs.get("sampling_rate", TARGET_SR))
        return name, resample(to_mono_float(np.asarray(arr, dtype=np.float32)), sr)
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return "<array>", to_mono_float(np.asarray(inputs, dtype=np.float32))
    raise AudioError(f"unsupported input type {type(inputs).__name__}: give a file path, an array or a dict")


def _checked_audio(inputs) -> tuple[str, np.ndarray]:
    """``_as_audio`` plus the checks that make an explanation meaningless (AudioError naming the
    input); clipping only warns."""
    name = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "<array>"
    try:
        name, wav = _as_audio(inputs)
    except AudioError:
        raise
    except Exception as exc:  # decoding backends raise their own types
        raise AudioError(f"{name}: unreadable audio ({type(exc).__name__}: {exc})") from exc
    problem = audio_problem(wav, TARGET_SR)
    if problem in _FATAL_PROBLEMS:
        raise AudioError(f"{name}: {_FATAL_PROBLEMS[problem]}")
    if problem == "clipping":
        logger.warning("%s: clipped audio; descriptors (volume) may be unreliable", name)
    return name, wav


def _file_seconds(path) -> float | None:
    """A file's duration from its header (no decoding), when soundfile can read it."""
    try:
        import soundfile as sf

        return float(sf.info(str(path)).duration)
    except Exception:
        return None


def _collate(items: list[dict]) -> dict:
    return {"items": items}


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
class ExplainableSerPipeline(Pipeline):
    """Audio -> caption, emotion, emotion probabilities, descriptors, per-descriptor CEM confidence
    and trust score.

    Construction keywords (``pipeline("explainable-ser", model=..., **kw)`` passes them on):
    ``cem`` (a CEM directory, Hub id or ``CemModel``; default: the model folder's
    ``cem/`` subfolder when present, else no trust scores), ``cem_slm`` (the SER-SLM whose hidden
    states the CEM was trained on, when it differs from ``model``; default ``model``),
    ``emotion_labels`` (default: ``model.config.emotion_labels``, else the canonical seven).
    Call keywords: ``errors="raise"|"record"`` (record: a bad file gives a result with ``error``
    set instead of raising), ``long_audio="error"|"truncate"`` for audio longer than the
    processor's window, or ``"segment"``: each input is a recording cut into speech segments, each
    explained with its ``start``/``end`` (:meth:`explain_recording`), ``max_new_tokens``.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, model, processor=None, *, cem=None, cem_slm=None, emotion_labels=None, **kwargs):
        if processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(model.name_or_path)
        super().__init__(model=model, processor=processor, **kwargs)
        self.model.eval()
        if cem is None:
            cem = _default_cem_path(model.name_or_path)
            if cem is not None and cem_slm is None:  # a run folder: the SLM its CEM was trained on
                cem_slm = _default_cem_slm_path(model.name_or_path)
        self.cem = _load_cem(cem, self.device)
        if isinstance(cem_slm, (str, os.PathLike)):
            from .models.ser_slm import SerSlmForConditionalGeneration

            cem_slm = SerSlmForConditionalGeneration.from_pretrained(str(cem_slm))
        self.cem_slm = cem_slm.to(self.device).eval() if cem_slm is not None else None
        labels = emotion_labels or getattr(self.model.config, "emotion_labels", None) or EMOTIONS
        self.emotion_labels = tuple(str(l).strip().lower() for l in labels)
        ids = label_first_token_ids(self.processor.tokenizer, self.emotion_labels)
        self._label_ids: list[int] | None = ids
        if len(set(ids)) < len(ids):
            clash = [l for l, i in zip(self.emotion_labels, ids) if ids.count(i) > 1]
            logger.warning(
                "emotion labels %s share their first token: probabilities are not reported "
                "(add the label words as tokens, see recipes/finetune_new_corpus.py)",
                clash,
            )
            self._label_ids = None
        self.max_seconds = max_audio_seconds(self.processor)

    # ---------------------------------------------------------------------------- parameters
    def _sanitize_parameters(self, errors=None, long_audio=None, max_new_tokens=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected explainable-ser arguments: {sorted(kwargs)}")
        pre, fwd = {}, {}
        if errors is not None:
            if errors not in ("raise", "record"):
                raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
            pre["errors"] = errors
        if long_audio is not None:
            if long_audio not in ("error", "truncate"):  # "segment" is taken by __call__
                raise ValueError(f"long_audio must be 'error', 'truncate' or 'segment', got {long_audio!r}")
            pre["long_audio"] = long_audio
        if max_new_tokens is not None:
            fwd["max_new_tokens"] = int(max_new_tokens)
        return pre, fwd, {}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """As transformers', with a collate function that keeps raw waveforms: the processor pads
        them (left-padded prompts) inside ``_forward``."""
        from torch.utils.data import DataLoader
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        if hasattr(inputs, "__len__"):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    # ---------------------------------------------------------------------------- stages
    def preprocess(self, inputs, errors: str = "raise", long_audio: str = "error"):
        name = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "<array>"
        try:
            name, wav = _checked_audio(inputs)
            seconds = wav.size / TARGET_SR
            if self.max_seconds and seconds > self.max_seconds + 1e-6:
                if long_audio == "error":
                    raise AudioError(
                        f"{name}: {seconds:.1f} s is longer than the model's {self.max_seconds:g} s window; "
                        "pass long_audio='segment' (--long-audio segment) to explain each speech segment, "
                        f"or long_audio='truncate' to keep the first {self.max_seconds:g} s"
                    )
                wav = wav[: int(self.max_seconds * TARGET_SR)]
        except AudioError as exc:
            if errors == "raise":
                raise
            return {"name": name, "audio": None, "error": str(exc)}
        return {"name": name, "audio": wav, "error": None}

    # ---------------------------------------------------------------------------- long recordings
    def __call__(self, inputs, *args, **kwargs):
        """As ``Pipeline.__call__``; with ``long_audio="segment"`` each input is a recording, cut
        into speech segments (:mod:`trustser.segments`), and gives a list of explanations in time
        order, each with ``start``/``end`` in seconds (a list of inputs gives a list of lists)."""
        if kwargs.get("long_audio") != "segment":
            return super().__call__(inputs, *args, **kwargs)
        kwargs.pop("long_audio")
        single = not isinstance(inputs, (list, tuple)) and not hasattr(inputs, "__next__")
        out = [self.explain_recording(x, **kwargs) for x in ([inputs] if single else inputs)]
        return out[0] if single else out

    def explain_recording(
        self,
        inputs,
        *,
        errors: str = "raise",
        batch_size: int | None = None,
        max_recording_seconds: float | None = None,
        **kwargs,
    ) -> list[dict]:
        """Explanations of each speech segment of one recording, in time order (``start``,
        ``end``, ``segment`` added). No speech, an over-long or unusable recording: an AudioError
        naming it, or (``errors="record"``) a single result with ``error`` set."""
        from .segments import MAX_RECORDING_SECONDS, check_recording_length, segment_recording

        limit = max_recording_seconds or MAX_RECORDING_SECONDS
        name = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "<array>"
        try:
            if isinstance(inputs, (str, os.PathLike)):
                check_recording_length(_file_seconds(inputs), name, limit)
            name, wav = _checked_audio(inputs)
            spans = segment_recording(wav, self.max_seconds, name=name, max_recording_seconds=limit)
        except AudioError as exc:
            if errors == "raise":
                raise
            return [{**_empty_result(name, str(exc)), "start": None, "end": None, "segment": None}]
        pieces = [
            {
                "array": wav[int(round(a * TARGET_SR)) : int(round(b * TARGET_SR))],
                "sampling_rate": TARGET_SR,
                "path": name,
            }
            for a, b in spans
        ]
        results = super().__call__(pieces, batch_size=batch_size or 1, errors=errors, **kwargs)
        for k, (r, (a, b)) in enumerate(zip(results, spans)):
            r.update(start=round(a, 3), end=round(b, 3), segment=k)
        return results

    def _forward(self, model_inputs, max_new_tokens: int | None = None):
        items = model_inputs["items"] if "items" in model_inputs else [model_inputs]
        results: list[dict] = [_empty_result(it["name"], it["error"]) for it in items]
        good = [i for i, it in enumerate(items) if it["error"] is None]
        if good:
            for i, res in zip(good, self._explain([items[i]["audio"] for i in good], max_new_tokens)):
                results[i].update(res)
        return {"results": results}

    def postprocess(self, model_outputs):
        res = model_outputs["results"]
        return res[0] if isinstance(res, list) else res

    # ---------------------------------------------------------------------------- the work
    def _explain(self, audio: list[np.ndarray], max_new_tokens: int | None) -> list[dict]:
        model, proc = self.model, self.processor
        device = self.device
        prompts = proc(audio=audio, padding_side="left").to(device)
        audio_embeds = model.get_audio_features(
            prompts["input_features"], prompts["feature_attention_mask"], prompts.get("energy"), prompts.get("f0")
        ).pooler_output
        captions = greedy_captions(
            model, proc, prompts, max_new_tokens=max_new_tokens_of(model, max_new_tokens), audio_embeds=audio_embeds
        )
        out = []
        teacher: dict[bool, list[int]] = {True: [], False: []}
        canon: dict[int, str] = {}
        for i, cap in enumerate(captions):
            p = parse_caption(cap, with_sed=True, emotion_labels=self.emotion_labels)
            res = {
                "caption": cap,
                "emotion": p.get("emotion"),
                "transcription": p.get("text"),
                "descriptors": {f: p.get(f) for f in SED_FIELDS},
                "unparsed": sorted(set(p.missing) | set(p.invalid)),
            }
            if p.ok:
                canon[i] = build_caption(p.get("text"), p.get("emotion"), {f: p.get(f) for f in SED_FIELDS})
                teacher[True].append(i)
            else:
                q = parse_caption(cap, with_sed=False, emotion_labels=self.emotion_labels)
                if q.ok:  # a plain-caption model (no descriptors): emotion probabilities only
                    res.update(emotion=q.get("emotion"), transcription=q.get("text"), unparsed=[])
                    canon[i] = build_caption(q.get("text"), q.get("emotion"), with_sed=False)
                    teacher[False].append(i)
            out.append(res)
        for with_sed, rows in teacher.items():
            if rows:
                self._teacher_forced(
                    rows, [canon[i] for i in rows], [audio[i] for i in rows], audio_embeds[rows], with_sed, out
                )
        return out

    def _teacher_forced(self, rows, captions, audio, audio_embeds, with_sed, out):
        """One forward of the canonical captions: emotion probabilities and CEM features."""
        enc = self.processor(audio=audio, captions=captions, with_sed=with_sed).to(self.device)
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
        res = self.model(**inputs, audio_embeds=audio_embeds, output_hidden_states=True, logits_to_keep=1)
        states = res.hidden_states[-1]  # (B, L, H): last layer, normed, before the LM head
        if self._label_ids is not None:
            emo = enc["emotion_token_mask"]
            first = torch.where(emo.any(1), emo.float().argmax(1), torch.zeros_like(emo[:, 0], dtype=torch.long))
            h = states[torch.arange(len(rows), device=states.device), (first - 1).clamp(min=0)]
            logits = self.model.lm_head(h)[:, self._label_ids].float()
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            for b, i in enumerate(rows):
                if bool(emo[b].any()):
                    out[i]["probabilities"] = {l: float(v) for l, v in zip(self.emotion_labels, probs[b])}
        if self.cem is None or not with_sed:
            return
        if self.cem_slm is not None:
            res = self.cem_slm(
                **{k: v for k, v in enc.items() if k in self.processor.model_input_names},
                output_hidden_states=True,
                logits_to_keep=1,
            )
            states = res.hidden_states[-1]
        feats = cem_features(states.float(), enc, self.cem.config.feature_pooling)
        ok = torch.isfinite(feats).all(1)
        if not bool(ok.any()):
            return
        c = self.cem(feats[ok].to(next(self.cem.parameters()).dtype))
        fc = c.field_confidence.float().cpu().numpy()
        conf = c.confidence.float().cpu().numpy()
        for j, b in enumerate(torch.nonzero(ok).flatten().tolist()):
            out[rows[b]]["confidence"] = {f: float(v) for f, v in zip(self.cem.config.field_names, fc[j])}
            out[rows[b]]["trust"] = float(conf[j])


def _empty_result(name: str, error: str | None) -> dict:
    return {
        "file": name,
        "error": error,
        "caption": None,
        "emotion": None,
        "probabilities": None,
        "transcription": None,
        "descriptors": {f: None for f in SED_FIELDS},
        "confidence": None,
        "trust": None,
        "unparsed": [],
    }


def _default_cem_path(name_or_path) -> str | None:
    """The ``cem/`` subfolder of a released (``trustser push``) model folder or Hub repo, if any."""
    if not name_or_path:
        return None
    p = Path(str(name_or_path))
    if p.is_dir():
        return str(p / "cem") if (p / "cem" / "config.json").exists() else None
    try:  # a Hub id: look for cem/config.json without downloading weights
        from huggingface_hub import file_exists

        if file_exists(str(name_or_path), "cem/config.json"):
            from huggingface_hub import snapshot_download

            return str(Path(snapshot_download(str(name_or_path), allow_patterns=["cem/*"])) / "cem")
    except Exception as exc:  # offline or private: no trust scores unless cem= is given
        logger.info("no CEM found for %s (%s)", name_or_path, exc)
    return None


def _default_cem_slm_path(name_or_path) -> str | None:
    """The ``pretrained/`` subfolder of a trustser run folder: the SER-SLM whose hidden states its
    CEM was trained on (a released folder has none: the explaining model is used)."""
    p = Path(str(name_or_path or ""))
    return str(p / "pretrained") if p.is_dir() and (p / "pretrained" / "config.json").is_file() else None


def register_pipeline() -> None:
    """Registers the ``explainable-ser`` task with transformers (idempotent)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    from .models.ser_slm import SerSlmForConditionalGeneration

    if TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ExplainableSerPipeline, pt_model=SerSlmForConditionalGeneration, type="multimodal"
    )


register_pipeline()


# ------------------------------------------------------------------------------------------------
# trustser output directories, file lists, the high-level call
# ------------------------------------------------------------------------------------------------
def resolve_model_dir(model: str | os.PathLike) -> dict[str, Any]:
    """``{"model": dir-or-id, "cem": dir-or-None, "cem_slm": dir-or-None, "emotion_labels": tuple-or-None}``.

    A trustser output directory (``<output_dir>`` holding one ``<system>-seed<seed>/results.json``,
    or the run folder itself) resolves to the evaluated model (post-training stage if any, else
    pre-training), the CEM stage and the SLM the CEM was trained on (pre-training). Anything else
    (a model folder, a Hub id) is returned as is."""
    p = Path(str(model))
    results = None
    if (p / "results.json").is_file():
        results = p / "results.json"
    elif p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*-seed*/results.json"))
        if len(found) > 1:
            raise ValueError(f"{p} holds several runs ({', '.join(f.parent.name for f in found)}): name one of them")
        results = found[0] if found else None
    if results is None:
        return {"model": str(model), "cem": None, "cem_slm": None, "emotion_labels": None}
    data = json.loads(results.read_text())
    corpus = data.get("target_corpus") or data.get("settings", {}).get("target_corpus")
    labels = data.get("settings", {}).get("emotion_labels") or EMOTION_LABELS.get(corpus)
    run = results.parent
    if (run / "config.json").is_file():  # the run folder is the model (cem/, pretrained/ inside)
        cem_dir = run / "cem" if (run / "cem" / "config.json").is_file() else None
        pre = run / "pretrained" if cem_dir is not None and (run / "pretrained" / "config.json").is_file() else None
        return {
            "model": str(run),
            "cem": str(cem_dir) if cem_dir else None,
            "cem_slm": str(pre) if pre else None,
            "emotion_labels": tuple(labels) if labels else None,
        }
    # older run folders: the stages' paths (relative to the run folder)
    stages = {s["name"]: run / s["path"] for s in data.get("stages", [])}
    model_dir = stages.get("posttrain", stages.get("pretrain"))
    if model_dir is None or not (model_dir / "model" / "config.json").exists():
        raise FileNotFoundError(f"{results}: no trained model found under its stages ({sorted(stages)})")
    cem = stages.get("cem")
    cem_dir = cem / "cem" if cem is not None and (cem / "cem" / "config.json").exists() else None
    pre = stages.get("pretrain")
    cem_slm = pre / "model" if cem_dir is not None and pre is not None and pre != model_dir else None
    return {
        "model": str(model_dir / "model"),
        "cem": str(cem_dir) if cem_dir else None,
        "cem_slm": str(cem_slm) if cem_slm else None,
        "emotion_labels": tuple(labels) if labels else None,
    }


def load_explainer(
    model, *, cem=None, cem_slm=None, emotion_labels=None, device=None, use_cem_slm: bool = True, **kwargs
) -> ExplainableSerPipeline:
    """``pipeline("explainable-ser", ...)`` for a model folder, Hub id or trustser output directory
    (see :func:`resolve_model_dir`); explicit arguments win over what the directory says."""
    from transformers import pipeline

    from .models.loading import require_model_type

    found = resolve_model_dir(model)
    require_model_type(found["model"], "ser_slm", "SER-SLM")
    cem = cem or found["cem"]
    cem_slm = cem_slm or (found["cem_slm"] if use_cem_slm and cem is not None else None)
    labels = emotion_labels or found["emotion_labels"]
    if device is None:
        device = 0 if torch.cuda.is_available() else -1
    return pipeline(
        TASK, model=found["model"], cem=cem, cem_slm=cem_slm, emotion_labels=labels, device=device, **kwargs
    )


def expand_audio_paths(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files as given; directories expanded (recursively, sorted) to their audio files."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{p}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this directory")
            out.extend(found)
        else:
            out.append(str(p))
    return out


def explain_files(
    model,
    files: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    cem=None,
    batch_size: int = 16,
    emotion_labels: Sequence[str] | None = None,
    errors: str = "record",
    long_audio: str = "error",
    max_new_tokens: int | None = None,
    progress: bool | None = None,
    device=None,
    use_cem_slm: bool = True,
    max_recording_seconds: float | None = None,
) -> list[dict]:
    """Explained predictions for audio files and/or directories, one dict per file, in order:
    ``file``, ``caption``, ``emotion``, ``probabilities`` ({label: p}), ``transcription``,
    ``descriptors`` ({field: value}), ``confidence`` ({field: CEM confidence} or None), ``trust``
    (the CEM's utterance confidence or None), ``unparsed`` (caption fields that could not be read)
    and ``error`` (None, or why the file could not be explained when ``errors="record"``).

    ``model`` is a model folder, Hub id, trustser output directory or a ready
    ``ExplainableSerPipeline``. A tqdm bar shows progress (default: on for more than one batch).
    ``use_cem_slm=False`` skips loading an output directory's pre-trained SLM for the CEM features
    (halves memory; the explaining model's states are used instead). ``long_audio="segment"``:
    one dict per speech segment of each file (``start``, ``end``, ``segment`` added), files in
    order, segments in time order; ``max_recording_seconds`` caps a recording's length."""
    paths = expand_audio_paths([files] if isinstance(files, (str, os.PathLike)) else files)
    pipe = (
        model
        if isinstance(model, ExplainableSerPipeline)
        else load_explainer(model, cem=cem, emotion_labels=emotion_labels, device=device, use_cem_slm=use_cem_slm)
    )
    kwargs: dict[str, Any] = {"errors": errors}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    if progress is None:
        progress = len(paths) > batch_size or (long_audio == "segment" and len(paths) > 1)
    if long_audio == "segment":  # one recording at a time, its segments batched
        stream = paths
        if progress:
            from tqdm.auto import tqdm

            stream = tqdm(paths, desc="explain", unit="recording")
        return [
            r
            for p in stream
            for r in pipe(
                p, long_audio="segment", batch_size=batch_size, max_recording_seconds=max_recording_seconds, **kwargs
            )
        ]
    stream = pipe((p for p in paths), batch_size=batch_size, long_audio=long_audio, **kwargs) if paths else []
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(stream, total=len(paths), desc="explain", unit="file")
    return list(stream)


def _fmt_time(t) -> str:
    return "" if t is None else f"{t:.2f}"


def format_table(results: Sequence[dict]) -> str:
    """A fixed-width text table: file (and, for segmented recordings, start and end in seconds),
    emotion (probability), trust, the five descriptors (with their confidence when a CEM is used),
    or the error."""
    timed = any(r.get("start") is not None or "segment" in r for r in results)
    head = ["file", *(["start", "end"] if timed else []), "emotion", "p", "trust", *SED_FIELDS, "note"]
    rows = [head]
    for r in results:
        times = [_fmt_time(r.get("start")), _fmt_time(r.get("end"))] if timed else []
        if r.get("error"):
            rows.append([r["file"], *times, "ERROR", "", "", "", "", "", "", "", r["error"]])
            continue
        emo = r.get("emotion") or "?"
        p = r.get("probabilities") or {}
        conf = r.get("confidence") or {}
        cells = []
        for f in SED_FIELDS:
            v = (r.get("descriptors") or {}).get(f) or "?"
            cells.append(f"{v} ({conf[f]:.2f})" if f in conf else v)
        note = f"unparsed: {', '.join(r['unparsed'])}" if r.get("unparsed") else ""
        rows.append(
            [
                r["file"],
                *times,
                emo,
                f"{p[emo]:.2f}" if emo in p else "",
                f"{r['trust']:.2f}" if r.get("trust") is not None else "",
                *cells,
                note,
            ]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


__all__ = [
    "ExplainableSerPipeline",
    "explain_files",
    "load_explainer",
    "resolve_model_dir",
    "expand_audio_paths",
    "format_table",
    "label_first_token_ids",
    "cem_features",
    "register_pipeline",
    "TASK",
]
