#!/usr/bin/env bash
# One H200 call for the small-scale StateX reproduction, GLA and Mamba2
# concurrently (training/experiments/reproduce_small.py; two small models
# sharing one GPU). The 2026-11-28 run of this script also ran two GPU builds
# of the bundled model beside them (docs/bundled-model.md says how they did).
# Every run is capped in wall-clock time; what finished, logs included, is
# packed into $OUT/results.tgz.
#
#   python3 -m training.experiments.reproduce_small prepare --out .exp_corpus
#   (device, carry .exp_corpus)  OUT=$OUT bash scripts/gpu_training_run.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
W=${WORK:-/tmp/statex-gpu-run}
LIMIT=${LIMIT:-540}          # seconds for every run, start to finish
L=$W/logs
mkdir -p "$W" "$L" "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 STATEX_KERNELS=reference PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    | tee -a "$L/gpu.txt"

repro() {  # FAMILY BUDGET_SCALE
    timeout "$LIMIT" $PY -m training.experiments.reproduce_small run --corpus .exp_corpus --out "$W/repro/$1" \
        --work "$W/repro-work" --families "$1" --preset gpu --kernels reference --budget-scale "$2" \
        --deadline-s $((LIMIT - 40)) > "$L/repro-$1.log" 2>&1
    echo "repro $1: exit $? at $SECONDS s" | tee -a "$L/status.txt"
}

repro gla 3 & repro mamba2 5 &
wait
cd "$W" && tar czf "$OUT/results.tgz" logs repro
ls -la "$OUT"
