#!/usr/bin/env bash
# One-time set-up: system packages (espeak-ng, ffmpeg; chromium + chromium-driver for the demo's
# browser test), a virtual environment in .venv,
# and trustser installed into it in editable mode with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] missing system packages: ${missing[*]}" >&2
    echo "[setup] install them with: sudo apt-get install ${missing[*]}   (Debian/Ubuntu)" >&2
    echo "[setup]                or: brew install ${missing[*]}           (macOS/Homebrew)" >&2
    exit 1
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import trustser, torchaudio, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.trustser-installed ]; then
  echo "[setup] installing trustser and its dependencies into .venv (first time: a few minutes)"
  # setuptools>=77 (PEP 639 license field) and wheel: tests/test_wheel.py builds the wheel without build isolation
  .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
  # torch first, pinned to the combination verified with torchaudio/torchcodec (DESIGN section 3)
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchaudio==2.11.0" "torchcodec==0.17.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch .venv/.trustser-installed
fi
