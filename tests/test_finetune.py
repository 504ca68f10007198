"""Fine-tuning on a new label set: label words become whole tokens initialised from their pieces,
and the explain pipeline then reports probabilities over the new labels."""

from __future__ import annotations

import subprocess

import pytest
import torch

NEW = ["calm", "positive", "negative"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trustser.models.ser_slm import build_tiny_ser_slm

    torch.manual_seed(0)
    return build_tiny_ser_slm(
        ["hello there", "good morning to you"],
        emotion_labels=("neutral", "happy", "angry", "sad"),
        vocab_size=500,
        lm_hidden=64,
        encoder_dim=64,
        encoder_layers=1,
        lm_layers=1,
    )


def test_add_label_tokens(tiny, tmp_path):
    from trustser.explain import label_first_token_ids, label_token_ids
    from trustser.finetune import add_emotion_label_tokens, labels_needing_tokens
    from trustser.models.ser_slm import SerSlmForConditionalGeneration, SerSlmProcessor

    model, proc = tiny
    tok = proc.tokenizer
    need = labels_needing_tokens(tok, NEW)
    assert need  # the corpus-trained tokenizer splits at least one new word
    assert labels_needing_tokens(tok, ["neutral", "happy", "angry", "sad"]) == []
    pieces = {l: label_token_ids(tok, l) for l in need}
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    n_before = len(tok)
    added = add_emotion_label_tokens(model, proc, NEW)
    assert added == need and len(tok) == n_before + len(need)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.config.text_config.vocab_size
    for l in need:
        i = tok.convert_tokens_to_ids(l)
        torch.testing.assert_close(model.get_input_embeddings().weight[i], emb_before[pieces[l]].mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[i], head_before[pieces[l]].mean(0))
    assert labels_needing_tokens(tok, NEW) == []
    ids = label_first_token_ids(tok, NEW)
    assert len(set(ids)) == 3 and [tok.decode([i]).strip() for i in ids] == NEW
    # the caption round-trips and the emotion span is the new token
    cap = "The speaker says 'so calmly calm'. Based on the audio caption, the emotional state of this speaker is positive."
    enc = tok(cap, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == cap
    assert tok.convert_tokens_to_ids("calm") in enc["input_ids"]  # the whole word " calm" matched
    assert model.config.emotion_labels == NEW
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    m2 = SerSlmForConditionalGeneration.from_pretrained(tmp_path / "m")
    p2 = SerSlmProcessor.from_pretrained(tmp_path / "m")
    assert len(p2.tokenizer) == len(tok) and m2.config.emotion_labels == NEW
    assert label_first_token_ids(p2.tokenizer, NEW) == ids


def test_explain_over_new_labels(tiny, tmp_path):
    from transformers import pipeline

    import trustser  # noqa: F401

    model, proc = tiny
    if model.config.emotion_labels != NEW:
        from trustser.finetune import add_emotion_label_tokens

        add_emotion_label_tokens(model, proc, NEW)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    wav = tmp_path / "a.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "keep calm"], check=True)
    pipe = pipeline("explainable-ser", model=str(tmp_path / "m"), device=-1)
    assert pipe.emotion_labels == tuple(NEW) and pipe._label_ids is not None
    r = pipe(str(wav), max_new_tokens=5)
    assert r["error"] is None and r["caption"] is not None


def test_bad_mode(tiny):
    from trustser.finetune import add_emotion_label_tokens

    with pytest.raises(ValueError, match="add_label_tokens"):
        add_emotion_label_tokens(*tiny, NEW, mode="sometimes")


@pytest.mark.slow
def test_finetune_recipe_end_to_end(tmp_path):
    """The whole recipe on the small synthetic corpus read as an audiofolder with remapped labels,
    from a saved (random-init) checkpoint + CEM; then push (export) and explain its output."""
    import json

    from trustser.cli import main
    from trustser.data.synthetic import synthesize_corpus
    from trustser.finetune import FinetuneConfig, run_finetune
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.ser_slm import build_tiny_ser_slm

    root = synthesize_corpus(tmp_path / "synth", seed=0, size="small")
    model, proc = build_tiny_ser_slm(["The meeting starts at nine."], seed=0)
    rel = tmp_path / "released"
    model.save_pretrained(rel)
    proc.save_pretrained(rel)
    h = model.config.text_config.hidden_size
    CemModel(CemConfig(input_size=5 * h, slm_hidden_size=h)).save_pretrained(rel / "cem")
    cfg = FinetuneConfig(
        model=str(rel),
        corpus="audiofolder",
        corpus_root=str(root),
        corpus_options=dict(
            label_column="emotion",
            text_column="text",
            speaker_column="speaker",
            label_map={"neutral": "calm", "happy": "positive", "angry": "negative", "sad": "negative"},
        ),
        emotion_labels=NEW,
        output_dir=str(tmp_path / "ft"),
        annotation_method="speaker_adaptive",
        selection_ratio=0.9,
        rectify=True,
        num_policies=2,
        max_steps=4,
        per_device_batch_size=8,
        eval_batch_size=20,
        max_eval_samples=20,
        tsne_samples=20,
    )
    res = run_finetune(cfg)
    m = res["test"]["audiofolder"]
    assert m["n"] == 20 and 0.0 <= m["wa"] <= 1.0
    assert res["settings"]["emotion_labels"] == NEW and res["selection"]["n_selected"] == round(
        0.9 * res["selection"]["n_total"]
    )
    assert [s["name"] for s in res["stages"]] == ["annotate", "pretrain", "cem", "select", "posttrain"]
    again = run_finetune(cfg)  # every stage cached
    assert all(s["reused"] for s in again["stages"])
    assert main(["push", str(tmp_path / "ft"), "me/ft", "--export-dir", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["emotion_labels"] == NEW
    assert (tmp_path / "export" / "controller" / "config.json").is_file()
    wav = next((root / "test").rglob("*.wav"))
    out = tmp_path / "pred.jsonl"
    assert main(["explain", str(tmp_path / "ft"), str(wav), "--out", str(out), "--max-new-tokens", "8"]) == 0
    assert json.loads(out.read_text())["error"] is None
