#!/usr/bin/env bash
# The GPU checks in one call, for a GPU machine lent for minutes: bounded in time, and leaving
# what it measured in OUT even when a step fails or runs out of time.
#
#   scripts/gpu_check.sh DATA OUT SECONDS [all|study|confirm]
#
# 1. (all, the default) a small packed sweep on cuda in the bmm engine (the LeNet as batched
#    matrix products, so far run on CPUs only), then scripts/bench.py in TF32 and bf16, packs
#    of 10 and 25 beside one run, once per engine (vmap, bmm: one failing leaves the other's
#    numbers): bench-ENGINE.json;
# 2. experiments/mnist-lenet-tuned-full.toml with `initstudy sweep --gpus 0` at the engine and
#    pack size that trained fastest in TF32 (the study's precision; vmap x25 without a
#    bench), one job per GPU (4 when unpacked), into reports/mnist-lenet-tuned-full/runs,
#    resuming the runs committed there, stopped (SIGTERM: interrupted runs say so) SECONDS
#    after the start. The folder comes back as runs.tgz.* (split to under 16 MB), with
#    timing.json and the GPU's utilisation.
#    (confirm: instead of 2, experiments/mnist-lenet-confirm.toml, fp32, resuming the CPU's
#    runs in reports/mnist-lenet-confirm/runs, at the engine and pack of a bench left in OUT.)
# Every step's output goes to log.txt. DATA is a data root holding MNIST/raw (IDX files, .gz
# or not); PYTHON the interpreter.
# A machine lent through a copy of the working tree may take less than the whole tree
# (reports/depth-mlp's histograms alone are 81 MB): send it without that folder (untracked
# for the call and excluded, then restored), and MNIST as its .gz files in an excluded folder.
set -u
data=${1:?data root} out=${2:?output folder} budget=${3:?seconds} what=${4:-all}
case $what in
    all|study) name=mnist-lenet-tuned-full ;;
    confirm) name=mnist-lenet-confirm ;;
    *) echo "usage: $0 DATA OUT SECONDS [all|study|confirm]" >&2; exit 2 ;;
esac
runs=reports/$name/runs
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
mkdir -p "$out"
work=$(mktemp -d)

step() {  # step SECONDS NAME COMMAND...: run, log its output, note its exit status
    local seconds=$1 name=$2; shift 2
    echo "== $name ($(date -u +%T))"
    timeout "$seconds" "$@" 2>&1
    echo "== $name exit $?"
}

{
    nvidia-smi -L
    "$py" -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
    if [ "$what" = all ]; then
        cat > "$work/mini.toml" <<'EOF'
name = "mini"
dataset = "mnist"
strict_data = true
schemes = ["default", "kaiming", "lsuv", "custom"]
seeds = 2
epochs = 1
train_subset = 3000
lr = [0.01, 0.1]
precision = "tf32"
EOF
        step 60 sweep "$py" -m initstudy.cli sweep "$work/mini.toml" --gpus 0 --pack 4 \
            --engine bmm --data-dir "$data" --out "$work/mini"
        for engine in vmap bmm; do
            step 150 "bench-$engine" "$py" scripts/bench.py --device cuda --dataset mnist \
                --data-dir "$data" --images 10000 --repeats 2 --pack 1,10,25 \
                --engines "$engine" --precision tf32,bf16 --json "$out/bench-$engine.json"
        done
    fi
    choice=$("$py" scripts/bench.py --precision tf32 --fastest "$out"/bench-*.json 2>/dev/null \
        || echo 25 vmap)
    read -r pack engine <<< "$choice"
    jobs=$([ "$pack" = 1 ] && echo 4 || echo 1)  # docs/performance.md: why one
    echo "study: $engine x$pack, $jobs jobs per GPU"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 \
        > "$out/gpu-utilisation.csv" &
    sampler=$!
    start=$(date +%s.%N) left=$((budget - SECONDS - 25))  # 25 s to pack the runs up
    step $((left > 10 ? left : 10)) study "$py" -m initstudy.cli sweep \
        "experiments/$name.toml" --gpus 0 --pack "$pack" --engine "$engine" \
        --jobs-per-gpu "$jobs" --data-dir "$data" \
        --wandb disabled --out "$runs"
    end=$(date +%s.%N)
    kill $sampler
    "$py" - "$start" "$end" "$pack" "$jobs" "$engine" > "$out/timing.json" <<'EOF'
import json, sys
start, end = map(float, sys.argv[1:3])
print(json.dumps({"start": start, "end": end, "seconds": end - start,
                  "pack": int(sys.argv[3]), "jobs_per_gpu": int(sys.argv[4]),
                  "engine": sys.argv[5]}))
EOF
    tar czf - "$runs" | split -b 16000000 - "$out/runs.tgz."
} 2>&1 | tee "$out/log.txt"
ls -l "$out"
