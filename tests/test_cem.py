"""CEM: architecture, forward pass by hand, loss, save/load, metrics, balanced sampling, training,
and feature extraction from a tiny SER-SLM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from trustser.cem_features import predict_cem
from trustser.descriptors import SED_FIELDS
from trustser.evaluation import (
    binary_auc,
    calibration_bins,
    cem_metrics,
    expected_calibration_error,
    normalized_cross_entropy,
)
from trustser.models.cem import CemConfig, CemModel
from trustser.plots import reliability_diagram
from trustser.trainers.cem import balanced_sample, correctness_labels, train_cem


def _cem(d=7, h=6, **kw):
    torch.manual_seed(0)
    return CemModel(CemConfig(input_size=d, hidden_size=h, **kw))


# ---------------------------------------------------------------------------------- architecture
def test_architecture_by_introspection():
    m = _cem(d=7, h=6)
    blocks = [m.layer1, m.layer2, m.layer3]
    for i, b in enumerate(blocks):
        kinds = [type(c) for c in b.children()]
        assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout], kinds
        assert b.linear.in_features == (7 if i == 0 else 6) and b.linear.out_features == 6
        assert b.dropout.p == pytest.approx(0.1)
    assert isinstance(m.head, nn.Linear) and (m.head.in_features, m.head.out_features) == (6, 5)
    assert m.config.field_names == list(SED_FIELDS)
    # exactly three hidden layers and one head carry parameters
    assert sorted(n.split(".")[0] for n, _ in m.named_parameters()) == sorted(
        ["layer1"] * 4 + ["layer2"] * 4 + ["layer3"] * 4 + ["head"] * 2
    )


def _manual_forward(m, x):
    def block(b, v):
        z = v @ b.linear.weight.T + b.linear.bias
        z = (z - b.norm.running_mean) / torch.sqrt(b.norm.running_var + b.norm.eps) * b.norm.weight + b.norm.bias
        return torch.clamp(z, min=0)

    h1 = block(m.layer1, x)
    h2 = block(m.layer2, h1) + h1
    h3 = block(m.layer3, h2)
    logits = h3 @ m.head.weight.T + m.head.bias
    p = 1 / (1 + torch.exp(-logits))
    return logits, p, p.mean(-1)


def test_forward_matches_hand_computation_with_skip():
    m = _cem(d=7, h=6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for b in (m.layer1, m.layer2, m.layer3):
            b.norm.running_mean.copy_(torch.randn(6, generator=g))
            b.norm.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    m.eval()
    x = torch.randn(4, 7, generator=g)
    out = m(x)
    logits, p, conf = _manual_forward(m, x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.field_confidence, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.confidence, conf, rtol=1e-5, atol=1e-6)
    assert out.field_confidence.shape == (4, 5) and out.confidence.shape == (4,)
    # the skip is really there: without it the result differs
    with torch.no_grad():
        h1 = m.layer1(x)
        no_skip = m.head(m.layer3(m.layer2(h1)))
    assert not torch.allclose(no_skip, out.logits)


def test_loss_is_bce_and_ignores_negative_labels():
    m = _cem()
    m.eval()
    x = torch.randn(3, 7)
    y = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float)
    out = m(x, labels=y)
    p = out.field_confidence
    manual = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)
    y2 = y.clone()
    y2[0, :] = -100
    out2 = m(x, labels=y2)
    manual2 = -(y[1:] * torch.log(p[1:]) + (1 - y[1:]) * torch.log(1 - p[1:])).mean()
    torch.testing.assert_close(out2.loss, manual2, rtol=1e-5, atol=1e-6)
    assert m(x).loss is None


@pytest.mark.faults
def test_bad_input_and_config_errors():
    m = _cem(d=7)
    with pytest.raises(ValueError, match=r"\(batch, 7\)"):
        m(torch.randn(2, 8))
    with pytest.raises(ValueError, match="expected 15"):
        CemConfig(input_size=10, slm_hidden_size=3, feature_pooling="sed_tokens")
    with pytest.raises(ValueError, match="feature_pooling"):
        CemConfig(feature_pooling="max")
    CemConfig(input_size=3, slm_hidden_size=3, feature_pooling="mean")  # consistent: fine


def test_checkpoint_saved_under_the_old_model_type_loads(tmp_path):
    """model_type was "trustser_cem" before the model types followed the folder names: such a
    checkpoint loads through AutoConfig/AutoModel and from_pretrained, with the same weights, and
    is saved again under the current name."""
    from transformers import AutoConfig, AutoModel

    m = _cem(d=7, h=6, feature_pooling="mean").eval()
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "trustser_cem"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, CemConfig) and config.model_type == "cem" and config.feature_pooling == "mean"
    x = torch.randn(5, 7)
    for loaded in (AutoModel.from_pretrained(tmp_path), CemModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, CemModel)
        assert torch.allclose(loaded.eval()(x).field_confidence, m(x).field_confidence)
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "cem"


def test_save_load_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModel

    m = _cem(d=7, h=6, feature_pooling="mean")
    m.train()
    m(torch.randn(16, 7))  # move the BatchNorm running statistics away from their init
    m.eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "cem" and cfg["feature_pooling"] == "mean"
    assert AutoConfig.from_pretrained(tmp_path).model_type == "cem"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, CemModel)
    loaded.eval()
    x = torch.randn(5, 7)
    torch.testing.assert_close(loaded(x).field_confidence, m(x).field_confidence, rtol=0, atol=0)
    torch.testing.assert_close(loaded.layer2.norm.running_var, m.layer2.norm.running_var, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- metrics
def test_auc_on_hand_made_numbers():
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert binary_auc([0.9, 0.2], [1, 0]) == 1.0
    assert math.isnan(binary_auc([0.2, 0.3], [1, 1]))  # one class only


def test_nce_on_hand_made_numbers():
    s = np.array([0.9, 0.8, 0.3, 0.6])
    y = np.array([1, 1, 0, 1])
    pc = 0.75
    h = -(pc * math.log(pc) + 0.25 * math.log(0.25))
    hcp = -(math.log(0.9) + math.log(0.8) + math.log(0.7) + math.log(0.6)) / 4
    assert normalized_cross_entropy(s, y) == pytest.approx((h - hcp) / h)
    # the constant prior scores exactly 0; perfect confidences score ~1
    assert normalized_cross_entropy(np.full(4, 0.75), y) == pytest.approx(0.0, abs=1e-12)
    assert normalized_cross_entropy(y.astype(float), y) == pytest.approx(1.0, abs=1e-6)


def test_ece_on_hand_made_numbers():
    # bin (0.1,0.2]: scores 0.15, 0.15 with labels 0,1 -> acc 0.5, conf 0.15 -> gap 0.35 (weight 2/5)
    # bin (0.8,0.9]: 0.85 x3 with labels 1,1,1 -> gap 0.15 (weight 3/5)
    s = [0.15, 0.15, 0.85, 0.85, 0.85]
    y = [0, 1, 1, 1, 1]
    assert expected_calibration_error(s, y, n_bins=10) == pytest.approx(0.4 * 0.35 + 0.6 * 0.15)
    b = calibration_bins(s, y, n_bins=10)
    assert b["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 3, 0]
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)


def test_cem_metrics_structure_and_utterance_level():
    scores = np.array([[0.9] * 5, [0.8] * 5, [0.2] * 5, [0.3] * 5])
    labels = np.array([[1] * 5, [1] * 5, [0, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    m = cem_metrics(scores, labels)
    assert set(SED_FIELDS) <= set(m) and m["n"] == 4
    assert m["utterance"]["auc"] == 1.0 and m["utterance"]["all_correct_rate"] == 0.5
    assert m["pitch"]["auc"] == pytest.approx(1.0) and m["pitch"]["accuracy"] == 0.75
    assert math.isnan(m["gender"]["auc"])  # always right: undefined
    with pytest.raises(ValueError):
        cem_metrics(scores[:, :4], labels[:, :4])


def test_reliability_diagram_png(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.random((50, 5))
    y = (rng.random((50, 5)) < s).astype(float)
    path = reliability_diagram(s, y, tmp_path / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]  # no temporary files left


# ---------------------------------------------------------------------------------- labels and balancing
def test_correctness_labels():
    pred = [{"pitch": "low", "volume": "High", "speed": None, "gender": "male", "age": "middle aged"}]
    ref = [{"pitch": "low", "volume": "high", "speed": "slow", "gender": "female", "age": "middle-aged"}]
    assert correctness_labels(pred, ref).tolist() == [[1, 1, 0, 0, 1]]
    with pytest.raises(ValueError):
        correctness_labels(pred, ref * 2)


def _labels(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 5)) < 0.8).astype(np.float32)


def test_balanced_sample_per_utterance():
    y = _labels()
    good = np.all(y == 1, axis=1)
    idx, yb = balanced_sample(y, mode="utterance", seed=3)
    n = min(good.sum(), (~good).sum())
    assert len(idx) == 2 * n and len(np.unique(idx)) == len(idx)
    assert np.all(y[idx] == yb)
    assert np.all(yb == 1, axis=1).sum() == n
    idx2, _ = balanced_sample(y, mode="utterance", seed=3)
    assert np.array_equal(idx, idx2)  # reproducible from the seed
    idx3, _ = balanced_sample(y, mode="utterance", num_pairs=10, seed=3)
    assert len(idx3) == 20
    with pytest.raises(ValueError, match="cannot balance"):
        balanced_sample(np.ones((10, 5)), mode="utterance")


def test_balanced_sample_per_field():
    y = _labels()
    idx, yb = balanced_sample(y, mode="field", seed=1)
    for j in range(5):
        n = min((y[:, j] == 1).sum(), (y[:, j] == 0).sum())
        assert (yb[:, j] == 1).sum() == n and (yb[:, j] == 0).sum() == n
    chosen = yb >= 0
    assert np.all(yb[chosen] == y[idx][chosen]) and chosen.any(axis=1).all()
    with pytest.raises(ValueError, match="unknown balance"):
        balanced_sample(y, mode="nope")


# ---------------------------------------------------------------------------------- training
def test_train_cem_learns_and_saves(tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, d = 1200, 12
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 5))
    y = ((x @ w + 1.0 + 0.3 * rng.normal(size=(n, 5))) > 0).astype(np.float32)
    model, report = train_cem(
        x[:1000],
        y[:1000],
        eval_features=x[1000:],
        eval_labels=y[1000:],
        output_dir=tmp_path,
        hidden_size=32,
        balance="field",
        num_train_epochs=15,
        batch_size=32,
        learning_rate=3e-3,
    )
    assert report["eval"]["mean_field_auc"] > 0.85
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "trainer").exists()
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "cem_metrics.json").read_text())
    assert saved["eval"]["mean_field_auc"] == pytest.approx(report["eval"]["mean_field_auc"])
    loaded = CemModel.from_pretrained(tmp_path)
    np.testing.assert_allclose(predict_cem(loaded, x[1000:]), predict_cem(model, x[1000:]), atol=1e-6)
    # NaN feature rows give NaN scores, not errors
    xx = x[1000:1003].copy()
    xx[1] = np.nan
    p = predict_cem(model, xx)
    assert np.isnan(p[1]).all() and np.isfinite(p[[0, 2]]).all()


# ---------------------------------------------------------------------------------- features from a tiny SLM
@pytest.fixture(scope="module")
def tiny_slm():
    from trustser.models.ser_slm import build_tiny_ser_slm

    texts = [f"the parcel number {i} arrived today" for i in range(6)]
    slm, proc = build_tiny_ser_slm(texts, lm_hidden=32, encoder_dim=32, vocab_size=500, max_audio_seconds=3, seed=0)
    return slm.eval(), proc


@pytest.fixture(scope="module")
def tiny_ds():
    import datasets

    rng = np.random.default_rng(0)
    n = 5
    return datasets.Dataset.from_dict(
        {
            "id": [f"u{i}" for i in range(n)],
            "audio": [
                {"array": (0.1 * rng.normal(size=12000 + 1500 * i)).astype(np.float32), "sampling_rate": 16000}
                for i in range(n)
            ],
            "text": [f"the parcel number {i} arrived today" for i in range(n)],
            "emotion": ["happy", "sad", "neutral", "angry", "happy"],
            "pitch": ["low", "high", "normal", "low", "high"],
            "volume": ["high"] * n,
            "speed": ["fast"] * n,
            "gender": ["male", "female", "male", "female", "male"],
            "age": ["young adult"] * n,
            "pitch_auto": ["low", "", "high", "low", "normal"],
            "volume_auto": ["high"] * n,
            "speed_auto": ["slow"] * n,
            "gender_auto": ["male"] * n,
            "age_auto": ["elderly"] * n,
        }
    ).cast_column("audio", datasets.Audio(sampling_rate=16000))


def test_feature_extraction_shapes_and_positions(tiny_slm, tiny_ds):
    from trustser.cem_features import extract_cem_features
    from trustser.descriptors import build_caption, sed_from_row

    slm, proc = tiny_slm
    h = slm.config.text_config.hidden_size
    f_sed = extract_cem_features(slm, proc, tiny_ds, sed_source="auto", pooling="sed_tokens", batch_size=2)
    f_mean = extract_cem_features(slm, proc, tiny_ds, sed_source="auto", pooling="mean", batch_size=3)
    assert f_sed.shape == (5, 5 * h) and f_mean.shape == (5, h)
    # row 1 has a failed annotation (pitch_auto == ""): NaN row, the others finite
    assert np.isnan(f_sed[1]).all() and np.isnan(f_mean[1]).all()
    assert np.isfinite(np.delete(f_sed, 1, axis=0)).all()
    # batch size does not change features
    f1 = extract_cem_features(slm, proc, tiny_ds, sed_source="truth", batch_size=1)
    f5 = extract_cem_features(slm, proc, tiny_ds, sed_source="truth", batch_size=5)
    np.testing.assert_allclose(f1, f5, atol=1e-5)
    # the gathered states are the last-layer states at the descriptor value tokens
    row = tiny_ds[0]
    cap = build_caption(row["text"], row["emotion"], sed_from_row(row, ""))
    enc = proc(audio=[row["audio"]["array"]], captions=[cap])
    idx = enc["sed_token_index"][0]
    words = [proc.tokenizer.decode([int(enc["input_ids"][0, i])]).strip() for i in idx]
    assert words == [row[f].split()[0] for f in SED_FIELDS]
    with torch.no_grad():
        out = slm(
            **{k: v for k, v in enc.items() if k not in ("labels", "sed_token_index", "emotion_token_mask")},
            output_hidden_states=True,
        )
    expected = out.hidden_states[-1][0, idx].reshape(-1).numpy()
    np.testing.assert_allclose(f1[0], expected, atol=1e-5)
    caption_mask = enc["labels"][0] != -100
    f_mean_truth = extract_cem_features(slm, proc, tiny_ds.select([0]), sed_source="truth", pooling="mean")
    np.testing.assert_allclose(f_mean_truth[0], out.hidden_states[-1][0, caption_mask].mean(0).numpy(), atol=1e-5)
    # predicted descriptors: one dict per row, None = unparseable -> NaN
    pred = [{f: tiny_ds[i][f] for f in SED_FIELDS} for i in range(5)]
    pred[3]["age"] = None
    f_pred = extract_cem_features(slm, proc, tiny_ds, sed_source="predicted", sed=pred)
    np.testing.assert_allclose(np.delete(f_pred, 3, 0), np.delete(f1, 3, 0), atol=1e-5)
    assert np.isnan(f_pred[3]).all()
    with pytest.raises(ValueError, match="sed="):
        extract_cem_features(slm, proc, tiny_ds, sed_source="predicted")
    with pytest.raises(ValueError, match="annotate"):
        extract_cem_features(slm, proc, tiny_ds.remove_columns("age_auto"), sed_source="auto")


def test_prepare_cem_data_with_untrained_slm(tiny_slm, tiny_ds):
    from trustser.trainers.cem import prepare_cem_data

    slm, proc = tiny_slm
    data = prepare_cem_data(slm, proc, tiny_ds, batch_size=5, max_new_tokens=12)
    assert data["features"].shape == (5, 5 * slm.config.text_config.hidden_size)
    assert data["labels"].shape == (5, 5) and len(data["captions"]) == 5
    # an untrained SLM produces gibberish: every descriptor unparseable -> wrong (label 0); the
    # utterance is still scored, teacher-forced with a placeholder value, so its features are finite
    assert data["unparseable"] == 5 and (data["labels"] == 0).all() and np.isfinite(data["features"]).all()


def test_prepare_cem_data_perturbed_labels_match_claims(tiny_slm, tiny_ds):
    from trustser.descriptors import SED_FIELDS
    from trustser.trainers.cem import prepare_cem_data_perturbed

    slm, proc = tiny_slm
    data = prepare_cem_data_perturbed(slm, proc, tiny_ds, corrupt_prob=0.5, batch_size=5, seed=3)
    assert data["features"].shape == (5, 5 * slm.config.text_config.hidden_size) and np.isfinite(data["features"]).all()
    for i, claimed in enumerate(data["claimed"]):
        for j, f in enumerate(SED_FIELDS):
            assert data["labels"][i, j] == float(claimed[f] == tiny_ds[f][i])
    assert 0 < data["labels"].mean() < 1
    again = prepare_cem_data_perturbed(slm, proc, tiny_ds, corrupt_prob=0.5, batch_size=5, seed=3)
    assert again["claimed"] == data["claimed"]  # reproducible from the seed


# ---------------------------------------------------------------------------------- CEM training data options (issue 15)
def _truth_rows(n=60, seed=0):
    from trustser.descriptors import SED_VOCAB

    rng = np.random.default_rng(seed)
    return [{f: SED_VOCAB[f][int(rng.integers(len(SED_VOCAB[f])))] for f in SED_FIELDS} for _ in range(n)]


def test_random_perturbation_replaces_with_another_value_and_labels_it():
    from trustser.trainers.cem import perturb_descriptors

    truth = _truth_rows(200)
    claimed, labels = perturb_descriptors(truth, mode="random", corrupt_prob=0.3, rng=np.random.default_rng(1))
    for t, c, y in zip(truth, claimed, labels):
        assert [float(c[f] == t[f]) for f in SED_FIELDS] == list(y)
    assert 0.6 < labels.mean() < 0.8  # ~30% of the fields perturbed
    # some age claims jump more than one step (random, not adjacent)
    from trustser.descriptors import SED_VOCAB

    jumps = [abs(SED_VOCAB["age"].index(c["age"]) - SED_VOCAB["age"].index(t["age"])) for t, c in zip(truth, claimed)]
    assert max(jumps) > 1


def test_adjacent_perturbation_moves_one_step_only():
    from trustser.descriptors import SED_VOCAB
    from trustser.trainers.cem import perturb_descriptors

    truth = _truth_rows(300)
    claimed, labels = perturb_descriptors(truth, mode="adjacent", corrupt_prob=0.5, rng=np.random.default_rng(2))
    for t, c, y in zip(truth, claimed, labels):
        for j, f in enumerate(SED_FIELDS):
            step = abs(SED_VOCAB[f].index(c[f]) - SED_VOCAB[f].index(t[f]))
            assert step == (1 - y[j])  # wrong claims are exactly one step away
    assert 0.4 < labels.mean() < 0.6
    wrong_pitch = [(t["pitch"], c["pitch"]) for t, c in zip(truth, claimed) if c["pitch"] != t["pitch"]]
    assert ("low", "high") not in wrong_pitch and ("high", "low") not in wrong_pitch
    assert {("normal", "low"), ("normal", "high"), ("low", "normal"), ("high", "normal")} <= set(wrong_pitch)


def test_speaker_perturbation_is_one_shift_per_speaker():
    from trustser.descriptors import SED_VOCAB
    from trustser.trainers.cem import perturb_descriptors

    truth = _truth_rows(240)
    speakers = [f"spk{i % 12}" for i in range(240)]
    claimed, labels = perturb_descriptors(
        truth, mode="speaker", corrupt_prob=0.5, rng=np.random.default_rng(3), speakers=speakers
    )
    for f in SED_FIELDS:
        vocab = SED_VOCAB[f]
        for spk in set(speakers):
            rows = [i for i, s in enumerate(speakers) if s == spk]
            shifts = {vocab.index(claimed[i][f]) - vocab.index(truth[i][f]) for i in rows}
            if len(vocab) == 2:  # gender: the whole speaker flipped or none of it
                assert shifts in ({0}, {-1, 1}, {-1}, {1}) and len({claimed[i][f] == truth[i][f] for i in rows}) == 1
            else:  # one direction per speaker; 0 only where the scale's end clips it
                assert shifts <= {0, 1} or shifts <= {0, -1}
                for i in rows:
                    if claimed[i][f] == truth[i][f] and len(shifts) > 1:
                        assert truth[i][f] in (vocab[0], vocab[-1])
    assert 0 < labels.mean() < 1
    with pytest.raises(ValueError, match="speaker"):
        perturb_descriptors(truth, mode="speaker")
    with pytest.raises(ValueError, match="perturbation"):
        perturb_descriptors(truth, mode="sideways")


def test_perturbed_data_several_captions_per_utterance(tiny_slm, tiny_ds):
    from trustser.trainers.cem import eval_split_by_utterance, prepare_cem_data_perturbed, prepare_cem_training_data

    slm, proc = tiny_slm
    one = prepare_cem_data_perturbed(slm, proc, tiny_ds, corrupt_prob=0.5, batch_size=8, seed=3)
    assert list(one["utterance"]) == list(range(5))
    data = prepare_cem_data_perturbed(
        slm, proc, tiny_ds, corrupt_prob=0.5, batch_size=8, seed=3, captions_per_utterance=4
    )
    assert (
        data["features"].shape == (25, 5 * slm.config.text_config.hidden_size) and np.isfinite(data["features"]).all()
    )
    assert list(data["utterance"]) == [i for i in range(5) for _ in range(5)]
    for r, u in enumerate(data["utterance"]):  # labels match the claims of each row's own utterance
        assert list(data["labels"][r]) == [float(data["claimed"][r][f] == tiny_ds[f][u]) for f in SED_FIELDS]
    assert (data["labels"][::5] == 1).all()  # the unperturbed caption first
    assert len({tuple(sorted(c.items())) for c in data["claimed"]}) > 5  # independently perturbed copies
    # the same utterance teacher-forced with the same caption gives the same features
    same = [r for r in range(25) if data["claimed"][r] == data["claimed"][r - r % 5]]
    assert len(same) >= 5 and all(
        np.allclose(data["features"][r], data["features"][r - r % 5], atol=1e-4) for r in same
    )
    fit, held = eval_split_by_utterance(data["utterance"], 0.2)
    assert set(data["utterance"][held]) == {0} and len(fit) == 20  # all captions of an utterance on one side
    with pytest.raises(ValueError, match="'perturbed' CEM training captions only"):
        prepare_cem_training_data(slm, proc, tiny_ds, captions="predicted", captions_per_utterance=4)


def test_field_balance_gives_equal_right_and_wrong_per_field():
    from trustser.trainers.cem import perturb_descriptors

    truth = _truth_rows(400)
    rows = [t for t in truth for _ in range(5)]  # 400 utterances x (4 perturbed + 1) ~ thousands of pairs
    _, labels = perturb_descriptors(rows, mode="adjacent", corrupt_prob=0.3, rng=np.random.default_rng(4))
    idx, y = balanced_sample(labels, mode="field", seed=0)
    for j in range(len(SED_FIELDS)):
        assert (y[:, j] == 1).sum() == (y[:, j] == 0).sum() > 500
    assert len(idx) > 1500


def test_holdout_speakers_are_spread_over_groups_and_deterministic():
    import datasets

    from trustser.trainers.cem import holdout_speakers, split_holdout_speakers

    spk = [f"s{i % 12}" for i in range(120)]
    grp = [("typical", "child", "elderly")[int(s[1:]) % 3] for s in spk]
    ds = datasets.Dataset.from_dict({"speaker": spk, "group": grp, "x": list(range(120))})
    held = holdout_speakers(ds, 3, seed=0)
    assert len(held) == 3 and len({grp[spk.index(s)] for s in held}) == 3  # one of each group
    assert holdout_speakers(ds, 3, seed=0) == held and holdout_speakers(ds, 6, seed=1) != holdout_speakers(
        ds, 6, seed=2
    )
    slm_rows, cem_rows = split_holdout_speakers(ds, 3, seed=0)
    assert set(cem_rows["speaker"]) == set(held) and not set(slm_rows["speaker"]) & set(held)
    assert len(slm_rows) + len(cem_rows) == 120
    with pytest.raises(ValueError, match="cannot hold out 12"):
        holdout_speakers(ds, 12)
    with pytest.raises(ValueError, match="'speaker' column"):
        holdout_speakers(ds.remove_columns("speaker"), 2)
