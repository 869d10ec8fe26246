#!/usr/bin/env bash
# The GPU benchmark as one prepared call of the device tool: about 6 minutes of wall time in all.
#
#   run(command="bash bench/device_run.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=420)
#
# .whl/ must hold ema_pytorch and pytorch_fid wheels (README.md in this folder says how to fetch
# them); the machine has torch, torchvision, numpy, tqdm and pyyaml. What comes back under $OUT:
#   device_run.log       every line printed, written as it goes (the tables are printed again at the end)
#   <step>.md            one table per benchmark step, copied after each step
#   results_json.tgz     the JSON of every finished step
# The benchmark rewrites its table after each variant and stops starting variants when its
# --time_budget_s is spent, so a step cut short by its time cap still leaves its finished rows.
# Rehearsal on a CPU (minutes): OUT=/tmp/rehearsal STEPS=2 SAMPLE_BATCH=4 EXTRA=--quick bash bench/device_run.sh
#
# Time plan (seconds; compile times are the uncertain part). The 50k-sample and img/s rates are
# the original's measured rates on an H200, ours are expected 2-3x faster; each step also pays ~10-15 s
# of imports and CUDA start-up and ~3 s per variant to build the model and the 5,000 synthetic images.
#   ddpm_train     DDPM_ddpm, faithful + fast, 10 warm-up + 60 timed steps of 128:
#                  faithful 70x128 / 1,678 img/s = 5 s (+ DataLoader start); fast ~60-80 s of compile + 2 s  ~ 100
#   ddpmpp_train   DDPM_ddpmpp, faithful + fast, steps of 64: faithful 70x64 / 576 img/s = 8 s;
#                  fast ~80-100 s of compile (a larger graph) + 2 s                                          ~ 125
#   ddpm_eval      DDPM_ddpm DDIM-100, one timed batch each: faithful 400 images x 100 evaluations at the
#                  original's ~7,800 evaluations/s = 5 s; bf16 1,000 images ~6 s; probe --grid passes
#                  ~2 s each; then, while its budget lasts, compiled sampling (~45 s) and probe (~40 s)     ~ 30-115
#   edm_sample     EDM_ddpm Heun-18 (35 evaluations): faithful 400 images 1.6 s, bf16 1,000 images ~3 s,
#                  then compiled sampling while its budget lasts (~45 s)                                     ~ 20-65
# TOTAL_S caps the sum; each step gets at most its own cap and leaves a reserve for the steps after it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
TOTAL_S=${TOTAL_S:-360}          # wall seconds for the four steps together
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
    cp "$RESULTS/$name.md" "$OUT/" 2>/dev/null
    (cd "$RESULTS" && tar -czf "$OUT/results_json.tgz" -- *.json) 2>/dev/null
}

step ddpm_train 160 170 20 config/DDPM_ddpm.yaml --only train --train_variants faithful,bf16,fast \
    --warmup_steps 10 --steps "$STEPS"
step ddpmpp_train 150 60 20 config/DDPM_ddpmpp.yaml --only train --train_variants faithful,fast \
    --warmup_steps 10 --steps "$STEPS"
step ddpm_eval 200 30 55 config/DDPM_ddpm.yaml --only sample,probe \
    --sample_variants faithful,bf16,bf16_compile --sample_batch "$SAMPLE_BATCH" --sample_batches 1 \
    --probe_variants use_amp,bf16_large,bf16_large_compile --probe_batches 10
step edm_sample 120 0 45 config/EDM_ddpm.yaml --only sample \
    --sample_variants faithful,bf16,bf16_compile --sample_batch "$SAMPLE_BATCH" --sample_batches 1

say "== done in $(( SECONDS - start )) s"
for table in "$RESULTS"/*.md; do
    [ -f "$table" ] && { echo; cat "$table"; } | tee -a "$LOG"
done
