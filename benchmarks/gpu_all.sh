#!/usr/bin/env bash
# Every GPU figure the README promises, in one call, on one GPU (sized for under 10 minutes on one H200):
#   1. sampling, SD1.5 512 px, 20 euler steps, 3 interleaved repeats: each variant against plain sampling,
#      in fp16 and in bf16 (benchmarks/ssa_benchmark.py)                           about 1-2 min
#   2. fine-tuning, SD1.5 512 px, LoRA rank 16: the pack against the core TrainLoraNode, 20 steps x 3
#      interleaved rounds, then the paper-sized run: 800 LoRA steps of the pack (finetune_benchmark.py)
#                                                                                   about 4-5 min
#   3. pretraining samples/s, full-size SD1.5 + depth ControlNet + ViT-H/14, 512 px, global batch 16, at 1
#      process (pretrain_benchmark.py --gpu), and at 2 processes where the machine has two GPUs  about 2 min
# Random weights through the host's classes; nothing is downloaded. Prints each figure as it comes and a
# markdown table at the end (also written to $OUT/gpu_figures.md when OUT is set).
#
#   COMFYUI_PATH=/path/to/ComfyUI PYTHON=/path/to/ComfyUI/venv/bin/python bash benchmarks/gpu_all.sh
#   ... bash benchmarks/gpu_all.sh --smoke     # tiny sizes, on the CPU too: a check that every part runs
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI v0.15.1 folder (the core trainer and the host classes)}"
export COMFYUI_PATH
export PYTHONPATH="$COMFYUI_PATH${PYTHONPATH:+:$PYTHONPATH}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

part() {  # part NAME COMMAND...: run one part, time it, keep its ROW lines for the table
    local name="$1"; shift
    local start=$SECONDS
    echo "== $name"
    if (cd "$COMFYUI_PATH" && "$@") 2>&1 | tee -a "$LOG" | grep -v '^ROW '; then :; else
        echo "ROW | $name | FAILED (see the output above) | | |" >> "$LOG"
    fi
    echo "   ($name: $((SECONDS - start)) s)"
}

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
echo "GPUs: $GPUS; smoke: $SMOKE; $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"

if [[ $SMOKE == 1 ]]; then
    part "sampling (smoke)" "$PYTHON" "$HERE/ssa_benchmark.py" --smoke
    part "fine-tune pack vs core (smoke)" "$PYTHON" "$HERE/finetune_benchmark.py" --model tiny --size 32 --steps 3 --repeats 2
    part "fine-tune run (smoke)" "$PYTHON" "$HERE/finetune_benchmark.py" --model tiny --size 32 --steps 4 --repeats 1 --trainers pack
    part "pretraining (smoke, CPU path)" "$PYTHON" "$HERE/pretrain_benchmark.py" --steps 1 --repeats 1
else
    part "sampling fp16" "$PYTHON" "$HERE/ssa_benchmark.py" --size 512 --steps 20 --repeats 3 --dtype float16
    part "sampling bf16" "$PYTHON" "$HERE/ssa_benchmark.py" --size 512 --steps 20 --repeats 3 --dtype bfloat16
    part "fine-tune pack vs core" "$PYTHON" "$HERE/finetune_benchmark.py" --size 512 --steps 20 --repeats 3
    part "fine-tune 800 steps" "$PYTHON" "$HERE/finetune_benchmark.py" --size 512 --steps 800 --repeats 1 --trainers pack
    part "pretraining 1 GPU" "$PYTHON" "$HERE/pretrain_benchmark.py" --gpu --steps 10
    if [[ $GPUS -ge 2 ]]; then
        part "pretraining 2 GPUs" "$PYTHON" "$HERE/pretrain_benchmark.py" --gpu --steps 10 --processes 2
    else
        echo "ROW | pretraining, 2 processes | not measured: this machine has $GPUS GPU(s) | | |" >> "$LOG"
    fi
fi

TABLE="$(printf '| figure | value | memory | time |\n|---|---|---|---|\n'; grep '^ROW ' "$LOG" | sed 's/^ROW //' || true)"
echo
echo "$TABLE"
if [[ -n "${OUT:-}" ]]; then printf '%s\n' "$TABLE" > "$OUT/gpu_figures.md"; fi
