#!/usr/bin/env bash
# H200 measurements for docs/perf.md and docs/bench.md, in stages, each capped
# in wall-clock time, each writing into $OUT as it goes (a stage cut short keeps
# what it measured). Run on the device machine from the repository root:
#
#   (device, carry .whl)  OUT=$OUT bash scripts/gpu_bench_run.sh profile prefill sweep tests
#   (device, carry .whl)  OUT=$OUT bash scripts/gpu_bench_run.sh e2e
#   (device, carry .whl)  OUT=$OUT bash scripts/gpu_bench_run.sh decode
#
# Stages:
#   profile  scripts/profile_step.py on both 1.3B StateX shapes (decode graph vs
#            eager vs runner step vs the floor; prefill; kernel tables)
#   prefill  python -m kernels.bench --no-decode, 32K first, then 8K
#   sweep    decode launch configurations (SWEEP_CASES, SWEEP_BATCHES; default: the
#            two bf16-pool cases that were under 85%)
#   tests    pytest -m gpu tests/gpu (every GPU test, with the reason of any skip)
#   isolate  the tiny-shape kernel tests per kernel, then each engine / training
#            test, every one in its own process with CUDA_LAUNCH_BLOCKING=1, so
#            a device fault names its kernel and cannot spill into the next test
#   decode   python -m kernels.bench --no-prefill (the decode table, one run)
#   e2e      python -m statex_serve.bench latency + prefix on both 1.3B StateX
#            shapes (random weights), in-process engine, contexts up to 32K
#   fused    the GPU tests of the fused decode path and of the engine
#   profile-fused  profile_step.py before (--unfused) and after the fusions, then with
#            STATEX_GEMV=1 (every decode projection through kernels.gemv) into profile-gemv/
#   profile-burst  profile_step.py per shape in E2E_SHAPES with its burst rows (several prompts per
#            prefill call, eager varlen against a graph per prompt) and the decode step as served
#            against every projection through cuBLAS / through kernels.gemv (--gemv)
#   gemv     python -m kernels.gemv.bench --rows GEMV_ROWS (1,2,4,8) --sweep GEMV_SWEEP (1): the decode
#            projections, our kernel against cuBLAS, and the best of a grid of launch configurations
#   ttft     per shape in E2E_SHAPES: one request at a time (the latency goal's table): TTFT and
#            TPOT at TTFT_CTX (1K,8K,32K) prompts, 64 output tokens, from a cold engine start
#   load     per shape in E2E_SHAPES: a cold engine start (compile, autotune,
#            capture) then the load table (1K prompts, 128 tokens, concurrency
#            LOAD_CONC; a step trace of the engine into steps-load-SHAPE.jsonl), then a warm start
#            with the same cache (startup only)
# .whl holds the fla and mamba-ssm wheels (pure Python + Triton) for machines
# without an index; with network access, pip install them instead.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
W=${WORK:-/tmp/statex-gpu-bench}
PY=${PY:-python3}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$W/triton-cache} TRITON_CACHE_AUTOTUNING=1 \
    TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$W/inductor-cache}
if [ -d .whl ] && [ ! -d "$W/site/fla" ]; then
    $PY -m pip install -q --no-index --no-deps --target "$W/site" .whl/*.whl
fi
export PYTHONPATH=$W/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
$PY -c 'import torch, triton, fla; print("torch", torch.__version__, "triton", triton.__version__, "fla", fla.__version__)' \
    | tee -a "$OUT/gpu.txt"

STAGE_DIR=$OUT STAGE_KILL_AFTER=20
source scripts/stage.sh     # the repository root is the working directory here

ckpt() {  # SHAPE: a random bf16 checkpoint of a bench preset, made once per machine
    [ -f "$W/ckpt/$1/config.json" ] || $PY -m statex_serve.bench.make_checkpoint "$1" "$W/ckpt/$1" --overwrite \
        > /dev/null
}

for s in "$@"; do
    case $s in
    profile)
        stage profile "${PROFILE_S:-200}" bash -c "$PY scripts/profile_step.py gla-1.3b-statex --out $OUT/profile && \
            $PY scripts/profile_step.py mamba2-1.3b-statex --out $OUT/profile" ;;
    prefill)
        stage prefill "${PREFILL_S:-240}" $PY -m kernels.bench --no-decode --prefill-lengths 32768,8192 \
            --out "$OUT/kernels-prefill.json" ;;
    sweep)
        stage sweep "${SWEEP_S:-150}" $PY -m kernels.bench --no-decode --no-prefill --sweep \
            --sweep-cases "${SWEEP_CASES:-gla:H4K256V512:bf16,ssd:H64P64N512:bf16}" --sweep-batches "${SWEEP_BATCHES:-64,256}" \
            --sweep-out "$OUT/kernels-sweep.json" ;;
    tests)
        xdist=$($PY -c 'import xdist' 2>/dev/null && echo "-n 4")
        # the slow files first (each engine test compiles a model for ~3 minutes), so a cap cuts
        # the short kernel tests; -v names every test as it passes, so a cut run still says which did
        stage tests "${TESTS_S:-480}" $PY -m pytest -m gpu tests/gpu/test_engine_gpu.py tests/gpu/test_training_gpu.py \
            tests/gpu/test_fused_gpu.py tests/gpu -rA -v $xdist --durations=15 ;;
    isolate)
        for fn in gla_decode gla_prefill ssd_decode ssd_prefill conv_decode conv_prefill; do
            stage "isolate-tiny-$fn" "${ISOLATE_S:-90}" env CUDA_LAUNCH_BLOCKING=1 $PY -m pytest -m gpu -x -q -rA \
                tests/gpu/test_kernels_gpu.py -k "tiny and test_$fn"
        done
        for id in $($PY -m pytest -m gpu --collect-only -q tests/gpu/test_engine_gpu.py tests/gpu/test_training_gpu.py \
                    | grep '::'); do
            stage "isolate-$(echo "$id" | sed 's/.*:://; s/[^A-Za-z0-9_-]/_/g')" "${ISOLATE_S:-90}" \
                env CUDA_LAUNCH_BLOCKING=1 $PY -m pytest -m gpu -x -q -rA "$id"
        done ;;
    decode)
        stage decode "${DECODE_S:-420}" $PY -m kernels.bench --no-prefill --out "$OUT/kernels-decode.json" ;;
    e2e)
        for shape in gla-1.3b-statex mamba2-1.3b-statex; do
            ckpt "$shape"
            stage "e2e-$shape" "${E2E_S:-240}" $PY -m statex_serve.bench latency prefix --no-progress \
                --target "engine:$W/ckpt/$shape?label=$shape&max_model_len=40000" \
                --contexts 1K,4K,16K,32K --concurrency 1 --requests 4 --warmup 2 --output-len 64 \
                --out "$OUT/$shape"
        done ;;
    fused)
        stage fused "${FUSED_S:-240}" $PY -m pytest -m gpu -q -rA tests/gpu/test_fused_gpu.py \
            tests/gpu/test_engine_gpu.py ;;
    profile-fused)
        for shape in ${E2E_SHAPES:-gla-1.3b-statex mamba2-1.3b-statex}; do
            stage "profile-$shape" "${PROFILE_S:-200}" bash -c "$PY scripts/profile_step.py $shape --batch 1,64 \
                --prefill 1024 --out $OUT/profile --unfused && $PY scripts/profile_step.py $shape --batch 1,64 \
                --prefill 1024,8192 --out $OUT/profile && STATEX_GEMV=1 $PY scripts/profile_step.py $shape \
                --batch 1,64 --prefill 1024 --out $OUT/profile-gemv"
        done ;;
    profile-burst)
        for shape in ${E2E_SHAPES:-gla-1.3b-statex mamba2-1.3b-statex}; do
            stage "profile-$shape" "${PROFILE_S:-200}" $PY scripts/profile_step.py $shape --batch 1,8,64 \
                --prefill 1024,8192 --gemv --out $OUT/profile
        done ;;
    gemv)
        stage gemv "${GEMV_S:-240}" $PY -m kernels.gemv.bench --rows "${GEMV_ROWS:-1,2,4,8}" \
            --sweep "${GEMV_SWEEP:-1}" --out "$OUT/gemv.json" ;;
    ttft)
        for shape in ${E2E_SHAPES:-gla-1.3b-statex mamba2-1.3b-statex}; do
            ckpt "$shape"
            stage "ttft-$shape" "${TTFT_S:-240}" $PY -m statex_serve.bench latency --no-progress --log-level info \
                --target "engine:$W/ckpt/$shape?label=$shape&max_model_len=40000" --contexts ${TTFT_CTX:-1K,8K,32K} \
                --concurrency 1 --requests 4 --warmup 1 --output-len 64 --out "$OUT/ttft-$shape"
        done ;;
    load)
        for shape in ${E2E_SHAPES:-gla-1.3b-statex mamba2-1.3b-statex}; do
            ckpt "$shape"
            eng="engine:$W/ckpt/$shape?label=$shape&max_model_len=40000&max_num_seqs=${LOAD_SLOTS:-256}"
            # with a step trace (statex_serve/engine/step_trace.py): where each step's time went
            stage "load-$shape" "${LOAD_S:-420}" env STATEX_STEP_TRACE="$OUT/steps-load-$shape.jsonl" \
                $PY -m statex_serve.bench latency --no-progress --log-level info --target "$eng" \
                --contexts ${LOAD_CTX:-1K} --concurrency ${LOAD_CONC:-1,16,64,256} --requests ${LOAD_REQUESTS:-16} --warmup 1 \
                --output-len 128 --out "$OUT/load-$shape"
            stage "warmstart-$shape" 120 $PY -m statex_serve.bench latency --no-progress --log-level info --target "$eng" \
                --contexts 1K --concurrency 1 --requests 1 --warmup 0 --output-len 8 --out "$OUT/warm-$shape"
        done ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
    esac
done
ls -la "$OUT"
