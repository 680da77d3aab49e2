#!/usr/bin/env bash
# What issue 25 waits for on a GPU, as one command of under 9 minutes on one H100 (the device tool's `run`):
#   1. benchmarks/train_step.py: naive, adaltm, adaltm_flex (position bias inside FlexAttention), adaltm_compile,
#      and the FlexAttention path's hidden states and dλ against the naive path (WavLM-Large geometry, batch 32 x 6 s);
#   2. benchmarks/launcher_step.py: the real run_downstream.py training loop, AdaLTM dual layer-wise in each
#      precision, with compile (200 steps, its compilations counted), flex and freeze0, and s3prl's stock
#      wavlm_local -f, through the same launcher; variants start while its time budget lasts, most important first
#      (the JSON is rewritten after each, so a run cut short keeps what finished; `skipped` names the rest).
# Before it, here: bash benchmarks/gpu_wheels.sh (the packages the GPU image lacks, into .whl/). Then:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# JSON and logs go to $OUT when set (the device tool brings them back), else to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || exit 1
fi
export PYTHONUNBUFFERED=1
DATE=$(date +%F)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

timeout 220 python3 benchmarks/train_step.py --variants naive,adaltm,adaltm_flex,adaltm_compile --warmup 2 --iters 5 \
    --out "$OUT_DIR/$DATE-gpu-train-step.json" 2>&1 | tail -n 30 | tee "$OUT_DIR/train_step.log"

timeout 310 python3 benchmarks/launcher_step.py --warmup 3 --steps 15 --budget-s 160 --variant-timeout-s 280 \
    --variants adaltm_bf16,s3prl_finetune_bf16,adaltm_bf16_compile,adaltm_bf16_flex,adaltm_fp32,adaltm_bf16_freeze0,adaltm_fp16 \
    --workdir /tmp/launcher-step --output "$OUT_DIR/$DATE-gpu-launcher.json" 2>&1 | tail -n 40 | tee "$OUT_DIR/launcher_step.log"
