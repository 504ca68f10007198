#!/usr/bin/env bash
# The real-path rehearsal on one GPU: recipes/configs/iemocap_sys10.yaml through
# `accelerate launch --config_file recipes/accelerate_configs/<cfg>.yaml recipes/sys10.py` under
# ddp, zero2, zero3 and fsdp (one process each, bf16), on the IEMOCAP-format and SpeechCraft-format
# fixture trees (soundfile-readable wav: no FFmpeg needed) and the tiny stand-in models of
# tests/fixtures_real.py. Only paths, model ids and step counts change on the command line, as in
# the CPU tests (tests/test_real_path.py). Prints one JSON line per config:
#   {"config", "exit_status", "seconds", "peak_gpu_memory_mib", "metrics": {wa, ua, weighted_f1, n}, "stages", "error"}
#
#   bash benchmarks/gpu_rehearsal.sh [OUT_DIR]          # CONFIGS="ddp fsdp" STEPS=20 to change what runs
#
# Needs: a CUDA GPU, espeak-ng (the annotation counts phonemes with it), deepspeed for zero2/zero3
# (a config whose launcher is missing reports it in "error" instead of running).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${TMPDIR:-/tmp}/trustser-gpu-rehearsal}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
CONFIGS="${CONFIGS:-ddp zero2 zero3 fsdp}"
STEPS="${STEPS:-4}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$OUT"

json_error() {  # config, message -> one JSON line
  "$PY" -c 'import json,sys; print(json.dumps({"config": sys.argv[1], "exit_status": None, "seconds": None,
            "peak_gpu_memory_mib": None, "metrics": None, "stages": None, "error": sys.argv[2]}))' "$1" "$2"
}

# ---- inputs (once): the trees from synthetic speech (espeak-ng) or, without it, harmonic tones
if [[ ! -s "$OUT/inputs.json" ]]; then
  corpus=""
  if command -v espeak-ng >/dev/null 2>&1; then
    corpus="$OUT/synthetic"
    [[ -d "$corpus" ]] || "$PY" -m trustser.cli synth "$corpus" --size small >"$OUT/synth.log" 2>&1 || corpus=""
  fi
  (cd "$REPO/tests" && "$PY" fixtures_real.py "$OUT/inputs" $corpus --no-meld) >"$OUT/inputs.log" 2>&1 \
    && tail -n 1 "$OUT/inputs.log" >"$OUT/inputs.json" \
    || { for c in $CONFIGS; do json_error "$c" "fixture build failed: $(tail -n 1 "$OUT/inputs.log")"; done; exit 1; }
fi
read -r SC IEMO AUDIO TEXT GENDER AGE < <("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); m=d["models"]
print(d["speechcraft"], d["iemocap"], m["audio_model"], m["text_model"], m["gender_model"], m["age_model"])' "$OUT/inputs.json")

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  for c in $CONFIGS; do json_error "$c" "no CUDA GPU visible"; done; exit 1
fi
if ! command -v espeak-ng >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libespeak-ng; then
  for c in $CONFIGS; do json_error "$c" "espeak-ng is not installed (the annotation counts phonemes with it)"; done; exit 1
fi

for c in $CONFIGS; do
  if [[ "$c" == zero* ]] && ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
    json_error "$c" "deepspeed is not installed (pip install deepspeed)"; continue
  fi
  run="$OUT/run-$c"; rm -rf "$run"; mkdir -p "$run"
  # peak GPU memory: nvidia-smi polled twice a second while the run lasts
  ( peak=0; while sleep 0.5; do
      m=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -n 1)
      [[ "$m" =~ ^[0-9]+$ ]] && (( m > peak )) && peak=$m && echo "$peak" >"$run/peak_mib"
    done ) & poller=$!
  start=$(date +%s.%N)
  "$PY" -m accelerate.commands.launch --config_file "$REPO/recipes/accelerate_configs/$c.yaml" --num_processes 1 \
      --mixed_precision bf16 "$REPO/recipes/sys10.py" --config "$REPO/recipes/configs/iemocap_sys10.yaml" \
      --output_dir "$run/out" --pretrain_root "$SC" --target_root "$IEMO" --audio_model "$AUDIO" --text_model "$TEXT" \
      --gender_model "$GENDER" --age_model "$AGE" --pretrain_max_steps "$STEPS" --cem_max_steps "$STEPS" \
      --posttrain_max_steps "$STEPS" >"$run/log.txt" 2>&1
  status=$?
  end=$(date +%s.%N)
  kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null
  "$PY" - "$c" "$status" "$start" "$end" "$run" <<'PY'
import json, sys
from pathlib import Path
c, status, start, end, run = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
res = run / "out" / "sys10-seed0" / "results.json"
metrics = stages = error = None
if res.is_file():
    r = json.loads(res.read_text())
    m = r["test"]["iemocap"]
    metrics = {k: m[k] for k in ("wa", "ua", "weighted_f1", "n")}
    stages = {s["name"]: s["seconds"] for s in r["stages"]}
if status != 0:
    lines = [l for l in (run / "log.txt").read_text(errors="replace").splitlines() if l.strip()]
    error = next((l for l in reversed(lines) if "Error" in l or l.startswith("trustser:")), lines[-1] if lines else "")[:500]
peak = run / "peak_mib"
print(json.dumps({"config": c, "exit_status": status, "seconds": round(end - start, 1),
                  "peak_gpu_memory_mib": int(peak.read_text()) if peak.is_file() else None,
                  "metrics": metrics, "stages": stages, "error": error}))
PY
done
