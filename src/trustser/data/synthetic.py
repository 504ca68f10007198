"""A synthetic emotional speech corpus in the paper's data regime, with known ground truth.

Why it exists: IEMOCAP, MELD and SpeechCraft cannot be downloaded everywhere, yet every claim of the
method (annotation accuracy, CEM quality, how many labels the controller repairs, SER accuracy per
system) needs ground truth. ``espeak-ng`` speaks two sentence banks with one voice per speaker; every
acoustic control is drawn by the generator, so the descriptors are known exactly.

Version 2 mirrors the paper's regime (section 5.1; docs/synthetic.md):

* ``reference`` plays SpeechCraft: many speakers, mostly typical adult voices, read speech of its
  own sentence bank, a neutral-heavy emotion prior and mild expression, a clean channel. Its
  ``emotion`` column is what a simulated automatic emotion labeller (emotion2vec's role) says
  (``EMOTION_LABELLER``: about a quarter wrong); ``emotion_true`` keeps the truth. Its descriptors are
  meant to come from the annotation tool, like SpeechCraft's (``trustser annotate``: ``<field>_auto``).
* ``train`` / ``dev`` / ``test`` play IEMOCAP: acted, balanced emotions with an expression table of
  their own (``TARGET_EFFECTS``), their own emotional lines, a recording channel that pre-training
  never sees (a reverberant room and a coloured noise floor: outside ``ChannelAugmentation``'s
  family), and half of the speakers from the groups a population-calibrated tool gets wrong
  (children, the elderly, unusually high and low voices). Emotion labels are the truth. The three
  splits have disjoint speakers: ``dev`` (choices) and ``test`` (the figures) are held out.

The generative story (all draws come from one seed, so a corpus is reproducible byte for byte):

* speaker = group norm of F0, speaking rate and level + a small individual deviation (smaller than
  one category's width), plus a timbre characteristic of the group (formants, flutter, roughness,
  breath), so a listener can infer the baseline from the voice;
* utterance = emotion -> speaker-relative offsets of pitch / volume / speed (in "category units":
  ``|z| <= 0.5`` is normal) + per-utterance noise; the category of the offset is the ground-truth
  descriptor. What a descriptor *means* is relative to the speaker; fixed thresholds read absolute
  levels, which is right for typical voices and wrong for atypical ones.

Layout (``datasets`` ``audiofolder`` compatible)::

    OUT/manifest.json              every generator setting, the version, per-split counts
    OUT/speakers.json              speaker table (group, baselines, voice)
    OUT/<split>/metadata.csv       file_name + id, text, emotion, speaker, group, gender, age, pitch, volume,
                                   speed, *_z (+ emotion_true in reference)
    OUT/<split>/wav/<id>.wav       16 kHz mono PCM-16
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..utils import TARGET_SR, atomic_directory, atomic_write_json

GENERATOR_VERSION = "2.0"
SPLITS: tuple[str, ...] = ("reference", "train", "dev", "test")
LABEL_COLUMNS: tuple[str, ...] = (
    "id",
    "text",
    "emotion",
    "speaker",
    "group",
    "gender",
    "age",
    "pitch",
    "volume",
    "speed",
)
OFFSET_COLUMNS: tuple[str, ...] = ("pitch_z", "volume_z", "speed_z")
TRUE_EMOTION_COLUMN = "emotion_true"  # reference only: the truth behind the automatic emotion label

SIZES: dict[str, dict[str, int]] = {
    "default": {"reference": 3200, "train": 800, "dev": 800, "test": 2400},
    "small": {"reference": 200, "train": 80, "dev": 40, "test": 80},
}
SPLIT_DOMAIN = {"reference": "pretrain", "train": "target", "dev": "target", "test": "target"}
SPLIT_CHANNEL = {"reference": "clean", "train": "room", "dev": "room", "test": "room"}

GENDERS: tuple[str, ...] = ("male", "female")
AGE_GROUPS: tuple[str, ...] = ("child", "young adult", "middle-aged", "elderly")  # names from SED_VOCAB["age"]
# A speaker group's kind: what makes a population-calibrated tool right or wrong for it.
KINDS: tuple[str, ...] = ("typical", "child", "elderly", "high voice", "low voice")


@dataclass(frozen=True)
class GroupNorm:
    """Baseline of a speaker group and the timbre that makes it recognisable."""

    gender: str
    age: str
    kind: str  # one of KINDS
    f0_hz: float  # mean F0 of neutral speech
    rate_wpm: float  # espeak-ng -s
    level_dbfs: float  # RMS level of the utterance
    formant_scale: float  # percent applied to formants 1-5 (vocal-tract length)
    flutter: int
    roughness: int
    breath: int  # breath noise amount on the higher formants (0 = none)
    voicing: int  # percent; < 100 for breathy voices


def _group(
    gender, age, kind, f0, rate, level, formants, flutter, roughness, breath=0, voicing=100
) -> tuple[str, GroupNorm]:
    name = f"{gender}/{age}" + ("" if kind in ("typical", "child", "elderly") else f"/{kind}")
    return name, GroupNorm(gender, age, kind, f0, rate, level, formants, flutter, roughness, breath, voicing)


# Typical adults sit at the population mean that a released tool is calibrated on; the other groups are
# whole categories away from it in at least one field (children: high, quiet, slow; the elderly: quiet,
# slow; high voices: high and loud; low voices: low and fast), each with a timbre that gives it away.
GROUP_NORMS: dict[str, GroupNorm] = dict(
    [
        # young and middle-aged adults share the population's baselines; age shows in the timbre only
        # (longer vocal tract, a rougher, less steady voice), as it does for a real age classifier
        _group("male", "young adult", "typical", 115.0, 195.0, -30.0, 101.0, 2, 1),
        _group("female", "young adult", "typical", 205.0, 195.0, -30.0, 113.0, 3, 0),
        _group("male", "middle-aged", "typical", 110.0, 190.0, -30.5, 94.0, 9, 6),
        _group("female", "middle-aged", "typical", 198.0, 188.0, -30.5, 105.0, 10, 5),
        _group("male", "child", "child", 185.0, 160.0, -33.5, 118.0, 6, 1),
        _group("female", "child", "child", 260.0, 160.0, -33.5, 122.0, 6, 1),
        _group("male", "elderly", "elderly", 120.0, 150.0, -33.5, 97.0, 18, 5, 20, 85),
        _group("female", "elderly", "elderly", 185.0, 150.0, -33.5, 104.0, 18, 4, 20, 85),
        _group("male", "young adult", "high voice", 158.0, 195.0, -27.0, 106.0, 3, 0),
        _group("female", "young adult", "high voice", 275.0, 195.0, -27.0, 118.0, 3, 0),
        _group("male", "middle-aged", "low voice", 88.0, 235.0, -30.5, 91.0, 5, 6),
        _group("female", "middle-aged", "low voice", 160.0, 235.0, -30.5, 102.0, 6, 5),
    ]
)
TYPICAL_GROUPS = tuple(g for g, n in GROUP_NORMS.items() if n.kind == "typical")
ATYPICAL_GROUPS = tuple(g for g, n in GROUP_NORMS.items() if n.kind != "typical")
# speakers per group and split (every speaker belongs to one split only)
SPEAKERS: dict[str, dict[str, dict[str, int]]] = {
    "default": {
        # SpeechCraft's role: 32 speakers, 28 typical adults, 4 children/elderly, no unusual voices
        "reference": {
            **{g: 7 for g in TYPICAL_GROUPS},
            "male/child": 1,
            "female/child": 1,
            "male/elderly": 1,
            "female/elderly": 1,
        },
        # IEMOCAP's role: 16 speakers per split, half of them from the groups a calibrated tool gets wrong
        **{s: {**{g: 2 for g in TYPICAL_GROUPS}, **{g: 1 for g in ATYPICAL_GROUPS}} for s in ("train", "dev", "test")},
    },
    "small": {
        "reference": {**{g: 2 for g in TYPICAL_GROUPS}, "female/child": 1, "male/elderly": 1},
        **{
            s: {
                **{g: 1 for g in TYPICAL_GROUPS},
                "male/child": 1,
                "female/elderly": 1,
                "male/young adult/high voice": 1,
                "female/middle-aged/low voice": 1,
            }
            for s in ("train", "dev", "test")
        },
    },
}

# One category unit of each descriptor, as a control offset; categories are z < -0.5 (low/slow),
# |z| <= 0.5 (normal), z > 0.5 (high/fast).
UNITS = {"pitch_semitones": 2.5, "volume_db": 3.0, "speed_log_rate": 0.25}
BOUNDARY = 0.5
EMOTIONS: tuple[str, ...] = ("neutral", "happy", "angry", "sad")
EMOTION_PRIOR: dict[str, dict[str, float]] = {
    "pretrain": {"neutral": 0.6, "happy": 0.15, "angry": 0.1, "sad": 0.15},  # podcasts and audiobooks
    "target": {"neutral": 0.25, "happy": 0.25, "angry": 0.25, "sad": 0.25},  # acted, balanced
}
# mean speaker-relative offset (pitch, volume, speed) of each emotion, in category units: mild in read
# speech, stronger and differently shaped when acted (happy speeds up, anger is loud but not fast)
EMOTION_EFFECTS: dict[str, dict[str, tuple[float, float, float]]] = {
    "pretrain": {
        "neutral": (0.0, 0.0, 0.0),
        "happy": (0.5, 0.2, 0.2),
        "angry": (0.2, 0.6, 0.3),
        "sad": (-0.4, -0.4, -0.5),
    },
    "target": {
        "neutral": (0.0, 0.0, 0.0),
        "happy": (1.0, 0.3, 0.7),
        "angry": (0.4, 1.1, 0.1),
        "sad": (-0.9, -0.8, -0.9),
    },
}
UTTERANCE_NOISE_SD = {"pretrain": 0.6, "target": 0.5}  # spread around the emotion's mean (category units)
Z_CLIP = 2.0  # keeps espeak-ng's rate within 80-450 wpm and F0 within Praat's 60-600 Hz
INDIVIDUAL_SD = 0.25  # a speaker's deviation from the group norm (category units) ...
INDIVIDUAL_CLIP = 0.45  # ... never a whole category (width 1.0)
# The automatic emotion labeller of the pre-training corpus: P(label | true emotion), rows and columns
# in EMOTIONS order. Under the pre-training prior it is wrong for ~24% of the utterances, mostly by
# calling expressive speech neutral (what speech emotion models do on read speech).
EMOTION_LABELLER: dict[str, tuple[float, float, float, float]] = {
    "neutral": (0.82, 0.07, 0.04, 0.07),
    "happy": (0.25, 0.66, 0.05, 0.04),
    "angry": (0.22, 0.08, 0.66, 0.04),
    "sad": (0.27, 0.03, 0.02, 0.68),
}
# probability that the transcript carries the utterance's own emotional wording / another emotion's (each)
TEXT_OWN_EMOTION = {"pretrain": 0.15, "target": 0.35}
TEXT_OTHER_EMOTION = {"pretrain": 0.03, "target": 0.05}
CHANNELS = {
    "clean": {"reverb_rt60_s": None, "noise_dbfs": None},
    # a reverberant room (exponentially decaying noise response, direct path kept) and a low-passed noise
    # floor: neither is a band-pass nor white noise, so pre-training's ChannelAugmentation never covers it
    "room": {"reverb_rt60_s": 0.25, "direct_to_reverb_db": 6.0, "noise_dbfs": -68.0, "noise_lowpass_hz": 1200.0},
}
# espeak-ng's -s is words per minute; the target's conversational lines have fewer phonemes per word than
# the read sentences (measured: log(phonemes/s / wpm) -2.643 vs -2.593 on 60 clean renders of each bank),
# so the target's speakers talk this much faster in wpm to keep their phoneme rate, which is what the
# speed descriptor and the annotation tool measure
DOMAIN_RATE_FACTOR = {"pretrain": 1.0, "target": 1.05}
ESPEAK_SAMPLE_RATE = 22050
ESPEAK_BASE_VOICE = "en-us"
PITCH_RANGE = (1.22, 1.38)  # intonation top / base of the variant file, drawn per speaker

# ------------------------------------------------------------------------------------------
# Sentence banks: read speech for the pre-training corpus; conversational lines and acted
# emotional phrases for the target corpus.
# ------------------------------------------------------------------------------------------
READ_SENTENCES: tuple[str, ...] = (
    "the river flows slowly through the valley towards the sea",
    "in the spring the farmers plant wheat and barley in the fields",
    "the old lighthouse guided ships along the rocky coast for a century",
    "scientists measured the temperature of the lake every morning",
    "the library holds more than a million books and maps",
    "a narrow path leads from the village to the top of the hill",
    "the committee published its annual report in the autumn",
    "most birds in the region migrate south before the winter",
    "the bridge was built from stone and finished in eighteen ninety",
    "the museum displays tools used by the first settlers",
    "the town council meets on the first Monday of every month",
    "the recipe calls for flour butter sugar and two eggs",
    "the train crosses the border shortly after midnight",
    "the forest covers almost half of the island",
    "the author wrote her first novel while working as a teacher",
    "the market square is surrounded by narrow wooden houses",
    "this episode looks at how cities manage their water supply",
    "the company opened a second factory near the harbour",
    "the orchestra rehearsed the symphony for three weeks",
    "the mountain road is closed during heavy snow",
    "the chapter describes the history of the printing press",
    "the painter spent the summer on a small farm in the south",
    "the survey asked residents about public transport",
    "the ship carried grain cotton and timber across the ocean",
    "the garden was designed by a famous architect",
    "our guest today studies the behaviour of honey bees",
    "the castle was rebuilt after a fire in the sixteenth century",
    "the festival attracts visitors from all over the country",
    "the coast is known for its cliffs and quiet beaches",
    "the engineers tested the new engine in the desert",
    "the school was founded by a group of local families",
    "the article compares the climate of the two regions",
    "the road follows the river for about twenty miles",
    "the professor explained the theory in simple terms",
    "the company reported higher sales in the last quarter",
    "the valley is famous for its vineyards and orchards",
    "the observatory sits on a hill above the city",
    "the collection includes letters written during the war",
    "the island can only be reached by ferry",
    "the next part of the story takes place in a small fishing town",
)
TARGET_CLAUSES: tuple[str, ...] = (
    "the meeting is on Tuesday at noon",
    "the train leaves from platform four",
    "I put the keys on the kitchen table",
    "we need two more chairs for the room",
    "the shop closes at six in the evening",
    "she sent the report this morning",
    "the bus was a little late today",
    "please turn left at the next corner",
    "the package arrived at the office",
    "they painted the fence last weekend",
    "my brother lives near the station",
    "he wrote the numbers on a card",
    "we moved the desk closer to the window",
    "I read the letter after lunch",
    "our flight lands at half past nine",
    "she bought bread and some apples",
    "the car is parked behind the house",
    "I left my jacket at the restaurant",
    "they will call us after the interview",
    "we walked to the market on Saturday",
    "the doctor moved the appointment to Friday",
    "he fixed the bicycle in the garage",
    "the kids played in the park",
    "my sister found the old photographs",
    "the rent is due at the end of the month",
    "we ordered a pizza for dinner",
    "the results come out next week",
    "he carried the boxes up the stairs",
    "she changed the password yesterday",
    "we talked about it on the way home",
)
NEUTRAL_PREFIXES: dict[str, tuple[str, ...]] = {
    "pretrain": ("today", "meanwhile", "in fact", "at first", "later", "according to the records"),
    "target": ("well", "so", "okay", "you know", "as I said", "by the way", "right", "anyway", "I think", "apparently"),
}
EMOTIONAL_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {
        "happy": ("happily", "to everyone's delight", "with great joy", "luckily"),
        "angry": ("to the anger of many", "outrageously", "in a furious protest", "annoyingly"),
        "sad": ("sadly", "to our great sorrow", "tragically", "with a heavy heart"),
    },
    "target": {
        "happy": (
            "oh how wonderful",
            "I am so happy",
            "this is great news",
            "I love it",
            "what a lovely surprise",
            "that is fantastic",
            "I am delighted",
            "hooray",
            "this is brilliant",
            "I feel wonderful",
        ),
        "angry": (
            "this is ridiculous",
            "I am furious",
            "how dare you",
            "this is unacceptable",
            "stop it right now",
            "I hate this",
            "that is outrageous",
            "what a stupid mess",
            "I am sick of this",
            "leave me alone",
        ),
        "sad": (
            "I feel so lonely",
            "I miss her so much",
            "this is heartbreaking",
            "I am so sorry",
            "it hurts so much",
            "everything feels empty",
            "I wish it were different",
            "nobody cares anymore",
            "I feel hopeless",
            "such a sad day",
        ),
    },
}
SENTENCES = {"pretrain": READ_SENTENCES, "target": TARGET_CLAUSES}


def sed_category(field: str, z: float) -> str:
    """Descriptor category of a speaker-relative offset in category units."""
    low, high = ("slow", "fast") if field == "speed" else ("low", "high")
    if z < -BOUNDARY:
        return low
    if z > BOUNDARY:
        return high
    return "normal"


def speaker_group_kind(group: str) -> str:
    """The kind (``KINDS``) of a group name such as ``"female/child"``."""
    return GROUP_NORMS[group].kind


def settings(seed: int = 0, size: str = "default") -> dict:
    """Every setting the output depends on (the cache key, recorded in manifest.json)."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic corpus size {size!r}; choose from {sorted(SIZES)}")
    return {
        "generator": "trustser.data.synthetic",
        "version": GENERATOR_VERSION,
        "espeak_ng": espeak_version(),
        "espeak_base_voice": ESPEAK_BASE_VOICE,
        "seed": int(seed),
        "size": size,
        "sample_rate": TARGET_SR,
        "split_sizes": SIZES[size],
        "speakers": SPEAKERS[size],
        "split_domain": SPLIT_DOMAIN,
        "split_channel": SPLIT_CHANNEL,
        "channels": CHANNELS,
        "domain_rate_factor": DOMAIN_RATE_FACTOR,
        "group_norms": {g: asdict(n) for g, n in GROUP_NORMS.items()},
        "units": UNITS,
        "boundary": BOUNDARY,
        "emotion_prior": EMOTION_PRIOR,
        "emotion_effects": {d: {k: list(v) for k, v in t.items()} for d, t in EMOTION_EFFECTS.items()},
        "emotion_labeller": {k: list(v) for k, v in EMOTION_LABELLER.items()},
        "utterance_noise_sd": UTTERANCE_NOISE_SD,
        "z_clip": Z_CLIP,
        "individual_sd": INDIVIDUAL_SD,
        "individual_clip": INDIVIDUAL_CLIP,
        "pitch_range": list(PITCH_RANGE),
        "text_own_emotion": TEXT_OWN_EMOTION,
        "text_other_emotion": TEXT_OTHER_EMOTION,
        "sentence_bank_sha256": hashlib.sha256(
            json.dumps([SENTENCES, NEUTRAL_PREFIXES, EMOTIONAL_PHRASES], sort_keys=True).encode()
        ).hexdigest(),
    }


# ------------------------------------------------------------------------------------------
# espeak-ng
# ------------------------------------------------------------------------------------------
def _espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            "espeak-ng is not installed (needed to synthesise the corpus): "
            "`apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    return exe


def _espeak_info() -> tuple[str, Path]:
    out = subprocess.run([_espeak_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"text-to-speech:\s*(\S+)\s+Data at:\s*(.+)$", out.strip(), re.MULTILINE)
    if not m:
        raise RuntimeError(f"cannot parse `espeak-ng --version` output: {out!r}")
    return m.group(1), Path(m.group(2).strip())


def espeak_version() -> str:
    return _espeak_info()[0]


def _make_data_dir(tmp: Path) -> Path:
    """A private espeak-ng data dir: links to the system one, plus a writable variants folder
    (espeak-ng only looks variants up by name inside ``<data>/voices/!v``)."""
    _, system = _espeak_info()
    data = tmp / "espeak-ng-data"
    (data / "voices" / "!v").mkdir(parents=True)
    for entry in system.iterdir():
        if entry.name != "voices":
            os.symlink(entry, data / entry.name)
    for entry in (system / "voices").iterdir():
        if entry.name != "!v":
            os.symlink(entry, data / "voices" / entry.name)
    return data


# ------------------------------------------------------------------------------------------
# The plan: every random draw, made up front in the parent process.
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speaker:
    speaker: str
    group: str  # key of GROUP_NORMS
    kind: str
    gender: str
    age: str
    split: str  # every speaker records for one split only
    f0_hz: float
    rate_wpm: float
    level_dbfs: float
    deviation: tuple[float, float, float]  # individual (pitch, volume, speed) offset from the group norm
    pitch_range: float
    formants: tuple[float, ...]  # percent, formants 0-5
    flutter: int
    roughness: int
    breath: int
    voicing: int
    room_seed: int  # the speaker's recording room (target channel)


def make_speakers(seed: int, size: str = "default") -> list[Speaker]:
    rng = np.random.default_rng([seed, 1])
    speakers: list[Speaker] = []
    for split in SPLITS:
        for group, count in SPEAKERS[size][split].items():
            norm = GROUP_NORMS[group]
            for _ in range(count):
                dev = np.clip(rng.normal(0.0, INDIVIDUAL_SD, 3), -INDIVIDUAL_CLIP, INDIVIDUAL_CLIP)
                scale = norm.formant_scale * (1.0 + rng.uniform(-0.03, 0.03))
                formants = tuple(
                    round(float(scale * (1.0 + rng.uniform(-0.02, 0.02))), 1) if k else 100.0 for k in range(6)
                )
                speakers.append(
                    Speaker(
                        speaker=f"spk{len(speakers):03d}",
                        group=group,
                        kind=norm.kind,
                        gender=norm.gender,
                        age=norm.age,
                        split=split,
                        f0_hz=round(norm.f0_hz * 2 ** (dev[0] * UNITS["pitch_semitones"] / 12), 2),
                        rate_wpm=round(norm.rate_wpm * math.exp(dev[2] * UNITS["speed_log_rate"]), 2),
                        level_dbfs=round(norm.level_dbfs + dev[1] * UNITS["volume_db"], 2),
                        deviation=tuple(round(float(d), 4) for d in dev),
                        pitch_range=round(float(rng.uniform(*PITCH_RANGE)), 3),
                        formants=formants,
                        flutter=int(max(0, norm.flutter + rng.integers(-2, 3))),
                        roughness=int(np.clip(norm.roughness + rng.integers(-1, 2), 0, 7)),
                        breath=int(max(0, norm.breath + (rng.integers(-5, 6) if norm.breath else 0))),
                        voicing=norm.voicing,
                        room_seed=int(rng.integers(2**31)),
                    )
                )
    return speakers


@dataclass(frozen=True)
class Utterance:
    id: str
    split: str
    speaker: Speaker
    text: str
    emotion: str  # the truth
    emotion_label: str  # what the corpus says: the truth in the target, the automatic labeller's in reference
    z: tuple[float, float, float]  # speaker-relative (pitch, volume, speed) offset, category units
    f0_hz: float
    rate_wpm: int
    level_dbfs: float
    channel: str
    noise_seed: int

    @property
    def labels(self) -> dict[str, str]:
        return {f: sed_category(f, v) for f, v in zip(("pitch", "volume", "speed"), self.z)}


def _choose_text(rng: np.random.Generator, emotion: str, domain: str) -> str:
    phrases_by_emotion = EMOTIONAL_PHRASES[domain]
    others = [e for e in phrases_by_emotion if e != emotion]
    r = rng.random()
    if emotion in phrases_by_emotion and r < TEXT_OWN_EMOTION[domain]:
        source = emotion
    elif r > 1.0 - TEXT_OTHER_EMOTION[domain] * len(others):
        source = others[int(rng.integers(len(others)))]
    else:
        source = None
    bank = SENTENCES[domain]
    clause = bank[int(rng.integers(len(bank)))]
    if source is not None:
        phrases = phrases_by_emotion[source]
        lead = phrases[int(rng.integers(len(phrases)))]
    elif rng.random() < 0.5:
        prefixes = NEUTRAL_PREFIXES[domain]
        lead = prefixes[int(rng.integers(len(prefixes)))]
    else:
        return clause[0].upper() + clause[1:] + "."
    return lead[0].upper() + lead[1:] + ", " + clause + "."


def label_emotion(rng: np.random.Generator, emotion: str) -> str:
    """The simulated automatic emotion labeller (``EMOTION_LABELLER``): one draw per utterance."""
    return EMOTIONS[int(rng.choice(len(EMOTIONS), p=np.asarray(EMOTION_LABELLER[emotion])))]


def make_plan(seed: int = 0, size: str = "default") -> tuple[list[Speaker], list[Utterance]]:
    """All speakers and utterances with their controls; deterministic for ``(seed, size)``."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic corpus size {size!r}; choose from {sorted(SIZES)}")
    speakers = make_speakers(seed, size)
    utterances: list[Utterance] = []
    for s_idx, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 2, s_idx])
        domain = SPLIT_DOMAIN[split]
        prior = np.array([EMOTION_PRIOR[domain][e] for e in EMOTIONS])
        pool = [s for s in speakers if s.split == split]
        n = SIZES[size][split]
        # balanced speakers: each speaker gets n / len(pool) utterances (+-1), in shuffled order
        spk_order = np.resize(np.arange(len(pool)), n)
        rng.shuffle(spk_order)
        for i in range(n):
            spk = pool[int(spk_order[i])]
            emotion = EMOTIONS[int(rng.choice(len(EMOTIONS), p=prior))]
            z = np.asarray(EMOTION_EFFECTS[domain][emotion]) + rng.normal(0.0, UTTERANCE_NOISE_SD[domain], 3)
            z = tuple(round(float(v), 4) for v in np.clip(z, -Z_CLIP, Z_CLIP))
            text = _choose_text(rng, emotion, domain)
            label = label_emotion(rng, emotion) if domain == "pretrain" else emotion
            rate = spk.rate_wpm * DOMAIN_RATE_FACTOR[domain] * math.exp(z[2] * UNITS["speed_log_rate"])
            if not 80 <= rate <= 450:  # espeak-ng's range: outside it the control would not be the truth
                raise ValueError(f"speaking rate {rate:.0f} wpm outside espeak-ng's 80-450; check GROUP_NORMS/UNITS")
            utterances.append(
                Utterance(
                    id=f"{split}-{i:05d}",
                    split=split,
                    speaker=spk,
                    text=text,
                    emotion=emotion,
                    emotion_label=label,
                    z=z,
                    f0_hz=round(spk.f0_hz * 2 ** (z[0] * UNITS["pitch_semitones"] / 12), 2),
                    rate_wpm=int(round(rate)),
                    level_dbfs=round(spk.level_dbfs + z[1] * UNITS["volume_db"], 3),
                    channel=SPLIT_CHANNEL[split],
                    noise_seed=int(rng.integers(2**31)),
                )
            )
    return speakers, utterances


# ------------------------------------------------------------------------------------------
# Rendering one utterance (runs in worker processes)
# ------------------------------------------------------------------------------------------
def _variant_text(u: Utterance) -> str:
    s = u.speaker
    # espeak-ng's mean F0 sits ~40% into the [base, top] intonation range
    base = u.f0_hz / (1.0 + 0.4 * (s.pitch_range - 1.0))
    lines = [
        "language variant",
        f"name {u.id}",
        f"gender {s.gender if s.gender in ('male', 'female') else 'none'}",
        f"pitch {int(round(base))} {int(round(base * s.pitch_range))}",
        f"flutter {s.flutter}",
        f"roughness {s.roughness}",
        f"voicing {s.voicing}",
    ]
    lines += [f"formant {k} {s.formants[k]:.0f} 100 100" for k in range(6)]
    if s.breath:
        lines.append("breath 0 0 0 0 " + " ".join([str(s.breath)] * 4))
    return "\n".join(lines) + "\n"


def _room(x: np.ndarray, channel: dict, room_seed: int, noise_seed: int) -> np.ndarray:
    """The target corpus' recording channel: the speaker's room (an exponentially decaying noise
    impulse response with RT60 ``reverb_rt60_s``, the direct path ``direct_to_reverb_db`` above the
    reverberant energy) and a low-passed noise floor. Deterministic given the seeds."""
    from scipy.signal import butter, fftconvolve, sosfilt

    rt60 = channel["reverb_rt60_s"]
    n = int(rt60 * TARGET_SR)
    t = np.arange(n) / TARGET_SR
    tail = np.random.default_rng(room_seed).normal(0.0, 1.0, n) * np.exp(-6.9 * t / rt60)
    tail[0] = 0.0
    tail *= 10 ** (-channel["direct_to_reverb_db"] / 20) / max(float(np.sqrt(np.sum(tail**2))), 1e-12)
    tail[0] = 1.0
    y = fftconvolve(x, tail)[: x.size]
    noise = np.random.default_rng(noise_seed).normal(0.0, 1.0, y.size)
    noise = sosfilt(butter(2, channel["noise_lowpass_hz"], btype="lowpass", fs=TARGET_SR, output="sos"), noise)
    noise *= 10 ** (channel["noise_dbfs"] / 20) / max(float(np.sqrt(np.mean(noise**2))), 1e-12)
    return y, noise


def render_utterance(u: Utterance, data_dir: Path, work_dir: Path) -> np.ndarray:
    """The utterance's 16 kHz float waveform (deterministic)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    variant = data_dir / "voices" / "!v" / u.id
    variant.write_text(_variant_text(u))
    wav_path = work_dir / f"{u.id}.raw.wav"
    cmd = [
        _ESPEAK or _espeak_binary(),
        "--path",
        str(data_dir),
        "-v",
        f"{ESPEAK_BASE_VOICE}+{u.id}",
        "-s",
        str(u.rate_wpm),
        "-a",
        "100",
        "-w",
        str(wav_path),
        u.text,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wav_path.exists():
        raise RuntimeError(f"espeak-ng failed for {u.id} ({' '.join(cmd)}): {proc.stderr.strip()}")
    x, sr = sf.read(str(wav_path), dtype="float64")
    wav_path.unlink()
    variant.unlink()
    if sr != ESPEAK_SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng produced {sr} Hz audio, expected {ESPEAK_SAMPLE_RATE}")
    g = math.gcd(TARGET_SR, sr)
    x = resample_poly(x, TARGET_SR // g, sr // g)
    # loudness is set digitally: the RMS level is exactly the control (espeak -a interacts with pitch)
    rms = float(np.sqrt(np.mean(x**2)))
    if rms <= 0:
        raise RuntimeError(f"espeak-ng produced silence for {u.id}: {u.text!r}")
    x = x * (10 ** (u.level_dbfs / 20) / rms)
    channel = CHANNELS[u.channel]
    if channel["reverb_rt60_s"] is not None:
        # the level is the control: the reverberant speech is brought back to it, the noise floor comes on top
        x, noise = _room(x, channel, u.speaker.room_seed, u.noise_seed)
        x = x * (10 ** (u.level_dbfs / 20) / float(np.sqrt(np.mean(x**2)))) + noise
    peak = float(np.max(np.abs(x)))
    if peak >= 1.0:
        raise RuntimeError(f"{u.id}: level {u.level_dbfs} dBFS clips (peak {peak:.2f}); lower the group norms")
    return x.astype(np.float32)


_ESPEAK: str | None = None


def _render_job(job: tuple[Utterance, str, str, str]) -> tuple[str, float]:
    import soundfile as sf

    u, data_dir, work_dir, out_path = job
    x = render_utterance(u, Path(data_dir), Path(work_dir))
    sf.write(out_path, x, TARGET_SR, subtype="PCM_16", format="WAV")
    return u.id, len(x) / TARGET_SR


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _write_metadata(path: Path, rows: list[Utterance]) -> None:
    with_truth = (
        bool(rows) and SPLIT_DOMAIN[rows[0].split] == "pretrain"
    )  # the corpus' emotion label is automatic there
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file_name", *LABEL_COLUMNS, *OFFSET_COLUMNS, *([TRUE_EMOTION_COLUMN] if with_truth else [])])
    for u in rows:
        lab, s = u.labels, u.speaker
        w.writerow(
            [
                f"wav/{u.id}.wav",
                u.id,
                u.text,
                u.emotion_label,
                s.speaker,
                s.group,
                s.gender,
                s.age,
                lab["pitch"],
                lab["volume"],
                lab["speed"],
                *(_fmt(v) for v in u.z),
                *([u.emotion] if with_truth else []),
            ]
        )
    path.write_text(buf.getvalue(), encoding="utf-8")


def _is_current(out: Path, expected: dict) -> bool:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if found.get("settings") != expected:
        return False
    for split, info in found.get("splits", {}).items():
        meta = out / split / "metadata.csv"
        if not meta.is_file() or hashlib.sha256(meta.read_bytes()).hexdigest() != info.get("metadata_sha256"):
            return False
        with meta.open(newline="", encoding="utf-8") as fh:
            if not all((meta.parent / r["file_name"]).is_file() for r in csv.DictReader(fh)):
                return False
    return set(found.get("splits", {})) == set(SPLITS)


def synthesize_corpus(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: str = "default",
    num_proc: int | None = None,
    *,
    progress: bool | None = None,
) -> Path:
    """Generates the corpus into ``out_dir`` (atomically) and returns its path.

    A second call with the same settings is a no-op (the manifest is compared); different settings
    regenerate it. ``num_proc`` worker processes (default: all cores) render the utterances; the
    output does not depend on it."""
    global _ESPEAK
    out = Path(out_dir)
    expected = json.loads(json.dumps(settings(seed, size)))
    if _is_current(out, expected):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise FileExistsError(
            f"{out} exists and is not a trustser synthetic corpus (no manifest.json); "
            "choose another directory or remove it"
        )
    _ESPEAK = _espeak_binary()
    speakers, utterances = make_plan(seed, size)
    if num_proc is None:
        num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_proc = max(1, int(num_proc))
    with atomic_directory(out) as tmp, tempfile.TemporaryDirectory(prefix="trustser-espeak-") as scratch:
        data_dir = _make_data_dir(Path(scratch))
        work_dir = Path(scratch) / "work"
        work_dir.mkdir()
        for split in SPLITS:
            (tmp / split / "wav").mkdir(parents=True)
        jobs = [(u, str(data_dir), str(work_dir), str(tmp / u.split / "wav" / f"{u.id}.wav")) for u in utterances]
        durations: dict[str, float] = {}
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(jobs), desc="synthesising", unit="utt", disable=(not progress) if progress is not None else None
        )
        if num_proc == 1:
            results: Iterable = map(_render_job, jobs)
            pool = None
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(num_proc)
            results = pool.imap_unordered(_render_job, jobs, chunksize=8)
        try:
            for uid, dur in results:
                durations[uid] = dur
                bar.update()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        split_info = {}
        for split in SPLITS:
            rows = [u for u in utterances if u.split == split]
            _write_metadata(tmp / split / "metadata.csv", rows)
            durs = [durations[u.id] for u in rows]
            split_info[split] = {
                "utterances": len(rows),
                "speakers": sorted({u.speaker.speaker for u in rows}),
                "channel": SPLIT_CHANNEL[split],
                "hours": round(sum(durs) / 3600, 4),
                "duration_s": {
                    "min": round(min(durs), 3),
                    "mean": round(float(np.mean(durs)), 3),
                    "max": round(max(durs), 3),
                },
                "emotions": {e: sum(u.emotion_label == e for u in rows) for e in EMOTIONS},
                "true_emotions": {e: sum(u.emotion == e for u in rows) for e in EMOTIONS},
                "kinds": {k: len({u.speaker.speaker for u in rows if u.speaker.kind == k}) for k in KINDS},
                "metadata_sha256": hashlib.sha256((tmp / split / "metadata.csv").read_bytes()).hexdigest(),
            }
        atomic_write_json(tmp / "speakers.json", [asdict(s) for s in speakers])
        from .. import __version__

        atomic_write_json(
            tmp / "manifest.json", {"settings": expected, "trustser_version": __version__, "splits": split_info}
        )
    return out


def _read_metadata(path: Path, stats=None) -> dict[str, list]:
    """One split's ``metadata.csv`` as columns. Errors name the file and line: text that is not
    UTF-8, a missing column, an offset that is not a number, and (``stats.on_unknown="error"``) an
    emotion or descriptor value outside the corpus' vocabulary; with ``"skip"`` such rows are
    skipped and counted. Rows whose wav is missing are skipped and listed (``stats.missing_audio``)."""
    from ..descriptors import EMOTION_LABELS, SED_FIELDS, normalize_sed_value
    from .schema import CorpusStats, read_text

    stats = stats if stats is not None else CorpusStats("synthetic", str(path.parent.parent), on_unknown="error")
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    needed = ["file_name", "id", *LABEL_COLUMNS[1:], *OFFSET_COLUMNS]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
    emotions = set(EMOTION_LABELS["synthetic"])
    extra = [c for c in (reader.fieldnames or []) if c == TRUE_EMOTION_COLUMN]
    cols: dict[str, list] = {c: [] for c in ("id", "audio", *LABEL_COLUMNS[1:], *OFFSET_COLUMNS, *extra)}
    for r in reader:
        lineno = reader.line_num
        unknown = [f"{c} {r[c]!r}" for c in ("emotion", *extra) if r[c] not in emotions]
        unknown += [f"{f} {r[f]!r}" for f in SED_FIELDS if normalize_sed_value(f, r[f]) is None]
        if unknown:
            stats.unknown_label(
                path,
                lineno,
                f"unknown label(s) {', '.join(unknown)} (emotions: {sorted(emotions)})",
                r["emotion"] if r["emotion"] not in emotions else ",".join(unknown),
            )
            continue
        audio = path.parent / r["file_name"]
        if not audio.is_file():
            stats.missing_audio.append(str(audio))
            continue
        try:
            offsets = {c: float(r[c]) for c in OFFSET_COLUMNS}
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{lineno}: offsets {[r[c] for c in OFFSET_COLUMNS]} are not numbers") from None
        cols["id"].append(r["id"])
        cols["audio"].append(str(audio))
        for c in (*LABEL_COLUMNS[1:], *extra):
            cols[c].append(r[c])
        for c, v in offsets.items():
            cols[c].append(v)
    return cols


def load_synthetic(
    root: str | os.PathLike,
    splits: Sequence[str] | None = None,
    *,
    generate: bool = False,
    seed: int = 0,
    size: str = "default",
    num_proc: int | None = None,
    on_unknown: str = "error",
):
    """The synthetic corpus as a ``datasets.DatasetDict`` (``audio`` cast to ``Audio(16000)``, labels
    as strings, ``*_z`` the exact speaker-relative offsets). ``generate=True`` synthesises it first
    when absent or out of date. Metadata errors name file and line; an unknown label is an error
    (``on_unknown="skip"``: skipped and counted); rows whose wav is missing are skipped and named
    (``corpus_stats(...)["missing_audio"]``), so a damaged corpus fails or shrinks at load time,
    not at the end of an annotation."""
    import datasets

    from .schema import CorpusStats, attach_stats, check_on_unknown

    root = Path(root)
    if generate:
        synthesize_corpus(root, seed=seed, size=size, num_proc=num_proc)
    if not (root / "manifest.json").is_file():
        what = "does not exist" if not root.exists() else "is not a synthetic corpus (no manifest.json)"
        raise FileNotFoundError(
            f"synthetic corpus {root} {what}; generate it with `trustser synth {root}` "
            f"(or load_corpus('synthetic', root, generate=True))"
        )
    wanted = list(SPLITS if splits is None else ([splits] if isinstance(splits, str) else splits))
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown synthetic split(s) {unknown}; available: {list(SPLITS)}")
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "id": string,
            "audio": datasets.Audio(sampling_rate=TARGET_SR),
            **{c: string for c in LABEL_COLUMNS[1:]},
            **{c: datasets.Value("float32") for c in OFFSET_COLUMNS},
        }
    )
    stats = CorpusStats("synthetic", str(root), {"on_unknown": on_unknown}, on_unknown=check_on_unknown(on_unknown))
    out = {}
    for split in wanted:
        meta = root / split / "metadata.csv"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{meta}: missing split {split!r} of the synthetic corpus; regenerate with `trustser synth {root}`"
            )
        cols = _read_metadata(meta, stats)
        feats = datasets.Features(
            {**features, **({TRUE_EMOTION_COLUMN: string} if TRUE_EMOTION_COLUMN in cols else {})}
        )
        out[split] = datasets.Dataset.from_dict(cols, features=feats, split=datasets.NamedSplit(split))
    if stats.missing_audio:
        stats.notes.append(
            f"{len(stats.missing_audio)} wav file(s) listed in the metadata are missing; regenerate with "
            f"`trustser synth {root}`"
        )
    stats.splits = {s: len(ds) for s, ds in out.items()}
    dd = datasets.DatasetDict(out)
    attach_stats(stats, dd)
    return dd
