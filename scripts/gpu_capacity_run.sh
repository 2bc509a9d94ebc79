#!/usr/bin/env bash
# One H200 call for the StateX capacity experiment (docs/training.md;
# training/experiments/statex_capacity.py): both families, seeds 0,1,2, every
# arm, evaluation and the report, in about 8 minutes (7.5 for the run). Every stage is capped
# in wall-clock time; whatever finished (per-arm JSON, logs, the report) is
# packed into ONE file, $OUT/capacity.tar.gz (the device tool returns few files);
# seed 0's base / LPT / StateX / alt-StateX checkpoints (for serving) into $OUT/checkpoints-FAMILY-{base,statex}.tar.gz.
#
#   (device, carry .whl)  OUT=$OUT bash scripts/gpu_capacity_run.sh
#
# .whl holds the fla and mamba-ssm wheels (pure Python + Triton), installed
# into a --target dir as scripts/gpu_bench_run.sh does.
# On a machine with several GPUs the run's pipelines, and the pilot's processes,
# spread over all of them (`run --gpus`; CUDA_VISIBLE_DEVICES limits them). Environment knobs:
# SEEDS (0,1,2), BUDGET_S (the run stage's wall clock, 450), ALT=1 (also the
# alternative expansion arm), PY (python3); arguments are passed to `run`,
# e.g. `bash scripts/gpu_capacity_run.sh --set pre_steps=3000`.
# PILOT=1 first runs the pilot (MQAR only, a few learning rates; every family and
# layout at once, PILOT_S seconds at most): PILOT_LAYOUTS (e.g. "text zoology"),
# PILOT_ARGS for both families, PILOT_ARGS_GLA / PILOT_ARGS_MAMBA2 for one (e.g.
# "--set pilot_lrs=1e-2,3e-3"). RUN=0 skips the full run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
W=${WORK:-/tmp/statex-capacity}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-450}
R=$W/results
rm -rf "$R" "$W/checkpoints"
mkdir -p "$W" "$R" "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$W/triton-cache} TRITON_CACHE_AUTOTUNING=1

STAGE_DIR=$R STAGE_KILL_AFTER=15
source scripts/stage.sh     # the repository root is the working directory here

if [ -d .whl ] && [ ! -d "$W/site/fla" ]; then
    stage pip 120 $PY -m pip install -q --no-index --no-deps --target "$W/site" .whl/*.whl
fi
export PYTHONPATH=$W/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/gpu.txt" 2>&1
$PY -c 'from importlib.metadata import version as v; import torch, kernels.mamba2.mamba_ssm_ops, fla
print(*(f"{d} {v(d)}" for d in ("torch", "triton", "flash-linear-attention", "mamba_ssm")))' >> "$R/gpu.txt" 2>&1
cat "$R/gpu.txt"

[ -f "$W/corpus.jsonl" ] || stage prepare 90 $PY -m training.experiments.statex_capacity prepare --out "$W/corpus.jsonl"
if [ -n "${PILOT:-}" ]; then
    # one process per family and layout, round-robin over the visible GPUs (as `run --gpus` does)
    visible=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd,)}
    IFS=, read -ra gpus <<< "$visible"
    i=0
    for layout in ${PILOT_LAYOUTS:-default}; do
        [ "$layout" = default ] && set_layout= || set_layout="--set mqar_layout=$layout"
        for fam in gla mamba2; do
            fam_args=PILOT_ARGS_${fam^^}
            gpu=; [ ${#gpus[@]} -gt 0 ] && gpu=${gpus[$((i % ${#gpus[@]}))]}
            i=$((i + 1))
            stage "pilot-$fam-$layout" "${PILOT_S:-300}" env ${gpu:+CUDA_VISIBLE_DEVICES=$gpu} \
                $PY -m training.experiments.statex_capacity pilot --corpus "$W/corpus.jsonl" \
                --out "$R/pilot-$fam-$layout" --families $fam $set_layout ${PILOT_ARGS:-} ${!fam_args:-} &
        done
    done
    wait
fi
[ "${RUN:-1}" = 0 ] || stage run $((BUDGET_S + 40)) $PY -m training.experiments.statex_capacity run --corpus "$W/corpus.jsonl" \
    --out "$R/run" --seeds "${SEEDS:-0,1,2}" --budget-s "$BUDGET_S" --overwrite ${ALT:+--alt} --checkpoints "$@"
[ "${RUN:-1}" = 0 ] || stage report 90 $PY -m training.experiments.statex_capacity report --results "$R/run" \
    --out "$R/report/statex_capacity.md"
tail -n 3 "$R/run.log"
# the checkpoints (seed 0's base, LPT, StateX, alt) apart from the results, two files per
# family (base + LPT, the StateX arms), so the limit on what comes back (16 MiB a file;
# GLA's four were 18.3 MB in one) can only cost them, not the results
if [ -d "$R/run/checkpoints" ]; then
    mv "$R/run/checkpoints" "$W/checkpoints"
    for fam in gla mamba2; do
        [ -d "$W/checkpoints/$fam" ] || continue
        (cd "$W" && tar czf "$OUT/checkpoints-$fam-base.tar.gz" checkpoints/.byte-tokenizer \
            $(ls -d checkpoints/$fam/base checkpoints/$fam/lpt 2>/dev/null))
        (cd "$W" && tar czf "$OUT/checkpoints-$fam-statex.tar.gz" checkpoints/.byte-tokenizer \
            $(ls -d checkpoints/$fam/statex checkpoints/$fam/statex_alt 2>/dev/null))
    done
fi
cd "$W" && tar czf "$OUT/capacity.tar.gz" results
ls -la "$OUT"
