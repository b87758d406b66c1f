#!/usr/bin/env bash
# GPU benchmark (NVIDIA H200, no model hub needed): unsloth against transformers + peft (SDPA) on a random-init
# Qwen2.5-1.5B-shaped model, LoRA r=16 on all linear layers, seq 2048, bf16, packed rows. One call, under 8 minutes:
# builds the model once, trains each side in its own process (unsloth patches transformers on import), then prints
# tokens/s, peak GPU memory, MFU and the ratios (last lines). See bench/gpu_train.py for what is measured.
#
#   bench/gpu.sh            # on the GPU machine, with a CUDA venv that has the trainer's extras (PY=... to choose)
#   bench/gpu.sh --tiny     # small config, seq 128, a few steps: checks the whole path on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
TINY=()
if [[ "${1:-}" == "--tiny" ]]; then TINY=(--tiny); fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench-gpu-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ ${#TINY[@]} -gt 0 ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

"$PY" bench/gpu_train.py build --dir "$WORK/model" "${TINY[@]}"
"$PY" bench/gpu_train.py train --impl hf --dir "$WORK/model" --result "$WORK/hf.json" "${TINY[@]}"
"$PY" bench/gpu_train.py train --impl unsloth --dir "$WORK/model" --result "$WORK/unsloth.json" "${TINY[@]}"
"$PY" bench/gpu_train.py report "$WORK/hf.json" "$WORK/unsloth.json"
