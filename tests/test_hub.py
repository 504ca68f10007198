"""`trustser push` / push_to_hub against a fake Hub API that copies into a local "hub" folder:
the release loads back with from_pretrained (subfolders for the CEM and the controller), and the
model cards' metadata parse and carry exactly the metrics of results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hub_fake import FakeHfApi

from trustser.descriptors import SED_FIELDS

METRICS = {
    "wa": 0.6125,
    "ua": 0.5875,
    "weighted_f1": 0.6031,
    "unparseable_rate": 0.0125,
    "emotion_unparseable_rate": 0.0,
    "n": 80,
    "sed_source": "truth",
    "sed_accuracy": {"pitch": 0.55, "volume": 0.6125, "speed": 0.5, "gender": 0.9875, "age": 0.7375},
    "confusion_matrix": {"labels": ["neutral", "happy", "angry", "sad"], "matrix": [[10] * 4] * 4},
}


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """A trustser output directory as recipe.run_system leaves it (tiny random-init parts)."""
    from trustser.models.cem import CemConfig, CemModel
    from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
    from trustser.models.ser_slm import build_tiny_ser_slm

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("out")
    post, cem_stage, pre = out / "cache" / "posttrain-k1", out / "cache" / "cem-k2", out / "cache" / "pretrain-k0"
    model, proc = build_tiny_ser_slm(
        ["hello there", "good morning"],
        emotion_labels=("neutral", "happy", "angry", "sad"),
        vocab_size=500,
        lm_hidden=64,
        encoder_dim=64,
        encoder_layers=1,
        lm_layers=1,
    )
    model.save_pretrained(post / "model")
    proc.save_pretrained(post / "model")
    h = model.config.text_config.hidden_size
    CemModel(CemConfig(input_size=5 * h, hidden_size=16, slm_hidden_size=h)).save_pretrained(cem_stage / "cem")
    cem_report = {
        "train_rows": 200,
        "balance": "utterance",
        "balanced_rows": 120,
        "train_loss": 0.51,
        "eval": {
            **{f: {"auc": 0.7, "nce": 0.1, "ece": 0.05} for f in SED_FIELDS},
            "utterance": {"auc": 0.72, "nce": 0.12, "ece": 0.04},
        },
    }
    (cem_stage / "cem" / "cem_metrics.json").write_text(json.dumps(cem_report))
    SedControllerModel(SedControllerConfig(hidden_size=16, embedding_size=8)).save_pretrained(post / "controller")
    run = out / "sys10-seed0"
    run.mkdir()
    results = {
        "system": {
            "name": "sys10",
            "with_sed": True,
            "domain_sft": True,
            "selection_ratio": 0.9,
            "rectify": True,
            "num_policies": 6,
            "paper_iemocap": 80.98,
            "paper_meld": 64.11,
        },
        "target_corpus": "synthetic",
        "test": {"synthetic": METRICS},
        "cem": cem_report,
        "selection": {"n_selected": 90, "n_total": 100},
        "rectification": {"train/rectified_share": {"first": 0.2, "last": 0.1}},
        "settings": {
            "preset": "tiny",
            "pretrain_corpus": "synthetic",
            "test_split": "test",
            "num_policies_used": 6,
            "seed": 0,
        },
        "seed": 0,
        "stages": [
            {"name": "pretrain", "key": "k0", "path": str(pre)},
            {"name": "cem", "key": "k2", "path": str(cem_stage)},
            {"name": "posttrain", "key": "k1", "path": str(post)},
        ],
    }
    (run / "results.json").write_text(json.dumps(results))
    return out


@pytest.fixture(scope="module")
def pushed(output_dir, tmp_path_factory):
    from trustser import push_to_hub

    api = FakeHfApi(tmp_path_factory.mktemp("hub"))
    info = push_to_hub(output_dir, "me/trustser-sys10", api=api, private=True)
    return api, info, api.root / "me" / "trustser-sys10"


def test_push_layout(pushed):
    api, info, repo = pushed
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"] and api.calls[0][2] is True
    for f in (
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "trustser_results.json",
        "cem/config.json",
        "cem/model.safetensors",
        "cem/README.md",
        "controller/config.json",
        "controller/model.safetensors",
        "controller/README.md",
    ):
        assert (repo / f).is_file(), f
        assert f in info["files"]
    assert json.loads((repo / "config.json").read_text())["emotion_labels"] == ["neutral", "happy", "angry", "sad"]


def test_from_pretrained_on_the_release(pushed, output_dir):
    from trustser import CemModel, SedControllerModel, SerSlmForConditionalGeneration, SerSlmProcessor

    _, _, repo = pushed
    post = output_dir / "cache" / "posttrain-k1"
    pairs = [
        (
            SerSlmForConditionalGeneration.from_pretrained(repo),
            SerSlmForConditionalGeneration.from_pretrained(post / "model"),
        ),
        (
            CemModel.from_pretrained(repo, subfolder="cem"),
            CemModel.from_pretrained(output_dir / "cache" / "cem-k2" / "cem"),
        ),
        (
            SedControllerModel.from_pretrained(repo, subfolder="controller"),
            SedControllerModel.from_pretrained(post / "controller"),
        ),
    ]
    for got, ref in pairs:
        a, b = got.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    proc = SerSlmProcessor.from_pretrained(repo)
    assert proc.tokenizer.get_vocab() == SerSlmProcessor.from_pretrained(post / "model").tokenizer.get_vocab()
    assert pairs[0][0].config.emotion_labels == ["neutral", "happy", "angry", "sad"]


def _front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_cards(pushed):
    from huggingface_hub import ModelCard

    _, _, repo = pushed
    meta = _front_matter(repo / "README.md")
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert "trustser" in meta["tags"] and meta["datasets"] == ["synthetic"]
    card = ModelCard.load(repo / "README.md")
    got = {r.metric_config: r.metric_value for r in card.data.eval_results}
    want = {
        "wa": METRICS["wa"],
        "ua": METRICS["ua"],
        "weighted_f1": METRICS["weighted_f1"],
        **{f"sed_{f}": v for f, v in METRICS["sed_accuracy"].items()},
    }
    assert got == want
    assert {r.dataset_type for r in card.data.eval_results} == {"synthetic"}
    assert meta["model-index"][0]["name"] == "trustser-sys10"
    body = card.text
    assert 'pipeline("explainable-ser", model="me/trustser-sys10")' in body
    assert "| WA | 0.6125 |" in body and "| SED accuracy: gender | 0.9875 |" in body
    assert "80.98% accuracy on IEMOCAP" in body
    cem_meta = _front_matter(repo / "cem" / "README.md")
    assert cem_meta["base_model"] == "me/trustser-sys10"
    assert "| utterance | 0.720 | 0.120 | 0.040 |" in (repo / "cem" / "README.md").read_text()
    ctl = (repo / "controller" / "README.md").read_text()
    assert 'subfolder="controller"' in ctl and "K = 6" in ctl


def test_pipeline_on_the_release_finds_its_cem(pushed):
    from transformers import pipeline

    _, _, repo = pushed
    pipe = pipeline("explainable-ser", model=str(repo), device=-1)
    assert pipe.cem is not None and pipe.emotion_labels == ("neutral", "happy", "angry", "sad")


@pytest.mark.faults
def test_cli_export_and_errors(output_dir, tmp_path):
    from trustser.cli import main
    from trustser.hub import push_to_hub

    dest = tmp_path / "export"
    assert main(["push", str(output_dir / "sys10-seed0"), "me/x", "--export-dir", str(dest)]) == 0
    assert (dest / "README.md").is_file() and (dest / "cem" / "README.md").is_file()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        push_to_hub(tmp_path / "nothing-here", "me/x", api=FakeHfApi(tmp_path / "hub"))
    assert main(["push", str(tmp_path / "nothing-here"), "me/x", "--export-dir", str(tmp_path / "e2")]) == 1
