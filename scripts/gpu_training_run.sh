#!/usr/bin/env bash
# One H200 call that trains everything the training side needs, concurrently
# (each is a small model; together they share one GPU):
#   - the bundled models, Mamba2 and GLA (scripts/build_bundled_model.sh),
#   - the small-scale StateX reproduction, GLA and Mamba2
#     (training/experiments/reproduce_small.py).
# Every run is capped in wall-clock time; what finished, logs included, is
# packed into $OUT/results.tgz.
#
#   python3 -m training.experiments.reproduce_small prepare --out .exp_corpus
#   python3 scripts/bundled_corpus.py --out .exp_corpus/bundled_corpus.jsonl
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

bundled() {  # FAMILY
    FAMILY=$1 DEVICE=cuda CORPUS=.exp_corpus/bundled_corpus.jsonl PRE_STEPS=100000 POST_STEPS=100000 \
    PRE_BUDGET=${PRE_BUDGET:-250} POST_BUDGET=${POST_BUDGET:-130} DEST="$W/bundled/statex-$1-tiny" \
        timeout "$LIMIT" bash scripts/build_bundled_model.sh "$W/bundled-$1" > "$L/bundled-$1.log" 2>&1
    echo "bundled $1: exit $? at $SECONDS s" | tee -a "$L/status.txt"
}
repro() {  # FAMILY BUDGET_SCALE
    timeout "$LIMIT" $PY -m training.experiments.reproduce_small run --corpus .exp_corpus --out "$W/repro/$1" \
        --work "$W/repro-work" --families "$1" --preset gpu --kernels reference --budget-scale "$2" \
        --deadline-s $((LIMIT - 40)) > "$L/repro-$1.log" 2>&1
    echo "repro $1: exit $? at $SECONDS s" | tee -a "$L/status.txt"
}

bundled mamba2 & bundled gla & repro gla 3 & repro mamba2 5 &
wait
cd "$W" && tar czf "$OUT/results.tgz" logs bundled repro \
    $(ls -d bundled-*/eval bundled-*/pretrain/log.jsonl bundled-*/statex/log.jsonl 2>/dev/null)
ls -la "$OUT"
