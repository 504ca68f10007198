import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustser.descriptors import (
    EMOTION_LABELS,
    EMOTIONS,
    SED_FIELDS,
    SED_VOCAB,
    build_caption,
    map_emotion,
    normalize_sed_value,
    parse_caption,
    sed_accuracy,
)

ALL_SED = [dict(zip(SED_FIELDS, combo)) for combo in itertools.product(*(SED_VOCAB[f] for f in SED_FIELDS))]


def test_vocabularies():
    assert SED_FIELDS == ("pitch", "volume", "speed", "gender", "age")
    assert SED_VOCAB["speed"] == ("slow", "normal", "fast")
    assert len(SED_VOCAB["age"]) == 5
    assert len(ALL_SED) == 3 * 3 * 3 * 2 * 5
    for labels in EMOTION_LABELS.values():
        assert set(labels) <= set(EMOTIONS)


def test_emotion_maps():
    assert map_emotion("iemocap", "exc") == "happy"
    assert map_emotion("iemocap", "hap") == "happy"
    assert map_emotion("iemocap", "xxx") is None
    assert map_emotion("meld", "Joy") == "happy"
    assert map_emotion("meld", "surprise") == "surprised"
    with pytest.raises(KeyError, match="unknown iemocap emotion label 'zzz'"):
        map_emotion("iemocap", "zzz")


def test_normalize():
    assert normalize_sed_value("age", "Young Adult") == "young adult"
    assert normalize_sed_value("age", "middle aged") == "middle-aged"
    assert normalize_sed_value("pitch", "loud") is None


def test_caption_text_and_spans():
    sed = dict(pitch="high", volume="low", speed="fast", gender="female", age="young adult")
    cap, spans = build_caption("Hi there", "happy", sed, return_spans=True)
    assert cap == (
        "The young adult female speaks with a fast speed, a high pitch and a low volume, saying 'Hi there'."
        " Based on the audio caption, the emotional state of this speaker is happy."
    )
    for name, (s, e) in spans.items():
        expected = sed.get(name) or {"text": "Hi there", "emotion": "happy"}[name]
        assert cap[s:e] == expected
    plain = build_caption("Hi", "sad", with_sed=False)
    assert plain == "The speaker says 'Hi'. Based on the audio caption, the emotional state of this speaker is sad."
    assert parse_caption(plain, with_sed=False).fields == {"text": "Hi", "emotion": "sad"}


@pytest.mark.faults
def test_build_rejects_bad_descriptor():
    with pytest.raises(ValueError, match="pitch"):
        build_caption("x", "sad", dict(pitch="loud", volume="low", speed="fast", gender="male", age="child"))


transcripts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(sed=st.sampled_from(ALL_SED), text=transcripts, emotion=st.sampled_from(EMOTIONS))
def test_round_trip(sed, text, emotion):
    parsed = parse_caption(build_caption(text, emotion, sed))
    assert parsed.ok, (parsed.missing, parsed.invalid)
    assert parsed.fields == {**sed, "text": text, "emotion": emotion}


@settings(max_examples=100, deadline=None)
@given(text=transcripts, emotion=st.sampled_from(EMOTIONS))
def test_round_trip_plain(text, emotion):
    parsed = parse_caption(build_caption(text, emotion, with_sed=False), with_sed=False)
    assert parsed.ok and parsed.fields == {"text": text, "emotion": emotion}


def test_round_trip_quotes_unicode():
    sed = ALL_SED[17]
    for text in ["It's 'fine'.", "Don’t — “quoted” ünïcødé 你好", "'", "", "a'. Based on the audio caption, b"]:
        assert parse_caption(build_caption(text, "angry", sed)).fields["text"] == text


@pytest.mark.faults
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises(garbage):
    parsed = parse_caption(garbage)
    assert set(parsed.missing) | set(parsed.invalid) | set(parsed.fields) >= set(SED_FIELDS) | {"text", "emotion"}


@pytest.mark.faults
def test_parse_damaged_output():
    parsed = parse_caption("The elderly male speaks with a slow speed, a squeaky pitch and")
    assert parsed.fields == {"speed": "slow", "gender": "male", "age": "elderly"}
    assert parsed.invalid == ["pitch"]
    assert set(parsed.missing) == {"volume", "text", "emotion"}
    assert not parsed.ok
    assert parse_caption(None).missing  # non-string input
    # emotion outside the allowed label set is invalid
    cap = build_caption("x", "fearful", ALL_SED[0])
    assert "emotion" in parse_caption(cap, emotion_labels=EMOTION_LABELS["iemocap"]).invalid


def test_sed_accuracy():
    ref = [dict(pitch="low", volume="low", speed="slow", gender="male", age="child")] * 2
    pred = [dict(ref[0]), dict(ref[0], pitch="high", age=None)]
    acc = sed_accuracy(pred, ref)
    assert acc["pitch"] == 0.5 and acc["age"] == 0.5 and acc["volume"] == 1.0
