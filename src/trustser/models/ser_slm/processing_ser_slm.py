"""SerSlmProcessor: audio -> encoder features + raw-waveform energy stream + prompt with audio
placeholders; captions -> labels on caption tokens only, plus token positions of every descriptor
value (``sed_token_index``) and of the emotion word (``emotion_token_mask``).

Self-contained (no trustser imports) so a checkpoint's processor loads with ``trust_remote_code``.
The caption templates and descriptor vocabularies are stored in ``processor_config.json``; their
defaults equal ``trustser.descriptors`` (a test keeps the two in step).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from .configuration_ser_slm import conv_output_length

SED_FIELDS = ("pitch", "volume", "speed", "gender", "age")
DEFAULT_SED_VOCAB = {
    "pitch": ["low", "normal", "high"],
    "volume": ["low", "normal", "high"],
    "speed": ["slow", "normal", "fast"],
    "gender": ["male", "female"],
    "age": ["child", "teenager", "young adult", "middle-aged", "elderly"],
}
_EMO_SUFFIX = ". Based on the audio caption, the emotional state of this speaker is "
DEFAULT_SED_TEMPLATE = (
    "The {age} {gender} speaks with a {speed} speed, a {pitch} pitch and a {volume} volume, "
    "saying '{text}'" + _EMO_SUFFIX + "{emotion}."
)
DEFAULT_PLAIN_TEMPLATE = "The speaker says '{text}'" + _EMO_SUFFIX + "{emotion}."
DEFAULT_INSTRUCTION = "Describe the speaker's voice and emotion."
_AGE_ALIASES = {"middle aged": "middle-aged", "young-adult": "young adult", "teen": "teenager"}


def frame_log_energy(wav: np.ndarray, num_frames: int, frame: int = 400, hop: int = 160) -> np.ndarray:
    """Frame log-energy in dB (25 ms window, 10 ms hop at 16 kHz) of the raw, un-normalised
    waveform, padded with -100 dB to ``num_frames`` (so it spans the same time as the padded features)."""
    out = np.full(num_frames, -100.0, dtype=np.float32)
    wav = np.asarray(wav, dtype=np.float32)
    if wav.size == 0:
        return out
    n = min(num_frames, max(1, -(-wav.size // hop)))
    padded = np.pad(wav, (0, max(0, (n - 1) * hop + frame - wav.size)))
    # a strided view of the frames, not a gathered copy (3-4x faster, the same values)
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[: (n - 1) * hop + 1 : hop]
    power = np.mean(np.square(frames, dtype=np.float64), axis=1)
    out[:n] = 10.0 * np.log10(power + 1e-10)
    return out


# The dataset column where the annotator leaves each clip's F0 stream (``praat_f0`` of the whole clip,
# from the Praat analysis it runs anyway), so that training and evaluation do not run Praat again.
F0_TRACK_COLUMN = "f0_track"


def praat_f0(wav: np.ndarray, sr: int, num_frames: int, hop: int = 160, pitch=None) -> np.ndarray:
    """Praat autocorrelation F0 (Hz, 0 = unvoiced) on the 10 ms grid of ``frame_log_energy``.
    ``pitch``: the clip's Praat ``Pitch`` at this step and range (60-600 Hz) when already made."""
    out = np.zeros(num_frames, dtype=np.float32)
    if wav.size < int(0.05 * sr):
        return out
    if pitch is None:
        import parselmouth  # optional: only for models with the F0 stream

        pitch = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=sr).to_pitch_ac(
            time_step=hop / sr, pitch_floor=60.0, pitch_ceiling=600.0
        )
    idx = np.round(pitch.xs() * sr / hop).astype(int)
    ok = (idx >= 0) & (idx < num_frames)
    out[idx[ok]] = np.nan_to_num(pitch.selected_array["frequency"][ok]).astype(np.float32)
    return out


def clip_f0_track(wav: np.ndarray, sr: int, pitch=None) -> np.ndarray:
    """``praat_f0`` of the whole clip over its own frames: the F0 stream of a clip that fits the
    feature window (``SerSlmProcessor.f0_track``), and what the annotator stores (``f0_track``)."""
    hop = 160 * sr // 16000
    return praat_f0(wav, sr, max(1, -(-wav.size // hop)), hop, pitch=pitch)


class SerSlmProcessor(ProcessorMixin):
    r"""Feature extractor (any: Whisper log-mel, wav2vec2/HuBERT raw waveform) + tokenizer.

    ``processor(audio=[...], captions=None | [...])`` returns the model inputs: ``input_ids``,
    ``attention_mask``, ``input_features``, ``feature_attention_mask``, ``energy`` (+ ``f0`` with
    ``f0_stream``) and, with captions,
    ``labels``, ``sed_token_index`` (B x 5) and ``emotion_token_mask`` (B x L)."""

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        audio_token: str = "<audio>",
        instruction: str = DEFAULT_INSTRUCTION,
        audio_conv_layers: list | None = None,
        frame_downsample: int = 4,
        sed_template: str = DEFAULT_SED_TEMPLATE,
        plain_template: str = DEFAULT_PLAIN_TEMPLATE,
        sed_vocab: dict | None = None,
        f0_stream: bool = False,
        chat_template=None,
    ):
        self.audio_token = audio_token
        self.instruction = instruction
        self.audio_conv_layers = [list(map(int, c)) for c in (audio_conv_layers or [])]
        self.frame_downsample = int(frame_downsample)
        self.sed_template = sed_template
        self.plain_template = plain_template
        self.sed_vocab = {k: list(v) for k, v in (sed_vocab or DEFAULT_SED_VOCAB).items()}
        self.f0_stream = bool(f0_stream)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        if self.audio_token not in self.tokenizer.get_vocab():
            raise ValueError(f"tokenizer has no audio placeholder token {self.audio_token!r}")
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        self._span_res = {True: self._template_regex(sed_template), False: self._template_regex(plain_template)}

    # -------------------------------------------------------------------------------- captions
    def _template_regex(self, template: str):
        parts = []
        for piece in re.split(r"(\{\w+\})", template):
            m = re.fullmatch(r"\{(\w+)\}", piece)
            if not m:
                parts.append(re.escape(piece))
            elif m.group(1) in self.sed_vocab:
                alts = sorted(self.sed_vocab[m.group(1)], key=len, reverse=True)
                parts.append(f"(?P<{m.group(1)}>" + "|".join(map(re.escape, alts)) + ")")
            elif m.group(1) == "text":
                parts.append("(?P<text>.*)")
            else:
                parts.append(f"(?P<{m.group(1)}>[^.]+?)")
        return re.compile("".join(parts), re.DOTALL)

    def caption_spans(self, caption: str, with_sed: bool = True) -> dict[str, tuple[int, int]]:
        """Character spans of the descriptor values, text and emotion; {} if not in template form."""
        m = self._span_res[with_sed].fullmatch(caption)
        if not m:
            return {}
        return {k: m.span(k) for k in m.groupdict() if m.group(k) is not None}

    def _normalize(self, field: str, value) -> str | None:
        v = " ".join(str(value if value is not None else "").strip().lower().replace("_", " ").split())
        if field == "age":
            v = _AGE_ALIASES.get(v, v)
        return v if v in self.sed_vocab[field] else None

    def build_captions(self, rows, sed_suffix: str = "", with_sed: bool = True) -> list[str]:
        """Captions for dataset rows (a list of dicts or a column batch), descriptors from the
        ``<field><sed_suffix>`` columns (``""`` = reliable labels, ``"_auto"`` = annotation)."""
        if isinstance(rows, Mapping):
            n = len(next(iter(rows.values())))
            rows = [{k: rows[k][i] for k in rows} for i in range(n)]
        out = []
        for row in rows:
            values = {"text": row["text"], "emotion": row["emotion"]}
            if with_sed:
                for f in SED_FIELDS:
                    raw = row.get(f + sed_suffix)
                    v = self._normalize(f, raw)
                    if v is None:
                        raise ValueError(
                            f"row {row.get('id', '?')!r}: invalid or missing descriptor {f + sed_suffix!r}={raw!r} "
                            f"(allowed: {self.sed_vocab[f]}); drop rows with annotation_error first"
                        )
                    values[f] = v
            out.append((self.sed_template if with_sed else self.plain_template).format(**values))
        return out

    def auxiliary_labels(
        self, rows: Sequence[Mapping], sed_suffix: str = "", with_sed: bool = True
    ) -> dict[str, torch.Tensor]:
        """Targets of the model's auxiliary losses for dataset rows: ``sed_labels`` (B, 5), each
        descriptor's index in ``sed_vocab`` (-100 where missing or outside the vocabulary, and
        everywhere with ``with_sed=False``: a no-descriptor system learns no descriptors), and
        ``ctc_labels`` (B, L), the transcript's token ids right-padded with -100."""

        def index(field, row):
            v = self._normalize(field, row.get(field + sed_suffix)) if with_sed else None
            return self.sed_vocab[field].index(v) if v is not None else -100

        sed = [[index(f, r) for f in SED_FIELDS] for r in rows]
        ids = [self.tokenizer(str(r.get("text") or ""), add_special_tokens=False)["input_ids"] for r in rows]
        ctc = torch.full((len(rows), max(1, max((len(i) for i in ids), default=0))), -100, dtype=torch.long)
        for k, i in enumerate(ids):
            ctc[k, : len(i)] = torch.tensor(i, dtype=torch.long)
        return {
            "sed_labels": torch.tensor(sed, dtype=torch.long).reshape(len(rows), len(SED_FIELDS)),
            "ctc_labels": ctc,
        }

    # -------------------------------------------------------------------------------- audio
    def num_audio_tokens(self, valid_length: int) -> int:
        return conv_output_length(int(valid_length), self.audio_conv_layers, self.frame_downsample)

    def f0_track(self, wav: np.ndarray, stored: Sequence[float] | None = None) -> np.ndarray:
        """The utterance's F0 stream (``praat_f0`` on the part of ``wav`` the features cover), unpadded:
        what ``__call__`` computes for it, for callers that cache it across epochs (``f0_tracks=``).
        ``stored``: the row's ``F0_TRACK_COLUMN`` (``praat_f0`` of the whole clip, left by the
        annotator), returned as it is when it is this clip's track: the features cover the whole
        clip at 16 kHz and the track has the clip's frame count; otherwise Praat runs."""
        fe = self.feature_extractor
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        whole = wav.size
        if hasattr(fe, "n_samples"):
            wav = wav[: fe.n_samples]
        frames = max(1, -(-wav.size // (160 * fe.sampling_rate // 16000)))
        if stored is not None and wav.size == whole and fe.sampling_rate == 16000 and len(stored) == frames:
            return np.asarray(stored, dtype=np.float32)
        return clip_f0_track(wav, fe.sampling_rate)

    def f0_tracks_of(self, rows: Sequence[Mapping], audio: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """``f0_tracks=`` for dataset ``rows`` and their decoded ``audio`` (None without the F0
        stream): each row's stored track where it has one (``f0_track``), else Praat's."""
        if not self.f0_stream:
            return None
        return [self.f0_track(a, r.get(F0_TRACK_COLUMN)) for r, a in zip(rows, audio)]

    def _audio_inputs(self, audio: Sequence[np.ndarray], sampling_rate: int, f0_tracks=None):
        fe = self.feature_extractor
        if sampling_rate != fe.sampling_rate:
            raise ValueError(f"audio must be sampled at {fe.sampling_rate} Hz (got {sampling_rate}); resample first")
        audio = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio]
        for i, a in enumerate(audio):
            if a.size == 0 or not np.all(np.isfinite(a)):
                raise ValueError(f"audio item {i}: {'empty' if a.size == 0 else 'non-finite samples'}")
        kwargs: dict[str, Any] = {"sampling_rate": sampling_rate, "return_attention_mask": True, "return_tensors": "pt"}
        if hasattr(fe, "n_samples"):  # Whisper-style: fixed window
            kwargs.update(padding="max_length", truncation=True)
        else:
            kwargs.update(padding="longest")
        feats = fe(audio, **kwargs)
        input_features = feats.get("input_features", feats.get("input_values"))
        feature_mask = feats["attention_mask"].long()
        if input_features.shape[-1] != feature_mask.shape[-1]:
            raise ValueError("feature extractor's attention_mask does not match its features' time axis")
        padded_samples = fe.n_samples if hasattr(fe, "n_samples") else max(a.size for a in audio)
        hop = 160 * fe.sampling_rate // 16000
        n_energy = -(-padded_samples // hop)
        energy = np.stack(
            [frame_log_energy(a[:padded_samples], n_energy, frame=int(2.5 * hop), hop=hop) for a in audio]
        )
        n_tokens = [max(1, self.num_audio_tokens(int(x))) for x in feature_mask.sum(-1)]
        f0 = None
        if self.f0_stream:
            if f0_tracks is None:
                f0_tracks = [self.f0_track(a) for a in audio]
            elif len(f0_tracks) != len(audio):
                raise ValueError(f"{len(audio)} audio items but {len(f0_tracks)} f0_tracks")
            f0 = np.zeros((len(audio), n_energy), dtype=np.float32)
            for i, t in enumerate(f0_tracks):
                t = np.asarray(t, dtype=np.float32)[:n_energy]
                f0[i, : t.size] = t
            f0 = torch.from_numpy(f0)
        return input_features, feature_mask, torch.from_numpy(energy), f0, n_tokens

    # -------------------------------------------------------------------------------- call
    def __call__(
        self,
        audio=None,
        captions: Sequence[str] | None = None,
        sampling_rate: int = 16000,
        with_sed: bool = True,
        padding_side: str | None = None,
        return_tensors: str = "pt",
        f0_tracks: Sequence[np.ndarray] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """``captions=None`` gives generation prompts (left-padded); with captions, training inputs
        (right-padded) whose ``labels`` cover the caption and EOS only. ``f0_tracks``: precomputed
        ``f0_track(wav)`` per item (F0 stream only), instead of running Praat again."""
        if audio is None:
            raise ValueError("SerSlmProcessor needs audio=")
        if isinstance(audio, np.ndarray) and audio.ndim == 1:
            audio = [audio]
        if captions is not None:
            captions = [captions] if isinstance(captions, str) else list(captions)
            if len(captions) != len(audio):
                raise ValueError(f"{len(audio)} audio items but {len(captions)} captions")
        input_features, feature_mask, energy, f0, n_tokens = self._audio_inputs(audio, sampling_rate, f0_tracks)
        tokens = self.caption_inputs(
            self.prompt_ids(n_tokens),
            captions,
            with_sed=with_sed,
            padding_side=padding_side,
        )
        data = {
            **tokens,
            "input_features": input_features,
            "feature_attention_mask": feature_mask,
            "energy": energy,
        }
        if f0 is not None:
            data["f0"] = f0
        return BatchFeature(data=data, tensor_type=None)

    def prompt_ids(self, num_audio_tokens: Sequence[int]) -> list[list[int]]:
        """One prompt's token ids per item: BOS, that many audio placeholders, the instruction
        (0 placeholders: the text-only prompt of ``trustser.text_prior``); the instruction is
        tokenized once per call."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        instr = list(tok(" " + self.instruction if self.instruction else "", add_special_tokens=False)["input_ids"])
        return [bos + [self.audio_token_id] * int(n) + instr for n in num_audio_tokens]

    def caption_inputs(
        self,
        prompts: Sequence[Sequence[int]],
        captions: Sequence[str] | None = None,
        with_sed: bool = True,
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token tensors of prompt (token ids: BOS, audio placeholders, instruction) + caption + EOS
        rows, padded: ``input_ids`` and ``attention_mask``; with captions also ``labels`` (caption
        and EOS only), ``sed_token_index`` (each descriptor's first token, -1 if absent) and
        ``emotion_token_mask``. ``captions=None``: the prompts alone (generation, left-padded). One
        place for both ``__call__`` and the rectification trainer (which reuses collated prompts)."""
        tok = self.tokenizer
        rows, label_rows, sed_index, emo_pos = [], [], [], []
        enc = (
            tok(list(captions), add_special_tokens=False, return_offsets_mapping=True) if captions is not None else None
        )
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for i, prompt in enumerate(prompts):
            prompt = list(prompt)
            if captions is None:
                rows.append(prompt)
                continue
            cap_ids = list(enc["input_ids"][i]) + eos
            offsets = list(enc["offset_mapping"][i])
            spans = self.caption_spans(captions[i], with_sed=with_sed)
            start = len(prompt)

            def tokens_in(span):
                s, e = span
                return [start + j for j, (ts, te) in enumerate(offsets) if te > s and ts < e and te > ts]

            sed_index.append([(tokens_in(spans[f]) or [-1])[0] if f in spans else -1 for f in SED_FIELDS])
            emo_pos.append(tokens_in(spans["emotion"]) if "emotion" in spans else [])
            rows.append(prompt + cap_ids)
            label_rows.append([-100] * len(prompt) + cap_ids)
        side = padding_side or ("left" if captions is None else "right")
        length = max(len(r) for r in rows)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        emo_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        shifts = []
        for i, r in enumerate(rows):
            off = length - len(r) if side == "left" else 0
            shifts.append(off)
            ids[i, off : off + len(r)] = torch.tensor(r)
            mask[i, off : off + len(r)] = 1
            if captions is not None:
                labels[i, off : off + len(r)] = torch.tensor(label_rows[i])
                for p in emo_pos[i]:
                    emo_mask[i, p + off] = True
        out = {"input_ids": ids, "attention_mask": mask}
        if captions is not None:
            out["labels"] = labels
            out["sed_token_index"] = torch.tensor(
                [[p + shifts[i] if p >= 0 else -1 for p in row] for i, row in enumerate(sed_index)], dtype=torch.long
            )
            out["emotion_token_mask"] = emo_mask
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "input_features", "feature_attention_mask", "energy"] + (
            ["f0"] if self.f0_stream else []
        )


__all__ = ["SerSlmProcessor", "F0_TRACK_COLUMN", "clip_f0_track", "frame_log_energy", "praat_f0"]
