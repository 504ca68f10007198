"""Real-scale check on a GPU: the paper's SER-SLM shapes (HuBERT-large encoder, frozen; a
Llama-3.1-8B-sized LM with LoRA on the LLM only; bf16), randomly initialised because weights
cannot be downloaded where this runs. Measures, in one run, per arm (seconds per step,
utterances per second, peak memory, LLM tokens per step) at the largest batch that fits the GPU
(doubling from 1 up to ``--max-batch-size``; or ``--batch-size B``) and at one common batch:

* ``sft``: one SerSlmSFTTrainer step (caption NLL with the LM head from the caption on);
* ``naive``: K full passes (encoder and LLM once per policy);
* ``trainer``: today's rectification step (encoder once, the K*B captions as full rows);
* ``packed``: the shared-prefix step (each utterance's audio + prompt once, its K captions packed
  behind it, ``pack_rectified_captions``);

plus the bound (P + K*S) / (P + S) and batched greedy caption generation throughput.

    python benchmarks/real_scale_gpu.py --num-policies 6 --seconds 5 --json benchmarks/results/real_scale_gpu.json
    # a CPU smoke run of the same code on toy shapes (no figures):
    python benchmarks/real_scale_gpu.py --batch-size 2 --llm-layers 1 --llm-hidden 128 --audio-layers 1 \
        --audio-hidden 64 --seconds 1 --reps 1 --gen-batch 2 --gen-tokens 4

Prints a final JSON line. Not part of the tests (the real shapes need a CUDA GPU with ~40 GB free).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = DEVICE == "cuda"  # bf16 weights and autocast on the GPU; float32 in a CPU smoke run (CPU bf16 is slow)


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
        hidden_size=args.audio_hidden,
        num_hidden_layers=args.audio_layers,
        num_attention_heads=max(1, args.audio_hidden // 64),
        intermediate_size=4 * args.audio_hidden,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
    )
    text_config = LlamaConfig(  # meta-llama/Llama-3.1-8B-Instruct shapes
        vocab_size=128256,
        hidden_size=args.llm_hidden,
        intermediate_size=int(3.5 * args.llm_hidden),
        num_hidden_layers=args.llm_layers,
        num_attention_heads=max(1, args.llm_hidden // 128),
        num_key_value_heads=max(1, args.llm_hidden // 512),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = SerSlmConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN),
        audio_token=AUDIO_TOKEN,
        sed_vib_dim=64,
        semantic_vib_dim=128,
        vib_hidden_size=256,
        freeze_audio_tower=True,
        frame_downsample=args.frame_downsample,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16 if BF16 else torch.float32)
    with torch.device(DEVICE):
        model = SerSlmForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.to(DEVICE)  # a few parameters (HuBERT's masked_spec_embed) ignore the device context
    model.model.audio_tower.requires_grad_(False)
    model = get_peft_model(model, lora_config_for_llm())
    build_s = time.time() - t0
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    processor = SerSlmProcessor(
        fe,
        tok,
        audio_token=AUDIO_TOKEN,
        audio_conv_layers=infer_audio_conv_layers(audio_config),
        frame_downsample=args.frame_downsample,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, processor, build_s, trainable, total


def _random_caption(i, rng):
    from trustser.descriptors import SED_FIELDS, SED_VOCAB, build_caption

    sed = {f: SED_VOCAB[f][rng.integers(len(SED_VOCAB[f]))] for f in SED_FIELDS}
    return build_caption("sentence number %d about the weather and the day" % i, "happy", sed)


def batch(processor, n, seconds, rng, k=1):
    """n utterances of ``seconds`` and k captions each (descriptors drawn at random)."""
    t = np.arange(int(seconds * 16000)) / 16000
    audio = [
        (0.1 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
        for _ in range(n)
    ]
    caps = [_random_caption(i, rng) for i in range(n) for _ in range(k)]
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


def make_arms(model, processor, args):
    """arm name -> build(batch_size) -> (step function, LLM tokens per step, (P, S) per utterance)."""
    from trustser.trainers.rectify import (
        audio_inputs_of,
        pack_rectified_captions,
        packed_caption_token_nll,
        rectified_caption_inputs,
    )
    from trustser.trainers.sft import caption_token_nll

    K = args.num_policies
    base = model.get_base_model()
    lm = base.model.language_model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    beta = base.config.vib_beta

    def finish(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def inputs_for(b):
        rng = np.random.default_rng(b)
        audio, caps = batch(processor, b, args.seconds, rng, k=K)
        first = caps[::K]
        enc = {k: v.to(DEVICE) for k, v in processor(audio=audio, captions=first).items() if torch.is_tensor(v)}
        rect = rectified_caption_inputs(processor, enc["input_ids"], enc["labels"], caps, K)
        caption = (enc["labels"] != -100).sum(1).float()
        prefix = enc["attention_mask"].sum(1).float() - caption
        return enc, rect, audio, caps, (prefix, caption)

    def sft(b):
        enc, _, _, _, ps = inputs_for(b)

        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
                nll, valid, _, out = caption_token_nll(model, enc, audio_inputs=audio_inputs_of(enc))
                loss = nll.sum() / valid.sum() + beta * out.kl_loss
            finish(loss)

        return step, enc["input_ids"].numel(), ps

    def naive(b):
        enc, _, audio, caps, ps = inputs_for(b)
        per_policy = [
            {k: v.to(DEVICE) for k, v in processor(audio=audio, captions=caps[j::K]).items() if torch.is_tensor(v)}
            for j in range(K)
        ]

        def step():
            for mi in per_policy:
                with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
                    nll, valid, _, out = caption_token_nll(model, mi, audio_inputs=audio_inputs_of(mi))
                    loss = (nll.sum() / valid.sum() + beta * out.kl_loss) / K
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, sum(mi["input_ids"].numel() for mi in per_policy), ps

    def trainer(b):
        enc, rect, _, _, ps = inputs_for(b)

        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
                nll, valid, _, out = caption_token_nll(model, rect, audio_inputs=audio_inputs_of(enc), audio_repeats=K)
                loss = nll.sum() / valid.sum() + beta * out.kl_loss
            finish(loss)

        return step, rect["input_ids"].numel(), ps

    def packed(b):
        enc, rect, _, _, ps = inputs_for(b)
        pk = pack_rectified_captions(rect, K)

        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
                nll, valid, _, out = packed_caption_token_nll(
                    model,
                    pk,
                    audio_inputs=audio_inputs_of(enc),
                    attn_implementation=lm.config._attn_implementation,
                    dtype=lm.get_input_embeddings().weight.dtype,
                )
                loss = nll.sum() / valid.sum() + beta * out.kl_loss
            finish(loss)

        return step, pk["input_ids"].numel(), ps

    return {"sft": sft, "naive": naive, "trainer": trainer, "packed": packed}


def run_arm(build_arm, b, reps):
    """(seconds per step, peak GiB, LLM tokens per step, (P, S)) at batch b."""
    step, tokens, ps = build_arm(b)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    return seconds, peak, tokens, ps


def fill_batch(build_arm, args):
    """The largest batch (1, 2, 4, ... up to --max-batch-size) whose step fits the GPU, and its run."""
    if args.batch_size or DEVICE != "cuda":
        b = args.batch_size or 1
        return b, run_arm(build_arm, b, args.reps)
    best = None
    b = 1
    while b <= args.max_batch_size:
        try:
            best = (b, run_arm(build_arm, b, args.reps))
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        b *= 2
    if best is None:
        raise SystemExit("not even batch 1 fits on this GPU")
    return best


def _arm_record(b, run):
    seconds, peak, tokens, _ = run
    return {
        "batch_size": b,
        "step_s": round(seconds, 4),
        "utterances_per_s": round(b / seconds, 2),
        "peak_gib": round(peak, 2) if peak is not None else None,
        "llm_tokens_per_step": int(tokens),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=0, help="0: the largest that fits the GPU, per arm")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument(
        "--compare-batch-size",
        type=int,
        default=0,
        help="common batch of the step-time ratios (0: the smallest fill batch)",
    )
    ap.add_argument("--num-policies", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--frame-downsample",
        type=int,
        default=1,
        help="encoder frames per audio token: 1 = HuBERT's 50 Hz, a 5 s prefix >= 4x the caption (the paper's "
        "proportions); 4 = build_paper_ser_slm's default",
    )
    ap.add_argument("--llm-layers", type=int, default=32)
    ap.add_argument("--llm-hidden", type=int, default=4096)
    ap.add_argument("--audio-layers", type=int, default=24)
    ap.add_argument("--audio-hidden", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the result here (atomically)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, processor, build_s, trainable, total = build(args)
    model.train()
    arms = make_arms(model, processor, args)
    K = args.num_policies
    filled = {name: fill_batch(fn, args) for name, fn in arms.items()}
    common_b = args.compare_batch_size or min(b for b, _ in filled.values())
    common = {
        name: (filled[name][1] if filled[name][0] == common_b else run_arm(fn, common_b, args.reps))
        for name, fn in arms.items()
    }
    prefix, caption = common["sft"][3]
    bound = float(((prefix + K * caption) / (prefix + caption)).mean())
    t = {name: run[0] for name, run in common.items()}
    # generation throughput
    g_audio, _ = batch(processor, args.gen_batch, args.seconds, rng)
    gi = {k: v.to(DEVICE) for k, v in processor(audio=g_audio, padding_side="left").items() if torch.is_tensor(v)}
    model.eval()

    def gen():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
            model.generate(
                **gi,
                max_new_tokens=args.gen_tokens,
                min_new_tokens=args.gen_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )

    t_gen = timed(gen, 1)
    result = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "attn_implementation": model.get_base_model().model.language_model.config._attn_implementation,
        "params_total": total,
        "params_trainable": trainable,
        "build_seconds": round(build_s, 1),
        "audio_seconds": args.seconds,
        "K": K,
        "frame_downsample": args.frame_downsample,
        "prompt_tokens_P": round(float(prefix.mean()), 1),
        "caption_tokens_S": round(float(caption.mean()), 1),
        "prefix_over_caption": round(float((prefix / caption).mean()), 2),
        "shared_prefix_bound": round(bound, 3),
        "filled": {name: _arm_record(b, run) for name, (b, run) in filled.items()},
        "common": {name: _arm_record(common_b, run) for name, run in common.items()},
        "packed_over_trainer": round(t["packed"] / t["trainer"], 3),
        "packed_over_bound_x_sft": round(t["packed"] / (bound * t["sft"]), 3),
        "trainer_over_naive": round(t["trainer"] / t["naive"], 3),
        "packed_over_naive": round(t["packed"] / t["naive"], 3),
        "generation_tokens_per_s": round(args.gen_batch * args.gen_tokens / t_gen, 1),
        "generation_batch": args.gen_batch,
    }
    if args.json:
        from trustser.utils import atomic_write_json

        atomic_write_json(args.json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
