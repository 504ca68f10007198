"""Real-scale check on a GPU: the paper's SER-SLM shapes (HuBERT-large encoder, frozen; a
Llama-3.1-8B-sized LM with LoRA on the LLM only; bf16), randomly initialised because weights
cannot be downloaded where this runs. Measures, in one run:

* one SFT step (batch B, ~5 s audio), peak memory;
* one rectification step at K policies the way SEDRectifyTrainer does it (encoder once,
  ``repeat_interleave``, the K captions as one LLM batch) against the naive way (K full passes);
* batched greedy caption generation throughput.

    python benchmarks/real_scale_gpu.py --batch-size 4 --num-policies 6

Prints a final JSON line. Not part of the tests (needs a CUDA GPU with ~40 GB free).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(args):
    from peft import get_peft_model
    from transformers import HubertConfig, LlamaConfig, Wav2Vec2FeatureExtractor

    from trustser.descriptors import EMOTION_LABELS
    from trustser.models.ser_slm import SerSlmConfig, SerSlmForConditionalGeneration, SerSlmProcessor
    from trustser.models.ser_slm.configuration_ser_slm import infer_audio_conv_layers
    from trustser.models.ser_slm.presets import AUDIO_TOKEN, lora_config_for_llm, train_caption_tokenizer

    texts = [f"sentence number {i} about the weather and the day" for i in range(50)]
    tok = train_caption_tokenizer(texts, vocab_size=1000, emotion_labels=EMOTION_LABELS["iemocap"])
    audio_config = HubertConfig(  # facebook/hubert-large-ll60k shapes
        hidden_size=args.audio_hidden, num_hidden_layers=args.audio_layers, num_attention_heads=16, intermediate_size=4 * args.audio_hidden,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
    )
    text_config = LlamaConfig(  # meta-llama/Llama-3.1-8B-Instruct shapes
        vocab_size=128256, hidden_size=args.llm_hidden, intermediate_size=int(3.5 * args.llm_hidden), num_hidden_layers=args.llm_layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = SerSlmConfig(
        audio_config=audio_config, text_config=text_config, audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN),
        audio_token=AUDIO_TOKEN, sed_vib_dim=64, semantic_vib_dim=128, vib_hidden_size=256, freeze_audio_tower=True,
        frame_downsample=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = SerSlmForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.to(DEVICE)  # a few parameters (HuBERT's masked_spec_embed) ignore the device context
    model.model.audio_tower.requires_grad_(False)
    model = get_peft_model(model, lora_config_for_llm())
    build_s = time.time() - t0
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    processor = SerSlmProcessor(fe, tok, audio_token=AUDIO_TOKEN, audio_conv_layers=infer_audio_conv_layers(audio_config), frame_downsample=4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, processor, build_s, trainable, total


def batch(processor, n, seconds, rng):
    from trustser.descriptors import SED_FIELDS, SED_VOCAB, build_caption

    t = np.arange(int(seconds * 16000)) / 16000
    audio = [(0.1 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32) for _ in range(n)]
    caps = [
        build_caption("sentence number %d about the weather and the day" % i, "happy", {f: SED_VOCAB[f][rng.integers(len(SED_VOCAB[f]))] for f in SED_FIELDS})
        for i in range(n)
    ]
    return audio, caps


def timed(fn, reps):
    _sync()
    fn()  # warm-up
    _sync()
    t0 = time.time()
    for _ in range(reps):
        fn()
    _sync()
    return (time.time() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-policies", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--llm-layers", type=int, default=32)
    ap.add_argument("--llm-hidden", type=int, default=4096)
    ap.add_argument("--audio-layers", type=int, default=24)
    ap.add_argument("--audio-hidden", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, processor, build_s, trainable, total = build(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    base = model.get_base_model()
    audio, caps = batch(processor, args.batch_size, args.seconds, rng)
    inputs = {k: v.to(DEVICE) for k, v in processor(audio=audio, captions=caps).items() if torch.is_tensor(v)}
    model_keys = ("input_ids", "attention_mask", "labels", "input_features", "feature_attention_mask", "energy")
    mi = {k: inputs[k] for k in model_keys if k in inputs}
    K = args.num_policies

    def sft_step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**mi, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rectify_step():  # encoder once, K captions as one batch
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            feats = base.get_audio_features(mi["input_features"], mi.get("feature_attention_mask"), energy=mi.get("energy"))
            emb, kl = feats.pooler_output, feats.kl_loss
            rep = lambda x: x.repeat_interleave(K, 0)
            out = model(input_ids=rep(mi["input_ids"]), attention_mask=rep(mi["attention_mask"]), labels=rep(mi["labels"]),
                        audio_embeds=rep(emb), use_cache=False)
            loss = out.loss + 1e-3 * kl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def naive_step():  # K independent full passes
        for _ in range(K):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = model(**mi, use_cache=False).loss / K
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mem = (lambda: torch.cuda.max_memory_allocated() / 2**30) if DEVICE == "cuda" else (lambda: float("nan"))
    reset = torch.cuda.reset_peak_memory_stats if DEVICE == "cuda" else (lambda: None)
    reset()
    t_sft = timed(sft_step, args.reps)
    mem_sft = mem()
    reset()
    t_rect = timed(rectify_step, args.reps)
    mem_rect = mem()
    t_naive = timed(naive_step, max(1, args.reps - 1))
    # generation throughput
    g_audio, _ = batch(processor, args.gen_batch, args.seconds, rng)
    gi = {k: v.to(DEVICE) for k, v in processor(audio=g_audio, padding_side="left").items() if torch.is_tensor(v)}
    model.eval()

    def gen():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            model.generate(**gi, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)

    t_gen = timed(gen, 1)
    n_prompt = int(mi["attention_mask"].sum(1).float().mean())
    n_cap = int((mi["labels"] != -100).sum(1).float().mean())
    result = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "params_total": total, "params_trainable": trainable, "build_seconds": round(build_s, 1),
        "batch_size": args.batch_size, "audio_seconds": args.seconds, "K": K,
        "tokens_per_row": n_prompt, "caption_tokens_per_row": n_cap,
        "sft_step_s": round(t_sft, 3), "sft_peak_gib": round(mem_sft, 1),
        "rectify_step_s": round(t_rect, 3), "rectify_peak_gib": round(mem_rect, 1),
        "naive_step_s": round(t_naive, 3), "rectify_over_naive": round(t_rect / t_naive, 3),
        "rectify_over_sft": round(t_rect / t_sft, 2),
        "generation_tokens_per_s": round(args.gen_batch * args.gen_tokens / t_gen, 1),
        "generation_batch": args.gen_batch,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
