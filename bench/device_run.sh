#!/usr/bin/env bash
# The GPU checks and benchmark as one prepared call of the device tool: at most TOTAL_S (560) s of wall time.
#
#   run(command="bash bench/device_run.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
#   run(command="STAGES=parity bash bench/device_run.sh", carry=[".whl"], timeout_s=600)   # a second call
#
# .whl/ must hold the wheels of ema_pytorch, pytorch_fid and pytest with its dependencies (README.md
# in this folder says how to fetch them); the machine has torch, torchvision, numpy, tqdm and pyyaml.
# What comes back under $OUT:
#   cuda_tests.log       python -m pytest tests/test_cuda.py: the GPU-only checks
#   device_run.log       every line printed, written as it goes (the tables are printed again at the end)
#   <step>.md            one table per benchmark step, copied after each step
#   results_json.tgz     the JSON of every finished step
# The benchmark rewrites its table after each variant and stops starting variants when its
# --time_budget_s is spent, so a step cut short by its time cap still leaves its finished rows.
# Rehearsal on a CPU (minutes): OUT=/tmp/rehearsal STEPS=2 SAMPLE_BATCH=4 EXTRA=--quick bash bench/device_run.sh
#
# The first H200 run (bench/results/h200-2026-11-26/) measured faithful, bf16 and compiled variants.
# This plan checks the GPU-only behaviour first (cuda_tests, ~60-120 s: two small compilations), then
# measures what that run left open, most important first (issue 7, then issue 4):
#   ddpm_train     DDPM_ddpm batch 128: use_amp (train.py --use_amp as shipped, never measured there;
#                  ~6 s) and graphs (bf16 + --compile reduce-overhead + --cudnn_benchmark: ~90-120 s of
#                  compilation and capture, then 60 steps in ~2 s); then the profile of faithful and
#                  graphs (5 steps each after the warm-up; graphs recompiles from inductor's disk cache,
#                  ~30-60 s), which says whether a step waits on the GPU or on kernel launches   ~ 230
#   ddpm_eval      DDIM-100 at batch SAMPLE_BATCH with CUDA graphs (~40 s compile + one 2-step and one
#                  100-step batch, ~10 s) and the probe pass with CUDA graphs (~40 s + 10 batches)  ~ 120
#   edm_sample     Heun-18 with CUDA graphs (~40 s + ~5 s)                                          ~ 60
#   ddpmpp_train   DDPM_ddpmpp batch 64 with CUDA graphs (a larger graph: ~120 s)                   ~ 140
#   parity         (STAGES=parity, its own call) train.py fp32 vs PARITY_VARIANT (graphs) for
#                  PARITY_STEPS (2,000) steps of 128 from the same seed: the fp32 run is the slow half
# TOTAL_S caps the sum; each step gets at most its own cap and leaves a reserve for the steps after it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
TOTAL_S=${TOTAL_S:-560}          # wall seconds for the steps together
STAGES=${STAGES:-speed}          # speed (the four benchmark steps) or parity
PARITY_STEPS=${PARITY_STEPS:-2000}
PARITY_VARIANT=${PARITY_VARIANT:-graphs}  # the fast variant held against fp32 (graphs = fast + CUDA graphs)
STEPS=${STEPS:-60}               # timed training steps per variant
SAMPLE_BATCH=${SAMPLE_BATCH:-1000}
EXTRA=${EXTRA:-}                 # flags added to every benchmark, e.g. EXTRA=--quick to rehearse on a CPU
RESULTS=/tmp/bench_results
LOG="$OUT/device_run.log"
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1
start=$SECONDS

left() { echo $(( TOTAL_S - (SECONDS - start) )); }
say() { echo "$*" | tee -a "$LOG"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { say "installing the carried wheels failed: carry .whl with ema_pytorch"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| torchvision',
        torchvision.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee -a "$LOG"

# step NAME CAP_S RESERVE_S LATE_S CONFIG [benchmark flags]: run the benchmark for at most CAP_S
# seconds and never into the RESERVE_S kept for later steps; start no variant in its last LATE_S.
step() {
    local name=$1 cap=$2 reserve=$3 late=$4 config=$5
    shift 5
    local limit=$(( $(left) - reserve ))
    (( limit > cap )) && limit=$cap
    if (( limit < 25 )); then
        say "== $name: skipped, $(left) s left of TOTAL_S=$TOTAL_S"
        return
    fi
    say "== $name: at most $limit s ($(left) s left of TOTAL_S=$TOTAL_S)"
    timeout -k 5 "$limit" python3 bench/benchmark.py --config "$config" --out "$RESULTS/$name.md" \
        --time_budget_s $(( limit - late > 1 ? limit - late : 1 )) "$@" $EXTRA 2>&1 | tee -a "$LOG"
    cp "$RESULTS/$name.md" "$RESULTS/${name}_curves.png" "$OUT/" 2>/dev/null
    (cd "$RESULTS" && tar -czf "$OUT/results_json.tgz" -- *.json) 2>/dev/null
}

# The GPU-only tests (tests/test_cuda.py: no host syncs, CUDA graphs equal to eager) decide whether
# the CUDA-graph numbers below may be trusted; their log comes back as cuda_tests.log.
cuda_tests() {
    local limit=$(( $(left) < 180 ? $(left) : 180 ))
    say "== cuda_tests: at most $limit s ($(left) s left of TOTAL_S=$TOTAL_S)"
    timeout -k 5 "$limit" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
        | tee -a "$LOG" > "$OUT/cuda_tests.log"
}

if [ "$STAGES" = parity ]; then
    step parity $(( TOTAL_S - 10 )) 0 0 config/DDPM_ddpm.yaml --only parity --loss_parity_steps "$PARITY_STEPS" \
        --parity_variant "$PARITY_VARIANT"
else
    cuda_tests
    step ddpm_train 240 150 30 config/DDPM_ddpm.yaml --only train,profile --train_variants use_amp,graphs \
        --profile_variants faithful,graphs --warmup_steps 10 --steps "$STEPS"
    step ddpm_eval 130 100 45 config/DDPM_ddpm.yaml --only sample,probe --sample_variants bf16_graphs \
        --sample_batch "$SAMPLE_BATCH" --sample_batches 1 --probe_variants bf16_large_graphs --probe_batches 10
    step edm_sample 70 60 0 config/EDM_ddpm.yaml --only sample --sample_variants bf16_graphs \
        --sample_batch "$SAMPLE_BATCH" --sample_batches 1
    step ddpmpp_train 150 0 0 config/DDPM_ddpmpp.yaml --only train --train_variants graphs \
        --warmup_steps 10 --steps "$STEPS"
fi

say "== done in $(( SECONDS - start )) s"
for table in "$RESULTS"/*.md; do
    [ -f "$table" ] && { echo; cat "$table"; } | tee -a "$LOG"
done
