"""The contracts every transformers model keeps, checked on tiny SER-SLM, CEM and SED-controller
configs, one test per contract (the way transformers' ``ModelTesterMixin`` / ``GenerationTesterMixin``
tests are written: a tester class builds the tiny config and inputs)."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from transformers import AutoConfig, CompileConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

import trustser  # noqa: F401  (registers the Auto classes)
from trustser.descriptors import SED_FIELDS
from trustser.models.cem import CemConfig, CemModel
from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
from trustser.models.ser_slm import SerSlmConfig, SerSlmForConditionalGeneration, SerSlmModel
from trustser.models.ser_slm.configuration_ser_slm import conv_output_length

torch.set_num_threads(1)


class SerSlmModelTester:
    """Tiny SER-SLM configs and inputs: a 2-layer Whisper-style (``voxtral_encoder``,
    ``qwen2_audio_encoder``) or HuBERT encoder, a 2-layer Qwen2 LM, random token ids with each row's audio placeholders, left padding."""

    batch_size = 2
    vocab_size = 99
    pad_token_id, bos_token_id, eos_token_id, audio_token_id = 0, 1, 2, 98
    text_length = 5
    num_layers = 2
    frame_downsample = 2

    def __init__(self, encoder: str = "voxtral", **config_overrides):
        self.encoder = encoder
        self.config_overrides = config_overrides

    def audio_config(self):
        if self.encoder == "voxtral":
            return AutoConfig.for_model(
                "voxtral_encoder",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=self.num_layers,
                num_attention_heads=4,
                num_mel_bins=16,
                max_source_positions=25,
            )
        if self.encoder == "qwen2_audio":
            return AutoConfig.for_model(
                "qwen2_audio_encoder",
                d_model=32,
                encoder_ffn_dim=64,
                encoder_layers=self.num_layers,
                encoder_attention_heads=4,
                num_mel_bins=16,
                max_source_positions=25,
            )
        return AutoConfig.for_model(  # "hubert_stable" (pre-LN, final norm) or "hubert" (post-LN)
            "hubert",
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=self.num_layers,
            num_attention_heads=4,
            conv_dim=(16, 16),
            conv_kernel=(10, 3),
            conv_stride=(5, 2),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            do_stable_layer_norm=self.encoder == "hubert_stable",
            feat_extract_norm="layer" if self.encoder == "hubert_stable" else "group",
            mask_time_prob=0.0,
        )

    def get_config(self, **overrides) -> SerSlmConfig:
        text_config = AutoConfig.for_model(
            "qwen2",
            vocab_size=self.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=self.num_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        kwargs = dict(
            audio_config=self.audio_config(),
            text_config=text_config,
            audio_token_id=self.audio_token_id,
            sed_vib_dim=8,
            semantic_vib_dim=8,
            vib_hidden_size=16,
            frame_downsample=self.frame_downsample,
            freeze_audio_tower=False,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        kwargs.update(self.config_overrides)
        kwargs.update(overrides)
        return SerSlmConfig(**kwargs)

    def prepare_inputs(self, config: SerSlmConfig, with_labels: bool = True, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        b = self.batch_size
        if self.encoder in ("voxtral", "qwen2_audio"):
            full = 2 * config.audio_config.max_source_positions
            features = torch.randn(b, config.audio_config.num_mel_bins, full, generator=g)
        else:
            full = 4000
            features = torch.randn(b, full, generator=g)
        valid = [full, int(full * 0.8)]  # the second row's audio is shorter
        feature_mask = (torch.arange(full)[None, :] < torch.tensor(valid)[:, None]).long()
        n_audio = [conv_output_length(v, config.audio_conv_layers, config.frame_downsample) for v in valid]
        rows = []
        for n in n_audio:
            text = torch.randint(3, self.audio_token_id, (self.text_length,), generator=g).tolist()
            rows.append([self.bos_token_id] + [self.audio_token_id] * n + text)
        width = max(map(len, rows))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": features,
            "feature_attention_mask": feature_mask,
            "energy": torch.rand(b, 100, generator=g) * 60 - 80,
        }
        if with_labels:
            labels = input_ids.clone()
            labels[(attention_mask == 0) | (input_ids == self.audio_token_id)] = -100
            inputs["labels"] = labels
        return inputs

    def prepare_config_and_inputs(self, **overrides):
        config = self.get_config(**overrides)
        return config, self.prepare_inputs(config)

    def model(self, config, cls=SerSlmForConditionalGeneration, seed: int = 0):
        torch.manual_seed(seed)
        return cls(config)


@pytest.fixture(scope="module")
def tester():
    return SerSlmModelTester()


def _no_labels(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


# ------------------------------------------------------------------------------------------ SER-SLM
def test_return_dict_false_gives_the_tuple_of_the_output(tester):
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config).eval()
    with torch.no_grad():
        out = model(**inputs)
        tup = model(**inputs, return_dict=False)
        base = model.model(**_no_labels(inputs))
        base_tup = model.model(**_no_labels(inputs), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple())
    for a, b in zip(tup, out.to_tuple()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)
    assert isinstance(base_tup, tuple) and torch.equal(base_tup[0], base.last_hidden_state)
    assert base.kl_loss is not None and out.kl_loss is not None
    # config.return_dict=False is honoured the same way
    model.config.return_dict = False
    with torch.no_grad():
        assert torch.equal(model(**inputs)[1], out.logits)


def test_get_audio_features_returns_a_pooling_output(tester):
    config, inputs = tester.prepare_config_and_inputs(attn_implementation="eager")
    model = tester.model(config).eval()
    args = (inputs["input_features"], inputs["feature_attention_mask"], inputs["energy"])
    with torch.no_grad():
        out = model.get_audio_features(*args, output_hidden_states=True, output_attentions=True)
        tup = model.get_audio_features(*args, return_dict=False)
        logits_from_features = model(**inputs).logits
        logits_from_embeds = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], audio_embeds=out.pooler_output
        ).logits
    assert isinstance(out, BaseModelOutputWithPooling)
    n_placeholders = (inputs["input_ids"] == config.audio_token_id).sum(-1).tolist()
    assert out.pooler_output.shape[:2] == out.audio_mask.shape and out.pooler_output.shape[-1] == 32
    assert out.audio_mask.sum(-1).tolist() == n_placeholders
    assert out.kl_loss.ndim == 0 and out.kl_loss > 0
    frames = config.audio_config.max_source_positions
    assert len(out.hidden_states) == tester.num_layers + 1
    assert all(h.shape == (tester.batch_size, frames, 32) for h in out.hidden_states)
    assert len(out.attentions) == tester.num_layers
    assert all(a.shape == (tester.batch_size, 4, frames, frames) for a in out.attentions)
    assert out.last_hidden_state.shape == (tester.batch_size, frames, 32)
    # the tuple form: last_hidden_state, pooler_output, audio_mask, kl_loss (None fields left out)
    assert isinstance(tup, tuple) and len(tup) == 4
    assert torch.equal(tup[1], out.pooler_output) and torch.equal(tup[2], out.audio_mask)
    torch.testing.assert_close(logits_from_embeds, logits_from_features)
    # the top-level model delegates
    with torch.no_grad():
        assert torch.equal(model.model.get_audio_features(*args).pooler_output, out.pooler_output)


def test_generate_continues_from_a_cache(tester):
    """transformers' test_generate_continue_from_past_key_values: generating 3 + 3 tokens from a
    returned cache equals generating 6 at once."""
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config).eval()
    inputs = _no_labels(inputs)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=tester.pad_token_id)
    full = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **kw)
    first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True, **kw)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1] :])], 1)
    cont = model.generate(
        **{**inputs, "input_ids": first.sequences, "attention_mask": mask},
        past_key_values=copy.deepcopy(first.cache),
        max_new_tokens=3,
        min_new_tokens=3,
        **kw,
    )
    assert cont.shape == full.shape and torch.equal(cont, full)


@pytest.mark.parametrize("encoder", ["voxtral", "qwen2_audio", "hubert_stable", "hubert"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_trainable_parameter_gets_a_gradient(encoder, checkpointing):
    """DDP's contract (no unused trainable parameter) with an unfrozen encoder, with and without
    gradient checkpointing; a pre-LN encoder's final norm, which the VIB branches never read, is
    declared frozen; a post-LN encoder's norm (before its layers) trains."""
    t = SerSlmModelTester(encoder, aux_sed_loss_weight=1.0, aux_ctc_loss_weight=0.5)
    config, inputs = t.prepare_config_and_inputs()
    model = t.model(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    labels = {
        "sed_labels": torch.tensor([[0, 1, 2, 1, 4], [2, -100, 0, 0, 1]]),
        "ctc_labels": torch.tensor([[5, 6, 7], [8, 9, -100]]),
    }
    model(**inputs, **labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    unread = {n for n, p in model.named_parameters() if not p.requires_grad}
    final_norm = {n for n in dict(model.named_parameters()) if re.search(r"audio_tower\.(encoder\.)?layer_norm\.", n)}
    assert final_norm, "the tiny encoders have a sibling norm of their layer stack"
    if encoder == "hubert":
        assert not (final_norm & unread)
    else:
        assert final_norm <= unread
        assert {id(m) for m in model.model.unread_encoder_modules()} == {
            id(model.get_submodule(n.rsplit(".", 1)[0])) for n in final_norm
        }


def test_checkpointing_gives_the_same_gradients(tester):
    config, inputs = tester.prepare_config_and_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tester.model(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_tensor_parallel_plan_covers_the_tied_head(tester):
    """Every plan entry names parameters of the model, and a tied lm_head is split on the vocabulary
    like the embedding it shares (transformers' test_tp_plan_matches_params, plus the tied pair)."""
    config = tester.get_config(tie_word_embeddings=True)
    model = tester.model(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    plan = model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output"  # output (vocabulary) dim, gathered
    assert plan["model.language_model.embed_tokens"] == "embedding_rowwise"  # vocabulary dim
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for key in plan:
        pattern = re.compile(re.escape(key).replace(r"\*", r"\d+") + r"\.")
        assert any(pattern.match(n) for n in names), f"tp plan entry {key!r} matches no parameter"
    assert model.pp_plan["lm_head"] == (["hidden_states"], ["logits"])


@pytest.mark.parametrize("encoder", ["voxtral", "qwen2_audio"])
def test_encoder_positions_stay_fp32_under_bf16_loading(encoder, tmp_path):
    """``_keep_in_fp32_modules_strict``: the Voxtral encoder's positions load in fp32 (as Voxtral
    declares; that encoder casts their sum back), Qwen2-Audio's follow the dtype (its encoder does not
    cast back, and Qwen2-Audio declares nothing); everything runs in bf16."""
    tester = SerSlmModelTester(encoder)
    config, inputs = tester.prepare_config_and_inputs()
    tester.model(config).save_pretrained(tmp_path)
    model = SerSlmForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    positions = dtypes.pop("model.audio_tower.embed_positions.weight")
    assert positions == (torch.float32 if encoder == "voxtral" else torch.bfloat16)
    assert model._keep_in_fp32_modules_strict == ({"audio_tower.embed_positions"} if encoder == "voxtral" else set())
    assert set(dtypes.values()) == {torch.bfloat16}
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_forward_kwargs_are_transformers_kwargs(tester):
    """``**kwargs: Unpack[TransformersKwargs]``: output_hidden_states / output_attentions reach the LM."""
    for fn in (SerSlmForConditionalGeneration.forward, SerSlmModel.forward, SerSlmModel.get_audio_features):
        assert "TransformersKwargs" in str(inspect.signature(fn).parameters["kwargs"].annotation)
    config, inputs = tester.prepare_config_and_inputs(attn_implementation="eager")
    model = tester.model(config).eval()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    seq = inputs["input_ids"].shape[1]
    assert len(out.hidden_states) == tester.num_layers + 1 and out.hidden_states[-1].shape == (2, seq, 32)
    assert len(out.attentions) == tester.num_layers and out.attentions[0].shape == (2, 2, seq, seq)


def test_top_level_use_cache(tester):
    config, inputs = tester.prepare_config_and_inputs()
    assert config.use_cache is True  # from the text config
    assert (
        SerSlmConfig(
            **{
                **config.to_dict(),
                "use_cache": None,
                "text_config": {**config.text_config.to_dict(), "use_cache": False},
            }
        ).use_cache
        is False
    )
    model = tester.model(config).eval()
    with torch.no_grad():
        assert model(**inputs).cache is not None
        model.config.use_cache = False  # what trainers set for gradient checkpointing
        assert model(**inputs).cache is None
        assert model(**inputs, use_cache=True).cache is not None  # an explicit argument wins


def test_decoding_compiles_fullgraph_on_a_static_cache(tester):
    """``_can_compile_fullgraph``: greedy generation with a static cache and a fullgraph-compiled
    forward (dynamo tracing, eager backend: any graph break is an error) equals the plain one."""
    assert SerSlmForConditionalGeneration._can_compile_fullgraph
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config).eval()
    inputs = _no_labels(inputs)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = model.generate(**inputs, **kw)
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # CPU: generate compiles on accelerators only by default
    torch._dynamo.reset()
    out = model.generate(**inputs, cache_implementation="static", compile_config=compile_config, **kw)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------- CEM and SED controller
class CemModelTester:
    batch_size = 4

    def get_config(self):
        return CemConfig(input_size=10, hidden_size=8)

    def prepare_config_and_inputs(self):
        g = torch.Generator().manual_seed(0)
        features = torch.randn(self.batch_size, 10, generator=g)
        labels = torch.randint(0, 2, (self.batch_size, len(SED_FIELDS)), generator=g)
        return self.get_config(), {"features": features, "labels": labels}


class SedControllerModelTester:
    batch_size = 3

    def get_config(self):
        return SedControllerConfig(n_mels=8, hidden_size=6, embedding_size=4, head_hidden_size=5)

    def prepare_config_and_inputs(self):
        g = torch.Generator().manual_seed(0)
        inputs = {
            "sed_ids": torch.tensor([[0, 1, 2, 0, 4], [2, 2, 0, 1, 0], [1, 0, 1, 1, 2]]),
            "input_features": torch.randn(self.batch_size, 12, 8, generator=g),
            "feature_attention_mask": (torch.arange(12)[None, :] < torch.tensor([12, 9, 5])[:, None]).long(),
        }
        return self.get_config(), inputs


SMALL_MODELS = [
    pytest.param(CemModel, CemModelTester(), "logits", id="cem"),
    pytest.param(SedControllerModel, SedControllerModelTester(), "logits", id="sed_controller"),
]


@pytest.mark.parametrize("cls,tester_,key", SMALL_MODELS)
def test_small_models_return_dict_false(cls, tester_, key):
    config, inputs = tester_.prepare_config_and_inputs()
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        out = model(**inputs)
        tup = model(**inputs, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple())
    for a, b in zip(tup, out.to_tuple()):
        assert torch.equal(a, b)
    assert any(torch.equal(a, out[key]) for a in tup)


@pytest.mark.parametrize("cls,tester_,key", SMALL_MODELS)
def test_small_models_save_load_round_trip_and_dtype(cls, tester_, key, tmp_path):
    config, inputs = tester_.prepare_config_and_inputs()
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[key], loaded(**inputs)[key])
    # from_pretrained in bf16 (torch_dtype is transformers' older name of dtype): fp32 inputs still work
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}):
        half = cls.from_pretrained(tmp_path, **kwargs).eval()
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            out = half(**inputs)[key]
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        torch.testing.assert_close(out.float(), model(**inputs)[key], atol=0.1, rtol=0.1)


@pytest.mark.parametrize("cls,tester_,key", SMALL_MODELS)
def test_small_models_initialise_from_the_meta_device(cls, tester_, key):
    """Built on the meta device (as from_pretrained does), then materialised: ``_init_weights`` sets
    every parameter and buffer (BatchNorm statistics included), none is left as uninitialised memory."""
    config, inputs = tester_.prepare_config_and_inputs()
    with torch.device("meta"):
        model = cls(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    for t in list(model.parameters()) + list(model.buffers()):
        t.data.fill_(float("nan")) if t.is_floating_point() else t.data.fill_(7)
    model.initialize_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.manual_seed(0)
    ref = cls(config)
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, ref_buffers[name]), name
    for name, p in model.named_parameters():
        assert p.shape == ref.get_parameter(name).shape
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**inputs)[key]).all()
