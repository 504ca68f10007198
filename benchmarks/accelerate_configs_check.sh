#!/usr/bin/env bash
# Runs a few SedRectifyTrainer steps (tests/rectify_two_ranks.py: tiny SER-SLM, K = 3, one
# checkpoint) under each of recipes/accelerate_configs/{ddp,zero2,zero3,fsdp}.yaml on one GPU,
# and writes OUT/summary.json: for each config, the exit status, seconds, whether the controller
# changed, the last logged loss and the checkpoint's files. Needs a CUDA machine; deepspeed and
# the packages missing there can be carried as wheels in .whl/ (see BENCHMARKS.md).
#
#     bash benchmarks/accelerate_configs_check.sh OUT
set -uo pipefail
OUT=${1:?usage: accelerate_configs_check.sh OUT}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
for cfg in ddp zero2 zero3 fsdp; do
  start=$(date +%s%N)
  $PY -m accelerate.commands.launch --config_file recipes/accelerate_configs/$cfg.yaml --num_processes 1 \
      tests/rectify_two_ranks.py "$OUT/$cfg" > "$OUT/$cfg.log" 2>&1
  rc=$?
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  echo "$cfg rc=$rc ${ms} ms"
  echo "{\"config\": \"$cfg\", \"rc\": $rc, \"seconds\": $ms.0e-3}" > "$OUT/$cfg.status.json"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out = Path(sys.argv[1]); summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                    "torch": torch.__version__}
for cfg in ("ddp", "zero2", "zero3", "fsdp"):
    s = json.loads((out / f"{cfg}.status.json").read_text())
    d = out / cfg
    if (d / "controller_final_rank0.safetensors").exists():
        a, b = load_file(d / "controller_init_rank0.safetensors"), load_file(d / "controller_final_rank0.safetensors")
        s["controller_changed"] = any(not torch.equal(a[k], b[k]) for k in a)
        logs = json.loads((d / "log_rank0.json").read_text())["log_history"]
        s["losses"] = [h["loss"] for h in logs if "loss" in h]
        s["reward_mean"] = [h.get("reward/mean") for h in logs if "loss" in h]
        ck = sorted((d / "trainer").glob("checkpoint-*"))
        s["checkpoint_files"] = sorted(p.name for p in ck[-1].iterdir()) if ck else []
    else:
        s["log_tail"] = (out / f"{cfg}.log").read_text()[-1500:]
    summary[cfg] = s
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1)[:6000])
PY
