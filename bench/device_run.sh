#!/usr/bin/env bash
# The GPU checks and benchmark as one prepared call of the device tool: at most TOTAL_S (540) s of wall time.
#
#   run(command="bash bench/device_run.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
#
# A session's 15 device minutes hold one such call (a machine start takes 1-2 minutes more, and
# none starts with under 4 minutes left). STAGES picks what the call does:
#   speed   (default) the GPU-only tests, then the speed figures issues 7 and 4 still lack
#   ddpmpp  the DDPM++ network's training speed with CUDA graphs
#   parity  the 2,000-step loss-parity check; size PARITY_STEPS from the fp32 row of the speed stage
#   dit     issue 15 part 7: DiT-XL/2's feature pass at batch 128 and 1024 in bf16 (eager, then
#           compiled) and the SD VAE's encode at 256x256 (bf16, fp32), bench/dit_speed.py, in DIT_S (240) s
#
# .whl/ must hold the wheels of ema_pytorch and pytorch_fid, and of pytest and its dependencies
# (README.md in this folder says how to fetch them); the dit stage also needs diffusers' wheel
# (diffusers==0.42.1: its huggingface-hub>=1.32 and safetensors>=0.8 are met by the image's 1.33.0 and
# 0.8.0). The machine has torch, torchvision, numpy, tqdm and pyyaml. What comes back under $OUT:
#   cuda_tests.log       python -m pytest tests/test_cuda.py: the GPU-only checks (speed stage)
#   device_run.log       every line printed, written as it goes (the tables are printed again at the end)
#   <step>.md            one table per benchmark step, copied after each step (parity: and its curves)
#   results_json.tgz     the JSON of every finished step
# The benchmark rewrites its table after each variant and starts no variant once its --time_budget_s
# is spent, so a step cut short by its time cap still leaves its finished rows.
# Rehearsal on a CPU (under a minute): OUT=/tmp/rehearsal STEPS=2 SAMPLE_BATCH=4 EXTRA=--quick bash bench/device_run.sh
# and for the dit stage:              OUT=/tmp/rehearsal_dit STAGES=dit EXTRA=--quick bash bench/device_run.sh
#
# The first H200 run (bench/results/h200-2026-11-26/) measured the faithful, bf16 and compiled
# variants. The speed stage measures what that run left open, most important first. Estimates from
# that run's rates and compile times (an H200; an H100 is somewhat slower):
#   cuda_tests     tests/test_cuda.py: two small compilations and a few short runs              60-120
#   ddpm_train     DDPM_ddpm batch 128: use_amp (train.py --use_amp as shipped, never measured on a
#                  GPU; ~8 s), fp32 (the parity reference's rate; ~15 s), graphs (bf16 +
#                  --compile reduce-overhead + --cudnn_benchmark: ~90-120 s of compilation and
#                  capture, then 60 steps in ~2 s); then the profile of faithful (~5 s) and of
#                  graphs (recompiled from inductor's disk cache, ~30-60 s)                         ~ 230
#   ddpm_eval      DDIM-100 at batch SAMPLE_BATCH with CUDA graphs (~40 s of compilation + a 2-step
#                  and a 100-step batch, ~10 s), then the probe pass with CUDA graphs (~40 s)       ~ 110
#   edm_sample     Heun-18 with CUDA graphs (~40 s + ~5 s)                                          ~ 60
# The dit stage (no GPU figure yet; guesses from FLOPs counted on the CPU: DiT-XL/2 up to layer-13
# 114 GFLOP per image, the SD VAE's encoder 271 GFLOP per 256x256 image): imports and building both
# networks on the GPU ~15 s; DiT eager at batch 128 and 1024, 3 warm-up + 10 timed batches, ~15 s;
# VAE bf16, fp32 (the slow one) and bf16 channels_last at batch 64, 2 + 5 batches each, ~15 s; then
# DiT at batch 1024 compiled, ~60-120 s of compilation. Its variants start only in the first
# DIT_S - 100 s, so the compiled one gets at least 100 s; a cut leaves the eager rows.
# Each step has a cap, keeps a reserve for the steps after it, and is skipped when less than its
# minimum is left (a compiled variant cut off mid-compilation would leave no row at all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
TOTAL_S=${TOTAL_S:-540}          # wall seconds for the steps together
STAGES=${STAGES:-speed}          # speed, ddpmpp, parity or dit (see above)
PARITY_STEPS=${PARITY_STEPS:-2000}
DIT_S=${DIT_S:-240}             # the dit stage's cap
PARITY_VARIANT=${PARITY_VARIANT:-graphs}  # the fast variant held against fp32 (graphs = fast + CUDA graphs)
STEPS=${STEPS:-60}               # timed training steps per variant
SAMPLE_BATCH=${SAMPLE_BATCH:-1000}
EXTRA=${EXTRA:-}                 # flags added to every benchmark, e.g. EXTRA=--quick to rehearse on a CPU
RESULTS=$(mktemp -d /tmp/bench_results.XXXXXX)  # fresh: a warm machine may hold an earlier call's files
LOG="$OUT/device_run.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS

left() { echo $(( TOTAL_S - (SECONDS - start) )); }
say() { echo "$*" | tee -a "$LOG"; }

# ema-pytorch and pytorch-fid for the code; pytest only where the machine has none of its own, so
# that an installed pytest and its plugins stay as they are.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/ema_pytorch-*.whl .whl/pytorch_fid-*.whl \
    && export PYTHONPATH=/tmp/site || { say "installing the carried wheels failed: carry .whl with ema_pytorch"; exit 1; }
PYTEST_PATH=
if ! python3 -c "import pytest" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_pytest \
        .whl/pytest-*.whl .whl/iniconfig-*.whl .whl/pluggy-*.whl .whl/packaging-*.whl .whl/pygments-*.whl \
        && PYTEST_PATH=/tmp/site_pytest || say "no pytest here and none carried in .whl: cuda_tests will fail"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| torchvision',
        torchvision.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee -a "$LOG"

# limit CAP_S RESERVE_S: the seconds a step may take now.
limit() {
    local limit=$(( $(left) - $2 ))
    (( limit > $1 )) && limit=$1
    echo "$limit"
}

# step NAME CAP_S RESERVE_S MIN_S LATE_S CONFIG [benchmark flags]: run the benchmark (BENCH_SCRIPT,
# default bench/benchmark.py; it takes --config, --out, --time_budget_s) for at most CAP_S
# seconds and never into the RESERVE_S kept for later steps; skip it when fewer than MIN_S are left;
# start no variant in its last LATE_S.
step() {
    local name=$1 cap=$2 reserve=$3 min=$4 late=$5 config=$6
    shift 6
    local limit=$(limit "$cap" "$reserve")
    if (( limit < min )); then
        say "== $name: skipped, $limit s available, needs $min ($(left) s left of TOTAL_S=$TOTAL_S)"
        return
    fi
    say "== $name: at most $limit s ($(left) s left of TOTAL_S=$TOTAL_S)"
    timeout -k 5 "$limit" python3 "${BENCH_SCRIPT:-bench/benchmark.py}" --config "$config" --out "$RESULTS/$name.md" \
        --time_budget_s $(( limit - late > 1 ? limit - late : 1 )) "$@" $EXTRA 2>&1 | tee -a "$LOG"
    cp "$RESULTS/$name.md" "$OUT/" 2>/dev/null
    cp "$RESULTS/${name}_curves.png" "$OUT/" 2>/dev/null
    (cd "$RESULTS" && tar -czf "$OUT/results_json.tgz" -- *.json) 2>/dev/null
}

# The GPU-only tests (tests/test_cuda.py: no host syncs, CUDA graphs equal to eager) decide whether
# the CUDA-graph numbers after them may be trusted.
cuda_tests() {
    local limit=$(limit 120 "$1")
    say "== cuda_tests: at most $limit s ($(left) s left of TOTAL_S=$TOTAL_S)"
    PYTHONPATH=${PYTEST_PATH:+$PYTEST_PATH:}$PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
        timeout -k 5 "$limit" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
        | tee -a "$LOG" > "$OUT/cuda_tests.log"
}

case "$STAGES" in
    parity)
        step parity $(( TOTAL_S - 10 )) 0 60 0 config/DDPM_ddpm.yaml --only parity \
            --loss_parity_steps "$PARITY_STEPS" --parity_variant "$PARITY_VARIANT" ;;
    ddpmpp)
        step ddpmpp_train 300 0 150 0 config/DDPM_ddpmpp.yaml --only train --train_variants use_amp,graphs \
            --warmup_steps 10 --steps "$STEPS"
        step ddpmpp_profile 200 0 90 0 config/DDPM_ddpmpp.yaml --only profile --profile_variants faithful,graphs ;;
    speed)
        cuda_tests 400
        step ddpm_train 230 170 120 30 config/DDPM_ddpm.yaml --only train,profile \
            --train_variants use_amp,fp32,graphs --profile_variants faithful,graphs --warmup_steps 10 --steps "$STEPS"
        step ddpm_eval 110 60 60 45 config/DDPM_ddpm.yaml --only sample,probe --sample_variants bf16_graphs \
            --sample_batch "$SAMPLE_BATCH" --sample_batches 1 --probe_variants bf16_large_graphs --probe_batches 10
        step edm_sample 60 0 45 0 config/EDM_ddpm.yaml --only sample --sample_variants bf16_graphs \
            --sample_batch "$SAMPLE_BATCH" --sample_batches 1 ;;
    dit)
        # diffusers for the VAE: the image lacks it; its own needs (huggingface-hub, safetensors, ...) are there
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_dit \
                .whl/diffusers-*.whl && export PYTHONPATH=/tmp/site_dit:$PYTHONPATH \
            || say "installing .whl/diffusers-*.whl failed: the vae rows will say diffusers is missing"
        python3 -c "import diffusers, huggingface_hub; print('diffusers', diffusers.__version__, '| huggingface_hub',
            huggingface_hub.__version__)" 2>&1 | tee -a "$LOG"
        BENCH_SCRIPT=bench/dit_speed.py step dit "$DIT_S" 0 60 100 config/DiT_XL_2_cifar.yaml --only dit,vae ;;
    *)
        say "STAGES=$STAGES: use speed, ddpmpp, parity or dit"; exit 2 ;;
esac

say "== done in $(( SECONDS - start )) s"
for table in "$RESULTS"/*.md; do
    [ -f "$table" ] && { echo; cat "$table"; } | tee -a "$LOG"
done
