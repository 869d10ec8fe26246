#!/usr/bin/env bash
# The GPU checks and benchmark as one prepared call of the device tool: at most TOTAL_S (480) s of wall time.
#
#   run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=600)
#
# A session's 15 device minutes hold one such call (a machine start takes 1-2 minutes more, and none
# starts with under 4 minutes left). STAGES picks what the call does:
#   all     (default) the suite and the GPU-only tests on CUDA, then training, sampling, probe and DiT speed
#   ddpmpp  the DDPM++ network's training speed with CUDA graphs
#   parity  the 2,000-step loss-parity check; size PARITY_STEPS from the fp32 row of a training run
#   dit     DiT-XL/2's feature pass at batch 128 and 1024 in bf16 (eager, then compiled) and the SD VAE's
#           encode at 256x256 (bf16, fp32), bench/dit_speed.py, in DIT_S (240) s
#   uvit_guided  issue 34: the 44.3M U-ViT's training speed (UVIT_CONFIG, config/DDPM_uvit.yaml: use_amp and bf16,
#           eager; cap 150), then DDIM-100 on DDPM_ddpm at GUIDED_BATCH (250) images, unguided against guided
#           by a DDAE head on linear.blockname (sample.py --classifier_head's sampler; the head's weights are
#           random, its cost is a trained one's; cap 90)
#
# .whl/ must hold the wheels of ema_pytorch and pytorch_fid (the GPU machine lacks both), and of pytest
# and its dependencies where the machine has no pytest; the DiT steps also need diffusers' wheel
# (bench/README.md says how to fetch them). Packages that already import are used as they are.
#
# Rehearsal on a CPU, every stage with the same flags and code paths at tiny sizes (a few minutes on 2 cores):
#   REHEARSAL=1 OUT=/tmp/rehearsal bash bench/device_run.sh
# REHEARSAL=1 runs on the CPU with 1 warm-up and 1 timed step at batch 4, 3 sampler steps, tiny probe
# batches and one small test file in place of the suite (SUITE_REHEARSAL= names others), with every time
# cap REHEARSAL_SCALE (8) times the GPU's; --compile stays as on the GPU (auto: compiled there, eager on a CPU).
#
# What comes back under $OUT/<device>-<date>/ (copy it to bench/results/): command.txt (the command line
# and settings), device_run.log (every line, written as it goes; the tables are printed again at the end),
# suite.log and cuda_tests.log (pytest -v: a cut run still shows every finished test), one <step>.md per
# benchmark step and results_json.tgz with their JSON.
#
# The default plan, sized from the H200 run of 2026-11-26 (bench/results/h200-2026-11-26: faithful
# training 1,187 img/s at batch 128, compiling the training step 88 s, DDIM-100 at batch 1000 compiled
# 4.7 s per batch, Heun-18 1.6 s per batch, 30-90 s per compilation) and SPEC section 11; each step has
# a cap, keeps a reserve for the steps after it and is skipped when fewer than its minimum are left:
#   install, device query                                                                   ~ 10
#   cuda_tests   tests/test_cuda.py: no host syncs, CUDA graphs against eager (two small
#                compilations)                                                          cap 100
#   suite        DDAE_TEST_DEVICE=cuda pytest -m "not cpu_only": the device-generic tests on the GPU
#                (the CPU-only ones ran in CI)                                          cap 110
#   train        DDPM_ddpm batch 128: use_amp (the README's command, DataLoader; 70 steps ~ 8 s),
#                use_amp_accum4 (the 4-GPU recipe on one GPU, --accum 4: 70 steps of 512 ~ 30 s),
#                fast (the fastest measured path: ~88 s of compilation + ~3 s)          cap 150
#   sample_probe DDPM_ddpm: the probe grid pass (linear.py --use_amp at batch 128; bf16 at 1024,
#                ~10 s), DDIM-100 at batch 1000 bf16 + compile (~40-90 s + 2 batches)   cap  70
#   edm_sample   EDM_ddpm Heun-18 at batch 1000, bf16 (eager: no second compilation)    cap  25
#   dit_eager    DiT-XL/2's feature pass at batch 128 and 1024 and the VAE's bf16 encode, eager (imports
#                and building ~15 s, the batches ~15 s)                                 cap  45
# Sum of the caps 500 against TOTAL_S 480; the estimates sum to about 400.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=${REHEARSAL:-0}        # 1: the same plan on the CPU at tiny sizes
OUT_ROOT=${OUT:-/tmp/bench_out}
TOTAL_S=${TOTAL_S:-480}          # wall seconds for the steps together
STAGES=${STAGES:-all}            # all, ddpmpp, parity or dit (see above)
PARITY_STEPS=${PARITY_STEPS:-2000}
DIT_S=${DIT_S:-240}             # the dit stage's cap
UVIT_CONFIG=${UVIT_CONFIG:-config/DDPM_uvit.yaml}  # the uvit_guided stage's U-ViT
GUIDED_BATCH=${GUIDED_BATCH:-250}  # guided sampling keeps the activations up to the head's block for the backward
PARITY_VARIANT=${PARITY_VARIANT:-graphs}  # the fast variant held against fp32 (graphs = fast + CUDA graphs)
STEPS=${STEPS:-60}               # timed training steps per variant
SAMPLE_BATCH=${SAMPLE_BATCH:-1000}
EXTRA=${EXTRA:-}                 # flags added to every benchmark (the dit steps get them too)
SUITE=${SUITE:-tests}            # what the suite stage runs
SCALE=1                          # caps, reserves and minimums are multiplied by it
DIT_EXTRA=$EXTRA
if [ "$REHEARSAL" = 1 ]; then
    # The GPU run's steps and flags at tiny sizes. A CPU still runs the full-size networks tens of times
    # slower than an H200, so every cap, reserve and minimum is REHEARSAL_SCALE (8) times the GPU's.
    SCALE=${REHEARSAL_SCALE:-8}
    SAMPLE_BATCH=4
    GUIDED_BATCH=4
    STEPS=1
    SUITE=${SUITE_REHEARSAL:-tests/test_amp_ema.py}
    TINY="--device cpu --batch_size 4 --warmup_steps 1 --sample_steps 3 --sample_batches 1 --probe_batch 4"
    EXTRA="$TINY --probe_large_batch 4 --probe_batches 1 --profile_steps 1 $EXTRA"
    DIT_EXTRA="--device cpu --dit_batch 2 --dit_large_batch 2 --dit_batches 1 --vae_batch 1 --vae_batches 1 $DIT_EXTRA"
    TEST_DEVICE=cpu
else
    TEST_DEVICE=cuda
fi
TOTAL_S=$(( TOTAL_S * SCALE ))
device_name=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower()
    if torch.cuda.is_available() and '$REHEARSAL' != 1 else 'cpu')" 2>/dev/null || echo unknown)
OUT="$OUT_ROOT/$device_name-$(date -u +%Y-%m-%d)"
RESULTS=$(mktemp -d /tmp/bench_results.XXXXXX)  # fresh: a warm machine may hold an earlier call's files
LOG="$OUT/device_run.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS
{ echo "bash bench/device_run.sh   # $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "STAGES=$STAGES TOTAL_S=$TOTAL_S SCALE=$SCALE REHEARSAL=$REHEARSAL STEPS=$STEPS SAMPLE_BATCH=$SAMPLE_BATCH SUITE=$SUITE EXTRA=$EXTRA"
} > "$OUT/command.txt"

left() { echo $(( TOTAL_S - (SECONDS - start) )); }
say() { echo "$*" | tee -a "$LOG"; }

# ema-pytorch and pytorch-fid for the code (the GPU machine lacks them); pytest only where the machine has
# none of its own, so that an installed pytest and its plugins stay as they are.
if ! python3 -c "import ema_pytorch, pytorch_fid" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/ema_pytorch-*.whl .whl/pytorch_fid-*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || { say "installing the carried wheels failed: carry .whl with ema_pytorch and pytorch_fid"; exit 1; }
fi
PYTEST_PATH=
if ! python3 -c "import pytest" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_pytest \
        .whl/pytest-*.whl .whl/iniconfig-*.whl .whl/pluggy-*.whl .whl/packaging-*.whl .whl/pygments-*.whl \
        && PYTEST_PATH=/tmp/site_pytest || say "no pytest here and none carried in .whl: the test stages will fail"
fi
# diffusers for the DiT steps' VAE: the image lacks it; its own needs (huggingface-hub, safetensors) are there
install_diffusers() {
    python3 -c "import diffusers" 2>/dev/null && return
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_dit \
            .whl/diffusers-*.whl && export PYTHONPATH=/tmp/site_dit${PYTHONPATH:+:$PYTHONPATH} \
        || say "installing .whl/diffusers-*.whl failed: the vae rows will say diffusers is missing"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, torchvision; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| torchvision',
        torchvision.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee -a "$LOG"

# limit CAP_S RESERVE_S: the seconds a step may take now (both in GPU seconds, times SCALE).
limit() {
    local limit=$(( $(left) - $2 * SCALE ))
    (( limit > $1 * SCALE )) && limit=$(( $1 * SCALE ))
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
    if (( limit < min * SCALE )); then
        say "== $name: skipped, $limit s available, needs $(( min * SCALE )) ($(left) s left of TOTAL_S=$TOTAL_S)"
        return
    fi
    say "== $name: at most $limit s ($(left) s left of TOTAL_S=$TOTAL_S)"
    timeout -k 5 "$limit" python3 "${BENCH_SCRIPT:-bench/benchmark.py}" --config "$config" --out "$RESULTS/$name.md" \
        --time_budget_s $(( limit - late * SCALE > 1 ? limit - late * SCALE : 1 )) "$@" $EXTRA 2>&1 | tee -a "$LOG"
    cp "$RESULTS/$name.md" "$OUT/" 2>/dev/null
    cp "$RESULTS/${name}_curves.png" "$OUT/" 2>/dev/null
    (cd "$RESULTS" && tar -czf "$OUT/results_json.tgz" -- *.json) 2>/dev/null
}

# tests NAME CAP_S RESERVE_S [pytest arguments]: pytest -v (a cut run still lists every finished test) on
# the test device, at most CAP_S seconds and never into the RESERVE_S kept for later steps.
tests() {
    local name=$1 limit=$(limit "$2" "$3")
    shift 3
    say "== $name: at most $limit s ($(left) s left of TOTAL_S=$TOTAL_S)"
    DDAE_TEST_DEVICE=$TEST_DEVICE PYTHONPATH=${PYTEST_PATH:+$PYTEST_PATH:}${PYTHONPATH:-} PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
        timeout -k 5 "$limit" python3 -m pytest -v -p no:cacheprovider "$@" 2>&1 | tee "$OUT/$name.log" \
        | grep -E "^(FAILED|ERROR)|passed|failed|skipped|error" | tail -n 40 | tee -a "$LOG"
}

case "$STAGES" in
    parity)
        step parity $(( TOTAL_S - 10 )) 0 60 0 config/DDPM_ddpm.yaml --only parity \
            --loss_parity_steps "$PARITY_STEPS" --parity_variant "$PARITY_VARIANT" ;;
    ddpmpp)
        step ddpmpp_train 300 0 150 0 config/DDPM_ddpmpp.yaml --only train --train_variants use_amp,graphs \
            --warmup_steps 10 --steps "$STEPS"
        step ddpmpp_profile 200 0 90 0 config/DDPM_ddpmpp.yaml --only profile --profile_variants faithful,graphs ;;
    all)
        # The GPU-only tests first: they decide whether the CUDA-graph numbers may be trusted.
        tests cuda_tests 100 370 tests/test_cuda.py
        tests suite 110 260 -m "not cpu_only" "$SUITE" --ignore=tests/test_cuda.py
        step train 150 105 100 0 config/DDPM_ddpm.yaml --only train --train_variants use_amp,use_amp_accum4,fast \
            --warmup_steps 10 --steps "$STEPS"
        step sample_probe 70 35 40 0 config/DDPM_ddpm.yaml --only probe,sample --probe_variants use_amp,bf16_large \
            --probe_batches 10 --sample_variants bf16_compile --sample_batch "$SAMPLE_BATCH" --sample_batches 1
        step edm_sample 25 0 15 0 config/EDM_ddpm.yaml --only sample --sample_variants bf16 \
            --sample_batch "$SAMPLE_BATCH" --sample_batches 1
        install_diffusers
        EXTRA=$DIT_EXTRA BENCH_SCRIPT=bench/dit_speed.py step dit_eager 45 0 30 0 config/DiT_XL_2_cifar.yaml \
            --only dit,vae --dit_variants bf16,bf16_large --vae_variants bf16 ;;
    dit)
        install_diffusers
        python3 -c "import diffusers, huggingface_hub; print('diffusers', diffusers.__version__, '| huggingface_hub',
            huggingface_hub.__version__)" 2>&1 | tee -a "$LOG"
        EXTRA=$DIT_EXTRA BENCH_SCRIPT=bench/dit_speed.py step dit "$DIT_S" 0 60 100 config/DiT_XL_2_cifar.yaml \
            --only dit,vae ;;
    uvit_guided)
        step uvit_train 150 90 60 0 "$UVIT_CONFIG" --only train --train_variants use_amp,bf16 \
            --warmup_steps 10 --steps "$STEPS"
        step guided_sample 90 0 40 0 config/DDPM_ddpm.yaml --only sample --sample_variants bf16,bf16_guided \
            --sample_batch "$GUIDED_BATCH" --sample_batches 1 ;;
    *)
        say "STAGES=$STAGES: use all, ddpmpp, parity, dit or uvit_guided"; exit 2 ;;
esac

say "== done in $(( SECONDS - start )) s"
for table in "$RESULTS"/*.md; do
    [ -f "$table" ] && { echo; cat "$table"; } | tee -a "$LOG"
done
